"""Several service replicas in one process, sharing their stores and a replica registry.

Each replica is a full :class:`LockService` with its own provider (so each applies a weight
change when *it* is told, as pods do), all on one embedded store file (the SQLite file is the
shared database; every replica has its own connection) and one replica registry.

``replica_heartbeat`` defaults to an hour here: nothing happens on a timer, the tests drive
each replica's registry round with ``tick()`` (a config change still wakes a replica at once).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.support.locks import request_for

from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.factory import LockService
from enhanced_locking.hashing import bucket_of
from enhanced_locking.migration.routing_registry import RoutingRegistry
from enhanced_locking.provider import ConfigProvider
from enhanced_locking.types import LockRequest

__all__ = ["ReplicaSet", "request_in_buckets", "requests_in_buckets", "settled"]


class ReplicaSet:
    """Start, move and stop the replicas of one test."""

    def __init__(self, data_dir: Path, registry: RoutingRegistry) -> None:
        self.data_dir = data_dir
        self.registry = registry
        self.services: list[LockService] = []

    async def start(self, replica_id: str, **settings: Any) -> LockService:
        values: dict[str, Any] = {
            "data_dir": str(self.data_dir), "enabled": True, "backend": "boltdb",
            "legacy_backend": "boltdb", "replica_id": replica_id, "replica_heartbeat": "1h",
            **settings,
        }
        service = LockService(ConfigProvider(EnhancedLockingConfig(**values)),
                              routing_registry=self.registry)
        await service.start()
        self.services.append(service)
        return service

    async def set_weight(self, weight: float, *, on: Iterable[LockService] | None = None,
                         **more: Any) -> None:
        for service in self.services if on is None else on:
            await service.provider.set_layer("cluster", {"migration_weight": weight, **more})

    async def tick(self, rounds: int = 2) -> None:
        """Every replica reports and reads, twice (so each sees the others' latest)."""
        for _ in range(rounds):
            for service in self.services:
                await service.migration.transitions.tick()

    async def close(self) -> None:
        for service in reversed(self.services):
            await service.close()
        self.services.clear()

    async def __aenter__(self) -> ReplicaSet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def requests_in_buckets(lo: int, hi: int, *, count: int, **fields: Any) -> list[LockRequest]:
    """``count`` distinct requests whose key's bucket is in ``lo <= b < hi``."""
    found: list[LockRequest] = []
    for i in range(1_000_000):
        request = request_for(path=f"modules/m{i}", **fields)
        if lo <= bucket_of(request.key) < hi:
            found.append(request)
            if len(found) == count:
                return found
    raise AssertionError(f"no {count} keys in buckets {lo}..{hi}")


def request_in_buckets(lo: int, hi: int, **fields: Any) -> LockRequest:
    return requests_in_buckets(lo, hi, count=1, **fields)[0]


SETTLE_DEADLINE = 10.0


async def settled(service: LockService) -> None:
    """Until ``service``'s move settled (its loop runs on wake-ups and its heartbeat)."""
    async with asyncio.timeout(SETTLE_DEADLINE):
        await service.migration.transitions.wait_settled()
