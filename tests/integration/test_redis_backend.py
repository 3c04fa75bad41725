"""The Redis backend against a real redis-server: layout, server time, scripts, replicas.

The behaviours every backend shares run from the backend-generic tests (``backend_factory``
has a ``redis`` kind); these are the ones only Redis has.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import DataError
from tests.support.leases import Overrun, past, with_leases
from tests.support.locks import candidate_for, lock_for, request_for
from tests.support.redis_fixtures import redis_config
from tests.support.redis_server import RedisServer

from enhanced_locking.backends import redis_replies, redis_scripts
from enhanced_locking.backends.memory import MemoryBackend
from enhanced_locking.backends.redis_connection import HiredisConnection
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.backends.waiting import Notice, QueuePolicy, Status, Wait
from enhanced_locking.types import Candidate, LockNotHeld, LockNotOwned

pytestmark = pytest.mark.redis

KEY = "acme/infra/envs/prod/default/prod"


@pytest.fixture
async def backend(redis_server: RedisServer) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend.from_config(redis_config(redis_server), "enhanced")
    yield backend
    await backend.close()


async def test_a_grant_is_a_hash_of_atlantis_json_under_the_prefix_with_a_hash_tag(
    redis_server: RedisServer,
) -> None:
    backend = RedisBackend.from_config(
        redis_config(redis_server, redis_key_prefix="team-a:"), "enhanced")
    try:
        granted, lock = await backend.acquire(lock_for(request_for(pull=7)))
    finally:
        await backend.close()
    assert granted and lock.fencing_token == 1
    with redis_server.client() as admin:
        stored = admin.hgetall(f"team-a:enhanced:lock:{{{KEY}}}")
        names = admin.keys("*")
    data = json.loads(stored[b"data"])
    assert data["Project"] == {"ProjectName": "prod", "RepoFullName": "acme/infra",
                               "Path": "envs/prod"}
    assert data["Pull"]["Num"] == 7 and data["Workspace"] == "default"
    assert stored[b"token"] == b"1" and stored[b"repo"] == b"acme/infra"
    assert stored[b"pull"] == b"7"
    # Everything about one lock key hashes to one slot.
    assert key_slot(f"team-a:enhanced:lock:{{{KEY}}}".encode()) == key_slot(
        f"team-a:enhanced:fence:{{{KEY}}}".encode())
    assert all(name.startswith(b"team-a:") for name in names)


def server_ms(admin: redis.Redis) -> int:
    seconds, micros = admin.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_a_lease_ends_by_the_server_clock(
    backend: RedisBackend, redis_server: RedisServer
) -> None:
    lease = 300
    with redis_server.client() as admin:
        before = server_ms(admin)
        _, lock = await backend.acquire(lock_for(request_for(ttl=timedelta(milliseconds=lease))))
        after = server_ms(admin)
        collected_at = admin.pexpiretime(f"atlantis:enhanced:enhanced:lock:{{{KEY}}}")
    assert lock.expires_at is not None
    expires_ms = int(lock.expires_at.timestamp() * 1000)
    # Stamped by the server's clock during the call: the lease ends 300 ms after a moment
    # between the two readings of the server's TIME around it.
    assert before + lease <= expires_ms <= after + lease
    # Redis collects the hash a grace period later; the decision is made on the lease end.
    assert collected_at == expires_ms + redis_scripts.GRACE_MS
    await past(backend.now, lock.expires_at)
    assert await backend.get(KEY) is None
    again, relock = await backend.acquire(lock_for(request_for(pull=2)))
    assert again and relock.fencing_token == 2


async def test_refresh_restarts_the_lease_from_now_and_only_for_the_owner(
    backend: RedisBackend,
) -> None:
    async def case(lease: timedelta) -> None:
        _, lock = await backend.acquire(lock_for(request_for(pull=1, ttl=lease)))
        assert lock.expires_at is not None
        try:
            refreshed = await backend.refresh(KEY, ("acme/infra", 1), timedelta(seconds=30))
        except LockNotHeld:  # only if the lease had ended by then
            assert await backend.now() >= lock.expires_at, "refused while the lease was live"
            raise Overrun from None
        assert refreshed.expires_at is not None and refreshed.fencing_token == lock.fencing_token
        await past(backend.now, lock.expires_at)
        assert await backend.get(KEY) is not None

    await with_leases(case)
    with pytest.raises(LockNotOwned):
        await backend.refresh(KEY, ("acme/infra", 2), timedelta(seconds=30))
    await backend.release(KEY)
    with pytest.raises(LockNotHeld, match="not held"):
        await backend.refresh(KEY, ("acme/infra", 1), timedelta(seconds=30))


async def test_release_by_pull_spares_a_key_the_pull_lost_to_another(
    backend: RedisBackend,
) -> None:
    lease = timedelta(milliseconds=200)
    await backend.acquire(lock_for(request_for(pull=1, path="a", ttl=lease)))
    await backend.acquire(lock_for(request_for(pull=1, path="b")))
    await asyncio.sleep(0.3)  # pull 1 loses "a" to its lease; pull 2 takes it
    await backend.acquire(lock_for(request_for(pull=2, path="a")))
    released = await backend.release_by_pull("acme/infra", 1)
    assert [lock.project.path for lock in released] == ["b"]
    remaining = await backend.list()
    assert [(lock.project.path, lock.pull.num) for lock in remaining] == [("a", 2)]
    assert await backend.list(repo="acme/infra", pull=1) == []


async def test_list_filters_by_repository_and_pull(backend: RedisBackend) -> None:
    await backend.acquire(lock_for(request_for(repo="acme/infra", pull=1)))
    await backend.acquire(lock_for(request_for(repo="acme/infra", pull=2, path="x")))
    await backend.acquire(lock_for(request_for(repo="acme/infra2", pull=1)))
    assert len(await backend.list()) == 3
    assert {lock.pull.num for lock in await backend.list(repo="acme/infra")} == {1, 2}
    assert [lock.project.repo_full_name for lock in await backend.list(pull=1)] == [
        "acme/infra", "acme/infra2"]
    only = await backend.list(repo="acme/infra2", pull=1)
    assert [lock.project.repo_full_name for lock in only] == ["acme/infra2"]


def _libraries(admin: redis.Redis) -> dict[str, set[str]]:
    """The function libraries a Redis has: their names and their functions' names."""
    found: dict[str, set[str]] = {}
    for entry in admin.function_list():
        library = dict(zip(entry[::2], entry[1::2], strict=True))
        functions = [dict(zip(f[::2], f[1::2], strict=True)) for f in library[b"functions"]]
        found[library[b"library_name"].decode()] = {f[b"name"].decode() for f in functions}
    return found


async def test_scripts_are_loaded_again_after_the_server_forgets_them(
    backend: RedisBackend, redis_server: RedisServer
) -> None:
    await backend.acquire(lock_for(request_for(pull=1)))
    with redis_server.client() as admin:
        admin.function_flush()
        assert admin.function_list() == []
    granted, holder = await backend.acquire(lock_for(request_for(pull=2)))
    assert not granted and holder.pull.num == 1
    with redis_server.client() as admin:
        assert list(_libraries(admin)) == [redis_scripts.LIBRARY_NAME]


async def test_the_scripts_are_one_function_library_loaded_once_and_called_by_name(
    backend: RedisBackend, redis_server: RedisServer
) -> None:
    await backend.acquire(lock_for(request_for(pull=1)))
    with redis_server.client() as admin:
        admin.config_resetstat()
        names = _libraries(admin)[redis_scripts.LIBRARY_NAME]
    assert names == set(redis_scripts.FUNCTION_NAMES.values())
    await backend.release(KEY)
    await backend.acquire(lock_for(request_for(pull=2)))
    with redis_server.client() as admin:
        stats = admin.info("commandstats")
    # Two calls, neither of them a load nor a script sent again.
    assert stats["cmdstat_fcall"]["calls"] == 2
    assert not {"cmdstat_function|load", "cmdstat_eval", "cmdstat_evalsha"} & set(stats)


async def test_a_replica_of_another_release_calls_its_own_library_beside_ours(
    backend: RedisBackend, redis_server: RedisServer
) -> None:
    # A rolling upgrade: a replica whose scripts differ loads a library of another name and
    # leaves ours in place; both work on the same keys.
    other = redis_scripts.FUNCTIONS.replace(redis_scripts.VERSION, "0" * 12)
    with redis_server.client() as admin:
        admin.function_load(other)
        base = backend.keys.base
        granted = admin.fcall(f"el_{'0' * 12}_acquire", 8, *backend.keys.common("c-1"),
                              backend.keys.lock(KEY), base, 0, 0, 0, 0, "r", "", "c-1", 0, "",
                              0, "", 0, "", "acme/infra", 9, 0, "exclusive", "", "", KEY,
                              '{"Project":{}}', ".", "default")
    assert granted[0] == b"incarnation"  # the store is new: its incarnation starts first
    await backend.acquire(lock_for(request_for(pull=1)))
    with redis_server.client() as admin:
        names = sorted(_libraries(admin))
    assert names == sorted([redis_scripts.LIBRARY_NAME, f"enhanced_locking_{'0' * 12}"])


async def test_commands_are_packed_by_hiredis_into_the_bytes_redis_py_sends(
    backend: RedisBackend,
) -> None:
    client = backend.connection.client
    assert isinstance(client, aioredis.Redis)
    assert client.connection_pool.connection_class is HiredisConnection
    ours, theirs = HiredisConnection(), aioredis.Connection()
    script_call = ("EVALSHA", "1ce43e55", 2, "base:lock:{é}", b"raw", 0, -7, 2**53, "", "{}")
    buffers = ("SET", bytearray(b"k"), memoryview(b"v"), 1.5)
    for args in (script_call, buffers, ("CONFIG GET", "maxmemory"), (b"CLIENT LIST",)):
        assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args))
    with pytest.raises(DataError):
        ours.pack_command("SET", "k", None)
    # A command of two words, through the real server.
    assert "maxmemory" in await client.config_get("maxmemory")


async def test_answers_about_a_lock_this_replica_granted_are_what_another_replica_reads(
    redis_server: RedisServer,
) -> None:
    config = redis_config(redis_server)
    granting, reading = (RedisBackend.from_config(config, "enhanced") for _ in range(2))
    try:
        granted, lock = await granting.acquire(lock_for(request_for(pull=7)))
        assert granted
        assert await reading.get(KEY) == lock == await granting.get(KEY)
        # The stored JSON rewritten under the same token (another writer): read again.
        with redis_server.client() as admin:
            name = granting.keys.lock(KEY)
            data = json.loads(admin.hget(name, "data") or b"{}")
            data["User"]["Username"] = "rewritten"
            admin.hset(name, "data", json.dumps(data))
        seen = await granting.get(KEY)
        assert seen is not None and seen.user.username == "rewritten"
        assert seen.fencing_token == lock.fencing_token
        released = await granting.release(KEY, owner=("acme/infra", 7))
        assert released == seen
    finally:
        await granting.close()
        await reading.close()


async def test_two_replicas_never_both_grant_a_key(redis_server: RedisServer) -> None:
    config = redis_config(redis_server)
    replicas = [RedisBackend.from_config(config, "enhanced") for _ in range(2)]
    try:
        for round_ in range(20):
            key_path = f"race-{round_}"
            answers = await asyncio.gather(*(
                replicas[n % 2].acquire(lock_for(request_for(pull=n + 1, path=key_path)))
                for n in range(50)
            ))
            winners = {lock.pull.num for granted, lock in answers if granted}
            assert len(winners) == 1
            assert {lock.pull.num for _, lock in answers} == winners
    finally:
        for replica in replicas:
            await replica.close()


async def test_fencing_tokens_rise_across_releases_and_namespaces_are_apart(
    redis_server: RedisServer,
) -> None:
    config = redis_config(redis_server)
    enhanced = RedisBackend.from_config(config, "enhanced")
    shadow = RedisBackend.from_config(config, "shadow")
    try:
        tokens = []
        for pull in range(1, 6):
            _, lock = await enhanced.acquire(lock_for(request_for(pull=pull)))
            tokens.append(lock.fencing_token)
            await enhanced.release(KEY)
        assert tokens == [1, 2, 3, 4, 5]
        granted, lock = await shadow.acquire(lock_for(request_for(pull=9)))
        assert granted and lock.fencing_token == 1
        assert await enhanced.get(KEY) is None
    finally:
        await enhanced.close()
        await shadow.close()


async def test_export_and_adopt_move_locks_and_counters_without_lowering_them(
    backend: RedisBackend,
) -> None:
    memory = MemoryBackend("enhanced")
    for pull in range(1, 4):
        await memory.acquire(lock_for(request_for(pull=pull, path=f"p{pull}")))
        await memory.release(f"acme/infra/p{pull}/default/prod")
        await memory.acquire(lock_for(request_for(pull=pull, path=f"p{pull}",
                                                  ttl=timedelta(hours=1))))
    locks, tokens = await memory.export()
    assert await backend.adopt(locks, tokens) == []
    moved, moved_tokens = await backend.export()
    assert [(lock.key, lock.fencing_token) for lock in moved] == [
        (lock.key, lock.fencing_token) for lock in locks]
    assert moved_tokens == tokens
    assert all(lock.expires_at is not None for lock in moved)
    # Counters only ever rise: adopting lower ones changes nothing.
    await backend.adopt([], {key: 1 for key in tokens})
    assert (await backend.export())[1] == tokens
    # A key held here by another pull is a conflict, not an overwrite.
    other = lock_for(request_for(pull=99, path="p1"))
    assert await backend.adopt([other], {}) == [other]


async def test_export_counts_a_counter_of_other_digits_as_written_over(
    backend: RedisBackend,
) -> None:
    # "²" and "٣" are digits to str.isdigit, not numbers Redis counts with: export gives them
    # the clock's floor as it does any counter written over, instead of failing ("²") or
    # reading 3 ("٣").
    keys = [f"acme/infra/d{n}/default/prod" for n in range(3)]
    for n in range(3):
        await backend.acquire(lock_for(request_for(pull=n + 1, path=f"d{n}")))
    client = backend.connection.client
    await client.set(backend.keys.fence(keys[1]), "²")
    await client.set(backend.keys.fence(keys[2]), "٣")
    _, tokens = await backend.export()
    assert tokens[keys[0]] == 1
    assert tokens[keys[1]] == tokens[keys[2]] > 10**12  # milliseconds since 1970, times 1000


async def test_on_a_redis_without_functions_the_scripts_are_called_by_sha(
    tmp_path: Path,
) -> None:
    # Redis 6.2 has no FCALL: the same scripts run as EVALSHA of the library plus the script.
    # A 7.0 server with FCALL renamed away answers a call as 6.2 does ("unknown command").
    with RedisServer(tmp_path / "old", extra_args=["--rename-command", "FCALL", ""]) as server:
        backend = RedisBackend.from_config(redis_config(server), "enhanced")
        try:
            granted, lock = await backend.acquire(lock_for(request_for(pull=1)))
            assert granted and lock.fencing_token == 1
            wait = Wait(id="w-2", timeout=timedelta(seconds=10))
            heard = backend.grants.expect(wait.id)
            queued = await backend.acquire_or_enqueue(candidate_for(request_for(pull=2)), ttl=None,
                                                      wait=wait, policy=QueuePolicy())
            assert queued.status is Status.QUEUED
            handoff = await backend.release_and_handoff(KEY, owner=("acme/infra", 1))
            assert [g.waiter.id for g in handoff.granted] == ["w-2"]
            notice = await asyncio.wait_for(heard, 5)
            assert notice.locks[0].fencing_token == 2
            with server.client() as admin:
                admin.script_flush()  # forgotten scripts are loaded again (NOSCRIPT)
                stats = admin.info("commandstats")
                assert admin.function_list() == []
            assert (await backend.get(KEY)) == notice.locks[0]
            assert stats["cmdstat_evalsha"]["calls"] >= 4
        finally:
            await backend.close()


def test_every_script_compiles_as_one_text_for_a_redis_without_functions(tmp_path: Path) -> None:
    # The library and a script as one EVAL text: Lua allows a function 200 locals, and the
    # library alone is near them (RELEASE's own, counted with them, once went past: "main
    # function has more than 200 local variables" on every release on such a Redis).
    with RedisServer(tmp_path / "eval") as server, server.client() as admin:
        loaded = {name: admin.script_load(redis_scripts.script(name))
                  for name in redis_scripts.NAMES}
        assert all(admin.script_exists(*loaded.values())), loaded


async def test_waiters_granted_together_are_told_in_the_order_they_were_granted(
    backend: RedisBackend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One release grants three shared waiters (tokens in queue order). Each grant is confirmed
    # by a call of its own, all at once, and their answers can come back in any order (on a
    # busy machine they did): the callers are still told in the order Redis granted, or a
    # later token is announced before an earlier one. Here the first grant's confirmation is
    # held up until the others have answered, and until a waiter on another key, granted
    # meanwhile, has been told: the order is kept per key, and other keys do not wait.
    granted, _ = await backend.acquire(lock_for(request_for(pull=1)))
    other = lock_for(request_for(pull=5, path="other"))
    assert granted and (await backend.acquire(other))[0]
    heard: list[str] = []

    def hear(name: str) -> Callable[[object], None]:
        return lambda _: heard.append(name)

    async def enqueue(candidate: Candidate, waiter_id: str) -> asyncio.Future[Notice]:
        wait = Wait(id=waiter_id, timeout=timedelta(minutes=1))
        future = backend.grants.expect(wait.id)
        future.add_done_callback(hear(wait.id))
        queued = await backend.acquire_or_enqueue(candidate, ttl=None, wait=wait,
                                                  policy=QueuePolicy())
        assert queued.status is Status.QUEUED
        return future

    futures = [await enqueue(candidate_for(request_for(pull=pull))._replace(mode="shared"),
                             f"w-{pull}") for pull in (2, 3, 4)]
    elsewhere = await enqueue(candidate_for(request_for(pull=6, path="other")), "w-6")
    confirm = backend._confirm
    confirmed: list[str] = []
    go, others_confirmed = asyncio.Event(), asyncio.Event()

    async def first_answers_last(waiter_id: str) -> redis_replies.Confirm:
        if waiter_id == "w-2":
            await go.wait()
        answer = await confirm(waiter_id)
        confirmed.append(waiter_id)
        if {"w-3", "w-4"} <= set(confirmed):
            others_confirmed.set()
        return answer

    monkeypatch.setattr(backend, "_confirm", first_answers_last)
    handoff = await backend.release_and_handoff(KEY, owner=("acme/infra", 1))
    assert [g.waiter.id for g in handoff.granted] == ["w-2", "w-3", "w-4"]
    handoff = await backend.release_and_handoff(other.key, owner=("acme/infra", 5))
    assert [g.waiter.id for g in handoff.granted] == ["w-6"]
    await asyncio.wait_for(elsewhere, 10)
    await asyncio.wait_for(others_confirmed.wait(), 10)
    go.set()
    notices = await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert confirmed[-1] == "w-2"
    assert heard == ["w-6", "w-2", "w-3", "w-4"]
    tokens = [notice.locks[0].fencing_token for notice in notices]
    assert tokens == sorted(tokens) and len(set(tokens)) == 3
