"""The Redis backend against the Redis locks people use today, all on one Redis in one run.

1. Sequential acquire + release pairs per second on one key, no contention:

   * the floor: a bare ``SET key token NX PX`` then ``DEL`` (two round trips, no safety);
   * redis-py's ``Lock`` (asyncio: ``SET NX PX``, release by a Lua script);
   * python-redis-lock's ``Lock`` (synchronous redis client; release also signals a list);
   * ours: the enhanced locker on the Redis backend with priority queue, fencing tokens,
     events (through the Redis Stream) and metrics on. Goals: >= 1.0x of redis-py's ``Lock``
     and >= 0.8x of the floor;
   * to show where ours spends its time: the same locker with events off, and the Redis store
     alone (its acquire and release called directly, no locker around them).

   Several rounds; each reports the median round and the best one (the machine may be
   shared), the ratios taken within a round. Then the commands a pair sends to Redis, read with
   ``MONITOR`` over a sample of pairs (commands a script runs inside Redis not counted), the
   round trips they take, the CPU time redis-server spends per pair (``INFO cpu``), the
   commands it runs for one, those the scripts call inside Redis included (``INFO commandstats``),
   and the CPU time the bench's own process, the client, spends per pair (``time.process_time``).

2. Contended hand-off latency: a holder releases while one waiter blocks in acquire; from the
   release call to the waiter's acquire returning. redis-py's ``Lock`` polls (``sleep=0.1``
   by default); python-redis-lock waits on ``BLPOP`` of a signal list; ours is woken by the
   grant (pub/sub). Goal: ours p50 <= 2 ms.

3. Fairness: 20 contenders loop acquire, hold 1 ms, release for a fixed time on one key.
   Reported: grants per second, the spread of grants between contenders (Jain's index, 1.0 =
   perfectly even; min/max) and the wait before each grant (p50 / p99 / max).

Blocks of each throughput case alternate so drift hits all alike. A real ``redis-server`` is
started on a free loopback port.

Usage: python bench/redis_locking.py [--pairs 3000] [--rounds 3] [--handoffs 200] [--seconds 3]
       [--no-write]

``--only floor|redis-py|ours|ours-events-off|store --pairs N [--redis HOST:PORT]`` runs N
uncontended pairs of one case after a warm-up of 200 and prints nothing, against the
redis-server at ``--redis`` (else one it starts, a process of its own). For counts the load
does not change: run it under ``valgrind --tool=callgrind`` (the client's instructions: the
server is another process), or run that redis-server under callgrind (the server's), with two
counts each, and divide the difference of the instructions by the difference of the counts:
those of one pair. (The events' share depends on the rate: the outbox writes what 10 ms
gathered, and under valgrind 10 ms hold fewer pairs.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
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
    handoffs_of,
    percentile,
    quick_defaults,
    request,
    verdict,
    write_section,
)
from bench._goals import Goal, Report  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

from enhanced_locking.backends import redis_connection  # noqa: E402
from enhanced_locking.backends.redis_connection import HiredisConnection  # noqa: E402
from enhanced_locking.backends.redis_events import RedisEventBus  # noqa: E402
from enhanced_locking.backends.redis_store import RedisBackend  # noqa: E402
from enhanced_locking.backends.waiting import QueuePolicy  # noqa: E402
from enhanced_locking.config import EnhancedLockingConfig  # noqa: E402
from enhanced_locking.locking import EnhancedLocker  # noqa: E402
from enhanced_locking.metrics import Metrics  # noqa: E402
from enhanced_locking.types import Candidate, Priority  # noqa: E402

HEADING = "## Redis: our locker against redis-py's and python-redis-lock's locks"
BLOCK = 250
CONTENDERS = 20
SAMPLE = 50
"""Pairs whose commands MONITOR counts."""
SERVER_SAMPLE = 500
"""Pairs over which the redis-server's CPU time is read."""

GOAL_VS_REDIS_PY = 1.0
GOAL_VS_FLOOR = 0.8
GOAL_HANDOFF_P50 = 0.002
CASES = {
    "floor": "floor: bare SET NX PX + DEL",
    "redis-py": "redis-py Lock",
    "python-redis-lock": "python-redis-lock Lock",
    "ours": "ours: the locker on the Redis store",
    "ours, events off": "ours, events off",
    "store": "our Redis store alone (no locker)",
}


def jain(counts: list[int]) -> float:
    total = sum(counts)
    return total * total / (len(counts) * sum(c * c for c in counts)) if total else 0.0


class _Address:
    """A redis-server started elsewhere (``--redis``): what :class:`Bench` reads of one."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port, self.addr = host, port, f"{host}:{port}"


class Bench:
    """Everything measured shares one redis-server."""

    def __init__(self, server: RedisServer | _Address) -> None:
        self.server = server
        self.config = EnhancedLockingConfig(
            enabled=True, backend="redis", redis_addr=server.addr, priority_queue=True,
            events=True, metrics=True, max_timeout="1m")
        self.client = aioredis.Redis(host=server.host, port=server.port)
        self.sync = redis.Redis(host=server.host, port=server.port)

    def locker(self, *, events: bool = True) -> EnhancedLocker:
        config = self.config.model_copy(update={"events": events})
        backend = RedisBackend.from_config(config, "enhanced")
        bus = RedisEventBus.from_config(config, enabled=lambda: config.events)
        return EnhancedLocker(backend, settings=lambda: config, events=bus, metrics=Metrics())

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

    def store(self, locker: EnhancedLocker) -> Callable[[int], Awaitable[float]]:
        """The Redis store's own acquire and release, as the locker calls them."""
        backend = locker.backend
        assert isinstance(backend, RedisBackend)
        ask = request(pull=2)
        candidate = Candidate.of_request(ask, priority=Priority.NORMAL)
        policy = QueuePolicy.from_config(self.config)

        async def run(pairs: int) -> float:
            started = time.perf_counter()
            for _ in range(pairs):
                outcome = await backend.acquire_or_enqueue(candidate, ttl=None, wait=None,
                                                           policy=policy)
                assert outcome.locks
                await backend.release_and_handoff(ask.key, owner=("acme/bench", 2),
                                                  policy=policy)
            return time.perf_counter() - started
        return run

    async def throughput(self, pairs: int, rounds: int) -> list[dict[str, float]]:
        """Pairs/s of every case, one dict per round."""
        locker, quiet = self.locker(), self.locker(events=False)
        store = self.locker(events=False)
        cases = {"floor": self.floor(), "redis-py": self.redis_py(),
                 "python-redis-lock": self.python_redis_lock(), "ours": self.ours(locker),
                 "ours, events off": self.ours(quiet), "store": self.store(store)}
        for run in cases.values():
            await run(BLOCK)  # warm up: connections, scripts, caches
        blocks = max(1, pairs // BLOCK)
        results = []
        for _ in range(rounds):
            times = dict.fromkeys(cases, 0.0)
            for _ in range(blocks):
                for name, run in cases.items():
                    times[name] += await run(BLOCK)
            results.append({name: blocks * BLOCK / seconds for name, seconds in times.items()})
        for done in (locker, quiet, store):
            await close_locker(done)
        return results

    async def server_time(self) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """Microseconds of CPU the redis-server process spends on one uncontended pair
        (``INFO cpu``, user + system, over :data:`SERVER_SAMPLE` pairs: the commands, the
        scripts they run and the network I/O; CPU time, so a machine busy with other work
        does not inflate it the way it does wall-clock command times), the commands
        Redis runs for one pair, those the scripts call inside Redis included
        (``INFO commandstats`` over the same pairs), and the microseconds of CPU this process
        (the client) spends on one pair over the same pairs (``time.process_time``: the
        Python, the event loop and the socket calls; for ours the events' write behind too,
        with the pause after the sample in which it finishes)."""
        locker = self.locker()
        cases = {"floor": self.floor(), "redis-py": self.redis_py(), "ours": self.ours(locker)}
        spent, commands, client = {}, {}, {}
        for name, run in cases.items():
            await run(10)
            await asyncio.sleep(0.05)  # the warm-up's events written
            await self.client.config_resetstat()
            before = await self._server_cpu()
            started = time.process_time()
            await run(SERVER_SAMPLE)
            await asyncio.sleep(0.05)  # the sample's events written
            client[name] = (time.process_time() - started) / SERVER_SAMPLE * 1e6
            spent[name] = (await self._server_cpu() - before) / SERVER_SAMPLE * 1e6
            stats: Any = await self.client.info("commandstats")
            commands[name] = sum(
                int(entry["calls"]) for command, entry in stats.items()
                if command not in ("cmdstat_info", "cmdstat_config|resetstat")
            ) / SERVER_SAMPLE
        await close_locker(locker)
        return spent, commands, client

    async def _server_cpu(self) -> float:
        cpu: Any = await self.client.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    async def commands(self) -> tuple[dict[str, float], float]:
        """The commands one uncontended pair of ours sends to Redis, by name, per pair
        (``MONITOR`` over :data:`SAMPLE` pairs; what scripts run inside Redis not counted),
        and the round trips they took (sends on our connections: a pipeline is one)."""
        locker = self.locker()
        run = self.ours(locker)
        await run(10)
        await asyncio.sleep(0.1)  # the warm-up's events written
        seen: list[str] = []
        sends = [0]
        # Our calls are written by redis_connection._send (through redis-py's
        # send_packed_command only on a connection not open yet); the rest of redis-py's
        # sends on our connections by send_packed_command: each write counted once.
        send, send_direct = HiredisConnection.send_packed_command, redis_connection._send
        direct = contextvars.ContextVar("direct", default=False)

        async def counted(connection: HiredisConnection, *args: Any, **kwargs: Any) -> None:
            if not direct.get():
                sends[0] += 1
            await send(connection, *args, **kwargs)

        async def counted_direct(connection: Any, packed: bytes) -> None:
            sends[0] += 1
            token = direct.set(True)
            try:
                await send_direct(connection, packed)
            finally:
                direct.reset(token)
        async with self.client.monitor() as monitor:
            async def listen() -> None:
                async for command in monitor.listen():
                    if command.get("client_type") != "lua":
                        seen.append(str(command["command"]).split(" ", 1)[0].upper())
            listening = asyncio.ensure_future(listen())
            await asyncio.sleep(0.05)
            HiredisConnection.send_packed_command = counted  # type: ignore[method-assign]
            redis_connection._send = counted_direct
            try:
                await run(SAMPLE)
                await asyncio.sleep(0.1)  # the events' outbox written
            finally:
                HiredisConnection.send_packed_command = send  # type: ignore[method-assign]
                redis_connection._send = send_direct
            listening.cancel()
        await close_locker(locker)
        counts: dict[str, float] = {}
        for name in seen:
            counts[name] = counts.get(name, 0) + 1 / SAMPLE
        return counts, sends[0] / SAMPLE

    # --- 2. hand-off latency -------------------------------------------------------------
    async def handoff_ours(self, count: int) -> list[float]:
        return await handoffs_of(self.locker(), count)

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


def _cell(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({max(values):{fmt}})"


def report(rounds: list[dict[str, float]], commands: tuple[dict[str, float], float],
           server: tuple[dict[str, float], dict[str, float], dict[str, float]],
           handoffs: dict[str, list[float]],
           fairness: dict[str, tuple[list[int], list[float]]], counts: str) -> Report:
    cpus = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    lines = [
        f"{counts}. Python {platform.python_version()}, redis-py {redis.__version__}, "
        f"python-redis-lock {redis_lock.__version__}, redis-server "
        f"{_server_version()}, {cpus} CPUs, loopback, load average {load:.1f} at the end. "
        "Ours: enhanced locker on the Redis backend, priority queue, fencing tokens, events "
        "through the Redis Stream, metrics. Each cell: the median round (the best round); "
        "ratios are taken within a round.",
        "",
        "| sequential acquire + release, one key | pairs/s | x redis-py Lock | x floor |",
        "|---|---:|---:|---:|",
    ]
    for name, label in CASES.items():
        lines.append(
            f"| {label} | {_cell([r[name] for r in rounds], ',.0f')} | "
            f"{_cell([r[name] / r['redis-py'] for r in rounds], '.2f')}x | "
            f"{_cell([r[name] / r['floor'] for r in rounds], '.2f')}x |")
    vs_lock = [r["ours"] / r["redis-py"] for r in rounds]
    vs_floor = [r["ours"] / r["floor"] for r in rounds]
    ours_p50 = percentile(handoffs["ours"], 0.5)
    goals = (
        Goal(f"Redis: ours >= {GOAL_VS_REDIS_PY:.1f}x of redis-py's `Lock`, pairs/s",
             f"{statistics.median(vs_lock):.2f}x (best {max(vs_lock):.2f}x)",
             statistics.median(vs_lock) >= GOAL_VS_REDIS_PY),
        Goal(f"Redis: ours >= {GOAL_VS_FLOOR:.1f}x of bare `SET NX PX` + `DEL`, pairs/s",
             f"{statistics.median(vs_floor):.2f}x (best {max(vs_floor):.2f}x)",
             statistics.median(vs_floor) >= GOAL_VS_FLOOR),
        Goal(f"Redis: contended hand-off p50 <= {GOAL_HANDOFF_P50 * 1000:g} ms",
             f"{ms(ours_p50)} ms", ours_p50 <= GOAL_HANDOFF_P50))
    lines += [
        "",
        "| goal | measured: median round (best round) | goal | met (median round) |",
        "|---|---:|---:|---|",
        f"| ours x redis-py Lock, pairs/s | {_cell(vs_lock, '.2f')}x | "
        f">= {GOAL_VS_REDIS_PY:.1f}x | "
        f"{verdict(statistics.median(vs_lock) >= GOAL_VS_REDIS_PY)} |",
        f"| ours x floor (SET NX PX + DEL), pairs/s | {_cell(vs_floor, '.2f')}x | "
        f">= {GOAL_VS_FLOOR:.1f}x | {verdict(statistics.median(vs_floor) >= GOAL_VS_FLOOR)} |",
        f"| ours: contended hand-off p50 | {ms(ours_p50)} ms | "
        f"<= {GOAL_HANDOFF_P50 * 1000:g} ms | {verdict(ours_p50 <= GOAL_HANDOFF_P50)} |",
        "",
        "Commands one uncontended pair of ours sends to Redis (MONITOR, "
        f"{SAMPLE} pairs; commands run inside the scripts not counted): "
        + ", ".join(f"{name} {count:.2f}" for name, count in sorted(commands[0].items()))
        + f"; in {commands[1]:.2f} round trips. The events are appended by a write-behind "
        "outbox on a connection of its own, one script call (`append_events.lua`) a batch, "
        "one round trip. "
        f"CPU time of the redis-server process per pair (INFO cpu, {SERVER_SAMPLE} pairs "
        f"each, the scripts, commands and network I/O): ours {server[0]['ours']:.0f} µs, "
        f"redis-py Lock {server[0]['redis-py']:.0f} µs, floor {server[0]['floor']:.0f} µs. "
        "Commands Redis runs per pair, those called inside scripts and functions included "
        f"(INFO commandstats): ours {server[1]['ours']:.1f}, redis-py Lock "
        f"{server[1]['redis-py']:.1f}, floor {server[1]['floor']:.1f}. "
        "CPU time of the bench's own process per pair over the same pairs (the client: "
        "its Python, event loop and socket calls, for ours the events' write behind too; "
        f"time.process_time): ours {server[2]['ours']:.0f} µs, redis-py Lock "
        f"{server[2]['redis-py']:.0f} µs, floor {server[2]['floor']:.0f} µs.",
        "",
        "| contended | redis-py Lock | python-redis-lock | ours | ours vs redis-py / vs "
        "python-redis-lock |",
        "|---|---:|---:|---:|---:|",
    ]
    rp, prl, ours = handoffs["redis-py"], handoffs["python-redis-lock"], handoffs["ours"]
    lines.append(
        f"| hand-off, release → waiter granted, p50 / p99 ms | "
        f"{ms(percentile(rp, 0.5))} / {ms(percentile(rp, 0.99))} | "
        f"{ms(percentile(prl, 0.5))} / {ms(percentile(prl, 0.99))} | "
        f"{ms(percentile(ours, 0.5))} / {ms(percentile(ours, 0.99))} | "
        f"{_faster(rp, ours)} / {_faster(prl, ours)} (p50) |")
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
                     f"{pick(rp_c, rp_w, seconds)} | | {pick(our_c, our_w, seconds)} | |")
    return Report("\n".join(lines), goals)


def _faster(theirs: list[float], ours: list[float]) -> str:
    ratio = statistics.median(theirs) / statistics.median(ours)
    return f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"


def _server_version() -> str:
    with redis.Redis(host="127.0.0.1", port=_SERVER_PORT[0]) as client:
        return str(client.info("server")["redis_version"])


_SERVER_PORT = [0]


async def run(args: argparse.Namespace, server: RedisServer) -> Report:
    bench = Bench(server)
    try:
        pairs = await bench.throughput(args.pairs, args.rounds)
        commands = await bench.commands()
        in_server = await bench.server_time()
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
    counts = (f"{args.rounds} rounds of {args.pairs} pairs per throughput case, "
              f"{args.handoffs} hand-offs "
              f"({max(50, args.handoffs // 4)} for redis-py's polling Lock), "
              f"{args.seconds:g} s of {CONTENDERS} contenders per lock")
    return report(pairs, commands, in_server, handoffs, fairness, counts)


async def only(case: str, pairs: int, server: RedisServer | None, addr: str) -> None:
    """``pairs`` uncontended pairs of one case after a warm-up of 200 (``--only``)."""
    host, _, port = addr.rpartition(":")
    bench = Bench(server if server is not None else _Address(host, int(port)))
    locker = bench.locker(events=case == "ours")
    cases = {"floor": bench.floor, "redis-py": bench.redis_py,
             "ours": lambda: bench.ours(locker), "ours-events-off": lambda: bench.ours(locker),
             "store": lambda: bench.store(locker)}
    run = cases[case]()
    await run(200)
    await run(pairs)
    await close_locker(locker)
    await bench.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("floor", "redis-py", "ours", "ours-events-off",
                                            "store"))
    parser.add_argument("--redis", metavar="HOST:PORT", default=None)
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--handoffs", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--no-write", action="store_true")
    quick_defaults(parser, pairs=500, rounds=2, handoffs=50, seconds=1.0)
    args = parser.parse_args()
    if args.only is not None:
        if args.redis is not None:
            asyncio.run(only(args.only, args.pairs, None, args.redis))
            return
        with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
            asyncio.run(only(args.only, args.pairs, server, server.addr))
        return
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
        _SERVER_PORT[0] = server.port
        found = asyncio.run(run(args, server))
    print(found.text)
    if not args.no_write:
        write_section("redis", HEADING, found)


if __name__ == "__main__":
    main()
