"""Retrying: jittered exponential backoff on transient backend errors, and nothing else.

Only :class:`~enhanced_locking.types.BackendUnavailable` is retried (the store did not answer).
A definite answer (held, not owned, invalid) is never retried: it would not change. Nor is the
replica's own overload (:class:`~enhanced_locking.types.StoreBusy`: no pooled connection free
in time, the store answering): trying again at once adds to the load it is; the caller is
answered 503 ``overloaded`` with ``Retry-After`` instead, and may send it again after that.
The delay before attempt ``n + 1`` is drawn uniformly from ``[d/2, d]`` with
``d = backoff * 2**(n-1)`` ("equal jitter"), so a crowd of callers that failed together does
not retry together, and every caller still backs off at least half the nominal delay.

Retrying an operation whose reply was lost is safe because every backend operation the locker
retries is idempotent in effect: an acquire by the pull that now holds the key gets it back
unchanged, an enqueue is keyed by its waiter id, a release of a free key answers "not held".
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.metrics import Metrics
from enhanced_locking.types import BackendUnavailable, StoreBusy

__all__ = ["attempt", "backoff_delays", "retrying"]

T = TypeVar("T")


def backoff_delays(
    *, attempts: int, backoff: timedelta, rng: random.Random | None = None
) -> list[float]:
    """The sleeps (seconds) between ``attempts`` tries: equal jitter over a doubling base."""
    draw = rng or random
    base = backoff.total_seconds()
    return [draw.uniform(base * 2**n / 2, base * 2**n) for n in range(attempts - 1)]


async def attempt(operation: Callable[[], Awaitable[T]], metrics: Metrics) -> T:
    """Run ``operation`` once, counted: an enhanced operation, and an error if it failed.

    Every attempt counts (:class:`~enhanced_locking.metrics.Tallies`): the ratio of errors to
    operations is the error rate a LockMigration's analysis checks. An attempt the replica's
    overload stopped (``StoreBusy``: nothing was sent to the store) counts as neither: it says
    nothing of how the enhanced store serves, and must not roll a migration back.
    """
    busy = False
    try:
        return await operation()
    except StoreBusy:
        busy = True
        raise
    except BackendUnavailable:
        metrics.enhanced_error()
        raise
    finally:
        if not busy:
            metrics.enhanced_operation()


async def retrying(
    operation: Callable[[], Awaitable[T]],
    *,
    config: EnhancedLockingConfig,
    metrics: Metrics,
    name: str,
    tried_again: Callable[[BackendUnavailable], object] | None = None,
) -> T:
    """Run ``operation`` up to ``retry_max_attempts`` times while it raises ``BackendUnavailable``.

    Each try is an :func:`attempt` (counted); each failed one but the last is also a retry of
    ``name``, followed by a backoff sleep. ``StoreBusy`` (the replica overloaded) is raised at
    once, never retried. Only the last try's error reaches the caller: each earlier one is
    handed to ``tried_again`` first, for what it carries besides (an acquire's grant to learn
    of: :class:`~enhanced_locking.backends.waiting.GrantUnknown`).
    """
    delays = backoff_delays(attempts=config.retry_max_attempts, backoff=config.retry_backoff)
    for delay in delays:
        try:
            return await attempt(operation, metrics)
        except StoreBusy:
            raise
        except BackendUnavailable as error:
            metrics.retries.labels(name).inc()
            if tried_again is not None:
                tried_again(error)
        await asyncio.sleep(delay)
    return await attempt(operation, metrics)
