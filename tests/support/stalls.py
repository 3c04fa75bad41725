"""This process's event loop held past a call's limit while the answer comes: what a flood
on a loaded machine does to a service. The store is stopped (SIGSTOP) by the caller while the
call is sent; it is let go from a thread a second later, while the loop is blocked, so when the
loop runs again the answer has come and the limit is due, both in one turn."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["answered_across_a_stall"]

T = TypeVar("T")


async def answered_across_a_stall(call: Coroutine[Any, Any, T], resume: Callable[[], None],
                                  limit: float) -> T:
    """``call``'s answer: sent (within 0.3 s) while the store is stopped, ``resume`` called
    from a thread 1 s later, and the loop blocked meanwhile for ``limit`` + 1 seconds."""
    cont = threading.Timer(1.0, resume)
    task = asyncio.ensure_future(call)
    try:
        await asyncio.sleep(0.3)  # sent, not answered
        cont.start()
        time.sleep(limit + 1)  # noqa: ASYNC251 (the stall, on purpose)
        return await task
    finally:
        cont.cancel()
