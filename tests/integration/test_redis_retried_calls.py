"""A call made again under its call id (its connection broke after the script ran) is answered
what it was answered the first time, from the answer kept under that id, and changes nothing.

Two calls are given one call id here, so that the second is taken for a retry of the first.
The server is one of the test's own: the suite's fixtures watch every script call
(``tests/support/key_watch.py``), and a call id used twice is what that watch reports.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions as rexc
from tests.support.locks import lock_for, request_for
from tests.support.redis_fixtures import redis_config
from tests.support.redis_server import RedisServer

from enhanced_locking.backends import redis_scripts, redis_store
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
    # The backend's call ids come from redis_store._new_call_id (RedisBackend._run).
    monkeypatch.setattr(redis_store, "_new_call_id", lambda: value)


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



LEAN = {redis_scripts.FUNCTION_NAMES[name]: name for name in redis_scripts.LEAN}


async def test_a_lean_call_whose_answer_was_lost_is_sent_again_and_answered_as_it_was(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """The connection breaks after Redis ran a lean grant, and after it ran a lean release,
    before their answers were read, and another replica changes the key in between: each
    call is sent again under its call id and answered what it was the first time (by the
    lean function itself, from the answer kept under the id); nothing is done twice."""
    with RedisServer(tmp_path) as server:
        backend = RedisBackend.from_config(redis_config(server), "enhanced")
        other = RedisBackend.from_config(redis_config(server), "enhanced")
        try:
            await backend.ping()
            connection = backend.connection
            send, send_packed = connection.call, connection.call_packed
            sent: list[str] = []  # each lean call's script
            lost: set[str] = set()

            async def losing_the_first_answer(*args: Any) -> Any:
                answer = await send(*args)
                return await lose_the_first(str(args[1]), answer)

            async def losing_the_first_packed(packed: bytes) -> Any:
                # The lean calls come packed: *<n>, $5, FCALL, $<length>, the function, ...
                answer = await send_packed(packed)
                return await lose_the_first(packed.split(b"\r\n")[4].decode(), answer)

            async def lose_the_first(function: str, answer: Any) -> Any:
                if function in LEAN:
                    sent.append(LEAN[function])
                    if function not in lost:
                        lost.add(function)
                        # Before the call is sent again, another replica changes the key:
                        # a force-unlock of the lock just granted, a grant to the same pull
                        # of the key just released.
                        if LEAN[function] == "LEAN_ACQUIRE":
                            await other.release(KEY)
                        else:
                            assert (await other.acquire(lock_for(request_for(pull=1))))[0]
                        raise rexc.ConnectionError("connection lost before the answer was read")
                return answer

            monkeypatch.setattr(connection, "call", losing_the_first_answer)
            monkeypatch.setattr(connection, "call_packed", losing_the_first_packed)
            granted, first = await backend.acquire(lock_for(request_for(pull=1)))
            assert granted and first.fencing_token == 1
            assert await backend.get(KEY) is None  # the force-unlock stands: not granted again
            granted, second = await backend.acquire(lock_for(request_for(pull=1)))
            assert granted and second.fencing_token == 2
            assert await backend.release(KEY, owner=("acme/infra", 1)) == second
            third = await backend.get(KEY)  # the other replica's grant stands: not released
            assert third is not None and third.fencing_token == 3
            # Each resent call was answered by its lean function: none went to the full scripts.
            assert sent == ["LEAN_ACQUIRE", "LEAN_ACQUIRE", "LEAN_ACQUIRE", "LEAN_RELEASE",
                            "LEAN_RELEASE"]
            monkeypatch.undo()
            with server.client() as admin:
                assert admin.get(backend.keys.fence(KEY)) == b"3"  # three grants, no more
        finally:
            await other.close()
            await backend.close()
