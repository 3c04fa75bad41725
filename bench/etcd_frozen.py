"""What a frozen etcd member costs the callers: the table of docs/09-etcd.md, measured again.

A member stopped with SIGSTOP keeps its connections open and answers nothing (a hung host
looks the same). On a 3-member cluster on loopback (``--unsafe-no-fsync``, the election
timeout of the test cluster: 0.5 s), one store on all three endpoints, its route to the leader
known before each freeze:

1. a follower frozen: 16 acquires with a lease (each ending at another second, so each is a
   lease grant too), one after the other;
2. the leader frozen: 8 acquires at once (half with a lease), then 8 more one after the other;
3. a member frozen (a follower twice, then the leader) for ``--hold`` seconds while another
   replica has a waiter on a held key, then the key let go: whether that replica's session
   lease was kept, and the time from the release to the waiter's answer.

Each acquire's time and answer (granted, or ``unavailable`` after the call's time) are
counted; the table gives how many were granted and the slowest. Run it ``--runs`` times (the
round of the balanced channel and the elections differ from run to run). It prints the
table; the numbers in docs/09-etcd.md come from it.

Usage: python bench/etcd_frozen.py [--runs 2] [--hold 15] (``make bench``: one run, 5 s)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import quick_defaults  # noqa: E402
from tests.support.etcd_server import EtcdCluster, EtcdMember, frozen  # noqa: E402

from enhanced_locking.backends.etcd_connection import EtcdConnection, EtcdSettings  # noqa: E402
from enhanced_locking.backends.etcd_store import EtcdBackend  # noqa: E402
from enhanced_locking.backends.waiting import QueuePolicy, Status  # noqa: E402
from enhanced_locking.config import EnhancedLockingConfig  # noqa: E402
from enhanced_locking.events import EventBus  # noqa: E402
from enhanced_locking.locking import EnhancedLocker  # noqa: E402
from enhanced_locking.metrics import Metrics  # noqa: E402
from enhanced_locking.types import (  # noqa: E402
    BackendUnavailable,
    Candidate,
    LockRequest,
    Project,
    Pull,
)

Answer = tuple[bool, float]
"""One acquire: granted, and its time in seconds."""


def on_path(path: str, pull: int, **extra: object) -> LockRequest:
    return LockRequest(project=Project(repo_full_name="acme/bench", path=path),
                       pull=Pull(num=pull), **extra)


def store(cluster: EtcdCluster, prefix: str) -> EtcdBackend:
    return EtcdBackend(EtcdConnection(EtcdSettings(endpoints=tuple(cluster.endpoints))),
                       prefix=prefix)


async def leader_known(cluster: EtcdCluster, backend: EtcdBackend) -> EtcdMember:
    """The leader, once ``backend``'s route leads there (a step shows it)."""
    deadline = time.monotonic() + 30
    while True:
        await acquire(backend, f"route{time.monotonic_ns()}", None)
        leader = cluster.leader()
        if leader is not None and backend.connection.leader == leader.endpoint:
            return leader
        if time.monotonic() > deadline:
            raise TimeoutError("the route never led to the leader")
        await asyncio.sleep(0.05)


async def queued(backend: EtcdBackend, key: str) -> None:
    """Until ``backend`` has its session and a waiter queued on ``key``."""
    for _ in range(600):
        if backend.session_lease and await backend.queue(key):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the waiter was never queued")


async def acquire(backend: EtcdBackend, path: str, ttl: timedelta | None) -> Answer:
    started = time.monotonic()
    candidate = Candidate.of_request(on_path(path, 1), priority=on_path(path, 1).priority)
    try:
        outcome = await backend.acquire_or_enqueue(candidate, ttl=ttl, wait=None,
                                                   policy=QueuePolicy())
        granted = outcome.status is Status.GRANTED
    except BackendUnavailable:
        granted = False
    return granted, time.monotonic() - started


async def in_turn(backend: EtcdBackend, count: int, name: str, *,
                  ttl: timedelta | None) -> list[Answer]:
    answers = []
    for n in range(count):
        lease = None if ttl is None else ttl + timedelta(seconds=2 * n)
        answers.append(await acquire(backend, f"{name}{n}", lease))
    return answers


def summary(answers: list[Answer]) -> str:
    granted = sum(ok for ok, _ in answers)
    slowest = max(seconds for _, seconds in answers)
    return f"{granted} of {len(answers)} granted, slowest {slowest:.2f} s"


async def follower_frozen(cluster: EtcdCluster, run: int) -> str:
    backend = store(cluster, f"/frozen{run}/follower/")
    try:
        leader = await leader_known(cluster, backend)
        follower = next(m for m in cluster.members if m is not leader)
        with frozen(follower):
            answers = await in_turn(backend, 16, "lease", ttl=timedelta(seconds=30))
        return summary(answers)
    finally:
        await backend.close()


async def leader_frozen(cluster: EtcdCluster, run: int) -> tuple[str, str]:
    backend = store(cluster, f"/frozen{run}/leader/")
    try:
        leader = await leader_known(cluster, backend)
        with frozen(leader):
            at_once = await asyncio.gather(*(acquire(
                backend, f"once{n}", timedelta(seconds=30 + n) if n % 2 else None)
                for n in range(8)))
            after = await in_turn(backend, 8, "after", ttl=timedelta(seconds=40))
        return summary(list(at_once)), summary(after)
    finally:
        await backend.close()


async def waiter_under_freeze(cluster: EtcdCluster, run: int, n: int, hold: float) -> str:
    config = EnhancedLockingConfig()
    prefix = f"/frozen{run}/waiter{n}/"
    holder = EnhancedLocker(store(cluster, prefix), settings=lambda: config,
                            events=EventBus(), metrics=Metrics())
    waiting = EnhancedLocker(store(cluster, prefix), settings=lambda: config,
                             events=EventBus(), metrics=Metrics())
    assert isinstance(holder.backend, EtcdBackend) and isinstance(waiting.backend, EtcdBackend)
    try:
        leader = await leader_known(cluster, holder.backend)
        followers = [m for m in cluster.members if m is not leader]
        member, role = (leader, "leader") if n == 2 else (followers[n], "follower")
        held = await holder.acquire(on_path("held", 1))
        assert held.acquired
        waiter = asyncio.ensure_future(waiting.acquire(on_path("held", 2, wait="90s")))
        await queued(waiting.backend, held.lock_key)
        session = waiting.backend.session_lease
        with frozen(member):
            await asyncio.sleep(hold)
            while True:
                try:
                    await holder.release(held.lock_key, owner=("acme/bench", 1))
                    break
                except BackendUnavailable:
                    await asyncio.sleep(0.1)
            released = time.monotonic()
            done, _ = await asyncio.wait([waiter], timeout=20)
        if not done:
            await waiter
            answer = f"answered {time.monotonic() - released:.1f} s after the release " \
                     "(after the thaw)"
        else:
            answer = f"answered {time.monotonic() - released:.2f} s after the release"
        result = waiter.result()
        told = "granted" if result.acquired else f"told {result.reason}"
        kept = "kept" if waiting.backend.session_lease == session else "lost"
        return f"{role} frozen {hold:.0f} s: session {kept}; waiter {told}, {answer}"
    finally:
        for locker in (holder, waiting):
            await locker.close()
            await locker.backend.close()


async def measure(cluster: EtcdCluster, runs: int, hold: float) -> str:
    rows = ["| run | follower frozen, 16 in turn | leader frozen, 8 at once | then 8 in turn |",
            "|---|---|---|---|"]
    waiters = []
    for run in range(runs):
        follower = await follower_frozen(cluster, run)
        await asyncio.sleep(2)
        once, after = await leader_frozen(cluster, run)
        rows.append(f"| {run + 1} | {follower} | {once} | {after} |")
        for n in range(3):
            await asyncio.sleep(2)
            waiters.append(f"- run {run + 1}: {await waiter_under_freeze(cluster, run, n, hold)}")
    return "\n".join([*rows, "", *waiters])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--hold", type=float, default=15.0,
                        help="seconds a member stays frozen under a waiter")
    quick_defaults(parser, runs=1, hold=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = EtcdCluster(Path(tmp) / "etcd", members_count=3, fsync=False).start()
        try:
            text = asyncio.run(measure(cluster, args.runs, args.hold))
        finally:
            cluster.close()
    print(text)


if __name__ == "__main__":
    main()
