"""The Redis backend against the Redis locks people use today, all on one Redis in one run.

1. Sequential acquire + release pairs per second on one key, no contention:

   * the floor: a bare ``SET key token NX PX`` then ``DEL`` (two round trips, no safety);
   * redis-py's ``Lock`` (asyncio: ``SET NX PX``, release by a Lua script);
   * python-redis-lock's ``Lock`` (synchronous redis client; release also signals a list);
   * ours: the enhanced locker on the Redis backend with priority queue, fencing tokens,
     events (through the Redis Stream) and metrics on. Goal: >= 1.0x of both libraries.

2. Contended hand-off latency: a holder releases while one waiter blocks in acquire; from the
   release call to the waiter's acquire returning. redis-py's ``Lock`` polls (``sleep=0.1``
   by default); python-redis-lock waits on ``BLPOP`` of a signal list; ours is woken by the
   grant (pub/sub). Goal: ours p50 <= 2 ms.

3. Fairness: 20 contenders loop acquire, hold 1 ms, release for a fixed time on one key.
   Reported: grants per second, the spread of grants between contenders (Jain's index, 1.0 =
   perfectly even; min/max) and the wait before each grant (p50 / p99 / max).

Blocks of each throughput case alternate so drift hits all alike. A real ``redis-server`` is
started on a free loopback port.

Usage: python bench/redis_locking.py [--pairs 3000] [--handoffs 200] [--seconds 3] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
import redis_lock  # noqa: E402
from bench._common import (  # noqa: E402
    close_locker,
    handoff_latencies,
    percentile,
    quick_defaults,
    request,
    write_section,
)
from tests.support.redis_server import RedisServer  # noqa: E402

from enhanced_locking.backends.redis_events import RedisEventBus  # noqa: E402
from enhanced_locking.backends.redis_store import RedisBackend  # noqa: E402
from enhanced_locking.config import EnhancedLockingConfig  # noqa: E402
from enhanced_locking.locking import EnhancedLocker  # noqa: E402
from enhanced_locking.metrics import Metrics  # noqa: E402

HEADING = "## Redis: our locker against redis-py's and python-redis-lock's locks"
BLOCK = 250
CONTENDERS = 20


def jain(counts: list[int]) -> float:
    total = sum(counts)
    return total * total / (len(counts) * sum(c * c for c in counts)) if total else 0.0


class Bench:
    """Everything measured shares one redis-server."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.config = EnhancedLockingConfig(
            enabled=True, backend="redis", redis_addr=server.addr, priority_queue=True,
            events=True, metrics=True, max_timeout="1m")
        self.client = aioredis.Redis(host=server.host, port=server.port)
        self.sync = redis.Redis(host=server.host, port=server.port)

    def locker(self) -> EnhancedLocker:
        backend = RedisBackend.from_config(self.config, "enhanced")
        events = RedisEventBus.from_config(self.config, enabled=lambda: self.config.events)
        return EnhancedLocker(backend, settings=lambda: self.config, events=events,
                              metrics=Metrics())

    async def close(self) -> None:
        await self.client.aclose()
        self.sync.close()

    # --- 1. throughput -------------------------------------------------------------------
    def floor(self) -> Callable[[int], Awaitable[float]]:
        async def run(pairs: int) -> float:
            started = time.perf_counter()
            for _ in range(pairs):
                await self.client.set("bench:floor", "t", nx=True, px=60_000)
                await self.client.delete("bench:floor")
            return time.perf_counter() - started
        return run

    def redis_py(self) -> Callable[[int], Awaitable[float]]:
        lock = self.client.lock("bench:redis-py", timeout=60)

        async def run(pairs: int) -> float:
            started = time.perf_counter()
            for _ in range(pairs):
                await lock.acquire()
                await lock.release()
            return time.perf_counter() - started
        return run

    def python_redis_lock(self) -> Callable[[int], Awaitable[float]]:
        lock = redis_lock.Lock(self.sync, "bench:python-redis-lock", expire=60)

        def loop(pairs: int) -> float:
            started = time.perf_counter()
            for _ in range(pairs):
                lock.acquire()
                lock.release()
            return time.perf_counter() - started

        async def run(pairs: int) -> float:
            return loop(pairs)  # synchronous client: it blocks the loop, as it would any app
        return run

    def ours(self, locker: EnhancedLocker) -> Callable[[int], Awaitable[float]]:
        ask = request()
        owner = ("acme/bench", 1)

        async def run(pairs: int) -> float:
            started = time.perf_counter()
            for _ in range(pairs):
                answer = await locker.acquire(ask)
                assert answer.acquired
                await locker.release(ask.key, owner=owner)
            return time.perf_counter() - started
        return run

    async def throughput(self, pairs: int) -> dict[str, float]:
        locker = self.locker()
        cases = {"floor": self.floor(), "redis-py": self.redis_py(),
                 "python-redis-lock": self.python_redis_lock(), "ours": self.ours(locker)}
        times = dict.fromkeys(cases, 0.0)
        for run in cases.values():
            await run(BLOCK)  # warm up: connections, scripts, caches
        blocks = max(1, pairs // BLOCK)
        for _ in range(blocks):
            for name, run in cases.items():
                times[name] += await run(BLOCK)
        await close_locker(locker)
        return {name: blocks * BLOCK / seconds for name, seconds in times.items()}

    # --- 2. hand-off latency -------------------------------------------------------------
    async def handoff_ours(self, count: int) -> list[float]:
        locker = self.locker()
        latencies = await handoff_latencies(locker, count)
        await close_locker(locker)
        return latencies

    async def handoff_redis_py(self, count: int) -> list[float]:
        holder = self.client.lock("bench:handoff-redis-py", timeout=60)
        waiter = self.client.lock("bench:handoff-redis-py", timeout=60)  # default sleep 0.1 s
        latencies = []
        for _ in range(count):
            await holder.acquire()
            waiting = asyncio.ensure_future(waiter.acquire(blocking=True))
            await asyncio.sleep(0.005)  # the waiter has tried once and is polling
            released = time.perf_counter()
            await holder.release()
            await waiting
            latencies.append(time.perf_counter() - released)
            await waiter.release()
        return latencies

    def handoff_python_redis_lock(self, count: int) -> list[float]:
        latencies = []
        for _ in range(count):
            holder = redis_lock.Lock(self.sync, "bench:handoff-prl", expire=60)
            waiter_client = redis.Redis(host=self.server.host, port=self.server.port)
            waiter = redis_lock.Lock(waiter_client, "bench:handoff-prl", expire=60)
            holder.acquire()
            got = threading.Event()
            done: list[float] = []

            def wait() -> None:
                waiter.acquire(blocking=True)  # noqa: B023
                done.append(time.perf_counter())  # noqa: B023
                got.set()  # noqa: B023

            thread = threading.Thread(target=wait)
            thread.start()
            time.sleep(0.005)  # the waiter sits in BLPOP
            released = time.perf_counter()
            holder.release()
            got.wait(10)
            thread.join()
            latencies.append(done[0] - released)
            waiter.release()
            waiter_client.close()
        return latencies

    # --- 3. fairness ---------------------------------------------------------------------
    async def fairness_ours(self, seconds: float) -> tuple[list[int], list[float]]:
        locker = self.locker()
        counts = [0] * CONTENDERS
        waits: list[float] = []
        stop = time.perf_counter() + seconds

        async def contender(n: int) -> None:
            ask = request(pull=100 + n, wait="30s")
            while time.perf_counter() < stop:
                asked = time.perf_counter()
                answer = await locker.acquire(ask)
                assert answer.acquired, answer
                waits.append(time.perf_counter() - asked)
                counts[n] += 1
                await asyncio.sleep(0.001)
                await locker.release(ask.key, owner=("acme/bench", 100 + n))

        await asyncio.gather(*(contender(n) for n in range(CONTENDERS)))
        await close_locker(locker)
        return counts, waits

    async def fairness_redis_py(self, seconds: float) -> tuple[list[int], list[float]]:
        counts = [0] * CONTENDERS
        waits: list[float] = []
        stop = time.perf_counter() + seconds

        async def contender(n: int) -> None:
            lock = self.client.lock("bench:fair-redis-py", timeout=60)
            while time.perf_counter() < stop:
                asked = time.perf_counter()
                await lock.acquire(blocking=True)
                waits.append(time.perf_counter() - asked)
                counts[n] += 1
                await asyncio.sleep(0.001)
                await lock.release()

        await asyncio.gather(*(contender(n) for n in range(CONTENDERS)))
        return counts, waits


def ms(value: float) -> str:
    return f"{value * 1000:.3f}"


def report(pairs: dict[str, float], handoffs: dict[str, list[float]],
           fairness: dict[str, tuple[list[int], list[float]]], counts: str) -> str:
    cpus = len(os.sched_getaffinity(0))
    lines = [
        f"{counts}. Python {platform.python_version()}, redis-py {redis.__version__}, "
        f"python-redis-lock {redis_lock.__version__}, redis-server "
        f"{_server_version()}, {cpus} CPUs, loopback. Ours: enhanced locker on the Redis "
        "backend, priority queue, fencing tokens, events through the Redis Stream, metrics.",
        "",
        "| measure | redis-py Lock | python-redis-lock | floor: SET NX PX + DEL | ours | "
        "ours vs redis-py / vs python-redis-lock / vs floor | goal |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| sequential acquire + release pairs/s | {pairs['redis-py']:,.0f} | "
        f"{pairs['python-redis-lock']:,.0f} | {pairs['floor']:,.0f} | {pairs['ours']:,.0f} | "
        f"{pairs['ours'] / pairs['redis-py']:.2f}x / "
        f"{pairs['ours'] / pairs['python-redis-lock']:.2f}x / "
        f"{pairs['ours'] / pairs['floor']:.2f}x | >= 1.0x of both libraries |",
    ]
    rp, prl, ours = handoffs["redis-py"], handoffs["python-redis-lock"], handoffs["ours"]
    lines.append(
        f"| contended hand-off, release → waiter granted, p50 / p99 ms | "
        f"{ms(percentile(rp, 0.5))} / {ms(percentile(rp, 0.99))} | "
        f"{ms(percentile(prl, 0.5))} / {ms(percentile(prl, 0.99))} | | "
        f"{ms(percentile(ours, 0.5))} / {ms(percentile(ours, 0.99))} | "
        f"{_faster(rp, ours)} / {_faster(prl, ours)} (p50) | ours p50 <= 2 ms |")
    for label, pick in (("grants/s", lambda c, w, s: f"{sum(c) / s:,.0f}"),
                        ("grants per contender: Jain's index (min-max)",
                         lambda c, w, s: f"{jain(c):.3f} ({min(c)}-{max(c)})"),
                        ("wait before a grant, p50 / p99 / max ms",
                         lambda c, w, s: f"{ms(percentile(w, 0.5))} / {ms(percentile(w, 0.99))}"
                                         f" / {ms(max(w))}")):
        seconds = fairness["seconds"][0][0]
        rp_c, rp_w = fairness["redis-py"]
        our_c, our_w = fairness["ours"]
        lines.append(f"| fairness, {CONTENDERS} contenders on one key: {label} | "
                     f"{pick(rp_c, rp_w, seconds)} | | | {pick(our_c, our_w, seconds)} | | |")
    return "\n".join(lines)


def _faster(theirs: list[float], ours: list[float]) -> str:
    ratio = statistics.median(theirs) / statistics.median(ours)
    return f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"


def _server_version() -> str:
    with redis.Redis(host="127.0.0.1", port=_SERVER_PORT[0]) as client:
        return str(client.info("server")["redis_version"])


_SERVER_PORT = [0]


async def run(args: argparse.Namespace, server: RedisServer) -> str:
    bench = Bench(server)
    try:
        pairs = await bench.throughput(args.pairs)
        handoffs = {
            "ours": await bench.handoff_ours(args.handoffs),
            "redis-py": await bench.handoff_redis_py(max(50, args.handoffs // 4)),
            "python-redis-lock": bench.handoff_python_redis_lock(args.handoffs),
        }
        fairness: dict[str, Any] = {
            "ours": await bench.fairness_ours(args.seconds),
            "redis-py": await bench.fairness_redis_py(args.seconds),
            "seconds": ([args.seconds], []),
        }
    finally:
        await bench.close()
    counts = (f"{args.pairs} pairs per throughput case, {args.handoffs} hand-offs "
              f"({max(50, args.handoffs // 4)} for redis-py's polling Lock), "
              f"{args.seconds:g} s of {CONTENDERS} contenders per lock")
    return report(pairs, handoffs, fairness, counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--handoffs", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--no-write", action="store_true")
    quick_defaults(parser, pairs=600, handoffs=50, seconds=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
        _SERVER_PORT[0] = server.port
        text = asyncio.run(run(args, server))
    print(text)
    if not args.no_write:
        write_section("redis", HEADING, text)


if __name__ == "__main__":
    main()
