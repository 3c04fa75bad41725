"""``enhanced-locking step``: the lock from a stock Atlantis's custom workflow steps.

Each test runs the real command the way Atlantis runs a ``run:`` step (a shell command with the
step environment of ``run_step_runner.go``) against a real ``enhanced-locking serve``: it waits
in the queue with its command's priority, prints where it stands and whom it waits behind,
and ends refused or timed out with one line and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import http.server
import re
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from tests.support.loopback_http import serving
from tests.support.redis_server import RedisServer
from tests.support.service import (
    SHORT_CONNECT_TIMEOUT,
    ServiceProcess,
    enhanced_locking_command,
    scrubbed_env,
)

KEY = "acme/infra/envs/prod/default/prod"
NO_ESTIMATE = "; no estimate yet (no release of this key seen)"
ESTIMATE = r"; estimated wait (\d+h)?(\d+m)?(\d+s)?"


def step_env(url: str, pull: int, user: str, **extra: str) -> dict[str, str]:
    """What Atlantis v0.47.1 puts in a run step's environment for project prod, pull ``pull``."""
    return scrubbed_env({
        "ENHANCED_LOCKING_URL": url,
        "BASE_REPO_OWNER": "acme", "BASE_REPO_NAME": "infra",
        "HEAD_REPO_OWNER": "acme", "HEAD_REPO_NAME": "infra",
        "PULL_NUM": str(pull), "PULL_AUTHOR": user, "USER_NAME": user,
        "PULL_URL": f"https://github.com/acme/infra/pull/{pull}",
        "HEAD_COMMIT": f"{pull:040x}", "HEAD_BRANCH_NAME": f"feature-{pull}",
        "BASE_BRANCH_NAME": "main", "REPO_REL_DIR": "envs/prod", "WORKSPACE": "default",
        "PROJECT_NAME": "prod", "DIR": "/atlantis/repos/acme/infra/1/default/envs/prod",
        "PLANFILE": "default-prod.tfplan", "COMMENT_ARGS": "",
        **extra,
    })


STEP_START = 120.0
"""Seconds a test gives a new step process to start and reach the service: a second on a quiet
machine, over 20 at a load average of 25 (the interpreter and its imports, on a share of a
core), which a 20 s wait for its waiter to queue did not allow."""


def run_step(
    env: dict[str, str], *args: str, timeout: float = STEP_START
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*enhanced_locking_command(), "step", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def start_step(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*enhanced_locking_command(), "step", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


STEP_WAIT = "5m"
"""A waiting step's ``--wait`` where the test, not the step, decides when it is served: the
test's own steps (each a new process, seconds apiece on a busy machine) all happen within it."""
STEP_DONE = 120.0
"""Seconds a step is given to finish once the test has freed its key."""


class Lines:
    """A running step's stdout, read line by line as it prints, so the test can wait for the
    line it needs (a fixed sleep was too short when the machine is busy)."""

    def __init__(self, step: subprocess.Popen[str]) -> None:
        assert step.stdout is not None
        self.step, self.lines = step, list[str]()
        self._reader = threading.Thread(target=self._read, args=(step.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, deadline: float = STEP_START) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if any(re.fullmatch(pattern, line) for line in list(self.lines)):
                return
            time.sleep(0.05)
        raise AssertionError(f"the step never printed {pattern!r}: {self.lines}")

    def finish(self) -> tuple[list[str], str]:
        """Its whole stdout (as lines) and stderr once it exits."""
        self.step.wait(STEP_DONE)
        self._reader.join(STEP_DONE)
        assert self.step.stdout is not None and self.step.stderr is not None
        with self.step.stdout, self.step.stderr:
            return self.lines, self.step.stderr.read()


@pytest.fixture
def service(service_process: Callable[..., ServiceProcess]) -> ServiceProcess:
    """A service with queues and priorities on (what the Atlantis guide configures)."""
    return service_process("--enhanced-locking-enabled=true",
                           "--enhanced-locking-priority-queue=true")


def queue(url: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{url}/v1/queue", params={"key": KEY}).json()
    return body


def wait_for_waiters(url: str, count: int, deadline: float = STEP_START
                     ) -> list[dict[str, Any]]:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        waiters: list[dict[str, Any]] = queue(url)["waiters"]
        if len(waiters) >= count:
            return waiters
        time.sleep(0.05)
    raise AssertionError(f"{count} waiters never queued: {queue(url)}")


def test_a_plan_step_takes_the_lock_from_atlantiss_environment(service: ServiceProcess) -> None:
    done = run_step(step_env(service.url, 1, "alice"), "acquire", "--command", "plan")
    assert done.returncode == 0, done.stderr
    assert f"locked {KEY} for pull #1" in done.stdout
    lock = httpx.get(f"{service.url}/v1/locks/by-key", params={"key": KEY}).json()["lock"]
    assert lock["pull"]["num"] == 1 and lock["pull"]["headCommit"] == f"{1:040x}"
    assert lock["pull"]["vcsHost"] == {"hostname": "github.com", "type": "Github"}
    assert lock["user"]["username"] == "alice" and lock["priority"] == "normal"
    # The same pull's apply step finds its own lock at once.
    again = run_step(step_env(service.url, 1, "alice"), "acquire", "--command", "apply")
    assert again.returncode == 0 and "locked" in again.stdout


def test_waiting_steps_show_their_place_and_an_apply_goes_before_a_plan(
    service: ServiceProcess,
) -> None:
    assert run_step(step_env(service.url, 1, "alice"), "acquire", "--command", "plan"
                    ).returncode == 0
    plan = Lines(start_step(step_env(service.url, 2, "bob"), "acquire", "--command", "plan",
                            "--wait", STEP_WAIT, "--poll", "200ms"))
    wait_for_waiters(service.url, 1)
    apply = start_step(step_env(service.url, 3, "carol"), "acquire", "--command", "apply",
                       "--wait", STEP_WAIT, "--poll", "200ms")
    waiters = wait_for_waiters(service.url, 2)
    assert [(w["pull"], w["priority"]) for w in waiters] == [(3, "high"), (2, "normal")]
    # bob's step sees carol's apply move ahead of it (on one of its polls).
    behind_both = (f"waiting for {KEY}: position 2 of 2, behind pull #1 (alice) of acme/infra, "
                   "which holds it; pull #3 (carol), high" + NO_ESTIMATE)
    plan.wait_for(re.escape(behind_both))

    released = run_step(step_env(service.url, 1, "alice"), "release")
    assert released.returncode == 0 and f"released {KEY}" in released.stdout

    apply_out, apply_err = apply.communicate(timeout=STEP_DONE)
    assert apply.returncode == 0, apply_err
    assert f"locked {KEY} for pull #3" in apply_out
    # bob still waits, now behind carol's apply; carol releases and bob gets it.
    assert run_step(step_env(service.url, 3, "carol"), "release").returncode == 0
    lines, plan_err = plan.finish()
    assert plan.step.returncode == 0, plan_err
    assert behind_both in lines
    # alice's release was seen: from then on the line ends with an estimate.
    behind_carol = re.escape(f"waiting for {KEY}: position 1 of 1, behind pull #3 (carol) of "
                             "acme/infra, which holds it") + ESTIMATE
    assert any(re.fullmatch(behind_carol, line) for line in lines), lines
    assert lines[-1].startswith(f"enhanced-locking: locked {KEY} for pull #2")


def test_a_waiting_step_names_every_shared_holder_and_estimates_its_wait(
    service: ServiceProcess,
) -> None:
    def shared(pull: int, user: str) -> dict[str, Any]:
        return {"project": {"repoFullName": "acme/infra", "path": "envs/prod",
                            "projectName": "prod"},
                "pull": {"num": pull, "url": f"https://github.com/acme/infra/pull/{pull}",
                         "author": user},
                "user": {"username": user}, "mode": "shared", "command": "plan"}

    def take(pull: int, user: str) -> None:
        answer = httpx.post(f"{service.url}/v1/locks", json=shared(pull, user))
        assert answer.status_code == 200, answer.text

    def give_back(pull: int) -> None:
        answer = httpx.delete(f"{service.url}/v1/locks/by-key",
                              params={"key": KEY, "pull": pull})
        assert answer.status_code == 200, answer.text

    take(9, "dave")
    time.sleep(0.3)
    give_back(9)  # one hold of the key seen: estimates from now on
    take(1, "alice")
    take(2, "bob")
    apply = Lines(start_step(step_env(service.url, 3, "carol"), "acquire", "--command",
                             "apply", "--wait", STEP_WAIT, "--poll", "200ms"))
    wait_for_waiters(service.url, 1)
    both = re.escape(f"waiting for {KEY}: position 1 of 1, behind pull #1 (alice), pull #2 "
                     "(bob) of acme/infra, which hold it shared") + ESTIMATE
    bob = re.escape(f"waiting for {KEY}: position 1 of 1, behind pull #2 (bob) of acme/infra, "
                    "which holds it shared") + ESTIMATE
    apply.wait_for(both)  # printed on a poll while both hold it
    give_back(1)
    apply.wait_for(bob)
    give_back(2)
    lines, err = apply.finish()
    assert apply.step.returncode == 0, err
    assert [line for line in lines if line.startswith("waiting")] == [
        line for line in lines if re.fullmatch(both, line) or re.fullmatch(bob, line)], lines
    assert any(re.fullmatch(both, line) for line in lines), lines
    assert any(re.fullmatch(bob, line) for line in lines), lines
    assert lines[-1].startswith(f"enhanced-locking: locked {KEY} for pull #3")


def test_a_step_that_waits_too_long_exits_1_with_one_line(service: ServiceProcess) -> None:
    run_step(step_env(service.url, 1, "alice"), "acquire", "--command", "plan")
    done = run_step(step_env(service.url, 2, "bob"), "acquire", "--command", "plan",
                    "--wait", "1s", "--poll", "200ms")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"enhanced-locking: gave up waiting for {KEY} after 1s: still held by pull #1 (alice) "
        "of acme/infra"]
    assert queue(service.url)["waiters"] == []


def test_a_step_without_wait_is_refused_at_once_naming_the_holder(
    service: ServiceProcess,
) -> None:
    run_step(step_env(service.url, 1, "alice"), "acquire", "--command", "plan")
    done = run_step(step_env(service.url, 2, "bob"), "acquire", "--command", "apply",
                    "--wait", "0s")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"enhanced-locking: {KEY} is locked by pull #1 (alice) of acme/infra (--wait 0s: no "
        "waiting)"]


def test_a_step_whose_wait_the_legacy_locker_cannot_queue_says_so(
    service_process: Callable[..., ServiceProcess],
) -> None:
    """Enhanced locking off: the legacy locker answers at once, as Atlantis does, whatever
    ``--wait`` asked; the line says the wait was given and why it was not waited."""
    url = service_process().url
    assert run_step(step_env(url, 1, "alice"), "acquire", "--command", "plan").returncode == 0
    done = run_step(step_env(url, 2, "bob"), "acquire", "--command", "apply", "--wait", "5m")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"enhanced-locking: {KEY} is locked by pull #1 (alice) of acme/infra (--wait 5m, but "
        "the legacy locker answered at once: it keeps no queue; waiting needs the key on the "
        "enhanced locker, enhanced-locking-enabled)"]


def test_another_pulls_release_step_frees_nothing(service: ServiceProcess) -> None:
    run_step(step_env(service.url, 1, "alice"), "acquire", "--command", "plan")
    done = run_step(step_env(service.url, 2, "bob"), "release")
    assert done.returncode == 1 and "held by pull #1" in done.stderr
    assert httpx.get(f"{service.url}/v1/locks/by-key", params={"key": KEY}).status_code == 200
    assert run_step(step_env(service.url, 1, "alice"), "release").returncode == 0
    again = run_step(step_env(service.url, 1, "alice"), "release")  # already free: not an error
    assert again.returncode == 0 and "nothing to release" in again.stdout


@pytest.mark.parametrize(("changes", "args", "message"), [
    ({}, ("acquire",), "say which command this step runs: --command plan or --command apply"),
    ({"PULL_NUM": ""}, ("acquire", "--command", "plan"), "PULL_NUM not set"),
    ({"PULL_NUM": "twelve"}, ("acquire", "--command", "plan"), "PULL_NUM is not a number"),
    ({}, ("acquire", "--command", "plan", "--wait", "soon"), "wait: expected a Go duration"),
])
def test_a_wrong_environment_or_flag_exits_2_with_one_line(
    service: ServiceProcess, changes: dict[str, str], args: tuple[str, ...], message: str,
) -> None:
    done = run_step(step_env(service.url, 1, "alice", **changes), *args)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and message in done.stderr
    assert "Traceback" not in done.stderr


def test_command_name_from_a_workflow_hook_is_enough(service: ServiceProcess) -> None:
    done = run_step(step_env(service.url, 1, "alice", COMMAND_NAME="apply"), "acquire")
    assert done.returncode == 0, done.stderr
    lock = httpx.get(f"{service.url}/v1/locks/by-key", params={"key": KEY}).json()["lock"]
    assert lock["priority"] == "high"


@pytest.mark.parametrize("command", ["import", "state"])
def test_import_and_state_rm_steps_wait_for_the_lock_like_an_apply(
    service: ServiceProcess, command: str,
) -> None:
    """Atlantis takes no lock of its own for ``import`` and ``state rm`` when its locks are
    off: their step is refused while another pull holds the project, and takes it with the
    priority of an apply once it is free."""
    assert run_step(step_env(service.url, 1, "alice"), "acquire", "--command", "plan",
                    ).returncode == 0
    refused = run_step(step_env(service.url, 2, "bob"), "acquire", "--command", command,
                       "--wait", "0s")
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.strip() == (f"enhanced-locking: {KEY} is locked by pull #1 (alice) of "
                                      "acme/infra (--wait 0s: no waiting)")
    assert run_step(step_env(service.url, 1, "alice"), "release").returncode == 0
    taken = run_step(step_env(service.url, 2, "bob"), "acquire", "--command", command)
    assert taken.returncode == 0, taken.stderr
    lock = httpx.get(f"{service.url}/v1/locks/by-key", params={"key": KEY}).json()["lock"]
    assert (lock["pull"]["num"], lock["priority"]) == (2, "high")


def test_url_and_token_work_wherever_they_are_put(
    service_process: Callable[..., ServiceProcess], tmp_path: Path,
    free_port: Callable[[], int],
) -> None:
    """``--url`` and ``--token`` before ``step`` (as before any command word) are the ones
    used, not the environment's URL nor no token at all; after the command word too."""
    token = "tok-step-4d3c2b1a0f9e8d7c"
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f'# token,name,uid,groups\n{token},atlantis,uid-1,"bots"\n')
    url = service_process("--enhanced-locking-auth=static",
                          f"--enhanced-locking-auth-tokens-file={tokens}",
                          "--enhanced-locking-auth-roles=locker=group:bots").url
    env = step_env(f"http://127.0.0.1:{free_port()}", 1, "alice")  # nothing listens there
    before = subprocess.run([*enhanced_locking_command(), "--url", url, "--token", token,
                             "step", "acquire", "--command", "plan"], env=env,
                            capture_output=True, text=True, timeout=STEP_START, check=False)
    assert before.returncode == 0, before.stderr
    assert token not in before.stdout + before.stderr
    lock = httpx.get(f"{url}/v1/locks/by-key", params={"key": KEY},
                     headers={"Authorization": f"Bearer {token}"}).json()["lock"]
    assert lock["pull"]["num"] == 1
    after = run_step(env, "release", "--url", url, "--token", token)
    assert after.returncode == 0, after.stderr
    assert f"released {KEY} of pull #1" in after.stdout


def test_an_apply_step_on_the_locker_role_asks_with_normal_priority(
    service_process: Callable[..., ServiceProcess], tmp_path: Path,
) -> None:
    """The locker role ("what Atlantis needs", the one the chart binds Atlantis to) has no
    ``prioritize`` right: an apply step, whose command asks ``high``, is not refused for it
    but asks again at normal, saying so. A ``--priority`` the user gave is refused as asked."""
    token = "tok-step-locker-9a8b7c6d5e"
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f'# token,name,uid,groups\n{token},atlantis,uid-1,"bots"\n')
    url = service_process("--enhanced-locking-enabled=true",
                          "--enhanced-locking-priority-queue=true",
                          "--enhanced-locking-auth=static",
                          f"--enhanced-locking-auth-tokens-file={tokens}",
                          "--enhanced-locking-auth-roles=locker=group:bots").url
    env = step_env(url, 1, "alice", ENHANCED_LOCKING_TOKEN=token)
    done = run_step(env, "acquire", "--command", "apply", "--wait", "0s")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no 'prioritize' right, so apply asks with normal priority" in done.stdout
    assert f"locked {KEY} for pull #1" in done.stdout
    lock = httpx.get(f"{url}/v1/locks/by-key", params={"key": KEY},
                     headers={"Authorization": f"Bearer {token}"}).json()["lock"]
    assert lock["pull"]["num"] == 1 and lock["priority"] == "normal"
    asked = run_step(env, "acquire", "--command", "apply", "--priority", "high")
    assert asked.returncode == 1, asked.stdout + asked.stderr
    assert "prioritize" in asked.stderr and len(asked.stderr.splitlines()) == 1


def test_a_step_without_a_token_the_service_knows_says_how_to_give_it_one(
    service_process: Callable[..., ServiceProcess], tmp_path: Path,
) -> None:
    """With access control on, a step run without a token, or with one the service does not
    know, fails (exit 1, one line): Atlantis puts that line in the pull request's comment,
    so it names the variable and the flag the step reads the token from, and never the
    token."""
    tokens = tmp_path / "tokens.csv"
    tokens.write_text('# token,name,uid,groups\ntok-step-known-4d3c2b1a,atlantis,uid-1,"bots"\n')
    url = service_process("--enhanced-locking-enabled=true", "--enhanced-locking-auth=static",
                          f"--enhanced-locking-auth-tokens-file={tokens}",
                          "--enhanced-locking-auth-roles=locker=group:bots").url
    for given in ({}, {"ENHANCED_LOCKING_TOKEN": "tok-step-unknown-0f9e8d"}):
        done = run_step(step_env(url, 1, "alice", **given), "acquire", "--command", "plan",
                        "--wait", "0s")
        assert done.returncode == 1, done.stdout + done.stderr
        lines = done.stderr.splitlines()
        assert len(lines) == 1, lines
        assert "ENHANCED_LOCKING_TOKEN" in lines[0] and "--token" in lines[0], lines
        assert "tok-step-unknown" not in done.stdout + done.stderr


def test_a_steps_ttl_is_the_lease_from_that_step_on(service: ServiceProcess) -> None:
    """The pull that holds the lock gets it back unchanged: an apply step's ``--ttl`` renews
    the lease from the apply on, so the lock cannot expire part way through the apply on
    what was left of the plan's lease."""
    env = step_env(service.url, 1, "alice")
    plan = run_step(env, "acquire", "--command", "plan", "--ttl", "1m")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    planned = httpx.get(f"{service.url}/v1/locks/by-key", params={"key": KEY}).json()["lock"]
    apply = run_step(env, "acquire", "--command", "apply", "--ttl", "2h")
    assert apply.returncode == 0, apply.stdout + apply.stderr
    applied = httpx.get(f"{service.url}/v1/locks/by-key", params={"key": KEY}).json()["lock"]
    assert applied["fencingToken"] == planned["fencingToken"]  # the same hold, not a new one
    lease = (datetime.fromisoformat(applied["expiresAt"])
             - datetime.fromisoformat(planned["expiresAt"]))
    assert lease > timedelta(minutes=59), (planned["expiresAt"], applied["expiresAt"])


class _RefreshRefused(http.server.BaseHTTPRequestHandler):
    """A proxy in front of the service that passes every call on, headers and all, but a
    lease renewal (``POST /v1/locks/refresh``), which it answers 503 itself: its upstream went
    away between two calls. ``upstream`` is the service's URL; ``refreshes`` counts them."""

    upstream = ""
    refreshes = 0

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.command == "POST" and self.path.startswith("/v1/locks/refresh"):
            type(self).refreshes += 1
            self.send_error(503, "no upstream ready")
            return
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "content-length", "connection")}
        answer = httpx.request(self.command, self.upstream + self.path, content=body,
                               headers=headers, timeout=60)
        self.send_response(answer.status_code)
        for name, value in answer.headers.items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection",
                                    "content-encoding"):
                self.send_header(name, value)
        self.send_header("content-length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    do_GET = do_POST = do_DELETE = _forward

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_step_that_fails_leaves_the_locks_as_they_were(service: ServiceProcess) -> None:
    """A step's ``--ttl`` renews only the lock its pull held already (the service's
    ``Lock-Grant: again``): a fresh grant has its whole lease. So a renewal that fails (the
    service gone between two calls) fails the step with the lock as it was, the pull's with
    its lease, and a step that was granted afresh does not fail after the grant with the lock
    held and nobody to release it (Atlantis runs no later step of a failed one)."""
    _RefreshRefused.upstream, _RefreshRefused.refreshes = service.url, 0
    with contextlib.contextmanager(serving)(_RefreshRefused) as through:
        plan = run_step(step_env(through, 1, "alice"), "acquire", "--command", "plan",
                        "--ttl", "1h")
        assert plan.returncode == 0, plan.stdout + plan.stderr
        assert _RefreshRefused.refreshes == 0
        planned = httpx.get(f"{service.url}/v1/locks/by-key", params={"key": KEY}).json()["lock"]
        assert planned["pull"]["num"] == 1 and planned["expiresAt"] is not None
        apply = run_step(step_env(through, 1, "alice"), "acquire", "--command", "apply",
                         "--ttl", "2h")
    assert apply.returncode == 3, apply.stdout + apply.stderr
    assert len(apply.stderr.splitlines()) == 1 and "Traceback" not in apply.stderr
    assert _RefreshRefused.refreshes >= 1
    after = httpx.get(f"{service.url}/v1/locks/by-key", params={"key": KEY}).json()["lock"]
    assert (after["fencingToken"], after["expiresAt"]) == (
        planned["fencingToken"], planned["expiresAt"])


def test_a_malformed_url_is_a_usage_error() -> None:
    done = run_step(step_env("http://127.0.0.1:4142", 1, "alice"), "--url", "nope", "acquire",
                    "--command", "plan")
    assert done.returncode == 2
    assert "expected the lock service's URL" in done.stderr and "Traceback" not in done.stderr


def test_an_unreachable_service_exits_3(free_port: Callable[[], int]) -> None:
    done = run_step(step_env(f"http://127.0.0.1:{free_port()}", 1, "alice",
                             ENHANCED_LOCKING_CONNECT_TIMEOUT=SHORT_CONNECT_TIMEOUT),
                    "acquire", "--command", "plan")
    assert done.returncode == 3 and len(done.stderr.splitlines()) == 1
    assert "cannot reach the lock service" in done.stderr


def test_a_host_name_that_does_not_resolve_exits_3_with_the_resolvers_words() -> None:
    """No restart mends it: the step says so at once (.invalid never resolves, RFC 6761)."""
    done = run_step(step_env("http://enhanced-locking.invalid:4142", 1, "alice"),
                    "acquire", "--command", "plan")
    assert done.returncode == 3 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "cannot reach the lock service at http://enhanced-locking.invalid:4142" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_step_run_while_the_service_restarts_waits_for_its_port(
    service: ServiceProcess,
) -> None:
    """A step whose connection is refused (the service restarting, an endpoint gone in a
    rollout: nothing reached the service) sends its call again until the service is back on
    its port, within the client's time; it exited 3 at once and the user had to run the
    command again."""
    service.stop()
    step = start_step(step_env(service.url, 1, "alice"), "acquire", "--command", "plan")
    lines = Lines(step)
    try:
        lines.wait_for(r"enhanced-locking: plan of pull #1 asks for .*")
        service.start()
    finally:
        out, err = lines.finish()
    assert step.returncode == 0, "\n".join(out) + err
    assert any(line.startswith(f"enhanced-locking: locked {KEY} for pull #1") for line in out)
    held = httpx.get(f"{service.url}/v1/locks/by-key", params={"key": KEY}).json()["lock"]
    assert held["pull"]["num"] == 1


@pytest.mark.redis
def test_a_release_whose_store_does_not_answer_exits_3_not_as_a_refusal(
    redis_server: RedisServer, service_process: Callable[..., ServiceProcess],
) -> None:
    """Its 503 (``reason: unavailable``) says nothing about the lock: not 1, a refusal (held,
    timed out), as for the ``lock`` commands."""
    url = service_process("--enhanced-locking-enabled", "--enhanced-locking-backend=redis",
                          f"--enhanced-locking-redis-addr={redis_server.addr}",
                          "--enhanced-locking-fallback=fail-closed").url
    redis_server.stop()
    done = run_step(step_env(url, 1, "alice"), "release")
    assert done.returncode == 3, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "did not answer" in lines[0], done.stderr


@pytest.mark.redis
def test_an_acquire_the_service_withholds_exits_3_saying_why(
    redis_server: RedisServer, service_process: Callable[..., ServiceProcess],
) -> None:
    """A service that grants no lock for now answers ``unavailable`` with why: here enhanced
    locking is off and the store its locks were kept in did not answer at the start (it may
    hold some). The step's line, which the pull request's comment shows, gives those words,
    not only that a store did not answer."""
    addr = redis_server.addr
    redis_server.stop()
    url = service_process("--enhanced-locking-backend=redis",
                          f"--enhanced-locking-redis-addr={addr}").url
    done = run_step(step_env(url, 1, "alice"), "acquire", "--command", "plan", "--wait", "0s")
    assert done.returncode == 3, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and KEY in lines[0], done.stderr
    assert "no lock is granted until it is read" in lines[0], done.stderr


def test_an_acquire_whose_store_does_not_answer_exits_3_not_as_a_refusal(
    redis_server: RedisServer, service_process: Callable[..., ServiceProcess],
) -> None:
    """With ``fallback: fail-closed`` the service answers the acquire 503 with reason
    ``unavailable``: the store did not answer and nothing is known of the lock, so 3 as for
    its other 503, not 1, which says the lock is held."""
    url = service_process("--enhanced-locking-enabled", "--enhanced-locking-backend=redis",
                          f"--enhanced-locking-redis-addr={redis_server.addr}",
                          "--enhanced-locking-fallback=fail-closed").url
    redis_server.stop()
    done = run_step(step_env(url, 1, "alice"), "acquire", "--command", "plan")
    assert done.returncode == 3, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "did not answer" in lines[0] and KEY in lines[0], done.stderr
