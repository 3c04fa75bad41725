"""A real Kubernetes control plane for tests, run as local processes.

The idea is the one of controller-runtime's envtest: instead of a mock, the
tests talk to a real ``kube-apiserver`` backed by a real ``etcd``, plus a real
``kube-controller-manager`` so that namespaces are finalized, default
ServiceAccounts appear and tokens can be minted. There are no nodes and no
kubelet: nothing runs Pods, but every API behaviour (validation, RBAC,
finalizers, watches, garbage collection) is the real one.

The binaries are built from the Go module proxy by ``hack/build-control-plane.sh``
and cached outside the repository; this module computes the same cache
directory from ``hack/versions.env``. Everything listens on free ports of
127.0.0.1 only. Certificates (a CA, the API server's serving certificate, client
certificates) and the service-account signing key are generated afresh into a
work directory, which also keeps the logs of every process.

Manual use, from the repository root::

    python -m tests.support.controlplane up
"""

from __future__ import annotations

import argparse
import atexit
import base64
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tests.support.background_builds import BackgroundBuildFailed, await_build
from tests.support.child import dying_with_parent

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "hack" / "versions.env"
BUILD_SCRIPT = "hack/build-control-plane.sh"
CONTROL_PLANE_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")
ALL_BINARIES = (*CONTROL_PLANE_BINARIES, "helm")
LOOPBACK = "127.0.0.1"
# Only configuration: the range ClusterIPs are allocated from. Nothing is
# routed there and nothing here connects to it.
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"


class ControlPlaneError(RuntimeError):
    """The control plane could not be found, started or reached."""


class BinariesMissing(ControlPlaneError):
    """The control-plane binaries have not been built on this machine."""


# --------------------------------------------------------------------------
# Versions and binaries


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """Parses ``hack/versions.env``: ``KEY=VALUE`` lines, ``#`` comments."""
    versions: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            versions[key.strip()] = value.strip()
    return versions


def kubernetes_version() -> str:
    """The Kubernetes version the API server reports, e.g. ``v1.37.2``."""
    return "v" + read_versions()["K8S_VERSION"].removeprefix("v")


def cache_root(env: Mapping[str, str] = os.environ) -> Path:
    """The cache root, computed exactly as ``hack/build-control-plane.sh`` does."""
    if env.get("ENHANCED_LOCKING_CACHE_DIR"):
        return Path(env["ENHANCED_LOCKING_CACHE_DIR"])
    xdg = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME", str(Path.home()))) / ".cache")
    return Path(xdg) / "enhanced-locking"


def bin_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where the binaries are: ``ENHANCED_LOCKING_K8S_BIN`` or the versioned cache."""
    if env.get("ENHANCED_LOCKING_K8S_BIN"):
        return Path(env["ENHANCED_LOCKING_K8S_BIN"])
    v = read_versions()
    key = f"k8s-{v['K8S_VERSION']}-etcd-{v['ETCD_VERSION']}-helm-{v['HELM_VERSION']}"
    return cache_root(env) / key / "bin"


def etcd_bin_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where etcd is: with the other binaries if they hold it, else etcd's own cache (which
    ``make etcd`` fills before the rest is built), as ``hack/build-control-plane.sh`` says."""
    directory = bin_dir(env)
    if env.get("ENHANCED_LOCKING_K8S_BIN") or os.access(directory / "etcd", os.X_OK):
        return directory
    return cache_root(env) / f"etcd-{read_versions()['ETCD_VERSION']}" / "bin"


def _missing(directory: Path, required: Iterable[str]) -> list[str]:
    return [name for name in required if not os.access(directory / name, os.X_OK)]


def find_binaries(required: Iterable[str] = CONTROL_PLANE_BINARIES) -> Path:
    """Returns the binary directory, or raises :class:`BinariesMissing` saying how to build.

    While ``make test`` builds the control plane in the background, this waits for that build.
    """
    required = tuple(required)
    directory = bin_dir()
    if _missing(directory, required) and not os.environ.get("ENHANCED_LOCKING_K8S_BIN"):
        try:
            await_build("control-plane")
        except BackgroundBuildFailed as error:
            raise BinariesMissing(str(error)) from None
    missing = _missing(directory, required)
    if missing:
        raise BinariesMissing(
            f"Kubernetes control-plane binaries missing from {directory}: {', '.join(missing)}. "
            f"Build them once per machine with `make control-plane` (or `{BUILD_SCRIPT}`; "
            "the first build compiles from the Go module proxy and takes many minutes), "
            "or point ENHANCED_LOCKING_K8S_BIN at a directory that holds them."
        )
    return directory


def find_etcd() -> Path:
    """The etcd binary, or raises :class:`BinariesMissing` saying how to build it."""
    directory = etcd_bin_dir()
    if not os.access(directory / "etcd", os.X_OK):
        raise BinariesMissing(
            f"etcd missing from {directory}. Build it once per machine with `make etcd` "
            f"(`{BUILD_SCRIPT} --etcd`; `make control-plane` builds it too), or point "
            "ENHANCED_LOCKING_K8S_BIN at a directory that holds it."
        )
    return directory / "etcd"


# --------------------------------------------------------------------------
# Using a cluster: kubectl with a kubeconfig


class KubectlError(subprocess.CalledProcessError):
    """A kubectl command failed; the message carries its output."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"


@dataclass
class KubeCluster:
    """A cluster reachable through a kubeconfig, driven with the built kubectl."""

    kubeconfig: Path
    bin_dir: Path
    mode: str = "local"
    workdir: Path | None = None

    def env(self) -> dict[str, str]:
        """The environment for a client of this cluster: KUBECONFIG and the binaries on PATH."""
        path = f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": path}

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``kubectl ARGS`` against this cluster and returns its text output."""
        cmd = [str(self.bin_dir / "kubectl"), *args]
        result = subprocess.run(
            cmd, input=input, capture_output=True, text=True, env=self.env(), timeout=timeout
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, cmd, result.stdout, result.stderr)
        return result


# --------------------------------------------------------------------------
# Certificates


@dataclass
class KeyPair:
    """A PEM certificate and key written to files."""

    cert: Path
    key: Path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


class CertificateAuthority:
    """A throw-away CA that signs the serving and client certificates of one control plane."""

    def __init__(self, directory: Path, days: int = 30) -> None:
        self.directory = directory
        self.days = days
        self._key = _new_key()
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name("enhanced-locking-test-ca"))
            .issuer_name(_name("enhanced-locking-test-ca"))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.pair = self._write("ca", self._cert, self._key)

    def _write(self, stem: str, cert: x509.Certificate, key: PrivateKey) -> KeyPair:
        pair = KeyPair(self.directory / f"{stem}.crt", self.directory / f"{stem}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key.write_bytes(_key_pem(key))
        pair.key.chmod(0o600)
        return pair

    def issue(
        self,
        stem: str,
        common_name: str,
        *,
        organization: str | None = None,
        server: bool = False,
        dns_names: Sequence[str] = (),
        ips: Sequence[str] = (),
        rsa_key: bool = False,
    ) -> KeyPair:
        """Signs a new leaf certificate: a server one (with SANs) or a client one; its key is
        an EC P-256 one, or a 2048-bit RSA one with ``rsa_key``."""
        key: PrivateKey = (rsa.generate_private_key(public_exponent=65537, key_size=2048)
                           if rsa_key else _new_key())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, organization))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=self.days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return self._write(stem, builder.sign(self._key, hashes.SHA256()), key)


def write_service_account_keys(directory: Path) -> KeyPair:
    """The key pair the API server signs ServiceAccount tokens with (``cert`` is the public key)."""
    key = _new_key()
    pair = KeyPair(directory / "sa.pub", directory / "sa.key")
    pair.key.write_bytes(_key_pem(key))
    pair.key.chmod(0o600)
    pair.cert.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pair


def write_kubeconfig(path: Path, server: str, ca: Path, client: KeyPair, user: str) -> Path:
    """Writes a self-contained kubeconfig (JSON is valid YAML) with embedded certificates."""

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "enhanced-locking",
                "cluster": {"server": server, "certificate-authority-data": b64(ca)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": b64(client.cert),
                    "client-key-data": b64(client.key),
                },
            }
        ],
        "contexts": [
            {"name": "enhanced-locking", "context": {"cluster": "enhanced-locking", "user": user}}
        ],
        "current-context": "enhanced-locking",
        "preferences": {},
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------
# Processes


def free_ports(count: int) -> list[int]:
    """Picks ``count`` distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Process:
    """One server process in its own process group, its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    _log_file: IO[bytes] = field(repr=False)

    @classmethod
    def start(cls, name: str, argv: Sequence[str], log: Path) -> Process:
        log_file = open(log, "ab")
        popen = subprocess.Popen(
            dying_with_parent(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return cls(name, popen, log, log_file)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 10) -> None:
        """SIGTERM to the process group, then SIGKILL after ``grace`` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
            if self.popen.poll() is not None:
                break
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        self._log_file.close()

    def tail(self, lines: int = 30) -> str:
        """The end of the log, for error messages."""
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


# --------------------------------------------------------------------------
# The control plane


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on free loopback ports.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. The work
    directory (certificates, kubeconfig, etcd data, ``*.log``) is kept after
    :meth:`stop`; :meth:`remove_workdir` deletes it.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        binaries: Path | None = None,
        start_timeout: float = 90,
    ) -> None:
        self.bin_dir = binaries or find_binaries(CONTROL_PLANE_BINARIES)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="enhanced-locking-k8s-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.processes: list[Process] = []
        self.etcd_port, self.etcd_peer_port, self.apiserver_port, self.kcm_port = free_ports(4)
        self.server = f"https://{LOOPBACK}:{self.apiserver_port}"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.startup_seconds: float | None = None
        # Seconds from start() until each server was ready, in start order.
        self.phase_seconds: dict[str, float] = {}
        self._admin_tls: ssl.SSLContext | None = None

    # -- files

    def _write_credentials(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        self.ca = CertificateAuthority(pki)
        self.serving = self.ca.issue(
            "apiserver",
            "kube-apiserver",
            server=True,
            dns_names=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"],
            ips=[LOOPBACK],
        )
        self.admin = self.ca.issue("admin", "enhanced-locking-admin", organization="system:masters")
        self.kcm_client = self.ca.issue("controller-manager", "system:kube-controller-manager")
        self.service_account = write_service_account_keys(pki)
        write_kubeconfig(self.kubeconfig, self.server, self.ca.pair.cert, self.admin, "admin")
        self.kcm_kubeconfig = write_kubeconfig(
            self.workdir / "controller-manager.kubeconfig",
            self.server,
            self.ca.pair.cert,
            self.kcm_client,
            "system:kube-controller-manager",
        )

    # -- command lines

    def etcd_args(self) -> list[str]:
        client = f"http://{LOOPBACK}:{self.etcd_port}"
        peer = f"http://{LOOPBACK}:{self.etcd_peer_port}"
        return [
            str(self.bin_dir / "etcd"),
            "--name=default",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]

    def apiserver_args(self) -> list[str]:
        return [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://{LOOPBACK}:{self.etcd_port}",
            f"--bind-address={LOOPBACK}",
            f"--advertise-address={LOOPBACK}",
            # The endpoint reconciler refuses a loopback address; nothing needs
            # the endpoints of the "kubernetes" Service without Pods.
            "--endpoint-reconciler-type=none",
            f"--secure-port={self.apiserver_port}",
            f"--cert-dir={self.workdir / 'apiserver'}",
            f"--tls-cert-file={self.serving.cert}",
            f"--tls-private-key-file={self.serving.key}",
            f"--client-ca-file={self.ca.pair.cert}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            f"--service-account-issuer={self.server}",
            f"--service-account-key-file={self.service_account.cert}",
            f"--service-account-signing-key-file={self.service_account.key}",
            "--authorization-mode=RBAC",
            "--allow-privileged=true",
            "--profiling=false",
        ]

    def controller_manager_args(self) -> list[str]:
        return [
            str(self.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={self.kcm_kubeconfig}",
            f"--authentication-kubeconfig={self.kcm_kubeconfig}",
            f"--authorization-kubeconfig={self.kcm_kubeconfig}",
            f"--bind-address={LOOPBACK}",
            f"--secure-port={self.kcm_port}",
            f"--cert-dir={self.workdir / 'controller-manager'}",
            f"--service-account-private-key-file={self.service_account.key}",
            f"--root-ca-file={self.ca.pair.cert}",
            f"--cluster-signing-cert-file={self.ca.pair.cert}",
            f"--cluster-signing-key-file={self.ca.pair.key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--use-service-account-credentials=true",
            "--leader-elect=false",
            "--profiling=false",
        ]

    # -- lifecycle

    def start(self) -> ControlPlane:
        """Starts the three servers and returns once the API is ready and controllers run."""
        began = time.monotonic()
        deadline = began + self.start_timeout
        atexit.register(self.stop)
        try:
            self._write_credentials()
            self._launch("etcd", self.etcd_args())
            self._wait(deadline, "etcd", self._etcd_healthy)
            self.phase_seconds["etcd"] = time.monotonic() - began
            self._launch("kube-apiserver", self.apiserver_args())
            self._wait(
                deadline, "kube-apiserver /readyz", lambda: self._api_status("/readyz") == 200
            )
            self.phase_seconds["kube-apiserver"] = time.monotonic() - began
            self._launch("kube-controller-manager", self.controller_manager_args())
            self._wait(
                deadline,
                "the default ServiceAccount (kube-controller-manager)",
                lambda: (
                    self._api_status("/api/v1/namespaces/default/serviceaccounts/default") == 200
                ),
            )
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        self.phase_seconds["kube-controller-manager"] = self.startup_seconds
        return self

    def stop(self) -> None:
        """Stops the servers, newest first (SIGTERM, then SIGKILL); the work directory stays."""
        atexit.unregister(self.stop)
        while self.processes:
            self.processes.pop().stop()

    def startup_summary(self) -> str:
        """One line on how long the start took, server by server."""
        phases = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.phase_seconds.items())
        return f"Kubernetes control plane ready in {self.startup_seconds or 0:.1f}s ({phases})"

    def remove_workdir(self) -> None:
        """Deletes the work directory (certificates, data, logs)."""
        shutil.rmtree(self.workdir, ignore_errors=True)

    def cluster(self) -> KubeCluster:
        """This control plane as a :class:`KubeCluster` (admin kubeconfig, built kubectl)."""
        return KubeCluster(self.kubeconfig, self.bin_dir, "local", self.workdir)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers

    def _launch(self, name: str, argv: list[str]) -> None:
        self.processes.append(Process.start(name, argv, self.workdir / f"{name}.log"))

    def _wait(self, deadline: float, what: str, ready: Callable[[], bool]) -> None:
        """Polls ``ready`` until it is true; fails early if a server exited."""
        while True:
            for process in self.processes:
                if not process.alive():
                    raise ControlPlaneError(
                        f"{process.name} exited with {process.popen.returncode} while waiting for "
                        f"{what}; log {process.log}:\n{process.tail()}"
                    )
            if ready():
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name} ({p.log}):\n{p.tail(15)}" for p in self.processes)
                raise ControlPlaneError(
                    f"timed out after {self.start_timeout}s waiting for {what}\n{logs}"
                )
            time.sleep(0.1)

    def _etcd_healthy(self) -> bool:
        url = f"http://{LOOPBACK}:{self.etcd_port}/health"
        return _http_status(url, None) == 200

    def _api_status(self, path: str) -> int | None:
        """GET on the API server as the admin user; the HTTP status, or None if unreachable."""
        if self._admin_tls is None:
            self._admin_tls = ssl.create_default_context(cafile=str(self.ca.pair.cert))
            self._admin_tls.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        return _http_status(self.server + path, self._admin_tls)


def _http_status(url: str, context: ssl.SSLContext | None) -> int | None:
    """The status of a GET on a loopback URL, never through a proxy."""
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return None


# --------------------------------------------------------------------------
# Manual use


def _up(args: argparse.Namespace) -> int:
    """Starts a control plane, prints how to use it, and runs until Ctrl-C (or SIGTERM)."""
    try:
        control_plane = ControlPlane(workdir=args.workdir)
        print(f"starting the control plane in {control_plane.workdir} ...", file=sys.stderr)
        control_plane.start()
    except ControlPlaneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        print(
            f"{control_plane.startup_summary()}; logs in {control_plane.workdir}\n"
            "Ctrl-C stops it. In another shell:",
            file=sys.stderr,
        )
        print(f"export KUBECONFIG={control_plane.kubeconfig}")
        print(f"export PATH={control_plane.bin_dir}:$PATH", flush=True)
        while not stopping.wait(1):
            dead = [p.name for p in control_plane.processes if not p.alive()]
            if dead:
                print(
                    f"error: {', '.join(dead)} exited; see {control_plane.workdir}", file=sys.stderr
                )
                return 1
        print("stopping ...", file=sys.stderr)
        return 0
    finally:
        control_plane.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.controlplane", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start a control plane and wait until Ctrl-C")
    up.add_argument(
        "--workdir",
        type=Path,
        help="where to keep certificates, data and logs (default: a new temp dir)",
    )
    commands.add_parser("bin-dir", help="print the directory the binaries are taken from")
    args = parser.parse_args(argv)
    if args.command == "bin-dir":
        print(bin_dir())
        return 0
    return _up(args)


if __name__ == "__main__":
    sys.exit(main())
