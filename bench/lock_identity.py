"""What the lock-identity check costs an acquire (docs/01-foundation.md, "Lock identity").

The router refuses a project whose joined key another project holds. A fail-fast acquire is
checked on the answer it already has (no extra call); a waiting acquire is checked before it
queues, with one lookup of the key. Measured: acquire + release pairs per second on the
embedded store through the router (enhanced locking on, no migration), against the same router
path without the check (its ``_acquire_routed``, the anchor), fail fast and with ``wait``, in
alternating blocks of the same run.

Usage: python bench/lock_identity.py [--pairs 4000] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import quick_defaults, write_section  # noqa: E402

from enhanced_locking.config import EnhancedLockingConfig  # noqa: E402
from enhanced_locking.factory import LockService  # noqa: E402
from enhanced_locking.provider import ConfigProvider  # noqa: E402
from enhanced_locking.types import LockRequest, Project, Pull  # noqa: E402

BLOCK = 250


def request(wait: timedelta | None) -> LockRequest:
    return LockRequest(project=Project(repo_full_name="acme/bench", path="envs/prod"),
                       pull=Pull(num=1), wait=wait)


async def measure(pairs: int, work: Path) -> dict[str, float]:
    config = EnhancedLockingConfig(enabled=True, data_dir=str(work))
    service = LockService(ConfigProvider(config))
    await service.start()
    assert service.enhanced is not None
    owner = ("acme/bench", 1)

    router = service.router

    def loop(acquire: Callable[[LockRequest], Awaitable[Any]],
             ask: LockRequest) -> Callable[[int], Awaitable[float]]:
        async def run(count: int) -> float:
            started = time.perf_counter()
            for _ in range(count):
                result = await acquire(ask)
                assert result.acquired
                await router.release(ask.key, owner=owner)
            return time.perf_counter() - started
        return run

    wait = request(timedelta(seconds=1))
    cases = {
        "fail fast, without": loop(router._acquire_routed, request(None)),
        "fail fast, with": loop(router.acquire, request(None)),
        "wait 1s, without": loop(router._acquire_routed, wait),
        "wait 1s, with": loop(router.acquire, wait),
    }
    for run in cases.values():
        await run(BLOCK)  # warm up
    times = dict.fromkeys(cases, 0.0)
    blocks = max(1, pairs // BLOCK)
    for _ in range(blocks):
        for name, run in cases.items():
            times[name] += await run(BLOCK)
    await service.close()
    return {name: blocks * BLOCK / seconds for name, seconds in times.items()}


def report(rates: dict[str, float], pairs: int) -> str:
    rows = ["| acquire + release through the router | pairs/s | vs without the check |",
            "|---|---:|---:|"]
    for kind in ("fail fast", "wait 1s"):
        anchor = rates[f"{kind}, without"]
        for check in ("without", "with"):
            rate = rates[f"{kind}, {check}"]
            rows.append(f"| {kind}, {check} the identity check | {rate:,.0f} | "
                        f"{rate / anchor:.2f}x |")
    return "\n".join([
        f"{pairs} pairs per case on the embedded store, one key, no contention; "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{platform.machine()}. The identity check adds no call to a fail-fast acquire and "
        "one key lookup to a waiting one.",
        "",
        *rows,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--no-write", action="store_true")
    quick_defaults(parser, pairs=800)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rates = asyncio.run(measure(args.pairs, Path(work)))
    text = report(rates, args.pairs)
    print(text)
    if not args.no_write:
        write_section("lock-identity", "## The lock-identity check on an acquire", text)


if __name__ == "__main__":
    main()
