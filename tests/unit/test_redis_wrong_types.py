"""The Redis store's own keys written over by something else (another Redis type, a counter
that is not a number) never make a call fail with a Redis error, never grant a key twice and
never stop the service of other keys. On one Redis and on a Redis Cluster.

* a key's fencing counter or one of its queues: the key is set aside like an unreadable lock
  (``LockUnreadable``, a 409 over HTTP) until a force-unlock repairs it;
* an index set (``held``, ``queued``, ``fenced``, a pull's): rebuilt from the namespace's keys
  the first time a call reads it, and the call answered as if nothing had happened;
* the liveness set, the enqueue counter, the incarnation: replaced by the call that meets them
  (the liveness set reads as "every replica alive" until then, and a replica not yet heard in
  the set a beat made anew counts as alive for as long: no waiter is lost by it);
* the answer a write keeps under its call id: taken as none, deleted, and the call runs as a
  first call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from tests.support.backends import BACKEND_KINDS, BackendFactory
from tests.support.locks import candidate_for, lock_for, request_for
from tests.support.unreadable import SECRET

from enhanced_locking.backends import redis_notify, redis_scripts, redis_store
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.backends.waiting import QueuePolicy, Status, Wait
from enhanced_locking.types import LockNotOwned, LockUnreadable

REDIS = [pytest.param(name, marks=BACKEND_KINDS[name].marks, id=name)
         for name in ("redis", "redis-cluster")]

KEY = request_for(path="envs/bad", pull=1)
GOOD = request_for(path="envs/good", pull=2)
OTHER = request_for(path="envs/bad", pull=3)

Write = Callable[[Any, str], Awaitable[object]]


async def _string(redis: Any, name: str) -> object:
    await redis.delete(name)
    return await redis.set(name, f"token={SECRET}")


async def _hash(redis: Any, name: str) -> object:
    await redis.delete(name)
    return await redis.hset(name, "token", SECRET)


async def _list(redis: Any, name: str) -> object:
    await redis.delete(name)
    return await redis.rpush(name, SECRET)


WRITES: dict[str, Write] = {"string": _string, "hash": _hash, "list": _list}


def _redis(backend_factory: BackendFactory) -> RedisBackend:
    return _redis_in(backend_factory, "enhanced")


def _redis_in(backend_factory: BackendFactory, namespace: str) -> RedisBackend:
    backend = backend_factory(namespace)
    assert isinstance(backend, RedisBackend)
    return backend


def _wait(seconds: float = 30) -> Wait:
    return Wait(id=f"w-{seconds}-{secrets.token_hex(4)}", timeout=timedelta(seconds=seconds))


async def _others_still_served(backend: RedisBackend) -> None:
    """Another key is granted, listed and released as always."""
    granted, lock = await backend.acquire(lock_for(GOOD))
    assert granted and lock.pull.num == 2
    assert GOOD.key in [held.key for held in await backend.list()]
    assert (await backend.release(GOOD.key, owner=("acme/infra", 2))) is not None


@pytest.mark.parametrize("backend_factory", REDIS, indirect=True)
@pytest.mark.parametrize("write", ["hash", "not-a-number"])
async def test_a_free_key_whose_fencing_counter_is_not_one_is_set_aside_until_force_unlocked(
    backend_factory: BackendFactory, write: str
) -> None:
    backend = _redis(backend_factory)
    redis = backend.connection.client
    assert (await backend.acquire(lock_for(KEY)))[0]
    assert await backend.release(KEY.key, owner=("acme/infra", 1)) is not None
    if write == "hash":
        await _hash(redis, backend.keys.fence(KEY.key))
    else:
        await redis.set(backend.keys.fence(KEY.key), f"{SECRET}")
    policy = QueuePolicy()
    for request in (KEY, OTHER):  # never granted, waiting or not, to anyone
        with pytest.raises(LockUnreadable) as caught:
            await backend.acquire(lock_for(request))
        assert caught.value.key == KEY.key and "fencing counter" in caught.value.found.reason
        assert SECRET not in str(caught.value) and SECRET not in caught.value.found.reason
        with pytest.raises(LockUnreadable):
            await backend.acquire_or_enqueue(candidate_for(request), ttl=None, wait=None,
                                             policy=policy)
    with pytest.raises(LockUnreadable):
        await backend.acquire_batch([candidate_for(request_for(path="envs/new", pull=3)),
                                     candidate_for(OTHER)], ttl=None, wait=None, policy=policy)
    assert await backend.get(request_for(path="envs/new", pull=3).key) is None, "all or nothing"
    # Set aside like an unreadable lock: every read says so, on this replica and another.
    with pytest.raises(LockUnreadable):
        await backend.get(KEY.key)
    assert [lock.key for lock in await backend.list()] == []
    assert [entry.key for entry in backend.unreadable.entries()] == [KEY.key]
    again = _redis(backend_factory)
    with pytest.raises(LockUnreadable):
        await again.get(KEY.key)
    with pytest.raises((LockUnreadable, LockNotOwned)):
        await backend.release(KEY.key, owner=("acme/infra", 1))
    assert await backend.release_by_pull("acme/infra", 1) == []
    await _others_still_served(backend)
    # A force-unlock repairs the counter: the next token is above every one handed out.
    before = await backend.now()
    await backend.force_unlock(KEY.key)
    assert KEY.key not in backend.unreadable
    granted, lock = await backend.acquire(lock_for(OTHER))
    assert granted and lock.fencing_token >= int(before.timestamp() * 1000) * 1000
    assert await redis.type(backend.keys.fence(KEY.key)) == "string"


@pytest.mark.parametrize("backend_factory", REDIS, indirect=True)
async def test_a_counter_written_over_under_a_held_key_stops_its_hand_off_not_its_release(
    backend_factory: BackendFactory,
) -> None:
    backend = _redis(backend_factory)
    assert (await backend.acquire(lock_for(KEY)))[0]
    wait = _wait()
    told = backend.grants.expect(wait.id)
    queued = await backend.acquire_or_enqueue(candidate_for(OTHER), ttl=None, wait=wait,
                                              policy=QueuePolicy())
    assert queued.status is Status.QUEUED
    await _string(backend.connection.client, backend.keys.fence(KEY.key))
    released = await backend.release_and_handoff(KEY.key, owner=("acme/infra", 1))
    assert released.released is not None and released.granted == ()  # nobody granted on it
    assert not told.done()
    with pytest.raises(LockUnreadable):
        await backend.get(KEY.key)
    assert [w.id for w in await backend.queue(KEY.key)] == [wait.id]  # still waiting, in place
    await _others_still_served(backend)
    handoff = await backend.force_unlock(KEY.key)
    notice = await asyncio.wait_for(told, 10)
    assert notice.granted and notice.locks[0].pull.num == 3
    assert [g.waiter.id for g in handoff.granted] in ([wait.id], [])


@pytest.mark.parametrize("backend_factory", REDIS, indirect=True)
@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("level", [0, 1, 3])
async def test_a_queue_of_another_type_refuses_waiting_on_its_key_until_force_unlocked(
    backend_factory: BackendFactory, write: str, level: int
) -> None:
    backend = _redis(backend_factory)
    assert (await backend.acquire(lock_for(KEY)))[0]
    await WRITES[write](backend.connection.client, backend.keys.queue(KEY.key, level))
    policy = QueuePolicy()
    # Not waiting: the truth (held by pull 1). Waiting: nobody can wait on it in order.
    granted, holder = await backend.acquire(lock_for(OTHER))
    assert not granted and holder.pull.num == 1
    with pytest.raises(LockUnreadable) as caught:
        await backend.acquire_or_enqueue(candidate_for(OTHER), ttl=None, wait=_wait(),
                                         policy=policy)
    assert "queue is not a sorted set" in caught.value.found.reason
    assert SECRET not in caught.value.found.reason
    with pytest.raises(LockUnreadable):
        await backend.queue(KEY.key)
    assert [lock.key for lock in await backend.list()] == [KEY.key]
    assert await backend.wait_graph() == []
    await _others_still_served(backend)
    # Its owner releases it as always, and the free key is granted without waiting.
    assert await backend.release(KEY.key, owner=("acme/infra", 1)) is not None
    assert (await backend.acquire(lock_for(OTHER)))[0]
    await backend.force_unlock(KEY.key)
    assert await backend.connection.client.type(backend.keys.queue(KEY.key, level)) == "none"
    assert KEY.key not in backend.unreadable
    assert (await backend.acquire(lock_for(KEY)))[0]
    queued = await backend.acquire_or_enqueue(candidate_for(OTHER), ttl=None, wait=_wait(),
                                              policy=policy)
    assert queued.status is Status.QUEUED
    assert [w.owner[1] for w in await backend.queue(KEY.key)] == [3]


INDEXES: dict[str, Callable[[RedisBackend], str]] = {
    "held": lambda b: b.keys.held,
    "queued": lambda b: b.keys.queued,
    "fenced": lambda b: b.keys.fenced,
    "pull": lambda b: b.keys.pull("acme/infra", 1),
}


@pytest.mark.parametrize("backend_factory", REDIS, indirect=True)
@pytest.mark.parametrize("index", list(INDEXES))
@pytest.mark.parametrize("write", ["string", "hash"])
async def test_an_index_of_another_type_is_rebuilt_and_every_call_answers_as_before(
    backend_factory: BackendFactory, index: str, write: str, caplog: pytest.LogCaptureFixture,
) -> None:
    backend = _redis(backend_factory)
    redis = backend.connection.client
    waiting = request_for(path="envs/waited", pull=1)
    assert (await backend.acquire(lock_for(KEY)))[0]
    assert (await backend.acquire(lock_for(waiting)))[0]
    wait = _wait()
    told = backend.grants.expect(wait.id)
    assert (await backend.acquire_or_enqueue(
        candidate_for(request_for(path="envs/waited", pull=3)), ttl=None, wait=wait,
        policy=QueuePolicy())).status is Status.QUEUED
    name = INDEXES[index](backend)
    await WRITES[write](redis, name)
    # A grant while the index is of another type: listed all the same after the rebuild.
    assert (await backend.acquire(lock_for(request_for(path="envs/late", pull=1))))[0]
    with caplog.at_level(logging.WARNING, logger="enhanced_locking.backends.redis_store"):
        assert [lock.key for lock in await backend.list()] == sorted(
            [KEY.key, waiting.key, request_for(path="envs/late", pull=1).key])
        assert sorted(lock.key for lock in await backend.list(repo="acme/infra", pull=1)) == \
            sorted([KEY.key, waiting.key, request_for(path="envs/late", pull=1).key])
        graph = await backend.wait_graph()
        assert [entry.key for entry in graph] == [waiting.key]
        _, tokens = await backend.export()
        assert set(tokens) >= {KEY.key, waiting.key}
        await _others_still_served(backend)
        released = await backend.release_by_pull("acme/infra", 1)
    assert sorted(lock.key for lock in released) == sorted(
        [KEY.key, waiting.key, request_for(path="envs/late", pull=1).key])
    notice = await asyncio.wait_for(told, 10)  # its waiter was served by the release
    assert notice.granted
    kind = await redis.type(name)
    assert kind in ("set", "none")
    rebuilt = [r.getMessage() for r in caplog.records if "rebuilt" in r.getMessage()]
    if index in ("held", "pull", "fenced", "queued"):
        assert any(name in message for message in rebuilt), caplog.text
    assert SECRET not in caplog.text


@pytest.mark.parametrize("backend_factory", REDIS, indirect=True)
@pytest.mark.parametrize("which", ["liveness", "seq", "incarnation"])
async def test_the_namespace_s_own_records_of_another_type_are_replaced_by_the_call(
    backend_factory: BackendFactory, which: str, caplog: pytest.LogCaptureFixture,
) -> None:
    backend = _redis(backend_factory)
    redis = backend.connection.client
    granted, first = await backend.acquire(lock_for(KEY))
    assert granted
    name = {"liveness": backend.keys.liveness, "seq": backend.keys.seq,
            "incarnation": backend.keys.incarnation}[which]
    await _string(redis, name)
    with caplog.at_level(logging.WARNING, logger="enhanced_locking.backends.redis_store"):
        wait = _wait()
        told = backend.grants.expect(wait.id)
        queued = await backend.acquire_or_enqueue(candidate_for(OTHER), ttl=None, wait=wait,
                                                  policy=QueuePolicy())
        assert queued.status is Status.QUEUED
        handoff = await backend.release_and_handoff(KEY.key, owner=("acme/infra", 1))
        notice = await asyncio.wait_for(told, 10)
    assert notice.granted and notice.locks[0].fencing_token > first.fencing_token
    assert [g.waiter.id for g in handoff.granted] == [wait.id]
    await _others_still_served(backend)
    expected = {"liveness": "zset", "seq": "string", "incarnation": "hash"}[which]
    assert await redis.type(name) == expected
    if which == "incarnation":
        assert "incarnation record" in caplog.text
    assert SECRET not in caplog.text


@pytest.mark.parametrize("backend_factory", REDIS, indirect=True)
@pytest.mark.parametrize(("field", "value"), [("base", "x"), ("base", None), ("until", "soon")])
async def test_an_incarnation_hash_whose_numbers_do_not_read_is_replaced_by_the_call(
    backend_factory: BackendFactory, field: str, value: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The incarnation's base (the first token of new counters) or until (the quarantine's
    # end) written over with what is not a whole number failed every grant with a Lua error.
    backend = _redis(backend_factory)
    redis = backend.connection.client
    granted, first = await backend.acquire(lock_for(KEY))
    assert granted
    name = backend.keys.incarnation
    if value is None:
        await redis.hdel(name, field)
    else:
        await redis.hset(name, field, value)
    with caplog.at_level(logging.WARNING, logger="enhanced_locking.backends.redis_store"):
        assert (await backend.release(KEY.key, owner=("acme/infra", 1))) is not None
        granted, again = await backend.acquire(lock_for(OTHER))
    assert granted and again.fencing_token > first.fencing_token
    await _others_still_served(backend)
    assert "incarnation record" in caplog.text and "not a whole number" in caplog.text
    for number in await redis.hmget(name, ["base", "until"]):
        assert str(number).isdigit()


LIVENESS_CASES = [(write, mended) for write in ("string", "hash") for mended in (False, True)]
"""The liveness set written over as a string or a hash; then mended by a beat or not."""


@pytest.mark.parametrize("backend_factory", REDIS, indirect=True)
async def test_a_liveness_set_written_over_loses_no_waiter_and_a_dead_one_s_grant_lapses(
    backend_factory: BackendFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Another Redis type where the liveness set goes reads as "every replica alive" until the
    # next beat replaces it, and a replica that has not beaten since counts as alive for one
    # liveness span after it (``mended``): a live replica's waiter is granted in its turn
    # (never dropped as if its replica were gone), and a dead replica's waiter ahead of it is
    # granted a claim nobody confirms, which lapses; only then the next waiter gets the key,
    # never both at once. The replicas beat only when the test says (their beat every second
    # would replace the set at any moment).
    #
    # Each case waits out a claim (CLAIM_MS on Redis's clock); the cases (LIVENESS_CASES) run
    # side by side, each in a namespace of its own (its own liveness set, queues and locks),
    # so they wait it out together. A case that fails names itself.
    monkeypatch.setattr(redis_notify, "WAITER_HEARTBEAT_SECONDS", 3600.0)
    async with asyncio.TaskGroup() as cases:
        for write, mended in LIVENESS_CASES:
            cases.create_task(_liveness_case(backend_factory, write, mended))


async def _liveness_case(backend_factory: BackendFactory, write: str, mended: bool) -> None:
    name = f"written over as a {write}, " + ("mended by a beat" if mended else "unmended")
    try:
        await _liveness_written_over(backend_factory, write, mended,
                                     namespace=f"liveness-{write}-{int(mended)}")
    except Exception as error:
        raise AssertionError(f"the liveness set {name}: {error}") from error


async def _liveness_written_over(backend_factory: BackendFactory, write: str, mended: bool, *,
                                 namespace: str) -> None:
    """One case of the test above, on backends of ``namespace``."""
    holder, dead, alive = (_redis_in(backend_factory, namespace) for _ in range(3))
    redis = holder.connection.client
    granted, first = await holder.acquire(lock_for(KEY))
    assert granted
    dead_wait, alive_wait = _wait(), _wait()
    told = alive.grants.expect(alive_wait.id)
    for backend, wait, pull in ((dead, dead_wait, 3), (alive, alive_wait, 4)):
        queued = await backend.acquire_or_enqueue(
            candidate_for(request_for(path="envs/bad", pull=pull)), ttl=None, wait=wait,
            policy=QueuePolicy())
        assert queued.status is Status.QUEUED
    # Each waiting replica's first beat runs in a task of its own: let both land before the
    # set is written over (a beat after it would replace the set with that replica alone).
    beats = asyncio.get_running_loop().time() + 10
    while await redis.zscore(holder.keys.liveness, dead.replica_id) is None or \
            await redis.zscore(holder.keys.liveness, alive.replica_id) is None:
        assert asyncio.get_running_loop().time() < beats, "a waiting replica never beat"
        await asyncio.sleep(0.01)
    await dead._listener.close()  # gone without a word: no confirmation, no beat
    await WRITES[write](redis, holder.keys.liveness)
    if mended:  # the live replica beats first: the set is made anew without the dead one
        await alive._heartbeat()
        assert await redis.zscore(holder.keys.liveness, dead.replica_id) is None
    handoff = await holder.release_and_handoff(KEY.key, owner=("acme/infra", 1))
    assert [g.waiter.id for g in handoff.granted] == [dead_wait.id]  # alive, as far as known
    # the release does not beat
    assert await redis.type(holder.keys.liveness) == ("zset" if mended else write)
    assert [w.id for w in await holder.queue(KEY.key)] == [alive_wait.id]  # kept its place
    claimed = await holder.get(KEY.key)
    assert claimed is not None and claimed.pull.num == 3
    deadline = asyncio.get_running_loop().time() + redis_scripts.CLAIM_MS / 1000 + 10
    while not (await holder.expire(KEY.key)).granted:
        # The dead replica's claim, or nobody once it lapsed and before this sweep's next
        # call hands the key on: never the live waiter's pull before its grant.
        current = await holder.get(KEY.key)
        assert current is None or current.pull.num == 3, "one holder at a time"
        assert not told.done()
        assert asyncio.get_running_loop().time() < deadline, "the claim never lapsed"
        if mended:  # the live replica goes on beating, as it would every second
            await alive._heartbeat()
        await asyncio.sleep(0.2)
    notice = await asyncio.wait_for(told, 10)
    assert notice.granted and notice.locks[0].pull.num == 4
    assert notice.locks[0].fencing_token > claimed.fencing_token > first.fencing_token
    await alive._heartbeat()  # the next beat puts the set back
    assert await redis.type(holder.keys.liveness) == "zset"
    await _others_still_served(holder)


ANSWER_WRITES: dict[str, Write] = {  # a string: not JSON
    **WRITES, "json-object": lambda redis, name: redis.set(name, f'{{"token": "{SECRET}"}}')}


@pytest.mark.parametrize("backend_factory", REDIS, indirect=True)
@pytest.mark.parametrize("write", list(ANSWER_WRITES))
async def test_a_call_s_kept_answer_of_another_type_is_taken_as_none_and_replaced(
    backend_factory: BackendFactory, write: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What stands under a call's id before the call runs is not an answer it gave: the call
    # runs as a first call and keeps its own answer there. (Call ids are random; the test
    # fixes them, as tests/integration/test_redis_retried_calls.py does.)
    backend = _redis(backend_factory)
    redis = backend.connection.client

    async def spoiled(call_id: str) -> str:
        monkeypatch.setattr(redis_store, "_new_call_id", lambda: call_id)
        name = backend.keys.op(call_id)
        await ANSWER_WRITES[write](redis, name)
        return name

    async def kept(name: str) -> object:
        text = await redis.get(name)
        assert text is not None
        return json.loads(text)

    with caplog.at_level(logging.WARNING, logger="enhanced_locking.backends.redis_store"):
        name = await spoiled("00000000000000b1")  # a grant (the lean path)
        granted, first = await backend.acquire(lock_for(KEY))
        assert granted and first.pull.num == 1
        assert isinstance(await kept(name), list)
        name = await spoiled("00000000000000b2")  # a refusal (the full path)
        granted, holder = await backend.acquire(lock_for(OTHER))
        assert not granted and holder == first
        assert isinstance(await kept(name), list)
        name = await spoiled("00000000000000b3")  # a release
        assert await backend.release(KEY.key, owner=("acme/infra", 1)) == first
        assert isinstance(await kept(name), list)
    monkeypatch.undo()
    assert await backend.get(KEY.key) is None
    await _others_still_served(backend)
    assert caplog.text.count("not an answer") == 3
    assert SECRET not in caplog.text
