"""The lock API over HTTP against a no-op endpoint on the same server stack, per stack choice.

The anchor is a tiny FastAPI app that lives only here (never in the product): ``POST /noop``
reads the same JSON body an acquire sends and answers a small JSON object, ``DELETE /noop``
answers one too. The measured case is the product app (``create_app`` over a ``LockService``
with enhanced locking on the embedded store, access control off, audit on as shipped) doing
acquire (``POST /v1/locks``) + release (``DELETE /v1/locks/by-key`` with ``pull``). Both are
served by uvicorn in their own processes with the same options, for each stack choice:

* event loop: asyncio's or ``uvloop``;
* HTTP parser: ``httptools`` (the product's, with its request deadlines and connection
  limit, see ``api/server.py``) or uvicorn's own h11 protocol (without them).

The client is a lean HTTP/1.1 keep-alive client on raw asyncio streams (requests prebuilt as
bytes), so what is timed is the server, not a client library. Pairs per second with 1 and 32
concurrent clients (each on its own key: no contention); blocks of anchor and measured
alternate, after each server was brought to its steady state (``STEADY_PAIRS`` untimed pairs
fill the event bus's ring of recent events; until then the ring's growth makes garbage
collection dearer, the lock API's alone). Hand-off: a holder and a waiter on one key; from
sending the release to the waiter's 200, p50 and p99.

SQL per pair: the statements and transactions a lock pair runs against the store file, counted
on every SQLite connection of the product app served in this process, with 1 and 32
concurrent clients.

Where a hand-off's time goes (``--steps N``): the product served with timestamps at the steps
of a hand-off (the release reaching the app, the waiter's grant, each audit commit, each
answer leaving), p50 of each from the release leaving the client; printed, not written.

Instructions per pair (``--count noop|product``): the server (asyncio + httptools) runs
under callgrind, counting nothing until a warm-up is done; then it counts ten seconds without
calls (the work a server does by the second: timers) and ``--pairs`` pairs of ``--clients``
clients, and prints the instructions per pair, less that waiting work for as long as the pairs
took (its profile is kept with ``--profile FILE``, for ``callgrind_annotate``). Instruction
counts hardly depend on what else runs on the machine, so two counts compare where two timings
at a high load do not; without valgrind installed, ``--count`` prints the server's CPU time per
pair instead. With ``--cache``, callgrind also simulates one core's caches as this machine has
them (level 1, and level 2 as the last level) and prints the misses of each per pair: what the
instructions do not show, a pair whose work no longer fits in a core's level-2 cache.

Where the server's CPU time goes (``--sample``): the no-op and the product, each served with a
timer on its own CPU time (``ITIMER_PROF``, every 4 ms of the process's user + system time) that
records the Python stack it interrupts; over ``--pairs`` pairs after the same steady-state
warm-up (and 500 pairs more of ``--clients`` clients), the samples
are sorted into areas by the innermost frame that names one (the store, the audit trail, the
framework, the HTTP server and loop, ...) and printed as microseconds per pair, the block's CPU
per pair shared out by the samples. Time in C (SQLite, pydantic's core, system calls) counts
for the Python line that called it; a signal is taken at the next bytecode boundary, so a C
call's time can land on the function entered just after it (pydantic's validators), which the
areas absorb. With ``--top N``, each area of the lock API is followed by its ``N`` largest
functions: the innermost frame of the service's own code and the innermost frame of all (what
it was running, in the service's code or under it), so that a cut can be aimed at a function,
not an area. Printed, not written.

Garbage collection per pair (``--collections``): the no-op and the product, each served with
a callback on the collector (``gc.callbacks``) that counts the collections of each generation
and the thread CPU time they take; over ``--pairs`` pairs after the same steady-state warm-up
(and 500 pairs more of ``--clients`` clients), printed per 1,000 pairs and as microseconds a
pair, beside the block's CPU per pair. Printed, not written.

Where the CPU time per pair goes between the kernel and the process, and how it moves from 1
client to 32 (``--split``): the no-op and the product served side by side, brought to the same
steady state, then alternating blocks of ``--pairs`` pairs (``--rounds`` of each, 1 and 32
clients): each server's user and system time per pair, and its context switches per pair
(voluntary: its loop slept in ``epoll_wait`` for want of a request; involuntary: another process
took its core), medians over the rounds; and the lock pair's CPU over the no-op's (what the
lock API adds), by user and system time. The same work a pair at 1 and 32 clients (instructions,
SQL, system calls and collections per pair, above) can still cost less time at 32, where a loop
turn serves several sockets and rarely sleeps: this shows how much less, for each server.
Printed, not written.

What the served product's SQL statements cost (``--statements``): the product served with
every statement on its SQLite connections timed by the serving thread's CPU clock
(``time.thread_time``, the statement alone: SQLite's work and its system calls), over ``--pairs``
pairs after the same steady-state warm-up, with 1 and 32 clients: each statement's count and CPU
per pair, beside the block's CPU per pair (which the timing itself adds a little to). A
statement served between the Python of requests costs several times what it costs run back to
back (``bench/sqlite_batching.py``). Printed, not written.

The product's settings (``--setting NAME=VALUE``, repeated; a setting's YAML key without its
``enhanced-locking-`` prefix, e.g. ``audit-own-locks=false``): the served product runs with
them in every mode but the table's (which measures the service as shipped), so that what a
setting costs is measured the same way as the code: ``--count``, ``--split``, ``--sample``.

Usage: python bench/http_stack.py [--pairs 1500] [--rounds 3] [--handoffs 200] [--no-write]
       python bench/http_stack.py --steps 200
       python bench/http_stack.py --sample --pairs 8000 [--clients 32] [--top 8]
       python bench/http_stack.py --collections --pairs 3000 [--clients 32]
       python bench/http_stack.py --split [--pairs 3200] [--rounds 4]
       python bench/http_stack.py --statements [--pairs 4800]
       python bench/http_stack.py --count product --pairs 200 [--clients 1] [--profile FILE]
                                  [--audit-window 0.4] [--cache] [--steady]
       python bench/http_stack.py --count product --setting audit-own-locks=false
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import (  # noqa: E402
    best_and_median,
    percentile,
    quick_defaults,
    verdict,
    write_section,
)
from bench._goals import Goal, Report  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from tests.support.service import LOOPBACK, free_port  # noqa: E402

from enhanced_locking.events import EventBus  # noqa: E402

HEADING = "## HTTP: the lock API against a no-op endpoint on the same server stack"
SERVICE_STACK = ("asyncio", "httptools")  # what `enhanced-locking serve` runs on
PAIR_GOAL = 0.7
"""A lock pair's goal against a no-op pair, met only when both the pairs/s ratio (median round)
and the CPU-per-pair ratio reach it: the CPU ratio is the steadier of the two."""


def pair_goal_met(rate: float, cpu: float) -> bool:
    return rate >= PAIR_GOAL and cpu >= PAIR_GOAL

STACKS = (("asyncio", "h11"), ("uvloop", "h11"), ("asyncio", "httptools"),
          ("uvloop", "httptools"))
CONCURRENCY = (1, 32)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SQL_PAIRS = 320
STEADY_PAIRS = inspect.signature(EventBus).parameters["capacity"].default // 2 + 500
"""The pairs that bring a fresh server to its steady state before anything is timed: the
event bus keeps its last ``capacity`` events (two a pair) for readers that resume, and until
that ring is full every pair's events survive, so garbage collection walks them again and
again (about 30 µs a pair at first); the margin takes in the full collection that ends that
phase. The no-op gets the same warm-up."""


# --- the servers (run as ``--serve noop|product``) -------------------------------------------


def noop_app() -> FastAPI:
    app = FastAPI()

    @app.post("/noop")
    async def take(request: Request) -> Any:
        await request.body()
        return {"acquired": True}

    @app.delete("/noop")
    async def give() -> Any:
        return {"released": True}

    return app


def serve(kind: str, port: int, loop: str, http: str, data_dir: str,
          audit_window: float | None = None, sample_out: str | None = None,
          collections_out: str | None = None, statements_out: str | None = None,
          settings: tuple[str, ...] = ()) -> None:
    import uvicorn

    if sample_out is not None:
        _sample_cpu(Path(sample_out))
    if collections_out is not None:
        _count_collections(Path(collections_out))
    if statements_out is not None:
        _time_statements(Path(statements_out))

    from enhanced_locking.api import server as server_limits
    from enhanced_locking.config import EnhancedLockingConfig

    config = EnhancedLockingConfig(enabled=True, data_dir=data_dir, **product_settings(settings))
    app: Any
    if kind == "noop":
        app = noop_app()
    elif kind == "traced":
        app = traced_app(config, Path(data_dir) / "steps.json")
    else:
        from enhanced_locking.api.app import create_app
        from enhanced_locking.backends.audit_store import SqliteAuditStore
        from enhanced_locking.factory import LockService
        from enhanced_locking.provider import ConfigProvider

        if audit_window is not None:
            SqliteAuditStore.coalesce = audit_window
        app = create_app(LockService(ConfigProvider(config)))
    protocol: Any = server_limits.guarded_protocol(config) if http == "httptools" else http
    uvicorn.run(app, host=LOOPBACK, port=port, log_level="warning", loop=loop, http=protocol,
                lifespan="on")


def product_settings(settings: tuple[str, ...]) -> dict[str, str]:
    """``--setting NAME=VALUE`` options as the config model's fields and their texts (checked
    by the model as an environment variable's would be)."""
    fields = {}
    for setting in settings:
        name, equals, value = setting.partition("=")
        if not equals:
            raise SystemExit(f"--setting {setting!r}: expected NAME=VALUE")
        fields[name.removeprefix("enhanced-locking-").replace("-", "_")] = value
    return fields


PRODUCT_SETTINGS: list[str] = []
"""The ``--setting`` options of this run, handed to every product server it starts but the
table's (see the module's docstring)."""


# --- where a hand-off's time goes (run as ``--serve traced``) ---------------------------------

Step = tuple[str, float]
"""A step of a request and when it happened (``time.perf_counter``, one clock for the
processes of one machine)."""


def traced_app(config: Any, steps_file: Path) -> Any:
    """The product app, stamping the steps of a hand-off: a request reaching the app, the
    waiter's grant delivered, an audit row committed, an answer leaving; the steps are written
    to ``steps_file`` when the server shuts down."""
    from enhanced_locking.api.app import create_app
    from enhanced_locking.api.audit import AuditTrail
    from enhanced_locking.backends.audit_store import AuditQuery, build_audit_store
    from enhanced_locking.factory import LockService
    from enhanced_locking.provider import ConfigProvider
    from enhanced_locking.types import AuditEntry

    steps: list[Step] = []

    class StampedAudit:
        def __init__(self, store: Any) -> None:
            self.store = store

        @property
        def dropped(self) -> int:
            count: int = self.store.dropped
            return count

        @property
        def waiting(self) -> int:
            count: int = self.store.waiting
            return count

        def new_id(self, moment: datetime) -> str:
            handed_out: str = self.store.new_id(moment)
            return handed_out

        async def append(self, entry: AuditEntry) -> AuditEntry:
            written: AuditEntry = await self.store.append(entry)
            steps.append((f"{entry.action} audited", time.perf_counter()))
            return written

        async def read(self, query: AuditQuery) -> list[AuditEntry]:
            found: list[AuditEntry] = await self.store.read(query)
            return found

        async def close(self) -> None:
            await self.store.close()

    service = LockService(ConfigProvider(config))
    app = create_app(service, audit=AuditTrail(StampedAudit(build_audit_store(config)),
                                                stdout=lambda: False))

    async def stamped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            async def finish(message: Any) -> None:
                if message["type"] == "lifespan.startup.complete":
                    enhanced = service.enhanced
                    assert enhanced is not None
                    grants = enhanced.backend.grants
                    deliver = grants.deliver

                    def delivered(waiter_id: str, notice: Any) -> None:
                        steps.append(("grant delivered", time.perf_counter()))
                        deliver(waiter_id, notice)

                    grants.deliver = delivered  # type: ignore[method-assign]
                if message["type"] == "lifespan.shutdown.complete":
                    await asyncio.to_thread(steps_file.write_text, json.dumps(steps))
                await send(message)
            await app(scope, receive, finish)
            return
        method = scope.get("method", "")
        steps.append((f"{method} in", time.perf_counter()))

        async def answered(message: Any) -> None:
            if message["type"] == "http.response.start":
                steps.append((f"{method} answered", time.perf_counter()))
            await send(message)

        await app(scope, receive, answered)

    return stamped


HANDOFF_STEPS = (
    ("DELETE in", "the release reaches the app"),
    ("grant delivered", "the release on both sides, until the waiter is granted"),
    ("release audited", "the release's audit row committed"),
    ("DELETE answered", "the release's answer leaves"),
    ("acquire audited", "the waiter's audit row committed"),
    ("POST answered", "the waiter's answer leaves"),
)


def handoff_steps(work: Path, count: int) -> list[tuple[str, float]]:
    """The p50 of each step of ``count`` hand-offs, in seconds from the release leaving the
    client, and of the waiter's answer arriving."""
    with server("traced", *SERVICE_STACK, work) as traced:
        asyncio.run(handoffs(traced, 20))  # warm up
        started: list[float] = []
        latencies = asyncio.run(handoffs(traced, count, started=started))
    steps = json.loads((work / "traced-asyncio-httptools" / "steps.json").read_text())
    found: dict[str, list[float]] = {}
    for begin, took in zip(started, latencies, strict=True):
        seen: set[str] = set()
        for name, at in steps:
            if begin <= at <= begin + took and name not in seen:
                seen.add(name)
                found.setdefault(name, []).append(at - begin)
    return [*((label, percentile(found[name], 0.5)) for name, label in HANDOFF_STEPS
              if name in found), ("the client has the waiter's answer", percentile(latencies, 0.5))]


@dataclass(frozen=True)
class Served:
    """A server process: where it listens, and its pid (to read the CPU time it used)."""

    port: int
    pid: int

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (every thread)."""
        user, system = self.cpu_split()
        return user + system

    def cpu_split(self) -> tuple[float, float]:
        """User and system CPU time of the process so far (every thread), in seconds."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS

    def switches(self) -> tuple[int, int]:
        """Voluntary and involuntary context switches of the process so far (every thread)."""
        voluntary = involuntary = 0
        for status in Path(f"/proc/{self.pid}/task").glob("*/status"):
            try:
                lines = status.read_text().splitlines()
            except FileNotFoundError:  # a thread that ended meanwhile
                continue
            for line in lines:
                name, _, value = line.partition(":")
                if name == "voluntary_ctxt_switches":
                    voluntary += int(value)
                elif name == "nonvoluntary_ctxt_switches":
                    involuntary += int(value)
        return voluntary, involuntary


@contextmanager
def server(kind: str, loop: str, http: str, work: Path,
           under: tuple[str, ...] = (), options: tuple[str, ...] = ()) -> Iterator[Served]:
    """The ``kind`` server on its own port, run under the command ``under`` if given, with
    ``options`` added to its command line."""
    port = free_port()
    if kind != "noop":
        options = (*options, *(f"--setting={setting}" for setting in PRODUCT_SETTINGS))
    data = work / f"{kind}-{loop}-{http}"
    data.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [*under, sys.executable, __file__, "--serve", kind, "--port", str(port), "--loop", loop,
         "--http", http, "--data-dir", str(data), *options],
        stdout=subprocess.DEVNULL, stderr=open(data / "stderr", "w"))
    try:
        deadline = time.monotonic() + (600 if under else 30)
        while True:
            try:
                asyncio.run(_probe(port))
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} server did not start: "
                                       f"{(data / 'stderr').read_text()}") from None
                time.sleep(0.1)
        yield Served(port, process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


async def _probe(port: int) -> None:
    _, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.close()
    await writer.wait_closed()


# --- a lean keep-alive client ----------------------------------------------------------------


class Connection:
    """One HTTP/1.1 keep-alive connection; requests are prebuilt bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection(LOOPBACK, port))

    async def call(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        return await self.answer()

    async def answer(self) -> tuple[int, bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def post(path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def delete(path: str) -> bytes:
    return f"DELETE {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\n\r\n".encode()


def lock_body(path: str, pull: int, **extra: Any) -> dict[str, Any]:
    return {"project": {"repoFullName": "acme/bench", "path": path}, "pull": {"num": pull},
            **extra}


def pair_requests(kind: str, client: int) -> tuple[bytes, bytes]:
    body = lock_body(f"envs/c{client}", 1)
    if kind == "noop":
        return post("/noop", body), delete("/noop")
    key = f"acme/bench/envs/c{client}/default/"
    return post("/v1/locks", body), delete(f"/v1/locks/by-key?key={key}&pull=1")


@dataclass(frozen=True)
class Block:
    """One timed block of pairs: pairs per second, and the server's CPU time per pair."""

    rate: float
    cpu: float


async def pairs_per_second(kind: str, served: Served, clients: int, pairs: int) -> Block:
    connections = [await Connection.open(served.port) for _ in range(clients)]
    each = max(1, pairs // clients)

    async def run(client: int, connection: Connection) -> None:
        take, give = pair_requests(kind, client)
        for _ in range(each):
            status, body = await connection.call(take)
            assert status == 200, body
            status, body = await connection.call(give)
            assert status == 200, body

    cpu = served.cpu_seconds()
    started = time.perf_counter()
    await asyncio.gather(*(run(i, c) for i, c in enumerate(connections)))
    elapsed = time.perf_counter() - started
    cpu = served.cpu_seconds() - cpu
    for connection in connections:
        connection.close()
    return Block(each * clients / elapsed, cpu / (each * clients))


async def handoffs(served: Served, count: int, started: list[float] | None = None,
                   anchors: list[float] | None = None) -> list[float]:
    """``count`` hand-offs on one key: a holder takes it, a waiter queues (seen in the queue's
    status), and the holder releases it; each latency is from sending the release to the
    waiter's 200. The one measure of the hand-off over HTTP (the locker's table runs it too,
    against ``enhanced-locking serve``). ``started``: when each release was sent;
    ``anchors``: each holder's acquire, uncontended, from sending it to its 200."""
    holder, waiter, watcher = [await Connection.open(served.port) for _ in range(3)]
    key = "acme/bench/envs/handoff/default/"
    queue = f"GET /v1/queue?key={key} HTTP/1.1\r\nHost: {LOOPBACK}\r\n\r\n".encode()
    latencies = []
    for i in range(count):
        asked = time.perf_counter()
        status, body = await holder.call(post("/v1/locks", lock_body("envs/handoff", 2 * i + 1)))
        if anchors is not None:
            anchors.append(time.perf_counter() - asked)
        assert status == 200, body
        waiter.writer.write(post("/v1/locks", lock_body("envs/handoff", 2 * i + 2, wait="10s")))
        while not json.loads((await watcher.call(queue))[1])["waiters"]:  # noqa: ASYNC110
            await asyncio.sleep(0.0005)
        begin = time.perf_counter()
        holder.writer.write(delete(f"/v1/locks/by-key?key={key}&pull={2 * i + 1}"))
        status, body = await waiter.answer()
        latencies.append(time.perf_counter() - begin)
        if started is not None:
            started.append(begin)
        assert status == 200, body
        assert (await holder.answer())[0] == 200
        assert (await holder.call(delete(f"/v1/locks/by-key?key={key}&pull={2 * i + 2}")))[0] \
            == 200
    for connection in (holder, waiter, watcher):
        connection.close()
    return latencies


# --- instructions per pair ------------------------------------------------------------------


def count_pairs(kind: str, pairs: int, clients: int, profile: Path | None,
                idle: float = 10.0, audit_window: float | None = None,
                cache: bool = False, steady: bool = False) -> str:
    """What one server of ``kind`` (asyncio + httptools) runs per pair of ``clients`` clients,
    after a warm-up: instructions, counted by callgrind (CPU time without valgrind).

    A server also works while it waits (timers: uvicorn's tick, the service's reconcile and
    config loops), by the second, not by the pair, and a pair under callgrind takes 30-50
    times as long as at full speed, longer on a busy machine: so the instructions of ``idle``
    seconds without calls are counted first, and that rate times the pairs' duration is taken
    off the pairs' count (both are printed).

    ``audit_window``: the audit trail's write-behind window in the served product (as shipped
    when None, 10 ms). Under callgrind that window holds one entry, so each entry has a commit
    of its own, where at full speed (1,000-2,000 pairs a second) one commit carries the entries
    of several pairs; a window as many times longer as callgrind is slower (0.4 s) gives each
    commit about as many entries as at full speed.

    ``cache``: callgrind also simulates one core's caches (:func:`core_caches`: its level-1
    instruction and data caches, and its level-2 cache as the last level), and the misses of
    each per pair are printed beside the instructions (less the waiting work's, as they are).
    A pair whose code and data stay in a core's level-2 cache runs several times as many
    instructions a microsecond as one that misses it: instructions alone do not say that.

    ``steady``: the warm-up is the table's (``STEADY_PAIRS``, the event ring full), not 200
    pairs, so that what is counted is a pair of the steady state the table times: the ring
    and the audit trail at their size, each new event pushing out an old one. The long
    warm-up runs under valgrind uninstrumented (minutes)."""
    warm_up = STEADY_PAIRS if steady else max(200, 2 * clients)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        out = work / "callgrind.out"
        if shutil.which("valgrind") is None:
            with server(kind, *SERVICE_STACK, work) as served:
                asyncio.run(pairs_per_second(kind, served, clients, warm_up))
                block = asyncio.run(pairs_per_second(kind, served, clients, pairs))
            return f"{kind}: {block.cpu * 1e6:,.0f} µs CPU per pair (no valgrind: CPU time)"
        under = ("valgrind", "--tool=callgrind", "--instr-atstart=no",
                 f"--callgrind-out-file={out}", *(core_caches() if cache else ()))
        options = () if audit_window is None else ("--audit-window", str(audit_window))
        with server(kind, *SERVICE_STACK, work, under, options) as served:
            asyncio.run(pairs_per_second(kind, served, clients, warm_up))
            time.sleep(0.5)  # what the warm-up left behind (the audit batch) is written
            _control("--instr=on", served.pid)
            time.sleep(idle)
            _control("--dump", served.pid)
            started = time.perf_counter()
            block = asyncio.run(pairs_per_second(kind, served, clients, pairs))
            time.sleep(0.5)  # and what the counted pairs left behind
            _control("--dump", served.pid)
            took = time.perf_counter() - started
            _control("--instr=off", served.pid)
        waiting, counted = (work / "callgrind.out.1", work / "callgrind.out.2")
        done = max(1, pairs // clients) * clients
        if profile is not None:
            shutil.copy(counted, profile)
        idle_events, events = _events(waiting), _events(counted)
        rate = idle_events.get("Ir", 0) / idle
        total = events.get("Ir", 0)
        misses = ""
        if cache:
            each = {name: (events.get(name, 0) - idle_events.get(name, 0) / idle * took) / done
                    for name in CACHE_EVENTS}
            misses = (f"; misses per pair: level-1 instructions "
                      f"{each['I1mr']:,.0f}, level-1 data {each['D1mr'] + each['D1mw']:,.0f}, "
                      f"level 2 {each['ILmr'] + each['DLmr'] + each['DLmw']:,.0f} "
                      f"({' '.join(core_caches())})")
        return (f"{kind}: {(total - rate * took) / done:,.0f} instructions per pair "
                f"({total / done:,.0f} counted, less {rate * took / done:,.0f} of waiting work "
                f"at {rate:,.0f} per second; {done} pairs, {clients} "
                f"client{'s' if clients > 1 else ''}, {block.rate:.1f} pairs/s under callgrind"
                + ("" if audit_window is None else f", audit window {audit_window:g} s") + ")"
                + misses)


def _control(command: str, pid: int) -> None:
    """Send ``command`` to the callgrind run ``pid`` (it answers "OK" when it took it)."""
    answer = subprocess.run(("callgrind_control", command, str(pid)), check=True,
                            capture_output=True, text=True).stdout
    if "OK" not in answer:
        raise RuntimeError(f"callgrind_control {command} {pid}: {answer}")


def _events(dump: Path) -> dict[str, int]:
    """What a callgrind dump counted, by event (``Ir``: instructions; with the cache
    simulated, ``I1mr``, ``D1mr``, ``D1mw``, ``ILmr``, ``DLmr``, ``DLmw``: the misses), from its
    ``events:`` and ``totals:`` (or ``summary:``) lines."""
    names: list[str] = []
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith("events:"):
            names = line.split()[1:]
        elif line.startswith(("totals:", "summary:")):
            return dict(zip(names, map(int, line.split()[1:]), strict=False))
    return {}


CACHE_EVENTS = ("I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw")
"""Callgrind's misses with ``--cache-sim=yes``: level-1 instruction reads, level-1 data reads
and writes, and the same three at the last level it models."""


def core_caches() -> tuple[str, ...]:
    """Callgrind's options for one core's caches as this machine has them (read from sysfs):
    its level-1 instruction and data caches, and its level-2 cache as the last level (a pair
    that fits in it is served at a core's speed; callgrind models two levels). Without sysfs'
    word, callgrind's own guess of the host's caches."""
    found: dict[str, str] = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size, ways, line = (
                (index / name).read_text().strip()
                for name in ("level", "type", "size", "ways_of_associativity",
                             "coherency_line_size"))
        except OSError:
            continue
        name = {("1", "Instruction"): "I1", ("1", "Data"): "D1", ("2", "Unified"): "LL"}.get(
            (level, kind))
        if name is not None and size.endswith("K"):
            found[name] = f"--{name}={int(size[:-1]) * 1024},{ways},{line}"
    return ("--cache-sim=yes", *(found[name] for name in ("I1", "D1", "LL") if name in found))


# --- where the CPU time goes (``--sample``) ----------------------------------------------------

SAMPLE_EVERY = 0.004
"""Seconds of the server's CPU time between samples. A process's CPU timer fires on the
kernel's tick (4 ms at the common 250 Hz): a shorter interval loses samples, not gains them."""

AREAS = (
    ("selectors.py", "HTTP server and event loop"),
    ("enhanced_locking/backends/audit_store", "audit trail"),
    ("enhanced_locking/api/audit", "audit trail"),
    ("enhanced_locking/events", "events"),
    ("enhanced_locking/backends", "embedded store (SQL, codec)"),
    ("enhanced_locking/locking", "locker"),
    ("enhanced_locking/migration", "router"),
    ("enhanced_locking/types", "types (answers, keys, times)"),
    ("enhanced_locking/api", "direct handler, caller, app"),
    ("enhanced_locking/", "other of the service"),
    ("fastapi/", "FastAPI and Starlette"),
    ("starlette/", "FastAPI and Starlette"),
    ("uvicorn/", "HTTP server and event loop"),
    ("asyncio/", "HTTP server and event loop"),
)
"""Areas by a piece of a frame's file name, first match wins; a sample goes to the innermost
frame that names an area. Anything under pydantic's ``model_validate_json`` is the body's
validation."""

BODY = "body validation (pydantic)"


def _sample_cpu(out: Path) -> None:
    """Sample the Python stack every ``SAMPLE_EVERY`` of this process's CPU time; SIGUSR2
    starts the count afresh, SIGUSR1 writes it to ``out`` (a stack and its count per line)."""
    samples: Counter[str] = Counter()

    def take(signum: int, frame: Any) -> None:
        names = []
        while frame is not None:
            names.append(f"{frame.f_code.co_qualname} {frame.f_code.co_filename}")
            frame = frame.f_back
        samples[";".join(reversed(names))] += 1

    def write(signum: int, frame: Any) -> None:
        part = out.with_suffix(".part")
        part.write_text("".join(f"{stack}\t{count}\n" for stack, count in samples.items()))
        part.replace(out)  # whole once it is there

    signal.signal(signal.SIGPROF, take)
    signal.signal(signal.SIGUSR2, lambda signum, frame: samples.clear())
    signal.signal(signal.SIGUSR1, write)
    signal.setitimer(signal.ITIMER_PROF, SAMPLE_EVERY, SAMPLE_EVERY)


def area_of(stack: str) -> str:
    """The area a sampled stack (its frames outermost first, ``;`` between) counts for."""
    frames = stack.split(";")
    if any("model_validate_json" in frame for frame in frames) \
            and "asyncio/" not in frames[-1]:
        return BODY
    for frame in reversed(frames):
        for part, area in AREAS:
            if part in frame:
                return area
    return "other"


def observed_block(kind: str, pairs: int, clients: int, option: str) -> tuple[str, Block]:
    """One block of ``pairs`` pairs of ``clients`` clients on a server of ``kind`` run with
    ``option`` (``--sample-out`` or ``--collections-out``: a recorder that SIGUSR2 starts
    afresh and SIGUSR1 writes to the file the option names), after the steady-state warm-up
    and 500 pairs more: what the recorder wrote over the block, and the block."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "recorded"
        with server(kind, *SERVICE_STACK, Path(tmp),
                    options=(option, str(out))) as served:
            asyncio.run(pairs_per_second(kind, served, 32, STEADY_PAIRS))
            asyncio.run(pairs_per_second(kind, served, clients, 500))
            os.kill(served.pid, signal.SIGUSR2)
            block = asyncio.run(pairs_per_second(kind, served, clients, pairs))
            os.kill(served.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while not out.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            return out.read_text(), block


Functions = dict[str, Counter[tuple[str, str]]]
"""Per area, the samples by (the innermost frame of the service's own code, the innermost
frame of all), each written ``function file``."""


def _frame_name(frame: str) -> str:
    """``qualname path`` of a sampled frame as ``qualname file``."""
    name, _, path = frame.rpartition(" ")
    return f"{name} {os.path.basename(path)}"


def sample_areas(kind: str, pairs: int, clients: int
                 ) -> tuple[dict[str, float], float, Functions, float]:
    """Microseconds of server CPU per pair by area over ``pairs`` pairs (after a warm-up), the
    block's CPU per pair, the samples of each area by function, and the microseconds a sample
    stands for."""
    text, block = observed_block(kind, pairs, clients, "--sample-out")
    found: Counter[str] = Counter()
    functions: Functions = {}
    for line in text.splitlines():
        stack, count = line.rsplit("\t", 1)
        area = area_of(stack)
        found[area] += int(count)
        frames = stack.split(";")
        ours = next((frame for frame in reversed(frames) if "enhanced_locking/" in frame), None)
        where = (_frame_name(ours) if ours is not None else "-", _frame_name(frames[-1]))
        functions.setdefault(area, Counter())[where] += int(count)
    total = sum(found.values())
    each = block.cpu * 1e6 / total
    return ({area: count * each for area, count in found.items()}, block.cpu, functions,
            each)


def sample_report(pairs: int, clients: int, top: int = 0) -> str:
    """The no-op's and the product's CPU per pair by area, one after the other, as a table;
    with ``top``, the lock API's largest functions in each area after it."""
    noop, noop_cpu, _, _ = sample_areas("noop", pairs, clients)
    ours, our_cpu, functions, each = sample_areas("product", pairs, clients)
    lines = [f"{pairs} pairs, {clients} client{'s' if clients > 1 else ''}, asyncio + "
             f"httptools, load average {os.getloadavg()[0]:.1f}: server CPU per pair by area, "
             f"sampled every {SAMPLE_EVERY * 1000:g} ms of its CPU time", "",
             "| area | no-op µs/pair | lock API µs/pair |", "|---|---:|---:|"]
    for area in sorted(set(noop) | set(ours), key=lambda a: -ours.get(a, 0) - noop.get(a, 0)):
        lines.append(f"| {area} | {noop.get(area, 0):,.0f} | {ours.get(area, 0):,.0f} |")
    lines.append(f"| all | {noop_cpu * 1e6:,.0f} | {our_cpu * 1e6:,.0f} |")
    if top:
        lines += ["", f"The lock API's {top} largest functions of each area (the service's own "
                  "innermost frame; the innermost frame of all):", "",
                  "| area | service's frame | running | µs/pair |", "|---|---|---|---:|"]
        for area in sorted(functions, key=lambda a: -ours.get(a, 0)):
            for (service, running), count in functions[area].most_common(top):
                lines.append(f"| {area} | {service} | {running} | {count * each:,.1f} |")
    return "\n".join(lines)


# --- garbage collection per pair (``--collections``) ----------------------------------------


def _count_collections(out: Path) -> None:
    """Count this process's garbage collections and their thread CPU time, per generation;
    SIGUSR2 starts the count afresh, SIGUSR1 writes it to ``out`` (JSON: ``count`` and
    ``seconds``, each a list by generation)."""
    count = [0, 0, 0]
    seconds = [0.0, 0.0, 0.0]
    began = [0.0]

    def heard(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.thread_time()
            return
        generation = info["generation"]
        count[generation] += 1
        seconds[generation] += time.thread_time() - began[0]

    def clear(signum: int, frame: Any) -> None:
        count[:] = [0, 0, 0]
        seconds[:] = [0.0, 0.0, 0.0]

    def write(signum: int, frame: Any) -> None:
        part = out.with_suffix(".part")
        part.write_text(json.dumps({"count": count, "seconds": seconds}))
        part.replace(out)  # whole once it is there

    gc.callbacks.append(heard)
    signal.signal(signal.SIGUSR2, clear)
    signal.signal(signal.SIGUSR1, write)


def collections_of(kind: str, pairs: int, clients: int) -> tuple[dict[str, Any], float]:
    """The collections of one server of ``kind`` over ``pairs`` pairs (after the steady-state
    warm-up), and the block's CPU per pair."""
    text, block = observed_block(kind, pairs, clients, "--collections-out")
    found: dict[str, Any] = json.loads(text)
    return found, block.cpu


def collections_report(pairs: int, clients: int) -> str:
    """The no-op's and the product's collections per 1,000 pairs and their time, as a table."""
    lines = [f"{pairs} pairs, {clients} client{'s' if clients > 1 else ''}, asyncio + "
             f"httptools, after the event ring is full, load average "
             f"{os.getloadavg()[0]:.1f}: garbage collections per 1,000 pairs by generation "
             "and their CPU time", "",
             "| server | young | middle | full | collections µs/pair | CPU µs/pair |",
             "|---|---:|---:|---:|---:|---:|"]
    for kind, label in (("noop", "no-op"), ("product", "lock API")):
        found, cpu = collections_of(kind, pairs, clients)
        young, middle, full = (n * 1000 / pairs for n in found["count"])
        lines.append(f"| {label} | {young:.2f} | {middle:.2f} | {full:.2f} | "
                     f"{sum(found['seconds']) * 1e6 / pairs:.1f} | {cpu * 1e6:,.0f} |")
    return "\n".join(lines)


# --- user and system time per pair, 1 and 32 clients (``--split``) -------------------------


@dataclass(frozen=True)
class Split:
    """One block of a server, per pair: user and system CPU (seconds), voluntary and
    involuntary context switches."""

    user: float
    system: float
    voluntary: float
    involuntary: float


def split_block(kind: str, served: Served, clients: int, pairs: int) -> Split:
    """One block of ``pairs`` pairs of ``clients`` clients, split as :class:`Split` says."""
    user, system = served.cpu_split()
    voluntary, involuntary = served.switches()
    asyncio.run(pairs_per_second(kind, served, clients, pairs))
    done = max(1, pairs // clients) * clients
    user_after, system_after = served.cpu_split()
    voluntary_after, involuntary_after = served.switches()
    return Split((user_after - user) / done, (system_after - system) / done,
                 (voluntary_after - voluntary) / done, (involuntary_after - involuntary) / done)


def split_report(pairs: int, rounds: int) -> str:
    """The no-op's and the product's CPU per pair by user and system time, and their context
    switches per pair, at 1 and 32 clients (alternating blocks), as a table."""
    found: dict[tuple[str, int], list[Split]] = {}
    with tempfile.TemporaryDirectory() as tmp, \
            server("noop", *SERVICE_STACK, Path(tmp)) as noop, \
            server("product", *SERVICE_STACK, Path(tmp)) as ours:
        servers = (("noop", noop), ("product", ours))
        for kind, served in servers:  # the steady state, as the table's run
            asyncio.run(pairs_per_second(kind, served, max(CONCURRENCY), STEADY_PAIRS))
        for clients in CONCURRENCY:
            for kind, served in servers:
                asyncio.run(pairs_per_second(kind, served, clients, pairs // 5))  # warm up
            for _ in range(rounds):
                for kind, served in servers:
                    found.setdefault((kind, clients), []).append(
                        split_block(kind, served, clients, pairs))
    lines = [f"{pairs} pairs per block, {rounds} alternating rounds, asyncio + httptools, "
             f"load average {os.getloadavg()[0]:.1f}: the server's CPU per pair by user and "
             "system time, and its context switches per pair (medians over the rounds); "
             "\"added\" is the lock pair's less the no-op's", "",
             "| clients | server | user µs/pair | system µs/pair | voluntary switches/pair "
             "| involuntary switches/pair |", "|---:|---|---:|---:|---:|---:|"]
    for clients in CONCURRENCY:
        medians = {}
        for kind, label in (("noop", "no-op"), ("product", "lock API")):
            blocks = found[(kind, clients)]
            median = Split(*(statistics.median(getattr(b, name) for b in blocks)
                             for name in ("user", "system", "voluntary", "involuntary")))
            medians[kind] = median
            lines.append(f"| {clients} | {label} | {median.user * 1e6:,.0f} "
                         f"| {median.system * 1e6:,.0f} | {median.voluntary:.2f} "
                         f"| {median.involuntary:.2f} |")
        added_user = medians["product"].user - medians["noop"].user
        added_system = medians["product"].system - medians["noop"].system
        lines.append(f"| {clients} | added | {added_user * 1e6:,.0f} "
                     f"| {added_system * 1e6:,.0f} | | |")
    return "\n".join(lines)


# --- what the served statements cost (``--statements``) ------------------------------------


def _time_statements(out: Path) -> None:
    """Time every statement on the SQLite connections this process opens from now on, by the
    thread's CPU clock, per statement text; SIGUSR2 starts afresh, SIGUSR1 writes to ``out``
    (JSON: text -> [count, seconds])."""
    spent: dict[str, list[float]] = {}
    timing = [False]

    def timed(sql: str, run: Any) -> Any:
        if not timing[0]:
            return run()
        began = time.thread_time()
        result = run()
        entry = spent.setdefault(" ".join(sql.split()), [0, 0.0])
        entry[0] += 1
        entry[1] += time.thread_time() - began
        return result

    class TimedCursor(sqlite3.Cursor):
        def execute(self, sql: str, parameters: Any = (), /) -> Any:
            return timed(sql, lambda: super(TimedCursor, self).execute(sql, parameters))

    class TimedConnection(sqlite3.Connection):
        def execute(self, sql: str, parameters: Any = (), /) -> Any:
            return self.cursor().execute(sql, parameters)

        def cursor(self, factory: Any = TimedCursor) -> Any:
            return super().cursor(factory)

    connect = sqlite3.connect

    def connected(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        return connect(*args, **kwargs, factory=TimedConnection)

    def start(signum: int, frame: Any) -> None:
        spent.clear()
        timing[0] = True

    def write(signum: int, frame: Any) -> None:
        timing[0] = False
        part = out.with_suffix(".part")
        part.write_text(json.dumps(spent))
        part.replace(out)  # whole once it is there

    sqlite3.connect = connected  # type: ignore[assignment]
    signal.signal(signal.SIGUSR2, start)
    signal.signal(signal.SIGUSR1, write)


def statements_report(pairs: int, shown: int = 6) -> str:
    """The served product's costliest statements per pair, 1 and 32 clients, as a table."""
    lines = [f"{pairs} pairs, asyncio + httptools, after the event ring is full, load average "
             f"{os.getloadavg()[0]:.1f}: the product's SQL statements, CPU of the serving "
             f"thread in each (its {shown} costliest)", "",
             "| clients | statement | a pair | µs each | µs a pair | server CPU µs/pair |",
             "|---:|---|---:|---:|---:|---:|"]
    for clients in CONCURRENCY:
        text, block = observed_block("product", pairs, clients, "--statements-out")
        done = max(1, pairs // clients) * clients
        found = sorted(json.loads(text).items(), key=lambda item: -item[1][1])[:shown]
        for sql, (count, seconds) in found:
            lines.append(f"| {clients} | `{sql[:60]}` | {count / done:.2f} "
                         f"| {seconds / max(count, 1) * 1e6:.1f} | {seconds / done * 1e6:.1f} "
                         f"| {block.cpu * 1e6:,.0f} |")
    return "\n".join(lines)


# --- SQL per pair ----------------------------------------------------------------------------


@dataclass
class SqlCount:
    """What the store file was asked over some pairs: statements, transactions (explicit ones,
    and statements run outside one), and of those transactions the writes."""

    statements: int = 0
    transactions: int = 0
    writes: int = 0

    def seen(self, sql: str, *, in_transaction: bool) -> None:
        self.statements += 1
        verb = sql.lstrip().split(None, 1)[0].upper()
        if verb == "BEGIN":
            self.transactions += 1
            self.writes += "IMMEDIATE" in sql.upper() or "EXCLUSIVE" in sql.upper()
        elif verb not in ("COMMIT", "ROLLBACK", "END") and not in_transaction:
            self.transactions += 1
            self.writes += verb in ("INSERT", "UPDATE", "DELETE", "REPLACE")


class CountedCursor(sqlite3.Cursor):
    """A cursor of a ``CountedConnection`` that counts the statements run through it (a
    store may keep a cursor and run its statements there rather than through the
    connection's ``execute``)."""

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        if CountedConnection.counting:
            CountedConnection.counting[0].seen(sql, in_transaction=self.connection.in_transaction)
        return super().execute(sql, parameters)


class CountedConnection(sqlite3.Connection):
    """A connection that counts the statements run through it, by its ``execute`` or on a
    cursor it made, into ``counting[0]``."""

    counting: list[SqlCount] = []

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        # (sqlite3 makes this call's cursor itself, not through ``cursor``: no double count)
        if self.counting:
            self.counting[0].seen(sql, in_transaction=self.in_transaction)
        return super().execute(sql, parameters)

    def cursor(self, factory: Any = CountedCursor) -> Any:
        return super().cursor(factory)


async def _sql_pairs(data_dir: str, pairs: int, clients: int, count: SqlCount) -> None:
    import httpx

    from enhanced_locking.api.app import create_app
    from enhanced_locking.config import EnhancedLockingConfig
    from enhanced_locking.factory import LockService
    from enhanced_locking.provider import ConfigProvider

    config = EnhancedLockingConfig(enabled=True, data_dir=data_dir, audit_stdout=False)
    app = create_app(LockService(ConfigProvider(config)))

    async def run(client: httpx.AsyncClient, number: int, each: int) -> None:
        take = lock_body(f"envs/sql{number}", 1)
        give = f"/v1/locks/by-key?key=acme/bench/envs/sql{number}/default/&pull=1"
        for _ in range(each):
            assert (await client.post("/v1/locks", json=take)).status_code == 200
            assert (await client.delete(give)).status_code == 200

    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=f"http://{LOOPBACK}") as client:
        await asyncio.gather(*(run(client, n, 5) for n in range(clients)))  # warm up
        await asyncio.sleep(0.01)  # the warm-up's audit rows are written
        CountedConnection.counting.append(count)
        try:
            await asyncio.gather(*(run(client, n, pairs // clients) for n in range(clients)))
            await asyncio.sleep(0.01)
        finally:
            CountedConnection.counting.clear()


def sql_per_pair(pairs: int, clients: int) -> SqlCount:
    """The SQL of ``pairs`` lock pairs by ``clients`` concurrent clients (each on its own
    key), counted on every connection the app opens."""
    count = SqlCount()
    connect = sqlite3.connect

    def counted(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        return connect(*args, **kwargs, factory=CountedConnection)

    sqlite3.connect = counted  # type: ignore[assignment]
    try:
        with tempfile.TemporaryDirectory() as data_dir:
            asyncio.run(_sql_pairs(data_dir, pairs, clients, count))
    finally:
        sqlite3.connect = connect
    return count


# --- the run ---------------------------------------------------------------------------------


def measure(loop: str, http: str, pairs: int, rounds: int, count: int,
            work: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    with server("noop", loop, http, work) as noop, server("product", loop, http, work) as ours:
        for served in (noop, ours):  # the steady state: the event ring full (STEADY_PAIRS)
            asyncio.run(pairs_per_second("noop" if served is noop else "product", served,
                                         max(CONCURRENCY), STEADY_PAIRS))
        for clients in CONCURRENCY:
            asyncio.run(pairs_per_second("noop", noop, clients, pairs // 5))  # warm up
            asyncio.run(pairs_per_second("product", ours, clients, pairs // 5))
            runs = []
            for _ in range(rounds):
                anchor = asyncio.run(pairs_per_second("noop", noop, clients, pairs))
                measured = asyncio.run(pairs_per_second("product", ours, clients, pairs))
                runs.append((anchor, measured))
            found[f"pairs{clients}"] = runs
        found["handoff"] = asyncio.run(handoffs(ours, count))
    return found


def report(results: dict[tuple[str, str], dict[str, Any]], counts: str,
           sql: dict[int, SqlCount]) -> Report:
    lines = [
        f"{counts}. Python {platform.python_version()}, {len(os.sched_getaffinity(0))} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the end; client and servers share the "
        f"machine. Each server is first brought to its steady state ({STEADY_PAIRS:,} pairs "
        "untimed, no-op and lock API alike: the event ring full). Pairs per second (acquire "
        "+ release) of the round with the median ratio; ratio best / median over the rounds. "
        "CPU per pair: the server process's user + "
        "system time over the block, per pair (median over the rounds); their ratio (no-op / "
        "lock API) is the pairs/s ratio the two servers would reach with a core each, and "
        "holds still when other work shares the machine. `httptools` is the product's guarded "
        "protocol (request deadlines, connection limit); `h11` is uvicorn's own (without them). "
        f"A row meets the goal when both its pairs/s ratio (median round) and its CPU ratio "
        f"reach {PAIR_GOAL}x.",
        "",
        "| stack (loop, parser) | clients | no-op pairs/s | lock API pairs/s "
        "| ratio (best / median) | no-op CPU µs/pair | lock API CPU µs/pair | CPU ratio "
        "| goal | met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    service: dict[int, tuple[float, float]] = {}  # the service's stack: pairs/s, CPU ratio
    for (loop, http), found in results.items():
        for clients in CONCURRENCY:
            runs = found[f"pairs{clients}"]
            ratios = [measured.rate / anchor.rate for anchor, measured in runs]
            best, median = best_and_median(ratios)
            anchor, measured = sorted(runs, key=lambda r: r[1].rate / r[0].rate)[len(runs) // 2]
            anchor_cpu = statistics.median(a.cpu for a, _ in runs)
            measured_cpu = statistics.median(m.cpu for _, m in runs)
            if (loop, http) == SERVICE_STACK:
                service[clients] = (median, anchor_cpu / measured_cpu)
            lines.append(f"| {loop}, {http} | {clients} | {anchor.rate:,.0f} "
                         f"| {measured.rate:,.0f} | {best:.2f}x / {median:.2f}x "
                         f"| {anchor_cpu * 1e6:,.0f} | {measured_cpu * 1e6:,.0f} "
                         f"| {anchor_cpu / measured_cpu:.2f}x | >= {PAIR_GOAL}x both "
                         f"| {verdict(pair_goal_met(median, anchor_cpu / measured_cpu))} |")
    lines += ["", "| stack (loop, parser) | hand-off p50 ms | p99 ms | goal | met |",
              "|---|---:|---:|---|---|"]
    for (loop, http), found in results.items():
        p50 = percentile(found["handoff"], 0.5)
        lines.append(f"| {loop}, {http} | {p50 * 1000:.3f} "
                     f"| {percentile(found['handoff'], 0.99) * 1000:.3f} | p50 <= 1.5 ms "
                     f"| {verdict(p50 <= 0.0015)} |")
    goals: list[Goal] = []
    if service:
        by_rate = " / ".join(f"{rate:.2f}x" for rate, _ in service.values())
        by_cpu = " / ".join(f"{cpu:.2f}x" for _, cpu in service.values())
        clients_text = " and ".join(str(clients) for clients in service)
        goals.append(Goal(
            f"HTTP: a lock pair >= {PAIR_GOAL}x of a no-op pair on the service's stack (asyncio + "
            f"httptools), {clients_text} clients, by pairs/s and by CPU per pair",
            f"{by_rate} by pairs/s, {by_cpu} by CPU",
            all(pair_goal_met(rate, cpu) for rate, cpu in service.values())))
    if SERVICE_STACK in results:
        p50 = percentile(results[SERVICE_STACK]["handoff"], 0.5)
        goals.append(Goal("HTTP: hand-off p50 <= 1.5 ms on the service's stack",
                          f"{p50 * 1000:.2f} ms", p50 <= 0.0015))
    lines += ["", f"| SQL per lock pair ({SQL_PAIRS} pairs, in process) | statements "
              "| transactions | of them writes |", "|---|---:|---:|---:|"]
    for clients, count in sql.items():
        lines.append(f"| {clients} client{'s' if clients > 1 else ''} "
                     f"| {count.statements / SQL_PAIRS:.1f} "
                     f"| {count.transactions / SQL_PAIRS:.1f} | {count.writes / SQL_PAIRS:.1f} |")
    return Report("\n".join(lines), tuple(goals))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--handoffs", type=int, default=200)
    parser.add_argument("--stacks", default="all", help="all, or e.g. uvloop-h11,asyncio-h11")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="only trace N hand-offs on the service's stack and print the p50 "
                             "of each step (where a hand-off's time goes)")
    parser.add_argument("--count", choices=("noop", "product"),
                        help="only count the instructions per pair of one server, under "
                             "callgrind (see the module's docstring)")
    parser.add_argument("--sample", action="store_true",
                        help="only sample where each server's CPU time goes, by area "
                             "(see the module's docstring)")
    parser.add_argument("--collections", action="store_true",
                        help="only count each server's garbage collections per pair "
                             "(see the module's docstring)")
    parser.add_argument("--split", action="store_true",
                        help="only measure each server's user and system time and context "
                             "switches per pair, 1 and 32 clients (see the module's docstring)")
    parser.add_argument("--statements", action="store_true",
                        help="only time the served product's SQL statements per pair, 1 and 32 "
                             "clients (see the module's docstring)")
    parser.add_argument("--top", type=int, default=0, metavar="N",
                        help="with --sample: the lock API's N largest functions of each area")
    parser.add_argument("--clients", type=int, default=1,
                        help="with --count, --sample or --collections")
    parser.add_argument("--profile", type=Path, help="with --count: keep callgrind's profile")
    parser.add_argument("--cache", action="store_true",
                        help="with --count: also the misses per pair of one core's caches "
                             "(level 1 and 2, simulated by callgrind)")
    parser.add_argument("--steady", action="store_true",
                        help="with --count: warm up to the table's steady state (the event "
                             "ring full) before counting, not 200 pairs")
    parser.add_argument("--audit-window", type=float, metavar="SECONDS",
                        help="with --count: the product's audit write-behind window (0.4: "
                             "about as many entries per commit as at full speed)")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting of the served product (not in the table's run), e.g. "
                        "audit-own-locks=false; repeat for more")
    parser.add_argument("--serve", choices=("noop", "product", "traced"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--loop", default="asyncio", help=argparse.SUPPRESS)
    parser.add_argument("--http", default="h11", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--sample-out", help=argparse.SUPPRESS)
    parser.add_argument("--collections-out", help=argparse.SUPPRESS)
    parser.add_argument("--statements-out", help=argparse.SUPPRESS)
    quick_defaults(parser, pairs=640, rounds=2, handoffs=50)
    args = parser.parse_args()
    PRODUCT_SETTINGS.extend(args.setting)
    if args.serve:
        serve(args.serve, args.port, args.loop, args.http, args.data_dir, args.audit_window,
              args.sample_out, args.collections_out, args.statements_out,
              tuple(args.setting))
        return
    if args.collections:
        print(collections_report(args.pairs, args.clients))
        return
    if args.split:
        print(split_report(args.pairs, args.rounds))
        return
    if args.statements:
        print(statements_report(args.pairs))
        return
    if args.sample:
        print(sample_report(args.pairs, args.clients, args.top))
        return
    if args.count:
        print(count_pairs(args.count, args.pairs, args.clients, args.profile,
                          audit_window=args.audit_window, cache=args.cache,
                          steady=args.steady))
        return
    if args.steps:
        with tempfile.TemporaryDirectory() as tmp:
            found = handoff_steps(Path(tmp), args.steps)
        print(f"{args.steps} hand-offs, asyncio + httptools, load average "
              f"{os.getloadavg()[0]:.1f}\n\n| step (from the release leaving the client) "
              "| p50 ms |\n|---|---:|")
        for label, seconds in found:
            print(f"| {label} | {seconds * 1000:.2f} |")
        return
    if args.setting:
        parser.error("--setting is for the modes that measure one case (--count, --split, "
                     "--sample, ...), not the table's run, which measures the service as shipped")
    stacks = STACKS if args.stacks == "all" else tuple(
        tuple(name.split("-")) for name in args.stacks.split(","))
    if SERVICE_STACK not in stacks and not args.no_write:
        parser.error(f"--stacks without {'-'.join(SERVICE_STACK)} (the service's, which the "
                     "goals are judged on) would write the section without its goals: add it "
                     "or pass --no-write")
    results: dict[tuple[str, str], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for loop, http in stacks:
            results[(loop, http)] = measure(loop, http, args.pairs, args.rounds, args.handoffs,
                                            Path(tmp))
    sql = {clients: sql_per_pair(SQL_PAIRS, clients) for clients in CONCURRENCY}
    found = report(results, f"{args.pairs} pairs per case and round, {args.rounds} rounds, "
                            f"{args.handoffs} hand-offs per stack", sql)
    print(found.text)
    if not args.no_write:
        write_section("http", HEADING, found)


if __name__ == "__main__":
    main()
