"""The enhanced locker on the embedded store at scale: 1k, 10k and 100k held locks, 10k waiters.

For each size a store file of its own is filled with that many held locks (ten per pull, as a
pull holding a project per directory would), through the backend's ``adopt`` in one transaction
(the rows are the ones an acquire writes), and then each call is timed through the locker of
each size in turn, in three rounds (the sizes in turn, backwards in the middle round), so that
what else runs on the machine weighs on every size alike (one size after the other had timed
the 100,000 column in the minutes after its fill, at whatever load the machine then had). Each
sample's CPU time (the thread's) and wall time are taken; the table and its ratios are CPU time,
which a loaded machine moves less; a second table gives the wall times. The calls:

* acquire + release of a free key (the common pair);
* get of a held key this process has read before (the store keeps the lock it last decoded
  per key, for 4,096 keys: a read of such a key decodes nothing);
* get of a held key this process has not read: a second locker on the same file (as after a
  restart, or another replica) reads keys it never saw, so each get decodes its lock. The two
  are timed apart because the store's cache holds every lock at 1,000 held and only a few
  thousand at 100,000: a get of a key the bench wrote is a cache hit at 1k and a decode at
  10k and 100k, and one row for both compared a hit with a decode;
* release by pull (ten locks) and their acquire again;
* enqueue one waiter on a held key with ten waiters, read that queue, cancel the waiter;
* list of every held lock (O(n) by nature: reported per lock, the median of three lists).

Before the calls are timed, the garbage of the fills (their candidate locks, made by the
bench, not by the store) is collected: otherwise the first calls timed pay the full collection
that a write of 100,000 locks in one go left due.

Bytes per held lock: the store file's growth (after a WAL checkpoint) over the locks added.
Waiters live in the process (a waiter is a caller with an open connection): 10k waiters on 100
held keys, each an acquire task waiting in its queue; bytes per waiter from ``tracemalloc``
(Python allocations, including the waiting task), and the same calls timed with them queued.

The goal: per-call latency grows at most logarithmically with the number of held locks, i.e.
the p50 at the largest size is at most log(largest) / log(smallest) times the p50 at the
smallest (for 1k → 100k: 1.67x). List is linear by nature; its per-lock cost should stay flat.

Usage: python bench/scale.py [--sizes 1000,10000,100000] [--waiters 10000] [--samples 300]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import platform
import sqlite3
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import percentile, quick_defaults, verdict, write_section  # noqa: E402
from bench._goals import Goal, Report  # noqa: E402

from enhanced_locking.backends import EmbeddedBackend  # noqa: E402
from enhanced_locking.config import EnhancedLockingConfig  # noqa: E402
from enhanced_locking.events import EventBus  # noqa: E402
from enhanced_locking.locking import EnhancedLocker  # noqa: E402
from enhanced_locking.locking.enhanced import _candidate  # noqa: E402
from enhanced_locking.metrics import Metrics  # noqa: E402
from enhanced_locking.types import LockRequest, Project, Pull, utcnow  # noqa: E402

HEADING = "## Scale: 1k to 100k held locks and 10k waiters on the embedded store"
REPO_NAME = "acme/scale"
PER_PULL = 10
CALLS = ("acquire + release", "get (read before)", "get (not read before)",
         "release by pull (10 locks) + acquire again", "enqueue + queue read + cancel",
         "list, per lock")


def request(index: int, *, pull: int | None = None, wait: timedelta | None = None) -> LockRequest:
    return LockRequest(project=Project(repo_full_name=REPO_NAME, path=f"p{index}"),
                       pull=Pull(num=pull if pull is not None else index // PER_PULL + 1),
                       wait=wait)


def locker_on(path: Path) -> EnhancedLocker:
    config = EnhancedLockingConfig(enabled=True, max_queue_size=1000)
    return EnhancedLocker(EmbeddedBackend(path), settings=lambda: config, events=EventBus(),
                          metrics=Metrics())


def file_bytes(path: Path) -> int:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


async def fill(locker: EnhancedLocker, start: int, stop: int) -> None:
    now = utcnow()
    for first in range(start, stop, 5000):
        locks = [_candidate(request(i), priority=request(i).priority).granted(
            acquired_at=now, expires_at=None, fencing_token=1)
            for i in range(first, min(stop, first + 5000))]
        assert await locker.backend.adopt(locks, {}) == []


Samples = tuple[list[float], list[float]]
"""Seconds of wall time and of the thread's CPU time, one of each per sample."""

ROUNDS = 3


async def timed(samples: int, call: Callable[[int], Awaitable[Any]]) -> Samples:
    wall, cpu = [], []
    for i in range(samples):
        started, used = time.perf_counter(), time.thread_time()
        await call(i)
        cpu.append(time.thread_time() - used)
        wall.append(time.perf_counter() - started)
    return wall, cpu


async def calls(locker: EnhancedLocker, size: int, samples: int,
                path: Path) -> dict[str, Samples]:
    """Samples of each call (list: per lock) with ``size`` locks held."""
    free = size + 1_000_000  # keys nobody holds
    found: dict[str, Samples] = {}

    async def pair(i: int) -> None:
        ask = request(free + i, pull=1)
        assert (await locker.acquire(ask)).acquired
        await locker.release(ask.key, owner=(REPO_NAME, 1))

    def sampled(i: int) -> str:
        return request((i * 7919) % size).key

    async def get(i: int) -> None:
        assert await locker.get(sampled(i)) is not None

    async def by_pull(i: int) -> None:
        # Not pulls 1-10: their keys (p0-p99) have waiters, who would be handed the locks.
        pull = (i * 613) % (size // PER_PULL - 10) + 11
        released = await locker.release_by_pull(REPO_NAME, pull)
        assert len(released) == PER_PULL
        for lock in released:
            assert (await locker.acquire(request(int(lock.project.path[1:]), pull=pull))).acquired

    held = request(0)
    # Ten more waiters on one held key (each asks for key p0 under another pull), all queued
    # before the samples: the waiters column has some there already.
    depth = len(await locker.queue(held.key)) + PER_PULL
    queued = [asyncio.create_task(locker.acquire(LockRequest(
        project=held.project, pull=Pull(num=size + n + 10), wait=timedelta(minutes=4))))
        for n in range(PER_PULL)]
    while len(await locker.queue(held.key)) < depth:
        if any(task.done() for task in queued):
            raise RuntimeError("a waiter was not queued")
        await asyncio.sleep(0.001)

    # An enqueue waits until the queue is longer than ``depth``, its length before: it waited
    # for more than ten, which the waiters column's queue had already, and there it read the
    # queue once and cancelled a waiter not yet queued.
    async def enqueue(i: int) -> None:
        waiter = asyncio.create_task(locker.acquire(LockRequest(
            project=held.project, pull=Pull(num=size + 100 + i), wait=timedelta(minutes=4))))
        while len(await locker.queue(held.key)) <= depth:
            if waiter.done():
                raise RuntimeError(f"the waiter was not queued: {waiter.result()}")
            await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)

    for i in range(samples):  # the keys get samples, read once before: see the docstring
        await get(i)
    for name, call, count in ((CALLS[0], pair, samples), (CALLS[1], get, samples),
                              (CALLS[3], by_pull, max(10, samples // 10)),
                              (CALLS[4], enqueue, max(10, samples // 3))):
        await call(0)  # warm
        found[name] = await timed(count, call)
    found[CALLS[2]] = await unread_gets(path, size, samples, sampled)
    for task in queued:
        task.cancel()
    await asyncio.gather(*queued, return_exceptions=True)
    started, used = time.perf_counter(), time.thread_time()
    listed = await locker.list()
    found[CALLS[5]] = ([(time.perf_counter() - started) / size],
                       [(time.thread_time() - used) / size])
    assert len(listed) == size, (len(listed), size)
    return found


async def unread_gets(path: Path, size: int, samples: int,
                      sampled: Callable[[int], str]) -> Samples:
    """Samples of a get of a key the reading locker has not read: a second locker on the
    file reads each sampled key once (the first read, ``samples + 1``, warms its code)."""
    reader = locker_on(path)
    try:
        assert await reader.get(sampled(samples + 1)) is not None

        async def get(i: int) -> None:
            assert await reader.get(sampled(i)) is not None

        return await timed(samples, get)
    finally:
        await reader.close()
        await reader.backend.close()


def p50s(found: dict[str, Samples]) -> dict[str, tuple[float, float]]:
    """Each call's p50 of wall time and of CPU time."""
    return {name: (percentile(wall, 0.5), percentile(cpu, 0.5))
            for name, (wall, cpu) in found.items()}


async def waiters(locker: EnhancedLocker, size: int, count: int, samples: int,
                  path: Path) -> tuple[dict[str, tuple[float, float]], float]:
    """Bytes per waiter and the calls' p50 with ``count`` waiters queued on 100 held keys."""
    keys = 100
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tasks = [asyncio.create_task(locker.acquire(LockRequest(
        project=request(n % keys).project, pull=Pull(num=10_000_000 + n),
        wait=timedelta(minutes=4)))) for n in range(count)]
    while await locker.queue_depth() < count:
        if any(task.done() for task in tasks):
            raise RuntimeError("a waiter was not queued")
        await asyncio.sleep(0.01)
    gc.collect()
    per_waiter = (tracemalloc.get_traced_memory()[0] - before) / count
    tracemalloc.stop()
    found = p50s(await calls(locker, size, samples, path))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return found, per_waiter


async def run(sizes: list[int], count: int, samples: int, work: Path) -> dict[str, Any]:
    stores: dict[int, tuple[EnhancedLocker, Path]] = {}
    results: dict[str, Any] = {"sizes": {}, "bytes per lock": {}}
    for size in sizes:
        path = work / str(size) / "enhanced-locking.db"
        path.parent.mkdir()
        locker = locker_on(path)
        empty = file_bytes(path)
        await fill(locker, 0, size)
        results["bytes per lock"][size] = (file_bytes(path) - empty) / size
        stores[size] = locker, path
    gc.collect()  # the fills' garbage (see the module's docstring)
    found: dict[int, dict[str, Samples]] = {size: {} for size in sizes}
    for round_ in range(ROUNDS):
        for size in sizes if round_ % 2 == 0 else sizes[::-1]:
            locker, path = stores[size]
            for name, (wall, cpu) in (await calls(locker, size, samples // ROUNDS,
                                                  path)).items():
                kept = found[size].setdefault(name, ([], []))
                kept[0].extend(wall)
                kept[1].extend(cpu)
    results["sizes"] = {size: p50s(found[size]) for size in sizes}
    held = sizes[-1]
    locker, path = stores[held]
    results["waiters"], results["bytes per waiter"] = await waiters(
        locker, held, count, samples, path)
    results["held"] = held
    for locker, _ in stores.values():
        await locker.close()
        await locker.backend.close()
    return results


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f}"


def report(results: dict[str, Any], sizes: list[int], count: int, samples: int) -> Report:
    smallest, largest = sizes[0], sizes[-1]
    bound = math.log(largest) / math.log(smallest)
    header = " | ".join(f"{size:,} held" for size in sizes)
    lines = [
        f"{samples} samples per call in {ROUNDS} rounds (fewer for by-pull and enqueue), p50 of "
        f"each call's CPU time in microseconds (list: the median of {ROUNDS}, per lock); "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{len(os.sched_getaffinity(0))} CPUs, load average {os.getloadavg()[0]:.1f} at the "
        f"end. Goal: p50 at {largest:,} at most log({largest:,}) / log({smallest:,}) = "
        f"{bound:.2f}x the p50 at {smallest:,}; list's per-lock cost flat.",
        "",
        f"| call | {header} | {count:,} waiters ({results['held']:,} held) "
        f"| {largest:,} / {smallest:,} | goal | met |",
        "|---|" + "---:|" * (len(sizes) + 2) + "---|---|",
    ]
    growths: dict[str, float] = {}
    for name in CALLS:
        values = [results["sizes"][size][name][1] for size in sizes]
        growth = growths[name] = values[-1] / values[0]
        goal = f"<= {bound:.2f}x" if name != CALLS[5] else "<= 1.5x (flat)"
        ok = growth <= (bound if name != CALLS[5] else 1.5)
        lines.append(f"| {name} | " + " | ".join(us(v) for v in values)
                     + f" | {us(results['waiters'][name][1])} | {growth:.2f}x | {goal} "
                     f"| {verdict(ok)} |")
    lines.append("| bytes per held lock (file) | " + " | ".join(
        f"{results['bytes per lock'][size]:,.0f}" for size in sizes) + " | | | | |")
    lines.append("| bytes per waiter (process) | " + " | ".join("" for _ in sizes)
                 + f" | {results['bytes per waiter']:,.0f} | | | |")
    lines += ["", "The same samples' p50 of wall time, in microseconds:", "",
              f"| call | {header} | {count:,} waiters | {largest:,} / {smallest:,} |",
              "|---|" + "---:|" * (len(sizes) + 2)]
    for name in CALLS:
        values = [results["sizes"][size][name][0] for size in sizes]
        lines.append(f"| {name} | " + " | ".join(us(v) for v in values)
                     + f" | {us(results['waiters'][name][0])} | {values[-1] / values[0]:.2f}x |")
    logarithmic = max(growth for name, growth in growths.items() if name != CALLS[5])
    goals = (
        Goal(f"scale: a call's p50 at {largest:,} held locks <= {bound:.2f}x its p50 at "
             f"{smallest:,} (log n)", f"{logarithmic:.2f}x at most", logarithmic <= bound),
        Goal("scale: list's cost per lock flat (<= 1.5x)", f"{growths[CALLS[5]]:.2f}x",
             growths[CALLS[5]] <= 1.5))
    return Report("\n".join(lines), goals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--waiters", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--no-write", action="store_true")
    quick_defaults(parser, sizes="1000,10000", waiters=2000, samples=100)
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(run(sizes, args.waiters, args.samples, Path(tmp)))
    found = report(results, sizes, args.waiters, args.samples)
    print(found.text)
    if not args.no_write:
        write_section("scale", HEADING, found)


if __name__ == "__main__":
    main()
