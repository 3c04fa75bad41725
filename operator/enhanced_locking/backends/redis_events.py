"""Events across replicas: the event bus over one Redis Stream.

Every replica appends its events to the stream ``{key-prefix}events`` and reads the whole
stream back, so ``GET /v1/events`` on any replica shows every replica's events, in one order,
with the stream's ids (``<ms>-<seq>``, the id form the in-process bus already uses). A client
that reconnects to another replica with ``Last-Event-ID`` resumes where it was.

* ``publish`` stays synchronous (the caller is in the middle of a lock operation): in-process
  subscribers are called at once (with the event not yet numbered, ``id`` empty), and the event
  joins an outbox that one task appends with a pipelined ``XADD`` (trimmed to about
  ``capacity`` entries) a couple of milliseconds later: a burst of events costs one round
  trip, not one each.
* Once someone follows the stream (an SSE client), one reader task per replica follows it
  (``XREAD BLOCK``) into the in-process ring the SSE stream serves from; it first loads the
  newest ``capacity`` entries, so a resume after a restart still finds them. A client further
  behind than that gets the ``gap`` event.
* When Redis is unreachable the outbox keeps up to ``capacity`` events and is appended when
  Redis answers again (older ones are dropped and counted in the log); the reader resumes from
  the last id it saw, so it misses nothing the stream still holds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.exceptions as rexc

from enhanced_locking.backends.redis_connection import RedisConnection, connect
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import EventBus, Gap, parse_event_id
from enhanced_locking.types import Event, Lock, utcnow

__all__ = ["RedisEventBus"]

log = logging.getLogger(__name__)

_COALESCE = 0.002
_BLOCK_MS = 3_000  # below the connection's read timeout: an idle stream is not an error
_RETRY_MAX = 2.0
_DOWN = (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError, OSError)


class RedisEventBus(EventBus):
    """:class:`~enhanced_locking.events.EventBus` whose ring is fed by a Redis Stream."""

    def __init__(
        self,
        connection: RedisConnection,
        *,
        stream: str,
        capacity: int = 10_000,
        enabled: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__(capacity=capacity, enabled=enabled)
        self.connection = connection
        self.stream_key = stream
        self.capacity = capacity
        self._outbox: collections.deque[Event] = collections.deque()
        self._pending = asyncio.Event()
        self._loaded = asyncio.Event()
        self._cursor = "0-0"
        self._appender: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.dropped = 0
        """Events lost because Redis stayed away longer than the outbox could hold them."""

    @classmethod
    def from_config(cls, config: EnhancedLockingConfig, *,
                    enabled: Callable[[], bool] = lambda: True) -> RedisEventBus:
        return cls(connect(config), stream=f"{config.redis_key_prefix}events", enabled=enabled)

    # --- publishing --------------------------------------------------------------------------
    def publish(self, type: str, *, lock: Lock | None = None, key: str | None = None,
                **details: Any) -> Event | None:
        if not self._enabled():
            return None
        key = key or (lock.key if lock else None)
        repo = lock.project.repo_full_name if lock else details.pop("repo", None)
        event = Event.model_construct(id="", type=type, time=utcnow(), key=key, repo=repo,
                                      lock=lock, details=details)
        for subscriber in list(self._subscribers):
            subscriber(event)
        if len(self._outbox) >= self.capacity:
            self._outbox.popleft()
            self.dropped += 1
        self._outbox.append(event)
        self._pending.set()
        if self._appender is None:
            self._appender = asyncio.create_task(self._append(), name="redis-events-append")
        return event

    async def _append(self) -> None:
        backoff = 0.05
        while True:
            await self._pending.wait()
            # A moment for the events of the same burst (an acquire's, then its release's) to
            # join this append: one round trip for several, instead of one each.
            await asyncio.sleep(_COALESCE)
            self._pending.clear()
            if self._outbox:
                batch = list(self._outbox)
                try:
                    async with self.connection.client.pipeline(transaction=False) as pipe:
                        for event in batch:
                            pipe.xadd(self.stream_key, {"e": event.model_dump_json()},
                                      maxlen=self.capacity, approximate=True)
                        await pipe.execute()
                except _DOWN as error:
                    log.warning("events not appended to redis %s yet (%s); retrying",
                                self.connection.where, type(error).__name__)
                    await asyncio.sleep(backoff)
                    backoff = min(_RETRY_MAX, backoff * 2)
                else:
                    backoff = 0.05
                    for _ in batch:
                        self._outbox.popleft()
                if self._outbox:
                    self._pending.set()  # more came meanwhile: the next round takes them

    # --- reading -----------------------------------------------------------------------------
    def _start_reading(self) -> None:
        # The stream is read only while someone follows it (an SSE client): a replica nobody
        # watches spends nothing on other replicas' events.
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name="redis-events-read")

    async def _load(self) -> None:
        entries: Any = await self.connection.client.xrevrange(self.stream_key,
                                                              count=self.capacity)
        for entry_id, fields in reversed(entries or []):
            self._take(str(entry_id), fields)

    def _take(self, entry_id: str, fields: dict[Any, Any]) -> None:
        try:
            event = Event.model_validate_json(fields["e"]).model_copy(update={"id": entry_id})
        except (KeyError, ValueError):
            log.warning("skipping unreadable event %s in %s", entry_id, self.stream_key)
        else:
            self._ring.append(event)
        self._cursor = entry_id
        self._last = parse_event_id(entry_id)

    async def _read(self) -> None:
        backoff = 0.05
        while True:
            try:
                if not self._loaded.is_set():
                    await self._load()
                    self._loaded.set()
                    self._wake()
                answer: Any = await self.connection.client.xread(
                    {self.stream_key: self._cursor}, count=1000, block=_BLOCK_MS)
                backoff = 0.05
            except _DOWN as error:
                log.warning("reading events from redis %s failed (%s); retrying",
                            self.connection.where, type(error).__name__)
                await asyncio.sleep(backoff)
                backoff = min(_RETRY_MAX, backoff * 2)
                continue
            for _, entries in answer or []:
                for entry_id, fields in entries:
                    self._take(str(entry_id), fields)
            if answer:
                self._wake()

    def _wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, asyncio.Event()
        wakeup.set()

    async def follow(self, after: str | None = None, *,
                     max_lag: int | None = None) -> AsyncIterator[Event | Gap]:
        """Every replica's events after ``after`` (only new ones without it), then live."""
        self._start_reading()
        with contextlib.suppress(TimeoutError):
            # A fresh replica first loads what the stream holds, so a resume can find it.
            await asyncio.wait_for(self._loaded.wait(), 5.0)
        async for event in super().follow(after, max_lag=max_lag):
            yield event

    async def close(self) -> None:
        """Append what is still in the outbox (briefly), stop the tasks, disconnect."""
        for _ in range(20):
            if not self._outbox or self._appender is None:
                break
            await asyncio.sleep(0.01)
        tasks = [t for t in (self._appender, self._reader) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        self._appender = self._reader = None
        await self.connection.close()
