"""Go-style durations (``30s``, ``2m``, ``1h30m``, ``250ms``), the form Atlantis users write.

Atlantis is a Go program and its users configure it with Go's ``time.ParseDuration`` syntax, so
every duration we accept (config, CRs, HTTP requests) uses the same grammar, and every duration
we print is formatted back the way Go would print it.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = ["DURATION_FORM", "Duration", "format_duration", "parse_duration"]

DURATION_FORM = "a Go duration such as 500ms, 30s, 2m or 1h30m"

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
# Written once for both Python and the CRD schemas (a JSON-schema `pattern`).
DURATION_PATTERN = r"^(0|([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+)$"


def parse_duration(text: str) -> timedelta:
    """Parse a non-negative Go duration; raise ``ValueError`` naming the accepted form."""
    value = text.strip()
    if value == "0":
        return timedelta(0)
    position, seconds = 0, 0.0
    for match in _PART.finditer(value):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position == 0 or position != len(value):
        raise ValueError(f"expected {DURATION_FORM}, got {text!r}")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """Format like Go's ``Duration.String`` for whole units (``1h30m0s`` becomes ``1h30m``)."""
    total_ms = round(value.total_seconds() * 1000)
    if total_ms == 0:
        return "0s"
    if total_ms % 1000:
        return f"{total_ms}ms" if total_ms < 1000 else f"{total_ms / 1000:g}s"
    hours, rest = divmod(total_ms // 1000, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [(hours, "h"), (minutes, "m"), (seconds, "s")]
    return "".join(f"{amount}{unit}" for amount, unit in parts if amount)


def _coerce(value: object) -> object:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ValueError(f"expected {DURATION_FORM}, got the bare number {value!r} (add a unit)")
    return value


Duration = Annotated[
    timedelta,
    BeforeValidator(_coerce),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN, "maxLength": 32}),
]
"""A ``timedelta`` read from and written as a Go duration string."""
