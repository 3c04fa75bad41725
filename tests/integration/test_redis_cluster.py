"""The Redis backend on a Redis Cluster, and the key layout that makes it possible.

The behaviour tables, the queue tests, the locker model and the replicas' history checks run
on a cluster through their own parametrisation (the ``redis-cluster`` backend kind, the
``replicas`` fixture); these tests are about the layout itself: the names the scripts use are
the ones :class:`RedisKeys` writes, and on a cluster every key of a namespace shares one slot.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from redis.asyncio.cluster import ClusterNode
from redis.crc import key_slot
from tests.support.locks import candidate_for, lock_for, request_for
from tests.support.redis_cluster import RedisClusterNodes
from tests.support.redis_fixtures import redis_cluster_config, redis_config
from tests.support.redis_server import RedisServer
from tests.support.service import enhanced_locking_command, free_port, scrubbed_env
from tests.support.waiting import wait_for

from enhanced_locking.backends import redis_scripts
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.backends.waiting import QueuePolicy, Status, Wait
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.types import BackendUnavailable

pytestmark = pytest.mark.redis

REPO = "acme/infra"


@pytest.fixture(params=["redis", "redis-cluster"])
def store(request: pytest.FixtureRequest) -> Iterator[tuple[EnhancedLockingConfig, Any]]:
    """Settings for an empty store and an admin client of it (one server, or the cluster)."""
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        with server.client() as admin:
            yield redis_config(server), admin
        return
    cluster: RedisClusterNodes = request.getfixturevalue("redis_cluster")
    config = redis_cluster_config(cluster, request.getfixturevalue("redis_cluster_prefix"))
    host, port = cluster.addr.split(":")
    with redis.RedisCluster(host=host, port=int(port)) as admin:
        yield config, admin


@pytest.fixture
async def backend(store: tuple[EnhancedLockingConfig, Any]) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend.from_config(store[0], "enhanced")
    yield backend
    await backend.close()


async def test_the_scripts_write_exactly_the_keys_redis_keys_names(
    backend: RedisBackend, store: tuple[EnhancedLockingConfig, Any],
) -> None:
    admin = store[1]
    keys, policy = backend.keys, QueuePolicy()
    held = lock_for(request_for(repo=REPO, pull=1))
    assert (await backend.acquire(held))[0]
    waiting = candidate_for(request_for(repo=REPO, pull=2))
    queued = await backend.acquire_or_enqueue(
        waiting, ttl=None, wait=Wait(id="w1", timeout=timedelta(minutes=1)), policy=policy)
    assert queued.status is Status.QUEUED
    level = waiting.priority.level  # one queue per base priority
    for name in (keys.lock(held.key), keys.fence(held.key), keys.queue(held.key, level),
                 keys.by_pull(held.key), keys.waiter("w1"), keys.pull(REPO, 1), keys.incarnation,
                 keys.held, keys.fenced, keys.queued, keys.seq, keys.liveness,
                 keys.by_pull_mark):
        assert admin.exists(name) == 1, f"{name} is not where RedisKeys says"
    handoff = await backend.release_and_handoff(held.key, owner=(REPO, 1))
    assert [g.waiter.id for g in handoff.granted] == ["w1"]
    assert admin.exists(keys.outcome("w1")) == 1
    assert admin.exists(keys.pull(REPO, 2)) == 1
    assert admin.exists(keys.waiter("w1")) == 0
    assert admin.exists(keys.by_pull(held.key)) == 0  # (its one member went with the waiter)


async def test_a_replica_whose_first_call_waits_is_queued_and_handed_the_key(
    store: tuple[EnhancedLockingConfig, Any],
) -> None:
    # Its first call subscribes to its notifications before any other command: on a cluster
    # the client learns the slots there (it used to ask a client that knew none, and every
    # waiting acquire of that replica then answered "did not answer" after 5 s).
    holder = RedisBackend.from_config(store[0], "enhanced")
    waiter = RedisBackend.from_config(store[0], "enhanced")
    try:
        held = lock_for(request_for(repo=REPO, pull=1))
        assert (await holder.acquire(held))[0]
        told = waiter.grants.expect("first")
        queued = await waiter.acquire_or_enqueue(
            candidate_for(request_for(repo=REPO, pull=2)), ttl=None,
            wait=Wait(id="first", timeout=timedelta(minutes=1)), policy=QueuePolicy())
        assert queued.status is Status.QUEUED
        await holder.release_and_handoff(held.key, owner=(REPO, 1))
        notice = await asyncio.wait_for(told, 10)
        assert notice.granted and notice.locks[0].pull.num == 2
    finally:
        await waiter.close()
        await holder.close()


async def test_on_a_cluster_a_namespace_is_one_slot_and_namespaces_are_apart(
    redis_cluster: RedisClusterNodes, redis_cluster_prefix: str,
) -> None:
    config = redis_cluster_config(redis_cluster, redis_cluster_prefix)
    enhanced = RedisBackend.from_config(config, "enhanced")
    shadow = RedisBackend.from_config(config, "shadow")
    try:
        for backend in (enhanced, shadow):
            for pull, path in enumerate(("a", "b", "c", "d", "e", "f"), start=1):
                granted, _ = await backend.acquire(
                    lock_for(request_for(repo=REPO, path=path, project=path, pull=pull)))
                assert granted
            await backend.release_by_pull(REPO, 3)
            assert len(await backend.list()) == 5
    finally:
        await enhanced.close()
        await shadow.close()
    slots = {}
    for backend in (enhanced, shadow):
        assert backend.keys.base.startswith(redis_cluster_prefix)  # ACL patterns still match
        home = redis_cluster.node_of(backend.keys.base + "held")
        with home.client() as client:
            names = [n.decode() for n in client.scan_iter(match=backend.keys.base + "*")]
        # Six locks, six counters and more, all on the master of the namespace's one slot.
        assert len(names) >= 12
        assert {key_slot(n.encode()) for n in names} == {key_slot(backend.keys.held.encode())}
        slots[backend.namespace] = key_slot(backend.keys.held.encode())
        for node in redis_cluster.nodes:
            if node is not home:
                with node.client() as client:
                    assert not list(client.scan_iter(match=backend.keys.base + "*"))
    assert slots["enhanced"] != slots["shadow"]


def _command_table_reads(cluster: RedisClusterNodes) -> int:
    """How many times the cluster's nodes were asked for their command table (``COMMAND``)."""
    calls = 0
    for node in cluster.nodes:
        with node.client() as admin:
            calls += int(admin.info("commandstats").get("cmdstat_command", {}).get("calls", 0))
    return calls


async def test_clients_of_one_cluster_read_its_command_table_once(tmp_path: Any) -> None:
    # Each client finds a command's keys, so its slot, in the table; read per client it was a
    # third of a client's first call and thousands of objects left for the garbage collector.
    with RedisClusterNodes(tmp_path / "cluster") as cluster:
        config = redis_cluster_config(cluster, "table:")
        backends = [RedisBackend.from_config(config, namespace)
                    for namespace in ("enhanced", "shadow", "legacy")]
        try:
            for number, backend in enumerate(backends, start=1):
                assert (await backend.acquire(lock_for(request_for(repo=REPO, pull=number))))[0]
                # A plain command (SMEMBERS, MGET) is routed by the shared table.
                locks, tokens = await backend.export()
                assert [lock.pull.num for lock in locks] == [number] and len(tokens) == 1
            assert _command_table_reads(cluster) == 1
        finally:
            for backend in backends:
                await backend.close()


@pytest.mark.parametrize(("flags", "names"), [
    (["--enhanced-locking-legacy-backend=redis"],
     ["enhanced-locking-redis-cluster", "enhanced-locking-legacy-backend"]),
    (["--enhanced-locking-redis-db=3"],
     ["enhanced-locking-redis-cluster", "enhanced-locking-redis-db"]),
    (["--enhanced-locking-redis-sentinel-addrs=127.0.0.1:26379",
      "--enhanced-locking-redis-sentinel-master=m"],
     ["enhanced-locking-redis-cluster", "enhanced-locking-redis-sentinel-addrs"]),
], ids=["legacy-on-redis", "db", "sentinel"])
def test_a_cluster_with_a_setting_it_cannot_honour_exits_2_naming_both(
    flags: list[str], names: list[str], tmp_path: Any,
) -> None:
    result = subprocess.run(
        [*enhanced_locking_command(), "serve", "--port", str(free_port()),
         "--data-dir", str(tmp_path / "data"), "--enhanced-locking-enabled",
         "--enhanced-locking-backend=redis", "--enhanced-locking-redis-cluster", *flags],
        capture_output=True, text=True, env=scrubbed_env(None), timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0]


async def test_a_cluster_whose_namespace_master_is_down_answers_unavailable(
    tmp_path: Any,
) -> None:
    with RedisClusterNodes(tmp_path / "cluster") as cluster:
        config = redis_cluster_config(cluster, "down:")
        backend = RedisBackend.from_config(config, "enhanced")
        try:
            held = lock_for(request_for(repo=REPO, pull=1))
            assert (await backend.acquire(held))[0]
            cluster.node_of(backend.keys.held).kill()
            with pytest.raises(BackendUnavailable) as raised:
                await backend.get(held.key)
            message = str(raised.value)
            del raised  # its traceback holds redis-py's objects of the lost node
            assert "did not answer" in message
        finally:
            await backend.close()
            # redis-py drops its objects for the lost node without closing them (their
            # sockets are gone with the node): close them here, not warn in a later test.
            for leftover in [o for o in gc.get_objects() if isinstance(o, ClusterNode)]:
                await leftover.disconnect()


def _library_names(node: RedisServer) -> list[str]:
    with node.client() as admin:
        return sorted(dict(zip(entry[::2], entry[1::2], strict=True))[b"library_name"].decode()
                      for entry in admin.function_list())


def _text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


async def test_on_a_cluster_the_library_is_on_every_master_and_a_promoted_replica_has_it(
    tmp_path: Any,
) -> None:
    with RedisClusterNodes(tmp_path / "cluster") as cluster:
        config = redis_cluster_config(cluster, "functions:")
        backend = RedisBackend.from_config(config, "enhanced")
        replica = RedisServer(tmp_path / "replica", extra_args=[
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "5000", "--cluster-port", str(free_port())])
        try:
            granted, held = await backend.acquire(lock_for(request_for(repo=REPO, pull=1)))
            assert granted
            for node in cluster.nodes:  # loaded on every master, not only the namespace's
                assert _library_names(node) == [redis_scripts.LIBRARY_NAME]
                with node.client() as admin:
                    # Each call's slot is found from its keys, without asking a node.
                    assert "cmdstat_command|getkeys" not in admin.info("commandstats")
            # A replica of the namespace's master receives the library from it; promoted, it
            # serves the namespace without loading it again.
            master = cluster.node_of(backend.keys.held)
            replica.start()
            with master.client() as admin:
                master_id = _text(admin.execute_command("CLUSTER", "MYID"))
                bus = admin.config_get("cluster-port")["cluster-port"]
            with replica.client() as admin:
                admin.execute_command("CLUSTER", "MEET", master.host, master.port, bus)
                wait_for("the replica knows the master",
                          lambda: master_id in _text(admin.execute_command("CLUSTER", "NODES")))
                admin.execute_command("CLUSTER", "REPLICATE", master_id)
                wait_for("the replica is in sync",
                          lambda: admin.info("replication").get("master_link_status") == "up")
                assert _library_names(replica) == [redis_scripts.LIBRARY_NAME]
                admin.execute_command("CLUSTER", "FAILOVER")
                wait_for("the replica is promoted",
                          lambda: admin.info("replication")["role"] == "master")
                admin.config_resetstat()
            assert await backend.get(held.key) == held
            granted, holder = await backend.acquire(lock_for(request_for(repo=REPO, pull=2)))
            assert not granted and holder == held
            with replica.client() as admin:
                stats = admin.info("commandstats")
            assert stats["cmdstat_fcall"]["calls"] >= 2  # served by the promoted replica
            assert "cmdstat_function|load" not in stats
        finally:
            await backend.close()
            replica.close()
            for leftover in [o for o in gc.get_objects() if isinstance(o, ClusterNode)]:
                await leftover.disconnect()
