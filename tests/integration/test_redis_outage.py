"""What the service answers while its Redis is down: an outage is said as one (503), never as
"not held", and what the legacy fallback granted during it, legacy lists and releases.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from tests.conftest import ServiceMaker
from tests.support.leases import until
from tests.support.locks import candidate_for, lock_body, lock_for, request_for
from tests.support.redis_fixtures import ServerMaker
from tests.support.redis_server import RedisServer
from tests.support.service import ServiceProcess, running

from enhanced_locking.api import create_app
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.backends.waiting import QueuePolicy, Status, Wait
from enhanced_locking.types import BackendUnavailable, LockRequest, Project, Pull

pytestmark = pytest.mark.redis

REPO = "acme/outage"


def ask(path: str, pull: int, **extra: object) -> LockRequest:
    return LockRequest(project=Project(repo_full_name=REPO, path=path), pull=Pull(num=pull),
                       **extra)


async def test_a_refresh_while_redis_is_down_is_an_outage_not_a_free_key(
    make_service: ServiceMaker, redis_server: RedisServer,
) -> None:
    service = await make_service(enabled=True, backend="redis", redis_addr=redis_server.addr)
    granted = await service.router.acquire(ask("a", 1, ttl=timedelta(minutes=1)))
    assert granted.acquired and granted.lock is not None
    redis_server.stop()
    with pytest.raises(BackendUnavailable):
        await service.router.refresh(granted.lock_key, owner=(REPO, 1),
                                     ttl=timedelta(minutes=5))
    transport = httpx.ASGITransport(app=create_app(service, manage_lifecycle=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
        answer = await http.post("/v1/locks/refresh",
                                 json={"key": granted.lock_key, "pull": 1, "ttl": "5m"})
    assert answer.status_code == 503, answer.text
    assert answer.json()["reason"] == "unavailable"


@pytest.fixture
def backend(redis_backend: RedisBackend) -> RedisBackend:
    """A backend on ``redis_server`` that has called it once (its connection is open)."""
    return redis_backend


async def test_a_call_redis_takes_and_never_answers_says_it_ran_out_its_time(
    redis_server: RedisServer, backend: RedisBackend,
) -> None:
    # The server is stopped (SIGSTOP) with the connection open: the call is sent and no
    # answer comes. The caller is told the call had no answer within its limit, not a bare
    # "TimeoutError".
    with redis_server.paused(), pytest.raises(BackendUnavailable) as caught:
        await backend.acquire(lock_for(request_for(pull=1)))
    message = str(caught.value)
    where = re.escape(backend.connection.where)
    assert re.fullmatch(rf"redis {where} did not answer \([a-z ]*acquire\): no answer "
                        r"within the call's 5 s limit", message), message
    assert caught.value.key == request_for().key


async def test_a_caller_s_own_cancellation_stays_one_and_a_call_s_limit_leaves_none_behind(
    redis_server: RedisServer, backend: RedisBackend,
) -> None:
    # A call's limit cancels the call and says so as a timeout; a caller that cancels its own
    # call while Redis does not answer gets its cancellation, not a timeout; after a call ran
    # out its time, the caller's task carries no cancellation of it (its next await runs).
    with redis_server.paused():
        call = asyncio.create_task(backend.acquire(lock_for(request_for(pull=1))))
        await asyncio.sleep(0.3)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        with pytest.raises(BackendUnavailable, match="within the call's 5 s limit"):
            await backend.acquire(lock_for(request_for(pull=1)))
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0.01)  # not cancelled
    granted, lock = await backend.acquire(lock_for(request_for(pull=1)))
    assert granted and lock.pull.num == 1


async def test_a_redis_out_of_memory_or_busy_is_an_outage_not_an_error(
    redis_server: RedisServer, backend: RedisBackend,
) -> None:
    # OOM (maxmemory reached) and BUSY (a script past its time limit) are Redis refusing to
    # serve: BackendUnavailable (503, the fallback), not a bare ResponseError (a 500).
    granted, lock = await backend.acquire(lock_for(request_for(pull=1)))
    assert granted
    admin = redis_server.client()
    admin.config_set("maxmemory", "1")
    try:
        for call in (backend.acquire(lock_for(request_for(pull=2))),
                     backend.release(lock.key), backend.list()):
            with pytest.raises(BackendUnavailable, match="OutOfMemoryError"):
                await call
    finally:
        admin.config_set("maxmemory", "0")
    admin.config_set("busy-reply-threshold", "50")
    busy = asyncio.get_running_loop().run_in_executor(None, redis_server.client().eval, (
        "local t = redis.call('TIME')[1] + 2 "
        "while tonumber(redis.call('TIME')[1]) < t do end"), 0)
    await asyncio.sleep(0.3)
    with pytest.raises(BackendUnavailable, match="BUSY"):
        await backend.acquire(lock_for(request_for(pull=2)))
    await busy
    assert (await backend.release(lock.key)) is not None  # served again


async def test_the_waiters_heartbeat_outlives_a_redis_that_refused_it(
    redis_server: RedisServer, backend: RedisBackend,
) -> None:
    # While this replica has waiters it beats every second; a beat Redis refused (out of
    # memory) must not end the beating, or the waiters are dropped as a dead replica's.
    granted, _ = await backend.acquire(lock_for(request_for(pull=1)))
    assert granted
    heard = backend.grants.expect("w")  # a caller waits: the replica beats
    queued = await backend.acquire_or_enqueue(
        candidate_for(request_for(pull=2)), ttl=None, policy=QueuePolicy(),
        wait=Wait(id="w", timeout=timedelta(seconds=30)))
    assert queued.status is Status.QUEUED
    admin = redis_server.client()

    def alive_until() -> float:
        return float(admin.zscore(backend.keys.liveness, backend.replica_id) or 0)

    admin.config_set("maxmemory", "1")
    await asyncio.sleep(1.5)  # a beat or two refused
    refused = alive_until()
    admin.config_set("maxmemory", "0")
    assert await until(lambda: alive_until() > refused)  # a beat answered
    await backend.cancel(request_for().key, "w")
    heard.cancel()


# --- fallback legacy: what legacy granted during the outage, legacy lists and releases --------


@pytest.fixture
def outage_service(redis_servers: ServerMaker, tmp_path: Path) -> Iterator[tuple[ServiceProcess,
                                                                                RedisServer]]:
    server = redis_servers(persistence="aof")
    process = ServiceProcess(
        tmp_path / "data", log_dir=tmp_path / "logs",
        args=("--enhanced-locking-enabled", "--enhanced-locking-backend=redis",
              f"--enhanced-locking-redis-addr={server.addr}", "--enhanced-locking-fallback=legacy",
              "--enhanced-locking-replica-heartbeat=500ms"))
    with running(process):
        yield process, server


async def test_with_fallback_legacy_what_legacy_granted_in_an_outage_it_lists_and_releases(
    outage_service: tuple[ServiceProcess, RedisServer],
) -> None:
    service, server = outage_service
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:
        server.stop()
        a = await http.post("/v1/locks", json=lock_body(REPO, "a", 1, project=None))
        b = await http.post("/v1/locks", json=lock_body(REPO, "b", 2, project=None))
        c = await http.post("/v1/locks", json=lock_body(REPO, "c", 2, project=None))
        assert [r.status_code for r in (a, b, c)] == [200, 200, 200], a.text
        key_a, key_b, key_c = (r.json()["lockKey"] for r in (a, b, c))
        assert a.json()["lock"]["backend"] == "legacy"

        listed = await http.get("/v1/locks", params={"repo": REPO})
        assert listed.status_code == 200, listed.text
        assert {lock["key"] for lock in listed.json()["locks"]} == {key_a, key_b, key_c}
        assert listed.json()["unavailable"] == ["enhanced"]
        one = await http.get("/v1/locks/by-key", params={"key": key_a})
        assert one.status_code == 200 and one.json()["lock"]["pull"]["num"] == 1, one.text

        released = await http.delete("/v1/locks/by-key", params={"key": key_a, "pull": 1})
        assert released.status_code == 200, released.text
        by_pull = await http.delete("/v1/locks/by-pull", params={"repo": REPO, "pull": 2})
        assert by_pull.status_code == 200, by_pull.text
        assert {lock["key"] for lock in by_pull.json()["released"]} == {key_b, key_c}
        assert by_pull.json()["unavailable"] == ["enhanced"]

        server.start()
        give_up = time.monotonic() + 60
        while (await http.get("/readyz")).status_code != 200:
            assert time.monotonic() < give_up, "not ready again after Redis came back"
            await asyncio.sleep(0.1)
        # The fallback journal is reconciled on the heartbeats that follow (a fixed 2 s for a
        # few of them was not always enough on a loaded machine).
        give_up = time.monotonic() + 60
        while (migration := (await http.get("/v1/migration")).json())["fallback"]["pending"]:
            assert time.monotonic() < give_up, migration
            await asyncio.sleep(0.1)
        # Given back during the outage: never adopted into enhanced afterwards.
        after = await http.get("/v1/locks", params={"repo": REPO})
        assert after.json() == {"locks": []}, after.text
        for key in (key_a, key_b, key_c):
            assert (await http.get("/v1/locks/by-key", params={"key": key})).status_code == 404
        again = await http.post("/v1/locks", json=lock_body(REPO, "a", 3, project=None))
        assert again.status_code == 200 and again.json()["lock"]["backend"] == "enhanced"


# --- shadow mode: the weight that routes -------------------------------------------------------


async def test_in_shadow_mode_config_and_metric_report_the_weight_that_routes(
    make_service: ServiceMaker,
) -> None:
    service = await make_service(enabled=True, migration_weight=100, migration_mode="shadow")
    transport = httpx.ASGITransport(app=create_app(service, manage_lifecycle=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
        routing = (await http.get("/v1/config")).json()["routing"]
        assert routing["weight"] == 0.0 and routing["configuredWeight"] == 100.0
        assert routing["mode"] == "shadow"
        assert (await http.get("/v1/migration")).json()["routing"]["weight"] == 0
        metrics = (await http.get("/metrics")).text
        assert "enhanced_locking_routing_weight_percent 0.0" in metrics.splitlines()
        granted = await http.post("/v1/locks", json=lock_body(REPO, "shadowed", 1, project=None))
        assert granted.json()["lock"]["backend"] == "legacy"


def samples(exposition: str, name: str) -> dict[str, float]:
    """The samples of the metric ``name`` in a Prometheus text exposition, by their labels."""
    found: dict[str, float] = {}
    for line in exposition.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, _, value = line.rpartition(" ")
            found[series[len(name):]] = float(value)
    return found


async def test_the_store_s_gauges_are_absent_while_its_redis_is_down_and_store_up_says_so(
    make_service: ServiceMaker, redis_server: RedisServer,
) -> None:
    """``locks_held`` and ``queue_depth`` are read from the store at each scrape. While the
    enhanced store's Redis is down they are absent (not their last value), and
    ``store_up{backend="enhanced"}`` is 0; once it answers again they are back. Before, they
    kept their last value, and the backlog alert kept firing on a queue nobody could read."""
    service = await make_service(enabled=True, backend="redis", redis_addr=redis_server.addr)
    granted = await service.router.acquire(ask("gauged", 1, ttl=timedelta(minutes=5)))
    assert granted.acquired
    transport = httpx.ASGITransport(app=create_app(service, manage_lifecycle=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
        answered = (await http.get("/metrics")).text
        assert samples(answered, "enhanced_locking_locks_held")['{backend="enhanced"}'] == 1
        assert samples(answered, "enhanced_locking_queue_depth") == {"": 0}
        assert samples(answered, "enhanced_locking_store_up")['{backend="enhanced"}'] == 1
        redis_server.stop()
        down = (await http.get("/metrics")).text
        assert '{backend="enhanced"}' not in samples(down, "enhanced_locking_locks_held"), down
        assert samples(down, "enhanced_locking_queue_depth") == {}, down
        assert samples(down, "enhanced_locking_store_up")['{backend="enhanced"}'] == 0
        assert samples(down, "enhanced_locking_store_up")['{backend="legacy"}'] == 1
        redis_server.start()
        back = ""
        async with asyncio.timeout(30):  # the connection is made again at the next read
            while not samples(back, "enhanced_locking_queue_depth"):
                await asyncio.sleep(0.2)
                back = (await http.get("/metrics")).text
        assert samples(back, "enhanced_locking_locks_held")['{backend="enhanced"}'] in (0, 1)
        assert samples(back, "enhanced_locking_store_up")['{backend="enhanced"}'] == 1


async def test_every_replica_on_one_redis_reports_the_whole_store_s_locks_and_queue(
    make_service: ServiceMaker, redis_server: RedisServer, tmp_path: Path,
) -> None:
    """Two replicas of a service on one Redis: each one's scrape says the store's one lock and
    one waiter, whichever replica took or waits for it. So a query adds them up across the
    replicas of a service at its peril (the chart's alerts and dashboard take their max:
    tests/unit/test_monitoring_assets.py)."""
    settings = {"enabled": True, "backend": "redis", "redis_addr": redis_server.addr}
    a = await make_service(**settings, replica_id="a", data_dir=str(tmp_path / "a"))
    b = await make_service(**settings, replica_id="b", data_dir=str(tmp_path / "b"))
    assert (await a.router.acquire(ask("shared", 1, ttl=timedelta(minutes=5)))).acquired
    waiting = asyncio.create_task(b.router.acquire(ask("shared", 2, wait=timedelta(minutes=2))))
    try:
        scraped: dict[str, tuple[float, float]] = {}
        async with asyncio.timeout(30):
            while set(scraped.values()) != {(1.0, 1.0)}:
                await asyncio.sleep(0.05)
                for name, service in (("a", a), ("b", b)):
                    await service.refresh_gauges()  # what a scrape of /metrics does first
                    text = service.metrics.exposition().decode()
                    scraped[name] = (
                        samples(text, "enhanced_locking_locks_held")['{backend="enhanced"}'],
                        samples(text, "enhanced_locking_queue_depth").get("", 0.0))
        assert scraped == {"a": (1.0, 1.0), "b": (1.0, 1.0)}
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
