"""Helpers of the tests that paste the docs' command blocks and read what they print."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.service import scrubbed_env


def answers(text: str) -> list[Any]:
    """The JSON documents printed one after another (curl -s adds no newline between)."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while text[at:].strip():
        at += len(text[at:]) - len(text[at:].lstrip())
        value, at = decoder.raw_decode(text, at)
        found.append(value)
    return found


def run_block(script: str, *, url: str, cwd: Path) -> str:
    """Run a command block with bash as a reader pastes it into a shell whose venv is active
    (the service's commands on ``PATH``) and whose ``ENHANCED_LOCKING_URL`` is ``url``; its
    stdout. A block that fails fails the test with what it printed."""
    path = f"{Path(sys.executable).parent}:{scrubbed_env()['PATH']}"
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd,
                            env=scrubbed_env({"ENHANCED_LOCKING_URL": url, "PATH": path}),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
    return result.stdout
