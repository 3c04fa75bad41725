"""An etcd answer that came while this process's event loop stalled past the call's limit is
taken, not told ``unavailable``: a call's deadline on etcd is gRPC's, kept by its core (its
own threads), which takes the answer when it comes, stalled loop or not. (On Redis the limit
is a timer on the loop, which came due in the same turn as the answer read after a stall:
``test_redis_slow_answers``.)"""

from __future__ import annotations

import os
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from tests.support.etcd_fixtures import etcd_config
from tests.support.etcd_server import EtcdCluster, frozen
from tests.support.locks import lock_for, request_for
from tests.support.stalls import answered_across_a_stall

from enhanced_locking.backends.etcd_connection import CALL_TIMEOUT
from enhanced_locking.backends.etcd_store import GONE_AFTER, EtcdBackend

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


async def test_a_session_renewal_answered_while_the_event_loop_stalled_past_its_limit_is_taken(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    """The renewal's limit is gRPC's deadline too. Before, it was a timer on the loop
    (``asyncio.wait_for`` around the keep-alive stream's read), due in the same turn as the
    answer read after the stall: the renewal etcd had applied was taken for one that failed,
    and two such in a row (10 s unanswered) made the replica tell its waiters ``unavailable``
    while etcd still had their session."""
    backend = EtcdBackend.from_config(etcd_config(etcd_cluster, etcd_prefix), "enhanced")
    try:
        await backend._ensure_session()
        lease = backend.session_lease
        left = await stalled(etcd_cluster, backend._renew(lease))
        assert left > 0
        assert backend.session_lease == lease
    finally:
        await backend.close()


async def test_a_lease_check_answered_while_the_event_loop_stalled_past_its_limit_is_taken(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    """The lease check of another replica's session (whether its waiters are a dead
    replica's, and its grants to be taken back) is bounded by gRPC's deadline too. Before,
    the library's call was bounded by a timer on the loop as well: the answer was lost, and
    the check counted the replica alive for that step (a grant's take-back a second later)."""
    config = etcd_config(etcd_cluster, etcd_prefix)
    other, backend = (EtcdBackend.from_config(config, "enhanced") for _ in range(2))
    try:
        await other._ensure_session()
        await backend.ping()
        _, since = await stalled(etcd_cluster, backend._unrenewed(other.session_lease, key=None))
        assert since is not None and since <= GONE_AFTER
    finally:
        await other.close()
        await backend.close()
