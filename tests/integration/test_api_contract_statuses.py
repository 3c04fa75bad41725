"""The answers generated requests do not reach are in the OpenAPI document too.

schemathesis (test_api_contract.py) sends requests to a service whose stores answer and which
is not overloaded. These put a real ``enhanced-locking serve`` in the other states and call
every operation: its store (a real redis-server) out of reach, its requests in flight at the
bound, a body over the bound, a stored lock that cannot be read, a request refused for a rule
the schema cannot state. Each answer's status is one the document lists for that operation,
its body has what the documented schema requires, and a documented ``Retry-After`` comes with
the answer.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import ServiceFactory
from tests.support.locks import lock_body
from tests.support.redis_server import RedisServer
from tests.support.service import ServiceProcess, serving

REPO = "acme/statuses"
KEY = f"{REPO}/envs/prod/default/prod"
LOCK = lock_body(REPO, "envs/prod", 1, project="prod")

CALLS: list[tuple[str, str, dict[str, str], Any]] = [
    ("POST", "/v1/locks", {}, LOCK),
    ("GET", "/v1/locks", {}, None),
    ("GET", "/v1/locks/by-key", {"key": KEY}, None),
    ("DELETE", "/v1/locks/by-key", {"key": KEY}, None),
    ("DELETE", "/v1/locks/by-key", {"key": KEY, "pull": "1"}, None),
    ("DELETE", "/v1/locks/by-pull", {"repo": REPO, "pull": "1"}, None),
    ("POST", "/v1/locks/batch", {}, {"locks": [{"project": LOCK["project"]}], "pull": {"num": 1}}),
    ("DELETE", "/v1/locks/batch", {"key": KEY}, None),
    ("DELETE", "/v1/locks/batch", {"key": KEY, "pull": "1"}, None),
    ("POST", "/v1/locks/refresh", {}, {"key": KEY, "pull": 1, "ttl": "1m"}),
    ("GET", "/v1/queue", {"key": KEY}, None),
    ("DELETE", "/v1/queue", {"key": KEY, "id": "w-1"}, None),
    ("GET", "/v1/queue/waiter", {"key": KEY, "id": "w-1"}, None),
    ("GET", "/v1/groups", {}, None),
    ("POST", "/v1/admin/force-unlock", {"key": KEY, "reason": "stuck"}, None),
    ("GET", "/v1/audit", {}, None),
    ("GET", "/v1/config", {}, None),
    ("GET", "/v1/migration", {}, None),
    ("GET", "/healthz", {}, None),
    ("GET", "/readyz", {}, None),
    ("GET", "/serving", {}, None),
    ("GET", "/metrics", {}, None),
]
"""A schema-valid call of every operation but the webhooks (their own tests) and the event
stream (one that is let in does not end)."""


def _documented(document: dict[str, Any], method: str, path: str,
                answer: httpx.Response) -> None:
    """``answer`` is one the document lists for the operation: its status, the fields its
    schema requires, and a header it documents as sent."""
    where = f"{method} {path} -> {answer.status_code} {answer.text[:300]}"
    responses = document["paths"][path][method.lower()]["responses"]
    assert str(answer.status_code) in responses, f"undocumented status: {where}"
    documented = responses[str(answer.status_code)]
    for header, spec in documented.get("headers", {}).items():
        if spec.get("required"):
            assert header in answer.headers, f"no {header}: {where}"
    schema = documented.get("content", {}).get("application/json", {}).get("schema")
    if schema is None:
        return
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    assert answer.headers["content-type"].startswith("application/json"), where
    body = answer.json()
    missing = [name for name in schema.get("required", ()) if name not in body]
    assert not missing, f"body without {missing}: {where}"


def test_every_call_covers_the_operations_of_the_document(tmp_path: Path) -> None:
    with serving(tmp_path) as served:
        document = httpx.get(served.url + "/openapi.json").json()
    operations = {(method.upper(), path) for path, item in document["paths"].items()
                  for method in item
                  if not path.startswith(("/v1/webhooks/", "/v1/events"))}
    assert operations == {(method, path) for method, path, _, _ in CALLS}


@pytest.mark.redis
def test_with_its_store_out_of_reach_every_answer_is_documented(
    redis_server: RedisServer, service_process: ServiceFactory,
) -> None:
    served = service_process("--enhanced-locking-enabled", "--enhanced-locking-backend=redis",
                             f"--enhanced-locking-redis-addr={redis_server.addr}")
    with httpx.Client(base_url=served.url, timeout=20) as http:
        document = http.get("/openapi.json").json()
        redis_server.stop()
        statuses = set()
        for method, path, params, body in CALLS:
            answer = http.request(method, path, params=params, json=body)
            _documented(document, method, path, answer)
            statuses.add(answer.status_code)
    assert 503 in statuses, "the store's outage was not seen"
    assert "500 Internal Server Error" not in served.output()


async def test_at_its_bound_of_requests_in_flight_every_answer_is_documented(
    service_process: ServiceFactory,
) -> None:
    served = service_process("--enhanced-locking-enabled",
                             "--enhanced-locking-http-max-in-flight=1")
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as http:
        document = (await http.get("/openapi.json")).json()
        assert (await http.post("/v1/locks", json=LOCK)).status_code == 200
        # Another pull's wait holds the one place until the lock is released.
        waiting = asyncio.ensure_future(http.post("/v1/locks", json={
            **lock_body(REPO, "envs/prod", 2, project="prod"), "wait": "30s"}))
        for _ in range(200):
            if (await http.get("/v1/queue", params={"key": KEY})).status_code == 503:
                break
            await asyncio.sleep(0.05)
        shed = set()
        for method, path, params, body in CALLS:
            if method == "DELETE":
                continue  # always served: a release would end the wait
            answer = await http.request(method, path, params=params, json=body)
            _documented(document, method, path, answer)
            if answer.status_code == 503 and path not in ("/readyz",):
                assert answer.json()["reason"] == "overloaded", answer.text
                assert "retry-after" in answer.headers
                shed.add(path)
        released = await http.delete("/v1/locks/by-key", params={"key": KEY, "pull": "1"})
        assert released.status_code == 200, released.text
        assert (await waiting).status_code == 200
    assert "/v1/locks" in shed and "/v1/queue" in shed, shed


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[ServiceProcess]:
    with serving(tmp_path, "--enhanced-locking-enabled", "--enhanced-locking-max-timeout=1s",
                 "--enhanced-locking-default-timeout=1s",
                 "--enhanced-locking-http-max-body=1024") as served:
        yield served


def test_a_body_over_the_bound_and_a_rule_the_schema_cannot_state_are_documented(
    embedded: ServiceProcess,
) -> None:
    with httpx.Client(base_url=embedded.url, timeout=10) as http:
        document = http.get("/openapi.json").json()
        for method, path, params, body in CALLS:
            if body is None:
                continue
            large = {**body, "padding": "x" * 2048}
            answer = http.request(method, path, params=params, json=large)
            assert answer.status_code == 413, answer.text
            _documented(document, method, path, answer)
        # Refused by a live setting (422 without FastAPI's list of problems).
        above = http.post("/v1/locks", json={**LOCK, "wait": "2s"})
        assert above.status_code == 422 and above.json()["field"] == "wait", above.text
        _documented(document, "POST", "/v1/locks", above)
        # Refused by the schema.
        invalid = http.post("/v1/locks", json={**LOCK, "wait": "soon"})
        assert invalid.status_code == 422 and invalid.json()["detail"], invalid.text
        _documented(document, "POST", "/v1/locks", invalid)


def test_with_a_stored_lock_that_cannot_be_read_every_answer_is_documented(
    embedded: ServiceProcess,
) -> None:
    with httpx.Client(base_url=embedded.url, timeout=10) as http:
        document = http.get("/openapi.json").json()
        assert http.post("/v1/locks", json=LOCK).status_code == 200
        with sqlite3.connect(embedded.data_dir / "enhanced-locking.db") as db:
            assert db.execute("UPDATE locks SET data = 'not a lock' WHERE key = ?",
                              (KEY,)).rowcount == 1
        statuses = set()
        for method, path, params, body in CALLS:
            if path == "/v1/admin/force-unlock":
                continue  # it clears the key
            answer = http.request(method, path, params=params, json=body)
            _documented(document, method, path, answer)
            statuses.add(answer.status_code)
    assert 409 in statuses
