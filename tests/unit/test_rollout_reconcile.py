"""The rollout through the reconciler: real lock services (memory backends, a shared in-process
replica registry), the Kubernetes API as an in-memory stand-in, a wall clock moved by hand.

The same with kopf, a real API server, Redis and operator processes is in
tests/e2e/test_rollout.py.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiException
from tests.support.kube_cluster import NS, InMemoryCluster
from tests.support.locks import lock_for, request_for
from tests.support.replicas import ReplicaSet

from enhanced_locking.factory import LockService
from enhanced_locking.kube.lockmigration import PROMOTE_ANNOTATION, RETRY_ANNOTATION
from enhanced_locking.kube.reconcile import MIGRATIONS, POLICIES, Binding, Reconciler
from enhanced_locking.kube.rollout_driver import RolloutDriver, live_view, request_token
from enhanced_locking.migration.routing_registry import MemoryRoutingRegistry
from enhanced_locking.types import LockRequest

POLICY = {"enabled": True, "backend": "memory"}
STEPS = [{"setWeight": 10}, {"pause": {"duration": "1m"}}, {"setWeight": 50}, {"pause": {}},
         {"setWeight": 100}]


class Wall:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


class Writer:
    """Whether this replica writes the status (what the Lease decides in the operator)."""

    def __init__(self, writes: bool) -> None:
        self.writes = writes
        self.term = 1


def migration(**spec: Any) -> dict[str, Any]:
    return {"policyRef": {"name": "default"}, **spec}


@pytest.fixture
async def replica_set(data_dir: Path) -> AsyncIterator[ReplicaSet]:
    async with ReplicaSet(data_dir, MemoryRoutingRegistry()) as replicas:
        yield replicas


async def _operator(service: LockService, cluster: InMemoryCluster, tmp_path: Path, wall: Wall,
                    *, writes: bool = True, writer: Writer | None = None) -> Reconciler:
    driver = RolloutDriver(live_view(service), writer=writer or Writer(writes), wall=wall)
    return Reconciler(service.provider, binding=Binding(NS, "default", "to-enhanced"),
                      cluster=cluster, runtime_dir=tmp_path, rollout=driver)


async def _two(replica_set: ReplicaSet, first: str,
               second: str) -> tuple[LockService, LockService, InMemoryCluster, Wall]:
    """Two replicas of one lock service, the cluster their operators share, a wall clock."""
    return (await replica_set.start(first, replica_heartbeat="50ms"),
            await replica_set.start(second, replica_heartbeat="50ms"), InMemoryCluster(), Wall())


async def _migrating(service: LockService, tmp_path: Path,
                     **spec: Any) -> tuple[InMemoryCluster, Wall, Reconciler]:
    """The status writer of ``service``, having observed the policy and a LockMigration of
    ``spec``; the cluster it writes to and its wall clock."""
    cluster, wall = InMemoryCluster(), Wall()
    reconciler = await _operator(service, cluster, tmp_path, wall)
    await reconciler.observed(POLICIES, cluster.put(POLICIES, "default", POLICY))
    await reconciler.observed(MIGRATIONS, cluster.put(MIGRATIONS, "to-enhanced",
                                                      migration(**spec)))
    return cluster, wall, reconciler


async def _settle(*services: LockService) -> None:
    async with asyncio.timeout(10):
        for service in services:
            await service.migration.transitions.wait_settled()


async def _tick_until(reconciler: Reconciler, cluster: InMemoryCluster,
                      check: Callable[[dict[str, Any]], bool], *services: LockService) -> None:
    for _ in range(200):
        await reconciler.tick()
        if check(cluster.status(MIGRATIONS, "to-enhanced")):
            return
        await _settle(*services)
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {cluster.status(MIGRATIONS, 'to-enhanced')}")


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return dict(next(c for c in status["conditions"] if c["type"] == kind))


async def test_steps_advance_through_ticks_and_the_status_tells_where_the_rollout_is(
    replica_set: ReplicaSet, tmp_path: Path,
) -> None:
    service = await replica_set.start("a", replica_heartbeat="50ms")
    cluster, wall, reconciler = await _migrating(service, tmp_path, steps=STEPS)
    assert service.provider.current.config.effective_weight == 10
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Paused", service)
    status = cluster.status(MIGRATIONS, "to-enhanced")
    assert (status["currentStepIndex"], status["step"], status["currentWeight"]) == (1, "2/5", 10)
    assert status["stepStartedAt"] == "2030-01-01T00:00:00.000Z"
    assert _condition(status, "Paused")["reason"] == "PauseStep"
    assert [c["type"] for c in status["conditions"]] == [
        "Ready", "Progressing", "Paused", "Completed", "Aborted", "Degraded"]
    assert status["transition"]["phase"] == "stable" and status["transition"]["to"] == 10
    assert status["statusWriter"] == service.migration.replica_id

    wall.now += timedelta(minutes=1)
    await _tick_until(reconciler, cluster, lambda s: s.get("currentStepIndex") == 3, service)
    assert service.provider.current.config.effective_weight == 50
    assert _condition(cluster.status(MIGRATIONS, "to-enhanced"), "Paused")["reason"] == \
        "WaitingForPromote"

    await reconciler.observed(MIGRATIONS, cluster.annotate(MIGRATIONS, "to-enhanced",
                                                           PROMOTE_ANNOTATION, "go"))
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Completed", service)
    done = cluster.status(MIGRATIONS, "to-enhanced")
    assert (done["currentWeight"], done["step"], done["promoted"]) == (100, "5/5", "go")
    assert _condition(done, "Completed")["status"] == "True"
    reasons = [e["reason"] for e in cluster.events if e["object"] == "LockMigration/to-enhanced"]
    assert reasons.count("StepStarted") == 4
    assert reasons.count("RolloutPromoted") == 1 and reasons.count("RolloutCompleted") == 1


async def test_in_shadow_mode_the_status_shows_no_weight_routed_and_says_legacy_decides(
    replica_set: ReplicaSet, tmp_path: Path,
) -> None:
    service = await replica_set.start("a", replica_heartbeat="50ms")
    cluster, _, reconciler = await _migrating(service, tmp_path, weight=50, mode="shadow")
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Completed", service)
    status = cluster.status(MIGRATIONS, "to-enhanced")
    assert (status["mode"], status["currentWeight"]) == ("shadow", 0)
    assert service.router.side_for(request_for().key) == "legacy"
    for kind in ("Completed", "Progressing"):
        assert _condition(status, kind)["message"].startswith(
            "mode shadow: legacy decides every lock key")
    assert status["message"] == _condition(status, "Completed")["message"]
    # Routed: the weight is what the service sends to enhanced, and the message says so alone.
    await reconciler.observed(MIGRATIONS, cluster.put(MIGRATIONS, "to-enhanced",
                                                      migration(weight=50, mode="route")))
    await _tick_until(reconciler, cluster, lambda s: s.get("currentWeight") == 50, service)
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Completed", service)
    status = cluster.status(MIGRATIONS, "to-enhanced")
    assert status["message"] == "weight 50 is in force on every replica"


async def test_with_enhanced_locking_off_the_rollout_says_no_key_moves(
    replica_set: ReplicaSet, tmp_path: Path,
) -> None:
    service = await replica_set.start("a", replica_heartbeat="50ms")
    cluster, _, reconciler = await _migrating(service, tmp_path, weight=50)
    await reconciler.observed(POLICIES, cluster.put(POLICIES, "default",
                                                    {**POLICY, "enabled": False}))
    await _tick_until(reconciler, cluster, lambda s: s.get("currentWeight") == 0, service)
    status = cluster.status(MIGRATIONS, "to-enhanced")
    assert status["phase"] == "Progressing"  # waits for the weight: nothing moves meanwhile
    assert status["message"] == (
        "enhanced locking is off (the LockPolicy's enabled): every lock key goes to the legacy "
        "locker; the weight takes effect once it is on; moving keys to weight 50")
    assert _condition(status, "Progressing")["message"] == status["message"]


async def test_a_replica_that_does_not_write_the_status_routes_by_it_and_stays_silent(
    replica_set: ReplicaSet, tmp_path: Path,
) -> None:
    leader_service, follower_service, cluster, wall = await _two(replica_set, "leader",
                                                                 "follower")
    leader = await _operator(leader_service, cluster, tmp_path, wall)
    silent = InMemoryCluster()  # the follower's writes, were there any, would land here
    follower = await _operator(follower_service, silent, tmp_path, wall, writes=False)
    for plural, name, spec in ((POLICIES, "default", POLICY),
                               (MIGRATIONS, "to-enhanced", migration(steps=STEPS))):
        body = cluster.put(plural, name, spec)
        silent.objects[(plural, name)] = body
        await leader.observed(plural, body)
        await follower.observed(plural, body)
    await _tick_until(leader, cluster, lambda s: s.get("phase") == "Paused",
                      leader_service, follower_service)
    wall.now += timedelta(minutes=1)
    await leader.tick()
    # The leader moved to the next step; the follower applies it when the status arrives.
    assert leader_service.provider.current.config.effective_weight == 50
    assert follower_service.provider.current.config.effective_weight == 10
    await follower.event(MIGRATIONS, cluster.objects[(MIGRATIONS, "to-enhanced")])
    assert follower_service.provider.current.config.effective_weight == 50
    await follower.tick()
    assert silent.patches == 0 and silent.events == []


async def test_a_weight_held_back_by_a_replica_names_that_replica_in_the_status(
    replica_set: ReplicaSet, tmp_path: Path,
) -> None:
    # Replica b runs no operator here: it keeps routing by its own weight (0), and the step's
    # weight cannot settle. The message (and the Progressing condition) says which replica
    # has not taken the new weight, and by which it still routes, as kubectl users expect.
    a_service, b_service, cluster, wall = await _two(replica_set, "a", "b")
    await replica_set.set_weight(0, on=[b_service])
    reconciler = await _operator(a_service, cluster, tmp_path, wall)
    await reconciler.observed(POLICIES, cluster.put(POLICIES, "default", POLICY))
    await reconciler.observed(MIGRATIONS, cluster.put(MIGRATIONS, "to-enhanced",
                                                      migration(steps=STEPS)))
    for _ in range(5):
        await replica_set.tick()
        await reconciler.tick()
    status = cluster.status(MIGRATIONS, "to-enhanced")
    assert status["transition"]["pendingReplicas"] == ["b"]
    assert (status["phase"], _condition(status, "Progressing")["reason"]) == (
        "Progressing", "StepInProgress")
    named = "replica b (routing by weight 0) has not taken weight 10 yet"
    assert named in status["message"], status["message"]
    assert named in _condition(status, "Progressing")["message"]

    await replica_set.set_weight(10, on=[b_service])  # b takes it: the step settles
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Paused",
                      a_service, b_service)
    assert "has not taken" not in cluster.status(MIGRATIONS, "to-enhanced")["message"]


async def _completed_then_a_conflict(
    service: LockService, tmp_path: Path,
) -> tuple[InMemoryCluster, Wall, Reconciler, LockRequest]:
    """A rollout to weight 100, completed; then a key found held by pull 3 on legacy and by
    pull 4 on enhanced (its request), and the tick that reports it."""
    cluster, wall, reconciler = await _migrating(service, tmp_path, weight=100)
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Completed", service)
    request = request_for(path="double", pull=3)
    service.migration.conflicts.report(
        key=request.key, legacy=lock_for(request, backend="legacy"),
        enhanced=lock_for(request_for(path="double", pull=4)), source="fallback")
    await reconciler.tick()
    return cluster, wall, reconciler, request


async def test_lock_conflicts_make_the_migration_degraded_and_an_event_names_both_holders(
    make_service: Callable[..., Any], tmp_path: Path,
) -> None:
    service: LockService = await make_service(legacy_backend="memory", backend="memory")
    cluster, _, reconciler, request = await _completed_then_a_conflict(service, tmp_path)
    status = cluster.status(MIGRATIONS, "to-enhanced")
    degraded = _condition(status, "Degraded")
    assert (status["phase"], degraded["status"], degraded["reason"]) == (
        "Degraded", "True", "LockConflicts")
    assert request.key in degraded["message"] and status["counters"]["conflicts"] == 1
    [event] = [e for e in cluster.events if e["reason"] == "LockConflict"]
    assert event["type"] == "Warning"
    assert '"pull": 3' in event["message"] and '"pull": 4' in event["message"]

    service.migration.conflicts.resolve(request.key)
    await reconciler.tick()
    healed = cluster.status(MIGRATIONS, "to-enhanced")
    assert healed["phase"] == "Completed"
    assert _condition(healed, "Degraded")["reason"] == "AsExpected"


async def test_a_new_status_writer_of_a_completed_but_degraded_rollout_does_not_tell_it_again(
    make_service: Callable[..., Any], tmp_path: Path,
) -> None:
    # The phase shows Degraded over Completed (a lock conflict): a writer that takes the status
    # over (a restart, a new Lease holder) reads the Completed condition, not the phase, to
    # know the rollout had completed, and posts no second RolloutCompleted.
    service: LockService = await make_service(legacy_backend="memory", backend="memory")
    cluster, wall, first, _ = await _completed_then_a_conflict(service, tmp_path)
    assert cluster.status(MIGRATIONS, "to-enhanced")["phase"] == "Degraded"
    assert first.rollout is not None
    first.rollout.close()

    second = await _operator(service, cluster, tmp_path, wall)
    await second.resync()
    await second.tick()
    told = [e for e in cluster.events if e["reason"] == "RolloutCompleted"]
    assert len(told) == 1, told


async def test_a_replica_that_writes_the_status_again_shows_no_analysis_check_of_its_last_term(
    make_service: Callable[..., Any], tmp_path: Path,
) -> None:
    # A failing check this replica made when it last wrote the status is history once another
    # writer took over: holding the Lease again, it shows no Degraded from it, as a restarted
    # writer would not; its next check tells.
    service: LockService = await make_service(legacy_backend="memory", backend="memory")
    writer = Writer(True)
    cluster, wall = InMemoryCluster(), Wall()
    reconciler = await _operator(service, cluster, tmp_path, wall, writer=writer)
    await reconciler.observed(POLICIES, cluster.put(POLICIES, "default", POLICY))
    await reconciler.observed(MIGRATIONS, cluster.put(MIGRATIONS, "to-enhanced", migration(
        steps=[{"setWeight": 40}, {"pause": {}}],
        analysis={"window": "1m", "interval": "1s", "maxErrorRate": 0.05,
                  "failureLimit": 5})))
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Paused", service)
    await _failing_operations(service)
    await reconciler.tick()
    assert _condition(cluster.status(MIGRATIONS, "to-enhanced"), "Degraded")["reason"] == (
        "AnalysisFailing")

    writer.writes = False  # another replica writes meanwhile: no check failing any more
    body = cluster.objects[(MIGRATIONS, "to-enhanced")]
    body["status"] = {**body["status"], "analysis": None, "phase": "Paused", "conditions": [
        c for c in body["status"]["conditions"] if c["type"] != "Degraded"]}
    writer.writes, writer.term = True, 2
    await reconciler.resync()
    status = cluster.status(MIGRATIONS, "to-enhanced")
    assert status["phase"] == "Paused", status
    assert _condition(status, "Degraded")["status"] == "False"
    assert "analysis" not in status


async def _failing_operations(service: LockService) -> None:
    """What the enhanced locker counts when its store fails (30 failures in 100 operations),
    then the time until the next analysis check (every second, on the monotonic clock)."""
    for failed in range(100):
        service.metrics.enhanced_operation()
        if failed < 30:
            service.metrics.enhanced_error()
    await asyncio.sleep(1.05)


async def test_errors_past_the_threshold_abort_the_rollout_and_a_retry_restarts_it(
    make_service: Callable[..., Any], tmp_path: Path,
) -> None:
    service: LockService = await make_service(legacy_backend="memory", backend="memory")
    analysis = {"window": "1m", "interval": "1s", "maxErrorRate": 0.05}
    cluster, _, reconciler = await _migrating(
        service, tmp_path, steps=[{"setWeight": 40}, {"pause": {}}], analysis=analysis)
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Paused", service)
    await _failing_operations(service)
    await reconciler.tick()
    status = cluster.status(MIGRATIONS, "to-enhanced")
    aborted = _condition(status, "Aborted")
    assert (status["phase"], aborted["reason"]) == ("Aborted", "AnalysisFailed")
    assert "error rate 0.3 (30 of 100 enhanced operations" in aborted["message"]
    assert "above maxErrorRate 0.05" in aborted["message"]
    assert status["analysis"]["errorRate"] == 0.3
    assert service.provider.current.config.effective_weight == 0
    assert [e["type"] for e in cluster.events if e["reason"] == "AnalysisFailed"] == ["Warning"]

    await reconciler.observed(MIGRATIONS, cluster.annotate(MIGRATIONS, "to-enhanced",
                                                           RETRY_ANNOTATION, "1"))
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Paused", service)
    assert service.provider.current.config.effective_weight == 40
    assert cluster.status(MIGRATIONS, "to-enhanced")["retried"] == "1"


class ThrottledStatus(InMemoryCluster):
    """The stand-in, whose next ``refusals`` status writes the API server answers 429 (its
    priority and fairness throttling a busy client)."""

    refusals = 0

    async def patch_status(self, plural: str, namespace: str, name: str,
                           status: Mapping[str, Any], *,
                           resource_version: str | None = None) -> dict[str, Any] | None:
        if self.refusals:
            self.refusals -= 1
            raise ApiException(status=429, reason="Too Many Requests")
        return await super().patch_status(plural, namespace, name, status,
                                          resource_version=resource_version)


async def test_an_abort_whose_status_write_failed_is_still_told_by_its_event(
    make_service: Callable[..., Any], tmp_path: Path,
) -> None:
    # The rollout's Events are made once, when it moves (an abort, a step started): a status
    # write that fails must not take them with it. The status follows at the next tick.
    service: LockService = await make_service(legacy_backend="memory", backend="memory")
    cluster = ThrottledStatus()
    reconciler = await _operator(service, cluster, tmp_path, Wall())
    await reconciler.observed(POLICIES, cluster.put(POLICIES, "default", POLICY))
    await reconciler.observed(MIGRATIONS, cluster.put(MIGRATIONS, "to-enhanced", migration(
        steps=[{"setWeight": 40}, {"pause": {}}],
        analysis={"window": "1m", "interval": "1s", "maxErrorRate": 0.05})))
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Paused", service)
    await _failing_operations(service)
    cluster.refusals, before = 1, len(cluster.events)
    with pytest.raises(ApiException):
        await reconciler.tick()
    assert service.provider.current.config.effective_weight == 0  # aborted all the same
    await reconciler.tick()
    assert cluster.status(MIGRATIONS, "to-enhanced")["phase"] == "Aborted"
    [told] = cluster.events[before:]
    assert (told["type"], told["reason"]) == ("Warning", "AnalysisFailed")
    assert "every lock key goes back to legacy" in told["message"]


async def test_removing_the_analysis_clears_its_failing_check_and_a_new_one_counts_afresh(
    make_service: Callable[..., Any], tmp_path: Path,
) -> None:
    service: LockService = await make_service(legacy_backend="memory", backend="memory")
    steps = [{"setWeight": 40}, {"pause": {}}]
    analysis = {"window": "1m", "interval": "1s", "maxErrorRate": 0.05, "failureLimit": 1}
    cluster, _, reconciler = await _migrating(service, tmp_path, steps=steps, analysis=analysis)
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Paused", service)

    async def failing_check() -> dict[str, Any]:
        await _failing_operations(service)
        await reconciler.tick()
        return cluster.status(MIGRATIONS, "to-enhanced")

    status = await failing_check()  # one failed check: tolerated (failureLimit 1)
    assert (status["phase"], _condition(status, "Degraded")["reason"]) == (
        "Degraded", "AnalysisFailing")
    # Removing the analysis is how to stop it: nothing is failing any more.
    await reconciler.observed(MIGRATIONS, cluster.put(MIGRATIONS, "to-enhanced", migration(
        steps=steps)))
    await reconciler.tick()
    status = cluster.status(MIGRATIONS, "to-enhanced")
    assert status["phase"] == "Paused"
    assert _condition(status, "Degraded")["status"] == "False"
    assert status.get("analysis") is None
    # Added again, it tolerates one failed check again: the removed one's count is gone.
    await reconciler.observed(MIGRATIONS, cluster.put(MIGRATIONS, "to-enhanced", migration(
        steps=steps, analysis=analysis)))
    await reconciler.tick()  # the first sample of the new analysis
    status = await failing_check()
    assert status["analysis"]["consecutiveFailures"] == 1
    assert status["phase"] == "Degraded" and _condition(status, "Aborted")["status"] == "False"
    assert service.provider.current.config.effective_weight == 40


async def test_a_restarted_operator_resumes_the_rollout_from_its_status(
    make_service: Callable[..., Any], tmp_path: Path,
) -> None:
    service: LockService = await make_service(legacy_backend="memory", backend="memory")
    cluster, wall = InMemoryCluster(), Wall()
    first = await _operator(service, cluster, tmp_path, wall)
    await first.observed(POLICIES, cluster.put(POLICIES, "default", POLICY))
    await first.observed(MIGRATIONS, cluster.put(MIGRATIONS, "to-enhanced",
                                                 migration(steps=STEPS)))
    await _tick_until(first, cluster, lambda s: s.get("phase") == "Paused", service)
    wall.now += timedelta(minutes=1)
    await _tick_until(first, cluster, lambda s: s.get("currentStepIndex") == 3, service)
    assert first.rollout is not None
    first.rollout.close()

    restarted: LockService = await make_service(legacy_backend="memory", backend="memory",
                                                data_dir=str(tmp_path / "other"))
    second = await _operator(restarted, cluster, tmp_path, wall)
    await second.resync()  # what the operator does before it serves
    assert restarted.provider.current.config.effective_weight == 50
    await _tick_until(second, cluster, lambda s: s.get("phase") == "Paused", restarted)
    assert cluster.status(MIGRATIONS, "to-enhanced")["currentStepIndex"] == 3


async def test_a_restarted_operator_counts_failed_checks_on_from_the_status(
    make_service: Callable[..., Any], tmp_path: Path,
) -> None:
    service: LockService = await make_service(legacy_backend="memory", backend="memory")
    steps = [{"setWeight": 40}, {"pause": {}}]
    analysis = {"window": "1m", "interval": "1s", "maxErrorRate": 0.05, "failureLimit": 1}
    cluster, wall, first = await _migrating(service, tmp_path, steps=steps, analysis=analysis)
    await _tick_until(first, cluster, lambda s: s.get("phase") == "Paused", service)
    await _failing_operations(service)
    await first.tick()
    status = cluster.status(MIGRATIONS, "to-enhanced")
    assert (status["phase"], status["analysis"]["consecutiveFailures"]) == ("Degraded", 1)
    assert first.rollout is not None
    first.rollout.close()

    # The next writer reads the count back from the status (not a fresh 0): one more failed
    # check is the second in a row, past failureLimit 1, and aborts.
    restarted: LockService = await make_service(legacy_backend="memory", backend="memory",
                                                data_dir=str(tmp_path / "other"))
    second = await _operator(restarted, cluster, tmp_path, wall)
    await second.resync()
    await second.tick()  # the first sample of this process's totals
    await _failing_operations(restarted)
    await second.tick()
    status = cluster.status(MIGRATIONS, "to-enhanced")
    assert status["analysis"]["consecutiveFailures"] == 2
    assert (status["phase"], _condition(status, "Aborted")["reason"]) == (
        "Aborted", "AnalysisFailed")
    assert restarted.provider.current.config.effective_weight == 0


async def test_a_restarted_operator_keeps_an_analysis_abort_and_its_weight_zero(
    make_service: Callable[..., Any], tmp_path: Path,
) -> None:
    """An abort by a failed analysis is status, not spec: the next writer reads it back, routes
    by weight 0 from its first resync (before it serves), and stays aborted at its ticks until
    a retry; it never resumes the step the abort left."""
    service: LockService = await make_service(legacy_backend="memory", backend="memory")
    steps = [{"setWeight": 40}, {"pause": {}}]
    analysis = {"window": "1m", "interval": "1s", "maxErrorRate": 0.05}
    cluster, wall, first = await _migrating(service, tmp_path, steps=steps, analysis=analysis)
    await _tick_until(first, cluster, lambda s: s.get("phase") == "Paused", service)
    await _failing_operations(service)
    await first.tick()
    assert cluster.status(MIGRATIONS, "to-enhanced")["phase"] == "Aborted"
    assert first.rollout is not None
    first.rollout.close()
    told = len(cluster.events)

    restarted: LockService = await make_service(legacy_backend="memory", backend="memory",
                                                data_dir=str(tmp_path / "other"))
    second = await _operator(restarted, cluster, tmp_path, wall)
    await second.resync()
    assert restarted.provider.current.config.effective_weight == 0
    for _ in range(3):
        await second.tick()
        await _settle(restarted)
    status = cluster.status(MIGRATIONS, "to-enhanced")
    assert (status["phase"], _condition(status, "Aborted")["reason"]) == (
        "Aborted", "AnalysisFailed")
    assert "weight 0 settled" in status["message"]
    assert restarted.provider.current.config.effective_weight == 0
    assert not [e for e in cluster.events[told:]
                if e["reason"] in ("RolloutRetried", "StepStarted")]


async def test_a_promote_value_longer_than_a_status_field_is_recorded_as_a_digest_once(
    make_service: Callable[..., Any], tmp_path: Path,
) -> None:
    service: LockService = await make_service(legacy_backend="memory", backend="memory")
    steps = [{"setWeight": 10}, {"pause": {}}, {"setWeight": 20}, {"pause": {}}]
    cluster, _, reconciler = await _migrating(service, tmp_path, steps=steps)
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Paused", service)
    value = "x" * 300
    await reconciler.observed(MIGRATIONS, cluster.annotate(MIGRATIONS, "to-enhanced",
                                                           PROMOTE_ANNOTATION, value))
    await _tick_until(reconciler, cluster, lambda s: s.get("currentStepIndex") == 3, service)
    for _ in range(5):  # the same value again and again: still one promote
        await reconciler.tick()
    status = cluster.status(MIGRATIONS, "to-enhanced")
    assert status["currentStepIndex"] == 3 and status["promoted"] == request_token(value)
    assert str(status["promoted"]).startswith("sha256:") and len(status["promoted"]) < 64


async def test_steps_that_replace_a_higher_fixed_weight_warn_once_that_keys_move_back(
    replica_set: ReplicaSet, tmp_path: Path,
) -> None:
    service = await replica_set.start("a", replica_heartbeat="50ms")
    cluster, _, reconciler = await _migrating(service, tmp_path, weight=50)
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Completed", service)
    assert cluster.status(MIGRATIONS, "to-enhanced")["currentWeight"] == 50

    await reconciler.observed(MIGRATIONS, cluster.put(MIGRATIONS, "to-enhanced",
                                                      migration(steps=STEPS)))
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Paused", service)
    warnings = [e for e in cluster.events
                if e["object"] == "LockMigration/to-enhanced" and e["type"] == "Warning"]
    assert [e["reason"] for e in warnings] == ["StepsStartBelowCurrentWeight"]
    assert "weight 50" in warnings[0]["message"] and "make setWeight 50 the first step" in \
        warnings[0]["message"]
    assert service.provider.current.config.effective_weight == 10  # the steps' choice stands


async def test_steps_from_the_current_weight_do_not_warn(
    replica_set: ReplicaSet, tmp_path: Path,
) -> None:
    service = await replica_set.start("a", replica_heartbeat="50ms")
    cluster, _, reconciler = await _migrating(service, tmp_path, weight=10)
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Completed", service)
    await reconciler.observed(MIGRATIONS, cluster.put(MIGRATIONS, "to-enhanced",
                                                      migration(steps=STEPS)))
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Paused", service)
    assert not [e for e in cluster.events if e["type"] == "Warning"]


async def test_the_status_names_the_replica_that_applied_it_and_when_it_was_last_seen(
    replica_set: ReplicaSet, tmp_path: Path,
) -> None:
    service = await replica_set.start("a")
    cluster = InMemoryCluster()
    seconds = itertools.count(0, 30)

    def now() -> str:
        at = datetime(2030, 1, 1, tzinfo=UTC) + timedelta(seconds=next(seconds))
        return at.strftime("%Y-%m-%dT%H:%M:%SZ")

    reconciler = Reconciler(service.provider, binding=Binding(NS, "default", "to-enhanced"),
                            cluster=cluster, runtime_dir=tmp_path, now=now,
                            replica=service.migration.replica_id)
    cluster.put(POLICIES, "default", POLICY)
    await reconciler.resync()
    status = cluster.status(POLICIES, "default")
    assert status["statusWriter"] == service.migration.replica_id
    first = status["lastSeenAt"]
    await reconciler.resync()  # each resync renews it: an old time means nobody serves it
    assert cluster.status(POLICIES, "default")["lastSeenAt"] > first


async def test_steps_given_again_after_a_fixed_weight_start_from_their_first_step(
    replica_set: ReplicaSet, tmp_path: Path,
) -> None:
    service = await replica_set.start("a", replica_heartbeat="50ms")
    steps = [{"setWeight": 10}, {"pause": {}}, {"setWeight": 30}]
    cluster, _, reconciler = await _migrating(service, tmp_path, steps=steps)
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Paused", service)
    await reconciler.observed(MIGRATIONS, cluster.annotate(MIGRATIONS, "to-enhanced",
                                                           PROMOTE_ANNOTATION, "go"))
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Completed", service)
    assert cluster.status(MIGRATIONS, "to-enhanced")["currentStepIndex"] == 3
    # A fixed weight in their place (a `helm rollback` to a revision without steps, say): the
    # status no longer shows a step.
    await reconciler.observed(MIGRATIONS, cluster.put(MIGRATIONS, "to-enhanced",
                                                      migration(weight=5)))
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Completed", service)
    assert "currentStepIndex" not in cluster.status(MIGRATIONS, "to-enhanced")
    # Steps again: a new rollout, from its first step, as a restarted operator would run it
    # from this status; not the old rollout's end (weight 100 at once, the pause skipped).
    again = [{"setWeight": 10}, {"pause": {}}, {"setWeight": 100}]
    await reconciler.observed(MIGRATIONS, cluster.put(MIGRATIONS, "to-enhanced",
                                                      migration(steps=again)))
    assert service.provider.current.config.effective_weight == 10
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Paused", service)
    status = cluster.status(MIGRATIONS, "to-enhanced")
    assert (status["currentStepIndex"], status["step"], status["currentWeight"]) == (1, "2/3", 10)
    assert _condition(status, "Paused")["reason"] == "WaitingForPromote"


async def test_a_replica_that_becomes_the_status_writer_again_routes_by_the_status_not_its_old_step(
    replica_set: ReplicaSet, tmp_path: Path,
) -> None:
    # Replica a writes the status, loses the Lease, follows b's status while b advances the
    # rollout, then holds the Lease again (b gone). The step it knew when it lost the Lease is
    # history: it must not route by it again, not even for the one reconcile before it reads
    # the status as the writer (a weight move back to the old step and forth again).
    a_service, b_service, cluster, wall = await _two(replica_set, "a", "b")
    a_writer, b_writer = Writer(True), Writer(False)
    a = await _operator(a_service, cluster, tmp_path, wall, writer=a_writer)
    b = await _operator(b_service, cluster, tmp_path, wall, writer=b_writer)
    for plural, name, spec in ((POLICIES, "default", POLICY),
                               (MIGRATIONS, "to-enhanced", migration(steps=STEPS))):
        body = cluster.put(plural, name, spec)
        await a.observed(plural, body)
        await b.observed(plural, body)
    await _tick_until(a, cluster, lambda s: s.get("phase") == "Paused", a_service, b_service)
    assert a_service.provider.current.config.effective_weight == 10

    await b.event(MIGRATIONS, cluster.objects[(MIGRATIONS, "to-enhanced")])
    a_writer.writes = False  # a's Lease lapses; b takes it over and goes on
    b_writer.writes, b_writer.term = True, 2
    wall.now += timedelta(minutes=1)
    for _ in range(200):  # b advances; a follows its status, as from its watch
        await b.tick()
        await a.event(MIGRATIONS, cluster.objects[(MIGRATIONS, "to-enhanced")])
        if cluster.status(MIGRATIONS, "to-enhanced").get("currentStepIndex") == 3:
            break
        await _settle(a_service, b_service)
    assert cluster.status(MIGRATIONS, "to-enhanced")["currentStepIndex"] == 3
    assert a_service.provider.current.config.effective_weight == 50

    moves: list[float] = []
    a_service.events.subscribe(
        lambda event: moves.append(event.details["to"])
        if event.type == "routing-changed" and event.details.get("phase") == "moving" else None)
    b_writer.writes = False  # b is gone; a holds the Lease again
    a_writer.writes, a_writer.term = True, 3
    await a.resync()
    await a.tick()
    assert a_service.provider.current.config.effective_weight == 50
    assert moves == [], f"a moved keys to weight {moves} on taking the status over"
    assert cluster.status(MIGRATIONS, "to-enhanced")["currentStepIndex"] == 3


async def test_a_promote_written_by_hand_while_spec_paused_holds_is_told_once_and_waits(
    make_service: Callable[..., Any], tmp_path: Path,
) -> None:
    # The annotation alone does not lift spec.paused (only a spec edit does: kubectl locking
    # rollout promote clears it in the same edit): a hand-written promote is told to wait, by
    # one Event and the message, and ends the pause once spec.paused is cleared.
    service: LockService = await make_service(legacy_backend="memory", backend="memory")
    steps = [{"setWeight": 10}, {"pause": {}}, {"setWeight": 20}]
    cluster, _, reconciler = await _migrating(service, tmp_path, steps=steps)
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Paused", service)
    await reconciler.observed(MIGRATIONS, cluster.put(MIGRATIONS, "to-enhanced",
                                                      migration(steps=steps, paused=True)))
    await reconciler.observed(MIGRATIONS, cluster.annotate(MIGRATIONS, "to-enhanced",
                                                           PROMOTE_ANNOTATION, "by-hand"))
    for _ in range(5):
        await reconciler.tick()
    status = cluster.status(MIGRATIONS, "to-enhanced")
    assert (status["currentStepIndex"], _condition(status, "Paused")["reason"]) == (
        1, "PausedBySpec")
    assert "a promote waits until spec.paused is cleared" in status["message"]
    waiting = [e for e in cluster.events if e["reason"] == "PromoteWaiting"]
    assert len(waiting) == 1, cluster.events
    assert "spec.paused" in waiting[0]["message"] and "false" in waiting[0]["message"]

    body = cluster.objects[(MIGRATIONS, "to-enhanced")]  # spec.paused: false, as patched
    body["spec"], body["metadata"]["generation"] = migration(steps=steps), 3
    await reconciler.observed(MIGRATIONS, copy.deepcopy(body))
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Completed", service)
    assert cluster.status(MIGRATIONS, "to-enhanced")["promoted"] == "by-hand"
    assert [e["reason"] for e in cluster.events].count("PromoteWaiting") == 1


async def test_a_promote_told_to_wait_is_not_told_again_by_a_restarted_operator(
    make_service: Callable[..., Any], tmp_path: Path,
) -> None:
    # The status records the promote that spec.paused holds back (promoteWaiting): an
    # operator that restarts (or a new status writer) reads it and does not post the
    # PromoteWaiting Event again for the same promote. Before, it did, at every restart.
    service: LockService = await make_service(legacy_backend="memory", backend="memory")
    steps = [{"setWeight": 10}, {"pause": {}}, {"setWeight": 20}]
    cluster, wall, first = await _migrating(service, tmp_path, steps=steps)
    await _tick_until(first, cluster, lambda s: s.get("phase") == "Paused", service)
    await first.observed(MIGRATIONS, cluster.put(MIGRATIONS, "to-enhanced",
                                                 migration(steps=steps, paused=True)))
    await first.observed(MIGRATIONS, cluster.annotate(MIGRATIONS, "to-enhanced",
                                                      PROMOTE_ANNOTATION, "by-hand"))
    await _tick_until(first, cluster, lambda s: "a promote waits until spec.paused is cleared"
                      in str(s.get("message")), service)
    assert [e["reason"] for e in cluster.events].count("PromoteWaiting") == 1
    assert first.rollout is not None
    first.rollout.close()

    restarted: LockService = await make_service(legacy_backend="memory", backend="memory",
                                                data_dir=str(tmp_path / "other"))
    second = await _operator(restarted, cluster, tmp_path, wall)
    await second.resync()
    for _ in range(5):
        await second.tick()
        await _settle(restarted)
    status = cluster.status(MIGRATIONS, "to-enhanced")
    assert "a promote waits until spec.paused is cleared" in status["message"]
    assert [e["reason"] for e in cluster.events].count("PromoteWaiting") == 1, (
        "the restarted operator told the same promote to wait again")
    assert (status["currentStepIndex"], status.get("promoteWaiting")) == (1, "by-hand")

    await second.observed(MIGRATIONS, cluster.annotate(MIGRATIONS, "to-enhanced",
                                                       PROMOTE_ANNOTATION, "again"))
    await _tick_until(second, cluster, lambda s: s.get("promoteWaiting") == "again", restarted)
    assert [e["reason"] for e in cluster.events].count("PromoteWaiting") == 2  # a new value

    body = cluster.objects[(MIGRATIONS, "to-enhanced")]
    body["spec"], body["metadata"]["generation"] = migration(steps=steps), 5
    await second.observed(MIGRATIONS, copy.deepcopy(body))
    await _tick_until(second, cluster, lambda s: s.get("phase") == "Completed", restarted)
    assert "promoteWaiting" not in cluster.status(MIGRATIONS, "to-enhanced")


async def test_an_analysis_failing_after_the_rollout_completed_aborts_it_unlike_argo_rollouts(
    make_service: Callable[..., Any], tmp_path: Path,
) -> None:
    # A deliberate difference from Argo Rollouts (docs/02-migration.md, Automatic rollback):
    # the analysis guards a Completed rollout too (a fixed weight is Completed once settled,
    # and has no other phase to guard). A retry then starts from step 1; spec.promote with it
    # returns every key to enhanced at once.
    service: LockService = await make_service(legacy_backend="memory", backend="memory")
    analysis = {"window": "1m", "interval": "1s", "maxErrorRate": 0.05}
    steps = [{"setWeight": 40}, {"pause": {}}, {"setWeight": 100}]
    cluster, _, reconciler = await _migrating(service, tmp_path, steps=steps, analysis=analysis)
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Paused", service)
    await reconciler.observed(MIGRATIONS, cluster.annotate(MIGRATIONS, "to-enhanced",
                                                           PROMOTE_ANNOTATION, "go"))
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Completed", service)
    assert service.provider.current.config.effective_weight == 100

    await _failing_operations(service)
    await reconciler.tick()
    status = cluster.status(MIGRATIONS, "to-enhanced")
    assert (status["phase"], _condition(status, "Aborted")["reason"]) == (
        "Aborted", "AnalysisFailed")
    assert _condition(status, "Completed")["status"] == "False"
    assert service.provider.current.config.effective_weight == 0

    body = cluster.objects[(MIGRATIONS, "to-enhanced")]  # a retry with spec.promote: true
    body["spec"] = migration(steps=steps, analysis=analysis, promote=True)
    body["metadata"]["generation"] += 1
    body["metadata"]["annotations"][RETRY_ANNOTATION] = "after-the-fix"
    await reconciler.observed(MIGRATIONS, copy.deepcopy(body))
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Completed", service)
    assert service.provider.current.config.effective_weight == 100


async def test_spec_paused_holds_the_steps_in_shadow_mode_and_nothing_of_a_fixed_weight(
    make_service: Callable[..., Any], tmp_path: Path,
) -> None:
    # What the shadow-mismatch alert's runbook (docs/04-monitoring.md) tells the reader to do:
    # with steps, spec.paused holds them (in shadow mode they run on to Completed otherwise);
    # a fixed weight has no step to hold, and spec.paused changes nothing there.
    service: LockService = await make_service(legacy_backend="memory", backend="memory")
    cluster, _, reconciler = await _migrating(service, tmp_path, mode="shadow", weight=30,
                                              paused=True)
    await _tick_until(reconciler, cluster, lambda s: s.get("phase") == "Completed", service)
    status = cluster.status(MIGRATIONS, "to-enhanced")
    assert _condition(status, "Paused")["status"] == "False"
    assert status["message"].startswith("mode shadow: legacy decides every lock key")

    steps = [{"setWeight": 10}, {"pause": {"duration": "1m"}}, {"setWeight": 50}]
    await reconciler.observed(MIGRATIONS, cluster.put(MIGRATIONS, "to-enhanced", migration(
        mode="shadow", steps=steps, paused=True)))
    for _ in range(5):
        await reconciler.tick()
        await _settle(service)
    held = cluster.status(MIGRATIONS, "to-enhanced")
    assert (held["phase"], held["currentStepIndex"]) == ("Paused", 0)
    assert _condition(held, "Paused")["reason"] == "PausedBySpec"

    runbook = _alert_runbook("EnhancedLockingShadowMismatches")
    assert "a fixed `weight` has nothing to hold" in runbook


def _alert_runbook(alert: str) -> str:
    """The row of ``alert`` in docs/04-monitoring.md's alerts table."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "04-monitoring.md"
    return next(line for line in doc.read_text().splitlines()
                if line.startswith(f"| `{alert}` |"))
