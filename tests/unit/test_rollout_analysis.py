"""The analysis (kube/analysis.py): rates over a sliding window, checks every interval, and
``failureLimit`` failed checks in a row before it asks for an abort; on a moved clock."""

from __future__ import annotations

from typing import Any

from enhanced_locking.kube.analysis import Analyzer, Check, Totals
from enhanced_locking.kube.lockmigration import Analysis


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def analysis(**fields: Any) -> Analysis:
    return Analysis.model_validate({"window": "10s", "interval": "1s", **fields})


def run(analyzer: Analyzer, clock: Clock, spec: Analysis, samples: list[Totals],
        every: float = 0.5) -> list[Check]:
    checks = []
    for totals in samples:
        check = analyzer.observe(totals, spec)
        if check is not None:
            checks.append(check)
        clock.now += every
    return checks


def test_the_error_rate_is_failed_over_all_enhanced_operations_in_the_window() -> None:
    clock = Clock()
    analyzer = Analyzer(clock=clock)
    spec = analysis(maxErrorRate=0.1)
    # 100 operations a second, 20 of them failing: a rate of 0.2.
    samples = [Totals(operations=50 * i, errors=10 * i) for i in range(8)]
    checks = run(analyzer, clock, spec, samples)
    assert len(checks) == 3  # the first sample starts the clock; then one check a second
    last = checks[-1]
    assert last.error_rate == 0.2 and last.operations == 300 and last.abort
    assert last.failure is not None
    assert "error rate 0.2 (60 of 300 enhanced operations in 3.0s) is above maxErrorRate 0.1" \
        in last.failure


def test_failure_limit_tolerates_that_many_failed_checks_in_a_row() -> None:
    clock = Clock()
    analyzer = Analyzer(clock=clock)
    spec = analysis(maxFallbacks=2, failureLimit=2)
    samples = [Totals(fallbacks=3 * i) for i in range(9)]
    checks = run(analyzer, clock, spec, samples)
    assert [c.consecutive_failures for c in checks] == [1, 2, 3, 4]
    assert [c.abort for c in checks] == [False, False, True, True]
    assert checks[0].failure == "6 fallbacks in 1.0s are more than maxFallbacks 2"


def test_a_passing_check_resets_the_count_of_failures() -> None:
    clock = Clock()
    analyzer = Analyzer(clock=clock)
    spec = analysis(window="1s", maxFallbacks=0, failureLimit=1)
    totals = [0, 0, 1, 1, 1, 1, 2, 2, 2]
    checks = run(analyzer, clock, spec, [Totals(fallbacks=f) for f in totals])
    assert [c.consecutive_failures for c in checks] == [1, 0, 1, 0]
    assert not any(c.abort for c in checks)


def test_only_the_window_counts_old_errors_fall_out_of_it() -> None:
    clock = Clock()
    analyzer = Analyzer(clock=clock)
    spec = analysis(window="2s", maxErrorRate=0.5)
    burst = [Totals(operations=10, errors=10)] * 2  # an early burst of errors
    healthy = [Totals(operations=10 + 10 * i, errors=10) for i in range(1, 12)]
    checks = run(analyzer, clock, spec, [Totals(), *burst, *healthy])
    assert checks[0].abort  # the burst is inside the window
    assert checks[-1].error_rate == 0.0 and checks[-1].window_seconds == 2.0
    assert not checks[-1].abort


def test_rates_with_nothing_to_divide_by_are_not_measured_and_cannot_fail() -> None:
    clock = Clock()
    analyzer = Analyzer(clock=clock)
    spec = analysis(maxErrorRate=0, maxMismatchRate=0)
    checks = run(analyzer, clock, spec, [Totals()] * 5)
    assert checks and all(c.error_rate is None and c.mismatch_rate is None for c in checks)
    assert not any(c.failure for c in checks)


def test_the_mismatch_rate_is_shadow_mismatches_over_replays() -> None:
    clock = Clock()
    analyzer = Analyzer(clock=clock)
    spec = analysis(maxMismatchRate=0.01)
    checks = run(analyzer, clock, spec,
                 [Totals(replayed=100 * i, mismatches=2 * i) for i in range(4)])
    assert checks[-1].mismatch_rate == 0.02 and checks[-1].abort
    assert "mismatch rate 0.02 (4 of 200 shadow replays in 1.0s)" in (checks[-1].failure or "")


def test_without_thresholds_nothing_is_checked_and_samples_stay_bounded() -> None:
    clock = Clock()
    analyzer = Analyzer(clock=clock)
    assert run(analyzer, clock, analysis(), [Totals()] * 10) == []
    year = analysis(window="8760h", maxFallbacks=1)
    run(analyzer, clock, year, [Totals()] * 5000, every=60)
    assert len(analyzer._samples) <= 1001


def test_reset_starts_the_window_afresh() -> None:
    clock = Clock()
    analyzer = Analyzer(clock=clock)
    spec = analysis(maxErrorRate=0.1)
    run(analyzer, clock, spec, [Totals(operations=10 * i, errors=10 * i) for i in range(4)])
    assert analyzer.consecutive_failures > 0
    analyzer.reset()
    checks = run(analyzer, clock, spec, [Totals(operations=40 + i, errors=40) for i in range(4)])
    assert analyzer.consecutive_failures == 0 and not checks[-1].abort
