"""A bench's ``--help`` says its counts, as docs/benchmarks.md promises ("``--help`` for its
counts"): each option with a default names it, and the smaller count ``make bench`` runs with
(``BENCH_QUICK``) where there is one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def help_of(script: str) -> str:
    env = {key: value for key, value in os.environ.items() if key != "BENCH_QUICK"}
    result = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())  # argparse wraps lines at the terminal's width


@pytest.mark.parametrize(("script", "counts"), [
    ("locker.py", {"--pairs PAIRS": "(default 4000; make bench: 1000)",
                   "--rounds ROUNDS": "(default 5; make bench: 3)",
                   "--handoffs HANDOFFS": "(default 1000; make bench: 200)"}),
    ("scale.py", {"--sizes SIZES": "(default 1000,10000,100000; make bench: 1000,10000)",
                  "--waiters WAITERS": "(default 10000; make bench: 2000)"}),
    ("etcd_locking.py", {"--pairs PAIRS": "(default 1000; make bench: 200)",
                         "--blocks BLOCKS": "how many blocks of pairs the count runs (default 3)"}),
])
def test_help_names_each_count_and_what_make_bench_runs(script: str,
                                                        counts: dict[str, str]) -> None:
    shown = help_of(script)
    assert "SUPPRESS" not in shown and "show this help message and exit -" in shown
    for option, default in counts.items():
        described = re.search(re.escape(option) + r" (.*?)(?= --|$)", shown)
        assert described is not None and default in described[1], (option, shown)
