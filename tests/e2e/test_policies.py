"""Policy rules through the real API server: kubectl patch a rule on and off, the service obeys.

The operator runs as a real process against the control plane. A freeze patched on refuses a
request with its message (and shows in the LockPolicy's status, with an Event); patched off,
the waiter it held back is granted. A concurrency limit of 2 holds 5 waiters to 2 at a time.
Two replicas on one real Redis both take a rule edit: both refuse while a freeze is on, the
held locks and the queued request stay through the edits, and patched off, the waiter the
freeze held back is granted. Two replicas the LockPolicy moves from their own stores to one
Redis share their events from then on. The API server refuses bad rules naming the field, and
accepts the examples of docs/08-policies.md.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import ValidationError
from tests.support.controlplane import KubeCluster
from tests.support.operator import OperatorProcess, cr
from tests.support.redis_server import RedisServer
from tests.support.sse_frames import Frame, Frames
from tests.support.waiting import wait_for

from enhanced_locking.kube.lockpolicy import LockPolicySpec

pytestmark = pytest.mark.e2e

GROUP = "locking.runatlantis.io"
PAGE = Path(__file__).resolve().parents[2] / "docs" / "08-policies.md"
FREEZE = {"name": "release-week", "match": {"pathPrefix": "envs/prod"},
          "message": "prod is frozen for the release; ask #platform", "action": "wait"}


def _apply(cluster: KubeCluster, namespace: str, spec: dict[str, Any]) -> None:
    body = {"apiVersion": f"{GROUP}/v1alpha1", "kind": "LockPolicy",
            "metadata": {"name": "default", "namespace": namespace}, "spec": spec}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(body))


def _patch(cluster: KubeCluster, namespace: str, spec: dict[str, Any]) -> None:
    cluster.kubectl("patch", f"lockpolicies.{GROUP}", "default", "-n", namespace,
                    "--type=merge", "-p", json.dumps({"spec": spec}))


def _rules(operator: OperatorProcess, wanted: dict[str, Any], what: str) -> None:
    """Wait until the service runs ``wanted`` (defaults left out, as the config shows them)."""
    def check() -> bool:
        running = operator.config()["config"].get("enhanced-locking-policies") or {}
        return all(len(running.get(kind) or []) == len(rules)
                   and all(running[kind][i]["name"] == rule["name"]
                           and running[kind][i].get("action", "refuse")
                           == rule.get("action", "refuse") for i, rule in enumerate(rules))
                   for kind, rules in wanted.items())
    wait_for(what, check, details=operator.output)


def _body(path: str, pull: int, wait: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "project": {"repoFullName": "acme/infra", "path": path, "projectName": ""},
        "workspace": "default", "pull": {"num": pull}, "user": {"username": "alice"}}
    if wait:
        body["wait"] = wait
    return body


def _waiting(operator: OperatorProcess, body: dict[str, Any],
             answers: list[httpx.Response]) -> threading.Thread:
    def run() -> None:
        answers.append(httpx.post(operator.url + "/v1/locks", json=body, timeout=60))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_freeze_patched_on_refuses_and_patched_off_grants_the_waiter(
    kube_cluster: KubeCluster, kube_namespace: str, start_operator: Any,
) -> None:
    _apply(kube_cluster, kube_namespace, {"enabled": True, "backend": "memory"})
    operator: OperatorProcess = start_operator()
    _patch(kube_cluster, kube_namespace, {"freezes": [{**FREEZE, "action": "refuse"}]})
    _rules(operator, {"freezes": [{**FREEZE, "action": "refuse"}]}, "the freeze")

    refused = httpx.post(operator.url + "/v1/locks", json=_body("envs/prod", 1), timeout=10)
    assert refused.status_code == 409
    assert refused.json()["reason"] == "frozen"
    assert refused.json()["error"] == FREEZE["message"]
    allowed = httpx.post(operator.url + "/v1/locks", json=_body("envs/dev", 1), timeout=10)
    assert allowed.status_code == 200

    def frozen_status() -> Any:
        body = cr(kube_cluster, "lockpolicies", "default", kube_namespace) or {}
        return [f["name"] for f in (body.get("status") or {}).get("activeFreezes") or []]
    assert wait_for("activeFreezes", frozen_status) == ["release-week"]
    events = kube_cluster.kubectl("get", "events", "-n", kube_namespace, "-o", "json").stdout
    assert "FreezeStarted" in events

    # A freeze that makes requests wait: the waiter is granted once the freeze is patched off.
    _patch(kube_cluster, kube_namespace, {"freezes": [FREEZE]})
    _rules(operator, {"freezes": [FREEZE]}, "the waiting freeze")
    answers: list[httpx.Response] = []
    thread = _waiting(operator, _body("envs/prod", 2, wait="60s"), answers)
    wait_for("the waiter to queue", lambda: httpx.get(
        operator.url + "/v1/queue", params={"key": "acme/infra/envs/prod/default/"},
        timeout=5).json()["waiters"])
    assert not answers
    _patch(kube_cluster, kube_namespace, {"freezes": None})
    _rules(operator, {"freezes": []}, "the freeze lifted")
    thread.join(30)
    assert answers and answers[0].status_code == 200, answers
    assert answers[0].json()["lock"]["pull"]["num"] == 2
    assert wait_for("FreezeEnded", lambda: "FreezeEnded" in kube_cluster.kubectl(
        "get", "events", "-n", kube_namespace, "-o", "json").stdout)


def test_a_concurrency_limit_of_two_holds_five_waiters_to_two_at_a_time(
    kube_cluster: KubeCluster, kube_namespace: str, start_operator: Any,
) -> None:
    limit = {"name": "prod", "match": {"pathPrefix": "envs"}, "limit": 2}
    _apply(kube_cluster, kube_namespace, {"enabled": True, "backend": "memory",
                                          "concurrency": [limit]})
    operator: OperatorProcess = start_operator()
    _rules(operator, {"concurrency": [limit]}, "the limit")
    answers: list[httpx.Response] = []
    threads = [_waiting(operator, _body(f"envs/p{n}", n, wait="60s"), answers)
               for n in range(1, 6)]

    def held() -> list[dict[str, Any]]:
        locks: list[dict[str, Any]] = httpx.get(operator.url + "/v1/locks", timeout=5).json()[
            "locks"]
        return locks
    wait_for("two holders", lambda: len(held()) == 2 and len(answers) == 2)
    groups = httpx.get(operator.url + "/v1/groups", timeout=5).json()["groups"]
    assert groups[0]["group"] == "prod" and len(groups[0]["holders"]) == 2
    for _ in range(3):
        first = held()[0]
        httpx.delete(operator.url + "/v1/locks/by-key", params={"key": first["key"]}, timeout=5)
        wait_for("the next waiter", lambda: len(held()) == 2)
        assert len(held()) <= 2
    for thread in threads:
        thread.join(30)
    assert sorted(a.status_code for a in answers) == [200] * 5


def test_two_replicas_on_one_redis_both_take_a_freeze_and_keep_held_locks_and_waiters(
    kube_cluster: KubeCluster, kube_namespace: str, start_operator: Any,
    redis_server: RedisServer,
) -> None:
    _apply(kube_cluster, kube_namespace, {"enabled": True, "backend": "redis",
                                          "redis": {"addr": redis_server.addr}})
    first: OperatorProcess = start_operator(data="replica-a")
    second: OperatorProcess = start_operator(data="replica-b")
    prod, dev = "acme/infra/envs/prod/default/", "acme/infra/envs/dev/default/"

    def holder(replica: OperatorProcess, key: str) -> Any:
        answer = httpx.get(replica.url + "/v1/locks/by-key", params={"key": key}, timeout=5)
        return answer.json().get("lock") if answer.status_code == 200 else None

    def waiters(replica: OperatorProcess) -> list[int]:
        queue = httpx.get(replica.url + "/v1/queue", params={"key": prod}, timeout=5).json()
        return [w["pull"] for w in queue["waiters"]]

    held = httpx.post(first.url + "/v1/locks", json=_body("envs/prod", 1), timeout=10).json()
    kept = httpx.post(second.url + "/v1/locks", json=_body("envs/dev", 5), timeout=10).json()
    answers: list[httpx.Response] = []
    thread = _waiting(second, _body("envs/prod", 2, wait="90s"), answers)
    wait_for("the waiter to queue", lambda: waiters(first) == [2])

    freeze = {**FREEZE, "action": "refuse"}
    _patch(kube_cluster, kube_namespace, {"freezes": [freeze]})
    for replica in (first, second):
        _rules(replica, {"freezes": [freeze]}, "the freeze on both replicas")
    for n, replica in enumerate((first, second)):
        refused = httpx.post(replica.url + "/v1/locks", json=_body("envs/prod/eu", 10 + n),
                             timeout=10)
        assert refused.status_code == 409, refused.text
        assert refused.json()["reason"] == "frozen"
        assert refused.json()["error"] == FREEZE["message"]
    for replica in (first, second):  # the edit dropped nothing
        assert holder(replica, prod)["fencingToken"] == held["lock"]["fencingToken"]
        assert holder(replica, dev)["fencingToken"] == kept["lock"]["fencingToken"]
        assert waiters(replica) == [2]
    # Released during the freeze, the key stays free: the queued request waits it out.
    released = httpx.delete(first.url + "/v1/locks/by-key", params={"key": prod, "pull": 1},
                            timeout=10)
    assert released.status_code == 200, released.text
    thread.join(2)
    assert not answers and waiters(second) == [2] and holder(second, prod) is None

    _patch(kube_cluster, kube_namespace, {"freezes": None})
    for replica in (first, second):
        _rules(replica, {"freezes": []}, "the freeze lifted on both replicas")
    thread.join(30)
    assert answers and answers[0].status_code == 200, answers
    granted = answers[0].json()["lock"]
    assert granted["pull"]["num"] == 2
    assert granted["fencingToken"] > held["lock"]["fencingToken"]
    for replica in (first, second):
        assert holder(replica, prod)["pull"]["num"] == 2
        assert holder(replica, dev)["fencingToken"] == kept["lock"]["fencingToken"]
        assert waiters(replica) == []


def _events_into(url: str, frames: list[Frame | str]) -> None:
    """Follow ``url``'s ``GET /v1/events`` in a thread: each frame, and each comment's text
    (``following`` for the stream's start), into ``frames`` (until the stream ends)."""
    def run() -> None:
        # The stream is cut when the replica stops, after the test.
        with contextlib.suppress(httpx.HTTPError), httpx.stream(
                "GET", url + "/v1/events", timeout=httpx.Timeout(10, read=None)) as answer:
            reader = Frames()
            for line in answer.iter_lines():
                if (item := reader.feed(line)) is not None:
                    frames.append(item)
    threading.Thread(target=run, daemon=True).start()


def test_two_replicas_moved_to_one_redis_by_the_lock_policy_share_their_events(
    kube_cluster: KubeCluster, kube_namespace: str, start_operator: Any,
    redis_server: RedisServer,
) -> None:
    """The LockPolicy moves the store of two replicas from their own memory to one Redis: the
    events move with it. A reader on one replica gets a gap (switched) at the move, then the
    other replica's grant. Before, each replica kept the bus it started with (its own), and
    the reader never saw the other's grant, nor a gap."""
    _apply(kube_cluster, kube_namespace, {"enabled": True, "backend": "memory"})
    first: OperatorProcess = start_operator(data="replica-a")
    second: OperatorProcess = start_operator(data="replica-b")

    def on(bus: str, replica: OperatorProcess) -> None:
        wait_for(f"the events of {replica.url} on the {bus} bus", lambda: httpx.get(
            replica.url + "/readyz", timeout=5).json().get("events") == bus,
            details=replica.output)

    for replica in (first, second):
        on("process", replica)
    frames: list[Frame | str] = []
    _events_into(first.url, frames)
    wait_for("the reader to follow", lambda: "following" in frames)

    _patch(kube_cluster, kube_namespace, {"backend": "redis",
                                          "redis": {"addr": redis_server.addr}})
    for replica in (first, second):
        on("redis", replica)
    gap = wait_for("the reader's gap", lambda: next(
        (f for f in frames if isinstance(f, Frame) and f.event == "gap"), None),
        details=first.output)
    assert gap.data["reason"] == "switched", gap

    taken = httpx.post(second.url + "/v1/locks", json=_body("envs/events", 7), timeout=10)
    assert taken.status_code == 200, taken.text
    key = taken.json()["lock"]["key"]
    seen = wait_for("the other replica's grant on this reader", lambda: next(
        (f for f in frames if isinstance(f, Frame) and f.event == "acquired"
         and f.data.get("key") == key), None), details=first.output)
    assert frames.index(seen) > frames.index(gap)


BAD_RULES = [
    pytest.param({"freezes": [{"name": "f", "match": {}, "message": "m"}]},
                 ["spec.freezes[0].match", "a pattern needs at least one of"], id="empty-pattern"),
    pytest.param({"concurrency": [{"name": "c", "limit": 0}]},
                 ["spec.concurrency[0].limit", "greater than or equal to 1"], id="limit-0"),
    pytest.param({"freezes": [{"name": "f", "match": {"repo": "a/*"}, "message": "m",
                               "from": "2026-12-08T00:00:00Z",
                               "until": "2026-12-01T00:00:00Z"}]},
                 ["spec.freezes[0].until", "until must be after from"], id="until-before-from"),
    pytest.param({"freezes": [{"name": "f", "match": {"repo": "a/*"}, "message": "m",
                               "from": "0000-01-01T00:00:00Z"}]},
                 ["spec.freezes[0].from", "the year must be 0001 or later"], id="year-0000"),
    pytest.param({"freezes": [{"name": "f", "match": {"repo": "a/*"}, "message": "m",
                               "until": "9999-12-31T23:30:00-01:00"}]},
                 ["spec.freezes[0].until", "the year must be 9999 or earlier"],
                 id="year-10000-in-utc"),
    pytest.param({"priorityRules": [{"name": "p", "commands": ["deploy"], "priority": "high"}]},
                 ['spec.priorityRules[0].commands[0]: Unsupported value: "deploy"'],
                 id="unknown-command"),
    pytest.param({"priorityRules": [
        {"name": "a", "commands": ["apply"], "priority": "high"},
        {"name": "b", "commands": ["apply", "plan"], "priority": "low"}]},
        ["spec.priorityRules", "which wins would depend on their order"], id="ambiguous"),
    # The same path written two ways (the service cleans a pathPrefix as a project's path):
    # the API server compared them as written and took what the operator then refused.
    pytest.param({"priorityRules": [
        {"name": "a", "match": {"pathPrefix": "envs/prod"}, "commands": ["apply"],
         "priority": "critical"},
        {"name": "b", "match": {"pathPrefix": "./envs//prod/"}, "commands": ["apply"],
         "priority": "high"}]},
        ["spec.priorityRules", "which wins would depend on their order"],
        id="ambiguous-path-written-apart"),
    pytest.param({"priorityRules": [
        {"name": "a", "match": {"repo": "acme/*", "pathPrefix": "."}, "priority": "high"},
        {"name": "b", "match": {"repo": "acme/*", "pathPrefix": "/"}, "priority": "low"}]},
        ["spec.priorityRules", "which wins would depend on their order"],
        id="ambiguous-root-written-apart"),
]

DISTINCT_PATHS = [("envs/prod", "envs/prod/eu"), ("envs/prod", "envs/production"),
                  ("/envs/prod", "envs/prod"), (".", "envs")]
"""Pairs of ``pathPrefix`` that cover different projects: two rules of different priorities
on them are not ambiguous."""


@pytest.mark.parametrize(("spec", "expected"), BAD_RULES)
def test_bad_rules_are_refused_naming_the_field(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None,
    spec: dict[str, Any], expected: list[str],
) -> None:
    with pytest.raises(ValidationError):  # the service refuses them too
        LockPolicySpec.model_validate(spec)
    body = {"apiVersion": f"{GROUP}/v1alpha1", "kind": "LockPolicy",
            "metadata": {"name": "refused", "namespace": kube_namespace}, "spec": spec}
    result = kube_cluster.kubectl("apply", "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0, result.stdout
    for text in expected:
        assert text in result.stderr


@pytest.mark.parametrize(("first", "second"), DISTINCT_PATHS)
def test_priority_rules_on_different_paths_are_accepted(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None, first: str, second: str,
) -> None:
    spec = {"priorityRules": [
        {"name": "a", "match": {"pathPrefix": first}, "commands": ["apply"], "priority": "high"},
        {"name": "b", "match": {"pathPrefix": second}, "commands": ["apply"], "priority": "low"}]}
    LockPolicySpec.model_validate(spec)  # the service takes them too
    body = {"apiVersion": f"{GROUP}/v1alpha1", "kind": "LockPolicy",
            "metadata": {"name": "distinct", "namespace": kube_namespace}, "spec": spec}
    result = kube_cluster.kubectl("apply", "--dry-run=server", "-f", "-",
                                  input=json.dumps(body))
    assert "(server dry run)" in result.stdout


def test_the_examples_of_the_policies_page_are_accepted(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None,
) -> None:
    examples = [doc for text in re.findall(r"```yaml\n(.*?)```", PAGE.read_text(), re.S)
                if (doc := yaml.safe_load(text)).get("kind") == "LockPolicy"]
    assert len(examples) >= 3
    for example in examples:
        example["metadata"]["namespace"] = kube_namespace
        result = kube_cluster.kubectl("apply", "--dry-run=server", "-f", "-",
                                      input=json.dumps(example))
        assert "(server dry run)" in result.stdout
