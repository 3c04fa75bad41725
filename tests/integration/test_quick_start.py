"""README.md's quick start, pasted: its marked command blocks run as written against a real
``enhanced-locking serve`` with the defaults ``make run`` serves with (only the service's
address is this test's), and answer what the README says they answer."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from tests.support.pasting import answers
from tests.support.service import ServiceProcess, scrubbed_env

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- example: (?P<name>[a-z-]+) -->\n```bash\n(?P<body>.*?)```", re.DOTALL)
KEY = "acme/infra/envs/prod/default/prod"


def examples() -> dict[str, str]:
    return {m["name"]: m["body"] for m in BLOCK.finditer(README.read_text())}


@pytest.fixture
def service(service_process: Callable[..., ServiceProcess]) -> ServiceProcess:
    return service_process()  # `make run` with no ARGS


def paste(name: str, service: ServiceProcess) -> str:
    """Run one block with bash from the repository's root, as the README has it; its stdout."""
    script = examples()[name].replace("http://127.0.0.1:4142", service.url)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT,
                            env=scrubbed_env({"ENHANCED_LOCKING_URL": service.url}),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{name}:\n{script}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_the_quick_starts_requests_take_refuse_list_and_release(service: ServiceProcess) -> None:
    assert set(examples()) == {"quick-start-http", "quick-start-cli"}
    taken, refused, listed, released = answers(paste("quick-start-http", service))
    assert taken["acquired"] is True and taken["lock"]["pull"]["num"] == 12
    assert refused["acquired"] is False and refused["reason"] == "held"
    assert refused["holder"]["pull"]["num"] == 12
    assert [lock["key"] for lock in listed["locks"]] == [KEY]
    assert released["released"] is True
    assert httpx.get(f"{service.url}/v1/locks").json()["locks"] == []


def test_the_quick_starts_commands_work_as_written(service: ServiceProcess) -> None:
    if not (ROOT / ".venv" / "bin" / "activate").exists():
        pytest.fail("the README's commands need the venv: run `make venv` first", pytrace=False)
    version, _, rest = paste("quick-start-cli", service).partition("\n")
    assert version.startswith("enhanced-locking ")
    acquired, listed, released, unlocked, shown = answers(rest)
    assert acquired["acquired"] is True and acquired["lockKey"] == KEY
    assert [lock["key"] for lock in listed["locks"]] == [KEY]
    assert released["released"] is True
    assert unlocked == {"released": [], "cancelled": []}  # the release before left pull 12 nothing
    assert shown["enhanced-locking-enabled"] is True
    assert httpx.get(f"{service.url}/v1/locks").json()["locks"] == []
