"""The test cluster behaves like a real Kubernetes cluster.

These tests check the harness itself: the API server is the version pinned in
hack/versions.env, kube-controller-manager runs (namespaces are finalized,
default ServiceAccounts appear, their tokens authenticate), and the server
validates objects as a real one does.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from tests.support.controlplane import KubeCluster, kubernetes_version
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


def _jwt_claims(token: str) -> dict[str, Any]:
    """The (unverified) claims of a JWT; the API server is the one that verifies it."""
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


def test_server_reports_the_pinned_version(kube_cluster: KubeCluster) -> None:
    if kube_cluster.mode != "local":
        pytest.skip("only the local control plane is built from hack/versions.env")
    versions = json.loads(kube_cluster.kubectl("version", "-o", "json").stdout)
    assert versions["serverVersion"]["gitVersion"] == kubernetes_version()
    assert versions["clientVersion"]["gitVersion"] == kubernetes_version()


def test_namespace_is_finalized_on_delete(kube_cluster: KubeCluster) -> None:
    """Deleting a namespace needs the namespace controller of kube-controller-manager."""
    name = f"e2e-finalize-{time.monotonic_ns() % 10**8}"
    kube_cluster.kubectl("create", "namespace", name)
    kube_cluster.kubectl("create", "configmap", "content", "-n", name, "--from-literal=a=b")
    namespace = json.loads(kube_cluster.kubectl("get", "namespace", name, "-o", "json").stdout)
    assert namespace["spec"]["finalizers"] == ["kubernetes"]

    kube_cluster.kubectl("delete", "namespace", name, "--timeout=60s")

    gone = kube_cluster.kubectl("get", "namespace", name, check=False)
    assert gone.returncode != 0
    assert "NotFound" in gone.stderr


def test_default_service_account_token_authenticates(
    kube_cluster: KubeCluster, kube_namespace: str, tmp_path: Path
) -> None:
    """The ServiceAccount controller creates ``default``; its token is accepted by the server."""
    wait_for(
        f"the default ServiceAccount in {kube_namespace}",
        lambda: (
            kube_cluster.kubectl(
                "get", "serviceaccount", "default", "-n", kube_namespace, check=False
            ).returncode
            == 0
        ),
        timeout=60,
        pause=0.25,
    )
    token = kube_cluster.kubectl("create", "token", "default", "-n", kube_namespace).stdout.strip()
    subject = f"system:serviceaccount:{kube_namespace}:default"
    assert _jwt_claims(token)["sub"] == subject

    # Ask the server who the token is, with no other credential in play.
    config = json.loads(
        kube_cluster.kubectl("config", "view", "--minify", "--raw", "-o", "json").stdout
    )
    cluster = config["clusters"][0]["cluster"]
    ca = tmp_path / "ca.crt"
    ca.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
    empty = tmp_path / "empty-kubeconfig"
    empty.write_text("apiVersion: v1\nkind: Config\n")
    whoami = kube_cluster.kubectl(
        f"--kubeconfig={empty}",
        f"--server={cluster['server']}",
        f"--certificate-authority={ca}",
        f"--token={token}",
        "auth",
        "whoami",
        "-o",
        "json",
    )
    assert json.loads(whoami.stdout)["status"]["userInfo"]["username"] == subject


def test_server_side_strict_validation_refuses_unknown_fields(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    manifest = json.dumps(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "strict", "namespace": kube_namespace},
            "data": {"a": "b"},
            "bogusField": True,
        }
    )
    refused = kube_cluster.kubectl(
        "apply", "--validate=strict", "-f", "-", input=manifest, check=False
    )
    assert refused.returncode != 0
    assert 'unknown field "bogusField"' in refused.stderr
    assert (
        kube_cluster.kubectl(
            "get", "configmap", "strict", "-n", kube_namespace, check=False
        ).returncode
        != 0
    )

    # The same object is accepted with a warning when validation only warns.
    warned = kube_cluster.kubectl("apply", "--validate=warn", "-f", "-", input=manifest)
    assert 'unknown field "bogusField"' in warned.stderr
    assert kube_cluster.kubectl("get", "configmap", "strict", "-n", kube_namespace).returncode == 0
