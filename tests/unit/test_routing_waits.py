"""Waits and batches through the router: the enhanced side waits, legacy stays fail fast (as
Atlantis), and a batch across both sides never holds a partial set."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from tests.conftest import ServiceMaker
from tests.support.locks import request_for
from tests.support.queues import settle

from enhanced_locking.factory import LockService
from enhanced_locking.types import BatchItem, BatchLockRequest, Pull, Reason

WAIT = timedelta(seconds=20)


def batch(pull: int, *paths: str, wait: timedelta | None = None) -> BatchLockRequest:
    return BatchLockRequest(
        locks=[BatchItem(project=request_for(path=p).project) for p in paths],
        pull=Pull(num=pull), wait=wait)


def paths_on(service: LockService, side: str, count: int) -> list[str]:
    """Paths whose keys the router sends to ``side`` under the current weight."""
    found = []
    for n in range(10_000):
        path = f"modules/{n}"
        if service.router.side_for(request_for(path=path).key) == side:
            found.append(path)
            if len(found) == count:
                return found
    raise AssertionError(f"no {count} keys on {side}")


async def _half_routed(make_service: ServiceMaker) -> tuple[LockService, str, str]:
    """A service routing half the keys to enhanced, a path routed there and one to legacy."""
    service = await make_service(enabled=True, migration_weight=50)
    [enhanced_path] = paths_on(service, "enhanced", 1)
    [legacy_path] = paths_on(service, "legacy", 1)
    return service, enhanced_path, legacy_path


async def test_disabled_a_wait_is_ignored_and_a_held_key_fails_fast(
    make_service: ServiceMaker,
) -> None:
    service = await make_service()
    assert (await service.router.acquire(request_for(pull=1))).acquired
    answer = await asyncio.wait_for(service.router.acquire(request_for(pull=2, wait=WAIT)), 2)
    assert answer.reason is Reason.HELD
    assert service.enhanced is None


async def test_a_key_routed_to_legacy_fails_fast_even_when_asked_to_wait(
    make_service: ServiceMaker,
) -> None:
    service = await make_service(enabled=True, migration_weight=0)
    assert (await service.router.acquire(request_for(pull=1))).acquired
    answer = await asyncio.wait_for(service.router.acquire(request_for(pull=2, wait=WAIT)), 2)
    assert answer.reason is Reason.HELD and answer.holder is not None
    assert answer.holder.backend == "legacy"
    assert await service.router.queue(request_for().key) == []


async def test_a_key_routed_to_enhanced_waits_in_its_queue(make_service: ServiceMaker) -> None:
    service = await make_service(enabled=True)
    first = await service.router.acquire(request_for(pull=1))
    waiting = asyncio.create_task(service.router.acquire(request_for(pull=2, wait=WAIT)))
    await settle()
    assert [w.owner[1] for w in await service.router.queue(request_for().key)] == [2]
    await service.router.release(request_for().key)
    answer = await asyncio.wait_for(waiting, 5)
    assert answer.acquired and answer.lock is not None and first.lock is not None
    assert answer.lock.backend == "enhanced"
    assert answer.lock.fencing_token > first.lock.fencing_token


async def test_disabled_a_batch_is_all_or_nothing_on_legacy(make_service: ServiceMaker) -> None:
    service = await make_service()
    await service.router.acquire(request_for(path="b", pull=9))
    refused = await service.router.acquire_batch(batch(1, "a", "b", "c"))
    assert not refused.acquired and refused.lock_key == request_for(path="b").key
    assert [lock.pull.num for lock in await service.router.list()] == [9]
    granted = await service.router.acquire_batch(batch(1, "a", "c"))
    assert granted.acquired and {lock.backend for lock in granted.locks} == {"legacy"}


async def test_a_batch_across_both_sides_gives_back_the_enhanced_part_on_a_legacy_refusal(
    make_service: ServiceMaker,
) -> None:
    service, enhanced_path, legacy_path = await _half_routed(make_service)
    assert (await service.router.acquire(request_for(path=legacy_path, pull=9))).acquired
    refused = await service.router.acquire_batch(batch(1, enhanced_path, legacy_path, wait=WAIT))
    assert not refused.acquired and refused.reason is Reason.HELD
    assert refused.lock_key == request_for(path=legacy_path).key
    assert await service.router.get(request_for(path=enhanced_path).key) is None

    await service.router.release(request_for(path=legacy_path).key)
    granted = await service.router.acquire_batch(batch(1, enhanced_path, legacy_path))
    assert granted.acquired
    assert [lock.backend for lock in granted.locks] == ["enhanced", "legacy"]
    released = await service.router.release_batch(
        [lock.key for lock in granted.locks], owner=("acme/infra", 1))
    assert len(released) == 2 and await service.router.list() == []


async def test_a_batch_granted_after_a_weight_move_holds_every_key_it_names(
    make_service: ServiceMaker,
) -> None:
    service, enhanced_path, legacy_path = await _half_routed(make_service)
    assert (await service.router.acquire(request_for(path=enhanced_path, pull=9))).acquired
    waiting = asyncio.ensure_future(
        service.router.acquire_batch(batch(1, enhanced_path, legacy_path, wait=WAIT)))
    await settle()
    assert not waiting.done()
    # While the batch waits on its enhanced part, its legacy key moves to enhanced.
    await service.provider.set_layer("cluster", {"migration_weight": 100})
    assert service.router.side_for(request_for(path=legacy_path).key) == "enhanced"
    await service.router.release(request_for(path=enhanced_path).key)
    granted = await asyncio.wait_for(waiting, 5)
    assert granted.acquired
    assert [lock.key for lock in granted.locks] == [request_for(path=enhanced_path).key,
                                                    request_for(path=legacy_path).key]
    held = await service.router.get(request_for(path=legacy_path).key)
    assert held is not None and held.pull.num == 1, "every key answered is held"
    refused = await service.router.acquire(request_for(path=legacy_path, pull=2))
    assert not refused.acquired and refused.holder is not None and refused.holder.pull.num == 1


async def test_a_wait_on_a_key_still_held_on_legacy_waits_there_and_is_never_answered_held(
    make_service: ServiceMaker,
) -> None:
    service = await make_service(enabled=True)
    path = paths_on(service, "enhanced", 1)[0]
    key = request_for(path=path).key
    # A lock left on legacy from before the move to enhanced.
    assert (await service.router.legacy.acquire(request_for(path=path, pull=1))).acquired
    short = request_for(path=path, pull=2).model_copy(
        update={"wait": timedelta(milliseconds=300)})
    refused = await service.router.acquire(short)
    assert refused.reason is Reason.TIMEOUT, "a request that waits is never refused as held"
    assert refused.holder is not None and refused.holder.backend == "legacy"

    waiting = asyncio.ensure_future(service.router.acquire(
        request_for(path=path, pull=3).model_copy(update={"wait": WAIT})))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await service.router.release(key, owner=(request_for().project.repo_full_name, 1))
    granted = await asyncio.wait_for(waiting, 5)
    assert granted.acquired and granted.lock is not None
    assert granted.lock.backend == "enhanced" and granted.lock.pull.num == 3


async def test_switched_off_the_requests_queued_before_are_listed_cancelled_and_closed(
    make_service: ServiceMaker,
) -> None:
    """Enhanced locking switched off while a request waits in an enhanced queue: the request
    still waits there (the holder's release grants it), so it stays visible and cancellable,
    and closing its pull drops it instead of handing the key to a closed pull later."""
    service = await make_service(enabled=True)
    key, repo = request_for().key, request_for().project.repo_full_name
    assert (await service.router.acquire(request_for(pull=1))).acquired
    closed = asyncio.create_task(service.router.acquire(request_for(pull=2, wait=WAIT)))
    cancelled = asyncio.create_task(service.router.acquire(request_for(pull=3, wait=WAIT)))
    await settle()
    await service.provider.set_layer("cluster", {"enabled": False})
    assert service.router.side_for(key) == "legacy"
    queued = await service.router.queue(key)
    assert [w.owner[1] for w in queued] == [2, 3]
    assert await service.router.cancel_waiter(key, queued[1].id)
    assert (await asyncio.wait_for(cancelled, 5)).reason is Reason.CANCELLED
    done = await service.router.close_pull(repo, 2)
    assert done.cancelled == [queued[0].id] and done.released == []
    assert (await asyncio.wait_for(closed, 5)).reason is Reason.CANCELLED
    assert await service.router.queue(key) == []
    await service.router.release(key, owner=(repo, 1))
    assert await service.router.get(key) is None  # nobody was waiting for it any more
    again = await service.router.acquire(request_for(pull=4))
    assert again.acquired and again.lock is not None and again.lock.backend == "legacy"
