"""The search for the etcd leader asks every endpoint at once, on a real three-member etcd.

A follower frozen (SIGSTOP: its connections stay open, it answers nothing) and listed before
the leader costs the search nothing: its ``Status`` is cancelled once the leader's claim and
the other member's answer are in. Before, the endpoints were asked one after the other and
each round waited the frozen one's whole ``STATUS_TIMEOUT`` before asking the leader, the
transactions on the balanced channel meanwhile. A member that says it leads in a raft term
older than the one already known is not routed to (a former leader cut off from the others);
before, any claim was. ``close()`` during a search ends every ask and closes every channel.

A cluster made anew at the same endpoints (new data, its raft terms from the start) is found
and routed to: by the same connection when its cluster id is another one (its terms are then
the known ones, from none), and after a close (which forgets the known term) when its id is
the same (same cluster token, same peer addresses). Before, the known term only rose, and
every claim of the new cluster was passed over as an older one's, for good.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from etcd3aio._protobuf import TxnRequest
from tests.support.etcd_asks import Asking
from tests.support.etcd_fixtures import started
from tests.support.etcd_server import EtcdCluster, EtcdMember, frozen

from enhanced_locking.backends import etcd_connection
from enhanced_locking.backends.etcd_connection import DOWN, EtcdConnection, EtcdSettings

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(120)]


def ordered(cluster: EtcdCluster) -> tuple[EtcdMember, EtcdMember, EtcdMember]:
    """A follower, the leader, the other follower."""
    leader = cluster.leader()
    assert leader is not None
    first, other = (member for member in cluster.members if member is not leader)
    return first, leader, other


def term_of(cluster: EtcdCluster, member: EtcdMember) -> int:
    status = cluster.status(member)
    assert status is not None, f"{member.name} does not answer"
    header = status["header"]
    assert isinstance(header, dict)
    return int(header["raft_term"])


async def searched(connection: Asking) -> None:
    """A search for the leader started, and awaited."""
    connection._look_for_leader()
    looking = connection._looking
    assert looking is not None
    await looking


async def test_a_frozen_follower_before_the_leader_is_not_waited_for(
        three: EtcdCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The follower listed first is frozen and the search runs again: the route reaches the
    leader with the frozen follower's ask cancelled, every endpoint asked before any answer
    came. Before, the frozen one was asked alone first, and failed after ``STATUS_TIMEOUT``."""
    # Longer than any answer on a loaded machine: the frozen ask ends only by the search's
    # cancel now, by this timeout before.
    monkeypatch.setattr(etcd_connection, "STATUS_TIMEOUT", 10.0)
    stopped, leader, other = ordered(three)
    endpoints = (stopped.endpoint, leader.endpoint, other.endpoint)
    connection = Asking(EtcdSettings(endpoints=endpoints))
    loop = asyncio.get_running_loop()
    try:
        await connection.client()
        await searched(connection)  # every member's client made, none frozen
        assert connection.leader == leader.endpoint and connection.leader_changes == 1
        connection.asks.clear()
        with frozen(stopped):
            connection._unroute()
            at = loop.time()
            await searched(connection)
            took = loop.time() - at
            asks = list(connection.asks)
            routed = connection.leader
    finally:
        await connection.close()
    print(f"routed to the leader {took:.3f} s after the search began, the first endpoint "
          f"frozen (asks: {asks})")
    assert routed == leader.endpoint and connection.leader_changes == 2
    assert asks[:3] == [("asked", endpoint) for endpoint in endpoints], asks
    ended = dict((endpoint, how) for how, endpoint in asks[3:])
    assert len(asks) == 6 and set(ended) == set(endpoints), asks  # each ask ended, once
    assert ended == {stopped.endpoint: "cancelled", leader.endpoint: "answered",
                     other.endpoint: "answered"}, asks


async def test_a_claim_in_a_term_older_than_the_known_one_is_not_routed_to(
        three: EtcdCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a newer raft term already known (an answer from the members that elected a new
    leader), the member that says it leads in the older term is passed over; in the current
    term it is routed to."""
    monkeypatch.setattr(etcd_connection, "LEADER_LOOKS", 2)
    _, leader, _ = ordered(three)
    term = term_of(three, leader)
    connection = Asking(EtcdSettings(endpoints=tuple(three.endpoints)))
    try:
        await connection.client()
        connection._term = term + 1
        await searched(connection)
        assert connection.leader is None and connection.leader_changes == 0
        assert [how for how, _ in connection.asks].count("answered") == 6, connection.asks
        assert connection._term == term + 1
        connection._term = term
        await searched(connection)
        assert connection.leader == leader.endpoint and connection.leader_changes == 1
    finally:
        await connection.close()


async def test_a_close_during_a_search_ends_every_ask_and_closes_every_channel(
        three: EtcdCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A search waits for a frozen follower (no claim counts: a newer term is known) and the
    connection is closed: the search ends, the frozen follower's ask is cancelled and every
    member's channel is closed."""
    monkeypatch.setattr(etcd_connection, "STATUS_TIMEOUT", 60.0)
    stopped, leader, _ = ordered(three)
    connection = Asking(EtcdSettings(endpoints=tuple(three.endpoints)))
    try:
        await connection.client()
        await searched(connection)  # every member's client made, none frozen
        assert connection.leader == leader.endpoint
        members = list(connection._members.values())
        assert len(members) == 3
        connection.asks.clear()
        connection._unroute()
        connection._term = term_of(three, leader) + 1
        with frozen(stopped):
            connection._look_for_leader()
            looking = connection._looking
            assert looking is not None
            await connection.answered(2)
            assert not looking.done()  # waiting for the frozen follower
            await connection.close()
            asks = list(connection.asks)
    finally:
        await connection.close()
    assert looking.done() and connection._looking is None
    assert ("cancelled", stopped.endpoint) in asks and len(asks) == 6, asks
    assert connection._members == {} and all(member.kv is None for member in members)


async def transacted(connection: EtcdConnection) -> Any:
    """The header of the answer to the connection's next transaction (a read of nothing)."""
    client = await connection.client()
    request = TxnRequest()
    request.success.add().request_range.key = b"/search/nothing"
    return (await connection.transact(client, request, read=True)).header


async def answered(connection: EtcdConnection) -> Any:
    """The header of the first answer to a transaction sent again until one is answered (for
    60 s: a cluster starting, the channels connecting again)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return await transacted(connection)
        except DOWN:
            assert time.monotonic() < deadline, "no transaction answered"
            await asyncio.sleep(0.2)


async def routed_to_leader(connection: EtcdConnection, cluster: EtcdCluster) -> EtcdMember:
    """The cluster's leader, once the connection's transactions are routed to it."""
    deadline = time.monotonic() + 40
    while True:
        leader = cluster.leader()
        if leader is not None and connection.leader == leader.endpoint:
            return leader
        assert time.monotonic() < deadline, (connection.leader, leader)
        await transacted(connection)  # an answer in a new term starts a search
        await asyncio.sleep(0.05)


async def handed_over(connection: EtcdConnection, cluster: EtcdCluster, times: int) -> int:
    """The leadership handed to another member ``times`` times (each hand-over is a new raft
    term) and the route following it; the term the connection knows then."""
    for _ in range(times):
        leader = await routed_to_leader(connection, cluster)
        heir = next(member for member in cluster.members if member is not leader)
        member = await connection._member(leader.endpoint)  # MoveLeader asks the leader
        assert member.maintenance is not None
        await member.maintenance.move_leader(cluster.member_id(heir), timeout=10)
    await routed_to_leader(connection, cluster)
    return connection._term


@pytest.mark.parametrize("same_id", [False, True],
                         ids=["another-id-same-connection", "same-id-after-a-close"])
async def test_a_cluster_made_anew_at_the_same_endpoints_is_routed_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same_id: bool) -> None:
    """The cluster's term is raised by hand-overs, the cluster is closed and another one
    started on the same ports with new data, its terms lower. With another cluster token
    (another id), the same connection, its route dropped at the first failed call, finds the
    new leader and routes to it. With the same token (the same id: etcd derives the ids from
    the token and the peer addresses), the answers cannot tell the new cluster apart: the
    connection is closed, and once opened again routes to the new leader. Before, the known
    term stayed (it only rose, and a close kept it): the new cluster's claims were passed
    over as older ones, for good."""
    # The search goes on while the members' channels connect again (gRPC's back-off).
    monkeypatch.setattr(etcd_connection, "LEADER_LOOKS", 200)
    with started(tmp_path / "a", members=3) as old:
        connection = EtcdConnection(EtcdSettings(endpoints=tuple(old.endpoints)))
        try:
            known = await handed_over(connection, old, 5)
            old_id = int((await transacted(connection)).cluster_id)
            if same_id:
                await connection.close()
                old.close()
            else:
                old.close()
                with pytest.raises(DOWN):  # the route fails, and is dropped
                    await transacted(connection)
                assert connection.leader is None
            changes = connection.leader_changes
            fresh = old.anew(tmp_path / "b",
                             token=old.token if same_id else f"{old.token}-anew").start()
            try:
                leader = fresh.leader()
                assert leader is not None
                assert term_of(fresh, leader) < known, "the new cluster's term is not lower"
                assert (int((await answered(connection)).cluster_id) == old_id) is same_id
                await routed_to_leader(connection, fresh)
                assert connection.leader_changes == changes + 1
                assert connection._term < known
            finally:
                fresh.close()
        finally:
            await connection.close()
