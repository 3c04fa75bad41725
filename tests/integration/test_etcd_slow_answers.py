"""An etcd answer that came while this process's event loop stalled past the call's limit is
taken, not told ``unavailable``: a call's deadline on etcd is gRPC's, kept by its core (its
own threads), which takes the answer when it comes, stalled loop or not. (On Redis the limit
is a timer on the loop, which came due in the same turn as the answer read after a stall:
``test_redis_slow_answers``.)"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from tests.support.cutting_proxy import CuttingProxy, cutting_proxy
from tests.support.etcd_fixtures import auth_on, etcd_config, grant, started
from tests.support.etcd_server import LOOPBACK, EtcdCluster, frozen, leader_of
from tests.support.locks import candidate_for, lock_for, request_for
from tests.support.stalls import answered_across_a_stall

from enhanced_locking.backends import etcd_connection, etcd_store
from enhanced_locking.backends.audit_store import AuditQuery, Retention
from enhanced_locking.backends.etcd_audit import EtcdAuditStore
from enhanced_locking.backends.etcd_connection import CALL_TIMEOUT, EtcdConnection, EtcdSettings
from enhanced_locking.backends.etcd_events import EtcdEventBus
from enhanced_locking.backends.etcd_store import GONE_AFTER, EtcdBackend
from enhanced_locking.backends.waiting import QueuePolicy, Status, Wait
from enhanced_locking.types import AuditEntry, utcnow

pytestmark = pytest.mark.etcd

T = TypeVar("T")


async def stalled(cluster: EtcdCluster, call: Coroutine[Any, Any, T]) -> T:
    """``call``'s answer, sent while the cluster's (first) member is frozen: the member goes
    on 1 s later while this process's event loop is held past the call's limit."""
    member = cluster.members[0]
    assert member.process is not None
    pid = member.process.popen.pid
    with frozen(member):
        return await answered_across_a_stall(call, lambda: os.kill(pid, signal.SIGCONT),
                                             CALL_TIMEOUT)


async def test_an_answer_that_came_while_the_event_loop_stalled_past_the_limit_is_taken(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    backend = EtcdBackend.from_config(etcd_config(etcd_cluster, etcd_prefix), "enhanced")
    try:
        await backend.ping()
        granted, lock = await stalled(etcd_cluster, backend.acquire(lock_for(request_for(pull=1))))
        assert granted and lock.pull.num == 1
    finally:
        await backend.close()


async def test_session_renewals_answered_while_the_event_loop_stalled_keep_the_waiter(
    etcd_cluster: EtcdCluster, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replica's session renewals are bounded by gRPC's deadline too. Renewed here every
    0.05 s (so one is under way whenever the loop stalls), two answered while the loop was
    held past the call's limit, one stall after the other: both are taken, the session stays
    and its waiter is granted at the release. Before, the renewal's limit was a timer on the
    loop (``asyncio.wait_for`` around the keep-alive stream's read), due in the same turn as
    the answer read after the stall: a renewal etcd had applied was taken for one that
    failed, and two such in a row (over the session's 10 s without an answer taken) made the
    replica tell its waiter ``unavailable`` while etcd still had their session."""
    monkeypatch.setattr(etcd_store, "RENEW_EVERY", 0.05)
    holder = EtcdBackend.from_config(etcd_config(etcd_cluster, etcd_prefix), "enhanced")
    with cutting_proxy((LOOPBACK, etcd_cluster.members[0].client_port)) as proxy:
        waiting = EtcdBackend.from_config(etcd_config(
            etcd_cluster, etcd_prefix, etcd_endpoints=[proxy.addr]), "enhanced")
        try:
            held = await grant(holder, candidate_for(request_for(pull=1)))
            offer = Wait(id=secrets.token_hex(8), timeout=timedelta(seconds=90))
            told = waiting.grants.expect(offer.id)
            queued = await waiting.acquire_or_enqueue(
                candidate_for(request_for(pull=2)), ttl=None, wait=offer, policy=QueuePolicy())
            assert queued.status is Status.QUEUED, queued
            lease = waiting.session_lease
            for _ in range(2):
                with proxy.holding() as release:
                    await answered_across_a_stall(asyncio.sleep(0), release, CALL_TIMEOUT)
            await holder.release_and_handoff(held.key, owner=held.owner)
            notice = await asyncio.wait_for(told, 30)
            assert [lock.pull.num for lock in notice.locks] == [2], notice
            assert waiting.session_lease == lease
        finally:
            await waiting.close()
            await holder.close()


async def test_a_lease_check_answered_while_the_event_loop_stalled_past_its_limit_is_taken(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    """The lease check of another replica's session (whether its waiters are a dead
    replica's, and its grants to be taken back) is bounded by gRPC's deadline too. Before,
    the library's call was bounded by a timer on the loop as well: the answer was lost, and
    the check counted the replica alive for that step (a grant's take-back a second later).

    The check is called by itself (the other replica's session opened by a waiter): a step
    makes it only where its view leads it, and its public effect needs a replica gone for
    between 5 and 10 s. A release held across the stall, the first waiter's replica cut off,
    sent a transaction first and the check only after the stall, past the session's end: it
    passed with the timer put back, so it could not tell."""
    config = etcd_config(etcd_cluster, etcd_prefix)
    other, backend = (EtcdBackend.from_config(config, "enhanced") for _ in range(2))
    try:
        await grant(backend, candidate_for(request_for(pull=1)))
        queued = await other.acquire_or_enqueue(  # (the other replica's session opened)
            candidate_for(request_for(pull=2)), ttl=None,
            wait=Wait(id=secrets.token_hex(8), timeout=timedelta(seconds=90)),
            policy=QueuePolicy())
        assert queued.status is Status.QUEUED, queued
        _, since = await stalled(etcd_cluster, backend._unrenewed(other.session_lease, key=None))
        assert since is not None and since <= GONE_AFTER
    finally:
        await other.close()
        await backend.close()


HELD = 4.0
"""The limit of the calls the tests below hold across a stall (their answers come about
1.3 s after they were sent: well within it on a loaded machine)."""


async def held(proxy: CuttingProxy, call: Coroutine[Any, Any, T]) -> T:
    """``call``'s answer, sent while the proxy holds its member's answers: they pass 1 s later
    while this process's event loop is held past the call's limit (``HELD``). The member
    itself goes on serving (frozen, a leader would be voted out meanwhile)."""
    with proxy.holding() as release:
        return await answered_across_a_stall(call, release, HELD)


async def test_calls_on_the_route_answered_while_the_event_loop_stalled_keep_the_route(
    three: EtcdCluster, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read (the ping) and a lease grant (a lock with a TTL) sent to the leader, their
    answers come within the route's limit while the loop is held past it: both are taken, and
    the route stays (no search for a leader that never went). Before, the library's call
    added a timer on the loop: the answers were lost, the route dropped, and the call sent
    again on the balanced channel."""
    monkeypatch.setattr(etcd_connection, "ROUTE_TIMEOUT", HELD)
    for _ in range(3):  # on a loaded machine an election may move the leader meanwhile
        leader = leader_of(three)
        with cutting_proxy((LOOPBACK, leader.client_port)) as proxy:
            endpoints = (proxy.addr, *(m.endpoint for m in three.members if m is not leader))
            backend = EtcdBackend(EtcdConnection(EtcdSettings(endpoints=endpoints)),
                                  prefix="/held-route/")
            try:
                await routed(backend, proxy.addr)
                changes = backend.connection.leader_changes
                await held(proxy, backend.ping())
                candidate = candidate_for(request_for(pull=7))
                outcome = await held(proxy, backend.acquire_or_enqueue(
                    candidate, ttl=timedelta(seconds=60), wait=None, policy=QueuePolicy()))
                if three.leader() is not leader:
                    continue  # the leader moved: its route was rightly dropped
                assert outcome.status is Status.GRANTED, outcome
                assert backend.connection.leader == proxy.addr
                assert backend.connection.leader_changes == changes
                return
            finally:
                await backend.close()
    pytest.fail("the leader moved in each of three tries")


async def routed(backend: EtcdBackend, endpoint: str) -> None:
    """Pairs until the backend's route leads to ``endpoint`` (30 s at most)."""
    deadline = time.monotonic() + 30
    pull = 100
    while backend.connection.leader != endpoint:
        assert time.monotonic() < deadline, (backend.connection.leader, endpoint)
        pull += 1
        granted, _ = await backend.acquire(lock_for(request_for(path=f"envs/{pull}", pull=pull)))
        assert granted
        await asyncio.sleep(0.05)


async def test_a_status_answered_while_the_event_loop_stalled_is_taken(
    three: EtcdCluster, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``Status`` (a watch's move, the search for the leader) is bounded by gRPC's deadline
    alone too: the move from the first member takes the second, whose answer came within its
    limit while the loop was held past it. Before, the library's timer lost that answer,
    and the move went back to the member the watch had left."""
    monkeypatch.setattr(etcd_connection, "STATUS_TIMEOUT", HELD)
    first, second, _ = three.members
    with cutting_proxy((LOOPBACK, second.client_port)) as proxy:
        connection = EtcdConnection(EtcdSettings(endpoints=(first.endpoint, proxy.addr)))
        try:
            await connection.client()
            left = three.member_id(first)
            assert await connection.turn_besides(0, left) == 1  # (its clients made)
            assert await held(proxy, connection.turn_besides(0, left)) == 1
        finally:
            await connection.close()


async def test_an_events_write_answered_while_the_event_loop_stalled_is_sent_once(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    """The outbox's write of a replica's events (no lock step carried them) is bounded by
    gRPC's deadline alone: answered while the loop was held past the call's limit, it is
    taken, and the events are written with one transaction. Before, the library's timer lost
    the answer, and the outbox sent the write again (its tag found it applied)."""
    member = etcd_cluster.members[0]
    with cutting_proxy((LOOPBACK, member.client_port)) as proxy:
        bus = EtcdEventBus(EtcdConnection(EtcdSettings(endpoints=(proxy.addr,))),
                           key=f"{etcd_prefix}events")
        try:
            bus.publish("fallback", key="first", action="legacy")
            await bus._outbox.drained(30)  # (connected, the writer key known)
            assert bus.writes == 1

            async def published() -> None:
                bus.publish("fallback", key="second", action="legacy")
                await bus._outbox.drained(30)

            with proxy.holding() as release:
                await answered_across_a_stall(published(), release, CALL_TIMEOUT)
            assert bus.writes == 2
        finally:
            await bus.close()


async def test_a_login_answered_while_the_event_loop_stalled_is_taken(tmp_path: Path) -> None:
    """The login (``Authenticate``: a connection's first call with auth on, then its token's
    refreshes) is bounded by gRPC's deadline alone: answered while the loop was held past the
    call's limit, the token is taken and the replica's first call (the readiness check)
    answered. Before, the library's call added a timer on the loop: the answer was lost, and
    with one endpoint the connect failed (``unavailable``)."""
    with started(tmp_path / "etcd") as cluster:
        await auth_on(cluster, password="root-secret")
        with cutting_proxy((LOOPBACK, cluster.members[0].client_port)) as proxy:
            backend = EtcdBackend(EtcdConnection(EtcdSettings(
                endpoints=(proxy.addr,), username="root", password="root-secret")),
                prefix="/held-login/")
            try:
                with proxy.holding() as release:
                    await answered_across_a_stall(backend.ping(), release, CALL_TIMEOUT)
                granted, _ = await backend.acquire(lock_for(request_for(pull=1)))
                assert granted  # (with the token the login gave)
            finally:
                await backend.close()


def audit_entry(pull: int) -> AuditEntry:
    return AuditEntry(time=utcnow(), identity="ada", method="static", verb="lock",
                      action="acquire", key=f"acme/infra/{pull}/default", repo="acme/infra",
                      pull=pull, outcome="acquired", status=200)


@asynccontextmanager
async def audit_trail(cluster: EtcdCluster, prefix: str) -> AsyncIterator[
        tuple[EtcdAuditStore, CuttingProxy]]:
    """The audit trail on ``cluster``'s first member through a proxy, one entry written (its
    connection made, the first write's prune done)."""
    with cutting_proxy((LOOPBACK, cluster.members[0].client_port)) as proxy:
        store = EtcdAuditStore(EtcdConnection(EtcdSettings(endpoints=(proxy.addr,))), prefix,
                               Retention(timedelta(days=1), 1000))
        try:
            await store.append(audit_entry(1))
            assert [e.pull for e in await store.read(AuditQuery())] == [1]
            yield store, proxy
        finally:
            await store.close()


async def test_an_audit_read_answered_while_the_event_loop_stalled_is_taken(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    """A read of the audit trail (``GET /v1/audit``) is bounded by gRPC's deadline alone:
    answered while the loop was held past the call's limit, its entries are given. Before,
    the library's timer lost the answer, and the read failed (``unavailable``, 503)."""
    async with audit_trail(etcd_cluster, etcd_prefix) as (store, proxy):
        with proxy.holding() as release:
            read = await answered_across_a_stall(store.read(AuditQuery()), release,
                                                 CALL_TIMEOUT)
        assert [e.pull for e in read] == [1]


async def test_an_audit_write_answered_while_the_event_loop_stalled_is_sent_once(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    """The audit trail's write of a batch is bounded by gRPC's deadline alone: answered while
    the loop was held past the call's limit, it is taken, and each entry is written once
    (its key's version 1). Before, the library's timer lost the answer, and the outbox wrote
    the batch again."""
    async with audit_trail(etcd_cluster, etcd_prefix) as (store, proxy):

        async def appended() -> AuditEntry:
            stored = await store.append(audit_entry(2))
            await store._outbox.drained(30)
            return stored

        with proxy.holding() as release:
            stored = await answered_across_a_stall(appended(), release, CALL_TIMEOUT)
        assert [e.pull for e in await store.read(AuditQuery())] == [2, 1]
        client = await store._connection.client()
        assert client.kv is not None
        written = (await client.kv.get(store._prefix + stored.id.encode())).kvs
        assert [kv.version for kv in written] == [1]
