"""The ``LockMigration`` custom resource: how much lock traffic the enhanced locker takes.

A migration names its LockPolicy and moves lock keys from the legacy locker to the enhanced
one, either at a fixed ``weight`` (percent of keys, two decimals) or through ``steps`` in the
manner of Argo Rollouts (``setWeight``, ``pause`` with or without a duration). ``abort`` sends
every key back to legacy (weight 0) through the same safe handover; ``promote`` sends every key
to enhanced (weight 100). ``mode: shadow`` keeps legacy authoritative while enhanced replays.

Fields left out keep the service's own settings, as for the LockPolicy.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from enhanced_locking.kube.models import (
    Condition,
    CRDuration,
    LocalObjectReference,
    SpecModel,
    StatusModel,
    cel,
    conditions_schema_extra,
    validations,
)

__all__ = [
    "Analysis",
    "LockMigrationSpec",
    "LockMigrationStatus",
    "Pause",
    "Shadow",
    "Step",
    "step_weight",
]

Weight = Annotated[float, Field(ge=0, le=100)]
"""Percent of lock keys on the enhanced side; routing resolves 0.01 (finer is rounded)."""

Rate = Annotated[float, Field(ge=0, le=1)]


class Pause(SpecModel):
    """Wait before the next step: for ``duration``, or until ``paused`` is cleared."""

    duration: CRDuration | None = Field(
        None, description="How long to pause; left out: until a user resumes the rollout."
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

    window: CRDuration | None = Field(None, description="Window the rates are measured over.")
    max_error_rate: Rate | None = Field(
        None, description="Largest share of enhanced requests that may fail (0..1)."
    )
    max_mismatch_rate: Rate | None = Field(
        None, description="Largest share of shadow comparisons that may disagree (0..1)."
    )
    max_fallbacks: int | None = Field(
        None, ge=0, le=1_000_000, description="Most fallbacks to legacy within the window."
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
    paused: bool | None = Field(None, description="Hold the rollout at its current step.")
    abort: bool | None = Field(
        None, description="Send every key back to legacy (weight 0) through a safe handover."
    )
    promote: bool | None = Field(
        None, description="Send every key to enhanced (weight 100), skipping the steps left."
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


class LockMigrationStatus(StatusModel):
    """What the operator observed and where traffic goes now."""

    observed_generation: int | None = Field(
        None, ge=0, description="The metadata.generation the operator last acted on."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="Ready: the service routes as this generation of the spec says.",
        json_schema_extra=conditions_schema_extra(),
    )
    current_weight: float | None = Field(
        None, ge=0, le=100, description="Percent of lock keys the service routes to enhanced."
    )
    current_step_index: int | None = Field(
        None, ge=0, le=64, description="The rollout step in force (with spec.steps)."
    )
    mode: Literal["route", "shadow"] | None = Field(None, description="The routing mode in force.")
    applied_config_hash: str | None = Field(
        None, max_length=64, description="Hash of the configuration the service runs."
    )
    applied_generation: int | None = Field(
        None, ge=0, description="The service's configuration generation (GET /v1/config)."
    )
