"""``GET /v1/events``: lock and config events as Server-Sent Events.

Filters: ``repo`` (exact), ``keyPrefix`` (lock keys starting with it), ``type`` (comma-separated
event types). Each event carries its id (``<ms>-<seq>``, the Redis Stream id form); a client
that reconnects with ``Last-Event-ID`` (header, or the ``lastEventId`` query parameter) gets
every event after it, up to ``enhanced-locking-events-max-lag`` of them.

A reader never loses events silently. When it cannot have them all it gets a ``gap`` event
(``{"after", "oldest", "reason"}``) and knows to re-read the state it follows:

* ``reason: "replay"``: its ``Last-Event-ID`` asks for more than the bound, or for events that
  fell out of the bus's ring; the stream then follows live events from now;
* ``reason: "behind"``: it reads slower than events come and fell more than the bound behind;
  the stream then ends (reconnect, re-read, follow again). A reader that reads nothing at all
  is cut off once a send has waited ``SEND_TIMEOUT``;
* ``reason: "unavailable"``: a resume on a shared bus whose store did not answer in time
  (``RESUME_WAIT`` in :mod:`~enhanced_locking.backends.shared_events`); the stream then goes
  on from its ``Last-Event-ID``;
* ``reason: "switched"``: a switch of the enhanced store moved the events to another bus (the
  new store's shared one, or this replica's own): events of the old bus after ``after`` may
  be missing; the gap carries ``resume``, the new bus's id the stream follows from, also as
  its SSE id (the client's ``Last-Event-ID`` from then on), and the stream goes on there.

The stream's first line is the comment ``: following``, sent once the reader's start is fixed:
every event published after it is on the stream (a client that reads some state and then
follows its changes reads the state after that line, and misses nothing in between; the
headers come earlier, while a replica over Redis or etcd still asks its store where "now" is).

Every event is framed once, whatever the number of readers (:class:`Frames`). Streams are
capped per client address (429) and in total (503), both with ``Retry-After``.

A caller sees only what its ``read`` right covers: the stream needs ``read`` (on ``repo`` when
the filter names one), and each event is checked again for its repository before it is sent,
under the access control in force then (answers are cached, see ``auth-cache-ttl``), so a right
taken away, in RBAC or by a config change to the role map, stops the events within that time.
A ``deadlock`` event whose cycle crosses into repositories the caller may not read is sent
with those owners, and the keys of their edges, left out
(:func:`~enhanced_locking.locking.deadlock.for_reader`); so is a ``queued`` event whose
holders or waiters ahead are of such repositories
(:func:`~enhanced_locking.locking.visibility.wait_for_reader`).
The request's credentials are identified again when the access control changes, or once its
recheck time passed (the tokens file's recheck, a second, in static mode; ``auth-cache-ttl`` in
Kubernetes mode): a token withdrawn, or now naming someone else, ends the stream at its next
event, which it does not carry. A stream with no events is not left open meanwhile: the caller is
also identified again on a timer, each time its recheck time passed (at most every
``RECHECK_FLOOR_SECONDS``), and a stream whose caller is no longer identified ends then.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from enhanced_locking.api.access import AccessControl, CallerDep, StillCaller, Unidentified
from enhanced_locking.api.errors import error_answers, json_error
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import (
    EVENT_TYPES,
    FOLLOWING_COMMENT,
    KEEPALIVE_SECONDS,
    Bus,
    Following,
    Gap,
)
from enhanced_locking.locking import deadlock, visibility
from enhanced_locking.types import Event, Verb

__all__ = ["Frames", "install_event_stream", "matches"]

log = logging.getLogger(__name__)

SEND_TIMEOUT = 30.0
"""Seconds one send to a reader may wait (its socket full) before the stream is cut off."""
RECHECK_FLOOR_SECONDS = 0.5
"""An idle stream's caller is identified again at most this often (its recheck time is what
decides; this keeps a recheck time of zero from spinning)."""
RETRY_AFTER_SECONDS = 5
FOLLOWING = ServerSentEvent(comment=FOLLOWING_COMMENT).encode()
"""The comment a stream sends once it follows the bus: every event published after it is
on this stream. A client reads the state it follows after this line, not after the headers
(before it, the stream may still be finding where it starts)."""


def matches(event: Event, *, repo: str | None, key_prefix: str | None,
            types: frozenset[str] | None) -> bool:
    """Whether ``event`` passes the stream's filters."""
    if repo is not None and event.repo != repo:
        return False
    if key_prefix is not None and not (event.key or "").startswith(key_prefix):
        return False
    return types is None or event.type in types


class Frames:
    """Each event's SSE frame, encoded once and shared by every reader (the newest ``size``
    are kept: readers are close behind the newest event, or cut off).

    Kept by id, and given only for the event it was made of (every reader of an event gets
    the one object from the bus): two buses number their events alike (two etcd clusters,
    each from its own revision 1), so after a switch of the enhanced store an event may have
    the id of one framed before, and is framed anew rather than sent as the other."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._frames: collections.OrderedDict[str, tuple[Event, bytes]] = \
            collections.OrderedDict()

    def __call__(self, event: Event) -> bytes:
        kept = self._frames.get(event.id)
        if kept is not None and kept[0] is event:
            return kept[1]
        frame = ServerSentEvent(id=event.id, event=event.type,
                                data=event.model_dump_json(by_alias=True)).encode()
        if kept is not None:
            del self._frames[event.id]  # another bus's event of that id: the newest now
        self._frames[event.id] = (event, frame)
        if len(self._frames) > self._size:
            self._frames.popitem(last=False)
        return frame


def _gap_frame(gap: Gap) -> bytes:
    """A ``gap`` event; a switch's (``resume`` set) carries the new bus's id it resumes from
    as its SSE id, so the client's ``Last-Event-ID`` is one of the bus that serves now."""
    data: dict[str, str | None] = {"after": gap.after, "oldest": gap.oldest,
                                   "reason": gap.reason}
    if gap.resume is not None:
        data["resume"] = gap.resume
    return ServerSentEvent(id=gap.resume, event="gap", data=json.dumps(data)).encode()


async def _readable_frame(event: Event, frames: Frames, access: AccessControl,
                          still: StillCaller) -> bytes:
    """``event``'s frame as this reader may have it: a ``deadlock`` event whose cycle crosses
    into repositories it may not read is sent with those parts left out
    (:func:`~enhanced_locking.locking.deadlock.for_reader`), in a frame of its own."""
    if event.type == "deadlock":
        named, for_reader = deadlock.cycle_repos(event.details), deadlock.for_reader
    elif event.type == "queued":
        named, for_reader = visibility.wait_repos(event.details), visibility.wait_for_reader
    else:
        return frames(event)
    readable = {event.repo}
    for repo in named - readable:
        if await access.authorizer.allowed(still.identity, Verb.READ, repo=repo):
            readable.add(repo)
    details = for_reader(event.details, readable)
    if details is event.details:
        return frames(event)
    shown = event.model_copy(update={"details": details})
    return ServerSentEvent(id=shown.id, event=shown.type,
                           data=shown.model_dump_json(by_alias=True)).encode()


class _Streams:
    """Open streams, in total and per client address."""

    def __init__(self) -> None:
        self.total = 0
        self.by_client: collections.Counter[str] = collections.Counter()

    def refusal(self, client: str, config: EnhancedLockingConfig) -> JSONResponse | None:
        if self.by_client[client] >= config.events_max_streams_per_client:
            return _busy(429, f"this client already has {self.by_client[client]} event streams "
                              "open (enhanced-locking-events-max-streams-per-client); close one")
        if self.total >= config.events_max_streams:
            return _busy(503, f"{self.total} event streams are open, the most this service "
                              "serves (enhanced-locking-events-max-streams); retry later")
        return None

    def opened(self, client: str) -> Callable[[], None]:
        self.total += 1
        self.by_client[client] += 1

        def closed() -> None:
            self.total -= 1
            self.by_client[client] -= 1
            if not self.by_client[client]:
                del self.by_client[client]

        return closed


def _busy(status: int, message: str) -> JSONResponse:
    response = json_error(status, message)
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


class _CountedStream(EventSourceResponse):
    """An event stream that gives its place back however it ends."""

    def __init__(self, content: AsyncIterator[bytes], *, closed: Callable[[], None]) -> None:
        super().__init__(content, ping=KEEPALIVE_SECONDS, send_timeout=SEND_TIMEOUT)
        self._closed = closed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._closed()


# What the answers below accept, published as the parameters' patterns (one rule, two readers).
_EVENT_ID_PATTERN = r"^([0-9]{1,20}(-[0-9]{1,20})?)?$"  # empty: from now on
_ONE_TYPE = "(" + "|".join(re.escape(t) for t in EVENT_TYPES) + ")"
_TYPES_PATTERN = rf"^ *{_ONE_TYPE} *(, *{_ONE_TYPE} *)*$"
_STREAM = {
    "description": "Server-Sent Events: one `event:`, `id:` and JSON `data:` per event.",
    "content": {"text/event-stream": {"schema": {
        "description": "One event of the stream: its type, its id (resume with Last-Event-ID) "
                       "and the Event as JSON; `gap` when some were lost.",
        "type": "object",
        "properties": {"event": {"type": "string"}, "id": {"type": "string"},
                       "data": {"type": "string"}, "retry": {"type": "integer"}},
        "required": ["data"]}}},
}


def install_event_stream(app: FastAPI, bus: Bus,
                         config: Callable[[], EnhancedLockingConfig]) -> None:
    frames = Frames()
    streams = _Streams()

    @app.get("/v1/events", response_model=None, responses={200: _STREAM, **error_answers({
        401: "No or invalid credentials (see WWW-Authenticate).",
        403: "The caller lacks the read right (on repo, when given).",
        429: "This client has the most event streams it may open (see Retry-After).",
        503: "The service has the most event streams it serves (see Retry-After).",
    })})
    async def events(
        caller: CallerDep,
        http: Request,
        repo: Annotated[str | None, Query(max_length=512, description="owner/name")] = None,
        key_prefix: Annotated[str | None, Query(alias="keyPrefix", max_length=4096,
                                                description="Lock keys starting with this.")]
        = None,
        type: Annotated[str | None, Query(max_length=1024,
                                          description="Comma-separated event types.",
                                          json_schema_extra={"pattern": _TYPES_PATTERN})] = None,
        # Plain strings (not ``str | None``): a header or query value is text, never JSON null.
        last_event_id: Annotated[str, Header(
            alias="Last-Event-ID", json_schema_extra={"pattern": _EVENT_ID_PATTERN})] = "",
        last_event_id_query: Annotated[str, Query(
            alias="lastEventId", max_length=64, json_schema_extra={"pattern": _EVENT_ID_PATTERN})]
        = "",
    ) -> EventSourceResponse | JSONResponse:
        """Follow lock and config events (SSE), optionally filtered; resume with
        ``Last-Event-ID``. A reader that cannot have every event gets a ``gap`` event."""
        await caller.need(Verb.READ, action="events", repo=repo)
        given = {"Last-Event-ID": last_event_id, "lastEventId": last_event_id_query}
        for name, value in given.items():
            if value and not re.fullmatch(_EVENT_ID_PATTERN, value):
                return json_error(422, f"{name}: expected <milliseconds>-<sequence> as sent in "
                                       f"an event's id, got {value!r}", field=name)
        after = last_event_id or last_event_id_query or None
        types = None
        if type is not None:
            types = frozenset(t.strip(" ") for t in type.split(","))
            unknown = sorted(types - set(EVENT_TYPES))
            if unknown:
                return json_error(422, f"type: unknown event type {unknown[0]!r}; known: "
                                       f"{', '.join(EVENT_TYPES)}", field="type")
        settings = config()
        client = http.client.host if http.client else "unknown"
        refused = streams.refusal(client, settings)
        if refused is not None:
            return refused
        max_lag = settings.events_max_lag
        # Each event is checked under the access control in force when it is sent, not the
        # one the stream opened under: a role a config change takes away stops the events.
        # The caller is identified again from the request's credentials when that access
        # control changes or its recheck time passed: a withdrawn token ends the stream.
        still = StillCaller(http, caller)

        async def stream() -> AsyncIterator[bytes]:
            # The caller is identified again on a timer too, so a stream with no events does
            # not outlive a withdrawn token: the timer ends the stream while it waits for the
            # bus (``parked``: cancelled there, the stream ends cleanly), or marks it ended
            # for the stream to see as soon as its send is done.
            task = asyncio.current_task()
            assert task is not None
            ended: list[Unidentified] = []
            parked = True

            async def recheck() -> None:
                while True:
                    await asyncio.sleep(max(still.due_in(), RECHECK_FLOOR_SECONDS))
                    access = await still.access()
                    if isinstance(access, Unidentified):
                        ended.append(access)
                        if parked:
                            task.cancel()
                        return

            timer = asyncio.ensure_future(recheck())
            try:
                async for item in bus.follow(after, max_lag=max_lag, announce=True):
                    parked = False
                    if isinstance(item, Following):
                        yield FOLLOWING
                    elif isinstance(item, Gap):
                        if item.reason == "behind":
                            log.info("event reader %s fell more than %d events behind: gap, "
                                     "stream closed", client, max_lag)
                        yield _gap_frame(item)
                    elif matches(item, repo=repo, key_prefix=key_prefix, types=types):
                        access = await still.access()
                        if isinstance(access, Unidentified):
                            ended.append(access)
                        elif await access.authorizer.allowed(still.identity, Verb.READ,
                                                             repo=item.repo):
                            yield await _readable_frame(item, frames, access, still)
                    if ended:
                        break
                    parked = True
            except asyncio.CancelledError:
                if not ended or task.uncancel() > 0:
                    raise  # cancelled by someone else too (the client left, shutdown)
            finally:
                timer.cancel()
            if ended:
                log.info("event reader %s (%s): %s: stream closed", client,
                         still.identity.name, ended[0].value)

        return _CountedStream(stream(), closed=streams.opened(client))
