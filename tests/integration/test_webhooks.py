"""VCS webhooks against a real ``enhanced-locking serve``, with payloads the VCSs really send.

The GitHub and GitLab bodies are the ones Atlantis v0.47.1 keeps in its own test data (captured
from github.com and gitlab.com; read from the Go module proxy), the Gitea body follows Gitea's
documented ``pull_request`` payload. Each is signed as its VCS signs it. A closed or merged
pull request releases its locks and drops its queued requests, only in its own repository; a
bad or missing signature answers 401 and changes nothing; a redelivery changes nothing. The
secrets come from the environment, a flag and the YAML file, and appear in no output.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.atlantis_models import atlantis_source
from tests.support.gobuild import GoBuildError
from tests.support.service import ServiceProcess

GITHUB_SECRET = "gh-webhook-s3cret-value"
GITLAB_SECRET = "gl-webhook-t0ken-value"
GITEA_SECRET = "gitea-webhook-s3cret-value"


@pytest.fixture(scope="module")
def atlantis_testdata() -> Path:
    try:
        return atlantis_source() / "server"
    except GoBuildError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture
def service(service_process: Callable[..., ServiceProcess], tmp_path: Path) -> ServiceProcess:
    config = tmp_path / "config.yaml"
    config.write_text(f"enhanced-locking-gitea-webhook-secret: {GITEA_SECRET}\n")
    return service_process(
        "--enhanced-locking-enabled=true", "--config", str(config),
        f"--enhanced-locking-gitlab-webhook-secret={GITLAB_SECRET}",
        env={"ATLANTIS_ENHANCED_LOCKING_GITHUB_WEBHOOK_SECRET": GITHUB_SECRET},
    )


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def github_closed(testdata: Path) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(
        (testdata / "controllers/events/testdata/githubPullRequestClosedEvent.json").read_text())
    body["pull_request"]["closed_at"] = now_rfc3339()  # closed now, after the locks were taken
    return body


def gitlab_event(testdata: Path, action: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(
        (testdata / "events/testdata/gitlab-merge-request-event-subgroup.json").read_text())
    body["object_attributes"]["action"] = action  # as Atlantis's own parser tests vary it
    body["object_attributes"]["state"] = {"merge": "merged", "close": "closed"}.get(action,
                                                                                  "opened")
    body["object_attributes"]["updated_at"] = datetime.now(UTC).strftime(
        "%Y-%m-%d %H:%M:%S UTC")  # GitLab's own time format in this payload
    return body


def gitea_closed(repo: str, number: int, *, merged: bool) -> dict[str, Any]:
    """Gitea's ``pull_request`` payload (``api.PullRequestPayload``), as documented."""
    owner, name = repo.split("/")
    user = {"id": 1, "login": "alice", "full_name": "", "email": "alice@example.com",
            "avatar_url": "https://gitea.example/avatars/1", "username": "alice"}
    repository = {"id": 7, "owner": {**user, "login": owner, "username": owner}, "name": name,
                  "full_name": repo, "private": False, "fork": False,
                  "html_url": f"https://gitea.example/{repo}",
                  "clone_url": f"https://gitea.example/{repo}.git", "default_branch": "main"}
    return {
        "action": "closed", "number": number,
        "pull_request": {
            "id": 101, "url": f"https://gitea.example/{repo}/pulls/{number}",
            "number": number, "user": user, "title": "Add network", "body": "",
            "state": "closed", "html_url": f"https://gitea.example/{repo}/pulls/{number}",
            "mergeable": True, "merged": merged,
            "merged_at": now_rfc3339() if merged else None, "merge_commit_sha": None,
            "base": {"label": "main", "ref": "main", "sha": "a" * 40, "repo": repository},
            "head": {"label": "feature", "ref": "feature", "sha": "b" * 40, "repo": repository},
            "created_at": "2026-01-01T10:00:00Z", "updated_at": now_rfc3339(),
            "closed_at": now_rfc3339(),
        },
        "repository": repository, "sender": user,
    }


def post(service: ServiceProcess, vcs: str, body: dict[str, Any], *, secret: str,
         event: str, delivery: str | None = None, tamper: bool = False) -> httpx.Response:
    raw = json.dumps(body).encode()
    delivery = delivery or str(uuid.uuid4())
    digest = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    headers = {"content-type": "application/json"}
    if vcs == "github":
        headers |= {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery,
                    "X-Hub-Signature-256": f"sha256={digest}",
                    "User-Agent": "GitHub-Hookshot/044aadd"}
    elif vcs == "gitlab":
        headers |= {"X-Gitlab-Event": event, "X-Gitlab-Token": secret,
                    "X-Gitlab-Event-UUID": delivery, "Idempotency-Key": delivery}
    else:
        headers |= {"X-Gitea-Event": event, "X-Gitea-Delivery": delivery,
                    "X-Gitea-Signature": digest, "X-GitHub-Event": event}
    if tamper:
        raw = raw.replace(b'"closed"', b'"opened"', 1) if b'"closed"' in raw else raw + b" "
    return httpx.post(f"{service.url}/v1/webhooks/{vcs}", content=raw, headers=headers,
                      timeout=30)


def acquire(service: ServiceProcess, repo: str, path: str, pull: int, *,
            wait: str | None = None) -> httpx.Response:
    body: dict[str, Any] = {"project": {"repoFullName": repo, "path": path},
                            "pull": {"num": pull}, "user": {"username": f"u{pull}"}}
    if wait:
        body["wait"] = wait
    return httpx.post(f"{service.url}/v1/locks", json=body, timeout=60)


def held(service: ServiceProcess) -> list[tuple[str, int]]:
    locks = httpx.get(f"{service.url}/v1/locks").json()["locks"]
    return sorted((lock["project"]["repoFullName"] + ":" + lock["project"]["path"],
                   lock["pull"]["num"]) for lock in locks)


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(4) as executor:
        yield executor


def queued(service: ServiceProcess, key: str, count: int) -> None:
    end = time.monotonic() + 20
    while time.monotonic() < end:
        waiters = httpx.get(f"{service.url}/v1/queue", params={"key": key}).json()["waiters"]
        if len(waiters) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"nobody queued on {key}")


def test_a_closed_github_pull_releases_its_locks_and_drops_its_queued_requests(
    service: ServiceProcess, atlantis_testdata: Path,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    repo = "runatlantis/atlantis-tests"  # the repository and pull #2 of GitHub's payload
    assert acquire(service, repo, "envs/a", 2).status_code == 200
    assert acquire(service, repo, "envs/b", 2).status_code == 200
    assert acquire(service, f"{repo}-infra", "envs/a", 2).status_code == 200  # prefix repo
    assert acquire(service, repo, "envs/c", 7).status_code == 200
    waiting = pool.submit(acquire, service, repo, "envs/c", 2, wait="30s")
    queued(service, f"{repo}/envs/c/default/", 1)

    answer = post(service, "github", github_closed(atlantis_testdata), secret=GITHUB_SECRET,
                  event="pull_request")

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["repo"], body["pull"], body["merged"]) == (repo, 2, False)
    assert sorted(body["released"]) == [f"{repo}/envs/a/default/", f"{repo}/envs/b/default/"]
    assert len(body["cancelled"]) == 1
    refused = waiting.result(timeout=30)
    assert refused.status_code == 409 and refused.json()["reason"] == "cancelled"
    assert held(service) == [(f"{repo}-infra:envs/a", 2), (f"{repo}:envs/c", 7)]
    # The audit trail says who closed it: the VCS whose signature vouched for the event.
    rows = httpx.get(f"{service.url}/v1/audit", params={"identity": "webhook:github"}).json()
    assert [(r["outcome"], r["repo"], r["pull"], r["status"]) for r in rows["entries"]] == [
        ("pull-closed", repo, 2, 200)]


def test_a_bad_or_missing_signature_is_401_and_changes_nothing(
    service: ServiceProcess, atlantis_testdata: Path,
) -> None:
    repo = "runatlantis/atlantis-tests"
    acquire(service, repo, "envs/a", 2)
    event = github_closed(atlantis_testdata)
    for answer in (
        post(service, "github", event, secret="not-the-secret", event="pull_request"),
        post(service, "github", event, secret=GITHUB_SECRET, event="pull_request", tamper=True),
        httpx.post(f"{service.url}/v1/webhooks/github", json=event,
                   headers={"X-GitHub-Event": "pull_request"}),
        post(service, "gitlab", gitlab_event(atlantis_testdata, "merge"), secret="wrong",
             event="Merge Request Hook"),
        post(service, "gitea", gitea_closed(repo, 2, merged=False), secret=GITHUB_SECRET,
             event="pull_request"),
    ):
        assert answer.status_code == 401
        assert answer.headers["content-type"] == "application/json"
        assert answer.json()["error"]
    assert held(service) == [(f"{repo}:envs/a", 2)]
    rows = httpx.get(f"{service.url}/v1/audit", params={"outcome": "unauthenticated"}).json()
    assert sorted(r["action"] for r in rows["entries"]) == [
        "POST /v1/webhooks/gitea", "POST /v1/webhooks/github", "POST /v1/webhooks/github",
        "POST /v1/webhooks/github", "POST /v1/webhooks/gitlab"]


def test_a_redelivered_close_changes_nothing_even_after_the_pull_is_locked_again(
    service: ServiceProcess, atlantis_testdata: Path,
) -> None:
    repo = "runatlantis/atlantis-tests"
    acquire(service, repo, "envs/a", 2)
    event = github_closed(atlantis_testdata)
    first = post(service, "github", event, secret=GITHUB_SECRET, event="pull_request",
                 delivery="d-1")
    assert first.json()["released"] == [f"{repo}/envs/a/default/"]
    time.sleep(3.1)  # reopened and planned again, later than the close (and its tolerance)
    acquire(service, repo, "envs/a", 2)

    same = post(service, "github", event, secret=GITHUB_SECRET, event="pull_request",
                delivery="d-1")
    assert same.json() == {"duplicate": True, "delivery": "d-1"}
    # A redelivery under a new delivery id (another replica, a restart) still changes nothing.
    again = post(service, "github", event, secret=GITHUB_SECRET, event="pull_request")
    assert again.status_code == 200 and again.json()["released"] == []
    assert held(service) == [(f"{repo}:envs/a", 2)]


@pytest.mark.parametrize("action", ["merge", "close"])
def test_a_merged_or_closed_gitlab_merge_request_releases_its_locks(
    service: ServiceProcess, atlantis_testdata: Path, action: str,
) -> None:
    repo = "lkysow-test/subgroup/sub-subgroup/atlantis-example"  # GitLab's payload, MR !2
    acquire(service, repo, ".", 2)
    acquire(service, "lkysow-test/subgroup", "sub-subgroup/atlantis-example", 9)
    answer = post(service, "gitlab", gitlab_event(atlantis_testdata, action),
                  secret=GITLAB_SECRET, event="Merge Request Hook")
    assert answer.status_code == 200, answer.text
    assert answer.json()["released"] == [f"{repo}/./default/"]
    assert answer.json()["merged"] is (action == "merge")
    assert held(service) == [("lkysow-test/subgroup:sub-subgroup/atlantis-example", 9)]


def test_an_opened_or_updated_merge_request_changes_nothing(
    service: ServiceProcess, atlantis_testdata: Path,
) -> None:
    repo = "lkysow-test/subgroup/sub-subgroup/atlantis-example"
    acquire(service, repo, ".", 2)
    for action in ("open", "update", "reopen"):
        answer = post(service, "gitlab", gitlab_event(atlantis_testdata, action),
                      secret=GITLAB_SECRET, event="Merge Request Hook")
        assert answer.status_code == 200 and answer.json() == {"ignored": "Merge Request Hook"}
    ping = post(service, "github", {"zen": "Keep it logically awesome.", "hook_id": 1},
                secret=GITHUB_SECRET, event="ping")
    assert ping.json() == {"ignored": "ping"}
    assert held(service) == [(f"{repo}:.", 2)]


@pytest.mark.parametrize("merged", [False, True], ids=["closed-unmerged", "merged"])
def test_a_closed_gitea_pull_releases_its_locks_merged_or_not(
    service: ServiceProcess, merged: bool,
) -> None:
    # Atlantis itself does not release a Gitea pull closed without merge; this does.
    acquire(service, "org/app", "envs/net", 5)
    acquire(service, "org/app-infra", "envs/net", 5)
    answer = post(service, "gitea", gitea_closed("org/app", 5, merged=merged),
                  secret=GITEA_SECRET, event="pull_request")
    assert answer.status_code == 200, answer.text
    assert answer.json()["released"] == ["org/app/envs/net/default/"]
    assert held(service) == [("org/app-infra:envs/net", 5)]


def test_a_verified_body_that_is_not_an_event_is_422(service: ServiceProcess) -> None:
    answer = post(service, "gitea", {"action": "closed", "pull_request": {"number": "x"},
                                     "repository": {"full_name": "org/app"}},
                  secret=GITEA_SECRET, event="pull_request")
    assert answer.status_code == 422 and "pull request number" in answer.json()["error"]


def test_a_verified_body_nested_too_deep_to_read_is_422(service: ServiceProcess) -> None:
    """JSON nested deeper than the parser goes (well within the size a VCS may send) is a body
    that is not an event: 422, as any other, not a 500."""
    raw = b'{"action": "closed", "pull_request": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    digest = hmac.new(GITHUB_SECRET.encode(), raw, hashlib.sha256).hexdigest()
    answer = httpx.post(f"{service.url}/v1/webhooks/github", content=raw, headers={
        "content-type": "application/json", "X-GitHub-Event": "pull_request",
        "X-Hub-Signature-256": f"sha256={digest}"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "github webhook: the body is nested too deep to read"


def test_secrets_are_never_shown(service: ServiceProcess, atlantis_testdata: Path) -> None:
    post(service, "github", github_closed(atlantis_testdata), secret="wrong", event="pull_request")
    post(service, "gitlab", gitlab_event(atlantis_testdata, "merge"), secret=GITLAB_SECRET,
         event="Merge Request Hook")
    config = httpx.get(f"{service.url}/v1/config").text
    output = service.stderr() + service.stdout()  # what the service itself wrote
    for secret in (GITHUB_SECRET, GITLAB_SECRET, GITEA_SECRET):
        assert secret not in config and secret not in output
    shown = httpx.get(f"{service.url}/v1/config").json()
    assert "********" in json.dumps(shown)


def test_an_endpoint_without_its_secret_is_off(
    service_process: Callable[..., ServiceProcess],
) -> None:
    bare = service_process()
    answer = httpx.post(f"{bare.url}/v1/webhooks/github", json={},
                        headers={"X-GitHub-Event": "pull_request"})
    assert answer.status_code == 404
    assert "enhanced-locking-github-webhook-secret" in answer.json()["error"]
