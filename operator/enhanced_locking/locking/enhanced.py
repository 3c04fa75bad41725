"""The enhanced locker: Atlantis's semantics plus leases, fencing, limits, events and metrics.

It reads the live configuration on every call (``settings()``), so a feature flag or a timeout
changed through the provider applies to the next request without rebuilding anything.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from enhanced_locking.backends.base import Backend, Owner
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.durations import format_duration
from enhanced_locking.events import EventBus
from enhanced_locking.locking.base import AtlantisCalls
from enhanced_locking.metrics import Metrics
from enhanced_locking.types import (
    AcquireResult,
    InvalidRequest,
    Lock,
    LockRequest,
    Locks,
    Reason,
    Side,
    utcnow,
)

__all__ = ["EnhancedLocker"]


class EnhancedLocker(AtlantisCalls):
    side: Side = "enhanced"

    def __init__(
        self,
        backend: Backend,
        *,
        settings: Callable[[], EnhancedLockingConfig],
        events: EventBus,
        metrics: Metrics,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.events = events
        self.metrics = metrics

    def validate(self, request: LockRequest) -> None:
        """Refuse what cannot be served as asked: never clamp a wait silently."""
        config = self.settings()
        if request.wait is not None and request.wait > config.max_timeout:
            raise InvalidRequest(
                f"wait {format_duration(request.wait)} is above the maximum "
                f"{format_duration(config.max_timeout)} (enhanced-locking-max-timeout)",
                field="wait",
                key=request.key,
            )

    def lease(self, request: LockRequest) -> timedelta | None:
        ttl = request.ttl if request.ttl is not None else self.settings().lock_ttl
        return ttl if ttl > timedelta(0) else None

    async def acquire(self, request: LockRequest) -> AcquireResult:
        self.validate(request)
        candidate = Lock.for_request(
            request.model_copy(update={"ttl": self.lease(request)}),
            now=utcnow(),
            token=0,
            backend="enhanced",
        )
        granted, lock = await self.backend.acquire(candidate)
        if granted:
            if lock.acquired_at == candidate.acquired_at:  # fresh, not the holder re-asking
                self.events.publish("acquired", lock=lock)
            return AcquireResult.granted(lock)
        return AcquireResult.refused(request.key, Reason.HELD, lock)

    async def release(self, key: str, *, owner: Owner | None = None) -> Lock | None:
        lock = await self.backend.release(key, owner=owner)
        if lock is not None:
            self.events.publish("released", lock=lock)
        return lock

    async def get(self, key: str) -> Lock | None:
        return await self.backend.get(key)

    async def list(self, *, repo: str | None = None, pull: int | None = None) -> Locks:
        return await self.backend.list(repo=repo, pull=pull)

    async def release_by_pull(self, repo: str, pull: int) -> Locks:
        released = await self.backend.release_by_pull(repo, pull)
        for lock in released:
            self.events.publish("released", lock=lock)
        return released
