"""The event bus follows a runtime switch of the enhanced store (a LockPolicy's ``backend``,
applied through the provider's cluster layer): replicas started on their own SQLite stores and
moved to one real redis-server (or etcd) share their events from then on, a reader across the
switch is told ``gap`` with an id of the new bus to resume from, ``/readyz`` and the metrics
say which bus serves, and a switch back moves the events back to the process's own bus."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from tests.conftest import ServiceMaker
from tests.support.etcd_fixtures import etcd_config, started
from tests.support.etcd_server import EtcdCluster
from tests.support.locks import request_for
from tests.support.redis_server import RedisServer
from tests.support.served import served
from tests.support.sse_frames import Frame, Frames

from enhanced_locking.backends.etcd_connection import EtcdConnection, EtcdSettings
from enhanced_locking.backends.etcd_events import EtcdEventBus
from enhanced_locking.backends.redis_events import RedisEventBus
from enhanced_locking.events import EventBus, Following, Gap, parse_event_id
from enhanced_locking.factory import LockService
from enhanced_locking.provider import ConfigRejected
from enhanced_locking.types import Event

DEADLINE = 10.0


async def _read(http: httpx.AsyncClient, into: asyncio.Queue[Frame | str],
                last_event_id: str = "") -> None:
    """``GET /v1/events`` on ``http``, its frames (and its ``following`` comment) into
    ``into``."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    async with http.stream("GET", "/v1/events", headers=headers) as answer:
        assert answer.status_code == 200
        frames = Frames()
        async for line in answer.aiter_lines():
            if (item := frames.feed(line)) is not None:
                into.put_nowait(item)


async def _next(frames: asyncio.Queue[Frame | str]) -> Frame:
    """The next frame but a switch's own ``config-applied`` (each replica's, on the new bus
    while readers move to it: how many a reader sees is a race)."""
    while True:
        item = await asyncio.wait_for(frames.get(), DEADLINE)
        if isinstance(item, Frame) and item.event != "config-applied":
            return item


async def _reading(http: httpx.AsyncClient, last_event_id: str = "",
                   ) -> tuple[asyncio.Queue[Frame | str], asyncio.Future[None], list[Frame]]:
    """A reader of ``http``'s events once its stream says it follows them, and what came
    before that (a resume's gap)."""
    frames: asyncio.Queue[Frame | str] = asyncio.Queue()
    task = asyncio.ensure_future(_read(http, frames, last_event_id))
    first: list[Frame] = []
    while (item := await asyncio.wait_for(frames.get(), DEADLINE)) != "following":
        assert isinstance(item, Frame), item
        first.append(item)
    return frames, task, first


async def _stream_written(server: RedisServer, stream: str) -> None:
    for _ in range(100):
        with server.client() as admin:
            if admin.exists(stream):
                return
        await asyncio.sleep(0.05)
    raise AssertionError("no event reached the stream")


def _bus_metric(text: str) -> dict[str, float]:
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("enhanced_locking_event_bus{")}


async def _two_on_sqlite(make_service: ServiceMaker, root: Path) -> tuple[LockService,
                                                                         LockService]:
    replicas = []
    for name in ("a", "b"):
        (root / name).mkdir()
        replicas.append(await make_service(enabled=True, backend="boltdb",
                                           legacy_backend="memory", data_dir=str(root / name)))
    a, b = replicas
    assert type(a.events.bus) is EventBus and type(b.events.bus) is EventBus
    return a, b


@pytest.mark.redis
async def test_replicas_switched_to_one_redis_share_their_events_and_readers_get_a_gap(
    redis_server: RedisServer, make_service: ServiceMaker, tmp_path: Path,
) -> None:
    a, b = await _two_on_sqlite(make_service, tmp_path)
    async with served(a) as url_a, served(b) as url_b, \
            httpx.AsyncClient(base_url=url_a, timeout=DEADLINE) as http_a, \
            httpx.AsyncClient(base_url=url_b, timeout=DEADLINE) as http_b:
        assert (await http_a.get("/readyz")).json()["events"] == "process"
        frames, reader, first = await _reading(http_a)
        assert first == []
        try:
            assert (await a.router.acquire(request_for(pull=1))).acquired
            before = await _next(frames)
            assert before.event == "acquired"

            switch = {"backend": "redis", "redis_addr": redis_server.addr}
            for replica in (b, a):
                await replica.provider.set_layer("cluster", switch)
                bus = replica.events.bus
                assert isinstance(bus, RedisEventBus)
                # b's config-applied in the stream first: a's readers move to a store with
                # events, so their gap has an id to resume from (see the test below).
                await _stream_written(redis_server, bus.stream_key)

            gap = await _next(frames)
            assert gap.event == "gap"
            assert gap.data["reason"] == "switched" and gap.data["after"] == before.id
            assert gap.data["resume"] == gap.id and gap.id  # the client's Last-Event-ID now
            assert (await http_a.get("/readyz")).json()["events"] == "redis"
            assert _bus_metric((await http_a.get("/metrics")).text) == {
                "process": 0.0, "redis": 1.0, "etcd": 0.0}

            # A grant through the other replica reaches this reader.
            taken = await b.router.acquire(request_for(pull=2, path="envs/b"))
            assert taken.acquired and taken.lock is not None
            theirs = await _next(frames)
            assert (theirs.event, theirs.data["key"]) == ("acquired", taken.lock.key)
        finally:
            reader.cancel()

        # The gap's id resumes on the other replica exactly after it: no gap, b's grant next.
        frames, reader, first = await _reading(http_b, gap.id)
        assert first == []
        try:
            resumed = await _next(frames)
            assert (resumed.id, resumed.event) == (theirs.id, "acquired")
        finally:
            reader.cancel()
        # The old bus's id does not: its events are in no store the replicas share now.
        frames, reader, first = await _reading(http_b, before.id)
        reader.cancel()
        assert [(f.event, f.data["reason"]) for f in first] == [("gap", "replay")]


async def _clients(server: RedisServer) -> int:
    """The service's connections on ``server`` once closed ones are gone."""
    count = -1
    for _ in range(100):
        with server.client() as admin:
            count = sum(1 for c in admin.client_list() if c["name"] == "enhanced-locking")
        if count == 0:
            break
        await asyncio.sleep(0.05)
    return count


async def _item(stream: AsyncIterator[Event | Gap | Following]) -> Event | Gap | Following:
    """``stream``'s next item but a ``config-applied`` event (see :func:`_next`)."""
    while True:
        item = await asyncio.wait_for(anext(stream), DEADLINE)
        if not (isinstance(item, Event) and item.type == "config-applied"):
            return item


async def _gap(stream: AsyncIterator[Event | Gap | Following]) -> Gap:
    item = await _item(stream)
    assert isinstance(item, Gap), item
    return item


@pytest.mark.redis
async def test_a_switch_back_to_a_store_of_its_own_moves_the_events_back(
    redis_server: RedisServer, make_service: ServiceMaker,
) -> None:
    service = await make_service(enabled=True, backend="boltdb", legacy_backend="memory")
    process_bus = service.events.bus
    reader = service.events.follow(max_lag=100, announce=True)
    assert isinstance(await asyncio.wait_for(anext(reader), DEADLINE), Following)

    # Events off while on Redis: the switch's own config-applied would reach the new stream,
    # before or after the reader's start is fixed (on a loaded machine it came first, and the
    # gap had its id to resume from: the test before this one).
    await service.provider.set_layer("cluster", {"backend": "redis",
                                                 "redis_addr": redis_server.addr,
                                                 "events": False})
    to_redis = await _gap(reader)
    # The stream had no event yet: no resume id ("0-0" would mean "from the first event
    # kept" on any bus); the client's Last-Event-ID stays its old bus's.
    assert to_redis.reason == "switched" and to_redis.resume is None
    assert isinstance(service.events.bus, RedisEventBus)

    await service.provider.set_layer("cluster", None)
    back = await _gap(reader)
    assert back.reason == "switched" and back.resume is not None
    bus = service.events.bus
    assert type(bus) is EventBus and bus is not process_bus  # a new log: old ids are not its
    assert bus.gap_since(to_redis.after) and not bus.gap_since(back.resume)
    assert service.metrics.registry.get_sample_value(
        "enhanced_locking_event_bus", {"bus": "process"}) == 1.0
    assert service.metrics.registry.get_sample_value(
        "enhanced_locking_event_bus", {"bus": "redis"}) == 0.0
    assert await _clients(redis_server) == 0  # the store and its event bus were closed

    assert (await service.router.acquire(request_for(pull=1))).acquired
    event = await _item(reader)
    assert isinstance(event, Event) and event.type == "acquired"


@pytest.mark.etcd
@pytest.mark.timeout(120)
async def test_replicas_switched_to_one_etcd_share_their_events_and_readers_get_a_gap(
    etcd_cluster: EtcdCluster, etcd_prefix: str, make_service: ServiceMaker, tmp_path: Path,
) -> None:
    a, b = await _two_on_sqlite(make_service, tmp_path)
    reader = a.events.follow(max_lag=100, announce=True)
    assert isinstance(await asyncio.wait_for(anext(reader), DEADLINE), Following)
    assert (await a.router.acquire(request_for(pull=1))).acquired
    before = await asyncio.wait_for(anext(reader), DEADLINE)
    assert isinstance(before, Event)

    shared = etcd_config(etcd_cluster, etcd_prefix)
    switch = {"backend": "etcd", "etcd_endpoints": shared.etcd_endpoints,
              "etcd_key_prefix": etcd_prefix}
    for replica in (a, b):
        await replica.provider.set_layer("cluster", switch)
        assert isinstance(replica.events.bus, EtcdEventBus)
    gap = await _gap(reader)
    assert gap.reason == "switched" and gap.after == before.id and gap.resume is not None
    assert a.metrics.registry.get_sample_value(
        "enhanced_locking_event_bus", {"bus": "etcd"}) == 1.0

    taken = await b.router.acquire(request_for(pull=2, path="envs/b"))
    assert taken.acquired and taken.lock is not None
    theirs = await _item(reader)
    assert isinstance(theirs, Event) and (theirs.type, theirs.key) == ("acquired",
                                                                       taken.lock.key)
    # The gap's id is the etcd history's: resumed on b, exactly b's grant follows.
    resumed = b.events.follow(gap.resume, max_lag=100, announce=True)
    assert isinstance(await asyncio.wait_for(anext(resumed), DEADLINE), Following)
    again = await _item(resumed)
    assert isinstance(again, Event) and again.id == theirs.id


@pytest.mark.redis
async def test_a_refused_switch_leaves_the_bus_and_its_readers_as_they_were(
    redis_server: RedisServer, make_service: ServiceMaker,
) -> None:
    """The new store answers and takes the locks, but its ACL refuses the reads the new locker
    starts with: the switch is refused before the swap, and the events stay where they were."""
    redis_server.create_acl_user("locker", "switch-pw",
                                 rules=("~*", "&*", "+@all", "-smembers", "-scan"))
    service = await make_service(enabled=True, backend="boltdb", legacy_backend="memory")
    serving = service.events.bus
    reader = service.events.follow(max_lag=100, announce=True)
    assert isinstance(await asyncio.wait_for(anext(reader), DEADLINE), Following)

    with pytest.raises(ConfigRejected):
        await service.provider.set_layer("cluster", {
            "backend": "redis", "redis_addr": redis_server.addr, "redis_username": "locker",
            "redis_password": "switch-pw"})

    assert service.events.bus is serving and not serving.retired.is_set()
    assert service.metrics.registry.get_sample_value(
        "enhanced_locking_event_bus", {"bus": "process"}) == 1.0
    assert (await service.router.acquire(request_for(pull=1))).acquired
    rejected = await asyncio.wait_for(anext(reader), DEADLINE)  # on the bus it read: no gap
    assert isinstance(rejected, Event) and rejected.type == "config-rejected"
    event = await asyncio.wait_for(anext(reader), DEADLINE)
    assert isinstance(event, Event) and event.type == "acquired"


@pytest.mark.redis
async def test_a_new_connection_to_the_same_stream_carries_readers_on_without_a_gap(
    redis_server: RedisServer, make_service: ServiceMaker,
) -> None:
    """A LockPolicy that changes how the store is reached, not where (here its pool size; a
    password rotated, TLS files renewed alike), builds a new store and a new bus on the same
    stream: readers resume there from their place, with no gap (the stream's ids are the same
    ids)."""
    service = await make_service(enabled=True, backend="redis", legacy_backend="memory",
                                 redis_addr=redis_server.addr)
    first_bus = service.events.bus
    assert isinstance(first_bus, RedisEventBus)
    reader = service.events.follow(max_lag=100, announce=True)
    assert isinstance(await asyncio.wait_for(anext(reader), DEADLINE), Following)
    assert (await service.router.acquire(request_for(pull=1))).acquired
    before = await _item(reader)
    assert isinstance(before, Event) and before.type == "acquired"

    await service.provider.set_layer("cluster", {"redis_pool_size": 3})
    assert service.events.bus is not first_bus and first_bus.retired.is_set()
    assert isinstance(service.events.bus, RedisEventBus)

    assert (await service.router.acquire(request_for(pull=2, path="envs/b"))).acquired
    after = await _item(reader)  # no gap first
    assert isinstance(after, Event) and after.type == "acquired"
    assert parse_event_id(after.id) > parse_event_id(before.id)


async def _revision(connection: EtcdConnection, *, padded_to: int = 0) -> int:
    """The etcd's revision now, after writes of a key of no service's (``padded``) until it
    is at least ``padded_to``."""
    client = await connection.client()
    assert client.kv is not None
    revision = int((await client.kv.get(b"/")).header.revision)
    while revision < padded_to:
        revision = int((await client.kv.put(b"/padding", b"x")).header.revision)
    return revision


@pytest.mark.etcd
@pytest.mark.timeout(180)
async def test_a_reader_moved_between_two_etcds_gets_each_event_as_it_was_published(
    make_service: ServiceMaker, tmp_path: Path,
) -> None:
    """Two etcd clusters number their events alike (``<revision>-<index>``, each from its own
    revision 1), so an event of the second may have the id of one of the first that the
    stream sent already: it is sent as itself. (The stream frames each event once for all its
    readers, kept by id: it sent the first cluster's frame again, another key's grant.)"""
    service = await make_service(enabled=True, backend="boltdb", legacy_backend="memory")
    with started(tmp_path / "a") as one, started(tmp_path / "b") as two:
        async with served(service) as url, \
                httpx.AsyncClient(base_url=url, timeout=DEADLINE) as http:
            frames, reader, _ = await _reading(http)

            async def switched_to(cluster: EtcdCluster) -> None:
                await service.provider.set_layer("cluster", {
                    "backend": "etcd", "etcd_endpoints": cluster.endpoints,
                    "etcd_key_prefix": "/el/"})
                assert isinstance(service.events.bus, EtcdEventBus)
                assert (await _next(frames)).event == "gap"

            async def granted(path: str) -> Frame:
                taken = await service.router.acquire(request_for(pull=1, path=path))
                assert taken.acquired and taken.lock is not None
                frame = await _next(frames)
                assert (frame.event, frame.data["key"]) == ("acquired", taken.lock.key), (
                    frame, first.get(frame.id))
                return frame

            try:
                await switched_to(one)
                first: dict[str, str] = {}
                for n in range(10):
                    frame = await granted(f"envs/a{n}")
                    first[frame.id] = frame.data["key"]
                await switched_to(two)
                # Each grant is a write, its event the next (a write of its own, or riding in
                # the next step's): the second cluster is written up to just before one of the
                # first's event ids, so that its grant's event takes the id.
                connection = EtcdConnection(EtcdSettings(endpoints=tuple(two.endpoints)))
                met = []
                try:
                    for n in range(10):
                        now = await _revision(connection)
                        aim = min((r for r, _ in map(parse_event_id, first) if r >= now + 2),
                                  default=None)
                        assert aim is not None, (now, first)
                        await _revision(connection, padded_to=aim - 2)
                        frame = await granted(f"envs/b{n}")
                        if frame.id in first:
                            met.append(frame.id)
                            break
                finally:
                    await connection.close()
                assert met, "no event of the second cluster took an id of the first's"
            finally:
                reader.cancel()
