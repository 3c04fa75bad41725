"""The Lua hand-off serves waiters in exactly the order of the shared ``service_order``.

The scripts keep one FIFO queue per base priority and pick the best of the four heads at the
server's time; ``waiting.service_order`` is the rule written once in Python. Here hypothesis
builds queues of waiters of every priority and age (ages are set by moving a real waiter's
enqueue time back, in its record and its queue score; ages stay clear of the threshold's
boundaries so the milliseconds the test takes cannot change a level), then the lock is freed
again and again: each hand-off must grant the waiter ``service_order`` puts first.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.support.locks import candidate_for, request_for
from tests.support.redis_fixtures import redis_config
from tests.support.redis_server import RedisServer

from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.backends.waiting import QueuePolicy, Status, Wait, service_order
from enhanced_locking.types import Priority

pytestmark = pytest.mark.redis

THRESHOLD = timedelta(minutes=10)
PRIORITIES = list(Priority)

waiter_specs = st.lists(
    st.tuples(st.sampled_from(PRIORITIES), st.integers(0, 4), st.floats(0.1, 0.9)),
    min_size=1, max_size=8,
)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=waiter_specs, priority=st.booleans(), boost=st.integers(0, 3))
def test_hand_offs_follow_the_shared_service_order(
    redis_server: RedisServer, specs: list[tuple[Priority, int, float]], priority: bool,
    boost: int,
) -> None:
    with redis_server.client() as admin:
        admin.flushall()
    policy = QueuePolicy(priority=priority, starvation_threshold=THRESHOLD, max_boost=boost,
                         max_size=100)
    asyncio.run(_check(redis_server, specs, policy))


async def _check(server: RedisServer, specs: list[tuple[Priority, int, float]],
                 policy: QueuePolicy) -> None:
    backend = RedisBackend.from_config(redis_config(server), "enhanced")
    try:
        holder = candidate_for(request_for(pull=1000))
        assert (await backend.acquire_or_enqueue(holder, ttl=None, wait=None,
                                                 policy=policy)).status is Status.GRANTED
        threshold_ms = THRESHOLD // timedelta(milliseconds=1)
        with server.client() as admin:
            for n, (level, periods, fraction) in enumerate(specs, start=1):
                wait = Wait(id=f"w{n}", timeout=timedelta(hours=1))
                backend.grants.expect(wait.id)
                outcome = await backend.acquire_or_enqueue(
                    candidate_for(request_for(pull=n, priority=level)), ttl=None, wait=wait,
                    policy=policy)
                assert outcome.status is Status.QUEUED and outcome.waiter is not None
                age = int((periods + fraction) * threshold_ms)
                _age(admin, backend, outcome.waiter.id, level, age)
        expected = [w.id for w in service_order(
            await backend.queue(holder.key, policy=policy), now=await backend.now(),
            policy=policy)]
        served = []
        for _ in specs:
            handoff = await backend.release_and_handoff(holder.key, policy=policy)
            assert len(handoff.granted) == 1
            served.append(handoff.granted[0].waiter.id)
        assert served == expected
        assert [f"w{n}" for n in range(1, len(specs) + 1)] == sorted(
            served, key=lambda i: int(i[1:]))
    finally:
        await backend.close()


def _age(admin: redis.Redis, backend: RedisBackend, waiter_id: str, level: Priority,
         age_ms: int) -> None:
    """Move a waiter's enqueue time ``age_ms`` back: in its record and in its queue's score."""
    name = backend.keys.waiter(waiter_id)
    enq = int(admin.hget(name, "enq") or 0) - age_ms
    admin.hset(name, "enq", enq)
    queue = backend.keys.queue(request_for().key, level.level)
    members: list[bytes] = list(admin.zrange(queue, 0, -1))  # type: ignore[arg-type]
    member = next(m for m in members if m.endswith(f":{waiter_id}".encode()))
    admin.zadd(queue, {member: enq}, xx=True)
