"""Watches driven over etcd's Watch RPC (``Watch``), on a real three-member etcd.

* A stream broken while the watch catches up on history (etcd sends old writes in batches of
  1,000 revisions about 100 ms apart, each answer's header carrying the cluster's current
  revision) resumes from the revision after the last write it delivered: every write comes
  once, in order. The client library's own watch resumed from the header's revision, plus
  one, and skipped the rest of the history (1,000 of 3,000 writes brought).
* A watch whose member is killed (down, not frozen) moves to another member at once, with
  nothing missed or doubled. The library's watch on a member's own client retried that
  member for good.

The member carrying a stream is the one named in its answers' headers (``member_id``); it is
killed from the answer's delivery itself, so the break comes while the rest of the history
is still on the server, every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import etcd3aio
import pytest
from tests.support.etcd_fixtures import etcd_config
from tests.support.etcd_server import EtcdCluster, EtcdMember

from enhanced_locking.backends.etcd_connection import (
    WATCH_PAUSE,
    EtcdConnection,
    EtcdSettings,
    Watch,
)
from enhanced_locking.backends.etcd_events import EtcdEventBus
from enhanced_locking.backends.etcd_store import _KV, EtcdBackend
from enhanced_locking.events import parse_event_id

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(180)]

HISTORY = 2500
"""Writes of history a watch catches up on: three of etcd's batches (1,000 revisions each)."""
MOVE_BOUND = 5.0
"""Seconds within which a watch whose member was killed answers from another member. It
takes a pause (``WATCH_PAUSE``, 0.05 s) and a stream, or three pauses and streams when the
next member in turn is the killed one (refused at once on loopback): about 0.1 to 0.4 s
measured; the bound leaves room for a loaded machine."""


@contextlib.asynccontextmanager
async def connected(cluster: EtcdCluster) -> AsyncIterator[EtcdConnection]:
    connection = EtcdConnection(EtcdSettings(endpoints=tuple(cluster.endpoints)))
    try:
        yield connection
    finally:
        await connection.close()


def members_by_id(cluster: EtcdCluster) -> dict[int, EtcdMember]:
    """Each member under the id etcd gives it in its answers' headers."""
    return {cluster.member_id(member): member for member in cluster.members}


async def written(client: etcd3aio.Etcd3Client, writes: list[tuple[bytes, bytes]],
                  *, delete: bool = False) -> list[tuple[int, bytes, bytes]]:
    """``writes`` (key, value) put, or their keys deleted, 50 at a time: (revision, key,
    value) of each, in the order of their revisions."""
    kv = client.kv
    assert kv is not None
    done: list[tuple[int, bytes, bytes]] = []
    for at in range(0, len(writes), 50):
        chunk = writes[at:at + 50]
        if delete:
            answers: list[Any] = await asyncio.gather(*(kv.delete(k) for k, _ in chunk))
        else:
            answers = await asyncio.gather(*(kv.put(k, v) for k, v in chunk))
        done += [(int(a.header.revision), k, v) for a, (k, v) in zip(answers, chunk, strict=True)]
    return sorted(done)


async def run_until(following: Coroutine[Any, Any, None], done: asyncio.Event) -> None:
    """``following`` (a watch) run until ``done`` is set and 0.3 s more (a second copy of
    anything would come then), then cancelled."""
    task = asyncio.ensure_future(following)
    try:
        await asyncio.wait_for(done.wait(), 60)
        await asyncio.sleep(0.3)
    finally:
        task.cancel()
        await asyncio.wait([task])


class Killer:
    """Kills the member that sent the first answer with events (from its delivery: the
    event loop takes no further answer before the member is gone)."""

    def __init__(self, cluster: EtcdCluster) -> None:
        self.cluster = cluster
        self.members = members_by_id(cluster)
        self.killed: EtcdMember | None = None
        self.killed_id = 0
        self.before = 0
        """Writes delivered when the member was killed (those of the first batch)."""
        self.at = 0.0

    def answer(self, answer: Any, delivered: int) -> None:
        if self.killed is None and answer.events:
            self.killed_id = int(answer.header.member_id)
            self.killed = self.members[self.killed_id]
            self.before = delivered + len(answer.events)
            self.cluster.kill(self.killed)
            self.at = time.monotonic()


async def test_a_watch_broken_while_it_catches_up_delivers_every_write_once_in_order(
    three: EtcdCluster,
) -> None:
    async with connected(three) as connection:
        client = await connection.client()
        key = b"/history/key"
        history = await written(client, [(key, b"%d" % n) for n in range(HISTORY)])
        killer = Killer(three)
        seen: list[tuple[int, bytes]] = []
        members: set[int] = set()
        done = asyncio.Event()

        def deliver(answer: Any) -> None:
            killer.answer(answer, len(seen))
            if answer.events:
                members.add(int(answer.header.member_id))
            seen.extend((int(e.kv.mod_revision), bytes(e.kv.value)) for e in answer.events)
            if len(seen) >= HISTORY:
                done.set()

        watch = Watch(connection, "history", key, start=history[0][0])
        await run_until(watch.follow(client, deliver), done)
    assert killer.killed is not None
    # The stream broke in the middle of the history, and the rest came from another member.
    assert 0 < killer.before < HISTORY, killer.before
    assert watch.breaks >= 1 and members - {killer.killed_id}
    assert seen == [(revision, value) for revision, _, value in history]  # once, in order
    assert watch.next == history[-1][0] + 1


class KillingBus(EtcdEventBus):
    """An event bus whose watch's member is killed once the first events are delivered."""

    killer: Killer

    def _answer(self, answer: Any, newest: int) -> None:
        self.killer.answer(answer, len(self._ring))
        super()._answer(answer, newest)


async def test_the_events_lookback_broken_by_a_member_kill_loads_every_event_once(
    three: EtcdCluster,
) -> None:
    key = b"/lookback/events"
    async with connected(three) as connection:
        client = await connection.client()
        values = [(key, b'[{"type":"fallback","time":"2026-01-01T00:00:00Z","key":"k%d"}]' % n)
                  for n in range(HISTORY)]
        history = await written(client, values)
    bus = KillingBus(EtcdConnection(EtcdSettings(endpoints=tuple(three.endpoints))),
                     key=key.decode())
    bus.killer = Killer(three)
    try:
        stream = bus.stream(after="0-0")
        events = [await asyncio.wait_for(anext(stream), 30) for _ in range(HISTORY)]
        await asyncio.sleep(0.3)  # nothing more (a second copy) comes
        assert len(bus._ring) == HISTORY
    finally:
        await bus.close()
    assert 0 < bus.killer.before < HISTORY, bus.killer.before
    assert bus.key_watch.breaks >= 1
    assert [(parse_event_id(e.id), e.key) for e in events] == [
        ((revision, 0), value.split(b'"key":"')[1].split(b'"')[0].decode())
        for revision, _, value in history]  # each once, in order
    assert not bus.gap_since(events[0].id)


async def test_the_lock_deletions_watch_broken_while_it_catches_up_brings_every_delete(
    three: EtcdCluster,
) -> None:
    backend = EtcdBackend.from_config(etcd_config(three, "/deletions/"), "enhanced")
    try:
        client = await backend.connection.client()
        locks = b"/deletions/lock/"
        keys = [locks + b"k%05d" % n for n in range(HISTORY)]
        await written(client, [(k, b"held") for k in keys])
        history = await written(client, [(k, b"") for k in keys], delete=True)
        # The watch's first stream on a member's own client (as a watch moved on goes).
        member = await backend.connection.watcher(1)
        victim = three.members[1]
        heard: list[tuple[int, bytes]] = []
        done = asyncio.Event()

        def deleted(key: bytes, kv: _KV, prev: _KV) -> None:
            if not heard:
                three.kill(victim)  # (before the event loop takes another answer)
            heard.append((kv.mod, key))
            if len(heard) >= HISTORY:
                done.set()

        watch = backend._prefix_watch("lock deletions", locks, history[0][0],
                                      etcd3aio.WatchFilter.NOPUT)
        await run_until(backend._watch_prefix(member, watch, deleted), done)
    finally:
        await backend.close()
    assert not victim.alive() and watch.breaks >= 1 and watch.turn >= 1
    assert heard == [(revision, key) for revision, key, _ in history]  # each once, in order


async def test_a_watch_whose_member_is_killed_moves_to_another_within_the_bound(
    three: EtcdCluster,
) -> None:
    async with connected(three) as connection:
        client = await connection.client()
        kv = client.kv
        assert kv is not None
        key = b"/moving/key"
        start = int((await kv.get(key)).header.revision) + 1
        # The watch on a member's own client, which the library's watch retried for good.
        member = await connection.watcher(1)
        victim = three.members[1]
        ids = {m.name: i for i, m in members_by_id(three).items()}
        seen: list[int] = []
        moved, flowing, caught_up = asyncio.Event(), asyncio.Event(), asyncio.Event()
        moved_at = 0.0
        last = 0  # the last write's revision, once the writes stopped

        def deliver(answer: Any) -> None:
            nonlocal moved_at
            seen.extend(int(e.kv.mod_revision) for e in answer.events)
            if len(seen) >= 20:
                flowing.set()
            if last and seen[-1:] == [last]:
                caught_up.set()
            if victim.process is not None and not victim.alive() and not moved.is_set() \
                    and int(answer.header.member_id) != ids[victim.name]:
                moved_at = time.monotonic()
                moved.set()

        watch = Watch(connection, "moving", key, start=start)
        following = asyncio.ensure_future(watch.follow(member, deliver))
        revisions: list[int] = []
        writing = True

        async def write() -> None:
            n = 0
            while writing:
                answer = await kv.put(key, b"%d" % n)
                revisions.append(int(answer.header.revision))
                n += 1
                await asyncio.sleep(0.01)

        writer = asyncio.ensure_future(write())
        try:
            await asyncio.wait_for(flowing.wait(), 30)
            killed_at = time.monotonic()
            await asyncio.to_thread(three.kill, victim)
            await asyncio.wait_for(moved.wait(), 30)
            took = moved_at - killed_at
            await asyncio.sleep(0.3)
            writing = False
            await writer
            last = revisions[-1]
            if seen[-1:] == [last]:
                caught_up.set()
            await asyncio.wait_for(caught_up.wait(), 10)
            await asyncio.sleep(0.3)  # nothing more (a second copy) comes
        finally:
            writing = False
            following.cancel()
            await asyncio.wait([following, writer])
    print(f"the watch answered from another member {took:.3f} s after the kill "
          f"(breaks: {watch.breaks}, pause {WATCH_PAUSE} s)")
    assert took < MOVE_BOUND, took
    assert watch.breaks >= 1
    assert seen == revisions  # nothing missed or doubled, in order


async def test_a_catch_up_answer_larger_than_a_message_is_delivered_whole(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    # 1,200 writes of 8 KiB watched from the first: etcd's first batch (1,000 revisions,
    # 8 MiB) is past gRPC's 4 MiB on a received message. Asked as one answer, the stream
    # failed (RESOURCE_EXHAUSTED) at every start and the watch brought nothing.
    async with connected(etcd_cluster) as connection:
        client = await connection.client()
        key = f"{etcd_prefix}large".encode()
        history = await written(client, [(key, b"%05d" % n + b"x" * 8192)
                                          for n in range(1200)])
        seen: list[tuple[int, bytes]] = []
        done = asyncio.Event()

        def deliver(answer: Any) -> None:
            seen.extend((int(e.kv.mod_revision), bytes(e.kv.value)) for e in answer.events)
            if len(seen) >= len(history):
                done.set()

        watch = Watch(connection, "large", key, start=history[0][0])
        await run_until(watch.follow(client, deliver), done)
    assert watch.breaks == 0
    assert seen == [(revision, value) for revision, _, value in history]
