"""The embedded backend (``boltdb`` in the config): one SQLite file in WAL mode.

Atlantis's own store is a BoltDB file in its data dir; ours is ``enhanced-locking.db`` there.
SQLite in WAL mode gives the same single-file, no-server deployment plus real transactions.

Durability: ``synchronous=NORMAL``. A commit survives the process being killed (``kill -9``);
an operating-system crash or power cut can lose the last commits before a checkpoint. We chose
this (the same class as Redis's default ``appendfsync everysec``) because a commit then takes
microseconds instead of an fsync, which is what lets a queue hand a lock over in well under a
millisecond. ``docs/01-foundation.md`` says so to users.

Rows are Atlantis's JSON (see :mod:`codec`); fencing counters live in their own table so a
token keeps rising after its lock is released and across restarts.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from enhanced_locking.backends import codec
from enhanced_locking.backends.base import StoreBackend
from enhanced_locking.types import BackendUnavailable, Lock, StoreRefused, utcnow

__all__ = ["EmbeddedBackend", "open_database"]

_DECODED_KEYS = 4096

SCHEMA = """
CREATE TABLE IF NOT EXISTS locks (
    ns TEXT NOT NULL, key TEXT NOT NULL, repo TEXT NOT NULL, pull INTEGER NOT NULL,
    data TEXT NOT NULL, PRIMARY KEY (ns, key)
);
CREATE INDEX IF NOT EXISTS locks_by_pull ON locks (ns, repo, pull);
CREATE TABLE IF NOT EXISTS shared_locks (
    ns TEXT NOT NULL, key TEXT NOT NULL, repo TEXT NOT NULL, pull INTEGER NOT NULL,
    data TEXT NOT NULL, token INTEGER NOT NULL, PRIMARY KEY (ns, key, repo, pull)
);
CREATE INDEX IF NOT EXISTS shared_by_pull ON shared_locks (ns, repo, pull);
CREATE TABLE IF NOT EXISTS fencing (
    ns TEXT NOT NULL, key TEXT NOT NULL, token INTEGER NOT NULL, PRIMARY KEY (ns, key)
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS fencing_floor_on_insert AFTER INSERT ON fencing BEGIN
    UPDATE meta SET value = NEW.token WHERE name = 'token_floor' AND value < NEW.token;
END;
CREATE TRIGGER IF NOT EXISTS fencing_floor_on_update AFTER UPDATE OF token ON fencing BEGIN
    UPDATE meta SET value = NEW.token WHERE name = 'token_floor' AND value < NEW.token;
END;
"""

APPLICATION_ID = 0x454C4B31
"""SQLite's ``application_id`` of our store files ("ELK1"): how a file says it is ours."""

_OUR_TABLES = frozenset({"locks", "fencing"})


def _identify(connection: sqlite3.Connection, path: Path) -> str:
    """``ours``, ``unstamped`` (ours from before the stamp), ``empty``, or why it is foreign."""
    try:
        application_id = connection.execute("PRAGMA application_id").fetchone()[0]
        tables = {row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as error:
        return f"it is not an SQLite database ({error})"
    if application_id == APPLICATION_ID:
        return "ours"
    if application_id != 0:
        return f"it belongs to another program (SQLite application id {application_id:#x})"
    if _OUR_TABLES <= tables:
        return "unstamped"
    if not tables:
        return "empty"
    return "it holds other tables (" + ", ".join(sorted(tables)[:5]) + ")"


def open_database(
    path: Path, *, initialise: bool = False, clock: Callable[[], datetime] = utcnow
) -> sqlite3.Connection:
    """Open (creating if needed) the store file with the settings every user of it shares.

    A file that does not exist is created. An existing file must be ours: one that is empty
    (0 bytes, or an SQLite database without tables) is refused unless ``initialise``
    (``enhanced-locking-init-store``), and one that belongs to anything else is always refused
    (:class:`StoreRefused`); taking either as a new store would silently lose its locks and
    send fencing tokens back to 1.

    The fencing floor (``meta.token_floor``): a key's first token is the floor (as read when
    the file is opened) plus one, and triggers keep the floor at the highest token the file
    ever handed out, so a lost counter row never hands a token out again. A new file starts
    at 0; an emptied file that is initialised starts from the clock (milliseconds times 1000,
    above any token handed out before, as the Redis store's new epoch does).
    """
    try:
        existed = path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as error:
        raise BackendUnavailable(f"cannot open the embedded store {path}: {error}") from None
    try:
        verdict = _identify(connection, path) if existed else "new"
        if verdict not in ("new", "ours", "unstamped", "empty"):
            raise StoreRefused(
                f"the embedded store {path} is not an enhanced-locking store: {verdict}; "
                "move it away or choose another --data-dir")
        if verdict == "empty" and not initialise:
            raise StoreRefused(
                f"the embedded store {path} exists but is empty ({path.stat().st_size} bytes): "
                "its locks and fencing tokens would be lost; restore it, or set "
                "enhanced-locking-init-store=true to start it afresh")
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA busy_timeout=5000")
        had_floor = verdict == "ours" and connection.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is not None
        connection.executescript(SCHEMA)
        connection.execute("BEGIN IMMEDIATE")
        # A new file starts at 0 and one of ours from before the floor at its highest counter;
        # an emptied file, or one of ours that lost its floor, from the clock.
        lost = verdict == "empty" or (verdict == "ours" and not had_floor)
        start = int(clock().timestamp() * 1000) * 1000 if lost else 0
        connection.execute(
            "INSERT INTO meta (name, value) VALUES ('token_floor', ?) ON CONFLICT DO NOTHING",
            (start,))
        connection.execute(
            "UPDATE meta SET value = max(value, (SELECT coalesce(max(token), 0) FROM fencing)) "
            "WHERE name = 'token_floor'")
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        connection.execute("COMMIT")
    except StoreRefused:
        connection.close()
        raise
    except (OSError, sqlite3.Error) as error:
        connection.close()
        raise BackendUnavailable(f"cannot open the embedded store {path}: {error}") from None
    return connection


class EmbeddedBackend(StoreBackend):
    """Locks of one namespace in the shared SQLite file."""

    kind = "boltdb"

    def __init__(
        self,
        path: Path,
        namespace: str = "enhanced",
        *,
        clock: Callable[[], datetime] = utcnow,
        initialise: bool = False,
    ) -> None:
        super().__init__(namespace, clock=clock)
        self.path = path
        self._db = open_database(path, initialise=initialise, clock=clock)
        self._floor = int(self._db.execute(
            "SELECT value FROM meta WHERE name = 'token_floor'").fetchone()[0])
        self._depth = 0
        # The last row text seen per key and its decoded lock: decoding is most of a read's
        # cost, and a row read back is usually one this backend just wrote. The text is always
        # read from the file, so another writer's change is never missed.
        self._decoded: dict[str, tuple[str, Lock]] = {}

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        # BEGIN IMMEDIATE takes the write lock up front, so a read-then-write is atomic even
        # if another process opened the same file.
        if self._depth:
            yield
            return
        with self._unavailable():
            self._db.execute("BEGIN IMMEDIATE")
        self._depth += 1
        try:
            with self._unavailable():
                yield
                self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        finally:
            self._depth -= 1

    @contextlib.contextmanager
    def _unavailable(self) -> Iterator[None]:
        # SQLite failing (closed, locked past busy_timeout, disk full, I/O error, not a
        # database) is the store being unavailable: callers fall back or answer 503.
        try:
            yield
        except sqlite3.Error as error:
            raise BackendUnavailable(f"embedded store {self.path}: {error}") from None

    def _decode(self, key: str, text: str) -> Lock:
        cached = self._decoded.get(key)
        if cached is not None and cached[0] == text:
            return cached[1]
        lock = codec.decode(text, key=key)
        self._remember(key, text, lock)
        return lock

    def _remember(self, key: str, text: str, lock: Lock) -> None:
        if len(self._decoded) >= _DECODED_KEYS:
            self._decoded.clear()
        self._decoded[key] = (text, lock)

    def _load(self, key: str) -> Lock | None:
        row = self._db.execute(
            "SELECT data FROM locks WHERE ns = ? AND key = ?", (self.namespace, key)
        ).fetchone()
        return self._decode(key, row[0]) if row else None

    def _store(self, lock: Lock) -> None:
        text = codec.encode(lock)
        self._db.execute(
            "INSERT OR REPLACE INTO locks (ns, key, repo, pull, data) VALUES (?, ?, ?, ?, ?)",
            (self.namespace, lock.key, lock.project.repo_full_name, lock.pull.num, text),
        )
        self._remember(lock.key, text, lock)

    def _load_shared(self, key: str) -> list[Lock]:
        rows = self._db.execute(
            "SELECT data FROM shared_locks WHERE ns = ? AND key = ? ORDER BY token",
            (self.namespace, key),
        ).fetchall()
        return [codec.decode(row[0], key=key) for row in rows]

    def _store_shared(self, lock: Lock) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO shared_locks (ns, key, repo, pull, data, token) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (self.namespace, lock.key, lock.project.repo_full_name, lock.pull.num,
             codec.encode(lock), lock.fencing_token),
        )

    def _delete_shared(self, key: str, owner: tuple[str, int]) -> None:
        self._db.execute(
            "DELETE FROM shared_locks WHERE ns = ? AND key = ? AND repo = ? AND pull = ?",
            (self.namespace, key, *owner),
        )

    def _pop(self, key: str, owner: tuple[str, int] | None) -> Lock | None:
        # One statement, so one implicit transaction: the release of a key nobody waits for.
        query = "DELETE FROM locks WHERE ns = ? AND key = ?"
        args: list[str | int] = [self.namespace, key]
        if owner is not None:
            query, args = query + " AND repo = ? AND pull = ?", [*args, *owner]
        with self._unavailable():
            row = self._db.execute(query + " RETURNING data", args).fetchone()
        return self._decode(key, row[0]) if row else None

    def _delete(self, key: str) -> None:
        self._db.execute("DELETE FROM locks WHERE ns = ? AND key = ?", (self.namespace, key))

    def _next_token(self, key: str) -> int:
        row = self._db.execute(
            "INSERT INTO fencing (ns, key, token) VALUES (?, ?, ?) "
            "ON CONFLICT (ns, key) DO UPDATE SET token = token + 1 RETURNING token",
            (self.namespace, key, self._floor + 1),
        ).fetchone()
        return int(row[0])

    def _tokens(self) -> dict[str, int]:
        with self._unavailable():
            rows = self._db.execute(
                "SELECT key, token FROM fencing WHERE ns = ?", (self.namespace,)
            ).fetchall()
        return {key: int(token) for key, token in rows}

    def _raise_token(self, key: str, at_least: int) -> None:
        self._db.execute(
            "INSERT INTO fencing (ns, key, token) VALUES (?, ?, ?) "
            "ON CONFLICT (ns, key) DO UPDATE SET token = max(token, excluded.token)",
            (self.namespace, key, at_least),
        )

    def _scan(self, repo: str | None, pull: int | None) -> list[Lock]:
        where = "WHERE ns = ?"
        args: list[str | int] = [self.namespace]
        if repo is not None:
            where, args = where + " AND repo = ?", [*args, repo]
        if pull is not None:
            where, args = where + " AND pull = ?", [*args, pull]
        query = (f"SELECT key, data FROM locks {where} UNION ALL "
                 f"SELECT key, data FROM shared_locks {where} ORDER BY key")
        with self._unavailable():
            rows = self._db.execute(query, [*args, *args]).fetchall()
        return [codec.decode(data, key=key) for key, data in rows]

    async def ping(self) -> None:
        with self._unavailable():
            self._db.execute("SELECT 1").fetchone()

    async def close(self) -> None:
        await super().close()
        self._db.close()
