"""The lock routes ask for each right on the repository it is about, before they read or change
anything for a caller that may not: an app served over its own embedded (SQLite) store, with an
authorizer that grants rights per repository, as Kubernetes mode does with a Role's
``resourceNames`` (docs/08-access.md)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.served import in_process, memory_trail
from tests.support.unreadable import SECRET, spoil_file

from enhanced_locking.api import create_app
from enhanced_locking.api.access import (
    UNGUARDED_PATHS,
    AccessControl,
    api_routes,
    public_reason,
)
from enhanced_locking.api.audit import AuditTrail
from enhanced_locking.backends.audit_store import AuditQuery
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.factory import LockService
from enhanced_locking.provider import ConfigProvider
from enhanced_locking.types import (
    BackendUnavailable,
    Identity,
    Lock,
    LockRequest,
    Project,
    Pull,
    Verb,
)

INFRA, OTHER = "acme/infra", "acme/other"
ADMIN = "admin-token"
SCOPED = "scoped-token"
"""Holds ``release-any`` and ``lock`` on acme/infra only; ``read`` everywhere."""
NOBODY = "nobody-token"
"""Holds no right at all."""
READER = "reader-token"
"""Holds ``read`` on acme/infra only."""
TEAM = "team-token"
"""Holds ``read`` and ``lock`` on acme/infra only."""
FORCER = "forcer-token"
"""Holds ``read`` and ``force-unlock`` on acme/infra only."""


class Tokens:
    def __init__(self, names: Mapping[str, str]) -> None:
        self._names = names

    async def authenticate(self, token: str) -> Identity | None:
        name = self._names.get(token)
        return None if name is None else Identity(name=name, groups=(), method="kubernetes")


@dataclass(frozen=True)
class PerRepository:
    """Rights as a Role with ``resourceNames`` grants them: ``(verb, repo)`` pairs, a ``None``
    repository standing for every one (a rule without names)."""

    rights: Mapping[str, frozenset[tuple[Verb, str | None]]]
    per_repository = True

    async def allowed(self, identity: Identity, verb: Verb, *, repo: str | None) -> bool:
        held = self.rights.get(identity.name, frozenset())
        return (verb, None) in held or (repo is not None and (verb, repo) in held)


EVERY = frozenset((verb, None) for verb in Verb)
RIGHTS = {
    "ada": EVERY,
    "sam": frozenset({(Verb.READ, None), (Verb.LOCK, INFRA), (Verb.RELEASE_ANY, INFRA)}),
    "nora": frozenset(),
    "rita": frozenset({(Verb.READ, INFRA)}),
    "fay": frozenset({(Verb.READ, INFRA), (Verb.FORCE_UNLOCK, INFRA)}),
    "tim": frozenset({(Verb.READ, INFRA), (Verb.LOCK, INFRA)}),
}


def per_repository(config: EnhancedLockingConfig) -> AccessControl:
    tokens = Tokens({ADMIN: "ada", SCOPED: "sam", NOBODY: "nora", READER: "rita",
                     FORCER: "fay", TEAM: "tim"})
    return AccessControl("kubernetes", [tokens], PerRepository(RIGHTS))


@dataclass
class Served:
    service: LockService
    trail: AuditTrail
    http: httpx.AsyncClient

    def as_(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    async def acquire(self, repo: str, *, pull: int = 7, path: str = "p") -> str:
        answer = await self.http.post("/v1/locks", headers=self.as_(ADMIN), json={
            "project": {"repoFullName": repo, "path": path}, "pull": {"num": pull},
            "ttl": "1h"})
        assert answer.status_code == 200, answer.text
        return str(answer.json()["lockKey"])

    async def held(self) -> list[str]:
        return sorted(lock.key for lock in await self.service.router.list())

    async def rows(self) -> list[Any]:
        return list(reversed(await self.trail.read(AuditQuery())))


@contextlib.asynccontextmanager
async def serving(config: EnhancedLockingConfig) -> AsyncIterator[Served]:
    """An app over ``config``'s store with the per-repository rights, and a client of it."""
    service = LockService(ConfigProvider(config))
    trail = memory_trail()
    app = create_app(service, audit=trail, access=per_repository)
    async with in_process(app) as http:
        yield Served(service, trail, http)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with serving(EnhancedLockingConfig(enabled=True, data_dir=str(tmp_path),
                                             audit_stdout=False)) as served:
        yield served


async def test_a_batch_release_needs_release_any_on_every_holders_repository(
    served: Served,
) -> None:
    infra, other = await served.acquire(INFRA), await served.acquire(OTHER)
    alone = await served.http.delete("/v1/locks/by-key", params={"key": other},
                                     headers=served.as_(SCOPED))
    assert alone.status_code == 403
    answer = await served.http.delete("/v1/locks/batch", params={"key": [infra, other]},
                                      headers=served.as_(SCOPED))
    assert answer.status_code == 403, answer.text
    assert answer.json()["verb"] == "release-any" and answer.json()["repo"] == OTHER
    assert await served.held() == sorted([infra, other]), "a refused batch released a lock"
    refused = [row for row in await served.rows() if row.action == "release-any"]
    assert [(row.repo, row.outcome, row.status) for row in refused] == [
        (OTHER, "denied", 403), (OTHER, "denied", 403)]


async def test_a_batch_release_over_two_repositories_writes_a_row_for_each(
    served: Served,
) -> None:
    infra, other = await served.acquire(INFRA), await served.acquire(OTHER)
    free = f"{INFRA}/free/default/"
    answer = await served.http.delete("/v1/locks/batch", params={"key": [infra, free, other]},
                                      headers=served.as_(ADMIN))
    assert answer.status_code == 200, answer.text
    assert answer.json()["notHeld"] == [free]
    assert await served.held() == []
    rows = [row for row in await served.rows() if row.action == "release-any"]
    assert [(row.repo, row.key, row.outcome, row.status) for row in rows] == [
        (INFRA, f"{infra},{free}", "released 1", 200),
        (OTHER, f"{free},{other}", "released 1", 200),
    ]


async def test_a_batch_release_of_a_pull_needs_lock_on_each_repository_it_holds_in(
    served: Served,
) -> None:
    infra, other = await served.acquire(INFRA), await served.acquire(OTHER)
    answer = await served.http.delete("/v1/locks/batch",
                                      params={"key": [infra, other], "pull": 7},
                                      headers=served.as_(SCOPED))
    assert answer.status_code == 403, answer.text
    assert answer.json()["verb"] == "lock" and answer.json()["repo"] == OTHER
    assert await served.held() == sorted([infra, other])
    mine = await served.http.delete("/v1/locks/batch", params={"key": [infra], "pull": 7},
                                    headers=served.as_(SCOPED))
    assert mine.status_code == 200 and await served.held() == [other]


RAW = f"token={SECRET} and no JSON"


@pytest.mark.parametrize(("method", "path", "query", "body", "verb"), [
    ("DELETE", "/v1/locks/by-key", {}, None, "release-any"),
    ("DELETE", "/v1/locks/by-key", {"pull": 7}, None, "lock"),
    ("DELETE", "/v1/locks/batch", {}, None, "release-any"),
    ("POST", "/v1/locks/refresh", None, {"pull": 7, "ttl": "1h"}, "lock"),
], ids=["release-any", "release-own", "batch", "refresh"])
async def test_an_unreadable_lock_is_not_described_to_a_caller_without_the_right(
    served: Served, tmp_path: Path, method: str, path: str, query: dict[str, Any] | None,
    body: dict[str, Any] | None, verb: str,
) -> None:
    """Whose an unreadable lock is cannot be read: the right is asked without a repository
    before the 409 says what is stored (its key, size and digest)."""
    key = await served.acquire(INFRA)
    spoil_file(str(tmp_path / "enhanced-locking.db"), "enhanced", key, RAW)
    params = None if query is None else {"key": key, **query}
    content = None if body is None else {"key": key, **body}
    for token, status in ((NOBODY, 403), (SCOPED, 403), (ADMIN, 409)):
        answer = await served.http.request(method, path, params=params, json=content,
                                           headers=served.as_(token))
        assert answer.status_code == status, (token, answer.text)
        assert SECRET not in answer.text
        if status == 403:
            assert answer.json()["verb"] == verb and "repo" not in answer.json()
            assert "unreadable" not in answer.text and str(len(RAW)) not in answer.text
        else:
            assert answer.json()["reason"] == "unreadable"
    refusals = [(row.identity, row.verb, row.repo, row.outcome) for row in await served.rows()
                if row.status == 403]
    assert refusals == [("nora", verb, None, "denied"), ("sam", verb, None, "denied")]


SUB = "acme/infra/sub"
"""A repository whose project ``p`` joins to the key of acme/infra's project ``sub/p``; the
scoped caller holds no right on it."""


def after_reading(served: Served, key: str, change: Callable[[], Awaitable[None]],
                  monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Run ``change`` once, right after a route reads the holder of ``key``: between the read
    its rights were asked on and its release. Returns the keys read, to show the hook ran."""
    router = served.service.router
    read = router.get
    seen: list[str] = []

    async def get(k: str) -> Lock | None:
        lock = await read(k)
        seen.append(k)
        if k == key and seen.count(k) == 1:
            await change()
        return lock

    monkeypatch.setattr(router, "get", get)
    return seen


async def take(served: Served, repo: str, path: str, *, pull: int = 7) -> Lock:
    result = await served.service.router.acquire(LockRequest(
        project=Project(repo_full_name=repo, path=path), pull=Pull(num=pull)))
    assert result.acquired and result.lock is not None
    return result.lock


async def test_a_batch_release_any_leaves_a_key_taken_after_it_was_read_free(
    served: Served, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scoped caller may release acme/infra's locks; a key free when read and taken by
    acme/other before the release is not acme/infra's to free."""
    infra = await served.acquire(INFRA)
    free = f"{OTHER}/q/default/"

    async def other_takes_it() -> None:
        assert (await take(served, OTHER, "q")).key == free

    seen = after_reading(served, free, other_takes_it, monkeypatch)
    answer = await served.http.delete("/v1/locks/batch", params={"key": [infra, free]},
                                      headers=served.as_(SCOPED))
    assert free in seen
    assert answer.status_code == 200, answer.text
    assert [lock["key"] for lock in answer.json()["released"]] == [infra]
    assert answer.json()["notHeld"] == [free]
    assert await served.held() == [free]
    holder = await served.service.router.get(free)
    assert holder is not None and holder.project.repo_full_name == OTHER


async def test_a_batch_release_any_leaves_a_key_whose_holder_changed_after_it_was_read(
    served: Served, monkeypatch: pytest.MonkeyPatch,
) -> None:
    infra = await served.acquire(INFRA)
    joined = await served.acquire(INFRA, path="sub/p")

    async def sub_takes_it() -> None:
        await served.service.router.release(joined)
        assert (await take(served, SUB, "p", pull=9)).key == joined

    after_reading(served, joined, sub_takes_it, monkeypatch)
    answer = await served.http.delete("/v1/locks/batch", params={"key": [infra, joined]},
                                      headers=served.as_(SCOPED))
    assert answer.status_code == 200, answer.text
    assert [lock["key"] for lock in answer.json()["released"]] == [infra]
    assert answer.json()["notHeld"] == [joined]
    holder = await served.service.router.get(joined)
    assert holder is not None and holder.owner == (SUB, 9)
    rows = [row for row in await served.rows() if row.action == "release-any"]
    assert [(row.repo, row.outcome, row.status) for row in rows] == [
        (INFRA, "released 1", 200)]


@pytest.mark.parametrize("named", [True, False], ids=["with-repo", "without-repo"])
async def test_a_release_any_of_one_key_leaves_a_hold_taken_after_it_was_read(
    served: Served, named: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    joined = await served.acquire(INFRA, path="sub/p")

    async def sub_takes_it() -> None:
        await served.service.router.release(joined)
        await take(served, SUB, "p", pull=9)

    after_reading(served, joined, sub_takes_it, monkeypatch)
    answer = await served.http.delete(
        "/v1/locks/by-key", params={"key": joined, **({"repo": INFRA} if named else {})},
        headers=served.as_(SCOPED))
    assert answer.status_code == 404, answer.text
    assert answer.json() == {"error": f"no lock is held on {joined}", "lockKey": joined}
    holder = await served.service.router.get(joined)
    assert holder is not None and holder.owner == (SUB, 9)
    rows = [row for row in await served.rows() if row.action == "release-any"]
    assert [(row.repo, row.outcome, row.status) for row in rows] == [
        (INFRA, "not-found", 404)]


@pytest.mark.parametrize("route", ["api", "console"])
async def test_a_force_unlock_leaves_a_hold_taken_after_it_was_read(
    served: Served, route: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The caller may force-unlock acme/infra's locks only; acme/infra/sub takes the key (one
    key for both) between the read its right was asked on and the force-unlock: that hold is
    not freed, and the answer is a 409 that names nobody."""
    joined = await served.acquire(INFRA, path="sub/p")

    async def sub_takes_it() -> None:
        await served.service.router.release(joined)
        await take(served, SUB, "p", pull=9)

    seen = after_reading(served, joined, sub_takes_it, monkeypatch)
    if route == "api":
        answer = await served.http.post("/v1/admin/force-unlock", params={
            "key": joined, "reason": "stuck"}, headers=served.as_(FORCER))
    else:
        answer = await served.http.post("/ui/force-unlock", data={
            "key": joined, "reason": "stuck"}, headers=served.as_(FORCER))
    assert joined in seen
    assert answer.status_code == 409, answer.text
    assert answer.json()["reason"] == "changed"
    assert set(answer.json()) == {"error", "lockKey", "reason"}  # no holder named
    holder = await served.service.router.get(joined)
    assert holder is not None and holder.owner == (SUB, 9)
    rows = [row for row in await served.rows() if row.action == "force-unlock"]
    assert [(row.repo, row.outcome, row.status) for row in rows] == [(INFRA, "changed", 409)]


async def test_a_force_unlock_of_a_hold_still_held_frees_it(served: Served) -> None:
    joined = await served.acquire(INFRA, path="sub/p")
    answer = await served.http.post("/v1/admin/force-unlock", params={
        "key": joined, "reason": "stuck"}, headers=served.as_(FORCER))
    assert answer.status_code == 200, answer.text
    assert answer.json()["lock"]["project"]["repoFullName"] == INFRA
    assert await served.service.router.get(joined) is None


async def test_a_batch_release_of_a_pull_frees_nothing_of_keys_free_when_read(
    served: Served, monkeypatch: pytest.MonkeyPatch,
) -> None:
    free = f"{INFRA}/q/default/"

    async def other_pull_takes_it() -> None:
        await take(served, INFRA, "q", pull=8)

    after_reading(served, free, other_pull_takes_it, monkeypatch)
    answer = await served.http.delete("/v1/locks/batch", params={"key": [free], "pull": 7},
                                      headers=served.as_(ADMIN))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"released": [], "notHeld": [free]}
    holder = await served.service.router.get(free)
    assert holder is not None and holder.owner == (INFRA, 8)


async def test_a_batch_release_any_frees_the_keys_it_reaches_and_names_those_it_does_not(
    served: Served, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keys a and b held; a is freed, then the store stops answering for b's release: the
    answer is not a 503 hiding that a was freed, but a 200 naming a as released and b as not
    reached, and the audit row counts both."""
    a, b = await served.acquire(INFRA, path="a"), await served.acquire(INFRA, path="b")
    router = served.service.router
    release = router.release
    tried: list[str] = []

    async def stopped_for_b(key: str, *args: Any, **kwargs: Any) -> Lock | None:
        tried.append(key)
        if key == b:
            raise BackendUnavailable("the store stopped answering")
        return await release(key, *args, **kwargs)

    monkeypatch.setattr(router, "release", stopped_for_b)
    answer = await served.http.delete("/v1/locks/batch", params={"key": [a, b]},
                                      headers=served.as_(SCOPED))
    assert tried == [a, b]
    assert answer.status_code == 200, answer.text
    assert [lock["key"] for lock in answer.json()["released"]] == [a]
    assert answer.json()["notHeld"] == []
    assert answer.json()["notReached"] == [b]
    monkeypatch.undo()
    assert await served.held() == [b]
    rows = [row for row in await served.rows() if row.action == "release-any"]
    assert [(row.repo, row.key, row.outcome, row.status) for row in rows] == [
        (INFRA, f"{a},{b}", "released 1, not reached 1", 200)]


async def test_unreadable_keys_under_a_repository_are_listed_only_to_who_reads_every_one(
    served: Served, tmp_path: Path,
) -> None:
    """An unreadable key of acme/infra/sub starts with ``acme/infra/`` as acme/infra's keys do,
    and which repository it is of cannot be read: a caller who may read acme/infra only lists
    acme/infra's locks but none of the unreadable keys; one who may read every repository lists
    them under the filter."""
    infra, sub = await served.acquire(INFRA), await served.acquire(SUB)
    store = str(tmp_path / "enhanced-locking.db")
    for key in (infra, sub):
        spoil_file(store, "enhanced", key, RAW)
    readable = await served.acquire(INFRA, path="q")
    everything = await served.http.get("/v1/locks", headers=served.as_(ADMIN))  # finds both
    assert sorted(entry["key"] for entry in everything.json()["unreadable"]) == sorted(
        [infra, sub])

    def listed(answer: httpx.Response) -> tuple[list[str], list[str]]:
        assert answer.status_code == 200, answer.text
        assert SECRET not in answer.text
        return ([lock["key"] for lock in answer.json()["locks"]],
                sorted(entry["key"] for entry in answer.json().get("unreadable", [])))

    for token in (ADMIN, SCOPED):  # read on every repository
        assert listed(await served.http.get("/v1/locks", params={"repo": INFRA},
                                            headers=served.as_(token))) == (
            [readable], sorted([infra, sub]))
        assert listed(await served.http.get("/v1/locks", params={"repo": SUB},
                                            headers=served.as_(token))) == ([], [sub])
    mine = await served.http.get("/v1/locks", params={"repo": INFRA},
                                 headers=served.as_(READER))
    assert listed(mine) == ([readable], [])
    assert "unreadable" not in mine.json() and sub not in mine.text
    for repo, status in ((SUB, 403), (None, 403)):
        answer = await served.http.get("/v1/locks", params={"repo": repo} if repo else None,
                                       headers=served.as_(READER))
        assert answer.status_code == status, answer.text


# Two repositories whose project paths join to the same key (GitLab's groups), both pull 7.
GROUP, SUBGROUP = "gl/grp", "gl/grp/sub"


async def test_a_refresh_naming_its_repository_is_judged_on_it_and_leaves_another_repositorys_lock(
    served: Served,
) -> None:
    free = await served.http.post("/v1/locks/refresh", headers=served.as_(SCOPED), json={
        "key": f"{INFRA}/p/default/", "repo": INFRA, "pull": 7, "ttl": "1h"})
    assert free.status_code == 404, free.text  # asked on acme/infra, where it holds lock
    held = await take(served, GROUP, "sub/proj")
    answer = await served.http.post("/v1/locks/refresh", headers=served.as_(ADMIN), json={
        "key": held.key, "repo": SUBGROUP, "pull": 7, "ttl": "2h"})
    assert answer.status_code == 409, answer.text
    assert answer.json()["reason"] == "collision"
    assert answer.json()["holder"]["project"]["repoFullName"] == GROUP
    kept = await served.service.router.get(held.key)
    assert kept is not None and kept.expires_at == held.expires_at, "another repository's lease"
    own = await served.http.post("/v1/locks/refresh", headers=served.as_(ADMIN), json={
        "key": held.key, "repo": GROUP, "pull": 7, "ttl": "2h"})
    assert own.status_code == 200, own.text


async def test_a_batch_release_naming_its_repository_is_judged_on_it_and_frees_only_its_locks(
    served: Served,
) -> None:
    free = await served.http.delete("/v1/locks/batch", headers=served.as_(SCOPED), params={
        "key": [f"{INFRA}/p/default/"], "repo": INFRA, "pull": 7})
    assert free.status_code == 200, free.text  # asked on acme/infra, where it holds lock
    assert free.json()["notHeld"] == [f"{INFRA}/p/default/"]
    held = await take(served, GROUP, "sub/proj")
    for pull in ({"pull": 7}, {}):
        answer = await served.http.delete("/v1/locks/batch", headers=served.as_(ADMIN), params={
            "key": [held.key], "repo": SUBGROUP, **pull})
        assert answer.status_code == 409, answer.text
        assert answer.json()["reason"] == "collision"
        assert await served.held() == [held.key], "another repository's lock was released"
    own = await served.http.delete("/v1/locks/batch", headers=served.as_(ADMIN), params={
        "key": [held.key], "repo": GROUP, "pull": 7})
    assert own.status_code == 200 and await served.held() == []


async def test_a_release_of_a_free_key_naming_its_repository_is_judged_on_it(
    served: Served,
) -> None:
    """Atlantis asks this of each of a pull's projects before every plan, mostly of free keys:
    a caller that may lock acme/infra only hears the key is free, not 403."""
    free = await served.http.delete("/v1/locks/by-key", headers=served.as_(SCOPED), params={
        "key": f"{INFRA}/p/default/", "repo": INFRA, "pull": 7})
    assert free.status_code == 404, free.text
    elsewhere = await served.http.delete("/v1/locks/by-key", headers=served.as_(SCOPED), params={
        "key": f"{OTHER}/p/default/", "repo": OTHER, "pull": 7})
    assert elsewhere.status_code == 403, elsewhere.text
@pytest.fixture
async def frozen(tmp_path: Path) -> AsyncIterator[Served]:
    """An app whose requests for workspace ``frozen`` wait behind a freeze, with deadlock
    detection on: requests of two repositories whose projects join to the same keys queue
    together and can close a cycle across repositories."""
    async with serving(EnhancedLockingConfig(
            enabled=True, data_dir=str(tmp_path), audit_stdout=False, deadlock_detection=True,
            policies={"freezes": [{"name": "hold", "match": {"workspace": "frozen"},
                                   "message": "frozen", "action": "wait"}]})) as served:
        yield served


def frozen_body(repo: str, path: str, pull: int) -> dict[str, Any]:
    return {"project": {"repoFullName": repo, "path": path}, "workspace": "frozen",
            "pull": {"num": pull}, "wait": "5s"}


async def queued(served: Served, key: str, count: int) -> None:
    for _ in range(200):
        if len(await served.service.router.queue(key)) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key} never had {count} waiters")


@pytest.mark.parametrize("batch", [False, True], ids=["one-key", "batch"])
@pytest.mark.parametrize("who", [TEAM, ADMIN], ids=["team", "admin"])
async def test_a_deadlock_answer_shows_the_caller_only_the_owners_it_may_read(
    frozen: Served, batch: bool, who: str,
) -> None:
    """acme/infra#1 and acme/infra/sub#2 each wait behind the other on one key (their projects
    join to the same keys): the 409 that refuses the closing wait names the other repository's
    pull only to a caller who may read it."""
    key_a, key_b = (f"{INFRA}/sub/{p}/frozen/" for p in "ab")
    admin = frozen.as_(ADMIN)
    waits = [asyncio.create_task(frozen.http.post(
        "/v1/locks", headers=admin, json=frozen_body(INFRA, "sub/a", 1)))]
    await queued(frozen, key_a, 1)
    for path, count in (("a", 2), ("b", 1)):
        waits.append(asyncio.create_task(frozen.http.post(
            "/v1/locks", headers=admin, json=frozen_body(SUB, path, 2))))
        await queued(frozen, key_a if path == "a" else key_b, count)
    if batch:
        closing = await frozen.http.post("/v1/locks/batch", headers=frozen.as_(who), json={
            "locks": [{"project": {"repoFullName": INFRA, "path": "sub/b"},
                       "workspace": "frozen"}], "pull": {"num": 1}, "wait": "5s"})
    else:
        closing = await frozen.http.post("/v1/locks", headers=frozen.as_(who),
                                         json=frozen_body(INFRA, "sub/b", 1))
    assert closing.status_code == 409, closing.text
    answer = closing.json()
    assert answer["reason"] == "deadlock"
    mine = {"name": f"{INFRA}#1", "repo": INFRA, "pull": 1}
    if who == ADMIN:
        assert answer["cycle"] == [f"{INFRA}#1", f"{SUB}#2", f"{INFRA}#1"]
        assert answer["cycleOwners"] == [mine, {"name": f"{SUB}#2", "repo": SUB, "pull": 2},
                                         mine]
        assert answer["hiddenOwners"] is None
    else:
        assert answer["cycle"] == [f"{INFRA}#1", "(other repository)", f"{INFRA}#1"]
        assert answer["cycleOwners"] == [
            mine, {"name": "(other repository)", "repo": None, "pull": None}, mine]
        assert answer["hiddenOwners"] == 1
        assert f"{SUB}#2" not in closing.text
    for wait in waits:
        wait.cancel()
    await asyncio.gather(*waits, return_exceptions=True)


@pytest.mark.parametrize("batch", [False, True], ids=["one-key", "batch"])
@pytest.mark.parametrize("who", [TEAM, ADMIN], ids=["team", "admin"])
async def test_a_collision_describes_the_holder_only_to_a_caller_who_may_read_it(
    served: Served, batch: bool, who: str,
) -> None:
    """acme/infra/sub#7 holds its project p; acme/infra's project sub/p joins to the same key.
    The 409 that refuses acme/infra's request names the holder (its pull, user, project) only
    to a caller who may read acme/infra/sub."""
    key = await served.acquire(SUB, pull=7)
    if batch:
        refused = await served.http.post("/v1/locks/batch", headers=served.as_(who), json={
            "locks": [{"project": {"repoFullName": INFRA, "path": "sub/p"}}],
            "pull": {"num": 1}})
    else:
        refused = await served.http.post("/v1/locks", headers=served.as_(who), json={
            "project": {"repoFullName": INFRA, "path": "sub/p"}, "pull": {"num": 1}})
    assert refused.status_code == 409, refused.text
    answer = refused.json()
    assert answer["reason"] == "collision"
    assert answer["lockKey"] == key
    if who == ADMIN:
        assert answer["holder"]["project"]["repoFullName"] == SUB
        assert f"repository {SUB}, path p" in answer["error"]
    else:
        assert answer["holder"] is None
        assert answer["error"].startswith(f"lock key {key} is ambiguous: a project of another")
        assert f"repository {SUB}" not in refused.text and "pull #7" not in refused.text
        assert "/pull/" not in refused.text  # no pull URL of the holder either


@pytest.mark.parametrize("call", ["release", "refresh", "batch-release"])
async def test_a_holder_of_another_repository_found_at_a_release_is_named_only_to_a_reader(
    served: Served, call: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The team may lock acme/infra only. It names pull 8 for a key acme/infra#7 holds (read,
    and its right asked on acme/infra); acme/infra/sub#9 takes the key (one key for both)
    before the release or refresh: the 409 does not describe acme/infra/sub's hold."""
    joined = await served.acquire(INFRA, path="sub/p")

    async def sub_takes_it() -> None:
        await served.service.router.release(joined)
        await take(served, SUB, "p", pull=9)

    after_reading(served, joined, sub_takes_it, monkeypatch)
    team = served.as_(TEAM)
    if call == "release":
        answer = await served.http.delete("/v1/locks/by-key", params={"key": joined, "pull": 8},
                                          headers=team)
    elif call == "refresh":
        answer = await served.http.post("/v1/locks/refresh", headers=team,
                                        json={"key": joined, "pull": 8, "ttl": "1h"})
    else:
        answer = await served.http.delete("/v1/locks/batch", params={"key": [joined], "pull": 8},
                                          headers=team)
    assert answer.status_code == 409, answer.text
    assert answer.json()["holder"] is None
    assert answer.json()["reason"] == "not-owned"
    assert "#9" not in answer.text and f"of {SUB}" not in answer.text
    holder = await served.service.router.get(joined)
    assert holder is not None and holder.owner == (SUB, 9)
    rows = [row for row in await served.rows() if row.repo == INFRA and row.status == 409]
    assert [row.outcome for row in rows] == ["not-owned"]


async def test_while_calls_are_withheld_every_call_of_a_caller_answers_503_but_the_settings(
    tmp_path: Path,
) -> None:
    """The operator's start, until it has applied its LockPolicy (docs/02-migration.md): the
    access settings in force are not the policy's, nor are the stores. Every route that takes
    the caller answers 503 ``unavailable`` with the words why, whoever calls (a token with
    every right, one with none, none at all), and changes nothing; ``GET /v1/config`` shows
    the settings in force. Before, a release or a force-unlock was served under the settings
    in force and read the service's own stores."""
    why = "the policy is not applied yet"
    config = EnhancedLockingConfig(enabled=True, data_dir=str(tmp_path), audit_stdout=False)
    service = LockService(ConfigProvider(config))
    trail = memory_trail()
    app = create_app(service, audit=trail, access=per_repository)
    routes = [(method, route.path) for route in api_routes(app) if public_reason(route) is None
              and route.path not in UNGUARDED_PATHS for method in sorted(route.methods or ())
              if method != "HEAD"]
    assert ("POST", "/v1/admin/force-unlock") in routes and ("GET", "/v1/events") in routes
    async with in_process(app) as http:
        served = Served(service, trail, http)
        key = await served.acquire(INFRA)
        service.withhold(why)
        for token in (ADMIN, NOBODY, None):
            headers = served.as_(token) if token else {}
            for method, path in routes:
                answer = await http.request(method, path.replace("{", "").replace("}", ""),
                                            headers=headers, params={
                                                "key": key, "repo": INFRA, "pull": 7,
                                                "reason": "stuck"})
                if (method, path) == ("GET", "/v1/config"):
                    assert answer.status_code == {ADMIN: 200, NOBODY: 403, None: 401}[token]
                    continue
                assert answer.status_code == 503, (method, path, token, answer.text)
                assert answer.json() == {"error": why, "reason": "unavailable"}, (method, path)
        service.withhold(None)
        assert await served.held() == [key]
        listed = await http.get("/v1/locks", headers=served.as_(ADMIN))
        assert listed.status_code == 200 and len(listed.json()["locks"]) == 1, listed.text


@pytest.mark.parametrize("insecure", [False, True])
async def test_while_calls_are_withheld_a_caller_without_credentials_hears_401_first(
    tmp_path: Path, insecure: bool,
) -> None:
    """In the operator's start window a request without credentials, or with an
    ``Authorization`` that is no bearer token, to a service on a non-loopback address is
    refused 401, as every access setting a LockPolicy may name would refuse it: a policy
    cannot open such a service (auth ``none`` needs ``insecure-allow-unauthenticated``, a
    setting of the service's own, not of the policy). It learns nothing of the service's
    state before it says who it is, and an Atlantis started without its token fails loudly
    rather than hearing "unavailable" for as long as the window lasts. Before, 503. A bearer
    token is judged only by the policy's settings (another mode or audience may accept it):
    503, as where the service may be opened (``insecure``) and a credential-less caller
    may be let in."""
    why = "the policy is not applied yet"
    config = EnhancedLockingConfig(enabled=True, data_dir=str(tmp_path), audit_stdout=False,
                                   insecure_allow_unauthenticated=insecure)
    service = LockService(ConfigProvider(config))
    trail = memory_trail()
    app = create_app(service, audit=trail, access=per_repository, exposed=True)
    async with in_process(app) as http:
        served = Served(service, trail, http)
        key = await served.acquire(INFRA)
        before = len(await served.rows())
        service.withhold(why)
        for headers, invalid_token in (({}, False), ({"Authorization": "Basic eDp5"}, True)):
            answer = await http.delete("/v1/locks/by-key", params={"key": key},
                                       headers=headers)
            if insecure:
                assert answer.status_code == 503, answer.text
                continue
            assert answer.status_code == 401, answer.text
            assert "error" in answer.json()
            assert ('error="invalid_token"' in answer.headers["WWW-Authenticate"]) == \
                invalid_token
        for token in (ADMIN, "unknown-token"):
            answer = await http.delete("/v1/locks/by-key", params={"key": key},
                                       headers=served.as_(token))
            assert answer.status_code == 503, (token, answer.text)
            assert answer.json() == {"error": why, "reason": "unavailable"}
        service.withhold(None)
        rows = (await served.rows())[before:]
        assert [(row.identity, row.outcome, row.status) for row in rows] == (
            [("", "unavailable", 503)] * 4 if insecure else
            [("", "unauthenticated", 401)] * 2 + [("", "unavailable", 503)] * 2)
        assert await served.held() == [key]


async def test_a_call_withheld_is_audited_as_refused(served: Served) -> None:
    """In the operator's start window every call that reads or changes locks is refused 503
    (see above), and every refusal becomes an entry of the trail (docs/08-access.md): a
    force-unlock or a release refused then is one, unavailable with the words why, naming no
    identity (the access settings in force are not the ones to judge the caller by), as the
    refusal of a request before it is identified is. Before, none was written."""
    why = "the policy is not applied yet"
    key = await served.acquire(INFRA)
    before = len(await served.rows())
    served.service.withhold(why)
    forced = await served.http.post("/v1/admin/force-unlock", headers=served.as_(ADMIN),
                                    json={"key": key, "reason": "stuck"})
    released = await served.http.delete("/v1/locks/by-key", params={"key": key})
    assert (forced.status_code, released.status_code) == (503, 503)
    served.service.withhold(None)
    rows = (await served.rows())[before:]
    assert [(row.identity, row.action, row.outcome, row.status, row.reason)
            for row in rows] == [("", "POST /v1/admin/force-unlock", "unavailable", 503, why),
                                 ("", "DELETE /v1/locks/by-key", "unavailable", 503, why)]
    assert await served.held() == [key]
