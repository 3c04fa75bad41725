"""The router: sends each lock key to the legacy or the enhanced locker.

Routing is sticky per key (see :mod:`enhanced_locking.hashing`): under one weight a key always
goes to the same side. Disabled means everything goes to legacy and the enhanced locker is
never called.

A key may still be held on the side it no longer routes to (the weight moved, or enhanced was
switched off while holding locks). The router never grants such a key twice: before granting on
the authoritative side it asks the other side, and after granting it asks again, backing off if
the other side granted meanwhile. Releases and lookups consult both sides. When the enhanced
store keeps its rows in the legacy side's file (the embedded store on both sides), a grant that
does not wait and a release there check legacy in their own statement instead
(:meth:`Router._legacy_checked_by`), and the looks are made only when legacy holds the key.

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

Batches, queues, leases and admin calls follow the same rules (:meth:`Router.acquire_batch`):
queues and leases exist on the enhanced side only. Three checks are written once here and used
by every call: :func:`_peek` (a get where an outage means "unknown"), :func:`_foreign` (a hold
by another pull) and :meth:`Router._fallback_action` (what the fallback setting does).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, NamedTuple, TypeVar

from enhanced_locking.backends.base import (
    OtherSideHolds,
    Owner,
    StoreBackend,
    checking_other_side,
)
from enhanced_locking.backends.unreadable import UnreadableLocks
from enhanced_locking.backends.waiting import Waiters
from enhanced_locking.events import Bus
from enhanced_locking.locking import EnhancedLocker, batch
from enhanced_locking.locking.base import AtlantisCalls, Locker, give_back_grant
from enhanced_locking.metrics import FallbackAction, Metrics
from enhanced_locking.migration import identity
from enhanced_locking.migration.controller import MigrationController
from enhanced_locking.migration.handover import (
    acquire_both,
    answer_held,
    asks_upgrade,
    backend_of,
    raise_counter,
    raise_counter_after,
    weighed_holder,
)
from enhanced_locking.migration.switch_gate import Pass, SwitchGate
from enhanced_locking.migration.transition import RoutingPlan
from enhanced_locking.provider import Snapshot
from enhanced_locking.types import (
    AcquireResult,
    BackendUnavailable,
    BatchItem,
    BatchLockRequest,
    BatchResult,
    HoldAnsweredAgain,
    InvalidRequest,
    Lock,
    LockNotHeld,
    LockNotOwned,
    LockRequest,
    Locks,
    LockUnreadable,
    PartlyReleased,
    Reason,
    Side,
    StoreBusy,
)

__all__ = ["PullClosed", "Router"]

Sides = list[Side]
"""Sides of a call (an alias: the router's ``list`` method shadows the builtin inside it)."""

WaiterIds = list[str]

_Hold = tuple[str, str, str, int, int, datetime]
"""One hold of a key: its key, side, repository, pull, fencing token and grant time."""

ANSWERS_KEPT = 16384
"""How many holds answered again a router remembers at most (the oldest are forgotten first:
a give-back comes right after its grant, long before that many others)."""


def _hold(lock: Lock) -> _Hold:
    # Read from the models' __dict__: an attribute of a pydantic model is read through its
    # __getattr__ hook (about 400 instructions a read).
    fields = lock.__dict__
    return (fields["key"], fields["backend"], fields["project"].__dict__["repo_full_name"],
            fields["pull"].__dict__["num"], fields["fencing_token"], fields["acquired_at"])


class _Answers:
    """The holds answered again, in this process, to a request of a pull that held them
    already (Atlantis's re-entry), and the holds a give-back is freeing. The give-back of a
    grant whose caller went away frees the hold only when it was not answered again (it is
    then the other request's as much); an answer again that comes while its hold is being
    given back waits for that and asks again. (A fresh grant is a new hold: nothing to note.)"""

    def __init__(self) -> None:
        self._again: dict[_Hold, None] = {}  # insertion-ordered: the oldest first
        self.leaving: dict[_Hold, asyncio.Event] = {}

    def leaving_of(self, locks: Sequence[Lock]) -> asyncio.Event | None:
        """What to wait for before asking again, when one of ``locks`` is being given back."""
        leaving = self.leaving
        if leaving:
            for lock in locks:
                if (event := leaving.get(_hold(lock))) is not None:
                    return event
        return None

    def again(self, lock: Lock) -> None:
        """``lock`` was answered to a request of a pull that held it already."""
        again = self._again
        again[_hold(lock)] = None
        if len(again) > ANSWERS_KEPT:
            del again[next(iter(again))]

    def leave(self, lock: Lock) -> asyncio.Event | None:
        """The answer of fresh grant ``lock`` will not be used: ``None`` when the hold was
        answered again (it stays the other request's), else the mark of its give-back (pass
        it to :meth:`left`)."""
        hold = _hold(lock)
        if hold in self._again:
            return None
        leaving = self.leaving[hold] = asyncio.Event()
        return leaving

    def left(self, lock: Lock, leaving: asyncio.Event) -> None:
        """The give-back :meth:`leave` marked is done."""
        hold = _hold(lock)
        if self.leaving.get(hold) is leaving:
            del self.leaving[hold]
        leaving.set()


_Asked = TypeVar("_Asked", LockRequest, BatchLockRequest)
_Answer = TypeVar("_Answer", AcquireResult, BatchResult)
_Done = TypeVar("_Done")

OTHER_SIDE_POLL = (0.05, 1.0)
"""A waiting request held on the other side looks again after 50 ms, doubling up to 1 s."""

CLOSE_TOLERANCE = timedelta(seconds=2)
"""What was asked for or taken up to this long after a pull's close time counts as before it:
VCS timestamps are whole seconds and its clock is not ours."""


@dataclass(frozen=True)
class PullClosed:
    """What closing a pull request (or releasing its locks by pull) did: the locks it released
    and the queued requests (waiter ids) it dropped."""

    released: Locks
    cancelled: WaiterIds


async def _peek(locker: Locker, key: str) -> tuple[Lock | None, bool]:
    """Who holds ``key`` on ``locker``, and whether it answered: a store that does not answer
    gives ``(None, False)``, "unknown", which each caller weighs (never "free" unsaid). An
    overloaded one (``StoreBusy``: no free connection to it in time, while it answers) is no
    outage: it is raised, so the request is answered 503 ``overloaded``, as on the enhanced
    path, never served as if the store were away (a fall-back, an unchecked grant)."""
    try:
        return await locker.get(key), True
    except StoreBusy:
        raise
    except BackendUnavailable:
        return None, False


def _foreign(held: Lock | None, owner: Owner) -> Lock | None:
    """``held`` when another pull holds it (a hold of ``owner`` itself is no obstacle)."""
    return held if held is not None and not held.owned_by(*owner) else None


class _LegacyCheck(NamedTuple):
    """Whether an enhanced locker's store checks the legacy side in its own writes
    (:meth:`Router._legacy_checked_by`), as found for that locker."""

    enhanced: Locker
    namespace: str | None
    """The legacy side's namespace in the store's file; ``None``: the router makes the looks."""
    unreadable: UnreadableLocks | None
    """The legacy side's keys found unreadable (their looks are made by the router)."""


class Router(AtlantisCalls):
    """A locker that delegates each key to its authoritative side.

    The same rules hold for every call: each key goes to its side; a key held on the other side
    is not free; legacy stays fail fast (Atlantis never waits), so waits, queues and leases
    exist on the enhanced side only; with enhanced locking disabled nothing new is granted or
    queued on the enhanced locker (what it holds and queues from before is still honoured,
    released, listed and cancelled), and where it was never enabled nothing reaches it.
    """

    side: Side = "enhanced"

    def __init__(
        self,
        *,
        legacy: Locker,
        enhanced: Callable[[], Locker | None],
        snapshot: Callable[[], Snapshot],
        events: Bus,
        metrics: Metrics,
        migration: MigrationController | None = None,
        gate: SwitchGate | None = None,
        peer_on_enhanced: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        """``gate``: the one a switch of the enhanced store closes (:mod:`.switch_gate`);
        every call that writes the enhanced side passes it. ``peer_on_enhanced``: another
        replica that the enhanced store answers, if any (:mod:`enhanced_locking.peers`); while
        one does, the fall-back to legacy refuses instead of granting there."""
        self.legacy = legacy
        self.withheld: str | None = None
        """Why no lock is granted now (``None``: they are): every acquire and batch is refused
        ``unavailable`` with these words (set by the service: a store that may hold locks is
        not read yet, or the operator has not applied its LockPolicy yet)."""
        self.gate = gate
        self._peer_on_enhanced = peer_on_enhanced
        self._enhanced = enhanced
        self._snapshot = snapshot
        self.events = events
        self.metrics = metrics
        self.migration = migration
        self._answers = _Answers()
        self._routed_legacy = metrics.counting(metrics.routing, "legacy")
        self._routed_enhanced = metrics.counting(metrics.routing, "enhanced")
        # Whether the enhanced locker's store checks the legacy side in its own writes (see
        # _legacy_checked_by), as last asked, for that locker.
        self._checks_legacy: _LegacyCheck | None = None

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
        (:mod:`.identity`), never a grant, and an unreadable stored lock on either side is
        ``unreadable`` (:mod:`enhanced_locking.backends.unreadable`), never a grant."""
        gate = self.gate
        passed = None
        if gate is not None and self._enhanced() is not None:
            passed = gate.passing() or await gate.enter()
            wait = request.__dict__["wait"]  # (a model's attribute is read through its hook)
            if (passed.switching is not None and wait is not None and wait is not False
                    and self._wait_seconds(request) is not None):
                try:
                    return await self._across_switch(request, passed, self._acquire_answered)
                finally:
                    gate.leave(passed)
        try:
            return await self._acquire_answered(request)
        finally:
            if passed is not None and gate is not None:
                gate.leave(passed)

    async def _across_switch(
        self, request: _Asked, passed: Pass,
        acquire: Callable[[_Asked], Coroutine[Any, Any, _Answer]],
    ) -> _Answer:
        """``acquire(request)``, a request that waits, through the gate: when a switch of
        the enhanced store begins while it waits, it leaves the old store's queue and asks
        again, once the switch is done, on the locker then in force, for what is left of its
        wait (:mod:`.switch_gate`)."""
        gate = self.gate
        assert gate is not None and passed.switching is not None
        wait = self._wait_seconds(request)
        assert wait is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            asked = asyncio.ensure_future(acquire(request))
            assert passed.switching is not None
            told = asyncio.ensure_future(passed.switching.wait())
            try:
                await asyncio.wait((asked, told), return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                # The caller went away: the acquire is cancelled as it would have been had it
                # run in the caller's own task. An answer it had already, or reached before the
                # cancel did, is the caller's to give back (as the acquire's own is).
                told.cancel()
                asked.cancel()
                await asyncio.gather(asked, return_exceptions=True)
                if asked.cancelled():
                    raise
                return asked.result()
            told.cancel()
            if not asked.done():
                asked.cancel()  # leaves the old store's queue, gives back a late grant
                await asyncio.gather(asked, return_exceptions=True)
            if not asked.cancelled():
                return asked.result()  # answered before it had to leave: that answer stands
            # A switch began: this call leaves the gate so the switch can go on, then passes
            # it again once the switch is done.
            gate.leave(passed)
            passed = await gate.enter()
            left = max(deadline - loop.time(), 0.001)  # as a wait cut short by the other side
            request = request.model_copy(update={"wait": timedelta(seconds=left)})

    async def _acquire_answered(self, request: LockRequest) -> AcquireResult:
        """:meth:`_acquire`; a hold the pull had already is noted as answered again, unless it
        is being given back: then asked again once that is done (see :class:`_Answers`)."""
        while True:
            result = await self._acquire(request)
            lock = result.__dict__["lock"]  # (a model's attribute is read through its hook)
            if lock is None or result.fresh or result.upgraded:  # (an upgrade: a new hold)
                return result
            if (leaving := self._answers.leaving_of((lock,))) is None:
                self._answers.again(lock)
                return result
            await leaving.wait()

    async def _acquire_batch_answered(self, request: BatchLockRequest) -> BatchResult:
        """:meth:`_acquire_batch`, asked again once done when one of its holds was being given
        back as it was answered (see :class:`_Answers`)."""
        while True:
            result = await self._acquire_batch(request)
            if not result.acquired:
                return result
            if (leaving := self._answers.leaving_of(result.locks)) is None:
                return result
            await leaving.wait()

    async def _acquire(self, request: LockRequest) -> AcquireResult:
        try:
            if self.withheld is not None:
                return AcquireResult.refused(request.key, Reason.UNAVAILABLE,
                                             error=self.withheld)
            if self._enhanced() is None and not request.wait:
                # Enhanced locking was never enabled here: Atlantis's locking and nothing else
                # on the path (no other side to check, nothing moving, nothing to shadow).
                self._routed_legacy.inc()
                result = await self.legacy.acquire(request)
                return identity.checked(request.project, request.workspace, result)
            if request.wait:  # checked before queueing: never wait behind another's name
                refused = identity.refuse_ambiguous(
                    request.key, request.project, request.workspace,
                    await self._holder_if_known(request.key))
                if refused is not None:
                    return refused
            result = await self._acquire_routed(request)
        except LockUnreadable as error:
            return AcquireResult.refused(request.key, Reason.UNREADABLE, error=str(error))
        return identity.checked(request.project, request.workspace, result)

    async def _holder_if_known(self, key: str) -> Lock | None:
        """The holder of ``key`` on either side; an outage is left to the acquire to decide."""
        return (await _peek(self, key))[0]

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

    def _wait_seconds(self, request: LockRequest | BatchLockRequest) -> float | None:
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
            # The pull held it already: frequent (Atlantis locks a pull's projects again on
            # every plan), and each such answer reads the fallback journal first.
            if result.acquired and not result.fresh and not result.upgraded:
                result = await self._reentered(request, plan, result)
        migration.after_acquire(request, result)
        return result

    async def _reentered(self, request: LockRequest, plan: RoutingPlan,
                         result: AcquireResult) -> AcquireResult:
        """``result`` gives the pull an enhanced lock it already held: unless a release of it
        was journaled by any replica (:meth:`.FallbackReconciler.before_reentrant`): then the
        release takes effect first and the key is asked for again."""
        lock, migration = result.lock, self.migration
        if lock is None or lock.backend != "enhanced" or migration is None:
            return result
        if await migration.fallback.before_reentrant(lock) == "again":
            return await self._route(request, plan)
        return result

    async def _route(self, request: LockRequest, plan: RoutingPlan) -> AcquireResult:
        enhanced = self.enhanced
        if enhanced is None:
            self._routed_legacy.inc()
            return await self._acquire_on(self.legacy, None, request)
        (self._routed_enhanced if plan.side == "enhanced" else self._routed_legacy).inc()
        try:
            migration = self.migration
            if migration is not None and migration.journal_pending:
                # A release of the key journaled while enhanced was away takes effect first;
                # if enhanced is still away, this acquire is served as the outage says.
                await migration.before_acquire(request.key)
            if plan.both:  # the key is moving: old side first, then the new one
                first, second = ((self.legacy, enhanced) if plan.side == "enhanced"
                                 else (enhanced, self.legacy))
                result = await acquire_both(first, second, request)
            elif plan.side == "enhanced":
                result = await self._acquire_on(enhanced, self.legacy, request)
            else:
                result = await self._acquire_on(self.legacy, enhanced, request)
        except StoreBusy:
            raise  # the service is overloaded, the store answers: no fall-back (a 503)
        except BackendUnavailable as error:
            if not await _unreachable(enhanced):
                raise  # legacy itself failed: there is nothing to fall back to
            return await self._fall_back(request, error, plan.side)
        if self.migration is not None:
            self.migration.enhanced_answered()
        return result

    def _legacy_checked_by(self, enhanced: Locker, key: str) -> str | None:
        """The legacy side's namespace when ``enhanced``'s store keeps its rows in the same
        file as the legacy side's, so that a grant or release of ``key`` there can check, in
        its own transaction, that legacy holds nothing for the key (the embedded store on both
        sides): then that check answers the router's looks at the legacy side. ``None``: the
        router asks the legacy side itself, as it does for a key legacy found unreadable (its
        look is what clears that)."""
        known = self._checks_legacy
        if known is None or known.enhanced is not enhanced:
            store, legacy = backend_of(enhanced), backend_of(self.legacy)
            namespace = (store.checks_other_side(legacy)
                         if isinstance(store, StoreBackend) and legacy is not None else None)
            known = self._checks_legacy = _LegacyCheck(
                enhanced, namespace, legacy.unreadable if legacy is not None else None)
        if known.namespace is None or known.unreadable is None or key in known.unreadable:
            return None
        return known.namespace

    async def _acquire_on(
        self, primary: Locker, other: Locker | None, request: LockRequest
    ) -> AcquireResult:
        if (other is self.legacy and (request.wait is None or request.wait is False)
                and (namespace := self._legacy_checked_by(primary, request.key)) is not None):
            # The grant itself checks that legacy holds nothing for the key, in the grant's
            # own transaction: what the looks before and after it are for, answered at the
            # grant's commit (a legacy grant committed before it makes it change nothing; a
            # router granting on legacy after it sees this grant in its own look after its
            # grant). When legacy holds anything for the key, nothing was done, and the looks
            # are made as below. (A request that waits is granted later, by the store, in
            # another call's transaction: it takes the looks.)
            try:
                with checking_other_side(namespace, request.key):
                    return await primary.acquire(request)
            except OtherSideHolds:
                pass
        owner = (request.project.repo_full_name, request.pull.num)
        unchecked = False
        upgrade = False
        if other is not None:
            held, unchecked = await self._holder_on(other, request.key)
            held = await weighed_holder(other, request, held)
            if (foreign := _foreign(held, owner)) is not None:
                return AcquireResult.refused(request.key, Reason.HELD, foreign)
            if held is not None and asks_upgrade(held, request):
                # Its own shared hold, still on the old side, asked for exclusive: that side
                # upgrades it in place, or refuses or queues it (another pull took the key
                # shared since the look), as it does alone; the routed side is looked at
                # before (an upgrade is never undone) and after it.
                there = await weighed_holder(
                    primary, request, (await self._holder_on(primary, request.key))[0])
                if (foreign := _foreign(there, owner)) is not None:
                    return AcquireResult.refused(request.key, Reason.HELD, foreign)
                primary, other, upgrade = other, primary, True
            elif held is not None:  # its own lock, still on the old side: the same lock
                answered = await answer_held(other, request, held)
                if answered is not None:
                    return answered
                # gone since the look: asked for as a key the other side does not hold
        result = await primary.acquire(request)
        if result.acquired and other is not None:
            # If legacy fails here the error reaches the caller with the enhanced grant kept:
            # the pull asking again gets it back (Atlantis's rule), while releasing it could
            # drop a lock the pull already held before this call. A caller that went away
            # meanwhile (cancelled) gets its fresh grant given back.
            try:
                held, missed = await self._holder_on(other, request.key)
            except (asyncio.CancelledError, LockUnreadable, StoreBusy):
                # (an overloaded check is answered 503 overloaded: its grant is undone first)
                if result.fresh and not upgrade and result.lock is not None:
                    await asyncio.shield(self._undo_grant(primary, result.lock, owner))
                raise
            unchecked = unchecked or missed
            if (foreign := _foreign(held, owner)) is not None:
                # The other side granted meanwhile: back off, never share. Only a grant this
                # request made, and nobody was answered with since, is undone: a hold its pull
                # had before it (asked again), or that its other request was told it holds, is
                # not this request's to drop (its pull would lose a lock it holds); both sides
                # now hold the key for different pulls, which is reported.
                # An upgrade is never undone: its release would free the pull's shared hold.
                if result.lock is not None and not (
                        result.fresh and not upgrade
                        and await self._undo_grant(primary, result.lock, owner)):
                    self._double_held(result.lock, foreign)
                return AcquireResult.refused(request.key, Reason.HELD, foreign)
        if unchecked and result.acquired and result.lock is not None:
            self.metrics.fallback("unchecked")
            await self._journal_grant(result.lock)
        if upgrade and (result.fresh or result.upgraded) and result.lock is not None:
            # Not a grant of this call to give back (a batch refused later, a caller gone):
            # its release would free the hold the pull had before it. Across the sides it is
            # answered as a lock the pull held already.
            return AcquireResult.granted(result.lock, fresh=False)
        return result

    async def _undo_grant(self, locker: Locker, lock: Lock, owner: Owner) -> bool:
        """Release ``lock``, granted by a request that backs off, unless the pull's other
        request was answered with it since (then it stays theirs: ``False``; as for a caller
        gone, :meth:`give_back_answer`). On the enhanced side by its fencing token: a hold
        the pull took of the key anew since (another request's, a new token) is not this
        grant, and stays (``False``); legacy's by owner (its holds carry no token)."""
        leaving = self._answers.leave(lock)
        if leaving is None:
            return False
        try:
            await give_back_grant(locker, lock, owner)
        except LockNotOwned:
            return False
        finally:
            self._answers.left(lock, leaving)
        return True

    def _double_held(self, mine: Lock, other: Lock) -> None:
        """Report ``mine`` and ``other``, holds of one key by different pulls on the two
        sides (reconciliation forgets the report once one of them is released)."""
        if self.migration is not None:
            legacy, enhanced = (mine, other) if mine.backend == "legacy" else (other, mine)
            self.migration.conflicts.report(key=mine.key, legacy=legacy, enhanced=enhanced,
                                            source="acquire")

    async def _holder_on(self, locker: Locker, key: str) -> tuple[Lock | None, bool]:
        """Who holds ``key`` on ``locker``, and whether the answer is missing because the
        enhanced side did not answer (legacy's own failure is raised)."""
        if locker is self.legacy:
            return await locker.get(key), False
        # The enhanced side is down while checking a legacy key: legacy keeps serving its own
        # keys (in both fallback modes); the grant is journaled and reconciled. An overloaded
        # check is raised (see _peek): a 503 overloaded, no fall-back.
        held, answered = await _peek(locker, key)
        return held, not answered

    async def _journal_grant(self, lock: Lock) -> None:
        if self.migration is not None:
            await self.migration.record_fallback_grant(lock)

    async def _fallback_action(self, key: str, repo: str, error: BackendUnavailable,
                               routed: Side = "enhanced") -> FallbackAction:
        """The enhanced side did not answer: count and announce what the fallback setting does
        (``legacy`` serves the request there, ``refused`` answers ``unavailable``).

        ``legacy`` refuses too while another replica reaches the enhanced store: that replica
        grants the key there, and a grant on legacy here would split it across the sides (the
        outage is this replica's alone; the readiness probe takes it out of its Service).

        A key ``routed`` to legacy (taken on both sides: moving, or this replica isolated)
        served there is no request sent to legacy for want of enhanced: legacy decides it
        anyway, and only its look at the enhanced side is missing: ``unchecked``, as for a
        legacy key whose look alone failed."""
        action: FallbackAction = ("legacy" if self._snapshot().config.fallback == "legacy"
                                  else "refused")
        peer = None
        if action == "legacy" and self._peer_on_enhanced is not None:
            peer = await self._peer_on_enhanced()
            if peer is not None:
                action = "refused"
        if action == "legacy" and routed == "legacy":
            action = "unchecked"
        self.metrics.fallback(action)
        seen: dict[str, Any] = {} if peer is None else {"peer": peer}  # whom the store answers
        self.events.publish("fallback", key=key, action=action, error=str(error), repo=repo,
                            **seen)
        return action

    async def _fall_back(self, request: LockRequest, error: BackendUnavailable,
                         routed: Side) -> AcquireResult:
        if await self._fallback_action(request.key, request.project.repo_full_name,
                                       error, routed) != "refused":
            result = await self._acquire_on(self.legacy, None, request)
            if result.acquired and result.lock is not None:
                await self._journal_grant(result.lock)
            return result
        return AcquireResult.refused(request.key, Reason.UNAVAILABLE)

    def release(self, key: str, *, owner: Owner | None = None,
                token: int | None = None) -> Coroutine[Any, Any, Lock | None]:
        """Free ``key`` on whichever side holds it; with ``token`` the enhanced side frees only
        the hold with that fencing token (legacy's holds have none: released by owner)."""
        if self._enhanced() is None:  # never enabled here: only legacy can hold it
            # Legacy's own coroutine, not one that awaits it: the router adds no frame.
            return self.legacy.release(key, owner=owner)
        return self._release_both(key, owner, token)

    async def _gated(self, call: Coroutine[Any, Any, _Done]) -> _Done:
        """``call``, run through the switch gate (:mod:`.switch_gate`), when there is one."""
        gate = self.gate
        if gate is None:
            return await call
        try:
            passed = await gate.enter()
        except BaseException:
            call.close()  # never started: nothing to undo
            raise
        try:
            return await call
        finally:
            gate.leave(passed)

    def give_back(self, lock: Lock, *, owner: Owner) -> Coroutine[Any, Any, Lock | None]:
        """Free the grant answered with ``lock`` to ``owner``'s request, whose caller will never
        use it (it went away before the answer), each side by what that side can judge. The
        enhanced side by the lock's fencing token when it issued the lock: a retry of the
        request may hold the key again for the same pull under a new token, which is not this
        answer's to free (``LockNotOwned``). By owner when legacy answered: a key moving back to
        legacy is taken on both sides and answered with legacy's lock, whose token the enhanced
        hold does not carry. Legacy always by owner (its holds carry no token). (The enhanced
        locker gives back its own grants by their tokens: every lock it answers is its side's.)
        A release without a pull frees a lock it read the same way (``owner``: the lock's own),
        so a hold taken after the read, which the caller's rights were not asked about, stays.
        """
        return give_back_grant(self, lock, owner)

    async def give_back_answer(self, lock: Lock, *, owner: Owner) -> Lock | None:
        """:meth:`give_back` for a grant answered to a caller that went away, unless another
        request of the same pull was answered with the same hold meanwhile (in this process):
        then ``HoldAnsweredAgain``, the hold staying theirs. An answer of the hold coming while
        it is given back waits for the give-back and asks again."""
        leaving = self._answers.leave(lock)
        if leaving is None:
            raise HoldAnsweredAgain(lock)
        try:
            return await self.give_back(lock, owner=owner)
        finally:
            self._answers.left(lock, leaving)

    async def _release_both(self, key: str, owner: Owner | None,
                            token: int | None = None) -> Lock | None:
        gate = self.gate
        if gate is None:
            return await self._release_on_both(key, owner, token)
        passed = gate.passing() or await gate.enter()  # the switch gate (:mod:`.switch_gate`)
        try:
            return await self._release_on_both(key, owner, token)
        finally:
            gate.leave(passed)

    async def _release_on_both(self, key: str, owner: Owner | None,
                               token: int | None = None) -> Lock | None:
        outcomes: list[Lock | LockNotOwned | BackendUnavailable | None] = []
        enhanced = self.enhanced
        namespace = None if enhanced is None else self._legacy_checked_by(enhanced, key)
        if enhanced is not None and namespace is not None:
            # The enhanced release checks that legacy holds nothing for the key in its own
            # transaction: legacy's release, asked first, would have released nothing. When
            # legacy holds anything for the key, nothing was done: each side is asked below.
            # An outage of the enhanced side is weighed as when legacy was asked first.
            try:
                with checking_other_side(namespace, key):
                    released = await enhanced.release(key, owner=owner, token=token)
            except OtherSideHolds:
                pass
            except LockNotOwned as error:
                outcomes = [None, error]  # legacy was found holding nothing
            except BackendUnavailable as error:
                outcomes = [await self._released_on(self.legacy, key, owner), error]
            else:
                # Legacy held nothing and the enhanced side answered: nothing failed, nothing
                # is left unreached, so the weighing below comes to this (without its list).
                if self.migration is not None:
                    self.migration.after_release(key, owner, released=released)
                return released
        if not outcomes:
            outcomes = [await self._released_on(locker, key, owner, token)
                        for locker in self._lockers()]
        released = None
        failure: LockNotOwned | BackendUnavailable | None = None
        unreached = False
        for side, outcome in enumerate(outcomes):  # legacy's first, then enhanced's
            if isinstance(outcome, LockNotOwned | BackendUnavailable):
                failure = outcome
                unreached = unreached or (isinstance(outcome, BackendUnavailable) and side > 0)
            else:
                released = outcome or released
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

    @staticmethod
    async def _released_on(
        locker: Locker, key: str, owner: Owner | None, token: int | None = None
    ) -> Lock | LockNotOwned | BackendUnavailable | None:
        """What releasing ``key`` on ``locker`` released, or the error it answered."""
        try:
            return await locker.release(key, owner=owner, token=token)
        except (LockNotOwned, BackendUnavailable) as error:
            return error

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

    def held_as_seen(self, key: str) -> Lock | None:
        """The lock the enhanced side's store last wrote or read as ``key``'s holder in this
        process, without asking the store (:meth:`StoreBackend.held_as_seen`); ``None`` when
        none is known or the key is the legacy side's. A guess that another writer may have
        made stale: good for a release by its fencing token (``release(key, owner=...,
        token=...)``), which frees nothing of the enhanced side unless it still holds
        exactly that lock, not for an answer."""
        enhanced = self._enhanced()
        if enhanced is None or self.side_for(key) != "enhanced":
            return None
        store = backend_of(enhanced)
        return store.held_as_seen(key) if isinstance(store, StoreBackend) else None

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
        done, unreached = await self.release_by_pull_reachable(repo, pull)
        if unreached:
            raise BackendUnavailable("the enhanced store did not answer (release by pull)")
        return done.released

    def release_by_pull_reachable(
        self, repo: str, pull: int
    ) -> Coroutine[Any, Any, tuple[PullClosed, Sides]]:
        """Drop the pull's queued requests, then release its locks on every side that
        answers; say which sides did not.

        Queued requests go first, as when the pull closes (:meth:`close_pull`): a request of
        the pull still waiting would otherwise be granted later and hold its key for a pull
        whose locks were let go, and nobody would release it again. Its caller is answered
        ``cancelled``. With the enhanced side away, what legacy holds (what it granted in
        fallback) is released now and journaled, so reconciling never adopts it into enhanced;
        locks the pull held on the enhanced side, and its requests queued there, stay until it
        is asked again."""
        return self._gated(self._release_by_pull_reachable(repo, pull))

    async def _release_by_pull_reachable(
        self, repo: str, pull: int
    ) -> tuple[PullClosed, Sides]:
        try:
            cancelled, _ = await self._drop_queued(repo, pull, closed_at=None)
        except BackendUnavailable:
            cancelled = []  # the enhanced side's release below says it did not answer
        released: Locks = []
        unreached: Sides = []
        for locker in self._lockers():
            try:
                released += await locker.release_by_pull(repo, pull)
            except BackendUnavailable as error:
                if locker is self.legacy or self.migration is None:
                    raise
                unreached.append("enhanced")
                # Legacy's part is done; copies left on enhanced are freed on reconcile.
                for lock in released:
                    await self.migration.record_partial_release(lock)
                if isinstance(error, PartlyReleased):  # its first parts did commit
                    released += error.released
        locks = self._one_per_key(released)
        if self.migration is not None:
            self.migration.after_release_by_pull(repo, pull, locks)
        return PullClosed(released=locks, cancelled=cancelled), unreached

    # --- batches ---------------------------------------------------------------------------
    async def acquire_batch(self, request: BatchLockRequest) -> BatchResult:
        """Every lock or none; a key held for another project refuses the batch (collision).

        A batch whose keys route to both sides waits on the enhanced part first (all or
        nothing, holding none of it while waiting), then takes the legacy part fail fast, and
        gives the enhanced part back if the legacy part is refused: it never holds a partial set
        while it waits. A key whose stored lock cannot be read refuses the batch
        (``unreadable``)."""
        gate = self.gate
        if gate is None or self._enhanced() is None:
            return await self._acquire_batch_answered(request)
        passed = await gate.enter()
        try:
            if passed.switching is None or self._wait_seconds(request) is None:
                return await self._acquire_batch_answered(request)
            return await self._across_switch(request, passed, self._acquire_batch_answered)
        finally:
            gate.leave(passed)

    async def _acquire_batch(self, request: BatchLockRequest) -> BatchResult:
        if self.withheld is not None:
            return BatchResult(acquired=False, lock_key=request.locks[0].key,
                               reason=Reason.UNAVAILABLE, error=self.withheld)
        try:
            for item in request.locks:
                refused = identity.refuse_ambiguous(item.key, item.project, item.workspace,
                                                    await self._holder_if_known(item.key))
                if refused is not None:
                    return BatchResult(acquired=False, lock_key=item.key,
                                       reason=refused.reason, holder=refused.holder,
                                       error=refused.error)
            return await self._acquire_batch_routed(request)
        except LockUnreadable as error:
            return BatchResult(acquired=False, lock_key=error.found.key,
                               reason=Reason.UNREADABLE, error=str(error))

    async def _held_on_legacy(
        self, items: Sequence[BatchItem], owner: Owner
    ) -> BatchResult | None:
        """The refusal of a batch part whose key another pull holds on the legacy side."""
        for item in items:
            held, _ = await self._holder_on(self.legacy, item.key)
            if (foreign := _foreign(held, owner)) is not None:
                return BatchResult(acquired=False, lock_key=item.key, reason=Reason.HELD,
                                   holder=foreign)
        return None

    async def _acquire_batch_routed(self, request: BatchLockRequest) -> BatchResult:
        migration = self.migration
        loop = asyncio.get_running_loop()
        wait = self._wait_seconds(request)
        deadline = None if wait is None else loop.time() + wait
        while True:
            if migration is not None:
                await migration.transitions.refresh()  # as for an acquire: a late view is read
            # Counted as running in this routing round, as an acquire is: a move does not
            # settle (its counters aligned) while a batch routed by the weight before it runs.
            with (migration.admit(request.locks[0].key) if migration is not None
                  else contextlib.nullcontext()):
                result = await self._acquire_batch_planned(request)
            if result is not None:
                return result
            if deadline is not None:  # what is left of its wait
                left = max(deadline - loop.time(), 0.001)
                request = request.model_copy(update={"wait": timedelta(seconds=left)})

    async def _acquire_batch_planned(self, request: BatchLockRequest) -> BatchResult | None:
        """:meth:`_acquire_batch_routed` once; ``None``: a token of a moving key fell below
        legacy's, the grant was given back, ask again (:meth:`_above_legacy`)."""
        enhanced = self._queueing()
        on_enhanced: list[BatchItem] = []
        on_legacy: list[BatchItem] = []
        for item in request.locks:
            (on_enhanced if self.side_for(item.key) == "enhanced" else on_legacy).append(item)
        if enhanced is None or not on_enhanced:
            return await batch.acquire_one_by_one(self, request)
        migration = self.migration
        moving = ({i.key for i in on_enhanced if migration.transitions.plan(i.key).both}
                  if migration is not None else set[str]())
        owner = request.owner
        # still held on the legacy side: not free here either
        if (refused := await self._held_on_legacy(on_enhanced, owner)) is not None:
            return refused
        mine_before: set[str] = set()
        for key in request.keys:
            lock = (await _peek(enhanced, key))[0]
            if lock is None or not lock.owned_by(*owner):
                continue
            if self.migration is not None and lock.backend == "enhanced":
                # a lock the pull held already: unless a journaled release names it (as in
                # _reentered), then freed first and granted anew by this batch
                if await self.migration.fallback.before_reentrant(lock) == "again":
                    # The copy is gone; the pull may hold the key anew meanwhile (through
                    # another replica): that lock is not this batch's to give back.
                    lock = (await _peek(enhanced, key))[0]
                    if lock is None or not lock.owned_by(*owner):
                        continue
            mine_before.add(key)
        part = request.model_copy(update={"locks": on_enhanced})
        try:
            if migration is not None and migration.journal_pending:
                for item in on_enhanced:  # as in _route
                    await migration.before_acquire(item.key)
            first = await enhanced.acquire_batch(part)
        except StoreBusy:
            raise  # as in _route: overloaded, no fall-back
        except BackendUnavailable as error:
            if not await _unreachable(enhanced):
                raise  # as in _route: legacy itself failed, there is nothing to fall back to
            if await self._fallback_action(on_enhanced[0].key, owner[0], error) == "legacy":
                # a hold the pull had already is noted as answered again (see _Answers)
                served = await batch.acquire_one_by_one(self.legacy, request,
                                                        held_already=self._answers.again)
                for lock in served.locks:  # reconciled into enhanced when it answers again
                    await self._journal_grant(lock)
                return served
            return BatchResult(acquired=False, lock_key=on_enhanced[0].key,
                               reason=Reason.UNAVAILABLE)
        if not first.acquired:
            return first
        # The keys the pull held already when the store granted, as the store tells: the
        # look above is older, and the pull's other request may have taken one of them since
        # (or let one go). Only a store that does not say key by key is answered by the look.
        kept = first.kept_or(frozenset(mine_before))
        for lock in first.locks:
            if lock.key in kept and lock.key not in first.upgraded:  # its pull's: answered again
                self._answers.again(lock)

        async def give_back() -> None:
            """Undo what this batch granted on enhanced: a hold its pull had there stays, and
            so does one answered since to the pull's other request (theirs now, as after a
            caller gone: :meth:`give_back_answer`)."""
            for lock in first.locks:
                if lock.key not in kept:
                    await self._undo_grant(enhanced, lock, owner)

        # the legacy side granted one of them meanwhile: back off
        try:
            refused = await self._held_on_legacy(on_enhanced, owner)
        except LockUnreadable:
            await give_back()
            raise
        if refused is not None:
            await give_back()
            return refused
        fresh = [lock for lock in first.locks if lock.key in moving - kept]
        if fresh:
            try:
                above = await self._above_legacy(enhanced, request, fresh)
            except BaseException:
                await asyncio.shield(give_back())
                raise
            if above is not True:
                await give_back()
                return above
        # The keys not in the enhanced part, as split before it: a weight move while it
        # waited may route one of them to enhanced now, and it still has to be taken.
        if not on_legacy:
            return first
        try:
            rest = await batch.acquire_one_by_one(
                self, request.model_copy(update={"locks": on_legacy, "wait": None}))
        except StoreBusy:  # a legacy key's check of enhanced: overloaded, undone (a 503)
            await asyncio.shield(give_back())
            raise
        if not rest.acquired:
            await give_back()
            return rest
        by_key = {lock.key: lock for lock in [*first.locks, *rest.locks]}
        return BatchResult.granted([by_key[key] for key in request.keys],
                                   kept=None if rest.kept is None else kept | rest.kept,
                                   upgraded=first.upgraded | rest.upgraded)

    async def _above_legacy(self, enhanced: Locker, request: BatchLockRequest,
                            locks: Locks) -> BatchResult | Literal[True] | None:
        """Whether the fresh enhanced grants ``locks`` of moving keys (legacy served them
        until the move) carry tokens above every token legacy handed out for their keys, as
        a single acquire's do (:func:`.handover.acquire_both`). Legacy keeps no counter to
        read: each key is taken there fail fast (the batch holds it on enhanced, so legacy
        hands it to nobody else), and the token it gets is above every one legacy handed out
        before; the grant is given back at once (a hold the pull had there stays). ``True``:
        every token is above, and legacy's counter is raised past each, as after a single
        acquire. ``None``: one is not, the enhanced counter of its key is raised past legacy's
        and the batch is to give its grants back and ask again. The refusal when another pull
        took one of them on legacy meanwhile (the batch backs off, as after its own look)."""
        owner = request.owner
        mine = {lock.key: lock for lock in locks}
        above: Literal[True] | None = True
        for asked in request.requests():
            if (lock := mine.get(asked.key)) is None:
                continue
            taken = await self.legacy.acquire(asked.model_copy(update={"wait": None}))
            legacy = taken.lock
            if not taken.acquired or legacy is None:
                return BatchResult(acquired=False, lock_key=asked.key,
                                   reason=taken.reason or Reason.HELD, holder=taken.holder)
            # the highest token legacy handed out: before this fresh grant's, or the pull's own
            issued = legacy.fencing_token - 1 if taken.fresh else legacy.fencing_token
            try:
                if issued >= lock.fencing_token:
                    await raise_counter(enhanced, asked.key, legacy.fencing_token)
                    above = None
                else:
                    await raise_counter_after(self.legacy, lock)
            finally:
                if taken.fresh:
                    await asyncio.shield(self.legacy.release(asked.key, owner=owner))
        return above

    def release_batch(self, keys: Sequence[str], *,
                      owner: Owner | None = None) -> Coroutine[Any, Any, Locks]:
        return self._gated(batch.release_all(self, keys, owner=owner))

    # --- queues, leases and admin (the enhanced side only) --------------------------------
    def _queueing(self) -> EnhancedLocker | None:
        """The enhanced locker, once built (queues live there only). Also while enhanced
        locking is switched off: requests queued before that still wait there and are
        granted when the key is released, so they are listed, cancelled and dropped with
        their closed pull as before (no new request is queued: every key routes to legacy)."""
        locker = self.enhanced
        return locker if isinstance(locker, EnhancedLocker) else None

    async def queue(self, key: str) -> Waiters:
        """``key``'s waiters in service order (legacy has no queues)."""
        enhanced = self._queueing()
        return [] if enhanced is None else await enhanced.queue(key)

    def cancel_waiter(self, key: str, waiter_id: str) -> Coroutine[Any, Any, bool]:
        return self._gated(self._cancel_waiter(key, waiter_id))

    async def _cancel_waiter(self, key: str, waiter_id: str) -> bool:
        enhanced = self._queueing()
        return enhanced is not None and await enhanced.cancel_waiter(key, waiter_id) is not None

    def close_pull(
        self, repo: str, pull: int, *, closed_at: datetime | None = None
    ) -> Coroutine[Any, Any, PullClosed]:
        """A pull request was closed or merged: drop its queued requests, then release its
        locks (both sides). With ``closed_at`` only what it asked for or took by then (plus
        :data:`CLOSE_TOLERANCE`) goes: a close told again after the pull was reopened and
        locked anew changes nothing."""
        return self._gated(self._close_pull(repo, pull, closed_at=closed_at))

    async def _close_pull(
        self, repo: str, pull: int, *, closed_at: datetime | None = None
    ) -> PullClosed:
        if closed_at is not None:  # VCS times are whole seconds, and clocks differ a little
            closed_at += CLOSE_TOLERANCE
        # first the queue, so no release hands a key to this pull
        cancelled, granted_meanwhile = await self._drop_queued(repo, pull, closed_at=closed_at)
        released: Locks = []
        for lock in await self.list(repo=repo, pull=pull):
            if (closed_at is not None and lock.acquired_at > closed_at
                    and lock.key not in granted_meanwhile):
                continue
            try:
                if (gone := await self.release(lock.key, owner=(repo, pull))) is not None:
                    released.append(gone)
            except LockNotOwned:
                continue  # taken by another pull since the list: not this pull's to release
        return PullClosed(released=released, cancelled=cancelled)

    async def _drop_queued(
        self, repo: str, pull: int, *, closed_at: datetime | None
    ) -> tuple[WaiterIds, set[str]]:
        """Cancel the pull's queued requests (those queued by ``closed_at``, when given),
        wherever they wait: the store tells the replica each one waits on. Answers the waiter
        ids cancelled and the keys of those granted between the look and the cancel (their
        locks are the pull's now)."""
        cancelled: WaiterIds = []
        granted_meanwhile: set[str] = set()
        enhanced = self._queueing()
        if enhanced is None:
            return cancelled, granted_meanwhile
        for key, waiter in await enhanced.waiting_for(repo, pull):
            if closed_at is None or waiter.enqueued_at <= closed_at:
                if await enhanced.cancel_waiter(key, waiter.id) is not None:
                    cancelled.append(waiter.id)
                else:  # granted between the look and the cancel: its locks go too
                    granted_meanwhile.update(waiter.keys)
        return cancelled, granted_meanwhile

    def force_unlock(self, key: str, *,
                     checked: Sequence[Lock] = ()) -> Coroutine[Any, Any, Lock | None]:
        """Free ``key`` on whichever side holds it; the enhanced side serves its queue. Told to
        the migration as any release without a pull (shadow mode replays it).

        ``checked``: the holds the caller's right was asked about, as read. Only those go:
        the enhanced side's by their fencing tokens, legacy's by their owners (its holds carry
        no token). A hold taken since the read, which the caller's right was not asked about,
        stays; when nothing was freed for that, ``LockNotOwned``. Without ``checked`` (the
        key was free or unreadable when read, and the right was asked on every repository),
        whatever holds the key goes."""
        return self._gated(self._force_unlock(key, tuple(checked)))

    async def _force_unlock(self, key: str, checked: tuple[Lock, ...] = ()) -> Lock | None:
        if not checked:
            released = await self.legacy.release(key)
            enhanced = self.enhanced
            if isinstance(enhanced, EnhancedLocker):
                released = await enhanced.force_unlock(key) or released
        else:
            released = await self._force_unlock_checked(key, checked)
        if self.migration is not None:
            self.migration.after_release(key, None, released=released)
        return released

    async def _force_unlock_checked(self, key: str, checked: tuple[Lock, ...]) -> Lock | None:
        owners = list(dict.fromkeys(lock.owner for lock in checked))
        tokens = frozenset(lock.fencing_token for lock in checked if lock.backend == "enhanced")
        released: Lock | None = None
        changed: LockNotOwned | None = None
        for owner in owners:
            try:
                released = await self.legacy.release(key, owner=owner) or released
            except LockNotOwned as error:
                changed = error
        enhanced = self.enhanced
        if isinstance(enhanced, EnhancedLocker):
            try:
                if tokens:
                    released = await enhanced.force_unlock(key, checked=tokens) or released
                else:  # a legacy hold was read: the enhanced side's copy of it, by owner
                    for owner in owners:
                        released = await enhanced.release(key, owner=owner) or released
            except LockNotOwned as error:
                changed = error
        if released is None and changed is not None:
            raise changed
        return released

    def refresh(self, key: str, *, owner: Owner,
                ttl: timedelta | None) -> Coroutine[Any, Any, Lock | None]:
        """Extend the lease of ``key``; ``None`` when nothing holds it.

        An enhanced store that does not answer is an outage (``BackendUnavailable``, 503),
        never "not held": a lease is only on the enhanced side, so nothing else can say.
        """
        return self._gated(self._refresh(key, owner=owner, ttl=ttl))

    async def _refresh(self, key: str, *, owner: Owner, ttl: timedelta | None) -> Lock | None:
        enhanced = self.enhanced
        if isinstance(enhanced, EnhancedLocker):
            try:
                return await enhanced.refresh(key, owner=owner, ttl=ttl)
            except LockNotHeld:
                pass
        if await self.legacy.get(key) is not None:
            raise InvalidRequest(f"key: {key} is held on the legacy side, whose locks have no "
                                 "lease (Atlantis semantics)", field="key", key=key)
        return None


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
