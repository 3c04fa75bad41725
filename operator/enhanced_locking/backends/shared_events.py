"""What the event buses across replicas share: an outbox written in bursts, a reader.

A bus over a shared store (Redis, etcd) keeps :meth:`publish` synchronous, since the caller is
in the middle of a lock operation: in-process subscribers are called at once (the event not
yet numbered, ``id`` empty) and the event joins an outbox. One task writes the outbox a couple
of milliseconds later, in batches, so a burst of events (an acquire's, then its release's)
costs one round trip, not one each (an :class:`~enhanced_locking.backends.outbox.Outbox`).

The publish makes no more than its caller needs (:class:`Outgoing`): the event's model only
when someone subscribed, its JSON not at all. The write behind makes the JSON, from the fields
published (not from the model), for its whole batch in one go, once per event: a write sent
again, or a lock transaction's riders refused and carried by the next one, sends the same bytes
without making them again. The event's time is
the publish's.
While the store is away the outbox keeps up to ``capacity`` events (older ones are dropped,
logged, counted in :attr:`SharedEventBus.dropped` and by ``count_dropped``, and this replica's
readers get a ``gap``) and the task retries with a doubling backoff.

Reading is the store's own: a subclass's :meth:`SharedEventBus._read` fills the ring the SSE
stream serves from, sets ``_loaded`` once what the store held is in, and calls ``_wake``. It
runs only once someone follows the events (an SSE client): a replica nobody watches spends
nothing on other replicas' events.

A resume (``Last-Event-ID``) waits for what the store holds to be loaded, and for the reader to
reach the resume point, at most :data:`RESUME_WAIT` seconds: a store away longer gives the
reader a ``gap`` with ``reason: "unavailable"`` (whether events after its id were lost is not
known), and the stream then follows from that id whatever the reader reads once the store
answers again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, NamedTuple

from pydantic import TypeAdapter

from enhanced_locking.backends.outbox import RETRY_FIRST, RETRY_MAX, Outbox
from enhanced_locking.events import EventBus, EventType, Following, Gap, parse_event_id
from enhanced_locking.types import Event, Lock, LockText, utc_text, utcnow

__all__ = ["RESUME_WAIT", "Outgoing", "Published", "SharedEventBus"]

log = logging.getLogger(__name__)

RESUME_WAIT = 10.0
"""Seconds a resume waits for the store (its events loaded, the reader at the resume point)
before the reader is given a ``gap`` with ``reason: "unavailable"``."""


@dataclass(slots=True, kw_only=True)
class Published:
    """An event's fields as its publish gave them (its time taken then), named and ordered as
    :class:`~enhanced_locking.types.Event`'s (a test holds the two to the same fields): its
    JSON is the event's, written without the model (``_json``)."""

    id: str = ""
    """The store's id, given when the store appends it: none yet."""
    type: EventType
    time: datetime
    key: str | None
    repo: str | None
    lock: Lock | None
    details: dict[str, Any]


_model_json = TypeAdapter(Published).serializer.to_json
"""``Event.model_dump_json`` of the published event, as bytes, made from its fields without
the model: the model's own serializer needs the model, which costs the event about a fifth
of its JSON more to make (the write makes none when nobody subscribed)."""
_details_json = TypeAdapter(dict[str, Any]).serializer.to_json
"""An event's ``details`` as :data:`_model_json` writes them within the event."""
_LOCKS = LockText(by_alias=False)
"""The locks events carry, as the events' JSON writes them (field names)."""
_TYPES: dict[str, bytes] = {}
"""Each event type's JSON, made once."""


def _json(published: Published, *, by_alias: bool = False) -> bytes:
    """:data:`_model_json` of ``published``. An event about a lock (its key and repository
    the lock's, every time in UTC: every lock event the locker publishes) is written around
    its lock's text (:class:`~enhanced_locking.types.LockText`), which a release's event
    finds made already by its grant's (the same lock): pydantic ran about 38k instructions
    for such an event, most of them for its lock. Any other is pydantic's."""
    lock = published.lock
    time = published.time
    if lock is None or by_alias or time.tzinfo is not UTC:
        return _model_json(published, by_alias=by_alias)
    written = _LOCKS.written(lock)
    if written is None:
        return _model_json(published, by_alias=by_alias)
    text, key, repo = written
    fields = lock.__dict__
    if (published.key != fields["key"] or published.repo is None
            or published.repo != fields["project"].__dict__["repo_full_name"]):
        return _model_json(published, by_alias=by_alias)
    kind = published.type
    kind_json = _TYPES.get(kind)
    if kind_json is None:
        kind_json = _TYPES[kind] = _details_json({"": kind})[4:-1]
    details = published.details
    return b'{"id":%s,"type":%s,"time":"%s","key":%s,"repo":%s,"lock":%s,"details":%s}' % (
        _details_json({"": published.id})[4:-1] if published.id else b'""', kind_json,
        utc_text(time).encode(), key, repo, text,
        _details_json(details) if details else b"{}")


class Outgoing:
    """An event published to a shared bus, on its way to the store: the model (made at the
    publish when someone subscribed, else never) and its JSON (made by the write that first
    needs it, from the published fields), each once.

    Made together by the write, a batch's JSON costs the process less than made one by one
    at each publish, or in the wait for each next answer (measured: the Redis section of
    benchmarks.md)."""

    __slots__ = ("_data", "_event", "_published")

    def __init__(self, published: Published) -> None:
        self._published = published
        self._event: Event | None = None
        self._data: bytes | None = None

    @property
    def event(self) -> Event:
        event = self._event
        if event is None:
            p = self._published
            event = self._event = Event.recorded(id="", type=p.type, time=p.time, key=p.key,
                                                 repo=p.repo, lock=p.lock, details=p.details)
        return event

    def json(self) -> bytes:
        """The event's JSON (``Event.model_dump_json`` as bytes, field names, not aliases)."""
        data = self._data
        if data is None:
            data = self._data = _json(self._published, by_alias=False)
        return data


class _Write(NamedTuple):
    """Events written together under one tag (:meth:`SharedEventBus._once`)."""

    tag: bytes
    events: list[Outgoing]


_COALESCE = 0.002


def _left_of(events: list[Outgoing], batch: list[Outgoing]) -> int:
    """How many of ``batch``'s first events are what is left of ``events`` (the same objects,
    the newest of them: the outbox drops its oldest first); 0 when they are not there."""
    start = next((i for i, event in enumerate(events) if batch and event is batch[0]), None)
    if start is None or len(events) - start > len(batch):
        return 0
    left = events[start:]
    return len(left) if all(a is b for a, b in zip(left, batch, strict=False)) else 0


class SharedEventBus(EventBus):
    """:class:`~enhanced_locking.events.EventBus` over a store every replica writes and reads."""

    name: ClassVar[str]
    """The store's name, in task names and log lines (``"redis"``, ``"etcd"``)."""
    down: ClassVar[tuple[type[BaseException], ...]]
    """The errors that mean the store is away (retried; anything else is a bug)."""
    batch_limit: ClassVar[int | None] = None
    """Events in one write at the most (``None``: the whole outbox)."""
    coalesce: ClassVar[float] = _COALESCE
    """Seconds the writer waits after an event for others to join its write."""

    def __init__(self, *, where: str, capacity: int,
                 enabled: Callable[[], bool] = lambda: True) -> None:
        super().__init__(capacity=capacity, enabled=enabled)
        self._last = self._start = (0, 0)  # the store's, once read
        self.capacity = capacity
        self._outbox = Outbox[Outgoing](
            self._write, what=f"events to {self.name} {where}",
            task_name=f"{self.name}-events-append", down=self.down, capacity=capacity,
            coalesce=self.coalesce, batch_limit=self.batch_limit, dropped=self._lost_events)
        self.count_dropped: Callable[[int], None] = lambda count: None
        """Told how many events an outage of the store dropped (the service's counter,
        ``enhanced_locking_events_dropped_total``), once the store takes events again."""
        self._loaded = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._unsure: _Write | None = None
        """A write that failed (it may have been applied)."""
        self._written: list[Outgoing] = []
        """Events written by a call of :meth:`_once` that failed after them (the outbox still
        holds them and sends them again)."""

    async def _once(self, batch: list[Outgoing],
                    put: Callable[[list[Outgoing], bytes], Awaitable[None]]) -> None:
        """``batch`` written by ``put`` under a tag of its own (64 bits from the system's
        randomness), which the store's write keeps in a writer key of this process: a write
        sent again after its answer was lost finds its tag there and appends nothing. A write
        that failed may have been applied all the same: when the outbox sends it again (its
        first events are what is left of that write: the outbox may have dropped its oldest
        meanwhile), that part goes again under its first tag, and only the rest under a new
        one. Events a failed call had written already are not sent again."""
        unsure, self._unsure = self._unsure, None
        skip = _left_of(self._written, batch)
        self._written = batch[:skip]  # written, and in the outbox until this call is done
        batch = batch[skip:]
        writes: list[_Write] = []
        if unsure is not None and (left := _left_of(unsure.events, batch)):
            writes.append(_Write(unsure.tag, batch[:left]))
            batch = batch[left:]
        if batch:
            writes.append(_Write(secrets.token_hex(8).encode(), batch))
        for write in writes:
            try:
                await put(write.events, write.tag)
            except BaseException:
                self._unsure = write
                raise
            self._written.extend(write.events)
        self._written = []

    def _lost_events(self, count: int) -> None:
        """The outbox dropped ``count`` events while the store was away (said in the log):
        counted, and a gap for this replica's readers, whose ring is fed from the store only
        (they would never see those events, nor hear they missed them)."""
        self.count_dropped(count)
        self._dropped()

    @property
    def dropped(self) -> int:
        """Events lost because the store stayed away longer than the outbox could hold them."""
        return self._outbox.dropped

    # --- the store's part --------------------------------------------------------------------
    async def _write(self, batch: list[Outgoing]) -> None:
        """Write ``batch`` to the store, in order; raise one of :attr:`down` when it is away."""
        raise NotImplementedError

    async def _read(self) -> None:
        """Feed the ring from the store until cancelled (resuming where it was after errors)."""
        raise NotImplementedError

    async def _resume_from(self) -> str | None:
        """Where a reader without ``Last-Event-ID`` starts (``None``: what is newest here);
        raises one of :attr:`down` while the store is away."""
        return None

    async def _disconnect(self) -> None:
        """Close the store's connection."""
        raise NotImplementedError

    async def _reach(self, mark: tuple[int, int]) -> None:
        """Before a resume from ``mark`` is checked for a gap: wait until the reader has read
        up to it when the store has it and the reader has not read it yet (nothing to wait
        for here)."""

    # --- publishing --------------------------------------------------------------------------
    def publish(self, type: EventType, *, lock: Lock | None = None, key: str | None = None,
                **details: Any) -> None:
        if not self._enabled():
            return
        key = key or (lock.key if lock else None)
        repo = lock.project.repo_full_name if lock else details.pop("repo", None)
        item = Outgoing(Published(type=type, time=utcnow(), key=key, repo=repo, lock=lock,
                                  details=details))
        if self._subscribers:
            event = item.event
            for subscriber in list(self._subscribers):
                subscriber(event)
        self._outbox.put(item)

    # --- reading -----------------------------------------------------------------------------
    def _start_reading(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name=f"{self.name}-events-read")

    async def follow(self, after: str | None = None, *, max_lag: int | None = None,
                     announce: bool = False, resume: bool = True,
                     ) -> AsyncGenerator[Event | Gap | Following, None]:
        """Every replica's events after ``after`` (only new ones without it), then live;
        ``announce``: :class:`Following` once the start is fixed: what the store held loaded
        and, without ``after``, the store's "now" read. Until then nothing is yielded (the
        SSE stream's keep-alives go on): a start fixed on a ring not loaded yet took every
        event loaded after it for a new one."""
        self._start_reading()
        if after is not None and resume:
            try:
                # A resume finds what the store holds, up to its point; not without bound.
                async with asyncio.timeout(RESUME_WAIT):
                    await self._loaded.wait()
                    await self._reach(parse_event_id(after))
            except TimeoutError:
                log.info("%s: a resume after %s waited %.0f s for the store: gap", self.name,
                         after, RESUME_WAIT)
                yield Gap(after=after, oldest=None, reason="unavailable")
                resume = False  # said: from its id on, whatever the store gives when back
        else:
            await self._loaded.wait()  # "now" is the store's
            after, resume = await self._now(), False
        async for event in super().follow(after, max_lag=max_lag, announce=announce,
                                          resume=resume):
            yield event

    async def _now(self) -> str | None:
        """:meth:`_resume_from`, tried again (backing off) while the store is away."""
        backoff = RETRY_FIRST
        while True:
            try:
                return await self._resume_from()
            except self.down as error:
                log.info("%s: where the events are now is not known yet (%s); asking again",
                         self.name, type(error).__name__)
                await asyncio.sleep(backoff)
                backoff = min(RETRY_MAX, backoff * 2)

    async def close(self) -> None:
        """Write what is still in the outbox (briefly), stop the tasks, disconnect."""
        await self._outbox.drained(0.2)
        await self._outbox.stop()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader], timeout=2.0)
        self._reader = None
        await self._disconnect()
