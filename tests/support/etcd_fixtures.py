"""Pytest fixtures for a real etcd (loaded as a plugin by ``tests/conftest.py``).

* ``etcd_cluster``: one etcd member for the whole test session (started on first use). Tests
  never share keys: each gets its own key prefix (``etcd_prefix``).
* ``etcd_config(cluster, prefix, **settings)``: an :class:`EnhancedLockingConfig` on it.
* :func:`etcd_backend_maker`: the ``etcd`` entry of the shared ``backend_factory``.

A missing etcd binary fails the test saying how to build it; it never skips.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tests.support.etcd_server import EtcdCluster, EtcdServerError

from enhanced_locking.backends.base import Backend
from enhanced_locking.backends.etcd_store import EtcdBackend
from enhanced_locking.config import EnhancedLockingConfig

__all__ = ["etcd_backend_maker", "etcd_cluster", "etcd_config", "etcd_prefix"]

_PREFIXES = itertools.count(1)


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member on a free loopback port, shared by the session (prefixes keep tests
    apart)."""
    try:
        cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), members_count=1,
                              fsync=False).start()
    except EtcdServerError as error:
        pytest.fail(str(error), pytrace=False)
    yield cluster
    cluster.close()


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix no other test uses."""
    return f"/t{os.getpid()}-{next(_PREFIXES)}/"


def etcd_config(cluster: EtcdCluster, prefix: str, **settings: Any) -> EnhancedLockingConfig:
    """Settings that point at ``cluster`` under ``prefix``."""
    return EnhancedLockingConfig(**{"etcd_endpoints": cluster.endpoints,
                                    "etcd_key_prefix": prefix, **settings})


def etcd_backend_maker(request: pytest.FixtureRequest) -> Callable[[str], Backend]:
    """``BackendKind.setup`` of ``etcd``: backends of any namespace under the test's prefix."""
    cluster: EtcdCluster = request.getfixturevalue("etcd_cluster")
    config = etcd_config(cluster, request.getfixturevalue("etcd_prefix"))
    return lambda namespace: EtcdBackend.from_config(config, namespace)
