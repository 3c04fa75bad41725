"""``enhanced-locking operator`` as a real process against a real cluster, and its CRs applied
and read back.

:class:`OperatorProcess` is a :class:`~tests.support.service.ServiceProcess` (same start,
health wait, stop, kill and restart on the same port and data dir) whose command is
``operator`` bound to one namespace, with the cluster's kubeconfig and a kopf liveness
endpoint on a second free loopback port.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from tests.support.controlplane import KubeCluster
from tests.support.service import LOOPBACK, ServiceProcess, enhanced_locking_command, free_port

__all__ = ["OperatorProcess", "apply", "cr", "ready_condition"]

GROUP = "locking.runatlantis.io"


class OperatorProcess(ServiceProcess):
    """One operator process serving the lock API and reconciling one namespace's CRs."""

    def __init__(
        self,
        data_dir: Path,
        *,
        kubeconfig: Path,
        namespace: str,
        policy: str = "default",
        migration: str = "to-enhanced",
        resync_interval: float = 30,
        args: Sequence[str] = (),
        log_dir: Path | None = None,
        port: int | None = None,
    ) -> None:
        super().__init__(data_dir, args=args, env={"KUBECONFIG": str(kubeconfig)},
                         log_dir=log_dir, port=port)
        self.namespace = namespace
        self.policy = policy
        self.migration = migration
        self.resync_interval = resync_interval
        self.liveness_port = free_port()

    @property
    def liveness_url(self) -> str:
        return f"http://{LOOPBACK}:{self.liveness_port}/healthz"

    @property
    def argv(self) -> list[str]:
        return [
            *enhanced_locking_command(), "operator",
            "--host", LOOPBACK, "--port", self.port_argument,
            "--data-dir", str(self.data_dir),
            "--namespace", self.namespace,
            "--policy", self.policy,
            "--migration", self.migration,
            "--liveness", self.liveness_url,
            "--resync-interval", str(self.resync_interval),
            *self.args,
        ]

    def config(self) -> dict[str, Any]:
        """``GET /v1/config`` of the running service."""
        response = httpx.get(self.url + "/v1/config", timeout=5)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def log_text(self) -> str:
        return self._log("stdout").read_text(errors="replace") + self.stderr()


def apply(cluster: KubeCluster, namespace: str, *objects: dict[str, Any]) -> None:
    """``kubectl apply`` each object into ``namespace``."""
    for body in objects:
        body = {**body, "metadata": {**body["metadata"], "namespace": namespace}}
        cluster.kubectl("apply", "-f", "-", input=json.dumps(body))


def cr(cluster: KubeCluster, plural: str, name: str, namespace: str) -> dict[str, Any] | None:
    """The object as the API server has it, or None."""
    result = cluster.kubectl("get", f"{plural}.{GROUP}", name, "-n", namespace, "-o", "json",
                             check=False)
    if result.returncode != 0:
        if "NotFound" in result.stderr:
            return None
        raise AssertionError(result.stderr)
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def ready_condition(body: dict[str, Any] | None) -> dict[str, Any]:
    """The object's Ready condition ({} when it has none yet)."""
    for condition in ((body or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return dict(condition)
    return {}
