"""A replica that dies while its callers wait: its waiters stay queued in etcd until its
session lease lapses (``SESSION_TTL``, 10 s after its last renewal). A release inside that
window must not hand the key to such a waiter (its caller is gone, nobody would be told, and
the lock would stay held until its TTL, or for good without one) while a live waiter behind
it waits on: a waiter whose replica has not renewed its session for ``GONE_AFTER`` seconds is
passed over."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from tests.support.etcd_fixtures import QUEUE_POLICY as POLICY
from tests.support.etcd_fixtures import etcd_config, grant
from tests.support.etcd_server import EtcdCluster
from tests.support.locks import candidate_for, request_for

from enhanced_locking.backends.etcd_store import GONE_AFTER, SESSION_TTL, EtcdBackend
from enhanced_locking.backends.waiting import Notice, Status, Wait
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import EventBus
from enhanced_locking.locking import EnhancedLocker
from enhanced_locking.metrics import Metrics
from enhanced_locking.types import Candidate, Event, Lock, Priority, Reason

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(60)]


def want(pull: int, priority: Priority = Priority.NORMAL) -> Candidate:
    return candidate_for(request_for(repo="acme/infra", path="envs/prod", pull=pull,
                                     priority=priority))


def offer() -> Wait:
    return Wait(id=secrets.token_hex(8), timeout=timedelta(seconds=60))


async def queued(backend: EtcdBackend, pull: int, position: int = 1,
                 priority: Priority = Priority.NORMAL,
                 ) -> tuple[Wait, asyncio.Future[Notice]]:
    """A caller of ``backend`` waiting for pull ``pull``'s lock (at ``priority``), queued at
    ``position``: its wait, and the future it hears on."""
    wait = offer()
    heard = backend.grants.expect(wait.id)
    outcome = await backend.acquire_or_enqueue(want(pull, priority), ttl=None, wait=wait,
                                               policy=POLICY)
    assert outcome.status is Status.QUEUED and outcome.position == position, outcome
    return wait, heard


async def killed(backend: EtcdBackend) -> None:
    """``backend`` as a SIGKILL of its process leaves it: its renewals, watches and other
    work stop and its connection closes, with nothing revoked or deleted in etcd."""
    backend._closed = True
    tasks = [t for t in (backend._session, backend._watch, backend._deletions,
                         *backend._tasks) if t is not None]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await backend.connection.close()


async def a_dead_waiter(a: EtcdBackend, b: EtcdBackend) -> tuple[Lock, Wait, int]:
    """``b`` holds pull 1's lock, a caller of ``a`` waits for it (pull 2), and ``a`` is gone
    (``killed``): the lock, the dead replica's wait and its session lease."""
    held = await grant(b, want(1))
    dead, _ = await queued(a, 2)
    lease = a.session_lease
    await killed(a)
    return held, dead, lease


async def unrenewed(witness: EtcdBackend, lease: int) -> None:
    """Until etcd says ``lease`` has gone unrenewed for longer than ``GONE_AFTER`` (its
    waiters are still in etcd: the lease has time left)."""
    client = await witness.connection.client()
    assert client.lease is not None
    while True:
        left = await client.lease.time_to_live(lease)
        assert left.TTL >= 0, "the session lease lapsed before the release: nothing tested"
        if left.grantedTTL - left.TTL > GONE_AFTER:
            return
        await asyncio.sleep(0.1)


class Told:
    """An enhanced locker over a new etcd backend of ``config``: every event it publishes
    kept in ``seen``, its metrics in ``metrics``."""

    def __init__(self, config: EnhancedLockingConfig) -> None:
        self.backend = EtcdBackend.from_config(config, "enhanced")
        self.seen: list[Event] = []
        self.metrics = Metrics()
        events = EventBus()
        events.subscribe(self.seen.append)
        self.locker = EnhancedLocker(self.backend, settings=lambda: config, events=events,
                                     metrics=self.metrics)

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def replicas(cluster: EtcdCluster, prefix: str, **settings: Any,
                   ) -> AsyncIterator[tuple[EtcdBackend, Told]]:
    """Two replicas on ``cluster`` under ``prefix`` with ``settings``: a bare store (the
    one to die) and a store under a locker (what it tells and counts kept), closed after."""
    config = etcd_config(cluster, prefix, enabled=True, **settings)
    a = EtcdBackend.from_config(config, "enhanced")
    told = Told(config)
    try:
        yield a, told
    finally:
        await told.locker.close()
        await a.close()
        await told.backend.close()


async def test_a_dead_replicas_waiter_is_passed_over_and_the_key_goes_to_the_live_one(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    """The dead replica's waiter, first in line, is passed over (and counted in
    ``enhanced_locking_waiters_passed_over_total``): the key goes to the live one."""
    async with replicas(etcd_cluster, etcd_prefix) as (a, seen):
        b = seen.backend
        held, dead, lease = await a_dead_waiter(a, b)
        live, told = await queued(b, 3, position=2)
        await unrenewed(b, lease)
        # Still within the session lease's window: the dead replica's waiter is first in line.
        assert [w.id for w in await b.queue(held.key, policy=POLICY)] == [dead.id, live.id]
        handoff = await b.release_and_handoff(held.key, owner=held.owner, policy=POLICY)
        assert [g.waiter.id for g in handoff.granted] == [live.id]
        assert [w.id for w in handoff.timed_out] == [dead.id]
        assert b.passed_over.total == 1
        assert seen.count("enhanced_locking_waiters_passed_over_total") == 1
        notice = await asyncio.wait_for(told, 10)
        assert notice.locks and notice.locks[0].pull.num == 3
        assert await b.queue(held.key, policy=POLICY) == []
        holder = await b.get(held.key)
        assert holder is not None and holder.pull.num == 3


async def test_a_dead_replicas_only_waiter_is_passed_over_and_the_key_stays_free(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    a, b = etcd_replicas
    held, dead, lease = await a_dead_waiter(a, b)
    await unrenewed(b, lease)
    assert [w.id for w in await b.queue(held.key, policy=POLICY)] == [dead.id]
    handoff = await b.release_and_handoff(held.key, owner=held.owner, policy=POLICY)
    assert handoff.released == held and handoff.granted == ()
    assert [w.id for w in handoff.timed_out] == [dead.id]
    assert await b.get(held.key) is None
    # Told, should its replica be alive after all (only slow): the store went away.
    client = await b.connection.client()
    assert client.kv is not None
    stored = await client.kv.get(b.notice_key(dead.id))
    assert stored.kvs, "no notice for the waiter passed over"
    notice = json.loads(stored.kvs[0].value)
    assert notice["reason"] == Reason.UNAVAILABLE.value and notice["locks"] == []
    again = await grant(b, want(4))
    assert again.fencing_token > held.fencing_token


async def test_a_grant_to_a_replica_that_died_a_moment_before_is_taken_back_and_told(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    """A releases too soon after the waiter's replica died for it to be passed over: the
    key is handed to the dead replica's waiter. Once that replica's session has gone
    unrenewed past ``GONE_AFTER`` and not since the grant, the replica that made the grant
    takes it back: the key goes to the live waiter behind, told as a lock whose lease ran
    out (its ``expired`` event naming the waiter it went to, counted). Before, the lock
    stayed held by a pull whose caller was gone (here, with no TTL, for good)."""
    async with replicas(etcd_cluster, etcd_prefix) as (a, told):
        b = told.backend
        held = await grant(b, want(1))
        dead, _ = await queued(a, 2)
        live, heard = await queued(b, 3, position=2)
        await killed(a)
        handoff = await b.release_and_handoff(held.key, owner=held.owner, policy=POLICY)
        assert [g.waiter.id for g in handoff.granted] == [dead.id]
        given = handoff.granted[0].locks[0]
        notice = await asyncio.wait_for(heard, 2 * SESSION_TTL)
        assert notice.locks and notice.locks[0].pull.num == 3
        assert notice.locks[0].fencing_token > given.fencing_token
        assert b.taken_back.total == 1
        assert told.count("enhanced_locking_grants_taken_back_total") == 1
        expired = [e for e in told.seen if e.type == "expired"]
        assert len(expired) == 1 and expired[0].lock == given, told.seen
        assert list(expired[0].details["handedTo"]) == [live.id]
        assert told.count("enhanced_locking_lease_expirations_total") == 1
        assert told.count("enhanced_locking_handoffs_total") == 1
        holder = await b.get(held.key)
        assert holder is not None and holder.pull.num == 3


async def taken_back(backend: EtcdBackend) -> None:
    """Until ``backend`` has let go of every grant it made to another replica's waiters (taken
    back, or found taken: ``_claims_of``), at most twice a session's life."""
    for _ in range(20 * SESSION_TTL):
        if not backend._claims:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the grant to the dead replica's waiter is still followed")


async def test_a_grant_taken_back_leaves_the_hold_its_pull_was_answered_with_meanwhile(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    """The key is handed to the waiter of a replica that died a moment before (pull 2), and
    a request of pull 2 through a live replica that does not wait is answered with that hold
    (held already: its pull's). The take-back gives the grant back as a caller gone would,
    and leaves what another request of the pull was told it holds. Before, it released the
    lock by owner and token under the caller told it holds it, and the key was free."""
    async with replicas(etcd_cluster, etcd_prefix) as (a, told):
        b = told.backend
        held = await grant(b, want(1))
        await queued(a, 2)
        await killed(a)
        handoff = await b.release_and_handoff(held.key, owner=held.owner, policy=POLICY)
        given = handoff.granted[0].locks[0]
        direct = await b.acquire_or_enqueue(want(2), ttl=None, wait=None, policy=POLICY)
        assert direct.status is Status.GRANTED and not direct.fresh, direct
        assert direct.locks[0].fencing_token == given.fencing_token
        await taken_back(b)
        assert b.taken_back.total == 0
        holder = await b.get(held.key)
        assert holder is not None and holder.fencing_token == given.fencing_token, (
            f"the take-back freed the hold pull 2 was told it has: {holder}")
        other = await b.acquire_or_enqueue(want(3), ttl=None, wait=None, policy=POLICY)
        assert other.status is Status.HELD, other


async def test_a_batch_grant_taken_back_leaves_the_locks_its_pull_held_already(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    """A dead replica's batch waiter of pull 2 is granted one key anew and another that
    pull 2 held already (through a live replica). The take-back releases the key it granted
    (the next waiter gets it) and leaves the one its pull held before. Before, it released
    both: the hold pull 2 had before its batch asked was freed under it."""
    async with replicas(etcd_cluster, etcd_prefix) as (a, told):
        b = told.backend
        blocked = want(2)
        mine = candidate_for(request_for(repo="acme/infra", path="envs/stage", pull=2))
        held = await grant(b, want(1))
        before = await grant(b, mine)
        wait = offer()
        a.grants.expect(wait.id)
        queued_batch = await a.acquire_batch((blocked, mine), ttl=None, wait=wait,
                                             policy=POLICY)
        assert queued_batch.status is Status.QUEUED, queued_batch
        await killed(a)
        _, heard = await queued(b, 3, position=2)
        handoff = await b.release_and_handoff(held.key, owner=held.owner, policy=POLICY)
        assert [g.waiter.id for g in handoff.granted] == [wait.id]
        assert handoff.granted[0].kept == frozenset({mine.key})
        await taken_back(b)
        notice = await asyncio.wait_for(heard, 2 * SESSION_TTL)
        assert notice.locks and notice.locks[0].pull.num == 3, notice
        assert b.taken_back.total == 1
        still = await b.get(mine.key)
        assert still == before, f"the take-back freed the lock pull 2 held before: {still}"


async def test_a_grant_taken_back_goes_on_in_the_order_of_the_configured_queue_policy(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    """With the priority queue on, a grant taken back goes to the high-priority waiter
    queued after a normal one, as every other hand-off of the key would. Before, the
    take-back served the queue under the default policy (first come, first served): the
    normal waiter got the key."""
    async with replicas(etcd_cluster, etcd_prefix, priority_queue=True) as (a, told):
        b = told.backend
        held = await grant(b, want(1))
        dead, _ = await queued(a, 2, priority=Priority.HIGH)
        normal, later = await queued(b, 3, position=2)
        _, heard = await queued(b, 4, position=2, priority=Priority.HIGH)
        await killed(a)
        handoff = await b.release_and_handoff(held.key, owner=held.owner,
                                              policy=told.locker.policy())
        assert [g.waiter.id for g in handoff.granted] == [dead.id]
        first, _ = await asyncio.wait((heard, later), timeout=2 * SESSION_TTL,
                                      return_when=asyncio.FIRST_COMPLETED)
        assert first == {heard}, "the grant taken back went to the normal waiter"
        notice = heard.result()
        assert notice.locks and notice.locks[0].pull.num == 4
        assert b.taken_back.total == 1
        holder = await b.get(held.key)
        assert holder is not None and holder.pull.num == 4
        assert [w.id for w in await b.queue(held.key, policy=told.locker.policy())] == [
            normal.id]


async def test_a_grant_its_replica_took_is_not_taken_back_when_its_renewals_stop(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    """A's renewals stop just before another replica grants its waiter the key (as a replica
    cut off from etcd's leader, or stopped, after it heard), and A takes the grant: its
    caller is told it, and the replica that made the grant, finding A's session unrenewed
    past ``GONE_AFTER`` since, does not take back what A took (the caller holds it)."""
    a, b = etcd_replicas
    held = await grant(b, want(1))
    wait, heard = await queued(a, 2)
    lease, session = a.session_lease, a._session
    assert session is not None
    session.cancel()  # no renewal from here on
    await asyncio.gather(session, return_exceptions=True)
    calls = (a.round_trips, b.round_trips)
    handoff = await b.release_and_handoff(held.key, owner=held.owner, policy=POLICY)
    assert [g.waiter.id for g in handoff.granted] == [wait.id]
    assert b._claims, "the grant to another replica's waiter is not followed"
    notice = await asyncio.wait_for(heard, 10)
    assert notice.locks and notice.locks[0].pull.num == 2
    assert a.round_trips - calls[0] == 1  # its take of the grant
    await unrenewed(b, lease)
    for _ in range(100):  # the follow-up has looked past GONE_AFTER and let it go
        if not b._claims:
            break
        await asyncio.sleep(0.1)
    assert not b._claims
    assert b.taken_back.total == 0
    # The release, the lease checks that followed the grant (one a second, until its replica
    # had gone unrenewed past GONE_AFTER) and the take-back's step that found it taken: 4
    # before those checks were counted.
    assert b.round_trips - calls[1] >= 1 + GONE_AFTER
    assert await b.get(held.key) == notice.locks[0]
