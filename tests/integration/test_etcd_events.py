"""Events on etcd: every replica sees every replica's events, in one order, resumable by
revision (the history of one etcd key)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydantic import TypeAdapter
from tests.support.etcd_fixtures import auth_on, etcd_config, started
from tests.support.etcd_server import EtcdCluster, frozen
from tests.support.following import followed
from tests.support.locks import candidate_for, request_for
from tests.support.lost_answers import LostAnswers
from tests.support.service import ServiceProcess, services

from enhanced_locking.backends import etcd_store
from enhanced_locking.backends.base import StoreBackend
from enhanced_locking.backends.etcd_connection import (
    CALL_TIMEOUT,
    WATCH_CHECK,
    EtcdConnection,
    EtcdSettings,
)
from enhanced_locking.backends.etcd_events import _LAST_INDEX, EtcdEventBus
from enhanced_locking.backends.etcd_store import EtcdBackend
from enhanced_locking.backends.waiting import Status
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import Following, Gap, parse_event_id
from enhanced_locking.factory import LockService
from enhanced_locking.provider import ConfigProvider
from enhanced_locking.types import BackendUnavailable, Event, PartlyReleased

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(120)]


async def take(stream: AsyncIterator[Event], count: int) -> list[Event]:
    return [await asyncio.wait_for(anext(stream), 10) for _ in range(count)]


async def replicas(cluster: EtcdCluster, prefix: str, count: int) -> list[LockService]:
    services = []
    for _ in range(count):
        config = etcd_config(cluster, prefix, enabled=True, backend="etcd",
                             legacy_backend="memory")
        service = LockService(ConfigProvider(config))
        await service.start()
        services.append(service)
    return services


async def test_each_replica_streams_every_replicas_events_in_one_order(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    a, b = await replicas(etcd_cluster, etcd_prefix, 2)
    try:
        assert isinstance(a.events.bus, EtcdEventBus) and isinstance(b.events.bus, EtcdEventBus)
        on_a, on_b = await followed(a.events), await followed(b.events)
        assert (await a.router.acquire(request_for(pull=1))).acquired
        # The acquire's event is written first: a's watch has read it back from etcd.
        acquired = await take(on_a, 1)
        assert await b.router.release(request_for().key) is not None
        seen_a = [*acquired, *await take(on_a, 1)]
        seen_b = await take(on_b, 2)
        assert [e.type for e in seen_a] == ["acquired", "released"]
        assert [(e.id, e.type) for e in seen_a] == [(e.id, e.type) for e in seen_b]
        assert parse_event_id(seen_a[0].id) < parse_event_id(seen_a[1].id)
        # Resuming on the other replica after the first event gives exactly the rest.
        resumed = b.events.stream(after=seen_a[0].id)
        assert [e.id for e in await take(resumed, 1)] == [seen_a[1].id]
    finally:
        for service in (a, b):
            await service.close()


async def test_a_replica_started_later_resumes_from_the_keys_history(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    (a,) = await replicas(etcd_cluster, etcd_prefix, 1)
    try:
        for pull in range(1, 4):
            assert (await a.router.acquire(request_for(pull=pull, path=f"p{pull}"))).acquired
        await asyncio.sleep(0.1)
    finally:
        await a.close()
    (late,) = await replicas(etcd_cluster, etcd_prefix, 1)
    try:
        stream = late.events.stream(after="0-0")
        events = await take(stream, 3)
        assert [e.lock.pull.num for e in events if e.lock] == [1, 2, 3]
        assert not late.events.gap_since(events[0].id)
    finally:
        await late.close()


async def published(config: EnhancedLockingConfig, count: int, *, pause: float = 0.0,
                    ) -> list[Event]:
    """``count`` events published by a bus of their own, as its watch read them back."""
    writer = EtcdEventBus.from_config(config)
    try:
        live = writer.stream(after="0-0")
        for n in range(count):
            writer.publish("fallback", key=f"k{n}", action="legacy")
            if pause:
                await asyncio.sleep(pause)
        return await take(live, count)
    finally:
        await writer.close()


async def test_a_reader_from_0_0_on_the_whole_history_gets_every_event_and_no_gap(
    tmp_path: Path,
) -> None:
    # "0-0" is "from the first event kept". With the key's whole history loaded (the watch
    # from revision 1), a reader with a bound (the SSE stream's) was told a replay gap and
    # followed from the newest event: an event written before its start was fixed was never
    # streamed to it. A cluster of its own: another test's compaction makes the gap honest.
    with started(tmp_path / "etcd") as cluster:
        config = etcd_config(cluster, "/whole/")
        written = await published(config, 1)
        bus = EtcdEventBus.from_config(config)
        try:
            following = bus.follow(after="0-0", max_lag=1000, announce=True)
            first = await asyncio.wait_for(anext(following), 10)
            assert isinstance(first, Following), first
            event = await asyncio.wait_for(anext(following), 10)
            assert isinstance(event, Event) and event.id == written[0].id, event
            assert not bus.gap_since("0-0")
        finally:
            await bus.close()


async def test_history_compacted_away_is_reported_as_a_gap(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    config = etcd_config(etcd_cluster, etcd_prefix)
    old = await published(config, 3, pause=0.02)
    connection = EtcdConnection(EtcdSettings.from_config(config))
    try:
        client = await connection.client()
        assert client.kv is not None
        revision = int((await client.kv.get(b"/")).header.revision)
        await client.kv.compact(revision)
    finally:
        await connection.close()
    fresh = EtcdEventBus.from_config(config)
    try:
        assert not fresh.gap_since(f"{revision}-0")
        following = fresh.follow(after=old[0].id, max_lag=1000)
        first = await asyncio.wait_for(anext(following), 10)
        assert isinstance(first, Gap) and first.reason == "replay", first
        assert fresh.gap_since(old[0].id) and not fresh.gap_since(f"{revision}-0")
        # etcd keeps the write at the compaction revision: after all of the one before it,
        # nothing is missing.
        assert not fresh.gap_since(f"{revision - 1}-{_LAST_INDEX}")
    finally:
        await fresh.close()


async def test_a_resume_id_etcd_never_generated_gets_a_gap_and_then_the_events(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    # An id from another event store (the in-process bus's or a Redis stream's: milliseconds
    # since the epoch), or from another etcd cluster further on, names a revision this etcd
    # has not reached. Taken for one the watch had not delivered yet, it was followed from
    # there without a gap, and no event came until the revisions passed it: never.
    config = etcd_config(etcd_cluster, etcd_prefix)
    written = await published(config, 1)
    bus = EtcdEventBus.from_config(config)
    try:
        foreign = f"{int(datetime.now(UTC).timestamp() * 1000)}-0"
        following = bus.follow(after=foreign, max_lag=1000, announce=True)
        first = await asyncio.wait_for(anext(following), 10)
        assert isinstance(first, Gap) and first.reason == "replay", first
        assert first.after == foreign
        await asyncio.wait_for(anext(following), 10)  # following from now
        bus.publish("fallback", key="after-the-gap", action="legacy")
        event = await asyncio.wait_for(anext(following), 10)
        assert isinstance(event, Event) and event.key == "after-the-gap", event
        # An id this etcd did generate resumes with no gap.
        again = bus.follow(after=written[0].id, max_lag=1000, announce=True)
        assert not isinstance(await asyncio.wait_for(anext(again), 10), Gap)
    finally:
        await bus.close()


async def test_a_resume_from_the_newest_event_written_before_the_lookback_gets_no_gap(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    # The events key last written more than ``lookback`` revisions ago (a quiet stretch on a
    # shared etcd), then compacted past that write too. Before, the floor was the lookback's
    # start (or the compaction): a client resuming from the newest event got a false gap
    # and the ring started empty, though nothing was missed.
    config = etcd_config(etcd_cluster, etcd_prefix)
    key = f"{config.etcd_key_prefix}events"
    written = await published(config, 2)
    connection = EtcdConnection(EtcdSettings.from_config(config))
    try:
        client = await connection.client()
        assert client.kv is not None
        for n in range(10):  # others' writes: the events key's is older than the lookback
            await client.kv.put(f"{etcd_prefix}other-{n}".encode(), b"x")
        for compacted in (False, True):
            if compacted:
                revision = int((await client.kv.get(b"/")).header.revision)
                await client.kv.compact(revision)
            fresh = EtcdEventBus(EtcdConnection(EtcdSettings.from_config(config)), key=key,
                                 lookback=5)
            try:
                following = fresh.follow(after=written[-1].id, max_lag=1000, announce=True)
                first = await asyncio.wait_for(anext(following), 10)
                assert not isinstance(first, Gap), (compacted, first)
                assert not fresh.gap_since(written[-1].id)
                newest = parse_event_id(written[-1].id)[0]  # its write's events, all there
                assert [e.id for e in fresh.recent()] == [
                    e.id for e in written if parse_event_id(e.id)[0] == newest]
                assert fresh.gap_since("1-0"), "older than the write it holds: a gap"
            finally:
                await fresh.close()
    finally:
        await connection.close()


async def test_events_published_while_etcd_is_away_are_written_when_it_returns(
    tmp_path: Path,
) -> None:
    cluster = EtcdCluster(tmp_path / "etcd", members_count=1).start()
    bus = EtcdEventBus.from_config(etcd_config(cluster, "/away/"))
    try:
        following = bus.stream()
        waiting = asyncio.ensure_future(anext(following))
        await asyncio.sleep(0.2)
        (member,) = cluster.members
        cluster.kill(member)
        bus.publish("fallback", key="k", action="legacy", error="etcd away")
        await asyncio.sleep(0.5)
        assert not waiting.done()
        cluster.start_member(member)
        event = await asyncio.wait_for(waiting, 30)
        assert event.type == "fallback" and event.details["action"] == "legacy"
        assert event.id and bus.dropped == 0
    finally:
        await bus.close()
        cluster.close()


async def test_with_auth_on_events_published_before_etcd_was_first_reached_are_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    # A replica starting while etcd is away, auth on: its first connect and login fail
    # (BackendUnavailable). The outbox waits for etcd as for any outage, and writes the
    # events once it answers. Before, that error was not among the bus's "etcd away" ones:
    # the writer task ended on it (later: it logged each retry as a failure not expected).
    with started(tmp_path / "etcd") as cluster:
        await auth_on(cluster, password="root-secret")
        (member,) = cluster.members
        cluster.kill(member)
        config = etcd_config(cluster, "/auth-first/", etcd_username="root",
                             etcd_password="root-secret")
        bus = EtcdEventBus.from_config(config)
        try:
            with caplog.at_level(logging.WARNING, logger="enhanced_locking.backends"):
                bus.publish("fallback", key="before", action="legacy", error="etcd away")
                await asyncio.sleep(1.0)
                assert "BackendUnavailable" in caplog.text
                cluster.start_member(member)
                await bus._outbox.drained(30)
            assert len(bus._outbox) == 0
            events = await take(bus.stream(after="0-0"), 1)
            assert [e.key for e in events] == ["before"]
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        finally:
            await bus.close()


async def test_with_any_member_frozen_events_are_streamed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    # What an SSE stream serves comes from one watch of the events key per replica, one
    # stream to one member. Frozen (SIGSTOP: its connections stay open), that member sent
    # nothing until it thawed, and every stream of the replica stood still as long, its own
    # events included. Each member is frozen in turn while another replica writes an event:
    # it is streamed within a write (which may wait the call's time on the frozen member
    # first), two checks of the watch and a read; the watch is started again (once at least:
    # the member carrying it was frozen once).
    caplog.set_level(logging.WARNING, logger="enhanced_locking.backends.etcd_events")
    with started(tmp_path / "etcd", members=3) as cluster:
        reading = EtcdEventBus.from_config(etcd_config(cluster, "/frozen/"))
        try:
            stream = await followed(reading)
            for n, member in enumerate(cluster.members):
                # The writer talks to a member that answers (its put is not what is tested;
                # with the leader frozen it waits for the election).
                live = cluster.members[(n + 1) % len(cluster.members)]
                writing = EtcdEventBus(EtcdConnection(EtcdSettings(endpoints=(live.endpoint,))),
                                       key="/frozen/events")
                try:
                    with frozen(member):
                        writing.publish("fallback", key=f"frozen{n}", action="legacy",
                                        error="test")
                        event = await asyncio.wait_for(
                            keyed(stream, f"frozen{n}"),
                            2 * CALL_TIMEOUT + 2 * WATCH_CHECK + CALL_TIMEOUT)
                        assert event.type == "fallback" and event.details["action"] == "legacy"
                finally:
                    await writing.close()
            assert any("events watch is behind" in r.getMessage() for r in caplog.records)
        finally:
            await reading.close()


async def keyed(stream: AsyncIterator[Event], key: str) -> Event:
    """The next event of ``stream`` about ``key`` (others may come first: a put the writer
    sent again after its first attempt timed out may have been applied twice)."""
    async for event in stream:
        if event.key == key:
            return event
    raise AssertionError("the stream ended")


# --- two serve processes on one etcd ----------------------------------------------------------


@pytest.fixture
def two_serves(etcd_cluster: EtcdCluster, etcd_prefix: str,
               tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    flags = ("--enhanced-locking-enabled", "--enhanced-locking-backend=etcd",
             f"--enhanced-locking-etcd-endpoints={','.join(etcd_cluster.endpoints)}",
             f"--enhanced-locking-etcd-key-prefix={etcd_prefix}",
             "--enhanced-locking-legacy-backend=memory")
    with services() as group:
        yield group.start_all([ServiceProcess(tmp_path / f"replica-{n}", args=flags,
                                              log_dir=tmp_path) for n in range(2)])


async def _follow(url: str, into: list[tuple[str, str]], ready: asyncio.Event,
                  after: str = "0-0") -> None:
    # From the start of this test's events key (its prefix is the test's own).
    async with httpx.AsyncClient(base_url=url, timeout=None) as http, http.stream(
        "GET", "/v1/events", params={"repo": "acme/events"}, headers={"Last-Event-ID": after}
    ) as answer:
        assert answer.status_code == 200
        ready.set()
        event_id = kind = ""
        async for line in answer.aiter_lines():
            if line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("event:"):
                kind = line[6:].strip()
            elif line == "" and kind == "gap":
                # Another test compacted the shared etcd: "0-0" is then honestly a gap.
                event_id = kind = ""
            elif line == "" and kind:
                into.append((event_id, kind))
                event_id = kind = ""


def _lock(pull: int) -> dict[str, Any]:
    return {"project": {"repoFullName": "acme/events", "path": "infra", "projectName": "infra"},
            "pull": {"num": pull}, "user": {"username": f"user-{pull}"}}


async def _until(what: Any, check: Any) -> None:
    for _ in range(300):  # 15 s
        if check():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out waiting until {what() if callable(what) else what}")


async def test_two_serve_processes_each_stream_both_replicas_events(
    two_serves: list[ServiceProcess],
) -> None:
    a, b = two_serves
    on_a: list[tuple[str, str]] = []
    on_b: list[tuple[str, str]] = []
    ready_a, ready_b = asyncio.Event(), asyncio.Event()
    followers = [asyncio.ensure_future(_follow(a.url, on_a, ready_a)),
                 asyncio.ensure_future(_follow(b.url, on_b, ready_b))]
    try:
        await asyncio.wait_for(asyncio.gather(ready_a.wait(), ready_b.wait()), 10)
        async with httpx.AsyncClient(base_url=a.url) as http_a, \
                httpx.AsyncClient(base_url=b.url) as http_b:
            taken = await http_a.post("/v1/locks", json=_lock(7))
            assert taken.status_code == 200, taken.text
            key = taken.json()["lock"]["key"]
            # The acquire's event is written first: a's stream has read it back from etcd.
            await _until(lambda: f"a's stream shows the acquire ({on_a})", lambda: on_a)
            released = await http_b.delete("/v1/locks/by-key", params={"key": key, "pull": 7})
            assert released.status_code == 200, released.text
        await _until(lambda: f"both streams show both events (a: {on_a}, b: {on_b})",
                     lambda: len(on_a) >= 2 and len(on_b) >= 2)
        assert [kind for _, kind in on_a] == ["acquired", "released"]
        assert on_a == on_b, "one order, one id per event, on every replica"
        # A client that saw the first event on replica a resumes on replica b.
        resumed: list[tuple[str, str]] = []
        ready = asyncio.Event()
        followers.append(asyncio.ensure_future(
            _follow(b.url, resumed, ready, after=on_a[0][0])))
        await _until("the resumed stream shows the rest", lambda: len(resumed) >= 1)
        assert resumed == on_a[1:]
    finally:
        for follower in followers:
            follower.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*followers, return_exceptions=True)


async def test_a_busy_replicas_events_ride_in_its_lock_transactions(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    """Pairs one after another: each pair's events are written in the next lock step's
    transaction, so the cluster sees two writes per pair (as with events off), and another
    replica still streams every event, in order."""
    a, b = await replicas(etcd_cluster, etcd_prefix, 2)
    raw = EtcdConnection(EtcdSettings(endpoints=tuple(etcd_cluster.endpoints)))
    pairs = 20
    try:
        assert isinstance(b.events.bus, EtcdEventBus)
        following = await followed(b.events)
        assert (await a.router.acquire(request_for(pull=1))).acquired  # warm up: session
        assert await a.router.release(request_for().key) is not None
        client = await raw.client()
        assert client.kv is not None
        warm_up = await take(following, 2)  # its events are written: b read them back
        before = int((await client.kv.get(b"/")).header.revision)
        for _ in range(pairs):
            assert (await a.router.acquire(request_for(pull=1))).acquired
            assert await a.router.release(request_for().key) is not None
        after = int((await client.kv.get(b"/")).header.revision)
        # Two transactions a pair; at most one write of its own for events no step took
        # within 10 ms (a busy moment of the machine).
        assert 2 * pairs <= after - before <= 2 * pairs + pairs // 4, after - before
        seen = [*warm_up, *await take(following, 2 * pairs)]
        assert [e.type for e in seen] == ["acquired", "released"] * (pairs + 1)
        ids = [parse_event_id(e.id) for e in seen]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
    finally:
        await raw.close()
        for service in (a, b):
            await service.close()


def _carries_events(request: Any, key: bytes) -> bool:
    """Whether a lock step's transaction puts the events key (in a transaction of the bus's
    own nested in it, or as a put of its own)."""
    for op in request.success:
        kind = op.WhichOneof("request")
        if kind == "request_put" and op.request_put.key == key:
            return True
        if kind == "request_txn" and any(inner.request_put.key == key
                                         for inner in op.request_txn.success):
            return True
    return False


async def test_events_riding_in_a_lock_step_whose_answer_was_lost_land_once(
    etcd_cluster: EtcdCluster, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A release's transaction carries the acquire's events; etcd applies it and its answer
    is lost (the member applied it, then froze: ``LostAnswers``). The events stay in the
    outbox, which sends them again under the tag they rode with: it finds the tag in the
    writer key and writes nothing, so every event is streamed once. Before, riding events had
    no tag, and the outbox wrote them a second time (every follower saw them twice)."""
    a, b = await replicas(etcd_cluster, etcd_prefix, 2)
    try:
        bus, backend = a.events.bus, a.enhanced.backend if a.enhanced is not None else None
        assert isinstance(bus, EtcdEventBus) and isinstance(b.events.bus, EtcdEventBus)
        assert isinstance(backend, EtcdBackend)
        connection = backend.connection
        following = await followed(b.events)
        assert (await a.router.acquire(request_for(pull=1))).acquired  # warm up: session
        assert await a.router.release(request_for().key) is not None
        seen = await take(following, 2)
        lost = LostAnswers(SimpleNamespace(transact=connection.transact), losing=("transact",),
                           applied=0)
        sent = connection.transact

        def transact(client: Any, request: Any, *, read: bool = False) -> Any:
            if not read and not lost.sent and _carries_events(request, bus.key):
                lost.applied = 1  # this one: applied, its answer lost
                return lost.transact(client, request, read=read)
            return sent(client, request, read=read)

        monkeypatch.setattr(connection, "transact", transact)
        pairs = 0
        while not lost.sent:  # until a release carries its acquire's events
            assert pairs < 20, "no lock step carried events"
            pairs += 1
            assert (await a.router.acquire(request_for(pull=1))).acquired
            with contextlib.suppress(BackendUnavailable):  # (the step may say it is lost)
                await a.router.release(request_for().key)
        monkeypatch.undo()
        assert await a.router.get(request_for().key) is None  # the lost release was applied
        await bus._outbox.drained(30)
        with contextlib.suppress(TimeoutError):  # every event there is, until 2 s of quiet
            while True:
                seen.append(await asyncio.wait_for(anext(following), 2.0))
        types = [e.type for e in seen]
        assert types.count("acquired") == pairs + 1, types
        assert len({(e.type, e.time) for e in seen}) == len(seen), types
    finally:
        for service in (a, b):
            await service.close()

# --- the bus's own writes: idempotent, in attempts of a second ------------------------------


async def versions(bus: EtcdEventBus, via: EtcdConnection | None = None) -> int:
    """How many times ``bus``'s events key was written (its version: one per write), read
    through ``via`` (default: the bus's connection)."""
    client = await (via or bus.connection).client()
    assert client.kv is not None
    answer = await client.kv.get(bus.key, timeout=CALL_TIMEOUT)
    return int(answer.kvs[0].version) if answer.kvs else 0


async def written(bus: EtcdEventBus, count: int, via: EtcdConnection) -> None:
    """Until ``bus``'s events key was written ``count`` times (30 s at most)."""
    deadline = asyncio.get_running_loop().time() + 30
    while await versions(bus, via) < count:
        assert asyncio.get_running_loop().time() < deadline, await versions(bus, via)
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("refused", [0, 1], ids=["sent-again-by-the-call",
                                              "sent-again-by-the-outbox"])
async def test_a_batch_whose_answer_was_lost_is_in_the_log_once(
    tmp_path: Path, refused: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The write is applied by etcd and its answer lost. Sent again (by the call, to the next
    # member, or, the call given up, by the outbox), it finds its own tag in the writer key
    # and writes nothing: the event is in the log once, with one id. Before, the write was a
    # plain put, and the put sent again wrote the events a second time (a second revision, a
    # second set of ids: every follower saw them twice).
    with started(tmp_path / "etcd", members=3) as cluster:
        config = etcd_config(cluster, "/lost/")
        reading = EtcdEventBus.from_config(config)
        bus = EtcdEventBus.from_config(config)
        try:
            stream = await followed(reading)
            client = await bus.connection.client()
            assert client.kv is not None
            lost = LostAnswers(client.kv._stub, losing=("Txn",), applied=1, refused=refused)
            monkeypatch.setattr(client.kv, "_stub", lost)
            bus.publish("fallback", key="once", action="legacy", error="test")
            event = await asyncio.wait_for(keyed(stream, "once"), 30)
            await bus._outbox.drained(30)
            assert lost.sent == 2 + refused
            assert await versions(bus) == 1
            # The next batch goes on from the tag found: one write, one more revision.
            bus.publish("fallback", key="next", action="legacy", error="test")
            after = await asyncio.wait_for(keyed(stream, "next"), 30)
            assert await versions(bus) == 2
            assert parse_event_id(event.id) < parse_event_id(after.id)
            # Nothing else was streamed: not the first event again, not the writer key.
            with contextlib.suppress(TimeoutError):
                extra = await asyncio.wait_for(anext(stream), 1.0)
                pytest.fail(f"streamed again: {extra}")
            monkeypatch.undo()
            assert client.kv is not None
            writer = await client.kv.get(bus.writer)
            assert len(writer.kvs) == 1
        finally:
            await bus.close()
            await reading.close()
        # The writer key went with the bus; the events key and its history stay.
        check = EtcdEventBus.from_config(config)
        try:
            kv = (await check.connection.client()).kv
            assert kv is not None
            assert not (await kv.get(bus.writer)).kvs
            assert await versions(check) == 2
        finally:
            await check.close()


async def test_a_write_of_an_older_release_and_a_writer_of_this_one_are_read_alike(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    # An older release puts the events key alone (no writer key); a replica of this one,
    # beside it, reads both writes and writes its own after it.
    config = etcd_config(etcd_cluster, etcd_prefix)
    reading = EtcdEventBus.from_config(config)
    bus = EtcdEventBus.from_config(config)
    try:
        stream = await followed(reading)
        kv = (await bus.connection.client()).kv
        assert kv is not None
        old = Event(type="fallback", time=datetime.now(UTC), key="old",
                    details={"action": "legacy"})
        await kv.put(bus.key, TypeAdapter(list[Event]).dump_json([old]))
        bus.publish("fallback", key="new", action="legacy", error="test")
        seen = await take(stream, 2)
        assert [e.key for e in seen] == ["old", "new"]
    finally:
        await bus.close()
        await reading.close()


async def test_with_a_member_frozen_a_write_lands_in_about_an_attempt(
    tmp_path: Path,
) -> None:
    # The bus's write is idempotent, so it is sent as the reads are: an attempt of a second,
    # then to the next member. Before, one given to the frozen member took the call's whole
    # 5 s, failed, and was sent again by the outbox.
    with started(tmp_path / "etcd", members=3) as cluster:
        leader = cluster.leader()
        assert leader is not None
        follower = next(m for m in cluster.members if m is not leader)
        bus = EtcdEventBus.from_config(etcd_config(cluster, "/frozen-write/"))
        # The test reads what was written from the leader alone (never frozen here).
        via = EtcdConnection(EtcdSettings(endpoints=(leader.endpoint,)))
        taken: list[float] = []
        try:
            bus.publish("fallback", key="warm", action="legacy", error="test")
            await written(bus, 1, via)
            loop = asyncio.get_running_loop()
            with frozen(follower):
                for n in range(6):  # the round gives the frozen member two of them at least
                    start = loop.time()
                    bus.publish("fallback", key=f"w{n}", action="legacy", error="test")
                    await written(bus, n + 2, via)
                    taken.append(loop.time() - start)
            assert await versions(bus, via) == 7, "a write was applied twice"
        finally:
            await bus.close()
            await via.close()
        print(f"writes with a follower frozen took {[round(t, 2) for t in taken]} s")
        # The one bound: less than the whole call the single attempt took before.
        assert max(taken) < CALL_TIMEOUT, taken


class SecondPartFault:
    """The store's release by pull fails in its second part, once (``failed`` set back to
    ``False``: once more). The step of a part runs (and may run again) inside etcd_store's
    part: the first run of a step after the first part committed fails."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.failed = False
        step = StoreBackend.release_pull

        async def second_part_fails(backend: Any, *args: Any, **kwargs: Any) -> Any:
            part = etcd_store._PART.get()
            if part is not None and part.done and not self.failed:
                self.failed = True
                raise BackendUnavailable("etcd did not answer (a fault in the second part)")
            return await step(backend, *args, **kwargs)

        monkeypatch.setattr(StoreBackend, "release_pull", second_part_fails)


@pytest.mark.parametrize("retries", [False, True])
async def test_a_release_by_pull_failing_in_its_second_part_reports_the_first(
    etcd_cluster: EtcdCluster, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch,
    retries: bool,
) -> None:
    """etcd releases a pull's locks 16 at a time, each part one step. A step failing after
    the first part committed raised with the first 16 released and nothing said of them: no
    release events, their lease timers left armed. They are reported as they commit, and
    carried by the error (PartlyReleased); a retry that then succeeds answers every lock."""
    config = etcd_config(etcd_cluster, etcd_prefix, enabled=True, backend="etcd",
                         legacy_backend="memory", retries=retries, fallback="legacy")
    service = LockService(ConfigProvider(config))
    await service.start()
    try:
        locker = service.enhanced
        assert locker is not None
        keys = []
        for i in range(20):
            asked = request_for(path=f"envs/p{i:02}", ttl=timedelta(minutes=5))
            assert (await service.router.acquire(asked)).acquired
            keys.append(asked.key)
        assert set(keys) <= set(locker.leases.armed())
        fault = SecondPartFault(monkeypatch)
        stream = await followed(service.events)
        if retries:
            released = await locker.release_by_pull("acme/infra", 1)
            assert sorted(lock.key for lock in released) == sorted(keys)
            first = released[:16]
        else:
            with pytest.raises(PartlyReleased) as raised:
                await locker.release_by_pull("acme/infra", 1)
            first = raised.value.released
            assert len(first) == 16
            held = {lock.key for lock in await locker.backend.list()}
            assert held == set(keys) - {lock.key for lock in first}
        events = await take(stream, len(keys) if retries else 16)
        assert [e.type for e in events] == ["released"] * len(events)
        assert {e.key for e in events} >= {lock.key for lock in first}
        armed = set(locker.leases.armed())
        assert not armed & {lock.key for lock in first}
        if not retries:
            assert armed == set(keys) - {lock.key for lock in first}
            # Through the router, with a legacy side: the answer names what the parts before
            # the fault released, and the enhanced side as not reached (the rest still held).
            fault.failed = False
            for i in range(20):
                assert (await service.router.acquire(request_for(path=f"envs/q{i:02}"))).acquired
            before = {lock.key for lock in await locker.backend.list()}
            answered, unreached = await service.router.release_by_pull_reachable(
                "acme/infra", 1)
            after = {lock.key for lock in await locker.backend.list()}
            assert unreached == ["enhanced"]
            assert {lock.key for lock in answered.released} == before - after and len(after) == 8
    finally:
        await service.close()


async def test_a_release_by_pull_failing_in_its_second_part_tells_the_firsts_expiries_and_handoffs(
    etcd_cluster: EtcdCluster, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first part of a release by pull frees a lock whose lease had run out (no timer got
    there first) and hands another key to a waiter; the second part fails. The part's lapsed
    lock is told ``expired`` (its event, its counts) and its hand-off counted and named in
    the key's ``released`` event, as when the release finishes. Before, the error carried
    the released locks alone: the expiry went untold, the hand-off uncounted and unnamed."""
    config = etcd_config(etcd_cluster, etcd_prefix, enabled=True, backend="etcd",
                         legacy_backend="memory", fallback="legacy")
    service = LockService(ConfigProvider(config))
    await service.start()
    try:
        locker = service.enhanced
        assert locker is not None
        backend = locker.backend
        assert isinstance(backend, EtcdBackend)
        keys = []
        for i in range(20):
            asked = request_for(path=f"envs/p{i:02}", ttl=timedelta(minutes=5))
            if i == 1:  # taken in the store alone (no lease timer), its lease soon run out
                backend.lease_backstop = False  # (nor etcd's lease: it stays to be found)
                outcome = await backend.acquire_or_enqueue(
                    candidate_for(asked), ttl=timedelta(milliseconds=200), wait=None,
                    policy=locker.policy())
                assert outcome.status is Status.GRANTED
            else:
                assert (await service.router.acquire(asked)).acquired
            keys.append(asked.key)
        stream = await followed(service.events)
        waiting = asyncio.ensure_future(locker.acquire(request_for(
            path="envs/p02", pull=2).model_copy(update={"wait": timedelta(seconds=30)})))
        assert [e.type for e in await take(stream, 1)] == ["queued"]
        await asyncio.sleep(0.3)  # the lapsed lock's end has passed
        SecondPartFault(monkeypatch)
        with pytest.raises(PartlyReleased):
            await locker.release_by_pull("acme/infra", 1)
        granted = await asyncio.wait_for(waiting, 10)
        assert granted.acquired and granted.lock is not None and granted.lock.pull.num == 2
        events = {e.key: e for e in await take(stream, 17) if e.type != "granted-from-queue"}
        assert events[keys[1]].type == "expired"
        handed = events[keys[2]]
        assert handed.type == "released" and len(handed.details["handedTo"]) == 1
        registry = locker.metrics.registry
        assert registry.get_sample_value("enhanced_locking_handoffs_total") == 1
        assert registry.get_sample_value("enhanced_locking_lease_expirations_total") == 1
        assert registry.get_sample_value("enhanced_locking_releases_total",
                                         {"backend": "enhanced", "how": "expired"}) == 1
    finally:
        await service.close()


async def followed_past_one_event(bus: EtcdEventBus) -> tuple[
        AsyncIterator[Event | Gap | Following], Event]:
    """A reader of ``bus`` following from now, and the one event published then (``old``)
    that it read, its write answered: the reader may have it from the watch before the
    outbox has the write's answer, and a write whose answer the old cluster took with it is
    sent again, to the new one (a new event there, which the tests do not expect)."""
    following = bus.follow(max_lag=1000, announce=True)
    assert isinstance(await asyncio.wait_for(anext(following), 10), Following)
    bus.publish("fallback", key="old", action="legacy")
    before = await asyncio.wait_for(anext(following), 10)
    assert isinstance(before, Event) and before.key == "old", before
    await bus._outbox.drained(30)
    assert not len(bus._outbox), "the old event's write was not answered within 30 s"
    return following, before


async def gap_then_resumed(bus: EtcdEventBus, following: AsyncIterator[Event | Gap | Following],
                           before: Event, key: str) -> Event:
    """The follower hears a ``gap``; a reader resuming after ``before`` is told the gap after
    it, then follows, and an event published now on ``key`` comes to it (returned)."""
    gap = await asyncio.wait_for(anext(following), 30)
    assert isinstance(gap, Gap), gap
    again = bus.follow(after=before.id, max_lag=1000, announce=True)
    first = await asyncio.wait_for(anext(again), 10)
    assert isinstance(first, Gap) and first.after == before.id, first
    assert isinstance(await asyncio.wait_for(anext(again), 10), Following)
    bus.publish("fallback", key=key, action="legacy")
    event = await asyncio.wait_for(anext(again), 30)
    assert isinstance(event, Event) and event.key == key, event
    return event


async def test_readers_hear_a_gap_and_the_new_history_when_etcds_revision_goes_back(
    tmp_path: Path,
) -> None:
    """etcd restored from an older snapshot (here: made anew on the same ports with the same
    cluster token, its revisions from the start, as a restore of an empty snapshot) numbers
    its writes from below the revision the watch had reached. The follower hears a ``gap``,
    a reader resuming from an event of the old history gets one too, and the new history's
    events come. Before, the watch resumed at a revision the restored cluster had not
    reached: the stream stayed silent until the revisions caught up."""
    with started(tmp_path / "a") as old:
        config = etcd_config(old, "/restored/")
        connection = EtcdConnection(EtcdSettings.from_config(config))
        try:
            client = await connection.client()
            assert client.kv is not None
            for n in range(30):  # the old history runs well ahead of the restored one
                await client.kv.put(f"/restored/other-{n}".encode(), b"x")
        finally:
            await connection.close()
        bus = EtcdEventBus.from_config(config)
        try:
            following, before = await followed_past_one_event(bus)
            old.discard()
            fresh = old.anew(tmp_path / "b", token=old.token).start()
            try:
                event = await gap_then_resumed(bus, following, before, "restored")
                assert parse_event_id(event.id) < parse_event_id(before.id)
            finally:
                fresh.discard()
        finally:
            await bus.close()


def put_blocking(cluster: EtcdCluster, keys: list[str], value: bytes = b"x") -> None:
    """``keys`` put (each to ``value``) through etcd's JSON gateway, blocking: the event loop
    runs nothing meanwhile (no watch or read of a bus moves)."""
    with httpx.Client(base_url=f"http://{cluster.endpoints[0]}") as http:
        for key in keys:
            http.post("/v3/kv/put", json={
                "key": base64.b64encode(key.encode()).decode(),
                "value": base64.b64encode(value).decode()}).raise_for_status()


def compacted_blocking(cluster: EtcdCluster) -> int:
    """``cluster`` compacted at its revision now (returned), through etcd's JSON gateway,
    blocking (as :func:`put_blocking`)."""
    with httpx.Client(base_url=f"http://{cluster.endpoints[0]}") as http:
        answer = http.post("/v3/kv/range", json={"key": base64.b64encode(b"/").decode()})
        now = int(answer.raise_for_status().json()["header"]["revision"])
        http.post("/v3/kv/compaction", json={"revision": now}).raise_for_status()
    return now


async def test_readers_hear_a_gap_when_etcd_is_another_cluster_further_on(
    tmp_path: Path,
) -> None:
    """etcd made anew (or restored) as another cluster (another cluster token: another id)
    whose revisions are already past the one the watch had reached: the revision did not go
    back, the id did. The follower hears a ``gap`` and the new cluster's events come. Before
    (the revision alone looked at), the watch went on in the other history from its old
    revision, and readers were told nothing of what they had missed. And an event the new
    cluster has already (here written there before the bus looks; an event the outbox sent
    again there, its first answer lost with the old cluster, in a run of this test) is not
    streamed as the old history's next: the watch, opened on the new cluster once its
    stream broke, brought it before the read every 2 s found the new id (1 run in 25)."""
    with started(tmp_path / "a") as old:
        config = etcd_config(old, "/another/")
        bus = EtcdEventBus.from_config(config)
        try:
            following, before = await followed_past_one_event(bus)
            # No await from here until the new cluster is ahead: the bus cannot look between.
            old.discard()
            fresh = old.anew(tmp_path / "b", token=f"{old.token}-another").start()
            try:
                put_blocking(fresh, [f"/another/other-{n}" for n in range(40)])
                put_blocking(fresh, ["/another/events"], TypeAdapter(list[Event]).dump_json(
                    [before.model_copy(update={"id": "", "key": "elsewhere"})]))
                assert parse_event_id(before.id)[0] < 40
                gap = await asyncio.wait_for(anext(following), 30)
                assert isinstance(gap, Gap), gap
                again = bus.follow(max_lag=1000, announce=True)
                assert isinstance(await asyncio.wait_for(anext(again), 10), Following)
                bus.publish("fallback", key="another", action="legacy")
                event = await asyncio.wait_for(anext(again), 30)
                assert isinstance(event, Event) and event.key == "another", event
            finally:
                fresh.discard()
        finally:
            await bus.close()


async def test_readers_hear_a_gap_when_etcd_is_restored_with_its_revision_bumped(
    tmp_path: Path,
) -> None:
    """etcd restored keeping its cluster id, with ``etcdutl snapshot restore --bump-revision N
    --mark-compacted``: its revisions go on above the old history's, and every revision up to
    the restored one is compacted, so a watch from a revision of the old history is answered
    compacted. Here: made anew on the same ports with the same cluster token (the same id),
    written past the old revision and compacted there, before the bus can look (what those
    two options leave). The follower hears a ``gap`` at once (no event published after), a
    reader resuming from an event of the old history gets one too, and the new history's
    events come. Before, the compaction moved the floor but woke nobody: the follower heard
    the gap only with the next event."""
    with started(tmp_path / "a") as old:
        config = etcd_config(old, "/bumped/")
        bus = EtcdEventBus.from_config(config)
        try:
            following, before = await followed_past_one_event(bus)
            # No await from here until the new cluster is compacted: the bus cannot look.
            old.discard()
            fresh = old.anew(tmp_path / "b", token=old.token).start()
            try:
                put_blocking(fresh, [f"/bumped/other-{n}" for n in range(40)])
                now = compacted_blocking(fresh)
                assert parse_event_id(before.id)[0] < now
                event = await gap_then_resumed(bus, following, before, "bumped")
                assert parse_event_id(event.id)[0] > now
            finally:
                fresh.discard()
        finally:
            await bus.close()
