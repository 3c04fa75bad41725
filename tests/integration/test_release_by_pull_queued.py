"""A release by pull (``DELETE /v1/locks/by-pull``, what Atlantis sends when a pull request
closes and on an ``atlantis unlock`` comment) drops the pull's queued requests too.

Against real ``enhanced-locking serve`` processes: one on the embedded store, and two replicas
on one real redis-server, the request queued on one replica and the release sent to the other.
The waiting caller is answered ``cancelled`` with a message naming the release; the route
lists it in ``cancelled``; the key it waited for is not granted to the released pull later;
another pull's request on the same key still waits and is granted; a release of a pull with
nothing queued answers ``cancelled: []``.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import ServiceFactory
from tests.integration.test_webhooks import acquire as acquire_in
from tests.integration.test_webhooks import queued
from tests.support.redis_server import RedisServer
from tests.support.service import ServiceProcess

REPO = "acme/infra"
WAITED = f"{REPO}/envs/c/default/"

Replicas = tuple[ServiceProcess, ServiceProcess]


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(4) as executor:
        yield executor


def _embedded(service_process: ServiceFactory, request: pytest.FixtureRequest) -> Replicas:
    one = service_process("--enhanced-locking-enabled=true")
    return one, one


def _redis(service_process: ServiceFactory, request: pytest.FixtureRequest) -> Replicas:
    server: RedisServer = request.getfixturevalue("redis_server")
    flags = ("--enhanced-locking-enabled=true", "--enhanced-locking-backend=redis",
             f"--enhanced-locking-redis-addr={server.addr}",
             "--enhanced-locking-legacy-backend=memory")
    first = service_process(*flags)
    second = tmp_path_of(request) / "second"
    second.mkdir()
    return first, service_process(*flags, data_dir=second)


def tmp_path_of(request: pytest.FixtureRequest) -> Path:
    path: Path = request.getfixturevalue("tmp_path")
    return path


STORES: dict[str, Callable[[ServiceFactory, pytest.FixtureRequest], Replicas]] = {
    "embedded": _embedded, "redis-two-replicas": _redis}


@pytest.fixture(params=sorted(STORES))
def replicas(request: pytest.FixtureRequest, service_process: ServiceFactory) -> Replicas:
    """(where the release is sent, where the request waits): one process on the embedded
    store; two on one Redis."""
    return STORES[request.param](service_process, request)


def acquire(service: ServiceProcess, path: str, pull: int, *,
            wait: str | None = None) -> httpx.Response:
    return acquire_in(service, REPO, path, pull, wait=wait)


def waiters(service: ServiceProcess, key: str) -> list[dict[str, Any]]:
    answer: list[dict[str, Any]] = httpx.get(f"{service.url}/v1/queue",
                                             params={"key": key}).json()["waiters"]
    return answer


def release_pull(service: ServiceProcess, pull: int) -> httpx.Response:
    return httpx.delete(f"{service.url}/v1/locks/by-pull", params={"repo": REPO, "pull": pull},
                        timeout=30)


def holder(service: ServiceProcess, key: str) -> int | None:
    answer = httpx.get(f"{service.url}/v1/locks/by-key", params={"key": key})
    if answer.status_code == 404:
        return None
    assert answer.status_code == 200, answer.text
    num: int = answer.json()["lock"]["pull"]["num"]
    return num


def test_a_release_by_pull_drops_the_pulls_queued_requests_wherever_they_wait(
    replicas: Replicas, pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    releaser, waiting_on = replicas
    assert acquire(releaser, "envs/a", 2).status_code == 200
    assert acquire(releaser, "envs/c", 7).status_code == 200
    mine = pool.submit(acquire, waiting_on, "envs/c", 2, wait="30s")  # a plan still waiting
    queued(releaser, WAITED, 1)
    theirs = pool.submit(acquire, waiting_on, "envs/c", 3, wait="30s")  # another pull's
    queued(releaser, WAITED, 2)
    ids = [w["id"] for w in waiters(releaser, WAITED)]

    answer = release_pull(releaser, 2)

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [lock["key"] for lock in body["released"]] == [f"{REPO}/envs/a/default/"]
    assert body["cancelled"] == ids[:1]
    refused = mine.result(timeout=30)
    assert refused.status_code == 409, refused.text
    assert refused.json()["reason"] == "cancelled"
    assert "its pull's locks were released" in refused.json()["error"]
    assert [w["id"] for w in waiters(releaser, WAITED)] == ids[1:]
    rows = httpx.get(f"{releaser.url}/v1/audit",
                     params={"outcome": "released 1, dropped 1 queued"})
    assert rows.status_code == 200, rows.text
    assert [(r["action"], r["pull"]) for r in rows.json()["entries"]] == [("release-pull", 2)]
    # The key goes to the other pull's request, never to the released pull.
    assert release_pull(releaser, 7).json()["cancelled"] == []
    granted = theirs.result(timeout=30)
    assert granted.status_code == 200, granted.text
    assert granted.json()["lock"]["pull"]["num"] == 3
    assert holder(waiting_on, WAITED) == 3
    assert release_pull(releaser, 3).json() == {"released": [granted.json()["lock"]],
                                                "cancelled": []}
    assert holder(waiting_on, WAITED) is None and holder(releaser, WAITED) is None
    assert not mine.result().is_success  # still refused: nothing granted to pull 2 since


def test_a_release_by_pull_with_nothing_queued_leaves_other_pulls_waiting(
    replicas: Replicas, pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    releaser, waiting_on = replicas
    assert acquire(releaser, "envs/c", 7).status_code == 200
    theirs = pool.submit(acquire, waiting_on, "envs/c", 3, wait="30s")
    queued(releaser, WAITED, 1)
    answer = release_pull(releaser, 5)  # a pull that holds and waits for nothing
    assert answer.status_code == 200 and answer.json() == {"released": [], "cancelled": []}
    assert len(waiters(releaser, WAITED)) == 1 and not theirs.done()
    released = release_pull(releaser, 7).json()
    assert [lock["key"] for lock in released["released"]] == [WAITED]
    assert released["cancelled"] == []
    assert theirs.result(timeout=30).status_code == 200
