"""The API server itself refuses bad LockPolicy and LockMigration objects, naming the field.

No operator runs here: these are the CRDs' structural schemas and CEL rules at work, as a user
meets them with ``kubectl apply`` (strict field validation, kubectl's default).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from tests.support.controlplane import KubeCluster

pytestmark = pytest.mark.e2e

GROUP = "locking.runatlantis.io"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PLURALS = {"LockPolicy": "lockpolicies", "LockMigration": "lockmigrations"}


def _manifest(kind: str, namespace: str, spec: dict[str, Any]) -> str:
    if kind == "LockMigration":
        spec = {"policyRef": {"name": "default"}, **spec}
    return json.dumps({
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": kind,
        "metadata": {"name": "refused", "namespace": namespace},
        "spec": spec,
    })


REFUSED = [
    pytest.param("LockMigration", {"weight": 150},
                 ["spec.weight", "should be less than or equal to 100"], id="weight-150"),
    pytest.param("LockMigration", {"weight": -0.5},
                 ["spec.weight", "should be greater than or equal to 0"], id="weight-negative"),
    pytest.param("LockPolicy", {"timeouts": {"default": "-5s"}},
                 ['spec.timeouts.default: Invalid value: "-5s"', "should match"],
                 id="negative-duration"),
    pytest.param("LockPolicy", {"lockTTL": "1 day"},
                 ['spec.lockTTL: Invalid value: "1 day"', "should match"],
                 id="malformed-duration"),
    pytest.param("LockMigration", {"steps": [{"pause": {"duration": "10x"}}]},
                 ['spec.steps[0].pause.duration: Invalid value: "10x"'],
                 id="malformed-pause-duration"),
    pytest.param("LockPolicy", {"queue": {"starvationThreshold": "9000h"}},
                 ["spec.queue.starvationThreshold", "must be at most 8760h"],
                 id="duration-over-a-year"),
    # The service's own bounds of these settings: refused here, not applied and then refused.
    pytest.param("LockPolicy", {"queue": {"starvationThreshold": "0s"}},
                 ["spec.queue.starvationThreshold", "must be at least 1ms"],
                 id="starvation-threshold-0"),
    pytest.param("LockPolicy", {"access": {"cacheTTL": "2h"}},
                 ["spec.access.cacheTTL", "must be at most 1h"], id="cache-ttl-over-an-hour"),
    pytest.param("LockPolicy", {"access": {"cacheTTL": "0s"}},
                 ["spec.access.cacheTTL", "must be above 0"], id="cache-ttl-0"),
    pytest.param("LockPolicy", {"audit": {"retention": "0s"}},
                 ["spec.audit.retention", "must be above 0"], id="audit-retention-0"),
    pytest.param("LockPolicy", {"lockTTL": "400ns"},
                 ["spec.lockTTL", "must be 0 (no lease) or at least 1ms"], id="lease-under-1ms"),
    pytest.param("LockPolicy", {"lockTTL": "999us"},
                 ["spec.lockTTL", "must be 0 (no lease) or at least 1ms"],
                 id="lease-just-under-1ms"),
    pytest.param("LockPolicy", {"backend": "zookeeper"},
                 ['spec.backend: Unsupported value: "zookeeper"',
                  '"boltdb", "redis", "etcd", "memory"'],
                 id="unknown-backend"),
    pytest.param("LockPolicy", {"backend": "etcd"},
                 ["spec.etcd", "backend etcd needs etcd.endpoints"], id="etcd-without-endpoints"),
    pytest.param("LockPolicy", {"backend": "etcd", "etcd": {"endpoints": ["etcd.svc"]}},
                 ['spec.etcd.endpoints[0]: Invalid value: "etcd.svc"'],
                 id="etcd-endpoint-without-port"),
    pytest.param("LockPolicy", {"etcd": {"endpoints": ["etcd:2379", "etcd:2379"]}},
                 ["spec.etcd.endpoints[1]: Duplicate value"], id="etcd-endpoint-twice"),
    pytest.param("LockPolicy",
                 {"etcd": {"passwordSecretRef": {"name": "etcd-auth", "key": "password"}}},
                 ["spec.etcd.passwordSecretRef", "etcd.passwordSecretRef needs etcd.username"],
                 id="etcd-password-without-user"),
    pytest.param("LockPolicy",
                 {"etcd": {"tls": {"enabled": True,
                                   "certSecretRef": {"name": "etcd-tls", "key": "tls.crt"}}}},
                 ["spec.etcd.tls.certSecretRef",
                  "etcd.tls.certSecretRef and etcd.tls.keySecretRef must be set together"],
                 id="etcd-cert-without-key"),
    pytest.param("LockPolicy", {"etcd": {"keyPrefix": ""}},
                 ["spec.etcd.keyPrefix", "should be at least 1 chars long"],
                 id="etcd-empty-prefix"),
    pytest.param("LockPolicy", {"timeouts": {"default": "10m", "max": "1m"}},
                 ["spec.timeouts.max", "timeouts.max must be at least timeouts.default"],
                 id="max-timeout-below-default"),
    pytest.param("LockPolicy", {"features": {"priorityQueue": True, "turbo": True}},
                 ['unknown field "spec.features.turbo"'], id="unknown-field"),
    pytest.param("LockPolicy", {"redis": {"keyPrefix": "x" * 200}},
                 ["spec.redis.keyPrefix: Too long: may not be more than 128"],
                 id="oversized-string"),
    pytest.param("LockPolicy", {"redis": {"addr": "redis.atlantis.svc"}},
                 ['spec.redis.addr: Invalid value: "redis.atlantis.svc"'], id="addr-without-port"),
    pytest.param("LockPolicy", {"redis": {"tls": {"caSecretRef": {"name": "ca", "key": "c"}}}},
                 ["spec.redis.tls.caSecretRef", "redis.tls.caSecretRef needs redis.tls.enabled"],
                 id="ca-without-tls"),
    pytest.param("LockPolicy", {"redis": {"cluster": True, "db": 2}},
                 ["spec.redis.db", "redis.cluster needs redis.db 0"], id="cluster-with-db"),
    pytest.param("LockPolicy",
                 {"redis": {"passwordSecretRef": {"name": "Redis_Auth", "key": "password"}}},
                 ["spec.redis.passwordSecretRef.name"], id="secret-name-not-a-name"),
    pytest.param("LockMigration", {"weight": 10, "steps": [{"setWeight": 20}]},
                 ["spec.weight and spec.steps are mutually exclusive"], id="weight-and-steps"),
    pytest.param("LockMigration", {"steps": [{"setWeight": 20, "pause": {}}]},
                 ["spec.steps[0]", "each step sets exactly one of setWeight and pause"],
                 id="step-of-two-kinds"),
    pytest.param("LockMigration", {"mode": "canary"},
                 ['spec.mode: Unsupported value: "canary"'], id="unknown-mode"),
    pytest.param("LockMigration", {"analysis": {"window": "0s", "maxErrorRate": 0.01}},
                 ["spec.analysis.window", "must be above 0"], id="empty-analysis-window"),
    # Under half a microsecond: the operator reads it as 0, so the API server refuses it too.
    pytest.param("LockMigration", {"analysis": {"interval": "400ns", "maxErrorRate": 0.01}},
                 ["spec.analysis.interval", "must be at least 1us"],
                 id="analysis-interval-under-a-microsecond"),
    pytest.param("LockMigration", {"analysis": {"window": "999ns", "maxErrorRate": 0.01}},
                 ["spec.analysis.window", "must be at least 1us"],
                 id="analysis-window-under-a-microsecond"),
    pytest.param("LockMigration", {"abort": True, "promote": True},
                 ["spec.abort and spec.promote cannot both be true"], id="abort-and-promote"),
]


@pytest.mark.parametrize(("kind", "spec", "expected"), REFUSED)
def test_a_bad_object_is_refused_with_a_message_naming_the_field(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None,
    kind: str, spec: dict[str, Any], expected: list[str],
) -> None:
    result = kube_cluster.kubectl("apply", "-f", "-", input=_manifest(kind, kube_namespace, spec),
                                  check=False)
    assert result.returncode != 0, result.stdout
    for text in expected:
        assert text in result.stderr
    gone = kube_cluster.kubectl("get", f"{PLURALS[kind]}.{GROUP}", "refused", "-n",
                                kube_namespace, check=False)
    assert "NotFound" in gone.stderr


def test_a_migration_without_its_policy_ref_is_refused(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None
) -> None:
    manifest = json.dumps({"apiVersion": f"{GROUP}/v1alpha1", "kind": "LockMigration",
                           "metadata": {"name": "refused", "namespace": kube_namespace},
                           "spec": {"weight": 10}})
    result = kube_cluster.kubectl("apply", "-f", "-", input=manifest, check=False)
    assert result.returncode != 0
    assert "spec.policyRef: Required value" in result.stderr


@pytest.mark.parametrize("example", ["lockpolicy.yaml", "lockmigration.yaml"])
def test_the_examples_are_accepted(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None, example: str
) -> None:
    result = kube_cluster.kubectl("apply", "--dry-run=server", "-n", kube_namespace,
                                  "-f", str(EXAMPLES / example))
    assert "(server dry run)" in result.stdout


def test_the_fields_are_documented_for_kubectl_explain(
    kube_cluster: KubeCluster, lock_crds: None
) -> None:
    def explain(field: str) -> str:
        return " ".join(kube_cluster.kubectl("explain", field).stdout.split())

    explained = explain("lockpolicy.spec.timeouts.max")
    assert "Longest wait a request may ask for" in explained
    assert "A Go duration such as 500ms, 30s, 2m or 1h30m." in explained
    explained = explain("lockmigration.spec.weight")
    assert "Percent of lock keys routed to the enhanced locker" in explained


def test_short_names_and_the_category_list_both_kinds(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None
) -> None:
    kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", str(EXAMPLES / "lockpolicy.yaml"),
                         "-f", str(EXAMPLES / "lockmigration.yaml"))
    listed = kube_cluster.kubectl("get", "enhanced-locking", "-n", kube_namespace, "-o",
                                  "name").stdout.split()
    assert sorted(listed) == [f"lockmigration.{GROUP}/to-enhanced", f"lockpolicy.{GROUP}/default"]
    assert "default" in kube_cluster.kubectl("get", "lockpol", "-n", kube_namespace).stdout
    assert "to-enhanced" in kube_cluster.kubectl("get", "lockmig", "-n", kube_namespace).stdout


def test_the_mode_column_shows_the_mode_in_force_not_the_one_asked_for(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None
) -> None:
    # Asked for shadow; the service still routes (the status says so: the policy is not
    # applied yet, say). `kubectl get` shows what is in force, as the Weight column does.
    manifest = json.dumps({
        "apiVersion": f"{GROUP}/v1alpha1", "kind": "LockMigration",
        "metadata": {"name": "to-enhanced", "namespace": kube_namespace},
        "spec": {"policyRef": {"name": "default"}, "mode": "shadow", "weight": 20},
    })
    kube_cluster.kubectl("apply", "-f", "-", input=manifest)
    kube_cluster.kubectl("patch", "lockmigration", "to-enhanced", "-n", kube_namespace,
                         "--subresource=status", "--type=merge",
                         "-p", json.dumps({"status": {"mode": "route", "currentWeight": 0}}))
    header, row = kube_cluster.kubectl("get", "lockmig", "to-enhanced", "-n",
                                       kube_namespace).stdout.splitlines()
    # Columns are cut where their titles start (empty cells leave no word to split on).
    starts = [match.start() for match in re.finditer(r"\S+", header)]
    shown = {header[a:b].strip(): row[a:b].strip()
             for a, b in zip(starts, [*starts[1:], None], strict=True)}
    assert (shown["MODE"], shown["WEIGHT"]) == ("route", "0")


def test_the_migration_pages_messages_are_the_api_servers(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None
) -> None:
    # docs/02-migration.md shows what `kubectl apply` prints for three bad objects: pasted here.
    page = " ".join((EXAMPLES.parent / "docs" / "02-migration.md").read_text().split())
    told = page[page.index("prints the field, for example"):page.index("`kubectl patch` is less")]
    messages = re.findall(r"`([^`]+)`", told)
    bad: dict[str, tuple[str, dict[str, Any]]] = {
        "spec.weight": ("LockMigration", {"weight": 150}),
        "spec.timeouts.max": ("LockPolicy", {"timeouts": {"default": "10m", "max": "1m"}}),
        "strict decoding error": ("LockPolicy", {"features": {"turbo": True}})}
    assert len(messages) == len(bad), messages
    for message in messages:
        kind, spec = next(bad[start] for start in bad if message.startswith(start))
        result = kube_cluster.kubectl("apply", "-f", "-", check=False,
                                      input=_manifest(kind, kube_namespace, spec))
        assert message in result.stderr, (message, result.stderr)


def test_kubectl_patch_drops_a_misspelled_field_with_a_warning_as_the_page_says(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None
) -> None:
    # docs/02-migration.md warns that `kubectl patch` succeeds on a misspelled field: pasted.
    page = " ".join((EXAMPLES.parent / "docs" / "02-migration.md").read_text().split())
    told = page[page.index("`kubectl patch` is less"):page.index("2. **The operator")]
    patch, warning, answer = re.findall(r"`([^`]+)`", told)[1:]
    assert patch.startswith("-p '") and patch.endswith("'"), patch
    kube_cluster.kubectl("apply", "-f", "-",
                         input=_manifest("LockMigration", kube_namespace, {"weight": 25}))
    result = kube_cluster.kubectl("patch", "lockmigration", "refused", "-n", kube_namespace,
                                  "--type", "merge", "-p", patch[4:-1])
    assert warning in result.stderr, result.stderr
    assert answer in result.stdout, result.stdout
    spec = json.loads(kube_cluster.kubectl("get", "lockmigration", "refused", "-n",
                                           kube_namespace, "-o", "json").stdout)["spec"]
    assert spec["weight"] == 25 and "wieght" not in spec
