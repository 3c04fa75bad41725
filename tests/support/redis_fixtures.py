"""Pytest fixtures for a real Redis (loaded as a plugin by ``tests/conftest.py``).

* ``redis_server``: a running :class:`RedisServer` private to the test (no persistence).
* ``redis_servers(persistence=..., tls=...)``: start more, with options; all are killed at the
  end of the test.
* Every server these start is watched (:class:`~tests.support.key_watch.KeyWatch`, all but
  TLS ones), through each restart: a script that touched a key its call did not declare in
  ``KEYS``, or that wrote and was then called again with more keys, fails the test that ran
  it, and so does a watch cut while its server ran on. So every Redis test also checks Redis
  Cluster's rule for the scripts it runs.
* ``redis_backend``: a :class:`RedisBackend` on ``redis_server`` that has called it once.
* ``redis_config(server, **settings)``: an :class:`EnhancedLockingConfig` pointed at a server.
* :func:`redis_backend_maker`: the ``redis`` entry of the shared ``backend_factory``.
* ``redis_cluster``: a real Redis Cluster (three masters on loopback) for the whole session;
  ``redis_cluster_prefix``: a key prefix private to the test on it (tests share the cluster,
  never keys). :func:`redis_cluster_backend_maker`: the ``redis-cluster`` entry of
  ``backend_factory``, so every backend-generic test also runs on a cluster.

A missing ``redis-server`` fails the test with how to install it; it never skips.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from tempfile import mkdtemp
from typing import Any

import pytest
from tests.support.key_watch import KeyWatch
from tests.support.redis_cluster import RedisClusterNodes
from tests.support.redis_server import Persistence, RedisServer, RedisServerError

from enhanced_locking.backends.base import Backend
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.config import EnhancedLockingConfig

__all__ = [
    "ServerMaker",
    "SharedServer",
    "redis_backend",
    "redis_backend_maker",
    "redis_cluster",
    "redis_cluster_backend_maker",
    "redis_cluster_config",
    "redis_cluster_prefix",
    "redis_config",
    "redis_server",
    "redis_servers",
]

ServerMaker = Callable[..., RedisServer]


@pytest.fixture
def redis_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerMaker]:
    """``redis_servers(persistence="aof", tls=True)`` starts a server for this test."""
    started: list[RedisServer] = []
    watches: list[KeyWatch] = []

    def start(*, persistence: Persistence = "none", tls: bool = False) -> RedisServer:
        try:
            where = tmp_path_factory.mktemp("redis")
            server = RedisServer(where, persistence=persistence, tls=tls)
            started.append(server)
            server.start()
            if not tls:
                watches.append(KeyWatch.following(server, where / "monitor.log"))
            return server
        except RedisServerError as error:
            pytest.fail(str(error), pytrace=False)

    yield start
    problems, lost = [], []
    for watch in watches:
        watched = watch.stop()
        problems += [f"{watch.log}: undeclared key: {line}" for line in watched.undeclared]
        problems += [f"{watch.log}: {line}" for line in watched.wrote_then_asked]
        lost += [f"{watch.log}: {watched.lost}"] if watched.lost is not None else []
    for server in started:
        server.close()
    if problems:
        pytest.fail("scripts broke Redis Cluster's rule (every key in KEYS):\n"
                    + "\n".join(problems[:20]), pytrace=False)
    if lost:
        pytest.fail("the test did not run watched to its end (a server restarted? "
                    "RedisServer.start has each watch watch again):\n" + "\n".join(lost),
                    pytrace=False)


@pytest.fixture
def redis_server(redis_servers: ServerMaker) -> RedisServer:
    """A running redis-server on a free loopback port, empty, private to this test."""
    return redis_servers()


@pytest.fixture
async def redis_backend(redis_server: RedisServer) -> AsyncIterator[RedisBackend]:
    """A backend on ``redis_server`` that has called it once (its connection is open)."""
    backend = RedisBackend.from_config(redis_config(redis_server), "enhanced")
    await backend.ping()
    yield backend
    await backend.close()


def redis_config(server: RedisServer, **settings: Any) -> EnhancedLockingConfig:
    """Settings that point at ``server`` (TLS files included when it speaks TLS)."""
    values: dict[str, Any] = {"redis_addr": server.addr}
    if server.password is not None:
        values["redis_password"] = server.password
    if server.tls is not None:
        values.update(
            redis_tls=True,
            redis_tls_ca_file=str(server.tls.ca),
            redis_tls_cert_file=str(server.tls.client.cert),
            redis_tls_key_file=str(server.tls.client.key),
        )
    values.update(settings)
    return EnhancedLockingConfig(**values)


def redis_backend_maker(request: pytest.FixtureRequest) -> Callable[[str], Backend]:
    """``BackendKind.setup`` of ``redis``: backends of any namespace on the test's server."""
    server: RedisServer = request.getfixturevalue("redis_server")
    config = redis_config(server)
    return lambda namespace: RedisBackend.from_config(config, namespace)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    """Three cluster-enabled redis-servers joined by ``redis-cli --cluster create``."""
    try:
        cluster = RedisClusterNodes(tmp_path_factory.mktemp("redis-cluster")).start()
    except RedisServerError as error:
        pytest.fail(str(error), pytrace=False)
    yield cluster
    cluster.close()


_PREFIXES = itertools.count(1)


@pytest.fixture
def redis_cluster_prefix() -> str:
    """A key prefix no other test of the session uses (the cluster is shared)."""
    return f"t{next(_PREFIXES)}:atlantis:enhanced:"


def redis_cluster_config(cluster: RedisClusterNodes, prefix: str,
                         **settings: Any) -> EnhancedLockingConfig:
    """Settings that point at ``cluster`` (any node; the others are discovered)."""
    return EnhancedLockingConfig(redis_addr=cluster.addr, redis_cluster=True,
                                 redis_key_prefix=prefix, **settings)


def redis_cluster_backend_maker(request: pytest.FixtureRequest) -> Callable[[str], Backend]:
    """``BackendKind.setup`` of ``redis-cluster``: backends on the session's cluster, under a
    key prefix of the test's own."""
    cluster: RedisClusterNodes = request.getfixturevalue("redis_cluster")
    config = redis_cluster_config(cluster, request.getfixturevalue("redis_cluster_prefix"))
    return lambda namespace: RedisBackend.from_config(config, namespace)


class SharedServer:
    """One redis-server for a module's state machine: hypothesis runs its examples outside
    pytest's fixtures, so the first example starts it and the module's fixture closes it
    (:meth:`close`); each example takes a key prefix of its own (:meth:`prefix`)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._server: RedisServer | None = None
        self._examples = itertools.count(1)

    def get(self) -> RedisServer:
        if self._server is None:
            try:
                self._server = RedisServer(Path(mkdtemp(prefix=f"redis-{self.name}-"))).start()
            except RedisServerError as error:
                pytest.fail(str(error), pytrace=False)
        return self._server

    def prefix(self) -> str:
        return f"{self.name}{next(self._examples)}:"

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
