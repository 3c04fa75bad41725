"""Every key a Redis script touches is declared in its call's KEYS (Redis Cluster's rule).

A real redis-server runs every script while ``redis-cli monitor`` watches
(:class:`~tests.support.key_watch.KeyWatch`): each script call shows its ``KEYS`` and each
command the script ran. Two replicas share the store, so hand-offs reach waiters whose keys
the releasing replica never declared; batches, shared locks, lapsed leases, superseded
waiters, a force-unlock, a release by pull and a concurrency limit (which serves every queue
at once, and has the deadlock check read every held key of a group) make the scripts find
keys while they run. They must ask for those (answer which keys they need, having written
nothing) and touch nothing undeclared.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.support.key_watch import KeyWatch
from tests.support.locks import candidate_for, request_for
from tests.support.redis_fixtures import redis_config
from tests.support.redis_server import LOOPBACK, RedisServer

from enhanced_locking.backends import redis_scripts, redis_store
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.backends.waiting import QueuePolicy, Status, Wait
from enhanced_locking.policies import ConcurrencyLimit, PolicyRules
from enhanced_locking.types import Candidate, LockUnreadable, utcnow

pytestmark = pytest.mark.redis

POLICY = QueuePolicy()
WAIT = timedelta(seconds=30)


def _lock(key: str, pull: int, **changes: Any) -> Candidate:
    candidate = candidate_for(request_for(path=f"envs/{key}", pull=pull))
    return candidate._replace(**changes) if changes else candidate


def _script_names() -> dict[str, str]:
    """Each script by what a MONITOR line calls it (its function; an EVALSHA's SHA)."""
    names = {function: name for name, function in redis_scripts.FUNCTION_NAMES.items()}
    names.update({hashlib.sha1(redis_scripts.script(name).encode(), usedforsecurity=False)
                  .hexdigest(): name for name in redis_scripts.NAMES})
    return names


async def _held_by(backend: RedisBackend, key: str, pull: int) -> None:
    """Wait until ``pull`` holds ``key`` (a grant from the queue, confirmed by its replica)."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        lock = await backend.get(key)
        if lock is not None and lock.pull.num == pull:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{key} never reached pull {pull}"
        await asyncio.sleep(0.02)


async def _enqueue(backend: RedisBackend, locks: list[Candidate], waiter_id: str) -> None:
    backend.grants.expect(waiter_id)
    outcome = await backend.acquire_batch(locks, ttl=None, wait=Wait(id=waiter_id, timeout=WAIT),
                                          policy=POLICY)
    assert outcome.status is Status.QUEUED, outcome


async def _workload(server: RedisServer) -> None:
    config = redis_config(server)
    a = RedisBackend.from_config(config, "enhanced", replica_id="replica-a")
    b = RedisBackend.from_config(config, "enhanced", replica_id="replica-b")
    other = RedisBackend.from_config(config, "adopted", replica_id="replica-a")
    k1, k2, k3, k4 = (_lock(k, 1).key for k in ("one", "two", "three", "four"))
    try:
        await a.ping()
        # A hand-off from replica A to waiters of replica B (one key, then a batch).
        assert (await a.acquire_or_enqueue(_lock("one", 1), ttl=None, wait=None,
                                           policy=POLICY)).status is Status.GRANTED
        await _enqueue(b, [_lock("one", 2)], "w-one-2")
        await _enqueue(b, [_lock("one", 3), _lock("two", 3)], "w-batch-3")
        await a.release_and_handoff(k1, owner=("acme/infra", 1), policy=POLICY)
        await _held_by(a, k1, 2)
        # A lapsed lease: the next acquire drops it (and its pull's index entry).
        assert (await a.acquire_or_enqueue(_lock("three", 4), ttl=timedelta(milliseconds=30),
                                           wait=None, policy=POLICY)).status is Status.GRANTED
        await asyncio.sleep(0.1)
        assert (await b.acquire_or_enqueue(_lock("three", 5), ttl=None, wait=None,
                                           policy=POLICY)).status is Status.GRANTED
        # Shared holders, an exclusive waiter behind them, a shared newcomer that must queue.
        assert (await a.acquire_or_enqueue(_lock("four", 6, mode="shared"), ttl=None,
                                           wait=None, policy=POLICY)).status is Status.GRANTED
        await _enqueue(b, [_lock("four", 7)], "w-four-7")
        await _enqueue(a, [_lock("four", 8, mode="shared")], "w-four-8")
        # A newer head commit of pull 9 pushes its older waiter (of the other replica) out.
        older = _lock("one", 9)
        older = older._replace(pull=older.pull.model_copy(update={"head_commit": "a" * 40}))
        newer = older._replace(pull=older.pull.model_copy(update={"head_commit": "b" * 40}))
        await _enqueue(b, [older], "w-one-9-old")
        await _enqueue(a, [newer], "w-one-9-new")
        # An index written over by something else: rebuilt (REINDEX) by the list that reads it.
        await a.connection.client.set(a.keys.held, "not a set")
        # Reads of one snapshot.
        assert await a.queue(k1, policy=POLICY)
        assert await a.wait_graph(policy=POLICY)
        # The deadlock check's walk from a waiter of the other replica, step by step; then
        # with the indexes of waits untrusted (an enqueue of a release that keeps none), made
        # whole first (REINDEX_WAITS).
        walked = await b.queue(k4, policy=POLICY)
        assert await a.wait_graph_from(walked[0], policy=POLICY)
        await a.connection.client.hdel(a.keys.by_pull_mark, "waits")
        assert await b.wait_graph_from(walked[-1], policy=POLICY)
        assert await a.list()
        assert await b.list(repo="acme/infra", pull=2)
        assert await a.holders(k4)
        await a.refresh(k4, ("acme/infra", 6), timedelta(minutes=5))
        # A force-unlock hands k1 to the batch waiter; its release by pull serves both keys.
        await a.force_unlock(k1, policy=POLICY)
        await _held_by(a, k2, 3)
        await a.release_by_pull("acme/infra", 3, policy=POLICY)
        # A cancel from the other replica; where B's waiters stand; lease expiry.
        await a.cancel(k4, "w-four-7")
        await b._recheck(["w-four-7", "w-one-9-old"])
        await a.expire(k3, policy=POLICY)
        # A concurrency limit: every queue is served at once (WAKE, and each hand-off).
        limited = QueuePolicy(rules=PolicyRules(concurrency=[
            ConcurrencyLimit(name="all", limit=1)]))
        # The deadlock check under a limit: the whole graph, with every held key of a group.
        assert any(entry.parts is not None and not entry.waiters
                   for entry in await b.wait_graph_from(walked[0], policy=limited))
        await a.wake(policy=limited)
        await a.release_by_pull("acme/infra", 9, policy=limited)
        # A fencing counter written over: the key is set aside, a force-unlock repairs it.
        k5 = _lock("five", 10).key
        await a.connection.client.hset(a.keys.fence(k5), "not", "a counter")
        with pytest.raises(LockUnreadable):
            await a.acquire_or_enqueue(_lock("five", 10), ttl=None, wait=None, policy=POLICY)
        await a.force_unlock(k5, policy=POLICY)
        assert (await a.acquire_or_enqueue(_lock("five", 10), ttl=None, wait=None,
                                           policy=POLICY)).status is Status.GRANTED
        # A backend switch: tokens and locks taken over by another namespace.
        locks, tokens = await a.export()
        await other.adopt(locks, tokens)
        # The fallback journal's write: a key's lock replaced by another pull's in one step
        # (REPLACE drops the holder's index entry, which a replica that did not write it
        # asks for).
        assert await b.replace(_lock("five", 11).granted(acquired_at=utcnow(), expires_at=None,
                                                          fencing_token=99))
        replaced = await a.get(k5)
        assert replaced is not None and replaced.pull.num == 11
        await b.release_by_pull("acme/infra", 5, policy=POLICY)
        # A give-back of an acquire whose caller was told unavailable (Redis ran it): replica B
        # hands the key on to a waiter of replica A, whose names it asks for.
        k6 = _lock("six", 12).key
        taken = "c0" * 8
        with pytest.MonkeyPatch.context() as patch:  # (the call's id, as if it went unheard)
            patch.setattr(redis_store, "_new_call_id", lambda: taken)
            assert (await b.acquire_or_enqueue(_lock("six", 12), ttl=None, wait=None,
                                               policy=POLICY)).status is Status.GRANTED
        await _enqueue(a, [_lock("six", 13)], "w-six-13")
        given = await b._give_back(redis_store._GiveBack(taken, "acme/infra", 12, (k6,)))
        assert [grant.waiter.id for grant in given.granted] == ["w-six-13"]
        await _held_by(a, k6, 13)
    finally:
        for backend in (a, b, other):
            await backend.close()


def test_every_script_touches_only_declared_keys_and_asks_before_writing(
    redis_server: RedisServer,
) -> None:
    watch = KeyWatch(LOOPBACK, redis_server.port, redis_server.directory / "declared.log")
    asyncio.run(_workload(redis_server))
    watched = watch.stop()
    assert watched.undeclared == []
    assert watched.wrote_then_asked == []
    assert watched.asked_again >= 5, "the scripts never had to ask for a key"
    assert watched.calls > 40 and watched.commands > 500
    names = _script_names()
    ran = {names[s] for s in watched.scripts if s in names}
    assert set(redis_scripts.NAMES) - {"HEARTBEAT"} <= ran  # heartbeats come every second


def test_the_watch_catches_a_key_touched_undeclared_and_a_write_before_an_ask(
    tmp_path: Path,
) -> None:
    # A server of its own: the fixture's watch would (rightly) fail this test.
    server = RedisServer(tmp_path).start()
    try:
        watch = KeyWatch(LOOPBACK, server.port, tmp_path / "slip.log")
        with server.client() as client:
            touch = "redis.call('SET', KEYS[2], 'x'); return redis.call('GET', 'not-declared')"
            client.eval(touch, 2, "incarnation", "op:1")
            client.eval(touch.replace("not-declared", "op:1"), 3, "incarnation", "op:1",
                        "asked-for")
            # A call sent again with the keys it had after its connection broke is no ask:
            # answered from its call id (the clock, then one GET), or a script that keeps no
            # answer (the heartbeat) run again.
            client.eval("redis.call('SET', KEYS[2], 'x')", 2, "incarnation", "op:2")
            client.eval("redis.call('TIME'); return redis.call('GET', KEYS[2])", 2,
                        "incarnation", "op:2")
            beat = "redis.call('TIME'); return redis.call('ZADD', KEYS[3], 1, 'r')"
            client.eval(beat, 3, "incarnation", "op:3", "beats")
            client.eval(beat, 3, "incarnation", "op:3", "beats")
        watched = watch.stop()
    finally:
        server.close()
    assert [line.split(" (")[0] for line in watched.undeclared] == ["GET not-declared"]
    assert len(watched.wrote_then_asked) == 1


def test_the_watch_follows_its_server_through_a_restart_and_says_when_it_lost_it(
    tmp_path: Path,
) -> None:
    """A restart ends ``redis-cli monitor`` (its connection goes with the server): the watch
    starts watching again as the server comes back, so a slip after the restart is still
    caught. A watch whose connection was cut while the server ran on (its clients killed)
    says so, rather than passing a test it no longer watched."""
    slip = "return redis.call('GET', 'not-declared')"
    server = RedisServer(tmp_path).start()
    try:
        watch = KeyWatch.following(server, tmp_path / "restart.log")
        server.restart()
        with server.client() as client:
            client.eval(slip, 1, "declared")
        server.set_requirepass("after-the-restart")
        server.restart(kill=True)
        with server.client() as client:
            client.eval(slip.replace("not-declared", "still-not"), 1, "declared")
        restarted = watch.stop()

        cut = KeyWatch.following(server, tmp_path / "cut.log")
        with server.client() as admin:
            admin.client_kill_filter(_type="normal", skipme=True)
        ended = cut.stop()
    finally:
        server.close()
    assert [line.split(" (")[0] for line in restarted.undeclared] == [
        "GET not-declared", "GET still-not"]
    assert restarted.lost is None
    assert ended.lost is not None and "while the server ran on" in ended.lost


def test_the_watch_reads_every_call_made_before_it_stops(tmp_path: Path) -> None:
    # A burst just before the stop: the log must hold its last call too (the watch waits for
    # a marker it sends, not a fixed moment).
    server = RedisServer(tmp_path).start()
    try:
        watch = KeyWatch(LOOPBACK, server.port, tmp_path / "burst.log")
        with server.client() as client:
            burst = client.pipeline(transaction=False)
            for n in range(3000):
                burst.eval("return redis.call('GET', KEYS[1])", 1, f"k{n}")
            burst.execute()
        watched = watch.stop()
    finally:
        server.close()
    assert (watched.calls, watched.commands, watched.undeclared) == (3000, 3000, [])


async def _hand_offs(server: RedisServer, waiters: int) -> None:
    config = redis_config(server)
    a = RedisBackend.from_config(config, "enhanced", replica_id="replica-a")
    b = RedisBackend.from_config(config, "enhanced", replica_id="replica-b")
    key = _lock("chain", 1).key
    try:
        assert (await a.acquire_or_enqueue(_lock("chain", 1), ttl=None, wait=None,
                                           policy=POLICY)).status is Status.GRANTED
        for pull in range(2, 2 + waiters):
            await _enqueue(b, [_lock("chain", pull)], f"w-chain-{pull}")
        for pull in range(2, 2 + waiters):  # replica A hands the key on to B's waiters
            await a.force_unlock(key, policy=POLICY)
            await _held_by(a, key, pull)
    finally:
        for backend in (a, b):
            await backend.close()


def test_a_hand_off_to_another_replicas_waiter_names_the_next_ones(
    redis_server: RedisServer,
) -> None:
    """Replica A never saw replica B's waiters: its first hand-off asks for the next waiter's
    record (with the records of those behind it, which its walk may read next), then for its
    owner's index (three calls). Each hand-off answers who waits next and after that (with
    their names when it could read their records): every later one is one call but one."""
    watch = KeyWatch(LOOPBACK, redis_server.port, redis_server.directory / "chain.log")
    asyncio.run(_hand_offs(redis_server, 6))
    watched = watch.stop()
    assert watched.undeclared == []
    releases = watched.scripts[redis_scripts.FUNCTION_NAMES["RELEASE"]]
    assert releases == 3 + 2 + 3, f"{releases} calls for 6 hand-offs"
