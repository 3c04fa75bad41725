"""Every guarded call of the v1 API, the rights it needs, and how to check a refusal changed
nothing. Shared by the static-token tests and the Kubernetes (TokenReview/SubjectAccessReview)
tests, so both walk the same endpoint x role matrix.

Each case gets a repository of its own in which an admin holds one lock (``key``, pull 7);
the call is made against that lock. A refused call must leave it exactly as it was (same pull,
fencing token and expiry).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = [
    "CALLS",
    "PUBLIC_PATHS",
    "ROLE_VERBS",
    "Call",
    "Case",
    "acquire_body",
    "held",
    "new_case",
]

ROLE_VERBS: Mapping[str, frozenset[str]] = {
    "nobody": frozenset(),
    "viewer": frozenset({"read"}),
    "locker": frozenset({"read", "lock"}),
    "admin": frozenset({"read", "lock", "prioritize", "release-any", "force-unlock", "admin"}),
}
"""The rights of each role (the static role map's and the chart's ClusterRoles')."""

PUBLIC_PATHS = ("/healthz", "/readyz", "/serving", "/metrics")


def held(admin: httpx.Client, key: str) -> dict[str, Any] | None:
    """The lock on ``key`` as ``admin`` reads it, or None when nobody holds it."""
    answer = admin.get("/v1/locks/by-key", params={"key": key})
    return answer.json()["lock"] if answer.status_code == 200 else None


def acquire_body(repo: str, *, pull: int, path: str = "envs/prod",
                 **extra: Any) -> dict[str, Any]:
    return {
        "project": {"repoFullName": repo, "path": path, "projectName": "p"},
        "workspace": "default",
        "pull": {"num": pull, "author": "alice"},
        "user": {"username": "alice"},
        **extra,
    }


@dataclass(frozen=True)
class Case:
    repo: str
    key: str


def new_case(admin: httpx.Client) -> Case:
    """A repository of its own with a lock held by pull 7 (taken by ``admin``)."""
    repo = f"acme/matrix-{uuid.uuid4().hex[:10]}"
    answer = admin.post("/v1/locks", json=acquire_body(repo, pull=7, ttl="1h"))
    assert answer.status_code == 200, answer.text
    return Case(repo=repo, key=answer.json()["lockKey"])


Runner = Callable[[httpx.Client, Case], httpx.Response]


def _events(http: httpx.Client, case: Case) -> httpx.Response:
    with http.stream("GET", "/v1/events", params={"repo": case.repo}) as answer:
        if answer.status_code != 200:
            answer.read()
        return answer  # when it streams, headers only: the stream itself never ends


@dataclass(frozen=True)
class Call:
    name: str
    verbs: frozenset[str]
    run: Runner
    mutates: bool = True


def _call(name: str, verbs: set[str], run: Runner, *, mutates: bool = True) -> Call:
    return Call(name, frozenset(verbs), run, mutates)


CALLS: list[Call] = [
    _call("list", {"read"}, lambda h, c: h.get("/v1/locks", params={"repo": c.repo}),
          mutates=False),
    _call("get", {"read"}, lambda h, c: h.get("/v1/locks/by-key", params={"key": c.key}),
          mutates=False),
    _call("queue", {"read"}, lambda h, c: h.get("/v1/queue", params={"key": c.key}),
          mutates=False),
    _call("config", {"read"}, lambda h, c: h.get("/v1/config"), mutates=False),
    _call("migration", {"read"}, lambda h, c: h.get("/v1/migration"), mutates=False),
    _call("events", {"read"}, _events, mutates=False),
    _call("audit", {"admin"}, lambda h, c: h.get("/v1/audit", params={"limit": 1}),
          mutates=False),
    _call("acquire", {"lock"},
          lambda h, c: h.post("/v1/locks", json=acquire_body(c.repo, pull=8, path="other"))),
    _call("acquire-critical", {"lock", "prioritize"},
          lambda h, c: h.post("/v1/locks", json=acquire_body(c.repo, pull=8, path="other",
                                                             priority="critical"))),
    _call("acquire-batch", {"lock"},
          lambda h, c: h.post("/v1/locks/batch", json={
              "locks": [{"project": {"repoFullName": c.repo, "path": "b1"}},
                        {"project": {"repoFullName": c.repo, "path": "b2"}}],
              "pull": {"num": 8}})),
    _call("release-own", {"lock"},
          lambda h, c: h.delete("/v1/locks/by-key", params={"key": c.key, "pull": 7})),
    _call("release-any", {"release-any"},
          lambda h, c: h.delete("/v1/locks/by-key", params={"key": c.key})),
    _call("release-pull", {"lock"},
          lambda h, c: h.delete("/v1/locks/by-pull", params={"repo": c.repo, "pull": 7})),
    _call("release-batch-own", {"lock"},
          lambda h, c: h.delete("/v1/locks/batch", params={"key": [c.key], "pull": 7})),
    _call("release-batch-any", {"release-any"},
          lambda h, c: h.delete("/v1/locks/batch", params={"key": [c.key]})),
    _call("refresh", {"lock"},
          lambda h, c: h.post("/v1/locks/refresh", json={"key": c.key, "pull": 7,
                                                         "ttl": "1ms"})),
    _call("cancel-own", {"lock"},
          lambda h, c: h.delete("/v1/queue", params={"key": c.key, "id": "w-1", "pull": 7})),
    _call("cancel-any", {"release-any"},
          lambda h, c: h.delete("/v1/queue", params={"key": c.key, "id": "w-1"})),
    _call("force-unlock", {"force-unlock"},
          lambda h, c: h.post("/v1/admin/force-unlock",
                              params={"key": c.key, "reason": "matrix test"})),
    _call("groups", {"read"}, lambda h, c: h.get("/v1/groups"), mutates=False),
    _call("queue-waiter", {"read"},
          lambda h, c: h.get("/v1/queue/waiter", params={"key": c.key, "id": "w-1"}),
          mutates=False),
    _call("console", {"read"}, lambda h, c: h.get("/ui", params={"repo": c.repo}),
          mutates=False),
    _call("console-sections", {"read"},
          lambda h, c: h.get("/ui/sections", params={"repo": c.repo}), mutates=False),
    _call("console-js", {"read"}, lambda h, c: h.get("/ui/console.js"), mutates=False),
    _call("console-css", {"read"}, lambda h, c: h.get("/ui/console.css"), mutates=False),
    _call("console-force-unlock", {"force-unlock"},
          lambda h, c: h.post("/ui/force-unlock", data={"key": c.key, "reason": "matrix test"})),
]
"""Every route that asks for a right (``test_access_seam`` checks that none is left out)."""
