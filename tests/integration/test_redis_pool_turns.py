"""Callers that wait for a pooled Redis connection are served in the order they came.

On one Redis (and through Sentinel) the store's calls wait in the pool of
``enhanced-locking-redis-pool-size`` connections when every one is in use. A connection given
back goes to the caller that has waited longest: not to one that arrived after it, and not
into the connections the scripts' calls keep between calls while a caller waits. The
notifications' subscription has a connection of its own, outside the pool.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from tests.support.locks import candidate_for, lock_for, request_for
from tests.support.redis_fixtures import redis_config
from tests.support.redis_server import RedisServer

from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.backends.waiting import QueuePolicy, Status, Wait

pytestmark = pytest.mark.redis

ANSWERED = 30.0
"""Seconds a test waits for a call or a connection it expects: the store's own limits (the
pool's 4 s, a call's 5 s) decide what it gets, a loaded machine can stall the loop for seconds,
and a wait of 1 to 3 s here was the test's guess, not a bound of the store."""


def _pool(backend: RedisBackend) -> aioredis.ConnectionPool:
    client = backend.connection.client
    assert isinstance(client, aioredis.Redis)
    return client.connection_pool


async def _one_taken(backend: RedisBackend) -> Any:
    """After one call (its connection no longer kept), a pooled connection taken by hand, as
    another user of the client takes one (to be given back by the caller)."""
    assert (await backend.acquire(lock_for(request_for(project="warm", pull=1))))[0]
    await backend.connection.drop_idle()
    return await _pool(backend).get_connection()  # type: ignore[no-untyped-call]


async def test_a_connection_given_back_goes_to_the_caller_that_waited_longest(
    redis_server: RedisServer,
) -> None:
    backend = RedisBackend.from_config(redis_config(redis_server, redis_pool_size=2), "turns")
    pool = _pool(backend)
    try:
        taken = [await pool.get_connection() for _ in range(2)]  # type: ignore[no-untyped-call]
        first = asyncio.ensure_future(pool.get_connection())  # type: ignore[no-untyped-call]
        await asyncio.sleep(0.05)  # it waits
        later = asyncio.ensure_future(pool.get_connection())  # type: ignore[no-untyped-call]
        # The later caller is on its way when a connection comes back: redis-py's pool woke
        # the first and let the later one, which ran before it, take the connection.
        await pool.release(taken.pop())
        done, _ = await asyncio.wait({first, later}, timeout=ANSWERED,
                                     return_when=asyncio.FIRST_COMPLETED)
        assert done == {first}, "the connection went to a caller that came later"
        await asyncio.sleep(0.05)
        assert not later.done()
        await pool.release(first.result())
        await pool.release(await asyncio.wait_for(later, ANSWERED))
        await pool.release(taken.pop())
    finally:
        await backend.close()


async def test_a_call_waiting_for_a_connection_is_given_the_one_a_call_finishes_with(
    redis_server: RedisServer,
) -> None:
    """With a pool of 2, one connection taken by another user and one call under way, a call
    that waits gets the under way call's connection when it is answered. Before, that
    connection was kept for the scripts' next call, idle, and the waiting call waited out the
    pool's 4 s bound and was answered ``overloaded``."""
    backend = RedisBackend.from_config(redis_config(redis_server, redis_pool_size=2), "turns")
    pool = _pool(backend)
    try:
        other = await _one_taken(backend)
        try:
            with redis_server.paused():
                under_way = asyncio.ensure_future(
                    backend.acquire(lock_for(request_for(project="a", pull=2))))
                await asyncio.sleep(0.1)  # sent, not answered: Redis is stopped
                waiting = asyncio.ensure_future(
                    backend.acquire(lock_for(request_for(project="b", pull=3))))
                await asyncio.sleep(0.1)  # no connection free: it waits in the pool
                assert not waiting.done()
            granted, _ = await asyncio.wait_for(under_way, ANSWERED)
            assert granted
            granted, _ = await asyncio.wait_for(waiting, ANSWERED)
            assert granted
        finally:
            await pool.release(other)
    finally:
        await backend.close()


async def test_the_subscription_takes_no_connection_of_the_pool(
    redis_server: RedisServer,
) -> None:
    backend = RedisBackend.from_config(redis_config(redis_server, redis_pool_size=2), "turns")
    pool = _pool(backend)
    try:
        holder = request_for(project="held", pull=1)
        assert (await backend.acquire(lock_for(holder)))[0]
        outcome = await backend.acquire_or_enqueue(
            candidate_for(request_for(project="held", pull=2)), ttl=None,
            wait=Wait(id="w1", timeout=timedelta(seconds=30)), policy=QueuePolicy())
        assert outcome.status is Status.QUEUED
        await backend.connection.drop_idle()
        # Both pooled connections are there for calls; before, the subscription held one
        # and the second wait ran out.
        taken = [await asyncio.wait_for(pool.get_connection(), ANSWERED)  # type: ignore[no-untyped-call]
                 for _ in range(2)]
        for connection in taken:
            await pool.release(connection)
    finally:
        await backend.close()


async def test_a_call_that_waited_for_a_connection_has_its_whole_limit_for_the_answer(
    redis_server: RedisServer,
) -> None:
    """Pool of 1, its connection taken by another user for 3.2 s (less than the pool's 4 s
    bound); the call is then sent to a Redis stopped for 2.3 s. It is answered 5.5 s after it
    began, 2.3 s after it was sent: granted. Before, the wait counted inside the call's 5 s
    limit, and the call was told Redis did not answer (``unavailable``: a router fell back to
    legacy) though Redis answered it 2.3 s after it was sent."""
    backend = RedisBackend.from_config(redis_config(redis_server, redis_pool_size=1), "turns")
    pool = _pool(backend)
    try:
        other = await _one_taken(backend)
        call = asyncio.ensure_future(backend.acquire(lock_for(request_for(project="a", pull=2))))
        await asyncio.sleep(3.2)
        assert not call.done()
        with redis_server.paused():
            await pool.release(other)  # the call takes it and is sent at once
            await asyncio.sleep(2.3)
        granted, _ = await asyncio.wait_for(call, ANSWERED)
        assert granted
    finally:
        await backend.close()
