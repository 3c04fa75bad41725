"""docs/01-foundation.md's examples, pasted. The configuration example: its YAML saved as
``atlantis.yaml``, its ``config show`` commands run as written, and its ``serve`` line started
(on a port of this test's and a data dir of its own) serves the file's settings under the
flag's. The empty store's: its commands print the line the page shows."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
from tests.support.pasting import answers, run_block
from tests.support.service import ServiceProcess, scrubbed_env

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "01-foundation.md"


def block(name: str, language: str) -> str:
    found = re.search(rf"<!-- example: {name} -->\n```{language}\n(.*?)```", PAGE.read_text(),
                      re.DOTALL)
    assert found is not None, f"docs/01-foundation.md: no {name} block"
    return found.group(1)


def test_the_configuration_example_works_as_written(
        service_process: Callable[..., ServiceProcess], tmp_path: Path) -> None:
    (tmp_path / "atlantis.yaml").write_text(block("config-yaml", "yaml"))
    *shows, serve = [line for line in block("config-commands", "bash").splitlines()
                     if not line.startswith("#")]
    assert serve.startswith("enhanced-locking serve ")
    defaults, layered = answers(run_block("\n".join(shows), url="http://127.0.0.1:9",
                                          cwd=tmp_path))
    assert defaults["enhanced-locking-enabled"] is False
    assert defaults["enhanced-locking-redis-password"] == ""
    assert layered["enhanced-locking-enabled"] is True  # from the environment
    assert layered["enhanced-locking-migration-weight"] == 25.0  # from the flag
    args = [str(tmp_path / arg) if arg.endswith(".yaml") else arg
            for arg in shlex.split(serve)[2:]]
    service = service_process(*args, data_dir=tmp_path / "data")
    served = httpx.get(f"{service.url}/v1/config", timeout=30).json()["config"]
    assert served["enhanced-locking-enabled"] is True
    assert served["enhanced-locking-priority-queue"] is True  # from the file
    assert served["enhanced-locking-max-timeout"] == "10m"


def test_the_empty_store_example_prints_its_line_while_the_quick_start_s_service_runs(
        service_process: Callable[..., ServiceProcess], tmp_path: Path) -> None:
    # The README's quick start leaves `make run` serving on the default address (here: the
    # default port is that service's): the example's service still meets its empty store, and
    # says so, rather than stopping at a port in use.
    quick_start = service_process(data_dir=tmp_path / "quick-start")
    text = block("empty-store", "console")
    commands = [line[2:] for line in text.splitlines() if line.startswith("$ ")]
    shown = [line for line in text.splitlines() if not line.startswith("$ ")]
    path = f"{Path(sys.executable).parent}:{scrubbed_env()['PATH']}"
    done = subprocess.run(["bash", "-c", "\n".join(commands)], cwd=tmp_path,
                          env=scrubbed_env({"PATH": path, "HOME": str(tmp_path),
                                            "ENHANCED_LOCKING_PORT": str(quick_start.port)}),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == shown
    assert (tmp_path / "empty-store" / "enhanced-locking.db").read_bytes() == b""
