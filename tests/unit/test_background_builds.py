"""``make test``'s background builds as the tests see them: a test needing a binary of a build
still running waits for it; a failed or killed build fails it, naming the log and how to build.

The builder is a real process writing the files ``hack/test-all.sh`` writes, on its schedule.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.background_builds import (
    BUILD_LOGS_ENV,
    BackgroundBuild,
    BackgroundBuildFailed,
    await_build,
)
from tests.support.controlplane import ALL_BINARIES, BinariesMissing, bin_dir, find_binaries


@pytest.fixture
def logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "test-builds"
    directory.mkdir()
    monkeypatch.setenv(BUILD_LOGS_ENV, str(directory))
    monkeypatch.setenv("ENHANCED_LOCKING_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ENHANCED_LOCKING_K8S_BIN", raising=False)
    return directory


@pytest.fixture
def builder(logs: Path) -> Iterator[Path]:
    """A running builder: ``builder.pid`` names a live process; ``control-plane.log`` exists.
    Writing the ``.status`` file (or the binaries) is each test's script."""
    (logs / "control-plane.log").write_text("compiling\ncompile error: something broke\n")
    yield logs


def _run_later(script: str, *args: str) -> subprocess.Popen[bytes]:
    """A shell that sleeps, then runs ``script``: the builder finishing while a test waits."""
    return subprocess.Popen(["bash", "-c", f"sleep 1.5; {script}", "builder", *args])


def _started(logs: Path, process: subprocess.Popen[bytes]) -> None:
    (logs / "builder.pid").write_text(f"{process.pid}\n")


def test_without_background_builds_nothing_is_awaited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BUILD_LOGS_ENV, raising=False)
    began = time.monotonic()
    await_build("control-plane")
    assert time.monotonic() - began < 0.5


def test_a_running_build_is_awaited_until_it_succeeds(builder: Path) -> None:
    process = _run_later('echo 0 >"$1/control-plane.status"', str(builder))
    _started(builder, process)
    told: list[BackgroundBuild] = []
    began = time.monotonic()
    try:
        await_build("control-plane", waiting=told.append)
    finally:
        process.wait(timeout=10)
    assert time.monotonic() - began >= 1.0
    assert [build.name for build in told] == ["control-plane"]
    assert (builder / "control-plane.status").read_text() == "0\n"


def test_a_failed_build_names_its_log_and_how_to_build(builder: Path) -> None:
    process = _run_later('echo 2 >"$1/control-plane.status"', str(builder))
    _started(builder, process)
    try:
        with pytest.raises(BackgroundBuildFailed) as failed:
            await_build("control-plane")
    finally:
        process.wait(timeout=10)
    message = str(failed.value)
    assert "failed with exit status 2" in message
    assert str(builder / "control-plane.log") in message
    assert "make control-plane" in message
    assert message.endswith("compile error: something broke")


def test_a_builder_killed_before_the_status_fails_the_wait(builder: Path) -> None:
    # Not a child of this process (whose unreaped child would still look alive), as the
    # builder is not one of pytest's.
    started = subprocess.run(["bash", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True)
    pid = started.stdout.strip()
    (builder / "builder.pid").write_text(f"{pid}\n")
    killer = _run_later('kill -KILL "$1"', pid)
    try:
        with pytest.raises(BackgroundBuildFailed, match="ended without an exit status"):
            await_build("control-plane")
    finally:
        killer.wait(timeout=10)


def test_a_build_not_started_yet_is_awaited(logs: Path) -> None:
    """Atlantis's log exists from the start, while the control plane is built before it."""
    (logs / "atlantis.log").write_text("")
    process = _run_later('echo 0 >"$1/atlantis.status"', str(logs))
    _started(logs, process)
    try:
        await_build("atlantis")
    finally:
        process.wait(timeout=10)
    assert (logs / "atlantis.status").exists()


def test_finding_the_binaries_waits_for_the_control_plane_build(builder: Path) -> None:
    directory = bin_dir()
    script = ('mkdir -p "$1" && for b in "${@:3}"; do printf "#!/bin/sh\\n" >"$1/$b"; '
              'chmod +x "$1/$b"; done && echo 0 >"$2/control-plane.status"')
    process = _run_later(script, str(directory), str(builder), *ALL_BINARIES)
    _started(builder, process)
    try:
        assert find_binaries(ALL_BINARIES) == directory
    finally:
        process.wait(timeout=10)
    assert all(os.access(directory / name, os.X_OK) for name in ALL_BINARIES)


def test_finding_the_binaries_of_a_failed_build_names_its_log(builder: Path) -> None:
    process = _run_later('echo 1 >"$1/control-plane.status"', str(builder))
    _started(builder, process)
    try:
        with pytest.raises(BinariesMissing) as missing:
            find_binaries(ALL_BINARIES)
    finally:
        process.wait(timeout=10)
    assert str(builder / "control-plane.log") in str(missing.value)
    assert "make control-plane" in str(missing.value)
