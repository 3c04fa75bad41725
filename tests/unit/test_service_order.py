"""The service order (``backends/waiting.py``): the table every implementation shares, and a
property check against a second, independent reading of the rule."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.support.locks import candidate_for, request_for
from tests.support.ordering_cases import CASES, OrderCase

from enhanced_locking.backends.waiting import QueuePolicy, Waiter, epoch_ms, service_order
from enhanced_locking.types import Priority

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def at(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


def waiter(name: str, priority: str, enqueued_ms: int, seq: int) -> Waiter:
    candidate = candidate_for(request_for(pull=seq, priority=Priority(priority)))
    return Waiter(id=name, candidates=(candidate,), ttl=None, enqueued_at=at(enqueued_ms),
                  deadline=at(enqueued_ms + 3_600_000), seq=seq)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_the_service_order_table(case: OrderCase) -> None:
    policy = QueuePolicy(priority=case.priority_queue,
                         starvation_threshold=timedelta(milliseconds=case.threshold_ms),
                         max_boost=case.max_boost)
    waiters = [waiter(*w) for w in case.waiters]
    served = service_order(waiters, now=at(case.now_ms), policy=policy)
    assert tuple(w.id for w in served) == case.served


def reference_level(priority: Priority, waited_ms: int, policy: QueuePolicy) -> int:
    """The rule as DESIGN §3 words it, written independently of the module."""
    if not policy.priority:
        return 0
    threshold = policy.starvation_threshold.total_seconds() * 1000
    raised = 0 if threshold <= 0 else math.floor(max(waited_ms, 0) / threshold)
    return min(3, priority.level + min(policy.max_boost, raised))


WAITERS = st.lists(
    st.tuples(st.sampled_from(list(Priority)), st.integers(0, 10_000)), min_size=1, max_size=12,
)


@given(WAITERS, st.integers(0, 20_000), st.booleans(), st.integers(0, 5_000), st.integers(0, 3))
def test_the_order_agrees_with_the_rule_read_independently(
    entries: list[tuple[Priority, int]], now_ms: int, on: bool, threshold_ms: int, boost: int,
) -> None:
    policy = QueuePolicy(priority=on, starvation_threshold=timedelta(milliseconds=threshold_ms),
                         max_boost=boost)
    waiters = [waiter(f"w{i}", p.value, ms, i) for i, (p, ms) in enumerate(entries)]
    served = service_order(waiters, now=at(now_ms), policy=policy)
    keys = [(-reference_level(w.priority, now_ms - epoch_ms(w.enqueued_at), policy),
             epoch_ms(w.enqueued_at), w.seq) for w in served]
    assert keys == sorted(keys)
    assert sorted(w.id for w in served) == sorted(w.id for w in waiters)
