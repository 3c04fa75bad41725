"""An etcd connection that keeps the ``Status`` calls it makes, for tests of the leader
search and of a watch's move (both ask every endpoint at once)."""

from __future__ import annotations

import asyncio
from typing import Any

from enhanced_locking.backends.etcd_connection import EtcdConnection, EtcdSettings


class Asking(EtcdConnection):
    """A connection that keeps each ``Status`` it asks an endpoint, and how it ended, in
    order: ``("asked", endpoint)``, then ``("answered" | "failed" | "cancelled", endpoint)``."""

    def __init__(self, settings: EtcdSettings) -> None:
        super().__init__(settings)
        self.asks: list[tuple[str, str]] = []
        self._news = asyncio.Condition()

    async def answered(self, count: int) -> None:
        """Until ``count`` asks have answered."""
        async with self._news:
            await self._news.wait_for(
                lambda: [how for how, _ in self.asks].count("answered") >= count)

    async def _status(self, target: str) -> Any | None:
        self.asks.append(("asked", target))
        try:
            status = await super()._status(target)
        except asyncio.CancelledError:
            self.asks.append(("cancelled", target))
            raise
        except BaseException:
            self.asks.append(("failed", target))
            raise
        self.asks.append(("answered", target))
        async with self._news:
            self._news.notify_all()
        return status
