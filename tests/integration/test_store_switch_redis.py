"""Switching the enhanced store of a running service to a real redis-server: a switch the new
store refuses after it took the locks over (the new locker cannot start on it) leaves the old
store serving as it was, and the same change goes through once the cause is gone."""

from __future__ import annotations

import asyncio

import pytest
from tests.conftest import ServiceMaker
from tests.support.locks import request_for
from tests.support.redis_server import RedisServer
from tests.support.unreadable import spoil_file

from enhanced_locking.backends import EmbeddedBackend
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.factory import LockService
from enhanced_locking.locking import EnhancedLocker
from enhanced_locking.provider import ConfigRejected
from enhanced_locking.types import Event

pytestmark = pytest.mark.redis

PASSWORD = "switch-pw"
USER = "locker"


async def _connections(server: RedisServer, user: str) -> int:
    """How many connections ``user`` has on ``server`` once the closed ones are gone (a client
    that closed its sockets is off the server's list within moments)."""
    count = -1
    for _ in range(100):
        with server.client() as admin:
            count = sum(1 for client in admin.client_list() if client["user"] == user)
        if count == 0:
            break
        await asyncio.sleep(0.05)
    return count


async def _refused_switch(
    server: RedisServer, make_service: ServiceMaker,
) -> tuple[LockService, EnhancedLocker, EmbeddedBackend, dict[str, str]]:
    """A service on its SQLite store, and a switch to ``server``, which answers and takes the
    locks over, but whose ACL refuses the reads of the store's index (SMEMBERS, and the SCAN
    that would rebuild it) that the new locker starts with."""
    server.create_acl_user(USER, PASSWORD, rules=("~*", "&*", "+@all", "-smembers", "-scan"))
    service = await make_service(enabled=True, backend="boltdb", legacy_backend="memory")
    running = service.enhanced
    assert running is not None and isinstance(running.backend, EmbeddedBackend)
    switch = {"backend": "redis", "redis_addr": server.addr, "redis_username": USER,
              "redis_password": PASSWORD}
    return service, running, running.backend, switch


async def test_a_switch_whose_new_locker_cannot_start_keeps_the_old_store_serving(
    redis_server: RedisServer, make_service: ServiceMaker,
) -> None:
    service, running, old_store, switch = await _refused_switch(redis_server, make_service)
    seen: list[Event] = []
    service.events.subscribe(seen.append)
    held = await service.router.acquire(request_for(pull=1))
    assert held.acquired and held.lock is not None and held.lock.backend == "enhanced"
    before = service.provider.current

    with pytest.raises(ConfigRejected, match="NoPermissionError"):
        await service.provider.set_layer("cluster", switch)

    assert service.provider.current is before
    assert service.enhanced is running and running.backend is old_store
    assert await _connections(redis_server, USER) == 0  # the new backend was closed
    # The old locker serves its locks on the SQLite store.
    assert [lock.key for lock in await service.router.list()] == [held.lock.key]
    taken = await service.router.acquire(request_for(pull=1))
    assert taken.acquired and taken.lock == held.lock  # its holder's again: the same hold
    refused = await service.router.acquire(request_for(pull=3))
    assert not refused.acquired and refused.holder == held.lock
    other = await service.router.acquire(request_for(pull=2, path="envs/other"))
    assert other.acquired and other.lock is not None and other.lock.backend == "enhanced"
    assert await old_store.get(other.lock.key) == other.lock
    assert await service.router.release(other.lock.key, owner=("acme/infra", 2)) == other.lock
    assert await old_store.get(other.lock.key) is None
    # Its unreadable locks are reported as the enhanced side's.
    spoiled = await service.router.acquire(request_for(pull=4, path="envs/spoiled"))
    assert spoiled.acquired and spoiled.lock is not None
    spoil_file(str(old_store.path), old_store.namespace, spoiled.lock.key, "not a lock")
    assert [lock.key for lock in await service.router.list()] == [held.lock.key]
    [found] = [e for e in seen if e.type == "lock-unreadable"]
    assert found.key == spoiled.lock.key and found.details["side"] == "enhanced"
    await service.router.force_unlock(spoiled.lock.key)
    assert [e.key for e in seen if e.type == "lock-unreadable-cleared"] == [spoiled.lock.key]

    # The cause gone, the same change switches: the held lock moves to Redis as it was.
    with redis_server.client() as admin:
        admin.execute_command("ACL", "SETUSER", USER, "+smembers", "+scan")
    switched = await service.provider.set_layer("cluster", switch)
    assert service.provider.current is switched and switched.generation == before.generation + 1
    assert service.enhanced is not None and service.enhanced is not running
    assert isinstance(service.enhanced.backend, RedisBackend)
    moved = await service.enhanced.backend.get(held.lock.key)
    assert moved is not None and (moved.pull, moved.fencing_token) == (
        held.lock.pull, held.lock.fencing_token)
    assert [lock.key for lock in await service.router.list()] == [held.lock.key]
    again = await service.router.acquire(request_for(pull=3))
    assert not again.acquired and again.holder == moved


async def test_enabling_on_a_store_the_new_locker_cannot_start_on_keeps_legacy_serving(
    redis_server: RedisServer, make_service: ServiceMaker,
) -> None:
    redis_server.create_acl_user(USER, PASSWORD,
                                 rules=("~*", "&*", "+@all", "-smembers", "-scan"))
    service = await make_service(enabled=False, legacy_backend="memory")
    before = service.provider.current
    enable = {"enabled": True, "backend": "redis", "redis_addr": redis_server.addr,
              "redis_username": USER, "redis_password": PASSWORD}

    with pytest.raises(ConfigRejected, match="NoPermissionError"):
        await service.provider.set_layer("cluster", enable)

    assert service.provider.current is before and service.enhanced is None
    assert await _connections(redis_server, USER) == 0
    held = await service.router.acquire(request_for(pull=1))
    assert held.acquired and held.lock is not None and held.lock.backend == "legacy"

    with redis_server.client() as admin:
        admin.execute_command("ACL", "SETUSER", USER, "+smembers", "+scan")
    enabled = await service.provider.set_layer("cluster", enable)
    assert service.provider.current is enabled and service.enhanced is not None
    assert isinstance(service.enhanced.backend, RedisBackend)
    other = await service.router.acquire(request_for(pull=2, path="envs/other"))
    assert other.acquired and other.lock is not None and other.lock.backend == "enhanced"


async def test_a_failed_switch_whose_new_locker_fails_to_close_still_closes_the_new_store(
    redis_server: RedisServer, make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The new locker cannot start (as above) and its close fails too (after it let go of
    # what it holds). Before, that close's error skipped the rest of the failure branch: the
    # new backend stayed open (its connections to Redis with it) and the old store's
    # unreadable locks were no longer reported.
    service, running, old_store, switch = await _refused_switch(redis_server, make_service)
    closing = EnhancedLocker.close

    async def close_failing(locker: EnhancedLocker) -> None:
        await closing(locker)
        if locker is not running:
            raise RuntimeError("close failed")

    monkeypatch.setattr(EnhancedLocker, "close", close_failing)
    seen: list[Event] = []
    service.events.subscribe(seen.append)

    with pytest.raises(ConfigRejected):
        await service.provider.set_layer("cluster", switch)

    assert service.enhanced is running and running.backend is old_store
    assert await _connections(redis_server, USER) == 0  # the new backend was closed
    spoiled = await service.router.acquire(request_for(pull=4, path="envs/spoiled"))
    assert spoiled.acquired and spoiled.lock is not None
    spoil_file(str(old_store.path), old_store.namespace, spoiled.lock.key, "not a lock")
    assert await service.router.list() == []
    [found] = [e for e in seen if e.type == "lock-unreadable"]
    assert found.key == spoiled.lock.key and found.details["side"] == "enhanced"
