"""Modes, concurrency limits and freezes under random operations (hypothesis stateful testing).

Hypothesis drives fail-fast and waiting acquires in both modes, releases, and rule edits (a
freeze on one key switched on and off, refusing or making requests wait; a concurrency limit
over every key raised, lowered and removed) against the enhanced locker. One model runs on
every store: the memory store, the embedded store on a real SQLite file, a real redis-server
and a real etcd (each example gets a fresh key prefix on one server per class). After every
step the store must keep the rules:

* no exclusive holder beside anyone (a key has one exclusive holder or only shared ones);
* no grant inside a freeze;
* never more than N held in the group (a limit lowered below what is held leaves those locks
  alone, and then nothing is granted until the group is under it);
* fencing tokens of a key rise with every grant (a pull's second request answered with the
  lock the pull holds is not a grant: no event, the same token);
* no free key keeps a waiter the rules would let in (a rule change serves the queues).

Example counts are kept small on the networked stores (each step is several round trips):
the whole file runs in about a minute.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from tests.support.etcd_fixtures import etcd_config
from tests.support.etcd_server import EtcdCluster
from tests.support.locks import request_for
from tests.support.queues import LockerRig, rig_for
from tests.support.redis_fixtures import redis_config
from tests.support.redis_server import RedisServer, RedisServerError

from enhanced_locking.backends import EmbeddedBackend, MemoryBackend, QueueBackend
from enhanced_locking.backends.etcd_store import EtcdBackend
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.policies import ConcurrencyLimit, Freeze, KeyPattern, PolicyRules
from enhanced_locking.types import LockingError, LockRequest, Reason, utcnow

PATHS = ("envs/a", "envs/b", "envs/c")
FROZEN = "envs/c"
PULLS = (1, 2, 3, 4)
GRANTS = ("acquired", "granted-from-queue")


def key_of(path: str) -> str:
    return request_for(path=path).key


_EXAMPLES = itertools.count(1)
_SERVERS: dict[str, Any] = {}
"""The redis-server and etcd of the running class (started by the fixtures below)."""


@pytest.fixture(scope="class")
def _policy_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    try:
        server = RedisServer(tmp_path_factory.mktemp("policy-redis")).start()
    except RedisServerError as error:
        pytest.fail(str(error), pytrace=False)
    _SERVERS["redis"] = server
    yield
    _SERVERS.pop("redis", None)
    server.close()


@pytest.fixture(scope="class")
def _policy_etcd(etcd_cluster: EtcdCluster) -> Iterator[None]:
    _SERVERS["etcd"] = etcd_cluster
    yield
    _SERVERS.pop("etcd", None)


class PolicyModel(RuleBasedStateMachine):
    """The model; a subclass says which store it runs on (:meth:`backend`)."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = TemporaryDirectory()
        self.rig: LockerRig = rig_for(self.backend())
        self.freeze: str | None = None  # None, "refuse" or "wait"
        self.frozen_since = utcnow()
        self.limit: int | None = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.seen = 0
        self.tokens: dict[str, int] = {}
        self.count_before = 0
        self.announced: set[tuple[str, int]] = set()
        self.answered: set[int] = set()
        self.owned: set[tuple[str, int]] = set()

    def run(self, work: Any) -> Any:
        return self.loop.run_until_complete(work)

    def teardown(self) -> None:
        async def close() -> None:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.rig.close()
            await self.rig.locker.backend.close()
        self.run(close())
        self.loop.close()
        self.tmp.cleanup()

    def backend(self) -> QueueBackend:
        return MemoryBackend()

    async def settle(self) -> None:
        """Until no call waits for the store, no grant notification is being handled, and
        none is on its way: every acquire still waiting is still in the store's queue (a
        waiter the store served but whose notice has not arrived yet would announce its
        grant later, after grants the model makes next)."""
        backend = self.rig.locker.backend
        quiet = 0
        deadline = time.monotonic() + 60
        while quiet < 3:
            assert time.monotonic() < deadline, "the store did not settle within 60 s"
            for _ in range(20):
                await asyncio.sleep(0)
            if not isinstance(backend, (RedisBackend, EtcdBackend)):
                return
            await asyncio.sleep(0.002)
            busy = backend.in_flight or (
                isinstance(backend, RedisBackend) and backend._listener.busy)
            if not busy:
                waiting = sum(not task.done() for task in self.tasks)
                queued = 0
                for path in PATHS:
                    queued += len(await self.rig.locker.queue(key_of(path)))
                busy = waiting != queued
            quiet = 0 if busy else quiet + 1

    def policy_rules(self) -> PolicyRules:
        freezes = [] if self.freeze is None else [Freeze(
            name="c", match=KeyPattern(path_prefix=FROZEN), message="c is frozen",
            action="refuse" if self.freeze == "refuse" else "wait")]
        limits = [] if self.limit is None else [ConcurrencyLimit(
            name="all", match=KeyPattern(path_prefix="envs"), limit=self.limit)]
        return PolicyRules(freezes=freezes, concurrency=limits)

    def held_count(self) -> int:
        return len(self.run(self.rig.locker.list()))

    def before(self) -> None:
        self.count_before = self.held_count()

    def request(self, pull: int, path: str, mode: str, wait: bool) -> LockRequest:
        return request_for(pull=pull, path=path).model_copy(update={
            "mode": mode, "wait": timedelta(minutes=5) if wait else None})

    # --- operations ---------------------------------------------------------------------------
    @rule(pull=st.sampled_from(PULLS), path=st.sampled_from(PATHS),
          mode=st.sampled_from(["shared", "exclusive"]), wait=st.booleans())
    def acquire(self, pull: int, path: str, mode: str, wait: bool) -> None:
        self.before()
        task = self.loop.create_task(self.rig.locker.acquire(self.request(pull, path, mode, wait)))
        self.tasks.append(task)
        self.run(self.settle())
        if task.done() and not task.cancelled() and task.exception() is None:
            answer = task.result()
            if path == FROZEN and self.freeze == "refuse" and not answer.acquired:
                assert answer.reason in (Reason.FROZEN, Reason.HELD), answer

    @rule(pull=st.sampled_from(PULLS), path=st.sampled_from(PATHS))
    def release(self, pull: int, path: str) -> None:
        self.before()
        try:
            self.run(self.rig.locker.release(key_of(path), owner=("acme/infra", pull)))
        except LockingError:
            pass
        self.run(self.settle())

    @rule(action=st.sampled_from([None, "refuse", "wait"]))
    def set_freeze(self, action: str | None) -> None:
        self.before()
        if self.freeze is None and action is not None:
            self.frozen_since = utcnow()
        self.freeze = action
        self.apply()

    @rule(limit=st.sampled_from([None, 1, 2, 3]))
    def set_limit(self, limit: int | None) -> None:
        self.before()
        self.limit = limit
        self.apply()

    def apply(self) -> None:
        self.rig.set(policies=self.policy_rules())
        self.run(self.rig.locker.wake())
        self.run(self.settle())

    # --- what must hold -----------------------------------------------------------------------
    @invariant()
    def the_rules_hold(self) -> None:
        holders = {path: self.run(self.rig.locker.holders(key_of(path))) for path in PATHS}
        for path, locks in holders.items():
            modes = [lock.mode for lock in locks]
            assert modes.count("exclusive") == 0 or len(modes) == 1, (path, modes)
        new = self.rig.events[self.seen:]
        self.seen = len(self.rig.events)
        granted = [event for event in new if event.type in GRANTS and event.lock is not None]
        count = sum(len(locks) for locks in holders.values())
        if granted and self.limit is not None:
            assert count <= max(self.limit, self.count_before), (count, self.limit)
        for event in granted:
            assert event.lock is not None
            if self.freeze is not None and event.lock.acquired_at >= self.frozen_since:
                assert event.lock.project.path != FROZEN, "granted inside a freeze"
            assert event.lock.fencing_token > self.tokens.get(event.lock.key, 0)
            self.tokens[event.lock.key] = event.lock.fencing_token
            self.announced.add((event.lock.key, event.lock.fencing_token))
        self.answers_match_the_events()

    def answers_match_the_events(self) -> None:
        """A granted answer is an announced grant, its own (``fresh``: no other answer got
        the same lock as fresh), or a lock its pull already held (not ``fresh``)."""
        for task in self.tasks:
            if id(task) in self.answered or not task.done():
                continue
            self.answered.add(id(task))
            if task.cancelled() or task.exception() is not None:
                continue
            answer = task.result()
            if answer.acquired and answer.lock is not None:
                seen = (answer.lock.key, answer.lock.fencing_token)
                assert seen in self.announced, (answer.fresh, seen)
                if answer.fresh or answer.upgraded:
                    assert seen not in self.owned, f"{seen} answered as a new grant twice"
                    self.owned.add(seen)

    @invariant()
    def no_free_key_keeps_a_grantable_waiter(self) -> None:
        count = self.held_count()
        for path in PATHS:
            key = key_of(path)
            if self.run(self.rig.locker.holders(key)):
                continue
            queue = self.run(self.rig.locker.queue(key))
            blocked = (self.freeze is not None and path == FROZEN) or (
                self.limit is not None and count >= self.limit)
            assert not queue or blocked, (path, [w.owner for w in queue])


class EmbeddedPolicyModel(PolicyModel):
    def backend(self) -> QueueBackend:
        return EmbeddedBackend(Path(self.tmp.name) / "model.db")


class RedisPolicyModel(PolicyModel):
    def backend(self) -> QueueBackend:
        server: RedisServer = _SERVERS["redis"]
        config = redis_config(server, redis_key_prefix=f"model{next(_EXAMPLES)}:")
        return RedisBackend.from_config(config, "enhanced")


class EtcdPolicyModel(PolicyModel):
    def backend(self) -> QueueBackend:
        cluster: EtcdCluster = _SERVERS["etcd"]
        config = etcd_config(cluster, f"/policy-model-{next(_EXAMPLES)}/")
        return EtcdBackend.from_config(config, "enhanced")


def _settings(examples: int, steps: int) -> settings:
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


PolicyModel.TestCase.settings = _settings(40, 25)
EmbeddedPolicyModel.TestCase.settings = _settings(25, 25)
RedisPolicyModel.TestCase.settings = _settings(15, 25)
EtcdPolicyModel.TestCase.settings = _settings(12, 25)

TestPoliciesOnMemory = PolicyModel.TestCase
TestPoliciesOnEmbedded = EmbeddedPolicyModel.TestCase
TestPoliciesOnRedis = pytest.mark.usefixtures("_policy_redis")(
    pytest.mark.redis(RedisPolicyModel.TestCase))
TestPoliciesOnEtcd = pytest.mark.usefixtures("_policy_etcd")(
    pytest.mark.etcd(EtcdPolicyModel.TestCase))
