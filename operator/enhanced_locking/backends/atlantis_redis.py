"""The legacy locker's Redis store, in Atlantis's own layout: ``pr/{lockKey}`` → Atlantis's JSON.

This is exactly what an Atlantis started with ``--locking-db-type=redis`` reads and writes
(``server/core/redis/redis.go``): one string key per lock, no prefix, no expiry, the value being
``models.ProjectLock`` as JSON. Pointed at the same Redis and database, this backend and that
Atlantis share one lock space: a lock taken by either is seen and respected by the other.

One difference, on purpose: Atlantis's ``TryLock`` reads the key and then writes it, so two
Atlantis replicas can both see the key free and both believe they hold it. Ours checks and sets
in one Lua script (:data:`TRY_LOCK`), so it never grants a key twice, including against an
Atlantis whose own write races with it (its ``SET`` would overwrite ours, a race that only
Atlantis can close; the docs say so).

Our JSON is Atlantis's with one extra ``Enhanced`` object, which Go's decoder ignores. There are
no fencing tokens in this layout (Atlantis has none): its locks carry token ``0``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta

from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from enhanced_locking.backends import codec, redis_lua
from enhanced_locking.backends.base import Owner
from enhanced_locking.backends.redis_connection import (
    RedisConnection,
    connect,
    unavailable,
    wrong_type,
)
from enhanced_locking.backends.unreadable import UnreadableLocks
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.types import (
    InvalidRequest,
    Lock,
    LockNotOwned,
    Locks,
    LockUnreadable,
    UnreadableLock,
)

__all__ = ["KEY_PREFIX", "RELEASE_IF_OWNED", "TRY_LOCK", "AtlantisRedisBackend"]

KEY_PREFIX = "pr/"
"""Atlantis's lock keys: ``pr/{repoFullName}/{path}/{workspace}/{projectName}``."""

_SCAN_BATCH = 500
_LIST_TIMEOUT = 60.0  # a scan of every pr/* key takes many calls

TRY_LOCK = redis_lua.standalone("try_lock")
"""Atlantis's ``TryLock`` in one step (``lua/standalone/try_lock.lua``)."""

RELEASE_IF_OWNED = redis_lua.standalone("release_if_owned")
"""Atlantis's ``UnlockIfOwnedByPull``, also checking the repository
(``lua/standalone/release_if_owned.lua``)."""


def _glob_escape(text: str) -> str:
    """``text`` as a literal inside a Redis ``MATCH`` pattern."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


class AtlantisRedisBackend:
    """Legacy locks in Atlantis's Redis layout, shared with a running Atlantis."""

    kind = "redis"

    def __init__(self, connection: RedisConnection, *, namespace: str = "legacy") -> None:
        self.namespace = namespace
        self.connection = connection
        self.unreadable = UnreadableLocks(namespace)
        self._try_lock: AsyncScript = connection.client.register_script(TRY_LOCK)
        self._release_if_owned: AsyncScript = connection.client.register_script(
            RELEASE_IF_OWNED)

    @classmethod
    def from_config(cls, config: EnhancedLockingConfig, namespace: str) -> AtlantisRedisBackend:
        return cls(connect(config), namespace=namespace)

    def __repr__(self) -> str:
        return f"AtlantisRedisBackend({self.connection.where})"

    @staticmethod
    def _name(key: str) -> str:
        return KEY_PREFIX + key

    def _decode(self, name: str, value: str | bytes) -> Lock:
        """The lock stored at ``name``; a value that is not one (another program's key under
        ``pr/`` in a shared Redis) raises ``LockUnreadable`` and is set aside."""
        key = name.removeprefix(KEY_PREFIX)
        try:
            lock = codec.read(value, key=key, side=self.namespace)
        except LockUnreadable as error:
            self.unreadable.found(error.found)
            raise LockUnreadable(error.found, where=name) from None
        self.unreadable.readable(key)
        return lock

    @contextlib.contextmanager
    def _string_at(self, name: str) -> Iterator[None]:
        """Redis refusing a string command on ``name`` (another program keeps a hash, a list...
        there): that key is unreadable, not the store broken."""
        try:
            yield
        except ResponseError as error:
            if not wrong_type(error):
                raise
            raise LockUnreadable(self._foreign(name), where=name) from None

    def _foreign(self, name: str) -> UnreadableLock:
        found = codec.unreadable(name.removeprefix(KEY_PREFIX), b"", None, side=self.namespace,
                                 reason="not a string value (another Redis type)")
        self.unreadable.found(found)
        return found

    def _gone(self, name: str, value: str | bytes) -> Lock | None:
        """The lock a call deleted; ``None`` (and its entry cleared) when it was unreadable."""
        try:
            return self._decode(name, value)
        except LockUnreadable:
            self.unreadable.cleared(name.removeprefix(KEY_PREFIX))
            return None

    async def acquire(self, lock: Lock) -> tuple[bool, Lock]:
        stored = lock.model_copy(update={"fencing_token": 0, "expires_at": None})
        name = self._name(lock.key)
        async with unavailable(self.connection, "acquire", key=lock.key):
            with self._string_at(name):
                answer = await self._try_lock(keys=[name], args=[codec.encode(stored)])
        if answer[0] == 1:
            return True, stored
        holder = self._decode(self._name(lock.key), answer[1])
        return holder.owned_by(lock.project.repo_full_name, lock.pull.num), holder

    async def release(self, key: str, *, owner: Owner | None = None) -> Lock | None:
        name = self._name(key)
        async with unavailable(self.connection, "release", key=key):
            if owner is None:  # whoever holds it, whatever is stored: deleted
                try:
                    with self._string_at(name):
                        value = await self.connection.client.getdel(name)
                except LockUnreadable:
                    await self.connection.client.delete(name)
                    self.unreadable.cleared(key)
                    return None
                return None if value is None else self._gone(name, value)
            with self._string_at(name):
                answer = await self._release_if_owned(keys=[name], args=[*owner])
        if answer[0] == 0:
            self.unreadable.readable(key)
            return None
        if answer[0] == 1:
            return self._gone(name, answer[1])
        lock = self._decode(name, answer[1])
        if answer[0] in (2, 3):
            raise LockNotOwned(key, lock)
        return lock

    async def get(self, key: str) -> Lock | None:
        name = self._name(key)
        async with unavailable(self.connection, "get", key=key):
            with self._string_at(name):
                value = await self.connection.client.get(name)
        if value is None:
            self.unreadable.readable(key)
            return None
        return self._decode(name, value)

    async def _scan(self, repo: str | None) -> Locks:
        # Atlantis scans ``pr*``; keys of one repository start with ``pr/{repo}/``.
        pattern = KEY_PREFIX + (_glob_escape(repo) + "/*" if repo is not None else "*")
        client = self.connection.client
        locks: Locks = []
        bad: list[UnreadableLock] = []
        async with unavailable(self.connection, "list", seconds=_LIST_TIMEOUT):
            names = [str(name) async for name in client.scan_iter(match=pattern, count=_SCAN_BATCH)]
            for start in range(0, len(names), _SCAN_BATCH):
                batch = names[start:start + _SCAN_BATCH]
                values = await client.mget(batch)
                for name, value in zip(batch, values, strict=True):
                    if value is None:  # gone since the scan, or not a string (MGET: nil)
                        if str(await client.type(name)) not in ("none", "string"):
                            bad.append(self._foreign(name))
                        continue
                    try:
                        locks.append(self._decode(name, value))
                    except LockUnreadable as error:
                        bad.append(error.found)  # skipped: the others are still listed
        if repo is None:
            self.unreadable.scanned(bad)
        return locks

    async def list(self, *, repo: str | None = None, pull: int | None = None) -> Locks:
        locks = [lock for lock in await self._scan(repo)
                 if (repo is None or lock.project.repo_full_name == repo)
                 and (pull is None or lock.pull.num == pull)]
        return sorted(locks, key=lambda lock: lock.key)

    async def release_by_pull(self, repo: str, pull: int) -> Locks:
        released: Locks = []
        for lock in await self.list(repo=repo, pull=pull):
            try:
                if (gone := await self.release(lock.key, owner=(repo, pull))) is not None:
                    released.append(gone)
            except LockNotOwned:
                continue  # taken over by another pull since the scan: not ours to release
        return released

    async def refresh(self, key: str, owner: Owner, ttl: timedelta) -> Lock:
        raise InvalidRequest(f"key: {key} is held on the legacy side, whose locks have no lease "
                             "(Atlantis's layout)", field="key", key=key)

    async def export(self) -> tuple[Locks, dict[str, int]]:
        return await self.list(), {}

    async def adopt(self, locks: Locks, tokens: dict[str, int]) -> Locks:
        conflicts: Locks = []
        for lock in locks:
            granted, _ = await self.acquire(lock.model_copy(update={"backend": "legacy"}))
            if not granted:
                conflicts.append(lock)
        return conflicts

    async def ping(self) -> None:
        async with unavailable(self.connection, "ping", login=True):
            await self.connection.client.ping()
        self.connection.answered = True

    async def close(self) -> None:
        await self.connection.close()
