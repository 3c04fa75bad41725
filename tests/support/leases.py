"""Short leases in real time, kept exact on a busy machine.

A test of what happens when a lease ends needs its own steps before that end to happen before
it: a waiter queued, a refresh sent, a check that a live lease is left alone. On a loaded
machine one step can stall for seconds (a 2-core machine shared by many test runs stalled an
idle event loop for half a second, and a store call for up to five), so a lease of a few dozen
milliseconds ran out before the test's next step and the test failed with nothing wrong.

These helpers keep such tests exact without a fixed sleep:

* :func:`past` waits until the store's own clock (the one that decides leases and deadlines)
  is past a moment;
* :func:`with_leases` runs a case with a short lease first and, only when the case shows by the
  store's clock that its own step came after the lease had ended (it raises :class:`Overrun`),
  again with a longer one. A case never calls a wrong answer an overrun: it raises ``Overrun``
  only when the store's clock says the lease had ended, and with the longest lease a correct
  store does not get there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

__all__ = ["LEASES", "Overrun", "past", "until", "with_leases"]

LEASES: tuple[timedelta, ...] = (
    timedelta(milliseconds=300), timedelta(seconds=2), timedelta(seconds=10))
"""The leases :func:`with_leases` tries, shortest first."""


class Overrun(Exception):
    """The case's own step came after the lease's end (by the store's clock): try longer."""


async def past(now: Callable[[], Awaitable[datetime]], moment: datetime, *,
               within: float = 60.0) -> None:
    """Return once ``now()`` (a store's clock) is past ``moment``; fail after ``within``
    seconds of the test's own time."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + within
    while loop.time() < give_up:
        if await now() > moment:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the store's clock never passed {moment}")


async def until(check: Callable[[], bool], *, within: float = 60.0) -> bool:
    """Wait until ``check()`` holds, for at most ``within`` seconds of the test's own time:
    whether it held (the caller asserts on what it waited for)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + within
    while not check():
        if loop.time() > give_up:
            return False
        await asyncio.sleep(0.01)
    return True


async def with_leases(case: Callable[[timedelta], Awaitable[None]]) -> None:
    """Run ``case(lease)`` with each of :data:`LEASES` in turn until one does not overrun."""
    for lease in LEASES:
        try:
            await case(lease)
        except Overrun:
            continue
        return
    raise AssertionError(
        f"the test's own steps came after the lease's end even with {LEASES[-1]}")
