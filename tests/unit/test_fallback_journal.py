"""The fallback journal on every store kind it is kept in (the legacy store's kind): an entry
leaves the journal only while it is the one a pass read, so an entry of the same key written
in between stays and is applied at the next pass.

The journal is a real store of each kind (a SQLite file, a redis-server, etcd, memory); the
enhanced and legacy sides are in memory. "In between" is made exact by a read of the store
that, once, journals the newer entry right after it has read the older one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import cast

import pytest
from tests.support.backends import BackendFactory
from tests.support.locks import lock_for, request_for

from enhanced_locking.backends import MemoryBackend
from enhanced_locking.backends.base import QueueBackend
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import EventBus
from enhanced_locking.locking import EnhancedLocker, LegacyLocker
from enhanced_locking.metrics import Metrics
from enhanced_locking.migration.conflicts import ConflictBook
from enhanced_locking.migration.reconcile import FallbackJournal, FallbackReconciler
from enhanced_locking.types import Lock, utcnow

KEY = request_for().key
Read = Callable[[str], Awaitable[Lock | None]]


@dataclass(frozen=True)
class _Sides:
    journal: FallbackJournal
    legacy: LegacyLocker
    enhanced: EnhancedLocker
    reconciler: FallbackReconciler


def _sides(journal_store: BackendFactory) -> _Sides:
    journal = FallbackJournal(
        granted=cast(QueueBackend, journal_store("fallback")),
        released=cast(QueueBackend, journal_store("fallback-released")),
    )
    config = EnhancedLockingConfig(enabled=True)
    legacy = LegacyLocker(MemoryBackend("legacy"))
    enhanced = EnhancedLocker(MemoryBackend("enhanced"), settings=lambda: config,
                              events=EventBus(), metrics=Metrics())
    reconciler = FallbackReconciler(
        journal=lambda: journal, legacy=lambda: legacy, enhanced=lambda: enhanced,
        routes_enhanced=lambda key: True, min_interval=lambda: 0.0,
        conflicts=ConflictBook(events=EventBus(), metrics=Metrics()), events=EventBus(),
        metrics=Metrics(),
    )
    return _Sides(journal, legacy, enhanced, reconciler)


async def _copy_and_its_release(sides: _Sides) -> tuple[Lock, Lock]:
    """Pull 1's copy on the enhanced side (taken a second ago: a store may keep the release's
    time to the millisecond), and the journal's entry of its release that reached legacy
    only."""
    copy = lock_for(request_for(pull=1)).model_copy(
        update={"acquired_at": utcnow() - timedelta(seconds=1), "fencing_token": 7})
    assert not await sides.enhanced.backend.adopt([copy], {})
    await sides.reconciler.record_release(lock_for(request_for(pull=1), backend="legacy"))
    entry = await sides.journal.released.get(KEY)
    assert entry is not None
    return copy, entry


def _once(read: Read, meanwhile: Callable[[], Awaitable[None]], *, first: bool) -> Read:
    """``read`` that, the first time it is called, runs ``meanwhile`` before it reads
    (``first``) or right after, before its caller goes on."""
    done: list[bool] = []

    async def reading(key: str) -> Lock | None:
        if done:
            return await read(key)
        done.append(True)
        if first:
            await meanwhile()
            return await read(key)
        found = await read(key)
        await meanwhile()
        return found

    return reading


async def test_a_release_journaled_between_the_read_of_an_entry_and_its_removal_stays(
    backend_factory: BackendFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    sides = _sides(backend_factory)
    journal, reconciler = sides.journal, sides.reconciler
    _, first = await _copy_and_its_release(sides)
    # The pass has read that entry; right then the same pull's next release of the key is
    # journaled (it took the key on legacy and let go again while the enhanced side was away).
    second: list[Lock] = []

    async def released_again() -> None:
        await reconciler.record_release(lock_for(request_for(pull=1), backend="legacy"))
        newer = await journal.released.get(KEY)
        assert newer is not None
        second.append(newer)

    monkeypatch.setattr(journal.released, "get",
                        _once(journal.released.get, released_again, first=False))
    report = await reconciler.reconcile()
    monkeypatch.undo()
    [newer] = second
    assert await sides.enhanced.get(KEY) is None  # the first entry's copy is freed
    assert (report.released, report.pending) == (1, 1)
    kept = await journal.released.get(KEY)
    assert kept is not None and kept.acquired_at == newer.acquired_at
    # What told the two apart: each entry has a version of its own.
    assert kept.fencing_token == newer.fencing_token != first.fencing_token

    # The next pass applies the newer entry (its copy is gone: nothing more to free).
    report = await reconciler.reconcile()
    assert (report.released, report.pending) == (0, 0)
    assert await journal.released.get(KEY) is None


async def test_a_grant_journaled_between_the_read_of_an_entry_and_its_removal_is_adopted(
    backend_factory: BackendFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    sides = _sides(backend_factory)
    journal, reconciler, legacy = sides.journal, sides.reconciler, sides.legacy
    granted, ours = await legacy.backend.acquire(lock_for(request_for(pull=1), backend="legacy"))
    assert granted
    await reconciler.record_grant(ours)

    # The pass has read pull 1's entry; before it reads legacy, pull 1 lets go there and
    # pull 2 is granted the key without the enhanced side, and journaled.
    async def another_pull_granted_meanwhile() -> None:
        assert await legacy.backend.release(KEY, owner=("acme/infra", 1)) is not None
        took, theirs = await legacy.backend.acquire(
            lock_for(request_for(pull=2), backend="legacy"))
        assert took
        await reconciler.record_grant(theirs)

    monkeypatch.setattr(legacy, "get",
                        _once(legacy.get, another_pull_granted_meanwhile, first=True))
    report = await reconciler.reconcile()
    monkeypatch.undo()
    # Pull 1's entry is done with (its hold is gone from legacy); pull 2's stays ...
    assert (report.forgotten, report.adopted, report.pending) == (0, 0, 1)
    kept = await journal.granted.get(KEY)
    assert kept is not None and kept.pull.num == 2
    assert await sides.enhanced.get(KEY) is None

    # ... and is adopted at the next pass: the enhanced side knows pull 2 holds the key.
    report = await reconciler.reconcile()
    assert (report.adopted, report.pending) == (1, 0)
    holder = await sides.enhanced.get(KEY)
    assert holder is not None and holder.pull.num == 2


_WRITES = ("release", "release_and_handoff", "release_by_pull", "force_unlock", "expire",
           "acquire", "refresh", "adopt", "replace")
"""The calls of a store that change what a key holds: whichever the journal's write uses."""


def _read_after_every_write(store: QueueBackend, monkeypatch: pytest.MonkeyPatch,
                            read: Callable[[], Awaitable[None]]) -> None:
    """Run ``read`` after each step of ``store`` that writes, before its caller goes on: a
    replica reading the journal right then (``read`` itself may write: it is not run again
    while it runs)."""
    reading: list[bool] = []

    def after(call: Callable[..., Awaitable[object]]) -> Callable[..., Awaitable[object]]:
        async def writing(*args: object, **kwargs: object) -> object:
            result = await call(*args, **kwargs)
            if not reading:
                reading.append(True)
                try:
                    await read()
                finally:
                    reading.clear()
            return result
        return writing

    for name in _WRITES:
        if hasattr(store, name):
            monkeypatch.setattr(store, name, after(getattr(store, name)))


async def test_a_release_entry_written_over_an_older_one_is_never_missing_in_between(
    backend_factory: BackendFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    sides = _sides(backend_factory)
    journal, reconciler = sides.journal, sides.reconciler
    copy, _ = await _copy_and_its_release(sides)
    # The pull takes the key on legacy and lets go again: its next release is journaled over
    # the older one. After every step of the store doing it, another replica reads the
    # journal (the pull asks for the key again there, and would be answered the copy).
    found: list[Lock | None] = []
    answers: list[str] = []

    async def another_replica_reads() -> None:
        found.append(await journal.released.get(KEY))
        answers.append(await reconciler.before_reentrant(copy))

    _read_after_every_write(journal.released, monkeypatch, another_replica_reads)
    await reconciler.record_release(lock_for(request_for(pull=1), backend="legacy"))
    monkeypatch.undo()
    assert found and all(entry is not None for entry in found), found
    # It found a release naming the copy: the copy is freed, never handed out.
    assert answers and set(answers) == {"again"}, answers
    assert await sides.enhanced.get(KEY) is None


async def test_a_grant_entry_written_over_an_older_one_is_never_missing_in_between(
    backend_factory: BackendFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    sides = _sides(backend_factory)
    journal, reconciler = sides.journal, sides.reconciler
    await reconciler.record_grant(lock_for(request_for(pull=1), backend="legacy"))
    older = await journal.granted.get(KEY)
    assert older is not None and older.pull.num == 1
    found: list[Lock | None] = []

    async def another_replica_reads() -> None:
        found.append(await journal.granted.get(KEY))

    # Pull 2 is granted the key on legacy without the enhanced side (pull 1 let go there).
    _read_after_every_write(journal.granted, monkeypatch, another_replica_reads)
    await reconciler.record_grant(lock_for(request_for(pull=2), backend="legacy"))
    monkeypatch.undo()
    assert found and all(entry is not None for entry in found), found
    newer = await journal.granted.get(KEY)
    assert newer is not None and newer.pull.num == 2
    assert newer.fencing_token != older.fencing_token  # a version of its own
    assert found[-1] == newer
