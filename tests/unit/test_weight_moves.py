"""Weight moves across replicas: moving keys are taken on both sides until every live replica
applied the move; held locks are honoured during and after it; silent replicas are excluded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.support.locks import request_for
from tests.support.replicas import ReplicaSet, request_in_buckets

from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import EventBus
from enhanced_locking.factory import LockService
from enhanced_locking.hashing import BUCKETS, bucket_of
from enhanced_locking.metrics import Metrics
from enhanced_locking.migration.routing_registry import MemoryRoutingRegistry, RoutingView
from enhanced_locking.migration.transition import (
    Band,
    RoutingPlan,
    WeightTransitions,
    authority_weight,
)
from enhanced_locking.provider import ConfigProvider
from enhanced_locking.types import (
    AcquireResult,
    BackendUnavailable,
    BatchItem,
    BatchLockRequest,
    Event,
    LockRequest,
    Reason,
)


class FakeClock:
    """The registry's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def replicas(data_dir: Path) -> AsyncIterator[ReplicaSet]:
    async with ReplicaSet(data_dir, MemoryRoutingRegistry()) as replica_set:
        yield replica_set


# --- a lagging replica ----------------------------------------------------------------------


async def test_a_moving_key_is_taken_on_both_sides_while_a_replica_still_routes_the_old_way(
    replicas: ReplicaSet,
) -> None:
    a, b, moving = await _two_at(replicas, 0, below=5000)
    first = await a.router.acquire(_by(moving, pull=1))
    assert first.acquired and first.lock is not None and first.lock.backend == "legacy"

    await replicas.set_weight(50, on=[a])  # b has not heard of it yet
    await replicas.tick()
    status = a.migration.transitions.status()
    assert status.phase == "moving" and status.weight == 50 and status.from_weights == (0,)
    assert status.pending == ("b",)
    assert a.migration.transitions.plan(moving.key).both

    # The old side's hold is honoured on both replicas.
    for replica in (a, b):
        refused = await replica.router.acquire(_by(moving, pull=2))
        assert not refused.acquired and refused.holder == first.lock
    await b.router.release(moving.key, owner=("acme/infra", 1))

    # a takes the key on both sides: b, still at weight 0, cannot grant it on the old side.
    taken = await a.router.acquire(_by(moving, pull=3))
    assert taken.acquired and taken.lock is not None and taken.lock.backend == "enhanced"
    assert (await a.legacy.get(moving.key)) is not None
    refused = await b.router.acquire(_by(moving, pull=4))
    assert not refused.acquired and refused.holder is not None and refused.holder.pull.num == 3

    await replicas.tick()
    assert a.migration.transitions.status().phase == "moving", "b still reports weight 0"
    await replicas.set_weight(50, on=[b])
    await replicas.tick()
    for replica in (a, b):
        assert replica.migration.transitions.status().phase == "stable"
        assert not replica.migration.transitions.plan(moving.key).both
        refused = await replica.router.acquire(_by(moving, pull=4))
        assert not refused.acquired and refused.holder is not None
        assert refused.holder.pull.num == 3

    assert await a.router.release(moving.key, owner=("acme/infra", 3)) is not None
    assert await a.legacy.get(moving.key) is None, "a release frees both sides"
    after = await b.router.acquire(_by(moving, pull=4))
    assert after.acquired and after.lock is not None and after.lock.backend == "enhanced"
    assert after.lock.fencing_token > taken.lock.fencing_token


async def test_a_moving_key_refused_on_its_new_side_keeps_the_old_side_hold_it_did_not_take(
    replicas: ReplicaSet, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The key is held on the new side by pull 9 (written there behind the router's back), and
    # pull 1's own hold appears on the old side between the two-sided acquire's look and its
    # first step (the pull's other request, through the legacy store itself): the first step
    # answers that hold, the second is refused, and undoing the first must not drop a hold
    # this request did not take.
    a, _, moving = await _two_at(replicas, 0, below=5000)
    await replicas.set_weight(50, on=[a])
    await replicas.tick()
    assert a.migration.transitions.plan(moving.key).both
    assert a.enhanced is not None
    planted = await a.enhanced.acquire(_by(moving, pull=9))
    assert planted.acquired
    take = a.legacy.acquire

    async def taken_by_the_pull_first(request: LockRequest) -> AcquireResult:
        own = await take(request)  # the pull's other request
        assert own.acquired and own.fresh
        return await take(request)

    monkeypatch.setattr(a.legacy, "acquire", taken_by_the_pull_first)
    refused = await a.router.acquire(_by(moving, pull=1))
    assert not refused.acquired and refused.holder == planted.lock
    monkeypatch.undo()
    held = await a.legacy.get(moving.key)
    assert held is not None and held.pull.num == 1, "the pull's old-side hold was dropped"


async def test_a_hold_on_the_old_side_is_honoured_after_the_move_settles(
    replicas: ReplicaSet,
) -> None:
    service = await replicas.start("only", migration_weight=0)
    moving = request_in_buckets(0, BUCKETS)
    held = await service.router.acquire(_by(moving, pull=1))
    assert held.acquired and held.lock is not None and held.lock.backend == "legacy"

    await replicas.set_weight(100)
    await replicas.tick()
    assert service.migration.transitions.status().phase == "stable"
    assert service.router.side_for(moving.key) == "enhanced"

    refused = await service.router.acquire(_by(moving, pull=2))
    assert not refused.acquired and refused.reason == Reason.HELD
    assert refused.holder == held.lock
    again = await service.router.acquire(_by(moving, pull=1))
    assert again.acquired and again.lock == held.lock, "its holder gets it back unchanged"
    await service.router.release(moving.key, owner=("acme/infra", 1))
    granted = await service.router.acquire(_by(moving, pull=2))
    assert granted.acquired and granted.lock is not None and granted.lock.backend == "enhanced"
    assert granted.lock.fencing_token > held.lock.fencing_token


async def test_fencing_tokens_keep_rising_when_a_key_changes_side_without_being_asked_for(
    replicas: ReplicaSet,
) -> None:
    service = await replicas.start("only", migration_weight=0)
    key = request_in_buckets(0, BUCKETS)
    tokens = []
    for weight in (0, 100, 0, 100):
        await replicas.set_weight(weight)
        await replicas.tick()
        for _ in range(3):
            result = await service.router.acquire(_by(key, pull=7))
            assert result.acquired and result.lock is not None
            assert result.lock.backend == ("enhanced" if weight else "legacy")
            tokens.append(result.lock.fencing_token)
            await service.router.release(key.key)
    assert tokens == sorted(set(tokens)), f"tokens fell: {tokens}"


async def test_a_batch_of_a_moving_key_gets_a_token_above_the_old_sides(
    replicas: ReplicaSet,
) -> None:
    a, b, moving = await _two_at(replicas, 0)
    tokens = []
    for pull in (1, 2, 3):  # legacy's counter for the key climbs to 3
        held = await a.router.acquire(_by(moving, pull=pull))
        assert held.acquired and held.lock is not None and held.lock.backend == "legacy"
        tokens.append(held.lock.fencing_token)
        await a.router.release(moving.key, owner=("acme/infra", pull))

    await replicas.set_weight(100, on=[a])  # b still routes the key to legacy
    await replicas.tick()
    assert a.migration.transitions.plan(moving.key).both
    taken = await a.router.acquire_batch(_batch(moving, pull=4))
    assert taken.acquired and taken.locks[0].backend == "enhanced"
    tokens.append(taken.locks[0].fencing_token)
    refused = await b.router.acquire(_by(moving, pull=5))
    assert not refused.acquired and refused.holder == taken.locks[0]
    assert await a.legacy.get(moving.key) is None, "the batch holds nothing on legacy"
    await a.router.release_batch([moving.key], owner=("acme/infra", 4))

    after = await b.router.acquire(_by(moving, pull=5))  # b, still at weight 0: on legacy
    assert after.acquired and after.lock is not None and after.lock.backend == "legacy"
    tokens.append(after.lock.fencing_token)
    assert tokens == sorted(set(tokens)), f"tokens fell: {tokens}"


async def test_a_holder_asking_again_is_given_its_lock_while_another_waits_for_the_moving_key(
    replicas: ReplicaSet,
) -> None:
    a, b, key = await _two_at(replicas, 100)
    held = await a.router.acquire(_by(key, pull=1))
    assert held.acquired and held.lock is not None and held.lock.backend == "enhanced"
    await replicas.set_weight(0)
    await replicas.tick()
    await replicas.set_weight(100, on=[a])  # back to enhanced, b has not heard of it yet
    await replicas.tick()
    assert a.migration.transitions.plan(key.key) == RoutingPlan("enhanced", both=True)

    waiting = asyncio.ensure_future(
        a.router.acquire(_by(key, pull=2).model_copy(update={"wait": timedelta(seconds=30)})))
    for _ in range(1000):  # until queued on enhanced, its key taken on legacy meanwhile
        if await a.router.queue(key.key):
            break
        await asyncio.sleep(0.01)
    assert not waiting.done()
    assert (holds := await a.legacy.get(key.key)) is not None and holds.pull.num == 2
    for replica in (a, b):  # pull 1 plans again: its own lock, unchanged
        again = await replica.router.acquire(_by(key, pull=1))
        assert again.acquired and again.lock == held.lock, again
        refused = await replica.router.acquire(_by(key, pull=3))
        assert not refused.acquired and refused.reason == Reason.HELD

    await a.router.release(key.key, owner=("acme/infra", 1))
    granted = await asyncio.wait_for(waiting, 20)
    assert granted.acquired and granted.lock is not None and granted.lock.pull.num == 2


async def test_abort_goes_back_to_weight_zero_through_the_same_handover(
    replicas: ReplicaSet,
) -> None:
    a = await replicas.start("a", migration_weight=50)
    b = await replicas.start("b", migration_weight=50)
    await replicas.tick()
    seen: list[Event] = []
    a.events.subscribe(seen.append)
    moving = request_in_buckets(0, 5000)
    held = await b.router.acquire(_by(moving, pull=1))
    assert held.acquired and held.lock is not None and held.lock.backend == "enhanced"

    await replicas.set_weight(0, on=[a])
    await replicas.tick()
    plan = a.migration.transitions.plan(moving.key)
    assert plan.side == "legacy" and plan.both
    for replica in (a, b):
        refused = await replica.router.acquire(_by(moving, pull=2))
        assert not refused.acquired and refused.holder == held.lock

    await replicas.set_weight(0, on=[b])
    await replicas.tick()
    assert a.migration.transitions.status().phase == "stable"
    refused = await a.router.acquire(_by(moving, pull=2))
    assert not refused.acquired and refused.holder == held.lock, "held locks stay intact"
    await a.router.release(moving.key, owner=("acme/infra", 1))
    granted = await a.router.acquire(_by(moving, pull=2))
    assert granted.acquired and granted.lock is not None and granted.lock.backend == "legacy"
    assert granted.lock.fencing_token > held.lock.fencing_token

    phases = [e.details["phase"] for e in seen if e.type == "routing-changed"]
    assert phases == ["moving", "settled"]
    moved = next(e for e in seen if e.type == "routing-changed")
    assert moved.details["from"] == 50 and moved.details["to"] == 0


# --- silent replicas ------------------------------------------------------------------------


async def test_a_replica_that_stops_reporting_is_excluded_after_the_expiry(
    data_dir: Path,
) -> None:
    clock = FakeClock()
    registry = MemoryRoutingRegistry(clock=clock)
    async with ReplicaSet(data_dir, registry) as replicas:
        service = await replicas.start("a", migration_weight=0, replica_heartbeat="1s",
                                       replica_timeout="3s")
        await registry.report(replica_id="crashed", weight=0, generation=1)
        seen: list[Event] = []
        service.events.subscribe(seen.append)

        await replicas.set_weight(40)
        clock.now += 2.9
        status = await service.migration.transitions.tick()
        assert status.phase == "moving" and status.pending == ("crashed",)
        assert status.excluded == ()

        clock.now += 0.2
        status = await service.migration.transitions.tick()
        assert status.phase == "stable", "no longer waited for"
        assert status.excluded == ("crashed",) and status.pending == ()
        excluded = [e for e in seen if e.details.get("phase") == "replica-excluded"]
        assert [e.details["replica"] for e in excluded] == ["crashed"]
        assert seen[-1].details["phase"] == "settled"


async def test_a_replica_that_never_reported_is_not_waited_for(data_dir: Path) -> None:
    async with ReplicaSet(data_dir, MemoryRoutingRegistry()) as replicas:
        service = await replicas.start("a", migration_weight=0)
        await replicas.set_weight(60)
        status = await service.migration.transitions.tick()
        assert status.phase == "stable" and status.pending == ()


# --- the transition state machine on its own -------------------------------------------------


def _transitions(config: EnhancedLockingConfig, registry: MemoryRoutingRegistry, *,
                 clock: FakeClock | None = None, events: EventBus | None = None,
                 metrics: Metrics | None = None) -> tuple[WeightTransitions, ConfigProvider]:
    provider = ConfigProvider(config)
    transitions = WeightTransitions(
        replica_id="self", snapshot=lambda: provider.current, registry=lambda: registry,
        events=events or EventBus(), metrics=metrics or Metrics(),
        clock=clock if clock is not None else time.monotonic,
    )
    provider.subscribe(transitions.on_snapshot)
    return transitions, provider


async def test_a_replica_takes_every_key_on_both_sides_until_its_first_report() -> None:
    transitions, _ = _transitions(EnhancedLockingConfig(enabled=True, migration_weight=30),
                                  MemoryRoutingRegistry())
    assert all(transitions.plan(f"k{i}").both for i in range(50))
    assert transitions.status().phase == "isolated"
    await transitions.tick()
    assert transitions.status().phase == "stable"
    assert not any(transitions.plan(f"k{i}").both for i in range(50))


async def test_requests_routed_under_the_old_weight_hold_back_the_report_until_they_finish(
) -> None:
    registry = MemoryRoutingRegistry()
    transitions, provider = _transitions(EnhancedLockingConfig(enabled=True, migration_weight=0),
                                         registry)
    await transitions.tick()
    with transitions.admit("some/key"):
        await provider.set_layer("cluster", {"migration_weight": 70})
        await transitions.tick()
        view = await registry.read(expiry=EnhancedLockingConfig().replica_expiry)
        assert [r.weight for r in view.reports] == [0], "an old request still runs"
        assert transitions.status().pending == ("self",)
    status = await transitions.tick()
    view = await registry.read(expiry=EnhancedLockingConfig().replica_expiry)
    assert [r.weight for r in view.reports] == [70]
    assert status.phase == "stable"


@given(old=st.integers(0, 10_000), new=st.integers(0, 10_000), key=st.text(max_size=40))
def test_exactly_the_keys_between_the_old_and_the_new_weight_are_moving(
    old: int, new: int, key: str
) -> None:
    band = Band.of({old / 100, new / 100})
    bucket = bucket_of(key)
    assert (bucket in band) == (min(old, new) <= bucket < max(old, new))


def test_shadow_mode_and_disabled_leave_every_key_to_legacy() -> None:
    assert authority_weight(EnhancedLockingConfig(enabled=True, migration_weight=40,
                                                  migration_mode="shadow")) == 0
    assert authority_weight(EnhancedLockingConfig(enabled=False, migration_weight=40)) == 0
    assert authority_weight(EnhancedLockingConfig(enabled=True)) == 100


def _by(request: LockRequest, *, pull: int) -> LockRequest:
    """The same project and workspace, asked for by another pull of the same repository."""
    return request.model_copy(update={"pull": request_for(pull=pull).pull})


async def _two_at(replicas: ReplicaSet, weight: float, *,
                  below: int = BUCKETS) -> tuple[LockService, LockService, LockRequest]:
    """Replicas ``a`` and ``b``, both routing by ``weight``, each seen by the other, and a
    request whose key's bucket is below ``below``."""
    a = await replicas.start("a", migration_weight=weight)
    b = await replicas.start("b", migration_weight=weight)
    await replicas.tick()
    return a, b, request_in_buckets(0, below)


def _batch(request: LockRequest, *, pull: int) -> BatchLockRequest:
    """``request``'s lock alone, as a batch of another pull of the same repository."""
    return BatchLockRequest(
        locks=[BatchItem(project=request.project, workspace=request.workspace)],
        pull=request_for(pull=pull).pull)


# --- a slow replica is not an isolated one ---------------------------------------------------


class FlakyRegistry(MemoryRoutingRegistry):
    """An in-process registry that can stop answering, as an unreachable Redis would."""

    down = False

    async def report(self, *, replica_id: str, weight: float, generation: int) -> None:
        if self.down:
            raise BackendUnavailable("the replica registry did not answer")
        await super().report(replica_id=replica_id, weight=weight, generation=generation)


def _isolated_metric(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("enhanced_locking_replica_isolated")


async def test_a_replica_whose_rounds_ran_late_reads_the_registry_again_and_keeps_routing(
) -> None:
    clock = FakeClock()
    registry = MemoryRoutingRegistry(clock=clock)
    events, metrics = EventBus(), Metrics()
    transitions, _ = _transitions(
        EnhancedLockingConfig(enabled=True, migration_weight=30, replica_heartbeat="100ms"),
        registry, clock=clock, events=events, metrics=metrics)
    seen: list[Event] = []
    events.subscribe(seen.append)
    await transitions.tick()
    keys = [f"k{i}" for i in range(50)]

    clock.now += 30.0  # the event loop was saturated: no round ran for 30 s
    assert transitions.stale
    assert not any(transitions.plan(key).both for key in keys), "slowness is no isolation"
    await transitions.refresh()  # what the router does before routing an acquire
    assert not transitions.stale
    assert (await registry.read(expiry=EnhancedLockingConfig().replica_expiry)).reports[0].seen \
        == clock.now, "the late replica reported again before routing"
    assert transitions.status().phase == "stable"
    assert not any(transitions.plan(key).both for key in keys)
    assert [e for e in seen if e.type == "routing-changed"] == []
    assert _isolated_metric(metrics) == 0


async def test_a_replica_whose_registry_stops_answering_is_isolated_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    registry = FlakyRegistry(clock=clock)
    events, metrics = EventBus(), Metrics()
    transitions, _ = _transitions(
        EnhancedLockingConfig(enabled=True, migration_weight=30, replica_heartbeat="1s"),
        registry, clock=clock, events=events, metrics=metrics)
    seen: list[Event] = []
    events.subscribe(seen.append)
    await transitions.tick()
    keys = [f"k{i}" for i in range(50)]

    registry.down = True
    clock.now += 1.0
    status = await transitions.tick()
    assert status.phase == "stable", "one missed report is not enough to stop trusting"
    clock.now += 1.5  # past the expiry minus a heartbeat since the last report taken
    await transitions.refresh()
    assert transitions.status().phase == "isolated"
    assert all(transitions.plan(key).both for key in keys)
    assert _isolated_metric(metrics) == 1
    changed = [e.details for e in seen if e.type == "routing-changed"]
    assert changed[-1]["phase"] == "isolated" and "did not answer" in changed[-1]["error"]
    assert "taking every key on both sides" in caplog.text

    registry.down = False
    clock.now += 1.0
    await transitions.tick()
    assert transitions.status().phase == "stable"
    assert not any(transitions.plan(key).both for key in keys)
    assert _isolated_metric(metrics) == 0
    assert [e.details["phase"] for e in seen if e.type == "routing-changed"][-1] == "rejoined"


def test_a_report_lost_by_the_registry_is_doubted_for_one_expiry_from_its_clock() -> None:
    expiry = timedelta(seconds=3)
    assert RoutingView(100.0, lost=98.0).may_miss(expiry)  # replicas may not have reported
    assert RoutingView(100.0, lost=97.0).may_miss(expiry)
    assert not RoutingView(100.0, lost=96.5).may_miss(expiry)  # every live one has by now
    assert not RoutingView(100.0).may_miss(expiry)
    # A time ahead of the registry's clock is garbage in a report, not a loss: it would
    # otherwise keep every move from settling for as long as it stands there.
    assert not RoutingView(100.0, lost=1e12).may_miss(expiry)
