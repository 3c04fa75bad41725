"""Go-style durations (``30s``, ``2m``, ``1h30m``, ``250ms``), the form Atlantis users write.

Atlantis is a Go program and its users configure it with Go's ``time.ParseDuration`` syntax, so
every duration we accept (config, CRs, HTTP requests) uses the same grammar, and every duration
we print is formatted back the way Go would print it.
"""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = [
    "DURATION_FORM", "DURATION_PATTERN", "LEASE_FORM", "LEASE_PATTERN", "LEAST_LEASE",
    "MAX_LENGTH", "Duration", "Lease", "LeaseOrNone", "Ttl", "format_duration", "parse_duration",
]

DURATION_FORM = "a Go duration such as 500ms, 30s, 2m or 1h30m"

# Microseconds per unit: Python's timedelta resolution. Parsing is exact (decimal arithmetic,
# never floats), so every printed duration reads back to the same value.
_UNITS = {
    "ns": Decimal("0.001"),
    "us": Decimal(1),
    "µs": Decimal(1),
    "ms": Decimal(1_000),
    "s": Decimal(1_000_000),
    "m": Decimal(60_000_000),
    "h": Decimal(3_600_000_000),
}
_MAX_MICROS = (2**63 - 1) // 1000  # Go's time.Duration is int64 nanoseconds
# ASCII digits only (``\d`` would take any script's digits), and a fraction only after a digit
# and with digits: exactly what ``DURATION_PATTERN`` publishes, so schema and parser agree.
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")
MAX_LENGTH = 32
DEFAULT_MAX_TIMEOUT = timedelta(minutes=5)
"""``enhanced-locking-max-timeout`` unless set: the longest wait of a service with default
settings (a client that may not read a service's configuration bounds a wait by it)."""

# Written once for both Python and the CRD schemas (a JSON-schema `pattern`).
DURATION_PATTERN = r"^(0|([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+)$"


def parse_duration(text: str) -> timedelta:
    """Parse a non-negative Go duration; raise ``ValueError`` naming the accepted form.

    Strict as Go's ``time.ParseDuration``: no surrounding spaces, ASCII digits only; at most
    ``MAX_LENGTH`` characters (what the published schemas say).
    """
    value = text
    if len(value) > MAX_LENGTH:
        raise ValueError(f"expected {DURATION_FORM} of at most {MAX_LENGTH} characters, "
                         f"got {text[:40]!r}")
    if value == "0":
        return timedelta(0)
    position, micros = 0, Decimal(0)
    for match in _PART.finditer(value):
        if match.start() != position:
            break
        micros += Decimal(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position == 0 or position != len(value):
        raise ValueError(f"expected {DURATION_FORM}, got {text!r}")
    if micros > _MAX_MICROS:
        raise ValueError(
            f"expected {DURATION_FORM} of at most 2562047h (Go's limit), got {text!r}"
        )
    return timedelta(microseconds=int(micros.to_integral_value(ROUND_HALF_EVEN)))


def _decimal(amount: int, unit: int) -> str:
    """``amount / unit`` written exactly, without trailing zeros (``1500, 1000`` is ``1.5``)."""
    whole, fraction = divmod(amount, unit)
    if not fraction:
        return str(whole)
    digits = str(fraction).rjust(len(str(unit)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"


def format_duration(value: timedelta) -> str:
    """Format like Go's ``Duration.String``, leaving out zero units (``1h30m``, not ``1h30m0s``).

    Below a second Go switches to ``ms`` and ``µs`` (``1.5ms``); above, it writes hours,
    minutes and seconds with a decimal fraction (``26h1.5s``). Every result parses back exactly.
    """
    micros = value // timedelta(microseconds=1)
    if micros < 0:
        return "-" + format_duration(-value)
    if micros == 0:
        return "0s"
    if micros < 1_000:
        return f"{micros}µs"
    if micros < 1_000_000:
        return _decimal(micros, 1_000) + "ms"
    minutes, seconds = divmod(micros, 60_000_000)
    hours, minutes = divmod(minutes, 60)
    return "".join([
        f"{hours}h" if hours else "",
        f"{minutes}m" if minutes else "",
        _decimal(seconds, 1_000_000) + "s" if seconds else "",
    ])


def _coerce(value: object) -> object:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ValueError(f"expected {DURATION_FORM}, got the bare number {value!r} (add a unit)")
    if not isinstance(value, timedelta):  # a boolean, a list...: not a duration
        raise ValueError(f"expected {DURATION_FORM}, got {value!r}")
    return value


Duration = Annotated[
    timedelta,
    BeforeValidator(_coerce),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN, "maxLength": MAX_LENGTH}),
]
"""A ``timedelta`` read from and written as a Go duration string."""


def _no_vanishing_lease(value: object) -> object:
    if (isinstance(value, str) and any(digit in value for digit in "123456789")
            and _coerce(value) == timedelta(0)):
        raise ValueError(f"{value!r} is under half a microsecond, which rounds to no lease at "
                         "all: write 0 for none, or at least 1ms")
    return value


LEAST_LEASE = timedelta(milliseconds=1)
"""The shortest lease a lock may have (0 is none): the stores count leases in whole ms."""


def _lease_in_ms(value: timedelta) -> timedelta:
    if timedelta(0) < value < LEAST_LEASE:
        raise ValueError(f"{format_duration(value)} is under 1ms, and leases are counted in "
                         "whole ms: write 0 for none, or at least 1ms")
    return value


Ttl = Annotated[Duration, BeforeValidator(_no_vanishing_lease), AfterValidator(_lease_in_ms)]
"""A lock's lease as a :data:`Duration`: 0 for none, else at least :data:`LEAST_LEASE`. A
written non-zero one that rounds to 0 at the microsecond (``400ns``) is refused as such: it
read as no lease at all."""

LeaseOrNone = (BeforeValidator(_no_vanishing_lease), AfterValidator(_lease_in_ms))
"""The checks of :data:`Ttl`, for another duration type to add (a CR's lease)."""


_ANY_PART = r"[0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h)"
LEASE_PATTERN = rf"^({_ANY_PART})*[1-9][0-9]*(\.[0-9]+)?(ms|s|m|h)({_ANY_PART})*$"
"""A lease: a Go duration with at least one whole millisecond, second, minute or hour in it,
so it is never zero (and never rounds to zero at the microsecond)."""
LEASE_FORM = "a Go duration of at least 1ms such as 30s, 10m or 1h"


def _lease(value: object) -> object:
    if isinstance(value, str):
        if len(value) > MAX_LENGTH or not re.fullmatch(LEASE_PATTERN, value):
            raise ValueError(f"expected {LEASE_FORM}, got {value!r}")
        return parse_duration(value)
    return _coerce(value)


Lease = Annotated[
    timedelta,
    BeforeValidator(_lease),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": LEASE_PATTERN, "maxLength": MAX_LENGTH}),
]
"""A positive ``timedelta`` written as a Go duration (a lease to refresh to)."""
