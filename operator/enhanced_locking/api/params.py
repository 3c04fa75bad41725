"""Query parameters shared by the routes, strict as the schema says.

A pull number is ASCII digits, after a ``-`` for Atlantis's runs without a pull request
(``pull=0.0``, ``pull=1e3`` or ``pull=+1`` are not integers and answer 422), within Atlantis's
range; so is a page's size (``limit=5.0`` or ``limit=1_0`` answer 422, not 5 or 10). A time
is RFC 3339 text (``2026-01-31T00:00:00Z``), as the schema's ``date-time`` says: a bare number
(``until=0.5``) is not read as a Unix time.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from fastapi import Query
from pydantic import BeforeValidator

from enhanced_locking.types import PULL_MAX, PULL_MIN

__all__ = ["Key", "OnlyRepo", "OptionalPullNum", "PageSize", "PullNum", "Repo", "Time"]

_DIGITS = re.compile(r"-?[0-9]+")
_LONGEST = 24
"""Digits read as they are: a longer number is past every bound of a query's numbers, and is
read as one of this many digits, which the parameter's own bound then refuses, naming it."""
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
                      r"([Zz]|[+-][0-9]{2}:[0-9]{2})?")


def _digits(value: object) -> object:
    if isinstance(value, str):
        if not _DIGITS.fullmatch(value):
            raise ValueError("expected a whole number of ASCII digits (a leading - for a "
                             f"negative one), got {value!r}")
        if len(value.lstrip("-")) > _LONGEST:
            return value[:1].strip("0123456789") + "9" * _LONGEST
    return value


def _rfc3339(value: object) -> object:
    if isinstance(value, str) and not _RFC3339.fullmatch(value):
        raise ValueError(f"expected an RFC 3339 time (2026-01-31T00:00:00Z), got {value!r}")
    return value


Key = Annotated[str, Query(min_length=1, max_length=4096, description="The lock key.")]
Repo = Annotated[str, Query(min_length=1, max_length=512, description="owner/name")]
OnlyRepo = Annotated[str | None, Query(
    min_length=1, max_length=512,
    description="Only a lock of this repository (two projects of different repositories can "
                "join to one key).")]
PullNum = Annotated[int, Query(ge=PULL_MIN, le=PULL_MAX, description=(
    "Pull request number (negative: Atlantis's runs without a pull request).")),
                    BeforeValidator(_digits)]
OptionalPullNum = Annotated[int | None, Query(ge=PULL_MIN, le=PULL_MAX), BeforeValidator(_digits)]
PageSize = Annotated[int, Query(ge=1, le=1000), BeforeValidator(_digits)]
Time = Annotated[datetime | None, BeforeValidator(_rfc3339)]
