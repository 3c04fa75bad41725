"""The legacy locker: Atlantis's locking, exactly.

Fail fast, no queue, no priorities: a held key answers "held" with the current lock; the pull
that holds a key gets it again unchanged. Its store is Atlantis's layout, so it can share locks
with a running Atlantis (Redis ``pr/{key}``) or be imported from Atlantis's BoltDB file.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from enhanced_locking.backends.base import Backend, Owner
from enhanced_locking.locking.base import AtlantisCalls
from enhanced_locking.types import (
    AcquireResult,
    Lock,
    LockRequest,
    Locks,
    LockUnreadable,
    Reason,
    Side,
    utcnow,
)

__all__ = ["LegacyLocker"]


class LegacyLocker(AtlantisCalls):
    side: Side = "legacy"

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def acquire(self, request: LockRequest) -> AcquireResult:
        # Atlantis has no priorities, waits or leases: they are ignored, not refused, so a
        # request routed here behaves exactly as Atlantis would.
        asked = Lock.for_request(
            request.model_copy(update={"ttl": None}), now=utcnow(), token=0, backend="legacy"
        )
        try:
            granted, lock = await self.backend.acquire(asked)
        except LockUnreadable as error:  # never granted over what cannot be read
            return AcquireResult.refused(request.key, Reason.UNREADABLE, error=str(error))
        if granted:  # a fresh grant is stored as asked; the pull's own lock is older
            return AcquireResult.granted(lock, fresh=lock.acquired_at >= asked.acquired_at)
        return AcquireResult.refused(request.key, Reason.HELD, lock)

    # The store's own coroutines, not ones that await them: the router asks the legacy side
    # three times per lock pair (before and after a grant, and on release), a frame each.
    def release(self, key: str, *, owner: Owner | None = None,
                token: int | None = None) -> Coroutine[Any, Any, Lock | None]:
        # Atlantis's locks have no fencing token (each is stored with 0): ``token`` picks out
        # nothing here, the release is by owner as Atlantis's.
        return self.backend.release(key, owner=owner)

    def get(self, key: str) -> Coroutine[Any, Any, Lock | None]:
        return self.backend.get(key)

    async def list(self, *, repo: str | None = None, pull: int | None = None) -> Locks:
        return await self.backend.list(repo=repo, pull=pull)

    async def release_by_pull(self, repo: str, pull: int) -> Locks:
        return await self.backend.release_by_pull(repo, pull)
