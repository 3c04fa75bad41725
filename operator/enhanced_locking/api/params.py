"""Query parameters shared by the routes, strict as the schema says.

A pull number is ASCII digits (``pull=0.0``, ``pull=1e3`` or ``pull=+1`` are not integers and
answer 422), within Atlantis's range.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Query
from pydantic import BeforeValidator

__all__ = ["Key", "PullNum", "Repo"]

_DIGITS = re.compile(r"[0-9]{1,10}")


def _digits(value: object) -> object:
    if isinstance(value, str) and not _DIGITS.fullmatch(value):
        raise ValueError(f"expected a whole number of ASCII digits, got {value!r}")
    return value


Key = Annotated[str, Query(min_length=1, max_length=4096, description="The lock key.")]
Repo = Annotated[str, Query(min_length=1, max_length=512, description="owner/name")]
PullNum = Annotated[int, Query(ge=0, le=2**31 - 1, description="Pull request number."),
                    BeforeValidator(_digits)]
