"""50 clients on three replicas while the weight moves up and down: no double grant, no
falling fencing token.

The replicas share one embedded store and one replica registry and hear of each weight change
at different moments (as pods do); their registry rounds run on their own timers. Clients
acquire fail fast through a random replica, hold briefly and release through another; in the
second test they take one or two keys at a time in batches.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.grant_history import GrantHistory
from tests.support.locks import request_for
from tests.support.replicas import ReplicaSet, requests_in_buckets, settled

from enhanced_locking.factory import LockService
from enhanced_locking.migration.routing_registry import MemoryRoutingRegistry
from enhanced_locking.types import BatchItem, BatchLockRequest, LockRequest, Locks

CLIENTS = 50
MOVES = 30
BATCH_MOVES = 10
WEIGHTS = (0, 10, 25, 50, 75, 100)

Client = Callable[[int], Awaitable[None]]


def _requests() -> dict[str, LockRequest]:
    """A few keys in each band the weights cut, so every move catches some of them."""
    requests = {}
    for lo, hi in zip((0, 1000, 2500, 5000, 7500), (1000, 2500, 5000, 7500, 10_000),
                      strict=True):
        for request in requests_in_buckets(lo, hi, count=3):
            requests[request.key] = request
    return requests


@asynccontextmanager
async def _replicas(data_dir: Path) -> AsyncIterator[list[LockService]]:
    async with ReplicaSet(data_dir, MemoryRoutingRegistry()) as replicas:
        services = [await replicas.start(name, migration_weight=0, replica_heartbeat="100ms")
                    for name in ("a", "b", "c")]
        yield services
        for service in services:
            await settled(service)


async def _while_the_weight_moves(services: list[LockService], rng: random.Random,
                                  client: Client, stop: asyncio.Event, *,
                                  moves: int = MOVES) -> None:
    """``CLIENTS`` clients running until ``moves`` weight moves, heard by each replica a little
    later than the one before, are done."""

    async def mover() -> None:
        for _ in range(moves):
            weight = rng.choice(WEIGHTS)
            order = rng.sample(services, len(services))
            for service in order:  # each replica hears of it a little later
                await service.provider.set_layer("cluster", {"migration_weight": weight})
                await asyncio.sleep(rng.choice((0, 0.005, 0.02)))
            await asyncio.sleep(rng.choice((0.01, 0.03, 0.06)))
        stop.set()

    await asyncio.gather(mover(), *(client(n) for n in range(1, CLIENTS + 1)))


@dataclass(frozen=True)
class Asks:
    """How a client picks keys (from the keys and its random source), takes them through a
    replica (the locks, or ``None`` when refused) and releases them."""

    pick: Callable[[random.Random, list[str]], list[str]]
    take: Callable[[LockService, list[LockRequest], int], Awaitable[Locks | None]]
    release: Callable[[LockService, list[str], int], Awaitable[object]]


async def _history(data_dir: Path, asks: Asks, *, moves: int) -> tuple[GrantHistory, int]:
    """``CLIENTS`` clients asking through random replicas while the weight moves: what they
    were granted, and how many asks met a key moving on the replica asked."""
    rng = random.Random(7)
    history = GrantHistory()
    requests = _requests()
    keys = list(requests)
    both_sided = 0

    async with _replicas(data_dir) as services:
        stop = asyncio.Event()

        async def client(number: int) -> None:
            nonlocal both_sided
            who = f"client-{number}"
            while not stop.is_set():
                chosen = asks.pick(rng, keys)
                replica = rng.choice(services)
                both_sided += any(replica.migration.transitions.plan(key).both
                                  for key in chosen)
                locks = await asks.take(replica, [requests[key] for key in chosen], number)
                if locks is not None:
                    for lock in locks:
                        history.granted(who, lock)
                    await asyncio.sleep(rng.choice((0, 0, 0.001, 0.002)))
                    for key in chosen:
                        history.releasing(who, key)
                    await asks.release(rng.choice(services), chosen, number)
                else:
                    await asyncio.sleep(rng.choice((0, 0.001, 0.002)))

        await _while_the_weight_moves(services, rng, client, stop, moves=moves)
    return history, both_sided


async def _take_one(replica: LockService, requests: list[LockRequest],
                    number: int) -> Locks | None:
    [request] = requests
    result = await replica.router.acquire(
        request.model_copy(update={"pull": request_for(pull=number).pull}))
    if not result.acquired:
        return None
    assert result.lock is not None
    return [result.lock]


async def _release_one(replica: LockService, keys: list[str], number: int) -> object:
    [key] = keys
    return await replica.router.release(key, owner=("acme/infra", number))


async def _take_batch(replica: LockService, requests: list[LockRequest],
                      number: int) -> Locks | None:
    result = await replica.router.acquire_batch(BatchLockRequest(
        locks=[BatchItem(project=r.project, workspace=r.workspace) for r in requests],
        pull=request_for(pull=number).pull))
    return result.locks if result.acquired else None


async def _release_batch(replica: LockService, keys: list[str], number: int) -> object:
    return await replica.router.release_batch(keys, owner=("acme/infra", number))


async def test_no_double_grant_and_no_falling_token_while_the_weight_moves(
    data_dir: Path,
) -> None:
    asks = Asks(lambda rng, keys: [rng.choice(keys)], _take_one, _release_one)
    history, both_sided = await _history(data_dir, asks, moves=MOVES)

    assert history.violations == [], "\n".join(history.violations)
    assert history.grants > 500, history.grants
    assert history.sides["legacy"] > 50 and history.sides["enhanced"] > 50, history.sides
    assert both_sided > 50, "the moves must have caught requests on moving keys"


async def test_no_double_grant_and_no_falling_token_for_batches_while_the_weight_moves(
    data_dir: Path,
) -> None:
    asks = Asks(lambda rng, keys: rng.sample(keys, rng.choice((1, 2))), _take_batch,
                _release_batch)
    history, both_sided = await _history(data_dir, asks, moves=BATCH_MOVES)

    assert history.violations == [], "\n".join(history.violations)
    assert history.grants > 150, history.grants
    assert history.sides["legacy"] > 20 and history.sides["enhanced"] > 20, history.sides
    assert both_sided > 20, "the moves must have caught batches of moving keys"
