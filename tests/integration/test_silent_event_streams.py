"""An event stream that stops sending without closing (a hung service, a proxy that keeps the
connection and passes nothing on) is given up after a few of the service's keep-alive
intervals: the clients end with a clear message, ``enhanced-locking events`` with exit 3,
never hung for good. The server here is a real socket that answers as the service's stream
starts (headers, ``: following``) and then sends nothing."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator

import pytest
from tests.support.loopback_http import serving

from enhanced_locking import cli, client, events
from enhanced_locking.client import Client, ServiceError

SILENCE = 1.0
"""The test's silence bound (the clients' default is a minute): how long they read nothing."""


@pytest.fixture
def falls_silent() -> Iterator[str]:
    """A stream that starts as the service's does, then sends nothing and keeps the
    connection open until the test ends."""
    done = threading.Event()

    class Silent(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(f": {events.FOLLOWING_COMMENT}\n\n".encode())
            self.wfile.flush()
            done.wait(120)

        def log_message(self, *args: object) -> None:
            pass

    with contextlib.contextmanager(serving)(Silent) as url:
        try:
            yield url
        finally:
            done.set()


def test_the_silence_bound_is_a_few_keepalives() -> None:
    assert events.STREAM_SILENCE_SECONDS >= 3 * events.KEEPALIVE_SECONDS


def test_a_silent_stream_is_given_up_with_a_clear_error(falls_silent: str) -> None:
    opened = []
    started = time.monotonic()
    with Client(falls_silent) as service, pytest.raises(ServiceError) as raised:
        for _ in service.events(on_open=lambda: opened.append(True), silence=SILENCE):
            pass
    assert opened == [True]  # it was a stream, followed; then it fell silent
    assert time.monotonic() - started >= SILENCE
    assert raised.value.status == 0
    assert str(raised.value) == (
        f"the event stream of {falls_silent} sent nothing for 1s, not even the keep-alive the "
        f"service sends every {events.KEEPALIVE_SECONDS}s: given up (the service or a proxy "
        "between stopped sending without closing it)")


async def test_the_async_clients_silent_stream_is_given_up_too(falls_silent: str) -> None:
    async with client.AsyncClient(falls_silent) as service:
        with pytest.raises(ServiceError, match="sent nothing for 1s"):
            async for _ in service.events(silence=SILENCE):
                pass


def test_the_events_command_ends_with_exit_3_and_one_line(
    falls_silent: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """The command's own bound, made short for the test: it exits 3 (the service did not
    serve: nothing more is known) with the following line and the one that says why."""
    monkeypatch.setattr(client, "STREAM_SILENCE_SECONDS", SILENCE)
    assert cli.main(["events", "--url", falls_silent]) == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"enhanced-locking: following the events of {falls_silent}",
        f"enhanced-locking: the event stream of {falls_silent} sent nothing for 1s, not even "
        f"the keep-alive the service sends every {events.KEEPALIVE_SECONDS}s: given up (the "
        "service or a proxy between stopped sending without closing it)"]
