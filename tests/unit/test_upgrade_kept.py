"""An upgrade of a pull's own shared lock to exclusive is never given back as a new grant.

A pull holding a key shared that asks for it exclusive, alone on the key, is upgraded by the
store in place (a new fencing token). Whatever gives back a grant its caller never read (a
client gone before the answer, a batch refused at a later key) frees only what the store
marked as new: the pull's own answer (``fresh``) and a batch's ``kept`` keys say which. An
upgrade marked as new is given back by its token, which frees the pull's whole hold of the
key, not only the upgrade, while the pull believes it still holds its shared lock. Each test
runs against every store with queues (memory, the embedded file, Redis, Redis Cluster, etcd).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from tests.support.locks import request_for
from tests.support.queues import LockerRig, settle

from enhanced_locking.locking import queueing
from enhanced_locking.locking.base import give_back_grant
from enhanced_locking.types import BatchItem, BatchLockRequest, LockRequest, Reason

OWNER = ("acme/infra", 1)


def ask(pull: int, *, path: str = "envs/prod", mode: str = "exclusive") -> LockRequest:
    return request_for(pull=pull, path=path).model_copy(update={"mode": mode})


async def test_a_gone_clients_upgrade_given_back_leaves_the_pull_holding_the_key(
        rigs: Callable[..., LockerRig]) -> None:
    """Pull 1 holds the key shared and asks for it exclusive; its client leaves before the
    answer, and the service gives back what the answer says this call granted (as the API
    does). The pull still holds the key afterwards: another pull is refused it shared."""
    rig = rigs()
    shared = await rig.locker.acquire(ask(1, mode="shared"))
    assert shared.acquired and shared.lock is not None
    upgraded = await rig.locker.acquire(ask(1))
    assert upgraded.acquired and upgraded.lock is not None
    assert upgraded.lock.mode == "exclusive"
    assert upgraded.upgraded and not upgraded.fresh, upgraded
    if upgraded.fresh:  # what the API gives back for a client gone before the answer
        await give_back_grant(rig.locker, upgraded.lock, OWNER)
    held = await rig.locker.holders(upgraded.lock.key)
    assert [lock.pull.num for lock in held] == [1], "the give-back freed the pull's hold"
    beside = await rig.locker.acquire(ask(2, mode="shared"))
    assert not beside.acquired and beside.reason is Reason.HELD, beside


async def test_a_batch_given_back_after_an_upgrade_leaves_the_pull_holding_that_key(
        rigs: Callable[..., LockerRig]) -> None:
    """Pull 1 holds ``a`` shared; its batch of ``a`` and ``b``, exclusive, is granted (``a``
    upgraded in place), then given back as the router gives back a batch refused at a later
    key: every lock not in the batch's ``kept`` keys (the look before the grant saw the pull
    hold ``a``). The pull still holds ``a``: another pull is refused it shared."""
    rig = rigs()
    items = [BatchItem(project=request_for(path=p).project) for p in ("envs/a", "envs/b")]
    batch = BatchLockRequest(locks=items, pull=request_for(pull=1).pull)
    a, b = batch.keys
    assert (await rig.locker.acquire(ask(1, path="envs/a", mode="shared"))).acquired
    granted = await rig.locker.acquire_batch(batch)
    assert granted.acquired, granted
    assert {lock.key: lock.mode for lock in granted.locks} == {a: "exclusive", b: "exclusive"}
    assert granted.upgraded == frozenset({a}), granted.upgraded
    kept = granted.kept_or(frozenset({a}))
    for lock in granted.locks:
        if lock.key not in kept:
            await give_back_grant(rig.locker, lock, OWNER)
    assert await rig.locker.get(b) is None
    held = await rig.locker.holders(a)
    assert [lock.pull.num for lock in held] == [1], "the give-back freed the pull's hold of a"
    beside = await rig.locker.acquire(ask(2, path="envs/a", mode="shared"))
    assert not beside.acquired and beside.reason is Reason.HELD, beside


async def test_an_upgrade_is_announced_with_its_new_token(
        rigs: Callable[..., LockerRig]) -> None:
    """The upgrade makes a new lock (a new fencing token): it is announced as ``acquired``
    as a new grant is, though it is not given back as one."""
    rig = rigs()
    shared = await rig.locker.acquire(ask(1, mode="shared"))
    assert shared.acquired and shared.lock is not None
    upgraded = await rig.locker.acquire(ask(1))
    assert upgraded.acquired and upgraded.lock is not None
    assert upgraded.lock.fencing_token > shared.lock.fencing_token
    announced = [(e.lock.fencing_token, e.lock.mode) for e in rig.events
                 if e.type == "acquired" and e.lock is not None]
    assert announced == [(shared.lock.fencing_token, "shared"),
                         (upgraded.lock.fencing_token, "exclusive")], announced
    again = await rig.locker.acquire(ask(1))  # asked again: held already, not an upgrade
    assert again.acquired and not again.fresh and not again.upgraded, again
    assert again.lock == upgraded.lock
    assert len([e for e in rig.events if e.type == "acquired"]) == 2


async def test_an_upgrade_granted_from_the_queue_is_announced_and_kept(
        rigs: Callable[..., LockerRig]) -> None:
    """Pull 1 and pull 2 hold the key shared; pull 1 asks for it exclusive and waits. Once
    pull 2 lets go, the queue upgrades pull 1's hold: announced (``granted-from-queue``,
    the new token) and answered as an upgrade (not ``fresh``: a client gone as that answer
    goes out gives nothing back)."""
    rig = rigs()
    assert (await rig.locker.acquire(ask(1, mode="shared"))).acquired
    other = await rig.locker.acquire(ask(2, mode="shared"))
    assert other.acquired and other.lock is not None
    waiting = rig.spawn(rig.locker.acquire(
        ask(1).model_copy(update={"wait": timedelta(seconds=30)})))
    await settle()
    assert not waiting.done()
    await rig.locker.release(other.lock.key, owner=("acme/infra", 2))
    upgraded = await asyncio.wait_for(waiting, 10)
    assert upgraded.acquired and upgraded.lock is not None, upgraded
    assert upgraded.lock.mode == "exclusive"
    assert upgraded.upgraded and not upgraded.fresh, upgraded
    served = [e.lock.fencing_token for e in rig.events
              if e.type == "granted-from-queue" and e.lock is not None]
    assert served == [upgraded.lock.fencing_token], served
    assert [lock.pull.num for lock in await rig.locker.holders(upgraded.lock.key)] == [1]


async def test_a_queued_upgrade_granted_after_its_client_left_is_announced_and_kept(
        rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch) -> None:
    """Pull 1 and pull 2 hold the key shared; pull 1 asks for it exclusive, with a
    ``requestId``, and waits; its client goes. Within the retry grace pull 2 lets go: the
    queue upgrades pull 1's hold, heard by nobody. The withdrawal after the grace finds it
    granted and keeps it (an upgrade is never given back), and the upgrade, a new token, is
    announced ``granted-from-queue`` as when its caller hears it. Before, it was kept
    without a word."""
    monkeypatch.setattr(queueing, "RETRY_GRACE", 0.5)
    rig = rigs()
    # The withdrawal after the grace comes after pull 2 lets go, however long its release
    # takes: the order this case is about, not left to the grace outlasting the release.
    released = asyncio.Event()
    cancel = rig.locker.backend.cancel

    async def cancel_once_released(*args: Any, **kwargs: Any) -> Any:
        await released.wait()
        return await cancel(*args, **kwargs)

    monkeypatch.setattr(rig.locker.backend, "cancel", cancel_once_released)
    own = await rig.locker.acquire(ask(1, mode="shared"))
    assert own.acquired and own.lock is not None
    other = await rig.locker.acquire(ask(2, mode="shared"))
    assert other.acquired and other.lock is not None
    waiting = rig.spawn(rig.locker.acquire(
        ask(1).model_copy(update={"wait": timedelta(seconds=30), "request_id": "job-7"})))
    while "queued" not in rig.types():
        assert not waiting.done(), waiting
        await asyncio.sleep(0.01)
    waiting.cancel()  # the client is gone; its waiter kept for the retry grace
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    await rig.locker.release(other.lock.key, owner=("acme/infra", 2))  # the upgrade
    released.set()
    loop = asyncio.get_running_loop()
    while later := [task for task in queueing._LATER if task.get_loop() is loop]:
        await asyncio.wait_for(asyncio.gather(*later), 60)
    await settle()
    held = await rig.locker.holders(own.lock.key)
    assert [(lock.pull.num, lock.mode) for lock in held] == [(1, "exclusive")], held
    assert held[0].fencing_token > own.lock.fencing_token, held
    served = [e.lock.fencing_token for e in rig.events
              if e.type == "granted-from-queue" and e.lock is not None]
    assert served == [held[0].fencing_token], [(e.type, e.lock) for e in rig.events]
