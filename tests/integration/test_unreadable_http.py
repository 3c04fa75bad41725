"""One unreadable stored lock does not take the service down: a real ``serve`` process on each
store (the SQLite file on either side, Redis, Atlantis's Redis layout, etcd) with one lock's
stored bytes replaced behind its back; on Redis and a Redis Cluster also with another Redis
type put where the lock's hash was (the scripts read it, and must not answer 500).

Over HTTP: lists and release by pull answer the other locks; the key itself answers 409
``unreadable`` (never 500, never its content); ``/metrics`` counts it; ``/readyz`` stays ready
and names it; an acquire on it is refused, waiting or not; a restart starts cleanly and finds
it again; a force-unlock clears it (an event says so) and the next acquire is granted with a
higher fencing token. On Redis, a key's fencing counter written over sets the key aside the
same way (``docs/03-redis.md``, "Keys written over by something else").
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from tests.conftest import ServiceFactory
from tests.support.etcd_fixtures import etcd_config
from tests.support.etcd_server import EtcdCluster
from tests.support.redis_cluster import RedisClusterNodes
from tests.support.redis_fixtures import redis_cluster_config, redis_config
from tests.support.redis_server import RedisServer
from tests.support.service import ServiceProcess
from tests.support.unreadable import REDIS_SPOILERS, SECRET, Spoiler, spoil, spoil_file

from enhanced_locking.backends.atlantis_redis import AtlantisRedisBackend
from enhanced_locking.backends.base import Backend
from enhanced_locking.backends.etcd_store import EtcdBackend
from enhanced_locking.backends.redis_store import RedisBackend, RedisKeys

REPO = "acme/infra"
BAD, GOOD, OTHER = (f"{REPO}/envs/{name}/default/prod" for name in ("bad", "good", "other"))
RAW = f'{{"Project": {{"RepoFullName": "{SECRET}"}}, "Pull": {{"Num": "{SECRET}"}}}}'


def body(name: str, pull: int, **extra: Any) -> dict[str, Any]:
    return {"project": {"repoFullName": REPO, "path": f"envs/{name}", "projectName": "prod"},
            "pull": {"num": pull}, **extra}


@dataclass
class Store:
    """How a test runs the service on one store and spoils a lock in it."""

    side: str
    flags: tuple[str, ...]
    spoil: Callable[[str], Awaitable[None]]
    size: int = len(RAW)
    """The size of the bytes the store reports for the spoiled lock."""


async def _through(backend: Backend, key: str) -> None:
    try:
        await spoil(backend, key, RAW)
    finally:
        await backend.close()


def _boltdb(side: str) -> Callable[[pytest.FixtureRequest], Store]:
    def setup(request: pytest.FixtureRequest) -> Store:
        path = str(request.getfixturevalue("data_dir") / "enhanced-locking.db")

        async def spoil_it(key: str) -> None:
            spoil_file(path, side, key, RAW)

        flags = ("--enhanced-locking-enabled",) if side == "enhanced" else ()
        return Store(side, flags, spoil_it)
    return setup


def _redis(request: pytest.FixtureRequest) -> Store:
    server: RedisServer = request.getfixturevalue("redis_server")
    config = redis_config(server)
    return Store("enhanced", ("--enhanced-locking-enabled", "--enhanced-locking-backend=redis",
                              f"--enhanced-locking-redis-addr={server.addr}",
                              "--enhanced-locking-legacy-backend=memory"),
                 lambda key: _through(RedisBackend.from_config(config, "enhanced"), key))


async def _spoiled_by(backend: Backend, key: str, spoiler: Spoiler) -> None:
    try:
        await spoiler.run(backend, key)
    finally:
        await backend.close()


STRING_AT_LOCK_KEY = next(s for s in REDIS_SPOILERS if s.name == "string-at-lock-key")


def _redis_type(request: pytest.FixtureRequest) -> Store:
    """Another Redis type (a string) where the lock's hash was."""
    store = _redis(request)
    config = redis_config(request.getfixturevalue("redis_server"))
    return Store(store.side, store.flags, lambda key: _spoiled_by(
        RedisBackend.from_config(config, "enhanced"), key, STRING_AT_LOCK_KEY), size=0)


def _redis_cluster_type(request: pytest.FixtureRequest) -> Store:
    """The same on a Redis Cluster."""
    cluster: RedisClusterNodes = request.getfixturevalue("redis_cluster")
    prefix: str = request.getfixturevalue("redis_cluster_prefix")
    config = redis_cluster_config(cluster, prefix)
    return Store("enhanced", ("--enhanced-locking-enabled", "--enhanced-locking-backend=redis",
                              f"--enhanced-locking-redis-addr={cluster.addr}",
                              "--enhanced-locking-redis-cluster",
                              f"--enhanced-locking-redis-key-prefix={prefix}",
                              "--enhanced-locking-legacy-backend=memory"),
                 lambda key: _spoiled_by(RedisBackend.from_config(config, "enhanced"), key,
                                         STRING_AT_LOCK_KEY), size=0)


def _atlantis_redis(request: pytest.FixtureRequest) -> Store:
    server: RedisServer = request.getfixturevalue("redis_server")
    config = redis_config(server)
    return Store("legacy", ("--enhanced-locking-legacy-backend=redis",
                            f"--enhanced-locking-redis-addr={server.addr}"),
                 lambda key: _through(AtlantisRedisBackend.from_config(config, "legacy"), key))


def _etcd(request: pytest.FixtureRequest) -> Store:
    return _etcd_store(request.getfixturevalue("etcd_cluster"),
                       request.getfixturevalue("etcd_prefix"))


def _etcd_store(cluster: EtcdCluster, prefix: str) -> Store:
    config = etcd_config(cluster, prefix)
    return Store("enhanced", ("--enhanced-locking-enabled", "--enhanced-locking-backend=etcd",
                              f"--enhanced-locking-etcd-endpoints={','.join(cluster.endpoints)}",
                              f"--enhanced-locking-etcd-key-prefix={prefix}",
                              "--enhanced-locking-legacy-backend=memory"),
                 lambda key: _through(EtcdBackend.from_config(config, "enhanced"), key))


STORES = {
    "boltdb-enhanced": (_boltdb("enhanced"), ()),
    "boltdb-legacy": (_boltdb("legacy"), ()),
    "redis": (_redis, (pytest.mark.redis,)),
    "redis-string-at-lock-key": (_redis_type, (pytest.mark.redis,)),
    "redis-cluster-string-at-lock-key": (_redis_cluster_type, (pytest.mark.redis,)),
    "atlantis-redis": (_atlantis_redis, (pytest.mark.redis,)),
    "etcd": (_etcd, (pytest.mark.etcd,)),
}


@pytest.fixture(params=[pytest.param(name, marks=marks, id=name)
                        for name, (_, marks) in STORES.items()])
def store(request: pytest.FixtureRequest) -> Store:
    setup, _ = STORES[request.param]
    return setup(request)


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{wanted}}} is not in /metrics")


async def _events(http: httpx.AsyncClient, kind: str, count: int) -> list[str]:
    """The first ``count`` events of ``kind`` kept by the service, replayed from the oldest
    (a store shared with earlier tests, etcd's, keeps ids that start far above 0: its ``gap``
    names the oldest, and the replay starts just before it)."""
    after = "0-0"
    for _ in range(2):
        found: list[str] = []
        async with http.stream("GET", "/v1/events", params={"type": kind},
                               headers={"Last-Event-ID": after}) as stream:
            async for line in stream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = json.loads(line.removeprefix("data:"))
                if data.get("reason") == "replay" and data.get("oldest"):
                    first, _, _ = str(data["oldest"]).partition("-")
                    after = f"{int(first) - 1}-0"
                    break
                found.append(line)
                if len(found) == count:
                    return found
    raise AssertionError(f"the event stream ended before {count} {kind} events")


@pytest.fixture
async def http_of() -> AsyncIterator[Callable[[ServiceProcess], httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(service: ServiceProcess) -> httpx.AsyncClient:
        clients.append(httpx.AsyncClient(base_url=service.url, timeout=30))
        return clients[-1]

    yield make
    for client in clients:
        await client.aclose()


async def test_an_unreadable_lock_is_set_aside_reported_and_cleared_by_force_unlock(
    service_process: ServiceFactory, store: Store,
    http_of: Callable[[ServiceProcess], httpx.AsyncClient],
) -> None:
    service = service_process(*store.flags)
    http = http_of(service)
    held = {}
    for name, pull in (("bad", 1), ("good", 1), ("other", 2)):
        answer = await http.post("/v1/locks", json=body(name, pull))
        assert answer.status_code == 200, answer.text
        held[name] = answer.json()["lock"]
        assert held[name]["backend"] == store.side
    await store.spoil(BAD)

    # Reads: the rest is answered, the key itself says why it is not.
    listed = await http.get("/v1/locks")
    assert listed.status_code == 200, listed.text
    assert [lock["key"] for lock in listed.json()["locks"]] == [GOOD, OTHER]
    [entry] = listed.json()["unreadable"]
    assert entry["key"] == BAD and entry["side"] == store.side and entry["reason"]
    assert entry["size"] == store.size and len(entry["digest"]) == 16
    by_key = await http.get("/v1/locks/by-key", params={"key": BAD})
    assert by_key.status_code == 409, by_key.text
    assert by_key.json()["reason"] == "unreadable" and by_key.json()["lockKey"] == BAD
    assert "force-unlock" in by_key.json()["error"]
    assert (await http.get("/v1/locks/by-key", params={"key": GOOD})).status_code == 200
    metrics = await http.get("/metrics")
    assert metrics.status_code == 200
    assert metric(metrics.text, "enhanced_locking_unreadable_locks", backend=store.side) == 1
    ready = await http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert ready.json()["unreadable"] == {store.side: 1}
    assert [e["key"] for e in ready.json()["unreadableKeys"]] == [BAD]

    # Never granted over it, waiting or not; releases that cannot tell whose it is refuse.
    for extra in ({}, {"wait": "1s"}):
        refused = await http.post("/v1/locks", json=body("bad", 2, **extra))
        assert refused.status_code == 409, refused.text
        assert refused.json()["acquired"] is False and refused.json()["reason"] == "unreadable"
        assert "force-unlock" in refused.json()["error"]
    batch = await http.post("/v1/locks/batch", json={
        "locks": [{"project": body(n, 2)["project"]} for n in ("new", "bad")],
        "pull": {"num": 2}})
    assert batch.status_code == 409 and batch.json()["reason"] == "unreadable", batch.text
    assert (await http.get("/v1/locks/by-key", params={"key": f"{REPO}/envs/new/default/prod"}
                           )).status_code == 404, "a refused batch holds nothing"
    not_theirs = await http.delete("/v1/locks/by-key", params={"key": BAD, "pull": 2})
    assert not_theirs.status_code == 409 and not_theirs.json()["reason"] == "unreadable"
    by_pull = await http.delete("/v1/locks/by-pull", params={"repo": REPO, "pull": 2})
    assert by_pull.status_code == 200, by_pull.text
    assert [lock["key"] for lock in by_pull.json()["released"]] == [OTHER]

    every_answer = listed.text + by_key.text + ready.text + metrics.text + refused.text
    assert SECRET not in every_answer

    # A restart: no traceback, the start's scan finds it again.
    assert service.stop() == 0
    service.start()
    assert "Traceback" not in service.stderr()
    assert "cannot be read" in service.stderr() and SECRET not in service.output(limit=10**6)
    ready = await http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["unreadable"] == {store.side: 1}
    [found] = await _events(http, "lock-unreadable", 1)
    assert BAD in found and SECRET not in found

    # Force-unlock clears it; the next grant's fencing token is above the spoiled lock's.
    cleared = await http.post("/v1/admin/force-unlock", params={"key": BAD, "reason": "bad row"})
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["released"] is True and cleared.json()["lock"] is None
    assert cleared.json()["unreadable"]["key"] == BAD
    [gone] = await _events(http, "lock-unreadable-cleared", 1)
    assert BAD in gone
    ready = await http.get("/readyz")
    assert "unreadable" not in ready.json() and "unreadableKeys" not in ready.json()
    metrics = await http.get("/metrics")
    assert metric(metrics.text, "enhanced_locking_unreadable_locks", backend=store.side) == 0
    assert "unreadable" not in (await http.get("/v1/locks")).json()
    assert (await http.get("/v1/locks/by-key", params={"key": BAD})).status_code == 404
    again = await http.post("/v1/locks", json=body("bad", 2))
    assert again.status_code == 200, again.text
    assert again.json()["lock"]["fencingToken"] > held["bad"]["fencingToken"] or (
        store.side == "legacy")  # Atlantis's layout has no fencing tokens (all 0)
    assert service.stop() == 0
    assert "Traceback" not in service.stderr()


async def test_a_service_started_on_a_store_with_an_unreadable_lock_serves_the_others(
    service_process: ServiceFactory, data_dir: Any,
    http_of: Callable[[ServiceProcess], httpx.AsyncClient],
) -> None:
    """Spoiled while it was down (bytes that are not even text): the start's scans (the one
    that moves uncleaned keys, the lease timers') skip it and the service comes up."""
    service = service_process("--enhanced-locking-enabled")
    http = http_of(service)
    for name in ("bad", "good"):
        assert (await http.post("/v1/locks", json=body(name, 1))).status_code == 200
    assert service.stop() == 0
    path = str(data_dir / "enhanced-locking.db")
    spoil_file(path, "enhanced", BAD, "\x00\xff not text")
    service.start()
    assert "Traceback" not in service.stderr()
    assert [lock["key"] for lock in (await http.get("/v1/locks")).json()["locks"]] == [GOOD]
    ready = (await http.get("/readyz")).json()
    assert ready["ready"] is True and ready["unreadable"] == {"enhanced": 1}
    assert (await http.post("/v1/locks", json=body("bad", 2))).json()["reason"] == "unreadable"


@pytest.mark.redis
async def test_a_fencing_counter_written_over_sets_its_key_aside_over_http(
    service_process: ServiceFactory, redis_server: RedisServer,
    http_of: Callable[[ServiceProcess], httpx.AsyncClient],
) -> None:
    """A key's fencing counter in Redis replaced by something that is not a number: an acquire
    of the key answers 409 ``unreadable`` (never 500, never a grant with a lower token), waiting
    or not; the key is listed and counted as unreadable; every other key is served; a
    force-unlock restarts the counter from the clock and the next grant is above it."""
    flags = ("--enhanced-locking-enabled", "--enhanced-locking-backend=redis",
             f"--enhanced-locking-redis-addr={redis_server.addr}",
             "--enhanced-locking-legacy-backend=memory")
    service = service_process(*flags)
    http = http_of(service)
    assert (await http.post("/v1/locks", json=body("bad", 1))).status_code == 200
    freed = await http.delete("/v1/locks/by-key", params={"key": BAD, "pull": 1})
    assert freed.status_code == 200, freed.text
    keys = RedisKeys(redis_config(redis_server).redis_key_prefix, "enhanced")
    with redis_server.client() as admin:
        admin.delete(keys.fence(BAD))
        admin.hset(keys.fence(BAD), "token", SECRET)
    before_ms = int(time.time() * 1000)

    for extra in ({}, {"wait": "1s"}):
        refused = await http.post("/v1/locks", json=body("bad", 2, **extra))
        assert refused.status_code == 409, refused.text
        assert refused.json()["reason"] == "unreadable"
        assert "force-unlock" in refused.json()["error"]
    listed = await http.get("/v1/locks")
    [entry] = listed.json()["unreadable"]
    assert entry["key"] == BAD and "fencing counter" in entry["reason"]
    metrics = await http.get("/metrics")
    assert metric(metrics.text, "enhanced_locking_unreadable_locks", backend="enhanced") == 1
    assert (await http.get("/readyz")).json()["ready"] is True
    good = await http.post("/v1/locks", json=body("good", 2))
    assert good.status_code == 200, good.text
    assert SECRET not in refused.text + listed.text + metrics.text

    cleared = await http.post("/v1/admin/force-unlock", params={"key": BAD, "reason": "bad row"})
    assert cleared.status_code == 200, cleared.text
    again = await http.post("/v1/locks", json=body("bad", 2))
    assert again.status_code == 200, again.text
    assert again.json()["lock"]["fencingToken"] >= before_ms * 1000
    assert "unreadable" not in (await http.get("/v1/locks")).json()
    assert service.stop() == 0
    assert "Traceback" not in service.stderr() and SECRET not in service.output(limit=10**6)


@pytest.mark.etcd
async def test_a_token_floor_written_over_sets_its_key_aside_over_http_on_etcd(
    service_process: ServiceFactory, etcd_cluster: EtcdCluster, etcd_prefix: str,
    http_of: Callable[[ServiceProcess], httpx.AsyncClient],
) -> None:
    """The same on etcd (``fence/{key}`` not a whole number): the key's acquire answers 409
    ``unreadable`` as Redis's does (before, a 500 of a bare ``ValueError``), waiting or not;
    the key is listed and counted as unreadable as on Redis (before, neither); every other key
    is served; a force-unlock restarts the floor from the clock and the next
    grant is above every token the key had."""
    store = _etcd_store(etcd_cluster, etcd_prefix)
    service = service_process(*store.flags)
    http = http_of(service)
    first = await http.post("/v1/locks", json=body("bad", 1))
    assert first.status_code == 200, first.text
    freed = await http.delete("/v1/locks/by-key", params={"key": BAD, "pull": 1})
    assert freed.status_code == 200, freed.text
    admin = EtcdBackend.from_config(etcd_config(etcd_cluster, etcd_prefix), "enhanced")
    try:
        etcd = await admin.connection.client()
        assert etcd.kv is not None
        await etcd.kv.put(admin.fence_key(BAD), f"token={SECRET}".encode())
    finally:
        await admin.close()
    before_ms = int(time.time() * 1000)

    for extra in ({}, {"wait": "1s"}):
        refused = await http.post("/v1/locks", json=body("bad", 2, **extra))
        assert refused.status_code == 409, refused.text
        assert refused.json()["acquired"] is False and refused.json()["reason"] == "unreadable"
        assert refused.json()["lockKey"] == BAD and "force-unlock" in refused.json()["error"]
        assert "token floor" in refused.json()["error"]
    by_key = await http.get("/v1/locks/by-key", params={"key": BAD})
    assert by_key.status_code == 409 and by_key.json()["reason"] == "unreadable", by_key.text
    listed = await http.get("/v1/locks")
    [entry] = listed.json()["unreadable"]
    assert entry["key"] == BAD and "token floor" in entry["reason"]
    metrics = await http.get("/metrics")
    assert metric(metrics.text, "enhanced_locking_unreadable_locks", backend="enhanced") == 1
    good = await http.post("/v1/locks", json=body("good", 2))
    assert good.status_code == 200, good.text
    assert (await http.get("/readyz")).json()["ready"] is True
    assert SECRET not in refused.text + by_key.text + listed.text + metrics.text

    cleared = await http.post("/v1/admin/force-unlock", params={"key": BAD, "reason": "bad floor"})
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["unreadable"]["key"] == BAD
    assert (await http.get("/v1/locks/by-key", params={"key": BAD})).status_code == 404
    assert "unreadable" not in (await http.get("/v1/locks")).json()
    metrics = await http.get("/metrics")
    assert metric(metrics.text, "enhanced_locking_unreadable_locks", backend="enhanced") == 0
    again = await http.post("/v1/locks", json=body("bad", 2))
    assert again.status_code == 200, again.text
    assert again.json()["lock"]["fencingToken"] >= before_ms * 1000
    assert again.json()["lock"]["fencingToken"] > max(
        first.json()["lock"]["fencingToken"], good.json()["lock"]["fencingToken"])
    assert service.stop() == 0
    assert "Traceback" not in service.stderr() and SECRET not in service.output(limit=10**6)
