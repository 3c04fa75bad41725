"""Each key's waiters by pull (``B bypull:{K}``) on Redis: what a request naming its pull's
head commit reads to find its pull's older requests to supersede, instead of every waiter's
record on its keys.

The index must list exactly the entries of the key's queues, each under its waiter's pull,
whatever writes the queues: an enqueue, a grant in a hand-off, a cancel, a release by pull, a
drop of a waiter past its deadline, a wake. A state machine (hypothesis, against a real
redis-server) runs random sequences of them, with batches and shared requests, and after
every step compares each key's index with its queues and the records they name; each request
naming a head commit checks that no older request of its pull is left waiting on its keys.

A store written by the release before the index has waiters and no index: the first request
naming a head commit on such a key finds the index short of the queues, reads the key's
waiters as before, supersedes what it must and makes the index again (``reindex_pulls`` in
``lua/lib.lua``); the machine plays that release too (it queues a waiter and leaves its index
entries out), and the tests at the end play it key by key.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from tests.support.locks import candidate_for, request_for
from tests.support.redis_fixtures import SharedServer, redis_config
from tests.support.redis_server import RedisServer

from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.backends.waiting import Outcome, QueuePolicy, Status, Wait
from enhanced_locking.types import Candidate, Priority

pytestmark = pytest.mark.redis

PATHS = ("envs/a", "envs/b", "envs/c")
PULLS = (1, 2, 3)
HEADS = ("", "c1", "c2")
HOUR = timedelta(hours=1)
POLICY = QueuePolicy(priority=True, max_size=1000)


def _candidate(pull: int, path: str, head: str, *, level: Priority = Priority.NORMAL,
               shared: bool = False) -> Candidate:
    request = request_for(pull=pull, path=path, project=path, priority=level)
    request = request.model_copy(update={
        "pull": request.pull.model_copy(update={"head_commit": head}),
        **({"mode": "shared"} if shared else {})})
    return candidate_for(request)


def _key(path: str) -> str:
    return _candidate(1, path, "").key


class Store:
    """What Redis holds of one namespace's queues, read as the test sees it."""

    def __init__(self, admin: redis.Redis, backend: RedisBackend) -> None:
        self.admin, self.keys = admin, backend.keys

    def queued(self, key: str) -> list[str]:
        """The waiter ids of ``key``'s queue entries (every priority)."""
        ids = []
        for level in range(4):
            members: list[bytes] = self.admin.zrange(  # type: ignore[assignment]
                self.keys.queue(key, level), 0, -1)
            ids += [self.keys.member_waiter(m.decode()) for m in members]
        return ids

    def record(self, waiter_id: str) -> dict[str, str]:
        raw: dict[bytes, bytes] = self.admin.hgetall(  # type: ignore[assignment]
            self.keys.waiter(waiter_id))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def index(self, key: str) -> set[str]:
        """The entries of ``key``'s index (its stamp left out: :meth:`stamped`)."""
        members: list[bytes] = self.admin.zrange(  # type: ignore[assignment]
            self.keys.by_pull(key), 0, -1)
        return {m.decode() for m in members if not m.startswith(b"\t")}

    def stamped(self, key: str) -> bool:
        """Whether ``key``'s index is stamped with the current generation."""
        gen = self.admin.hget(self.keys.by_pull_mark, "gen")
        first: list[bytes] = self.admin.zrange(  # type: ignore[assignment]
            self.keys.by_pull(key), 0, 0)
        return gen is not None and first == [b"\t" + gen]  # type: ignore[operator]

    def expected(self, key: str) -> set[str]:
        """The index ``key``'s queues call for: each entry under its waiter's pull."""
        out = set()
        for waiter_id in self.queued(key):
            rec = self.record(waiter_id)
            assert rec, f"{waiter_id} is queued on {key} without a record"
            out.add(f"{rec['repo']}#{rec['pull']}\n{waiter_id}")
        return out

    def older(self, keys: list[str], pull: int, head: str) -> set[str]:
        """The waiters on ``keys`` of ``pull`` whose head commit is another, named one."""
        found = set()
        for key in keys:
            for waiter_id in self.queued(key):
                rec = self.record(waiter_id)
                if rec["pull"] == str(pull) and rec.get("head", "") not in ("", head):
                    found.add(waiter_id)
        return found

    def mark(self) -> dict[bytes, bytes]:
        """The namespace's mark of the enqueues that kept their entries (``B bypull``)."""
        found: dict[bytes, bytes] = self.admin.hgetall(self.keys.by_pull_mark)  # type: ignore[assignment]
        return found

    def leave_out_of_index(self, waiter_id: str, mark: dict[bytes, bytes]) -> None:
        """What a replica of the release before the index leaves of an enqueue: the waiter, no
        entry, and the mark as it was before the enqueue (``mark``)."""
        rec = self.record(waiter_id)
        for key in _keys_of(rec):
            self.admin.zrem(self.keys.by_pull(key), f"{rec['repo']}#{rec['pull']}\n{waiter_id}")
        self.admin.delete(self.keys.by_pull_mark)
        if mark:
            self.admin.hset(self.keys.by_pull_mark, mapping=mark)  # type: ignore[arg-type]

    def take_out_as_earlier_release(self, waiter_id: str) -> None:
        """What a replica of the release before the index does taking a waiter out of its
        queues (a grant, a cancel, a drop): its queue entries and its record go, its index
        entries stay."""
        rec = self.record(waiter_id)
        member = self.keys.queue_member(int(rec["seq"]), waiter_id)
        for key in _keys_of(rec):
            self.admin.zrem(self.keys.queue(key, int(rec["level"])), member)
        self.admin.delete(self.keys.waiter(waiter_id))


def _keys_of(rec: dict[str, str]) -> list[str]:
    keys: list[str] = json.loads(rec["keys"])
    return keys


_SHARED = SharedServer("pull-index")


@pytest.fixture(scope="module", autouse=True)
def _close_server() -> Iterator[None]:
    yield
    _SHARED.close()


class PullIndexModel(RuleBasedStateMachine):
    """Random waits, hand-offs, cancels and releases; each key's index against its queues."""

    def __init__(self) -> None:
        super().__init__()
        server = _SHARED.get()
        self.loop = asyncio.new_event_loop()
        config = redis_config(server, redis_key_prefix=_SHARED.prefix())
        self.backend = RedisBackend.from_config(config, "enhanced")
        self.admin = server.client()
        self.store = Store(self.admin, self.backend)
        self.waiters = itertools.count(1)
        self.dirty: set[str] = set()
        """Keys whose queues an earlier release changed without their index (until a request
        reads them whole, or they empty)."""
        self.taken: set[str] = set()
        """Waiters an earlier release took out of their queues, their index entries left."""

    def run(self, work: object) -> object:
        return self.loop.run_until_complete(work)  # type: ignore[arg-type]

    def teardown(self) -> None:
        try:
            self.run(self.backend.close())
        finally:
            self.loop.close()
            self.admin.close()

    def _enqueue(self, pull: int, paths: list[str], head: str, level: Priority,
                 shared: bool) -> tuple[Outcome, set[str]]:
        keys = [_key(p) for p in paths]
        older = self.store.older(keys, pull, head) if head else set()
        empty = {k for k in keys if not self.store.queued(k)}
        outcome = self.run(self.backend.acquire_batch(
            [_candidate(pull, p, head, level=level, shared=shared) for p in paths], ttl=HOUR,
            wait=Wait(id=f"w{next(self.waiters)}", timeout=HOUR), policy=POLICY))
        assert isinstance(outcome, Outcome)
        if outcome.status is Status.QUEUED:
            self.dirty -= empty  # (the first waiter makes the index anew)
        if head and outcome.status is Status.QUEUED:
            # No older request of the pull waits on its keys: each was superseded (or served
            # on the way, before the request was found blocked).
            assert not self.store.older(keys, pull, head)
            assert {w.id for w in outcome.superseded} <= older
            self.dirty -= set(keys)  # (read whole and made again)
        return outcome, older

    @rule(pull=st.sampled_from(PULLS), paths=st.lists(st.sampled_from(PATHS), min_size=1,
                                                      max_size=2, unique=True),
          head=st.sampled_from(HEADS), level=st.sampled_from(list(Priority)),
          shared=st.booleans())
    def acquire(self, pull: int, paths: list[str], head: str, level: Priority,
                shared: bool) -> None:
        self._enqueue(pull, paths, head, level, shared)

    def _named(self) -> list[tuple[str, str]]:
        """Every queued (waiter, path) whose request named a head commit."""
        return sorted({(w, p) for p in PATHS for w in self.store.queued(_key(p))
                       if self.store.record(w).get("head")})

    @precondition(lambda self: bool(self._named()))
    @rule(data=st.data(), shared=st.booleans())
    def next_commit(self, data: st.DataObject, shared: bool) -> None:
        """A queued request's pull asks again for one of its keys with its next commit."""
        waiter_id, path = data.draw(st.sampled_from(self._named()))
        rec = self.store.record(waiter_id)
        head = "c1" if rec["head"] != "c1" else "c2"
        self._enqueue(int(rec["pull"]), [path], head, Priority.NORMAL, shared)

    @rule(pull=st.sampled_from(PULLS), path=st.sampled_from(PATHS), head=st.sampled_from(HEADS))
    def earlier_release_queues(self, pull: int, path: str, head: str) -> None:
        mark = self.store.mark()
        outcome, _ = self._enqueue(pull, [path], head, Priority.NORMAL, False)
        if outcome.status is Status.QUEUED and outcome.waiter is not None:
            self.store.leave_out_of_index(outcome.waiter.id, mark)
            self.dirty.add(_key(path))

    @precondition(lambda self: any(self.store.queued(_key(p)) for p in PATHS))
    @rule(data=st.data())
    def earlier_release_takes_out(self, data: st.DataObject) -> None:
        """A replica of the release before grants, cancels or drops a waiter: its entries stay
        in the indexes of its keys."""
        queued = sorted({w for p in PATHS for w in self.store.queued(_key(p))})
        waiter_id = data.draw(st.sampled_from(queued))
        keys = _keys_of(self.store.record(waiter_id))
        self.store.take_out_as_earlier_release(waiter_id)
        self.dirty |= set(keys)
        self.taken.add(waiter_id)

    @rule(path=st.sampled_from(PATHS))
    def release(self, path: str) -> None:
        self.run(self.backend.release_and_handoff(_key(path), policy=POLICY))

    @rule(pull=st.sampled_from(PULLS))
    def release_by_pull(self, pull: int) -> None:
        self.run(self.backend.release_pull("acme/infra", pull, policy=POLICY))

    @precondition(lambda self: any(self.store.queued(_key(p)) for p in PATHS))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        queued = sorted({(w, _key(p)) for p in PATHS for w in self.store.queued(_key(p))})
        waiter_id, key = data.draw(st.sampled_from(queued))
        self.run(self.backend.cancel(key, waiter_id, policy=POLICY))

    @rule(path=st.sampled_from(PATHS))
    def expire(self, path: str) -> None:
        self.run(self.backend.expire(_key(path), policy=POLICY))

    @rule()
    def wake(self) -> None:
        self.run(self.backend.wake(policy=POLICY))

    @invariant()
    def each_index_lists_its_queues(self) -> None:
        for path in PATHS:
            key = _key(path)
            index, expected = self.store.index(key), self.store.expected(key)
            if key in self.dirty:
                # Short of the queues, and the entries of the waiters the earlier release took
                # out left: every other entry is a queued waiter's, under its own pull.
                kept = {e for e in index if e.split("\n", 1)[1] not in self.taken}
                assert kept <= expected, key
            else:
                assert index == expected, key


PullIndexModel.TestCase.settings = settings(
    max_examples=30, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPullIndexOnRedis = PullIndexModel.TestCase


# --- a store written by the release before the index ----------------------------------------------
KEY = _key("envs/a")


@pytest.fixture
async def held(redis_server: RedisServer) -> AsyncIterator[RedisBackend]:
    """A backend on ``redis_server`` with ``KEY`` held by pull 9 (so requests queue)."""
    backend = RedisBackend.from_config(redis_config(redis_server), "enhanced")
    granted = await backend.acquire_or_enqueue(_candidate(9, "envs/a", ""), ttl=None,
                                               wait=None, policy=POLICY)
    assert granted.status is Status.GRANTED
    yield backend
    await backend.close()


async def _queue(backend: RedisBackend, pull: int, head: str, waiter_id: str) -> Outcome:
    outcome = await backend.acquire_or_enqueue(
        _candidate(pull, "envs/a", head), ttl=None, wait=Wait(id=waiter_id, timeout=HOUR),
        policy=POLICY)
    assert outcome.status is Status.QUEUED, outcome
    return outcome


async def test_a_store_without_the_index_supersedes_and_gets_its_index(
        held: RedisBackend, redis_server: RedisServer) -> None:
    await _queue(held, 1, "c1", "old-1")
    await _queue(held, 2, "c1", "other-2")
    await _queue(held, 1, "", "no-head-1")
    with redis_server.client() as admin:
        store = Store(admin, held)
        # The release before kept no index: the store has the waiters alone.
        admin.delete(held.keys.by_pull(KEY))
        new = await _queue(held, 1, "c2", "new-1")
        assert [w.id for w in new.superseded] == ["old-1"]
        assert store.queued(KEY) == ["other-2", "no-head-1", "new-1"]
        assert store.index(KEY) == store.expected(KEY) == {
            "acme/infra#2\nother-2", "acme/infra#1\nno-head-1", "acme/infra#1\nnew-1"}
        # From now on the index is read: pull 1's next commit supersedes its last.
        newer = await _queue(held, 1, "c3", "newer-1")
        assert [w.id for w in newer.superseded] == ["new-1"]
        assert store.index(KEY) == store.expected(KEY)


async def test_a_waiter_queued_without_its_entry_is_found_and_indexed(
        held: RedisBackend, redis_server: RedisServer) -> None:
    # A replica of the release before, during a rolling upgrade, queues a waiter on a key whose
    # index this release keeps: the index is one short of the queues, and is read whole.
    await _queue(held, 2, "c1", "other-2")
    await _queue(held, 1, "c1", "old-1")
    with redis_server.client() as admin:
        store = Store(admin, held)
        store.leave_out_of_index("old-1", {})
        assert store.index(KEY) == {"acme/infra#2\nother-2"}
        new = await _queue(held, 1, "c2", "new-1")
        assert [w.id for w in new.superseded] == ["old-1"]
        assert store.index(KEY) == store.expected(KEY) == {
            "acme/infra#2\nother-2", "acme/infra#1\nnew-1"}


async def test_a_waiter_taken_out_and_another_queued_by_an_earlier_release_are_seen(
        held: RedisBackend, redis_server: RedisServer) -> None:
    # During a rolling upgrade a replica of the release before takes an indexed waiter out of
    # the key's queues and another queues one without its entry: the index lists as many
    # entries as the queues, but not the same.
    await _queue(held, 2, "c1", "other-2")
    with redis_server.client() as admin:
        store = Store(admin, held)
        mark = store.mark()
        await _queue(held, 1, "c1", "old-1")
        store.leave_out_of_index("old-1", mark)
        store.take_out_as_earlier_release("other-2")
        assert store.queued(KEY) == ["old-1"]
        assert store.index(KEY) == {"acme/infra#2\nother-2"}
        new = await _queue(held, 1, "c2", "new-1")
        assert [w.id for w in new.superseded] == ["old-1"]
        assert store.index(KEY) == store.expected(KEY) == {"acme/infra#1\nnew-1"}
        assert store.stamped(KEY)


async def test_a_waiter_whose_record_is_gone_is_indexed_as_nobodys_and_leaves_with_its_entry(
        held: RedisBackend, redis_server: RedisServer) -> None:
    await _queue(held, 2, "c1", "lost-2")
    await _queue(held, 1, "c1", "old-1")
    with redis_server.client() as admin:
        store = Store(admin, held)
        admin.delete(held.keys.by_pull(KEY), held.keys.waiter("lost-2"))
        new = await _queue(held, 1, "c2", "new-1")
        assert [w.id for w in new.superseded] == ["old-1"]
        assert store.index(KEY) == {"\nlost-2", "acme/infra#1\nnew-1"}
        # The walk that meets the entry without a record takes both out.
        await held.release_and_handoff(KEY, policy=POLICY)
        assert store.queued(KEY) == []
        assert store.index(KEY) == set()


async def test_an_index_written_over_with_another_type_is_made_again(
        held: RedisBackend, redis_server: RedisServer) -> None:
    await _queue(held, 1, "c1", "old-1")
    with redis_server.client() as admin:
        store = Store(admin, held)
        admin.set(held.keys.by_pull(KEY), "not an index")
        # A request naming no head commit reads no index: its member is left out, and
        # nothing fails.
        await _queue(held, 2, "", "other-2")
        assert admin.type(held.keys.by_pull(KEY)) == b"string"
        new = await _queue(held, 1, "c2", "new-1")
        assert [w.id for w in new.superseded] == ["old-1"]
        assert store.index(KEY) == store.expected(KEY) == {
            "acme/infra#2\nother-2", "acme/infra#1\nnew-1"}


# --- a shared request's look for an exclusive one ahead ----------------------------------------
def _calls(admin: redis.Redis) -> int:
    """How many function calls Redis has run."""
    stats: dict[str, dict[str, int]] = admin.info("commandstats")
    return int(stats.get("cmdstat_fcall", {}).get("calls", 0))


async def test_a_shared_request_kept_out_by_the_holder_names_no_waiter_of_the_key(
        held: RedisBackend, redis_server: RedisServer) -> None:
    # Its verdict answers 'held' on the exclusive holder before it would look for an
    # exclusive request waiting ahead: the call names none of the key's 30 waiters' records
    # (it asked for them all, one call more of 30 names), and queues behind them.
    for pull in range(10, 40):
        await _queue(held, pull, "", f"w-{pull}")
    with redis_server.client() as admin:
        before = _calls(admin)
        outcome = await held.acquire_or_enqueue(
            _candidate(2, "envs/a", "", shared=True), ttl=None,
            wait=Wait(id="shared-2", timeout=HOUR), policy=POLICY)
        assert outcome.status is Status.QUEUED and outcome.position == 31
        assert _calls(admin) - before == 1


def _widest_call(admin: redis.Redis) -> int:
    """The most keys one function call named since the slow log was last reset (every
    command is logged: ``slowlog-log-slower-than 0``)."""
    entries: list[dict[str, Any]] = admin.slowlog_get(1000)
    return max((int(e["command"].split()[2]) for e in entries
                if e["command"].startswith(b"FCALL ")), default=0)


async def test_a_shared_request_let_in_by_the_holders_names_the_records_up_to_an_exclusive_one(
        redis_server: RedisServer) -> None:
    # The key is held shared, so a shared request is let in by its holders and looks for an
    # exclusive request waiting ahead: it names the records its look reads (up to the first
    # exclusive one of another pull, a few at a time), not every waiter of the key.
    backend = RedisBackend.from_config(redis_config(redis_server), "enhanced")
    try:
        granted = await backend.acquire_or_enqueue(_candidate(9, "envs/a", "", shared=True),
                                                   ttl=None, wait=None, policy=POLICY)
        assert granted.status is Status.GRANTED
        first = await _queue(backend, 10, "", "exclusive-10")
        assert first.position == 1
        with redis_server.client() as admin:
            for pull in range(11, 31):  # shared requests of other pulls, behind it
                outcome = await backend.acquire_or_enqueue(
                    _candidate(pull, "envs/a", "", shared=True), ttl=None,
                    wait=Wait(id=f"shared-{pull}", timeout=HOUR), policy=POLICY)
                assert outcome.status is Status.QUEUED
            for pull in range(31, 231):  # and exclusive ones
                await _queue(backend, pull, "", f"w-{pull}")
            admin.config_set("slowlog-log-slower-than", 0)
            admin.config_set("slowlog-max-len", 1000)
            admin.slowlog_reset()
            outcome = await backend.acquire_or_enqueue(
                _candidate(2, "envs/a", "", shared=True), ttl=None,
                wait=Wait(id="shared-2", timeout=HOUR), policy=POLICY)
            assert outcome.status is Status.QUEUED and outcome.position == 222
            # (its key's own keys, the namespace's, its waiter's and a chunk of records)
            assert _widest_call(admin) < 60
            # A shared request of pull 10 itself is held back by no exclusive request of its
            # own pull: its look reads past it, to the first exclusive one of another pull,
            # behind the 20 shared ones (two chunks more of names).
            admin.slowlog_reset()
            own = await backend.acquire_or_enqueue(
                _candidate(10, "envs/a", "", shared=True), ttl=None,
                wait=Wait(id="shared-10", timeout=HOUR), policy=POLICY)
            assert own.status is Status.QUEUED
            assert _widest_call(admin) < 60
    finally:
        await backend.close()


async def test_a_shared_request_behind_queued_batches_names_its_look_in_few_rounds(
        redis_server: RedisServer) -> None:
    # Key A is held shared, key B exclusive by another pull; 100 batches, each shared on A and
    # exclusive on B, wait (on B) in A's queue too, none of them exclusive there. A new shared
    # request on A walks all of A's queue looking for an exclusive request ahead: it names the
    # records it reads in a few rounds (the chunk it asks for doubles each round), not one
    # round per 16 of them.
    backend = RedisBackend.from_config(redis_config(redis_server), "enhanced")
    try:
        on_a = await backend.acquire_or_enqueue(_candidate(9, "envs/a", "", shared=True),
                                                ttl=None, wait=None, policy=POLICY)
        on_b = await backend.acquire_or_enqueue(_candidate(8, "envs/b", ""),
                                                ttl=None, wait=None, policy=POLICY)
        assert on_a.status is Status.GRANTED and on_b.status is Status.GRANTED
        for pull in range(100, 200):
            queued = await backend.acquire_batch(
                (_candidate(pull, "envs/a", "", shared=True), _candidate(pull, "envs/b", "")),
                ttl=None, wait=Wait(id=f"batch-{pull}", timeout=HOUR), policy=POLICY)
            assert queued.status is Status.QUEUED, queued
        with redis_server.client() as admin:
            before = _calls(admin)
            outcome = await backend.acquire_or_enqueue(
                _candidate(2, "envs/a", "", shared=True), ttl=None,
                wait=Wait(id="shared-2", timeout=HOUR), policy=POLICY)
            assert outcome.status is Status.GRANTED, outcome
            # A first call; a round for each chunk of records its walks ask for (16, then as
            # many as they met: 17, 35, the last 29 of the 100); one for key B's names (the
            # batches' verdicts read its holders) and one for the batches' pulls' indexes
            # (their grants, planned, name them): 7, where one round per 16 records or fewer
            # made 81.
            assert _calls(admin) - before <= 7
    finally:
        await backend.close()
