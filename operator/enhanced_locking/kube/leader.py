"""Which replica writes the LockMigration's status and drives its rollout: a Lease.

Every replica running ``enhanced-locking operator`` applies the bound CRs to its own service, so
every replica routes by the same weight. Only one of them may *decide* (advance a step, abort on
a failed analysis) and write the status, or two would race each other's writes. That one holds
a ``coordination.k8s.io/v1`` Lease, as client-go's leader election does:

* the holder renews ``renewTime`` every ``retry`` seconds; if it cannot renew for ``deadline``
  seconds it stops acting as the holder (before anyone else may take over);
* the others read the Lease every ``retry`` seconds and take it over once its record has not
  changed for ``duration`` seconds *on their own clock* (so clocks of different pods never
  need to agree: only the time since the record last changed matters);
* writes carry the record's ``resourceVersion``: two replicas racing for an expired Lease
  cannot both win; the API server refuses the second with a conflict;
* a replica that stops cleanly hands the Lease over at once (``leaseDurationSeconds: 1``),
  also one past its renew deadline that the Lease still names.

With one replica (the Helm chart's setting) no Lease is needed: :class:`SoleWriter` always
writes. The Lease is used with ``--leader-election``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

__all__ = ["LeaseApi", "LeaseElection", "SoleWriter", "StatusWriter"]

log = logging.getLogger(__name__)


class StatusWriter(Protocol):
    """Whether this replica writes the status now."""

    @property
    def writes(self) -> bool: ...

    @property
    def term(self) -> int:
        """A number that changes each time this replica becomes the writer."""
        ...


class SoleWriter:
    """The only replica: it always writes."""

    writes = True
    term = 1


class LeaseApi(Protocol):
    """The Lease calls the election makes; conflicts come back as None."""

    async def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        ...

    async def replace_lease(
        self, namespace: str, name: str, body: dict[str, Any]
    ) -> dict[str, Any] | None: ...


def _micro_time(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElection:
    """Hold (or wait for) the Lease ``namespace/name`` as ``identity``; run :meth:`run`."""

    def __init__(
        self,
        api: LeaseApi,
        *,
        namespace: str,
        name: str,
        identity: str,
        duration: float = 15.0,
        deadline: float = 10.0,
        retry: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not retry < deadline < duration:
            raise ValueError("leader election needs retry < deadline < duration")
        self.api = api
        self.namespace, self.name, self.identity = namespace, name, identity
        self.duration, self.deadline, self.retry = duration, deadline, retry
        self._clock, self._wall = clock, wall
        self._observed: tuple[str | None, float] | None = None  # (resourceVersion, seen at)
        self._renewed: float | None = None  # when this replica last wrote the Lease as holder
        self._term = 0
        self.holder: str | None = None

    @property
    def writes(self) -> bool:
        """Holding the Lease, renewed less than ``deadline`` ago."""
        return self._renewed is not None and self._clock() - self._renewed < self.deadline

    @property
    def term(self) -> int:
        return self._term

    async def run(self) -> None:
        """Try to acquire or renew every ``retry`` seconds, until cancelled."""
        while True:
            try:
                await self.round()
            except Exception as error:  # the API may be away: try again next round
                log.warning("leader election on Lease %s/%s: %s", self.namespace, self.name,
                            error)
            await asyncio.sleep(self.retry)

    async def round(self) -> bool:
        """One attempt; whether this replica holds the Lease afterwards."""
        was = self.writes
        now = self._clock()
        found = await self.api.read_lease(self.namespace, self.name)
        if found is None:
            created = await self.api.create_lease(self.namespace, self._body(None, 0, None))
            self._took(created, was, now)
            return self.writes
        spec = found.get("spec") or {}
        version = (found.get("metadata") or {}).get("resourceVersion")
        holder = spec.get("holderIdentity") or None
        self.holder = holder
        if self._observed is None or self._observed[0] != version:
            self._observed = (version, now)
        if holder != self.identity:
            self._renewed = None
            lease = float(spec.get("leaseDurationSeconds") or self.duration)
            if holder and now - self._observed[1] < lease:
                if was:
                    log.warning("lost the Lease %s/%s to %s", self.namespace, self.name, holder)
                return False
        transitions = int(spec.get("leaseTransitions") or 0)
        acquired = spec.get("acquireTime") if holder == self.identity else None
        if holder != self.identity:
            transitions += 1
        body = self._body(found.get("metadata"), transitions, acquired)
        replaced = await self.api.replace_lease(self.namespace, self.name, body)
        self._took(replaced, was, now)
        return self.writes

    def _took(self, written: dict[str, Any] | None, was: bool, now: float) -> None:
        if written is None:  # someone else wrote first: read again next round
            self._renewed = None
            return
        self._renewed = now
        self.holder = self.identity
        self._observed = ((written.get("metadata") or {}).get("resourceVersion"), now)
        if not was:
            self._term += 1
            log.info("holding the Lease %s/%s: this replica writes the status", self.namespace,
                     self.name)

    def _body(self, metadata: dict[str, Any] | None, transitions: int,
              acquired: str | None) -> dict[str, Any]:
        now = _micro_time(self._wall())
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if metadata and metadata.get("resourceVersion"):
            meta["resourceVersion"] = metadata["resourceVersion"]
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self.duration)),
                "acquireTime": acquired or now,
                "renewTime": now,
                "leaseTransitions": transitions,
            },
        }

    async def release(self) -> None:
        """Hand the Lease over at once (a clean stop): others may take it at their next read.

        Whether or not this replica still writes: one that could not renew for ``deadline``
        seconds (the API server away, a stalled loop) stopped writing, but while the Lease
        names it the others would wait for it to run out."""
        if self.holder != self.identity:  # it never held the Lease, or saw another take it
            return
        self._renewed = None
        with contextlib.suppress(Exception):
            found = await self.api.read_lease(self.namespace, self.name)
            if found and (found.get("spec") or {}).get("holderIdentity") == self.identity:
                spec = dict(found["spec"])
                spec.update(leaseDurationSeconds=1, holderIdentity=None,
                            renewTime=_micro_time(self._wall()))
                await self.api.replace_lease(self.namespace, self.name,
                                             {**found, "spec": spec})
