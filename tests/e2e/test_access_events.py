"""As the operator, the service also posts administrative actions of its audit trail as
Kubernetes Events on the bound LockPolicy (who, what, why), with no token in them."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from tests.support.access_matrix import acquire_body
from tests.support.controlplane import KubeCluster
from tests.support.operator import OperatorProcess
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


def events(cluster: KubeCluster, namespace: str, reason: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    return [e for e in json.loads(out)["items"] if e.get("reason") == reason]


def test_a_force_unlock_is_an_event_on_the_lockpolicy_naming_who_and_why(
    kube_cluster: KubeCluster, kube_namespace: str,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps({
        "apiVersion": "locking.runatlantis.io/v1alpha1", "kind": "LockPolicy",
        "metadata": {"name": "default"}, "spec": {"enabled": True}}))
    operator = start_operator()
    with httpx.Client(base_url=operator.url, timeout=10) as http:
        key = http.post("/v1/locks", json=acquire_body("acme/events", pull=4)).json()["lockKey"]
        done = http.post("/v1/admin/force-unlock",
                         params={"key": key, "reason": "stuck apply OPS-7"})
        assert done.status_code == 200
        http.post("/v1/locks", json=acquire_body("acme/events", pull=5))  # not an admin action
    (event,) = wait_for("the ForceUnlock event",
                        lambda: events(kube_cluster, kube_namespace, "ForceUnlock"))
    assert event["involvedObject"]["kind"] == "LockPolicy"
    assert event["involvedObject"]["name"] == "default"
    assert event["type"] == "Normal"
    assert event["message"] == (f"anonymous did force-unlock of {key} (pull #4 of acme/events),"
                                " outcome released: stuck apply OPS-7")


@pytest.mark.parametrize(("access", "field"), [
    ({"roles": [{"role": "owner", "subjects": ["user:x"]}]}, "spec.access.roles[0].role"),
    ({"roles": [{"role": "admin", "subjects": ["robot:x"]}]}, "spec.access.roles[0].subjects[0]"),
    ({"mode": "open"}, "spec.access.mode"),
])
def test_the_api_server_refuses_a_bad_access_spec_naming_the_field(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None,
    access: dict[str, Any], field: str,
) -> None:
    done = kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", check=False,
                                input=json.dumps({
                                    "apiVersion": "locking.runatlantis.io/v1alpha1",
                                    "kind": "LockPolicy", "metadata": {"name": "bad"},
                                    "spec": {"access": access}}))
    assert done.returncode != 0
    assert field in done.stderr
