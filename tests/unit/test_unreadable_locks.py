"""A stored lock that cannot be read is set aside, never granted over, and cleared by a
force-unlock: one table of behaviours, run against every store that keeps bytes (the SQLite
file, Redis, Redis Cluster, etcd) and Atlantis's Redis layout. The memory store keeps objects,
not bytes: it has nothing to spoil. On Redis the rows also spoil the store's own structures
(another Redis type at the lock's key, a shared holder's record that does not decode): its
scripts read them, and must answer them like any other unreadable lock, never with an error.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from tests.support.backends import BACKEND_KINDS, BackendFactory
from tests.support.locks import candidate_for, lock_for, request_for
from tests.support.redis_fixtures import redis_config
from tests.support.redis_server import RedisServer
from tests.support.unreadable import (
    REDIS_SPOILERS,
    SECRET,
    SPOILED,
    Spoiler,
    data_spoiler,
)

from enhanced_locking.backends import Backend
from enhanced_locking.backends.atlantis_redis import KEY_PREFIX, AtlantisRedisBackend
from enhanced_locking.backends.base import QueueBackend
from enhanced_locking.backends.waiting import QueuePolicy, Status, Wait
from enhanced_locking.policies import ConcurrencyLimit, PolicyRules
from enhanced_locking.types import LockNotOwned, LockUnreadable, UnreadableLock

REDIS = ("redis", "redis-cluster")


def _rows(data: list[tuple[str, str]]) -> list[Any]:
    """(store, spoiler) rows: each store with its JSON replaced by each of ``data``, and the
    Redis stores with each of their own structures spoiled."""
    rows = []
    for kind in ("boltdb", "redis", "redis-cluster", "etcd"):
        spoilers = [data_spoiler(name, raw) for name, raw in data]
        if kind in REDIS:
            spoilers += REDIS_SPOILERS
        rows += [pytest.param(kind, s, marks=BACKEND_KINDS[kind].marks, id=f"{kind}-{s.name}")
                 for s in spoilers]
    return rows


def spoiled_by(data: list[tuple[str, str]]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(("backend_factory", "spoiler"), _rows(data),
                                   indirect=["backend_factory"])

BAD = request_for(path="envs/bad", pull=1)
GOOD = request_for(path="envs/good", pull=1)
OTHER = request_for(path="envs/bad", pull=2)


async def _spoiled(backend: Backend, spoiler: Spoiler) -> tuple[int, str, int]:
    """``BAD`` held (in the spoiler's mode) and then spoiled, ``GOOD`` held (both by pull 1);
    BAD's token before, its key, and the size of the bytes the store reports for it."""
    granted, bad = await backend.acquire(lock_for(BAD).model_copy(update={"mode": spoiler.mode}))
    assert granted and (await backend.acquire(lock_for(GOOD)))[0]
    size = await spoiler.run(backend, BAD.key)
    return bad.fencing_token, BAD.key, size


def _safe(entry: UnreadableLock, size: int) -> None:
    assert entry.key == BAD.key and entry.reason and entry.size == size
    assert len(entry.digest) == 16
    assert SECRET not in entry.model_dump_json() and SECRET not in entry.reason


@spoiled_by(SPOILED)
async def test_a_list_skips_an_unreadable_lock_and_sets_it_aside(
    backend_factory: BackendFactory, spoiler: Spoiler
) -> None:
    backend = backend_factory()
    _, key, size = await _spoiled(backend, spoiler)
    assert [lock.key for lock in await backend.list()] == [GOOD.key]
    assert [lock.key for lock in await backend.list(repo="acme/infra", pull=1)] == [GOOD.key]
    [entry] = backend.unreadable.entries()
    _safe(entry, size)
    assert key in backend.unreadable


@spoiled_by(SPOILED[:1])
async def test_reading_the_key_says_it_is_unreadable_without_its_content(
    backend_factory: BackendFactory, spoiler: Spoiler
) -> None:
    backend = backend_factory()
    _, key, size = await _spoiled(backend, spoiler)
    with pytest.raises(LockUnreadable) as caught:
        await backend.get(key)
    assert caught.value.key == key and SECRET not in str(caught.value)
    _safe(caught.value.found, size)
    assert [e.key for e in backend.unreadable.entries()] == [key]


@spoiled_by(SPOILED[2:3])
async def test_nothing_is_granted_over_an_unreadable_lock(
    backend_factory: BackendFactory, spoiler: Spoiler
) -> None:
    backend = backend_factory()
    await _spoiled(backend, spoiler)
    assert isinstance(backend, QueueBackend)
    for request in (OTHER, BAD):  # another pull, and the pull the columns say it was
        with pytest.raises(LockUnreadable):
            await backend.acquire(lock_for(request))
        with pytest.raises(LockUnreadable):
            await backend.acquire_or_enqueue(candidate_for(request), ttl=None, wait=None,
                                             policy=QueuePolicy())
    with pytest.raises(LockUnreadable):
        await backend.acquire_batch([candidate_for(request_for(path="envs/x", pull=2)),
                                     candidate_for(OTHER)], ttl=None, wait=None,
                                    policy=QueuePolicy())
    assert await backend.get(request_for(path="envs/x", pull=2).key) is None, "all or nothing"


@spoiled_by(SPOILED[:1])
async def test_a_release_by_another_pull_cannot_tell_and_frees_nothing(
    backend_factory: BackendFactory, spoiler: Spoiler
) -> None:
    backend = backend_factory()
    _, key, _ = await _spoiled(backend, spoiler)
    with pytest.raises((LockUnreadable, LockNotOwned)):
        await backend.release(key, owner=("acme/infra", 2))
    assert key in backend.unreadable
    with pytest.raises(LockUnreadable):
        await backend.get(key)


@spoiled_by(SPOILED[:1])
async def test_a_release_by_pull_frees_the_readable_locks_and_answers(
    backend_factory: BackendFactory, spoiler: Spoiler
) -> None:
    backend = backend_factory()
    _, key, _ = await _spoiled(backend, spoiler)
    released = await backend.release_by_pull("acme/infra", 1)
    assert [lock.key for lock in released] == [GOOD.key]
    assert await backend.get(GOOD.key) is None
    if backend_factory.kind in REDIS and spoiler.owner_kept:
        # The Redis hash keeps its owner beside the JSON: the pull's release took it too.
        assert await backend.get(key) is None and key not in backend.unreadable
    else:
        with pytest.raises(LockUnreadable):
            await backend.get(key)


@spoiled_by(SPOILED[1:2])
async def test_a_force_unlock_clears_it_and_the_next_grant_has_a_higher_token(
    backend_factory: BackendFactory, spoiler: Spoiler
) -> None:
    backend = backend_factory()
    token, key, _ = await _spoiled(backend, spoiler)
    assert isinstance(backend, QueueBackend)
    with pytest.raises(LockUnreadable):
        await backend.get(key)
    told: list[tuple[str, bool]] = []
    backend.unreadable.listen(lambda entry, found: told.append((entry.key, found)))
    handoff = await backend.force_unlock(key)
    assert handoff.released is None
    assert key not in backend.unreadable and told == [(key, False)]
    assert await backend.get(key) is None
    granted, lock = await backend.acquire(lock_for(OTHER))
    assert granted and lock.fencing_token > token


@spoiled_by(SPOILED[:1])
async def test_a_force_unlock_hands_the_key_to_its_next_waiter(
    backend_factory: BackendFactory, spoiler: Spoiler
) -> None:
    backend = backend_factory()
    assert isinstance(backend, QueueBackend)
    # Queued behind a readable lock, which is then spoiled under the waiter.
    assert (await backend.acquire(lock_for(BAD).model_copy(update={"mode": spoiler.mode})))[0]
    wait = Wait(id="w-1", timeout=timedelta(seconds=30))
    future = backend.grants.expect(wait.id)
    queued = await backend.acquire_or_enqueue(candidate_for(OTHER), ttl=None, wait=wait,
                                              policy=QueuePolicy())
    assert queued.status is Status.QUEUED
    await spoiler.run(backend, BAD.key)
    handoff = await backend.force_unlock(BAD.key)
    notice = await future
    assert notice.granted and notice.locks[0].pull.num == 2
    assert [g.waiter.id for g in handoff.granted] in ([wait.id], [])  # told by the store
    assert (await backend.get(BAD.key)) is not None


@spoiled_by(SPOILED[:1])
async def test_a_batch_waiter_on_an_unreadable_key_holds_up_no_other_keys_calls(
    backend_factory: BackendFactory, spoiler: Spoiler
) -> None:
    backend = backend_factory()
    assert isinstance(backend, QueueBackend)
    policy = QueuePolicy()
    # Pull 2 waits for GOOD and BAD together, both held by pull 1; BAD is spoiled under it.
    assert (await backend.acquire(lock_for(BAD).model_copy(update={"mode": spoiler.mode})))[0]
    granted, good = await backend.acquire(lock_for(GOOD))
    assert granted
    wait = Wait(id="w-batch", timeout=timedelta(seconds=30))
    queued = await backend.acquire_batch(
        [candidate_for(request_for(path="envs/good", pull=2)), candidate_for(OTHER)],
        ttl=None, wait=wait, policy=policy)
    assert queued.status is Status.QUEUED
    await spoiler.run(backend, BAD.key)
    # Pull 1 releases GOOD: the waiter cannot have BAD, so it keeps its place; the release
    # is GOOD's, whatever is stored under another key of the waiter.
    handoff = await backend.release_and_handoff(GOOD.key, owner=good.owner, policy=policy)
    assert handoff.released is not None and handoff.released.key == GOOD.key
    assert handoff.granted == ()
    assert [w.id for w in await backend.queue(GOOD.key, policy=policy)] == [wait.id]
    assert (await backend.wake(policy=policy)).granted == ()
    # The expiry timer of GOOD and another acquire of it are GOOD's own too.
    assert (await backend.expire(GOOD.key, policy=policy)).released is None
    third = await backend.acquire_or_enqueue(
        candidate_for(request_for(path="envs/good", pull=3)), ttl=None, wait=None,
        policy=policy)
    assert third.status in (Status.GRANTED, Status.HELD)
    # With a concurrency limit every queue is walked at once: the same.
    limited = QueuePolicy(rules=PolicyRules(concurrency=[ConcurrencyLimit(name="all", limit=9)]))
    assert (await backend.wake(policy=limited)).granted == ()
    assert [w.id for w in await backend.queue(GOOD.key, policy=limited)] == [wait.id]


@spoiled_by(SPOILED[:1])
async def test_a_new_backend_on_the_same_store_finds_it_on_its_first_scan(
    backend_factory: BackendFactory, spoiler: Spoiler
) -> None:
    first = backend_factory()
    _, key, _ = await _spoiled(first, spoiler)
    again = backend_factory()
    locks, _ = await again.export()
    assert [lock.key for lock in locks] == [GOOD.key]
    assert [entry.key for entry in again.unreadable.entries()] == [key]


@spoiled_by(SPOILED[:1])
async def test_a_full_scan_forgets_keys_repaired_elsewhere(
    backend_factory: BackendFactory, spoiler: Spoiler
) -> None:
    backend = backend_factory()
    _, key, _ = await _spoiled(backend, spoiler)
    await backend.list()
    assert key in backend.unreadable
    other = backend_factory()  # another replica (or a person) clears it
    assert isinstance(other, QueueBackend)
    await other.force_unlock(key)
    await backend.list()
    assert key not in backend.unreadable


@pytest.mark.redis
async def test_a_foreign_value_under_pr_in_atlantis_layout_is_set_aside(
    redis_server: RedisServer,
) -> None:
    legacy = AtlantisRedisBackend.from_config(redis_config(redis_server), "legacy")
    client = legacy.connection.client
    try:
        assert (await legacy.acquire(lock_for(GOOD, backend="legacy")))[0]
        await client.set(KEY_PREFIX + BAD.key, f"session={SECRET}")
        await client.hset(KEY_PREFIX + "acme/infra/envs/hash/default/prod", "f", SECRET)
        assert [lock.key for lock in await legacy.list()] == [GOOD.key]
        assert sorted(e.key for e in legacy.unreadable.entries()) == [
            "acme/infra/envs/bad/default/prod", "acme/infra/envs/hash/default/prod"]
        assert all(SECRET not in e.model_dump_json() for e in legacy.unreadable.entries())
        for key in (BAD.key, "acme/infra/envs/hash/default/prod"):
            with pytest.raises(LockUnreadable):
                await legacy.get(key)
            with pytest.raises(LockUnreadable):
                await legacy.acquire(lock_for(
                    request_for(path="envs/" + key.split("/")[3], pull=3), backend="legacy"))
            with pytest.raises(LockUnreadable):
                await legacy.release(key, owner=("acme/infra", 3))
        assert [lock.key for lock in await legacy.release_by_pull("acme/infra", 1)] == [GOOD.key]
        for key in (BAD.key, "acme/infra/envs/hash/default/prod"):
            assert await legacy.release(key) is None  # a force-unlock: deleted, entry gone
            assert key not in legacy.unreadable and await client.exists(KEY_PREFIX + key) == 0
        assert (await legacy.acquire(lock_for(OTHER, backend="legacy")))[0]
    finally:
        await legacy.close()
