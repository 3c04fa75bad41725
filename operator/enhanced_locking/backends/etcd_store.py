"""The etcd backend: one lock space in an etcd v3 cluster, shared by every replica.

etcd is a consensus store: a write that returned is on a majority of its members and survives
the loss of any minority, leader included. That is what the Redis backend cannot promise
through a failover (Redis replicates asynchronously), and why this backend exists.

**One step, one transaction.** Every operation is the shared step of
:class:`~enhanced_locking.backends.base.StoreBackend` (the same Python the memory and SQLite
stores run: settle, hand out in :func:`~enhanced_locking.backends.waiting.service_order`,
grant, queue) run over a snapshot of the keys it reads, and committed as *one* etcd
transaction whose guards are the ``mod_revision`` of every key it read (and of every key range
it listed). If anything it read changed meanwhile, the transaction does nothing and the step
runs again on fresh reads: software transactional memory, as etcd's own ``concurrency.STM``.
Because the step is shared, so is every rule in it.

**One round trip.** An operation on one key (acquire, release, expire, cancel) reads nothing
before it runs: its first run is on what this replica last knew of the key (``_Known``: the
keys as its last commit left them; absent, and an empty queue, for a key never seen). The
commit's guards check that view like any read, and a commit whose guards fail reads the same
keys in its failure branch, so the step runs again on etcd's current view without another
round trip. An uncontended acquire + release pair is two transactions; a stale view or another
writer costs one more per conflict, as a read would have. A refusal decided on the guess (not
owned, held) is never answered from memory: the guards are sent first. A replica's steps on
one key run one after another (a hot key's enqueues would otherwise fail each other's guards,
about N*N/2 transactions for N waiters at once): each is one transaction, and only another
replica's write costs a retry.

**Layout** under ``{etcd-key-prefix}{namespace}/`` (lock keys are percent-encoded, so a key's
entries never share a prefix with another key's):

* ``lock/{key}``: the holder, Atlantis's JSON (:mod:`codec`); a leased lock is attached to an
  etcd lease that ends a second or two after it (or etcd's longest lease after its grant,
  about 285 years), so etcd itself deletes it if no replica is left to. The locks a
  replica grants with the same end second share one lease (one grant a second for a run of
  locks of the same TTL, not one per lock). Beside Atlantis's fields, a lock another request
  of its pull was answered with (held already) carries ``Told``: who of the pull was told
  (``Tellers``: waiters' ids, ``""`` for a request that does not wait) and whether the grant
  that made it was given back unheard (``Unheard``), written in the transaction that answered
  (``_keep_told``); a give-back of that grant leaves the lock to them. A replica of an
  earlier release ignores the field (and a write of the lock it makes drops it).
* ``fence/{key}``: the key's token floor (0 unless adopted from another store with higher
  tokens); its existence also lists the key for ``export``.
* ``unreadable/{key}``: a free key whose floor a step met written over (``EtcdBackend._floor``),
  empty; written by the replica whose step met it, deleted when the floor is repaired. A full
  list reads this range and each marked key's floor, not every floor: its cost is the locks
  held and the keys marked, never every key ever locked.
* ``queue/{key}/{waiter}``: one entry per waiter and key (a batch waiter has one per key), and
  ``waiter/{waiter}``: the waiter by id. Both are attached to the *session lease* of the
  replica that waits (renewed every ``RENEW_EVERY`` seconds while it runs), so the waiters
  of a replica that is gone vanish with it; until then (``SESSION_TTL``), a waiter whose
  replica has not renewed it for ``GONE_AFTER`` seconds is passed over, not granted
  (``EtcdBackend._gone``).
* ``notice/{waiter}``: what a waiter is told (its locks, or why it left; of a grant, also the
  keys its pull held already, ``kept``, which a notice an older replica wrote lacks: that one
  does not say), written in the same transaction as the grant, attached to the waiter's
  session lease. The waiting replica hears
  of it through a watch, and deletes it once its caller is done (one written after its caller
  left is kept for a retry of the same ID, and deleted when that retry is queued again);
  while it has waiters it also reads the notices every ``WATCH_CHECK`` seconds, for a watch
  whose member is frozen. A waiter is told only a notice newer than its own queueing. A
  grant another replica made is *taken* (its notice marked) before its caller is told; one
  its replica does not take, that replica gone, is taken back (``EtcdBackend._claims_of``).

**Fencing token = the etcd revision of the grant** (plus the key's floor): every grant is a
new revision of the whole cluster, so tokens rise per key and across keys, replicas, restarts
and leader changes. Several grants of one key in one step (shared waiters served together)
would share a revision: each one after the first raises the key's floor by one, so they get
consecutive tokens and every later grant stays above them. A lock's stored token is negative
until its grant commits (``-(floor+1)``, resolved against the ``mod_revision`` its grant
wrote); a later write (refresh, adopt) stores the resolved value.

**Time** is this process's clock (etcd has none to offer): ages, deadlines and lease ends are
stamped by the replica that writes them. Clocks of replicas are assumed close (NTP); a skew
shifts aging and FIFO across replicas by that much, never who holds a key.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import enum
import functools
import itertools
import json
import logging
import math
import operator
import random
import secrets
import time
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, NamedTuple, TypeVar
from urllib.parse import quote, unquote

import etcd3aio
import grpc
from etcd3aio._protobuf import (
    Compare,
    DeleteRangeRequest,
    LeaseGrantRequest,
    LeaseKeepAliveRequest,
    LeaseKeepAliveResponse,
    LeaseRevokeRequest,
    LeaseTimeToLiveRequest,
    RangeRequest,
)
from etcd3aio._protobuf import TxnRequest as _TxnRequest

from enhanced_locking.backends import codec
from enhanced_locking.backends.base import Owner, StoreBackend, Told, _Effects, clock_floor
from enhanced_locking.backends.etcd_connection import (
    CALL_TIMEOUT,
    DOWN,
    RIDE_OPS,
    WATCH_CHECK,
    EtcdConnection,
    EtcdSettings,
    Landing,
    LoginRefused,
    Passenger,
    Watch,
    kv_calls,
    leader_first,
    stale_token,
    unary,
    unavailable,
    unreachable,
    watching,
)
from enhanced_locking.backends.unreadable import UnreadableLocks
from enhanced_locking.backends.waiting import (
    Expiry,
    GoneGrantUnknown,
    Grant,
    GrantedUnheard,
    GrantNotifier,
    GrantUnknown,
    Handoff,
    HandoffUnknown,
    LocalNotifier,
    Notice,
    Outcome,
    PullPartlyReleased,
    PullRelease,
    Status,
    Waiter,
)
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.types import (
    BackendUnavailable,
    Candidate,
    InvalidRequest,
    Lock,
    LockNotHeld,
    LockNotOwned,
    Locks,
    LockUnreadable,
    Reason,
    UnreadableLock,
    UnusableSetting,
    replaced,
    utcnow,
)

__all__ = ["EtcdBackend"]

log = logging.getLogger(__name__)

T = TypeVar("T")

SESSION_TTL = 10
"""Seconds a replica's waiters stay in etcd after it is gone (its session lease's TTL)."""
RENEW_EVERY = 1.0
"""Seconds between the renewals of a replica's session lease."""
GONE_AFTER = 5
"""Seconds a replica's session lease may go unrenewed (as etcd tells its time left), while
etcd answered the replica that asks all along, before its waiters count as a dead replica's
and are passed over (``EtcdBackend._gone``)."""
_STEADY_GAP = 2 * RENEW_EVERY + 1
"""A pause between two renewals of this replica's session longer than this (etcd away, or
this process stalled) starts its count of steady seconds again (``_steady_for``)."""
DELETIONS_LINGER = 5.0
"""Seconds the watch of lock deletions outlives this replica's last waiter
(``_watch_deletions``): a replica whose waiters come and go keeps its watch."""

_KEEP_ALIVE = "/etcdserverpb.Lease/LeaseKeepAlive"
"""etcd's keep-alive method, called as a unary call (``EtcdBackend._renew``)."""
_ATTEMPTS = 200
_FREE_PER_READ = 60
"""Keys a read of the waiting keys covers (two operations each: etcd takes 128 in one
transaction by default)."""
_STILL_FREE = 5
"""A waited-on key found free again, whose step found nothing to grant the check before (a
batch waiting for another key, a freeze), has its step run again every this many checks, not
at each (``EtcdBackend._unserved``)."""
_EQUAL, _LESS, _MOD = Compare.EQUAL, Compare.LESS, Compare.MOD
_MAX_OPS = 128
"""Compares (and operations of each branch) etcd takes in one transaction: its default
``--max-txn-ops`` (``_entry_guards``)."""
_SKEW = timedelta(seconds=1)
"""How far apart replicas' clocks may be for a deleted lock to count as lapsed (etcd ends a
lock's lease a second or more after the lock)."""
_LONGEST_LEASE = 9_000_000_000
"""Seconds etcd's longest lease lasts (its ``MaxLeaseTTL``; it refuses a longer one). A lock
whose end is further away (a ``ttl`` may be as long as a Go duration, 2562047h, about 2.5 %
longer) gets a lease of this length: etcd's backstop deletes it about 285 years after its
grant, not 292, and the service's own timer still frees it at its end."""
_PENDING_SEQ = 1 << 62
_PAGE = 2000
"""Keys of a range one read answers (etcd's ``more`` says there are others): the rest are
read in pages of as many, at the first page's revision (one snapshot). A range of locks of
600 bytes is then answered 1.4 MB at a time, not all at once (10,000 locks: 7 MB)."""
_UNREADABLE_KEPT = 4096
"""Unreadable notices remembered (so each is logged once) before the memory is cleared."""
_FLOOR_UNREADABLE = "its token floor is not a whole number"
"""Why a free key whose ``fence/{key}`` was written over is set aside (``EtcdBackend._floor``)."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_CURRENT: contextvars.ContextVar[_Txn | None] = contextvars.ContextVar("etcd_txn", default=None)
_PULL_PART = 16
"""Locks of one pull a release by pull frees in one step (``EtcdBackend.release_by_pull``):
each costs its commit a few compares and writes (its delete, its token floor, its queue, a
hand-off), and etcd takes 128 of each in one transaction (``_MAX_OPS``)."""


class _Part:
    """A release by pull under way, a part at a time (``EtcdBackend._scan``): the keys the
    parts before freed (a key one of them handed to a waiter of the same pull is not freed
    again, as in one step), the keys the last run of this part's step took, and whether it
    left locks of the pull for the next part. Only the scan of the pull's locks is cut to a
    part: the step's other scans (the locks a concurrency limit counts) read every lock."""

    def __init__(self, repo: str, pull: int) -> None:
        self.owner = (repo, pull)
        self.done: set[str] = set()
        self.taken: list[str] = []
        self.left = False
        self.scanned: dict[tuple[bytes, bytes, int], Lock | UnreadableLock] = {}
        """The locks the parts' scans decoded (as ``_Reads.scanned``): each part reads every
        lock again, and decodes only those written since."""


_PART: contextvars.ContextVar[_Part | None] = contextvars.ContextVar("etcd_part", default=None)


class _Pending(int):
    """The seq of a waiter queued in a step that has not committed: ``+= 1`` keeps it."""

    def __add__(self, other: object) -> _Pending:
        return self


def _ms(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _at(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


@functools.lru_cache(maxsize=8192)
def _prefix_end(prefix: bytes) -> bytes:
    return etcd3aio.prefix_range_end(prefix)


class _KV(NamedTuple):
    """A key as etcd had it (``value`` ``None``: absent). A named tuple: made several times a
    step, at about a third of a frozen dataclass's cost."""

    value: bytes | None
    mod: int = 0
    create: int = 0
    lease: int = 0


@dataclass
class _Reads:
    """What a step read, at which revisions (its guards at commit)."""

    keys: dict[bytes, _KV] = field(default_factory=dict)
    ranges: dict[bytes, tuple[int, dict[bytes, _KV]]] = field(default_factory=dict)
    scanned: dict[tuple[bytes, bytes, int], Lock | UnreadableLock] = field(
        default_factory=dict)
    """The locks a scan of these reads decoded, by etcd key, value and revision: a step that
    runs again on them (after each key it had not read: a release by pull of one part reads
    the token floor and queue of each of its keys) decodes each lock once, not once a run
    (10,000 locks, a part of 16 keys: about 14 runs, 140,000 decodes)."""


class _Miss(Exception):
    """The step needs something it has not got; fetch it and run the step again."""

    def __init__(self, *, keys: tuple[bytes, ...] = (), prefixes: tuple[bytes, ...] = (),
                 lease: int = 0, alive: int = 0) -> None:
        super().__init__("miss")
        self.keys = keys
        self.prefixes = prefixes
        self.lease = lease
        self.alive = alive
        """A waiter's session lease whose renewals etcd must be asked of (``_gone``)."""


class _Refused(BackendUnavailable):
    """etcd refused a step's transaction for good (``PERMISSION_DENIED``: a user without
    write rights on the prefix; ``INVALID_ARGUMENT``: a request it never takes): nothing was
    applied, and sending it again changes nothing, so the step is not run again."""


class _GoneUnanswered(Exception):
    """A step whose caller went away while its commit was on its way, and whose commit's
    answer was then lost (``EtcdBackend._commit_answered``): etcd may have applied it."""


def _refused_for_good(error: BaseException) -> bool:
    """Whether ``error`` is etcd refusing a transaction as it would refuse it again (not a
    token to renew: :func:`~enhanced_locking.backends.etcd_connection.stale_token`)."""
    return (isinstance(error, grpc.aio.AioRpcError)
            and error.code() in (grpc.StatusCode.PERMISSION_DENIED,
                                 grpc.StatusCode.INVALID_ARGUMENT)
            and not stale_token(error))


class _Txn:
    """One run of a step: reads from the snapshot, writes buffered until the commit."""

    def __init__(self, reads: _Reads, leases: dict[int, int],
                 checked: dict[int, bool] | None = None, at: datetime | None = None) -> None:
        self.reads = reads
        self.at = at
        """The time of this run: every read of the backend's clock in it answers this one,
        taken at its first (``EtcdBackend._run_clock``), or given: a run again after a miss
        is at the time of the run that missed."""
        self.checked: dict[int, bool] = {} if checked is None else checked
        """Waiters' session leases etcd was asked of in this step: whether each is a dead
        replica's (``EtcdBackend._gone``); kept across the step's runs."""
        self.gone: list[str] = []
        """Waiters this run passed over, their replica gone."""
        self.writes: dict[bytes, tuple[bytes, int] | None] = {}
        self.leases = leases
        self.used: set[int] = set()
        self.effects: list[_Effects] = []
        self.notes: list[Callable[[UnreadableLocks], object]] = []
        """Changes to the unreadable keys this run found, applied once it counts."""
        self.queues: dict[str, tuple[dict[str, Waiter], list[Waiter]]] = {}
        self.records: dict[str, tuple[Waiter, int]] = {}
        """Waiters seen in this step, with the session lease of the replica that waits."""
        self.stamped: set[str] = set()
        """Keys granted in this step (a second grant of one of them raises its floor)."""
        self.again: dict[bytes, tuple[bytes, int] | None] = {}
        """What an earlier run of the step wrote whose commit's answer was lost and that
        these reads show applied (``_landed``): this run answers again what that one did,
        so a hold it finds as that run wrote it is not told anew (``_keep_told``)."""

    def get(self, key: bytes) -> _KV:
        if key in self.writes:
            written = self.writes[key]
            return _KV(written[0] if written else None)
        kv = self.reads.keys.get(key)
        if kv is not None:
            return kv
        for prefix, (_, kvs) in self.reads.ranges.items():
            if key.startswith(prefix):
                return kvs.get(key, _KV(None))
        raise _Miss(keys=(key,))

    def scan(self, prefix: bytes) -> dict[bytes, _KV]:
        ranges = self.reads.ranges
        taken = ranges.get(prefix)  # the range itself was read: the usual case
        fetched: dict[bytes, _KV] | None
        if taken is not None:
            fetched = taken[1]
            if not fetched and not self.writes:
                return {}
        else:
            fetched = next((kvs for p, (_, kvs) in ranges.items() if prefix.startswith(p)),
                           None)
            if fetched is None:
                raise _Miss(prefixes=(prefix,))
        found = {k: kv for k, kv in fetched.items() if k.startswith(prefix)}
        for key, written in self.writes.items():
            if key.startswith(prefix):
                if written is None:
                    found.pop(key, None)
                else:
                    found[key] = _KV(written[0])
        return dict(sorted(found.items()))

    def has_range(self, prefix: bytes) -> bool:
        """Whether the keys under ``prefix`` were read (:meth:`scan` of it raises no miss)."""
        return any(prefix.startswith(p) for p in self.reads.ranges)

    def put(self, key: bytes, value: bytes, lease: int = 0) -> None:
        self.writes[key] = (value, lease)

    def delete(self, key: bytes) -> None:
        self.writes[key] = None

    def lease(self, end: int) -> int:
        """The lease that ends at ``end`` (seconds since the epoch), shared by every lock
        written with that end (see ``EtcdBackend._leases``)."""
        lease = self.leases.get(end)
        if lease is None:
            raise _Miss(lease=end)
        self.used.add(lease)
        return lease


class _Line:
    """The steps of this replica on one key (``EtcdBackend._atomic``): there while one runs,
    with those waiting their turn, in the order they came. A step finding no line runs at
    once (most steps: no ``asyncio.Lock`` made, taken and given back for them)."""

    __slots__ = ("waiting",)

    def __init__(self) -> None:
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()


class _Unbroken(Generic[T]):
    """``coroutine`` awaited to its end in its caller's task, though that task is cancelled
    meanwhile: the cancel is kept (``gone``) and what the coroutine waits on is not cancelled.

    Each future the coroutine waits on reaches the task in a :class:`_Held`, whose ``cancel``
    only sets ``gone`` and refuses: the task then throws ``CancelledError`` in once that future
    is done, and it is taken here, the coroutine resumed to read the future's outcome (a
    future cancelled by its own maker is still thrown in). The awaiter says what a cancel
    kept means (``EtcdBackend._commit_answered``). What ``asyncio.shield`` of a task of its
    own does, without the task: three turns of the event loop a commit (the task's start, its
    end, the shield's answer) and the task's making."""

    __slots__ = ("_coroutine", "gone")

    def __init__(self, coroutine: Coroutine[Any, Any, T]) -> None:
        self._coroutine = coroutine
        self.gone = False
        """Whether the awaiting task was cancelled while the coroutine ran."""

    def __await__(self) -> Generator[Any, None, T]:
        coroutine = self._coroutine
        thrown: BaseException | None = None
        while True:
            try:
                waited = coroutine.send(None) if thrown is None else coroutine.throw(thrown)
            except StopIteration as end:
                value: T = end.value
                return value
            thrown = None
            held = None if waited is None else _Held(waited, self)
            while True:
                try:
                    yield held
                except asyncio.CancelledError as error:
                    if waited is not None and waited.cancelled():
                        thrown = error  # its own future, cancelled: as the coroutine sees it
                    else:
                        self.gone = True  # the task's, once the future is done
                        if waited is not None and not waited.done():
                            continue
                except GeneratorExit:
                    coroutine.close()
                    raise
                except BaseException as error:  # the future's outcome, thrown in by the task
                    thrown = error
                break


class _Held:
    """A future an :class:`_Unbroken` coroutine waits on, as its task sees it: the future's
    own, but for ``cancel``, which keeps the cancel and refuses it (the task throws it in once
    the future is done)."""

    __slots__ = ("_asyncio_future_blocking", "_future", "_unbroken")

    def __init__(self, future: asyncio.Future[Any], unbroken: _Unbroken[Any]) -> None:
        self._future = future
        self._unbroken = unbroken
        self._asyncio_future_blocking = True

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._future.get_loop()

    def add_done_callback(self, fn: Callable[[Any], object], *,
                          context: contextvars.Context | None = None) -> None:
        self._future.add_done_callback(fn, context=context)

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
        return self._future.remove_done_callback(fn)

    def done(self) -> bool:
        return self._future.done()

    def cancelled(self) -> bool:
        return self._future.cancelled()

    def result(self) -> Any:
        return self._future.result()

    def exception(self) -> BaseException | None:
        return self._future.exception()

    def cancel(self, msg: Any = None) -> bool:
        self._unbroken.gone = True
        return False


class _Known:
    """What this replica last saw of the keys its one-key operations read, at which revision:
    the first guess of the next operation on them (see ``EtcdBackend._atomic``). Never trusted:
    every commit's guards check it, and a wrong guess costs no extra round trip. Bounded."""

    LIMIT = 4096

    def __init__(self) -> None:
        self.keys: collections.OrderedDict[bytes, _KV] = collections.OrderedDict()
        self.ranges: collections.OrderedDict[bytes, tuple[int, dict[bytes, _KV]]] = (
            collections.OrderedDict())

    def guess(self, keys: set[bytes], prefixes: set[bytes]) -> _Reads:
        """Keys never seen are guessed absent (guard: no such key), ranges empty (guard:
        nothing in them)."""
        reads = _Reads()
        for k in keys:
            reads.keys[k] = self.keys.get(k) or _KV(None)
        for p in prefixes:
            reads.ranges[p] = self.ranges.get(p) or (0, {})
        return reads

    def learn(self, reads: _Reads, writes: dict[bytes, tuple[bytes, int] | None] | None = None,
              revision: int = 0) -> None:
        """``reads`` as etcd had them, and ``writes`` committed over them at ``revision``."""
        writes = writes or {}
        keys, newest = self.keys, self.keys.move_to_end
        for k, kv in reads.keys.items():
            if k in writes:
                kv = _written(kv, writes[k], revision)
            keys[k] = kv
            newest(k)
        ranges, newest = self.ranges, self.ranges.move_to_end
        for p, (seen, kvs) in reads.ranges.items():
            if writes:
                # The guards held at ``revision``: the range is what was read, plus the writes.
                kvs, seen = dict(kvs), revision
                for k, written in writes.items():
                    if k.startswith(p):
                        if written is None:
                            kvs.pop(k, None)
                        else:
                            kvs[k] = _written(kvs.get(k, _KV(None)), written, revision)
            ranges[p] = (seen, kvs)
            newest(p)
        for store in (keys, ranges):
            while len(store) > self.LIMIT:
                store.popitem(last=False)

    def forget(self, keys: set[bytes], prefixes: set[bytes]) -> None:
        for k in keys:
            self.keys.pop(k, None)
        for p in prefixes:
            self.ranges.pop(p, None)


class _Names(NamedTuple):
    """The etcd keys of one lock key (see "Layout" above)."""

    lock: bytes
    fence: bytes
    queue: bytes
    shared: bytes


def _written(before: _KV, written: tuple[bytes, int] | None, revision: int) -> _KV:
    if written is None:
        return _KV(None)
    create = before.create if before.value is not None else revision
    return _KV(written[0], revision, create, written[1])


def _lease_end(expires_at: datetime) -> int:
    """The second (since the epoch) at which etcd deletes a lock ending at ``expires_at``:
    at least one second after its end, so the service's own timer always acts first."""
    return math.ceil((expires_at - _EPOCH).total_seconds()) + 1


def _txn() -> _Txn:
    txn = _CURRENT.get()
    if txn is None:
        raise RuntimeError("an etcd store primitive ran outside a step")
    return txn


class _Queues:
    """``StoreBackend._queues`` over etcd: each key's waiters, read from ``queue/{key}/``."""

    def __init__(self, backend: EtcdBackend) -> None:
        self._b = backend

    def _list(self, key: str) -> list[Waiter]:
        txn = _txn()
        held = txn.queues.get(key)
        if held is None:
            waiters = []
            for name, kv in txn.scan(self._b.queue_prefix(key)).items():
                if kv.value is not None:
                    waiter = self._b.readable_waiter(name, kv, txn)
                    if waiter is not None:  # one that does not read is passed over
                        waiters.append(waiter)
            txn.queues[key] = held = ({w.id: w for w in waiters}, waiters)
        return held[1]

    def get(self, key: str, default: Any = None) -> Any:
        waiters = self._list(key)
        return waiters if waiters else default

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self._list(key))

    def setdefault(self, key: str, default: list[Waiter]) -> list[Waiter]:
        return self._list(key)

    def __delitem__(self, key: str) -> None:
        self._list(key).clear()

    def items(self) -> list[tuple[str, list[Waiter]]]:
        txn = _txn()
        keys = {self._b.key_of_queue_entry(k) for k in txn.scan(self._b.base + b"queue/")}
        return [(key, waiters) for key in sorted(keys) if (waiters := self._list(key))]

    def clear(self) -> None:
        """Nothing to clear here: a replica's waiters go with its session lease."""


class _Waiters:
    """``StoreBackend._waiters`` over etcd: waiters by id, in ``waiter/{id}``."""

    def __init__(self, backend: EtcdBackend) -> None:
        self._b = backend

    def get(self, waiter_id: str, default: Any = None) -> Any:
        txn = _txn()
        name = self._b.waiter_key(waiter_id)
        kv = txn.get(name)
        found = None if kv.value is None else self._b.readable_waiter(name, kv, txn)
        return default if found is None else found

    def __setitem__(self, waiter_id: str, waiter: Waiter) -> None:
        txn = _txn()
        lease = self._b.session_lease
        if not lease:
            # Its session lease lapsed meanwhile: a waiter without one would outlive this
            # replica, and no notice is written for it (nobody seems to wait for it).
            raise BackendUnavailable(
                f"etcd {self._b.connection.where}: this replica's session lease lapsed while "
                "the waiter was being queued; ask again", key=waiter.keys[0])
        txn.records[waiter.id] = (waiter, lease)
        txn.put(self._b.waiter_key(waiter_id), self._b.record(waiter, lease), lease)

    def pop(self, waiter_id: str, default: Any = None) -> Any:
        txn = _txn()
        txn.delete(self._b.waiter_key(waiter_id))
        return default

    def __contains__(self, waiter_id: object) -> bool:
        return isinstance(waiter_id, str) and self.get(waiter_id) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def clear(self) -> None:
        """Nothing to clear here: a replica's waiters go with its session lease."""


class _Granted:
    """``StoreBackend._granted`` over etcd: a grant is remembered in its ``notice/{id}``."""

    def __init__(self, backend: EtcdBackend) -> None:
        self._b = backend

    def __setitem__(self, waiter_id: str, grant: Grant) -> None:
        """Written with the notice (see ``EtcdBackend._write_effects``)."""

    def __len__(self) -> int:
        return 0

    def get(self, waiter_id: str, default: Any = None) -> Any:
        txn = _txn()
        kv = txn.get(self._b.notice_key(waiter_id))
        if kv.value is None:
            return default
        waiter, notice = self._b.notice_from(kv)
        if waiter is None or not notice.locks:
            return default
        return Grant(waiter=waiter, locks=notice.locks, fresh=notice.fresh, kept=notice.kept,
                     upgraded=notice.upgraded)

    def __contains__(self, waiter_id: object) -> bool:
        return isinstance(waiter_id, str) and self.get(waiter_id) is not None


class _Notifier:
    """This replica's waiting callers, and the revision that queued each; a caller done
    waiting has its notice deleted."""

    def __init__(self, backend: EtcdBackend) -> None:
        self._b = backend
        self.local = LocalNotifier()
        self.queued_at: dict[str, int] = {}
        """Per waiter waiting here, the revision that queued it: only a notice written after
        it is for this waiter (``EtcdBackend._heard``)."""
        self.early: dict[str, _KV] = {}
        """A notice brought before its waiter's queueing answered (kept until then)."""
        self.keys: dict[str, tuple[str, ...]] = {}
        """Per waiter waiting here, the keys it is queued on (``EtcdBackend._unserved``)."""
        self.waiters: dict[str, Waiter] = {}
        """Per waiter waiting here, the waiter as its queueing answered it
        (``EtcdBackend._told_lapsed``)."""
        self.heard: set[str] = set()
        """Waiters whose notice a caller here heard and that another caller still expects."""

    def expect(self, waiter_id: str) -> asyncio.Future[Notice]:
        return self.local.expect(waiter_id)

    def forget(self, waiter_id: str, future: asyncio.Future[Notice], *,
               gone: bool = False) -> None:
        """The caller of ``future`` stops waiting. Once no caller here expects the waiter,
        its notice is deleted if one of them heard it; an unheard one (its caller left before
        it came, or in the very turn it came: ``gone``) is the store's record of what was
        granted, kept for the later withdrawal (or a retry, on any replica) until the session
        lease ends."""
        self.local.forget(waiter_id, future, gone=gone)
        if not gone and future.done() and not future.cancelled():
            self.heard.add(waiter_id)
        if self.local.expected(waiter_id):
            return  # another caller here still waits on it (a retry that took it over)
        self.queued_at.pop(waiter_id, None)
        self.early.pop(waiter_id, None)
        self.keys.pop(waiter_id, None)
        self.waiters.pop(waiter_id, None)
        if waiter_id in self.heard:
            self.heard.discard(waiter_id)
            self._b.tidy(waiter_id)

    def deliver(self, waiter_id: str, notice: Notice) -> None:
        if (notice.locks and self.local.waits(waiter_id)
                and self._b.ran_out(notice.locks, waiter=waiter_id) is not None):
            # Told after its lock's time was up (a notice held up by an election): the lock's
            # lease may be gone and the key given on, so the caller holds nothing.
            notice = Notice(reason=Reason.UNAVAILABLE)
        self.local.deliver(waiter_id, notice)


class EtcdBackend(StoreBackend):
    """Locks and queues of one namespace in etcd; any number of replicas may share them."""

    kind = "etcd"
    BATCH_MOST = (_MAX_OPS - 1) // 5
    """Locks one batch may ask for (``acquire_batch``): its step is one transaction, guarded
    by four keys of each (the lock, its token floor, its queue, its shared holders), the
    waiter's record and, for a waiter asked again by another caller, its entry in each
    queue, and etcd takes ``_MAX_OPS`` compares in one. Past 31 locks etcd refused every such
    transaction, which came back as ``BackendUnavailable`` (an outage to the locker's
    retries and the router's fallback)."""

    def __init__(
        self,
        connection: EtcdConnection,
        *,
        prefix: str,
        namespace: str = "enhanced",
        clock: Callable[[], datetime] = utcnow,
        lease_backstop: bool = True,
    ) -> None:
        """``lease_backstop``: attach leased locks to etcd leases (off only where ``clock`` is
        not real time, as in the model tests: etcd's lease timers run on real time)."""
        super().__init__(namespace, clock=clock)
        self._clock = clock
        self.clock = self._run_clock
        self.lease_backstop = lease_backstop
        self.connection = connection
        self._pinged = False
        """Whether a ping was answered: from then a refused user is an outage (:meth:`ping`)."""
        self.base = f"{prefix}{namespace}/".encode()
        self._marks = self.base + b"unreadable/"
        """The range of the marks of floors written over (``floor_mark``)."""
        self._queues = _Queues(self)  # type: ignore[assignment]
        self._waiters = _Waiters(self)  # type: ignore[assignment]
        self._granted = _Granted(self)  # type: ignore[assignment]
        self._notifier = _Notifier(self)
        self.grants: GrantNotifier = self._notifier  # type: ignore[assignment]
        self._seq = _Pending(_PENDING_SEQ)  # a new waiter's seq is the revision that queues it
        self.session_lease = 0
        self._session: asyncio.Task[None] | None = None
        self._session_ready: asyncio.Lock = asyncio.Lock()
        self._watch: asyncio.Task[None] | None = None
        self._deletions: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._telling: set[str] = set()
        self._unreadable: set[tuple[str, int]] = set()
        """Notices (waiter, revision) that could not be read: skipped, logged once."""
        self._unreadable_records: set[tuple[bytes, int]] = set()
        """Waiter records (etcd key, revision) that could not be read: passed over, logged
        once (``readable_waiter``)."""
        self._bad_floors: set[str] = set()
        """Keys whose token floor is not a whole number: set aside, logged once (``_floor``)."""
        self._notices_watched = 0
        """The newest notice the current watch of notices has brought (``_follow``)."""
        self._history = (0, 0)
        """etcd's cluster id, and the newest revision this replica knows it reached: read
        (the session's start, the notices', the waiting keys') or queueing one of its waiters
        (:meth:`_history_moved`)."""
        self._histories = 0
        """How many times etcd's history was found changed (:meth:`_history_moved`)."""
        self._rechecking = False
        """:meth:`_recheck` runs."""
        self._followed: etcd3aio.Etcd3Client | None = None
        """The client whose channel's states are followed (:meth:`_follow_channel`)."""
        self.in_flight = 0
        """Calls waiting for etcd right now (tests use it to know when all is quiet)."""
        self.conflicts = 0
        """Steps run again because another writer changed what they read (for the bench)."""
        self.round_trips = 0
        """etcd calls made by steps (reads, commits, lease grants, lease checks of other
        replicas' sessions) and by grants to other replicas' waiters (their takes, and the
        lease checks that follow them: ``_claims_of``), for the bench."""
        self.reads = 0
        """Of those, the read-only ones (a step that reads first: queue, holders, list...)."""
        self.pages = 0
        """Of the round trips, the reads of a range past its first page (``_PAGE`` keys)."""
        self.missed_guesses = 0
        """Steps run again because what this replica knew of their keys was out of date."""
        self.late_grants = 0
        """Grants refused because their answer came after the lock's end (``ran_out``)."""
        self._claims: dict[int, list[tuple[Grant, int, float]]] = {}
        """Grants this replica made to other replicas' waiters that their replica has not yet
        shown itself alive after, by its session lease: each with the revision of its notice
        and when its commit answered (``_claims_of``)."""
        self._taking: set[str] = set()
        """Waiters here whose grant is being taken (``_take_grant``)."""
        self._renewed: dict[int, float] = {}
        """Other replicas' session leases: by when (``time.monotonic``) each had last been
        renewed at the latest, as etcd told it (``_gone``)."""
        self._steady = 0.0
        """Since when (``time.monotonic``) etcd has renewed this replica's session without a
        pause longer than ``_STEADY_GAP`` (0: no session)."""
        self._renewal = 0.0
        """When etcd last renewed it."""
        self.served_unheard = 0
        """Keys the read of the waiting keys served whose lock the read before had found: a
        lock etcd deleted that the watch of deletions had not served (``_unserved``; for the
        tests)."""
        self._known = _Known()
        self._names: dict[str, _Names] = {}
        self._decoded: dict[tuple[str, bytes], Lock] = {}
        self._waiters_decoded: dict[tuple[bytes, int], tuple[Waiter, int]] = {}
        """Waiters (and their session lease) by stored value and revision (``waiter_from``)."""
        self._lines: dict[str, _Line] = {}
        """Steps of this replica on a key, one at a time (see ``_atomic``)."""
        """Locks as decoded from the values stored for them (see ``_read``)."""
        self._leases: dict[int, int] = {}
        """Leases of locks with a TTL, by the second they end (see ``_lease_for``)."""
        self._lease_ends: dict[int, int] = {}
        """The second each of the same leases ends, by lease (its locks' end, or
        :data:`_LONGEST_LEASE` after its grant when that comes first)."""
        self._passengers: list[Passenger] = []
        """Writes behind that ride in this store's commits (see ``carry``)."""
        self._closed = False
        """:meth:`close` ran: nothing more is started in the background (``_spawn``)."""

    @classmethod
    def from_config(cls, config: EnhancedLockingConfig, namespace: str) -> EtcdBackend:
        return cls(EtcdConnection(EtcdSettings.from_config(config)),
                   prefix=config.etcd_key_prefix, namespace=namespace)

    def __repr__(self) -> str:
        return f"EtcdBackend({self.connection.where}, namespace={self.namespace!r})"

    def carry(self, passenger: Passenger) -> None:
        """Let ``passenger``'s writes (the events' outbox, on the same cluster) ride in this
        store's commits: one consensus write for the lock step and the events before it."""
        if passenger not in self._passengers:
            self._passengers.append(passenger)

    # --- key names ---------------------------------------------------------------------------
    def _named(self, key: str) -> _Names:
        """The etcd keys of ``key`` (a step names each of them several times: kept)."""
        names = self._names.get(key)
        if names is None:
            if len(self._names) >= _Known.LIMIT:
                self._names.clear()
            quoted, base = quote(key, safe="").encode(), self.base
            names = self._names[key] = _Names(
                base + b"lock/" + quoted, base + b"fence/" + quoted,
                base + b"queue/" + quoted + b"/", base + b"shared/" + quoted + b"/")
        return names

    def lock_key(self, key: str) -> bytes:
        return self._named(key).lock

    def fence_key(self, key: str) -> bytes:
        return self._named(key).fence

    def queue_prefix(self, key: str) -> bytes:
        return self._named(key).queue

    def floor_mark(self, key: str) -> bytes:
        """``unreadable/{key}``: the mark of a free key whose floor a step met written over."""
        return self._marks + quote(key, safe="").encode()

    def key_of_queue_entry(self, entry: bytes) -> str:
        return unquote(entry[len(self.base) + len(b"queue/"):].split(b"/")[0].decode())

    def waiter_key(self, waiter_id: str) -> bytes:
        return self.base + b"waiter/" + waiter_id.encode()

    def notice_key(self, waiter_id: str) -> bytes:
        return self.base + b"notice/" + waiter_id.encode()

    # --- records -----------------------------------------------------------------------------
    @staticmethod
    def record(waiter: Waiter, lease: int) -> bytes:
        return json.dumps({
            # Each candidate as a stored lock (the codec's one form), its stamps placeholders.
            "id": waiter.id, "locks": [codec.encode(candidate.granted(
                acquired_at=waiter.enqueued_at, expires_at=None, fencing_token=0))
                for candidate in waiter.candidates],
            "ttl": waiter.ttl // timedelta(milliseconds=1) if waiter.ttl else 0,
            "enq": _ms(waiter.enqueued_at), "deadline": _ms(waiter.deadline),
            "rid": waiter.request_id, "lease": lease, "caller": waiter.caller,
        }).encode()

    def waiter_from(self, kv: _KV, txn: _Txn | None = None) -> Waiter:
        """The waiter a queue entry or ``waiter/`` record holds, decoded once per value and
        revision (every step on a key with waiters reads its whole queue: a hot key's queue
        was decoded again by every step)."""
        assert kv.value is not None
        found = self._waiters_decoded.get((kv.value, kv.create))
        if found is None:
            data = json.loads(kv.value)
            candidates = tuple(Candidate.of_lock(codec.decode(text)) for text in data["locks"])
            waiter = Waiter(
                id=data["id"], candidates=candidates,
                ttl=timedelta(milliseconds=data["ttl"]) if data["ttl"] else None,
                enqueued_at=_at(data["enq"]), deadline=_at(data["deadline"]),
                # The revision that queued it: a global enqueue order (or still to come).
                seq=kv.create or _PENDING_SEQ, request_id=data.get("rid"),
                caller=data.get("caller", ""),
            )
            found = (waiter, int(data.get("lease", 0)))
            if kv.create:
                if len(self._waiters_decoded) >= _Known.LIMIT:
                    self._waiters_decoded.clear()
                self._waiters_decoded[(kv.value, kv.create)] = found
        if txn is not None:
            txn.records.setdefault(found[0].id, found)
        return found[0]

    def readable_waiter(self, name: bytes, kv: _KV, txn: _Txn) -> Waiter | None:
        """:meth:`waiter_from`, or ``None`` for a record at ``name`` that does not read as a
        waiter (written over by hand, by a bug, by a replica of another version): passed over
        like a missing one, as the Redis scripts pass over theirs, and logged once. It failed
        every step that read it, and with a concurrency limit (whose steps serve every queue)
        or a read of the wait-for graph, every such step of every key."""
        try:
            return self.waiter_from(kv, txn)
        except Exception as error:
            if (name, kv.mod) not in self._unreadable_records:
                if len(self._unreadable_records) >= _UNREADABLE_KEPT:
                    self._unreadable_records.clear()
                self._unreadable_records.add((name, kv.mod))
                log.warning("etcd %s: the waiter record %s cannot be read (%s); passed over",
                            self.connection.where, name.decode(errors="replace"),
                            type(error).__name__)
            return None

    def notice_from(self, kv: _KV) -> tuple[Waiter | None, Notice]:
        assert kv.value is not None
        data = json.loads(kv.value)
        locks = tuple(_resolve_lock(codec.decode(text), kv.mod) for text in data["locks"])
        waiter = None
        if data.get("waiter"):
            waiter = self.waiter_from(_KV(data["waiter"].encode()))
        reason = Reason(data["reason"]) if data.get("reason") else None
        # ``kept``: the keys its pull held already when granted; a notice an older replica
        # wrote has none, and does not say (``None``). ``upgraded``: those of them whose
        # shared hold the grant upgraded (none said: none).
        kept = data.get("kept")
        return waiter, Notice(locks=locks, reason=reason, fresh=data.get("fresh", True),
                              kept=None if kept is None else frozenset(kept),
                              upgraded=frozenset(data.get("upgraded", ())),
                              caller=waiter.caller if waiter is not None else "")

    # --- primitives of StoreBackend ----------------------------------------------------------
    def _read(self, key: str, text: str | bytes) -> Lock:
        """A stored lock, decoded once per value (a step reads its key's lock more than once,
        and the next step on the key reads it again)."""
        if isinstance(text, bytes):
            found = self._decoded.get((key, text))
            if found is not None:
                return found
        lock = super()._read(key, text)
        if isinstance(text, bytes):
            self._remember(key, text, lock)
        return lock

    def _remember(self, key: str, value: bytes, lock: Lock) -> None:
        """``value`` decodes to ``lock``: kept for ``_read`` (as the embedded store keeps the
        lock it writes, the codec reads back what it wrote)."""
        if len(self._decoded) >= _Known.LIMIT:
            self._decoded.clear()
        self._decoded[(key, value)] = lock

    def _load(self, key: str) -> Lock | None:
        kv = _txn().get(self.lock_key(key))
        if kv.value is None:
            return None
        return _resolve_lock(self._read(key, kv.value), kv.mod)

    def _store(self, lock: Lock) -> None:
        txn = _txn()
        lease = 0
        if lock.expires_at is not None and self.lease_backstop:
            # etcd's lease is the backstop: it deletes the lock a second after its end even if
            # no replica is left to expire it (and the watchers then serve its queue).
            lease = txn.lease(_lease_end(lock.expires_at))
        name = self.lock_key(lock.key)
        value = self._still_told(name, lock, codec.encode(lock).encode())
        # The release that follows reads this value back: the lock it encodes, not decoded.
        self._remember(lock.key, value, lock)
        txn.put(name, value, lease)

    def _delete(self, key: str) -> None:
        _txn().delete(self.lock_key(key))

    def shared_prefix(self, key: str) -> bytes:
        return self._named(key).shared

    def _load_shared(self, key: str) -> Locks:
        locks = [_resolve_lock(self._read(key, kv.value), kv.mod)
                 for kv in _txn().scan(self.shared_prefix(key)).values() if kv.value is not None]
        return sorted(locks, key=lambda lock: lock.fencing_token)

    def _store_shared(self, lock: Lock) -> None:
        txn = _txn()
        lease = 0
        if lock.expires_at is not None and self.lease_backstop:
            lease = txn.lease(_lease_end(lock.expires_at))
        owner = quote(f"{lock.project.repo_full_name}#{lock.pull.num}", safe="").encode()
        name = self.shared_prefix(lock.key) + owner
        txn.put(name, self._still_told(name, lock, codec.encode(lock).encode()), lease)

    def _delete_shared(self, key: str, owner: Owner) -> None:
        _txn().delete(self.shared_prefix(key) + quote(f"{owner[0]}#{owner[1]}", safe="").encode())

    def _forget_grant(self, waiter_id: str) -> None:
        _txn().delete(self.notice_key(waiter_id))

    # --- answers given with a hold: in its own record (see "Layout") -------------------------
    def _told_of(self, key: str, token: int) -> Told | None:
        """What the record of ``key``'s hold with fencing token ``token`` counts of the answers
        given with it, as this step sees it: every replica's answers, each written in the
        transaction that gave it."""
        found = self._hold_record(key, token)
        return None if found is None else _told_in(found[2], token)

    def _keep_told(self, key: str, told: Told) -> None:
        """Write ``told`` into the record of the hold it counts, with this step (the lock as
        it is, its token resolved, under the same lease); nothing when it says so already or
        the hold is gone."""
        found = self._hold_record(key, told.token)
        if found is None:
            return
        name, lock, value, lease = found
        txn = _txn()
        if _told_in(value, told.token) == told or (
                (again := txn.again.get(name)) is not None and again[0] == value):
            return  # (the hold the step's own run made, its answer lost: told by that run)
        value = _with_told(codec.encode(lock).encode(), told)
        self._remember(key, value, lock)
        if lease:
            txn.used.add(lease)
        txn.put(name, value, lease)

    def _hold_record(self, key: str, token: int) -> tuple[bytes, Lock, bytes, int] | None:
        """The etcd key, lock (its token resolved), stored value and lease of ``key``'s hold
        with fencing token ``token``: the exclusive lock, else one of the shared ones (read
        only then); ``None`` when neither is (or what is stored does not read as a lock)."""
        txn = _txn()
        names = self._named(key)

        def records() -> Iterator[tuple[bytes, _KV]]:
            yield names.lock, txn.get(names.lock)
            yield from txn.scan(names.shared).items()

        for name, kv in records():
            if kv.value is None:
                continue
            try:
                held = _resolve_lock(self._read(key, kv.value), kv.mod)
            except LockUnreadable:
                return None
            if held.fencing_token == token:
                # (written by this step: its lease is the write's; ``get`` answers the value)
                written = txn.writes.get(name)
                return name, held, kv.value, written[1] if written is not None else kv.lease
        return None

    def _still_told(self, name: bytes, lock: Lock, value: bytes) -> bytes:
        """``value``, ``lock`` as :mod:`codec` writes it, with the answers the record at
        ``name`` counts for the same hold (a refresh or an adopt rewrites the hold: what its
        pull was told of it stays); as it is for another hold (a new grant counts anew)."""
        kv = _txn().get(name)
        if kv.value is None or b'"Told":' not in kv.value:
            return value
        told = _told_in(kv.value, lock.fencing_token)
        if told is None:
            return value
        try:
            held = _resolve_lock(self._read(lock.key, kv.value), kv.mod)
        except LockUnreadable:
            return value
        return _with_told(value, told) if held.fencing_token == lock.fencing_token else value

    def _gone(self, waiter: Waiter) -> bool:
        """Whether ``waiter``'s replica is gone: its session lease (the waiter's record holds
        it) has not been renewed for more than ``GONE_AFTER`` seconds while etcd renewed this
        replica's own all along (``_steady_for``), and still has time left (``SESSION_TTL``),
        so its entries are still queued. A replica renews its session every ``RENEW_EVERY``
        seconds, so a live one never comes near that.

        Before, such a waiter stayed first in line until its session lapsed, up to 10 s
        after the replica died: a release meanwhile granted the key to a pull whose caller
        was gone, told nobody, and the lock stayed held until its TTL (for good without
        one), while the live waiters behind it waited on. Now it is passed over (told
        ``unavailable`` through its notice, should its replica be alive after all) and the
        key goes to the next waiter, or stays free.

        This replica's own waiters are never passed over; another replica's session is
        asked of etcd (a lease's time left) at most once a step, and not again while what
        etcd said keeps it within ``GONE_AFTER``."""
        txn = _txn()
        record = txn.records.get(waiter.id)
        lease = record[1] if record is not None else 0
        if not lease or lease == self.session_lease:
            return False
        renewed = self._renewed.get(lease)
        if renewed is not None and time.monotonic() - renewed <= GONE_AFTER:
            return False
        gone = txn.checked.get(lease)
        if gone is None:
            raise _Miss(alive=lease)
        if gone:
            txn.gone.append(waiter.id)
        return gone

    async def _renewals(self, lease: int, *, key: str | None) -> bool:
        """Ask etcd how long another replica's session ``lease`` has gone unrenewed
        (``_unrenewed``): whether more than ``GONE_AFTER`` seconds (or etcd has it no more).
        The most it may have gone unrenewed is taken (so its renewal as that much earlier than
        it may have been). An answer that does not come counts the replica alive for this step
        (nobody is passed over on a guess)."""
        try:
            asked, since = await self._unrenewed(lease, key=key)
        except BackendUnavailable:
            return False
        if len(self._renewed) >= _Known.LIMIT:
            self._renewed.clear()
        if since is None:
            self._renewed.pop(lease, None)
            return True
        self._renewed[lease] = asked - since
        return min(since, self._steady_for(asked)) > GONE_AFTER

    async def _unrenewed(self, lease: int, *, key: str | None) -> tuple[float, int | None]:
        """When etcd was asked about another replica's session ``lease`` (``time.monotonic``),
        and for how many seconds at most it has gone unrenewed (None: etcd has it no more).
        etcd tells a lease's time left in whole seconds, cut down: the time since its renewal
        is at most the TTL it was granted less that. ``BackendUnavailable`` when etcd does not
        answer.

        Bounded by the call's gRPC deadline alone (:func:`unary`): an answer that came within
        it is taken however late the loop reads it (as a renewal's, ``_renew``). With the
        library's call (a timer on the loop), after the loop stalled past it the answer was
        lost and the replica counted alive for that step."""
        asked = time.monotonic()
        self.round_trips += 1
        check = unary(_lease_calls, "LeaseTimeToLive", LeaseTimeToLiveRequest(ID=lease))
        async with unavailable(self.connection, "lease check", key=key):
            answer = await leader_first(self.connection, check)
        if int(answer.TTL) < 0:
            return asked, None
        return asked, max(0, int(answer.grantedTTL) - int(answer.TTL))

    def _steady_for(self, at: float) -> float:
        """Seconds up to ``at`` that etcd has renewed this replica's session without a pause
        (0 if it is in one): a replica whose session went unrenewed longer than that is not
        judged by it. After etcd itself was away (stopped, or cut off from every replica)
        every session looks unrenewed for as long; the replicas renew within a second or two
        of its return, and were passed over meanwhile without this."""
        if not self._steady or at - self._renewal > _STEADY_GAP:
            return 0.0
        return at - self._steady

    def _claim(self, grant: Grant, lease: int, revision: int) -> None:
        """``grant`` was made to a waiter of the replica of session ``lease`` (its notice
        written at ``revision``): followed until that replica shows itself alive after it
        (``_claims_of``)."""
        entry = (grant, revision, time.monotonic())
        claims = self._claims.get(lease)
        if claims is not None:
            claims.append(entry)
            return
        self._claims[lease] = [entry]
        self._spawn(self._claims_of(lease))

    async def _claims_of(self, lease: int) -> None:
        """The grants made here to waiters of the replica of session ``lease``, until it
        renews its session after each (it is alive: it takes its grants, see
        ``_take_grant``), or etcd no longer has the lease (its notices went with it, and the
        replica, if it is alive, answers from the holders: ``_told_lapsed``).

        A replica that has not renewed its session for more than ``GONE_AFTER`` seconds,
        and not since a grant, is gone (``_gone``, which keeps such a waiter from being
        granted at all, needs those seconds to tell): the grant is taken back
        (``_take_back``). Before, it stayed held by a pull whose caller was gone, until the
        lock's TTL (for good without one), and nobody was told. One lease check a second
        per replica with such grants."""
        try:
            while claims := self._claims.get(lease):
                await asyncio.sleep(RENEW_EVERY)
                try:
                    asked, since = await self._unrenewed(lease, key=None)
                except BackendUnavailable:
                    continue
                if since is None:
                    return
                renewed = asked - since  # its renewal was no sooner than this
                claims[:] = [claim for claim in claims if claim[2] >= renewed]
                if min(since, self._steady_for(asked)) > GONE_AFTER and claims:
                    taken, claims[:] = list(claims), []
                    for grant, revision, _ in taken:
                        await self._take_back(grant, revision)
        finally:
            self._claims.pop(lease, None)

    async def _take_back(self, grant: Grant, revision: int) -> None:
        """Take back ``grant``, made to a waiter whose replica is gone, if its notice is still
        the one written with it (its replica has not taken it: ``_take_grant``): in one step,
        the notice deleted and the locks it made released and handed to the key's next
        waiter, each told as a lock whose lease ran out (``served_unasked``: its ``expired``
        event naming whom the key went to, counted). It is given back as the locker gives
        back a grant whose caller went away (a cancel, then a release by owner and token
        ``unless_told``): a lock its pull held already, or that another request of the pull
        was answered with since (``_kept_now``), stays. Before, every lock of the grant was
        released, under the callers told they hold them."""
        notice = self.notice_key(grant.waiter.id)

        async def run() -> tuple[Any, ...]:
            kv = _txn().get(notice)
            if kv.value is None or kv.mod != revision:
                return ()  # taken by its replica, or gone with its session
            _txn().delete(notice)
            try:
                still = self._still_held(grant, self.clock())
            except LockUnreadable:
                still = ()
            fresh, kept = self._kept_now(grant, still, heard=False)
            handoffs = []
            for lock in grant.locks:
                if not fresh or (kept and lock.key in kept):
                    continue  # its pull's already, or told to another request of it
                try:
                    handoffs.append(await StoreBackend.release_and_handoff(
                        self, lock.key, owner=lock.owner, policy=policy,
                        token=lock.fencing_token, unless_told=True))
                except (LockNotOwned, LockNotHeld, LockUnreadable):
                    continue  # that hold is gone already (or stays: told)
            return tuple(handoffs)

        names = [self._named(lock.key) for lock in grant.locks]
        policy = self.queue_policy()
        try:
            handoffs = await self._atomic(
                run, keys=(notice, *(k for n in names for k in (n.lock, n.fence))),
                prefixes=tuple(p for n in names for p in (n.queue, n.shared)))
        except Exception as error:  # etcd away, or a key another store holds: left as it is
            log.warning("etcd %s: the grant to waiter %s, whose replica is gone, could not be "
                        "taken back (%s)", self.connection.where, grant.waiter.id,
                        type(error).__name__)
            return
        for handoff in handoffs:
            if handoff.released is not None:
                self.taken_back.inc()
                log.warning("etcd %s: the grant of %s to waiter %s was taken back: its "
                            "replica has not renewed its session since (gone)",
                            self.connection.where, handoff.released.key, grant.waiter.id)
            self.served_unasked(handoff)

    # --- the uncontended key: StoreBackend's shortcuts ---------------------------------------
    # The shared step calls them for a key nobody waits for, under no rule that could say no
    # (it has read the queue and the rules itself). They run inside the step like any other
    # read (so the commit carries the guards of every key the operation took, as the general
    # step's does) and answer ``None`` for anything but the plain case, where the general
    # step then decides: the same writes and the same answer, without settling, serving an
    # empty queue and the decision around them (about a third of the store's Python per pair).
    def _take_free(self, candidate: Candidate, times: tuple[datetime, datetime | None],
                   ) -> Lock | None:
        """Grant ``candidate`` if its key has no holder stored (nor shared), and was not kept
        aside as unreadable."""
        key = candidate.key
        txn = _txn()
        if (key in self.unreadable or txn.get(self.lock_key(key)).value is not None
                or any(kv.value is not None for kv in txn.scan(self.shared_prefix(key)).values())):
            return None
        taken = candidate.granted(acquired_at=times[0], expires_at=times[1],
                                  fencing_token=self._next_token(key))
        self._store(taken)
        return taken

    def _pop(self, key: str, owner: Owner | None) -> Lock | None:
        """Delete ``key``'s holder if it is live, readable, ``owner``'s (or anyone's, without
        it) and the key is not held shared too."""
        txn = _txn()
        if key in self.unreadable:
            return None
        kv = txn.get(self.lock_key(key))
        if kv.value is None:
            return None
        try:
            lock = _resolve_lock(self._read(key, kv.value), kv.mod)
        except LockUnreadable:
            return None  # the general step keeps it aside and says why
        if (lock.expired(self.clock()) or (owner is not None and lock.owner != owner)
                or any(kv.value is not None for kv in txn.scan(self.shared_prefix(key)).values())):
            return None
        if owner is None:
            self._restart_token(key)  # a force-unlock also repairs a floor written over
        self._delete(key)
        return lock

    def _floor(self, key: str, *, repairing: bool = False) -> int | None:
        """``key``'s token floor (``None``: none stored yet); one that is not a whole number
        (written over by something else) raises ``LockUnreadable``: the key is set aside, as
        a fencing counter written over is on Redis, until a force-unlock restarts it. It is
        listed and counted with the unreadable locks (``unreadable``) once the step counts,
        unless the caller is ``repairing`` it; a floor read whole clears such an entry."""
        value = _txn().get(self.fence_key(key)).value
        if value is None or value.isdigit():  # (bytes: ASCII digits only)
            if self.unreadable and key in self.unreadable:
                self._floor_repaired(key)
            return None if value is None else int(value)
        found = self._bad_floor(key, value)
        if not repairing:
            self._unreadable_change(lambda u: u.found(found))
            entry = self.unreadable.get(key)
            if entry is None or entry.reason != _FLOOR_UNREADABLE:
                # Marked for every replica's full list; the step fails, so the run writes it
                # after (``_write_marks``); a step that goes on commits it.
                _txn().put(self.floor_mark(key), b"")
        raise LockUnreadable(found)

    def _floor_repaired(self, key: str) -> None:
        """``key``'s floor is a whole number again (or gone): its entry, if set aside for
        the floor, is cleared (one set aside for its stored holder stays)."""
        entry = self.unreadable.get(key)
        if entry is not None and entry.reason == _FLOOR_UNREADABLE:
            self._unreadable_change(lambda u: u.cleared(key))
            _txn().delete(self.floor_mark(key))

    def _read_whole(self, key: str, held: Locks) -> None:
        # A free key set aside for its floor stays aside (its holders were not what was
        # written over); held, its floor was repaired since (nothing is granted over one).
        entry = self.unreadable.get(key)
        if entry is None or entry.reason != _FLOOR_UNREADABLE or held:
            self._unreadable_change(lambda u: u.readable(key))

    def _bad_floor(self, key: str, value: bytes) -> UnreadableLock:
        """The entry of ``key``, whose floor ``value`` is not a whole number, logged once a
        replica (its size and digest, never the value)."""
        found = codec.unreadable(key, value, None, side=self.namespace,
                                 reason=_FLOOR_UNREADABLE)
        if key not in self._bad_floors:
            if len(self._bad_floors) >= _UNREADABLE_KEPT:
                self._bad_floors.clear()
            self._bad_floors.add(key)
            log.warning("etcd %s: the token floor of %s is not a whole number (%d bytes, "
                        "digest %s); nothing is granted on it until a force-unlock restarts "
                        "it from the clock", self.connection.where, key, found.size,
                        found.digest)
        return found

    def _clock_floor(self) -> int:
        """The floor a floor that is not a whole number restarts from: the clock's (ms x
        1000, above any token handed out before, as a Redis counter restarted after a loss)."""
        return clock_floor(self.clock())

    def _check_tokens(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._floor(key)

    def _restart_token(self, key: str) -> None:
        try:
            self._floor(key, repairing=True)
        except LockUnreadable:
            _txn().put(self.fence_key(key), str(self._clock_floor()).encode())
            self._floor_restarted(key)

    def _floor_restarted(self, key: str) -> None:
        """``key``'s floor, written over, is written anew in this step: its mark deleted with
        it, its entry cleared (and logged again should it be written over again)."""
        _txn().delete(self.floor_mark(key))
        self._bad_floors.discard(key)
        self._unreadable_change(lambda u: u.cleared(key))

    def _next_token(self, key: str) -> int:
        txn = _txn()
        floor = self._floor(key)
        if floor is None:
            txn.put(self.fence_key(key), b"0")
            floor = 0
        if key in txn.stamped:
            # Another grant of the key in this step (shared waiters served together share its
            # revision): one above the last, and the raised floor keeps later grants above it.
            floor += 1
            txn.put(self.fence_key(key), str(floor).encode())
        txn.stamped.add(key)
        return -(floor + 1)  # resolved to the grant's revision + floor once it commits

    def _tokens(self) -> dict[str, int]:
        txn = _txn()
        prefix = self.base + b"fence/"
        revision = max((rev for rev, _ in txn.reads.ranges.values()), default=0)
        tokens = {unquote(k[len(prefix):].decode()): kv.value
                  for k, kv in txn.scan(prefix).items() if kv.value is not None}
        damaged = sorted(key for key, value in tokens.items() if not value.isdigit())
        if damaged:
            # Floors that are not whole numbers (written over): unknown, so the clock's, as a
            # force-unlock restarts them, above any token they handed out.
            log.warning("etcd %s: the token floors of %s are not whole numbers; exported as "
                        "the clock's (%d)", self.connection.where, ", ".join(damaged),
                        self._clock_floor())
        return {key: revision + (int(value) if value.isdigit() else self._clock_floor())
                for key, value in tokens.items()}

    def _raise_token(self, key: str, at_least: int) -> None:
        try:
            floor = self._floor(key, repairing=True) or 0
        except LockUnreadable:  # not a whole number: restarted from the clock (or higher)
            floor, at_least = -1, max(at_least, self._clock_floor())
            self._floor_restarted(key)
        if at_least > floor:
            _txn().put(self.fence_key(key), str(at_least).encode())

    def _scan(self, repo: str | None, pull: int | None) -> Locks:
        locks: Locks = []
        unreadable: list[UnreadableLock] = []
        txn = _txn()
        part = _PART.get()
        scanned = txn.reads.scanned if part is None else part.scanned
        stored: set[str] = set()  # the keys with a holder stored, readable or not
        for prefix in (self.base + b"lock/", self.base + b"shared/"):
            for k, kv in txn.scan(prefix).items():
                if kv.value is None:
                    continue
                found = scanned.get((k, kv.value, kv.mod))
                if found is None:
                    key = unquote(k[len(prefix):].decode().split("/")[0])
                    try:
                        found = _resolve_lock(
                            codec.read(kv.value, key=key, side=self.namespace), kv.mod)
                    except LockUnreadable as error:
                        found = error.found
                    scanned[(k, kv.value, kv.mod)] = found
                stored.add(found.key)
                if not isinstance(found, Lock):
                    unreadable.append(found)
                    continue
                lock = found
                if (repo is None or lock.project.repo_full_name == repo) and (
                        pull is None or lock.pull.num == pull):
                    locks.append(lock)
        # The free keys whose floor a step met written over: their marks and floors read
        # with the scan (a full list), or else as found before (a floor read whole, or a
        # holder, clears one).
        if txn.has_range(self._marks):
            unreadable += self._marked(stored)
        elif self.unreadable:
            unreadable += [entry for entry in self.unreadable.entries()
                           if entry.reason == _FLOOR_UNREADABLE and entry.key not in stored]
        # Every key is read (the pull of an unreadable lock cannot be told before reading it).
        self._unreadable_change(lambda u: u.scanned(unreadable))
        if part is not None and part.owner == (repo, pull):
            # A release by pull: this step frees the next part of the pull's locks, by key.
            locks = sorted((lock for lock in locks if lock.key not in part.done),
                           key=lambda lock: lock.key)
            part.left = len(locks) > _PULL_PART
            del locks[_PULL_PART:]
            part.taken = [lock.key for lock in locks]
            # The step reads each freed key's queue: all of them in one read, rather than a
            # run of the step (and a scan of every lock) per key it had not read.
            unread = tuple(prefix for prefix in map(self.queue_prefix, part.taken)
                           if not _txn().has_range(prefix))
            if unread:
                raise _Miss(prefixes=unread)
        return locks

    def _marked(self, stored: set[str]) -> list[UnreadableLock]:
        """The free keys marked ``unreadable/`` whose floor is still not a whole number (each
        marked key's floor read, all in one run again); a mark whose floor was repaired (by
        hand, or by a force-unlock whose step crossed the mark's write) is deleted."""
        txn = _txn()
        keys = [unquote(k[len(self._marks):].decode()) for k, kv in txn.scan(self._marks).items()
                if kv.value is not None]
        free = [key for key in keys if key not in stored]
        unread = tuple(fence for fence in map(self.fence_key, free)
                       if fence not in txn.reads.keys and fence not in txn.writes)
        if unread:
            raise _Miss(keys=unread)
        found: list[UnreadableLock] = []
        for key in free:
            value = txn.get(self.fence_key(key)).value
            if value is None or value.isdigit():
                txn.delete(self.floor_mark(key))
            else:
                found.append(self._bad_floor(key, value))
        return found

    async def _write_marks(self, client: etcd3aio.Etcd3Client, txn: _Txn, *,
                           key: str | None) -> None:
        """The marks a failed run's ``_floor`` put (``unreadable/{key}``), written alone: the
        run's other writes are not. One etcd does not take leaves the step's answer as it is:
        the replica lists the key, and its next full list, not finding the mark, drops it
        until a step meets the floor again and writes the mark then."""
        marks: dict[bytes, tuple[bytes, int] | None] = {
            k: v for k, v in txn.writes.items() if v is not None and k.startswith(self._marks)}
        if marks:
            try:
                await self._send(client, _Reads(), marks, key=key)
            except BackendUnavailable as error:
                log.warning("etcd %s: the mark of a token floor written over was not written "
                            "(%s); another replica does not list it until it is",
                            self.connection.where, error)

    def _unreadable_change(self, change: Callable[[UnreadableLocks], object]) -> None:
        # A step may run again on fresh reads before it counts: keep the change with the run.
        txn = _CURRENT.get()
        if txn is None:
            change(self.unreadable)
        else:
            txn.notes.append(change)

    def _noted(self, txn: _Txn) -> None:
        """The run counts (committed, or its refusal stands): apply what it found."""
        for change in txn.notes:
            change(self.unreadable)
        txn.notes.clear()

    def _purge(self, key: str) -> None:
        txn = _txn()
        txn.delete(self.lock_key(key))
        for k in txn.scan(self.shared_prefix(key)):
            txn.delete(k)

    @contextlib.contextmanager
    def _step(self) -> Iterator[_Effects]:
        """One atomic step; its notices are written with it and delivered once it commits."""
        effects = _Effects()
        yield effects
        _txn().effects.append(effects)

    def _run_clock(self) -> datetime:
        """``clock``; in a run of a step, that run's time (``_Txn.at``): one time for the whole
        run, and the same in the run again after a miss (see ``_run_step``)."""
        txn = _CURRENT.get()
        if txn is None:
            return self._clock()
        if txn.at is None:
            txn.at = self._clock()
        return txn.at

    # --- running a step ----------------------------------------------------------------------
    async def _atomic(self, run: Callable[[], Awaitable[T]], *, keys: tuple[bytes, ...] = (),
                      prefixes: tuple[bytes, ...] = (), key: str | None = None,
                      guess: bool = False) -> T:
        """Run a step of StoreBackend over etcd and commit it as one guarded transaction.

        With ``guess`` (the operations on one key) the first run reads nothing from etcd: it
        runs on what this replica last knew of those keys (absent and empty for keys it never
        saw), and its commit carries the reads it made as guards, as every commit does. A
        commit whose guards fail returns, in the same round trip, the keys the step reads as
        they are now, and the step runs again on them. So an operation whose keys only this
        replica changed since is one round trip; one that guessed wrong, or met another
        writer, is one more per conflict. A step that writes nothing still sends its guards
        when it ran on a guess (its answer must come from etcd, not from memory).
        """
        if _CURRENT.get() is not None:
            return await run()  # a step calling another (release -> release_and_handoff)
        if key is None:
            return await self._run_step(run, keys, prefixes, key, guess)
        # This replica's steps on one key run one after another: run together they would
        # only fail each other's guards (each reads the key's whole queue), so N waiters
        # queued at once through one replica cost about N*N/2 transactions; in line, each runs
        # on what the one before it committed and costs one (another replica's write still
        # costs a retry). A batch waits in the line of its first key only.
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = _Line()
        else:
            turn = asyncio.get_running_loop().create_future()
            line.waiting.append(turn)
            try:
                await turn
            except BaseException:
                if not turn.cancelled():  # given its turn, and cancelled before it ran
                    self._next_in_line(key, line)
                raise  # (cancelled while waiting: its turn is passed over, being done)
        try:
            return await self._run_step(run, keys, prefixes, key, guess)
        finally:
            self._next_in_line(key, line)

    def _next_in_line(self, key: str, line: _Line) -> None:
        """The turn of ``key``'s line passed to the first step still waiting in it, or the
        line gone (nobody waits)."""
        waiting = line.waiting
        while waiting:
            turn = waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        del self._lines[key]

    async def _run_step(self, run: Callable[[], Awaitable[T]], keys: tuple[bytes, ...],
                        prefixes: tuple[bytes, ...], key: str | None, guess: bool) -> T:
        client = await self.connection.client()
        if client is not self._followed:
            self._follow_channel(client)
        if self._session is None and not self._session_ready.locked():
            # Open the session early, off the caller's path: the first wait finds it ready.
            self._spawn(self._quietly(self._ensure_session()))
        want_keys, want_prefixes = set(keys), set(prefixes)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + CALL_TIMEOUT
        checked: dict[int, bool] = {}
        lost: tuple[_Txn, T] | None = None
        """The run whose commit's answer was lost (etcd may have applied it), and its
        result: what the step answers if the fresh reads show it applied (``_landed``)."""
        at: datetime | None = None
        """The time of the next run: that of a run that missed something (a key, a lease, a
        replica's renewals), so that the run again needs what was fetched for it. A lock's
        lease is that of its end second: run again on the clock after a grant answered in a
        later second, the lock ended in a later second too, the step granted a lease for that
        one and left the first to its TTL (a grant slower than a second each time never let
        the step commit). The lock's time is then counted from the run that asked for the
        lease, as it is counted from before the commit's round trip."""
        settled = False
        """Whether ``lost`` can no longer land unseen: a later run committed over its keys (its
        guards would refuse it now), or the step read whether it landed as its caller left."""
        self.in_flight += 1
        try:
            if guess:
                reads, verified = self._known.guess(want_keys, want_prefixes), False
            else:
                reads, verified = await self._fetch(client, want_keys, want_prefixes,
                                                    key=key), True
            for attempt in range(_ATTEMPTS):
                txn = _Txn(reads, self._leases, checked, at)
                at = None
                if lost is not None and _landed(lost[0], reads) is not None:
                    txn.again = lost[0].writes
                token = _CURRENT.set(txn)
                try:
                    result = await run()
                except _Miss as miss:
                    at = txn.at
                    want_keys.update(miss.keys)
                    want_prefixes.update(miss.prefixes)
                    if miss.lease:
                        await self._lease_for(client, miss.lease, key=key)
                    if miss.alive:
                        checked[miss.alive] = await self._renewals(miss.alive, key=key)
                    if miss.keys or miss.prefixes:
                        if verified and lost is not None:  # (see below)
                            more = await self._read_again(client, set(miss.keys),
                                                          set(miss.prefixes), key=key,
                                                          until=give_up)
                        elif verified:
                            more = await self._fetch(client, set(miss.keys),
                                                     set(miss.prefixes), key=key)
                        else:
                            more = self._known.guess(set(miss.keys), set(miss.prefixes))
                        reads.keys.update(more.keys)
                        reads.ranges.update(more.ranges)
                    continue
                except Exception:
                    if verified:
                        self._noted(txn)
                        await self._write_marks(client, txn, key=key)
                        if lost is not None and (landed := _landed(lost[0], reads)) is not None:
                            # (a release whose first attempt handed the key on finds it held
                            # by the waiter: its answer is the first attempt's)
                            return self._answer_landed(lost, landed)
                        raise
                    # A refusal (not held, not owned) decided on a guess: only etcd can say
                    # whether it stands. If the guards hold it does; else run on what is.
                    fresh = (await self._send(client, txn.reads, {}, key=key))[1]
                    if fresh is None:
                        self._noted(txn)
                        await self._write_marks(client, txn, key=key)
                        raise
                    self.missed_guesses += 1
                    reads, verified = fresh, True
                    if guess:
                        self._known.learn(reads)
                    continue
                finally:
                    _CURRENT.reset(token)
                try:
                    revision, fresh, gone = await self._commit_answered(client, txn, key=key,
                                                                        verified=verified)
                except _Refused:
                    raise  # refused for good: running the step again changes nothing
                except _GoneUnanswered:
                    self._known.forget(want_keys, want_prefixes)
                    settled = True
                    runs = [(txn, result)] if lost is None else [(txn, result), lost]
                    raise await self._gone_unanswered(
                        client, runs, want_keys, want_prefixes, key=key) from None
                except BackendUnavailable:
                    # Through a leader change the answer can be lost: whether it was written
                    # or not, the step runs again on fresh reads (guards keep it from applying
                    # twice), for as long as a call may take.
                    self._known.forget(want_keys, want_prefixes)
                    if txn.writes:
                        lost = (txn, result)
                    if loop.time() > give_up:
                        raise
                    await asyncio.sleep(0.1)
                    revision, fresh, gone = None, None, False
                if revision is not None and txn.writes:
                    settled = True  # (a write over the keys the lost commit is guarded by)
                if gone and revision is None:
                    raise asyncio.CancelledError  # not written: nothing of it to undo
                if revision is None:
                    if verified:
                        self.conflicts += 1
                    else:
                        self.missed_guesses += 1
                    if attempt > 2:  # a hot key: let the others through first
                        await asyncio.sleep(random.uniform(0, 0.002 * min(attempt, 20)))
                    if fresh is None and lost is not None:
                        # After a lost answer the reads are what tell whether it landed: a
                        # read that fails (the connection coming back) is made again for as
                        # long as the call may take, not the end of the step, whose caller
                        # would be told `unavailable` with its grant held for good.
                        fresh = await self._read_again(client, want_keys, want_prefixes,
                                                       key=key, until=give_up)
                    elif fresh is None or attempt > 2:
                        fresh = await self._fetch(client, want_keys, want_prefixes, key=key)
                    reads, verified = fresh, True
                    if guess:
                        self._known.learn(reads)
                    continue
                if guess:
                    self._known.learn(txn.reads, txn.writes, revision)
                if (lost is not None and not txn.writes
                        and (landed := _landed(lost[0], txn.reads)) is not None):
                    answer = self._answer_landed(lost, landed)
                    if gone:
                        raise _unheard(answer)
                    return answer
                self._after_commit(txn, revision)
                if not (txn.stamped or txn.records):
                    if gone:
                        raise _unheard(result)
                    return result  # no token nor waiter to resolve: nothing was granted/queued
                resolved: T = _resolve(result, revision)
                if gone:  # written, and told (its notices): the caller's clean-up undoes it
                    raise _unheard(resolved)
                return resolved
            raise BackendUnavailable(
                f"etcd {self.connection.where}: gave up after {_ATTEMPTS} conflicting writers",
                key=key)
        except asyncio.CancelledError as error:
            if lost is None or settled or isinstance(error, GrantedUnheard):
                raise
            # Its caller went away while the step ran again after a lost answer (a read, a
            # pause, a commit refused by its guards): the lost commit may have landed (or
            # land yet, behind in etcd's line). Read as for a commit given up on whose answer
            # was lost: a grant found there goes back to the caller's locker to give back.
            self._known.forget(want_keys, want_prefixes)
            raise await self._gone_unanswered(client, [lost], want_keys, want_prefixes,
                                              key=key) from None
        except BackendUnavailable as error:
            if lost is None or isinstance(error, (GrantUnknown, HandoffUnknown)):
                raise
            runs, wanted = [lost], (set(want_keys), set(want_prefixes))
            if _grants(lost[1]):
                # A commit that would grant may have landed, its answer lost, and etcd was
                # not read again in time: the caller is answered unavailable, and what landed
                # is learnt once etcd answers (the locker gives it back: the caller was
                # refused).
                self._known.forget(want_keys, want_prefixes)
                raise GrantUnknown(str(error), key=error.key,
                                   learn=lambda: self._learn_grant(runs, *wanted, key=key),
                                   ) from error
            if isinstance(lost[1], Handoff):
                # A release (a hand-off) may have landed so: whether it did is learnt the
                # same way, for a caller that tells it (a give-back, sent again, would find
                # the key freed or handed on, and never tell its release).
                self._known.forget(want_keys, want_prefixes)
                raise HandoffUnknown(str(error), key=error.key,
                                     learn=lambda: self._learn_handoff(runs, *wanted, key=key),
                                     ) from error
            raise
        finally:
            self.in_flight -= 1

    async def _commit_answered(self, client: etcd3aio.Etcd3Client, txn: _Txn, *,
                               key: str | None, verified: bool,
                               ) -> tuple[int | None, _Reads | None, bool]:
        """``_commit``, awaited to etcd's answer though the step's caller goes away meanwhile
        (its task cancelled: ``True`` last, and the step then raises ``CancelledError``).

        etcd may still apply a write whose call was cancelled once sent, and apply it after
        the steps that came behind it in the key's line: the caller's own clean-up (a cancel
        of its waiter, a release of what it may hold) found nothing to undo, and the waiter
        the write queued, or the lock it took, stayed for a caller that was gone (a lock
        without a TTL held for good, and every waiter of its key never told). So the step,
        and its turn of the line, end only once etcd has answered, bounded by the call's own
        deadline: the commit runs in the caller's task, which takes a cancel only once the
        commit has ended (:class:`_Unbroken`)."""
        committing = _Unbroken(self._commit(client, txn, key=key, verified=verified))
        try:
            revision, fresh = await committing
        except BaseException as error:
            gone = committing.gone
            if gone and isinstance(error, BackendUnavailable) and not isinstance(
                    error, _Refused):
                raise _GoneUnanswered from error  # (applied or not: the reads will say)
            if gone:
                raise asyncio.CancelledError from None
            raise
        return revision, fresh, committing.gone

    async def _gone_unanswered(self, client: etcd3aio.Etcd3Client,
                               runs: list[tuple[_Txn, T]], keys: set[bytes],
                               prefixes: set[bytes], *,
                               key: str | None) -> asyncio.CancelledError:
        """The cancellation of a step whose caller went away as its commit was on its way,
        the commit's answer lost: its keys read again (never the step run again: nobody
        wants it now), tried while etcd does not answer for as long as a call may take. The
        write of one of ``runs`` (this run, and an earlier run of the step whose answer was
        lost too) found there is answered as landed (a grant: ``GrantedUnheard``, given back
        by its caller); none found, a plain cancellation. Not read in time, a run that would
        grant is left to the caller's locker with the cancellation (``GoneGrantUnknown``: the
        read ``GrantUnknown`` carries, run in the background once etcd answers again, the
        grant found then given back); before, the reads gave up there, and a grant etcd had
        applied stayed held for good (no lease), never told. Before that, a commit etcd
        applied though its answer was lost stayed the same way whatever the reads found. The
        reads are seen through though the task is cancelled again meanwhile (a shutdown
        behind a client gone: :class:`_Unbroken`, the cancel it keeps is this one's
        already); a second cancel ended them, and the grant stayed."""
        runs = [run for run in runs if run[0].writes]
        if not runs:
            return asyncio.CancelledError()
        until = asyncio.get_running_loop().time() + CALL_TIMEOUT
        try:
            reads = await _Unbroken(self._read_again(client, keys, prefixes, key=key,
                                                     until=until))
        except BackendUnavailable:
            if any(_grants(run[1]) for run in runs):
                wanted = (set(keys), set(prefixes))
                return GoneGrantUnknown(
                    key=key, learn=lambda: self._learn_grant(runs, *wanted, key=key))
            log.warning("etcd %s: could not read whether the step of %s, given up on by its "
                        "caller, was applied (its answer lost): what it wrote may stay",
                        self.connection.where, key or "its keys")
            return asyncio.CancelledError()
        found = self._first_landed(runs, reads)
        return _unheard(found[0]) if found is not None else asyncio.CancelledError()

    async def _read_again(self, client: etcd3aio.Etcd3Client, keys: set[bytes],
                          prefixes: set[bytes], *, key: str | None, until: float) -> _Reads:
        """``_fetch`` after a commit's answer was lost, made again while etcd does not answer
        (the connection that lost it coming back) until the loop's time ``until``, then its
        ``BackendUnavailable`` raised: only the reads say whether that commit landed."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return await self._fetch(client, keys, prefixes, key=key)
            except BackendUnavailable:
                if loop.time() > until:
                    raise
                await asyncio.sleep(0.1)

    async def _learn_landed(self, runs: list[tuple[_Txn, T]], keys: set[bytes],
                            prefixes: set[bytes], *, key: str | None) -> T | None:
        """The answer of the first of ``runs`` (a step's runs whose commit's answer was lost,
        etcd not read again within the call's limit) that etcd applied, read once etcd
        answers again (tried while it does not, until cancelled); ``None`` when none landed
        or what it wrote has changed since (released, handed on: nothing of it to undo)."""
        delay = 0.1
        while True:
            try:
                client = await self.connection.client()
                reads = await self._fetch(client, keys, prefixes, key=key)
            except BackendUnavailable:
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
                continue
            found = self._first_landed(runs, reads)
            return None if found is None else found[0]

    async def _learn_grant(self, runs: list[tuple[_Txn, T]], keys: set[bytes],
                           prefixes: set[bytes], *, key: str | None) -> Outcome | None:
        """The grant of one of ``runs`` that etcd applied (``_learn_landed``), its caller
        answered ``unavailable`` (``GrantUnknown``) or gone (``GoneGrantUnknown``)."""
        answer = await self._learn_landed(runs, keys, prefixes, key=key)
        return answer if isinstance(answer, Outcome) and _grants(answer) else None

    async def _learn_handoff(self, runs: list[tuple[_Txn, T]], keys: set[bytes],
                             prefixes: set[bytes], *, key: str | None) -> Handoff | None:
        """The hand-off of one of ``runs`` (a release) that etcd applied (``_learn_landed``),
        its caller answered ``unavailable`` (``HandoffUnknown``)."""
        answer = await self._learn_landed(runs, keys, prefixes, key=key)
        return answer if isinstance(answer, Handoff) else None

    def _first_landed(self, runs: list[tuple[_Txn, T]], reads: _Reads) -> tuple[T] | None:
        """The answer (in a tuple: it may be ``None``) of the first of ``runs`` whose commit
        ``reads`` show etcd applied though its answer was lost; ``None``: none landed."""
        for run in runs:
            landed = _landed(run[0], reads)
            if landed is not None:
                return (self._answer_landed(run, landed),)
        return None

    def _answer_landed(self, lost: tuple[_Txn, T], revision: int) -> T:
        """The answer of a run whose commit etcd applied at ``revision`` (0: it only deleted)
        though its answer was lost: its result, its notices delivered, as if it had come."""
        txn, result = lost
        self._after_commit(txn, revision)
        if not (txn.stamped or txn.records):
            return result
        resolved: T = _resolve(result, revision)
        return resolved

    @staticmethod
    def _read_ops(keys: Iterable[bytes], prefixes: Iterable[bytes]) -> _ReadOps:
        """The reads of ``keys`` and ``prefixes`` (see :func:`_read_ops_of`)."""
        return _read_ops_of(tuple(keys), tuple(prefixes))

    @staticmethod
    def _parse_reads(ordered_keys: Sequence[bytes], ordered_prefixes: Sequence[bytes],
                     answer: Any) -> _Reads:
        revision = int(answer.header.revision)
        reads = _Reads()
        responses = list(answer.responses)
        for k, response in zip(ordered_keys, responses, strict=False):
            kvs = response.response_range.kvs
            reads.keys[k] = _kv(kvs[0]) if kvs else _KV(None)
        for p, response in zip(ordered_prefixes, responses[len(ordered_keys):], strict=True):
            reads.ranges[p] = (revision, {bytes(kv.key): _kv(kv)
                                          for kv in response.response_range.kvs})
        return reads

    async def _fetch(self, client: etcd3aio.Etcd3Client, keys: set[bytes],
                     prefixes: set[bytes], *, key: str | None) -> _Reads:
        """Read keys and key ranges at one revision (one transaction without guards)."""
        ordered_keys, ordered_prefixes, ops = self._read_ops(keys, prefixes)
        request = _TxnRequest()
        request.success.extend(ops)
        self.reads += 1
        answer = await self._read_txn(client, request, key=key)
        reads = self._parse_reads(ordered_keys, ordered_prefixes, answer)
        await self._rest_of_ranges(client, reads, ordered_keys, ordered_prefixes, answer,
                                   key=key)
        return reads

    async def _rest_of_ranges(self, client: etcd3aio.Etcd3Client, reads: _Reads,
                              ordered_keys: Sequence[bytes], ordered_prefixes: Sequence[bytes],
                              answer: Any, *, key: str | None) -> None:
        """The keys past the first page of each range ``answer`` read (``_PAGE`` a read), at
        its revision, added to ``reads``."""
        revision = int(answer.header.revision)
        responses = list(answer.responses)[len(ordered_keys):]
        for prefix, response in zip(ordered_prefixes, responses, strict=True):
            page = response.response_range
            kvs = reads.ranges[prefix][1]
            while page.more and page.kvs:
                request = _TxnRequest()
                request.success.append(_page_op(bytes(page.kvs[-1].key) + b"\0",
                                                _prefix_end(prefix), revision))
                self.pages += 1
                page = (await self._read_txn(client, request, key=key)).responses[0].response_range
                kvs.update((bytes(kv.key), _kv(kv)) for kv in page.kvs)

    async def _read_txn(self, client: etcd3aio.Etcd3Client, request: Any, *,
                    key: str | None) -> Any:
        """The answer to ``request``, a transaction that only reads (sent again once after a
        login renewed a token etcd refused)."""
        self.round_trips += 1
        try:
            try:
                return await _txn_call(self.connection, client, request, read=True)
            except DOWN as error:
                if not await self.connection.renewed(error):
                    raise
                return await _txn_call(self.connection, client, request, read=True)
        except DOWN as error:
            raise unreachable(self.connection, "read", error, key=key) from None

    async def _commit(self, client: etcd3aio.Etcd3Client, txn: _Txn, *, key: str | None,
                      verified: bool) -> tuple[int | None, _Reads | None]:
        """Write the step's changes if nothing it read has changed: the revision (0 when
        there was nothing to write), or ``None`` and the step's keys as they are now."""
        self._write_effects(txn)
        if not txn.writes and verified:
            return 0, None
        # Our own notices are delivered when the commit answers (after the step's effects
        # are in hand), not when the watch echoes them back, which can come first.
        told = ({waiter_id for fx in txn.effects for waiter_id, _ in fx.notices}
                if txn.effects else ())  # (a free key's step tells nobody)
        self._telling.update(told)
        try:
            revision, fresh = await self._send(client, txn.reads, txn.writes, key=key,
                                               leases=txn.used)
        finally:
            self._telling.difference_update(told)
        if revision is not None and not txn.writes:
            revision = 0
        return revision, fresh

    async def _send(self, client: etcd3aio.Etcd3Client, read: _Reads,
                    writes: dict[bytes, tuple[bytes, int] | None], *, key: str | None,
                    leases: set[int] | None = None) -> tuple[int | None, _Reads | None]:
        """``writes`` if everything in ``read`` is unchanged: the revision; else ``None``
        and, read in the same transaction, the same keys as they are now."""
        request, shape = _guarded(read, writes)
        op = request.success.add
        for k, v in writes.items():
            if v is None:
                op().request_delete_range.key = k
            else:
                _put(op().request_put, k, v[0], v[1])
        riding: list[tuple[Passenger, int]] = []  # each with the place of its transaction
        if writes:
            for passenger in self._passengers:
                # etcd counts a nested transaction's operations against what this one leaves
                # of --max-txn-ops (its largest list: compares or writes, the ride's place
                # counted): a step whose guards filled it was refused whole, once a key had
                # about 125 waiters. Such a step takes no passenger (its outbox writes it).
                if _MAX_OPS - max(len(request.compare), len(request.success) + 1) < RIDE_OPS:
                    break
                if passenger.board(request.success):
                    riding.append((passenger, len(request.success) - 1))
        ordered_keys, ordered_prefixes = shape.keys, shape.prefixes
        self.round_trips += 1
        landing: Landing = Landing.UNKNOWN
        answer: Any = None
        try:
            try:
                answer = await _txn_call(self.connection, client, request, read=not writes)
            except DOWN as error:
                # A token etcd refused (the transaction not applied), renewed: once more.
                if not await self.connection.renewed(error):
                    raise
                answer = await _txn_call(self.connection, client, request, read=not writes)
            landing = Landing.APPLIED if answer.succeeded else Landing.REFUSED
        except DOWN as error:
            failure = unreachable(self.connection, "write", error, key=key)
            if "lease not found" in str(failure):
                # A waiter's replica went away meanwhile, or a lock's lease ended: read again.
                landing = Landing.REFUSED  # (etcd refused the whole transaction)
                self._forget_leases(leases or set())
                session = self.session_lease
                if session and any(w is not None and w[1] == session for w in writes.values()):
                    # Perhaps this replica's own session: etcd says whether it still has it,
                    # before the step runs again on it (before, about 270 times in the 3.3 s
                    # until its next renewal found it gone).
                    await self._check_session(session)
                return None, None
            if _refused_for_good(error):
                landing = Landing.REFUSED  # (nothing of it was applied)
                raise _Refused(str(failure), key=key) from None
            raise failure from None
        finally:
            for passenger, place in riding:
                passenger.landed(landing, succeeded=landing is Landing.APPLIED and bool(
                    answer.responses[place].response_txn.succeeded))
        if answer.succeeded:
            return answer.header.revision, None
        fresh = self._parse_reads(ordered_keys, ordered_prefixes, answer)
        await self._rest_of_ranges(client, fresh, ordered_keys, ordered_prefixes, answer,
                                   key=key)
        return None, fresh

    def _write_effects(self, txn: _Txn) -> None:
        """Queue entries added and removed, and the notices of the step, as writes."""
        for key, (before, waiters) in txn.queues.items():
            if not before and not waiters:
                continue  # an empty queue read and left empty (every free key's step)
            now_ids = {w.id for w in waiters}
            prefix = self.queue_prefix(key)
            for waiter_id in set(before) - now_ids:
                txn.delete(prefix + waiter_id.encode())
            for waiter in waiters:
                was = before.get(waiter.id)
                if was is waiter:
                    continue
                # New, or taken over by a retry (its caller changed; the entry is put again,
                # its creation revision, the waiter's place, kept): the grant step reads the
                # waiter from here, and a late cancel by the caller it had looks at its caller.
                _, lease = txn.records.get(waiter.id, (waiter, self.session_lease))
                txn.put(prefix + waiter.id.encode(), self.record(waiter, lease), lease)
                if was is None:
                    # A retry (same id) queued again: what its earlier waiter was told
                    # (a grant since taken away, a cancel) is not for this one.
                    txn.delete(self.notice_key(waiter.id))
        for effects in txn.effects:
            for waiter_id, notice in effects.notices:
                record = txn.records.get(waiter_id)
                if record is None or record[1] == 0:
                    continue  # nobody waits for it anywhere (its replica's lease is gone)
                txn.put(self.notice_key(waiter_id), json.dumps({
                    "locks": [codec.encode(lock) for lock in notice.locks],
                    "reason": notice.reason.value if notice.reason else None,
                    "fresh": notice.fresh,
                    **({} if notice.kept is None else {"kept": sorted(notice.kept)}),
                    **({"upgraded": sorted(notice.upgraded)} if notice.upgraded else {}),
                    "waiter": self.record(*record).decode(),
                }).encode(), record[1])

    def _after_commit(self, txn: _Txn, revision: int) -> None:
        self._noted(txn)
        if revision > 0:
            for effects in txn.effects:
                for grant in effects.granted:
                    record = txn.records.get(grant.waiter.id)
                    if record is not None and record[1] and record[1] != self.session_lease:
                        self._claim(_resolve(grant, revision), record[1], revision)
        for waiter_id in txn.gone:
            self.passed_over.inc()
            log.warning("etcd %s: waiter %s was passed over: its replica has not renewed its "
                        "session for more than %d s (gone); told unavailable",
                        self.connection.where, waiter_id, GONE_AFTER)
        for effects in txn.effects:
            for waiter_id, notice in effects.notices:
                self._notifier.deliver(waiter_id, _resolve(notice, revision))

    async def _lease_for(self, client: etcd3aio.Etcd3Client, end: int, *,
                         key: str | None) -> int:
        """The lease this replica attaches to locks that end at second ``end``: granted once
        and shared by them all, so a run of grants with the same length costs one grant a
        second, not one each. Never revoked: it ends by itself at ``end``, and a lock released
        before simply leaves it."""
        now = _ms(self.clock()) / 1000
        for stale in [e for e in self._leases if e < now]:
            self._lease_ends.pop(self._leases.pop(stale), None)
        lease = self._leases.get(end)
        if lease is None:
            assert client.lease is not None
            self.round_trips += 1
            ttl = min(max(1, math.ceil(end - now)), _LONGEST_LEASE)
            lease = await self._grant_lease(ttl, key=key)
            self._leases[end] = lease
            self._lease_ends[lease] = min(end, math.floor(now) + ttl)  # when etcd ends it
        return lease

    def _forget_leases(self, leases: set[int]) -> None:
        for end in [e for e, lease in self._leases.items() if lease in leases]:
            self._lease_ends.pop(self._leases.pop(end), None)

    async def _grant_lease(self, ttl: int, *, key: str | None) -> int:
        """A lease of ``ttl`` seconds under an ID this replica draws (etcd's ``LeaseGrant``
        takes one), so the grant is idempotent. It is sent again after an attempt on the
        route failed (the leader frozen or gone, :func:`leader_first`), and that attempt may
        have been applied, its answer lost: sent again, the grant then meets "lease already
        exists" and takes that lease, rather than granting a second one that nothing would
        use until its TTL. A frozen member that applies the first attempt late meets the
        same ID and grants nothing either. A grant given up on (the call failed or its caller
        was cancelled) is revoked in the background: an attempt applied all the same is not
        left to its TTL, which for a lock's lease is the lock's own end."""
        lease_id = _lease_id()
        sent = 0
        theirs = False
        once = unary(_lease_calls, "LeaseGrant", LeaseGrantRequest(TTL=ttl, ID=lease_id))

        async def grant(member: etcd3aio.Etcd3Client, deadline: float) -> int:
            nonlocal sent, theirs
            sent += 1
            try:
                answer = await once(member, deadline)
            except grpc.aio.AioRpcError as error:
                if _lease_exists(error):
                    if sent > 1:
                        return lease_id  # granted by an earlier attempt whose answer was lost
                    theirs = True  # on the first attempt: a lease not ours has the ID
                raise
            return int(answer.ID)

        try:
            async with unavailable(self.connection, "lease grant", key=key):
                return await leader_first(self.connection, grant, write=True)
        except (BackendUnavailable, asyncio.CancelledError):
            if sent and not theirs:
                self._spawn(self._revoke(lease_id))
            raise

    async def _revoke(self, lease: int) -> None:
        with contextlib.suppress(Exception):
            client = await self.connection.client()
            await unary(_lease_calls, "LeaseRevoke", LeaseRevokeRequest(ID=lease))(
                client, CALL_TIMEOUT)

    @staticmethod
    async def _quietly(work: Awaitable[Any]) -> None:
        with contextlib.suppress(BackendUnavailable):
            await work

    def _spawn(self, work: Awaitable[Any]) -> None:
        """``work`` in the background, cancelled by :meth:`close`; nothing once the store is
        closed: a notice deleted, a lease revoked or a key served then connected the closed
        store again and kept that connection (with auth on, its token refresher) for good
        (the callers a close tells to go away clean up after it). What they would do, the
        close's revoke of the session does, or etcd's leases."""
        if self._closed:
            if asyncio.iscoroutine(work):
                work.close()
            return
        task: asyncio.Task[Any] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def tidy(self, waiter_id: str) -> None:
        """Delete a notice its caller no longer needs (best effort; the session lease is the
        backstop)."""
        async def delete() -> None:
            with contextlib.suppress(Exception):
                client = await self.connection.client()
                await unary(kv_calls, "DeleteRange", DeleteRangeRequest(
                    key=self.notice_key(waiter_id)))(client, CALL_TIMEOUT)

        with contextlib.suppress(RuntimeError):
            self._spawn(delete())

    # --- the replica's session and its watch -------------------------------------------------
    async def _ensure_session(self) -> None:
        """A session lease for this replica's waiters, and a watch for their notices, both
        started before the first waiter is queued (so no notice can be missed)."""
        if self.session_lease and self._session is not None and not self._session.done():
            return
        self.in_flight += 1  # waiting for etcd (or for the step that opens the session)
        try:
            await self._open_session()
        finally:
            self.in_flight -= 1

    async def _open_session(self) -> None:
        async with self._session_ready:
            if self.session_lease and self._session is not None and not self._session.done():
                return
            client = await self.connection.client()
            self.session_lease = await self._grant_lease(SESSION_TTL, key=None)
            self._steady = self._renewal = time.monotonic()
            reached = self._history
            async with unavailable(self.connection, "watch"):
                header = (await unary(kv_calls, "Range", RangeRequest(key=self.base))(
                    client, CALL_TIMEOUT)).header
            self._history_moved(header, reached)
            start = int(header.revision)
            self._session = asyncio.create_task(self._keep_alive(self.session_lease),
                                                name="etcd-session")
            if self._watch is None or self._watch.done():
                self._watch = asyncio.create_task(self._follow(client, start + 1),
                                                  name="etcd-notices")

    async def _keep_alive(self, lease: int) -> None:
        """Renew the session every ``RENEW_EVERY`` seconds (another replica takes one not
        renewed for ``GONE_AFTER`` for a dead one's); given up on once it could not be
        renewed for its whole life, or etcd no longer has it."""
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(RENEW_EVERY)
            try:
                ttl: int | None = await self._renew(lease)
            except (*DOWN, BackendUnavailable):
                if time.monotonic() - renewed < SESSION_TTL:
                    continue
                ttl = None
            else:
                renewed = time.monotonic()
                if renewed - self._renewal > _STEADY_GAP:
                    self._steady = renewed  # etcd (or this process) paused: count again
                self._renewal = renewed
            if ttl is None or ttl <= 0:
                self._session_lapsed()
                return

    def _session_lapsed(self) -> None:
        """The session lease is gone (etcd no longer has it, or it could not be renewed for
        its whole life): its waiters' entries went with it, so they are told the store is
        unavailable, and the next wait opens a new session (``_ensure_session``)."""
        log.warning("etcd %s: this replica's session lease lapsed; its waiters are "
                    "told the store is unavailable", self.connection.where)
        self.session_lease = 0
        self._steady = self._renewal = 0.0
        for waiter_id in self._notifier.local.pending():
            self._spawn(self._told_lapsed(waiter_id))

    async def _told_lapsed(self, waiter_id: str) -> None:
        """Tell ``waiter_id``, whose session lapsed, what it has: the locks of its grant if
        one was made before the lapse (its notice went with the session lease; the locks did
        not), else that the store is unavailable.

        A grant is its keys each held by its pull, in its mode, with a token above the
        revision that queued it and granted since its queueing (read from etcd now; stamped
        by the granting replica's clock, taken as at most ``_SKEW`` behind this one's: a
        grant stamped before the waiter's enqueue time by a clock behind was told
        ``unavailable``). A key of a batch its pull held before its queueing is one of them
        when the grant's notice, read back, says it kept it (its lock is older than the
        queueing; before, such a batch was told ``unavailable``). Before, the caller was
        told ``unavailable`` whatever happened, and a grant made to it in the moments before
        (its replica cut off from etcd, or its notice not yet heard) stayed held by a pull
        that was never told: for good, for a lock without a TTL."""
        notice = Notice(reason=Reason.UNAVAILABLE)
        waiter = self._notifier.waiters.get(waiter_id)
        seq = self._notifier.queued_at.get(waiter_id, 0)
        if waiter is not None and seq:
            found: list[Lock] = []
            kept: frozenset[str] | None = None
            upgraded: frozenset[str] = frozenset()
            read_kept = False
            try:
                # Granted since its queueing: the grant is stamped by the clock of the replica
                # that made it, which may be behind this one's (by up to _SKEW), and is in the
                # waiter's mode (a shared hold of its pull from before is not the upgrade).
                since = waiter.enqueued_at - _SKEW
                mine = {key: [lock for lock in await self.holders(key)
                              if lock.owner == waiter.owner and lock.mode == waiter.mode]
                        for key in waiter.keys}
                found = [lock for locks in mine.values() for lock in locks
                         if lock.fencing_token > seq and lock.acquired_at >= since]
                missing = set(waiter.keys) - {lock.key for lock in found}
                if found and missing:  # keys the grant kept, held by its pull from before?
                    (kept, upgraded), read_kept = (
                        await self._kept_at_grant(waiter_id, waiter.keys), True)
                    if kept is not None and missing <= kept:
                        found += [lock for key in missing for lock in mine[key]]
            except Exception:  # etcd away (or a lock not readable): nothing can be told
                found = []
            if found and {lock.key for lock in found} == set(waiter.keys):
                if not read_kept:
                    kept, upgraded = await self._kept_at_grant(waiter_id, waiter.keys)
                # Fresh as the grant's own notice was: not when its pull held every key
                # already (an upgrade of its shared hold counts so: not given back).
                fresh = kept is None or not set(waiter.keys) <= kept
                notice = Notice(locks=tuple(found), fresh=fresh, caller=waiter.caller,
                                kept=kept, upgraded=upgraded)
        self._notifier.deliver(waiter_id, notice)

    async def _kept_at_grant(self, waiter_id: str, keys: tuple[str, ...],
                             ) -> tuple[frozenset[str] | None, frozenset[str]]:
        """The keys ``waiter_id``'s pull held already when its grant was made, as the grant's
        notice said (``kept``), and those of them whose shared hold it upgraded
        (``upgraded``), read back at a revision the grant wrote: the notice went with the
        session lease, but etcd keeps the history until it is compacted. ``None`` (not said)
        and none upgraded when it cannot be read, is compacted, or an older replica wrote it.

        Without it, the answer of a waiter whose session lapsed said nothing of them, and a
        give-back of its batch (backed off, its caller gone) released a key the pull's other
        request took while it waited: its lock, too, is the pull's with a token above the
        waiter's queueing (``_told_lapsed`` rebuilds the grant from such holders)."""
        notice_key = self.notice_key(waiter_id)
        try:
            revisions: set[int] = set()
            for key in keys:
                for begin, end in ((self.lock_key(key), b""),
                                   (self.shared_prefix(key), _prefix_end(self.shared_prefix(key)))):
                    answer = await leader_first(self.connection, unary(
                        kv_calls, "Range", RangeRequest(key=begin, range_end=end, keys_only=True)))
                    revisions.update(int(kv.mod_revision) for kv in answer.kvs)
            for revision in sorted(revisions, reverse=True):  # the grant wrote its new keys
                answer = await leader_first(self.connection, unary(
                    kv_calls, "Range", RangeRequest(key=notice_key, revision=revision)))
                if not answer.kvs:
                    continue
                waiter, notice = self.notice_from(_kv(answer.kvs[0]))
                if waiter is not None and waiter.id == waiter_id and notice.locks:
                    return notice.kept, notice.upgraded
        except Exception:  # etcd away, the revision compacted, a notice not readable
            log.debug("etcd %s: the notice of %s could not be read back", self.connection.where,
                      waiter_id, exc_info=True)
        return None, frozenset()

    async def _check_session(self, lease: int) -> None:
        """A commit that attached writes to the session ``lease`` was refused for a lease etcd
        does not have: renewed now, and if etcd no longer has it, the session has lapsed
        (its renewals go no further)."""
        try:
            ttl = await self._renew(lease)
        except (*DOWN, BackendUnavailable):
            return  # the renewals decide, as they do for any failure to reach etcd
        if ttl <= 0 and self.session_lease == lease:
            session, self._session = self._session, None
            if session is not None:
                session.cancel()
            self._session_lapsed()

    async def _renew(self, lease: int) -> int:
        """One renewal of ``lease`` (one keep-alive answer): the seconds it has left, 0 when
        etcd no longer has it.

        Sent as reads are (:func:`leader_first`): to the leader when the route is known, else
        in attempts of their own on the balanced channel, each given by the round to the next
        member. On the balanced channel alone (as before), every third renewal could reach a
        frozen member and take the call's whole 5 s: the next renewal then came 3.3 + 5 + 3.3 s
        after the last one, past the session's 10 s, and etcd let the lease go under a live
        replica (its waiters were told ``unavailable`` while two members of three answered).
        A renewal sent twice only renews twice.

        It is sent as a unary call of the keep-alive method (one request, one answer: what
        etcd's stream does with a request followed by the end of the stream), so its limit
        is the call's gRPC deadline, kept by gRPC's core off the event loop as a step's
        transaction's is: an answer that came within it is taken however late the loop reads
        it. Before, the stream's read was bounded by a timer on the loop
        (``asyncio.wait_for``): after the loop stalled past it (a loaded machine), the timer
        and the answer came due in one turn and the renewal etcd had applied was taken for a
        failed one; two such in a row (10 s without an answer taken) told this replica's
        waiters the store was unavailable while etcd still had their session. (A stream's own
        deadline does not do it: its answer is read in several turns of the loop, and the
        deadline passes between them.)"""
        request = LeaseKeepAliveRequest(ID=lease)

        async def once(member: etcd3aio.Etcd3Client, deadline: float) -> int:
            service, channel = _lease_calls(member), member._channel
            if channel is None:  # (closed meanwhile)
                raise etcd3aio.EtcdConnectionError("the client is not connected")
            # The library's channel and auth token (its private attributes, as the steps'
            # transactions use them); its keep_alive opens a stream, with no deadline.
            call = channel.unary_unary(
                _KEEP_ALIVE, request_serializer=LeaseKeepAliveRequest.SerializeToString,
                response_deserializer=LeaseKeepAliveResponse.FromString)
            answer = await call(request, metadata=service._metadata or None, timeout=deadline)
            return int(answer.TTL)

        return await leader_first(self.connection, once)

    async def _follow(self, client: etcd3aio.Etcd3Client, start: int) -> None:
        """Notices for this replica's waiters: watched, and read every ``WATCH_CHECK``
        seconds while there are waiters here (:meth:`_missed`).

        A watch is one stream to one member, given by the balanced channel's round. Frozen
        (SIGSTOP: its connections stay open), that member sends nothing and nothing ends
        the stream: waiters were not told of their grant until it thawed (3 of 4 freezes of
        15 s, a member of three frozen). The read is sent as reads are (another member
        answers it); a notice it finds that the watch has not brought is delivered, and
        when the watch has still not brought it by the next read, the watch is started
        again, on the members in turn (``EtcdConnection.watcher``)."""
        notices = self.base + b"notice/"

        def heard(key: bytes, kv: _KV, prev: _KV) -> None:
            self._notices_watched = max(self._notices_watched, kv.mod)
            self._heard(key[len(notices):].decode(), kv)

        watch = self._prefix_watch("notices", notices, start, etcd3aio.WatchFilter.NODELETE)
        while True:
            self._notices_watched = 0
            again, anew = await watching(self._watch_prefix(client, watch, heard),
                                         lambda _: self._missed(notices))
            if anew:  # another history: its revisions, wherever the watch was in the old one
                watch.next = again
                continue
            watch.next = max(watch.next, again)
            log.warning("etcd %s: the watch of this replica's notices is behind (its member "
                        "may be frozen); watching again from revision %d",
                        self.connection.where, watch.next)
            with contextlib.suppress(BackendUnavailable):
                client = await watch.moved()  # (else the same client again)

    async def _missed(self, notices: bytes) -> tuple[int, bool]:
        """Every ``WATCH_CHECK`` seconds while this replica has waiters, read the notices
        and deliver those the watch has not (which notices are a waiter's: :meth:`_heard`).

        Returns the revision to watch from once the watch is behind: it has not brought, by
        this read, a notice the read before delivered (a whole check later). A notice the
        read finds a moment before the watch brings it is only delivered: the watch is
        started again (and a warning logged) only when it is behind. A read that
        fails is tried at the next check; a notice that cannot be read (a value another
        release wrote) is logged once and skipped, and the next ones are still delivered
        (:meth:`_heard`). With it, whether etcd's history changed (:meth:`_history_moved`:
        the watch then starts again from the read's revision, in the new history)."""
        behind = 0  # the newest notice the last read delivered (the watch had not brought it)
        histories = self._histories  # (another found since: the watch's revision is another's)
        read = unary(kv_calls, "Range", RangeRequest(key=notices, range_end=_prefix_end(notices)))
        while True:
            await asyncio.sleep(WATCH_CHECK)
            pending = set(self._notifier.local.pending())
            for known in (self._notifier.queued_at, self._notifier.early):
                for gone in [w for w in known if w not in pending]:
                    del known[gone]  # told, or its caller left
            if not self._notifier.queued_at:
                continue
            reached = self._history
            try:
                async with unavailable(self.connection, "read of notices"):
                    answer = await leader_first(self.connection, read)
            except BackendUnavailable:
                continue
            moved = self._history_moved(answer.header, reached) or self._histories != histories
            missed = 0
            for kv in answer.kvs:
                if self._heard(bytes(kv.key)[len(notices):].decode(), _kv(kv)):
                    missed = max(missed, int(kv.mod_revision))
            if moved or (behind and self._notices_watched < behind):
                return int(answer.header.revision) + 1, moved
            behind = missed

    def _history_moved(self, header: Any, reached: tuple[int, int]) -> bool:
        """Whether etcd's history is another than the one this replica knew (``reached``: its
        ``_history`` when the read was sent) when it sent the read that ``header`` answers
        (the session's start, the notices' or the waiting keys' read, which are
        linearizable: in one history a read sent later never answers an older revision, nor
        one below a revision that queued a waiter here). Another cluster id (made anew, or
        restored under another cluster token), or a revision below the last one read (a
        restore from an older backup, or a cluster made anew with the same token and so the
        same id), is another history: what was written after the backup is gone, a waiter
        queued then among it. This replica forgets what it knew of the keys, and its waiters
        are read again (:meth:`_recheck`). Before, a waiter queued after the backup, its
        entry gone, heard nothing for its whole wait (its session lease, restored, renewed
        on), and the watches waited at revisions the restored cluster had not reached."""
        cluster, revision = int(header.cluster_id), int(header.revision)
        seen_cluster, seen = reached
        if not seen_cluster or (cluster == seen_cluster and revision >= seen):
            now_cluster, now = self._history  # (a read sent later may have answered first)
            self._history = (cluster, max(revision, now) if now_cluster == cluster else revision)
            return False
        self._history = (cluster, revision)
        log.warning("etcd %s: the cluster's revision went back to %d from at least %d, or its "
                    "id changed (restored from a backup?): this replica's waiters are read "
                    "again", self.connection.where, revision, seen)
        self._histories += 1
        self._known = _Known()
        self._spawn(self._recheck())
        return True

    def _follow_channel(self, client: etcd3aio.Etcd3Client) -> None:
        """Forget what this replica knew of the keys whenever ``client``'s channel changes
        state (its connections to etcd broke, or are made again): what answers afterwards may
        be another history. etcd restored from a backup without ``--bump-revision`` gives
        again the revisions the old history gave after the backup, and a key this replica
        knew at one of them may hold another write at the same revision there: a step run on
        that view passes its guards. Before, a release by a pull whose lock the restore took
        away deleted the lock another replica had granted since at the same revision, and a
        third pull was granted the key while the second held it. A restore stops every
        member, so every connection breaks; an idle replica's too, which reads nothing that
        would tell it (:meth:`_history_moved`). The price: a step's guess after a member's
        restart costs a round trip more."""
        self._followed = client
        channel = client._channel
        if channel is not None:
            self._spawn(self._channel_states(channel))

    async def _channel_states(self, channel: grpc.aio.Channel) -> None:
        state = channel.get_state()
        while state is not grpc.ChannelConnectivity.SHUTDOWN:
            await channel.wait_for_state_change(state)
            state = channel.get_state()
            self._known = _Known()

    async def _recheck(self) -> None:
        """Read again whether each waiter waiting here is still queued (its ``waiter/``
        record), after etcd's history changed (:meth:`_history_moved`) or a watch of this
        replica was answered compacted (a restore with ``--bump-revision`` and
        ``--mark-compacted`` answers so, its revisions above the old ones; so does one that
        fell behind a compaction). One that is not is told its notice when etcd has one for
        it (the step that ended its wait wrote it with the record's delete: :meth:`_heard`),
        else what the holders of its keys say (:meth:`_told_lapsed`: a grant made since,
        else ``unavailable``): nobody would grant it, or tell it anything. One whose reads
        fail is read again while its caller waits."""
        if self._rechecking:
            return
        self._rechecking = True
        try:
            for waiter_id in list(self._notifier.queued_at):
                delay = 0.1
                record = unary(kv_calls, "Range", RangeRequest(
                    key=self.waiter_key(waiter_id), count_only=True))
                notice = unary(kv_calls, "Range", RangeRequest(key=self.notice_key(waiter_id)))
                while self._notifier.local.waits(waiter_id):
                    try:
                        async with unavailable(self.connection, "read of a waiter"):
                            queued = (await leader_first(self.connection, record)).count
                            told = [] if queued else (
                                await leader_first(self.connection, notice)).kvs
                    except BackendUnavailable:
                        await asyncio.sleep(delay)
                        delay = min(2.0, delay * 2)
                        continue
                    if not queued and not (told and self._heard(waiter_id, _kv(told[0]))):
                        await self._told_lapsed(waiter_id)
                    break
        finally:
            self._rechecking = False

    def _watch_deletions(self, start: int) -> None:
        """Follow lock deletions from revision ``start`` (the revision that queued a waiter
        here, or an older one) for as long as this replica has waiters.

        Only a leased lock can be deleted by etcd itself, once its lease ended (the replica
        that granted it is gone, or it would have expired the lock first); the key's waiters
        are then served by a replica that sees the delete. Every waiter's own replica watches
        from before it was queued, so each waiting key is served; a replica without waiters
        has nobody to serve, and does not hear every release of the cluster (a watch event,
        with the released lock, per release). The watch is backed by a read of the keys
        its waiters wait on, every ``WATCH_CHECK`` seconds (:meth:`_unserved`)."""
        if self._deletions is None or self._deletions.done():
            self._deletions = asyncio.create_task(self._follow_deletions(start),
                                                  name="etcd-lock-deletions")

    async def _follow_deletions(self, start: int) -> None:
        """The watch of lock deletions, started again when it is behind (:meth:`_unserved`),
        until this replica has had no waiters for ``DELETIONS_LINGER`` seconds.

        A watch is one stream to one member. Frozen (SIGSTOP), that member brought no delete
        until it thawed, and a waiter whose holder's replica was gone waited as long: nothing
        else served the key (the next step on it would have)."""
        locks = self.base + b"lock/"
        heard: set[str] = set()
        """Keys whose delete the watch brought since the last read (``_unserved``)."""

        def deleted(key: bytes, kv: _KV, prev: _KV) -> None:
            name = unquote(key[len(locks):].decode())
            if len(heard) < _Known.LIMIT:
                heard.add(name)
            # A lock deleted while it still had time left was released by a replica, whose
            # step served the key: serving it again here was one more transaction per release
            # on every replica, racing the next acquire.
            if prev.lease and self._lapsed(prev):
                self._spawn(self._serve(name, prev))

        while True:
            try:
                client = await self.connection.client()
                break
            except BackendUnavailable:  # etcd is away: the watch starts once it is back
                await asyncio.sleep(0.2)
        watch = self._prefix_watch("lock deletions", locks, start, etcd3aio.WatchFilter.NOPUT)
        while True:
            again = await watching(self._watch_prefix(client, watch, deleted),
                                   lambda _: self._unserved(heard))
            if again is None:
                # Nobody has waited here for a while: stop (``_unserved`` let go of this
                # task before the watch's wind-down, so a waiter queued meanwhile started a
                # new one from its own revision).
                return
            if again[1]:  # another history: its revisions, wherever the watch was
                watch.next = again[0]
                continue
            watch.next = max(watch.next, again[0])
            log.warning("etcd %s: the watch of lock deletions is behind (its member may be "
                        "frozen); watching again from revision %d", self.connection.where,
                        watch.next)
            with contextlib.suppress(BackendUnavailable):
                client = await watch.moved()  # (else the same client again)

    async def _unserved(self, heard: set[str]) -> tuple[int, bool] | None:
        """Every ``WATCH_CHECK`` seconds while this replica has waiters, read whether the keys
        they wait on have a holder, and serve each one that has none (:meth:`_free_keys`).

        A key with a waiter of ours and no holder is one whose lock etcd deleted (a release
        hands the key on in its own step), or one whose waiters cannot be served yet (a
        batch waiting for another key, a rule that refuses): the step that serves it is run
        on fresh reads, so for the second kind it writes nothing. It reads the key and what
        its waiters' other keys need (five reads each, for a batch on two free keys and a
        held one), so a key still free at the next check, its step having found nothing to
        grant, is served again only every ``_STILL_FREE`` checks: the step on another key,
        or ``wake``, serves such a waiter. (A key granted and deleted by etcd between two
        checks, which a lock's lease ending a second or more after the lock allows only for
        a lock shorter than the checks' interval, is then served that much later.) A step
        that grants something on a key the read before found locked (under ``lock/``) is a
        delete the watch did not serve; one that grants on a key freed otherwise (a shared
        holder's lease ended, a rule that refused stopped) is not: the watch follows
        ``lock/`` only, and has nothing to bring for it.

        Returns the revision to watch from once the watch is behind: by the next read, it
        still has not brought the delete of a key the read before served (it was given two
        checks); with it, whether etcd's history changed (:meth:`_history_moved`: the watch
        then starts again from the read's revision, in the new history). ``None`` once this
        replica has had no waiters for ``DELETIONS_LINGER`` seconds."""
        behind: set[str] = set()  # locked keys the last read served (the watch had not)
        locked: set[str] = set()  # keys the last read found with a lock under ``lock/``
        earlier: set[str] = set()  # keys whose delete the watch brought the check before
        still: dict[str, int] = {}  # free keys whose step granted nothing: checks since
        revision = 0  # the last read's
        idle = 0.0
        histories = self._histories  # (another found since: the watch's revision is another's)
        while True:
            await asyncio.sleep(WATCH_CHECK)
            brought, earlier = earlier | heard, set(heard)
            heard.clear()
            if behind - brought:
                return revision + 1, False
            behind = set()
            pending = set(self._notifier.local.pending())
            for gone in [w for w in self._notifier.keys if w not in pending]:
                del self._notifier.keys[gone]  # told, or its caller left
            if not pending:
                idle += WATCH_CHECK
                if idle >= DELETIONS_LINGER:
                    # Let go of this task before the watch is wound down (an await): a
                    # waiter queued from here on starts a new task, with its own watch.
                    self._deletions = None
                    return None
                continue
            idle = 0.0
            keys = sorted({k for ks in self._notifier.keys.values() for k in ks})
            try:
                revision, free, now_locked = await self._free_keys(keys)
            except BackendUnavailable:
                continue  # (the last read's ``locked`` is kept for the next one)
            if self._histories != histories:
                return revision + 1, True
            was_locked, locked = locked, now_locked
            still = {key: still[key] + 1 for key in free if key in still}
            for key in free:
                if still.get(key, 0) % _STILL_FREE:
                    continue
                try:
                    handoff = await self._expire_step(key, policy=self.queue_policy(),
                                                      guess=False)
                    self.served_unasked(handoff)
                except BackendUnavailable:
                    continue
                except Exception as error:  # this key's step failed: the others are served
                    log.warning("etcd %s: serving the free key %s failed (%s); tried again at "
                                "a later check", self.connection.where, key,
                                type(error).__name__)
                    continue
                if handoff.granted:
                    if key in was_locked:  # its lock was deleted: the watch should bring it
                        behind.add(key)
                        self.served_unheard += 1
                    still.pop(key, None)
                else:
                    still.setdefault(key, 0)

    async def _free_keys(self, keys: list[str]) -> tuple[int, list[str], set[str]]:
        """Of ``keys``, those with no holder (no lock, no shared holder), the revision they
        were read at (the oldest, when they took several reads), and those with a lock (under
        ``lock/``): counts only, sent as reads are (:func:`leader_first`: the leader first,
        else in attempts the balanced channel's round gives to the next member),
        ``_FREE_PER_READ`` keys a read."""
        revision, free = 0, []
        locked: set[str] = set()
        for at in range(0, len(keys), _FREE_PER_READ):
            chunk = keys[at:at + _FREE_PER_READ]
            request = _TxnRequest()
            for key in chunk:
                names = self._named(key)
                request.success.extend((_count_op(names.lock),
                                        _count_op(names.shared, _prefix_end(names.shared))))
            client = await self.connection.client()
            reached = self._history
            try:
                answer = await _txn_call(self.connection, client, request, read=True)
            except DOWN as error:
                raise unreachable(self.connection, "read of the waiting keys", error) from None
            self._history_moved(answer.header, reached)
            read_at = int(answer.header.revision)
            revision = min(revision, read_at) if revision else read_at
            counts = [int(response.response_range.count) for response in answer.responses]
            free += [key for n, key in enumerate(chunk) if not counts[2 * n] + counts[2 * n + 1]]
            locked.update(key for n, key in enumerate(chunk) if counts[2 * n])
        return revision, free, locked

    def _prefix_watch(self, what: str, prefix: bytes, start: int,
                      drop: etcd3aio.WatchFilter) -> Watch:
        """A watch of the keys under ``prefix`` from revision ``start``, each write with the
        key's value before it, without the writes of ``drop``'s kind."""
        return Watch(self.connection, what, prefix, _prefix_end(prefix), start=start,
                     prev_kv=True, filters=(drop,))

    async def _watch_prefix(self, client: etcd3aio.Etcd3Client, watch: Watch,
                            handle: Callable[[bytes, _KV, _KV], None]) -> None:
        """Follow ``watch`` for good, each write handed to ``handle`` (its key, the key's value
        and its value before), the first stream through ``client`` (a member's, when the check
        found the watch behind). A break (a failure, or etcd answering the watch canceled) is
        logged and the watch resumes from the revision after the last one it delivered, on
        the next member, with the current auth token (:meth:`Watch.follow`).

        A write ``handle`` fails on (a key another program wrote that is not UTF-8, or any
        other error) is skipped, logged with its revision only, and the rest of the answer
        delivered (:meth:`Watch.each`)."""
        def take(event: Any) -> None:
            handle(bytes(event.kv.key), _kv(event.kv), _kv(event.prev_kv))

        def deliver(answer: Any) -> None:
            if answer.compact_revision:
                # Writes it had not brought are gone: a waiter's may be among them (a restore
                # with --bump-revision and --mark-compacted answers every watch so).
                self._spawn(self._recheck())
            watch.each(answer, take)

        await watch.follow(client, deliver)

    def _heard(self, waiter_id: str, kv: _KV) -> bool:
        """A notice the watch or the read of notices brought: delivered (``True``) if it is
        for a waiter waiting here and was written after the revision that queued it. A
        waiter with a request ID keeps its ID when retried: a notice written for it while its
        caller was away (a grant since taken back, a cancel) is older than the retry's
        queueing, and is not the retry's answer. One that comes before the waiter's queueing
        has answered is kept until then (``_queued_here``). One that cannot be read (a
        value another release wrote) is logged once and skipped."""
        if waiter_id in self._telling or not self._notifier.local.waits(waiter_id):
            return False
        queued_at = self._notifier.queued_at.get(waiter_id)
        if queued_at is None:
            held = self._notifier.early.get(waiter_id)
            if held is None or kv.mod > held.mod:  # (a read answered late brings an older one)
                self._notifier.early[waiter_id] = kv
            return False
        if kv.mod <= queued_at or (waiter_id, kv.mod) in self._unreadable:
            return False
        try:
            _, notice = self.notice_from(kv)
        except Exception as error:
            if len(self._unreadable) >= _UNREADABLE_KEPT:
                self._unreadable.clear()
            self._unreadable.add((waiter_id, kv.mod))
            log.warning("etcd %s: a notice for a waiter here cannot be read (%s); skipped",
                        self.connection.where, type(error).__name__)
            return False
        if notice.locks and not json.loads(kv.value or b"{}").get("taken"):
            # Another replica's grant: taken first, so that it cannot be taken back.
            if waiter_id not in self._taking:
                self._taking.add(waiter_id)
                self._spawn(self._take_grant(waiter_id, kv, notice))
            return True
        self._notifier.deliver(waiter_id, notice)
        return True

    async def _take_grant(self, waiter_id: str, kv: _KV, notice: Notice) -> None:
        """Take the grant ``notice`` (``kv``: its notice as etcd has it) before its caller
        is told: the notice is marked taken, if it is still the one written with the grant.
        A replica whose session goes unrenewed past ``GONE_AFTER`` (stopped, or cut off) has
        the grants it did not take taken back by the replica that made them
        (``_take_back``); whichever of the two comes first, the other finds the notice
        changed, so a caller is never told a grant that was taken back. Not taken (taken
        back, or gone with the session): the caller is answered as the holders of its keys
        say (``_told_lapsed``). Tried again while etcd is away and the caller waits."""
        try:
            key = self.notice_key(waiter_id)
            data = json.loads(kv.value or b"{}")
            # Its locks with their tokens resolved (against the grant's revision, which the
            # notice no longer has once marked): anyone who reads it later reads these.
            data["locks"] = [codec.encode(lock) for lock in notice.locks]
            data["taken"] = True
            request = _TxnRequest()
            request.compare.add(result=_EQUAL, target=_MOD, key=key, mod_revision=kv.mod)
            _put(request.success.add().request_put, key, json.dumps(data).encode(), kv.lease)
            delay = 0.05
            while self._notifier.local.waits(waiter_id):
                try:
                    client = await self.connection.client()
                    self.round_trips += 1
                    answer = await _txn_call(self.connection, client, request, read=False)
                except DOWN as error:
                    if not await self.connection.renewed(error):
                        await asyncio.sleep(delay)
                        delay = min(1.0, delay * 2)
                    continue
                except BackendUnavailable:
                    await asyncio.sleep(delay)
                    delay = min(1.0, delay * 2)
                    continue
                if answer.succeeded:
                    self._notifier.deliver(waiter_id, notice)
                else:
                    await self._told_lapsed(waiter_id)
                return
        finally:
            self._taking.discard(waiter_id)

    def _queued_here(self, waiter: Waiter, seq: int) -> None:
        """``waiter``, whose caller waits here, was queued on its keys at revision ``seq``:
        only a notice written after it is its answer, one already brought is delivered now.
        (A revision not known, which a committed step does not leave, lets every notice in.)"""
        waiter_id = waiter.id
        if not self._notifier.local.waits(waiter_id):
            return
        self._notifier.keys[waiter_id] = waiter.keys
        self._notifier.waiters[waiter_id] = waiter
        self._notifier.queued_at[waiter_id] = seq if seq < _PENDING_SEQ else 0
        if seq < _PENDING_SEQ:  # a revision of this history: a read below it is another one
            self._history = (self._history[0], max(self._history[1], seq))
        early = self._notifier.early.pop(waiter_id, None)
        if early is not None:
            self._heard(waiter_id, early)

    def _lapsed(self, prev: _KV) -> bool:
        """Whether a deleted lock's time was up (give or take the clock skew of replicas), so
        that etcd may have deleted it; a value that cannot be read counts as lapsed."""
        now = self.clock()
        end = self._lease_ends.get(prev.lease)
        if end is not None:  # one of this replica's leases: it ends at ``end``
            return _at(end * 1000) <= now + _SKEW
        try:
            expires_at = codec.decode(prev.value or b"").expires_at
        except Exception:
            return True
        return expires_at is None or expires_at <= now + _SKEW

    async def _serve(self, key: str, prev: _KV) -> None:
        """A leased lock was deleted by etcd (its lease ran out; ``prev``: its value): hand
        the key on, and tell it (``served_unasked``). The deleted lock is told expired by the
        replica whose step handed the key on (one step can, so it is told once); a step that
        finds the key already served says nothing (the replica that served it told it)."""
        with contextlib.suppress(BackendUnavailable):
            handoff = await self.expire(key, policy=self.queue_policy())
            if handoff.granted and handoff.released is None and not handoff.expired:
                try:
                    gone = _resolve_lock(codec.decode(prev.value or b""), prev.mod)
                except Exception:  # (a value not a lock: nothing to tell of it)
                    gone = None
                if gone is not None and gone.key == key:
                    handoff.expired = (gone,)
            self.served_unasked(handoff)

    # --- the protocols -----------------------------------------------------------------------
    def _keys_of(self, key: str) -> tuple[bytes, ...]:
        return (self.lock_key(key), self.fence_key(key))

    async def acquire(self, lock: Lock) -> tuple[bool, Lock]:
        granted, held = await self._atomic(lambda: StoreBackend.acquire(self, lock),
                                           keys=self._keys_of(lock.key),
                                           prefixes=(self.queue_prefix(lock.key),),
                                           key=lock.key, guess=True)
        if granted:
            self._refuse_if_late((held,))
        return granted, held

    async def get(self, key: str) -> Lock | None:
        async def run() -> Lock | None:
            lock = await StoreBackend.get(self, key)
            if lock is None:
                # A free key whose floor is written over reads as set aside (as on Redis,
                # where its lock hash is marked), so a force-unlock says it cleared it. The
                # floor is read with the lock, in the same round trip: a batch reads each of
                # its keys first (the keys its pull holds already), most of them free.
                self._floor(key)
            return lock

        return await self._atomic(run, keys=self._keys_of(key), key=key)

    async def list(self, *, repo: str | None = None, pull: int | None = None) -> Locks:
        # A full list also reads the marks of floors written over (and those keys' floors,
        # not every floor): a free key whose floor a step met is listed as unreadable on
        # every replica, as Redis lists a counter written over (its lock hash marked).
        every = repo is None and pull is None
        return await self._atomic(
            lambda: StoreBackend.list(self, repo=repo, pull=pull),
            prefixes=(self.base + b"lock/", self.base + b"shared/",
                      *((self._marks,) if every else ())))

    async def release_by_pull(self, repo: str, pull: int, *, policy: Any = None) -> Locks:
        return list((await self.release_pull(repo, pull, policy=policy)).released)

    async def release_pull(self, repo: str, pull: int, *, policy: Any = None) -> PullRelease:
        """The pull's locks released ``_PULL_PART`` at a time (in key order), each part one
        step, each key handed to its next waiter in the step that frees it. In one step, a
        pull holding about 60 locks made a transaction etcd refused (past its 128 compares:
        each key's delete, token floor and queue), and kept them all.

        A part's step that fails after earlier parts committed raises
        :class:`PullPartlyReleased` carrying what those parts did: the locks they released,
        those whose lease had run out and the waiters their keys were handed to, which the
        caller tells (events, counts, lease timers) before the error, as it tells a release
        that finished. Before, the error carried the released locks alone: the parts' lapsed
        locks were freed and never told expired, and their hand-offs were neither counted nor
        named in the keys' events."""
        released: Locks = []
        expired: Locks = []
        granted: list[Grant] = []
        holders: Locks = []
        part = _Part(repo, pull)
        while True:
            token = _PART.set(part)
            try:
                freed = await self._atomic(
                    lambda: StoreBackend.release_pull(self, repo, pull, policy=policy),
                    prefixes=(self.base + b"lock/", self.base + b"shared/"))
            except BackendUnavailable as error:
                if not (released or expired or granted):
                    raise
                raise PullPartlyReleased(
                    f"{error} (after releasing {len(released) + len(expired)} of the pull's "
                    "locks)", done=PullRelease(released=tuple(released), expired=tuple(expired),
                                               granted=tuple(granted),
                                               holders=tuple(holders))) from error
            finally:
                _PART.reset(token)
            released += freed.released
            expired += freed.expired
            granted += freed.granted
            holders += freed.holders or ()
            if not part.left:
                return PullRelease(released=tuple(released), expired=tuple(expired),
                                   granted=tuple(granted), holders=tuple(holders))
            part.done.update(part.taken)

    async def refresh(self, key: str, owner: Owner, ttl: timedelta) -> Lock:
        lock = await self._atomic(lambda: StoreBackend.refresh(self, key, owner, ttl),
                                  keys=(self.lock_key(key),), key=key)
        if self.ran_out((lock,)) is not None:
            raise LockNotHeld(key)  # its new end passed before the answer came: it expired
        return lock

    async def export(self) -> tuple[Locks, dict[str, int]]:
        return await self._atomic(lambda: StoreBackend.export(self),
                                  prefixes=(self.base + b"lock/", self.base + b"shared/",
                                            self.base + b"fence/"))

    async def adopt(self, locks: Locks, tokens: dict[str, int]) -> Locks:
        keys = tuple(k for lock in locks for k in self._keys_of(lock.key))
        keys += tuple(self.fence_key(key) for key in tokens)
        return await self._atomic(lambda: StoreBackend.adopt(self, locks, tokens),
                                  keys=tuple(sorted(set(keys))))

    # --- grants whose answer came too late ----------------------------------------------------
    def ran_out(self, locks: Iterable[Lock], *, waiter: str | None = None) -> Lock | None:
        """The first of a grant's ``locks`` whose time is up now, as its answer arrives.

        A grant's commit can be answered long after it was applied (an election holds the
        answer up; a lost answer is found by running the step again). etcd ends a lock's
        lease no sooner than a second after the lock's own end: the lease is granted for at
        least that long, only ever extended by a leader change, and this store never revokes
        one. So while the lock's end has not come, its lease has not gone and etcd has not
        deleted it; once it has, the key may already be someone else's. Judging by the lock's
        end needs no call to etcd (a lease check after every commit would add a round trip
        to each grant), and is the lock's own rule: a lock past its end is not held."""
        now = self.clock()
        lapsed = next((lock for lock in locks if lock.expired(now)), None)
        if lapsed is not None:
            self.late_grants += 1
            assert lapsed.expires_at is not None
            log.warning(
                "etcd %s: the grant of %s%s was answered %.3fs after its end; not granted",
                self.connection.where, lapsed.key, f" to waiter {waiter}" if waiter else "",
                (now - lapsed.expires_at).total_seconds())
        return lapsed

    def _refuse_if_late(self, locks: Iterable[Lock]) -> None:
        lapsed = self.ran_out(locks)
        if lapsed is not None:
            raise BackendUnavailable(
                f"etcd {self.connection.where}: the grant of {lapsed.key} was answered after "
                "its end (the store was slow to answer); it is not held, ask again",
                key=lapsed.key)

    async def ping(self) -> None:
        """etcd answers. Its first ping (a start, a switch, an import) refused for the user is
        the user's setting (``UnusableSetting``, exit 2), not an outage; once answered, an
        outage like any other."""
        try:
            async with unavailable(self.connection, "ping"):
                await leader_first(self.connection, unary(
                    kv_calls, "Range", RangeRequest(key=self.base + b"ping")))
        except LoginRefused as refused:
            if self._pinged:
                raise
            raise UnusableSetting(refused.setting, refused.detail) from None
        self._pinged = True

    async def close(self) -> None:
        """Tell this replica's waiters the store is going away, end the session, disconnect."""
        self._closed = True
        for waiter_id in self._notifier.local.pending():
            self._notifier.deliver(waiter_id, Notice(reason=Reason.UNAVAILABLE))
        for task in (self._session, self._watch, self._deletions, *self._tasks):
            if task is not None:
                task.cancel()
        for task in (self._session, self._watch, self._deletions, *list(self._tasks)):
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task
        self._session = self._watch = self._deletions = None
        if self.session_lease:
            lease, self.session_lease = self.session_lease, 0
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._revoke(lease), 2.0)
        await self.connection.close()

    async def acquire_batch(self, candidates: Any, *, ttl: timedelta | None, wait: Any,
                            policy: Any) -> Any:
        if len(candidates) > self.BATCH_MOST:
            raise InvalidRequest(
                f"a batch takes at most {self.BATCH_MOST} locks with the etcd backend, got "
                f"{len(candidates)} (it is one etcd transaction, guarded by four to five keys for "
                f"each lock, and etcd takes at most {_MAX_OPS} compares in one): ask for them "
                "in several batches", field="locks")
        if wait is not None and wait.timeout > timedelta(0):
            await self._ensure_session()
        keys = [k for c in candidates for k in self._keys_of(c.key)]
        if wait is not None:
            keys.append(self.waiter_key(wait.id))
        outcome = await self._atomic(
            lambda: StoreBackend.acquire_batch(self, candidates, ttl=ttl, wait=wait,
                                               policy=policy),
            keys=tuple(keys),
            prefixes=tuple(p for c in candidates
                           for p in (self.queue_prefix(c.key), self.shared_prefix(c.key))),
            key=candidates[0].key if candidates else None, guess=True)
        return self._answered(outcome)

    async def acquire_or_enqueue(self, candidate: Candidate, *, ttl: timedelta | None, wait: Any,
                                 policy: Any) -> Any:
        """``acquire_batch`` of one key, its step written for one: the same keys and the same
        step (``StoreBackend.acquire_batch`` of one candidate is its
        ``acquire_or_enqueue``), without the batch's lists and its coroutine."""
        if wait is not None and wait.timeout > timedelta(0):
            await self._ensure_session()
        names = self._named(candidate.key)
        keys: tuple[bytes, ...] = (names.lock, names.fence)
        if wait is not None:
            keys += (self.waiter_key(wait.id),)
        outcome = await self._atomic(
            lambda: StoreBackend.acquire_or_enqueue(self, candidate, ttl=ttl, wait=wait,
                                                    policy=policy),
            keys=keys, prefixes=(names.queue, names.shared), key=candidate.key, guess=True)
        return self._answered(outcome)

    def _answered(self, outcome: Any) -> Any:
        """An acquire's ``outcome`` once its step committed: a grant answered after its end
        refused; a waiter queued here heard of (its notice, the lock deletions it waits on)."""
        if outcome.status is Status.GRANTED:
            self._refuse_if_late(outcome.locks)
        elif outcome.status is Status.QUEUED and outcome.waiter is not None:
            seq = outcome.waiter.seq  # the revision that queued it
            self._queued_here(outcome.waiter, seq)
            self._watch_deletions(seq if seq < _PENDING_SEQ else 0)
        return outcome

    async def release_and_handoff(self, key: str, *, owner: Owner | None = None,
                                  policy: Any = None, token: int | None = None,
                                  checked: frozenset[int] | None = None,
                                  unless_told: bool = False) -> Any:
        return await self._atomic(
            lambda: StoreBackend.release_and_handoff(self, key, owner=owner, policy=policy,
                                                     token=token, checked=checked,
                                                     unless_told=unless_told),
            keys=self._keys_of(key), prefixes=(self.queue_prefix(key), self.shared_prefix(key)),
            key=key, guess=True)

    async def replace(self, lock: Lock) -> bool:
        """:meth:`StoreBackend.replace` in one etcd transaction."""
        return await self._atomic(lambda: StoreBackend.replace(self, lock),
                                  keys=self._keys_of(lock.key),
                                  prefixes=(self.shared_prefix(lock.key),), key=lock.key)

    async def expire(self, key: str, *, policy: Any = None) -> Expiry:
        return await self._expire_step(key, policy=policy, guess=True)

    async def _expire_step(self, key: str, *, policy: Any = None, guess: bool) -> Expiry:
        """The expiry step on ``key`` (:meth:`StoreBackend.expire`); ``guess`` as ``_atomic``
        takes it (False: on fresh reads, as the read of waiting keys serves a key it found
        free)."""
        return await self._atomic(lambda: StoreBackend.expire(self, key, policy=policy),
                                  keys=self._keys_of(key),
                                  prefixes=(self.queue_prefix(key), self.shared_prefix(key)),
                                  key=key, guess=guess)

    async def cancel(self, key: str, waiter_id: str, *,
                     reason: Reason = Reason.CANCELLED, caller: str = "",
                     policy: Any = None) -> Any:
        cancelled = await self._atomic(
            lambda: StoreBackend.cancel(self, key, waiter_id, reason=reason, caller=caller,
                                        policy=policy),
            keys=(self.waiter_key(waiter_id), self.notice_key(waiter_id), self.lock_key(key)),
            prefixes=(self.queue_prefix(key), self.shared_prefix(key)), key=key, guess=True)
        if cancelled.granted and self.ran_out(cancelled.granted, waiter=waiter_id) is not None:
            # Its grant's time is up: the waiter holds nothing to keep or to give back.
            return dataclasses.replace(cancelled, granted=())
        return cancelled

    async def holders(self, key: str) -> Locks:
        return await self._atomic(lambda: StoreBackend.holders(self, key),
                                  keys=(self.lock_key(key),),
                                  prefixes=(self.shared_prefix(key),), key=key)

    async def wake(self, *, policy: Any) -> Any:
        return await self._atomic(lambda: StoreBackend.wake(self, policy=policy),
                                  prefixes=(self.base + b"queue/", self.base + b"lock/",
                                            self.base + b"shared/"))

    async def queue(self, key: str, *, policy: Any = None, limit: int | None = None) -> Any:
        return await self._atomic(
            lambda: StoreBackend.queue(self, key, policy=policy, limit=limit),
            prefixes=(self.queue_prefix(key),), key=key)

    async def wait_graph(self, *, policy: Any = None) -> Any:
        return await self._atomic(lambda: StoreBackend.wait_graph(self, policy=policy),
                                  prefixes=(self.base + b"queue/", self.base + b"lock/",
                                            self.base + b"shared/"))

    async def wait_graph_from(self, waiter: Any, *, policy: Any = None) -> Any:
        return await self._atomic(
            lambda: StoreBackend.wait_graph_from(self, waiter, policy=policy),
            prefixes=(self.base + b"queue/", self.base + b"lock/", self.base + b"shared/"))


def _landed(lost: _Txn, reads: _Reads) -> int | None:
    """Whether the run ``lost``, whose commit's answer was lost, was applied, as ``reads`` (on
    which the step ran again) show it: every key it put that they hold has the value it put,
    all at one revision newer than anything it read (returned), and every key it deleted that
    they hold is absent (0 when it only deleted). ``None`` when not, or when they hold none
    of its writes.

    Without it, the step run again answered as if the first attempt had not been made: a
    grant it made was taken for the pull's earlier hold (not fresh: no ``acquired`` event, no
    lease timer), a release that had handed the key on found it held by the waiter
    (``LockNotOwned``) or a plain one found nothing to release (``None``). A delete only that
    another step made at the same moment (a force-unlock) is taken for this one's: the lock
    is gone either way."""
    newest = max([kv.mod for kv in lost.reads.keys.values()]
                 + [seen for seen, _ in lost.reads.ranges.values()], default=0)
    revision, found = 0, False
    for key, written in lost.writes.items():
        kv = reads.keys.get(key)
        if kv is None:
            kv = next((kvs.get(key, _KV(None)) for prefix, (_, kvs) in reads.ranges.items()
                       if key.startswith(prefix)), None)
            if kv is None:
                continue  # not read again (a notice, a waiter's record)
        found = True
        if written is None:
            if kv.value is not None:
                return None
        elif kv.value != written[0] or kv.mod <= newest or (revision and kv.mod != revision):
            return None
        else:
            revision = kv.mod
    return revision if found else None


def _entry_guards(read: _Reads, writes: dict[bytes, tuple[bytes, int] | None],
                  ) -> list[tuple[bytes, _KV]]:
    """The entries of ``read``'s ranges a commit guards one by one (``mod_revision`` equal:
    still there, unchanged), besides its keys and its ranges (nothing added or changed in a
    range since it was read, which cannot see a delete).

    Every entry, while the transaction stays within etcd's ``--max-txn-ops`` (``_MAX_OPS``
    compares). Past it (a release of a pull's locks reads every lock; a key with about 125
    waiters): the entries the commit writes or deletes, then as many of the others as fit.
    etcd refused the whole transaction (``too many operations in txn request``), so such a
    step never committed: a pull was not released once 127 locks were held, and a key with
    that many waiters could be neither released nor left. An entry left unguarded can only
    have been deleted meanwhile (a put is a change the range's guard sees), and a delete
    only frees: a step that did not write an entry and took it for present holds back at
    most what the step that deleted it served itself (a holder gone, a waiter ahead gone),
    or counts it in a position, never grants a key twice."""
    entries = [(k, kv) for _, kvs in read.ranges.values() for k, kv in kvs.items()]
    room = _MAX_OPS - len(read.keys) - len(read.ranges)
    if len(entries) <= room:
        return entries
    written = [(k, kv) for k, kv in entries if k in writes]
    others = [(k, kv) for k, kv in entries if k not in writes]
    return written + others[:max(room - len(written), 0)]


# --- answers given with a hold ----------------------------------------------------------------
def _told_in(value: bytes, token: int) -> Told | None:
    """The answers a stored lock's ``Told`` counts (see "Layout"), as the count of the hold
    with fencing token ``token``; ``None`` without one. One that does not read as a count
    (not written by this store: a hand edit, another program) counts an answer of someone
    unknown (``"?"``), who is never taken back: the hold stays, as the embedded store and
    Redis read a count they cannot read."""
    if b'"Told":' not in value:  # (a quote inside a JSON string is escaped: only the field)
        return None
    try:
        record = json.loads(value)
    except ValueError:
        return None  # (not a lock at all: read as unreadable, never as a hold)
    if not isinstance(record, dict) or "Told" not in record:
        return None
    told = record["Told"]
    tellers = told.get("Tellers") if isinstance(told, dict) else None
    if not isinstance(tellers, list) or not all(isinstance(t, str) for t in tellers):
        return Told(token, {"?"}, bool(told.get("Unheard")) if isinstance(told, dict) else False)
    return Told(token, set(tellers), bool(told.get("Unheard")))


def _with_told(value: bytes, told: Told) -> bytes:
    """``value``, a lock as :mod:`codec` writes it (a JSON object), with ``told`` as its
    ``Told`` field."""
    field = json.dumps({"Tellers": sorted(told.tellers), "Unheard": told.unheard},
                       separators=(",", ":"))
    return value[:-1] + b',"Told":' + field.encode() + b"}"


# --- tokens still to be resolved -------------------------------------------------------------
def _grants(answer: object) -> bool:
    """Whether a step's ``answer`` grants locks (what a caller that never heard it leaves
    held: :func:`_unheard`, ``GrantUnknown``)."""
    return isinstance(answer, Outcome) and answer.status is Status.GRANTED and bool(answer.locks)


def _unheard(answer: object) -> asyncio.CancelledError:
    """The cancellation a step whose caller went away raises once etcd answered its commit:
    with its answer when that is a grant (``GrantedUnheard``: the caller gives back what it
    granted, by its tokens); a waiter it queued is withdrawn by the caller's clean-up, and
    anything else needs no undoing."""
    if isinstance(answer, Outcome) and _grants(answer):
        return GrantedUnheard(answer)
    return asyncio.CancelledError()


def _resolve_lock(lock: Lock, revision: int) -> Lock:
    """A stored lock with a pending token gets its grant's revision (plus the floor)."""
    token = lock.fencing_token
    if token >= 0 or revision <= 0:
        return lock
    return replaced(lock, fencing_token=revision + (-token - 1))


def _resolve(value: Any, revision: int) -> Any:
    """``value`` with every pending token and waiter seq replaced now the step committed
    (what holds none is returned as it is).

    The usual values first, told by their exact type: a plain value, a lock, a tuple, one of
    the store's dataclasses (an acquire's answer is walked field by field); anything else by
    ``isinstance`` (a pydantic model's instance check costs about 1.5k instructions)."""
    if revision <= 0 or value is None:
        return value
    kind: Any = type(value)
    if kind in _PLAIN_TYPES:
        return value
    if kind is Lock:
        return _resolve_lock(value, revision)
    if kind is tuple or kind is list:
        return _resolved_items(value, revision, as_tuple=kind is tuple)
    shape = _shape(kind)
    if shape is None:
        if isinstance(value, _PLAIN):
            return value
        if isinstance(value, Lock):
            return _resolve_lock(value, revision)
        if isinstance(value, tuple | list):
            return _resolved_items(value, revision, as_tuple=isinstance(value, tuple))
        return value
    if isinstance(value, Waiter):
        if value.seq != _PENDING_SEQ:
            return value
        return _replaced(value, {"seq": revision}, shape)
    changes = {}
    for name in shape.names:
        old = getattr(value, name)
        if (old is None or type(old) in _PLAIN_TYPES or (type(old) is tuple and not old)
                or isinstance(old, _PLAIN)):
            continue
        new = _resolve(old, revision)
        if new is not old:
            changes[name] = new
    return _replaced(value, changes, shape) if changes else value


def _resolved_items(value: Any, revision: int, *, as_tuple: bool) -> Any:
    """A tuple or list resolved item by item (``value`` itself when none changed)."""
    items, changed = [], False
    for item in value:
        new = _resolve(item, revision)
        changed = changed or new is not item
        items.append(new)
    if not changed:
        return value
    return tuple(items) if as_tuple else items


_PLAIN = (str, int, float, bool, datetime, timedelta, enum.Enum)
_PLAIN_TYPES = frozenset((str, int, float, bool, datetime, timedelta))


class _Shape(NamedTuple):
    """A dataclass's fields, as :func:`_resolve` walks and copies it."""

    names: tuple[str, ...]
    direct: bool
    """Whether its generated ``__init__`` only sets the fields (every field taken by it, no
    ``__post_init__``): a copy then sets them itself (:func:`_replaced`)."""
    values: Callable[[Any], tuple[Any, ...]]
    """The fields' values of an instance, in the order of ``names``, read in one call."""


@functools.cache
def _shape(kind: type) -> _Shape | None:
    """``kind``'s fields if it is a dataclass (and not a plain value), else ``None``."""
    if not dataclasses.is_dataclass(kind) or issubclass(kind, _PLAIN):
        return None
    fields = dataclasses.fields(kind)
    init = kind.__dict__.get("__init__")
    names = tuple(f.name for f in fields)
    values: Callable[[Any], tuple[Any, ...]] = (
        operator.attrgetter(*names) if len(names) > 1  # (one name: the value, not a tuple)
        else lambda value: tuple(getattr(value, name) for name in names))
    return _Shape(names, direct=(
        not hasattr(kind, "__post_init__") and all(f.init for f in fields)
        and len(fields) == len(kind.__dataclass_fields__)
        # the __init__ dataclass made (one written in the class is left as it is)
        and getattr(getattr(init, "__code__", None), "co_filename", None) == "<string>"),
        values=values)


def _replaced(value: Any, changes: dict[str, Any], shape: _Shape) -> Any:
    """``dataclasses.replace(value, **changes)``: for a dataclass whose ``__init__`` only sets
    its fields, the fields set here as that ``__init__`` sets them (``dataclasses.replace``
    binds every field as a keyword of ``__init__``). Every field is copied in one pass of
    C calls (``map``), then the changes are set: an acquire's answer (15 fields) 25.4k
    instructions, against 31.0k a field at a time in Python (its whole resolve 66.7k against
    72.6k)."""
    if not shape.direct:
        return dataclasses.replace(value, **changes)
    copy = object.__new__(type(value))
    _drain(map(object.__setattr__, itertools.repeat(copy), shape.names, shape.values(value)))
    for name, new in changes.items():
        object.__setattr__(copy, name, new)
    return copy


_drain: Callable[[Iterable[Any]], None] = collections.deque(maxlen=0).extend
"""Runs an iterator to its end, keeping nothing (the ``map`` of :func:`_replaced`)."""


# --- protobuf requests -----------------------------------------------------------------------
def _kv(kv: Any) -> _KV:
    return _KV(bytes(kv.value), int(kv.mod_revision), int(kv.create_revision), int(kv.lease))


@functools.lru_cache(maxsize=1024)
def _count_op(key: bytes, range_end: bytes | None = None) -> Any:
    """A count of ``key`` (or of ``[key, range_end)``): no values read."""
    op = etcd3aio.kv.KVService.txn_op_get(key, range_end=range_end)
    op.request_range.count_only = True
    return op


class _ReadOps(NamedTuple):
    """A read of keys and key ranges: in the order its ops are sent (and answered in)."""

    keys: tuple[bytes, ...]
    prefixes: tuple[bytes, ...]
    ops: tuple[Any, ...]


@functools.lru_cache(maxsize=1024)
def _read_ops_of(keys: tuple[bytes, ...], prefixes: tuple[bytes, ...]) -> _ReadOps:
    """The ops reading ``keys`` and the ranges of ``prefixes``, keys first, each sorted: made
    once per set of names (a step on a key sends the same reads each time: its commit's
    failure branch), as each op is (a request copies them)."""
    ordered_keys, ordered_prefixes = tuple(sorted(keys)), tuple(sorted(prefixes))
    ops = [_get_op(k) for k in ordered_keys]
    ops += [_page_op(p, _prefix_end(p)) for p in ordered_prefixes]
    return _ReadOps(ordered_keys, ordered_prefixes, tuple(ops))


class _Guarded(NamedTuple):
    """A guarded transaction's parts that depend only on the names it read (see
    :func:`_guarded_of`)."""

    template: Any
    """A ``TxnRequest`` with a guard per key and per range, in the order read (their
    revisions left 0), and the failure branch's reads."""
    keys: tuple[bytes, ...]
    prefixes: tuple[bytes, ...]
    """The order of the failure branch's reads (as :class:`_ReadOps`)."""


@functools.lru_cache(maxsize=1024)
def _guarded_of(keys: tuple[bytes, ...], prefixes: tuple[bytes, ...]) -> _Guarded:
    """The part of a commit over ``keys`` and the ranges of ``prefixes`` (in the order the
    step read them) that is the same at every commit of a step on them: a step on a key sends
    the same guards, only their revisions changed, and the same failure branch each time.
    Copied and its revisions filled in, it costs the process about a third less than the
    message built guard by guard (74.7k instructions an acquire's request built, serialized
    included, against 47.4k)."""
    template = _TxnRequest()
    guard = template.compare.add
    for k in keys:
        guard(result=_EQUAL, target=_MOD, key=k)
    for prefix in prefixes:
        guard(result=_LESS, target=_MOD, key=prefix, range_end=_prefix_end(prefix))
    ordered_keys, ordered_prefixes, reads = _read_ops_of(keys, prefixes)
    template.failure.extend(reads)
    return _Guarded(template, ordered_keys, ordered_prefixes)


def _guarded(read: _Reads, writes: dict[bytes, tuple[bytes, int] | None],
             ) -> tuple[Any, _Guarded]:
    """A commit's ``TxnRequest`` with its guards and its failure branch, the writes still to
    add: every key of ``read`` unchanged (``mod_revision`` equal), nothing in a range changed
    after the revision it was read at, and each of a range's entries unchanged
    (:func:`_entry_guards`); failing them, ``read``'s keys and ranges read again. Copied from
    the template of ``read``'s names (:func:`_guarded_of`), its revisions filled in."""
    shape = _guarded_of(tuple(read.keys), tuple(read.ranges))
    request = _TxnRequest()
    request.CopyFrom(shape.template)
    compare = request.compare
    place = 0
    for kv in read.keys.values():
        # (0 too, a key read absent: the revision is one of a oneof, and set it says which)
        compare[place].mod_revision = kv.mod
        place += 1
    for revision, _ in read.ranges.values():
        compare[place].mod_revision = revision + 1
        place += 1
    if any(kvs for _, kvs in read.ranges.values()):
        guard = compare.add
        for k, kv in _entry_guards(read, writes):
            guard(result=_EQUAL, target=_MOD, key=k, mod_revision=kv.mod)
    return request, shape


@functools.lru_cache(maxsize=1024)
def _page_op(start: bytes, range_end: bytes, revision: int = 0) -> Any:
    """A read of the first ``_PAGE`` keys of ``[start, range_end)`` (at ``revision``: 0, the
    newest)."""
    op = etcd3aio.kv.KVService.txn_op_get(start, range_end=range_end)
    op.request_range.limit = _PAGE
    op.request_range.revision = revision
    return op


@functools.lru_cache(maxsize=8192)
def _get_op(key: bytes, range_end: bytes | None = None) -> Any:
    """A read of ``key`` (or of ``[key, range_end)``): the same message each time (a request
    copies it), built once per key."""
    return etcd3aio.kv.KVService.txn_op_get(key, range_end=range_end)


def _put(put: Any, key: bytes, value: bytes, lease: int) -> None:
    """Fill a transaction's put in place (as ``KVService.txn_op_put`` builds it, without
    building a message to be copied into the request)."""
    put.key = key
    put.value = value
    if lease:
        put.lease = lease


def _lease_id() -> int:
    """A lease ID of this replica's choosing: positive (0 asks etcd to choose), from the
    system's randomness (replicas forked from one process share the ``random`` module's
    state), and alike to another lease's once in 2**62 draws."""
    return 1 + secrets.randbits(62)


def _lease_exists(error: grpc.aio.AioRpcError) -> bool:
    """etcd's answer to a grant of an ID that already has a lease."""
    return (error.code() is grpc.StatusCode.FAILED_PRECONDITION
            and "lease already exists" in (error.details() or ""))


def _lease_calls(client: etcd3aio.Etcd3Client) -> Any:
    """The client's lease calls; a client not connected (closed meanwhile) fails as a call
    that cannot reach etcd does (``EtcdConnectionError``: the caller's ``unavailable``)."""
    if client.lease is None:
        raise etcd3aio.EtcdConnectionError("the client is not connected")
    return client.lease


def _txn_call(connection: EtcdConnection, client: etcd3aio.Etcd3Client,
              request: Any, *, read: bool) -> Awaitable[Any]:
    """A step's transaction, through the client's gRPC method (``TxnCall``, on the route to
    the leader when there is one: ``EtcdConnection.transact``): ``KVService.txn`` with one
    attempt, without its request copy, its ``asyncio.timeout`` (the call's own gRPC deadline
    bounds it) and its error mapping (``unreachable`` maps gRPC's errors as it maps the
    library's). What is passed is the library's own: its channels and its auth token.
    ``read``: it writes nothing (only a read is sent again after a lost answer)."""
    return connection.transact(client, request, read=read)
