"""The lock service as a real process, for tests and benchmarks.

``ServiceProcess`` runs ``enhanced-locking serve`` (the installed console script, so the real
entry point is what gets tested) on a free loopback port with its own data dir, waits for
``/healthz`` with a deadline, and can stop it gracefully (SIGTERM), kill it (SIGKILL) and start
it again on the same port and data dir. Its stdout and stderr go to files, never to pipes that
could fill up and stall the server; ``output()`` returns them for failure reports.

The server that answers must be the process started, not another one on the same port (a
port picked free here can be taken by another run before the service binds it, and that
run's server then answered our health check). So a first start asks for ``--port 0``: the
service binds a port nobody holds and names it in its ``listening on`` log line, read from this
start's own stderr. A restart reuses that port, and the health check waits for the new
process's own line first: the service logs it only once it has bound the port, and exits 2
when the port is taken, so nothing else can be listening there.

In tests, ``running(process)`` (one process) and ``services()`` (a group a fixture starts one
by one) start processes, fail the test with the service's output when one does not come up,
and stop them all at the end; ``serving(root, *flags)`` runs one with its data and logs under
``root`` (a module's shared service).

Nothing here listens anywhere but 127.0.0.1.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Self, TypeVar

import httpx
import pytest
from tests.support.child import dying_with_parent

__all__ = [
    "LOOPBACK",
    "SHORT_CONNECT_TIMEOUT",
    "ServiceProcess",
    "ServiceStartError",
    "Services",
    "enhanced_locking_command",
    "free_port",
    "running",
    "scrubbed_env",
    "services",
    "serving",
]

LOOPBACK = "127.0.0.1"
SHORT_CONNECT_TIMEOUT = "500ms"
"""``--connect-timeout`` of a command a test runs against a port nothing listens on: its refused
calls are sent again for that long, not the default 10 s, before it exits 3."""
START_DEADLINE = 60.0
"""Seconds a service process is given to answer ``/healthz``: about one on a quiet machine, but
its interpreter and imports on a share of a core at a load average of 25 took close to 20."""
STOP_GRACE = 10.0
LISTENING = re.compile(r"listening on https?://127\.0\.0\.1:(?P<port>[0-9]+)[ \n]")
"""The service's log line naming the address it bound (shown at every log level but error)."""
_NUMBERS = itertools.count(1)


class ServiceStartError(RuntimeError):
    """The service did not come up; the message carries its output."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def enhanced_locking_command() -> list[str]:
    """The installed ``enhanced-locking`` console script, next to this interpreter."""
    script = Path(sys.executable).parent / "enhanced-locking"
    if script.exists():
        return [str(script)]
    found = shutil.which("enhanced-locking")
    if found:
        return [found]
    raise ServiceStartError(
        "the enhanced-locking command is not installed in this environment; "
        "run `make venv` (or `pip install -e '.[test]'`) first"
    )


def scrubbed_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any enhanced-locking setting, plus ``extra``.

    A developer's own ``ATLANTIS_ENHANCED_LOCKING_*`` variables must not change what a test sees,
    nor Atlantis's ``ATLANTIS_DATA_DIR`` and ``ATLANTIS_REDIS_PASSWORD``, which commands read too.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("ATLANTIS_ENHANCED_LOCKING_", "ENHANCED_LOCKING_"))
        and name not in ("ATLANTIS_DATA_DIR", "ATLANTIS_REDIS_PASSWORD")
    }
    env.update(extra or {})
    return env


class ServiceProcess:
    """One ``enhanced-locking serve`` process on a loopback port."""

    running: ClassVar[list[ServiceProcess]] = []
    """Every instance started and not yet stopped (failure reports dump their output)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        log_dir: Path | None = None,
        ca_file: Path | None = None,
    ) -> None:
        """``ca_file``: the service serves HTTPS (its certificate is signed by this CA)."""
        """``port``: the port to serve on; without one the first start asks the service for a
        free port (``--port 0``) and every restart keeps the one it got."""
        self.data_dir = data_dir
        self.ca_file = ca_file
        self.args = list(args)
        self.env = dict(env or {})
        self._port = port
        self.log_dir = log_dir or data_dir.parent
        self.process: subprocess.Popen[bytes] | None = None
        self._terminated = False
        """The running process was sent SIGTERM (by :meth:`terminate`)."""
        self.starts = 0
        self._number = next(_NUMBERS)

    @property
    def port(self) -> int:
        """The port the service serves on (known once it has started, unless given)."""
        if self._port is None:
            raise ServiceStartError("the service has not started yet: its port is picked "
                                    "when it starts")
        return self._port

    @property
    def port_argument(self) -> str:
        """``--port``'s value: the known port, else 0 (the service picks a free one)."""
        return str(self._port or 0)

    @property
    def url(self) -> str:
        scheme = "https" if self.ca_file is not None else "http"
        return f"{scheme}://{LOOPBACK}:{self.port}"

    @property
    def name(self) -> str:
        """What failure reports call it: its URL, or its number before it has a port."""
        return self.url if self._port is not None else f"service #{self._number} (no port yet)"

    @property
    def argv(self) -> list[str]:
        return [
            *enhanced_locking_command(),
            "serve",
            "--host",
            LOOPBACK,
            "--port",
            self.port_argument,
            "--data-dir",
            str(self.data_dir),
            *self.args,
        ]

    def _log(self, stream: str) -> Path:
        return self.log_dir / f"service-{self._number}-{self.starts}.{stream}"

    def start(self, *, deadline: float = START_DEADLINE) -> Self:
        """Start the process and wait until ``/healthz`` answers 200."""
        self.spawn()
        self.wait_started(deadline=deadline)
        return self

    def spawn(self) -> None:
        """Start the process without waiting for it (:meth:`wait_started` waits): several
        spawned before the first is awaited start side by side."""
        if self.process is not None and self.process.poll() is None:
            raise ServiceStartError(f"the {self.name} is already running")
        self.starts += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self._log("stdout"), "wb") as out, open(self._log("stderr"), "wb") as err:
            self.process = subprocess.Popen(
                dying_with_parent(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=scrubbed_env(self.env),
                start_new_session=True,
            )
        self._terminated = False
        ServiceProcess.running.append(self)

    def wait_started(self, *, deadline: float = START_DEADLINE) -> None:
        """Wait until the spawned process answers ``/healthz`` 200 (killed if it does not
        within ``deadline`` seconds)."""
        self._wait_healthy(deadline)

    def bound_port(self) -> int | None:
        """The port this start's process says it bound (its ``listening on`` line), if yet."""
        found = LISTENING.search(self.stderr())
        return int(found.group("port")) if found else None

    def _wait_healthy(self, deadline: float) -> None:
        assert self.process is not None
        argv = " ".join(self.process.args)  # type: ignore[arg-type]
        until = time.monotonic() + deadline
        last = "it has not logged the address it listens on"
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else True)
        with httpx.Client(timeout=1.0, verify=verify) as client:
            while time.monotonic() < until:
                code = self.process.poll()
                if code is not None:
                    raise ServiceStartError(
                        f"`{argv}` exited with {code} before serving:\n{self.output()}")
                # Only once this process has bound its port is the answer on it its own.
                bound = self.bound_port()
                if bound is not None and self._port is None:
                    self._port = bound
                if bound is None or bound != self._port:
                    if bound is not None:
                        last = f"it listens on port {bound}, not {self._port}"
                    time.sleep(0.05)
                    continue
                try:
                    response = client.get(self.url + "/healthz")
                    if response.status_code == 200:
                        return
                    last = f"HTTP {response.status_code}"
                except httpx.TransportError as error:
                    last = repr(error)
                time.sleep(0.05)
        self.kill()
        raise ServiceStartError(
            f"`{argv}` did not answer /healthz within {deadline}s ({last}):\n{self.output()}")

    def terminate(self) -> None:
        """SIGTERM without waiting (:meth:`stop` then waits, and sends no second one)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self._terminated = True

    def _signal(self, sig: signal.Signals, wait: float) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            if not (sig == signal.SIGTERM and self._terminated):
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                return None
        return self.process.returncode

    def stop(self, *, grace: float = STOP_GRACE) -> int | None:
        """SIGTERM and wait (SIGKILL after ``grace``); the exit code, None if it was killed."""
        code = self._signal(signal.SIGTERM, grace)
        if code is None and self.process is not None and self.process.poll() is None:
            self.kill()
            return None
        self._forget()
        return code

    def kill(self) -> int | None:
        """SIGKILL, as a crash would: nothing gets to clean up."""
        code = self._signal(signal.SIGKILL, STOP_GRACE)
        self._forget()
        return code

    def restart(self, *, kill: bool = False) -> ServiceProcess:
        """Stop (or with ``kill``, SIGKILL) and start again on the same port and data dir."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def _forget(self) -> None:
        if self in ServiceProcess.running:
            ServiceProcess.running.remove(self)

    def output(self, *, limit: int = 8000) -> str:
        """The end of this run's stdout and stderr."""
        parts = []
        for stream in ("stdout", "stderr"):
            try:
                text = self._log(stream).read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                parts.append(f"--- {stream} of {' '.join(self.argv)}\n{text[-limit:]}")
        return "\n".join(parts) or "(no output)"

    def stderr(self) -> str:
        """Everything this run wrote to stderr."""
        try:
            return self._log("stderr").read_text(errors="replace")
        except OSError:
            return ""

    def stdout(self) -> str:
        """Everything this run wrote to stdout."""
        try:
            return self._log("stdout").read_text(errors="replace")
        except OSError:
            return ""


P = TypeVar("P", bound=ServiceProcess)


class Services:
    """Service processes a test (or a module) starts; :func:`services` stops them all."""

    def __init__(self, started: list[ServiceProcess] | None = None) -> None:
        self.started = [] if started is None else started
        """Every process given to :meth:`start`, also one that did not come up."""

    def start(self, process: P, *, deadline: float = START_DEADLINE) -> P:
        """Start ``process``; one that does not come up fails the test with its output."""
        return self.start_all([process], deadline=deadline)[0]

    def start_all(self, processes: Sequence[P], *,
                  deadline: float = START_DEADLINE) -> list[P]:
        """Start ``processes`` side by side (each spawned, then each awaited); one that does not
        come up fails the test with its output."""
        self.started.extend(processes)
        try:
            for process in processes:
                process.spawn()
            for process in processes:
                process.wait_started(deadline=deadline)
        except (ServiceStartError, OSError) as error:
            pytest.fail(str(error), pytrace=False)
        return list(processes)

    def stop(self) -> None:
        """Every process told to stop (SIGTERM), then each awaited: they wind down side by
        side."""
        for process in self.started:
            process.terminate()
        for process in self.started:
            process.stop()


@contextmanager
def services(started: list[ServiceProcess] | None = None) -> Iterator[Services]:
    """A :class:`Services` group whose processes are stopped on the way out.

    ``started``: the list to record them in (the failure report reads it)."""
    group = Services(started)
    try:
        yield group
    finally:
        group.stop()


@contextmanager
def running(process: ServiceProcess) -> Iterator[ServiceProcess]:
    """``process`` started (the test fails with its output if it does not come up), then
    stopped on the way out."""
    with services() as group:
        yield group.start(process)


@contextmanager
def serving(root: Path, *flags: str,
            env: Mapping[str, str] | None = None) -> Iterator[ServiceProcess]:
    """A service started with ``flags`` (and ``env``), its data dir and logs under ``root``,
    as :func:`running` starts and stops it."""
    with running(ServiceProcess(root / "data", args=flags, env=env,
                                log_dir=root / "logs")) as process:
        yield process
