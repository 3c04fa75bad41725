"""Waiting, batches, queues, leases, admin calls and the event stream over HTTP, against a real
``enhanced-locking serve`` process (enhanced on, priorities, deadlock detection)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from tests.support.locks import lock_body
from tests.support.service import ServiceProcess, serving

from enhanced_locking.client import AsyncClient, Client, ServiceError
from enhanced_locking.events import FOLLOWING_COMMENT
from enhanced_locking.types import BatchItem, BatchLockRequest, Event, LockRequest, Project, Pull

FLAGS = ("--enhanced-locking-enabled", "--enhanced-locking-priority-queue",
         "--enhanced-locking-deadlock-detection", "--enhanced-locking-max-timeout=1m")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with serving(tmp_path_factory.mktemp("waiting"), *FLAGS) as process:
        yield process


@pytest.fixture
async def http(served: ServiceProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        yield client


@pytest.fixture
def repo() -> str:
    return f"acme/wait-{uuid.uuid4().hex[:8]}"


def key(repo: str, path: str) -> str:
    return f"{repo}/{path}/default/{path}"


async def queued(http: httpx.AsyncClient, repo: str, path: str, count: int) -> list[Any]:
    """The key's waiters, once there are ``count`` of them."""
    for _ in range(250):
        waiters: list[Any] = (await http.get(
            "/v1/queue", params={"key": key(repo, path)})).json()["waiters"]
        if len(waiters) == count:
            return waiters
        await asyncio.sleep(0.02)
    raise AssertionError(f"{key(repo, path)} never had {count} waiters: {waiters}")


async def test_a_waiting_request_is_answered_200_when_the_lock_is_released(
    http: httpx.AsyncClient, repo: str,
) -> None:
    first = (await http.post("/v1/locks", json=lock_body(repo, "a", 1))).json()["lock"]
    waiting = asyncio.create_task(http.post("/v1/locks", json=lock_body(repo, "a", 2, wait="20s")))
    [waiter] = await queued(http, repo, "a", 1)
    assert waiter["position"] == 1 and waiter["pull"] == 2 and waiter["repo"] == repo
    assert waiter["priority"] == waiter["effectivePriority"] == "normal"
    await http.delete("/v1/locks/by-key", params={"key": key(repo, "a")})
    answer = await waiting
    assert answer.status_code == 200
    assert answer.json()["lock"]["fencingToken"] > first["fencingToken"]


async def test_a_wait_that_runs_out_answers_409_timeout_with_the_holder(
    http: httpx.AsyncClient, repo: str,
) -> None:
    await http.post("/v1/locks", json=lock_body(repo, "a", 1))
    answer = await http.post("/v1/locks", json=lock_body(repo, "a", 2, wait="100ms"))
    assert answer.status_code == 409
    assert answer.json()["reason"] == "timeout"
    assert answer.json()["holder"]["pull"]["num"] == 1


async def test_a_client_that_disconnects_leaves_the_queue_and_is_never_granted(
    served: ServiceProcess, http: httpx.AsyncClient, repo: str,
) -> None:
    await http.post("/v1/locks", json=lock_body(repo, "a", 1))
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as impatient:
        gone = asyncio.create_task(impatient.post("/v1/locks",
                                                  json=lock_body(repo, "a", 2, wait="30s")))
        await queued(http, repo, "a", 1)
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone
    await queued(http, repo, "a", 0)
    await http.delete("/v1/locks/by-key", params={"key": key(repo, "a")})
    assert (await http.get("/v1/locks/by-key", params={"key": key(repo, "a")})).status_code == 404


async def test_the_queue_is_in_service_order_and_an_admin_can_cancel_a_request(
    http: httpx.AsyncClient, repo: str,
) -> None:
    await http.post("/v1/locks", json=lock_body(repo, "a", 1))
    tasks = []
    for pull, priority in [(2, "low"), (3, "critical"), (4, "normal")]:
        tasks.append(asyncio.create_task(http.post("/v1/locks", json=lock_body(
            repo, "a", pull, wait="20s", priority=priority, requestId=f"job-{pull}"))))
        await queued(http, repo, "a", len(tasks))
    waiters = await queued(http, repo, "a", 3)
    assert [w["pull"] for w in waiters] == [3, 4, 2]
    assert [w["position"] for w in waiters] == [1, 2, 3]

    cancel = await http.delete("/v1/queue", params={"key": key(repo, "a"), "id": "job-4"})
    assert cancel.status_code == 200
    cancelled = await tasks[2]
    assert cancelled.status_code == 409 and cancelled.json()["reason"] == "cancelled"
    missing = await http.delete("/v1/queue", params={"key": key(repo, "a"), "id": "job-4"})
    assert missing.status_code == 404 and "job-4" in missing.json()["error"]

    forced = await http.post("/v1/admin/force-unlock", params={"key": key(repo, "a")})
    assert forced.status_code == 200 and forced.json()["lock"]["pull"]["num"] == 1
    assert (await tasks[1]).status_code == 200, "the critical waiter got it"
    await http.post("/v1/admin/force-unlock", params={"key": key(repo, "a")})
    assert (await tasks[0]).status_code == 200
    await http.post("/v1/admin/force-unlock", params={"key": key(repo, "a")})
    free = await http.post("/v1/admin/force-unlock", params={"key": key(repo, "a")})
    assert free.status_code == 404


async def test_a_cancel_naming_its_pull_takes_that_pulls_request_of_a_shared_request_id(
    http: httpx.AsyncClient, repo: str,
) -> None:
    """Pulls 2 and 3 each queue a request named ``plan`` on one key; pull 3 cancels its own
    (``pull=3``): pull 3's request is answered ``cancelled``, pull 2's keeps waiting. Before,
    the cancel took the first request of that name in the queue, pull 2's."""
    await http.post("/v1/locks", json=lock_body(repo, "a", 1))
    tasks = []
    for pull in (2, 3):
        tasks.append(asyncio.create_task(http.post("/v1/locks", json=lock_body(
            repo, "a", pull, wait="20s", requestId="plan"))))
        await queued(http, repo, "a", len(tasks))
    cancel = await http.delete("/v1/queue",
                               params={"key": key(repo, "a"), "id": "plan", "pull": 3})
    assert cancel.status_code == 200, cancel.json()
    cancelled = await asyncio.wait_for(tasks[1], 10)
    assert cancelled.status_code == 409 and cancelled.json()["reason"] == "cancelled"
    [left] = await queued(http, repo, "a", 1)
    assert left["pull"] == 2 and not tasks[0].done()
    await http.delete("/v1/locks/by-key", params={"key": key(repo, "a")})
    assert (await asyncio.wait_for(tasks[0], 10)).status_code == 200


async def test_a_batch_is_all_or_nothing_and_409_names_the_key_and_why(
    http: httpx.AsyncClient, repo: str,
) -> None:
    await http.post("/v1/locks", json=lock_body(repo, "b", 9))
    batch = {"locks": [{"project": lock_body(repo, p, 1)["project"]} for p in ("a", "b", "c")],
             "pull": {"num": 1}}
    refused = await http.post("/v1/locks/batch", json=batch)
    assert refused.status_code == 409
    assert refused.json()["lockKey"] == key(repo, "b")
    assert refused.json()["reason"] == "held"
    assert refused.json()["holder"]["pull"]["num"] == 9
    assert (await http.get("/v1/locks", params={"repo": repo})).json()["locks"][0]["pull"][
        "num"] == 9, "nothing of the batch was taken"

    waiting = asyncio.create_task(http.post("/v1/locks/batch", json={**batch, "wait": "20s"}))
    await queued(http, repo, "a", 1)
    assert (await http.get("/v1/locks/by-key", params={"key": key(repo, "a")})).status_code == \
        404, "a waiting batch holds none of its keys"
    await http.delete("/v1/locks/by-key", params={"key": key(repo, "b")})
    granted = await waiting
    assert granted.status_code == 200
    assert [lock["key"] for lock in granted.json()["locks"]] == [
        key(repo, p) for p in ("a", "b", "c")]

    released = await http.delete("/v1/locks/batch", params={
        "key": [key(repo, p) for p in ("a", "b", "c", "z")], "pull": 1})
    assert released.status_code == 200
    assert len(released.json()["released"]) == 3
    assert released.json()["notHeld"] == [key(repo, "z")]


def test_a_batch_grant_says_lock_by_lock_which_it_granted_and_which_its_pull_held(
    served: ServiceProcess, repo: str,
) -> None:
    """The batch's 200 carries ``Lock-Grant`` with one word per lock of its ``locks``, in
    their order (``new`` or ``again``), and the client's :attr:`BatchResult.kept` is read from
    it: the keys the pull held before, which a failed renewal or a give-back must not free."""
    def batch(*paths: str) -> BatchLockRequest:
        return BatchLockRequest(locks=[BatchItem(project=Project(
            repo_full_name=repo, path=path, project_name=path)) for path in paths],
            pull=Pull(num=4), ttl=timedelta(hours=1))

    with Client(served.url) as client:
        fresh = client.acquire_batch(batch("a", "b"))
        assert fresh.acquired and fresh.kept == frozenset()
        mixed = client.acquire_batch(batch("b", "c", "a"))
        assert mixed.acquired and mixed.kept == frozenset({key(repo, "a"), key(repo, "b")})
        again = client.acquire_batch(batch("c"))
        assert again.acquired and again.kept == frozenset({key(repo, "c")})
    with httpx.Client(base_url=served.url, timeout=30) as http:
        answer = http.post("/v1/locks/batch", json=batch("d", "a").model_dump(
            mode="json", by_alias=True, exclude_none=True))
        assert answer.status_code == 200
        assert [lock["key"] for lock in answer.json()["locks"]] == [key(repo, "d"),
                                                                    key(repo, "a")]
        assert answer.headers["lock-grant"] == "new, again"
        refused = http.post("/v1/locks/batch", json={
            **batch("a").model_dump(mode="json", by_alias=True, exclude_none=True),
            "pull": {"num": 5}})
        assert refused.status_code == 409 and "lock-grant" not in refused.headers


@pytest.mark.parametrize(("change", "field"), [
    ({"locks": []}, "locks"),
    ({"locks": [{"project": {"repoFullName": "x/y", "path": "a"}}] * 2}, "locks"),
    ({"wait": "forever"}, "wait"),
    ({"priority": "urgent"}, "priority"),
    ({"pull": {"num": -(2**31) - 1}}, "pull.num"),
])
async def test_an_invalid_batch_gets_422_naming_the_field(
    http: httpx.AsyncClient, repo: str, change: dict[str, Any], field: str,
) -> None:
    batch = {"locks": [{"project": lock_body(repo, "a", 1)["project"]}], "pull": {"num": 1},
             **change}
    answer = await http.post("/v1/locks/batch", json=batch)
    assert answer.status_code == 422
    assert answer.json()["field"] == field, answer.json()


async def test_two_pulls_closing_a_cycle_get_409_deadlock_naming_it(
    http: httpx.AsyncClient, repo: str,
) -> None:
    await http.post("/v1/locks", json=lock_body(repo, "a", 1))
    await http.post("/v1/locks", json=lock_body(repo, "b", 2))
    first = asyncio.create_task(http.post("/v1/locks", json=lock_body(repo, "b", 1, wait="20s")))
    await queued(http, repo, "b", 1)
    answer = await http.post("/v1/locks", json=lock_body(repo, "a", 2, wait="20s"))
    assert answer.status_code == 409
    assert answer.json()["reason"] == "deadlock"
    assert answer.json()["cycle"] == [f"{repo}#2", f"{repo}#1", f"{repo}#2"]
    await http.delete("/v1/locks/by-key", params={"key": key(repo, "b")})
    assert (await first).status_code == 200


async def test_a_lease_can_be_refreshed_only_by_its_pull(
    http: httpx.AsyncClient, repo: str,
) -> None:
    granted = (await http.post("/v1/locks", json=lock_body(repo, "a", 1, ttl="1m"))).json()["lock"]
    refreshed = await http.post("/v1/locks/refresh",
                                json={"key": key(repo, "a"), "pull": 1, "ttl": "1h"})
    assert refreshed.status_code == 200
    assert refreshed.json()["lock"]["expiresAt"] > granted["expiresAt"]
    other = await http.post("/v1/locks/refresh",
                            json={"key": key(repo, "a"), "pull": 2, "ttl": "1h"})
    assert other.status_code == 409
    free = await http.post("/v1/locks/refresh", json={"key": key(repo, "z"), "pull": 1})
    assert free.status_code == 404
    bad = await http.post("/v1/locks/refresh", json={"key": key(repo, "a"), "pull": 1,
                                                     "ttl": "soon"})
    assert bad.status_code == 422 and bad.json()["field"] == "ttl"


async def test_a_refresh_of_0s_ends_the_lease_and_the_lock_is_kept_until_released(
    http: httpx.AsyncClient, repo: str,
) -> None:
    granted = (await http.post("/v1/locks", json=lock_body(repo, "a", 1, ttl="1m"))).json()["lock"]
    assert granted["expiresAt"] is not None
    kept = await http.post("/v1/locks/refresh", json={"key": key(repo, "a"), "repo": repo,
                                                      "pull": 1, "ttl": "0s"})
    assert kept.status_code == 200, kept.text
    assert kept.json()["lock"]["expiresAt"] is None
    assert kept.json()["lock"]["fencingToken"] == granted["fencingToken"]
    held = await http.get("/v1/locks/by-key", params={"key": key(repo, "a")})
    assert held.json()["lock"]["expiresAt"] is None
    for bare in (0, "400ns"):  # a bare number, a lease that rounds to none: refused as before
        bad = await http.post("/v1/locks/refresh", json={"key": key(repo, "a"), "pull": 1,
                                                         "ttl": bare})
        assert bad.status_code == 422 and bad.json()["field"] == "ttl", bad.text


async def test_a_lease_that_runs_out_hands_the_lock_to_the_waiter(
    http: httpx.AsyncClient, repo: str,
) -> None:
    await http.post("/v1/locks", json=lock_body(repo, "a", 1, ttl="200ms"))
    answer = await http.post("/v1/locks", json=lock_body(repo, "a", 2, wait="10s"))
    assert answer.status_code == 200 and answer.json()["lock"]["pull"]["num"] == 2


# --- events ------------------------------------------------------------------------------------


async def follow(served: ServiceProcess, count: int, **filters: Any,
                 ) -> tuple[list[Event], asyncio.Task[None]]:
    """Start reading the event stream; the task ends after ``count`` events."""
    seen: list[Event] = []
    opened = asyncio.Event()

    async def on_open() -> None:
        opened.set()

    async def read() -> None:
        async with AsyncClient(served.url) as client:
            async for event in client.events(on_open=on_open, **filters):
                seen.append(event)
                if len(seen) == count:
                    return

    task = asyncio.create_task(read())
    await asyncio.wait_for(opened.wait(), 10)
    return seen, task


async def test_events_stream_over_sse_filtered_by_key_prefix_and_repo(
    served: ServiceProcess, http: httpx.AsyncClient, repo: str,
) -> None:
    by_key, task_key = await follow(served, 3, key_prefix=key(repo, "a"))
    by_repo, task_repo = await follow(served, 4, repo=repo)
    await http.post("/v1/locks", json=lock_body(repo, "a", 1))
    await http.post("/v1/locks", json=lock_body(repo, "b", 1))
    await http.post("/v1/locks", json=lock_body("acme/other-" + repo[-8:], "a", 1))
    await http.delete("/v1/locks/by-key", params={"key": key(repo, "a")})
    await http.delete("/v1/locks/by-key", params={"key": key(repo, "b")})
    await http.post("/v1/locks", json=lock_body(repo, "a", 2))
    await asyncio.wait_for(asyncio.gather(task_key, task_repo), 10)
    assert [(e.type, e.key) for e in by_key] == [
        ("acquired", key(repo, "a")), ("released", key(repo, "a")), ("acquired", key(repo, "a"))]
    assert [e.type for e in by_repo] == ["acquired", "acquired", "released", "released"]
    assert all(e.repo == repo for e in by_repo)


async def test_last_event_id_resumes_after_that_event(
    served: ServiceProcess, http: httpx.AsyncClient, repo: str,
) -> None:
    live, task = await follow(served, 3, repo=repo)
    for path in ("a", "b", "c"):
        await http.post("/v1/locks", json=lock_body(repo, path, 1))
    await asyncio.wait_for(task, 10)
    async with http.stream("GET", "/v1/events", params={"repo": repo},
                           headers={"Last-Event-ID": live[0].id}) as stream:
        resumed: list[str] = []
        async for line in stream.aiter_lines():
            if line.startswith("id:"):
                resumed.append(line.split(":", 1)[1].strip())
            if len(resumed) == 2:
                break
    assert resumed == [live[1].id, live[2].id]


@pytest.mark.parametrize(("params", "headers", "field"), [
    ({}, {"Last-Event-ID": "yesterday"}, "Last-Event-ID"),
    ({"type": "acquired,exploded"}, {}, "type"),
])
async def test_a_bad_event_stream_request_gets_422(
    http: httpx.AsyncClient, params: dict[str, str], headers: dict[str, str], field: str,
) -> None:
    answer = await http.get("/v1/events", params=params, headers=headers)
    assert answer.status_code == 422
    assert answer.json()["field"] == field


async def test_an_event_stream_says_it_follows_before_its_first_event(
    served: ServiceProcess, http: httpx.AsyncClient, repo: str,
) -> None:
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as reader, \
            reader.stream("GET", "/v1/events", params={"repo": repo}) as response:
        lines = response.aiter_lines()
        assert await asyncio.wait_for(anext(lines), 10) == f": {FOLLOWING_COMMENT}"
        # Published after that line: on this stream, with no wait in between.
        await http.post("/v1/locks", json=lock_body(repo, "a", 1))
        seen = []
        async for line in lines:
            if line.startswith("event:"):
                seen.append(line.partition(":")[2].strip())
                break
    assert seen == ["acquired"]


def test_the_client_names_the_repository_of_a_refresh_and_a_batch_release(
    served: ServiceProcess,
) -> None:
    """gl/grp + sub/proj and gl/grp/sub + proj join to one key, both pull 5: the repository
    the client sends keeps gl/grp/sub's pull 5 off gl/grp's lock."""
    group = f"gl/grp-{uuid.uuid4().hex[:8]}"
    with Client(served.url) as client:
        lock = client.acquire(LockRequest(project=Project(repo_full_name=group, path="sub/proj"),
                                          pull=Pull(num=5), ttl=timedelta(hours=1))).lock
        assert lock is not None
        for call in (lambda: client.refresh(lock.key, pull=5, ttl="2h", repo=f"{group}/sub"),
                     lambda: client.release_batch([lock.key], pull=5, repo=f"{group}/sub")):
            with pytest.raises(ServiceError) as refused:
                call()
            assert refused.value.status == 409
            assert refused.value.body["reason"] == "collision"
        kept = client.get(lock.key)
        assert kept is not None and kept.expires_at == lock.expires_at
        refreshed = client.refresh(lock.key, pull=5, ttl="2h", repo=group)
        assert refreshed is not None and refreshed.expires_at != lock.expires_at
        assert [gone.key for gone in client.release_batch([lock.key], pull=5, repo=group)] == [
            lock.key]
