"""A waiter's record in Redis that does not read (another Redis type under its key, a field
gone or not a number, keys that are not JSON) is passed over like a missing one: the queue is
still served, listed and graphed, and the call that meets it never fails. On one Redis and on a
Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest
from tests.support.backends import BACKEND_KINDS, BackendFactory
from tests.support.locks import candidate_for, lock_for, request_for

from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.backends.waiting import QueuePolicy, Status, Wait

REDIS = [pytest.param(name, marks=BACKEND_KINDS[name].marks, id=name)
         for name in ("redis", "redis-cluster")]

KEY = request_for(path="envs/queued", pull=1)

Spoil = Callable[[RedisBackend, str], Awaitable[object]]


async def _a_string(backend: RedisBackend, name: str) -> object:
    await backend.connection.client.delete(name)
    return await backend.connection.client.set(name, "not a waiter")


async def _keys_not_json(backend: RedisBackend, name: str) -> object:
    return await backend.connection.client.hset(name, "keys", "[not json")


async def _deadline_not_a_number(backend: RedisBackend, name: str) -> object:
    return await backend.connection.client.hset(name, "deadline", "soon")


async def _no_lock_data(backend: RedisBackend, name: str) -> object:
    fields = await backend.connection.client.hkeys(name)
    return await backend.connection.client.hdel(
        name, *[f for f in fields if str(f).startswith("d:")])


SPOILS: dict[str, Spoil] = {
    "a-string": _a_string,
    "keys-not-json": _keys_not_json,
    "deadline-not-a-number": _deadline_not_a_number,
    "no-lock-data": _no_lock_data,
}


@pytest.mark.parametrize("backend_factory", REDIS, indirect=True)
@pytest.mark.parametrize("spoil", list(SPOILS.values()), ids=list(SPOILS))
async def test_a_waiter_record_that_does_not_read_is_passed_over(
    backend_factory: BackendFactory, spoil: Spoil
) -> None:
    backend = backend_factory()
    assert isinstance(backend, RedisBackend)
    policy = QueuePolicy()
    assert (await backend.acquire(lock_for(KEY)))[0]
    waits = [Wait(id=f"w-{pull}", timeout=timedelta(seconds=30)) for pull in (2, 3)]
    good = backend.grants.expect(waits[1].id)
    for pull, wait in zip((2, 3), waits, strict=True):
        queued = await backend.acquire_or_enqueue(
            candidate_for(request_for(path="envs/queued", pull=pull)), ttl=None, wait=wait,
            policy=policy)
        assert queued.status is Status.QUEUED
    await spoil(backend, backend.keys.waiter(waits[0].id))

    assert [w.id for w in await backend.queue(KEY.key, policy=policy)] == [waits[1].id]
    [entry] = await backend.wait_graph(policy=policy)
    assert [w.id for w in entry.waiters] == [waits[1].id]
    handoff = await backend.release_and_handoff(KEY.key, owner=("acme/infra", 1), policy=policy)
    assert [g.waiter.id for g in handoff.granted] == [waits[1].id]
    notice = await good
    assert notice.granted and notice.locks[0].pull.num == 3
    assert await backend.queue(KEY.key, policy=policy) == []
