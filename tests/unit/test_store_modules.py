"""A service loads the client of a store only when it uses that store: one on the embedded
store (or memory) never loads etcd's client and gRPC (about 16 MiB of memory and a tenth of the
imports' time), and one on etcd does. Each case builds the service and its app in a process of
its own, whose loaded modules are then read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BUILT = textwrap.dedent("""
    import json, sys
    from enhanced_locking.api import create_app
    from enhanced_locking.config import EnhancedLockingConfig
    from enhanced_locking.factory import LockService
    from enhanced_locking.provider import ConfigProvider

    config = EnhancedLockingConfig(**json.loads(sys.argv[1]))
    create_app(LockService(ConfigProvider(config)), manage_lifecycle=False)
    print(json.dumps(sorted(m for m in sys.modules
                            if m.split(".")[0] in ("grpc", "etcd3aio"))))
""")


def loaded(settings: dict[str, object]) -> list[str]:
    """The gRPC and etcd client modules a process loaded once it built the service and its
    app for ``settings`` (nothing connects: stores open on first use)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "operator")}
    done = subprocess.run([sys.executable, "-c", BUILT, json.dumps(settings)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize("backend", ["boltdb", "memory"])
def test_a_service_not_on_etcd_loads_no_etcd_client(tmp_path: Path, backend: str) -> None:
    assert loaded({"enabled": True, "backend": backend, "legacy_backend": backend,
                   "data_dir": str(tmp_path)}) == []


def test_a_service_on_etcd_loads_its_client(tmp_path: Path) -> None:
    modules = loaded({"enabled": True, "backend": "etcd", "legacy_backend": "memory",
                      "etcd_endpoints": ["127.0.0.1:9"], "data_dir": str(tmp_path)})
    assert "etcd3aio" in modules and "grpc" in modules
