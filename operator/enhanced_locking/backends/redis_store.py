"""The Redis backend: one lock space shared by every replica of the service.

Every operation that checks and changes is one Lua script (see :mod:`redis_scripts`), so two
replicas can never both grant a key: Redis runs one script at a time. Fencing tokens come from
a per-key counter that only rises (``INCR`` in the acquire script; moved across with
``adopt``). Leases are Redis expiries set from the server's clock, so clock skew between
replicas cannot shorten or stretch a lease.

A held lock is a hash next to Atlantis's JSON (``data``): the owner (``repo``, ``pull``), the
fencing token and the lease end (``exp``) are kept as their own fields because the scripts
decide on them; the JSON's ``Enhanced.FencingToken``/``ExpiresAt`` are not used. When Redis
does not answer, every call raises :class:`~enhanced_locking.types.BackendUnavailable`, which
``/readyz`` reports and the router's fallback acts on.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.commands.core import AsyncScript

from enhanced_locking.backends import codec, redis_scripts
from enhanced_locking.backends.base import Owner
from enhanced_locking.backends.redis_connection import RedisConnection, connect, unavailable
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.types import Lock, LockingError, LockNotOwned, Locks

__all__ = ["RedisBackend", "RedisKeys"]


class RedisKeys:
    """Names of the keys of one namespace under the configured prefix."""

    def __init__(self, prefix: str, namespace: str) -> None:
        self.base = f"{prefix}{namespace}:"
        self.held = self.base + "held"
        self.fenced = self.base + "fenced"

    def lock(self, key: str) -> str:
        return f"{self.base}lock:{{{key}}}"

    def fence(self, key: str) -> str:
        return f"{self.base}fence:{{{key}}}"

    def pull(self, repo: str, pull: int) -> str:
        return f"{self.base}pull:{{{repo}#{pull}}}"


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def _from_ms(value: Any) -> datetime | None:
    ms = int(value or 0)
    return datetime.fromtimestamp(ms / 1000, UTC) if ms else None


def _lease_ms(lock: Lock) -> int:
    if lock.expires_at is None:
        return 0
    return max(1, int((lock.expires_at - lock.acquired_at) / timedelta(milliseconds=1)))


class RedisBackend:
    """Locks of one namespace in Redis; safe to share between any number of replicas."""

    kind = "redis"

    def __init__(self, connection: RedisConnection, *, prefix: str, namespace: str = "enhanced"):
        self.namespace = namespace
        self.connection = connection
        self.keys = RedisKeys(prefix, namespace)
        client = connection.client
        self._acquire: AsyncScript = client.register_script(redis_scripts.ACQUIRE)
        self._release: AsyncScript = client.register_script(redis_scripts.RELEASE)
        self._list: AsyncScript = client.register_script(redis_scripts.LIST)
        self._release_by_pull: AsyncScript = client.register_script(
            redis_scripts.RELEASE_BY_PULL)
        self._refresh: AsyncScript = client.register_script(redis_scripts.REFRESH)
        self._raise_token: AsyncScript = client.register_script(redis_scripts.RAISE_TOKEN)
        self._adopt: AsyncScript = client.register_script(redis_scripts.ADOPT)

    @classmethod
    def from_config(cls, config: EnhancedLockingConfig, namespace: str) -> RedisBackend:
        return cls(connect(config), prefix=config.redis_key_prefix, namespace=namespace)

    def __repr__(self) -> str:
        return f"RedisBackend({self.connection.where}, namespace={self.namespace!r})"

    # --- decoding ------------------------------------------------------------------------
    @staticmethod
    def _lock(key: str, data: str | bytes, token: Any, exp: Any) -> Lock:
        lock = codec.decode(data, key=key)
        return lock.model_copy(update={"fencing_token": int(token), "expires_at": _from_ms(exp)})

    def _locks(self, flat: Sequence[Any]) -> Locks:
        return [self._lock(flat[i], flat[i + 1], flat[i + 2], flat[i + 3])
                for i in range(0, len(flat), 6)]

    # --- the Backend protocol --------------------------------------------------------------
    async def acquire(self, candidate: Lock) -> tuple[bool, Lock]:
        key = candidate.key
        repo, pull = candidate.project.repo_full_name, candidate.pull.num
        stored = candidate.model_copy(update={"fencing_token": 0, "expires_at": None})
        with unavailable(self.connection, "acquire", key=key):
            answer = await self._acquire(
                keys=[self.keys.lock(key), self.keys.fence(key), self.keys.held, self.keys.fenced],
                args=[self.keys.base, key, repo, pull, codec.encode(stored), _lease_ms(candidate)],
            )
        if answer[0] == 1:
            return True, candidate.model_copy(
                update={"fencing_token": int(answer[1]), "expires_at": _from_ms(answer[2])})
        holder = self._lock(key, answer[1], answer[2], answer[3])
        return holder.owned_by(repo, pull), holder

    async def release(self, key: str, *, owner: Owner | None = None) -> Lock | None:
        repo, pull = owner if owner is not None else ("", 0)
        with unavailable(self.connection, "release", key=key):
            answer = await self._release(
                keys=[self.keys.lock(key), self.keys.held],
                args=[self.keys.base, key, repo, pull],
            )
        if answer[0] == 0:
            return None
        lock = self._lock(key, answer[1], answer[2], answer[3])
        if answer[0] == 2:
            raise LockNotOwned(key, lock)
        return lock

    async def get(self, key: str) -> Lock | None:
        with unavailable(self.connection, "get", key=key):
            data, token, exp = await self.connection.client.hmget(
                self.keys.lock(key), ["data", "token", "exp"])
        return None if data is None else self._lock(key, data, token, exp)

    async def list(self, *, repo: str | None = None, pull: int | None = None) -> Locks:
        index = self.keys.held
        if repo is not None and pull is not None:
            index = self.keys.pull(repo, pull)
        with unavailable(self.connection, "list"):
            flat = await self._list(
                keys=[index],
                args=[self.keys.base, repo or "", "" if pull is None else pull],
            )
        return sorted(self._locks(flat), key=lambda lock: lock.key)

    async def release_by_pull(self, repo: str, pull: int) -> Locks:
        with unavailable(self.connection, "release by pull"):
            flat = await self._release_by_pull(
                keys=[self.keys.pull(repo, pull), self.keys.held],
                args=[self.keys.base, repo, pull],
            )
        return sorted(self._locks(flat), key=lambda lock: lock.key)

    async def refresh(self, key: str, owner: Owner, ttl: timedelta) -> Lock:
        lease = max(1, int(ttl / timedelta(milliseconds=1)))
        with unavailable(self.connection, "refresh", key=key):
            answer = await self._refresh(keys=[self.keys.lock(key)], args=[*owner, lease])
        if answer[0] == 0:
            raise LockingError(f"lock {key} is not held (it expired or was released)", key=key)
        lock = self._lock(key, answer[1], answer[2], answer[3])
        if answer[0] == 2:
            raise LockNotOwned(key, lock)
        return lock

    async def export(self) -> tuple[Locks, dict[str, int]]:
        locks = await self.list()
        with unavailable(self.connection, "export"):
            keys = sorted(str(k) for k in await self.connection.client.smembers(self.keys.fenced))
            values = await self.connection.client.mget([self.keys.fence(k) for k in keys]) \
                if keys else []
        return locks, {k: int(v) for k, v in zip(keys, values, strict=True) if v is not None}

    async def adopt(self, locks: Locks, tokens: dict[str, int]) -> Locks:
        conflicts: Locks = []
        with unavailable(self.connection, "adopt"):
            for key, token in tokens.items():
                await self._raise_token(keys=[self.keys.fence(key), self.keys.fenced],
                                        args=[key, token])
            for lock in locks:
                stored = lock.model_copy(update={"fencing_token": 0, "expires_at": None})
                outcome = await self._adopt(
                    keys=[self.keys.lock(lock.key), self.keys.fence(lock.key), self.keys.held,
                          self.keys.fenced],
                    args=[self.keys.base, lock.key, lock.project.repo_full_name, lock.pull.num,
                          codec.encode(stored), lock.fencing_token,
                          _ms(lock.expires_at) if lock.expires_at else 0],
                )
                if outcome == 0:
                    conflicts.append(lock)
        return conflicts

    async def ping(self) -> None:
        with unavailable(self.connection, "ping"):
            await self.connection.client.ping()

    async def close(self) -> None:
        await self.connection.close()
