"""An etcd answer that came while this process's event loop stalled past the call's limit is
taken, not told ``unavailable``: a call's deadline on etcd is gRPC's, kept by its core (its
own threads), which takes the answer when it comes, stalled loop or not. (On Redis the limit
is a timer on the loop, which came due in the same turn as the answer read after a stall:
``test_redis_slow_answers``.)"""

from __future__ import annotations

import os
import signal

import pytest
from tests.support.etcd_fixtures import etcd_config
from tests.support.etcd_server import EtcdCluster, frozen
from tests.support.locks import lock_for, request_for
from tests.support.stalls import answered_across_a_stall

from enhanced_locking.backends.etcd_connection import CALL_TIMEOUT
from enhanced_locking.backends.etcd_store import EtcdBackend

pytestmark = pytest.mark.etcd


async def test_an_answer_that_came_while_the_event_loop_stalled_past_the_limit_is_taken(
    etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    backend = EtcdBackend.from_config(etcd_config(etcd_cluster, etcd_prefix), "enhanced")
    try:
        await backend.ping()
        member = etcd_cluster.members[0]
        assert member.process is not None
        pid = member.process.popen.pid
        with frozen(member):
            granted, lock = await answered_across_a_stall(
                backend.acquire(lock_for(request_for(pull=1))),
                lambda: os.kill(pid, signal.SIGCONT), CALL_TIMEOUT)
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
        member = etcd_cluster.members[0]
        assert member.process is not None
        pid = member.process.popen.pid
        with frozen(member):
            left = await answered_across_a_stall(
                backend._renew(lease), lambda: os.kill(pid, signal.SIGCONT), CALL_TIMEOUT)
        assert left > 0
        assert backend.session_lease == lease
    finally:
        await backend.close()
