"""Fixtures for the end-to-end tests: one Kubernetes cluster per test session.

Which cluster is chosen by ``E2E_CLUSTER``:

* ``local`` (default): a real control plane (etcd, kube-apiserver,
  kube-controller-manager) started on loopback ports from the binaries built by
  ``hack/build-control-plane.sh``; see ``tests/support/controlplane.py``.
* ``kubeconfig``: the cluster the current ``KUBECONFIG`` points at; nothing is
  started.
* ``kind``: the same as ``kubeconfig``; the kind harness sets ``KUBECONFIG``.

In every mode ``kubectl`` is the one built at the version of ``hack/versions.env``.
A missing binary fails the session with a message saying how to build it: the
tests never pass by skipping their real parts.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

_REPO_ROOT = Path(__file__).resolve().parents[2]
if str(_REPO_ROOT) not in sys.path:  # `tests.support` without an installed package
    sys.path.insert(0, str(_REPO_ROOT))

from tests.support.background_builds import (  # noqa: E402
    BackgroundBuild,
    BackgroundBuildFailed,
    await_build,
)
from tests.support.controlplane import (  # noqa: E402
    ALL_BINARIES,
    BinariesMissing,
    ControlPlane,
    ControlPlaneError,
    KubeCluster,
    find_binaries,
)
from tests.support.operator import OperatorProcess  # noqa: E402
from tests.support.service import services  # noqa: E402

CLUSTER_MODES = ("local", "kubeconfig", "kind")


def _report(config: pytest.Config, message: str) -> None:
    """Writes a line to the terminal, past pytest's output capture."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(message, file=sys.stderr)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(message)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Waits here, before any test's time limit runs, for the control-plane build that
    ``make test`` runs in the background while the earlier tiers run (if it still does).

    A failed build is reported by ``kube_cluster``, which fails each test that needs it.
    """
    here = Path(__file__).parent
    local = os.environ.get("E2E_CLUSTER", "local") == "local"
    if not local or not any(here in Path(item.path).parents for item in session.items):
        return

    def waiting(build: BackgroundBuild) -> None:
        _report(session.config, f"\nwaiting for the control-plane build (log: {build.log})")

    began = time.monotonic()
    with contextlib.suppress(BackgroundBuildFailed):
        await_build("control-plane", waiting=waiting)
    if time.monotonic() - began > 1:
        _report(session.config, f"waited {time.monotonic() - began:.0f}s for the control plane")


def _binaries(names: Sequence[str]) -> Path:
    """The directory of the built binaries; fails the session, saying how to build them."""
    try:
        return find_binaries(names)
    except BinariesMissing as error:
        message = str(error)
    pytest.fail(message, pytrace=False)


def _existing_cluster(mode: str) -> KubeCluster:
    """A cluster from ``KUBECONFIG`` (its first file), driven with the built kubectl."""
    kubeconfig = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    if not kubeconfig or not Path(kubeconfig).is_file():
        pytest.fail(
            f"E2E_CLUSTER={mode} needs KUBECONFIG to name a kubeconfig file (got {kubeconfig!r})"
        )
    return KubeCluster(Path(kubeconfig), _binaries(("kubectl",)), mode)


@pytest.fixture(scope="session")
def kube_cluster(request: pytest.FixtureRequest) -> Iterator[KubeCluster]:
    """The session's Kubernetes cluster: ``.kubeconfig`` and ``.kubectl(*args)``."""
    mode = os.environ.get("E2E_CLUSTER", "local")
    if mode not in CLUSTER_MODES:
        pytest.fail(
            f"E2E_CLUSTER={mode!r}: expected one of {', '.join(CLUSTER_MODES)}", pytrace=False
        )
    if mode != "local":
        yield _existing_cluster(mode)
        return
    control_plane = ControlPlane(binaries=_binaries(ALL_BINARIES))
    failure = None
    try:
        control_plane.start()
    except ControlPlaneError as error:
        failure = f"{error}\n(logs kept in {control_plane.workdir})"
    if failure:
        pytest.fail(failure, pytrace=False)
    _report(request.config, f"\n{control_plane.startup_summary()}")
    try:
        yield control_plane.cluster()
    finally:
        began = time.monotonic()
        control_plane.stop()
        _report(
            request.config, f"\nKubernetes control plane stopped in {time.monotonic() - began:.1f}s"
        )
        if request.session.testsfailed:
            _report(
                request.config, f"\nKubernetes control plane logs kept in {control_plane.workdir}"
            )
        else:
            control_plane.remove_workdir()


@pytest.fixture
def kube_namespace(kube_cluster: KubeCluster) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    name = f"e2e-{uuid.uuid4().hex[:10]}"
    kube_cluster.kubectl("create", "namespace", name)
    yield name
    kube_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


# --- the CRDs and the operator ---------------------------------------------------------------

LOCK_CRDS = ("lockpolicies.locking.runatlantis.io", "lockmigrations.locking.runatlantis.io")


@pytest.fixture(scope="session")
def lock_crds(kube_cluster: KubeCluster) -> None:
    """The LockPolicy and LockMigration CRDs are served (applied from crds/ when absent)."""
    missing = [
        name for name in LOCK_CRDS
        if kube_cluster.kubectl("get", "crd", name, check=False).returncode != 0
    ]
    if missing:
        kube_cluster.kubectl("apply", "--server-side", "-f", str(_REPO_ROOT / "crds"))
    # Polled rather than `kubectl wait`, which fails on a CRD that has no conditions yet.
    for name in LOCK_CRDS:
        deadline = time.monotonic() + 60
        while not _established(kube_cluster, name):
            if time.monotonic() > deadline:
                pytest.fail(f"CRD {name} not Established within 60s", pytrace=False)
            time.sleep(0.1)


def _established(cluster: KubeCluster, name: str) -> bool:
    crd = json.loads(cluster.kubectl("get", "crd", name, "-o", "json").stdout)
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


@pytest.fixture
def start_operator(
    kube_cluster: KubeCluster, kube_namespace: str, lock_crds: None, tmp_path: Path
) -> Iterator[Callable[..., OperatorProcess]]:
    """``start_operator(**options)``: ``enhanced-locking operator`` on the test's namespace.

    A real process with the cluster's kubeconfig, its own data dir and free loopback ports;
    stopped before the namespace is deleted. Several replicas: ``start_operator(data="b")``
    gives the next one a data dir of its own.
    """
    with services() as group:
        def start(*, data: str = "data", **options: Any) -> OperatorProcess:
            options.setdefault("namespace", kube_namespace)
            return group.start(OperatorProcess(tmp_path / data,
                                               kubeconfig=kube_cluster.kubeconfig,
                                               log_dir=tmp_path / "logs", **options),
                               deadline=60)

        yield start
