"""hack/'s scripts as a contributor meets them: each one whose header has a ``Usage:`` line
prints that header for ``--help``, exits 0 and does nothing else: it builds nothing and asks
no Docker engine (here the control plane named is an empty directory, the cache is empty and
no engine answers, so a script that went on instead would fail or start to build)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(path for path in (ROOT / "hack").glob("*.sh") if "\n# Usage: " in path.read_text())


def test_the_scripts_with_a_usage_line_are_found() -> None:
    assert {path.name for path in SCRIPTS} >= {"build-atlantis.sh", "build-control-plane.sh",
                                               "cluster-up.sh", "image-smoke.sh", "kind-e2e.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_help_prints_the_usage_and_does_nothing_else(script: Path, tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    cache = tmp_path / "cache"
    env = {**os.environ, "ENHANCED_LOCKING_K8S_BIN": str(empty),
           "ENHANCED_LOCKING_ATLANTIS_BIN": str(empty / "atlantis"),
           "ENHANCED_LOCKING_CACHE_DIR": str(cache),
           "DOCKER_HOST": f"unix://{tmp_path / 'no-engine.sock'}"}
    result = subprocess.run([str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120, check=False)
    assert (result.returncode, result.stderr) == (0, ""), result.stdout
    usage = next(line for line in script.read_text().splitlines() if line.startswith("# Usage: "))
    assert usage.removeprefix("# ") in result.stdout.splitlines()
    assert not cache.exists()


def test_the_python_scripts_usage_runs_them_with_the_venvs_python() -> None:
    # They import the package and its dependencies, which only the venv has: a pasted
    # `python hack/gen_chart.py` ended in a ModuleNotFoundError's traceback.
    for script in sorted((ROOT / "hack").glob("*.py")):
        usage = [line for line in script.read_text().splitlines()
                 if f"hack/{script.name}" in line and "python" in line]
        for line in usage:
            assert f".venv/bin/python hack/{script.name}" in line, f"{script.name}: {line}"
