"""The lean path of the Redis scripts: an uncontended acquire and release skip the discovery,
the serving and the verdict (``acquire.lua`` and ``release.lua``: ``uncontended``), and do
exactly what the full path does then.

The full path is made to run on a second key, in the same state otherwise, by a stale entry
in the ``queued`` index (which it prunes: the key has no waiter): both keys must then be
stored, indexed and answered alike.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis
from tests.support.key_watch import KeyWatch, Watched
from tests.support.locks import lock_for, request_for
from tests.support.redis_fixtures import redis_config
from tests.support.redis_server import LOOPBACK, RedisServer

from enhanced_locking.backends import redis_scripts
from enhanced_locking.backends.redis_store import RedisBackend, RedisKeys
from enhanced_locking.types import Lock, LockNotOwned

pytestmark = pytest.mark.redis

LEAN, FULL = "acme/infra/envs/prod/default/prod", "acme/infra/envs/stage/default/stage"
OWNER = ("acme/infra", 7)


@pytest.fixture
async def backend(redis_server: RedisServer) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend.from_config(redis_config(redis_server), "enhanced")
    await backend.ping()  # the store's incarnation is known: no refusal in what follows
    yield backend
    await backend.close()


def _request(key: str) -> Any:
    path, project = ("envs/prod", "prod") if key == LEAN else ("envs/stage", "stage")
    return request_for(pull=OWNER[1], path=path, project=project)


def _answers(admin: redis.Redis, keys: RedisKeys) -> list[Any]:
    """Every answer kept under a call id, oldest first by what it holds, then cleared."""
    names = sorted(admin.keys(keys.base + "op:*"))
    answers = [json.loads(admin.get(name) or b"null") for name in names]
    if names:
        admin.delete(*names)
    return answers


def _alike(answer: Any) -> Any:
    """An answer with what differs between the two keys (the key, its path and project,
    the grant time, the request's time) made the same."""
    def clean(node: Any) -> Any:
        if isinstance(node, list):
            return [clean(n) for n in node]
        if isinstance(node, dict):  # the request's own time ("Time") differs too
            return {k: "<time>" if k == "Time" else clean(v) for k, v in node.items()}
        if isinstance(node, str) and node.startswith("{"):
            return clean(json.loads(node))  # a lock's stored JSON
        if isinstance(node, str) and node.isdigit() and len(node) == 13:
            return "<ms>"  # a server time
        if isinstance(node, str):
            return node.replace(LEAN, "K").replace(FULL, "K").replace(
                "envs/stage", "P").replace("envs/prod", "P").replace(
                "stage", "N").replace("prod", "N")
        return node
    return clean(answer)


def _stored(admin: redis.Redis, keys: RedisKeys, key: str) -> dict[str, Any]:
    raw: dict[bytes, bytes] = admin.hgetall(keys.lock(key))  # type: ignore[assignment]
    lock = {k.decode(): v.decode() for k, v in raw.items()}
    lock.pop("at", None)
    if "data" in lock:
        lock["data"] = _alike(lock["data"])
        lock["path"] = "P"
    return {
        "lock": lock,
        "ttl": admin.pttl(keys.lock(key)) > 0,
        "held": admin.sismember(keys.held, key),
        "fenced": admin.sismember(keys.fenced, key),
        "fence": admin.get(keys.fence(key)),
        "queued": admin.sismember(keys.queued, key),
        "pull": admin.sismember(keys.pull(*OWNER), key),
        "shared": admin.exists(keys.shared(key)),
    }


async def test_an_uncontended_pair_stores_and_answers_what_the_full_path_does(
    backend: RedisBackend, redis_server: RedisServer,
) -> None:
    keys = backend.keys
    locks: dict[str, Lock] = {}
    with redis_server.client() as admin:
        _answers(admin, keys)
        for key in (LEAN, FULL):
            if key == FULL:
                admin.sadd(keys.queued, key)  # a stale index entry: the full path runs
            admin.config_resetstat()
            granted, lock = await backend.acquire(lock_for(_request(key)))
            assert granted and lock.fencing_token == 1 and lock.key == key
            locks[key] = lock
            stats = admin.info("commandstats")
            # The lean path reads neither the shared holders' hash nor a queue.
            assert ("cmdstat_hgetall" in stats) == (key == FULL), stats
            assert ("cmdstat_zrange" in stats) == (key == FULL), stats
        assert _stored(admin, keys, LEAN) == _stored(admin, keys, FULL)
        assert _stored(admin, keys, LEAN)["held"] and _stored(admin, keys, LEAN)["pull"]
        # What each answered (and kept under its call id): the lean path only what Redis
        # added to the lock sent (token, grant time, lease end), the full path the lock row.
        answers = {answer[0]: answer for answer in _answers(admin, keys)}
        lean, full = answers["took"], answers["granted"]
        assert _alike(lean[1:]) == _alike(full[1][0][2:5]) == ["1", "<ms>", "0"]
        # The lock the lean path answered is the one another replica reads from Redis.
        other = RedisBackend.from_config(redis_config(redis_server), "enhanced")
        try:
            seen = {key: await other.get(key) for key in (LEAN, FULL)}
        finally:
            await other.close()
        assert seen[LEAN] == locks[LEAN] and seen[FULL] == locks[FULL]
        data = (admin.hget(keys.lock(LEAN), "data") or b"").decode()

        for key in (LEAN, FULL):
            if key == FULL:
                admin.sadd(keys.queued, key)
            admin.config_resetstat()
            released = await backend.release(key, owner=OWNER)
            assert released == locks[key]
            stats = admin.info("commandstats")
            assert ("cmdstat_hgetall" in stats) == (key == FULL), stats
        assert _stored(admin, keys, LEAN) == _stored(admin, keys, FULL)
        assert not _stored(admin, keys, LEAN)["held"]
        assert _stored(admin, keys, LEAN)["fence"] == b"1"
        assert not _stored(admin, keys, FULL)["queued"]  # the full path pruned the entry
        answers = {answer[0]: answer for answer in _answers(admin, keys)}
        assert set(answers) == {"dropped", "released"}
        lean = answers["dropped"]
        # The data stored is the data this replica granted and sent along with the release:
        # the answer leaves it out (false), and the lock released is the one granted (above).
        assert data and lean[1] is False and _alike(lean[2:]) == ["1", "<ms>", "0"]


async def test_a_key_with_waiters_or_another_holder_takes_the_full_path(
    backend: RedisBackend, redis_server: RedisServer,
) -> None:
    granted, _ = await backend.acquire(lock_for(request_for(pull=1)))
    assert granted
    with redis_server.client() as admin:
        admin.config_resetstat()
        granted, holder = await backend.acquire(lock_for(request_for(pull=2)))
        assert not granted and holder.pull.num == 1
        assert "cmdstat_hgetall" in admin.info("commandstats")  # the full path answered
        admin.config_resetstat()
        with pytest.raises(LockNotOwned):
            await backend.release(LEAN, owner=("acme/infra", 2))
        assert "cmdstat_hgetall" in admin.info("commandstats")


# --- the lean functions of their own (lean_acquire.lua, lean_release.lua) -------------------
def _called(watched: Watched) -> dict[str, int]:
    """How often each script ran, by name (``ACQUIRE``, ``LEAN_ACQUIRE``, ...)."""
    names = {function: name for name, function in redis_scripts.FUNCTION_NAMES.items()}
    return {names[s]: n for s, n in watched.scripts.items() if s in names}


async def test_an_uncontended_pair_is_one_call_of_each_lean_function(
    backend: RedisBackend, redis_server: RedisServer, tmp_path: Path,
) -> None:
    watch = KeyWatch(LOOPBACK, redis_server.port, tmp_path / "lean.log")
    with redis_server.client() as admin:
        _answers(admin, backend.keys)  # the ping's
        granted, lock = await backend.acquire(lock_for(_request(LEAN)))
        assert granted and lock.fencing_token == 1
        # The grant's answer is kept as the JSON cjson makes of it (written without cjson).
        kept = [admin.get(name) for name in admin.keys(backend.keys.base + "op:*")]
        at = str(int(lock.acquired_at.timestamp() * 1000))
        assert kept == [f'["took","1","{at}","0"]'.encode()]
        admin.delete(*admin.keys(backend.keys.base + "op:*"))
        assert await backend.release(LEAN, owner=OWNER) == lock
        # The release's answer too (the data the replica sent is not sent back: false).
        kept = [admin.get(name) for name in admin.keys(backend.keys.base + "op:*")]
        assert kept == [f'["dropped",false,"1","{at}","0"]'.encode()]
        [dropped] = _answers(admin, backend.keys)
        assert dropped[0] == "dropped" and dropped[2:] == ["1", at, "0"]
    watched = watch.stop()
    assert _called(watched) == {"LEAN_ACQUIRE": 1, "LEAN_RELEASE": 1}
    assert watched.undeclared == []
    # A token that reads as a number but is not digits alone (written over by something
    # else) is kept as JSON all the same: cjson writes that answer.
    with redis_server.client() as admin:
        granted, lock = await backend.acquire(lock_for(_request(LEAN)))
        assert granted and lock.fencing_token == 2
        admin.delete(*admin.keys(backend.keys.base + "op:*"))
        admin.hset(backend.keys.lock(LEAN), "token", " 2\n")
        await backend.release(LEAN, owner=OWNER)
        [dropped] = _answers(admin, backend.keys)
        assert dropped[:3] == ["dropped", False, " 2\n"]


def _commands_run(admin: redis.Redis) -> dict[str, int]:
    """Every command Redis ran since its statistics were reset, by name (``INFO
    commandstats``: those run inside a function counted too), the reset left out."""
    stats: dict[str, Any] = admin.info("commandstats")
    ran = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    return {name: n for name, n in ran.items() if n and name != "config|resetstat"}


async def test_an_uncontended_pair_runs_these_commands_in_redis(
    backend: RedisBackend, redis_server: RedisServer,
) -> None:
    """What one uncontended pair costs Redis, command by command (each command the lean
    functions run is one promise: docs/benchmarks.md, "The commands of an uncontended pair").
    A first send for a free key asks in one ``EXISTS`` whether an answer is kept under its
    call id, whether the key has holders and whether the ``queued`` index is there; it then
    sends no ``GET`` of the call id and no second ``EXISTS``, and, with nobody waiting for
    any key of the namespace (no index), no ``SISMEMBER`` of the key in it."""
    with redis_server.client() as admin:
        granted, lock = await backend.acquire(lock_for(_request(LEAN)))  # the key's counter
        assert granted and await backend.release(LEAN, owner=OWNER) == lock
        admin.config_resetstat()
        granted, lock = await backend.acquire(lock_for(_request(LEAN)))
        assert granted and lock.fencing_token == 2
        assert _commands_run(admin) == {
            "fcall": 1, "exists": 1, "hmget": 1, "incr": 1, "time": 1, "hset": 1, "sadd": 2,
            "set": 1}
        admin.config_resetstat()
        assert await backend.release(LEAN, owner=OWNER) == lock
        assert _commands_run(admin) == {
            "fcall": 1, "exists": 1, "hmget": 2, "del": 1, "srem": 2, "set": 1}


async def test_an_uncontended_pair_asks_the_queued_index_when_another_key_is_waited_for(
    backend: RedisBackend, redis_server: RedisServer,
) -> None:
    """With the ``queued`` index there (another key of the namespace waited for), the pair
    asks whether its own key is in it (one ``SISMEMBER`` a call) and is still served lean;
    a key in the index goes to the full path (``test_a_key_with_waiters_...``)."""
    keys = backend.keys
    with redis_server.client() as admin:
        granted, lock = await backend.acquire(lock_for(_request(LEAN)))  # the key's counter
        assert granted and await backend.release(LEAN, owner=OWNER) == lock
        admin.sadd(keys.queued, FULL)  # (an entry of another key: the index is there)
        admin.config_resetstat()
        granted, lock = await backend.acquire(lock_for(_request(LEAN)))
        assert granted and lock.fencing_token == 2
        assert _commands_run(admin) == {
            "fcall": 1, "exists": 1, "hmget": 1, "sismember": 1, "incr": 1, "time": 1,
            "hset": 1, "sadd": 2, "set": 1}
        admin.config_resetstat()
        assert await backend.release(LEAN, owner=OWNER) == lock
        assert _commands_run(admin) == {
            "fcall": 1, "exists": 1, "hmget": 2, "sismember": 1, "del": 1, "srem": 2,
            "set": 1}
        assert admin.smembers(keys.queued) == {FULL.encode()}  # (the lean path prunes nothing)


async def test_a_lean_call_is_sent_as_hiredis_packs_its_arguments(
    backend: RedisBackend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lean call's parts that do not change from call to call are packed once and kept;
    what is sent is byte for byte what hiredis makes of the whole call, for a key with
    characters beyond ASCII, with and without a lease, and after the incarnation moved."""
    sent: list[tuple[bytes, bytes]] = []
    pack = backend._lean_packed

    def compared(function: str, declared: Any, head: Any, args: Any, changing: int,
                 call_id: str) -> bytes:
        packed = pack(function, declared, head, args, changing, call_id)
        sent.append((packed, hiredis.pack_command(
            ("FCALL", function, len(declared), *declared, *head, *args))))
        return packed

    monkeypatch.setattr(backend, "_lean_packed", compared)
    plain = request_for(pull=OWNER[1], path="envs/prod", project="prod")
    wide = request_for(pull=OWNER[1], path="envs/prod-é", project="prod-ü")
    for _ in range(3):
        for ask in (plain, wide):
            for ttl in (None, timedelta(minutes=5)):
                lock = lock_for(ask)
                if ttl is not None:
                    lock = lock.model_copy(update={"expires_at": lock.acquired_at + ttl})
                granted, held = await backend.acquire(lock)
                assert granted and (held.expires_at is None) == (ttl is None)
                assert await backend.release(ask.key, owner=OWNER) == held
    assert len(sent) == 24 and all(packed == whole for packed, whole in sent)
    assert len({packed for packed, _ in sent}) == 24  # a call id of its own each time
    assert len(backend._packs) == 6  # per key: an acquire with and without a lease, a release
    # Another incarnation is another head: packed anew, and sent as hiredis would (the
    # acquire refused for it, then sent again with the store's own, as before).
    # (The store's counters then start from a base: one started at 0 that the replica did not
    # know is a store that lost its data, which starts the restart quarantine instead.)
    await backend.connection.client.hset(backend.keys.incarnation, "base", "1")
    backend.incarnation = backend.incarnation + "0"
    granted, held = await backend.acquire(lock_for(plain))
    assert granted and await backend.release(plain.key, owner=OWNER) == held
    assert len(sent) == 27 and all(packed == whole for packed, whole in sent)
    assert sent[24][0] != sent[25][0] and len(backend._packs) == 7


async def test_a_call_the_lean_function_cannot_serve_is_sent_in_full_and_answered_alike(
    backend: RedisBackend, redis_server: RedisServer, tmp_path: Path,
) -> None:
    """A key someone holds: the lean function answers ``full`` having written nothing, the
    full script answers as it always did, and the key's next calls from this replica go to
    the full scripts at once until one of them finds the key free again."""
    keys = backend.keys
    other = RedisBackend.from_config(redis_config(redis_server), "enhanced")
    try:
        granted, held = await other.acquire(lock_for(request_for(pull=1)))
        assert granted
        with redis_server.client() as admin:
            _answers(admin, keys)
            watch = KeyWatch(LOOPBACK, redis_server.port, tmp_path / "busy.log")
            granted, holder = await backend.acquire(lock_for(request_for(pull=2)))
            assert not granted and holder == held
            # Only the full script's answer is kept: the lean function wrote nothing.
            assert [answer[0] for answer in _answers(admin, keys)] == ["held"]
            assert _called(watch.stop()) == {"LEAN_ACQUIRE": 1, "ACQUIRE": 1}

            watch = KeyWatch(LOOPBACK, redis_server.port, tmp_path / "again.log")
            granted, _ = await backend.acquire(lock_for(request_for(pull=2)))
            assert not granted
            with pytest.raises(LockNotOwned):
                await backend.release(LEAN, owner=("acme/infra", 2))
            assert _called(watch.stop()) == {"ACQUIRE": 1, "RELEASE": 1}

            assert await other.release(LEAN, owner=("acme/infra", 1)) == held
            _answers(admin, keys)
            watch = KeyWatch(LOOPBACK, redis_server.port, tmp_path / "free.log")
            granted, mine = await backend.acquire(lock_for(request_for(pull=2)))
            assert granted and mine.fencing_token == held.fencing_token + 1
            assert [answer[0] for answer in _answers(admin, keys)] == ["took"]
            assert await backend.release(LEAN, owner=("acme/infra", 2)) == mine
            granted, _ = await backend.acquire(lock_for(request_for(pull=2)))
            assert granted
            # The full script's lean path found the key free: the lean functions again.
            assert _called(watch.stop()) == {"ACQUIRE": 1, "LEAN_RELEASE": 1,
                                             "LEAN_ACQUIRE": 1}
    finally:
        await other.close()


async def test_a_lean_release_names_the_lock_it_believes_stored_by_token_and_grant_time(
    backend: RedisBackend, redis_server: RedisServer, tmp_path: Path,
) -> None:
    """The replica tells ``LEAN_RELEASE`` which lock it believes stored by its token and grant
    time, not by the lock's JSON, which would cross into Redis's Lua a second time a pair (the
    acquire sends it to be stored): the call carries ``<token>:<grant time>`` and none of the
    JSON, and Redis leaves the data out of its answer, the lock named being the one stored."""
    log = tmp_path / "release.log"
    watch = KeyWatch(LOOPBACK, redis_server.port, log)
    granted, lock = await backend.acquire(lock_for(_request(LEAN)))
    assert granted
    at = str(int(lock.acquired_at.timestamp() * 1000))
    with redis_server.client() as admin:
        _answers(admin, backend.keys)
        assert await backend.release(LEAN, owner=OWNER) == lock
        [dropped] = _answers(admin, backend.keys)
    watch.stop()
    assert dropped == ["dropped", False, str(lock.fencing_token), at, "0"]
    functions = {name: redis_scripts.FUNCTION_NAMES[name]
                 for name in ("LEAN_ACQUIRE", "LEAN_RELEASE")}
    calls = {name: [line for line in log.read_text(encoding="utf-8", errors="replace")
                    .splitlines() if f'"fcall" "{function}"' in line.lower()]
             for name, function in functions.items()}
    assert len(calls["LEAN_ACQUIRE"]) == len(calls["LEAN_RELEASE"]) == 1, calls
    # (the JSON's own field names, as MONITOR shows them: its quotes escaped)
    assert "HeadBranch" in calls["LEAN_ACQUIRE"][0]
    assert "HeadBranch" not in calls["LEAN_RELEASE"][0]
    assert f'"{lock.fencing_token}:{at}"' in calls["LEAN_RELEASE"][0]


async def test_a_lean_release_answers_the_data_stored_when_it_is_not_what_the_replica_granted(
    backend: RedisBackend, redis_server: RedisServer,
) -> None:
    """The lean release sends the data of this replica's own grant and Redis answers the data
    only when another stands there: here the same pull's lock granted again by another
    replica, for another user (other data, the same owner)."""
    keys = backend.keys
    granted, mine = await backend.acquire(lock_for(request_for(pull=7)))
    assert granted
    other = RedisBackend.from_config(redis_config(redis_server), "enhanced")
    try:
        assert await other.release(LEAN, owner=OWNER) == mine
        granted, theirs = await other.acquire(lock_for(request_for(pull=7, user="bob")))
        assert granted and theirs.user.username == "bob"
    finally:
        await other.close()
    with redis_server.client() as admin:
        stored = (admin.hget(keys.lock(LEAN), "data") or b"").decode()
        _answers(admin, keys)
        released = await backend.release(LEAN, owner=OWNER)
        assert released == theirs and released.user.username == "bob"
        [dropped] = _answers(admin, keys)
        assert dropped[0] == "dropped" and dropped[1] == stored and "bob" in stored


def test_the_lean_functions_write_nothing_for_a_call_they_cannot_serve(
    redis_server: RedisServer,
) -> None:
    """Called directly on a key that is held, queued for or shared: ``{'full'}``, and Redis
    holds what it held before (no answer kept under the call id either)."""
    keys = RedisKeys("enhanced-locking:", "enhanced")
    common = keys.lean_common("c-1")
    head = ["e-1"]  # the lean layout (begin_lean in lua/lib.lua): the incarnation known
    owner = keys.pull(*OWNER)
    with redis_server.client() as admin:
        admin.function_load(redis_scripts.FUNCTIONS)
        admin.hset(keys.incarnation, mapping={"id": "e-1", "base": 0, "until": 0, "since": 0})
        for busy in ("lock", "shared", "queued"):
            if busy == "lock":
                admin.hset(keys.lock(LEAN), mapping={"data": "{}", "token": 1, "at": 1,
                                                     "exp": 0, "repo": "acme/infra",
                                                     "pull": "8", "path": ".", "ws": "d"})
            elif busy == "shared":
                admin.hset(keys.shared(LEAN), "acme/infra#8", "[]")
            else:
                admin.sadd(keys.queued, LEAN)
            before = {name: admin.dump(name) for name in admin.keys("*")}
            took = admin.fcall(redis_scripts.FUNCTION_NAMES["LEAN_ACQUIRE"], 9, *common,
                               keys.lock(LEAN), keys.shared(LEAN), keys.fence(LEAN), owner,
                               *head, 0, LEAN, "{}", *OWNER, ".", "default")
            dropped = admin.fcall(redis_scripts.FUNCTION_NAMES["LEAN_RELEASE"], 8, *common,
                                  keys.lock(LEAN), keys.shared(LEAN), owner, *head, LEAN,
                                  *OWNER, "1:1")
            assert took == dropped == [b"full"], busy
            assert {name: admin.dump(name) for name in admin.keys("*")} == before, busy
            admin.delete(keys.lock(LEAN), keys.shared(LEAN), keys.queued)


def _lean_release(admin: redis.Redis, keys: RedisKeys, call_id: str, believed: str = "") -> Any:
    """``LEAN_RELEASE`` of LEAN by OWNER, called directly (the lean layout), the lock believed
    stored named by ``believed``, its ``<token>:<grant time>`` ('': none)."""
    return admin.fcall(redis_scripts.FUNCTION_NAMES["LEAN_RELEASE"], 8,
                       *keys.lean_common(call_id), keys.lock(LEAN), keys.shared(LEAN),
                       keys.pull(*OWNER), "e-1", LEAN, *OWNER, believed)


def _lean_acquire(admin: redis.Redis, keys: RedisKeys, call_id: str, lease_ms: int) -> Any:
    return admin.fcall(redis_scripts.FUNCTION_NAMES["LEAN_ACQUIRE"], 9,
                       *keys.lean_common(call_id), keys.lock(LEAN), keys.shared(LEAN),
                       keys.fence(LEAN), keys.pull(*OWNER), "e-1", lease_ms, LEAN, "{}",
                       *OWNER, ".", "default")


def test_the_lean_release_serves_only_the_owners_live_readable_lock(
    redis_server: RedisServer,
) -> None:
    """``release_own`` reads the lock's hash in place, as the full path's ``lock_row``,
    ``lapsed`` and ``same_owner`` read its row: a lock with a live lease is released, and one
    whose lease lapsed, which was set aside, whose numbers do not read, which has no data or
    is another pull's is turned away (``{'full'}``, nothing written), for the full path."""
    keys = RedisKeys("enhanced-locking:", "enhanced")
    with redis_server.client() as admin:
        admin.function_load(redis_scripts.FUNCTIONS)
        admin.hset(keys.incarnation, mapping={"id": "e-1", "base": 0, "until": 0, "since": 0})
        now = int(admin.time()[0]) * 1000
        lock = {"data": "{}", "token": 3, "at": now, "exp": 0, "repo": OWNER[0],
                "pull": OWNER[1], "path": ".", "ws": "default"}
        turned_away: dict[str, dict[str, Any]] = {
            "a lapsed lease": {"exp": now - 1_000},
            "set aside": {"damaged": "written over"},
            "a token that is not a number": {"token": "x"},
            "a grant time that is not a number": {"at": "y"},
            "a lease end that is not a number": {"exp": "z"},
            "another pull's": {"pull": 8},
            "no data": {},
        }
        for n, (case, change) in enumerate(turned_away.items()):
            admin.delete(keys.lock(LEAN))
            admin.hset(keys.lock(LEAN), mapping={**lock, **change})
            if case == "no data":
                admin.hdel(keys.lock(LEAN), "data")
            admin.sadd(keys.held, LEAN)
            admin.sadd(keys.pull(*OWNER), LEAN)
            before = {name: admin.dump(name) for name in admin.keys("*")}
            assert _lean_release(admin, keys, f"r-{n}", f"3:{now}") == [b"full"], case
            assert {name: admin.dump(name) for name in admin.keys("*")} == before, case

        admin.delete(keys.lock(LEAN))
        admin.hset(keys.lock(LEAN), mapping={**lock, "exp": now + 60_000})
        answer = _lean_release(admin, keys, "r-live", f"3:{now}")
        # The lock stored is the one named: its data left out of the answer (false).
        assert json.loads(answer) == ["dropped", False, "3", str(now), str(now + 60_000)]
        assert not admin.exists(keys.lock(LEAN))
        assert not admin.sismember(keys.held, LEAN)
        assert not admin.sismember(keys.pull(*OWNER), LEAN)


def test_a_lean_grant_with_a_lease_or_a_token_base_stores_what_stamp_stores(
    redis_server: RedisServer,
) -> None:
    """``grant_free`` writes a grant of a free key itself: with a lease, the lease end in the
    answer and the hash, and the hash collected a grace after it, as ``stamp`` writes it; in
    a store whose incarnation has a base (it lost its data once), the grant goes through
    ``stamp``, whose counter continues from the base."""
    keys = RedisKeys("enhanced-locking:", "enhanced")
    with redis_server.client() as admin:
        admin.function_load(redis_scripts.FUNCTIONS)
        admin.hset(keys.incarnation, mapping={"id": "e-1", "base": 0, "until": 0, "since": 0})
        took = json.loads(_lean_acquire(admin, keys, "a-1", 60_000))
        assert took[:2] == ["took", "1"] and int(took[3]) == int(took[2]) + 60_000
        stored = {k.decode(): v.decode() for k, v in admin.hgetall(keys.lock(LEAN)).items()}
        assert stored == {"data": "{}", "token": "1", "at": took[2], "exp": took[3],
                          "repo": OWNER[0], "pull": str(OWNER[1]), "path": ".",
                          "ws": "default"}
        # collected a grace after the lease's end (redis_scripts.GRACE_MS), not before it
        assert admin.pttl(keys.lock(LEAN)) > 60_000
        assert admin.sismember(keys.fenced, LEAN) and admin.sismember(keys.held, LEAN)
        assert admin.sismember(keys.pull(*OWNER), LEAN)
        assert json.loads(_lean_release(admin, keys, "r-1"))[0] == "dropped"

        admin.hset(keys.incarnation, "base", 5_000)
        took = json.loads(_lean_acquire(admin, keys, "a-2", 0))
        assert took[:2] == ["took", "5001"] and took[3] == "0"
        assert admin.hget(keys.lock(LEAN), "token") == b"5001"
        assert admin.get(keys.fence(LEAN)) == b"5001"
        assert admin.pttl(keys.lock(LEAN)) == -1
