"""The ``enhanced-locking`` command loads only what the command it runs needs.

Each CLI process used to import the whole package (the stores and their clients, the service,
telemetry) before parsing its arguments: most of a second of CPU for a command that sends one
request. Each case runs in a process of its own and names what it must not have loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.support.service import SHORT_CONNECT_TIMEOUT, free_port

import enhanced_locking

_PACKAGE_ROOT = str(Path(enhanced_locking.__file__).parents[1])

_STORES_AND_SERVICE = ["grpc", "etcd3aio", "redis", "sqlite3", "fastapi", "starlette", "uvicorn",
                       "prometheus_client", "opentelemetry", "kopf", "kubernetes",
                       "enhanced_locking.factory", "enhanced_locking.backends",
                       "enhanced_locking.api"]
_SETTINGS = ["enhanced_locking.config", "pydantic_settings", "yaml"]
_HTTP_CLIENT = ["enhanced_locking.client", "httpx"]


def _loaded(code: str, modules: list[str]) -> tuple[list[str], str]:
    """Run ``code`` in a fresh interpreter; which of ``modules`` it loaded, and its output."""
    script = ("import json, sys\n"
              "try:\n"
              + "".join(f"    {line}\n" for line in code.splitlines())
              + "except SystemExit:\n"
              "    pass\n"
              f"print(json.dumps([m for m in {modules!r} if m in sys.modules]))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, env={"PYTHONPATH": _PACKAGE_ROOT, "PATH": ""})
    assert result.returncode == 0, result.stderr
    *output, last = result.stdout.splitlines()
    return json.loads(last), "\n".join(output) + result.stderr


def test_importing_the_command_loads_no_store_setting_or_http_client() -> None:
    loaded, _ = _loaded("import enhanced_locking.cli", _STORES_AND_SERVICE + _SETTINGS
                        + _HTTP_CLIENT)
    assert loaded == []


def test_importing_the_package_loads_no_module_of_it_until_a_name_is_used() -> None:
    loaded, _ = _loaded("import enhanced_locking", ["enhanced_locking.types", *_HTTP_CLIENT,
                                                    *_STORES_AND_SERVICE, *_SETTINGS])
    assert loaded == []
    loaded, _ = _loaded("from enhanced_locking import LockService, lock_key",
                        ["enhanced_locking.factory", "enhanced_locking.types"])
    assert loaded == ["enhanced_locking.factory", "enhanced_locking.types"]


def test_the_package_still_names_each_public_name() -> None:
    for name in enhanced_locking.__all__:
        assert getattr(enhanced_locking, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        enhanced_locking.nothing  # noqa: B018


def test_a_command_calling_the_service_reads_no_settings() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: the call fails, exit 3
    loaded, output = _loaded(
        f"from enhanced_locking import cli\nprint('exit', cli.main(['lock', 'list', '--url', "
        f"{url!r}, '--connect-timeout', {SHORT_CONNECT_TIMEOUT!r}]))",
        _STORES_AND_SERVICE + _SETTINGS + _HTTP_CLIENT)
    assert "exit 3" in output and "cannot reach" in output.lower(), output
    assert loaded == _HTTP_CLIENT


def test_help_and_settings_commands_load_no_http_client() -> None:
    loaded, output = _loaded("from enhanced_locking import cli\ncli.main(['--help'])",
                             _STORES_AND_SERVICE + _SETTINGS + _HTTP_CLIENT)
    assert "COMMAND" in output
    assert loaded == []
    loaded, output = _loaded("from enhanced_locking import cli\ncli.main(['config', 'show'])",
                             _STORES_AND_SERVICE + _SETTINGS + _HTTP_CLIENT)
    assert '"enhanced-locking-enabled": false' in output
    assert loaded == _SETTINGS


def test_a_subcommand_gets_its_settings_flags_when_it_runs() -> None:
    loaded, output = _loaded(
        "from enhanced_locking import cli\n"
        "cli.main(['config', 'show', '--enhanced-locking-redis-db', '3'])",
        _SETTINGS)
    assert '"enhanced-locking-redis-db": 3' in output
    assert loaded == _SETTINGS


def test_a_service_without_peers_loads_no_http_client(tmp_path: Path) -> None:
    """``serve`` asks its peers over HTTP only when it has some: a start and a clean stop
    without them never load the HTTP client (about 0.1 s of CPU at each start)."""
    port = free_port()
    loaded, output = _loaded(
        "import os, signal, socket, threading, time\n"
        "from enhanced_locking import cli\n"
        "def stop_once_listening():\n"
        "    deadline = time.monotonic() + 60\n"
        "    while time.monotonic() < deadline:\n"
        "        try:\n"
        f"            socket.create_connection(('127.0.0.1', {port}), 1).close()\n"
        "            break\n"
        "        except OSError:\n"
        "            time.sleep(0.05)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "threading.Thread(target=stop_once_listening, daemon=True).start()\n"
        f"print('exit', cli.main(['serve', '--port', '{port}', '--data-dir', {str(tmp_path)!r}]))",
        ["enhanced_locking.factory", "uvicorn", *_HTTP_CLIENT])
    assert "exit 0" in output and f"listening on http://127.0.0.1:{port}" in output, output
    assert loaded == ["enhanced_locking.factory", "uvicorn"]
