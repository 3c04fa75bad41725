"""docs/10-operators-tools.md's ``kubectl locking locks`` block, pasted into bash against a real
``enhanced-locking serve`` holding the page's scene (pull #12 of alice holds the key, #13 of bob
and #14 of carol wait): it prints what the page shows under it, but for the values of the moment
(ages, times, fencing tokens) and the columns' widths."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from tests.support.service import ServiceProcess, scrubbed_env
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "10-operators-tools.md"
BLOCK = re.compile(r"<!-- example: locks -->\n```bash\n(?P<body>.*?)```\n\n```text\n"
                   r"(?P<shown>.*?)```", re.DOTALL)
KEY = "acme/infra/envs/prod/default/prod"


def _request(pull: int, user: str, priority: str = "normal", wait: str | None = None
             ) -> dict[str, Any]:
    return {"project": {"repoFullName": "acme/infra", "path": "envs/prod", "projectName": "prod"},
            "workspace": "default", "pull": {"num": pull, "author": user},
            "user": {"username": user}, "priority": priority,
            **({"wait": wait} if wait else {})}


def _moment_free(text: str) -> list[str]:
    """The lines with the values of the moment masked and runs of spaces made one."""
    text = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z", "TIME", text)
    text = re.sub(r"(?<![\w#/])\d+[smhd](\d+[mh])?(?!\w)", "AGE", text)
    text = re.sub(r"fencing token \d+", "fencing token N", text)
    lines = [re.sub(r" {2,}", "  ", line).rstrip() for line in text.splitlines()]
    # The list's row: its TOKEN column.
    return [re.sub(r"^(\S+  #\d+ \w+  AGE  -  )\d+(  )", r"\1N\2", line) for line in lines]


def test_the_locks_block_prints_what_the_page_shows(
    service_process: Callable[..., ServiceProcess],
) -> None:
    match = BLOCK.search(DOC.read_text())
    assert match, "docs/10-operators-tools.md: the `locks` example and its output"
    service = service_process("--enhanced-locking-enabled")
    assert httpx.post(f"{service.url}/v1/locks", json=_request(12, "alice"),
                      timeout=30).status_code == 200
    answers: dict[int, int] = {}

    def wait(pull: int, user: str, priority: str) -> None:
        answers[pull] = httpx.post(f"{service.url}/v1/locks", timeout=120,
                                   json=_request(pull, user, priority, "90s")).status_code

    def queued(pull: int) -> Callable[[], bool]:
        def check() -> bool:
            answer = httpx.get(f"{service.url}/v1/queue", params={"key": KEY}, timeout=30).json()
            return any(waiter["pull"] == pull for waiter in answer["waiters"])
        return check

    waiters = []
    for pull, user, priority in ((13, "bob", "normal"), (14, "carol", "high")):
        waiter = threading.Thread(target=wait, args=(pull, user, priority), daemon=True)
        waiter.start()
        waiters.append(waiter)
        wait_for(f"pull #{pull} queued", queued(pull), timeout=60)

    env = scrubbed_env({"ENHANCED_LOCKING_URL": service.url, "NO_COLOR": "1"})
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    # `kubectl locking` is kubectl running `kubectl-locking`: the block's commands, as kubectl
    # would run them (kubectl itself is not needed to talk to the service).
    script = match["body"].replace("kubectl locking ", "kubectl-locking ")
    pasted = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert pasted.returncode == 0, pasted.stderr
    assert _moment_free(pasted.stdout) == _moment_free(match["shown"])

    # The unlock handed the key to the first waiter, as the page says.
    waiters[0].join(timeout=60)
    assert answers.get(13) == 200
    held = httpx.get(f"{service.url}/v1/locks/by-key", params={"key": KEY}, timeout=30).json()
    assert held["lock"]["pull"]["num"] == 13
    httpx.delete(f"{service.url}/v1/locks/by-key", params={"key": KEY, "pull": 13}, timeout=30)
    waiters[1].join(timeout=60)
    assert answers.get(14) == 200
