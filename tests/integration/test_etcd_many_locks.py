"""The etcd store with many locks in a namespace: reads past gRPC's default receive limit.

About 7,000 locks of 600 bytes (4 MiB) made every read of the whole lock range (a list, an
export, each part of a release by pull) an answer larger than gRPC's default 4 MiB a message
on the client, which failed it (answered unavailable) for good. And a release by pull ran
its step once per key of a part it had not read the queue of, each run decoding every lock:
about 50 s for a pull of 100 among 10,000.
"""

from __future__ import annotations

import etcd3aio
import pytest
from tests.support.etcd_fixtures import QUEUE_POLICY as POLICY
from tests.support.etcd_fixtures import grant
from tests.support.locks import candidate_for, request_for

from enhanced_locking.backends.etcd_connection import kv_calls
from enhanced_locking.backends.etcd_store import _PAGE, _PULL_PART, EtcdBackend

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(120)]

LOCKS = 10_000
PULLED = 100
"""Locks of pull 7, among the ``LOCKS``; the rest are pull 1's."""
PAD = "x" * 10
"""Makes each lock's value about 600 bytes."""


def path(i: int) -> str:
    return f"envs/{PAD}/{i:05}"


async def test_ten_thousand_locks_are_listed_exported_and_released_by_pull(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    """10,000 locks of about 600 bytes (7 MB in one range read): a list and an export answer
    them all, and a release by pull frees the 100 of one pull, each part reading every lock
    once and its keys' queues together."""
    a, b = etcd_replicas
    templates = {}
    for pull in (1, 7):
        lock = await grant(a, candidate_for(request_for(path=path(0), pull=pull)))
        client = await a.connection.client()
        raw = (await kv_calls(client).get(a.lock_key(lock.key))).kvs[0].value
        templates[pull] = (lock.key, bytes(raw))
        await a.release_by_pull("acme/infra", pull)
    assert 550 <= len(templates[1][1]) <= 700, len(templates[1][1])
    client = await a.connection.client()
    kv = kv_calls(client)
    for first in range(0, LOCKS, 100):
        puts = []
        for i in range(first, first + 100):
            key, raw = templates[7 if i % (LOCKS // PULLED) == 0 else 1]
            key = key.replace(path(0), path(i))
            puts.append(etcd3aio.kv.KVService.txn_op_put(
                a.lock_key(key), raw.replace(path(0).encode(), path(i).encode())))
        await kv.txn([], puts)
    pages = b.pages
    locks = await b.list()
    assert len(locks) == LOCKS
    assert b.pages - pages == LOCKS // _PAGE - 1  # past the first (one of 7 MB before)
    assert sum(lock.pull.num == 7 for lock in locks) == PULLED
    exported, _tokens = await b.export()
    assert len(exported) == LOCKS
    reads = a.reads
    released = await a.release_by_pull("acme/infra", 7, policy=POLICY)
    parts = -(-PULLED // _PULL_PART)
    # A part reads every lock, then every queue of its keys at once: not a read (and a run of
    # the step over every lock) per key.
    assert a.reads - reads <= 2 * parts + 2, a.reads - reads
    assert sorted(lock.key for lock in released) == sorted(
        lock.key for lock in locks if lock.pull.num == 7)
    left = await b.list()
    assert len(left) == LOCKS - PULLED and {lock.pull.num for lock in left} == {1}
    assert await b.list(repo="acme/infra", pull=7) == []
