"""The deadlock check's walk on Redis (``wait_graph_from.lua``): it reads only the keys a
search from the new waiter's pull can reach, through each pull's index of waits
(``B waits:{repo#pull}``), and the search finds in it exactly what it finds in the whole graph.

A state machine (hypothesis, against a real redis-server) runs random waits, batches, shared
requests, releases, cancels and the writes of a release that keeps no index of waits (a
waiter queued without its entry, the mark left as it was; a waiter taken out with its entry
left); after every step, for every pull that waits, the search over the walk's graph and the
search over the whole graph (``WAIT_GRAPH``) answer the same cycle, or none. The tests after
it play a rolling upgrade: a cycle closed through a waiter the index does not list is found
all the same (the indexes are made whole again first), and the mark is trusted again after.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from tests.support.locks import candidate_for, request_for
from tests.support.redis_fixtures import SharedServer, redis_config
from tests.support.redis_server import RedisServer

from enhanced_locking.backends.base import Owner
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.backends.waiting import KeyWaitsList, QueuePolicy, Status, Wait, Waiter
from enhanced_locking.locking import deadlock
from enhanced_locking.types import Candidate

pytestmark = pytest.mark.redis

PATHS = ("envs/a", "envs/b", "envs/c", "envs/d", "envs/e")
PULLS = (1, 2, 3, 4, 5)
HOUR = timedelta(hours=1)
POLICY = QueuePolicy(priority=True, max_size=1000)
REPO = "acme/infra"


def _candidate(pull: int, path: str, *, shared: bool = False) -> Candidate:
    request = request_for(pull=pull, path=path, project=path)
    if shared:
        request = request.model_copy(update={"mode": "shared"})
    return candidate_for(request)


def _key(path: str) -> str:
    return _candidate(1, path).key


def _sorted(graph: KeyWaitsList) -> KeyWaitsList:
    """The graph's keys in one order: a search visits a pull's waits in the order of the
    graph's keys, so two reads of one store in different orders may name different cycles
    of one length."""
    return sorted(graph, key=lambda entry: entry.key)


def _waiters_of(graph: KeyWaitsList) -> dict[Owner, Waiter]:
    found: dict[Owner, Waiter] = {}
    for entry in graph:
        for waiter in entry.waiters:
            found.setdefault(waiter.owner, waiter)
    return found


async def _same_answers(backend: RedisBackend) -> int:
    """For every pull that waits, the search over the walk's graph finds what the search over
    the whole graph finds (the same cycle, or none); how many cycles there were."""
    whole = _sorted(await backend.wait_graph(policy=POLICY))
    cycles = 0
    for owner, waiter in sorted(_waiters_of(whole).items()):
        walked = await backend.wait_graph_from(waiter, policy=POLICY)
        expected = deadlock.find_cycle(whole, owner)
        assert deadlock.find_cycle(_sorted(walked), owner) == expected, owner
        assert {e.key for e in walked} <= {e.key for e in whole}
        cycles += expected is not None
    return cycles


class Store:
    """What a replica of a release that keeps no index of waits leaves behind."""

    def __init__(self, admin: redis.Redis, backend: RedisBackend) -> None:
        self.admin, self.keys = admin, backend.keys

    def queued(self) -> list[str]:
        found: set[str] = set()
        for path in PATHS:
            for level in range(4):
                members: list[bytes] = self.admin.zrange(  # type: ignore[assignment]
                    self.keys.queue(_key(path), level), 0, -1)
                found |= {self.keys.member_waiter(m.decode()) for m in members}
        return sorted(found)

    def trusted(self) -> bool:
        kept = self.admin.hget(self.keys.by_pull_mark, "waits")
        return kept is not None and kept == self.admin.get(self.keys.seq)

    def leave_out_of_waits(self, waiter_id: str, pull: int, mark: bytes | None) -> None:
        """An enqueue of that release: the waiter not listed, the mark as it was before."""
        self.admin.srem(self.keys.waits(REPO, pull), waiter_id)
        if mark is None:
            self.admin.hdel(self.keys.by_pull_mark, "waits")
        else:
            self.admin.hset(self.keys.by_pull_mark, "waits", mark)

    def take_out_leaving_waits(self, waiter_id: str) -> None:
        """A grant, cancel or drop of that release: queue entries and record gone, the id
        left in its pull's index."""
        rec: dict[bytes, bytes] = self.admin.hgetall(  # type: ignore[assignment]
            self.keys.waiter(waiter_id))
        member = self.keys.queue_member(int(rec[b"seq"]), waiter_id)
        for path in PATHS:
            self.admin.zrem(self.keys.queue(_key(path), int(rec[b"level"])), member)
        self.admin.delete(self.keys.waiter(waiter_id))


_SHARED = SharedServer("wait-walk")


@pytest.fixture(scope="module", autouse=True)
def _close_server() -> Iterator[None]:
    yield
    _SHARED.close()


class WaitWalkModel(RuleBasedStateMachine):
    """Random holds and waits; the walk's search against the whole graph's, every pull."""

    def __init__(self) -> None:
        super().__init__()
        server = _SHARED.get()
        self.loop = asyncio.new_event_loop()
        config = redis_config(server, redis_key_prefix=_SHARED.prefix())
        self.backend = RedisBackend.from_config(config, "enhanced")
        self.admin = server.client()
        self.store = Store(self.admin, self.backend)
        self.waiters = itertools.count(1)
        self.cycles = 0

    def run(self, work: object) -> object:
        return self.loop.run_until_complete(work)  # type: ignore[arg-type]

    def teardown(self) -> None:
        try:
            self.run(self.backend.close())
        finally:
            self.loop.close()
            self.admin.close()

    def _acquire(self, pull: int, paths: list[str], shared: bool) -> str | None:
        waiter_id = f"w{next(self.waiters)}"
        outcome = self.run(self.backend.acquire_batch(
            [_candidate(pull, p, shared=shared) for p in paths], ttl=HOUR,
            wait=Wait(id=waiter_id, timeout=HOUR), policy=POLICY))
        return waiter_id if getattr(outcome, "status", None) is Status.QUEUED else None

    @rule(pull=st.sampled_from(PULLS), paths=st.lists(st.sampled_from(PATHS), min_size=1,
                                                      max_size=2, unique=True),
          shared=st.booleans())
    def acquire(self, pull: int, paths: list[str], shared: bool) -> None:
        self._acquire(pull, paths, shared)

    @rule(pull=st.sampled_from(PULLS), path=st.sampled_from(PATHS))
    def earlier_release_queues(self, pull: int, path: str) -> None:
        mark = self.admin.hget(self.backend.keys.by_pull_mark, "waits")
        waiter_id = self._acquire(pull, [path], False)
        if waiter_id is not None:
            self.store.leave_out_of_waits(waiter_id, pull, mark)  # type: ignore[arg-type]

    @precondition(lambda self: bool(self.store.queued()))
    @rule(data=st.data())
    def earlier_release_takes_out(self, data: st.DataObject) -> None:
        self.store.take_out_leaving_waits(data.draw(st.sampled_from(self.store.queued())))

    @rule(path=st.sampled_from(PATHS))
    def release(self, path: str) -> None:
        self.run(self.backend.release_and_handoff(_key(path), policy=POLICY))

    @precondition(lambda self: bool(self.store.queued()))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        waiter_id = data.draw(st.sampled_from(self.store.queued()))
        for path in PATHS:  # (any key of its: the cancel takes it out of all)
            self.run(self.backend.cancel(_key(path), waiter_id, policy=POLICY))

    @invariant()
    def the_walk_finds_what_the_whole_graph_shows(self) -> None:
        self.cycles += self.run(_same_answers(self.backend))  # type: ignore[operator]
        # (a walk that found the indexes untrusted made them whole: trusted until the next
        # enqueue of the release that keeps none)
        if self.store.queued():
            assert self.store.trusted()


WaitWalkModel.TestCase.settings = settings(
    max_examples=15, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestWaitWalkOnRedis = WaitWalkModel.TestCase


# --- a rolling upgrade ----------------------------------------------------------------------------
@pytest.fixture
async def backend(redis_server: RedisServer) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend.from_config(redis_config(redis_server), "enhanced")
    yield backend
    await backend.close()


async def _hold(backend: RedisBackend, pull: int, path: str) -> None:
    granted = await backend.acquire_or_enqueue(_candidate(pull, path), ttl=None, wait=None,
                                               policy=POLICY)
    assert granted.status is Status.GRANTED


async def _wait(backend: RedisBackend, pull: int, path: str, waiter_id: str) -> Waiter:
    queued = await backend.acquire_or_enqueue(
        _candidate(pull, path), ttl=None, wait=Wait(id=waiter_id, timeout=HOUR), policy=POLICY)
    assert queued.status is Status.QUEUED and queued.waiter is not None, queued
    return queued.waiter


async def test_a_cycle_through_a_waiter_an_earlier_release_queued_is_found(
        backend: RedisBackend, redis_server: RedisServer) -> None:
    # 1 holds a and waits for b; 2 holds b and waits for c; 3 holds c and, queued by a
    # replica that keeps no index of waits, waits for a: the walk from 1 reaches 3 only
    # through 3's wait, which 3's index does not list.
    for pull, path in ((1, "envs/a"), (2, "envs/b"), (3, "envs/c")):
        await _hold(backend, pull, path)
    start = await _wait(backend, 1, "envs/b", "w1")
    await _wait(backend, 2, "envs/c", "w2")
    with redis_server.client() as admin:
        store = Store(admin, backend)
        mark = admin.hget(backend.keys.by_pull_mark, "waits")
        assert store.trusted()
        await _wait(backend, 3, "envs/a", "w3")
        store.leave_out_of_waits("w3", 3, mark)
        assert not store.trusted()
        walked = await backend.wait_graph_from(start, policy=POLICY)
        cycle = deadlock.find_cycle(walked, start.owner)
        assert cycle is not None
        assert deadlock.describe(cycle) == [f"{REPO}#1", f"{REPO}#2", f"{REPO}#3", f"{REPO}#1"]
        # made whole again: w3 is listed, and the mark trusted until the next such enqueue
        assert admin.smembers(backend.keys.waits(REPO, 3)) == {b"w3"}
        assert store.trusted()
        assert await _same_answers(backend) == 3


async def test_the_walk_reads_only_the_keys_it_can_reach(backend: RedisBackend) -> None:
    # Two queues apart: 1 waits behind 2 on a; 3 waits behind 4 on b. The walk from 1 reads
    # a alone.
    await _hold(backend, 2, "envs/a")
    await _hold(backend, 4, "envs/b")
    start = await _wait(backend, 1, "envs/a", "w1")
    await _wait(backend, 3, "envs/b", "w3")
    walked = await backend.wait_graph_from(start, policy=POLICY)
    assert [e.key for e in walked] == [_key("envs/a")]
    assert len(await backend.wait_graph(policy=POLICY)) == 2


async def test_an_index_of_waits_of_another_type_is_read_as_untrusted_and_made_again(
        backend: RedisBackend, redis_server: RedisServer) -> None:
    await _hold(backend, 2, "envs/a")
    await _hold(backend, 1, "envs/b")
    start = await _wait(backend, 1, "envs/a", "w1")
    await _wait(backend, 2, "envs/b", "w2")
    with redis_server.client() as admin:
        admin.delete(backend.keys.waits(REPO, 2))
        admin.set(backend.keys.waits(REPO, 2), "written over")
        walked = await backend.wait_graph_from(start, policy=POLICY)
        assert deadlock.find_cycle(walked, start.owner) is not None
        assert admin.smembers(backend.keys.waits(REPO, 2)) == {b"w2"}
