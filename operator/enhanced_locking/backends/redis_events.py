"""Events across replicas: the event bus over one Redis Stream.

Every replica appends its events to the stream ``{key-prefix}events`` and reads the whole
stream back, so ``GET /v1/events`` on any replica shows every replica's events, in one order,
with the stream's ids (``<ms>-<seq>``, the id form the in-process bus already uses). A client
that reconnects to another replica with ``Last-Event-ID`` resumes where it was.

* ``publish`` is the shared one (:mod:`~enhanced_locking.backends.shared_events`): the outbox
  is appended up to 10 ms later (``coalesce``), one ``XADD`` an event, the events of those
  10 ms pipelined in one round trip, and the stream trimmed to about ``capacity`` entries by
  one ``XTRIM`` at the end of the same write (not by each ``XADD``: three arguments fewer an
  event for Redis to read, one look at the stream's length a write). Subscribers in the
  process hear of an event at once; only other replicas' followers see it that much later.
  With 2 ms, a replica granting and releasing one lock after another paid about one more
  round trip per pair (three where the lock itself takes two).
* Once someone follows the stream (an SSE client), one reader task per replica follows it
  (``XREAD BLOCK``) into the in-process ring the SSE stream serves from; it first loads the
  newest ``capacity`` entries, so a resume after a restart still finds them. A client further
  behind than that gets the ``gap`` event.
* A stream key written over by something else (another Redis type) is replaced by a new,
  empty stream by the next append, which logs it; a reader meanwhile waits, as for a Redis
  that does not answer, and goes on from the new stream (nothing of the old one is read).
* When Redis is unreachable the outbox keeps up to ``capacity`` events and is appended when
  Redis answers again (older ones are dropped and counted in the log); the reader resumes from
  the last id it saw, so it misses nothing the stream still holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import redis.exceptions as rexc

from enhanced_locking.backends.outbox import RETRY_FIRST, RETRY_MAX
from enhanced_locking.backends.redis_connection import (
    REPLACE_WRITTEN_OVER,
    RedisConnection,
    again_if_written_over,
    connect,
    wrong_type,
)
from enhanced_locking.backends.shared_events import SharedEventBus
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import parse_event_id
from enhanced_locking.types import Event

__all__ = ["RedisEventBus"]

log = logging.getLogger(__name__)

_BLOCK_MS = 3_000  # below the connection's read timeout: an idle stream is not an error
_json = Event.__pydantic_serializer__.to_json
"""``Event.model_dump_json`` as bytes, without its wrapper (about 0.7 µs an event)."""
_DOWN = (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError, OSError)


class StreamWrittenOver(Exception):
    """The stream's key holds another Redis type again right after it was replaced (something
    else keeps writing there): the outbox retries later, as while Redis is away."""


class RedisEventBus(SharedEventBus):
    """:class:`~enhanced_locking.events.EventBus` whose ring is fed by a Redis Stream."""

    name = "redis"
    down = (*_DOWN, StreamWrittenOver)
    coalesce = 0.01

    def __init__(
        self,
        connection: RedisConnection,
        *,
        stream: str,
        capacity: int = 10_000,
        enabled: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__(where=connection.where, capacity=capacity, enabled=enabled)
        self.connection = connection
        self.stream_key = stream
        self._cursor = "0-0"
        self._replace = connection.client.register_script(REPLACE_WRITTEN_OVER)
        self._unreadable = ""
        """The Redis type the reader last found at the stream's key ('' while it reads)."""

    @classmethod
    def from_config(cls, config: EnhancedLockingConfig, *,
                    enabled: Callable[[], bool] = lambda: True) -> RedisEventBus:
        return cls(connect(config), stream=f"{config.redis_key_prefix}events", enabled=enabled)

    # --- writing -----------------------------------------------------------------------------
    async def _write(self, batch: list[Event]) -> None:
        # One pipelined round trip for the whole batch (``XADD key * e <event JSON>`` each,
        # the JSON as ``model_dump_json`` makes it, as bytes), then the stream trimmed to
        # about capacity (``XTRIM key MAXLEN ~ capacity``: whole nodes of the stream go).
        stream = self.stream_key
        commands: list[tuple[Any, ...]] = [("XADD", stream, "*", "e", _json(event, by_alias=False))
                                           for event in batch]
        commands.append(("XTRIM", stream, "MAXLEN", "~", self.capacity))
        # Another Redis type at the stream's key (written over by something else): every
        # command is refused (all name the one key), so the batch is appended to a new stream.
        try:
            await again_if_written_over(self._replace, stream, "stream",
                                        lambda: self.connection.call_all(commands),
                                        self._replaced)
        except rexc.ResponseError as error:
            if not wrong_type(error):
                raise
            raise StreamWrittenOver(f"the event stream {stream} is of another Redis type "
                                    "again") from None

    def _replaced(self, kind: str) -> None:
        log.warning("the event stream %s was not a stream (Redis type %s; written over by "
                    "something else?): replaced by a new stream", self.stream_key, kind)

    async def _disconnect(self) -> None:
        await self.connection.close()

    # --- reading -----------------------------------------------------------------------------
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
        backoff = RETRY_FIRST
        while True:
            try:
                if not self._loaded.is_set():
                    await self._load()
                    self._loaded.set()
                    self._wake()
                answer: Any = await self.connection.client.xread(
                    {self.stream_key: self._cursor}, count=1000, block=_BLOCK_MS)
                backoff = RETRY_FIRST
            except _DOWN as error:
                log.warning("reading events from redis %s failed (%s); retrying",
                            self.connection.where, type(error).__name__)
                await asyncio.sleep(backoff)
                backoff = min(RETRY_MAX, backoff * 2)
                continue
            except rexc.ResponseError as error:
                if not wrong_type(error):
                    raise
                # Written over by something else: the next event appended replaces it. It
                # holds no events, so a reader that starts now has loaded all there is.
                await self._written_over()
                if not self._loaded.is_set():
                    self._loaded.set()
                    self._wake()
                await asyncio.sleep(backoff)
                backoff = min(RETRY_MAX, backoff * 2)
                continue
            self._unreadable = ""
            for _, entries in answer or []:
                for entry_id, fields in entries:
                    self._take(str(entry_id), fields)
            if answer:
                self._wake()

    async def _written_over(self) -> None:
        """Say once (until the stream reads again) that its key holds another type."""
        with contextlib.suppress(*_DOWN, rexc.ResponseError):
            kind = str(await self.connection.client.type(self.stream_key))
            if kind != self._unreadable:
                self._unreadable = kind
                log.warning("the event stream %s is not a stream (Redis type %s; written over "
                            "by something else?): read again once the next event appended "
                            "replaces it", self.stream_key, kind)
