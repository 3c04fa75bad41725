"""With the store down, a caller without the right a call needs hears 403, not 503: the routes
that read the store to learn a lock's repository before asking the right (release, batch
release, refresh, cancel of a queued request, force-unlock, the console's force-unlock) ask it
first when the rights do not depend on the repository (static tokens). A real redis-server,
stopped; the service in this process, served through its ASGI app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from tests.support.redis_server import RedisServer
from tests.support.served import in_process, memory_trail

from enhanced_locking.api import create_app
from enhanced_locking.api.audit import AuditTrail
from enhanced_locking.backends.audit_store import AuditQuery
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.factory import LockService
from enhanced_locking.provider import ConfigProvider

pytestmark = pytest.mark.redis

TOKENS = {"nobody": "tok-nobody-7c6d5e4f3a2b", "admin": "tok-admin-1f0e9d8c7b6a"}
NAMES = {"nobody": "nora", "admin": "ada"}
REPO = "acme/infra"
ORIGIN = "http://127.0.0.1"


@pytest.fixture
async def down(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[
        tuple[httpx.AsyncClient, AuditTrail, str]]:
    """The service on ``redis_server`` with one lock held, then the server stopped."""
    tokens = tmp_path / "tokens.csv"
    tokens.write_text("# token,name,uid,groups\n" + "".join(
        f'{TOKENS[role]},{NAMES[role]},uid-{role},""\n' for role in TOKENS))
    config = EnhancedLockingConfig(
        enabled=True, backend="redis", redis_addr=redis_server.addr, legacy_backend="memory",
        data_dir=str(tmp_path), audit_stdout=False, auth="static",
        auth_tokens_file=str(tokens), auth_roles="admin=user:ada", retries=False,
    )
    service = LockService(ConfigProvider(config))
    trail = memory_trail()
    app = create_app(service, audit=trail)
    async with in_process(app) as http:
        held = await http.post("/v1/locks", headers=_as("admin"), json={
            "project": {"repoFullName": REPO, "path": "p"}, "pull": {"num": 7}, "ttl": "1h"})
        assert held.status_code == 200, held.text
        redis_server.stop()
        yield http, trail, held.json()["lockKey"]


def _as(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"}


def _calls(key: str) -> list[tuple[str, str, dict[str, object]]]:
    """Each route that reads the store before it can name the lock's repository."""
    return [
        ("DELETE", "/v1/locks/by-key", {"params": {"key": key, "pull": 7}}),
        ("DELETE", "/v1/locks/by-key", {"params": {"key": key}}),
        ("DELETE", "/v1/locks/batch", {"params": {"key": [key]}}),
        ("DELETE", "/v1/locks/batch", {"params": {"key": [key], "pull": 7}}),
        ("POST", "/v1/locks/refresh", {"json": {"key": key, "pull": 7, "ttl": "1h"}}),
        ("DELETE", "/v1/queue", {"params": {"key": key, "id": "w-1"}}),
        ("DELETE", "/v1/queue", {"params": {"key": key, "id": "w-1", "pull": 7}}),
        ("POST", "/v1/admin/force-unlock", {"params": {"key": key, "reason": "stuck"}}),
        ("POST", "/ui/force-unlock", {
            "content": f"key={key}&reason=stuck",
            "headers": {"content-type": "application/x-www-form-urlencoded",
                        "origin": ORIGIN, "sec-fetch-site": "same-origin"}}),
    ]


async def _answers(http: httpx.AsyncClient, key: str,
                   role: str) -> list[tuple[str, str, dict[str, object], httpx.Response]]:
    """Each call of :func:`_calls` made as ``role``, with its answer."""
    made = []
    for method, path, options in _calls(key):
        headers = {**_as(role), **options.pop("headers", {})}  # type: ignore[dict-item]
        answer = await http.request(method, path, headers=headers, **options)  # type: ignore[arg-type]
        made.append((method, path, options, answer))
    return made


async def test_a_caller_without_the_right_hears_403_while_the_store_is_down(
    down: tuple[httpx.AsyncClient, AuditTrail, str],
) -> None:
    http, trail, key = down
    for method, path, options, answer in await _answers(http, key, "nobody"):
        assert answer.status_code == 403, (method, path, options, answer.text)
        assert answer.json()["error"]
    denied = [row for row in await trail.read(AuditQuery()) if row.outcome == "denied"]
    assert len(denied) == len(_calls(key))
    assert all(row.identity == "nora" and row.status == 403 for row in denied)


async def test_a_caller_with_the_right_still_hears_that_the_store_is_down(
    down: tuple[httpx.AsyncClient, AuditTrail, str],
) -> None:
    http, _, key = down
    for method, path, options, answer in await _answers(http, key, "admin"):
        if path == "/v1/locks/batch" and "pull" not in options["params"]:  # type: ignore[operator]
            # Each key on its own: the one not read is not released, and said so.
            assert answer.status_code in (200, 503), answer.text
            continue
        assert answer.status_code == 503, (method, path, options, answer.text)
