"""An event bus's live events, from the moment the bus says the reader follows them.

``follow(announce=True)`` yields :class:`~enhanced_locking.events.Following` once the reader's
start is fixed; a bus over Redis or etcd first asks its store where "now" is. An event
published after that reaches the reader, so a test that publishes next needs no sleep to let
the reader "get there first"."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from enhanced_locking.events import Bus, Following
from enhanced_locking.types import Event

__all__ = ["followed"]

DEADLINE = 30.0
"""Seconds a bus may take to say it follows (it may load the store's history first)."""


async def followed(bus: Bus) -> AsyncIterator[Event]:
    """``bus``'s events published from now on, once it follows them (no gap: no bound)."""
    items = bus.follow(announce=True)
    first = await asyncio.wait_for(anext(items), DEADLINE)
    assert isinstance(first, Following), first

    async def events() -> AsyncIterator[Event]:
        async for item in items:
            assert isinstance(item, Event), item
            yield item

    return events()
