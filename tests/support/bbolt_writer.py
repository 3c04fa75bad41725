"""bbolt files written by the real bbolt library, for the reader's and the importers' tests.

``tests/bbolt_writer`` is a small Go program on ``go.etcd.io/bbolt`` (from the Go module proxy)
that writes a file from a JSON spec, with Atlantis's own structs for the lock values, and then
prints what bbolt itself reads back. :func:`build_writer` compiles it once into a cache
directory keyed by its sources (see :mod:`gobuild`); :class:`BoltWriter` runs it.

A machine without ``go`` fails the tests that need it, with how to get it: the reader is never
tested only against bytes made by its own inverse. The ``bolt_writer`` fixture (one writer for
the session) is everywhere: ``tests/conftest.py`` loads this module as a plugin.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from tests.support import gobuild

__all__ = [
    "BoltWriter",
    "BoltWriterError",
    "atlantis_lock",
    "bolt_writer",
    "build_writer",
    "go_time",
    "lock_key",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
WRITER_DIR = REPO_ROOT / "tests" / "bbolt_writer"
GO_MISSING = (
    "go is not installed: the bbolt tests build tests/bbolt_writer (a Go program on "
    "go.etcd.io/bbolt) with Go 1.25 or newer; install Go and put `go` on PATH"
)


class BoltWriterError(RuntimeError):
    """The writer could not be built or did not write the file."""


def build_writer(cache_root: Path | None = None) -> Path:
    """The compiled writer, built with ``go build`` unless this version of it is cached."""
    try:
        return gobuild.build(WRITER_DIR, "bboltwriter", missing=GO_MISSING,
                             cache_root=cache_root, timeout=600)
    except gobuild.GoBuildError as error:
        raise BoltWriterError(str(error)) from None


class BoltWriter:
    """Runs the compiled writer: ``writer.write(path, transactions)`` → bbolt's own reading."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary

    def write(
        self, path: Path, transactions: list[list[dict[str, Any]]], *, page_size: int = 0
    ) -> dict[str, Any]:
        spec = {"path": str(path), "pageSize": page_size, "transactions": transactions}
        result = subprocess.run(
            [str(self.binary)], input=json.dumps(spec), capture_output=True, text=True,
            check=False, timeout=120,
        )
        if result.returncode != 0:
            raise BoltWriterError(f"bboltwriter failed: {result.stderr.strip()}")
        dump: dict[str, Any] = json.loads(result.stdout)
        return dump


def go_time(value: datetime) -> str:
    """A time as Go's ``encoding/json`` accepts it (RFC 3339 with nanoseconds)."""
    return value.isoformat().replace("+00:00", "Z")


def atlantis_lock(
    *,
    repo: str,
    pull: int,
    path: str = ".",
    workspace: str = "default",
    project_name: str = "",
    user: str = "alice",
    time: datetime | str = datetime(2024, 5, 1, 10, 0, tzinfo=UTC),
    clone_url: str | None = None,
    pull_url: str | None = None,
    teams: list[str] | None = None,
) -> dict[str, Any]:
    """A ``models.ProjectLock`` as Atlantis fills it, as JSON input for the Go structs."""
    owner, _, name = repo.rpartition("/")
    return {
        "Project": {"ProjectName": project_name, "RepoFullName": repo, "Path": path},
        "Pull": {
            "Num": pull,
            "HeadCommit": f"{pull:040x}",
            "URL": pull_url if pull_url is not None else f"https://github.com/{repo}/pull/{pull}",
            "HeadBranch": f"feature-{pull}",
            "BaseBranch": "main",
            "Author": user,
            "State": 0,
            "BaseRepo": {
                "FullName": repo,
                "Owner": owner,
                "Name": name,
                "CloneURL": clone_url or f"https://github.com/{repo}.git",
                "SanitizedCloneURL": f"https://github.com/{repo}.git",
                "VCSHost": {"Hostname": "github.com", "Type": 0},
            },
        },
        "User": {"Username": user, "Teams": teams},
        "Workspace": workspace,
        "Time": time if isinstance(time, str) else go_time(time),
    }


def lock_key(lock: dict[str, Any]) -> str:
    """Atlantis's current lock key for a ProjectLock dict."""
    project = lock["Project"]
    return (f"{project['RepoFullName']}/{project['Path']}/{lock['Workspace']}/"
            f"{project['ProjectName']}")


@pytest.fixture(scope="session")
def bolt_writer() -> BoltWriter:
    """The writer, built once per session; the test fails, saying how to get Go, without it."""
    try:
        return BoltWriter(build_writer())
    except BoltWriterError as error:
        pytest.fail(str(error), pytrace=False)
