"""Helm, ServiceAccount credentials and the operator process, for the chart's e2e tests.

* :class:`Helm` runs the built ``helm`` against a :class:`~tests.support.controlplane.KubeCluster`
  with its own config/cache/data directories (a developer's Helm repositories and plugins never
  change what a test sees).
* :func:`service_account_kubeconfig` writes a kubeconfig that authenticates with a token minted
  by ``kubectl create token``: a process using it has exactly the RBAC of that ServiceAccount,
  as the chart's pod would.
* :class:`OperatorProcess` runs ``enhanced-locking operator`` as a local process with such a
  kubeconfig, on free loopback ports, inside :func:`image_sandbox`: the runtime of the image
  without Docker (bubblewrap): user 65532 without capabilities, the root filesystem read-only,
  only ``/data`` and a fresh ``/tmp`` writable, and the environment of the Dockerfile.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tests.support.controlplane import KubeCluster, KubectlError, free_ports

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "enhanced-locking"
DOCKERFILE = REPO_ROOT / "Dockerfile"
SANDBOX_MISSING = (
    "bubblewrap (bwrap) is not installed: install Debian's bubblewrap package "
    "(hack/ensure-bubblewrap.sh, run by `make test`)"
)
CR_API_VERSIONS = (
    "locking.runatlantis.io/v1alpha1/LockPolicy",
    "locking.runatlantis.io/v1alpha1/LockMigration",
)


@dataclass
class Helm:
    """``helm`` against one cluster, with private Helm home directories."""

    cluster: KubeCluster
    home: Path

    def env(self) -> dict[str, str]:
        env = self.cluster.env()
        for name in ("CACHE", "CONFIG", "DATA"):
            directory = self.home / name.lower()
            directory.mkdir(parents=True, exist_ok=True)
            env[f"HELM_{name}_HOME"] = str(directory)
        return env

    def run(
        self, *args: str, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.cluster.bin_dir / "helm"), *args]
        result = subprocess.run(
            cmd, capture_output=True, text=True, env=self.env(), timeout=timeout
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, cmd, result.stdout, result.stderr)
        return result

    def template(self, *args: str, api_versions: Sequence[str] = CR_API_VERSIONS) -> list[Any]:
        """``helm template`` of the chart; the rendered objects (with ``# Source`` kept aside)."""
        flags = [f"--api-versions={v}" for v in api_versions]
        out = self.run("template", "t", str(CHART_DIR), "-n", "atlantis", *flags, *args).stdout
        return rendered_objects(out)

    def notes(self, namespace: str, *args: str) -> str:
        """The notes ``helm install`` prints for the chart with ``args`` (a client-side dry run:
        nothing is installed; names of its own, so that Helm finds none of its objects taken,
        and no CRDs or CRs, whose kinds the cluster may not serve)."""
        printed = self.run("install", "notes", str(CHART_DIR), "-n", namespace, "--dry-run=client",
                           "--set=fullnameOverride=notes-el", "--set=crds.install=false",
                           "--set=lockPolicy.create=false,lockMigration.create=false",
                           *args).stdout
        assert "NOTES:" in printed, printed
        return printed.split("NOTES:", 1)[1]

    def values(self, release: str, namespace: str) -> dict[str, Any]:
        out = self.run("get", "values", release, "-n", namespace, "-o", "json").stdout
        data: dict[str, Any] = json.loads(out) or {}
        return data


def notes_commands(notes: str) -> list[str]:
    """The commands the install notes give for calling the lock API from the operator's
    machine, all but the port-forward (which needs a kubelet)."""
    return [line.strip() for line in notes.splitlines()
            if line.strip().startswith(("kubectl create serviceaccount ",
                                        "kubectl create rolebinding ",
                                        "export ENHANCED_LOCKING_TOKEN=", "curl "))]


def rendered_objects(manifest: str) -> list[dict[str, Any]]:
    """The objects of a rendered manifest, each with its template path under ``_source``."""
    objects = []
    for document in manifest.split("\n---"):
        source = next(
            (line.split(":", 1)[1].strip() for line in document.splitlines()
             if line.startswith("# Source:")),
            None,
        )
        body = yaml.safe_load(document)
        if body:
            body["_source"] = source
            objects.append(body)
    return objects


def enhanced_locking_command() -> list[str]:
    """The ``enhanced-locking`` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "enhanced-locking"
    if not script.exists():
        raise RuntimeError(
            f"{script} is missing: install the project in this environment (make venv)"
        )
    return [str(script)]


def image_runtime() -> tuple[str, dict[str, str]]:
    """The ``uid:gid`` and the ``ENV`` of the Dockerfile's runtime stage."""
    text = DOCKERFILE.read_text()
    runtime = text[text.rindex("\nFROM "):]
    user = re.findall(r"^USER\s+(\S+)", runtime, re.MULTILINE)[-1]
    env = dict(re.findall(r"^\s*(?:ENV\s+)?([A-Z_]+)=(\S+?)\s*\\?$", runtime, re.MULTILINE))
    return user, env


def image_sandbox(argv: Sequence[str], *, data_dir: Path, files: Mapping[str, Path],
                  env: Mapping[str, str]) -> list[str]:
    """``argv`` run as the image would run it, with bubblewrap instead of a container engine.

    The sandbox's root is this machine's, bound read-only (so the venv and Python are there);
    ``/data`` is ``data_dir``, ``/tmp`` an empty tmpfs; ``files`` are bound read-only at the
    given paths; the user is the Dockerfile's (in a user namespace, so without capabilities);
    the environment is the Dockerfile's ``ENV`` plus ``env``. The network is the host's, so the
    process listens on this machine's loopback.
    """
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise RuntimeError(SANDBOX_MISSING)
    user, image_env = image_runtime()
    uid, _, gid = user.partition(":")
    args = [bwrap, "--tmpfs", "/"]
    for entry in sorted(Path("/").iterdir()):
        if entry.name in ("proc", "dev", "sys", "tmp", "data"):
            continue
        if entry.is_symlink():
            args += ["--symlink", os.readlink(entry), str(entry)]
        elif entry.is_dir():
            args += ["--ro-bind", str(entry), str(entry)]
    args += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    checkout = Path(__file__).resolve().parents[2]
    if checkout.is_relative_to("/tmp"):
        # A checkout under /tmp (CI may clone there) would be hidden by the tmpfs, and with it
        # the venv the operator runs from: bind it back read-only at the same path.
        args += ["--ro-bind", str(checkout), str(checkout)]
    args += ["--bind", str(data_dir), "/data"]
    for destination, source in files.items():
        args += ["--ro-bind", str(source), destination]
    args += ["--remount-ro", "/", "--unshare-user", "--uid", uid, "--gid", gid or uid,
             "--die-with-parent", "--clearenv"]
    path = f"{Path(argv[0]).parent}:/usr/local/bin:/usr/bin:/bin"
    for name, value in {**image_env, "PATH": path, **env}.items():
        args += ["--setenv", name, value]
    return [*args, "--chdir", "/data", "--", *argv]


def service_account_kubeconfig(
    cluster: KubeCluster, namespace: str, service_account: str, path: Path,
    *, duration: str = "1h",
) -> Path:
    """A kubeconfig that authenticates as ``namespace/service_account`` with a fresh token."""
    token = cluster.kubectl(
        "create", "token", service_account, "-n", namespace, f"--duration={duration}"
    ).stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    current = admin.get("current-context")
    context = next(
        (c["context"] for c in admin["contexts"] if c["name"] == current),
        admin["contexts"][0]["context"],
    )
    cluster_entry = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": cluster_entry["cluster"]}],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [
            {
                "name": "sa",
                "context": {"cluster": "cluster", "user": service_account, "namespace": namespace},
            }
        ],
        "current-context": "sa",
    }
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


@dataclass
class OperatorProcess:
    """``enhanced-locking operator`` as a local process with a given kubeconfig."""

    kubeconfig: Path
    namespace: str
    workdir: Path
    policy: str = "default"
    migration: str = "to-enhanced"
    extra_env: Mapping[str, str] = field(default_factory=dict)
    extra_args: Sequence[str] = ()
    """More arguments, as the chart's Deployment gives them (e.g. ``--leader-election``)."""
    extra_files: Mapping[str, Path] = field(default_factory=dict)
    """More files bound read-only into the sandbox (e.g. the rendered config file)."""
    port: int = 0
    liveness_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if not (self.port and self.liveness_port):
            self.port, self.liveness_port = free_ports(2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / "operator.log"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def argv(self) -> list[str]:
        """The command line the chart's Deployment gives, on loopback ports (no --data-dir:
        the image's ATLANTIS_DATA_DIR applies)."""
        command = [
            *enhanced_locking_command(),
            "operator",
            f"--namespace={self.namespace}",
            f"--policy={self.policy}",
            f"--migration={self.migration}",
            "--host=127.0.0.1",
            f"--port={self.port}",
            f"--liveness=http://127.0.0.1:{self.liveness_port}/healthz",
            # Only kopf's watch can bring a change within a test: the periodic re-read would
            # hide a missing watch permission.
            "--resync-interval=3600",
            *self.extra_args,
        ]
        return image_sandbox(
            command,
            data_dir=self.data_dir,
            files={"/config/kubeconfig": self.kubeconfig, **self.extra_files},
            env={"KUBECONFIG": "/config/kubeconfig", **self.extra_env},
        )

    def start(self, *, deadline: float = 60) -> OperatorProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = self.argv()
        with self.log.open("ab") as log:
            # The sandbox clears the environment: no in-cluster credentials, no settings.
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        end = time.monotonic() + deadline
        while self.status("/healthz") != 200:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the operator exited with {self.process.returncode}:\n{self.output()}"
                )
            if time.monotonic() > end:
                raise RuntimeError(f"the operator did not answer /healthz:\n{self.output()}")
            time.sleep(0.2)
        return self

    def stop(self, *, grace: float = 20) -> int | None:
        """SIGTERM to the sandbox's process group (bwrap and the operator), then SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(5)

    def output(self, limit: int = 12_000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-limit:]

    def status(self, path: str, *, port: int | None = None) -> int | None:
        url = f"http://127.0.0.1:{port or self.port}{path}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=3) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return error.code
        except (urllib.error.URLError, OSError):
            return None

    def get_json(self, path: str) -> Any:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self.url + path, timeout=5) as response:
            return json.loads(response.read())

    def post_json(self, path: str, body: Any) -> tuple[int, Any]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST",
            headers={"content-type": "application/json"},
        )
        try:
            with opener.open(request, timeout=10) as response:
                return int(response.status), json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())
