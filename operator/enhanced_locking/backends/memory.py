"""The in-memory backend: the reference store, for tests and throwaway runs.

Nothing is kept past the process: a service started again on it holds no lock and has no
fencing counter. A key's tokens start above the clock when the store was made
(:func:`~enhanced_locking.backends.base.clock_floor`), so they keep rising across restarts
for whatever outlives the process (a resource that checks tokens has seen those handed out
before), as the Redis store's counters do after a restart without persistence."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from enhanced_locking.backends.base import StoreBackend, clock_floor
from enhanced_locking.types import Lock, utcnow

__all__ = ["MemoryBackend"]


class MemoryBackend(StoreBackend):
    """Locks in a dict; gone when the process ends."""

    kind = "memory"

    def __init__(
        self, namespace: str = "enhanced", *, clock: Callable[[], datetime] = utcnow
    ) -> None:
        super().__init__(namespace, clock=clock)
        self._locks: dict[str, Lock] = {}
        self._shared: dict[str, dict[tuple[str, int], Lock]] = {}
        self._counters: dict[str, int] = {}
        self.token_floor = clock_floor(clock())
        """Every key's first token is above it: the clock when the store was made
        (milliseconds times 1000), above the tokens a store of an earlier process handed out."""

    def _load(self, key: str) -> Lock | None:
        return self._locks.get(key)

    def _store(self, lock: Lock) -> None:
        self._locks[lock.key] = lock

    def _delete(self, key: str) -> None:
        self._locks.pop(key, None)

    def _load_shared(self, key: str) -> list[Lock]:
        return sorted(self._shared.get(key, {}).values(), key=lambda lock: lock.fencing_token)

    def _store_shared(self, lock: Lock) -> None:
        self._shared.setdefault(lock.key, {})[lock.owner] = lock

    def _delete_shared(self, key: str, owner: tuple[str, int]) -> None:
        holders = self._shared.get(key)
        if holders is not None:
            holders.pop(owner, None)
            if not holders:
                del self._shared[key]

    def _purge(self, key: str) -> None:
        self._locks.pop(key, None)
        self._shared.pop(key, None)

    def _pop(self, key: str, owner: tuple[str, int] | None) -> Lock | None:
        lock = self._locks.get(key)
        if lock is None or (owner is not None and not lock.owned_by(*owner)):
            return None
        return self._locks.pop(key)

    def _next_token(self, key: str) -> int:
        self._counters[key] = self._counters.get(key, self.token_floor) + 1
        return self._counters[key]

    def _tokens(self) -> dict[str, int]:
        return dict(self._counters)

    def _raise_token(self, key: str, at_least: int) -> None:
        self._counters[key] = max(self._counters.get(key, self.token_floor), at_least)

    def _scan(self, repo: str | None, pull: int | None) -> list[Lock]:
        shared = (lock for holders in self._shared.values() for lock in holders.values())
        return [
            lock
            for lock in (*self._locks.values(), *shared)
            if (repo is None or lock.project.repo_full_name == repo)
            and (pull is None or lock.pull.num == pull)
        ]
