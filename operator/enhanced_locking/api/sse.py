"""``GET /v1/events``: lock and config events as Server-Sent Events.

Filters: ``repo`` (exact), ``keyPrefix`` (lock keys starting with it), ``type`` (comma-separated
event types). Each event carries its id (``<ms>-<seq>``, the Redis Stream id form); a client
that reconnects with ``Last-Event-ID`` (header, or the ``lastEventId`` query parameter) gets
every event after it that is still in the bus's ring. When some may have fallen out of the
ring, the stream starts with a ``gap`` event so the client knows to re-read state rather than
trust the replay.

A caller sees only what its ``read`` right covers: the stream needs ``read`` (on ``repo`` when
the filter names one), and each event is checked again for its repository before it is sent
(answers are cached, see ``auth-cache-ttl``), so a right taken away stops the events within
that time.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import FastAPI, Header, Query
from sse_starlette import EventSourceResponse, ServerSentEvent

from enhanced_locking.api.access import CallerDep
from enhanced_locking.api.errors import error_answers, json_error
from enhanced_locking.events import EVENT_TYPES, Bus, parse_event_id
from enhanced_locking.types import Event, Verb

__all__ = ["install_event_stream", "matches"]

KEEPALIVE_SECONDS = 15


def matches(event: Event, *, repo: str | None, key_prefix: str | None,
            types: frozenset[str] | None) -> bool:
    """Whether ``event`` passes the stream's filters."""
    if repo is not None and event.repo != repo:
        return False
    if key_prefix is not None and not (event.key or "").startswith(key_prefix):
        return False
    return types is None or event.type in types


def install_event_stream(app: FastAPI, bus: Bus) -> None:
    @app.get("/v1/events", response_model=None, responses=error_answers({
        401: "No or invalid credentials (see WWW-Authenticate).",
        403: "The caller lacks the read right (on repo, when given).",
    }))
    async def events(
        caller: CallerDep,
        repo: Annotated[str | None, Query(max_length=512, description="owner/name")] = None,
        key_prefix: Annotated[str | None, Query(alias="keyPrefix", max_length=4096,
                                                description="Lock keys starting with this.")]
        = None,
        type: Annotated[str | None, Query(max_length=1024,
                                          description="Comma-separated event types.")] = None,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
        last_event_id_query: Annotated[str | None, Query(alias="lastEventId", max_length=64)]
        = None,
    ) -> EventSourceResponse | object:
        """Follow lock and config events (SSE), optionally filtered; resume with
        ``Last-Event-ID``."""
        await caller.need(Verb.READ, action="events", repo=repo)
        after = last_event_id or last_event_id_query
        if after is not None:
            try:
                parse_event_id(after)
            except ValueError:
                return json_error(422, f"Last-Event-ID: expected <milliseconds>-<sequence> as "
                                       f"sent in an event's id, got {after!r}",
                                  field="Last-Event-ID")
        types = None
        if type is not None:
            types = frozenset(t.strip() for t in type.split(",") if t.strip())
            unknown = sorted(types - set(EVENT_TYPES))
            if unknown:
                return json_error(422, f"type: unknown event type {unknown[0]!r}; known: "
                                       f"{', '.join(EVENT_TYPES)}", field="type")

        async def stream() -> AsyncIterator[ServerSentEvent]:
            if after is not None and bus.gap_since(after):
                yield ServerSentEvent(event="gap", data=json.dumps({"after": after}))
            async for event in bus.stream(after):
                if (matches(event, repo=repo, key_prefix=key_prefix, types=types)
                        and await caller.may(Verb.READ, repo=event.repo)):
                    yield ServerSentEvent(id=event.id, event=event.type,
                                          data=event.model_dump_json(by_alias=True))

        return EventSourceResponse(stream(), ping=KEEPALIVE_SECONDS)
