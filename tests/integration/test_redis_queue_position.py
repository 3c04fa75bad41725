"""An enqueue on the Redis store as its queue grows: the place it answers a queued request
with is counted in the queues (a few ``ZCOUNT`` a call, whatever the queue's length) rather
than found by walking them, and is the request's place in the service order the store reads
back (``queue``), with priorities, aging and FIFO within a priority, for a new request and
for a retry that finds its waiter; and the call looks at a few of this replica's waiters on
the key, not at all of them."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import redis
from tests.support.locks import candidate_for, lock_for, request_for
from tests.support.redis_fixtures import redis_config
from tests.support.redis_server import RedisServer

from enhanced_locking.backends import waiting
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.backends.waiting import Notice, QueuePolicy, Status, Wait
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import EventBus
from enhanced_locking.locking import EnhancedLocker
from enhanced_locking.locking.visibility import AHEAD_SHOWN
from enhanced_locking.metrics import Metrics
from enhanced_locking.types import Event, Priority

pytestmark = pytest.mark.redis

KEY = "acme/infra/envs/prod/default/prod"
MINUTE = 60_000
LEVELS = (Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.CRITICAL)


@pytest.fixture
async def backend(redis_server: RedisServer) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend.from_config(redis_config(redis_server), "enhanced")
    granted, _ = await backend.acquire(lock_for(request_for(pull=1)))
    assert granted
    yield backend
    await backend.close()


async def _enqueue(backend: RedisBackend, pull: int, level: Priority,
                   policy: QueuePolicy) -> int:
    """Queue pull ``pull`` (or find its waiter again) at ``level``: the place answered."""
    request = request_for(pull=pull, priority=level)
    outcome = await backend.acquire_or_enqueue(
        candidate_for(request), ttl=None, wait=Wait(id=f"w-{pull}", timeout=timedelta(hours=1)),
        policy=policy)
    assert outcome.status is Status.QUEUED and outcome.position is not None
    return outcome.position


async def _places(backend: RedisBackend, policy: QueuePolicy) -> dict[str, int]:
    return {w.id: i + 1 for i, w in enumerate(await backend.queue(KEY, policy=policy))}


def _age(backend: RedisBackend, admin: redis.Redis, ages: list[int]) -> None:
    """Move the queued entries' enqueue times back: the n-th entry met by ``ages[n % len]``
    minutes and a half (mid-way between two aging steps, so a test's own time changes no
    effective level), all from one instant: entries of the same age, in different queues,
    have the same enqueue time to the millisecond."""
    seconds, micros = admin.time()
    now = int(seconds) * 1000 + int(micros) // 1000
    n = 0
    for level in range(4):
        name = backend.keys.queue(KEY, level)
        members: list[bytes] = admin.zrange(name, 0, -1)  # type: ignore[assignment]
        for member in members:
            enq = now - ages[n % len(ages)] * MINUTE - MINUTE // 2
            n += 1
            admin.zadd(name, {member: enq}, xx=True)
            waiter_id = backend.keys.member_waiter(member.decode())
            admin.hset(backend.keys.waiter(waiter_id), "enq", enq)


@pytest.mark.parametrize("priority", [True, False], ids=["priority", "fifo"])
async def test_the_place_answered_is_the_place_in_the_service_order(
    backend: RedisBackend, redis_server: RedisServer, priority: bool,
) -> None:
    policy = QueuePolicy(priority=priority, starvation_threshold=timedelta(minutes=1),
                         max_boost=2, max_size=1000)
    rng = random.Random(7)
    pulls = iter(range(10, 1000))
    for _ in range(24):
        pull = next(pulls)
        answered = await _enqueue(backend, pull, rng.choice(LEVELS), policy)
        assert answered == (await _places(backend, policy))[f"w-{pull}"]
    with redis_server.client() as admin:
        _age(backend, admin, [0, 1, 2, 3, 1, 0])
    places = await _places(backend, policy)
    for pull in range(10, 34):  # each asks again: its retry finds its waiter, in place
        assert await _enqueue(backend, pull, LEVELS[0], policy) == places[f"w-{pull}"]
    for _ in range(12):  # new ones join among the aged
        pull = next(pulls)
        answered = await _enqueue(backend, pull, rng.choice(LEVELS), policy)
        assert answered == (await _places(backend, policy))[f"w-{pull}"]


async def test_an_enqueue_reads_the_queue_a_few_times_whatever_its_length(
    backend: RedisBackend, redis_server: RedisServer,
) -> None:
    # Counted in Redis's own command statistics: the place of a request joining a queue of
    # 200 takes a few reads of the queues, as in a queue of 3 (walking it took one ZRANGE an
    # entry ahead).
    policy = QueuePolicy(priority=True, max_size=1000)
    reads: list[int] = []
    with redis_server.client() as admin:
        for pull in range(10, 210):
            if pull in (13, 209):
                admin.config_resetstat()
            await _enqueue(backend, pull, LEVELS[pull % 4], policy)
            if pull in (13, 209):
                stats = admin.info("commandstats")
                reads.append(sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0))
                                 for c in ("zrange", "zcount", "zrangebyscore", "zscore")))
    assert reads[0] <= 16 and reads[1] == reads[0], reads


async def test_an_enqueue_looks_at_a_few_of_this_replicas_waiters_on_its_key(
    backend: RedisBackend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each call of a key declares what a grant to this replica's oldest waiters on it touches:
    # the oldest whose callers still wait, those met whose callers left forgotten. Joining a
    # queue of 200 of this replica's waiters looks at a few of them, as joining one of 3 does
    # (each looked up in the list of every pending waiter, it was O(n²) in them).
    policy = QueuePolicy(max_size=1000)
    futures = {}
    for pull in range(10, 210):
        futures[pull] = backend.grants.expect(f"w-{pull}")
        await _enqueue(backend, pull, Priority.NORMAL, policy)
    for pull in (10, 11):  # their callers went away
        backend.grants.forget(f"w-{pull}", futures[pull])
    declared = backend._queued_names(KEY)
    assert [backend.keys.waiter(f"w-{pull}") in declared for pull in range(10, 16)] == [
        False, False, True, True, True, True]
    assert "w-10" not in backend._waiting_on[KEY] and "w-209" in backend._waiting_on[KEY]
    looked = [0]
    undone = waiting._undone

    def counted(found: list[asyncio.Future[Notice]]) -> bool:
        looked[0] += 1
        return undone(found)

    monkeypatch.setattr(waiting, "_undone", counted)
    futures[210] = backend.grants.expect("w-210")
    await _enqueue(backend, 210, Priority.NORMAL, policy)
    assert looked[0] <= 8, looked


async def test_the_queued_event_lists_the_first_in_line_and_counts_the_rest(
    backend: RedisBackend, redis_server: RedisServer,
) -> None:
    # 60 waiters queued (three priorities): the 61st request's queued event lists the 20
    # first in line, in the service order, and says 60 are ahead; reading them read 20 waiter
    # records, not 60 (the whole queue, read for the event before: O(n) an enqueue).
    config = EnhancedLockingConfig(enabled=True, backend="redis", redis_addr=redis_server.addr,
                                   priority_queue=True, deadlock_detection=False)
    locker = EnhancedLocker(backend, settings=lambda: config, events=EventBus(),
                            metrics=Metrics())
    policy = QueuePolicy.from_config(config)
    for pull in range(10, 70):
        await _enqueue(backend, pull, LEVELS[pull % 3], policy)
    seen: list[Event] = []
    locker.events.subscribe(lambda e: seen.append(e) if e.type == "queued" else None)
    with redis_server.client() as admin:
        admin.config_resetstat()
        waiting = asyncio.ensure_future(locker.acquire(request_for(
            pull=70, priority=Priority.LOW, wait=timedelta(minutes=1))))
        for _ in range(500):
            if seen:
                break
            await asyncio.sleep(0.01)
        records = int(admin.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))
    try:
        assert seen, "no queued event"
        details = seen[0].details
        order = await backend.queue(KEY, policy=policy)
        assert details["position"] == 61 and details["aheadCount"] == 60
        assert [w["id"] for w in details["ahead"]] == [w.id for w in order[:AHEAD_SHOWN]]
        assert [h["pull"] for h in details["holders"]] == [1]
        assert records <= AHEAD_SHOWN + 5, records
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
