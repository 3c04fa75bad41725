"""A key's token floor in etcd (``fence/{key}``) written over with something that is not a
whole number (a hand edit, another program) sets that key aside, as a fencing counter written
over does on Redis (``docs/03-redis.md``, "Keys written over by something else"): nothing is
granted on it (``LockUnreadable``, never a token below one handed out), every other key is
served, its holder releases it as always while its waiters keep their places, an export names
it and carries the clock's floor for it, and a force-unlock restarts the floor from the clock,
above every token handed out for the key. Before, the floor's ``int()`` raised a bare
``ValueError``: the key's acquire failed with it, and so did every export of the store.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from tests.support.locks import candidate_for, lock_for, request_for
from tests.support.unreadable import SECRET

from enhanced_locking.backends.etcd_store import EtcdBackend
from enhanced_locking.backends.waiting import QueuePolicy, Status, Wait
from enhanced_locking.types import LockUnreadable

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(120)]

BAD = request_for(path="envs/bad", pull=1)
GOOD = request_for(path="envs/good", pull=1)
POLICY = QueuePolicy()
WRITTEN_OVER = [b"not a number " + SECRET.encode(), b"-5", b"12.5", b""]


async def _spoil_floor(backend: EtcdBackend, key: str, raw: bytes) -> None:
    etcd = await backend.connection.client()
    assert etcd.kv is not None
    assert (await etcd.kv.get(backend.fence_key(key))).kvs, f"{key} has no floor yet"
    await etcd.kv.put(backend.fence_key(key), raw)


@pytest.mark.parametrize("raw", WRITTEN_OVER, ids=["text", "negative", "decimal", "empty"])
async def test_a_token_floor_written_over_sets_its_key_aside_until_a_force_unlock(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend], raw: bytes,
) -> None:
    a, b = etcd_replicas
    first = await a.acquire_or_enqueue(candidate_for(BAD), ttl=None, wait=None, policy=POLICY)
    assert first.status is Status.GRANTED
    given = first.locks[0].fencing_token
    assert (await a.release_and_handoff(BAD.key, owner=("acme/infra", 1))).released is not None
    await _spoil_floor(a, BAD.key, raw)
    before_ms = int(time.time() * 1000)

    # The key itself: refused as unreadable, waiting or not, on either replica.
    for backend in (a, b, a):
        for wait in (None, Wait(id=f"w-{id(backend)}", timeout=timedelta(seconds=30))):
            with pytest.raises(LockUnreadable) as refused:
                await backend.acquire_or_enqueue(
                    candidate_for(request_for(path="envs/bad", pull=2)), ttl=None, wait=wait,
                    policy=POLICY)
            assert refused.value.found.key == BAD.key
            assert "token floor" in refused.value.found.reason
            assert "force-unlock" in str(refused.value)
            assert SECRET not in str(refused.value) + refused.value.found.reason
    with pytest.raises(LockUnreadable):
        await b.acquire_batch([candidate_for(request_for(path="envs/new", pull=2)),
                               candidate_for(request_for(path="envs/bad", pull=2))],
                              ttl=None, wait=None, policy=POLICY)
    assert await b.get(request_for(path="envs/new").key) is None, "a refused batch holds nothing"
    with pytest.raises(LockUnreadable):
        await a.acquire(lock_for(request_for(path="envs/bad", pull=2)))
    # Every other key is served.
    good = await b.acquire_or_enqueue(candidate_for(GOOD), ttl=None, wait=None, policy=POLICY)
    assert good.status is Status.GRANTED

    # An export names the key with the clock's floor (as Redis's does), never failing.
    locks, tokens = await b.export()
    assert [lock.key for lock in locks] == [GOOD.key]
    with pytest.raises(LockUnreadable):
        await a.get(BAD.key)
    assert tokens[BAD.key] >= before_ms * 1000 > given
    assert tokens[GOOD.key] >= good.locks[0].fencing_token

    # A force-unlock restarts the floor from the clock: the next grant is above every token.
    assert (await b.force_unlock(BAD.key)).released is None
    again = await a.acquire_or_enqueue(candidate_for(request_for(path="envs/bad", pull=2)),
                                       ttl=None, wait=None, policy=POLICY)
    assert again.status is Status.GRANTED
    assert again.locks[0].fencing_token >= before_ms * 1000 > given
    assert again.locks[0].fencing_token > tokens[GOOD.key]
    after = await b.acquire_or_enqueue(candidate_for(request_for(path="envs/bad", pull=3)),
                                       ttl=None, wait=None, policy=POLICY)
    assert after.status is Status.HELD


async def test_a_held_key_whose_floor_is_written_over_is_released_and_its_waiter_waits(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    a, b = etcd_replicas
    assert (await a.acquire_or_enqueue(candidate_for(BAD), ttl=None, wait=None, policy=POLICY)
            ).status is Status.GRANTED
    wait = Wait(id="w-behind", timeout=timedelta(seconds=60))
    queued = await b.acquire_or_enqueue(candidate_for(request_for(path="envs/bad", pull=2)),
                                        ttl=None, wait=wait, policy=POLICY)
    assert queued.status is Status.QUEUED
    await _spoil_floor(a, BAD.key, b"garbage")

    # The holder releases as always; its waiter is not granted and keeps its place.
    handoff = await a.release_and_handoff(BAD.key, owner=("acme/infra", 1), policy=POLICY)
    assert handoff.released is not None and handoff.granted == ()
    assert [w.id for w in await b.queue(BAD.key, policy=POLICY)] == [wait.id]
    with pytest.raises(LockUnreadable):  # free now: read as set aside, as on Redis
        await b.get(BAD.key)
    # Another key's steps go on.
    assert (await b.acquire_or_enqueue(candidate_for(GOOD), ttl=None, wait=None, policy=POLICY)
            ).status is Status.GRANTED

    # A force-unlock repairs the floor and serves the waiter, above the first holder's token.
    before_ms = int(time.time() * 1000)
    served = await a.force_unlock(BAD.key, policy=POLICY)
    [grant] = served.granted
    assert grant.waiter.id == wait.id
    assert grant.locks[0].fencing_token >= before_ms * 1000


async def test_an_adopted_counter_over_a_floor_written_over_starts_from_the_clock(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    a, _ = etcd_replicas
    assert (await a.acquire_or_enqueue(candidate_for(BAD), ttl=None, wait=None, policy=POLICY)
            ).status is Status.GRANTED
    assert (await a.release_and_handoff(BAD.key, owner=("acme/infra", 1))).released is not None
    await _spoil_floor(a, BAD.key, b"x")
    before_ms = int(time.time() * 1000)
    assert await a.adopt([], {BAD.key: 7}) == []
    granted = await a.acquire_or_enqueue(candidate_for(BAD), ttl=None, wait=None, policy=POLICY)
    assert granted.status is Status.GRANTED
    assert granted.locks[0].fencing_token >= before_ms * 1000


async def test_a_free_key_whose_floor_is_written_over_is_listed_as_unreadable_on_every_replica(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    """As a fencing counter written over is on Redis (its lock hash marked): the replica whose
    request met the floor lists the key as unreadable at once, another replica's full list
    finds it too, a filtered list or a lookup of another key keeps it, and a force-unlock
    clears it everywhere. Before, it was refused but listed and counted nowhere."""
    a, b = etcd_replicas
    assert (await a.acquire_or_enqueue(candidate_for(BAD), ttl=None, wait=None, policy=POLICY)
            ).status is Status.GRANTED
    assert (await a.acquire_or_enqueue(candidate_for(GOOD), ttl=None, wait=None, policy=POLICY)
            ).status is Status.GRANTED
    await _spoil_floor(a, BAD.key, b"token=" + SECRET.encode())
    assert BAD.key not in a.unreadable, "a held key is its holder's, as on Redis"
    assert (await a.release_and_handoff(BAD.key, owner=("acme/infra", 1))).released is not None

    with pytest.raises(LockUnreadable):
        await a.acquire_or_enqueue(candidate_for(request_for(path="envs/bad", pull=2)),
                                   ttl=None, wait=None, policy=POLICY)
    [entry] = a.unreadable.entries()
    assert entry.key == BAD.key and "token floor" in entry.reason
    assert SECRET not in entry.reason
    assert len(b.unreadable) == 0
    assert [lock.key for lock in await b.list()] == [GOOD.key]
    assert [e.key for e in b.unreadable.entries()] == [BAD.key], "another replica's full list"
    # What does not read the floors keeps what was found: a list by pull, another key's step,
    # the key's own refused acquire (never cleared and found again: one event each way).
    told: list[tuple[str, bool]] = []
    stop = a.unreadable.listen(lambda found, now: told.append((found.key, now)))
    try:
        assert [lock.key for lock in await a.list(repo="acme/infra", pull=1)] == [GOOD.key]
        assert await a.get(GOOD.key) is not None
        for _ in range(2):
            with pytest.raises(LockUnreadable):
                await a.acquire_or_enqueue(candidate_for(request_for(path="envs/bad", pull=2)),
                                           ttl=None, wait=None, policy=POLICY)
        assert [e.key for e in a.unreadable.entries()] == [BAD.key]
        assert told == []

        assert (await b.force_unlock(BAD.key)).released is None
        assert len(b.unreadable) == 0
        granted = await a.acquire_or_enqueue(candidate_for(request_for(path="envs/bad", pull=2)),
                                             ttl=None, wait=None, policy=POLICY)
        assert granted.status is Status.GRANTED
        assert len(a.unreadable) == 0, "the replica that found it sees it repaired"
        assert told == [(BAD.key, False)]
    finally:
        stop()


async def test_a_full_list_reads_the_locks_held_and_the_floors_met_not_every_key_ever_locked(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every key ever locked keeps its floor (``fence/{key}``). A full list (and so every
    ``/metrics`` scrape) read that whole range to find the floors written over: its reads grew
    with every key ever locked, not with the locks held. It now reads the locks, the marks a
    step that met a floor written over left (``unreadable/{key}``) and those keys' floors: the
    keys it reads stay the same however many keys were locked once, and the key met on one
    replica is listed by the other; a floor repaired by hand is not listed, its mark gone."""
    a, b = etcd_replicas
    read: list[tuple[int, tuple[bytes, ...]]] = []
    fetch = b._fetch

    async def counted(client: Any, keys: set[bytes], prefixes: set[bytes], *,
                      key: str | None) -> Any:
        reads = await fetch(client, keys, prefixes, key=key)
        read.append((len(reads.keys) + sum(len(kvs) for _, kvs in reads.ranges.values()),
                     tuple(reads.ranges)))
        return reads

    monkeypatch.setattr(b, "_fetch", counted)

    async def lock_once(paths: range) -> None:
        for n in paths:
            request = request_for(path=f"envs/once-{n}", pull=3)
            assert (await a.acquire_or_enqueue(candidate_for(request), ttl=None, wait=None,
                                               policy=POLICY)).status is Status.GRANTED
            assert (await a.release_and_handoff(request.key, owner=("acme/infra", 3))
                    ).released is not None

    async def keys_a_full_list_reads() -> int:
        read.clear()
        assert [lock.key for lock in await b.list()] == [GOOD.key]
        assert all(not p.startswith(b.base + b"fence/") for _, ranges in read for p in ranges)
        return sum(n for n, _ in read)

    assert (await a.acquire_or_enqueue(candidate_for(GOOD), ttl=None, wait=None, policy=POLICY)
            ).status is Status.GRANTED
    await lock_once(range(5))
    few = await keys_a_full_list_reads()
    await lock_once(range(5, 45))
    assert await keys_a_full_list_reads() == few == 1, "the one lock held, whatever was locked"

    assert (await a.acquire_or_enqueue(candidate_for(BAD), ttl=None, wait=None, policy=POLICY)
            ).status is Status.GRANTED
    assert (await a.release_and_handoff(BAD.key, owner=("acme/infra", 1))).released is not None
    await _spoil_floor(a, BAD.key, b"token=" + SECRET.encode())
    assert await keys_a_full_list_reads() == 1, "a floor no step met is not read"
    assert len(b.unreadable) == 0
    with pytest.raises(LockUnreadable):
        await a.get(BAD.key)  # a read meets it as a request does
    assert [e.key for e in a.unreadable.entries()] == [BAD.key]
    assert await keys_a_full_list_reads() == 3, "the lock, the mark and its floor"
    assert [e.key for e in b.unreadable.entries()] == [BAD.key], "met on the other replica"

    etcd = await b.connection.client()
    assert etcd.kv is not None
    await etcd.kv.put(b.fence_key(BAD.key), b"7")  # repaired by hand
    await b.list()
    assert len(b.unreadable) == 0
    assert not (await etcd.kv.get(b.floor_mark(BAD.key))).kvs, "the mark of a repaired floor"
    assert await keys_a_full_list_reads() == 1
