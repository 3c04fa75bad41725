"""A call that finds every pooled Redis connection busy is an overload, not an outage.

The replica's pool (``enhanced-locking-redis-pool-size``) is all in use by other calls while
Redis itself answers at once. A call that waits past the pool's bound for a connection is
answered as the service's other overload is: ``503`` with ``reason: overloaded`` and
``Retry-After``, and a router does not send it to the legacy side (which it does for a store
that does not answer). Before, the call's own 5 s limit ran out first, equal to the pool's,
and the caller was told the store did not answer: the router's fall-back granted the key on
legacy, under a flood larger than the pool.
"""

from __future__ import annotations

import time

import httpx
import pytest
import redis.asyncio as aioredis
from tests.conftest import ServiceMaker
from tests.support.redis_server import RedisServer

from enhanced_locking.api import create_app
from enhanced_locking.backends.redis_store import RedisBackend

pytestmark = pytest.mark.redis

REPO = "acme/busy"


def _body(path: str, pull: int) -> dict[str, object]:
    return {"project": {"repoFullName": REPO, "path": path}, "pull": {"num": pull}}


async def test_a_call_with_no_free_pooled_connection_is_answered_overloaded(
    make_service: ServiceMaker, redis_server: RedisServer,
) -> None:
    service = await make_service(enabled=True, backend="redis", redis_addr=redis_server.addr,
                                 redis_pool_size=2, fallback="legacy", legacy_backend="memory")
    assert service.enhanced is not None
    backend = service.enhanced.backend
    assert isinstance(backend, RedisBackend)
    transport = httpx.ASGITransport(app=create_app(service, manage_lifecycle=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
        first = await http.post("/v1/locks", json=_body("a", 1))
        assert first.status_code == 200, first.text
        assert first.json()["lock"]["backend"] == "enhanced"
        # Every connection of the pool taken by other users (Redis answers all along).
        await backend.connection.drop_idle()
        client = backend.connection.client
        assert isinstance(client, aioredis.Redis)
        pool = client.connection_pool
        taken = [await pool.get_connection()  # type: ignore[no-untyped-call]
                 for _ in range(2)]
        try:
            started = time.monotonic()
            busy = await http.post("/v1/locks", json=_body("b", 2))
            took = time.monotonic() - started
            on_legacy = await service.legacy.get(f"{REPO}/b/default/")  # (no project name)
        finally:
            for connection in taken:
                await pool.release(connection)
        assert busy.status_code == 503, busy.text
        assert busy.json()["reason"] == "overloaded", busy.text
        assert busy.headers["retry-after"] == "1"
        assert "enhanced-locking-redis-pool-size" in busy.json()["error"], busy.text
        assert on_legacy is None, f"fell back to legacy: {on_legacy}"
        assert took < 4.9, took  # the pool's own bound, within the call's 5 s limit
        # Once a connection is free the same request is served, on the enhanced side.
        again = await http.post("/v1/locks", json=_body("b", 2))
        assert again.status_code == 200, again.text
        assert again.json()["lock"]["backend"] == "enhanced"
        assert (await http.get("/v1/locks", params={"repo": REPO})).json()["locks"] != []
