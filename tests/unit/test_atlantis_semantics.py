"""Atlantis's ``Locker`` semantics, as a table, against every locker on every backend.

Each row is one behaviour of Atlantis's locking (``TryLock``, ``Unlock``, ``UnlockByPull``,
``List``, ``GetLock``, plus unlock-if-owned): a list of calls and what each must answer. The
table runs against the legacy locker, the enhanced locker and the router in front of both,
each over every backend kind of ``backend_factory`` (memory, the embedded SQLite file, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from tests.support.backends import BackendFactory

from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import EventBus
from enhanced_locking.locking import EnhancedLocker, LegacyLocker
from enhanced_locking.metrics import Metrics
from enhanced_locking.migration import Router
from enhanced_locking.provider import ConfigProvider
from enhanced_locking.types import Lock, LockNotOwned, Project, Pull, User, lock_key

AnyLocker = LegacyLocker | EnhancedLocker | Router
"""Every locker speaks Atlantis's calls (``AtlantisCalls``)."""


@dataclass(frozen=True)
class Target:
    """One Atlantis project in one workspace: what a lock key names."""

    repo: str
    path: str
    project: str = ""
    workspace: str = "default"

    @property
    def key(self) -> str:
        return lock_key(Project(repo_full_name=self.repo, path=self.path,
                                project_name=self.project), self.workspace)


PROD = Target("acme/infra", "envs/prod", "prod")
STAGING = Target("acme/infra", "envs/staging", "staging")
PROD_OTHER_WORKSPACE = Target("acme/infra", "envs/prod", "prod", workspace="blue")
UNNAMED = Target("acme/infra", ".")
WEB = Target("acme/web", "envs/prod", "prod")


@dataclass
class Run:
    """What the steps of one row remember: the first lock each pull got on each target."""

    locker: AnyLocker
    granted: dict[tuple[Target, int], Lock] = field(default_factory=dict)


class Step:
    async def run(self, run: Run) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class TryLock(Step):
    """``TryLock``: ``acquired`` and the pull now holding the key (``holder``)."""

    target: Target
    pull: int
    acquired: bool
    holder: int
    repo: str | None = None  # the pull's repository when it differs from the target's

    async def run(self, run: Run) -> None:
        project = Project(repo_full_name=self.target.repo, path=self.target.path,
                          project_name=self.target.project)
        pull = Pull(num=self.pull, url=f"https://git.example/{self.target.repo}/pull/{self.pull}",
                    author=f"dev{self.pull}")
        answer = await run.locker.try_lock(project, self.target.workspace, pull,
                                           User(username=f"dev{self.pull}"))
        assert answer.lock_key == self.target.key
        assert answer.lock_acquired is self.acquired
        assert answer.curr_lock is not None, "the answer always names the lock now held"
        assert answer.curr_lock.pull.num == self.holder
        assert answer.curr_lock.key == self.target.key
        held = (self.target, self.holder)
        if held in run.granted:  # the holder's lock is the one it was granted, unchanged
            assert answer.curr_lock == run.granted[held]
        elif self.acquired:
            run.granted[held] = answer.curr_lock


@dataclass(frozen=True)
class Unlock(Step):
    """``Unlock(key)``: the released lock's pull, or None when the key was free."""

    target: Target
    released: int | None

    async def run(self, run: Run) -> None:
        lock = await run.locker.unlock(self.target.key)
        assert (lock.pull.num if lock else None) == self.released
        run.granted.pop((self.target, self.released or 0), None)


@dataclass(frozen=True)
class UnlockIfOwned(Step):
    """Unlock only if ``pull`` holds the key; another holder refuses with ``LockNotOwned``."""

    target: Target
    pull: int
    released: int | None = None
    refused_by: int | None = None

    async def run(self, run: Run) -> None:
        call = run.locker.unlock_if_owned_by_pull(self.target.key, self.target.repo, self.pull)
        if self.refused_by is not None:
            with pytest.raises(LockNotOwned) as refused:
                await call
            assert refused.value.key == self.target.key
            assert refused.value.holder.pull.num == self.refused_by
            return
        lock = await call
        assert (lock.pull.num if lock else None) == self.released
        run.granted.pop((self.target, self.pull), None)


@dataclass(frozen=True)
class UnlockByPull(Step):
    """``UnlockByPull(repo, num)``: exactly the keys that pull held in that repository."""

    repo: str
    pull: int
    released: frozenset[Target]

    async def run(self, run: Run) -> None:
        locks = await run.locker.unlock_by_pull(self.repo, self.pull)
        assert sorted(lock.key for lock in locks) == sorted(t.key for t in self.released)
        assert all(lock.pull.num == self.pull for lock in locks)
        for target in self.released:
            run.granted.pop((target, self.pull), None)


@dataclass(frozen=True)
class ListLocks(Step):
    """``List()``: every held key and its pull."""

    held: dict[Target, int]

    async def run(self, run: Run) -> None:
        locks = await run.locker.list()
        assert {lock.key: lock.pull.num for lock in locks} == {
            target.key: pull for target, pull in self.held.items()}
        for lock in locks:  # List answers the same locks as GetLock
            assert lock == await run.locker.get_lock(lock.key)


@dataclass(frozen=True)
class GetLock(Step):
    """``GetLock(key)``: the holding pull, or None for a free key."""

    target: Target
    holder: int | None

    async def run(self, run: Run) -> None:
        lock = await run.locker.get_lock(self.target.key)
        assert (lock.pull.num if lock else None) == self.holder
        if lock is not None and (self.target, lock.pull.num) in run.granted:
            assert lock == run.granted[(self.target, lock.pull.num)]


TABLE: list[tuple[str, list[Step]]] = [
    ("a free key is granted to the first pull that asks", [
        TryLock(PROD, 1, acquired=True, holder=1),
        GetLock(PROD, 1),
    ]),
    ("a held key fails fast for another pull, naming the current holder", [
        TryLock(PROD, 1, acquired=True, holder=1),
        TryLock(PROD, 2, acquired=False, holder=1),
        GetLock(PROD, 1),
    ]),
    ("the same pull asking again gets its own lock back unchanged", [
        TryLock(PROD, 1, acquired=True, holder=1),
        TryLock(PROD, 1, acquired=True, holder=1),
        TryLock(PROD, 1, acquired=True, holder=1),
    ]),
    ("the same pull number of another repository is another pull", [
        TryLock(PROD, 7, acquired=True, holder=7),
        TryLock(WEB, 7, acquired=True, holder=7),
        UnlockByPull("acme/web", 7, released=frozenset({WEB})),
        GetLock(PROD, 7),
    ]),
    ("the key is project path, workspace and name: each is its own lock", [
        TryLock(PROD, 1, acquired=True, holder=1),
        TryLock(PROD_OTHER_WORKSPACE, 2, acquired=True, holder=2),
        TryLock(STAGING, 3, acquired=True, holder=3),
        TryLock(UNNAMED, 4, acquired=True, holder=4),
        ListLocks({PROD: 1, PROD_OTHER_WORKSPACE: 2, STAGING: 3, UNNAMED: 4}),
    ]),
    ("unlock frees the key and the next pull gets it", [
        TryLock(PROD, 1, acquired=True, holder=1),
        Unlock(PROD, released=1),
        GetLock(PROD, None),
        TryLock(PROD, 2, acquired=True, holder=2),
    ]),
    ("unlocking a free key answers nothing and is not an error", [
        Unlock(PROD, released=None),
        TryLock(PROD, 1, acquired=True, holder=1),
        Unlock(PROD, released=1),
        Unlock(PROD, released=None),
    ]),
    ("unlock-if-owned by the holding pull releases the lock", [
        TryLock(PROD, 1, acquired=True, holder=1),
        UnlockIfOwned(PROD, 1, released=1),
        GetLock(PROD, None),
    ]),
    ("unlock-if-owned by another pull is refused and the lock stays", [
        TryLock(PROD, 1, acquired=True, holder=1),
        UnlockIfOwned(PROD, 2, refused_by=1),
        GetLock(PROD, 1),
        TryLock(PROD, 2, acquired=False, holder=1),
    ]),
    ("unlock-if-owned on a free key answers nothing", [
        UnlockIfOwned(PROD, 1, released=None),
    ]),
    ("unlock by pull releases only that pull's locks of that repository", [
        TryLock(PROD, 1, acquired=True, holder=1),
        TryLock(STAGING, 1, acquired=True, holder=1),
        TryLock(PROD_OTHER_WORKSPACE, 2, acquired=True, holder=2),
        TryLock(WEB, 1, acquired=True, holder=1),
        UnlockByPull("acme/infra", 1, released=frozenset({PROD, STAGING})),
        ListLocks({PROD_OTHER_WORKSPACE: 2, WEB: 1}),
        TryLock(PROD, 3, acquired=True, holder=3),
    ]),
    ("unlock by a pull that holds nothing releases nothing", [
        TryLock(PROD, 1, acquired=True, holder=1),
        UnlockByPull("acme/infra", 2, released=frozenset()),
        ListLocks({PROD: 1}),
    ]),
    ("list is empty when nothing is held", [
        ListLocks({}),
        TryLock(PROD, 1, acquired=True, holder=1),
        Unlock(PROD, released=1),
        ListLocks({}),
    ]),
]


# --- the lockers under test -------------------------------------------------------------------

LockerBuilder = Callable[[BackendFactory], AnyLocker]


def _legacy(backends: BackendFactory) -> AnyLocker:
    return LegacyLocker(backends("legacy"))


def _enhanced(backends: BackendFactory) -> AnyLocker:
    config = EnhancedLockingConfig(enabled=True)
    return EnhancedLocker(backends("enhanced"), settings=lambda: config, events=EventBus(),
                          metrics=Metrics())


def _router(backends: BackendFactory) -> AnyLocker:
    # Half the keys on each side: the router must keep the semantics whichever side answers.
    provider = ConfigProvider(EnhancedLockingConfig(enabled=True, migration_weight=50))
    events = EventBus()
    enhanced = EnhancedLocker(backends("enhanced"), settings=lambda: provider.current.config,
                              events=events, metrics=Metrics())
    return Router(legacy=LegacyLocker(backends("legacy")), enhanced=lambda: enhanced,
                  snapshot=lambda: provider.current, events=events, metrics=Metrics())


LOCKERS: dict[str, LockerBuilder] = {"legacy": _legacy, "enhanced": _enhanced, "router": _router}


def test_the_router_table_spans_both_sides() -> None:
    provider = ConfigProvider(EnhancedLockingConfig(enabled=True, migration_weight=50))
    targets = [PROD, STAGING, PROD_OTHER_WORKSPACE, UNNAMED, WEB]
    sides = {provider.current.should_use_enhanced(target.key) for target in targets}
    assert sides == {True, False}, "pick targets so both sides of the router are exercised"


@pytest.mark.parametrize("locker_kind", list(LOCKERS))
@pytest.mark.parametrize(("behaviour", "steps"), TABLE, ids=[row[0] for row in TABLE])
async def test_atlantis_behaviour(
    behaviour: str, steps: list[Step], locker_kind: str, backend_factory: BackendFactory
) -> None:
    run = Run(LOCKERS[locker_kind](backend_factory))
    for number, step in enumerate(steps, 1):
        try:
            await step.run(run)
        except AssertionError as error:
            raise AssertionError(f"step {number} ({step}): {error}") from error
