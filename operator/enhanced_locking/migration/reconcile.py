"""Fallback and reconciliation: what legacy did alone while enhanced was away, made whole.

With ``fallback: legacy`` (the seed's default) a request whose key belongs to the enhanced side
is served by legacy when the enhanced backend does not answer, and a legacy grant whose
enhanced-side check could not be made is still given. Each such grant is written to a
*journal* before the answer goes out; so is a release that freed legacy but could not reach
enhanced (a key held on both sides during a weight move). The journal lives in the legacy store
under its own namespaces (``fallback`` and ``fallback-released``), so on the embedded store it
survives a restart.

When the enhanced backend answers again (a request reaches it, the readiness check passes, or
the periodic probe succeeds) the journal is *reconciled*:

* a fallback grant still held on legacy is adopted into enhanced when the key routes there
  (the enhanced side now knows the hold, its fencing counter rises past it); a grant released
  meanwhile is forgotten;
* a release that could not reach enhanced frees the enhanced copy it left behind (only a copy
  acquired before that release, by the same pull);
* a key held on legacy by the fallback grant and on enhanced by another pull is a *conflict*:
  reported (:mod:`.conflicts`) and kept in the journal until one of them lets go. Nothing is
  dropped silently and no winner is picked by the machine.

With ``fallback: fail-closed`` nothing is granted without the enhanced side: such requests are
refused with ``unavailable``, and so the journal stays empty.

The journal is a lock store, and an entry is the lock it journals with two fields
reinterpreted: a release entry's ``acquiredAt`` is the time of the release, and every entry's
``fencingToken`` is the entry's *version*, a random number drawn when the entry is written. An
entry is taken out of the journal only while it is still the one that was read (its pull and
its version, checked by the store in the same step as the removal): an entry of the same key
written in between (the pull released the key again) stays and is applied at the next pass.
The version is kept in ``fencingToken`` rather than a field of its own because an entry is a
stored lock, the one shape every store and release reads, and the stores' conditional release
already compares a lock's owner and token in the step that removes it; so in the journal the
name means the version only, never a lock's fencing token (reconciliation takes that from the
lock legacy holds). The check holds once every replica runs this release: an earlier release
takes an entry out by its key alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from enhanced_locking.backends.base import QueueBackend
from enhanced_locking.events import Bus
from enhanced_locking.locking.base import Locker
from enhanced_locking.locking.enhanced import EnhancedLocker
from enhanced_locking.metrics import Metrics
from enhanced_locking.migration.conflicts import ConflictBook, is_conflict
from enhanced_locking.migration.handover import backend_of, raise_counter
from enhanced_locking.types import (
    BackendUnavailable,
    Lock,
    LockingError,
    LockNotOwned,
    LockUnreadable,
    UnreadableLock,
    utcnow,
)

__all__ = ["FallbackJournal", "FallbackMode", "FallbackReconciler", "FallbackStatus",
           "ReconcileReport", "Reentry"]

FallbackMode = Literal["legacy", "fail-closed"]

log = logging.getLogger(__name__)

GRANTED, RELEASED = "fallback", "fallback-released"
"""The journal's namespaces in the legacy store."""

Reentry = Literal["hand-out", "again"]
"""What to do with an answer of a lock the pull already held (:meth:`FallbackReconciler.
before_reentrant`)."""


def _names(tombstone: Lock, held: Lock) -> bool:
    """Whether the journaled release ``tombstone`` (``acquired_at``: when it was released)
    names ``held``: the same pull's hold, taken before that release."""
    return held.owner == tombstone.owner and held.acquired_at <= tombstone.acquired_at


def _same_hold(a: Lock, b: Lock) -> bool:
    return a.owner == b.owner and a.fencing_token == b.fencing_token


async def _release_hold(enhanced: Locker, held: Lock) -> Lock | None:
    """Free ``held`` itself: its owner's lock only while it carries ``held``'s fencing token
    (``LockNotOwned`` otherwise)."""
    if isinstance(enhanced, EnhancedLocker):
        return await enhanced.release(held.key, owner=held.owner, token=held.fencing_token)
    # A locker without an enhanced store of its own has no token to hold the release to.
    return await enhanced.release(held.key, owner=held.owner)


_VERSION_BITS = 52
"""An entry's version is drawn from this many bits: two entries of a key alike once in 2**52
draws, and a whole number any store keeps exactly (Redis's scripts read it as a double)."""


def _versioned(entry: Lock) -> Lock:
    return entry.model_copy(update={"fencing_token": 1 + secrets.randbits(_VERSION_BITS)})


class FallbackJournal:
    """Grants and releases legacy made without the enhanced side, one entry per key, each
    with a version of its own (its ``fencing_token``, see the module docstring)."""

    def __init__(self, *, granted: QueueBackend, released: QueueBackend) -> None:
        self.granted = granted
        self.released = released

    async def record_grant(self, lock: Lock) -> None:
        await self._write(self.granted, lock)

    async def record_release(self, lock: Lock) -> None:
        await self._write(self.released, lock.model_copy(update={"acquired_at": utcnow()}))

    @staticmethod
    async def _write(store: QueueBackend, entry: Lock) -> None:
        """Journal ``entry`` in place of its key's older entry, in one step of the store: a
        replica reading the journal meanwhile finds the older entry or the newer, never
        neither."""
        await store.replace(_versioned(entry))

    @staticmethod
    async def remove(store: QueueBackend, entry: Lock) -> bool:
        """Take ``entry`` (as read from ``store``) out of the journal if it is still what is
        stored for its key: the same pull and the same version, checked by the store in the
        step that removes it. An entry written since (another release or grant of the key)
        is left for the next pass. Whether ``entry`` was there to take out."""
        try:
            gone = await store.release_and_handoff(entry.key, owner=entry.owner,
                                                   token=entry.fencing_token)
        except LockNotOwned:
            return False  # a newer entry of the key
        return gone.released is not None

    async def entries(self) -> tuple[list[Lock], list[Lock]]:
        """The grant and release entries that can be read; the others (not a lock, written
        over behind the service's back) are set aside by the read: :meth:`unreadable`."""
        return await self.granted.list(), await self.released.list()

    def unreadable(self) -> list[UnreadableLock]:
        """The entries the last :meth:`entries` found unreadable (grants', then releases')."""
        return self.granted.unreadable.entries() + self.released.unreadable.entries()

    async def close(self) -> None:
        await self.granted.close()
        await self.released.close()


@dataclass(frozen=True)
class ReconcileReport:
    adopted: int = 0
    released: int = 0
    forgotten: int = 0
    conflicts: int = 0
    pending: int = 0
    unreadable: int = 0
    """Journal entries that cannot be read (not in ``pending``): left where they are until
    deleted by hand (docs/04-monitoring.md, the unreadable-locks runbook)."""

    def as_dict(self) -> dict[str, int]:
        return {"adopted": self.adopted, "released": self.released,
                "forgotten": self.forgotten, "conflicts": self.conflicts,
                "pending": self.pending, "unreadable": self.unreadable}


@dataclass(frozen=True)
class FallbackStatus:
    """The fallback journal as the migration status shows it (totals since the start)."""

    mode: FallbackMode
    pending: int
    unreadable: int
    """Journal entries that cannot be read, as the last read of the journal found them."""
    granted: int
    released_while_away: int
    reconciled: int
    journal_errors: int
    last_reconcile: ReconcileReport | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "pending": self.pending,
            "unreadable": self.unreadable,
            "granted": self.granted,
            "releasedWhileAway": self.released_while_away,
            "reconciled": self.reconciled,
            "journalErrors": self.journal_errors,
            "lastReconcile": self.last_reconcile.as_dict() if self.last_reconcile else None,
        }


class FallbackReconciler:
    """Keeps the journal, and reconciles it into the enhanced side when that answers."""

    def __init__(
        self,
        *,
        journal: Callable[[], FallbackJournal],
        legacy: Callable[[], Locker],
        enhanced: Callable[[], Locker | None],
        routes_enhanced: Callable[[str], bool],
        min_interval: Callable[[], float],
        conflicts: ConflictBook,
        events: Bus,
        metrics: Metrics,
    ) -> None:
        self._journal = journal
        self._legacy = legacy
        self._enhanced = enhanced
        self._routes_enhanced = routes_enhanced
        self._min_interval = min_interval
        self.conflicts = conflicts
        self.events = events
        self.metrics = metrics
        self.pending = 0
        self.unreadable = 0
        """Journal entries that cannot be read, as the last read of the journal found them."""
        self.granted_total = 0
        self.released_total = 0
        self.reconciled_total = 0
        self.journal_errors = 0
        self.last: ReconcileReport | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[Any] | None = None
        self._last_run = -float("inf")
        self._failing: str | None = None
        """The failure the last background pass logged (said once until a pass succeeds)."""
        self._unreadable: set[str] = set()
        """The keys the last pass left in the journal, their stored lock unreadable."""
        self._unreadable_entries: set[str] = set()
        """The keys whose journal entry the last read of the journal found unreadable."""

    # --- recording (on the request path, before the answer goes out) ---------------------
    async def record_grant(self, lock: Lock) -> None:
        self.granted_total += 1
        await self._record(self._journal().record_grant, lock)

    async def record_release(self, lock: Lock) -> None:
        self.released_total += 1
        await self._record(self._journal().record_release, lock)

    async def _record(self, write: Callable[[Lock], Any], lock: Lock) -> None:
        try:
            await write(lock)
        except Exception as error:
            # The answer is given anyway (the router's two-sided checks still protect the key);
            # losing the entry only loses the later adoption, so say so loudly.
            self.journal_errors += 1
            log.error("could not journal the fallback of %s: %s", lock.key, error)
            return
        self.pending += 1
        self.metrics.fallback_pending.set(self.pending)

    async def load(self) -> None:
        """Count what a previous run left in the journal."""
        journal = self._journal()
        granted, released = await journal.entries()
        self.pending = len(granted) + len(released)
        self.metrics.fallback_pending.set(self.pending)
        self._count_unreadable(journal)

    # --- reconciling ---------------------------------------------------------------------
    def _count_unreadable(self, journal: FallbackJournal) -> None:
        """Show the journal entries its last read found unreadable: counted (the pass's report,
        the status, ``enhanced_locking_unreadable_locks{backend="journal"}``), and each key
        logged once while it stays so (its reason, size and digest, never the value)."""
        found = journal.unreadable()
        for entry in found:
            if entry.key not in self._unreadable_entries:
                log.warning("the fallback journal entry of %s (%s) cannot be read: %s (%d bytes, "
                            "sha256 %s...); it stays in the journal, never reconciled, until "
                            "it is deleted", entry.key, entry.side, entry.reason, entry.size,
                            entry.digest)
        self._unreadable_entries = {entry.key for entry in found}
        self.unreadable = len(found)
        self.metrics.unreadable_locks.labels("journal").set(self.unreadable)

    @property
    def needed(self) -> bool:
        return bool(self.pending or len(self.conflicts) or self.unreadable)

    def poke(self) -> None:
        """The enhanced side answered: reconcile in the background if there is work (at most
        once per heartbeat)."""
        if not self.needed or (self._task is not None and not self._task.done()):
            return
        if time.monotonic() - self._last_run < self._min_interval():
            return
        self._task = asyncio.get_running_loop().create_task(self.reconcile_quietly())

    async def reconcile_quietly(self) -> None:
        """:meth:`reconcile` in the background (every heartbeat, and when the enhanced side
        answered): a store that does not answer postpones it, said quietly (the next pass
        tries again). Any other failure would fail every pass the same way (a stored lock
        that cannot be read, a fault of the code): it is logged as an error naming it, once
        until a pass succeeds; the journal is kept."""
        try:
            await self.reconcile()
        except BackendUnavailable as error:
            log.info("fallback reconciliation postponed: %s", error)
        except Exception as error:
            said = f"{type(error).__name__}: {error}"
            if said != self._failing:
                self._failing = said
                log.error("fallback reconciliation failed, the journal kept (tried again every "
                          "heartbeat): %s", said,
                          exc_info=None if isinstance(error, LockingError) else error)
        else:
            self._failing = None

    async def reconcile(self) -> ReconcileReport:
        """One pass over the journal and the known conflicts. ``BackendUnavailable`` if the
        enhanced side is still away (nothing is lost: the journal is kept)."""
        async with self._lock:
            self._last_run = time.monotonic()
            enhanced = self._enhanced()
            if enhanced is None:
                return ReconcileReport(pending=self.pending)
            legacy = self._legacy()
            journal = self._journal()
            backend = backend_of(enhanced)
            if backend is not None:
                await backend.ping()
            granted, released = await journal.entries()
            adopted = freed = forgotten = 0
            unreadable: dict[str, LockUnreadable] = {}
            for lock in granted:
                try:
                    outcome = await self._grant(journal, legacy, enhanced, lock)
                except LockUnreadable as error:
                    unreadable[lock.key] = error
                    continue
                adopted += outcome == "adopted"
                forgotten += outcome == "forgotten"
            for lock in released:
                try:
                    freed += bool(await self._apply_release(journal, enhanced, lock.key))
                except LockUnreadable as error:
                    unreadable[lock.key] = error
            for key in self.conflicts.keys():
                try:
                    if not is_conflict(await legacy.get(key), await enhanced.get(key)):
                        self.conflicts.resolve(key)
                except LockUnreadable as error:
                    unreadable[key] = error
            self._set_aside(unreadable)
            left, left_released = await journal.entries()
            self.pending = len(left) + len(left_released)
            self.metrics.fallback_pending.set(self.pending)
            self._count_unreadable(journal)
            report = ReconcileReport(adopted, freed, forgotten, len(self.conflicts),
                                     self.pending, self.unreadable)
            self.last = report
            if adopted or freed or forgotten:
                self.reconciled_total += adopted + freed + forgotten
                log.info("fallback reconciled: %s", report.as_dict())
                counts: dict[str, Any] = report.as_dict()
                self.events.publish("fallback-reconciled", **counts)
            return report

    def _set_aside(self, unreadable: Mapping[str, LockUnreadable]) -> None:
        """The keys of this pass whose stored lock could not be read (set aside until a
        force-unlock clears it): their entries stay, the others are reconciled; each key is
        logged once while it stays so."""
        for key in sorted(unreadable.keys() - self._unreadable):
            log.warning("fallback reconciliation leaves %s in the journal until its stored "
                        "lock is readable again: %s", key, unreadable[key])
        self._unreadable = set(unreadable)

    async def before_acquire(self, key: str) -> None:
        """``key`` is asked for: a release of it journaled while the enhanced side was away
        takes effect first (the copy it left there is freed, as :meth:`reconcile` frees it).

        That release was answered ``released``. Its pull asking again would otherwise be
        answered the copy as the lock it holds (a pull is given its own lock back unchanged),
        with the old token, and the next reconciliation would free that copy under it: another
        pull granted the key while the first still holds it. Applied first, the pull is
        granted the key anew, with a new token.

        Raises ``BackendUnavailable`` while the enhanced side does not answer (the entry is
        kept): the acquire is then served as during any outage (the fallback setting), never
        sent on to an enhanced side that may answer a moment later with the copy."""
        async with self._lock:
            journal = self._journal()
            enhanced = self._enhanced()
            if enhanced is None or await journal.released.get(key) is None:
                return
            freed = await self._apply_release(journal, enhanced, key)
            self.pending = max(0, self.pending - 1)
            self.metrics.fallback_pending.set(self.pending)
            if freed:
                self.reconciled_total += 1
                log.info("fallback reconciled before %s was acquired again: the copy its "
                         "journaled release left on the enhanced side is freed", key)

    async def before_reentrant(self, lock: Lock) -> Reentry:
        """A pull is about to be answered ``lock``, a hold of the enhanced side it already
        had (asked again, a pull is given its own lock unchanged): unless a journaled release
        names it.

        Any replica may have journaled that release (the journal is in the legacy store,
        which the replicas share), and :meth:`before_acquire` only runs on the replica whose
        own journal holds something; so the journal is read on every such answer (one read
        of the legacy store). That is a frequent path: Atlantis locks the projects of a pull
        again on every plan, and each is answered the lock the pull holds. The release was
        answered ``released``: handing the pull the copy now would let a reconciliation free
        it under the pull. So the release is applied first and the answer is ``"again"``: the
        copy is freed, the caller asks the store again and the pull is granted the key anew,
        with a new token. ``"hand-out"``: nothing names it, answer it as it is.

        ``lock`` was read before the journal: another replica may have applied the release in
        between (its free comes before the entry leaves the journal, :meth:`_apply_release`).
        So when the journal names nothing the enhanced store is read once more (one more call
        on this path): ``lock`` is handed out only if that very hold (its fencing token) is
        still there, else ``"again"``.

        Raises ``BackendUnavailable`` if a store does not answer."""
        journal = self._journal()
        enhanced = self._enhanced()
        if enhanced is None:
            return "hand-out"
        tombstone = await journal.released.get(lock.key)
        if tombstone is None:
            held = await enhanced.get(lock.key)
            return "hand-out" if held is not None and _same_hold(held, lock) else "again"
        if not _names(tombstone, lock):
            return "hand-out"  # a hold taken after that release: not the copy it left
        async with self._lock:
            freed = await self._apply_release(journal, enhanced, lock.key)
        if freed:
            self.reconciled_total += 1
            log.info("fallback reconciled before %s was answered to its pull again: the "
                     "copy a journaled release left on the enhanced side is freed", lock.key)
        return "again"

    async def _grant(self, journal: FallbackJournal, legacy: Locker, enhanced: Locker,
                     lock: Lock) -> str:
        owner = (lock.project.repo_full_name, lock.pull.num)
        current = await legacy.get(lock.key)
        if current is None or not current.owned_by(*owner):
            return await self._forget(journal, lock)
        held = await enhanced.get(lock.key)
        if is_conflict(current, held):
            assert held is not None
            self.conflicts.report(key=lock.key, legacy=current, enhanced=held, source="fallback")
            return "conflict"
        if held is None and self._routes_enhanced(lock.key):
            backend = backend_of(enhanced)
            if backend is None:
                return "kept"
            await raise_counter(enhanced, lock.key, current.fencing_token)
            if await backend.adopt([current], {}):
                return "kept"  # taken meanwhile by another pull: the next pass reports it
            await journal.remove(journal.granted, lock)  # a newer entry stays for the next pass
            return "adopted"
        return await self._forget(journal, lock)

    @staticmethod
    async def _forget(journal: FallbackJournal, lock: Lock) -> str:
        """Take the grant entry ``lock`` out: ``"forgotten"``, or ``"kept"`` when a newer entry
        of its key was written since it was read (the next pass looks at that one)."""
        return "forgotten" if await journal.remove(journal.granted, lock) else "kept"

    async def _apply_release(self, journal: FallbackJournal, enhanced: Locker,
                             key: str) -> bool | None:
        """Apply the journaled release of ``key``: whether it freed the copy it names (only a
        copy acquired before that release, by the same pull), ``None`` when there was nothing
        left to apply (another replica applied it).

        The copy is freed first, by a release of that very hold (its owner and fencing
        token): of several replicas applying the entry at once one frees it and the others
        find it gone; a newer lock of the pull (it released the copy and took the key again
        meanwhile) is never freed. Only then does the entry leave the journal: a replica that
        finds no entry knows the copy it names is already freed (see
        :meth:`before_reentrant`). It leaves only if it is still the entry read here (its
        version): a release of the key journaled in between, by the same pull, is a newer
        entry and stays, applied at the next pass. While the enhanced side does not answer
        the entry stays (``BackendUnavailable``)."""
        tombstone = await journal.released.get(key)
        if tombstone is None:
            return None
        held = await enhanced.get(key)
        freed = False
        if held is not None and _names(tombstone, held):
            try:
                freed = await _release_hold(enhanced, held) is not None
            except LockNotOwned:
                pass  # gone meanwhile, or a newer hold: not ours to free
        await journal.remove(journal.released, tombstone)
        return freed

    def status(self, *, mode: FallbackMode) -> FallbackStatus:
        return FallbackStatus(mode=mode, pending=self.pending, unreadable=self.unreadable,
                              granted=self.granted_total,
                              released_while_away=self.released_total,
                              reconciled=self.reconciled_total,
                              journal_errors=self.journal_errors, last_reconcile=self.last)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
