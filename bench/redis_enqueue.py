"""What one enqueue costs on the Redis store as the key's queue grows.

A key is held; waiters are queued behind it (a third each of low, normal and high priority,
the priority queue on, as Atlantis runs it) until the queue is 10, 100, 1,000 and 10,000
long. At each length a sample of waiting acquires joins the queue (``acquire_or_enqueue``
with a wait, the store alone), then the locker builds the ``queued`` event of each the way it
does after an enqueue. Reported per call:

* Redis: the microseconds the functions took inside redis-server (``INFO commandstats``,
  ``usec_per_call`` of ``FCALL``, over the sample: CPU time spent in the call, so the load of
  the machine moves it less than wall time; the replica's heartbeat, one small call a second,
  is in it too);
* client: the CPU time (user + system) of this process for the call (``time.process_time``),
  the asyncio loop and the reply's decoding included;
* the same two for the ``queued`` event's own reads (``EnhancedLocker.queued_view``: the
  store's enqueue does not say who is ahead and who holds the key, so the locker reads the
  first in line and the holders; it read the whole queue before).

An O(1) enqueue keeps its column flat from 10 to 10,000; an O(n) one grows a hundredfold.
A real ``redis-server`` is started on a free loopback port.

``--head-commits``: every request of the sample names its pull's head commit (Atlantis's
do), so each enqueue also looks for its pull's older requests to supersede. The queue is filled
with requests that name none: what the waiters ahead name does not change what that look
costs (it read every waiter's record before the store kept its waiters by pull, and reads the
pull's own since), and a fill whose every enqueue read every record took hours at 10,000.

``--shared``: the sample's requests are shared ones, which look for an exclusive request
waiting ahead of them on the key. ``--held-shared``: as ``--shared``, with the key held
shared, so the holder lets the sample's requests in and each looks at the queue (the first
in line is an exclusive request of another pull, as behind a shared holder it would be).
``--held-shared-batches``: the key held shared and a second key held exclusively by
another pull; the queue is filled with batches, each shared on the key and exclusive on the
second (so they wait, on the second), and the sample's requests are shared ones on the key
alone, granted: each serves the key's queue and looks at it for an exclusive request ahead,
meeting none. Its own table: the function calls (discovery rounds) and the Redis and client
time of one such request.
``--wait-graph``: each enqueue of the sample is followed by what the locker does with
``deadlock-detection`` on, counted in it: the walk over the part of the wait-for graph the
new waiter's pull can reach (``wait_graph_from``) and the search for a cycle through it
(``deadlock.find_cycle``, in the client column); then, as the anchor of the same run, the
same sample's check as it was made before the walk: the whole graph read (``wait_graph``)
and searched (two more columns).
``--spread``: the waiters are queued ten to a key, each key held by a pull of its own (many
short queues, as many projects' locks are), not all on one key.

Usage: python bench/redis_enqueue.py [--lengths 10,100,1000,10000] [--sample 30]
       [--head-commits] [--shared] [--held-shared] [--held-shared-batches] [--wait-graph]
       [--spread]
(prints the table; docs/benchmarks.md keeps what it found in its prose.)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import redis.asyncio as aioredis  # noqa: E402
from bench._common import quick_defaults  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

from enhanced_locking.backends.redis_store import RedisBackend  # noqa: E402
from enhanced_locking.backends.waiting import Outcome, QueuePolicy, Status, Wait  # noqa: E402
from enhanced_locking.config import EnhancedLockingConfig  # noqa: E402
from enhanced_locking.events import EventBus  # noqa: E402
from enhanced_locking.locking import EnhancedLocker, deadlock  # noqa: E402
from enhanced_locking.metrics import Metrics  # noqa: E402
from enhanced_locking.types import Candidate, LockRequest, Priority, Project, Pull  # noqa: E402

LEVELS = (Priority.LOW, Priority.NORMAL, Priority.HIGH)
WAIT = timedelta(hours=1)


HEADS = [False]
"""``--head-commits``: each request of the sample names its pull's head commit, as Atlantis's
do."""
SHARED = [False]
"""``--shared``: the sample's requests are shared ones."""
GRAPH = [False]
"""``--wait-graph``: each enqueue of the sample reads the wait-for graph too."""
HELD_SHARED = [False]
"""``--held-shared``: the key is held shared (and the sample's requests are shared)."""
SECOND = "envs/shared-infra"
"""``--held-shared-batches``: the second key's project path."""
SAMPLE_PULLS = 10_000_000
"""``--held-shared-batches``: the pulls of the sample (and, one below, the second key's holder)."""
BATCHES = [False]
"""``--held-shared-batches``: the queue is of batches waiting on a second key."""
SPREAD = [False]
"""``--spread``: ten waiters a key, each key held by a pull of its own."""
PER_KEY = 10
SPREAD_HOLDERS = 20_000_000
"""``--spread``: the pull holding key ``n`` is this plus ``n``."""


def _request(pull: int, *, head: bool = False, shared: bool = False,
             path: str = "envs/prod") -> LockRequest:
    return LockRequest(project=Project(repo_full_name="acme/bench", path=path),
                       pull=Pull(num=pull, head_commit=f"c{pull}" if head else ""),
                       priority=LEVELS[pull % len(LEVELS)],
                       mode="shared" if shared else "exclusive")


class Rig:
    def __init__(self, server: RedisServer) -> None:
        config = EnhancedLockingConfig(
            enabled=True, backend="redis", redis_addr=server.addr, priority_queue=True,
            events=False, metrics=True, max_timeout="2h", max_queue_size=1_000_000)
        self.policy = QueuePolicy.from_config(config)
        self.backend = RedisBackend.from_config(config, "enhanced")
        self.locker = EnhancedLocker(self.backend, settings=lambda: config, events=EventBus(),
                                    metrics=Metrics())
        self.admin = aioredis.Redis(host=server.host, port=server.port)
        self.queued = 0

    async def enqueue(self, *, sampled: bool = False) -> Outcome:
        self.queued += 1
        path = "envs/prod"
        if SPREAD[0]:
            n = self.queued // PER_KEY
            path = f"envs/k{n}"
            if self.queued % PER_KEY == 0 or self.queued == 1:  # a new key: held first
                holder = _request(SPREAD_HOLDERS + n, path=path)
                held = await self.backend.acquire_or_enqueue(
                    Candidate.of_request(holder, priority=holder.priority), ttl=None,
                    wait=None, policy=self.policy)
                assert held.status is Status.GRANTED, held
        request = _request(self.queued, head=sampled and HEADS[0],
                           shared=sampled and SHARED[0], path=path)
        waiter_id = f"w-{self.queued}"
        self.backend.grants.expect(waiter_id)  # a caller waits to hear, as the locker's does
        outcome = await self.backend.acquire_or_enqueue(
            Candidate.of_request(request, priority=request.priority), ttl=None,
            wait=Wait(id=waiter_id, timeout=WAIT), policy=self.policy)
        assert outcome.status is Status.QUEUED, outcome
        if sampled and GRAPH[0]:
            assert outcome.waiter is not None
            graph = await self.backend.wait_graph_from(outcome.waiter, policy=self.policy)
            assert deadlock.find_cycle(graph, outcome.waiter.owner) is None
        return outcome

    async def whole_graph_checks(self, queued: list[Outcome]) -> dict[str, float]:
        """The same sample's deadlock check as it was made before the walk: the whole graph
        read and searched (the anchor of ``--wait-graph``)."""
        await self.admin.config_resetstat()
        cpu = time.process_time()
        for outcome in queued:
            assert outcome.waiter is not None
            graph = await self.backend.wait_graph(policy=self.policy)
            assert deadlock.find_cycle(graph, outcome.waiter.owner) is None
        return {"whole_client": (time.process_time() - cpu) / len(queued) * 1e6,
                "whole_server": await self.server_usec() / len(queued)}

    async def enqueue_batch(self) -> None:
        """A batch shared on the key and exclusive on the second one (held: it waits)."""
        self.queued += 1
        parts = (_request(self.queued, shared=True), _request(self.queued, path=SECOND))
        outcome = await self.backend.acquire_batch(
            tuple(Candidate.of_request(r, priority=r.priority) for r in parts), ttl=None,
            wait=Wait(id=f"w-{self.queued}", timeout=WAIT), policy=self.policy)
        assert outcome.status is Status.QUEUED, outcome

    async def measure_batches(self, length: int, sample: int) -> dict[str, float]:
        while self.queued < length:
            await self.enqueue_batch()
        await self.admin.config_resetstat()
        cpu = time.process_time()
        for n in range(sample):
            request = _request(SAMPLE_PULLS + n, shared=True)
            outcome = await self.backend.acquire_or_enqueue(
                Candidate.of_request(request, priority=request.priority), ttl=None,
                wait=Wait(id=f"s-{length}-{n}", timeout=WAIT), policy=self.policy)
            assert outcome.status is Status.GRANTED, outcome
        client = (time.process_time() - cpu) / sample
        stats: Any = await self.admin.info("commandstats")
        calls = sum(int(entry["calls"]) for name, entry in stats.items()
                    if name in ("cmdstat_fcall", "cmdstat_fcall_ro"))
        return {"length": length, "calls": calls / sample,
                "server": await self.server_usec() / sample, "client": client * 1e6}

    async def server_usec(self) -> float:
        stats: Any = await self.admin.info("commandstats")
        return sum(float(entry["usec"]) for name, entry in stats.items()
                   if name in ("cmdstat_fcall", "cmdstat_fcall_ro", "cmdstat_evalsha"))

    async def measure(self, length: int, sample: int) -> dict[str, float]:
        while self.queued < length:
            await self.enqueue()
        await self.admin.config_resetstat()
        cpu = time.process_time()
        queued = [await self.enqueue(sampled=True) for _ in range(sample)]
        enqueue_cpu = (time.process_time() - cpu) / sample
        enqueue_server = await self.server_usec() / sample
        whole = await self.whole_graph_checks(queued) if GRAPH[0] else {}
        views = max(3, sample // 3)
        await self.admin.config_resetstat()
        cpu = time.process_time()
        for outcome in queued[:views]:
            assert outcome.waiter is not None and outcome.position is not None
            assert await self.locker.queued_view(outcome.waiter.keys[0], outcome.waiter,
                                                 outcome.position)
        view_cpu = (time.process_time() - cpu) / views
        view_server = await self.server_usec() / views
        return {"length": length, "enqueue_server": enqueue_server,
                "enqueue_client": enqueue_cpu * 1e6, "view_server": view_server,
                "view_client": view_cpu * 1e6, **whole}


async def run(lengths: list[int], sample: int) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
        rig = Rig(server)
        try:
            holder = _request(0, shared=HELD_SHARED[0])
            first = await rig.backend.acquire_or_enqueue(
                Candidate.of_request(holder, priority=holder.priority), ttl=None, wait=None,
                policy=rig.policy)
            assert first.status is Status.GRANTED
            rows = []
            if BATCHES[0]:
                other = _request(SAMPLE_PULLS - 1, path=SECOND)
                second = await rig.backend.acquire_or_enqueue(
                    Candidate.of_request(other, priority=other.priority), ttl=None, wait=None,
                    policy=rig.policy)
                assert second.status is Status.GRANTED
            for length in lengths:
                if BATCHES[0]:
                    rows.append(await rig.measure_batches(length, sample))
                    print(f"| {length:,} | {rows[-1]['calls']:.1f} | "
                          f"{rows[-1]['server']:,.0f} | {rows[-1]['client']:,.0f} |", flush=True)
                    continue
                rows.append(await rig.measure(length, sample))
                print(_row(rows[-1]), flush=True)
            return rows
        finally:
            await rig.backend.close()
            await rig.admin.aclose()


def _row(row: dict[str, float]) -> str:
    whole = (f" {row['whole_server']:,.0f} | {row['whole_client']:,.0f} |"
             if "whole_server" in row else "")
    return (f"| {int(row['length']):,} | {row['enqueue_server']:.1f} | "
            f"{row['enqueue_client']:.0f} | {row['view_server']:.1f} | "
            f"{row['view_client']:.0f} |{whole}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="10,100,1000,10000")
    parser.add_argument("--sample", type=int, default=30)
    parser.add_argument("--head-commits", action="store_true")
    parser.add_argument("--shared", action="store_true")
    parser.add_argument("--held-shared", action="store_true")
    parser.add_argument("--held-shared-batches", action="store_true")
    parser.add_argument("--wait-graph", action="store_true")
    parser.add_argument("--spread", action="store_true")
    parser.add_argument("--no-write", action="store_true")  # (this bench writes no table)
    quick_defaults(parser, lengths="10,100,1000", sample=10)
    args = parser.parse_args()
    if args.held_shared_batches:
        print("| batches queued | function calls a request | Redis µs a request | "
              "client CPU µs a request |")
        print("|---:|---:|---:|---:|")
    else:
        whole = (" whole graph read and searched: Redis µs | client CPU µs |"
                 if args.wait_graph else "")
        print("| queue length | enqueue: Redis µs | enqueue: client CPU µs | "
              f"event reads: Redis µs | event reads: client CPU µs |{whole}")
        print("|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.wait_graph else ""))
    HEADS[0], GRAPH[0] = args.head_commits, args.wait_graph
    BATCHES[0] = args.held_shared_batches
    SPREAD[0] = args.spread
    HELD_SHARED[0] = args.held_shared or args.held_shared_batches
    SHARED[0] = args.shared or args.held_shared
    asyncio.run(run([int(n) for n in args.lengths.split(",")], args.sample))


if __name__ == "__main__":
    main()
