"""The audit trail on etcd (see :mod:`~enhanced_locking.backends.audit_store`): a module of
its own, so a service that does not use etcd never loads etcd's client and gRPC."""

from __future__ import annotations

import heapq
import itertools
import secrets
from datetime import datetime
from typing import Any

from etcd3aio._protobuf import DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest

from enhanced_locking.backends.audit_store import (
    _ETCD_ID,
    _ETCD_LAST_MICROS,
    _SCAN_CHUNK,
    PRUNE_EVERY,
    AuditQuery,
    Retention,
    _handed_out,
    _micros,
    _prefix_end,
    _stored,
    entry_json,
)
from enhanced_locking.backends.etcd_connection import (
    CALL_TIMEOUT,
    EtcdConnection,
    kv_calls,
    leader_first,
    unary,
    unavailable,
)
from enhanced_locking.backends.outbox import Outbox
from enhanced_locking.types import AuditEntry, BackendUnavailable, utcnow

__all__ = ["EtcdAuditStore"]


class EtcdAuditStore:
    """One key per entry under ``{etcd-key-prefix}audit/``, shared by every replica.

    The key is ``audit/{time in µs, 16 digits}-{random}``, and its last part is the entry's id:
    keys sort by time (strictly rising within a replica), so pages are read newest first by
    key, ``before`` is a key bound, and the entries older than the retention are one range
    delete. The refusals' entries are under ``{etcd-key-prefix}audit-refusals/`` in the same
    way, pruned to ``audit-max-entries`` on their own (so they never push out the others); a
    read merges the two by id.

    Written behind, like the events: an entry joins an outbox and one task writes the entries
    of up to 10 ms in one transaction. The audited call never waits for etcd (a consensus
    write, which takes seconds while a leader is elected, would hold up the lock's answer);
    a read on this replica first waits, for as long as a call may take, until what it wrote
    is in. While etcd is away the outbox keeps up to ``capacity`` entries (older ones are
    dropped and counted in :attr:`dropped`); a replica killed outright loses the entries of
    its last 10 ms from the trail (they were written to stdout already).

    Its calls are sent as the event bus's are (:func:`leader_first`), each bounded by its
    gRPC deadline alone (:func:`unary`), so an answer that came while the event loop stalled
    is taken: a read on several members in attempts of its own, a write (the batch, the
    prune's deletes) with the call's whole time in one attempt. The library's calls added a
    timer on the loop: after such a stall a read's answer was lost (the read failed, 503),
    and so was a write's (the outbox wrote the batch again).
    """

    kind = "etcd"
    coalesce = 0.01
    batch_limit = 100  # puts in one transaction: below etcd's default --max-txn-ops (128)
    capacity = 10_000

    def __init__(self, connection: EtcdConnection, prefix: str, retention: Retention) -> None:
        self._connection = connection
        self._prefix = f"{prefix}audit/".encode()
        self._refusals = f"{prefix}audit-refusals/".encode()
        self._retention = retention
        self._appended = 0
        self._last = 0
        self._handed_out = ""  # the id new_id handed out last, not appended yet
        self._handed_out_at: datetime | None = None  # and the time it was handed out for
        self._outbox = Outbox[tuple[bytes, bytes]](
            self._write, what="audit entries", task_name="etcd-audit-write",
            down=(BackendUnavailable,), capacity=self.capacity, coalesce=self.coalesce,
            batch_limit=self.batch_limit)

    @property
    def dropped(self) -> int:
        """Entries lost because etcd stayed away longer than the outbox could hold them."""
        return self._outbox.dropped

    @property
    def waiting(self) -> int:
        return len(self._outbox)

    def _key_at(self, prefix: bytes, moment: datetime) -> bytes:
        """The key under ``prefix`` of ``moment``'s first entry; a time the key's 16 digits
        cannot write (before 1970, after 2286) is the first or last key they can."""
        micros = min(max(_micros(moment), 0), _ETCD_LAST_MICROS)
        return prefix + f"{micros:016d}".encode()

    def new_id(self, time: datetime) -> str:
        """The id of an entry of ``time``: its time in µs (later than the last one handed
        out) and a random part."""
        self._last = max(_micros(time), self._last + 1)
        self._handed_out = text = f"{self._last:016d}-{secrets.token_hex(4)}"
        self._handed_out_at = time
        return text

    async def append(self, entry: AuditEntry) -> AuditEntry:
        # (an id handed out for another time than the entry's would file it at that time)
        stored = entry if _handed_out(entry, self._handed_out) and (
            entry.__dict__["time"] == self._handed_out_at) else entry.with_id(
            self.new_id(entry.time))
        self._handed_out = ""
        prefix = self._refusals if stored.refusal else self._prefix
        self._outbox.put((prefix + stored.id.encode(), entry_json(stored).encode()))
        return stored

    async def _write(self, batch: list[tuple[bytes, bytes]]) -> None:
        puts = [RequestOp(request_put=PutRequest(key=key, value=value)) for key, value in batch]
        async with unavailable(self._connection, "audit write"):
            await leader_first(self._connection, unary(kv_calls, "Txn", TxnRequest(
                success=puts)), write=True)
            if self._appended % PRUNE_EVERY + len(batch) >= PRUNE_EVERY or not self._appended:
                for prefix in (self._prefix, self._refusals):
                    await self._prune(prefix)
        self._appended += len(batch)

    async def _prune(self, prefix: bytes) -> None:
        """The entries under ``prefix`` (one kind) past the retention's age and count."""
        await self._delete(prefix, self._key_at(prefix, utcnow() - self._retention.max_age))
        count = (await self._range(prefix, count_only=True)).count
        extra = int(count) - self._retention.max_entries
        if extra > 0:
            oldest = await self._range(prefix, limit=extra, keys_only=True,
                                       sort_order=RangeRequest.ASCEND,
                                       sort_target=RangeRequest.KEY)
            if oldest.kvs:
                await self._delete(prefix, bytes(oldest.kvs[-1].key) + b"\0")

    async def _range(self, prefix: bytes, low: bytes | None = None, high: bytes | None = None,
                     **options: Any) -> Any:
        """The keys under ``prefix`` from ``low`` (the first) up to ``high`` (past the last)."""
        return await leader_first(self._connection, unary(kv_calls, "Range", RangeRequest(
            key=low or prefix, range_end=high or _prefix_end(prefix), **options)))

    async def _delete(self, prefix: bytes, high: bytes) -> None:
        """The keys under ``prefix`` before the key ``high``."""
        await leader_first(self._connection, unary(kv_calls, "DeleteRange", DeleteRangeRequest(
            key=prefix, range_end=high)), write=True)

    async def read(self, query: AuditQuery) -> list[AuditEntry]:
        """The newest entries of both kinds that match, merged by id (the ids of both share
        one order: each one's time, then its random part)."""
        await self._outbox.drained(CALL_TIMEOUT)
        if query.before is not None and not _ETCD_ID.fullmatch(query.before):
            raise ValueError(f"not an etcd audit id: {query.before!r}")
        async with unavailable(self._connection, "audit read"):
            kinds = [await self._read(prefix, query) for prefix in (self._prefix,
                                                                     self._refusals)]
        merged = heapq.merge(*kinds, key=lambda entry: entry.id, reverse=True)
        return list(itertools.islice(merged, query.limit))

    async def _read(self, prefix: bytes, query: AuditQuery) -> list[AuditEntry]:
        """The newest entries under ``prefix`` (one kind) that match, newest first."""
        low = self._key_at(prefix, query.since) if query.since is not None else prefix
        high = self._key_at(prefix, query.until) if query.until is not None else _prefix_end(
            prefix)
        if query.before is not None:
            high = min(high, prefix + query.before.encode())
        found: list[AuditEntry] = []
        while len(found) < query.limit and low < high:
            answer = await self._range(prefix, low, high, limit=_SCAN_CHUNK,
                                       sort_order=RangeRequest.DESCEND,
                                       sort_target=RangeRequest.KEY)
            for kv in answer.kvs:
                entry = _stored(bytes(kv.value), entry_id=None,
                                where=bytes(kv.key).decode(errors="replace"))
                if entry is not None and query.matches(entry):
                    found.append(entry)
                    if len(found) == query.limit:
                        break
            if len(answer.kvs) < _SCAN_CHUNK:
                break
            high = bytes(answer.kvs[-1].key)
        return found

    async def close(self) -> None:
        await self._outbox.drained(2.0)
        await self._outbox.stop()
        await self._connection.close()
