"""A waiter's record in etcd that does not read (its queue entry or its ``waiter/`` record
written over with bytes that are not a waiter: a bug, a hand edit, a replica of another
version) is passed over like a missing one, as on Redis (``tests/unit/test_redis_waiter_records
.py``): the other waiters are still served, listed and graphed, and a call that meets it never
fails. It failed every call that read the key's queue with the JSON error: the key's own
acquires and releases, and with a concurrency limit (which serves every queue) every acquire
of every key, the wait-for graph (each deadlock check, the queue depth metric) and the wake
after a rule change.
"""

from __future__ import annotations

from datetime import timedelta

import etcd3aio
import pytest
from tests.support.locks import candidate_for, lock_for, request_for

from enhanced_locking.backends.etcd_store import EtcdBackend
from enhanced_locking.backends.waiting import QueuePolicy, Status, Wait
from enhanced_locking.policies import ConcurrencyLimit, PolicyRules

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(120)]

SPOILED = request_for(path="envs/spoiled", pull=1)
OTHER = request_for(path="envs/other", pull=1)
LIMITED = QueuePolicy(rules=PolicyRules(concurrency=[ConcurrencyLimit(name="all", limit=9)]))


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'{"id": "w-spoiled"}'],
                         ids=["not-json", "not-an-object", "fields-missing"])
async def test_a_waiter_record_that_does_not_read_is_passed_over(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend], raw: bytes,
) -> None:
    a, b = etcd_replicas
    policy = QueuePolicy()
    for held in (SPOILED, OTHER):
        assert (await a.acquire(lock_for(held)))[0]
    spoiled, behind = (Wait(id=f"w-{name}", timeout=timedelta(seconds=60))
                       for name in ("spoiled", "behind"))
    for pull, wait in ((2, spoiled), (3, behind)):
        queued = await a.acquire_or_enqueue(
            candidate_for(request_for(path="envs/spoiled", pull=pull)), ttl=None, wait=wait,
            policy=policy)
        assert queued.status is Status.QUEUED
    other = Wait(id="w-other", timeout=timedelta(seconds=60))
    assert (await a.acquire_or_enqueue(candidate_for(request_for(path="envs/other", pull=4)),
                                       ttl=None, wait=other, policy=policy)
            ).status is Status.QUEUED
    etcd = await a.connection.client()
    assert etcd.kv is not None
    prefix = a.queue_prefix(SPOILED.key)
    entries = (await etcd.kv.get(prefix, range_end=etcd3aio.prefix_range_end(prefix))).kvs
    spoiled_entries = [kv.key for kv in entries if kv.key.endswith(b"/w-spoiled")]
    assert len(spoiled_entries) == 1
    for name in (*spoiled_entries, a.waiter_key(spoiled.id)):
        await etcd.kv.put(name, raw)

    # Listed and graphed without it, by another replica too.
    assert [w.id for w in await b.queue(SPOILED.key, policy=policy)] == [behind.id]
    graph = {entry.key: [w.id for w in entry.waiters] for entry in await b.wait_graph()}
    assert graph == {SPOILED.key: [behind.id], OTHER.key: [other.id]}
    # Every queue served under a limit, and an acquire of another key under it.
    assert (await b.wake(policy=LIMITED)).granted == ()
    free = await b.acquire_or_enqueue(candidate_for(request_for(path="envs/free", pull=5)),
                                      ttl=None, wait=None, policy=LIMITED)
    assert free.status is Status.GRANTED
    # Its key's release hands the key to the next waiter that reads.
    handoff = await b.release_and_handoff(SPOILED.key, owner=("acme/infra", 1),
                                          policy=LIMITED)
    assert handoff.released is not None
    assert [g.waiter.id for g in handoff.granted] == [behind.id]
    assert (await b.get(SPOILED.key)) is not None
