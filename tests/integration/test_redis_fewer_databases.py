"""A Redis restarted with fewer databases under a running service: the configured
``enhanced-locking-redis-db`` is refused from then on. At start that refusal is the setting's
(exit 2, tests/integration/test_cli_store_settings.py); while serving it is the store being
unusable, an outage like a stopped server: the enhanced side falls back to legacy (or answers
503 with ``fail-closed``), a Redis legacy side answers 503 — never a 500 (docs/03-redis.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.locks import lock_body
from tests.support.redis_server import RedisServer
from tests.support.served import in_process

from enhanced_locking.api import create_app
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.factory import LockService
from enhanced_locking.provider import ConfigProvider

pytestmark = pytest.mark.redis

DB = 5
"""A database a default redis-server has (16) and one started with ``--databases 2`` lacks."""


@asynccontextmanager
async def _served(tmp_path: Path, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    config = EnhancedLockingConfig(data_dir=str(tmp_path / "data"), audit_stdout=False,
                                   redis_db=DB, **settings)
    service = LockService(ConfigProvider(config))
    app = create_app(service)
    async with in_process(app) as http:
        yield http


def _fewer_databases(server: RedisServer) -> None:
    server.extra_args = ["--databases", "2"]
    server.restart()


@pytest.mark.parametrize("fallback", ["legacy", "fail-closed"])
async def test_an_enhanced_redis_restarted_without_its_database_is_an_outage(
    tmp_path: Path, fallback: str,
) -> None:
    with RedisServer(tmp_path / "redis") as server:
        async with _served(tmp_path, enabled=True, backend="redis", redis_addr=server.addr,
                           fallback=fallback) as http:
            first = await http.post("/v1/locks", json=lock_body("acme/infra", "a", 1))
            assert first.status_code == 200, first.text
            assert first.json()["lock"]["backend"] == "enhanced"
            _fewer_databases(server)
            answer = await http.post("/v1/locks", json=lock_body("acme/infra", "b", 1))
            if fallback == "legacy":
                assert answer.status_code == 200, answer.text
                assert answer.json()["lock"]["backend"] == "legacy"
            else:  # the acquire's answer when the enhanced store does not answer (docs/api.md)
                assert answer.status_code == 503, answer.text
                assert answer.json()["reason"] == "unavailable"
            ready = await http.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert "enhanced-locking-redis-db" in ready.json()["backends"]["enhanced"]


async def test_a_legacy_redis_restarted_without_its_database_answers_503(
    tmp_path: Path,
) -> None:
    with RedisServer(tmp_path / "redis") as server:
        async with _served(tmp_path, legacy_backend="redis", redis_addr=server.addr) as http:
            first = await http.post("/v1/locks", json=lock_body("acme/infra", "a", 1))
            assert first.status_code == 200, first.text
            _fewer_databases(server)
            # The first call may find its kept connection closed by the restart (an outage
            # of its own); the next opens one, whose database is refused.
            errors = []
            for path in ("b", "c"):
                answer = await http.post("/v1/locks", json=lock_body("acme/infra", path, 1))
                assert answer.status_code == 503, answer.text
                assert answer.json()["reason"] == "unavailable"
                errors.append(answer.json()["error"])
            assert "enhanced-locking-redis-db" in errors[-1], errors
