"""Which replicas are serving, and which routing each of them has applied.

A weight move is safe across replicas only once every replica routes by the new weight. Each
replica reports, every heartbeat, the routing weight it has applied (once the requests it
routed under an older weight have finished) and its config generation. The registry keeps the
newest report of each replica with the time it arrived. A replica whose last report is older
than the expiry (``replica-timeout``, three heartbeats by default) is *excluded*: nobody waits
for it any more, so a crashed pod never holds a rollout forever.

This is the *routing* registry (the "replica registry" of statuses, events and logs). The Redis
store keeps another record of replicas, for another purpose: its waiter liveness set
(``{key-prefix}{namespace}:replicas``, :mod:`enhanced_locking.backends.redis_notify`), which says
whose queued waiters may still be granted. Both know a replica by the same id, the service's
``replica-id`` (one per process); each has its own beat: ``replica-heartbeat`` here, one second
there.

Two registries behind one small interface:

* :class:`MemoryRoutingRegistry`: in process. One replica, or several replicas living in one
  process (tests, benchmarks); its clock can be replaced.
* :class:`RedisRoutingRegistry`: one hash ``{key-prefix}replicas`` of replica id to report, on
  the enhanced backend's Redis. A report's time is the Redis server's ``TIME`` and every read
  returns the server's clock with the reports, so replicas' own clocks never matter. Reports
  silent for ten expiries are pruned by the readers. Another Redis type at its key (written
  over by something else) is replaced by the next report, which carries the moment; a report
  that does not read is left out of the view until its replica writes it again.

Either way a live replica's weight may be missing for a while: a view says when the registry
last lost a report (:meth:`RoutingView.may_miss`), and no move settles on it until every live
replica has had an expiry to report again.

Weights are compared, not generations: each replica's provider numbers its own generations,
so the same LockMigration change is generation 7 on one pod and 3 on another. The generation
is reported for people reading the status.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol, runtime_checkable

from enhanced_locking.backends import redis_lua
from enhanced_locking.backends.redis_connection import RedisConnection, unavailable
from enhanced_locking.types import BackendUnavailable

__all__ = [
    "MemoryRoutingRegistry",
    "RedisRoutingRegistry",
    "RoutingRegistry",
    "RoutingReport",
    "RoutingView",
]

log = logging.getLogger(__name__)

PRUNE_EXPIRIES = 10
"""Reports older than this many expiries are deleted (they are only kept to show who left)."""


@dataclass(frozen=True)
class RoutingReport:
    """The last thing one replica said: the weight it routes by, its generation, and when."""

    replica_id: str
    weight: float
    generation: int
    seen: float
    """When the report arrived, in seconds on the registry's clock."""


@dataclass(frozen=True)
class RoutingView:
    """Every report the registry holds, read at one instant of the registry's clock."""

    now: float
    reports: tuple[RoutingReport, ...] = ()
    lost: float | None = None
    """When the registry last lost a report, on its clock: it was replaced (written over by
    something else), or a report in it does not read (its time)."""

    def may_miss(self, expiry: timedelta) -> bool:
        """Whether a live replica's report may be missing: the registry lost one less than an
        expiry ago (every live replica reports again within an expiry). A time ahead of the
        registry's clock was not written by it (garbage in a report): it does not count."""
        return self.lost is not None and 0 <= self.now - self.lost <= expiry.total_seconds()

    def age(self, report: RoutingReport) -> float:
        return max(0.0, self.now - report.seen)

    def live(self, expiry: timedelta) -> list[RoutingReport]:
        return [r for r in self.reports if self.age(r) <= expiry.total_seconds()]

    def excluded(self, expiry: timedelta) -> list[RoutingReport]:
        return [r for r in self.reports if self.age(r) > expiry.total_seconds()]


@runtime_checkable
class RoutingRegistry(Protocol):
    """Where replicas say which routing they apply. Failures raise ``BackendUnavailable``."""

    async def report(self, *, replica_id: str, weight: float, generation: int) -> None:
        """Record (or refresh) this replica's report, stamped with the registry's clock."""
        ...

    async def read(self, *, expiry: timedelta) -> RoutingView:
        """Every report, with the registry's clock (pruning those long gone)."""
        ...

    async def leave(self, replica_id: str) -> None:
        """Forget a replica that shuts down cleanly (so nobody waits out its expiry)."""
        ...


@dataclass
class MemoryRoutingRegistry:
    """Reports in a dict; share one instance between the replicas of one process."""

    clock: Callable[[], float] = time.monotonic
    _reports: dict[str, RoutingReport] = field(default_factory=dict)

    async def report(self, *, replica_id: str, weight: float, generation: int) -> None:
        self._reports[replica_id] = RoutingReport(replica_id, weight, generation, self.clock())

    async def read(self, *, expiry: timedelta) -> RoutingView:
        now = self.clock()
        horizon = PRUNE_EXPIRIES * expiry.total_seconds()
        for replica_id, report in list(self._reports.items()):
            if now - report.seen > horizon:
                del self._reports[replica_id]
        return RoutingView(now, tuple(sorted(self._reports.values(),
                                             key=lambda r: r.replica_id)))

    async def leave(self, replica_id: str) -> None:
        self._reports.pop(replica_id, None)


REPORT = redis_lua.standalone("routing_report")
"""Store one replica's report, stamped with the server's clock
(``lua/standalone/routing_report.lua``)."""

READ = redis_lua.standalone("routing_read")
"""Every report kept, with the server's clock, pruning those long gone
(``lua/standalone/routing_read.lua``)."""


class RedisRoutingRegistry:
    """Reports in one Redis hash, timed by the Redis server's clock."""

    def __init__(self, connection: RedisConnection, *, prefix: str) -> None:
        self.connection = connection
        self.key = f"{prefix}replicas"
        client = connection.client
        self._report = client.register_script(REPORT)
        self._read = client.register_script(READ)
        self._replaced: int | None = None
        """When this replica last replaced the registry (server ms): its reports say so."""
        self._unreadable: dict[str, str] = {}
        """By replica id: the time of its report last found not to read (logged once)."""

    def __repr__(self) -> str:
        return f"RedisRoutingRegistry({self.connection.where}, key={self.key!r})"

    async def report(self, *, replica_id: str, weight: float, generation: int) -> None:
        report: dict[str, Any] = {"weight": weight, "generation": generation}
        if self._replaced is not None:
            report["replaced"] = self._replaced
        body = json.dumps(report, separators=(",", ":"))
        async with unavailable(self.connection, "replica report"):
            now, kind = await self._report(keys=[self.key], args=[replica_id, body])
        if kind:
            self._replaced = int(now)
            log.warning("the replica registry %s was not a hash (Redis type %s; written over "
                        "by something else?): replaced, with this replica's report; no move "
                        "settles until every replica has had its time to report again",
                        self.key, kind)

    async def read(self, *, expiry: timedelta) -> RoutingView:
        prune_ms = int(PRUNE_EXPIRIES * expiry.total_seconds() * 1000)
        async with unavailable(self.connection, "replica read"):
            answer: list[Any] = await self._read(keys=[self.key], args=[prune_ms])
        now = int(answer[0]) / 1000
        if answer[1]:
            raise BackendUnavailable(
                f"the replica registry {self.key} is not a hash (Redis type "
                f"{answer[1]}; written over by something else?): the next report "
                "replaces it")
        reports, lost = [], None
        for replica_id, value in zip(answer[2::2], answer[3::2], strict=True):
            replica_id = str(replica_id)
            seen, _, body = str(value).partition(" ")  # the script kept "<digits> ..." only
            try:
                data = json.loads(body)
                report = RoutingReport(replica_id, float(data["weight"]),
                                       int(data["generation"]), int(seen) / 1000)
                replaced = data.get("replaced")
                stamp = None if replaced is None else int(replaced) / 1000
            except (ValueError, TypeError, KeyError, AttributeError):
                # Not a report we wrote: its replica's next report writes over it.
                stamp = int(seen) / 1000
                if self._unreadable.get(replica_id) != seen:
                    self._unreadable[replica_id] = seen
                    log.warning("the report of replica %s in the replica registry %s does not "
                                "read (written over by something else?): left out until that "
                                "replica reports again", replica_id, self.key)
            else:
                reports.append(report)
            if stamp is not None and (lost is None or stamp > lost):
                lost = stamp
        return RoutingView(now, tuple(sorted(reports, key=lambda r: r.replica_id)), lost)

    async def leave(self, replica_id: str) -> None:
        async with unavailable(self.connection, "replica leave"):
            await self.connection.client.hdel(self.key, replica_id)
