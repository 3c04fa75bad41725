"""A batch taken key by key (:func:`enhanced_locking.locking.batch.acquire_one_by_one`: on the
legacy locker, and through the router for the keys its split did not send to the enhanced
store's batch step) gives back what it took when a later key is refused or its step fails.
It gives back each grant by its fencing token on the enhanced side, as the enhanced locker
gives back its own grants: a hold its pull took of the key anew meanwhile, through another
request (the batch's grant let go, the key taken again), is that request's and stays. Before,
the give-back was by owner alone and freed that hold under its request."""

from __future__ import annotations

import asyncio

import pytest
from tests.conftest import ServiceMaker
from tests.support.locks import request_for

from enhanced_locking.locking.batch import acquire_one_by_one
from enhanced_locking.types import (
    AcquireResult,
    BackendUnavailable,
    BatchItem,
    BatchLockRequest,
    LockRequest,
    Reason,
)


@pytest.mark.parametrize("later", ["refused", "failed"])
async def test_a_batch_taken_key_by_key_gives_back_its_grant_not_its_pulls_later_hold(
    make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch, later: str,
) -> None:
    """Pull 1's batch of ``a`` and ``b``, key by key through the router (every key routed to
    the enhanced store). Between its grant of ``a`` and its ask for ``b``, the pull's other
    request lets ``a`` go and takes it again (a new token); then ``b`` is refused (pull 2
    holds it) or its step fails. The batch's own grant of ``a`` is gone already: nothing of
    ``a`` is this batch's to give back, and the pull's later hold stays."""
    service = await make_service(enabled=True, migration_weight=100)
    router = service.router
    batch = BatchLockRequest(locks=[BatchItem(project=request_for(path=p).project)
                                    for p in ("envs/a", "envs/b")], pull=request_for(pull=1).pull)
    a, b = batch.keys
    assert (await router.acquire(request_for(pull=2, path="envs/b"))).acquired
    acquire = router.acquire
    other: list[AcquireResult] = []

    async def taken_again_by_the_pull(asked: LockRequest) -> AcquireResult:
        if asked.key == b:
            assert await router.release(a, owner=("acme/infra", 1)) is not None
            other.append(await acquire(request_for(pull=1, path="envs/a")))
            if later == "failed":
                raise BackendUnavailable("the store did not answer in time")
        return await acquire(asked)

    monkeypatch.setattr(router, "acquire", taken_again_by_the_pull)
    if later == "refused":
        refused = await acquire_one_by_one(router, batch)
        assert not refused.acquired and refused.lock_key == b
        assert refused.holder is not None and refused.holder.owner == ("acme/infra", 2)
    else:
        with pytest.raises(BackendUnavailable):
            await acquire_one_by_one(router, batch)
    monkeypatch.undo()
    [own] = other
    assert own.acquired and own.fresh and own.lock is not None
    assert own.lock.backend == "enhanced"
    assert await router.get(a) == own.lock, "the pull's later hold of a was given back"
    held_b = await router.get(b)
    assert held_b is not None and held_b.owner == ("acme/infra", 2)


@pytest.mark.parametrize("moving", [True, False], ids=["while-moving", "once-settled"])
async def test_a_batch_refused_after_an_upgrade_keeps_the_pulls_hold(
    make_service: ServiceMaker, moving: bool,
) -> None:
    """Pull 1 holds ``a`` shared on enhanced; the weight moves every key to legacy, where
    pull 2 holds ``b``. Pull 1's batch of both, exclusive, upgrades its hold of ``a`` (the
    side holding it does, as it would alone) and is then refused ``b``: giving back what the
    batch took never frees ``a``, a key the pull held before the batch (its release would
    let another pull take the key under the pull's plan)."""
    service = await make_service(enabled=True, migration_weight=100)
    router = service.router
    assert service.enhanced is not None
    batch = BatchLockRequest(locks=[BatchItem(project=request_for(path=p).project)
                                    for p in ("envs/a", "envs/b")], pull=request_for(pull=1).pull)
    a, b = batch.keys
    shared = await router.acquire(request_for(pull=1, path="envs/a").model_copy(
        update={"mode": "shared"}))
    assert shared.acquired and shared.lock is not None and shared.lock.backend == "enhanced"
    await service.provider.set_layer("migration", {"migration_weight": 0})
    if not moving:
        async with asyncio.timeout(10):
            await service.migration.transitions.wait_settled()
    assert {router.side_for(a), router.side_for(b)} == {"legacy"}
    taken = await service.legacy.acquire(request_for(pull=2, path="envs/b"))
    assert taken.acquired
    refused = await router.acquire_batch(batch)
    assert not refused.acquired and refused.lock_key == b, refused
    assert refused.holder is not None and refused.holder.pull.num == 2
    assert [lock.pull.num for lock in await service.enhanced.holders(a)] == [1]
    assert (await router.acquire(request_for(pull=3, path="envs/a"))).reason == Reason.HELD
