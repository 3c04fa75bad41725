"""A real Redis Cluster for tests: three masters on free loopback ports, no replicas.

Each node is a :class:`~tests.support.redis_server.RedisServer` started with
``--cluster-enabled yes`` and a cluster config file in its own directory; ``redis-cli --cluster
create ... --cluster-replicas 0 --cluster-yes`` then splits the 16384 slots between them. The
service is pointed at any one node (``enhanced-locking-redis-addr``) with
``enhanced-locking-redis-cluster`` on and discovers the others.

Manual use, from the repository root::

    python -m tests.support.redis_cluster
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.redis_server import LOOPBACK, RedisServer, RedisServerError, free_port

__all__ = ["CLI_MISSING_MESSAGE", "RedisClusterNodes"]

CLI_MISSING_MESSAGE = (
    "redis-cli is not installed: install Debian's redis-server (it brings redis-tools; "
    "make redis)")


class RedisClusterNodes:
    """Three cluster-enabled redis-servers joined into one cluster."""

    def __init__(self, directory: Path | None = None, *, masters: int = 3) -> None:
        self._owns_dir = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="redis-cluster-"))
        self.nodes = [
            RedisServer(self.directory / f"node{i}", extra_args=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "5000",
                # The bus port is its own free port (the default, port + 10000, may not be).
                "--cluster-port", str(free_port()),
            ])
            for i in range(masters)
        ]

    @property
    def addr(self) -> str:
        """One node's ``host:port``: what ``enhanced-locking-redis-addr`` takes."""
        return self.nodes[0].addr

    def start(self, *, timeout: float = 30.0) -> RedisClusterNodes:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RedisServerError(CLI_MISSING_MESSAGE)
        for node in self.nodes:
            node.start()
        create = subprocess.run(
            [cli, "--cluster", "create", *(n.addr for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout, check=False)
        if create.returncode != 0:
            raise RedisServerError(f"redis-cli --cluster create failed: {create.stdout[-1000:]}"
                                   f"{create.stderr[-1000:]}")
        deadline = time.monotonic() + timeout
        while not all(self._ready(node) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RedisServerError(f"the cluster on {LOOPBACK} did not become ready")
            time.sleep(0.05)
        return self

    @staticmethod
    def _ready(node: RedisServer) -> bool:
        with node.client() as client:
            info = client.execute_command("CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text and "cluster_slots_assigned:16384" in text

    def node_of(self, key: str) -> RedisServer:
        """The master serving ``key``'s slot."""
        with self.nodes[0].client() as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            shards = client.execute_command("CLUSTER", "SLOTS")
        for start, end, primary, *_ in shards:
            if int(start) <= slot <= int(end):
                port = int(primary[1])
                return next(n for n in self.nodes if n.port == port)
        raise RedisServerError(f"no node serves slot {slot}")

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        if self._owns_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisClusterNodes:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    """Start a cluster in the foreground and print one node's address (Ctrl-C stops it)."""
    with RedisClusterNodes() as cluster:
        print(f"redis cluster on {', '.join(n.addr for n in cluster.nodes)}; Ctrl-C stops it",
              flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
