"""A LockMigration read as a person reads it: the steps with the one in force, the weight now
and where it is going, the pause and its time left, the analysis against its limits, the
reason for an abort, the conditions and the replicas a move still waits for.

It works on the object as the API server returns it (plain JSON, as ``kubectl get -o json``
prints it), so the kubectl plugin and the web console show the same thing from the same data
a user can read, and neither needs the operator's models. Pure: no I/O, the clock is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from enhanced_locking.durations import format_duration, parse_duration

__all__ = ["Metric", "RolloutSummary", "StepLine", "remaining_text", "summarize"]

StepState = Literal["done", "current", "pending"]


@dataclass(frozen=True)
class StepLine:
    """One step: its number (from 1), what it does, and whether it is done, in force or next."""

    number: int
    text: str
    state: StepState
    remaining: timedelta | None = None
    """For the pause in force with a duration: the time left."""


@dataclass(frozen=True)
class Metric:
    """One analysis measure against its limit; ``value`` None when nothing was measured."""

    name: str
    value: float | None
    limit: float
    ok: bool


@dataclass(frozen=True)
class RolloutSummary:
    namespace: str
    name: str
    phase: str
    message: str
    mode: str
    fallback: str
    weight_now: float | None
    weight_target: float | None
    move: str
    """The weight move: ``stable``, ``moving`` or ``isolated`` (``unknown`` before a status)."""
    steps: list[StepLine] = field(default_factory=list)
    paused_by_spec: bool = False
    abort: tuple[str, str] | None = None
    analysis: list[Metric] = field(default_factory=list)
    analysis_failure: str | None = None
    measured_at: str | None = None
    conditions: list[dict[str, str]] = field(default_factory=list)
    replicas: int = 0
    pending_replicas: list[str] = field(default_factory=list)
    excluded_replicas: list[str] = field(default_factory=list)
    status_writer: str | None = None
    last_seen_at: str | None = None
    generation: int | None = None
    observed_generation: int | None = None

    @property
    def healthy(self) -> bool:
        """Neither aborted nor degraded (what ``rollout status`` exits 0 for)."""
        return self.phase not in ("Aborted", "Degraded")

    @property
    def behind(self) -> bool:
        """The status is of an older generation of the spec (the operator has not acted on
        the last edit yet): its phase is not the edited rollout's."""
        return _behind(self.generation, self.observed_generation)

    @property
    def done(self) -> bool:
        """Nothing left to do: completed, aborted or degraded (``--watch`` stops there), as
        the status of the spec's latest generation says (as ``kubectl rollout status``)."""
        return not self.behind and self.phase in ("Completed", "Aborted", "Degraded")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, camelCase like the CR."""
        return {
            "namespace": self.namespace, "name": self.name, "phase": self.phase,
            "message": self.message, "mode": self.mode, "fallback": self.fallback,
            "weight": {"now": self.weight_now, "target": self.weight_target,
                       "move": self.move},
            "pausedBySpec": self.paused_by_spec,
            "steps": [{"number": s.number, "text": s.text, "state": s.state,
                       "remainingSeconds": None if s.remaining is None
                       else round(s.remaining.total_seconds())} for s in self.steps],
            "abort": None if self.abort is None
            else {"reason": self.abort[0], "message": self.abort[1]},
            "analysis": {"measuredAt": self.measured_at, "failure": self.analysis_failure,
                         "metrics": [{"name": m.name, "value": m.value, "limit": m.limit,
                                      "ok": m.ok} for m in self.analysis]},
            "conditions": self.conditions,
            "replicas": {"reporting": self.replicas, "pending": self.pending_replicas,
                         "excluded": self.excluded_replicas, "statusWriter": self.status_writer,
                         "lastSeenAt": self.last_seen_at},
            "generation": self.generation, "observedGeneration": self.observed_generation,
        }


def _behind(generation: object, observed: object) -> bool:
    return isinstance(generation, int) and isinstance(observed, int) and observed < generation


def _time(text: object) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _duration(text: object) -> timedelta | None:
    if not isinstance(text, str):
        return None
    try:
        return parse_duration(text)
    except ValueError:
        return None


def _describe(step: Mapping[str, Any]) -> str:
    if "setWeight" in step:
        return f"setWeight {float(step['setWeight']):g}"
    pause = step.get("pause") or {}
    if pause.get("duration") is None:
        return "pause until promoted"
    return f"pause {pause['duration']}"


def _steps(spec: Mapping[str, Any], status: Mapping[str, Any], now: datetime) -> list[StepLine]:
    steps: Sequence[Mapping[str, Any]] = spec.get("steps") or []
    index = status.get("currentStepIndex")
    index = index if isinstance(index, int) else 0
    started = _time(status.get("stepStartedAt"))
    lines = []
    for number, step in enumerate(steps, start=1):
        state: StepState = ("done" if number - 1 < index else
                            "current" if number - 1 == index else "pending")
        remaining = None
        duration = _duration((step.get("pause") or {}).get("duration"))
        if state == "current" and duration is not None and started is not None:
            remaining = max(timedelta(0), started + duration - now)
        lines.append(StepLine(number, _describe(step), state, remaining))
    return lines


def _target(spec: Mapping[str, Any]) -> float | None:
    if spec.get("abort"):
        return 0.0
    if spec.get("promote"):
        return 100.0
    weights = [float(s["setWeight"]) for s in spec.get("steps") or [] if "setWeight" in s]
    if weights:
        return weights[-1]
    weight = spec.get("weight")
    return float(weight) if isinstance(weight, int | float) else None


def _analysis(spec: Mapping[str, Any], status: Mapping[str, Any]) -> list[Metric]:
    limits = spec.get("analysis") or {}
    measured = status.get("analysis") or {}
    rows = []
    for name, key, limit_key in (("error rate", "errorRate", "maxErrorRate"),
                                 ("mismatch rate", "mismatchRate", "maxMismatchRate"),
                                 ("fallbacks", "fallbacks", "maxFallbacks")):
        limit = limits.get(limit_key)
        if not isinstance(limit, int | float):
            continue
        value = measured.get(key)
        value = float(value) if isinstance(value, int | float) else None
        rows.append(Metric(name, value, float(limit), value is None or value <= limit))
    return rows


def summarize(body: Mapping[str, Any], *, now: datetime) -> RolloutSummary:
    """The summary of one LockMigration object (as JSON) at ``now``."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    conditions = [
        {k: str(c.get(k) or "") for k in ("type", "status", "reason", "message")}
        for c in status.get("conditions") or []
    ]
    aborted = next((c for c in conditions if c["type"] == "Aborted" and c["status"] == "True"),
                   None)
    transition = status.get("transition") or {}
    weight = status.get("currentWeight")
    analysis = status.get("analysis") or {}
    message = str(status.get("message") or "the operator has not reported yet")
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if _behind(generation, observed):
        message += (f" (the status is of generation {observed}; the operator has not acted "
                    f"on generation {generation} yet)")
    return RolloutSummary(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        phase=str(status.get("phase") or "Pending"),
        message=message,
        mode=str(status.get("mode") or spec.get("mode") or "route"),
        fallback=str(spec.get("fallback") or "legacy"),
        weight_now=float(weight) if isinstance(weight, int | float) else None,
        weight_target=_target(spec),
        move=str(transition.get("phase") or "unknown"),
        steps=_steps(spec, status, now),
        paused_by_spec=bool(spec.get("paused")),
        abort=(aborted["reason"], aborted["message"]) if aborted else None,
        analysis=_analysis(spec, status),
        analysis_failure=analysis.get("failure"),
        measured_at=analysis.get("measuredAt"),
        conditions=conditions,
        replicas=int(transition.get("replicas") or 0),
        pending_replicas=list(transition.get("pendingReplicas") or []),
        excluded_replicas=list(transition.get("excludedReplicas") or []),
        status_writer=status.get("statusWriter"),
        last_seen_at=status.get("lastSeenAt"),
        generation=generation,
        observed_generation=observed,
    )


def remaining_text(remaining: timedelta) -> str:
    """``4m12s`` left of a pause (whole seconds)."""
    return format_duration(timedelta(seconds=round(remaining.total_seconds())))
