"""Kubernetes access control end to end: real ServiceAccount tokens checked by TokenReview,
rights answered by SubjectAccessReview from plain RBAC, with the chart's own ClusterRoles.

The chart's ClusterRoles, its auth-delegator binding and its binding for Atlantis's
ServiceAccount are rendered by the real ``helm`` and applied to the real API server; the
service runs as a local process with a token of its own ServiceAccount (so it can ask the
reviews only because the chart's binding lets it). Callers are ServiceAccounts bound to the
ClusterRoles with RoleBindings in the service's namespace.
"""

from __future__ import annotations

import json
import subprocess
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from tests.support.access_matrix import CALLS, ROLE_VERBS, Call, acquire_body, held, new_case
from tests.support.controlplane import KubeCluster
from tests.support.helm import CHART_DIR, Helm, notes_commands, service_account_kubeconfig
from tests.support.service import (
    ServiceProcess,
    enhanced_locking_command,
    running,
    scrubbed_env,
)
from tests.support.waiting import wait_for

from enhanced_locking.client import WAIT_MARGIN, Client, ServiceError
from enhanced_locking.durations import DEFAULT_MAX_TIMEOUT
from enhanced_locking.events import FOLLOWING_COMMENT
from enhanced_locking.types import LockRequest

pytestmark = pytest.mark.e2e

RESOURCE = "locks.locking.runatlantis.io"
CHART_TEMPLATES = (
    "templates/clusterrole-viewer.yaml", "templates/clusterrole-locker.yaml",
    "templates/clusterrole-admin.yaml", "templates/clusterrolebinding-auth-delegator.yaml",
    "templates/rolebinding-atlantis.yaml",
)


@dataclass
class Setup:
    cluster: KubeCluster
    namespace: str
    fullname: str
    service: ServiceProcess
    tokens: dict[str, str]
    kubeconfig: Path

    def sa(self, name: str) -> str:
        return f"system:serviceaccount:{self.namespace}:{name}"

    def client(self, role: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.Client(base_url=self.service.url, timeout=15, headers=headers)


def token(cluster: KubeCluster, namespace: str, name: str, *extra: str) -> str:
    return cluster.kubectl("create", "token", name, "-n", namespace, "--duration=1h",
                           *extra).stdout.strip()


def apply_chart_roles(cluster: KubeCluster, helm: Helm, namespace: str, fullname: str) -> None:
    show = [arg for template in CHART_TEMPLATES for arg in ("--show-only", template)]
    rendered = helm.run("template", "access", str(CHART_DIR), "-n", namespace,
                        f"--set=fullnameOverride={fullname}", *show).stdout
    cluster.kubectl("apply", "-f", "-", input=rendered)


@pytest.fixture(scope="module")
def setup(kube_cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("kube-access")
    namespace = f"access-{uuid.uuid4().hex[:8]}"
    fullname = f"el-{uuid.uuid4().hex[:8]}"
    cluster = kube_cluster
    cluster.kubectl("create", "namespace", namespace)
    helm = Helm(cluster, root / "helm-home")
    apply_chart_roles(cluster, helm, namespace, fullname)
    for name in (fullname, "nobody", "viewer", "locker", "admin", "atlantis", "team"):
        cluster.kubectl("create", "serviceaccount", name, "-n", namespace)
    for role in ("viewer", "locker", "admin"):
        cluster.kubectl("create", "rolebinding", role, f"--clusterrole={fullname}-{role}",
                        f"--serviceaccount={namespace}:{role}", "-n", namespace)
    # A team that may read and lock one repository only (RBAC resourceNames).
    # (kubectl create role checks the resource against discovery: `locks` is virtual.)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "team-infra", "namespace": namespace},
        "rules": [{"apiGroups": ["locking.runatlantis.io"], "resources": ["locks"],
                   "resourceNames": ["acme/team-infra"], "verbs": ["read", "lock"]}],
    }))
    cluster.kubectl("create", "rolebinding", "team-infra", "--role=team-infra",
                    f"--serviceaccount={namespace}:team", "-n", namespace)
    kubeconfig = service_account_kubeconfig(cluster, namespace, fullname, root / "svc.kubeconfig")
    service = ServiceProcess(root / "data", log_dir=root / "logs", env={
        "KUBECONFIG": str(kubeconfig),
    }, args=[
        "--enhanced-locking-auth=kubernetes",
        f"--enhanced-locking-auth-namespace={namespace}",
        "--enhanced-locking-auth-cache-ttl=2s",
    ])
    with running(service):
        tokens = {name: token(cluster, namespace, name)
                  for name in ("nobody", "viewer", "locker", "admin", "atlantis", "team")}
        yield Setup(cluster, namespace, fullname, service, tokens, kubeconfig)
    cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    cluster.kubectl("delete", "clusterrole", f"{fullname}-viewer", f"{fullname}-locker",
                    f"{fullname}-admin", check=False)
    cluster.kubectl("delete", "clusterrolebinding", f"{fullname}-auth-delegator", check=False)


@pytest.fixture
def admin(setup: Setup) -> Iterator[httpx.Client]:
    with setup.client("admin") as http:
        yield http


@pytest.mark.parametrize(("call", "role"), [
    pytest.param(call, role, id=f"{call.name}-{role}") for call in CALLS for role in ROLE_VERBS
])
def test_each_call_is_decided_by_rbac_for_each_role(
    setup: Setup, admin: httpx.Client, call: Call, role: str
) -> None:
    case = new_case(admin)
    before = held(admin, case.key)
    with setup.client(role) as http:
        answer = call.run(http, case)
    if call.verbs <= ROLE_VERBS[role]:
        assert answer.status_code not in (401, 403, 500), answer.text
        return
    assert answer.status_code == 403, answer.text
    refusal = json.loads(answer.read())
    assert refusal["verb"] in call.verbs - ROLE_VERBS[role]
    assert refusal["identity"] == setup.sa(role)
    assert held(admin, case.key) == before


@pytest.mark.parametrize("call", CALLS, ids=lambda call: call.name)
def test_a_token_the_api_server_does_not_know_is_401(
    setup: Setup, admin: httpx.Client, call: Call
) -> None:
    case = new_case(admin)
    with httpx.Client(base_url=setup.service.url, timeout=15,
                      headers={"Authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.e30.forged"}
                      ) as http:
        answer = call.run(http, case)
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"].startswith("Bearer ")
    assert held(admin, case.key) is not None


def rights(setup: Setup, who: str) -> set[str]:
    """``kubectl auth can-i --list`` as ``who``: its rules, one line each.

    (``kubectl auth can-i VERB locks.locking.runatlantis.io`` asks about a resource kubectl
    finds in discovery; a virtual resource is not there, so the listing is the way to ask.)
    """
    done = setup.cluster.kubectl("auth", "can-i", "--list", f"--as={setup.sa(who)}",
                                 "-n", setup.namespace)
    return {" ".join(line.split()) for line in done.stdout.splitlines()[1:]}


def lock_verbs(setup: Setup, who: str) -> set[str]:
    rows = [row for row in rights(setup, who) if row.startswith(f"{RESOURCE} ")]
    return {verb for row in rows for verb in row.split("[")[-1].rstrip("]").split()}


def test_the_charts_binding_gives_atlantis_read_and_lock_and_nothing_more(
    setup: Setup, admin: httpx.Client
) -> None:
    # Everything Atlantis's ServiceAccount may do beyond what every account may do.
    extra = rights(setup, "atlantis") - rights(setup, "nobody")
    assert extra == {f"{RESOURCE} [] [] [read lock]"}
    # The service agrees with RBAC.
    repo = f"acme/atlantis-{uuid.uuid4().hex[:6]}"
    with setup.client("atlantis") as atlantis:
        got = atlantis.post("/v1/locks", json=acquire_body(repo, pull=5))
        assert got.status_code == 200
        key = got.json()["lockKey"]
        assert atlantis.post("/v1/locks", json=acquire_body(repo, pull=6, path="p2",
                                                            priority="high")
                             ).status_code == 403
        assert atlantis.delete("/v1/locks/by-key", params={"key": key}).status_code == 403
        assert atlantis.post("/v1/admin/force-unlock",
                             params={"key": key, "reason": "no"}).status_code == 403
        assert atlantis.get("/v1/audit").status_code == 403
        assert atlantis.delete("/v1/locks/by-key",
                               params={"key": key, "pull": 5}).status_code == 200


def test_the_charts_roles_hold_the_documented_verbs(setup: Setup) -> None:
    for role, verbs in ROLE_VERBS.items():
        assert lock_verbs(setup, role) == verbs, role


def test_a_role_with_resource_names_scopes_a_caller_to_its_repositories(setup: Setup) -> None:
    with setup.client("team") as team:
        mine = team.post("/v1/locks", json=acquire_body("acme/team-infra", pull=1,
                                                        path=uuid.uuid4().hex[:6]))
        assert mine.status_code == 200, mine.text
        theirs = team.post("/v1/locks", json=acquire_body("acme/other", pull=1))
        assert theirs.status_code == 403
        assert theirs.json()["repo"] == "acme/other"
        assert team.get("/v1/locks", params={"repo": "acme/team-infra"}).status_code == 200
        assert team.get("/v1/locks").status_code == 403  # every repository: not its right
        with team.stream("GET", "/v1/events", params={"repo": "acme/team-infra"}) as stream:
            assert stream.status_code == 200
        with team.stream("GET", "/v1/events", params={"repo": "acme/other"}) as stream:
            assert stream.status_code == 403


class _Seen(httpx.HTTPTransport):
    """The real transport, noting each call's method, path, read timeout and status."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, float | None, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.calls.append((request.method, request.url.path,
                           request.extensions["timeout"]["read"], response.status_code))
        return response


def test_a_bare_wait_of_a_caller_that_may_not_read_the_config_waits_up_to_the_max_timeout(
    setup: Setup, tmp_path: Path,
) -> None:
    """A caller scoped to its repositories may lock but not read the configuration (403): a
    wait without a duration is still asked, given the answer the longest wait of a service
    with default settings (its max-timeout) plus the margin; a caller without credentials
    hears the acquire's own 401, not the configuration's."""
    def bare(path: str) -> LockRequest:
        return LockRequest.model_validate({"project": {"repoFullName": "acme/team-infra",
                                                       "path": path}, "pull": {"num": 3},
                                           "wait": True})

    seen = _Seen()
    with Client(setup.service.url, token=setup.tokens["team"], transport=seen) as team:
        result = team.acquire(bare(uuid.uuid4().hex[:6]))
    assert result.acquired, result
    assert seen.calls == [
        ("GET", "/v1/config", 10.0, 403),  # the client's default timeout
        ("POST", "/v1/locks", DEFAULT_MAX_TIMEOUT.total_seconds() + WAIT_MARGIN, 200)]
    with Client(setup.service.url) as nobody, pytest.raises(ServiceError) as refused:
        nobody.acquire(bare(uuid.uuid4().hex[:6]))
    assert refused.value.status == 401
    with setup.client(None) as anonymous:
        assert refused.value.body["error"] == anonymous.post(
            "/v1/locks", json=acquire_body("acme/team-infra", pull=3)).json()["error"]

    path = uuid.uuid4().hex[:6]
    command = subprocess.run(
        [*enhanced_locking_command(), "lock", "acquire", "--repo", "acme/team-infra",
         "--path", path, "--pull", "3", "--wait", "--url", setup.service.url],
        env=scrubbed_env({"ENHANCED_LOCKING_TOKEN": setup.tokens["team"]}),
        capture_output=True, text=True, timeout=120, check=False)
    assert command.returncode == 0, command.stderr
    assert json.loads(command.stdout)["lock"]["project"]["path"] == path


def first_event(http: httpx.Client, kind: str, *, pull: int | None = None) -> dict[str, Any]:
    """The first ``kind`` event (of ``pull``, when given) this reader's stream (of
    ``acme/team-infra``) carries."""
    with http.stream("GET", "/v1/events", params={"repo": "acme/team-infra",
                                                  "type": kind, "lastEventId": "0-0"},
                     timeout=15) as stream:
        assert stream.status_code == 200, stream.read()
        for line in stream.iter_lines():
            if line.startswith("data:"):
                data: dict[str, Any] = json.loads(line.removeprefix("data:"))
                if pull is None or data["details"]["pull"] == pull:
                    return data
    raise AssertionError(f"the stream ended without a {kind} event")


def test_a_deadlock_across_repositories_shows_a_reader_only_its_repositories(
    setup: Setup, tmp_path: Path,
) -> None:
    # Two repositories whose projects join to the same keys (GitLab subgroups), queued
    # together behind a waiting freeze: acme/team-infra#1 and acme/team-infra/sub#2 each wait
    # behind the other on one key, a cycle across repositories.
    freeze = json.dumps({"freezes": [{"name": "hold", "match": {"workspace": "frozen"},
                                      "message": "frozen", "action": "wait"}]})
    service = ServiceProcess(tmp_path / "data", log_dir=tmp_path / "logs", env={
        "KUBECONFIG": str(setup.kubeconfig),
    }, args=[
        "--enhanced-locking-auth=kubernetes",
        f"--enhanced-locking-auth-namespace={setup.namespace}",
        "--enhanced-locking-enabled", "--enhanced-locking-deadlock-detection",
        f"--enhanced-locking-policies={freeze}",
    ])
    mine, theirs = "acme/team-infra", "acme/team-infra/sub"

    def body(repo: str, path: str, pull: int) -> dict[str, Any]:
        return acquire_body(repo, pull=pull, path=path, workspace="frozen", wait="2m")

    key_a, key_b = (f"{mine}/sub/{p}/frozen/p" for p in "ab")
    with running(service), ThreadPoolExecutor(4) as pool, \
            httpx.Client(base_url=service.url, timeout=30, headers={
                "Authorization": f"Bearer {setup.tokens['admin']}"}) as admin:

        def in_line(key: str, pulls: list[int]) -> bool:
            waiters = admin.get("/v1/queue", params={"key": key}).json()["waiters"]
            return [w["pull"] for w in waiters] == pulls

        # Each wait queued before the next is sent (a fixed half second between them did not
        # order them on a loaded machine), all of them well within their wait.
        waits: list[Future[httpx.Response]] = []
        for repo, path, pull, key, line in ((mine, "sub/a", 1, key_a, [1]),
                                            (theirs, "a", 2, key_a, [1, 2]),
                                            (theirs, "b", 2, key_b, [2]),
                                            (mine, "sub/a", 3, key_a, [1, 2, 3])):
            waits.append(pool.submit(admin.post, "/v1/locks", json=body(repo, path, pull)))
            wait_for(f"{repo}#{pull} queued on {key}", partial(in_line, key, line), timeout=60)
        # The wait that closes the cycle is the team's own (it may lock acme/team-infra):
        # its 409 names the other repository's pull only as "(other repository)".
        with httpx.Client(base_url=service.url, timeout=30, headers={
                "Authorization": f"Bearer {setup.tokens['team']}"}) as team:
            closing = team.post("/v1/locks", json=body(mine, "sub/b", 1))
        assert closing.json()["reason"] == "deadlock", closing.text
        assert closing.json()["cycle"] == [f"{mine}#1", "(other repository)", f"{mine}#1"]
        assert closing.json()["cycleOwners"][1] == {"name": "(other repository)", "repo": None,
                                                   "pull": None}
        assert closing.json()["hiddenOwners"] == 1
        assert f"{theirs}#2" not in closing.text
        everything = first_event(admin, "deadlock")
        assert everything["details"]["cycle"] == [f"{mine}#1", f"{theirs}#2", f"{mine}#1"]
        assert {e["key"] for e in everything["details"]["edges"]} == {key_a, key_b}
        with httpx.Client(base_url=service.url, timeout=30, headers={
                "Authorization": f"Bearer {setup.tokens['team']}"}) as team:
            scoped = first_event(team, "deadlock")
        assert scoped["repo"] == mine
        assert f"{theirs}#2" not in json.dumps(scoped)  # (the keys of both join to one)
        assert theirs not in {value for edge in scoped["details"]["edges"]
                              for value in edge.values()}
        assert scoped["details"]["cycle"] == [f"{mine}#1", "(other repository)", f"{mine}#1"]
        assert scoped["details"]["hiddenOwners"] == 1
        assert [e["key"] for e in scoped["details"]["edges"]] == [None, None]
        # acme/team-infra#3 queued behind acme/team-infra#1 and acme/team-infra/sub#2 on a
        # joined key: its queued event names the second only to who may read its repository.
        everywhere = first_event(admin, "queued", pull=3)
        assert [w["owner"] for w in everywhere["details"]["ahead"]] == [f"{mine}#1",
                                                                       f"{theirs}#2"]
        with httpx.Client(base_url=service.url, timeout=30, headers={
                "Authorization": f"Bearer {setup.tokens['team']}"}) as team:
            own = first_event(team, "queued", pull=3)
        assert f"{theirs}#2" not in json.dumps(own)
        assert [(w["owner"], w["repo"], w["pull"]) for w in own["details"]["ahead"]] == [
            (f"{mine}#1", mine, 1), ("(other repository)", None, None)]
        assert own["details"]["ahead"][1]["id"] is None
        assert own["details"]["hiddenOwners"] == 1
        for repo, pull in ((mine, 1), (theirs, 2), (mine, 3)):  # their waits end here
            assert admin.delete("/v1/locks/by-pull", params={"repo": repo, "pull": pull}
                                ).status_code == 200
        for wait in waits:
            wait.result()


def test_the_audit_trail_names_serviceaccounts_and_holds_no_token(
    setup: Setup, admin: httpx.Client
) -> None:
    case = new_case(admin)
    with setup.client("viewer") as viewer:
        viewer.post("/v1/admin/force-unlock", params={"key": case.key, "reason": "try"})
    rows = admin.get("/v1/audit", params={"repo": case.repo}).json()["entries"]
    assert [(r["identity"], r["action"], r["outcome"], r["method"]) for r in rows] == [
        (setup.sa("viewer"), "force-unlock", "denied", "kubernetes"),
        (setup.sa("admin"), "acquire", "acquired", "kubernetes"),
    ]
    assert f"system:serviceaccounts:{setup.namespace}" in rows[0]["groups"]
    everything = admin.get("/v1/audit", params={"limit": 1000}).text + setup.service.output()
    for value in setup.tokens.values():
        assert value not in everything
        assert value.split(".")[-1] not in everything  # not even the signature


def test_an_audience_setting_refuses_tokens_minted_for_another(
    setup: Setup, tmp_path: Path
) -> None:
    kubeconfig = service_account_kubeconfig(setup.cluster, setup.namespace, setup.fullname,
                                            tmp_path / "svc.kubeconfig")
    service = ServiceProcess(tmp_path / "data", env={"KUBECONFIG": str(kubeconfig)}, args=[
        "--enhanced-locking-auth=kubernetes",
        f"--enhanced-locking-auth-namespace={setup.namespace}",
        "--enhanced-locking-auth-audience=enhanced-locking",
    ])
    with running(service):
        plain = setup.tokens["viewer"]
        scoped = token(setup.cluster, setup.namespace, "viewer", "--audience=enhanced-locking")
        with httpx.Client(base_url=service.url, timeout=15) as http:
            assert http.get("/v1/locks", headers={"Authorization": f"Bearer {plain}"}
                            ).status_code == 401
            assert http.get("/v1/locks", headers={"Authorization": f"Bearer {scoped}"}
                            ).status_code == 200


def test_the_service_without_the_charts_delegation_refuses_everyone(
    setup: Setup, tmp_path: Path
) -> None:
    # A ServiceAccount without system:auth-delegator cannot ask the reviews: fail closed.
    setup.cluster.kubectl("create", "serviceaccount", "undelegated", "-n", setup.namespace)
    kubeconfig = service_account_kubeconfig(setup.cluster, setup.namespace, "undelegated",
                                            tmp_path / "u.kubeconfig")
    service = ServiceProcess(tmp_path / "data", env={"KUBECONFIG": str(kubeconfig)}, args=[
        "--enhanced-locking-auth=kubernetes",
        f"--enhanced-locking-auth-namespace={setup.namespace}",
    ])
    with running(service):
        with httpx.Client(base_url=service.url, timeout=15, headers={
                "Authorization": f"Bearer {setup.tokens['admin']}"}) as http:
            assert http.get("/v1/locks").status_code == 401
        assert setup.tokens["admin"] not in service.output()


def test_the_rendered_roles_are_the_documented_ones(setup: Setup, tmp_path: Path) -> None:
    helm = Helm(setup.cluster, tmp_path / "helm")
    rendered = yaml.safe_load_all(helm.run(
        "template", "x", str(CHART_DIR), "--show-only", "templates/clusterrole-locker.yaml"
    ).stdout)
    (locker,) = [doc for doc in rendered if doc]
    assert locker["rules"] == [{"apiGroups": ["locking.runatlantis.io"], "resources": ["locks"],
                                "verbs": ["read", "lock"]}]
    assert locker["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"


def test_an_idle_event_stream_ends_once_its_serviceaccount_is_deleted(setup: Setup) -> None:
    # A token the API server stops accepting (its ServiceAccount deleted) ends the stream it
    # opened at the stream's own recheck (auth-cache-ttl: 2s here), with no event published
    # meanwhile to carry the recheck: the TokenReview answer, asked again, refuses it.
    name = f"streamer-{uuid.uuid4().hex[:6]}"
    setup.cluster.kubectl("create", "serviceaccount", name, "-n", setup.namespace)
    setup.cluster.kubectl("create", "rolebinding", name, f"--clusterrole={setup.fullname}-viewer",
                          f"--serviceaccount={setup.namespace}:{name}", "-n", setup.namespace)
    streamer = token(setup.cluster, setup.namespace, name)
    following, ended = threading.Event(), threading.Event()
    lines: list[str] = []

    def read() -> None:
        with httpx.Client(base_url=setup.service.url, timeout=httpx.Timeout(15, read=60),
                          headers={"Authorization": f"Bearer {streamer}"}) as http, \
                http.stream("GET", "/v1/events") as stream:
            assert stream.status_code == 200
            for line in stream.iter_lines():
                lines.append(line)
                if line == f": {FOLLOWING_COMMENT}":
                    following.set()
        ended.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert following.wait(15), f"the stream did not start: {lines}"
    with setup.client(None) as anonymous:
        assert anonymous.get("/v1/locks", headers={
            "Authorization": f"Bearer {streamer}"}).status_code == 200
    setup.cluster.kubectl("delete", "serviceaccount", name, "-n", setup.namespace)
    # The API server's token check, then the cached review (2s), then the stream's recheck.
    assert ended.wait(20), "the idle stream outlived its deleted ServiceAccount"
    assert [line for line in lines if line.startswith("data:")] == []
    with setup.client(None) as anonymous:
        assert anonymous.get("/v1/locks", headers={
            "Authorization": f"Bearer {streamer}"}).status_code == 401
    assert "stream closed" in setup.service.output()


@pytest.mark.parametrize("bound", [True, False], ids=["atlantis-bound", "unbound"])
def test_the_install_notes_call_the_api_as_printed(
    setup: Setup, tmp_path: Path, bound: bool,
) -> None:
    """The notes end with a call of the lock API from the operator's machine. Pasted as
    printed, it is answered with the configuration, not 401: in kubernetes mode (the chart's
    default) it sends a token of Atlantis's ServiceAccount, which the chart binds to the
    locker role in the release namespace, the namespace of the service's reviews. Without
    that binding (``auth.atlantis.bind=false``) the notes make a ServiceAccount of their own
    and bind it to the viewer role there; before, they printed ``<account>`` to fill in."""
    helm = Helm(setup.cluster, tmp_path / "helm-home")
    unbound = () if bound else ("--set=auth.atlantis.bind=false",)
    notes = helm.notes(setup.namespace, f"--set=service.port={setup.service.port}", *unbound)
    commands = notes_commands(notes)
    assert [c.split()[0] for c in commands] == [
        *([] if bound else ["kubectl", "kubectl"]), "export", "curl"], notes
    assert "<" not in " ".join(commands), notes
    assert commands[-1].endswith(f"http://127.0.0.1:{setup.service.port}/v1/config"), notes
    if not bound:  # the release's viewer role, as the chart names it for the notes' release
        setup.cluster.kubectl("apply", "-f", "-", input=helm.run(
            "template", "notes", str(CHART_DIR), "-n", setup.namespace,
            "--set=fullnameOverride=notes-el",
            "--show-only", "templates/clusterrole-viewer.yaml").stdout)
    script = "set -eu\n" + "\n".join(commands) + " -o body.json -w '%{http_code}'\n"
    try:
        done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True,
                              text=True, env=setup.cluster.env(), timeout=60)
    finally:
        if not bound:
            setup.cluster.kubectl("delete", "clusterrole", "notes-el-viewer", check=False)
    assert done.returncode == 0, done.stderr
    made = [] if bound else ["serviceaccount/notes-el-reader created",
                             "rolebinding.rbac.authorization.k8s.io/notes-el-reader created"]
    assert done.stdout.splitlines() == [*made, "200"], (
        done.stdout, (tmp_path / "body.json").read_text())
    assert "routing" in json.loads((tmp_path / "body.json").read_text())
