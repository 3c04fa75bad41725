"""The client's reading of an event stream that ends in the middle of an event: what came
whole is delivered, the part is not, and the reader says the stream was cut.

The server here is a loopback socket that answers as the lock service's ``/v1/events`` does
(``text/event-stream``) and closes the connection part way through its second event, as a
proxy or a restarted service may."""

from __future__ import annotations

import contextlib
import http.server
from collections.abc import Iterator

import pytest
from tests.support.loopback_http import serving

from enhanced_locking.api.sse import _gap_frame
from enhanced_locking.client import AsyncClient, Client, ServiceError, StreamCut, parse_sse
from enhanced_locking.events import EventBus, Gap
from enhanced_locking.types import Event


def _whole(bus: EventBus, key: str) -> tuple[Event, str]:
    bus.publish("acquired", key=key)
    event = bus.recent()[-1]
    return event, (f"id: {event.id}\nevent: acquired\n"
                   f"data: {event.model_dump_json(by_alias=True)}\n\n")


@contextlib.contextmanager
def _cut_stream(body: str) -> Iterator[str]:
    """A loopback HTTP server that answers every request with an event stream of ``body`` and
    then closes the connection; its base URL."""

    class Cut(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("connection", "close")
            self.end_headers()
            self.wfile.write(body.encode())
            self.close_connection = True

        def log_message(self, *_: object) -> None:
            pass

    yield from serving(Cut)


@pytest.mark.parametrize("cut", ["in-its-data", "before-the-blank-line"])
def test_parse_sse_delivers_no_part_of_an_event_and_says_the_stream_was_cut(cut: str) -> None:
    """Before, the part was read as an event: a part of its JSON raised ``JSONDecodeError``,
    and an event whose blank line never came was delivered as if it had."""
    bus = EventBus()
    first, text = _whole(bus, "k1")
    second, more = _whole(bus, "k2")
    part = more[:len(more) // 2] if cut == "in-its-data" else more.rstrip("\n")
    lines = (text + part).split("\n")
    got: list[Event | None] = []
    with pytest.raises(StreamCut):
        got.extend(parse_sse(lines))
    assert [e.id for e in got if e is not None] == [first.id]
    assert list(parse_sse((text + more).split("\n")))[-1] == second  # whole: delivered


def test_the_client_reports_a_stream_cut_in_an_event_and_delivers_none_of_it() -> None:
    bus = EventBus()
    first, text = _whole(bus, "k1")
    _, more = _whole(bus, "k2")
    with _cut_stream(text + more[:len(more) // 2]) as url, Client(url) as client:
        got: list[Event] = []
        with pytest.raises(ServiceError) as raised:
            got.extend(client.events())
    assert [e.id for e in got] == [first.id]
    assert raised.value.status == 0
    assert "ended in the middle of an event" in str(raised.value), raised.value


async def test_the_async_client_reports_a_stream_cut_in_an_event_too() -> None:
    """(It never delivered the part; it ended as if the stream had ended cleanly.)"""
    bus = EventBus()
    first, text = _whole(bus, "k1")
    _, more = _whole(bus, "k2")
    with _cut_stream(text + more.rstrip("\n")) as url:
        async with AsyncClient(url) as client:
            got: list[Event] = []
            with pytest.raises(ServiceError) as raised:
                async for event in client.events():
                    got.append(event)
    assert [e.id for e in got] == [first.id]
    assert "ended in the middle of an event" in str(raised.value), raised.value


def test_a_stream_that_ends_between_events_ends_quietly() -> None:
    bus = EventBus()
    first, text = _whole(bus, "k1")
    with _cut_stream(text + ": keep-alive\n\n") as url, Client(url) as client:
        assert [e.id for e in client.events()] == [first.id]


def test_a_switch_gap_carries_the_new_bus_id_to_resume_from_and_other_gaps_none() -> None:
    """The service's own gap frames: a store switch's names the new bus's id (the client's
    ``Last-Event-ID`` from then on, so the ``events`` command prints it for a resume); a
    replay's is no place to resume from."""
    switched = _gap_frame(Gap(after="17-0", oldest=None, reason="switched", resume="42-0"))
    replay = _gap_frame(Gap(after="17-0", oldest="20-0", reason="replay"))
    got = [e for e in parse_sse((switched + replay).decode().split("\r\n")) if e is not None]
    assert [(e.type, e.id, e.details.get("reason")) for e in got] == [
        ("gap", "42-0", "switched"), ("gap", "", "replay")]
    assert got[0].details["resume"] == "42-0" and "resume" not in got[1].details
