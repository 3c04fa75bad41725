"""A waiter's entry in a queue (``"{seq:016}:{waiterId}"``) is formed and read by the scripts
(``lua/lib.lua``: ``queue_member``, ``member_waiter``, ``member_seq``) and by Python
(``RedisKeys.queue_member``, ``member_waiter``): the two must agree, or a waiter Python names
is not the one a script finds (a queue entry taken out by the wrong name stays behind, a
record looked up by a wrong id reads as gone and its waiter is dropped). Against a real
redis-server: the library's own functions run there.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from tests.support.locks import candidate_for, request_for

from enhanced_locking.backends import redis_scripts
from enhanced_locking.backends.redis_store import SEQ_DIGITS, RedisBackend, RedisKeys
from enhanced_locking.backends.waiting import QueuePolicy, Status, Wait

pytestmark = pytest.mark.redis

CASES = [(1, "a1b2c3"), (42, "w:with:colons"), (10 ** (SEQ_DIGITS - 1) + 7, "f" * 32)]


async def test_the_scripts_form_and_read_a_queue_entry_as_python_does(
    redis_backend: RedisBackend,
) -> None:
    client = redis_backend.connection.client
    for seq, waiter_id in CASES:
        member = RedisKeys.queue_member(seq, waiter_id)
        assert RedisKeys.member_waiter(member) == waiter_id
        # The library as a Redis older than 7.0 runs it (EVAL: redis_scripts.script; the
        # library's own ARGV is a local), then its functions.
        answer = await client.eval(
            "local given = ARGV\n" + redis_scripts.LIBRARY
            + "return cjson.encode({queue_member(tonumber(given[1]), given[2]), "
            "member_waiter(given[3]), int(member_seq(given[3]))})", 0, str(seq), waiter_id, member)
        formed, read_id, read_seq = json.loads(answer)
        assert formed == member, "lua/lib.lua forms a queue entry unlike RedisKeys"
        assert read_id == waiter_id, "lua/lib.lua reads a waiter id unlike RedisKeys"
        assert read_seq == str(seq)  # (as exact text: cjson writes 14 digits of a number)


async def test_a_waiter_the_scripts_queue_is_found_where_python_names_it(
    redis_backend: RedisBackend,
) -> None:
    backend, policy = redis_backend, QueuePolicy()
    held = candidate_for(request_for(path="members", project="members", pull=1))
    assert (await backend.acquire_batch((held,), ttl=None, wait=None, policy=policy)
            ).status is Status.GRANTED
    waiting = candidate_for(request_for(path="members", project="members", pull=2))
    queued = await backend.acquire_batch(
        (waiting,), ttl=None, wait=Wait(id="members-waiter", timeout=timedelta(seconds=60)),
        policy=policy)
    assert queued.status is Status.QUEUED and queued.waiter is not None, queued
    client = backend.connection.client
    name = backend.keys.queue(waiting.key, 1)  # normal priority
    assert await client.zrange(name, 0, -1) == [
        RedisKeys.queue_member(queued.waiter.seq, "members-waiter")]
    assert [w.id for w in await backend.queue(waiting.key, policy=policy)] == ["members-waiter"]
