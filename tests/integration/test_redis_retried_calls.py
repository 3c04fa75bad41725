"""A call made again under its call id (its connection broke after the script ran) is answered
what it was answered the first time, from the answer kept under that id, and changes nothing.

Two calls are given one call id here, so that the second is taken for a retry of the first.
The server is one of the test's own: the suite's fixtures watch every script call
(``tests/support/key_watch.py``), and a call id used twice is what that watch reports.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.support.locks import lock_for, request_for
from tests.support.redis_fixtures import redis_config
from tests.support.redis_server import RedisServer

from enhanced_locking.backends.redis_store import RedisBackend

pytestmark = pytest.mark.redis

KEY = "acme/infra/envs/prod/default/prod"


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[RedisBackend]:
    with RedisServer(tmp_path) as server:
        backend = RedisBackend.from_config(redis_config(server), "enhanced")
        await backend.ping()
        yield backend
        await backend.close()


def _call_id(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    # The backend's call ids come from secrets.token_hex (RedisBackend._run).
    monkeypatch.setattr(secrets, "token_hex", lambda _: value)


async def test_a_retried_grant_refusal_and_release_answer_as_they_did(
    backend: RedisBackend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A retry is the same call: the same arguments under the same call id.
    _call_id(monkeypatch, "00000000000000a1")  # a grant (the lean path)
    candidate = lock_for(request_for(pull=1))
    granted, first = await backend.acquire(candidate)
    assert granted
    granted, again = await backend.acquire(candidate)
    assert granted and again == first

    _call_id(monkeypatch, "00000000000000a2")  # a refusal, with the holder (the full path)
    candidate = lock_for(request_for(pull=3))
    granted, holder = await backend.acquire(candidate)
    assert not granted and holder == first
    granted, holder = await backend.acquire(candidate)
    assert not granted and holder == first

    _call_id(monkeypatch, "00000000000000a3")  # a force-unlock (the full path)
    released = await backend.release(KEY)
    assert released == first
    assert (await backend.release(KEY)) == first  # answered again, not released again

    _call_id(monkeypatch, "00000000000000a4")  # a grant, then its release (the lean path)
    granted, second = await backend.acquire(lock_for(request_for(pull=4)))  # a new call
    assert granted and second.fencing_token == first.fencing_token + 1
    _call_id(monkeypatch, "00000000000000a5")
    assert (await backend.release(KEY, owner=("acme/infra", 4))) == second
    assert (await backend.release(KEY, owner=("acme/infra", 4))) == second
    monkeypatch.undo()
    assert (await backend.get(KEY)) is None
    granted, third = await backend.acquire(lock_for(request_for(pull=5)))
    assert granted and third.fencing_token == second.fencing_token + 1
