"""The intake: a flood of acquires enters the store a pool's worth at a time.

Thousands of waiting acquires arriving together used to all reach the store at once: on Redis
every one asked the pool for a connection, and those that found none within the pool's wait
were answered ``overloaded``, though each would have been served in milliseconds. Now at most
``redis-pool-size`` acquires are in their store steps at once (the others wait their turn, in
order); a waiter's wait for its turn in a key's queue holds no place. One that finds no place
within the intake's wait is answered ``503 overloaded`` with ``Retry-After`` before anything
of it was done.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import httpx
import pytest
import redis.asyncio as aioredis
from tests.conftest import ServiceMaker
from tests.support.locks import request_for
from tests.support.redis_server import RedisServer

from enhanced_locking.api import create_app
from enhanced_locking.backends.redis_connection import _TurnsPool
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.locking.intake import Intake

REPO = "acme/intake"
POOL = 4
FLOOD = 120


@pytest.mark.redis
async def test_a_flood_of_waiting_acquires_enters_the_store_a_pool_at_a_time(
    make_service: ServiceMaker, redis_server: RedisServer,
) -> None:
    service = await make_service(enabled=True, backend="redis", redis_addr=redis_server.addr,
                                 redis_pool_size=POOL, legacy_backend="memory")
    locker = service.enhanced
    assert locker is not None and isinstance(locker.backend, RedisBackend)
    client = locker.backend.connection.client
    assert isinstance(client, aioredis.Redis)
    pool = client.connection_pool
    assert isinstance(pool, _TurnsPool)
    keys = [request_for(repo=REPO, path=f"p{n}", pull=1) for n in range(6)]
    for held in keys:
        assert (await service.router.acquire(held)).acquired
    in_line: list[int] = []
    flooding = True

    async def watch() -> None:  # the callers waiting for a pooled connection, every 2 ms
        while flooding:
            in_line.append(pool.in_line)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    waiters = [asyncio.create_task(service.router.acquire(request_for(
        repo=REPO, path=f"p{n % 6}", pull=100 + n, wait=timedelta(seconds=60))))
        for n in range(FLOOD)]
    try:
        async with asyncio.timeout(60):
            # Every acquire queued, and told so (the intake empty again).
            while (sum([len(await locker.queue(r.key)) for r in keys]) < FLOOD
                   or locker.intake.inside):
                done = [w for w in waiters if w.done()]
                assert not done, [w.exception() or w.result() for w in done][:3]
                await asyncio.sleep(0.05)
        flooding = False
        await watcher
        # Every acquire was queued, none answered; at no turn did more callers wait for a
        # connection than the intake lets in (the pool's size), where all of them did.
        assert max(in_line) <= POOL, max(in_line)
        assert locker.intake.waiting == 0
    finally:
        flooding = False
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def test_an_acquire_with_no_place_in_time_is_answered_overloaded_and_nothing_is_done(
    make_service: ServiceMaker,
) -> None:
    service = await make_service(enabled=True, legacy_backend="memory")
    locker = service.enhanced
    assert locker is not None
    locker.intake = Intake(lambda: 1, setting="the bound", wait=0.2)
    taken = locker.intake.enter_now()
    assert taken is not None
    body = {"project": {"repoFullName": REPO, "path": "a"}, "pull": {"num": 1}, "wait": "5s"}
    transport = httpx.ASGITransport(app=create_app(service, manage_lifecycle=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
        busy = await http.post("/v1/locks", json=body)
        assert busy.status_code == 503, busy.text
        assert busy.json()["reason"] == "overloaded" and busy.headers["retry-after"] == "1"
        assert "limit of 1 acquires" in busy.json()["error"], busy.text
        assert (await http.get("/v1/locks", params={"repo": REPO})).json()["locks"] == []
        assert locker.intake.waiting == 0
        taken.leave()
        again = await http.post("/v1/locks", json=body)
        assert again.status_code == 200, again.text
        assert locker.intake.inside == 0
