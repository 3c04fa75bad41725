"""Locks as Atlantis stores them: JSON with Atlantis's Go field names.

Atlantis (``models.ProjectLock``) writes ``Project``, ``Workspace``, ``Pull``, ``User`` and
``Time``. We write the same fields, so Atlantis can read our locks and we can read its, and put
our additions (priority, expiry, fencing token, side) under ``Enhanced``, which Go's decoder
ignores. Credentials never reach the store: clone URLs lose their ``user:token@``.
"""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime
from typing import Any

from enhanced_locking.types import Lock, Priority, Project, Pull, User, strip_credentials

__all__ = ["atlantis_dict", "decode", "encode", "from_atlantis_dict"]

_PULL_STATES = {"open": 0, "closed": 1}


def _go_time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_time(value: str) -> datetime:
    text = value.replace("Z", "+00:00")
    # Go writes nanoseconds; Python keeps microseconds.
    if "." in text:
        head, _, tail = text.partition(".")
        # Only the fraction's digits: the zone after it (``+02:00``) has digits too.
        digits = "".join(itertools.takewhile(str.isdigit, tail))
        zone = tail[len(digits):]
        text = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    parsed = datetime.fromisoformat(text)
    # Go keeps the writer's zone; we answer in UTC (the API promises RFC 3339 UTC).
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def atlantis_dict(lock: Lock) -> dict[str, Any]:
    """The lock as Atlantis's ``ProjectLock`` JSON object (plus our ``Enhanced`` part)."""
    repo = lock.project.repo_full_name
    owner, _, name = repo.partition("/")
    return {
        "Project": {
            "ProjectName": lock.project.project_name,
            "RepoFullName": repo,
            "Path": lock.project.path,
        },
        "Workspace": lock.workspace,
        "Pull": {
            "Num": lock.pull.num,
            "HeadCommit": lock.pull.head_commit,
            "URL": strip_credentials(lock.pull.url),
            "HeadBranch": lock.pull.head_branch,
            "BaseBranch": lock.pull.base_branch,
            "Author": lock.pull.author,
            "State": _PULL_STATES[lock.pull.state],
            "BaseRepo": {"FullName": repo, "Owner": owner, "Name": name},
        },
        "User": {"Username": lock.user.username},
        "Time": _go_time(lock.acquired_at),
        "Enhanced": {
            "Priority": lock.priority.value,
            "ExpiresAt": _go_time(lock.expires_at) if lock.expires_at else None,
            "FencingToken": lock.fencing_token,
            "Backend": lock.backend,
            "Teams": list(lock.user.teams),
        },
    }


def from_atlantis_dict(data: dict[str, Any], *, key: str | None = None) -> Lock:
    """Read Atlantis's JSON (written by Atlantis itself or by us)."""
    project = data.get("Project") or {}
    pull = data.get("Pull") or {}
    user = data.get("User") or {}
    extra = data.get("Enhanced") or {}
    lock_project = Project(
        repo_full_name=project.get("RepoFullName", ""),
        path=project.get("Path") or ".",
        project_name=project.get("ProjectName", ""),
    )
    workspace = data.get("Workspace") or "default"
    expires = extra.get("ExpiresAt")
    return Lock(
        key=key or f"{lock_project.repo_full_name}/{lock_project.path}/{workspace}/"
        f"{lock_project.project_name}",
        project=lock_project,
        workspace=workspace,
        pull=Pull(
            num=int(pull.get("Num", 0)),
            url=pull.get("URL", ""),
            author=pull.get("Author", ""),
            head_branch=pull.get("HeadBranch", ""),
            base_branch=pull.get("BaseBranch", ""),
            head_commit=pull.get("HeadCommit", ""),
            state="closed" if pull.get("State") == 1 else "open",
        ),
        user=User(username=user.get("Username", ""),
                  teams=extra.get("Teams") or user.get("Teams") or []),
        priority=Priority(extra.get("Priority", "normal")),
        acquired_at=_parse_time(data["Time"]) if data.get("Time") else datetime.now(UTC),
        expires_at=_parse_time(expires) if expires else None,
        fencing_token=int(extra.get("FencingToken", 0)),
        backend=extra.get("Backend", "legacy"),
    )


def encode(lock: Lock) -> str:
    return json.dumps(atlantis_dict(lock), separators=(",", ":"))


def decode(text: str | bytes, *, key: str | None = None) -> Lock:
    return from_atlantis_dict(json.loads(text), key=key)
