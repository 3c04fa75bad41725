"""The backend seam: where held locks, fencing counters and queues live.

A backend answers a few atomic questions about one lock space (a *namespace*: ``legacy``,
``enhanced`` or ``shadow`` share a store but never each other's keys). Lockers add the policy
on top (routing, events, retries, deadlock detection). Every backend gives the same answers;
the tests run one table of behaviours against each.

Two protocols:

* :class:`Backend`: held locks and fencing counters, fail fast (what Atlantis's own stores do,
  and all the legacy locker needs).
* :class:`QueueBackend`: a ``Backend`` that also keeps per-key queues of waiters and hands a
  released lock straight to the next one (what the enhanced locker needs). Every method is
  *one atomic step* of the store, so a Redis backend can do each as one Lua script; records,
  service order and notifications are in :mod:`enhanced_locking.backends.waiting`.

The backend's clock (``now()``) decides every age, lease expiry and deadline.

:class:`StoreBackend` holds the shared logic for stores that run inside this process (memory,
the embedded SQLite file): it is written once over a handful of synchronous primitives. Those
stores are single-writer and answer in microseconds, so their operations complete without
yielding to the event loop, which also makes each one atomic with respect to other tasks.
Their queues live in process memory and are never persisted: a waiter is a caller with an open
connection, and when the process dies its waiters die with their connections, so nothing is
ever granted to a waiter that is gone.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import dataclasses
import enum
import gc
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Literal, Protocol, runtime_checkable

from enhanced_locking import policies
from enhanced_locking.backends import codec
from enhanced_locking.backends.unreadable import UnreadableLocks
from enhanced_locking.backends.waiting import (
    Cancelled,
    Expiry,
    Grant,
    GrantNotifier,
    Handoff,
    KeyWaits,
    KeyWaitsList,
    LocalNotifier,
    Notice,
    Outcome,
    PullRelease,
    QueuePolicy,
    Status,
    Wait,
    Waiter,
    Waiters,
    effective_level,
    epoch_ms,
    service_order,
)
from enhanced_locking.metrics import Count
from enhanced_locking.types import (
    Candidate,
    Lock,
    LockNotHeld,
    LockNotOwned,
    Locks,
    LockUnreadable,
    Mode,
    Reason,
    UnreadableLock,
    utcnow,
)

__all__ = [
    "Backend",
    "GivesBack",
    "OtherSideCheck",
    "OtherSideHolds",
    "Owner",
    "QueueBackend",
    "StoreBackend",
    "Stored",
    "Times",
    "Told",
    "Took",
    "checking_other_side",
    "clock_floor",
    "parts_of",
]

Owner = tuple[str, int]
"""Who may release a lock: (repository full name, pull number), Atlantis's ownership rule."""

Times = tuple[datetime, datetime | None]
"""A grant's stamps: when it was acquired and when its lease ends (``None``: no lease)."""


class Took(enum.Enum):
    """How a grant came by one key's lock (``StoreBackend._take``; Redis's ``take``)."""

    NEW = "new"
    """Made anew: a new fencing token, the grant's to give back."""
    HELD = "held"
    """The pull's own lock, held already and answered unchanged: not the grant's."""
    UPGRADED = "upgraded"
    """The pull's shared hold upgraded to exclusive in place: a new fencing token, announced
    as a new lock is, yet not the grant's to give back (its pull held the key before; a
    give-back would free that hold with it)."""

    @staticmethod
    def answer(taken: Sequence[tuple[Lock, Took]]) -> tuple[
            tuple[Lock, ...], bool, frozenset[str], frozenset[str]]:
        """A grant's locks, ``fresh`` (some lock made anew), ``kept`` (the keys not the
        grant's to give back) and ``upgraded`` (those of ``kept`` upgraded in place)."""
        return (tuple(lock for lock, _ in taken),
                any(took is Took.NEW for _, took in taken),
                frozenset(lock.key for lock, took in taken if took is not Took.NEW),
                frozenset(lock.key for lock, took in taken if took is Took.UPGRADED))


_NO_KEYS: frozenset[str] = frozenset()


class Stored(enum.Enum):
    """What a store's one-step release (``StoreBackend._pop``) may know besides a lock."""

    NOTHING = "nothing"
    """Nothing is stored for the key (no lock, no shared lock, not even a lapsed one), known
    without a write: the general path would release, expire and hand over nothing."""


@dataclass(slots=True)
class OtherSideCheck:
    """A write of ``key`` in this task that also checks the other side of the same store
    (``namespace``: its rows in the same file) holds nothing for the key, in the write's own
    transaction (see :meth:`StoreBackend.checks_other_side`). ``active`` is cleared when the
    call that asked for it returns: work the call started in the background (a timer, a task:
    they copy the task's context) never checks on its behalf."""

    namespace: str
    key: str
    active: bool = True
    _token: Token[OtherSideCheck | None] | None = field(default=None, init=False, repr=False)

    def __enter__(self) -> None:
        self._token = _OTHER_SIDE.set(self)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.active = False
        if self._token is not None:
            _OTHER_SIDE.reset(self._token)


_OTHER_SIDE: ContextVar[OtherSideCheck | None] = ContextVar("other_side_check", default=None)
"""The check asked for by the call running in this task (the router's, around one acquire or
release of one key on the enhanced side)."""


class OtherSideHolds(Exception):
    """The other side holds something for the key (or its row could not be told free): the
    write that was to check it changed nothing, and the caller asks that side itself."""

    def __init__(self, key: str) -> None:
        super().__init__(f"{key}: the other side holds it")
        self.key = key


def checking_other_side(namespace: str, key: str) -> OtherSideCheck:
    """Within the block (``with checking_other_side(namespace, key):``), this task's writes of
    ``key`` on a store that :meth:`~StoreBackend.checks_other_side` also check that
    ``namespace`` holds nothing for it, in the same transaction, and raise
    :class:`OtherSideHolds` (changing nothing) when it does.

    The check is its own block (``__enter__`` and ``__exit__``), not a generator made into
    one by ``contextlib.contextmanager``: the router enters one on every acquire and release
    of the embedded store, and the generator's block cost about 2.5k instructions more."""
    return OtherSideCheck(namespace, key)


def other_side_check(key: str) -> str | None:
    """The namespace this task's write of ``key`` must also find free, if any."""
    check = _OTHER_SIDE.get()
    if check is None or not check.active or check.key != key:
        return None
    return check.namespace


@runtime_checkable
class Backend(Protocol):
    """One lock space. All methods are atomic per call."""

    kind: str
    namespace: str
    unreadable: UnreadableLocks
    """Keys whose stored lock cannot be read (see :mod:`.unreadable`): reading one of them
    raises ``LockUnreadable``, lists skip them, ``force_unlock`` (``release`` without an
    owner) deletes what is stored and clears the entry."""

    async def acquire(self, lock: Lock) -> tuple[bool, Lock]:
        """Grant ``lock`` (stored as given, with the key's next fencing token) if its key is
        free or expired, else report the holder.

        The holder's own pull asking again gets ``(True, holder)`` unchanged (Atlantis's
        rule). A fresh grant gets the key's next fencing token and is returned as stored.
        """
        ...

    async def release(self, key: str, *, owner: Owner | None = None) -> Lock | None:
        """Free ``key``; with ``owner`` only if that pull holds it (else ``LockNotOwned``)."""
        ...

    async def get(self, key: str) -> Lock | None: ...

    async def list(self, *, repo: str | None = None, pull: int | None = None) -> Locks: ...

    async def release_by_pull(self, repo: str, pull: int) -> Locks: ...

    async def refresh(self, key: str, owner: Owner, ttl: timedelta) -> Lock:
        """Move the lease of a held lock to now + ``ttl``, none for 0 (``LockNotOwned`` if
        the owner lost it)."""
        ...

    async def export(self) -> tuple[Locks, dict[str, int]]:
        """Every held lock and every key's fencing counter (to move them to another store)."""
        ...

    async def adopt(self, locks: Locks, tokens: dict[str, int]) -> Locks:
        """Take over locks and counters from another store; counters only ever rise.

        Returns the locks it could not take because their key is held here by another pull.
        """
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class QueueBackend(Backend, Protocol):
    """A backend with per-key queues: what the enhanced locker runs on.

    Every method is one atomic step. ``policy`` carries the live queue settings (the caller
    reads them from the config on every call); the service order is
    :func:`~enhanced_locking.backends.waiting.service_order` at the backend's ``now()``.

    Invariants every implementation keeps:

    * A key is never held by two owners; a fresh grant gets the key's next fencing token
      (strictly increasing per key, across releases, restarts and replicas).
    * After every call, a free key has no *grantable* waiter: whoever frees a key (release,
      force-unlock, expiry, release by pull) hands it in the same step to the first waiter in
      service order that can take it, and announces the grant through ``grants``.
    * A batch waiter is granted all its keys at once or nothing. It never reserves a key: when
      its turn comes on one key while another of its keys is held, it keeps its place and the
      next waiter is served (holding a partial set while waiting is how deadlocks start).
    * A waiter past its deadline is never granted; it is dropped (and told ``timeout``).
    * Waiters are never persisted beyond the life of the callers that wait (see the module
      docstring); a backend whose queues outlive a process must drop the waiters of a process
      that is gone before granting to them.
    """

    @property
    def grants(self) -> GrantNotifier:
        """Where waiting callers hear of their grant, cancel or timeout (see ``waiting``)."""
        ...

    async def release(
        self, key: str, *, owner: Owner | None = None, policy: QueuePolicy | None = None
    ) -> Lock | None:
        """As :meth:`Backend.release`, and the key goes straight to its next waiter."""
        ...

    async def release_by_pull(
        self, repo: str, pull: int, *, policy: QueuePolicy | None = None
    ) -> Locks:
        """As :meth:`Backend.release_by_pull`, and every key goes to its next waiter."""
        ...

    async def release_pull(
        self, repo: str, pull: int, *, policy: QueuePolicy | None = None
    ) -> PullRelease:
        """:meth:`release_by_pull`, with the pull's locks whose lease had run out (freed by
        the same step, not in the locks it answers) beside them."""
        ...

    async def now(self) -> datetime:
        """The backend's clock (the Redis server's ``TIME``, the process clock in process)."""
        ...

    async def acquire_or_enqueue(
        self, candidate: Candidate, *, ttl: timedelta | None, wait: Wait | None,
        policy: QueuePolicy,
    ) -> Outcome:
        """Grant ``candidate``'s key, else queue a waiter for it (with ``wait``), else refuse.

        Granted when :func:`enhanced_locking.policies.verdict` says so (after expiring lapsed leases
        and serving grantable waiters first); already held by the same pull, the lock is returned
        unchanged (``fresh`` false). A grant makes the lock of ``candidate`` with
        ``acquired_at`` the backend's clock, ``expires_at = acquired_at + ttl`` (no expiry
        without ``ttl``) and the next fencing token (:meth:`Candidate.granted`).
        Not granted and no ``wait`` (or a zero one): ``held``. With ``wait``: ``queued`` at its
        position, deadline ``now + wait.timeout``; ``queue_full`` when the key already has
        ``policy.max_size`` waiters. Idempotent per ``wait.id``: asking again while that waiter
        is queued answers its current position (a retry never queues twice).
        """
        ...

    async def acquire_batch(
        self,
        candidates: Sequence[Candidate],
        *,
        ttl: timedelta | None,
        wait: Wait | None,
        policy: QueuePolicy,
    ) -> Outcome:
        """All of ``candidates`` (distinct keys, one owner) or none, same rules as above.

        Not grantable: ``held`` names the first blocked key (in the order given) and its
        holder; with ``wait`` one waiter is queued on every key of the batch and is granted all
        of them in one step once they are free together.
        """
        ...

    async def release_and_handoff(
        self, key: str, *, owner: Owner | None = None, policy: QueuePolicy | None = None,
        token: int | None = None, checked: frozenset[int] | None = None,
        unless_told: bool = False,
    ) -> Handoff:
        """Free ``key`` (with ``owner``: only if that pull holds it, else ``LockNotOwned``;
        with ``token`` too: only that hold of the pull, the lock with that fencing token)
        and hand it to the next waiter; say which lock went and who got it. ``checked``
        (without ``owner``: a force-unlock's): the fencing tokens of the holds the caller's
        right was asked about; a holder not among them (it took the key since) is
        ``LockNotOwned`` and nothing is freed. ``unless_told`` (with ``token``): the
        give-back of a grant nobody heard, whose cancel or confirmation answered the lock as
        the grant's own; a lock another request of its pull was answered with since (it
        counts as told) stays, ``LockNotOwned``."""
        ...

    async def force_unlock(self, key: str, *, policy: QueuePolicy | None = None,
                           checked: frozenset[int] | None = None) -> Handoff:
        """Free ``key`` whoever holds it and hand it on (the admin's way out); with
        ``checked``, only if every holder is one of those holds (else ``LockNotOwned``)."""
        ...

    async def replace(self, lock: Lock) -> bool:
        """Put ``lock`` in place of whatever is stored under its key, in one step: no reader
        ever finds the key free in between. As :meth:`Backend.adopt` it keeps ``lock``'s
        fencing token, times and mode (the key's counter rises to the token); a lock whose
        lease has already ended is not stored (the key is left free). It serves no queue: it
        is the write of a store nobody waits in (the fallback journal). Whether ``lock`` was
        stored."""
        ...

    async def expire(self, key: str, *, policy: QueuePolicy | None = None) -> Expiry:
        """If ``key``'s lease has lapsed (backend clock), free it and hand it on.

        Also serves waiters of a key found free (a lapsed lease noticed by another call).
        The enhanced locker calls this from a timer set to each lease's end; the answer says,
        from the same step, who holds the key after it and the store's clock then, so that
        the timer is set again for those leases without a read of its own.
        """
        ...

    async def cancel(
        self, key: str, waiter_id: str, *, reason: Reason = Reason.CANCELLED, caller: str = "",
        policy: QueuePolicy | None = None,
    ) -> Cancelled:
        """Take a waiter out of every queue it is in and tell it ``reason``.

        ``key`` is one of its keys (where to look). If it was granted before this call, the
        answer carries the locks it now holds (``removed`` false): a caller cancelling because
        its client is gone releases them. With ``caller``, only if that caller still owns the
        waiter (a retried request may have taken it over), or owned it when it was granted.
        A waiter removed has its keys' queues served in the same step, with ``policy``: the
        shared requests an exclusive one kept waiting behind it join the key's shared
        holders then (their grants are told to them, as a release's are).
        """
        ...

    async def holders(self, key: str) -> Locks:
        """Every live holder of ``key``: one, or several when it is held shared."""
        ...

    async def wake(self, *, policy: QueuePolicy) -> Handoff:
        """Serve every queue under ``policy`` (its rules changed, or a freeze ended)."""
        ...

    async def queue(self, key: str, *, policy: QueuePolicy | None = None,
                    limit: int | None = None) -> Waiters:
        """``key``'s waiters in service order (first is served next); with ``limit``, only
        the first ``limit`` of them."""
        ...

    async def wait_graph(self, *, policy: QueuePolicy | None = None) -> KeyWaitsList:
        """Every key that has waiters, with its holder's owner and its waiters in order."""
        ...

    async def wait_graph_from(self, waiter: Waiter, *,
                              policy: QueuePolicy | None = None) -> KeyWaitsList:
        """What :meth:`wait_graph` answers of the keys a search for a cycle through
        ``waiter``'s pull can reach: at least every key that pull, or a pull holding or
        waiting on a key reached, waits on (more is allowed: the whole graph). A search from
        that pull finds in it what it finds in the whole graph. Under concurrency rules
        (``policy.limits``) also every held key of a concurrency group, with its ``parts``
        (an entry with no waiters when nobody waits for it): a waiter held back by a full
        group waits for the group's holders, of every key."""
        ...


@runtime_checkable
class GivesBack(Protocol):
    """A store that gives back on its own an acquire whose answer its caller never had (Redis:
    a call that did not wait, answered ``unavailable`` or whose caller went away as it was on
    its way, is given back by its id once Redis answers: it may have run and granted)."""

    gave_back: Callable[[Handoff], None]
    """Told what each such give-back released and handed on (set by the locker, which tells
    it as the grant of a waiter whose caller left: released, ``abandoned``)."""


class StoreBackend(abc.ABC):
    """Backend logic over synchronous primitives; subclasses say how rows are kept.

    A key is held by one exclusive lock (the ``_load``/``_store`` row) or by shared locks, one
    per pull (``_load_shared``/``_store_shared``), never both. Every grant, whether to a new
    request or from the queue, is decided by :func:`enhanced_locking.policies.verdict`.
    """

    kind = "store"

    def __init__(self, namespace: str, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.namespace = namespace
        self.clock = clock
        self.grants = LocalNotifier()
        self.unreadable = UnreadableLocks(namespace)
        self._queues: dict[str, list[Waiter]] = {}
        self._waiters: dict[str, Waiter] = {}
        # Recent grants to waiters, so a cancel that lost the race to a grant can say so.
        self._granted: collections.OrderedDict[str, Grant] = collections.OrderedDict()
        # Who else of its pull was answered with a hold unchanged (``_take``), by key, where
        # a store keeps it in this process (:meth:`_told_of`). Bounded as the grants
        # remembered are (``_GRANTS_REMEMBERED``): only a grant still remembered is ever given
        # back through it; the key counted longest ago goes first.
        self._told: collections.OrderedDict[str, Told] = collections.OrderedDict()
        self._seq = 0
        self.served_unasked: Callable[[Handoff], None] = _untold
        """Told of a hand-off this store made on its own, not as the answer to a call (etcd:
        a key whose lock its lease deleted, served by the watch of deletions or the read of
        the waiting keys): the locker tells and counts it as an expiry (set by it)."""
        self.passed_over = Count()
        """Waiters passed over because their caller's process was gone (``_gone``); the
        locker gives it ``enhanced_locking_waiters_passed_over_total``."""
        self.taken_back = Count()
        """Locks granted to another process's waiter and taken back, that process gone before
        it took them (etcd); the locker gives it ``enhanced_locking_grants_taken_back_total``."""
        self.queue_policy: Callable[[], QueuePolicy] = QueuePolicy
        """The queue policy in force (set by the locker: its ``policy``), for the steps this
        store runs on its own (etcd: a grant taken back, a key served by the watch of
        deletions or the read of the waiting keys), which no caller passes one to. Before,
        those steps served the key's queue under the default policy (first come, first
        served, no freeze or limit), whatever the service's settings said."""

    # --- primitives ---------------------------------------------------------------------------
    @abc.abstractmethod
    def _load(self, key: str) -> Lock | None: ...

    @abc.abstractmethod
    def _store(self, lock: Lock) -> None: ...

    @abc.abstractmethod
    def _delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def _load_shared(self, key: str) -> Locks:
        """Every shared lock of ``key`` (lapsed ones too), oldest first."""

    @abc.abstractmethod
    def _store_shared(self, lock: Lock) -> None: ...

    @abc.abstractmethod
    def _delete_shared(self, key: str, owner: Owner) -> None: ...

    @abc.abstractmethod
    def _next_token(self, key: str) -> int: ...

    @abc.abstractmethod
    def _tokens(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def _raise_token(self, key: str, at_least: int) -> None: ...

    def _check_tokens(self, keys: Sequence[str]) -> None:
        """Raise ``LockUnreadable`` for the first of ``keys`` whose fencing counter cannot
        serve a grant (a store whose counters something else can write over: etcd's floors),
        asked before a grant's first write, so that nothing is granted on it."""
        return None

    def _restart_token(self, key: str) -> None:
        """A force-unlock of ``key``: a fencing counter that cannot serve a grant starts
        again, above every token handed out for the key (etcd's floor, from the clock)."""
        return None

    @abc.abstractmethod
    def _scan(self, repo: str | None, pull: int | None) -> Locks:
        """Every lock (both modes), optionally of one repository and/or pull; unreadable ones
        are skipped (and kept aside: see :meth:`_read_rows`)."""

    @abc.abstractmethod
    def _purge(self, key: str) -> None:
        """Delete whatever is stored as ``key``'s holders (exclusive and shared), unread."""

    def _told_of(self, key: str, token: int) -> Told | None:
        """Who of its pull was answered with ``key``'s hold whose fencing token is ``token``
        unchanged, as counted (``None``: nobody, or the count is another hold's), read in the
        current step. Here in this process (``_told``): a store on which other processes
        answer counts where they all read it (the embedded store's file, the lock's own record
        on etcd)."""
        told = self._told.get(key)
        return told if told is not None and told.token == token else None

    def _keep_told(self, key: str, told: Told) -> None:
        """``told`` as ``key``'s count from now on, written in the current step (so with the
        give-back that changed it)."""
        self._told[key] = told
        self._told.move_to_end(key)
        while len(self._told) > _GRANTS_REMEMBERED:
            self._told.popitem(last=False)

    def _count_told(self, key: str, token: int, teller: str) -> None:
        """``teller`` was answered with ``key``'s hold whose fencing token is ``token``, held
        already (``_take``): counted in the current step, with the answer."""
        told = self._told_of(key, token) or Told(token)
        told.tellers.add(teller)
        self._keep_told(key, told)

    def _unreadable_change(self, change: Callable[[UnreadableLocks], object]) -> None:
        """Apply a change to :attr:`unreadable` (a store whose steps may run again before they
        count, etcd's, applies it once its step is done)."""
        change(self.unreadable)

    def _read(self, key: str, text: str | bytes) -> Lock:
        """Decode one stored lock; one that is not a lock is kept aside (``LockUnreadable``)."""
        try:
            return codec.read(text, key=key, side=self.namespace)
        except LockUnreadable as error:
            found = error.found
            self._unreadable_change(lambda u: u.found(found))
            raise

    def _read_rows(self, rows: Sequence[tuple[str, str | bytes]], *, every: bool) -> Locks:
        """Decode a scan's rows, skipping (and keeping aside) the unreadable ones; ``every``:
        the scan read every key, so keys kept aside before and not found again are gone."""
        locks: Locks = []
        bad: list[UnreadableLock] = []
        with _collector_paused(len(rows)):
            for key, text in rows:
                try:
                    locks.append(codec.read(text, key=key, side=self.namespace))
                except LockUnreadable as error:
                    bad.append(error.found)
        if every or bad:
            self._unreadable_change(lambda u: u.scanned(bad, every=every))
        return locks

    def _take_free(self, candidate: Candidate, times: Times) -> Lock | None:
        """Grant ``candidate`` (``times`` its acquired and expiry times) in one atomic step if
        its key is free (no row, a released one, nobody holding it shared), with the key's
        next fencing token; ``None`` when the key is held (then the caller takes the general
        path). A store without such a step answers ``None`` always."""
        return None

    def checks_other_side(self, other: object) -> str | None:
        """The namespace of ``other`` (a store) when this store's writes can check, in their own
        transaction, that ``other`` holds nothing for the key (:func:`checking_other_side`):
        the two keep their rows in the same file. ``None`` here: a store of its own."""
        return None

    def _other_side_holds(self, namespace: str, key: str) -> bool:
        """Whether ``namespace``'s rows (in this store's file) hold anything for ``key``, read
        inside the current transaction. Only a store that :meth:`checks_other_side` is asked."""
        raise NotImplementedError(f"{type(self).__name__} keeps no other side's rows")

    def _refuse_if_other_side_holds(self, keys: Sequence[str]) -> None:
        """Inside a step: raise :class:`OtherSideHolds` (the step changes nothing) when this
        task asked its writes of one of ``keys`` to check the other side, and it holds one."""
        if _OTHER_SIDE.get() is None:
            return
        for key in keys:
            namespace = other_side_check(key)
            if namespace is not None and self._other_side_holds(namespace, key):
                raise OtherSideHolds(key)

    def _gone(self, waiter: Waiter) -> bool:
        """Whether the process ``waiter``'s caller waits in is gone (a store whose queues
        outlive a process: etcd's, see the protocol's invariants), so that it is passed over
        rather than granted. Asked only of a waiter the step would grant."""
        return False

    def _forget_grant(self, waiter_id: str) -> None:
        """A retried request took its grant: a later cancel must not give it back."""
        self._granted.pop(waiter_id, None)

    def _pop(self, key: str, owner: Owner | None) -> Lock | Literal[Stored.NOTHING] | None:
        """Delete ``key``'s exclusive row if ``owner`` (or anyone, without it) holds it, in one
        atomic step; the row deleted, :attr:`Stored.NOTHING` (nothing to release), or ``None``
        (then the caller takes the general path). Asked only when nobody waits for the key
        and no concurrency limit is set."""
        return None

    def _pop_exactly(self, key: str, owner: Owner, token: int) -> Lock | None:
        """:meth:`_pop` of the lock ``owner`` holds with fencing token ``token``, only if the
        store holds exactly that lock: the lock released, or ``None`` (nothing released; the
        caller takes the general path)."""
        return None

    def held_as_seen(self, key: str) -> Lock | None:
        """The lock this store last wrote or read as ``key``'s holder in this process, without
        asking the store (no I/O), or ``None``. A guess: another writer (another process on
        the same store) may have changed the key since. Good only for a release by its fencing
        token (:meth:`release_and_handoff` with ``owner`` and ``token``), which releases
        nothing unless the store holds exactly that lock."""
        return None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[None]:
        """A consistent view for reads that change nothing (by default, a transaction)."""
        with self._transaction():
            yield

    @contextlib.contextmanager
    def _step(self) -> Iterator[_Effects]:
        """One atomic step; waiters hear of it only once it is committed."""
        effects = _Effects()
        with self._transaction():
            yield effects
        for waiter_id, notice in effects.notices:
            self.grants.deliver(waiter_id, notice)

    # --- holders ------------------------------------------------------------------------------
    def _live(self, key: str, now: datetime) -> Lock | None:
        """The first live holder of ``key`` (the exclusive one, or the oldest shared one).

        A lapsed lease reads as free but is only removed by a step that then serves the key's
        queue (``_settle``, a release, ``expire``): removing it here would leave a free key
        with waiters nobody woke.
        """
        holders = self._holders(key, now)
        return holders[0] if holders else None

    def _holders(self, key: str, now: datetime) -> Locks:
        """Raises ``LockUnreadable`` when what is stored for ``key`` is not a lock."""
        lock = self._load(key)
        if lock is not None and not lock.expired(now):
            held = [lock]
        else:
            held = [s for s in self._load_shared(key) if not s.expired(now)]
        if key in self.unreadable:
            self._read_whole(key, held)
        return held

    def _read_whole(self, key: str, held: Locks) -> None:
        """``key``, set aside, had its stored holders (``held``, the live ones) read whole, or
        none stored: not set aside any more (another replica, or a person, repaired it). A
        store that sets a free key aside for what is stored beside its holders (etcd's token
        floor) keeps that entry while the key is free."""
        self._unreadable_change(lambda u: u.readable(key))

    def _drop(self, lock: Lock) -> None:
        if lock.mode == "shared":
            self._delete_shared(lock.key, lock.owner)
        else:
            self._delete(lock.key)

    def _stamp(self, template: Candidate, now: datetime, ttl: timedelta | None) -> Lock:
        lock = template.granted(acquired_at=now, expires_at=now + ttl if ttl else None,
                                fencing_token=self._next_token(template.key))
        if lock.mode == "shared":
            self._store_shared(lock)
        else:
            self._store(lock)
        return lock

    def _take(self, template: Candidate, now: datetime,
              ttl: timedelta | None, *, teller: str = "") -> tuple[Lock, Took]:
        """The lock ``template``'s pull gets on its key: the one it holds, or a fresh one
        (an exclusive request of the key's only shared holder is an upgrade: a new token,
        marked :attr:`Took.UPGRADED`). Held already, it is answered to ``teller`` (a waiter's
        id; ``""``: a request that does not wait) and counted as told (:meth:`_count_told`)."""
        mine = [h for h in self._holders(template.key, now) if h.owner == template.owner]
        if mine and not (template.mode == "exclusive" and mine[0].mode == "shared"):
            self._count_told(template.key, mine[0].fencing_token, teller)
            return mine[0], Took.HELD
        for lock in mine:
            self._drop(lock)
        return self._stamp(template, now, ttl), Took.UPGRADED if mine else Took.NEW

    def _expire_lapsed(self, key: str, now: datetime, fx: _Effects) -> None:
        holder = self._load(key)
        if holder is not None and holder.expired(now):
            self._delete(key)
            fx.expired.append(holder)
        for lock in self._load_shared(key):
            if lock.expired(now):
                self._delete_shared(key, lock.owner)
                fx.expired.append(lock)

    def _holders_left(self, keys: Sequence[str], now: datetime) -> tuple[Lock, ...]:
        """Every live holder of ``keys`` a step leaves, the keys it freed (a holder that cannot
        be read has no lease to look at: left out, and the step still commits)."""
        left: list[Lock] = []
        for key in keys:
            with contextlib.suppress(LockUnreadable):
                left += self._holders(key, now)
        return tuple(left)

    def _settle(self, key: str, now: datetime, policy: QueuePolicy, fx: _Effects) -> Lock | None:
        """The key's holder after expiring lapsed leases and serving grantable waiters."""
        self._expire_lapsed(key, now, fx)
        self._serve_queues([key], now, policy, fx)
        return self._live(key, now)

    # --- the rules ----------------------------------------------------------------------------
    def _decide(
        self, locks: Sequence[Candidate], owner: Owner, mode: Mode, now: datetime,
        policy: QueuePolicy, *, new: bool,
    ) -> policies.Decision:
        holders = {
            lock.key: [policies.Holding(h.owner, h.mode) for h in self._holders(lock.key, now)]
            for lock in locks
        }
        waiting: dict[str, bool] = {}
        if new and mode == "shared":
            # Only an exclusive request served before this one keeps it back: behind one of
            # a lower level (a priority queue) it would be first in line, held back by shared
            # holders alone until the next step walked the queue.
            level = effective_level(base=locks[0].priority.level, waited_ms=0, policy=policy)
            now_ms = epoch_ms(now)
            waiting = {lock.key: any(
                w.mode == "exclusive" and w.owner != owner and w.deadline > now
                and effective_level(base=w.priority.level,
                                    waited_ms=now_ms - epoch_ms(w.enqueued_at),
                                    policy=policy) >= level
                for w in self._queues.get(lock.key, ())) for lock in locks}
        counts: dict[str, int] = {}
        if policy.rules.concurrency:
            for held in self._scan(None, None):
                if not held.expired(now):
                    for group in policies.groups_of(parts_of(held), policy.rules):
                        counts[group] = counts.get(group, 0) + 1
        decision = policies.verdict(
            owner=owner, mode=mode, keys=[parts_of(lock) for lock in locks], holders=holders,
            exclusive_waiting=waiting, group_counts=counts, rules=policy.rules, now=now,
            new=new,
        )
        if decision.verdict is policies.Verdict.GRANT:
            # The keys the grant stamps a token on (not those the pull holds already, as it
            # asks): a counter that cannot serve it sets the request back, as a holder would.
            self._check_tokens([lock.key for lock in locks if not any(
                h.owner == owner and not (mode == "exclusive" and h.mode == "shared")
                for h in holders[lock.key])])
        return decision

    # --- queues -------------------------------------------------------------------------------
    def _serve_queues(self, keys: Sequence[str], now: datetime, policy: QueuePolicy,
                      fx: _Effects) -> None:
        """Grant every waiter that may have its locks now, in service order.

        Without concurrency limits each key's queue is walked in turn (``keys`` in the order
        given). A waiter held back by a holder of the key stops the walk (so a waiting
        exclusive request keeps shared ones behind it), and so does an exclusive grant; one
        held back by a freeze or a limit, or by another key of its batch, keeps its place and
        the next is served. With concurrency limits every queue is walked at once, in one
        service order (a lock freed in a group may go to a waiter of another key of the
        group), and a holder stops only the line of its own key.
        """
        if policy.rules.concurrency:
            self._walk(list({w.id: w for _, q in self._queues.items() for w in q}.values()),
                       None, now, policy, fx)
            return
        for key in keys:
            queue = self._queues.get(key)
            if queue:
                self._walk(list(queue), key, now, policy, fx)

    def _walk(self, waiters: Sequence[Waiter], key: str | None, now: datetime,
              policy: QueuePolicy, fx: _Effects) -> None:
        # A key whose stored lock cannot be read (here, or another key of a batch waiter) is
        # as held by someone unknown: nobody is served on it, and the step that walks is left
        # to do its own work (a release of another key, its expiry, an acquire) instead of
        # failing on a key it did not ask about.
        try:
            if key is not None and any(h.mode == "exclusive" for h in self._holders(key, now)):
                return  # held exclusively: nobody can be served (nor is anyone dropped) yet
        except LockUnreadable:
            return
        stopped: set[str] = set()
        for waiter in service_order(list(waiters), now=now, policy=policy):
            if self._waiters.get(waiter.id) is None:
                continue  # granted or dropped earlier in this walk
            if waiter.deadline <= now:
                self._unqueue(waiter)
                fx.timed_out.append(waiter)
                fx.notices.append((waiter.id, Notice(reason=Reason.TIMEOUT)))
                continue
            if stopped.intersection(waiter.keys):
                continue
            try:
                decision = self._decide(waiter.candidates, waiter.owner, waiter.mode, now,
                                        policy, new=False)
            except LockUnreadable as error:
                # Held back by that key, as by a holder of it: it keeps its place.
                if error.found.key == key:
                    return
                if key is None:
                    stopped.add(error.found.key)
                continue
            if decision.verdict is policies.Verdict.GRANT:
                if self._gone(waiter):
                    # Its caller's process is gone: passed over, as one past its deadline.
                    self._unqueue(waiter)
                    fx.timed_out.append(waiter)
                    fx.notices.append((waiter.id, Notice(reason=Reason.UNAVAILABLE)))
                    continue
                self._grant(waiter, now, fx)
                if key is not None and waiter.mode == "exclusive":
                    return
            elif decision.verdict is policies.Verdict.HELD and decision.key is not None:
                if decision.key == key:
                    return
                if key is None:
                    stopped.add(decision.key)

    def _grant(self, waiter: Waiter, now: datetime, fx: _Effects) -> Grant:
        taken = [self._take(template, now, waiter.ttl, teller=waiter.id)
                 for template in waiter.candidates]
        self._unqueue(waiter)
        locks, fresh, kept, upgraded = Took.answer(taken)
        grant = Grant(waiter=waiter, locks=locks, fresh=fresh, kept=kept, upgraded=upgraded,
                      told=(isinstance(self.grants, LocalNotifier)
                            and self.grants.waits(waiter.id)))
        self._granted[waiter.id] = grant
        while len(self._granted) > _GRANTS_REMEMBERED:
            self._granted.popitem(last=False)
        fx.granted.append(grant)
        fx.notices.append((waiter.id, Notice(locks=grant.locks, fresh=grant.fresh,
                                             kept=grant.kept, upgraded=grant.upgraded,
                                             caller=waiter.caller)))
        return grant

    def _still_held(self, grant: Grant, now: datetime) -> tuple[Lock, ...]:
        """The locks of ``grant`` still held as it granted them (same fencing token)."""
        return tuple(lock for lock in grant.locks
                     if any(h.fencing_token == lock.fencing_token
                            for h in self._holders(lock.key, now)))

    def _kept_now(self, grant: Grant, still: tuple[Lock, ...], *,
                  heard: bool) -> tuple[bool, frozenset[str] | None]:
        """``fresh`` and ``kept`` of ``grant`` as a call about it answers them (its locks
        ``still`` held): ``heard`` when its caller is answered with it (a retry taking it
        over, a cancel on timeout or deadlock), else it is given back (its caller went away).
        A lock the grant made is its pull's held already once another request of the pull
        was answered with it (``_take``): the give-back leaves it to that caller, noted as
        given back unheard. Given back, a grant answered with a lock held already takes its
        own answer back; the last one taken back from a lock whose own grant was given back
        unheard gives the lock back with it (nobody else was told it holds it)."""
        if grant.kept is None or heard:
            # Heard, the grant keeps its own answer (new for a lock it made): its give-back
            # later leaves the lock by ``unless_told``, as Redis's RELEASE does.
            return grant.fresh, grant.kept
        kept = set(grant.kept)
        for lock in still:
            told = self._told_of(lock.key, lock.fencing_token)
            if told is None:
                continue
            if lock.key not in grant.kept:
                if told.tellers:
                    kept.add(lock.key)
                    told.unheard = True
                    self._keep_told(lock.key, told)
            else:
                told.tellers.discard(grant.waiter.id)
                self._keep_told(lock.key, told)
                if not told.tellers and told.unheard:
                    kept.discard(lock.key)
        return len(kept) < len(grant.locks), frozenset(kept)

    def _unqueue(self, waiter: Waiter) -> None:
        self._waiters.pop(waiter.id, None)
        for key in waiter.keys:
            queue = self._queues.get(key)
            if queue is None:
                continue
            queue[:] = [w for w in queue if w.id != waiter.id]
            if not queue:
                del self._queues[key]

    def _queued(self, key: str, waiter: Waiter, now: datetime, policy: QueuePolicy,
                *, message: str | None = None, superseded: tuple[Waiter, ...] = ()) -> Outcome:
        """``waiter`` queued on ``key``: its place, who is ahead of it and who holds the key,
        as this step sees them (the caller shows them without asking the store again)."""
        ordered = service_order(self._queues.get(key, ()), now=now, policy=policy)
        at = next(i for i, w in enumerate(ordered) if w.id == waiter.id)
        holders = tuple(self._holders(key, now))
        return Outcome(status=Status.QUEUED, waiter=waiter, key=key,
                       holder=holders[0] if holders else None, position=at + 1,
                       message=message, superseded=superseded, ahead=tuple(ordered[:at]),
                       holders=holders)

    def _stale(self, candidates: Sequence[Candidate], wait_id: str) -> dict[str, Waiter]:
        """The queued requests of the same pull made for an older head commit, by id."""
        head = candidates[0].pull.head_commit
        if not head:
            return {}
        owner = candidates[0].owner
        return {
            w.id: w for c in candidates for w in self._queues.get(c.key, ())
            if w.owner == owner and w.id != wait_id and w.head_commit not in ("", head)
        }

    def _supersede(self, stale: dict[str, Waiter], fx: _Effects) -> list[Waiter]:
        """Push out ``stale`` (:meth:`_stale`): the newer request takes their place."""
        for waiter in stale.values():
            self._unqueue(waiter)
            fx.notices.append((waiter.id, Notice(reason=Reason.SUPERSEDED)))
        return list(stale.values())

    def _reattach(self, waiter: Waiter, wait: Wait) -> Waiter:
        """A retried request takes its waiter over (place and enqueue time kept)."""
        if not wait.caller or waiter.caller == wait.caller:
            return waiter
        moved = dataclasses.replace(waiter, caller=wait.caller)
        self._waiters[waiter.id] = moved
        for key in waiter.keys:
            queue = self._queues.get(key, [])
            queue[:] = [moved if w.id == waiter.id else w for w in queue]
        return moved

    # --- the Backend protocol -----------------------------------------------------------------
    async def now(self) -> datetime:
        return self.clock()

    async def acquire(self, lock: Lock) -> tuple[bool, Lock]:
        if lock.key not in self._queues:
            taken = self._take_free(Candidate.of_lock(lock), (lock.acquired_at, lock.expires_at))
            if taken is not None:
                return True, taken
        with self._step() as fx:
            holder = self._settle(lock.key, lock.acquired_at, QueuePolicy(), fx)
            if holder is not None:
                same = holder.owned_by(lock.project.repo_full_name, lock.pull.num)
                return same, holder
            stored = lock.model_copy(update={"fencing_token": self._next_token(lock.key)})
            self._store(stored)
            return True, stored

    async def release(
        self, key: str, *, owner: Owner | None = None, policy: QueuePolicy | None = None
    ) -> Lock | None:
        return (await self.release_and_handoff(key, owner=owner, policy=policy)).released

    async def get(self, key: str) -> Lock | None:
        with self._snapshot():
            return self._live(key, self.clock())

    async def holders(self, key: str) -> Locks:
        """Every live holder of ``key`` (several when it is held shared)."""
        with self._snapshot():
            return self._holders(key, self.clock())

    async def list(self, *, repo: str | None = None, pull: int | None = None) -> Locks:
        now = self.clock()
        return [lock for lock in self._scan(repo, pull) if not lock.expired(now)]

    async def release_by_pull(
        self, repo: str, pull: int, *, policy: QueuePolicy | None = None
    ) -> Locks:
        return list((await self.release_pull(repo, pull, policy=policy)).released)

    async def release_pull(
        self, repo: str, pull: int, *, policy: QueuePolicy | None = None
    ) -> PullRelease:
        policy = policy or QueuePolicy()
        with self._step() as fx:
            now = self.clock()
            released = sorted(self._scan(repo, pull), key=lambda lock: lock.key)
            for lock in released:
                self._drop(lock)
            # In key order, so who gets what does not depend on storage.
            self._serve_queues([lock.key for lock in released], now, policy, fx)
            left = self._holders_left(sorted({lock.key for lock in released}), now)
        return PullRelease(released=tuple(lock for lock in released if not lock.expired(now)),
                           expired=tuple(lock for lock in released if lock.expired(now)),
                           granted=tuple(fx.granted), holders=left)

    async def refresh(self, key: str, owner: Owner, ttl: timedelta) -> Lock:
        with self._transaction():
            now = self.clock()
            holders = self._holders(key, now)
            if not holders:
                raise LockNotHeld(key)
            holder = next((h for h in holders if h.owner == owner), None)
            if holder is None:
                raise LockNotOwned(key, holders[0])
            lock = holder.model_copy(update={"expires_at": now + ttl if ttl else None})
            if lock.mode == "shared":
                self._store_shared(lock)
            else:
                self._store(lock)
            return lock

    async def export(self) -> tuple[Locks, dict[str, int]]:
        return await self.list(), self._tokens()

    async def adopt(self, locks: Locks, tokens: dict[str, int]) -> Locks:
        conflicts = []
        with self._transaction():
            for key, token in tokens.items():
                self._raise_token(key, token)
            now = self.clock()
            for lock in locks:
                others = [h for h in self._holders(lock.key, now) if h.owner != lock.owner]
                if others and not (lock.mode == "shared"
                                   and all(h.mode == "shared" for h in others)):
                    conflicts.append(lock)
                    continue
                self._raise_token(lock.key, lock.fencing_token)
                if lock.mode == "shared":
                    self._store_shared(lock)
                elif not any(h.owner == lock.owner for h in self._holders(lock.key, now)):
                    self._store(lock)
        return conflicts

    async def replace(self, lock: Lock) -> bool:
        key = lock.key
        with self._step() as fx:
            now = self.clock()
            try:
                self._expire_lapsed(key, now, fx)
                holders = self._holders(key, now)
            except LockUnreadable:
                # Whoever it was, what is stored under the key goes, and so does its entry.
                self._purge(key)
                self._unreadable_change(lambda u: u.cleared(key))
                holders = []
            for held in holders:
                self._drop(held)
            self._raise_token(key, lock.fencing_token)
            if lock.expired(now):
                return False
            if lock.mode == "shared":
                self._store_shared(lock)
            else:
                self._store(lock)
            return True

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        """Tell every waiter of this process that the store is going away."""
        for waiter_id in list(self._waiters):
            self.grants.deliver(waiter_id, Notice(reason=Reason.UNAVAILABLE))
        self._waiters.clear()
        self._queues.clear()

    # --- the QueueBackend protocol ------------------------------------------------------------
    async def acquire_or_enqueue(
        self, candidate: Candidate, *, ttl: timedelta | None, wait: Wait | None,
        policy: QueuePolicy,
    ) -> Outcome:
        # One key is a batch of one (acquire_batch), with the free key's step here, in the
        # coroutine the caller awaits: no batch's list, no second frame, no check of the
        # batch's keys on the common acquire.
        if (candidate.mode == "exclusive" and not policy.freezes and not policy.limits
                and candidate.key not in self._queues
                and (wait is None
                     or (wait.id not in self._waiters and wait.id not in self._granted))):
            # A free key nobody waits for, no rule that could say no: one step, no decision
            # (enhanced_locking.policies.verdict grants any holders-free key then).
            now = self.clock()
            free = self._take_free(candidate, (now, now + ttl if ttl else None))
            if free is not None:
                return Outcome.of_grant(free)
        return await self._acquire_step((candidate,), ttl=ttl, wait=wait, policy=policy)

    async def acquire_batch(
        self,
        candidates: Sequence[Candidate],
        *,
        ttl: timedelta | None,
        wait: Wait | None,
        policy: QueuePolicy,
    ) -> Outcome:
        if not candidates or (len(candidates) > 1
                              and len({c.key for c in candidates}) != len(candidates)):
            raise ValueError("a batch needs at least one key and no key twice")
        if len(candidates) == 1:
            # This class's own (a store may route its acquire_or_enqueue through here).
            return await StoreBackend.acquire_or_enqueue(self, candidates[0], ttl=ttl,
                                                         wait=wait, policy=policy)
        return await self._acquire_step(candidates, ttl=ttl, wait=wait, policy=policy)

    async def _acquire_step(
        self, candidates: Sequence[Candidate], *, ttl: timedelta | None, wait: Wait | None,
        policy: QueuePolicy,
    ) -> Outcome:
        """An acquire that may queue, meet rules or holders: one atomic step that decides."""
        with self._step() as fx:
            outcome = self._acquire_in(fx, candidates, ttl=ttl, wait=wait, policy=policy)
            if fx.expired:  # leases found run out and freed: the caller tells them expired
                outcome.expired = tuple(fx.expired)
            if fx.granted:  # waiters served on the way: the caller counts the hand-offs
                outcome.handed = tuple(fx.granted)
            return outcome

    def _acquire_in(
        self, fx: _Effects, candidates: Sequence[Candidate], *, ttl: timedelta | None,
        wait: Wait | None, policy: QueuePolicy,
    ) -> Outcome:
        """The decision of :meth:`_acquire_step`, within its step (``fx``: its effects)."""
        self._refuse_if_other_side_holds([c.key for c in candidates])
        now = self.clock()
        if wait is not None and (queued := self._waiters.get(wait.id)) is not None:
            queued = self._reattach(queued, wait)
            key = queued.keys[0]
            return self._queued(key, queued, now, policy)
        if wait is not None and (taken := self._granted.get(wait.id)) is not None:
            still = self._still_held(taken, now)
            if len(still) == len(taken.locks):  # granted while its caller was away
                # The retry takes the grant over: nobody heard of it yet, so it is the
                # retry's to give back if its client goes too (else the first caller's).
                self._forget_grant(wait.id)
                fresh, kept = self._kept_now(taken, still, heard=True)
                # Told: its first caller heard it (and announced an upgrade it made).
                return Outcome(status=Status.GRANTED, locks=still,
                               fresh=fresh and not taken.told, kept=kept,
                               upgraded=_NO_KEYS if taken.told else taken.upgraded)
        first = candidates[0]
        owner, mode = first.owner, first.mode
        for candidate in candidates:
            self._expire_lapsed(candidate.key, now, fx)
        self._serve_queues([c.key for c in candidates], now, policy, fx)
        decision = self._decide(candidates, owner, mode, now, policy, new=True)
        if decision.verdict is policies.Verdict.GRANT:
            locks, fresh, kept, upgraded = Took.answer([self._take(c, now, ttl)
                                                        for c in candidates])
            return Outcome(status=Status.GRANTED, locks=locks, fresh=fresh, kept=kept,
                           upgraded=upgraded)
        key = decision.key or first.key
        holder = self._live(key, now)
        freeze = decision.freeze
        if freeze is not None and (freeze.action == "refuse" or not _waits(wait)):
            return Outcome(status=Status.FROZEN, key=key, holder=holder,
                           message=freeze.message)
        if not _waits(wait):
            status = (Status.LIMITED if decision.verdict is policies.Verdict.LIMITED
                      else Status.HELD)
            return Outcome(status=status, key=key, holder=holder)
        assert wait is not None
        # A full queue refuses the request before it pushes anything out: one that does not
        # queue leaves its pull's older requests queued, as one that does not wait does
        # (the places of those it would push out count as free).
        stale = self._stale(candidates, wait.id)
        for candidate in candidates:
            queue = self._queues.get(candidate.key, ())
            freed = sum(w.id in stale for w in queue) if stale else 0
            if len(queue) - freed >= policy.max_size:
                return Outcome(status=Status.QUEUE_FULL, key=candidate.key,
                               holder=self._live(candidate.key, now))
        superseded = self._supersede(stale, fx)
        self._seq += 1
        waiter = Waiter(
            id=wait.id, candidates=tuple(candidates), ttl=ttl, enqueued_at=now,
            deadline=now + wait.timeout, seq=self._seq, request_id=wait.request_id,
            caller=wait.caller,
        )
        self._waiters[waiter.id] = waiter
        for candidate in candidates:
            self._queues.setdefault(candidate.key, []).append(waiter)
        return self._queued(key, waiter, now, policy,
                            message=freeze.message if freeze is not None else None,
                            superseded=tuple(superseded))

    async def release_and_handoff(
        self, key: str, *, owner: Owner | None = None, policy: QueuePolicy | None = None,
        token: int | None = None, checked: frozenset[int] | None = None,
        unless_told: bool = False,
    ) -> Handoff:
        # A give-back that leaves what the count says (read in the step that frees, with it).
        counted = unless_told and token is not None
        if (key not in self._queues and (policy is None or not policy.limits)
                and (checked is None or owner is not None) and not counted):
            # Nobody waits here: one step, nothing to hand over (a token's hold: only that one).
            popped = (self._pop(key, owner) if token is None
                      else None if owner is None else self._pop_exactly(key, owner, token))
            if popped is Stored.NOTHING:
                return Handoff.of_release(None)
            if popped is not None:
                # No lease, nothing to ask the clock about (the field read from the model's
                # __dict__: pydantic's __getattr__ hook is on every read of an attribute).
                lapsed = (popped.__dict__["expires_at"] is not None
                          and popped.expired(self.clock()))
                if lapsed:  # its lease had run out: freed, and told as expired
                    return Handoff(released=None, expired=(popped,))
                return Handoff.of_release(popped)
        policy = policy or QueuePolicy()
        with self._step() as fx:
            self._refuse_if_other_side_holds((key,))
            now = self.clock()
            try:
                self._expire_lapsed(key, now, fx)
                holders = self._holders(key, now)
            except LockUnreadable:
                if owner is not None or checked is not None:
                    raise  # whose it is cannot be told: only a force-unlock frees it
                # Whoever it was, what is stored under the key goes, and so does its entry.
                self._purge(key)
                self._unreadable_change(lambda u: u.cleared(key))
                holders = []
            if owner is None:
                self._restart_token(key)
            told = (counted and token is not None
                    and (since := self._told_of(key, token)) is not None and bool(since.tellers))
            if owner is not None:
                mine = [h for h in holders if h.owner == owner and not told
                        and (token is None or h.fencing_token == token)]
                if holders and not mine:
                    raise LockNotOwned(key, holders[0])
                holders = mine
            elif checked is not None:
                # A force-unlock frees only the holds its caller's right was asked about.
                unchecked = [h for h in holders if h.fencing_token not in checked]
                if unchecked:
                    raise LockNotOwned(key, unchecked[0])
            for lock in holders:
                self._drop(lock)
            self._serve_queues([key], now, policy, fx)
            handoff = fx.handoff(holders[0] if holders else None)
            return dataclasses.replace(handoff, also_released=tuple(holders[1:]),
                                       expired=tuple(fx.expired))

    async def force_unlock(self, key: str, *, policy: QueuePolicy | None = None,
                           checked: frozenset[int] | None = None) -> Handoff:
        return await self.release_and_handoff(key, policy=policy, checked=checked)

    async def expire(self, key: str, *, policy: QueuePolicy | None = None) -> Expiry:
        with self._step() as fx:
            now = self.clock()
            self._expire_lapsed(key, now, fx)
            self._serve_queues([key], now, policy or QueuePolicy(), fx)
            handoff = fx.handoff(fx.expired[0] if fx.expired else None)
            if len(fx.expired) > 1:  # shared holders whose leases all ended: every one told
                handoff.also_released = tuple(fx.expired[1:])
            return Expiry.of(handoff, holders=tuple(self._holders(key, now)), now=now)

    async def wake(self, *, policy: QueuePolicy) -> Handoff:
        """Serve every queue (a rule changed, or a freeze started or ended)."""
        with self._step() as fx:
            keys = sorted(key for key, _ in self._queues.items())
            self._serve_queues(keys, self.clock(), policy, fx)
            return fx.handoff(None)

    async def cancel(
        self, key: str, waiter_id: str, *, reason: Reason = Reason.CANCELLED, caller: str = "",
        policy: QueuePolicy | None = None,
    ) -> Cancelled:
        with self._step() as fx:
            waiter = self._waiters.get(waiter_id)
            if waiter is not None:
                if caller and waiter.caller and waiter.caller != caller:
                    return Cancelled(waiter=waiter)  # a retry took it over: it stays
                self._unqueue(waiter)
                fx.notices.append((waiter_id, Notice(reason=reason)))
                # Whoever it held back (shared requests behind an exclusive one) is served.
                self._serve_queues(waiter.keys, self.clock(), policy or QueuePolicy(), fx)
                return Cancelled(removed=True, waiter=waiter, handed=tuple(fx.granted))
            grant = self._granted.get(waiter_id)
            if grant is None:
                return Cancelled()
            if reason is Reason.LIMITED:
                # A limit lowered refuses only a waiter still queued: granted first, its
                # caller hears its grant, which stays as it is.
                return Cancelled(waiter=grant.waiter)
            if caller and grant.waiter.caller and grant.waiter.caller != caller:
                return Cancelled(waiter=grant.waiter)  # granted to the retry that took it over
            now = self.clock()
            still = self._still_held(grant, now)
            fresh, kept = self._kept_now(grant, still,
                                         heard=reason in (Reason.TIMEOUT, Reason.DEADLOCK))
            return Cancelled(waiter=grant.waiter, granted=still, fresh=fresh, kept=kept,
                             upgraded=grant.upgraded)

    async def queue(self, key: str, *, policy: QueuePolicy | None = None,
                    limit: int | None = None) -> Waiters:
        return service_order(self._queues.get(key, ()), now=self.clock(),
                             policy=policy or QueuePolicy())[:limit]

    async def wait_graph_from(self, waiter: Waiter, *,
                              policy: QueuePolicy | None = None) -> KeyWaitsList:
        # (in memory: the whole is cheap enough)
        return self._wait_graph(policy or QueuePolicy(), groups=True)

    async def wait_graph(self, *, policy: QueuePolicy | None = None) -> KeyWaitsList:
        return self._wait_graph(policy or QueuePolicy(), groups=False)

    def _wait_graph(self, policy: QueuePolicy, *, groups: bool) -> KeyWaitsList:
        """Every key with waiters; with ``groups`` under concurrency rules, also every held
        key of a concurrency group (with no waiters when none waits for it), each held key
        with its ``parts``, read as the grant step counts a group's locks (:meth:`_decide`)."""
        with self._transaction():
            now = self.clock()
            graph = []
            for key, queue in self._queues.items():
                try:
                    held = self._holders(key, now)
                except LockUnreadable:
                    held = []  # its holder is unknown; nothing is granted on it meanwhile
                graph.append(_key_waits(key, held, tuple(service_order(
                    queue, now=now, policy=policy)), policy if groups else None))
            if groups and policy.limits:
                by_key: dict[str, list[Lock]] = {}
                for lock in self._scan(None, None):
                    if lock.key not in self._queues and not lock.expired(now) and \
                            policies.groups_of(parts_of(lock), policy.rules):
                        by_key.setdefault(lock.key, []).append(lock)
                graph.extend(_key_waits(key, held, (), policy) for key, held in by_key.items())
            return graph


def _key_waits(key: str, held: Sequence[Lock], waiters: tuple[Waiter, ...],
               policy: QueuePolicy | None) -> KeyWaits:
    """One key of the wait-for graph; with ``policy`` under concurrency rules, its holders'
    ``parts`` when it is held."""
    owners = tuple(h.owner for h in held)
    return KeyWaits(
        key=key, holder=owners[0] if owners else None, holders=owners, waiters=waiters,
        shared=bool(held) and all(h.mode == "shared" for h in held),
        parts=parts_of(held[0]) if held and policy is not None and policy.limits else None)


_GRANTS_REMEMBERED = 10_000

_PAUSE_FROM = 1000
"""From how many rows a scan's decoding runs with Python's cyclic collector paused."""


@contextlib.contextmanager
def _collector_paused(rows: int) -> Iterator[None]:
    """Python's cyclic collector paused while ``rows`` rows are decoded, if that many.

    A decoded lock is about five objects the collector tracks, all alive until the scan's
    answer is dropped, and none of them garbage. CPython runs a full collection each time the
    objects that survived grow by a quarter, so a list of 100,000 locks set off several, each
    walking every object of the process (600,000 by the last, scattered over memory): a lock
    of that list cost about twice one of a list of 1,000 in CPU time (24 against 12 µs), for
    about the same instructions. Paused, the answer's objects are walked once by the young
    collection that runs when it resumes (at the first allocation after it, usually while the
    answer is written out) and later by the older ones, as any survivor is. Measured over the
    list and writing each lock out as the API does, 100,000 locks: 41-46 µs of CPU per lock
    running, 31-34 paused (three alternating runs each); the list call alone 24-26 against
    12-13, as at 1,000. It resumes only if it was running (a process that turned it off keeps
    it off), and whatever the decoding raised; nothing meanwhile makes cycles (an unreadable
    row's exception is dropped at the end of its ``except``)."""
    if rows < _PAUSE_FROM or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@dataclass
class Told:
    """Who of its pull was answered with the hold of one key whose token is ``token``, unchanged
    (``StoreBackend._take``): waiters' ids, ``""`` for a request that does not wait; and
    whether the hold's own grant was given back unheard. A store's count of one key
    (``StoreBackend._told_of``)."""

    token: int
    tellers: set[str] = field(default_factory=set)
    unheard: bool = False


def _untold(handoff: Handoff) -> None:
    """``StoreBackend.served_unasked`` until a locker takes it: nobody to tell."""


def clock_floor(moment: datetime) -> int:
    """A fencing floor read from the clock at ``moment``: milliseconds since the epoch, times
    1000. Tokens counted from it are above every token handed out by a store whose counters
    started from an earlier one (fewer than 1000 tokens a key a millisecond since), as a
    store that lost its counters, or keeps none past its process, needs."""
    return epoch_ms(moment) * 1000


def parts_of(lock: Lock | Candidate) -> policies.KeyParts:
    """What the rules see of a lock (held, or asked for)."""
    return policies.KeyParts(key=lock.key, repo=lock.project.repo_full_name,
                             path=lock.project.path, workspace=lock.workspace)


def _waits(wait: Wait | None) -> bool:
    return wait is not None and wait.timeout > timedelta(0)


@dataclass
class _Effects:
    """What one atomic step did besides its answer, and whom to tell once it commits."""

    notices: list[tuple[str, Notice]] = field(default_factory=list)
    granted: list[Grant] = field(default_factory=list)
    timed_out: list[Waiter] = field(default_factory=list)
    expired: list[Lock] = field(default_factory=list)

    def handoff(self, released: Lock | None) -> Handoff:
        return Handoff(released=released, granted=tuple(self.granted),
                       timed_out=tuple(self.timed_out))
