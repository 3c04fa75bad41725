"""The replica registry on a real redis-server: reports timed by the server's clock, silent
replicas excluded then pruned, moves settled across replicas, a replica that loses Redis
taking every key on both sides until it reports again, and a registry written over by something
else (on one server and on a Redis Cluster)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from tests.support.leases import Overrun, past, with_leases
from tests.support.redis_cluster import RedisClusterNodes
from tests.support.redis_fixtures import redis_cluster_config, redis_config
from tests.support.redis_server import RedisServer
from tests.support.unreadable import SECRET

from enhanced_locking.backends import redis_connection
from enhanced_locking.backends.redis_connection import RedisConnection, connect
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import EventBus
from enhanced_locking.metrics import Metrics
from enhanced_locking.migration.routing_registry import (
    PRUNE_EXPIRIES,
    RedisRoutingRegistry,
    RoutingView,
)
from enhanced_locking.migration.transition import WeightTransitions
from enhanced_locking.provider import ConfigProvider
from enhanced_locking.types import Event, StoreBusy

pytestmark = pytest.mark.redis

Connect = Callable[[], RedisConnection]
Admin = Callable[[], contextlib.AbstractContextManager[Any]]
"""A synchronous admin client of the test's Redis (one server or a cluster)."""


@pytest.fixture
async def connections(redis_server: RedisServer) -> AsyncIterator[Connect]:
    opened: list[RedisConnection] = []

    def open_connection() -> RedisConnection:
        opened.append(connect(redis_config(redis_server)))
        return opened[-1]

    yield open_connection
    for connection in opened:
        await connection.close()


def _replica(name: str, registry: RedisRoutingRegistry, *, clock: Callable[[], float] | None = None,
             **settings: object) -> tuple[WeightTransitions, ConfigProvider, list[Event]]:
    provider = ConfigProvider(EnhancedLockingConfig(enabled=True, **settings))  # type: ignore[arg-type]
    events = EventBus()
    seen: list[Event] = []
    events.subscribe(seen.append)
    transitions = WeightTransitions(replica_id=name, snapshot=lambda: provider.current,
                                    registry=lambda: registry, events=events, metrics=Metrics(),
                                    clock=clock or time.monotonic)
    provider.subscribe(transitions.on_snapshot)
    return transitions, provider, seen


async def test_reports_carry_the_redis_server_time(
    connections: Connect, redis_server: RedisServer,
) -> None:
    registry = RedisRoutingRegistry(connections(), prefix="test:")
    await registry.report(replica_id="a", weight=25.5, generation=3)
    await registry.report(replica_id="b", weight=0, generation=9)
    view = await registry.read(expiry=EnhancedLockingConfig().replica_expiry)
    with redis_server.client() as admin:
        seconds, micros = admin.time()
        assert admin.hlen("test:replicas") == 2
    assert abs(view.now - (seconds + micros / 1e6)) < 1.0
    assert [(r.replica_id, r.weight, r.generation) for r in view.reports] == [
        ("a", 25.5, 3), ("b", 0.0, 9)]
    assert all(view.age(r) < 1.0 for r in view.reports)


async def test_a_silent_replica_is_excluded_after_the_expiry_and_pruned_later(
    connections: Connect,
) -> None:
    # Every age is the registry's own (its clock, read with each view); a read that came after
    # the expiry it should have beaten (a loaded machine) runs the case again with a longer one.
    async def case(silence: timedelta) -> None:
        ms = silence // timedelta(milliseconds=1)
        registry = RedisRoutingRegistry(connections(), prefix=f"test-{ms}:")
        expiry = EnhancedLockingConfig(replica_heartbeat=f"{ms // 5}ms",
                                       replica_timeout=f"{ms}ms").replica_expiry
        assert expiry == silence

        async def now() -> datetime:
            view = await registry.read(expiry=expiry)
            return datetime.fromtimestamp(view.now, UTC)

        def seen(view: RoutingView, replica_id: str) -> datetime:
            report = next(r for r in view.reports if r.replica_id == replica_id)
            if view.age(report) > expiry.total_seconds():
                raise Overrun  # this read came after the report's expiry
            return datetime.fromtimestamp(report.seen, UTC)

        await registry.report(replica_id="silent", weight=10, generation=1)
        view = await registry.read(expiry=expiry)
        silent = seen(view, "silent")
        assert [r.replica_id for r in view.live(expiry)] == ["silent"]

        await past(now, silent + expiry)
        await registry.report(replica_id="alive", weight=10, generation=1)
        view = await registry.read(expiry=expiry)
        alive = seen(view, "alive")
        assert [r.replica_id for r in view.excluded(expiry)] == ["silent"]
        assert [r.replica_id for r in view.live(expiry)] == ["alive"]

        await past(now, alive + PRUNE_EXPIRIES * expiry)  # ten expiries
        view = await registry.read(expiry=expiry)
        assert view.reports == ()
        await registry.leave("nobody")

    await with_leases(case)


async def test_a_move_settles_once_every_replica_reported_it_through_redis(
    connections: Connect,
) -> None:
    a, a_provider, a_seen = _replica("a", RedisRoutingRegistry(connections(), prefix="t:"),
                                     migration_weight=0)
    b, b_provider, _ = _replica("b", RedisRoutingRegistry(connections(), prefix="t:"),
                                migration_weight=0)
    await a.tick()
    await b.tick()
    await a_provider.set_layer("cluster", {"migration_weight": 50})
    status = await a.tick()
    assert status.phase == "moving" and status.pending == ("b",)

    await b_provider.set_layer("cluster", {"migration_weight": 50})
    await b.tick()
    status = await a.tick()
    assert status.phase == "stable" and status.pending == ()
    assert [e.details["phase"] for e in a_seen if e.type == "routing-changed"] == [
        "moving", "settled"]
    await b.leave()
    view = await RedisRoutingRegistry(connections(), prefix="t:").read(
        expiry=EnhancedLockingConfig().replica_expiry)
    assert [r.replica_id for r in view.reports] == ["a"]


async def test_a_replica_that_loses_redis_takes_every_key_on_both_sides_until_it_reports(
    connections: Connect, redis_server: RedisServer,
) -> None:
    now = [100.0]
    transitions, _, seen = _replica(
        "a", RedisRoutingRegistry(connections(), prefix="t:"), clock=lambda: now[0],
        migration_weight=30, replica_heartbeat="1s", replica_timeout="3s")
    await transitions.tick()
    keys = [f"repo/k{i}" for i in range(40)]
    assert not any(transitions.plan(key).both for key in keys)

    redis_server.stop()
    now[0] += 1.0
    status = await transitions.tick()
    assert status.last_error is not None and "did not answer" in status.last_error
    assert status.phase == "stable", "one missed report is not enough to stop trusting"
    now[0] += 1.5  # more than the expiry minus a heartbeat since the last report
    await transitions.refresh()  # the router's step before each acquire
    assert all(transitions.plan(key).both for key in keys), "checked on the request path"
    await transitions.tick()
    assert transitions.status().phase == "isolated"

    redis_server.start()
    now[0] += 1.0
    status = await transitions.tick()
    assert status.phase == "stable" and status.last_error is None
    assert not any(transitions.plan(key).both for key in keys)
    assert [e.details["phase"] for e in seen if e.type == "routing-changed"] == [
        "isolated", "rejoined"]


async def test_a_replica_whose_pool_is_busy_past_the_bound_is_not_isolated(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rounds that found no free pooled connection (``StoreBusy``: the replica is overloaded,
    Redis answers) are no evidence that the registry refuses its reports: however long they
    last, the replica is not isolated (which would take every key on both sides, the legacy
    half of a waiting request failing fast with ``held``); once its last report is older than
    the expiry, a request is answered overloaded rather than routed on its old view. The
    round after them reports again. Before, the busy rounds past the bound isolated the
    replica."""
    monkeypatch.setattr(redis_connection, "POOL_WAIT", 0.3)  # (the pool's bound, shortened)
    connection = connect(redis_config(redis_server, redis_pool_size=1))
    try:
        now = [100.0]
        transitions, _, seen = _replica(
            "a", RedisRoutingRegistry(connection, prefix="t:"), clock=lambda: now[0],
            migration_weight=30, replica_heartbeat="1s", replica_timeout="3s")
        await transitions.tick()
        keys = [f"repo/k{i}" for i in range(40)]
        assert not any(transitions.plan(key).both for key in keys)
        await connection.drop_idle()
        client = connection.client
        assert isinstance(client, aioredis.Redis)
        pool: Any = client.connection_pool
        taken = await asyncio.wait_for(pool.get_connection(), timeout=5)
        try:
            for _ in range(3):
                now[0] += 1.0
                status = await transitions.tick()
                assert status.last_error is not None, "the round found a connection free"
                assert "no free connection" in status.last_error, status.last_error
            await transitions.refresh()  # the router's step before each acquire
            assert transitions.status().phase == "stable"
            assert not any(transitions.plan(key).both for key in keys)
            # Past the expiry the others may have left it out: a request is not routed on
            # that view, it is answered overloaded (still no isolation).
            now[0] += 0.5
            with pytest.raises(StoreBusy, match="no free connection"):
                await transitions.refresh()
            assert transitions.status().phase == "stable"
        finally:
            await pool.release(taken)
        now[0] += 1.0
        status = await transitions.tick()
        assert status.phase == "stable" and status.last_error is None
        assert [e.details["phase"] for e in seen if e.type == "routing-changed"] == []
    finally:
        await connection.close()


@pytest.fixture(params=["redis", "redis-cluster"])
async def either(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Connect, Admin, str]]:
    """Connections to the test's Redis, an admin client of it and a key prefix of the test's
    own: one server, or the session's Redis Cluster (shared: the prefix keeps tests apart)."""
    config: EnhancedLockingConfig
    admin: Admin
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        config, admin = redis_config(server), server.client
    else:
        cluster: RedisClusterNodes = request.getfixturevalue("redis_cluster")
        config = redis_cluster_config(cluster, request.getfixturevalue("redis_cluster_prefix"))
        host, port = cluster.addr.split(":")
        admin = functools.partial(redis.RedisCluster, host=host, port=int(port))
    opened: list[RedisConnection] = []

    def open_connection() -> RedisConnection:
        opened.append(connect(config))
        return opened[-1]

    yield open_connection, admin, config.redis_key_prefix
    for connection in opened:
        await connection.close()


@pytest.mark.parametrize("write", ["string", "list", "report"])
async def test_a_registry_written_over_is_replaced_and_no_move_settles_until_all_report_again(
    either: tuple[Connect, Admin, str], write: str, caplog: pytest.LogCaptureFixture,
) -> None:
    # Another Redis type at the registry's key is replaced by the next report; a report that
    # does not read is left for its replica to write again. Either way some live replica's
    # weight is not in the registry for a while, so no move settles before every live replica
    # had its time to report again (one expiry after the loss).
    connections, admin_client, base = either

    async def case(expiry: timedelta) -> None:
        ms = expiry // timedelta(milliseconds=1)
        prefix = f"{base}t{ms}:"
        settings: dict[str, Any] = {"migration_weight": 0, "replica_heartbeat": f"{ms // 4}ms",
                    "replica_timeout": f"{ms}ms"}
        a, a_provider, a_seen = _replica("a", RedisRoutingRegistry(connections(), prefix=prefix),
                                         **settings)
        b, b_provider, _ = _replica("b", RedisRoutingRegistry(connections(), prefix=prefix),
                                    **settings)
        registry = RedisRoutingRegistry(connections(), prefix=prefix)
        await a.tick()
        await b.tick()
        with admin_client() as admin:
            if write == "string":
                admin.set(registry.key, f"token={SECRET}")
            elif write == "list":
                admin.delete(registry.key)
                admin.rpush(registry.key, SECRET)
            else:  # b's report, its time as good as the server's
                seconds, micros = admin.time()
                admin.hset(registry.key, "b", f"{seconds * 1000 + micros // 1000} {SECRET}")
        lost = (await registry.read(expiry=expiry)).now if write == "report" else None

        await a_provider.set_layer("cluster", {"migration_weight": 50})
        status = await a.tick()
        assert status.last_error is None, status.last_error  # the registry answered
        view = await registry.read(expiry=expiry)
        lost = lost or view.now
        if view.now - lost > expiry.total_seconds():
            raise Overrun
        assert status.phase == "moving", "b's weight is not known"
        await b_provider.set_layer("cluster", {"migration_weight": 50})
        await b.tick()
        status = await a.tick()
        if write == "report":  # b reported again: nothing is missing
            assert status.phase == "stable"
        else:
            if (await registry.read(expiry=expiry)).now - lost > expiry.total_seconds():
                raise Overrun
            assert status.phase == "moving", "another replica may not have reported again yet"

            async def now() -> datetime:
                return datetime.fromtimestamp((await registry.read(expiry=expiry)).now, UTC)

            await past(now, datetime.fromtimestamp(lost, UTC) + expiry)
            await b.tick()
            status = await a.tick()
            assert status.phase == "stable"
        assert [e.details["phase"] for e in a_seen if e.type == "routing-changed"] == [
            "moving", "settled"]
        assert [r.replica_id for r in (await registry.read(expiry=expiry)).reports] == ["a", "b"]
        with admin_client() as admin:
            assert admin.type(registry.key) == b"hash"

    with caplog.at_level(logging.WARNING, logger="enhanced_locking.migration"):
        await with_leases(case)
    if write == "report":
        assert "the report of replica b in the replica registry" in caplog.text
    else:
        assert "the replica registry" in caplog.text and "was not a hash" in caplog.text
    assert SECRET not in caplog.text
