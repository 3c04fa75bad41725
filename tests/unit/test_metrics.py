"""The hot path's counts and timings read through the registry exactly as prometheus-client's
own ``inc`` and ``observe`` would have made them, whenever the registry is read."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from enhanced_locking.metrics import Metrics

LABELS = {"backend": "enhanced", "outcome": "acquired"}
OTHER = {"backend": "legacy", "outcome": "acquired"}

amounts = st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), max_size=60)


def _samples(metrics: Metrics, labels: dict[str, str]) -> dict[tuple[str, str], float]:
    """Every sample of the acquire histogram with ``labels``, by name and bucket bound."""
    found = {}
    for family in metrics.registry.collect():
        if family.name != "enhanced_locking_acquire_duration_seconds":
            continue
        for sample in family.samples:
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                found[(sample.name, sample.labels.get("le", ""))] = sample.value
    return found


@given(first=amounts, second=amounts)
def test_a_timing_reads_as_the_histogram_observed_the_same_amounts(
    first: list[float], second: list[float]
) -> None:
    metrics = Metrics()
    timing = metrics.timing(metrics.acquire_seconds, "enhanced", "acquired")
    plain = metrics.acquire_seconds.labels("legacy", "acquired")
    for rounds in (first, second):  # read between the rounds: what moved is not moved again
        for amount in rounds:
            timing.observe(amount)
            plain.observe(amount)
        ours, theirs = _samples(metrics, LABELS), _samples(metrics, OTHER)
        assert ours.keys() == theirs.keys()
        for name, value in ours.items():
            assert value == theirs[name] or abs(value - theirs[name]) <= 1e-9 * abs(value), name


def test_a_count_reads_through_the_registry_each_time_it_is_read() -> None:
    metrics = Metrics()
    count = metrics.counting(metrics.acquires, "enhanced", "acquired")
    assert metrics.counting(metrics.acquires, "enhanced", "acquired") is count
    read = metrics.registry.get_sample_value
    for expected in (1, 3, 3, 10):
        while count.total < expected:
            count.inc()
        assert read("enhanced_locking_acquire_total", LABELS) == expected
    assert b'enhanced_locking_acquire_total{backend="enhanced",outcome="acquired"} 10.0' in (
        metrics.exposition())


def test_enhanced_operations_read_the_same_in_the_tallies_and_the_export() -> None:
    metrics = Metrics()
    for _ in range(7):
        metrics.enhanced_operation()
    metrics.enhanced_error()
    read = metrics.registry.get_sample_value
    assert metrics.tallies().enhanced_operations == 7
    assert read("enhanced_locking_backend_operations_total", {"backend": "enhanced"}) == 7
    assert read("enhanced_locking_backend_errors_total", {"backend": "enhanced"}) == 1


def test_the_acquire_buckets_reach_below_an_in_process_acquire() -> None:
    """An uncontended acquire on the embedded store takes about 0.06 ms in the locker (the
    locker table of docs/benchmarks.md: 0.061 ms p50, 0.125 ms p99). The first bucket was
    0.5 ms: every such acquire fell in it, and a dashboard's p50 and p99 of the acquire read
    0.25 ms and 0.5 ms (interpolated inside the bucket) whatever the store did. Buckets down
    to 0.1 ms tell a 60 µs acquire from a 300 µs one."""
    metrics = Metrics()
    timing = metrics.timing(metrics.acquire_seconds, "enhanced", "acquired")
    for amount in (0.00006, 0.0003):
        timing.observe(amount)
    buckets = {le: value for (name, le), value in _samples(metrics, LABELS).items()
               if name.endswith("_bucket")}
    assert buckets["0.0001"] == 1, buckets
    assert buckets["0.0005"] == 2, buckets
