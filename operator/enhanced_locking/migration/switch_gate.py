"""The gate the enhanced store's writes pass while the service may move that store.

A change of where the enhanced locks live (embedded → Redis, say) exports the held locks and
fencing counters from the old store, adopts them into the new one and then swaps the new
locker in. A grant or release the old locker made between the export and the swap would be
lost with the old store: a grant never reaching the new store lets the key be granted again
there (two holders), a release leaves the new store's copy held. So every call of the router
that writes the enhanced side passes this gate, and the switch closes it around the export and
the swap (:meth:`SwitchGate.switching`):

* a call that arrives while the gate is closed waits at the gate and then runs on the locker
  in force when it opens (the new one, or the old one if the switch was refused);
* the switch waits for the calls already through to finish before it exports;
* a call that waits in a queue (``wait``) does not hold the switch up: told that a switch
  begins (:attr:`Pass.switching`), it leaves the old store's queue (as a caller that went
  away does), and asks again through the gate, for what is left of its wait, on the locker in
  force after the switch (at the back of the new store's queue).

A call made inside another (a batch's keys one by one, a close's releases, in its task or
a task it started) is part of the one that let it in: it does not pass again, so a switch never
waits for a call that waits for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["Pass", "SwitchGate"]


@dataclass(frozen=True)
class Pass:
    """A call let through the gate; ``switching`` is set when a switch begins meanwhile
    (``None``: the call is inside another one's pass, which answers for it)."""

    switching: asyncio.Event | None


_NESTED = Pass(switching=None)

_INSIDE: ContextVar[bool] = ContextVar("inside_switch_gate", default=False)
"""Set while a call through the gate runs in this task (a context variable: cheaper to read
than the current task, and copied into the tasks the call starts)."""


class SwitchGate:
    """Counts the calls through; closed, holds new ones until the switch is done."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._switching = asyncio.Event()
        self._pass = Pass(switching=self._switching)  # one per switch: made once, not per call
        self._through = 0
        self._waiting = 0
        self._drained: asyncio.Event | None = None

    @property
    def through(self) -> int:
        """How many calls are through the gate now."""
        return self._through

    @property
    def waiting(self) -> int:
        """How many calls wait at the closed gate now."""
        return self._waiting

    def passing(self) -> Pass | None:
        """:meth:`enter` when it would not wait (no switch under way), without a coroutine
        of its own; ``None``: await :meth:`enter`."""
        if _INSIDE.get():
            return _NESTED
        if not self._open.is_set():
            return None
        self._through += 1
        _INSIDE.set(True)
        return self._pass

    async def enter(self) -> Pass:
        """Let a call through (waiting while a switch is under way); pair with :meth:`leave`."""
        if _INSIDE.get():
            return _NESTED
        while not self._open.is_set():
            self._waiting += 1
            try:
                await self._open.wait()
            finally:
                self._waiting -= 1
        self._through += 1
        _INSIDE.set(True)
        return self._pass

    def leave(self, passed: Pass) -> None:
        """The call ``passed`` let through is done."""
        if passed.switching is None:
            return
        _INSIDE.set(False)
        self._through -= 1
        if self._through == 0 and self._drained is not None:
            self._drained.set()

    @asynccontextmanager
    async def switching(self) -> AsyncIterator[None]:
        """Close the gate, tell the calls that wait in a queue to leave it, and wait for every
        call through to finish; open it again when the block ends (switched or not)."""
        if _INSIDE.get():
            raise RuntimeError("a store switch cannot start inside a call through its gate")
        self._open.clear()
        told, self._switching = self._switching, asyncio.Event()
        self._pass = Pass(switching=self._switching)
        told.set()
        try:
            if self._through:
                self._drained = asyncio.Event()
                await self._drained.wait()
            yield
        finally:
            self._drained = None
            self._open.set()
