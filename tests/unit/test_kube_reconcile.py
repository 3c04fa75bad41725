"""The reconciler: bound CRs in any order become the running config, refusals keep the last good.

The lock service here is the real one (real provider, real factory building real backends);
only the Kubernetes API is an in-memory stand-in, recording status patches and Events. The
same behaviour against a real API server and the operator as a process is in tests/e2e.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from tests.support.kube_cluster import NS, InMemoryCluster
from tests.support.locks import request_for

from enhanced_locking.factory import LockService
from enhanced_locking.kube import reconcile
from enhanced_locking.kube.reconcile import MIGRATIONS, POLICIES, Binding, Reconciler
from enhanced_locking.provider import Snapshot
from enhanced_locking.types import Reason


@pytest.fixture
def cluster() -> InMemoryCluster:
    return InMemoryCluster()


@pytest.fixture
async def service(make_service: Callable[..., Any]) -> LockService:
    started: LockService = await make_service(legacy_backend="memory", backend="memory")
    return started


@pytest.fixture
def reconciler(service: LockService, cluster: InMemoryCluster, tmp_path: Path) -> Reconciler:
    return Reconciler(service.provider, binding=Binding(NS, "default", "to-enhanced"),
                      cluster=cluster, runtime_dir=tmp_path)


def _weights(service: LockService) -> list[float]:
    seen: list[float] = []

    def record(snapshot: Snapshot) -> None:
        seen.append(snapshot.config.effective_weight)

    service.provider.subscribe(record)
    return seen


async def _put(reconciler: Reconciler, cluster: InMemoryCluster, plural: str, name: str,
               spec: dict[str, Any]) -> None:
    await reconciler.observed(plural, cluster.put(plural, name, spec))


POLICY = {"enabled": True, "backend": "memory", "features": {"priorityQueue": True}}
MIGRATION = {"policyRef": {"name": "default"}, "mode": "route", "weight": 25}


async def test_policy_and_migration_become_the_cluster_layer(
    reconciler: Reconciler, cluster: InMemoryCluster, service: LockService
) -> None:
    await _put(reconciler, cluster, POLICIES, "default", POLICY)
    await _put(reconciler, cluster, MIGRATIONS, "to-enhanced", MIGRATION)

    current = service.provider.current
    assert current.layers == ("static", "cluster")
    assert current.config.priority_queue is True and current.config.effective_weight == 25
    for plural, name in ((POLICIES, "default"), (MIGRATIONS, "to-enhanced")):
        status = cluster.status(plural, name)
        assert status["observedGeneration"] == 1
        assert status["appliedGeneration"] == current.generation
        assert status["appliedConfigHash"] == current.hash
        assert cluster.ready(plural, name)["status"] == "True"
    assert cluster.status(MIGRATIONS, "to-enhanced")["currentWeight"] == 25
    assert [e["reason"] for e in cluster.events] == ["ConfigApplied", "ConfigApplied"]


async def test_a_migration_applied_before_its_policy_never_routes_by_the_policy_alone(
    reconciler: Reconciler, cluster: InMemoryCluster, service: LockService
) -> None:
    weights = _weights(service)
    await _put(reconciler, cluster, MIGRATIONS, "to-enhanced", MIGRATION)
    assert cluster.ready(MIGRATIONS, "to-enhanced")["reason"] == "PolicyNotFound"
    assert service.provider.current.config.enabled is False

    await _put(reconciler, cluster, POLICIES, "default", POLICY)
    assert weights == [25.0]  # one change, straight to the migration's weight
    assert cluster.ready(MIGRATIONS, "to-enhanced")["status"] == "True"
    assert cluster.ready(POLICIES, "default")["status"] == "True"


async def test_reconciling_again_changes_nothing(
    reconciler: Reconciler, cluster: InMemoryCluster, service: LockService
) -> None:
    await _put(reconciler, cluster, POLICIES, "default", POLICY)
    generation, patches, events = service.provider.current.generation, cluster.patches, \
        len(cluster.events)
    for _ in range(3):
        await reconciler.resync()
    assert service.provider.current.generation == generation
    assert (cluster.patches, len(cluster.events)) == (patches, events)


async def test_a_refused_policy_keeps_the_last_good_config_and_abort_still_works(
    reconciler: Reconciler, cluster: InMemoryCluster, service: LockService,
    free_port: Callable[[], int],
) -> None:
    await _put(reconciler, cluster, POLICIES, "default", POLICY)
    await _put(reconciler, cluster, MIGRATIONS, "to-enhanced", MIGRATION)
    good = service.provider.current

    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    await _put(reconciler, cluster, POLICIES, "default",
               {**POLICY, "backend": "redis", "redis": {"addr": dead}})
    assert service.provider.current == good
    ready = cluster.ready(POLICIES, "default")
    assert (ready["status"], ready["reason"]) == ("False", "ConfigRejected")
    assert f"keeps running configuration generation {good.generation}" in ready["message"]
    assert cluster.status(POLICIES, "default")["observedGeneration"] == 2
    assert cluster.events[-1]["type"] == "Warning"

    await _put(reconciler, cluster, MIGRATIONS, "to-enhanced", {**MIGRATION, "abort": True})
    assert service.provider.current.config.effective_weight == 0
    assert service.provider.current.config.backend == "memory"
    assert cluster.ready(MIGRATIONS, "to-enhanced")["status"] == "True"


@pytest.mark.redis
async def test_a_switch_off_whose_store_does_not_answer_says_why_no_lock_is_granted(
    service: LockService, cluster: InMemoryCluster, tmp_path: Path,
    redis_servers: Callable[..., Any],
) -> None:
    """The policy switches enhanced locking off on a Redis that is stopped: its locks may
    remain there, so the service grants none until it reads it, and the policy's status says
    so in a condition of its own (Ready stays True: the service runs the spec); once Redis
    answers, the service reads it again by itself and the condition goes at the next write."""
    reconciler = Reconciler(service.provider, binding=Binding(NS, "default", "to-enhanced"),
                            cluster=cluster, runtime_dir=tmp_path,
                            unread=lambda: service.unread_store)
    server = redis_servers()
    server.stop()
    await _put(reconciler, cluster, POLICIES, "default",
               {"enabled": False, "backend": "redis", "redis": {"addr": server.addr}})
    assert service.provider.current.config.redis_addr == server.addr
    assert cluster.ready(POLICIES, "default")["status"] == "True"
    waiting = [c for c in cluster.status(POLICIES, "default")["conditions"]
               if c["type"] == reconcile.GRANTING]
    assert len(waiting) == 1, cluster.status(POLICIES, "default")
    assert (waiting[0]["status"], waiting[0]["reason"]) == ("False", reconcile.STORE_UNREAD)
    assert server.addr in waiting[0]["message"] and "could not be read" in waiting[0]["message"]

    read = asyncio.Event()
    service.on_unread_store.append(read.set)
    server.start()
    async with asyncio.timeout(60):
        await read.wait()
    await reconciler.resync()
    kinds = [c["type"] for c in cluster.status(POLICIES, "default")["conditions"]]
    assert kinds == ["Ready"]


@pytest.mark.redis
async def test_no_lock_is_granted_before_the_policy_is_applied_at_the_start(
    make_service: Callable[..., Any], cluster: InMemoryCluster, tmp_path: Path,
    redis_servers: Callable[..., Any],
) -> None:
    """The operator starts while the Redis its LockPolicy names (on, every key there) is
    stopped, and pull #12 holds a key there: the policy is refused, and the service runs its
    own settings (the chart's: the embedded store, off), under which legacy would grant the
    key to another pull. So no lock is granted (``unavailable``) until the policy is applied,
    and the policy's status says why; once Redis answers and the policy is applied, the hold
    in Redis refuses the other pull. Before, pull #13 was granted the key on legacy."""
    server = redis_servers(persistence="aof")
    before = await make_service(enabled=True, backend="redis", redis_addr=server.addr,
                                migration_weight=100, data_dir=str(tmp_path / "before"))
    held = await before.router.acquire(request_for(pull=12))
    assert held.acquired and held.lock is not None and held.lock.backend == "enhanced"
    server.stop()

    service: LockService = await make_service()
    reconciler = Reconciler(service.provider, binding=Binding(NS, "default", "to-enhanced"),
                            cluster=cluster, runtime_dir=tmp_path / "run",
                            unread=lambda: service.unread_store, withhold=service.withhold)
    refused = await service.router.acquire(request_for(pull=13))  # nothing read yet
    assert not refused.acquired and refused.reason is Reason.UNAVAILABLE, refused
    assert refused.error == reconcile.WITHHELD

    cluster.put(POLICIES, "default", {"enabled": True, "backend": "redis",
                                      "redis": {"addr": server.addr}})
    await reconciler.resync()
    assert cluster.ready(POLICIES, "default")["reason"] == "ConfigRejected"
    assert service.provider.current.layers == ("static",)
    refused = await service.router.acquire(request_for(pull=13))
    assert not refused.acquired and refused.reason is Reason.UNAVAILABLE, refused
    granting = [c for c in cluster.status(POLICIES, "default")["conditions"]
                if c["type"] == reconcile.GRANTING]
    assert [(c["status"], c["reason"]) for c in granting] == [
        ("False", reconcile.POLICY_NOT_APPLIED)]
    assert "ConfigRejected" in granting[0]["message"]

    server.start()
    await reconciler.resync()
    assert cluster.ready(POLICIES, "default")["status"] == "True"
    assert [c["type"] for c in cluster.status(POLICIES, "default")["conditions"]] == ["Ready"]
    refused = await service.router.acquire(request_for(pull=13))
    assert not refused.acquired and refused.holder is not None, refused
    assert (refused.holder.pull.num, refused.holder.backend) == (12, "enhanced")


async def test_no_policy_found_at_the_start_grants_under_the_services_own_settings(
    service: LockService, cluster: InMemoryCluster, tmp_path: Path,
) -> None:
    """Read and not there: the service's own settings are the cluster's wish."""
    reconciler = Reconciler(service.provider, binding=Binding(NS, "default", "to-enhanced"),
                            cluster=cluster, runtime_dir=tmp_path, withhold=service.withhold)
    refused = await service.router.acquire(request_for(pull=13))
    assert not refused.acquired and refused.reason is Reason.UNAVAILABLE, refused
    await reconciler.resync()
    granted = await service.router.acquire(request_for(pull=13))
    assert granted.acquired, granted


async def test_the_same_refusal_is_announced_once(
    reconciler: Reconciler, cluster: InMemoryCluster, free_port: Callable[[], int]
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    await _put(reconciler, cluster, POLICIES, "default",
               {**POLICY, "backend": "redis", "redis": {"addr": dead}})
    await reconciler.resync()
    await reconciler.resync()
    assert [e["reason"] for e in cluster.events] == ["ConfigRejected"]


async def test_the_password_comes_from_the_secret_and_is_shown_nowhere(
    reconciler: Reconciler, cluster: InMemoryCluster, service: LockService,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    password = "pa55-word-from-the-secret"
    cluster.secrets[(NS, "redis-auth")] = {"password": password}
    await _put(reconciler, cluster, POLICIES, "default",
               {**POLICY, "redis": {"passwordSecretRef": {"name": "redis-auth",
                                                          "key": "password"}}})
    config = service.provider.current.config
    assert config.redis_password.get_secret_value() == password
    assert config.masked()["enhanced-locking-redis-password"] == "********"
    shown = repr(cluster.objects) + repr(cluster.events) + caplog.text
    assert password not in shown


async def test_the_etcd_password_and_tls_files_come_from_secrets_and_are_shown_nowhere(
    reconciler: Reconciler, cluster: InMemoryCluster, service: LockService,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    password, key_pem = "etcd-pa55-from-the-secret", "-----BEGIN PRIVATE KEY-----\nk3y\n"
    cluster.secrets[(NS, "etcd-auth")] = {"password": password}
    cluster.secrets[(NS, "etcd-tls")] = {"ca.crt": "CA PEM", "tls.crt": "CERT PEM",
                                         "tls.key": key_pem}
    tls = {"enabled": True, "caSecretRef": {"name": "etcd-tls", "key": "ca.crt"},
           "certSecretRef": {"name": "etcd-tls", "key": "tls.crt"},
           "keySecretRef": {"name": "etcd-tls", "key": "tls.key"}}
    await _put(reconciler, cluster, POLICIES, "default",
               {**POLICY, "etcd": {"endpoints": ["127.0.0.1:2379"], "username": "locks",
                                   "passwordSecretRef": {"name": "etcd-auth", "key": "password"},
                                   "tls": tls}})
    config = service.provider.current.config
    assert config.etcd_password.get_secret_value() == password
    assert (config.etcd_username, config.etcd_endpoints) == ("locks", ["127.0.0.1:2379"])
    assert config.masked()["enhanced-locking-etcd-password"] == "********"
    files = [Path(config.etcd_tls_ca_file), Path(config.etcd_tls_cert_file),
             Path(config.etcd_tls_key_file)]
    assert [f.read_text() for f in files] == ["CA PEM", "CERT PEM", key_pem]
    assert {f.stat().st_mode & 0o777 for f in files} == {0o600}
    shown = repr(cluster.objects) + repr(cluster.events) + caplog.text
    assert password not in shown and "k3y" not in shown


@pytest.mark.parametrize("left", ["", "-----BEGIN CERT"], ids=["empty", "cut-short"])
async def test_a_pem_file_a_failed_write_left_is_written_right_on_the_next_reconcile(
    reconciler: Reconciler, cluster: InMemoryCluster, service: LockService, tmp_path: Path,
    left: str,
) -> None:
    """A write that failed (the runtime directory is small) left a file under the name of the
    content: the next reconcile does not take it as written."""
    pem = "-----BEGIN CERTIFICATE-----\nQ0EgUEVN\n-----END CERTIFICATE-----\n"
    cluster.secrets[(NS, "redis-tls")] = {"ca.crt": pem}
    digest = hashlib.sha256(pem.encode()).hexdigest()[:16]
    (tmp_path / f"redis-ca-{digest}.pem").write_text(left)
    await _put(reconciler, cluster, POLICIES, "default",
               {**POLICY, "redis": {"tls": {"enabled": True,
                                            "caSecretRef": {"name": "redis-tls",
                                                            "key": "ca.crt"}}}})
    written = service.provider.current.config.redis_tls_ca_file
    assert written == str(tmp_path / f"redis-ca-{digest}.pem")
    assert _pem_state(tmp_path, written) == (pem, 0o600, [f"redis-ca-{digest}.pem"]), \
        "written whole, private, and no partial file kept"


def _pem_state(directory: Path, written: str) -> tuple[str, int, list[str]]:
    """The file's text and mode, and the names of PEM files (or their temporaries) in its
    directory."""
    path = Path(written)
    return (path.read_text(), path.stat().st_mode & 0o777,
            sorted(p.name for p in directory.iterdir() if "-ca-" in p.name))


async def test_a_missing_secret_is_reported_and_nothing_changes(
    reconciler: Reconciler, cluster: InMemoryCluster, service: LockService
) -> None:
    await _put(reconciler, cluster, POLICIES, "default",
               {**POLICY, "redis": {"passwordSecretRef": {"name": "absent", "key": "password"}}})
    assert service.provider.current.generation == 1
    ready = cluster.ready(POLICIES, "default")
    assert (ready["status"], ready["reason"]) == ("False", "SecretNotFound")
    assert f"Secret {NS}/absent does not exist" in ready["message"]


async def test_deleting_the_policy_returns_to_the_static_config(
    reconciler: Reconciler, cluster: InMemoryCluster, service: LockService
) -> None:
    static = service.provider.current.config
    await _put(reconciler, cluster, POLICIES, "default", POLICY)
    await _put(reconciler, cluster, MIGRATIONS, "to-enhanced", MIGRATION)
    body = cluster.objects.pop((POLICIES, "default"))
    await reconciler.deleted(POLICIES, body)

    assert service.provider.current.config == static
    assert service.provider.current.layers == ("static",)
    assert cluster.ready(MIGRATIONS, "to-enhanced")["reason"] == "PolicyNotFound"
    assert cluster.events[-2]["reason"] == "ConfigRemoved"


async def test_deleting_the_migration_keeps_the_policy(
    reconciler: Reconciler, cluster: InMemoryCluster, service: LockService
) -> None:
    await _put(reconciler, cluster, POLICIES, "default", POLICY)
    await _put(reconciler, cluster, MIGRATIONS, "to-enhanced", MIGRATION)
    await reconciler.deleted(MIGRATIONS, cluster.objects.pop((MIGRATIONS, "to-enhanced")))
    config = service.provider.current.config
    assert config.enabled and config.priority_queue and config.migration_weight is None


async def test_a_migration_of_another_policy_is_not_applied(
    reconciler: Reconciler, cluster: InMemoryCluster, service: LockService
) -> None:
    await _put(reconciler, cluster, POLICIES, "default", POLICY)
    await _put(reconciler, cluster, MIGRATIONS, "to-enhanced",
               {**MIGRATION, "policyRef": {"name": "other"}})
    assert service.provider.current.config.migration_weight is None
    ready = cluster.ready(MIGRATIONS, "to-enhanced")
    assert ready["reason"] == "PolicyNotBound" and "'other'" in ready["message"]


async def test_a_spec_the_crd_should_have_refused_is_reported_by_field(
    reconciler: Reconciler, cluster: InMemoryCluster, service: LockService
) -> None:
    await _put(reconciler, cluster, POLICIES, "default", POLICY)
    good = service.provider.current
    await _put(reconciler, cluster, POLICIES, "default",
               {**POLICY, "timeouts": {"default": "10m", "max": "1m"}})
    assert service.provider.current == good
    ready = cluster.ready(POLICIES, "default")
    assert ready["reason"] == "InvalidSpec"
    assert ready["message"].startswith("spec.timeouts: timeouts.max must be at least")


async def test_a_policy_invalid_with_the_static_settings_is_refused(
    reconciler: Reconciler, cluster: InMemoryCluster, service: LockService
) -> None:
    # The static max-timeout is 5m; a default above it makes the merged config invalid.
    await _put(reconciler, cluster, POLICIES, "default", {"timeouts": {"default": "10m"}})
    ready = cluster.ready(POLICIES, "default")
    assert ready["reason"] == "InvalidConfig"
    assert "enhanced-locking-max-timeout" in ready["message"]
    assert service.provider.current.generation == 1


async def test_the_transition_time_moves_only_when_ready_flips(
    reconciler: Reconciler, cluster: InMemoryCluster, free_port: Callable[[], int]
) -> None:
    await _put(reconciler, cluster, POLICIES, "default", POLICY)
    first = cluster.ready(POLICIES, "default")["lastTransitionTime"]
    reconciler._now = lambda: "2100-01-01T00:00:00Z"
    await _put(reconciler, cluster, POLICIES, "default", {**POLICY, "enabled": False})
    assert cluster.ready(POLICIES, "default")["lastTransitionTime"] == first
    await _put(reconciler, cluster, POLICIES, "default",
               {**POLICY, "backend": "redis", "redis": {"addr": f"127.0.0.1:{free_port()}"}})
    assert cluster.ready(POLICIES, "default")["lastTransitionTime"] == "2100-01-01T00:00:00Z"


async def test_a_stopping_operator_leaves_ready_unknown_and_the_next_one_sets_it_again(
    reconciler: Reconciler, cluster: InMemoryCluster, service: LockService, tmp_path: Path,
) -> None:
    await _put(reconciler, cluster, POLICIES, "default", POLICY)
    await _put(reconciler, cluster, MIGRATIONS, "to-enhanced", MIGRATION)
    await reconciler.stopping()
    for plural, name in ((POLICIES, "default"), (MIGRATIONS, "to-enhanced")):
        ready = cluster.ready(plural, name)
        assert (ready["status"], ready["reason"]) == ("Unknown", "OperatorStopped")
        assert "stopped" in ready["message"] and "Applied" in ready["message"]
        assert cluster.status(plural, name)["observedGeneration"] == 1
    assert cluster.status(MIGRATIONS, "to-enhanced")["currentWeight"] == 25

    restarted = Reconciler(service.provider, binding=Binding(NS, "default", "to-enhanced"),
                           cluster=cluster, runtime_dir=tmp_path)
    await restarted.resync()
    for plural, name in ((POLICIES, "default"), (MIGRATIONS, "to-enhanced")):
        ready = cluster.ready(plural, name)
        assert (ready["status"], ready["reason"]) == ("True", "Applied")


async def test_an_older_copy_of_an_object_never_flaps_the_config_back(
    reconciler: Reconciler, cluster: InMemoryCluster, service: LockService
) -> None:
    await _put(reconciler, cluster, POLICIES, "default", POLICY)
    first = cluster.put(MIGRATIONS, "to-enhanced", MIGRATION)
    await reconciler.observed(MIGRATIONS, first)
    await _put(reconciler, cluster, MIGRATIONS, "to-enhanced", {**MIGRATION, "weight": 60})
    weights = _weights(service)
    await reconciler.observed(MIGRATIONS, first)  # a late watch event of generation 1
    assert weights == [] and service.provider.current.config.effective_weight == 60

    # The same name created anew (another uid) starts again at generation 1 and counts.
    cluster.objects.pop((MIGRATIONS, "to-enhanced"))
    recreated = cluster.put(MIGRATIONS, "to-enhanced", {**MIGRATION, "weight": 10})
    recreated["metadata"]["uid"] = "uid-recreated"
    await reconciler.observed(MIGRATIONS, recreated)
    assert service.provider.current.config.effective_weight == 10


class _AwayCluster(InMemoryCluster):
    """The API server answers nothing: every read fails, as with a connection refused."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def get_object(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads += 1
        raise ConnectionRefusedError("connection refused")


async def test_a_failing_resync_backs_off_instead_of_retrying_at_a_fixed_pace(
    service: LockService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each failed resync in a row doubles the wait before the next (up to the resync
    interval), as kopf's own retries do: at a fixed 2 s an API server that stays away (or a
    Role without a verb the operator uses) took a read of both objects and a warning every 2 s
    for as long as it lasted. The first wait is still short, so a passing blip costs little."""
    monkeypatch.setattr(reconcile, "RETRY_BACKOFF", 0.02)
    away = _AwayCluster()
    reconciler = Reconciler(service.provider, binding=Binding(NS, "default", "to-enhanced"),
                            cluster=away, runtime_dir=tmp_path)
    caplog.set_level(logging.WARNING, logger="enhanced_locking.kube.reconcile")
    reconciler.retry_soon()
    running = asyncio.create_task(reconciler.resync_forever(interval=0.64))
    await asyncio.sleep(1.5)
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    # Waits of 0.02, 0.04, ... 0.64 s (then 0.64 s, the interval): about 7 reads in 1.5 s;
    # a fixed 0.02 s would make about 70.
    assert 4 <= away.reads <= 10, away.reads
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == away.reads
    assert warnings[1].startswith("resync failed 2 times in a row, retrying in 0.08s: ")


async def test_a_restarted_operator_announces_only_the_freezes_that_changed_meanwhile(
    service: LockService, cluster: InMemoryCluster, tmp_path: Path,
) -> None:
    """FreezeStarted and FreezeEnded say when a freeze began and ended. A restarted operator
    took every freeze in force for one that had just started (a FreezeStarted at each restart,
    days after it began) and never said FreezeEnded for one that ended while it was down: it
    now starts from the freezes the policy's status showed in force."""
    freeze = {"name": "release", "match": {"repo": "acme/*"}, "message": "release freeze"}
    ended = {**freeze, "name": "window", "until": "2030-01-01T00:00:00Z"}
    binding = Binding(NS, "default", "to-enhanced")
    first = Reconciler(service.provider, binding=binding, cluster=cluster, runtime_dir=tmp_path)
    await first.observed(POLICIES, cluster.put(POLICIES, "default",
                                               {**POLICY, "freezes": [freeze, ended]}))
    started = [e["message"] for e in cluster.events if e["reason"] == "FreezeStarted"]
    assert started == ["freeze release started (refuse): release freeze",
                       "freeze window started (refuse): release freeze"]
    cluster.events.clear()
    # Down while the window freeze ends (here: while the edit dropping it lands).
    cluster.put(POLICIES, "default", {**POLICY, "freezes": [freeze]})
    restarted = Reconciler(service.provider, binding=binding, cluster=cluster,
                           runtime_dir=tmp_path)
    await restarted.resync()
    freezes = [(e["reason"], e["message"]) for e in cluster.events
               if e["reason"].startswith("Freeze")]
    assert freezes == [("FreezeEnded", "freeze window ended")]


class _StatusRefused(InMemoryCluster):
    """Every status write fails, as with a Role that lacks ``patch`` on the status."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    async def patch_status(
        self, plural: str, namespace: str, name: str, status: Mapping[str, Any], *,
        resource_version: str | None = None,
    ) -> dict[str, Any] | None:
        self.attempts += 1
        raise PermissionError("lockmigrations/status is forbidden")


async def test_a_failing_rollout_tick_backs_off_and_keeps_its_pace_once_it_works(
    service: LockService, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The rollout timer ticks every interval; while its status write fails it waits twice as
    long after each failure in a row (it tried the write at every tick, 2 a second by
    default, for as long as the failure lasted), and said so once."""
    refused = _StatusRefused()
    reconciler = Reconciler(service.provider, binding=Binding(NS, "default", "to-enhanced"),
                            cluster=refused, runtime_dir=tmp_path)
    refused.put(POLICIES, "default", POLICY)
    refused.put(MIGRATIONS, "to-enhanced", MIGRATION)
    with pytest.raises(PermissionError):
        await reconciler.resync()
    caplog.set_level(logging.WARNING, logger="enhanced_locking.kube.reconcile")
    refused.attempts = 0
    ticking = asyncio.create_task(reconciler.tick_forever(0.01))
    await asyncio.sleep(0.7)
    ticking.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ticking
    # Waits of 0.01, 0.02, ... 0.32 s: about 6 writes in 0.7 s; at a fixed 0.01 s about 70.
    assert 3 <= refused.attempts <= 12, refused.attempts
    assert [r.getMessage() for r in caplog.records] == [
        "rollout tick failed, retrying with a doubling wait (up to 8s): "
        "lockmigrations/status is forbidden"]
