"""The bus the service's parts hold follows a switch of the store: publishing and subscribers
move to the new bus, and a reader of the old one gets what that bus still held, a ``gap``
(``switched``, with the new bus's id it resumes from), then the new bus's events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from tests.support.redis_server import free_port

from enhanced_locking.backends.redis_events import RedisEventBus
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import EventBus, Following, Gap, SwitchingBus, parse_event_id
from enhanced_locking.types import Event

Item = Event | Gap | Following


async def _take(stream: AsyncIterator[Item], count: int) -> list[Item]:
    return [await asyncio.wait_for(anext(stream), 2) for _ in range(count)]


async def _quiet(stream: AsyncIterator[Item]) -> None:
    """Nothing more comes on ``stream`` for a moment."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(stream), 0.1)


async def test_a_reader_gets_the_old_bus_events_then_a_switch_gap_then_the_new_bus() -> None:
    old, new = EventBus(), EventBus()
    bus = SwitchingBus(old)
    reader = bus.follow(max_lag=100, announce=True)
    (following,) = await _take(reader, 1)
    assert isinstance(following, Following) and following.at is not None
    bus.publish("acquired", key="before")
    (before,) = await _take(reader, 1)
    assert isinstance(before, Event) and before.key == "before"
    bus.publish("released", key="late")  # published on the old bus, not read yet
    assert bus.switch(new) is old
    assert old.retired.is_set() and bus.bus is new and bus.publish == new.publish
    late, gap = await _take(reader, 2)
    assert isinstance(late, Event) and late.key == "late"
    assert isinstance(gap, Gap) and gap.reason == "switched" and gap.after == late.id
    assert gap.resume is not None and gap.oldest is None
    bus.publish("acquired", key="after")
    (after,) = await _take(reader, 1)
    assert isinstance(after, Event) and after.key == "after"
    assert parse_event_id(after.id) > parse_event_id(gap.resume)
    assert [e.key for e in old.recent()] == ["before", "late"]  # the new bus had none
    assert [e.key for e in new.recent()] == ["after"]
    await _quiet(reader)
    # The resume id is the new bus's: a reader resuming there gets exactly what followed.
    assert not new.gap_since(gap.resume)
    resumed = bus.follow(gap.resume, max_lag=100, announce=True)
    assert [getattr(item, "key", None) for item in await _take(resumed, 2)] == [None, "after"]


async def test_the_resume_id_of_a_fresh_process_bus_resumes_without_a_gap() -> None:
    fresh = EventBus()
    bus = SwitchingBus(EventBus())
    reader = bus.follow(max_lag=10, announce=True)
    await _take(reader, 1)
    bus.switch(fresh)
    (gap,) = await _take(reader, 1)
    assert isinstance(gap, Gap) and gap.resume is not None
    assert not fresh.gap_since(gap.resume)  # the new bus's start: nothing before it
    assert fresh.gap_since("1-0")  # an id from before it: another bus's


async def test_subscribers_move_to_the_new_bus_and_leave_the_old() -> None:
    old, new = EventBus(), EventBus()
    bus = SwitchingBus(old)
    heard: list[str | None] = []
    stop = bus.subscribe(lambda event: heard.append(event.key))
    bus.publish("acquired", key="a")
    bus.switch(new)
    old.publish("acquired", key="old-bus")  # nobody of ours listens there any more
    bus.publish("acquired", key="b")
    stop()
    bus.publish("acquired", key="c")
    assert heard == ["a", "b"]


async def test_a_reader_whose_start_was_not_fixed_yet_is_moved_to_the_new_bus() -> None:
    """A switch before the reader's start was fixed (the old bus is a Redis stream that does
    not answer: it is still asking where "now" is). A reader from now missed nothing: it starts
    on the new bus, no gap. A reader that resumes from an id gets the gap (its id is the old
    bus's), then the new bus's events."""
    nowhere = EnhancedLockingConfig(redis_addr=f"127.0.0.1:{free_port()}")
    old, new = RedisEventBus.from_config(nowhere), EventBus()
    bus = SwitchingBus(old)
    try:
        fresh = bus.follow(max_lag=10, announce=True)
        resuming = bus.follow("5-0", max_lag=10, announce=True)
        starts = [asyncio.ensure_future(anext(fresh)), asyncio.ensure_future(anext(resuming))]
        await asyncio.sleep(0.05)
        assert not any(start.done() for start in starts)
        assert bus.switch(new) is old
        first, gap = await asyncio.wait_for(asyncio.gather(*starts), 2)
        assert isinstance(first, Following)
        assert isinstance(gap, Gap) and gap.reason == "switched" and gap.after == "5-0"
        assert isinstance(await asyncio.wait_for(anext(resuming), 2), Following)
        bus.publish("acquired", key="k")
        assert [getattr(i, "key", None) for i in await _take(fresh, 1)] == ["k"]
        assert [getattr(i, "key", None) for i in await _take(resuming, 1)] == ["k"]
    finally:
        await old.close()


async def test_a_reader_cut_off_behind_is_not_carried_to_the_new_bus() -> None:
    bus = SwitchingBus(EventBus())
    reader = bus.follow(max_lag=2, announce=True)
    await _take(reader, 1)
    for n in range(5):
        bus.publish("acquired", key=f"k{n}")
    (gap,) = await _take(reader, 1)
    assert isinstance(gap, Gap) and gap.reason == "behind"
    bus.switch(EventBus())
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(reader), 2)
