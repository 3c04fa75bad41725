"""A real ``redis-server`` for tests, run as a local process on a free loopback port.

Each :class:`RedisServer` lives in its own temporary directory (data files, log, certificates)
and listens on ``127.0.0.1`` only. It can be stopped, killed, restarted on the same port (so
clients reconnect to the same address) with or without persistence, switched to
``requirepass``, given an ACL user, or started with TLS (Debian's build supports it; the
certificates are generated afresh with ``cryptography``).

Persistence variants:

* ``none``: ``--save "" --appendonly no``: a restart starts empty.
* ``aof``: ``--appendonly yes --appendfsync always``: a restart keeps every acknowledged write.

Manual use, from the repository root::

    python -m tests.support.redis_server
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import redis
from tests.support.controlplane import CertificateAuthority, KeyPair

__all__ = [
    "MISSING_MESSAGE",
    "RedisSentinel",
    "RedisServer",
    "RedisServerError",
    "TlsFiles",
    "find_redis_server",
]

LOOPBACK = "127.0.0.1"
MISSING_MESSAGE = "redis-server is not installed: install Debian's redis-server (make redis)"

Persistence = Literal["none", "aof"]


class RedisServerError(RuntimeError):
    """redis-server could not be found, started or reached."""


def find_redis_server() -> str:
    """The ``redis-server`` binary, or :class:`RedisServerError` saying how to install it."""
    path = shutil.which("redis-server")
    if path is None:
        raise RedisServerError(MISSING_MESSAGE)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """The CA, the server pair and a client pair of one TLS-enabled server."""

    ca: Path
    server: KeyPair
    client: KeyPair


class RedisServer:
    """One redis-server process; ``start`` / ``stop`` / ``kill`` / ``restart`` keep the port."""

    def __init__(
        self,
        directory: Path | None = None,
        *,
        persistence: Persistence = "none",
        tls: bool = False,
        replica_of: RedisServer | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.binary = find_redis_server()
        self._owns_dir = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.persistence: Persistence = persistence
        self.port = free_port()
        self.password: str | None = None
        self.extra_args = list(extra_args)
        self.replica_of = replica_of
        self.process: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0
        self.on_start: list[Callable[[], None]] = []
        """Run each time the server has started and answers (a watch of it watches again)."""
        """Wall-clock time (``time.time()``, the clock Redis's ``TIME`` reads) just before the
        running process was spawned: nothing it did can be earlier. ``start`` returns later,
        once a ping is answered, so a time taken after it may follow the server's first
        replies by as much as a busy machine delays the caller."""
        self.tls: TlsFiles | None = self._make_certs() if tls else None

    # --- addresses and clients -----------------------------------------------------------
    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def addr(self) -> str:
        """``host:port``, as ``enhanced-locking-redis-addr`` takes it."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.directory / "redis.log"

    def client(self, *, username: str | None = None, password: str | None = None) -> redis.Redis:
        """A synchronous admin client (for assertions and set-up), authenticated if needed."""
        kwargs: dict[str, object] = {}
        if self.tls is not None:
            kwargs.update(
                ssl=True,
                ssl_ca_certs=str(self.tls.ca),
                ssl_certfile=str(self.tls.client.cert),
                ssl_keyfile=str(self.tls.client.key),
            )
        return redis.Redis(
            host=LOOPBACK,
            port=self.port,
            username=username,
            password=password if password is not None else self.password,
            socket_timeout=10,
            **kwargs,  # type: ignore[arg-type]
        )

    # --- lifecycle -----------------------------------------------------------------------
    def _args(self) -> list[str]:
        args = [
            self.binary,
            "--bind", LOOPBACK,
            "--dir", str(self.directory),
            "--logfile", str(self.log_file),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes" if self.persistence == "aof" else "no",
            "--appendfsync", "always",
        ]
        if self.tls is None:
            args += ["--port", str(self.port)]
        else:
            args += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.server.cert),
                "--tls-key-file", str(self.tls.server.key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "optional",
            ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.replica_of is not None:
            args += ["--replicaof", LOOPBACK, str(self.replica_of.port)]
        return args + self.extra_args

    def start(self, *, timeout: float = 10.0) -> RedisServer:
        if self.process is not None and self.process.poll() is None:
            return self
        # Its own process group, so a signal meant for the test runner never reaches it.
        self.spawned_at = time.time()
        self.process = subprocess.Popen(
            self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        client = self.client()
        try:
            while True:
                if self.process.poll() is not None:
                    raise RedisServerError(
                        f"redis-server exited with {self.process.returncode}: {self._tail()}"
                    )
                try:
                    client.ping()
                    break
                except redis.BusyLoadingError:
                    pass
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RedisServerError(f"redis-server did not answer on {self.addr}")
                time.sleep(0.02)
        finally:
            client.close()
        for started in self.on_start:
            started()
        return self

    def _tail(self) -> str:
        stderr = b""
        if self.process is not None and self.process.stderr is not None:
            stderr = self.process.stderr.read() or b""
        log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return (stderr.decode(errors="replace") + log)[-2000:]

    def stop(self, *, timeout: float = 10.0) -> None:
        """A clean shutdown (SIGTERM): an AOF server has already written everything."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: what a crash looks like."""
        self._signal(signal.SIGKILL, 10.0)

    def _signal(self, signum: int, timeout: float) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The server stopped (SIGSTOP) for the block, its connections open: a call is taken
        by the kernel and no answer comes, until the block ends (SIGCONT)."""
        assert self.process is not None, "the server is not running"
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    def restart(self, *, persistence: Persistence | None = None, kill: bool = False) -> None:
        """Stop (or kill) and start again on the same port, optionally changing persistence."""
        if kill:
            self.kill()
        else:
            self.stop()
        if persistence is not None:
            self.persistence = persistence
        self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def close(self) -> None:
        self.kill()
        if self._owns_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- security ------------------------------------------------------------------------
    def set_requirepass(self, password: str) -> None:
        """Require ``password`` from now on (kept across restarts of this object)."""
        with self.client() as admin:
            admin.config_set("requirepass", password)
        self.password = password

    def create_acl_user(
        self, username: str, password: str, *, rules: Sequence[str] = ("~*", "&*", "+@all")
    ) -> None:
        """An ACL user with ``password`` and ``rules`` (default: everything)."""
        with self.client() as admin:
            admin.execute_command("ACL", "SETUSER", username, "reset", "on", f">{password}",
                                  *rules)

    def _make_certs(self) -> TlsFiles:
        certs = self.directory / "tls"
        certs.mkdir(exist_ok=True)
        ca = CertificateAuthority(certs)
        server = ca.issue("server", "redis", server=True, dns_names=["localhost"],
                          ips=[LOOPBACK])
        client = ca.issue("client", "enhanced-locking")
        return TlsFiles(ca=ca.pair.cert, server=server, client=client)


class RedisSentinel:
    """A ``redis-server --sentinel`` watching one master under ``name`` (quorum 1)."""

    def __init__(self, directory: Path, master: RedisServer, *, name: str = "locks",
                 down_after_ms: int = 1000) -> None:
        self.binary = find_redis_server()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.master = master
        self.name = name
        self.down_after_ms = down_after_ms
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0
        """Wall-clock time (``time.time()``, the clock Redis's ``TIME`` reads) just before the
        running process was spawned: nothing it did can be earlier. ``start`` returns later,
        once a ping is answered, so a time taken after it may follow the server's first
        replies by as much as a busy machine delays the caller."""

    @property
    def addr(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self, *, timeout: float = 10.0) -> RedisSentinel:
        # Sentinel rewrites its config file, so it gets its own writable copy.
        config = self.directory / "sentinel.conf"
        lines = [
            f"port {self.port}",
            f"bind {LOOPBACK}",
            f"dir {self.directory}",
            f"logfile {self.directory / 'sentinel.log'}",
            f"sentinel monitor {self.name} {LOOPBACK} {self.master.port} 1",
            f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}",
            f"sentinel failover-timeout {self.name} 5000",
        ]
        if self.master.password is not None:
            lines.append(f"sentinel auth-pass {self.name} {self.master.password}")
        config.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen(
            [self.binary, str(config), "--sentinel"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        with redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=5) as client:
            while True:
                try:
                    if client.sentinel_get_master_addr_by_name(self.name):
                        return self
                except redis.ConnectionError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RedisServerError(f"redis sentinel did not start on {self.addr}")
                time.sleep(0.05)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


def main() -> None:
    """Start a server in the foreground and print its address (Ctrl-C stops it)."""
    with RedisServer() as server:
        print(f"redis-server on {server.addr} (dir {server.directory}); Ctrl-C stops it",
              flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
