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

import pytest
from tests.support.locks import lock_for, request_for
from tests.support.redis_fixtures import ServerMaker, redis_config

from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.backends.waiting import QueuePolicy, Status, Wait
from enhanced_locking.types import BackendUnavailable

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
        queued = await backend.acquire_or_enqueue(lock_for(request_for(pull=2)), ttl=None,
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


async def test_without_persistence_grants_wait_out_the_quarantine_and_tokens_keep_rising(
    redis_servers: ServerMaker,
) -> None:
    server = redis_servers(persistence="none")
    config = redis_config(server, redis_restart_quarantine=timedelta(milliseconds=600))
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
    finally:
        await backend.close()
