"""The history checker itself finds what it is meant to find (so a clean run means something)."""

from __future__ import annotations

from tests.history import History, Hold


def history(*holds: tuple[str, str, int, float, float]) -> History:
    recorded = History()
    for hold in holds:
        recorded.record(Hold(*hold))
    return recorded


def test_back_to_back_holds_with_rising_tokens_are_clean() -> None:
    assert history(("a", "k", 1, 0.0, 1.0), ("b", "k", 2, 1.5, 2.0),
                   ("c", "other", 1, 0.5, 3.0)).violations() == []


def test_two_overlapping_holds_of_a_key_are_a_double_grant() -> None:
    problems = history(("a", "k", 1, 0.0, 1.0), ("b", "k", 2, 0.5, 2.0)).violations()
    assert problems == ["k: b (token 2) was granted while a (token 1) still held it"]


def test_a_token_that_does_not_rise_is_reported() -> None:
    problems = history(("a", "k", 5, 0.0, 1.0), ("b", "k", 4, 2.0, 3.0)).violations()
    assert problems == ["k: token 4 of b came after token 5 of a"]


def test_a_token_handed_out_twice_is_reported() -> None:
    problems = history(("a", "k", 3, 0.0, 1.0), ("b", "k", 3, 2.0, 3.0)).violations()
    assert "k: a fencing token was handed out twice" in problems
