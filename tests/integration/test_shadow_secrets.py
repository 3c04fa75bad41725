"""Shadow mode keeps every secret out of what it writes.

A service in shadow mode (legacy decides, the enhanced Redis replays) with a password on its
Redis, bearer tokens for its callers, and a clone URL carrying a VCS token in a pull's URL:
locks taken, refused, released, replays failing while Redis is stopped and disagreeing once it
is back (a ``shadow-mismatch``). None of the three planted secrets is in its output (logs and
the audit trail on stdout), its events, its metrics, its status and configuration, its audit
rows, or anything stored: the legacy SQLite file and every Redis key, the shadow namespace's
included.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.locks import lock_body
from tests.support.redis_fixtures import ServerMaker
from tests.support.redis_server import RedisServer
from tests.support.service import ServiceProcess, running

pytestmark = pytest.mark.redis

PASSWORD = "pw-shadow-5c07e1-secret"
TOKEN = "tok-shadow-admin-8e41d2"
VCS_TOKEN = "ghp-shadow-vcs-3b9f60"
SECRETS = (PASSWORD, TOKEN, VCS_TOKEN)
REPO = "acme/shadow"


@pytest.fixture
def secured(redis_servers: ServerMaker) -> RedisServer:
    server = redis_servers(persistence="aof")
    server.set_requirepass(PASSWORD)
    return server


@pytest.fixture
def service(secured: RedisServer, tmp_path: Path) -> Iterator[ServiceProcess]:
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f'# token,name,uid,groups\n{TOKEN},ada,uid-ada,""\n')
    process = ServiceProcess(tmp_path / "data", log_dir=tmp_path / "logs", args=(
        "--log-level=debug",
        "--enhanced-locking-enabled", "--enhanced-locking-backend=redis",
        f"--enhanced-locking-redis-addr={secured.addr}",
        "--enhanced-locking-migration-mode=shadow",
        "--enhanced-locking-shadow-sample-ratio=1",
        "--enhanced-locking-auth=static", f"--enhanced-locking-auth-tokens-file={tokens}",
        "--enhanced-locking-auth-roles=admin=user:ada",
        "--enhanced-locking-audit-own-locks",
    ), env={"ATLANTIS_ENHANCED_LOCKING_REDIS_PASSWORD": PASSWORD})
    with running(process):
        yield process


def _body(path: str, pull: int) -> dict[str, Any]:
    body = lock_body(REPO, path, pull, user="alice")
    body["pull"]["url"] = f"https://bot:{VCS_TOKEN}@git.example/{REPO}/pull/{pull}"
    return body


def _redis_value(store: Any, name: bytes | str) -> str:
    """What Redis keeps under ``name``, read by its type (a dump may be compressed)."""
    kind = store.type(name).decode()
    value: Any
    if kind == "string":
        value = store.get(name)
    elif kind == "hash":
        value = store.hgetall(name)
    elif kind == "list":
        value = store.lrange(name, 0, -1)
    elif kind == "set":
        value = store.smembers(name)
    elif kind == "zset":
        value = store.zrange(name, 0, -1, withscores=True)
    elif kind == "stream":
        value = store.xrange(name)
    else:
        raise AssertionError(f"{name!r}: a Redis {kind} this test does not read")
    return repr(value)


async def _replayed(http: httpx.AsyncClient, count: int) -> dict[str, Any]:
    """The migration status once the shadow side has replayed (or failed) ``count`` jobs."""
    give_up = time.monotonic() + 60
    while True:
        status = (await http.get("/v1/migration")).json()
        shadow = status["shadow"]
        if shadow["replayed"] + shadow["errors"] >= count and shadow["queued"] == 0:
            return dict(status)
        assert time.monotonic() < give_up, f"the shadow side did not replay: {status}"
        await asyncio.sleep(0.1)


async def _events_until_mismatch(http: httpx.AsyncClient) -> str:
    seen: list[str] = []
    async with http.stream("GET", "/v1/events", headers={"Last-Event-ID": "0-0"}) as stream:
        async for line in stream.aiter_lines():
            seen.append(line)
            if line.startswith("data:") and "shadow-mismatch" in line:
                return "\n".join(seen)
    raise AssertionError("the event stream ended before a shadow-mismatch:\n" + "\n".join(seen))


async def test_shadow_mode_writes_no_secret_anywhere(
    service: ServiceProcess, secured: RedisServer, tmp_path: Path,
) -> None:
    written: dict[str, str] = {}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=service.url, timeout=30, headers=headers) as http:
        granted = await http.post("/v1/locks", json=_body("a", 1))
        assert granted.status_code == 200, granted.text
        assert granted.json()["lock"]["backend"] == "legacy"
        refused = await http.post("/v1/locks", json=_body("a", 2))
        assert refused.status_code == 409, refused.text
        key = granted.json()["lock"]["key"]
        await _replayed(http, 2)  # the grant and the refusal

        # Replays fail while Redis is stopped; legacy still decides.
        secured.stop()
        while_away = await http.post("/v1/locks", json=_body("b", 3))
        assert while_away.status_code == 200, while_away.text
        written["readyz"] = (await http.get("/readyz")).text
        await _replayed(http, 3)
        secured.start()
        # Legacy frees pull 3's lock; the shadow side never took it: a mismatch.
        released = await http.delete("/v1/locks/by-key", params={"key": while_away.json()[
            "lock"]["key"], "pull": 3})
        assert released.status_code == 200, released.text
        assert (await http.delete("/v1/locks/by-key",
                                  params={"key": key, "pull": 1})).status_code == 200
        status = await _replayed(http, 5)
        assert status["shadow"]["mismatches"] >= 1 and status["shadow"]["errors"] >= 1, status
        written["migration"] = str(status)
        written["events"] = await asyncio.wait_for(_events_until_mismatch(http), 30)
        written["metrics"] = (await http.get("/metrics")).text
        written["config"] = (await http.get("/v1/config")).text
        written["audit"] = (await http.get("/v1/audit", params={"limit": 1000})).text
        written["locks"] = (await http.get("/v1/locks")).text
        assert "shadow_discrepancies" in written["metrics"]
        assert "acquire" in written["audit"], written["audit"]
    service.stop()
    written["output"] = service.output(limit=10**7)
    assert "shadow" in written["output"]
    for path in sorted(p for p in (tmp_path / "data").rglob("*") if p.is_file()):
        written[f"file {path.name}"] = path.read_bytes().decode("latin-1")
    store = secured.client(password=PASSWORD)
    names = store.keys("*")
    assert any(b"shadow" in name for name in names), names
    for name in names:
        written[f"redis {name!r}"] = _redis_value(store, name)
    store.close()
    # The replayed locks are there, in the shadow namespace, with the pull's URL (less its
    # credentials): what is searched is what the service wrote.
    shadow = "".join(text for where, text in written.items()
                     if where.startswith("redis") and "shadow" in where)
    assert "git.example" in shadow and "alice" in shadow, shadow
    leaks = [(where, secret) for where, text in written.items() for secret in SECRETS
             if secret in text]
    assert not leaks, f"secrets written: {leaks}"
