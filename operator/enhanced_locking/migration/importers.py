"""Importers: Atlantis's held locks, moved into the enhanced backend.

Atlantis keeps its project locks in one of two places: the ``runLocks`` bucket of its BoltDB
file (``{data-dir}/atlantis.db``; key = lock key, value = ``ProjectLock`` JSON) or, with
``--locking-db-type=redis``, one Redis string per lock (``pr/{lockKey}`` → the same JSON, no
TTL), on one server or spread over a Redis Cluster's masters. :func:`read_boltdb` and
:func:`read_redis` read those records; :func:`import_locks` writes them into a
:class:`~enhanced_locking.backends.base.Backend` and reports, per lock:

* ``imported``: the key was free; the lock now holds it with a fencing token the target
  backend issued (its ``acquiredAt`` is Atlantis's original ``Time``);
* ``skipped``: the key is already held by the same pull (a previous import, or the pull took
  it again itself), so nothing changes; this is what makes a second run a no-op;
* ``conflict``: another pull holds the key in the target; the import leaves it alone and the
  command exits 1 so a person looks at it;
* ``invalid``: the record could not be read as a lock (not JSON, no repository, ...).

The lock key is recomputed from the JSON with :func:`~enhanced_locking.types.lock_key` (the
path cleaned as Atlantis cleans it), since older Atlantis versions keyed locks without the
project name. Credentials never cross: the codec keeps the pull's URL with any ``user:token@``
removed and, of ``BaseRepo``, only the VCS host and the ``SanitizedCloneURL`` without its
user part (its ``CloneURL`` carries Atlantis's VCS token). The reader of the source is
read-only.
"""

from __future__ import annotations

import enum
import json
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from enhanced_locking.backends import codec
from enhanced_locking.backends.base import Backend
from enhanced_locking.migration import bbolt
from enhanced_locking.types import (
    BackendUnavailable,
    Lock,
    LockUnreadable,
    strip_credentials,
    utcnow,
)

__all__ = [
    "ATLANTIS_LOCKS_BUCKET",
    "ATLANTIS_REDIS_PATTERN",
    "ImportReport",
    "ImportRow",
    "ImportSourceError",
    "Outcome",
    "Progress",
    "SourceRecord",
    "import_locks",
    "read_boltdb",
    "read_redis",
]

ATLANTIS_LOCKS_BUCKET = "runLocks"
ATLANTIS_REDIS_PATTERN = "pr/*"
_REDIS_BATCH = 500


def _go_time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


class ImportSourceError(Exception):
    """The source cannot be read as Atlantis's locks (missing file, not bbolt, bad URL)."""


class Outcome(enum.StrEnum):
    IMPORTED = "imported"
    SKIPPED = "skipped"
    CONFLICT = "conflict"
    INVALID = "invalid"


@dataclass(frozen=True)
class SourceRecord:
    """One lock as Atlantis stored it: its key in Atlantis's store and the raw JSON."""

    source_key: str
    raw: bytes
    problem: str = ""  # why the record could not even be read, if so


# --- reading Atlantis's stores ---------------------------------------------------------------
def read_boltdb(path: str | Path) -> tuple[str, list[SourceRecord]]:
    """Every record of the ``runLocks`` bucket of Atlantis's BoltDB file at ``path``."""
    if not str(path):  # Path("") is the working directory
        raise ImportSourceError("--from-boltdb is empty; expected the path of Atlantis's BoltDB "
                                "file (atlantis.db in its data dir)")
    file = Path(path)
    if not file.exists():
        raise ImportSourceError(f"{file}: no such file")
    if not file.is_file():
        raise ImportSourceError(f"{file}: not a regular file")
    try:
        with bbolt.BoltDB.open(file) as db:
            bucket = db.bucket(ATLANTIS_LOCKS_BUCKET)
            if bucket is None:
                names = ", ".join(b.name.decode(errors="replace") for b in db.buckets())
                raise ImportSourceError(
                    f"{file} is a bbolt file without a {ATLANTIS_LOCKS_BUCKET} bucket (it has: "
                    f"{names or 'no buckets'}); is it Atlantis's atlantis.db?"
                )
            records = [
                SourceRecord(key.decode(errors="replace"), value) for key, value in bucket.items()
            ]
    except (bbolt.BoltFormatError, bbolt.BoltFileLocked) as error:
        raise ImportSourceError(str(error)) from None
    except OSError as error:
        raise ImportSourceError(f"{file}: {error.strerror}") from None
    return f"boltdb file {file}", records


async def _cluster_enabled(client: Any) -> bool:
    """Whether the server at the other end is a Redis Cluster node (``INFO cluster``). A
    server that refuses INFO (an ACL, a renamed command) is read as the one server it is."""
    from redis.exceptions import ResponseError

    try:
        info = await client.info("cluster")
    except ResponseError as error:
        if str(error).startswith(("DB index is out of range", "SELECT is not allowed")):
            raise  # the URL's /N: the caller says so
        return False
    return bool(info.get("cluster_enabled"))


_PASSWORD = "password"
"""The query field redis-py takes a password from (``redis://HOST:PORT/0?password=...``)."""


def _shown_redis_url(url: str) -> str:
    """``url`` as the report and errors name it: without ``user:password@`` and without a
    ``password`` field in its query, the two places redis-py takes a password from.
    ``ValueError`` when it cannot be split."""
    shown = strip_credentials(url)
    parts = urllib.parse.urlsplit(shown)
    if not parts.query:
        return shown
    kept = [pair for pair in parts.query.split("&")
            if urllib.parse.unquote_plus(pair.partition("=")[0]).lower() != _PASSWORD]
    return urllib.parse.urlunsplit(parts._replace(query="&".join(kept)))


async def read_redis(url: str, *, password: str | None = None
                     ) -> tuple[str, list[SourceRecord]]:
    """Every ``pr/*`` string of Atlantis's Redis at ``url`` (SCAN, then GET in pipelines).

    ``password``: Redis's, when ``url`` carries none (a password in the URL wins); given
    apart so that it need not be on the command line.

    Atlantis may keep its locks in a Redis Cluster (its ``ClusterAddresses``), spread over
    the masters by their keys' slots, where a SCAN sees only the node it is sent to: when the
    node at ``url`` is a cluster node, every master is scanned (through any node's address)."""
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster
    from redis.exceptions import RedisError, ResponseError

    try:
        shown = _shown_redis_url(url)
        parts = urllib.parse.urlsplit(url)
    except ValueError as error:  # cannot be split (an unclosed IPv6 bracket)
        if "@" in url or _PASSWORD in urllib.parse.unquote_plus(url).lower():
            # what stands before the "@", or in the query, may be a password: show none of it
            raise ImportSourceError(f"invalid Redis URL (--from-redis; not shown, it may hold "
                                    f"a password): {error}") from None
        raise ImportSourceError(f"invalid Redis URL {url} (--from-redis): {error}") from None
    database = urllib.parse.unquote(parts.path).replace("/", "")
    if parts.scheme in ("redis", "rediss") and database and not (
            database.isascii() and database.isdigit()):
        # redis-py ignores a path that is not a number, and would read database 0 instead
        raise ImportSourceError(f"invalid Redis URL {shown} (--from-redis): the database "
                                f"{database!r} is not a number (redis://HOST:PORT/N)")
    options: dict[str, Any] = {"socket_timeout": 10, "socket_connect_timeout": 5}
    if password and not parts.password:
        options["password"] = password
    try:
        client: Any = aioredis.Redis.from_url(url, **options)
    except ValueError as error:
        raise ImportSourceError(f"invalid Redis URL {shown} (--from-redis): {error}") from None
    records: list[SourceRecord] = []
    try:
        if await _cluster_enabled(client):
            await client.aclose()
            client = RedisCluster.from_url(url, **options)
            shown = f"{shown} (cluster)"
        keys = [key async for key in client.scan_iter(match=ATLANTIS_REDIS_PATTERN, count=1000)]
        keys = sorted(set(keys))  # SCAN may return a key twice
        for start in range(0, len(keys), _REDIS_BATCH):
            batch = keys[start:start + _REDIS_BATCH]
            async with client.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.get(key)
                values = await pipe.execute(raise_on_error=False)
            for key, value in zip(batch, values, strict=True):
                name = key.decode(errors="replace")
                if value is None:
                    continue  # released between SCAN and GET
                if isinstance(value, ResponseError):  # not a string: reported invalid
                    records.append(SourceRecord(name, b"", problem=f"not a string ({value})"))
                    continue
                if isinstance(value, Exception):
                    raise value
                records.append(SourceRecord(name, value))
    except ResponseError as error:
        if str(error).startswith("DB index is out of range"):  # the URL's /N: the user's
            raise ImportSourceError(
                f"invalid Redis URL {shown} (--from-redis): the server has no such database "
                "(DB index is out of range)") from None
        if str(error).startswith("SELECT is not allowed"):
            raise ImportSourceError(
                f"invalid Redis URL {shown} (--from-redis): the server is a Redis Cluster "
                "node, which has database 0 only") from None
        raise BackendUnavailable(f"cannot read Atlantis's Redis at {shown}: {error}") from None
    except RedisError as error:
        raise BackendUnavailable(f"cannot read Atlantis's Redis at {shown}: {error}") from None
    finally:
        await client.aclose()
    return f"redis {shown}", records


# --- the report ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImportRow:
    """What happened to one Atlantis lock."""

    outcome: Outcome
    source_key: str
    key: str = ""
    repo: str = ""
    pull: int | None = None
    workspace: str = ""
    acquired_at: datetime | None = None
    fencing_token: int | None = None
    holder_repo: str | None = None
    holder_pull: int | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        holder = None
        if self.holder_pull is not None:
            holder = {"repo": self.holder_repo, "pull": self.holder_pull}
        return {
            "key": self.key,
            "sourceKey": self.source_key,
            "outcome": self.outcome.value,
            "repo": self.repo,
            "pull": self.pull,
            "workspace": self.workspace,
            "acquiredAt": _go_time(self.acquired_at) if self.acquired_at else None,
            "fencingToken": self.fencing_token,
            "holder": holder,
            "detail": self.detail,
        }


@dataclass
class ImportReport:
    """Every lock read from the source and what the import did (or would do) with it."""

    source: str
    target: str
    dry_run: bool
    rows: list[ImportRow] = field(default_factory=list)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for row in self.rows if row.outcome is outcome)

    @property
    def summary(self) -> dict[str, int]:
        return {
            "read": len(self.rows),
            "imported": self.count(Outcome.IMPORTED),
            "skipped": self.count(Outcome.SKIPPED),
            "conflicts": self.count(Outcome.CONFLICT),
            "invalid": self.count(Outcome.INVALID),
        }

    @property
    def clean(self) -> bool:
        """True when nothing needs a person: no conflict and no unreadable record."""
        return not (self.count(Outcome.CONFLICT) or self.count(Outcome.INVALID))

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "dryRun": self.dry_run,
            "summary": self.summary,
            "locks": [row.as_dict() for row in self.rows],
        }

    def table(self) -> str:
        """The report as a text table, one lock a line, then the counts."""
        verb = "would import" if self.dry_run else "imported"
        title = f"Atlantis locks from {self.source} into the {self.target} backend"
        if self.dry_run:
            title += " (dry run: nothing was written)"
        header = ("KEY", "PULL", "OUTCOME", "DETAIL")
        lines = [
            (
                row.key or row.source_key,
                f"#{row.pull}" if row.pull is not None else "-",
                verb if row.outcome is Outcome.IMPORTED else row.outcome.value,
                row.detail,
            )
            for row in self.rows
        ]
        widths = [max([len(header[i])] + [len(line[i]) for line in lines]) for i in range(3)]
        out = [title, ""]
        for line in [header, *lines]:
            cells = [line[i].ljust(widths[i]) for i in range(3)]
            out.append("  ".join([*cells, line[3]]).rstrip())
        counts = self.summary
        out += ["", f"read {counts['read']}, {verb} {counts['imported']}, "
                    f"skipped {counts['skipped']}, conflicts {counts['conflicts']}, "
                    f"invalid {counts['invalid']}"]
        return "\n".join(out)


# --- progress --------------------------------------------------------------------------------
class Progress:
    """A progress bar on a terminal, a plain line every tenth of the way otherwise."""

    _WIDTH = 30
    _REDRAW = 0.1  # seconds between redraws on a terminal

    def __init__(self, total: int, *, stream: TextIO | None, label: str = "importing",
                 tty: bool | None = None) -> None:
        self.total = total
        self.done = 0
        self.stream = stream
        self.label = label
        self.tty = bool(stream is not None and (stream.isatty() if tty is None else tty))
        self._step = max(1, total // 10)
        self._drawn = 0.0

    def advance(self) -> None:
        self.done += 1
        if self.stream is None:
            return
        if self.tty:
            now = time.monotonic()
            if now - self._drawn >= self._REDRAW or self.done == self.total:
                self._drawn = now
                filled = self._WIDTH * self.done // max(self.total, 1)
                bar = "#" * filled + "-" * (self._WIDTH - filled)
                percent = 100 * self.done // max(self.total, 1)
                self.stream.write(f"\r{self.label} [{bar}] {percent:3d}% {self.done}/{self.total}")
                self.stream.flush()
        elif self.done % self._step == 0 or self.done == self.total:
            self.stream.write(f"{self.label}: {self.done}/{self.total}\n")
            self.stream.flush()

    def finish(self) -> None:
        if self.stream is not None and self.tty and self.total:
            self.stream.write("\n")
            self.stream.flush()


# --- importing -------------------------------------------------------------------------------
def _decode(record: SourceRecord) -> Lock | str:
    """The record as an enhanced lock (no token yet), or why it cannot be one."""
    if record.problem:
        return record.problem
    try:
        data = json.loads(record.raw)
        if not isinstance(data, dict):
            return "not a ProjectLock JSON object"
        lock = codec.from_atlantis_dict(data)
    except json.JSONDecodeError as error:
        return f"not JSON ({error.msg} at character {error.pos})"
    except ValidationError as error:
        # Name the field, never echo the value: it could be anything Atlantis stored.
        first = error.errors()[0]
        return f"{'.'.join(str(part) for part in first['loc'])}: {first['msg']}"
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        return f"not a ProjectLock ({type(error).__name__})"
    return lock.model_copy(update={"backend": "enhanced", "fencing_token": 0})


def _row(outcome: Outcome, record: SourceRecord, lock: Lock, **extra: Any) -> ImportRow:
    return ImportRow(
        outcome=outcome, source_key=record.source_key, key=lock.key,
        repo=lock.project.repo_full_name, pull=lock.pull.num, workspace=lock.workspace,
        acquired_at=lock.acquired_at, **extra,
    )


def _held(outcome: Outcome, record: SourceRecord, lock: Lock, holder: Lock) -> ImportRow:
    if outcome is Outcome.SKIPPED:
        detail = f"already held by this pull (fencing token {holder.fencing_token})"
    else:
        detail = f"held by {holder.project.repo_full_name} #{holder.pull.num}"
    return _row(outcome, record, lock, fencing_token=holder.fencing_token,
                holder_repo=holder.project.repo_full_name, holder_pull=holder.pull.num,
                detail=detail)


async def import_locks(
    records: Iterable[SourceRecord],
    backend: Backend,
    *,
    source: str,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> ImportReport:
    """Import ``records`` into ``backend`` one lock at a time; with ``dry_run`` write nothing.

    Each lock goes through the backend's own atomic acquire: a free key is granted with the
    backend's next fencing token and Atlantis's original time, a key held by the same pull is
    left as it is, a key held by another pull is left as it is and reported. So a second run
    finds every lock already held by its pull and changes nothing.
    """
    report = ImportReport(source=source, target=backend.kind, dry_run=dry_run)
    planned: dict[str, Lock] = {}  # dry run: what earlier records of this run would have taken
    now = utcnow()
    for record in records:
        report.rows.append(await _import_one(record, backend, dry_run, planned, now))
        if progress is not None:
            progress.advance()
    if progress is not None:
        progress.finish()
    return report


async def _import_one(record: SourceRecord, backend: Backend, dry_run: bool,
                      planned: dict[str, Lock], now: datetime) -> ImportRow:
    lock = _decode(record)
    if isinstance(lock, str):
        return ImportRow(outcome=Outcome.INVALID, source_key=record.source_key, detail=lock)
    if lock.expired(now):
        return _row(Outcome.SKIPPED, record, lock,
                    detail=f"expired at {_go_time(lock.expires_at or now)}")
    try:
        return await _take(record, lock, backend, dry_run, planned)
    except LockUnreadable:
        # The target holds something under the key that is not a lock it can read: whose it
        # is cannot be told, so the key is not the import's to take (it is never granted
        # over); the rest of the import goes on.
        return _row(Outcome.CONFLICT, record, lock,
                    detail="the target's stored lock of this key cannot be read (set aside "
                    "until a force-unlock clears it)")


async def _take(record: SourceRecord, lock: Lock, backend: Backend, dry_run: bool,
                planned: dict[str, Lock]) -> ImportRow:
    owner = (lock.project.repo_full_name, lock.pull.num)
    # get() first: it also clears an expired holder, so the acquire below (which judges expiry
    # at Atlantis's original time) sees the key as it is now.
    holder = planned.get(lock.key) if dry_run else None
    holder = holder or await backend.get(lock.key)
    if holder is not None:
        outcome = Outcome.SKIPPED if holder.owned_by(*owner) else Outcome.CONFLICT
        return _held(outcome, record, lock, holder)
    if dry_run:
        planned[lock.key] = lock
        return _row(Outcome.IMPORTED, record, lock, detail="key is free")
    granted, stored = await backend.acquire(lock)
    if not granted:
        return _held(Outcome.CONFLICT, record, lock, stored)
    # A grant is an import: the key was free a moment ago. (Comparing times cannot tell a fresh
    # grant from the same pull's: the Redis backend stamps grants with the server's clock.)
    return _row(Outcome.IMPORTED, record, lock, fencing_token=stored.fencing_token,
                detail=f"fencing token {stored.fencing_token}")

