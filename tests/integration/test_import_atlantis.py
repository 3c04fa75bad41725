"""Importing Atlantis's locks: from a BoltDB file written by the real bbolt library with
Atlantis's own structs, and from a real Redis filled the way Atlantis fills it.

The command is run as a real process (``python -m enhanced_locking.cli``), so exit codes,
stdout and stderr are what a user sees.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

_REPO_ROOT = Path(__file__).resolve().parents[2]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from tests.support.bbolt_writer import (  # noqa: E402
    BoltWriter,
    atlantis_lock,
    lock_key,
)
from tests.support.redis_cluster import RedisClusterNodes  # noqa: E402
from tests.support.redis_server import RedisServer, RedisServerError  # noqa: E402
from tests.support.service import scrubbed_env  # noqa: E402
from tests.support.unreadable import SECRET, spoil  # noqa: E402

from enhanced_locking.backends import Backend, EmbeddedBackend, MemoryBackend  # noqa: E402
from enhanced_locking.migration import importers  # noqa: E402
from enhanced_locking.types import Lock, Project, Pull, User  # noqa: E402

TOKEN = "ghp_s3cr3tT0ken"
PLUS_TWO = timezone(timedelta(hours=2))


def _atlantis_locks() -> list[dict[str, Any]]:
    """What a busy Atlantis holds: many repos and pulls, and the awkward cases."""
    locks = [
        atlantis_lock(repo=f"acme/repo-{i % 7}", pull=100 + i % 23, path=f"stacks/s{i:03d}",
                      workspace=("default", "prod")[i % 2],
                      project_name=f"p{i}" if i % 3 else "",
                      time=datetime(2024, 5, 1, 9, 0, tzinfo=UTC) + timedelta(minutes=i))
        for i in range(250)
    ]
    locks.append(atlantis_lock(  # Atlantis's clone URL and a pull URL carrying credentials
        repo="acme/secret", pull=7, path=".",
        clone_url=f"https://atlantis-bot:{TOKEN}@github.com/acme/secret.git",
        pull_url=f"https://atlantis-bot:{TOKEN}@github.com/acme/secret/pull/7",
        teams=["platform", "sre"],
    ))
    locks.append(atlantis_lock(  # Atlantis writes local time with nanoseconds
        repo="acme/zone", pull=8, path="envs/eu", time="2024-05-01T10:00:00.123456789+02:00",
    ))
    return locks


def _bolt_key(lock: dict[str, Any], *, old_format: bool) -> str:
    if old_format:  # Atlantis before project names were part of the key
        project = lock["Project"]
        return f"{project['RepoFullName']}/{project['Path']}/{lock['Workspace']}"
    return lock_key(lock)


def write_atlantis_db(writer: BoltWriter, path: Path,
                      locks: list[dict[str, Any]]) -> dict[str, Any]:
    """Atlantis's layout: runLocks, pulls and globalLocks, written over a few commits."""
    puts = [{"op": "putLock", "bucket": ["runLocks"], "key": _bolt_key(lock, old_format=i % 5 == 0),
             "lock": lock} for i, lock in enumerate(locks)]
    pulls = [{"op": "putPull", "bucket": ["pulls"], "key": f"github.com::acme/repo-{n}::{n}",
              "pull": {"Projects": [{"Workspace": "default", "RepoRelDir": ".",
                                     "ProjectName": "", "Status": 1}],
                       "Pull": {"Num": n, "BaseRepo": {"FullName": f"acme/repo-{n}"}}}}
             for n in range(20)]
    return writer.write(path, [
        [{"op": "createBucket", "bucket": [name]} for name in ("runLocks", "pulls",
                                                               "globalLocks")],
        puts[: len(puts) // 2],
        pulls,
        puts[len(puts) // 2:],
    ])


@pytest.fixture
def atlantis_db(bolt_writer: BoltWriter, tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    path = tmp_path / "atlantis" / "atlantis.db"
    path.parent.mkdir()
    locks = _atlantis_locks()
    write_atlantis_db(bolt_writer, path, locks)
    return path, locks


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "enhanced_locking.cli", "migrate", "import", *args],
        capture_output=True, text=True, env=scrubbed_env(env), timeout=120, check=False,
    )


def _report(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.stdout, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _time(text: str) -> datetime:
    """A Go time, cut to the microseconds Python keeps."""
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00")))


async def _stored(data_dir: Path) -> dict[str, Lock]:
    backend = EmbeddedBackend(data_dir / "enhanced-locking.db")
    try:
        return {lock.key: lock for lock in await backend.list()}
    finally:
        await backend.close()


def _pull_lock(key: str, repo: str, pull: int) -> Lock:
    """An enhanced-side lock on ``key`` (its key parts need not match: only the key counts)."""
    return Lock(key=key, project=Project(repo_full_name=repo, path="."), workspace="default",
                pull=Pull(num=pull), user=User(username="bob"),
                acquired_at=datetime.now(UTC), backend="enhanced")


# --- the BoltDB file -------------------------------------------------------------------------


async def test_every_atlantis_lock_is_imported_into_the_memory_backend(
    atlantis_db: tuple[Path, list[dict[str, Any]]],
) -> None:
    path, locks = atlantis_db
    source, records = importers.read_boltdb(path)
    assert len(records) == len(locks)
    backend = MemoryBackend()
    report = await importers.import_locks(records, backend, source=source)
    assert report.summary == {"read": len(locks), "imported": len(locks), "skipped": 0,
                              "conflicts": 0, "invalid": 0}
    held = {lock.key: lock for lock in await backend.list()}
    assert set(held) == {lock_key(lock) for lock in locks}  # the current key format, always
    for original in locks:
        lock = held[lock_key(original)]
        assert lock.backend == "enhanced"
        assert lock.fencing_token == backend.token_floor + 1  # issued by the target backend
        assert lock.pull.num == original["Pull"]["Num"]
        assert lock.user.username == original["User"]["Username"]
        assert lock.acquired_at == _time(original["Time"])  # Atlantis's time, kept
    zoned = held["acme/zone/envs/eu/default/"]
    assert zoned.acquired_at == datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=PLUS_TWO)
    secret = held["acme/secret/./default/"]
    assert secret.user.teams == ["platform", "sre"]
    assert TOKEN not in secret.model_dump_json()
    assert secret.pull.url == "https://github.com/acme/secret/pull/7"


async def test_a_key_whose_stored_lock_cannot_be_read_is_a_conflict_and_the_rest_imported(
    tmp_path: Path,
) -> None:
    """The target holds a value under a key that is not a lock it can read: that lock is not
    imported (nothing is granted over it) and is reported; the import goes on with the rest."""
    bad, good = (atlantis_lock(repo="acme/infra", pull=4, path=path) for path in ("bad", "good"))
    backend = EmbeddedBackend(tmp_path / "enhanced-locking.db")
    try:
        key = lock_key(bad)
        assert (await backend.acquire(_pull_lock(key, "acme/infra", 4)))[0]
        await spoil(backend, key, f"token={SECRET}, not a lock")
        records = [importers.SourceRecord(lock_key(lock), json.dumps(lock).encode())
                   for lock in (bad, good)]
        report = await importers.import_locks(records, backend, source="test")
        held = await backend.list()
    finally:
        await backend.close()
    assert [(row.key, row.outcome) for row in report.rows] == [
        (key, importers.Outcome.CONFLICT), (lock_key(good), importers.Outcome.IMPORTED)]
    assert report.rows[0].detail == ("the target's stored lock of this key cannot be read (set "
                                     "aside until a force-unlock clears it)")
    assert not report.clean and SECRET not in report.table()
    assert [lock.key for lock in held] == [lock_key(good)]


def test_the_command_imports_into_the_embedded_backend_and_a_second_run_changes_nothing(
    atlantis_db: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    path, locks = atlantis_db
    data_dir = tmp_path / "data"
    first = run_cli("--from-boltdb", str(path), "--data-dir", str(data_dir), "--output", "json")
    assert first.returncode == 0, first.stderr
    report = _report(first)
    assert report["dryRun"] is False and report["target"] == "boltdb"
    assert report["summary"]["imported"] == len(locks)
    assert {row["outcome"] for row in report["locks"]} == {"imported"}
    assert f"importing: {len(locks)}/{len(locks)}" in first.stderr  # plain progress, no TTY

    stored = asyncio.run(_stored(data_dir))
    assert len(stored) == len(locks)
    tokens = {key: lock.fencing_token for key, lock in stored.items()}
    assert set(tokens.values()) == {1}
    raw = (data_dir / "enhanced-locking.db").read_bytes()
    wal = data_dir / "enhanced-locking.db-wal"
    raw += wal.read_bytes() if wal.exists() else b""
    assert TOKEN.encode() not in raw and b"atlantis-bot" not in raw  # never imported

    second = run_cli("--from-boltdb", str(path), "--data-dir", str(data_dir), "--output", "json")
    assert second.returncode == 0, second.stderr
    again = _report(second)
    assert again["summary"] == {"read": len(locks), "imported": 0, "skipped": len(locks),
                                "conflicts": 0, "invalid": 0}
    after = asyncio.run(_stored(data_dir))
    assert {key: lock.fencing_token for key, lock in after.items()} == tokens
    assert after == stored


def test_dry_run_reports_what_would_happen_and_writes_nothing(
    atlantis_db: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    path, locks = atlantis_db
    data_dir = tmp_path / "data"
    result = run_cli("--from-boltdb", str(path), "--data-dir", str(data_dir), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "dry run: nothing was written" in result.stdout
    assert f"would import {len(locks)}, skipped 0, conflicts 0, invalid 0" in result.stdout
    assert asyncio.run(_stored(data_dir)) == {}


def test_a_key_held_by_another_pull_is_reported_as_a_conflict_and_exits_1(
    atlantis_db: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    path, locks = atlantis_db
    data_dir = tmp_path / "data"
    taken = lock_key(locks[3])
    same = lock_key(locks[4])

    async def plant() -> None:
        backend = EmbeddedBackend(data_dir / "enhanced-locking.db")
        try:
            assert (await backend.acquire(_pull_lock(taken, "acme/other", 999)))[0]
            mine = locks[4]
            assert (await backend.acquire(_pull_lock(same, mine["Project"]["RepoFullName"],
                                                     mine["Pull"]["Num"])))[0]
        finally:
            await backend.close()

    asyncio.run(plant())
    for dry in ((), ("--dry-run",)):
        result = run_cli("--from-boltdb", str(path), "--data-dir", str(data_dir), "--output",
                         "json", *dry)
        assert result.returncode == 1, result.stderr
        rows = {row["key"]: row for row in _report(result)["locks"]}
        assert rows[taken]["outcome"] == "conflict"
        assert rows[taken]["holder"] == {"repo": "acme/other", "pull": 999}
        assert rows[same]["outcome"] == "skipped"
        assert _report(result)["summary"]["conflicts"] == 1
    stored = asyncio.run(_stored(data_dir))
    assert stored[taken].pull.num == 999  # the holder keeps its lock
    assert len(stored) == len(locks)

    table = run_cli("--from-boltdb", str(path), "--data-dir", str(data_dir))
    assert table.returncode == 1
    line = next(line for line in table.stdout.splitlines() if line.startswith(taken + " "))
    assert "conflict" in line and "held by acme/other #999" in line


def test_an_unreadable_record_is_reported_invalid_and_the_rest_imported(
    bolt_writer: BoltWriter, tmp_path: Path
) -> None:
    path = tmp_path / "atlantis.db"
    good = atlantis_lock(repo="acme/ok", pull=1)
    bolt_writer.write(path, [[
        {"op": "putLock", "bucket": ["runLocks"], "key": lock_key(good), "lock": good},
        {"op": "put", "bucket": ["runLocks"], "key": "acme/bad/./default", "value": "{not json"},
        {"op": "put", "bucket": ["runLocks"], "key": "acme/empty/./default",
         "value": json.dumps({"Project": {"RepoFullName": ""}, "Pull": {"Num": 2}})},
    ]])
    result = run_cli("--from-boltdb", str(path), "--data-dir", str(tmp_path / "d"),
                     "--output", "json")
    assert result.returncode == 1
    rows = {row["sourceKey"]: row for row in _report(result)["locks"]}
    assert rows["acme/bad/./default"]["outcome"] == "invalid"
    assert rows["acme/bad/./default"]["detail"].startswith("not JSON")
    assert rows["acme/empty/./default"]["outcome"] == "invalid"
    assert "repo_full_name" in rows["acme/empty/./default"]["detail"]
    assert rows[lock_key(good)]["outcome"] == "imported"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not a database\n" * 100, "is not a readable bbolt file: no bbolt magic"),
        (b"", "is not a bbolt file: it is empty"),
    ],
    ids=["garbage", "empty"],
)
def test_a_file_that_is_not_bbolt_exits_2_with_one_line(tmp_path: Path, content: bytes,
                                                         message: str) -> None:
    path = tmp_path / "atlantis.db"
    path.write_bytes(content)
    result = run_cli("--from-boltdb", str(path), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_an_empty_boltdb_path_exits_2_saying_so(tmp_path: Path) -> None:
    # Before: ".: not a regular file" (an empty path read as the working directory).
    result = run_cli("--from-boltdb", "", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr == ("enhanced-locking: --from-boltdb is empty; expected the path of "
                             "Atlantis's BoltDB file (atlantis.db in its data dir)\n")


def test_a_missing_file_or_one_without_run_locks_exits_2(bolt_writer: BoltWriter,
                                                         tmp_path: Path) -> None:
    missing = run_cli("--from-boltdb", str(tmp_path / "nope.db"), "--data-dir", str(tmp_path))
    assert missing.returncode == 2
    assert missing.stderr == f"enhanced-locking: {tmp_path / 'nope.db'}: no such file\n"

    other = tmp_path / "other.db"
    bolt_writer.write(other, [[{"op": "createBucket", "bucket": ["pulls"]}]])
    result = run_cli("--from-boltdb", str(other), "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "without a runLocks bucket (it has: pulls)" in result.stderr
    assert result.stderr.count("\n") == 1


def test_the_memory_backend_is_refused_outside_a_dry_run(
    atlantis_db: tuple[Path, list[dict[str, Any]]],
) -> None:
    path, _ = atlantis_db
    result = run_cli("--from-boltdb", str(path), "--enhanced-locking-backend", "memory")
    assert result.returncode == 2
    assert "memory backend keeps nothing" in result.stderr
    dry = run_cli("--from-boltdb", str(path), "--enhanced-locking-backend", "memory", "--dry-run")
    assert dry.returncode == 0, dry.stderr


# --- progress --------------------------------------------------------------------------------


def test_progress_draws_a_bar_on_a_terminal_and_lines_otherwise() -> None:
    terminal = io.StringIO()
    bar = importers.Progress(4, stream=terminal, tty=True)
    for _ in range(4):
        bar.advance()
    bar.finish()
    assert terminal.getvalue().endswith(f"\rimporting [{'#' * 30}] 100% 4/4\n")

    log = io.StringIO()
    plain = importers.Progress(25, stream=log, tty=False)
    for _ in range(25):
        plain.advance()
    plain.finish()
    lines = log.getvalue().splitlines()
    assert lines[0] == "importing: 2/25" and lines[-1] == "importing: 25/25"
    assert "\r" not in log.getvalue() and len(lines) <= 13


def test_the_command_draws_a_bar_when_stderr_is_a_terminal(
    atlantis_db: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    path, locks = atlantis_db
    controller, terminal = pty.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "enhanced_locking.cli", "migrate", "import", "--from-boltdb",
             str(path), "--data-dir", str(tmp_path / "d"), "--output", "json"],
            stdout=subprocess.PIPE, stderr=terminal, env=scrubbed_env(), timeout=120, check=False,
        )
        os.close(terminal)
        drawn = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(controller)
    assert result.returncode == 0
    assert json.loads(result.stdout)["summary"]["imported"] == len(locks)  # stdout stays JSON
    total = len(locks)
    assert f"\rimporting [{'#' * 30}] 100% {total}/{total}".encode() in drawn


# --- Atlantis's Redis ------------------------------------------------------------------------


@pytest.fixture
def atlantis_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, as Atlantis's ``--redis-host`` store."""
    directory = tmp_path / "redis"
    directory.mkdir()
    try:
        server = RedisServer(directory).start()
    except RedisServerError as error:
        pytest.fail(str(error), pytrace=False)
    yield server
    server.close()


def fill_like_atlantis(server: RedisServer, values: dict[str, bytes]) -> None:
    """``SET pr/{lockKey} <ProjectLock JSON>`` without expiry, as Atlantis's TryLock does."""
    with server.client() as client:
        for key, value in values.items():
            client.set(f"pr/{key}", value)
        client.set("global/apply/lock", b'{"CommandName":1}')  # Atlantis's other keys stay
        client.set("github.com::acme/repo-1::1", b"{}")


def _go_values(writer: BoltWriter, tmp_path: Path,
               locks: list[dict[str, Any]]) -> dict[str, bytes]:
    """The exact bytes Go's json.Marshal makes of Atlantis's ProjectLock structs."""
    dump = write_atlantis_db(writer, tmp_path / "marshal.db", locks)
    run_locks = next(b for b in dump["buckets"] if b["nameHex"] == b"runLocks".hex())
    values = [bytes.fromhex(value) for _, value in run_locks["items"]]
    return {lock_key(json.loads(value)): value for value in values}


@pytest.mark.redis
def test_locks_in_atlantis_redis_are_imported_and_a_second_run_skips_them(
    atlantis_redis: RedisServer, bolt_writer: BoltWriter, tmp_path: Path
) -> None:
    locks = _atlantis_locks()
    values = _go_values(bolt_writer, tmp_path, locks)
    fill_like_atlantis(atlantis_redis, values)
    data_dir = tmp_path / "data"
    url = f"redis://{atlantis_redis.addr}/0"
    first = run_cli("--from-redis", url, "--data-dir", str(data_dir), "--output", "json")
    assert first.returncode == 0, first.stderr
    report = _report(first)
    assert report["source"] == f"redis {url}"
    assert report["summary"]["imported"] == len(locks) == report["summary"]["read"]
    stored = asyncio.run(_stored(data_dir))
    assert set(stored) == {lock_key(lock) for lock in locks}
    assert stored["acme/zone/envs/eu/default/"].acquired_at == datetime(
        2024, 5, 1, 10, 0, 0, 123456, tzinfo=PLUS_TWO)
    raw = b"".join(p.read_bytes() for p in data_dir.iterdir())
    assert TOKEN.encode() not in raw

    second = run_cli("--from-redis", url, "--data-dir", str(data_dir), "--output", "json")
    assert second.returncode == 0
    assert _report(second)["summary"]["skipped"] == len(locks)
    with atlantis_redis.client() as client:  # the source is only read
        assert client.dbsize() == len(locks) + 2


@pytest.mark.redis
def test_locks_in_an_atlantis_redis_cluster_are_read_from_every_master(
    redis_cluster: RedisClusterNodes, bolt_writer: BoltWriter, tmp_path: Path
) -> None:
    """Atlantis's cluster mode spreads its pr/* keys over the masters by slot; the address of
    one node is enough to read them all (a SCAN of that node alone sees about a third)."""
    import redis

    locks = _atlantis_locks()[:60]
    values = _go_values(bolt_writer, tmp_path, locks)
    host, port = redis_cluster.addr.split(":")
    with redis.RedisCluster(host=host, port=int(port)) as admin:
        for key, value in values.items():
            admin.set(f"pr/{key}", value)
        try:
            assert len({redis_cluster.node_of(f"pr/{key}").addr for key in values}) == 3
            url = f"redis://{redis_cluster.addr}/0"
            result = run_cli("--from-redis", url, "--dry-run", "--data-dir", str(tmp_path),
                             "--output", "json")
            assert result.returncode == 0, result.stderr
            report = _report(result)
            assert report["source"] == f"redis {url} (cluster)"
            assert report["summary"]["read"] == len(locks) == report["summary"]["imported"]
            assert {row["key"] for row in report["locks"]} == {lock_key(lock) for lock in locks}
            # A cluster has database 0 only: another is the URL's mistake (exit 2).
            other = run_cli("--from-redis", f"redis://{redis_cluster.addr}/1", "--dry-run",
                            "--data-dir", str(tmp_path))
            assert other.returncode == 2
            assert other.stderr.splitlines() == [
                f"enhanced-locking: invalid Redis URL redis://{redis_cluster.addr}/1 "
                "(--from-redis): the server is a Redis Cluster node, which has database 0 only"]
        finally:
            for key in values:
                admin.delete(f"pr/{key}")


def _imported_from_redis_with_a_password(server: RedisServer, tmp_path: Path, pull: int,
                                         url: Callable[[str], str]) -> dict[str, Any]:
    """One lock imported from ``server`` with the password ``hunter2-redis`` set, given in the
    URL ``url(address)`` makes: the report, once the password was seen nowhere."""
    lock = atlantis_lock(repo="acme/auth", pull=pull)
    fill_like_atlantis(server, {lock_key(lock): json.dumps(lock).encode()})
    server.set_requirepass("hunter2-redis")
    result = run_cli("--from-redis", url(server.addr), "--data-dir", str(tmp_path / "d"),
                     "--output", "json")
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    report = _report(result)
    assert report["summary"]["imported"] == 1
    return report


@pytest.mark.redis
def test_a_redis_password_never_shows_in_the_report(atlantis_redis: RedisServer,
                                                    tmp_path: Path) -> None:
    _imported_from_redis_with_a_password(atlantis_redis, tmp_path, 3,
                                         lambda addr: f"redis://:hunter2-redis@{addr}/0")


@pytest.mark.redis
def test_a_redis_password_in_the_urls_query_never_shows(atlantis_redis: RedisServer,
                                                        tmp_path: Path) -> None:
    # redis-py takes a password from the URL's query too (?password=): it is masked as one
    # before the host is, in the report and in every error that names the URL.
    report = _imported_from_redis_with_a_password(
        atlantis_redis, tmp_path, 5, lambda addr: f"redis://{addr}/0?password=hunter2-redis")
    assert report["source"] == f"redis redis://{atlantis_redis.addr}/0"
    for bad, code in ((f"redis://{atlantis_redis.addr}/1x?password=hunter2-redis", 2),
                      ("redis://[::1/0?db=0&Password=hunter2-redis", 2),
                      (f"redis://{atlantis_redis.addr}/0?password=hunter2-wrong", 3)):
        failed = run_cli("--from-redis", bad, "--data-dir", str(tmp_path / "d"))
        assert failed.returncode == code, failed.stderr
        assert failed.stderr.startswith("enhanced-locking: "), failed.stderr
        assert "hunter2" not in failed.stdout + failed.stderr, failed.stderr


@pytest.mark.redis
def test_a_redis_password_from_atlantiss_own_variable_stays_off_the_command_line(
    atlantis_redis: RedisServer, tmp_path: Path,
) -> None:
    """A password in ``--from-redis``'s URL is in the process list, which every user of the
    machine can read: Atlantis's own ``ATLANTIS_REDIS_PASSWORD`` (its ``--redis-password``)
    gives it instead, read where the command runs in Atlantis's environment."""
    lock = atlantis_lock(repo="acme/auth", pull=4)
    fill_like_atlantis(atlantis_redis, {lock_key(lock): json.dumps(lock).encode()})
    atlantis_redis.set_requirepass("hunter2-redis")
    result = run_cli("--from-redis", f"redis://{atlantis_redis.addr}/0",
                     "--data-dir", str(tmp_path / "d"), "--output", "json",
                     env={"ATLANTIS_REDIS_PASSWORD": "hunter2-redis"})
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert _report(result)["summary"]["imported"] == 1


@pytest.mark.redis
async def test_records_are_read_with_scan_and_get_in_batches(
    atlantis_redis: RedisServer,
) -> None:
    locks = {f"acme/many/s{i}/default/": json.dumps(atlantis_lock(
        repo="acme/many", pull=i, path=f"s{i}")).encode() for i in range(1200)}
    fill_like_atlantis(atlantis_redis, locks)
    source, records = await importers.read_redis(f"redis://{atlantis_redis.addr}/0")
    assert {record.source_key for record in records} == {f"pr/{key}" for key in locks}
    backend: Backend = MemoryBackend()
    report = await importers.import_locks(records, backend, source=source)
    assert report.summary["imported"] == 1200


@pytest.mark.redis
def test_an_unreachable_redis_exits_3_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "gone").mkdir()
    with RedisServer(tmp_path / "gone") as server:
        addr = server.addr
    result = run_cli("--from-redis", f"redis://{addr}/0", "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 3
    assert result.stderr.startswith("enhanced-locking: cannot read Atlantis's Redis at")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_bad_redis_url_exits_2(tmp_path: Path) -> None:
    result = run_cli("--from-redis", "http://nope", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "invalid Redis URL http://nope" in result.stderr
    assert "--from-redis" in result.stderr


def test_a_redis_url_with_a_password_that_does_not_parse_exits_2_without_showing_it(
    tmp_path: Path,
) -> None:
    # An unclosed IPv6 bracket: the URL cannot be split to take the password out, so no part
    # of it is shown.
    result = run_cli("--from-redis", "redis://:s3cret@[::1:6379/0", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "enhanced-locking: invalid Redis URL (--from-redis; not shown, it may hold a password): "
        "Invalid IPv6 URL"]


def test_a_redis_url_that_does_not_parse_without_a_password_exits_2_with_one_line(
    tmp_path: Path,
) -> None:
    # An unclosed IPv6 bracket and no "@": nothing to take out, but the URL still cannot be
    # split; before, the split outside the guarded one ended the command with a stack trace.
    result = run_cli("--from-redis", "redis://[::1/0", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "enhanced-locking: invalid Redis URL redis://[::1/0 (--from-redis): Invalid IPv6 URL"]


def test_a_redis_url_whose_database_is_not_a_number_exits_2(tmp_path: Path) -> None:
    # redis-py ignores such a path and reads database 0: the wrong locks, not the user's.
    result = run_cli("--from-redis", "redis://127.0.0.1:1/1x", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "enhanced-locking: invalid Redis URL redis://127.0.0.1:1/1x (--from-redis): the "
        "database '1x' is not a number (redis://HOST:PORT/N)"]


@pytest.mark.redis
def test_a_redis_url_naming_a_database_the_server_lacks_exits_2(
    atlantis_redis: RedisServer, tmp_path: Path,
) -> None:
    # The URL's /99 is the user's mistake, not an unreachable Redis (exit 3).
    url = f"redis://{atlantis_redis.addr}/99"
    result = run_cli("--from-redis", url, "--dry-run", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"enhanced-locking: invalid Redis URL {url} (--from-redis): the server has no such "
        "database (DB index is out of range)"]


@pytest.mark.redis
def test_locks_are_imported_into_the_redis_backend_beside_atlantis_keys(
    atlantis_redis: RedisServer, atlantis_db: tuple[Path, list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    """Source and target on one Redis: Atlantis's ``pr/*`` keys and the enhanced keyspace."""
    path, locks = atlantis_db
    fill_like_atlantis(atlantis_redis, {lock_key(lock): json.dumps(lock).encode()
                                        for lock in locks[:40]})
    target = ("--enhanced-locking-backend", "redis",
              "--enhanced-locking-redis-addr", atlantis_redis.addr)
    url = f"redis://{atlantis_redis.addr}/0"
    first = run_cli("--from-redis", url, *target, "--output", "json")
    assert first.returncode == 0, first.stderr
    assert _report(first)["summary"]["imported"] == 40
    from_file = run_cli("--from-boltdb", str(path), *target, "--output", "json")
    assert from_file.returncode == 0, from_file.stderr
    assert _report(from_file)["summary"] == {"read": len(locks), "imported": len(locks) - 40,
                                             "skipped": 40, "conflicts": 0, "invalid": 0}
    again = run_cli("--from-redis", url, *target, "--output", "json")
    assert _report(again)["summary"]["skipped"] == 40  # its own keys are not pr/* keys

    from enhanced_locking.backends.redis_store import RedisBackend
    from enhanced_locking.config import EnhancedLockingConfig

    async def held() -> dict[str, Lock]:
        config = EnhancedLockingConfig(redis_addr=atlantis_redis.addr)
        backend = RedisBackend.from_config(config, "enhanced")
        try:
            return {lock.key: lock for lock in await backend.list()}
        finally:
            await backend.close()

    stored = asyncio.run(held())
    assert set(stored) == {lock_key(lock) for lock in locks}
    zoned = stored["acme/zone/envs/eu/default/"]
    # Redis stamps every grant with its server clock, imports included (docs/05-importing.md).
    assert zoned.acquired_at > datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=PLUS_TWO)
    assert {lock.fencing_token for lock in stored.values()} == {1}
    with atlantis_redis.client() as client:  # every value of every enhanced key
        enhanced = list(client.scan_iter("atlantis:enhanced:*"))
        dumped = b"".join(_redis_values(client, key) for key in enhanced)
    assert enhanced and b"acme/secret" in dumped
    assert TOKEN.encode() not in dumped and b"atlantis-bot" not in dumped


def _redis_values(client: Any, key: bytes) -> bytes:
    kind = client.type(key)
    if kind == b"string":
        return bytes(client.get(key))
    if kind == b"hash":
        return b"".join(k + v for k, v in client.hgetall(key).items())
    if kind == b"set":
        return b"".join(client.smembers(key))
    if kind == b"zset":
        return b"".join(client.zrange(key, 0, -1))
    if kind == b"list":
        return b"".join(client.lrange(key, 0, -1))
    return key


@pytest.mark.redis
async def test_odd_records_in_redis_are_reported_invalid(atlantis_redis: RedisServer) -> None:
    good = atlantis_lock(repo="acme/ok", pull=1)
    fill_like_atlantis(atlantis_redis, {
        lock_key(good): json.dumps(good).encode(),
        "acme/list/./default/": json.dumps({"Project": ["not", "an", "object"]}).encode(),
        "acme/array/./default/": b"[1, 2]",
    })
    with atlantis_redis.client() as client:
        client.hset("pr/acme/hash/./default/", "field", "value")
    source, records = await importers.read_redis(f"redis://{atlantis_redis.addr}/0")
    report = await importers.import_locks(records, MemoryBackend(), source=source)
    rows = {row.source_key: row for row in report.rows}
    assert rows[f"pr/{lock_key(good)}"].outcome is importers.Outcome.IMPORTED
    assert rows["pr/acme/hash/./default/"].detail.startswith("not a string (WRONGTYPE")
    assert rows["pr/acme/list/./default/"].outcome is importers.Outcome.INVALID
    assert rows["pr/acme/array/./default/"].detail == "not a ProjectLock JSON object"
    assert not report.clean and report.summary["invalid"] == 3


def test_an_import_with_enhanced_locking_off_says_a_running_service_does_not_see_it(
    atlantis_db: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Off (the default), the imported locks are honoured by a service from its next start
    only: the command says so; with it on, or when nothing was imported, it says nothing."""
    path, locks = atlantis_db
    note = "enhanced-locking-enabled is off in these settings"
    dry = run_cli("--from-boltdb", str(path), "--data-dir", str(tmp_path / "d"), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert note not in dry.stderr
    off = run_cli("--from-boltdb", str(path), "--data-dir", str(tmp_path / "d"))
    assert off.returncode == 0, off.stderr
    assert off.stderr.splitlines()[-1] == (
        "enhanced-locking: enhanced-locking-enabled is off in these settings: a service running "
        "with it off since its start does not see the imported locks until it is started again "
        "(it honours them then); turn enhanced locking on for it (docs/05-importing.md)")
    assert note not in run_cli("--from-boltdb", str(path), "--data-dir",
                               str(tmp_path / "d")).stderr  # nothing imported the second time
    on = run_cli("--from-boltdb", str(path), "--data-dir", str(tmp_path / "e"),
                 "--enhanced-locking-enabled")
    assert on.returncode == 0, on.stderr
    assert _report_table_imported(on.stdout) == len(locks)
    assert note not in on.stderr


def _report_table_imported(table: str) -> int:
    """The count the table's last line gives as imported."""
    found = re.search(r"imported (\d+)", table)
    assert found is not None, table
    return int(found.group(1))
