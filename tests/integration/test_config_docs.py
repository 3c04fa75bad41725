"""docs/01-foundation.md's configuration example, pasted: its YAML saved as ``atlantis.yaml``, its
``config show`` commands run as written, and its ``serve`` line started (on a port of this test's
and a data dir of its own) serves the file's settings under the flag's."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path

import httpx
from tests.support.pasting import answers, run_block
from tests.support.service import ServiceProcess

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
