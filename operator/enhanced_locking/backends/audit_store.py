"""Where the audit trail is kept: the active store's own durable place for it.

* SQLite (the embedded ``boltdb`` store): an ``audit`` table in the same file as the locks;
  written behind: the entries of up to 10 ms share one commit, a read writes what waits first.
* Redis: a stream ``{redis-key-prefix}audit``, so every replica writes to and reads one trail.
* etcd (:mod:`~enhanced_locking.backends.etcd_audit`, loaded only where etcd is used): one
  key per entry under ``{etcd-key-prefix}audit/`` named by its time (the id), so every
  replica writes to and reads one trail, and retention by age is one range delete; written
  behind in batches, so an audited call never waits for a consensus write.
* memory: a bounded list (nothing survives the process, like the locks of that store).

Retention is bounded twice: entries older than ``audit-retention`` are dropped, and at most
``audit-max-entries`` are kept of each of two kinds, the oldest of a kind going first: the
entries of refused calls (:data:`~enhanced_locking.types.REFUSALS`: 401 and 403) and all
others, so a flood of refusals (callers with no token) never pushes out what was done.
Pruning runs every :data:`PRUNE_EVERY` appends and once at start. Entries are read newest
first, filtered, in pages: a page's last ``id`` is the ``before`` cursor of the next page.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import heapq
import itertools
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson
import redis.exceptions as rexc

from enhanced_locking.backends import redis_lua
from enhanced_locking.backends.embedded import open_database
from enhanced_locking.backends.redis_connection import (
    COMMAND_TIMEOUT,
    REPLACE_WRITTEN_OVER,
    RedisConnection,
    again_if_written_over,
    connect,
    key_beside,
    within_limit,
    wrong_type,
)
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.types import (
    REFUSALS,
    AuditEntry,
    BackendUnavailable,
    Synchronous,
    utcnow,
)

__all__ = [
    "AuditQuery",
    "AuditStore",
    "MemoryAuditStore",
    "RedisAuditStore",
    "SqliteAuditStore",
    "build_audit_store",
    "entry_json",
]

log = logging.getLogger(__name__)

PRUNE_EVERY = 500

_T = TypeVar("_T")

_last_encoded: tuple[AuditEntry | None, str, str | None] = (None, "", None)


def entry_json(entry: AuditEntry) -> str:
    """``entry.model_dump_json(by_alias=True)``, the text the trail keeps of an entry. The
    last one made is kept: a store encodes the entry it stored and returns, and the trail's
    stdout line is the same text of the same (frozen) object, made once.

    Written by orjson from the entry's fields, its time in RFC 3339 with a ``Z``: the same
    text (strings, numbers, null and a list of strings, compact; a test compares the two for every
    kind of value), where pydantic's serializer and its wrapper ran about 24k instructions,
    twice per lock pair. An entry whose time is not in UTC (none the service makes) is
    pydantic's."""
    return _encoded(entry)[0]


def _encoded(entry: AuditEntry) -> tuple[str, str | None]:
    """:func:`entry_json` of ``entry``, and the text of its time in it (isoformat's with ``Z``
    for ``+00:00``; None for a time not in UTC): the store's ``time`` column is the same text
    with isoformat's ``+00:00`` for the ``Z``, so an entry's time is written out once."""
    global _last_encoded
    last, text, time_text = _last_encoded
    if last is entry:
        return text, time_text
    fields = entry.__dict__  # the model's fields, in their order
    if fields["time"].tzinfo is not UTC:
        text, time_text = entry.model_dump_json(by_alias=True), None
    else:
        # The fields as they are, the time written by orjson as RFC 3339 with its Z (as
        # utc_text writes it); request_id, the last field, is the one whose alias is another
        # name. An unescaped quote is never inside a JSON string, so the last '"request_id":'
        # is its key and the first ',"time":"' starts the time's text. (A dict of the fields
        # made with their aliases and utc_text's time cost about 17k instructions an entry.)
        text = orjson.dumps(fields, option=orjson.OPT_UTC_Z).decode()
        head, _, value = text.rpartition('"request_id":')
        text = head + '"requestId":' + value
        start = text.index(',"time":"') + 9
        time_text = text[start:text.index('"', start)]
    _last_encoded = (entry, text, time_text)
    return text, time_text


def _handed_out(entry: AuditEntry, handed_out: str) -> bool:
    """Whether ``entry`` was built with ``handed_out``, the id a store's ``new_id`` handed out
    last (``""`` when none waits: each append takes it back). Only that one id is taken as
    it is, so two entries never share an id and a store's entries keep their order, whatever
    else was appended between an id's hand-out and its entry's append."""
    return bool(handed_out) and entry.__dict__["id"] == handed_out


def _stored(text: str | bytes | None, *, entry_id: str | None, where: str) -> AuditEntry | None:
    """The entry stored as ``text`` (with ``entry_id``, where the place gives the id), or
    ``None`` when it does not read: something else wrote into the trail's place. That is
    logged each time a read meets it, with where it is and never what it holds."""
    if text is not None:
        try:
            entry = AuditEntry.model_validate_json(text)
        except ValueError:
            pass
        else:
            return entry if entry_id is None else entry.model_copy(update={"id": entry_id})
    log.warning("an audit entry in %s (id %s) does not read (written by something else?): "
                "left out of the trail's reads", where, entry_id or "in its key")
    return None


_SCAN_CHUNK = 500
_REDIS_ID = re.compile(r"[0-9]{1,19}(-[0-9]{1,19})?")
"""A stream id (``<ms>-<seq>``, or ``<ms>`` alone), each part below 2**64."""
_ETCD_ID = re.compile(r"[0-9]{16}-[0-9a-f]{1,18}")
"""An etcd entry's id: its time in µs (16 digits) and a random part in hex."""
_ETCD_LAST_MICROS = 10**16 - 1

_REFUSAL = "(" + " OR ".join(f"outcome = {outcome!r}" for outcome in sorted(REFUSALS)) + ")"
"""The rows of refusals (:data:`~enhanced_locking.types.REFUSALS`), as SQL: the condition of
the two partial indexes each row is written to, so a comparison per outcome. (SQLite evaluates
``outcome IN (...)`` of more than two values through a temporary table it fills for each row
and each index: about 23k instructions a row, half of what writing the row cost.)"""

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, identity TEXT NOT NULL,
    verb TEXT NOT NULL, action TEXT NOT NULL, key TEXT, repo TEXT, pull INTEGER,
    outcome TEXT NOT NULL, data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (time);
DROP INDEX IF EXISTS audit_refusals;
DROP INDEX IF EXISTS audit_others;
CREATE INDEX IF NOT EXISTS audit_refusal_ids ON audit (id) WHERE {_REFUSAL};
CREATE INDEX IF NOT EXISTS audit_other_ids ON audit (id) WHERE NOT {_REFUSAL};
"""
"""The audit table and its indexes. ``audit_refusals`` and ``audit_others`` were the two
partial indexes by kind with ``outcome IN (...)`` as their condition: a file that has them
gets the two of today in their place when a store opens it."""

_INSERT = ("INSERT INTO audit (id, time, identity, verb, action, key, repo, pull, outcome, "
           "data) VALUES ")
_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


@functools.cache
def _insert(rows: int) -> str:
    """One ``INSERT`` of ``rows`` rows (see :meth:`SqliteAuditStore._write_waiting`)."""
    return _INSERT + ", ".join([_ROW] * rows)


@dataclass(frozen=True)
class AuditQuery:
    """Filters of a read (each optional, all must match) and the page to read."""

    identity: str | None = None
    verb: str | None = None
    action: str | None = None
    key: str | None = None
    repo: str | None = None
    pull: int | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    before: str | None = None
    limit: int = 100

    def __post_init__(self) -> None:
        # Each store is given its time bounds in UTC (the embedded one compares its time
        # column as text): a time in any offset is the instant it names, one without an
        # offset is UTC.
        object.__setattr__(self, "since", _in_utc(self.since, lower=True))
        object.__setattr__(self, "until", _in_utc(self.until, lower=False))

    def matches(self, entry: AuditEntry) -> bool:
        wanted: dict[str, Any] = {
            "identity": self.identity, "verb": self.verb, "action": self.action,
            "key": self.key, "repo": self.repo, "pull": self.pull, "outcome": self.outcome,
        }
        if any(value is not None and getattr(entry, name) != value
               for name, value in wanted.items()):
            return False
        if self.since is not None and entry.time < self.since:
            return False
        return self.until is None or entry.time < self.until


def _in_utc(moment: datetime | None, *, lower: bool) -> datetime | None:
    """``moment`` in UTC. Beyond what a UTC time can hold (year 1 east of Greenwich, 9999 west
    of it): a lower bound before every time bounds nothing (None), one after every time is the
    last; an upper bound likewise, the other way round."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        before_all = moment.year == datetime.min.year
        if before_all == lower:
            return None
        return (datetime.min if before_all else datetime.max).replace(tzinfo=UTC)


class AuditStore(Protocol):
    """Appends entries durably and reads them back newest first."""

    @property
    def dropped(self) -> int:
        """Entries appended and then lost before they were written: more waited than the
        store holds while its place refused writes (the oldest go)."""
        ...

    @property
    def waiting(self) -> int:
        """Entries appended and not written yet (a store that writes behind)."""
        ...

    def new_id(self, time: datetime) -> str:
        """The id of the entry of ``time`` about to be appended, handed out before the entry
        is built, so that it is built once, with its id (the audited calls' entries); ``""``
        where the store learns an entry's id only as it writes it (Redis: the stream gives
        it)."""
        ...

    async def append(self, entry: AuditEntry) -> AuditEntry:
        """``entry`` stored, with its id: ``entry`` itself when it was built with the id
        :meth:`new_id` handed out last, nothing appended since (see :func:`_handed_out`);
        else (an entry built without an id, or with one this store did not hand out for it)
        a copy with the id the store gives it."""
        ...

    async def read(self, query: AuditQuery) -> list[AuditEntry]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Retention:
    max_age: timedelta
    max_entries: int


class SqliteAuditStore:
    """The ``audit`` table of the embedded store's file, written behind.

    An entry gets its id at once and joins a batch; one timer writes the entries of up to
    :attr:`coalesce` seconds in one transaction (the etcd store's trade, for the same reason:
    a commit of its own per entry cost more than the lock call it records). A read writes
    what is waiting first, so it sees every entry appended before it; closing the store
    writes the rest. What a process killed outright (``kill -9``) loses is its last
    :attr:`coalesce` seconds of entries, from this table only: stdout has them already.

    Ids are taken from a block reserved in the file (the ``AUTOINCREMENT`` sequence moved
    :attr:`id_block` ahead in one small write), so an id is known before its row is written
    and never given twice, also with several processes on one file (their entries then
    interleave by blocks, not one by one). Closing gives the block's unused ids back; a
    process killed outright leaves them unused (a gap in the ids, nothing more).
    """

    kind = "sqlite"
    coalesce = 0.01
    batch_limit = 500
    capacity = 10_000
    id_block = 100
    retry_first, retry_max = 0.05, 2.0
    report_every = 60.0

    def __init__(self, path: Path, retention: Retention, *,
                 synchronous: Synchronous = "normal") -> None:
        self._db = open_database(path, synchronous=synchronous)
        try:
            self._db.executescript(SCHEMA)
        except sqlite3.Error as error:
            self._db.close()
            raise BackendUnavailable(f"cannot open the audit trail in {path}: {error}") from None
        self._retention = retention
        self._appended = 0
        self._next_id = 1
        self._last_id = 0  # the reserved block is _next_id .. _last_id
        self._handed_out, self._handed_out_row = "", 0  # new_id's last, not appended yet
        self._rows: collections.deque[tuple[Any, ...]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._retry = self.retry_first
        self.dropped = 0
        """Entries lost because the file refused writes longer than :attr:`capacity` lasted."""
        self._refused: tuple[float, int, float] | None = None
        """While the file refuses writes: since when (monotonic), the entries dropped before,
        and when the last line about it was logged."""
        try:
            self._prune()
        except sqlite3.Error as error:
            self._db.close()
            raise BackendUnavailable(f"cannot open the audit trail in {path}: {error}") from None

    @property
    def waiting(self) -> int:
        return len(self._rows)

    def _prune(self) -> None:
        cutoff = (utcnow() - self._retention.max_age).isoformat()
        self._db.execute("DELETE FROM audit WHERE time < ?", (cutoff,))
        # Each kind within its own bound, found in its own index (audit_refusal_ids,
        # audit_other_ids: a kind's rows are not read). With 100,000 of each, about 25 ms
        # every 500 entries.
        for rows in (_REFUSAL, f"NOT {_REFUSAL}"):
            # Ids are distinct whole numbers, so a kind whose oldest and newest ids are less
            # than the bound apart holds no more rows than it: nothing to delete, seen at its
            # index's two ends (microseconds) rather than by counting the bound's rows down
            # from the newest (about 1 ms per 30,000 rows, every PRUNE_EVERY entries).
            oldest, newest = self._db.execute(
                f"SELECT (SELECT min(id) FROM audit WHERE {rows}), "
                f"(SELECT max(id) FROM audit WHERE {rows})").fetchone()
            if oldest is None or newest - oldest < self._retention.max_entries:
                continue
            self._db.execute(
                f"DELETE FROM audit WHERE {rows} AND id <= (SELECT id FROM audit WHERE {rows} "
                "ORDER BY id DESC LIMIT 1 OFFSET ?)", (self._retention.max_entries,))

    def _reserve(self) -> None:
        """Move the file's id sequence a block ahead and take that block."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'audit'),"
                    " 0), coalesce((SELECT max(id) FROM audit), 0))").fetchone()
                first = int(row[0]) + 1
                last = first + self.id_block - 1
                if self._db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'audit'",
                                    (last,)).rowcount == 0:
                    self._db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('audit', ?)",
                                     (last,))
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as error:
            raise BackendUnavailable(f"cannot write the audit trail: {error}") from None
        self._next_id, self._last_id = first, last

    def new_id(self, time: datetime) -> str:
        """The next id of the reserved block (a new block reserved when it is used up)."""
        if self._next_id > self._last_id:
            self._reserve()
        row_id, self._next_id = self._next_id, self._next_id + 1
        text = str(row_id)
        self._handed_out, self._handed_out_row = text, row_id
        return text

    async def append(self, entry: AuditEntry) -> AuditEntry:
        """The entry with its id; its row is written behind (see the class)."""
        handed_out = self._handed_out  # _handed_out() written out: every audited call
        if handed_out and entry.__dict__["id"] == handed_out:
            stored = entry
        else:
            stored = entry.with_id(self.new_id(entry.time))
        row_id, self._handed_out = self._handed_out_row, ""
        if len(self._rows) >= self.capacity:
            self._rows.popleft()
            if self._refused is not None and self.dropped == self._refused[1]:
                log.error("%d audit entries wait to be written, the most this store holds: "
                          "the oldest go from the trail from now on (each went to stdout; "
                          "counted in enhanced_locking_audit_entries_lost_total)", self.capacity)
            self.dropped += 1
        fields = stored.__dict__  # not through the model's attribute hook
        text, time_text = _encoded(stored)
        # The time column is isoformat's text (pruning and the time filters compare it as
        # text): for a time in UTC, the JSON's time with isoformat's +00:00 for its Z.
        self._rows.append((row_id, fields["time"].isoformat() if time_text is None
                           else time_text[:-1] + "+00:00",
                           fields["identity"], fields["verb"], fields["action"], fields["key"],
                           fields["repo"], fields["pull"], fields["outcome"], text))
        self._schedule(self.coalesce)
        return stored

    def _schedule(self, delay: float) -> None:
        # A timer waiting on a loop that runs is the appending loop's (a store is used from
        # one loop at a time): nothing to ask. Asking for the running loop costs a system call
        # (Python 3.11 compares the process id on every call, its check for a fork), one per
        # entry, where a timer is made once per window.
        waiting_on = self._timer_loop
        if self._timer is not None and waiting_on is not None and waiting_on.is_running():
            return
        loop = asyncio.get_running_loop()
        # A timer of a loop that is gone (a test's loop, say) never fires: one on this loop.
        if self._timer is None or waiting_on is not loop or loop.is_closed():
            self._timer, self._timer_loop = loop.call_later(delay, self._flush), loop

    def _flush(self) -> None:
        self._timer = None
        waiting = len(self._rows)
        try:
            self._write_waiting()
        except sqlite3.Error as error:
            self._not_written(error)
            with contextlib.suppress(RuntimeError):
                self._schedule(self._retry)
            self._retry = min(self.retry_max, self._retry * 2)
            return
        self._retry = self.retry_first
        if self._refused is not None:
            since, dropped_before, _ = self._refused
            self._refused = None
            log.warning("audit entries written again after %.1f s of refused writes: %d that "
                        "waited are in the trail, %d were dropped meanwhile", time.monotonic()
                        - since, waiting, self.dropped - dropped_before)

    def _not_written(self, error: sqlite3.Error) -> None:
        """A write refused: logged when it starts, then at most every :attr:`report_every`
        seconds while it lasts (the store retries every :attr:`retry_max` seconds)."""
        now = time.monotonic()
        if self._refused is None:
            self._refused = (now, self.dropped, now)
            log.warning("audit entries not written (%s): %d wait, written when the file takes "
                        "writes again (retrying)", error, len(self._rows))
        elif now - self._refused[2] >= self.report_every:
            since, dropped_before, _ = self._refused
            self._refused = (since, dropped_before, now)
            log.warning("audit entries still not written after %.0f s (%s): %d wait, %d dropped",
                        now - since, error, len(self._rows), self.dropped - dropped_before)

    def _write_waiting(self) -> None:
        """Write every waiting row, up to :attr:`batch_limit` per transaction (rows leave the
        batch only once committed)."""
        while self._rows:
            batch = list(itertools.islice(self._rows, self.batch_limit))
            self._db.execute("BEGIN IMMEDIATE")
            try:
                # One INSERT per power of two in the batch's size, largest first (23 rows:
                # 16, 4, 2, 1): a statement of many rows costs SQLite about a third less per
                # row than a statement per row (the AUTOINCREMENT sequence is read and
                # checked once per statement), and any batch uses at most nine statement
                # texts, which stay prepared in the connection's statement cache.
                done, rows = 0, len(batch)
                while done < rows:
                    size = 1 << ((rows - done).bit_length() - 1)
                    self._db.execute(_insert(size), batch[done] if size == 1 else list(
                        itertools.chain.from_iterable(batch[done:done + size])))
                    done += size
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            for _ in batch:
                self._rows.popleft()
            before, self._appended = self._appended, self._appended + len(batch)
            if before // PRUNE_EVERY != self._appended // PRUNE_EVERY:
                self._prune()

    def _written(self) -> None:
        """Write what is waiting now (a read must see it); ``BackendUnavailable`` if not."""
        try:
            self._write_waiting()
        except sqlite3.Error as error:
            raise BackendUnavailable(f"cannot write the audit trail: {error}") from None

    async def read(self, query: AuditQuery) -> list[AuditEntry]:
        self._written()
        clauses, params = [], []
        for column in ("identity", "verb", "action", "key", "repo", "pull", "outcome"):
            value = getattr(query, column)
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if query.since is not None:
            clauses.append("time >= ?")
            params.append(query.since.isoformat())
        if query.until is not None:
            clauses.append("time < ?")
            params.append(query.until.isoformat())
        before = int(query.before) if query.before is not None else None
        found: list[AuditEntry] = []
        while len(found) < query.limit:  # again past rows that do not read, if any
            bound = ["id < ?"] if before is not None else []
            where = f"WHERE {' AND '.join(clauses + bound)}" if clauses or bound else ""
            wanted = query.limit - len(found)
            try:
                rows = self._db.execute(
                    f"SELECT id, data FROM audit {where} ORDER BY id DESC LIMIT ?",
                    (*params, *([before] if before is not None else []), wanted),
                ).fetchall()
            except sqlite3.Error as error:
                raise BackendUnavailable(f"cannot read the audit trail: {error}") from None
            for row_id, data in rows:
                entry = _stored(data, entry_id=str(row_id), where="the audit table")
                if entry is not None:
                    found.append(entry)
            if len(rows) < wanted:
                break
            before = rows[-1][0]
        return found

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:  # appended, not yet written: written now; the ids left over are given back
            self._written()
            if self._next_id <= self._last_id:
                self._db.execute("UPDATE sqlite_sequence SET seq = ? "
                                 "WHERE name = 'audit' AND seq = ?",
                                 (self._next_id - 1, self._last_id))
        except (BackendUnavailable, sqlite3.Error) as error:
            log.error("%d audit entries not written: %s", len(self._rows), error)
        self._db.close()


APPEND_AUDIT_ENTRY = redis_lua.standalone("append_audit_entry")
"""An entry appended to the stream, which is trimmed so that refusals never push out the
other entries (``lua/standalone/append_audit_entry.lua``)."""

PRUNE_AUDIT = redis_lua.standalone("prune_audit")
"""The stream pruned by age, the refusals' ids of the entries it removes with it
(``lua/standalone/prune_audit.lua``)."""


class RedisAuditStore:
    """A stream shared by every replica; its ids (``<ms>-<seq>``) are the cursors.

    The ids of the refusals it holds are listed beside it (:func:`key_beside`), so that an
    append keeps at most ``audit-max-entries`` of them and trims the stream to that many more
    than the list holds: at least ``audit-max-entries`` of the other entries stay. The prune
    by age (:data:`PRUNE_AUDIT`) takes the ids of the entries it removes out of the list.

    Its key written over by something else (another Redis type) is replaced by a new stream
    at the first append or read that meets it, which logs it: the entries the old stream held
    are gone (something else deleted them), the call is served from the new one.
    """

    kind = "redis"
    dropped = 0  # written as appended: an entry Redis refuses is refused to the trail
    waiting = 0

    def __init__(self, connection: RedisConnection, stream: str, retention: Retention) -> None:
        self._connection = connection
        self._stream = stream
        self._retention = retention
        self._refusals = key_beside(stream, "refusals", "ids")
        self._appended = 0
        self._replace = connection.client.register_script(REPLACE_WRITTEN_OVER)
        self._append = connection.client.register_script(APPEND_AUDIT_ENTRY)
        self._prune_script = connection.client.register_script(PRUNE_AUDIT)

    async def _call(self, action: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """``call``, made again on a new stream when the trail's key holds another Redis type;
        a failure is ``BackendUnavailable`` saying the trail could not be ``action``, and so
        is no answer within the call's limit (the connections have no timeout of their own:
        a Redis that took the call and never answers, stopped or on a hung host, held the
        audited call's answer until it woke)."""
        try:
            return await within_limit(
                again_if_written_over(self._replace, self._stream, "stream", call,
                                      self._replaced), counted=self._connection.counted)
        except TimeoutError:
            raise BackendUnavailable(f"cannot {action} the audit trail: no answer within the "
                                     f"call's {COMMAND_TIMEOUT:g} s limit") from None
        except (rexc.RedisError, OSError) as error:
            why = (f"{self._stream} is of another Redis type again (written over by something "
                   "else)" if isinstance(error, rexc.ResponseError) and wrong_type(error)
                   else error)
            raise BackendUnavailable(f"cannot {action} the audit trail: {why}") from None

    def _replaced(self, kind: str) -> None:
        log.warning("the audit trail %s was not a stream (Redis type %s; written over by "
                    "something else?): replaced by a new stream; the entries it held are gone "
                    "(each went to stdout as it was written, with enhanced-locking-audit-stdout "
                    "on)", self._stream, kind)

    async def _prune(self) -> None:
        cutoff = int((utcnow() - self._retention.max_age).timestamp() * 1000)
        await self._prune_script(keys=[self._stream, self._refusals], args=[cutoff])

    def new_id(self, time: datetime) -> str:
        """None handed out: the stream gives an entry its id as it appends it."""
        return ""

    async def append(self, entry: AuditEntry) -> AuditEntry:
        """The entry appended by :data:`APPEND_AUDIT_ENTRY` (one round trip), with the id the
        stream gave it."""
        args: list[str | int] = [entry_json(entry), self._retention.max_entries,
                                 int(entry.refusal)]
        entry_id = await self._call("write", lambda: self._append(
            keys=[self._stream, self._refusals], args=args))
        self._appended += 1
        if self._appended % PRUNE_EVERY == 1:
            await self._call("write", self._prune)
        return entry.with_id(str(entry_id))

    async def read(self, query: AuditQuery) -> list[AuditEntry]:
        return await self._call("read", lambda: self._read(query))

    async def _read(self, query: AuditQuery) -> list[AuditEntry]:
        found: list[AuditEntry] = []
        top = "+"
        if query.before is not None:
            if not _REDIS_ID.fullmatch(query.before):
                raise ValueError(f"not a stream id: {query.before!r}")
            if not query.before.strip("0-"):
                return found  # nothing is before the lowest id (and Redis refuses "(0-0")
            top = f"({query.before}"
        # The stream's ids start at 0 (1970): an earlier bound is no bound.
        since = 0 if query.since is None else int(query.since.timestamp() * 1000)
        bottom = "-" if since <= 0 else str(since)
        while len(found) < query.limit:
            chunk = await self._connection.client.xrevrange(
                self._stream, max=top, min=bottom, count=_SCAN_CHUNK)
            if not chunk:
                break
            for entry_id, fields in chunk:
                # The connection decodes replies: ids and fields are str.
                entry = _stored((fields or {}).get("e"), entry_id=str(entry_id),
                                where=self._stream)
                if entry is not None and query.matches(entry):
                    found.append(entry)
                    if len(found) == query.limit:
                        break
            top = "(" + str(chunk[-1][0])
        return found

    async def close(self) -> None:
        await self._connection.close()


def _micros(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


class MemoryAuditStore:
    """The newest entries in memory (the ``memory`` store keeps nothing after exit either)."""

    kind = "memory"
    dropped = 0
    waiting = 0

    def __init__(self, retention: Retention) -> None:
        self._kinds: tuple[collections.deque[AuditEntry], ...] = tuple(
            collections.deque(maxlen=retention.max_entries) for _ in range(2))
        """The other entries, then the refusals: each kind within its own bound."""
        self._retention = retention
        self._next = 1
        self._handed_out = ""  # the id new_id handed out last, not appended yet

    def new_id(self, time: datetime) -> str:
        self._handed_out = text = str(self._next)
        self._next += 1
        return text

    async def append(self, entry: AuditEntry) -> AuditEntry:
        stored = entry if _handed_out(entry, self._handed_out) else entry.with_id(
            self.new_id(entry.time))
        self._handed_out = ""
        self._kinds[stored.refusal].append(stored)
        cutoff = utcnow() - self._retention.max_age
        for entries in self._kinds:
            while entries and entries[0].time < cutoff:
                entries.popleft()
        return stored

    async def read(self, query: AuditQuery) -> list[AuditEntry]:
        before = int(query.before) if query.before is not None else None
        out = []
        for entry in heapq.merge(*map(reversed, self._kinds), key=lambda e: -int(e.id)):
            if before is not None and int(entry.id) >= before:
                continue
            if query.matches(entry):
                out.append(entry)
                if len(out) == query.limit:
                    break
        return out

    async def close(self) -> None:
        await asyncio.sleep(0)


def build_audit_store(config: EnhancedLockingConfig) -> AuditStore:
    """The store the locks are kept in decides where the trail is kept: Redis first, then
    etcd (both shared by every replica), then the embedded file, else memory."""
    retention = Retention(config.audit_retention, config.audit_max_entries)
    uses = {config.legacy_backend, *((config.backend,) if config.enabled else ())}
    if "redis" in uses:
        return RedisAuditStore(connect(config), f"{config.redis_key_prefix}audit", retention)
    if "etcd" in uses:
        # (etcd's client and gRPC are loaded only for a service that uses etcd)
        from enhanced_locking.backends.etcd_audit import EtcdAuditStore
        from enhanced_locking.backends.etcd_connection import EtcdConnection, EtcdSettings

        return EtcdAuditStore(EtcdConnection(EtcdSettings.from_config(config)),
                              config.etcd_key_prefix, retention)
    if "boltdb" in uses:
        return SqliteAuditStore(config.data_path, retention,
                                synchronous=config.store_synchronous)
    return MemoryAuditStore(retention)
