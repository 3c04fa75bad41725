"""Shadow (validation) mode: legacy decides, the enhanced store replays, and we compare.

In ``migration-mode: shadow`` every key is decided by legacy (the authoritative side). Each
answer is then replayed, off the request path, against the enhanced backend kind in its own
``shadow`` namespace, which no real request ever reads. The two outcomes (granted or refused,
and by which pull the key is held) are compared; a difference is counted
(``enhanced_locking_shadow_discrepancies`` and :class:`ShadowStats`), logged, and published as
a ``shadow-mismatch`` event carrying both answers. This is GitHub Scientist's idea applied to
locks: run the candidate next to the control and publish the differences.

The replay never delays or changes the authoritative answer: the request path only puts a job
on a bounded queue (a full queue drops the job and counts it) and one background task replays
the jobs in order, swallowing (and counting) its errors.

Sampling (``shadow-sample-ratio``) is sticky per key, by a hash independent from the routing
bucket, so an acquire and its release are always both replayed or both skipped. When shadow
mode starts (or the sampling or store changes) the shadow namespace is emptied and seeded with
legacy's current holds of the sampled keys, so a comparison starts from the same state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from enhanced_locking.backends.base import Backend
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import Bus
from enhanced_locking.hashing import BUCKETS
from enhanced_locking.metrics import Metrics, ShadowKind
from enhanced_locking.types import (
    AcquireResult,
    Lock,
    LockNotOwned,
    LockRequest,
    Reason,
    utcnow,
)

__all__ = ["Answer", "ShadowReplayer", "ShadowStats", "ShadowStatus", "sample_bucket"]

log = logging.getLogger(__name__)

Holder = tuple[str, int]


def sample_bucket(key: str) -> int:
    """The key's sampling bucket in ``0..BUCKETS-1``, independent from its routing bucket."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"shadow-sample").digest()
    return int.from_bytes(digest, "big") % BUCKETS


_sample = functools.lru_cache(maxsize=1 << 16)(sample_bucket)


def shadow_active(config: EnhancedLockingConfig) -> bool:
    return (config.enabled and config.migration_mode == "shadow"
            and config.shadow_sample_ratio > 0)


class Answer(NamedTuple):
    """An outcome reduced to what both sides can be compared on."""

    granted: bool
    holder: Holder | None = None

    @classmethod
    def of_lock(cls, granted: bool, lock: Lock | None) -> Answer:
        if lock is None:
            return cls(granted)
        return cls(granted, (lock.project.repo_full_name, lock.pull.num))

    def as_dict(self) -> dict[str, Any]:
        holder = None if self.holder is None else {"repo": self.holder[0],
                                                    "pull": self.holder[1]}
        return {"granted": self.granted, "holder": holder}


class _Acquire(NamedTuple):
    request: LockRequest
    result: AcquireResult


class _Release(NamedTuple):
    key: str
    owner: Holder | None
    released: Lock | None
    not_owned_by: Lock | None


class _ReleaseByPull(NamedTuple):
    repo: str
    pull: int
    released: list[Lock]


class _Seed(NamedTuple):
    source: Backend


_Job = _Acquire | _Release | _ReleaseByPull | _Seed


@dataclass
class ShadowStats:
    """Counters since the process started (the operator diffs them over its window)."""

    replayed: int = 0
    matched: int = 0
    mismatches: int = 0
    dropped: int = 0
    errors: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ShadowStatus:
    """Shadow replay as the migration status shows it: whether it runs, and its counters."""

    active: bool
    sample_ratio: float
    queued: int
    replayed: int
    matched: int
    mismatches: int
    dropped: int
    errors: int
    mismatches_by_kind: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {"active": self.active, "sampleRatio": self.sample_ratio, "queued": self.queued,
                "replayed": self.replayed, "matched": self.matched,
                "mismatches": self.mismatches, "dropped": self.dropped, "errors": self.errors,
                "mismatchesByKind": dict(self.mismatches_by_kind)}


class ShadowReplayer:
    """Replays sampled lock operations on the shadow store and compares the answers."""

    def __init__(
        self,
        *,
        build: Callable[[EnhancedLockingConfig], Backend],
        identity: Callable[[EnhancedLockingConfig], tuple[Any, ...]],
        authoritative: Callable[[], Backend],
        events: Bus,
        metrics: Metrics,
    ) -> None:
        self._build = build
        self._identity = identity
        self._authoritative = authoritative
        self.events = events
        self.metrics = metrics
        self.stats = ShadowStats()
        self.backend: Backend | None = None
        self._backend_identity: tuple[Any, ...] | None = None
        self._ratio = 0.0
        self._cut = 0
        # The queue: the request path only appends (and wakes the worker if it sleeps).
        self._jobs: collections.deque[_Job] = collections.deque()
        self._limit = 0
        self._active = False
        self._idle = True
        self._ready = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._worker: asyncio.Task[None] | None = None
        self._retired: list[Backend] = []

    # --- state ---------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._active

    def sampled(self, key: str) -> bool:
        return _sample(key) < self._cut

    def queued(self) -> int:
        return len(self._jobs)

    def status(self) -> ShadowStatus:
        stats = self.stats
        return ShadowStatus(active=self.active, sample_ratio=self._ratio, queued=self.queued(),
                            replayed=stats.replayed, matched=stats.matched,
                            mismatches=stats.mismatches, dropped=stats.dropped,
                            errors=stats.errors, mismatches_by_kind=dict(stats.by_kind))

    async def configure(self, config: EnhancedLockingConfig) -> None:
        """Follow the config: start, re-seed or stop replaying (called on every new snapshot)."""
        if not shadow_active(config):
            await self.stop()
            return
        identity = self._identity(config)
        changed = identity != self._backend_identity or config.shadow_sample_ratio != self._ratio
        if self.backend is None or identity != self._backend_identity:
            if self.backend is not None:
                self._retired.append(self.backend)
            self.backend = self._build(config)
            self._backend_identity = identity
        self._ratio = config.shadow_sample_ratio
        self._cut = round(self._ratio * BUCKETS)
        self._limit = config.shadow_queue_size
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work())
            changed = True
        self._active = True
        if changed:
            # Never dropped, even behind a full queue: the replays after it compare against the
            # state it makes (a dropped one leaves the old namespace in place, so every later
            # comparison of its keys could be a mismatch that is no difference of the stores).
            self._offer(_Seed(self._authoritative()), always=True)

    async def stop(self) -> None:
        self._active = False
        await self._stop_worker()
        self._jobs.clear()
        self._idle = True
        self._drained.set()
        backends, self._retired = [*self._retired, self.backend], []
        self.backend, self._backend_identity, self._ratio, self._cut = None, None, 0.0, 0
        for backend in backends:
            if backend is not None:
                with contextlib.suppress(Exception):
                    await backend.close()

    async def _stop_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    async def drain(self) -> None:
        """Until every job queued so far has been replayed (for tests and benchmarks)."""
        if self._jobs or not self._idle:
            self._drained.clear()
            await self._drained.wait()

    # --- the request path: a sampling check and an append -------------------------------
    def after_acquire(self, request: LockRequest, result: AcquireResult) -> None:
        if self._active and _sample(request.key) < self._cut:
            self._offer(_Acquire(request, result))

    def after_release(self, key: str, owner: Holder | None, *, released: Lock | None,
                      not_owned_by: Lock | None = None) -> None:
        if self._active and _sample(key) < self._cut:
            self._offer(_Release(key, owner, released, not_owned_by))

    def after_release_by_pull(self, repo: str, pull: int, released: list[Lock]) -> None:
        if self._active:
            self._offer(_ReleaseByPull(repo, pull, released))

    def _offer(self, job: _Job, *, always: bool = False) -> None:
        if len(self._jobs) >= self._limit and not always:
            self.stats.dropped += 1
            self.metrics.shadow_replayed("dropped")
            return
        self._jobs.append(job)
        if self._idle:
            self._idle = False
            self._ready.set()

    # --- the background replay -----------------------------------------------------------
    async def _work(self) -> None:
        while True:
            if self._retired:  # replaced stores: no replay uses them between two jobs
                await self._close_retired()
            if not self._jobs:
                self._idle = True
                self._drained.set()
                self._ready.clear()
                await self._ready.wait()
                continue
            job = self._jobs.popleft()
            try:
                if self.backend is not None:
                    await self._replay(self.backend, job)
            except Exception as error:
                self.stats.errors += 1
                self.metrics.shadow_replayed("error")
                log.debug("shadow replay failed: %s", error)
            # Let requests that arrived meanwhile go first: an in-process store answers
            # without yielding, so a backlog would otherwise run back to back.
            await asyncio.sleep(0)

    async def _close_retired(self) -> None:
        while self._retired:
            try:
                await self._retired[0].close()
            except Exception as error:
                log.debug("closing a replaced shadow store failed: %s", error)
            # Taken out once closed: cancelled before that, stop() closes it.
            self._retired.pop(0)

    async def _replay(self, backend: Backend, job: _Job) -> None:
        if isinstance(job, _Seed):
            await self._seed(backend, job.source)
            return
        if isinstance(job, _Acquire):
            result = job.result
            if not result.acquired and result.reason is not Reason.HELD:
                return  # nothing was decided about the key (unavailable, timeout, ...)
            authoritative = Answer.of_lock(result.acquired,
                                           None if result.acquired else result.holder)
            asked = Lock.for_request(job.request.model_copy(update={"ttl": None}),
                                     now=utcnow(), token=0, backend="enhanced")
            granted, lock = await backend.acquire(asked)
            self._compare("acquire", job.request.key, job.request.project.repo_full_name,
                          authoritative, Answer.of_lock(granted, None if granted else lock))
        elif isinstance(job, _Release):
            if job.not_owned_by is not None:
                authoritative = Answer.of_lock(False, job.not_owned_by)
            else:
                authoritative = Answer.of_lock(job.released is not None, job.released)
            try:
                released = await backend.release(job.key, owner=job.owner)
                shadow = Answer.of_lock(released is not None, released)
            except LockNotOwned as error:
                shadow = Answer.of_lock(False, error.holder)
            repo = job.owner[0] if job.owner else None
            self._compare("release", job.key, repo, authoritative, shadow)
        else:
            expected = frozenset(lock.key for lock in job.released if self.sampled(lock.key))
            gone = await backend.release_by_pull(job.repo, job.pull)
            keys = frozenset(lock.key for lock in gone if self.sampled(lock.key))
            if keys == expected:
                self._matched()
            else:
                self._mismatch("release-by-pull", None, job.repo,
                               {"released": sorted(expected)}, {"released": sorted(keys)})

    async def _seed(self, backend: Backend, source: Backend) -> None:
        stale, _ = await backend.export()
        for lock in stale:
            await backend.release(lock.key)
        locks, tokens = await source.export()
        await backend.adopt([lock for lock in locks if self.sampled(lock.key)],
                            {key: token for key, token in tokens.items() if self.sampled(key)})

    def _compare(self, operation: Literal["acquire", "release"], key: str, repo: str | None,
                 authoritative: Answer, shadow: Answer) -> None:
        if authoritative == shadow:
            self._matched()
            return
        outcome = authoritative.granted != shadow.granted
        kind: ShadowKind
        if operation == "acquire":
            kind = "acquire-outcome" if outcome else "acquire-holder"
        else:
            kind = "release-outcome" if outcome else "release-holder"
        self._mismatch(kind, key, repo, authoritative.as_dict(), shadow.as_dict())

    def _matched(self) -> None:
        self.stats.replayed += 1
        self.stats.matched += 1
        self.metrics.shadow_replayed("matched")

    def _mismatch(self, kind: ShadowKind, key: str | None, repo: str | None,
                  authoritative: dict[str, Any], shadow: dict[str, Any]) -> None:
        self.stats.replayed += 1
        self.stats.mismatches += 1
        self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1
        self.metrics.shadow_mismatch(kind)
        log.warning("shadow mismatch (%s) on %s: legacy %s, enhanced %s", kind, key or repo,
                    authoritative, shadow)
        self.events.publish("shadow-mismatch", key=key, repo=repo, kind=kind,
                            authoritative=authoritative, shadow=shadow)
