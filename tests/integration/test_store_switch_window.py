"""Requests in flight while the enhanced store moves (a SQLite file → a real redis-server):
between the export of the old store's locks and the swap to the new locker, the old locker
makes no grant and no release (they wait at the switch gate, then go to the new locker), so no
key is granted twice across the switch and no released lock is left held in the new store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from tests.conftest import ServiceMaker
from tests.history import Workload, run_clients
from tests.support.leases import Overrun, until, with_leases
from tests.support.locks import request_for
from tests.support.redis_server import RedisServer
from tests.support.served import served

from enhanced_locking.backends import EmbeddedBackend
from enhanced_locking.backends.base import QueueBackend
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.backends.waiting import Waiters
from enhanced_locking.factory import LockService
from enhanced_locking.provider import ConfigRejected
from enhanced_locking.types import Event, Lock, Locks, utcnow

pytestmark = pytest.mark.redis


def _on_redis(server: RedisServer, db: int) -> dict[str, Any]:
    return {"backend": "redis", "redis_addr": server.addr, "redis_db": db}


async def test_clients_acquiring_and_releasing_across_switches_never_share_a_lock(
    redis_server: RedisServer, make_service: ServiceMaker,
) -> None:
    service = await make_service(enabled=True, backend="boltdb", legacy_backend="memory",
                                 max_timeout=timedelta(minutes=1))
    assert isinstance(service.enhanced and service.enhanced.backend, EmbeddedBackend)
    # Ten clients of sixteen rounds span the four switches and still fail without the gate
    # (the router's gate set to None: tokens out of order across the stores); the redis
    # MONITOR log the fixture checks afterwards grows with the work (96 MB at 30 x 40).
    work = Workload(clients=10, rounds=16, wait="20s", hold_seconds=(0.0, 0.004), seed=7)
    switched: list[int] = []

    async def switch() -> None:
        # The SQLite file, then one Redis database after another (each a store of its own).
        for db in range(4):
            await asyncio.sleep(0.3)
            await service.provider.set_layer("cluster", _on_redis(redis_server, db))
            switched.append(db)

    async with served(service) as url:
        history, _ = await asyncio.gather(run_clients(url, work), switch())
        async with httpx.AsyncClient(base_url=url) as http:
            left = (await http.get("/v1/locks", params={"repo": work.repo})).json()

    assert switched == [0, 1, 2, 3]
    # No key granted twice, tokens rising across the stores (before the gate: tokens handed
    # out twice, overlapping holds, releases answered 404/409 by the new store).
    history.assert_consistent(min_holds=work.clients * work.rounds // 2)
    assert history.errors == []
    # Every lock was released by its client: none is left held in the store now in force.
    assert left == {"locks": []}
    store = service.enhanced.backend if service.enhanced is not None else None
    assert isinstance(store, RedisBackend) and await store.list() == []
    assert service.switch_gate.through == 0


async def _pause_adopt(monkeypatch: pytest.MonkeyPatch,
                       during: Callable[[], Awaitable[None]]) -> None:
    """Have the new Redis store run ``during`` right after it adopted the old store's locks:
    inside the switch's window, before the new locker is swapped in."""
    adopt = RedisBackend.adopt

    async def adopt_then(backend: RedisBackend, locks: Locks,
                         tokens: dict[str, int]) -> Locks:
        conflicts = await adopt(backend, locks, tokens)
        await during()
        return conflicts

    monkeypatch.setattr(RedisBackend, "adopt", adopt_then)


async def _queued(store: QueueBackend, key: str) -> Waiters:
    """``key``'s waiters in ``store`` once there are any, or none after a minute (a loaded
    machine stalls a store call for seconds: a count of short polls ran out first)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 60
    while loop.time() < give_up:
        if waiters := await store.queue(key):
            return waiters
        await asyncio.sleep(0.01)
    return []


async def _holding(make_service: ServiceMaker) -> tuple[LockService, Lock]:
    """A service on its SQLite store, and the lock pull 1 holds there."""
    service = await make_service(enabled=True, backend="boltdb", legacy_backend="memory")
    held = await service.router.acquire(request_for(pull=1))
    assert held.acquired and held.lock is not None
    return service, held.lock


async def test_a_release_and_a_grant_asked_during_the_switch_land_on_the_new_store(
    redis_server: RedisServer, make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, lock = await _holding(make_service)
    key = lock.key
    asked: list[asyncio.Task[Any]] = []

    async def in_the_window() -> None:
        asked.append(asyncio.create_task(
            service.router.release(key, owner=("acme/infra", 1))))
        asked.append(asyncio.create_task(
            service.router.acquire(request_for(pull=2, path="envs/other"))))
        # Both reach the gate (the old store, were it open).
        await until(lambda: service.switch_gate.waiting == 2
                    or any(task.done() for task in asked))
        assert not any(task.done() for task in asked)  # they wait at the gate
        assert service.switch_gate.waiting == 2

    await _pause_adopt(monkeypatch, in_the_window)
    await service.provider.set_layer("cluster", _on_redis(redis_server, 0))
    released, granted = await asyncio.gather(*asked)

    new = service.enhanced.backend if service.enhanced is not None else None
    assert isinstance(new, RedisBackend)
    assert isinstance(released, Lock) and released.key == key
    assert await new.get(key) is None  # the release reached the new store
    assert granted.acquired and granted.lock is not None
    assert await new.get(granted.lock.key) == granted.lock  # so did the grant
    # And the key released in the window is free for another pull on the new store.
    again = await service.router.acquire(request_for(pull=3))
    assert again.acquired and again.lock is not None
    assert again.lock.fencing_token > lock.fencing_token


async def test_a_waiter_queued_on_the_old_store_is_served_by_the_new_one(
    redis_server: RedisServer, make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, lock = await _holding(make_service)
    key = lock.key
    old = service.enhanced.backend if service.enhanced is not None else None
    assert isinstance(old, EmbeddedBackend)
    waiting = asyncio.create_task(
        service.router.acquire(request_for(pull=2, wait=timedelta(seconds=30))))
    assert [w.owner for w in await _queued(old, key)] == [("acme/infra", 2)]

    async def in_the_window() -> None:
        # The waiter left the old store's queue before the export (the switch waits for it).
        assert await old.queue(key) == []
        assert not waiting.done()

    await _pause_adopt(monkeypatch, in_the_window)
    await service.provider.set_layer("cluster", _on_redis(redis_server, 0))
    new = service.enhanced.backend if service.enhanced is not None else None
    assert isinstance(new, RedisBackend)
    assert [w.owner for w in await _queued(new, key)] == [("acme/infra", 2)]
    assert not waiting.done()
    assert await service.router.release(key, owner=("acme/infra", 1)) is not None
    result = await asyncio.wait_for(waiting, 60)
    assert result.acquired and result.lock is not None and result.lock.pull.num == 2
    assert await new.get(key) == result.lock


async def test_a_lease_that_ends_in_the_switch_window_is_told_expired_once(
    redis_server: RedisServer, make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lease that ends between the export of the old store's locks and the swap: the old
    locker's lease timer freed it in the old store (its expired event, its count), and the
    new store, which had adopted it, freed it again at the new locker's timer: two expired
    events and two lease expirations for one lease. Lease timers were the one writer of the
    old locker the switch gate did not hold; now they wait out the switch (the old locker is
    closed after it, its waiting timers with it) and the new locker tells the end once."""

    async def case(lease: timedelta) -> None:
        service = await make_service(enabled=True, backend="boltdb", legacy_backend="memory")
        seen: list[Event] = []
        service.events.subscribe(seen.append)
        held = await service.router.acquire(request_for(pull=1, ttl=lease))
        assert held.acquired and held.lock is not None and held.lock.expires_at is not None
        ends = held.lock.expires_at

        async def in_the_window() -> None:
            if utcnow() >= ends:
                raise Overrun  # exported after its end: nothing of it to adopt
            # The old locker's timer comes due in the window.
            await asyncio.sleep((ends - utcnow()).total_seconds() + 0.3)

        # Undone when the case ends: a case run again with a longer lease pauses in its own
        # window, not in this one's wrapped again (whose lease has ended: an overrun each time).
        with monkeypatch.context() as patch:
            await _pause_adopt(patch, in_the_window)
            try:
                await service.provider.set_layer("cluster", _on_redis(redis_server, 0))
            except ConfigRejected as rejected:  # the switch's adopt raised it: its cause says why
                if isinstance(rejected.__cause__, Overrun):
                    raise Overrun from rejected  # (the case runs again with a longer lease)
                raise
        new = service.enhanced.backend if service.enhanced is not None else None
        assert isinstance(new, RedisBackend)
        assert await until(lambda: any(e.type == "expired" for e in seen))
        await asyncio.sleep(0.3)  # a second telling, if any, has come by now
        assert await new.get(held.lock.key) is None
        # The next pull to take the key on the new store finds no lapsed copy to tell of.
        taken = await service.router.acquire(request_for(pull=2))
        assert taken.acquired, taken
        assert [e.type for e in seen].count("expired") == 1, [e.type for e in seen]
        assert service.metrics.registry.get_sample_value(
            "enhanced_locking_lease_expirations_total") == 1

    await with_leases(case)
