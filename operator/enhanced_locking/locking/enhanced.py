"""The enhanced locker: Atlantis's semantics plus queues, leases, fencing, batches and more.

It reads the live configuration on every call (``settings()``), so a feature flag or a timeout
changed through the provider applies to the next request without rebuilding anything:

* ``priority-queue`` switches the service order between priorities-with-aging and FIFO;
* ``retries`` wraps every backend call in jittered backoff (:mod:`.retrying`);
* ``deadlock-detection`` checks the wait-for graph after each enqueue (:mod:`.deadlock`);
* ``default-timeout`` / ``max-timeout`` bound waits, ``lock-ttl`` is the default lease;
* ``max-queue-size``, ``starvation-threshold``, ``max-priority-boost`` shape queues.

Waiting is opt-in per request, as in Atlantis: no ``wait`` fails fast; ``wait: true`` waits up
to ``default-timeout``; a duration waits that long, and more than ``max-timeout`` is refused.
The backend keeps the queues and hands locks over (:mod:`enhanced_locking.backends.waiting`);
the caller's side of waiting is :mod:`.queueing`, leases are :mod:`.leasing`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol, TypeVar

from enhanced_locking import policies
from enhanced_locking.backends.base import (
    Backend,
    GivesBack,
    Owner,
    QueueBackend,
    StoreBackend,
    parts_of,
)
from enhanced_locking.backends.waiting import (
    GoneGrantUnknown,
    Grant,
    GrantedUnheard,
    GrantUnknown,
    Handoff,
    HandoffUnknown,
    Notice,
    Outcome,
    PullPartlyReleased,
    PullRelease,
    QueuePolicy,
    Status,
    Wait,
    Waiter,
    Waiters,
    effective_level,
    epoch_ms,
)
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.durations import format_duration
from enhanced_locking.events import Bus, EventType
from enhanced_locking.locking import batch, deadlock, queueing, visibility
from enhanced_locking.locking.base import AtlantisCalls
from enhanced_locking.locking.leasing import LeaseTimers
from enhanced_locking.locking.retrying import attempt, retrying
from enhanced_locking.metrics import Count, Metrics, Timing
from enhanced_locking.types import (
    AcquireResult,
    BackendUnavailable,
    BatchLockRequest,
    BatchResult,
    Candidate,
    CycleOwner,
    InvalidRequest,
    Lock,
    LockingError,
    LockNotOwned,
    LockRequest,
    Locks,
    LockUnreadable,
    PartlyReleased,
    Priority,
    Reason,
    Side,
    utcnow,
)

__all__ = ["EnhancedLocker"]

log = logging.getLogger(__name__)

T = TypeVar("T")

ReleaseHow = Literal["released", "abandoned", "rule", "force-unlocked", "expired", "by-pull"]
"""How a lock left its holder (the ``how`` of the releases metric and of the event's details;
docs/04-monitoring.md lists them from here)."""

_RELEASE_EVENT: dict[ReleaseHow, EventType] = {
    "released": "released", "abandoned": "released", "rule": "released",
    "force-unlocked": "force-unlocked", "expired": "expired", "by-pull": "released"}
"""The event a release publishes: a lock given back (by its holder, by the service for a caller
that had gone, as a rule changed, with the rest of its pull's) is ``released``, its ``how``
saying which."""
Result = TypeVar("Result", AcquireResult, BatchResult)
"""The caller's answer to an acquire: one key's, or a batch's."""
_Made = TypeVar("_Made", AcquireResult, BatchResult, covariant=True)


class Answers(Protocol[_Made]):
    """How an acquire's answer is made, in the caller's own shape: the acquire's steps make
    that answer where they decide (no record of their own in between, shaped afterwards)."""

    def granted(self, locks: tuple[Lock, ...], *, fresh: bool,
                kept: frozenset[str] | None = None,
                upgraded: frozenset[str] = frozenset()) -> _Made:
        """``locks`` are held now; ``fresh``: granted by this call (false: the pull's own
        locks, asked for again); ``kept``: the keys of those the pull held already, key by key
        (``None``: not said); ``upgraded``: those of ``kept`` whose shared hold this call
        upgraded to exclusive in place."""
        ...

    def refused(self, key: str, reason: Reason, holder: Lock | None = None, *,
                position: int | None = None, cycle: list[CycleOwner] | None = None,
                message: str | None = None) -> _Made:
        """Not granted on ``key`` (the first blocked key), for ``reason``."""
        ...


def _cycle(owners: list[CycleOwner] | None) -> dict[str, Any]:
    """A refusal's cycle fields: the owners' names, and the owners typed."""
    if owners is None:
        return {}
    return {"cycle": [owner.name for owner in owners], "cycle_owners": owners}


def _granted_anew(fresh: bool, kept: frozenset[str] | None, key: str,
                  upgraded: frozenset[str]) -> bool:
    """Whether a grant (``fresh``: by this call) made ``key``'s lock anew, announced as such:
    not one of ``kept``, the keys whose locks its pull held already (answered unchanged:
    nothing was granted), unless its pull's shared hold was ``upgraded`` (a new token)."""
    return key in upgraded or (fresh and not (kept and key in kept))


def _given_back(fresh: bool, kept: frozenset[str] | None, key: str) -> bool:
    """Whether a give-back of a grant (``fresh``: by this call) releases ``key``'s lock: not
    one of ``kept``, the keys its pull held already, an upgrade of its shared hold among them
    (the pull keeps the exclusive lock it asked for, as a pull asking again keeps its lock)."""
    return fresh and not (kept and key in kept)


def _upgrades(locks: tuple[Lock, ...], upgraded: frozenset[str]) -> tuple[Lock, ...]:
    """The locks of ``locks`` whose key is one of ``upgraded``: a pull's shared hold
    upgraded to exclusive in place (a new token)."""
    return tuple(lock for lock in locks if lock.key in upgraded)


class _GiveBackUnheard:
    """The give-back of a waiter's grant whose caller went away before it heard of it (the
    ``give_back`` :mod:`.queueing` is given for that waiter): an upgrade of its pull's shared
    hold it holds is kept (never given back: :func:`_given_back`) and announced
    ``granted-from-queue``, with the waiter's ids, as when its caller hears it; the rest is
    given back (:meth:`EnhancedLocker._give_back`). A give-back tried again while the store
    does not answer announces nothing twice."""

    __slots__ = ("_locker", "_request_id", "_started", "_told", "_waiter_id")

    def __init__(self, locker: EnhancedLocker, waiter_id: str, request_id: str | None) -> None:
        self._locker = locker
        self._waiter_id = waiter_id
        self._request_id = request_id
        self._started = time.perf_counter()
        self._told: set[tuple[str, int]] = set()
        """The upgrades announced (key, fencing token)."""

    async def __call__(self, notice: Notice) -> None:
        if notice.upgraded:
            upgrades = [lock for lock in _upgrades(notice.locks, notice.upgraded)
                        if (lock.key, lock.fencing_token) not in self._told]
            self._told.update((lock.key, lock.fencing_token) for lock in upgrades)
            self._locker._told_upgrades_kept(upgrades, served={
                "waiterId": self._waiter_id, "requestId": self._request_id,
                "waitedMs": round((time.perf_counter() - self._started) * 1000, 3)})
        await self._locker._give_back(notice)


class _OneKey:
    """One key's answer (:class:`AcquireResult`)."""

    @staticmethod
    def granted(locks: tuple[Lock, ...], *, fresh: bool,
                kept: frozenset[str] | None = None,
                upgraded: frozenset[str] = frozenset()) -> AcquireResult:
        if upgraded:
            return AcquireResult.granted(locks[0], fresh=False, upgraded=True)
        return AcquireResult.granted(locks[0], fresh=fresh)

    @staticmethod
    def refused(key: str, reason: Reason, holder: Lock | None = None, *,
                position: int | None = None, cycle: list[CycleOwner] | None = None,
                message: str | None = None) -> AcquireResult:
        return AcquireResult.refused(key, reason, holder, queue_position=position,
                                     **_cycle(cycle), error=message)


class _Batch:
    """A batch's answer (:class:`BatchResult`): every lock, or the key that blocked it."""

    @staticmethod
    def granted(locks: tuple[Lock, ...], *, fresh: bool,
                kept: frozenset[str] | None = None,
                upgraded: frozenset[str] = frozenset()) -> BatchResult:
        # Not fresh: the pull held every key already.
        return BatchResult.granted(
            locks, kept=kept if fresh else frozenset(lock.key for lock in locks),
            upgraded=upgraded)

    @staticmethod
    def refused(key: str, reason: Reason, holder: Lock | None = None, *,
                position: int | None = None, cycle: list[CycleOwner] | None = None,
                message: str | None = None) -> BatchResult:
        return BatchResult(acquired=False, lock_key=key, reason=reason, holder=holder,
                           queue_position=position, **_cycle(cycle), error=message)


_ONE_KEY: Answers[AcquireResult] = _OneKey()
_BATCH: Answers[BatchResult] = _Batch()


@dataclass(frozen=True, slots=True)
class _Live:
    """What every call reads of one config, read from it once: a setting of the config is
    read through pydantic's ``__getattr__`` hook (about 400 instructions a read), a slot of
    this record is not. Made anew for each new config (configs are frozen)."""

    config: EnhancedLockingConfig | None
    """The config it was read from (``None``: none yet)."""
    policy: QueuePolicy
    retries: bool
    priority_rules: bool
    lock_ttl: timedelta | None
    """The default lease (``lock-ttl``); ``None``: none."""

    @classmethod
    def of(cls, config: EnhancedLockingConfig, policy: QueuePolicy) -> _Live:
        return cls(config=config, policy=policy, retries=config.retries,
                   priority_rules=bool(config.policies.priority_rules),
                   lock_ttl=config.lock_ttl if config.lock_ttl > _ZERO else None)


class EnhancedLocker(AtlantisCalls):
    side: Side = "enhanced"

    def __init__(
        self,
        backend: Backend,
        *,
        settings: Callable[[], EnhancedLockingConfig],
        events: Bus,
        metrics: Metrics,
    ) -> None:
        if not isinstance(backend, QueueBackend):
            raise BackendUnavailable(
                f"the {backend.kind} backend keeps no queues; the enhanced locker needs one"
            )
        self.backend: QueueBackend = backend
        if isinstance(backend, StoreBackend):  # its hand-offs made on its own, told here
            backend.served_unasked = self._served_unasked
            backend.queue_policy = self.policy
            backend.passed_over = metrics.counting(metrics.waiters_passed_over)
            backend.taken_back = metrics.counting(metrics.grants_taken_back)
        if isinstance(backend, GivesBack):  # its own give-backs, told as this locker's are
            backend.gave_back = self._gave_back
        self.settings = settings
        self.events = events
        self.metrics = metrics
        self.leases = LeaseTimers(self.expire)
        self.holds = visibility.HoldTimes()
        self.rules = visibility.RuleWatch(self)
        self._live = _Live(config=None, policy=QueuePolicy(), retries=False,
                           priority_rules=False, lock_ttl=None)  # made on the first call
        # The metric children of each outcome, found once: every call counts one of a few.
        self._acquire_metrics: dict[str, tuple[Count, Timing]] = {}
        self._release_count: dict[str, Count] = {}
        self._giving_back: set[asyncio.Task[None]] = set()
        """Give-backs of grants whose caller went away mid-call, waiting for the store."""
        self._closed = False
        """Set as :meth:`close` begins: no give-back starts after it (each is logged)."""

    # --- life ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Set lease timers for the leased locks already in the store (after a restart)."""
        for lock in await self.backend.list():
            self.leases.arm(lock.key, lock.expires_at)
        self.rules.changed(self.settings().policies)

    async def close(self) -> None:
        """Stop: the give-backs under way get a moment, then each is cancelled (it logs what
        stays held); one that would start from now on (a grant learnt meanwhile, one whose
        caller left after this) is not started, logged the same way (:meth:`_unheard`). So no
        task of the locker runs on after it, nor calls its store: a closed store would
        open its connection again for it (etcd's channel reconnects), and nothing closes it."""
        self._closed = True  # first: the tasks below are then every one there will be
        giving = list(self._giving_back)
        if giving:  # a moment for those on their way, then each logs what stays
            await asyncio.wait(giving, timeout=1.0)
            for task in giving:
                task.cancel()
            await asyncio.gather(*giving, return_exceptions=True)
        await self.rules.close()
        await self.leases.close()

    async def wake(self) -> None:
        """Serve every queue now (a rule changed, a freeze started or ended); then answer
        ``limited`` each queued batch that asks for more locks of a group than its limit is
        now (lowered since it queued): it can never be granted, however long it waits."""
        policy = self.policy()
        handoff = await self._call("wake", lambda: self.backend.wake(policy=policy))
        self._handed(handoff, how="rule")
        if policy.limits:
            await self._refuse_over_limit(policy)

    async def _refuse_over_limit(self, policy: QueuePolicy) -> None:
        """Take out of their queues the batches waiting for more locks of a group than its
        limit under ``policy``, each told ``limited`` (its caller's answer names the group and
        the limit: :meth:`_queued`). One granted before its cancel keeps its grant, which its
        caller hears (the store's cancel for ``limited`` leaves a granted waiter as it is)."""
        graph = await self._call("wait_graph", lambda: self.backend.wait_graph(policy=policy))
        seen: set[str] = set()
        for entry in graph:
            for waiter in entry.waiters:
                if waiter.id in seen or len(waiter.candidates) < 2:
                    continue
                seen.add(waiter.id)
                if policies.over_limit([parts_of(c) for c in waiter.candidates],
                                       policy.rules) is None:
                    continue
                cancelled = await self._call("cancel", functools.partial(
                    self.backend.cancel, waiter.keys[0], waiter.id, reason=Reason.LIMITED,
                    policy=policy))
                self._handed_on(cancelled.handed)

    # --- settings -----------------------------------------------------------------------------
    def policy(self) -> QueuePolicy:
        return self._policy_for(self.settings())

    def _policy_for(self, config: EnhancedLockingConfig) -> QueuePolicy:
        return self._live_for(config).policy

    def _live_for(self, config: EnhancedLockingConfig) -> _Live:
        live = self._live
        if config is not live.config:  # configs are frozen: a new one is a new object
            live = self._live = _Live.of(config, QueuePolicy.from_config(config))
        return live

    def validate(self, request: LockRequest | BatchLockRequest) -> None:
        """Refuse what cannot be served as asked: never clamp a wait silently."""
        self._validate(request, self.settings())

    @staticmethod
    def _validate(request: LockRequest | BatchLockRequest, config: EnhancedLockingConfig) -> None:
        wait = request.wait
        if isinstance(wait, timedelta) and wait > config.max_timeout:
            raise InvalidRequest(
                f"wait: {format_duration(wait)} is above the maximum "
                f"{format_duration(config.max_timeout)} (enhanced-locking-max-timeout)",
                field="wait",
                key=request.key if isinstance(request, LockRequest) else None,
            )

    def wait_for(self, request: LockRequest | BatchLockRequest) -> timedelta | None:
        """How long this request may wait: none unless it asks (``true``: the default)."""
        return _wait_for(request, self.settings())

    def lease(self, request: LockRequest | BatchLockRequest) -> timedelta | None:
        return _lease(request, self.settings())

    def _call(self, name: str, operation: Callable[[], Awaitable[T]],
              config: EnhancedLockingConfig | None = None, *,
              tried_again: Callable[[BackendUnavailable], object] | None = None,
              ) -> Awaitable[T]:
        # Not a coroutine of its own: the caller awaits the attempt (or the retry loop)
        # directly, one frame less on every call. ``tried_again``: told each error of a try
        # that is tried again (only the last reaches the caller: :func:`retrying`).
        config = self.settings() if config is None else config
        if config.retries:
            return retrying(operation, config=config, metrics=self.metrics, name=name,
                            tried_again=tried_again)
        return attempt(operation, self.metrics)

    # --- acquire ------------------------------------------------------------------------------
    def acquire(self, request: LockRequest) -> Coroutine[None, None, AcquireResult]:
        # The acquire's coroutine itself, not one that awaits it: one frame less per call.
        return self._acquire([request], request, _ONE_KEY)

    def acquire_batch(self, request: BatchLockRequest) -> Coroutine[None, None, BatchResult]:
        """Every lock of the batch or none; while waiting it holds none of them."""
        return self._acquire(request.requests(), request, _BATCH)

    async def _acquire(
        self, requests: Sequence[LockRequest], asked: LockRequest | BatchLockRequest,
        answers: Answers[Result],
    ) -> Result:
        started = time.perf_counter()
        # The live config, read once: nothing awaits before the backend call, so every read
        # of the call would have seen this same object.
        config = self.settings()
        live = self._live
        if config is not live.config:
            live = self._live_for(config)
        # Each step below is the helper named beside it, with the helper's call left out where
        # it would only find nothing to do (a request that does not wait, no priority rules,
        # the config the policy was made of): the path every acquire takes. The request's
        # fields are read from its __dict__, read once (an attribute of a pydantic model is
        # read through its __getattr__ hook, about 400 instructions a read), the config's
        # settings from ``live``.
        asked_fields = asked.__dict__
        asked_wait = asked_fields["wait"]
        if asked_wait is None or asked_wait is False:
            wait = None  # _wait_for; and _validate has no wait to refuse
        else:
            self._validate(asked, config)
            wait = _wait_for(asked, config)
        ttl = asked_fields["ttl"]
        ttl = live.lock_ttl if ttl is None else ttl if ttl > _ZERO else None  # _lease
        policy = live.policy
        priority = (self.priority_for(requests, asked, config) if live.priority_rules
                    else asked_fields["priority"])
        if len(requests) == 1:  # no comprehension: in Python 3.11 it is a frame of its own
            candidates = [_candidate(requests[0], priority=priority)]
        else:
            candidates = [_candidate(r, priority=priority) for r in requests]
        offer = never = None
        if wait is not None and len(candidates) > 1 and policy.limits:
            # More locks of a group than its limit: waiting cannot help, so it does not wait.
            never = policies.over_limit([parts_of(c) for c in candidates], policy.rules)
        if wait is not None and never is None:
            offer = Wait(id=_waiter_id(candidates, asked.request_id), timeout=wait,
                         request_id=asked.request_id, caller=secrets.token_hex(8))
        # The attempt, written here rather than as a coroutine of its own: one frame less on
        # every acquire.
        backend = self.backend
        future = backend.grants.expect(offer.id) if offer is not None else None
        try:
            try:
                if len(candidates) == 1 and not live.retries:
                    # What _call's attempt does, inline: no lambda and no coroutine of its own.
                    self.metrics.enhanced_operation()
                    try:
                        outcome = await backend.acquire_or_enqueue(
                            candidates[0], ttl=ttl, wait=offer, policy=policy)
                    except BackendUnavailable:
                        self.metrics.enhanced_error()
                        raise
                elif len(candidates) == 1:
                    outcome = await self._call("acquire", lambda: backend.acquire_or_enqueue(
                        candidates[0], ttl=ttl, wait=offer, policy=policy), config,
                        tried_again=self._tried_again)
                else:
                    outcome = await self._call("acquire", lambda: backend.acquire_batch(
                        candidates, ttl=ttl, wait=offer, policy=policy), config,
                        tried_again=self._tried_again)
            except BaseException as error:
                if isinstance(error, GrantedUnheard):  # granted as its caller went away
                    if offer is not None and future is not None:
                        backend.grants.forget(offer.id, future)  # (granted: not queued)
                    self._unheard(error.outcome)
                    raise
                if isinstance(error, (GrantUnknown, GoneGrantUnknown)):  # may have granted
                    self._learn_unheard(error)
                if offer is not None and future is not None:
                    backend.grants.forget(offer.id, future)
                    left = _abandoned_for(error)
                    if left is not None:  # the waiter, if any, is withdrawn, a grant given back
                        queueing.abandon(backend, tuple(c.key for c in candidates), offer,
                                         _GiveBackUnheard(self, offer.id, offer.request_id),
                                         self._handed_on, reason=left, policy=self.policy)
                raise
            if outcome.expired:  # leases the step found run out and freed: told first
                self._told_expired(outcome.expired, outcome.handed)
            if outcome.handed:  # waiters the step served before it decided
                self._handed_on(outcome.handed)
            for stale in outcome.superseded:
                self.events.publish(
                    "superseded", key=stale.keys[0], repo=stale.owner[0], pull=stale.owner[1],
                    waiterId=stale.id, requestId=stale.request_id,
                    headCommit=stale.head_commit, by=candidates[0].pull.head_commit)
            if never is not None and outcome.status is not Status.GRANTED:
                # Not its pull's every lock already (granted unchanged): never to be granted.
                answer = answers.refused(never.key, Reason.LIMITED, message=never.message)
            elif outcome.status is not Status.QUEUED:
                if offer is not None and future is not None:
                    backend.grants.forget(offer.id, future)
                answer = self._immediate(
                    outcome, answers, first=candidates[0].key if len(candidates) == 1 else "")
            else:
                assert future is not None and outcome.waiter is not None and offer is not None
                answer = await self._queued(outcome, outcome.waiter, future, offer, answers)
        except LockUnreadable as error:  # never granted over what cannot be read
            answer = answers.refused(error.found.key, Reason.UNREADABLE, message=str(error))
        # The answer's reason read from its __dict__ (a field of a model is read through
        # pydantic's __getattr__ hook, about 400 instructions a read).
        reason = answer.__dict__["reason"]
        label = "acquired" if reason is None else str(reason)
        counted = self._acquire_metrics.get(label)
        if counted is None:
            metrics = self.metrics
            counted = self._acquire_metrics[label] = (
                metrics.counting(metrics.acquires, "enhanced", label),
                metrics.timing(metrics.acquire_seconds, "enhanced", label))
        counted[0].inc()
        counted[1].observe(time.perf_counter() - started)
        return answer

    def priority_for(
        self, requests: Sequence[LockRequest], asked: LockRequest | BatchLockRequest,
        config: EnhancedLockingConfig | None = None,
    ) -> Priority:
        """The priority the rules give this request (the lowest over a batch's keys); a
        client may ask for less, and for more only with the admin right."""
        rules = (self.settings() if config is None else config).policies
        if not rules.priority_rules:
            return asked.priority
        admin = policies.CALLER_IS_ADMIN.get()
        given = [policies.assigned_priority(
            parts_of(_candidate(r, priority=asked.priority)), asked.command, asked.priority,
            rules, admin=admin) for r in requests]
        return min(given, key=lambda p: p.level)

    def _unheard(self, outcome: Outcome) -> None:
        """A grant whose caller went away while the store's call was on its way (the store
        saw the call through: :class:`GrantedUnheard`): the leases its step found run out and
        the waiters it served are told as for any acquire, an upgrade of its pull's shared
        hold is announced as its caller would have heard it (kept: never given back), then
        what it granted is given back by its fencing tokens, as the grant of a waiter whose
        caller left is (its ``released`` event says ``abandoned``; the locks its pull held
        already stay), tried again while the store does not answer
        (:func:`.queueing.give_back_unheard`). Once the locker is closing nothing of it is
        done (no give-back, no lease timer: each would call the store after its close): the
        grant stays held, and that is logged."""
        if self._closed:
            log.warning("closed before the give-back of %s could start (its caller left "
                        "before the answer): it stays held",
                        ", ".join(lock.key for lock in outcome.locks) or "its keys")
            return
        if outcome.expired:
            self._told_expired(outcome.expired, outcome.handed)
        if outcome.handed:
            self._handed_on(outcome.handed)
        for lock in outcome.locks:  # (looked at when its lease ends, if it is still held)
            self.leases.arm(lock.key, lock.expires_at)
        if outcome.upgraded:
            self._told_upgrades_kept(_upgrades(outcome.locks, outcome.upgraded))
        notice = Notice(locks=outcome.locks, fresh=outcome.fresh, kept=outcome.kept)
        self._own(queueing.give_back_unheard(notice, self._give_back))

    def _own(self, task: asyncio.Task[None]) -> None:
        """``task`` is the locker's until it ends: :meth:`close` waits for it or cancels it."""
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    def _learn_later(self, learn: Callable[[], Awaitable[None]], untold: str,
                     key: str | None) -> None:
        """``learn`` (a read of the store after an answer lost, then what it tells) in a task
        of the locker's own; not started once the locker is closing, and cancelled when it
        closes: either is logged as ``untold`` says (``key``: the call's key, if one)."""
        if self._closed:
            log.warning(untold, key or "its keys")
            return

        async def learning() -> None:
            try:
                await learn()
            except asyncio.CancelledError:
                log.warning(untold, key or "its keys")
                raise

        self._own(asyncio.get_running_loop().create_task(learning()))

    def _told_upgrades_kept(self, upgrades: Sequence[Lock], *,
                            served: dict[str, Any] | None = None) -> None:
        """Upgrades of a pull's shared hold (a new token each) granted to a caller that never
        heard of them, kept (never given back: :func:`_given_back`): each announced as when
        its caller hears it, ``acquired`` (``served``: a waiter's, ``granted-from-queue``
        with those details), and its lease timer set."""
        for lock in upgrades:
            if served is None:
                self.events.publish("acquired", lock=lock, key=lock.key)
            else:
                self.events.publish("granted-from-queue", lock=lock, **served)
            self.leases.arm(lock.key, lock.expires_at)

    def _tried_again(self, error: BackendUnavailable) -> None:
        """A try of an acquire that failed and is tried again (retries on): one that may have
        granted (:class:`GrantUnknown`) is learnt as the last try's error is. Its grant, if it
        landed, is its pull's hold when a later try is answered (held already, counted as
        told: the give-back then leaves it), else given back; before, the retry loop dropped
        the error, and with every later try unanswered too the lock stayed held for good."""
        if isinstance(error, GrantUnknown):
            self._learn_unheard(error)

    def _learn_unheard(self, error: GrantUnknown | GoneGrantUnknown) -> None:
        """An acquire whose grant the store may have applied, its answer lost and the store
        not read again in time, whether its caller is answered ``unavailable``
        (:class:`GrantUnknown`) or went away meanwhile (:class:`GoneGrantUnknown`): once the
        store answers, what landed is given back as the grant of a caller that went away
        (:meth:`_unheard`); a caller refused never releases it (nor does Atlantis), nor does
        one gone. Cancelled when the locker closes (logged: what landed may stay held); not
        started once it is closing (logged the same way)."""
        async def learn() -> None:
            outcome = await error.learn()
            if outcome is not None:
                self._unheard(outcome)

        self._learn_later(learn, "closed before the store was read again after an acquire of "
                          "%s whose answer was lost: what it granted may stay held", error.key)

    def _learn_handoff(self, error: HandoffUnknown, *, how: ReleaseHow,
                       until: datetime | None = None) -> None:
        """A release the store may have applied, its answer lost and the store not read
        again in time (:class:`HandoffUnknown`), its caller answered ``unavailable``: once
        the store answers, what landed is told as the call would have told it (``how``), once
        (:func:`_learnt`, given up at ``until``); nothing is told when it did not land.
        Before, only a give-back read it: a release that landed so was never told.
        Cancelled when the locker closes (logged: what landed then goes untold); not started
        once it is closing (logged the same way)."""
        async def learn() -> None:
            handoff = await _learnt(error, until)
            if handoff is not None:
                self._handed(handoff, how=how)

        self._learn_later(learn, "closed before the store was read again after a release of "
                          "%s whose answer was lost: it may have landed untold", error.key)

    def _immediate(self, outcome: Outcome, answers: Answers[Result], *, first: str) -> Result:
        """The answer of a request the store granted or refused at once (``first``: the key
        a refusal names when the store names none)."""
        if outcome.status is Status.GRANTED:
            locks = outcome.locks
            upgraded = outcome.upgraded
            if outcome.fresh or upgraded:
                kept = outcome.kept
                for lock in locks:
                    # Two fields: the lock's __dict__ read once through pydantic's hook.
                    fields = lock.__dict__
                    key, expires_at = fields["key"], fields["expires_at"]
                    # Else its pull's already: not acquired (an upgrade of its shared hold is:
                    # a new token).
                    if not (kept and key in kept) or key in upgraded:
                        self.events.publish("acquired", lock=lock, key=key)
                    if expires_at is not None:
                        self.leases.arm(key, expires_at)
                if not upgraded:
                    return answers.granted(locks, fresh=outcome.fresh, kept=outcome.kept)
            return answers.granted(locks, fresh=outcome.fresh, kept=outcome.kept,
                                   upgraded=upgraded)
        key = outcome.key or first
        if outcome.holder is not None:
            self.leases.arm(key, outcome.holder.expires_at)
        reason = _REASONS.get(outcome.status, Reason.HELD)
        if reason is Reason.FROZEN:
            self.events.publish("frozen", key=key, message=outcome.message)
        return answers.refused(key, reason, outcome.holder, message=outcome.message)

    async def _queued(
        self, outcome: Outcome, waiter: Waiter, future: asyncio.Future[Notice], offer: Wait,
        answers: Answers[Result],
    ) -> Result:
        key = outcome.key or waiter.keys[0]
        ends = asyncio.get_running_loop().time() + offer.timeout.total_seconds()
        told = False  # the queued event went out: a caller gone from here on is told cancelled
        started = time.perf_counter()
        give_back = _GiveBackUnheard(self, waiter.id, waiter.request_id)
        try:
            await self._told_queued(outcome, waiter)
            told, started = True, time.perf_counter()
            refused = await self._before_waiting(outcome, waiter, future, offer, answers)
            if refused is not None:
                return refused
            seconds = await self._seconds_left(waiter, ends)
            started = time.perf_counter()  # the wait is timed from here, as before the check
        except BaseException as error:  # cancelled (or failed) before waiting: leave the queue
            try:
                if isinstance(error, asyncio.CancelledError):  # the caller went away
                    await queueing.leave(self.backend, waiter, future, give_back,
                                         self._handed_on, caller=offer.caller, ends=ends,
                                         policy=self.policy)
                else:
                    await queueing.withdraw(self.backend, waiter, future, give_back,
                                            self._handed_on, caller=offer.caller,
                                            policy=self.policy)
            finally:
                self.backend.grants.forget(waiter.id, future,
                                           gone=isinstance(error, asyncio.CancelledError))
                if told and isinstance(error, asyncio.CancelledError):
                    self._gone(key, waiter, time.perf_counter() - started)
            raise
        try:
            notice = await queueing.await_turn(
                self.backend, waiter, future, seconds=seconds,
                give_back=give_back, handed=self._handed_on, caller=offer.caller,
                policy=self.policy,
            )
        except asyncio.CancelledError:  # the caller went away; await_turn withdrew the waiter
            self._gone(key, waiter, time.perf_counter() - started)
            raise
        waited = time.perf_counter() - started
        details: dict[str, Any] = {
            "waiterId": waiter.id, "requestId": waiter.request_id,
            "waitedMs": round(waited * 1000, 3),
        }
        if notice.granted:
            self.metrics.wait_seconds.labels("granted").observe(waited)
            for lock in notice.locks:
                if _granted_anew(notice.fresh, notice.kept, lock.key, notice.upgraded):
                    self.events.publish("granted-from-queue", lock=lock, **details)
                self.leases.arm(lock.key, lock.expires_at)
            return answers.granted(notice.locks, fresh=notice.fresh, kept=notice.kept,
                                   upgraded=notice.upgraded)
        reason = notice.reason or Reason.UNAVAILABLE
        self.metrics.wait_seconds.labels(str(reason)).observe(waited)
        if reason is Reason.TIMEOUT:
            self.events.publish("timeout", key=key, repo=waiter.owner[0], **details)
        elif reason is Reason.CANCELLED:
            self.events.publish("cancelled", key=key, repo=waiter.owner[0], by="admin",
                                **details)
        message = _CANCELLED_MESSAGE if reason is Reason.CANCELLED else None
        if reason is Reason.LIMITED:  # a limit lowered below it as it waited (:meth:`wake`)
            never = policies.over_limit([parts_of(c) for c in waiter.candidates],
                                        self.policy().rules)
            key, message = (never.key, never.message) if never is not None else (
                key, _LIMITED_MESSAGE)
        holder = await self._holder(key)
        return answers.refused(key, reason, holder, message=message)

    def _gone(self, key: str, waiter: Waiter, waited: float) -> None:
        """A queued caller went away (its waiter has left the queue): told and counted."""
        self.metrics.wait_seconds.labels("cancelled").observe(waited)
        self.metrics.acquires.labels("enhanced", "cancelled").inc()
        self.events.publish("cancelled", key=key, repo=waiter.owner[0], by="client",
                            waiterId=waiter.id, requestId=waiter.request_id,
                            waitedMs=round(waited * 1000, 3))

    async def _told_queued(self, outcome: Outcome, waiter: Waiter) -> None:
        """The ``queued`` event of a waiter the store queued, the first thing told of it:
        before the checks that may refuse it (:meth:`_before_waiting`) and before a grant it
        is served meanwhile is told (a waiter's grant never goes out before its ``queued``)."""
        key = outcome.key or waiter.keys[0]
        if outcome.holder is not None:
            # Wake the queue when the holder's lease ends, wherever it was granted.
            self.leases.arm(key, outcome.holder.expires_at)
        shown = visibility.AHEAD_SHOWN
        if outcome.ahead is not None and outcome.holders is not None and outcome.position:
            # The store said who is ahead and who holds the key as it queued the waiter: no
            # need to read the queue and the holders again for the event.
            view: visibility.WaitView | None = visibility.WaitView.build(
                key=key, position=outcome.position, waiter=waiter, ahead=outcome.ahead[:shown],
                ahead_count=len(outcome.ahead), holders=outcome.holders, holds=self.holds,
                now=utcnow())
        elif outcome.position:
            view = await self.queued_view(key, waiter, outcome.position)
        else:
            view = await self._view(key, waiter.id)
        seen = {"position": outcome.position, **(view.details() if view is not None else {})}
        self.events.publish(
            "queued", key=key, repo=waiter.owner[0], pull=waiter.owner[1],
            waiterId=waiter.id, requestId=waiter.request_id, priority=waiter.priority.value,
            mode=waiter.mode, keys=list(waiter.keys), message=outcome.message, **seen,
        )

    async def _before_waiting(self, outcome: Outcome, waiter: Waiter,
                              future: asyncio.Future[Notice], offer: Wait,
                              answers: Answers[Result]) -> Result | None:
        """What a queued waiter does before it waits, told ``queued`` already: the check of a
        batch against the rules in force (a refusal, ``limited``) and the deadlock check (a
        refusal, if it closes a cycle). The waiter is in its queue already: a caller
        cancelled here must leave it (:meth:`_queued`)."""
        key = outcome.key or waiter.keys[0]
        if len(waiter.candidates) > 1:
            refused = await self._refuse_over_limit_queued(waiter, future, key, answers,
                                                           caller=offer.caller)
            if refused is not None:
                return refused
        if self.settings().deadlock_detection:
            refused = await self._refuse_deadlock(waiter, future, key, answers,
                                                  caller=offer.caller)
            if refused is not None:
                return refused
        return None

    async def _refuse_over_limit_queued(self, waiter: Waiter, future: asyncio.Future[Notice],
                                        key: str, answers: Answers[Result], *,
                                        caller: str) -> Result | None:
        """Refuse a batch just queued that asks for more locks of a group than its limit in
        the rules in force now: they were lowered after the request read them, and the wake
        that applied them (:meth:`wake`) may have read the queues before this batch was in
        them. Read after the store queued it, the rules are those that wake applied (or
        later): each batch is seen by the wake or here. Only if ``caller`` still owns the
        waiter; one granted or taken out first is left to its notice."""
        policy = self.policy()
        if not policy.limits:
            return None
        never = policies.over_limit([parts_of(c) for c in waiter.candidates], policy.rules)
        if never is None:
            return None
        cancelled = await self._call("cancel", lambda: self.backend.cancel(
            key, waiter.id, reason=Reason.LIMITED, caller=caller, policy=policy))
        self._handed_on(cancelled.handed)
        if not cancelled.removed:  # granted first (its grant stands), or answered already
            return None
        self.backend.grants.forget(waiter.id, future)
        return answers.refused(never.key, Reason.LIMITED, message=never.message)

    async def _seconds_left(self, waiter: Waiter, ends: float) -> float:
        """How long to wait: what is left of the offer since the waiter was queued (``ends``,
        on the loop's clock: the deadlock check and the view read before the wait count, as
        they do for the store's deadline), or, for a retried request that found its waiter,
        what is left of the waiter's original deadline (it keeps its enqueue time and
        deadline)."""
        if waiter.request_id is None:
            return max(0.0, ends - asyncio.get_running_loop().time())
        now = await self._call("now", self.backend.now)
        return max(0.0, (waiter.deadline - now).total_seconds())

    async def _refuse_deadlock(self, waiter: Waiter, future: asyncio.Future[Notice], key: str,
                               answers: Answers[Result], *, caller: str) -> Result | None:
        """Refuse a waiter that closes a cycle of the wait-for graph: cancel it, only if
        ``caller`` still owns it (a retry of the request that took it over keeps it). The
        search reads only what it can reach from the waiter's pull (``wait_graph_from``)."""
        policy = self.policy()
        graph = await self._call("wait_graph", lambda: self.backend.wait_graph_from(
            waiter, policy=policy))
        cycle = deadlock.find_cycle(graph, waiter.owner, policy.rules)
        if cycle is None:
            return None
        cancelled = await self._call("cancel", lambda: self.backend.cancel(
            key, waiter.id, reason=Reason.DEADLOCK, caller=caller, policy=self.policy()))
        self.backend.grants.forget(waiter.id, future)
        self._handed_on(cancelled.handed)
        if cancelled.granted:  # granted before we could withdraw: no wait, no deadlock
            # Told and timed as every grant from the queue is (:meth:`_queued`).
            for lock in cancelled.granted:
                if _granted_anew(cancelled.fresh, cancelled.kept, lock.key, cancelled.upgraded):
                    self.events.publish("granted-from-queue", lock=lock, waiterId=waiter.id,
                                        requestId=waiter.request_id, waitedMs=0.0)
                self.leases.arm(lock.key, lock.expires_at)
            return answers.granted(cancelled.granted, fresh=cancelled.fresh,
                                   kept=cancelled.kept, upgraded=cancelled.upgraded)
        names = deadlock.describe(cycle)
        self.metrics.deadlocks.inc()
        self.events.publish(
            "deadlock", key=key, repo=waiter.owner[0], cycle=names,
            edges=deadlock.edge_details(cycle),
        )
        return answers.refused(key, Reason.DEADLOCK, await self._holder(key),
                               cycle=deadlock.owners(cycle))

    async def _holder(self, key: str) -> Lock | None:
        try:
            return await self.backend.get(key)
        except BackendUnavailable:
            return None

    async def _holders(self, key: str) -> Locks:
        try:
            return await self.backend.holders(key)
        except BackendUnavailable:
            return []

    async def _give_back(self, notice: Notice) -> None:
        """Release locks granted to a caller that went away before it heard of them (not its
        pull's locks it was answered with unchanged: another request of the pull holds them).
        Each by its fencing token: a give-back tried again (its first answer lost with the
        store) must not free a hold the same pull took of the key meanwhile; a lock it finds
        not held that way was given back already. Nor one another request of the pull was
        answered with between the cancel that answered it as the grant's and this give-back
        (``unless_told``)."""
        for lock in notice.locks:
            if not _given_back(notice.fresh, notice.kept, lock.key):
                continue  # its pull's already when granted (or upgraded): not this grant's
            owner = (lock.project.repo_full_name, lock.pull.num)
            try:
                handoff = await self.backend.release_and_handoff(
                    lock.key, owner=owner, policy=self.policy(), token=lock.fencing_token,
                    unless_told=True)
            except LockNotOwned:
                continue
            except HandoffUnknown as error:
                landed = await _learnt(error, lock.expires_at)
                if landed is None:
                    raise  # not landed (or not learnt before its lease ended): sent again
                handoff = landed
            self._handed(handoff, how="abandoned")

    # --- release ------------------------------------------------------------------------------
    async def release(self, key: str, *, owner: Owner | None = None,
                      token: int | None = None) -> Lock | None:
        """Free ``key`` (with ``owner``: only that pull's lock; with ``token`` too: only its
        hold with that fencing token, else ``LockNotOwned``) and serve its queue."""
        config = self.settings()
        live = self._live
        if config is not live.config:
            live = self._live_for(config)
        try:
            if live.retries:
                handoff = await self._call("release", lambda: self.backend.release_and_handoff(
                    key, owner=owner, policy=self.policy(), token=token), config)
            else:  # _call's attempt, inline (as in _acquire)
                self.metrics.enhanced_operation()
                try:
                    handoff = await self.backend.release_and_handoff(
                        key, owner=owner, policy=live.policy, token=token)
                except BackendUnavailable:
                    self.metrics.enhanced_error()
                    raise
        except HandoffUnknown as error:  # may have landed: told once the store answers
            # (looked for until the key's lease known here ends: then etcd frees it anyway)
            self._learn_handoff(error, how="released", until=self.leases.due(key))
            raise
        self._handed(handoff, how="released")
        return handoff.released

    async def release_batch(self, keys: Sequence[str], *, owner: Owner | None = None) -> Locks:
        """Release several keys (see :func:`.batch.release_all`)."""
        return await batch.release_all(self, keys, owner=owner)

    async def force_unlock(self, key: str, *, checked: frozenset[int] | None = None
                           ) -> Lock | None:
        """Free ``key`` whoever holds it (the admin's way out) and serve its queue; with
        ``checked`` (fencing tokens), only if every holder is one of those holds, else
        ``LockNotOwned`` and nothing is freed."""
        handoff = await self._call("force_unlock", lambda: self.backend.force_unlock(
            key, policy=self.policy(), checked=checked))
        self._handed(handoff, how="force-unlocked")
        return handoff.released

    async def expire(self, key: str) -> None:
        """The lease timer's target: free ``key`` if its lease ran out, then re-arm for the
        holders the same step left (no read after it: a lease that ran out between the two
        read as free there, and nothing looked at the key again)."""
        try:
            expiry = await self._call("expire", lambda: self.backend.expire(
                key, policy=self.policy()))
        except LockingError as error:
            log.warning("lease check of %s failed (%s); trying again in a second", key, error)
            self.leases.arm(key, utcnow() + timedelta(seconds=1))
            return
        self._handed(expiry, how="expired")
        holders = expiry.holders
        here = self.leases.now()
        if any(h.expires_at is not None and h.expires_at <= here for h in holders):
            # A lease ended here and not in the store: the store's clock is behind this
            # one. Set again for its passed end, the timer fired every few ms (a call to the
            # store each) until the store's clock caught up; it is set for when the store's
            # clock, read by the step, reaches the end.
            for holder in holders:
                self.leases.arm_by_store(key, holder.expires_at, expiry.now)
            return
        for holder in holders:
            self.leases.arm(key, holder.expires_at)

    def _told_expired(self, locks: tuple[Lock, ...], handed: tuple[Grant, ...] = ()) -> None:
        """Locks whose lease had run out, freed by a call's step before it did its own (an
        acquire or a release of the key came before any lease timer): each told as the timer
        tells it (:meth:`expire`), its event, its release ``how="expired"`` and its lease
        expiration counted. ``handed``: the waiters the step served, each named in the event
        of the key it was handed (counted by :meth:`_handed_on`)."""
        now = time.time()
        for lock in locks:
            self.holds.record(lock.key, now - lock.acquired_at.timestamp())
            self.metrics.releases.labels("enhanced", "expired").inc()
            self.metrics.lease_expirations.inc()
            self.events.publish("expired", lock=lock, key=lock.key, how="expired", handedTo=[
                grant.waiter.id for grant in handed
                if any(held.key == lock.key for held in grant.locks)])

    def _handed_on(self, handed: tuple[Grant, ...]) -> None:
        """Waiters a step handed keys to: each hand-off counted, the lease timers of their
        locks armed (here too: the waiter's own replica may be gone before it hears)."""
        for grant in handed:
            self.metrics.handoffs.inc()
            for lock in grant.locks:
                self.leases.arm(lock.key, lock.expires_at)

    def _gave_back(self, handoff: Handoff) -> None:
        """A give-back the store made on its own of an acquire whose caller never had its
        answer (:class:`GivesBack`): told and counted as the grant of a waiter whose caller
        left is when it is given back, and the upgrades of its pull's shared holds it kept
        announced (:meth:`_told_upgrades_kept`)."""
        if handoff.upgrades_kept:
            self._told_upgrades_kept(handoff.upgrades_kept)
        self._handed(handoff, how="abandoned")

    def _served_unasked(self, handoff: Handoff) -> None:
        """A hand-off the store made on its own (etcd: a lock its lease deleted, whose key a
        watch served): told and counted as the lease timer's expiry is."""
        self._handed(handoff, how="expired")

    def _handed(self, handoff: Handoff, *, how: ReleaseHow) -> None:
        released, also = handoff.released, handoff.also_released
        if handoff.expired:
            # With nothing released, the key went from the expired lock to whom it was handed.
            self._told_expired(handoff.expired, handoff.granted if released is None else ())
        if released is None and not also and not handoff.granted:
            return  # nothing was held, nothing handed over: nothing to record
        # The wall clock utcnow reads, as seconds: a datetime read and a subtraction cost
        # about twice as much, on every release.
        now = time.time()
        key = None
        if released is not None:
            # Several fields: the lock's __dict__ read once through pydantic's __getattr__
            # hook (about 400 instructions a read) instead of each field through it.
            fields = released.__dict__
            key = fields["key"]
            self.holds.record(key, now - fields["acquired_at"].timestamp())
        if also:  # other holders freed with it (shared): none on most releases
            for extra in also:
                self.holds.record(extra.key, now - extra.acquired_at.timestamp())
            for extra in also:
                self.metrics.releases.labels("enhanced", how).inc()
                if how == "expired":
                    self.metrics.lease_expirations.inc()
                self.events.publish(_RELEASE_EVENT[how], lock=extra, how=how)
        if released is not None and key is not None:
            if fields["mode"] == "exclusive":
                # The key's only holder left. A shared holder that left may have others
                # beside it: the key's timer stays (set for the earliest lease known), and
                # when it fires the expiry is set again for whoever holds the key then.
                self.leases.disarm(key)
            counter = self._release_count.get(how)
            if counter is None:
                counter = self._release_count[how] = self.metrics.counting(
                    self.metrics.releases, "enhanced", how)
            counter.inc()
            if how == "expired":
                self.metrics.lease_expirations.inc()
            granted = handoff.granted
            # Nobody handed to (most releases): no comprehension, a frame of its own in 3.11.
            # Nobody handed to: the empty tuple, which the collector does not track (an empty
            # list kept in the event ring was two tracked objects more per release).
            self.events.publish(_RELEASE_EVENT[how], lock=released,
                                key=key, how=how,
                                handedTo=[g.waiter.id for g in granted] if granted else ())
        if handoff.granted:  # nobody handed to (most releases): nothing to count or arm
            self._handed_on(handoff.granted)

    async def release_by_pull(self, repo: str, pull: int) -> Locks:
        """The pull's locks released, each reported (its event, its lease timer). A store that
        releases in parts and fails after some committed (:class:`PartlyReleased`) has those
        reported as they commit, and they are in the error raised at the end (a retry that
        then succeeds answers them with its own)."""
        policy = self.policy()
        freed: Locks = []

        async def attempt() -> PullRelease:
            try:
                return await self.backend.release_pull(repo, pull, policy=policy)
            except PartlyReleased as error:
                freed.extend(error.released)
                if isinstance(error, PullPartlyReleased):
                    # Its parts' lapsed locks and hand-offs too, told as a finished one's are.
                    if error.done.expired:
                        self._told_expired(error.done.expired)
                    await self._released_by_pull(error.released, error.done.granted,
                                                 error.done.holders)
                else:
                    await self._released_by_pull(error.released)
                raise

        try:
            done = await self._call("release_by_pull", attempt)
        except BackendUnavailable as error:
            if freed:
                raise PartlyReleased(str(error), released=freed) from error
            raise
        if done.expired:  # its locks whose lease had run out: told as the lease timer tells
            self._told_expired(done.expired)
        released = list(done.released)
        await self._released_by_pull(released, done.granted, done.holders)
        return freed + released

    async def _released_by_pull(self, released: Locks, granted: tuple[Grant, ...] = (),
                                holders: tuple[Lock, ...] | None = None) -> None:
        """Each lock's release told (``granted``: the waiters the keys were handed to, each
        hand-off counted and named in its key's event, as :meth:`_handed` does), and the
        lease timers set for whoever holds the freed keys now: ``holders``, as the release's
        own step left them (``None``: not said, read here)."""
        handed: dict[str, list[str]] = {}
        for lock in released:
            if lock.mode == "exclusive":  # a shared one may leave others' leases (_handed)
                self.leases.disarm(lock.key)
        for grant in granted:
            self.metrics.handoffs.inc()
            for lock in grant.locks:
                handed.setdefault(lock.key, []).append(grant.waiter.id)
                self.leases.arm(lock.key, lock.expires_at)  # (a batch's other keys too)
        for lock in released:
            self.holds.record(lock.key, time.time() - lock.acquired_at.timestamp())
            how: ReleaseHow = "by-pull"
            self.metrics.releases.labels("enhanced", how).inc()
            self.events.publish(_RELEASE_EVENT[how], lock=lock, key=lock.key, how=how,
                                handedTo=handed.get(lock.key, ()))
        if holders is None:
            # Not said by the store: read after its step, where a lease that ran out
            # meanwhile reads as free (and no timer is set for it).
            read: Locks = []
            for lock in released:
                read += await self._holders(lock.key)
            holders = tuple(read)
        # The leases of whoever holds the freed keys now (those the release handed them to,
        # or other shared holders), each of them.
        for holder in holders:
            self.leases.arm(holder.key, holder.expires_at)

    async def refresh(self, key: str, *, owner: Owner, ttl: timedelta | None) -> Lock:
        """Move the lease of a held lock to ``now + ttl`` (default: ``lock-ttl``). A ``ttl`` of
        0 ends the lease: the lock is kept until it is released, as a lock granted without one
        (the Atlantis adapter's hold-over, docs/07-atlantis.md, ends so when its pull asks
        again). No ``ttl`` and no ``lock-ttl`` is refused: there is nothing to refresh to."""
        if ttl is None:
            ttl = self.settings().lock_ttl
            if ttl <= timedelta(0):
                raise InvalidRequest("ttl: a refresh needs a ttl (no enhanced-locking-lock-ttl "
                                     "is configured)", field="ttl", key=key)
        lock = await self._call("refresh", lambda: self.backend.refresh(key, owner, ttl))
        self.leases.arm(key, lock.expires_at)
        return lock

    # --- queues -------------------------------------------------------------------------------
    async def queue(self, key: str) -> Waiters:
        return await self._call("queue", lambda: self.backend.queue(key, policy=self.policy()))

    def effective_priority(self, waiter: Waiter) -> Priority:
        policy = self.policy()
        if not policy.priority:
            return waiter.priority
        level = effective_level(
            base=waiter.priority.level,
            waited_ms=epoch_ms(utcnow()) - epoch_ms(waiter.enqueued_at), policy=policy,
        )
        return Priority.from_level(level)

    async def holders(self, key: str) -> Locks:
        """Every holder of ``key`` (several when it is held shared)."""
        return await self._call("holders", lambda: self.backend.holders(key))

    async def groups(self) -> list[dict[str, Any]]:
        """Every concurrency group with locks held now: its limit and its holders."""
        rules = self.settings().policies
        if not rules.concurrency:
            return []
        found: dict[str, dict[str, Any]] = {}
        for lock in await self.list():
            for group, limit in policies.groups_of(parts_of(lock), rules).items():
                entry = found.setdefault(group, {"group": group, "limit": limit, "holders": []})
                entry["holders"].append(lock)
        return [found[name] for name in sorted(found)]

    async def queued_view(self, key: str, waiter: Waiter,
                          position: int) -> visibility.WaitView | None:
        """A ``queued`` event's view of a waiter the store placed at ``position``: the first
        waiters in line (:data:`~.visibility.AHEAD_SHOWN` at most) and the holders: on Redis
        O(log n) in the queue's length, not the whole queue (``None``: the store did not
        answer)."""
        try:
            first = await self._call("queue", lambda: self.backend.queue(
                key, policy=self.policy(), limit=min(position - 1, visibility.AHEAD_SHOWN))
            ) if position > 1 else []
            holders = await self.holders(key)
        except LockingError:
            return None
        ahead = list(itertools.takewhile(lambda w: w.id != waiter.id, first))
        return visibility.WaitView.build(
            key=key, position=position, waiter=waiter, ahead=ahead, ahead_count=position - 1,
            holders=holders, holds=self.holds, now=utcnow())

    async def _view(self, key: str, waiter_id: str) -> visibility.WaitView | None:
        try:
            return await self.view(key, waiter_id)
        except LockingError:
            return None

    async def view(self, key: str, waiter_id: str) -> visibility.WaitView | None:
        """Where a waiter stands on ``key``: position, who blocks it, and an estimate."""
        waiters = await self.queue(key)
        found = next((i for i, w in enumerate(waiters) if waiter_id in (w.id, w.request_id)),
                     None)
        if found is None:
            return None
        return visibility.WaitView.build(
            key=key, position=found + 1, waiter=waiters[found], ahead=waiters[:found],
            holders=await self.holders(key), holds=self.holds, now=utcnow())

    async def cancel_waiter(self, key: str, waiter_id: str) -> Waiter | None:
        """Take a queued request out of ``key``'s queue by its waiter id or request id."""
        found = next((w for w in await self.queue(key) if waiter_id in (w.id, w.request_id)), None)
        if found is None:
            return None
        cancelled = await self._call("cancel", lambda: self.backend.cancel(
            key, found.id, reason=Reason.CANCELLED, policy=self.policy()))
        self._handed_on(cancelled.handed)
        return found if cancelled.removed else None

    async def waiting_for(self, repo: str, pull: int) -> list[tuple[str, Waiter]]:
        """Every queued request of one pull: (a key it waits on, the waiter), once each."""
        graph = await self._call("wait_graph", lambda: self.backend.wait_graph(
            policy=self.policy()))
        found: dict[str, tuple[str, Waiter]] = {}
        for entry in graph:
            for waiter in entry.waiters:
                if waiter.owner == (repo, pull):
                    found.setdefault(waiter.id, (entry.key, waiter))
        return list(found.values())

    async def queue_depth(self) -> int:
        graph = await self.backend.wait_graph(policy=self.policy())
        return len({waiter.id for entry in graph for waiter in entry.waiters})

    # --- reads --------------------------------------------------------------------------------
    async def get(self, key: str) -> Lock | None:
        return await self._call("get", lambda: self.backend.get(key))

    async def list(self, *, repo: str | None = None, pull: int | None = None) -> Locks:
        return await self._call("list", lambda: self.backend.list(repo=repo, pull=pull))


def _wait_for(request: LockRequest | BatchLockRequest,
              config: EnhancedLockingConfig) -> timedelta | None:
    wait = request.wait
    if wait is None or wait is False:
        return None
    if wait is True:
        wait = config.default_timeout
    if isinstance(wait, bool) or wait <= _ZERO:
        return None
    return wait


def _lease(request: LockRequest | BatchLockRequest,
           config: EnhancedLockingConfig) -> timedelta | None:
    ttl = request.ttl if request.ttl is not None else config.lock_ttl
    return ttl if ttl > _ZERO else None


_ZERO = timedelta(0)


_candidate = Candidate.of_request
"""What a request asks for on its key; the backend makes the lock when it grants it."""


def _waiter_id(candidates: Sequence[Candidate], request_id: str | None) -> str:
    """A waiter's id: random, or, for a request with a ``requestId``, derived from it, the
    pull and the keys asked for, so the same request retried (after a broken connection)
    finds its waiter again, and a request of another key named by the same ``requestId``
    does not (it would take over a waiter on a key it never asked for, and be answered with
    that key's lock)."""
    if request_id is None:
        return secrets.token_hex(12)
    first = candidates[0]
    seed = json.dumps([first.project.repo_full_name, first.pull.num, request_id,
                       [candidate.key for candidate in candidates]])
    return "r" + hashlib.sha256(seed.encode()).hexdigest()[:23]


async def _learnt(error: HandoffUnknown, until: datetime | None) -> Handoff | None:
    """What a release answered ``unavailable`` with its answer lost did (``error.learn``:
    read once the store answers again), ``None`` when it did not land. Given up at
    ``until``, the end of the released lock's lease when known (``None``): from then on the
    store frees it on its own, and a lock gone would be taken for this release's. Before,
    the give-back was sent again, found the key free (or handed on) and told nothing: a lock
    released by the give-back's first commit was never told ``released``."""
    if until is None:
        return await error.learn()
    left = (until - utcnow()).total_seconds()
    try:
        async with asyncio.timeout(max(0.0, left)):
            return await error.learn()
    except TimeoutError:
        return None


def _abandoned_for(error: BaseException) -> Reason | None:
    """Why an enqueue that ended in ``error`` may have left a waiter for nobody: the store
    went away during the call (``unavailable``: the script may have run, its answer lost), or
    the caller did (``cancelled``: the store may have queued it, the answer never read).
    ``None``: any other error (the store's own answer, such as a lock it cannot read):
    nothing to withdraw."""
    if isinstance(error, BackendUnavailable):
        return Reason.UNAVAILABLE
    if isinstance(error, asyncio.CancelledError):
        return Reason.CANCELLED
    return None


_CANCELLED_MESSAGE = (
    "this request was taken out of the queue while it waited: its pull's locks were released "
    "(the pull was closed, or unlocked with `atlantis unlock`) or an admin cancelled it; "
    "nothing was granted: run it again if it is still wanted")
"""What a queued request taken out of its queue by someone else is told (``error``). The
store tells the waiting replica only ``cancelled``, not by what: the message names each way
it happens."""

_LIMITED_MESSAGE = (
    "a concurrency limit was lowered below what this request asks while it waited: it was "
    "taken out of the queue and nothing was granted; ask for fewer locks at a time, or raise "
    "the limit")
"""What a queued batch a lowered limit refused is told when the rules changed again before
its answer was made (the group and limit it was refused by are no longer the rules')."""

_REASONS = {
    Status.QUEUE_FULL: Reason.QUEUE_FULL,
    Status.FROZEN: Reason.FROZEN,
    Status.LIMITED: Reason.LIMITED,
}
