"""A call whose answer is late because Redis, or this process, is busy — not because Redis
stopped — is waited for, not told ``unavailable``: that answer makes a router fall back to
legacy (or a client give up) while Redis runs the call. Under a flood of waiting acquires on a
loaded machine the service's event loop stalled past a call's 5 s limit; the answer and the
limit's timer came due in one turn of the loop, and the call was cut off with its answer read.
A Redis that answers nothing (stopped, frozen) still ends the call at its limit
(``test_redis_outage``)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from tests.support.locks import lock_for, request_for
from tests.support.redis_cluster import RedisClusterNodes
from tests.support.redis_fixtures import redis_cluster_config, redis_config
from tests.support.redis_server import RedisSentinel, RedisServer
from tests.support.stalls import answered_across_a_stall

from enhanced_locking.backends.atlantis_redis import AtlantisRedisBackend
from enhanced_locking.backends.audit_store import RedisAuditStore, Retention
from enhanced_locking.backends.redis_connection import (
    BUSY_LIMIT,
    COMMAND_TIMEOUT,
    POOL_WAIT,
    SENTINEL_WAIT,
    RedisConnection,
    connect,
)
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.migration.routing_registry import RedisRoutingRegistry
from enhanced_locking.types import AuditEntry, BackendUnavailable

pytestmark = pytest.mark.redis

SPIN = ("local t = redis.call('TIME') local stop = t[1] * 1000000 + t[2] + ARGV[1] "
        "repeat for _ = 1, 100000 do end t = redis.call('TIME') "
        "until t[1] * 1000000 + t[2] >= stop return 1")
"""A script that keeps Redis busy for ARGV[1] microseconds, then answers (it reads the time
every 100,000 turns of an empty loop: few calls for the command log)."""


async def test_an_answer_that_came_while_the_event_loop_stalled_past_the_limit_is_taken(
    redis_server: RedisServer, redis_backend: RedisBackend,
) -> None:
    # Redis is stopped while the acquire is sent, and let go 1 s later, while this process's
    # event loop is held (past the call's 5 s limit).
    assert redis_server.process is not None
    process = redis_server.process
    process.send_signal(signal.SIGSTOP)
    try:
        granted, lock = await answered_across_a_stall(
            redis_backend.acquire(lock_for(request_for(pull=1))),
            lambda: process.send_signal(signal.SIGCONT), COMMAND_TIMEOUT)
    finally:
        process.send_signal(signal.SIGCONT)
    assert granted and lock.pull.num == 1


@contextlib.asynccontextmanager
async def _writes_held(redis_server: RedisServer, backend: RedisBackend) -> AsyncIterator[None]:
    """Redis holds every write for :data:`HELD` seconds (``CLIENT PAUSE WRITE``, as in a
    failover) while it answers the client's reads: a ``PING`` every 0.3 s. (Calls that keep
    Redis busy do not do it: Redis writes the answers of the commands it read together only
    once it has run them all, so twelve 0.6 s scripts read at once were answered together
    after 7.2 s, and Redis answered nothing meanwhile.)"""
    connection = backend.connection

    async def reads() -> None:
        while True:
            assert await connection.call("PING") == "PONG"
            await asyncio.sleep(0.3)

    with redis_server.client() as admin:
        admin.execute_command("CLIENT", "PAUSE", int(HELD * 1000), "WRITE")
    pinging = asyncio.create_task(reads())
    try:
        yield
    finally:
        pinging.cancel()
        await asyncio.gather(pinging, return_exceptions=True)
        with redis_server.client() as admin:
            admin.execute_command("CLIENT", "UNPAUSE")


HELD = COMMAND_TIMEOUT + 2
"""Seconds :func:`_writes_held` holds the writes: past the call's limit, within BUSY_LIMIT."""


async def test_a_call_behind_a_busy_redis_that_answers_other_calls_is_waited_for(
    redis_server: RedisServer, redis_backend: RedisBackend,
) -> None:
    # Redis holds the acquire (a write) past its 5 s limit while it answers the replica's
    # other calls: it is answered when Redis runs it.
    started = time.monotonic()
    async with _writes_held(redis_server, redis_backend):
        granted, lock = await redis_backend.acquire(lock_for(request_for(pull=1)))
        took = time.monotonic() - started
    assert granted and lock.pull.num == 1
    assert COMMAND_TIMEOUT < took < BUSY_LIMIT, took


async def test_a_call_behind_calls_that_redis_never_finishes_still_ends_at_its_limit(
    redis_server: RedisServer, redis_backend: RedisBackend,
) -> None:
    # One script keeps Redis busy past the call's limit (no other answer comes meanwhile):
    # a Redis that answers nothing, told as one at the 5 s limit, not waited for up to the
    # longer bound. (Past the busy-reply threshold Redis would answer BUSY: it is raised.)
    admin = redis_server.client()
    admin.config_set("busy-reply-threshold", "60000")
    spin = asyncio.create_task(redis_backend.connection.call("EVAL", SPIN, 0, 7_000_000))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    try:
        with pytest.raises(BackendUnavailable, match="within the call's 5 s limit"):
            await redis_backend.acquire(lock_for(request_for(pull=1)))
        took = time.monotonic() - started
        assert COMMAND_TIMEOUT - 0.5 < took < COMMAND_TIMEOUT + 1.5, took
    finally:
        await asyncio.gather(spin, return_exceptions=True)
        redis_server.client().config_set("busy-reply-threshold", "5000")


Call = Callable[[], Coroutine[Any, Any, object]]


def _redis_py_paths(backend: RedisBackend) -> dict[str, Call]:
    """One call on each path through redis-py's own commands, each under the call's limit:
    the store's reads outside its scripts, Atlantis's layout, the audit trail, the replica
    registry."""
    connection = backend.connection
    audit = RedisAuditStore(connection, "t:audit", Retention(timedelta(days=1), 100))
    registry = RedisRoutingRegistry(connection, prefix="t:")
    atlantis = AtlantisRedisBackend(connection)
    return {
        "store time": backend.now,
        "atlantis acquire": lambda: atlantis.acquire(lock_for(request_for(pull=2))),
        "audit append": lambda: audit.append(AuditEntry(
            time=datetime.now(UTC), identity="ada", method="static", verb="lock",
            action="acquire", key="acme/infra/1/default", repo="acme/infra", pull=1,
            outcome="acquired", status=200)),
        "replica report": lambda: registry.report(replica_id="a", weight=10, generation=1),
    }


async def _open_connections(backend: RedisBackend, count: int) -> None:
    """``count`` pooled connections opened (opening one is a call of its own)."""
    client = backend.connection.client
    assert await asyncio.gather(*(client.ping() for _ in range(count))) == [True] * count


async def test_answers_that_came_while_the_loop_stalled_are_taken_on_redis_py_paths(
    redis_server: RedisServer, redis_backend: RedisBackend,
) -> None:
    # As the first test, for every path that calls Redis through redis-py's own commands.
    paths = _redis_py_paths(redis_backend)
    await _open_connections(redis_backend, 8)
    assert redis_server.process is not None
    process = redis_server.process

    async def every_path() -> list[object]:
        return await asyncio.gather(*(call() for call in paths.values()), return_exceptions=True)

    process.send_signal(signal.SIGSTOP)
    try:
        answers = dict(zip(paths, await answered_across_a_stall(
            every_path(), lambda: process.send_signal(signal.SIGCONT), COMMAND_TIMEOUT),
            strict=True))
    finally:
        process.send_signal(signal.SIGCONT)
    failed = {name: answer for name, answer in answers.items()
              if isinstance(answer, BaseException)}
    assert not failed, failed
    atlantis = answers["atlantis acquire"]
    assert isinstance(atlantis, tuple) and atlantis[0] is True, atlantis


async def test_calls_on_redis_py_paths_behind_a_busy_redis_that_answers_others_are_waited_for(
    redis_server: RedisServer, redis_backend: RedisBackend,
) -> None:
    # As the second test, for the paths through redis-py's own commands (their writes are
    # held; the store's time, a read, is answered at once).
    paths = _redis_py_paths(redis_backend)
    await _open_connections(redis_backend, 8)
    started = time.monotonic()
    async with _writes_held(redis_server, redis_backend):
        answers = await asyncio.gather(*(call() for call in paths.values()),
                                       return_exceptions=True)
        took = time.monotonic() - started
    failed = {name: answer for name, answer in zip(paths, answers, strict=True)
              if isinstance(answer, BaseException)}
    assert not failed, failed
    assert COMMAND_TIMEOUT < took < BUSY_LIMIT, took


async def test_a_call_whose_redis_stops_just_after_answering_another_still_ends_at_its_limit(
    redis_server: RedisServer, redis_backend: RedisBackend,
) -> None:
    # The acquire is sent and held (writes paused); Redis answers a ping sent after it, then
    # stops. Redis has answered nothing since: the acquire ends 5 s after that answer, not
    # waited for a second 5 s because an answer came while it was under way (it ended at
    # 10 s).
    assert redis_server.process is not None
    with redis_server.client() as admin:
        admin.execute_command("CLIENT", "PAUSE", int(HELD * 1000), "WRITE")
    started = time.monotonic()
    try:
        call = asyncio.create_task(redis_backend.acquire(lock_for(request_for(pull=1))))
        await asyncio.sleep(0.2)  # sent, held
        assert not call.done()
        assert await redis_backend.connection.call("PING") == "PONG"
        redis_server.process.send_signal(signal.SIGSTOP)
        with pytest.raises(BackendUnavailable, match="within the call's 5 s limit"):
            await call
        took = time.monotonic() - started
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
        with redis_server.client() as admin:
            admin.execute_command("CLIENT", "UNPAUSE")
    # (5 s after the ping's answer; a second 5 s would end it at 10 s)
    assert COMMAND_TIMEOUT - 0.5 < took < COMMAND_TIMEOUT + 2.5, took


async def _two_on_one_connection(call: Call, resume: Callable[[], None]) -> list[object]:
    """``call`` twice at once on a pool of one connection (on a cluster, one turn), the store
    stopped by the caller: the first is sent and holds the connection, the second waits for
    it. The store is let go while the loop is held past the pool's wait, so when the loop runs
    again the first call's answer has come and the second's wait is due, both in one turn."""
    async def both() -> list[object]:
        return list(await asyncio.gather(call(), call(), return_exceptions=True))

    return await answered_across_a_stall(both(), resume, POOL_WAIT)


ON_ONE_REDIS: dict[str, Callable[[RedisConnection], Coroutine[Any, Any, object]]] = {
    "a script's call": lambda connection: connection.call("INCR", "k"),
    "redis-py's own command": lambda connection: connection.client.execute_command("INCR", "k"),
}


@pytest.mark.parametrize("path", list(ON_ONE_REDIS))
async def test_a_connection_handed_over_after_the_loop_stalled_past_the_pool_wait_is_used(
    redis_server: RedisServer, path: str,
) -> None:
    # Before: the first call read its answer in the turn after the wait's timer and handed its
    # connection over to a wait already given up; the second was answered StoreBusy (503
    # overloaded) while Redis answered every call.
    connection = connect(redis_config(redis_server, redis_pool_size=1))
    assert redis_server.process is not None
    process = redis_server.process
    try:
        assert await connection.call("PING") == "PONG"  # (its connection is open)
        process.send_signal(signal.SIGSTOP)
        try:
            answers = await _two_on_one_connection(
                lambda: ON_ONE_REDIS[path](connection),
                lambda: process.send_signal(signal.SIGCONT))
        finally:
            process.send_signal(signal.SIGCONT)
    finally:
        await connection.close()
    assert answers == [1, 2], answers


ON_A_CLUSTER: dict[str, Callable[[RedisConnection, str], Coroutine[Any, Any, object]]] = {
    "a call": lambda connection, key: connection.call("INCR", key),
    "a pipeline": lambda connection, key: connection.call_all([("INCR", key)]),
}


@pytest.mark.parametrize("path", list(ON_A_CLUSTER))
async def test_a_cluster_turn_handed_over_after_the_loop_stalled_past_the_pool_wait_is_taken(
    redis_cluster: RedisClusterNodes, redis_cluster_prefix: str, path: str,
) -> None:
    # As above, on a Redis Cluster: the second call waits for the one turn among the calls.
    connection = connect(redis_cluster_config(redis_cluster, redis_cluster_prefix,
                                              redis_pool_size=1))
    key = f"{redis_cluster_prefix}k"
    node = redis_cluster.node_of(key)
    assert node.process is not None
    process = node.process
    try:
        await connection.call("GET", key)  # (the slots are known, the connection open)
        process.send_signal(signal.SIGSTOP)
        try:
            answers = await _two_on_one_connection(
                lambda: ON_A_CLUSTER[path](connection, key),
                lambda: process.send_signal(signal.SIGCONT))
        finally:
            process.send_signal(signal.SIGCONT)
    finally:
        await connection.close()
    assert sorted(map(repr, answers)) == sorted(map(repr, _counted(path))), answers


def _counted(path: str) -> list[object]:
    """What the two calls of ``path`` answer on a fresh counter."""
    return [1, 2] if path == "a call" else [[1], [2]]


async def test_a_sentinel_answer_that_came_while_the_loop_stalled_past_its_limit_is_taken(
    redis_server: RedisServer, tmp_path: Path,
) -> None:
    # A connection to the master is opened once a Sentinel has named it. The Sentinel is
    # stopped while it is asked, and let go 1 s later while this process's event loop is held
    # past the limit of a Sentinel's answer (SENTINEL_WAIT): the answer is taken, the master
    # answers.
    # Before: the Sentinel's answer and redis-py's socket timeout came due in one turn, the
    # answer was dropped, and with no other Sentinel the call was told Redis did not answer
    # (MasterNotFoundError) while the master and the Sentinel both answered.
    sentinel = RedisSentinel(tmp_path / "sentinel", redis_server).start()
    connection = connect(redis_config(redis_server, redis_addr="localhost:1",
                                      redis_sentinel_addrs=[sentinel.addr],
                                      redis_sentinel_master=sentinel.name))
    assert sentinel.process is not None
    process = sentinel.process
    try:
        process.send_signal(signal.SIGSTOP)
        try:
            answer = await answered_across_a_stall(
                connection.call("PING"), lambda: process.send_signal(signal.SIGCONT),
                SENTINEL_WAIT)
        finally:
            process.send_signal(signal.SIGCONT)
    finally:
        await connection.close()
        sentinel.close()
    assert answer == "PONG"


async def test_a_stopped_first_sentinel_is_passed_over_within_the_call_s_limit(
    redis_server: RedisServer, tmp_path: Path,
) -> None:
    # The first Sentinel listed is stopped for good (a hung host): it is given SENTINEL_WAIT
    # to answer, then the next is asked, within the acquire's 5 s limit. Before, it was given
    # 5 s, the call's limit ran out first, and every acquire that opened a connection was
    # told Redis did not answer, for as long as that Sentinel hung (the order of the
    # Sentinels changes only when one answers).
    stopped = RedisSentinel(tmp_path / "stopped", redis_server).start()
    answering = RedisSentinel(tmp_path / "answering", redis_server).start()
    backend = RedisBackend.from_config(redis_config(
        redis_server, redis_addr="localhost:1", redis_sentinel_addrs=[stopped.addr, answering.addr],
        redis_sentinel_master=stopped.name), "enhanced")
    assert stopped.process is not None
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as paused:
            stopped.process.send_signal(signal.SIGSTOP)
            paused.callback(stopped.process.send_signal, signal.SIGCONT)
            granted, lock = await backend.acquire(lock_for(request_for(pull=1)))
            took = time.monotonic() - started
    finally:
        await backend.close()
        stopped.close()
        answering.close()
    assert granted and lock.pull.num == 1
    assert SENTINEL_WAIT - 0.5 < took < COMMAND_TIMEOUT, took


async def test_the_calls_limits_share_one_timer_of_the_event_loop(
    redis_backend: RedisBackend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each call of a script is bounded by COMMAND_TIMEOUT. The limits of calls armed one
    # after the other wait in one line behind one timer of the loop: a timer armed (and
    # cancelled, and later popped) a call cost the client more than the call's own Python.
    # The loop's own call_at, counted: the timers armed while 200 pairs run.
    loop = asyncio.get_running_loop()
    armed: list[object] = []
    call_at = loop.call_at

    def counted_call_at(when: float, callback: Callable[..., object], *args: Any,
                        context: Any = None) -> asyncio.TimerHandle:
        armed.append(callback)
        return call_at(when, callback, *args, context=context)

    await redis_backend.acquire(lock_for(request_for(pull=1)))  # (connections opened)
    await redis_backend.release(lock_for(request_for(pull=1)).key, owner=("acme/infra", 1))
    monkeypatch.setattr(loop, "call_at", counted_call_at)
    for _ in range(200):
        granted, lock = await redis_backend.acquire(lock_for(request_for(pull=1)))
        assert granted
        assert await redis_backend.release(lock.key, owner=("acme/infra", 1))
    monkeypatch.undo()
    assert len(armed) <= 2, len(armed)
    # A call past its limit is still ended at it (the line's timer runs on time): the
    # test above that keeps Redis busy past the limit shows it.


async def test_the_calls_are_written_on_their_connections_without_redis_py_s_send(
    redis_backend: RedisBackend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A script's call is written on its connection's stream itself (redis_connection._send),
    # not through redis-py's send_packed_command (two coroutines, the command's shapes
    # checked, a list of one buffer made and joined): counted, redis-py's sends while 200
    # pairs run on connections already open. How a broken connection fails is the same
    # (test_redis_outage).
    sent: list[object] = []
    send = aioredis.Connection.send_packed_command

    async def counted_send(self: aioredis.Connection, command: Any,
                           check_health: bool = True) -> None:
        sent.append(command)
        await send(self, command, check_health)

    await redis_backend.acquire(lock_for(request_for(pull=1)))  # (connections opened)
    await redis_backend.release(lock_for(request_for(pull=1)).key, owner=("acme/infra", 1))
    monkeypatch.setattr(aioredis.Connection, "send_packed_command", counted_send)
    for _ in range(200):
        granted, lock = await redis_backend.acquire(lock_for(request_for(pull=1)))
        assert granted
        assert await redis_backend.release(lock.key, owner=("acme/infra", 1))
    monkeypatch.undo()
    assert sent == []
