"""A concurrency limit lowered below what a queued batch asks refuses it (``limited``), even
when the store does not answer as the new rules apply (the wake that refuses it is tried
again until the store answers), and when the batch is queued, under the rules its request
read, after every replica's wake read the queues (the replica that queued it reads the rules
again). On a real Redis (stopped and started again, its writes kept; two replicas on one).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from tests.support.leases import until
from tests.support.locks import request_for
from tests.support.queues import rig_for
from tests.support.redis_fixtures import ServerMaker, redis_config
from tests.support.redis_server import RedisServer

from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.policies import ConcurrencyLimit, KeyPattern, PolicyRules
from enhanced_locking.types import BatchItem, BatchLockRequest, LockRequest, Reason

pytestmark = pytest.mark.redis

WAIT = timedelta(seconds=90)
GROUP = KeyPattern(path_prefix="g")


def ask(pull: int, path: str) -> LockRequest:
    return request_for(pull=pull, path=path)


def limit(value: int) -> PolicyRules:
    return PolicyRules(concurrency=[ConcurrencyLimit(name="g", match=GROUP, limit=value)])


async def test_a_limit_lowered_while_the_store_is_down_refuses_the_queued_batch_once_back(
        redis_servers: ServerMaker, caplog: pytest.LogCaptureFixture) -> None:
    """Pull 1's batch of three keys of group g (limit 3) waits for pull 9's hold of one of
    them. Redis stops, and the limit is lowered to 2: the wake that would refuse the batch
    finds no store. Before, that wake was not made again, and the batch waited out its whole
    wait (``timeout``) though it could never be granted; now it is made again until Redis
    answers, and the batch is answered ``limited``, naming the group and its new limit."""
    server = redis_servers(persistence="aof")
    rig = rig_for(RedisBackend.from_config(redis_config(server), "enhanced"),
                  policies=limit(3))
    try:
        rig.locker.rules.changed(limit(3))
        requests = [ask(1, f"g/{i}") for i in range(3)]
        assert (await rig.locker.acquire(ask(9, "g/0"))).acquired
        task = rig.spawn(rig.locker.acquire_batch(BatchLockRequest(
            locks=[BatchItem(project=r.project) for r in requests], pull=requests[0].pull,
            wait=WAIT)))
        assert await until(lambda: "queued" in rig.types()), rig.types()  # Redis answered
        assert not task.done(), task.result()

        server.stop()
        rig.set(policies=limit(2))
        rig.locker.rules.changed(limit(2))
        assert await until(lambda: any(  # the look runs, and its wake fails: nothing answers
            "serving the queues after a rule change failed" in record.getMessage()
            for record in caplog.records))
        assert not task.done(), task.result()
        server.start()
        # Answered well before its wait runs out (which would answer it ``timeout``).
        answer = await asyncio.wait_for(task, WAIT.total_seconds() / 2)
        assert answer.reason is Reason.LIMITED, answer
        assert answer.error is not None and "group g," in answer.error, answer
        assert "limit is 2" in answer.error, answer
        assert [await rig.locker.queue(r.key) for r in requests] == [[], [], []]
        assert [lock.pull.num for lock in await rig.locker.list()] == [9]
    finally:
        await rig.close()
        await rig.locker.backend.close()


async def test_a_batch_queued_under_the_old_limit_after_the_wakes_read_the_queues_is_refused(
        redis_server: RedisServer) -> None:
    """Two replicas on one Redis, both on limit 3 for group g. Replica 2 takes pull 1's batch
    of three keys of g (pull 9 holds one) and reads the rules; its call is slow on its way to
    Redis, and meanwhile the limit is lowered to 2 on both replicas, each waking its queues:
    neither wake finds the batch, not yet queued. It is queued then, under the rules the
    request read. Before, nothing refused it: it waited out its whole wait (``timeout``) though
    it could never be granted; now the replica that queued it reads the rules in force once
    the store has queued it, and answers it ``limited``, out of every queue."""
    first = rig_for(RedisBackend.from_config(redis_config(redis_server), "enhanced"),
                    policies=limit(3))
    second_backend = RedisBackend.from_config(redis_config(redis_server), "enhanced")
    second = rig_for(second_backend, policies=limit(3))
    reached, go = asyncio.Event(), asyncio.Event()
    queue_batch = second_backend.acquire_batch

    async def slow_on_its_way(*args: Any, **kwargs: Any) -> Any:
        reached.set()
        await go.wait()  # the request on its way to Redis, as over a slow network
        return await queue_batch(*args, **kwargs)

    try:
        requests = [ask(1, f"g/{i}") for i in range(3)]
        assert (await first.locker.acquire(ask(9, "g/0"))).acquired
        second_backend.acquire_batch = slow_on_its_way  # type: ignore[method-assign]
        task = second.spawn(second.locker.acquire_batch(BatchLockRequest(
            locks=[BatchItem(project=r.project) for r in requests], pull=requests[0].pull,
            wait=WAIT)))
        async with asyncio.timeout(30):
            await reached.wait()  # the request read limit 3
        for rig in (first, second):
            rig.set(policies=limit(2))
            await rig.locker.wake()  # nothing queued yet
        go.set()

        # Answered well before its wait runs out (which would answer it ``timeout``).
        answer = await asyncio.wait_for(task, WAIT.total_seconds() / 2)
        assert answer.reason is Reason.LIMITED, answer
        assert answer.error is not None and "group g," in answer.error, answer
        assert "limit is 2" in answer.error, answer
        assert [await first.locker.queue(r.key) for r in requests] == [[], [], []]
        assert [lock.pull.num for lock in await first.locker.list()] == [9]
    finally:
        for rig in (first, second):
            await rig.close()
            await rig.locker.backend.close()
