"""The enhanced locker against a small reference model (hypothesis stateful testing).

The model is written from the rules (DESIGN §3 and the QueueBackend contract), not from the
code: who holds each key with which fencing token, which requests wait in which order, and what
each waiting caller must have been told. Hypothesis drives acquire (fail fast or waiting, with
or without a lease), batch, release, force-unlock, release by pull, cancel, the clock moving,
and lease expiry, and after every step the real locker must agree with the model.

The store runs on a clock the test moves; lease timers are left to the test (the ``expire``
rule is the timer firing), so every step is deterministic.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from tests.support.locks import request_for
from tests.support.queues import FakeClock, LockerRig, rig_for

from enhanced_locking.backends import EmbeddedBackend, MemoryBackend, QueueBackend
from enhanced_locking.locking.leasing import LeaseTimers
from enhanced_locking.types import (
    AcquireResult,
    BatchItem,
    BatchLockRequest,
    BatchResult,
    Priority,
    Pull,
    Reason,
)

KEYS = ("a", "b", "c")
PULLS = (1, 2, 3, 4)
THRESHOLD_MS = 1000
MAX_BOOST = 2
MAX_QUEUE = 3
WAIT = timedelta(minutes=5)
LEASE = timedelta(seconds=1)
LEVEL = {Priority.LOW: 0, Priority.NORMAL: 1, Priority.HIGH: 2, Priority.CRITICAL: 3}


def key_of(path: str) -> str:
    return request_for(path=path).key


@dataclass
class Held:
    pull: int
    token: int
    expires: datetime | None


@dataclass
class Waiting:
    name: str
    pull: int
    paths: tuple[str, ...]
    priority: Priority
    enqueued: datetime
    seq: int
    ttl: timedelta | None
    task: asyncio.Task[Any]
    told: str | None = None  # what the model says its caller was answered


class LockerModel(RuleBasedStateMachine):
    store = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = TemporaryDirectory()
        self.clock = FakeClock()
        backend: QueueBackend
        if self.store == "memory":
            backend = MemoryBackend(clock=self.clock)
            self.floor = backend.token_floor
        else:
            backend = EmbeddedBackend(Path(self.tmp.name) / "model.db", clock=self.clock)
            self.floor = 0  # (a new file's)
        self.rig: LockerRig = rig_for(
            backend, priority_queue=True,
            starvation_threshold=timedelta(milliseconds=THRESHOLD_MS),
            max_priority_boost=MAX_BOOST, max_queue_size=MAX_QUEUE)
        # The test is the lease timer: timers set far in the future never fire on their own.
        far_past = datetime(1970, 1, 1, tzinfo=UTC)
        self.rig.locker.leases = LeaseTimers(self.rig.locker.expire, clock=lambda: far_past)
        self.held: dict[str, Held] = {}
        self.tokens: dict[str, int] = {}
        self.waiting: list[Waiting] = []
        self.done: list[Waiting] = []
        self.seq = 0
        self.names = 0

    def run(self, work: Any) -> Any:
        return self.loop.run_until_complete(work)

    def teardown(self) -> None:
        async def close() -> None:
            for waiter in self.waiting:
                waiter.task.cancel()
            await asyncio.gather(*(w.task for w in self.waiting), return_exceptions=True)
            await self.rig.locker.close()
            await self.rig.locker.backend.close()
        self.run(close())
        self.loop.close()
        self.tmp.cleanup()

    async def settle(self) -> None:
        for _ in range(12):
            await asyncio.sleep(0)

    # --- the model's rules ---------------------------------------------------------------------
    def live(self, path: str) -> Held | None:
        held = self.held.get(path)
        if held is not None and held.expires is not None and held.expires <= self.clock.now:
            return None
        return held

    def level(self, waiter: Waiting) -> int:
        waited = (self.clock.now - waiter.enqueued) / timedelta(milliseconds=1)
        boost = min(MAX_BOOST, math.floor(max(waited, 0) / THRESHOLD_MS))
        return min(3, LEVEL[waiter.priority] + boost)

    def order(self, path: str) -> list[Waiting]:
        on_key = [w for w in self.waiting if path in w.paths]
        return sorted(on_key, key=lambda w: (-self.level(w), w.enqueued, w.seq))

    def grant(self, path: str, pull: int, ttl: timedelta | None) -> Held:
        self.tokens[path] = self.tokens.get(path, 0) + 1
        held = Held(pull, self.tokens[path], self.clock.now + ttl if ttl else None)
        self.held[path] = held
        return held

    def hand_out(self, path: str) -> None:
        if self.live(path) is not None:
            return  # only a free key is handed out
        for waiter in self.order(path):
            others = [p for p in waiter.paths if p != path]
            if all((h := self.live(p)) is None or h.pull == waiter.pull for p in others):
                for p in waiter.paths:
                    if (h := self.live(p)) is None or h.pull != waiter.pull:
                        self.grant(p, waiter.pull, waiter.ttl)
                waiter.told = "granted"
                self.waiting.remove(waiter)
                self.done.append(waiter)
                return

    def settle_key(self, path: str) -> None:
        held = self.held.get(path)
        if held is not None and self.live(path) is None:
            del self.held[path]
            held = None
        if held is None:
            self.hand_out(path)

    def free_key(self, path: str) -> None:
        self.held.pop(path, None)
        self.hand_out(path)

    def same_token(self, path: str, model: int, actual: int) -> bool:
        """Whether the store's token is the one the model issued (a counter per key here,
        from 1; the store's counts from its floor)."""
        return actual == self.floor + model

    # --- rules -----------------------------------------------------------------------------------
    @initialize()
    def start(self) -> None:
        pass

    @rule(pull=st.sampled_from(PULLS), path=st.sampled_from(KEYS),
          priority=st.sampled_from(list(Priority)), wait=st.booleans(),
          ttl=st.sampled_from([None, LEASE]))
    def acquire(self, pull: int, path: str, priority: Priority, wait: bool,
                ttl: timedelta | None) -> None:
        request = request_for(pull=pull, path=path, priority=priority, ttl=ttl,
                              wait=WAIT if wait else None)
        self.names += 1
        name = f"r{self.names}"
        request = request.model_copy(update={"request_id": name})
        task = self.loop.create_task(self.rig.locker.acquire(request))
        self.run(self.settle())

        self.settle_key(path)
        holder = self.live(path)
        expected: tuple[str, Any]
        if holder is None:
            expected = ("granted", self.grant(path, pull, ttl))
        elif holder.pull == pull:
            expected = ("granted", holder)
        elif not wait:
            expected = ("refused", Reason.HELD)
        elif len([w for w in self.waiting if path in w.paths]) >= MAX_QUEUE:
            expected = ("refused", Reason.QUEUE_FULL)
        else:
            self.seq += 1
            self.waiting.append(Waiting(name, pull, (path,), priority, self.clock.now, self.seq,
                                        ttl, task))
            assert not task.done(), task.result()
            return
        assert task.done(), f"{name} should have been answered at once: {expected}"
        result: AcquireResult = task.result()
        if expected[0] == "granted":
            granted = expected[1]
            assert isinstance(granted, Held)
            assert result.acquired and result.lock is not None, result
            assert result.lock.pull.num == granted.pull, (result, expected)
            assert self.same_token(path, granted.token, result.lock.fencing_token), result
        else:
            assert result.reason is expected[1], (result, expected)

    @rule(pull=st.sampled_from(PULLS), paths=st.lists(st.sampled_from(KEYS), min_size=2,
                                                       max_size=3, unique=True),
          wait=st.booleans())
    def batch(self, pull: int, paths: list[str], wait: bool) -> None:
        self.names += 1
        name = f"b{self.names}"
        request = BatchLockRequest(
            locks=[BatchItem(project=request_for(path=p).project) for p in paths],
            pull=Pull(num=pull), wait=WAIT if wait else None, request_id=name)
        task = self.loop.create_task(self.rig.locker.acquire_batch(request))
        self.run(self.settle())

        for path in paths:
            self.settle_key(path)
        blocked = [p for p in paths if (h := self.live(p)) is not None and h.pull != pull]
        if not blocked:
            for path in paths:
                if (h := self.live(path)) is None or h.pull != pull:
                    self.grant(path, pull, None)
            result: BatchResult = task.result()
            assert result.acquired
            assert [lock.pull.num for lock in result.locks] == [self.held[p].pull for p in paths]
            assert all(self.same_token(p, self.held[p].token, lock.fencing_token)
                       for p, lock in zip(paths, result.locks, strict=True)), result
            return
        if not wait:
            assert task.result().reason is Reason.HELD
            assert task.result().lock_key == key_of(blocked[0])
            return
        if any(len([w for w in self.waiting if p in w.paths]) >= MAX_QUEUE for p in paths):
            assert task.result().reason is Reason.QUEUE_FULL
            return
        self.seq += 1
        self.waiting.append(Waiting(name, pull, tuple(paths), Priority.NORMAL, self.clock.now,
                                    self.seq, None, task))
        assert not task.done()

    @rule(path=st.sampled_from(KEYS), force=st.booleans())
    def release(self, path: str, force: bool) -> None:
        locker = self.rig.locker
        expected = self.live(path)
        released = self.run(locker.force_unlock(key_of(path)) if force
                            else locker.release(key_of(path)))
        assert (released is None) == (expected is None), (released, expected)
        assert released is None or expected is None or self.same_token(
            path, expected.token, released.fencing_token), (released, expected)
        self.free_key(path)
        self.run(self.settle())

    @rule(pull=st.sampled_from(PULLS))
    def release_by_pull(self, pull: int) -> None:
        released = self.run(self.rig.locker.release_by_pull("acme/infra", pull))
        mine = sorted(p for p, h in self.held.items() if h.pull == pull)
        assert sorted(lock.key for lock in released) == sorted(
            key_of(p) for p in mine if self.live(p) is not None)
        for path in mine:
            del self.held[path]
        for path in mine:
            self.hand_out(path)
        self.run(self.settle())

    @precondition(lambda self: bool(self.waiting))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        waiter = data.draw(st.sampled_from(self.waiting))
        cancelled = self.run(self.rig.locker.cancel_waiter(key_of(waiter.paths[0]), waiter.name))
        assert cancelled is not None
        waiter.told = "cancelled"
        self.waiting.remove(waiter)
        self.done.append(waiter)
        # Whoever it held back is served: on a key whose holder's lease has run out (its timer
        # not yet fired), the next waiter is granted now.
        for path in waiter.paths:
            self.settle_key(path)
        self.run(self.settle())

    @rule(ms=st.sampled_from([1, 200, 999, 1000, 1500]))
    def time_passes(self, ms: int) -> None:
        self.clock.advance(timedelta(milliseconds=ms))

    @rule(path=st.sampled_from(KEYS))
    def lease_timer_fires(self, path: str) -> None:
        self.run(self.rig.locker.expire(key_of(path)))
        self.settle_key(path)
        self.run(self.settle())

    # --- agreement -------------------------------------------------------------------------------
    @invariant()
    def holders_agree(self) -> None:
        for path in KEYS:
            actual = self.run(self.rig.locker.get(key_of(path)))
            expected = self.live(path)
            seen = actual.pull.num if actual else None
            assert seen == (expected.pull if expected else None), path
            assert actual is None or expected is None or self.same_token(
                path, expected.token, actual.fencing_token), (path, actual, expected)

    @invariant()
    def queues_agree(self) -> None:
        for path in KEYS:
            actual = self.run(self.rig.locker.queue(key_of(path)))
            assert [w.request_id for w in actual] == [w.name for w in self.order(path)], path

    @invariant()
    def callers_were_told(self) -> None:
        for waiter in self.waiting:
            assert not waiter.task.done(), (waiter.name, waiter.task.result())
        for waiter in self.done:
            assert waiter.task.done(), waiter.name
            result = waiter.task.result()
            if waiter.told == "granted":
                assert result.acquired, (waiter.name, result)
                locks = [result.lock] if isinstance(result, AcquireResult) else result.locks
                assert all(lock is not None and lock.pull.num == waiter.pull for lock in locks)
            else:
                assert result.reason is Reason.CANCELLED, (waiter.name, result)
        self.done.clear()


LockerModel.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLockerOnMemory = LockerModel.TestCase


class EmbeddedLockerModel(LockerModel):
    store = "boltdb"


EmbeddedLockerModel.TestCase.settings = settings(
    max_examples=25, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLockerOnEmbedded = EmbeddedLockerModel.TestCase
