"""The backend seam: where held locks and fencing counters live.

A backend answers a few atomic questions about one lock space (a *namespace*: ``legacy``,
``enhanced`` or ``shadow`` share a store but never each other's keys). Lockers add the policy
on top (waiting, priorities, routing). Every backend gives the same answers; the tests run one
table of behaviours against each.

:class:`StoreBackend` holds the shared logic for stores that run inside this process (memory,
the embedded SQLite file): it is written once over a handful of synchronous primitives. Those
stores are single-writer and answer in microseconds, so their operations complete without
yielding to the event loop, which also makes each one atomic with respect to other tasks.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from enhanced_locking.types import Lock, LockingError, LockNotOwned, Locks, utcnow

__all__ = ["Backend", "Owner", "StoreBackend"]

Owner = tuple[str, int]
"""Who may release a lock: (repository full name, pull number), Atlantis's ownership rule."""


@runtime_checkable
class Backend(Protocol):
    """One lock space. All methods are atomic per call."""

    kind: str
    namespace: str

    async def acquire(self, candidate: Lock) -> tuple[bool, Lock]:
        """Grant ``candidate`` if its key is free or expired, else report the holder.

        The holder's own pull asking again gets ``(True, holder)`` unchanged (Atlantis's
        rule). A fresh grant gets the key's next fencing token and is returned as stored.
        """
        ...

    async def release(self, key: str, *, owner: Owner | None = None) -> Lock | None:
        """Free ``key``; with ``owner`` only if that pull holds it (else ``LockNotOwned``)."""
        ...

    async def get(self, key: str) -> Lock | None: ...

    async def list(self, *, repo: str | None = None, pull: int | None = None) -> Locks: ...

    async def release_by_pull(self, repo: str, pull: int) -> Locks: ...

    async def refresh(self, key: str, owner: Owner, ttl: timedelta) -> Lock:
        """Extend the lease of a held lock (``LockNotOwned`` if the owner lost it)."""
        ...

    async def export(self) -> tuple[Locks, dict[str, int]]:
        """Every held lock and every key's fencing counter (to move them to another store)."""
        ...

    async def adopt(self, locks: Locks, tokens: dict[str, int]) -> Locks:
        """Take over locks and counters from another store; counters only ever rise.

        Returns the locks it could not take because their key is held here by another pull.
        """
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class StoreBackend(abc.ABC):
    """Backend logic over synchronous primitives; subclasses say how rows are kept."""

    kind = "store"

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    # --- primitives ---------------------------------------------------------------------------
    @abc.abstractmethod
    def _load(self, key: str) -> Lock | None: ...

    @abc.abstractmethod
    def _store(self, lock: Lock) -> None: ...

    @abc.abstractmethod
    def _delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def _next_token(self, key: str) -> int: ...

    @abc.abstractmethod
    def _tokens(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def _raise_token(self, key: str, at_least: int) -> None: ...

    @abc.abstractmethod
    def _scan(self, repo: str | None, pull: int | None) -> Locks: ...

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        yield

    # --- shared logic -------------------------------------------------------------------------
    def _live(self, key: str, now: datetime) -> Lock | None:
        lock = self._load(key)
        if lock is not None and lock.expired(now):
            self._delete(key)
            return None
        return lock

    async def acquire(self, candidate: Lock) -> tuple[bool, Lock]:
        with self._transaction():
            holder = self._live(candidate.key, candidate.acquired_at)
            if holder is not None:
                same = holder.owned_by(candidate.project.repo_full_name, candidate.pull.num)
                return same, holder
            lock = candidate.model_copy(update={"fencing_token": self._next_token(candidate.key)})
            self._store(lock)
            return True, lock

    async def release(self, key: str, *, owner: Owner | None = None) -> Lock | None:
        with self._transaction():
            holder = self._live(key, utcnow())
            if holder is None:
                return None
            if owner is not None and not holder.owned_by(*owner):
                raise LockNotOwned(key, holder)
            self._delete(key)
            return holder

    async def get(self, key: str) -> Lock | None:
        with self._transaction():
            return self._live(key, utcnow())

    async def list(self, *, repo: str | None = None, pull: int | None = None) -> Locks:
        now = utcnow()
        return [lock for lock in self._scan(repo, pull) if not lock.expired(now)]

    async def release_by_pull(self, repo: str, pull: int) -> Locks:
        with self._transaction():
            released = self._scan(repo, pull)
            for lock in released:
                self._delete(lock.key)
        now = utcnow()
        return [lock for lock in released if not lock.expired(now)]

    async def refresh(self, key: str, owner: Owner, ttl: timedelta) -> Lock:
        with self._transaction():
            now = utcnow()
            holder = self._live(key, now)
            if holder is None:
                raise LockingError(f"lock {key} is not held (it expired or was released)", key=key)
            if not holder.owned_by(*owner):
                raise LockNotOwned(key, holder)
            lock = holder.model_copy(update={"expires_at": now + ttl})
            self._store(lock)
            return lock

    async def export(self) -> tuple[Locks, dict[str, int]]:
        return await self.list(), self._tokens()

    async def adopt(self, locks: Locks, tokens: dict[str, int]) -> Locks:
        conflicts = []
        with self._transaction():
            for key, token in tokens.items():
                self._raise_token(key, token)
            now = utcnow()
            for lock in locks:
                holder = self._live(lock.key, now)
                if holder is None:
                    self._raise_token(lock.key, lock.fencing_token)
                    self._store(lock)
                elif not holder.owned_by(lock.project.repo_full_name, lock.pull.num):
                    conflicts.append(lock)
        return conflicts

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
