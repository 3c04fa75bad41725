"""The Helm chart, rendered by the real ``helm`` and installed into the real API server.

Three layers, in the order the file runs them:

1. Rendering: ``helm lint`` and ``helm template`` with every ``charts/enhanced-locking/ci``
   values file; the schema refuses unknown keys, impossible combinations ``fail`` with a
   message, the pod is locked down the way the image expects.
2. The API server: ``helm install`` of every values file is accepted by server-side
   validation (the local control plane has no kubelet, so no pod runs: the objects are what is
   tested); the CRD and default-CR lifecycle through install, upgrade, rollback and uninstall.
3. The chart's RBAC, used for real: ``enhanced-locking operator`` runs as a local process with
   a token of the chart's ServiceAccount (``kubectl create token``), sandboxed as the image
   runs it (user 65532, read-only root, only /data and /tmp writable), and serves the CR-driven
   flows (policy applied, weight moved by ``helm upgrade``, restored by ``helm rollback``, the
   Redis password read from the one Secret it may read) while ``kubectl auth can-i`` shows
   everything else is refused.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import secrets
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from tests.history import History, Hold
from tests.support import waiting
from tests.support.controlplane import CertificateAuthority, KubeCluster
from tests.support.etcd_server import EtcdCluster, EtcdServerError
from tests.support.helm import (
    CHART_DIR,
    Helm,
    OperatorProcess,
    image_runtime,
    notes_commands,
    rendered_objects,
    service_account_kubeconfig,
)
from tests.support.redis_server import RedisServer, RedisServerError
from tests.support.service import LOOPBACK, ServiceProcess, running

pytestmark = pytest.mark.e2e

REPO_ROOT = CHART_DIR.parents[1]
CI_VALUES = sorted((CHART_DIR / "ci").glob("*.yaml"))
CRD_NAMES = ("lockpolicies.locking.runatlantis.io", "lockmigrations.locking.runatlantis.io")
GROUP = "locking.runatlantis.io"


# --- helpers ---------------------------------------------------------------------------------


def wait_for(
    what: str,
    check: Callable[[], Any],
    *,
    timeout: float = 60,
    details: Callable[[], str] | None = None,
) -> Any:
    """The shared wait, at the pace of a control plane (a minute, every quarter second)."""
    return waiting.wait_for(what, check, timeout=timeout, pause=0.25, details=details)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == kind]


def get_json(cluster: KubeCluster, *args: str) -> Any:
    out = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def condition(obj: dict[str, Any] | None, kind: str = "Ready") -> dict[str, Any]:
    for item in (obj or {}).get("status", {}).get("conditions", []):
        if item.get("type") == kind:
            return dict(item)
    return {}


def helm_fields(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The managed-fields entries helm's own writes left on ``obj`` (not the operator's)."""
    return [entry for entry in obj["metadata"].get("managedFields", [])
            if entry.get("manager") == "helm"]


@pytest.fixture(scope="module")
def helm(kube_cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(kube_cluster, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture
def namespace(kube_cluster: KubeCluster) -> Iterator[str]:
    """A fresh namespace, deleted (without waiting) afterwards; several per test if asked."""
    made: list[str] = []

    def make() -> str:
        name = unique("chart")
        kube_cluster.kubectl("create", "namespace", name)
        made.append(name)
        return name

    yield make()
    for name in made:
        kube_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def crd_owner(cluster: KubeCluster) -> str | None:
    """``absent``, ``unowned`` or the ``namespace/release`` that owns the CRDs."""
    crd = get_json(cluster, "crd", CRD_NAMES[0])
    if crd is None:
        return "absent"
    annotations = crd["metadata"].get("annotations", {})
    release = annotations.get("meta.helm.sh/release-name")
    if release is None:
        return "unowned"
    return f"{annotations.get('meta.helm.sh/release-namespace')}/{release}"


@pytest.fixture(scope="module")
def crds_present(kube_cluster: KubeCluster) -> None:
    """The CRDs are served (applied from crds/ when nothing installed them yet)."""
    if crd_owner(kube_cluster) == "absent":
        kube_cluster.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
    for name in CRD_NAMES:
        kube_cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")


# Stand-ins for the Prometheus Operator's CRDs, so that the API server maps and stores the
# chart's ServiceMonitor and PrometheusRule. Their schemas are open (the real ones are not
# available offline): what is tested is the kind, the metadata and that the objects are stored.
_MONITORING_CRDS = {
    "servicemonitors": "ServiceMonitor",
    "prometheusrules": "PrometheusRule",
}


@pytest.fixture(scope="module")
def monitoring_kinds(kube_cluster: KubeCluster) -> Iterator[None]:
    created = []
    for plural, kind in _MONITORING_CRDS.items():
        name = f"{plural}.monitoring.coreos.com"
        if get_json(kube_cluster, "crd", name) is not None:
            continue  # a real cluster's own CRDs stay as they are
        crd = {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": name},
            "spec": {
                "group": "monitoring.coreos.com",
                "scope": "Namespaced",
                "names": {"plural": plural, "kind": kind, "singular": kind.lower()},
                "versions": [{
                    "name": "v1", "served": True, "storage": True,
                    "schema": {"openAPIV3Schema": {
                        "type": "object",
                        "properties": {"spec": {
                            "type": "object", "x-kubernetes-preserve-unknown-fields": True,
                        }},
                    }},
                }],
            },
        }
        kube_cluster.kubectl("apply", "-f", "-", input=json.dumps(crd))
        created.append(name)
    for name in created:
        kube_cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    yield
    for name in created:
        kube_cluster.kubectl("delete", "crd", name, "--wait=false", check=False)


# --- 1. rendering ----------------------------------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_helm_lint_passes_strictly(helm: Helm, values: Path) -> None:
    result = helm.run("lint", "--strict", str(CHART_DIR), "-f", str(values), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_each_template_file_renders_at_most_one_resource(helm: Helm, values: Path) -> None:
    objects = helm.template("-f", str(values))
    sources = [o["_source"] for o in objects]
    assert len(sources) == len(set(sources)), sorted(sources)
    assert of_kind(objects, "Deployment"), "every render has the operator"


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_the_pod_is_locked_down(helm: Helm, values: Path) -> None:
    (deployment,) = of_kind(helm.template("-f", str(values)), "Deployment")
    spec = deployment["spec"]
    assert spec["strategy"] == {"type": "Recreate"}, "two operators must never overlap"
    assert spec["replicas"] in (0, 1)
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    probes = {
        name: (container[name]["httpGet"]["path"], container[name]["httpGet"]["port"])
        for name in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes == {
        "startupProbe": ("/healthz", "http"),
        "livenessProbe": ("/healthz", "liveness"),  # kopf's liveness endpoint
        # /serving, not /readyz: a store down for the one replica keeps it ready (it answers
        # through the fall-back; docs/06-kubernetes.md, "Readiness").
        "readinessProbe": ("/serving", "http"),
    }
    # A store that does not answer takes 5 s to say so, the peers asked then 2 s more.
    assert container["readinessProbe"]["timeoutSeconds"] >= 8
    liveness_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "liveness")
    assert f"--liveness=http://0.0.0.0:{liveness_port}/healthz" in container["args"]
    assert container["args"][0] == "operator"
    assert container["resources"]["limits"]["memory"]
    assert not [a for a in container["args"] if a.startswith("--enhanced-locking-peers")]


def test_the_atlantis_guides_values_pass_the_webhook_secret_and_admit_the_ingress(
    helm: Helm, tmp_path: Path,
) -> None:
    """docs/07-atlantis.md's values, pasted: the secret reaches the container from its Secret,
    and the NetworkPolicy admits the ingress controller besides the default peers, which the
    snippet repeats as the chart has them (a list given in values replaces the default)."""
    page = (REPO_ROOT / "docs" / "07-atlantis.md").read_text()
    (snippet,) = re.findall(r"```yaml\n(operator:\n.*?)```", page, re.DOTALL)
    values = tmp_path / "values.yaml"
    values.write_text(snippet)
    given = yaml.safe_load(snippet)["networkPolicy"]["ingressFrom"]
    chart = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    default = chart["networkPolicy"]["ingressFrom"]
    assert given[:len(default)] == default

    objects = helm.template("-f", str(values))
    (deployment,) = of_kind(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": "ATLANTIS_ENHANCED_LOCKING_GITHUB_WEBHOOK_SECRET", "valueFrom": {
        "secretKeyRef": {"name": "enhanced-locking-webhooks", "key": "github"}}} in container["env"]
    (policy,) = of_kind(objects, "NetworkPolicy")
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert all(peer in peers for peer in given), peers


def test_with_tls_every_probe_of_the_api_port_speaks_https(helm: Helm) -> None:
    """The API port serves only HTTPS once ``tls.secretName`` is set: a plain-HTTP probe of it
    would never pass (the startup probe would restart the container for ever). kopf's liveness
    endpoint is a port of its own, always plain HTTP."""
    (deployment,) = of_kind(helm.template("--set", "tls.secretName=api-tls"), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    schemes = {
        name: (container[name]["httpGet"]["port"], container[name]["httpGet"].get("scheme"))
        for name in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert schemes == {
        "startupProbe": ("http", "HTTPS"),
        "livenessProbe": ("liveness", None),
        "readinessProbe": ("http", "HTTPS"),
    }
    liveness_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "liveness")
    assert f"--liveness=http://0.0.0.0:{liveness_port}/healthz" in container["args"]
    (plain,) = of_kind(helm.template(), "Deployment")
    (container,) = plain["spec"]["template"]["spec"]["containers"]
    for name in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "scheme" not in container[name]["httpGet"], name


def test_with_tls_the_test_hook_and_the_service_monitor_speak_https(
    helm: Helm, tmp_path: Path
) -> None:
    """Against a real service serving only HTTPS: the ``helm test`` Pod's curl command passes,
    and the ServiceMonitor's CA (from the TLS Secret's ``ca.crt``) and server name verify the
    certificate a cert-manager Certificate for the Service's name would hold."""
    monitoring = ("--set", "metrics.serviceMonitor.enabled=true")
    tls = ("--set", "tls.secretName=api-tls")
    (monitor,) = of_kind(helm.template(*monitoring), "ServiceMonitor")
    assert "scheme" not in monitor["spec"]["endpoints"][0]
    assert "tlsConfig" not in monitor["spec"]["endpoints"][0]
    (plain_pod,) = of_kind(helm.template(), "Pod")
    assert plain_pod["spec"]["containers"][0]["args"][-1].startswith("http://")

    objects = helm.template(*monitoring, *tls)
    (monitor,) = of_kind(objects, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    service_name = "t-enhanced-locking.atlantis.svc"
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {
        "ca": {"secret": {"name": "api-tls", "key": "ca.crt"}}, "serverName": service_name}
    (pod,) = of_kind(objects, "Pod")
    (container,) = pod["spec"]["containers"]
    assert "volumeMounts" not in container, "the test Pod never mounts the server's key"

    ca = CertificateAuthority(tmp_path)
    pair = ca.issue("api", "enhanced-locking", server=True, dns_names=[service_name],
                    ips=[LOOPBACK])
    service = ServiceProcess(tmp_path / "data", ca_file=ca.pair.cert, args=[
        f"--enhanced-locking-tls-cert-file={pair.cert}",
        f"--enhanced-locking-tls-key-file={pair.key}",
    ])
    with running(service):
        (pod,) = of_kind(helm.template("--set", f"service.port={service.port}", *tls), "Pod")
        (container,) = pod["spec"]["containers"]
        assert container["args"][-1] == f"https://{service_name}:{service.port}/readyz"
        to_loopback = f"{service_name}:{service.port}:{LOOPBACK}:{service.port}"
        curl = subprocess.run([*container["command"], "--connect-to", to_loopback,
                               *container["args"]], capture_output=True, text=True, timeout=120)
        assert curl.returncode == 0, curl.stderr
        assert json.loads(curl.stdout)["ready"] is True
        context = ssl.create_default_context(cafile=str(ca.pair.cert))
        with socket.create_connection((LOOPBACK, service.port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=endpoint["tlsConfig"]["serverName"]):
            pass  # the handshake verified the certificate for that name



@pytest.mark.parametrize(("args", "commands", "url"), [
    pytest.param(("--set", "tls.secretName=el-tls", "--set", "auth.atlantis.namespace=ci"), [
        "export ENHANCED_LOCKING_TOKEN=$(kubectl create token atlantis -n ci)",
        'curl -sk -H "Authorization: Bearer $ENHANCED_LOCKING_TOKEN" '
        "https://127.0.0.1:4142/v1/config",
    ], "https://notes-el.atlantis.svc:4142", id="kubernetes-tls"),
    pytest.param(("--set", "auth.audience=enhanced-locking,auth.atlantis.bind=false"), [
        "kubectl create serviceaccount notes-el-reader -n atlantis",
        "kubectl create rolebinding notes-el-reader -n atlantis "
        "--clusterrole=notes-el-viewer --serviceaccount=atlantis:notes-el-reader",
        "export ENHANCED_LOCKING_TOKEN=$(kubectl create token notes-el-reader -n atlantis "
        "--audience=enhanced-locking)",
        'curl -s -H "Authorization: Bearer $ENHANCED_LOCKING_TOKEN" '
        "http://127.0.0.1:4142/v1/config",
    ], "http://notes-el.atlantis.svc:4142", id="kubernetes-unbound-audience"),
    pytest.param(("--set", "auth.createRoles=false"), [
        "export ENHANCED_LOCKING_TOKEN=$(kubectl create token <account> -n <its namespace>)",
        'curl -s -H "Authorization: Bearer $ENHANCED_LOCKING_TOKEN" '
        "http://127.0.0.1:4142/v1/config",
    ], "http://notes-el.atlantis.svc:4142", id="kubernetes-no-roles"),
    pytest.param(("--set", "auth.mode=static,auth.tokensSecret=el-tokens"), [
        "export ENHANCED_LOCKING_TOKEN=<a token of tokens.csv in Secret el-tokens>",
        'curl -s -H "Authorization: Bearer $ENHANCED_LOCKING_TOKEN" '
        "http://127.0.0.1:4142/v1/config",
    ], "http://notes-el.atlantis.svc:4142", id="static"),
    pytest.param(("--set", "auth.mode=none,auth.insecureAllowUnauthenticated=true"), [
        "curl -s http://127.0.0.1:4142/v1/config",
    ], "http://notes-el.atlantis.svc:4142", id="none"),
])
def test_the_install_notes_call_the_api_with_its_scheme_and_the_token_it_asks_for(
    helm: Helm, args: tuple[str, ...], commands: list[str], url: str
) -> None:
    """The notes' call of the lock API speaks HTTPS when the API serves only that, and sends
    the bearer token each access mode asks for (tests/e2e/test_access_kubernetes.py pastes the
    default's against a real service)."""
    notes = helm.notes("atlantis", *args)
    assert notes_commands(notes) == commands, notes
    assert f"From Atlantis and other pods: {url}\n" in notes, notes

def test_the_pod_can_write_where_the_image_writes(helm: Helm) -> None:
    """The Dockerfile's data dir and HOME are the pod's writable mounts; nothing else is."""
    user, env = image_runtime()
    (deployment,) = of_kind(helm.template(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    writable = {path for path, m in mounts.items() if not m.get("readOnly")}
    assert writable == {env["ATLANTIS_DATA_DIR"], env["HOME"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "persistentVolumeClaim" in volumes[mounts[env["ATLANTIS_DATA_DIR"]]["name"]]
    security = pod["securityContext"]
    assert f"{security['runAsUser']}:{security['runAsGroup']}" == user


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_rbac_is_one_namespaced_role_without_wildcards(helm: Helm, values: Path) -> None:
    objects = helm.template("-f", str(values))
    # Cluster-wide: only the access ClusterRoles, on the virtual `locks` resource alone, and
    # the service's right to ask TokenReviews and SubjectAccessReviews (docs/08-access.md).
    for cluster_role in of_kind(objects, "ClusterRole"):
        assert cluster_role["rules"] == [{
            "apiGroups": ["locking.runatlantis.io"], "resources": ["locks"],
            "verbs": cluster_role["rules"][0]["verbs"]}]
        assert "*" not in cluster_role["rules"][0]["verbs"]
    (delegation,) = of_kind(objects, "ClusterRoleBinding")
    assert delegation["roleRef"]["name"] == "system:auth-delegator"
    (role,) = of_kind(objects, "Role")
    bindings = of_kind(objects, "RoleBinding")
    (binding,) = [b for b in bindings if b["roleRef"]["kind"] == "Role"]
    (atlantis,) = [b for b in bindings if b["roleRef"]["kind"] == "ClusterRole"]
    assert atlantis["roleRef"]["name"].endswith("-locker")
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"]
    allowed_verbs = {"get", "list", "watch", "patch", "create"}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        assert set(rule["verbs"]) <= allowed_verbs, rule
        assert "delete" not in rule["verbs"] and "update" not in rule["verbs"]
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get"] and rule["resourceNames"], "Secrets only by name"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "bogus=1"], "bogus"),
        (["--set", "image.tagg=1"], "tagg"),
        (["--set", "config.enhanced-locking-enabeld=true"], "enhanced-locking-enabeld"),
        (["--set", "config.enhanced-locking-redis-password=x"], "enhanced-locking-redis-password"),
        (["--set", "config.enhanced-locking-backend=mongo"], "enhanced-locking-backend"),
        (
            ["--set", "config.enhanced-locking-default-timeout=soon"],
            "enhanced-locking-default-timeout",
        ),
        (["--set", "replicaCount=2"], "replicaCount"),
        (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
    ],
)
def test_the_values_schema_refuses(helm: Helm, args: list[str], message: str) -> None:
    result = helm.run("template", "t", str(CHART_DIR), *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("setting", "use"),
    [
        ("enhanced-locking-auth=static", "set auth.mode instead"),
        ("enhanced-locking-auth-namespace=other", "the chart sets the release namespace"),
        ("enhanced-locking-auth-audience=locks", "set auth.audience instead"),
        ("enhanced-locking-auth-cache-ttl=30s", "set auth.cacheTTL instead"),
        ("enhanced-locking-insecure-allow-unauthenticated=true",
         "set auth.insecureAllowUnauthenticated instead"),
        ("enhanced-locking-auth-tokens-file=/tokens.csv", "set auth.tokensSecret instead"),
        ("enhanced-locking-tls-cert-file=/tls.crt", "set tls.secretName instead"),
        ("enhanced-locking-tls-key-file=/tls.key", "set tls.secretName instead"),
    ],
)
def test_config_settings_the_deployment_environment_sets_are_refused_naming_the_value(
    helm: Helm, setting: str, use: str
) -> None:
    """The Deployment's environment sets these from other values, and the environment beats
    the config file: in ``config`` they would be ignored, so the values schema refuses them."""
    result = helm.run("template", "t", str(CHART_DIR), "--set", f"config.{setting}",
                      check=False)
    assert result.returncode != 0
    key = setting.split("=")[0]
    assert f"config.{key} would be ignored (the Deployment sets it in the environment): {use}" \
        in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "redis.auth.create=true"], "redis.auth.create needs redis.auth.password"),
        (
            ["--set", "operator.livenessPort=4142"],
            "operator.livenessPort=4142 is service.port: kopf's liveness endpoint needs a port "
            "of its own",
        ),
        (
            ["--set", "redis.auth.create=true,redis.auth.password=p,redis.auth.existingSecret=s"],
            "either create (with password) or existingSecret",
        ),
        (
            ["--set", "podDisruptionBudget.enabled=true,podDisruptionBudget.maxUnavailable=null,"
                      "podDisruptionBudget.minAvailable=1"],
            "would block every node drain",
        ),
        (
            ["--set", "metrics.serviceMonitor.enabled=true",
             "--set", "config.enhanced-locking-metrics=false"],
            "need config.enhanced-locking-metrics=true",
        ),
        (
            ["--set", "lockPolicy.spec.redis.passwordSecretRef.name=other,"
                      "lockPolicy.spec.redis.passwordSecretRef.key=password"],
            'names Secret "other", which the operator may not read',
        ),
        (["--set", "etcd.auth.create=true"], "etcd.auth.create needs etcd.auth.password"),
        (
            ["--set", "etcd.auth.create=true,etcd.auth.password=p,etcd.auth.existingSecret=s"],
            "etcd.auth: set either create (with password) or existingSecret",
        ),
        (
            ["--set", "lockPolicy.spec.etcd.tls.keySecretRef.name=etcd-tls,"
                      "lockPolicy.spec.etcd.tls.keySecretRef.key=tls.key"],
            'lockPolicy.spec.etcd.tls.keySecretRef names Secret "etcd-tls", which the operator',
        ),
        # The pod reads its static layer's password from a Secret of its own namespace only:
        # one in another watched namespace never reaches it (the Deployment leaves it out).
        (
            ["--set", "operator.watchNamespace=watched,redis.auth.existingSecret=redis-auth",
             "--set", "config.enhanced-locking-backend=redis"],
            "config.enhanced-locking-backend=redis with operator.watchNamespace=watched: the "
            "pod cannot read the Redis password Secret",
        ),
        (
            ["--set", "operator.watchNamespace=watched,etcd.auth.create=true",
             "--set-string", "etcd.auth.password=p",
             "--set", "config.enhanced-locking-backend=etcd",
             "--set", "config.enhanced-locking-etcd-username=locks"],
            "config.enhanced-locking-backend=etcd with operator.watchNamespace=watched: the "
            "pod cannot read the etcd password Secret",
        ),
    ],
)
def test_impossible_combinations_fail_with_a_message(
    helm: Helm, args: list[str], message: str
) -> None:
    result = helm.run("template", "t", str(CHART_DIR), *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_the_etcd_password_goes_through_one_secret(helm: Helm) -> None:
    objects = helm.template(
        "--set", "etcd.auth.create=true", "--set-string", "etcd.auth.password=etcd-pa55",
        "--set", "lockPolicy.spec.backend=etcd",
        "--set", "lockPolicy.spec.etcd.endpoints={etcd-0.etcd:2379,etcd-1.etcd:2379}",
        "--set", "lockPolicy.spec.etcd.username=locks",
    )
    (secret,) = [o for o in of_kind(objects, "Secret") if o["metadata"]["name"].endswith("-etcd")]
    name = secret["metadata"]["name"]
    assert secret["stringData"] == {"password": "etcd-pa55"}
    (policy,) = of_kind(objects, "LockPolicy")
    assert policy["spec"]["etcd"]["passwordSecretRef"] == {"name": name, "key": "password"}
    assert "etcd-pa55" not in json.dumps(policy)
    (deployment,) = of_kind(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["ATLANTIS_ENHANCED_LOCKING_ETCD_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": name, "key": "password"}
    (role,) = of_kind(objects, "Role")
    (secrets_rule,) = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert secrets_rule["resourceNames"] == [name]


@pytest.mark.parametrize(("mode", "used"), [
    ("static", True), ("kubernetes", True), ("none", False)])
def test_the_tokens_secret_is_mounted_only_when_the_access_mode_reads_it(
    helm: Helm, mode: str, used: bool
) -> None:
    """With auth.mode none no token is read: the tokens file setting and its Secret's mount
    would make the pod look as if it checked them (and serve warns of a tokens file it does
    not use), so the chart leaves both out."""
    objects = helm.template("--set", f"auth.mode={mode}", "--set", "auth.tokensSecret=el-tokens",
                            "--set", "auth.insecureAllowUnauthenticated=true")
    (deployment,) = of_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert ("ATLANTIS_ENHANCED_LOCKING_AUTH_TOKENS_FILE" in env) is used
    assert any(m["name"] == "tokens" for m in container["volumeMounts"]) is used
    assert any(v.get("secret", {}).get("secretName") == "el-tokens"
               for v in pod["volumes"]) is used


def test_the_etcd_user_of_the_static_settings_goes_with_the_policy_s_password(
    helm: Helm, kube_cluster: KubeCluster, namespace: str, crds_present: None,
) -> None:
    """values.yaml says the etcd user is lockPolicy.spec.etcd.username or the static
    enhanced-locking-etcd-username; with the latter the chart filled in passwordSecretRef
    alone and the API server refused the LockPolicy (passwordSecretRef needs etcd.username).
    The static user goes into the policy with the password; with no user anywhere the
    render fails naming both places."""
    etcd = ("--set", "etcd.auth.existingSecret=etcd-auth",
            "--set", "lockPolicy.spec.backend=etcd",
            "--set", "lockPolicy.spec.etcd.endpoints={etcd-0.etcd:2379}")
    objects = helm.template(*etcd, "--set", "config.enhanced-locking-etcd-username=locks")
    (policy,) = of_kind(objects, "LockPolicy")
    assert policy["spec"]["etcd"] == {
        "endpoints": ["etcd-0.etcd:2379"], "username": "locks",
        "passwordSecretRef": {"name": "etcd-auth", "key": "password"}}
    applied = {**policy, "metadata": {"name": "default"}}
    applied.pop("_source")
    kube_cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                         input=json.dumps(applied))
    own = helm.template(*etcd, "--set", "config.enhanced-locking-etcd-username=locks",
                        "--set", "lockPolicy.spec.etcd.username=policy-user")
    (policy,) = of_kind(own, "LockPolicy")
    assert policy["spec"]["etcd"]["username"] == "policy-user"
    refused = helm.run("template", "t", str(CHART_DIR), *etcd, check=False)
    assert refused.returncode != 0
    assert ("etcd.auth needs an etcd user: set lockPolicy.spec.etcd.username or "
            "config.enhanced-locking-etcd-username") in refused.stderr, refused.stderr


def test_default_crs_wait_for_the_kinds_to_be_served(helm: Helm) -> None:
    """In the install that brings the CRDs Helm could not map a LockPolicy in the manifest:
    the default CRs are created by a hook, after the CRDs, owned by the release."""
    first = helm.template(api_versions=())
    assert of_kind(first, "CustomResourceDefinition")
    for kind in ("LockPolicy", "LockMigration"):
        (hooked,) = of_kind(first, kind)
        annotations = hooked["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "post-install,post-rollback"
        assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"
        assert annotations["helm.sh/resource-policy"] == "keep"
        assert annotations["meta.helm.sh/release-name"] == "t"
        assert annotations["meta.helm.sh/release-namespace"] == "atlantis"
        assert hooked["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    later = helm.template()
    (policy,) = of_kind(later, "LockPolicy")
    (migration,) = of_kind(later, "LockMigration")
    assert policy["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert migration["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert migration["spec"]["policyRef"] == {"name": policy["metadata"]["name"]}
    (hooked_migration,) = of_kind(first, "LockMigration")
    assert hooked_migration["spec"] == migration["spec"], "the same spec either way"
    external = helm.template("--set", "crds.install=false", api_versions=())
    (assumed,) = of_kind(external, "LockPolicy")
    assert "helm.sh/hook" not in assumed["metadata"]["annotations"], \
        "CRDs managed elsewhere are assumed served"


def test_steps_in_the_values_replace_the_default_weight(
    helm: Helm, kube_cluster: KubeCluster, namespace: str, crds_present: None, tmp_path: Path,
) -> None:
    """Helm merges a values file into the chart's values: ``lockMigration.spec.steps`` written
    as docs/02-migration.md shows them came with the default ``weight: 0``, and the API server
    refused the LockMigration (weight and steps are exclusive) for a weight the user never
    wrote. The default weight gives way to steps; a weight the user did write stays, and is
    refused with steps as before."""
    steps = [{"setWeight": 10}, {"pause": {"duration": "10m"}}, {"setWeight": 100}]
    values = tmp_path / "steps.yaml"
    values.write_text(yaml.safe_dump({"lockMigration": {"spec": {"steps": steps}}}))
    (migration,) = of_kind(helm.template("-f", str(values)), "LockMigration")
    assert migration["spec"] == {"policyRef": {"name": "default"}, "mode": "route",
                                 "fallback": "legacy", "steps": steps}
    applied = {**migration, "metadata": {"name": "to-enhanced"}}
    applied.pop("_source")
    kube_cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                         input=json.dumps(applied))
    (both,) = of_kind(helm.template("-f", str(values), "--set", "lockMigration.spec.weight=30"),
                      "LockMigration")
    assert both["spec"]["weight"] == 30 and both["spec"]["steps"] == steps


def test_the_chart_crds_are_the_repository_crds(helm: Helm) -> None:
    crds = of_kind(helm.template(), "CustomResourceDefinition")
    rendered = {crd["metadata"]["name"]: crd for crd in crds}
    for source in sorted((REPO_ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(source.read_text())
        assert rendered[crd["metadata"]["name"]]["spec"] == crd["spec"], source.name
        assert rendered[crd["metadata"]["name"]]["metadata"]["annotations"] == {
            "helm.sh/resource-policy": "keep"
        }


def test_the_monitoring_assets_are_shipped_verbatim(helm: Helm) -> None:
    objects = helm.template("-f", str(CHART_DIR / "ci" / "redis-monitoring-values.yaml"))
    (rule,) = of_kind(objects, "PrometheusRule")
    shipped = yaml.safe_load((CHART_DIR / "files" / "prometheus-rules.yaml").read_text())
    assert rule["spec"] == shipped
    (monitor,) = of_kind(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (dashboard,) = [
        c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")
    ]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["enhanced-locking.json"]) == json.loads(
        (CHART_DIR / "files" / "grafana-dashboard.json").read_text()
    )


# --- 2. the API server -----------------------------------------------------------------------


def _remove_crds(cluster: KubeCluster) -> None:
    """Deletes the CRDs (and so every LockPolicy and LockMigration) and waits until the kinds
    are no longer served: the next ``helm install`` is a first install."""
    cluster.kubectl("delete", "crd", *CRD_NAMES, "--ignore-not-found", "--wait=true",
                    "--timeout=60s")
    wait_for("the kinds to be gone", lambda: all(
        cluster.kubectl("get", f"{name.split('.', 1)[0]}.{GROUP}", "-A", check=False
                        ).returncode != 0 for name in CRD_NAMES))


def _volume_for_the_claim(cluster: KubeCluster, namespace: str, claim: str) -> None:
    """A PersistentVolume bound ahead to the chart's claim: no provisioner runs here, and
    ``helm install --wait`` waits for the claim to be bound."""
    volume = {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": f"{namespace}-data"},
        "spec": {
            "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "hostPath": {"path": f"/nonexistent/{namespace}"},
            "claimRef": {"namespace": namespace, "name": claim},
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(volume))


def test_install_upgrade_rollback_and_uninstall(
    helm: Helm, kube_cluster: KubeCluster, namespace: str, tmp_path: Path,
) -> None:
    """The CRDs and default CRs through a release's whole life, from one ``helm install`` on a
    cluster without the CRDs, with the operator (on the chart's ServiceAccount) following."""
    release = unique("life")
    if kube_cluster.mode == "local":
        _remove_crds(kube_cluster)  # this cluster is the test's own: a first install for real
    owner = crd_owner(kube_cluster)
    flags = ["--set", "crds.install=false"] if owner != "absent" else []
    # `--wait`, as docs/06-kubernetes.md installs: Helm waits for the CRDs to be established
    # before the hook creates the CRs. Everything it waits for must become ready without a
    # kubelet: no pod (the operator runs below as a local process) and a volume for the claim.
    _volume_for_the_claim(kube_cluster, namespace, f"{release}-enhanced-locking")
    installed = helm.run("install", release, str(CHART_DIR), "-n", namespace, "--wait",
                         "--timeout=3m", "--set", "replicaCount=0", *flags)
    assert "NEXT STEP" not in installed.stdout
    assert "helm rollback` restores them" in installed.stdout

    def cr(plural: str, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = get_json(
            kube_cluster, f"{plural}.{GROUP}", name, "-n", namespace, "--show-managed-fields")
        return found

    def migration() -> dict[str, Any] | None:
        return cr("lockmigrations", "to-enhanced")

    def reconciled(plural: str, name: str, **status: Any) -> dict[str, Any] | None:
        """The CR once the operator reported Ready=True for its current generation."""
        obj = cr(plural, name)
        if obj is None or obj.get("status", {}).get("observedGeneration") != \
                obj["metadata"]["generation"] or condition(obj).get("status") != "True":
            return None
        return obj if all(obj["status"].get(k) == v for k, v in status.items()) else None

    # One install brought everything: the CRDs and, once they were served, the default CRs.
    if owner == "absent":
        for name in CRD_NAMES:
            crd = get_json(kube_cluster, "crd", name)
            assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
            assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == release
        annotations = migration()["metadata"]["annotations"]  # type: ignore[index]
        assert annotations["locking.runatlantis.io/created-by"] == "install-hook"
    created = migration()
    assert created is not None and created["spec"]["weight"] == 0
    assert created["metadata"]["annotations"]["meta.helm.sh/release-name"] == release
    policy = cr("lockpolicies", "default")
    assert policy is not None and policy["spec"] == {"enabled": True, "backend": "boltdb"}
    for kind in ("deployment", "service", "serviceaccount", "role", "rolebinding", "configmap",
                 "persistentvolumeclaim"):
        assert get_json(kube_cluster, kind, f"{release}-enhanced-locking", "-n", namespace), kind

    # The operator, as the pod would run it, applies both (no kubelet here: a local process
    # with the chart's ServiceAccount token).
    account = f"{release}-enhanced-locking"
    operator = OperatorProcess(
        service_account_kubeconfig(kube_cluster, namespace, account, tmp_path / "sa.kubeconfig"),
        namespace, tmp_path)
    try:
        operator.start()

        def follows(what: str, weight: int) -> None:
            wait_for(f"{what}: both CRs reconciled at weight {weight}", lambda: (
                reconciled("lockpolicies", "default")
                and reconciled("lockmigrations", "to-enhanced", currentWeight=weight)
                and operator.get_json("/v1/config")["routing"]["weight"] == weight),
                timeout=90, details=operator.output)

        follows("after the install", 0)

        # The first upgrade takes the install's CRs into the release, and still changes them.
        helm.run("upgrade", release, str(CHART_DIR), "-n", namespace, "--reuse-values",
                 "--set", "lockMigration.spec.weight=40")
        weighted = migration()
        assert weighted is not None and weighted["spec"]["weight"] == 40
        assert "locking.runatlantis.io/created-by" not in weighted["metadata"]["annotations"]
        manifest = rendered_objects(helm.run("get", "manifest", release, "-n", namespace).stdout)
        assert {o["kind"] for o in manifest} >= {"LockPolicy", "LockMigration"}, \
            "release resources from now on"
        follows("after the first upgrade", 40)
        status = helm.run("status", release, "-n", namespace, "-o", "json").stdout
        weighted_revision = json.loads(status)["version"]

        # An upgrade that changes nothing in the CRs leaves them untouched: helm writes nothing
        # (its managed fields, spec and generation stay; a no-op write would not move them, a
        # real one would). The resourceVersion alone cannot say it: the operator writes the
        # CR's status and its own annotations on its schedule, not helm's.
        settled = migration()
        assert settled is not None
        helm.run("upgrade", release, str(CHART_DIR), "-n", namespace, "--reuse-values",
                 "--set", "resources.requests.cpu=100m")
        untouched = migration()
        assert untouched is not None
        assert helm_fields(settled), "helm's own managed fields, to compare"
        assert helm_fields(untouched) == helm_fields(settled)
        assert untouched["spec"] == settled["spec"]
        assert untouched["metadata"]["generation"] == settled["metadata"]["generation"]

        helm.run("upgrade", release, str(CHART_DIR), "-n", namespace, "--reuse-values",
                 "--set", "lockMigration.spec.weight=75")
        moved = migration()
        assert moved is not None and moved["metadata"]["uid"] == weighted["metadata"]["uid"], \
            "later upgrades patch the CR in place"
        follows("after an upgrade to 75", 75)
        helm.run("rollback", release, str(weighted_revision), "-n", namespace)
        rolled_back = migration()
        assert rolled_back is not None and rolled_back["spec"]["weight"] == 40
        follows("after the rollback", 40)

        # Back to the install: its CRs come back too (the install's hook runs on post-rollback),
        # and the next upgrade takes them into the release again.
        if owner == "absent":
            helm.run("rollback", release, "1", "-n", namespace)
            first = migration()
            assert first is not None and first["spec"]["weight"] == 0
            follows("after the rollback to the install", 0)
            helm.run("upgrade", release, str(CHART_DIR), "-n", namespace, "--reuse-values",
                     "--set", "lockMigration.spec.weight=40")
            again = migration()
            assert again is not None and again["spec"]["weight"] == 40
            follows("after the upgrade from the install", 40)
        log = operator.output(limit=10**7)
        assert "Forbidden" not in log and "Not enough permissions" not in log, log
    finally:
        operator.stop()

    # The test hook is a valid Pod (no kubelet here runs it; hack/kind-e2e.sh runs `helm test`).
    test_pod = helm.run("template", release, str(CHART_DIR), "-n", namespace,
                        "--show-only", "templates/tests/test-readyz.yaml").stdout
    kube_cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=test_pod)

    uninstalled = helm.run("uninstall", release, "-n", namespace)
    assert "kept due to the resource policy" in uninstalled.stdout
    kept = migration()
    assert kept is not None and kept["spec"]["weight"] == 40, "uninstall keeps the routing"
    assert get_json(kube_cluster, "lockpolicies.locking.runatlantis.io", "default", "-n", namespace)
    assert get_json(kube_cluster, "pvc", f"{release}-enhanced-locking", "-n", namespace)
    for name in CRD_NAMES:
        assert get_json(kube_cluster, "crd", name), f"{name} kept"
    gone = get_json(kube_cluster, "deployment", f"{release}-enhanced-locking", "-n", namespace)
    assert gone is None, "the rest of the release is gone"
    kube_cluster.kubectl("delete", "pv", f"{namespace}-data", "--wait=false", check=False)


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_every_values_file_is_accepted_by_the_api_server(
    helm: Helm,
    kube_cluster: KubeCluster,
    namespace: str,
    values: Path,
    crds_present: None,
    monitoring_kinds: None,
) -> None:
    release = unique("ci")
    flags = ["--set", "crds.install=false"]  # the CRDs' own lifecycle is tested above
    if yaml.safe_load(values.read_text()).get("operator", {}).get("watchNamespace"):
        watched = unique("watched")
        kube_cluster.kubectl("create", "namespace", watched)
        flags += ["--set", f"operator.watchNamespace={watched}"]
    else:
        watched = namespace
    try:
        helm.run("install", release, str(CHART_DIR), "-n", namespace, "-f", str(values), *flags)
        manifest = rendered_objects(helm.run("get", "manifest", release, "-n", namespace).stdout)
        for obj in manifest:
            where = obj["metadata"].get("namespace")
            found = get_json(kube_cluster, obj["kind"], obj["metadata"]["name"],
                             *(["-n", where] if where else []))
            assert found is not None, f"{obj['kind']} {obj['metadata']['name']} was not stored"
        role = get_json(kube_cluster, "role", f"{release}-enhanced-locking", "-n", watched)
        assert role is not None, "the Role lives in the watched namespace"
    finally:
        helm.run("uninstall", release, "-n", namespace, check=False)
        if watched != namespace:
            kube_cluster.kubectl("delete", "namespace", watched, "--wait=false", check=False)


# --- 3. the chart's RBAC, used by the operator -----------------------------------------------


class OperatedRelease:
    """A release with replicaCount 0, and the operator run locally with its ServiceAccount."""

    def __init__(self, helm: Helm, cluster: KubeCluster, namespace: str, workdir: Path,
                 redis: RedisServer, password: str) -> None:
        self.helm = helm
        self.cluster = cluster
        self.namespace = namespace
        self.release = "locks"
        self.redis = redis
        self.password = password
        self.service_account = f"{self.release}-enhanced-locking"
        self.secret = f"{self.release}-enhanced-locking-redis"
        self.workdir = workdir
        self.operator: OperatorProcess | None = None

    def values_args(self) -> list[str]:
        return [
            "--set", "replicaCount=0",  # the local process is the only operator
            "--set", "crds.install=false",
            "--set", "redis.auth.create=true",
            "--set-string", f"redis.auth.password={self.password}",
            "--set", "lockPolicy.spec.backend=redis",
            "--set", f"lockPolicy.spec.redis.addr={self.redis.addr}",
        ]

    def install(self) -> None:
        self.helm.run("install", self.release, str(CHART_DIR), "-n", self.namespace,
                      *self.values_args())

    def upgrade(self, *args: str) -> int:
        self.helm.run("upgrade", self.release, str(CHART_DIR), "-n", self.namespace,
                      "--reuse-values", *args)
        return self.revision()

    def revision(self) -> int:
        status = self.helm.run("status", self.release, "-n", self.namespace, "-o", "json")
        return int(json.loads(status.stdout)["version"])

    def start_operator(self) -> OperatorProcess:
        kubeconfig = service_account_kubeconfig(
            self.cluster, self.namespace, self.service_account, self.workdir / "sa.kubeconfig"
        )
        self.operator = OperatorProcess(kubeconfig, self.namespace, self.workdir).start()
        return self.operator

    def cr(self, plural: str, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = get_json(
            self.cluster, f"{plural}.{GROUP}", name, "-n", self.namespace
        )
        return found

    def applied(self, plural: str, name: str) -> dict[str, Any] | None:
        """The CR once its status is Ready=True for its current generation."""
        obj = self.cr(plural, name)
        if obj is None:
            return None
        ready = condition(obj)
        status = obj.get("status", {})
        current = status.get("observedGeneration") == obj["metadata"]["generation"]
        return obj if current and ready.get("status") == "True" else None

    def wait(self, what: str, check: Callable[[], Any], *, timeout: float = 60) -> Any:
        """``wait_for`` with the operator's log in the failure message."""
        details = self.operator.output if self.operator is not None else None
        return wait_for(what, check, timeout=timeout, details=details)

    def can_i(self, *args: str) -> bool:
        subject = f"system:serviceaccount:{self.namespace}:{self.service_account}"
        result = self.cluster.kubectl("auth", "can-i", *args, f"--as={subject}", check=False)
        return result.stdout.strip() == "yes"


@pytest.fixture(scope="module")
def operated(
    helm: Helm, kube_cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory,
    crds_present: None,
) -> Iterator[OperatedRelease]:
    namespace = unique("operated")
    kube_cluster.kubectl("create", "namespace", namespace)
    password = secrets.token_urlsafe(18)
    try:
        redis = RedisServer(tmp_path_factory.mktemp("redis")).start()
    except RedisServerError as error:
        pytest.fail(str(error), pytrace=False)
    redis.set_requirepass(password)
    setup = OperatedRelease(helm, kube_cluster, namespace, tmp_path_factory.mktemp("operator"),
                            redis, password)
    try:
        setup.install()
        wait_for("the ServiceAccount", lambda: get_json(
            kube_cluster, "serviceaccount", setup.service_account, "-n", namespace))
        setup.start_operator()
        yield setup
    finally:
        if setup.operator is not None:
            setup.operator.stop()
        helm.run("uninstall", setup.release, "-n", namespace, check=False)
        kube_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        redis.close()


@pytest.fixture
def operator(operated: OperatedRelease) -> OperatorProcess:
    """The running operator process (its log is in the failure message of ``wait_for``)."""
    assert operated.operator is not None
    assert operated.operator.process is not None
    assert operated.operator.process.poll() is None, operated.operator.output()
    return operated.operator


def test_the_operator_applies_the_policy_with_the_service_account_token(
    operated: OperatedRelease, operator: OperatorProcess
) -> None:
    policy = operated.wait("LockPolicy default applied",
                      lambda: operated.applied("lockpolicies", "default"), timeout=90)
    assert policy["status"].get("appliedConfigHash")
    operated.wait("LockMigration to-enhanced applied",
             lambda: operated.applied("lockmigrations", "to-enhanced"), timeout=90)
    config = operator.get_json("/v1/config")
    assert config["config"]["enhanced-locking-enabled"] is True
    assert config["config"]["enhanced-locking-backend"] == "redis"
    assert config["config"]["enhanced-locking-redis-addr"] == operated.redis.addr
    # The password came from the one Secret it may read, and reached Redis: /readyz is 200.
    assert config["config"]["enhanced-locking-redis-password"] == "********"
    operated.wait("/readyz 200 (Redis authenticated)", lambda: operator.status("/readyz") == 200)
    assert operator.status("/healthz", port=operator.liveness_port) == 200, "kopf's probe"
    # It ran as the image runs: its only writable places were /data and /tmp.
    assert (operator.data_dir / "enhanced-locking.db").is_file()
    log = operator.output(limit=10**7)
    assert operated.password not in log, "no secret in the logs"
    # Sufficient: nothing the operator (kopf included) asks of the API server is refused.
    assert "Forbidden" not in log and "Not enough permissions" not in log, log
    events = get_json(operated.cluster, "events", "-n", operated.namespace)
    assert events is not None and events["items"], "the operator posts Events"
    assert operated.password not in json.dumps(events)


def _acquire(operator: OperatorProcess, repo: str) -> dict[str, Any]:
    status, body = operator.post_json("/v1/locks", {
        "project": {"repoFullName": repo, "path": ".", "projectName": "p"},
        "workspace": "default",
        "pull": {"num": 1},
        "user": {"username": "alice"},
    })
    assert status == 200, body
    lock: dict[str, Any] = body["lock"]
    return lock


def test_helm_upgrade_moves_the_weight_and_rollback_restores_it(
    operated: OperatedRelease, operator: OperatorProcess
) -> None:
    operated.wait("LockMigration applied",
                  lambda: operated.applied("lockmigrations", "to-enhanced"), timeout=90)
    before = operated.revision()
    assert _acquire(operator, "acme/before")["backend"] == "legacy", "weight 0: all legacy"

    operated.upgrade("--set", "lockMigration.spec.weight=100")
    operated.wait("weight 100 in the service",
             lambda: operator.get_json("/v1/config")["routing"]["weight"] == 100)
    migrated = operated.wait("LockMigration status at weight 100", lambda: (
        (m := operated.applied("lockmigrations", "to-enhanced"))
        and m["status"].get("currentWeight") == 100 and m))
    assert migrated["spec"]["weight"] == 100
    assert _acquire(operator, "acme/during")["backend"] == "enhanced"

    # An upgrade that touches no CR keeps the running config: same generation and hash.
    config = operator.get_json("/v1/config")
    operated.upgrade("--set", "resources.requests.cpu=75m")
    time.sleep(2)  # give a wrongly triggered reconcile the time to show up
    again = operator.get_json("/v1/config")
    assert (again["generation"], again["hash"]) == (config["generation"], config["hash"])

    operated.helm.run("rollback", operated.release, str(before), "-n", operated.namespace)
    operated.wait("weight 0 again after the rollback",
             lambda: operator.get_json("/v1/config")["routing"]["weight"] == 0)
    operated.wait("LockMigration status back at weight 0", lambda: (
        (m := operated.applied("lockmigrations", "to-enhanced"))
        and m["status"].get("currentWeight") == 0))
    assert _acquire(operator, "acme/after")["backend"] == "legacy"


def test_a_secret_outside_the_role_is_refused_and_the_last_good_config_stays(
    operated: OperatedRelease, operator: OperatorProcess
) -> None:
    cluster = operated.cluster
    cluster.kubectl("create", "secret", "generic", "not-granted", "-n", operated.namespace,
                    "--from-literal=password=" + operated.password)
    good = operated.wait("LockPolicy applied", lambda: operated.applied("lockpolicies", "default"),
                    timeout=90)
    before = operator.get_json("/v1/config")
    patch = {"spec": {"redis": {"passwordSecretRef": {"name": "not-granted", "key": "password"}}}}
    cluster.kubectl("patch", f"lockpolicies.{GROUP}", "default", "-n", operated.namespace,
                    "--type=merge", "-p", json.dumps(patch))
    try:
        refused = operated.wait("Ready=False for the unreadable Secret", lambda: (
            (p := operated.cr("lockpolicies", "default"))
            and p.get("status", {}).get("observedGeneration") == p["metadata"]["generation"]
            and condition(p).get("status") == "False" and p))
        assert "not-granted" in condition(refused)["message"]
        assert condition(refused)["reason"].startswith("Secret")
        after = operator.get_json("/v1/config")
        assert after["hash"] == before["hash"], "the last good config keeps running"
        assert refused["status"]["appliedConfigHash"] == good["status"]["appliedConfigHash"]
    finally:
        restore = {"spec": {"redis": {"passwordSecretRef": {
            "name": operated.secret, "key": "password"}}}}
        cluster.kubectl("patch", f"lockpolicies.{GROUP}", "default", "-n", operated.namespace,
                        "--type=merge", "-p", json.dumps(restore))
    operated.wait("LockPolicy applied again", lambda: operated.applied("lockpolicies", "default"),
             timeout=90)


@pytest.mark.parametrize(
    "args",
    [
        ("get", f"lockpolicies.{GROUP}"),
        ("list", f"lockpolicies.{GROUP}"),
        ("watch", f"lockmigrations.{GROUP}"),
        ("patch", f"lockmigrations.{GROUP}"),
        ("patch", f"lockpolicies.{GROUP}", "--subresource=status"),
        ("create", "events"),
    ],
    ids=" ".join,
)
def test_the_service_account_may(operated: OperatedRelease, args: tuple[str, ...]) -> None:
    assert operated.can_i(*args, "-n", operated.namespace)


def test_the_service_account_may_read_the_redis_secret_by_name(
    operated: OperatedRelease,
) -> None:
    assert operated.can_i("get", f"secret/{operated.secret}", "-n", operated.namespace)


@pytest.mark.parametrize(
    "args",
    [
        ("get", "secret/not-granted"),
        ("list", "secrets"),
        ("watch", "secrets"),
        ("create", "secrets"),
        ("create", f"lockpolicies.{GROUP}"),
        ("delete", f"lockpolicies.{GROUP}"),
        ("update", f"lockmigrations.{GROUP}"),
        ("delete", "events"),
        ("get", "configmaps"),
        ("create", "pods"),
        ("create", "leases.coordination.k8s.io"),
        ("get", f"lockpolicies.{GROUP}", "--all-namespaces"),
        ("get", f"lockpolicies.{GROUP}", "-n", "default"),
        ("get", "secrets", "-n", "kube-system"),
        ("list", "namespaces"),
        ("get", "customresourcedefinitions.apiextensions.k8s.io"),
        ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("*", "*"),
    ],
    ids=" ".join,
)
def test_the_service_account_may_not(operated: OperatedRelease, args: tuple[str, ...]) -> None:
    scope = [] if {"-n", "--all-namespaces"} & set(args) else ["-n", operated.namespace]
    assert not operated.can_i(*args, *scope)


# --- 4. several replicas on shared stores ----------------------------------------------------


def test_three_replicas_on_embedded_stores_are_refused_naming_why(helm: Helm) -> None:
    result = helm.run("template", "t", str(CHART_DIR), "--set", "replicaCount=3", check=False)
    assert result.returncode != 0
    assert "replicaCount above 1 needs stores all replicas share" in result.stderr
    assert "the embedded file is on one pod" in result.stderr
    half = helm.run("template", "t", str(CHART_DIR), "--set", "replicaCount=3",
                    "--set", "lockPolicy.spec.backend=redis", check=False)
    assert "replicaCount above 1 needs stores" in half.stderr, "the legacy store too"


SHARED_STORES = (
    "--set", "replicaCount=3",
    "--set", "config.enhanced-locking-backend=redis,config.enhanced-locking-legacy-backend=redis",
    "--set", "config.enhanced-locking-redis-addr=redis:6379",
    "--set", "lockPolicy.spec.backend=redis,lockPolicy.spec.redis.addr=redis:6379",
)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--set", "podDisruptionBudget.minAvailable=3,podDisruptionBudget.maxUnavailable=null"],
            "podDisruptionBudget.minAvailable=3 with replicaCount=3 would block every node drain",
        ),
        (
            ["--set", "podDisruptionBudget.minAvailable=2,podDisruptionBudget.maxUnavailable=1"],
            "podDisruptionBudget: set minAvailable or maxUnavailable, not both",
        ),
    ],
)
def test_the_budget_of_several_replicas_is_checked_as_an_enabled_one(
    helm: Helm, args: list[str], message: str
) -> None:
    """Several replicas get a PodDisruptionBudget without ``podDisruptionBudget.enabled``; its
    values are checked all the same."""
    result = helm.run("template", "t", str(CHART_DIR), *SHARED_STORES, *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_a_budget_given_as_min_available_has_no_default_max_unavailable(helm: Helm) -> None:
    """The API server refuses a PodDisruptionBudget with both; ``maxUnavailable: 1`` is the
    default only while ``minAvailable`` is not given."""
    (pdb,) = of_kind(helm.template(*SHARED_STORES, "--set", "podDisruptionBudget.minAvailable=2"),
                     "PodDisruptionBudget")
    assert {k: v for k, v in pdb["spec"].items() if k != "selector"} == {"minAvailable": 2}
    (pdb,) = of_kind(helm.template(*SHARED_STORES), "PodDisruptionBudget")
    assert {k: v for k, v in pdb["spec"].items() if k != "selector"} == {"maxUnavailable": 1}
    (pdb,) = of_kind(helm.template("--set", "podDisruptionBudget.enabled=true,"
                                   "podDisruptionBudget.minAvailable=50%"), "PodDisruptionBudget")
    assert {k: v for k, v in pdb["spec"].items() if k != "selector"} == {"minAvailable": "50%"}
    assert not of_kind(helm.template(), "PodDisruptionBudget"), "one replica: only if enabled"


def test_several_replicas_find_each_other_through_a_headless_service_of_every_pod(
    helm: Helm,
) -> None:
    """A replica whose stores do not answer asks the others whether they reach them: through a
    headless Service that lists every pod, ready or not (its answer must not depend on the
    readiness it decides), named in ``enhanced-locking-peers``, and let through by the
    NetworkPolicy both ways."""
    objects = helm.template(*SHARED_STORES, "--set", "networkPolicy.enabled=true")
    (deployment,) = of_kind(objects, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/serving"
    (peers,) = [o for o in of_kind(objects, "Service") if o["spec"].get("clusterIP") == "None"]
    assert peers["spec"]["publishNotReadyAddresses"] is True
    assert peers["spec"]["selector"] == selector
    (port,) = peers["spec"]["ports"]
    assert port["targetPort"] == "http"
    name = peers["metadata"]["name"]
    assert f"--enhanced-locking-peers={name}.atlantis.svc:{port['port']}" in container["args"]
    (policy,) = of_kind(objects, "NetworkPolicy")
    assert {"podSelector": {"matchLabels": selector}} in [
        peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert {"to": [{"podSelector": {"matchLabels": selector}}],
            "ports": [{"port": "http", "protocol": "TCP"}]} in policy["spec"]["egress"]
    long = helm.template(*SHARED_STORES, "--set", "fullnameOverride=" + "x" * 63)
    (peers,) = [o for o in of_kind(long, "Service") if o["spec"].get("clusterIP") == "None"]
    assert len(peers["metadata"]["name"]) <= 63, "a Service name is a DNS label"
    assert not [o for o in of_kind(helm.template(), "Service")
                if o["spec"].get("clusterIP") == "None"], "one replica has no peers"


def test_several_replicas_refuse_peers_in_config_naming_the_setting(helm: Helm) -> None:
    """With several replicas the Deployment's own flag names the peers and beats the config
    file: ``config.enhanced-locking-peers`` would be ignored, so the values schema refuses it;
    one replica has no flag of the chart's and takes it."""
    peers = ("--set", "config.enhanced-locking-peers=elsewhere.atlantis.svc:4142")
    result = helm.run("template", "t", str(CHART_DIR), *SHARED_STORES, *peers, check=False)
    assert result.returncode != 0
    assert ("config.enhanced-locking-peers would be ignored with replicaCount above 1 (the "
            "Deployment sets it to the headless Service of the replicas)") in result.stderr, \
        result.stderr
    (deployment,) = of_kind(helm.template(*peers), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert not [a for a in container["args"] if a.startswith("--enhanced-locking-peers")]



def test_several_replicas_refuse_one_replica_id_in_config_naming_the_setting(helm: Helm) -> None:
    """``config`` is one file every replica reads: an ``enhanced-locking-replica-id`` there
    would give all replicas one name (one per process, docs/02-migration.md: the registry, the
    Lease's holder, the waiters' liveness), so with several replicas the values schema refuses
    it; one replica takes it."""
    same = ("--set", "config.enhanced-locking-replica-id=el")
    result = helm.run("template", "t", str(CHART_DIR), *SHARED_STORES, *same, check=False)
    assert result.returncode != 0
    assert ("config.enhanced-locking-replica-id would name every replica alike with "
            "replicaCount above 1") in result.stderr, result.stderr
    (configmap,) = [o for o in of_kind(helm.template(*same), "ConfigMap")
                    if "config.yaml" in o["data"]]
    assert "enhanced-locking-replica-id: el" in configmap["data"]["config.yaml"]

def _serve_locks(url: str, name: str, pull: int, history: History, stop: threading.Event,
                 counts: collections.Counter[str]) -> None:
    """Lock one of four keys, hold it a moment, release; until ``stop``."""
    rng = random.Random(pull)
    with httpx.Client(base_url=url, timeout=10) as http:
        while not stop.is_set():
            path = rng.choice("abcd")
            body = {"project": {"repoFullName": "acme/scale", "path": path, "projectName": path},
                    "pull": {"num": pull}, "user": {"username": name}, "ttl": "2s"}
            try:
                answer = http.post("/v1/locks", json=body)
            except httpx.TransportError:
                counts["unreachable"] += 1
                return  # this client's replica is gone; the others carry on
            if answer.status_code != 200:
                counts[f"refused {answer.status_code}"] += 1
                time.sleep(0.01)
                continue
            lock = answer.json()["lock"]
            start, now = time.monotonic(), datetime.now(UTC)
            # Held until its lease's end (2 s) at the latest, released or not: a client stalled
            # past it on a loaded machine held nothing from then on.
            lease_end = start + (datetime.fromisoformat(lock["expiresAt"]) - now).total_seconds()
            time.sleep(rng.uniform(0, 0.01))
            history.record(Hold(name, lock["key"], lock["fencingToken"], start, time.monotonic(),
                                lease_end=lease_end))
            counts["granted"] += 1
            for _ in range(50):
                try:
                    released = http.delete("/v1/locks/by-key",
                                           params={"key": lock["key"], "pull": pull})
                except httpx.TransportError:
                    counts["unreachable"] += 1  # gone while this client held a lock
                    return
                if released.status_code in (200, 404):
                    break
                time.sleep(0.05)


def _shared_store(kind: str, workdir: Path) -> tuple[list[str], Callable[[], None]]:
    """A Redis or a 3-member etcd on loopback: the chart values that point every store at it,
    and how to stop it."""
    if kind == "redis":
        redis = RedisServer(workdir / "redis").start()
        return [
            "--set", "lockPolicy.spec.backend=redis",
            "--set", f"lockPolicy.spec.redis.addr={redis.addr}",
            "--set", "config.enhanced-locking-legacy-backend=redis",
            "--set", f"config.enhanced-locking-redis-addr={redis.addr}",
        ], redis.close
    etcd = EtcdCluster(workdir / "etcd", members_count=3).start()
    return [
        "--set", "lockPolicy.spec.backend=etcd",
        "--set", f"lockPolicy.spec.etcd.endpoints={{{','.join(etcd.endpoints)}}}",
        "--set", "config.enhanced-locking-legacy-backend=etcd",
        # Helm splits --set on commas unless they are escaped.
        "--set", "config.enhanced-locking-etcd-endpoints=" + "\\,".join(etcd.endpoints),
    ], etcd.close


@pytest.mark.parametrize("store", ["redis", "etcd"])
def test_three_replicas_install_and_serve_locks_through_a_replica_kill(
    helm: Helm, kube_cluster: KubeCluster, namespace: str, crds_present: None,
    tmp_path_factory: pytest.TempPathFactory, store: str,
) -> None:
    """``replicaCount: 3`` on a shared Redis or etcd: accepted by the API server with leader
    election, a PodDisruptionBudget, anti-affinity and the Lease rule; then the three replicas
    (run as the pods would run them: the Deployment's arguments, the ConfigMap's config file,
    the ServiceAccount's token, no kubelet here) serve locks, and the one holding the Lease
    killed with SIGKILL changes nothing for the clients of the other two (no lock is granted
    twice) while a survivor takes the Lease."""
    workdir = tmp_path_factory.mktemp("scale")
    try:
        store_values, close_store = _shared_store(store, workdir)
    except (RedisServerError, EtcdServerError) as error:
        pytest.fail(str(error), pytrace=False)
    release = "scale"
    replicas: list[OperatorProcess] = []
    try:
        helm.run("install", release, str(CHART_DIR), "-n", namespace,
                 "--set", "replicaCount=3", "--set", "crds.install=false",
                 "--set", "lockMigration.spec.weight=100", *store_values)
        manifest = rendered_objects(helm.run("get", "manifest", release, "-n", namespace).stdout)
        for obj in manifest:
            found = get_json(kube_cluster, obj["kind"], obj["metadata"]["name"], "-n",
                             obj["metadata"].get("namespace", namespace))
            assert found is not None, f"{obj['kind']} {obj['metadata']['name']} was not stored"
        (deployment,) = of_kind(manifest, "Deployment")
        spec = deployment["spec"]
        assert spec["replicas"] == 3
        assert spec["strategy"] == {"type": "RollingUpdate",
                                    "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
        pod = spec["template"]["spec"]
        anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        assert anti[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == \
            spec["selector"]["matchLabels"]
        (container,) = pod["containers"]
        assert "--leader-election" in container["args"]
        # The replicas' headless Service, of every pod ready or not, was stored too (above).
        (peers,) = [o for o in of_kind(manifest, "Service") if o["spec"].get("clusterIP") == "None"]
        assert peers["spec"]["publishNotReadyAddresses"] is True
        assert container["readinessProbe"]["httpGet"]["path"] == "/serving"
        assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == "data")
        assert not of_kind(manifest, "PersistentVolumeClaim"), "one pod's disk is not shared"
        (pdb,) = of_kind(manifest, "PodDisruptionBudget")
        assert pdb["spec"]["maxUnavailable"] == 1
        account = f"{release}-enhanced-locking"
        subject = f"--as=system:serviceaccount:{namespace}:{account}"

        def can_i(*args: str) -> bool:
            out = kube_cluster.kubectl("auth", "can-i", *args, subject, "-n", namespace,
                                       check=False)
            return out.stdout.strip() == "yes"

        assert can_i("create", "leases.coordination.k8s.io")
        assert can_i("update", "leases.coordination.k8s.io/enhanced-locking-to-enhanced")
        assert not can_i("update", "leases.coordination.k8s.io/someone-else")
        assert not can_i("delete", "leases.coordination.k8s.io/enhanced-locking-to-enhanced")

        # The pods, as local processes: the Deployment's arguments and the ConfigMap's file.
        (configmap,) = [o for o in of_kind(manifest, "ConfigMap")
                        if "config.yaml" in o.get("data", {})]
        config_file = workdir / "config.yaml"
        config_file.write_text(configmap["data"]["config.yaml"])
        kubeconfig = service_account_kubeconfig(kube_cluster, namespace, account,
                                                workdir / "sa.kubeconfig")
        for n in range(3):
            replicas.append(OperatorProcess(
                kubeconfig, namespace, workdir / f"replica-{n}",
                extra_args=("--leader-election", "--lease-duration=3",
                            "--config=/config/config.yaml"),
                extra_files={"/config/config.yaml": config_file},
            ))
            (workdir / f"replica-{n}").mkdir()
            replicas[-1].start()

        def all_on_the_store() -> bool:
            for replica in replicas:
                config = replica.get_json("/v1/config")["config"]
                if (config.get("enhanced-locking-backend"), config.get("enhanced-locking-enabled"),
                        config.get("enhanced-locking-migration-weight")) != (store, True, 100):
                    return False
            return True

        wait_for(f"every replica runs the policy (backend {store}, weight 100)", all_on_the_store,
                 details=lambda: "\n".join(r.output(3000) for r in replicas))
        def lease_holder() -> str | None:
            lease = get_json(kube_cluster, "lease", "enhanced-locking-to-enhanced", "-n",
                             namespace)
            holder: str | None = (lease or {}).get("spec", {}).get("holderIdentity")
            return holder

        ids = [replica.get_json("/v1/migration")["replicaId"] for replica in replicas]
        assert len(set(ids)) == 3, ids
        leader = wait_for("one replica to hold the Lease", lambda: lease_holder() in ids and
                          lease_holder())
        victim = replicas[ids.index(leader)]  # the pod killed is the one writing the status

        history, stop = History(), threading.Event()
        counts: collections.Counter[str] = collections.Counter()
        clients = [threading.Thread(target=_serve_locks, args=(
            replicas[n % 3].url, f"client-{n}", 100 + n, history, stop, counts))
            for n in range(9)]
        for client in clients:
            client.start()
        # Waits for what the clients did, not fixed seconds: on a loaded machine 3 s could pass
        # before the first grant, and 5 s after the kill before the next.
        wait_for("the clients to take locks", lambda: counts["granted"] >= 30)
        before = counts["granted"]
        os.killpg(victim.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
        # The killed replica's clients' locks run out (2 s) meanwhile.
        wait_for("grants after the kill", lambda: counts["granted"] > before + 30)
        after_kill = counts["granted"] - before
        # Another replica takes the Lease once it runs out (--lease-duration=3).
        survivors = {i for i in ids if i != leader}
        wait_for("a surviving replica to take the Lease", lambda: lease_holder() in survivors,
                 timeout=30, details=lambda: "\n".join(r.output(3000) for r in replicas))
        stop.set()
        for client in clients:
            client.join(30)
        assert before > 0 and after_kill > 0, counts
        assert counts["unreachable"] >= 1, "the killed replica's clients saw it go"
        assert history.violations() == []
    finally:
        for replica in replicas:
            replica.stop()
        helm.run("uninstall", release, "-n", namespace, check=False)
        close_store()
