"""The audit trail: every mutating call and every refusal, who, what, why, when and from where.

Each entry goes to three places: the active store (durable, bounded; see
:mod:`enhanced_locking.backends.audit_store`), stdout as one JSON line for log shippers
(``audit-stdout``), and, for administrative actions when the process runs as the operator, a
Kubernetes Event (a sink the operator adds). An entry holds an identity's name and groups,
never a credential: the access seam hands this module identities only.

``GET /v1/audit`` (the ``admin`` right) reads the trail newest first with filters and paging.
A store that does not answer never fails the call being audited: the entry still goes to
stdout and the failure is logged and counted (``enhanced_locking_audit_entries_lost_total``:
``refused`` when the store did not take it, ``dropped`` when a store that writes behind held
more than it can while its place refused writes).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from datetime import datetime
from typing import IO

from enhanced_locking.backends.audit_store import AuditQuery, AuditStore, entry_json
from enhanced_locking.types import AuditEntry, BackendUnavailable

__all__ = ["AuditSink", "AuditTrail", "Lost", "own_lock_call"]

log = logging.getLogger(__name__)

AuditSink = Callable[[AuditEntry], None]
"""Something more that hears each entry (the operator posts admin actions as Events)."""

Lost = Callable[[str, int], None]
"""Told of entries the store will not keep: the reason (``refused``, ``dropped``), how many."""

OWN_LOCK_CALLS = frozenset({("acquire", "acquired"), ("acquire-batch", "acquired"),
                            ("release", "released"), ("refresh", "refreshed")})
"""A pull's own lock calls that succeed, by action and outcome (with the ``lock`` verb and
status 200), which ``audit-own-locks=false`` leaves out of the trail; a batch release's outcome
counts what it freed (:func:`own_lock_call`)."""


def own_lock_call(*, verb: str, action: str, outcome: str, status: int) -> bool:
    """Whether an entry is of a pull's own lock call that succeeded: an acquire granted, the
    holder's release (one key or a batch, every key reached), a lease refreshed. Everything
    else (a refusal, a release by someone else, a force-unlock, a closed pull's release, a
    client gone) is not."""
    if verb != "lock" or status != 200:
        return False
    if action == "release-batch":
        return outcome.startswith("released ") and "not reached" not in outcome
    return (action, outcome) in OWN_LOCK_CALLS


class AuditTrail:
    """Records entries to the store, stdout and any sinks."""

    def __init__(
        self, store: AuditStore, *, enabled: Callable[[], bool] = lambda: True,
        stdout: Callable[[], bool] = lambda: True, stream: IO[str] | None = None,
        lost: Lost | None = None, own_locks: Callable[[], bool] = lambda: True,
    ) -> None:
        self.store = store
        self._lost = lost
        self._dropped = store.dropped
        self._enabled = enabled
        self._own_locks = own_locks
        self._stdout = stdout
        self._stream = stream
        self.sinks: list[AuditSink] = []
        self.failures = 0
        """Entries the store did not take (they still went to stdout)."""

    def keeps(self, *, verb: str, action: str, outcome: str, status: int) -> bool:
        """Whether an entry of these would be recorded (asked before one is made): the trail
        is on, and the entry is not of a pull's own lock call while ``audit-own-locks`` is
        off."""
        return self._enabled() and (
            self._own_locks()
            or not own_lock_call(verb=verb, action=action, outcome=outcome, status=status))

    def new_id(self, time: datetime) -> str:
        """The id of the entry of ``time`` about to be recorded, handed out by the store
        (:meth:`AuditStore.new_id`): the entry is built with it, not copied with it. A store
        that cannot hand one out now hands out none (``""``): its append meets the same
        trouble, where a store's refusal never fails the audited call (:meth:`record_kept`)."""
        try:
            return self.store.new_id(time)
        except BackendUnavailable:
            return ""

    async def record(self, entry: AuditEntry) -> None:
        if not self.keeps(verb=entry.verb, action=entry.action, outcome=entry.outcome,
                          status=entry.status):
            return
        await self.record_kept(entry)

    async def record_kept(self, entry: AuditEntry) -> None:
        """:meth:`record` of an entry whose maker asked :meth:`keeps` about it right before,
        nothing awaited between (``Caller.record``, on every audited call): the trail's
        settings are not read a second time for it."""
        try:
            entry = await self.store.append(entry)
        except BackendUnavailable as error:
            self.failures += 1
            log.error("audit entry not stored: %s", error)
            if self._lost is not None:
                self._lost("refused", 1)
        dropped = self.store.dropped  # a store that writes behind drops as it appends
        if dropped != self._dropped:
            if self._lost is not None:
                self._lost("dropped", dropped - self._dropped)
            self._dropped = dropped
        if self._stdout():
            stream = self._stream or sys.stdout
            stream.write('{"audit": ' + entry_json(entry) + "}\n")
            stream.flush()
        for sink in self.sinks:
            try:
                sink(entry)
            except Exception:  # a sink must never fail the audited call
                log.exception("audit sink failed")

    def waiting(self) -> int:
        """Entries the store has not written yet (it writes behind)."""
        return self.store.waiting

    async def read(self, query: AuditQuery) -> list[AuditEntry]:
        return await self.store.read(query)

    async def close(self) -> None:
        await self.store.close()
