"""A lease timer that fires for an earlier end of a lease its holder moved later (a refresh;
the Atlantis adapter's hold-over): the key is looked at again when the later lease ends, also
when that lease runs out between the expiry's step and the read of the key's holders. And a
lease a release of a pull's locks hands on: looked at when it ends, also when it runs out
before a read of the key's holders after the release's step."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from tests.support.leases import past, until
from tests.support.locks import candidate_for, request_for
from tests.support.queues import LockerRig

from enhanced_locking.backends.waiting import Expiry, QueuePolicy, Status, Wait
from enhanced_locking.locking import EnhancedLocker
from enhanced_locking.types import Lock, LockRequest

S = timedelta(seconds=1)


def ask(pull: int, *, wait: timedelta | None = None) -> LockRequest:
    return request_for(pull=pull, path="envs/hold-over").model_copy(update={"wait": wait})


async def test_a_lease_that_runs_out_as_its_expiry_reads_the_holders_goes_to_the_queue(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = rigs()
    locker: EnhancedLocker = rig.locker
    key = ask(1).key
    assert (await locker.acquire(ask(1))).acquired
    owner = ("acme/infra", 1)
    # Held over twice, as a pull's plan and its re-plan release it: the timer stays set for
    # the first end, the earlier one, and fires while the second lease is still on.
    first = await locker.refresh(key, owner=owner, ttl=S)
    second = await locker.refresh(key, owner=owner, ttl=2 * S)
    assert first.expires_at is not None and second.expires_at is not None
    end = second.expires_at
    assert locker.leases.armed().get(key) == first.expires_at
    waiting = rig.spawn(locker.acquire(ask(2, wait=120 * S)))
    # The step after the timer's expiry (which finds the lease on) comes after the lease's
    # end, as it may on a busy machine: the key's holders then read as none. The expiry
    # answers the holders its own step left; its answer reaching the timer after the end
    # stands for that step here, and a read of the holders after it comes later still.
    backend = locker.backend
    expire, read = backend.expire, backend.holders
    slowed: list[bool] = []

    async def expire_late(asked: str, **kw: Any) -> Expiry:
        expiry = await expire(asked, **kw)
        if asked == key and not slowed:
            slowed.append(True)
            await past(backend.now, end)
        return expiry

    async def holders_late(asked: str) -> list[Lock]:
        if asked == key and slowed:
            await past(backend.now, end)
        return await read(asked)

    monkeypatch.setattr(backend, "expire", expire_late)
    monkeypatch.setattr(backend, "holders", holders_late)
    granted = await asyncio.wait_for(waiting, 60)
    assert slowed, "the timer's expiry should have run"
    assert granted.acquired and granted.lock is not None and granted.lock.pull.num == 2


async def test_a_lease_handed_on_by_a_release_by_pull_that_runs_out_at_once_goes_to_the_queue(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A release of a pull's locks hands a key to a waiter with a lease whose caller is not
    here (its replica gone, or another one): only this replica's timer frees that lease. The
    timer is set from what the release's own step left; before, from a read of the key's
    holders after it, which found the key free when the new lease ran out in between (a busy
    machine): no timer was set, and the next waiter waited out its wait."""
    rig = rigs()
    locker: EnhancedLocker = rig.locker
    backend = locker.backend
    key = ask(1).key
    assert (await locker.acquire(ask(1))).acquired
    # Pull 2 queued straight in the store, with a lease: nobody here waits to hear of it.
    offer = Wait(id="by-pull-2", timeout=120 * S)
    queued = await backend.acquire_or_enqueue(candidate_for(ask(2)), ttl=S, wait=offer,
                                              policy=QueuePolicy())
    assert queued.status is Status.QUEUED, queued
    waiting = rig.spawn(locker.acquire(ask(3, wait=120 * S)))
    assert await until(lambda: "queued" in rig.types()), rig.types()
    read = backend.holders
    slowed: list[bool] = []

    async def holders_late(asked: str) -> list[Lock]:
        if asked == key and not slowed:
            slowed.append(True)
            for holder in await read(asked):  # read after the lease handed on has ended
                if holder.expires_at is not None:
                    await past(backend.now, holder.expires_at)
        return await read(asked)

    monkeypatch.setattr(backend, "holders", holders_late)
    released = await locker.release_by_pull("acme/infra", 1)
    assert [lock.pull.num for lock in released] == [1]
    granted = await asyncio.wait_for(waiting, 60)
    assert granted.acquired and granted.lock is not None and granted.lock.pull.num == 3
