"""Stored locks made unreadable behind a backend's back, the way a careless person or another
program would: the bytes under a lock's key replaced with something that is not a lock.

``spoil(backend, key, raw)`` rewrites what the backend stores for ``key``'s holder (which must
be held, so every index the store keeps beside it stays as it was) with ``raw``, writing to
the real store directly: the SQLite file through its own connection, Redis and etcd through
their clients.
"""

from __future__ import annotations

import sqlite3

from enhanced_locking.backends import Backend, EmbeddedBackend
from enhanced_locking.backends.atlantis_redis import KEY_PREFIX, AtlantisRedisBackend
from enhanced_locking.backends.etcd_store import EtcdBackend
from enhanced_locking.backends.redis_store import RedisBackend

__all__ = ["SECRET", "SPOILED", "spoil", "spoil_file"]

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
