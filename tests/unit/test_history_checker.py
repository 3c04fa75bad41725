"""The history checker itself finds what it is meant to find (so a clean run means something)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tests.history import FreezeWindow, GroupLimit, History, Hold


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


# --- leases ------------------------------------------------------------------------------------
def test_a_lease_ends_a_hold_its_client_had_not_released_yet() -> None:
    """The store frees a leased lock at its end: the next grant after it is no double grant,
    but one before it is, and its token must still be higher."""
    assert History(holds=[Hold("a", "k", 1, 0.0, 5.0, lease_end=3.0),
                          Hold("b", "k", 2, 3.5, 4.0)]).violations() == []
    early = History(holds=[Hold("a", "k", 1, 0.0, 5.0, lease_end=3.0),
                           Hold("b", "k", 2, 2.5, 4.0)]).violations()
    assert early == ["k: b (token 2) was granted while a (token 1) still held it"]
    falling = History(holds=[Hold("a", "k", 5, 0.0, 5.0, lease_end=3.0),
                             Hold("b", "k", 4, 3.5, 4.0)]).violations()
    assert falling == ["k: token 4 of b came after token 5 of a"]


def test_a_grant_answered_after_its_lease_ended_held_nothing() -> None:
    """Its answer came after the lease it was granted with had run out: the key was free from
    then on, so the grants after it, held before or beside its late answer, are none of its
    business; it is counted apart."""
    late = Hold("a", "k", 1, 1.0, 1.004, lease_end=0.9)
    for others in ([Hold("b", "k", 2, 0.5, 2.0)], [Hold("b", "k", 2, 1.001, 2.0)],
                   [Hold("b", "k", 2, 0.2, 0.5)]):
        recorded = History(holds=[*others, late])
        assert recorded.violations() == []
        assert recorded.lapsed_on_arrival() == [late]
    # A lease that ended while the answer was on its way but after it arrived is held.
    held = Hold("a", "k", 3, 1.0, 1.004, lease_end=1.002)
    assert History(holds=[held, Hold("b", "k", 4, 1.001, 2.0)]).violations() == [
        "k: b (token 4) was granted while a (token 3) still held it"]


# --- shared and exclusive ---------------------------------------------------------------------
def modes(*holds: tuple[str, str, int, float, float, str], **rules: Any) -> History:
    recorded = History(**rules)
    for client, key, token, start, end, mode in holds:
        recorded.record(Hold(client, key, token, start, end, mode=mode))
    return recorded


def test_shared_holds_of_a_key_may_overlap() -> None:
    assert modes(("a", "k", 1, 0.0, 2.0, "shared"), ("b", "k", 2, 0.5, 1.0, "shared"),
                 ("c", "k", 3, 0.7, 3.0, "shared"), ("d", "k", 4, 3.5, 4.0, "exclusive"),
                 ).violations() == []


def test_an_exclusive_hold_beside_a_shared_one_is_a_double_grant() -> None:
    problems = modes(("a", "k", 1, 0.0, 2.0, "shared"), ("b", "k", 2, 0.5, 1.0, "shared"),
                     ("c", "k", 3, 1.5, 3.0, "exclusive")).violations()
    assert problems == ["k: c (token 3) was granted while a (token 1) still held it"]
    problems = modes(("a", "k", 1, 0.0, 2.0, "exclusive"),
                     ("b", "k", 2, 0.5, 1.0, "shared")).violations()
    assert problems == ["k: b (token 2) was granted while a (token 1) still held it"]


def test_an_exclusive_hold_is_checked_against_every_hold_it_overlaps() -> None:
    problems = modes(("a", "k", 1, 0.0, 3.0, "shared"), ("b", "k", 2, 0.5, 3.0, "shared"),
                     ("c", "k", 3, 1.0, 2.0, "exclusive")).violations()
    assert problems == ["k: c (token 3) was granted while a (token 1) still held it",
                        "k: c (token 3) was granted while b (token 2) still held it"]


def test_tokens_rise_across_an_exclusive_hold_not_between_shared_ones() -> None:
    # Shared b began after shared a ended, with a lower token: b may have been granted first.
    assert modes(("a", "k", 5, 0.0, 1.0, "shared"), ("b", "k", 4, 2.0, 3.0, "shared"),
                 ).violations() == []
    problems = modes(("a", "k", 5, 0.0, 1.0, "exclusive"),
                     ("b", "k", 4, 2.0, 3.0, "shared")).violations()
    assert problems == ["k: token 4 of b came after token 5 of a"]
    problems = modes(("a", "k", 5, 0.0, 1.0, "shared"), ("b", "k", 6, 0.5, 1.5, "shared"),
                     ("c", "k", 6, 2.0, 3.0, "exclusive")).violations()
    assert "k: token 6 of c came after token 6 of b" in problems


# --- concurrency limits -----------------------------------------------------------------------
GROUP = GroupLimit("envs", frozenset({"k1", "k2", "k3"}), limit=2)


def test_a_group_at_its_limit_is_clean_and_back_to_back_is_not_at_once() -> None:
    assert modes(("a", "k1", 1, 0.0, 2.0, "exclusive"), ("b", "k2", 1, 0.5, 1.0, "shared"),
                 ("c", "k2", 2, 1.0, 1.5, "shared"), ("d", "k3", 1, 2.0, 3.0, "exclusive"),
                 ("e", "other", 1, 0.0, 3.0, "exclusive"), limits=[GROUP]).violations() == []


def test_more_holders_in_a_group_than_its_limit_are_reported() -> None:
    problems = modes(("a", "k1", 1, 0.0, 2.0, "exclusive"), ("b", "k2", 1, 0.5, 1.5, "shared"),
                     ("c", "k2", 2, 1.0, 1.8, "shared"), limits=[GROUP]).violations()
    assert problems == ["group envs: 3 held at once, over its limit 2: a on k1 (token 1), "
                        "b on k2 (token 1), c on k2 (token 2)"]
    assert modes(("a", "k1", 1, 0.0, 2.0, "exclusive"), ("b", "k2", 1, 0.5, 1.5, "shared"),
                 ("c", "k2", 2, 1.0, 1.8, "shared")).most_at_once(GROUP.keys) == 3


# --- freezes ----------------------------------------------------------------------------------
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
FREEZE = FreezeWindow("release", frozenset({"prod"}), T0, T0 + timedelta(seconds=10))


def granted(client: str, key: str, token: int, seconds: float) -> Hold:
    return Hold(client, key, token, seconds, seconds + 1,
                granted_at=T0 + timedelta(seconds=seconds))


def test_grants_before_after_or_outside_a_freeze_are_clean() -> None:
    recorded = History(freezes=[FREEZE])
    for hold in (granted("a", "prod", 1, -5), granted("b", "prod", 2, 10),
                 granted("c", "dev", 1, 5)):
        recorded.record(hold)
    assert recorded.violations() == []


def test_a_grant_inside_a_freeze_is_reported() -> None:
    recorded = History(freezes=[FREEZE])
    recorded.record(granted("a", "prod", 1, 0))
    recorded.record(granted("b", "prod", 2, 9.5))
    assert recorded.violations() == [
        "prod: a (token 1) was granted at 2026-12-01T12:00:00+00:00, inside freeze release "
        "(2026-12-01T12:00:00+00:00 to 2026-12-01T12:00:10+00:00)",
        "prod: b (token 2) was granted at 2026-12-01T12:00:09.500000+00:00, inside freeze "
        "release (2026-12-01T12:00:00+00:00 to 2026-12-01T12:00:10+00:00)"]
