"""What a waiter is told on etcd by the read of notices every ``WATCH_CHECK`` seconds.

A waiting replica hears of its waiters' notices through a watch, and, for a watch whose
member is frozen, reads the notices every 2 s. That read must tell a waiter only what is
its own: a waiter with a request ID keeps its ID when retried, and what its earlier waiter
was told while its caller was away (a grant since taken back, a cancel) is not the retry's
answer. A notice it cannot read is skipped, the next ones still delivered; and a watch that
keeps up is left alone (the read may find a notice a moment before the watch brings it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
from collections.abc import Callable
from datetime import timedelta

import etcd3aio
import pytest
from tests.support.etcd_fixtures import QUEUE_POLICY as POLICY
from tests.support.etcd_fixtures import etcd_config, grant
from tests.support.etcd_server import EtcdCluster
from tests.support.locks import candidate_for, request_for

from enhanced_locking.backends import codec
from enhanced_locking.backends.etcd_connection import WATCH_CHECK, Watch
from enhanced_locking.backends.etcd_store import _KV, EtcdBackend
from enhanced_locking.backends.waiting import Notice, Status, Wait
from enhanced_locking.types import Candidate, Lock

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(90)]

CHECKS = 2 * WATCH_CHECK + 1
"""Long enough for two reads of the notices."""


def want(pull: int, path: str = "envs/notices") -> Candidate:
    return candidate_for(request_for(repo="acme/infra", path=path, pull=pull))


def retried_offer() -> Wait:
    """A waiter's offer with a request ID: its retry keeps the ID."""
    request_id = "r" + secrets.token_hex(6)
    return Wait(id=request_id, timeout=timedelta(seconds=60), request_id=request_id,
                caller=secrets.token_hex(8))


class SlowWatch(EtcdBackend):
    """A replica whose watch of notices hands each one on ``LAG`` seconds late (its read
    every ``WATCH_CHECK`` seconds finds most notices first)."""

    LAG = 0.9 * WATCH_CHECK

    async def _watch_prefix(self, client: etcd3aio.Etcd3Client, watch: Watch,
                            handle: Callable[[bytes, _KV, _KV], None]) -> None:
        if not watch.key.endswith(b"notice/"):
            return await super()._watch_prefix(client, watch, handle)
        loop = asyncio.get_running_loop()

        def late(key: bytes, kv: _KV, prev: _KV) -> None:
            loop.call_later(self.LAG, handle, key, kv, prev)

        return await super()._watch_prefix(client, watch, late)


async def queue(backend: EtcdBackend, candidate: Candidate,
                offer: Wait) -> asyncio.Future[Notice]:
    """``offer`` queued through ``backend``, its caller waiting there: what it is told."""
    told = backend.grants.expect(offer.id)
    outcome = await backend.acquire_or_enqueue(candidate, ttl=None, wait=offer, policy=POLICY)
    assert outcome.status is Status.QUEUED, outcome
    return told


async def queued_again(backend: EtcdBackend, offer: Wait) -> asyncio.Future[Notice]:
    """``offer``'s retry (pull 2), queued again through ``backend``: what it is told, checked
    to be nothing while the notices are read twice."""
    told = await queue(backend, want(2), dataclasses.replace(offer, caller=secrets.token_hex(8)))
    await asyncio.sleep(CHECKS)
    assert not told.done(), told.result()
    return told


async def test_a_retry_queued_again_is_not_told_of_the_grant_its_earlier_waiter_lost(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    a, _ = etcd_replicas
    first = await grant(a, want(1))
    offer = retried_offer()
    left = await queue(a, want(2), offer)
    a.grants.forget(offer.id, left)  # its caller leaves; the waiter stays queued
    # The key is handed to pull 2 while nobody listens, force-unlocked, and taken by pull 3.
    await a.release_and_handoff(first.key, owner=first.owner, policy=POLICY)
    await a.force_unlock(first.key, policy=POLICY)
    third = await grant(a, want(3))
    # Pull 2's retry finds its grant gone and is queued again: not told of it.
    told = await queued_again(a, offer)
    assert [lock.pull.num for lock in await a.holders(first.key)] == [3]
    # Its own grant comes once pull 3 lets the key go.
    await a.release_and_handoff(third.key, owner=third.owner, policy=POLICY)
    notice = await asyncio.wait_for(told, 10)
    assert [lock.pull.num for lock in notice.locks] == [2]
    assert notice.locks[0].fencing_token > third.fencing_token


async def test_a_retry_queued_again_is_not_told_its_earlier_waiter_was_cancelled(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    a, _ = etcd_replicas
    holder = await grant(a, want(1))
    offer = retried_offer()
    left = await queue(a, want(2), offer)
    a.grants.forget(offer.id, left)  # its caller leaves
    cancelled = await a.cancel(holder.key, offer.id)  # an admin cancels the waiter meanwhile
    assert cancelled.removed
    told = await queued_again(a, offer)  # not told of the cancel
    assert [waiter.id for waiter in await a.queue(holder.key)] == [offer.id]
    await a.release_and_handoff(holder.key, owner=holder.owner, policy=POLICY)
    notice = await asyncio.wait_for(told, 10)
    assert [lock.pull.num for lock in notice.locks] == [2]


async def test_a_notice_that_cannot_be_read_is_skipped_and_the_next_one_delivered(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend], caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = etcd_replicas
    other = await grant(b, want(1, "envs/other"))
    odd = Wait(id=secrets.token_hex(8), timeout=timedelta(seconds=60))
    odd_told = await queue(a, want(2, "envs/other"), odd)
    holder = await grant(b, want(1))
    told = await queue(a, want(2), Wait(id=secrets.token_hex(8), timeout=timedelta(seconds=60)))
    # A notice another release wrote, for a waiter waiting here: neither JSON nor a reason.
    client = await a.connection.client()
    assert client.kv is not None
    with caplog.at_level(logging.WARNING, logger="enhanced_locking.backends.etcd_store"):
        await client.kv.put(a.notice_key(odd.id), b'{"reason": "from-a-later-release"')
        await asyncio.sleep(CHECKS)  # the read has met it
        # Granted by the other replica: this one hears of it only through the watch or read.
        await b.release_and_handoff(holder.key, owner=holder.owner, policy=POLICY)
        notice = await asyncio.wait_for(told, WATCH_CHECK + 5)
    assert [lock.pull.num for lock in notice.locks] == [2]
    assert any("cannot be read" in r.getMessage() for r in caplog.records)
    assert not any(odd.id in r.getMessage() for r in caplog.records)  # no waiter's ids logged
    a.grants.forget(odd.id, odd_told)
    await b.release_and_handoff(other.key, owner=other.owner, policy=POLICY)


async def test_a_watch_that_keeps_up_is_not_started_again(
    etcd_cluster: EtcdCluster, etcd_prefix: str, caplog: pytest.LogCaptureFixture,
) -> None:
    config = etcd_config(etcd_cluster, etcd_prefix)
    a = SlowWatch.from_config(config, "enhanced")
    b = EtcdBackend.from_config(config, "enhanced")
    try:
        holder = await grant(b, want(1))
        with caplog.at_level(logging.WARNING, logger="enhanced_locking.backends.etcd_store"):
            for pull in range(2, 6):
                told = await queue(a, want(pull), Wait(id=secrets.token_hex(8),
                                                       timeout=timedelta(seconds=60)))
                await b.release_and_handoff(holder.key, owner=holder.owner, policy=POLICY)
                notice = await asyncio.wait_for(told, WATCH_CHECK + 5)
                holder, = notice.locks
                assert holder.pull.num == pull
                # Rather some time after the release: the read may come before the watch.
                await asyncio.sleep(WATCH_CHECK * (pull % 3) / 3)
            await asyncio.sleep(CHECKS)
        assert not any("watching again" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        await a.close()
        await b.close()



async def batch_waiting(a: EtcdBackend, b: EtcdBackend) -> tuple[
        Candidate, Candidate, Lock, Wait, asyncio.Future[Notice]]:
    """Pull 2's batch of ``net`` and ``dns`` queued through ``a``, pull 1 holding ``dns``
    (taken through ``b``): the two keys, pull 1's lock, the offer and what it is told."""
    net, dns = want(2, "envs/net"), want(2, "envs/dns")
    holder = await grant(b, want(1, "envs/dns"))
    offer = Wait(id=secrets.token_hex(8), timeout=timedelta(seconds=60))
    told = a.grants.expect(offer.id)
    queued = await a.acquire_batch((net, dns), ttl=None, wait=offer, policy=POLICY)
    assert queued.status is Status.QUEUED, queued
    return net, dns, holder, offer, told


async def test_a_batch_grant_another_replica_made_names_the_key_its_pull_held_already(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    """Pull 2's batch of ``net`` and ``dns`` waits through replica ``a`` (pull 1 holds
    ``dns``); the pull's other request takes ``net`` meanwhile. Pull 1 lets ``dns`` go
    through ``b``: ``b`` grants the batch, ``net`` answered with the pull's hold unchanged, and
    ``a`` reads the notice ``b`` wrote. It names ``net`` as the pull's already, so a give-back
    of the batch (its caller gone, or the router backing off) leaves that hold. Before, a
    notice read from etcd said nothing of it, and ``net`` was given back with ``dns``."""
    a, b = etcd_replicas
    net, _, holder, offer, told = await batch_waiting(a, b)
    own = await grant(b, net)
    await b.release_and_handoff(holder.key, owner=holder.owner, policy=POLICY)
    notice = await asyncio.wait_for(told, WATCH_CHECK + 10)
    assert notice.fresh and notice.locks[0] == own, notice
    assert notice.kept == frozenset({net.key}), notice.kept
    a.grants.forget(offer.id, told)


async def test_a_notice_an_older_replica_wrote_does_not_say_which_keys_were_kept(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    # Written before notices named the keys a pull held already (a rolling upgrade): read as
    # not said, so a give-back falls back to the look before the grant, as before.
    a, _ = etcd_replicas
    lock = await grant(a, want(1))
    old = {"locks": [codec.encode(lock)], "reason": None, "fresh": True, "waiter": None}
    _, notice = a.notice_from(_KV(json.dumps(old).encode(), mod=lock.fencing_token))
    assert notice.locks == (lock,) and notice.fresh and notice.kept is None


async def test_a_batch_granted_just_before_its_session_lapsed_names_the_key_its_pull_held(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, but replica ``a`` hears nothing of the grant and its session lease ends
    (cut off from etcd: here its deliveries are dropped and the lease revoked), taking the
    notice with it. The caller is answered from the holders; the answer still names ``net``
    as the pull's already, read from the notice as etcd had it at the grant. Before, the
    answer was rebuilt from the holders alone and said nothing (``kept`` None), so a
    give-back of the batch released the hold the pull's other request took while it waited."""
    a, b = etcd_replicas
    net, dns, holder, offer, told = await batch_waiting(a, b)
    monkeypatch.setattr(a, "_heard", lambda waiter_id, kv: False)  # a hears nothing
    own = await grant(b, net)
    handoff = await b.release_and_handoff(holder.key, owner=holder.owner, policy=POLICY)
    assert len(handoff.granted) == 1, handoff
    client = await b.connection.client()
    assert client.lease is not None
    await client.lease.revoke(a.session_lease)
    notice = await asyncio.wait_for(told, 20)  # the next renewal finds the lease gone
    assert notice.fresh and {lock.key for lock in notice.locks} == {net.key, dns.key}, notice
    assert own in notice.locks, notice
    assert notice.kept == frozenset({net.key}), notice.kept
    a.grants.forget(offer.id, told)


async def test_an_upgrade_granted_just_before_its_session_lapsed_is_answered_as_held_already(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pull 1 and pull 2 hold ``net`` shared; pull 1 asks for it exclusive through replica
    ``a`` and waits. ``b`` upgrades pull 1's hold once pull 2 lets go, and ``a``, hearing
    nothing, loses its session lease with the notice. The answer rebuilt from the holders is
    as the grant's own: its pull held the key already (not fresh), so a caller gone as it is
    answered gives nothing back, and as an upgrade (its new token announced). Before, it was
    answered fresh, and the give-back freed the pull's hold of the key."""
    a, b = etcd_replicas
    shared = [candidate_for(request_for(repo="acme/infra", path="envs/net", pull=pull)
                            .model_copy(update={"mode": "shared"})) for pull in (1, 2)]
    await grant(b, shared[0])
    other = await grant(b, shared[1])
    offer = Wait(id=secrets.token_hex(8), timeout=timedelta(seconds=60))
    told = a.grants.expect(offer.id)
    queued = await a.acquire_or_enqueue(want(1, "envs/net"), ttl=None, wait=offer,
                                        policy=POLICY)
    assert queued.status is Status.QUEUED, queued
    monkeypatch.setattr(a, "_heard", lambda waiter_id, kv: False)  # a hears nothing
    handoff = await b.release_and_handoff(other.key, owner=other.owner, policy=POLICY)
    assert len(handoff.granted) == 1, handoff
    client = await b.connection.client()
    assert client.lease is not None
    await client.lease.revoke(a.session_lease)
    notice = await asyncio.wait_for(told, 20)  # the next renewal finds the lease gone
    assert [(lock.pull.num, lock.mode) for lock in notice.locks] == [(1, "exclusive")], notice
    assert not notice.fresh, notice
    assert notice.upgraded == frozenset({notice.locks[0].key}), notice
    a.grants.forget(offer.id, told)
