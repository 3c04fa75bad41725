"""Events through a Redis Stream: every replica sees every replica's events, in one order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.crc import key_slot
from tests.support.following import followed
from tests.support.leases import until
from tests.support.locks import request_for
from tests.support.redis_fixtures import redis_cluster_config, redis_config
from tests.support.redis_server import LOOPBACK, RedisServer, free_port
from tests.support.unreadable import SECRET

from enhanced_locking.backends import shared_events
from enhanced_locking.backends.redis_connection import connect
from enhanced_locking.backends.redis_events import RedisEventBus, writer_key
from enhanced_locking.backends.shared_events import Published
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import Following, Gap, parse_event_id
from enhanced_locking.factory import LockService
from enhanced_locking.provider import ConfigProvider
from enhanced_locking.types import Candidate, Event, Lock, Priority, utcnow

pytestmark = pytest.mark.redis


async def take(stream: AsyncIterator[Event], count: int) -> list[Event]:
    return [await asyncio.wait_for(anext(stream), 5) for _ in range(count)]


async def replicas(server: RedisServer, count: int, **settings: Any) -> list[LockService]:
    services = []
    for _ in range(count):
        config = redis_config(server, enabled=True, backend="redis", legacy_backend="memory",
                              **settings)
        service = LockService(ConfigProvider(config))
        await service.start()
        services.append(service)
    return services


async def test_each_replica_streams_every_replicas_events_in_one_order(
    redis_server: RedisServer,
) -> None:
    a, b = await replicas(redis_server, 2)
    try:
        assert isinstance(a.events.bus, RedisEventBus) and isinstance(b.events.bus, RedisEventBus)
        on_a, on_b = await followed(a.events), await followed(b.events)
        assert (await a.router.acquire(request_for(pull=1))).acquired
        assert await b.router.release(request_for().key) is not None
        seen_a = await take(on_a, 2)
        seen_b = await take(on_b, 2)
        # One order for everybody; across replicas it is the order the events reached Redis
        # (each replica appends a few milliseconds after the fact), so not asserted here.
        assert sorted(e.type for e in seen_a) == ["acquired", "released"]
        assert [(e.id, e.type) for e in seen_a] == [(e.id, e.type) for e in seen_b]
        assert parse_event_id(seen_a[0].id) < parse_event_id(seen_a[1].id)
        # Resuming on the other replica after the first event gives exactly the rest.
        resumed = b.events.stream(after=seen_a[0].id)
        assert [e.id for e in await take(resumed, 1)] == [seen_a[1].id]
    finally:
        for service in (a, b):
            await service.close()


async def test_a_replica_started_later_can_resume_from_history(
    redis_server: RedisServer,
) -> None:
    (a,) = await replicas(redis_server, 1)
    try:
        for pull in range(1, 4):
            assert (await a.router.acquire(request_for(pull=pull, path=f"p{pull}"))).acquired
        await asyncio.sleep(0.1)
    finally:
        await a.close()
    (late,) = await replicas(redis_server, 1)
    try:
        stream = late.events.stream(after="0-0")
        events = await take(stream, 3)
        assert [e.lock.pull.num for e in events if e.lock] == [1, 2, 3]
        assert not late.events.gap_since(events[0].id)
    finally:
        await late.close()


async def test_events_published_while_redis_is_away_are_appended_when_it_returns(
    redis_servers: Any,
) -> None:
    server: RedisServer = redis_servers(persistence="aof")
    bus = RedisEventBus.from_config(redis_config(server))
    try:
        following = bus.stream()
        waiting = asyncio.ensure_future(anext(following))
        await asyncio.sleep(0.05)
        server.stop()
        bus.publish("fallback", key="k", action="legacy", error="redis away")
        await asyncio.sleep(0.3)
        assert not waiting.done()
        server.start()
        event = await asyncio.wait_for(waiting, 10)
        assert event.type == "fallback" and event.details["action"] == "legacy"
        assert event.id and bus.dropped == 0
    finally:
        await bus.close()


async def test_the_writer_and_the_reader_go_on_after_errors_they_did_not_expect(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture,
) -> None:
    # Redis made a replica for a while (a failover): the append is refused (READONLY) and the
    # reader's XREAD is cut off, then refused (MASTERDOWN: no stale reads). Then made primary
    # again: the events published meanwhile are appended and followers get them. Before, the
    # writer task ended on the READONLY (the events stayed in the outbox for good, and later
    # ones joined them) and the reader task on any refusal but a wrong type.
    admin = redis_server.client()
    bus = RedisEventBus.from_config(redis_config(redis_server))
    try:
        following = await followed(bus)
        admin.replicaof(LOOPBACK, free_port())
        with caplog.at_level(logging.WARNING, logger="enhanced_locking.backends"):
            bus.publish("fallback", key="while-a-replica", action="legacy", error="test")
            for _ in range(100):
                await asyncio.sleep(0.05)
                if "ReadOnlyError" in caplog.text:
                    break
            assert "ReadOnlyError" in caplog.text
            await asyncio.sleep(0.5)  # the reader refused too
        admin.replicaof("NO", "ONE")
        bus.publish("fallback", key="primary-again", action="legacy", error="test")
        seen = await take(following, 2)
        assert [e.key for e in seen] == ["while-a-replica", "primary-again"]
        await bus._outbox.drained(10)
        assert len(bus._outbox) == 0 and admin.xlen(bus.stream_key) == 2
    finally:
        admin.replicaof("NO", "ONE")
        admin.close()
        await bus.close()


async def test_the_reader_goes_on_after_a_refused_read(redis_server: RedisServer) -> None:
    # Reads refused for a while (NOPERM: the ACL changed under the replica): the reader waits
    # and resumes once they are allowed again. Before, it ended on the first refusal, and
    # this replica's streams stood still for good.
    admin = redis_server.client()
    bus = RedisEventBus.from_config(redis_config(redis_server))
    try:
        following = await followed(bus)
        admin.acl_setuser("default", enabled=True, commands=["-xread", "-xrevrange"])
        await asyncio.sleep(3.5)  # the reader's blocking read ends, the next is refused
        admin.acl_setuser("default", enabled=True, categories=["+@all"])
        bus.publish("fallback", key="allowed-again", action="legacy", error="test")
        assert [e.key for e in await take(following, 1)] == ["allowed-again"]
    finally:
        admin.acl_setuser("default", enabled=True, categories=["+@all"])
        admin.close()
        await bus.close()


async def _published(bus: RedisEventBus, count: int, key: str) -> None:
    for n in range(count):
        bus.publish("fallback", key=f"{key}{n}", action="legacy", error="test")
    await bus._outbox.drained(10)
    assert len(bus._outbox) == 0


async def test_a_resume_point_the_stream_lost_gets_a_gap(redis_server: RedisServer) -> None:
    # The stream lost entries after the client's resume point: the key replaced (or a
    # restart without persistence), or a failover to a replica the last writes had not
    # reached. A fresh replica (its ring not full) said no gap before, and the client
    # followed on with a silent hole.
    admin = redis_server.client()
    config = redis_config(redis_server)
    stream = f"{config.redis_key_prefix}events"
    writer = RedisEventBus.from_config(config)
    try:
        await _published(writer, 5, "old")
        entries: Any = admin.xrange(stream)
        ids = [entry_id.decode() for entry_id, _ in entries]
        admin.delete(stream)
        await _published(writer, 1, "new")
    finally:
        await writer.close()
    fresh = RedisEventBus.from_config(config)
    try:
        following = fresh.follow(after=ids[2], max_lag=1000, announce=True)
        first = await asyncio.wait_for(anext(following), 10)
        assert isinstance(first, Gap) and first.reason == "replay", first
        assert fresh.gap_since(ids[2])
        newest = fresh.recent()[-1].id
        assert not fresh.gap_since(newest)
    finally:
        await fresh.close()
    # A stream whose newest id is older than the resume point (a failover that lost the
    # writes after it): a gap too.
    admin.delete(stream)
    admin.xadd(stream, {"e": "{}"}, id="1-1")
    fresh = RedisEventBus.from_config(config)
    try:
        following = fresh.follow(after=ids[4], max_lag=1000, announce=True)
        first = await asyncio.wait_for(anext(following), 10)
        assert isinstance(first, Gap) and first.reason == "replay", first
    finally:
        await fresh.close()
        admin.close()


async def test_a_resume_at_an_event_the_reader_has_not_read_yet_waits_for_it(
    redis_server: RedisServer,
) -> None:
    # A client sees an event on replica A, then reconnects to B with its id before B's
    # reader has read it (B's XREAD answer on the way, a burst, a backoff after a blip).
    # Before, B judged the id by the stream's last-generated-id of its last look (at load),
    # called it unknown, and sent a false "replay" gap.
    config = redis_config(redis_server)
    a, b = RedisEventBus.from_config(config), RedisEventBus.from_config(config)
    go, held = asyncio.Event(), asyncio.Event()
    go.set()
    xread = b.connection.client.xread

    async def held_back(*args: Any, **kwargs: Any) -> Any:
        if not go.is_set():
            held.set()
            await go.wait()
        return await xread(*args, **kwargs)

    b.connection.client.xread = held_back  # type: ignore[method-assign]
    try:
        on_a = await followed(a)
        await followed(b)  # B's reader runs, loaded
        go.clear()
        await asyncio.wait_for(held.wait(), 10)  # B's blocking read ended; the next waits
        a.publish("fallback", key="seen-on-a", action="legacy", error="test")
        seen = await asyncio.wait_for(anext(on_a), 10)
        assert parse_event_id(seen.id) > b._last  # B has not read it
        resumed = b.follow(after=seen.id, max_lag=1000, announce=True)
        first = asyncio.ensure_future(anext(resumed))
        await asyncio.sleep(0.5)
        assert not first.done(), first.result()  # no gap: it waits for B's reader
        go.set()
        assert isinstance(await asyncio.wait_for(first, 10), Following)
        assert not b.gap_since(seen.id)
        a.publish("fallback", key="after", action="legacy", error="test")
        after = await asyncio.wait_for(anext(resumed), 10)
        assert isinstance(after, Event) and after.key == "after", after
    finally:
        go.set()
        await a.close()
        await b.close()


async def test_a_reader_cut_off_while_the_stream_was_trimmed_past_it_gets_a_gap(
    redis_server: RedisServer,
) -> None:
    # A replica cut off from Redis (here: its reads refused) while another appends more
    # than the stream keeps: when it reads again, its live readers get a gap ("behind")
    # before anything after the hole. Before, its ring was not full and the entries after
    # the hole reached them as if nothing was missing.
    admin = redis_server.client()
    redis_server.create_acl_user("other", "other-secret")
    reading = RedisEventBus.from_config(redis_config(redis_server))
    other = RedisEventBus.from_config(redis_config(
        redis_server, redis_username="other", redis_password="other-secret"))
    other.capacity = other._outbox.capacity = 20  # the stream is trimmed to about 20
    try:
        items = reading.follow(max_lag=1000, announce=True)
        assert isinstance(await asyncio.wait_for(anext(items), 10), Following)
        admin.acl_setuser("default", enabled=True, commands=["-xread", "-xrevrange", "-xinfo"])
        await asyncio.sleep(3.5)  # the reader's blocking read ends, the next is refused
        for burst in range(30):
            await _published(other, 10, f"while-cut-off-{burst}-")
        with redis_server.client(username="other", password="other-secret") as client:
            assert client.xlen(other.stream_key) < 300  # trimmed
        admin.acl_setuser("default", enabled=True, categories=["+@all"])
        first = await asyncio.wait_for(anext(items), 10)
        assert isinstance(first, Gap) and first.reason == "behind", first
    finally:
        admin.acl_setuser("default", enabled=True, categories=["+@all"])
        admin.close()
        await reading.close()
        await other.close()


async def test_a_trim_before_the_readers_cursor_gives_its_readers_no_gap(
    redis_server: RedisServer,
) -> None:
    # The stream trimmed (a normal XTRIM) past the ring's oldest event but not past the
    # reader's cursor: nothing was lost, and a live reader between the two (a large max lag,
    # a small ring) still finds all it has not read in the ring. Before, the reader's look
    # after a reconnect raised the floor anyway: that reader got a false "behind" gap and
    # its stream ended.
    admin = redis_server.client()
    config = redis_config(redis_server)
    bus = RedisEventBus(connect(config), stream=f"{config.redis_key_prefix}events",
                        capacity=20)
    try:
        items = bus.follow(max_lag=1000, announce=True)
        assert isinstance(await asyncio.wait_for(anext(items), 10), Following)
        await _published(bus, 1, "first")
        first = await asyncio.wait_for(anext(items), 10)
        assert isinstance(first, Event) and first.key == "first0"
        await _published(bus, 9, "then")
        newest = parse_event_id(admin.xinfo_stream(bus.stream_key)["last-generated-id"]
                                .decode())
        assert await until(lambda: bus._last >= newest)  # the reader read them all
        admin.xtrim(bus.stream_key, maxlen=5, approximate=False)  # before the cursor
        # A reconnect: the reader's connection cut, its reads refused for a while.
        admin.acl_setuser("default", enabled=True, commands=["-xread"])
        mine = admin.client_id()
        for client in admin.client_list(_type="normal"):  # but this one and the key watch's
            if int(client["id"]) != mine and "O" not in client["flags"]:
                admin.client_kill_filter(_id=client["id"])
        assert await until(lambda: bus._look_again)
        admin.acl_setuser("default", enabled=True, categories=["+@all"])
        assert await until(lambda: not bus._look_again)  # looked at it trimmed, read again
        following = await asyncio.wait_for(anext(items), 10)
        assert isinstance(following, Event), following  # no gap
        rest = [following, *[await asyncio.wait_for(anext(items), 10) for _ in range(8)]]
        assert [e.key for e in rest if isinstance(e, Event)] == [f"then{n}" for n in range(9)]
        assert not bus.gap_since(first.id)
    finally:
        admin.acl_setuser("default", enabled=True, categories=["+@all"])
        admin.close()
        await bus.close()


async def test_events_dropped_while_redis_was_away_are_said_counted_and_a_gap(
    redis_servers: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    # Redis away longer than the outbox holds (5 here): the oldest events are dropped. Once
    # Redis takes events again the drop is logged with its count, counted, and this
    # replica's readers get a gap ("dropped"): their ring is fed from the stream only, so
    # before they never saw those events nor heard of them. Only the outbox is small: the
    # ring keeps its default capacity, so the resume's gap below can come from the hole only
    # (with a ring of 5, ``before`` fell out of it and the ring alone gave that gap).
    server: RedisServer = redis_servers(persistence="aof")
    config = redis_config(server)
    bus = RedisEventBus(connect(config), stream=f"{config.redis_key_prefix}events")
    bus._outbox.capacity = 5
    counted: list[int] = []
    bus.count_dropped = counted.append
    try:
        items = bus.follow(max_lag=1000, announce=True)
        assert isinstance(await asyncio.wait_for(anext(items), 10), Following)
        bus.publish("fallback", key="before", action="legacy", error="test")
        before = await asyncio.wait_for(anext(items), 10)
        assert isinstance(before, Event) and before.key == "before"
        await bus._outbox.drained(10)  # read back may come before the write's answer
        server.stop()
        with caplog.at_level(logging.WARNING, logger="enhanced_locking.backends"):
            for n in range(8):
                bus.publish("fallback", key=f"away{n}", action="legacy", error="test")
            assert caplog.text.count("the oldest are dropped") == 1  # once, not per event
            server.start()
            await bus._outbox.drained(20)
            seen: list[Event | Gap | Following] = []
            while not seen or not isinstance(seen[-1], Gap):
                seen.append(await asyncio.wait_for(anext(items), 10))
        gap = seen[-1]
        assert isinstance(gap, Gap) and gap.reason == "dropped", seen
        # Only events that were written may come before it, in order.
        kept = [f"away{n}" for n in range(3, 8)]
        assert [e.key for e in seen[:-1] if isinstance(e, Event)] == kept[:len(seen) - 1]
        assert "5 dropped while the store did not take them" not in caplog.text
        assert "3 dropped while the store did not take them" in caplog.text, caplog.text
        assert counted == [3] and bus.dropped == 3
        # A reader resuming from before the drop gets a gap too.
        assert bus.gap_since(before.id)
        resumed = bus.follow(after=before.id, max_lag=1000)
        first = await asyncio.wait_for(anext(resumed), 10)
        assert isinstance(first, Gap) and first.reason == "replay", first
    finally:
        await bus.close()


class _SlowToLoad(RedisEventBus):
    """A bus whose first load waits for ``go`` (a store slow to answer, or away)."""

    go: asyncio.Event

    async def _load(self) -> None:
        await self.go.wait()
        await super()._load()


async def test_a_reader_without_a_resume_point_starts_once_the_history_is_loaded(
    redis_server: RedisServer,
) -> None:
    # The history loads slowly (over 5 s). Before, the reader went on after 5 s with its
    # start at the empty ring's: "following", and then every event loaded counted as new
    # (old history replayed as live). Now it says nothing until the load is done (the SSE
    # keep-alives go on), and then follows from the stream's newest entry.
    config = redis_config(redis_server)
    stream = f"{config.redis_key_prefix}events"
    writer = RedisEventBus.from_config(config)
    try:
        await _published(writer, 3, "old")
    finally:
        await writer.close()
    bus = _SlowToLoad(connect(config), stream=stream)
    bus.go = asyncio.Event()
    try:
        items = bus.follow(max_lag=1000, announce=True)
        first = asyncio.ensure_future(anext(items))
        await asyncio.sleep(5.5)
        assert not first.done(), first.result()
        bus.go.set()
        assert isinstance(await asyncio.wait_for(first, 10), Following)
        bus.publish("fallback", key="new", action="legacy", error="test")
        event = await asyncio.wait_for(anext(items), 10)
        assert isinstance(event, Event) and event.key == "new", event
    finally:
        bus.go.set()
        await bus.close()


def _where(request: pytest.FixtureRequest, kind: str, **settings: Any) -> EnhancedLockingConfig:
    if kind == "redis":
        return redis_config(request.getfixturevalue("redis_server"), **settings)
    return redis_cluster_config(request.getfixturevalue("redis_cluster"),
                                request.getfixturevalue("redis_cluster_prefix"), **settings)


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
@pytest.mark.parametrize("write", ["string", "hash"])
async def test_an_event_stream_written_over_by_another_type_is_replaced_and_followed_again(
    request: pytest.FixtureRequest, kind: str, write: str, caplog: pytest.LogCaptureFixture,
) -> None:
    config = _where(request, kind, enabled=True, backend="redis", legacy_backend="memory")
    service = LockService(ConfigProvider(config))
    await service.start()
    try:
        bus = service.events.bus
        assert isinstance(bus, RedisEventBus)
        redis = bus.connection.client

        async def spoil() -> None:
            await redis.delete(bus.stream_key)
            if write == "string":
                await redis.set(bus.stream_key, f"token={SECRET}")
            else:
                await redis.hset(bus.stream_key, "token", SECRET)

        async def lock_and_release(pull: int) -> None:
            request = request_for(pull=pull)
            assert (await service.router.acquire(request)).acquired  # never refused for it
            assert await service.router.release(request.key) is not None

        with caplog.at_level(logging.WARNING, logger="enhanced_locking.backends"):
            await spoil()  # before anyone follows: the first read meets it
            following = await followed(bus)
            await lock_and_release(1)
            seen = await take(following, 2)
            assert [(e.type, e.lock and e.lock.pull.num) for e in seen] == [
                ("acquired", 1), ("released", 1)]
            await spoil()  # while a reader follows the stream
            await lock_and_release(2)
            seen = await take(following, 2)
            assert [(e.type, e.lock and e.lock.pull.num) for e in seen] == [
                ("acquired", 2), ("released", 2)]
        assert await redis.type(bus.stream_key) == "stream"
        assert bus.dropped == 0
        assert f"the event stream {bus.stream_key} was not a stream" in caplog.text
        assert SECRET not in caplog.text
    finally:
        await service.close()


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
async def test_the_stream_is_trimmed_to_about_its_capacity_by_each_write(
    request: pytest.FixtureRequest, kind: str,
) -> None:
    """Each write appends its events and then trims the stream to about ``capacity`` entries
    (``XTRIM ... MAXLEN ~``: Redis drops only whole nodes of the stream, of at most 100
    entries, so up to 99 more may stay); what stays is the newest events, in order."""
    config = _where(request, kind)
    bus = RedisEventBus(connect(config), stream=f"{config.redis_key_prefix}events-trim",
                        capacity=50)
    redis = bus.connection.client
    try:
        await redis.delete(bus.stream_key)
        for burst in range(8):  # (bursts below the capacity, which the outbox holds too)
            for n in range(40):
                bus.publish("fallback", key=f"k{burst}-{n}", action="legacy")
            for _ in range(200):  # until the burst's last event is in the stream
                newest: Any = await redis.xrevrange(bus.stream_key, count=1)
                if newest and Event.model_validate_json(newest[0][1]["e"]).key == f"k{burst}-39":
                    break
                await asyncio.sleep(0.02)
            length = await redis.xlen(bus.stream_key)
            assert min(50, 40 * (burst + 1)) <= length < 150, (burst, length)
        kept: Any = await redis.xrange(bus.stream_key)
        keys = [Event.model_validate_json(fields["e"]).key for _, fields in kept]
        published = [f"k{burst}-{n}" for burst in range(8) for n in range(40)]
        assert keys == published[-len(keys):]  # the newest, in order
        assert bus.dropped == 0
    finally:
        await redis.delete(bus.stream_key)
        await bus.close()


# --- a write whose answer is lost -------------------------------------------------------------


class AnswerLost:
    """A loopback proxy to ``server`` that loses one answer: the first request that writes
    the events (an ``EVALSHA`` or ``XADD``) goes to Redis, which runs it, and its answer is
    not passed on: the client's connection is closed instead (a connection dropped after Redis
    applied the write). Everything else passes both ways (a ``SCRIPT LOAD`` too, though the
    script's text names ``XADD``). An answer Redis refused (``NOSCRIPT``: the script not
    loaded yet) is passed on: nothing was applied."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.lost = 0
        self._listener: asyncio.Server | None = None
        self.addr = ""

    async def __aenter__(self) -> AnswerLost:
        self._listener = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._listener.sockets[0].getsockname()[1]
        self.addr = f"127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._listener is not None
        self._listener.close()

    async def _serve(self, client_in: asyncio.StreamReader,
                     client_out: asyncio.StreamWriter) -> None:
        host, port = self.server.addr.rsplit(":", 1)
        server_in, server_out = await asyncio.open_connection(host, int(port))
        answers = asyncio.ensure_future(self._pass(server_in, client_out))
        try:
            while data := await client_in.read(65536):
                writes = _command(data) in (b"EVALSHA", b"XADD")
                if writes and not self.lost:
                    answers.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await answers
                    server_out.write(data)
                    await server_out.drain()
                    answer = await server_in.read(65536)
                    if not answer.startswith(b"-NOSCRIPT"):
                        self.lost += 1
                        await asyncio.sleep(0.05)  # every answer of a pipeline is in
                        return
                    client_out.write(answer)
                    await client_out.drain()
                    answers = asyncio.ensure_future(self._pass(server_in, client_out))
                    continue
                server_out.write(data)
                await server_out.drain()
        finally:
            answers.cancel()
            for out in (server_out, client_out):
                out.close()

    @staticmethod
    async def _pass(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()


def _command(data: bytes) -> bytes:
    """The name of the first command in ``data`` (RESP: ``*<n>``, ``$<len>``, the name), upper
    case: a ``SCRIPT LOAD`` of the append script holds ``XADD`` too, and is not a write."""
    parts = data.split(b"\r\n", 3)
    return parts[2].upper() if len(parts) > 2 else b""


@contextlib.asynccontextmanager
async def _bus_losing_an_answer(server: RedisServer, *, capacity: int = 10_000,
                                ) -> AsyncIterator[tuple[RedisEventBus, AnswerLost, Any]]:
    """A bus on ``server`` through :class:`AnswerLost`, the proxy, and a client of ``server``'s
    own (to read the stream as it is)."""
    config = redis_config(server)
    direct = connect(config)
    async with AnswerLost(server) as proxy:
        bus = RedisEventBus(connect(config.model_copy(update={"redis_addr": proxy.addr})),
                            stream=f"{config.redis_key_prefix}events", capacity=capacity)
        try:
            yield bus, proxy, direct.client
        finally:
            await bus.close()
            await direct.close()


async def _keys(client: Any, bus: RedisEventBus) -> list[str | None]:
    """The keys of the events in the bus's stream, in order."""
    entries: Any = await client.xrange(bus.stream_key)
    return [Event.model_validate_json(fields["e"]).key for _, fields in entries]


async def test_a_write_whose_answer_was_lost_is_appended_once(
    redis_server: RedisServer,
) -> None:
    # The connection drops after Redis ran the write, before its answer came back: the outbox
    # sends the write again on a new connection. It finds its tag in the writer key and
    # appends nothing: the event is in the stream once. Before, the write was a pipeline of
    # plain XADDs, and the one sent again appended the events a second time (new ids: every
    # follower saw them twice).
    async with _bus_losing_an_answer(redis_server) as (bus, proxy, client):
        bus.publish("fallback", key="once", action="legacy", error="test")
        await bus._outbox.drained(10)
        assert proxy.lost == 1
        assert await _keys(client, bus) == ["once"]
        # The next write goes on as before: one more entry.
        bus.publish("fallback", key="next", action="legacy", error="test")
        await bus._outbox.drained(10)
        assert await client.xlen(bus.stream_key) == 2


async def test_a_lost_write_whose_oldest_events_were_dropped_is_not_appended_again(
    redis_server: RedisServer,
) -> None:
    # Redis appends [e1, e2, e3] and the answer is lost; before the outbox (full at 3) sends
    # the write again, e4 comes and e1 is dropped. What is sent again, [e2, e3, e4], starts with
    # what is left of the lost write: that part goes under the lost write's tag (found in the
    # writer key: nothing appended), e4 under a new one. Before, the match of the lost write
    # looked for e1 at the head, missed, and e2 and e3 were appended a second time.
    async with _bus_losing_an_answer(redis_server, capacity=3) as (bus, proxy, client):
        for key in ("e1", "e2", "e3"):
            bus.publish("fallback", key=key, action="legacy", error="test")
        for _ in range(5000):
            if proxy.lost:
                break
            await asyncio.sleep(0.001)
        assert proxy.lost == 1
        bus.publish("fallback", key="e4", action="legacy", error="test")  # e1 dropped
        await bus._outbox.drained(10)
        assert await _keys(client, bus) == ["e1", "e2", "e3", "e4"]
        assert bus.dropped == 1 and len(bus._outbox) == 0


async def test_a_burst_of_events_is_appended_in_order_each_as_its_json_made_once(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The publish makes no JSON; the outbox's write makes each event's, once, and the stream
    # holds those bytes in the order published (40 lock events, then 10 without a lock).
    config = redis_config(redis_server)
    direct = connect(config)
    bus = RedisEventBus.from_config(config)
    seen: list[Event] = []
    bus.subscribe(seen.append)
    made: list[bytes] = []
    real = shared_events._json

    def counted(event: Published, **options: Any) -> bytes:
        made.append(real(event, **options))
        return made[-1]
    monkeypatch.setattr(shared_events, "_json", counted)
    try:
        for pull in range(1, 41):
            bus.publish("acquired", lock=request_lock(pull))
        assert made == []
        for n in range(10):
            bus.publish("fallback", key=f"k{n}", action="legacy", error="test")
        await bus._outbox.drained(10)
        entries: Any = await direct.client.xrange(bus.stream_key)
        assert [fields["e"].encode() for _, fields in entries] == made
        assert made == [event.model_dump_json().encode() for event in seen]
        assert len(made) == 50
    finally:
        await bus.close()
        await direct.close()


async def test_a_write_trims_the_stream_by_its_last_xadd_without_an_xtrim(
    redis_server: RedisServer,
) -> None:
    # Each write of the outbox is one XADD an event, its last one trimming the stream to
    # about the capacity (MAXLEN ~), and no XTRIM of its own: one command a write fewer.
    config = redis_config(redis_server)
    direct = connect(config)
    bus = RedisEventBus(connect(config), stream=f"{config.redis_key_prefix}events-xtrim",
                        capacity=50)
    admin = direct.client
    try:
        for burst in range(6):  # (bursts below the capacity, which the outbox holds too)
            await admin.config_resetstat()
            for n in range(40):
                bus.publish("fallback", key=f"k{burst}-{n}", action="legacy", error="test")
            await bus._outbox.drained(10)
            stats: Any = await admin.info("commandstats")
            assert "cmdstat_xtrim" not in stats, stats
            assert int(stats["cmdstat_xadd"]["calls"]) == 40, stats
            # Whole nodes of at most 100 entries go: up to 99 more than the capacity stay.
            assert min(50, 40 * (burst + 1)) <= await admin.xlen(bus.stream_key) < 150
        keys = await _keys(admin, bus)
        published = [f"k{burst}-{n}" for burst in range(6) for n in range(40)]
        assert len(keys) < len(published) and keys == published[-len(keys):]
        assert bus.dropped == 0
    finally:
        await bus.close()
        await direct.close()


def request_lock(pull: int) -> Lock:
    candidate = Candidate.of_request(request_for(pull=pull), priority=Priority.NORMAL)
    return candidate.granted(acquired_at=utcnow(), expires_at=None, fencing_token=pull)


@pytest.mark.parametrize("stream", ["atlantis:enhanced:events", "{locks}:events",
                                    "a{}b:events", "a}b:events", "a{b:events"])
def test_the_writer_key_is_in_the_streams_slot(stream: str) -> None:
    # The append script touches the stream and the writer key: on a Redis Cluster both must
    # be in one slot, whatever the key prefix (a hash tag of its own, or none).
    key = writer_key(stream, "0123456789abcdef")
    assert key.startswith(f"{stream}-writer:")  # ACL key patterns name the prefix
    assert key_slot(key.encode()) == key_slot(stream.encode())
