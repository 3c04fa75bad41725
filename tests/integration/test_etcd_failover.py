"""Jepsen-style: the etcd backend under a store that keeps losing its leader.

A 3-member etcd cluster on loopback, two ``enhanced-locking serve`` replicas on it, 60 clients
locking four keys (hold a moment, release) through both. Every few seconds the etcd leader is
killed with SIGKILL (and started again a moment later, on its data); once, a service replica
is killed with SIGKILL too and its clients move to the other one. The history checker then
looks at every hold the clients saw: no two holds of a key overlap, no token falls.

Locks carry a 3 s lease, so the locks of the killed replica's clients (never released) free
themselves: that also runs the lease backstop (etcd deletes the key, the watchers serve the
queue). At least 45 s of load and five leader kills, more if a busy machine makes them slow.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.history import History, Hold
from tests.support.etcd_server import EtcdCluster, EtcdServerError
from tests.support.service import ServiceProcess, services

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(360)]

REPO = "acme/jepsen"
LOAD_SECONDS = 45.0
"""The least time under load; longer if the leader kills take longer."""
KILL_EVERY = 4.0
LEADER_KILLS = 5
"""The etcd leader is killed at least this often (and as often as fits ``LOAD_SECONDS``)."""
RECOVERY = 8.0
"""Seconds of load after the last kill: the grants then show the recovery."""
CHAOS_WITHIN = 150.0
CLIENTS = 60


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    try:
        started = EtcdCluster(tmp_path / "etcd", members_count=3).start()
    except EtcdServerError as error:
        pytest.fail(str(error), pytrace=False)
    yield started
    started.discard()


def _flags(cluster: EtcdCluster) -> tuple[str, ...]:
    return ("--enhanced-locking-enabled", "--enhanced-locking-backend=etcd",
            f"--enhanced-locking-etcd-endpoints={','.join(cluster.endpoints)}",
            "--enhanced-locking-priority-queue", "--enhanced-locking-max-timeout=1m",
            "--enhanced-locking-fallback=fail-closed", "--enhanced-locking-legacy-backend=memory")


@pytest.fixture
def replicas(cluster: EtcdCluster, tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    with services() as group:
        yield group.start_all([ServiceProcess(tmp_path / f"replica-{n}", args=_flags(cluster),
                                              log_dir=tmp_path / "logs") for n in range(2)])


def _body(path: str, pull: int) -> dict[str, Any]:
    return {"project": {"repoFullName": REPO, "path": path, "projectName": path},
            "pull": {"num": pull}, "user": {"username": f"user-{pull}"},
            "wait": "5s", "ttl": "3s", "priority": random.choice(["low", "normal", "high"])}


async def _client(number: int, urls: list[str], history: History, stop: asyncio.Event,
                  seen: collections.Counter[str]) -> None:
    """Lock, hold a moment, release; on a dead replica, carry on with the other one."""
    rng = random.Random(number)
    pull, name = 3000 + number, f"client-{number}"
    preferred = number % len(urls)
    async with contextlib.AsyncExitStack() as stack:
        https = [await stack.enter_async_context(httpx.AsyncClient(base_url=u, timeout=30))
                 for u in urls]
        while not stop.is_set():
            http = https[preferred]
            try:
                answer = await http.post("/v1/locks", json=_body(rng.choice("abcd"), pull))
            except httpx.TransportError:
                seen["replica unreachable"] += 1
                preferred = (preferred + 1) % len(urls)
                await asyncio.sleep(0.05)
                continue
            if answer.status_code != 200:
                reason = answer.json().get("reason") if answer.status_code == 409 else None
                seen[f"refused {reason or answer.status_code}"] += 1
                await asyncio.sleep(0.02)
                continue
            lock = answer.json()["lock"]
            start, now = time.monotonic(), datetime.now(UTC)
            # The lock's lease (3 s) ends at its expiresAt, released or not: a grant whose
            # answer came late (its commit or its waiter's notice waited out a leader
            # election) is held until then only; the key may go on from that moment.
            expires_at = datetime.fromisoformat(lock["expiresAt"])
            lease_end = start + (expires_at - now).total_seconds()
            await asyncio.sleep(rng.uniform(0, 0.004))
            history.record(Hold(name, lock["key"], lock["fencingToken"], start,
                                time.monotonic(), lease_end=lease_end,
                                granted_at=datetime.fromisoformat(lock["acquiredAt"])))
            seen["granted"] += 1
            # Release through whichever replica is up: a release lost with a dead replica
            # would leave the pull holding the key, and its next acquire of that key would
            # get the same lock back (the holder's own pull asking again), not a new grant.
            for _ in range(100):
                try:
                    released = await https[preferred].delete(
                        "/v1/locks/by-key", params={"key": lock["key"], "pull": pull})
                except httpx.TransportError:
                    seen["replica unreachable"] += 1
                    preferred = (preferred + 1) % len(urls)
                    await asyncio.sleep(0.05)
                    continue
                if released.status_code in (200, 404):
                    break
                seen["release retried"] += 1
                await asyncio.sleep(0.05)


async def _chaos(cluster: EtcdCluster, replica: ServiceProcess,
                 kills: list[tuple[float, str]]) -> None:
    """Kill the etcd leader every few seconds (back a second later), until the load has run
    ``LOAD_SECONDS - RECOVERY`` and the leader was killed ``LEADER_KILLS`` times; a replica
    once, midway. The kills are counted, not fitted in a fixed window: on a busy machine a
    member's restart and the election after it take longer, and a window held fewer kills.
    A moment with no leader (an election still on) is tried again shortly."""
    began = time.monotonic()
    replica_killed = False
    leader_kills = 0
    pause = KILL_EVERY
    while time.monotonic() - began < LOAD_SECONDS - RECOVERY or leader_kills < LEADER_KILLS:
        if time.monotonic() - began > CHAOS_WITHIN:
            return  # the test's count of kills says what went wrong
        await asyncio.sleep(pause)
        leader = await asyncio.to_thread(cluster.leader)
        if leader is None:
            pause = 0.5
            continue
        pause = KILL_EVERY
        await asyncio.to_thread(cluster.kill, leader)
        kills.append((time.monotonic(), f"etcd leader {leader.name}"))
        leader_kills += 1
        if not replica_killed and leader_kills > LEADER_KILLS // 2:
            await asyncio.to_thread(replica.kill)
            kills.append((time.monotonic(), "service replica"))
            replica_killed = True
        await asyncio.sleep(1.0)
        await asyncio.to_thread(cluster.start_member, leader)


async def test_leader_kills_and_a_replica_kill_never_grant_a_lock_twice(
    cluster: EtcdCluster, replicas: list[ServiceProcess],
) -> None:
    history, seen, stop = History(), collections.Counter[str](), asyncio.Event()
    kills: list[tuple[float, str]] = []
    urls = [r.url for r in replicas]
    clients = [asyncio.create_task(_client(n, urls, history, stop, seen))
               for n in range(CLIENTS)]
    chaos = asyncio.create_task(_chaos(cluster, replicas[0], kills))
    await asyncio.wait_for(chaos, CHAOS_WITHIN + 30)
    await asyncio.sleep(RECOVERY)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*clients), 60)

    problems = history.violations()
    assert not problems, "\n".join(problems[:20])
    leader_kills = [t for t, what in kills if what.startswith("etcd leader")]
    assert len(leader_kills) >= 5, kills
    assert any(what == "service replica" for _, what in kills), kills
    assert len(history.holds) > 100, dict(seen)
    # Grants go on after the last leader kill: the cluster and the survivor recovered.
    assert any(h.start > leader_kills[-1] + 2 for h in history.holds), dict(seen)
    print(f"\n{len(history.holds)} grants ({len(history.lapsed_on_arrival())} answered after "
          f"their lease had ended), {len(leader_kills)} leader kills; {dict(seen)}")
