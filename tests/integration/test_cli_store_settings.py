"""Settings that are well formed but that a store cannot use, run as real subprocesses.

A Redis database number the server lacks, a TLS file that cannot be read, a data dir that is
not a directory: each is the user's mistake, so the process stops with exit code 2 and one line
naming the setting, not a traceback and not "cannot start" (which blames the store).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from tests.integration.test_cli import run
from tests.support.redis_server import RedisServer
from tests.support.service import free_port


def _one_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("enhanced-locking: ")
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _given(how: str, env_name: str, flag: str, key: str, value: str,
           tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """A setting given by flag, env or YAML: the arguments and environment to add."""
    if how == "flag":
        return [flag, value], {}
    if how == "env":
        return [], {env_name: value}
    (tmp_path / "atlantis.yaml").write_text(f"{key}: {value}\n")
    return ["--config", str(tmp_path / "atlantis.yaml")], {}


# --- a Redis database number the server lacks --------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "env", "yaml"])
@pytest.mark.parametrize("command", ["serve-enhanced", "serve-legacy", "migrate-import"])
def test_a_redis_database_the_server_lacks_exits_2_naming_the_setting(
    redis_server: RedisServer, command: str, how: str, tmp_path: Path,
) -> None:
    # redis-server has 16 databases unless told otherwise; the config allows up to 1023.
    given, env = _given(how, "ATLANTIS_ENHANCED_LOCKING_REDIS_DB", "--enhanced-locking-redis-db",
                        "enhanced-locking-redis-db", "100", tmp_path)
    at = ["--enhanced-locking-redis-addr", redis_server.addr]
    if command == "migrate-import":
        args = ["migrate", "import", "--from-redis", f"redis://{redis_server.addr}/0",
                "--enhanced-locking-backend", "redis"]
    else:
        side = (["--enhanced-locking-enabled", "--enhanced-locking-backend", "redis"]
                if command == "serve-enhanced" else ["--enhanced-locking-legacy-backend", "redis"])
        args = ["serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"), *side]
    line = _one_line(run(*args, *at, *given, env=env), "enhanced-locking-redis-db",
                     "no such database")
    assert "cannot start" not in line
