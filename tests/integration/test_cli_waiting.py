"""The command line's waiting, queue, admin and event commands, as real subprocesses against a
real service: ``lock acquire --wait`` shows its live queue position on stderr, ``events``
tails the stream, ``lock queue|cancel|force-unlock|refresh`` do what they say."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tests.support.service import (
    ServiceProcess,
    enhanced_locking_command,
    scrubbed_env,
    serving,
)
from tests.support.waiting import wait_for

REPO = "acme/cli-wait"
KEY = f"{REPO}/infra/default/"
WAIT = "5m"
"""A waiting command's ``--wait`` where the test, not the wait, decides when it is served or
cancelled: the test's own commands (each a new process, up to 20 s apiece on a busy machine)
all happen within it (with 30 s a waiter ran out between ``lock queue`` and ``lock cancel``)."""
STARTED = 60
"""How long a new CLI process may take to reach the service: as long as ``run`` gives a whole
command (its start alone, importing the package, took over 10 s on a busy machine)."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with serving(tmp_path_factory.mktemp("cli-wait"), "--enhanced-locking-enabled",
                 "--enhanced-locking-priority-queue",
                 "--enhanced-locking-default-timeout=300ms") as process:
        yield process


@pytest.fixture(autouse=True)
def key_left_free(served: ServiceProcess) -> Iterator[None]:
    """Whatever a test ends with, the next one starts on a free key with nobody queued: a failed
    test leaves neither its lock nor its waiter to the tests after it."""
    yield
    for waiter in queue(served)["waiters"]:
        httpx.delete(served.url + "/v1/queue", params={"key": KEY, "id": waiter["id"]})
    httpx.post(served.url + "/v1/admin/force-unlock", params={"key": KEY})


def command(served: ServiceProcess, *args: str) -> list[str]:
    return [*enhanced_locking_command(), *args]


def env(served: ServiceProcess) -> dict[str, str]:
    return scrubbed_env({"ENHANCED_LOCKING_URL": served.url})


def run(served: ServiceProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(served, *args), capture_output=True, text=True,
                          env=env(served), timeout=60)


def acquire_args(pull: int, *extra: str) -> list[str]:
    return ["lock", "acquire", "--repo", REPO, "--path", "infra", "--pull", str(pull), *extra]


def queue(served: ServiceProcess) -> Any:
    return httpx.get(served.url + "/v1/queue", params={"key": KEY}).json()


def test_acquire_with_wait_shows_its_queue_position_and_ends_holding_the_lock(
    served: ServiceProcess,
) -> None:
    assert run(served, *acquire_args(1)).returncode == 0
    waiting = subprocess.Popen(command(served, *acquire_args(2, "--wait", WAIT, "--priority",
                                                             "high")),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env(served))
    try:
        wait_for("the CLI to queue", lambda: len(queue(served)["waiters"]) == 1,
                 timeout=STARTED, pause=0.02)
        assert queue(served)["waiters"][0]["priority"] == "high"
        assert queue(served)["waiters"][0]["requestId"].startswith("cli-")
        released = run(served, "lock", "release", "--key", KEY)
        assert released.returncode == 0
        stdout, stderr = waiting.communicate(timeout=30)
    finally:
        waiting.kill()
        waiting.communicate()
    assert waiting.returncode == 0, stderr
    assert f"queued on {KEY}: position 1 of 1 (held by pull #1)" in stderr
    answer = json.loads(stdout)
    assert answer["acquired"] is True and answer["lock"]["pull"]["num"] == 2
    assert run(served, "lock", "release", "--key", KEY).returncode == 0


def test_a_bare_wait_waits_up_to_the_default_timeout(served: ServiceProcess) -> None:
    assert run(served, *acquire_args(1)).returncode == 0
    started = time.monotonic()
    result = run(served, *acquire_args(2, "--wait"))
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["reason"] == "timeout"
    assert time.monotonic() - started >= 0.3
    assert run(served, "lock", "release", "--key", KEY).returncode == 0


def test_a_cancel_naming_its_pull_takes_that_pulls_request(served: ServiceProcess) -> None:
    """Pulls 2 and 3 wait with the same requestId: ``lock cancel --pull 3`` cancels pull 3's
    (as ``DELETE /v1/queue?pull=3`` does, which needs only the lock right for one's own),
    and pull 2's stays queued. Before, the command had no ``--pull`` (exit 2)."""
    assert run(served, *acquire_args(1)).returncode == 0
    waiting = [subprocess.Popen(
        command(served, *acquire_args(pull, "--wait", WAIT, "--request-id", "job-7")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(served))
        for pull in (2, 3)]
    try:
        wait_for("both to queue", lambda: len(queue(served)["waiters"]) == 2,
                 timeout=STARTED, pause=0.02)
        cancelled = run(served, "lock", "cancel", "--key", KEY, "--id", "job-7", "--pull", "3")
        assert cancelled.returncode == 0, cancelled.stderr
        assert json.loads(cancelled.stdout)["cancelled"] is True
        stdout, _ = waiting[1].communicate(timeout=30)
        assert waiting[1].returncode == 1 and json.loads(stdout)["reason"] == "cancelled"
        assert [w["pull"] for w in queue(served)["waiters"]] == [2]
    finally:
        for process in waiting:
            process.kill()
            process.communicate()


def test_queue_cancel_and_force_unlock(served: ServiceProcess) -> None:
    assert run(served, *acquire_args(1)).returncode == 0
    waiting = subprocess.Popen(
        command(served, *acquire_args(2, "--wait", WAIT, "--request-id", "job-2")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(served))
    try:
        wait_for("the CLI to queue", lambda: len(queue(served)["waiters"]) == 1,
                 timeout=STARTED, pause=0.02)
        shown = run(served, "lock", "queue", "--key", KEY)
        assert json.loads(shown.stdout)["waiters"][0]["requestId"] == "job-2"
        assert run(served, "lock", "cancel", "--key", KEY, "--id", "job-2").returncode == 0
        stdout, _ = waiting.communicate(timeout=30)
    finally:
        waiting.kill()
        waiting.communicate()
    assert waiting.returncode == 1 and json.loads(stdout)["reason"] == "cancelled"
    missing = run(served, "lock", "cancel", "--key", KEY, "--id", "job-2")
    assert missing.returncode == 1 and "no request job-2" in missing.stderr

    refreshed = run(served, "lock", "refresh", "--key", KEY, "--pull", "1", "--ttl", "1h")
    assert refreshed.returncode == 0 and json.loads(refreshed.stdout)["lock"]["expiresAt"]
    forced = run(served, "lock", "force-unlock", "--key", KEY)
    assert forced.returncode == 0 and json.loads(forced.stdout)["lock"]["pull"]["num"] == 1
    again = run(served, "lock", "force-unlock", "--key", KEY)
    assert again.returncode == 1 and "no lock is held" in again.stderr


def test_events_tails_the_stream_as_json_lines(served: ServiceProcess) -> None:
    tail = subprocess.Popen(command(served, "events", "--repo", REPO, "--type", "acquired"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(served))
    try:
        assert tail.stderr is not None  # it says so once it follows the events
        said = tail.stderr.readline()
        assert said == f"enhanced-locking: following the events of {served.url}\n"
        assert run(served, *acquire_args(7)).returncode == 0
        assert tail.stdout is not None
        line = tail.stdout.readline()
    finally:
        tail.kill()
        tail.communicate()
    event: dict[str, Any] = json.loads(line)
    assert event["type"] == "acquired" and event["key"] == KEY
    assert event["lock"]["pull"]["num"] == 7
    assert run(served, "lock", "release", "--key", KEY).returncode == 0


def test_refresh_names_the_repository_of_the_lock(served: ServiceProcess) -> None:
    # gl/grp + sub/proj and gl/grp/sub + proj join to one key, both pull 5: `lock refresh
    # --repo` of the second repository leaves the first's lock as it was (409 collision), as
    # `lock release --repo` does; of the lock's own repository, it refreshes.
    group = f"{REPO}-grp"
    body = {"project": {"repoFullName": group, "path": "sub/proj"}, "pull": {"num": 5},
            "ttl": "1h"}
    lock = httpx.post(served.url + "/v1/locks", json=body).json()["lock"]
    try:
        other = run(served, "lock", "refresh", "--key", lock["key"], "--pull", "5",
                    "--repo", f"{group}/sub", "--ttl", "2h")
        assert other.returncode == 1, other.stderr
        assert json.loads(other.stdout)["reason"] == "collision"
        kept = httpx.get(served.url + "/v1/locks/by-key",
                         params={"key": lock["key"]}).json()["lock"]
        assert kept["expiresAt"] == lock["expiresAt"]
        own = run(served, "lock", "refresh", "--key", lock["key"], "--pull", "5",
                  "--repo", group, "--ttl", "2h")
        assert own.returncode == 0, own.stderr
        assert json.loads(own.stdout)["lock"]["expiresAt"] != lock["expiresAt"]
    finally:
        httpx.post(served.url + "/v1/admin/force-unlock", params={"key": lock["key"]})


def test_refresh_with_a_ttl_of_0s_ends_the_lease(served: ServiceProcess) -> None:
    body = {"project": {"repoFullName": f"{REPO}-nolease", "path": "envs/prod"},
            "pull": {"num": 5}, "ttl": "1h"}
    lock = httpx.post(served.url + "/v1/locks", json=body).json()["lock"]
    try:
        assert lock["expiresAt"] is not None
        kept = run(served, "lock", "refresh", "--key", lock["key"], "--pull", "5", "--ttl", "0s")
        assert kept.returncode == 0, kept.stderr
        assert json.loads(kept.stdout)["lock"]["expiresAt"] is None
        held = httpx.get(served.url + "/v1/locks/by-key", params={"key": lock["key"]}).json()
        assert held["lock"]["expiresAt"] is None
        assert held["lock"]["fencingToken"] == lock["fencingToken"]
    finally:
        httpx.post(served.url + "/v1/admin/force-unlock", params={"key": lock["key"]})
