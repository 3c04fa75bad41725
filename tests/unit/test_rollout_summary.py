"""The rollout as the kubectl plugin and the console show it, from the object's JSON alone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from enhanced_locking.kube.lockmigration import LockMigrationSpec, read_status
from enhanced_locking.kubectl import render_tree
from enhanced_locking.rollout_summary import summarize
from enhanced_locking.terminal import Style

NOW = datetime(2030, 1, 1, 0, 10, tzinfo=UTC)


def migration(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "to-enhanced", "namespace": "atlantis", "generation": 3},
        "spec": {
            "policyRef": {"name": "default"}, "mode": "route",
            "steps": [{"setWeight": 10}, {"pause": {"duration": "10m"}}, {"setWeight": 50},
                      {"pause": {}}, {"setWeight": 100}],
            "analysis": {"maxErrorRate": 0.01, "maxFallbacks": 10},
        },
        "status": {
            "phase": "Paused", "message": "step 2/5 (pause 10m) until 2030-01-01T00:14:00Z",
            "currentWeight": 10, "currentStepIndex": 1,
            "stepStartedAt": "2030-01-01T00:04:00.000Z", "observedGeneration": 3,
            "transition": {"phase": "moving", "to": 10, "replicas": 2,
                           "pendingReplicas": ["replica-b"]},
            "analysis": {"measuredAt": "2030-01-01T00:09:50Z", "windowSeconds": 300,
                         "errorRate": 0.02, "fallbacks": 0},
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "Applied", "message": "",
                 "lastTransitionTime": "2030-01-01T00:00:00Z"},
                {"type": "Paused", "status": "True", "reason": "PauseStep", "message": "m",
                 "lastTransitionTime": "2030-01-01T00:04:00Z"},
            ],
            "statusWriter": "replica-a", "lastSeenAt": "2030-01-01T00:09:30Z",
            **status,
        },
    }


def test_the_object_read_here_is_one_the_operator_s_models_read_whole() -> None:
    # The summary reads the JSON, not the operator's models (the plugin may be another
    # version than the operator); the names it reads are the models' all the same, so a field
    # renamed there fails here rather than showing as missing.
    body = migration()
    LockMigrationSpec.model_validate(body["spec"])
    assert read_status(body["status"])[1] == []


def test_the_step_in_force_is_marked_with_the_time_left_of_its_pause() -> None:
    summary = summarize(migration(), now=NOW)
    assert [(s.number, s.state) for s in summary.steps] == [
        (1, "done"), (2, "current"), (3, "pending"), (4, "pending"), (5, "pending")]
    assert summary.steps[1].remaining == timedelta(minutes=4)
    assert (summary.weight_now, summary.weight_target, summary.move) == (10, 100, "moving")
    assert summary.pending_replicas == ["replica-b"]
    assert summary.healthy and not summary.done


def test_each_metric_is_judged_against_its_limit() -> None:
    metrics = {m.name: m for m in summarize(migration(), now=NOW).analysis}
    assert set(metrics) == {"error rate", "fallbacks"}  # no mismatch limit in the spec
    assert not metrics["error rate"].ok and metrics["error rate"].limit == 0.01
    assert metrics["fallbacks"].ok


def test_an_abort_names_its_reason_and_is_neither_healthy_nor_pending() -> None:
    body = migration(phase="Aborted", conditions=[
        {"type": "Aborted", "status": "True", "reason": "AnalysisFailed",
         "message": "analysis failed: error rate 0.02 above 0.01"}])
    summary = summarize(body, now=NOW)
    assert summary.abort == ("AnalysisFailed", "analysis failed: error rate 0.02 above 0.01")
    assert summary.done and not summary.healthy


def test_an_object_without_status_is_pending() -> None:
    body = {"metadata": {"name": "m", "namespace": "ns"},
            "spec": {"policyRef": {"name": "default"}, "weight": 25}}
    summary = summarize(body, now=NOW)
    assert (summary.phase, summary.weight_now, summary.weight_target, summary.steps) == (
        "Pending", None, 25, [])


def test_the_tree_shows_steps_weight_analysis_conditions_and_replicas() -> None:
    tree = render_tree(summarize(migration(), now=NOW), Style(enabled=False))
    lines = tree.splitlines()
    assert lines[0] == "LockMigration atlantis/to-enhanced"
    assert "├── Phase:    Paused  step 2/5 (pause 10m) until 2030-01-01T00:14:00Z" in lines
    assert "├── Weight:   10% now, target 100% (move: moving)" in lines
    assert "│   ├── ✔ 1. setWeight 10" in lines
    assert "│   ├── ▶ 2. pause 10m (4m left)" in lines
    assert "│   └── ○ 5. setWeight 100" in lines
    assert "│   ├── ✘ error rate 0.02 (limit 0.01)" in lines
    assert "│   └── ✔ fallbacks 0 (limit 10)" in lines
    assert "│   ├── Ready True Applied" in lines
    assert lines[-1] == ("└── Replicas: 2 reporting; pending the move: replica-b; status by "
                         "replica-a, last seen 2030-01-01T00:09:30Z")
    assert "\033[" not in tree


def test_colour_only_when_asked() -> None:
    assert "\033[" in render_tree(summarize(migration(), now=NOW), Style(enabled=True))


def test_a_status_of_an_older_generation_is_not_done_and_says_so() -> None:
    """Right after an edit the status is still the last generation's: a rollout that was
    Completed is not done (``rollout status --watch`` waits, as ``kubectl rollout status``
    waits for the observed generation) and the message says the status is behind."""
    body = migration(phase="Completed", message="all 5 steps done at weight 100",
                     observedGeneration=2)
    summary = summarize(body, now=NOW)
    assert not summary.done and summary.healthy
    assert summary.message == ("all 5 steps done at weight 100 (the status is of generation "
                               "2; the operator has not acted on generation 3 yet)")
    assert summary.as_dict()["observedGeneration"] == 2
    assert summarize(migration(phase="Completed"), now=NOW).done
    aborted = summarize(migration(phase="Aborted", observedGeneration=2), now=NOW)
    assert not aborted.done and not aborted.healthy
