"""A grant answered after its lock's end is never answered as held, on etcd.

A commit can be applied long before its answer arrives: an election holds the answer up, or
a lost answer is found by running the step again. By then the lock's lease may have ended,
etcd may have deleted the lock, and another replica may have granted the key. The caller of
such a grant must hear that it holds nothing: an acquire is answered ``BackendUnavailable``
(ask again), a waiter is told ``unavailable``, a cancel carries no grant to give back.

The seams hold an answer up for real: the commit goes to etcd at once and its answer (or the
watch event that tells a waiter) is handed on only once etcd has deleted the lock at its
lease's end and another replica has been granted the key.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any, ClassVar

import etcd3aio
import pytest
from tests.support.etcd_fixtures import etcd_config
from tests.support.etcd_server import EtcdCluster
from tests.support.locks import candidate_for, request_for

from enhanced_locking.backends.etcd_connection import EtcdConnection, EtcdSettings
from enhanced_locking.backends.etcd_store import EtcdBackend
from enhanced_locking.backends.waiting import QueuePolicy, Status, Wait
from enhanced_locking.types import BackendUnavailable, Candidate, Lock, Reason

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(60)]

POLICY = QueuePolicy(priority=True, starvation_threshold=timedelta(hours=1))
SHORT = timedelta(seconds=1)


def want(pull: int) -> Candidate:
    return candidate_for(request_for(repo="acme/infra", path="envs/late", pull=pull))


Meanwhile = Callable[[], Awaitable[None]]


class HeldUpCommits(EtcdBackend):
    """A replica whose first commit that writes a leased lock is answered late: only once
    ``meanwhile`` has run (the commit itself is applied at once)."""

    meanwhile: Meanwhile | None = None

    async def _send(self, client: etcd3aio.Etcd3Client, read: Any, writes: Any, *,
                    key: str | None, leases: set[int] | None = None) -> Any:
        answer = await super()._send(client, read, writes, key=key, leases=leases)
        locks = self.base + b"lock/"
        leased = any(k.startswith(locks) and v is not None and v[1] for k, v in writes.items())
        if answer[0] is not None and leased and self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            await meanwhile()
        return answer


class HeldUpNotices(EtcdBackend):
    """A replica whose waiters hear of their notices only once ``meanwhile`` has run (once
    per waiter: the watch and the read of notices every ``WATCH_CHECK`` seconds may both
    bring a notice while it is held up, and the second would run ``meanwhile`` again)."""

    meanwhile: Meanwhile | None = None
    _later: ClassVar[set[asyncio.Task[None]]] = set()
    _holding: frozenset[str] = frozenset()

    def _heard(self, waiter_id: str, kv: Any) -> bool:
        meanwhile = self.meanwhile
        if meanwhile is None:
            return super()._heard(waiter_id, kv)
        if waiter_id in self._holding:
            return False  # held up already: told once ``meanwhile`` has run
        self._holding |= {waiter_id}

        async def later() -> None:
            await meanwhile()
            super(HeldUpNotices, self)._heard(waiter_id, kv)

        task = asyncio.ensure_future(later())
        self._later.add(task)
        task.add_done_callback(self._later.discard)
        return False  # not yet


@pytest.fixture
async def raw(etcd_cluster: EtcdCluster) -> AsyncIterator[etcd3aio.Etcd3Client]:
    connection = EtcdConnection(EtcdSettings(endpoints=tuple(etcd_cluster.endpoints)))
    yield await connection.client()
    await connection.close()


async def deleted_by_etcd(raw: etcd3aio.Etcd3Client, key: bytes) -> None:
    """Wait until etcd has deleted ``key`` (its lease ran out)."""
    assert raw.kv is not None
    for _ in range(200):
        if not (await raw.kv.get(key)).kvs:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"etcd never deleted {key!r}")


async def granted(backend: EtcdBackend, candidate: Candidate) -> Lock:
    outcome = await backend.acquire_or_enqueue(candidate, ttl=SHORT, wait=None, policy=POLICY)
    assert outcome.status is Status.GRANTED, outcome
    lock: Lock = outcome.locks[0]
    return lock


async def test_an_acquire_answered_after_etcd_ended_its_lease_is_not_granted(
    etcd_cluster: EtcdCluster, etcd_prefix: str, raw: etcd3aio.Etcd3Client,
) -> None:
    config = etcd_config(etcd_cluster, etcd_prefix)
    late = HeldUpCommits(EtcdConnection(EtcdSettings.from_config(config)),
                         prefix=config.etcd_key_prefix)
    other = EtcdBackend.from_config(config, "enhanced")
    taken: list[Lock] = []

    async def meanwhile() -> None:
        await deleted_by_etcd(raw, late.lock_key(want(1).key))
        taken.append(await granted(other, want(2)))

    late.meanwhile = meanwhile
    try:
        with pytest.raises(BackendUnavailable, match="answered after its end") as refused:
            await late.acquire_or_enqueue(want(1), ttl=SHORT, wait=None, policy=POLICY)
        assert refused.value.key == want(1).key
        assert [lock.pull.num for lock in taken] == [2]
        assert late.late_grants == 1
        holder = await late.get(want(1).key)  # the other replica's grant stands
        assert holder is not None and holder.pull.num == 2
        assert holder.fencing_token == taken[0].fencing_token
        # The next answer in time is a grant again.
        late.meanwhile = None
        await other.release_and_handoff(holder.key, owner=holder.owner, policy=POLICY)
        again = await granted(late, want(1))
        assert again.fencing_token > holder.fencing_token
    finally:
        await late.close()
        await other.close()


async def test_a_waiter_told_of_its_grant_after_etcd_ended_its_lease_is_told_unavailable(
    etcd_cluster: EtcdCluster, etcd_prefix: str, raw: etcd3aio.Etcd3Client,
) -> None:
    config = etcd_config(etcd_cluster, etcd_prefix)
    holder_side = EtcdBackend.from_config(config, "enhanced")
    waiting_side = HeldUpNotices(EtcdConnection(EtcdSettings.from_config(config)),
                                 prefix=config.etcd_key_prefix)
    taken: list[Lock] = []
    try:
        held = await holder_side.acquire_or_enqueue(want(1), ttl=None, wait=None,
                                                    policy=POLICY)
        assert held.status is Status.GRANTED
        wait = Wait(id=secrets.token_hex(8), timeout=timedelta(seconds=30))
        told = waiting_side.grants.expect(wait.id)
        queued = await waiting_side.acquire_or_enqueue(want(2), ttl=SHORT, wait=wait,
                                                       policy=POLICY)
        assert queued.status is Status.QUEUED, queued

        async def meanwhile() -> None:
            await deleted_by_etcd(raw, holder_side.lock_key(want(2).key))
            taken.append(await granted(holder_side, want(3)))

        waiting_side.meanwhile = meanwhile
        handoff = await holder_side.release_and_handoff(held.locks[0].key, owner=(
            "acme/infra", 1), policy=POLICY)
        assert [g.waiter.id for g in handoff.granted] == [wait.id]
        notice = await asyncio.wait_for(told, 20)
        assert (notice.locks, notice.reason) == ((), Reason.UNAVAILABLE)
        assert [lock.pull.num for lock in taken] == [3]
        assert waiting_side.late_grants == 1
        # Cancelling it now (the caller gives up) finds no grant to keep or give back.
        cancelled = await waiting_side.cancel(want(2).key, wait.id)
        assert cancelled.granted == ()
    finally:
        await holder_side.close()
        await waiting_side.close()
