"""The migration machinery of one service, assembled: weight moves, shadow, fallback.

:class:`~enhanced_locking.factory.LockService` builds one :class:`MigrationController`. The
router asks it how to serve each key (:meth:`admit`) and tells it what happened (the
``after_*`` and ``record_*`` hooks); the controller follows the config through the provider
and runs one background task (registry heartbeats, reconciliation retries).

How the operator drives and reads it:

* change the weight, mode, fallback or sampling with ``provider.set_layer(...)``; the move
  starts at once on this replica (``routing-changed`` event, phase ``moving``);
* ``await controller.transitions.wait_settled()`` (inside ``asyncio.timeout``), or poll
  ``status().routing`` (``phase`` is ``stable`` once every live replica applied the
  weight), before taking the next rollout step;
* ``status()`` (a :class:`MigrationStatus`) has everything a LockMigration status needs:
  routing (weight, from, pending and excluded replicas), shadow counters, fallback counters
  and the open conflicts (a non-empty list means ``Degraded``). Counters are totals since the
  process started: diff them over the analysis window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from enhanced_locking.backends.base import Backend, Owner, QueueBackend
from enhanced_locking.backends.redis_connection import RedisConnection
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import Bus
from enhanced_locking.locking.base import Locker
from enhanced_locking.metrics import Metrics
from enhanced_locking.migration.conflicts import ConflictBook, LockConflict
from enhanced_locking.migration.handover import backend_of, settle_counters
from enhanced_locking.migration.reconcile import (
    GRANTED,
    RELEASED,
    FallbackJournal,
    FallbackReconciler,
    FallbackStatus,
)
from enhanced_locking.migration.routing_registry import (
    MemoryRoutingRegistry,
    RedisRoutingRegistry,
    RoutingRegistry,
)
from enhanced_locking.migration.shadow import ShadowReplayer, ShadowStatus
from enhanced_locking.migration.transition import (
    Admission,
    TransitionStatus,
    WeightTransitions,
)
from enhanced_locking.provider import ConfigProvider, Snapshot
from enhanced_locking.types import AcquireResult, BackendUnavailable, Lock, LockRequest

__all__ = ["MigrationController", "MigrationStatus", "default_replica_id"]

log = logging.getLogger(__name__)

Build = Callable[[EnhancedLockingConfig, str, str], Backend]
Identity = Callable[[EnhancedLockingConfig, str], tuple[Any, ...]]


def default_replica_id() -> str:
    """The host name (a pod's name in Kubernetes) and a random suffix, unique per process."""
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


class MigrationController:
    """Weight transitions, shadow replay and fallback reconciliation for one service."""

    def __init__(
        self,
        *,
        provider: ConfigProvider,
        legacy: Callable[[], Locker],
        enhanced: Callable[[], Locker | None],
        build: Build,
        identity: Identity,
        events: Bus,
        metrics: Metrics,
        replica_id: str,
        routing_registry: RoutingRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        self._legacy = legacy
        self._enhanced = enhanced
        self._build = build
        self.events = events
        self.metrics = metrics
        self.replica_id = replica_id
        self._given_registry = routing_registry
        self._local_registry = MemoryRoutingRegistry(clock=clock)
        self._redis_registry: RedisRoutingRegistry | None = None
        self.conflicts = ConflictBook(events=events, metrics=metrics)
        self.transitions = WeightTransitions(
            replica_id=self.replica_id,
            snapshot=lambda: provider.current,
            registry=self._registry,
            events=events,
            metrics=metrics,
            settle=self._settle,
            clock=clock,
        )
        self.shadow = ShadowReplayer(
            build=lambda c: build(c, c.backend, "shadow"),
            identity=lambda c: identity(c, c.backend),
            authoritative=self._legacy_backend,
            events=events,
            metrics=metrics,
        )
        self._journal: FallbackJournal | None = None
        self.fallback = FallbackReconciler(
            journal=self._journal_now,
            legacy=legacy,
            enhanced=enhanced,
            routes_enhanced=self._routes_enhanced,
            min_interval=lambda: provider.current.config.replica_heartbeat.total_seconds(),
            conflicts=self.conflicts,
            events=events,
            metrics=metrics,
        )
        self._task: asyncio.Task[None] | None = None
        provider.subscribe(self._on_snapshot)

    # --- wiring --------------------------------------------------------------------------
    def _registry(self) -> RoutingRegistry:
        """The given registry; else the enhanced Redis when there is one; else in process."""
        if self._given_registry is not None:
            return self._given_registry
        enhanced = self._enhanced()
        backend = backend_of(enhanced) if enhanced is not None else None
        connection = getattr(backend, "connection", None)
        if isinstance(connection, RedisConnection):
            if self._redis_registry is None or self._redis_registry.connection is not connection:
                prefix = self.provider.current.config.redis_key_prefix
                self._redis_registry = RedisRoutingRegistry(connection, prefix=prefix)
            return self._redis_registry
        return self._local_registry

    def _legacy_backend(self) -> Backend:
        backend = backend_of(self._legacy())
        assert backend is not None, "the legacy locker keeps its locks in a backend"
        return backend

    def _journal_now(self) -> FallbackJournal:
        if self._journal is None:
            config = self.provider.current.config
            self._journal = FallbackJournal(granted=self._journal_store(config, GRANTED),
                                            released=self._journal_store(config, RELEASED))
        return self._journal

    def _journal_store(self, config: EnhancedLockingConfig, namespace: str) -> QueueBackend:
        """The journal's part ``namespace`` in the legacy store: a store that can take an
        entry out only while it is the one read (owner and version, in one step), which every
        kind but Atlantis's own Redis layout can (that one serves only ``legacy``)."""
        backend = self._build(config, config.legacy_backend, namespace)
        if not isinstance(backend, QueueBackend):
            raise BackendUnavailable(
                f"the {backend.kind} backend cannot keep the fallback journal")
        return backend

    def _routes_enhanced(self, key: str) -> bool:
        plan = self.transitions.plan(key)
        return plan.side == "enhanced" or plan.both

    async def _settle(self, leaving: Callable[[int], bool], weight: float) -> None:
        enhanced = self._enhanced()
        target = backend_of(enhanced) if enhanced is not None else None
        if target is None:
            return
        await settle_counters(legacy=self._legacy_backend(), enhanced=target, leaving=leaving,
                              conflicts=self.conflicts)

    async def _on_snapshot(self, snapshot: Snapshot) -> None:
        self.transitions.on_snapshot(snapshot)  # first, with no await before it
        await self.shadow.configure(snapshot.config)

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Load the journal, follow the current config, report once, start the loop."""
        try:
            await self.fallback.load()
        except Exception as error:
            log.error("cannot read the fallback journal: %s", error)
        await self.shadow.configure(self.provider.current.config)
        await self.transitions.tick()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.transitions.run())
            group.create_task(self._reconcile_loop())

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.provider.current.config.replica_heartbeat.total_seconds())
            if self.fallback.needed:
                await self.fallback.reconcile_quietly()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.transitions.leave()
        await self.shadow.stop()
        await self.fallback.close()
        if self._journal is not None:
            await self._journal.close()

    # --- hooks for the router ------------------------------------------------------------
    def admit(self, key: str) -> Admission:
        return self.transitions.admit(key)

    async def before_acquire(self, key: str) -> None:
        """Apply a journaled release of ``key`` before it is granted again (only called while
        the journal holds something: :attr:`journal_pending`)."""
        await self.fallback.before_acquire(key)

    @property
    def journal_pending(self) -> bool:
        """The fallback journal holds entries not reconciled yet."""
        return self.fallback.pending > 0

    def after_acquire(self, request: LockRequest, result: AcquireResult) -> None:
        self.shadow.after_acquire(request, result)

    def after_release(self, key: str, owner: Owner | None, *, released: Lock | None,
                      not_owned_by: Lock | None = None) -> None:
        self.shadow.after_release(key, owner, released=released, not_owned_by=not_owned_by)

    def after_release_by_pull(self, repo: str, pull: int, released: list[Lock]) -> None:
        self.shadow.after_release_by_pull(repo, pull, released)

    async def record_fallback_grant(self, lock: Lock) -> None:
        await self.fallback.record_grant(lock)

    async def record_partial_release(self, lock: Lock) -> None:
        await self.fallback.record_release(lock)

    def enhanced_answered(self) -> None:
        self.fallback.poke()

    # --- for the operator ----------------------------------------------------------------
    def status(self) -> MigrationStatus:
        return MigrationStatus(
            replica_id=self.replica_id,
            routing=self.transitions.status(),
            shadow=self.shadow.status(),
            fallback=self.fallback.status(mode=self.provider.current.config.fallback),
            conflicts=tuple(self.conflicts.items()),
        )


@dataclass(frozen=True)
class MigrationStatus:
    """Everything a LockMigration status needs from one replica; ``GET /v1/migration`` answers
    :meth:`as_dict`."""

    replica_id: str
    routing: TransitionStatus
    shadow: ShadowStatus
    fallback: FallbackStatus
    conflicts: tuple[LockConflict, ...]
    """Keys held on both sides by different pulls (non-empty means ``Degraded``)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "replicaId": self.replica_id,
            "routing": self.routing.as_dict(),
            "shadow": self.shadow.as_dict(),
            "fallback": self.fallback.as_dict(),
            "conflicts": [c.as_dict() for c in self.conflicts],
        }
