"""The tests' per-thread HTTP clients: no two threads ever share a connection pool."""

from __future__ import annotations

import concurrent.futures
import threading

import uvicorn
from tests.support.thread_clients import KEEPALIVE_EXPIRY, ThreadClients


def test_each_thread_gets_its_own_client_and_keeps_it() -> None:
    start = threading.Barrier(4, timeout=10)  # four threads alive at once: four threads asked

    def two_asks(clients: ThreadClients) -> tuple[int, int]:
        start.wait()
        return id(clients()), id(clients())

    with ThreadClients(base_url="http://127.0.0.1:1") as clients, \
            concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        asks = list(pool.map(two_asks, [clients] * 4))
        assert all(first == second for first, second in asks)
        assert len({first for first, _ in asks}) == 4
        assert {id(client) for client in clients.made} == {first for first, _ in asks}
        mine = clients()
        assert mine not in [client for client in clients.made[:4]]
        made = list(clients.made)
    assert len(made) == 5 and all(client.is_closed for client in made)


def test_a_client_drops_idle_connections_before_the_service_closes_them() -> None:
    # The service runs uvicorn with its default keep-alive (``enhanced_locking.cli``).
    served = uvicorn.Config(app="enhanced_locking.api:create_app")
    assert KEEPALIVE_EXPIRY < served.timeout_keep_alive
