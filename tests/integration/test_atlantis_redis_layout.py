"""The legacy locker on Redis, in Atlantis's own layout, sharing locks with an Atlantis.

An Atlantis started with ``--locking-db-type=redis`` keeps ``pr/{lockKey}`` → the JSON of
``models.ProjectLock``, without expiry. :data:`ATLANTIS_LOCK` is such a value as Go's
``json.Marshal`` writes it (struct field order, nanosecond time with an offset, the clone URL
with its token, ``null`` for a nil slice).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from tests.support.locks import lock_for, request_for
from tests.support.redis_fixtures import redis_config
from tests.support.redis_server import RedisServer

from enhanced_locking.backends import codec
from enhanced_locking.backends.atlantis_redis import AtlantisRedisBackend
from enhanced_locking.factory import LockService
from enhanced_locking.provider import ConfigProvider
from enhanced_locking.types import (
    LockingError,
    LockNotOwned,
    LockUnreadable,
    Project,
    Pull,
    User,
)

pytestmark = pytest.mark.redis

KEY = "acme/infra/envs/prod/default/prod"
ATLANTIS_LOCK = (
    '{"Project":{"ProjectName":"prod","RepoFullName":"acme/infra","Path":"envs/prod"},'
    '"Pull":{"Num":12,"HeadCommit":"4f1c2d","URL":"https://github.com/acme/infra/pull/12",'
    '"HeadBranch":"feature","BaseBranch":"main","Author":"alice","State":0,'
    '"BaseRepo":{"FullName":"acme/infra","Owner":"acme","Name":"infra",'
    '"CloneURL":"https://atlantis-bot:ghp_tok3n@github.com/acme/infra.git",'
    '"SanitizedCloneURL":"https://atlantis-bot:<redacted>@github.com/acme/infra.git",'
    '"VCSHost":{"Hostname":"github.com","Type":0}}},'
    '"User":{"Username":"alice","Teams":null},"Workspace":"default",'
    '"Time":"2024-05-01T10:20:30.123456789+02:00"}'
)


@pytest.fixture
async def legacy(redis_server: RedisServer) -> AsyncIterator[AtlantisRedisBackend]:
    backend = AtlantisRedisBackend.from_config(redis_config(redis_server), "legacy")
    yield backend
    await backend.close()


async def test_our_lock_is_atlantis_json_at_its_key_without_expiry(
    legacy: AtlantisRedisBackend, redis_server: RedisServer
) -> None:
    granted, lock = await legacy.acquire(lock_for(request_for(pull=3), backend="legacy"))
    assert granted and lock.backend == "legacy"
    with redis_server.client() as admin:
        assert admin.keys("*") == [f"pr/{KEY}".encode()]
        assert admin.ttl(f"pr/{KEY}") == -1
        stored = json.loads(admin.get(f"pr/{KEY}"))
    assert stored["Project"] == {"ProjectName": "prod", "RepoFullName": "acme/infra",
                                 "Path": "envs/prod"}
    assert stored["Pull"]["Num"] == 3 and stored["Pull"]["BaseRepo"]["FullName"] == "acme/infra"
    assert stored["Pull"]["BaseRepo"]["VCSHost"] == {"Hostname": "git.example", "Type": 0}
    assert stored["User"] == {"Username": "alice", "Teams": []}
    assert stored["Workspace"] == "default"
    assert datetime.fromisoformat(stored["Time"].replace("Z", "+00:00")).tzinfo is not None


async def test_a_lock_atlantis_wrote_is_respected_and_read_without_its_token(
    legacy: AtlantisRedisBackend, redis_server: RedisServer
) -> None:
    with redis_server.client() as admin:
        admin.set(f"pr/{KEY}", ATLANTIS_LOCK)
    granted, holder = await legacy.acquire(lock_for(request_for(pull=13), backend="legacy"))
    assert not granted
    assert holder.pull.num == 12 and holder.user.username == "alice"
    assert holder.acquired_at == datetime(2024, 5, 1, 8, 20, 30, 123456, tzinfo=UTC)
    assert "ghp_tok3n" not in holder.model_dump_json()
    assert holder.pull.sanitized_clone_url == "https://github.com/acme/infra.git"
    same, again = await legacy.acquire(lock_for(request_for(pull=12), backend="legacy"))
    assert same and again == holder  # Atlantis's rule: the holder's pull gets it back
    assert [lock.key for lock in await legacy.list(repo="acme/infra", pull=12)] == [KEY]
    with pytest.raises(LockNotOwned):
        await legacy.release(KEY, owner=("acme/infra", 13))
    released = await legacy.release(KEY, owner=("acme/infra", 12))
    assert released is not None and released.pull.num == 12
    with redis_server.client() as admin:
        assert admin.exists(f"pr/{KEY}") == 0


async def test_a_lock_atlantis_wrote_for_a_run_without_a_pull_is_read_and_released_by_pull(
    legacy: AtlantisRedisBackend, redis_server: RedisServer
) -> None:
    # Atlantis's /api/plan, /api/apply and drift runs number their "pull" below zero.
    with redis_server.client() as admin:
        admin.set(f"pr/{KEY}", ATLANTIS_LOCK.replace('"Num":12', '"Num":-536870977'))
    listed = await legacy.list(repo="acme/infra", pull=-536870977)
    assert [(lock.key, lock.pull.num) for lock in listed] == [(KEY, -536870977)]
    assert await legacy.release_by_pull("acme/infra", 536870977) == []
    released = await legacy.release_by_pull("acme/infra", -536870977)
    assert [lock.pull.num for lock in released] == [-536870977]
    with redis_server.client() as admin:
        assert admin.exists(f"pr/{KEY}") == 0


async def test_concurrent_try_locks_from_two_replicas_grant_once(
    redis_server: RedisServer,
) -> None:
    config = redis_config(redis_server)
    replicas = [AtlantisRedisBackend.from_config(config, "legacy") for _ in range(2)]
    try:
        for round_ in range(20):
            answers = await asyncio.gather(*(
                replicas[n % 2].acquire(
                    lock_for(request_for(pull=n + 1, path=f"r{round_}"), backend="legacy"))
                for n in range(50)
            ))
            assert len({lock.pull.num for granted, lock in answers if granted}) == 1
    finally:
        for replica in replicas:
            await replica.close()


async def test_unlock_by_pull_touches_only_that_pull_of_that_repository(
    legacy: AtlantisRedisBackend,
) -> None:
    for repo, pull, path in [("acme/infra", 1, "a"), ("acme/infra", 1, "b"),
                             ("acme/infra", 2, "c"), ("acme/infra2", 1, "a"),
                             ("acme/in*fra", 1, "a")]:
        granted, _ = await legacy.acquire(
            lock_for(request_for(repo=repo, pull=pull, path=path), backend="legacy"))
        assert granted
    released = await legacy.release_by_pull("acme/infra", 1)
    assert sorted(lock.project.path for lock in released) == ["a", "b"]
    left = {(lock.project.repo_full_name, lock.pull.num) for lock in await legacy.list()}
    assert left == {("acme/infra", 2), ("acme/infra2", 1), ("acme/in*fra", 1)}
    assert [lock.project.repo_full_name for lock in await legacy.list(repo="acme/in*fra")] == [
        "acme/in*fra"]


async def test_a_value_that_is_not_a_lock_is_reported_with_its_key(
    legacy: AtlantisRedisBackend, redis_server: RedisServer
) -> None:
    with redis_server.client() as admin:
        admin.set(f"pr/{KEY}", "not json")
    with pytest.raises(LockingError, match=f"pr/{KEY}"):
        await legacy.get(KEY)
    with pytest.raises(LockingError, match="cannot read"):
        await legacy.release(KEY, owner=("acme/infra", 1))
    with redis_server.client() as admin:
        assert admin.get(f"pr/{KEY}") == b"not json"  # never deleted on a guess


@pytest.mark.parametrize(("stored", "pull", "answer"), [
    ('{"Project":5,"Pull":{"Num":1}}', 1, "cannot read"),
    ('{"Project":{"RepoFullName":"acme/infra"},"Pull":7}', 1, "cannot read"),
    ('{"Project":null,"Pull":{"Num":1}}', 1, "cannot read"),
    ('{"Project":{"RepoFullName":"acme/infra"},"Pull":{"Num":null}}', 1, "cannot read"),
    ('{"Project":{"RepoFullName":"acme/infra"},"Pull":{"Num":null}}', 0, "cannot read"),
    ('{"Project":{"RepoFullName":"acme/infra"},"Pull":null}', 1, "held by pull #0 of acme"),
    ('{"Project":{"RepoFullName":"acme/infra"},"Pull":null}', 0, None),
])
async def test_a_release_by_owner_reads_an_odd_json_object_as_the_codec_does(
    legacy: AtlantisRedisBackend, redis_server: RedisServer, stored: str, pull: int,
    answer: str | None,
) -> None:
    # The release by owner is one script (release_if_owned.lua); a JSON object whose Project
    # or Pull was null or not an object failed it with a Lua error (a 500). It is read as the
    # codec reads it (null or missing: empty; a Pull without Num: pull 0; a Num that is null:
    # not a lock, where cjson's null read as another pull's): not a lock (409 unreadable),
    # another owner's (kept), or the owner's own (released).
    with redis_server.client() as admin:
        admin.set(f"pr/{KEY}", stored)
    if answer is None:
        assert await legacy.release(KEY, owner=("acme/infra", pull)) is not None
        kept = None
    else:
        with pytest.raises(LockingError, match=answer):
            await legacy.release(KEY, owner=("acme/infra", pull))
        kept = stored.encode()
    with redis_server.client() as admin:
        assert admin.get(f"pr/{KEY}") == kept


@pytest.mark.parametrize("pull", [0, 1])
async def test_the_release_script_reads_a_null_pull_number_as_not_a_lock(
    legacy: AtlantisRedisBackend, redis_server: RedisServer, pull: int,
) -> None:
    # cjson decodes a JSON null to cjson.null, which Lua holds truthy: a Num of null was read
    # as another pull's number (2, kept by another), where the codec cannot read the value at
    # all. The script answers 3 (not a lock we can read), as the codec does.
    stored = '{"Project":{"RepoFullName":"acme/infra"},"Pull":{"Num":null}}'
    with redis_server.client() as admin:
        admin.set(f"pr/{KEY}", stored)
    answer = await legacy._release_if_owned(keys=[f"pr/{KEY}"], args=["acme/infra", pull])
    assert [int(answer[0]), answer[1]] == [3, stored]
    with pytest.raises(LockUnreadable):
        codec.read(stored, key=KEY, side="legacy")
    with redis_server.client() as admin:
        assert admin.get(f"pr/{KEY}") == stored.encode()


async def test_the_legacy_locker_uses_the_atlantis_layout_when_configured(
    redis_server: RedisServer,
) -> None:
    service = LockService(ConfigProvider(redis_config(redis_server, legacy_backend="redis")))
    await service.start()
    try:
        response = await service.router.try_lock(
            Project(repo_full_name="acme/infra", path="envs/prod", project_name="prod"),
            "default", Pull(num=5), User(username="bob"))
        assert response.lock_acquired and response.lock_key == KEY
        with redis_server.client() as admin:
            assert json.loads(admin.get(f"pr/{KEY}"))["Pull"]["Num"] == 5
        assert (await service.router.unlock(KEY)) is not None
    finally:
        await service.close()
