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
from typing import get_args

import httpx
import pytest
from tests.conftest import ServiceMaker
from tests.support.leases import until
from tests.support.locks import lock_body, request_for
from tests.support.redis_fixtures import ServerMaker
from tests.support.redis_server import RedisServer
from tests.support.service import ServiceProcess, services

from enhanced_locking.factory import LockService
from enhanced_locking.metrics import FallbackAction
from enhanced_locking.types import Event

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


def _fallbacks(service: LockService) -> dict[str, float]:
    return {action: service.metrics.fallbacks.labels(action)._value.get()
            for action in get_args(FallbackAction)}


@pytest.mark.parametrize(("mode", "weight", "counted"), [
    ("shadow", 50, "unchecked"), ("route", 0, "unchecked"), ("route", 100, "legacy")])
async def test_a_fallback_is_counted_by_what_the_request_was_routed_to(
    make_service: ServiceMaker, redis_server: RedisServer, mode: str, weight: float,
    counted: str,
) -> None:
    """``enhanced_locking_fallbacks_total{action="legacy"}`` counts requests sent to legacy
    because the enhanced store did not answer; ``unchecked`` a grant of a key that legacy
    decides, made without its look at the enhanced side. A replica that cannot reach the
    registry (on the same Redis) takes every key on both sides; a key that legacy decides
    (every key in shadow mode, or at weight 0) is then served by legacy, as it would be
    anyway, with only the enhanced half missing. Before, that was counted (and announced) as
    ``legacy``, a request sent to legacy for want of enhanced; it is ``unchecked`` now, and
    journaled as before. A key routed to enhanced is still a ``legacy`` fallback."""
    service = await make_service(enabled=True, backend="redis", redis_addr=redis_server.addr,
                                 migration_mode=mode, migration_weight=weight,
                                 replica_heartbeat="100ms", replica_timeout="400ms")
    seen: list[Event] = []
    service.events.subscribe(seen.append)
    redis_server.stop()
    assert await until(lambda: service.migration.transitions.isolated, within=30)
    result = await service.router.acquire(request_for(pull=3, path="isolated"))
    assert result.acquired and result.lock is not None and result.lock.backend == "legacy"
    assert _fallbacks(service) == dict.fromkeys(get_args(FallbackAction), 0) | {counted: 1}
    assert [e.details["action"] for e in seen if e.type == "fallback"] == [counted]
    assert service.migration.fallback.pending == 1  # journaled, reconciled once Redis answers
