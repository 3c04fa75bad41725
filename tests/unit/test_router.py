"""The router: sticky percentage routing, disabled means legacy, no double grants, fallback."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.conftest import ServiceMaker
from tests.support.backends import BackendFactory
from tests.support.locks import request_for
from tests.support.replicas import ReplicaSet, request_in_buckets

from enhanced_locking.backends import MemoryBackend
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import EventBus
from enhanced_locking.factory import LockService
from enhanced_locking.hashing import BUCKETS, bucket_of, is_enhanced_bucket
from enhanced_locking.kube.rollout_driver import live_view
from enhanced_locking.locking import EnhancedLocker, LegacyLocker
from enhanced_locking.metrics import Metrics
from enhanced_locking.migration import Router
from enhanced_locking.migration.routing_registry import MemoryRoutingRegistry
from enhanced_locking.provider import ConfigProvider
from enhanced_locking.types import (
    AcquireResult,
    BackendUnavailable,
    Event,
    LockNotOwned,
    LockRequest,
    Reason,
)


def atlantis_keys(count: int) -> list[str]:
    """Lock keys shaped like a real Atlantis install's: repos, project dirs, workspaces."""
    return [
        f"org{i % 17}/repo-{i % 389}/modules/svc-{i}/{('default', 'staging', 'prod')[i % 3]}/"
        f"{'' if i % 4 else f'project-{i}'}"
        for i in range(count)
    ]


KEYS = atlantis_keys(10_000)


def router_at(weight: float | None, *, enabled: bool = True) -> Router:
    """A router over in-memory sides, for routing decisions."""
    config = EnhancedLockingConfig(enabled=enabled, migration_weight=weight)
    provider = ConfigProvider(config)
    legacy = LegacyLocker(MemoryBackend("legacy"))
    enhanced = EnhancedLocker(MemoryBackend("enhanced"), settings=lambda: config,
                              events=EventBus(), metrics=Metrics())
    return Router(legacy=legacy, enhanced=lambda: enhanced, snapshot=lambda: provider.current,
                  events=EventBus(), metrics=Metrics())


def enhanced_share(router: Router, keys: list[str]) -> float:
    return 100 * sum(router.side_for(key) == "enhanced" for key in keys) / len(keys)


# --- sticky hashing ------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [0, 0.5, 12.34, 50, 99.99, 100])
def test_a_key_always_lands_on_the_same_side_for_a_weight(weight: float) -> None:
    first, second = router_at(weight), router_at(weight)
    sides = [first.side_for(key) for key in KEYS[:2000]]
    assert sides == [first.side_for(key) for key in KEYS[:2000]]
    assert sides == [second.side_for(key) for key in KEYS[:2000]]


def test_buckets_do_not_depend_on_the_process_or_its_hash_seed() -> None:
    keys = KEYS[:500]
    script = ("import json, sys; from enhanced_locking.hashing import bucket_of; "
              "print(json.dumps([bucket_of(k) for k in json.load(sys.stdin)]))")
    for seed in ("4242",):
        out = subprocess.run([sys.executable, "-c", script], input=json.dumps(keys), text=True,
                             capture_output=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        assert json.loads(out) == [bucket_of(key) for key in keys]


def test_raising_the_weight_only_moves_keys_from_legacy_to_enhanced() -> None:
    weights = sorted({0, 0.01, 0.5, 1, 2.5, 99.99, 100, *(w / 4 for w in range(0, 401, 3))})
    keys = KEYS[:2000]
    previous: set[str] = set()
    for weight in weights:
        router = router_at(weight)
        enhanced = {key for key in keys if router.side_for(key) == "enhanced"}
        assert previous <= enhanced, f"at {weight}% a key went back to legacy"
        previous = enhanced
    assert previous == set(keys)


@given(st.integers(0, BUCKETS - 1), st.integers(0, 10_000), st.integers(0, 10_000))
def test_a_bucket_on_the_enhanced_side_stays_there_when_the_weight_rises(
    bucket: int, low: int, high: int
) -> None:
    low, high = sorted((low, high))
    if is_enhanced_bucket(bucket, low / 100):
        assert is_enhanced_bucket(bucket, high / 100)


@pytest.mark.parametrize("weight", [0, 1, 5, 10, 25, 50, 75, 90, 99, 100])
def test_ten_thousand_keys_land_within_one_percent_of_the_weight(weight: float) -> None:
    assert enhanced_share(router_at(weight), KEYS) == pytest.approx(weight, abs=1)


def test_enabled_without_a_migration_routes_every_key_to_enhanced() -> None:
    assert enhanced_share(router_at(None), KEYS[:1000]) == 100


@pytest.mark.parametrize("weight", [None, 0, 50, 100])
def test_disabled_routes_every_key_to_legacy_whatever_the_weight(weight: float | None) -> None:
    assert enhanced_share(router_at(weight, enabled=False), KEYS[:1000]) == 0


# --- disabled: the enhanced locker is never asked --------------------------------------------


class CountingEnhancedLocker(EnhancedLocker):
    """A real enhanced locker that also counts the acquires it is asked for."""

    acquires = 0

    async def acquire(self, request: LockRequest) -> AcquireResult:
        self.acquires += 1
        return await super().acquire(request)


async def test_disabled_never_builds_or_calls_the_enhanced_locker(
    make_service: ServiceMaker,
) -> None:
    service = await make_service(enabled=False, migration_weight=100)
    assert service.enhanced is None
    for pull, key in enumerate(KEYS[:200], 1):
        repo = key.partition("/modules/")[0]
        result = await service.router.acquire(request_for(repo=repo, path=f"modules/{pull}",
                                                          pull=pull))
        assert result.acquired and result.lock is not None
        assert result.lock.backend == "legacy"
    assert service.enhanced is None
    assert len(await service.legacy.list()) == 200


async def test_switched_off_after_use_the_enhanced_locker_is_never_asked_to_grant(
    backend_factory: BackendFactory,
) -> None:
    provider = ConfigProvider(EnhancedLockingConfig(enabled=True))
    enhanced = CountingEnhancedLocker(backend_factory("enhanced"),
                                      settings=lambda: provider.current.config,
                                      events=EventBus(), metrics=Metrics())
    router = Router(legacy=LegacyLocker(backend_factory("legacy")), enhanced=lambda: enhanced,
                    snapshot=lambda: provider.current, events=EventBus(), metrics=Metrics())
    before_off = await router.acquire(request_for(path="before"))
    assert before_off.lock is not None and before_off.lock.backend == "enhanced"
    await provider.set_layer("cluster", {"enabled": False})
    before = enhanced.acquires
    for pull in range(1, 51):
        result = await router.acquire(request_for(path=f"after/{pull}", pull=pull))
        assert result.acquired and result.lock is not None and result.lock.backend == "legacy"
    assert enhanced.acquires == before


# --- no lock granted twice across the sides --------------------------------------------------


async def _service_at(make_service: ServiceMaker, weight: float, **settings: Any) -> LockService:
    return await make_service(enabled=True, migration_weight=weight, **settings)


@pytest.mark.parametrize(("held_at", "moved_to"), [(100, 0), (0, 100)],
                         ids=["held-on-enhanced", "held-on-legacy"])
async def test_a_key_held_on_the_other_side_is_refused_not_granted_twice(
    make_service: ServiceMaker, held_at: float, moved_to: float
) -> None:
    service = await _service_at(make_service, held_at)
    first = await service.router.acquire(request_for(pull=1))
    assert first.acquired and first.lock is not None
    side = first.lock.backend
    await service.provider.set_layer("migration", {"migration_weight": moved_to})
    assert service.router.side_for(first.lock_key) != side

    refused = await service.router.acquire(request_for(pull=2))
    assert not refused.acquired
    assert refused.reason == Reason.HELD
    assert refused.holder == first.lock
    assert await service.router.get(first.lock_key) == first.lock
    assert [lock.backend for lock in await service.router.list()] == [side]

    again = await service.router.acquire(request_for(pull=1))
    assert again.acquired and again.lock == first.lock, "the holder gets its lock unchanged"
    assert len(await service.router.list()) == 1

    assert await service.router.release(first.lock_key, owner=("acme/infra", 1)) == first.lock
    moved = await service.router.acquire(request_for(pull=2))
    assert moved.acquired and moved.lock is not None and moved.lock.backend != side


async def test_an_exclusive_ask_is_refused_while_another_pull_shares_the_key_on_the_other_side(
    make_service: ServiceMaker,
) -> None:
    """Pulls 1 and 2 hold the key shared on enhanced; the weight moves it to legacy. Pull 1
    asking for it exclusive is not answered with its own shared hold as if that were all:
    pull 2 shares the key, so the exclusive ask is refused (held, naming a shared holder), as
    on enhanced alone, both while the key moves and once the move settled. Each of them
    asking for it shared again still gets its own hold unchanged."""
    service = await _service_at(make_service, 100)
    shared = {"mode": "shared"}
    first = await service.router.acquire(request_for(pull=1).model_copy(update=shared))
    second = await service.router.acquire(request_for(pull=2).model_copy(update=shared))
    assert first.acquired and second.acquired and second.lock is not None
    alone = await service.router.acquire(request_for(pull=1))
    assert not alone.acquired and alone.reason == Reason.HELD
    await service.provider.set_layer("migration", {"migration_weight": 0})
    assert service.router.side_for(first.lock_key) == "legacy"

    for moving in (True, False):  # while the key moves (both sides), then once it settled
        if not moving:
            async with asyncio.timeout(10):
                await service.migration.transitions.wait_settled()
            assert not service.migration.transitions.plan(first.lock_key).both
        upgrade = await service.router.acquire(request_for(pull=1))
        assert not upgrade.acquired, upgrade
        assert upgrade.reason == Reason.HELD and upgrade.holder is not None
        assert upgrade.holder.pull.num in (1, 2) and upgrade.holder.mode == "shared"
    for pull, mine in ((1, first), (2, second)):
        again = await service.router.acquire(request_for(pull=pull).model_copy(update=shared))
        assert again.acquired and again.lock is not None and mine.lock is not None
        assert (again.lock.pull.num, again.lock.fencing_token) == (pull, mine.lock.fencing_token)
    assert [lock.backend for lock in await service.router.list()] == ["enhanced"]


async def test_an_exclusive_ask_is_not_granted_its_own_shared_hold_when_the_holders_are_unread(
    make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, but the enhanced store answers the look at the key and then fails the read
    of its holders (a blip between the two calls): whether another pull shares the key is
    not known, so pull 1's exclusive ask is not answered with its own shared hold as if it
    were all (an apply beside pull 2's plan); the store is treated as not answering. A
    shared ask is still answered with its own hold."""
    service = await _service_at(make_service, 100)
    shared = {"mode": "shared"}
    first = await service.router.acquire(request_for(pull=1).model_copy(update=shared))
    second = await service.router.acquire(request_for(pull=2).model_copy(update=shared))
    assert first.acquired and second.acquired and first.lock is not None
    await service.provider.set_layer("migration", {"migration_weight": 0})
    async with asyncio.timeout(10):
        await service.migration.transitions.wait_settled()
    enhanced = service.enhanced
    assert isinstance(enhanced, EnhancedLocker)

    async def unread(key: str) -> Any:
        raise BackendUnavailable("the holders of the key could not be read")

    monkeypatch.setattr(enhanced, "holders", unread)
    with pytest.raises(BackendUnavailable):
        upgrade = await service.router.acquire(request_for(pull=1))
        raise AssertionError(f"answered {upgrade}")
    again = await service.router.acquire(request_for(pull=1).model_copy(update=shared))
    assert again.acquired and again.lock is not None
    assert again.lock.fencing_token == first.lock.fencing_token


@pytest.mark.parametrize("moving", [True, False], ids=["while-moving", "once-settled"])
async def test_a_shared_holder_asking_exclusive_across_the_sides_is_upgraded_or_refused(
    make_service: ServiceMaker, moving: bool
) -> None:
    """Pull 1 holds the key shared on enhanced; the weight moves it to legacy. Pull 1 asking
    for it exclusive is given what enhanced alone gives: its hold upgraded in place (exclusive,
    a new token), not its shared hold back unchanged, both while the key moves and once the
    move settled (each a case). Asked exclusive again, the same lock. Once the weight comes
    back to enhanced, pull 2 asking for the key shared is refused, never granted beside pull
    1's exclusive hold."""
    shared = {"mode": "shared"}
    service = await _service_at(make_service, 100)
    assert service.enhanced is not None
    first = await service.router.acquire(request_for(pull=1).model_copy(update=shared))
    assert first.acquired and first.lock is not None and first.lock.backend == "enhanced"
    await service.provider.set_layer("migration", {"migration_weight": 0})
    assert service.router.side_for(first.lock_key) == "legacy"
    if not moving:
        async with asyncio.timeout(10):
            await service.migration.transitions.wait_settled()
        assert not service.migration.transitions.plan(first.lock_key).both
    upgrade = await service.router.acquire(request_for(pull=1))
    assert upgrade.acquired and upgrade.lock is not None, upgrade
    assert upgrade.lock.mode == "exclusive", upgrade
    assert not upgrade.fresh  # a hold the pull had: never given back as this call's grant
    held = await service.enhanced.holders(first.lock_key)
    assert [(lock.pull.num, lock.mode) for lock in held] == [(1, "exclusive")]
    assert held[0].fencing_token > first.lock.fencing_token
    again = await service.router.acquire(request_for(pull=1))
    assert again.acquired and not again.fresh and again.lock is not None
    assert again.lock.fencing_token == upgrade.lock.fencing_token
    await service.provider.set_layer("migration", {"migration_weight": 100})
    async with asyncio.timeout(10):
        await service.migration.transitions.wait_settled()
    beside = await service.router.acquire(request_for(pull=2).model_copy(update=shared))
    assert not beside.acquired and beside.reason == Reason.HELD, beside
    assert beside.holder is not None and beside.holder.pull.num == 1
    assert beside.holder.mode == "exclusive"


async def test_a_shared_holder_waiting_for_exclusive_across_the_sides_waits_for_the_others(
    make_service: ServiceMaker,
) -> None:
    """Pulls 1 and 2 hold the key shared on enhanced; the weight moves it to legacy and the
    move settles. Pull 1 asking for it exclusive with a wait waits (looking again, as for any
    hold on the side the key left), and is granted the upgrade once pull 2 lets go, not
    before, its shared hold kept meanwhile."""
    shared = {"mode": "shared"}
    service = await _service_at(make_service, 100)
    assert service.enhanced is not None
    first = await service.router.acquire(request_for(pull=1).model_copy(update=shared))
    second = await service.router.acquire(request_for(pull=2).model_copy(update=shared))
    assert first.acquired and second.acquired and first.lock is not None
    await service.provider.set_layer("migration", {"migration_weight": 0})
    async with asyncio.timeout(10):
        await service.migration.transitions.wait_settled()
    waiting = asyncio.create_task(
        service.router.acquire(request_for(pull=1, wait=timedelta(seconds=30))))
    await asyncio.sleep(0.5)  # it looks again meanwhile: each look finds pull 2 sharing
    assert not waiting.done(), waiting.result()
    assert [(lock.pull.num, lock.mode) for lock in
            await service.enhanced.holders(first.lock_key)] == [(1, "shared"), (2, "shared")]
    await service.router.release(first.lock_key, owner=("acme/infra", 2))
    async with asyncio.timeout(10):
        upgrade = await waiting
    assert upgrade.acquired and upgrade.lock is not None, upgrade
    held = await service.enhanced.holders(first.lock_key)
    assert [(lock.pull.num, lock.mode) for lock in held] == [(1, "exclusive")]
    assert held[0].fencing_token > first.lock.fencing_token


@pytest.mark.parametrize("moving", [True, False], ids=["while-moving", "once-settled"])
async def test_an_upgrade_refused_across_the_sides_keeps_the_pulls_shared_hold(
    make_service: ServiceMaker, moving: bool
) -> None:
    """Pull 1 holds the key shared on enhanced; the weight moves it to legacy, where pull 2
    holds it too (taken there while enhanced was away: two holds of one key, reported). Pull
    1 asking for it exclusive is refused (held, naming pull 2), and its shared hold stays as
    it was: neither released by the undo of a refused step nor upgraded behind the refusal."""
    shared = {"mode": "shared"}
    service = await _service_at(make_service, 100)
    assert service.enhanced is not None
    first = await service.router.acquire(request_for(pull=1).model_copy(update=shared))
    assert first.acquired and first.lock is not None and first.lock.backend == "enhanced"
    await service.provider.set_layer("migration", {"migration_weight": 0})
    if not moving:
        async with asyncio.timeout(10):
            await service.migration.transitions.wait_settled()
    assert service.migration.transitions.plan(first.lock_key).both is moving
    other = await service.legacy.acquire(request_for(pull=2))
    assert other.acquired and other.lock is not None and other.lock.backend == "legacy"
    upgrade = await service.router.acquire(request_for(pull=1))
    assert not upgrade.acquired and upgrade.reason == Reason.HELD, upgrade
    assert upgrade.holder is not None and upgrade.holder.pull.num == 2
    held = await service.enhanced.holders(first.lock_key)
    assert [(lock.pull.num, lock.mode, lock.fencing_token) for lock in held] == \
        [(1, "shared", first.lock.fencing_token)]
    assert await service.legacy.get(first.lock_key) == other.lock


async def test_release_and_release_by_pull_reach_both_sides(make_service: ServiceMaker) -> None:
    service = await _service_at(make_service, 100)
    on_enhanced = await service.router.acquire(request_for(path="a", pull=5))
    await service.provider.set_layer("migration", {"migration_weight": 0})
    on_legacy = await service.router.acquire(request_for(path="b", pull=5))
    assert {on_enhanced.lock.backend, on_legacy.lock.backend} == {"enhanced", "legacy"}  # type: ignore[union-attr]
    released = await service.router.release_by_pull("acme/infra", 5)
    assert sorted(lock.key for lock in released) == [on_enhanced.lock_key, on_legacy.lock_key]
    assert await service.router.list() == []


# --- giving back an answered grant whose caller went away ----------------------------------


async def test_a_grant_given_back_frees_its_own_enhanced_hold_not_a_newer_one_of_its_pull(
    make_service: ServiceMaker,
) -> None:
    """An enhanced grant answered to a caller that went away is given back by its fencing
    token: once the pull holds the key again under a new token (a retry of the request,
    granted after the first hold went), the answer's give-back is refused (``not-owned``) and
    the newer hold stays; the newer answer's own give-back frees it."""
    service = await _service_at(make_service, 100)
    router, owner = service.router, ("acme/infra", 2)
    answered = await router.acquire(request_for(pull=2))
    assert answered.acquired and answered.lock is not None, answered
    assert answered.lock.backend == "enhanced"
    assert await router.give_back(answered.lock, owner=owner) == answered.lock
    assert await router.get(answered.lock_key) is None
    retried = await router.acquire(request_for(pull=2))
    assert retried.acquired and retried.fresh and retried.lock is not None, retried
    assert retried.lock.fencing_token > answered.lock.fencing_token
    with pytest.raises(LockNotOwned):
        await router.give_back(answered.lock, owner=owner)
    assert await router.get(answered.lock_key) == retried.lock, "the newer hold was freed"
    assert await router.give_back(retried.lock, owner=owner) == retried.lock
    assert await router.get(answered.lock_key) is None


@pytest.mark.parametrize(("buckets", "weight", "answered_by"),
                         [((0, 5000), 0, "legacy"), ((5000, 10_000), 100, "enhanced")],
                         ids=["back-to-legacy", "on-to-enhanced"])
async def test_a_grant_of_a_moving_key_given_back_frees_both_sides(
    data_dir: Path, buckets: tuple[int, int], weight: float, answered_by: str,
) -> None:
    """A key moving between the sides (weight 50 to ``weight`` on one replica, the other not
    yet told) is taken on both, old side first, and answered with the new side's lock. Its
    give-back frees both halves. When legacy answered, the enhanced half does not carry the
    answer's token (legacy's): it is freed by owner (by that token it would stay held)."""
    async with ReplicaSet(data_dir, MemoryRoutingRegistry()) as replicas:
        a = await replicas.start("a", migration_weight=50)
        await replicas.start("b", migration_weight=50)  # not yet told of the move below
        await replicas.tick()
        moving = request_in_buckets(*buckets, repo="acme/infra", pull=2)
        await replicas.set_weight(weight, on=[a])
        await replicas.tick()
        plan = a.migration.transitions.plan(moving.key)
        assert plan.side == answered_by and plan.both, plan
        assert a.enhanced is not None
        answered = await a.router.acquire(moving)
        assert answered.acquired and answered.lock is not None, answered
        assert answered.lock.backend == answered_by
        on_legacy, on_enhanced = await a.legacy.get(moving.key), await a.enhanced.get(moving.key)
        assert on_legacy is not None and on_enhanced is not None, "not taken on both sides"
        if answered_by == "legacy":  # the answer's token is not the enhanced hold's
            assert on_enhanced.fencing_token != answered.lock.fencing_token
        await a.router.give_back(answered.lock, owner=("acme/infra", 2))
        assert await a.legacy.get(moving.key) is None, "legacy's half was left held"
        assert await a.enhanced.get(moving.key) is None, "the enhanced half was left held"


# --- fallback when the enhanced store is down ----------------------------------------------------


async def _with_enhanced_down(make_service: ServiceMaker, **settings: Any) -> LockService:
    """A service whose enhanced store is a real SQLite file whose connection was closed."""
    service = await make_service(enabled=True, backend="boltdb", **settings)
    assert service.enhanced is not None
    await service.enhanced.backend.close()
    return service


async def test_fallback_legacy_serves_the_request_from_legacy_and_says_so(
    make_service: ServiceMaker,
) -> None:
    service = await _with_enhanced_down(make_service, fallback="legacy")
    seen: list[Event] = []
    service.events.subscribe(seen.append)
    result = await service.router.acquire(request_for(pull=1))
    assert result.acquired and result.lock is not None
    assert result.lock.backend == "legacy"
    assert await service.legacy.get(result.lock_key) == result.lock
    assert [event.type for event in seen] == ["fallback"]
    assert seen[0].details["action"] == "legacy"
    assert service.metrics.fallbacks.labels("legacy")._value.get() == 1
    # The lock granted in fallback still refuses another pull.
    assert not (await service.router.acquire(request_for(pull=2))).acquired


async def test_the_rollout_analysis_counts_what_prometheus_exports(
    make_service: ServiceMaker,
) -> None:
    service = await _with_enhanced_down(make_service, fallback="legacy")
    for pull in (1, 2, 3):
        assert (await service.router.acquire(request_for(path=f"p{pull}", pull=pull))).acquired
    totals = live_view(service).totals()
    registry = service.metrics.registry

    def exported(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    fallbacks = [exported("enhanced_locking_fallbacks_total", action=action)
                 for action in ("legacy", "refused", "unchecked")]
    assert totals.fallbacks == 3 == sum(value or 0 for value in fallbacks)
    assert totals.operations == exported("enhanced_locking_backend_operations_total",
                                         backend="enhanced")
    assert totals.errors == exported("enhanced_locking_backend_errors_total", backend="enhanced")
    assert totals.errors >= 3 and totals.operations >= totals.errors


async def test_fail_closed_refuses_as_unavailable_and_grants_nothing(
    make_service: ServiceMaker,
) -> None:
    service = await _with_enhanced_down(make_service, fallback="fail-closed")
    result = await service.router.acquire(request_for(pull=1))
    assert not result.acquired
    assert result.reason == Reason.UNAVAILABLE
    assert result.holder is None
    assert await service.legacy.list() == []
    assert service.metrics.fallbacks.labels("refused")._value.get() == 1


async def test_keys_routed_to_legacy_keep_working_while_enhanced_is_down(
    make_service: ServiceMaker,
) -> None:
    service = await _with_enhanced_down(make_service, fallback="fail-closed",
                                        migration_weight=50)
    legacy_paths = [f"p{i}" for i in range(40)
                    if service.router.side_for(request_for(path=f"p{i}").key) == "legacy"]
    assert legacy_paths
    for path in legacy_paths:
        result = await service.router.acquire(request_for(path=path))
        assert result.acquired, result
    ready = await service.ready()
    assert ready["legacy"] == "ok" and ready["enhanced"] != "ok"


async def test_a_pull_s_hold_gone_between_the_look_and_the_ask_is_granted_anew_and_given_back(
) -> None:
    """The window docs/02-migration.md leaves open (a pull's own hold found on the enhanced
    side by a look is asked for there, fail fast, to be answered with it): the hold went
    between the look and the ask, so the store grants the key anew; that grant is given
    straight back (an ``acquired`` then a ``released`` event) and the router is told to ask
    as for a key the pull does not hold. Nothing stays held on the enhanced side."""
    from tests.support.queues import rig_for

    from enhanced_locking.migration.handover import answer_held

    rig = rig_for(MemoryBackend())
    try:
        request = request_for(pull=4, path="window")
        held = (await rig.locker.acquire(request)).lock
        assert held is not None
        await rig.locker.release(request.key, owner=(held.project.repo_full_name, 4))
        before = len(rig.types())
        assert await answer_held(rig.locker, request, held) is None  # ask again: not held
        assert rig.types()[before:] == ["acquired", "released"]
        assert await rig.locker.get(request.key) is None
    finally:
        await rig.close()
