"""The rollout state machine: where a LockMigration's steps are, and what happens next.

Argo Rollouts' model, applied to lock routing. The state is small and lives in the object's
status, so whichever operator writes the status next (a restarted pod, a new leader) carries on
from it: the step in force (``currentStepIndex``), when it began (``stepStartedAt``), the last
promote and retry requests handled, and whether and why the rollout was aborted (the
``Aborted`` condition). :func:`advance` takes that state, the spec, the clock and what the
service observes, and returns the next state; it does no I/O and can be driven by any clock.

The rules:

* ``setWeight`` is in force as soon as its step is; the step is done when that weight is the
  only authority on every live replica (the two-phase move has settled), and the next step
  starts then. A rollout never moves on while keys are still moving.
* ``pause: {duration}`` ends when its weight has been settled for ``duration``: it begins
  once the weight in force before it has settled (the step before it done), and time its keys
  spend moving again (after a restart, or for a replica that joined with an older weight) is
  not pause time: the pause's start (``stepStartedAt``) moves later by it once they have
  settled. ``pause: {}`` waits for a promote. A promote (a new value of the promote annotation)
  ends the pause in progress; one that arrives when no pause is in progress is recorded and
  ignored. Neither ends a pause while its weight is moving: the rollout is ``Progressing``
  then.
* ``spec.paused: true`` holds the rollout at its step (the weight in force stays); a promote
  waits until it is cleared (the annotation never edits the spec: ``kubectl locking rollout
  promote`` clears it in the same edit, as ``kubectl argo rollouts promote`` does).
* ``spec.abort: true``, or a failed analysis, aborts: weight 0 through the same safe handover.
  Clearing ``spec.abort`` restarts the steps from the first one; an automatic abort is lifted
  by a new value of the retry annotation (Argo's ``retry``).
* ``spec.promote: true`` is a full promotion: weight 100 now, every step left skipped.
* Past the last step (or, without steps, once the fixed weight has settled) the rollout is
  ``Completed``. Editing the steps keeps the step index: the steps after it are the ones left.
  Replacing the steps with a fixed ``weight`` ends their rollout: steps given again later
  start from their first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from enhanced_locking.durations import format_duration
from enhanced_locking.kube.lockmigration import (
    LockMigrationSpec,
    LockMigrationStatus,
    Phase,
    Step,
    step_weight,
)
from enhanced_locking.kube.overrides import migration_weight

__all__ = ["ABORT_REQUESTED", "ANALYSIS_FAILED", "Note", "Progress", "RolloutState", "advance",
           "format_time", "parse_time", "weight_of"]

ABORT_REQUESTED = "AbortRequested"
ANALYSIS_FAILED = "AnalysisFailed"


def parse_time(text: object) -> datetime | None:
    """An RFC 3339 time from the status (``Z`` or an offset), or None."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def format_time(at: datetime) -> str:
    """A time as the status keeps it: RFC 3339 in UTC, to the millisecond."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Note:
    """Something worth a Kubernetes Event: ``type`` Normal or Warning, a reason, a message."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class RolloutState:
    """The rollout's memory, as kept in the status."""

    step_index: int = 0
    step_started_at: datetime | None = None
    promoted: str | None = None
    retried: str | None = None
    abort_reason: str | None = None
    abort_message: str | None = None
    moving_since: datetime | None = None
    """Since when the weight of the pause in progress has been seen moving again (the writer's
    own memory, not kept in the status: time the writer did not see, a restart's, counts as
    pause time, as the pause's start is kept over a restart)."""

    @property
    def aborted(self) -> bool:
        return self.abort_reason is not None

    @classmethod
    def from_status(cls, status: LockMigrationStatus) -> RolloutState:
        """The state a status keeps (read by :func:`~.lockmigration.read_status`): the fields
        :meth:`status_fields` writes, and the ``Aborted`` condition."""
        aborted = next((c for c in status.conditions
                        if c.type == "Aborted" and c.status == "True"), None)
        return cls(
            step_index=status.current_step_index or 0,
            step_started_at=parse_time(status.step_started_at),
            promoted=status.promoted or None,
            retried=status.retried or None,
            abort_reason=aborted.reason if aborted else None,
            abort_message=aborted.message if aborted else None,
        )

    def status_fields(self, steps: list[Step] | None) -> dict[str, Any]:
        """The fields of :class:`~.lockmigration.LockMigrationStatus` this state is kept in,
        for a spec with ``steps`` (None: a fixed weight, no step to show). Its abort is the
        ``Aborted`` condition, written with the rollout's other conditions."""
        if steps is None:
            return {"current_step_index": None, "step": None, "step_started_at": None,
                    "promoted": self.promoted, "retried": self.retried}
        index, started = self.step_index, self.step_started_at
        return {
            "current_step_index": index,
            "step": f"{min(index + 1, len(steps))}/{len(steps)}",
            "step_started_at": format_time(started) if started is not None else None,
            "promoted": self.promoted,
            "retried": self.retried,
        }


@dataclass(frozen=True)
class Progress:
    """The outcome of one :func:`advance`: the new state, the phase and why, Events to post."""

    state: RolloutState
    phase: Phase
    reason: str
    message: str
    notes: list[Note] = field(default_factory=list)
    promote_waiting: str | None = None
    """A promote that ``spec.paused`` holds back (it ends nothing until that is cleared)."""


def weight_of(spec: LockMigrationSpec, state: RolloutState) -> float | None:
    """The weight the service should route by for this spec and rollout state (what the
    operator applies: :func:`~enhanced_locking.kube.overrides.migration_weight`)."""
    return migration_weight(spec, step_index=state.step_index, aborted=state.aborted)


def _describe(step: Step) -> str:
    if step.set_weight is not None:
        return f"setWeight {step.set_weight:g}"
    assert step.pause is not None
    if step.pause.duration is None:
        return "pause until promoted"
    return f"pause {format_duration(step.pause.duration)}"


def advance(
    spec: LockMigrationSpec,
    state: RolloutState,
    *,
    now: datetime,
    settled_weight: float | None,
    promote: str | None = None,
    retry: str | None = None,
    analysis_failure: str | None = None,
) -> Progress:
    """The next state of the rollout.

    ``settled_weight`` is the weight that is the only authority on every live replica now (None
    while a move is under way); ``promote`` and ``retry`` are the annotations' values;
    ``analysis_failure`` says why the analysis asks for an abort (None: it does not).
    """
    notes: list[Note] = []
    if spec.steps is None and (state.step_index or state.step_started_at is not None):
        # A fixed weight in the steps' place ends their rollout: the status shows no step
        # then, and steps given again start from their first one, as a restarted operator
        # (or another status writer) reading that status would start them.
        state = replace(state, step_index=0, step_started_at=None, moving_since=None)

    # --- aborting and lifting an abort ---------------------------------------------------
    if spec.abort:
        if state.abort_reason != ABORT_REQUESTED:
            message = "spec.abort is true: every lock key goes back to legacy (weight 0)"
            state = replace(state, abort_reason=ABORT_REQUESTED, abort_message=message)
            notes.append(Note("Warning", "RolloutAborted", message))
        return _aborted(state, settled_weight, notes)
    if state.aborted:
        if state.abort_reason == ABORT_REQUESTED:
            state = _restart(state, now)
            notes.append(Note("Normal", "RolloutRestarted",
                              "spec.abort was cleared: the rollout starts again from step 1"))
        elif retry is not None and retry != state.retried:
            state = replace(_restart(state, now), retried=retry)
            notes.append(Note("Normal", "RolloutRetried",
                              "retry requested: the rollout starts again from step 1"))
        else:
            return _aborted(state, settled_weight, notes)
        analysis_failure = None  # measured before the restart: the new rollout starts clean
    elif retry is not None and retry != state.retried:
        state = replace(state, retried=retry)
        notes.append(Note("Normal", "RetryIgnored", "retry requested but nothing was aborted"))

    if analysis_failure is not None:
        message = f"analysis failed: {analysis_failure}; every lock key goes back to legacy"
        state = replace(state, abort_reason=ANALYSIS_FAILED, abort_message=message)
        notes.append(Note("Warning", ANALYSIS_FAILED, message))
        return _aborted(state, settled_weight, notes)

    # --- a full promotion or a fixed weight ----------------------------------------------
    if spec.promote:
        last = len(spec.steps) if spec.steps is not None else 0
        if spec.steps is not None and state.step_index != last:
            state = replace(state, step_index=last, step_started_at=now, moving_since=None)
            notes.append(Note("Normal", "RolloutPromoted",
                              "spec.promote is true: every lock key goes to enhanced"))
        state = _consume_promote(state, promote, notes, "spec.promote is true already")
        return _weight_phase(state, 100.0, settled_weight, notes, done="Promoted")
    if spec.steps is None:
        state = _consume_promote(state, promote, notes, "the migration has no steps")
        weight = weight_of(spec, state)
        return _weight_phase(state, weight, settled_weight, notes, done="WeightSettled")

    # --- the steps -----------------------------------------------------------------------
    steps = spec.steps
    index = min(state.step_index, len(steps))
    if index != state.step_index:
        state = replace(state, step_index=index)
    applied = round(step_weight(steps, index), 2)
    while True:
        index, total = state.step_index, len(steps)
        if index >= total:
            if state.step_started_at is None:
                state = replace(state, step_started_at=now)
            state = _consume_promote(state, promote, notes, "the rollout has completed")
            if settled_weight != applied:
                return Progress(state, "Progressing", "WeightMoving",
                                f"all {total} steps done; weight {applied:g} is settling", notes)
            return Progress(state, "Completed", "RolloutCompleted",
                            f"all {total} steps done at weight {applied:g}", notes)
        step = steps[index]
        where = f"step {index + 1}/{total} ({_describe(step)})"
        if step.pause is not None and settled_weight != applied:
            # The pause's keys are moving again (a restarted operator's service starts from its
            # own settings; a replica joined with an older weight): its duration is time at its
            # weight, everywhere, so the time they spend moving is added to it once settled.
            if state.moving_since is None:
                state = replace(state, moving_since=now)
        elif state.moving_since is not None:
            started = state.step_started_at
            state = replace(state, moving_since=None, step_started_at=None if started is None
                            else started + max(now - state.moving_since, timedelta(0)))
        if state.step_started_at is None:
            state = replace(state, step_started_at=now)
        if spec.paused:
            new = promote if promote is not None and promote != state.promoted else None
            if settled_weight != applied:
                where += f"; its keys are still moving to weight {applied:g}"
            waiting = new if step.pause is not None else None
            if waiting is not None:
                where += "; a promote waits until spec.paused is cleared"
            elif new is not None:
                # A setWeight step is never skipped: the promote ends nothing when spec.paused
                # is cleared either (it is recorded and ignored then, PromoteIgnored).
                where += ("; a promote skips nothing here (this step is not a pause): clearing "
                          "spec.paused lets the rollout go on")
            return Progress(state, "Paused", "PausedBySpec", f"spec.paused holds {where}", notes,
                            promote_waiting=waiting)
        if step.set_weight is not None:
            state = _consume_promote(state, promote, notes, f"{where} is not a pause")
            if settled_weight != applied:
                return Progress(state, "Progressing", "StepInProgress",
                                f"{where}: moving keys to weight {applied:g}", notes)
        else:
            pause = step.pause
            assert pause is not None
            if settled_weight != applied:
                # The weight before the pause is not settled (see above): the pause neither
                # runs, nor ends, nor takes a promote until it has.
                return Progress(state, "Progressing", "WeightMoving",
                                f"{where}: keys are moving to weight {applied:g} first", notes)
            if promote is not None and promote != state.promoted:
                state = replace(state, promoted=promote)
                notes.append(Note("Normal", "RolloutPromoted", f"promoted: {where} skipped"))
            elif pause.duration is None:
                return Progress(state, "Paused", "WaitingForPromote",
                                f"{where}: annotate to promote", notes)
            else:
                started = state.step_started_at or now
                ends = started + pause.duration
                if now < ends:
                    return Progress(state, "Paused", "PauseStep",
                                    f"{where} until {ends.strftime('%Y-%m-%dT%H:%M:%SZ')}", notes)
        # This step is done: the next one starts now.
        following = index + 1
        state = replace(state, step_index=following, step_started_at=now, moving_since=None)
        if following < total:
            notes.append(Note("Normal", "StepStarted", _started(steps, following)))
        next_weight = round(step_weight(steps, following), 2)
        if next_weight != applied:
            applied = next_weight  # the move starts once the service applies it


def _started(steps: list[Step], index: int) -> str:
    return f"step {index + 1}/{len(steps)} started: {_describe(steps[index])}"


def _restart(state: RolloutState, now: datetime) -> RolloutState:
    return replace(state, step_index=0, step_started_at=now, moving_since=None,
                   abort_reason=None, abort_message=None)


def _consume_promote(
    state: RolloutState, promote: str | None, notes: list[Note], why: str
) -> RolloutState:
    """Record a promote that has nothing to skip (so it never skips a later pause)."""
    if promote is None or promote == state.promoted:
        return state
    notes.append(Note("Normal", "PromoteIgnored", f"promote ignored: {why}"))
    return replace(state, promoted=promote)


def _aborted(state: RolloutState, settled: float | None, notes: list[Note]) -> Progress:
    where = "weight 0 settled" if settled == 0 else "keys are moving back to legacy"
    return Progress(state, "Aborted", state.abort_reason or ABORT_REQUESTED,
                    f"{state.abort_message}; {where}", notes)


def _weight_phase(state: RolloutState, weight: float | None, settled: float | None,
                  notes: list[Note], *, done: str) -> Progress:
    if weight is None:  # no weight in the spec: the service's own setting is in force
        if settled is None:
            return Progress(state, "Progressing", "WeightMoving",
                            "moving keys to the service's own weight", notes)
        return Progress(state, "Completed", done,
                        f"the service's own weight ({settled:g}) is in force on every replica",
                        notes)
    if settled != weight:
        return Progress(state, "Progressing", "WeightMoving", f"moving keys to weight {weight:g}",
                        notes)
    return Progress(state, "Completed", done, f"weight {weight:g} is in force on every replica",
                    notes)
