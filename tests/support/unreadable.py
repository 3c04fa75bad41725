"""Stored locks made unreadable behind a backend's back, the way a careless person or another
program would: the bytes under a lock's key replaced with something that is not a lock.

``spoil(backend, key, raw)`` rewrites what the backend stores for ``key``'s holder (which must
be held, so every index the store keeps beside it stays as it was) with ``raw``, writing to
the real store directly: the SQLite file through its own connection, Redis and etcd through
their clients.

The Redis store keeps more than bytes: its holder is a hash beside the JSON, a shared holder a
record in a hash. ``REDIS_SPOILERS`` are what can go wrong there (another Redis type at the
lock's key, a hash without its fields, a shared holder's record that does not decode); each is
a row of the same behaviour table, on one Redis and on a Redis Cluster.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from enhanced_locking.backends import Backend, EmbeddedBackend, codec
from enhanced_locking.backends.atlantis_redis import KEY_PREFIX, AtlantisRedisBackend
from enhanced_locking.backends.etcd_store import EtcdBackend
from enhanced_locking.backends.redis_store import RedisBackend

__all__ = [
    "REDIS_SPOILERS", "SECRET", "SPOILED", "Spoiler", "data_spoiler", "spoil", "spoil_count",
    "spoil_file",
]

SECRET = "ghp_s3cr3tT0ken"
"""Planted inside the bad values: it must never come back in any answer, event or log."""

SPOILED: list[tuple[str, str]] = [
    ("not-json", f"token={SECRET} and no JSON"),
    ("json-list", f'["{SECRET}"]'),
    ("wrong-shape", f'{{"Project": "{SECRET}", "Pull": {{"Num": "{SECRET}"}}}}'),
]
"""(name, value) of the kinds of bad values the tests plant."""


def spoil_file(path: str, namespace: str, key: str, raw: str) -> None:
    """Replace the stored JSON of ``key`` in an embedded store file (the service may be
    running or not: SQLite takes the write lock)."""
    with sqlite3.connect(path) as db:
        changed = db.execute("UPDATE locks SET data = ? WHERE ns = ? AND key = ?",
                             (raw, namespace, key)).rowcount
    assert changed == 1, f"{key} is not held in {path}"


async def spoil(backend: Backend, key: str, raw: str) -> None:
    """Replace what ``backend`` stores for ``key``'s (held) lock with ``raw``."""
    if isinstance(backend, EmbeddedBackend):
        spoil_file(str(backend.path), backend.namespace, key, raw)
    elif isinstance(backend, RedisBackend):
        redis = backend.connection.client
        assert await redis.exists(backend.keys.lock(key)), f"{key} is not held"
        await redis.hset(backend.keys.lock(key), "data", raw)
    elif isinstance(backend, AtlantisRedisBackend):
        await backend.connection.client.set(KEY_PREFIX + key, raw)
    elif isinstance(backend, EtcdBackend):
        etcd = await backend.connection.client()
        assert etcd.kv is not None
        name = backend.lock_key(key)
        assert (await etcd.kv.get(name)).kvs, f"{key} is not held"
        await etcd.kv.put(name, raw.encode())
    else:
        raise AssertionError(f"{type(backend).__name__} keeps no bytes that could be spoiled")


async def spoil_count(backend: Backend, key: str, token: int,
                      shared_by: tuple[str, int] | None = None) -> None:
    """Replace the count of answers given with ``key``'s held hold with fencing token
    ``token`` (exclusive; ``shared_by``: that owner's shared hold) by something that is not a
    count, where each store keeps it: the embedded store's ``told`` row (tellers not a JSON
    array), the Redis hash's ``told`` field (not a number) or a shared holder's record's count
    (its 13th place), the etcd record's ``Told`` field (not an object). The lock itself stays
    readable."""
    spoiled = f"token={SECRET}"
    if isinstance(backend, EmbeddedBackend):
        with sqlite3.connect(backend.path) as db:
            db.execute("INSERT OR REPLACE INTO told VALUES (?, ?, ?, ?, 0)",
                       (backend.namespace, key, token, spoiled))
    elif isinstance(backend, RedisBackend) and shared_by is not None:
        redis, name = backend.connection.client, backend.keys.shared(key)
        field = f"{shared_by[0]}#{shared_by[1]}"
        text = await redis.hget(name, field)
        assert text is not None, f"{key} is not held shared by {shared_by}"
        record = json.loads(text)
        assert int(record[2]) == token, f"{key}'s shared hold is not token {token}: {record}"
        record += [False] * (13 - len(record))
        record[12] = spoiled
        await redis.hset(name, field, json.dumps(record))
    elif isinstance(backend, RedisBackend):
        redis = backend.connection.client
        assert await redis.exists(backend.keys.lock(key)), f"{key} is not held"
        await redis.hset(backend.keys.lock(key), "told", spoiled)
    elif isinstance(backend, EtcdBackend):
        if shared_by is None:
            lock, where = await backend.get(key), backend.lock_key(key)
        else:
            lock = next((held for held in await backend.holders(key)
                         if held.owner == shared_by), None)
            where = backend.shared_prefix(key) + quote(
                f"{shared_by[0]}#{shared_by[1]}", safe="").encode()
        assert lock is not None and lock.fencing_token == token, f"{key} is not held: {lock}"
        record = json.loads(codec.encode(lock))  # (its token resolved: the write moves it on)
        record["Told"] = spoiled
        etcd = await backend.connection.client()
        assert etcd.kv is not None
        await etcd.kv.put(where, json.dumps(record).encode())
    else:
        raise AssertionError(f"{type(backend).__name__} keeps no count in a store")


@dataclass(frozen=True)
class Spoiler:
    """One way of spoiling a held lock: ``run(backend, key)`` spoils it and answers the size of
    the bytes the store then reports for it."""

    name: str
    run: Callable[[Backend, str], Awaitable[int]]
    mode: Literal["exclusive", "shared"] = "exclusive"
    """How the key is held before it is spoiled."""
    owner_kept: bool = False
    """Whether the store still knows whose lock it was (a release by its pull then frees it)."""


def data_spoiler(name: str, raw: str) -> Spoiler:
    """The lock's JSON replaced by ``raw`` (every store keeps one)."""
    async def run(backend: Backend, key: str) -> int:
        await spoil(backend, key, raw)
        return len(raw.encode())
    # The Redis hash keeps its owner's fields beside the JSON.
    return Spoiler(name, run, owner_kept=True)


def _redis(backend: Backend) -> RedisBackend:
    assert isinstance(backend, RedisBackend), f"{type(backend).__name__} is not the Redis store"
    return backend


def _other_type_at(
    where: Literal["lock", "shared"], write: Callable[[Any, str], Awaitable[object]],
) -> Callable[[Backend, str], Awaitable[int]]:
    """Another Redis type, written by ``write``, where the store keeps the lock's hash
    (``lock``) or its shared holders' hash (``shared``)."""
    async def run(backend: Backend, key: str) -> int:
        store = _redis(backend)
        redis = store.connection.client
        name = store.keys.lock(key) if where == "lock" else store.keys.shared(key)
        assert await redis.delete(name) == 1, f"{key} is not held ({where})"
        await write(redis, name)
        return 0
    return run


async def _string(redis: Any, name: str) -> None:
    await redis.set(name, f"token={SECRET}")


async def _hash_without_data(backend: Backend, key: str) -> int:
    redis, name = _redis(backend).connection.client, _redis(backend).keys.lock(key)
    assert await redis.hdel(name, "data") == 1, f"{key} is not held"
    return 0


async def _token_not_a_number(backend: Backend, key: str) -> int:
    redis, name = _redis(backend).connection.client, _redis(backend).keys.lock(key)
    data = await redis.hget(name, "data")
    assert data is not None, f"{key} is not held"
    await redis.hset(name, "token", SECRET)
    return len(data.encode() if isinstance(data, str) else data)


def _shared_record(raw: str) -> Callable[[Backend, str], Awaitable[int]]:
    async def run(backend: Backend, key: str) -> int:
        redis, name = _redis(backend).connection.client, _redis(backend).keys.shared(key)
        [field] = await redis.hkeys(name)
        await redis.hset(name, field, raw)
        return len(raw.encode())
    return run


REDIS_SPOILERS: list[Spoiler] = [
    Spoiler("string-at-lock-key", _other_type_at("lock", _string)),
    Spoiler("list-at-lock-key",
            _other_type_at("lock", lambda redis, name: redis.rpush(name, SECRET, SECRET))),
    Spoiler("lock-hash-without-data", _hash_without_data),
    Spoiler("lock-token-not-a-number", _token_not_a_number),
    Spoiler("shared-record-not-json", _shared_record(f"token={SECRET} {{"), mode="shared"),
    Spoiler("shared-record-not-a-lock", _shared_record(f'{{"token": "{SECRET}"}}'),
            mode="shared"),
    Spoiler("shared-record-wrong-fields",
            _shared_record(f'["other/key", "{SECRET}", "x", "1", "0", "r", "1"]'),
            mode="shared"),
    Spoiler("string-at-shared-key", _other_type_at("shared", _string), mode="shared"),
]
"""What can go wrong in the Redis store's own structures (beside its JSON): each a row of the
unreadable-lock table on Redis and Redis Cluster."""
