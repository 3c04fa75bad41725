"""Migration costs: acquire latency in shadow mode, and how fast a weight move settles.

1. Shadow overhead. Two services in this process, each on its own embedded store: one routes
   every key to legacy (``migration-mode: route``, weight 0: the anchor), the other decides the
   same way and replays every answer on the shadow keyspace (``shadow``, sampling 1). Blocks of
   acquires alternate between them so drift hits both alike. *Light load*: one client, the
   event loop idles between requests as a server's does, so the replay runs in the gaps.
   *Saturated*: 16 clients back to back; the replay competes for the same CPU. *Over HTTP*:
   the same two modes as real ``enhanced-locking serve`` processes, one keep-alive client
   doing ``POST /v1/locks`` then ``DELETE /v1/locks/by-key``: the latency a caller sees.
2. Weight moves. Five replicas (full services on one embedded store file) and a replica
   registry: in process, then a real redis-server on a loopback port. Each move is given to the
   replicas one after the other with 0-10 ms between them (as a watch delivers it); the clock
   runs from the first replica getting it (and, second column, from the last) until every
   replica treats the new weight as the only authority. Heartbeat at its default (2s).

Usage: python bench/migration.py [--acquires 4000] [--moves 40] [--no-write]

The table is printed and written into docs/benchmarks.md under its own heading.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from bench._common import (  # noqa: E402
    DOC,
    percentile,
    quick_defaults,
    write_section,
)
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.service import ServiceProcess  # noqa: E402

from enhanced_locking.backends.redis_connection import RedisConnection, connect  # noqa: E402
from enhanced_locking.config import EnhancedLockingConfig  # noqa: E402
from enhanced_locking.factory import LockService  # noqa: E402
from enhanced_locking.migration.routing_registry import (  # noqa: E402
    MemoryRoutingRegistry,
    RedisRoutingRegistry,
    RoutingRegistry,
)
from enhanced_locking.provider import ConfigProvider  # noqa: E402
from enhanced_locking.types import LockRequest, Project, Pull  # noqa: E402

HEADING = "## Migration: shadow-mode overhead and weight moves across replicas"
BLOCK = 200
REPLICAS = 5


def request(i: int, pull: int = 1) -> LockRequest:
    return LockRequest(project=Project(repo_full_name="bench/infra", path=f"modules/m{i}"),
                       pull=Pull(num=pull))



async def service(data_dir: Path, **settings: Any) -> LockService:
    config = EnhancedLockingConfig(data_dir=str(data_dir), enabled=True, backend="boltdb",
                                   legacy_backend="boltdb", **settings)
    started = LockService(ConfigProvider(config))
    await started.start()
    return started


# --- 1. shadow overhead --------------------------------------------------------------------
async def light_block(svc: LockService, start: int, samples: list[float]) -> None:
    for i in range(start, start + BLOCK):
        begin = time.perf_counter()
        result = await svc.router.acquire(request(i))
        samples.append(time.perf_counter() - begin)
        assert result.acquired
        await asyncio.sleep(0)  # the server's idle moment between requests
        await svc.router.release(result.lock_key)
        await asyncio.sleep(0)


async def saturated(svc: LockService, count: int, samples: list[float]) -> float:
    clients = 16
    per_client = count // clients

    async def client(number: int) -> None:
        for i in range(per_client):
            key = number * 1_000_000 + i
            begin = time.perf_counter()
            result = await svc.router.acquire(request(key, pull=number + 1))
            samples.append(time.perf_counter() - begin)
            await svc.router.release(result.lock_key)
            await asyncio.sleep(0)

    begin = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    return per_client * clients / (time.perf_counter() - begin)


async def shadow_overhead(acquires: int, work: Path) -> dict[str, Any]:
    route = await service(work / "route", migration_weight=0)
    shadow = await service(work / "shadow", migration_mode="shadow", shadow_sample_ratio=1)
    try:
        light: dict[str, list[float]] = {"route": [], "shadow": []}
        for block in range(0, acquires, BLOCK):
            for name, svc in (("route", route), ("shadow", shadow)):
                await light_block(svc, block, light[name])
            await shadow.migration.shadow.drain()
        heavy: dict[str, list[float]] = {"route": [], "shadow": []}
        rates = {}
        for name, svc in (("route", route), ("shadow", shadow)):
            rates[name] = await saturated(svc, acquires, heavy[name])
        await shadow.migration.shadow.drain()
        stats = shadow.migration.shadow.stats
        http = over_http(acquires, work)
        return {"light": light, "heavy": heavy, "http": http, "rates": rates,
                "replayed": stats.replayed, "dropped": stats.dropped,
                "mismatches": stats.mismatches}
    finally:
        await route.close()
        await shadow.close()


def over_http(acquires: int, work: Path) -> dict[str, list[float]]:
    flags = {
        "route": ["--enhanced-locking-enabled", "--enhanced-locking-migration-weight=0"],
        "shadow": ["--enhanced-locking-enabled", "--enhanced-locking-migration-mode=shadow"],
    }
    processes = {}
    for name, args in flags.items():
        (work / f"http-{name}").mkdir()
        processes[name] = ServiceProcess(work / f"http-{name}", args=args,
                                         log_dir=work).start()
    samples: dict[str, list[float]] = {name: [] for name in flags}
    try:
        clients = {name: httpx.Client(base_url=p.url) for name, p in processes.items()}
        for block in range(0, acquires, BLOCK // 4):
            for name, client in clients.items():
                for i in range(block, block + BLOCK // 4):
                    body = {"project": {"repoFullName": "bench/infra", "path": f"m{i}"},
                            "pull": {"num": 1}}
                    begin = time.perf_counter()
                    answer = client.post("/v1/locks", json=body)
                    samples[name].append(time.perf_counter() - begin)
                    assert answer.status_code == 200, answer.text
                    client.delete("/v1/locks/by-key", params={"key": answer.json()["lockKey"]})
        for client in clients.values():
            client.close()
    finally:
        for process in processes.values():
            process.stop()
    return samples


# --- 2. weight moves -----------------------------------------------------------------------
async def moves(count: int, work: Path, registry: Callable[[], RoutingRegistry]
                ) -> tuple[list[float], list[float]]:
    rng = random.Random(11)
    replicas = []
    for n in range(REPLICAS):
        config = EnhancedLockingConfig(
            data_dir=str(work), enabled=True, backend="boltdb", legacy_backend="boltdb",
            migration_weight=0, replica_id=f"replica-{n}")
        svc = LockService(ConfigProvider(config), routing_registry=registry())
        await svc.start()
        replicas.append(svc)
    from_first, from_last = [], []
    weight = 0.0
    try:
        for _ in range(count):
            weight = rng.choice([w for w in (0, 5, 10, 25, 50, 75, 100) if w != weight])
            begin = time.perf_counter()
            for svc in rng.sample(replicas, len(replicas)):
                await svc.provider.set_layer("cluster", {"migration_weight": weight})
                await asyncio.sleep(rng.uniform(0, 0.01))
            last = time.perf_counter()
            async with asyncio.timeout(30):
                await asyncio.gather(*(s.migration.transitions.wait_settled() for s in replicas))
            done = time.perf_counter()
            assert all(s.migration.transitions.status().weight == weight for s in replicas)
            from_first.append(done - begin)
            from_last.append(done - last)
    finally:
        for svc in replicas:
            await svc.close()
    return from_first, from_last


# --- the table ------------------------------------------------------------------------------
def ms(value: float) -> str:
    return f"{value * 1000:.3f}"


def table(over: dict[str, Any], moved: dict[str, tuple[list[float], list[float]]],
          acquires: int, count: int) -> str:
    light, heavy, rates = over["light"], over["heavy"], over["rates"]
    rows = [
        f"Machine: {platform.machine()}, Python {platform.python_version()}, "
        f"{platform.system()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
        f"at the end; embedded store (SQLite WAL) on both sides; {acquires} acquires per mode "
        "and load. Ratios are shadow ÷ route-only from the same run.",
        "",
        "| acquire latency (ms) | route-only p50 | shadow p50 | ratio | route-only p99 "
        "| shadow p99 | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, data in (("light load (1 client)", light), ("saturated (16 clients)", heavy),
                        ("over HTTP (1 client, real processes)", over["http"])):
        r50, s50 = statistics.median(data["route"]), statistics.median(data["shadow"])
        r99, s99 = percentile(data["route"], 0.99), percentile(data["shadow"], 0.99)
        rows.append(f"| {label} | {ms(r50)} | {ms(s50)} | {s50 / r50:.2f}x | {ms(r99)} "
                    f"| {ms(s99)} | {s99 / r99:.2f}x |")
    rows += [
        "",
        f"Saturated throughput: route-only {rates['route']:.0f} acquires/s, shadow "
        f"{rates['shadow']:.0f} acquires/s ({rates['shadow'] / rates['route']:.2f}x). Shadow "
        f"replays: {over['replayed']} run, {over['dropped']} dropped (queue full), "
        f"{over['mismatches']} mismatches.",
        "",
        f"| weight move, {REPLICAS} replicas, {count} moves (ms) | p50 | p99 | max "
        "| p50 after the last replica got it | p99 after the last |",
        "|---|---|---|---|---|---|",
    ]
    for label, (first, last) in moved.items():
        rows.append(f"| {label} | {ms(statistics.median(first))} | {ms(percentile(first, 0.99))} "
                    f"| {ms(max(first))} | {ms(statistics.median(last))} "
                    f"| {ms(percentile(last, 0.99))} |")
    rows += [
        "",
        "A move is authoritative when every replica's moving band is empty: each replica "
        "applied the weight, reported it, and saw every other live replica report it (registry "
        "polled every 50 ms while a move is under way, every heartbeat otherwise).",
    ]
    return "\n".join(rows)



async def run(acquires: int, count: int) -> str:
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        over = await shadow_overhead(acquires, root)
        moved: dict[str, tuple[list[float], list[float]]] = {}
        moved["in-process registry"] = await moves(count, root / "memory",
                                                   _shared(MemoryRoutingRegistry()))
        (root / "redis").mkdir()
        with RedisServer(root / "redis") as server:
            connections: list[RedisConnection] = []
            config = EnhancedLockingConfig(redis_addr=server.addr)

            def redis_registry() -> RoutingRegistry:
                connections.append(connect(config))
                return RedisRoutingRegistry(connections[-1], prefix="bench:")

            try:
                moved["Redis registry (redis-server on loopback)"] = await moves(
                    count, root / "redis-data", redis_registry)
            finally:
                for connection in connections:
                    await connection.close()
    return table(over, moved, acquires, count)


def _shared(registry: RoutingRegistry) -> Callable[[], RoutingRegistry]:
    return lambda: registry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acquires", type=int, default=4000)
    parser.add_argument("--moves", type=int, default=40)
    parser.add_argument("--no-write", action="store_true", help="print only")
    quick_defaults(parser, acquires=800, moves=8)
    args = parser.parse_args()
    text = asyncio.run(run(args.acquires, args.moves))
    print(text)
    if not args.no_write:
        write_section("migration", HEADING, text)
        print(f"\nwritten to {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
