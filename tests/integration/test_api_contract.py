"""The HTTP API keeps the contract its OpenAPI document states.

schemathesis generates requests from ``/openapi.json`` and runs every one of its checks on the
answers of a real ``enhanced-locking serve`` process: no server error, status codes, content
types and bodies as documented, schema-valid requests accepted and schema-invalid ones refused,
``Allow`` on 405. The tests after it pin the cases that once broke the contract.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.contract import CONFIG, schemathesis_command
from tests.support.locks import lock_body
from tests.support.service import ServiceProcess, serving


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    # Short waits: generated requests often share a key, and a wait must not outlast the run.
    with serving(tmp_path_factory.mktemp("contract"), "--enhanced-locking-enabled",
                 "--enhanced-locking-max-timeout=1s",
                 "--enhanced-locking-default-timeout=1s") as process:
        yield process


@pytest.fixture
def http(served: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=10) as client:
        yield client


@pytest.mark.timeout(900)
def test_schemathesis_with_every_check_finds_nothing(
    served: ServiceProcess, tmp_path: Path,
) -> None:
    result = subprocess.run([
        *schemathesis_command(), "--config-file", str(CONFIG), "run",
        served.url + "/openapi.json", "--checks", "all", "--max-examples", "15",
        # Every operation of the schema; the event stream's cases are bounded (schemathesis.toml).
        "--request-timeout", "10", "--workers", "1",
        "--seed", "1", "--no-color",
    ], capture_output=True, text=True, timeout=840, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-4000:]
    counted = [line for line in result.stdout.splitlines() if " generated, " in line]
    assert counted and counted[-1].strip().endswith("passed"), result.stdout[-3000:]


@pytest.fixture
def repo() -> str:
    return f"acme/contract-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize(("path", "allowed"), [
    ("/v1/locks/by-key", "DELETE, GET"),
    ("/v1/locks", "GET, POST"),
    ("/v1/queue", "DELETE, GET"),
    ("/healthz", "GET"),
])
def test_a_405_names_every_method_the_path_allows(
    http: httpx.Client, path: str, allowed: str,
) -> None:
    answer = http.request("PATCH", path)
    assert answer.status_code == 405
    assert answer.headers["allow"] == allowed
    assert answer.json()["error"]


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/locks/"), ("POST", "/v1/locks/"), ("DELETE", "/v1/locks/by-key/"),
    ("GET", "/healthz/"), ("GET", "/ui/"),
])
def test_a_trailing_slash_is_a_404_naming_the_path_never_a_redirect(
    http: httpx.Client, method: str, path: str,
) -> None:
    """A redirect's absolute Location would be built from Host as http://: behind a proxy
    that ends TLS, a client following it would send its token in plain text."""
    answer = http.request(method, path, headers={
        "Host": "locks.example", "X-Forwarded-Proto": "https",
        "Authorization": "Bearer not-to-be-sent-anywhere"})
    assert answer.status_code == 404, answer.text
    assert "location" not in answer.headers
    assert answer.json() == {"error": f"no such path {path}: the path is {path[:-1]}, without "
                                      "the trailing slash"}
    unknown = http.get("/v1/nothing/")
    assert unknown.status_code == 404 and unknown.json() == {"error": "Not Found"}


@pytest.mark.parametrize("content", [b"{bad", b"\xc3\x28{}", b""], ids=["syntax", "not-utf8",
                                                                         "empty"])
def test_a_body_that_is_not_json_answers_422(http: httpx.Client, content: bytes) -> None:
    answer = http.post("/v1/locks", content=content, headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == "body"


@pytest.mark.parametrize("pull", ["0.0", "1e3", "+1", "\u0661", "1_0"])
@pytest.mark.parametrize(("method", "path", "params"), [
    ("GET", "/v1/locks", {}),
    ("DELETE", "/v1/queue", {"key": "acme/infra/envs/prod/default/", "id": "w-1"}),
], ids=["list", "cancel"])
def test_a_pull_query_that_is_not_ascii_digits_answers_422(
    http: httpx.Client, pull: str, method: str, path: str, params: dict[str, str],
) -> None:
    answer = http.request(method, path, params={**params, "pull": pull})
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == "pull"


@pytest.mark.parametrize(("pull", "bound"), [
    ("2147483648", "less than or equal to 2147483647"),
    ("99999999999", "less than or equal to 2147483647"),
    ("-99999999999", "greater than or equal to -2147483648"),
    ("9" * 400, "less than or equal to 2147483647"),
])
def test_a_pull_query_of_digits_past_its_range_answers_422_naming_the_range(
    http: httpx.Client, pull: str, bound: str,
) -> None:
    """A number of more than ten digits was told it was not "a whole number of ASCII digits"
    (the pattern's length bound); it is told the range, as one of ten digits is."""
    answer = http.get("/v1/locks", params={"pull": pull})
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == "pull"
    assert bound in answer.json()["error"] and "ASCII digits" not in answer.json()["error"]


@pytest.mark.parametrize(("change", "field"), [
    ({"pull": {"num": "12"}}, "pull.num"),
    ({"pull": {"num": True}}, "pull.num"),
    ({"pull": {"num": 12.5}}, "pull.num"),
    ({"wait": " 1s "}, "wait"),
    ({"wait": "1s\n"}, "wait"),
])
def test_request_bodies_are_read_as_typed(
    http: httpx.Client, repo: str, change: dict[str, Any], field: str,
) -> None:
    answer = http.post("/v1/locks",
                       json={**lock_body(repo, "envs/prod", 1, project=None), **change})
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field


def test_a_whole_number_written_as_json_12_0_is_an_integer(http: httpx.Client, repo: str) -> None:
    answer = http.post("/v1/locks", json=lock_body(repo, "envs/prod", 12.0, project=None))
    assert answer.status_code == 200, answer.text
    assert answer.json()["lock"]["pull"]["num"] == 12


def test_metrics_are_documented_as_prometheus_text(http: httpx.Client) -> None:
    documented = http.get("/openapi.json").json()["paths"]["/metrics"]["get"]["responses"]["200"]
    assert list(documented["content"]) == ["text/plain"]
    answer = http.get("/metrics")
    assert answer.headers["content-type"].startswith("text/plain")


def test_a_refresh_the_schema_allows_is_never_answered_422(
    http: httpx.Client, repo: str,
) -> None:
    held = http.post("/v1/locks", json=lock_body(repo, "envs/prod", 1, project=None)).json()["lock"]
    # No ttl, and no enhanced-locking-lock-ttl configured: the service's state says no (409).
    answer = http.post("/v1/locks/refresh", json={"key": held["key"], "pull": 1})
    assert answer.status_code == 409, answer.text
    assert "enhanced-locking-lock-ttl" in answer.json()["error"]
    refreshed = http.post("/v1/locks/refresh", json={"key": held["key"], "pull": 1,
                                                      "ttl": "1m"})
    assert refreshed.status_code == 200 and refreshed.json()["lock"]["expiresAt"]
    # A zero lease ends the lease (the lock kept until released, as an acquire's ttl of 0s);
    # a written lease that rounds to nothing is refused, naming the field, as at an acquire.
    zero = http.post("/v1/locks/refresh", json={"key": held["key"], "pull": 1, "ttl": "0s"})
    assert zero.status_code == 200, zero.text
    assert zero.json()["lock"]["key"] == held["key"] and not zero.json()["lock"].get("expiresAt")
    vanishing = http.post("/v1/locks/refresh", json={"key": held["key"], "pull": 1,
                                                     "ttl": "400ns"})
    assert vanishing.status_code == 422 and vanishing.json()["field"] == "ttl", vanishing.text


@pytest.mark.parametrize(("query", "field"), [
    ({"until": "0.5"}, "until"),
    ({"since": "1700000000"}, "since"),
    ({"since": "yesterday"}, "since"),
    ({"pull": "+1"}, "pull"),
    ({"pull": "1e3"}, "pull"),
    ({"limit": "5.0"}, "limit"),
    ({"limit": "1_0"}, "limit"),
    ({"limit": "+5"}, "limit"),
    ({"limit": " 5"}, "limit"),
    ({"limit": "\u0665"}, "limit"),
])
def test_the_audit_trail_reads_times_as_rfc_3339_and_pulls_and_limits_as_digits(
    http: httpx.Client, query: dict[str, str], field: str,
) -> None:
    answer = http.get("/v1/audit", params=query)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field


def test_the_audit_trail_takes_rfc_3339_times_with_or_without_an_offset(
    http: httpx.Client,
) -> None:
    # Nothing is written in 2999: an empty page shows the time was read, not ignored.
    for since in ("2999-01-31T00:00:00Z", "2999-01-31T00:00:00.5+02:00", "2999-01-31T00:00:00"):
        answer = http.get("/v1/audit", params={"since": since, "pull": "7"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["entries"] == []
    assert http.get("/v1/audit", params={"since": "2000-01-01T00:00:00Z"}).json()["entries"]
