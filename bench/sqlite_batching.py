"""The embedded store's grant and release statements between other work: alone and batched.

A served lock pair runs two SQLite write transactions, the grant's and the release's, each a
statement of its own between the Python work of its request and of the requests around it. Run
back to back, a statement is cheap; run after other work, SQLite's code and pages are no longer
in the core's caches, and the same statement takes longer. This measures both ways of running
the writes that the store could choose between:

* **alone**: each statement in a transaction of its own (as the store runs them), right after
  its share of the other work;
* **batched**: the other work of ``--batch`` statements first, then those statements one after
  another in one transaction, each in a ``SAVEPOINT`` of its own (what a group commit of one
  loop turn's writes would run: one write can fail without undoing the others).

The statements are the store's own texts (``_TAKE_MINE_AS_EXPECTED_CHECKED`` and
``_POP_OWNED_AS_EXPECTED_CHECKED``: a pull taking its own free row and releasing it, the common
pair), on a store file made by the store's ``open_database`` (WAL, ``synchronous=NORMAL``,
its triggers), with two more connections open on it as the service has (the legacy side's and
the audit trail's), ``--batch`` keys each taken and released in turn. The other work between
statements stands in for a request's Python: ``json.dumps`` of ``--objects`` small dicts (0:
none). CPU time of this thread (``time.thread_time``) over the statements only, per statement;
blocks of the two ways alternate, and the table gives the median block of each.

On the event loop (``--loop``): the same two statements made by ``--tasks`` asyncio tasks, each
its own key, each write after its request's share of the other work and a pass through the
loop (as a served request reads its socket), both ways as a store could serve them:

* **alone**: each statement in a transaction of its own, answered at once (as the store runs
  them);
* **group commit**: the first write of a loop turn begins a transaction and asks the loop to
  commit it next turn (``call_soon``); each write runs in a ``SAVEPOINT`` of its own and waits
  for that commit (a future) before it answers, so that no answer goes out before its write is
  committed.

The whole block's CPU time of this thread per write (the statements, the other work, the loop,
the futures): what a served write costs either way, and their ratio, per number of tasks.

Usage: python bench/sqlite_batching.py [--objects 0,300,1000] [--batch 16] [--rounds 5]
       [--pairs 150]
       python bench/sqlite_batching.py --loop [--tasks 1,32] [--objects 0,300,1000]
(prints the table; docs/benchmarks.md keeps what it found in its prose, HTTP section.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import quick_defaults  # noqa: E402

from enhanced_locking.backends import embedded  # noqa: E402

NAMESPACE, OTHER = "enhanced", "legacy"
REPO_NAME, PULL = "acme/bench", 1
LOCK_TEXT = (
    '{"Project":{"RepoFullName":"acme/bench","Path":"envs/k%d","ProjectName":""},'
    '"Workspace":"default","Pull":{"Num":1,"HeadCommit":"","URL":"","Branch":"",'
    '"BaseBranch":"","Author":"","State":0,"BaseRepo":{"FullName":"","Owner":"","Name":"",'
    '"CloneURL":"","SanitizedCloneURL":"","VCSHost":{"Hostname":"","Type":0}}},'
    '"User":{"Username":"","Teams":null},"Time":"2026-01-01T00:00:00.123456Z",'
    '"Enhanced":{"FencingToken":%d,"Priority":"normal","ExpiresAt":null}}')
"""A lock's text as the store writes it (its size, about 450 bytes, is what matters)."""
STATEMENTS = (embedded._TAKE_MINE_AS_EXPECTED_CHECKED, embedded._POP_OWNED_AS_EXPECTED_CHECKED)


class Store:
    """A store file with the store's layout, the connection that writes, and ``keys`` rows
    of one pull, free, each at its own counter."""

    def __init__(self, directory: Path, keys: int) -> None:
        path = directory / "enhanced-locking.db"
        self.db = embedded.open_database(path)
        self.others = [embedded.open_database(path) for _ in range(2)]  # legacy, audit
        self.keys = [f"acme/bench/envs/k{n}/default/" for n in range(keys)]
        for key in self.keys:
            self.db.execute("INSERT INTO locks (ns, key, repo, pull, data, counter, held) "
                            "VALUES (?, ?, ?, ?, ?, 0, 0)",
                            (NAMESPACE, key, REPO_NAME, PULL, LOCK_TEXT % (0, 0)))
        self.cursor = self.db.cursor()
        self.token = 0
        self.tokens = [0] * keys  # each key's last token (the loop's writes)

    def arguments(self, index: int, key: str) -> tuple[Any, ...]:
        return (NAMESPACE, key, REPO_NAME, PULL, LOCK_TEXT % (index, self.token), self.token,
                OTHER)

    def run(self, statement: str, index: int, key: str) -> None:
        changed = self.cursor.execute(statement, self.arguments(index, key)).rowcount
        if changed != 1:
            raise RuntimeError(f"the statement changed {changed} rows of {key}, not 1")

    def close(self) -> None:
        for connection in (self.db, *self.others):
            connection.close()


def alone(store: Store, work: Callable[[], object]) -> float:
    """The grant and release of every key, each statement in its own transaction right after
    its share of the work: CPU seconds in the statements."""
    spent = 0.0
    store.token += 1
    for statement in STATEMENTS:
        for index, key in enumerate(store.keys):
            work()
            began = time.thread_time()
            store.run(statement, index, key)
            spent += time.thread_time() - began
    return spent


def batched(store: Store, work: Callable[[], object]) -> float:
    """The same statements, each kind in one transaction after all of its work, a SAVEPOINT
    each: CPU seconds in the transaction."""
    spent = 0.0
    store.token += 1
    cursor = store.cursor
    for statement in STATEMENTS:
        for _ in store.keys:
            work()
        began = time.thread_time()
        cursor.execute("BEGIN IMMEDIATE")
        for index, key in enumerate(store.keys):
            cursor.execute("SAVEPOINT one")
            store.run(statement, index, key)
            cursor.execute("RELEASE one")
        cursor.execute("COMMIT")
        spent += time.thread_time() - began
    return spent


def measure(objects: int, batch: int, rounds: int, pairs: int) -> tuple[float, float]:
    """Median µs per statement alone and batched, with ``objects`` dicts encoded between."""
    junk = [{"n": n, "text": str(n)} for n in range(objects)]

    def work() -> object:
        return json.dumps(junk) if junk else None

    blocks = max(1, pairs // batch)
    found: dict[str, list[float]] = {"alone": [], "batched": []}
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp), batch)
        try:
            alone(store, work)  # warm up: statements prepared, pages read
            batched(store, work)
            for _ in range(rounds):
                for name, way in (("alone", alone), ("batched", batched)):
                    spent = sum(way(store, work) for _ in range(blocks))
                    found[name].append(spent / (blocks * batch * len(STATEMENTS)))
        finally:
            store.close()
    return statistics.median(found["alone"]) * 1e6, statistics.median(found["batched"]) * 1e6


async def on_loop(store: Store, tasks: int, writes: int, work: Callable[[], object],
                  grouped: bool) -> float:
    """``writes`` grants and releases (in turn) of ``tasks`` tasks, each on its own key, alone
    or in group commits: CPU seconds of the whole block per write."""
    loop = asyncio.get_running_loop()
    cursor = store.cursor
    waiting: list[asyncio.Future[None]] | None = None

    def commit() -> None:
        nonlocal waiting
        answered, waiting = waiting or [], None
        cursor.execute("COMMIT")
        for future in answered:
            future.set_result(None)

    async def write(statement: str, index: int, key: str, token: int) -> None:
        nonlocal waiting
        arguments = (NAMESPACE, key, REPO_NAME, PULL, LOCK_TEXT % (index, token), token, OTHER)
        if not grouped:
            changed = cursor.execute(statement, arguments).rowcount
        else:
            if waiting is None:
                cursor.execute("BEGIN IMMEDIATE")
                waiting = []
                loop.call_soon(commit)
            cursor.execute("SAVEPOINT one")
            changed = cursor.execute(statement, arguments).rowcount
            cursor.execute("RELEASE one")
            answered = loop.create_future()
            waiting.append(answered)
            await answered
        if changed != 1:
            raise RuntimeError(f"the statement changed {changed} rows of {key}, not 1")

    async def client(index: int) -> None:
        key = store.keys[index]
        for _ in range(max(1, writes // (2 * tasks))):
            token = store.tokens[index] = store.tokens[index] + 1
            for statement in STATEMENTS:
                await asyncio.sleep(0)  # the request read from its socket
                work()
                await write(statement, index, key, token)

    began = time.thread_time()
    await asyncio.gather(*(client(index) for index in range(tasks)))
    done = max(1, writes // (2 * tasks)) * 2 * tasks
    return (time.thread_time() - began) / done


def measure_loop(objects: int, tasks: int, rounds: int, writes: int) -> tuple[float, float]:
    """Median µs per served write alone and in group commits, ``tasks`` tasks."""
    junk = [{"n": n, "text": str(n)} for n in range(objects)]

    def work() -> object:
        return json.dumps(junk) if junk else None

    found: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp), tasks)
        try:
            for grouped in (False, True):  # warm up
                asyncio.run(on_loop(store, tasks, 4 * tasks, work, grouped))
            for _ in range(rounds):
                for grouped in (False, True):
                    found[grouped].append(asyncio.run(on_loop(store, tasks, writes, work,
                                                              grouped)))
        finally:
            store.close()
    return statistics.median(found[False]) * 1e6, statistics.median(found[True]) * 1e6


def loop_table(args: argparse.Namespace) -> str:
    lines = [f"The embedded store's grant and release statements served by asyncio tasks, "
             f"{args.pairs * 2} writes a block, {args.rounds} alternating rounds. Python "
             f"{platform.python_version()}, SQLite {embedded.sqlite3.sqlite_version}, "
             f"{len(os.sched_getaffinity(0))} CPUs, load average {os.getloadavg()[0]:.1f}; CPU "
             "µs per write (this thread, the whole block: statements, other work, loop, "
             "futures), median block.", "",
             "| dicts encoded before each write | tasks | alone | group commit "
             "| group / alone |", "|---:|---:|---:|---:|---:|"]
    for objects in (int(size) for size in args.objects.split(",")):
        for tasks in (int(n) for n in args.tasks.split(",")):
            single, together = measure_loop(objects, tasks, args.rounds, args.pairs * 2)
            lines.append(f"| {objects:,} | {tasks} | {single:.1f} | {together:.1f} "
                         f"| {together / single:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", default="0,300,1000",
                        help="dicts encoded between statements, one row each")
    parser.add_argument("--batch", type=int, default=16,
                        help="statements a batch (16: a loop turn's writes with 32 clients)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=150 * 16,
                        help="grant and release pairs a block, each way")
    parser.add_argument("--loop", action="store_true",
                        help="the statements served by asyncio tasks, alone and in group "
                             "commits (see the module's docstring)")
    parser.add_argument("--tasks", default="1,32", help="with --loop: tasks, one row each")
    quick_defaults(parser, rounds=2, pairs=32 * 16)
    args = parser.parse_args()
    if args.loop:
        print(loop_table(args))
        return
    sizes = [int(size) for size in args.objects.split(",")]
    lines = [f"The embedded store's grant and release statements, {args.pairs} pairs a block, "
             f"{args.rounds} alternating rounds, batches of {args.batch}. Python "
             f"{platform.python_version()}, SQLite {embedded.sqlite3.sqlite_version}, "
             f"{len(os.sched_getaffinity(0))} CPUs, load average {os.getloadavg()[0]:.1f}; "
             "CPU µs per statement (this thread), median block.", "",
             "| dicts encoded between statements | alone | batched | batched / alone |",
             "|---:|---:|---:|---:|"]
    for objects in sizes:
        single, together = measure(objects, args.batch, args.rounds, args.pairs)
        lines.append(f"| {objects:,} | {single:.1f} | {together:.1f} "
                     f"| {together / single:.2f}x |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
