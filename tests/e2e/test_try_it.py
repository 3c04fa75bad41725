"""docs/02-migration.md's "Try it", pasted: its marked command blocks run line by line as written
(only the namespace and the service's address are this test's) against a real API server and
``enhanced-locking operator``, and print what the page shows."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.support.controlplane import KubeCluster
from tests.support.operator import OperatorProcess

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "02-migration.md"
BLOCK = re.compile(r"<!-- example: (?P<name>[a-z-]+) -->\n```bash\n(?P<body>.*?)```", re.DOTALL)
OPERATOR = "enhanced-locking operator --namespace atlantis --data-dir ./el-data"


def blocks() -> dict[str, str]:
    return {m["name"]: m["body"] for m in BLOCK.finditer(DOC.read_text())}


def commands(name: str) -> list[str]:
    return [line for line in blocks()[name].splitlines() if line and not line.startswith("#")]


def shown(name: str, after: str) -> list[list[str]]:
    """The output the page shows under the command line starting with ``after``: its comment
    lines, as words (the AGE column, the last, dropped)."""
    lines = blocks()[name].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(after)) + 1
    rows = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        if line[1:].strip():
            rows.append(line[1:].split()[:-1])
    return rows


def test_try_it_applies_the_examples_and_an_edit_moves_the_weight(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None, tmp_path: Path,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    assert {"try-it-start", "try-it-edit"} <= set(blocks())
    # examples/ names the namespace atlantis in its kustomization: a copy names the test's.
    examples = tmp_path / "examples"
    shutil.copytree(ROOT / "examples", examples)
    for file in (examples / "kustomization.yaml", examples / "namespace.yaml"):
        file.write_text(re.sub(r"\batlantis\b", kube_namespace, file.read_text()))

    def paste(line: str, url: str = "") -> str:
        script = (line.replace("-n atlantis", f"-n {kube_namespace}")
                  .replace("-k examples/", f"-k {examples}/"))
        if url:
            script = script.replace("http://127.0.0.1:4142", url)
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT,
                                capture_output=True, text=True, env=kube_cluster.env(),
                                timeout=120, check=False)
        assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
        return result.stdout

    *setup, run = commands("try-it-start")
    assert run.startswith(OPERATOR), run
    for line in setup:
        paste(line)
    operator = start_operator()  # the last line, on the test's namespace, data dir and port

    applied, completed, get, curl, patch, moved, curl_again = commands("try-it-edit")
    assert "condition met" in paste(applied) and "condition met" in paste(completed)
    table = [line.split()[:-1] for line in paste(get).splitlines() if line.strip()]
    assert table == shown("try-it-edit", "kubectl get")
    routing = json.loads(paste(curl, operator.url))["routing"]
    assert (routing["enabled"], routing["weight"]) == (True, 25.0)
    generation = operator.config()["generation"]

    paste(patch)
    assert "condition met" in paste(moved)
    after = json.loads(paste(curl_again, operator.url))
    assert after["routing"]["weight"] == 50.0 and after["generation"] > generation
