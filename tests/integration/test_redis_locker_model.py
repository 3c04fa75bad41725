"""The enhanced locker on Redis against the same reference model as the in-process stores.

:mod:`tests.unit.test_locker_model` drives acquire (fail fast or waiting), batch, release,
force-unlock, release by pull, cancel and lease timers, and after every step compares the real
locker with a model written from the rules. In process the store runs on a clock the test
moves. Redis decides by its own clock, which no test can move, so on Redis the model's clock
stands still and nothing in the run may depend on time passing: leases are an hour, the
starvation threshold is an hour (no waiter ages), and the ``time_passes`` rule is left out.
Aging is checked against the shared service order in ``test_redis_service_order.py``.
Each example gets a fresh redis-server; on a Redis Cluster (the same model, a subclass that
only changes the store) the cluster is shared and each example gets a key prefix of its own.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from tempfile import mkdtemp

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule
from tests.support.queues import rig_for
from tests.support.redis_cluster import RedisClusterNodes
from tests.support.redis_fixtures import redis_cluster_config, redis_config
from tests.support.redis_server import RedisServer, RedisServerError
from tests.unit.test_locker_model import KEYS, MAX_BOOST, MAX_QUEUE, PULLS, LockerModel

from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.locking.leasing import LeaseTimers
from enhanced_locking.types import Priority

pytestmark = pytest.mark.redis

HOUR = timedelta(hours=1)


class RedisLockerModel(LockerModel):
    """The model over a RedisBackend, with time standing still (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()  # builds an in-process rig; replaced below
        self.server: RedisServer | None = None
        backend = RedisBackend.from_config(self.store_config(), "enhanced")
        self.run(self.rig.locker.backend.close())
        self.rig = rig_for(backend, priority_queue=True, starvation_threshold=HOUR,
                           max_priority_boost=MAX_BOOST, max_queue_size=MAX_QUEUE)
        self.floor = 0  # a fresh redis-server's counters start at 0, not the memory store's floor
        self.rig.locker.leases = LeaseTimers(self.rig.locker.expire,
                                             clock=lambda: self.clock.now - 10 * HOUR)

    def store_config(self) -> EnhancedLockingConfig:
        """Settings of an empty store for this example: a fresh redis-server."""
        try:
            self.server = RedisServer(Path(mkdtemp(prefix="redis-model-"))).start()
        except RedisServerError as error:
            pytest.fail(str(error), pytrace=False)
        return redis_config(self.server)

    async def settle(self) -> None:
        """Until no call waits for Redis and no grant notification is being handled."""
        backend = self.rig.locker.backend
        assert isinstance(backend, RedisBackend)
        quiet = 0
        while quiet < 3:
            for _ in range(12):
                await asyncio.sleep(0)
            await asyncio.sleep(0.002)
            busy = backend.in_flight or backend._listener.busy
            quiet = 0 if busy else quiet + 1

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            if self.server is not None:
                self.server.close()

    @rule(pull=st.sampled_from(PULLS), path=st.sampled_from(KEYS),
          priority=st.sampled_from(list(Priority)), wait=st.booleans(),
          ttl=st.sampled_from([None, HOUR]))
    def acquire(self, pull: int, path: str, priority: Priority, wait: bool,
                ttl: timedelta | None) -> None:
        super().acquire(pull, path, priority, wait, ttl)

    def time_passes(self, ms: int) -> None:  # not a rule here: Redis's clock cannot be moved
        raise AssertionError("time does not pass in the Redis model")


RedisLockerModel.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLockerOnRedis = RedisLockerModel.TestCase


_CLUSTER: list[RedisClusterNodes] = []
_EXAMPLES = itertools.count(1)


@pytest.fixture(scope="module", autouse=True)
def _close_cluster() -> Iterator[None]:
    yield
    while _CLUSTER:
        _CLUSTER.pop().close()


class RedisClusterLockerModel(RedisLockerModel):
    """The same model on a Redis Cluster of three masters."""

    def store_config(self) -> EnhancedLockingConfig:
        if not _CLUSTER:
            try:
                _CLUSTER.append(RedisClusterNodes(Path(mkdtemp(prefix="redis-model-"))).start())
            except RedisServerError as error:
                pytest.fail(str(error), pytrace=False)
        return redis_cluster_config(_CLUSTER[0], f"model{next(_EXAMPLES)}:")


RedisClusterLockerModel.TestCase.settings = RedisLockerModel.TestCase.settings
TestLockerOnRedisCluster = RedisClusterLockerModel.TestCase
