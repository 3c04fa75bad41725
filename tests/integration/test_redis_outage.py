"""What the service answers while its Redis is down: an outage is said as one (503), never as
"not held", and what the legacy fallback granted during it, legacy lists and releases.
"""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from tests.conftest import ServiceMaker
from tests.support.redis_server import RedisServer

from enhanced_locking.api import create_app
from enhanced_locking.types import BackendUnavailable, LockRequest, Project, Pull

pytestmark = pytest.mark.redis

REPO = "acme/outage"


def ask(path: str, pull: int, **extra: object) -> LockRequest:
    return LockRequest(project=Project(repo_full_name=REPO, path=path), pull=Pull(num=pull),
                       **extra)


async def test_a_refresh_while_redis_is_down_is_an_outage_not_a_free_key(
    make_service: ServiceMaker, redis_server: RedisServer,
) -> None:
    service = await make_service(enabled=True, backend="redis", redis_addr=redis_server.addr)
    granted = await service.router.acquire(ask("a", 1, ttl=timedelta(minutes=1)))
    assert granted.acquired and granted.lock is not None
    redis_server.stop()
    with pytest.raises(BackendUnavailable):
        await service.router.refresh(granted.lock_key, owner=(REPO, 1),
                                     ttl=timedelta(minutes=5))
    transport = httpx.ASGITransport(app=create_app(service, manage_lifecycle=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
        answer = await http.post("/v1/locks/refresh",
                                 json={"key": granted.lock_key, "pull": 1, "ttl": "5m"})
    assert answer.status_code == 503, answer.text
    assert answer.json()["reason"] == "unavailable"
