"""Every Prometheus metric, in one place. Names start with ``enhanced_locking_``.

A :class:`Metrics` owns its own registry, so several services (tests, benchmarks) can live in
one process without clashing on names.

The counts a LockMigration's analysis judges by (enhanced backend operations and failures,
fallbacks) are counted through :meth:`Metrics.enhanced_operation`, :meth:`Metrics.enhanced_error`
and :meth:`Metrics.fallback`, which move the exported counter and a typed :class:`Tallies`
together; code in this process reads :meth:`Metrics.tallies`, never a metric back by its
exported name (a renamed metric would silently read as zero).

The lock calls count through :meth:`Metrics.counting` and :meth:`Metrics.timing`: a
:class:`Count` or :class:`Timing` of one labelled child keeps its numbers as plain Python
numbers, and they move into the exported metric whenever the registry is collected (a
scrape, :meth:`Metrics.exposition`, ``registry.get_sample_value``). prometheus-client's own
``inc`` and ``observe`` take a lock and check the metric on every call; an acquire and its
release made six of them, about a tenth of a pair's CPU on the embedded store.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric

from enhanced_locking.types import Reason

__all__ = ["Count", "FallbackAction", "Metrics", "ShadowKind", "ShadowResult", "Tallies",
           "Timing"]

FallbackAction = Literal["legacy", "refused", "unchecked"]
"""What a fallback did: served by legacy in the enhanced side's place, refused
(``fail-closed``), or, for a key legacy decides (routed there), granted by legacy with the
enhanced side's check not made."""

ShadowKind = Literal["acquire-outcome", "acquire-holder", "release-outcome", "release-holder",
                     "release-by-pull"]
"""How a shadow replay disagreed: granted or released where the other was not (``outcome``),
another holder (``holder``), or other locks released with a pull's."""

ShadowResult = Literal["matched", "mismatch", "dropped", "error"]
"""What became of a shadow replay."""


@dataclass(frozen=True)
class Tallies:
    """Running totals of this process since it started, as the exported counters have them."""

    enhanced_operations: int = 0
    """Enhanced backend operations tried (each retry counts)."""
    enhanced_errors: int = 0
    """Enhanced backend operations that failed."""
    fallbacks: int = 0
    """Fallbacks of every action."""

_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)
_Keeper = TypeVar("_Keeper", "Count", "Timing")

# Lock operations on Terraform projects last from milliseconds (fail fast) to many minutes
# (waiting behind an apply), so the wait buckets reach far; acquire latency stays short, down
# to about 0.06 ms on the embedded store (the locker table of docs/benchmarks.md), so its
# buckets start at 0.1 ms.
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5)
_WAIT_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600)


class Count:
    """One labelled counter's increments, kept here until the registry is next collected."""

    __slots__ = ("_child", "_moved", "total")

    def __init__(self, child: Counter | None = None) -> None:
        """``child``: the exported counter it moves into (None: counted here only, as a
        store's own counts are until a locker gives it the exported ones)."""
        self._child = child
        self.total = 0.0
        self._moved = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.total += amount

    def _flush(self) -> None:
        # Only this moves _moved; the event loop only adds to total: nothing is lost.
        total, child = self.total, self._child
        if total != self._moved and child is not None:
            child.inc(total - self._moved)
            self._moved = total


class Timing:
    """One labelled histogram's observations, kept as bucket counts and a sum until the
    registry is next collected."""

    __slots__ = ("_bounds", "_child", "_counts", "_moved", "_moved_sum", "_sum")

    def __init__(self, child: Histogram) -> None:
        self._child = child
        # prometheus-client keeps a child's bounds, buckets and sum in private attributes;
        # this module is the one place that reads them (see also describe()).
        self._bounds: list[float] = list(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._moved = [0] * len(self._bounds)
        self._sum = 0.0
        self._moved_sum = 0.0

    def observe(self, amount: float) -> None:
        # The first bucket whose bound is at least the amount, as prometheus-client counts.
        self._counts[bisect.bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def _flush(self) -> None:
        child = self._child
        for index, count in enumerate(self._counts):
            if count != self._moved[index]:
                child._buckets[index].inc(count - self._moved[index])
                self._moved[index] = count
        total = self._sum
        if total != self._moved_sum:
            child._sum.inc(total - self._moved_sum)
            self._moved_sum = total


class _Flush:
    """Registered first on the registry: moves every :class:`Count` and :class:`Timing` into
    its metric before the metrics themselves are collected."""

    def __init__(self) -> None:
        self.kept: list[Count | Timing] = []
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            for kept in self.kept:
                kept._flush()
        return []


class Metrics:
    """The service's metric objects, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._flush = _Flush()
        self.registry.register(self._flush)
        r = self.registry
        self.acquire_seconds = Histogram(
            "enhanced_locking_acquire_duration_seconds",
            "Time to answer an acquire, including any wait in the queue.",
            ["backend", "outcome"], registry=r, buckets=_LATENCY_BUCKETS + _WAIT_BUCKETS[5:],
        )
        self.wait_seconds = Histogram(
            "enhanced_locking_wait_duration_seconds",
            "Time a request spent queued before it was granted, timed out or cancelled.",
            ["outcome"], registry=r, buckets=_WAIT_BUCKETS,
        )
        self.acquires = Counter(
            "enhanced_locking_acquire",
            "Acquire answers by side and outcome (acquired, held, timeout, queue_full, ...).",
            ["backend", "outcome"], registry=r,
        )
        self.releases = Counter(
            "enhanced_locking_releases", "Locks released, by side and how.",
            ["backend", "how"], registry=r,
        )
        self.locks_held = Gauge(
            "enhanced_locking_locks_held",
            "Locks currently held, by side (absent while that side's store does not answer).",
            ["backend"],
            registry=r,
        )
        self.unreadable_locks = Gauge(
            "enhanced_locking_unreadable_locks",
            "Stored locks that cannot be read, by side: set aside (never granted over) until a "
            "force-unlock clears them; their keys are in /readyz and GET /v1/locks. Under "
            "journal: fallback journal entries that cannot be read, left until deleted.",
            ["backend"], registry=r,
        )
        self.queue_depth = Gauge(
            "enhanced_locking_queue_depth", "Requests waiting in queues, all keys together "
            "(absent while the enhanced store does not answer).",
            registry=r,
        )
        self._queue_depth_shown = True
        self.store_up = Gauge(
            "enhanced_locking_store_up",
            "1 while the side's store answered the scrape's reads, 0 while it does not: "
            "locks_held (and queue_depth for enhanced) are then absent, not their last value.",
            ["backend"], registry=r,
        )
        self.store_granting = Gauge(
            "enhanced_locking_store_granting",
            "1 while the side's store passed the scrape's readiness check (as GET /readyz asks "
            "it), 0 while it did not: with store_up 1, the store answers but grants nothing "
            "(Redis back without its data, in enhanced-locking-redis-restart-quarantine).",
            ["backend"], registry=r,
        )
        self.deadlocks = Counter(
            "enhanced_locking_deadlocks", "Waits refused because they would close a cycle.",
            registry=r,
        )
        self.requests_shed = Counter(
            "enhanced_locking_requests_shed",
            "Requests answered 503 overloaded at once, before any work, because the service had "
            "enhanced-locking-http-max-in-flight requests in flight (releases, health and "
            "metrics are never shed).",
            registry=r,
        )
        self.requests_pool_busy = Counter(
            "enhanced_locking_requests_pool_busy",
            "Requests answered 503 overloaded because every pooled connection to the store was "
            "busy with other calls for the pool's wait (enhanced-locking-redis-pool-size); the "
            "store answered, nothing of the call was sent.",
            registry=r,
        )
        self.routing = Counter(
            "enhanced_locking_routing_decisions", "Lock requests routed, by side.",
            ["backend"], registry=r,
        )
        self.fallbacks = Counter(
            "enhanced_locking_fallbacks",
            "Requests served by legacy alone (or refused) because the enhanced backend was "
            "unreachable, by action: legacy (sent there in enhanced's place), refused, or "
            "unchecked (a key legacy decides, granted there without its look at enhanced).",
            ["action"], registry=r,
        )
        self.shadow_discrepancies = Counter(
            "enhanced_locking_shadow_discrepancies",
            "Shadow replays whose outcome differed from the authoritative answer.",
            ["kind"], registry=r,
        )
        self.shadow_replays = Counter(
            "enhanced_locking_shadow_replays",
            f"Shadow replays by result ({', '.join(get_args(ShadowResult))}).",
            ["result"], registry=r,
        )
        # Every series an alert counts with increase() or rate() is shown from the start, at
        # 0: a series born at its first count is first scraped at 1, and Prometheus never
        # sees that count (an alert on "increase(...) > 0" stays silent for a pod's first
        # fallback or shadow mismatch).
        for counter, values in ((self.fallbacks, get_args(FallbackAction)),
                                (self.shadow_discrepancies, get_args(ShadowKind)),
                                (self.shadow_replays, get_args(ShadowResult))):
            for value in values:
                counter.labels(value)
        for outcome in ("acquired", *(reason.value for reason in Reason)):
            self.acquires.labels("enhanced", outcome)
        self.routing_transition_seconds = Histogram(
            "enhanced_locking_routing_transition_seconds",
            "Time from a weight change until every live replica applied it (this replica's view).",
            registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.replicas = Gauge(
            "enhanced_locking_replicas",
            "Replicas seen in the registry, by state (live, pending, excluded).",
            ["state"], registry=r,
        )
        self.replica_isolated = Gauge(
            "enhanced_locking_replica_isolated",
            "1 while this replica cannot report to the replica registry and so takes every key "
            "on both sides; 0 otherwise.", registry=r,
        )
        self.fallback_pending = Gauge(
            "enhanced_locking_fallback_pending",
            "Fallback grants and releases not yet reconciled into the enhanced backend.",
            registry=r,
        )
        self.lock_conflicts = Gauge(
            "enhanced_locking_lock_conflicts",
            "Keys held on both sides by different pulls (found by reconciliation).", registry=r,
        )
        self.retries = Counter(
            "enhanced_locking_retries",
            "Backend operations tried again after a transient error (retries flag on).",
            ["operation"], registry=r,
        )
        self.lease_expirations = Counter(
            "enhanced_locking_lease_expirations",
            "Enhanced locks freed because their lease (TTL) ran out.", registry=r,
        )
        self.handoffs = Counter(
            "enhanced_locking_handoffs",
            "Locks handed straight to a queued waiter by the step that freed them (a release, "
            "an expiry, a cancel, an acquire that freed a lapsed lease).", registry=r,
        )
        self.waiters_passed_over = Counter(
            "enhanced_locking_waiters_passed_over",
            "Waiters passed over when the key came to them because the replica they wait in "
            "was gone (etcd: its session unrenewed for more than 5 s); each was told "
            "unavailable and the key went to the next waiter.", registry=r,
        )
        self.grants_taken_back = Counter(
            "enhanced_locking_grants_taken_back",
            "Locks granted to another replica's waiter and taken back because that replica "
            "was gone before it took them (etcd); each key went to its next waiter, told as "
            "an expiry.", registry=r,
        )
        self.backend_errors = Counter(
            "enhanced_locking_backend_errors", "Backend operations that failed.", ["backend"],
            registry=r,
        )
        self.backend_operations = Counter(
            "enhanced_locking_backend_operations",
            "Backend operations tried (each retry counts): the error rate's denominator.",
            ["backend"], registry=r,
        )
        self.config_generation = Gauge(
            "enhanced_locking_config_generation", "Generation of the configuration in effect.",
            registry=r,
        )
        self.config_changes = Counter(
            "enhanced_locking_config_changes",
            "Configuration changes by result: applied, or rejected (refused: an invalid "
            "layer, or a check or an applier said no; the configuration in force keeps "
            "running).", ["result"], registry=r,
        )
        for result in ("applied", "rejected"):  # both shown from the start, at 0
            self.config_changes.labels(result)
        self.audit_lost = Counter(
            "enhanced_locking_audit_entries_lost",
            "Audit entries the trail's store did not keep (each still went to stdout): "
            "refused (the store did not take it) or dropped (more waited to be written than "
            "the store holds while its place refused writes; the oldest went).",
            ["reason"], registry=r,
        )
        for reason in ("refused", "dropped"):  # both shown from the start, at 0
            self.audit_lost.labels(reason)
        self.events_dropped = Counter(
            "enhanced_locking_events_dropped",
            "Events this replica published and never wrote to the shared event store: more "
            "waited than it keeps (10,000) while the store was away; the oldest went, and "
            "this replica's event readers got a gap. Counted when the store takes events "
            "again.", registry=r,
        )
        self.event_bus = Gauge(
            "enhanced_locking_event_bus",
            "1 for the event bus that serves this replica's events, 0 for the others: process "
            "(its own), or the enhanced store's shared one (redis, etcd), which every replica "
            "on that store reads. It follows a switch of the enhanced store.",
            ["bus"], registry=r,
        )
        self.audit_waiting = Gauge(
            "enhanced_locking_audit_entries_waiting",
            "Audit entries appended and not yet written to the store (it writes behind; this "
            "rises while its place refuses writes).", registry=r,
        )
        self.routing_weight = Gauge(
            "enhanced_locking_routing_weight_percent",
            "Share of lock keys routed to the enhanced locker (0 in shadow mode: legacy "
            "decides every key).", registry=r,
        )

        # Kept in a tuple and plain ints, not as metric attributes: describe() lists those.
        self._enhanced = (self.counting(self.backend_operations, "enhanced"),
                          self.backend_errors.labels("enhanced"))
        self._counts = [0, 0, 0]  # enhanced operations, enhanced errors, fallbacks

    def enhanced_operation(self) -> None:
        """Count one enhanced backend operation tried (each retry counts)."""
        self._enhanced[0].total += 1
        self._counts[0] += 1

    def enhanced_error(self) -> None:
        """Count one enhanced backend operation that failed."""
        self._enhanced[1].inc()
        self._counts[1] += 1

    def fallback(self, action: FallbackAction) -> None:
        """Count one fallback (``enhanced_locking_fallbacks_total{action}``)."""
        self.fallbacks.labels(action).inc()
        self._counts[2] += 1

    def shadow_replayed(self, result: ShadowResult) -> None:
        """Count one shadow replay (``enhanced_locking_shadow_replays_total{result}``); one that
        disagreed is :meth:`shadow_mismatch`."""
        self.shadow_replays.labels(result).inc()

    def shadow_mismatch(self, kind: ShadowKind) -> None:
        """Count one shadow replay that disagreed, as ``mismatch``, and how
        (``enhanced_locking_shadow_discrepancies_total{kind}``)."""
        self.shadow_replays.labels("mismatch").inc()
        self.shadow_discrepancies.labels(kind).inc()

    def tallies(self) -> Tallies:
        """The running totals the rollout's analysis reads."""
        return Tallies(*self._counts)

    def labelled(self, metric: _Metric, *values: str) -> _Metric:
        """``metric.labels(*values)``, kept: the hot path asks for the same few children on
        every call, and prometheus-client checks and locks on each ``labels``."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            # (a metric without labels is its own only child)
            child = self._children[key] = metric.labels(*values) if values else metric
        return child

    def counting(self, metric: Counter, *values: str) -> Count:
        """A :class:`Count` of ``metric``'s child with ``values`` (the same one each time)."""
        return self._kept(metric, values, Count)

    def timing(self, metric: Histogram, *values: str) -> Timing:
        """A :class:`Timing` of ``metric``'s child with ``values`` (the same one each time)."""
        return self._kept(metric, values, Timing)

    def _kept(self, metric: _Metric, values: tuple[str, ...],
              keeper: Callable[[_Metric], _Keeper]) -> _Keeper:
        """The one ``keeper`` of ``metric``'s child with ``values``, made and flushed from
        the first call on."""
        key = (id(metric), (keeper.__name__, *values))
        kept: _Keeper | None = self._children.get(key)
        if kept is None:
            kept = self._children[key] = keeper(self.labelled(metric, *values))
            self._flush.kept.append(kept)
        return kept

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def store_read(self, side: str, *, held: int | None, depth: int | None = None) -> None:
        """What a scrape read from ``side``'s store: its locks held and (enhanced) its queues'
        depth, ``None`` where the store did not answer. A value not read is absent from the
        scrape, not the last one read, and ``store_up`` says the store did not answer: an
        alert on the gauge resolves instead of firing on a stale value (join on ``store_up``
        to alert on the store itself)."""
        answered = held is not None and (side != "enhanced" or depth is not None)
        self.store_up.labels(side).set(1 if answered else 0)
        if held is None:
            with contextlib.suppress(KeyError):  # (absent already)
                self.locks_held.remove(side)
        else:
            self.locks_held.labels(side).set(held)
        if side != "enhanced":
            return
        if depth is not None:
            self.queue_depth.set(depth)
        if (depth is not None) != self._queue_depth_shown:
            # An unlabelled gauge always has its sample: absent only while unregistered.
            (self.registry.register if depth is not None
             else self.registry.unregister)(self.queue_depth)
            self._queue_depth_shown = depth is not None

    def describe(self) -> list[tuple[str, str, tuple[str, ...], str]]:
        """Every metric as (name as scraped, type, label names, help), for the docs."""
        suffix = {"counter": "_total"}
        found = []
        # prometheus-client keeps a metric's name, type and labels in private attributes;
        # reading them here, where the metrics are defined, keeps that knowledge in one place.
        for metric in vars(self).values():
            if isinstance(metric, Counter | Gauge | Histogram):
                kind = metric._type
                found.append((metric._name + suffix.get(kind, ""), kind,
                              tuple(metric._labelnames), metric._documentation))
        return sorted(found)
