"""What etcd answers a watch besides events. On a cluster with auth on, a watch opened without
a good token is answered canceled (no error: the stream stays open and brings nothing): the
store's watches carry the current token at each start, and take a canceled answer for a
break. A watch from a compacted revision is answered canceled too, with the compaction: that
one is resumed past it, not taken for a break."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import etcd3aio
import pytest
from tests.support.etcd_fixtures import auth_on, etcd_config, started
from tests.support.etcd_server import EtcdCluster

from enhanced_locking.backends.etcd_connection import WatchCanceled, refused_watch
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
