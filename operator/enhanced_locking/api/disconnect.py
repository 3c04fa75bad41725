"""Stop waiting for a client that has gone away, and give back what it can no longer use.

A request that waits in a queue holds its HTTP connection open until it is answered. If the
client disconnects meanwhile (Ctrl-C, a proxy timeout, a crashed CI job), the wait must end
*now*: otherwise the lock could later be granted to a caller nobody is listening to. ASGI tells
us through an ``http.disconnect`` message, which this module watches for alongside the work;
cancelling the work makes the locker withdraw the waiter and give back anything granted in the
meantime (see :mod:`enhanced_locking.locking.queueing`).

The grant and the disconnect can also arrive together, or the client can go while a busy
server was still working on an answer that does not wait at all. Then the work has an answer
nobody will read: :class:`ClientGone` carries it, so the caller can give a fresh grant back
instead of leaving it held by nobody. (A client that disconnects after the answer left the
server has its answer in flight; the server cannot tell, as with any HTTP service.)
"""

from __future__ import annotations

import asyncio
import logging
import select
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Generic, TypeVar

from starlette.requests import Request
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http import h11_impl, httptools_impl

from enhanced_locking.api.responses import JsonAnswer
from enhanced_locking.locking.queueing import NotWithdrawn

__all__ = ["AnswerUnlessGone", "ClientGone", "answer_unless_gone", "gone_answer",
           "left_before_it_began", "not_withdrawn"]

T = TypeVar("T")

log = logging.getLogger(__name__)

_UVICORN_CYCLES = (httptools_impl.RequestResponseCycle, h11_impl.RequestResponseCycle)
"""uvicorn's request cycles, one per protocol: their ``receive`` is looked at by its flags."""

_PEER_CLOSED = getattr(select, "POLLRDHUP", 0)
"""What ``poll`` reports once the client has closed its side (its FIN: ``POLLRDHUP``, a Linux
flag; 0 where there is none, and then only the flags are looked at). Bytes the client sent are
not a close; a reset (``POLLHUP``, ``POLLERR``) is reported whatever is asked."""


class ClientGone(Exception, Generic[T]):
    """The client disconnected before its answer was sent; ``answer`` is what the work came to
    (None when it was cancelled before it had one)."""

    def __init__(self, answer: T | None = None) -> None:
        super().__init__("client disconnected")
        self.answer = answer


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def answer_unless_gone(request: Request, work: Coroutine[Any, Any, T], *,
                             watch: bool) -> T:
    """Run ``work``; with ``watch`` (a request that may wait) a disconnect cancels it at once
    and raises ``ClientGone``, with the answer if the work had one already. (Without, the work
    runs to its end: :class:`AnswerUnlessGone` looks at the connection as it answers.)"""
    if not watch:
        return await work
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        if not watcher.done():
            watcher.cancel()
    if task.done():
        if watcher.done() and not watcher.cancelled():
            raise ClientGone(task.result())
        return task.result()
    task.cancel()
    try:
        answer = await task  # the work may have finished before the cancel reached it
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # this call was cancelled too (the server stopping): not the client's going
        raise ClientGone from None
    raise ClientGone(answer)


class AnswerUnlessGone(JsonAnswer):
    """A JSON answer sent only if its client is still connected as it goes out; otherwise
    ``on_gone`` runs instead (it gives a fresh grant back). Looked at in the last step before
    the first byte is sent, so no await separates the look from the send."""

    def __init__(self, content: Any, *, status_code: int,
                 on_gone: Callable[[], Awaitable[None]],
                 raw_header: tuple[bytes, bytes] | None = None) -> None:
        super().__init__(content, status_code=status_code, raw_header=raw_header)
        self._on_gone = on_gone

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _gone_already(receive):
            await self._on_gone()
            # Answered all the same: a close the kernel holds is one uvicorn has not read, and a
            # request that answers nothing is an error to it (a 500 and an error log line).
            await gone_answer()(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def left_before_it_began(request: Request) -> JsonAnswer | None:
    """The 499 for a release whose client is gone before it is made, else None.

    A release that reaches the service late (its replica was frozen, or far too busy, while
    the request waited in the socket) may find its client gone: it gave up on the answer and,
    as a client does, released through another replica and perhaps took the key again. Made
    now, the old release would free that new hold, and the client would hold a lock the store
    let go (the next pull granted beside it). A client that left never reads the answer, so
    nothing is done for it: the release by key and the batch release answer this 499 instead
    (logged). A pull's release (`DELETE /v1/locks/by-pull`, sent when a pull closes, often
    once and with a deadline) and a waiter's cancel are made all the same: leaving a closed
    pull's locks held for want of a reader is worse than the late release, which cannot meet
    a new hold of a closed pull. Only uvicorn's own ``receive`` is looked at (its flags and
    the socket, see :func:`_cycle_gone`); a connection kept open by a proxy in between is
    not seen to go."""
    cycle = getattr(request.receive, "__self__", None)
    if isinstance(cycle, _UVICORN_CYCLES) and _cycle_gone(cycle):
        log.warning("not made: %s %s, its client left before it began",
                    request.scope["method"], request.scope["path"])
        return gone_answer()
    return None


def not_withdrawn(noted: Sequence[NotWithdrawn], *, kept: frozenset[str] = frozenset(),
                  ) -> list[tuple[str, Exception | None]]:
    """Each key of a wait its client left that could not be withdrawn (it may be held), and
    why, as a give-back's tried keys (but those in ``kept``: held before the request)."""
    return [(key, failed.error) for failed in noted for key in failed.keys if key not in kept]


def gone_answer() -> JsonAnswer:
    """The answer to a client that left before its answer: 499, which nobody reads (uvicorn
    drops what is sent to a connection it knows is closed)."""
    return JsonAnswer({"error": "client disconnected"}, status_code=499)


def _gone_already(receive: Receive) -> bool:
    """Whether the client is known to be gone, looked at without yielding.

    ``Request.is_disconnected`` waits one event-loop step for its answer, and a disconnect
    arriving in that step would be missed. When ``receive`` is uvicorn's own (a request
    cycle's, as every request the service serves has it: no middleware of the app wraps it),
    the cycle's two flags are what it would answer at once: ``http.disconnect`` once the
    client is gone or the response complete, else a wait or a request message; read directly
    (about 17k instructions less than running the coroutine a step and closing it), and when
    they say nothing, the connection's socket is asked whether the client's close has arrived
    (:func:`_closed_by_peer`). Any other ``receive`` is looked at by :func:`_gone_by_step`."""
    cycle = getattr(receive, "__self__", None)
    if isinstance(cycle, _UVICORN_CYCLES):
        return _cycle_gone(cycle)
    return _gone_by_step(receive)


def _cycle_gone(cycle: httptools_impl.RequestResponseCycle | h11_impl.RequestResponseCycle,
                ) -> bool:
    """Whether the client of uvicorn's request ``cycle`` is gone: its flags, else its socket
    (see :func:`_gone_already`)."""
    return bool(cycle.disconnected or cycle.response_complete
                or _closed_by_peer(cycle.transport))


def _closed_by_peer(transport: asyncio.BaseTransport) -> bool:
    """Whether the client's close has reached this host though the event loop has not read it.

    The flags change only when the loop next polls its sockets; a loop that is busy (a flood of
    requests, a chain of hand-offs on one key) can run many milliseconds behind a client that
    hung up. The kernel knows at once: its ``poll``, asked without waiting, reports the close
    (one system call). uvicorn ends the request on that close as soon as it reads it (a half
    close too), so this answers now what the flags would answer at the loop's next step."""
    sock = transport.get_extra_info("socket")
    if not _PEER_CLOSED or sock is None:
        return False
    fd = sock.fileno()
    if fd < 0:
        return False
    poller = select.poll()
    poller.register(fd, _PEER_CLOSED)
    return bool(poller.poll(0))


def _gone_by_step(receive: Receive) -> bool:
    """Whether ``receive`` answers a disconnect at once. The server's ``receive`` answers a
    disconnect it has seen at once, so it is run up to its first suspension only: a message by
    then is the answer; a suspension means nothing has arrived (and the step is dropped,
    unconsumed)."""
    step = receive()
    if not isinstance(step, Coroutine):
        step.close() if hasattr(step, "close") else None
        return False
    try:
        step.send(None)
    except StopIteration as done:
        return bool(done.value and done.value.get("type") == "http.disconnect")
    step.close()
    return False
