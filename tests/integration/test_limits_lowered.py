"""A concurrency limit lowered below what a queued batch asks refuses it (``limited``), even
when the store does not answer as the new rules apply: the wake that refuses it is tried
again until the store answers. On a real Redis (stopped and started again, its writes kept).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from tests.support.leases import until
from tests.support.locks import request_for
from tests.support.queues import rig_for
from tests.support.redis_fixtures import ServerMaker, redis_config

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
