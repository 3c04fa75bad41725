"""When Redis stops under a running service: readiness says so, and the fallback decides.

``fallback: legacy`` (the seed's default) serves the request from the legacy locker, with a
``fallback`` event and a metric; ``fail-closed`` answers ``unavailable``. The Redis password
never shows: not in /readyz, not in the answers, not in the service's output.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from tests.support.locks import lock_body
from tests.support.redis_fixtures import ServerMaker
from tests.support.redis_server import RedisServer
from tests.support.service import ServiceProcess, services

pytestmark = pytest.mark.redis

PASSWORD = "pw-fallback-7d21e9-secret"
REPO = "acme/fallback"


@pytest.fixture
def secured(redis_servers: ServerMaker) -> RedisServer:
    server = redis_servers(persistence="aof")
    server.set_requirepass(PASSWORD)
    return server


Serve = Callable[[str], ServiceProcess]


@pytest.fixture
def serve(secured: RedisServer, tmp_path: Path) -> Iterator[Serve]:
    """``serve("legacy" | "fail-closed")``: the service on the password-protected Redis."""
    with services() as group:
        def start(fallback: str) -> ServiceProcess:
            return group.start(ServiceProcess(
                tmp_path / f"data-{fallback}",
                args=("--enhanced-locking-enabled", "--enhanced-locking-backend=redis",
                      f"--enhanced-locking-redis-addr={secured.addr}",
                      f"--enhanced-locking-fallback={fallback}"),
                env={"ATLANTIS_ENHANCED_LOCKING_REDIS_PASSWORD": PASSWORD},
                log_dir=tmp_path / "logs",
            ))

        yield start


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_with_fallback_legacy_a_stopped_redis_sends_requests_to_legacy(
    serve: Serve, secured: RedisServer,
) -> None:
    service = serve("legacy")
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:
        assert (await http.get("/readyz")).status_code == 200
        secured.stop()
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        state = ready.json()["backends"]["enhanced"]
        assert secured.addr in state and PASSWORD not in ready.text
        answer = await http.post("/v1/locks", json=lock_body(REPO, "a", 1, project=None))
        assert answer.status_code == 200, answer.text
        assert answer.json()["lock"]["backend"] == "legacy"
        assert PASSWORD not in answer.text
        metrics = (await http.get("/metrics")).text
        assert metric(metrics, "enhanced_locking_fallbacks_total", action="legacy") >= 1
        # The fallback event waits in the outbox and reaches the stream once Redis is back.
        secured.start()
        async with http.stream("GET", "/v1/events", params={"type": "fallback"},
                               headers={"Last-Event-ID": "0-0"}) as stream:
            data = await asyncio.wait_for(_first_data(stream), 15)
        assert '"action":"legacy"' in data and PASSWORD not in data
        give_up = time.monotonic() + 60
        while (await http.get("/readyz")).status_code != 200:
            assert time.monotonic() < give_up, "not ready again after Redis came back"
            await asyncio.sleep(0.1)
    service.stop()
    assert PASSWORD not in service.output(limit=10**6)


async def test_with_fail_closed_a_stopped_redis_answers_unavailable(
    serve: Serve, secured: RedisServer,
) -> None:
    service = serve("fail-closed")
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:
        secured.stop()
        answer = await http.post("/v1/locks", json=lock_body(REPO, "b", 1, project=None))
        # (503, not 409: nothing is known of the lock; a client tries again later)
        assert answer.status_code == 503, answer.text
        assert answer.json()["reason"] == "unavailable"
        assert answer.json()["acquired"] is False and answer.json()["error"], answer.text
        batch = await http.post("/v1/locks/batch", json={
            "locks": [{"project": {"repoFullName": REPO, "path": path}} for path in ("c", "d")],
            "pull": {"num": 1}})
        assert batch.status_code == 503, batch.text
        assert batch.json()["reason"] == "unavailable" and batch.json()["error"], batch.text
        metrics = (await http.get("/metrics")).text
        assert metric(metrics, "enhanced_locking_fallbacks_total", action="refused") >= 1
        assert metric(metrics, "enhanced_locking_fallbacks_total", action="legacy") == 0
    service.stop()
    assert PASSWORD not in service.output(limit=10**6)


async def _first_data(stream: httpx.Response) -> str:
    async for line in stream.aiter_lines():
        if line.startswith("data:"):
            return line
    raise AssertionError("the event stream ended")
