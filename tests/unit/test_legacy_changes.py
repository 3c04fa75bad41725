"""The legacy side's change counter: lookups answer what the file holds, whoever wrote it.

The embedded store counts every change of a legacy row in the file itself (triggers), and a
legacy backend answers a lookup from what it read last while that counter stands still. These
tests change the file from outside the backend between its calls — another process running the
store's code, and a plain SQLite writer that knows nothing of the counter — and check that
every answer is the file's, exactly as when every lookup read the rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import ServiceMaker
from tests.support.locks import lock_for, request_for
from tests.support.queues import waits_begun

from enhanced_locking.backends import EmbeddedBackend, codec
from enhanced_locking.backends.embedded import open_database
from enhanced_locking.factory import LockService
from enhanced_locking.types import (
    AcquireResult,
    BackendUnavailable,
    BatchItem,
    BatchLockRequest,
    BatchResult,
    Lock,
    LockNotOwned,
    LockRequest,
    LockUnreadable,
    Reason,
    utcnow,
)

OTHER_WRITER = """
import asyncio, sys
from pathlib import Path
from enhanced_locking.backends import EmbeddedBackend, codec
from enhanced_locking.backends.embedded import open_database

async def main(path, action, text):
    backend = EmbeddedBackend(Path(path), "legacy")
    try:
        lock = codec.decode(text)
        if action == "acquire":
            granted, held = await backend.acquire(lock)
            assert granted, held
        else:
            assert await backend.release(lock.key, owner=lock.owner) is not None
    finally:
        await backend.close()

asyncio.run(main(*sys.argv[1:]))
"""


def other_process(path: Path, action: str, lock: Lock) -> None:
    """``action`` (acquire or release) ``lock`` on the legacy side, from another process."""
    subprocess.run([sys.executable, "-c", OTHER_WRITER, str(path), action, codec.encode(lock)],
                   check=True, capture_output=True, timeout=60)


def plain_writer(path: Path, statement: str, *args: object) -> None:
    """A writer of the file that is none of ours (the ``sqlite3`` shell, say)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(statement, args)
        db.commit()


def planted_on_legacy(path: Path, lock: Lock) -> None:
    """``lock`` held on the legacy side, written by a plain writer (unless the key is held)."""
    plain_writer(path, "INSERT INTO locks (ns, key, repo, pull, data, counter, held) "
                 "VALUES ('legacy', ?, ?, ?, ?, 5, 1) ON CONFLICT DO NOTHING",
                 lock.key, *lock.owner, codec.encode(lock))


def legacy_lock(pull: int, *, path: str = "envs/prod") -> Lock:
    return lock_for(request_for(pull=pull, path=path), backend="legacy")


class Statements:
    """The statements a connection runs, as SQLite traces them."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.seen: list[str] = []
        db.set_trace_callback(self.seen.append)

    def reading_locks(self) -> list[str]:
        return [s for s in self.seen if "FROM locks" in s or "FROM shared_locks" in s]


@pytest.fixture
async def legacy(data_dir: Path) -> AsyncIterator[EmbeddedBackend]:
    backend = EmbeddedBackend(data_dir / "enhanced-locking.db", "legacy")
    yield backend
    await backend.close()


async def test_a_lookup_sees_what_another_process_wrote_since_the_last_one(
    legacy: EmbeddedBackend,
) -> None:
    lock = legacy_lock(7)
    assert await legacy.get(lock.key) is None
    assert await legacy.get(lock.key) is None  # answered from the counter
    other_process(legacy.path, "acquire", lock)
    held = await legacy.get(lock.key)
    assert held is not None and held.owner == lock.owner and held.fencing_token >= 1
    assert await legacy.get(lock.key) == held
    other_process(legacy.path, "release", lock)
    assert await legacy.get(lock.key) is None


async def test_a_release_frees_a_lock_another_process_took_after_the_key_was_seen_free(
    legacy: EmbeddedBackend,
) -> None:
    lock = legacy_lock(7)
    assert await legacy.release(lock.key, owner=lock.owner) is None  # seen free
    assert await legacy.release(lock.key, owner=lock.owner) is None  # still free
    other_process(legacy.path, "acquire", lock)
    with pytest.raises(LockNotOwned):
        await legacy.release(lock.key, owner=("acme/infra", 8))
    released = await legacy.release(lock.key, owner=lock.owner)
    assert released is not None and released.owner == lock.owner
    assert await legacy.get(lock.key) is None


async def test_a_plain_sqlite_writer_moves_the_counter_too(legacy: EmbeddedBackend) -> None:
    lock = legacy_lock(3).model_copy(update={"fencing_token": 5})
    assert await legacy.get(lock.key) is None
    plain_writer(legacy.path,
                 "INSERT INTO locks (ns, key, repo, pull, data, counter, held) "
                 "VALUES ('legacy', ?, ?, ?, ?, 5, 1)",
                 lock.key, *lock.owner, codec.encode(lock))
    assert await legacy.get(lock.key) == lock
    plain_writer(legacy.path, "UPDATE locks SET held = 0 WHERE ns = 'legacy' AND key = ?",
                 lock.key)
    assert await legacy.get(lock.key) is None
    plain_writer(legacy.path,
                 "INSERT INTO shared_locks (ns, key, repo, pull, data, token) "
                 "VALUES ('legacy', ?, ?, ?, ?, 6)",
                 lock.key, *lock.owner, codec.encode(lock.model_copy(update={
                     "mode": "shared", "fencing_token": 6})))
    shared = await legacy.get(lock.key)
    assert shared is not None and shared.mode == "shared"
    plain_writer(legacy.path, "DELETE FROM shared_locks WHERE ns = 'legacy'")
    assert await legacy.get(lock.key) is None
    plain_writer(legacy.path, "UPDATE locks SET held = 1, data = 'not a lock' "
                 "WHERE ns = 'legacy' AND key = ?", lock.key)
    with pytest.raises(LockUnreadable):
        await legacy.get(lock.key)


async def test_a_counter_deleted_and_made_again_by_the_next_opening_is_never_taken_as_unmoved(
    legacy: EmbeddedBackend,
) -> None:
    lock = legacy_lock(3).model_copy(update={"fencing_token": 5})
    assert await legacy.get(lock.key) is None
    plain_writer(legacy.path, "DELETE FROM meta WHERE name = 'changes:legacy'")
    plain_writer(legacy.path,
                 "INSERT INTO locks (ns, key, repo, pull, data, counter, held) "
                 "VALUES ('legacy', ?, ?, ?, ?, 5, 1)",
                 lock.key, *lock.owner, codec.encode(lock))
    open_database(legacy.path).close()  # another process opens the file: the row is back
    assert await legacy.get(lock.key) == lock


async def test_an_unchanged_store_is_asked_for_its_counter_only(
    legacy: EmbeddedBackend, data_dir: Path,
) -> None:
    enhanced = EmbeddedBackend(data_dir / "enhanced-locking.db", "enhanced")
    try:
        lock = legacy_lock(1)
        assert await legacy.get(lock.key) is None
        statements = Statements(legacy._db)
        # The other namespace changing does not move the legacy counter.
        granted, _ = await enhanced.acquire(lock_for(request_for(pull=1)))
        assert granted
        assert await legacy.get(lock.key) is None
        assert await legacy.release(lock.key, owner=lock.owner) is None
        assert statements.reading_locks() == []
        assert len(statements.seen) == 2, statements.seen
        granted, _ = await legacy.acquire(legacy_lock(2, path="envs/dev"))
        assert granted
        statements.seen.clear()
        assert await legacy.get(lock.key) is None  # another legacy key changed: read again
        assert statements.reading_locks() != []
    finally:
        await enhanced.close()


async def test_a_lease_that_lapses_between_lookups_reads_as_free_and_is_expired_on_release(
    data_dir: Path,
) -> None:
    now = utcnow()
    clock: list[datetime] = [now]
    legacy = EmbeddedBackend(data_dir / "enhanced-locking.db", "legacy", clock=lambda: clock[0])
    try:
        lock = legacy_lock(4).model_copy(update={
            "acquired_at": now, "expires_at": now + timedelta(seconds=30)})
        granted, held = await legacy.acquire(lock)
        assert granted
        assert await legacy.get(lock.key) == held
        clock[0] = now + timedelta(seconds=31)
        assert await legacy.get(lock.key) is None
        handoff = await legacy.release_and_handoff(lock.key)
        assert handoff.released is None
        statements = Statements(legacy._db)
        assert await legacy.get(lock.key) is None
        assert statements.reading_locks() != [], "the release changed the file: read again"
        assert await legacy.acquire(legacy_lock(5)) == (True, await legacy.get(lock.key))
    finally:
        await legacy.close()


async def test_a_closed_store_answers_unavailable_not_the_last_answer(
    legacy: EmbeddedBackend,
) -> None:
    lock = legacy_lock(1)
    assert await legacy.get(lock.key) is None
    await legacy.close()
    with pytest.raises(BackendUnavailable):
        await legacy.get(lock.key)
    with pytest.raises(BackendUnavailable):
        await legacy.release(lock.key, owner=lock.owner)


Writer = Callable[[Path, str, Lock], None]


async def test_the_router_never_grants_a_key_another_process_took_on_legacy_meanwhile(
    make_service: ServiceMaker,
) -> None:
    service = await make_service(enabled=True, migration_weight=100)
    path = service.provider.current.config.data_path
    request = request_for(pull=1)
    for _ in range(2):  # the legacy side is seen free twice: its answer is remembered
        result = await service.router.acquire(request)
        assert result.acquired and result.lock is not None
        assert result.lock.backend == "enhanced"
        assert await service.router.release(request.key, owner=(request.project.repo_full_name,
                                                                   1)) is not None
    taken = legacy_lock(2)
    await asyncio.to_thread(other_process, path, "acquire", taken)
    refused = await service.router.acquire(request_for(pull=3))
    assert not refused.acquired and refused.reason is Reason.HELD
    assert refused.holder is not None and refused.holder.owner == taken.owner
    assert refused.holder.backend == "legacy"
    found = await service.router.get(request.key)
    assert found is not None and found.owner == taken.owner
    released = await service.router.release(request.key, owner=taken.owner)
    assert released is not None and released.owner == taken.owner
    again = await service.router.acquire(request_for(pull=3))
    assert again.acquired and again.lock is not None and again.lock.backend == "enhanced"


# --- the legacy side checked inside the enhanced side's own writes --------------------------
async def test_a_router_pair_on_one_file_checks_legacy_inside_its_own_two_writes(
    make_service: ServiceMaker,
) -> None:
    """Both sides in one file: the grant and the release each check, in their own statement,
    that legacy holds nothing for the key; the legacy side's connection runs nothing."""
    service = await make_service(enabled=True, migration_weight=100)
    assert isinstance(service.legacy_backend, EmbeddedBackend)
    assert service.enhanced is not None
    enhanced = service.enhanced.backend
    assert isinstance(enhanced, EmbeddedBackend)
    request = request_for(pull=1)
    owner = (request.project.repo_full_name, 1)
    first = await service.router.acquire(request)  # the key's row is made and seen
    assert first.acquired
    assert await service.router.release(request.key, owner=owner) is not None
    on_legacy = Statements(service.legacy_backend._db)
    on_enhanced = Statements(enhanced._db)
    result = await service.router.acquire(request)
    assert result.acquired and result.fresh and result.lock is not None
    assert result.lock.backend == "enhanced"
    released = await service.router.release(request.key, owner=owner)
    assert released == result.lock
    assert on_legacy.seen == []
    # SQLite traces a statement again as each of its triggers' programs starts: two statements
    granted_by, released_by = dict.fromkeys(on_enhanced.seen)
    assert granted_by.lstrip().startswith("UPDATE locks SET held = 1")
    assert released_by.startswith("UPDATE locks SET held = 0")
    for statement in (granted_by, released_by):
        assert f"WHERE ns = 'legacy' AND key = '{request.key}' AND held = 1" in statement


async def test_a_grant_refused_for_a_legacy_hold_changes_nothing_on_the_enhanced_side(
    make_service: ServiceMaker,
) -> None:
    """Legacy holds the key, written by a plain SQLite writer after the router last saw it
    free (the legacy connection's last answer is stale): the enhanced grant checks the row
    itself and changes nothing (no token used up), the router refuses as before; the pull
    that holds it on legacy gets its legacy lock back."""
    service = await make_service(enabled=True, migration_weight=100)
    path = service.provider.current.config.data_path
    request = request_for(pull=1)
    owner = (request.project.repo_full_name, 1)
    granted = await service.router.acquire(request)
    assert granted.acquired and granted.lock is not None
    token = granted.lock.fencing_token
    assert await service.router.release(request.key, owner=owner) is not None
    taken = legacy_lock(2)
    plain_writer(path, "INSERT INTO locks (ns, key, repo, pull, data, counter, held) "
                 "VALUES ('legacy', ?, ?, ?, ?, 5, 1)",
                 taken.key, *taken.owner, codec.encode(taken))
    refused = await service.router.acquire(request_for(pull=3))
    assert not refused.acquired and refused.reason is Reason.HELD
    assert refused.holder is not None and refused.holder.owner == taken.owner
    assert refused.holder.backend == "legacy"
    own = await service.router.acquire(request_for(pull=2))
    assert own.acquired and not own.fresh and own.lock is not None
    assert own.lock.backend == "legacy"
    assert service.enhanced is not None
    assert await service.enhanced.backend.get(request.key) is None
    # Pull 1 holds nothing (the key is held on legacy by pull 2): its release is refused.
    with pytest.raises(LockNotOwned):
        await service.router.release(request.key, owner=owner)
    released = await service.router.release(request.key, owner=taken.owner)
    assert released is not None and released.backend == "legacy"
    again = await service.router.acquire(request)
    assert again.acquired and again.lock is not None
    assert again.lock.fencing_token == token + 1  # the refused grants used no token


async def test_a_grant_on_the_general_path_checks_legacy_too(
    make_service: ServiceMaker,
) -> None:
    """The pull already holds the key on the enhanced side (its grant is the general path's,
    not the one statement's) and another pull's lock appears on legacy: refused, as the look
    before the grant refused it."""
    service = await make_service(enabled=True, migration_weight=100)
    path = service.provider.current.config.data_path
    request = request_for(pull=1)
    first = await service.router.acquire(request)
    assert first.acquired
    taken = legacy_lock(2)
    plain_writer(path, "INSERT INTO locks (ns, key, repo, pull, data, counter, held) "
                 "VALUES ('legacy', ?, ?, ?, ?, 5, 1)",
                 taken.key, *taken.owner, codec.encode(taken))
    again = await service.router.acquire(request)
    assert not again.acquired and again.reason is Reason.HELD
    assert again.holder is not None and again.holder.backend == "legacy"


async def test_a_pull_asking_again_keeps_its_hold_when_legacy_is_taken_between_the_looks(
    make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pull holds the key on the enhanced side and asks again (a request that waits: the
    looks' path); another writer takes the key on legacy after the look before the grant and
    before the look after it. The router refuses, naming legacy's holder, as it would have
    refused a fresh grant; the hold the pull had before this request stays (the request did
    not make it, so backing off does not undo it) and the double hold is reported."""
    service = await make_service(enabled=True, migration_weight=100)
    path = service.provider.current.config.data_path
    request = request_for(pull=1)
    held = await service.router.acquire(request)
    assert held.acquired and held.lock is not None and held.lock.backend == "enhanced"
    enhanced = service.enhanced
    assert enhanced is not None
    taken = legacy_lock(2)
    grant = enhanced.acquire

    async def granted_then_taken_on_legacy(asked: LockRequest) -> AcquireResult:
        result = await grant(asked)
        planted_on_legacy(path, taken)
        return result

    monkeypatch.setattr(enhanced, "acquire", granted_then_taken_on_legacy)
    again = await service.router.acquire(request_for(pull=1, wait=timedelta(seconds=0.3)))
    assert not again.acquired
    assert again.holder is not None and again.holder.owner == taken.owner
    assert await enhanced.backend.get(request.key) == held.lock, "the pull's hold was lost"
    assert [(c.key, c.source) for c in service.migration.conflicts.items()] == [
        (request.key, "acquire")]
    # Once one of the two lets go, reconciliation forgets the report.
    monkeypatch.undo()
    assert await service.router.release(request.key, owner=taken.owner) is not None
    await service.migration.fallback.reconcile()
    assert service.migration.conflicts.items() == []
    mine = await service.router.acquire(request)
    assert mine.acquired and not mine.fresh and mine.lock == held.lock


@pytest.mark.parametrize("when", ["before-the-grant", "while-it-waits", "after-the-grant"])
async def test_a_batch_backing_off_keeps_a_hold_its_pull_took_after_the_look(
    make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch, when: str,
) -> None:
    """Pull 1 asks for keys ``a`` and ``b`` in a batch. After the router's look at who holds
    them (``a``: nobody), the pull's other request takes ``a`` before the batch's grant (or
    while the batch waits for pull 2 to let ``b`` go), so the grant answers ``a`` with that
    hold, unchanged; or it asks for ``a`` after the grant and is answered with the batch's
    hold. Then another writer takes ``b`` on legacy, and the batch backs off. It gives back
    only what it granted and nobody else was told they hold: ``b``, never ``a``."""
    service = await make_service(enabled=True, migration_weight=100)
    await _backing_off(service, monkeypatch, when)


async def _backing_off(service: LockService, monkeypatch: pytest.MonkeyPatch,
                       when: str) -> None:
    """The body of the test above, over ``service``'s enhanced store."""
    waits = when == "while-it-waits"
    path = service.provider.current.config.data_path
    enhanced = service.enhanced
    assert enhanced is not None
    pull = request_for(pull=1).pull
    batch = BatchLockRequest(locks=[BatchItem(project=request_for(path=p).project)
                                    for p in ("envs/a", "envs/b")], pull=pull,
                             wait=timedelta(seconds=30) if waits else None)
    a, b = batch.keys
    if waits:
        assert (await enhanced.acquire(request_for(pull=2, path="envs/b"))).acquired
    [begun] = waits_begun(monkeypatch, 1)
    taken = legacy_lock(3, path="envs/b")
    grant = enhanced.acquire_batch
    other: list[AcquireResult] = []

    async def taken_by_the_pull_then_on_legacy(asked: BatchLockRequest) -> BatchResult:
        if when == "before-the-grant":
            other.append(await enhanced.acquire(request_for(pull=1, path="envs/a")))
        granting = asyncio.ensure_future(grant(asked))
        if waits:
            async with asyncio.timeout(30):
                await begun.wait()
            assert [w.owner for w in await enhanced.queue(a)] == [("acme/infra", 1)]
            other.append(await enhanced.acquire(request_for(pull=1, path="envs/a")))
            assert await enhanced.release(b, owner=("acme/infra", 2)) is not None
        result = await granting
        if when == "after-the-grant":
            other.append(await service.router.acquire(request_for(pull=1, path="envs/a")))
        planted_on_legacy(path, taken)
        return result

    monkeypatch.setattr(enhanced, "acquire_batch", taken_by_the_pull_then_on_legacy)
    refused = await service.router.acquire_batch(batch)
    assert not refused.acquired and refused.lock_key == b
    assert refused.holder is not None and refused.holder.owner == taken.owner
    [own] = other
    assert own.acquired and own.lock is not None
    assert own.fresh == (when != "after-the-grant")
    assert await enhanced.backend.get(a) == own.lock, "the pull's hold of a was dropped"
    assert await enhanced.backend.get(b) is None, "the batch's grant of b was left behind"


@pytest.mark.parametrize("store", [pytest.param("redis", marks=pytest.mark.redis),
                                   pytest.param("etcd", marks=pytest.mark.etcd)])
async def test_a_batch_that_waited_on_redis_or_etcd_backing_off_keeps_its_pulls_later_hold(
    make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
    store: str,
) -> None:
    """The test above, the batch granted from the queue, over Redis and etcd: the store's
    grant of a batch that waited names the keys its pull held already, as the embedded
    store's does. Before, Redis's confirmation of the grant (and etcd's notice) did not, the
    router's look before the grant (``a`` free) stood in, and backing off released the
    pull's hold of ``a``."""
    if store == "redis":
        server = request.getfixturevalue("redis_server")
        settings: dict[str, Any] = {"backend": "redis", "redis_addr": server.addr}
        if server.password is not None:
            settings["redis_password"] = server.password
    else:
        cluster = request.getfixturevalue("etcd_cluster")
        settings = {"backend": "etcd", "etcd_endpoints": cluster.endpoints,
                    "etcd_key_prefix": request.getfixturevalue("etcd_prefix")}
    service = await make_service(enabled=True, migration_weight=100, **settings)
    await _backing_off(service, monkeypatch, "while-it-waits")


async def test_a_batch_backing_off_leaves_the_hold_its_pull_took_anew_after_the_grant(
    make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pull 1's batch of ``a`` and ``b`` is granted on enhanced; then the pull's other request
    lets ``a`` go and takes it again (a new token), and another writer takes ``b`` on legacy.
    The batch backs off and gives back its grants by their tokens, as the enhanced locker
    does: its grant of ``a`` is gone already, and the pull's new hold of ``a`` stays. Before,
    the give-back was by owner and freed that hold under its request."""
    service = await make_service(enabled=True, migration_weight=100)
    path = service.provider.current.config.data_path
    enhanced = service.enhanced
    assert enhanced is not None
    batch = BatchLockRequest(locks=[BatchItem(project=request_for(path=p).project)
                                    for p in ("envs/a", "envs/b")], pull=request_for(pull=1).pull)
    a, b = batch.keys
    grant = enhanced.acquire_batch
    other: list[AcquireResult] = []

    async def granted_then_taken_anew(asked: BatchLockRequest) -> BatchResult:
        result = await grant(asked)
        assert await service.router.release(a, owner=("acme/infra", 1)) is not None
        other.append(await service.router.acquire(request_for(pull=1, path="envs/a")))
        planted_on_legacy(path, legacy_lock(3, path="envs/b"))
        return result

    monkeypatch.setattr(enhanced, "acquire_batch", granted_then_taken_anew)
    refused = await service.router.acquire_batch(batch)
    monkeypatch.undo()
    assert not refused.acquired and refused.lock_key == b
    [own] = other
    assert own.acquired and own.fresh and own.lock is not None
    assert await enhanced.backend.get(a) == own.lock, "the pull's new hold of a was given back"
    assert await enhanced.backend.get(b) is None, "the batch's grant of b was left behind"


async def test_a_legacy_batch_refused_keeps_a_hold_its_pull_took_after_the_look(
    make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every key on legacy: the batch takes its keys one by one, fail fast. Between its look
    at ``a`` and its grant of it, the pull's other request takes ``a``; ``b`` is another
    pull's, so the batch is refused and gives back what it took: never the pull's hold of
    ``a``, which this batch did not take."""
    service = await make_service(enabled=True, migration_weight=0)
    path = service.provider.current.config.data_path
    router = service.router
    pull = request_for(pull=1).pull
    batch = BatchLockRequest(locks=[BatchItem(project=request_for(path=p).project)
                                    for p in ("envs/a", "envs/b")], pull=pull)
    a, b = batch.keys
    taken = legacy_lock(2, path="envs/b")
    planted_on_legacy(path, taken)
    acquire = router.acquire
    other: list[AcquireResult] = []

    async def taken_by_the_pull_first(asked: LockRequest) -> AcquireResult:
        if asked.key == a:
            other.append(await acquire(request_for(pull=1, path="envs/a")))
        return await acquire(asked)

    monkeypatch.setattr(router, "acquire", taken_by_the_pull_first)
    refused = await router.acquire_batch(batch)
    monkeypatch.undo()
    assert not refused.acquired and refused.lock_key == b
    assert refused.holder is not None and refused.holder.owner == taken.owner
    [own] = other
    assert own.acquired and own.fresh and own.lock is not None
    held = await router.get(a)
    assert held is not None and held.owner == own.lock.owner, "the pull's hold of a was dropped"


async def test_a_request_backing_off_leaves_a_hold_its_pull_was_answered_with_since(
    make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pull 1's request (one that waits: the looks' path) is granted the key on enhanced; the
    pull's other request asks for it then and is answered with that hold; another writer takes
    the key on legacy, and the first request backs off. The hold stays: the other request was
    told it holds it (as after a caller gone, :meth:`Router.give_back_answer`)."""
    service = await make_service(enabled=True, migration_weight=100)
    path = service.provider.current.config.data_path
    enhanced = service.enhanced
    assert enhanced is not None
    grant = enhanced.acquire
    other: list[AcquireResult] = []

    async def answered_again_then_taken_on_legacy(asked: LockRequest) -> AcquireResult:
        result = await grant(asked)
        monkeypatch.setattr(enhanced, "acquire", grant)
        other.append(await service.router.acquire(request_for(pull=1)))
        planted_on_legacy(path, legacy_lock(2))
        return result

    monkeypatch.setattr(enhanced, "acquire", answered_again_then_taken_on_legacy)
    refused = await service.router.acquire(request_for(pull=1, wait=timedelta(seconds=0.3)))
    assert not refused.acquired
    [own] = other
    assert own.acquired and not own.fresh and own.lock is not None
    assert await enhanced.backend.get(own.lock.key) == own.lock, "the answered hold was lost"
    assert [(c.key, c.source) for c in service.migration.conflicts.items()] == [
        (own.lock.key, "acquire")]


async def test_a_release_not_owned_is_refused_and_a_foreign_pull_releases_nothing(
    make_service: ServiceMaker,
) -> None:
    service = await make_service(enabled=True, migration_weight=100)
    request = request_for(pull=1)
    held = await service.router.acquire(request)
    assert held.acquired and held.lock is not None
    with pytest.raises(LockNotOwned) as refused:
        await service.router.release(request.key, owner=(request.project.repo_full_name, 9))
    assert refused.value.holder == held.lock
    assert await service.router.get(request.key) == held.lock
    assert await service.router.release(request.key) == held.lock  # by anyone (release-any)
    assert await service.router.release(request.key) is None


async def test_an_enhanced_outage_on_release_still_releases_what_legacy_holds(
    make_service: ServiceMaker,
) -> None:
    """The enhanced store fails the release that was to check legacy: legacy is asked itself
    and releases its lock; the outage is the answer's error only when legacy released
    nothing (as when legacy was asked first)."""
    service = await make_service(enabled=True, migration_weight=100)
    path = service.provider.current.config.data_path
    taken = legacy_lock(2)
    plain_writer(path, "INSERT INTO locks (ns, key, repo, pull, data, counter, held) "
                 "VALUES ('legacy', ?, ?, ?, ?, 5, 1)",
                 taken.key, *taken.owner, codec.encode(taken))
    assert service.enhanced is not None
    enhanced = service.enhanced.backend
    assert isinstance(enhanced, EmbeddedBackend)
    enhanced._db.close()
    released = await service.router.release(taken.key, owner=taken.owner)
    assert released is not None and released.owner == taken.owner
    with pytest.raises(BackendUnavailable):
        await service.router.release(taken.key, owner=taken.owner)


async def test_stores_of_other_files_or_kinds_do_not_check_each_other(data_dir: Path) -> None:
    one = EmbeddedBackend(data_dir / "one.db", "enhanced")
    same = EmbeddedBackend(data_dir / "one.db", "legacy")
    other = EmbeddedBackend(data_dir / "two.db", "legacy")
    try:
        assert one.checks_other_side(same) == "legacy"
        assert one.checks_other_side(other) is None
        assert one.checks_other_side(one) is None
        assert one.checks_other_side(object()) is None
    finally:
        for backend in (one, same, other):
            await backend.close()
