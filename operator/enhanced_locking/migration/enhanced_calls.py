"""The router's calls beyond Atlantis's: batches, queues, leases and admin.

Mixed into :class:`~enhanced_locking.migration.router.Router`. The same rules hold as for a
single acquire: each key goes to its side; a key held on the other side is not free; legacy
stays fail fast (Atlantis never waits), so waits, queues and leases exist on the enhanced side
only; with enhanced locking disabled nothing here reaches the enhanced locker.

A batch whose keys route to both sides waits on the enhanced part first (all or nothing, holding
none of it while waiting), then takes the legacy part fail fast, and gives the enhanced part
back if the legacy part is refused: it never holds a partial set while it waits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from enhanced_locking.backends.base import Owner
from enhanced_locking.backends.waiting import Waiters
from enhanced_locking.events import EventBus
from enhanced_locking.locking import EnhancedLocker, batch
from enhanced_locking.locking.base import Locker
from enhanced_locking.metrics import FallbackAction, Metrics
from enhanced_locking.migration import identity
from enhanced_locking.provider import Snapshot
from enhanced_locking.types import (
    AcquireResult,
    BackendUnavailable,
    BatchLockRequest,
    BatchResult,
    InvalidRequest,
    Lock,
    LockNotHeld,
    LockNotOwned,
    LockRequest,
    Locks,
    Reason,
    Side,
)

__all__ = ["EnhancedCalls", "PullClosed"]


CLOSE_TOLERANCE = timedelta(seconds=2)
"""What was asked for or taken up to this long after a pull's close time counts as before it:
VCS timestamps are whole seconds and its clock is not ours."""


@dataclass(frozen=True)
class PullClosed:
    """What closing a pull request did: the locks it released and the queued requests (waiter
    ids) it dropped."""

    released: Locks
    cancelled: list[str]


class _RouterParts(Protocol):
    side: Side
    legacy: Locker
    events: EventBus
    metrics: Metrics
    _snapshot: Callable[[], Snapshot]

    @property
    def enhanced(self) -> Locker | None: ...

    def side_for(self, key: str) -> Side: ...

    async def acquire(self, request: LockRequest) -> AcquireResult: ...

    async def release(self, key: str, *, owner: Owner | None = None) -> Lock | None: ...

    async def get(self, key: str) -> Lock | None: ...

    async def list(self, *, repo: str | None = None, pull: int | None = None) -> Locks: ...

    async def _journal_grant(self, lock: Lock) -> None: ...

    async def _acquire_batch_routed(self, request: BatchLockRequest) -> BatchResult: ...

    async def release_by_pull(self, repo: str, pull: int) -> Locks: ...


def _enhanced(router: _RouterParts) -> EnhancedLocker | None:
    locker = router.enhanced
    if locker is None or not router._snapshot().config.enabled:
        return None
    return locker if isinstance(locker, EnhancedLocker) else None


class EnhancedCalls:
    """Batch, queue, lease and admin calls of the router."""

    async def acquire_batch(self: _RouterParts, request: BatchLockRequest) -> BatchResult:
        """Every lock or none; a key held for another project refuses the batch (collision)."""
        for item in request.locks:
            refused = identity.refuse_ambiguous(item.key, item.project, item.workspace,
                                                await _safe_get(self, item.key))
            if refused is not None:
                return BatchResult(acquired=False, lock_key=item.key, reason=refused.reason,
                                   holder=refused.holder, error=refused.error)
        return await self._acquire_batch_routed(request)

    async def _acquire_batch_routed(self: _RouterParts, request: BatchLockRequest) -> BatchResult:
        enhanced = _enhanced(self)
        on_enhanced = [i for i in request.locks if self.side_for(i.key) == "enhanced"]
        if enhanced is None or not on_enhanced:
            return await batch.acquire_one_by_one(self, request)
        owner = request.owner
        for item in on_enhanced:  # still held on the legacy side: not free here either
            held = await self.legacy.get(item.key)
            if held is not None and not held.owned_by(*owner):
                return BatchResult(acquired=False, lock_key=item.key, reason=Reason.HELD,
                                   holder=held)
        mine_before = {
            key for key in request.keys
            if (lock := await _safe_get(enhanced, key)) is not None and lock.owned_by(*owner)
        }
        part = request.model_copy(update={"locks": on_enhanced})
        try:
            first = await enhanced.acquire_batch(part)
        except BackendUnavailable as error:
            action: FallbackAction = ("legacy" if self._snapshot().config.fallback == "legacy"
                                      else "refused")
            self.metrics.fallback(action)
            self.events.publish("fallback", key=on_enhanced[0].key, action=action,
                                error=str(error), repo=owner[0])
            if action == "legacy":
                served = await batch.acquire_one_by_one(self.legacy, request)
                for lock in served.locks:  # reconciled into enhanced when it answers again
                    await self._journal_grant(lock)
                return served
            return BatchResult(acquired=False, lock_key=on_enhanced[0].key,
                               reason=Reason.UNAVAILABLE)
        if not first.acquired:
            return first

        async def give_back() -> None:
            for lock in first.locks:
                if lock.key not in mine_before:
                    await enhanced.release(lock.key, owner=owner)

        for item in on_enhanced:  # the legacy side granted one of them meanwhile: back off
            held = await self.legacy.get(item.key)
            if held is not None and not held.owned_by(*owner):
                await give_back()
                return BatchResult(acquired=False, lock_key=item.key, reason=Reason.HELD,
                                   holder=held)
        on_legacy = [i for i in request.locks if self.side_for(i.key) != "enhanced"]
        if not on_legacy:
            return first
        rest = await batch.acquire_one_by_one(
            self, request.model_copy(update={"locks": on_legacy, "wait": None}))
        if not rest.acquired:
            await give_back()
            return rest
        by_key = {lock.key: lock for lock in [*first.locks, *rest.locks]}
        return BatchResult(acquired=True, locks=[by_key[key] for key in request.keys])

    async def release_batch(
        self: _RouterParts, keys: Sequence[str], *, owner: Owner | None = None
    ) -> Locks:
        return await batch.release_all(self, keys, owner=owner)

    async def queue(self: _RouterParts, key: str) -> Waiters:
        """``key``'s waiters in service order (legacy has no queues)."""
        enhanced = _enhanced(self)
        return [] if enhanced is None else await enhanced.queue(key)

    async def cancel_waiter(self: _RouterParts, key: str, waiter_id: str) -> bool:
        enhanced = _enhanced(self)
        return enhanced is not None and await enhanced.cancel_waiter(key, waiter_id) is not None

    async def close_pull(
        self: _RouterParts, repo: str, pull: int, *, closed_at: datetime | None = None
    ) -> PullClosed:
        """A pull request was closed or merged: drop its queued requests, then release its
        locks (both sides). With ``closed_at`` only what it asked for or took by then (plus
        :data:`CLOSE_TOLERANCE`) goes: a close told again after the pull was reopened and
        locked anew changes nothing."""
        if closed_at is not None:  # VCS times are whole seconds, and clocks differ a little
            closed_at += CLOSE_TOLERANCE
        cancelled: list[str] = []
        granted_meanwhile: set[str] = set()
        enhanced = _enhanced(self)
        if enhanced is not None:  # first the queue, so no release hands a key to this pull
            for key, waiter in await enhanced.waiting_for(repo, pull):
                if closed_at is None or waiter.enqueued_at <= closed_at:
                    if await enhanced.cancel_waiter(key, waiter.id) is not None:
                        cancelled.append(waiter.id)
                    else:  # granted between the look and the cancel: its locks go too
                        granted_meanwhile.update(waiter.keys)
        released: Locks = []
        for lock in await self.list(repo=repo, pull=pull):
            if (closed_at is not None and lock.acquired_at > closed_at
                    and lock.key not in granted_meanwhile):
                continue
            try:
                if (gone := await self.release(lock.key, owner=(repo, pull))) is not None:
                    released.append(gone)
            except LockNotOwned:
                continue  # taken by another pull since the list: not this pull's to release
        return PullClosed(released=released, cancelled=cancelled)

    async def force_unlock(self: _RouterParts, key: str) -> Lock | None:
        """Free ``key`` on whichever side holds it; the enhanced side serves its queue."""
        released = await self.legacy.release(key)
        enhanced = self.enhanced
        if isinstance(enhanced, EnhancedLocker):
            released = await enhanced.force_unlock(key) or released
        return released

    async def refresh(
        self: _RouterParts, key: str, *, owner: Owner, ttl: timedelta | None
    ) -> Lock | None:
        """Extend the lease of ``key``; ``None`` when nothing holds it.

        An enhanced store that does not answer is an outage (``BackendUnavailable``, 503),
        never "not held": a lease is only on the enhanced side, so nothing else can say.
        """
        enhanced = self.enhanced
        if isinstance(enhanced, EnhancedLocker):
            try:
                return await enhanced.refresh(key, owner=owner, ttl=ttl)
            except LockNotHeld:
                pass
        if await self.legacy.get(key) is not None:
            raise InvalidRequest(f"key: {key} is held on the legacy side, whose locks have no "
                                 "lease (Atlantis semantics)", field="key", key=key)
        return None


async def _safe_get(locker: Locker, key: str) -> Lock | None:
    try:
        return await locker.get(key)
    except BackendUnavailable:
        return None
