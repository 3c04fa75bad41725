"""What a newcomer meets first: the command's help, its version, where ``--url`` may go, one
output convention for refusals, a closed pipe, and the address the service says it listens on.
Each command runs as a real subprocess against a real ``enhanced-locking serve``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from tests.conftest import ServiceFactory
from tests.integration.test_cli import output, run
from tests.support.loopback_http import serving
from tests.support.service import (
    SHORT_CONNECT_TIMEOUT,
    enhanced_locking_command,
    free_port,
    scrubbed_env,
)

from enhanced_locking import cli
from enhanced_locking import client as client_module
from enhanced_locking.client import Client, ServiceError
from enhanced_locking.config import settings
from enhanced_locking.types import LockRequest


def test_version_names_the_package_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("enhanced-locking 0.")


@pytest.mark.parametrize("where", ["before the command", "after lock", "after the subcommand"])
def test_url_works_wherever_it_is_put(unlocked_url: str, where: str) -> None:
    url = unlocked_url
    args = {
        "before the command": ["--url", url, "lock", "list"],
        "after lock": ["lock", "--url", url, "list"],
        "after the subcommand": ["lock", "list", "--url", url],
    }[where]
    result = run(*args, env={"ENHANCED_LOCKING_URL": f"http://127.0.0.1:{free_port()}"})
    assert result.returncode == 0, result.stderr
    assert output(result) == {"locks": []}


def test_events_and_queue_take_the_url_after_the_command(unlocked_url: str) -> None:
    url = unlocked_url
    result = run("lock", "queue", "--key", "acme/infra/./default/", "--url", url)
    assert result.returncode == 0, result.stderr
    assert output(result)["waiters"] == []


@pytest.mark.parametrize("bad", ["nope", "ftp://127.0.0.1:4142", "http://",
                                 "http://127.0.0.1:99999", "http://127.0.0.1:65536",
                                 "http://127.0.0.1:0"])
def test_a_malformed_url_is_a_usage_error(bad: str) -> None:
    flagged = run("lock", "list", "--url", bad)
    assert flagged.returncode == 2
    assert "expected the lock service's URL" in flagged.stderr
    from_env = run("lock", "list", env={"ENHANCED_LOCKING_URL": bad})
    assert from_env.returncode == 2
    assert from_env.stderr.splitlines() == [
        f"enhanced-locking: ENHANCED_LOCKING_URL: expected the lock service's URL, such as "
        f"http://127.0.0.1:4142, got {bad!r}"]


def test_every_refusal_is_an_answer_on_stdout_and_one_line_on_stderr(
    service_process: ServiceFactory,
) -> None:
    url = service_process().url
    base = ("lock", "--url", url)
    assert run(*base, "acquire", "--repo", "acme/infra", "--pull", "12",
               "--user", "alice").returncode == 0
    key = "acme/infra/./default/"

    held = run(*base, "acquire", "--repo", "acme/infra", "--pull", "13")
    not_owner = run(*base, "release", "--key", key, "--pull", "13")
    free = run(*base, "release", "--key", "acme/web/./default/")
    not_queued = run(*base, "cancel", "--key", key, "--id", "nobody")
    for result in (held, not_owner, free, not_queued):
        assert result.returncode == 1
        answer = output(result)  # stdout is one JSON document
        assert isinstance(answer, dict)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("enhanced-locking: "), result.stderr
    assert held.stderr.strip() == (
        f"enhanced-locking: not acquired (held): {key} is held by pull #12 of alice")
    assert output(not_owner)["holder"]["pull"]["num"] == 12
    assert output(free) == {"released": False, "lockKey": "acme/web/./default/",
                            "error": "no lock is held on acme/web/./default/"}


def test_a_reader_that_stops_early_ends_the_command_quietly(
    service_process: ServiceFactory,
) -> None:
    url = service_process().url
    for pull in range(3):
        assert run("lock", "--url", url, "acquire", "--repo", "acme/infra", "--path",
                   f"p{pull}", "--pull", str(pull)).returncode == 0
    # `enhanced-locking lock list | head -c0`: the reader is gone before the first write.
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([*enhanced_locking_command(), "lock", "list", "--url", url],
                                stdout=write, stderr=subprocess.PIPE, text=True,
                                env=scrubbed_env(), timeout=60)
    finally:
        os.close(write)
    assert result.returncode == 141
    assert result.stderr == ""


@pytest.mark.parametrize("command", [["serve"], ["operator"], ["config", "show"],
                                     ["migrate", "import"]])
def test_help_keeps_the_settings_out_of_the_commands_own_options(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0
    usage, _, rest = result.stdout.partition("\n\n")
    assert "--enhanced-locking-SETTING VALUE ..." in usage
    assert "--enhanced-locking-backend" not in usage
    own, _, settings_part = rest.partition("enhanced locking settings:")
    assert settings_part, "the settings have their own section"
    assert "--enhanced-locking-" not in own
    assert "Default: None" not in result.stdout and "Default: ." not in result.stdout
    for setting in settings():
        assert setting.flag in settings_part


def _subparser(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("command", [["serve"], ["operator"], ["lock", "acquire"],
                                     ["lock", "release"], ["lock", "list"],
                                     ["lock", "unlock-pull"], ["lock", "queue"], ["events"]])
def test_every_option_is_described(command: list[str]) -> None:
    parser = _subparser(cli._parser(), *command)
    for action in parser._actions:
        assert action.help, f"{' '.join(command)} {action.option_strings} has no description"
    assert "address to listen on" in run("serve", "--help").stdout


def test_serve_logs_the_address_it_listens_on(service_process: ServiceFactory) -> None:
    service = service_process()
    deadline = time.monotonic() + 10
    while f"listening on {service.url}" not in service.output():
        assert time.monotonic() < deadline, service.output()
        time.sleep(0.05)


def test_serve_on_a_port_in_use_exits_2_before_opening_its_store(tmp_path: object) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = f"{tmp_path}/data"
        result = run("serve", "--port", str(port), "--data-dir", data)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("address already in use")
    assert not os.path.exists(f"{data}/enhanced-locking.db")
    assert "Traceback" not in result.stderr


def test_config_show_still_prints_json() -> None:
    assert json.loads(run("config", "show").stdout)["enhanced-locking-enabled"] is False


class _ProxyErrorPage(http.server.BaseHTTPRequestHandler):
    """What an ingress answers while the service behind it is down: an HTML error page."""

    status, page = 502, b"<html><body><h1>502 Bad Gateway</h1></body></html>"

    def _page(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        page = self.page
        self.send_response(self.status)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    do_GET = do_POST = do_DELETE = _page

    def log_message(self, format: str, *args: object) -> None:
        pass


class _SignInPage(_ProxyErrorPage):
    """What a proxy asking its users to sign in (or a URL that is not the service) answers to
    any path: a page with 200."""

    status, page = 200, b"<html><body><form>Sign in</form></body></html>"


@pytest.fixture
def proxy_error_page() -> Iterator[str]:
    yield from serving(_ProxyErrorPage)


@pytest.fixture
def sign_in_page() -> Iterator[str]:
    yield from serving(_SignInPage)


@pytest.mark.parametrize("command", [
    ["lock", "acquire", "--repo", "acme/infra", "--pull", "12", "--wait", "5s"],
    ["lock", "acquire", "--repo", "acme/infra", "--pull", "12"],
    ["step", "acquire", "--command", "plan", "--wait", "5s"],
    ["step", "release"],
])
def test_an_answer_that_is_not_json_is_one_line_not_a_traceback(
    proxy_error_page: str, command: list[str],
) -> None:
    """A proxy's HTML error page in place of the service's JSON: the waiting acquire (whose
    client reads the queue beside it), the plain one and the Atlantis steps end with one
    line naming the status, as for any refusal."""
    result = run(*command, "--url", proxy_error_page,
                 env={"BASE_REPO_OWNER": "acme", "BASE_REPO_NAME": "infra", "PULL_NUM": "12"})
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "HTTP 502" in lines[0], result.stderr


@pytest.mark.parametrize("command", [
    ["lock", "list"],
    ["events"],
    ["lock", "acquire", "--repo", "acme/infra", "--pull", "12", "--wait", "5s"],
    ["step", "acquire", "--command", "plan", "--wait", "5s"],
    ["step", "release"],
])
def test_a_page_that_is_not_the_services_answer_is_one_line_exit_3(
    sign_in_page: str, command: list[str],
) -> None:
    """A 200 that is not the service's JSON (a sign-in page, or a URL that names another web
    server) is not the lock service answering: exit 3 with one line, not a traceback."""
    result = run(*command, "--url", sign_in_page,
                 env={"BASE_REPO_OWNER": "acme", "BASE_REPO_NAME": "infra", "PULL_NUM": "12"})
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 3
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "did not answer as the lock service: HTTP 200 text/html, not " in lines[0]


def test_a_404_that_is_not_the_services_answer_is_not_read_as_nothing_there(
    unlocked_url: str,
) -> None:
    """A URL whose path is not the service's (``/locks`` before ``/v1``) is answered 404 by
    every route: that says nothing of the lock. Not "was not locked; nothing to release"
    (exit 0: a release step that freed nothing passed) nor "no lock is held" (exit 1), but
    one line and exit 3, as for any answer that is not the service's."""
    url = unlocked_url + "/locks"
    for command in (["step", "release"],
                    ["lock", "release", "--key", "acme/infra/./default/", "--pull", "12"],
                    ["lock", "refresh", "--key", "acme/infra/./default/", "--pull", "12"],
                    ["lock", "force-unlock", "--key", "acme/infra/./default/"],
                    ["lock", "cancel", "--key", "acme/infra/./default/", "--id", "r-1"]):
        result = run(*command, "--url", url, env={
            "BASE_REPO_OWNER": "acme", "BASE_REPO_NAME": "infra", "PULL_NUM": "12"})
        assert result.returncode == 3, (command, result.stdout + result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1, (command, result.stderr)
        assert "HTTP 404 that is not its answer for acme/infra/./default/" in lines[0]


def test_a_password_in_the_url_is_never_shown() -> None:
    """A URL carrying a user and password (for a proxy asking basic authentication) is not
    repeated in a message: an Atlantis step's output goes into the pull request."""
    url = f"http://atlantis:pw-s3cret-77@127.0.0.1:{free_port()}"  # nothing listens there
    step = run("step", "acquire", "--command", "plan", "--wait", "0s", env={
        "ENHANCED_LOCKING_URL": url, "BASE_REPO_OWNER": "acme", "BASE_REPO_NAME": "infra",
        "PULL_NUM": "12", "ENHANCED_LOCKING_CONNECT_TIMEOUT": SHORT_CONNECT_TIMEOUT})
    listing = run("lock", "list", "--url", url, "--connect-timeout", SHORT_CONNECT_TIMEOUT)
    for result in (step, listing):
        assert result.returncode == 3, result.stderr
        assert "cannot reach the lock service at http://127.0.0.1:" in result.stderr
    malformed = run("lock", "list", "--url", "http://atlantis:pw-s3cret-77@127.0.0.1:99999")
    assert malformed.returncode == 2
    assert "got 'http://127.0.0.1:99999'" in malformed.stderr
    for result in (step, listing, malformed):
        assert "pw-s3cret-77" not in result.stdout + result.stderr


def test_a_bare_wait_on_a_server_that_never_answers_ends_with_one_line_exit_3() -> None:
    """``lock acquire --wait`` without a duration waits the service's default timeout, which
    only the service knows: its answer is bounded by what the service says it is. A server
    that accepts the connection and never answers (a stopped process, a stuck proxy) ends the
    command with one line and exit 3, not a hang."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # connections are accepted by the kernel, never answered
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        result = run("lock", "acquire", "--repo", "acme/infra", "--pull", "12", "--wait",
                     "--url", url)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 3, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "did not answer within 10s" in lines[0], result.stderr


class _StalledAcquires(http.server.BaseHTTPRequestHandler):
    """A service whose configuration answers (a default timeout of 1s) and whose acquires
    never do: the process stalled as it began the wait."""

    stalled = threading.Event()

    def do_GET(self) -> None:
        body = json.dumps({"config": {"enhanced-locking-default-timeout": "1s"}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.stalled.wait(120)  # until the test ends

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_bare_wait_is_bounded_by_the_services_default_timeout_and_a_margin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client reads the service's ``enhanced-locking-default-timeout`` (1s here) and gives
    the answer that long plus the margin every waiting acquire gets (30s, as the docs say;
    2s here, so the test waits 3s, not 31s): then it gives up with a message naming the bound,
    status 0 (exit 3), never sooner."""
    assert client_module.WAIT_MARGIN == 30.0  # docs/01-foundation.md: "plus 30 s"
    monkeypatch.setattr(client_module, "WAIT_MARGIN", 2.0)
    _StalledAcquires.stalled.clear()
    with contextlib.contextmanager(serving)(_StalledAcquires) as url:
        try:
            with Client(url) as client:
                started = time.monotonic()
                with pytest.raises(ServiceError) as raised:
                    client.acquire(LockRequest.model_validate(
                        {"project": {"repoFullName": "acme/infra"}, "pull": {"num": 12},
                         "wait": True}))
                waited = time.monotonic() - started
        finally:
            _StalledAcquires.stalled.set()
    assert raised.value.status == 0
    assert "did not answer within 3s" in str(raised.value), raised.value
    assert waited >= 3


@pytest.mark.parametrize("command", [["lock"], ["lock", "unlock-pull"]])
def test_the_lock_commands_help_names_their_exit_codes(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0
    codes = result.stdout.partition("Exit codes:")[2]
    assert codes, "the help names the exit codes"
    for code in ("0 done", "1 refused", "2 invalid usage", "3 the service could not be reached",
                 "unlock-pull left a store's locks held"):
        assert code in " ".join(codes.split())
