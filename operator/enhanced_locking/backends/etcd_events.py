"""Events across replicas on etcd: the event bus over the history of one etcd key.

Every replica writes its events to the one key ``{key-prefix}events`` and every replica
watches that key, so ``GET /v1/events`` on any replica shows every replica's events in one
order. Each write is a new revision of the cluster, and etcd keeps every revision until it is
compacted: the key's *history* is the log, its current value does not matter. An event's id
is ``<revision>-<index>`` (its write's revision and its place in that write), the id form the
other buses use, so ``Last-Event-ID`` resumes on any replica: the watch starts at a revision.

* ``publish`` stays synchronous (the caller is in the middle of a lock operation): in-process
  subscribers are called at once (the event not yet numbered, ``id`` empty) and the event joins
  an outbox that one task writes a couple of milliseconds later, a burst of events in one put.
* Once someone follows the events (an SSE client), one watch per replica reads the key's
  history into the in-process ring the SSE stream serves from: first the writes of the last
  ``lookback`` revisions (at most ``capacity`` events are kept), then live. A client whose
  ``Last-Event-ID`` is older than what was loaded, or older than etcd's compaction, gets the
  ``gap`` event.
* When etcd is unreachable the outbox keeps up to ``capacity`` events and writes them when etcd
  answers again (older ones are dropped and counted); the watch resumes at the revision after
  the last one it saw, so it misses nothing etcd still holds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import etcd3aio
import grpc
from pydantic import TypeAdapter, ValidationError

from enhanced_locking.backends.etcd_connection import (
    CALL_TIMEOUT,
    EtcdConnection,
    EtcdSettings,
)
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import EventBus, Gap, parse_event_id
from enhanced_locking.types import Event, Lock, utcnow

__all__ = ["EtcdEventBus"]

log = logging.getLogger(__name__)

_COALESCE = 0.002
_BATCH = 200  # events per put: far below etcd's request size limit
_RETRY_MAX = 2.0
_LOOKBACK = 100_000
_DOWN = (etcd3aio.EtcdError, grpc.RpcError, OSError, TimeoutError)
_LAST_INDEX = _BATCH  # above every index in a write: "after all of revision r"
_BATCH_JSON: TypeAdapter[list[Event]] = TypeAdapter(list[Event])


class EtcdEventBus(EventBus):
    """:class:`~enhanced_locking.events.EventBus` whose ring is fed by an etcd key's history."""

    def __init__(
        self,
        connection: EtcdConnection,
        *,
        key: str,
        capacity: int = 10_000,
        lookback: int = _LOOKBACK,
        enabled: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__(capacity=capacity, enabled=enabled)
        self.connection = connection
        self.key = key.encode()
        self.capacity = capacity
        self.lookback = lookback
        self._outbox: collections.deque[Event] = collections.deque()
        self._pending = asyncio.Event()
        self._loaded = asyncio.Event()
        self._floor = 0
        """The revision from which the ring holds every event (older ones were not loaded)."""
        self._next = 0
        """The revision the watch (re)starts at: one past the last write it delivered."""
        self._compacted = False
        self._appender: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.dropped = 0
        """Events lost because etcd stayed away longer than the outbox could hold them."""

    @classmethod
    def from_config(cls, config: EnhancedLockingConfig, *,
                    enabled: Callable[[], bool] = lambda: True) -> EtcdEventBus:
        return cls(EtcdConnection(EtcdSettings.from_config(config)),
                   key=f"{config.etcd_key_prefix}events", enabled=enabled)

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
            self._appender = asyncio.create_task(self._append(), name="etcd-events-append")
        return event

    async def _append(self) -> None:
        backoff = 0.05
        while True:
            await self._pending.wait()
            # A moment for the events of the same burst to join this put.
            await asyncio.sleep(_COALESCE)
            self._pending.clear()
            while self._outbox:
                batch = list(self._outbox)[:_BATCH]
                try:
                    client = await self.connection.client()
                    assert client.kv is not None
                    await client.kv.put(self.key, _BATCH_JSON.dump_json(batch),
                                        timeout=CALL_TIMEOUT)
                except _DOWN as error:
                    log.warning("events not written to etcd %s yet (%s); retrying",
                                self.connection.where, type(error).__name__)
                    await asyncio.sleep(backoff)
                    backoff = min(_RETRY_MAX, backoff * 2)
                else:
                    backoff = 0.05
                    for _ in batch:
                        self._outbox.popleft()

    # --- reading -----------------------------------------------------------------------------
    def _start_reading(self) -> None:
        # The key is watched only while someone follows the events (an SSE client).
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name="etcd-events-read")

    async def _begin(self, client: etcd3aio.Etcd3Client) -> int:
        """Where the first watch starts; the revision of the newest write to load (0: none)."""
        assert client.kv is not None
        answer = await client.kv.get(self.key, timeout=CALL_TIMEOUT)
        revision = int(answer.header.revision)
        self._floor = self._next = max(1, revision - self.lookback + 1)
        newest = int(answer.kvs[0].mod_revision) if answer.kvs else 0
        try:  # is the start compacted away? then the watch's first word is the compaction
            await client.kv.get(self.key, revision=self._next, count_only=True,
                                timeout=CALL_TIMEOUT)
        except (etcd3aio.EtcdError, grpc.RpcError) as error:
            if "compacted" not in str(error):
                raise
            self._compacted = True
        return newest if newest >= self._next else 0

    async def _read(self) -> None:
        backoff = 0.05
        newest = -1
        while True:
            try:
                client = await self.connection.client()
                if newest < 0:
                    newest = await self._begin(client)
                assert client.watch is not None
                async for answer in client.watch.watch(self.key, start_revision=self._next,
                                                       filters=[etcd3aio.WatchFilter.NODELETE]):
                    backoff = 0.05
                    if answer.compact_revision:
                        # What the watch asked for is gone: resume at the oldest revision kept.
                        log.warning("etcd %s compacted the events up to revision %d",
                                    self.connection.where, answer.compact_revision)
                        self._next = int(answer.compact_revision) + 1
                        self._floor = max(self._floor, self._next)
                        self._compacted = False
                        break
                    for event in answer.events:
                        revision = int(event.kv.mod_revision)
                        self._take(revision, bytes(event.kv.value))
                        self._next = max(self._next, revision + 1)
                    if newest < self._next and not self._compacted:
                        # The watch runs (past any compaction) and has delivered the newest
                        # write there was when it began, if any: the history is loaded.
                        self._loaded.set()
                    if answer.events:
                        self._wake()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("etcd %s: events watch broke (%s); resuming at revision %d",
                            self.connection.where, type(error).__name__, self._next)
                await asyncio.sleep(backoff)
                backoff = min(_RETRY_MAX, backoff * 2)

    async def _revision_now(self) -> int:
        client = await self.connection.client()
        assert client.kv is not None
        answer = await client.kv.get(self.key, timeout=CALL_TIMEOUT, count_only=True)
        return int(answer.header.revision)

    def _take(self, revision: int, value: bytes) -> None:
        try:
            batch = _BATCH_JSON.validate_json(value)
        except ValidationError:
            log.warning("skipping unreadable events at revision %d of %s", revision,
                        self.key.decode())
            return
        for index, event in enumerate(batch):
            self._ring.append(event.model_copy(update={"id": f"{revision}-{index}"}))
            self._last = (revision, index)

    def _wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, asyncio.Event()
        wakeup.set()

    def gap_since(self, after: str) -> bool:
        """Whether events after ``after`` may be missing: out of the ring, not loaded, or
        compacted away by etcd."""
        revision, _ = parse_event_id(after)
        return super().gap_since(after) or (self._floor > 0 and revision + 1 < self._floor)

    def _newest(self) -> tuple[int, int]:
        # Nothing kept is older than the floor: "from now" is at least just below it.
        return max(super()._newest(), (self._floor - 1, _LAST_INDEX))

    async def follow(self, after: str | None = None, *,
                     max_lag: int | None = None) -> AsyncIterator[Event | Gap]:
        """Every replica's events after ``after`` (only new ones without it), then live."""
        if after is None:
            # "New" is what etcd writes after now, not what the watch has not loaded yet.
            with contextlib.suppress(*_DOWN):
                after = f"{await self._revision_now()}-{_LAST_INDEX}"
        self._start_reading()
        with contextlib.suppress(TimeoutError):
            # A fresh replica first loads the history, so a resume can find it.
            await asyncio.wait_for(self._loaded.wait(), 5.0)
        async for event in super().follow(after, max_lag=max_lag):
            yield event

    async def close(self) -> None:
        """Write what is still in the outbox (briefly), stop the tasks, disconnect."""
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
