"""Fairness: FIFO among equals, and the bound aging promises to a low-priority waiter under a
stream of high-priority arrivals.

The stores run on a clock the test moves (``FakeClock``), so the assertions are about *order*
(which waiter the n-th release served), never about how fast the machine is.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.support.locks import request_for
from tests.support.queues import FakeClock, LockerRig, rig_for, settle

from enhanced_locking.backends import EmbeddedBackend, MemoryBackend, QueueBackend
from enhanced_locking.types import AcquireResult, Priority

THRESHOLD = timedelta(milliseconds=50)
TICK = timedelta(milliseconds=10)
PATIENCE = timedelta(minutes=5)


@pytest.fixture(params=["memory", "boltdb"])
async def make(request: pytest.FixtureRequest, tmp_path: Path,
               ) -> AsyncIterator[Callable[..., tuple[LockerRig, FakeClock]]]:
    rigs: list[LockerRig] = []

    def build(**settings: Any) -> tuple[LockerRig, FakeClock]:
        clock = FakeClock()
        backend: QueueBackend
        if request.param == "memory":
            backend = MemoryBackend(clock=clock)
        else:
            backend = EmbeddedBackend(tmp_path / f"{len(rigs)}.db", clock=clock)
        rigs.append(rig_for(backend, **settings))
        return rigs[-1], clock
    yield build
    for rig in rigs:
        await rig.close()
        await rig.locker.backend.close()


class Line:
    """Waiters on one key, and the order in which releases serve them."""

    def __init__(self, rig: LockerRig) -> None:
        self.rig = rig
        self.waiting: dict[str, asyncio.Task[AcquireResult]] = {}
        self.served: list[str] = []
        self.holder = 0
        self.pulls = 0

    async def hold(self) -> None:
        self.pulls += 1
        self.holder = self.pulls
        assert (await self.rig.locker.acquire(request_for(pull=self.holder))).acquired

    async def arrive(self, name: str, priority: Priority) -> None:
        self.pulls += 1
        request = request_for(pull=self.pulls, priority=priority, wait=PATIENCE)
        self.waiting[name] = self.rig.spawn(self.rig.locker.acquire(request))
        await settle()

    async def release(self) -> str:
        await self.rig.locker.release(request_for(pull=self.holder).key)
        await settle()
        done = [name for name, task in self.waiting.items() if task.done()]
        assert len(done) == 1, f"one release serves exactly one waiter, not {done}"
        name = done[0]
        result = self.waiting.pop(name).result()
        assert result.acquired and result.lock is not None
        self.holder = result.lock.pull.num
        self.served.append(name)
        return name


@pytest.mark.parametrize("priority_queue", [True, False])
async def test_waiters_of_one_priority_are_served_in_arrival_order(
    make: Callable[..., tuple[LockerRig, FakeClock]], priority_queue: bool,
) -> None:
    rig, clock = make(priority_queue=priority_queue, starvation_threshold=THRESHOLD)
    line = Line(rig)
    await line.hold()
    names = [f"w{i:02}" for i in range(20)]
    for name in names:
        clock.advance(TICK)
        await line.arrive(name, Priority.NORMAL)
    for _ in names:
        clock.advance(TICK)
        await line.release()
    assert line.served == names


async def test_a_low_waiter_overtakes_later_high_arrivals_after_two_thresholds(
    make: Callable[..., tuple[LockerRig, FakeClock]],
) -> None:
    # One high arrives and one waiter is served every tick. The low waiter is at level 0 and
    # rises one level per threshold; at two thresholds (100ms = 10 ticks) it is level 2, the
    # level of a fresh high, and it arrived first: it is served then, not before.
    rig, clock = make(priority_queue=True, starvation_threshold=THRESHOLD, max_priority_boost=3)
    line = Line(rig)
    await line.hold()
    await line.arrive("low", Priority.LOW)
    for tick in range(1, 30):
        clock.advance(TICK)
        await line.arrive(f"high{tick}", Priority.HIGH)
        if await line.release() == "low":
            break
    assert line.served == [f"high{tick}" for tick in range(1, 10)] + ["low"]


async def test_under_a_backlog_of_aging_highs_the_low_waiter_is_served_at_the_top_level(
    make: Callable[..., tuple[LockerRig, FakeClock]],
) -> None:
    # Three highs arrive per tick and one waiter is served, so highs pile up and age too (to
    # level 3 after one threshold). The low waiter reaches level 3 after three thresholds
    # (150ms = 15 ticks); from then on it is ahead of every waiter that arrived after it.
    rig, clock = make(priority_queue=True, starvation_threshold=THRESHOLD, max_priority_boost=3)
    line = Line(rig)
    await line.hold()
    await line.arrive("low", Priority.LOW)
    served_at = None
    for tick in range(1, 40):
        clock.advance(TICK)
        for n in range(3):
            await line.arrive(f"high{tick}.{n}", Priority.HIGH)
        if await line.release() == "low":
            served_at = tick
            break
    assert served_at == 15


async def test_max_priority_boost_zero_means_a_low_waiter_waits_for_every_high(
    make: Callable[..., tuple[LockerRig, FakeClock]],
) -> None:
    rig, clock = make(priority_queue=True, starvation_threshold=THRESHOLD, max_priority_boost=0)
    line = Line(rig)
    await line.hold()
    await line.arrive("low", Priority.LOW)
    for tick in range(1, 31):
        clock.advance(TICK)
        await line.arrive(f"high{tick}", Priority.HIGH)
        assert await line.release() != "low"
    assert "low" in line.waiting


async def test_with_the_priority_queue_off_arrival_order_wins_over_priority(
    make: Callable[..., tuple[LockerRig, FakeClock]],
) -> None:
    rig, clock = make(priority_queue=False)
    line = Line(rig)
    await line.hold()
    await line.arrive("low", Priority.LOW)
    await line.arrive("critical", Priority.CRITICAL)
    clock.advance(TICK)
    assert await line.release() == "low"
