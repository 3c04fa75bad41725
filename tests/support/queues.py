"""Fixtures for the queue tests: backends with queues, and enhanced lockers over them.

``queue_backend_factory`` is parametrised over ``QUEUE_BACKEND_KINDS``: the backend kinds that
implement :class:`~enhanced_locking.backends.base.QueueBackend`. A new kind joins every queue
test by adding its name here (it must also be in ``BACKEND_KINDS``, which says how to build it).

``rigs`` builds enhanced lockers over backends of the running kind (``rigs(**settings)``, one
new backend each) and closes them after the test.

``tests/conftest.py`` loads this module as a plugin, so the fixtures are everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pytest
from tests.support.backends import BACKEND_KINDS, BackendFactory

from enhanced_locking.backends import QueueBackend
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import EventBus
from enhanced_locking.locking import EnhancedLocker, queueing
from enhanced_locking.metrics import Metrics
from enhanced_locking.types import Event, LockingError, utcnow

__all__ = [
    "QUEUE_BACKEND_KINDS",
    "FakeClock",
    "LockerRig",
    "queue_backend_factory",
    "rig_for",
    "rigs",
    "settle",
    "waits_begun",
]

T = TypeVar("T")

QUEUE_BACKEND_KINDS: tuple[str, ...] = ("memory", "boltdb", "redis", "redis-cluster", "etcd")
"""Backend kinds with queues."""


@pytest.fixture(
    params=[pytest.param(name, marks=BACKEND_KINDS[name].marks, id=name)
            for name in QUEUE_BACKEND_KINDS]
)
async def queue_backend_factory(request: pytest.FixtureRequest) -> AsyncIterator[BackendFactory]:
    """Backends of each queue kind in turn (the test runs once per kind)."""
    kind = BACKEND_KINDS[request.param]
    factory = BackendFactory(request.param, kind.setup(request), persistent=kind.persistent,
                             revision_tokens=kind.revision_tokens)
    _NETWORKED.append(factory)
    yield factory
    _NETWORKED.remove(factory)
    await factory.close()


@pytest.fixture
async def rigs(queue_backend_factory: BackendFactory) -> AsyncIterator[Callable[..., LockerRig]]:
    """``rigs(**settings)``: an enhanced locker over a new backend of the running kind
    (``settings`` as for :func:`rig_for`); every one is closed after the test."""
    built: list[LockerRig] = []

    def build(**settings: Any) -> LockerRig:
        backend = queue_backend_factory()
        assert isinstance(backend, QueueBackend)
        built.append(rig_for(backend, **settings))
        return built[-1]
    yield build
    for rig in built:
        await rig.close()

_NETWORKED: list[BackendFactory] = []
"""Factories of the running test: ``settle`` waits until their Redis backends are quiet."""


def _busy() -> bool:
    for factory in _NETWORKED:
        for backend in factory.built:
            if getattr(backend, "in_flight", 0) or getattr(
                    getattr(backend, "_listener", None), "busy", False):
                return True
    return False


@dataclass
class FakeClock:
    """A clock the test moves by hand (for in-process stores: ``MemoryBackend(clock=...)``)."""

    now: datetime = field(default_factory=utcnow)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass
class LockerRig:
    """An enhanced locker over a backend, with live settings the test can change."""

    locker: EnhancedLocker
    events: list[Event]
    metrics: Metrics
    settings: dict[str, Any]

    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def set(self, **changes: Any) -> None:
        self.settings.update(changes)

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``work`` as a task that ``close()`` cancels if it is still waiting."""
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.append(task)
        return task

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task
        await self.locker.close()

    def types(self) -> list[str]:
        return [event.type for event in self.events]


def rig_for(backend: QueueBackend, **settings: Any) -> LockerRig:
    """An enhanced locker over ``backend``; ``settings`` are config field names."""
    live: dict[str, Any] = {"enabled": True, **settings}
    cache: dict[str, EnhancedLockingConfig] = {}

    def config() -> EnhancedLockingConfig:
        key = repr(sorted(live.items()))
        if key not in cache:
            cache.clear()
            cache[key] = EnhancedLockingConfig(**live)
        return cache[key]

    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    metrics = Metrics()
    locker = EnhancedLocker(backend, settings=config, events=bus, metrics=metrics)
    return LockerRig(locker=locker, events=seen, metrics=metrics, settings=live)


async def _in_transit() -> bool:
    """A Redis backend's waiter that is no longer queued and not yet told: the message of its
    grant (or removal) is on its way. Redis writes the answer of the call that granted it
    before the message, and on a busy machine the second write came many milliseconds after
    the first: no number of quiet checks a few milliseconds apart is sure to see it."""
    for factory in _NETWORKED:
        for backend in factory.built:
            if not isinstance(backend, RedisBackend):
                continue
            waiting = set(backend._notifier.pending())
            if not waiting:
                continue
            try:
                async with asyncio.timeout(1.0):
                    graph = await backend.wait_graph()
            except (LockingError, TimeoutError):
                continue  # Redis is away (the test stopped it): this cannot tell
            if waiting - {w.id for entry in graph for w in entry.waiters}:
                return True
    return False


async def settle(rounds: int = 5) -> None:
    """Let tasks woken by a grant run (a handoff resolves a future; its waiter runs next).

    With a Redis backend, calls wait for the network: keep going until no call is waiting for
    Redis, no notification is being handled and none is on its way (every waiter still
    waiting here is still queued), three times in a row a few milliseconds apart.
    """
    for _ in range(rounds):
        await asyncio.sleep(0)
    if not any(f.kind in ("redis", "redis-cluster", "etcd") for f in _NETWORKED):
        return
    quiet = 0
    for _ in range(2000):
        await asyncio.sleep(0.002)
        quiet = 0 if _busy() or await _in_transit() else quiet + 1
        if quiet >= 3:
            break
        for _ in range(rounds):
            await asyncio.sleep(0)


Maker = Callable[..., LockerRig]


def waits_begun(monkeypatch: pytest.MonkeyPatch, count: int) -> list[asyncio.Event]:
    """Events set as each of the next ``count`` waits for a turn begins, in order (a wait
    past them sets the last): a test knows when a caller is waiting on its waiter."""
    begun = [asyncio.Event() for _ in range(count)]
    await_turn = queueing.await_turn

    async def waits(*args: Any, **kwargs: Any) -> Any:
        for event in begun[:-1]:
            if not event.is_set():
                event.set()
                break
        else:
            begun[-1].set()
        return await await_turn(*args, **kwargs)

    monkeypatch.setattr(queueing, "await_turn", waits)
    return begun
