"""What every backend keeps: fencing tokens, namespaces, leases, moving locks between stores.

Runs against every kind of ``backend_factory``; the reopen test only against kinds whose store
outlives the backend object (the embedded file, Redis).
"""

from __future__ import annotations

import contextlib
import gc
import sqlite3
import threading
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.support.backends import BACKEND_KINDS, BackendFactory
from tests.support.leases import Overrun, past, with_leases
from tests.support.locks import candidate_for, lock_for, request_for
from tests.support.queues import FakeClock, rig_for
from tests.unit.test_queue_seam import FIFO, _given_back_over_a_direct_answer, queue_up, want

from enhanced_locking.backends import (
    EmbeddedBackend,
    MemoryBackend,
    QueueBackend,
    base,
    codec,
    embedded,
)
from enhanced_locking.backends.audit_store import SqliteAuditStore, build_audit_store
from enhanced_locking.backends.embedded import (
    APPLICATION_ID,
    FLOOR_AHEAD,
    SCHEMA_VERSION,
    open_database,
)
from enhanced_locking.backends.waiting import Notice, Status
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.factory import build_backend
from enhanced_locking.types import (
    BackendUnavailable,
    Lock,
    LockNotOwned,
    Reason,
    StoreRefused,
    Synchronous,
    UnusableSetting,
    utcnow,
)

PERSISTENT = [name for name, kind in BACKEND_KINDS.items() if kind.persistent]


async def test_fencing_tokens_strictly_increase_per_key_across_releases(
    backend_factory: BackendFactory,
) -> None:
    backend = backend_factory()
    tokens = []
    for pull in range(1, 6):
        granted, lock = await backend.acquire(lock_for(request_for(pull=pull)))
        assert granted
        tokens.append(lock.fencing_token)
        assert await backend.release(lock.key) == lock
    assert tokens == sorted(set(tokens)) and tokens[0] >= 1
    _, other = await backend.acquire(lock_for(request_for(path="envs/dev")))
    if backend_factory.revision_tokens:
        assert other.fencing_token > tokens[-1], "the store's revision rises across keys"
    else:
        assert other.fencing_token == backend_factory.first_token(backend), (
            "each key counts on its own")


async def test_a_holder_asking_again_keeps_its_token(backend_factory: BackendFactory) -> None:
    backend = backend_factory()
    _, first = await backend.acquire(lock_for(request_for(pull=3)))
    granted, again = await backend.acquire(lock_for(request_for(pull=3)))
    assert granted and again == first


async def test_namespaces_in_one_store_never_see_each_others_keys(
    backend_factory: BackendFactory,
) -> None:
    legacy, enhanced = backend_factory("legacy"), backend_factory("enhanced")
    granted_legacy, _ = await legacy.acquire(lock_for(request_for(pull=1), backend="legacy"))
    granted_enhanced, lock = await enhanced.acquire(lock_for(request_for(pull=2)))
    assert granted_legacy and granted_enhanced
    assert [held.pull.num for held in await legacy.list()] == [1]
    assert [held.pull.num for held in await enhanced.list()] == [2]
    assert (lock.fencing_token == backend_factory.first_token(enhanced)
            or backend_factory.revision_tokens)
    assert await enhanced.release_by_pull("acme/infra", 1) == []
    assert (await legacy.get(lock.key)) is not None


async def test_list_filters_by_repository_and_pull(backend_factory: BackendFactory) -> None:
    backend = backend_factory()
    for repo, path, pull in [("acme/infra", "a", 1), ("acme/infra", "b", 2),
                             ("acme/web", "a", 1), ("acme/infra", "c", 1)]:
        assert (await backend.acquire(lock_for(request_for(repo=repo, path=path, pull=pull))))[0]

    def keys(locks: list) -> list[str]:  # type: ignore[type-arg]
        return sorted(lock.key for lock in locks)

    assert len(await backend.list()) == 4
    assert keys(await backend.list(repo="acme/infra")) == [
        "acme/infra/a/default/prod", "acme/infra/b/default/prod", "acme/infra/c/default/prod"]
    assert keys(await backend.list(pull=1)) == [
        "acme/infra/a/default/prod", "acme/infra/c/default/prod", "acme/web/a/default/prod"]
    assert keys(await backend.list(repo="acme/infra", pull=1)) == [
        "acme/infra/a/default/prod", "acme/infra/c/default/prod"]


async def test_a_negative_pull_is_listed_and_released_by_pull_as_its_own(
    backend_factory: BackendFactory,
) -> None:
    # Atlantis numbers a plan or apply without a pull request (its /api/plan, /api/apply and
    # drift runs) with a made-up negative pull number: its by-pull index entry is its own, not
    # that of the pull with the same digits.
    backend = backend_factory()
    for path, pull in [("a", -12345), ("b", -12345), ("c", 12345), ("d", -(2**31))]:
        assert (await backend.acquire(lock_for(request_for(path=path, pull=pull))))[0]
    assert sorted(lock.key for lock in await backend.list(pull=-12345)) == [
        "acme/infra/a/default/prod", "acme/infra/b/default/prod"]
    released = await backend.release_by_pull("acme/infra", -12345)
    assert sorted((lock.key, lock.pull.num) for lock in released) == [
        ("acme/infra/a/default/prod", -12345), ("acme/infra/b/default/prod", -12345)]
    assert sorted((lock.key, lock.pull.num) for lock in await backend.list()) == [
        ("acme/infra/c/default/prod", 12345), ("acme/infra/d/default/prod", -(2**31))]
    assert [lock.pull.num for lock in await backend.release_by_pull("acme/infra", -(2**31))] == [
        -(2**31)]
    assert [lock.pull.num for lock in await backend.list()] == [12345]


async def test_a_lapsed_lease_frees_the_key(backend_factory: BackendFactory) -> None:
    # Real time, briefly: the Redis backend's leases run on the server's clock. The lease ends
    # a fixed time after the test asked, so the grant's own answer must come before that end:
    # etcd refuses a grant answered after its lock's end (the answer was late; the lock is not
    # held), which on a busy machine a first call's connect and lease grant can be.
    backend = backend_factory()
    assert isinstance(backend, QueueBackend)  # every kind: its clock is ``now()``

    async def case(lease: timedelta) -> None:
        path = f"lapse-{lease // timedelta(milliseconds=1)}"
        now = utcnow()
        leased = lock_for(request_for(pull=1, path=path)).model_copy(
            update={"acquired_at": now, "expires_at": now + lease})
        assert leased.expires_at is not None
        try:
            granted, lock = await backend.acquire(leased)
        except BackendUnavailable:  # only if the store's clock had passed the lease's end
            if await backend.now() < leased.expires_at:
                raise
            raise Overrun from None
        assert granted and lock.expires_at is not None
        await past(backend.now, lock.expires_at)
        assert await backend.get(lock.key) is None
        assert await backend.list() == []
        granted, after = await backend.acquire(lock_for(request_for(pull=2, path=path)))
        assert granted and after.pull.num == 2
        assert backend_factory.follows(lock.fencing_token, after.fencing_token)

    await with_leases(case)


async def test_release_with_an_owner_refuses_another_pull(backend_factory: BackendFactory) -> None:
    backend = backend_factory()
    _, lock = await backend.acquire(lock_for(request_for(pull=1)))
    with pytest.raises(LockNotOwned) as refused:
        await backend.release(lock.key, owner=("acme/infra", 2))
    assert refused.value.holder == lock
    with pytest.raises(LockNotOwned):
        await backend.release(lock.key, owner=("acme/other", 1))
    assert await backend.release(lock.key, owner=("acme/infra", 1)) == lock


async def test_locks_and_counters_move_to_another_store_and_counters_only_rise(
    backend_factory: BackendFactory,
) -> None:
    source, target = backend_factory("enhanced"), MemoryBackend("enhanced")
    for _ in range(3):
        _, lock = await source.acquire(lock_for(request_for(pull=1)))
        await source.release(lock.key)
    _, held = await source.acquire(lock_for(request_for(pull=1)))
    locks, tokens = await source.export()
    assert locks == [held] and list(tokens) == [held.key]
    # A counter per key says its fourth token; revision tokens say at least the held lock's
    # revision.
    assert tokens[held.key] == backend_factory.first_token(source) + 3 or (
        backend_factory.revision_tokens and tokens[held.key] >= held.fencing_token)
    assert await target.adopt(locks, tokens) == []
    assert await target.get(held.key) == held
    await target.release(held.key)
    _, next_lock = await target.acquire(lock_for(request_for(pull=2)))
    # (the counter moved, or the target's own floor if that is higher: the memory store's)
    assert next_lock.fencing_token == max(tokens[held.key], target.token_floor) + 1


async def test_adopting_a_key_held_here_by_another_pull_reports_a_conflict(
    backend_factory: BackendFactory,
) -> None:
    here = backend_factory("enhanced")
    _, mine = await here.acquire(lock_for(request_for(pull=1)))
    theirs = lock_for(request_for(pull=2)).model_copy(update={"fencing_token": 9})
    assert await here.adopt([theirs], {theirs.key: 9}) == [theirs]
    assert await here.get(mine.key) == mine


async def test_a_replace_puts_a_lock_in_place_of_whatever_holds_its_key(
    backend_factory: BackendFactory,
) -> None:
    here = backend_factory("enhanced")
    assert isinstance(here, QueueBackend)
    _, mine = await here.acquire(lock_for(request_for(pull=1)))
    theirs = lock_for(request_for(pull=2)).model_copy(update={"fencing_token": 90})
    assert await here.replace(theirs)
    stored = await here.get(mine.key)
    assert stored is not None and (stored.owner, stored.fencing_token) == (theirs.owner, 90)
    assert await here.list(repo="acme/infra", pull=1) == []
    assert [lock.fencing_token for lock in await here.list(repo="acme/infra", pull=2)] == [90]
    # Shared holders go too, and the key's counter rises to the token it was given.
    other = request_for(path="envs/dev").key
    readers = [lock_for(request_for(path="envs/dev", pull=pull)).model_copy(
        update={"mode": "shared", "fencing_token": pull}) for pull in (1, 2)]
    assert await here.adopt(readers, {}) == []
    assert len(await here.holders(other)) == 2
    again = lock_for(request_for(path="envs/dev", pull=3)).model_copy(
        update={"fencing_token": 50})
    assert await here.replace(again)
    assert [(lock.owner, lock.fencing_token) for lock in await here.holders(other)] == [
        (again.owner, 50)]
    await here.release(again.key)
    _, after = await here.acquire(lock_for(request_for(path="envs/dev", pull=4)))
    assert after.fencing_token > 50
    # A lock whose lease has ended is not stored; what held the key is gone all the same.
    ended = theirs.model_copy(update={"expires_at": utcnow() - timedelta(seconds=1)})
    assert not await here.replace(ended)
    assert await here.get(mine.key) is None


@pytest.mark.parametrize("backend_factory", PERSISTENT, indirect=True)
async def test_a_new_backend_on_the_same_store_sees_the_locks_and_continues_the_tokens(
    backend_factory: BackendFactory,
) -> None:
    first = backend_factory("enhanced")
    _, lock = await first.acquire(lock_for(request_for(pull=1)))
    await first.release(lock.key)
    _, lock = await first.acquire(lock_for(request_for(pull=1)))
    await first.close()
    reopened = backend_factory("enhanced")
    assert await reopened.get(lock.key) == lock
    await reopened.release(lock.key)
    _, after = await reopened.acquire(lock_for(request_for(pull=2)))
    assert backend_factory.follows(lock.fencing_token, after.fencing_token)
    assert lock.fencing_token == 2 or backend_factory.revision_tokens


# --- the embedded store ------------------------------------------------------------------------


async def test_the_embedded_store_is_one_sqlite_file_in_wal_mode(data_dir: Path) -> None:
    backend = EmbeddedBackend(data_dir / "enhanced-locking.db")
    try:
        assert (await backend.acquire(lock_for(request_for())))[0]
        mode = backend._db.execute("PRAGMA journal_mode").fetchone()[0]
        synchronous = backend._db.execute("PRAGMA synchronous").fetchone()[0]
        assert (mode, synchronous) == ("wal", 1)  # 1 is NORMAL: see the module's durability note
        assert (data_dir / "enhanced-locking.db").is_file()
    finally:
        await backend.close()


@pytest.mark.parametrize(("setting", "pragma"), [("normal", 1), ("full", 2)])
async def test_every_connection_on_the_store_file_syncs_as_store_synchronous_says(
    data_dir: Path, setting: Synchronous, pragma: int,
) -> None:
    # The locks of both sides and the audit trail share the file: each of its connections
    # commits as the setting says (SQLite's synchronous is a connection's own), FULL syncing
    # every commit to disk before the answer.
    config = EnhancedLockingConfig(enabled=True, data_dir=str(data_dir),
                                   store_synchronous=setting)
    enhanced = build_backend(config, "boltdb", "enhanced")
    legacy = build_backend(config, "boltdb", "legacy")
    audit = build_audit_store(config)
    try:
        assert isinstance(enhanced, EmbeddedBackend) and isinstance(legacy, EmbeddedBackend)
        assert isinstance(audit, SqliteAuditStore)
        assert (await enhanced.acquire(lock_for(request_for())))[0]
        for db in (enhanced._db, legacy._db, audit._db):
            assert db.execute("PRAGMA synchronous").fetchone()[0] == pragma
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        for closing in (enhanced, legacy, audit):
            await closing.close()


@pytest.mark.parametrize(("setting", "pragma"), [("normal", "NORMAL"), ("full", "FULL")])
def test_a_new_store_file_is_made_under_the_store_synchronous_asked(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, setting: Synchronous, pragma: str,
) -> None:
    """A store file that does not exist is made whole under a name of its own, then linked
    into place: that making (its tables, its counters) commits as ``store-synchronous`` says,
    not under SQLite's default for the connection that makes it. Before, it was made under
    ``normal`` whatever was asked, and only the connection opened after it synced as asked."""
    made: dict[str, list[str]] = {}
    connect = sqlite3.connect

    def traced(path: str | Path, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        db: sqlite3.Connection = connect(path, *args, **kwargs)
        db.set_trace_callback(made.setdefault(Path(path).name, []).append)
        return db

    monkeypatch.setattr(sqlite3, "connect", traced)
    path = data_dir / "enhanced-locking.db"
    db = open_database(path, synchronous=setting)
    db.close()
    monkeypatch.undo()
    [new] = [name for name in made if name.endswith(".new")]
    for name in (new, path.name):
        statements = made[name]
        creates = [i for i, s in enumerate(statements) if s.startswith("CREATE TABLE")]
        synced = [i for i, s in enumerate(statements) if s.startswith("PRAGMA synchronous")]
        assert creates and synced, (name, statements)
        assert synced[0] < creates[0], f"{name}: tables made before the setting: {statements}"
        assert all(statements[i] == f"PRAGMA synchronous={pragma}" for i in synced), statements


async def test_a_long_list_of_the_embedded_store_decodes_with_the_collector_paused(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A list of many locks decodes them with Python's cyclic collector paused (its full
    # collections would walk the whole process again and again as the answer grows), and
    # leaves it as it found it: running, or off if the process had turned it off.
    backend = EmbeddedBackend(data_dir / "enhanced-locking.db")
    read, collector_on = codec.read, []

    def read_watched(text: str | bytes, *, key: str, side: str) -> Lock:
        collector_on.append(gc.isenabled())
        return read(text, key=key, side=side)

    monkeypatch.setattr(codec, "read", read_watched)
    try:
        held = [lock_for(request_for(path=f"p{n}", pull=n // 10 + 1)).model_copy(
            update={"fencing_token": 1}) for n in range(base._PAUSE_FROM + 200)]
        assert await backend.adopt(held, {}) == []
        listed = await backend.list()
        assert sorted(listed, key=lambda lock: lock.key) == sorted(held, key=lambda lock: lock.key)
        assert len(collector_on) == len(held) and not any(collector_on)
        assert gc.isenabled()
        collector_on.clear()
        assert len(await backend.list(repo="acme/infra", pull=3)) == 10
        assert collector_on == [True] * 10, "a short list leaves the collector running"
        gc.disable()
        try:
            assert len(await backend.list()) == len(held)
            assert not gc.isenabled(), "a process that turned the collector off keeps it off"
        finally:
            gc.enable()
    finally:
        await backend.close()


def test_the_collector_resumes_whatever_the_decoding_raised() -> None:
    with pytest.raises(RuntimeError), base._collector_paused(base._PAUSE_FROM):
        assert not gc.isenabled()
        raise RuntimeError("a failure while decoding")
    assert gc.isenabled()


@pytest.fixture
async def writers(data_dir: Path) -> AsyncIterator[tuple[EmbeddedBackend, EmbeddedBackend]]:
    """Two services' backends on one embedded file (a connection each), closed after."""
    path = data_dir / "enhanced-locking.db"
    one, two = EmbeddedBackend(path), EmbeddedBackend(path)
    try:
        yield one, two
    finally:
        await one.close()
        await two.close()


async def test_two_writers_of_one_embedded_file_each_store_the_token_they_answer(
    data_dir: Path, writers: tuple[EmbeddedBackend, EmbeddedBackend],
) -> None:
    # Two services on one file: each takes a key it has seen with the token it expects, and
    # when the other moved the counter meanwhile, the store writes the counter's token instead;
    # the same pull and another pull, each after the other service took the key or not.
    path = data_dir / "enhanced-locking.db"
    one, two = writers
    key = request_for().key
    turns = ((one, 1), (one, 1), (two, 1), (one, 1), (two, 2), (one, 3), (two, 2), (one, 1),
             (one, 2))
    tokens = []
    for backend, pull in turns:
        granted, lock = await backend.acquire(lock_for(request_for(pull=pull)))
        assert granted and lock.pull.num == pull
        tokens.append(lock.fencing_token)
        for reader in (one, two):
            assert await reader.get(key) == lock, "the file holds the lock answered"
            assert await reader.list(repo="acme/infra", pull=pull) == [lock]
        with contextlib.closing(sqlite3.connect(path)) as db:
            data, counter = db.execute(
                "SELECT data, counter FROM locks WHERE key = ?", (key,)).fetchone()
        assert codec.decode(data).fencing_token == counter == lock.fencing_token
        assert await backend.release(key) == lock
    assert tokens == list(range(tokens[0], tokens[0] + len(turns)))


async def test_a_release_answers_the_lock_the_file_holds_after_another_writer_changed_it(
    writers: tuple[EmbeddedBackend, EmbeddedBackend],
) -> None:
    # The release frees the row without reading it back when the row holds the text this
    # service last saw; when another service on the file changed the lock meanwhile (a lease
    # refreshed, the key released and taken by another pull), it answers what the file held.
    one, two = writers
    key = request_for().key
    granted, lock = await one.acquire(lock_for(request_for()))
    assert granted and lock.expires_at is None
    refreshed = await two.refresh(key, lock.owner, timedelta(minutes=5))
    assert refreshed.fencing_token == lock.fencing_token and refreshed != lock
    assert await one.release(key, owner=lock.owner) == refreshed
    assert await one.get(key) is None and await two.get(key) is None

    granted, lock = await one.acquire(lock_for(request_for()))
    assert granted and await two.release(key) == lock
    granted, other = await two.acquire(lock_for(request_for(pull=2)))
    assert granted and other.fencing_token == lock.fencing_token + 1
    with pytest.raises(LockNotOwned):
        await one.release(key, owner=lock.owner)
    assert await two.get(key) == other, "a refused release changes nothing"
    assert await one.release(key) == other
    assert await two.get(key) is None
    granted, again = await one.acquire(lock_for(request_for()))
    assert granted and again.fencing_token == other.fencing_token + 1


async def test_a_release_by_the_token_last_seen_frees_nothing_another_writer_took_since(
    writers: tuple[EmbeddedBackend, EmbeddedBackend],
) -> None:
    # The release route's guess (the lock this service last granted or read, no read of the
    # file) is released by its fencing token: by one statement when the row still holds it,
    # never when another service on the file released the key and gave it out again since,
    # to the same pull or another.
    one, two = writers
    key = request_for().key
    statements: list[str] = []
    assert one.held_as_seen(key) is None
    granted, lock = await one.acquire(lock_for(request_for()))
    assert granted and one.held_as_seen(key) == lock
    one._db.set_trace_callback(statements.append)
    handoff = await one.release_and_handoff(key, owner=lock.owner,
                                            token=lock.fencing_token)
    one._db.set_trace_callback(None)
    assert handoff.released == lock and await two.get(key) is None
    assert {s.split()[0] for s in statements} == {"UPDATE"}, "no read, no transaction"
    assert one.held_as_seen(key) is None

    for pull in (1, 2):  # taken again by the same pull, then by another
        granted, lock = await one.acquire(lock_for(request_for()))
        assert granted and await two.release(key) == lock
        granted, other = await two.acquire(lock_for(request_for(pull=pull)))
        assert granted and other.fencing_token > lock.fencing_token
        assert one.held_as_seen(key) == lock, "a guess: the other writer is not seen"
        with pytest.raises(LockNotOwned):
            await one.release_and_handoff(key, owner=lock.owner, token=lock.fencing_token)
        assert await two.get(key) == other, "a refused release changes nothing"
        assert one.held_as_seen(key) == other, "read since: the guess is the file's lock"
        assert await two.release(key) == other
    granted, lock = await one.acquire(lock_for(request_for()))
    assert granted and await two.release(key) == lock
    assert (await one.release_and_handoff(key, owner=lock.owner,
                                          token=lock.fencing_token)).released is None
    assert await one.get(key) is None and one.held_as_seen(key) is None


async def test_a_counter_row_lost_under_running_services_never_hands_a_token_out_again(
    data_dir: Path, writers: tuple[EmbeddedBackend, EmbeddedBackend],
) -> None:
    # The rows of the file deleted by hand while two services run on it (each opened it
    # before): the key's next token, from either, is above every token it had.
    path = data_dir / "enhanced-locking.db"
    one, two = writers
    tokens = []
    for pull in (1, 2, 3):
        granted, lock = await one.acquire(lock_for(request_for(pull=pull)))
        assert granted and await one.release(lock.key) == lock
        tokens.append(lock.fencing_token)
    for backend in (one, two, one):
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("DELETE FROM locks")
            db.commit()
        granted, lock = await backend.acquire(lock_for(request_for(pull=4)))
        assert granted and lock.fencing_token > max(tokens), "a lost row's tokens stay given"
        tokens.append(lock.fencing_token)
        assert await backend.release(lock.key) == lock
    # A key never taken before, in a file that lost no row, still starts at the floor read
    # when the file was opened plus one.
    fresh = EmbeddedBackend(data_dir / "other.db")
    try:
        for path_of in ("a", "b"):
            granted, lock = await fresh.acquire(lock_for(request_for(path=path_of)))
            assert granted and lock.fencing_token == 1
    finally:
        await fresh.close()


async def test_an_embedded_store_closed_after_use_answers_backend_unavailable(
    data_dir: Path,
) -> None:
    backend = EmbeddedBackend(data_dir / "enhanced-locking.db")
    granted, lock = await backend.acquire(lock_for(request_for()))
    assert granted and await backend.release(lock.key) == lock
    await backend.close()
    for call in ("acquire", "release"):
        with pytest.raises(BackendUnavailable, match="embedded store"):
            await CALLS[call](backend)


CALLS = {
    "acquire": lambda backend: backend.acquire(lock_for(request_for())),
    "release": lambda backend: backend.release(request_for().key),
    "get": lambda backend: backend.get(request_for().key),
    "list": lambda backend: backend.list(),
    "release_by_pull": lambda backend: backend.release_by_pull("acme/infra", 1),
    "export": lambda backend: backend.export(),
    "adopt": lambda backend: backend.adopt([lock_for(request_for())], {}),
    "replace": lambda backend: backend.replace(lock_for(request_for())),
    "ping": lambda backend: backend.ping(),
}


@pytest.mark.parametrize("call", list(CALLS))
async def test_a_closed_embedded_store_answers_backend_unavailable(
    call: str, data_dir: Path
) -> None:
    backend = EmbeddedBackend(data_dir / "enhanced-locking.db")
    await backend.close()
    with pytest.raises(BackendUnavailable, match="embedded store"):
        await CALLS[call](backend)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_an_embedded_store_whose_file_goes_from_under_it_is_not_ready(
    data_dir: Path, how: str
) -> None:
    # The file deleted (or moved away and another put in its place) while the service runs:
    # SQLite keeps writing to the file it opened, which nobody will open again, so every
    # grant from then on is lost at the next start. The store's ping (/readyz) says so.
    path = data_dir / "enhanced-locking.db"
    backend = EmbeddedBackend(path)
    try:
        assert (await backend.acquire(lock_for(request_for())))[0]
        await backend.ping()
        if how == "deleted":
            path.unlink()
        else:
            path.rename(data_dir / "moved.db")
            await EmbeddedBackend(path).close()
        with pytest.raises(BackendUnavailable, match=f"embedded store {path}: the file was "
                           "deleted or replaced"):
            await backend.ping()
    finally:
        await backend.close()


def test_services_opening_a_new_store_file_at_once_all_open_it(tmp_path: Path) -> None:
    # Several openers of one data dir that has no store yet, at the same moment (services
    # started together on a new volume): each opens the one store. A file made in place
    # could be seen by another opener before it held its tables (refused as "exists but is
    # empty"), or while it was turned to WAL mode ("database is locked").
    for attempt in range(15):
        path = tmp_path / str(attempt) / "enhanced-locking.db"
        start = threading.Barrier(3)
        opened: list[str] = []

        def open_it(path: Path = path, start: threading.Barrier = start,
                    opened: list[str] = opened) -> None:
            start.wait()
            try:
                with contextlib.closing(open_database(path)) as db:
                    version = db.execute("PRAGMA user_version").fetchone()[0]
                opened.append(f"version {version}")
            except Exception as error:  # what the test reports
                opened.append(f"{type(error).__name__}: {error}")

        openers = [threading.Thread(target=open_it) for _ in range(3)]
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join()
        assert opened == [f"version {SCHEMA_VERSION}"] * 3, opened
        # No file an opener built and linked into place is left; SQLite's own WAL and shared
        # memory files may stay when the openers closed at once (none saw itself the last).
        left = {p.name for p in path.parent.iterdir()} - {"enhanced-locking.db-wal",
                                                          "enhanced-locking.db-shm"}
        assert left == {"enhanced-locking.db"}, left


def test_an_embedded_store_whose_dir_cannot_be_made_names_the_setting(tmp_path: Path) -> None:
    # A file where the data dir should be is the user's setting, not the store failing.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the data dir should be")
    with pytest.raises(UnusableSetting,
                       match="invalid setting data-dir: cannot make the embedded store's"):
        EmbeddedBackend(blocker / "enhanced-locking.db")
    with pytest.raises(UnusableSetting, match="not a directory"):
        EmbeddedBackend(blocker / "deeper" / "enhanced-locking.db")


def test_an_embedded_store_file_that_cannot_be_opened_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "enhanced-locking.db").mkdir()  # a good dir; the file itself cannot be opened
    with pytest.raises(BackendUnavailable, match="cannot open the embedded store"):
        EmbeddedBackend(tmp_path / "enhanced-locking.db")


async def test_a_file_that_is_not_a_database_is_refused(data_dir: Path) -> None:
    path = data_dir / "enhanced-locking.db"
    path.write_bytes(b"this is not an SQLite database, it only has its name" * 100)
    with pytest.raises(StoreRefused, match="not an SQLite database"):
        EmbeddedBackend(path)


async def test_an_empty_file_is_refused_unless_initialised(data_dir: Path) -> None:
    path = data_dir / "enhanced-locking.db"
    path.write_bytes(b"")
    with pytest.raises(StoreRefused, match="empty"):
        EmbeddedBackend(path)
    assert path.read_bytes() == b""
    backend = EmbeddedBackend(path, initialise=True)
    try:
        granted, lock = await backend.acquire(lock_for(request_for(pull=1)))
        assert granted and lock.fencing_token > 1  # from the clock: above any lost token
    finally:
        await backend.close()


# The layout of schema version 0, as files written before version 2 have it.
VERSION_0 = """
CREATE TABLE locks (
    ns TEXT NOT NULL, key TEXT NOT NULL, repo TEXT NOT NULL, pull INTEGER NOT NULL,
    data TEXT NOT NULL, PRIMARY KEY (ns, key)
);
CREATE INDEX locks_by_pull ON locks (ns, repo, pull);
CREATE TABLE shared_locks (
    ns TEXT NOT NULL, key TEXT NOT NULL, repo TEXT NOT NULL, pull INTEGER NOT NULL,
    data TEXT NOT NULL, token INTEGER NOT NULL, PRIMARY KEY (ns, key, repo, pull)
);
CREATE INDEX shared_by_pull ON shared_locks (ns, repo, pull);
CREATE TABLE fencing (
    ns TEXT NOT NULL, key TEXT NOT NULL, token INTEGER NOT NULL, PRIMARY KEY (ns, key)
);
CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TRIGGER fencing_floor_on_insert AFTER INSERT ON fencing BEGIN
    UPDATE meta SET value = NEW.token WHERE name = 'token_floor' AND value < NEW.token;
END;
CREATE TRIGGER fencing_floor_on_update AFTER UPDATE OF token ON fencing BEGIN
    UPDATE meta SET value = NEW.token WHERE name = 'token_floor' AND value < NEW.token;
END;
"""


def _write_version_0(path: Path, held: list[Lock], counters: dict[tuple[str, str], int],
                     floor: int) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(VERSION_0)
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute("INSERT INTO meta VALUES ('token_floor', ?)", (floor,))
        for (namespace, key), token in counters.items():
            db.execute("INSERT INTO fencing VALUES (?, ?, ?)", (namespace, key, token))
        for lock in held:
            db.execute("INSERT INTO locks VALUES (?, ?, ?, ?, ?)", (
                lock.backend, lock.key, lock.project.repo_full_name, lock.pull.num,
                codec.encode(lock)))
        db.commit()


async def test_a_version_0_store_is_migrated_in_place_keeping_locks_counters_and_floor(
    data_dir: Path,
) -> None:
    path = data_dir / "enhanced-locking.db"
    held = lock_for(request_for(path="a", pull=1)).model_copy(update={"fencing_token": 7})
    legacy = lock_for(request_for(path="a", pull=2), backend="legacy").model_copy(
        update={"fencing_token": 3})
    released_key = request_for(path="b").key
    # Key a: 7 handed out (held); key b: 12 handed out, released; the floor saw 20 once.
    _write_version_0(path, [held, legacy], {
        ("enhanced", held.key): 7, ("enhanced", released_key): 12, ("legacy", legacy.key): 3,
    }, floor=20)

    backend, other_side = EmbeddedBackend(path), EmbeddedBackend(path, "legacy")
    try:
        assert await backend.get(held.key) == held
        assert await backend.list() == [held]
        assert await other_side.list() == [legacy]
        assert (await backend.export())[1] == {held.key: 7, released_key: 12}
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            tables = {row[0] for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            assert "fencing" not in tables
        granted, again = await backend.acquire(lock_for(request_for(path="a", pull=5)))
        assert not granted and again == held, "the migrated lock is still held"
        await backend.release(held.key)
        _, after = await backend.acquire(lock_for(request_for(path="a", pull=5)))
        _, on_b = await backend.acquire(lock_for(request_for(path="b", pull=5)))
        _, new_key = await backend.acquire(lock_for(request_for(path="c", pull=5)))
        assert after.fencing_token == 8 and on_b.fencing_token == 13
        assert new_key.fencing_token > 20, "a new key starts above the floor"
    finally:
        await backend.close()
        await other_side.close()
    reopened = EmbeddedBackend(path)  # opened again: already the current version, nothing moves
    try:
        assert {lock.key: lock.fencing_token for lock in await reopened.list()} == {
            after.key: 8, on_b.key: 13, new_key.key: new_key.fencing_token}
    finally:
        await reopened.close()


# The layout of schema version 2, as files written before version 3 have it: the same tables,
# and a fencing floor that followed every token (a write of ``meta`` on every grant).
VERSION_2 = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE locks (
    ns TEXT NOT NULL, key TEXT NOT NULL, repo TEXT NOT NULL, pull INTEGER NOT NULL,
    data TEXT NOT NULL, counter INTEGER NOT NULL, held INTEGER NOT NULL,
    PRIMARY KEY (ns, key)
);
CREATE INDEX locks_by_pull ON locks (ns, repo, pull);
CREATE TABLE shared_locks (
    ns TEXT NOT NULL, key TEXT NOT NULL, repo TEXT NOT NULL, pull INTEGER NOT NULL,
    data TEXT NOT NULL, token INTEGER NOT NULL, PRIMARY KEY (ns, key, repo, pull)
);
CREATE INDEX shared_by_pull ON shared_locks (ns, repo, pull);
CREATE TRIGGER fencing_floor_on_insert AFTER INSERT ON locks BEGIN
    UPDATE meta SET value = NEW.counter WHERE name = 'token_floor' AND value < NEW.counter;
END;
CREATE TRIGGER fencing_floor_on_update AFTER UPDATE OF counter ON locks BEGIN
    UPDATE meta SET value = NEW.counter WHERE name = 'token_floor' AND value < NEW.counter;
END;
"""


def _floor(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("SELECT value FROM meta WHERE name = 'token_floor'").fetchone()[0])


async def test_a_version_2_store_is_migrated_in_place_and_its_floor_then_stays_ahead(
    data_dir: Path,
) -> None:
    path = data_dir / "enhanced-locking.db"
    held = lock_for(request_for(path="a", pull=1)).model_copy(update={"fencing_token": 7})
    released_key = request_for(path="b").key
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(VERSION_2)
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute("PRAGMA user_version = 2")
        db.execute("INSERT INTO meta VALUES ('token_floor', 20)")  # key c held 20 once: lost
        db.execute("INSERT INTO locks VALUES ('enhanced', ?, ?, ?, ?, 7, 1)", (
            held.key, held.project.repo_full_name, held.pull.num, codec.encode(held)))
        db.execute("INSERT INTO locks VALUES ('enhanced', ?, '', 0, '', 12, 0)", (released_key,))
        db.commit()

    backend = EmbeddedBackend(path)
    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
            triggers = dict(db.execute(
                "SELECT name, sql FROM sqlite_master WHERE name LIKE 'fencing_floor_on_%'"))
        assert set(triggers) == {"fencing_floor_on_insert", "fencing_floor_on_update"}
        assert all(f"NEW.counter + {FLOOR_AHEAD}" in sql for sql in triggers.values())
        assert _floor(path) == 20, "the floor is kept as it was"
        assert await backend.get(held.key) == held
        assert (await backend.export())[1] == {held.key: 7, released_key: 12}
        await backend.release(held.key)
        _, after = await backend.acquire(lock_for(request_for(path="a", pull=5)))
        _, on_b = await backend.acquire(lock_for(request_for(path="b", pull=5)))
        _, new_key = await backend.acquire(lock_for(request_for(path="c", pull=5)))
        assert after.fencing_token == 8 and on_b.fencing_token == 13
        assert new_key.fencing_token > 20, "a new key starts above the floor"
        assert _floor(path) >= new_key.fencing_token
    finally:
        await backend.close()


PREVIOUS_SCHEMA = tuple(statement for statement in embedded.SCHEMA if "told" not in statement)
"""The layout of version 3 as the release before the ``told`` table makes it (nor the triggers
that prune it)."""


class _PreviousRelease(EmbeddedBackend):
    """The embedded store of the release before ``told``: it counts the answers given with a
    hold in its own process, as every store did then."""

    _told_of = base.StoreBackend._told_of
    _keep_told = base.StoreBackend._keep_told
    _count_told = base.StoreBackend._count_told


def _previous_release(path: Path, monkeypatch: pytest.MonkeyPatch) -> EmbeddedBackend:
    with monkeypatch.context() as then:
        then.setattr(embedded, "SCHEMA", PREVIOUS_SCHEMA)
        then.setattr(embedded, "_PRUNE_TOLD", "SELECT 1")  # (no such step when it opens)
        return _PreviousRelease(path)


def _tables(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


async def test_a_file_is_shared_with_a_replica_of_the_previous_release_both_ways(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The count of answers given with a hold came into the file as a table of its own, the
    # layout version unchanged: a replica of the release before it opens the file this release
    # wrote (a rolling upgrade, a rollback) and each keeps working beside the other.
    path = data_dir / "enhanced-locking.db"
    previous = _previous_release(path, monkeypatch)
    held = lock_for(request_for(path="old", pull=1))
    assert (await previous.acquire(held))[0]
    assert "told" not in _tables(path)
    current = EmbeddedBackend(path)
    again: EmbeddedBackend | None = None
    try:
        assert "told" in _tables(path)
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        assert [lock.key for lock in await current.list()] == [held.key]
        # A give-back leaves the hold its pull was answered with, counted in the file by this
        # release and in its process by the previous one, on the same file.
        await _given_back_over_a_direct_answer(current, current)
        with contextlib.closing(sqlite3.connect(path)) as db:
            # (counted in the file while held; the row of the hold that ended goes at the next
            # answer counted on the file: test_the_answers_counted_with_a_hold_go_with_the_hold)
            assert db.execute("SELECT count(*) FROM told").fetchone()[0] == 1
        await _given_back_over_a_direct_answer(previous, previous)
        assert (await previous.acquire(lock_for(request_for(path="old", pull=2)))) == (
            False, await current.get(held.key))
        # The previous release opens the file again (a restart, a rollback): not refused.
        again = _previous_release(path, monkeypatch)
        assert [lock.key for lock in await again.list()] == [held.key]
        await again.release(held.key)
        assert await current.get(held.key) is None
    finally:
        for backend in (previous, current, again):
            if backend is not None:
                await backend.close()


def _told_rows(path: Path) -> list[tuple[str, int]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT key, token FROM told ORDER BY key").fetchall()


async def test_the_answers_counted_with_a_hold_go_with_the_hold(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Round after round a pull takes a key, a request of it that does not wait is answered
    # held already (counted: a row), and the hold ends, each way a hold can end: released by
    # its pull, force-unlocked, its lease run out, released by a process of the release before
    # the table on the same file (it does not know the table), a shared hold released. A row
    # outlives its hold only until the next answer counted on the file (the next round's), and
    # counts nothing meanwhile: the key taken again has a new token, and a give-back of that
    # grant frees it. Before, every row stayed, one per key ever answered so; one left of a
    # hold that ended is gone when the file is opened again.
    path = data_dir / "enhanced-locking.db"
    clock = FakeClock()
    backend = EmbeddedBackend(path, clock=clock)
    previous = _previous_release(path, monkeypatch)
    reopened: EmbeddedBackend | None = None
    try:
        for round_ in range(25):
            way = round_ % 5
            request = request_for(path=f"envs/{round_}", pull=1)
            if way == 4:
                request = request.model_copy(update={"mode": "shared"})
            candidate = candidate_for(request)
            ttl = timedelta(minutes=1) if way == 2 else None
            held = (await backend.acquire_or_enqueue(candidate, ttl=ttl, wait=None,
                                                     policy=FIFO)).locks[0]
            again = await backend.acquire_or_enqueue(candidate, ttl=ttl, wait=None, policy=FIFO)
            assert again.status is Status.GRANTED and not again.fresh, again
            # The answer counted this hold and took the rows of every hold that ended (the
            # last round's) out, in its transaction.
            assert _told_rows(path) == [(held.key, held.fencing_token)]
            if way in (0, 4):
                await backend.release_and_handoff(held.key, owner=("acme/infra", 1),
                                                  policy=FIFO)
            elif way == 1:
                await backend.release(held.key)
            elif way == 2:
                clock.advance(timedelta(minutes=2))
                await backend.expire(held.key, policy=FIFO)
            else:
                assert await previous.release(held.key) is not None
            assert await backend.get(held.key) is None, (way, await backend.get(held.key))
            # The row stays (the release did not pay for it) and counts nothing: the key's
            # next hold has another token, and the give-back of its grant frees it.
            assert _told_rows(path) == [(held.key, held.fencing_token)], way
            if way != 4:
                taken = await backend.acquire_or_enqueue(candidate, ttl=None, wait=None,
                                                         policy=FIFO)
                assert taken.fresh and taken.locks[0].fencing_token > held.fencing_token, taken
                await rig_for(backend).locker._give_back(
                    Notice(locks=taken.locks, fresh=taken.fresh, kept=frozenset()))
                assert await backend.get(held.key) is None, (
                    f"a row of a hold that ended counted for the key's next hold (way {way})")
        # The last round's row goes at the next answer counted.
        kept = (await backend.acquire_or_enqueue(want(1, path="envs/kept"), ttl=None,
                                                 wait=None, policy=FIFO)).locks[0]
        await backend.acquire_or_enqueue(want(1, path="envs/kept"), ttl=None, wait=None,
                                         policy=FIFO)
        assert _told_rows(path) == [(kept.key, kept.fencing_token)]
        # A row of a hold that ended, left when no answer is counted after it (written by
        # hand here), goes when the file is opened; the live hold's row stays.
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("INSERT INTO told VALUES ('enhanced', 'gone/key', 7, '[\"\"]', 0)")
            db.commit()
        reopened = EmbeddedBackend(path)
        assert _told_rows(path) == [(kept.key, kept.fencing_token)]
    finally:
        for opened in (backend, previous, reopened):
            if opened is not None:
                await opened.close()


async def test_a_count_of_answers_the_store_cannot_read_keeps_the_hold(data_dir: Path) -> None:
    # A ``told`` row this store did not write (its tellers not a JSON array: a hand edit) is
    # an answer of someone unknown: a later answer is still counted and given, and the
    # give-back of the grant leaves the hold, as Redis reads a count it cannot read.
    path = data_dir / "enhanced-locking.db"
    backend = EmbeddedBackend(path)
    try:
        held = (await backend.acquire_or_enqueue(want(1), ttl=None, wait=None,
                                                 policy=FIFO)).locks[0]
        waiter_id, future, _ = await queue_up(backend, want(2))
        await backend.release_and_handoff(held.key, owner=("acme/infra", 1), policy=FIFO)
        granted = (await future).locks[0]
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("INSERT INTO told VALUES ('enhanced', ?, ?, 'not a list', 0)",
                       (held.key, granted.fencing_token))
            db.commit()
        again = await backend.acquire_or_enqueue(want(2), ttl=None, wait=None, policy=FIFO)
        assert again.status is Status.GRANTED and not again.fresh, again
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("SELECT tellers FROM told").fetchall() == [('["?",""]',)]
            db.execute("UPDATE told SET tellers = '{}'")
            db.commit()
        cancelled = await backend.cancel(held.key, waiter_id, reason=Reason.CANCELLED)
        assert cancelled.kept == frozenset({held.key}) and not cancelled.fresh, cancelled
        lock = await backend.get(held.key)
        assert lock is not None and lock.fencing_token == granted.fencing_token, lock
    finally:
        await backend.close()


async def test_a_file_of_a_newer_layout_is_refused_and_left_as_it_was(data_dir: Path) -> None:
    # Written by a newer version of the service (a rollback): this version does not know that
    # layout, and stamping it with its own version would have the newer one skip its own
    # migration when it opens the file again.
    path = data_dir / "enhanced-locking.db"
    backend = EmbeddedBackend(path)
    assert (await backend.acquire(lock_for(request_for())))[0]
    await backend.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = path.read_bytes()
    for opening in (lambda: EmbeddedBackend(path), lambda: EmbeddedBackend(path, "legacy"),
                    lambda: open_database(path, initialise=True)):
        with pytest.raises(StoreRefused, match=(
                f"layout version {SCHEMA_VERSION + 1}, newer than the {SCHEMA_VERSION} of "
                "this version")):
            opening()
    assert path.read_bytes() == before
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1


async def test_the_fencing_floor_stays_ahead_of_every_token_and_is_written_once_per_stretch(
    data_dir: Path,
) -> None:
    path = data_dir / "enhanced-locking.db"
    backend = EmbeddedBackend(path)
    floors: set[int] = set()
    tokens: list[int] = []
    try:
        for pull in range(1, 2 * FLOOR_AHEAD + 500):
            granted, lock = await backend.acquire(lock_for(request_for(path="hot", pull=pull)))
            assert granted
            tokens.append(lock.fencing_token)
            floor = _floor(path)
            assert lock.fencing_token <= floor <= lock.fencing_token + FLOOR_AHEAD
            floors.add(floor)
            await backend.release(lock.key)
    finally:
        await backend.close()
    assert tokens == list(range(1, len(tokens) + 1)), "a key's own tokens rise by one"
    assert len(floors) == 3, "the floor moved once per FLOOR_AHEAD grants, not on each"

    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("DELETE FROM locks")  # every counter row lost
        db.commit()
    reopened = EmbeddedBackend(path)
    try:
        _, fresh = await reopened.acquire(lock_for(request_for(path="hot", pull=1)))
        assert fresh.fencing_token > max(tokens), "a lost row never hands a token out again"
    finally:
        await reopened.close()
