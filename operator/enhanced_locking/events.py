"""The in-process event bus: lock and config events for subscribers and the SSE stream.

Events get ids shaped like Redis Stream ids (``<milliseconds>-<sequence>``) so a client's
``Last-Event-ID`` means the same thing here and on the Redis-backed bus. The bus keeps a bounded
ring of recent events for resuming; a client that fell further behind than the ring is told so
by a ``gap`` event rather than silently missing events.

An event is recorded when it is published (its id, its time and what it says) but built into
an :class:`~enhanced_locking.types.Event` only when something reads it: at once when there are
subscribers, else when a stream reader or :meth:`EventBus.recent` reaches it. Most events of a
busy service are never read (nobody follows the stream), and building one cost about as much
as the rest of publishing it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, Protocol, get_args

from enhanced_locking.types import Event, Lock

__all__ = ["EVENT_TYPES", "FOLLOWING_COMMENT", "KEEPALIVE_SECONDS", "STREAM_SILENCE_SECONDS",
           "Bus", "EventBus", "EventType", "Following", "Gap", "SwitchingBus", "parse_event_id"]

EventType = Literal[
    "acquired",
    "released",
    "queued",
    "granted-from-queue",
    "timeout",
    "cancelled",
    "expired",
    "deadlock",
    "force-unlocked",
    "superseded",
    "frozen",
    "freeze-started",
    "freeze-ended",
    "fallback",
    "routing-changed",
    "config-applied",
    "config-rejected",
    "shadow-mismatch",
    "fallback-reconciled",
    "lock-conflict",
    "rollout-changed",
    "lock-unreadable",
    "lock-unreadable-cleared",
]
"""Every type of event the service publishes: ``publish`` takes only these (mypy holds each
call to them), and ``GET /v1/events?type=`` accepts only these."""

EVENT_TYPES: tuple[EventType, ...] = get_args(EventType)

Subscriber = Callable[[Event], None]

FOLLOWING_COMMENT = "following"
"""The SSE comment (``: following``) an event stream sends for :class:`Following`."""

KEEPALIVE_SECONDS = 15
"""An event stream with nothing to send sends a keep-alive comment this often."""
STREAM_SILENCE_SECONDS = 4 * KEEPALIVE_SECONDS
"""How long a client reads nothing at all from an event stream, not even a keep-alive,
before it gives the stream up: a service (or a proxy) that stopped sending without closing."""


@dataclass(frozen=True)
class Gap:
    """A stream reader did not get every event after ``after``: it asked to replay more than
    it may, or what it no longer may have (``reason="replay"``), it read slower than events
    came (``"behind"``), or events were dropped before they reached the store (``"dropped"``:
    a shared bus's outbox was full while the store was away), or a resume could not be checked
    (``"unavailable"``: a shared bus's store did not answer within ``RESUME_WAIT``), or the
    bus it read was replaced by another (``"switched"``: a switch of the enhanced store moved
    the events to the new store's bus; see :class:`SwitchingBus`).
    ``oldest`` is the oldest event id still kept. The reader re-reads the state it follows.
    ``resume`` (a switch's gap only): the new bus's id the reader follows from, its
    ``Last-Event-ID`` from then on; ``None`` when the new bus had no event yet (its start,
    ``0-0``, means "from the first event kept" on any bus)."""

    after: str
    oldest: str | None
    reason: str
    resume: str | None = None


@dataclass(frozen=True)
class Following:
    """A reader's start is fixed (``follow(announce=True)`` says so once, before any event
    after it): every event published from now on reaches this reader. A client that reads
    some state and then follows its changes reads the state after this, and misses none.
    ``at``: the id the reader follows from (every event after it reaches the reader)."""

    at: str | None = None


def parse_event_id(event_id: str) -> tuple[int, int]:
    """``"<ms>-<seq>"`` as a sortable pair; raises ``ValueError`` on anything else."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


_Recorded = tuple[tuple[int, int], float, str, str | None, str | None, Lock | None, dict[str, Any]]
"""An event as :meth:`EventBus.publish` records it: its mark (its id's milliseconds and
sequence number, as :func:`parse_event_id` reads them), its time (seconds since the epoch),
its type and key, the repository given for an event without a lock (for one with a lock,
``None``: the lock's own, read when the event is built), the lock and the details. Built into
an :class:`Event` by :func:`_built` the first time it is read, and that event kept in its
place in the ring from then on (every reader gets the one object).

A plain tuple, made and read in this module only, with its values in a tuple display: one
object. A class with slots, or a named tuple, made through ``__new__`` cost about twice as
much to make and to free, on every event (and two of every lock pair's events)."""


def _built(recorded: _Recorded) -> Event:
    (ms, seq), at, type, key, repo, lock, details = recorded
    # Built without re-validation: every field is ours and already of its type.
    return Event.recorded(id=f"{ms}-{seq}", type=type, time=datetime.fromtimestamp(at, UTC),
                          key=key, repo=repo if lock is None else lock.project.repo_full_name,
                          lock=lock, details=details)


_Kept = Event | _Recorded
"""What the ring holds: events built (read once, a shared bus's from its store, or made for a
subscriber), and events recorded here and not read yet."""


def _mark_of(item: _Kept) -> tuple[int, int]:
    return item[0] if isinstance(item, tuple) else parse_event_id(item.id)


def _event_of(item: _Kept) -> Event:
    return _built(item) if isinstance(item, tuple) else item


def _id_of(item: _Kept) -> str:
    return _event_of(item).id


class Bus(Protocol):
    """The event bus seam: the in-process :class:`EventBus`, or one over Redis Streams.

    ``publish`` is synchronous (callers are in the middle of a lock operation and must not
    wait for subscribers): a bus over a network appends in the background. Ids are
    ``"<ms>-<seq>"`` and sort in publication order; ``stream(after)`` replays what it still has
    after that id, then follows live events; ``follow(after, max_lag=n)`` does the same for a
    reader that may fall behind (a :class:`Gap` then), and with ``announce`` it first yields
    :class:`Following` once the reader's start is fixed.
    """

    def publish(self, type: EventType, *, lock: Lock | None = None, key: str | None = None,
                **details: Any) -> None: ...

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]: ...

    def recent(self, after: str | None = None) -> list[Event]: ...

    def gap_since(self, after: str) -> bool: ...

    def stream(self, after: str | None = None) -> AsyncIterator[Event]: ...

    def follow(self, after: str | None = None, *, max_lag: int | None = None,
               announce: bool = False) -> AsyncIterator[Event | Gap | Following]: ...


class EventBus:
    """Publish events; keep the last ``capacity`` for resume; wake stream readers."""

    name: ClassVar[str] = "process"
    """Where the events are: ``"process"`` here (this process's own), else the shared store's
    name (``"redis"``, ``"etcd"``), in task names, log lines, ``/readyz`` and the metrics."""

    def __init__(self, *, capacity: int = 10_000, enabled: Callable[[], bool] = lambda: True):
        self._ring: collections.deque[_Kept] = collections.deque(maxlen=capacity)
        self._subscribers: list[Subscriber] = []
        # Made when a stream reader first needs one and set (then dropped) by the next
        # publish: readers wait on the one they saw. No task per event, and a publish with
        # nobody reading makes nothing.
        self._wakeup: asyncio.Event | None = None
        self._last = self._start = (int(time.time() * 1000), 0)
        """``_last``: the newest event's mark. ``_start``: where this log starts; here, the
        mark when the process started: an id from before it is of another incarnation (a
        restart), whose events this one never had."""
        self._floor = (0, 0)
        """The ring holds (or held, until it was full) every event after this mark; a reader
        resuming from before it may have missed some (a shared store's entries removed)."""
        self._hole: tuple[int, int] | None = None
        """The newest mark when events were last dropped (:meth:`_dropped`): events after it
        are missing, for a reader that resumes there or before."""
        self._holes = 0
        """How many times events were dropped: a reader that saw it move gets a gap."""
        self._enabled = enabled
        self.retired = asyncio.Event()
        """Set by :meth:`retire`: another bus serves the events from now on."""
        self.carried_on = False
        """Set by :meth:`retire`: the bus that serves now has this one's log."""

    def publish(self, type: EventType, *, lock: Lock | None = None, key: str | None = None,
                **details: Any) -> None:
        """Record and fan out one event (nothing when the events flag is off)."""
        if not self._enabled():
            return
        at = time.time()  # one reading for the id and the event's time
        ms = int(at * 1000)
        last_ms, last_seq = self._last
        mark = self._last = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
        if lock is not None:
            key = key or lock.key
            repo = None  # the lock's, read when the event is built (two reads of models)
        else:
            repo = details.pop("repo", None)
        recorded = (mark, at, type, key, repo, lock, details)
        if self._subscribers:
            event = _built(recorded)
            self._ring.append(event)
            for subscriber in list(self._subscribers):
                subscriber(event)
        else:
            self._ring.append(recorded)
        if self._wakeup is not None:
            self._wake()

    def _wake(self) -> None:
        """Wake every reader waiting for a new event."""
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            wakeup.set()

    def _next_wakeup(self) -> asyncio.Event:
        """What the next publish sets: taken by a reader before it looks at the ring."""
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        return self._wakeup

    def retire(self, *, carried_on: bool = False) -> None:
        """Another bus serves the events from now on: each reader following this one gets
        what it holds still and then its stream ends (:meth:`follow`). ``carried_on``: the
        other bus reads and writes the same log (the same store's, on a new connection), so
        an id of this bus is one of that bus too."""
        self.carried_on = carried_on
        self.retired.set()
        self._wake()

    async def close(self) -> None:
        """Stop what the bus runs (nothing here: it is the process's memory)."""

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def recent(self, after: str | None = None) -> list[Event]:
        """Events newer than ``after`` still in the ring (all of them without ``after``)."""
        if after is None:
            return self._newest_built(len(self._ring))
        return self._after(parse_event_id(after))

    def _after(self, mark: tuple[int, int]) -> list[Event]:
        count = 0
        for item in reversed(self._ring):  # newest first: stop at the first one seen
            if _mark_of(item) <= mark:
                break
            count += 1
        return self._newest_built(count)

    def _newest_built(self, count: int) -> list[Event]:
        """The newest ``count`` events, oldest first, each built if it was not yet and kept
        built in its place: every reader of an event gets the one object."""
        ring = self._ring
        newest = [_event_of(ring.pop()) for _ in range(count)]
        newest.reverse()
        ring.extend(newest)
        return newest

    def gap_since(self, after: str) -> bool:
        """Whether events after ``after`` may be missing here: fallen out of the ring, from
        before the floor, or ``after`` is not an event this log had (another incarnation's
        id, or a log that lost entries)."""
        mark = parse_event_id(after)
        return self._lost(mark) or self._unknown(mark) or self._before_hole(mark)

    def _before_hole(self, mark: tuple[int, int]) -> bool:
        return self._hole is not None and mark <= self._hole

    def _dropped(self) -> None:
        """Events were dropped (never to be in the log): every reader now following, and
        every reader resuming from here or before, gets a gap."""
        self._hole = self._newest()
        self._holes += 1
        self._wake()

    def _lost(self, mark: tuple[int, int]) -> bool:
        """Whether events after ``mark`` may have fallen out of the ring, or come before the
        floor (what the ring holds every event after)."""
        if mark < self._floor:
            return True
        if not self._ring or len(self._ring) < (self._ring.maxlen or 0):
            return False
        return _mark_of(self._ring[0]) > mark

    def _unknown(self, mark: tuple[int, int]) -> bool:
        """Whether ``mark`` (at or after the floor) is no event of this log: from before its
        start, above its newest event, or not in the ring where the ring holds every event
        around it. ``0-0`` is no event: "from the first one kept"; nor is the log's start (a
        reader that followed from there before any event, and resumes)."""
        if mark == (0, 0) or mark == self._floor or mark == self._start:
            return False
        if mark < self._start or mark > self._last:
            return True
        for item in reversed(self._ring):  # newest first: stop at the first one not after
            seen = _mark_of(item)
            if seen <= mark:
                return seen != mark
        return True  # older than all the ring holds, and after the floor: never held

    def _newest(self) -> tuple[int, int]:
        # Nothing kept is older than the floor: "from now" is at least the floor.
        return max(_mark_of(self._ring[-1]) if self._ring else self._last, self._floor)

    def _behind(self, mark: tuple[int, int], limit: int) -> bool:
        """Whether more than ``limit`` events follow ``mark``, or some may have fallen out of
        the ring or come before the floor (the newest ``limit + 1`` are looked at, no more)."""
        if self._lost(mark):
            return True
        if len(self._ring) <= limit:
            return False
        return _mark_of(self._ring[-limit - 1]) > mark

    async def stream(self, after: str | None = None) -> AsyncIterator[Event]:
        """Replay from ``after`` (or only new events without it), then follow live."""
        async for item in self.follow(after):
            assert isinstance(item, Event)  # no bound, so never a gap
            yield item

    async def follow(self, after: str | None = None, *, max_lag: int | None = None,
                     announce: bool = False, resume: bool = True,
                     ) -> AsyncGenerator[Event | Gap | Following, None]:
        """:meth:`stream` for a reader that may fall behind. With ``max_lag``, a reader that
        asks to replay more than that many events, or whose ``after`` may have fallen out of
        the ring, gets a :class:`Gap` and then follows live from now; a reader that falls more
        than ``max_lag`` behind while following (it reads slower than events come) gets a
        :class:`Gap` and the stream ends. No reader has a buffer of its own: all read the one
        ring, so a stalled reader costs no memory. With ``announce``, :class:`Following` comes
        once the reader's start is fixed (after a replay's gap). ``resume=False``: ``after``
        is no reader's resume point but a start the bus fixed itself (its store's "now"),
        not checked for a gap. A bus retired (:meth:`retire`) gives each reader what it still
        holds after the reader's place, then ends the stream."""
        mark = parse_event_id(after) if after else self._newest()
        if max_lag is not None and after is not None and resume and (
                self._behind(mark, max_lag) or self._unknown(mark)
                or self._before_hole(mark)):
            yield Gap(after=after, oldest=_id_of(self._ring[0]) if self._ring else None,
                      reason="replay")
            mark = self._newest()
        if announce:
            yield Following(at=f"{mark[0]}-{mark[1]}")
        holes = self._holes
        while True:
            wakeup = self._next_wakeup()  # before looking: no publish in between is missed
            if max_lag is not None and self._holes != holes:
                # What came before the hole first, in order; then the gap, and the end.
                for event in self._after(mark):
                    if self._hole is not None and parse_event_id(event.id) > self._hole:
                        break
                    mark = parse_event_id(event.id)
                    yield event
                yield Gap(after=f"{mark[0]}-{mark[1]}",
                          oldest=_id_of(self._ring[0]) if self._ring else None,
                          reason="dropped")
                return
            if max_lag is not None and self._behind(mark, max_lag):
                yield Gap(after=f"{mark[0]}-{mark[1]}",
                          oldest=_id_of(self._ring[0]) if self._ring else None, reason="behind")
                return
            fresh = self._after(mark)
            for event in fresh:
                mark = parse_event_id(event.id)
                yield event
            if not fresh:
                if self.retired.is_set():
                    return
                await wakeup.wait()


class Publish(Protocol):
    """A bus's ``publish``, as :class:`SwitchingBus` hands it on."""

    def __call__(self, type: EventType, *, lock: Lock | None = None, key: str | None = None,
                 **details: Any) -> None: ...


class _Subscription:
    """A subscriber of a :class:`SwitchingBus`, and how to take it off the bus serving now."""

    __slots__ = ("off", "subscriber")

    def __init__(self, subscriber: Subscriber, off: Callable[[], None]) -> None:
        self.subscriber = subscriber
        self.off = off


_Item = Event | Gap | Following


class SwitchingBus:
    """The event bus the service's parts hold: they publish to it, the SSE stream follows it,
    and it hands each call to the bus serving now (:attr:`bus`), which a switch of the
    enhanced store replaces (:meth:`switch`): the new store's shared bus (a Redis stream, an
    etcd key's history), or a bus of this process's own for a store of its own.

    ``publish`` is the serving bus's own method (no call in between); subscribers move to the
    new bus. A reader following the old bus gets what that bus still holds after its place,
    then a :class:`Gap` with ``reason="switched"`` (``after``: its place on the old bus;
    ``resume``: where it follows the new bus from, an id of the new bus), then the new bus's
    events; a new bus over the same log (``switch(same_log=True)``) resumes it from its place
    instead, no gap. The gap comes once the new bus fixed that start (its store's "now"). A
    reader whose start was not fixed yet when the bus was replaced gets the gap only if it
    resumes (it gave ``after``); one that follows from now simply follows the new bus."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        """The bus serving the events now."""
        self.publish: Publish = bus.publish
        self._subscriptions: list[_Subscription] = []

    def switch(self, bus: EventBus, *, same_log: bool = False) -> EventBus:
        """``bus`` serves the events from now on; the bus it replaces (retired: its readers
        move to ``bus``; the caller closes it). ``same_log``: ``bus`` reads and writes the
        log the old bus did (the same store's, through a new connection: new credentials, a
        new pool): its readers resume there from their place, no gap."""
        old, self.bus = self.bus, bus
        self.publish = bus.publish
        for entry in self._subscriptions:
            entry.off()
            entry.off = bus.subscribe(entry.subscriber)
        old.retire(carried_on=same_log)
        return old

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        entry = _Subscription(subscriber, self.bus.subscribe(subscriber))
        self._subscriptions.append(entry)

        def unsubscribe() -> None:
            self._subscriptions.remove(entry)
            entry.off()

        return unsubscribe

    def recent(self, after: str | None = None) -> list[Event]:
        return self.bus.recent(after)

    def gap_since(self, after: str) -> bool:
        return self.bus.gap_since(after)

    async def close(self) -> None:
        await self.bus.close()

    async def stream(self, after: str | None = None) -> AsyncIterator[Event]:
        """The serving bus's events after ``after``, then live, across switches (a switch's
        gap is not an event: a reader that must know of it follows)."""
        async for item in self.follow(after):
            if isinstance(item, Event):
                yield item

    async def follow(self, after: str | None = None, *, max_lag: int | None = None,
                     announce: bool = False) -> AsyncIterator[Event | Gap | Following]:
        """:meth:`EventBus.follow` of the serving bus, carried across switches (see the
        class)."""
        place = after  # where the reader is, in the ids of the bus it reads
        started = False  # its start is fixed (a Following came)
        switched = False  # its bus was replaced: the new bus's start comes with a gap
        while True:
            bus = self.bus
            inner = bus.follow(None if switched else place, max_lag=max_lag, announce=True)
            try:
                first = await _first(inner, bus)
                if first is None:  # replaced before it fixed the reader's start
                    if bus is self.bus:
                        return  # (ended, not replaced: only a retired bus ends so)
                    switched = switched or (place is not None and not bus.carried_on)
                    continue
                if switched:
                    assert isinstance(first, Following) and place is not None
                    # "0-0" (a store with no event yet) means "from the first event kept"
                    # on every bus: no resume id then (the old bus's id stays the client's).
                    resume = first.at if first.at != "0-0" else None
                    yield Gap(after=place, oldest=None, reason="switched", resume=resume)
                    switched = False
                item, step = first, inner.__anext__
                with contextlib.suppress(StopAsyncIteration):
                    while True:
                        if isinstance(item, Event):
                            place = item.id
                            yield item
                        elif isinstance(item, Following):
                            place = item.at
                            if announce and not started:
                                yield item
                            started = True
                        else:
                            yield item
                            if item.reason in ("behind", "dropped"):
                                return  # the stream ends after these
                        item = await step()
                # Its bus ended the stream: retired, another serves now (with the same
                # log: resumed there from its place; else from the new bus's start, after a gap).
                if bus is self.bus:
                    return  # (ended, not replaced: only a retired bus ends so)
                switched = (started or place is not None) and not bus.carried_on
            finally:
                await inner.aclose()


async def _first(inner: AsyncGenerator[_Item, None], bus: EventBus) -> _Item | None:
    """``inner``'s first item, or ``None`` when ``bus`` is retired first (or it ends)."""
    if bus.retired.is_set():
        return None
    step = asyncio.ensure_future(anext(inner, None))
    retired = asyncio.ensure_future(bus.retired.wait())
    try:
        await asyncio.wait((step, retired), return_when=asyncio.FIRST_COMPLETED)
    finally:
        retired.cancel()
        if not step.done():
            step.cancel()
            await asyncio.wait((step,))
    return None if step.cancelled() else step.result()
