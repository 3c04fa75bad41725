"""The rollout runbook of docs/02-migration.md, pasted: its marked command blocks run as they are
written (only the namespace and the service's address are this test's) against a real API
server and ``enhanced-locking operator``, and the rollout does what the runbook says."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.support.controlplane import KubeCluster
from tests.support.operator import OperatorProcess, cr
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

DOC = Path(__file__).resolve().parents[2] / "docs" / "02-migration.md"
BLOCK = re.compile(r"<!-- runbook: (?P<name>[a-z-]+) -->\n```bash\n(?P<body>.*?)```", re.DOTALL)


def runbook() -> dict[str, str]:
    return {m["name"]: m["body"] for m in BLOCK.finditer(DOC.read_text())}


def paste(cluster: KubeCluster, namespace: str, operator: OperatorProcess, name: str) -> str:
    """Run one block with bash, as a user pastes it; its output."""
    script = runbook()[name]
    script = script.replace("-n atlantis", f"-n {namespace}")
    script = script.replace("http://127.0.0.1:4142", operator.url)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True,
                            text=True, env=cluster.env(), timeout=120)
    assert result.returncode == 0, f"{name}:\n{script}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def status(cluster: KubeCluster, namespace: str) -> dict[str, Any]:
    return dict((cr(cluster, "lockmigrations", "to-enhanced", namespace) or {})
                .get("status") or {})


def reached(cluster: KubeCluster, namespace: str, operator: OperatorProcess, what: str,
            check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    def current() -> dict[str, Any] | None:
        found = status(cluster, namespace)
        return found if found and check(found) else None

    return wait_for(what, current, timeout=60, details=lambda: json.dumps(
        status(cluster, namespace), indent=1) + operator.output(limit=3000))


def paused(reason: str, index: int) -> Callable[[dict[str, Any]], bool]:
    def check(found: dict[str, Any]) -> bool:
        condition: dict[str, Any] = next(
            (c for c in found.get("conditions") or [] if c["type"] == "Paused"), {})
        return bool(found.get("currentStepIndex") == index and condition.get("reason") == reason)

    return check


def next_second() -> None:
    """The runbook's promote value is the time in seconds: two in one second are one."""
    time.sleep(1.05 - time.time() % 1)


def test_the_runbook_commands_work_when_pasted(
    kube_cluster: KubeCluster, kube_namespace: str,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    assert set(runbook()) == {"start", "watch", "replica", "pause", "resume", "promote",
                              "promote-paused", "wait", "abort", "restart", "retry"}
    kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps({
        "apiVersion": "locking.runatlantis.io/v1alpha1", "kind": "LockPolicy",
        "metadata": {"name": "default"}, "spec": {"enabled": True}}))
    kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps({
        "apiVersion": "locking.runatlantis.io/v1alpha1", "kind": "LockMigration",
        "metadata": {"name": "to-enhanced"},
        "spec": {"policyRef": {"name": "default"}, "weight": 25}}))
    operator = start_operator()
    args = (kube_cluster, kube_namespace, operator)

    paste(*args, "start")  # replaces the fixed weight with steps
    first = reached(*args, "step 2/5, the 10m pause", paused("PauseStep", 1))
    assert first["currentWeight"] == 10 and first["step"] == "2/5"

    shown = paste(*args, "watch")
    assert "to-enhanced" in shown and "Paused" in shown and "2/5" in shown
    assert "step 2/5 (pause 10m) until" in shown  # the message
    assert "StepStarted" in shown  # the Events
    migration = json.loads(paste(*args, "replica"))
    assert migration["routing"]["weight"] == 10 and migration["routing"]["phase"] == "stable"

    paste(*args, "pause")
    reached(*args, "held by spec.paused", paused("PausedBySpec", 1))
    next_second()
    paste(*args, "promote")  # waits while paused, and says so once
    reached(*args, "the promote told to wait", lambda s: "a promote waits until spec.paused is "
            "cleared" in str(s.get("message")))

    def told() -> list[str]:
        return kube_cluster.kubectl("get", "events", "-n", kube_namespace, "--field-selector",
                                    "reason=PromoteWaiting", "-o", "name").stdout.split()

    wait_for("the PromoteWaiting Event", told, timeout=60, pause=0.5)
    time.sleep(1.5)
    assert status(*args[:2])["currentStepIndex"] == 1
    assert len(told()) == 1, told()

    paste(*args, "resume")  # the promote ends the 10m pause; step 3 moves to 50
    reached(*args, "step 4/5, waiting for a promote", paused("WaitingForPromote", 3))
    assert operator.config()["routing"]["weight"] == 50

    paste(*args, "pause")
    reached(*args, "held by spec.paused at step 4/5", paused("PausedBySpec", 3))
    next_second()
    paste(*args, "promote-paused")  # resumes and ends the pause, in one edit
    paste(*args, "wait")
    done = status(*args[:2])
    assert (done["phase"], done["currentWeight"], done["step"]) == ("Completed", 100, "5/5")

    paste(*args, "abort")
    reached(*args, "weight 0", lambda s: s.get("currentWeight") == 0 and
            s["transition"]["phase"] == "stable")
    paste(*args, "restart")
    again = reached(*args, "the steps again from step 1", paused("PauseStep", 1))
    assert again["currentWeight"] == 10

    next_second()
    paste(*args, "retry")  # nothing is aborted: recorded and ignored
    reached(*args, "the retry recorded", lambda s: bool(s.get("retried")))
    assert status(*args[:2])["currentStepIndex"] == 1
