"""A request sent again with its ``requestId`` after its client went away, while a weight move
routed its key to the other side between the first try and the retry: the retry is answered
with the lock its first try's waiter was granted, and that lock stays held for it (the first
try's clean-up, after the retry grace, leaves it to the retry), on a real redis-server (the
enhanced side) and a real SQLite file (the legacy side)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from tests.support.locks import request_for
from tests.support.redis_fixtures import redis_config
from tests.support.redis_server import RedisServer

from enhanced_locking.factory import LockService
from enhanced_locking.locking import queueing
from enhanced_locking.migration.routing_registry import MemoryRoutingRegistry
from enhanced_locking.provider import ConfigProvider
from enhanced_locking.types import (
    AcquireResult,
    BatchItem,
    BatchLockRequest,
    LockRequest,
    Reason,
)

pytestmark = pytest.mark.redis


@pytest.fixture
def registry() -> MemoryRoutingRegistry:
    return MemoryRoutingRegistry()


@pytest.fixture
async def service(redis_server: RedisServer, tmp_path: Path,
                  registry: MemoryRoutingRegistry) -> AsyncIterator[LockService]:
    config = redis_config(redis_server, enabled=True, backend="redis", legacy_backend="boltdb",
                          data_dir=str(tmp_path), migration_weight=100, replica_id="only",
                          replica_heartbeat="1h")
    started = LockService(ConfigProvider(config), routing_registry=registry)
    await started.start()
    yield started
    await started.close()


async def _moved_to(service: LockService, weight: float, *, phase: str) -> None:
    await service.provider.set_layer("cluster", {"migration_weight": weight})
    for _ in range(2):
        await service.migration.transitions.tick()
    assert service.migration.transitions.status().phase == phase


def _retried(pull: int) -> LockRequest:
    return request_for(pull=pull, wait=timedelta(seconds=30)).model_copy(
        update={"request_id": "plan-42"})


def _kept() -> list[asyncio.Task[None]]:
    """The withdrawals queued for callers gone (after the retry grace) on this test's event
    loop: the module keeps them all, and a test before this one may have left its own, on a
    loop since closed."""
    loop = asyncio.get_running_loop()
    return [task for task in queueing._LATER if task.get_loop() is loop]


async def _clean_ups_done() -> None:
    """Wait for the withdrawals queued for callers gone (after the retry grace)."""
    while kept := _kept():
        await asyncio.gather(*kept, return_exceptions=True)


@pytest.mark.parametrize("move", ["settled", "moving"])
@pytest.mark.parametrize("granted", ["before-the-retry", "while-the-retry-polls"])
async def test_a_retry_routed_to_the_other_side_keeps_the_lock_its_waiter_was_granted(
    service: LockService, registry: MemoryRoutingRegistry, granted: str, move: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # "moving": another replica still reports the old weight, so the key is taken on both
    # sides, the old (enhanced) one first.
    router = service.router
    key = request_for().key
    if move == "moving":
        await registry.report(replica_id="lagging", weight=100, generation=1)
    held = await router.acquire(request_for(pull=1))
    assert held.acquired and held.lock is not None and held.lock.backend == "enhanced"

    # Pull 2 waits in the enhanced queue with a requestId; its client goes away.
    queued = asyncio.Event()
    service.events.subscribe(lambda event: queued.set() if event.type == "queued" else None)
    first = asyncio.create_task(router.acquire(_retried(2)))
    await asyncio.wait_for(queued.wait(), 30)
    assert service.enhanced is not None and await service.enhanced.queue(key)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert _kept(), "the waiter is kept for the retry grace"

    await _moved_to(service, 0, phase="stable" if move == "settled" else "moving")
    assert router.side_for(key) == "legacy"  # the key routes to legacy now
    assert service.migration.transitions.plan(key).both == (move == "moving")

    if granted == "before-the-retry":
        # Pull 1 lets go: the enhanced queue grants the waiter its client left.
        assert await router.release(key, owner=("acme/infra", 1)) is not None
        retry = await router.acquire(_retried(2))
    else:
        # The retry looks before pull 1 lets go, seen and not guessed at: settled, it finds
        # pull 1 on enhanced and looks again later; moving, it takes its first try's waiter
        # over in the enhanced queue (the old side's, asked first), told queued again.
        looked = asyncio.Event()
        if move == "settled":
            looks = router._acquire_once

            async def looking(request: LockRequest) -> AcquireResult:
                result = await looks(request)
                holder = result.holder
                if (result.reason is Reason.HELD and holder is not None
                        and holder.backend == "enhanced" and holder.pull.num == 1):
                    looked.set()
                return result

            monkeypatch.setattr(router, "_acquire_once", looking)
        else:
            service.events.subscribe(
                lambda event: looked.set() if event.type == "queued"
                and event.details.get("requestId") == "plan-42" else None)
        retrying = asyncio.create_task(router.acquire(_retried(2)))
        await asyncio.wait_for(looked.wait(), 30)
        assert not retrying.done()
        assert await router.release(key, owner=("acme/infra", 1)) is not None
        retry = await retrying
    assert retry.acquired and retry.lock is not None and retry.lock.pull.num == 2
    assert _kept(), "answered within the retry grace of its first try"

    await _clean_ups_done()
    holder = await router.get(key)
    assert holder is not None and holder.pull.num == 2, (
        "the first try's clean-up gave back the lock its retry was answered with")
    assert holder.fencing_token == retry.lock.fencing_token
    other = await router.acquire(request_for(pull=3))
    assert not other.acquired, "a second pull was granted the key pull 2 was told it holds"
    assert await router.release(key, owner=("acme/infra", 2)) is not None
    assert await router.get(key) is None


async def test_a_batch_retry_routed_to_legacy_keeps_the_locks_its_waiter_was_granted(
    service: LockService,
) -> None:
    # The same for a batch: its first try waits for both keys on the enhanced side; the
    # move sends both to legacy, where the retry takes them one by one.
    router = service.router
    paths = ("envs/a", "envs/b")
    keys = [request_for(path=path).key for path in paths]
    for key, path in zip(keys, paths, strict=True):
        assert router.side_for(key) == "enhanced"
        assert (await router.acquire(request_for(path=path, pull=1))).acquired

    def batch(pull: int) -> BatchLockRequest:
        items = [BatchItem(project=request_for(path=path).project) for path in paths]
        return BatchLockRequest(locks=items, pull=request_for(pull=pull).pull,
                                wait=timedelta(seconds=30), request_id="plan-43")

    queued = asyncio.Event()
    service.events.subscribe(lambda event: queued.set() if event.type == "queued" else None)
    first = asyncio.create_task(router.acquire_batch(batch(2)))
    await asyncio.wait_for(queued.wait(), 30)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await _moved_to(service, 0, phase="stable")
    assert all(router.side_for(key) == "legacy" for key in keys)
    for key in keys:
        assert await router.release(key, owner=("acme/infra", 1)) is not None
    retry = await router.acquire_batch(batch(2))
    assert retry.acquired, retry
    assert _kept(), "answered within the retry grace of its first try"

    await _clean_ups_done()
    for key, path in zip(keys, paths, strict=True):
        holder = await router.get(key)
        assert holder is not None and holder.pull.num == 2, (
            f"the first try's clean-up gave back {key}, which its retry was answered with")
        assert not (await router.acquire(request_for(path=path, pull=3))).acquired
