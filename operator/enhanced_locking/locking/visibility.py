"""Visible waiting: where a waiter stands, who blocks it, and how long it may take.

Every waiter can see its position in the key's service order, the holders of the key and the
waiters ahead of it (who blocks it), and an estimate of its wait made from the key's recent
hold times. The estimate is this replica's: each replica remembers the hold times of the
releases it saw (the last :data:`HISTORY` per key), which is every release on a single
process and a sample of them across replicas.

This module also watches the rules: when they change, or when a freeze starts or ends, every
queue is served again (a waiter held back by a rule that is gone is granted in queue order)
and a freeze's start and end are published as events.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import statistics
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from enhanced_locking import policies
from enhanced_locking.backends.waiting import Waiter
from enhanced_locking.types import BackendUnavailable, Lock, utcnow

if TYPE_CHECKING:
    from enhanced_locking.locking.enhanced import EnhancedLocker

__all__ = ["AHEAD_SHOWN", "HISTORY", "WAKE_AGAIN", "HoldTimes", "RuleWatch", "WaitView",
           "wait_for_reader", "wait_repos"]

log = logging.getLogger(__name__)

HISTORY = 20
"""Hold times remembered per key."""

AHEAD_SHOWN = 20
"""Most waiters ahead a ``queued`` event lists (the first in line: those served next);
``aheadCount`` says how many are ahead in all. Listing all of them made each enqueue read and
send the whole queue, O(n) a request and O(n²) for a flood of them."""

WAKE_AGAIN = (0.5, 30.0)
"""Seconds before a wake of the queues that the store did not answer (:meth:`RuleWatch._wake`)
is made again: the first pause, doubled after each wake that fails, up to the second."""


class HoldTimes:
    """Recent hold times per key (and over every key, for a key with no history yet)."""

    def __init__(self) -> None:
        self._by_key: dict[str, collections.deque[float]] = {}
        self._all: collections.deque[float] = collections.deque(maxlen=200)

    def record(self, key: str, seconds: float) -> None:
        """``key`` was held for ``seconds``."""
        seconds = max(0.0, seconds)
        recent = self._by_key.get(key)
        if recent is None:
            if len(self._by_key) > 10_000:
                self._by_key.pop(next(iter(self._by_key)))
            recent = self._by_key[key] = collections.deque(maxlen=HISTORY)
        recent.append(seconds)
        self._all.append(seconds)

    def typical(self, key: str) -> float | None:
        """The median recent hold time of ``key`` (else of every key), in seconds."""
        recent = self._by_key.get(key) or self._all
        return statistics.median(recent) if recent else None


def _owner(lock_or_waiter: Lock | Waiter) -> str:
    repo, pull = (lock_or_waiter.owner if isinstance(lock_or_waiter, Waiter)
                  else (lock_or_waiter.project.repo_full_name, lock_or_waiter.pull.num))
    return f"{repo}#{pull}"


@dataclass(frozen=True, kw_only=True)
class WaitView:
    """One waiter's view of its key."""

    key: str
    position: int
    waiter: Waiter
    holders: tuple[Lock, ...]
    ahead: tuple[Waiter, ...]
    """The waiters ahead of it, in service order: all of them, or the first of them (a
    ``queued`` event's: :data:`AHEAD_SHOWN`)."""
    ahead_count: int
    """How many waiters are ahead of it in all."""
    estimate: timedelta | None
    """When it may expect the lock: what is left of the holders' typical hold, plus a typical
    hold per exclusive waiter ahead (shared ones ahead go together), and one per waiter ahead
    that ``ahead`` leaves out; ``None`` with no history."""

    @classmethod
    def build(cls, *, key: str, position: int, waiter: Waiter, ahead: Sequence[Waiter],
              holders: Sequence[Lock], holds: HoldTimes, now: datetime,
              ahead_count: int | None = None) -> WaitView:
        """``ahead_count``: how many are ahead in all, when ``ahead`` is the first of them."""
        count = len(ahead) if ahead_count is None else max(ahead_count, len(ahead))
        typical = holds.typical(key)
        estimate = None
        if typical is not None:
            left = max((max(0.0, typical - (now - h.acquired_at).total_seconds())
                        for h in holders), default=0.0)
            turns = sum(1 for w in ahead if w.mode == "exclusive")
            if any(w.mode == "shared" for w in ahead):
                turns += 1
            turns += count - len(ahead)
            estimate = timedelta(seconds=left + turns * typical)
        return cls(key=key, position=position, waiter=waiter, holders=tuple(holders),
                   ahead=tuple(ahead), ahead_count=count, estimate=estimate)

    def details(self) -> dict[str, Any]:
        """The view as JSON-ready data (events and the API use the same names)."""
        return {
            "position": self.position,
            "holders": [{"owner": _owner(h), "repo": h.project.repo_full_name,
                         "pull": h.pull.num, "mode": h.mode,
                         "since": h.acquired_at.isoformat().replace("+00:00", "Z")}
                        for h in self.holders],
            "ahead": [{"id": w.id, "requestId": w.request_id, "owner": _owner(w),
                       "repo": w.owner[0], "pull": w.owner[1], "mode": w.mode,
                       "priority": w.priority.value} for w in self.ahead],
            "aheadCount": self.ahead_count,
            "estimateSeconds": (round(self.estimate.total_seconds(), 3)
                                if self.estimate is not None else None),
        }


_HIDDEN_OWNER = {"owner": "(other repository)", "repo": None, "pull": None}
"""What an owner of a repository the reader may not read becomes in a wait's view (its
request's ids too, for a waiter ahead)."""


def wait_repos(details: dict[str, Any]) -> set[str | None]:
    """The repositories a ``queued`` event's holders and waiters ahead are of (``None`` for
    one that does not say: an event from before they were data of their own)."""
    return {item.get("repo") for part in ("holders", "ahead")
            for item in details.get(part) or ()}


def wait_for_reader(details: dict[str, Any], readable: Collection[str | None]
                    ) -> dict[str, Any]:
    """A ``queued`` event's details as a reader who may read only the repositories in
    ``readable`` gets them: a holder or a waiter ahead of another repository (projects of two
    repositories can join to the same keys) is ``(other repository)`` with no repository,
    pull or request ids, and ``hiddenOwners`` counts those owners. ``details`` itself when
    nothing is left out."""
    hidden: set[tuple[Any, Any]] = set()

    def shown(item: dict[str, Any], ids: tuple[str, ...]) -> dict[str, Any]:
        repo = item.get("repo")
        if repo in readable:
            return item
        hidden.add((repo, item.get("pull") if repo is not None else item.get("owner")))
        return {**item, **_HIDDEN_OWNER, **dict.fromkeys(ids)}

    holders = [shown(item, ()) for item in details.get("holders") or ()]
    ahead = [shown(item, ("id", "requestId")) for item in details.get("ahead") or ()]
    if not hidden:
        return details
    return {**details, "holders": holders, "ahead": ahead, "hiddenOwners": len(hidden)}


class RuleWatch:
    """Serves the queues again when the rules change and when a freeze starts or ends.

    A freeze's edges are timed by the store's clock (``now()``: on Redis the server's
    ``TIME``), which is what the store decides a freeze by, not by this process's: a store
    whose clock is behind the service's would be woken while the freeze was still on for it,
    and its waiters left for the next look, an hour later."""

    def __init__(self, locker: EnhancedLocker) -> None:
        self._locker = locker
        self._rules = policies.PolicyRules()
        self._timer: asyncio.TimerHandle | None = None
        self._looking = 0
        """Looks at the rules under way (each reads the store's clock first)."""
        self._active: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wakes = 0
        """Wakes begun: a wake made again gives way to a later one (it reads newer rules)."""
        self._clock_fault: str | None = None
        """The fault the last clock read logged (said once until a read answers)."""

    def changed(self, rules: policies.PolicyRules) -> None:
        """The config's rules now (called on every applied snapshot; cheap when unchanged)."""
        if rules == self._rules and (self._timer is not None or self._looking):
            return
        first = self._timer is None and not self._looking and not self._rules
        self._rules = rules
        self._edge(wake=not first)

    def _edge(self, *, wake: bool = True) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._looking += 1
        task = asyncio.get_running_loop().create_task(self._look(wake=wake))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _look(self, *, wake: bool) -> None:
        """The freezes started and ended told, the timer set for the next edge, the queues
        served (``wake``), all by the store's clock (this process's while the store is away:
        its queues cannot be served then anyway). Any other failure to read the clock (a fault
        of the code) is logged once as an error, until a read answers, and the look goes by
        this process's clock too."""
        try:
            try:
                now = await self._locker.backend.now()
            except BackendUnavailable as error:  # the store is away: time goes on all the same
                log.warning("reading the store's clock for the freezes failed (%s); "
                            "going by this process's", error)
                now = utcnow()
            except Exception as error:
                said = f"{type(error).__name__}: {error}"
                if said != self._clock_fault:
                    self._clock_fault = said
                    log.error("reading the store's clock for the freezes failed (not an "
                              "unanswered store; said once until a read answers): %s; going "
                              "by this process's", said, exc_info=error)
                now = utcnow()
            else:
                self._clock_fault = None
        finally:
            self._looking -= 1
        active = {f.name for f in self._rules.freezes if f.active(now)}
        by_name = {f.name: f for f in self._rules.freezes}
        for name in sorted(active - self._active):
            freeze = by_name[name]
            self._locker.events.publish("freeze-started", freeze=name, message=freeze.message,
                                        action=freeze.action)
        for name in sorted(self._active - active):
            self._locker.events.publish("freeze-ended", freeze=name)
        self._active = active
        if self._timer is not None:  # another look's, set while this one read the clock
            self._timer.cancel()
        edges = policies.freeze_edges(self._rules, now)
        # The timer runs on this process's clock, which ticks as the store's does: the edge is
        # as far ahead on both. Nothing due: look again later.
        delay = max(0.0, (edges[0] - now).total_seconds()) + 0.002 if edges else 3600.0
        self._timer = asyncio.get_running_loop().call_later(delay, self._edge)
        if wake:
            await self._wake()

    async def _wake(self) -> None:
        """Serve the queues under the rules now, and refuse what they can never grant (a
        batch over a limit lowered since it queued: :meth:`EnhancedLocker.wake`). A store that
        does not answer is woken again after :data:`WAKE_AGAIN`'s growing pauses until it
        answers, or a later wake (later rules) takes over: a refusal the new rules make is
        not lost with the store's answer, nor left to the waiter's own wait.

        Only a store that did not answer (``BackendUnavailable``) is woken again: any other
        failure (a fault of the code, a store's answer that cannot be read) would fail the
        same way every time. It is logged once, as an error with what failed, and the watch
        goes on under the rules in force (the next rule change or freeze edge wakes the
        queues again)."""
        self._wakes += 1
        mine = self._wakes
        pause = WAKE_AGAIN[0]
        while True:
            try:
                await self._locker.wake()
                return
            except BackendUnavailable as error:  # the store is away: wake it again later
                log.warning("serving the queues after a rule change failed (made again in "
                            "%gs): %s", pause, error)
            except Exception as error:
                log.error("serving the queues after a rule change failed, not made again "
                          "(not an unanswered store: it would fail again): %s: %s",
                          type(error).__name__, error, exc_info=error)
                return
            await asyncio.sleep(pause)
            if self._wakes != mine:
                return  # a later wake serves the queues under the rules now
            pause = min(pause * 2, WAKE_AGAIN[1])

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:  # every one first: a look that ran on would set a timer again
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._timer is not None:
            self._timer.cancel()
