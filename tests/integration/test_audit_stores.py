"""The audit trail's stores, one table of behaviours: the embedded file (SQLite), Redis, etcd,
and memory, each built from settings the way the service builds it (``build_audit_store``).

Entries are read newest first in pages (a page's last id is the next page's ``before``),
filtered; the durable stores keep them for the next process and drop those past the
retention; the shared ones (Redis, etcd) are one trail for every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.etcd_fixtures import etcd_config, started
from tests.support.etcd_server import EtcdCluster
from tests.support.locks import lock_body
from tests.support.redis_fixtures import redis_cluster_config, redis_config
from tests.support.served import in_process
from tests.support.service import ServiceProcess, ServiceStartError
from tests.support.unreadable import SECRET

from enhanced_locking.api import create_app
from enhanced_locking.api.access import Caller, build_access
from enhanced_locking.api.audit import AuditTrail
from enhanced_locking.api.audit_routes import CURSOR_PATTERN
from enhanced_locking.backends.audit_store import (
    AuditQuery,
    AuditStore,
    MemoryAuditStore,
    RedisAuditStore,
    Retention,
    SqliteAuditStore,
    build_audit_store,
    entry_json,
)
from enhanced_locking.backends.etcd_audit import EtcdAuditStore
from enhanced_locking.backends.etcd_connection import EtcdConnection, EtcdSettings
from enhanced_locking.backends.redis_connection import connect, key_beside
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.factory import LockService
from enhanced_locking.metrics import Metrics
from enhanced_locking.provider import ConfigProvider
from enhanced_locking.types import AuditEntry, BackendUnavailable, Identity, Verb, utcnow

REPO = "acme/audited"

StoreMaker = Callable[..., AuditStore]
"""``make(max_age=..., max_entries=...)``: a new store on the test's place."""


def _sqlite(request: pytest.FixtureRequest) -> Callable[..., EnhancedLockingConfig]:
    data = request.getfixturevalue("tmp_path") / "data"
    data.mkdir()
    return lambda **s: EnhancedLockingConfig(legacy_backend="boltdb", data_dir=str(data), **s)


def _redis(request: pytest.FixtureRequest) -> Callable[..., EnhancedLockingConfig]:
    server = request.getfixturevalue("redis_server")
    return lambda **s: redis_config(server, legacy_backend="redis", **s)


def _etcd(request: pytest.FixtureRequest) -> Callable[..., EnhancedLockingConfig]:
    cluster = request.getfixturevalue("etcd_cluster")
    prefix = request.getfixturevalue("etcd_prefix")
    return lambda **s: etcd_config(cluster, prefix, enabled=True, backend="etcd",
                                   legacy_backend="memory", **s)


def _memory(request: pytest.FixtureRequest) -> Callable[..., EnhancedLockingConfig]:
    return lambda **s: EnhancedLockingConfig(legacy_backend="memory", **s)


KINDS: dict[str, tuple[Callable[[pytest.FixtureRequest], Callable[..., EnhancedLockingConfig]],
                       type, tuple[pytest.MarkDecorator, ...]]] = {
    "sqlite": (_sqlite, SqliteAuditStore, ()),
    "redis": (_redis, RedisAuditStore, (pytest.mark.redis,)),
    "etcd": (_etcd, EtcdAuditStore, (pytest.mark.etcd,)),
    "memory": (_memory, MemoryAuditStore, ()),
}
DURABLE = ("sqlite", "redis", "etcd")
SHARED = ("redis", "etcd")


def kinds(*names: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(
        "kind", [pytest.param(n, marks=KINDS[n][2], id=n) for n in names])


@pytest.fixture
async def make(request: pytest.FixtureRequest, kind: str) -> AsyncIterator[StoreMaker]:
    settings_for = KINDS[kind][0](request)
    opened: list[AuditStore] = []

    def build(max_age: timedelta = timedelta(days=30), max_entries: int = 100_000) -> AuditStore:
        store = build_audit_store(settings_for(audit_retention=max_age,
                                               audit_max_entries=max_entries))
        assert isinstance(store, KINDS[kind][1])
        opened.append(store)
        return store

    yield build
    for store in opened:
        await store.close()


def entry(n: int, *, age: timedelta = timedelta(0), **fields: Any) -> AuditEntry:
    values: dict[str, Any] = {
        "time": utcnow() - age, "identity": "ada", "method": "static", "verb": "lock",
        "action": "acquire", "key": f"acme/infra/{n}/default", "repo": "acme/infra",
        "pull": n, "outcome": "acquired", "status": 200, **fields,
    }
    return AuditEntry(**values)


def numbers(entries: list[AuditEntry]) -> list[int | None]:
    return [e.pull for e in entries]


@kinds(*KINDS)
async def test_entries_read_newest_first_in_pages(make: StoreMaker) -> None:
    store = make()
    written = [await store.append(entry(n)) for n in range(1, 6)]
    assert len({e.id for e in written}) == 5 and all(e.id for e in written)
    # Every id is a cursor GET /v1/audit takes as its ``before``.
    assert all(re.fullmatch(CURSOR_PATTERN, str(e.id)) for e in written), [e.id for e in written]
    first = await store.read(AuditQuery(limit=2))
    second = await store.read(AuditQuery(limit=2, before=first[-1].id))
    third = await store.read(AuditQuery(limit=2, before=second[-1].id))
    assert [numbers(first), numbers(second), numbers(third)] == [[5, 4], [3, 2], [1]]
    assert await store.read(AuditQuery(before=third[-1].id)) == []
    assert first[0] == written[-1]


@kinds(*KINDS)
async def test_every_filter_applies_and_they_combine(make: StoreMaker) -> None:
    store = make()
    await store.append(entry(1, age=timedelta(minutes=30)))
    await store.append(entry(2, identity="bob", action="release", outcome="released"))
    await store.append(entry(3, repo="acme/other", outcome="held", status=409))
    await store.append(entry(4, verb="admin", action="force-unlock", outcome="released"))

    async def pulls(**filters: Any) -> list[int | None]:
        return numbers(await store.read(AuditQuery(**filters)))

    assert await pulls(identity="bob") == [2]
    assert await pulls(action="release") == [2]
    assert await pulls(verb="admin") == [4]
    assert await pulls(repo="acme/other") == [3]
    assert await pulls(outcome="released") == [4, 2]
    assert await pulls(pull=3) == [3]
    assert await pulls(key="acme/infra/1/default") == [1]
    assert await pulls(since=utcnow() - timedelta(minutes=5)) == [4, 3, 2]
    assert await pulls(until=utcnow() - timedelta(minutes=5)) == [1]
    assert await pulls(outcome="released", identity="ada") == [4]
    assert await pulls(outcome="released", limit=1) == [4]


@kinds(*KINDS)
async def test_a_time_filter_is_an_instant_whatever_its_offset_or_year(make: StoreMaker) -> None:
    """``GET /v1/audit`` takes RFC 3339 times with any offset, from year 1 to 9999: each is
    the instant it names, and one beyond what a store can write bounds nothing on its side."""
    store = make()
    await store.append(entry(1, age=timedelta(minutes=30)))
    await store.append(entry(2))
    cut = utcnow() - timedelta(minutes=5)
    east, west = timezone(timedelta(hours=1)), timezone(timedelta(hours=-2))

    async def pulls(**filters: Any) -> list[int | None]:
        return numbers(await store.read(AuditQuery(**filters)))

    for zone in (east, west):
        assert await pulls(since=cut.astimezone(zone)) == [2], zone
        assert await pulls(until=cut.astimezone(zone)) == [1], zone
    assert await pulls(since=cut.replace(tzinfo=None)) == [2], "a time without offset is UTC"
    early = (datetime(1, 1, 1, tzinfo=east),  # before year 1 in UTC
             datetime(1969, 12, 31, tzinfo=UTC))
    late = (datetime(2300, 1, 1, tzinfo=UTC),  # its microseconds are 17 digits
            datetime(9999, 12, 31, 23, 59, tzinfo=west))  # after 9999 in UTC
    for moment in early:
        assert await pulls(since=moment) == [2, 1], moment
        assert await pulls(until=moment) == [], moment
    for moment in late:
        assert await pulls(since=moment) == [], moment
        assert await pulls(until=moment) == [2, 1], moment


FOREIGN_CURSORS = {
    "sqlite": ["1796540912298-0", "1796540912298000-9f3a2b1c"],
    "memory": ["1796540912298-0", "1796540912298000-9f3a2b1c"],
    "redis": ["1796540912298000-9f3a2b1c", "96-69051b"],
    "etcd": ["42"],
}
"""For each store, ``before`` cursors of another store's form (all of them the API's pattern
allows)."""


@kinds(*KINDS)
async def test_a_cursor_of_another_store_is_refused_as_one_and_the_lowest_reads_nothing(
    make: StoreMaker, kind: str,
) -> None:
    """A ``before`` of another store's form raises ``ValueError`` (the API's 422 naming it),
    never the store's own error (a 503 saying the trail is out of reach)."""
    store = make()
    written = await store.append(entry(1))
    for cursor in FOREIGN_CURSORS[kind]:
        assert re.fullmatch(CURSOR_PATTERN, cursor)
        with pytest.raises(ValueError):
            await store.read(AuditQuery(before=cursor))
    assert numbers(await store.read(AuditQuery(before=written.id))) == []
    if kind == "redis":  # the lowest ids of a stream: nothing is before them
        assert await store.read(AuditQuery(before="0-0")) == []
        assert await store.read(AuditQuery(before="0")) == []


@kinds(*KINDS)
async def test_an_entry_built_with_the_id_handed_out_for_it_is_stored_as_it_is(
    make: StoreMaker, kind: str,
) -> None:
    """An audited call's entry is built once, with the id its store hands out for it before
    (``new_id``): that entry is the one stored and answered, not a copy of it. Redis hands
    out none (the stream gives an entry its id as it appends it). Any other entry (built
    without an id, with an id handed out before another entry was appended, or read back
    from the trail) gets an id of the store's: no id is stored twice, and the trail keeps
    the order of the appends."""
    store = make()
    moment = utcnow()
    handed_out = store.new_id(moment)
    built = entry(1, id=handed_out, time=moment)
    first = await store.append(built)
    if kind == "redis":
        assert handed_out == "" and first is not built and first.id
        assert first == entry(1, id=first.id, time=moment)
    else:
        assert handed_out and first is built
    moment = utcnow()
    early = store.new_id(moment)
    between = await store.append(entry(2))
    late = await store.append(entry(3, id=early, time=moment))
    again = await store.append(first)
    written = [first, between, late, again]
    assert len({e.id for e in written}) == 4 and all(e.id for e in written)
    assert kind == "redis" or late.id != early
    found = await store.read(AuditQuery())
    assert [e.id for e in found] == [e.id for e in reversed(written)]
    assert numbers(found) == [1, 3, 2, 1]


@kinds(*DURABLE)
async def test_a_new_process_reads_the_trail_and_drops_what_is_past_retention(
    make: StoreMaker,
) -> None:
    """Entries are written with old times here; Redis ages an entry by its stream id (when it
    was written), which a test cannot set back, so on Redis only the reading is checked."""
    first = make()
    await first.append(entry(1, age=timedelta(hours=3)))
    await first.append(entry(2, age=timedelta(hours=2)))
    await first.append(entry(3))
    await first.close()
    again = make()
    assert numbers(await again.read(AuditQuery())) == [3, 2, 1]
    if isinstance(again, RedisAuditStore):
        return  # its retention goes by the stream's ids, the time of writing: see below
    await again.close()
    # Retention of one hour: the store prunes when it starts (SQLite) or at its first append.
    pruned = make(max_age=timedelta(hours=1))
    await pruned.append(entry(4))
    assert numbers(await pruned.read(AuditQuery())) == [4, 3]


@kinds("sqlite", "etcd", "memory")
async def test_at_most_max_entries_are_kept_the_oldest_go_first(make: StoreMaker) -> None:
    """(Redis trims its stream approximately, ``MAXLEN ~``: it keeps at least as many.)"""
    store = make(max_entries=100)
    for n in range(1, 107):
        await store.append(entry(n))
    if isinstance(store, MemoryAuditStore):
        assert numbers(await store.read(AuditQuery(limit=1000))) == list(range(106, 6, -1))
        return
    await store.close()  # a durable store prunes when it starts again
    store = make(max_entries=100)
    await store.append(entry(107))
    kept = numbers(await store.read(AuditQuery(limit=1000)))
    # The newest 100 (the prune ran before or after the new entry went in).
    assert kept in (list(range(107, 6, -1)), list(range(107, 7, -1))), kept


@kinds("sqlite", "memory")
async def test_each_kind_is_bounded_by_its_own_count_however_far_apart_its_entries(
    make: StoreMaker,
) -> None:
    """Refusals and served calls in turn, so each kind's entries are spread over twice as many
    ids as it has entries: with max-entries 100, 101 refusals and 100 served calls keep every
    served call and the newest 100 refusals (the bound counts a kind's entries, not the span
    of its ids; a durable store prunes when it starts again)."""
    store = make(max_entries=100)
    refusal: dict[str, Any] = {"outcome": "denied", "status": 403}
    for n in range(1, 202):
        await store.append(entry(n, **(refusal if n % 2 else {})))
    if not isinstance(store, MemoryAuditStore):
        await store.close()
        store = make(max_entries=100)
    kept = numbers(await store.read(AuditQuery(limit=1000)))
    assert kept == list(range(201, 1, -1)), kept


@kinds(*KINDS)
async def test_a_flood_of_refusals_never_pushes_out_the_other_entries(make: StoreMaker) -> None:
    """Refusals (401, 403) are kept within a bound of their own: with max-entries 100, a
    force-unlock followed by 1,200 calls with no token keeps the force-unlock and the newest
    100 refusals; 105 more entries of calls served then keep the newest 100 of those. (A
    durable store prunes when it starts again, or at its first entry: the prune runs before
    or after the entry after a restart.)"""
    store = make(max_entries=100)

    async def restarted(n: int, **fields: Any) -> AuditStore:
        if not isinstance(store, MemoryAuditStore):
            await store.close()
            again = make(max_entries=100)
        else:
            again = store
        await again.append(entry(n, **fields))
        return again

    def refused(entries: list[AuditEntry]) -> list[int | None]:
        return numbers([e for e in entries if e.status in (401, 403)])

    await store.append(entry(0, verb="admin", action="force-unlock", outcome="ok"))
    for n in range(1, 1201):
        await store.append(entry(n, identity="anonymous", outcome="unauthenticated",
                                 status=401, verb="read", action="list-locks"))
    store = await restarted(1201, outcome="denied", status=403)
    assert numbers(await store.read(AuditQuery(action="force-unlock"))) == [0]
    kept = refused(await store.read(AuditQuery(limit=2000)))
    assert kept in ([1201, *range(1200, 1100, -1)], [1201, *range(1200, 1101, -1)]), kept

    for n in range(1202, 1307):
        await store.append(entry(n))
    store = await restarted(1307)
    served = numbers(await store.read(AuditQuery(outcome="acquired", limit=2000)))
    if isinstance(store, RedisAuditStore):  # MAXLEN ~: at least the newest 100
        assert served[:100] == list(range(1307, 1207, -1)) and len(served) <= 200, served
    else:
        assert served in (list(range(1307, 1207, -1)), list(range(1307, 1206, -1))), served
        assert numbers(await store.read(AuditQuery(action="force-unlock"))) == []
    assert refused(await store.read(AuditQuery(limit=2000)))[:2] == [1201, 1200]


@kinds("redis")
async def test_the_redis_list_of_refusals_written_over_is_dropped_and_the_bound_holds(
    make: StoreMaker, request: pytest.FixtureRequest,
) -> None:
    """The list of the refusals' ids beside the stream, written over by another type, is
    dropped by the next append (it is an index only): no append fails by it, and the
    refusals are bounded again from there; the one it listed stays (until it ages out)."""
    config = redis_config(request.getfixturevalue("redis_server"))
    admin = connect(config)
    listed = key_beside(f"{config.redis_key_prefix}audit", "refusals", "ids")
    store = make(max_entries=100)
    refusal: dict[str, Any] = {"outcome": "denied", "status": 403}
    try:
        await store.append(entry(1, **refusal))
        await admin.client.delete(listed)
        await admin.client.set(listed, f"token={SECRET}")
        for n in range(2, 151):
            await store.append(entry(n, **refusal))
        assert await admin.client.type(listed) == "list"
    finally:
        await admin.close()
    kept = numbers(await store.read(AuditQuery(outcome="denied", limit=1000)))
    assert kept == [*range(150, 50, -1), 1], kept


@kinds("redis")
async def test_the_redis_prune_by_age_takes_the_refusals_ids_out_with_their_entries(
    make: StoreMaker, request: pytest.FixtureRequest,
) -> None:
    """Redis ages an entry by its stream id, the time it was written: past the retention, the
    prune (at a store's first append, then every PRUNE_EVERY) removes the entries and, with
    them, their ids from the list of refusals beside the stream. Before, the ids stayed until
    as many newer refusals pushed them out: the list named entries gone, and each one let the
    stream keep one more of the other entries past the bound."""
    config = redis_config(request.getfixturevalue("redis_server"))
    admin = connect(config)
    stream = f"{config.redis_key_prefix}audit"
    listed = key_beside(stream, "refusals", "ids")
    refusal: dict[str, Any] = {"outcome": "unauthenticated", "status": 401}
    try:
        old = make(max_age=timedelta(seconds=1), max_entries=100)
        for n in range(1, 31):
            await old.append(entry(n, **refusal))
        await old.append(entry(31))
        assert await admin.client.llen(listed) == 30
        written = await admin.client.time()
        # Until Redis's clock is past the retention of the last entry written (a second).
        deadline = time.monotonic() + 30
        while True:
            now = await admin.client.time()
            if (now[0] - written[0]) * 1_000_000 + now[1] - written[1] > 1_500_000:
                break
            assert time.monotonic() < deadline, "Redis's clock did not move on"
            await asyncio.sleep(0.1)
        new = make(max_age=timedelta(seconds=1), max_entries=100)
        await new.append(entry(32, **refusal))  # a store's first append prunes
        assert await admin.client.llen(listed) <= 1, (
            "the ids of refusals the prune by age removed stayed listed: "
            f"{await admin.client.lrange(listed, 0, -1)}")
        assert await admin.client.xlen(stream) <= 2  # (the new one, pruned before or after)
    finally:
        await admin.close()
    assert numbers(await new.read(AuditQuery(limit=100))) == [32]


@kinds(*SHARED)
async def test_replicas_share_one_trail_in_one_order(make: StoreMaker) -> None:
    a, b = make(), make()
    for n in range(1, 7):
        await (a if n % 2 else b).append(entry(n))
    on_a, on_b = await a.read(AuditQuery()), await b.read(AuditQuery())
    assert on_a == on_b
    assert numbers(on_a) == [6, 5, 4, 3, 2, 1]


async def _plant(store: AuditStore, name: str, fields: dict[str, str]) -> None:
    """Something else's entry in the trail's place, between the service's own."""
    if isinstance(store, SqliteAuditStore):  # a row of its own, after the store's block of ids
        await store.read(AuditQuery(limit=1))  # what waits is written first
        store._db.execute("INSERT INTO audit (time, identity, verb, action, outcome, data) "
                          "VALUES (?, 'x', 'x', 'x', 'x', ?)",
                          (utcnow().isoformat(), fields.get("e", "")))
        return
    if isinstance(store, RedisAuditStore):
        await store._connection.client.xadd(store._stream, fields)  # type: ignore[arg-type]
        return
    assert isinstance(store, EtcdAuditStore)
    await store._outbox.drained(5)
    client = await store._connection.client()
    assert client.kv is not None
    await client.kv.put(store._prefix + f"{utcnow().timestamp() * 1e6:016.0f}-{name}".encode(),
                        fields.get("e", "").encode())


@kinds(*DURABLE)
async def test_an_entry_that_does_not_read_is_left_out_and_the_trail_reads_on(
    make: StoreMaker, caplog: pytest.LogCaptureFixture,
) -> None:
    """Something else wrote into the trail's place: what does not read as an entry is left out
    of every read (logged, never its content); the pages around it are whole."""
    store = make()
    await store.append(entry(1))
    await _plant(store, "aa", {"e": f"token={SECRET}"})  # not JSON
    await store.append(entry(2))
    await _plant(store, "bb", {"e": json.dumps({"token": SECRET})})  # not an entry
    await _plant(store, "cc", {"token": SECRET})  # no entry field (etcd, SQLite: empty text)
    await store.append(entry(3))
    with caplog.at_level(logging.WARNING, logger="enhanced_locking.backends.audit_store"):
        assert numbers(await store.read(AuditQuery())) == [3, 2, 1]
        first = await store.read(AuditQuery(limit=2))
        assert numbers(first) == [3, 2]
        assert numbers(await store.read(AuditQuery(limit=2, before=first[-1].id))) == [1]
        assert numbers(await store.read(AuditQuery(pull=2))) == [2]
    assert "does not read" in caplog.text
    assert SECRET not in caplog.text


def _redis_where(request: pytest.FixtureRequest, kind: str) -> EnhancedLockingConfig:
    settings: dict[str, Any] = {"enabled": True, "backend": "redis", "legacy_backend": "memory"}
    if kind == "redis":
        return redis_config(request.getfixturevalue("redis_server"), **settings)
    return redis_cluster_config(request.getfixturevalue("redis_cluster"),
                                request.getfixturevalue("redis_cluster_prefix"), **settings)


WRITTEN_OVER: dict[str, Callable[[Any, str], Awaitable[object]]] = {
    "string": lambda redis, name: redis.set(name, f"token={SECRET}"),
    "hash": lambda redis, name: redis.hset(name, "token", SECRET),
    "list": lambda redis, name: redis.rpush(name, SECRET),
}


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
@pytest.mark.parametrize("write", list(WRITTEN_OVER))
async def test_an_audit_stream_written_over_is_replaced_and_no_call_fails_by_it(
    request: pytest.FixtureRequest, kind: str, write: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """Another Redis type at the trail's key (written over by something else): an audited
    call answers as always and its entry starts a new stream; a read answers what the new
    stream holds; what the old one held is gone, and the log says so once per replacement."""
    config = _redis_where(request, kind)
    stream = f"{config.redis_key_prefix}audit"
    service = LockService(ConfigProvider(config))
    await service.start()
    app = create_app(service, manage_lifecycle=False)
    trail: AuditTrail = app.state.audit
    admin = connect(config)

    async def written_over() -> None:
        await admin.client.delete(stream)
        await WRITTEN_OVER[write](admin.client, stream)

    async def actions(http: httpx.AsyncClient) -> list[tuple[str, int]]:
        answer = await http.get("/v1/audit", params={"repo": REPO})
        assert answer.status_code == 200, answer.text
        return [(row["action"], row["pull"]) for row in answer.json()["entries"]]

    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
            with caplog.at_level(logging.WARNING, logger="enhanced_locking"):
                answer = await http.post("/v1/locks", json=lock_body(REPO, "envs/audited", 1))
                assert answer.status_code == 200, answer.text
                key = answer.json()["lock"]["key"]
                await written_over()  # the next entry meets it
                answer = await http.delete("/v1/locks/by-key", params={"key": key, "pull": 1})
                assert answer.status_code == 200, answer.text
                assert await actions(http) == [("release", 1)]
                await written_over()  # a read meets it first
                assert await actions(http) == []
                answer = await http.post("/v1/locks", json=lock_body(REPO, "envs/audited", 2))
                assert answer.status_code == 200, answer.text
                assert await actions(http) == [("acquire", 2)]
        assert await admin.client.type(stream) == "stream"
        assert trail.failures == 0
        assert service.metrics.registry.get_sample_value(
            "enhanced_locking_audit_entries_lost_total", {"reason": "refused"}) in (None, 0.0)
        replaced = [r.getMessage() for r in caplog.records
                    if f"the audit trail {stream} was not a stream" in r.getMessage()]
        assert len(replaced) == 2, caplog.text
        assert all(f"(Redis type {write};" in m and "entries it held are gone" in m
                   for m in replaced), replaced
        assert SECRET not in caplog.text
    finally:
        await admin.close()
        await trail.close()
        await service.close()


@pytest.mark.etcd
@pytest.mark.timeout(120)
async def test_a_service_on_etcd_keeps_its_audit_trail_in_etcd(
    etcd_cluster: EtcdCluster, etcd_prefix: str, tmp_path: Path,
) -> None:
    """A replica on a fresh data directory reads the trail another one wrote."""
    args = ("--enhanced-locking-enabled", "--enhanced-locking-backend=etcd",
            f"--enhanced-locking-etcd-endpoints={','.join(etcd_cluster.endpoints)}",
            f"--enhanced-locking-etcd-key-prefix={etcd_prefix}",
            "--enhanced-locking-legacy-backend=memory")
    body = {"project": {"repoFullName": "acme/audited", "path": "envs/prod"},
            "pull": {"num": 8}, "user": {"username": "ada"}}
    for n, act in enumerate(("acquire", "read")):
        process = ServiceProcess(tmp_path / f"data-{n}", args=args, log_dir=tmp_path / "logs")
        try:
            process.start()
        except ServiceStartError as error:
            pytest.fail(str(error), pytrace=False)
        try:
            async with httpx.AsyncClient(base_url=process.url, timeout=30) as http:
                if act == "acquire":
                    assert (await http.post("/v1/locks", json=body)).status_code == 200
                else:
                    rows = (await http.get("/v1/audit", params={"repo": "acme/audited"})
                            ).json()["entries"]
                    assert [(r["action"], r["outcome"]) for r in rows] == [
                        ("acquire", "acquired")]
        finally:
            process.stop()


@pytest.mark.etcd
async def test_an_audit_write_etcd_refuses_is_written_by_the_outbox_once_etcd_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """An audit write is one attempt (its call is not tried again within itself): refused
    (UNAVAILABLE: the member is down), its entries stay in the outbox, which writes them when
    etcd answers again: the trail holds both, in order, none dropped."""
    with started(tmp_path / "etcd") as cluster:
        store = EtcdAuditStore(EtcdConnection(EtcdSettings(endpoints=tuple(cluster.endpoints))),
                               "/audit-retry/", Retention(timedelta(days=1), 100))
        try:
            assert await store.read(AuditQuery()) == []  # connected
            member = cluster.members[0]
            await asyncio.to_thread(cluster.kill, member)
            stored = [await store.append(entry(n)) for n in (1, 2)]
            for _ in range(600):  # the outbox's write refused (30 s at most)
                if any("audit entries not written yet" in r.getMessage()
                       for r in caplog.records):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("no audit write was refused while etcd was down")
            assert store.waiting == 2
            await asyncio.to_thread(cluster.start_member, member)
            await asyncio.to_thread(cluster.wait_healthy)
            for _ in range(600):  # written on a retry (30 s at most)
                if store.waiting == 0:
                    break
                await asyncio.sleep(0.05)
            assert store.waiting == 0, "the outbox did not write the refused entries"
            found = await store.read(AuditQuery())
            assert [e.id for e in found] == [e.id for e in reversed(stored)]
            assert store.dropped == 0
        finally:
            await store.close()


@pytest.mark.etcd
async def test_etcd_out_of_reach_holds_up_no_call_and_a_read_says_unavailable() -> None:
    """The trail on etcd is written behind: an audited call never waits for etcd.

    Last in this file: its client keeps trying the closed port for a while, and a service
    process forked meanwhile by the test process was seen to abort in gRPC's fork handling.
    """
    store = EtcdAuditStore(EtcdConnection(EtcdSettings(endpoints=("127.0.0.1:9",))),
                           "/audit-test/", Retention(timedelta(days=1), 100))
    try:
        started = time.monotonic()
        stored = await store.append(entry(1))
        assert time.monotonic() - started < 0.5
        assert stored.id and stored.pull == 1
        with pytest.raises(BackendUnavailable, match=r"127\.0\.0\.1:9: audit read failed"):
            await store.read(AuditQuery())
    finally:
        await store.close()


@kinds("sqlite", "memory")
async def test_concurrent_appends_each_get_their_row_even_when_their_caller_goes(
    make: StoreMaker,
) -> None:
    """Entries appended at once (their rows may share one commit) each get their own id in
    the order appended; an append whose caller is cancelled (its client left) still writes its
    row, and closing the store writes what was appended but not yet written."""
    store = make()
    written = await asyncio.gather(*(store.append(entry(n)) for n in range(1, 41)))
    assert [e.pull for e in written] == list(range(1, 41))
    ids = [e.id for e in written]
    assert len(set(ids)) == 40
    if isinstance(store, SqliteAuditStore):
        assert [int(i) for i in ids] == sorted(int(i) for i in ids)
    gone = [asyncio.ensure_future(store.append(entry(n))) for n in range(41, 51)]
    await asyncio.sleep(0)  # each has appended; none has its answer yet
    for task in gone:
        task.cancel()
    await asyncio.gather(*gone, return_exceptions=True)
    pending = [asyncio.ensure_future(store.append(entry(n))) for n in range(51, 56)]
    await asyncio.sleep(0)
    if isinstance(store, SqliteAuditStore):
        await store.close()
        store = make()
    rows = numbers(await store.read(AuditQuery(limit=1000)))
    assert rows == list(range(55, 0, -1)), rows
    await asyncio.gather(*pending, return_exceptions=True)


def _pulls_in_file(path: Path) -> list[int]:
    """The rows committed to the file, as another connection reads them."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [row[0] for row in db.execute("SELECT pull FROM audit ORDER BY id")]


async def test_the_embedded_trail_is_written_behind_and_a_read_sees_every_entry_at_once(
    tmp_path: Path,
) -> None:
    """An entry's row reaches the file within the store's coalescing moment, the entries of
    that moment in one commit, not before the audited call answers; a read first writes what
    is waiting, so it sees every entry appended before it."""
    path = tmp_path / "trail.db"
    store = SqliteAuditStore(path, Retention(timedelta(days=1), 1000))
    try:
        written = [await store.append(entry(n)) for n in (1, 2, 3)]
        assert [int(e.id) for e in written] == sorted(int(e.id) for e in written)
        assert _pulls_in_file(path) == []
        await asyncio.sleep(store.coalesce * 5)  # the store's timer runs first
        assert _pulls_in_file(path) == [1, 2, 3]
        await store.append(entry(4))
        assert numbers(await store.read(AuditQuery())) == [4, 3, 2, 1]
        assert _pulls_in_file(path) == [1, 2, 3, 4]
    finally:
        await store.close()


async def test_a_service_stopped_cleanly_writes_every_entry_still_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The embedded trail writes behind; when the service stops (its app's lifespan ends), the
    entries still waiting are written: none is lost, each in the order of its call. (The
    store's window made longer than the test, so that no timer writes them first.)"""
    monkeypatch.setattr(SqliteAuditStore, "coalesce", 3600.0)
    config = EnhancedLockingConfig(enabled=True, legacy_backend="boltdb",
                                   data_dir=str(tmp_path / "data"), audit_stdout=False)
    app = create_app(LockService(ConfigProvider(config)))
    async with in_process(app) as http:
        for pull in (1, 2, 3):
            taken = await http.post("/v1/locks", json=lock_body(REPO, f"p{pull}", pull))
            assert taken.status_code == 200, taken.text
            given = await http.delete("/v1/locks/by-key", params={
                "key": taken.json()["lockKey"], "pull": pull})
            assert given.status_code == 200, given.text
        assert _pulls_in_file(config.data_path) == []  # every entry still waits
    assert _pulls_in_file(config.data_path) == [1, 1, 2, 2, 3, 3]
    with contextlib.closing(sqlite3.connect(config.data_path)) as db:
        assert [row[0] for row in db.execute("SELECT action FROM audit ORDER BY id")] == [
            "acquire", "release"] * 3


def test_a_timer_left_on_a_closed_loop_holds_back_no_entry_of_the_next_loop(
    tmp_path: Path,
) -> None:
    """The store's timer waits on the loop that appended; an entry appended on another loop
    after that one closed with the timer still waiting is written within its window all the
    same, with the entry left waiting (the store asks for the running loop again once the
    timer's loop no longer runs)."""
    path = tmp_path / "trail.db"
    store = SqliteAuditStore(path, Retention(timedelta(days=1), 1000))

    async def next_loop() -> list[int]:
        await store.append(entry(2))
        await asyncio.sleep(store.coalesce * 5)
        return _pulls_in_file(path)

    try:
        asyncio.run(store.append(entry(1)))  # its loop closes, the timer waiting on it
        assert _pulls_in_file(path) == []
        assert asyncio.run(next_loop()) == [1, 2]
    finally:
        asyncio.run(store.close())


async def test_a_batch_of_any_size_reaches_the_file_whole_in_order_each_row_its_own_entry(
    tmp_path: Path,
) -> None:
    """What waits is written by one ``INSERT`` per power of two in its number (23 entries:
    16, 4, 2 and 1 rows), at most ``batch_limit`` entries a transaction: whatever the sizes,
    every entry has its row, in the order appended, each row with its own entry's columns and
    JSON."""
    path = tmp_path / "trail.db"
    store = SqliteAuditStore(path, Retention(timedelta(days=1), 1000))
    written: list[AuditEntry] = []
    try:
        for count, limit in ((23, 500), (1, 500), (40, 7), (256, 500), (3, 2)):
            store.batch_limit = limit
            first = len(written)
            written += [await store.append(entry(first + n, outcome=f"outcome {first + n}"))
                        for n in range(count)]
            await asyncio.sleep(store.coalesce * 5)  # the store's timer runs first
            assert store.waiting == 0
            with contextlib.closing(sqlite3.connect(path)) as db:
                rows = db.execute("SELECT id, key, pull, outcome, data FROM audit "
                                  "ORDER BY id").fetchall()
            assert rows == [(int(str(e.id)), e.key, e.pull, e.outcome, entry_json(e))
                            for e in written]
        assert await store.read(AuditQuery(limit=1000)) == written[::-1]
    finally:
        await store.close()


_A_ROW = ("INSERT INTO audit (id, time, identity, verb, action, key, repo, pull, outcome, data) "
          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def _indexes(path: Path) -> dict[str, str]:
    """The audit table's indexes in the file, by name: their SQL."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return dict(db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                               "AND tbl_name = 'audit' AND sql IS NOT NULL"))


def _fills_a_temporary_table(path: Path) -> bool:
    """Whether SQLite's program for writing one row to the audit table opens a temporary
    table (``OpenEphemeral``): what an index's ``outcome IN (...)`` condition of more than two
    values costs, filled again for each row written."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        program = db.execute(f"EXPLAIN {_A_ROW}", (None,) * 10).fetchall()
    return any(step[1] == "OpenEphemeral" for step in program)


async def test_a_row_enters_its_kinds_index_without_a_temporary_table(tmp_path: Path) -> None:
    """Each row is written to the partial index of its kind (the refusals' or the others'),
    whose condition SQLite evaluates as the row is written: by comparisons, not by a temporary
    table of the refusals' outcomes filled for each row and each index."""
    path = tmp_path / "trail.db"
    store = SqliteAuditStore(path, Retention(timedelta(days=1), 1000))
    await store.close()
    assert not _fills_a_temporary_table(path)
    assert sorted(_indexes(path)) == ["audit_by_time", "audit_other_ids", "audit_refusal_ids"]


async def test_a_file_with_the_indexes_by_kind_of_before_gets_todays_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    """A trail written before has its indexes by kind with an ``outcome IN (...)`` condition
    (``audit_refusals``, ``audit_others``): a store opening the file puts today's in their
    place, the rows stay, and each kind is still bounded by its own count."""
    path = tmp_path / "trail.db"
    store = SqliteAuditStore(path, Retention(timedelta(days=1), 1000))
    written = [await store.append(entry(n, outcome="denied", status=403) if n % 2
                                  else entry(n)) for n in range(1, 7)]
    await store.close()
    refusal = "outcome IN ('cross-site', 'denied', 'foreign-host', 'unauthenticated')"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(f"""
            DROP INDEX audit_refusal_ids; DROP INDEX audit_other_ids;
            CREATE INDEX audit_refusals ON audit (id) WHERE {refusal};
            CREATE INDEX audit_others ON audit (id) WHERE NOT {refusal};
        """)
    assert _fills_a_temporary_table(path)  # the form of before, as a file of before has it
    store = SqliteAuditStore(path, Retention(timedelta(days=1), 2))
    try:
        assert sorted(_indexes(path)) == ["audit_by_time", "audit_other_ids",
                                          "audit_refusal_ids"]
        assert not _fills_a_temporary_table(path)
        assert await store.read(AuditQuery(limit=100)) == [
            e for e in written[::-1] if e.pull in (6, 5, 4, 3)]
    finally:
        await store.close()


async def test_stores_sharing_one_file_never_give_an_id_twice_and_closing_leaves_no_gap(
    tmp_path: Path,
) -> None:
    """Each store takes its ids from a block reserved in the file; two stores appending in
    turn (blocks of 3 here, so each reserves several) give every entry its own id, each in
    the order it appended; once both closed, the next store's first id follows the last one
    used (the ids reserved but unused are given back)."""
    path = tmp_path / "trail.db"
    retention = Retention(timedelta(days=1), 1000)
    a, b = SqliteAuditStore(path, retention), SqliteAuditStore(path, retention)
    a.id_block = b.id_block = 3
    written = [await (a if n % 2 else b).append(entry(n)) for n in range(1, 22)]
    ids = [int(e.id) for e in written]
    assert len(set(ids)) == 21
    for store in (a, b):
        own = [int(e.id) for e in written if (e.pull or 0) % 2 == (store is a)]
        assert own == sorted(own)
    await b.close()
    assert sorted(int(e.pull or 0) for e in await a.read(AuditQuery(limit=100))) == list(
        range(1, 22))
    await a.close()
    c = SqliteAuditStore(path, retention)
    try:
        assert int((await c.append(entry(22))).id) == max(ids) + 1
    finally:
        await c.close()



async def test_an_embedded_trail_the_file_cannot_read_is_unavailable(tmp_path: Path) -> None:
    # The file answers the trail's read with an error (here its table is gone from under the
    # store, as a damaged file or one restored without it would): the read is the store being
    # unavailable (503), never an error of the service's own (500); at start, the trail is
    # not opened.
    path = tmp_path / "enhanced-locking.db"
    store = SqliteAuditStore(path, Retention(timedelta(days=1), 1000))
    try:
        await store.append(entry(1))
        assert numbers(await store.read(AuditQuery())) == [1]
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("ALTER TABLE audit RENAME TO audit_elsewhere")
            db.commit()
        with pytest.raises(BackendUnavailable, match="cannot read the audit trail: no such"):
            await store.read(AuditQuery())
    finally:
        await store.close()
    # A service started on such a file: the trail cannot be opened, one line (exit 1).
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE VIEW audit AS SELECT 1 AS id")
        db.commit()
    with pytest.raises(BackendUnavailable, match="cannot open the audit trail in "):
        SqliteAuditStore(path, Retention(timedelta(days=1), 1000))


def _refuse_writes(path: Path, refuse: bool) -> None:
    """Make the file refuse (or take again) the audit table's writes, from another
    connection, as a full disk or a broken file would: every insert fails."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        if refuse:
            db.execute("CREATE TRIGGER refuse BEFORE INSERT ON audit "
                       "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        else:
            db.execute("DROP TRIGGER refuse")
        db.commit()


def _trail(store: SqliteAuditStore, stream: io.StringIO) -> tuple[AuditTrail, Metrics]:
    """A trail counted in metrics as the service counts it."""
    metrics = Metrics()
    trail = AuditTrail(store, stream=stream,
                       lost=lambda reason, n: metrics.audit_lost.labels(reason).inc(n))
    metrics.audit_waiting.set_function(trail.waiting)
    return trail, metrics


def _counted(metrics: Metrics) -> tuple[float | None, float | None, float | None]:
    """(waiting, refused, dropped) as /metrics shows them."""
    value = metrics.registry.get_sample_value
    return (value("enhanced_locking_audit_entries_waiting"),
            value("enhanced_locking_audit_entries_lost_total", {"reason": "refused"}),
            value("enhanced_locking_audit_entries_lost_total", {"reason": "dropped"}))


async def test_entries_wait_while_the_file_refuses_writes_and_are_written_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """An audited call never waits for the table: while the file refuses writes its entries
    get their ids, go to stdout at once and wait (counted), the store retries, the failure is
    logged once when it starts; once the file takes writes again every entry is written, in
    order, and that is logged too. A read of the trail meanwhile says the store is
    unavailable (the API's 503), it never answers without the waiting entries."""
    path = tmp_path / "trail.db"
    stream = io.StringIO()
    store = SqliteAuditStore(path, Retention(timedelta(days=1), 1000))
    try:
        trail, metrics = _trail(store, stream)
        await trail.record(entry(1))
        await asyncio.sleep(store.coalesce * 5)
        assert _pulls_in_file(path) == [1]
        _refuse_writes(path, True)
        with caplog.at_level(logging.WARNING, logger="enhanced_locking.backends.audit_store"):
            started = time.monotonic()
            for n in (2, 3, 4):
                await trail.record(entry(n))
            assert time.monotonic() - started < 0.5
            await asyncio.sleep(1.0)  # several retries (50 ms, doubling)
            assert _pulls_in_file(path) == [1]
            assert store.waiting == 3 and store.dropped == 0
            assert _counted(metrics) == (3.0, 0.0, 0.0)
            refused = [r for r in caplog.records if "not written" in r.getMessage()]
            assert len(refused) == 1, caplog.text
            assert "database or disk is full" in refused[0].getMessage()
            assert "3 wait" in refused[0].getMessage()
            with pytest.raises(BackendUnavailable, match="cannot write the audit trail"):
                await store.read(AuditQuery())
            _refuse_writes(path, False)
            await asyncio.sleep(store.retry_max + 0.5)
        assert _pulls_in_file(path) == [1, 2, 3, 4]
        assert "written again" in caplog.text and "3 that waited" in caplog.text
        assert _counted(metrics) == (0.0, 0.0, 0.0)
        assert numbers(await store.read(AuditQuery())) == [4, 3, 2, 1]
    finally:
        await store.close()
    lines = [json.loads(line)["audit"] for line in stream.getvalue().splitlines()]
    assert [line["pull"] for line in lines] == [1, 2, 3, 4] and all(line["id"] for line in lines)


async def test_beyond_its_capacity_the_oldest_waiting_entries_go_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The entries waiting for a file that refuses writes are bounded (``capacity``): past
    it the oldest go from the trail, never an audited call's answer; each went to stdout,
    each is counted (``dropped``), and the first is logged. The newest are written once the
    file takes writes again."""
    path = tmp_path / "trail.db"
    stream = io.StringIO()
    store = SqliteAuditStore(path, Retention(timedelta(days=1), 1000))
    store.capacity = 5
    try:
        trail, metrics = _trail(store, stream)
        _refuse_writes(path, True)
        with caplog.at_level(logging.WARNING, logger="enhanced_locking.backends.audit_store"):
            await trail.record(entry(1))
            await asyncio.sleep(store.coalesce * 5)  # the first write is refused
            for n in range(2, 9):
                await trail.record(entry(n))
            assert store.waiting == 5 and store.dropped == 3
            assert _counted(metrics) == (5.0, 0.0, 3.0)
            cut = [r for r in caplog.records if "the oldest go" in r.getMessage()]
            assert len(cut) == 1 and cut[0].levelno == logging.ERROR
            _refuse_writes(path, False)
            await asyncio.sleep(store.retry_max + 0.5)
        assert _pulls_in_file(path) == [4, 5, 6, 7, 8]
        assert "3 were dropped meanwhile" in caplog.text
        assert _counted(metrics) == (0.0, 0.0, 3.0)
    finally:
        await store.close()
    assert [json.loads(line)["audit"]["pull"] for line in stream.getvalue().splitlines()] == [
        1, 2, 3, 4, 5, 6, 7, 8]


async def test_an_entry_the_store_refuses_still_goes_to_stdout_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A store that cannot even give an entry its id (the file is read-only: its block of ids
    cannot be reserved) refuses it: the audited call still answers, the entry goes to stdout
    (without an id), and the refusal is logged and counted."""
    path = tmp_path / "trail.db"
    stream = io.StringIO()
    store = SqliteAuditStore(path, Retention(timedelta(days=1), 1000))
    try:
        trail, metrics = _trail(store, stream)
        store._db.execute("PRAGMA query_only = ON")  # what a read-only file answers
        with caplog.at_level(logging.ERROR, logger="enhanced_locking.api.audit"):
            await trail.record(entry(1))
        assert "audit entry not stored" in caplog.text and "readonly" in caplog.text
        assert trail.failures == 1
        assert _counted(metrics) == (0.0, 1.0, 0.0)
        store._db.execute("PRAGMA query_only = OFF")
        await trail.record(entry(2))
        assert numbers(await store.read(AuditQuery())) == [2]
    finally:
        await store.close()
    lines = [json.loads(line)["audit"] for line in stream.getvalue().splitlines()]
    assert [line["pull"] for line in lines] == [1, 2]
    assert not lines[0]["id"] and lines[1]["id"]


async def test_an_audited_call_answers_when_the_store_cannot_hand_out_its_entrys_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """An audited call asks the store for its entry's id before the entry is built: a file
    whose block of ids cannot be reserved (read-only) fails neither that nor the call; the
    entry is refused as the store refuses it (to stdout without an id, logged, counted),
    and the next call's entry is stored with its id."""
    path = tmp_path / "trail.db"
    stream = io.StringIO()
    store = SqliteAuditStore(path, Retention(timedelta(days=1), 1000))
    try:
        trail, metrics = _trail(store, stream)
        caller = Caller(identity=Identity(name="atlantis", groups=("bots",), method="static"),
                        peer="127.0.0.1:4711", request_id="req-7",
                        access=build_access(EnhancedLockingConfig(legacy_backend="memory")),
                        audit=trail)
        store._db.execute("PRAGMA query_only = ON")  # what a read-only file answers
        with caplog.at_level(logging.ERROR, logger="enhanced_locking.api.audit"):
            await caller.record(action="acquire", verb=Verb.LOCK, key="acme/infra/1/default",
                                repo="acme/infra", pull=1, outcome="acquired", status=200)
        assert "audit entry not stored" in caplog.text and "readonly" in caplog.text
        assert trail.failures == 1
        assert _counted(metrics) == (0.0, 1.0, 0.0)
        store._db.execute("PRAGMA query_only = OFF")
        await caller.record(action="acquire", verb=Verb.LOCK, key="acme/infra/2/default",
                            repo="acme/infra", pull=2, outcome="acquired", status=200)
        stored = await store.read(AuditQuery())
    finally:
        await store.close()
    assert numbers(stored) == [2]
    lines = [json.loads(line)["audit"] for line in stream.getvalue().splitlines()]
    assert [line["pull"] for line in lines] == [1, 2]
    assert not lines[0]["id"] and lines[1]["id"] == stored[0].id


async def test_the_stdout_line_is_the_stored_entry_with_its_id(tmp_path: Path) -> None:
    """The trail's stdout line of an entry is the entry as stored, id included: the text the
    embedded table keeps of it."""
    path = tmp_path / "trail.db"
    stream = io.StringIO()
    store = SqliteAuditStore(path, Retention(timedelta(days=1), 1000))
    try:
        trail = AuditTrail(store, stream=stream)
        for n in (1, 2):
            await trail.record(entry(n, reason=f"line {n}"))
        stored = list(reversed(await store.read(AuditQuery())))
    finally:
        await store.close()
    lines = [json.loads(line)["audit"] for line in stream.getvalue().splitlines()]
    assert lines == [json.loads(e.model_dump_json(by_alias=True)) for e in stored]
    assert [line["id"] for line in lines] == [e.id for e in stored]
    assert all(e.id for e in stored)
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = [json.loads(row[0]) for row in db.execute("SELECT data FROM audit ORDER BY id")]
    assert rows == lines
