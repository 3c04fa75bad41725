"""Locks and fencing tokens survive the service being killed and started on the same file.

A real ``enhanced-locking serve`` process on the embedded store: acquire, note the tokens,
SIGKILL it (nothing gets to flush or close), start it again on the same data dir.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import ServiceFactory
from tests.support.service import enhanced_locking_command, free_port, scrubbed_env

SIDES = {
    "legacy": (),  # enhanced locking off: the legacy locker on the embedded store
    "enhanced": ("--enhanced-locking-enabled",),
}


def acquire(url: str, *, path: str, pull: int) -> httpx.Response:
    return httpx.post(url + "/v1/locks", json={
        "project": {"repoFullName": "acme/infra", "path": path, "projectName": ""},
        "workspace": "default",
        "pull": {"num": pull},
        "user": {"username": f"dev{pull}"},
    }, timeout=10)


def granted(url: str, *, path: str, pull: int) -> dict[str, Any]:
    response = acquire(url, path=path, pull=pull)
    assert response.status_code == 200, response.text
    lock: dict[str, Any] = response.json()["lock"]
    return lock


def release(url: str, key: str) -> None:
    assert httpx.delete(url + "/v1/locks/by-key", params={"key": key}).status_code == 200


@pytest.mark.parametrize("side", list(SIDES))
def test_locks_and_fencing_tokens_survive_a_kill_and_restart(
    service_process: ServiceFactory, side: str
) -> None:
    service = service_process(*SIDES[side])
    first = granted(service.url, path="a", pull=1)
    assert first["backend"] == side
    release(service.url, first["key"])
    held = granted(service.url, path="a", pull=2)
    other = granted(service.url, path="b", pull=3)
    assert held["fencingToken"] > first["fencingToken"]

    assert service.kill() == -9
    service.start()

    locks = httpx.get(service.url + "/v1/locks").json()["locks"]
    assert sorted(locks, key=lambda lock: lock["key"]) == [held, other]
    assert httpx.get(service.url + "/v1/locks/by-key",
                     params={"key": held["key"]}).json() == {"lock": held}
    refused = acquire(service.url, path="a", pull=4)
    assert refused.status_code == 409 and refused.json()["holder"] == held
    assert granted(service.url, path="a", pull=2) == held, "the holder keeps its lock unchanged"

    release(service.url, held["key"])
    after = granted(service.url, path="a", pull=4)
    assert after["fencingToken"] == held["fencingToken"] + 1


def test_a_graceful_stop_exits_zero_and_keeps_the_locks(service_process: ServiceFactory) -> None:
    service = service_process()
    held = granted(service.url, path="a", pull=1)
    assert service.stop() == 0
    assert "Traceback" not in service.stderr()
    service.start()
    assert httpx.get(service.url + "/v1/locks").json() == {"locks": [held]}


def test_a_graceful_stop_leaves_no_copy_of_the_kubeconfig_s_client_key(
    service_process: ServiceFactory, tmp_path: Path,
) -> None:
    # A kubeconfig with embedded credentials (client-key-data, as kind's and most clusters'
    # admin kubeconfigs have) is written by the Kubernetes client to temporary files, which it
    # removes as the process exits (an exit handler). A stopped service leaves no copy of the
    # private key behind, as it did not before its exit skipped the interpreter's teardown.
    # (The API server is never asked: the client is made at start, its files with it.)
    key = b"-----BEGIN PRIVATE KEY-----\nnot-a-key-but-a-secret-all-the-same\n"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {
            "client-certificate-data": base64.b64encode(b"a certificate").decode(),
            "client-key-data": base64.b64encode(key).decode()}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    temporary = tmp_path / "tmp"
    temporary.mkdir()

    def copies() -> list[str]:
        return [path.name for path in temporary.rglob("*")
                if path.is_file() and path.read_bytes() == key]

    service = service_process("--enhanced-locking-auth=kubernetes",
                              env={"KUBECONFIG": str(kubeconfig), "TMPDIR": str(temporary)})
    assert len(copies()) == 1  # written by the client at start: what the stop must remove
    assert service.stop() == 0
    assert "Traceback" not in service.stderr()
    assert copies() == []


def test_tokens_keep_rising_over_several_restarts(service_process: ServiceFactory) -> None:
    service = service_process("--enhanced-locking-enabled")
    tokens = []
    for restart in range(3):
        lock = granted(service.url, path="a", pull=restart + 1)
        tokens.append(lock["fencingToken"])
        release(service.url, lock["key"])
        service.restart(kill=restart % 2 == 0)
    assert tokens == [1, 2, 3]
    assert granted(service.url, path="a", pull=9)["fencingToken"] == 4


# --- a store file that is empty or not ours ----------------------------------------------------


def serve_once(data_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """``serve`` on ``data_dir`` expected to stop by itself (it refuses to start)."""
    argv = [*enhanced_locking_command(), "serve", "--port", str(free_port()),
            "--data-dir", str(data_dir), *flags]
    return subprocess.run(argv, capture_output=True, text=True, env=scrubbed_env(), timeout=60)


def _sqlite_with_other_tables(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        db.execute("INSERT INTO invoices (total) VALUES (12.5)")
        db.commit()


FOREIGN: dict[str, tuple[Callable[[Path], object], str]] = {
    "empty": (lambda path: path.write_bytes(b""), "is empty (0 bytes)"),
    "not-sqlite": (lambda path: path.write_bytes(b"PK\x03\x04 a zip file, say" * 50),
                   "not an SQLite database"),
    "other-sqlite": (_sqlite_with_other_tables, "holds other tables (invoices)"),
}


@pytest.mark.parametrize("kind", list(FOREIGN))
@pytest.mark.parametrize("side", list(SIDES))
def test_an_existing_empty_or_foreign_store_file_is_refused_in_one_line(
    data_dir: Path, kind: str, side: str,
) -> None:
    path = data_dir / "enhanced-locking.db"
    make, problem = FOREIGN[kind]
    make(path)
    before = path.read_bytes()
    result = serve_once(data_dir, *SIDES[side])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("enhanced-locking: ") and problem in lines[0]
    assert str(path) in lines[0]
    if kind == "empty":
        assert "enhanced-locking-init-store" in lines[0]
    assert path.read_bytes() == before, "a refused file is left exactly as it was"


def test_init_store_starts_an_emptied_file_afresh_with_tokens_above_the_old_ones(
    service_process: ServiceFactory, data_dir: Path,
) -> None:
    service = service_process("--enhanced-locking-enabled")
    for pull in (1, 2, 3):
        lock = granted(service.url, path="a", pull=pull)
        release(service.url, lock["key"])
    last = lock["fencingToken"]
    assert service.stop() == 0
    for leftover in data_dir.glob("enhanced-locking.db*"):  # the file and its WAL, emptied
        leftover.write_bytes(b"")
    refused = serve_once(data_dir, "--enhanced-locking-enabled")
    assert refused.returncode == 2 and "enhanced-locking-init-store" in refused.stderr
    service.args.append("--enhanced-locking-init-store")
    service.start()
    assert httpx.get(service.url + "/v1/locks").json() == {"locks": []}
    fresh = granted(service.url, path="a", pull=4)
    assert fresh["fencingToken"] > last
    other = granted(service.url, path="b", pull=4)
    assert other["fencingToken"] > last


def test_the_fencing_floor_survives_a_lost_counter_row(
    service_process: ServiceFactory, data_dir: Path,
) -> None:
    service = service_process("--enhanced-locking-enabled")
    tokens = []
    for pull in (1, 2, 3):
        lock = granted(service.url, path="a", pull=pull)
        tokens.append(lock["fencingToken"])
        release(service.url, lock["key"])
    assert service.kill() == -9
    with contextlib.closing(sqlite3.connect(data_dir / "enhanced-locking.db")) as db:
        db.execute("DELETE FROM locks WHERE held = 0")  # the released keys' counter rows
        db.commit()
    service.start()
    assert granted(service.url, path="a", pull=4)["fencingToken"] > max(tokens)
