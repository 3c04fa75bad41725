"""The rollout, driven: the state machine fed by the running service, and the status it shows.

:class:`RolloutDriver` sits between the reconciler and the service of this process. On the
replica that writes the status (:mod:`.leader`) it

* keeps the rollout state (:mod:`.rollout`), loaded from the status when it becomes the writer,
  and advances it on every reconcile and every tick of the rollout timer, with the weight move's
  progress (:mod:`enhanced_locking.migration.transition`) and the analysis (:mod:`.analysis`);
* builds the rollout's part of the status: phase, step, conditions (``Progressing``,
  ``Paused``, ``Completed``, ``Aborted``, ``Degraded``), counters carried over restarts, the
  weight move seen by this replica, the last analysis check.

On every replica it turns what the service finds (shadow mismatches, lock conflicts) into
Kubernetes Events, at most one of each kind per tick, with both answers or both holders.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.factory import LockService
from enhanced_locking.kube.analysis import Analyzer, Check, Totals, has_thresholds
from enhanced_locking.kube.leader import SoleWriter, StatusWriter
from enhanced_locking.kube.lockmigration import (
    PROMOTE_ANNOTATION,
    RETRY_ANNOTATION,
    AnalysisStatus,
    Counters,
    LockMigrationSpec,
    LockMigrationStatus,
    TransitionState,
    read_status,
    step_weight,
)
from enhanced_locking.kube.models import Condition, ConditionStatus
from enhanced_locking.kube.rollout import (
    ANALYSIS_FAILED,
    Note,
    Progress,
    RolloutState,
    advance,
)
from enhanced_locking.migration.conflicts import LockConflict
from enhanced_locking.migration.controller import MigrationStatus
from enhanced_locking.migration.transition import TransitionStatus, authority_weight
from enhanced_locking.types import Event

log = logging.getLogger(__name__)

__all__ = ["COUNTER_REFRESH", "RolloutDriver", "ServiceView", "live_view", "request_token"]

COUNTER_REFRESH = 2.0
"""Seconds between status writes made only because counters moved."""

ROLLOUT_CONDITIONS = ("Progressing", "Paused", "Completed", "Aborted", "Degraded")

SHADOW_NOTE = ("mode shadow: legacy decides every lock key and the enhanced locker only "
               "replays (0% routed to it); the weight takes effect with mode route")
"""Leads the rollout's message and conditions in shadow mode."""

OFF_NOTE = ("enhanced locking is off (the LockPolicy's enabled): every lock key goes to the "
            "legacy locker; the weight takes effect once it is on")
"""Leads the rollout's message and conditions while enhanced locking is off: no key moves."""


def _routing_note(config: EnhancedLockingConfig) -> str | None:
    """What the rollout's message must say first when its weight routes nothing."""
    if not config.enabled:
        return OFF_NOTE
    return SHADOW_NOTE if config.migration_mode == "shadow" else None


class ServiceView(Protocol):
    """What the driver reads from the service of this process."""

    @property
    def replica_id(self) -> str: ...

    def config(self) -> EnhancedLockingConfig: ...

    def migration(self) -> MigrationStatus:
        """``MigrationController.status()``: routing, shadow, fallback, conflicts."""
        ...

    def totals(self) -> Totals: ...

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]: ...


@dataclass
class _LiveView:
    service: LockService

    @property
    def replica_id(self) -> str:
        return self.service.replica_id

    def config(self) -> EnhancedLockingConfig:
        return self.service.provider.current.config

    def migration(self) -> MigrationStatus:
        return self.service.migration.status()

    def totals(self) -> Totals:
        tallies = self.service.metrics.tallies()
        stats = self.service.migration.shadow.stats
        return Totals(
            operations=tallies.enhanced_operations,
            errors=tallies.enhanced_errors,
            replayed=stats.replayed,
            mismatches=stats.mismatches,
            fallbacks=tallies.fallbacks,
        )

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        return self.service.events.subscribe(callback)


def live_view(service: LockService) -> ServiceView:
    """The view of a running :class:`LockService`."""
    return _LiveView(service)


def request_token(value: str | None) -> str | None:
    """An annotation's value as the status records it: itself when short, else a digest (an
    annotation may be far longer than a status field; the digest still tells values apart)."""
    if value is None or len(value) <= 64:
        return value
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:32]


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _wall() -> datetime:
    return datetime.now(UTC)


class RolloutDriver:
    """Advances the bound LockMigration's rollout and writes its part of the status."""

    def __init__(
        self,
        view: ServiceView,
        *,
        writer: StatusWriter | None = None,
        wall: Callable[[], datetime] = _wall,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.view = view
        self.writer: StatusWriter = writer or SoleWriter()
        self._wall = wall
        self._clock = clock
        self.analyzer = Analyzer(clock=clock)
        self.state: RolloutState | None = None
        self.progress: Progress | None = None
        self.check: Check | None = None
        self._checked_at = wall()
        self._term = -1
        self._uid: str | None = None
        self._carried = Totals()  # counters the status showed when this replica took over
        self._base = Totals()  # this process's totals at that moment
        self._published: tuple[float, Counters] | None = None
        self._findings: collections.deque[Note] = collections.deque(maxlen=256)
        self._told_waiting: str | None = None  # the promote last told to wait for spec.paused
        self._found: collections.Counter[str] = collections.Counter()
        self._unsubscribe = view.subscribe(self._on_event)

    def close(self) -> None:
        self._unsubscribe()

    @property
    def writes(self) -> bool:
        return self.writer.writes

    # --- the state ---------------------------------------------------------------------------
    def state_for(self, body: Mapping[str, Any] | None) -> RolloutState:
        """The rollout state in force: this writer's own, else what the status says.

        Its own only in the term it loaded it in (:meth:`_take_over`): a replica that lost
        the Lease and holds it again knew a step that another writer may have moved past
        since; until it takes the status over again, the status says where the rollout is."""
        if self.writes and self.state is not None and self._term == self.writer.term \
                and self._uid == _uid(body):
            return self.state
        return RolloutState.from_status(read_status((body or {}).get("status"))[0])

    def weight(self, body: Mapping[str, Any] | None) -> tuple[int, bool]:
        """``(step index, aborted)`` to build the config layer from."""
        state = self.state_for(body)
        return state.step_index, state.aborted

    def _take_over(self, body: Mapping[str, Any]) -> None:
        """Become the writer of this object: start from what its status says (what of it
        cannot be read is logged, and read as left out: see :func:`read_status`)."""
        status, problems = read_status(body.get("status"))
        if problems:
            meta = body.get("metadata") or {}
            log.warning("LockMigration %s/%s: status fields not read: %s",
                        meta.get("namespace"), meta.get("name"), "; ".join(problems))
        self.state = RolloutState.from_status(status)
        self._term, self._uid = self.writer.term, _uid(body)
        # A promote the status shows held back was told (PromoteWaiting) by the writer that
        # wrote it: not told again for a restart or a new writer.
        self._told_waiting = status.promote_waiting
        counters = status.counters or Counters()
        self._carried = Totals(counters.operations, counters.errors, counters.replayed,
                               counters.mismatches, counters.fallbacks)
        self._base = self.view.totals()
        analysis = status.analysis
        self.analyzer.reset(
            consecutive_failures=analysis.consecutive_failures if analysis is not None else 0)
        # A check this replica made when it last wrote the status is history (another writer
        # may have checked since): none is shown, nor Degraded from it, until its next check.
        self.check = None
        self._published = None

    def advance(self, spec: LockMigrationSpec, body: Mapping[str, Any]) -> Progress | None:
        """Take the rollout as far as it can go now (the writer only); None elsewhere."""
        if not self.writes:
            self.progress = None
            return None
        if self.state is None or self._term != self.writer.term or self._uid != _uid(body):
            self._take_over(body)
        assert self.state is not None
        annotations = (body.get("metadata") or {}).get("annotations") or {}
        # An aborted rollout is not judged (its samples still fill the window).
        analysis = None if self.state.aborted or spec.abort else spec.analysis
        if not has_thresholds(spec.analysis) and (self.check is not None
                                                  or self.analyzer.consecutive_failures):
            # The analysis was removed (the way to stop it): its last check no longer stands
            # (no Degraded from it), and an analysis added again counts its failures afresh.
            self.analyzer.reset()
            self.check = None
        check = self.analyzer.observe(self.view.totals(), analysis)
        if check is not None:
            self.check, self._checked_at = check, self._wall()
        failure = check.failure if check is not None and check.abort else None
        previous = self.progress
        progress = advance(
            spec, self.state, now=self._wall(), settled_weight=self._settled(),
            promote=request_token(annotations.get(PROMOTE_ANNOTATION)),
            retry=request_token(annotations.get(RETRY_ANNOTATION)), analysis_failure=failure,
        )
        if progress.state.aborted != self.state.aborted and not progress.state.aborted:
            self.analyzer.reset()  # a restarted rollout is judged afresh
            self.check = None
        self.state, self.progress = progress.state, progress
        status, _ = read_status(body.get("status"))
        # Whether it had completed: the Completed condition, not the phase, which shows
        # Degraded over it (a lock conflict) and so would tell a new writer it had not.
        completed = previous.phase == "Completed" if previous else any(
            c.type == "Completed" and c.status == "True" for c in status.conditions)
        if (drop := _steps_start_lower(spec, status)) is not None:
            progress.notes.append(drop)
        if progress.phase == "Completed" and not completed:
            progress.notes.append(Note("Normal", "RolloutCompleted", progress.message))
        if (waiting := progress.promote_waiting) is not None and waiting != self._told_waiting:
            # Written by hand, the annotation alone leaves spec.paused as it is: say so once.
            self._told_waiting = waiting
            progress.notes.append(Note("Normal", "PromoteWaiting", (
                f"{progress.message}: set spec.paused to false to let it through (kubectl "
                "locking rollout promote does both in one edit)")))
        return progress

    def _settled(self) -> float | None:
        """The weight that is the only authority on every live replica now (None: moving)."""
        config = self.view.config()
        routing = self.view.migration().routing
        if routing.phase != "stable" or routing.weight != authority_weight(config):
            return None
        return round(config.effective_weight, 2)

    # --- what the service found --------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        if event.type == "shadow-mismatch":
            details = event.details
            self._found["ShadowMismatch"] += 1
            if self._found["ShadowMismatch"] == 1:
                self._findings.append(Note("Warning", "ShadowMismatch", (
                    f"shadow mismatch ({details.get('kind')}) on {event.key or event.repo}: "
                    f"legacy answered {json.dumps(details.get('authoritative'))}, "
                    f"enhanced replayed {json.dumps(details.get('shadow'))}")))
        elif event.type == "lock-conflict":
            details = event.details
            self._findings.append(Note("Warning", "LockConflict", (
                f"lock {event.key} is held on legacy by "
                f"{json.dumps(details.get('legacyHolder'))} and on enhanced by "
                f"{json.dumps(details.get('enhancedHolder'))} (found by "
                f"{details.get('source')}); release the one that should not hold it")))

    def findings(self) -> list[Note]:
        """Events to post for what this replica's service found since the last call."""
        notes = list(self._findings)
        self._findings.clear()
        more = self._found["ShadowMismatch"] - 1
        if more > 0:
            notes.append(Note("Warning", "ShadowMismatch",
                              f"{more} more shadow mismatches (see the service's log and "
                              "GET /v1/events?type=shadow-mismatch&lastEventId=0-0)"))
        self._found.clear()
        return notes

    # --- the status --------------------------------------------------------------------------
    def status_fields(
        self, spec: LockMigrationSpec | None, previous: Mapping[str, Any], generation: int | None
    ) -> tuple[dict[str, Any], list[Condition]]:
        """The rollout's status fields and conditions (the writer's, with a spec)."""
        progress = self.progress
        shown, _ = read_status(previous)
        if spec is None or progress is None:
            return _kept(shown)
        migration = self.view.migration()
        conflicts = migration.conflicts
        routing = migration.routing
        degraded = self._degraded(progress, conflicts, routing)
        if (holding := _holding_back(routing)) is not None:
            # Whatever waits for the weight to settle waits for these replicas: name them.
            progress = replace(progress, message=f"{progress.message}; {holding}")
        if (note := _routing_note(self.view.config())) is not None:
            # The steps and the weight are applied, but legacy decides every key: say so
            # before anything that reads as keys being on (or moving to) the enhanced side.
            progress = replace(progress, message=f"{note}; {progress.message}")
        phase = progress.phase
        message = progress.message
        if degraded is not None and phase != "Aborted":
            phase, message = "Degraded", f"{degraded[1]}; {message}"
        fields: dict[str, Any] = {
            **progress.state.status_fields(spec.steps),
            "phase": phase,
            "message": message[:1024],
            "counters": self._counters(len(conflicts)),
            "transition": _transition(routing),
            "analysis": self._analysis(),
            "status_writer": self.view.replica_id,
            "promote_waiting": progress.promote_waiting,
        }
        conditions = self._conditions(progress, degraded, shown, generation)
        return fields, conditions

    def _counters(self, conflicts: int) -> Counters:
        now = self._clock()
        totals = self._carried + (self.view.totals() - self._base)
        fresh = Counters(mismatches=int(totals.mismatches), replayed=int(totals.replayed),
                         fallbacks=int(totals.fallbacks), errors=int(totals.errors),
                         operations=int(totals.operations), conflicts=conflicts)
        published = self._published
        if published is not None and now - published[0] < COUNTER_REFRESH \
                and published[1].conflicts == conflicts:
            return published[1]
        self._published = (now, fresh)
        return fresh

    def _analysis(self) -> AnalysisStatus | None:
        check = self.check
        if check is None:
            return None
        return AnalysisStatus(
            measured_at=_iso(self._checked_at), window_seconds=check.window_seconds,
            error_rate=check.error_rate, mismatch_rate=check.mismatch_rate,
            fallbacks=check.fallbacks, operations=check.operations, replayed=check.replayed,
            consecutive_failures=check.consecutive_failures,
            failure=None if check.failure is None else check.failure[:1024],
        )

    def _degraded(self, progress: Progress, conflicts: Sequence[LockConflict],
                  routing: TransitionStatus) -> tuple[str, str] | None:
        if conflicts:
            keys = ", ".join(c.key for c in conflicts[:3])
            more = f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else ""
            return ("LockConflicts", f"{len(conflicts)} lock keys held on both sides by "
                    f"different pulls: {keys}{more}")
        if progress.state.abort_reason == ANALYSIS_FAILED:
            return ANALYSIS_FAILED, progress.state.abort_message or "analysis failed"
        check = self.check
        if check is not None and check.failure is not None and progress.phase != "Aborted":
            return ("AnalysisFailing", f"analysis check failed {check.consecutive_failures} "
                    f"time(s) in a row: {check.failure}")
        if routing.phase == "isolated":
            error = routing.last_error or "no report for too long"
            return ("RegistryUnreachable", f"this replica cannot report to the replica "
                    f"registry ({error}): it takes every key on both sides")
        return None

    def _conditions(self, progress: Progress, degraded: tuple[str, str] | None,
                    previous: LockMigrationStatus,
                    generation: int | None) -> list[Condition]:
        phase = progress.phase
        wanted: dict[str, tuple[ConditionStatus, str, str]] = {
            "Progressing": ("True", progress.reason, progress.message) if phase == "Progressing"
            else ("False", f"Rollout{phase}", progress.message),
            "Paused": ("True", progress.reason, progress.message) if phase == "Paused"
            else ("False", "NotPaused", ""),
            "Completed": ("True", progress.reason, progress.message) if phase == "Completed"
            else ("False", f"Rollout{phase}", ""),
            "Aborted": ("True", progress.reason, progress.state.abort_message or "")
            if phase == "Aborted" else ("False", "NotAborted", ""),
            "Degraded": ("True", *degraded) if degraded is not None
            else ("False", "AsExpected", ""),
        }
        before = {c.type: c for c in previous.conditions}
        out = []
        for kind in ROLLOUT_CONDITIONS:
            status, reason, message = wanted[kind]
            old = before.get(kind)
            since = old.last_transition_time if old is not None and old.status == status \
                else None
            out.append(Condition(type=kind, status=status, reason=reason,
                                 message=message[:32768], last_transition_time=since
                                 or _iso(self._wall()), observed_generation=generation))
        return out

    def notes(self) -> list[Note]:
        """The rollout's own Events from the last :meth:`advance` (taken once)."""
        progress = self.progress
        if progress is None:
            return []
        notes, self.progress = list(progress.notes), replace(progress, notes=[])
        return notes


ROLLOUT_FIELDS = ("phase", "message", "current_step_index", "step", "step_started_at",
                  "promoted", "retried", "promote_waiting", "counters", "transition",
                  "analysis", "status_writer")


def _steps_start_lower(spec: LockMigrationSpec, status: LockMigrationStatus) -> Note | None:
    """A warning when ``steps`` replace a fixed weight higher than their first step's.

    The steps start from their first step whatever weight was in force (a user who set
    ``weight: 50`` by hand and then applies steps from 10% moves keys back to 10%): the status
    has no step index yet while it still shows the old weight. docs/02-migration.md says how
    to start from the current weight instead (make it the first ``setWeight``).
    """
    if not spec.steps or status.current_step_index is not None:
        return None
    current = status.current_weight
    first = step_weight(spec.steps, 0)
    if spec.abort or spec.promote or current is None or current <= first:
        return None
    return Note("Warning", "StepsStartBelowCurrentWeight",
                f"spec.steps replaces weight {current:g}: step 1 moves keys back to weight "
                f"{first:g}; to start from {current:g}, make setWeight {current:g} the first "
                "step")


def _kept(status: LockMigrationStatus) -> tuple[dict[str, Any], list[Condition]]:
    """The rollout's part of the status as it is (nothing advanced it yet: a status written
    now must not erase the state the next writer resumes from)."""
    fields = {name: getattr(status, name) for name in ROLLOUT_FIELDS}
    return fields, [c for c in status.conditions if c.type in ROLLOUT_CONDITIONS]


def _holding_back(routing: TransitionStatus, shown: int = 3) -> str | None:
    """Which live replicas have not taken the weight being moved to (each with the weight it
    still routes by), for the rollout's message; None when none holds it back."""
    if not routing.pending:
        return None
    by_id = {replica.id: replica for replica in routing.replicas}
    named = []
    for replica_id in routing.pending[:shown]:
        replica = by_id.get(replica_id)
        if replica is None:
            named.append(replica_id)
        elif replica.weight != routing.weight:
            named.append(f"{replica_id} (routing by weight {replica.weight:g})")
        else:  # it reports the new weight, and still serves requests routed by an older one
            named.append(f"{replica_id} (finishing requests routed by an older weight)")
    more = len(routing.pending) - shown
    names = ", ".join(named) + (f" and {more} more" if more > 0 else "")
    has = "has" if len(routing.pending) == 1 else "have"
    return (f"replica{'s' if len(routing.pending) > 1 else ''} {names} {has} not taken weight "
            f"{routing.weight:g} yet")


def _uid(body: Mapping[str, Any] | None) -> str | None:
    return ((body or {}).get("metadata") or {}).get("uid")


def _transition(routing: TransitionStatus) -> TransitionState:
    live = [r for r in routing.replicas if r.state in ("self", "live")]
    return TransitionState.model_validate({
        "phase": routing.phase,
        "to": routing.weight,
        "from": list(routing.from_weights)[:64],
        "pendingReplicas": list(routing.pending)[:64],
        "excludedReplicas": list(routing.excluded)[:64],
        "replicas": len(live),
        "startedAt": routing.started_at.isoformat() if routing.started_at else None,
        "lastSettleSeconds": routing.last_settle_seconds,
        "lastError": routing.last_error[:1024] if routing.last_error else None,
    })

