"""The HTTP API's shapes and status codes (DESIGN §7) over a real uvicorn process.

One service process serves the module (default config: enhanced off, embedded store, a Redis
password set to check it is masked); each test works on its own repository so they do not
interfere. Tests that need other settings start their own process.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from tests.conftest import ServiceFactory
from tests.support.service import ServiceProcess, serving

SECRET = "s3cret-redis-password"
LOCK_FIELDS = {"key", "project", "workspace", "pull", "user", "priority", "acquiredAt",
               "expiresAt", "fencingToken", "backend"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with serving(tmp_path_factory.mktemp("http"),
                 env={"ATLANTIS_ENHANCED_LOCKING_REDIS_PASSWORD": SECRET}) as process:
        yield process


@pytest.fixture
def http(served: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=10) as client:
        yield client


@pytest.fixture
def repo() -> str:
    """A repository of this test's own."""
    return f"acme/infra-{uuid.uuid4().hex[:8]}"


def body(repo: str, *, pull: int = 12, path: str = "envs/prod", **extra: Any) -> dict[str, Any]:
    """The acquire request of DESIGN §7."""
    return {
        "project": {"repoFullName": repo, "path": path, "projectName": "prod"},
        "workspace": "default",
        "pull": {"num": pull, "url": f"https://git.example/{repo}/pull/{pull}",
                 "author": "alice", "headBranch": "feature", "baseBranch": "main"},
        "user": {"username": "alice", "teams": []},
        **extra,
    }


def assert_lock(lock: dict[str, Any], *, repo: str, pull: int, backend: str = "legacy") -> None:
    assert LOCK_FIELDS <= set(lock)
    assert lock["key"] == f"{repo}/{lock['project']['path']}/{lock['workspace']}/" \
                          f"{lock['project']['projectName']}"
    assert lock["project"]["repoFullName"] == repo
    assert lock["pull"]["num"] == pull
    assert lock["backend"] == backend
    assert isinstance(lock["fencingToken"], int) and lock["fencingToken"] >= 1
    assert lock["acquiredAt"].endswith("Z"), "times are RFC 3339 UTC"
    assert datetime.fromisoformat(lock["acquiredAt"]).utcoffset() == timedelta(0)


# --- acquire -----------------------------------------------------------------------------------


def test_acquire_answers_200_with_the_lock(http: httpx.Client, repo: str) -> None:
    response = http.post("/v1/locks", json=body(repo, priority="high", requestId="r-1"))
    assert response.status_code == 200
    answer = response.json()
    assert answer["acquired"] is True
    assert answer["lockKey"] == f"{repo}/envs/prod/default/prod"
    assert_lock(answer["lock"], repo=repo, pull=12)
    assert answer["lock"]["key"] == answer["lockKey"]
    assert answer["lock"]["expiresAt"] is None
    assert answer["lock"]["user"] == {"username": "alice", "teams": []}
    assert answer["lock"]["pull"]["headBranch"] == "feature"


def test_the_same_pull_asking_again_gets_200_and_the_same_lock(
    http: httpx.Client, repo: str
) -> None:
    first = http.post("/v1/locks", json=body(repo)).json()["lock"]
    again = http.post("/v1/locks", json=body(repo))
    assert again.status_code == 200
    assert again.json()["lock"] == first


def test_a_grant_says_whether_this_call_granted_it_or_its_pull_held_it_already(
    http: httpx.Client, repo: str
) -> None:
    """``Lock-Grant``: ``new`` when the call granted the lock (a lease starts now), ``again``
    when its pull held it already (unchanged, lease and all); a refusal says nothing."""
    first = http.post("/v1/locks", json=body(repo))
    assert first.status_code == 200 and first.headers["lock-grant"] == "new"
    again = http.post("/v1/locks", json=body(repo))
    assert again.status_code == 200 and again.headers["lock-grant"] == "again"
    refused = http.post("/v1/locks", json=body(repo, pull=13))
    assert refused.status_code == 409 and "lock-grant" not in refused.headers
    assert http.delete("/v1/locks/by-key", params={"key": first.json()["lockKey"]}).is_success
    afresh = http.post("/v1/locks", json=body(repo, pull=13))
    assert afresh.status_code == 200 and afresh.headers["lock-grant"] == "new"


def test_another_pull_gets_409_held_naming_the_holder(http: httpx.Client, repo: str) -> None:
    holder = http.post("/v1/locks", json=body(repo, pull=1)).json()["lock"]
    response = http.post("/v1/locks", json=body(repo, pull=2))
    assert response.status_code == 409
    answer = response.json()
    assert answer["acquired"] is False
    assert answer["lockKey"] == holder["key"]
    assert answer["reason"] == "held"
    assert answer["holder"] == holder
    assert answer["queuePosition"] is None


def test_credentials_in_a_pull_url_never_come_back(http: httpx.Client, repo: str) -> None:
    request = body(repo)
    request["pull"]["url"] = f"https://bot:ghp_T0KEN@git.example/{repo}/pull/12"
    answer = http.post("/v1/locks", json=request).json()
    assert answer["lock"]["pull"]["url"] == f"https://git.example/{repo}/pull/12"
    assert "ghp_T0KEN" not in http.get("/v1/locks", params={"repo": repo}).text


# --- 422: each invalid field is named ------------------------------------------------------------

def _without(data: dict[str, Any], path: str) -> dict[str, Any]:
    *parents, leaf = path.split(".")
    target = data
    for part in parents:
        target = target[part]
    del target[leaf]
    return data


def _with(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    *parents, leaf = path.split(".")
    target = data
    for part in parents:
        target = target[part]
    target[leaf] = value
    return data


INVALID: list[tuple[str, Any]] = [
    # field path (camelCase, as the client wrote it), the invalid value (... means left out)
    ("project", ...),
    ("project.repoFullName", ...),
    ("project.repoFullName", ""),
    ("project.path", ""),
    ("project.projectName", 7),
    ("workspace", ""),
    ("pull", ...),
    ("pull.num", ...),
    ("pull.num", -(2**31) - 1),
    ("pull.num", "twelve"),
    ("pull.num", 2**31),
    ("pull.url", "https://git.example/" + "x" * 3000),
    ("pull.state", "merged"),
    ("user.teams", "sre"),
    ("priority", "urgent"),
    ("wait", "soon"),
    ("wait", 30),
    ("wait", "-5s"),
    ("ttl", "forever"),
    ("ttl", "400ns"),  # under half a microsecond: it rounded to no lease at all
    ("ttl", "400us"),  # under 1ms: leases are counted in whole ms
    ("requestId", "r" * 200),
    ("colour", "blue"),
    ("pull.colour", "blue"),
]


@pytest.mark.parametrize(("field", "value"), INVALID,
                         ids=[f"{f}={'missing' if v is ... else str(v)[:12]}" for f, v in INVALID])
def test_each_invalid_acquire_field_gets_422_naming_it(
    http: httpx.Client, repo: str, field: str, value: Any
) -> None:
    request = _without(body(repo), field) if value is ... else _with(body(repo), field, value)
    response = http.post("/v1/locks", json=request)
    assert response.status_code == 422
    answer = response.json()
    assert answer["error"].startswith(f"{field}: "), answer["error"]
    assert answer["field"] == field
    assert answer["detail"] and all({"loc", "msg", "type"} <= set(d) for d in answer["detail"])
    assert http.get("/v1/locks", params={"repo": repo}).json() == {"locks": []}


@pytest.mark.parametrize("content", [b"", b"not json", b"[1, 2]", b'"a string"'])
def test_a_body_that_is_not_an_acquire_request_gets_422(http: httpx.Client, content: bytes) -> None:
    response = http.post("/v1/locks", content=content,
                         headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["field"] == "body"
    assert response.json()["error"].startswith("body: ")


@pytest.mark.parametrize(("method", "path", "params", "field"), [
    ("GET", "/v1/locks", {"pull": "abc"}, "pull"),
    ("GET", "/v1/locks", {"pull": -(2**31) - 1}, "pull"),
    ("GET", "/v1/locks", {"pull": "--1"}, "pull"),
    ("GET", "/v1/locks/by-key", {}, "key"),
    ("GET", "/v1/locks/by-key", {"key": ""}, "key"),
    ("DELETE", "/v1/locks/by-key", {"key": "k", "pull": "x"}, "pull"),
    ("DELETE", "/v1/locks/by-pull", {"pull": 1}, "repo"),
    ("DELETE", "/v1/locks/by-pull", {"repo": "acme/infra"}, "pull"),
])
def test_an_invalid_query_gets_422_naming_the_parameter(
    http: httpx.Client, method: str, path: str, params: dict[str, Any], field: str
) -> None:
    response = http.request(method, path, params=params)
    assert response.status_code == 422
    assert response.json()["field"] == field
    assert response.json()["error"].startswith(f"{field}: ")


# --- list, get, release -------------------------------------------------------------------------


def test_list_filters_by_repository_and_pull(http: httpx.Client, repo: str) -> None:
    other = repo + "-other"
    for name, path, pull in [(repo, "a", 1), (repo, "b", 2), (other, "a", 1)]:
        assert http.post("/v1/locks", json=body(name, path=path, pull=pull)).status_code == 200

    def keys(**params: Any) -> list[str]:
        response = http.get("/v1/locks", params=params)
        assert response.status_code == 200
        assert set(response.json()) == {"locks"}
        return sorted(lock["key"] for lock in response.json()["locks"])

    assert keys(repo=repo) == [f"{repo}/a/default/prod", f"{repo}/b/default/prod"]
    assert keys(repo=repo, pull=1) == [f"{repo}/a/default/prod"]
    assert keys(repo=other) == [f"{other}/a/default/prod"]
    everything = keys()
    assert {f"{repo}/a/default/prod", f"{repo}/b/default/prod", f"{other}/a/default/prod"} <= set(
        everything)
    assert set(keys(pull=1)) >= {f"{repo}/a/default/prod", f"{other}/a/default/prod"}


def test_get_by_key_answers_200_with_the_lock_or_404(http: httpx.Client, repo: str) -> None:
    lock = http.post("/v1/locks", json=body(repo)).json()["lock"]
    response = http.get("/v1/locks/by-key", params={"key": lock["key"]})
    assert response.status_code == 200
    assert response.json() == {"lock": lock}
    missing = http.get("/v1/locks/by-key", params={"key": f"{repo}/nowhere/default/"})
    assert missing.status_code == 404
    assert missing.json()["error"] and missing.json()["lockKey"] == f"{repo}/nowhere/default/"


def test_release_answers_200_then_404(http: httpx.Client, repo: str) -> None:
    lock = http.post("/v1/locks", json=body(repo)).json()["lock"]
    response = http.delete("/v1/locks/by-key", params={"key": lock["key"]})
    assert response.status_code == 200
    assert response.json() == {"released": True, "lock": lock}
    again = http.delete("/v1/locks/by-key", params={"key": lock["key"]})
    assert again.status_code == 404
    assert again.json()["error"]
    assert http.post("/v1/locks", json=body(repo, pull=99)).status_code == 200


def test_release_with_pull_only_releases_the_holders_lock(http: httpx.Client, repo: str) -> None:
    lock = http.post("/v1/locks", json=body(repo, pull=5)).json()["lock"]
    refused = http.delete("/v1/locks/by-key", params={"key": lock["key"], "pull": 6})
    assert refused.status_code == 409
    assert "#5" in refused.json()["error"]
    assert refused.json()["holder"] == lock
    assert refused.json()["lockKey"] == lock["key"]
    assert http.get("/v1/locks/by-key", params={"key": lock["key"]}).status_code == 200
    released = http.delete("/v1/locks/by-key", params={"key": lock["key"], "pull": 5})
    assert released.status_code == 200 and released.json()["lock"] == lock
    free = http.delete("/v1/locks/by-key", params={"key": lock["key"], "pull": 5})
    assert free.status_code == 404


def test_release_by_pull_releases_only_that_pulls_locks_of_that_repo(
    http: httpx.Client, repo: str
) -> None:
    other = repo + "-other"
    mine = [http.post("/v1/locks", json=body(repo, path=p, pull=7)).json()["lock"]
            for p in ("a", "b")]
    http.post("/v1/locks", json=body(repo, path="c", pull=8))
    http.post("/v1/locks", json=body(other, path="a", pull=7))
    response = http.delete("/v1/locks/by-pull", params={"repo": repo, "pull": 7})
    assert response.status_code == 200
    assert sorted(response.json()["released"], key=lambda lock: lock["key"]) == mine
    left = http.get("/v1/locks", params={"pull": 7}).json()["locks"]
    assert [lock["project"]["repoFullName"] for lock in left
            if lock["project"]["repoFullName"] in (repo, other)] == [other]
    empty = http.delete("/v1/locks/by-pull", params={"repo": repo, "pull": 7})
    assert empty.status_code == 200 and empty.json() == {"released": [], "cancelled": []}


# --- config, health, metrics, openapi -----------------------------------------------------------


def test_config_shows_the_effective_config_masked_with_generation_hash_and_routing(
    http: httpx.Client,
) -> None:
    response = http.get("/v1/config")
    assert response.status_code == 200
    answer = response.json()
    assert SECRET not in response.text
    assert answer["config"]["enhanced-locking-redis-password"] == "********"
    assert answer["config"]["enhanced-locking-enabled"] is False
    assert answer["config"]["enhanced-locking-default-timeout"] == "30s"
    assert answer["generation"] == 1
    assert re.fullmatch(r"[0-9a-f]{16}", answer["hash"])
    assert answer["layers"] == ["static"]
    assert answer["routing"] == {"enabled": False, "weight": 0.0, "mode": "route",
                                 "fallback": "legacy", "configuredWeight": 0.0}
    assert answer["featureFlags"]["enabled"] is False


def test_health_and_readiness(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "backends": {"legacy": "ok"}, "events": "process"}


def test_metrics_are_prometheus_text_that_counts_requests(http: httpx.Client, repo: str) -> None:
    http.post("/v1/locks", json=body(repo))
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert re.search(r'^enhanced_locking_routing_decisions_total\{backend="legacy"\} [1-9]',
                     text, re.M)
    assert re.search(r"^enhanced_locking_config_generation 1\.0$", text, re.M)
    assert SECRET not in text


def test_unknown_paths_and_methods_answer_json_errors(http: httpx.Client) -> None:
    missing = http.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    wrong = http.put("/v1/locks")
    assert wrong.status_code == 405 and wrong.json()["error"]


def test_the_openapi_document_describes_the_v1_endpoints(http: httpx.Client) -> None:
    response = http.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    paths = document["paths"]
    for path, methods in {"/v1/locks": {"post", "get"}, "/v1/locks/by-key": {"get", "delete"},
                          "/v1/locks/by-pull": {"delete"}, "/v1/config": {"get"},
                          "/healthz": {"get"}, "/readyz": {"get"}, "/serving": {"get"},
                          "/metrics": {"get"}}.items():
        assert methods <= set(paths[path]), path
    schemas = document["components"]["schemas"]
    assert {"repoFullName", "path", "projectName"} <= set(schemas["Project"]["properties"])
    assert {"project", "workspace", "pull", "user", "priority", "wait", "ttl", "requestId"} <= set(
        schemas["LockRequest"]["properties"])
    assert "409" in paths["/v1/locks"]["post"]["responses"]


def test_the_service_log_never_shows_the_password(served: ServiceProcess) -> None:
    log = served.stderr()
    assert "config generation 1" in log
    assert SECRET not in log


# --- with enhanced locking on ---------------------------------------------------------------------


def test_enhanced_locks_carry_leases_and_refuse_waits_above_the_maximum(
    service_process: ServiceFactory,
) -> None:
    served = service_process("--enhanced-locking-enabled", "--enhanced-locking-max-timeout=1m",
                             "--enhanced-locking-default-timeout=10s")
    with httpx.Client(base_url=served.url, timeout=10) as http:
        granted = http.post("/v1/locks", json=body("acme/infra", ttl="1h"))
        assert granted.status_code == 200
        lock = granted.json()["lock"]
        assert_lock(lock, repo="acme/infra", pull=12, backend="enhanced")
        assert lock["expiresAt"] is not None and lock["expiresAt"].endswith("Z")
        lease = (datetime.fromisoformat(lock["expiresAt"])
                 - datetime.fromisoformat(lock["acquiredAt"])).total_seconds()
        assert lease == pytest.approx(3600, abs=1)

        too_long = http.post("/v1/locks", json=body("acme/infra", path="other", wait="2m"))
        assert too_long.status_code == 422
        assert too_long.json()["field"] == "wait"
        assert "1m" in too_long.json()["error"]

        config = http.get("/v1/config").json()
        assert config["routing"] == {"enabled": True, "weight": 100.0, "mode": "route",
                                     "fallback": "legacy", "configuredWeight": 100.0}
        assert http.get("/readyz").json() == {"ready": True,
                                              "backends": {"legacy": "ok", "enhanced": "ok"},
                                              "events": "process"}


def test_metrics_off_answers_404(service_process: ServiceFactory) -> None:
    served = service_process("--enhanced-locking-metrics=false")
    response = httpx.get(served.url + "/metrics")
    assert response.status_code == 404
    assert "enhanced-locking-metrics" in response.json()["error"]
