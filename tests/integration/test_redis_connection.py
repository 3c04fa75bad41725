"""Connecting to a real Redis: outages, passwords, ACL users, TLS and Sentinel.

The password must never show: not in errors, not in logs, not in a repr.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from redis.exceptions import BusyLoadingError, ResponseError
from tests.support.locks import candidate_for, lock_for, request_for
from tests.support.redis_fixtures import ServerMaker, redis_config
from tests.support.redis_server import RedisSentinel, RedisServer, find_redis_server

from enhanced_locking.backends import redis_notify
from enhanced_locking.backends.atlantis_redis import AtlantisRedisBackend
from enhanced_locking.backends.audit_store import AuditQuery, build_audit_store
from enhanced_locking.backends.redis_connection import connect, unavailable
from enhanced_locking.backends.redis_events import RedisEventBus
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.backends.waiting import QueuePolicy, Status, Wait
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.types import AuditEntry, BackendUnavailable, utcnow

pytestmark = pytest.mark.redis

PASSWORD = "pw-3f9a1c-never-printed"


async def test_a_stopped_redis_is_unavailable_and_usable_again_once_back(
    redis_servers: ServerMaker,
) -> None:
    server = redis_servers(persistence="aof")
    backend = RedisBackend.from_config(redis_config(server), "enhanced")
    try:
        await backend.ping()
        granted, held = await backend.acquire(lock_for(request_for(pull=1)))
        assert granted
        server.stop()
        with pytest.raises(BackendUnavailable, match=server.addr) as caught:
            await backend.acquire(lock_for(request_for(pull=2)))
        assert caught.value.key == request_for().key
        with pytest.raises(BackendUnavailable, match="ping"):
            await backend.ping()
        server.start()
        await backend.ping()
        granted, holder = await backend.acquire(lock_for(request_for(pull=2)))
        assert not granted and holder.fencing_token == held.fencing_token
    finally:
        await backend.close()


async def test_a_waiter_held_up_by_the_subscription_counts_as_busy(
    redis_server: RedisServer,
) -> None:
    # Tests wait until no call waits for Redis and no notification is being handled before
    # they look at queues (``settle``); a waiter still waiting for the notification
    # subscription has its enqueue ahead of it, so the listener says it is busy meanwhile.
    # The server is stopped (SIGSTOP): the subscription's new connection waits for its
    # handshake's answer.
    backend = RedisBackend.from_config(redis_config(redis_server), "enhanced")
    try:
        with redis_server.paused():
            enqueue = asyncio.ensure_future(backend.acquire_or_enqueue(
                candidate_for(request_for(pull=2)), ttl=None, policy=QueuePolicy(),
                wait=Wait(id="joining", timeout=timedelta(seconds=30))))
            await asyncio.sleep(0.2)
            assert not enqueue.done() and backend.in_flight == 0
            assert backend._listener.busy, "a caller waits for the subscription"
            enqueue.cancel()
            with pytest.raises(asyncio.CancelledError):
                await enqueue
            assert not backend._listener.busy
    finally:
        await backend.close()


async def test_script_calls_keep_connections_only_up_to_half_the_pool(
    redis_server: RedisServer,
) -> None:
    # The scripts' calls keep their connections between calls; the client's other commands
    # (a read of the server's clock here) still find one, even with a pool of one or two
    # after a burst of calls at once.
    for size in (1, 2, 4):
        backend = RedisBackend.from_config(
            redis_config(redis_server, redis_pool_size=size), f"pool{size}")
        try:
            answers = await asyncio.gather(*(
                backend.acquire(lock_for(request_for(project=f"p{n}", pull=n)))
                for n in range(1, 2 * size + 2)))
            assert all(granted for granted, _ in answers)
            assert len(backend.connection._idle) <= size // 2
            await asyncio.wait_for(backend.now(), 2.0)
        finally:
            await backend.close()


async def test_a_call_cut_off_before_its_answer_leaves_nothing_for_the_next_call(
    redis_server: RedisServer,
) -> None:
    # An acquire cancelled while Redis is stopped: its answer, if Redis runs it later, must
    # never be read as the answer to the next call on a kept connection.
    backend = RedisBackend.from_config(redis_config(redis_server), "enhanced")
    first, second = request_for(project="first", pull=1), request_for(project="second", pull=2)
    try:
        assert (await backend.acquire(lock_for(request_for(project="warm", pull=3))))[0]
        with redis_server.paused():
            cut = asyncio.ensure_future(backend.acquire(lock_for(first)))
            await asyncio.sleep(0.2)
            cut.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cut
        assert await backend.get(second.key) is None
        granted, held = await backend.acquire(lock_for(second))
        assert granted and held.key == second.key and held.pull.num == 2
        holder = await backend.get(second.key)
        assert holder is not None and holder.fencing_token == held.fencing_token
    finally:
        await backend.close()


@pytest.mark.parametrize("many", [False, True], ids=["call", "call_all"])
async def test_an_error_reply_that_means_the_connection_is_unusable_is_raised_not_answered(
    redis_server: RedisServer, many: bool,
) -> None:
    # Redis answers LOADING while it loads its data after a restart: redis-py raises that as
    # BusyLoadingError (a ConnectionError: retried, the connection dropped), never as an
    # answer; the calls that read answers straight from the connection do the same, and the
    # connection's next call is answered as always.
    connection = connect(redis_config(redis_server))
    loading = ("EVAL", "return redis.error_reply('LOADING Redis is loading the dataset')", "0")
    refused = ("EVAL", "return redis.error_reply('ERR refused')", "0")
    try:
        with pytest.raises(BusyLoadingError, match="loading the dataset"):
            if many:
                await connection.call_all([("PING",), loading, ("PING",)])
            else:
                await connection.call(*loading)
        with pytest.raises(ResponseError, match="refused"):  # an answer: the connection stays
            await connection.call(*refused)
        assert await connection.call("PING") in ("PONG", True)
        assert await connection.call_all([("PING",), ("ECHO", "x")]) == ["PONG", "x"]
    finally:
        await connection.close()


@pytest.mark.parametrize("code", ["OOM", "READONLY", "NOREPLICAS", "BUSY"])
async def test_a_refusal_a_script_met_and_raised_again_is_an_outage(
    redis_server: RedisServer, code: str,
) -> None:
    # The scripts raise again the refusals they meet that are about Redis (lua/lib.lua's
    # `run`); through Lua's pcall Redis answers them as ERR followed by the code (on Redis 6.2
    # a script's first write can be refused with OOM, READONLY or NOREPLICAS), a plain
    # ResponseError: still Redis refusing, BackendUnavailable, never a bare error (a 500).
    connection = connect(redis_config(redis_server))
    raised_again = (f"local ok, e = pcall(function() error({{err = '{code} refused'}}) end) "
                    "error(e, 0)")
    try:
        with pytest.raises(BackendUnavailable, match=f"{code} refused"):
            async with unavailable(connection, "acquire"):
                await connection.call("EVAL", raised_again, "0")
        with pytest.raises(ResponseError, match="refused"):  # a script's own error stays one
            async with unavailable(connection, "acquire"):
                await connection.call("EVAL", "error({err = 'ERR refused'})", "0")
    finally:
        await connection.close()


async def test_requirepass_is_used_and_never_shown(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    redis_server.set_requirepass(PASSWORD)
    good = RedisBackend.from_config(redis_config(redis_server), "enhanced")
    wrong = RedisBackend.from_config(
        redis_config(redis_server, redis_password=PASSWORD + "-wrong"), "enhanced")
    missing = RedisBackend.from_config(redis_config(redis_server, redis_password=""), "enhanced")
    try:
        assert (await good.acquire(lock_for(request_for())))[0]
        for backend in (wrong, missing):
            with pytest.raises(BackendUnavailable) as caught:
                await backend.acquire(lock_for(request_for(pull=2)))
            assert PASSWORD not in str(caught.value)
            assert "Authentication" in str(caught.value)
        for backend in (good, wrong, missing):
            assert PASSWORD not in repr(backend)
            assert PASSWORD not in repr(backend.connection.client)
    finally:
        for backend in (good, wrong, missing):
            await backend.close()
    assert PASSWORD not in caplog.text


# The least-privilege ACL docs/03-redis.md recommends (default key prefix).
LEAST_PRIVILEGE = (
    "~atlantis:enhanced:*", "~pr/*", "&atlantis:enhanced:*", "-@all", "+@read", "+@write",
    "+@scripting", "+@pubsub", "+@stream", "+@connection", "+time", "-@dangerous",
    "+client|setname", "+info",
)


def paste_the_documented_acl(redis_server: RedisServer) -> None:
    """docs/03-redis.md's ``ACL SETUSER`` command, run with bash as written (only the server's
    port and the password are this test's): it makes the user ``atlantis-locks``."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "03-redis.md").read_text()
    found = re.search(r"```sh\n(redis-cli ACL SETUSER .*?)```", page, re.S)
    assert found is not None, "docs/03-redis.md: no ACL SETUSER block"
    cli = Path(find_redis_server()).with_name("redis-cli")
    if not cli.exists():
        pytest.fail(f"{cli} is missing: install Debian's redis-tools (make redis)", pytrace=False)
    script = found.group(1).replace("redis-cli", f"{cli} -p {redis_server.port}", 1)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c",
                             script.replace("PASSWORD", PASSWORD)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert (result.returncode, result.stdout.strip()) == (0, "OK"), result


async def test_an_acl_user_with_the_documented_rights_works_and_one_without_is_reported(
    redis_server: RedisServer,
) -> None:
    paste_the_documented_acl(redis_server)
    redis_server.create_acl_user("locker", PASSWORD, rules=LEAST_PRIVILEGE)
    with redis_server.client() as admin:  # the rules the other tests take away from
        pasted, copied = (admin.execute_command("ACL", "GETUSER", user)
                          for user in ("atlantis-locks", "locker"))
    rights = [b"commands", b"keys", b"channels", b"selectors"]  # not flags: reset sanitizes
    assert [pasted[name] for name in rights] == [copied[name] for name in rights]
    redis_server.create_acl_user("outsider", PASSWORD, rules=("~elsewhere:*", "&*", "+@all"))
    config = redis_config(redis_server, redis_username="atlantis-locks", redis_password=PASSWORD,
                          legacy_backend="redis", audit_max_entries=100)
    locker = RedisBackend.from_config(config, "enhanced")
    legacy = AtlantisRedisBackend.from_config(config, "legacy")
    events = RedisEventBus.from_config(config)
    audit = build_audit_store(config)
    outsider = RedisBackend.from_config(
        redis_config(redis_server, redis_username="outsider", redis_password=PASSWORD),
        "enhanced")
    try:
        granted, lock = await locker.acquire(lock_for(request_for()))
        assert granted and lock.fencing_token == 1
        wait = Wait(id="w", timeout=timedelta(seconds=10))
        heard = locker.grants.expect(wait.id)
        queued = await locker.acquire_or_enqueue(candidate_for(request_for(pull=2)), ttl=None,
                                                 wait=wait, policy=QueuePolicy())
        assert queued.status is Status.QUEUED
        await locker.release(lock.key)
        assert (await asyncio.wait_for(heard, 5)).locks[0].pull.num == 2
        assert (await legacy.acquire(lock_for(request_for(pull=3), backend="legacy")))[0]
        events.publish("fallback", key=lock.key)
        assert (await asyncio.wait_for(anext(events.stream("0-0")), 5)).type == "fallback"
        # The audit trail's append script, its bound on refusals (LPOP, XDEL) included.
        for pull in range(1, 103):
            await audit.append(AuditEntry(
                time=utcnow(), identity="anonymous", method="none", verb="read",
                action="list-locks", pull=pull, outcome="unauthenticated", status=401))
        kept = await audit.read(AuditQuery(limit=1000))
        assert [entry.pull for entry in kept] == list(range(102, 2, -1))
        with pytest.raises(BackendUnavailable, match="NoPermissionError") as caught:
            await outsider.acquire(lock_for(request_for(pull=2)))
        assert PASSWORD not in str(caught.value)
    finally:
        for closing in (locker, legacy, events, outsider, audit):
            await closing.close()


@pytest.mark.parametrize("denied", ["smembers", "zrange"])
async def test_a_command_the_acl_denies_a_script_is_reported_as_a_refusal_not_as_damage(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, denied: str,
) -> None:
    # Redis 7.0 answers a command an ACL denies inside a script with "The user executing the
    # script can't run this command" (an ERR, not NOPERM). Read as another Redis type it had
    # the held index rebuilt and then reported "not a set (Redis type set) again", or the
    # key's queue reported unreadable ("not a sorted set (Redis type none)"): the wrong cause.
    redis_server.create_acl_user("locker", PASSWORD, rules=(*LEAST_PRIVILEGE, f"-{denied}"))
    locker = RedisBackend.from_config(redis_config(
        redis_server, redis_username="locker", redis_password=PASSWORD), "enhanced")
    try:
        granted, lock = await locker.acquire(lock_for(request_for()))  # (the lean path)
        assert granted
        read = locker.list() if denied == "smembers" else locker.queue(lock.key)
        with pytest.raises(BackendUnavailable,
                           match=r"NoPermissionError: .*can't run this command") as caught:
            await read
        assert PASSWORD not in str(caught.value)
        assert "rebuilt" not in caplog.text
        assert len(locker.unreadable) == 0
    finally:
        await locker.close()
    admin = redis_server.client()
    assert admin.smembers(locker.keys.held) == {lock.key.encode()}


async def test_a_subscription_the_acl_refuses_is_reported_with_its_cause(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A user without the rights to the notify channel (no &atlantis:enhanced:*): a waiting
    # acquire cannot subscribe. It is told so, with Redis's refusal, not only "did not
    # answer"; before, the first refusal also ended the subscription's task for good.
    monkeypatch.setattr(redis_notify, "_SUBSCRIBE_WAIT", 1.0)
    rules = tuple(rule for rule in LEAST_PRIVILEGE if not rule.startswith("&"))
    redis_server.create_acl_user("locker", PASSWORD, rules=(*rules, "resetchannels"))
    locker = RedisBackend.from_config(redis_config(
        redis_server, redis_username="locker", redis_password=PASSWORD), "enhanced")
    try:
        for _ in range(2):  # (the second asks a subscription that keeps trying)
            with pytest.raises(BackendUnavailable, match=r"subscribe.*NoPermissionError"):
                await locker.acquire_or_enqueue(
                    candidate_for(request_for(pull=2)), ttl=None, policy=QueuePolicy(),
                    wait=Wait(id="w", timeout=timedelta(seconds=10)))
    finally:
        await locker.close()


async def test_tls_with_the_ca_and_a_client_certificate(redis_servers: ServerMaker) -> None:
    server = redis_servers(tls=True)
    backend = RedisBackend.from_config(redis_config(server), "enhanced")
    try:
        granted, _ = await backend.acquire(lock_for(request_for()))
        assert granted
    finally:
        await backend.close()


async def test_tls_skip_verify_connects_without_the_ca_and_verification_refuses_it(
    redis_servers: ServerMaker,
) -> None:
    server = redis_servers(tls=True)
    skipping = RedisBackend.from_config(
        redis_config(server, redis_tls_ca_file="", redis_tls_cert_file="",
                     redis_tls_key_file="", redis_tls_skip_verify=True), "enhanced")
    verifying = RedisBackend.from_config(
        redis_config(server, redis_tls_ca_file="", redis_tls_cert_file="",
                     redis_tls_key_file=""), "enhanced")
    try:
        await skipping.ping()
        with pytest.raises(BackendUnavailable, match="certificate verify failed"):
            await verifying.ping()
    finally:
        await skipping.close()
        await verifying.close()


@dataclass
class _Forward:
    """Where :func:`_forwarding` sends each new connection (``target``), and its address."""

    target: RedisServer
    addr: str = ""


@contextlib.asynccontextmanager
async def _forwarding(target: RedisServer) -> AsyncIterator[_Forward]:
    """A loopback TCP forwarder to one Redis, whose target can be moved, as a DNS name or a
    virtual IP moves to a new master in a failover: connections opened before stay with the
    old one."""
    forward = _Forward(target)

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()

    async def serve(client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        to = forward.target
        server_in, server_out = await asyncio.open_connection(to.host, to.port)
        await asyncio.gather(pipe(client_in, server_out), pipe(server_in, client_out),
                             return_exceptions=True)

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    forward.addr = f"127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    try:
        yield forward
    finally:
        listener.close()


async def test_a_call_refused_read_only_is_sent_again_on_a_new_connection(
    redis_servers: ServerMaker,
) -> None:
    # A failover behind the address: it now leads to the new master, while the connections
    # the store keeps still reach the old one, now a replica (REPLICAOF closes no client's
    # connection), which answers READONLY. A write refused so did not run: it is sent once
    # more on a new connection, as redis-py's Sentinel connections do, instead of every call
    # answered unavailable on the kept ones until the service restarts.
    old, new = redis_servers(), redis_servers()
    async with _forwarding(old) as forward:
        backend = RedisBackend.from_config(EnhancedLockingConfig(redis_addr=forward.addr),
                                           "enhanced")
        try:
            granted, lock = await backend.acquire(lock_for(request_for(pull=1)))
            assert granted
            promoted, demoted = new.client(), old.client()
            demoted.config_set("repl-diskless-sync-delay", "0")  # (5 s by default)
            promoted.replicaof(old.host, str(old.port))
            for _ in range(400):  # (the new master has what the old one had)
                if promoted.exists(backend.keys.lock(lock.key), backend.keys.incarnation) == 2:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the replica did not sync within 20 s")
            promoted.replicaof("NO", "ONE")
            demoted.replicaof(new.host, str(new.port))
            forward.target = new
            assert await backend.release(lock.key, owner=("acme/infra", 1)) == lock
            granted, again = await backend.acquire(lock_for(request_for(pull=2)))
            assert granted and again.fencing_token == lock.fencing_token + 1
        finally:
            await backend.close()


async def test_sentinel_finds_the_master(redis_server: RedisServer, tmp_path: Path) -> None:
    redis_server.set_requirepass(PASSWORD)
    sentinel = RedisSentinel(tmp_path / "sentinel", redis_server).start()
    backend = RedisBackend.from_config(
        redis_config(redis_server, redis_addr="localhost:1", redis_sentinel_addrs=[sentinel.addr],
                     redis_sentinel_master=sentinel.name), "enhanced")
    try:
        granted, _ = await backend.acquire(lock_for(request_for()))
        assert granted
        assert "via sentinels" in repr(backend) and PASSWORD not in repr(backend)
        with redis_server.client() as admin:
            assert admin.exists(f"atlantis:enhanced:enhanced:lock:{{{request_for().key}}}")
    finally:
        await backend.close()
        sentinel.close()
