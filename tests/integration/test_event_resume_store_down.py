"""A resume (``Last-Event-ID``) while the shared event store is stopped does not wait for it
without bound: after ``RESUME_WAIT`` the reader gets a ``gap`` with ``reason: "unavailable"``,
and once the store is back the stream goes on from the resume point. A real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from tests.support.locks import request_for
from tests.support.redis_fixtures import redis_config
from tests.support.redis_server import RedisServer

from enhanced_locking.backends import shared_events
from enhanced_locking.backends.redis_events import RedisEventBus
from enhanced_locking.events import Following, Gap, parse_event_id
from enhanced_locking.factory import LockService
from enhanced_locking.provider import ConfigProvider
from enhanced_locking.types import Event

pytestmark = pytest.mark.redis

WAIT = 1.5


@pytest.fixture
async def service(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
                  ) -> AsyncIterator[LockService]:
    """A service on ``redis_server`` whose resumes wait ``WAIT`` seconds at most."""
    monkeypatch.setattr(shared_events, "RESUME_WAIT", WAIT)
    service = LockService(ConfigProvider(redis_config(
        redis_server, enabled=True, backend="redis", legacy_backend="memory")))
    await service.start()
    try:
        yield service
    finally:
        await service.close()


async def _acquired(service: LockService, *pulls: int) -> tuple[RedisEventBus, list[Event]]:
    """The service's bus and the ``acquired`` events of the pulls' grants, as read live."""
    bus = service.events.bus
    assert isinstance(bus, RedisEventBus)
    live = bus.follow(announce=True)
    assert isinstance(await asyncio.wait_for(anext(live), 10), Following)
    for pull in pulls:
        assert (await service.router.acquire(request_for(pull=pull, path=f"p{pull}"))).acquired
    events = [await asyncio.wait_for(anext(live), 10) for _ in pulls]
    assert all(isinstance(e, Event) and e.type == "acquired" for e in events)
    return bus, [e for e in events if isinstance(e, Event)]


async def test_a_resume_while_redis_is_stopped_gets_an_unavailable_gap_in_bounded_time(
    redis_server: RedisServer, service: LockService,
) -> None:
    bus, [first] = await _acquired(service, 1)
    # An id after what this replica read (another replica's, say): the resume would wait for
    # the reader to reach it, which it cannot while the store is stopped.
    ms, seq = parse_event_id(first.id)
    ahead = f"{ms}-{seq + 5}"
    redis_server.stop()

    resumed = bus.follow(ahead, max_lag=100, announce=True)
    began = time.monotonic()
    gap = await asyncio.wait_for(anext(resumed), WAIT + 10)
    waited = time.monotonic() - began
    assert gap == Gap(after=ahead, oldest=None, reason="unavailable")
    assert WAIT - 0.2 <= waited < WAIT + 5
    assert isinstance(await asyncio.wait_for(anext(resumed), 5), Following)

    # The store back, what comes after the resume point reaches the stream (the acquire is
    # answered as the store's restart quarantine says: an event either way).
    redis_server.start()
    await service.router.acquire(request_for(pull=2, path="envs/other"))
    later = await asyncio.wait_for(anext(resumed), 30)
    assert isinstance(later, Event)
    assert parse_event_id(later.id) > parse_event_id(ahead)


async def test_a_resume_with_redis_answering_is_not_cut_short(service: LockService) -> None:
    bus, [first, second] = await _acquired(service, 1, 2)
    resumed = bus.follow(first.id, max_lag=100, announce=True)
    assert isinstance(await asyncio.wait_for(anext(resumed), 10), Following)
    again = await asyncio.wait_for(anext(resumed), 10)
    assert isinstance(again, Event) and again.id == second.id
