"""The intake: how many acquires are in their store steps at once on this replica.

A flood of acquires (thousands of waiting requests arriving together) would otherwise all
reach the store at once: on Redis every one asks the pool for a connection, and those that
find none free within the pool's wait are answered ``overloaded`` although each would have
been served in a few milliseconds. The intake lets ``limit`` acquires in at once; the others
wait their turn in arrival order (first come, first in) for at most :data:`INTAKE_WAIT`, then
are answered :class:`~enhanced_locking.types.StoreBusy` (503 ``overloaded`` with
``Retry-After``), before anything of them was done.

An acquire is *in* from its first store step until it is answered, or, for one that waits
in a key's queue, until it is queued and told so: the wait for its turn holds no place (a
thousand waiters would otherwise keep every later acquire out). The fast path, a free place
and nobody waiting, takes it without awaiting anything.

The router takes the place before its own looks at the stores (:func:`take`), and the locker
of the store gives it up once its waiter is queued: the place a task holds is in a context
variable (:func:`current`), so the locker, called by the router, finds it there and does not
take a second one.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from contextvars import ContextVar, Token

from enhanced_locking.types import StoreBusy

__all__ = ["INTAKE_WAIT", "Intake", "Place", "current", "give_up", "step_in", "step_out",
           "take"]

INTAKE_WAIT = 20.0
"""Seconds an acquire waits for a place before it is answered ``overloaded``: below the Go
client's 30 s bound of a call, so that its caller hears the answer (and sends the acquire again
after ``Retry-After``) rather than giving up."""


class Place:
    """One acquire's place in the intake ``of``: :meth:`leave` gives it up (once; later calls
    do nothing)."""

    __slots__ = ("_intake", "of")

    def __init__(self, intake: Intake) -> None:
        self._intake: Intake | None = intake
        self.of = intake

    def leave(self) -> None:
        intake, self._intake = self._intake, None
        if intake is not None:
            intake._left()


class Intake:
    """At most ``limit()`` acquires in their store steps at once; see the module docstring.
    ``setting`` names the bound in the overloaded answer."""

    __slots__ = ("_inside", "_limit", "_setting", "_wait", "_waiting")

    def __init__(self, limit: Callable[[], int], *, setting: str,
                 wait: float = INTAKE_WAIT) -> None:
        self._limit = limit
        self._setting = setting
        self._wait = wait
        self._inside = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def inside(self) -> int:
        """Acquires holding a place now."""
        return self._inside

    @property
    def waiting(self) -> int:
        """Acquires waiting for a place now."""
        return len(self._waiting)

    def enter_now(self) -> Place | None:
        """A place at once, if one is free and nobody waits for one; else ``None``
        (then :meth:`enter`)."""
        if self._waiting or self._inside >= self._limit():
            return None
        self._inside += 1
        return Place(self)

    async def entered(self) -> Place:
        """:meth:`enter_now`, else :meth:`enter`."""
        place = self.enter_now()
        return place if place is not None else await self.enter()

    async def enter(self) -> Place:
        """A place: at once if one is free, else in arrival order once one is given up;
        :class:`StoreBusy` if none came within the intake's wait."""
        place = self.enter_now()
        if place is not None:
            return place
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._waiting.append(turn)
        timer = loop.call_later(self._wait, self._expire, turn)
        try:
            await turn
        except asyncio.CancelledError:
            # The caller went away. A place handed to it just before is passed on.
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._left()
            else:
                self._forget(turn)
            raise
        finally:
            timer.cancel()
        return Place(self)

    def _expire(self, turn: asyncio.Future[None]) -> None:
        if turn.done():
            return
        self._forget(turn)
        turn.set_exception(StoreBusy(
            f"the replica is at its limit of {self._limit()} acquires in their store steps at "
            f"once ({self._setting}) and none finished within {self._wait:g} s; retry after "
            "the Retry-After seconds"))

    def _forget(self, turn: asyncio.Future[None]) -> None:
        try:
            self._waiting.remove(turn)
        except ValueError:
            pass

    def _left(self) -> None:
        """A place was given up: handed to the oldest acquire still waiting, if the limit
        (which a new config may have lowered) leaves room for it; else freed."""
        if not (self._inside <= self._limit() and self._hand_on()):  # else it goes on
            self._inside -= 1
        # A raised limit lets more in than the one leaving: let them in.
        while self._inside < self._limit() and self._hand_on():
            self._inside += 1

    def _hand_on(self) -> bool:
        """Give a place to the oldest acquire still waiting (one whose caller went away is
        still in line until its task runs: it is passed over); ``False`` if none waits."""
        waiting = self._waiting
        while waiting:
            turn = waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return True
        return False


_PLACE: ContextVar[Place | None] = ContextVar("intake_place", default=None)


def current() -> Place | None:
    """The place this task took with :func:`take` (or :func:`step_in`), if any."""
    return _PLACE.get()


async def take(intake: Intake) -> Token[Place | None]:
    """A place in ``intake`` for this task (see :meth:`Intake.enter`), until :func:`give_up`
    with the token returned."""
    return _PLACE.set(await intake.entered())


def give_up(token: Token[Place | None]) -> None:
    """Leave the place this task holds (if it still holds one) and forget it."""
    place = _PLACE.get()
    if place is not None:
        place.leave()
    _PLACE.reset(token)


def step_out() -> Intake | None:
    """Leave this task's place for a while (a pause that does nothing with the store); the
    intake to :func:`step_in` again after it, if it held one."""
    place = _PLACE.get()
    if place is None:
        return None
    place.leave()
    return place.of


async def step_in(intake: Intake | None) -> None:
    """Take a place again after :func:`step_out` (in line behind those who came meanwhile)."""
    if intake is not None:
        _PLACE.set(await intake.entered())
