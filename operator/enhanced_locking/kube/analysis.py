"""Analysis: the service's own counters, checked against a LockMigration's thresholds.

The status writer samples the service's running totals (enhanced backend operations and their
failures, shadow replays and mismatches, fallbacks) at every rollout tick. Every ``interval`` it
checks the window behind it: the differences between the newest sample and the oldest one
inside ``window`` give

* the **error rate**: failed enhanced backend operations / enhanced backend operations,
* the **mismatch rate**: shadow mismatches / shadow replays,
* the **fallbacks**: requests served by legacy (or refused) because enhanced did not answer,

and a check *fails* when a rate is above its maximum or the fallbacks are more than allowed. A
rate with nothing to divide by (no enhanced operation in the window) is not measured, so it
cannot fail. As Argo Rollouts' ``failureLimit``, ``failureLimit`` failed checks in a row are
tolerated; the next one aborts the rollout. Until the window has filled (the process started,
or this replica became the status writer, less than a window ago) a check covers the time there
is. Totals are this process's own: with several replicas, the status writer judges by the
traffic it serves itself.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from enhanced_locking.kube.lockmigration import Analysis

__all__ = ["DEFAULT_INTERVAL", "DEFAULT_WINDOW", "Analyzer", "Check", "Totals", "has_thresholds"]

DEFAULT_WINDOW = timedelta(minutes=5)
DEFAULT_INTERVAL = timedelta(seconds=10)
SAMPLES_PER_WINDOW = 1000


@dataclass(frozen=True)
class Totals:
    """Running totals of one process at one instant."""

    operations: float = 0
    errors: float = 0
    replayed: float = 0
    mismatches: float = 0
    fallbacks: float = 0

    def __sub__(self, other: Totals) -> Totals:
        return Totals(*(max(0.0, a - b) for a, b in zip(self._values(), other._values(),
                                                        strict=True)))

    def __add__(self, other: Totals) -> Totals:
        return Totals(*(a + b for a, b in zip(self._values(), other._values(), strict=True)))

    def _values(self) -> tuple[float, ...]:
        return (self.operations, self.errors, self.replayed, self.mismatches, self.fallbacks)


@dataclass(frozen=True)
class Check:
    """One check of the thresholds over the window behind it."""

    window_seconds: float
    error_rate: float | None
    mismatch_rate: float | None
    fallbacks: int
    operations: int
    replayed: int
    failure: str | None
    consecutive_failures: int
    abort: bool


def _rate(part: float, whole: float) -> float | None:
    return None if whole <= 0 else min(1.0, part / whole)


def _seconds(value: float) -> str:
    return f"{value:.0f}s" if value >= 10 else f"{value:.1f}s"


class Analyzer:
    """Samples totals and checks thresholds every interval (drive it with :meth:`observe`)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._samples: collections.deque[tuple[float, Totals]] = collections.deque()
        self._last_check: float | None = None
        self.consecutive_failures = 0

    def reset(self, *, consecutive_failures: int = 0) -> None:
        """Start afresh (a restarted rollout, a new status writer)."""
        self._samples.clear()
        self._last_check = None
        self.consecutive_failures = consecutive_failures

    def observe(self, totals: Totals, spec: Analysis | None) -> Check | None:
        """Record a sample; when a check is due, run it and return it."""
        now = self._clock()
        window = (spec.window if spec and spec.window else DEFAULT_WINDOW).total_seconds()
        interval = (spec.interval if spec and spec.interval else DEFAULT_INTERVAL).total_seconds()
        # At most about a thousand samples per window, however long the window is.
        if not self._samples or now - self._samples[-1][0] >= window / SAMPLES_PER_WINDOW:
            self._samples.append((now, totals))
        # Keep one sample at or before the window's start, so a full window can be measured.
        while len(self._samples) > 1 and self._samples[1][0] <= now - window:
            self._samples.popleft()
        if spec is None or not has_thresholds(spec):
            return None
        if self._last_check is None:
            self._last_check = now  # the first sample: nothing to compare with yet
            return None
        if now - self._last_check < interval:
            return None
        self._last_check = now
        return self._check(spec, now, window, totals)

    def _check(self, spec: Analysis, now: float, window: float, totals: Totals) -> Check:
        start, oldest = self._samples[0]
        if start < now - window:
            start = now - window  # the sample before the window stands for its start
        delta = totals - oldest
        span = now - start
        error_rate = _rate(delta.errors, delta.operations)
        mismatch_rate = _rate(delta.mismatches, delta.replayed)
        failures: list[str] = []
        if spec.max_error_rate is not None and error_rate is not None \
                and error_rate > spec.max_error_rate:
            failures.append(
                f"error rate {error_rate:.3g} ({delta.errors:.0f} of {delta.operations:.0f} "
                f"enhanced operations in {_seconds(span)}) is above maxErrorRate "
                f"{spec.max_error_rate:g}")
        if spec.max_mismatch_rate is not None and mismatch_rate is not None \
                and mismatch_rate > spec.max_mismatch_rate:
            failures.append(
                f"mismatch rate {mismatch_rate:.3g} ({delta.mismatches:.0f} of "
                f"{delta.replayed:.0f} shadow replays in {_seconds(span)}) is above "
                f"maxMismatchRate {spec.max_mismatch_rate:g}")
        if spec.max_fallbacks is not None and delta.fallbacks > spec.max_fallbacks:
            failures.append(f"{delta.fallbacks:.0f} fallbacks in {_seconds(span)} are more than "
                            f"maxFallbacks {spec.max_fallbacks}")
        self.consecutive_failures = self.consecutive_failures + 1 if failures else 0
        limit = spec.failure_limit or 0
        return Check(
            window_seconds=round(span, 3),
            error_rate=None if error_rate is None else round(error_rate, 6),
            mismatch_rate=None if mismatch_rate is None else round(mismatch_rate, 6),
            fallbacks=int(delta.fallbacks),
            operations=int(delta.operations),
            replayed=int(delta.replayed),
            failure="; ".join(failures) or None,
            consecutive_failures=self.consecutive_failures,
            abort=self.consecutive_failures > limit,
        )


def has_thresholds(spec: Analysis | None) -> bool:
    """Whether ``spec`` sets a threshold to check (without one nothing is judged)."""
    return spec is not None and any(value is not None for value in
               (spec.max_error_rate, spec.max_mismatch_rate, spec.max_fallbacks))
