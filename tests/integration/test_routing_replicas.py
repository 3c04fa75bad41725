"""No lock is granted twice, even by two replicas that route the same key to different sides.

Two real service processes share one embedded store. One still routes every key to legacy
(weight 0), the other already routes every key to enhanced (weight 100): the moment of a
weight change before every replica has applied it. Both are asked for the same keys at the same
time by different pulls. Each key may be granted to one pull or, when the two checks cross, to
neither; never to both.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

from tests.conftest import ServiceFactory
from tests.support.thread_clients import ThreadClients

KEYS = 150


def acquire(
    clients: ThreadClients, *, path: str, pull: int, start: threading.Barrier
) -> dict[str, Any]:
    client = clients()  # this thread's own: a client shared by threads is not thread-safe
    start.wait()
    response = client.post("/v1/locks", json={
        "project": {"repoFullName": "acme/infra", "path": path},
        "workspace": "default",
        "pull": {"num": pull},
    })
    assert response.status_code in (200, 409), response.text
    answer: dict[str, Any] = response.json()
    return answer


def test_replicas_routing_a_key_to_different_sides_never_both_grant_it(
    service_process: ServiceFactory,
) -> None:
    on_legacy = service_process("--enhanced-locking-enabled",
                                "--enhanced-locking-migration-weight=0")
    on_enhanced = service_process("--enhanced-locking-enabled",
                                  "--enhanced-locking-migration-weight=100",
                                  data_dir=on_legacy.data_dir)
    with ThreadClients(base_url=on_legacy.url, timeout=30) as legacy, \
            ThreadClients(base_url=on_enhanced.url, timeout=30) as enhanced, \
            concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        futures = []
        for i in range(KEYS):
            both = threading.Barrier(2, timeout=20)  # the two pulls ask at the same moment
            futures.append((
                pool.submit(acquire, legacy, path=f"p{i}", pull=1, start=both),
                pool.submit(acquire, enhanced, path=f"p{i}", pull=2, start=both),
            ))
        pairs = [(a.result(), b.result()) for a, b in futures]

        twice = [a["lockKey"] for a, b in pairs if a["acquired"] and b["acquired"]]
        assert twice == [], f"granted to both pulls: {twice[:5]}"
        granted = [a if a["acquired"] else b for a, b in pairs if a["acquired"] or b["acquired"]]
        legacy_client, enhanced_client = legacy(), enhanced()
        assert len(granted) >= KEYS // 2, "most keys are granted to one of the pulls"
        for lock in (answer["lock"] for answer in granted):
            # Both replicas see the same single holder, whichever side it is on.
            for client in (legacy_client, enhanced_client):
                held = client.get("/v1/locks/by-key", params={"key": lock["key"]}).json()
                assert held == {"lock": lock}
        held = legacy_client.get("/v1/locks").json()["locks"]
        assert sorted(lock["key"] for lock in held) == sorted(a["lock"]["key"] for a in granted)
        assert {lock["backend"] for lock in held} <= {"legacy", "enhanced"}
