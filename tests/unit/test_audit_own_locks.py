"""``audit-own-locks``: a pull's own lock calls that succeed (an acquire granted, the holder's
release, a lease refreshed, batches too) are audited by default, and left out of the trail and
stdout when it is off, while everything else still is: a refusal, a release by someone else, a
force-unlock, a closed pull's release. The app is served over its own embedded (SQLite) store,
with the trail the service builds from its config (docs/08-access.md, "The audit trail")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.served import in_process

from enhanced_locking.api import create_app
from enhanced_locking.api.audit import own_lock_call
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.factory import LockService
from enhanced_locking.provider import ConfigProvider

REPO = "acme/infra"


def body(path: str, pull: int) -> dict[str, Any]:
    return {"project": {"repoFullName": REPO, "path": path}, "pull": {"num": pull}}


async def calls(http: httpx.AsyncClient) -> list[tuple[str, str]]:
    """A day of a pull's own lock calls and of others' calls; what each was (action, outcome),
    in order."""
    made: list[tuple[str, str]] = []

    async def call(method: str, url: str, expect: int, made_as: tuple[str, str],
                   **kwargs: Any) -> httpx.Response:
        answer = await http.request(method, url, **kwargs)
        assert answer.status_code == expect, answer.text
        made.append(made_as)
        return answer

    taken = await call("POST", "/v1/locks", 200, ("acquire", "acquired"),
                       json={**body("a", 1), "ttl": "1h"})
    key = taken.json()["lockKey"]
    await call("POST", "/v1/locks/refresh", 200, ("refresh", "refreshed"),
               json={"key": key, "pull": 1, "ttl": "2h"})
    await call("POST", "/v1/locks", 409, ("acquire", "held"), json=body("a", 2))
    await call("DELETE", "/v1/locks/by-key", 409, ("release", "not-owned"),
               params={"key": key, "pull": 2})
    await call("DELETE", "/v1/locks/by-key", 200, ("release", "released"),
               params={"key": key, "pull": 1})
    await call("POST", "/v1/locks/batch", 200, ("acquire-batch", "acquired"),
               json={"locks": [{"project": {"repoFullName": REPO, "path": p}}
                               for p in ("b", "c")], "pull": {"num": 3}})
    keys = [f"{REPO}/{path}/default/" for path in ("b", "c")]
    await call("DELETE", "/v1/locks/batch", 200, ("release-batch", "released 2"),
               params={"key": keys, "pull": 3})
    other = (await call("POST", "/v1/locks", 200, ("acquire", "acquired"),
                        json=body("d", 4))).json()["lockKey"]
    await call("DELETE", "/v1/locks/by-key", 200, ("release-any", "released"),
               params={"key": other})
    forced = (await call("POST", "/v1/locks", 200, ("acquire", "acquired"),
                         json=body("e", 5))).json()["lockKey"]
    await call("POST", "/v1/admin/force-unlock", 200, ("force-unlock", "released"),
               params={"key": forced, "reason": "stuck"})
    await call("POST", "/v1/locks", 200, ("acquire", "acquired"), json=body("f", 6))
    await call("DELETE", "/v1/locks/by-pull", 200, ("release-pull", "released 1"),
               params={"repo": REPO, "pull": 6})
    return made


OWN = {("acquire", "acquired"), ("refresh", "refreshed"), ("release", "released"),
       ("acquire-batch", "acquired"), ("release-batch", "released 2")}


@pytest.mark.parametrize("own_locks", [True, False])
async def test_a_pulls_own_lock_calls_are_audited_unless_audit_own_locks_is_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], own_locks: bool,
) -> None:
    config = EnhancedLockingConfig(enabled=True, data_dir=str(tmp_path),
                                   audit_own_locks=own_locks)
    service = LockService(ConfigProvider(config))
    app = create_app(service)
    async with in_process(app) as http:
        capsys.readouterr()
        made = await calls(http)
        answer = await http.get("/v1/audit", params={"limit": 1000})
        assert answer.status_code == 200, answer.text
        trail = [(row["action"], row["outcome"]) for row in reversed(answer.json()["entries"])]
    printed = [json.loads(line)["audit"] for line in capsys.readouterr().out.splitlines()
               if line.startswith('{"audit"')]
    expected = made if own_locks else [call for call in made if call not in OWN]
    assert trail == expected
    assert [(entry["action"], entry["outcome"]) for entry in printed] == expected
    # Each kind of call is still in the trail either way but the pull's own successes.
    assert {("acquire", "held"), ("release", "not-owned"), ("release-any", "released"),
            ("force-unlock", "released"), ("release-pull", "released 1")} <= set(trail)
    assert (("acquire", "acquired") in trail) is own_locks


def test_a_batch_release_that_did_not_reach_every_key_is_not_a_routine_one() -> None:
    assert own_lock_call(verb="lock", action="release-batch", outcome="released 2", status=200)
    assert not own_lock_call(verb="lock", action="release-batch",
                             outcome="released 1, not reached 1", status=200)
    assert not own_lock_call(verb="release-any", action="release-batch",
                             outcome="released 2", status=200)
    assert not own_lock_call(verb="lock", action="acquire", outcome="client-gone", status=499)
    assert own_lock_call(verb="lock", action="acquire", outcome="acquired", status=200)
