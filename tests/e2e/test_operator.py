"""``enhanced-locking operator`` against a real API server: CR edits drive the running service.

The operator runs as a real process (``start_operator``) with the cluster's kubeconfig and its
own namespace; users' actions are ``kubectl`` commands; the service is observed through its
HTTP API (``GET /v1/config``, lock requests). Every wait polls with a deadline.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from tests.support.controlplane import KubeCluster
from tests.support.operator import OperatorProcess, apply, cr, ready_condition
from tests.support.redis_server import RedisServer
from tests.support.service import free_port, scrubbed_env
from tests.support.waiting import wait_for

from enhanced_locking.hashing import bucket_of, is_enhanced_bucket

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
POLICIES, MIGRATIONS = "lockpolicies", "lockmigrations"
StartOperator = Callable[..., OperatorProcess]


# --- helpers ---------------------------------------------------------------------------------


def policy(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "locking.runatlantis.io/v1alpha1", "kind": "LockPolicy",
            "metadata": {"name": "default"}, "spec": spec}


def migration(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "locking.runatlantis.io/v1alpha1", "kind": "LockMigration",
            "metadata": {"name": "to-enhanced"},
            "spec": {"policyRef": {"name": "default"}, **spec}}


def patch(cluster: KubeCluster, namespace: str, plural: str, name: str,
          spec: dict[str, Any]) -> int:
    """``kubectl patch`` a spec; the object's new metadata.generation."""
    out = cluster.kubectl("patch", f"{plural}.locking.runatlantis.io", name, "-n", namespace,
                          "--type=merge", "-p", json.dumps({"spec": spec}), "-o", "json")
    generation: int = json.loads(out.stdout)["metadata"]["generation"]
    return generation


def settled(cluster: KubeCluster, operator: OperatorProcess, plural: str, name: str,
            generation: int, *, ready: str = "True") -> dict[str, Any]:
    """Wait until the object's status reports ``generation`` with Ready=``ready``."""

    def check() -> dict[str, Any] | None:
        body = cr(cluster, plural, name, operator.namespace)
        status = (body or {}).get("status") or {}
        condition = ready_condition(body)
        if status.get("observedGeneration") == generation and condition.get("status") == ready:
            return body
        return None

    return wait_for(f"{plural}/{name} to report generation {generation} Ready={ready}", check,
                    details=operator.output)


def acquire(operator: OperatorProcess, key_path: str, pull: int) -> httpx.Response:
    body = {"project": {"repoFullName": "acme/infra", "path": key_path, "projectName": ""},
            "workspace": "default", "pull": {"num": pull}, "user": {"username": "alice"}}
    return httpx.post(operator.url + "/v1/locks", json=body, timeout=10)


def key_of(key_path: str) -> str:
    return f"acme/infra/{key_path}/default/"


def applied(operator: OperatorProcess, check: Callable[[dict[str, Any]], bool],
            what: str) -> dict[str, Any]:
    """Wait until ``GET /v1/config`` satisfies ``check``."""
    def current() -> dict[str, Any] | None:
        config = operator.config()
        return config if check(config) else None

    return wait_for(what, current, details=operator.output)


# --- the examples ----------------------------------------------------------------------------


def test_the_examples_applied_as_a_user_does_become_the_running_config(
    kube_cluster: KubeCluster, kube_namespace: str, start_operator: StartOperator,
    tmp_path: Path,
) -> None:
    operator = start_operator()
    assert operator.config()["layers"] == ["static"]

    # `kubectl apply -k examples/`, into this test's namespace instead of `atlantis`.
    examples = tmp_path / "examples"
    shutil.copytree(EXAMPLES, examples)
    kustomization = yaml.safe_load((examples / "kustomization.yaml").read_text())
    kustomization["namespace"] = kube_namespace
    (examples / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    kube_cluster.kubectl("apply", "-k", str(examples))

    config = applied(operator, lambda c: c["routing"]["weight"] == 25, "the examples applied")
    assert config["layers"] == ["static", "cluster"]
    assert config["routing"] == {"enabled": True, "weight": 25.0, "mode": "route",
                                 "fallback": "legacy", "configuredWeight": 25.0}
    assert config["featureFlags"] == {"enabled": True, "priorityQueue": True, "retries": True,
                                      "metrics": True, "deadlockDetection": True, "events": True}
    assert config["config"]["enhanced-locking-lock-ttl"] == "24h"
    assert config["config"]["enhanced-locking-max-timeout"] == "5m"

    settled(kube_cluster, operator, POLICIES, "default", 1)
    settled(kube_cluster, operator, MIGRATIONS, "to-enhanced", 1)
    policies = kube_cluster.kubectl("get", "lockpolicies", "-n", kube_namespace).stdout
    header, row = policies.splitlines()
    assert header.split() == ["NAME", "ENABLED", "BACKEND", "READY", "REASON", "AGE"]
    assert row.split()[:5] == ["default", "true", "boltdb", "True", "Applied"]
    wait_for("the weight in force on every replica", lambda: (cr(
        kube_cluster, MIGRATIONS, "to-enhanced", kube_namespace) or {}).get("status", {}).get(
        "phase") == "Completed", details=operator.output)
    migrations = kube_cluster.kubectl("get", "lockmigrations", "-n", kube_namespace).stdout
    header, row = migrations.splitlines()
    assert header.split() == ["NAME", "PHASE", "MODE", "WEIGHT", "STEP", "MISMATCHES",
                              "CONFLICTS", "READY", "AGE"]
    # No steps: the STEP cell is empty.
    assert row.split()[:7] == ["to-enhanced", "Completed", "route", "25", "0", "0", "True"]
    status = cr(kube_cluster, POLICIES, "default", kube_namespace)["status"]  # type: ignore[index]
    assert status["appliedConfigHash"] == operator.config()["hash"]
    assert status["appliedGeneration"] == operator.config()["generation"]

    events = json.loads(kube_cluster.kubectl(
        "get", "events", "-n", kube_namespace, "--field-selector", "reason=ConfigApplied",
        "-o", "json").stdout)["items"]
    assert {e["involvedObject"]["kind"] for e in events} >= {"LockPolicy"}

    liveness = httpx.get(operator.liveness_url, timeout=5)
    assert liveness.status_code == 200
    assert liveness.json()["configGeneration"] == operator.config()["generation"]


# --- edits -----------------------------------------------------------------------------------

# One field at a time, each away from the state set up below; one operator serves them all.
EDITS: list[tuple[str, dict[str, Any], Callable[[dict[str, Any]], bool]]] = [
    (POLICIES, {"features": {"priorityQueue": False}},
     lambda c: c["featureFlags"]["priorityQueue"] is False),
    (POLICIES, {"features": {"retries": False}},
     lambda c: c["featureFlags"]["retries"] is False),
    (POLICIES, {"features": {"metrics": False}},
     lambda c: c["featureFlags"]["metrics"] is False),
    (POLICIES, {"features": {"deadlockDetection": False}},
     lambda c: c["featureFlags"]["deadlockDetection"] is False),
    (POLICIES, {"features": {"events": False}},
     lambda c: c["featureFlags"]["events"] is False),
    (MIGRATIONS, {"weight": 62.5}, lambda c: c["routing"]["weight"] == 62.5),
    (MIGRATIONS, {"mode": "shadow"}, lambda c: c["routing"]["mode"] == "shadow"),
    (MIGRATIONS, {"fallback": "fail-closed"},
     lambda c: c["routing"]["fallback"] == "fail-closed"),
    (POLICIES, {"enabled": False},
     lambda c: c["routing"] == {"enabled": False, "weight": 0.0, "configuredWeight": 0.0,
                                "mode": "shadow", "fallback": "fail-closed"}),
    # Shadow mode: legacy decides every key, so the weight that routes is 0; the configured one
    # (the share replayed on enhanced) is reported beside it.
    (POLICIES, {"enabled": True},
     lambda c: c["routing"]["weight"] == 0.0 and c["routing"]["configuredWeight"] == 62.5),
]


def test_each_edit_is_applied_by_the_service_and_status_catches_up(
    kube_cluster: KubeCluster, kube_namespace: str, start_operator: StartOperator
) -> None:
    all_on = {"priorityQueue": True, "retries": True, "metrics": True,
              "deadlockDetection": True, "events": True}
    apply(kube_cluster, kube_namespace, policy(enabled=True, features=all_on),
          migration(weight=25, mode="route", fallback="legacy"))
    operator = start_operator()
    before = applied(operator, lambda c: c["routing"]["weight"] == 25, "the initial policy")

    for plural, spec, check in EDITS:
        assert not check(before), spec
        name = "default" if plural == POLICIES else "to-enhanced"
        generation = patch(kube_cluster, kube_namespace, plural, name, spec)
        after = applied(operator, check, f"the service to apply {plural} {spec}")
        assert after["generation"] > before["generation"]

        body = settled(kube_cluster, operator, plural, name, generation)
        current = operator.config()
        assert body["status"]["appliedGeneration"] == current["generation"]
        assert body["status"]["appliedConfigHash"] == current["hash"]
        assert ready_condition(body)["observedGeneration"] == generation
        before = current


def test_lock_requests_route_by_the_edited_weight(
    kube_cluster: KubeCluster, kube_namespace: str, start_operator: StartOperator
) -> None:
    apply(kube_cluster, kube_namespace, policy(enabled=True), migration(weight=0))
    operator = start_operator()
    applied(operator, lambda c: c["routing"] == {"enabled": True, "weight": 0.0,
                                                 "mode": "route", "fallback": "legacy",
                                                 "configuredWeight": 0.0},
            "weight 0")
    held: dict[str, str] = {}

    def take(prefix: str, count: int) -> dict[str, str]:
        sides = {}
        for i in range(count):
            answer = acquire(operator, f"{prefix}/{i}", pull=i + 1)
            assert answer.status_code == 200, answer.text
            lock = answer.json()["lock"]
            sides[lock["key"]] = lock["backend"]
        held.update(sides)
        return sides

    assert set(take("w0", 30).values()) == {"legacy"}

    patch(kube_cluster, kube_namespace, MIGRATIONS, "to-enhanced", {"weight": 100})
    applied(operator, lambda c: c["routing"]["weight"] == 100, "weight 100")
    assert set(take("w100", 30).values()) == {"enhanced"}

    patch(kube_cluster, kube_namespace, MIGRATIONS, "to-enhanced", {"weight": 50})
    applied(operator, lambda c: c["routing"]["weight"] == 50, "weight 50")
    sides = take("w50", 80)
    for key, side in sides.items():
        expected = "enhanced" if is_enhanced_bucket(bucket_of(key), 50) else "legacy"
        assert side == expected, key
    assert set(sides.values()) == {"legacy", "enhanced"}

    # Nothing held was lost or granted twice while the weight moved.
    listed = httpx.get(operator.url + "/v1/locks", timeout=10).json()["locks"]
    assert {lock["key"] for lock in listed} == set(held)
    for key_path in ("w0/0", "w100/0", "w50/0"):
        refused = acquire(operator, key_path, pull=999)
        assert refused.status_code == 409 and refused.json()["reason"] == "held"


# --- deletion and restarts -------------------------------------------------------------------


def test_deleting_the_crs_returns_the_service_to_its_static_config(
    kube_cluster: KubeCluster, kube_namespace: str, start_operator: StartOperator
) -> None:
    operator = start_operator()
    static = operator.config()
    apply(kube_cluster, kube_namespace, policy(enabled=True, features={"priorityQueue": True}),
          migration(weight=40))
    applied(operator, lambda c: c["routing"]["weight"] == 40, "the policy and migration")

    kube_cluster.kubectl("delete", "lockmigration", "to-enhanced", "-n", kube_namespace)
    alone = applied(operator, lambda c: c["routing"]["weight"] == 100, "the policy alone")
    assert alone["featureFlags"]["priorityQueue"] is True

    kube_cluster.kubectl("delete", "lockpolicy", "default", "-n", kube_namespace)
    back = applied(operator, lambda c: c["layers"] == ["static"], "the static config")
    assert back["hash"] == static["hash"] and back["config"] == static["config"]
    assert back["generation"] > alone["generation"]


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_restarted_operator_resumes_the_applied_config_and_keeps_every_held_lock(
    kube_cluster: KubeCluster, kube_namespace: str, start_operator: StartOperator, how: str
) -> None:
    apply(kube_cluster, kube_namespace, policy(enabled=True, features={"priorityQueue": True}),
          migration(weight=50))
    operator = start_operator()
    before = applied(operator, lambda c: c["routing"]["weight"] == 50, "weight 50")
    keys = {}
    for i in range(40):
        answer = acquire(operator, f"restart/{i}", pull=100 + i)
        assert answer.status_code == 200
        keys[answer.json()["lock"]["key"]] = (100 + i, answer.json()["lock"]["backend"])
    assert {side for _, side in keys.values()} == {"legacy", "enhanced"}

    operator.restart(kill=how == "kill")

    # The config is the cluster's from the very first answer: read before serving.
    first = operator.config()
    assert first["layers"] == ["static", "cluster"]
    assert first["hash"] == before["hash"]
    assert first["routing"] == before["routing"]
    listed = {lock["key"]: lock for lock in
              httpx.get(operator.url + "/v1/locks", timeout=10).json()["locks"]}
    assert {key: (lock["pull"]["num"], lock["backend"]) for key, lock in listed.items()} == keys
    for i in range(0, 40, 7):
        path = f"restart/{i}"
        assert acquire(operator, path, pull=999).status_code == 409
        assert acquire(operator, path, pull=100 + i).status_code == 200  # its holder again
    settled(kube_cluster, operator, POLICIES, "default", 1)


def _pull_12_holding_in_redis(cluster: KubeCluster, namespace: str,
                              start_operator: StartOperator, server: RedisServer,
                              key_path: str) -> OperatorProcess:
    """An operator applying a policy on ``server`` (enhanced locking on, weight 100), where
    pull #12 holds ``key_path`` in Redis."""
    apply(cluster, namespace, policy(enabled=True, backend="redis", redis={"addr": server.addr}),
          migration(weight=100))
    operator = start_operator()
    applied(operator, lambda c: c["config"]["enhanced-locking-backend"] == "redis", "redis")
    held = acquire(operator, key_path, pull=12)
    assert held.status_code == 200 and held.json()["lock"]["backend"] == "enhanced", held.text
    return operator


def _granting(cluster: KubeCluster, namespace: str) -> dict[str, Any] | None:
    """The default LockPolicy's Granting condition, if it has one."""
    body = cr(cluster, POLICIES, "default", namespace) or {}
    return next((c for c in (body.get("status") or {}).get("conditions") or []
                 if c["type"] == "Granting"), None)


def test_a_restarted_operator_grants_nothing_until_it_can_apply_its_policy(
    kube_cluster: KubeCluster, kube_namespace: str, start_operator: StartOperator,
    redis_servers: Callable[..., RedisServer],
) -> None:
    """The operator restarts while the Redis its policy names is stopped: the policy is
    refused, and the service opens on its own settings (enhanced locking off), under which
    legacy would grant pull #12's key, held in Redis, to another pull. It grants nothing until
    the policy is applied, the policy's status says why, and the policy is applied again soon
    after Redis answers. Before, pull #13 was granted the key on legacy."""
    server = redis_servers(persistence="aof")
    operator = _pull_12_holding_in_redis(kube_cluster, kube_namespace, start_operator, server,
                                         "window/a")

    operator.stop()
    server.stop()
    operator.start()
    assert operator.config()["layers"] == ["static"]
    refused = acquire(operator, "window/a", pull=13)
    assert refused.status_code == 503, refused.text
    assert refused.json()["reason"] == "unavailable"
    assert "has not applied its LockPolicy" in refused.json()["error"]
    assert httpx.get(operator.url + "/readyz", timeout=10).status_code == 503

    def granting() -> dict[str, Any] | None:
        return _granting(kube_cluster, kube_namespace)

    condition = wait_for("the Granting condition", granting, details=operator.output)
    assert (condition["status"], condition["reason"]) == ("False", "PolicyNotApplied")

    server.start()
    applied(operator, lambda c: c["layers"] == ["static", "cluster"], "the policy, again")
    again = acquire(operator, "window/a", pull=13)
    assert again.status_code == 409, again.text
    assert again.json()["holder"]["pull"]["num"] == 12
    wait_for("the Granting condition gone", lambda: granting() is None, details=operator.output)


def test_a_restarted_operator_serves_no_lock_call_until_it_can_apply_its_policy(
    kube_cluster: KubeCluster, kube_namespace: str, start_operator: StartOperator,
    redis_servers: Callable[..., RedisServer],
) -> None:
    """In the same window (the policy's Redis stopped, the service on its own settings), a
    release, a force-unlock or a read would be served from the service's own stores and under
    its own access settings, not the policy's: pull #12's release would answer that nothing
    is held while its lock stays in Redis, and a caller the policy's access settings refuse
    would be served. Each is answered 503 saying why, as an acquire is; only the settings in
    force (``GET /v1/config``) are shown. Once the policy is applied, pull #12 still holds its
    lock, and releases it."""
    server = redis_servers(persistence="aof")
    operator = _pull_12_holding_in_redis(kube_cluster, kube_namespace, start_operator, server,
                                         "window/b")
    key = key_of("window/b")

    operator.stop()
    server.stop()
    operator.start()
    assert operator.config()["layers"] == ["static"]
    calls: dict[str, Callable[[], httpx.Response]] = {
        "release": lambda: httpx.delete(operator.url + "/v1/locks/by-key",
                                        params={"key": key, "pull": 12}, timeout=10),
        "release by pull": lambda: httpx.delete(operator.url + "/v1/locks/by-pull",
                                                params={"repo": "acme/infra", "pull": 12},
                                                timeout=10),
        "force-unlock": lambda: httpx.post(operator.url + "/v1/admin/force-unlock",
                                           params={"key": key, "reason": "stuck"}, timeout=10),
        "list": lambda: httpx.get(operator.url + "/v1/locks", timeout=10),
        "get": lambda: httpx.get(operator.url + "/v1/locks/by-key", params={"key": key},
                                 timeout=10),
    }
    for name, call in calls.items():
        answer = call()
        assert answer.status_code == 503, (name, answer.text)
        assert answer.json()["reason"] == "unavailable", (name, answer.text)
        assert "has not applied its LockPolicy" in answer.json()["error"], (name, answer.text)

    server.start()
    applied(operator, lambda c: c["layers"] == ["static", "cluster"], "the policy, again")
    held = httpx.get(operator.url + "/v1/locks/by-key", params={"key": key}, timeout=10)
    assert held.status_code == 200, held.text
    assert held.json()["lock"]["pull"]["num"] == 12
    released = httpx.delete(operator.url + "/v1/locks/by-key", params={"key": key, "pull": 12},
                            timeout=10)
    assert released.status_code == 200, released.text
    assert acquire(operator, "window/b", pull=13).status_code == 200


def test_a_switched_off_store_that_does_not_answer_is_looked_at_again(
    kube_cluster: KubeCluster, kube_namespace: str, start_operator: StartOperator,
    redis_servers: Callable[..., RedisServer],
) -> None:
    """Enhanced locking is switched off while pull #12 holds a key in Redis, and the operator
    restarts with Redis stopped: the policy is applied, but the look for the locks left in
    Redis cannot be made, so nothing is granted meanwhile and the policy's Granting condition
    says why; once Redis answers, the look is made again and pull #12's hold is honoured."""
    server = redis_servers(persistence="aof")
    operator = _pull_12_holding_in_redis(kube_cluster, kube_namespace, start_operator, server,
                                         "unread/a")
    generation = patch(kube_cluster, kube_namespace, POLICIES, "default", {"enabled": False})
    settled(kube_cluster, operator, POLICIES, "default", generation)

    operator.stop()
    server.stop()
    operator.start()
    assert operator.config()["config"]["enhanced-locking-enabled"] is False
    refused = acquire(operator, "unread/a", pull=13)
    assert refused.status_code == 503, refused.text
    assert refused.json()["reason"] == "unavailable"

    def granting() -> dict[str, Any] | None:
        return _granting(kube_cluster, kube_namespace)

    condition = wait_for("the Granting condition", granting, details=operator.output)
    assert (condition["status"], condition["reason"]) == ("False", "EnhancedStoreUnread")
    assert server.addr in condition["message"]
    assert ready_condition(cr(kube_cluster, POLICIES, "default", kube_namespace))["status"] == (
        "True")

    server.start()
    wait_for("the locks left in Redis honoured", lambda: acquire(
        operator, "unread/a", pull=13).status_code == 409, details=operator.output)
    again = acquire(operator, "unread/a", pull=13)
    assert again.json()["holder"]["pull"]["num"] == 12
    wait_for("the Granting condition gone", lambda: granting() is None, details=operator.output)


# --- refusals --------------------------------------------------------------------------------


def test_a_policy_the_service_cannot_apply_leaves_the_last_good_config_running(
    kube_cluster: KubeCluster, kube_namespace: str, start_operator: StartOperator,
    free_port: Callable[[], int],
) -> None:
    apply(kube_cluster, kube_namespace, policy(enabled=True), migration(weight=100))
    operator = start_operator()
    good = applied(operator, lambda c: c["routing"]["weight"] == 100, "the good policy")
    assert acquire(operator, "refusal/before", pull=1).json()["lock"]["backend"] == "enhanced"

    silent = f"127.0.0.1:{free_port()}"  # nothing listens there
    generation = patch(kube_cluster, kube_namespace, POLICIES, "default",
                       {"backend": "redis", "redis": {"addr": silent}})
    body = settled(kube_cluster, operator, POLICIES, "default", generation, ready="False")
    condition = ready_condition(body)
    assert condition["reason"] == "ConfigRejected"
    assert silent in condition["message"]
    assert f"keeps running configuration generation {good['generation']}" in condition["message"]
    assert body["status"]["appliedConfigHash"] == good["hash"]

    still = operator.config()
    assert (still["generation"], still["hash"]) == (good["generation"], good["hash"])
    assert still["config"]["enhanced-locking-backend"] == "boltdb"
    answer = acquire(operator, "refusal/after", pull=2)
    assert answer.status_code == 200 and answer.json()["lock"]["backend"] == "enhanced"
    shown = kube_cluster.kubectl("get", "lockpolicy", "default", "-n", kube_namespace).stdout
    assert "ConfigRejected" in shown.splitlines()[1].split()

    warnings = json.loads(kube_cluster.kubectl(
        "get", "events", "-n", kube_namespace, "--field-selector",
        "type=Warning,reason=ConfigRejected", "-o", "json").stdout)["items"]
    assert [e["involvedObject"]["name"] for e in warnings] == ["default"]

    # Putting it right applies it again.
    generation = patch(kube_cluster, kube_namespace, POLICIES, "default", {"backend": "boltdb"})
    settled(kube_cluster, operator, POLICIES, "default", generation)


def test_access_settings_the_service_cannot_use_are_rejected_not_reported_applied(
    kube_cluster: KubeCluster, kube_namespace: str, start_operator: StartOperator,
    tmp_path: Path,
) -> None:
    """``access.mode: static`` whose tokens file cannot be read: the service keeps its access
    control, so the LockPolicy says ConfigRejected naming access.mode, and ``/v1/config``
    keeps showing the access in force."""
    missing = tmp_path / "tokens.csv"
    operator = start_operator(args=[f"--enhanced-locking-auth-tokens-file={missing}"])
    apply(kube_cluster, kube_namespace, policy(enabled=True))
    good = applied(operator, lambda c: c["layers"] == ["static", "cluster"], "the good policy")
    assert good["config"]["enhanced-locking-auth"] == "none"

    generation = patch(kube_cluster, kube_namespace, POLICIES, "default",
                       {"access": {"mode": "static"}})
    body = settled(kube_cluster, operator, POLICIES, "default", generation, ready="False")
    condition = ready_condition(body)
    assert condition["reason"] == "ConfigRejected"
    assert condition["message"].startswith("access.mode: "), condition["message"]
    assert "enhanced-locking-auth-tokens-file" in condition["message"]
    assert f"keeps running configuration generation {good['generation']}" in condition["message"]
    assert body["status"]["appliedConfigHash"] == good["hash"]
    still = operator.config()
    assert (still["generation"], still["hash"]) == (good["generation"], good["hash"])
    assert still["config"]["enhanced-locking-auth"] == "none"
    # The access in force is the one shown: a call without a token is served.
    assert acquire(operator, "access/after", pull=1).status_code == 200
    warnings = json.loads(kube_cluster.kubectl(
        "get", "events", "-n", kube_namespace, "--field-selector",
        "type=Warning,reason=ConfigRejected", "-o", "json").stdout)["items"]
    assert [e["involvedObject"]["name"] for e in warnings] == ["default"]

    # A readable tokens file makes the same spec usable: applied on the next edit.
    missing.write_text("t-1,alice\n")
    generation = patch(kube_cluster, kube_namespace, POLICIES, "default",
                       {"access": {"mode": "static", "roles": [
                           {"role": "locker", "subjects": ["user:alice"]}]}})
    settled(kube_cluster, operator, POLICIES, "default", generation)
    assert httpx.get(operator.url + "/v1/config", timeout=5).status_code == 401
    shown = httpx.get(operator.url + "/v1/config", timeout=5,
                      headers={"Authorization": "Bearer t-1"}).json()
    assert shown["config"]["enhanced-locking-auth"] == "static"


def test_the_redis_password_is_read_from_its_secret_and_shown_nowhere(
    kube_cluster: KubeCluster, kube_namespace: str, start_operator: StartOperator,
    redis_server: RedisServer,
) -> None:
    password = f"pw-{secrets.token_hex(12)}"
    redis_server.set_requirepass(password)
    redis_policy = policy(enabled=True, backend="redis", redis={
        "addr": redis_server.addr,
        "passwordSecretRef": {"name": "redis-auth", "key": "password"},
    })
    apply(kube_cluster, kube_namespace, redis_policy)
    operator = start_operator(resync_interval=1)  # Secrets are re-read on each resync
    body = settled(kube_cluster, operator, POLICIES, "default", 1, ready="False")
    assert ready_condition(body)["reason"] == "SecretNotFound"
    assert operator.config()["layers"] == ["static"]

    kube_cluster.kubectl("create", "secret", "generic", "redis-auth", "-n", kube_namespace,
                         "--from-literal=wrong=nothing")
    wait_for("SecretKeyNotFound", lambda: ready_condition(
        cr(kube_cluster, POLICIES, "default", kube_namespace)
    ).get("reason") == "SecretKeyNotFound", details=operator.output)

    kube_cluster.kubectl("delete", "secret", "redis-auth", "-n", kube_namespace)
    kube_cluster.kubectl("create", "secret", "generic", "redis-auth", "-n", kube_namespace,
                         f"--from-literal=password={password}")
    config = applied(operator, lambda c: c["config"]["enhanced-locking-backend"] == "redis",
                     "the redis policy (resync picks up the Secret)")
    assert config["config"]["enhanced-locking-redis-password"] == "********"
    settled(kube_cluster, operator, POLICIES, "default", 1)
    answer = acquire(operator, "secret/a", pull=1)
    assert answer.status_code == 200 and answer.json()["lock"]["backend"] == "enhanced"
    assert redis_server.client().dbsize() > 0  # the lock is in that Redis

    seen = "\n".join([
        kube_cluster.kubectl("get", "lockpolicy", "default", "-n", kube_namespace,
                             "-o", "yaml").stdout,
        kube_cluster.kubectl("get", "events", "-n", kube_namespace, "-o", "yaml").stdout,
        json.dumps(operator.config()),
        httpx.get(operator.url + "/metrics", timeout=10).text,
        operator.log_text(),
    ])
    assert password not in seen


def test_a_port_in_use_stops_it_before_kopf_starts(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        operator = OperatorProcess(tmp_path / "data", kubeconfig=kube_cluster.kubeconfig,
                                   namespace=kube_namespace, log_dir=tmp_path / "logs",
                                   port=taken.getsockname()[1])
        result = subprocess.run(operator.argv, capture_output=True, text=True, timeout=60,
                                env=scrubbed_env({"KUBECONFIG": str(kube_cluster.kubeconfig)}))
    assert result.returncode == 2  # the user's setting; 3 means "could not reach the service"
    assert "address already in use" in result.stderr and "--port" in result.stderr
    assert "Traceback" not in result.stderr
    assert "kopf" not in result.stderr  # it never started


def test_a_port_in_use_leaves_no_status_or_event_behind(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None, tmp_path: Path
) -> None:
    """Status must never claim what no live process serves: the port is bound first."""
    apply(kube_cluster, kube_namespace, policy(enabled=True, backend="memory"),
          migration(weight=25))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        operator = OperatorProcess(tmp_path / "data", kubeconfig=kube_cluster.kubeconfig,
                                   namespace=kube_namespace, log_dir=tmp_path / "logs",
                                   port=taken.getsockname()[1])
        result = subprocess.run(operator.argv, capture_output=True, text=True, timeout=60,
                                env=scrubbed_env({"KUBECONFIG": str(kube_cluster.kubeconfig)}))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("address already in use")
    for plural, name in ((POLICIES, "default"), (MIGRATIONS, "to-enhanced")):
        assert "status" not in (cr(kube_cluster, plural, name, kube_namespace) or {})
    events = json.loads(kube_cluster.kubectl("get", "events", "-n", kube_namespace,
                                             "-o", "json").stdout)["items"]
    assert [e["reason"] for e in events] == []


def test_the_status_names_the_serving_replica_and_when_it_was_last_seen(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None,
    start_operator: StartOperator,
) -> None:
    apply(kube_cluster, kube_namespace, policy(enabled=True, backend="memory"))
    operator = start_operator(resync_interval=1)
    first = settled(kube_cluster, operator, POLICIES, "default", 1)["status"]
    replica = httpx.get(operator.url + "/v1/migration", timeout=10).json()["replicaId"]
    assert first["statusWriter"] == replica
    seen = first["lastSeenAt"]

    def renewed() -> str | None:
        status = (cr(kube_cluster, POLICIES, "default", kube_namespace) or {})["status"]
        return status["lastSeenAt"] if status["lastSeenAt"] > seen else None

    wait_for("lastSeenAt renewed by a resync", renewed, timeout=30)


def test_a_stopped_operator_leaves_ready_unknown_and_a_started_one_sets_it_again(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None,
    start_operator: StartOperator,
) -> None:
    apply(kube_cluster, kube_namespace, policy(enabled=True, backend="memory"),
          migration(weight=30))
    operator = start_operator()
    settled(kube_cluster, operator, MIGRATIONS, "to-enhanced", 1)
    assert operator.stop() == 0

    # Nobody serves the objects now: their status does not say Ready.
    for plural, name in ((POLICIES, "default"), (MIGRATIONS, "to-enhanced")):
        body = cr(kube_cluster, plural, name, kube_namespace)
        ready = ready_condition(body)
        assert (ready["status"], ready["reason"]) == ("Unknown", "OperatorStopped"), body
    shown = kube_cluster.kubectl("get", "lockmig", "to-enhanced", "-n", kube_namespace).stdout
    assert "Unknown" in shown

    operator.start(deadline=60)
    settled(kube_cluster, operator, POLICIES, "default", 1)
    settled(kube_cluster, operator, MIGRATIONS, "to-enhanced", 1)


def test_a_liveness_endpoint_on_the_api_port_is_refused_naming_both_flags(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None, tmp_path: Path
) -> None:
    """kopf's liveness endpoint and the lock API cannot share a port (one of the two would not
    bind): the operator refuses the pair as invalid usage, naming both flags, before it
    starts anything."""
    apply(kube_cluster, kube_namespace, policy(enabled=True, backend="memory"),
          migration(weight=25))
    port = free_port()
    operator = OperatorProcess(tmp_path / "data", kubeconfig=kube_cluster.kubeconfig,
                               namespace=kube_namespace, log_dir=tmp_path / "logs", port=port)
    operator.liveness_port = port
    result = subprocess.run(operator.argv, capture_output=True, text=True, timeout=90,
                            env=scrubbed_env({"KUBECONFIG": str(kube_cluster.kubeconfig)}))
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "--liveness" in last and f"--port {operator.port}" in last, result.stderr
    assert "Traceback" not in result.stderr
    for plural, name in ((POLICIES, "default"), (MIGRATIONS, "to-enhanced")):
        assert "status" not in (cr(kube_cluster, plural, name, kube_namespace) or {})
