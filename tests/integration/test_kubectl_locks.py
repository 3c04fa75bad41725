"""``kubectl locking locks ...``: the plugin's lock commands against a real lock service.

The ``rollout`` commands need a real API server: tests/e2e/test_kubectl_plugin.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import yaml
from tests.conftest import ServiceFactory
from tests.support.locks import request_for
from tests.support.redis_server import RedisServer
from tests.support.service import free_port, scrubbed_env
from tests.support.unreadable import SECRET, spoil_file
from tests.support.waiting import wait_for

from enhanced_locking.client import Client

KEY = "acme/infra/./default/"


def plugin_command() -> list[str]:
    script = Path(sys.executable).parent / "kubectl-locking"
    assert script.exists(), "kubectl-locking is not installed: run `make venv`"
    return [str(script)]


def plugin(*args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = scrubbed_env({"ENHANCED_LOCKING_URL": url} if url else {})
    return subprocess.run([*plugin_command(), *args], capture_output=True, text=True, env=env,
                          timeout=60)


def queued(client: Client, waiters: int) -> bool:
    return len(client.queue(KEY)["waiters"]) >= waiters


@pytest.fixture
def waiting(service_process: ServiceFactory) -> Iterator[tuple[str, list[subprocess.Popen[str]]]]:
    """A service where pull 12 holds KEY and pulls 13 and 14 wait for it, in that order."""
    url = service_process("--enhanced-locking-enabled").url
    command = [str(Path(sys.executable).parent / "enhanced-locking"), "lock", "--url", url,
               "acquire", "--repo", "acme/infra"]
    assert subprocess.run([*command, "--pull", "12", "--user", "alice"], capture_output=True,
                          env=scrubbed_env(), timeout=60).returncode == 0
    waiters = []
    try:
        with Client(url) as client:
            for pull, user in ((13, "bob"), (14, "carol")):
                waiters.append(subprocess.Popen(
                    [*command, "--pull", str(pull), "--user", user, "--wait", "5m"],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                    env=scrubbed_env()))
                # a new CLI process's start alone took over 10 s on a busy machine
                wait_for(f"pull {pull} to queue", partial(queued, client, pull - 12), timeout=60)
        yield url, waiters
    finally:
        for waiter in waiters:
            waiter.kill()
            waiter.communicate()


def test_locks_list_shows_holder_age_lease_and_fencing_token(
    waiting: tuple[str, list[subprocess.Popen[str]]],
) -> None:
    url, _ = waiting
    result = plugin("locks", "list", url=url)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == ["KEY", "PULL", "AGE", "LEASE", "UNTIL", "TOKEN", "BACKEND"]
    assert row.split()[:3] == [KEY, "#12", "alice"] and row.split()[-1] == "enhanced"
    assert "\033[" not in result.stdout  # not a terminal: no colour
    as_json = plugin("locks", "list", "-o", "json", "--url", url)
    assert [lock["pull"]["num"] for lock in json.loads(as_json.stdout)["locks"]] == [12]
    as_yaml = plugin("locks", "--url", url, "list", "--repo", "acme/web", "-o", "yaml")
    assert yaml.safe_load(as_yaml.stdout) == {"locks": []}


def test_locks_queue_shows_positions_and_who_blocks_whom(
    waiting: tuple[str, list[subprocess.Popen[str]]],
) -> None:
    url, _ = waiting
    result = plugin("locks", "queue", KEY, url=url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{KEY}: held by pull #12 alice, fencing token 1"
    assert lines[1].split()[:3] == ["POS", "PULL", "PRIORITY"]
    assert lines[2].split()[:3] == ["1", "#13", "bob"] and lines[2].endswith("holder #12 alice")
    assert lines[3].split()[:3] == ["2", "#14", "carol"] and lines[3].endswith("#13 (position 1)")
    answer = json.loads(plugin("locks", "queue", KEY, "-o", "json", url=url).stdout)
    assert [w["pull"] for w in answer["waiters"]] == [13, 14]


def test_locks_queue_shows_every_shared_holder(service_process: ServiceFactory) -> None:
    """Pulls 12 and 13 hold the key shared and pull 14 waits for it: the queue names both
    holders, and the waiter waits for both. Before, it showed pull 12 alone (the answer's
    ``holder``, its first), as if the key were pull 12's."""
    url = service_process("--enhanced-locking-enabled").url
    command = [str(Path(sys.executable).parent / "enhanced-locking"), "lock", "--url", url,
               "acquire", "--repo", "acme/infra"]
    for pull, user in ((12, "alice"), (13, "bob")):
        assert subprocess.run([*command, "--pull", str(pull), "--user", user, "--mode",
                               "shared"], capture_output=True, env=scrubbed_env(),
                              timeout=60).returncode == 0
    waiter = subprocess.Popen([*command, "--pull", "14", "--user", "carol", "--wait", "5m"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env=scrubbed_env())
    try:
        with Client(url) as client:
            wait_for("pull 14 to queue", partial(queued, client, 1), timeout=60)
        result = plugin("locks", "queue", KEY, url=url)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == (f"{KEY}: held shared by pulls #12 alice (fencing token 1), "
                            "#13 bob (fencing token 2)"), lines[0]
        assert lines[2].split()[:3] == ["1", "#14", "carol"]
        assert lines[2].endswith("holders #12 alice, #13 bob"), lines[2]
    finally:
        waiter.kill()
        waiter.communicate()


def test_locks_unlock_needs_a_reason_and_hands_the_lock_to_the_first_waiter(
    waiting: tuple[str, list[subprocess.Popen[str]]],
) -> None:
    url, waiters = waiting
    missing = plugin("locks", "unlock", KEY, url=url)
    assert missing.returncode == 2 and "--reason" in missing.stderr
    result = plugin("locks", "unlock", KEY, "--reason", "plan stuck since Friday", url=url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"unlocked {KEY} (was held by pull #12 alice, fencing token 1); "
                             "reason: plan stuck since Friday\n")
    out, _ = waiters[0].communicate(timeout=30)
    assert json.loads(out)["lock"]["pull"]["num"] == 13
    with Client(url) as client:
        holder = client.get(KEY)
    assert holder is not None and holder.fencing_token > 1


def test_locks_unlock_of_a_free_key_is_refused_with_one_line(
    service_process: ServiceFactory,
) -> None:
    url = service_process().url
    result = plugin("locks", "unlock", KEY, "--reason", "tidy", url=url)
    assert result.returncode == 1
    assert json.loads(result.stdout)["released"] is False
    assert result.stderr.splitlines() == [f"kubectl-locking: no lock is held on {KEY}"]


def test_locks_exit_codes_for_a_bad_url_and_an_absent_service() -> None:
    bad = plugin("locks", "list", url="not a url")
    assert bad.returncode == 2 and bad.stderr.startswith("kubectl-locking: ENHANCED_LOCKING_URL")
    gone = plugin("locks", "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert gone.returncode == 3
    assert len(gone.stderr.splitlines()) == 1 and "cannot reach" in gone.stderr


@pytest.mark.parametrize(("flag", "value"), [("--interval", "-1"), ("--interval", "0"),
                                             ("--timeout", "-5"), ("--timeout", "nan")])
def test_rollout_status_seconds_that_cannot_be_waited_are_a_usage_error(
    flag: str, value: str,
) -> None:
    """``--watch --interval -1`` would reach the cluster and fail in its first sleep with a
    traceback: it is refused before, exit 2 naming the flag."""
    done = plugin("rollout", "status", "--watch", flag, value, "--kubeconfig", "/nonexistent")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"kubectl locking rollout status: error: argument {flag}: expected seconds, "
        f"{'above 0' if flag == '--interval' else '0 or more'}, got {value!r}"]


@pytest.mark.redis
def test_locks_list_says_which_store_did_not_answer(
    redis_server: RedisServer, service_process: ServiceFactory,
) -> None:
    """With the enhanced store down the service lists legacy's locks and says so: the table
    never reads "no locks held" for a store it did not reach."""
    url = service_process("--enhanced-locking-enabled", "--enhanced-locking-backend=redis",
                          f"--enhanced-locking-redis-addr={redis_server.addr}").url
    with Client(url) as client:
        assert client.acquire(request_for(pull=12)).acquired
    redis_server.stop()
    result = plugin("locks", "list", url=url)
    assert result.returncode == 0, result.stderr
    assert "no locks held" not in result.stdout
    assert "enhanced" in result.stderr and "not listed" in result.stderr, result.stderr
    as_json = json.loads(plugin("locks", "list", "-o", "json", "--url", url).stdout)
    assert as_json == {"locks": [], "unavailable": ["enhanced"]}


def test_locks_list_as_json_says_which_stored_locks_it_could_not_read(
    service_process: ServiceFactory, data_dir: Path,
) -> None:
    """With ``-o json`` (or yaml) the answer names the stored locks it cannot read under
    ``unreadable``, and, as for a store that did not answer, one line on stderr names them
    and how to clear them: a script reading ``locks`` never takes them for everything held.
    The table says it in its own section. Before, stderr was empty with ``-o``."""
    url = service_process().url
    with Client(url) as client:
        for path in ("envs/prod", "envs/dev"):
            assert client.acquire(request_for(path=path, pull=12)).acquired
        dev = next(lock.key for lock in client.list() if "envs/dev" in lock.key)
    spoil_file(str(data_dir / "enhanced-locking.db"), "legacy", dev, f"token={SECRET}")
    for output in ("json", "yaml"):
        result = plugin("locks", "list", "-o", output, "--url", url)
        assert result.returncode == 0, result.stderr
        answer = yaml.safe_load(result.stdout)
        assert [entry["key"] for entry in answer["unreadable"]] == [dev]
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and dev in lines[0] and "force-unlock" in lines[0], lines
        assert SECRET not in result.stdout + result.stderr
    table = plugin("locks", "list", "--url", url)
    assert table.returncode == 0 and dev in table.stdout, table.stdout + table.stderr
