"""Leasing: a timer per leased key that frees the lock when its lease runs out.

An enhanced lock may carry a lease (``ttl`` on the request, else ``lock-ttl``); a refresh moves
its end. When the lease ends the lock must be freed and the key's queue served *then*, not at
the next request that happens to touch the key: so each leased key gets one event-loop timer
(``loop.call_later``, no polling) set to the lease's end. When it fires it asks the backend to
``expire`` the key, which decides by its own clock: a refreshed lease is left alone and the
timer is set again to the new end. A lease whose end has passed here but not in the store (its
clock is behind this one) is looked at again when the store's clock reaches it, not at once
(:meth:`LeaseTimers.arm_by_store`).

One timer per key is enough: it is set to the earliest end known, and every firing re-arms
for the holder found afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from datetime import datetime

from enhanced_locking.types import utcnow

__all__ = ["LeaseTimers"]

# Fire a little after the lease's end, so the backend's clock (which decides) has passed it too.
_SLACK = 0.002


class LeaseTimers:
    """Schedules ``on_due(key)`` at each leased key's end."""

    def __init__(self, on_due: Callable[[str], Coroutine[None, None, None]],
                 *, clock: Callable[[], datetime] = utcnow) -> None:
        self._on_due = on_due
        self._clock = clock
        self._timers: dict[str, tuple[datetime, asyncio.TimerHandle]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._free = asyncio.Event()
        """Clear while :meth:`hold` holds the timers: one that comes due waits for it."""
        self._free.set()

    def arm(self, key: str, expires_at: datetime | None) -> None:
        """Make sure ``key`` is looked at no later than ``expires_at``."""
        if expires_at is None:
            return
        current = self._timers.get(key)
        if current is not None and current[0] <= expires_at:
            return
        if current is not None:
            current[1].cancel()
        delay = max(0.0, (expires_at - self._clock()).total_seconds()) + _SLACK
        handle = asyncio.get_running_loop().call_later(delay, self._fire, key)
        self._timers[key] = (expires_at, handle)

    def arm_by_store(self, key: str, expires_at: datetime | None, store_now: datetime) -> None:
        """Make sure ``key`` is looked at no later than when the store's clock, which reads
        ``store_now`` now, reaches ``expires_at`` (a store whose clock is not this one's)."""
        if expires_at is not None:
            self.arm(key, expires_at + (self._clock() - store_now))

    def now(self) -> datetime:
        """The timers' clock."""
        return self._clock()

    def disarm(self, key: str) -> None:
        current = self._timers.pop(key, None)
        if current is not None:
            current[1].cancel()

    def due(self, key: str) -> datetime | None:
        """When ``key`` is to be looked at (the earliest lease known of it), if it is."""
        current = self._timers.get(key)
        return None if current is None else current[0]

    def armed(self) -> dict[str, datetime]:
        return {key: when for key, (when, _) in self._timers.items()}

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(self._due(key))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _due(self, key: str) -> None:
        await self._free.wait()
        await self._on_due(key)

    def hold(self) -> None:
        """Timers that come due from now on wait (until :meth:`release`, or are dropped by
        :meth:`close`): a store switch holds the old locker's, whose store is being copied."""
        self._free.clear()

    def release(self) -> None:
        """What :meth:`hold` held goes on: the keys that came due are looked at now."""
        self._free.set()

    async def close(self) -> None:
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for task in list(self._running):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
