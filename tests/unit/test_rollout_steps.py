"""The rollout state machine (kube/rollout.py) on a hand-moved clock: steps, pauses, promote,
paused, abort and retry, full promotion, fixed weights. The service's side is played by the
``settled`` weight each call is given, as the driver reads it from the weight move."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from enhanced_locking.kube.lockmigration import (
    LockMigrationSpec,
    LockMigrationStatus,
    Pause,
    Step,
    read_status,
)
from enhanced_locking.kube.models import Condition
from enhanced_locking.kube.rollout import (
    ABORT_REQUESTED,
    ANALYSIS_FAILED,
    Progress,
    RolloutState,
    advance,
    weight_of,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC)
STEPS = [{"setWeight": 10}, {"pause": {"duration": "1m"}}, {"setWeight": 50}, {"pause": {}},
         {"setWeight": 100}]


def spec(**fields: Any) -> LockMigrationSpec:
    return LockMigrationSpec.model_validate({"policyRef": {"name": "default"}, **fields})


class Rollout:
    """Drives :func:`advance` like the operator does: the weight it asks for settles at once
    unless the test says otherwise."""

    def __init__(self, migration: LockMigrationSpec, state: RolloutState | None = None) -> None:
        self.spec = migration
        self.state = state or RolloutState()
        self.now = T0
        self.settled: float | None = None
        self.reasons: list[str] = []

    def step(self, *, settle: bool = True, **kwargs: Any) -> Progress:
        progress = advance(self.spec, self.state, now=self.now, settled_weight=self.settled,
                           **kwargs)
        self.state = progress.state
        self.reasons += [note.reason for note in progress.notes]
        if settle:
            self.settled = weight_of(self.spec, self.state)
        return progress

    def wait(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def test_a_set_weight_step_waits_for_its_move_to_settle_before_the_next_step_starts() -> None:
    rollout = Rollout(spec(steps=STEPS))
    first = rollout.step(settle=False)
    assert (first.phase, first.reason, first.state.step_index) == (
        "Progressing", "StepInProgress", 0)
    assert weight_of(rollout.spec, first.state) == 10
    still = rollout.step(settle=False)  # the move has not settled: nothing advances
    assert (still.phase, still.state.step_index) == ("Progressing", 0)
    rollout.settled = 10
    paused = rollout.step()
    assert (paused.phase, paused.reason, paused.state.step_index) == ("Paused", "PauseStep", 1)
    assert paused.state.step_started_at == T0
    assert "until 2030-01-01T00:01:00Z" in paused.message


def test_a_timed_pause_ends_after_its_duration_and_an_open_pause_waits_for_a_promote() -> None:
    rollout = Rollout(spec(steps=STEPS))
    rollout.step()
    rollout.step()
    rollout.wait(seconds=59)
    assert rollout.step().state.step_index == 1
    rollout.wait(seconds=1)
    moving = rollout.step(settle=False)
    assert (moving.phase, moving.state.step_index) == ("Progressing", 2)
    assert weight_of(rollout.spec, moving.state) == 50
    rollout.settled = 50
    waiting = rollout.step()
    assert (waiting.phase, waiting.reason, waiting.state.step_index) == (
        "Paused", "WaitingForPromote", 3)
    rollout.wait(hours=100)
    assert rollout.step().state.step_index == 3  # an open pause holds, however long

    promoted = rollout.step(promote="p1", settle=False)
    assert (promoted.phase, promoted.state.step_index, promoted.state.promoted) == (
        "Progressing", 4, "p1")
    rollout.settled = 100
    done = rollout.step(promote="p1")  # the same value again is not a new promote
    assert (done.phase, done.reason, done.state.step_index) == ("Completed", "RolloutCompleted", 5)
    assert rollout.reasons.count("RolloutPromoted") == 1
    assert rollout.reasons.count("StepStarted") == 4


def test_a_promote_skips_a_timed_pause_too_and_one_without_a_pause_is_ignored_not_saved() -> None:
    rollout = Rollout(spec(steps=STEPS))
    first = rollout.step(promote="early", settle=False)  # during setWeight 10: nothing to skip
    assert first.state.promoted == "early" and "PromoteIgnored" in rollout.reasons
    rollout.settled = 10
    assert rollout.step(promote="early").state.step_index == 1  # ...and not kept for later
    skipped = rollout.step(promote="now", settle=False)
    assert skipped.state.step_index == 2 and skipped.state.promoted == "now"


def test_spec_paused_holds_the_step_and_keeps_a_promote_for_when_it_is_cleared() -> None:
    rollout = Rollout(spec(steps=STEPS, paused=True))
    held = rollout.step()
    assert (held.phase, held.reason, held.state.step_index) == ("Paused", "PausedBySpec", 0)
    assert weight_of(rollout.spec, held.state) == 10  # the step in force stays in force
    rollout.spec = spec(steps=STEPS)
    assert rollout.step().state.step_index == 1  # the pause step, 1m
    rollout.spec = spec(steps=STEPS, paused=True)
    rollout.wait(minutes=5)
    waiting = rollout.step(promote="p")
    assert waiting.state.step_index == 1 and waiting.state.promoted is None
    assert "a promote waits until spec.paused is cleared" in waiting.message
    assert waiting.promote_waiting == "p"
    rollout.spec = spec(steps=STEPS)
    # Cleared: the promote that waited ends the pause (whose minute passed while held, too).
    resumed = rollout.step(promote="p")
    assert resumed.state.step_index == 2 and resumed.state.promoted == "p"
    assert "RolloutPromoted" in rollout.reasons


def test_a_promote_under_spec_paused_at_a_set_weight_step_is_not_said_to_wait() -> None:
    # A setWeight step is never skipped: a promote there ends nothing once spec.paused is
    # cleared either (recorded and ignored then), so neither the message nor an Event may say
    # that it waits to be let through.
    rollout = Rollout(spec(steps=STEPS, paused=True))
    rollout.step()
    held = rollout.step(promote="p")
    assert (held.phase, held.reason, held.state.step_index) == ("Paused", "PausedBySpec", 0)
    assert "a promote waits" not in held.message, held.message
    assert held.promote_waiting is None
    assert "a promote skips nothing here (this step is not a pause)" in held.message
    rollout.spec = spec(steps=STEPS)
    cleared = rollout.step(promote="p")
    assert (cleared.state.step_index, cleared.state.promoted) == (1, "p")
    assert "PromoteIgnored" in rollout.reasons and "RolloutPromoted" not in rollout.reasons


def test_abort_goes_to_weight_zero_and_clearing_it_restarts_from_the_first_step() -> None:
    rollout = Rollout(spec(steps=STEPS))
    for _ in range(4):
        rollout.step()
        rollout.wait(minutes=2)
    assert rollout.state.step_index == 3
    rollout.spec = spec(steps=STEPS, abort=True)
    aborted = rollout.step(settle=False)
    assert (aborted.phase, aborted.reason, aborted.state.abort_reason) == (
        "Aborted", ABORT_REQUESTED, ABORT_REQUESTED)
    assert weight_of(rollout.spec, aborted.state) == 0
    assert "keys are moving back to legacy" in aborted.message
    rollout.settled = 0
    assert "weight 0 settled" in rollout.step().message
    assert rollout.reasons.count("RolloutAborted") == 1

    rollout.spec = spec(steps=STEPS)
    restarted = rollout.step(settle=False)
    assert (restarted.phase, restarted.state.step_index, restarted.state.aborted) == (
        "Progressing", 0, False)
    assert restarted.state.step_started_at == rollout.now
    assert "RolloutRestarted" in rollout.reasons


def test_a_failed_analysis_aborts_and_only_a_new_retry_value_restarts() -> None:
    rollout = Rollout(spec(steps=STEPS), RolloutState(retried="old"))
    rollout.step()
    failed = rollout.step(analysis_failure="error rate 0.5 is above maxErrorRate 0.1")
    assert (failed.phase, failed.reason) == ("Aborted", ANALYSIS_FAILED)
    assert failed.state.abort_message is not None
    assert "error rate 0.5 is above maxErrorRate 0.1" in failed.state.abort_message
    assert weight_of(rollout.spec, failed.state) == 0
    assert rollout.step(retry="old").phase == "Aborted"  # the value handled before
    assert rollout.step().phase == "Aborted"
    retried = rollout.step(retry="new", analysis_failure="measured before the retry")
    assert (retried.phase, retried.state.retried, retried.state.step_index) == (
        "Progressing", "new", 0)
    assert "RolloutRetried" in rollout.reasons


def test_a_retry_when_nothing_was_aborted_is_recorded_and_ignored() -> None:
    rollout = Rollout(spec(weight=30))
    progress = rollout.step(retry="r")
    assert progress.state.retried == "r" and "RetryIgnored" in rollout.reasons


def test_spec_promote_is_a_full_promotion_to_weight_100() -> None:
    rollout = Rollout(spec(steps=STEPS))
    rollout.step()
    rollout.spec = spec(steps=STEPS, promote=True)
    moving = rollout.step(settle=False)
    assert (moving.phase, moving.state.step_index) == ("Progressing", len(STEPS))
    assert weight_of(rollout.spec, moving.state) == 100
    rollout.settled = 100
    assert rollout.step().reason == "Promoted"


@pytest.mark.parametrize(("fields", "weight"), [
    ({"weight": 25}, 25.0), ({"weight": 12.345}, 12.35), ({}, None),
])
def test_a_fixed_weight_completes_once_it_settles(fields: dict[str, Any],
                                                   weight: float | None) -> None:
    rollout = Rollout(spec(**fields))
    assert weight_of(rollout.spec, rollout.state) == weight
    assert rollout.step(settle=False).phase == "Progressing"
    rollout.settled = weight if weight is not None else 100.0
    done = rollout.step()
    assert (done.phase, done.reason) == ("Completed", "WeightSettled")


def test_editing_the_steps_keeps_the_index_and_appending_steps_resumes_a_completed_rollout(
) -> None:
    rollout = Rollout(spec(steps=[{"setWeight": 20}]))
    rollout.step()
    assert rollout.step().phase == "Completed"
    rollout.spec = spec(steps=[{"setWeight": 20}, {"pause": {}}, {"setWeight": 60}])
    assert rollout.step().reason == "WaitingForPromote"
    rollout.spec = spec(steps=[{"setWeight": 5}])  # shorter than the index: completed
    shrunk = rollout.step(settle=False)
    assert shrunk.state.step_index == 1 and shrunk.phase == "Progressing"


def test_a_fixed_weight_in_place_of_the_steps_ends_them_and_steps_again_start_afresh() -> None:
    rollout = Rollout(spec(steps=[{"setWeight": 20}, {"setWeight": 60}]))
    rollout.step()
    rollout.step()
    assert rollout.step().phase == "Completed" and rollout.state.step_index == 2
    rollout.spec = spec(weight=5)
    fixed = rollout.step()
    assert (fixed.state.step_index, fixed.state.step_started_at) == (0, None)
    rollout.spec = spec(steps=[{"setWeight": 10}, {"pause": {}}, {"setWeight": 100}])
    again = rollout.step()
    assert (again.reason, again.state.step_index) == ("StepInProgress", 0)
    assert weight_of(rollout.spec, again.state) == 10
    assert rollout.step().reason == "WaitingForPromote"


def read(status: dict[str, Any] | None) -> RolloutState:
    return RolloutState.from_status(read_status(status)[0])


def test_the_state_reads_back_from_the_status_it_is_written_to() -> None:
    status = {
        "currentStepIndex": 3, "stepStartedAt": "2030-01-01T00:05:00.250Z",
        "promoted": "p", "retried": "r",
        "conditions": [{"type": "Aborted", "status": "True", "reason": ANALYSIS_FAILED,
                        "message": "analysis failed: x",
                        "lastTransitionTime": "2030-01-01T00:05:00Z"}],
    }
    state = read(status)
    assert state == RolloutState(step_index=3,
                                 step_started_at=T0 + timedelta(minutes=5, milliseconds=250),
                                 promoted="p", retried="r", abort_reason=ANALYSIS_FAILED,
                                 abort_message="analysis failed: x")
    assert read(None) == RolloutState()
    assert read({"currentStepIndex": -1, "stepStartedAt": "x"}) == RolloutState()


@pytest.mark.parametrize("state", [
    RolloutState(),
    RolloutState(step_index=2, step_started_at=T0 + timedelta(seconds=1, milliseconds=5),
                 promoted="p", retried="sha256:" + "0" * 32),
    RolloutState(step_index=4, step_started_at=T0, abort_reason=ABORT_REQUESTED,
                 abort_message="spec.abort is true"),
])
def test_a_state_written_to_the_status_reads_back_the_same(state: RolloutState) -> None:
    # Written and read through the one model: a field renamed in it is renamed on both sides.
    steps = [Step(set_weight=10), Step(pause=Pause()), Step(set_weight=50), Step(pause=Pause()),
             Step(set_weight=100)]
    aborted = [Condition(type="Aborted", status="True", reason=state.abort_reason,
                         message=state.abort_message or "", last_transition_time="t")
               ] if state.abort_reason else []
    written = LockMigrationStatus(**state.status_fields(steps), conditions=aborted)
    status = written.model_dump(mode="json", by_alias=True, exclude_none=True)
    read_back, problems = read_status(status)
    assert problems == []
    assert RolloutState.from_status(read_back) == state
    assert status["step"] == f"{state.step_index + 1}/5"


def test_a_status_field_renamed_or_unreadable_is_named_and_read_as_left_out() -> None:
    status, problems = read_status({
        "currentStep": 3,  # another version's name for currentStepIndex
        "currentWeight": 150,
        "analysis": {"measuredAt": "2030-01-01T00:00:00Z", "windowSeconds": 60,
                     "consecutiveFailure": 2},
        "promoted": "p",
    })
    assert problems == [
        "currentStep: not a field of the status (read as left out)",
        "analysis.consecutiveFailure: not a field of the status (read as left out)",
        "currentWeight: Input should be less than or equal to 100 (currentWeight read as "
        "left out)",
    ]
    # Read as left out: the model's defaults, which say "none known", and the rest stands.
    assert (status.current_step_index, status.current_weight) == (None, None)
    assert status.analysis is not None and status.analysis.consecutive_failures == 0
    assert status.promoted == "p"


def test_a_pause_neither_ends_nor_is_claimed_while_the_weight_before_it_is_still_moving() -> None:
    # The weight of the step before a pause settled, and the pause began; then the keys are
    # moving again (the operator restarted with its service, which starts from its own
    # settings, or a replica joined that still routes by an older weight). The rollout never
    # moves on while keys are moving: the pause waits, Progressing, and spec.paused says so.
    rollout = Rollout(spec(steps=STEPS))
    rollout.step()
    assert rollout.step().phase == "Paused"
    assert rollout.state.step_index == 1 and rollout.settled == 10
    rollout.settled = None
    rollout.wait(minutes=5)  # the pause's minute ran out meanwhile
    moving = rollout.step(settle=False)
    assert moving.state.step_index == 1, "a pause ended while the weight was still moving"
    assert (moving.phase, moving.reason) == ("Progressing", "WeightMoving")
    assert "weight 10" in moving.message
    promoted = rollout.step(settle=False, promote="p")  # kept for the pause, not ignored
    assert promoted.state.step_index == 1 and promoted.state.promoted is None
    rollout.spec = spec(steps=STEPS, paused=True)
    held = rollout.step(settle=False)
    assert (held.phase, held.reason) == ("Paused", "PausedBySpec")
    assert "keys are still moving to weight 10" in held.message
    rollout.spec = spec(steps=STEPS)
    rollout.settled = 10
    # Settled: the pause that ran out ends (the five minutes before the keys were seen
    # moving were pause time: a pause's start is kept over a restart, as Argo's is).
    assert rollout.step().state.step_index == 2
    assert "PromoteIgnored" not in rollout.reasons


def test_a_timed_pause_is_time_at_its_weight_and_time_spent_moving_again_is_added() -> None:
    # A pause of a minute is a minute with its weight settled, everywhere: the time its keys
    # spend moving again (an operator restarted with its service, a replica joined with an
    # older weight) is added to it, and the pause's start (stepStartedAt) moves by as much.
    rollout = Rollout(spec(steps=STEPS))
    rollout.step()
    paused = rollout.step()
    assert (paused.reason, paused.state.step_index, paused.state.step_started_at) == (
        "PauseStep", 1, T0)
    rollout.wait(seconds=30)
    rollout.settled = None  # the keys move again, half way through the pause
    moving = rollout.step(settle=False)
    assert (moving.phase, moving.reason, moving.state.step_index) == (
        "Progressing", "WeightMoving", 1)
    rollout.wait(seconds=40)  # 70 s since the pause began: it would have ended by now
    assert rollout.step(settle=False).state.step_index == 1
    rollout.settled = 10
    again = rollout.step()
    assert (again.phase, again.reason, again.state.step_index) == ("Paused", "PauseStep", 1), (
        "the pause ended counting the time its keys were moving")
    assert again.state.step_started_at == T0 + timedelta(seconds=40)
    assert "until 2030-01-01T00:01:40Z" in again.message
    rollout.wait(seconds=29)  # 59 s at weight 10
    assert rollout.step().state.step_index == 1
    rollout.wait(seconds=1)
    assert rollout.step(settle=False).state.step_index == 2  # a whole minute at weight 10

