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
  silent for ten expiries are pruned by the readers.

Weights are compared, not generations: each replica's provider numbers its own generations,
so the same LockMigration change is generation 7 on one pod and 3 on another. The generation
is reported for people reading the status.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol, runtime_checkable

from enhanced_locking.backends.redis_connection import RedisConnection, unavailable

__all__ = [
    "MemoryRoutingRegistry",
    "RedisRoutingRegistry",
    "RoutingRegistry",
    "RoutingReport",
    "RoutingView",
]

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


# -- KEYS[1] the replicas hash
# -- ARGV[1] replica id, ARGV[2] the report (JSON, without its time)
# -- stores "<server ms> <report>" under the id; returns the server time in ms
REPORT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], now .. ' ' .. ARGV[2])
return now
"""

# -- KEYS[1] the replicas hash
# -- ARGV[1] prune age in ms: reports older than this are deleted
# -- returns {server ms, id1, value1, id2, value2, ...} for the reports kept
READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
local out = {now}
for i = 1, #all, 2 do
  local seen = tonumber(string.match(all[i + 1], '^(%d+) '))
  if seen == nil or now - seen > tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], all[i])
  else
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
return out
"""


class RedisRoutingRegistry:
    """Reports in one Redis hash, timed by the Redis server's clock."""

    def __init__(self, connection: RedisConnection, *, prefix: str) -> None:
        self.connection = connection
        self.key = f"{prefix}replicas"
        client = connection.client
        self._report = client.register_script(REPORT)
        self._read = client.register_script(READ)

    def __repr__(self) -> str:
        return f"RedisRoutingRegistry({self.connection.where}, key={self.key!r})"

    async def report(self, *, replica_id: str, weight: float, generation: int) -> None:
        body = json.dumps({"weight": weight, "generation": generation}, separators=(",", ":"))
        with unavailable(self.connection, "replica report"):
            await self._report(keys=[self.key], args=[replica_id, body])

    async def read(self, *, expiry: timedelta) -> RoutingView:
        prune_ms = int(PRUNE_EXPIRIES * expiry.total_seconds() * 1000)
        with unavailable(self.connection, "replica read"):
            answer: list[Any] = await self._read(keys=[self.key], args=[prune_ms])
        now = int(answer[0]) / 1000
        reports = []
        for replica_id, value in zip(answer[1::2], answer[2::2], strict=True):
            seen, _, body = str(value).partition(" ")
            data = json.loads(body)
            reports.append(RoutingReport(str(replica_id), float(data["weight"]),
                                         int(data["generation"]), int(seen) / 1000))
        return RoutingView(now, tuple(sorted(reports, key=lambda r: r.replica_id)))

    async def leave(self, replica_id: str) -> None:
        with unavailable(self.connection, "replica leave"):
            await self.connection.client.hdel(self.key, replica_id)
