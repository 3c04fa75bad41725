"""The router: sends each lock key to the legacy or the enhanced locker.

Routing is sticky per key (see :mod:`enhanced_locking.hashing`): under one weight a key always
goes to the same side. Disabled means everything goes to legacy and the enhanced locker is
never called.

A key may still be held on the side it no longer routes to (the weight moved, or enhanced was
switched off while holding locks). The router never grants such a key twice: before granting on
the authoritative side it asks the other side, and after granting it asks again, backing off if
the other side granted meanwhile. Releases and lookups consult both sides.

When the enhanced backend does not answer, ``fallback: legacy`` sends the request to legacy
(recorded with an event and a metric); ``fail-closed`` answers ``unavailable``.
"""

from __future__ import annotations

from collections.abc import Callable

from enhanced_locking.backends.base import Owner
from enhanced_locking.events import EventBus
from enhanced_locking.locking.base import AtlantisCalls, Locker
from enhanced_locking.metrics import Metrics
from enhanced_locking.migration.enhanced_calls import EnhancedCalls
from enhanced_locking.provider import Snapshot
from enhanced_locking.types import (
    AcquireResult,
    BackendUnavailable,
    Lock,
    LockNotOwned,
    LockRequest,
    Locks,
    Reason,
    Side,
)

__all__ = ["Router"]


class Router(EnhancedCalls, AtlantisCalls):
    """A locker that delegates each key to its authoritative side (batches, queues, leases and
    admin calls: :mod:`~enhanced_locking.migration.enhanced_calls`)."""

    side: Side = "enhanced"

    def __init__(
        self,
        *,
        legacy: Locker,
        enhanced: Callable[[], Locker | None],
        snapshot: Callable[[], Snapshot],
        events: EventBus,
        metrics: Metrics,
    ) -> None:
        self.legacy = legacy
        self._enhanced = enhanced
        self._snapshot = snapshot
        self.events = events
        self.metrics = metrics

    @property
    def enhanced(self) -> Locker | None:
        return self._enhanced()

    def side_for(self, key: str) -> Side:
        snapshot = self._snapshot()
        if self.enhanced is None or not snapshot.config.enabled:
            return "legacy"
        return "enhanced" if snapshot.should_use_enhanced(key) else "legacy"

    def _lockers(self) -> list[Locker]:
        enhanced = self.enhanced
        return [self.legacy] if enhanced is None else [self.legacy, enhanced]

    async def acquire(self, request: LockRequest) -> AcquireResult:
        side = self.side_for(request.key)
        self.metrics.routing.labels(side).inc()
        if side == "legacy":
            return await self._acquire_on(self.legacy, self.enhanced, request)
        enhanced = self.enhanced
        assert enhanced is not None
        try:
            return await self._acquire_on(enhanced, self.legacy, request)
        except BackendUnavailable as error:
            return await self._fall_back(request, error)

    async def _acquire_on(
        self, primary: Locker, other: Locker | None, request: LockRequest
    ) -> AcquireResult:
        owner = (request.project.repo_full_name, request.pull.num)
        if other is not None and (held := await _held_by_other(other, request.key, owner)):
            return AcquireResult.refused(request.key, Reason.HELD, held)
        result = await primary.acquire(request)
        if result.acquired and other is not None:
            held = await _held_by_other(other, request.key, owner)
            if held is not None:  # the other side granted meanwhile: back off, never share
                await primary.release(request.key, owner=owner)
                return AcquireResult.refused(request.key, Reason.HELD, held)
        return result

    async def _fall_back(self, request: LockRequest, error: BackendUnavailable) -> AcquireResult:
        fallback = self._snapshot().config.fallback
        action = "legacy" if fallback == "legacy" else "refused"
        self.metrics.fallbacks.labels(action).inc()
        self.events.publish("fallback", key=request.key, action=action, error=str(error),
                            repo=request.project.repo_full_name)
        if fallback == "legacy":
            return await self._acquire_on(self.legacy, None, request)
        return AcquireResult.refused(request.key, Reason.UNAVAILABLE)

    async def release(self, key: str, *, owner: Owner | None = None) -> Lock | None:
        released: Lock | None = None
        failure: LockNotOwned | BackendUnavailable | None = None
        for locker in self._lockers():
            try:
                released = await locker.release(key, owner=owner) or released
            except (LockNotOwned, BackendUnavailable) as error:
                failure = error
        if released is None and failure is not None:
            raise failure
        return released

    async def get(self, key: str) -> Lock | None:
        for locker in self._ordered(key):
            if (lock := await locker.get(key)) is not None:
                return lock
        return None

    def _ordered(self, key: str) -> list[Locker]:
        lockers = self._lockers()
        return lockers if self.side_for(key) == "legacy" else lockers[::-1]

    async def list(self, *, repo: str | None = None, pull: int | None = None) -> Locks:
        locks = [lock for locker in self._lockers() for lock in await locker.list(repo=repo,
                                                                                   pull=pull)]
        return sorted(locks, key=lambda lock: lock.key)

    async def release_by_pull(self, repo: str, pull: int) -> Locks:
        return [lock for locker in self._lockers()
                for lock in await locker.release_by_pull(repo, pull)]


async def _held_by_other(locker: Locker, key: str, owner: Owner) -> Lock | None:
    try:
        lock = await locker.get(key)
    except BackendUnavailable:
        # The other side is the enhanced one and it is down: legacy keeps serving (the seed's
        # automatic fallback); locks granted meanwhile are reconciled when it returns.
        return None
    return lock if lock is not None and not lock.owned_by(*owner) else None
