"""Locks held on the enhanced side outlive enhanced locking being switched off.

A real ``enhanced-locking serve`` on the embedded store, and on a real redis-server: a pull
holds a key on the enhanced side, the service is started again with
``enhanced-locking-enabled`` off (its default) and the same store settings, and another pull
asks for the key: it is refused, naming the holder, until the holder lets go (the handover of
docs/02-migration.md, "Abort, disable, shadow").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.server
import logging
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from tests.conftest import ServiceFactory, ServiceMaker
from tests.support.locks import request_for
from tests.support.loopback_http import serving
from tests.support.redis_fixtures import ServerMaker
from tests.support.redis_server import RedisServer

from enhanced_locking.backends import EmbeddedBackend
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.types import Lock, Pull, Reason, User


def acquire(url: str, *, pull: int, wait: str | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/locks", json={
        "project": {"repoFullName": "acme/infra", "path": "envs/prod", "projectName": ""},
        "workspace": "default", "pull": {"num": pull}, "user": {"username": f"dev{pull}"},
        **({"wait": wait} if wait else {}),
    }, timeout=90)


@pytest.fixture(params=["boltdb", pytest.param("redis", marks=pytest.mark.redis)])
def store_flags(request: pytest.FixtureRequest) -> tuple[str, ...]:
    """The enhanced store's settings, the same with enhanced locking on and off."""
    if request.param == "boltdb":
        return ()
    redis_server = request.getfixturevalue("redis_server")
    return ("--enhanced-locking-backend=redis",
            f"--enhanced-locking-redis-addr={redis_server.addr}")


def test_a_hold_on_the_enhanced_side_is_honoured_after_a_restart_switched_off(
    service_process: ServiceFactory, store_flags: tuple[str, ...],
) -> None:
    service = service_process("--enhanced-locking-enabled", *store_flags)
    held = acquire(service.url, pull=12)
    assert held.status_code == 200 and held.json()["lock"]["backend"] == "enhanced", held.text
    assert service.stop() == 0
    service.args.remove("--enhanced-locking-enabled")
    service.start()

    other = acquire(service.url, pull=13)
    assert other.status_code == 409, other.text
    refused = other.json()
    assert refused["reason"] == "held"
    assert (refused["holder"]["pull"]["num"], refused["holder"]["backend"]) == (12, "enhanced")
    assert "honour them until they are released" in service.output()
    # A waiter is granted once the holder lets go, on legacy, the side the key routes to now.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(acquire, service.url, pull=13, wait="60s")
        mine = httpx.delete(service.url + "/v1/locks/by-key", timeout=10,
                            params={"key": held.json()["lock"]["key"], "pull": 12})
        assert mine.status_code == 200, mine.text
        granted = waiting.result(timeout=90)
    assert granted.status_code == 200, granted.text
    lock = granted.json()["lock"]
    assert (lock["pull"]["num"], lock["backend"]) == (13, "legacy")
    assert lock["fencingToken"] > held.json()["lock"]["fencingToken"]


@pytest.mark.redis
async def test_what_a_store_left_is_not_carried_to_the_store_the_settings_then_name(
    redis_server: RedisServer, make_service: ServiceMaker, data_dir: Path,
) -> None:
    """As the operator starts: its own settings off on the embedded store (the chart's), then
    the LockPolicy's, on, on Redis. A lock the embedded store still holds (left by a switch to
    Redis, which copies) is honoured from the start, but not copied into Redis with the switch
    the policy makes: there the key is free, and granted."""
    await _plant(data_dir, "enhanced", pull=12, token=5)
    service = await make_service()
    refused = await service.router.acquire(request_for(pull=13))
    assert not refused.acquired and refused.holder is not None
    assert refused.holder.pull.num == 12

    await service.provider.set_layer("cluster", {"enabled": True, "backend": "redis",
                                                 "redis_addr": redis_server.addr})
    enhanced = service.enhanced
    assert enhanced is not None and isinstance(enhanced.backend, RedisBackend)
    assert await enhanced.backend.list() == []
    granted = await service.router.acquire(request_for(pull=13))
    assert granted.acquired and granted.lock is not None, granted
    assert (granted.lock.pull.num, granted.lock.backend) == (13, "enhanced")


@pytest.mark.redis
async def test_a_key_a_store_left_held_beside_a_legacy_hold_is_no_conflict_after_the_switch(
    redis_server: RedisServer, make_service: ServiceMaker, data_dir: Path,
) -> None:
    """The same start, with the key held on legacy by another pull as well: the copy the
    embedded store kept is no lock of the store the policy names, and no conflict is reported
    (one would leave the migration Degraded, its Event sent, until the next start said so
    again)."""
    await _plant(data_dir, "enhanced", pull=12, token=5)
    await _plant(data_dir, "legacy", pull=14, token=7)
    service = await make_service()
    await service.provider.set_layer("cluster", {"enabled": True, "backend": "redis",
                                                 "redis_addr": redis_server.addr})
    assert service.migration.conflicts.keys() == []
    refused = await service.router.acquire(request_for(pull=13))
    assert not refused.acquired and refused.holder is not None
    assert (refused.holder.pull.num, refused.holder.backend) == (14, "legacy")


async def _plant(data_dir: Path, side: str, *, pull: int, token: int) -> None:
    """A lock of ``pull`` on the key of :func:`request_for` in the embedded store's ``side``."""
    store = EmbeddedBackend(data_dir / "enhanced-locking.db", side)
    try:
        asked = request_for(pull=pull)
        assert not await store.adopt([Lock(
            key=asked.key, project=asked.project, workspace="default", pull=Pull(num=pull),
            user=User(username="bob"), acquired_at=datetime.now(UTC), backend=side,
            fencing_token=token)], {})
    finally:
        await store.close()


@pytest.mark.redis
async def test_a_hold_in_the_store_the_policy_names_is_honoured_when_it_switches_enhanced_off(
    redis_server: RedisServer, make_service: ServiceMaker, data_dir: Path,
) -> None:
    """As the operator starts after the LockPolicy switched enhanced locking off: its own
    settings (the chart's: the embedded store, off, which holds nothing), then the policy's
    (off, on Redis). Redis still holds pull #12's lock from before the switch-off: the store
    the settings name is looked at when they name it, not only the one of the start."""
    before = await make_service(enabled=True, backend="redis", redis_addr=redis_server.addr,
                                data_dir=str(data_dir / "before"))
    held = await before.router.acquire(request_for(pull=12))
    assert held.acquired and held.lock is not None and held.lock.backend == "enhanced"

    service = await make_service()
    assert service.enhanced is None
    await service.provider.set_layer("cluster", {"enabled": False, "backend": "redis",
                                                 "redis_addr": redis_server.addr})
    refused = await service.router.acquire(request_for(pull=13))
    assert not refused.acquired and refused.holder is not None, refused
    assert (refused.holder.pull.num, refused.holder.backend) == (12, "enhanced")

    assert await before.router.release(held.lock.key) is not None
    granted = await service.router.acquire(request_for(pull=13))
    assert granted.acquired and granted.lock is not None, granted
    assert (granted.lock.pull.num, granted.lock.backend) == (13, "legacy")
    assert granted.lock.fencing_token > held.lock.fencing_token


async def test_a_store_address_that_answers_but_not_as_redis_does_not_refuse_a_switch_off(
    make_service: ServiceMaker, caplog: pytest.LogCaptureFixture,
) -> None:
    """The LockPolicy switches enhanced locking off and names a Redis whose address answers as
    another service does (an HTTP port, a real HTTP server here): the look for locks left there
    cannot read it, which is logged, and the settings are applied. Before, redis-py's protocol
    error came out of the look and the policy was refused with its words alone. Locks may
    remain in a store not read: none is granted meanwhile (``unavailable``, saying why)."""
    with contextlib.contextmanager(serving)(http.server.BaseHTTPRequestHandler) as url:
        service = await make_service()
        addr = url.removeprefix("http://")
        with caplog.at_level(logging.WARNING, logger="enhanced_locking.factory"):
            await service.provider.set_layer("cluster", {"enabled": False, "backend": "redis",
                                                         "redis_addr": addr})
        assert service.provider.current.config.redis_addr == addr
        looked = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
        assert len(looked) == 1 and addr in looked[0], looked
        refused = await service.router.acquire(request_for(pull=13))
        assert not refused.acquired and refused.reason is Reason.UNAVAILABLE, refused
        assert refused.error is not None and "could not be read" in refused.error


@pytest.mark.redis
async def test_a_store_that_does_not_answer_the_switch_off_look_is_looked_at_again(
    redis_servers: ServerMaker, make_service: ServiceMaker, data_dir: Path,
) -> None:
    """The LockPolicy switches enhanced locking off on the Redis that holds pull #12's lock,
    and that Redis is stopped when the policy is applied: its locks may remain, so no lock is
    granted (``unavailable``) until it answers; the look is made again, with a growing pause,
    and once Redis is back its hold is honoured. Before, the look that failed was not made
    again, and the key was granted to another pull on legacy, Redis down or back."""
    server = redis_servers(persistence="aof")
    before = await make_service(enabled=True, backend="redis", redis_addr=server.addr,
                                data_dir=str(data_dir / "before"))
    held = await before.router.acquire(request_for(pull=12))
    assert held.acquired and held.lock is not None and held.lock.backend == "enhanced"
    server.stop()

    service = await make_service()
    await service.provider.set_layer("cluster", {"enabled": False, "backend": "redis",
                                                 "redis_addr": server.addr})
    assert service.unread_store is not None and server.addr in service.unread_store
    waiting = await service.router.acquire(request_for(pull=13))
    assert not waiting.acquired and waiting.reason is Reason.UNAVAILABLE, waiting

    read = asyncio.Event()
    service.on_unread_store.append(read.set)
    server.start()
    async with asyncio.timeout(60):
        await read.wait()
    assert service.unread_store is None
    refused = await service.router.acquire(request_for(pull=13))
    assert not refused.acquired and refused.holder is not None, refused
    assert (refused.holder.pull.num, refused.holder.backend) == (12, "enhanced")

    assert await before.router.release(held.lock.key) is not None
    granted = await service.router.acquire(request_for(pull=13))
    assert granted.acquired and granted.lock is not None, granted
    assert (granted.lock.pull.num, granted.lock.backend) == (13, "legacy")
    assert granted.lock.fencing_token > held.lock.fencing_token


@pytest.mark.redis
async def test_a_look_made_again_never_applies_settings_older_than_those_in_force(
    redis_servers: ServerMaker, make_service: ServiceMaker, data_dir: Path,
) -> None:
    """Enhanced locking is switched off on a Redis that is down, so its look is made again in
    the background; newer settings (enhanced locking on, another Redis) are applied while that
    other Redis is slow to answer, and the look wakes meanwhile. Once those settings are in
    force the look applies nothing older: the locker stays on the Redis they name, so a key one
    replica grants there another replica on the same settings finds held. Before, the look
    applied the settings it had read as it woke, after the newer ones: the locker moved to the
    first Redis, back by then, and the two replicas granted one key to two pulls."""
    old = redis_servers(persistence="aof")
    old.stop()
    new = redis_servers()
    service = await make_service(data_dir=str(data_dir / "one"))
    await service.provider.set_layer("cluster", {"enabled": False, "backend": "redis",
                                                 "redis_addr": old.addr})
    assert service.unread_store is not None and old.addr in service.unread_store
    looking = service._looking
    assert looking is not None and not looking.done()

    with new.paused():  # the newer settings' ping waits; the look wakes (0.5 s) meanwhile
        applying = asyncio.ensure_future(service.provider.set_layer(
            "cluster", {"enabled": True, "backend": "redis", "redis_addr": new.addr}))
        await asyncio.sleep(1.2)
        assert not applying.done()
        old.start()  # the store the look was for answers again
    await applying
    async with asyncio.timeout(60):
        await looking
    assert service.provider.current.config.redis_addr == new.addr

    other = await make_service(enabled=True, backend="redis", redis_addr=new.addr,
                               data_dir=str(data_dir / "two"))
    granted = await service.router.acquire(request_for(pull=20))
    assert granted.acquired and granted.lock is not None, granted
    assert granted.lock.backend == "enhanced"
    refused = await other.router.acquire(request_for(pull=21))
    assert not refused.acquired and refused.holder is not None, refused
    assert refused.holder.pull.num == 20
