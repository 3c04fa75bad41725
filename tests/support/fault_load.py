"""Many clients over several ``enhanced-locking serve`` replicas while a fault strikes.

Each client locks one of a few keys (waiting a few seconds, or not at all), holds it a moment
and releases it, over and over, as ``tests/history.py``'s clients do, but as a client that
lives through faults: a replica that refuses the connection is left for the next one, a
release is sent again (to any replica) until it is answered 200 or 404, and an acquire that
was answered ``unavailable`` or got no answer at all may have been granted all the same, so
the client releases its pull's locks on the way out (as Atlantis does when a pull request
closes). Every hold it was answered is recorded for the history checker: from the answer's
arrival to just before its release was sent.

:func:`run_under` runs the clients, then the fault (a coroutine given the replicas), then the
clients on for a while after it; :func:`assert_recovered` checks what a fault must leave:
every replica grants again, and once every client released its pull, no lock is held and no
key has a waiter.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from tests.history import History, Hold
from tests.support.service import ServiceProcess, Services

__all__ = ["Run", "assert_recovered", "frozen_for", "killed_and_started", "replicas_on",
           "report", "run_under"]

PATHS = ("a", "b", "c", "d")
MIN_HOLDS = 60
"""Grants a run records at least (unless the service stops granting): the checker's verdict
is over that many."""


@dataclass
class Run:
    """What the clients saw: the holds, what they were told, and which replica granted."""

    repo: str
    history: History = field(default_factory=History)
    seen: collections.Counter[str] = field(default_factory=collections.Counter)
    granted_by: collections.Counter[str] = field(default_factory=collections.Counter)
    """Grants answered by each replica (its URL) after the fault ended."""
    fault_ended: float = float("inf")
    left_held: list[str] = field(default_factory=list)
    """Locks a client's last release of its pull found held: granted to it though it was
    never answered so (every lock it was answered it had released)."""

    def key(self, path: str) -> str:
        return f"{self.repo}/{path}/default/{path}"


def _project(repo: str, path: str) -> dict[str, str]:
    return {"repoFullName": repo, "path": path, "projectName": path}


def _body(repo: str, paths: Sequence[str], pull: int, rng: random.Random, *,
          ttl: str | None, request_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "pull": {"num": pull}, "user": {"username": f"user-{pull}"},
        "priority": rng.choice(["low", "normal", "high"])}
    if len(paths) == 1:
        body["project"] = _project(repo, paths[0])
    else:
        body["locks"] = [{"project": _project(repo, p)} for p in paths]
    if rng.random() < 0.8:
        body["wait"] = "3s"
        body["requestId"] = request_id
    if ttl is not None:
        body["ttl"] = ttl
    return body


async def _release(https: Sequence[httpx.AsyncClient], first: int, key: str, pull: int,
                   run: Run) -> None:
    """Until a replica answers the release 200 (or 404: a release sent before may have been
    made with its answer lost, or a lease ended it)."""
    for attempt in range(10_000):
        http = https[(first + attempt) % len(https)]
        try:
            answer = await http.delete("/v1/locks/by-key", params={"key": key, "pull": pull})
        except httpx.TransportError:
            run.seen["release: no answer"] += 1
            await asyncio.sleep(0.05)
            continue
        if answer.status_code in (200, 404):
            run.seen[f"release {answer.status_code}"] += 1
            return
        run.seen[f"release {answer.status_code}"] += 1
        await asyncio.sleep(0.05)


def _hold(name: str, lock: dict[str, Any], sent: float, start: float, end: float) -> Hold:
    lease_end = None
    if lock.get("expiresAt"):
        # The store granted after the request was sent: the lease ends no sooner than its
        # length after that.
        lease_end = sent + (datetime.fromisoformat(lock["expiresAt"])
                            - datetime.fromisoformat(lock["acquiredAt"])).total_seconds()
    return Hold(name, lock["key"], lock["fencingToken"], start, end,
                granted_at=datetime.fromisoformat(lock["acquiredAt"]), lease_end=lease_end)


async def _client(number: int, https: Sequence[httpx.AsyncClient], run: Run,
                  stop: asyncio.Event, ttl: str | None) -> None:
    rng = random.Random(number)
    pull, name = 3000 + number, f"client-{number}"
    home = number % len(https)
    for round_ in itertools.count():
        if stop.is_set():
            break
        paths = rng.sample(PATHS, 2) if rng.random() < 0.2 else [rng.choice(PATHS)]
        body = _body(run.repo, paths, pull, rng, ttl=ttl, request_id=f"{name}-{round_}")
        route = "/v1/locks" if len(paths) == 1 else "/v1/locks/batch"
        answer, http = None, https[home]
        sent = time.monotonic()
        # Its own replica first; a replica that is gone or cut the answer off, the next, with
        # the same request (and request id: a retry that takes its waiter over).
        for shift in range(len(https)):
            http = https[(home + shift) % len(https)]
            sent = time.monotonic()
            try:
                answer = await http.post(route, json=body)
                break
            except httpx.TransportError as error:
                run.seen[f"acquire: {type(error).__name__}"] += 1
        if answer is None:
            await asyncio.sleep(0.05)
            continue
        if answer.status_code != 200:
            reason = answer.json().get("reason") if answer.status_code in (409, 503) else None
            run.seen[f"refused {reason or answer.status_code}"] += 1
            await asyncio.sleep(0.02)
            continue
        locks = answer.json()["locks"] if len(paths) > 1 else [answer.json()["lock"]]
        start = time.monotonic()
        if start > run.fault_ended:
            run.granted_by[str(http.base_url)] += 1
        await asyncio.sleep(rng.uniform(0, 0.004))
        end = time.monotonic()
        for lock in locks:
            run.history.record(_hold(name, lock, sent, start, end))
        for lock in locks:
            await _release(https, home, lock["key"], pull, run)
    # What an answer that never came (or said `unavailable`) may have left held: the pull's.
    for attempt in range(10_000):
        http = https[(home + attempt) % len(https)]
        try:
            answer = await http.delete("/v1/locks/by-pull",
                                       params={"repo": run.repo, "pull": pull})
        except httpx.TransportError:
            await asyncio.sleep(0.05)
            continue
        if answer.status_code == 200 and "unavailable" not in answer.json():
            for lock in answer.json()["released"]:
                run.left_held.append(f"{name}: {lock['key']} (token {lock['fencingToken']})")
            return
        await asyncio.sleep(0.05)


async def run_under(replicas: Sequence[ServiceProcess], repo: str,
                    fault: Callable[[], Awaitable[None]], *, clients: int = 24,
                    before: float = 1.5, after: float = 3.0, ttl: str | None = None,
                    enough_after: int = 20, within: float = 30.0) -> Run:
    """``clients`` clients spread over ``replicas`` run ``before`` seconds, then ``fault``
    (they go on meanwhile), then at least ``after`` seconds more and until ``enough_after``
    grants came after it and :data:`MIN_HOLDS` in all (counted, not timed: a loaded machine
    grants fewer a second; at most ``within`` seconds more); every client then releases its
    pull."""
    run, stop = Run(repo), asyncio.Event()
    https = [httpx.AsyncClient(base_url=r.url, timeout=httpx.Timeout(30.0))
             for r in replicas]
    try:
        tasks = [asyncio.create_task(_client(n, https, run, stop, ttl))
                 for n in range(clients)]
        await asyncio.sleep(before)
        await fault()
        run.fault_ended = time.monotonic()
        await asyncio.sleep(after)
        give_up = time.monotonic() + within
        for _ in range(int(within / 0.1)):
            holds = run.history.holds
            if time.monotonic() > give_up or (
                    len(holds) >= MIN_HOLDS
                    and sum(h.start > run.fault_ended for h in holds) >= enough_after):
                break
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        for http in https:
            await http.aclose()
    return run


async def assert_recovered(run: Run, replicas: Sequence[ServiceProcess]) -> None:
    """No key granted twice and no token falling; every replica granted after the fault; and
    with every pull released, no lock held and no waiter left on any key (as every replica
    sees it)."""
    run.history.assert_consistent(min_holds=MIN_HOLDS)
    for replica in replicas:
        assert run.granted_by[replica.url] > 0, (
            f"{replica.url} granted nothing after the fault: {dict(run.granted_by)} "
            f"{dict(run.seen)}")
    for replica in replicas:
        async with httpx.AsyncClient(base_url=replica.url, timeout=10) as http:
            deadline = time.monotonic() + 15
            while True:
                locks = (await http.get("/v1/locks", params={"repo": run.repo})).json()
                queues = {path: (await http.get("/v1/queue", params={"key": run.key(path)})
                                 ).json()["waiters"] for path in PATHS}
                if not locks["locks"] and not any(queues.values()):
                    break
                assert time.monotonic() < deadline, (
                    f"left behind, as {replica.url} sees it: {locks} {queues} {dict(run.seen)}")
                await asyncio.sleep(0.2)


def replicas_on(group: Services, root: Path, count: int, *store: str) -> list[ServiceProcess]:
    """``count`` serve processes on the store ``store`` (its flags) names, started in
    ``group`` side by side: fail-closed (an outage is answered ``unavailable``), priority
    queues."""
    return group.start_all([ServiceProcess(
        root / f"replica-{n}", log_dir=root / "logs",
        args=("--enhanced-locking-enabled", *store, "--enhanced-locking-priority-queue",
              "--enhanced-locking-max-timeout=1m", "--enhanced-locking-fallback=fail-closed",
              "--enhanced-locking-legacy-backend=memory"))
        for n in range(count)])


async def frozen_for(replica: ServiceProcess, seconds: float) -> None:
    """``replica`` stopped (SIGSTOP) for ``seconds``, its connections open, then let go."""
    assert replica.process is not None
    replica.process.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        replica.process.send_signal(signal.SIGCONT)


async def killed_and_started(replica: ServiceProcess) -> None:
    """``replica`` killed (SIGKILL) and, a second later, started again."""
    await asyncio.to_thread(replica.kill)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(replica.start)


def report(run: Run, *more: str) -> None:
    """What the run saw, for the test's output."""
    print(f"\n{len(run.history.holds)} grants; {dict(run.seen)}; granted after the fault: "
          f"{dict(run.granted_by)}; left held: {run.left_held}", *more)
