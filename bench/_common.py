"""What every benchmark shares: percentiles, its section of docs/benchmarks.md, a cluster, and
the lock requests and hand-off timing of the store benchmarks.

Each benchmark owns one section of ``docs/benchmarks.md`` between ``<!-- NAME: begin -->`` and
``<!-- NAME: end -->`` under its heading; a rerun replaces only that section.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench._goals import Report, records

from enhanced_locking.backends.shared_events import SharedEventBus
from enhanced_locking.locking import EnhancedLocker
from enhanced_locking.types import LockRequest, Project, Pull

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
GROUP, VERSION = "locking.runatlantis.io", "v1alpha1"


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (``q`` from 0 to 1)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def interval_rows(rows: list[tuple[str, list[float]]]) -> list[str]:
    """A markdown table of intervals (seconds, printed in ms): p50, p99 and max of each, and
    its p50 over the first row's, the anchor timed in the same run."""
    anchor = statistics.median(rows[0][1])
    lines = ["| interval | p50 | p99 | max | p50 / anchor |", "|---|---:|---:|---:|---:|"]
    for name, values in rows:
        p50 = statistics.median(values)
        lines.append(
            f"| {name} | {p50 * 1000:.1f} | {percentile(values, 0.99) * 1000:.1f} | "
            f"{max(values) * 1000:.1f} | {p50 / anchor:.2f} |"
        )
    return lines


async def handoffs_of(locker: EnhancedLocker, count: int) -> list[float]:
    """:func:`handoff_latencies` on ``locker``, closed afterwards (see :func:`close_locker`)."""
    latencies = await handoff_latencies(locker, count)
    await close_locker(locker)
    return latencies


def quick_defaults(parser: argparse.ArgumentParser, **small: Any) -> None:
    """With ``BENCH_QUICK`` set (``make bench``), smaller counts and print only: the whole suite
    then runs in a few minutes; the tables in docs/benchmarks.md come from full runs. Called
    once every option is added: each option's ``--help`` then names its default and, where it
    has one, the count ``make bench`` runs with."""
    for action in parser._actions:
        unset = action.default in (None, False, [], "", argparse.SUPPRESS)
        if not action.option_strings or action.help == argparse.SUPPRESS or unset:
            continue
        quick = f"; make bench: {small[action.dest]}" if action.dest in small else ""
        default = f"default {action.default}{quick}".replace("%", "%%")
        action.help = f"{action.help} ({default})" if action.help else f"({default})"
    if os.environ.get("BENCH_QUICK"):
        parser.set_defaults(no_write=True, **small)


def verdict(ok: bool) -> str:
    """The ``met`` column: whether a measure reached its goal."""
    return "met" if ok else "missed"


def best_and_median(ratios: list[float], *, higher_is_better: bool = True) -> tuple[float, float]:
    """The best and the median of one ratio over several rounds of the same run."""
    best = max(ratios) if higher_is_better else min(ratios)
    return best, statistics.median(ratios)


def write_section(name: str, heading: str, table: str | Report) -> None:
    """Put ``table`` under ``heading`` in docs/benchmarks.md, replacing this bench's last run;
    a :class:`Report`'s goals are kept beside its table (``bench/_goals.py``: the page's
    summary of the goals is generated from them by ``make docs``)."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    text = table if isinstance(table, str) else "\n".join(
        [table.text, records(table.goals)] if table.goals else [table.text])
    section = f"{heading}\n\n{begin}\n{text}\n{end}\n"
    current = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        head = head.rstrip()
        if head.endswith(heading):
            head = head[: -len(heading)].rstrip()
        tail = rest.split(end, 1)[1].lstrip("\n")
        updated = f"{head}\n\n{section}" + (f"\n{tail}" if tail else "")
    else:
        updated = current.rstrip() + "\n\n" + section
    DOC.write_text(updated)


def until(check: Callable[[], bool], what: str, timeout: float = 60,
          pause: float = 0.002) -> None:
    """Poll ``check`` until it holds; ``TimeoutError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(pause)


def request(pull: int = 1, **extra: Any) -> LockRequest:
    """A lock on one project of ``acme/bench`` for pull ``pull``."""
    return LockRequest(project=Project(repo_full_name="acme/bench", path="envs/prod"),
                       pull=Pull(num=pull), **extra)


async def handoff_latencies(locker: EnhancedLocker, count: int) -> list[float]:
    """``count`` hand-offs on one key: a holder releases while one waiter blocks in acquire;
    each latency is from the release call to the waiter's acquire returning."""
    queued = asyncio.Event()
    locker.events.subscribe(lambda e: queued.set() if e.type == "queued" else None)
    latencies = []
    for i in range(count):
        holder, waiter = request(pull=2 * i + 1), request(pull=2 * i + 2, wait="30s")
        assert (await locker.acquire(holder)).acquired
        queued.clear()
        waiting = asyncio.ensure_future(locker.acquire(waiter))
        await queued.wait()
        released = time.perf_counter()
        await locker.release(holder.key, owner=("acme/bench", 2 * i + 1))
        answer = await waiting
        latencies.append(time.perf_counter() - released)
        assert answer.acquired
        await locker.release(waiter.key, owner=("acme/bench", 2 * i + 2))
    return latencies


async def close_locker(locker: EnhancedLocker) -> None:
    """Close a locker built over a shared store: the locker, its backend, its event bus."""
    await locker.close()
    await locker.backend.close()
    assert isinstance(locker.events, SharedEventBus)
    await locker.events.close()


@contextmanager
def kube_cluster() -> Iterator[Any]:
    """The cluster from ``KUBECONFIG`` if set, else a local control plane started for the run."""
    from tests.support.controlplane import (
        ALL_BINARIES,
        CONTROL_PLANE_BINARIES,
        ControlPlane,
        KubeCluster,
        find_binaries,
    )

    if os.environ.get("KUBECONFIG"):
        yield KubeCluster(Path(os.environ["KUBECONFIG"].split(os.pathsep)[0]),
                          find_binaries(("kubectl",)), "kubeconfig")
        return
    find_binaries(CONTROL_PLANE_BINARIES)
    plane = ControlPlane(binaries=find_binaries(ALL_BINARIES))
    with plane:
        yield plane.cluster()
    plane.remove_workdir()


def apply_lock_crs(kube: Any, namespace: str, policy_spec: dict[str, Any]) -> None:
    """The CRDs (if missing, then established), a namespace, a LockPolicy and a 0% migration."""
    if kube.kubectl("get", "crd", f"lockpolicies.{GROUP}", check=False).returncode != 0:
        kube.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    until(lambda: all(
        any(c["type"] == "Established" and c["status"] == "True" for c in
            (json.loads(kube.kubectl("get", "crd", f"{plural}.{GROUP}", "-o", "json").stdout)
             .get("status") or {}).get("conditions") or [])
        for plural in ("lockpolicies", "lockmigrations")), "the CRDs", pause=0.1)
    kube.kubectl("create", "namespace", namespace, check=False)
    objects = [
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LockPolicy",
         "metadata": {"name": "default", "namespace": namespace}, "spec": policy_spec},
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LockMigration",
         "metadata": {"name": "to-enhanced", "namespace": namespace},
         "spec": {"policyRef": {"name": "default"}, "weight": 0}},
    ]
    for body in objects:
        kube.kubectl("apply", "-f", "-", input=json.dumps(body))
