"""The lock store after etcd is restored from a backup: what a replica's waiters are told,
and what becomes of what it knew of the keys.

A restore puts etcd back at the backup's history: what was written after it (a waiter's
queue entry, its record) is gone, and the cluster numbers its writes again from the
backup's revision. The backup here is a copy of the member's data directory taken while it
was stopped, and the restore starts the member again on that copy: the same cluster (id,
members), its leases and keys as they were, its revision back (``etcdutl snapshot restore``
of a snapshot taken at that moment does the same to a cluster)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from tests.support.etcd_fixtures import QUEUE_POLICY, etcd_config, grant, started
from tests.support.etcd_server import EtcdCluster
from tests.support.locks import candidate_for, request_for

from enhanced_locking.backends.etcd_store import EtcdBackend
from enhanced_locking.backends.waiting import Notice, Status, Wait
from enhanced_locking.types import BackendUnavailable, Candidate, LockingError, Reason

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(120)]


def want(pull: int, path: str = "envs/prod") -> Candidate:
    return candidate_for(request_for(repo="acme/infra", path=path, pull=pull))


async def queued(backend: EtcdBackend, candidate: Candidate) -> asyncio.Future[Notice]:
    """A caller of ``backend`` queued for ``candidate`` (asserted), waiting up to 10 minutes:
    the future it hears on."""
    wait = Wait(id=secrets.token_hex(8), timeout=timedelta(minutes=10))
    heard = backend.grants.expect(wait.id)
    outcome = await backend.acquire_or_enqueue(candidate, ttl=None, wait=wait,
                                               policy=QUEUE_POLICY)
    assert outcome.status is Status.QUEUED, outcome
    return heard


def backed_up(cluster: EtcdCluster, to: Path) -> None:
    """A copy of the (one) member's data directory in ``to``, taken while it is stopped
    (SIGKILL: with no fsync the page cache keeps every write), then the member started
    again on its own data."""
    member = cluster.members[0]
    cluster.kill(member)
    shutil.copytree(member.data_dir, to)
    cluster.start_member(member)
    cluster.wait_healthy()


def restored(cluster: EtcdCluster, backup: Path) -> None:
    """The member stopped and started again on a copy of ``backup``: etcd as it was then."""
    member = cluster.members[0]
    cluster.kill(member)
    shutil.rmtree(member.data_dir)
    shutil.copytree(backup, member.data_dir)
    cluster.start_member(member)
    cluster.wait_healthy()


async def answering(*backends: EtcdBackend) -> None:
    """Until each of ``backends`` reaches etcd again (its connection's retry after the
    member's restart), 30 s at most."""
    deadline = asyncio.get_running_loop().time() + 30
    for backend in backends:
        while True:
            try:
                await backend.ping()
                break
            except BackendUnavailable:
                assert asyncio.get_running_loop().time() < deadline, "etcd did not answer"
                await asyncio.sleep(0.1)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    with started(tmp_path / "etcd") as etcd:
        yield etcd


async def test_a_waiter_queued_after_the_backup_is_told_when_etcd_is_restored(
    cluster: EtcdCluster, tmp_path: Path,
) -> None:
    """A waiter queued after the backup was taken has no queue entry in the restored etcd:
    nobody will ever grant it. Its session lease (opened before the backup) is restored,
    so the renewals go on. Its caller is told ``unavailable`` once the replica finds etcd's
    history went back, and may ask again. Before, it heard nothing for its whole wait
    (the key freed meanwhile, and taken by anyone who asked)."""
    config = etcd_config(cluster, f"/restored-{secrets.token_hex(4)}/", enabled=True)
    a = EtcdBackend.from_config(config, "enhanced")
    b = EtcdBackend.from_config(config, "enhanced")
    try:
        await grant(b, want(1, "envs/early"))
        early = await queued(a, want(2, "envs/early"))  # opens a's session before the backup
        await grant(b, want(1))
        backed_up(cluster, tmp_path / "backup")
        await answering(a, b)
        late = await queued(a, want(2))
        client = await b.connection.client()
        assert client.kv is not None
        for n in range(20):  # the history after the backup runs on
            await client.kv.put(f"/elsewhere/{n}".encode(), b"x")
        restored(cluster, tmp_path / "backup")
        await answering(b)
        notice = await asyncio.wait_for(late, 30)
        assert notice.reason is Reason.UNAVAILABLE and not notice.locks, notice
        # The waiter queued before the backup is in the restored etcd: it still waits, and
        # is granted when the key is released.
        assert not early.done(), early
        held = want(1, "envs/early")
        await b.release_and_handoff(held.key, owner=held.owner, policy=QUEUE_POLICY)
        granted = await asyncio.wait_for(early, 30)
        assert [lock.owner for lock in granted.locks] == [("acme/infra", 2)], granted
    finally:
        await a.close()
        await b.close()


async def test_a_view_from_before_a_restore_never_grants_a_lock_twice(
    cluster: EtcdCluster, tmp_path: Path,
) -> None:
    """A restore without ``--bump-revision`` gives again the revisions the old history gave
    after the backup. Replica ``a`` grants pull 1 the key after the backup; after the restore
    (``a`` idle meanwhile: it reads nothing), replica ``b`` grants it to pull 2, at the same
    revision. ``a``'s release for pull 1 must not take the key from pull 2, and pull 3 must
    not be granted it. Before, ``a`` released on what it knew of the key (its revision
    matched): pull 2's lock was deleted and pull 3 granted the key while pull 2 held it."""
    config = etcd_config(cluster, f"/restored-{secrets.token_hex(4)}/", enabled=True)
    a = EtcdBackend.from_config(config, "enhanced")
    b = EtcdBackend.from_config(config, "enhanced")
    try:
        await answering(a, b)
        backed_up(cluster, tmp_path / "backup")
        await answering(a, b)
        first = await grant(a, want(1))
        restored(cluster, tmp_path / "backup")
        await answering(b)
        second = await grant(b, want(2))
        assert second.fencing_token == first.fencing_token  # (the same revision: the case)
        held = want(1)
        with contextlib.suppress(LockingError):  # (not its lock: refused, or nothing freed)
            await a.release_and_handoff(held.key, owner=held.owner, policy=QUEUE_POLICY)
        assert [lock.owner for lock in await b.holders(held.key)] == [("acme/infra", 2)]
        third = await a.acquire_or_enqueue(want(3), ttl=None, wait=None, policy=QUEUE_POLICY)
        assert third.status is not Status.GRANTED, third
        assert [lock.owner for lock in await b.holders(held.key)] == [("acme/infra", 2)]
    finally:
        await a.close()
        await b.close()
