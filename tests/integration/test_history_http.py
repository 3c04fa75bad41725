"""Many concurrent clients over HTTP against a real ``enhanced-locking serve`` process: no key
is ever granted to two clients at once and fencing tokens only rise (``tests/history.py``)."""

from __future__ import annotations

import httpx
from tests.conftest import ServiceFactory
from tests.history import Workload, run_clients

FLAGS = ("--enhanced-locking-enabled", "--enhanced-locking-priority-queue",
         "--enhanced-locking-starvation-threshold=50ms", "--enhanced-locking-max-timeout=1m")


async def test_sixty_clients_waiting_and_batching_never_share_a_lock(
    service_process: ServiceFactory,
) -> None:
    served = service_process(*FLAGS)
    work = Workload(clients=60, rounds=15)
    history = await run_clients(served.url, work)
    history.assert_consistent(min_holds=work.clients * work.rounds // 2)
    assert set(history.grants_per_key()) == {
        f"{work.repo}/{p}/default/{p}" for p in work.paths}
    async with httpx.AsyncClient(base_url=served.url) as http:
        assert (await http.get("/v1/locks", params={"repo": work.repo})).json() == {"locks": []}
        for path in work.paths:
            queue = (await http.get("/v1/queue",
                                    params={"key": f"{work.repo}/{path}/default/{path}"})).json()
            assert queue["waiters"] == []


async def test_with_deadlock_detection_and_fifo_the_history_stays_consistent(
    service_process: ServiceFactory,
) -> None:
    served = service_process("--enhanced-locking-enabled", "--enhanced-locking-deadlock-detection")
    work = Workload(clients=50, rounds=10, batch_share=0.5, seed=11)
    history = await run_clients(served.url, work)
    history.assert_consistent(min_holds=work.clients * work.rounds // 2)
