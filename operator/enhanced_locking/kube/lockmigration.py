"""The ``LockMigration`` custom resource: how much lock traffic the enhanced locker takes.

A migration names its LockPolicy and moves lock keys from the legacy locker to the enhanced
one, either at a fixed ``weight`` (percent of keys, two decimals) or through ``steps`` in the
manner of Argo Rollouts (``setWeight``, ``pause`` with or without a duration). ``abort`` sends
every key back to legacy (weight 0) through the same safe handover; ``promote`` sends every key
to enhanced (weight 100). ``mode: shadow`` keeps legacy authoritative while enhanced replays.

The rollout's progress (step, phase, when the step started, the last promote handled) lives in
the status, so a restarted operator carries on where the last one stopped; :mod:`.rollout` is
the state machine that advances it. The status is read back only through
:func:`read_status`, into :class:`LockMigrationStatus`, the model it is written from. Two
annotations are one-shot requests (a new value is a new request; the status records the last
value handled): ``PROMOTE_ANNOTATION`` skips the pause in
progress, ``RETRY_ANNOTATION`` restarts an aborted rollout from its first step.

Fields left out keep the service's own settings, as for the LockPolicy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from enhanced_locking.kube.models import (
    GROUP,
    Condition,
    CRDuration,
    LocalObjectReference,
    PositiveCRDuration,
    ReplicaName,
    SpecModel,
    StatusModel,
    Timestamp,
    cel,
    conditions_schema_extra,
    validations,
)

__all__ = [
    "PROMOTE_ANNOTATION",
    "RETRY_ANNOTATION",
    "Analysis",
    "AnalysisStatus",
    "Counters",
    "LockMigrationSpec",
    "LockMigrationStatus",
    "Pause",
    "Phase",
    "Shadow",
    "Step",
    "TransitionState",
    "read_status",
    "step_weight",
]

Weight = Annotated[float, Field(ge=0, le=100)]
"""Percent of lock keys on the enhanced side; routing resolves 0.01 (finer is rounded)."""

Rate = Annotated[float, Field(ge=0, le=1)]

PROMOTE_ANNOTATION = f"{GROUP}/promote"
"""A new value skips the pause the rollout is in (``kubectl annotate ... --overwrite``)."""

RETRY_ANNOTATION = f"{GROUP}/retry"
"""A new value restarts an aborted rollout from its first step."""

Phase = Literal["Progressing", "Paused", "Completed", "Aborted", "Degraded"]

_Count = Annotated[int, Field(ge=0)]
_Time = Annotated[str, Field(max_length=64, json_schema_extra={"format": "date-time"})]
_Text = Annotated[str, Field(max_length=1024)]
_Token = Annotated[str, Field(max_length=253)]


class Pause(SpecModel):
    """Wait before the next step: for ``duration``, or until a promote."""

    duration: CRDuration | None = Field(
        None, description="How long to pause; left out: until promoted (the annotation "
        f"{GROUP}/promote set to a new value)."
    )


class Step(SpecModel):
    """One rollout step: exactly one of ``setWeight`` and ``pause``."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.setWeight) != has(self.pause)",
                "each step sets exactly one of setWeight and pause",
            )
        )
    )

    set_weight: Weight | None = Field(None, description="Move the weight to this percent.")
    pause: Pause | None = Field(None, description="Pause the rollout.")

    @model_validator(mode="after")
    def _one_kind(self) -> Step:
        if (self.set_weight is None) == (self.pause is None):
            raise ValueError("each step sets exactly one of setWeight and pause")
        return self


class Analysis(SpecModel):
    """Thresholds that roll the migration back automatically when passed."""

    window: PositiveCRDuration | None = Field(
        None, description="Window the rates are measured over (above 0; default 5m)."
    )
    max_error_rate: Rate | None = Field(
        None, description="Largest share of enhanced requests that may fail (0..1)."
    )
    max_mismatch_rate: Rate | None = Field(
        None, description="Largest share of shadow comparisons that may disagree (0..1)."
    )
    max_fallbacks: int | None = Field(
        None, ge=0, le=1_000_000, description="Most fallbacks to legacy within the window."
    )
    interval: PositiveCRDuration | None = Field(
        None, description="How often the thresholds are checked (above 0; default 10s)."
    )
    failure_limit: int | None = Field(
        None, ge=0, le=100,
        description="Failed checks in a row tolerated before the rollout is aborted (default "
        "0: the first failed check aborts).",
    )


class Shadow(SpecModel):
    """Shadow-mode settings."""

    sample_ratio: Rate | None = Field(
        None, description="Share of operations replayed on the enhanced side (0..1)."
    )


class LockMigrationSpec(SpecModel):
    """Where lock traffic goes while moving from the legacy locker to the enhanced one."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.weight) || !has(self.steps)",
                "spec.weight and spec.steps are mutually exclusive: set one of them",
            ),
            cel(
                "!(has(self.abort) && self.abort && has(self.promote) && self.promote)",
                "spec.abort and spec.promote cannot both be true",
            ),
        )
    )

    policy_ref: LocalObjectReference = Field(
        description="The LockPolicy this migration belongs to (same namespace)."
    )
    mode: Literal["route", "shadow"] | None = Field(
        None, description="route: the weight decides; shadow: legacy decides, enhanced replays."
    )
    weight: Weight | None = Field(
        None, description="Percent of lock keys routed to the enhanced locker (0..100)."
    )
    steps: list[Step] | None = Field(
        None, min_length=1, max_length=64, description="Rollout steps, instead of a weight."
    )
    paused: bool | None = Field(
        None, description="Hold the rollout at its current step (with spec.steps)."
    )
    abort: bool | None = Field(
        None, description="Send every key back to legacy (weight 0) through a safe handover."
    )
    promote: bool | None = Field(
        None,
        description="Promote fully: every key to enhanced (weight 100), skipping the steps "
        "left. To skip only the pause in progress, set the annotation "
        f"{PROMOTE_ANNOTATION} to a new value.",
    )
    fallback: Literal["legacy", "fail-closed"] | None = Field(
        None, description="When the enhanced backend is unreachable: use legacy or refuse."
    )
    analysis: Analysis | None = Field(None, description="Automatic rollback thresholds.")
    shadow: Shadow | None = Field(None, description="Shadow-mode settings.")

    @model_validator(mode="after")
    def _exclusive(self) -> LockMigrationSpec:
        if self.weight is not None and self.steps is not None:
            raise ValueError("spec.weight and spec.steps are mutually exclusive: set one of them")
        if self.abort and self.promote:
            raise ValueError("spec.abort and spec.promote cannot both be true")
        return self


def step_weight(steps: list[Step], index: int) -> float:
    """The weight in force at step ``index``: the last ``setWeight`` at or before it (else 0)."""
    weight = 0.0
    for step in steps[: max(index, 0) + 1]:
        if step.set_weight is not None:
            weight = step.set_weight
    return weight


class Counters(StatusModel):
    """Totals reported by the status writer's replica, carried over its restarts."""

    mismatches: _Count = Field(0, description="Shadow replays whose answer differed.")
    replayed: _Count = Field(0, description="Shadow replays run.")
    fallbacks: _Count = Field(
        0, description="Requests served by legacy (or refused) because enhanced did not answer."
    )
    errors: _Count = Field(0, description="Enhanced backend operations that failed.")
    operations: _Count = Field(0, description="Enhanced backend operations.")
    conflicts: _Count = Field(0, description="Keys held on both sides by different pulls, now.")


class TransitionState(StatusModel):
    """The weight move as the status writer's replica sees it (migration/transition.py)."""

    model_config = ConfigDict(populate_by_name=True)

    phase: Literal["stable", "moving", "isolated"] = Field(
        description="stable: the weight is the only authority on every live replica; moving: "
        "keys of the moving buckets are taken on both sides; isolated: this replica cannot "
        "report, so it takes every key on both sides."
    )
    to: float = Field(ge=0, le=100, description="The authoritative weight being moved to.")
    from_: list[Annotated[float, Field(ge=0, le=100)]] = Field(
        default_factory=list, alias="from", max_length=64,
        description="Other weights still in use somewhere (older requests, other replicas).",
    )
    pending_replicas: list[_Token] = Field(
        default_factory=list, max_length=64,
        description="Live replicas that have not applied the weight yet.",
    )
    excluded_replicas: list[_Token] = Field(
        default_factory=list, max_length=64,
        description="Replicas left out because they stopped reporting.",
    )
    replicas: _Count = Field(0, description="Replicas reporting (this one included).")
    started_at: _Time | None = Field(None, description="When the move in progress started.")
    last_settle_seconds: float | None = Field(
        None, ge=0, description="How long the last move took to settle on every replica."
    )
    last_error: _Text | None = Field(None, description="Why the replica registry failed.")


class AnalysisStatus(StatusModel):
    """The last check of the analysis thresholds."""

    measured_at: _Time = Field(description="When the check ran.")
    window_seconds: float = Field(ge=0, description="The span the check covered.")
    error_rate: float | None = Field(
        None, ge=0, le=1, description="Failed enhanced operations / enhanced operations."
    )
    mismatch_rate: float | None = Field(
        None, ge=0, le=1, description="Shadow mismatches / shadow replays."
    )
    fallbacks: _Count = Field(0, description="Fallbacks within the window.")
    operations: _Count = Field(0, description="Enhanced operations within the window.")
    replayed: _Count = Field(0, description="Shadow replays within the window.")
    consecutive_failures: _Count = Field(0, description="Failed checks in a row.")
    failure: _Text | None = Field(None, description="What the last failed check found.")


class LockMigrationStatus(StatusModel):
    """What the operator observed, where the rollout is, and where traffic goes now."""

    observed_generation: int | None = Field(
        None, ge=0, description="The metadata.generation the operator last acted on."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="Ready: the service routes as this generation of the spec says; "
        "Progressing, Paused, Completed, Aborted, Degraded: the rollout.",
        json_schema_extra=conditions_schema_extra(),
    )
    phase: Phase | None = Field(None, description="Where the rollout is.")
    message: _Text | None = Field(None, description="The phase in words.")
    current_weight: float | None = Field(
        None, ge=0, le=100, description="Percent of lock keys the service routes to enhanced."
    )
    current_step_index: int | None = Field(
        None, ge=0, le=64,
        description="The rollout step in force (with spec.steps); the number of steps once "
        "completed.",
    )
    step: Annotated[str, Field(max_length=16)] | None = Field(
        None, description="The step in force as N/M (for kubectl get)."
    )
    step_started_at: _Time | None = Field(
        None, description="When the step in force began (a pause: once the weight before it "
        "settled, moved later by the time its keys spent moving again).")
    promoted: _Token | None = Field(
        None, description="The last value of the promote annotation that was handled."
    )
    retried: _Token | None = Field(
        None, description="The last value of the retry annotation that was handled."
    )
    promote_waiting: _Token | None = Field(
        None, description="A value of the promote annotation that spec.paused holds back "
        "(it ends the pause in progress once spec.paused is cleared); told once by the Event "
        "PromoteWaiting."
    )
    counters: Counters | None = Field(None, description="Totals (see Counters).")
    transition: TransitionState | None = Field(None, description="The weight move.")
    analysis: AnalysisStatus | None = Field(None, description="The last analysis check.")
    status_writer: ReplicaName | None = Field(
        None, description="The replica (service process) that applied this configuration, "
        "writes this status and drives the rollout."
    )
    mode: Literal["route", "shadow"] | None = Field(None, description="The routing mode in force.")
    applied_config_hash: str | None = Field(
        None, max_length=64, description="Hash of the configuration the service runs."
    )
    applied_generation: int | None = Field(
        None, ge=0, description="The service's configuration generation (GET /v1/config)."
    )
    last_seen_at: Timestamp | None = Field(
        None, description="When that replica last confirmed it is alive and serving (renewed "
        "at each resync, 30s by default); an old time means the status may be stale."
    )


def read_status(raw: Mapping[str, Any] | None) -> tuple[LockMigrationStatus, list[str]]:
    """A LockMigration's status read back into the model it is written from, and what of it
    could not be read.

    The one way the operator reads a status (a restarted operator, a new status writer): every
    field by its model's name, so a field renamed in the model is renamed where it is read.
    The API server checks a status against the CRD's schema, made from this model, so a status
    it stored reads whole; what it cannot check is said, never guessed at: a field the model
    does not know (another version's, a renamed one) and a field that does not validate read as
    left out (the model's default: no step, no counters, no analysis check), and each is named
    in the list, for the log."""
    data = dict(raw or {})
    problems = [f"{path}: not a field of the status (read as left out)"
                for path in _unknown(LockMigrationStatus, data, "")]
    while True:
        try:
            return LockMigrationStatus.model_validate(data), problems
        except ValidationError as error:
            dropped = False
            for detail in error.errors():
                key = detail["loc"][0] if detail["loc"] else None
                if isinstance(key, str) and key in data:
                    del data[key]
                    dropped = True
                    where = ".".join(str(part) for part in detail["loc"])
                    problems.append(f"{where}: {detail['msg']} ({key} read as left out)")
            if not dropped:  # (not reached: every field of the status may be left out)
                return LockMigrationStatus(), problems


def _unknown(model: type[BaseModel], data: Mapping[str, Any], where: str) -> list[str]:
    """The paths of the keys of ``data`` (and of the models in it) that ``model`` does not
    know: the status models drop them unsaid (``extra="ignore"``)."""
    fields = model.model_fields
    by_key = {**fields, **{f.alias: f for f in fields.values() if f.alias}}
    found = []
    for key, value in data.items():
        field = by_key.get(key)
        if field is None:
            found.append(f"{where}{key}")
            continue
        inner = _model_in(field.annotation)
        for item in value if isinstance(value, list) else [value]:
            if inner is not None and isinstance(item, Mapping):
                found += _unknown(inner, item, f"{where}{key}.")
    return found


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model an annotation holds (``Model``, ``Model | None``, ``list[Model]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if (inner := _model_in(arg)) is not None:
            return inner
    return None
