"""Locks and fencing tokens survive the service being killed and started on the same file.

A real ``enhanced-locking serve`` process on the embedded store: acquire, note the tokens,
SIGKILL it (nothing gets to flush or close), start it again on the same data dir.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from tests.conftest import ServiceFactory

SIDES = {
    "legacy": (),  # enhanced locking off: the legacy locker on the embedded store
    "enhanced": ("--enhanced-locking-enabled",),
}


def acquire(url: str, *, path: str, pull: int) -> httpx.Response:
    return httpx.post(url + "/v1/locks", json={
        "project": {"repoFullName": "acme/infra", "path": path, "projectName": ""},
        "workspace": "default",
        "pull": {"num": pull},
        "user": {"username": f"dev{pull}"},
    }, timeout=10)


def granted(url: str, *, path: str, pull: int) -> dict[str, Any]:
    response = acquire(url, path=path, pull=pull)
    assert response.status_code == 200, response.text
    lock: dict[str, Any] = response.json()["lock"]
    return lock


def release(url: str, key: str) -> None:
    assert httpx.delete(url + "/v1/locks/by-key", params={"key": key}).status_code == 200


@pytest.mark.parametrize("side", list(SIDES))
def test_locks_and_fencing_tokens_survive_a_kill_and_restart(
    service_process: ServiceFactory, side: str
) -> None:
    service = service_process(*SIDES[side])
    first = granted(service.url, path="a", pull=1)
    assert first["backend"] == side
    release(service.url, first["key"])
    held = granted(service.url, path="a", pull=2)
    other = granted(service.url, path="b", pull=3)
    assert held["fencingToken"] > first["fencingToken"]

    assert service.kill() == -9
    service.start()

    locks = httpx.get(service.url + "/v1/locks").json()["locks"]
    assert sorted(locks, key=lambda lock: lock["key"]) == [held, other]
    assert httpx.get(service.url + "/v1/locks/by-key",
                     params={"key": held["key"]}).json() == {"lock": held}
    refused = acquire(service.url, path="a", pull=4)
    assert refused.status_code == 409 and refused.json()["holder"] == held
    assert granted(service.url, path="a", pull=2) == held, "the holder keeps its lock unchanged"

    release(service.url, held["key"])
    after = granted(service.url, path="a", pull=4)
    assert after["fencingToken"] == held["fencingToken"] + 1


def test_a_graceful_stop_exits_zero_and_keeps_the_locks(service_process: ServiceFactory) -> None:
    service = service_process()
    held = granted(service.url, path="a", pull=1)
    assert service.stop() == 0
    assert "Traceback" not in service.stderr()
    service.start()
    assert httpx.get(service.url + "/v1/locks").json() == {"locks": [held]}


def test_tokens_keep_rising_over_several_restarts(service_process: ServiceFactory) -> None:
    service = service_process("--enhanced-locking-enabled")
    tokens = []
    for restart in range(3):
        lock = granted(service.url, path="a", pull=restart + 1)
        tokens.append(lock["fencingToken"])
        release(service.url, lock["key"])
        service.restart(kill=restart % 2 == 0)
    assert tokens == [1, 2, 3]
    assert granted(service.url, path="a", pull=9)["fencingToken"] == 4
