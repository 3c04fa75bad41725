"""Redis restarting under the backend, with and without persistence (in process).

With AOF persistence a restart loses nothing: the holder still holds, tokens continue, a waiter
queued before the restart is still served after it. Without persistence Redis comes back
empty: the backend notices (the store's incarnation is gone), refuses grants for
``redis-restart-quarantine`` (so a lock held before is not granted again at once), and then
hands out tokens that continue from the server clock, above every token handed out before.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
import pytest
from tests.conftest import ServiceMaker
from tests.support.locks import candidate_for, lock_for, request_for
from tests.support.redis_fixtures import ServerMaker, redis_config
from tests.support.redis_server import RedisServer

from enhanced_locking.api import create_app
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.backends.waiting import QueuePolicy, Status, Wait
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.types import BackendUnavailable, Reason

pytestmark = pytest.mark.redis

POLICY = QueuePolicy()


async def test_with_persistence_a_restart_keeps_holders_tokens_and_waiters(
    redis_servers: ServerMaker,
) -> None:
    server = redis_servers(persistence="aof")
    backend = RedisBackend.from_config(redis_config(server), "enhanced")
    try:
        _, held = await backend.acquire(lock_for(request_for(pull=1)))
        wait = Wait(id="w-2", timeout=timedelta(seconds=30))
        future = backend.grants.expect(wait.id)
        queued = await backend.acquire_or_enqueue(candidate_for(request_for(pull=2)), ttl=None,
                                                  wait=wait, policy=POLICY)
        assert queued.status is Status.QUEUED
        server.restart()
        await backend.ping()
        assert (await backend.get(held.key)) == held
        # The waiter's replica reconnects to its notifications and is still served.
        handoff = await backend.release_and_handoff(held.key, policy=POLICY)
        assert [g.waiter.id for g in handoff.granted] == ["w-2"]
        notice = await asyncio.wait_for(future, 10)
        assert notice.locks[0].pull.num == 2
        assert notice.locks[0].fencing_token == held.fencing_token + 1
    finally:
        await backend.close()


def _without_persistence(redis_servers: ServerMaker) -> tuple[RedisServer, EnhancedLockingConfig]:
    """A server without persistence, and settings for it with a short restart quarantine."""
    server = redis_servers(persistence="none")
    return server, redis_config(server, redis_restart_quarantine=timedelta(milliseconds=600))


async def test_without_persistence_grants_wait_out_the_quarantine_and_tokens_keep_rising(
    redis_servers: ServerMaker,
) -> None:
    server, config = _without_persistence(redis_servers)
    backend = RedisBackend.from_config(config, "enhanced")
    try:
        tokens = []
        for pull in (1, 2, 3):
            _, lock = await backend.acquire(lock_for(request_for(pull=pull)))
            tokens.append(lock.fencing_token)
            await backend.release(lock.key)
        assert tokens == [1, 2, 3]
        _, before = await backend.acquire(lock_for(request_for(pull=4)))
        server.restart()
        with pytest.raises(BackendUnavailable, match="lost its data") as refused:
            await backend.acquire(lock_for(request_for(pull=5)))
        assert "grants resume in" in str(refused.value)
        with pytest.raises(BackendUnavailable, match="grants resume in"):
            await backend.ping()  # readiness says so too
        # Another replica learns of the quarantine from the store itself.
        other = RedisBackend.from_config(config, "enhanced")
        try:
            with pytest.raises(BackendUnavailable, match="grants resume in"):
                await other.acquire(lock_for(request_for(pull=6)))
        finally:
            await other.close()
        await asyncio.sleep(0.7)
        granted, after = await backend.acquire(lock_for(request_for(pull=5)))
        assert granted and after.fencing_token > before.fencing_token
        await backend.ping()
        # The counter started from the clock is listed with the others (an export finds it),
        # and stays listed through the grants after it.
        await backend.release(after.key)
        _, again = await backend.acquire(lock_for(request_for(pull=6)))
        _, tokens_now = await backend.export()
        assert tokens_now == {again.key: again.fencing_token}
    finally:
        await backend.close()


async def test_a_replica_that_knew_the_lost_store_starts_the_quarantine_a_new_one_could_not(
    redis_servers: ServerMaker,
) -> None:
    # After a restart without persistence, the first call came from a replica started since
    # (it knew no incarnation): the store started anew at 0, no quarantine, and the replicas
    # that knew the old store took the new one as it was: grants at once, tokens from 1
    # again on keys granted before. The first of those replicas to call now starts the
    # quarantine, and counters continue from the clock, the one started meanwhile too.
    server, config = _without_persistence(redis_servers)
    knew = RedisBackend.from_config(config, "enhanced")
    new = RedisBackend.from_config(config, "enhanced")
    try:
        _, first = await knew.acquire(lock_for(request_for(pull=1)))
        await knew.release(first.key)
        _, before = await knew.acquire(lock_for(request_for(pull=2)))
        server.restart()
        granted, meanwhile = await new.acquire(lock_for(request_for(pull=3)))
        assert granted  # (it cannot know: nothing in Redis says the data was lost)
        assert meanwhile.fencing_token == 1
        with pytest.raises(BackendUnavailable, match="lost its data"):
            await knew.acquire(lock_for(request_for(path="envs/other", pull=4)))
        with pytest.raises(BackendUnavailable, match="grants resume in"):
            await new.acquire(lock_for(request_for(path="envs/other", pull=4)))
        await asyncio.sleep(0.7)
        assert (await new.release(meanwhile.key)) is not None
        granted, after = await knew.acquire(lock_for(request_for(pull=4)))
        assert granted and after.fencing_token > before.fencing_token
        granted, other = await new.acquire(lock_for(request_for(path="envs/other", pull=4)))
        assert granted and other.fencing_token > before.fencing_token
    finally:
        await knew.close()
        await new.close()


async def test_a_reconnect_tells_unavailable_only_the_waiters_whose_record_was_lost(
    redis_servers: ServerMaker,
) -> None:
    """After its notifications reconnect a replica asks where each waiter it expects stands
    (``_recheck``, run on every reconnect). A waiter whose record went with the store's data
    is told ``unavailable``; a waiter whose enqueue has not reached the store yet (it waits for
    that very subscription, or its call is being retried) is left to that enqueue's answer.
    Telling it ``unavailable`` too answered its caller while the enqueue then queued a waiter
    nobody waited for: granted in its turn, it held the key until its claim lapsed."""
    server = redis_servers(persistence="none")
    config = redis_config(server, redis_restart_quarantine=timedelta(milliseconds=200))
    backend = RedisBackend.from_config(config, "enhanced")
    try:
        _, held = await backend.acquire(lock_for(request_for(pull=1)))
        lost = backend.grants.expect("w-2")
        queued = await backend.acquire_or_enqueue(
            candidate_for(request_for(pull=2)), ttl=None,
            wait=Wait(id="w-2", timeout=timedelta(seconds=30)), policy=POLICY)
        assert queued.status is Status.QUEUED
        on_its_way = backend.grants.expect("w-3")  # expected first, enqueued below
        server.restart()  # back empty: w-2's record is gone
        for _ in range(100):  # the quarantine passes
            try:
                await backend.ping()
                break
            except BackendUnavailable:
                await asyncio.sleep(0.05)
        await backend._recheck(["w-2", "w-3"])
        assert (await asyncio.wait_for(lost, 5)).reason is Reason.UNAVAILABLE
        assert not on_its_way.done(), "told unavailable before its enqueue had run"
        _, again = await backend.acquire(lock_for(request_for(pull=1)))
        waiting = await backend.acquire_or_enqueue(
            candidate_for(request_for(pull=3)), ttl=None,
            wait=Wait(id="w-3", timeout=timedelta(seconds=30)), policy=POLICY)
        assert waiting.status is Status.QUEUED
        await backend.release_and_handoff(again.key, policy=POLICY)
        notice = await asyncio.wait_for(on_its_way, 10)
        assert notice.locks and notice.locks[0].pull.num == 3
        assert notice.locks[0].fencing_token > held.fencing_token
    finally:
        await backend.close()


async def test_a_store_in_its_restart_quarantine_is_shown_up_but_not_granting(
    redis_servers: ServerMaker, make_service: ServiceMaker,
) -> None:
    # Redis back without its data answers every read, but the service refuses grants until
    # the quarantine ends: /metrics says both (store_up 1, store_granting 0), so an alert
    # can page on the refusals before any request comes, and both say 1 again after it.
    server = redis_servers(persistence="none")
    service = await make_service(enabled=True, backend="redis", redis_addr=server.addr,
                                 fallback="fail-closed",
                                 redis_restart_quarantine=timedelta(seconds=3))
    app = create_app(service, manage_lifecycle=False)
    transport = httpx.ASGITransport(app=app)
    up = '\nenhanced_locking_store_up{backend="enhanced"} 1.0\n'
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
        first = await http.post("/v1/locks", json=_acquire(1))
        assert first.status_code == 200, first.text
        scraped = (await http.get("/metrics")).text
        assert up in scraped and _granting("1.0") in scraped, scraped
        server.restart()
        refused = await http.post("/v1/locks", json=_acquire(2))
        assert refused.status_code == 503, refused.text
        assert refused.json()["reason"] == "unavailable", refused.text
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and "grants resume in" in ready.text, ready.text
        scraped = (await http.get("/metrics")).text
        assert up in scraped, "the store answers its reads: it is up"
        assert _granting("0.0") in scraped, "it grants nothing in its quarantine"
        for _ in range(100):
            await asyncio.sleep(0.1)
            if (await http.get("/readyz")).status_code == 200:
                break
        scraped = (await http.get("/metrics")).text
        assert up in scraped and _granting("1.0") in scraped, "granting again after it"


def _acquire(pull: int) -> dict[str, object]:
    return {"project": {"repoFullName": "acme/restart", "path": "p"}, "pull": {"num": pull}}


def _granting(value: str) -> str:
    return f'\nenhanced_locking_store_granting{{backend="enhanced"}} {value}\n'
