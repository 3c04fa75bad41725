"""The service order as a table of cases, for every implementation of it to be checked against.

Each case is a policy, a moment and some waiters (priority, enqueued at, seq), with the order in
which they must be served. ``tests/unit/test_service_order.py`` checks
:func:`enhanced_locking.backends.waiting.service_order` against it; a backend that computes the
order elsewhere (the Redis Lua scripts) runs the same table through its own code.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CASES", "OrderCase"]


@dataclass(frozen=True)
class OrderCase:
    name: str
    priority_queue: bool
    threshold_ms: int
    max_boost: int
    now_ms: int
    waiters: tuple[tuple[str, str, int, int], ...]
    """(name, priority, enqueued_ms, seq)"""
    served: tuple[str, ...]


CASES: tuple[OrderCase, ...] = (
    OrderCase("fifo when the priority queue is off", False, 1000, 3, 10_000,
              (("a", "low", 1, 1), ("b", "critical", 2, 2), ("c", "normal", 3, 3)),
              ("a", "b", "c")),
    OrderCase("by level, fifo within a level", True, 1_000_000, 3, 100,
              (("a", "normal", 1, 1), ("b", "high", 2, 2), ("c", "normal", 3, 3),
               ("d", "high", 4, 4), ("e", "critical", 5, 5), ("f", "low", 6, 6)),
              ("e", "b", "d", "a", "c", "f")),
    OrderCase("one threshold waited lifts one level, and ties go to the earlier", True, 100, 3,
              250, (("low", "low", 100, 1), ("normal", "normal", 200, 2)),
              ("low", "normal")),
    OrderCase("just below a threshold does not lift", True, 100, 3, 199,
              (("low", "low", 100, 1), ("normal", "normal", 150, 2)),
              ("normal", "low")),
    OrderCase("the boost stops at max-priority-boost", True, 10, 1, 10_000,
              (("low", "low", 0, 1), ("high", "high", 9_999, 2)),
              ("high", "low")),
    OrderCase("the level stops at critical: then fifo", True, 10, 3, 10_000,
              (("old-low", "low", 0, 1), ("critical", "critical", 9_999, 2),
               ("old-high", "high", 5, 3)),
              ("old-low", "old-high", "critical")),
    OrderCase("zero boost means no aging", True, 10, 0, 10_000,
              (("low", "low", 0, 1), ("normal", "normal", 9_999, 2)),
              ("normal", "low")),
    OrderCase("zero threshold means no aging", True, 0, 3, 10_000,
              (("low", "low", 0, 1), ("normal", "normal", 9_999, 2)),
              ("normal", "low")),
    OrderCase("the same millisecond falls back to seq", True, 1000, 3, 10,
              (("second", "normal", 5, 8), ("first", "normal", 5, 7)),
              ("first", "second")),
    OrderCase("a clock that went backwards ages nobody", True, 100, 3, 50,
              (("low", "low", 1_000, 1), ("normal", "normal", 2_000, 2)),
              ("normal", "low")),
)
