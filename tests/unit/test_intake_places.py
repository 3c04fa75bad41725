"""The intake's places: a bound, arrival order, a bounded wait, callers that go away."""

from __future__ import annotations

import asyncio

import pytest

from enhanced_locking.locking.intake import Intake, Place
from enhanced_locking.types import StoreBusy


async def _in_turn(intake: Intake, name: str, order: list[str]) -> Place:
    place = await intake.enter()
    order.append(name)
    return place


async def test_at_most_the_limit_are_in_and_the_others_enter_in_arrival_order() -> None:
    limit = 2
    intake = Intake(lambda: limit, setting="the-bound")
    first, second = intake.enter_now(), intake.enter_now()
    assert first is not None and second is not None
    assert intake.enter_now() is None and intake.inside == 2
    order: list[str] = []
    waiters = [asyncio.create_task(_in_turn(intake, f"w{n}", order)) for n in range(4)]
    await asyncio.sleep(0)
    assert intake.waiting == 4 and order == []
    first.leave()
    first.leave()  # a second leave gives up nothing more
    await asyncio.sleep(0)
    assert order == ["w0"] and intake.inside == 2
    second.leave()
    await asyncio.sleep(0)
    assert order == ["w0", "w1"] and intake.inside == 2
    # A newcomer finds others waiting: it does not pass them, though a place frees.
    assert intake.enter_now() is None
    for task in waiters[:2]:
        (await task).leave()
    await asyncio.sleep(0)
    assert order == ["w0", "w1", "w2", "w3"] and intake.inside == 2
    for task in waiters[2:]:
        (await task).leave()
    assert intake.inside == 0 and intake.waiting == 0


async def test_a_wait_past_the_bound_is_an_overload_and_frees_its_turn() -> None:
    intake = Intake(lambda: 1, setting="the-bound", wait=0.05)
    held = intake.enter_now()
    assert held is not None
    with pytest.raises(StoreBusy, match=r"limit of 1 .*\(the-bound\).*0\.05 s"):
        await intake.enter()
    assert intake.waiting == 0
    held.leave()
    assert intake.inside == 0 and intake.enter_now() is not None


async def test_a_caller_that_goes_away_gives_up_its_turn_or_passes_its_place_on() -> None:
    intake = Intake(lambda: 1, setting="the-bound")
    held = intake.enter_now()
    assert held is not None
    order: list[str] = []
    gone = asyncio.create_task(_in_turn(intake, "gone", order))
    after = asyncio.create_task(_in_turn(intake, "after", order))
    await asyncio.sleep(0)
    gone.cancel()  # still in line when the place frees: passed over
    held.leave()
    with pytest.raises(asyncio.CancelledError):
        await gone
    (await after).leave()
    assert order == ["after"] and intake.inside == 0
    # Handed a place and cancelled before it ran: the place goes to the next in line.
    held = intake.enter_now()
    assert held is not None
    handed = asyncio.create_task(_in_turn(intake, "handed", order))
    last = asyncio.create_task(_in_turn(intake, "last", order))
    await asyncio.sleep(0)
    held.leave()
    handed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handed
    (await last).leave()
    assert order == ["after", "last"] and intake.inside == 0 and intake.waiting == 0


async def test_a_lowered_limit_lets_none_in_until_below_it_and_a_raised_one_more() -> None:
    limit = 3
    intake = Intake(lambda: limit, setting="the-bound")
    places = [intake.enter_now() for _ in range(3)]
    order: list[str] = []
    waiters = [asyncio.create_task(_in_turn(intake, f"w{n}", order)) for n in range(3)]
    await asyncio.sleep(0)
    limit = 1
    for place in places[:2]:
        assert place is not None
        place.leave()
    await asyncio.sleep(0)
    assert order == [] and intake.inside == 1
    limit = 3
    last = places[2]
    assert last is not None
    last.leave()
    await asyncio.sleep(0)
    assert order == ["w0", "w1", "w2"] and intake.inside == 3
    for task in waiters:
        (await task).leave()
    assert intake.inside == 0
