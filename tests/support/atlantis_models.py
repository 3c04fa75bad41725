"""Atlantis's own model code, asked from the tests: how it cleans a path, what it reads of a lock.

``tests/atlantis_models`` is a Go program on ``github.com/runatlantis/atlantis`` v0.47.1 (from
the Go module proxy): it runs ``models.NewProject`` on paths and decodes stored lock JSON into
``models.ProjectLock``, reporting what Atlantis then sees (its pull-status key, the VCS type,
the teams), and parses server-side repo config files with Atlantis's own parser. The
service's key, codec and examples are checked against it, never against themselves.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import gobuild

__all__ = ["AtlantisModels", "atlantis_source", "build_models"]

PROGRAM = Path(__file__).resolve().parents[1] / "atlantis_models"
GO_MISSING = (
    "go is not installed: these tests build tests/atlantis_models (Atlantis v0.47.1's models "
    "from the Go module proxy) with Go 1.26.5 or newer; install Go and put `go` on PATH"
)


@dataclass(frozen=True)
class AtlantisModels:
    """The compiled program: ``clean(paths)`` and ``read_locks(jsons)``."""

    binary: Path

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        result = subprocess.run([str(self.binary)], input=json.dumps(request),
                                capture_output=True, text=True, check=False, timeout=120)
        if result.returncode != 0:
            raise gobuild.GoBuildError(f"atlantismodels failed: {result.stderr.strip()}")
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer

    def clean(self, paths: list[str]) -> list[str]:
        """``models.NewProject(repo, path, "").Path`` for each path."""
        cleaned: list[str] = self._ask({"paths": paths})["paths"]
        return cleaned

    def repo_config(self, path: Path) -> dict[str, Any]:
        """What Atlantis's ``config.ParserValidator`` makes of a server-side repo config file:
        ``{"repos": [{"id", "repoLocks", "workflow", "stages": {"plan": [...]}}],
        "defaultStages": {"plan": [...]}}`` (Atlantis's own stages) or ``{"error": ...}``."""
        parsed: dict[str, Any] = self._ask({"repoConfig": str(path)})["repoConfig"]
        return parsed

    def read_locks(self, stored: list[str]) -> list[dict[str, Any]]:
        """What Atlantis reads from each stored lock JSON (see ``main.go`` for the fields)."""
        views: list[dict[str, Any]] = self._ask({"locks": stored})["locks"]
        return views


def build_models() -> AtlantisModels:
    return AtlantisModels(gobuild.build(PROGRAM, "atlantismodels", missing=GO_MISSING))


def atlantis_source() -> Path:
    """Atlantis v0.47.1's source from the Go module proxy (``go mod download``, cached by Go).

    Its test data holds webhook payloads that GitHub and GitLab really sent, which the webhook
    tests replay.
    """
    go = shutil.which("go")
    if go is None:
        raise gobuild.GoBuildError(GO_MISSING)
    result = subprocess.run([go, "mod", "download", "-json", "github.com/runatlantis/atlantis"],
                            cwd=PROGRAM, capture_output=True, text=True, check=False,
                            timeout=600)
    if result.returncode != 0:
        raise gobuild.GoBuildError(f"go mod download of Atlantis failed:\n{result.stderr[-2000:]}"
                                   f"{result.stdout[-2000:]}")
    return Path(json.loads(result.stdout)["Dir"])
