"""The builds ``make test`` runs in the background while the tests run (``hack/test-all.sh``).

``make test`` builds the control plane and Atlantis while the unit and integration tiers run,
reporting in the directory ``ENHANCED_LOCKING_BUILD_LOGS``: for each build, ``NAME.log`` from
its start, then ``NAME.status`` (its exit status) when it ends; ``builder.pid`` is the process
that runs them. A test that needs a binary of a build still running waits for it with
:func:`await_build`; one that failed fails the test with its log and how to build by hand.
Without ``ENHANCED_LOCKING_BUILD_LOGS`` (``make test-e2e``, a plain ``pytest``), nothing runs in
the background and :func:`await_build` returns at once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BUILD_LOGS_ENV", "BackgroundBuild", "BackgroundBuildFailed", "await_build"]

BUILD_LOGS_ENV = "ENHANCED_LOCKING_BUILD_LOGS"
POLL_SECONDS = 0.5


class BackgroundBuildFailed(RuntimeError):
    """A background build ended without success; the message names its log and how to build."""


@dataclass(frozen=True)
class BackgroundBuild:
    """One build of ``make test``'s background: ``name`` is its make target."""

    name: str
    directory: Path

    @property
    def log(self) -> Path:
        return self.directory / f"{self.name}.log"

    @property
    def status_file(self) -> Path:
        return self.directory / f"{self.name}.status"

    def status(self) -> int | None:
        """Its exit status, or None while it runs (or if it was never started)."""
        try:
            return int(self.status_file.read_text().strip())
        except FileNotFoundError:
            return None

    def builder_alive(self) -> bool:
        """Whether the process running the builds is still there."""
        try:
            pid = int((self.directory / "builder.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def failure(self, status: int | None) -> BackgroundBuildFailed:
        ended = ("ended without an exit status (it was killed)" if status is None
                 else f"failed with exit status {status}")
        try:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        except FileNotFoundError:
            tail = "(no log)"
        return BackgroundBuildFailed(
            f"the background build of {self.name} (started by `make test`) {ended}; its log: "
            f"{self.log}. Build it by hand with `make {self.name}` (hack/build-{self.name}.sh), "
            f"then run the tests again. The log's last lines:\n{tail}")


def background_build(name: str, env: Mapping[str, str] = os.environ) -> BackgroundBuild | None:
    """The background build ``name`` of this ``make test``, or None if there is none."""
    directory = env.get(BUILD_LOGS_ENV)
    if not directory:
        return None
    build = BackgroundBuild(name, Path(directory))
    return build if build.log.exists() or build.status_file.exists() else None


def await_build(
    name: str, *, env: Mapping[str, str] = os.environ,
    waiting: Callable[[BackgroundBuild], None] = lambda build: None,
) -> None:
    """Returns once the background build ``name`` (if any) has succeeded; raises
    :class:`BackgroundBuildFailed` if it failed or was killed. ``waiting`` is called once,
    before waiting, if the build is still running."""
    build = background_build(name, env)
    if build is None:
        return
    told = False
    while (status := build.status()) is None and build.builder_alive():
        if not told:
            waiting(build)
            told = True
        time.sleep(POLL_SECONDS)
    status = build.status()  # it may have ended between the two looks
    if status != 0:
        raise build.failure(status)
