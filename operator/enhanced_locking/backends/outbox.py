"""An outbox written behind: items join at once, one task writes them in batches.

For a caller that must not wait on a shared store's write (an event published, an audit entry
appended, in the middle of a lock operation). The task waits ``coalesce`` seconds after the
first item so that a burst shares one write, writes at most ``batch_limit`` items at a time,
and retries with a doubling backoff while the store is away (``down``: logged as a warning), or
when a write fails in a way it did not expect (logged as an error, with its traceback): the
task never ends on a failed write, so a store that answers again is written. The outbox
keeps up to ``capacity`` items; older ones are dropped and counted in :attr:`Outbox.dropped`.
The first drop of an outage is logged (a warning), and so is, once the store takes items again,
how many that outage dropped; ``dropped`` (a callback) is then told that count.

A write the store makes anyway can carry the oldest items instead (:meth:`Outbox.lend`, then
:meth:`Outbox.repaid`): they stay in the outbox, and the task leaves them alone, until that
write says whether it was made.

An item dropped while a write carries it (the task's or a lender's) is counted out of that
write: when the write is made, only what is left of it leaves the outbox, never an item that
came after it and was not written. (Dropped items are counted whether or not that write is
made: the store may hold them.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["Outbox"]

log = logging.getLogger(__name__)

RETRY_FIRST = 0.05
RETRY_MAX = 2.0

T = TypeVar("T")


class Outbox(Generic[T]):
    """Items ``write`` sends to a store later, in order, in batches."""

    def __init__(self, write: Callable[[list[T]], Awaitable[None]], *, what: str,
                 task_name: str, down: tuple[type[BaseException], ...], capacity: int,
                 coalesce: float, batch_limit: int | None = None,
                 dropped: Callable[[int], None] | None = None) -> None:
        self._write = write
        self._what = what
        self._task_name = task_name
        self._down = down
        self.capacity = capacity
        self.coalesce = coalesce
        self.batch_limit = batch_limit
        self._items: collections.deque[T] = collections.deque()
        self._pending = asyncio.Event()
        """Set when items are due to be written: ``coalesce`` after the first of a burst
        (``_due``), unless every item left is carried by another write by then."""
        self._timer: asyncio.TimerHandle | None = None
        self._drained = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._writing = False
        self._flight = 0
        """The oldest items the task's write carries (fewer if some were dropped meanwhile)."""
        self._lent = 0
        self._back = asyncio.Event()
        self._back.set()
        self.dropped = 0
        """Items lost because the store stayed away longer than the outbox could hold them."""
        self._dropping = 0
        """Items dropped since the store last took a write (this outage's)."""
        self._on_dropped = dropped
        self._stopped = False
        """Set by :meth:`stop`: items put after it are dropped (no task writes them)."""

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        if self._stopped:
            # After :meth:`stop` (the bus closed) nothing writes, and a task started now would
            # never be stopped: the item is dropped, counted, and said once. Not refused: the
            # caller is a lock operation, which an event must not fail.
            self.dropped += 1
            if not self._dropping:
                log.warning("%s: the writer is stopped: items put after it are dropped",
                            self._what)
            self._dropping += 1
            if self._on_dropped is not None:
                self._on_dropped(1)
            return
        if len(self._items) >= self.capacity:
            self._items.popleft()
            self.dropped += 1
            if not self._dropping:
                log.warning("%s: %d wait to be written, as many as are kept: the oldest are "
                            "dropped until the store takes them again", self._what,
                            self.capacity)
            self._dropping += 1
            # The oldest goes first, carried by a write or not: that write now carries one less.
            self._lent = max(0, self._lent - 1)
            self._flight = max(0, self._flight - 1)
        self._items.append(item)
        self._drained.clear()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=self._task_name)
        self._arm()

    def _arm(self) -> None:
        """A moment for the items of the same burst to join one write (``coalesce``), as a
        timer on the loop rather than the task's own wake and sleep: a replica busy locking
        has its events carried by its steps' transactions (:meth:`lend`) within that moment,
        and the task is not woken for them at all. Before, every burst woke it twice (the
        put, then its sleep's end) and often a third time (the carrying write's end): an
        acquire + release pair on etcd took 5.9 turns of the event loop, now 4.3."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.coalesce, self._due)

    def _due(self) -> None:
        self._timer = None
        # Items the task is writing have their moment again once it is done (``_run``), and
        # those another write carries are the task's again only if it fails (``repaid``).
        if not self._writing and len(self._items) > self._lent:
            self._pending.set()

    async def _run(self) -> None:
        backoff = RETRY_FIRST
        while True:
            await self._pending.wait()  # (after the burst's moment: ``_arm``)
            self._pending.clear()
            while self._items:
                if self._lent:  # another write carries the oldest: see what became of them
                    await self._back.wait()
                    continue
                batch = list(itertools.islice(self._items, self.batch_limit))
                whole = len(batch) == len(self._items)
                self._writing, self._flight = True, len(batch)
                try:
                    await self._write(batch)
                except Exception as error:
                    if isinstance(error, self._down):
                        log.warning("%s not written yet (%s: %s); retrying",
                                    self._what, type(error).__name__, error)
                    else:
                        log.error("%s not written: unexpected %s; retrying", self._what,
                                  type(error).__name__, exc_info=True)
                    await asyncio.sleep(backoff)
                    backoff = min(RETRY_MAX, backoff * 2)
                else:
                    backoff = RETRY_FIRST
                    for _ in range(self._flight):
                        self._items.popleft()
                    self._taken()
                    if whole and self._items:
                        # What is left came while this write was on its way: it gets its own
                        # moment too, from now (written back to back, a steady caller would
                        # pay one write per operation, not one per ``coalesce``).
                        if self._timer is not None:
                            self._timer.cancel()
                            self._timer = None
                        self._arm()
                        break
                finally:
                    self._writing, self._flight = False, 0
            if not self._items:
                self._drained.set()

    def lend(self, limit: int | None = None) -> list[T]:
        """The oldest items (up to ``limit`` and ``batch_limit``), for a write the caller
        makes now; none while the task or an earlier borrower is writing. They stay here
        until :meth:`repaid` says whether they were written."""
        if self._writing or self._lent or not self._items:
            return []
        limits = [n for n in (limit, self.batch_limit) if n is not None]
        batch = list(itertools.islice(self._items, min(limits) if limits else None))
        self._lent = len(batch)
        self._back.clear()
        return batch

    def repaid(self, *, written: bool) -> None:
        """What :meth:`lend` gave out was written (they leave), or not (they stay, in order,
        for the next write)."""
        count, self._lent = self._lent, 0
        if written:
            for _ in range(min(count, len(self._items))):
                self._items.popleft()
            self._taken()
            if not self._items:
                self._drained.set()
        if self._items:
            self._arm()  # what is left is the task's again (or the next lender's)
        self._back.set()

    def _taken(self) -> None:
        """The store took a write: an outage that dropped items is over, and said so."""
        count, self._dropping = self._dropping, 0
        if count:
            log.warning("%s: %d dropped while the store did not take them", self._what, count)
            if self._on_dropped is not None:
                self._on_dropped(count)

    async def drained(self, seconds: float) -> None:
        """Until every item put so far is written (or ``seconds`` have passed)."""
        if self._items and self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), seconds)

    async def stop(self) -> None:
        """Stop writing; what is still in the outbox stays unwritten."""
        self._stopped = True
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=2.0)
