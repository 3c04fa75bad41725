"""50 clients on three replicas while the weight moves up and down: no double grant, no
falling fencing token.

The replicas share one embedded store and one replica registry and hear of each weight change
at different moments (as pods do); their registry rounds run on their own timers. Clients
acquire fail fast through a random replica, hold briefly and release through another.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from tests.support.grant_history import GrantHistory
from tests.support.locks import request_for
from tests.support.replicas import ReplicaSet, requests_in_buckets, settled

from enhanced_locking.factory import LockService
from enhanced_locking.migration.routing_registry import MemoryRoutingRegistry

CLIENTS = 50
MOVES = 30
WEIGHTS = (0, 10, 25, 50, 75, 100)


async def test_no_double_grant_and_no_falling_token_while_the_weight_moves(
    data_dir: Path,
) -> None:
    rng = random.Random(7)
    history = GrantHistory()
    # A few keys in each band the weights cut, so every move catches some of them.
    requests = {}
    for lo, hi in zip((0, 1000, 2500, 5000, 7500), (1000, 2500, 5000, 7500, 10_000),
                      strict=True):
        for request in requests_in_buckets(lo, hi, count=3):
            requests[request.key] = request
    keys = list(requests)
    both_sided = 0

    async with ReplicaSet(data_dir, MemoryRoutingRegistry()) as replicas:
        services: list[LockService] = [
            await replicas.start(name, migration_weight=0, replica_heartbeat="100ms")
            for name in ("a", "b", "c")
        ]
        stop = asyncio.Event()

        async def client(number: int) -> None:
            nonlocal both_sided
            who = f"client-{number}"
            while not stop.is_set():
                key = rng.choice(keys)
                request = requests[key].model_copy(update={"pull": request_for(pull=number).pull})
                replica = rng.choice(services)
                if replica.migration.transitions.plan(key).both:
                    both_sided += 1
                result = await replica.router.acquire(request)
                if result.acquired:
                    assert result.lock is not None
                    history.granted(who, result.lock)
                    await asyncio.sleep(rng.choice((0, 0, 0.001, 0.002)))
                    history.releasing(who, key)
                    await rng.choice(services).router.release(key, owner=("acme/infra", number))
                else:
                    await asyncio.sleep(rng.choice((0, 0.001, 0.002)))

        async def mover() -> None:
            for _ in range(MOVES):
                weight = rng.choice(WEIGHTS)
                order = rng.sample(services, len(services))
                for service in order:  # each replica hears of it a little later
                    await service.provider.set_layer("cluster", {"migration_weight": weight})
                    await asyncio.sleep(rng.choice((0, 0.005, 0.02)))
                await asyncio.sleep(rng.choice((0.01, 0.03, 0.06)))
            stop.set()

        await asyncio.gather(mover(), *(client(n) for n in range(1, CLIENTS + 1)))
        for service in services:
            await settled(service)

    assert history.violations == [], "\n".join(history.violations)
    assert history.grants > 500, history.grants
    assert history.sides["legacy"] > 50 and history.sides["enhanced"] > 50, history.sides
    assert both_sided > 50, "the moves must have caught requests on moving keys"
