"""How long a LockMigration edit takes to reach the running lock service.

A real control plane (the one the e2e tests use, ``tests/support/controlplane.py``) and
``enhanced-locking operator`` as a real process. Each of N edits is a ``kubectl patch`` of the
LockMigration's weight, as a user makes it; the clock starts when kubectl returns and stops
when ``GET /v1/config`` reports the new weight (a new config generation), then again when the
CR's ``status.observedGeneration`` has caught up (read with the Kubernetes client, polled every
2 ms). The anchor, measured in the same run, is the ``kubectl patch`` call itself: the cost of
one API round trip through kubectl on this machine.

Usage: python bench/config_propagation.py [--edits 50] [--no-write]
   (KUBECONFIG=... to use an existing cluster instead of starting one)

The table is printed and written into docs/benchmarks.md under its own heading.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from bench._common import (  # noqa: E402
    DOC,
    GROUP,
    VERSION,
    apply_lock_crs,
    interval_rows,
    kube_cluster,
    quick_defaults,
    until,
    write_section,
)
from kubernetes import client, config  # noqa: E402
from tests.support.controlplane import (  # noqa: E402
    KubeCluster,
)
from tests.support.operator import OperatorProcess  # noqa: E402

HEADING = "## Config propagation: a CR edit reaching the running service"
NAMESPACE = "bench-config-propagation"


def setup(kube: KubeCluster) -> None:
    apply_lock_crs(kube, NAMESPACE, {"enabled": True})


def measure(kube: KubeCluster, operator: OperatorProcess, edits: int) -> dict[str, list[float]]:
    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(kube.kubeconfig), client_configuration=configuration
    )
    api = client.CustomObjectsApi(client.ApiClient(configuration))
    http = httpx.Client(base_url=operator.url, timeout=5)
    samples: dict[str, list[float]] = {"patch": [], "service": [], "status": []}
    for i in range(edits):
        weight = round(1 + (i * 37 % 97) + 0.25, 2)  # a new value every time
        patch = json.dumps({"spec": {"weight": weight}})
        began = time.perf_counter()
        out = kube.kubectl("patch", f"lockmigrations.{GROUP}", "to-enhanced", "-n", NAMESPACE,
                           "--type=merge", "-p", patch, "-o", "json")
        returned = time.perf_counter()
        generation = json.loads(out.stdout)["metadata"]["generation"]
        def served(w: float = weight) -> bool:
            return bool(http.get("/v1/config").json()["routing"]["weight"] == w)

        until(served, f"weight {weight} in GET /v1/config")
        applied = time.perf_counter()

        def observed(g: int = generation) -> bool:
            body: Any = api.get_namespaced_custom_object_status(
                GROUP, VERSION, NAMESPACE, "lockmigrations", "to-enhanced")
            return bool((body.get("status") or {}).get("observedGeneration") == g)

        until(observed, f"observedGeneration {generation}")
        caught_up = time.perf_counter()
        samples["patch"].append(returned - began)
        samples["service"].append(applied - returned)
        samples["status"].append(caught_up - returned)
    http.close()
    return samples


def table(samples: dict[str, list[float]], edits: int, load: float) -> str:
    rows = [
        ("`kubectl patch` returns (anchor)", samples["patch"]),
        ("patch returned → `GET /v1/config` has the new weight", samples["service"]),
        ("patch returned → CR `status.observedGeneration` caught up", samples["status"]),
    ]
    lines = [
        f"{edits} edits of a LockMigration's `weight` with `kubectl patch`, one at a time, "
        "against a local control plane (etcd, kube-apiserver, kube-controller-manager on "
        f"loopback) and `enhanced-locking operator` as a process. Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, load average {load:.1f} during "
        "the run; times in milliseconds; the ratio is the p50 over the anchor's p50.",
        "",
        *interval_rows(rows),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=50)
    parser.add_argument("--no-write", action="store_true", help="print only")
    quick_defaults(parser, edits=10)
    args = parser.parse_args()
    with kube_cluster() as kube, tempfile.TemporaryDirectory() as work:
        setup(kube)
        operator = OperatorProcess(Path(work) / "data", kubeconfig=kube.kubeconfig,
                                   namespace=NAMESPACE, log_dir=Path(work) / "logs")
        operator.start(deadline=60)
        try:
            until(lambda: operator.config()["routing"]["weight"] == 0, "the initial weight")
            samples = measure(kube, operator, args.edits)
            load = os.getloadavg()[0]
        finally:
            operator.stop()
            kube.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
    text = table(samples, args.edits, load)
    print(text)
    if not args.no_write:
        write_section("config_propagation", HEADING, text)
        print(f"\nwritten to {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
