"""A lease timer that fires for an earlier end of a lease its holder moved later (a refresh;
the Atlantis adapter's hold-over): the key is looked at again when the later lease ends, also
when that lease runs out between the expiry's step and the read of the key's holders."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from tests.support.leases import past
from tests.support.locks import request_for
from tests.support.queues import LockerRig

from enhanced_locking.backends.waiting import Expiry
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

