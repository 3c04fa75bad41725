"""Every backend kind the backend-generic tests run against, in one place.

``BACKEND_KINDS`` maps a backend's config name to how a test gets backends of that kind. The
``backend_factory`` fixture (``tests/conftest.py``) is parametrised over it, so adding a kind
here runs every backend-generic test (the Atlantis semantics table, fencing, namespaces, ...)
against it. A kind that needs a server asks for it in ``setup`` with
``request.getfixturevalue`` (``redis`` asks for ``redis_server``, which starts a real
redis-server for the test; ``etcd`` for the session's etcd and a key prefix of its own) and
carries its marker, so ``-m "not redis"`` leaves it out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from enhanced_locking.backends import Backend, EmbeddedBackend, MemoryBackend

__all__ = ["BACKEND_KINDS", "BackendFactory", "BackendKind", "BackendMaker"]

BackendMaker = Callable[[str], Backend]
"""Builds one backend of a kind for a namespace (``legacy``, ``enhanced``, ``shadow``)."""


@dataclass(frozen=True)
class BackendKind:
    """How the tests get one kind of backend.

    ``setup(request)`` runs once per test: it may ask for fixtures (a Redis server, a data dir)
    with ``request.getfixturevalue`` and returns the maker of backends on that test's store.
    ``persistent`` says whether a new backend on the same store sees what an earlier one wrote.
    ``revision_tokens``: fencing tokens are the store's revision (etcd), rising across every
    key of the store, rather than a counter per key that starts at 1 and steps by 1.
    """

    setup: Callable[[pytest.FixtureRequest], BackendMaker]
    marks: tuple[pytest.MarkDecorator, ...] = ()
    persistent: bool = True
    revision_tokens: bool = False


def _memory(request: pytest.FixtureRequest) -> BackendMaker:
    return lambda namespace: MemoryBackend(namespace)


def _boltdb(request: pytest.FixtureRequest) -> BackendMaker:
    path: Path = request.getfixturevalue("data_dir") / "enhanced-locking.db"
    return lambda namespace: EmbeddedBackend(path, namespace)


def _redis(request: pytest.FixtureRequest) -> BackendMaker:
    # Imported here: tests/conftest.py loads redis_fixtures as a plugin, which must come first.
    from tests.support.redis_fixtures import redis_backend_maker

    return redis_backend_maker(request)


def _redis_cluster(request: pytest.FixtureRequest) -> BackendMaker:
    from tests.support.redis_fixtures import redis_cluster_backend_maker

    return redis_cluster_backend_maker(request)


def _etcd(request: pytest.FixtureRequest) -> BackendMaker:
    from tests.support.etcd_fixtures import etcd_backend_maker

    return etcd_backend_maker(request)


BACKEND_KINDS: dict[str, BackendKind] = {
    "memory": BackendKind(_memory, persistent=False),
    "boltdb": BackendKind(_boltdb),
    "redis": BackendKind(_redis, marks=(pytest.mark.redis,)),
    "redis-cluster": BackendKind(_redis_cluster, marks=(pytest.mark.redis,)),
    "etcd": BackendKind(_etcd, marks=(pytest.mark.etcd,), revision_tokens=True),
}


class BackendFactory:
    """``backend_factory(namespace="enhanced")``: a new backend of ``kind`` on the test's store."""

    def __init__(self, kind: str, make: BackendMaker, *, persistent: bool,
                 revision_tokens: bool = False) -> None:
        self.kind = kind
        self.persistent = persistent
        self.revision_tokens = revision_tokens
        self._make = make
        self.built: list[Backend] = []

    def __call__(self, namespace: str = "enhanced") -> Backend:
        backend = self._make(namespace)
        self.built.append(backend)
        return backend

    @staticmethod
    def first_token(backend: Backend) -> int:
        """The first fencing token of each key a new store hands out (a counter per key): 1,
        or above the memory store's floor, read from the clock (it keeps no counter past its
        process, and its tokens still rise across restarts)."""
        return backend.token_floor + 1 if isinstance(backend, MemoryBackend) else 1

    def follows(self, after: int, token: int) -> bool:
        """Whether ``token`` is what this kind issues for a key's next grant after ``after``:
        exactly one more for a counter per key; any higher value for revision tokens."""
        return token > after if self.revision_tokens else token == after + 1

    async def close(self) -> None:
        """Close every backend built (closing twice is harmless for every kind)."""
        for backend in reversed(self.built):
            await backend.close()
