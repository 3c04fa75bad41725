"""Stop waiting for a client that has gone away.

A request that waits in a queue holds its HTTP connection open until it is answered. If the
client disconnects meanwhile (Ctrl-C, a proxy timeout, a crashed CI job), the wait must end
*now*: otherwise the lock could later be granted to a caller nobody is listening to. ASGI tells
us through an ``http.disconnect`` message, which this module watches for alongside the work;
cancelling the work makes the locker withdraw the waiter and give back anything granted in the
meantime (see :mod:`enhanced_locking.locking.queueing`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

__all__ = ["ClientGone", "unless_disconnected"]

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``; if the client disconnects first, cancel it and raise ``ClientGone``."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGone
