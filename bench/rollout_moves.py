"""How long a weight move made through the CR takes to be authoritative on every replica.

A real control plane (the e2e one, ``tests/support/controlplane.py``), a real redis-server on
loopback, and three ``enhanced-locking operator --leader-election`` processes sharing it (the
enhanced store and the replica registry) and one embedded legacy store; replica heartbeat at
its default (2s; a replica polls the registry every 50 ms while a move is under way).

Each of N moves is a ``kubectl patch`` of the LockMigration's ``weight`` to a new value, as a
user makes it. The clock starts when kubectl returns and stops when

1. every replica's ``GET /v1/config`` has the new weight (each has *applied* it: keys of the
   moving buckets are now taken on both sides);
2. every replica's ``GET /v1/migration`` says ``phase: stable`` at the new weight (each has seen
   every live replica report it: the new weight is the only authority everywhere);
3. the CR's status says so (``status.transition`` stable at the new weight, the status writer's
   view, what ``kubectl get lockmig`` shows).

The replicas are polled in turn, every few milliseconds, so a time is the moment the *last*
replica was seen done. The anchor, measured in the same run, is the ``kubectl patch`` call.

Usage: python bench/rollout_moves.py [--moves 40] [--replicas 3] [--no-write]

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
    apply_lock_crs,
    interval_rows,
    kube_cluster,
    quick_defaults,
    until,
    write_section,
)
from tests.support.controlplane import (  # noqa: E402
    KubeCluster,
)
from tests.support.operator import OperatorProcess  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

HEADING = "## Rollouts: a weight move through the CR, authoritative on every replica"
NAMESPACE = "bench-rollout-moves"


def setup(kube: KubeCluster, redis: RedisServer) -> None:
    policy = {"enabled": True, "backend": "redis", "redis": {"addr": redis.addr}}
    apply_lock_crs(kube, NAMESPACE, policy)


def _status(kube: KubeCluster) -> dict[str, Any]:
    out = kube.kubectl("get", f"lockmigrations.{GROUP}", "to-enhanced", "-n", NAMESPACE,
                       "-o", "json").stdout
    found: dict[str, Any] = json.loads(out).get("status") or {}
    return found


def measure(kube: KubeCluster, replicas: list[OperatorProcess],
            moves: int) -> dict[str, list[float]]:
    clients = [httpx.Client(base_url=r.url, timeout=5) for r in replicas]
    samples: dict[str, list[float]] = {"patch": [], "applied": [], "authoritative": [],
                                       "status": []}
    for i in range(moves):
        weight = round(1 + (i * 37 % 97) + 0.25, 2)  # a new value every time, up and down
        began = time.perf_counter()
        kube.kubectl("patch", f"lockmigrations.{GROUP}", "to-enhanced", "-n", NAMESPACE,
                     "--type=merge", "-p", json.dumps({"spec": {"weight": weight}}))
        returned = time.perf_counter()

        def applied(w: float = weight) -> bool:
            return all(c.get("/v1/config").json()["routing"]["weight"] == w for c in clients)

        def authoritative(w: float = weight) -> bool:
            routing = [c.get("/v1/migration").json()["routing"] for c in clients]
            return all(r["phase"] == "stable" and r["weight"] == w for r in routing)

        def shown(w: float = weight) -> bool:
            transition = _status(kube).get("transition") or {}
            return bool(transition.get("phase") == "stable" and transition.get("to") == w)

        until(applied, f"weight {weight} applied everywhere")
        everywhere = time.perf_counter()
        until(authoritative, f"weight {weight} authoritative everywhere")
        settled = time.perf_counter()
        until(shown, f"weight {weight} in the status", pause=0.01)
        reported = time.perf_counter()
        samples["patch"].append(returned - began)
        samples["applied"].append(everywhere - returned)
        samples["authoritative"].append(settled - returned)
        samples["status"].append(reported - returned)
    for c in clients:
        c.close()
    return samples


def table(samples: dict[str, list[float]], moves: int, replicas: int, load: float) -> str:
    rows = [
        ("`kubectl patch` returns (anchor)", samples["patch"]),
        ("→ every replica has applied the weight (`GET /v1/config`)", samples["applied"]),
        ("→ the weight is the only authority on every replica (`GET /v1/migration` stable)",
         samples["authoritative"]),
        ("→ the CR's `status.transition` says so", samples["status"]),
    ]
    lines = [
        f"{moves} moves of a LockMigration's `weight` with `kubectl patch`, one at a time, "
        f"against a local control plane and {replicas} `enhanced-locking operator "
        "--leader-election` processes sharing a redis-server on loopback (replica heartbeat "
        f"2s, registry polled every 50 ms during a move). Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load average {load:.1f} during the run; times in "
        "milliseconds from kubectl returning; the ratio is the p50 over the anchor's p50.",
        "",
        *interval_rows(rows),
    ]
    lines += [
        "",
        "Between the second and the third row every replica takes the moving keys on both "
        "sides; from the third on, each key has one authority again. The status writer writes the "
        "transition when its timer next runs (every 0.5 s) and the write reaches kubectl "
        "through the API server (read here with `kubectl get`), hence the last row.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=40)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only")
    quick_defaults(parser, moves=8)
    args = parser.parse_args()
    with kube_cluster() as kube, tempfile.TemporaryDirectory() as work:
        (Path(work) / "redis").mkdir()
        redis = RedisServer(Path(work) / "redis").start()
        started: list[OperatorProcess] = []
        try:
            setup(kube, redis)
            for _ in range(args.replicas):
                replica = OperatorProcess(Path(work) / "data", kubeconfig=kube.kubeconfig,
                                          namespace=NAMESPACE, log_dir=Path(work) / "logs",
                                          args=["--leader-election"])
                started.append(replica)
                replica.start(deadline=60)
            until(lambda: all(r.config()["routing"]["weight"] == 0 for r in started),
                  "the initial weight")
            samples = measure(kube, started, args.moves)
            load = os.getloadavg()[0]
        finally:
            for replica in started:
                replica.stop()
            redis.close()
            kube.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
    text = table(samples, args.moves, args.replicas, load)
    print(text)
    if not args.no_write:
        write_section("rollout_moves", HEADING, text)
        print(f"\nwritten to {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
