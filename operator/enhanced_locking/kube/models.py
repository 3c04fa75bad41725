"""Building blocks shared by the custom resource models: the base model, names, durations, CEL.

The CR models are the one source of truth for the CustomResourceDefinitions: ``crds.py``
turns their JSON schema into structural OpenAPI, so every bound written here (``max_length``,
``ge``/``le``, enums, patterns) is enforced twice, by the API server when a user applies a CR
and by pydantic when the operator reads one. Cross-field rules are written twice on purpose,
next to each other: a CEL rule (``x-kubernetes-validations``) for the API server and a
pydantic validator for the operator. Models do no I/O.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

from enhanced_locking.durations import (
    DURATION_PATTERN,
    Duration,
    LeaseOrNone,
    format_duration,
    parse_duration,
)

__all__ = [
    "GROUP",
    "MAX_DURATION",
    "VERSION",
    "CRDuration",
    "CRLease",
    "Condition",
    "ConditionStatus",
    "DnsName",
    "HourCRDuration",
    "LocalObjectReference",
    "MillisecondsCRDuration",
    "PositiveCRDuration",
    "ReplicaName",
    "SecretKeyRef",
    "SpecModel",
    "StatusModel",
    "Timestamp",
    "cel",
    "valid_duration",
    "validations",
]

GROUP = "locking.runatlantis.io"
VERSION = "v1alpha1"

MAX_DURATION = timedelta(hours=8760)
"""The longest duration a CR may name (a year): keeps every duration far from overflow."""

_MAX_DURATION_TEXT = "8760h"


def cel(
    rule: str, message: str, *, field_path: str | None = None, reason: str | None = None
) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry; ``field_path`` points the error at a field."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


def valid_duration(expr: str) -> str:
    """A CEL guard: ``expr`` is a string that ``duration()`` can parse.

    Rules that compare durations check this first, so a malformed value is reported once, by
    the schema's ``pattern``, and not a second time as a CEL evaluation error.
    """
    return f"{expr}.matches(r'{DURATION_PATTERN}')"


def _at_most_a_year(value: timedelta) -> timedelta:
    if value > MAX_DURATION:
        raise ValueError(f"must be at most {_MAX_DURATION_TEXT}, got {format_duration(value)}")
    return value


def _duration_schema(*rules: dict[str, str]) -> dict[str, Any]:
    """The schema of a CR's duration: a Go duration of at most a year, and ``rules``."""
    return {
        "type": "string",
        "maxLength": 32,
        "pattern": DURATION_PATTERN,
        "x-kubernetes-validations": [
            cel(
                f"!{valid_duration('self')} || "
                f"duration(self) <= duration('{_MAX_DURATION_TEXT}')",
                f"must be at most {_MAX_DURATION_TEXT} (a year)",
            ),
            *rules,
        ],
    }


CRDuration = Annotated[
    Duration, AfterValidator(_at_most_a_year), WithJsonSchema(_duration_schema())]
"""A Go duration in a CR: non-negative (the pattern has no sign), at most a year."""

CRLease = Annotated[
    Duration,
    *LeaseOrNone,
    AfterValidator(_at_most_a_year),
    WithJsonSchema(_duration_schema(cel(
        f"!{valid_duration('self')} || duration(self) == duration('0s') || "
        "duration(self) >= duration('1ms')",
        "must be 0 (no lease) or at least 1ms: leases are counted in whole ms",
    ))),
]
"""A lock's lease in a CR: a :data:`CRDuration` that is 0 (none) or at least 1ms."""


def _above_zero(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError(f"must be above 0, got {format_duration(value)}")
    return value


_UNDER_A_MICROSECOND = "must be at least 1us: durations are counted in whole microseconds"


def _no_vanishing_span(value: object) -> object:
    """A written span under half a microsecond (``400ns``) is refused as such: it rounds to 0."""
    if not isinstance(value, str) or not any(digit in value for digit in "123456789"):
        return value
    try:
        vanishes = parse_duration(value) == timedelta(0)
    except ValueError:
        return value  # malformed: the duration's own check names it
    if vanishes:
        raise ValueError(f"{_UNDER_A_MICROSECOND}, got {value!r}")
    return value


_POSITIVE_SPAN = (
    cel(f"!{valid_duration('self')} || duration(self) > duration('0s')", "must be above 0"),
    cel(f"!{valid_duration('self')} || duration(self) == duration('0s') || "
        "duration(self) >= duration('1us')", _UNDER_A_MICROSECOND),
)
"""The API server's rules of a span above 0 (and so at least the microsecond it is counted in)."""

PositiveCRDuration = Annotated[
    Duration,
    BeforeValidator(_no_vanishing_span),
    AfterValidator(_at_most_a_year),
    AfterValidator(_above_zero),
    WithJsonSchema(_duration_schema(*_POSITIVE_SPAN)),
]
"""A :data:`CRDuration` that must be above 0 (a span that 0 would make empty), and at least a
microsecond (the finest a duration is counted in: a shorter one would read as 0)."""


def _bound(limit: str, *, most: bool) -> tuple[AfterValidator, dict[str, str]]:
    """A duration's bound ``limit`` (at most, else at least), as the operator's check and the
    API server's rule, saying the same."""
    bound, said = parse_duration(limit), f"must be at {'most' if most else 'least'} {limit}"

    def check(value: timedelta) -> timedelta:
        if value > bound if most else value < bound:
            raise ValueError(f"{said}, got {format_duration(value)}")
        return value

    rule = f"!{valid_duration('self')} || duration(self) {'<=' if most else '>='} " \
           f"duration('{limit}')"
    return AfterValidator(check), cel(rule, said)


_AT_LEAST_1MS = _bound("1ms", most=False)
_AT_MOST_1H = _bound("1h", most=True)

MillisecondsCRDuration = Annotated[
    Duration,
    AfterValidator(_at_most_a_year),
    _AT_LEAST_1MS[0],
    WithJsonSchema(_duration_schema(_AT_LEAST_1MS[1])),
]
"""A :data:`CRDuration` of at least 1ms (a wait counted in whole milliseconds)."""

HourCRDuration = Annotated[
    Duration,
    BeforeValidator(_no_vanishing_span),
    _AT_MOST_1H[0],
    AfterValidator(_above_zero),
    WithJsonSchema(_duration_schema(*_POSITIVE_SPAN, _AT_MOST_1H[1])),
]
"""A :data:`PositiveCRDuration` of at most an hour (how long an answer may be reused)."""

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

DnsName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
"""The name of a Kubernetes object in the same namespace."""

Timestamp = Annotated[str, Field(max_length=64, json_schema_extra={"format": "date-time"})]
"""An RFC 3339 time in a status."""

ReplicaName = Annotated[str, Field(max_length=253)]
"""A replica's id (``--enhanced-locking-replica-id``, else host and process)."""

SecretKey = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]


class SpecModel(BaseModel):
    """Base of every spec model: frozen, camelCase as users write it, unknown fields refused."""

    model_config = ConfigDict(
        frozen=True, alias_generator=to_camel, populate_by_name=True, extra="forbid"
    )


class StatusModel(BaseModel):
    """Base of status models: the same spelling; unknown fields are dropped, not refused."""

    model_config = ConfigDict(
        frozen=True, alias_generator=to_camel, populate_by_name=True, extra="ignore"
    )


class LocalObjectReference(SpecModel):
    """An object of the same namespace, by name."""

    name: DnsName = Field(description="Name of the object, in the same namespace.")


class SecretKeyRef(SpecModel):
    """One key of a Secret in the same namespace."""

    name: DnsName = Field(description="Name of the Secret, in the same namespace.")
    key: SecretKey = Field(description="Key inside the Secret's data.")


_REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(StatusModel):
    """One observation about the object, in the shape of Kubernetes' ``metav1.Condition``."""

    type: Annotated[str, Field(min_length=1, max_length=316)]
    status: ConditionStatus
    reason: Annotated[str, Field(min_length=1, max_length=1024, pattern=_REASON)]
    message: Annotated[str, Field(max_length=32768)] = ""
    last_transition_time: Annotated[
        str, Field(max_length=64, json_schema_extra={"format": "date-time"})
    ]
    observed_generation: Annotated[int, Field(ge=0)] | None = None


def conditions_schema_extra() -> dict[str, Any]:
    """Conditions are a map keyed by ``type`` (server-side apply merges them by type)."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """A model's ``json_schema_extra`` carrying its CEL rules."""
    return {"x-kubernetes-validations": list(rules)}
