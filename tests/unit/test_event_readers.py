"""The event bus's bounded follow: a reader further behind than the bound gets a gap, never a
stream with silent holes; a resume within the bound replays exactly what followed."""

from __future__ import annotations

import asyncio

from enhanced_locking.api.sse import Frames
from enhanced_locking.events import EventBus, Following, Gap, parse_event_id
from enhanced_locking.types import (
    Candidate,
    Event,
    Lock,
    LockRequest,
    Project,
    Pull,
    utcnow,
)


def _publish(bus: EventBus, count: int) -> list[str]:
    ids = []
    for n in range(count):
        bus.publish("acquired", key=f"k{n}")
        event = bus.recent()[-1]
        assert event.key == f"k{n}"
        ids.append(event.id)
    return ids


async def _take(stream: object, count: int) -> list[Event | Gap | Following]:
    taken: list[Event | Gap | Following] = []
    for _ in range(count):
        taken.append(await asyncio.wait_for(anext(stream), 1))  # type: ignore[call-overload]
    return taken


async def test_a_resume_within_the_bound_replays_exactly_what_followed() -> None:
    bus = EventBus(capacity=100)
    ids = _publish(bus, 30)
    got = await _take(bus.follow(ids[9], max_lag=20), 20)
    assert [e.id for e in got if isinstance(e, Event)] == ids[10:]


async def test_a_resume_asking_for_more_than_the_bound_gets_a_gap_then_live_events() -> None:
    bus = EventBus(capacity=100)
    ids = _publish(bus, 30)
    stream = bus.follow(ids[0], max_lag=10)
    gap = await _take(stream, 1)
    assert isinstance(gap[0], Gap) and gap[0].reason == "replay" and gap[0].after == ids[0]
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    live = _publish(bus, 1)
    event = await asyncio.wait_for(waiting, 1)
    assert isinstance(event, Event) and event.id == live[0], "live from now, no replay"


async def test_a_resume_from_before_the_ring_gets_a_gap() -> None:
    bus = EventBus(capacity=10)
    ids = _publish(bus, 30)
    gap = await _take(bus.follow(ids[5], max_lag=1000), 1)
    assert isinstance(gap[0], Gap) and gap[0].reason == "replay" and gap[0].oldest == ids[20]


async def test_a_reader_that_falls_behind_gets_its_events_in_order_then_a_gap_and_the_end(
) -> None:
    bus = EventBus(capacity=1000)
    stream = bus.follow(None, max_lag=10)
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    ids = _publish(bus, 5)
    first = await asyncio.wait_for(waiting, 1)
    assert isinstance(first, Event) and first.id == ids[0]
    got = [first, *await _take(stream, 4)]  # the batch it had already seen
    ids += _publish(bus, 50)  # meanwhile it did not read
    last = await _take(stream, 1)
    assert [e.id for e in got if isinstance(e, Event)] == ids[:5]
    assert isinstance(last[0], Gap) and last[0].reason == "behind" and last[0].after == ids[4]
    assert await anext(stream, None) is None, "the stream ends after the gap"


async def test_without_a_bound_stream_keeps_every_event() -> None:
    bus = EventBus(capacity=1000)
    stream = bus.stream()
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    ids = _publish(bus, 300)
    got = [await asyncio.wait_for(waiting, 1)]
    for _ in range(299):
        got.append(await asyncio.wait_for(anext(stream), 1))
    assert [e.id for e in got] == ids


async def test_an_announced_reader_says_it_follows_before_its_first_event_and_misses_none(
) -> None:
    bus = EventBus(capacity=100)
    before = _publish(bus, 3)
    stream = bus.follow(None, max_lag=10, announce=True)
    assert isinstance(await asyncio.wait_for(anext(stream), 1), Following)
    after = _publish(bus, 2)  # published once it said so, none read yet: all are its own
    got = await _take(stream, 2)
    assert [e.id for e in got if isinstance(e, Event)] == after and before[-1] < after[0]


async def test_a_replay_beyond_the_bound_says_gap_then_that_it_follows() -> None:
    bus = EventBus(capacity=100)
    ids = _publish(bus, 30)
    stream = bus.follow(ids[0], max_lag=10, announce=True)
    gap, following = await _take(stream, 2)
    assert isinstance(gap, Gap) and gap.reason == "replay"
    assert isinstance(following, Following)
    live = _publish(bus, 1)
    assert [e.id for e in await _take(stream, 1) if isinstance(e, Event)] == live


async def test_a_reader_that_does_not_ask_is_not_told() -> None:
    bus = EventBus(capacity=100)
    stream = bus.follow(None, max_lag=10)
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    ids = _publish(bus, 1)
    assert [e.id for e in [await asyncio.wait_for(waiting, 1)] if isinstance(e, Event)] == ids


def _lock(repo: str, path: str) -> Lock:
    request = LockRequest(project=Project(repo_full_name=repo, path=path), pull=Pull(num=7))
    candidate = Candidate.of_request(request, priority=request.priority)
    return candidate.granted(acquired_at=utcnow(), expires_at=None, fencing_token=1)


async def test_every_reader_of_an_event_gets_the_one_event_built_when_first_read() -> None:
    bus = EventBus(capacity=10)
    lock = _lock("acme/infra", "envs/prod")
    bus.publish("acquired", lock=lock, key=lock.key)
    bus.publish("released", lock=lock, how="released", handedTo=())
    bus.publish("timeout", key="other/key", repo="acme/other", waiterId="w1")
    first = bus.recent(bus.recent()[0].id)  # the two newest, read first
    everything = bus.recent()
    assert [e.type for e in everything] == ["acquired", "released", "timeout"]
    assert everything[1] is first[0] and everything[2] is first[1]
    assert all(a is b for a, b in zip(bus.recent(), everything, strict=True))
    stream = bus.follow(everything[0].id)
    assert await _take(stream, 2) == first
    assert [e.id for e in everything] == sorted(
        (e.id for e in everything), key=lambda i: tuple(map(int, i.split("-"))))
    # A lock's event names the lock's repository and key; one without a lock, what it was told.
    assert [(e.key, e.repo, e.lock) for e in everything] == [
        (lock.key, "acme/infra", lock), (lock.key, "acme/infra", lock),
        ("other/key", "acme/other", None)]
    assert [e.details for e in everything] == [
        {}, {"how": "released", "handedTo": ()}, {"waiterId": "w1"}]


async def test_a_subscriber_and_a_later_reader_get_the_one_event() -> None:
    bus = EventBus(capacity=10)
    seen: list[Event] = []
    bus.subscribe(seen.append)
    lock = _lock("acme/infra", "envs/dev")
    bus.publish("acquired", lock=lock, key=lock.key)
    assert len(seen) == 1 and seen[0].repo == "acme/infra" and seen[0].lock is lock
    assert bus.recent() == seen and bus.recent()[0] is seen[0]


async def test_a_resume_from_before_a_restart_gets_a_gap() -> None:
    # The process restarted (a new bus): a client that had read 3 of the old one's 5 events
    # resumes after the third. Events 4 and 5 are gone with the old process: a gap, then
    # what the new one publishes. Before, the new ring was not full, so no gap: the client
    # got "following" and the new event, and never knew of 4 and 5.
    old = EventBus(capacity=100)
    ids = _publish(old, 5)
    await asyncio.sleep(0.002)  # the new process starts in a later millisecond
    new = EventBus(capacity=100)
    new.publish("acquired", key="after-restart")
    assert new.gap_since(ids[2]) and new.gap_since(ids[4])
    stream = new.follow(ids[2], max_lag=1000, announce=True)
    gap, following = await _take(stream, 2)
    assert isinstance(gap, Gap) and gap.reason == "replay" and gap.after == ids[2]
    assert isinstance(following, Following)
    # An id the new process never gave (above its newest) is a gap too; its own are not.
    assert new.gap_since(f"{parse_event_id(ids[4])[0] + 10**9}-0")
    own = new.recent()[-1].id
    assert not new.gap_since(own)



def test_readers_of_an_event_share_its_frame_and_another_event_of_its_id_gets_its_own() -> None:
    bus = EventBus(capacity=10)
    bus.publish("acquired", key="one")
    frames = Frames()
    frame = frames(bus.recent()[-1])
    assert frames(bus.recent()[-1]) is frame  # framed once for every reader
    # Another bus's event with the same id (two etcd clusters count revisions alike).
    other = bus.recent()[-1].model_copy(update={"key": "two"})
    assert b'"key":"two"' in frames(other) and b'"key":"one"' in frame
    assert frames(other) is frames(other)
