"""A replica of this release and one of the previous release on one Redis (a rolling upgrade).

The previous release's Redis store runs from the repository's history
(:mod:`tests.support.previous_release`), beside this release's. Each grants and releases the
other's locks, and each releases, by its lean release, a lock of its own grant that the other
released and granted again to the same pull meanwhile: a replica of this release names the
lock it believes stored by its token and grant time, one of the previous release by its JSON,
and each is answered the lock stored, not the one it granted.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
from tests.support.locks import lock_for, request_for
from tests.support.previous_release import PreviousReplica, previous_release_tree
from tests.support.redis_server import RedisServer

from enhanced_locking.backends.redis_store import RedisBackend, RedisKeys

pytestmark = pytest.mark.redis

REPO, PATH, PULL = "acme/infra", "envs/prod", 7


@pytest.fixture
async def previous(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[PreviousReplica]:
    replica = await PreviousReplica.start(previous_release_tree(tmp_path), redis_server.addr,
                                          "enhanced")
    yield replica
    await replica.stop()


def _kept(admin: redis.Redis, keys: RedisKeys) -> list[Any]:
    """The answers kept under call ids since the last look (then cleared)."""
    names = admin.keys(keys.base + "op:*")
    answers = [json.loads(admin.get(name) or b"null") for name in names]
    if names:
        admin.delete(*names)
    return answers


async def test_each_release_releases_the_others_locks_and_is_answered_the_lock_stored(
    redis_backend: RedisBackend, previous: PreviousReplica, redis_server: RedisServer,
) -> None:
    current = redis_backend  # this release's replica
    keys = current.keys
    with redis_server.client() as admin:
        # The previous release grants; this one releases (it never saw the lock: answered
        # with the data stored) and grants again, to the same pull for another user.
        alice = await previous.acquire(REPO, PATH, PULL, "alice")
        assert alice["granted"] and alice["user"] == "alice"
        key = alice["key"]
        released = await current.release(key, owner=(REPO, PULL))
        assert released is not None and released.user.username == "alice"
        assert released.fencing_token == alice["token"]
        granted, bob = await current.acquire(lock_for(request_for(
            repo=REPO, path=PATH, project=PATH, pull=PULL, user="bob")))
        assert granted and bob.fencing_token > alice["token"]
        _kept(admin, keys)
        # The previous release releases alice's lock, as it believes: the lock stored is bob's,
        # and so is its answer.
        assert await previous.release(key, REPO, PULL) == {
            "key": key, "token": bob.fencing_token, "user": "bob"}
        [dropped] = _kept(admin, keys)
        assert dropped[0] == "dropped" and "bob" in dropped[1]
        # The previous release grants again; this one releases bob's lock, as it believes
        # (named by its token and grant time): the lock stored is carol's, answered with its
        # data.
        carol = await previous.acquire(REPO, PATH, PULL, "carol")
        assert carol["granted"] and carol["token"] > bob.fencing_token
        _kept(admin, keys)
        released = await current.release(key, owner=(REPO, PULL))
        assert released is not None and released.user.username == "carol"
        assert released.fencing_token == carol["token"]
        [dropped] = _kept(admin, keys)
        assert dropped[0] == "dropped" and "carol" in dropped[1]
        # Each releases its own grant: answered without the data it has (false).
        granted, dave = await current.acquire(lock_for(request_for(
            repo=REPO, path=PATH, project=PATH, pull=PULL, user="dave")))
        assert granted
        _kept(admin, keys)
        assert await current.release(key, owner=(REPO, PULL)) == dave
        [dropped] = _kept(admin, keys)
        assert dropped[:2] == ["dropped", False]
        erin = await previous.acquire(REPO, PATH, PULL, "erin")
        assert erin["granted"]
        _kept(admin, keys)
        assert await previous.release(key, REPO, PULL) == {
            "key": key, "token": erin["token"], "user": "erin"}
        [dropped] = _kept(admin, keys)
        assert dropped[:2] == ["dropped", False]
        assert not admin.exists(keys.lock(key))
        assert not admin.sismember(keys.held, key)
        assert not admin.sismember(keys.pull(REPO, PULL), key)
