"""The generated parts of docs/ agree with the code (``make docs`` regenerates them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_generated_docs_match_the_code() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "hack" / "gen_docs.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr or result.stdout
