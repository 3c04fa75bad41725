"""The search for the etcd leader asks every endpoint at once, on a real three-member etcd.

A follower frozen (SIGSTOP: its connections stay open, it answers nothing) and listed before
the leader costs the search nothing: its ``Status`` is cancelled once the leader's claim and
the other member's answer are in. Before, the endpoints were asked one after the other and
each round waited the frozen one's whole ``STATUS_TIMEOUT`` before asking the leader, the
transactions on the balanced channel meanwhile. A member that says it leads in a raft term
older than the one already known is not routed to (a former leader cut off from the others);
before, any claim was. ``close()`` during a search ends every ask and closes every channel.
"""

from __future__ import annotations

import asyncio

import pytest
from tests.support.etcd_asks import Asking
from tests.support.etcd_server import EtcdCluster, EtcdMember, frozen

from enhanced_locking.backends import etcd_connection
from enhanced_locking.backends.etcd_connection import EtcdSettings

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
