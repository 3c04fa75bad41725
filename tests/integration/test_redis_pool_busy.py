"""A call that finds every pooled Redis connection busy is an overload, not an outage.

The replica's pool (``enhanced-locking-redis-pool-size``) is all in use by other calls while
Redis itself answers at once. A call that waits past the pool's bound for a connection is
answered as the service's other overload is: ``503`` with ``reason: overloaded`` and
``Retry-After``, and a router does not send it to the legacy side (which it does for a store
that does not answer). Before, the call's own 5 s limit ran out first, equal to the pool's,
and the caller was told the store did not answer: the router's fall-back granted the key on
legacy, under a flood larger than the pool.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from tests.conftest import ServiceMaker
from tests.support.locks import request_for
from tests.support.redis_cluster import RedisClusterNodes
from tests.support.redis_fixtures import redis_cluster_config
from tests.support.redis_server import RedisServer

from enhanced_locking.api import create_app
from enhanced_locking.backends.redis_connection import COMMAND_TIMEOUT, POOL_WAIT
from enhanced_locking.backends.redis_scripts import CLAIM_MS, REPLICA_MS
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.events import EventBus
from enhanced_locking.factory import LockService
from enhanced_locking.locking import EnhancedLocker
from enhanced_locking.metrics import Metrics
from enhanced_locking.migration.router import Router
from enhanced_locking.types import AcquireResult, Lock

pytestmark = pytest.mark.redis

REPO = "acme/busy"


def _body(path: str, pull: int) -> dict[str, object]:
    return {"project": {"repoFullName": REPO, "path": path}, "pull": {"num": pull}}


async def test_a_call_with_no_free_pooled_connection_is_answered_overloaded(
    make_service: ServiceMaker, redis_server: RedisServer,
) -> None:
    service = await make_service(enabled=True, backend="redis", redis_addr=redis_server.addr,
                                 redis_pool_size=2, fallback="legacy", legacy_backend="memory")
    assert service.enhanced is not None
    backend = service.enhanced.backend
    assert isinstance(backend, RedisBackend)
    transport = httpx.ASGITransport(app=create_app(service, manage_lifecycle=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
        first = await http.post("/v1/locks", json=_body("a", 1))
        assert first.status_code == 200, first.text
        assert first.json()["lock"]["backend"] == "enhanced"
        # Every connection of the pool taken by other users (Redis answers all along).
        busy, on_legacy = await _asked_with_the_pool_taken(http, service, backend, "b", 2)
        assert "enhanced-locking-redis-pool-size" in busy.json()["error"], busy.text
        assert on_legacy is None, f"fell back to legacy: {on_legacy}"
        # The pool's own bound ended the wait, before the call's limit: had the limit come
        # first, the call would have been a store that did not answer (its "limit" named, and
        # the fall-back to legacy taken).
        assert f"no free connection within {POOL_WAIT:g} s" in busy.json()["error"], busy.text
        assert "did not answer" not in busy.json()["error"] and POOL_WAIT < COMMAND_TIMEOUT
        # Once a connection is free the same request is served, on the enhanced side.
        again = await http.post("/v1/locks", json=_body("b", 2))
        assert again.status_code == 200, again.text
        assert again.json()["lock"]["backend"] == "enhanced"
        assert (await http.get("/v1/locks", params={"repo": REPO})).json()["locks"] != []


async def _on_redis(make_service: ServiceMaker, redis_server: RedisServer,
                    **settings: Any) -> tuple[LockService, RedisBackend]:
    """A service on ``redis_server`` with a pool of two, falling back to a memory legacy
    store, and its Redis store."""
    service = await make_service(enabled=True, backend="redis", redis_addr=redis_server.addr,
                                 redis_pool_size=2, fallback="legacy", legacy_backend="memory",
                                 **settings)
    assert service.enhanced is not None
    backend = service.enhanced.backend
    assert isinstance(backend, RedisBackend)
    return service, backend


async def _asked_with_the_pool_taken(
    http: httpx.AsyncClient, service: LockService, backend: RedisBackend, path: str, pull: int,
) -> tuple[httpx.Response, Lock | None]:
    """``POST /v1/locks`` of ``path`` for ``pull`` while every pooled connection is taken
    (Redis answers all along), held to be ``503 overloaded``, and what legacy holds for its
    key just after."""
    counted = _pool_busy_count(service)
    pool = await _idle_pool(backend)
    taken: list[Any] = []
    try:
        await _take_the_rest(pool, taken)
        busy = await http.post("/v1/locks", json=_body(path, pull))
        on_legacy = await service.legacy.get(f"{REPO}/{path}/default/")  # (no project name)
    finally:
        for connection in taken:
            await pool.release(connection)
    assert busy.status_code == 503, busy.text
    assert busy.json()["reason"] == "overloaded", busy.text
    assert busy.headers["retry-after"] == "1"
    # Counted where the on-call engineer looks, not only by the callers' 503s; apart from
    # the requests shed at the in-flight limit (none were).
    assert _pool_busy_count(service) == counted + 1, "the busy pool's 503 counted"
    assert b"\nenhanced_locking_requests_shed_total 0.0\n" in service.metrics.exposition()
    return busy, on_legacy


def _pool_busy_count(service: LockService) -> float:
    """``enhanced_locking_requests_pool_busy_total`` as ``/metrics`` shows it now (its text,
    without the scrape's reads of the stores, which some tests here count)."""
    scraped = service.metrics.exposition().decode()
    name = "enhanced_locking_requests_pool_busy_total "
    lines = [line for line in scraped.splitlines() if line.startswith(name)]
    assert len(lines) == 1, f"{name.strip()} not in /metrics"
    return float(lines[0].removeprefix(name))


async def _idle_pool(backend: RedisBackend) -> Any:
    """``backend``'s connection pool, with no connection kept aside by its scripts' calls
    (every connection it has is in the pool, to be taken)."""
    await backend.connection.drop_idle()
    client = backend.connection.client
    assert isinstance(client, aioredis.Redis)
    return client.connection_pool


async def _take_the_rest(pool: Any, taken: list[Any]) -> None:
    """Every connection ``pool`` has left, into ``taken`` (to be released by the caller)."""
    while True:
        try:
            taken.append(await asyncio.wait_for(pool.get_connection(), timeout=0.5))
        except TimeoutError:
            break
    assert taken


async def test_a_replica_whose_pool_is_busy_still_keeps_its_waiters_alive(
    make_service: ServiceMaker, redis_server: RedisServer,
) -> None:
    """Its waiter heartbeat does not wait behind the pool: with every pooled connection
    busy for longer than a replica counts as alive without a heartbeat (5 s), its waiter is
    still granted when the key is released. Before, the heartbeat waited out the pool's bound
    every second, and the release passed the waiter over as a dead replica's."""
    service = await make_service(enabled=True, backend="redis", redis_addr=redis_server.addr,
                                 redis_pool_size=2, legacy_backend="memory")
    assert service.enhanced is not None
    backend = service.enhanced.backend
    assert isinstance(backend, RedisBackend)
    router = service.router
    held, waiting = await _held_and_waited_for(router)
    await _with_the_pool_taken(backend, REPLICA_MS / 1000 + 1.5)
    await router.release(held.lock_key, owner=(REPO, 1))
    granted = await asyncio.wait_for(waiting, timeout=15)
    assert granted.acquired, granted


async def test_a_grant_from_the_queue_is_confirmed_while_the_pool_is_busy(
    make_service: ServiceMaker, redis_server: RedisServer,
) -> None:
    """A grant from the queue is the waiter's once its replica confirms it, within the claim
    window (5 s): that confirmation does not wait behind the pool. With every pooled
    connection busy for longer than the window while another replica hands the key over, the
    waiter is still granted. Before, the confirmation waited for a pooled connection (and
    again, at the back, after each wait past the pool's bound), the claim lapsed, and the
    waiter was told ``unavailable`` while Redis answered all along: under a flood larger than
    the pool, a waiter answered ``409 unavailable`` naming the key's holder."""
    service = await make_service(enabled=True, backend="redis", redis_addr=redis_server.addr,
                                 redis_pool_size=2, legacy_backend="memory")
    other = await make_service(enabled=True, backend="redis", redis_addr=redis_server.addr,
                               legacy_backend="memory")
    assert service.enhanced is not None
    backend = service.enhanced.backend
    assert isinstance(backend, RedisBackend)
    held, waiting = await _held_and_waited_for(service.router)
    # The other replica's release hands the key to the waiter, claimed for 5 s.
    await _with_the_pool_taken(backend, CLAIM_MS / 1000 + 1.5,
                               other.router.release(held.lock_key, owner=(REPO, 1)))
    granted = await asyncio.wait_for(waiting, timeout=15)
    assert granted.acquired, granted
    assert (await other.router.get(held.lock_key)) == granted.lock


async def _with_the_pool_taken(backend: RedisBackend, seconds: float,
                               meanwhile: Awaitable[object] | None = None) -> None:
    """Every pooled connection of ``backend`` taken for ``seconds`` (Redis answers all
    along); ``meanwhile`` is awaited first, while they are taken."""
    pool = await _idle_pool(backend)
    taken: list[Any] = []
    try:
        await _take_the_rest(pool, taken)
        if meanwhile is not None:
            await meanwhile
        await asyncio.sleep(seconds)
    finally:
        for connection in taken:
            await pool.release(connection)


async def _held_and_waited_for(
    locker: Router | EnhancedLocker,
) -> tuple[AcquireResult, asyncio.Future[AcquireResult]]:
    """Key ``w`` held by pull 1, and pull 2's acquire waiting for it (up to 30 s), queued."""
    held = await locker.acquire(request_for(repo=REPO, path="w", pull=1))
    assert held.acquired, held
    waiting = asyncio.ensure_future(locker.acquire(
        request_for(repo=REPO, path="w", pull=2, wait=timedelta(seconds=30))))
    give_up = time.monotonic() + 60
    while len(await locker.queue(held.lock_key)) != 1:
        assert time.monotonic() < give_up, "the waiter never queued"
        await asyncio.sleep(0.05)
    return held, waiting


async def test_with_redis_frozen_a_flood_larger_than_the_pool_falls_back_to_legacy(
    make_service: ServiceMaker, redis_server: RedisServer,
) -> None:
    # Redis does not answer: every pooled connection is held by a call Redis never answers,
    # and the calls beyond the pool find none free. That is an outage, not an overload of the
    # replica: each call is answered as the fall-back says (legacy here), none 503 overloaded.
    service = await make_service(enabled=True, backend="redis", redis_addr=redis_server.addr,
                                 redis_pool_size=2, fallback="legacy", legacy_backend="memory")
    transport = httpx.ASGITransport(app=create_app(service, manage_lifecycle=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://service",
                                 timeout=60) as http:
        first = await http.post("/v1/locks", json=_body("a", 1))
        assert first.status_code == 200 and first.json()["lock"]["backend"] == "enhanced"
        with redis_server.paused():
            answers = await asyncio.gather(*(http.post("/v1/locks", json=_body(f"f{n}", 10 + n))
                                             for n in range(4)))
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.json()["lock"]["backend"] == "legacy", answer.text


async def test_on_a_redis_without_functions_the_heartbeat_does_not_wait_behind_the_pool(
    make_service: ServiceMaker, tmp_path: Path,
) -> None:
    """A Redis before 7.0 (a 7.0 server with FCALL renamed away answers as 6.2 does) runs the
    heartbeat script by EVALSHA: on the heartbeat's own connection too, so with every pooled
    connection busy it is still made. Before, it went through the pool there, waited out the
    pool's bound and failed (StoreBusy), and the replica's waiters looked like a dead one's."""
    with RedisServer(tmp_path / "old", extra_args=["--rename-command", "FCALL", ""]) as server:
        service = await make_service(enabled=True, backend="redis", redis_addr=server.addr,
                                     redis_pool_size=2, legacy_backend="memory")
        assert service.enhanced is not None
        backend = service.enhanced.backend
        assert isinstance(backend, RedisBackend)
        held = await service.router.acquire(request_for(repo=REPO, path="h", pull=1))
        assert held.acquired, held
        pool = await _idle_pool(backend)
        taken: list[Any] = []
        try:
            await _take_the_rest(pool, taken)
            server.client().script_flush()  # the reserved connection loads it again
            await asyncio.wait_for(backend._heartbeat(), timeout=POOL_WAIT + 10)
        finally:
            for connection in taken:
                await pool.release(connection)
        stats = server.client().info("commandstats")
        assert "cmdstat_fcall" not in stats and stats["cmdstat_evalsha"]["calls"] >= 2


async def test_a_legacy_key_whose_enhanced_check_finds_the_pool_busy_is_answered_overloaded(
    make_service: ServiceMaker, redis_server: RedisServer,
) -> None:
    """A key routed to legacy is checked on the enhanced side before it is granted there (a
    hold left from before a weight move). That check waiting past the pool's bound is the
    overload it is on the enhanced path: ``503 overloaded``, nothing granted on legacy, no
    fall-back counted or journaled. Before, it was taken for the enhanced store not
    answering: the key was granted on legacy unchecked, counted in
    ``enhanced_locking_fallbacks_total{action="unchecked"}`` (and so toward a rollout's
    ``maxFallbacks``) and journaled for reconciling."""
    service, backend = await _on_redis(make_service, redis_server, migration_weight=0)
    key = f"{REPO}/c/default/"
    assert service.router.side_for(key) == "legacy"
    transport = httpx.ASGITransport(app=create_app(service, manage_lifecycle=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
        _, on_legacy = await _asked_with_the_pool_taken(http, service, backend, "c", 3)
        assert on_legacy is None, f"granted on legacy unchecked: {on_legacy}"
        assert service.metrics.tallies().fallbacks == 0
        assert service.migration.fallback.pending == 0
        # Once a connection is free the same request is served, on legacy, checked.
        again = await http.post("/v1/locks", json=_body("c", 3))
        assert again.status_code == 200, again.text
        assert again.json()["lock"]["backend"] == "legacy"
        assert service.metrics.tallies().fallbacks == 0
        assert service.migration.fallback.pending == 0


async def test_a_legacy_batch_answered_overloaded_midway_gives_back_what_it_took(
    make_service: ServiceMaker, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch whose keys all route to legacy takes them there one at a time, each checked on
    the enhanced side first. The pool busy from the second key's check on is answered
    ``503 overloaded``, and the first key, taken on legacy already, is given back: a batch
    told it failed holds nothing. Before, the first key stayed held on legacy, for good (a
    legacy lock has no lease)."""
    service, backend = await _on_redis(make_service, redis_server, migration_weight=0)
    first, second = f"{REPO}/x1/default/", f"{REPO}/x2/default/"
    assert service.router.side_for(first) == service.router.side_for(second) == "legacy"
    legacy = service.router.legacy
    pool = await _idle_pool(backend)
    taken: list[Any] = []
    acquire, get = legacy.acquire, legacy.get
    granted: list[str] = []
    made_busy: list[str] = []

    async def acquire_noted(request: Any) -> Any:
        result = await acquire(request)
        if result.acquired:
            granted.append(request.key)
        if granted == [first] and not made_busy:
            # Other calls take every pooled connection once the first key is granted on
            # legacy: the enhanced side's check of the second key finds none free. (The batch
            # reads no key before its grant: each grant says whether it was fresh.)
            made_busy.append(request.key)
            await _take_the_rest(pool, taken)
        return result

    release = legacy.release
    given_back: list[str] = []

    async def release_then_free(key: str, **kwargs: Any) -> Any:
        # The give-back frees the legacy hold first, then asks the enhanced side: the other
        # calls are done with the pool by then (the enhanced release is not kept waiting).
        released = await release(key, **kwargs)
        given_back.append(key)
        while taken:
            await pool.release(taken.pop())
        return released

    monkeypatch.setattr(legacy, "acquire", acquire_noted)
    monkeypatch.setattr(legacy, "release", release_then_free)
    body = {"locks": [{"project": {"repoFullName": REPO, "path": path}} for path in ("x1", "x2")],
            "pull": {"num": 4}}
    transport = httpx.ASGITransport(app=create_app(service, manage_lifecycle=False))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
            busy = await http.post("/v1/locks/batch", json=body)
    finally:
        for connection in taken:
            await pool.release(connection)
    assert granted == [first], "the batch did not reach its second key"
    assert busy.status_code == 503, busy.text
    assert busy.json()["reason"] == "overloaded", busy.text
    assert given_back == [first]
    assert await get(first) is None, "the batch answered 503 left its first key held on legacy"
    assert await get(second) is None
    assert service.metrics.tallies().fallbacks == 0



async def test_an_overload_is_not_retried_nor_counted_as_an_enhanced_error(
    make_service: ServiceMaker, redis_server: RedisServer,
) -> None:
    """With retries on, a call that found no free pooled connection is answered
    ``503 overloaded`` after one wait for the pool, not tried again (each try would wait out
    the pool's bound again and add to the load it is), and it counts neither as an enhanced
    operation nor as an error: a LockMigration's ``maxErrorRate`` judges how the enhanced
    store serves, not this replica's overload. Before, it was tried ``retry-max-attempts``
    times and every try counted as a failed enhanced operation."""
    service, backend = await _on_redis(make_service, redis_server, retries=True,
                                       retry_max_attempts=3, retry_backoff="10ms")
    transport = httpx.ASGITransport(app=create_app(service, manage_lifecycle=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
        first = await http.post("/v1/locks", json=_body("r", 1))
        assert first.status_code == 200, first.text
        before = service.metrics.tallies()
        retried = service.metrics.retries.labels("acquire")._value.get()
        await _asked_with_the_pool_taken(http, service, backend, "s", 2)
        after = service.metrics.tallies()
        assert service.metrics.retries.labels("acquire")._value.get() == retried
        assert after.enhanced_errors == before.enhanced_errors, (before, after)
        assert after.enhanced_operations == before.enhanced_operations, (before, after)
        assert after.fallbacks == before.fallbacks == 0
        # The next call is counted as ever.
        again = await http.post("/v1/locks", json=_body("s", 2))
        assert again.status_code == 200, again.text
        assert service.metrics.tallies().enhanced_operations > after.enhanced_operations


async def test_on_a_cluster_a_replica_whose_calls_all_wait_still_keeps_its_waiters_alive(
    redis_cluster: RedisClusterNodes, redis_cluster_prefix: str,
) -> None:
    """As ``test_a_replica_whose_pool_is_busy_still_keeps_its_waiters_alive``, on a Redis
    Cluster: there the calls take turns (at most the pool's size at
    once) rather than pooled connections, and the heartbeat does not wait for one. Before, it
    waited out ``POOL_WAIT`` behind the flood's calls every second, failed, and the release
    passed the waiter over as a dead replica's (a flood of 300 waiting acquires on a loaded
    machine: 239 told ``unavailable``)."""
    config = redis_cluster_config(redis_cluster, redis_cluster_prefix, enabled=True,
                                  redis_pool_size=2, max_timeout=timedelta(minutes=1))
    backend = RedisBackend.from_config(config, "enhanced")
    locker = EnhancedLocker(backend, settings=lambda: config, events=EventBus(),
                            metrics=Metrics())
    client = backend.connection.client
    assert isinstance(client, RedisCluster)
    turns = client.calls  # type: ignore[attr-defined]
    taken = 0
    try:
        held, waiting = await _held_and_waited_for(locker)
        # Every turn taken, for longer than a replica counts as alive without a heartbeat.
        while not turns.locked():
            await turns.acquire()
            taken += 1
        await asyncio.sleep(REPLICA_MS / 1000 + 1.5)
        # Released meanwhile by another replica: the waiter's replica is alive, and granted.
        other = RedisBackend.from_config(config, "enhanced")
        try:
            await other.release(held.lock_key, owner=(REPO, 1))
        finally:
            await other.close()
        for _ in range(taken):
            turns.release()
        taken = 0
        granted = await asyncio.wait_for(waiting, timeout=15)
        assert granted.acquired, granted
        await locker.release(held.lock_key, owner=(REPO, 2))
    finally:
        for _ in range(taken):
            turns.release()
        await locker.close()
        await backend.close()
