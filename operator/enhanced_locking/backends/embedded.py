"""The embedded backend (``boltdb`` in the config): one SQLite file in WAL mode.

Atlantis's own store is a BoltDB file in its data dir; ours is ``enhanced-locking.db`` there.
SQLite in WAL mode gives the same single-file, no-server deployment plus real transactions.

Durability: ``synchronous=NORMAL`` by default. A commit survives the process being killed
(``kill -9``); an operating-system crash or power cut can lose the last commits before a
checkpoint. We chose this (the same class as Redis's default ``appendfsync everysec``) because
a commit then takes microseconds instead of an fsync, which is what lets a queue hand a lock
over in well under a millisecond. ``store-synchronous=full`` (SQLite's ``FULL``) syncs each
commit before its answer, for a disk flush per write. ``OFF`` is not offered: a checkpoint
without its sync can leave the file corrupt after an operating-system crash, for no gain a
served call can show. ``docs/01-foundation.md`` says so to users.

Rows are Atlantis's JSON (see :mod:`codec`). A key's row outlives its lock: it keeps the key's
fencing counter (``counter``, the last token handed out for the key) and whether it is held
(``held``), so a token keeps rising after its lock is released and across restarts. That lets
the common acquire (a free key, nobody waiting, no rule in the way) be one statement: an upsert
that takes a free row, bumps its counter and writes the token into the lock's JSON; and the
common release one ``UPDATE``. Neither reads the row back when it holds what this process
expected (see ``_TAKE_SEEN_AS_EXPECTED``). A released key's last lock stays in its row until
the key is taken again (it carries no secret: see :mod:`codec`).

The release route's holder without a read: the backend keeps, per key, the lock it last granted
or read as held (:meth:`EmbeddedBackend.held_as_seen`), and the route decides on it (access
control, the pull, the repository) without a read transaction, then releases it by its fencing
token: the one ``UPDATE`` of a release as expected, which frees the row only if it holds that
lock's text. Another writer of the file (another process, another connection) may have changed
the key since, and nothing here would see it; then the statement changes nothing, the general
path finds the row and frees nothing that is not that hold, and the route reads the holder and
decides again, as it did before.

Schema versions (``PRAGMA user_version``): 0 had the counters in a ``fencing`` table of their
own beside ``locks``; 2 is the layout below with a fencing floor that followed every token
exactly; 3 keeps the floor ahead (see :data:`FLOOR_AHEAD`). A file of an older version is
migrated in place when it is opened (one transaction; held locks, counters and the fencing
floor kept). Version 3 later gained a table (``told``: the answers given with a hold, see
:data:`_TOLD_OF`) without a new version: a release from before it shares the file as ever.

The legacy side's change counter: the router asks the legacy side about every key it grants on
the enhanced side, before and after the grant, and releases there too (a key is never held on
both sides), so most legacy lookups find what the last one found. The file counts every change
to a legacy row itself (``meta`` row ``changes:legacy``, kept by triggers, so whoever writes
the file counts: this process, another one on the same file, an older version of this
service, the ``sqlite3`` shell). A backend of a counted namespace keeps what it last read per
key with the counter it read it at; while the counter has not moved, a lookup reads the
counter only (one statement, no transaction) and answers what was read then, and a release of
a key that holds nothing answers "nothing released" without taking the write lock. Any change
of any legacy row moves the counter in the same transaction, so nothing read before it is used
after it. (SQLite's own ``PRAGMA data_version`` cannot serve: it changes on every commit of
another connection, and the enhanced side and the audit trail commit on connections of their
own to the same file, so it would move on every call.) The router's looks at the legacy side
around an enhanced grant or release are mostly not made at all: the enhanced side's statement
checks the legacy rows of the key itself (see ``_OTHER_FREE``) when the router asks for it
(:func:`~enhanced_locking.backends.base.checking_other_side`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Literal

from enhanced_locking.backends import codec
from enhanced_locking.backends.base import (
    Owner,
    StoreBackend,
    Stored,
    Times,
    Told,
    clock_floor,
    other_side_check,
)
from enhanced_locking.types import (
    BackendUnavailable,
    Candidate,
    Lock,
    LockUnreadable,
    Moment,
    StoreRefused,
    Synchronous,
    UnusableSetting,
    replaced,
    utcnow,
)

__all__ = ["EmbeddedBackend", "open_database"]

_DECODED_KEYS = 4096

SCHEMA_VERSION = 3
"""``PRAGMA user_version`` of the layout below (0: counters in a table of their own; 2: the
fencing floor written on every grant)."""

FLOOR_AHEAD = 1000
"""How far ahead of the highest token the fencing floor is set when a token passes it.

The floor must be at least every token the file handed out (a lost row then starts above them
all), not equal to the highest: a floor that followed every token wrote a second table, and so
a second page of the write-ahead log, on every grant (about 15 % of the two statements of an
acquire and its release). Kept ahead, it is written once every ``FLOOR_AHEAD`` grants of the
busiest key. What a user sees: a key first taken after the file is reopened starts at the floor
plus one, up to ``FLOOR_AHEAD`` above the highest token handed out (tokens promise to rise per
key, nothing about their gaps); a key's own tokens still rise by one."""

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS locks (
        ns TEXT NOT NULL, key TEXT NOT NULL, repo TEXT NOT NULL, pull INTEGER NOT NULL,
        data TEXT NOT NULL, counter INTEGER NOT NULL, held INTEGER NOT NULL,
        PRIMARY KEY (ns, key))""",
    "CREATE INDEX IF NOT EXISTS locks_by_pull ON locks (ns, repo, pull)",
    """CREATE TABLE IF NOT EXISTS shared_locks (
        ns TEXT NOT NULL, key TEXT NOT NULL, repo TEXT NOT NULL, pull INTEGER NOT NULL,
        data TEXT NOT NULL, token INTEGER NOT NULL, PRIMARY KEY (ns, key, repo, pull))""",
    "CREATE INDEX IF NOT EXISTS shared_by_pull ON shared_locks (ns, repo, pull)",
    f"""CREATE TRIGGER IF NOT EXISTS fencing_floor_on_insert AFTER INSERT ON locks
    WHEN NEW.counter > (SELECT value FROM meta WHERE name = 'token_floor') BEGIN
        UPDATE meta SET value = NEW.counter + {FLOOR_AHEAD} WHERE name = 'token_floor';
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS fencing_floor_on_update AFTER UPDATE OF counter ON locks
    WHEN NEW.counter > (SELECT value FROM meta WHERE name = 'token_floor') BEGIN
        UPDATE meta SET value = NEW.counter + {FLOOR_AHEAD} WHERE name = 'token_floor';
    END""",
    """CREATE TRIGGER IF NOT EXISTS fencing_lost_on_delete AFTER DELETE ON locks
    WHEN OLD.counter > (SELECT value FROM meta WHERE name = 'lost_floor') BEGIN
        UPDATE meta SET value = OLD.counter WHERE name = 'lost_floor';
    END""",
    """CREATE TABLE IF NOT EXISTS told (
        ns TEXT NOT NULL, key TEXT NOT NULL, token INTEGER NOT NULL, tellers TEXT NOT NULL,
        unheard INTEGER NOT NULL, PRIMARY KEY (ns, key))""",
)
"""The layout of version 3, each statement idempotent. ``meta.token_floor`` is at least the
highest token the file ever handed out (the triggers keep it :data:`FLOOR_AHEAD` ahead when a
token passes it), so a lost row never hands a token out again. ``meta.lost_floor`` is the
highest counter of a row deleted (by hand: the service never deletes one) since the file was
made: a service that opened the file before then starts a new row above it (see
:data:`_FIRST_TOKEN`). ``told`` (see :data:`_TOLD_OF`) came within version 3: a table added,
none of the others changed, so a release of version 3 from before it opens the file as ever
and never reads it (an upgrade that can go back; the version is not raised). A row of a hold
that ended goes at the next answer counted on the file, or when the file is opened
(:data:`_PRUNE_TOLD`): whoever ended the hold (a release of this service, of the release
before, an expiry, a force-unlock), and at no cost to a release."""

GONE_TRIGGERS = (
    "DROP TRIGGER IF EXISTS told_gone_on_release",
    "DROP TRIGGER IF EXISTS told_gone_with_shared",
)
"""Triggers a file may have had within version 3 that this layout does not keep: they deleted
a hold's ``told`` row in the statement that ended it, a sub-program on every release (about
4.9k instructions of a pair) for a row most holds never have; :data:`_PRUNE_TOLD` does it."""

_FIRST_TOKEN = "max({}, coalesce((SELECT value FROM meta WHERE name = 'lost_floor'), 0) + 1)"
"""The token of a key's new row: the floor as read when the file was opened plus one (the
parameter put in ``{}``), or one above the highest counter of a row deleted, whichever is
higher. A service keeps the floor it read when it opened the file, and a row deleted while it
runs would otherwise start again below the tokens the key had."""

MIGRATE_FROM_2 = (
    "DROP TRIGGER IF EXISTS fencing_floor_on_insert",
    "DROP TRIGGER IF EXISTS fencing_floor_on_update",
)
"""Version 2 to 3: the floor's triggers of version 2 go; :data:`SCHEMA` makes version 3's."""

# Who of its pull was answered with a key's hold unchanged (held already: a request that does
# not wait, ``""``, or a waiter's grant, its id; ``tellers`` a JSON array), for the hold with
# fencing token ``token``, and whether that hold's own grant was given back unheard: the count
# StoreBackend keeps (``Told``), in the file, so that every process on it counts the answers
# the others gave. Written in the step of the answer or the give-back, read by a give-back.
# One row per key at most; a row of an older hold of the key (another token) counts nothing.
_TOLD_OF = "SELECT token, tellers, unheard FROM told WHERE ns = ? AND key = ?"
_KEEP_TOLD = """
INSERT INTO told (ns, key, token, tellers, unheard) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (ns, key) DO UPDATE SET
    token = excluded.token, tellers = excluded.tellers, unheard = excluded.unheard
"""
_FORGET_TOLD = "DELETE FROM told WHERE ns = ? AND key = ?"
_PRUNE_TOLD = """
DELETE FROM told WHERE NOT EXISTS (
        SELECT 1 FROM locks WHERE locks.ns = told.ns AND locks.key = told.key AND held = 1
        AND locks.counter = told.token)
    AND NOT EXISTS (
        SELECT 1 FROM shared_locks AS shared WHERE shared.ns = told.ns AND shared.key = told.key
        AND shared.token = told.token)
"""
"""The rows of holds that ended (their token no longer held), in the transaction of each answer
counted (:data:`_COUNT_TOLD`, before it) and when the file is opened. Rows are written only
there, so the table never has more rows than holds that were alive, answered held already, at
the last answer counted (or the file's opening); between, a row of a hold that ended counts
nothing (its token is not the key's next hold's: tokens rise per key) and costs one row."""

# One more answer of the hold ?3 to ?4, in one statement (no read first): a row of another
# hold starts again; the row is not written when it counts that teller already. Tellers that
# are not a JSON array (not written by this store) count as someone unknown ("?"), as
# EmbeddedBackend._told_of reads them.
_COUNT_TOLD = """
INSERT INTO told (ns, key, token, tellers, unheard) VALUES (?1, ?2, ?3, json_array(?4), 0)
ON CONFLICT (ns, key) DO UPDATE SET
    tellers = CASE WHEN token <> ?3 THEN excluded.tellers
                   WHEN NOT json_valid(tellers) OR json_type(tellers) <> 'array'
                   THEN json_array('?', ?4)
                   ELSE json_insert(tellers, '$[#]', ?4) END,
    unheard = CASE WHEN token = ?3 THEN unheard ELSE 0 END,
    token = ?3
WHERE CASE WHEN token <> ?3 THEN 1
           WHEN NOT json_valid(told.tellers) OR json_type(told.tellers) <> 'array' THEN 1
           ELSE NOT EXISTS (SELECT 1 FROM json_each(told.tellers) WHERE value = ?4) END
"""

COUNTED = ("legacy",)
"""Namespaces whose changes the file counts (see the module's docstring): the side that other
programs may write and that the router reads on every call of the other side."""


def _changes_row(namespace: str) -> str:
    return f"changes:{namespace}"


def _counting(namespace: str) -> tuple[str, ...]:
    """Triggers that move ``namespace``'s change counter with every change of one of its rows
    (held, shared, released or renamed), in the transaction of the change."""
    bump = f"UPDATE meta SET value = value + 1 WHERE name = '{_changes_row(namespace)}';"
    return tuple(
        f"CREATE TRIGGER IF NOT EXISTS {namespace}_changes_on_{event.lower()}_{table} "
        f"AFTER {event} ON {table} WHEN {when} BEGIN {bump} END"
        for table in ("locks", "shared_locks")
        for event, when in (("INSERT", f"NEW.ns = '{namespace}'"),
                            ("UPDATE", f"OLD.ns = '{namespace}' OR NEW.ns = '{namespace}'"),
                            ("DELETE", f"OLD.ns = '{namespace}'")))


COUNTING = tuple(trigger for namespace in COUNTED for trigger in _counting(namespace))
"""The change counters' triggers, created (idempotently) when a file is opened."""

_CHANGES = "SELECT value FROM meta WHERE name = ?"

MIGRATE_FROM_0 = (
    """CREATE TABLE locks_v2 (
        ns TEXT NOT NULL, key TEXT NOT NULL, repo TEXT NOT NULL, pull INTEGER NOT NULL,
        data TEXT NOT NULL, counter INTEGER NOT NULL, held INTEGER NOT NULL,
        PRIMARY KEY (ns, key))""",
    """INSERT INTO locks_v2 (ns, key, repo, pull, data, counter, held)
        SELECT l.ns, l.key, l.repo, l.pull, l.data, coalesce(f.token, 0), 1
        FROM locks AS l LEFT JOIN fencing AS f ON f.ns = l.ns AND f.key = l.key""",
    """INSERT INTO locks_v2 (ns, key, repo, pull, data, counter, held)
        SELECT ns, key, '', 0, '', token, 0 FROM fencing WHERE true
        ON CONFLICT (ns, key) DO UPDATE SET counter = max(counter, excluded.counter)""",
    """UPDATE meta SET value = max(value, (SELECT coalesce(max(counter), 0) FROM locks_v2))
        WHERE name = 'token_floor'""",
    "DROP TABLE locks",
    "DROP TABLE fencing",
    "ALTER TABLE locks_v2 RENAME TO locks",
)
"""Version 0 to 2: each held lock keeps its key's counter; released keys keep theirs in a free
row; the ``fencing`` table (and its floor triggers) goes."""

# The common acquire: take the key's row if it is free (or new) and nobody holds the key
# shared; the counter rises by one (a new key starts above the floor) and the token goes into
# the lock's JSON. No row back: the key is held (or held shared); the general path decides.
_TAKE_FREE = f"""
INSERT INTO locks (ns, key, repo, pull, data, counter, held)
SELECT ?1, ?2, ?3, ?4, json_set(?5, '$.Enhanced.FencingToken', new.token), new.token, 1
FROM (SELECT {_FIRST_TOKEN.format('?6')} AS token) AS new
WHERE NOT EXISTS (SELECT 1 FROM shared_locks WHERE ns = ?1 AND key = ?2)
ON CONFLICT (ns, key) DO UPDATE SET
    repo = excluded.repo, pull = excluded.pull, held = 1, counter = locks.counter + 1,
    data = json_set(excluded.data, '$.Enhanced.FencingToken', locks.counter + 1)
WHERE locks.held = 0
RETURNING counter, data
"""

# The same acquire of a key whose row this process has seen: an UPDATE of the free row, with
# the lock's JSON as encoded here for the token expected (the counter last seen plus one). Only
# if another writer moved the counter since does SQLite write the token into the JSON itself
# (json_set parses and re-renders the whole lock: a fifth of the statement's cost). No row
# back: the key is held (or held shared), or its row is gone; the general path decides. The
# row's JSON comes back only when it is not the text sent (NULL when the token was the one
# expected): the caller has that text already.
_TAKE_SEEN = """
UPDATE locks SET repo = ?3, pull = ?4, held = 1, counter = counter + 1,
    data = CASE WHEN counter + 1 = ?6 THEN ?5
                ELSE json_set(?5, '$.Enhanced.FencingToken', counter + 1) END
WHERE ns = ?1 AND key = ?2 AND held = 0
    AND NOT EXISTS (SELECT 1 FROM shared_locks WHERE ns = ?1 AND key = ?2)
RETURNING counter, CASE WHEN counter = ?6 THEN NULL ELSE data END
"""

# _TAKE_SEEN for the pull whose row it is (it held the key last): the owner columns stay, so
# the by-pull index is not rewritten. No row back: as above, or another pull's row now.
_TAKE_MINE = """
UPDATE locks SET held = 1, counter = counter + 1,
    data = CASE WHEN counter + 1 = ?6 THEN ?5
                ELSE json_set(?5, '$.Enhanced.FencingToken', counter + 1) END
WHERE ns = ?1 AND key = ?2 AND held = 0 AND repo = ?3 AND pull = ?4
    AND NOT EXISTS (SELECT 1 FROM shared_locks WHERE ns = ?1 AND key = ?2)
RETURNING counter, CASE WHEN counter = ?6 THEN NULL ELSE data END
"""

# The fast release: one statement, so one implicit transaction (by anyone, or by its owner).
_POP = "UPDATE locks SET held = 0 WHERE ns = ? AND key = ? AND held = 1 RETURNING data"
_POP_OWNED = ("UPDATE locks SET held = 0 WHERE ns = ? AND key = ? AND held = 1 "
              "AND repo = ? AND pull = ? RETURNING data")

# The common grant and release, as expected: the statements above without RETURNING, which
# costs SQLite about as much as the rest of a statement (it runs the UPDATE into a temporary
# table first; a third of an acquire and release's instructions). What they would answer is
# known beforehand, so a statement says only whether it changed the row (its change count):
# a grant takes the free row only at the counter last seen (so its token is the one expected
# and the row holds the text sent), a release frees the row only if it holds the text last
# seen (so what it released is the lock decoded from that text). When either finds anything
# else, it changes nothing and the statement above, with its answer, runs after it.
_TAKE_SEEN_AS_EXPECTED = """
UPDATE locks SET repo = ?3, pull = ?4, held = 1, counter = ?6, data = ?5
WHERE ns = ?1 AND key = ?2 AND held = 0 AND counter = ?6 - 1
    AND NOT EXISTS (SELECT 1 FROM shared_locks WHERE ns = ?1 AND key = ?2)
"""
_TAKE_MINE_AS_EXPECTED = """
UPDATE locks SET held = 1, counter = ?6, data = ?5
WHERE ns = ?1 AND key = ?2 AND held = 0 AND counter = ?6 - 1 AND repo = ?3 AND pull = ?4
    AND NOT EXISTS (SELECT 1 FROM shared_locks WHERE ns = ?1 AND key = ?2)
"""
_POP_AS_EXPECTED = "UPDATE locks SET held = 0 WHERE ns = ? AND key = ? AND held = 1 AND data = ?"
_POP_OWNED_AS_EXPECTED = ("UPDATE locks SET held = 0 WHERE ns = ? AND key = ? AND held = 1 "
                          "AND repo = ? AND pull = ? AND data = ?")

# The other side's rows in the same file hold nothing for the key (?7: its namespace): the
# condition a grant or release of the router's adds when it answers the router's look at the
# other side in its own transaction (see EmbeddedBackend.checks_other_side). A legacy row that
# is held at all, even by this pull or lapsed, fails it: the router then asks that side itself.
_OTHER_FREE = ("\n    AND NOT EXISTS (SELECT 1 FROM locks WHERE ns = ?7 AND key = ?2 AND held = 1)"
               "\n    AND NOT EXISTS (SELECT 1 FROM shared_locks WHERE ns = ?7 AND key = ?2)")


def _other_free(statement: str, before: str) -> str:
    """``statement`` with :data:`_OTHER_FREE` added to its condition, just before ``before``."""
    head, sep, tail = statement.partition(before)
    assert sep, before
    return head.rstrip() + _OTHER_FREE + "\n" + sep + tail


_TAKE_FREE_CHECKED = _other_free(_TAKE_FREE, "ON CONFLICT")
_TAKE_SEEN_CHECKED = _other_free(_TAKE_SEEN, "RETURNING")
_TAKE_MINE_CHECKED = _other_free(_TAKE_MINE, "RETURNING")
_TAKE_SEEN_AS_EXPECTED_CHECKED = _TAKE_SEEN_AS_EXPECTED.rstrip() + _OTHER_FREE
_TAKE_MINE_AS_EXPECTED_CHECKED = _TAKE_MINE_AS_EXPECTED.rstrip() + _OTHER_FREE

# The releases with that condition, their parameters numbered to match (?3, ?4: the owner;
# ?5: the text last seen; ?7: the other side's namespace).
_POP_CHECKED = ("UPDATE locks SET held = 0 WHERE ns = ?1 AND key = ?2 AND held = 1"
                + _OTHER_FREE + "\nRETURNING data")
_POP_OWNED_CHECKED = ("UPDATE locks SET held = 0 WHERE ns = ?1 AND key = ?2 AND held = 1 "
                      "AND repo = ?3 AND pull = ?4" + _OTHER_FREE + "\nRETURNING data")
_POP_AS_EXPECTED_CHECKED = ("UPDATE locks SET held = 0 WHERE ns = ?1 AND key = ?2 AND held = 1 "
                            "AND data = ?5" + _OTHER_FREE)
_POP_OWNED_AS_EXPECTED_CHECKED = (
    "UPDATE locks SET held = 0 WHERE ns = ?1 AND key = ?2 AND held = 1 AND repo = ?3 "
    "AND pull = ?4 AND data = ?5" + _OTHER_FREE)

APPLICATION_ID = 0x454C4B31
"""SQLite's ``application_id`` of our store files ("ELK1"): how a file says it is ours."""

_OUR_TABLES = frozenset({"locks", "fencing"})
"""The tables of a store file from before the application id (schema version 0)."""


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


_NOT_A_DIRECTORY = frozenset({
    errno.ENOTDIR, errno.EEXIST, errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS,
    errno.ENAMETOOLONG,
})
"""Why a data dir cannot be made that are the path's fault (a file where a directory goes, a
place that cannot hold one): the user's setting. Other errors (EIO, ENOSPC) are the disk's."""


def open_database(
    path: Path, *, initialise: bool = False, clock: Callable[[], datetime] = utcnow,
    synchronous: Synchronous = "normal",
) -> sqlite3.Connection:
    """Open (creating if needed) the store file with the settings every user of it shares.

    A file that does not exist is made (whole, then linked into place: :func:`_create`). An
    existing file must be ours: one that is empty
    (0 bytes, or an SQLite database without tables) is refused unless ``initialise``
    (``enhanced-locking-init-store``), and one that belongs to anything else is always refused
    (:class:`StoreRefused`); taking either as a new store would silently lose its locks and
    send fencing tokens back to 1.

    The fencing floor (``meta.token_floor``): a key's first token is the floor (as read when
    the file is opened) plus one, and triggers keep the floor at the highest token the file
    ever handed out, so a lost counter row never hands a token out again. A new file starts
    at 0; an emptied file that is initialised starts from the clock (milliseconds times 1000,
    above any token handed out before, as the Redis store's new epoch does).

    ``synchronous``: SQLite's setting of the same name for this connection (the
    ``store-synchronous`` setting): ``full`` syncs each of its commits to disk before it returns.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if error.errno not in _NOT_A_DIRECTORY:
            raise BackendUnavailable(f"cannot open the embedded store {path}: {error}") from None
        reason = ("not a directory" if error.errno == errno.EEXIST
                  else (error.strerror or str(error)).lower())
        raise UnusableSetting(
            "data-dir", f"cannot make the embedded store's directory {path.parent}: {reason}",
        ) from None
    unwritable = _unwritable(path)
    if unwritable is not None:
        raise UnusableSetting("data-dir", f"cannot write the embedded store {path}: "
                                          f"{unwritable}")
    if not path.exists():
        _create(path, clock, synchronous)
    return _open(path, path, initialise=initialise, clock=clock, synchronous=synchronous)


def _unwritable(path: Path) -> str | None:
    """Why this process cannot write the store file ``path``, or its directory (SQLite keeps
    the store's WAL files beside it, and a new store is made there), if it cannot: the data
    dir's fault (a volume mounted read-only, another user's directory), not the disk's."""
    for place in (path.parent, path):
        if place.exists() and not os.access(place, os.W_OK):
            read_only = os.statvfs(place).f_flag & os.ST_RDONLY
            return (f"{place} is not writable by this process "
                    f"({'a read-only file system' if read_only else 'permission denied'})")
    return None


def _create(path: Path, clock: Callable[[], datetime], synchronous: Synchronous) -> None:
    """A new store file at ``path``, made whole under a name of its own in the same directory
    and then linked into place: another opener (a service started at the same moment) never
    finds the file at ``path`` without its tables (which it would refuse as emptied) nor
    while it is turned to WAL mode. If another opener linked its file first, that one is
    the store. It is made under the ``synchronous`` asked, as every later commit is."""
    made = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.new")
    try:
        _open(made, path, initialise=False, clock=clock, synchronous=synchronous).close()
        try:
            os.link(made, path)
        except FileExistsError:
            pass  # another opener's file is in place: it is the store
        except OSError:
            # A file system without hard links: moved into place unless a file is there by now.
            if not path.exists():
                os.replace(made, path)
    except OSError as error:
        raise BackendUnavailable(f"cannot open the embedded store {path}: {error}") from None
    finally:
        for leftover in (made, made.with_name(made.name + "-wal"),
                         made.with_name(made.name + "-shm")):
            with contextlib.suppress(OSError):
                leftover.unlink()


def _open(
    path: Path, shown: Path, *, initialise: bool, clock: Callable[[], datetime],
    synchronous: Synchronous,
) -> sqlite3.Connection:
    """:func:`open_database` of the file at ``path`` (``shown``: the store's path, as errors
    name it), made if it does not exist."""
    try:
        existed = path.exists()
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as error:
        raise BackendUnavailable(f"cannot open the embedded store {shown}: {error}") from None
    try:
        verdict = _identify(connection, path) if existed else "new"
        if verdict not in ("new", "ours", "unstamped", "empty"):
            raise StoreRefused(
                f"the embedded store {shown} is not an enhanced-locking store: {verdict}; "
                "move it away or choose another --data-dir")
        if verdict == "empty" and not initialise:
            raise StoreRefused(
                f"the embedded store {shown} exists but is empty ({path.stat().st_size} bytes): "
                "its locks and fencing tokens would be lost; restore it, or set "
                "enhanced-locking-init-store=true to start it afresh")
        if verdict == "ours":
            _refuse_newer(connection, shown)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(_SYNCHRONOUS[synchronous])
        connection.execute("PRAGMA busy_timeout=5000")
        connection.execute("BEGIN IMMEDIATE")
        tables = {row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        # A new file starts at 0 and one of ours from before the floor at its highest counter;
        # an emptied file, or one of ours that lost its floor, from the clock.
        lost = verdict == "empty" or (verdict == "ours" and "meta" not in tables)
        start = clock_floor(clock()) if lost else 0
        connection.execute(
            "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        connection.execute(
            "INSERT INTO meta (name, value) VALUES ('token_floor', ?) ON CONFLICT DO NOTHING",
            (start,))
        if version < 2 and "locks" in tables:
            _migrate_from_0(connection, tables)
        if version < 3:
            for statement in MIGRATE_FROM_2:
                connection.execute(statement)
        for statement in GONE_TRIGGERS + SCHEMA + COUNTING:
            connection.execute(statement)
        connection.execute(_PRUNE_TOLD)
        connection.execute(
            "INSERT INTO meta (name, value) VALUES ('lost_floor', 0) ON CONFLICT DO NOTHING")
        for namespace in COUNTED:
            # Started from the clock (microseconds): a counter row deleted and created again
            # never repeats a value a reader may have seen.
            connection.execute(
                "INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (_changes_row(namespace), int(clock().timestamp() * 1_000_000)))
        connection.execute(
            "UPDATE meta SET value = max(value, (SELECT coalesce(max(counter), 0) FROM locks)) "
            "WHERE name = 'token_floor'")
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except StoreRefused:
        connection.close()
        raise
    except (OSError, sqlite3.Error) as error:
        connection.close()
        raise BackendUnavailable(f"cannot open the embedded store {shown}: {error}") from None
    return connection


_SYNCHRONOUS: dict[Synchronous, str] = {
    "normal": "PRAGMA synchronous=NORMAL", "full": "PRAGMA synchronous=FULL"}


def _refuse_newer(connection: sqlite3.Connection, path: Path) -> None:
    """A file of a layout newer than this version's is refused before anything is written:
    this version cannot read it, and stamping it with its own version would have the newer
    one skip its migration the next time it opens the file."""
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreRefused(
            f"the embedded store {path} has layout version {version}, newer than the "
            f"{SCHEMA_VERSION} of this version of enhanced-locking: a newer version wrote "
            "it; run that version, or restore the copy of the file kept from before it")


def _file_of(path: Path) -> tuple[int, int] | None:
    """The device and inode of the file at ``path`` (``None``: no file there now)."""
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _migrate_from_0(connection: sqlite3.Connection, tables: set[str]) -> None:
    """Version 0 to 2 in the opening transaction: each held lock keeps its key's counter,
    released keys keep theirs in a free row, the ``fencing`` table (and its triggers) goes."""
    if "fencing" not in tables:
        connection.execute(
            "CREATE TABLE fencing (ns TEXT NOT NULL, key TEXT NOT NULL, token INTEGER NOT NULL, "
            "PRIMARY KEY (ns, key))")
    connection.execute(
        "UPDATE meta SET value = max(value, (SELECT coalesce(max(token), 0) FROM fencing)) "
        "WHERE name = 'token_floor'")
    for statement in MIGRATE_FROM_0:
        connection.execute(statement)


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
        synchronous: Synchronous = "normal",
    ) -> None:
        super().__init__(namespace, clock=clock)
        self.path = path
        self._db = open_database(path, initialise=initialise, clock=clock,
                                 synchronous=synchronous)
        self._file = _file_of(path)
        self._floor = int(self._db.execute(
            "SELECT value FROM meta WHERE name = 'token_floor'").fetchone()[0])
        self._depth = 0
        # The cursor of the one-statement grant and release as expected (statements that
        # answer their change count only, so they are done when execute returns): one kept,
        # not one made and freed per statement. Made anew if the connection was replaced.
        self._cursor = self._db.cursor()
        # The last row text seen per key and its decoded lock: decoding is most of a read's
        # cost, and a row read back is usually one this backend just wrote. The text is always
        # read from the file, so another writer's change is never missed.
        self._decoded: dict[str, tuple[str, Lock]] = {}
        # The last counter seen per key and the owner its row was last seen with: the token
        # the next grant of the key most likely gets. A guess only (the statement checks it
        # against the row): see _TAKE_SEEN and _TAKE_MINE.
        self._seen: dict[str, tuple[int, Owner | None]] = {}
        # The lock per key as this backend last granted or read it held, until it releases
        # or reads it free (:meth:`held_as_seen`): a guess, never an answer. Another writer
        # may have changed the row since; a release by its token checks the row's text.
        self._held: dict[str, Lock] = {}
        # A counted namespace (see the module's docstring): what was last read per key (the
        # exclusive row, and the shared rows when they were read), as of ``_as_of``.
        self._counter = _changes_row(namespace) if namespace in COUNTED else None
        self._as_of: int | None = None
        self._known: dict[str, tuple[Lock | None, list[Lock] | None]] = {}

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
    def _snapshot(self) -> Iterator[None]:
        # A read takes no write lock: a deferred transaction reads one snapshot of the file
        # (WAL mode) and writes nothing, so a lookup never waits for, nor holds up, a writer.
        if self._depth:
            yield
            return
        with self._unavailable():
            self._db.execute("BEGIN DEFERRED")
        self._depth += 1
        try:
            with self._unavailable():
                yield
        finally:
            self._depth -= 1
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _unavailable(self) -> Iterator[None]:
        # SQLite failing (closed, locked past busy_timeout, disk full, I/O error, not a
        # database) is the store being unavailable: callers fall back or answer 503.
        try:
            yield
        except sqlite3.Error as error:
            raise self._down(error) from None

    def _down(self, error: sqlite3.Error) -> BackendUnavailable:
        return BackendUnavailable(f"embedded store {self.path}: {error}")

    def _decode(self, key: str, text: str) -> Lock:
        cached = self._decoded.get(key)
        if cached is not None and cached[0] == text:
            return cached[1]
        lock = self._read(key, text)
        self._remember(key, text, lock)
        return lock

    def _remember(self, key: str, text: str, lock: Lock) -> None:
        if len(self._decoded) >= _DECODED_KEYS:
            self._decoded.clear()
            self._seen.clear()
            self._held.clear()
        self._decoded[key] = (text, lock)

    def _kept_cursor(self) -> sqlite3.Cursor:
        """The kept cursor of the one-statement grant and release, made anew if the
        connection was replaced since."""
        cursor = self._cursor
        if cursor.connection is not self._db:
            cursor = self._cursor = self._db.cursor()
        return cursor

    def _load(self, key: str) -> Lock | None:
        row = self._db.execute(
            "SELECT data FROM locks WHERE ns = ? AND key = ? AND held = 1", (self.namespace, key)
        ).fetchone()
        if not row:
            self._held.pop(key, None)
            return None
        lock = self._held[key] = self._decode(key, row[0])
        return lock

    def _store(self, lock: Lock) -> None:
        text = codec.encode(lock)
        # The counter already holds the token (``_next_token`` or ``_raise_token`` came first).
        self._db.execute(
            "INSERT INTO locks (ns, key, repo, pull, data, counter, held) "
            "VALUES (?, ?, ?, ?, ?, ?, 1) ON CONFLICT (ns, key) DO UPDATE SET "
            "repo = excluded.repo, pull = excluded.pull, data = excluded.data, held = 1, "
            "counter = max(counter, excluded.counter)",
            (self.namespace, lock.key, lock.project.repo_full_name, lock.pull.num, text,
             lock.fencing_token),
        )
        self._remember(lock.key, text, lock)
        self._seen[lock.key] = lock.fencing_token, lock.owner
        self._held[lock.key] = lock

    def _take_free(self, candidate: Candidate, times: Times) -> Lock | None:
        # One statement (so one implicit transaction): see _TAKE_FREE, _TAKE_SEEN, _TAKE_MINE.
        key = candidate.key
        owner = candidate.owner
        seen = self._seen.get(key)
        # The router's look at the other side, answered in this statement (see _OTHER_FREE).
        other = other_side_check(key)
        try:  # what _unavailable says, without a context manager per call
            if seen is None:
                # The token is the file's to give: the lock is written with 0, json_set puts
                # the counter in.
                guess = None
                lock = candidate.granted(acquired_at=times[0], expires_at=times[1],
                                         fencing_token=0)
                first = (self.namespace, key, *owner, codec.encode(lock), self._floor + 1)
                row = (self._db.execute(_TAKE_FREE, first) if other is None else
                       self._db.execute(_TAKE_FREE_CHECKED, (*first, other))).fetchone()
            else:
                token = seen[0] + 1
                guess = lock = candidate.granted(acquired_at=times[0], expires_at=times[1],
                                                 fencing_token=token)
                sent = codec.encode(guess)
                mine = seen[1] == owner
                if other is None:
                    args: tuple[object, ...] = (self.namespace, key, *owner, sent, token)
                    expected = _TAKE_MINE_AS_EXPECTED if mine else _TAKE_SEEN_AS_EXPECTED
                    general = _TAKE_MINE if mine else _TAKE_SEEN
                else:
                    args = (self.namespace, key, *owner, sent, token, other)
                    expected = (_TAKE_MINE_AS_EXPECTED_CHECKED if mine
                                else _TAKE_SEEN_AS_EXPECTED_CHECKED)
                    general = _TAKE_MINE_CHECKED if mine else _TAKE_SEEN_CHECKED
                if self._kept_cursor().execute(expected, args).rowcount == 1:
                    self._remember(key, sent, guess)
                    self._seen[key] = token, owner
                    self._held[key] = guess
                    return guess
                row = self._db.execute(general, args).fetchone()
        except sqlite3.Error as error:
            raise self._down(error) from None
        if row is None:
            return None
        counter, text = row
        if guess is not None and counter == guess.fencing_token:
            taken = guess
            text = sent  # the row holds the text sent (the statement answers NULL for it)
        else:
            taken = replaced(lock, fencing_token=counter)
        self._remember(key, text, taken)
        self._seen[key] = counter, owner
        self._held[key] = taken
        return taken

    def _load_shared(self, key: str) -> list[Lock]:
        rows = self._db.execute(
            "SELECT data FROM shared_locks WHERE ns = ? AND key = ? ORDER BY token",
            (self.namespace, key),
        ).fetchall()
        return [self._read(key, row[0]) for row in rows]

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

    def _pop(self, key: str, owner: tuple[str, int] | None
             ) -> Lock | Literal[Stored.NOTHING] | None:
        # One statement, so one implicit transaction: the release of a key nobody waits for.
        if (self._counter is not None and self._known.get(key) == (None, [])
                and self._unchanged(key, Moment(self.clock)) == []):
            # A counted namespace's key that holds nothing, as last read and not changed
            # since: nothing to release, and no write (so no wait for the write lock).
            return Stored.NOTHING
        known = self._decoded.get(key)
        other = other_side_check(key)  # as in _take_free
        try:  # what _unavailable says, without a context manager per call
            cursor = self._kept_cursor()
            if other is None:
                if known is not None and cursor.execute(
                        _POP_AS_EXPECTED if owner is None else _POP_OWNED_AS_EXPECTED,
                        (self.namespace, key, known[0]) if owner is None
                        else (self.namespace, key, *owner, known[0])).rowcount == 1:
                    self._held.pop(key, None)
                    return known[1]  # the row held the text last seen: its lock is released
                if owner is None:
                    row = self._db.execute(_POP, (self.namespace, key)).fetchone()
                else:
                    row = self._db.execute(_POP_OWNED, (self.namespace, key, *owner)).fetchone()
            else:  # the same, each with the other side's condition (its parameters numbered)
                repo, pull = (None, None) if owner is None else owner
                args = (self.namespace, key, repo, pull, None if known is None else known[0],
                        None, other)
                if known is not None and cursor.execute(
                        _POP_AS_EXPECTED_CHECKED if owner is None
                        else _POP_OWNED_AS_EXPECTED_CHECKED, args).rowcount == 1:
                    self._held.pop(key, None)
                    return known[1]
                row = self._db.execute(_POP_CHECKED if owner is None else _POP_OWNED_CHECKED,
                                       args).fetchone()
        except sqlite3.Error as error:
            raise self._down(error) from None
        if row is None:
            return None
        self._held.pop(key, None)
        try:
            return self._decode(key, row[0])
        except LockUnreadable:
            # Freed unread (its owner columns matched): the general path finds it free.
            self.unreadable.cleared(key)
            return None

    def _pop_exactly(self, key: str, owner: Owner, token: int) -> Lock | None:
        # The release as expected of _pop, for the lock last seen only if it is the one asked
        # for: the row's text (which carries the token) must be that lock's, else nothing
        # changes and the general path decides.
        known = self._decoded.get(key)
        if known is None:
            return None
        lock = known[1]
        if lock.fencing_token != token or lock.owner != owner:
            return None
        other = other_side_check(key)  # as in _take_free
        try:
            cursor = self._kept_cursor()
            if other is None:
                changed = cursor.execute(_POP_OWNED_AS_EXPECTED,
                                         (self.namespace, key, *owner, known[0])).rowcount
            else:
                changed = cursor.execute(_POP_OWNED_AS_EXPECTED_CHECKED,
                                         (self.namespace, key, *owner, known[0], None,
                                          other)).rowcount
        except sqlite3.Error as error:
            raise self._down(error) from None
        if changed != 1:
            return None
        self._held.pop(key, None)
        return lock

    def _told_of(self, key: str, token: int) -> Told | None:
        row = self._db.execute(_TOLD_OF, (self.namespace, key)).fetchone()
        if row is None or int(row[0]) != token:
            return None
        try:
            tellers = json.loads(row[1])
        except ValueError:
            tellers = None
        if not isinstance(tellers, list) or not all(isinstance(t, str) for t in tellers):
            # Not written by this store: counted as an answer of someone unknown, who is never
            # taken back (the hold stays), as Redis reads a count it cannot read as one.
            tellers = ["?"]
        return Told(int(row[0]), set(tellers), bool(row[2]))

    def _keep_told(self, key: str, told: Told) -> None:
        if not told.tellers and not told.unheard:  # counts nothing: as no row
            self._db.execute(_FORGET_TOLD, (self.namespace, key))
        else:
            self._db.execute(_KEEP_TOLD, (self.namespace, key, told.token,
                                          json.dumps(sorted(told.tellers)), int(told.unheard)))

    def _count_told(self, key: str, token: int, teller: str) -> None:
        self._db.execute(_PRUNE_TOLD)
        self._db.execute(_COUNT_TOLD, (self.namespace, key, token, teller))

    def held_as_seen(self, key: str) -> Lock | None:
        return self._held.get(key)

    def checks_other_side(self, other: object) -> str | None:
        # The two sides' rows in one file (the same path): a grant or release here can look at
        # the other's rows in its own statement.
        if (isinstance(other, EmbeddedBackend) and other.namespace != self.namespace
                and other.path.resolve() == self.path.resolve()):
            return other.namespace
        return None

    def _other_side_holds(self, namespace: str, key: str) -> bool:
        row = self._db.execute(
            "SELECT EXISTS (SELECT 1 FROM locks WHERE ns = ?1 AND key = ?2 AND held = 1) "
            "OR EXISTS (SELECT 1 FROM shared_locks WHERE ns = ?1 AND key = ?2)",
            (namespace, key)).fetchone()
        return bool(row[0])

    def _delete(self, key: str) -> None:
        self._held.pop(key, None)
        self._db.execute("UPDATE locks SET held = 0 WHERE ns = ? AND key = ? AND held = 1",
                         (self.namespace, key))

    def _purge(self, key: str) -> None:
        # The row stays (it keeps the key's fencing counter), no longer held.
        self._delete(key)
        self._db.execute("DELETE FROM shared_locks WHERE ns = ? AND key = ?",
                         (self.namespace, key))
        self._decoded.pop(key, None)

    def _next_token(self, key: str) -> int:
        row = self._db.execute(
            "INSERT INTO locks (ns, key, repo, pull, data, counter, held) "
            f"VALUES (?, ?, '', 0, '', {_FIRST_TOKEN.format('?')}, 0) "
            "ON CONFLICT (ns, key) DO UPDATE SET counter = counter + 1 RETURNING counter",
            (self.namespace, key, self._floor + 1),
        ).fetchone()
        token = int(row[0])
        self._seen[key] = token, None
        return token

    def _tokens(self) -> dict[str, int]:
        with self._unavailable():
            rows = self._db.execute(
                "SELECT key, counter FROM locks WHERE ns = ? AND counter > 0",
                (self.namespace,)
            ).fetchall()
        return {key: int(token) for key, token in rows}

    def _raise_token(self, key: str, at_least: int) -> None:
        self._db.execute(
            "INSERT INTO locks (ns, key, repo, pull, data, counter, held) "
            "VALUES (?, ?, '', 0, '', ?, 0) "
            "ON CONFLICT (ns, key) DO UPDATE SET counter = max(counter, excluded.counter)",
            (self.namespace, key, at_least),
        )

    def _scan(self, repo: str | None, pull: int | None) -> list[Lock]:
        where = "WHERE ns = ?"
        args: list[str | int] = [self.namespace]
        if repo is not None:
            where, args = where + " AND repo = ?", [*args, repo]
        if pull is not None:
            where, args = where + " AND pull = ?", [*args, pull]
        # Sorted here, not by ORDER BY: SQLite would then walk the primary key (every lock of
        # the namespace, in key order) instead of the by-pull index a filter can use.
        query = (f"SELECT key, data FROM locks {where} AND held = 1 UNION ALL "
                 f"SELECT key, data FROM shared_locks {where}")
        with self._unavailable():
            rows = sorted(self._db.execute(query, [*args, *args]).fetchall(),
                          key=lambda row: row[0])
        return self._read_rows(rows, every=repo is None and pull is None)

    # --- lookups of a counted namespace ----------------------------------------------------------
    def _changes(self) -> int | None:
        """The namespace's change counter (``None``: not counted, or its row is gone)."""
        assert self._counter is not None
        row = self._db.execute(_CHANGES, (self._counter,)).fetchone()
        return None if row is None else int(row[0])

    def _unchanged(self, key: str, now: Callable[[], datetime]) -> list[Lock] | None:
        """``key``'s live holders as last read, if nothing of the namespace changed since;
        ``None`` when they must be read."""
        known = self._known.get(key)
        if known is None or key in self.unreadable:
            return None
        try:
            changes = self._changes()
        except sqlite3.Error as error:
            raise self._down(error) from None
        if changes is None or changes != self._as_of:
            return None
        exclusive, shared = known
        if exclusive is not None and not exclusive.lapsed(now):
            return [exclusive]
        if shared is None:  # not read then: the exclusive lock was live
            return None
        return [lock for lock in shared if not lock.lapsed(now)]

    def _read_holders(self, key: str, now: Callable[[], datetime]) -> list[Lock]:
        """``StoreBackend._holders`` in one snapshot with the change counter, remembered."""
        with self._snapshot():
            changes = self._changes()
            exclusive = self._load(key)
            shared = None
            if exclusive is None or exclusive.lapsed(now):
                shared = self._load_shared(key)
            if key in self.unreadable:
                self._unreadable_change(lambda u: u.readable(key))
        if changes != self._as_of or len(self._known) >= _DECODED_KEYS:
            self._known.clear()
            self._as_of = changes
        if changes is not None:
            self._known[key] = exclusive, shared
        if exclusive is not None and not exclusive.lapsed(now):
            return [exclusive]
        return [lock for lock in shared or () if not lock.lapsed(now)]

    async def get(self, key: str) -> Lock | None:
        if self._counter is None:
            # The common answer, a live exclusive lock, is one statement (a statement is its own
            # snapshot); only a key without one reads its shared locks, in one snapshot with the
            # exclusive row again (the general path).
            if not self._depth and key not in self.unreadable:
                with self._unavailable():
                    lock = self._load(key)
                if lock is not None and not lock.lapsed(self.clock):
                    return lock
            return await super().get(key)
        now = Moment(self.clock)  # one moment for the whole read, if a lock asks for it
        holders = self._unchanged(key, now)
        if holders is None:
            holders = self._read_holders(key, now)
        return holders[0] if holders else None

    async def ping(self) -> None:
        with self._unavailable():
            self._db.execute("SELECT 1").fetchone()
        if _file_of(self.path) != self._file:
            # SQLite keeps the file it opened, which no one will open again: every grant
            # from now on is lost at the next start.
            raise BackendUnavailable(
                f"embedded store {self.path}: the file was deleted or replaced while the "
                "service had it open; what it grants now is lost when it restarts: restart "
                "it (and restore the file, if it was not meant to go)")

    async def close(self) -> None:
        await super().close()
        self._db.close()
