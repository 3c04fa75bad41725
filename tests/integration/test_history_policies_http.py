"""Many concurrent clients over HTTP, shared and exclusive, under a concurrency limit and two
freezes that start and end in the middle of the run, against a real ``enhanced-locking serve``
process on the embedded store and on a real Redis. The history checker (``tests/history.py``)
proves that no exclusive holder ever had company, that the group never held more than its
limit, that no lock of a frozen key was granted inside its freeze, and that tokens only rose.

The freezes are switched on and off by their ``from`` and ``until`` (a service outside
Kubernetes takes its rules from its config file at start); the service wakes its queues at
both edges. Rule edits on a running service are covered by the policy model
(``tests/unit/test_policy_model.py``) and the e2e tests against a real API server.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from tests.conftest import ServiceFactory
from tests.history import FreezeWindow, GroupLimit, History, Workload, run_clients

REPO = "acme/history"
PATHS = ("g/a", "g/b", "g/c", "d")
GROUPED = ("g/a", "g/b", "g/c")
LIMIT = 3
FREEZE_STARTS = 20.0  # seconds after the config is written (the service is up by then)
FREEZE_LASTS = 4.0


def key(path: str) -> str:
    return f"{REPO}/{path}/default/{path}"


def config(path: Path, start: datetime, end: datetime) -> Path:
    window = {"from": start.isoformat(), "until": end.isoformat()}
    path.write_text(yaml.safe_dump({
        "enhanced-locking-enabled": True,
        "enhanced-locking-priority-queue": True,
        "enhanced-locking-max-timeout": "1m",
        "enhanced-locking-policies": {
            "freezes": [
                {"name": "c-refused", "match": {"repo": REPO, "pathPrefix": "g/c"},
                 "message": "c is frozen", "action": "refuse", **window},
                {"name": "d-waits", "match": {"repo": REPO, "pathPrefix": "d"},
                 "message": "d is frozen", "action": "wait", **window},
            ],
            "concurrency": [{"name": "g", "match": {"repo": REPO, "pathPrefix": "g"},
                             "limit": LIMIT}],
        },
    }))
    return path


@pytest.mark.parametrize("store", ["embedded", pytest.param("redis", marks=pytest.mark.redis)])
async def test_shared_and_exclusive_clients_under_a_limit_and_a_freeze_keep_every_rule(
    store: str, service_process: ServiceFactory, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    flags = []
    if store == "redis":
        server = request.getfixturevalue("redis_server")
        flags += ["--enhanced-locking-backend=redis",
                  f"--enhanced-locking-redis-addr={server.addr}",
                  "--enhanced-locking-fallback=fail-closed",
                  "--enhanced-locking-legacy-backend=memory"]
    start = datetime.now(UTC) + timedelta(seconds=FREEZE_STARTS)
    end = start + timedelta(seconds=FREEZE_LASTS)
    served = service_process("--config", str(config(tmp_path / "service.yaml", start, end)),
                             *flags)
    async with httpx.AsyncClient(base_url=served.url, timeout=30.0) as http:
        for path in PATHS:  # the first answers of a new process are slow: not in the run
            body = {"project": {"repoFullName": REPO, "path": path, "projectName": path},
                    "pull": {"num": 1, "url": "https://git.example/pull/1", "author": "w"},
                    "user": {"username": "w"}}
            assert (await http.post("/v1/locks", json=body)).status_code == 200
            assert (await http.delete("/v1/locks/by-key",
                                      params={"key": key(path), "pull": 1})).status_code == 200
    began = datetime.now(UTC)
    assert began < start - timedelta(seconds=2), (
        "the service took longer to start than the freeze waits")
    grouped = frozenset(key(p) for p in GROUPED)
    history = History(
        limits=[GroupLimit("g", grouped, LIMIT)],
        freezes=[FreezeWindow("c-refused", frozenset({key("g/c")}), start, end),
                 FreezeWindow("d-waits", frozenset({key("d")}), start, end)])
    work = Workload(clients=24, repo=REPO, paths=PATHS, wait="5s", shared_share=0.6,
                    fail_fast_share=0.4, hold_seconds=(0.005, 0.03),
                    duration=(end - began).total_seconds() + 2.0, seed=12)
    await run_clients(served.url, work, history=history)

    history.assert_consistent(min_holds=100)
    assert history.overlapping_shared() > 0, "shared holders never coexisted"
    assert history.most_at_once(grouped) == LIMIT, "the limit was never reached"
    assert history.refusals["frozen"] > 0, dict(history.refusals)
    for path in ("g/c", "d"):
        times = [h.granted_at for h in history.holds if h.key == key(path) and h.granted_at]
        assert any(t < start for t in times), f"{path} was never granted before its freeze"
        assert any(t >= end for t in times), f"{path} was never granted after its freeze"
    async with httpx.AsyncClient(base_url=served.url) as http:
        assert (await http.get("/v1/locks", params={"repo": REPO})).json() == {"locks": []}
        for path in PATHS:
            queue = (await http.get("/v1/queue", params={"key": key(path)})).json()
            assert queue["waiters"] == []
