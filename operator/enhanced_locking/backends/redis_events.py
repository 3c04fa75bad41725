"""Events across replicas: the event bus over one Redis Stream.

Every replica appends its events to the stream ``{key-prefix}events`` and reads the whole
stream back, so ``GET /v1/events`` on any replica shows every replica's events, in one order,
with the stream's ids (``<ms>-<seq>``, the id form the in-process bus already uses). A client
that reconnects to another replica with ``Last-Event-ID`` resumes where it was.

* ``publish`` is the shared one (:mod:`~enhanced_locking.backends.shared_events`): the outbox
  is appended up to 10 ms later (``coalesce``), one ``XADD`` an event, the events of those
  10 ms in one script call (one round trip), and the stream trimmed to about ``capacity``
  entries by the write's last ``XADD`` (``MAXLEN ~``; not by each ``XADD``: three arguments
  fewer an event for Redis to read, one look at the stream's length a write; nor by an
  ``XTRIM`` of its own: one command a write fewer). The script
  appends a write once however often it is sent (:meth:`RedisEventBus._append`): one whose
  answer was lost, sent again, appends nothing. Subscribers in the
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
* When Redis is unreachable, or will not take the events (a replica during a failover, an ACL
  without the rights, a cluster moving, ``maxmemory`` reached), the outbox keeps up to
  ``capacity`` events and is appended when Redis answers again (older ones are dropped: logged,
  counted, and this replica's readers get a ``gap``); the reader resumes from the last id it
  saw, so it misses nothing the stream still holds. Neither ends on an error it did not
  expect: it logs it and tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sys
from collections.abc import Callable
from typing import Any

import redis.exceptions as rexc

from enhanced_locking.backends import redis_lua
from enhanced_locking.backends.outbox import RETRY_FIRST, RETRY_MAX
from enhanced_locking.backends.redis_connection import (
    DOWN,
    REPLACE_WRITTEN_OVER,
    RedisConnection,
    again_if_written_over,
    connect,
    key_beside,
    wrong_type,
)
from enhanced_locking.backends.shared_events import Outgoing, SharedEventBus
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import parse_event_id
from enhanced_locking.types import Event

__all__ = ["RedisEventBus", "stream_floor", "writer_key"]

log = logging.getLogger(__name__)

_BLOCK_MS = 3_000  # below the connection's read timeout: an idle stream is not an error
APPEND_EVENTS = redis_lua.standalone("append_events")
_REACH_WAIT = 1.0
"""Seconds a resume waits for the reader before it reads the stream's newest id again."""
WRITER_TTL = 3600
"""Seconds a writer key is kept after its process's last write (a write is sent again within
seconds: the outbox's backoff is at most ``RETRY_MAX``; a process gone leaves nothing)."""
_DOWN: tuple[type[BaseException], ...] = (*DOWN, rexc.OutOfMemoryError)
"""Redis away or not serving this replica's events now (the connection's list: a replica
during a failover, an ACL without the rights, a cluster moving; and a Redis full up to its
``maxmemory``): the outbox keeps the events and retries, the reader waits and resumes."""


def writer_key(stream: str, writer: str) -> str:
    """The writer key of process ``writer`` for ``stream`` (:func:`key_beside`, of kind
    ``writer``)."""
    return key_beside(stream, "writer", writer)


def stream_floor(info: dict[str, Any], cursor: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """The mark after which a stream holds every entry it was given, from ``XINFO STREAM``:
    ``0-0`` while none was removed (``entries-added`` is its length); else after
    ``max-deleted-entry-id`` (an ``XDEL``) and just before its first entry (``XTRIM`` does
    not move ``max-deleted-entry-id``: what it removed is before the first entry), or after
    ``last-generated-id`` when none is left. A Redis before 7.0 counts nothing of that
    (no ``entries-added``): a reader's ``cursor`` (not ``0-0``) before the first entry is
    taken for entries trimmed after it, so the floor is just before the first entry."""
    added, length = info.get("entries-added"), int(info.get("length") or 0)
    if added is None:
        entry = info.get("first-entry")
        first = parse_event_id(_text(entry[0])) if entry else None
        if cursor == (0, 0) or first is None or first <= cursor:
            return (0, 0)
        return _just_before(first)
    if int(added) <= length:
        return (0, 0)
    deleted = parse_event_id(str(info.get("max-deleted-entry-id") or "0-0"))
    recorded = info.get("recorded-first-entry-id")
    if not length or recorded is None:
        return max(deleted, parse_event_id(str(info.get("last-generated-id") or "0-0")))
    return max(deleted, _just_before(parse_event_id(str(recorded))))


def _just_before(mark: tuple[int, int]) -> tuple[int, int]:
    ms, seq = mark
    return (ms, seq - 1) if seq else (ms - 1, sys.maxsize)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
        self._script = connection.client.register_script(APPEND_EVENTS)
        self.writer = writer_key(stream, secrets.token_hex(8))
        """This process's writer key: the tag of its last write, which makes its writes
        idempotent (:meth:`_append`); kept ``WRITER_TTL`` seconds after each."""
        self._unreadable = ""
        """The Redis type the reader last found at the stream's key ('' while it reads)."""
        self._generated = (0, 0)
        """The stream's ``last-generated-id`` when last looked at (:meth:`_look`): an id
        above it is of no entry this stream had (another stream, before a restart or a
        failover that lost writes)."""
        self._look_again = True
        """Whether the reader looks at the stream (:meth:`_look`) before its next read: on
        load and after each failed read (a reconnect)."""

    @classmethod
    def from_config(cls, config: EnhancedLockingConfig, *,
                    enabled: Callable[[], bool] = lambda: True) -> RedisEventBus:
        return cls(connect(config), stream=f"{config.redis_key_prefix}events", enabled=enabled)

    # --- writing -----------------------------------------------------------------------------
    async def _write(self, batch: list[Outgoing]) -> None:
        await self._once(batch, self._append)

    async def _append(self, batch: list[Outgoing], tag: bytes) -> None:
        """``batch`` appended once under ``tag`` (:meth:`SharedEventBus._once`): one script
        call, one round trip (``lua/standalone/append_events.lua``): unless this process's
        writer key holds ``tag`` (an earlier attempt was run, its answer lost), ``XADD key *
        e <event JSON>`` each, the stream trimmed to about capacity by the last (``XADD key
        MAXLEN ~ capacity * e <event JSON>``: whole nodes of the stream go), and the writer
        key set to ``tag`` for ``WRITER_TTL`` seconds."""
        stream = self.stream_key
        args: list[bytes | int] = [tag, self.capacity, WRITER_TTL,
                                   *(item.json() for item in batch)]
        # Another Redis type at the stream's key (written over by something else): the script
        # is refused at its first XADD, before it wrote anything, so the batch is appended
        # to a new stream.
        try:
            await again_if_written_over(self._replace, stream, "stream",
                                        lambda: self._run(stream, args), self._replaced)
        except rexc.ResponseError as error:
            if not wrong_type(error):
                raise
            raise StreamWrittenOver(f"the event stream {stream} is of another Redis type "
                                    "again") from None

    async def _run(self, stream: str, args: list[bytes | int]) -> Any:
        """The script by ``EVALSHA`` on the connection's kept connections (as the pipeline
        before it: redis-py's script object costs about 70 µs more of this process's time a
        call); a Redis that does not have it (``NOSCRIPT``: new, or restarted) gets it from
        the script object, which loads it where the keys are and calls it again."""
        keys = [stream, self.writer]
        try:
            return await self.connection.call("EVALSHA", self._script.sha, 2, *keys, *args)
        except rexc.NoScriptError:
            return await self._script(keys=keys, args=args)

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
                if self._look_again:
                    await self._look()
                if not self._loaded.is_set():
                    await self._load()
                    self._loaded.set()
                    self._wake()
                answer: Any = await self.connection.client.xread(
                    {self.stream_key: self._cursor}, count=1000, block=_BLOCK_MS)
            except _DOWN as error:
                log.warning("reading events from redis %s failed (%s); retrying",
                            self.connection.where, type(error).__name__)
            except Exception as error:
                if not (isinstance(error, rexc.ResponseError) and wrong_type(error)):
                    self._failed(error)
                else:
                    # Written over by something else: the next event appended replaces it.
                    # It holds no events, so a reader that starts now has loaded all there is.
                    await self._written_over()
                    if not self._loaded.is_set():
                        self._loaded.set()
                        self._wake()
            else:
                backoff = RETRY_FIRST
                self._unreadable = ""
                self._look_again = False
                for _, entries in answer or []:
                    for entry_id, fields in entries:
                        self._take(str(entry_id), fields)
                if answer:
                    self._wake()
                continue
            self._look_again = True
            await asyncio.sleep(backoff)
            backoff = min(RETRY_MAX, backoff * 2)

    async def _look(self) -> None:
        """Read where the stream's entries start (:func:`stream_floor`) and its
        ``last-generated-id``. Entries this reader had not read yet may be among those gone
        (it was cut off while others appended more than the stream keeps): a reader of this
        replica still before the floor gets its ``gap``. A stream that is not there has
        nothing; one of another type is the reader's to see (its XREAD fails)."""
        try:
            info: Any = await self.connection.client.xinfo_stream(self.stream_key)
        except rexc.ResponseError as error:
            if wrong_type(error):
                return
            if "no such key" not in str(error).lower():
                raise
            info = {}
        if (floor := stream_floor(info, self._last)) > self._last:
            # Past this reader's cursor only: entries it had not read are gone. A floor at or
            # before the cursor (a normal trim) took nothing it missed, and the ring still
            # holds what its readers have not read: raised, it gave them a false gap.
            self._floor = max(self._floor, floor)
        self._generated = parse_event_id(str(info.get("last-generated-id") or "0-0"))
        self._wake()  # a reader before the floor hears of it now

    async def _resume_from(self) -> str | None:
        # "New" is what is appended to the stream after now, not what the reader has not
        # read yet: the stream's last id (none yet: 0-0).
        try:
            info: Any = await self.connection.client.xinfo_stream(self.stream_key)
        except rexc.ResponseError as error:
            if wrong_type(error) or "no such key" in str(error).lower():
                return None  # no stream (yet): what is newest here
            raise
        return str(info.get("last-generated-id") or "0-0")

    async def _reach(self, mark: tuple[int, int]) -> None:
        """A resume point after what this reader read may be another replica's event it has
        not read yet (its ``XREAD`` answer on the way, a burst read 1000 at a time, a backoff
        after a blip), not only an id the stream never generated: the stream's
        ``last-generated-id`` is read again (the last look's may be old: a healthy reader
        does not look), and up to it the resume waits for the reader (a second at a time,
        reading it again: a stream replaced meanwhile generates other ids)."""
        while mark > self._last:
            now = await self._now()
            self._generated = parse_event_id(now) if now else (0, 0)
            if mark > self._generated:
                return  # never generated: :meth:`_unknown` says so
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._next_wakeup().wait(), _REACH_WAIT)

    def _unknown(self, mark: tuple[int, int]) -> bool:
        # Known only once loaded; an id after what this reader read is another replica's
        # it has not read yet, unless the stream never generated it.
        if not self._loaded.is_set():
            return False
        if mark > self._last:
            return mark > self._generated
        return super()._unknown(mark)

    def _failed(self, error: Exception) -> None:
        """A read failed in a way the reader did not expect: said, and tried again (the
        reader never ends, or this replica's streams would go silent for good)."""
        log.error("reading events from redis %s failed: unexpected %s; retrying",
                  self.connection.where, type(error).__name__, exc_info=error)

    async def _written_over(self) -> None:
        """Say once (until the stream reads again) that its key holds another type."""
        with contextlib.suppress(*_DOWN, rexc.ResponseError):
            kind = str(await self.connection.client.type(self.stream_key))
            if kind != self._unreadable:
                self._unreadable = kind
                log.warning("the event stream %s is not a stream (Redis type %s; written over "
                            "by something else?): read again once the next event appended "
                            "replaces it", self.stream_key, kind)
