"""Many callers of a few pulls at once, through the enhanced locker: single and batch requests,
some waiting, some not, some of whose callers go away while they wait (their grants, if any,
given back by the locker). Callers of one pull share its hold of a key (Atlantis's re-entry):
the last of them to finish with it releases it, and none of them asks for the key while that
release is under way (a release by owner frees the pull's hold whoever of the pull was told of
it: an ask the store answered first, held already, would be freed with it). Checked while it
runs: a caller told it holds
a key finds it, when it is done, still held by its pull with the token it was told (never
freed under it, nor granted to another pull in between), and no two pulls are ever told they
hold one key at once."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from tests.support.backends import BACKEND_KINDS
from tests.support.locks import request_for
from tests.support.queues import LockerRig, settle

from enhanced_locking.types import BatchItem, BatchLockRequest, Lock, LockNotOwned, LockRequest

REPO = "acme/infra"
PULLS = (2, 3, 4)
PATHS = ("a", "b", "c")
CALLERS = 4  # per pull
ROUNDS = 8
WAIT = timedelta(seconds=2)


@dataclass
class _Shared:
    """One pull's callers' view of one key: how many were told they hold it, how many asks
    are under way (a release waits for both to be none), since when the pull holds it, and
    the pull's release of it under way (set when it is done; an ask waits for it)."""

    told: int = 0
    asking: int = 0
    since: float | None = None
    releasing: asyncio.Event | None = None


@dataclass
class _Run:
    shared: dict[tuple[int, str], _Shared] = field(default_factory=dict)
    holds: list[tuple[str, int, float, float]] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    granted: int = 0
    left: int = 0

    def of(self, pull: int, key: str) -> _Shared:
        return self.shared.setdefault((pull, key), _Shared())


def _one(pull: int, path: str, wait: timedelta | None) -> LockRequest:
    return request_for(pull=pull, path=path, project=path).model_copy(update={"wait": wait})


def _batch(pull: int, paths: list[str], wait: timedelta | None) -> BatchLockRequest:
    return BatchLockRequest(
        locks=[BatchItem(project=_one(pull, p, None).project) for p in paths],
        pull=_one(pull, paths[0], None).pull, wait=wait)


async def _release(rig: LockerRig, view: _Shared, pull: int, key: str, *,
                   unless_held_by_other: bool = False) -> None:
    """The pull's release of ``key`` (with ``unless_held_by_other``: only when the pull holds
    it), its callers' asks for the key held back until it is done."""
    done = view.releasing = asyncio.Event()
    try:
        if unless_held_by_other:
            held = await rig.locker.get(key)
            if held is None or held.pull.num != pull:
                return
        with contextlib.suppress(LockNotOwned):  # (a give-back of a caller gone, first)
            await rig.locker.release(key, owner=(REPO, pull))
    finally:
        view.releasing = None
        done.set()


async def _done_with(rig: LockerRig, run: _Run, pull: int, locks: tuple[Lock, ...]) -> None:
    for lock in locks:
        now = await rig.locker.get(lock.key)
        if now is None or now.pull.num != pull or now.fencing_token != lock.fencing_token:
            run.wrong.append(f"pull {pull} was told it holds {lock.key} (token "
                             f"{lock.fencing_token}), and it is {now}")
        view = run.of(pull, lock.key)
        view.told -= 1
        if view.told == 0 and view.asking == 0:
            assert view.since is not None
            run.holds.append((lock.key, pull, view.since, time.monotonic()))
            view.since = None
            await _release(rig, view, pull, lock.key)


async def _ask(rig: LockerRig, pull: int, paths: list[str],
               wait: timedelta | None) -> tuple[Lock, ...]:
    """What one request of ``pull`` for ``paths`` is told it holds."""
    if len(paths) == 1:
        one = await rig.locker.acquire(_one(pull, paths[0], wait))
        return (one.lock,) if one.acquired and one.lock is not None else ()
    batch = await rig.locker.acquire_batch(_batch(pull, paths, wait))
    return tuple(batch.locks) if batch.acquired else ()


async def _caller(rig: LockerRig, run: _Run, pull: int, number: int) -> None:
    rng = random.Random(pull * 100 + number)
    for _ in range(ROUNDS):
        paths = rng.sample(PATHS, 2) if rng.random() < 0.3 else [rng.choice(PATHS)]
        wait = None if rng.random() < 0.3 else WAIT
        keys = [_one(pull, p, None).key for p in paths]
        while releasing := [view.releasing for key in keys
                            if (view := run.of(pull, key)).releasing is not None]:
            await releasing[0].wait()
        for key in keys:
            run.of(pull, key).asking += 1
        asked = rig.spawn(_ask(rig, pull, paths, wait))
        leaves = wait is not None and rng.random() < 0.3
        locks: tuple[Lock, ...] = ()
        try:
            if leaves:
                done, _ = await asyncio.wait({asked}, timeout=rng.uniform(0.0, 0.05))
                if not done:
                    asked.cancel()  # the caller goes away: the locker withdraws it
                    run.left += 1
                with contextlib.suppress(asyncio.CancelledError):
                    locks = await asked
            else:
                locks = await asked
        finally:
            for lock in locks:
                view = run.of(pull, lock.key)
                view.told += 1
                if view.since is None:
                    view.since = time.monotonic()
            for key in keys:
                run.of(pull, key).asking -= 1
        if locks:
            run.granted += 1
            await asyncio.sleep(rng.uniform(0.0, 0.004))
        await _done_with(rig, run, pull, locks)
        # An ask that left nothing told: the pull's last one out releases what it may hold.
        for key in keys:
            view = run.of(pull, key)
            if (view.told == 0 and view.asking == 0 and view.since is None
                    and view.releasing is None):
                await _release(rig, view, pull, key, unless_held_by_other=True)


@pytest.mark.parametrize(
    "queue_backend_factory",
    [pytest.param(name, marks=BACKEND_KINDS[name].marks)
     for name in ("memory", "boltdb", "redis", "redis-cluster", "etcd")], indirect=True,
)
async def test_callers_of_one_pull_never_lose_the_hold_they_were_told(
    rigs: Callable[..., LockerRig],
) -> None:
    await _callers_through(rigs())


@pytest.mark.parametrize(
    "queue_backend_factory",
    [pytest.param(name, marks=BACKEND_KINDS[name].marks)
     for name in ("boltdb", "redis", "redis-cluster", "etcd")], indirect=True,
)
async def test_callers_of_one_pull_through_two_replicas_never_lose_the_hold_they_were_told(
    rigs: Callable[..., LockerRig],
) -> None:
    # Two replicas on one store (the embedded store: two processes' connections to one file,
    # each serving its own queues): a pull's callers ask through either, so an answer one
    # replica gives is counted where the other's give-back reads it.
    await _callers_through(rigs(), rigs())


async def _callers_through(*replicas: LockerRig) -> None:
    """Every pull's callers at once, caller ``n`` through ``replicas[n % len(replicas)]``; then
    what the module's docstring checks."""
    run = _Run()
    await asyncio.wait_for(asyncio.gather(*(
        _caller(replicas[number % len(replicas)], run, pull, number)
        for pull in PULLS for number in range(CALLERS))), 240)
    await settle()
    assert not run.wrong, "\n".join(run.wrong[:10])
    assert run.granted > 0 and run.left > 0, (run.granted, run.left)
    by_key: dict[str, list[tuple[float, float, int]]] = {}
    for key, pull, start, end in run.holds:
        by_key.setdefault(key, []).append((start, end, pull))
    for key, spans in by_key.items():
        spans.sort()
        last_end, last_pull = float("-inf"), 0
        for start, end, pull in spans:
            assert not (start < last_end and pull != last_pull), (
                f"{key}: pulls {last_pull} and {pull} were told they hold it at once")
            if end > last_end:
                last_end, last_pull = end, pull
