"""Small Go programs the tests build from the Go module proxy, compiled once and cached.

A program is a directory of ``tests/`` with its own ``go.mod``/``go.sum``. :func:`build`
compiles it into ``~/.cache/enhanced-locking/{name}/{digest}/`` (``XDG_CACHE_HOME`` moves the
cache), keyed by its sources and the Go version, so a change to either rebuilds it and a
concurrent build never sees half a binary. A machine without ``go`` fails with how to get it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["GoBuildError", "build"]


class GoBuildError(RuntimeError):
    """The program could not be built (no ``go``, or ``go build`` failed)."""


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "enhanced-locking"


def build(
    program: Path, name: str, *, missing: str, cache_root: Path | None = None,
    timeout: float = 900,
) -> Path:
    """The compiled ``program``, built with ``go build`` unless this version of it is cached.

    ``missing`` is the message when ``go`` is not installed (say what the program is for).
    """
    go = shutil.which("go")
    if go is None:
        raise GoBuildError(missing)
    digest = hashlib.sha256()
    for source in [*sorted(program.glob("*.go")), program / "go.mod", program / "go.sum"]:
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=False)
    digest.update(version.stdout.encode())
    target = (cache_root or _cache_root() / name) / digest.hexdigest()[:16] / name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOFLAGS": "-mod=readonly -buildvcs=false", "CGO_ENABLED": "0"}
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / name
        result = subprocess.run(
            [go, "build", "-o", str(built), "."], cwd=program, env=env,
            capture_output=True, text=True, check=False, timeout=timeout,
        )
        if result.returncode != 0:
            raise GoBuildError(f"go build of {program} failed:\n{result.stderr[-3000:]}")
        built.replace(target)  # atomic: a concurrent build never sees half a binary
    return target
