"""The status writer's Lease (kube/leader.py) against a real API server: one holder at a time,
renewals, take-over after the holder falls silent, hand-over on release, and races decided by
the API server's resourceVersion check."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from tests.support.controlplane import KubeCluster
from tests.support.operator import GROUP, apply, cr

from enhanced_locking.kube.cluster import KubernetesApi
from enhanced_locking.kube.leader import LeaseElection
from enhanced_locking.kube.reconcile import POLICIES, Binding, Reconciler

pytestmark = pytest.mark.e2e


@pytest.fixture
async def lease_api(kube_cluster: KubeCluster) -> AsyncIterator[KubernetesApi]:
    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(kube_cluster.kubeconfig), client_configuration=configuration,
        persist_config=False)
    api_client = client.ApiClient(configuration)
    yield KubernetesApi(api_client, instance="test")
    api_client.close()  # type: ignore[no-untyped-call]


def _election(api: KubernetesApi, namespace: str, identity: str,
              name: str = "writer") -> LeaseElection:
    return LeaseElection(api, namespace=namespace, name=name, identity=identity, duration=1.5,
                         deadline=1.0, retry=0.25)


def _lease(cluster: KubeCluster, namespace: str, name: str = "writer") -> dict[str, object]:
    found = json.loads(cluster.kubectl("get", "lease", name, "-n", namespace, "-o",
                                       "json").stdout)
    spec: dict[str, object] = found["spec"]
    return spec


async def test_one_holder_renews_and_the_other_takes_over_only_after_it_falls_silent(
    kube_cluster: KubeCluster, kube_namespace: str, lease_api: KubernetesApi,
) -> None:
    a = _election(lease_api, kube_namespace, "replica-a")
    b = _election(lease_api, kube_namespace, "replica-b")
    assert await a.round() and a.writes and a.term == 1
    assert not await b.round() and not b.writes and b.holder == "replica-a"
    spec = _lease(kube_cluster, kube_namespace)
    assert spec["holderIdentity"] == "replica-a" and spec["leaseDurationSeconds"] == 2

    for _ in range(4):  # a renews; b keeps seeing a fresh record
        await asyncio.sleep(0.5)
        # A renewal more than ``deadline`` after the last one (a stalled step on a busy
        # machine) comes after a stopped writing: it is the writer again, in a new term.
        term, writing = a.term, a.writes
        assert await a.round()
        assert a.term == (term if writing else term + 1)
        seen = time.monotonic()  # b sees a's renewal in this round, after this instant
        assert not await b.round()

    began = time.monotonic()
    while not await b.round():  # a stops renewing
        await asyncio.sleep(0.25)
        assert time.monotonic() - began < 10, "b never took over"
    # Not before the lease ran out since b last saw it renewed (b's own observation). Timed
    # from before the round that saw it, not after: a slow read there must not count.
    assert time.monotonic() - seen >= 1.5
    assert not a.writes  # past its renew deadline a no longer acts as the writer
    assert not await a.round() and a.holder == "replica-b"
    lost = a.term
    spec = _lease(kube_cluster, kube_namespace)
    assert spec["holderIdentity"] == "replica-b" and spec["leaseTransitions"] == 1

    await b.release()
    assert not b.writes
    assert await a.round() and a.term == lost + 1  # handed over at once, no expiry to wait out


async def test_a_holder_past_its_renew_deadline_still_hands_the_lease_over_when_it_stops(
    kube_cluster: KubeCluster, kube_namespace: str, lease_api: KubernetesApi,
) -> None:
    """A holder that could not renew for longer than its deadline (the API server away, a
    stalled step on a busy machine) no longer writes, but the Lease still names it: stopping
    cleanly hands it over at once all the same, instead of leaving the others to wait out the
    lease. One clock for both replicas, stopped but for the step past the deadline: the other
    replica never sees the lease run out, so only the hand-over lets it take over."""
    now = [0.0]
    a, b = (LeaseElection(lease_api, namespace=kube_namespace, name="writer", identity=identity,
                          duration=1.5, deadline=1.0, retry=0.25, clock=lambda: now[0])
            for identity in ("replica-a", "replica-b"))
    assert await b.round() and b.writes and b.term == 1
    assert not await a.round() and a.holder == "replica-b"
    now[0] += 1.0  # b's renew deadline passes; the lease (2 s) has not run out
    assert not b.writes
    assert not await a.round() and a.holder == "replica-b"

    await b.release()
    assert not b.writes
    spec = _lease(kube_cluster, kube_namespace)
    assert spec.get("holderIdentity") is None and spec["leaseDurationSeconds"] == 1
    assert await a.round() and a.writes and a.term == 1
    assert _lease(kube_cluster, kube_namespace)["holderIdentity"] == "replica-a"


async def test_replicas_racing_for_a_new_lease_elect_exactly_one(
    kube_namespace: str, lease_api: KubernetesApi,
) -> None:
    contenders = [_election(lease_api, kube_namespace, f"replica-{i}", name="race")
                  for i in range(5)]
    won = await asyncio.gather(*(c.round() for c in contenders))
    assert sum(won) == 1
    holder = contenders[won.index(True)].identity
    again = await asyncio.gather(*(c.round() for c in contenders))
    assert [c.identity for c, w in zip(contenders, again, strict=True) if w] == [holder]


async def test_a_status_write_made_from_an_old_read_is_refused_and_the_writer_reads_again(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None, lease_api: KubernetesApi,
    make_service: Callable[..., Any], tmp_path: Path,
) -> None:
    """A replica that read the LockPolicy before another one wrote its status (the new
    leader) cannot land its own status on top: the patch carries the old resourceVersion, the
    API server refuses it, and the replica reads the object again."""
    apply(kube_cluster, kube_namespace, {
        "apiVersion": f"{GROUP}/v1alpha1", "kind": "LockPolicy",
        "metadata": {"name": "default"}, "spec": {"enabled": True}})
    binding = Binding(kube_namespace, "default", "to-enhanced")
    stale = await lease_api.get_object(POLICIES, kube_namespace, "default")
    assert stale is not None
    old = await make_service(legacy_backend="memory", backend="memory")
    new = await make_service(legacy_backend="memory", backend="memory", default_timeout="45s")
    was_leader = Reconciler(old.provider, binding=binding, cluster=lease_api,
                            runtime_dir=tmp_path / "old")
    leader = Reconciler(new.provider, binding=binding, cluster=lease_api,
                        runtime_dir=tmp_path / "new")

    await leader.observed(POLICIES, stale)
    written = cr(kube_cluster, "lockpolicies", "default", kube_namespace)
    assert written is not None
    assert written["status"]["appliedConfigHash"] == new.provider.current.hash

    await was_leader.observed(POLICIES, stale)  # its write, made from the read before
    after = cr(kube_cluster, "lockpolicies", "default", kube_namespace)
    assert after is not None
    assert after["status"] == written["status"], "the new leader's status stays"
    assert after["metadata"]["resourceVersion"] == written["metadata"]["resourceVersion"]
    assert was_leader.policy.body is not None
    assert was_leader.policy.body["metadata"]["resourceVersion"] == \
        written["metadata"]["resourceVersion"], "it read the object again"
    assert was_leader.policy.body["status"] == written["status"]
