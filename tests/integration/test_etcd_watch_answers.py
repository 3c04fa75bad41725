"""What etcd answers a watch besides events. On a cluster with auth on, a watch opened without
a good token is answered canceled (no error: the stream stays open and brings nothing): the
store's watches carry the current token at each start, and take a canceled answer for a
break. A watch from a compacted revision is answered canceled too, with the compaction: that
one is resumed past it, not taken for a break."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import etcd3aio
import pytest
from tests.integration.test_etcd_watch_resume import run_until
from tests.support.etcd_fixtures import auth_on, etcd_config, started
from tests.support.etcd_server import EtcdCluster

from enhanced_locking.backends.etcd_connection import (
    EtcdConnection,
    EtcdSettings,
    Watch,
    WatchCanceled,
    refused_watch,
)
from enhanced_locking.backends.etcd_store import EtcdBackend

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(120)]


async def test_a_watch_on_a_members_client_carries_the_token_and_a_canceled_answer_breaks_it(
    tmp_path: Path, etcd_prefix: str, caplog: pytest.LogCaptureFixture,
) -> None:
    with started(tmp_path / "etcd") as cluster:
        await auth_on(cluster, password="root-secret")
        config = etcd_config(cluster, etcd_prefix, etcd_username="root",
                             etcd_password="root-secret")
        backend = EtcdBackend.from_config(config, "enhanced")
        try:
            client = await backend.connection.client()
            assert client.kv is not None
            # A member's own client, as a watch started again goes through, with no token.
            member = etcd3aio.Etcd3Client(list(cluster.endpoints))
            await member.connect()
            try:
                prefix = f"{etcd_prefix}watched/".encode()
                assert member.watch is not None
                # What etcd answers such a watch: canceled, which is taken for a break.
                async for answer in member.watch.watch(prefix, start_revision=0):
                    with pytest.raises(WatchCanceled):
                        refused_watch(answer)
                    break
                # The store's watch on that client carries the current token: it delivers.
                heard: list[bytes] = []
                arrived = asyncio.Event()

                def handle(key: bytes, *_: object) -> None:
                    heard.append(key)
                    arrived.set()

                revision = int((await client.kv.get(prefix)).header.revision) + 1
                watch = asyncio.ensure_future(backend._watch_prefix(
                    member, backend._prefix_watch("test", prefix, revision,
                                                  etcd3aio.WatchFilter.NODELETE), handle))
                try:
                    await client.kv.put(prefix + b"one", b"1")
                    await asyncio.wait_for(arrived.wait(), 10)
                    assert heard == [prefix + b"one"]
                finally:
                    watch.cancel()
                    await asyncio.wait([watch])
            finally:
                await member.close()
        finally:
            await backend.close()
    assert not [r for r in caplog.records
                if r.levelno >= logging.WARNING and "watch broke" in r.getMessage()]


async def test_a_store_watch_from_a_compacted_revision_resumes_past_the_compaction(
    tmp_path: Path, etcd_prefix: str, caplog: pytest.LogCaptureFixture,
) -> None:
    with started(tmp_path / "etcd") as cluster:  # (a compaction of its own)
        await _resumes_past_a_compaction(cluster, etcd_prefix)
    assert not [r for r in caplog.records if "watch broke" in r.getMessage()]


async def _resumes_past_a_compaction(cluster: EtcdCluster, etcd_prefix: str) -> None:
    backend = EtcdBackend.from_config(etcd_config(cluster, etcd_prefix), "enhanced")
    try:
        client = await backend.connection.client()
        assert client.kv is not None
        prefix = f"{etcd_prefix}watched/".encode()
        first = int((await client.kv.put(prefix + b"old", b"1")).header.revision)
        now = int((await client.kv.put(prefix + b"old", b"2")).header.revision)
        await client.kv.compact(now)
        heard: list[bytes] = []
        arrived = asyncio.Event()

        def handle(key: bytes, *_: object) -> None:
            heard.append(key)
            arrived.set()

        watch = asyncio.ensure_future(backend._watch_prefix(
            client, backend._prefix_watch("test", prefix, first, etcd3aio.WatchFilter.NODELETE),
            handle))
        try:
            await client.kv.put(prefix + b"new", b"3")
            await asyncio.wait_for(arrived.wait(), 10)
            assert heard[-1] == prefix + b"new"
        finally:
            watch.cancel()
            await asyncio.wait([watch])
    finally:
        await backend.close()


async def test_a_watch_resumed_after_a_compaction_brings_the_write_at_its_revision(
    tmp_path: Path,
) -> None:
    # etcd keeps the write at the compaction revision: a watch from before it is answered
    # with the compaction and resumes at that revision, not one past it.
    with started(tmp_path / "etcd") as cluster:  # (a compaction of its own)
        connection = EtcdConnection(EtcdSettings(endpoints=tuple(cluster.endpoints)))
        try:
            client = await connection.client()
            assert client.kv is not None
            key = b"/compacted/key"
            first = int((await client.kv.put(key, b"1")).header.revision)
            kept = int((await client.kv.put(key, b"2")).header.revision)
            await client.kv.compact(kept)
            last = int((await client.kv.put(key, b"3")).header.revision)
            seen: list[int] = []
            compactions: list[int] = []
            done = asyncio.Event()

            def deliver(answer: Any) -> None:
                if answer.compact_revision:
                    compactions.append(int(answer.compact_revision))
                seen.extend(int(e.kv.mod_revision) for e in answer.events)
                if last in seen:
                    done.set()

            watch = Watch(connection, "compacted", key, start=first)
            await run_until(watch.follow(client, deliver), done)
        finally:
            await connection.close()
    assert compactions == [kept]
    assert seen == [kept, last]


async def _lock_deletes_heard(tmp_path: Path, etcd_prefix: str, first: bytes,
                              fails: bytes = b"") -> tuple[list[str], Watch]:
    """Lock ``first`` put and deleted, then five more, watched from ``first``'s put (one
    catch-up answer) by the store's lock-deletions watch, whose handler reads each key as
    the store's do and fails on key ``fails`` (``RuntimeError``): the names heard, the watch."""
    with started(tmp_path / "etcd") as cluster:
        backend = EtcdBackend.from_config(etcd_config(cluster, etcd_prefix), "enhanced")
        try:
            client = await backend.connection.client()
            assert client.kv is not None
            locks = backend.base + b"lock/"
            start = int((await client.kv.put(locks + first, b"secret-value")).header.revision)
            await client.kv.delete(locks + first)
            names = [f"held-{n}" for n in range(5)]
            for name in names:
                await client.kv.put(locks + name.encode(), b"x")
            for name in names:
                await client.kv.delete(locks + name.encode())
            heard: list[str] = []
            done = asyncio.Event()

            def deleted(key: bytes, *_: object) -> None:
                if key == locks + fails:
                    raise RuntimeError("the handler failed")
                heard.append(key[len(locks):].decode())  # as the store's handlers read keys
                if len(heard) == len(names):
                    done.set()

            watch = backend._prefix_watch("lock deletions", locks, start,
                                          etcd3aio.WatchFilter.NOPUT)
            await run_until(backend._watch_prefix(client, watch, deleted), done)
        finally:
            await backend.close()
    return heard, watch


async def test_a_write_the_store_cannot_read_is_skipped_and_the_rest_of_its_answer_delivered(
    tmp_path: Path, etcd_prefix: str, caplog: pytest.LogCaptureFixture,
) -> None:
    # A key under ``lock/`` another program wrote that is not UTF-8, then five lock deletes,
    # watched from before them: one catch-up answer. Its handler failing on the first key was
    # a break past the whole answer, and the five deletes were never delivered.
    heard, watch = await _lock_deletes_heard(tmp_path, etcd_prefix, b"\xff\xfe")
    assert heard == [f"held-{n}" for n in range(5)] and watch.breaks == 0
    skipped = [r.getMessage() for r in caplog.records if "could not read" in r.getMessage()]
    assert len(skipped) == 1 and "secret-value" not in skipped[0], skipped


async def test_a_write_the_stores_handler_fails_on_otherwise_is_skipped_and_the_rest_delivered(
    tmp_path: Path, etcd_prefix: str, caplog: pytest.LogCaptureFixture,
) -> None:
    # A handler failing on a write with an error other than ``ValueError`` (the store's
    # handler caught only that one): a break past the whole answer, the writes after it lost.
    heard, watch = await _lock_deletes_heard(tmp_path, etcd_prefix, b"fails", fails=b"fails")
    assert heard == [f"held-{n}" for n in range(5)] and watch.breaks == 0
    skipped = [r.getMessage() for r in caplog.records if "could not read" in r.getMessage()]
    assert len(skipped) == 1 and "secret-value" not in skipped[0], skipped
    assert "RuntimeError" in skipped[0], skipped
