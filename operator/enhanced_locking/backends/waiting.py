"""Waiting: the records behind a key's queue, the service order, and how waiters are told.

A request that may wait and finds its key held becomes a :class:`Waiter` in that key's queue (a
batch request becomes one waiter in the queue of each of its keys). The backend keeps the
queues, because only the backend can hand a released lock to the next waiter in the same atomic
step as the release: that is what makes a handoff both fair and free of thundering herds.

**The service order** is :func:`service_order`, written here once. A backend whose queues
live elsewhere (the Redis Lua scripts) mirrors it exactly, and a test compares the two:

* ``level = min(3, base + min(max_boost, waited_ms // threshold_ms))`` where ``base`` is the
  waiter's priority level (low 0, normal 1, high 2, critical 3) and ``waited_ms`` its time in
  the queue by the backend's clock (negative clamped to 0). A zero threshold or zero boost means
  no aging. With the ``priority-queue`` flag off every level is 0: plain FIFO.
* Waiters are served by level, highest first; within a level by ``enqueued_ms`` (earliest
  first), then by ``seq`` (the key-independent enqueue counter) when two share a millisecond.

The level is capped at critical (3), a deliberate choice: an aged waiter joins the top level and
is then served before everyone who arrived after it. So a low waiter under a steady stream of
high ones reaches the top level after ``3 - base`` thresholds (if ``max_boost`` allows) and
from then on only the waiters that were already ahead of it are served first. Without the cap
a waiting high request could climb past 3, and a low one would never overtake high requests
that aged as well.

**Notifications.** A waiting caller learns of its grant (or of an admin cancel, or of its
deadline passing) through a :class:`GrantNotifier`: it calls ``expect(waiter_id)`` *before*
enqueueing and awaits the future; the backend calls ``deliver`` after the grant is durable.
Each caller gets a future of its own: two callers may wait on one waiter (a request with a
``requestId`` sent again while the first is still running takes the waiter over), and each
hears its notice; one that stops waiting forgets only its own future.
In-process stores resolve the future directly (:class:`LocalNotifier`); a Redis backend keeps a
``LocalNotifier`` per replica and feeds ``deliver`` from a pub/sub subscription, because the
release that grants may run in another replica.
"""

from __future__ import annotations

import asyncio
import enum
import functools
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.policies import KeyParts, PolicyRules
from enhanced_locking.types import (
    BackendUnavailable,
    Candidate,
    Lock,
    Mode,
    PartlyReleased,
    Priority,
    Reason,
)

_new_object = object.__new__
_NONE_KEPT: frozenset[str] = frozenset()
"""A grant's ``kept`` when the pull held none of its keys before (every lock granted anew)."""

__all__ = [
    "MAX_LEVEL",
    "Cancelled",
    "Expiry",
    "GoneGrantUnknown",
    "Grant",
    "GrantNotifier",
    "GrantUnknown",
    "GrantedUnheard",
    "Handoff",
    "HandoffUnknown",
    "KeyWaits",
    "KeyWaitsList",
    "LocalNotifier",
    "Notice",
    "Outcome",
    "PullPartlyReleased",
    "PullRelease",
    "QueuePolicy",
    "Status",
    "Wait",
    "Waiter",
    "Waiters",
    "effective_level",
    "epoch_ms",
    "service_key",
    "service_order",
]

Owner = tuple[str, int]

MAX_LEVEL = Priority.CRITICAL.level
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the Unix epoch (the unit the ordering rule works in)."""
    return (moment - _EPOCH) // timedelta(milliseconds=1)


@dataclass(frozen=True, kw_only=True)
class QueuePolicy:
    """The settings that shape queues, read from the live config on every call."""

    priority: bool = False
    """``priority-queue``: serve by effective level; off means plain FIFO."""
    starvation_threshold: timedelta = timedelta(minutes=2)
    max_boost: int = 3
    max_size: int = 1000
    rules: PolicyRules = field(default_factory=PolicyRules)
    """Freezes and concurrency limits, decided in the grant step (:mod:`..policies`)."""

    @classmethod
    def from_config(cls, config: EnhancedLockingConfig) -> QueuePolicy:
        return cls(
            priority=config.priority_queue,
            starvation_threshold=config.starvation_threshold,
            max_boost=config.max_priority_boost,
            max_size=config.max_queue_size,
            rules=config.policies,
        )

    @property
    def threshold_ms(self) -> int:
        return self.starvation_threshold // timedelta(milliseconds=1)

    # Read by every acquire and release: a field of ``rules`` (a pydantic model) is read
    # through pydantic's __getattr__ hook, about 400 instructions a read; these are read once
    # per policy (a policy is made once per config) and then from the instance's __dict__.
    @functools.cached_property
    def freezes(self) -> bool:
        """Whether ``rules`` has any freeze."""
        return bool(self.rules.freezes)

    @functools.cached_property
    def limits(self) -> bool:
        """Whether ``rules`` has any concurrency limit."""
        return bool(self.rules.concurrency)


@dataclass(frozen=True, kw_only=True)
class Wait:
    """A caller's offer to wait: the id its waiter gets and how long it may wait."""

    id: str
    timeout: timedelta
    request_id: str | None = None
    caller: str = ""
    """Who waits for it now: a retried request (same ``id``) takes the waiter over, and a
    clean-up by the caller that went away only removes a waiter it still owns."""


@dataclass(frozen=True, kw_only=True)
class Waiter:
    """One queued request.

    ``candidates`` are what it asks for, one per key (a batch waiter has several and is
    granted all of them at once, never some); they share owner and priority. The backend
    stamps their times and fencing tokens when it grants them. ``enqueued_at`` and
    ``deadline`` are the backend's clock; past its deadline a waiter is never granted.
    """

    id: str
    candidates: tuple[Candidate, ...]
    ttl: timedelta | None
    enqueued_at: datetime
    deadline: datetime
    seq: int
    request_id: str | None = None
    caller: str = ""

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(candidate.key for candidate in self.candidates)

    @property
    def owner(self) -> Owner:
        return self.candidates[0].owner

    @property
    def priority(self) -> Priority:
        return self.candidates[0].priority

    @property
    def mode(self) -> Mode:
        return self.candidates[0].mode

    @property
    def head_commit(self) -> str:
        return self.candidates[0].pull.head_commit


Waiters = list[Waiter]
"""A list of waiters (an alias: classes with a ``list`` method cannot say ``list[...]``)."""


def effective_level(*, base: int, waited_ms: int, policy: QueuePolicy) -> int:
    """A waiter's level after aging (see the module docstring for the rule)."""
    if not policy.priority:
        return 0
    boost = 0
    if policy.threshold_ms > 0 and policy.max_boost > 0:
        boost = min(policy.max_boost, max(0, waited_ms) // policy.threshold_ms)
    return min(MAX_LEVEL, base + boost)


def service_key(waiter: Waiter, *, now_ms: int, policy: QueuePolicy) -> tuple[int, int, int]:
    """Sort key of a waiter: smaller is served first."""
    enqueued = epoch_ms(waiter.enqueued_at)
    level = effective_level(
        base=waiter.priority.level, waited_ms=now_ms - enqueued, policy=policy
    )
    return -level, enqueued, waiter.seq


def service_order(
    waiters: Iterable[Waiter], *, now: datetime, policy: QueuePolicy
) -> Waiters:
    """Waiters in the order they are served at ``now``."""
    now_ms = epoch_ms(now)
    return sorted(waiters, key=lambda waiter: service_key(waiter, now_ms=now_ms, policy=policy))


class Status(enum.StrEnum):
    GRANTED = "granted"
    HELD = "held"
    QUEUED = "queued"
    QUEUE_FULL = "queue_full"
    FROZEN = "frozen"
    LIMITED = "limited"


# Made on every call and never changed after: not frozen, since a frozen dataclass sets each
# field through object.__setattr__, about three times the cost of making it; slotted, so
# making and freeing one makes and frees no __dict__ (about half its cost).
@dataclass(kw_only=True, slots=True)
class Outcome:
    """The answer of ``acquire_or_enqueue`` / ``acquire_batch``.

    * ``granted``: ``locks`` are held now (one per key asked). ``fresh`` is false when the
      same pull already held every key and got its locks back unchanged; ``kept`` names the
      keys it held already, key by key (``None``: the store does not say).
    * ``held``: not granted and not queued (no wait offered); ``key`` is the first blocked key
      and ``holder`` its holder (``None`` when only a waiter ahead blocks it).
    * ``queued``: ``waiter`` is in the queue of every key it asked for, at 1-based ``position``
      in the service order of ``key`` (the first blocked key).
    * ``queue_full``: ``key``'s queue already has ``max_size`` waiters.
    * ``frozen``: a freeze covers ``key`` and refuses (or it waits and no wait was offered);
      ``message`` is the freeze's.
    * ``limited``: a concurrency group of ``key`` is full and no wait was offered.

    ``superseded`` are the waiters of the same pull with an older head commit that this
    request pushed out of the queue.

    ``ahead`` and ``holders`` (``queued`` only, from stores that can say at no cost): the
    waiters served before it on ``key``, in service order, and every live holder of ``key``,
    as the enqueue's own step saw them. ``None``: not given; a caller that wants them reads
    the queue and the holders.
    """

    status: Status
    locks: tuple[Lock, ...] = ()
    fresh: bool = True
    key: str | None = None
    holder: Lock | None = None
    waiter: Waiter | None = None
    position: int | None = None
    message: str | None = None
    superseded: tuple[Waiter, ...] = ()
    ahead: tuple[Waiter, ...] | None = None
    holders: tuple[Lock, ...] | None = None
    expired: tuple[Lock, ...] = ()
    """Locks of the keys asked for whose lease had run out, freed by this step before it
    decided (no lease timer got there first): each is told as expired."""
    handed: tuple[Grant, ...] = ()
    """Other waiters this step handed keys to before it decided (a key it freed of a lapsed
    lease, or found free with a waiter no step had served): each hand-off is counted as a
    release's is."""
    kept: frozenset[str] | None = None
    """``granted``: the keys whose locks the pull held already when the step decided, answered
    unchanged (not this call's to give back; the others it granted). ``None``: the store does
    not say key by key (then ``fresh`` alone tells: false when the pull held every key)."""
    upgraded: frozenset[str] = _NONE_KEPT
    """``granted``: the keys of ``kept`` whose lock is the pull's shared hold upgraded to
    exclusive in place by this step (a new fencing token): granted anew as far as events and
    leases go, and still not this call's to give back (its pull held the key before)."""

    @staticmethod
    def of_grant(lock: Lock) -> Outcome:
        """``Outcome(status=Status.GRANTED, locks=(lock,), fresh=True, kept=frozenset())``,
        written out: the answer of every acquire that takes a free key. The generated
        ``__init__`` binds twelve keyword-only parameters, nine of them from their defaults
        (about 6k instructions a call); setting the slots here is about 2k. A test holds the
        two equal."""
        outcome = _new_object(Outcome)
        outcome.status = Status.GRANTED
        outcome.locks = (lock,)
        outcome.fresh = True
        outcome.key = None
        outcome.holder = None
        outcome.waiter = None
        outcome.position = None
        outcome.message = None
        outcome.superseded = ()
        outcome.ahead = None
        outcome.holders = None
        outcome.expired = ()
        outcome.handed = ()
        outcome.kept = _NONE_KEPT
        outcome.upgraded = _NONE_KEPT
        return outcome


class GrantedUnheard(asyncio.CancelledError):
    """The cancellation of an acquire (its caller went away) that came while the store's call
    was on its way, raised by a store that saw the call through to its answer and found it
    granted: ``outcome`` is that answer, which its caller never reads. The locker gives back
    what it granted (not the locks its pull held already), as it gives back the grant of a
    waiter whose caller left. A store that cannot know its answer then gives the call back on
    its own (Redis: by the call's id, ``lua/give_back.lua``)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__("granted to a caller that went away")
        self.outcome = outcome


class GrantUnknown(BackendUnavailable):
    """An acquire answered ``unavailable`` though the store may have applied it: the answer
    of a commit that would grant was lost (a cut connection, a timeout, a leader change) and
    the store could not be read again within the call's limit to learn whether it landed
    (etcd). Its caller is told ``unavailable`` and, as Atlantis does, never releases what it
    was refused; so ``learn`` (tried while the store does not answer; cancelled, it stops)
    reads the store once it answers again and gives the grant that landed, ``None`` when
    none did. The locker gives that grant back by its fencing tokens, as the grant of a
    caller that went away (:class:`GrantedUnheard`)."""

    def __init__(self, message: str, *, key: str | None,
                 learn: Callable[[], Awaitable[Outcome | None]]) -> None:
        super().__init__(message, key=key)
        self.learn = learn


class GoneGrantUnknown(asyncio.CancelledError):
    """The cancellation of an acquire (its caller went away) that came while the store's call
    was on its way, raised by a store that saw the call through and could not learn within the
    call's limit whether it granted: the answer of a commit that would grant was lost and the
    store could not be read again in time (etcd). The same unsettled commit as
    :class:`GrantUnknown`'s, whose caller is gone rather than refused: ``learn`` is the same
    read, and the locker runs it in the background the same way and gives back the grant that
    landed (as :class:`GrantedUnheard`'s)."""

    def __init__(self, *, key: str | None,
                 learn: Callable[[], Awaitable[Outcome | None]]) -> None:
        super().__init__("granted to a caller that went away, or not: the store did not say")
        self.key = key
        self.learn = learn


@dataclass(frozen=True, kw_only=True)
class Grant:
    """A waiter that was handed its locks."""

    waiter: Waiter
    locks: tuple[Lock, ...]
    fresh: bool = True
    """Granted by this hand-off (false: the waiter's pull held every key already and kept
    its locks unchanged, as when it asks again for what it holds)."""
    kept: frozenset[str] | None = None
    """The keys of those its pull held already, key by key (see
    :attr:`Outcome.kept`; ``None``: not said)."""
    upgraded: frozenset[str] = _NONE_KEPT
    """The keys of ``kept`` upgraded from the pull's shared hold (see
    :attr:`Outcome.upgraded`)."""
    told: bool = False
    """A caller of the waiter was waiting here as it was granted, and is told (an in-process
    store knows; others say false): a retry of the request that takes the grant later is not
    its first hearer, and is answered with it as not fresh."""


# Made on every call and never changed after: not frozen and slotted (see Outcome).
@dataclass(kw_only=True, slots=True)
class Handoff:
    """What a release, force-unlock or expiry did: the lock that went and who got it next."""

    released: Lock | None = None
    granted: tuple[Grant, ...] = ()
    timed_out: tuple[Waiter, ...] = ()
    """Waiters found past their deadline and dropped while looking for the next holder."""
    also_released: tuple[Lock, ...] = ()
    """Other holders freed with ``released`` (a force-unlock of a key held shared)."""
    expired: tuple[Lock, ...] = ()
    """Holders of the key whose lease had run out, freed by this release before it released
    (no lease timer got there first): each is told as expired, not as released."""
    upgrades_kept: tuple[Lock, ...] = ()
    """A store's own give-back of an acquire whose caller never had its answer
    (:class:`~enhanced_locking.backends.base.GivesBack`): the upgrades that acquire made of its
    pull's shared holds (a new token each), still held and kept (never given back); nobody
    heard of them, so the locker announces them."""

    @staticmethod
    def of_release(released: Lock | None) -> Handoff:
        """``Handoff(released=released)``, written out (as :meth:`Outcome.of_grant`): the
        answer of every release nobody was waiting for. A test holds the two equal."""
        handoff = _new_object(Handoff)
        handoff.released = released
        handoff.granted = ()
        handoff.timed_out = ()
        handoff.also_released = ()
        handoff.expired = ()
        handoff.upgrades_kept = ()
        return handoff


class HandoffUnknown(BackendUnavailable):
    """A release answered ``unavailable`` though the store may have applied it: the answer of
    its commit was lost and the store could not be read again within the call's limit to
    learn whether it landed (etcd; as :class:`GrantUnknown` for an acquire). Sent again, it
    would find the key free (or handed on) whether its first commit freed it or not, and tell
    nothing. ``learn`` (tried while the store does not answer; cancelled, it stops) reads the
    store once it answers again and gives the hand-off that landed, ``None`` when none did
    (or what it wrote has changed since). A release that only deleted the lock is taken as
    landed when the lock is gone: a release of the same lock made meanwhile by another hand
    (an unlock, a force-unlock, an expiry) cannot be told from it by what etcd holds."""

    def __init__(self, message: str, *, key: str | None,
                 learn: Callable[[], Awaitable[Handoff | None]]) -> None:
        super().__init__(message, key=key)
        self.learn = learn


@dataclass(kw_only=True, slots=True)
class Expiry(Handoff):
    """What an expiry did (``released``: the lease it found run out, and who got the key
    next), and what it left, read in the same step: no read after it, in which a lease that
    ran out meanwhile reads as free, is needed to know when to look at the key again."""

    holders: tuple[Lock, ...]
    """Every live holder of the key when the step ended (its queue served): the leases to
    look at again, each at its end. None: the key is free and its queue was served (nobody
    in it could take it), nothing to look at."""
    now: datetime
    """The store's clock when the step decided (by which each holder's lease ends)."""

    @classmethod
    def of(cls, handoff: Handoff, *, holders: tuple[Lock, ...], now: datetime) -> Expiry:
        """What ``handoff`` did, with what its step left."""
        return cls(released=handoff.released, granted=handoff.granted,
                   timed_out=handoff.timed_out, also_released=handoff.also_released,
                   expired=handoff.expired, holders=holders, now=now)


@dataclass(frozen=True, kw_only=True)
class PullRelease:
    """What a release by pull freed: its locks whose lease still ran, and those whose lease
    had run out (no lease timer got there first), each told as expired."""

    released: tuple[Lock, ...] = ()
    expired: tuple[Lock, ...] = ()
    granted: tuple[Grant, ...] = ()
    """The waiters the freed keys were handed to."""
    holders: tuple[Lock, ...] | None = None
    """Every live holder of the freed keys when the step ended (their queues served), read in
    the same step: the leases to look at when they end (no read after it, in which a lease
    that ran out meanwhile reads as free). ``None``: not said (the caller reads them)."""


class PullPartlyReleased(PartlyReleased):
    """:class:`PartlyReleased` of a store that releases a pull's locks a part at a time
    (etcd): ``done`` is what the parts that committed did, all of it (their locks released,
    those whose lease had run out, the waiters their keys were handed to), so the caller
    tells each as a release that finished would (``released`` is ``done.released``)."""

    def __init__(self, message: str, *, done: PullRelease) -> None:
        super().__init__(message, released=list(done.released))
        self.done = done


@dataclass(frozen=True, kw_only=True)
class Cancelled:
    """The answer of ``cancel``: removed from the queue, or already granted (or neither)."""

    removed: bool = False
    waiter: Waiter | None = None
    granted: tuple[Lock, ...] = ()
    """Non-empty when the waiter had been granted before the cancel: the caller holds these
    locks now and must release them if nobody will use them (when ``fresh``)."""
    fresh: bool = True
    """The grant was new to the waiter; false: its pull held the locks already (another of
    its requests did), so they are not the waiter's to give back."""
    kept: frozenset[str] | None = None
    """With ``granted``: the keys of those its pull held already, key by key (see
    :attr:`Outcome.kept`; ``None``: not said)."""
    upgraded: frozenset[str] = _NONE_KEPT
    """With ``granted``: the keys of ``kept`` upgraded from the pull's shared hold (see
    :attr:`Outcome.upgraded`)."""
    handed: tuple[Grant, ...] = ()
    """The waiters behind it that the cancel served (shared requests an exclusive one kept
    back, a batch's other keys): each hand-off is counted as a release's is."""


@dataclass(frozen=True, kw_only=True)
class KeyWaits:
    """One key of the wait-for graph: its holder's owner and its waiters in service order."""

    key: str
    holder: Owner | None
    waiters: tuple[Waiter, ...]
    holders: tuple[Owner, ...] = ()
    """Every holder's owner (several when the key is held shared); ``holder`` is the first."""
    shared: bool = False
    """The key is held shared (by every holder): a shared waiter does not wait for them."""
    parts: KeyParts | None = None
    """What the rules see of the key's holders (repository, path, workspace), for the
    concurrency groups their locks count in: given by ``wait_graph_from`` under concurrency
    rules for every held key of a group (one nobody waits for is an entry with no waiters);
    ``None`` otherwise."""


KeyWaitsList = list[KeyWaits]


@dataclass(frozen=True, kw_only=True)
class Notice:
    """What a waiter is told: its locks (granted) or why it left the queue."""

    locks: tuple[Lock, ...] = ()
    reason: Reason | None = None
    fresh: bool = True
    """With ``locks``: granted to this waiter (a new fencing token). False when its turn came
    while its own pull already held every key (another request of the pull was granted
    first): it is answered with those locks unchanged, which are not its to give back."""
    kept: frozenset[str] | None = None
    """With ``locks``: the keys of those its pull held already, key by key (see
    :attr:`Outcome.kept`; ``None``: not said)."""
    upgraded: frozenset[str] = _NONE_KEPT
    """With ``locks``: the keys of ``kept`` upgraded from the pull's shared hold (see
    :attr:`Outcome.upgraded`)."""
    caller: str = ""
    """With ``locks``: the caller that owned the waiter when it was granted (``""``: not
    known). A waiter has two callers when a retry of its request took it over while the first
    still runs; both hear the notice, and only this one is answered with a fresh grant (the
    other gives nothing back: :func:`~enhanced_locking.locking.queueing.await_turn`)."""

    @property
    def granted(self) -> bool:
        return bool(self.locks)


class GrantNotifier(Protocol):
    """Where a waiting caller hears of its fate.

    ``expect`` must be called before the waiter is enqueued (so no notice can be missed); it
    gives the caller a future of its own. The caller passes that future to ``forget`` when it
    stops waiting (a second ``forget`` of it does nothing), with ``gone`` when the caller went
    away without reading it: a notice the future holds then (it came in the very turn the
    caller went) was never heard, and a store that keeps an unheard notice as its record of
    the grant keeps it for the caller's withdrawal or a retry. ``deliver`` is the backend's side:
    it is called at most once per waiter, after the grant (or removal) is durable, and
    resolves the future of every caller that expects the waiter then (several, when a retry
    took the waiter over while the first request still runs); a notice for a waiter nobody
    expects here is dropped (another replica may be the one waiting).
    """

    def expect(self, waiter_id: str) -> asyncio.Future[Notice]: ...

    def forget(self, waiter_id: str, future: asyncio.Future[Notice], *,
               gone: bool = False) -> None: ...

    def deliver(self, waiter_id: str, notice: Notice) -> None: ...


@dataclass
class LocalNotifier:
    """The asyncio futures of this process's callers, per waiter (one per caller)."""

    _futures: dict[str, list[asyncio.Future[Notice]]] = field(default_factory=dict)

    def expect(self, waiter_id: str) -> asyncio.Future[Notice]:
        future: asyncio.Future[Notice] = asyncio.get_running_loop().create_future()
        futures = self._futures.get(waiter_id)
        if futures is None:
            self._futures[waiter_id] = [future]
        else:
            futures.append(future)
        return future

    def forget(self, waiter_id: str, future: asyncio.Future[Notice], *,
               gone: bool = False) -> None:
        futures = self._futures.get(waiter_id)
        if futures is None or future not in futures:
            return
        futures.remove(future)
        if not futures:
            del self._futures[waiter_id]

    def deliver(self, waiter_id: str, notice: Notice) -> None:
        for future in self._futures.get(waiter_id, ()):
            if not future.done():
                future.set_result(notice)

    def pending(self) -> list[str]:
        """The waiters a caller here still waits to hear about."""
        return [waiter_id for waiter_id, futures in self._futures.items()
                if _undone(futures)]

    def waits(self, waiter_id: str) -> bool:
        """Whether a caller here still waits to hear about ``waiter_id``."""
        futures = self._futures.get(waiter_id)
        return futures is not None and _undone(futures)

    def expected(self, waiter_id: str) -> bool:
        """Whether a caller here expects ``waiter_id`` (told already or not)."""
        return waiter_id in self._futures


def _undone(futures: list[asyncio.Future[Notice]]) -> bool:
    """Whether any of ``futures`` is not done: ``any()`` written out, with the same stop at
    the first one. The built-in over a generator costs about 3,800 instructions a call with
    one future (its generator is made each time), ``not all(map(...))`` about 1,400, this loop
    about 560 (callgrind, CPython 3.11); :meth:`LocalNotifier.pending` asks it of every
    expected waiter for each message a Redis replica gets."""
    for future in futures:
        if not future.done():
            return True
    return False
