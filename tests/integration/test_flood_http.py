"""A flood of waiting acquires over HTTP, on every store, with the default settings.

1,500 clients ask at once, each on a connection of its own, for one of a few keys that are
held when they arrive, with waits of 50 ms, 3 s and 20 s, against the real ``enhanced-locking
serve`` process: on the embedded store, on etcd, on Redis, and through the router of a
migration at weight 50 (Redis the enhanced store, the fall-back to legacy on). Each is
answered granted in its turn (it then releases) or ``timeout`` at the end of its wait, and
nothing else (the checks also take ``503 overloaded`` with ``Retry-After``, and ``held`` on
a key routed to legacy, which ignores ``wait``, for the stores and modes where those are
honest answers): not ``unavailable``, no other 5xx. A hundred more clients wait on a key held
throughout and hang up while they wait; once its holder releases, the key is free (no grant
was made to a client already gone). At the end no lock is held, no queue holds a waiter, and
the server has given back the descriptors it opened for the flood. The history checker finds
no key granted twice and the tokens rising.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import ServiceFactory
from tests.history import History, Hold
from tests.support import raw_http
from tests.support.etcd_server import EtcdCluster
from tests.support.locks import lock_body
from tests.support.redis_server import RedisServer, RedisServerError
from tests.support.service import LOOPBACK, ServiceProcess

from enhanced_locking.hashing import bucket_of, is_enhanced_bucket

pytestmark = pytest.mark.timeout(240)

REPO = "acme/flood"
PATHS = ("net", "dns", "db", "iam", "vpc")
WAITERS = 1500
WAITS = ("50ms", "3s", "20s")
LEAVERS = 100
GONE_PATH = "left"
"""The key the leavers wait on: held from the start until every leaver has hung up."""
CLEAN_UP = 32
"""Seconds after the last answer by which every waiter left behind is withdrawn (the longest
wait, 20 s, plus 10 s)."""
HOLD_FIRST = 1.0
"""Seconds the first holders keep the flood's keys, so every waiter queues first."""


def _key(path: str) -> str:
    return f"{REPO}/{path}/default/{path}"


def _body(pull: int, path: str, *, wait: str | None) -> dict[str, Any]:
    return lock_body(REPO, path, pull, user=f"user{pull}",
                     **({} if wait is None else {"wait": wait}))


def _rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) // 1024


def _descriptors(pid: int, port: int) -> tuple[int, int]:
    """The server's open descriptors: its HTTP connections (sockets on ``port``, the
    listening one included), and all the others (its store's connections, files)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    http = 0
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[9] in inodes and int(fields[1].rpartition(":")[2], 16) == port:
                    http += 1
    return http, len(inodes) - http


class Flood:
    """What the flood's clients were answered."""

    def __init__(self) -> None:
        self.history = History()
        self.answers: collections.Counter[str] = collections.Counter()
        self.odd: list[str] = []
        """Every answer that is not granted or ``timeout``, in a line each."""

    def odd_answer(self, pull: int, wait: str, response: httpx.Response) -> None:
        self.odd.append(f"pull {pull} (wait {wait}): HTTP {response.status_code} "
                        f"{dict(response.headers)} {response.text[:300]}")


class Target:
    """Where the flood's requests go: the service's loopback address."""

    def __init__(self, port: int) -> None:
        self.host, self.port = LOOPBACK, port

    async def acquire(self, pull: int, path: str, wait: str, *,
                      give_up: float | None = None) -> httpx.Response | None:
        return await raw_http.request(self.host, self.port, "POST", "/v1/locks",
                                      _body(pull, path, wait=wait), give_up=give_up)

    async def release(self, key: str, pull: int) -> httpx.Response:
        """The release's answer; one answered ``overloaded`` is sent again after its
        ``Retry-After`` (what a client does: nothing of it was done), up to 60 times."""
        query = urllib.parse.urlencode({"key": key, "pull": pull})
        for _ in range(60):
            answer = await raw_http.request(self.host, self.port, "DELETE",
                                            f"/v1/locks/by-key?{query}")
            assert answer is not None
            if answer.status_code != 503 or answer.json().get("reason") != "overloaded":
                return answer
            await asyncio.sleep(float(answer.headers["retry-after"]))
        raise AssertionError(f"{key}: the release was answered overloaded 60 times")


async def _waiter(target: Target, pull: int, path: str, wait: str, flood: Flood) -> None:
    response = await target.acquire(pull, path, wait)
    assert response is not None
    arrived = time.monotonic()
    reason = response.json().get("reason") if response.status_code in (409, 503) else None
    if reason == "timeout" and response.status_code == 409:
        flood.answers[f"timeout {wait}"] += 1
        flood.history.refusals["timeout"] += 1
        return
    if reason == "held" and response.json()["holder"]["backend"] == "legacy":
        # A key routed to legacy: the legacy locker ignores ``wait``, as Atlantis does.
        flood.answers[f"held legacy {path}"] += 1
        return
    if (reason == "overloaded" and response.status_code == 503
            and response.headers.get("retry-after") == "1"):
        flood.answers["overloaded 503"] += 1  # (to be sent again: nothing of it is left)
        return
    if response.status_code != 200:
        flood.answers[f"{response.status_code} {response.json().get('reason')}"] += 1
        flood.odd_answer(pull, wait, response)
        return
    lock = response.json()["lock"]
    flood.answers[f"granted {lock['backend']}"] += 1
    await asyncio.sleep(0.005)
    end = time.monotonic()
    if lock["backend"] == "enhanced":  # (legacy's locks carry no fencing token)
        flood.history.record(Hold(f"pull-{pull}", lock["key"], lock["fencingToken"], arrived,
                                  end))
    released = await target.release(lock["key"], pull)
    if released.status_code != 200:
        flood.odd.append(f"pull {pull}: release answered {released.status_code} "
                         f"{released.text[:300]}")


async def _leaver(target: Target, pull: int, after: float, flood: Flood) -> None:
    """Wait on the key held throughout, and hang up after ``after`` seconds (an answer
    before then is odd: the key is held, and the wait is longer)."""
    response = await target.acquire(pull, GONE_PATH, "20s", give_up=after)
    if response is None:
        flood.answers["left"] += 1
        return
    flood.answers[f"leaver {response.status_code}"] += 1
    flood.odd_answer(pull, "20s", response)


async def _flood(served: ServiceProcess, paths: Sequence[str] = PATHS,
                 ) -> tuple[Flood, dict[str, Any]]:
    assert served.process is not None
    url, pid, port = served.url, served.process.pid, served.port
    flood = Flood()
    target = Target(port)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0)) as http:
        for path in (*paths, GONE_PATH):
            held = await http.post("/v1/locks", json=_body(1, path, wait=None))
            assert held.status_code == 200, held.text
        before = _descriptors(pid, port)
        rss_before = _rss_mb(pid)
        rng = random.Random(15)
        started = time.monotonic()
        tasks = [asyncio.ensure_future(_waiter(target, 1000 + n, paths[n % len(paths)],
                                               WAITS[n % len(WAITS)], flood))
                 for n in range(WAITERS)]
        leavers = [asyncio.ensure_future(_leaver(target, 5000 + n, rng.uniform(0.2, 4.0), flood))
                   for n in range(LEAVERS)]
        await asyncio.sleep(HOLD_FIRST)
        for path in paths:
            released = await target.release(_key(path), 1)
            assert released.status_code == 200, released.text
        await asyncio.wait_for(asyncio.gather(*leavers), timeout=60)
        await asyncio.sleep(0.5)  # the last hang-ups reach the server
        released = await target.release(_key(GONE_PATH), 1)
        assert released.status_code == 200, released.text
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
        took = time.monotonic() - started
        # A waiter its caller no longer waits for (an answer lost to the store, a client
        # gone) is withdrawn by the service within its wait plus 10 s.
        for _ in range(CLEAN_UP * 2):
            await asyncio.sleep(0.5)
            left = (await http.get("/v1/locks", params={"repo": REPO})).json()["locks"]
            queues = {path: (await http.get("/v1/queue", params={"key": _key(path)})).json()
                      for path in (*paths, GONE_PATH)}
            if not left and all(q.get("waiters") == [] for q in queues.values()):
                break
        cleared = time.monotonic() - started - took
    # The flood's connections are closed; the server closes its ends as it reads the FINs.
    for _ in range(50):
        if _descriptors(pid, port)[0] <= before[0]:
            break
        await asyncio.sleep(0.2)
    report = {"took": round(took, 1), "cleared after": round(cleared, 1),
              "descriptors before": before,
              "descriptors after": _descriptors(pid, port),
              "rss MB": (rss_before, _rss_mb(pid)),
              "left": [lock["key"] for lock in left],
              "queued": {path: [w.get("pull") for w in q.get("waiters", [q])]
                         for path, q in queues.items() if q.get("waiters") != []}}
    return flood, report


def _assert_clean(flood: Flood, report: dict[str, Any], *, sides: Sequence[str] = ("enhanced",),
                  legacy_paths: Sequence[str] = ()) -> None:
    """``legacy_paths``: the flood's keys routed to legacy (they answer ``held`` at once);
    the others are served on the enhanced side, in their turn, each at least 20 times."""
    summary = f"{dict(flood.answers)}; {report}"
    assert not flood.odd, f"{summary}\n" + "\n".join(flood.odd[:15])
    assert flood.answers["left"] == LEAVERS, summary
    assert {answer.split()[0] for answer in flood.answers} <= {
        "granted", "timeout", "left", "held", "overloaded"}, summary
    assert {answer.split()[1] for answer in flood.answers
            if answer.startswith("granted")} <= set(sides), summary
    assert {answer.split()[2] for answer in flood.answers
            if answer.startswith("held")} <= set(legacy_paths), summary
    assert sum(n for answer, n in flood.answers.items() if answer != "left") == WAITERS, summary
    assert report["left"] == [], summary
    assert report["queued"] == {}, summary
    (http_before, others_before), (http_after, others_after) = (
        report["descriptors before"], report["descriptors after"])
    assert http_after <= http_before, summary
    # The pools may have opened their connections: on Redis the store's, the events' and the
    # audit trail's, at most ``redis-pool-size`` (50) each.
    assert others_after <= others_before + 3 * 50 + 5, summary
    # The 50 ms waiters time out; the 20 s ones are served in their turn, by hundreds.
    queued = len(PATHS) - len(legacy_paths)
    assert sum(n for answer, n in flood.answers.items()
               if answer.startswith("granted")) >= queued * 20, summary
    flood.history.assert_consistent(min_holds=queued * 20)


def _serve(service_process: ServiceFactory, *flags: str) -> ServiceProcess:
    return service_process("--enhanced-locking-enabled", *flags)


async def test_a_flood_over_http_on_the_embedded_store(service_process: ServiceFactory) -> None:
    flood, report = await _flood(_serve(service_process))
    _assert_clean(flood, report)


@pytest.mark.etcd
async def test_a_flood_over_http_on_etcd(service_process: ServiceFactory,
                                         etcd_cluster: EtcdCluster, etcd_prefix: str) -> None:
    flood, report = await _flood(_serve(
        service_process, "--enhanced-locking-backend=etcd",
        f"--enhanced-locking-etcd-endpoints={','.join(etcd_cluster.endpoints)}",
        f"--enhanced-locking-etcd-key-prefix={etcd_prefix}"))
    _assert_clean(flood, report)


@pytest.fixture
def plain_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, without the ``redis_server`` fixture's watch of
    every command (``MONITOR``, for Redis Cluster's key rule, which the Redis tests check
    elsewhere): under a flood the watch made each script call cost Redis about six times
    as much (900 against 140 µs a call), and reading its log back took 20-35 s."""
    server = RedisServer(tmp_path / "redis")
    try:
        server.start()
    except RedisServerError as error:
        pytest.fail(str(error), pytrace=False)
    yield server
    server.close()


@pytest.mark.redis
async def test_a_flood_over_http_on_redis(service_process: ServiceFactory,
                                          plain_redis: RedisServer) -> None:
    flood, report = await _flood(_serve(
        service_process, "--enhanced-locking-backend=redis",
        f"--enhanced-locking-redis-addr={plain_redis.addr}"))
    _assert_clean(flood, report)


ROUTED_LEGACY = ("net", "iam", "vpc")
"""The flood's keys a weight of 50 routes to legacy (their buckets are 50 and up; ``dns``,
``db`` and the leavers' ``left`` route to enhanced)."""


@pytest.mark.redis
async def test_a_flood_over_http_through_the_router_at_weight_50(
        service_process: ServiceFactory, plain_redis: RedisServer) -> None:
    """A migration half way, the fall-back to legacy on: the keys routed to enhanced (on
    Redis) are served in their turn or time out; those routed to legacy answer ``held`` at
    once, as Atlantis does."""
    assert {path for path in (*PATHS, GONE_PATH)
            if not is_enhanced_bucket(bucket_of(_key(path)), 50)} == set(ROUTED_LEGACY)
    flood, report = await _flood(_serve(
        service_process, "--enhanced-locking-backend=redis",
        f"--enhanced-locking-redis-addr={plain_redis.addr}",
        "--enhanced-locking-migration-weight=50", "--enhanced-locking-fallback=legacy"))
    _assert_clean(flood, report, sides=("enhanced", "legacy"), legacy_paths=ROUTED_LEGACY)
