"""``kill -9`` the service while clients hold locks and wait for them, then start it again on the
same data dir: held locks are still held with their tokens, tokens keep rising, the waiters got
a clear error (their connection died with the process), and nothing is granted to them later."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from tests.conftest import ServiceFactory
from tests.support.locks import lock_body

from enhanced_locking.client import AsyncClient, ServiceError
from enhanced_locking.types import LockRequest

REPO = "acme/crash"


def key(path: str) -> str:
    return f"{REPO}/{path}/default/{path}"


async def queue_length(http: httpx.AsyncClient, path: str) -> int:
    return len((await http.get("/v1/queue", params={"key": key(path)})).json()["waiters"])


async def test_a_killed_service_keeps_its_locks_and_grants_nothing_to_dead_waiters(
    service_process: ServiceFactory,
) -> None:
    served = service_process("--enhanced-locking-enabled", "--enhanced-locking-max-timeout=1m")
    async with httpx.AsyncClient(base_url=served.url, timeout=10) as http:
        held = {}
        for path in ("a", "b"):
            answer = await http.post("/v1/locks", json=lock_body(REPO, path, 1, ttl="1h"))
            assert answer.status_code == 200
            held[path] = answer.json()["lock"]

        waiters = []
        for n, path in enumerate(["a", "a", "b"]):
            client = AsyncClient(served.url)
            request = LockRequest.model_validate(lock_body(REPO, path, 10 + n, wait="50s"))
            waiters.append((client, asyncio.create_task(client.acquire(request))))
        give_up = time.monotonic() + 60  # new clients' first calls, on a loaded machine too
        while time.monotonic() < give_up:
            if await queue_length(http, "a") == 2 and await queue_length(http, "b") == 1:
                break
            await asyncio.sleep(0.02)
        assert await queue_length(http, "a") == 2, "the waiters are queued before the crash"

        served.kill()
        for client, task in waiters:
            with pytest.raises(ServiceError) as lost:
                await asyncio.wait_for(task, 10)
            assert lost.value.status == 0
            assert "cannot reach the lock service" in str(lost.value)
            await client.__aexit__()

        served.restart()
        for path in ("a", "b"):
            answer = await http.get("/v1/locks/by-key", params={"key": key(path)})
            assert answer.status_code == 200
            assert answer.json()["lock"] == held[path], "held locks survive, token and lease"
            assert await queue_length(http, path) == 0, "waiters are not persisted"

        released = await http.delete("/v1/locks/by-key", params={"key": key("a"), "pull": 1})
        assert released.status_code == 200
        answer = await http.get("/v1/locks/by-key", params={"key": key("a")})
        assert answer.status_code == 404, "nothing was granted to a waiter that died"

        again = await http.post("/v1/locks", json=lock_body(REPO, "a", 20))
        assert again.status_code == 200
        assert again.json()["lock"]["fencingToken"] > held["a"]["fencingToken"]
