"""A service stopped (SIGTERM) while its Redis is down exits promptly, as Kubernetes expects.

Calls answered 503 in the outage leave work behind for Redis (the events' outbox, audit rows,
give-backs of acquires whose callers were not told their answers), and the replica registry
says goodbye on the way out: none of it can reach a store that is down, and none may hold the
stop for a call's own 5 s limit after another. The bound below is that limit twice: a stop that
waited it out for two of them is killed, and the test fails.
"""

from __future__ import annotations

import httpx
import pytest
from tests.conftest import ServiceFactory
from tests.support.locks import lock_body
from tests.support.redis_server import RedisServer

from enhanced_locking.backends.redis_connection import COMMAND_TIMEOUT

pytestmark = pytest.mark.redis


def test_a_service_stopped_while_its_redis_is_down_exits_before_two_call_limits(
    redis_server: RedisServer, service_process: ServiceFactory,
) -> None:
    service = service_process("--enhanced-locking-enabled", "--enhanced-locking-backend=redis",
                              f"--enhanced-locking-redis-addr={redis_server.addr}",
                              "--enhanced-locking-fallback=fail-closed")
    body = lock_body("acme/infra", "envs/prod", 1)
    with httpx.Client(base_url=service.url, timeout=60) as client:
        assert client.post("/v1/locks", json=body).status_code == 200
        redis_server.stop()
        # Calls answered 503 leave work behind for Redis: give-backs, audit rows, events.
        for _ in range(3):
            answer = client.post("/v1/locks", json=lock_body("acme/infra", "envs/dev", 2))
            assert answer.status_code == 503, answer.text
            assert answer.json()["reason"] == "unavailable"
    code = service.stop(grace=2 * COMMAND_TIMEOUT)
    assert code == 0, f"not stopped within {2 * COMMAND_TIMEOUT:.0f} s of SIGTERM (killed)"
