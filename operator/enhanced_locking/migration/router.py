"""The router: sends each lock key to the legacy or the enhanced locker.

Routing is sticky per key (see :mod:`enhanced_locking.hashing`): under one weight a key always
goes to the same side. Disabled means everything goes to legacy and the enhanced locker is
never called.

A key may still be held on the side it no longer routes to (the weight moved, or enhanced was
switched off while holding locks). The router never grants such a key twice: before granting on
the authoritative side it asks the other side, and after granting it asks again, backing off if
the other side granted meanwhile. Releases and lookups consult both sides.

With a :class:`~enhanced_locking.migration.controller.MigrationController` (the service always
has one) routing follows its weight transitions: a key whose bucket is moving is taken on both
sides, old side first (:mod:`.handover`), until every replica applied the move; shadow mode
replays answers off the request path (:mod:`.shadow`); fallback grants are journaled for
reconciliation (:mod:`.reconcile`).

When the enhanced backend does not answer, ``fallback: legacy`` sends the request to legacy
(recorded with an event, a metric and the journal); ``fail-closed`` answers ``unavailable`` to
every request that needs the enhanced side (its keys, and keys moving to or from it). A key
that routes to legacy is served by legacy in both modes; if its check of the enhanced side
could not be made, the grant is journaled and reconciled (a double hold found then is reported).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

from enhanced_locking.backends.base import Owner
from enhanced_locking.events import EventBus
from enhanced_locking.locking.base import AtlantisCalls, Locker
from enhanced_locking.metrics import FallbackAction, Metrics
from enhanced_locking.migration import identity
from enhanced_locking.migration.controller import MigrationController
from enhanced_locking.migration.enhanced_calls import EnhancedCalls
from enhanced_locking.migration.handover import acquire_both, backend_of
from enhanced_locking.migration.transition import RoutingPlan
from enhanced_locking.provider import Snapshot
from enhanced_locking.types import (
    AcquireResult,
    BackendUnavailable,
    Lock,
    LockNotOwned,
    LockRequest,
    Locks,
    Reason,
    Side,
)

__all__ = ["Router"]

Sides = list[Side]
"""Sides of a call (an alias: the router's ``list`` method shadows the builtin inside it)."""

OTHER_SIDE_POLL = (0.05, 1.0)
"""A waiting request held on the other side looks again after 50 ms, doubling up to 1 s."""


class Router(EnhancedCalls, AtlantisCalls):
    """A locker that delegates each key to its authoritative side (batches, queues, leases and
    admin calls: :mod:`~enhanced_locking.migration.enhanced_calls`)."""

    side: Side = "enhanced"

    def __init__(
        self,
        *,
        legacy: Locker,
        enhanced: Callable[[], Locker | None],
        snapshot: Callable[[], Snapshot],
        events: EventBus,
        metrics: Metrics,
        migration: MigrationController | None = None,
    ) -> None:
        self.legacy = legacy
        self._enhanced = enhanced
        self._snapshot = snapshot
        self.events = events
        self.metrics = metrics
        self.migration = migration
        self._routed_legacy = metrics.routing.labels("legacy")

    @property
    def enhanced(self) -> Locker | None:
        return self._enhanced()

    def side_for(self, key: str) -> Side:
        snapshot = self._snapshot()
        if self.enhanced is None or not snapshot.config.enabled:
            return "legacy"
        if self.migration is not None:
            return self.migration.transitions.plan(key).side
        return "enhanced" if snapshot.should_use_enhanced(key) else "legacy"

    def _lockers(self) -> list[Locker]:
        enhanced = self.enhanced
        return [self.legacy] if enhanced is None else [self.legacy, enhanced]

    async def acquire(self, request: LockRequest) -> AcquireResult:
        """Route the acquire; a lock of another project under the same key is a ``collision``
        (:mod:`.identity`), never a grant."""
        if request.wait:  # checked before queueing: never wait behind another project's name
            refused = identity.refuse_ambiguous(request.key, request.project, request.workspace,
                                                await self._holder_if_known(request.key))
            if refused is not None:
                return refused
        result = await self._acquire_routed(request)
        return identity.checked(request.project, request.workspace, result)

    async def _holder_if_known(self, key: str) -> Lock | None:
        try:
            return await self.get(key)
        except BackendUnavailable:
            return None  # the acquire itself decides what an outage means

    async def _acquire_routed(self, request: LockRequest) -> AcquireResult:
        if self.enhanced is None:
            # Enhanced locking was never enabled here: Atlantis's locking and nothing else on
            # the path (no other side to check, nothing moving, nothing to shadow).
            self._routed_legacy.inc()
            return await self.legacy.acquire(request)
        wait = self._wait_seconds(request)
        if wait is None:
            return await self._acquire_once(request)
        # A request that waits either waits or is refused honestly (timeout, queue_full,
        # unavailable, deadlock): a hold on the side the key is *not* routed to (a key moving
        # between sides, or left from before a weight move) has no queue to wait in, so the
        # request looks again, with backoff, until that hold goes or its wait runs out.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        pause = OTHER_SIDE_POLL[0]
        while True:
            result = await self._acquire_once(request)
            holder = result.holder
            if (result.acquired or result.reason is not Reason.HELD or holder is None
                    or holder.backend == self.side_for(request.key)):
                return result
            left = deadline - loop.time()
            if left <= pause:
                return AcquireResult.refused(request.key, Reason.TIMEOUT, holder)
            await asyncio.sleep(pause)
            pause = min(pause * 2, OTHER_SIDE_POLL[1])
            request = request.model_copy(
                update={"wait": timedelta(seconds=max(deadline - loop.time(), 0.001))})

    def _wait_seconds(self, request: LockRequest) -> float | None:
        wait = request.wait
        if wait is True:
            wait = self._snapshot().config.default_timeout
        if isinstance(wait, bool) or wait is None or wait <= timedelta(0):
            return None
        return wait.total_seconds()

    async def _acquire_once(self, request: LockRequest) -> AcquireResult:
        migration = self.migration
        if migration is None:
            return await self._route(request, RoutingPlan(self.side_for(request.key), False))
        await migration.transitions.refresh()  # a late view is read again, never guessed at
        with migration.admit(request.key) as plan:
            result = await self._route(request, plan)
        migration.after_acquire(request, result)
        return result

    async def _route(self, request: LockRequest, plan: RoutingPlan) -> AcquireResult:
        enhanced = self.enhanced
        if enhanced is None:
            self.metrics.routing.labels("legacy").inc()
            return await self._acquire_on(self.legacy, None, request)
        self.metrics.routing.labels(plan.side).inc()
        try:
            if plan.both:  # the key is moving: old side first, then the new one
                first, second = ((self.legacy, enhanced) if plan.side == "enhanced"
                                 else (enhanced, self.legacy))
                result = await acquire_both(first, second, request)
            elif plan.side == "enhanced":
                result = await self._acquire_on(enhanced, self.legacy, request)
            else:
                result = await self._acquire_on(self.legacy, enhanced, request)
        except BackendUnavailable as error:
            if not await _unreachable(enhanced):
                raise  # legacy itself failed: there is nothing to fall back to
            return await self._fall_back(request, error)
        if self.migration is not None:
            self.migration.enhanced_answered()
        return result

    async def _acquire_on(
        self, primary: Locker, other: Locker | None, request: LockRequest
    ) -> AcquireResult:
        owner = (request.project.repo_full_name, request.pull.num)
        unchecked = False
        if other is not None:
            held, unchecked = await self._holder_on(other, request.key)
            if held is not None:
                if held.owned_by(*owner):  # its own lock, still on the old side: the same lock
                    return AcquireResult.granted(held, fresh=False)
                return AcquireResult.refused(request.key, Reason.HELD, held)
        result = await primary.acquire(request)
        if result.acquired and other is not None:
            # If legacy fails here the error reaches the caller with the enhanced grant kept:
            # the pull asking again gets it back (Atlantis's rule), while releasing it could
            # drop a lock the pull already held before this call. A caller that went away
            # meanwhile (cancelled) gets its fresh grant given back.
            try:
                held, missed = await self._holder_on(other, request.key)
            except asyncio.CancelledError:
                if result.fresh:
                    await asyncio.shield(primary.release(request.key, owner=owner))
                raise
            unchecked = unchecked or missed
            if held is not None and not held.owned_by(*owner):
                # the other side granted meanwhile: back off, never share
                await primary.release(request.key, owner=owner)
                return AcquireResult.refused(request.key, Reason.HELD, held)
        if unchecked and result.acquired and result.lock is not None:
            self.metrics.fallback("unchecked")
            await self._journal_grant(result.lock)
        return result

    async def _holder_on(self, locker: Locker, key: str) -> tuple[Lock | None, bool]:
        """Who holds ``key`` on ``locker``, and whether the answer is missing because the
        enhanced side did not answer."""
        try:
            return await locker.get(key), False
        except BackendUnavailable:
            if locker is self.legacy:
                raise
            # The enhanced side is down while checking a legacy key: legacy keeps serving its
            # own keys (in both fallback modes); the grant is journaled and reconciled.
            return None, True

    async def _journal_grant(self, lock: Lock) -> None:
        if self.migration is not None:
            await self.migration.record_fallback_grant(lock)

    async def _fall_back(self, request: LockRequest, error: BackendUnavailable) -> AcquireResult:
        fallback = self._snapshot().config.fallback
        action: FallbackAction = "legacy" if fallback == "legacy" else "refused"
        self.metrics.fallback(action)
        self.events.publish("fallback", key=request.key, action=action, error=str(error),
                            repo=request.project.repo_full_name)
        if fallback == "legacy":
            result = await self._acquire_on(self.legacy, None, request)
            if result.acquired and result.lock is not None:
                await self._journal_grant(result.lock)
            return result
        return AcquireResult.refused(request.key, Reason.UNAVAILABLE)

    async def release(self, key: str, *, owner: Owner | None = None) -> Lock | None:
        if self.enhanced is None:  # never enabled here: only legacy can hold it
            return await self.legacy.release(key, owner=owner)
        released: Lock | None = None
        failure: LockNotOwned | BackendUnavailable | None = None
        unreached = False
        for locker in self._lockers():
            try:
                released = await locker.release(key, owner=owner) or released
            except (LockNotOwned, BackendUnavailable) as error:
                failure = error
                unreached = unreached or (isinstance(error, BackendUnavailable)
                                          and locker is not self.legacy)
        migration = self.migration
        if released is None and failure is not None:
            if migration is not None and isinstance(failure, LockNotOwned):
                migration.after_release(key, owner, released=None, not_owned_by=failure.holder)
            raise failure
        if migration is not None:
            if unreached and released is not None:
                # Freed on legacy only: a copy may be left on enhanced, freed on reconcile.
                await migration.record_partial_release(released)
            migration.after_release(key, owner, released=released)
        return released

    async def get(self, key: str) -> Lock | None:
        """The lock on ``key``, from whichever side holds it. With the enhanced side away, a
        lock legacy holds (one granted in fallback, say) is still the answer; only a key legacy
        does not hold is unknown (``BackendUnavailable``)."""
        outage: BackendUnavailable | None = None
        for locker in self._ordered(key):
            try:
                lock = await locker.get(key)
            except BackendUnavailable as error:
                if locker is self.legacy:
                    raise
                outage = error
                continue
            if lock is not None:
                return lock
        if outage is not None:
            raise outage
        return None

    def _ordered(self, key: str) -> list[Locker]:
        lockers = self._lockers()
        return lockers if self.side_for(key) == "legacy" else lockers[::-1]

    async def list(self, *, repo: str | None = None, pull: int | None = None) -> Locks:
        locks, unreached = await self.list_reachable(repo=repo, pull=pull)
        if unreached:
            raise BackendUnavailable("the enhanced store did not answer (list)")
        return locks

    async def list_reachable(
        self, *, repo: str | None = None, pull: int | None = None
    ) -> tuple[Locks, Sides]:
        """Every lock of the sides that answer, and the sides that did not (legacy's own
        failure is raised: without it there is nothing to list)."""
        locks: Locks = []
        unreached: Sides = []
        for locker in self._lockers():
            try:
                locks += await locker.list(repo=repo, pull=pull)
            except BackendUnavailable:
                if locker is self.legacy:
                    raise
                unreached.append("enhanced")
        return self._one_per_key(locks), unreached

    def _one_per_key(self, locks: Locks) -> Locks:
        """A key held on both sides (it is moving) is listed once, as its target side has it."""
        chosen: dict[str, Lock] = {}
        for lock in locks:
            if lock.key not in chosen or lock.backend == self.side_for(lock.key):
                chosen[lock.key] = lock
        return sorted(chosen.values(), key=lambda lock: lock.key)

    async def release_by_pull(self, repo: str, pull: int) -> Locks:
        locks, unreached = await self.release_by_pull_reachable(repo, pull)
        if unreached:
            raise BackendUnavailable("the enhanced store did not answer (release by pull)")
        return locks

    async def release_by_pull_reachable(
        self, repo: str, pull: int
    ) -> tuple[Locks, Sides]:
        """Release the pull's locks on every side that answers; say which sides did not.

        With the enhanced side away, what legacy holds (what it granted in fallback) is
        released now and journaled, so reconciling never adopts it into enhanced; locks the
        pull held on the enhanced side stay held there until it is asked again."""
        released: Locks = []
        unreached: Sides = []
        for locker in self._lockers():
            try:
                released += await locker.release_by_pull(repo, pull)
            except BackendUnavailable:
                if locker is self.legacy or self.migration is None:
                    raise
                unreached.append("enhanced")
                # Legacy's part is done; copies left on enhanced are freed on reconcile.
                for lock in released:
                    await self.migration.record_partial_release(lock)
        locks = self._one_per_key(released)
        if self.migration is not None:
            self.migration.after_release_by_pull(repo, pull, locks)
        return locks, unreached


async def _unreachable(locker: Locker) -> bool:
    """Whether ``locker``'s store does not answer now (it was the one that failed)."""
    backend = backend_of(locker)
    if backend is None:
        return True
    try:
        await backend.ping()
    except BackendUnavailable:
        return True
    return False
