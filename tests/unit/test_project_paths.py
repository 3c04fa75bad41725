"""One project, one lock: paths are cleaned as Atlantis cleans them, on every entry point.

Atlantis's ``models.NewProject`` runs Go's ``path.Clean`` on a project's path (and makes ``/``
into ``.``), so ``envs/net/``, ``./envs/net`` and ``envs/net`` are one project there. The
answers in :data:`GO_CLEAN` are Go's (``tests/integration/test_atlantis_models.py`` asks
Atlantis's own code for them). Locks stored before the service cleaned paths are moved to the
clean key when a store opens, on every backend, and are then found and released by it.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from tests.support.backends import BackendFactory
from tests.support.locks import lock_for, request_for

from enhanced_locking.backends.atlantis_redis import AtlantisRedisBackend
from enhanced_locking.factory import LockService
from enhanced_locking.migration.rekey import clean_stored_keys
from enhanced_locking.types import Lock, LockRequest, Project, clean_path

GO_CLEAN = {
    "envs/net": "envs/net", "envs/net/": "envs/net", "./envs/net": "envs/net",
    "./envs//net/./": "envs/net", "envs/x/../net": "envs/net", ".": ".", "./": ".",
    "/": ".", "//": ".", "/..": ".", "a/../..": "..", "../a": "../a", "a/../../b": "../b",
    "/envs/net/": "/envs/net", "/../envs": "/envs", "...": "...", "a/.../b/": "a/.../b",
    "..": "..", "../..": "../..", "a/b/../../..": "..",
}


@pytest.mark.parametrize(("raw", "clean"), GO_CLEAN.items())
def test_a_path_is_cleaned_as_go_cleans_it(raw: str, clean: str) -> None:
    assert clean_path(raw) == clean
    assert Project(repo_full_name="acme/infra", path=raw).path == clean


def test_every_spelling_of_a_directory_makes_one_key() -> None:
    keys = {request_for(path=path).key for path in ("envs/net/", "./envs/net", "envs/net")}
    assert keys == {"acme/infra/envs/net/default/prod"}


def test_an_api_request_is_cleaned_before_anything_else_sees_it() -> None:
    request = LockRequest.model_validate({
        "project": {"repoFullName": "acme/infra", "path": "./envs/net/"}, "pull": {"num": 1}})
    assert request.project.path == "envs/net"
    assert request.key == "acme/infra/envs/net/default/"


def test_an_empty_path_is_still_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match=r"project\.path"):
        LockRequest.model_validate({"project": {"repoFullName": "a/b", "path": ""},
                                    "pull": {"num": 1}})


async def test_two_pulls_cannot_hold_one_directory_under_two_spellings(
    service: LockService,
) -> None:
    first = await service.router.acquire(request_for(path="envs/net/", pull=1))
    second = await service.router.acquire(request_for(path="./envs/net", pull=2))
    again = await service.router.acquire(request_for(path="envs/net", pull=1))
    assert first.acquired and not second.acquired and again.acquired
    assert second.holder is not None and second.holder.pull.num == 1
    assert await service.router.release("acme/infra/envs/net/default/prod") is not None


def _stored_under(lock: Lock, key: str) -> Lock:
    """``lock`` as an older version stored it: under a key made from the path as given."""
    return lock.model_copy(update={"key": key})


OLD_KEY = "acme/infra/./envs/net//default/prod"
CLEAN_KEY = "acme/infra/envs/net/default/prod"


async def test_a_lock_stored_under_an_uncleaned_key_moves_to_the_clean_key(
    backend_factory: BackendFactory,
) -> None:
    backend = backend_factory()
    old = _stored_under(lock_for(request_for(path="./envs/net/", pull=7)), OLD_KEY)
    granted, held = await backend.acquire(old)
    assert granted and held.key == OLD_KEY

    report = await clean_stored_keys(backend)

    assert report.moved == [(OLD_KEY, CLEAN_KEY)] and report.conflicts == []
    assert await backend.get(OLD_KEY) is None
    moved = await backend.get(CLEAN_KEY)
    assert moved is not None and moved.pull.num == 7 and moved.project.path == "envs/net"
    assert moved.fencing_token >= held.fencing_token
    # The same project from another pull is refused; its own pull releases it by the clean key.
    refused, holder = await backend.acquire(lock_for(request_for(path="envs/net", pull=8)))
    assert not refused and holder.pull.num == 7
    assert await backend.release(CLEAN_KEY, owner=("acme/infra", 7)) is not None
    assert await backend.list() == []
    # A second run has nothing to do.
    assert (await clean_stored_keys(backend)).moved == []


async def test_the_clean_key_gets_a_token_above_both_old_counters(
    backend_factory: BackendFactory,
) -> None:
    backend = backend_factory()
    old = _stored_under(lock_for(request_for(path="./envs/net", pull=7)), OLD_KEY)
    for _ in range(3):  # the old key's counter climbs to 3
        await backend.acquire(old)
        await backend.release(OLD_KEY)
    await backend.acquire(old)
    await clean_stored_keys(backend)
    await backend.release(CLEAN_KEY)
    granted, lock = await backend.acquire(lock_for(request_for(path="envs/net", pull=9)))
    assert granted and lock.fencing_token > 4


async def test_a_clean_key_held_by_another_pull_leaves_both_where_they_are(
    backend_factory: BackendFactory,
) -> None:
    backend = backend_factory()
    await backend.acquire(_stored_under(lock_for(request_for(path="./envs/net", pull=7)),
                                        OLD_KEY))
    await backend.acquire(lock_for(request_for(path="envs/net", pull=8)))

    report = await clean_stored_keys(backend)

    assert report.moved == [] and report.conflicts == [(OLD_KEY, CLEAN_KEY)]
    held = {lock.key: lock.pull.num for lock in await backend.list()}
    assert held == {OLD_KEY: 7, CLEAN_KEY: 8}
    # The old one is still released by its pull (what Atlantis does when the pull closes).
    assert [lock.key for lock in await backend.release_by_pull("acme/infra", 7)] == [OLD_KEY]


@pytest.mark.redis
async def test_atlantiss_redis_layout_moves_an_uncleaned_key_too(redis_server: Any) -> None:
    from tests.support.redis_fixtures import redis_config

    backend = AtlantisRedisBackend.from_config(redis_config(redis_server), "legacy")
    try:
        old = _stored_under(lock_for(request_for(path="envs/net/", pull=7), backend="legacy"),
                            "acme/infra/envs/net//default/prod")
        await backend.acquire(old)
        report = await clean_stored_keys(backend)
        assert report.moved == [("acme/infra/envs/net//default/prod", CLEAN_KEY)]
        with redis_server.client() as admin:
            assert admin.keys("*") == [f"pr/{CLEAN_KEY}".encode()]
    finally:
        await backend.close()


async def test_a_service_opening_a_store_with_an_uncleaned_key_finds_and_releases_it(
    make_service: Any, store: Any,
) -> None:
    first: LockService = await make_service(enabled=True)
    planted = store(first, "enhanced")
    await planted.acquire(_stored_under(lock_for(request_for(path="./envs/net", pull=7)),
                                        OLD_KEY))
    await first.close()

    service: LockService = await make_service(enabled=True)

    found = await service.router.get(CLEAN_KEY)
    assert found is not None and found.pull.num == 7
    refused = await service.router.acquire(request_for(path="envs/net/", pull=8))
    assert not refused.acquired and refused.holder is not None
    released = await service.router.release(CLEAN_KEY, owner=("acme/infra", 7))
    assert released is not None and await service.router.list() == []
