"""What every locker offers: the enhanced interface plus Atlantis's ``Locker`` calls.

Atlantis's ``locking.Locker`` is ``TryLock``, ``Unlock``, ``List``, ``UnlockByPull`` and
``GetLock``. :class:`AtlantisCalls` derives those from the five enhanced methods, so the legacy
locker, the enhanced locker and the router all speak both languages the same way.
"""

from __future__ import annotations

from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from enhanced_locking.backends.base import Owner
from enhanced_locking.types import (
    AcquireResult,
    Lock,
    LockRequest,
    Locks,
    Project,
    Pull,
    Side,
    User,
)

__all__ = ["AtlantisCalls", "Locker", "TryLockResponse", "give_back_grant"]


class Locker(Protocol):
    side: Side

    async def acquire(self, request: LockRequest) -> AcquireResult: ...

    async def release(self, key: str, *, owner: Owner | None = None,
                      token: int | None = None) -> Lock | None:
        """Free ``key``; with ``owner`` only if that pull holds it, with ``token`` too only its
        hold with that fencing token (else ``LockNotOwned``). Legacy holds carry no token."""
        ...

    async def get(self, key: str) -> Lock | None: ...

    async def list(self, *, repo: str | None = None, pull: int | None = None) -> Locks: ...

    async def release_by_pull(self, repo: str, pull: int) -> Locks: ...


def give_back_grant(locker: Locker, lock: Lock,
                    owner: Owner) -> Coroutine[Any, Any, Lock | None]:
    """Free ``lock``, a grant to ``owner`` given back, as that grant: on the enhanced side by its
    fencing token, as the enhanced locker gives back its own grants (the pull may hold the key
    anew by then, through another request, under a new token: ``LockNotOwned``, and that hold
    stays); on legacy by owner (its holds carry no token)."""
    token = lock.fencing_token if lock.backend == "enhanced" else None
    return locker.release(lock.key, owner=owner, token=token)


@dataclass(frozen=True)
class TryLockResponse:
    """Atlantis's ``TryLockResponse``: acquired or not, the lock now held, and its key."""

    lock_acquired: bool
    curr_lock: Lock | None
    lock_key: str


class AtlantisCalls:
    """Atlantis's ``Locker`` methods over the enhanced ones (mixed into every locker)."""

    async def try_lock(
        self: Locker, project: Project, workspace: str, pull: Pull, user: User
    ) -> TryLockResponse:
        """Fail fast; the same pull asking again for its own lock gets it."""
        request = LockRequest(project=project, workspace=workspace, pull=pull, user=user)
        result = await self.acquire(request)
        return TryLockResponse(result.acquired, result.lock or result.holder, result.lock_key)

    async def unlock(self: Locker, key: str) -> Lock | None:
        return await self.release(key)

    async def unlock_if_owned_by_pull(
        self: Locker, key: str, repo: str, pull: int
    ) -> Lock | None:
        return await self.release(key, owner=(repo, pull))

    async def unlock_by_pull(self: Locker, repo: str, pull: int) -> Locks:
        return await self.release_by_pull(repo, pull)

    async def get_lock(self: Locker, key: str) -> Lock | None:
        return await self.get(key)
