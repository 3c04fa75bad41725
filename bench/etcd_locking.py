"""The etcd backend against etcd's own lock recipe, on one etcd cluster in one run.

The anchor is etcd's ``concurrency.Mutex`` (go.etcd.io/etcd/client/v3 at the version of the
etcd the harness builds, ``hack/versions.env``), timed by the Go program in
``bench/etcd_mutex/`` against the same 3-member cluster on loopback:

1. Sequential acquire + release pairs per second on one key, no contention. Ours: the
   enhanced locker on the etcd backend (priority queue, fencing tokens, events through the
   etcd key history, metrics on). Goal: at least 0.8x of etcd's Mutex.
2. Hand-off latency: a holder releases while one waiter blocks; from the release call to the
   waiter's acquire returning (p50 / p99). Goal: our p50 within 2x of etcd's Mutex.

The Redis backend (on a redis-server on loopback) is timed the same way in the same run, for
comparison. The members run with ``--unsafe-no-fsync`` (the machine's disk is not what is
measured; every case pays the same consensus round trips).

Usage: python bench/etcd_locking.py [--pairs 1000] [--handoffs 100] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import (  # noqa: E402
    close_locker,
    handoff_latencies,
    percentile,
    quick_defaults,
    request,
    write_section,
)
from tests.support.etcd_server import EtcdCluster  # noqa: E402
from tests.support.gobuild import build  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

from enhanced_locking.backends.base import Backend  # noqa: E402
from enhanced_locking.backends.etcd_events import EtcdEventBus  # noqa: E402
from enhanced_locking.backends.etcd_store import EtcdBackend  # noqa: E402
from enhanced_locking.backends.redis_events import RedisEventBus  # noqa: E402
from enhanced_locking.backends.redis_store import RedisBackend  # noqa: E402
from enhanced_locking.config import EnhancedLockingConfig  # noqa: E402
from enhanced_locking.events import EventBus  # noqa: E402
from enhanced_locking.locking import EnhancedLocker  # noqa: E402
from enhanced_locking.metrics import Metrics  # noqa: E402

HEADING = "## etcd: our locker against etcd's own concurrency.Mutex (and the Redis backend)"
PAIRS_GOAL, HANDOFF_GOAL = 0.8, 2.0


def go_mutex(cluster: EtcdCluster, pairs: int, handoffs: int) -> dict[str, Any]:
    binary = build(REPO / "bench" / "etcd_mutex", "etcdmutex",
                   missing="bench/etcd_locking.py needs Go (1.25 or newer) to build etcd's "
                           "concurrency.Mutex anchor: install Go and put `go` on PATH")
    out = subprocess.run(
        [str(binary), f"-endpoints={','.join(cluster.endpoints)}", f"-pairs={pairs}",
         f"-handoffs={handoffs}", f"-prefix=/bench/go-{os.getpid()}/"],
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
        else:
            backend = RedisBackend.from_config(self.config, "enhanced")
            events = RedisEventBus.from_config(self.config)
        return EnhancedLocker(backend, settings=lambda: self.config, events=events,
                              metrics=Metrics())

    async def pairs(self, count: int) -> float:
        locker = self.locker()
        ask, owner = request(), ("acme/bench", 1)
        for _ in range(50):  # warm up: connections, session, scripts
            assert (await locker.acquire(ask)).acquired
            await locker.release(ask.key, owner=owner)
        started = time.perf_counter()
        for _ in range(count):
            assert (await locker.acquire(ask)).acquired
            await locker.release(ask.key, owner=owner)
        elapsed = time.perf_counter() - started
        await close_locker(locker)
        return count / elapsed

    async def handoffs(self, count: int) -> list[float]:
        locker = self.locker()
        latencies = await handoff_latencies(locker, count)
        await close_locker(locker)
        return latencies


def ms(value: float) -> str:
    return f"{value * 1000:.2f}"


async def measure(args: argparse.Namespace, cluster: EtcdCluster,
                  redis: RedisServer) -> str:
    common = {"enabled": True, "priority_queue": True, "events": True, "metrics": True,
              "max_timeout": "1m"}
    on_etcd = Ours(EnhancedLockingConfig(backend="etcd", etcd_endpoints=cluster.endpoints,
                                         etcd_key_prefix=f"/bench/ours-{os.getpid()}/",
                                         **common))
    on_redis = Ours(EnhancedLockingConfig(backend="redis", redis_addr=redis.addr, **common))
    anchor = go_mutex(cluster, args.pairs, args.handoffs)
    rows = {
        "etcd concurrency.Mutex (Go)": (anchor["pairs_per_second"], anchor["handoffs"]),
        "ours, etcd backend": (await on_etcd.pairs(args.pairs),
                               await on_etcd.handoffs(args.handoffs)),
        "ours, Redis backend": (await on_redis.pairs(args.pairs),
                                await on_redis.handoffs(args.handoffs)),
    }
    base_pairs, base_handoffs = rows["etcd concurrency.Mutex (Go)"]
    base_p50 = statistics.median(base_handoffs)
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; etcd: 3 members on loopback (no fsync); "
        f"{args.pairs} pairs and {args.handoffs} hand-offs per case.",
        "",
        "| case | pairs/s | x Mutex (goal >= 0.8 for etcd) | hand-off p50 ms | p99 ms "
        "| p50 x Mutex (goal <= 2 for etcd) |",
        "|---|---|---|---|---|---|",
    ]
    for name, (pairs, handoffs) in rows.items():
        p50 = statistics.median(handoffs)
        lines.append(f"| {name} | {pairs:.0f} | {pairs / base_pairs:.2f} | {ms(p50)} | "
                     f"{ms(percentile(handoffs, 0.99))} | {p50 / base_p50:.2f} |")
    etcd_pairs, etcd_handoffs = rows["ours, etcd backend"]
    pairs_met = etcd_pairs / base_pairs >= PAIRS_GOAL
    handoff_met = statistics.median(etcd_handoffs) / base_p50 <= HANDOFF_GOAL
    lines += ["", f"Goals on etcd: pairs {'met' if pairs_met else 'NOT met'} "
              f"({etcd_pairs / base_pairs:.2f}x, goal {PAIRS_GOAL}x); hand-off p50 "
              f"{'met' if handoff_met else 'NOT met'} "
              f"({statistics.median(etcd_handoffs) / base_p50:.2f}x, goal <= {HANDOFF_GOAL}x)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--handoffs", type=int, default=100)
    parser.add_argument("--no-write", action="store_true")
    quick_defaults(parser, pairs=200, handoffs=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = EtcdCluster(Path(tmp) / "etcd", members_count=3, fsync=False).start()
        try:
            with RedisServer(Path(tmp) / "redis") as redis:
                text = asyncio.run(measure(args, cluster, redis))
        finally:
            cluster.close()
    print(text)
    if not args.no_write:
        write_section("etcd", HEADING, text)


if __name__ == "__main__":
    main()
