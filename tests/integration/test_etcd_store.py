"""What the etcd backend does to be fast stays correct when several replicas share the keys.

An operation on one key starts from what its replica last knew of that key (no read first);
the commit's guards check that knowledge. These tests make one replica's knowledge stale
through another replica and check every answer is still etcd's: refusals (not owned, held)
are never decided on an old view, grants never overlap (the history checker, with clients
spread over two replicas), and queues are still served in order. Also: locks with the same
end share one etcd lease, and etcd still deletes them after their end when no replica is
left to do it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import random
import secrets
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import etcd3aio
import pytest
from tests.support.etcd_fixtures import QUEUE_POLICY as POLICY
from tests.support.etcd_fixtures import auth_on, etcd_config, grant, reader, started
from tests.support.etcd_server import EtcdCluster
from tests.support.grant_history import GrantHistory
from tests.support.locks import candidate_for, request_for
from tests.support.lost_answers import LostAnswers

from enhanced_locking.backends import codec, etcd_store
from enhanced_locking.backends.base import StoreBackend
from enhanced_locking.backends.etcd_connection import WATCH_CHECK, EtcdConnection, EtcdSettings
from enhanced_locking.backends.etcd_store import EtcdBackend
from enhanced_locking.backends.waiting import Status, Wait
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import EventBus
from enhanced_locking.locking import EnhancedLocker
from enhanced_locking.metrics import Metrics
from enhanced_locking.policies import ConcurrencyLimit, KeyPattern, PolicyRules
from enhanced_locking.types import (
    BackendUnavailable,
    BatchItem,
    BatchLockRequest,
    Candidate,
    Event,
    InvalidRequest,
    LockNotOwned,
    Priority,
    Pull,
    Reason,
    utcnow,
)

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(120)]


def want(pull: int, path: str = "envs/prod") -> Candidate:
    return candidate_for(request_for(repo="acme/infra", path=path, pull=pull))


def offer(seconds: float = 30) -> Wait:
    return Wait(id=secrets.token_hex(8), timeout=timedelta(seconds=seconds))


async def test_a_release_on_an_old_view_is_judged_on_etcds(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    a, b = etcd_replicas
    mine = await grant(a, want(1))
    # Behind a's back: pull 1's lock is force-unlocked and pull 2 takes the key.
    await b.force_unlock(mine.key)
    theirs = await grant(b, want(2))
    # a last saw pull 1 holding the key: its release must still be refused with the real holder.
    with pytest.raises(LockNotOwned) as refused:
        await a.release_and_handoff(mine.key, owner=mine.owner, policy=POLICY)
    assert refused.value.holder is not None and refused.value.holder.pull.num == 2
    assert (await a.get(mine.key)) == theirs
    # The other way round: a last saw pull 2 holding it; b hands it to pull 1 meanwhile.
    await b.release_and_handoff(theirs.key, owner=theirs.owner, policy=POLICY)
    back = await grant(b, want(1))
    handoff = await a.release_and_handoff(back.key, owner=back.owner, policy=POLICY)
    assert handoff.released == back
    assert await b.get(back.key) is None


async def test_a_lock_answered_from_the_granting_replicas_memory_is_the_one_etcd_holds(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    """The replica that wrote a lock reads it back without decoding it (it keeps the lock it
    encoded): every field must be what another replica decodes from etcd."""
    a, b = etcd_replicas
    ask = request_for(repo="gl/group/sub", path="envs/./prod/", workspace="blue", pull=7,
                      user="carol", priority=Priority.HIGH, ttl=timedelta(minutes=5))
    ask = ask.model_copy(update={"pull": ask.pull.model_copy(update={
        "url": "https://gitlab.example/gl/group/sub/-/merge_requests/7",
        "head_commit": "abc123", "state": "closed"})})
    granted = await grant(a, candidate_for(ask), ttl=timedelta(minutes=5))
    read_by_b = await b.get(granted.key)
    assert read_by_b == granted
    handoff = await a.release_and_handoff(granted.key, owner=granted.owner, policy=POLICY)
    assert handoff.released == read_by_b
    assert handoff.released is not None and handoff.released.pull.vcs_host is not None


async def test_an_acquire_on_an_old_view_neither_refuses_nor_returns_a_lock_that_is_gone(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    a, b = etcd_replicas
    first = await grant(a, want(1))
    await b.release_and_handoff(first.key, owner=first.owner, policy=POLICY)
    # a last saw its own pull holding the key: asking again must grant anew (a new token),
    # not hand back the lock that was released.
    again = await grant(a, want(1))
    assert again.fencing_token > first.fencing_token
    # Now b takes it over; a, which last saw pull 1 holding it, must answer held by pull 2.
    await b.force_unlock(again.key)
    theirs = await grant(b, want(2))
    outcome = await a.acquire_or_enqueue(want(3), ttl=None, wait=None, policy=POLICY)
    assert outcome.status is Status.HELD
    assert outcome.holder == theirs


async def test_waiters_queued_through_one_replica_are_served_by_a_release_on_another(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    a, b = etcd_replicas
    held = await grant(a, want(1))
    await a.release_and_handoff(held.key, owner=held.owner, policy=POLICY)
    held = await grant(a, want(1))  # a now knows the key as held, with an empty queue
    wait = offer()
    told = b.grants.expect(wait.id)
    queued = await b.acquire_or_enqueue(want(2), ttl=None, wait=wait, policy=POLICY)
    assert queued.status is Status.QUEUED
    # a's view of the queue is stale (empty): its release must still hand the key to pull 2.
    handoff = await a.release_and_handoff(held.key, owner=held.owner, policy=POLICY)
    assert [g.waiter.id for g in handoff.granted] == [wait.id]
    notice = await asyncio.wait_for(told, 10)
    assert notice.locks and notice.locks[0].pull.num == 2
    assert notice.locks[0].fencing_token > held.fencing_token


async def test_clients_on_two_replicas_never_hold_a_key_together(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    """16 clients, each on a random replica per call, 3 keys, fail-fast and waiting acquires:
    every replica's knowledge of the keys keeps going stale, and no grant overlaps."""
    replicas = etcd_replicas
    history = GrantHistory()
    paths = ["envs/a", "envs/b", "envs/c"]
    deadline = time.monotonic() + 8

    async def client(number: int) -> None:
        rng = random.Random(number)
        who = f"client-{number}"
        while time.monotonic() < deadline:
            on = rng.choice(replicas)
            candidate = want(100 + number, rng.choice(paths))
            wait = offer(2) if rng.random() < 0.5 else None
            told = on.grants.expect(wait.id) if wait is not None else None
            outcome = await on.acquire_or_enqueue(candidate, ttl=None, wait=wait,
                                                  policy=POLICY)
            lock = None
            if outcome.status is Status.GRANTED:
                lock = outcome.locks[0]
            elif outcome.status is Status.QUEUED:
                assert told is not None
                notice = await asyncio.wait_for(told, 10)
                lock = notice.locks[0] if notice.locks else None
            if wait is not None and told is not None:
                on.grants.forget(wait.id, told)
            if lock is None:
                await asyncio.sleep(rng.uniform(0, 0.01))
                continue
            history.granted(who, lock)
            await asyncio.sleep(rng.uniform(0, 0.005))
            history.releasing(who, lock.key)
            await rng.choice(replicas).release_and_handoff(lock.key, owner=lock.owner,
                                                           policy=POLICY)

    await asyncio.gather(*(client(n) for n in range(16)))
    assert not history.violations, history.violations[:10]
    assert history.grants > 50, history.grants
    missed = sum(r.missed_guesses for r in replicas)
    assert missed > 0  # the views did go stale: the guards were exercised


async def test_locks_ending_together_share_a_lease_that_etcd_ends_after_them(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    config = etcd_config(etcd_cluster, etcd_prefix)
    backend = EtcdBackend.from_config(config, "enhanced")
    try:
        now = time.time()
        if now % 1 > 0.7:  # both grants within one second of each other's end
            await asyncio.sleep(1 - now % 1)
        first = await grant(backend, want(1, "envs/a"), ttl=timedelta(seconds=2))
        second = await grant(backend, want(2, "envs/b"), ttl=timedelta(seconds=2))
        raw = EtcdConnection(EtcdSettings(endpoints=tuple(etcd_cluster.endpoints)))
        try:
            client = await raw.client()
            assert client.kv is not None
            keys = [backend.lock_key(first.key), backend.lock_key(second.key)]
            stored = [(await client.kv.get(key)).kvs[0] for key in keys]
            assert stored[0].lease != 0 and stored[0].lease == stored[1].lease
            # No replica left to expire them: etcd deletes both a second or two after their end
            # (within 5.5 s of the close, looked at until then, not once at its end).
            await backend.close()
            deadline = time.monotonic() + 2 + 3.5
            while (left := [len((await client.kv.get(key)).kvs) for key in keys]) != [0, 0]:
                assert time.monotonic() < deadline, f"still stored: {left}"
                await asyncio.sleep(0.1)
        finally:
            await raw.close()
    finally:
        await backend.close()


class GrantsAnsweredNextSecond:
    """The lease calls of a client, the first ``LeaseGrant`` answered only once the clock has
    passed the next whole second after it was sent (etcd applied it at once): a grant that
    took its step's run into a later second. Every grant's ID is kept (``granted``)."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.granted: list[int] = []

    def __getattr__(self, name: str) -> Any:
        call = getattr(self._real, name)
        if name != "LeaseGrant":
            return call

        async def grant(request: Any, **options: Any) -> Any:
            self.granted.append(int(request.ID))
            sent = time.time()
            answer = await call(request, **options)
            if len(self.granted) == 1:
                await asyncio.sleep(math.floor(sent) + 1.05 - time.time())
            return answer

        return grant


async def test_a_lock_whose_lease_was_granted_into_the_next_second_takes_that_lease(
    etcd_cluster: EtcdCluster, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lock with a TTL stops its step's run for the lease of its end second; the step runs
    again once the lease is granted, at the time its run began. Before, the run after the
    grant took the clock again: a grant answered in a later second (a loaded machine, a lost
    answer sent again) made the lock end in a later second, the step granted a second lease
    for that one, and the first was left to its TTL with nothing attached (the lock's
    minute here); a grant slower than a second every time never let the step commit."""
    backend = EtcdBackend.from_config(etcd_config(etcd_cluster, etcd_prefix), "enhanced")
    try:
        await grant(backend, want(1, "envs/warm"))  # opens the session (its lease) meanwhile
        deadline = time.monotonic() + 30
        while not backend.session_lease:
            assert time.monotonic() < deadline, "the session never opened"
            await asyncio.sleep(0.05)
        client = await backend.connection.client()
        assert client.lease is not None and client.kv is not None
        lease = client.lease
        calls = GrantsAnsweredNextSecond(lease._stub)
        monkeypatch.setattr(etcd_store, "_lease_calls",
                            lambda member: SimpleNamespace(_stub=calls, _metadata=lease._metadata))
        lock = await grant(backend, want(2, "envs/slow-lease"), ttl=timedelta(minutes=1))
        monkeypatch.undo()
        assert len(calls.granted) == 1, calls.granted
        [stored] = (await client.kv.get(backend.lock_key(lock.key))).kvs
        assert stored.lease == calls.granted[0]
        # The lease still ends after the lock (etcd's whole seconds left, rounded down).
        left = (await client.lease.time_to_live(stored.lease)).TTL
        assert lock.expires_at is not None
        assert left > (lock.expires_at - utcnow()).total_seconds()
    finally:
        await backend.close()


async def test_waiters_queued_at_once_through_one_replica_cost_one_transaction_each(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    """A hot key: its steps on one replica run in line, each on what the one before it
    committed, so N waiters queued at once are N transactions (together they would fail each
    other's guards, about N*N/2 transactions), and they are served in the order they came."""
    a, _ = etcd_replicas
    held = await grant(a, want(1))
    waits = [offer() for _ in range(30)]
    told = [a.grants.expect(w.id) for w in waits]
    before = (a.round_trips, a.conflicts, a.missed_guesses)
    outcomes = await asyncio.gather(*(
        a.acquire_or_enqueue(want(10 + i), ttl=None, wait=w, policy=POLICY)
        for i, w in enumerate(waits)))
    assert [o.status for o in outcomes] == [Status.QUEUED] * len(waits)
    assert (a.round_trips - before[0], a.conflicts - before[1],
            a.missed_guesses - before[2]) == (len(waits), 0, 0)
    assert sorted(o.position or 0 for o in outcomes) == list(range(1, len(waits) + 1))
    queue = await a.queue(held.key, policy=POLICY)
    assert [w.id for w in queue] == [w.id for w in waits]  # in the order they were asked
    owner = held.owner
    for i, future in enumerate(told):
        handoff = await a.release_and_handoff(held.key, owner=owner, policy=POLICY)
        assert [g.waiter.id for g in handoff.granted] == [waits[i].id]
        notice = await asyncio.wait_for(future, 10)
        assert notice.locks and notice.locks[0].pull.num == 10 + i
        owner = notice.locks[0].owner


async def test_steps_cancelled_in_a_key_s_line_leave_the_others_their_turns_in_order(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Steps on one key through one replica wait in line (one at a time, in the order they
    came); steps cancelled while they wait, or the moment their turn comes (before they run),
    leave the others their turns: every other step is answered, queued in the order it came,
    and the line is gone once they are done (a step after them runs at once, as the first of
    a new line)."""
    a, _ = etcd_replicas
    held = await grant(a, want(1))
    waits = [offer() for _ in range(24)]
    for w in waits:
        a.grants.expect(w.id)
    steps = [asyncio.ensure_future(a.acquire_or_enqueue(want(10 + i), ttl=None, wait=w,
                                                        policy=POLICY))
             for i, w in enumerate(waits)]
    await asyncio.sleep(0)  # the first step runs; the others wait in the key's line
    cancelled = set(range(2, len(steps), 3))
    for i in sorted(cancelled)[:4]:
        steps[i].cancel()  # while waiting in line
    on_their_turn = [steps[i] for i in sorted(cancelled)[4:]]
    pass_turn = a._next_in_line

    def passing(key: str, line: Any) -> None:
        turn = next((t for t in line.waiting if not t.done()), None)
        pass_turn(key, line)
        for step in on_their_turn:  # its turn given, cancelled before it runs
            if turn is not None and getattr(step, "_fut_waiter", None) is turn:
                step.cancel()

    monkeypatch.setattr(a, "_next_in_line", passing)
    done = await asyncio.wait_for(asyncio.gather(*steps, return_exceptions=True), 30)
    assert all(step.cancelled() for step in on_their_turn)  # (each met on its turn)
    answered = [i for i in range(len(steps)) if i not in cancelled]
    statuses = [getattr(done[i], "status", done[i]) for i in answered]
    assert statuses == [Status.QUEUED] * len(answered), done
    assert not a._lines  # nobody in line any more
    queue = [w.id for w in await a.queue(held.key, policy=POLICY)]
    ours = [waits[i].id for i in answered]
    assert [w for w in queue if w in ours] == ours  # in the order they were asked
    late = offer()
    a.grants.expect(late.id)
    outcome = await asyncio.wait_for(
        a.acquire_or_enqueue(want(99), ttl=None, wait=late, policy=POLICY), 10)
    assert outcome.status is Status.QUEUED and not a._lines


async def test_a_release_costs_no_other_step_and_a_lock_etcd_ends_is_served(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    """Every replica watches lock deletions for the ones etcd makes when a lock's lease ends
    (the backstop when the replica that granted it is gone). A release by a replica deletes a
    leased lock too: that one is not served again by anyone."""
    a, b = etcd_replicas
    await grant(b, want(1, "envs/warm"))  # b's session and watch are up
    lock = await grant(a, want(1), ttl=timedelta(minutes=5))
    before = (a.round_trips, b.round_trips)
    await a.release_and_handoff(lock.key, owner=lock.owner, policy=POLICY)
    await asyncio.sleep(1.0)  # both watches have seen the delete by now
    assert (a.round_trips - before[0], b.round_trips - before[1]) == (1, 0)
    # The backstop still works: a grants a 1 s lock and goes away; b's waiter is served once
    # etcd deletes the lock at its lease's end.
    short = await grant(a, want(2), ttl=timedelta(seconds=1))
    await a.close()
    # Without waiters b does not follow lock deletions (it has nobody to serve); its waiter's
    # enqueue starts the watch from the revision that queued it.
    assert b._deletions is None
    wait = offer(20)
    told = b.grants.expect(wait.id)
    queued = await b.acquire_or_enqueue(want(3), ttl=None, wait=wait, policy=POLICY)
    assert queued.status is Status.QUEUED, queued
    assert b._deletions is not None
    notice = await asyncio.wait_for(told, 10)
    assert notice.locks and notice.locks[0].pull.num == 3
    assert notice.locks[0].fencing_token > short.fencing_token


async def test_a_key_whose_lock_its_lease_ended_goes_on_in_the_order_of_the_queue_policy(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    """A key the store serves on its own (its lock deleted by etcd at its lease's end, which
    the watch of deletions or the read of the waiting keys brings) goes on in the order of
    the service's queue policy (``queue_policy``, which the locker sets): here the priority
    queue, so the high-priority waiter queued after a normal one. Before, those steps served
    the queue under the default policy: the normal waiter got the key."""
    a, b = etcd_replicas
    b.queue_policy = lambda: POLICY
    short = await grant(a, want(1), ttl=timedelta(seconds=1))
    await a.close()  # nobody's lease timer: etcd deletes the lock at its lease's end
    normal = offer(30)
    later = b.grants.expect(normal.id)
    queued = await b.acquire_or_enqueue(want(2), ttl=None, wait=normal, policy=POLICY)
    assert queued.status is Status.QUEUED and queued.position == 1, queued
    high = offer(30)
    heard = b.grants.expect(high.id)
    queued = await b.acquire_or_enqueue(
        candidate_for(request_for(repo="acme/infra", path="envs/prod", pull=3,
                                  priority=Priority.HIGH)),
        ttl=None, wait=high, policy=POLICY)
    assert queued.status is Status.QUEUED and queued.position == 1, queued
    first, _ = await asyncio.wait((heard, later), timeout=20,
                                  return_when=asyncio.FIRST_COMPLETED)
    assert first == {heard}, "the key went to the normal waiter"
    notice = heard.result()
    assert notice.locks and notice.locks[0].pull.num == 3
    assert notice.locks[0].fencing_token > short.fencing_token


async def test_a_waiter_queued_as_the_watch_of_deletions_winds_down_gets_a_watch(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once a replica has had no waiters for ``DELETIONS_LINGER`` seconds its watch of lock
    deletions stops; the watch's wind-down is an await. A waiter queued in that moment (right
    as the check gave up) must still get a watch: with none it would hear no delete etcd makes
    and have no read backing it, until another waiter came."""
    a, b = etcd_replicas
    unserved = b._unserved
    late: list[asyncio.Task[None] | None] = []

    async def check(heard: set[str]) -> tuple[int, bool] | None:
        again = await unserved(heard)
        if again is None and not late:  # a waiter is queued here, before the watch has ended
            b._watch_deletions(0)
            late.append(b._deletions)
        return again

    monkeypatch.setattr(b, "_unserved", check)
    held = await grant(a, want(1))
    wait = offer(20)
    told = b.grants.expect(wait.id)
    queued = await b.acquire_or_enqueue(want(2), ttl=None, wait=wait, policy=POLICY)
    assert queued.status is Status.QUEUED, queued
    first = b._deletions
    assert first is not None
    await a.release_and_handoff(held.key, owner=held.owner, policy=POLICY)
    await asyncio.wait_for(told, 10)  # b has no waiter left: its watch stops after the linger
    await asyncio.wait_for(first, 20)
    assert len(late) == 1 and late[0] is not None and late[0] is not first
    assert b._deletions is late[0] and not late[0].done()


async def test_a_key_freed_by_a_shared_holders_lease_does_not_set_the_deletions_watch_behind(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend], caplog: pytest.LogCaptureFixture,
) -> None:
    """The watch of lock deletions follows ``lock/`` only. A shared holder whose replica is
    gone is deleted by etcd under ``shared/``: the read of the waiting keys serves its key,
    and that is no delete the watch missed (no warning, no watch started again)."""
    a, b = etcd_replicas
    caplog.set_level(logging.WARNING, logger="enhanced_locking.backends.etcd_store")
    reader = await grant(a, want(1)._replace(mode="shared"), ttl=timedelta(seconds=2))
    await a.close()  # its replica is gone: etcd deletes the holder at its lease's end
    wait = offer(30)
    told = b.grants.expect(wait.id)
    queued = await b.acquire_or_enqueue(want(2), ttl=None, wait=wait, policy=POLICY)
    assert queued.status is Status.QUEUED, queued
    notice = await asyncio.wait_for(told, 20)
    assert notice.locks and notice.locks[0].pull.num == 2
    assert notice.locks[0].fencing_token > reader.fencing_token
    held = notice.locks[0]
    await asyncio.sleep(2 * WATCH_CHECK + 1)  # the checks that would find the watch behind
    assert b.served_unheard == 0
    assert not [r for r in caplog.records if "lock deletions is behind" in r.getMessage()]
    await b.release_and_handoff(held.key, owner=held.owner, policy=POLICY)


async def test_a_free_key_whose_step_fails_leaves_the_watch_of_deletions_running(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The read of the waiting keys serves each free key in turn; a step that fails on one is
    logged, and the watch of deletions and its reads go on for the other keys. The failure is
    made here: what made a real step fail before (a queue entry that cannot be read, then a
    token floor that is not a number) now fails no step (``test_etcd_waiter_records.py``,
    ``test_etcd_token_floor.py``)."""
    a, b = etcd_replicas
    expire_step = b._expire_step

    async def failing(key: str, **kwargs: Any) -> Any:
        if key == held.key:
            raise ValueError("a step that fails")
        return await expire_step(key, **kwargs)

    monkeypatch.setattr(b, "_expire_step", failing)
    caplog.set_level(logging.WARNING, logger="enhanced_locking.backends.etcd_store")
    held = await grant(a, want(1), ttl=timedelta(seconds=1))
    await a.close()  # its replica is gone: etcd deletes the lock at its lease's end
    wait = offer(30)
    b.grants.expect(wait.id)
    queued = await b.acquire_or_enqueue(want(2), ttl=None, wait=wait, policy=POLICY)
    assert queued.status is Status.QUEUED, queued
    deletions = b._deletions
    assert deletions is not None
    deadline = time.monotonic() + 20
    while not [r for r in caplog.records if "serving the free key" in r.getMessage()]:
        assert time.monotonic() < deadline, "the free key was never served"
        assert not deletions.done(), deletions
        await asyncio.sleep(0.1)
    await asyncio.sleep(WATCH_CHECK + 0.5)  # the next check runs too
    assert not deletions.done()
    assert b._deletions is deletions


async def test_a_waiter_granted_by_a_replica_whose_clock_is_behind_is_answered_with_its_grant(
    etcd_cluster: EtcdCluster, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, with A's clock half a second ahead of B's: B's grant is stamped before A's
    waiter was queued by A's clock, and is still its grant (a token above the revision that
    queued it). Before, it was not taken for one: the caller was told ``unavailable`` and the
    lock (no TTL) stayed held by a pull that was never told."""
    config = etcd_config(etcd_cluster, etcd_prefix, enabled=True)
    heard = Heard(config)
    a, b = heard.backend, EtcdBackend.from_config(config, "enhanced")
    monkeypatch.setattr(a, "_clock", lambda: utcnow() + timedelta(milliseconds=500))
    try:
        mine = await grant(b, want(1))
        waiting = asyncio.ensure_future(heard.locker.acquire(request_for(
            pull=2, wait=timedelta(seconds=30))))
        await asyncio.wait_for(heard.queued.wait(), 10)
        monkeypatch.setattr(a, "_heard", lambda waiter_id, kv: False)  # A hears nothing
        handoff = await b.release_and_handoff(mine.key, owner=mine.owner, policy=POLICY)
        assert len(handoff.granted) == 1
        granted = handoff.granted[0]
        assert granted.locks[0].acquired_at < granted.waiter.enqueued_at  # B's clock behind
        client = await b.connection.client()
        assert client.lease is not None
        await client.lease.revoke(a.session_lease)
        answer = await asyncio.wait_for(waiting, 15)  # the next renewal finds it gone
        assert answer.acquired and answer.lock is not None, answer
        assert answer.lock == granted.locks[0]
    finally:
        await heard.locker.close()
        await a.close()
        await b.close()


async def test_a_batch_waiter_granted_beside_a_lock_its_pull_held_before_is_answered_with_both(
    etcd_cluster: EtcdCluster, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, for a batch of two keys whose pull held one before it queued: the grant
    keeps that lock (older than the queueing) and takes the other, and the caller is
    answered with both. Before, the kept lock was not taken for part of the grant: the
    caller was told ``unavailable`` and the lock the grant took stayed held by a pull that
    was never told."""
    config = etcd_config(etcd_cluster, etcd_prefix, enabled=True)
    heard = Heard(config)
    a, b = heard.backend, EtcdBackend.from_config(config, "enhanced")
    try:
        before = await heard.locker.acquire(request_for(pull=2, path="envs/dev"))
        assert before.acquired and before.lock is not None
        mine = await grant(b, want(1))
        waiting = asyncio.ensure_future(heard.locker.acquire_batch(BatchLockRequest(
            locks=[BatchItem(project=request_for(pull=2, path=p).project)
                   for p in ("envs/prod", "envs/dev")],
            pull=Pull(num=2), wait=timedelta(seconds=30))))
        await asyncio.wait_for(heard.queued.wait(), 10)
        monkeypatch.setattr(a, "_heard", lambda waiter_id, kv: False)  # A hears nothing
        handoff = await b.release_and_handoff(mine.key, owner=mine.owner, policy=POLICY)
        assert len(handoff.granted) == 1
        client = await b.connection.client()
        assert client.lease is not None
        await client.lease.revoke(a.session_lease)
        answer = await asyncio.wait_for(waiting, 15)  # the next renewal finds it gone
        assert answer.acquired, answer
        assert {lock.key: lock for lock in answer.locks} == {
            lock.key: lock for lock in handoff.granted[0].locks}
        assert before.lock in answer.locks  # kept, unchanged
    finally:
        await heard.locker.close()
        await a.close()
        await b.close()


class Heard:
    """An enhanced locker over a new etcd backend of ``config``, every event it publishes kept
    in ``seen`` and ``queued`` set at each ``queued`` one."""

    def __init__(self, config: EnhancedLockingConfig) -> None:
        self.backend = EtcdBackend.from_config(config, "enhanced")
        self.seen: list[Event] = []
        self.queued = asyncio.Event()
        self.metrics = Metrics()
        events = EventBus()
        events.subscribe(self._hear)
        self.locker = EnhancedLocker(self.backend, settings=lambda: config, events=events,
                                     metrics=self.metrics)

    def _hear(self, event: Event) -> None:
        self.seen.append(event)
        if event.type == "queued":
            self.queued.set()


async def test_a_locker_queuing_a_request_asks_etcd_once_and_its_event_shows_the_queue(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    """The enqueue's own transaction says who is ahead and who holds the key: the ``queued``
    event needs no read of the queue or the holders after it."""
    heard = Heard(etcd_config(etcd_cluster, etcd_prefix, enabled=True))
    backend, locker = heard.backend, heard.locker
    wait = timedelta(seconds=30)
    try:
        assert (await locker.acquire(request_for(pull=1))).acquired
        second = asyncio.ensure_future(locker.acquire(request_for(pull=2, wait=wait)))
        await asyncio.wait_for(heard.queued.wait(), 10)
        heard.queued.clear()
        before = (backend.round_trips, backend.reads)
        third = asyncio.ensure_future(locker.acquire(request_for(pull=3, wait=wait)))
        await asyncio.wait_for(heard.queued.wait(), 10)
        assert (backend.round_trips - before[0], backend.reads - before[1]) == (1, 0)
        details = [e for e in heard.seen if e.type == "queued"][-1].details
        assert details["position"] == 2
        assert [h["owner"] for h in details["holders"]] == ["acme/infra#1"]
        assert [w["owner"] for w in details["ahead"]] == ["acme/infra#2"]
        await locker.release(request_for().key, owner=("acme/infra", 1))
        got = (await asyncio.wait_for(second, 10)).lock
        assert got is not None and got.pull.num == 2
        await locker.release(request_for().key, owner=("acme/infra", 2))
        got = (await asyncio.wait_for(third, 10)).lock
        assert got is not None and got.pull.num == 3
    finally:
        await locker.close()
        await backend.close()


async def test_a_waited_on_key_that_stays_free_is_not_stepped_on_at_every_check(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A batch waiter queued on a held key and a free one: the read of the waiting keys every
    # WATCH_CHECK seconds finds the free key with no holder and runs its step, which cannot
    # serve the batch (its other key is held) and writes nothing. It read five times each
    # check; a key still free after a step that granted nothing is stepped on again only
    # every fifth check. Over five checks: the first step, not one at each.
    a, b = etcd_replicas
    held = await grant(b, want(1, "envs/held"))
    runs: list[float] = []  # when the free key's step ran (a step runs again after a miss)
    expire = StoreBackend.expire
    free = want(2, "envs/free").key

    async def counted(self: StoreBackend, key: str, **kwargs: Any) -> Any:
        if key == free:
            runs.append(time.monotonic())
        return await expire(self, key, **kwargs)

    monkeypatch.setattr(StoreBackend, "expire", counted)
    wait = offer(60)
    told = a.grants.expect(wait.id)
    outcome = await a.acquire_batch([want(2, "envs/held"), want(2, "envs/free")], ttl=None,
                                    wait=wait, policy=POLICY)
    assert outcome.status is Status.QUEUED, outcome
    await asyncio.sleep(5 * WATCH_CHECK + 1)
    # Steps: runs more than a second apart (the runs of one step follow each other at once).
    steps = [at for n, at in enumerate(runs) if not n or at - runs[n - 1] > 1.0]
    assert len(steps) in (1, 2), runs
    assert not told.done()
    # The batch is still served, by the step on its other key.
    await b.release_and_handoff(held.key, owner=held.owner, policy=POLICY)
    notice = await asyncio.wait_for(told, WATCH_CHECK + 5)
    assert sorted(lock.key for lock in notice.locks) == sorted([held.key, free])


async def test_a_pull_is_released_among_more_locks_than_one_transaction_may_guard(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    """etcd refuses a transaction with more than 128 compares (``--max-txn-ops``): a release
    of a pull's locks, which reads every lock, was guarded by every lock of the namespace and
    failed (``too many operations in txn request``, 503 after 5 s) once 127 were held. It is
    judged on the locks it releases and on nothing added meanwhile, and commits at once."""
    a, b = etcd_replicas
    for i in range(140):
        await grant(a, want(1 + i % 5, path=f"envs/p{i}"))
    before = a.conflicts
    released = await a.release_by_pull("acme/infra", 1)
    assert sorted(lock.key for lock in released) == sorted(
        want(1, path=f"envs/p{i}").key for i in range(0, 140, 5))
    assert a.conflicts == before  # committed the first time
    left = await b.list()
    assert len(left) == 112 and {lock.pull.num for lock in left} == {2, 3, 4, 5}
    # A lock the pull took since, through the other replica, is released by the next one.
    await grant(b, want(1, path="envs/late"))
    assert [lock.key for lock in await a.release_by_pull("acme/infra", 1)] == [
        want(1, path="envs/late").key]


async def test_a_key_with_more_waiters_than_one_transaction_may_guard_is_still_served(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    """Every step on a key reads its whole queue: guarded by each entry, a key with about 125
    waiters took no more steps (etcd's 128 compares a transaction), its holder could not
    release it, nor a waiter leave. A step is guarded by the entries it writes and by the
    range (nothing added since), and the key is served in order."""
    a, b = etcd_replicas
    held = await grant(a, want(1))
    waits = [offer() for _ in range(135)]
    told = {w.id: a.grants.expect(w.id) for w in waits}
    for i, w in enumerate(waits):
        outcome = await a.acquire_or_enqueue(want(10 + i), ttl=None, wait=w, policy=POLICY)
        assert outcome.status is Status.QUEUED and outcome.position == i + 1, (i, outcome)
    # A waiter in the middle leaves, through the other replica.
    cancelled = await b.cancel(held.key, waits[60].id)
    assert cancelled.removed
    handoff = await a.release_and_handoff(held.key, owner=held.owner, policy=POLICY)
    assert [g.waiter.id for g in handoff.granted] == [waits[0].id]
    notice = await asyncio.wait_for(told[waits[0].id], 10)
    assert notice.locks and notice.locks[0].pull.num == 10
    queue = await b.queue(held.key, policy=POLICY)
    assert [w.id for w in queue] == [w.id for w in waits[1:] if w is not waits[60]]


async def test_a_pull_holding_more_locks_than_one_transaction_may_write_is_released(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    """A release of a pull's locks deletes each and reads each key's token floor and queue:
    in one step, a pull holding about 60 locks made a transaction etcd refused (more than its
    128 compares), so a pull request touching that many projects kept its locks when it
    closed. It is released a part at a time, every key handed to its next waiter."""
    a, b = etcd_replicas
    paths = [f"envs/p{i:03}" for i in range(75)]
    for path in paths:
        await grant(a, want(1, path=path))
    other = await grant(a, want(2, path="envs/other"))
    wait = offer()
    told = b.grants.expect(wait.id)
    queued = await b.acquire_or_enqueue(want(3, path=paths[-1]), ttl=None, wait=wait,
                                        policy=POLICY)
    assert queued.status is Status.QUEUED
    released = await a.release_by_pull("acme/infra", 1, policy=POLICY)
    assert sorted(lock.key for lock in released) == sorted(want(1, path=p).key for p in paths)
    notice = await asyncio.wait_for(told, 10)
    assert notice.locks and notice.locks[0].pull.num == 3
    assert {(lock.key, lock.pull.num) for lock in await b.list()} == {
        (other.key, 2), (want(3, path=paths[-1]).key, 3)}


async def test_a_release_by_pull_in_parts_counts_every_lock_a_concurrency_limit_covers(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    """A release by pull frees a part of the pull's locks in each step; the grant step of a
    part still counts every lock held in a concurrency limit's group, not only the first of
    them by key (nor leaves out those an earlier part freed)."""
    a, b = etcd_replicas
    limited = dataclasses.replace(POLICY, rules=PolicyRules(concurrency=[
        ConcurrencyLimit(name="g", match=KeyPattern(path_prefix="g"), limit=1)]))
    await grant(a, want(1, path="g/2"))
    for i in range(40):  # after g/2 by key: the first part frees g/2 and 15 of them
        await grant(a, want(1, path=f"p{i:02}"))
    # The group's other lock, of a repository after pull 1's keys.
    other = await grant(a, candidate_for(request_for(repo="zeta/infra", path="g/1", pull=2)))
    wait = offer()
    queued = await b.acquire_or_enqueue(want(3, path="g/2"), ttl=None, wait=wait,
                                        policy=limited)
    assert queued.status is Status.QUEUED
    released = await a.release_by_pull("acme/infra", 1, policy=limited)
    assert len(released) == 41
    # The group holds zeta's g/1 (its limit is 1): pull 3 still waits for g/2.
    assert {(lock.key, lock.pull.num) for lock in await b.list()} == {(other.key, 2)}
    assert [w.id for w in await b.queue(want(3, path="g/2").key, policy=limited)] == [wait.id]



async def test_a_batch_larger_than_one_transaction_takes_is_refused_naming_the_limit(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    """A batch is one step, and its transaction reads four things a key (the lock, its token
    floor, its queue, its shared holders): past 31 keys etcd refused it (its 128 operations a
    transaction), which came back as ``unavailable`` (503, retried, and the router's fallback
    took it for an outage). It is refused at once as a request this store cannot take (422)."""
    a, b = etcd_replicas
    fits = [want(40, path=f"envs/b{i}") for i in range(EtcdBackend.BATCH_MOST)]
    granted = await a.acquire_batch(fits, ttl=None, wait=None, policy=POLICY)
    assert granted.status is Status.GRANTED and len(granted.locks) == len(fits)
    # Queued behind them, then asked again by another caller: its entry in every queue is put
    # again (and guarded), within the same transaction.
    behind = [want(42, path=f"envs/b{i}") for i in range(EtcdBackend.BATCH_MOST)]
    wait = Wait(id=secrets.token_hex(8), timeout=timedelta(seconds=30), request_id="r1",
                caller="first")
    queued = await a.acquire_batch(behind, ttl=None, wait=wait, policy=POLICY)
    assert queued.status is Status.QUEUED
    again = await b.acquire_batch(behind, ttl=None, wait=dataclasses.replace(
        wait, caller="second"), policy=POLICY)
    assert again.status is Status.QUEUED and again.waiter is not None
    assert again.waiter.caller == "second"
    more = [want(41, path=f"envs/c{i}") for i in range(EtcdBackend.BATCH_MOST + 1)]
    before = a.round_trips
    for asked in (None, offer()):
        with pytest.raises(InvalidRequest, match=f"at most {EtcdBackend.BATCH_MOST} ") as refused:
            await a.acquire_batch(more, ttl=None, wait=asked, policy=POLICY)
        assert refused.value.field == "locks"
    assert a.round_trips == before


async def test_a_caller_told_at_close_leaves_the_closed_store_closed(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    """A close tells the waiters here that the store is going away; their callers, done
    waiting, had their notices deleted, a call that connected the closed store again and
    kept that connection (and, with auth on, its token refresher) open for good. The
    session's revoke at the close takes those notices."""
    a, b = etcd_replicas
    held = await grant(b, want(1))
    wait = offer()
    told = a.grants.expect(wait.id)
    queued = await a.acquire_or_enqueue(want(2), ttl=None, wait=wait, policy=POLICY)
    assert queued.status is Status.QUEUED
    await a.close()
    assert told.result().reason is Reason.UNAVAILABLE
    a.grants.forget(wait.id, told)  # the caller's own clean-up, once it has its answer
    await asyncio.sleep(0.3)
    assert a.connection._client is None
    assert await b.queue(held.key, policy=POLICY) == []  # its session's waiters went with it


async def test_a_waiter_is_never_queued_without_a_session_lease(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    """The replica's session lease is gone from etcd (revoked here; an outage longer than its
    10 s ends it too) before its renewals notice. A waiter queued then failed on "lease not
    found" and ran again, about 270 round trips in 3.3 s, until the renewal found the lease
    gone and set it to none: the waiter was then written without a lease, so it outlived its
    replica, and no notice was written for it (nobody seemed to wait): granted later, its
    caller was never told and the lock stayed held. It is answered ``unavailable`` at once,
    and the next wait opens a new session."""
    a, b = etcd_replicas
    held = await grant(b, want(1))
    first = offer()
    queued = await a.acquire_or_enqueue(want(2), ttl=None, wait=first, policy=POLICY)
    assert queued.status is Status.QUEUED
    client = await a.connection.client()
    assert client.lease is not None
    await client.lease.revoke(a.session_lease)
    before = a.round_trips
    with pytest.raises(BackendUnavailable, match="session"):
        await a.acquire_or_enqueue(want(3), ttl=None, wait=offer(), policy=POLICY)
    assert a.round_trips - before < 10
    wait = offer()
    told = a.grants.expect(wait.id)
    queued = await a.acquire_or_enqueue(want(4), ttl=None, wait=wait, policy=POLICY)
    assert queued.status is Status.QUEUED
    assert client.kv is not None
    prefix = a.queue_prefix(held.key)
    entries = await client.kv.get(prefix, etcd3aio.prefix_range_end(prefix))
    assert entries.kvs and all(kv.lease for kv in entries.kvs), entries.kvs
    await b.release_and_handoff(held.key, owner=held.owner, policy=POLICY)
    notice = await asyncio.wait_for(told, 10)
    assert notice.locks and notice.locks[0].pull.num == 4


async def test_an_answer_given_with_a_hold_is_counted_in_its_record_which_reads_as_before(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    """A request of the holder's pull that does not wait, answered through another replica
    with the hold (held already), is counted in the lock's record: ``Told``, beside
    Atlantis's fields, written with the answer. The record reads as the same lock, with the
    same token (as a replica of the previous release reads it: the codec ignores the field),
    a refresh keeps the count, and the next grant of the key starts without one."""
    a, b = etcd_replicas
    held = await grant(a, want(1))
    again = await b.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=POLICY)
    assert again.status is Status.GRANTED and not again.fresh and again.locks == (held,)
    client = await a.connection.client()
    assert client.kv is not None

    async def stored() -> Any:
        assert client.kv is not None
        found = await client.kv.get(a.lock_key(held.key))
        assert len(found.kvs) == 1, found
        return found.kvs[0]

    record = await stored()
    assert json.loads(record.value)["Told"] == {"Tellers": [""], "Unheard": False}
    assert codec.read(bytes(record.value), key=held.key, side="enhanced") == held
    assert await a.get(held.key) == held
    twice = await a.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=POLICY)
    assert twice.locks == (held,)
    assert (await stored()).mod_revision == record.mod_revision  # nothing new to count
    refreshed = await a.refresh(held.key, held.owner, timedelta(minutes=5))
    assert refreshed.fencing_token == held.fencing_token
    assert json.loads((await stored()).value)["Told"] == {"Tellers": [""], "Unheard": False}
    await b.release_and_handoff(held.key, owner=held.owner, policy=POLICY)
    anew = await grant(a, want(1))
    assert anew.fencing_token > held.fencing_token
    assert "Told" not in json.loads((await stored()).value)


async def test_a_user_without_write_rights_is_answered_at_once(tmp_path: Path) -> None:
    """A user etcd lets read the prefix but not write it: every commit is refused
    (``PERMISSION_DENIED``), which the step took for a lost answer and ran again for the
    call's 5 s (85 round trips) before answering ``unavailable``. etcd applied nothing it
    refused so, and asking again changes nothing: the step answers at once, naming it."""
    with started(tmp_path / "etcd") as cluster:
        await auth_on(cluster, password="root-secret")
        await reader(cluster, root_password="root-secret", name="reader",
                     password="reader-secret", prefix=b"/read-only/")
        store = EtcdBackend(EtcdConnection(EtcdSettings(
            endpoints=tuple(cluster.endpoints), username="reader", password="reader-secret")),
            prefix="/read-only/")
        try:
            await store.ping()  # reading is allowed
            before = store.round_trips
            with pytest.raises(BackendUnavailable, match="PERMISSION_DENIED"):
                await grant(store, want(1))
            assert store.round_trips - before <= 3
        finally:
            await store.close()


async def test_a_step_whose_answer_was_lost_after_etcd_applied_it_answers_what_it_did(
    etcd_cluster: EtcdCluster, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """etcd applies a step's transaction and its answer is lost (the member applied it, then
    froze): the step runs again on fresh reads, which show what the first attempt did. It
    answers that: an acquire is a fresh grant (its ``acquired`` event, its lease timer set),
    a release that handed the key to a waiter released the lock (its event names the waiter,
    the hand-off counted), one with nobody waiting released the lock. Before, the rerun took
    the grant for the pull's earlier hold (not fresh: no event, no lease timer), the release
    for another pull's key (``LockNotOwned``, 409, for a lock it had released) and the plain
    release for nothing released."""
    heard = Heard(etcd_config(etcd_cluster, etcd_prefix, enabled=True))
    backend, locker, seen, metrics = heard.backend, heard.locker, heard.seen, heard.metrics
    connection = backend.connection
    sent = connection.transact
    lost = LostAnswers(SimpleNamespace(transact=sent), losing=("transact",), applied=0)

    def transact(client: Any, request: Any, *, read: bool = False) -> Any:
        if not read and lost.applied:  # the next write: applied, its answer lost
            return lost.transact(client, request, read=read)
        return sent(client, request, read=read)

    monkeypatch.setattr(connection, "transact", transact)
    try:
        asked = request_for(pull=1, ttl=timedelta(minutes=5))
        lost.applied = 1
        taken = await locker.acquire(asked)
        assert lost.sent == 1 and not lost.applied
        assert taken.acquired and taken.lock is not None and taken.fresh, taken
        assert [e.type for e in seen] == ["acquired"], seen
        assert asked.key in locker.leases.armed()
        waiting = asyncio.ensure_future(locker.acquire(request_for(
            pull=2, wait=timedelta(seconds=30))))
        await asyncio.wait_for(heard.queued.wait(), 10)
        lost.applied = 1
        released = await locker.release(asked.key, owner=("acme/infra", 1))
        assert lost.sent == 2 and released == taken.lock
        handed = await asyncio.wait_for(waiting, 10)
        assert handed.acquired and handed.lock is not None and handed.lock.pull.num == 2
        release = next(e for e in seen if e.type == "released")
        assert len(release.details["handedTo"]) == 1
        assert metrics.registry.get_sample_value("enhanced_locking_handoffs_total") == 1
        lost.applied = 1  # a release nobody waits behind: it released the lock, not nothing
        assert await locker.release(asked.key, owner=("acme/infra", 2)) == handed.lock
        assert lost.sent == 3 and await locker.get(asked.key) is None
    finally:
        await backend.close()


async def test_a_lock_its_lease_deleted_is_told_expired_by_the_replica_that_hands_its_key_on(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    """Replica A grants a lock with a lease and is gone (nothing of it expires the lock);
    replica B has a waiter on the key and no lease timer for the lock (queued in the store
    alone). etcd deletes the lock when its lease ends; B's watch of deletions hands the key
    to its waiter, and B's locker tells it as the lease timer would: an ``expired`` event
    naming the waiter, a lease expiration and a hand-off counted. Before, that hand-off and
    the lock's end were told nowhere."""
    config = etcd_config(etcd_cluster, etcd_prefix, enabled=True)
    a = EtcdBackend.from_config(config, "enhanced")
    heard = Heard(config)
    b = heard.backend
    try:
        held = await grant(a, want(1), ttl=timedelta(milliseconds=500))
        wait = offer()
        told = b.grants.expect(wait.id)
        queued = await b.acquire_or_enqueue(want(2), ttl=None, wait=wait, policy=POLICY)
        assert queued.status is Status.QUEUED
        notice = await asyncio.wait_for(told, 10)  # etcd's lease ends a second or two after
        assert notice.locks and notice.locks[0].pull.num == 2
        expired = [e for e in heard.seen if e.type == "expired"]
        assert len(expired) == 1 and expired[0].lock == held, heard.seen
        assert list(expired[0].details["handedTo"]) == [wait.id]
        registry = heard.metrics.registry
        assert registry.get_sample_value("enhanced_locking_handoffs_total") == 1
        assert registry.get_sample_value("enhanced_locking_lease_expirations_total") == 1
    finally:
        await a.close()
        await heard.locker.close()
        await b.close()


async def test_a_waiter_granted_just_before_its_session_lapsed_is_answered_with_its_grant(
    etcd_cluster: EtcdCluster, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Replica A's caller waits; replica B releases the key and hands it to A's waiter, and
    A's session lease ends before A hears of the grant (A cut off from etcd meanwhile: here
    its deliveries are dropped and the lease revoked), taking the grant's notice with it. The
    lock itself stays: the caller is answered with it. Before, it was told ``unavailable``
    and the lock (no TTL) stayed held by a pull that was never told."""
    config = etcd_config(etcd_cluster, etcd_prefix, enabled=True)
    heard = Heard(config)
    a, b = heard.backend, EtcdBackend.from_config(config, "enhanced")
    try:
        mine = await grant(b, want(1))
        waiting = asyncio.ensure_future(heard.locker.acquire(request_for(
            pull=2, wait=timedelta(seconds=30))))
        await asyncio.wait_for(heard.queued.wait(), 10)
        monkeypatch.setattr(a, "_heard", lambda waiter_id, kv: False)  # A hears nothing
        handoff = await b.release_and_handoff(mine.key, owner=mine.owner, policy=POLICY)
        assert len(handoff.granted) == 1
        client = await b.connection.client()
        assert client.lease is not None
        await client.lease.revoke(a.session_lease)
        answer = await asyncio.wait_for(waiting, 15)  # the next renewal finds it gone
        assert answer.acquired and answer.lock is not None, answer
        assert answer.lock == handoff.granted[0].locks[0]
    finally:
        await heard.locker.close()
        await a.close()
        await b.close()
