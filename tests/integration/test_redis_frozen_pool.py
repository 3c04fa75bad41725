"""A call that waits for a pooled connection (or, on a Redis Cluster, its turn) behind calls a
frozen Redis does not answer is told the store did not answer (an outage: a router falls back
to legacy), not `overloaded` (503: the replica busy while the store answers), on every path:
redis-py's own commands (the audit trail, the replica registry, the store's reads outside its
scripts) and a cluster's calls, as already for the store's scripts on one Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from tests.support.redis_cluster import RedisClusterNodes
from tests.support.redis_fixtures import redis_cluster_config, redis_config
from tests.support.redis_server import RedisServer

from enhanced_locking.backends.redis_connection import RedisConnection, connect, unavailable
from enhanced_locking.types import BackendUnavailable, StoreBusy

pytestmark = pytest.mark.redis


async def _one_beyond_the_pool(connection: RedisConnection,
                               call: Callable[[], Coroutine[Any, Any, Any]]) -> BackendUnavailable:
    """With the store frozen: ``call`` twice (the pool's two connections, or turns, held by
    calls never answered), then once more, which waits for one; what that one is told."""
    under_way = [asyncio.create_task(call()) for _ in range(2)]
    await asyncio.sleep(0.3)
    try:
        with pytest.raises(BackendUnavailable) as caught:
            async with unavailable(connection, "audit write"):
                await call()
    finally:
        for task in under_way:
            task.cancel()
        await asyncio.gather(*under_way, return_exceptions=True)
    return caught.value


async def test_with_redis_frozen_a_command_waiting_for_a_connection_is_an_outage(
    redis_server: RedisServer,
) -> None:
    connection = connect(redis_config(redis_server, redis_pool_size=2))
    try:
        await connection.client.ping()
        with redis_server.paused():
            told = await _one_beyond_the_pool(
                connection, lambda: connection.client.execute_command("GET", "k"))
    finally:
        await connection.close()
    # Before: StoreBusy, "no free connection within 4 s (all ... connections are busy with
    # other calls)", answered 503 overloaded and never sent to legacy.
    assert not isinstance(told, StoreBusy), told
    # (one of the two may still be opening its connection: Redis has not answered its login)
    assert re.search(r"none of the [12] calls under way on them answered meanwhile",
                     str(told)), told


async def test_with_a_cluster_frozen_a_call_waiting_for_its_turn_is_an_outage(
    tmp_path: Path,
) -> None:
    with RedisClusterNodes(tmp_path / "cluster") as cluster:
        connection = connect(redis_cluster_config(cluster, "frozen:", redis_pool_size=2))
        try:
            await connection.call("GET", "{k}")  # (the slots are known)
            with contextlib.ExitStack() as frozen:
                for node in cluster.nodes:
                    frozen.enter_context(node.paused())
                told = await _one_beyond_the_pool(connection,
                                                  lambda: connection.call("GET", "{k}"))
        finally:
            await connection.close()
    # Before: StoreBusy, as above.
    assert not isinstance(told, StoreBusy), told
    assert "none of the 2 calls under way on them answered meanwhile" in str(told), told
