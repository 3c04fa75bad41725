"""The access seam's own rules: every route says who may call it, tokens and roles parse as
documented, and a config change never opens the service by accident."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from tests.support.access_matrix import CALLS, PUBLIC_PATHS, Case

from enhanced_locking.api import create_app, static_access
from enhanced_locking.api.access import (
    UNGUARDED_PATHS,
    AccessHolder,
    Caller,
    CallerDep,
    _credentials,
    _peer,
    api_routes,
    build_access,
    caller_of,
    check_routes,
    public,
    public_reason,
)
from enhanced_locking.api.audit import AuditTrail
from enhanced_locking.api.static_access import (
    RoleMap,
    StaticTokens,
    TokenFileError,
    parse_tokens,
)
from enhanced_locking.backends import EmbeddedBackend, MemoryBackend
from enhanced_locking.backends.audit_store import AuditQuery, MemoryAuditStore, Retention
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.factory import LockService
from enhanced_locking.provider import ConfigProvider, ConfigRejected
from enhanced_locking.types import BackendUnavailable, Identity, Verb


def memory_config(**values: Any) -> EnhancedLockingConfig:
    return EnhancedLockingConfig(backend="memory", legacy_backend="memory", **values)


def test_an_app_with_a_route_that_neither_takes_the_caller_nor_is_public_is_refused() -> None:
    app = FastAPI()

    @app.get("/v1/forgotten")
    async def forgotten() -> None: ...

    with pytest.raises(RuntimeError, match=r"/v1/forgotten .*CallerDep.*@public"):
        check_routes(app)


def test_an_unguarded_route_of_an_included_router_is_refused() -> None:
    """A route added through a router (as the webhooks' are) is checked as one of the app's:
    FastAPI keeps an included router as one entry of ``app.routes``, its routes inside it."""
    app = FastAPI()
    router = APIRouter(prefix="/v1/plugin")

    @router.delete("/locks")
    async def forgotten() -> None: ...

    app.include_router(router)
    with pytest.raises(RuntimeError, match=r"\['DELETE'\] /v1/plugin/locks .*CallerDep"):
        check_routes(app)


def test_a_router_included_with_the_caller_as_its_dependency_passes() -> None:
    app = FastAPI()
    router = APIRouter(prefix="/v1/plugin")

    @router.get("/things")
    async def things() -> None: ...

    app.include_router(router, dependencies=[Depends(caller_of)])
    check_routes(app)


def test_a_route_marked_public_or_taking_the_caller_passes() -> None:
    app = FastAPI()

    @app.post("/v1/webhooks/github")
    @public("authenticated by the GitHub webhook signature")
    async def webhook() -> None: ...

    @app.get("/ui")
    async def console(caller: CallerDep) -> None: ...

    check_routes(app)


def test_public_needs_a_reason() -> None:
    with pytest.raises(ValueError, match="reason"):
        public(" ")


def test_the_services_only_public_routes_are_the_probes_metrics_and_the_webhooks() -> None:
    app = create_app(LockService(ConfigProvider(memory_config())), manage_lifecycle=False)
    public_paths = sorted(route.path for route in api_routes(app)
                          if public_reason(route) is not None)
    # The webhooks' routes (a router of their own): each authenticated by its VCS's proof.
    assert public_paths == ["/healthz", "/metrics", "/readyz", "/serving", "/v1/webhooks/gitea",
                            "/v1/webhooks/github", "/v1/webhooks/gitlab"]
    assert {route.path for route in api_routes(app)} >= {"/v1/locks", "/v1/admin/force-unlock",
                                                         "/v1/audit", "/ui/force-unlock"}


def test_the_access_matrix_calls_every_route_that_asks_for_a_right() -> None:
    """The static and Kubernetes matrices (every call x every role) walk ``CALLS``: a route
    the app serves and the matrix does not call would go untried with real tokens. Read from
    the app's routes, not from the docs."""
    app = create_app(LockService(ConfigProvider(memory_config())), manage_lifecycle=False)
    guarded = {(method, route.path) for route in api_routes(app)
               if public_reason(route) is None and route.path not in UNGUARDED_PATHS
               for method in route.methods or ()}
    called: set[tuple[str, str]] = set()

    def note(request: httpx.Request) -> httpx.Response:
        called.add((request.method, request.url.path))
        return httpx.Response(200, json={})

    case = Case(repo="acme/infra", key="acme/infra/envs/prod/default/")
    with httpx.Client(base_url="http://lock-service", transport=httpx.MockTransport(note)) as http:
        for call in CALLS:
            call.run(http, case)
    assert guarded - called == set(), "routes the access matrix never calls"
    assert called - guarded == set(), "calls of the access matrix to no route"
    public = {route.path for route in api_routes(app) if public_reason(route) is not None}
    assert public - {p for p in public if p.startswith("/v1/webhooks/")} == set(PUBLIC_PATHS)


def test_tokens_parse_with_groups_and_skip_comments() -> None:
    tokens = parse_tokens('# a comment\n\nt1,alice,u1,"ops,dev"\nt2,bot\n', source="f")
    assert sorted((i.name, i.uid, i.groups) for i in tokens.values()) == [
        ("alice", "u1", ("ops", "dev")), ("bot", "", ())]
    assert all(i.method == "static" for i in tokens.values())


@pytest.mark.parametrize(("text", "line"), [
    ("t1,alice\nsecret-token-only\n", 2),
    ("t1,alice\nt1,bob\n", 2),
    (",nobody\n", 1),
])
def test_a_bad_tokens_line_is_named_without_its_token(text: str, line: int) -> None:
    with pytest.raises(TokenFileError) as raised:
        parse_tokens(text, source="tokens.csv")
    assert f"tokens.csv line {line}" in str(raised.value)
    assert "secret-token-only" not in str(raised.value)


async def test_the_role_map_grants_roles_and_single_verbs_to_users_and_groups() -> None:
    roles = RoleMap({"viewer": ["group:everyone"], "locker": ["user:bot"],
                     "force-unlock": ["group:oncall"]})
    bot = Identity(name="bot", groups=("everyone",), method="static")
    oncall = Identity(name="carol", groups=("oncall",), method="static")
    assert roles.verbs(bot) == {Verb.READ, Verb.LOCK}
    assert roles.verbs(oncall) == {Verb.FORCE_UNLOCK}
    assert not await roles.allowed(oncall, Verb.READ, repo=None)
    assert await roles.allowed(bot, Verb.LOCK, repo="acme/infra")


async def test_a_bad_tokens_file_in_a_new_snapshot_keeps_the_access_in_force(
    tmp_path: Path,
) -> None:
    good = tmp_path / "good.csv"
    good.write_text("t1,alice\n")
    provider = ConfigProvider(memory_config(auth="static", auth_tokens_file=str(good)))
    holder = AccessHolder(provider)
    assert holder.current().mode == "static"
    await provider.set_layer("cluster", {"auth_tokens_file": str(tmp_path / "missing.csv")})
    assert holder.current().mode == "static"


async def test_turning_auth_off_on_an_exposed_address_is_refused_at_runtime(tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_text("t1,alice\n")
    provider = ConfigProvider(memory_config(auth="static", auth_tokens_file=str(good)))
    holder = AccessHolder(provider, exposed=True)
    first = holder.current()
    await provider.set_layer("cluster", {"auth": "none"})
    assert holder.current() is first
    await provider.set_layer("cluster", {"auth": "none", "insecure_allow_unauthenticated": True})
    assert holder.current().open


async def test_a_served_app_refuses_unusable_access_before_it_is_applied(tmp_path: Path) -> None:
    """The app's applier refuses what the holder would skip: the snapshot in force (what
    ``/v1/config`` shows) stays the one whose access control serves."""
    good = tmp_path / "good.csv"
    good.write_text("t1,alice\n")
    service = LockService(ConfigProvider(memory_config(auth="static",
                                                       auth_tokens_file=str(good))))
    provider = service.provider
    create_app(service, manage_lifecycle=False, exposed=True)
    before = provider.current
    with pytest.raises(ConfigRejected, match="enhanced-locking-auth: none") as refused:
        await provider.set_layer("cluster", {"auth": "none"})
    assert refused.value.settings == ("auth",)
    missing = str(tmp_path / "missing.csv")
    with pytest.raises(ConfigRejected, match="enhanced-locking-auth-tokens-file") as refused:
        await provider.set_layer("cluster", {"auth_tokens_file": missing})
    assert refused.value.settings == ("auth_tokens_file",)
    assert provider.current is before
    opened = await provider.set_layer("cluster", {"auth": "none",
                                                  "insecure_allow_unauthenticated": True})
    assert provider.current is opened and opened.config.auth == "none"
    await service.close()


async def test_a_snapshot_refused_for_its_access_switches_and_starts_no_store(
    tmp_path: Path,
) -> None:
    """The access check runs before the store's applier: a policy that changes the store and
    has an unreadable tokens file is refused with the service still on the store the config
    in force names, and putting the policy back is then no change at all."""
    good = tmp_path / "good.csv"
    good.write_text("t1,alice\n")
    service = LockService(ConfigProvider(memory_config(
        enabled=True, auth="static", auth_tokens_file=str(good), data_dir=str(tmp_path))))
    provider = service.provider
    create_app(service, manage_lifecycle=False)
    await service.start()
    try:
        assert service.enhanced is not None
        running = service.enhanced
        assert isinstance(running.backend, MemoryBackend)
        before = provider.current
        missing = str(tmp_path / "missing.csv")
        with pytest.raises(ConfigRejected, match="enhanced-locking-auth-tokens-file"):
            await provider.set_layer("cluster", {"backend": "boltdb", "auth_tokens_file": missing})
        assert provider.current is before and provider.current.config.backend == "memory"
        assert service.enhanced is running and isinstance(running.backend, MemoryBackend)
        assert not (tmp_path / "enhanced-locking.db").exists()
        assert await provider.set_layer("cluster", None) is before
        assert service.enhanced is running
        switched = await provider.set_layer("cluster", {"backend": "boltdb"})
        assert provider.current is switched and isinstance(service.enhanced.backend,
                                                           EmbeddedBackend)
    finally:
        await service.close()


async def test_a_snapshot_refused_for_its_access_enables_no_enhanced_locker(
    tmp_path: Path,
) -> None:
    good = tmp_path / "good.csv"
    good.write_text("t1,alice\n")
    service = LockService(ConfigProvider(EnhancedLockingConfig(
        enabled=False, backend="boltdb", legacy_backend="memory", auth="static",
        auth_tokens_file=str(good), data_dir=str(tmp_path))))
    provider = service.provider
    create_app(service, manage_lifecycle=False)
    await service.start()
    try:
        missing = str(tmp_path / "missing.csv")
        with pytest.raises(ConfigRejected, match="enhanced-locking-auth-tokens-file"):
            await provider.set_layer("cluster", {"enabled": True, "auth_tokens_file": missing})
        assert not provider.current.config.enabled
        assert service.enhanced is None
        assert not (tmp_path / "enhanced-locking.db").exists()
    finally:
        await service.close()


def test_a_lockpolicy_sets_the_access_and_audit_settings_like_any_other() -> None:
    from enhanced_locking.kube.lockpolicy import LockPolicySpec
    from enhanced_locking.kube.overrides import policy_overrides

    spec = LockPolicySpec.model_validate({
        "access": {"mode": "kubernetes", "audience": "enhanced-locking", "cacheTTL": "30s",
                   "roles": [{"role": "locker", "subjects": ["group:bots"]},
                             {"role": "admin", "subjects": ["user:alice"]},
                             {"role": "locker", "subjects": ["user:carol"]}]},
        "audit": {"enabled": False, "retention": "24h", "maxEntries": 5000},
    })
    values = policy_overrides(spec)
    config = memory_config(**values)
    assert config.auth == "kubernetes"
    assert config.auth_roles == {"locker": ["group:bots", "user:carol"], "admin": ["user:alice"]}
    assert (config.auth_audience, config.auth_cache_ttl.total_seconds()) == (
        "enhanced-locking", 30)
    assert (config.audit, config.audit_retention.total_seconds(), config.audit_max_entries) == (
        False, 86400, 5000)


@pytest.mark.parametrize("headers", [
    [],
    [(b"authorization", b"Bearer one"), (b"x-request-id", b"r-1")],
    [(b"x-request-id", b"first"), (b"authorization", b"Bearer a"), (b"x-request-id", b"second"),
     (b"authorization", b"Bearer b")],
    [(b"x-request-id", b"r" * 300), (b"accept", b"*/*")],
    [(b"x-request-id", b""), (b"authorization", b"")],
    [(b"authorization", "Bearer caf\u00e9".encode("latin-1"))],
])
def test_the_credentials_and_request_id_read_as_the_request_headers_give_them(
    headers: list[tuple[bytes, bytes]],
) -> None:
    request = Request({"type": "http", "headers": headers, "client": ("10.0.0.7", 4711)})
    request_id = request.headers.get("x-request-id")
    assert _credentials(request) == (request.headers.get("authorization"),
                                     request_id[:128] if request_id else None)
    assert _peer(request) == "10.0.0.7:4711"
    assert _peer(Request({"type": "http", "headers": headers})) == ""


async def test_a_give_back_writes_the_keys_released_in_one_row_and_each_it_could_not_in_its_own(
) -> None:
    """What became of a fresh grant whose client left after its ``acquired`` row: the keys
    given back read ``client-gone``; a key the store did not release names why, so the trail
    never says a lock was let go that may still be held."""
    trail = AuditTrail(MemoryAuditStore(Retention(timedelta(days=1), 100)),
                       stdout=lambda: False)
    caller = Caller(identity=Identity(name="atlantis", groups=("bots",), method="static"),
                    peer="127.0.0.1:4711", request_id="req-7",
                    access=build_access(memory_config()), audit=trail)
    await caller.gave_back(action="release-batch", repo="acme/infra", pull=12, tried=[
        ("acme/infra/net/default/", None),
        ("acme/infra/dns/default/", BackendUnavailable("the store did not answer")),
        ("acme/infra/db/default/", None),
    ])
    rows = list(reversed(await trail.read(AuditQuery())))
    assert [(row.action, row.verb, row.key, row.outcome, row.status) for row in rows] == [
        ("release-batch", "lock", "acme/infra/net/default/,acme/infra/db/default/",
         "client-gone", 499),
        ("release-batch", "lock", "acme/infra/dns/default/", "unavailable", 499),
    ]
    assert {(row.identity, row.repo, row.pull, row.request_id, row.peer) for row in rows} == {
        ("atlantis", "acme/infra", 12, "req-7", "127.0.0.1:4711")}
    await caller.gave_back(action="release", repo="acme/infra", pull=12, tried=[])
    assert len(await trail.read(AuditQuery())) == 2, "nothing tried, nothing written"


async def test_an_audited_call_reads_the_trails_settings_once_and_is_recorded_as_before(
) -> None:
    """A call's entry is asked about once (``keeps``, before it is made) and then recorded
    without the trail asking its settings again: the entry is in the store and on stdout as
    before, and an entry the trail would not keep is neither made nor recorded."""
    reads: list[str] = []
    own_locks = True

    def setting(name: str, value: Callable[[], bool]) -> Callable[[], bool]:
        def read() -> bool:
            reads.append(name)
            return value()
        return read

    stream = io.StringIO()
    trail = AuditTrail(MemoryAuditStore(Retention(timedelta(days=1), 100)), stream=stream,
                       enabled=setting("audit", lambda: True),
                       own_locks=setting("audit-own-locks", lambda: own_locks))
    caller = Caller(identity=Identity(name="atlantis", groups=("bots",), method="static"),
                    peer="127.0.0.1:4711", request_id="req-7",
                    access=build_access(memory_config()), audit=trail)
    await caller.record(action="acquire", verb=Verb.LOCK, key="acme/infra/net/default/",
                        repo="acme/infra", pull=12, outcome="acquired", status=200)
    assert reads == ["audit", "audit-own-locks"]
    rows = await trail.read(AuditQuery())
    assert [(row.id, row.action, row.outcome, row.status, row.request_id) for row in rows] == [
        ("1", "acquire", "acquired", 200, "req-7")]
    assert [json.loads(line)["audit"] for line in stream.getvalue().splitlines()] == [
        rows[0].model_dump(mode="json", by_alias=True)]
    own_locks = False
    reads.clear()
    await caller.record(action="acquire", verb=Verb.LOCK, key="acme/infra/net/default/",
                        repo="acme/infra", pull=12, outcome="acquired", status=200)
    assert reads == ["audit", "audit-own-locks"]
    assert len(await trail.read(AuditQuery())) == 1, "an entry not kept is not recorded"
    assert len(stream.getvalue().splitlines()) == 1


async def test_a_tokens_file_that_goes_away_keeps_its_tokens_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tokens file removed (or unreadable) while the service runs keeps the tokens read last,
    as a file that does not parse does, and the log says so: once, not at every recheck, and
    again the next time it goes away."""
    monkeypatch.setattr(static_access, "RECHECK_SECONDS", 0.0)
    path = tmp_path / "tokens.csv"
    path.write_text("tok-kept-4f1e9a,alice\n")
    tokens = StaticTokens(path=str(path))
    path.unlink()
    with caplog.at_level(logging.INFO, logger=static_access.__name__):
        for _ in range(3):
            kept = await tokens.authenticate("tok-kept-4f1e9a")
            assert kept is not None and kept.name == "alice"
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(said) == 1, said
        assert str(path) in said[0] and "keeping the previous tokens" in said[0]
        path.write_text("tok-next-77c2d0,bob\n")
        taken = await tokens.authenticate("tok-next-77c2d0")
        assert taken is not None and taken.name == "bob"
        assert await tokens.authenticate("tok-kept-4f1e9a") is None
        path.unlink()
        assert await tokens.authenticate("tok-next-77c2d0") is not None
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(said) == 2, said
    assert not any("tok-" in r.getMessage() for r in caplog.records)
