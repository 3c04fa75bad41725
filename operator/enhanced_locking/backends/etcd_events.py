"""Events across replicas on etcd: the event bus over the history of one etcd key.

Every replica writes its events to the one key ``{key-prefix}events`` and every replica
watches that key, so ``GET /v1/events`` on any replica shows every replica's events in one
order. Each write is a new revision of the cluster, and etcd keeps every revision until it is
compacted: the key's *history* is the log, its current value does not matter. An event's id
is ``<revision>-<index>`` (its write's revision and its place in that write), the id form the
other buses use, so ``Last-Event-ID`` resumes on any replica: the watch starts at a revision.

* ``publish`` is the shared one (:mod:`~enhanced_locking.backends.shared_events`): the outbox
  is written up to 10 ms later (``coalesce``), the events of those 10 ms in one idempotent
  write (:meth:`EtcdEventBus._put`: a write sent again after its answer was lost puts
  nothing twice). On a replica whose locks are in the same etcd, the events ride in the next
  lock step's transaction instead (``board``/``landed``, see ``EtcdBackend.carry``), tagged
  and guarded as the outbox's own writes in a transaction nested in the step's: a busy
  replica makes no consensus write of its own for them; the outbox writes only what no step
  took, and sends again under its tag what rode in a step whose answer was lost.
* Once someone follows the events (an SSE client), one watch per replica reads the key's
  history into the in-process ring the SSE stream serves from: first the writes of the last
  ``lookback`` revisions (at most ``capacity`` events are kept), then live. A client whose
  ``Last-Event-ID`` is older than what was loaded, or older than etcd's compaction, gets the
  ``gap`` event. A read of the key every ``WATCH_CHECK`` seconds backs the watch (its one
  member may be frozen): a write the watch has not brought by the next read starts it again,
  on another member (``_checked``).
* When etcd is unreachable the outbox keeps up to ``capacity`` events and writes them when etcd
  answers again (older ones are dropped and counted); the watch resumes at the revision after
  the last one it saw, so it misses nothing etcd still holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import Callable
from typing import Any

import etcd3aio
import grpc
from etcd3aio._protobuf import Compare, DeleteRangeRequest, RangeRequest, TxnRequest
from pydantic import TypeAdapter, ValidationError

from enhanced_locking.backends.etcd_connection import (
    ATTEMPT_TIMEOUT,
    WATCH_CHECK,
    EtcdConnection,
    EtcdSettings,
    Landing,
    Watch,
    kv_calls,
    leader_first,
    unary,
    watching,
)
from enhanced_locking.backends.outbox import RETRY_FIRST, RETRY_MAX
from enhanced_locking.backends.shared_events import Outgoing, SharedEventBus, _Write
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import parse_event_id
from enhanced_locking.types import BackendUnavailable, Event

__all__ = ["EtcdEventBus", "batch_json"]

log = logging.getLogger(__name__)

_BATCH = 200  # events per put: far below etcd's request size limit
_LOOKBACK = 100_000
_DOWN = (etcd3aio.EtcdError, grpc.RpcError, OSError, TimeoutError)
_RIDE = 50  # events riding in one lock transaction: keeps the transaction small
_LAST_INDEX = _BATCH  # above every index in a write: "after all of revision r"
_BATCH_JSON: TypeAdapter[list[Event]] = TypeAdapter(list[Event])
"""A write's value: the JSON list of its events (made by :func:`batch_json`, read by this)."""
_KV = etcd3aio.kv.KVService
_EQUAL, _VERSION, _VALUE = Compare.EQUAL, Compare.VERSION, Compare.VALUE
WRITER = "-writer/"
"""What follows the events key in a writer key's name (before the process's random id)."""


class _WentBack(Exception):
    """etcd's revision is below what the events watch had reached, or its cluster id is
    another (``revision``: etcd's now)."""

    def __init__(self, revision: int) -> None:
        super().__init__(revision)
        self.revision = revision


def _from(revision: int) -> tuple[int, int]:
    """The floor of a ring that holds every write from ``revision`` on: after all of the
    revision before it; ``(0, 0)`` from revision 1 (the whole history: etcd has no revision
    0). Before, the whole history's floor was ``0-200``, above ``0-0`` ("from the first event
    kept"): a reader with a bound (the SSE stream's) resuming from ``0-0`` was told a replay
    gap and followed from the newest event, and never saw the events the ring held."""
    return (revision - 1, _LAST_INDEX) if revision > 1 else (0, 0)


def batch_json(batch: list[Outgoing]) -> bytes:
    """A write's value: its events' JSON as one JSON list, ``_BATCH_JSON.dump_json`` of their
    models (a test holds the two to the same bytes), joined from each event's JSON, made once
    (:class:`Outgoing`): riders a step's transaction took and gave back are not made again."""
    return b"[" + b",".join([item.json() for item in batch]) + b"]"


class EtcdEventBus(SharedEventBus):
    """:class:`~enhanced_locking.events.EventBus` whose ring is fed by an etcd key's history."""

    name = "etcd"
    down = (*_DOWN, BackendUnavailable)
    """etcd away, or not let in yet: ``EtcdConnection.client()`` raises
    :class:`BackendUnavailable` when its first connect or its login fails (auth on)."""
    batch_limit = _BATCH
    coalesce = 0.01
    """Every write is a consensus write on every member: the events of 10 ms share one, so a
    busy replica writes its events at most about 100 times a second (other replicas and SSE
    followers see them up to 10 ms later; this replica's own subscribers at once)."""

    def __init__(
        self,
        connection: EtcdConnection,
        *,
        key: str,
        capacity: int = 10_000,
        lookback: int = _LOOKBACK,
        enabled: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__(where=connection.where, capacity=capacity, enabled=enabled)
        self.connection = connection
        self.key = key.encode()
        self.writer = f"{key}{WRITER}{secrets.token_hex(8)}".encode()
        """This process's writer key (``{key}-writer/{random}``): the tag of its last batch
        written, which makes its writes idempotent (:meth:`_put`). Never an event: the watch
        and the reads are of the events key alone."""
        self._known: bytes | None = None
        """The writer key's value as this process last knew it (``None``: absent)."""
        self._riding: _Write | None = None
        """The events riding in a lock step's transaction, and their tag (:meth:`board`)."""
        self.writes = 0
        """Transactions the outbox sent (tests and the bench read it)."""
        self.lookback = lookback
        self.key_watch = Watch(connection, "events", self.key, start=0,
                               filters=(etcd3aio.WatchFilter.NODELETE,))
        """The watch of the key: its ``next`` is one past the last write it delivered."""
        self._compacted = False
        self._began = (0, 0)
        """The revision when the watch began (:meth:`_begin`) and the key's newest write then
        (0: none): a floor never passes what the ring holds of that write."""
        self._generated = 0
        """The revision etcd was at when a resume last read it (:meth:`_reach`)."""
        self._cluster = 0
        """The id of the cluster the watch began on (:meth:`_begin`): another one (restored
        from a snapshot, or made anew) has a history of its own (:meth:`_restored`)."""
        self._elsewhere = asyncio.Event()
        """Set when an answer of the watch came from another history (:meth:`_answer`);
        :meth:`_checked` then raises :class:`_WentBack` with ``_elsewhere_at``."""
        self._elsewhere_at = 0

    @classmethod
    def from_config(cls, config: EnhancedLockingConfig, *,
                    enabled: Callable[[], bool] = lambda: True) -> EtcdEventBus:
        return cls(EtcdConnection(EtcdSettings.from_config(config)),
                   key=f"{config.etcd_key_prefix}events", enabled=enabled)

    # --- writing -----------------------------------------------------------------------------
    async def _write(self, batch: list[Outgoing]) -> None:
        await self._once(batch, self._put)

    async def _put(self, batch: list[Outgoing], tag: bytes) -> None:
        """``batch`` under ``tag`` (:meth:`SharedEventBus._once`).

        One transaction: if this replica's writer key still holds the tag of its last batch
        known written (``_known``; absent: not yet written), put the batch on the events key
        and the writer key to ``tag``; else read the writer key. A writer key that holds
        ``tag`` says an earlier attempt of this batch was applied and only its answer lost:
        done, no second copy. Anything else (another process wrote it, or a batch this one gave
        up on was applied after all) is taken as known and the write sent once more. An
        attempt applied late, after a later one, finds the writer key moved on and writes
        nothing. So the write may be sent again freely: as the reads are
        (:func:`leader_first`, attempts of ``ATTEMPT_TIMEOUT`` on the next member), not in one
        attempt of the call's whole time."""
        value = batch_json(batch)
        for _ in range(2):
            if await self._transact(value, tag):
                return
        raise etcd3aio.EtcdError(f"the events writer key {self.writer.decode()} changed under "
                                 "this replica twice")

    async def _transact(self, value: bytes, tag: bytes) -> bool:
        """One idempotent write (see :meth:`_put`): whether the batch is in the log."""
        known = self._known
        compare = (_KV.txn_compare_version(self.writer, 0) if known is None
                   else _KV.txn_compare_value(self.writer, known))
        success = [_KV.txn_op_put(self.key, value), _KV.txn_op_put(self.writer, tag)]
        failure = [_KV.txn_op_get(self.writer)]
        self.writes += 1
        answer = await leader_first(self.connection, unary(kv_calls, "Txn", TxnRequest(
            compare=[compare], success=success, failure=failure)))
        if not answer.succeeded:
            kvs = answer.responses[0].response_range.kvs
            now = bytes(kvs[0].value) if kvs else None
            if now != tag:
                self._known = now
                return False
        self._known = tag
        return True

    async def _get(self, **options: Any) -> Any:
        """A read of the events key, sent as the store's reads are (:func:`leader_first`: on
        the balanced channel in attempts of their own, so a frozen member costs an attempt,
        not the call)."""
        return await leader_first(self.connection, unary(
            kv_calls, "Range", RangeRequest(key=self.key, **options)))

    async def _disconnect(self) -> None:
        if self._known is not None:  # the writer key goes with its process (best effort)
            with contextlib.suppress(*_DOWN, BackendUnavailable):
                client = await self.connection.client()
                await unary(kv_calls, "DeleteRange", DeleteRangeRequest(key=self.writer))(
                    client, ATTEMPT_TIMEOUT)
        await self.connection.close()

    # --- reading -----------------------------------------------------------------------------
    async def _begin(self) -> int:
        """Where the first watch starts; the revision of the newest write to load (0: none)."""
        answer = await self._get()
        revision = int(answer.header.revision)
        self._cluster = int(answer.header.cluster_id)
        self.key_watch.next = max(1, revision - self.lookback + 1)
        self._floor = _from(self.key_watch.next)  # older writes are not loaded
        newest = int(answer.kvs[0].mod_revision) if answer.kvs else 0
        self._began = (revision, newest)
        if 0 < newest < self.key_watch.next:
            # Written last before the lookback (a quiet stretch; a shared or compacting
            # etcd): the answer holds that write, the newest there is: into the ring, and
            # nothing after it is missing (a resume from it gets no gap).
            self._take(newest, bytes(answer.kvs[0].value))
            self._floor = self._capped(self._floor)
        try:  # is the start compacted away? then the watch's first word is the compaction
            await self._get(revision=self.key_watch.next, count_only=True)
        except (etcd3aio.EtcdError, grpc.RpcError) as error:
            if "compacted" not in str(error):
                raise
            self._compacted = True
        return newest if newest >= self.key_watch.next else 0

    def _capped(self, floor: tuple[int, int]) -> tuple[int, int]:
        """``floor`` no later than just before the key's newest write when the watch began,
        once the ring has that write (:meth:`_begin` took it in): etcd keeps a key's newest
        write through any compaction, so nothing after it is missing."""
        newest = self._began[1]
        if newest and self._last[0] >= newest:
            return min(floor, _from(newest))
        return floor

    async def _read(self) -> None:
        """The watch, from where :meth:`_begin` found it starts, for good: a break is the
        watch's own to mend (:meth:`Watch.follow`: from the revision after the last write it
        delivered, on the next member); a watch that is behind (:meth:`_checked`) is moved on
        to the next member here. A start that fails (etcd away) is tried again, backing
        off."""
        backoff = RETRY_FIRST
        newest = -1
        while True:
            try:
                client = await self.connection.client()
                if newest < 0:
                    newest = await self._begin()
                backoff = RETRY_FIRST
                deliver = functools.partial(self._answer, newest=newest)
                while True:
                    await watching(self.key_watch.follow(client, deliver), self._checked)
                    client = await self.key_watch.moved()  # it was behind: on the next member
            except asyncio.CancelledError:
                raise
            except _WentBack as back:
                log.warning("etcd %s: the cluster's revision went back to %d from at least %d, "
                            "or its id changed (restored from a snapshot?): the events' "
                            "readers are told a gap and the new history is followed",
                            self.connection.where, back.revision, self.key_watch.next - 1)
                self._restored()
                newest = -1
            except Exception as error:
                log.warning("etcd %s: the events watch could not start (%s); trying again",
                            self.connection.where, type(error).__name__)
                await asyncio.sleep(backoff)
                backoff = min(RETRY_MAX, backoff * 2)

    def _answer(self, answer: Any, newest: int) -> None:
        """An answer of the watch: its writes into the ring (``newest``: the newest write
        there was when the watch began, 0 if none).

        An answer from another cluster (its id: etcd made anew, or restored under another
        cluster token, at the same endpoints, the watch opened there again after its stream
        broke) is of another history: nothing of it is delivered, and :meth:`_checked` is
        told at once. Before, only the read every ``WATCH_CHECK`` seconds looked: the writes
        the other cluster made meanwhile (an event the outbox wrote again there, its first
        answer lost with the old cluster) reached the readers as if the old history went on,
        before its gap. (A revision below the watch's in an answer's header is not taken for
        a restore: a member that lags, which the watch may move to, answers so; the check's
        read, linearizable, tells.)"""
        header = answer.header
        if int(header.cluster_id) != self._cluster:
            self._elsewhere_at = int(header.revision)
            self._elsewhere.set()
            return
        if answer.compact_revision:
            # What the watch asked for is gone: it resumes at the oldest revision kept.
            log.warning("etcd %s compacted the events up to revision %d",
                        self.connection.where, answer.compact_revision)
            floor = _from(self.key_watch.next)
            if answer.compact_revision <= self._began[0] + 1:
                floor = self._capped(floor)  # all it took was written before the watch began
            if floor > self._floor:
                # Readers following from before it may have missed writes it took: they are
                # told (the gap, ``EventBus.follow``) now, not at the next event. A restore
                # with --bump-revision and --mark-compacted answers so, past all of the old
                # history.
                self._floor = floor
                self._wake()
            self._compacted = False
            return
        self.key_watch.each(answer, lambda event: self._take(int(event.kv.mod_revision),
                                                             bytes(event.kv.value)))
        if newest < self.key_watch.next and not self._compacted:
            # The watch runs (past any compaction) and has delivered the newest write there
            # was when it began, if any: the history is loaded.
            self._loaded.set()
        if answer.events:
            self._wake()

    async def _checked(self, watch: asyncio.Future[None]) -> None:
        """Read the key's newest write every ``WATCH_CHECK`` seconds while ``watch`` runs;
        return (the watch is started again, from where it is, on another member:
        ``Watch.moved``) once the watch has not brought, by a check, a write the check
        before found.

        A watch is one stream to one member. Frozen (SIGSTOP: its connections stay open),
        that member sent nothing until it thawed, and the ring, so every SSE stream of this
        replica, this replica's own events included, stood still as long. Started again, the
        watch delivers from the revision after the last write it delivered: nothing is
        missed or delivered twice. A write the check finds a moment before a watch that
        keeps up brings it costs nothing. (A watch never ends by itself: its breaks are its
        own to mend; should it end, its failure is raised.)"""
        behind = 0  # the newest write the last check found that the watch had not brought
        elsewhere: asyncio.Future[Any] = asyncio.ensure_future(self._elsewhere.wait())
        # (set by :meth:`_answer`)
        try:
            while True:
                done, _ = await asyncio.wait((watch, elsewhere), timeout=WATCH_CHECK,
                                             return_when=asyncio.FIRST_COMPLETED)
                if elsewhere in done:
                    raise _WentBack(self._elsewhere_at)
                if done:
                    watch.result()
                    raise etcd3aio.EtcdError("the events watch ended")
                try:
                    answer = await self._get()
                except (*_DOWN, BackendUnavailable):
                    continue  # tried again at the next check
                if (int(answer.header.revision) < self.key_watch.next - 1
                        or int(answer.header.cluster_id) != self._cluster):
                    raise _WentBack(int(answer.header.revision))
                if behind and self.key_watch.next <= behind:
                    log.warning("etcd %s: the events watch is behind (its member may be "
                                "frozen); watching again from revision %d",
                                self.connection.where, self.key_watch.next)
                    return
                newest = int(answer.kvs[0].mod_revision) if answer.kvs else 0
                behind = newest if newest >= self.key_watch.next else 0
        finally:
            elsewhere.cancel()

    def _restored(self) -> None:
        """etcd's revision went back, or its cluster id changed (restored from a snapshot,
        made anew): the ring's events are of a history etcd no longer has, numbered as the
        new one is. Each reader following hears a ``gap`` (and its stream ends); the ring
        starts again from the new history (:meth:`_begin`), and a reader resuming from an id
        of the old one, above what etcd has reached, gets a gap (:meth:`_unknown`). Before,
        the watch resumed at a revision the restored cluster had not reached, and readers
        heard nothing until it did."""
        self._hole = None
        self._holes += 1  # followers: what they had, then the gap (``EventBus.follow``)
        self._elsewhere.clear()
        self._loaded.clear()  # a resume waits for the new history (:meth:`_answer` sets it)
        self._ring.clear()
        self._last = self._floor = (0, 0)
        self._generated = 0
        self._began = (0, 0)
        self._compacted = False
        self._wake()

    async def _revision_now(self) -> int:
        return int((await self._get(count_only=True)).header.revision)

    # --- riding in the store's transactions (``etcd_connection.Passenger``) ------------------
    def board(self, success: Any) -> bool:
        """The outbox's oldest events, to ride in a lock step's transaction: a replica busy
        locking writes its events in the transactions it sends anyway (no consensus write of
        their own); the outbox writes what no transaction took within ``coalesce``. Their
        transaction is added to ``success``, the step's success branch, and filled in place
        (not built apart and copied in: an event's JSON is most of a request's bytes).

        They ride as the outbox's own writes go (:meth:`_transact`): under a tag of their own,
        in a transaction nested in the step's, which puts them and the tag in the writer key
        only if the writer key holds the tag last known written. A step whose answer is lost
        leaves them to the outbox as a write that may have been applied (``_unsure``): sent
        again under that tag, they are not written twice. Until then no step takes events."""
        if self._unsure is not None:
            return False
        batch = self._outbox.lend(_RIDE)
        if not batch:
            return False
        self._riding = _Write(secrets.token_hex(8).encode(), batch)
        ride = success.add().request_txn
        guard = ride.compare.add()
        guard.key, guard.result = self.writer, _EQUAL
        if self._known is None:
            guard.target, guard.version = _VERSION, 0
        else:
            guard.target, guard.value = _VALUE, self._known
        for key, value in ((self.key, batch_json(batch)),
                           (self.writer, self._riding.tag)):
            put = ride.success.add().request_put
            put.key, put.value = key, value
        return True

    def landed(self, landing: Landing, *, succeeded: bool = False) -> None:
        ride, self._riding = self._riding, None
        assert ride is not None, "landed without boarding"
        if landing is Landing.UNKNOWN:
            self._unsure = ride  # (the outbox sends it again under its tag)
        elif succeeded:
            self._known = ride.tag
        self._outbox.repaid(written=succeeded)

    def _take(self, revision: int, value: bytes) -> None:
        try:
            batch = _BATCH_JSON.validate_json(value)
        except ValidationError:
            log.warning("skipping unreadable events at revision %d of %s", revision,
                        self.key.decode())
            return
        for index, event in enumerate(batch):
            self._ring.append(event.model_copy(update={"id": f"{revision}-{index}"}))
            self._last = (revision, index)

    async def _reach(self, mark: tuple[int, int]) -> None:
        """A resume point after what the watch delivered may be a write it has not brought
        yet, or a revision this etcd never reached (an id of another event store: the
        in-process bus's and a Redis stream's are milliseconds since the epoch; or of
        another etcd): the revision now is read (:meth:`_unknown` tells the two apart)."""
        if mark[0] > self._last[0]:
            now = await self._now()
            self._generated = max(self._generated,
                                  parse_event_id(now)[0] if now is not None else 0)

    def _unknown(self, mark: tuple[int, int]) -> bool:
        # An id here is a revision and a place in its write: "after all of revision r" is
        # ``r-{_LAST_INDEX}``, no event's id; and the watch may be behind another replica's.
        # Only a revision etcd had not reached when last read (:meth:`_reach`) is no event
        # of this log: followed from there, the stream would stay silent until the
        # revisions passed it.
        return self._loaded.is_set() and mark[0] > max(self._generated, self._last[0])

    async def _resume_from(self) -> str | None:
        # "New" is what etcd writes after now, not what the watch has not loaded yet.
        return f"{await self._revision_now()}-{_LAST_INDEX}"
