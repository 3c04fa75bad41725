"""Fallback and reconciliation: what legacy granted alone while the enhanced store was away is
journaled, adopted when it returns, and a key held on both sides is reported, never dropped.

The enhanced store is a real SQLite file; "down" closes the service's connection to it (every
call then fails as the file being unreachable does), "back" opens it again, as a reconnect does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from tests.conftest import ServiceMaker, StoreOpener
from tests.support.leases import until
from tests.support.locks import lock_for, request_for
from tests.support.replicas import ReplicaSet

from enhanced_locking.backends import EmbeddedBackend
from enhanced_locking.backends.embedded import open_database
from enhanced_locking.factory import LockService
from enhanced_locking.migration.routing_registry import MemoryRoutingRegistry
from enhanced_locking.types import (
    BackendUnavailable,
    BatchItem,
    BatchLockRequest,
    Event,
    Reason,
)

ALL_ENHANCED = {"enabled": True, "backend": "boltdb", "migration_weight": 100}


def _enhanced_store(service: LockService) -> EmbeddedBackend:
    assert service.enhanced is not None
    return cast(EmbeddedBackend, service.enhanced.backend)


async def _down(service: LockService) -> None:
    await _enhanced_store(service).close()


def _back(service: LockService) -> None:
    backend = _enhanced_store(service)
    backend._db = open_database(backend.path)


async def _until(condition: Callable[[], bool]) -> None:
    """Let background tasks run (no clock involved: the stores answer at once)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never came true")


@dataclass(frozen=True)
class _Moving:
    """Replica ``a`` at weight 100 while another replica still reports 0: every key is moving
    (taken on both sides) until the other reports 100 too."""

    service: LockService
    registry: MemoryRoutingRegistry
    replicas: ReplicaSet

    async def lagging_reports(self, weight: float) -> None:
        await self.registry.report(replica_id="lagging", weight=weight, generation=1)
        await self.replicas.tick()


@contextlib.asynccontextmanager
async def _moving(data_dir: Path, **settings: Any) -> AsyncIterator[_Moving]:
    registry = MemoryRoutingRegistry()
    async with ReplicaSet(data_dir, registry) as replicas:
        moving = _Moving(await replicas.start("a", migration_weight=100, **settings), registry,
                         replicas)
        await moving.lagging_reports(0)
        yield moving


def _events(service: LockService) -> list[Event]:
    seen: list[Event] = []
    service.events.subscribe(seen.append)
    return seen


async def test_fallback_grants_are_journaled_and_adopted_when_enhanced_answers_again(
    make_service: ServiceMaker, store: StoreOpener,
) -> None:
    service = await make_service(**ALL_ENHANCED)
    seen = _events(service)
    await _down(service)
    kept = await service.router.acquire(request_for(path="a", pull=1))
    gone = await service.router.acquire(request_for(path="b", pull=2))
    assert kept.acquired and gone.acquired and kept.lock is not None
    assert kept.lock.backend == "legacy"
    await service.router.release(gone.lock_key, owner=("acme/infra", 2))
    status = service.migration.status().as_dict()["fallback"]
    # Two grants, and a release that freed legacy but could not reach enhanced.
    assert (status["pending"], status["granted"], status["releasedWhileAway"]) == (3, 2, 1)
    assert service.metrics.fallback_pending._value.get() == 3

    _back(service)
    assert (await service.ready())["enhanced"] == "ok"  # the readiness check starts it
    await _until(lambda: service.migration.fallback.pending == 0)

    adopted = await store(service, "enhanced").get(kept.lock_key)
    assert adopted is not None and adopted.pull.num == 1
    assert await store(service, "enhanced").get(gone.lock_key) is None
    refused = await service.router.acquire(request_for(path="a", pull=3))
    assert not refused.acquired and refused.holder is not None and refused.holder.pull.num == 1
    [event] = [e for e in seen if e.type == "fallback-reconciled"]
    assert event.details["adopted"] == 1 and event.details["forgotten"] == 1
    await service.router.release(kept.lock_key, owner=("acme/infra", 1))
    again = await service.router.acquire(request_for(path="a", pull=3))
    assert again.acquired and again.lock is not None and again.lock.backend == "enhanced"
    assert again.lock.fencing_token > kept.lock.fencing_token


async def test_a_key_held_on_both_sides_is_reported_and_kept_until_one_lets_go(
    make_service: ServiceMaker, store: StoreOpener,
) -> None:
    service = await make_service(**ALL_ENHANCED)
    seen = _events(service)
    await _down(service)
    ours = await service.router.acquire(request_for(path="a", pull=1))
    assert ours.acquired and ours.lock is not None and ours.lock.backend == "legacy"
    # Meanwhile a replica that could still reach the enhanced store granted it to pull 2.
    other_replica = store(service, "enhanced")
    granted, theirs = await other_replica.acquire(lock_for(request_for(path="a", pull=2)))
    assert granted

    _back(service)
    report = await service.migration.fallback.reconcile()
    assert (report.conflicts, report.pending, report.adopted) == (1, 1, 0)
    [conflict] = service.migration.status().as_dict()["conflicts"]
    assert conflict["key"] == ours.lock_key and conflict["source"] == "fallback"
    assert conflict["legacyHolder"]["pull"] == 1 and conflict["enhancedHolder"]["pull"] == 2
    [event] = [e for e in seen if e.type == "lock-conflict"]
    assert event.details["legacyHolder"]["pull"] == 1
    assert event.details["enhancedHolder"]["pull"] == 2
    assert service.metrics.lock_conflicts._value.get() == 1
    again = await service.migration.fallback.reconcile()
    assert again.conflicts == 1 and len([e for e in seen if e.type == "lock-conflict"]) == 1

    await other_replica.release(theirs.key, owner=("acme/infra", 2))
    report = await service.migration.fallback.reconcile()
    assert (report.conflicts, report.pending, report.adopted) == (0, 0, 1)
    assert service.migration.status().as_dict()["conflicts"] == []
    assert service.metrics.lock_conflicts._value.get() == 0
    held = await other_replica.get(ours.lock_key)
    assert held is not None and held.pull.num == 1


async def test_the_journal_survives_a_restart_of_the_service(
    make_service: ServiceMaker, store: StoreOpener, data_dir: Path,
) -> None:
    first = await make_service(**ALL_ENHANCED)
    await _down(first)
    held = await first.router.acquire(request_for(pull=1))
    assert held.acquired
    await first.close()

    second = await make_service(**ALL_ENHANCED)
    assert second.migration.fallback.pending == 1
    await second.ready()
    await _until(lambda: second.migration.fallback.pending == 0)
    adopted = await store(second, "enhanced").get(held.lock_key)
    assert adopted is not None and adopted.pull.num == 1


async def test_a_release_that_missed_enhanced_frees_the_copy_there_on_reconcile(
    data_dir: Path,
) -> None:
    async with _moving(data_dir) as moving:
        service = moving.service
        assert service.migration.transitions.plan(request_for().key).both
        held = await service.router.acquire(request_for(pull=1))
        assert held.acquired and await service.legacy.get(held.lock_key) is not None

        await _down(service)
        released = await service.router.release(held.lock_key, owner=("acme/infra", 1))
        assert released is not None and await service.legacy.get(held.lock_key) is None
        assert service.migration.fallback.pending == 1

        _back(service)
        report = await service.migration.fallback.reconcile()
        assert (report.released, report.pending) == (1, 0)
        granted = await service.router.acquire(request_for(pull=2))
        assert granted.acquired


async def test_a_pull_that_asks_again_after_a_release_that_missed_enhanced_keeps_its_answer(
    data_dir: Path,
) -> None:
    # The release freed legacy and was answered "released"; the copy it left on enhanced is
    # still the pull's. If the pull asks for the key again before the journal is reconciled,
    # the release takes effect first: the pull is granted the key anew (or queued), never
    # handed the leftover copy as its lock for the reconciliation to free under it.
    async with _moving(data_dir) as moving:
        service = moving.service
        key = request_for().key
        assert service.migration.transitions.plan(key).both
        held = await service.router.acquire(request_for(pull=1))
        assert held.acquired and held.lock is not None
        first_token = held.lock.fencing_token

        await _down(service)
        released = await service.router.release(key, owner=("acme/infra", 1))
        assert released is not None and await service.legacy.get(key) is None
        assert service.migration.fallback.pending == 1

        _back(service)  # enhanced answers again, the journal not reconciled yet
        await moving.lagging_reports(100)
        assert not service.migration.transitions.plan(key).both
        again = await service.router.acquire(request_for(pull=1))
        assert again.acquired and again.lock is not None
        assert again.fresh and again.lock.fencing_token > first_token

        await service.migration.fallback.reconcile()
        assert service.migration.fallback.pending == 0
        holder = await service.router.get(key)
        assert holder is not None and holder.pull.num == 1
        assert holder.fencing_token == again.lock.fencing_token
        other = await service.router.acquire(request_for(pull=2))
        assert not other.acquired and other.reason is Reason.HELD


@pytest.mark.parametrize("fallback", ["legacy", "fail-closed"])
async def test_a_pull_that_asks_again_while_enhanced_is_still_away_is_served_as_in_the_outage(
    data_dir: Path, fallback: str,
) -> None:
    # The release's entry cannot be applied yet: the acquire is not sent to the enhanced side
    # (which could answer with the copy a moment later) but served as the fallback says.
    async with _moving(data_dir, fallback=fallback) as moving:
        service = moving.service
        key = request_for().key
        held = await service.router.acquire(request_for(pull=1))
        assert held.acquired

        await _down(service)
        assert await service.router.release(key, owner=("acme/infra", 1)) is not None
        assert service.migration.fallback.pending == 1
        again = await service.router.acquire(request_for(pull=1))
        if fallback == "fail-closed":
            assert not again.acquired and again.reason is Reason.UNAVAILABLE
        else:
            assert again.acquired and again.lock is not None and again.lock.backend == "legacy"

        _back(service)
        await service.migration.fallback.reconcile()
        assert service.migration.fallback.pending == 0
        other = await service.router.acquire(request_for(pull=2))
        if fallback == "fail-closed":  # nobody holds it: the copy was freed
            assert other.acquired
        else:  # pull 1 holds it on legacy, as it was told
            holder = await service.router.get(key)
            assert holder is not None and holder.pull.num == 1
            assert not other.acquired and other.reason is Reason.HELD


@pytest.mark.parametrize("fallback", ["legacy", "fail-closed"])
async def test_a_moving_key_needs_the_enhanced_side_and_fail_closed_refuses_it(
    data_dir: Path, fallback: str,
) -> None:
    async with _moving(data_dir, fallback=fallback) as moving:
        service = moving.service
        await _down(service)
        result = await service.router.acquire(request_for(pull=1))
        if fallback == "fail-closed":
            assert not result.acquired and result.reason == Reason.UNAVAILABLE
            assert await service.legacy.list() == []
            assert service.migration.fallback.pending == 0
        else:
            assert result.acquired and result.lock is not None
            assert result.lock.backend == "legacy"
            assert service.migration.fallback.pending == 1


@pytest.mark.parametrize("fallback", ["legacy", "fail-closed"])
async def test_legacy_keys_unchecked_on_enhanced_are_served_journaled_and_checked_later(
    make_service: ServiceMaker, store: StoreOpener, fallback: str,
) -> None:
    settings: dict[str, Any] = {**ALL_ENHANCED, "migration_weight": 0, "fallback": fallback}
    service = await make_service(**settings)
    await _down(service)
    result = await service.router.acquire(request_for(pull=1))
    assert result.acquired and result.lock is not None and result.lock.backend == "legacy"
    assert service.migration.fallback.pending == 1
    assert service.metrics.fallbacks.labels("unchecked")._value.get() == 1

    _back(service)
    report = await service.migration.fallback.reconcile()
    assert (report.forgotten, report.adopted, report.pending) == (1, 0, 0)
    assert await store(service, "enhanced").get(result.lock_key) is None


async def test_a_batch_served_by_legacy_in_fallback_is_journaled_and_adopted(
    make_service: ServiceMaker, store: StoreOpener,
) -> None:
    service = await make_service(**ALL_ENHANCED)
    await _down(service)
    pull = request_for(pull=5).pull
    batch = BatchLockRequest(locks=[BatchItem(project=request_for(path=p).project)
                                    for p in ("x", "y")], pull=pull)
    result = await service.router.acquire_batch(batch)
    assert result.acquired and [lock.backend for lock in result.locks] == ["legacy", "legacy"]
    assert service.migration.fallback.pending == 2

    _back(service)
    report = await service.migration.fallback.reconcile()
    assert (report.adopted, report.pending) == (2, 0)
    for lock in result.locks:
        held = await store(service, "enhanced").get(lock.key)
        assert held is not None and held.pull.num == 5



@contextlib.asynccontextmanager
async def _released_on_a(data_dir: Path) -> AsyncIterator[tuple[LockService, LockService]]:
    """Replicas ``a`` and ``b`` (one store file, one registry; every key moving): pull 1 took
    the key through ``a`` (on both sides), then released it through ``a`` while ``a`` could not
    reach the enhanced store: legacy freed, the release journaled by ``a``, its copy still held
    on the enhanced side. Then ``a`` reaches the store again (its journal not reconciled yet)
    and the move settles: the key is on the enhanced side alone."""
    async with _moving(data_dir) as moving:
        a = moving.service
        b = await moving.replicas.start("b", migration_weight=100)
        await moving.replicas.tick()
        key = request_for().key
        assert b.migration.transitions.plan(key).both
        held = await a.router.acquire(request_for(pull=1))
        assert held.acquired and held.lock is not None

        await _down(a)
        assert await a.router.release(key, owner=("acme/infra", 1)) is not None
        assert await a.legacy.get(key) is None and a.migration.fallback.pending == 1
        assert b.migration.fallback.pending == 0  # b wrote nothing to the journal itself
        copy = await _enhanced_store(b).get(key)
        assert copy is not None and copy.pull.num == 1
        _back(a)
        await moving.lagging_reports(100)
        assert not b.migration.transitions.plan(key).both
        yield a, b


async def _held_by_one_pull_after_reconciling(a: LockService, b: LockService,
                                              again_token: int) -> None:
    """``a`` reconciles its journal: the lock pull 1 was granted anew through ``b`` stays
    held (the copy the release left is not freed under it), and pull 2 is refused."""
    await a.migration.fallback.reconcile()
    assert a.migration.fallback.pending == 0
    key = request_for().key
    holder = await b.router.get(key)
    assert holder is not None and holder.pull.num == 1
    assert holder.fencing_token == again_token
    for replica in (a, b):
        other = await replica.router.acquire(request_for(pull=2))
        assert not other.acquired and other.reason is Reason.HELD


async def test_a_pull_that_asks_again_through_another_replica_is_granted_anew(
    data_dir: Path,
) -> None:
    # The release was answered "released" by a. b never journaled anything, but reads the
    # shared journal before answering a pull the lock it already holds: the leftover copy is
    # freed first and the pull granted the key anew, so a's reconciliation frees nothing
    # under it.
    async with _released_on_a(data_dir) as (a, b):
        copy = await _enhanced_store(b).get(request_for().key)
        assert copy is not None
        again = await b.router.acquire(request_for(pull=1))
        assert again.acquired and again.lock is not None
        assert again.fresh and again.lock.fencing_token > copy.fencing_token
        await _held_by_one_pull_after_reconciling(a, b, again.lock.fencing_token)


async def test_a_batch_that_asks_again_through_another_replica_is_granted_anew(
    data_dir: Path,
) -> None:
    async with _released_on_a(data_dir) as (a, b):
        copy = await _enhanced_store(b).get(request_for().key)
        assert copy is not None
        pull = request_for(pull=1).pull
        batch = BatchLockRequest(locks=[BatchItem(project=request_for(path=p).project)
                                        for p in ("envs/prod", "other")], pull=pull)
        again = await b.router.acquire_batch(batch)
        assert again.acquired
        [lock] = [lock for lock in again.locks if lock.key == copy.key]
        assert lock.fencing_token > copy.fencing_token
        await _held_by_one_pull_after_reconciling(a, b, lock.fencing_token)


Read = Callable[[str], Awaitable[Any]]


async def _granted_anew_through_b(
    a: LockService, b: LockService, monkeypatch: pytest.MonkeyPatch,
    around_the_read: Callable[[Read, str], Awaitable[Any]],
) -> None:
    """Pull 1 asks ``b`` again for the key whose copy a journaled release names, with
    ``around_the_read`` run around ``b``'s reads of the journal: granted anew, never the copy,
    and nothing freed under it by ``a``'s reconciliation."""
    copy = await _enhanced_store(b).get(request_for().key)
    assert copy is not None
    journal = b.migration.fallback._journal()
    read = journal.released.get

    async def patched(name: str) -> Any:
        return await around_the_read(read, name)

    monkeypatch.setattr(journal.released, "get", patched)
    again = await b.router.acquire(request_for(pull=1))
    monkeypatch.undo()
    assert again.acquired and again.lock is not None and again.fresh
    assert again.lock.fencing_token > copy.fencing_token
    await _held_by_one_pull_after_reconciling(a, b, again.lock.fencing_token)


async def test_a_release_applied_between_the_read_of_the_copy_and_the_journal_is_heeded(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # b reads the pull's copy (its answer to the pull), then a applies the journaled release
    # completely (the copy freed, the entry gone), then b reads the journal: it names nothing
    # any more, and still b does not hand out the freed copy: the pull is granted anew.
    async with _released_on_a(data_dir) as (a, b):

        async def a_applies_it_first(read: Read, name: str) -> Any:
            await a.migration.fallback.reconcile()
            return await read(name)

        await _granted_anew_through_b(a, b, monkeypatch, a_applies_it_first)


@pytest.mark.parametrize("a_reaches_the_store", [True, False])
async def test_a_release_two_replicas_apply_at_once_frees_the_copy_once_never_handed_out(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, a_reaches_the_store: bool,
) -> None:
    # b reads the journaled release; right then a applies it too. If a reaches the store, a
    # frees the copy and only then takes the entry out of the journal, and b finds the copy
    # gone; if a cannot, the entry stays and b frees the copy. Either way the pull is granted
    # the key anew, never handed the copy.
    async with _released_on_a(data_dir) as (a, b):
        applied: list[bool] = []

        async def read_then_a_applies_it(read: Read, name: str) -> Any:
            found = await read(name)
            if not applied:
                if not a_reaches_the_store:
                    await _down(a)
                with contextlib.suppress(BackendUnavailable):
                    await a.migration.fallback.reconcile()
                if not a_reaches_the_store:
                    _back(a)
                applied.append(await read(name) is None)
            return found

        await _granted_anew_through_b(a, b, monkeypatch, read_then_a_applies_it)
        assert applied == [a_reaches_the_store]


async def test_a_late_release_never_frees_a_newer_lock_of_the_pull(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a reads the copy its journaled release names; before a's release of it, the pull itself
    # releases the copy and takes the key again through b (a new lock, a new token), and pull
    # 2 queues for the key in a's enhanced store. a's release is of the copy's token only: it
    # frees nothing, so the pull still holds what it was told it holds and pull 2 still waits
    # (no second holder).
    async with _released_on_a(data_dir) as (a, b):
        key = request_for().key
        assert a.enhanced is not None
        read = a.enhanced.get
        taken_again: list[int] = []
        waiting: list[asyncio.Task[Any]] = []

        async def read_then_the_pull_takes_it_again(name: str) -> Any:
            found = await read(name)
            if not taken_again:
                assert await _enhanced_store(b).release(key, owner=("acme/infra", 1))
                again = await b.router.acquire(request_for(pull=1))
                assert again.acquired and again.fresh and again.lock is not None
                taken_again.append(again.lock.fencing_token)
                assert a.enhanced is not None  # (a's router waits for the reconciliation)
                waiting.append(asyncio.create_task(a.enhanced.acquire(
                    request_for(pull=2, wait=timedelta(seconds=30)))))
                await _until(lambda: bool(_enhanced_store(a)._queues.get(key)))
            return found

        monkeypatch.setattr(a.enhanced, "get", read_then_the_pull_takes_it_again)
        await a.migration.fallback.reconcile()
        monkeypatch.undo()
        assert taken_again and a.migration.fallback.pending == 0
        assert a.migration.fallback.journal_errors == 0
        await asyncio.sleep(0.05)
        [waiter] = waiting
        assert not waiter.done()  # the key was not handed to pull 2
        holder = await b.router.get(key)
        assert holder is not None and holder.pull.num == 1
        assert holder.fencing_token == taken_again[0]
        # pull 1 lets go: pull 2, waiting all along, gets it
        assert await a.router.release(key, owner=("acme/infra", 1)) is not None
        served = await asyncio.wait_for(waiter, 10)
        assert served.acquired and served.lock is not None and served.lock.pull.num == 2


async def test_a_refused_batch_never_gives_back_a_lock_the_pull_took_anew_meanwhile(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pull 1's batch through b: the copy of its first key is freed ("again"); right then the
    # pull takes that key anew through a. The batch is answered that lock (the pull's own),
    # then refused (pull 2 took its other key on legacy meanwhile): what the batch gives back
    # is only what it took itself, so the pull keeps the lock a granted it.
    async with _released_on_a(data_dir) as (a, b):
        key = request_for().key
        fallback, enhanced = b.migration.fallback, b.enhanced
        assert enhanced is not None
        before_reentrant, acquire_batch = fallback.before_reentrant, enhanced.acquire_batch
        taken: list[int] = []

        async def then_a_grants_it(lock: Any) -> Any:
            answer = await before_reentrant(lock)
            if answer == "again" and not taken:
                anew = await a.router.acquire(request_for(pull=1))
                assert anew.acquired and anew.fresh and anew.lock is not None
                taken.append(anew.lock.fencing_token)
            return answer

        async def then_legacy_grants_the_other(request: Any) -> Any:
            answer = await acquire_batch(request)
            theirs = lock_for(request_for(path="other", pull=2), backend="legacy")
            granted, _ = await b.legacy.backend.acquire(theirs)
            assert granted
            return answer

        monkeypatch.setattr(fallback, "before_reentrant", then_a_grants_it)
        monkeypatch.setattr(enhanced, "acquire_batch", then_legacy_grants_the_other)
        pull = request_for(pull=1).pull
        batch = BatchLockRequest(locks=[BatchItem(project=request_for(path=p).project)
                                        for p in ("envs/prod", "other")], pull=pull)
        refused = await b.router.acquire_batch(batch)
        monkeypatch.undo()
        assert taken and not refused.acquired and refused.reason is Reason.HELD
        held = await _enhanced_store(b).get(key)
        assert held is not None and held.pull.num == 1 and held.fencing_token == taken[0]


async def test_the_readiness_check_asks_both_stores_at_once(
    make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A store that does not answer takes its call's whole limit to say so; one Redis serving
    both sides, not answering, took that limit twice in a row, past the readiness probe's
    timeout (docs/06-kubernetes.md, Readiness), and every replica left the Service."""
    service = await make_service(**ALL_ENHANCED)
    assert service.enhanced is not None
    started: list[str] = []
    answer = asyncio.Event()
    for side, backend in (("legacy", service.legacy_backend),
                          ("enhanced", service.enhanced.backend)):
        ping = backend.ping

        async def held(side: str = side, ping: Callable[[], Awaitable[None]] = ping) -> None:
            started.append(side)
            await answer.wait()
            await ping()

        monkeypatch.setattr(backend, "ping", held)
    checking = asyncio.ensure_future(service.ready())
    try:
        await _until(lambda: len(started) == 2)
        assert sorted(started) == ["enhanced", "legacy"]
        answer.set()
        assert await checking == {"legacy": "ok", "enhanced": "ok"}
    finally:
        answer.set()
        await asyncio.gather(checking, return_exceptions=True)


async def test_a_fallback_grant_whose_legacy_lock_cannot_be_read_stays_and_the_rest_reconcile(
    make_service: ServiceMaker, store: StoreOpener, caplog: pytest.LogCaptureFixture,
) -> None:
    """A journaled key whose stored lock on legacy cannot be read (set aside until a
    force-unlock) stopped every pass where it met it, and the heartbeat's passes swallowed
    that without a word: the entries after it were never reconciled. Now its entry stays, the
    others are, and the key is logged once as left in the journal."""
    from tests.support.unreadable import SPOILED, spoil

    service = await make_service(**ALL_ENHANCED)
    await _down(service)
    granted = [await service.router.acquire(request_for(pull=pull, path=path))
               for pull, path in ((1, "a-first"), (2, "b-second"))]
    locks = [result.lock for result in granted]
    assert all(lock is not None and lock.backend == "legacy" for lock in locks), locks
    assert service.migration.fallback.pending == 2
    legacy = service.legacy.backend
    assert legacy is not None and locks[0] is not None and locks[1] is not None
    await spoil(legacy, locks[0].key, SPOILED[0][1])
    _back(service)

    for _ in range(3):
        await service.migration.fallback.reconcile_quietly()
    assert service.migration.fallback.pending == 1
    adopted = await store(service, "enhanced").get(locks[1].key)
    assert adopted is not None and adopted.pull.num == 2, "the readable entry not reconciled"
    left = [r for r in caplog.records if "leaves" in r.getMessage()]
    assert len(left) == 1 and locks[0].key in left[0].getMessage(), left
    assert "cannot read the stored lock" in left[0].getMessage()
    assert SPOILED[0][1] not in caplog.text  # the unreadable value itself is never shown


async def test_a_reconciliation_that_fails_by_a_fault_is_logged_as_an_error_once(
    make_service: ServiceMaker, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pass that fails other than by the store not answering fails every pass the same way:
    it is logged as an error naming it, once until a pass succeeds, by the heartbeat's passes
    too, which swallowed every failure without a word. (A fault of the code, which no real
    store raises on purpose, stands for it.)"""
    service = await make_service(**ALL_ENHANCED, replica_heartbeat="50ms")
    await _down(service)
    assert (await service.router.acquire(request_for(pull=1))).acquired
    fallback = service.migration.fallback

    async def faulty(*args: Any) -> str:
        raise TypeError("unsupported operand")

    monkeypatch.setattr(fallback, "_grant", faulty)
    _back(service)

    def said() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "unsupported operand" in r.getMessage()]

    assert await until(lambda: len(said()) >= 1, within=30), "the failure was never said"
    for _ in range(3):  # more passes, each failing the same way: said once
        await fallback.reconcile_quietly()
    assert [r.levelname for r in said()] == ["ERROR"]
    assert "fallback reconciliation failed" in said()[0].getMessage()
    assert fallback.pending == 1


async def test_a_journal_entry_that_cannot_be_read_is_counted_and_shown_by_the_metric(
    make_service: ServiceMaker, store: StoreOpener, caplog: pytest.LogCaptureFixture,
) -> None:
    """A journal entry that is not a lock (written over behind the service's back) was
    skipped by every read of the journal: the pass reported nothing pending, and the
    unreadable-locks gauge counted only the two sides' stores. Now the pass reports it as
    unreadable, the status too, and the gauge counts it under ``journal``; the readable
    entries are reconciled all the same."""
    from tests.support.unreadable import SPOILED, spoil_file

    service = await make_service(**ALL_ENHANCED)
    await _down(service)
    granted = [await service.router.acquire(request_for(pull=pull, path=path))
               for pull, path in ((1, "a-first"), (2, "b-second"))]
    locks = [result.lock for result in granted]
    assert all(lock is not None and lock.backend == "legacy" for lock in locks), locks
    assert locks[0] is not None and locks[1] is not None
    legacy = service.legacy.backend
    assert isinstance(legacy, EmbeddedBackend)
    spoil_file(str(legacy.path), "fallback", locks[0].key, SPOILED[0][1])
    _back(service)

    fallback = service.migration.fallback
    for _ in range(2):
        report = await fallback.reconcile()
    assert (report.pending, report.unreadable) == (0, 1), report
    status = service.migration.status().as_dict()["fallback"]
    assert status["unreadable"] == 1 and status["lastReconcile"]["unreadable"] == 1, status
    gauge = ("enhanced_locking_unreadable_locks", {"backend": "journal"})
    assert service.metrics.registry.get_sample_value(*gauge) == 1
    adopted = await store(service, "enhanced").get(locks[1].key)
    assert adopted is not None and adopted.pull.num == 2, "the readable entry not reconciled"
    said = [r for r in caplog.records if "journal entry" in r.getMessage()]
    assert len(said) == 1 and locks[0].key in said[0].getMessage(), said
    assert SPOILED[0][1] not in caplog.text  # the unreadable value itself is never shown

    # Deleted (by hand, as the runbook says), the entry is gone from the count and the gauge.
    import sqlite3
    with sqlite3.connect(str(legacy.path)) as db:
        db.execute("DELETE FROM locks WHERE ns = 'fallback' AND key = ?", (locks[0].key,))
    report = await fallback.reconcile()
    assert (report.pending, report.unreadable) == (0, 0), report
    assert service.metrics.registry.get_sample_value(*gauge) == 0
