"""The etcd backend against etcd's own lock recipe, on one etcd cluster in one run.

The anchor is etcd's ``concurrency.Mutex`` (go.etcd.io/etcd/client/v3 at the version of the
etcd the harness builds, ``hack/versions.env``), timed by the Go program in
``bench/etcd_mutex/`` against the same 3-member cluster on loopback:

1. Sequential acquire + release pairs per second on one key, no contention. Ours: the
   enhanced locker on the etcd backend (priority queue, fencing tokens, events through the
   etcd key history, metrics on). Goal: at least 0.8x of etcd's Mutex.
2. Hand-off latency: a holder releases while one waiter blocks; from the release call to the
   waiter's acquire returning (p50 / p99). Goal: our p50 within 2x of etcd's Mutex.

The steps' transactions go to the etcd leader (the connection finds it; see
docs/09-etcd.md, "How an operation runs"), while etcd's Go client spreads the Mutex's calls
over the members as it does by default; so one more row times the same Mutex given the
leader's endpoint alone: what the Mutex would do with the same route (not the goal's
anchor). Two more rows say what bounds us: the Python client alone (``etcd3aio``, the client the
backend uses: a put and a delete of one key, sequentially, the least two round trips a pair
can cost from Python), and the Redis backend (on a redis-server on loopback) timed as ours.
Ours also reports the etcd calls its steps made per pair, and the CPU this process spent per
pair (ours, and the bare client's). A last case is the hot key: 5, 20 and 60 waiters queued
at once on a held key through two lockers (two replicas), then served in turn: etcd calls per
enqueue (goal: as many at 60 waiters as at 5, at most 2), steps run again because another
writer got in first.

Concurrency is the same on both sides: one client locks one key, one pair after the other
(the Go program: one client, one session, one ``Mutex``, sequential ``Lock`` + ``Unlock``;
ours: one locker in one process, sequential acquire + release); the hand-off is one holder and
one waiter on one key on both sides.

Every case runs ``--runs`` times, interleaved; ratios are taken within a run (against that
run's Mutex) and the table gives the median and the best run. The members run with
``--unsafe-no-fsync`` (the machine's disk is not what is measured; every case pays the same
consensus round trips).

What one pair costs this process, counted (``--count ours|bare``): one case alone, ``--pairs``
pairs in each of ``--blocks`` blocks after a warm-up of 200, against the etcd members named by
``--endpoints`` (members already running, so that two versions of the code can take turns
against the same cluster) or a 3-member cluster started as for the table. Each block prints
its pairs/s, the etcd calls a pair (ours), and the CPU of this process a pair split into the
event loop's thread (our Python, the client's and gRPC's asyncio layer) and the other threads
(gRPC's own). A block runs inside the C function ``operator.call``, which nothing else on the
pair's path calls: ``valgrind --tool=callgrind --toggle-collect=_operator_call`` then counts
only the event loop thread's instructions of the blocks' pairs. ``--idle`` follows each block
with as long again without pairs and takes that work (by the second: the session's renewal,
the watches) off the block's. With ``--instructions`` the bench runs the case under callgrind
so (one block and its idle time, each dumped, the hash seed fixed) and prints the
instructions a pair: a count hardly moved by what else runs on the machine, where times are.

Usage: python bench/etcd_locking.py [--runs 3] [--pairs 1000] [--handoffs 100]
[--hot-waiters 5,20,60] [--no-write]
       python bench/etcd_locking.py --count ours|bare [--pairs 300] [--blocks 3]
[--endpoints HOST:PORT,...] [--instructions]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import operator
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import (  # noqa: E402
    close_locker,
    handoffs_of,
    percentile,
    quick_defaults,
    request,
    verdict,
    write_section,
)
from bench._goals import Goal, Report  # noqa: E402
from tests.support.etcd_server import EtcdCluster  # noqa: E402
from tests.support.gobuild import build  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

from enhanced_locking.backends import etcd_connection, etcd_store  # noqa: E402
from enhanced_locking.backends.base import Backend  # noqa: E402
from enhanced_locking.backends.etcd_connection import EtcdConnection, EtcdSettings  # noqa: E402
from enhanced_locking.backends.etcd_events import EtcdEventBus  # noqa: E402
from enhanced_locking.backends.etcd_store import EtcdBackend  # noqa: E402
from enhanced_locking.backends.redis_events import RedisEventBus  # noqa: E402
from enhanced_locking.backends.redis_store import RedisBackend  # noqa: E402
from enhanced_locking.config import EnhancedLockingConfig  # noqa: E402
from enhanced_locking.events import EventBus  # noqa: E402
from enhanced_locking.locking import EnhancedLocker  # noqa: E402
from enhanced_locking.metrics import Metrics  # noqa: E402
from enhanced_locking.types import LockRequest, Project, Pull  # noqa: E402

HEADING = "## etcd: our locker against etcd's own concurrency.Mutex (and the Redis backend)"
PAIRS_GOAL, HANDOFF_GOAL = 0.8, 2.0
HOT_CALLS_GOAL = 2.0
"""etcd calls per enqueue on a hot key, whatever the number of waiters: the enqueue's one
transaction (its answer says who is ahead and who holds the key, for the queued event), and
one retry when the other replica got in first."""


def go_mutex(cluster: EtcdCluster, pairs: int, handoffs: int, run: int = 0, *,
             endpoints: list[str] | None = None) -> dict[str, Any]:
    binary = build(REPO / "bench" / "etcd_mutex", "etcdmutex",
                   missing="bench/etcd_locking.py needs Go (1.25 or newer) to build etcd's "
                           "concurrency.Mutex anchor: install Go and put `go` on PATH")
    out = subprocess.run(
        [str(binary), f"-endpoints={','.join(endpoints or cluster.endpoints)}",
         f"-pairs={pairs}", f"-handoffs={handoffs}",
         f"-prefix=/bench/go-{os.getpid()}-{run}-{len(endpoints or ())}/"],
        check=True, capture_output=True, text=True, timeout=600)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


class Ours:
    """The enhanced locker on one backend, as the service builds it."""

    def __init__(self, config: EnhancedLockingConfig) -> None:
        self.config = config

    def locker(self) -> EnhancedLocker:
        backend: Backend
        events: EventBus
        if self.config.backend == "etcd":
            backend = EtcdBackend.from_config(self.config, "enhanced")
            events = EtcdEventBus.from_config(self.config)
            backend.carry(events)  # as the service wires them
        else:
            backend = RedisBackend.from_config(self.config, "enhanced")
            events = RedisEventBus.from_config(self.config)
        return EnhancedLocker(backend, settings=lambda: self.config, events=events,
                              metrics=Metrics())

    async def pairs(self, count: int) -> tuple[float, float | None, float, float]:
        """Pairs per second, etcd calls per pair (etcd only), this process's CPU seconds per
        pair (its gRPC threads included), and of those the event loop's thread's."""
        locker = self.locker()
        ask, owner = request(), ("acme/bench", 1)
        for _ in range(50):  # warm up: connections, session, scripts
            assert (await locker.acquire(ask)).acquired
            await locker.release(ask.key, owner=owner)
        backend = locker.backend
        calls = backend.round_trips if isinstance(backend, EtcdBackend) else 0
        cpu, loop, started = time.process_time(), time.thread_time(), time.perf_counter()
        for _ in range(count):
            assert (await locker.acquire(ask)).acquired
            await locker.release(ask.key, owner=owner)
        elapsed = time.perf_counter() - started
        cpu, loop = time.process_time() - cpu, time.thread_time() - loop
        per_pair = ((backend.round_trips - calls) / count
                    if isinstance(backend, EtcdBackend) else None)
        await close_locker(locker)
        return count / elapsed, per_pair, cpu / count, loop / count

    async def handoffs(self, count: int) -> list[float]:
        return await handoffs_of(self.locker(), count)

    async def hot_key(self, waiters: int) -> HotKey:
        """``waiters`` acquires with a wait at once on a held key, through two lockers."""
        lockers = [self.locker(), self.locker()]
        for locker in lockers:  # warm up: connections, sessions
            ask = on_path("envs/warm", 1)
            assert (await locker.acquire(ask)).acquired
            await locker.release(ask.key, owner=("acme/bench", 1))
        backends = [locker.backend for locker in lockers]
        assert all(isinstance(b, EtcdBackend) for b in backends)
        etcd = [b for b in backends if isinstance(b, EtcdBackend)]
        holder = on_path("envs/hot", 1)
        assert (await lockers[0].acquire(holder)).acquired
        before = [(b.round_trips, b.conflicts, b.reads) for b in etcd]
        queued = asyncio.Event()
        count = 0

        def heard(event: Any) -> None:
            nonlocal count
            if event.type == "queued":
                count += 1
                if count == waiters:
                    queued.set()

        for locker in lockers:
            locker.events.subscribe(heard)
        started = time.perf_counter()
        asks = [on_path("envs/hot", 100 + i, wait="60s") for i in range(waiters)]
        waiting = [asyncio.ensure_future(lockers[i % 2].acquire(ask))
                   for i, ask in enumerate(asks)]
        await asyncio.wait_for(queued.wait(), 120)
        enqueued = time.perf_counter() - started
        calls = sum(b.round_trips - c for b, (c, _, _) in zip(etcd, before, strict=True))
        conflicts = sum(b.conflicts - c for b, (_, c, _) in zip(etcd, before, strict=True))
        reads = sum(b.reads - r for b, (_, _, r) in zip(etcd, before, strict=True))
        # Served in turn: each holder releases through the locker it asked.
        owner, through = ("acme/bench", 1), lockers[0]
        started = time.perf_counter()
        pending = set(waiting)
        for _ in range(waiters):
            await through.release(holder.key, owner=owner)
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            assert len(done) == 1
            answer = done.pop().result()
            assert answer.acquired and answer.lock is not None
            pull = answer.lock.pull.num
            owner, through = ("acme/bench", pull), lockers[(pull - 100) % 2]
        await through.release(holder.key, owner=owner)
        served = time.perf_counter() - started
        for locker in lockers:
            await close_locker(locker)
        return HotKey(waiters, enqueued, calls / waiters, reads / waiters, conflicts,
                      served / waiters)


def on_path(path: str, pull: int, **extra: Any) -> LockRequest:
    return LockRequest(project=Project(repo_full_name="acme/bench", path=path),
                       pull=Pull(num=pull), **extra)


@dataclasses.dataclass(frozen=True)
class HotKey:
    waiters: int
    enqueue_seconds: float
    calls_per_enqueue: float
    reads_per_enqueue: float
    """Of those, read-only calls (none since the enqueue's answer carries what the queued
    event shows; a retry after another replica's write may read)."""
    conflicts: int
    seconds_per_handoff: float


async def raw_pairs(cluster: EtcdCluster, count: int) -> tuple[float, float, float]:
    """A put and a delete of one key per pair through etcd3aio: the Python client alone
    (pairs per second, CPU seconds per pair, of those the event loop's thread's)."""
    connection = EtcdConnection(EtcdSettings(endpoints=tuple(cluster.endpoints)))
    client = await connection.client()
    assert client.kv is not None
    key = f"/bench/raw-{os.getpid()}".encode()
    for _ in range(50):
        await client.kv.put(key, b"x")
        await client.kv.delete(key)
    cpu, loop, started = time.process_time(), time.thread_time(), time.perf_counter()
    for _ in range(count):
        await client.kv.put(key, b"x")
        await client.kv.delete(key)
    elapsed = time.perf_counter() - started
    cpu, loop = time.process_time() - cpu, time.thread_time() - loop
    await connection.close()
    return count / elapsed, cpu / count, loop / count


def ms(value: float) -> str:
    return f"{value * 1000:.2f}"


@dataclasses.dataclass
class Run:
    pairs: dict[str, float]
    handoffs: dict[str, list[float]]
    calls_per_pair: float
    hot: dict[int, HotKey]
    cpu: dict[str, float]
    """CPU seconds of this process per pair, by case (not the Go Mutex's)."""
    loop_cpu: dict[str, float]
    """Of those, the event loop's thread's (the Python of the case, the client's and gRPC's
    asyncio layer; not gRPC's own threads)."""


MUTEX, RAW, ETCD, REDIS = ("etcd concurrency.Mutex (Go)", "etcd3aio put + delete (Python)",
                           "ours, etcd backend", "ours, Redis backend")
MUTEX_LEADER = "etcd concurrency.Mutex (Go), the leader's endpoint only"


async def one_run(args: argparse.Namespace, cluster: EtcdCluster, redis: RedisServer,
                  number: int) -> Run:
    common = {"enabled": True, "priority_queue": True, "events": True, "metrics": True,
              "max_timeout": "1m"}
    on_etcd = Ours(EnhancedLockingConfig(backend="etcd", etcd_endpoints=cluster.endpoints,
                                         etcd_key_prefix=f"/bench/ours-{os.getpid()}-{number}/",
                                         **common))
    on_redis = Ours(EnhancedLockingConfig(backend="redis", redis_addr=redis.addr, **common))
    anchor = await asyncio.to_thread(go_mutex, cluster, args.pairs, args.handoffs, number)
    leader = cluster.leader()
    assert leader is not None, "the etcd cluster has no leader"
    on_leader = await asyncio.to_thread(go_mutex, cluster, args.pairs, 0, number,
                                        endpoints=[leader.endpoint])
    etcd_pairs, calls, etcd_cpu, etcd_loop = await on_etcd.pairs(args.pairs)
    redis_pairs, _, redis_cpu, redis_loop = await on_redis.pairs(args.pairs)
    raw, raw_cpu, raw_loop = await raw_pairs(cluster, args.pairs)
    return Run(
        pairs={MUTEX: anchor["pairs_per_second"], MUTEX_LEADER: on_leader["pairs_per_second"],
               RAW: raw, ETCD: etcd_pairs, REDIS: redis_pairs},
        cpu={RAW: raw_cpu, ETCD: etcd_cpu, REDIS: redis_cpu},
        loop_cpu={RAW: raw_loop, ETCD: etcd_loop, REDIS: redis_loop},
        handoffs={MUTEX: anchor["handoffs"], ETCD: await on_etcd.handoffs(args.handoffs),
                  REDIS: await on_redis.handoffs(args.handoffs)},
        calls_per_pair=calls or 0.0,
        hot={size: await on_etcd.hot_key(size) for size in args.hot_waiters},
    )


def report(args: argparse.Namespace, runs: list[Run]) -> Report:
    def ratios(name: str) -> list[float]:
        return [r.pairs[name] / r.pairs[MUTEX] for r in runs]

    def p50_ratios(name: str) -> list[float]:
        return [statistics.median(r.handoffs[name]) / statistics.median(r.handoffs[MUTEX])
                for r in runs]

    def spread(values: list[float], best: Callable[[list[float]], float], fmt: str) -> str:
        return f"{format(statistics.median(values), fmt)} ({format(best(values), fmt)})"

    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f} at the end; "
        f"etcd: 3 members on loopback (no fsync); {len(runs)} runs of {args.pairs} pairs and "
        f"{args.handoffs} hand-offs per case. Each cell: the median run (the best run); "
        f"ratios are taken within a run, against that run's Mutex; goals are the etcd "
        f"backend's, judged on the median run.",
        "",
        "| case | pairs/s | pairs x Mutex | goal | met | hand-off p50 ms | p99 ms "
        "| p50 x Mutex | goal | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in (MUTEX, MUTEX_LEADER, RAW, ETCD, REDIS):
        pairs = [r.pairs[name] for r in runs]
        goal, met = "", ""
        if name == ETCD:
            goal = f">= {PAIRS_GOAL}x"
            met = verdict(statistics.median(ratios(name)) >= PAIRS_GOAL)
        cells = [spread(pairs, max, ".0f"), spread(ratios(name), max, ".2f"), goal, met]
        if name in runs[0].handoffs:
            p50s = [statistics.median(r.handoffs[name]) * 1000 for r in runs]
            p99s = [percentile(r.handoffs[name], 0.99) * 1000 for r in runs]
            goal, met = "", ""
            if name == ETCD:
                goal = f"<= {HANDOFF_GOAL:g}x"
                met = verdict(statistics.median(p50_ratios(name)) <= HANDOFF_GOAL)
            cells += [spread(p50s, min, ".2f"), spread(p99s, min, ".2f"),
                      spread(p50_ratios(name), min, ".2f"), goal, met]
        else:
            cells += ["", "", "", "", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    calls = statistics.median(r.calls_per_pair for r in runs)
    raw_share = [r.pairs[ETCD] / r.pairs[RAW] for r in runs]
    leader_share = [r.pairs[ETCD] / r.pairs[MUTEX_LEADER] for r in runs]
    cpu_share = [r.cpu[ETCD] / r.cpu[RAW] for r in runs]

    def cpu_us(name: str) -> str:
        return spread([r.cpu[name] * 1e6 for r in runs], min, ".0f")

    def loop_us(name: str) -> str:
        return spread([r.loop_cpu[name] * 1e6 for r in runs], min, ".0f")

    lines += [
        "",
        f"Ours on etcd made {calls:.2f} etcd calls per pair (one transaction per acquire and "
        f"per release) and ran at {spread(raw_share, max, '.2f')}x of the Python client's "
        f"bare put + delete pair; its transactions go to the etcd leader, and against the "
        f"Mutex given the leader's endpoint alone it ran at "
        f"{spread(leader_share, max, '.2f')}x. CPU of this process per pair (median run, "
        f"best run): "
        f"ours on etcd {cpu_us(ETCD)} µs, the bare client pair {cpu_us(RAW)} µs "
        f"(ours {spread(cpu_share, min, '.2f')}x of it), ours on Redis {cpu_us(REDIS)} µs; "
        f"of which the event loop's thread (the Python, gRPC's own threads apart): ours on "
        f"etcd {loop_us(ETCD)} µs, the bare client pair {loop_us(RAW)} µs. Concurrency as the "
        f"Mutex's: one client, one key, one pair after the other.",
        "",
        f"Hot key: waiters queued at once on a held key through two lockers (two replicas), "
        f"then served in turn. Goal: the etcd calls of one enqueue do not grow with the "
        f"waiters (O(1)): at most {HOT_CALLS_GOAL:g} at every size (the enqueue's "
        f"transaction, one retry).",
        "",
        "| waiters | etcd calls per enqueue | of which reads | steps run again "
        "| all queued in ms | ms per hand-off | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pair_ratios, handoff_ratios = ratios(ETCD), p50_ratios(ETCD)
    goals = [
        Goal(f"etcd: ours >= {PAIRS_GOAL}x of etcd's `concurrency.Mutex`, pairs/s",
             f"{statistics.median(pair_ratios):.2f}x (best {max(pair_ratios):.2f}x)",
             statistics.median(pair_ratios) >= PAIRS_GOAL),
        Goal(f"etcd: hand-off p50 within {HANDOFF_GOAL:g}x of the Mutex's",
             f"{statistics.median(handoff_ratios):.2f}x",
             statistics.median(handoff_ratios) <= HANDOFF_GOAL)]
    hot_calls: dict[int, float] = {}
    for size in sorted(runs[0].hot):
        hot = [r.hot[size] for r in runs]
        per_enqueue = hot_calls[size] = statistics.median(h.calls_per_enqueue for h in hot)
        lines.append(
            f"| {size} | {spread([h.calls_per_enqueue for h in hot], min, '.1f')} "
            f"| {statistics.median(h.reads_per_enqueue for h in hot):.1f} "
            f"| {statistics.median(h.conflicts for h in hot):.0f} "
            f"| {spread([h.enqueue_seconds * 1000 for h in hot], min, '.0f')} "
            f"| {spread([h.seconds_per_handoff * 1000 for h in hot], min, '.1f')} "
            f"| <= {HOT_CALLS_GOAL:g} | {verdict(per_enqueue <= HOT_CALLS_GOAL)} |")
    sizes = ", ".join(f"{size:,}" for size in hot_calls)
    goals.append(Goal(
        f"etcd: a hot key's enqueue, etcd calls: <= {HOT_CALLS_GOAL:g} at any number of waiters",
        f"{min(hot_calls.values()):.1f} to {max(hot_calls.values()):.1f} at {sizes} waiters",
        max(hot_calls.values()) <= HOT_CALLS_GOAL))
    return Report("\n".join(lines), tuple(goals))


async def measure(args: argparse.Namespace, cluster: EtcdCluster,
                  redis: RedisServer) -> Report:
    runs = [await one_run(args, cluster, redis, n) for n in range(args.runs)]
    return report(args, runs)


# --- one case alone, counted --------------------------------------------------------------

COUNT_WARM_UP = 200
"""Pairs run before the counted blocks: connections, the session, the replica's view."""
COUNT_DEADLINES = {"CALL_TIMEOUT": 60.0, "ATTEMPT_TIMEOUT": 30.0, "ROUTE_TIMEOUT": 30.0}
"""The connection's deadlines while counting (seconds; see :func:`count_blocks`)."""


@dataclasses.dataclass(frozen=True)
class Block:
    """One counted block of pairs: pairs/s, etcd calls a pair (ours only), and this process's
    CPU seconds a pair, of the event loop's thread and of its other threads (gRPC's)."""

    pairs_per_second: float
    calls_per_pair: float | None
    loop_cpu: float
    other_cpu: float

    def line(self, case: str) -> str:
        calls = "" if self.calls_per_pair is None else f", {self.calls_per_pair:.2f} etcd calls"
        return (f"{case}: {self.pairs_per_second:.0f} pairs/s{calls}; CPU a pair "
                f"{(self.loop_cpu + self.other_cpu) * 1e6:.0f} µs = the event loop's thread "
                f"{self.loop_cpu * 1e6:.0f} + the other threads {self.other_cpu * 1e6:.0f}")


def count_blocks(case: str, endpoints: list[str], pairs: int, blocks: int, *,
                 idle: bool = False) -> list[Block]:
    """``blocks`` blocks of ``pairs`` pairs of ``case`` (``ours``: the locker's acquire and
    release on the etcd backend, as the table's; ``bare``: etcd3aio's put and delete), each
    run inside ``operator.call`` (see the module's doc: what callgrind is told to count).

    ``idle``: each block is followed by as long again without pairs, also inside
    ``operator.call``: the work the process does by the second (the session's renewal, the
    watches), which the pairs' block counts too, as much as it lasted: its CPU a pair is the
    block's less that. Under callgrind a pair lasts 30 to 60 times as long, and more on a
    loaded machine: the work by the second then moves a pair's count by tens of thousands.

    The calls' deadlines are those of a slow machine (``COUNT_DEADLINES``): under callgrind
    a pair takes 30 to 60 times as long, and on a loaded machine a write's 2 s route ran out
    (the deadlines bound only a call that fails; an answered pair runs the same code)."""
    for module in (etcd_connection, etcd_store):
        for name, seconds in COUNT_DEADLINES.items():
            if hasattr(module, name):
                setattr(module, name, seconds)
    loop = asyncio.new_event_loop()
    try:
        pair, calls, close = loop.run_until_complete(_one_case(case, endpoints))

        async def run(count: int) -> None:
            for _ in range(count):
                await pair()

        loop.run_until_complete(run(COUNT_WARM_UP))
        found = []
        for _ in range(blocks):
            made = calls()
            cpu, own, started = time.process_time(), time.thread_time(), time.perf_counter()
            operator.call(loop.run_until_complete, run(pairs))
            elapsed = time.perf_counter() - started
            cpu, own = time.process_time() - cpu, time.thread_time() - own
            done = calls()
            if idle:
                rest, rest_own = time.process_time(), time.thread_time()
                operator.call(loop.run_until_complete, asyncio.sleep(elapsed))
                rest, rest_own = time.process_time() - rest, time.thread_time() - rest_own
                cpu, own = cpu - rest, own - rest_own
            found.append(Block(pairs / elapsed,
                               None if done is None or made is None else (done - made) / pairs,
                               own / pairs, (cpu - own) / pairs))
        loop.run_until_complete(close())
        return found
    finally:
        loop.close()


async def _one_case(case: str, endpoints: list[str]) -> tuple[
        Callable[[], Any], Callable[[], int | None], Callable[[], Any]]:
    """The pair of ``case``, how many etcd calls its store made so far, and how to close it."""
    if case == "ours":
        locker = Ours(EnhancedLockingConfig(
            backend="etcd", etcd_endpoints=endpoints, enabled=True, priority_queue=True,
            events=True, metrics=True, max_timeout="1m",
            etcd_key_prefix=f"/bench/count-{os.getpid()}/")).locker()
        backend = locker.backend
        assert isinstance(backend, EtcdBackend)
        ask, owner = request(), ("acme/bench", 1)

        async def ours() -> None:
            assert (await locker.acquire(ask)).acquired
            await locker.release(ask.key, owner=owner)

        return ours, lambda: backend.round_trips, lambda: close_locker(locker)
    connection = EtcdConnection(EtcdSettings(endpoints=tuple(endpoints)))
    client = await connection.client()
    kv = client.kv
    assert kv is not None
    key = f"/bench/count-{os.getpid()}".encode()

    async def bare() -> None:
        await kv.put(key, b"x")
        await kv.delete(key)

    return bare, lambda: None, connection.close


def instructions(case: str, endpoints: list[str], pairs: int) -> str:
    """``case`` run under callgrind in a process of its own (one block of ``pairs`` and as
    long idle, each dumped as it ends), the instructions of the event loop's thread a pair:
    the block's less the idle time's (see :func:`count_blocks`)."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        shown = subprocess.run(
            ["valgrind", "--tool=callgrind", "--toggle-collect=_operator_call",
             "--dump-after=_operator_call", f"--callgrind-out-file={out}", sys.executable,
             __file__, "--count", case, "--pairs", str(pairs), "--blocks", "1", "--idle",
             "--endpoints", ",".join(endpoints)],
            env=env, check=False, capture_output=True, text=True)
        if shown.returncode:
            raise SystemExit(f"{case} under callgrind failed:\n{shown.stderr[-2000:]}")
        counted, waited = (_instructions(Path(f"{out}.{n}")) for n in (1, 2))
    return (f"{case}: {(counted - waited) / pairs:,.0f} instructions a pair on the event "
            f"loop's thread ({counted / pairs:,.0f} counted, less {waited / pairs:,.0f} of the "
            f"work by the second; {pairs} pairs under callgrind; {shown.stdout.strip()})")


def _instructions(dump: Path) -> int:
    """The instructions a callgrind dump counted."""
    totals = re.search(r"^(?:totals|summary): (\d+)", dump.read_text(), re.MULTILINE)
    assert totals is not None, f"no totals in {dump}"
    return int(totals[1])


def count(args: argparse.Namespace) -> None:
    """``--count``: the case's blocks (or its instructions), printed; nothing written."""
    def each(endpoints: list[str]) -> None:
        if args.instructions:
            print(instructions(args.count, endpoints, args.pairs), flush=True)
            return
        for block in count_blocks(args.count, endpoints, args.pairs, args.blocks,
                                  idle=args.idle):
            print(block.line(args.count), flush=True)

    if args.endpoints:
        each(args.endpoints)
        return
    with tempfile.TemporaryDirectory() as tmp:
        cluster = EtcdCluster(Path(tmp) / "etcd", members_count=3, fsync=False).start()
        try:
            each(cluster.endpoints)
        finally:
            cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--hot-waiters", type=lambda text: [int(n) for n in text.split(",")],
                        default=[5, 20, 60], help="waiter counts of the hot-key case")
    parser.add_argument("--handoffs", type=int, default=100)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--count", choices=("ours", "bare"),
                        help="only this case's pair, in blocks, its CPU split by thread "
                             "(ours: the locker on etcd; bare: etcd3aio's put + delete); "
                             "prints only")
    parser.add_argument("--blocks", type=int, default=3,
                        help="how many blocks of pairs the count runs")
    parser.add_argument("--endpoints", type=lambda text: text.split(","),
                        help="with --count: etcd members already running (HOST:PORT,...) "
                             "instead of a cluster started for the run")
    parser.add_argument("--idle", action="store_true",
                        help="with --count: each block's CPU less that of as long again "
                             "without pairs (the work by the second)")
    parser.add_argument("--instructions", action="store_true",
                        help="with --count: the event loop thread's instructions a pair, "
                             "counted under callgrind")
    quick_defaults(parser, runs=1, pairs=200, handoffs=30)
    args = parser.parse_args()
    if args.count:
        count(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        cluster = EtcdCluster(Path(tmp) / "etcd", members_count=3, fsync=False).start()
        try:
            with RedisServer(Path(tmp) / "redis") as redis:
                found = asyncio.run(measure(args, cluster, redis))
        finally:
            cluster.close()
    print(found.text)
    if not args.no_write:
        write_section("etcd", HEADING, found)


if __name__ == "__main__":
    main()
