"""Waiting in real time for what a real process, server or cluster does next.

``wait_for`` polls a check until it returns something truthy and fails the test, naming what
it waited for (with the last value seen and, if given, ``details()`` such as a process's log),
when it does not come within ``timeout`` seconds. Tests on the loop's own clock wait with
:func:`tests.support.leases.until` instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

__all__ = ["wait_for"]

T = TypeVar("T")


def wait_for(
    what: str,
    check: Callable[[], T | None],
    *,
    timeout: float = 30,
    pause: float = 0.05,
    details: Callable[[], str] | None = None,
) -> T:
    """Poll ``check()`` every ``pause`` seconds until it returns something truthy (returned);
    fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            extra = f"\n{details()}" if details is not None else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r}){extra}")
        time.sleep(pause)
