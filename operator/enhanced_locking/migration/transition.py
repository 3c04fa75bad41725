"""Weight moves across replicas: when is the new weight the only authority?

Each replica routes by its *target* weight (the authoritative share of the enhanced side: the
configured weight, or 0 when enhanced locking is off or in shadow mode). A weight change moves
the buckets between the old and the new weight from one side to the other. Other replicas
learn of the change a little later, and requests this replica routed under the old weight may
still be running, so for a while the same key could be routed to different sides.

This module keeps the *moving band*: the buckets between the lowest and the highest weight
that may still be in use anywhere, that is this replica's target, the older targets of its
requests still running (drained, or given up on after the replica expiry), and the weights every
live replica reported. Keys in the band are taken on both sides (:mod:`.handover`); keys
outside go to their side alone (the router still checks the other side). When the band
shrinks (every live replica reported the new weight and the old requests finished), the keys
that stop moving get their fencing counters aligned and are checked for double holds, and only
then does their new side become the only authority: the move has *settled*.

A replica whose registry does not answer does not know who excluded it, so a heartbeat before
the others may exclude it, it treats every key as moving (*isolated*): taking a key on both
sides is safe whatever weight the others use. Isolation is decided from evidence about the
registry (reports that failed), never from the replica's own slowness: a replica whose rounds
ran late (a saturated event loop, a paused pod) reports and reads the registry again before it
routes the next request (:meth:`WeightTransitions.refresh`), and routes by what it reads then.
A round that found no pooled connection free in time (``StoreBusy``, the replica's overload)
did not ask the registry at all: it is no such evidence either.
A replica starts isolated until its first report. Entering and leaving isolation is said in
the status (phase ``isolated``), a ``routing-changed`` event, the
``enhanced_locking_replica_isolated`` metric and a log line.

Driving it: the provider tells :meth:`WeightTransitions.on_snapshot` of each new config;
:meth:`tick` reports and reads the registry (the service runs :meth:`run`, which ticks every
heartbeat, faster while moving). :meth:`status` is the state for a LockMigration status, and
``routing-changed`` events mark a move starting, a replica being excluded and a move settling.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import Bus
from enhanced_locking.hashing import bucket_of, is_enhanced_bucket
from enhanced_locking.metrics import Metrics
from enhanced_locking.migration.routing_registry import RoutingRegistry, RoutingView
from enhanced_locking.provider import Snapshot
from enhanced_locking.types import Side, StoreBusy, utcnow

__all__ = [
    "Band",
    "ReplicaState",
    "RoutingPlan",
    "TransitionStatus",
    "WeightTransitions",
    "authority_weight",
]

log = logging.getLogger(__name__)

MOVING_POLL = 0.05
"""Seconds between registry reads while a move is under way (a heartbeat otherwise)."""

Settle = Callable[[Callable[[int], bool], float], Awaitable[object]]
"""Called with the buckets that stop moving and the target weight, before they do."""


def authority_weight(config: EnhancedLockingConfig) -> float:
    """The percent of keys the enhanced side decides: 0 when disabled or in shadow mode."""
    return config.routed_weight


def authority_isolation(config: EnhancedLockingConfig) -> float:
    """Seconds without a successful report after which a replica treats every key as moving:
    a heartbeat before the others may exclude it (``replica-timeout``)."""
    expiry, heartbeat = config.replica_expiry, config.replica_heartbeat
    return max(expiry - heartbeat, heartbeat).total_seconds()


def _edge(weight: float) -> int:
    return round(weight * 100)


@dataclass(frozen=True)
class Band:
    """The buckets ``lo <= b < hi`` that may be routed differently by different replicas."""

    lo: int = 0
    hi: int = 0

    @classmethod
    def of(cls, weights: set[float]) -> Band:
        edges = [_edge(w) for w in weights]
        return cls(min(edges), max(edges)) if edges else cls()

    @property
    def moving(self) -> bool:
        return self.lo < self.hi

    def __contains__(self, bucket: int) -> bool:
        return self.lo <= bucket < self.hi

    def hull(self, other: Band) -> Band:
        if not other.moving:
            return self
        if not self.moving:
            return other
        return Band(min(self.lo, other.lo), max(self.hi, other.hi))

    def leaving(self, after: Band) -> Callable[[int], bool]:
        """The buckets in this band that are not in ``after``."""
        return lambda bucket: bucket in self and bucket not in after


@dataclass(frozen=True)
class RoutingPlan:
    """How one acquire is served: on its target ``side``, and first on the other if ``both``."""

    side: Side
    both: bool

    @property
    def other(self) -> Side:
        return "legacy" if self.side == "enhanced" else "enhanced"


_PLANS = {(enhanced, both): RoutingPlan("enhanced" if enhanced else "legacy", both)
          for enhanced in (False, True) for both in (False, True)}

_bucket = functools.lru_cache(maxsize=1 << 16)(bucket_of)
"""Buckets of recently seen keys: an install has a bounded set of projects, asked for often."""


class Admission:
    """One acquire counted as running under the routing round it was planned in."""

    __slots__ = ("_owner", "_round", "plan")

    def __init__(self, owner: WeightTransitions, routing_round: int, plan: RoutingPlan) -> None:
        self._owner, self._round, self.plan = owner, routing_round, plan

    def __enter__(self) -> RoutingPlan:
        return self.plan

    def __exit__(self, *exc: object) -> None:
        self._owner._finished(self._round)


Phase = Literal["stable", "moving", "isolated"]


@dataclass(frozen=True)
class ReplicaState:
    """One replica as this one sees it in the registry."""

    id: str
    weight: float
    generation: int
    state: Literal["self", "live", "excluded"]
    silent_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "weight": self.weight, "generation": self.generation,
                "state": self.state, "silentSeconds": self.silent_seconds}


@dataclass(frozen=True)
class TransitionStatus:
    """What a LockMigration status shows about routing on this replica."""

    replica_id: str
    phase: Phase
    weight: float
    """The target: the share of keys the enhanced side decides once settled."""
    from_weights: tuple[float, ...]
    """Other weights still in use somewhere (this replica's older requests, other replicas)."""
    generation: int
    moving_buckets: tuple[int, int]
    started_at: datetime | None
    pending: tuple[str, ...]
    """Live replicas (this one included) that have not reported the target weight yet."""
    excluded: tuple[str, ...]
    """Replicas left out because they stopped reporting."""
    replicas: tuple[ReplicaState, ...]
    last_settle_seconds: float | None
    last_error: str | None

    @property
    def settled(self) -> bool:
        return self.phase == "stable"

    def as_dict(self) -> dict[str, Any]:
        return {
            "replicaId": self.replica_id,
            "phase": self.phase,
            "weight": self.weight,
            "from": list(self.from_weights),
            "generation": self.generation,
            "movingBuckets": (list(self.moving_buckets)
                              if self.moving_buckets[0] < self.moving_buckets[1] else None),
            "startedAt": self.started_at.isoformat() if self.started_at else None,
            "pendingReplicas": list(self.pending),
            "excludedReplicas": list(self.excluded),
            "replicas": [replica.as_dict() for replica in self.replicas],
            "lastSettleSeconds": self.last_settle_seconds,
            "lastError": self.last_error,
        }


class WeightTransitions:
    """This replica's routing plan per key, and the two-phase weight moves behind it."""

    def __init__(
        self,
        *,
        replica_id: str,
        snapshot: Callable[[], Snapshot],
        registry: Callable[[], RoutingRegistry],
        events: Bus,
        metrics: Metrics,
        settle: Settle | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replica_id = replica_id
        self._snapshot = snapshot
        self._registry = registry
        self.events = events
        self.metrics = metrics
        self._settle = settle
        self._clock = clock
        current = snapshot()
        self._target = authority_weight(current.config)
        self._generation = current.generation
        self._reported = self._target
        self._round = 0
        """The routing round: one more at every change of the target weight."""
        self._older: dict[int, float] = {}  # round -> the target requests of that round used
        self._inflight: dict[int, int] = {}
        self._moved_at = clock()
        self._band = Band()
        self._view = RoutingView(0.0)
        self._live: set[str] = set()
        self._last_ok: float | None = None
        self._isolated = True  # until the first report: see the module docstring
        self._isolate_after = authority_isolation(current.config)
        self._registry_failing = False
        self._busy: StoreBusy | None = None
        """The last round's overload (``StoreBusy``: it found no pooled connection free)."""
        self._started: float | None = None
        self._started_at: datetime | None = None
        self._last_settle: float | None = None
        self._last_error: str | None = None
        self._tick_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()
        self._settled.set()

    # --- the request path ----------------------------------------------------------------
    @property
    def target(self) -> float:
        return self._target

    def plan(self, key: str) -> RoutingPlan:
        bucket = _bucket(key)
        enhanced = is_enhanced_bucket(bucket, self._target)
        return _PLANS[enhanced, self._isolated or bucket in self._band]

    @property
    def isolated(self) -> bool:
        """The registry did not take this replica's reports for too long: the others may have
        excluded it, so every key is taken on both sides."""
        return self._isolated

    @property
    def stale(self) -> bool:
        """No round has reported and read the registry for longer than the others wait: the
        view may be behind theirs (see :meth:`refresh`)."""
        return self._last_ok is None or self._clock() - self._last_ok > self._isolate_after

    async def refresh(self) -> None:
        """Before routing: if the rounds ran late, report and read the registry now.

        A late round is this replica's own slowness, not evidence that the others excluded it:
        a fresh report and read says where the others are (their weights widen the moving band
        if they moved meanwhile). Only a registry that does not answer isolates the replica.
        Requests arriving together share one round; an isolated replica already takes every
        key on both sides, and its own rounds tell when it may rejoin.

        A round that found no pooled connection free (``StoreBusy``) asked nothing: no
        isolation, but once the last report is older than the replica expiry the others may
        have left this replica out and moved on, so the request is not routed on that view:
        the ``StoreBusy`` is raised (503 ``overloaded``, nothing done for it)."""
        if self._isolated or not self.stale:
            return
        async with self._tick_lock:
            pass  # a round already under way answers for this request too
        if self.stale:
            await self.tick()
        busy, last_ok = self._busy, self._last_ok
        if busy is not None and last_ok is not None and (
                self._clock() - last_ok > self._snapshot().config.replica_expiry.total_seconds()):
            raise StoreBusy(str(busy))

    def admit(self, key: str) -> Admission:
        """Plan one acquire and count it as running until it returns (moves wait for it):
        ``with transitions.admit(key) as plan: ...``."""
        plan = self.plan(key)
        routing_round = self._round
        self._inflight[routing_round] = self._inflight.get(routing_round, 0) + 1
        return Admission(self, routing_round, plan)

    def _finished(self, routing_round: int) -> None:
        left = self._inflight[routing_round] - 1
        if left:
            self._inflight[routing_round] = left
            return
        del self._inflight[routing_round]
        if routing_round in self._older:
            self._wake.set()

    # --- config changes ------------------------------------------------------------------
    def on_snapshot(self, snapshot: Snapshot) -> None:
        """A new config took effect: route by its weight now, keep the old one moving."""
        self._generation = snapshot.generation
        target = authority_weight(snapshot.config)
        if target == self._target:
            return
        previous = self._target
        self._older[self._round] = previous
        self._round += 1
        self._target = target
        self._moved_at = self._clock()
        self._widen()
        moved: dict[str, Any] = {"from": previous, "to": target}
        self.events.publish("routing-changed", phase="moving", replica=self.replica_id,
                            generation=snapshot.generation, **moved)
        log.info("routing weight %s -> %s (generation %d)", previous, target,
                 snapshot.generation)
        self._wake.set()

    def _in_play(self) -> set[float]:
        expiry = self._snapshot().config.replica_expiry
        others = {r.weight for r in self._view.live(expiry) if r.replica_id != self.replica_id}
        return {self._target, *self._older.values(), *others}

    def _widen(self) -> None:
        band = self._band.hull(Band.of(self._in_play()))
        if band == self._band:
            return
        if not self._band.moving:
            self._started, self._started_at = self._clock(), utcnow()
            self._settled.clear()
        self._band = band

    # --- the registry --------------------------------------------------------------------
    async def tick(self) -> TransitionStatus:
        """Report, read the registry, and settle what stopped moving. Never raises."""
        async with self._tick_lock:
            config = self._snapshot().config
            expiry = config.replica_expiry
            now = self._clock()
            self._drain(now, expiry.total_seconds())
            reported = self._reported if self._older else self._target
            starting = self._last_ok is None
            try:
                registry = self._registry()
                await registry.report(replica_id=self.replica_id, weight=reported,
                                      generation=self._generation)
                view = await registry.read(expiry=expiry)
            except StoreBusy as error:
                # The replica's own overload (no pooled connection free in time): the registry
                # was not asked, so this is no evidence that it refuses the reports, and no
                # isolation; the view stays as old as it is (see refresh).
                self._busy = error
                self._fail(f"replica registry: {error}")
            except Exception as error:
                self._busy = None
                self._registry_failing = True
                self._fail(f"replica registry: {error}")
            else:
                self._busy = None
                self._reported, self._last_ok, self._view = reported, now, view
                self._registry_failing = False
                self._last_error = None
                self._note_exclusions(view, expiry.total_seconds())
            self._isolate_after = authority_isolation(config)
            was = self._isolated
            # Evidence about the registry only: it refuses the report, and the last one it
            # took is older than the others wait. A late round that succeeds is no isolation,
            # however late it ran.
            self._isolated = self._last_ok is None or (
                self._registry_failing and now - self._last_ok > self._isolate_after)
            if was != self._isolated and not (starting and not self._isolated):
                log.warning("replica %s %s", self.replica_id,
                            f"cannot report to the replica registry ({self._last_error}): "
                            "taking every key on both sides" if self._isolated
                            else "reports to the replica registry again: routing by weight")
                if self._isolated:
                    self.events.publish("routing-changed", replica=self.replica_id,
                                        phase="isolated", error=self._last_error)
                else:
                    self.events.publish("routing-changed", replica=self.replica_id,
                                        phase="rejoined")
            self.metrics.replica_isolated.set(1 if self._isolated else 0)
            self._widen()
            await self._narrow()
            self._update_metrics(expiry.total_seconds())
            return self.status()

    def _drain(self, now: float, expiry: float) -> None:
        if not self._older:
            return
        running = sum(self._inflight.get(e, 0) for e in self._older)
        if running and now - self._moved_at <= expiry:
            return
        if running:
            log.warning("reporting weight %s while %d older requests still run", self._target,
                        running)
        self._older.clear()

    def _fail(self, message: str) -> None:
        if message != self._last_error:
            log.warning("%s", message)
        self._last_error = message

    def _note_exclusions(self, view: RoutingView, expiry: float) -> None:
        live = {r.replica_id for r in view.reports if view.age(r) <= expiry}
        for report in view.reports:
            if report.replica_id in self._live and report.replica_id not in live:
                log.warning("replica %s excluded: no report for %.1fs", report.replica_id,
                            view.age(report))
                self.events.publish("routing-changed", phase="replica-excluded",
                                    replica=report.replica_id,
                                    silentSeconds=round(view.age(report), 3))
        self._live = live

    async def _narrow(self) -> None:
        wanted = Band.of(self._in_play())
        if wanted == self._band or not self._band.moving:
            return
        if self._view.may_miss(self._snapshot().config.replica_expiry):
            return  # a live replica's weight may be missing from the registry: keep it moving
        if self._settle is not None:
            try:
                await self._settle(self._band.leaving(wanted), self._target)
            except Exception as error:
                self._fail(f"settling the weight move: {error}")
                return
        # A config change during the await only ever widens: keep what it added.
        self._band = wanted.hull(Band.of(self._in_play()))
        if not self._band.moving:
            elapsed = self._clock() - (self._started or self._clock())
            self._last_settle = elapsed
            self.metrics.routing_transition_seconds.observe(elapsed)
            self._started, self._started_at = None, None
            self._settled.set()
            self.events.publish("routing-changed", phase="settled", replica=self.replica_id,
                                weight=self._target, seconds=round(elapsed, 3))
            log.info("routing weight %s settled on every live replica in %.3fs",
                     self._target, elapsed)

    def _update_metrics(self, expiry: float) -> None:
        view = self._view
        live = [r for r in view.reports if view.age(r) <= expiry]
        self.metrics.replicas.labels("live").set(len(live))
        self.metrics.replicas.labels("excluded").set(len(view.reports) - len(live))
        self.metrics.replicas.labels("pending").set(len(self.status().pending))

    # --- running and observing -----------------------------------------------------------
    async def run(self) -> None:
        """Tick every heartbeat (every ``MOVING_POLL`` while moving) until cancelled."""
        while True:
            self._wake.clear()
            await self.tick()
            heartbeat = self._snapshot().config.replica_heartbeat.total_seconds()
            busy = (self._band.moving or self._older) and self._last_error is None
            interval = min(heartbeat, MOVING_POLL) if busy else heartbeat
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)

    async def wait_settled(self) -> TransitionStatus:
        """Until the target weight is the only authority (bound it with ``asyncio.timeout``)."""
        await self._settled.wait()
        return self.status()

    async def leave(self) -> None:
        """Tell the registry this replica is gone (a clean shutdown)."""
        with contextlib.suppress(Exception):
            await self._registry().leave(self.replica_id)

    def status(self) -> TransitionStatus:
        expiry = self._snapshot().config.replica_expiry.total_seconds()
        view = self._view
        replicas: list[ReplicaState] = []
        pending: list[str] = []
        excluded: list[str] = []
        if self._older or self._reported != self._target:
            pending.append(self.replica_id)
        for report in view.reports:
            if report.replica_id == self.replica_id:
                continue
            age = view.age(report)
            live = age <= expiry
            if not live:
                excluded.append(report.replica_id)
            elif report.weight != self._target:
                pending.append(report.replica_id)
            replicas.append(ReplicaState(report.replica_id, report.weight, report.generation,
                                         "live" if live else "excluded", round(age, 3)))
        replicas.insert(0, ReplicaState(self.replica_id, self._reported, self._generation,
                                        "self", 0.0))
        phase: Phase = ("isolated" if self.isolated
                        else "moving" if self._band.moving else "stable")
        return TransitionStatus(
            replica_id=self.replica_id,
            phase=phase,
            weight=self._target,
            from_weights=tuple(sorted(self._in_play() - {self._target})),
            generation=self._generation,
            moving_buckets=(self._band.lo, self._band.hi),
            started_at=self._started_at,
            pending=tuple(sorted(pending)),
            excluded=tuple(sorted(excluded)),
            replicas=tuple(replicas),
            last_settle_seconds=self._last_settle,
            last_error=self._last_error,
        )
