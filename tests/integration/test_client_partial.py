"""The Python client library against a real service whose enhanced store (a real
redis-server) is stopped: a call the service answered without that store never reads as
whole."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import ServiceFactory
from tests.support.redis_server import RedisServer
from tests.support.unreadable import SECRET, spoil_file

from enhanced_locking.client import Client
from enhanced_locking.types import (
    BackendUnavailable,
    LockRequest,
    LocksUnreadable,
    PartlyListed,
    PartlyReleased,
    Project,
    Pull,
    SidesUnanswered,
)

DEV = "acme/infra/envs/dev/default/"
PROD = "acme/infra/envs/prod/default/"


def _request(path: str) -> LockRequest:
    return LockRequest(project=Project(repo_full_name="acme/infra", path=path), pull=Pull(num=1))


@contextlib.contextmanager
def _a_lock_on_each_side(redis_server: RedisServer,
                         service_process: ServiceFactory) -> Iterator[Client]:
    """A client of a service on a real redis-server (AOF: the enhanced lock outlives the
    outage) where pull #1 holds ``PROD`` on the enhanced store, then, with Redis stopped,
    ``DEV`` on legacy."""
    redis_server.restart(persistence="aof")
    url = service_process("--enhanced-locking-enabled", "--enhanced-locking-backend=redis",
                          f"--enhanced-locking-redis-addr={redis_server.addr}").url
    with Client(url) as client:
        prod = client.acquire(_request("envs/prod")).lock
        assert prod is not None and prod.backend == "enhanced"
        redis_server.stop()
        dev = client.acquire(_request("envs/dev")).lock
        assert dev is not None and dev.backend == "legacy"
        yield client


@pytest.mark.redis
def test_unlock_pull_raises_naming_the_store_that_did_not_answer(
    redis_server: RedisServer, service_process: ServiceFactory,
) -> None:
    """The service frees the pull's lock on legacy and answers 200 with ``unavailable``:
    ``unlock_pull`` raises :class:`SidesUnanswered` (a ``BackendUnavailable``) carrying the
    lock it freed and the store's name, not a list that reads as the pull freed; called again
    once the store answers, it frees the rest and returns it."""
    with _a_lock_on_each_side(redis_server, service_process) as client:

        with pytest.raises(SidesUnanswered) as raised:
            client.unlock_pull("acme/infra", 1)
        error = raised.value
        assert isinstance(error, PartlyReleased) and isinstance(error, BackendUnavailable)
        assert [lock.key for lock in error.released] == [DEV]
        assert error.unavailable == ("enhanced",)
        assert "enhanced" in str(error) and "pull #1 of acme/infra" in str(error)

        redis_server.start()
        assert [lock.key for lock in client.unlock_pull("acme/infra", 1)] == [PROD]
        assert client.listing(repo="acme/infra").locks == []


@pytest.mark.redis
def test_list_raises_naming_the_store_that_did_not_answer(
    redis_server: RedisServer, service_process: ServiceFactory,
) -> None:
    """The service lists legacy's lock and answers 200 with ``unavailable``: ``list`` raises
    :class:`PartlyListed` (a ``BackendUnavailable``) carrying the locks read and the store's
    name, never a list that reads as everything held; ``listing`` returns that answer whole;
    once the store answers, ``list`` returns both locks."""
    with _a_lock_on_each_side(redis_server, service_process) as client:

        with pytest.raises(PartlyListed) as raised:
            client.list(repo="acme/infra")
        error = raised.value
        assert isinstance(error, BackendUnavailable)
        assert [lock.key for lock in error.locks] == [DEV]
        assert error.unavailable == ("enhanced",)
        assert "enhanced" in str(error)
        listing = client.listing(repo="acme/infra")
        assert [lock.key for lock in listing.locks] == [DEV]
        assert listing.unavailable == ("enhanced",)

        redis_server.start()
        assert sorted(lock.key for lock in client.list(repo="acme/infra")) == [DEV, PROD]


def test_list_raises_naming_the_stored_locks_it_could_not_read(
    service_process: ServiceFactory, data_dir: Path,
) -> None:
    """The service lists the locks it can read and names the stored ones it cannot (set
    aside: their keys are held, by whom is not known): ``list`` raises :class:`LocksUnreadable`
    carrying the locks read and the unreadable ones, never a list that reads as everything
    held (not a ``BackendUnavailable``: asking again does not mend it, a force-unlock does);
    ``listing`` returns that answer whole; once a force-unlock clears the key, ``list``
    returns the lock left. Before, ``list`` returned the readable lock alone."""
    url = service_process().url
    with Client(url) as client:
        for path in ("envs/prod", "envs/dev"):
            assert client.acquire(_request(path)).acquired
        spoil_file(str(data_dir / "enhanced-locking.db"), "legacy", DEV, f"token={SECRET}")

        with pytest.raises(LocksUnreadable) as raised:
            client.list(repo="acme/infra")
        error = raised.value
        assert not isinstance(error, BackendUnavailable)
        assert [lock.key for lock in error.locks] == [PROD]
        assert [(entry.key, entry.side) for entry in error.unreadable] == [(DEV, "legacy")]
        assert DEV in str(error) and SECRET not in str(error)
        listing = client.listing(repo="acme/infra")
        assert [lock.key for lock in listing.locks] == [PROD]
        assert [entry.key for entry in listing.unreadable] == [DEV]

        client.force_unlock(DEV, reason="unreadable")
        assert [lock.key for lock in client.list(repo="acme/infra")] == [PROD]


@pytest.mark.redis
def test_a_partial_list_carries_the_stored_locks_it_could_not_read_too(
    redis_server: RedisServer, service_process: ServiceFactory, data_dir: Path,
) -> None:
    """A store did not answer and another holds a lock that cannot be read: ``list`` raises
    :class:`PartlyListed` (the outage, asked again once the store answers) carrying the
    unreadable locks too, so the error holds the whole answer as ``listing`` does."""
    with _a_lock_on_each_side(redis_server, service_process) as client:
        spoil_file(str(data_dir / "enhanced-locking.db"), "legacy", DEV, f"token={SECRET}")
        with pytest.raises(PartlyListed) as raised:
            client.list(repo="acme/infra")
        error = raised.value
        assert error.locks == [] and error.unavailable == ("enhanced",)
        assert [(entry.key, entry.side) for entry in error.unreadable] == [(DEV, "legacy")]
        assert SECRET not in str(error)
