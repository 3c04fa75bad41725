"""The identity of a lock is its parts: two projects that join to one key never share a lock.

Repository ``gl/grp`` with path ``sub/proj`` and repository ``gl/grp/sub`` with path ``proj``
both make the key ``gl/grp/sub/proj/default/`` (GitLab subgroups make this real). Atlantis's
layout keeps one lock per joined key, so the second project is refused with a ``collision``
naming both, on every side and every store (legacy and enhanced; memory, SQLite, Redis,
Atlantis's Redis layout and etcd), and never granted or released across repositories.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from tests.support.locks import request_for

from enhanced_locking.api.app import create_app
from enhanced_locking.factory import LockService
from enhanced_locking.types import BatchItem, BatchLockRequest, LockRequest, Project, Pull, Reason

KEY = "gl/grp/sub/proj/default/"


def first(pull: int = 5, **changes: Any) -> LockRequest:
    return request_for(repo="gl/grp", path="sub/proj", project="", pull=pull, **changes)


def second(pull: int = 5, **changes: Any) -> LockRequest:
    return request_for(repo="gl/grp/sub", path="proj", project="", pull=pull, **changes)


def _redis(request: pytest.FixtureRequest) -> dict[str, Any]:
    server = request.getfixturevalue("redis_server")
    return {"backend": "redis", "legacy_backend": "redis", "redis_addr": server.addr}


def _etcd(request: pytest.FixtureRequest) -> dict[str, Any]:
    cluster = request.getfixturevalue("etcd_cluster")
    return {"backend": "etcd", "legacy_backend": "etcd", "etcd_endpoints": cluster.endpoints,
            "etcd_key_prefix": request.getfixturevalue("etcd_prefix")}


STORES: dict[str, Callable[[pytest.FixtureRequest], dict[str, Any]]] = {
    "memory": lambda request: {"backend": "memory", "legacy_backend": "memory"},
    "boltdb": lambda request: {"backend": "boltdb", "legacy_backend": "boltdb"},
    "redis": _redis,
    "etcd": _etcd,
}
MARKS = {"redis": (pytest.mark.redis,), "etcd": (pytest.mark.etcd,)}
SIDES = {"legacy": {"enabled": False}, "enhanced": {"enabled": True}}


@pytest.fixture(params=[
    pytest.param((store, side), id=f"{store}-{side}",
                 marks=MARKS.get(store, ()))
    for store in STORES for side in SIDES
])
async def service(request: pytest.FixtureRequest, make_service: Any) -> LockService:
    """A service on each store, its locks on the legacy side (on Redis: Atlantis's layout) or
    the enhanced side."""
    store, side = request.param
    started: LockService = await make_service(**STORES[store](request), **SIDES[side])
    return started


def test_the_two_projects_join_to_one_key() -> None:
    assert first().key == second().key == KEY


def test_a_request_makes_its_key_once_and_a_copy_makes_its_own() -> None:
    request = first()
    assert request.key == KEY
    assert request.key is request.key  # made once, kept
    assert request == first() and hash(request) == hash(first())  # not a field: not compared
    assert "key" not in request.model_dump() and "key" not in request.model_dump_json()
    moved = request.model_copy(update={"workspace": "staging"})
    assert moved.key == "gl/grp/sub/proj/staging/"
    assert request.key == KEY


@pytest.mark.parametrize("pull", [5, 6], ids=["same-pull-number", "other-pull-number"])
async def test_a_second_project_under_the_same_key_is_refused_naming_the_collision(
    service: LockService, pull: int
) -> None:
    held = await service.router.acquire(first(pull=5))
    refused = await service.router.acquire(second(pull=pull))

    assert held.acquired
    assert not refused.acquired and refused.reason is Reason.COLLISION
    assert refused.holder is not None and refused.holder.project.repo_full_name == "gl/grp"
    assert refused.error is not None
    assert "gl/grp/sub" in refused.error and "sub/proj" in refused.error
    assert "ambiguous" in refused.error
    # The first project's lock is untouched; its own pull still gets it back.
    again = await service.router.acquire(first(pull=5))
    assert again.acquired and again.lock == held.lock


async def test_a_waiting_request_is_refused_at_once_not_queued_behind_a_name(
    service: LockService,
) -> None:
    from datetime import timedelta

    await service.router.acquire(first())
    refused = await service.router.acquire(second(pull=6, wait=timedelta(seconds=30)))
    assert refused.reason is Reason.COLLISION and refused.queue_position is None


async def test_a_batch_with_a_colliding_project_gets_nothing(service: LockService) -> None:
    await service.router.acquire(first())
    other = second(pull=6)
    batch = BatchLockRequest(
        locks=[BatchItem(project=Project(repo_full_name="gl/grp/sub", path="a")),
               BatchItem(project=other.project)],
        pull=Pull(num=6))
    result = await service.router.acquire_batch(batch)
    assert not result.acquired and result.reason is Reason.COLLISION
    assert result.lock_key == KEY and result.error is not None
    assert [lock.key for lock in await service.router.list()] == [KEY]


async def test_the_other_repository_cannot_release_it(service: LockService) -> None:
    await service.router.acquire(first(pull=5))
    app = create_app(service, manage_lifecycle=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
        answer = await http.delete("/v1/locks/by-key",
                                   params={"key": KEY, "pull": 5, "repo": "gl/grp/sub"})
        assert answer.status_code == 409
        body = answer.json()
        assert body["reason"] == "collision" and body["holder"]["project"]["repoFullName"] == (
            "gl/grp")
        assert "gl/grp/sub" in body["error"]
        # By pull, only the pull's own repository's locks go.
        gone = await http.delete("/v1/locks/by-pull", params={"repo": "gl/grp/sub", "pull": 5})
        assert gone.json() == {"released": [], "cancelled": []}
        assert [lock.key for lock in await service.router.list()] == [KEY]
        # Its own repository releases it.
        mine = await http.delete("/v1/locks/by-key",
                                 params={"key": KEY, "pull": 5, "repo": "gl/grp"})
        assert mine.status_code == 200 and await service.router.list() == []


async def test_after_the_first_is_released_the_second_project_gets_the_key(
    service: LockService,
) -> None:
    await service.router.acquire(first())
    await service.router.release(KEY, owner=("gl/grp", 5))
    granted = await service.router.acquire(second())
    assert granted.acquired and granted.lock is not None
    assert granted.lock.project.repo_full_name == "gl/grp/sub"
