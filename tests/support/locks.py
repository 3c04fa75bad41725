"""Small builders of lock requests and locks, so tests read as the behaviour they check.

``request_for`` and ``lock_for`` build the models, ``candidate_for`` what a queue backend is
asked to grant; ``lock_body`` the JSON body of ``POST /v1/locks`` that tests of a running
service send.
"""

from __future__ import annotations

from datetime import timedelta
from types import EllipsisType
from typing import Any

from enhanced_locking.types import (
    Candidate,
    Lock,
    LockRequest,
    Priority,
    Project,
    Pull,
    User,
    utcnow,
)

__all__ = ["candidate_for", "lock_body", "lock_for", "request_for"]


def request_for(
    *,
    repo: str = "acme/infra",
    path: str = "envs/prod",
    workspace: str = "default",
    project: str = "prod",
    pull: int = 1,
    user: str = "alice",
    priority: Priority = Priority.NORMAL,
    wait: timedelta | None = None,
    ttl: timedelta | None = None,
) -> LockRequest:
    """An acquire as Atlantis would send it for one project of one pull request."""
    return LockRequest(
        project=Project(repo_full_name=repo, path=path, project_name=project),
        workspace=workspace,
        pull=Pull(
            num=pull,
            url=f"https://git.example/{repo}/pull/{pull}",
            author=user,
            head_branch=f"feature-{pull}",
            base_branch="main",
        ),
        user=User(username=user),
        priority=priority,
        wait=wait,
        ttl=ttl,
    )


def lock_for(request: LockRequest, *, token: int = 0, backend: str = "enhanced") -> Lock:
    """The lock a backend would be asked to store for ``request`` (token assigned by it)."""
    assert backend in ("legacy", "enhanced")
    return Lock.for_request(
        request, now=utcnow(), token=token, backend="legacy" if backend == "legacy" else "enhanced"
    )


def candidate_for(request: LockRequest) -> Candidate:
    """What the enhanced locker hands a queue backend for ``request`` (its acquire)."""
    return Candidate.of_request(request, priority=request.priority)


def lock_body(repo: str, path: str, pull: Any, *, project: str | EllipsisType | None = ...,
              user: str | None = None, **extra: Any) -> dict[str, Any]:
    """The JSON of ``POST /v1/locks`` for ``path`` of ``repo`` and pull ``pull``.

    ``projectName`` is the path unless ``project`` names another (``None``: the body has
    none); a ``user`` only when given; ``extra`` fields (``wait``, ``ttl``, ...) as they are.
    """
    named: dict[str, Any] = {"repoFullName": repo, "path": path}
    if project is not None:
        named["projectName"] = path if project is ... else project
    body: dict[str, Any] = {"project": named, "pull": {"num": pull}}
    if user is not None:
        body["user"] = {"username": user}
    return {**body, **extra}
