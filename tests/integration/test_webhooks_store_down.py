"""A pull request closed while the lock store does not answer: the webhook frees nothing, and
the VCS will not send the close again on its own (GitHub, GitLab and Gitea do not retry a
failed delivery). So the answer, the log and the audit trail each say the pull's locks are
still held and how to free them; the delivery is not counted as handled, so sending it again
once the store answers frees them. A real redis-server (append-only, so its locks survive the
stop), stopped; the service in this process, served through its ASGI app."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from tests.support.redis_fixtures import ServerMaker
from tests.support.redis_server import RedisServer
from tests.support.served import in_process, memory_trail

from enhanced_locking.api import create_app
from enhanced_locking.api.audit import AuditTrail
from enhanced_locking.backends.audit_store import AuditQuery
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.factory import LockService
from enhanced_locking.provider import ConfigProvider

pytestmark = pytest.mark.redis

SECRET = "gh-webhook-s3cret-value"
REPO = "acme/infra"
ORIGIN = "http://127.0.0.1"


@pytest.fixture
async def held(redis_servers: ServerMaker, tmp_path: Path) -> AsyncIterator[
        tuple[httpx.AsyncClient, AuditTrail, RedisServer, str]]:
    """The service on an append-only Redis with pull 5's lock held, and the Redis server."""
    server = redis_servers(persistence="aof")
    config = EnhancedLockingConfig(
        enabled=True, backend="redis", redis_addr=server.addr, legacy_backend="memory",
        data_dir=str(tmp_path), audit_stdout=False, retries=False,
        github_webhook_secret=SECRET,
    )
    service = LockService(ConfigProvider(config))
    trail = memory_trail()
    app = create_app(service, audit=trail)
    async with in_process(app) as http:
        taken = await http.post("/v1/locks", json={
            "project": {"repoFullName": REPO, "path": "envs/prod"}, "pull": {"num": 5}})
        assert taken.status_code == 200, taken.text
        yield http, trail, server, taken.json()["lockKey"]


def _close(pull: int) -> tuple[bytes, dict[str, str]]:
    """GitHub's ``pull_request`` ``closed`` delivery of ``pull``, signed as GitHub signs it."""
    body = json.dumps({
        "action": "closed", "number": pull,
        "pull_request": {"number": pull, "state": "closed", "merged": True,
                         "closed_at": "2099-01-01T00:00:00Z"},
        "repository": {"full_name": REPO, "name": "infra", "owner": {"login": "acme"}},
    }).encode()
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return body, {"content-type": "application/json", "X-GitHub-Event": "pull_request",
                  "X-GitHub-Delivery": "delivery-1", "X-Hub-Signature-256": f"sha256={signature}"}


async def test_a_close_the_store_did_not_answer_says_the_locks_stay_and_can_be_sent_again(
    held: tuple[httpx.AsyncClient, AuditTrail, RedisServer, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    http, trail, server, key = held
    body, headers = _close(5)
    server.stop()
    with caplog.at_level(logging.WARNING, logger="enhanced_locking.api.webhooks"):
        failed = await http.post("/v1/webhooks/github", content=body, headers=headers)
    assert failed.status_code == 503, failed.text
    answer = failed.json()
    assert answer["reason"] == "unavailable"
    for said in (f"{REPO} #5", "still held", "send this delivery again",
                 f"enhanced-locking lock unlock-pull --repo {REPO} --pull 5"):
        assert said in answer["error"], answer["error"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{REPO} #5" in line and "still held" in line for line in warnings), warnings
    rows = await trail.read(AuditQuery())
    closes = [row for row in rows if row.action == "POST /v1/webhooks/github"]
    assert [(row.identity, row.repo, row.pull, row.outcome, row.status) for row in closes] == [
        ("webhook:github", REPO, 5, "unavailable", 503)], closes

    server.start()
    again = await http.post("/v1/webhooks/github", content=body, headers=headers)
    assert again.status_code == 200, again.text
    assert again.json().get("duplicate") is None, "a failed delivery is not counted as handled"
    assert again.json()["released"] == [key]
    assert (await http.get("/v1/locks/by-key", params={"key": key})).status_code == 404


async def test_a_close_that_could_reach_only_legacys_locks_is_a_failure_not_a_partial_success(
    held: tuple[httpx.AsyncClient, AuditTrail, RedisServer, str],
) -> None:
    """The pull holds a lock on each side (one granted by legacy while the enhanced store was
    down): a close then answers 503 saying the locks are still held, never 200 with legacy's
    lock alone, which would read as the pull freed; sent again once the store answers, it
    frees both."""
    http, _, server, key = held
    server.stop()
    fallback = await http.post("/v1/locks", json={
        "project": {"repoFullName": REPO, "path": "envs/dev"}, "pull": {"num": 5}})
    assert fallback.status_code == 200, fallback.text
    assert fallback.json()["lock"]["backend"] == "legacy"
    body, headers = _close(5)
    failed = await http.post("/v1/webhooks/github", content=body, headers=headers)
    assert failed.status_code == 503, failed.text
    assert "still held" in failed.json()["error"], failed.json()

    server.start()
    again = await http.post("/v1/webhooks/github", content=body, headers=headers)
    assert again.status_code == 200, again.text
    assert sorted(again.json()["released"]) == sorted([key, fallback.json()["lockKey"]])


async def test_a_close_while_the_service_serves_no_lock_call_frees_nothing_and_says_so(
    tmp_path: Path,
) -> None:
    """The operator's start, until it has applied its LockPolicy (docs/02-migration.md): the
    stores in force are not the ones the policy names, which may hold the pull's locks. A
    close then answers 503 saying the locks are still held and why, as a close the store did
    not answer does, and is not counted as handled: sent again once calls are served, it
    frees them. Before, it was served from the stores in force and answered 200."""
    config = EnhancedLockingConfig(enabled=True, data_dir=str(tmp_path), audit_stdout=False,
                                   github_webhook_secret=SECRET)
    service = LockService(ConfigProvider(config))
    trail = memory_trail()
    app = create_app(service, audit=trail)
    async with in_process(app) as http:
        taken = await http.post("/v1/locks", json={
            "project": {"repoFullName": REPO, "path": "envs/prod"}, "pull": {"num": 5}})
        assert taken.status_code == 200, taken.text
        key = taken.json()["lockKey"]
        body, headers = _close(5)
        service.withhold("the policy is not applied yet")
        failed = await http.post("/v1/webhooks/github", content=body, headers=headers)
        assert failed.status_code == 503, failed.text
        answer = failed.json()
        assert answer["reason"] == "unavailable"
        for said in (f"{REPO} #5", "still held", "the policy is not applied yet",
                     "send this delivery again"):
            assert said in answer["error"], answer["error"]
        rows = await trail.read(AuditQuery())
        closes = [row for row in rows if row.action == "POST /v1/webhooks/github"]
        assert [(row.repo, row.pull, row.outcome, row.status) for row in closes] == [
            (REPO, 5, "unavailable", 503)], closes

        service.withhold(None)
        assert (await http.get("/v1/locks/by-key", params={"key": key})).status_code == 200
        again = await http.post("/v1/webhooks/github", content=body, headers=headers)
        assert again.status_code == 200, again.text
        assert again.json()["released"] == [key]
