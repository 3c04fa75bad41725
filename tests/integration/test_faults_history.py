"""No lock granted twice while a replica or the store fails under many clients.

Three ``enhanced-locking serve`` replicas on one store (a redis-server, an etcd member, or a
Redis Cluster for the replicas' faults), or the one of an embedded store's file, 24 clients
spread over them (``tests/support/fault_load.py``), the history checker over every answer.
The faults:

* a replica frozen (SIGSTOP) past what marks it alive, then let go (SIGCONT): on Redis past
  its waiters' heartbeat and the claim window (5 s each), on etcd past its session lease
  (10 s). Its waiters were dropped or their claims lapsed and the keys went on to others;
  whatever the zombie answers when it wakes must not be a second holder, and a grant made to
  one of its waiters must not stay held by nobody;
* a replica killed (SIGKILL) mid-acquire and mid-release, then started again;
* the store frozen past the call's limit, then let go: calls answered ``unavailable`` run
  late when it wakes;
* the connections to the store cut mid-reply (a loopback proxy resets one now and then as an
  answer passes): the store did the work, its caller never heard.

After each: every replica grants again, and once every client released its pull, no lock is
held and no key has a waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from tests.support.cutting_proxy import cutting_proxy
from tests.support.etcd_fixtures import started
from tests.support.etcd_server import frozen
from tests.support.fault_load import (
    assert_recovered,
    frozen_for,
    killed_and_started,
    replicas_on,
    report,
    run_under,
)
from tests.support.redis_server import RedisServer
from tests.support.service import ServiceProcess, services

pytestmark = pytest.mark.timeout(150)

REPO = "acme/faults"


@dataclass(frozen=True)
class Store:
    """The store under the replicas, and how to fail it."""

    replicas: Callable[..., list[ServiceProcess]]
    """``replicas(3)``: serve processes on it (``via``: through another address)."""
    address: tuple[str, int] | None
    """Its one node's (None: a cluster)."""
    frozen: Callable[[], AbstractAsyncContextManager[None]] | None
    """The store stopped (SIGSTOP) for the block (None: a cluster)."""
    zombie_seconds: float
    """How long a frozen replica is past what marks it alive."""


REDIS = pytest.param("redis", marks=pytest.mark.redis)
ETCD = pytest.param("etcd", marks=pytest.mark.etcd)
CLUSTER = pytest.param("redis-cluster", marks=pytest.mark.redis)
ONE_NODE = pytest.mark.parametrize("store", [REDIS, ETCD], indirect=True)
"""The stores a test freezes or cuts off: one node."""
EVERY_STORE = pytest.mark.parametrize("store", [REDIS, ETCD, CLUSTER], indirect=True)
"""And a Redis Cluster of three masters (the session's, under a prefix of the test's own)."""


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with contextlib.ExitStack() as stack, services() as group:
        if request.param == "redis-cluster":
            cluster = request.getfixturevalue("redis_cluster")
            prefix = request.getfixturevalue("redis_cluster_prefix")

            yield Store(lambda count: replicas_on(
                group, tmp_path, count, "--enhanced-locking-backend=redis",
                f"--enhanced-locking-redis-addr={cluster.addr}", "--enhanced-locking-redis-cluster",
                f"--enhanced-locking-redis-key-prefix={prefix}"),
                None, None, 7.5)
            return
        if request.param == "redis":
            server: RedisServer = request.getfixturevalue("redis_server")

            @contextlib.asynccontextmanager
            async def redis_frozen() -> AsyncIterator[None]:
                with server.paused():
                    yield

            yield Store(lambda count, via=server.addr: replicas_on(
                group, tmp_path, count, "--enhanced-locking-backend=redis",
                f"--enhanced-locking-redis-addr={via}"),
                (server.host, server.port), redis_frozen, 7.5)
            return
        etcd = stack.enter_context(started(tmp_path / "etcd"))
        member = etcd.members[0]

        @contextlib.asynccontextmanager
        async def etcd_frozen() -> AsyncIterator[None]:
            with frozen(member):
                yield

        yield Store(lambda count, via=member.endpoint: replicas_on(
            group, tmp_path, count, "--enhanced-locking-backend=etcd",
            f"--enhanced-locking-etcd-endpoints={via}"),
            ("127.0.0.1", member.client_port), etcd_frozen, 12.0)


@EVERY_STORE
async def test_a_replica_frozen_past_its_liveness_and_let_go_grants_nothing_twice(
    store: Store,
) -> None:
    group = store.replicas(3)
    run = await run_under(group, REPO, lambda: frozen_for(group[0], store.zombie_seconds))
    report(run)
    await assert_recovered(run, group)


@EVERY_STORE
async def test_a_replica_killed_mid_call_and_started_again_grants_nothing_twice(
    store: Store,
) -> None:
    group = store.replicas(3)
    run = await run_under(group, REPO, lambda: killed_and_started(group[0]))
    report(run)
    await assert_recovered(run, group)


@ONE_NODE
async def test_the_store_frozen_past_the_call_limit_and_let_go_grants_nothing_twice(
    store: Store,
) -> None:
    group = store.replicas(3)

    frozen = store.frozen
    assert frozen is not None

    async def freeze() -> None:
        async with frozen():
            await asyncio.sleep(6.5)

    run = await run_under(group, REPO, freeze)
    report(run)
    await assert_recovered(run, group)


@ONE_NODE
async def test_connections_to_the_store_cut_mid_reply_grant_nothing_twice(
    store: Store,
) -> None:
    assert store.address is not None
    with cutting_proxy(store.address) as proxy:
        group = store.replicas(3, proxy.addr)
        run = await run_under(group, REPO, lambda: proxy.cutting_for(6.0))
        report(run, f"cut {proxy.cut}")
        await assert_recovered(run, group)




async def test_the_embedded_store_s_service_killed_mid_call_and_started_again_grants_nothing_twice(
    tmp_path: Path,
) -> None:
    # One replica (the embedded store is one service's file): its clients wait for it to come
    # back; what it granted before the kill holds, and tokens go on rising over the restart.
    with services() as group:
        replica, = replicas_on(group, tmp_path, 1, "--enhanced-locking-backend=boltdb")
        run = await run_under([replica], REPO, lambda: killed_and_started(replica))
        report(run)
        await assert_recovered(run, [replica])


async def _acquire_with_redis_frozen(server: RedisServer, replica: ServiceProcess, *,
                                     after: float) -> httpx.Response:
    """A fail-fast acquire sent to ``replica`` (on ``server`` alone) ``after`` seconds into a
    freeze of ``server`` (lasting until it is answered, at most 60 s): its answer."""
    body = {"project": {"repoFullName": REPO, "path": "p", "projectName": "p"},
            "pull": {"num": 1}, "user": {"username": "user-1"}}
    async with httpx.AsyncClient(base_url=replica.url, timeout=60) as http:
        with server.paused():
            await asyncio.sleep(after)
            began = time.monotonic()
            answer = await http.post("/v1/locks", json=body)
            took = time.monotonic() - began
    print(f"{after:g} s into the freeze: answered after {took:.1f} s")
    return answer


@pytest.mark.redis
async def test_with_redis_frozen_a_call_is_answered_in_its_limits_even_past_the_replica_timeout(
    redis_server: RedisServer, redis_servers: Callable[..., RedisServer], tmp_path: Path,
) -> None:
    # Redis holds the audit trail too: an entry it never takes must not hold up the answer
    # of the call it records. Answered while Redis is still frozen, each call the service
    # made given up at its 5 s limit (the acquire, a ping that tells an outage, the audit
    # entry: about 15 s); before, no answer came until Redis woke up.
    #
    # The replica registry is in Redis too. A registry round that Redis never answers must
    # fail at the call's limit: the round holds the registry's lock, and once the view is
    # older than the replica timeout (6 s by default) every acquire reads the registry first,
    # behind that lock (before, every acquire then waited for Redis to wake up).
    #
    # The two (a call at once, a call 7 s into the freeze) each on a Redis and a replica of
    # their own, both started (side by side) before either freeze, then frozen side by side:
    # their waits for the limits overlap.
    later = redis_servers()
    with services() as group:
        (at_once,), (past,) = await asyncio.gather(*(asyncio.to_thread(
            replicas_on, group, tmp_path / name, 1, "--enhanced-locking-backend=redis",
            f"--enhanced-locking-redis-addr={server.addr}")
            for name, server in (("at-once", redis_server), ("past", later))))
        async with asyncio.TaskGroup() as freezes:
            answered_at_once = freezes.create_task(
                _acquire_with_redis_frozen(redis_server, at_once, after=0.0))
            answered_past = freezes.create_task(
                _acquire_with_redis_frozen(later, past, after=7.0))
    for name, task in (("at once", answered_at_once), ("past the replica timeout",
                                                       answered_past)):
        answer = task.result()
        assert answer.status_code == 503 and answer.json()["reason"] == "unavailable", (
            name, answer.text)


async def _dealt_with_the_old_release(replica: ServiceProcess) -> None:
    """Until ``replica`` says what it did with the by-key release its client left: not made
    (its warning), or made (its audit row of action ``release``)."""
    for _ in range(200):
        if ("not made: DELETE /v1/locks/by-key" in replica.stderr()
                or '"action":"release"' in replica.stdout()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the woken replica never dealt with the old release:\n"
                         f"{replica.output()}")


@pytest.mark.redis
async def test_a_release_its_client_gave_up_on_is_not_made_when_its_frozen_replica_wakes(
    redis_server: RedisServer, tmp_path: Path,
) -> None:
    # A client's release reaches a replica that is frozen; the client gives up on it (its
    # timeout), releases through another replica and takes the key again. When the frozen
    # replica wakes, the old release must not free the new hold (before, it did: the client
    # held a lock the store had let go, and the next acquire of another pull was granted).
    with services() as group:
        frozen_one, other = replicas_on(group, tmp_path, 2, "--enhanced-locking-backend=redis",
                                        f"--enhanced-locking-redis-addr={redis_server.addr}")
        body = {"project": {"repoFullName": REPO, "path": "p", "projectName": "p"},
                "pull": {"num": 1}, "user": {"username": "user-1"}}
        key = f"{REPO}/p/default/p"
        async with httpx.AsyncClient(base_url=other.url, timeout=10) as http, \
                httpx.AsyncClient(base_url=frozen_one.url, timeout=1) as impatient:
            assert (await http.post("/v1/locks", json=body)).status_code == 200
            assert frozen_one.process is not None
            frozen_one.process.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(httpx.TimeoutException):
                    await impatient.delete("/v1/locks/by-key", params={"key": key, "pull": 1})
                released = await http.delete("/v1/locks/by-key", params={"key": key, "pull": 1})
                assert released.status_code == 200
                again = (await http.post("/v1/locks", json=body)).json()["lock"]
            finally:
                frozen_one.process.send_signal(signal.SIGCONT)
            # The woken replica answers again; then it has dealt with the old release: not
            # made (logged), or made (audited: its only release).
            assert (await impatient.get("/healthz")).status_code == 200
            await _dealt_with_the_old_release(frozen_one)
            held = await http.get("/v1/locks/by-key", params={"key": key})
            assert held.status_code == 200, held.text
            assert held.json()["lock"]["fencingToken"] == again["fencingToken"]
            other_pull = {**body, "pull": {"num": 2}}
            refused = await http.post("/v1/locks", json=other_pull)
            assert refused.status_code == 409 and refused.json()["reason"] == "held"
