"""The enhanced locker's costs, each as a ratio against an anchor measured in the same run.

1. Uncontended throughput: acquire + release pairs per second through the enhanced locker on
   the embedded store, against a bare SQLite loop (INSERT a row, DELETE it, each its own
   transaction) on a file with the same pragmas (WAL, ``synchronous=NORMAL``). Goal >= 0.7x.
2. Handoff latency: from the call that releases a lock to the moment the next waiter's acquire
   returns granted. In process (goal p50 < 1 ms), and over HTTP against a real
   ``enhanced-locking serve`` (from sending the release to receiving the waiter's 200; goal
   p50 <= 1.5 ms). The anchor is an uncontended acquire on the same path. Over HTTP the
   goal's measure is the one the HTTP table takes (``http_stack.handoffs``: a lean HTTP/1.1
   client on raw asyncio streams, so that the service is what is timed, as it is for a
   caller on Go's net/http); the same hand-offs through Python's httpx clients, in blocks
   alternating with them, are a note of what that client library adds.
3. Router overhead with enhanced locking disabled: acquire + release through the router
   against the same calls on the legacy locker directly, in pairs per second and in CPU (this
   thread's time) per pair. Goal <= 5 %.

Blocks of the measured case and its anchor alternate so drift (CPU frequency, other load)
hits both alike. The throughput cases run ``--rounds`` times; the table gives the best and the
median ratio of those rounds (the verdict is the median's).

Usage: python bench/locker.py [--pairs 4000] [--rounds 5] [--handoffs 1000] [--no-write]

``--only bare|store|locker --pairs N`` runs N uncontended pairs of one case after a warm-up of
200 and prints nothing: run it under ``valgrind --tool=cachegrind --cache-sim=no`` with two
counts and divide the difference of the instructions by the difference of the counts, the
instructions of one pair (what docs/benchmarks.md reports; the loaded machine changes it
little, unlike a time).

The table is printed and written into docs/benchmarks.md under its own heading.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from bench import http_stack  # noqa: E402
from bench._common import (  # noqa: E402
    best_and_median,
    percentile,
    quick_defaults,
    verdict,
    write_section,
)
from bench._goals import Goal, Report  # noqa: E402
from tests.support.service import ServiceProcess  # noqa: E402

from enhanced_locking.backends import EmbeddedBackend  # noqa: E402
from enhanced_locking.backends.waiting import QueuePolicy  # noqa: E402
from enhanced_locking.config import EnhancedLockingConfig  # noqa: E402
from enhanced_locking.events import EventBus  # noqa: E402
from enhanced_locking.factory import LockService  # noqa: E402
from enhanced_locking.locking import EnhancedLocker  # noqa: E402
from enhanced_locking.metrics import Metrics  # noqa: E402
from enhanced_locking.provider import ConfigProvider  # noqa: E402
from enhanced_locking.types import Candidate, LockRequest, Project, Pull  # noqa: E402

HEADING = "## The enhanced locker: throughput, handoff latency, router overhead"
BLOCK = 250


def request(path: str = "envs/prod", pull: int = 1, **extra: Any) -> LockRequest:
    return LockRequest(project=Project(repo_full_name="acme/bench", path=path),
                       pull=Pull(num=pull), **extra)



def bare_sqlite(path: Path) -> Callable[[int], float]:
    """INSERT then DELETE one row, each in its own transaction, with the store's pragmas."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    db.execute("CREATE TABLE locks (ns TEXT NOT NULL, key TEXT NOT NULL, repo TEXT NOT NULL, "
               "pull INTEGER NOT NULL, data TEXT NOT NULL, PRIMARY KEY (ns, key))")
    data = '{"Project":{"RepoFullName":"acme/bench","Path":"envs/prod"},"Workspace":"default"}'

    def run(pairs: int) -> float:
        started = time.perf_counter()
        for _ in range(pairs):
            db.execute("INSERT INTO locks VALUES ('enhanced', 'k', 'acme/bench', 1, ?)", (data,))
            db.execute("DELETE FROM locks WHERE ns = 'enhanced' AND key = 'k'")
        return time.perf_counter() - started
    return run


def locker_on(path: Path, **settings: Any) -> EnhancedLocker:
    config = EnhancedLockingConfig(enabled=True, **settings)
    return EnhancedLocker(EmbeddedBackend(path), settings=lambda: config,
                          events=EventBus(), metrics=Metrics())


async def locker_pairs(locker: EnhancedLocker, pairs: int) -> float:
    ask = request()
    # The key read once, as a caller keeps the key it holds: ``LockRequest.key`` joins it
    # anew on each read (about 4k instructions, the bench's own and not the locker's).
    key, owner = ask.key, ("acme/bench", 1)
    started = time.perf_counter()
    for _ in range(pairs):
        await locker.acquire(ask)
        await locker.release(key, owner=owner)
    return time.perf_counter() - started


async def throughput(pairs: int, rounds: int, work: Path) -> list[dict[str, float]]:
    """Pairs per second of each, per round, and the CPU (this thread's time) of one pair of
    each in microseconds (``cpu bare``, ``cpu locker``: the lower quartile of the round's
    blocks; the machine is shared, and CPU time is what other load changes least)."""
    bare = bare_sqlite(work / "bare.db")
    locker = locker_on(work / "locker.db")
    bare(BLOCK)
    await locker_pairs(locker, BLOCK)  # warm up both
    results = []
    for _ in range(rounds):
        times = {"bare": 0.0, "locker": 0.0}
        cpu: dict[str, list[float]] = {"bare": [], "locker": []}
        for _ in range(max(1, pairs // BLOCK)):
            started = time.thread_time()
            times["bare"] += bare(BLOCK)
            cpu["bare"].append((time.thread_time() - started) / BLOCK * 1e6)
            started = time.thread_time()
            times["locker"] += await locker_pairs(locker, BLOCK)
            cpu["locker"].append((time.thread_time() - started) / BLOCK * 1e6)
        done = max(1, pairs // BLOCK) * BLOCK
        results.append({name: done / seconds for name, seconds in times.items()}
                       | {f"cpu {name}": percentile(spent, 0.25) for name, spent in cpu.items()})
    await locker.backend.close()
    return results


# --- 2. handoff ------------------------------------------------------------------------------


async def handoffs_in_process(count: int, work: Path) -> dict[str, list[float]]:
    locker = locker_on(work / "handoff.db")
    key = request().key
    queued = asyncio.Event()
    locker.events.subscribe(lambda event: queued.set() if event.type == "queued" else None)
    latencies: list[float] = []
    anchors: list[float] = []
    for i in range(count):
        holder, waiter = request(pull=2 * i + 1), request(pull=2 * i + 2, wait="10s")
        started = time.perf_counter()
        granted = await locker.acquire(holder)
        anchors.append(time.perf_counter() - started)
        assert granted.acquired
        done = asyncio.get_running_loop().create_future()

        async def wait(ask: LockRequest = waiter, done: asyncio.Future[float] = done) -> None:
            answer = await locker.acquire(ask)
            assert answer.acquired
            done.set_result(time.perf_counter())

        queued.clear()
        task = asyncio.create_task(wait())
        await queued.wait()
        released_at = time.perf_counter()
        await locker.release(key)
        latencies.append(await done - released_at)
        await task
        await locker.release(key)
    await locker.backend.close()
    return {"handoff": latencies, "anchor": anchors}


HTTP_BLOCK = 25


def handoffs_over_http(count: int, work: Path) -> dict[str, dict[str, list[float]]]:
    """``count`` hand-offs over HTTP against a real ``enhanced-locking serve``, each way, in
    alternating blocks: ``lean`` (the HTTP table's measure, :func:`http_stack.handoffs`) and
    ``httpx`` (Python's httpx clients, a note of what that client adds)."""
    process = ServiceProcess(work / "data", args=("--enhanced-locking-enabled",),
                             log_dir=work / "logs")
    process.start()
    assert process.process is not None
    served = http_stack.Served(process.port, process.process.pid)
    found: dict[str, dict[str, list[float]]] = {
        way: {"handoff": [], "anchor": []} for way in ("lean", "httpx")}

    async def run() -> None:
        await http_stack.handoffs(served, 10)  # warm up both
        await handoffs_through_httpx(process.url, 10, {"handoff": [], "anchor": []})
        for _ in range(max(1, count // HTTP_BLOCK)):
            lean = found["lean"]
            lean["handoff"] += await http_stack.handoffs(served, HTTP_BLOCK,
                                                         anchors=lean["anchor"])
            await handoffs_through_httpx(process.url, HTTP_BLOCK, found["httpx"])

    try:
        asyncio.run(run())
        return found
    finally:
        process.stop()


async def handoffs_through_httpx(url: str, count: int, into: dict[str, list[float]]) -> None:
    """``count`` hand-offs as :func:`http_stack.handoffs` takes them, through two httpx
    clients (a holder's and a waiter's), into ``into``: ``handoff`` from sending the release
    to the waiter's 200, ``anchor`` the holder's uncontended acquire."""

    def body(pull: int, **extra: Any) -> dict[str, Any]:
        return {"project": {"repoFullName": "acme/bench", "path": "envs/prod"},
                "pull": {"num": pull}, **extra}

    key = "acme/bench/envs/prod/default/"
    async with httpx.AsyncClient(base_url=url, timeout=30) as a, \
            httpx.AsyncClient(base_url=url, timeout=30) as b:
        for i in range(count):
            started = time.perf_counter()
            held = await a.post("/v1/locks", json=body(2 * i + 1))
            into["anchor"].append(time.perf_counter() - started)
            assert held.status_code == 200, held.text
            waiting = asyncio.create_task(b.post("/v1/locks", json=body(2 * i + 2, wait="10s")))
            # Poll the queue status until the waiter is in (no push without SSE here).
            while not (await a.get("/v1/queue", params={"key": key})).json()["waiters"]:  # noqa: ASYNC110
                await asyncio.sleep(0.0005)
            released_at = time.perf_counter()
            await a.delete("/v1/locks/by-key", params={"key": key, "pull": 2 * i + 1})
            answer = await waiting
            into["handoff"].append(time.perf_counter() - released_at)
            assert answer.status_code == 200, answer.text
            await a.delete("/v1/locks/by-key", params={"key": key, "pull": 2 * i + 2})


# --- 3. router overhead ----------------------------------------------------------------------


async def router_overhead(pairs: int, rounds: int, work: Path) -> list[dict[str, float]]:
    config = EnhancedLockingConfig(enabled=False, data_dir=str(work / "router"))
    service = LockService(ConfigProvider(config))
    await service.start()
    ask = request()
    owner = ("acme/bench", 1)

    def loop(target: Any) -> Callable[[int], Awaitable[float]]:
        async def run(count: int) -> float:
            started = time.perf_counter()
            for _ in range(count):
                await target.acquire(ask)
                await target.release(ask.key, owner=owner)
            return time.perf_counter() - started
        return run

    direct, routed = loop(service.legacy), loop(service.router)
    await direct(BLOCK)
    await routed(BLOCK)
    results = []
    for _ in range(rounds):
        times = {"legacy": 0.0, "router": 0.0}
        cpu: dict[str, list[float]] = {"legacy": [], "router": []}
        for _ in range(max(1, pairs // BLOCK)):
            for name, run in (("legacy", direct), ("router", routed)):
                started = time.thread_time()
                times[name] += await run(BLOCK)
                cpu[name].append((time.thread_time() - started) / BLOCK * 1e6)
        done = max(1, pairs // BLOCK) * BLOCK
        results.append({name: done / seconds for name, seconds in times.items()}
                       | {f"cpu {name}": percentile(spent, 0.25) for name, spent in cpu.items()})
    assert service.enhanced is None, "disabled never builds the enhanced locker"
    await service.close()
    return results


# --- report ----------------------------------------------------------------------------------


def ms(value: float) -> str:
    return f"{value * 1000:.3f}"


def _median_round(rounds: list[dict[str, float]], ratio: Callable[[dict[str, float]], float],
                  ) -> dict[str, float]:
    return sorted(rounds, key=ratio)[len(rounds) // 2]


def report(pairs: list[dict[str, float]], local: dict[str, list[float]],
           remote: dict[str, dict[str, list[float]]], router: list[dict[str, float]],
           counts: str) -> Report:
    cpus = len(__import__("os").sched_getaffinity(0))
    lines = [
        f"{counts}. Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{cpus} CPUs, load average {__import__('os').getloadavg()[0]:.1f} at the end. "
        "Throughput in pairs per second (acquire + release), anchor and measured from the "
        "round with the median ratio; ratio as best / median over the rounds; latencies in "
        "milliseconds.",
        "",
        "| measure | anchor | measured | ratio (best / median) | goal | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    goals: list[Goal] = []
    ratios = [r["locker"] / r["bare"] for r in pairs]
    best, median = best_and_median(ratios)
    mid = _median_round(pairs, lambda r: r["locker"] / r["bare"])
    goals.append(Goal("the locker on the embedded store, uncontended pairs/s: >= 0.7x of bare "
                      "SQLite INSERT + DELETE", f"{median:.2f}x (best {best:.2f}x)",
                      median >= 0.7))
    lines.append(
        f"| uncontended pairs/s: locker on the embedded store vs bare SQLite INSERT + DELETE "
        f"| {mid['bare']:,.0f} | {mid['locker']:,.0f} | {best:.2f}x / {median:.2f}x "
        f"| >= 0.7x | {verdict(median >= 0.7)} |")
    cpu_ratios = [r["cpu bare"] / r["cpu locker"] for r in pairs]
    best, median = best_and_median(cpu_ratios)
    mid = _median_round(pairs, lambda r: r["cpu bare"] / r["cpu locker"])
    goals.append(Goal("the locker on the embedded store, CPU per pair: >= 0.7x of bare "
                      "SQLite's", f"{median:.2f}x ({mid['cpu locker']:.1f} µs against "
                      f"{mid['cpu bare']:.1f})", median >= 0.7))
    lines.append(
        f"| CPU per uncontended pair, µs (thread time, lower quartile of the blocks): locker on "
        f"the embedded store vs bare SQLite | {mid['cpu bare']:.1f} | {mid['cpu locker']:.1f} "
        f"| {best:.2f}x / {median:.2f}x | >= 0.7x | {verdict(median >= 0.7)} |")
    overheads = [r["legacy"] / r["router"] - 1 for r in router]
    least, typical = best_and_median(overheads, higher_is_better=False)
    mid = _median_round(router, lambda r: r["legacy"] / r["router"])
    goals.append(Goal("the router with enhanced locking disabled against the legacy locker "
                      "directly, pairs/s: <= +5 %", f"{typical:+.1%}", typical <= 0.05))
    lines.append(
        f"| router with enhanced disabled vs the legacy locker directly (pairs/s) "
        f"| {mid['legacy']:,.0f} | {mid['router']:,.0f} | {least:+.1%} / {typical:+.1%} time "
        f"| <= +5% | {verdict(typical <= 0.05)} |")
    overheads = [r["cpu router"] / r["cpu legacy"] - 1 for r in router]
    least, typical = best_and_median(overheads, higher_is_better=False)
    mid = _median_round(router, lambda r: r["cpu legacy"] / r["cpu router"])
    goals.append(Goal("the router with enhanced locking disabled against the legacy locker "
                      "directly, CPU per pair: <= +5 %", f"{typical:+.1%}", typical <= 0.05))
    lines.append(
        f"| CPU per pair, µs (thread time, lower quartile of the blocks): router with enhanced "
        f"disabled vs the legacy locker directly | {mid['cpu legacy']:.1f} "
        f"| {mid['cpu router']:.1f} | {least:+.1%} / {typical:+.1%} time "
        f"| <= +5% | {verdict(typical <= 0.05)} |")
    for name, samples, goal, bound, asked in (
            ("in process", local, "p50 < 1 ms", 0.001, "hand-off in process, p50: < 1 ms"),
            ("over HTTP (lean HTTP/1.1 client, the HTTP table's measure)", remote["lean"],
             "p50 <= 1.5 ms", 0.0015,
             "hand-off over HTTP against `enhanced-locking serve`, p50: <= 1.5 ms"),
            ("over HTTP through Python's httpx clients (a note: what that client adds)",
             remote["httpx"], "none", None, "")):
        handoff, anchor = samples["handoff"], samples["anchor"]
        p50 = percentile(handoff, 0.5)
        ok = None if bound is None else (p50 < bound if bound == 0.001 else p50 <= bound)
        met = "note" if ok is None else verdict(ok)
        if ok is not None:
            goals.append(Goal(asked, f"{ms(p50)} ms", ok))
        lines.append(
            f"| handoff {name}: release → next waiter granted, p50 / p99 "
            f"(anchor: uncontended acquire p50 / p99) | {ms(percentile(anchor, 0.5))} / "
            f"{ms(percentile(anchor, 0.99))} | {ms(p50)} / "
            f"{ms(percentile(handoff, 0.99))} | "
            f"{statistics.median(handoff) / statistics.median(anchor):.2f}x | {goal} "
            f"| {met} |")
    return Report("\n".join(lines), tuple(goals))


async def only(case: str, pairs: int, work: Path) -> None:
    """``pairs`` uncontended pairs of one case, after a warm-up: the store case is the
    embedded store's own acquire and release, without the locker."""
    if case == "bare":
        bare = bare_sqlite(work / "bare.db")
        bare(200)
        bare(pairs)
        return
    locker = locker_on(work / "locker.db")
    if case == "locker":
        await locker_pairs(locker, 200)
        await locker_pairs(locker, pairs)
    else:
        store, ask, owner = locker.backend, request(), ("acme/bench", 1)
        candidate = Candidate.of_request(ask, priority=ask.priority)
        policy, key = QueuePolicy(), ask.key
        for count in (200, pairs):
            for _ in range(count):
                await store.acquire_or_enqueue(candidate, ttl=None, wait=None, policy=policy)
                await store.release_and_handoff(key, owner=owner, policy=policy)
    await locker.backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("bare", "store", "locker"))
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--handoffs", type=int, default=1000)
    parser.add_argument("--no-write", action="store_true")
    quick_defaults(parser, pairs=1000, rounds=3, handoffs=200)
    args = parser.parse_args()
    if args.only is not None:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(only(args.only, args.pairs, Path(tmp)))
        return
    over_http = max(HTTP_BLOCK, args.handoffs // 5)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pairs = asyncio.run(throughput(args.pairs, args.rounds, work))
        local = asyncio.run(handoffs_in_process(args.handoffs, work))
        remote = handoffs_over_http(over_http, work)
        router = asyncio.run(router_overhead(args.pairs, args.rounds, work))
    counts = (f"{args.pairs} pairs per throughput case in each of {args.rounds} rounds, "
              f"{args.handoffs} handoffs in process, {over_http} over HTTP")
    found = report(pairs, local, remote, router, counts)
    print(found.text)
    if not args.no_write:
        write_section("locker", HEADING, found)


if __name__ == "__main__":
    main()
