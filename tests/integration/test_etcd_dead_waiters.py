"""A replica that dies while its callers wait: its waiters stay queued in etcd until its
session lease lapses (``SESSION_TTL``, 10 s after its last renewal). A release inside that
window must not hand the key to such a waiter (its caller is gone, nobody would be told, and
the lock would stay held until its TTL, or for good without one) while a live waiter behind
it waits on: a waiter whose replica has not renewed its session for ``GONE_AFTER`` seconds is
passed over."""

from __future__ import annotations

import asyncio
import json
import secrets
from datetime import timedelta

import pytest
from tests.support.etcd_fixtures import QUEUE_POLICY as POLICY
from tests.support.etcd_fixtures import etcd_config, grant
from tests.support.etcd_server import EtcdCluster
from tests.support.locks import candidate_for, request_for

from enhanced_locking.backends.etcd_store import GONE_AFTER, EtcdBackend
from enhanced_locking.backends.waiting import Status, Wait
from enhanced_locking.types import Candidate, Reason

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(60)]


def want(pull: int) -> Candidate:
    return candidate_for(request_for(repo="acme/infra", path="envs/prod", pull=pull))


def offer() -> Wait:
    return Wait(id=secrets.token_hex(8), timeout=timedelta(seconds=60))


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


async def test_a_dead_replicas_waiter_is_passed_over_and_the_key_goes_to_the_live_one(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    config = etcd_config(etcd_cluster, etcd_prefix)
    a = EtcdBackend.from_config(config, "enhanced")
    b = EtcdBackend.from_config(config, "enhanced")
    try:
        held = await grant(b, want(1))
        dead = offer()
        a.grants.expect(dead.id)
        queued = await a.acquire_or_enqueue(want(2), ttl=None, wait=dead, policy=POLICY)
        assert queued.status is Status.QUEUED
        live = offer()
        told = b.grants.expect(live.id)
        queued = await b.acquire_or_enqueue(want(3), ttl=None, wait=live, policy=POLICY)
        assert queued.status is Status.QUEUED and queued.position == 2
        lease = a.session_lease
        await killed(a)
        await unrenewed(b, lease)
        # Still within the session lease's window: the dead replica's waiter is first in line.
        assert [w.id for w in await b.queue(held.key, policy=POLICY)] == [dead.id, live.id]
        handoff = await b.release_and_handoff(held.key, owner=held.owner, policy=POLICY)
        assert [g.waiter.id for g in handoff.granted] == [live.id]
        assert [w.id for w in handoff.timed_out] == [dead.id]
        assert b.passed_over == 1
        notice = await asyncio.wait_for(told, 10)
        assert notice.locks and notice.locks[0].pull.num == 3
        assert await b.queue(held.key, policy=POLICY) == []
        holder = await b.get(held.key)
        assert holder is not None and holder.pull.num == 3
    finally:
        await a.close()
        await b.close()


async def test_a_dead_replicas_only_waiter_is_passed_over_and_the_key_stays_free(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    config = etcd_config(etcd_cluster, etcd_prefix)
    a = EtcdBackend.from_config(config, "enhanced")
    b = EtcdBackend.from_config(config, "enhanced")
    try:
        held = await grant(b, want(1))
        dead = offer()
        a.grants.expect(dead.id)
        queued = await a.acquire_or_enqueue(want(2), ttl=None, wait=dead, policy=POLICY)
        assert queued.status is Status.QUEUED
        lease = a.session_lease
        await killed(a)
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
    finally:
        await a.close()
        await b.close()
