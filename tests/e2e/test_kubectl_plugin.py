"""``kubectl locking rollout ...`` against a real API server and ``enhanced-locking operator``:
each command's output, and each edit as the CR shows it afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest
from tests.support.controlplane import KubeCluster
from tests.support.operator import OperatorProcess, cr
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

VENV_BIN = Path(sys.executable).parent
STEPS = [{"setWeight": 10}, {"pause": {}}, {"setWeight": 100}]


def apply(cluster: KubeCluster, namespace: str, kind: str, name: str,
          spec: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({
        "apiVersion": "locking.runatlantis.io/v1alpha1", "kind": kind,
        "metadata": {"name": name}, "spec": spec}))


def plugin(cluster: KubeCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "kubectl-locking"), *args], capture_output=True,
                          text=True, env=cluster.env(), timeout=60)


def status(cluster: KubeCluster, namespace: str, name: str = "to-enhanced") -> dict[str, Any]:
    return dict((cr(cluster, "lockmigrations", name, namespace) or {}).get("status") or {})


def reached(cluster: KubeCluster, namespace: str, what: str,
            check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    return wait_for(what, lambda: (s if check(s := status(cluster, namespace)) else None),
                    timeout=60, details=lambda: json.dumps(status(cluster, namespace)))


@pytest.fixture
def rollout(kube_cluster: KubeCluster, kube_namespace: str,
            start_operator: Callable[..., OperatorProcess]) -> OperatorProcess:
    """Steps waiting at their indefinite pause (step 2/3, weight 10)."""
    apply(kube_cluster, kube_namespace, "LockPolicy", "default",
          {"enabled": True, "backend": "memory"})
    apply(kube_cluster, kube_namespace, "LockMigration", "to-enhanced",
          {"policyRef": {"name": "default"}, "steps": STEPS,
           "analysis": {"maxErrorRate": 0.5, "maxFallbacks": 100}})
    operator = start_operator()
    reached(kube_cluster, kube_namespace, "the pause of step 2",
            lambda s: s.get("currentStepIndex") == 1 and s.get("phase") == "Paused")
    return operator


def test_kubectl_finds_the_plugin_and_status_is_a_tree(
    kube_cluster: KubeCluster, kube_namespace: str, rollout: OperatorProcess,
) -> None:
    env = {**kube_cluster.env()}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"
    result = subprocess.run(["kubectl", "locking", "rollout", "status", "-n", kube_namespace],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"LockMigration {kube_namespace}/to-enhanced"
    assert lines[1].startswith("├── Phase:    Paused  step 2/3 (pause until promoted)")
    assert "├── Weight:   10% now, target 100% (move: stable)" in lines
    assert "│   ├── ✔ 1. setWeight 10" in lines
    assert "│   ├── ▶ 2. pause until promoted" in lines
    assert "│   └── ○ 3. setWeight 100" in lines
    assert any(line.startswith("│   ├── ✔ error rate") and line.endswith("(limit 0.5)")
               for line in lines), result.stdout
    assert any(line.startswith("│   ├── Ready True Applied") for line in lines)
    assert lines[-1].startswith("└── Replicas: 1 reporting; status by ")

    as_json = json.loads(plugin(kube_cluster, "rollout", "status", "-n", kube_namespace,
                                "-o", "json").stdout)
    assert as_json["phase"] == "Paused" and as_json["weight"]["now"] == 10
    assert [s["state"] for s in as_json["steps"]] == ["done", "current", "pending"]


def test_each_edit_is_the_field_a_user_would_write_with_one_line_said(
    kube_cluster: KubeCluster, kube_namespace: str, rollout: OperatorProcess,
) -> None:
    ns = ("-n", kube_namespace)
    where = f"lockmigration {kube_namespace}/to-enhanced"

    paused = plugin(kube_cluster, "rollout", "pause", *ns)
    assert paused.returncode == 0 and paused.stdout == f"{where}: paused (spec.paused: true)\n"
    assert (cr(kube_cluster, "lockmigrations", "to-enhanced", kube_namespace)
            or {})["spec"]["paused"]
    reached(kube_cluster, kube_namespace, "held by spec.paused",
            lambda s: "spec.paused" in (s.get("message") or ""))
    resumed = plugin(kube_cluster, "rollout", "resume", *ns)
    assert resumed.stdout == f"{where}: resumed (spec.paused: false)\n"

    promoted = plugin(kube_cluster, "rollout", "promote", *ns)
    assert promoted.returncode == 0
    assert promoted.stdout.startswith(f"{where}: promote requested "
                                      "(locking.runatlantis.io/promote=")
    done = reached(kube_cluster, kube_namespace, "completed after the promote",
                   lambda s: s.get("phase") == "Completed")
    assert done["currentWeight"] == 100

    aborted = plugin(kube_cluster, "rollout", "abort", *ns)
    assert aborted.stdout == (f"{where}: abort requested (spec.abort: true): every key goes "
                              "back to legacy\n")
    reached(kube_cluster, kube_namespace, "aborted at weight 0",
            lambda s: s.get("phase") == "Aborted" and s.get("currentWeight") == 0)
    shown = plugin(kube_cluster, "rollout", "status", *ns)
    assert shown.returncode == 1  # scripts: aborted is not healthy
    assert "Aborted:  AbortRequested: spec.abort is true" in shown.stdout

    retried = plugin(kube_cluster, "rollout", "retry", *ns, "-o", "json")
    assert json.loads(retried.stdout)["patch"] == {"spec": {"abort": False}}
    reached(kube_cluster, kube_namespace, "the steps again",
            lambda s: s.get("phase") == "Paused" and s.get("currentStepIndex") == 1)

    refused = plugin(kube_cluster, "rollout", "set-weight", "30", *ns)
    assert refused.returncode == 1 and "spec.steps" in refused.stderr
    assert plugin(kube_cluster, "rollout", "set-weight", "150", *ns).returncode == 2


def test_promote_ends_a_pause_made_by_rollout_pause_as_argo_rollouts_promote_does(
    kube_cluster: KubeCluster, kube_namespace: str, rollout: OperatorProcess,
) -> None:
    # `kubectl argo rollouts promote` sets spec.paused to false (with the pause step it
    # skips): a user who paused the rollout and then promotes it sees it go on.
    ns = ("-n", kube_namespace)
    where = f"lockmigration {kube_namespace}/to-enhanced"
    assert plugin(kube_cluster, "rollout", "pause", *ns).returncode == 0
    reached(kube_cluster, kube_namespace, "held by spec.paused",
            lambda s: "spec.paused" in (s.get("message") or ""))

    promoted = plugin(kube_cluster, "rollout", "promote", *ns)
    assert promoted.returncode == 0, promoted.stderr
    assert promoted.stdout.startswith(f"{where}: promote requested "
                                      "(locking.runatlantis.io/promote=")
    assert promoted.stdout.endswith(", spec.paused cleared): the pause in progress ends\n")
    assert (cr(kube_cluster, "lockmigrations", "to-enhanced", kube_namespace)
            or {})["spec"]["paused"] is False
    done = reached(kube_cluster, kube_namespace, "completed after the promote",
                   lambda s: s.get("phase") == "Completed")
    assert done["currentWeight"] == 100


def test_a_promote_with_no_pause_in_progress_says_it_skips_nothing(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None,
) -> None:
    # The operator records such a promote and skips nothing (Event PromoteIgnored): the line
    # said "the pause in progress ends" all the same.
    ns = ("-n", kube_namespace)
    apply(kube_cluster, kube_namespace, "LockMigration", "fixed",
          {"policyRef": {"name": "default"}, "weight": 5})
    fixed = plugin(kube_cluster, "rollout", "promote", "fixed", *ns)
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.startswith(f"lockmigration {kube_namespace}/fixed: promote requested "
                                   "(locking.runatlantis.io/promote=")
    assert fixed.stdout.endswith("): no pause is in progress (the migration has no steps): "
                                 "the promote is recorded and skips nothing\n")
    annotations = (cr(kube_cluster, "lockmigrations", "fixed", kube_namespace)
                   or {})["metadata"]["annotations"]
    assert "locking.runatlantis.io/promote" in annotations

    # No operator here, so no status: the rollout is at its first step, a setWeight.
    apply(kube_cluster, kube_namespace, "LockMigration", "stepped",
          {"policyRef": {"name": "default"}, "steps": STEPS})
    stepped = plugin(kube_cluster, "rollout", "promote", "stepped", *ns)
    assert stepped.returncode == 0, stepped.stderr
    assert stepped.stdout.endswith("): no pause is in progress (step 1/3 (setWeight 10) is "
                                   "not a pause): the promote is recorded and skips nothing\n")


def test_set_weight_on_a_fixed_weight_migration_and_refusals(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None,
) -> None:
    apply(kube_cluster, kube_namespace, "LockMigration", "fixed",
          {"policyRef": {"name": "default"}, "weight": 5})
    result = plugin(kube_cluster, "rollout", "set-weight", "37.5", "fixed", "-n", kube_namespace)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"lockmigration {kube_namespace}/fixed: weight set to 37.5\n"
    spec = (cr(kube_cluster, "lockmigrations", "fixed", kube_namespace) or {})["spec"]
    assert spec["weight"] == 37.5

    # abort wins over the weight: the line says the weight does not take effect yet.
    kube_cluster.kubectl("patch", "lockmigration", "fixed", "-n", kube_namespace,
                         "--type=merge", "-p", '{"spec": {"abort": true}}')
    held = plugin(kube_cluster, "rollout", "set-weight", "40", "fixed", "-n", kube_namespace)
    assert held.returncode == 0, held.stderr
    assert held.stdout == (f"lockmigration {kube_namespace}/fixed: weight set to 40; "
                           "spec.abort is true: every key stays on legacy until it is cleared\n")

    missing = plugin(kube_cluster, "rollout", "status", "nope", "-n", kube_namespace)
    assert missing.returncode == 1
    assert missing.stderr.startswith(f"kubectl-locking: lockmigration {kube_namespace}/nope: ")
    assert "not found" in missing.stderr and "Traceback" not in missing.stderr


def test_status_watch_follows_the_rollout_until_it_completes(
    kube_cluster: KubeCluster, kube_namespace: str, rollout: OperatorProcess,
) -> None:
    watching = subprocess.Popen(
        [str(VENV_BIN / "kubectl-locking"), "rollout", "status", "--watch", "--timeout", "90",
         "-n", kube_namespace], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=kube_cluster.env())
    assert watching.stdout is not None and watching.stderr is not None
    printed: list[str] = []

    def read(stream: IO[str]) -> None:
        for line in stream:
            printed.append(line)

    reader = threading.Thread(target=read, args=(watching.stdout,), daemon=True)
    reader.start()
    # Promoted only once the watch has shown the pause: a new process takes over 20 s to start
    # at a load average of 25, and a promote after a fixed 2 s could come before its first tree.
    wait_for("the watch to show the pause", lambda: any(
        "▶ 2. pause until promoted" in line for line in list(printed)), timeout=90)
    assert plugin(kube_cluster, "rollout", "promote", "-n", kube_namespace).returncode == 0
    watching.wait(90)
    reader.join(90)
    with watching.stdout, watching.stderr:
        out, err = "".join(printed), watching.stderr.read()
    assert watching.returncode == 0, err
    trees = out.strip().split("\n\n")
    assert "▶ 2. pause until promoted" in trees[0]
    last = trees[-1].splitlines()
    assert last[1].startswith("├── Phase:    Completed")
    assert "│   └── ✔ 3. setWeight 100" in last


def test_abort_takes_back_a_full_promotion_and_a_full_promotion_an_abort(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None,
) -> None:
    """spec.abort and spec.promote cannot both be true (the CRD's rule): an abort of a fully
    promoted migration (the moment one is most needed) clears spec.promote instead of being
    refused, and a full promotion clears spec.abort."""
    apply(kube_cluster, kube_namespace, "LockMigration", "promoted",
          {"policyRef": {"name": "default"}, "steps": STEPS, "promote": True})
    ns = ("-n", kube_namespace)
    where = f"lockmigration {kube_namespace}/promoted"

    aborted = plugin(kube_cluster, "rollout", "abort", "promoted", *ns)
    assert aborted.returncode == 0, aborted.stderr
    assert aborted.stdout == (f"{where}: abort requested (spec.abort: true, spec.promote "
                              "cleared): every key goes back to legacy\n")
    spec = (cr(kube_cluster, "lockmigrations", "promoted", kube_namespace) or {})["spec"]
    assert spec["abort"] is True and "promote" not in spec

    promoted = plugin(kube_cluster, "rollout", "promote", "--full", "promoted", *ns,
                      "-o", "json")
    assert promoted.returncode == 0, promoted.stderr
    assert json.loads(promoted.stdout)["patch"] == {"spec": {"promote": True, "abort": None}}
    spec = (cr(kube_cluster, "lockmigrations", "promoted", kube_namespace) or {})["spec"]
    assert spec["promote"] is True and "abort" not in spec
