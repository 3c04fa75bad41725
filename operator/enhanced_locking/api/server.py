"""The HTTP server's own limits: slow or half-sent requests, too many connections, overload.

uvicorn bounds the time an idle keep-alive connection stays open, but not the time a request
takes to *arrive*: a client that sends half a header line and stops holds a connection and a
file descriptor forever, and enough of them exhaust the process's open-file limit (then even
``/healthz`` cannot be reached, and asyncio logs a traceback for every refused accept). This
module adds, as one protocol class handed to uvicorn (its ``httptools`` parser, the faster of
its two, see docs/benchmarks.md):

* a **header deadline**: a request's line and headers must arrive within
  ``enhanced-locking-http-header-timeout`` of its first byte (or of the connection opening);
* a **body deadline**: its body within ``enhanced-locking-http-body-timeout`` of its headers;
* a **connection limit**: ``enhanced-locking-http-max-connections``, never above the open-file
  limit minus :data:`FD_RESERVE` (the stores, Redis pools and logs need descriptors too); a
  connection beyond it is closed at once.

A connection closed for either reason is counted and logged **once per interval**
(:class:`EveryInterval`), never once per attempt; so is asyncio's "accept out of system
resource" if descriptors run out anyway.

:class:`BodyLimit` bounds a request's body before anything reads it: a ``Content-Length``
over ``enhanced-locking-http-max-body`` (the VCS webhooks: their own cap) is answered 413 at
once, unread; a chunked body is counted as it arrives and refused the same way once it passes
the bound, before the app sees any of it. So no route, and no check of its caller, ever reads a
body over the bound.

:class:`Backpressure` sheds load early: beyond ``enhanced-locking-http-max-in-flight`` requests
being served at once, a new request is answered 503 with ``Retry-After`` before any work is
done for it. Held locks and queued requests are untouched; releases, health, readiness and
metrics are always served (they are how load goes away and how it is watched).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import resource
import select
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from enhanced_locking.config import EnhancedLockingConfig

__all__ = ["FD_RESERVE", "Backpressure", "BodyLimit", "EveryInterval", "GuardedHttpToolsProtocol",
           "connection_limit", "guarded_protocol", "quiet_accept_errors"]

log = logging.getLogger(__name__)

FD_RESERVE = 64
"""Open files kept for everything but client connections."""
LOG_INTERVAL = 10.0
RETRY_AFTER_SECONDS = 1
ALWAYS_SERVED = ("/healthz", "/readyz", "/serving", "/metrics")


class EveryInterval:
    """Counts an occurrence and logs it at most once per ``interval`` seconds, with the count
    since the last line."""

    def __init__(self, message: str, *, interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.message = message
        self.interval = interval
        self.clock = clock
        self.total = 0
        self._pending = 0
        self._last: float | None = None

    def __call__(self, *args: Any) -> None:
        self.total += 1
        self._pending += 1
        now = self.clock()
        if self._last is None or now - self._last >= self.interval:
            log.warning(self.message + " (%d in the last %.0f s)", *args, self._pending,
                        self.interval if self._last is not None else 0)
            self._pending, self._last = 0, now


def connection_limit(config: EnhancedLockingConfig) -> int:
    """The connection limit: the setting, but never above the open-file limit less a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return config.http_max_connections
    return max(1, min(config.http_max_connections, soft - FD_RESERVE))


@dataclass(frozen=True)
class _Limits:
    """What every connection of one server is held to, and where a breach is counted."""

    connections: int
    header_timeout: float
    body_timeout: float
    refused: EveryInterval
    late: EveryInterval


def guarded_protocol(config: EnhancedLockingConfig) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with request deadlines and a connection limit from
    ``config``."""
    header_timeout = config.http_header_timeout.total_seconds()
    body_timeout = config.http_body_timeout.total_seconds()
    limits = _Limits(
        connections=connection_limit(config), header_timeout=header_timeout,
        body_timeout=body_timeout,
        refused=EveryInterval(f"refused connections: %d open, the limit (enhanced-locking-http-"
                              f"max-connections, at most the open-file limit less "
                              f"{FD_RESERVE})"),
        late=EveryInterval("closed connections whose request did not arrive in time "
                           "(enhanced-locking-http-header-timeout %s, body-timeout %s)"))
    configured = limits

    class Configured(GuardedHttpToolsProtocol):
        limits = configured

    return Configured


HEAD, BODY = "head", "body"
"""The part of a request that is arriving: its line and headers, or its body."""

UNREAD_TURNS = 3
"""Turns of the event loop a request deadline that came due waits while bytes of the
connection lie unread in its socket: they arrived, and are read before the deadline is looked
at again (an event loop reads a turn's ready sockets before it runs the turn's timers, so one
turn is enough for a read that is due)."""


def _unread(transport: asyncio.BaseTransport) -> bool:
    """Whether bytes (or the client's end of the connection) lie unread in ``transport``'s
    socket. ``poll``, not ``select``: a connection's descriptor may be above 1023."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    watch = select.poll()
    watch.register(sock.fileno(), select.POLLIN)
    return bool(watch.poll(0))


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """One connection: refused beyond the limit; the request's head must arrive within the
    header deadline of its first byte (or of the connection opening), its body within the body
    deadline of its head. The parser's callbacks say which part is arriving; nothing is timed
    while a request is being answered or the connection is idle between requests (uvicorn's
    keep-alive timeout covers that)."""

    limits: ClassVar[_Limits]
    _refused = False
    _arriving: str | None = HEAD
    _deadline: asyncio.TimerHandle | None = None
    _timing: str | None = None  # the part the deadline is for
    _unread_turns = 0  # turns the deadline came due with bytes unread (UNREAD_TURNS)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.connections:
            self._refused = True
            transport.abort()
            self.limits.refused(len(self.connections))
            return
        super().connection_made(transport)
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        self._follow()

    # the parser's callbacks: which part of a request is arriving
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arriving = HEAD

    def on_headers_complete(self) -> None:
        self._arriving = BODY
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._arriving = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()  # idle now (uvicorn's keep-alive timeout takes over), or pipelined

    def _follow(self) -> None:
        part = self._arriving
        if part is None:
            self._disarm()
        elif self._timing != part or self._deadline is None:
            # the deadline runs from the part's start, not from its last byte
            self._disarm()
            self._timing, self._unread_turns = part, 0
            seconds = self.limits.header_timeout if part == HEAD else self.limits.body_timeout
            self._deadline = self.loop.call_later(seconds, self._too_late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._timing = None, None

    def _too_late(self) -> None:
        self._deadline = None
        part = self._arriving
        if self.transport.is_closing() or part is None:
            return
        if part == HEAD and self.cycle is not None and not self.cycle.response_complete:
            return  # a response is still being written (pipelining): not ours to cut
        if self._unread_turns < UNREAD_TURNS and _unread(self.transport):
            # Bytes that arrived before now are still unread: the process was stopped, or its
            # loop stalled, past the deadline, and came back with the timer due in a turn whose
            # look at the sockets came before they arrived. The deadline bounds a slow client,
            # not a slow server: they are read first (the next turn), then it is looked at again.
            self._unread_turns += 1
            self._deadline = self.loop.call_later(0, self._too_late)
            return
        self.limits.late(f"{self.limits.header_timeout:g}s", f"{self.limits.body_timeout:g}s")
        self.transport.close()


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs a traceback for every accept refused for lack of descriptors; log it once
    per interval instead (everything else goes to the default handler)."""
    out_of_files = EveryInterval("cannot accept connections: %s")

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if "socket.accept() out of system resource" in message:
            out_of_files(context.get("exception"))
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


class Backpressure:
    """ASGI middleware: at most ``limit()`` requests in flight; beyond, 503 + Retry-After,
    each one told to ``shed`` (the metric that counts them)."""

    def __init__(self, app: ASGIApp, *, limit: Callable[[], int],
                 shed: Callable[[], None] = lambda: None) -> None:
        self.app = app
        self.limit = limit
        self.count_shed = shed
        self.in_flight = 0
        self.shed = EveryInterval("shedding load: %d requests in flight, the limit "
                                  "(enhanced-locking-http-max-in-flight); answered 503")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _always_served(scope):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit():
            self.shed(self.in_flight)
            self.count_shed()
            body = (b'{"error":"the service is at its limit of requests in flight '
                    b'(enhanced-locking-http-max-in-flight); retry after the Retry-After '
                    b'seconds","reason":"overloaded"}')
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(RETRY_AFTER_SECONDS).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def _always_served(scope: Scope) -> bool:
    return scope["method"] == "DELETE" or scope["path"] in ALWAYS_SERVED


class BodyLimit:
    """ASGI middleware: a request body over ``limit()`` bytes (``/v1/webhooks/*``: over
    ``webhooks`` bytes) is answered 413 before the app runs, without reading it when its
    ``Content-Length`` says so. One pass over the raw headers per request; only a body sent
    without a length (chunked) is read here first, counted, and handed to the app as it came.
    (The HTTP parser delimits a body by its ``Content-Length``; a request with neither that
    nor ``Transfer-Encoding`` has none.)"""

    def __init__(self, app: ASGIApp, *, limit: Callable[[], int], webhooks: int) -> None:
        self.app = app
        self.limit = limit
        self.webhooks = webhooks

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine: a request within the bound gets the app's own awaitable, so this
        # check adds no frame to the chain every suspension of the request passes through
        # (as an ``async`` middleware it added 11k to 22k instructions to a lock pair, this
        # way about 6k: bench/http_stack.py --count product).
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        length: bytes | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
        if length is None and not chunked:
            return self.app(scope, receive, send)
        webhook = scope["path"].startswith("/v1/webhooks/")
        limit = self.webhooks if webhook else self.limit()
        if length is None:
            return self._counted(scope, receive, send, limit, webhook=webhook)
        # (uvicorn's parser refuses a length that is not digits; 19 digits are over any
        # bound, and int() of thousands of digits raises)
        if len(length) > 18 or not length.isdigit() or int(length) > limit:
            return _too_large(send, limit, webhook=webhook)
        return self.app(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send, limit: int, *,
                       webhook: bool) -> None:
        """A body sent without a length, read and counted before the app runs."""
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body's end: nobody to answer
            size += len(message.get("body", b""))
            if size > limit:
                await _too_large(send, limit, webhook=webhook)
                return
            messages.append(message)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(messages, receive), send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` with the body's messages, read already, handed out again first."""
    pending = collections.deque(messages)

    async def replay() -> Message:
        return pending.popleft() if pending else await receive()

    return replay


async def _too_large(send: Send, limit: int, *, webhook: bool) -> None:
    bound = "a VCS webhook's" if webhook else "enhanced-locking-http-max-body"
    body = json.dumps({"error": f"the request body is over {limit} bytes, the most this "
                                f"service reads ({bound})", "limit": limit}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})  # the rest of the body is not read: the connection ends
    await send({"type": "http.response.body", "body": body})
