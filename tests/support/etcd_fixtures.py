"""Pytest fixtures for a real etcd (loaded as a plugin by ``tests/conftest.py``).

* ``etcd_cluster``: one etcd member for the whole test session (started on first use). Tests
  never share keys: each gets its own key prefix (``etcd_prefix``).
* ``etcd_config(cluster, prefix, **settings)``: an :class:`EnhancedLockingConfig` on it.
* ``etcd_replicas``: two replicas' backends on one etcd key space (the test's prefix).
* :func:`etcd_backend_maker`: the ``etcd`` entry of the shared ``backend_factory``.
* ``three``: a cluster of three members of the test's own.
* :func:`started`: a cluster of a test's own (several members, or one whose auth a test turns
  on), closed after the test; :func:`auth_on`: auth turned on, with a ``root`` user;
  :func:`reader`: a user that may only read a prefix.

A missing etcd binary fails the test saying how to build it; it never skips.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import etcd3aio
import pytest
from etcd3aio.auth import PermissionType
from tests.support.etcd_server import EtcdCluster, EtcdServerError

from enhanced_locking.backends.base import Backend
from enhanced_locking.backends.etcd_connection import EtcdConnection, EtcdSettings
from enhanced_locking.backends.etcd_store import EtcdBackend
from enhanced_locking.backends.waiting import QueuePolicy, Status
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.types import Candidate, Lock

__all__ = ["auth_on", "etcd_backend_maker", "etcd_cluster", "etcd_config", "etcd_prefix",
           "etcd_replicas", "reader", "started", "three"]

_PREFIXES = itertools.count(1)


QUEUE_POLICY = QueuePolicy(priority=True, starvation_threshold=timedelta(hours=1))
"""The queue policy the etcd store's tests ask with."""


async def grant(backend: EtcdBackend, candidate: Candidate, ttl: timedelta | None = None) -> Lock:
    """``candidate`` granted through ``backend`` at once (asserted), its lock."""
    outcome = await backend.acquire_or_enqueue(candidate, ttl=ttl, wait=None, policy=QUEUE_POLICY)
    assert outcome.status is Status.GRANTED, outcome
    lock: Lock = outcome.locks[0]
    return lock


@contextlib.contextmanager
def started(directory: Path, *, members: int = 1,
            extra: tuple[str, ...] = ()) -> Iterator[EtcdCluster]:
    """An etcd cluster of ``members`` on free loopback ports (no fsync; ``extra``: more flags
    for every member), killed after the block; a missing etcd fails the test saying how to
    build it."""
    try:
        cluster = EtcdCluster(directory, members_count=members, fsync=False,
                              extra=extra).start()
    except EtcdServerError as error:
        pytest.fail(str(error), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.discard()


async def auth_on(cluster: EtcdCluster, *, password: str) -> None:
    """Turn auth on in ``cluster``, with the user ``root`` (role ``root``) and ``password``:
    from then on etcd refuses a call without that user's token."""
    admin = EtcdConnection(EtcdSettings(endpoints=tuple(cluster.endpoints)))
    try:
        client = await admin.client()
        assert client.auth is not None
        await client.auth.user_add("root", password)
        await client.auth.user_grant_role("root", "root")
        await client.auth.auth_enable()
    finally:
        await admin.close()


async def reader(cluster: EtcdCluster, *, root_password: str, name: str, password: str,
                 prefix: bytes) -> None:
    """Add the user ``name`` to ``cluster`` (auth on, ``root`` with ``root_password``), with
    a role that may read the keys under ``prefix`` and nothing else."""
    admin = EtcdConnection(EtcdSettings(endpoints=tuple(cluster.endpoints), username="root",
                                        password=root_password))
    try:
        client = await admin.client()
        assert client.auth is not None
        await client.auth.user_add(name, password)
        await client.auth.role_add(name)
        await client.auth.role_grant_permission(name, prefix, etcd3aio.prefix_range_end(prefix),
                                                perm_type=PermissionType.READ)
        await client.auth.user_grant_role(name, name)
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member on a free loopback port, shared by the session (prefixes keep tests
    apart)."""
    with started(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture
def three(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A cluster of three members of the test's own, closed after it."""
    with started(tmp_path / "etcd", members=3) as cluster:
        yield cluster


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix no other test uses."""
    return f"/t{os.getpid()}-{next(_PREFIXES)}/"


@pytest.fixture
async def etcd_replicas(etcd_cluster: EtcdCluster, etcd_prefix: str) -> AsyncIterator[
        tuple[EtcdBackend, EtcdBackend]]:
    """Two replicas' backends on one etcd key space."""
    config = etcd_config(etcd_cluster, etcd_prefix)
    a, b = EtcdBackend.from_config(config, "enhanced"), EtcdBackend.from_config(config, "enhanced")
    yield a, b
    await a.close()
    await b.close()


def etcd_config(cluster: EtcdCluster, prefix: str, **settings: Any) -> EnhancedLockingConfig:
    """Settings that point at ``cluster`` under ``prefix``."""
    return EnhancedLockingConfig(**{"etcd_endpoints": cluster.endpoints,
                                    "etcd_key_prefix": prefix, **settings})


def etcd_backend_maker(request: pytest.FixtureRequest) -> Callable[[str], Backend]:
    """``BackendKind.setup`` of ``etcd``: backends of any namespace under the test's prefix."""
    cluster: EtcdCluster = request.getfixturevalue("etcd_cluster")
    config = etcd_config(cluster, request.getfixturevalue("etcd_prefix"))
    return lambda namespace: EtcdBackend.from_config(config, namespace)
