"""Real etcd for the tests: one member, or a cluster of three, on free loopback ports.

The binary is the one ``hack/build-control-plane.sh`` builds for the Kubernetes tests (the
same etcd the API server stores in). A missing binary fails the test with how to build it.

* :class:`EtcdCluster` starts ``members`` members (1 or 3) with their own data dirs; a
  member can be killed with SIGKILL and started again (same ports, same data), and the
  leader is found through the members' status; :func:`frozen` stops a member (SIGSTOP) for
  a block. :meth:`EtcdCluster.anew` makes a new cluster on a closed one's ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.controlplane import BinariesMissing, Process, find_etcd, free_ports

__all__ = ["EtcdCluster", "EtcdMember", "EtcdServerError", "frozen", "leader_of"]

LOOPBACK = "127.0.0.1"


class EtcdServerError(RuntimeError):
    """etcd could not be started (the message says why and how to fix it)."""


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    process: Process | None = None

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.client_port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()


@dataclass
class EtcdCluster:
    """``members`` etcd members on loopback; ``start()`` waits until they serve."""

    workdir: Path
    members_count: int = 1
    fsync: bool = True
    token: str = "enhanced-locking-tests"
    """The initial cluster token: with the peer addresses, it makes the members' ids and the
    cluster's id (the same for a cluster made again with the same token on the same ports)."""
    members: list[EtcdMember] = field(default_factory=list)
    extra: tuple[str, ...] = ()
    """More flags for every member (``--auth-token-ttl=2``, say)."""

    def __post_init__(self) -> None:
        try:
            self.binary = find_etcd()
        except BinariesMissing as error:
            raise EtcdServerError(str(error)) from None
        ports = free_ports(2 * self.members_count)
        for i in range(self.members_count):
            self.members.append(EtcdMember(
                name=f"m{i}", client_port=ports[2 * i], peer_port=ports[2 * i + 1],
                data_dir=self.workdir / f"m{i}"))

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def _argv(self, member: EtcdMember) -> list[str]:
        initial = ",".join(f"{m.name}=http://{LOOPBACK}:{m.peer_port}" for m in self.members)
        argv = [
            str(self.binary), f"--name={member.name}", f"--data-dir={member.data_dir}",
            f"--listen-client-urls=http://{member.endpoint}",
            f"--advertise-client-urls=http://{member.endpoint}",
            f"--listen-peer-urls=http://{LOOPBACK}:{member.peer_port}",
            f"--initial-advertise-peer-urls=http://{LOOPBACK}:{member.peer_port}",
            f"--initial-cluster={initial}", "--initial-cluster-state=new",
            f"--initial-cluster-token={self.token}",
            "--log-level=warn", "--heartbeat-interval=50", "--election-timeout=500",
            "--listen-metrics-urls=",
        ]
        if not self.fsync:
            # Test speed only: a killed process loses nothing (the page cache survives it).
            argv.append("--unsafe-no-fsync")
        return [*argv, *self.extra]

    def anew(self, workdir: Path, *, token: str) -> EtcdCluster:
        """A new cluster (not started) on this one's ports, its members' data in ``workdir``
        (empty: a cluster made anew, its raft terms from the start), with the cluster token
        ``token`` (this cluster's: the same cluster id; another: another id)."""
        fresh = EtcdCluster(workdir, members_count=self.members_count, fsync=self.fsync,
                            token=token)
        fresh.members = [EtcdMember(name=m.name, client_port=m.client_port,
                                    peer_port=m.peer_port, data_dir=workdir / m.name)
                         for m in self.members]
        return fresh

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        for member in self.members:
            self.start_member(member)
        self.wait_healthy(timeout)
        return self

    def start_member(self, member: EtcdMember) -> None:
        member.data_dir.parent.mkdir(parents=True, exist_ok=True)
        member.process = Process.start(member.name, self._argv(member),
                                       self.workdir / f"{member.name}.log")

    def kill(self, member: EtcdMember) -> None:
        """SIGKILL, no warning (the process group, so nothing of it lingers)."""
        if member.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(member.process.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            member.process.popen.wait(timeout=10)
        member.process.stop()  # already dead: this only closes its log

    def status(self, member: EtcdMember) -> dict[str, object] | None:
        """The member's ``/v3/maintenance/status`` answer, or None if it does not answer."""
        request = urllib.request.Request(
            f"http://{member.endpoint}/v3/maintenance/status", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=1.0) as answer:
                data: dict[str, object] = json.loads(answer.read())
                return data
        except (OSError, ValueError):
            return None

    def member_id(self, member: EtcdMember) -> int:
        """The id etcd gives ``member`` (in its answers' headers); asserted to answer."""
        status = self.status(member)
        assert status is not None, f"{member.name} does not answer"
        header = status["header"]
        assert isinstance(header, dict)
        return int(header["member_id"])

    def leader(self) -> EtcdMember | None:
        for member in self.members:
            if not member.alive():
                continue
            status = self.status(member)
            if status is None:
                continue
            header = status.get("header")
            if isinstance(header, dict) and str(status.get("leader")) == str(
                    header.get("member_id")):
                return member
        return None

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [m for m in self.members if m.process is not None and not m.alive()]
            if dead:
                raise EtcdServerError(f"etcd {dead[0].name} exited:\n{dead[0].process.tail()}"
                                      if dead[0].process else "etcd exited")
            if self.leader() is not None:
                return
            time.sleep(0.05)
        tails = "\n".join(m.process.tail() for m in self.members if m.process)
        raise EtcdServerError(f"etcd did not elect a leader within {timeout:g}s:\n{tails}")

    def close(self) -> None:
        """Every member stopped as an operator stops it (SIGTERM): a member of several hands
        its leadership over and tells its peers, about a second each."""
        for member in self.members:
            if member.process is not None:
                member.process.stop(grace=5)

    def discard(self) -> None:
        """Every member killed (SIGKILL): the end of a cluster whose data nobody reads again.
        A graceful :meth:`close` of three members took 2 s of every test that had them."""
        for member in self.members:
            if member.process is None:
                continue
            if member.process.popen.poll() is None:  # not reaped: its process group is its own
                self.kill(member)
            else:
                member.process.stop()  # gone already: this only closes its log


def leader_of(cluster: EtcdCluster) -> EtcdMember:
    """The member that leads ``cluster``, once one does (30 s at most)."""
    deadline = time.monotonic() + 30
    while (leader := cluster.leader()) is None:
        assert time.monotonic() < deadline, "no leader elected"
        time.sleep(0.05)
    return leader


@contextlib.contextmanager
def frozen(member: EtcdMember) -> Iterator[None]:
    """``member`` stopped (SIGSTOP) for the block: its connections stay open, it answers
    nothing; then SIGCONT, whatever the block did.

    The block starts once every thread of the process is stopped: the kernel stops a
    process when one of its threads takes the signal, and until that thread is scheduled
    the others go on serving (on a loaded machine a read was answered 2 ms after the
    signal was sent)."""
    assert member.process is not None
    pid = member.process.popen.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while not _all_stopped(pid):
            if time.monotonic() > deadline:
                raise EtcdServerError(f"{member.name} did not stop within 10 s of SIGSTOP")
            time.sleep(0.001)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _all_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (state ``T`` in its ``stat``)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        if stat.rsplit(")", 1)[1].split()[0] not in ("T", "t"):
            return False
    return True
