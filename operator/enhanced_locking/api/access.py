"""Who may do what: the one seam between a request's credentials and the lock service.

An *authenticator* turns a bearer token into an :class:`~enhanced_locking.types.Identity` (or
says it does not know the token); an *authorizer* answers whether an identity holds a
:class:`~enhanced_locking.types.Verb`, optionally on one repository. Which ones run is a
setting (``enhanced-locking-auth``): ``none`` lets everyone in as ``anonymous``; ``static``
checks tokens and the role map of the config (:mod:`.static_access`); ``kubernetes`` asks the
API server with TokenReview and SubjectAccessReview (:mod:`.kube_access`). Every refusal and
every mutating call is written to the audit trail (:mod:`.audit`). Below this module the
service sees identities, never tokens.

Routes take the caller as a dependency::

    @app.post("/v1/things")
    async def things(caller: CallerDep) -> Any:
        await caller.need(Verb.LOCK, repo="acme/infra")

A route that must answer without a bearer token (liveness, a webhook signed by the VCS)
says so with :func:`public`, naming what protects it instead. :func:`check_routes` refuses to
build an app where a route does neither, so a new route cannot be open by accident.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import time
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Annotated, Any, Protocol, TypeVar

import fastapi.routing
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from enhanced_locking import policies
from enhanced_locking.api.audit import AuditTrail
from enhanced_locking.api.errors import json_error
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.provider import ConfigProvider, ConfigRejected, Snapshot
from enhanced_locking.types import (
    AuditEntry,
    BackendUnavailable,
    HoldAnsweredAgain,
    Identity,
    InvalidRequest,
    LockNotOwned,
    NotAuthenticated,
    NotPermitted,
    StoreBusy,
    Verb,
    utcnow,
)

_Read = TypeVar("_Read")

__all__ = [
    "ANONYMOUS",
    "AccessControl",
    "AuditNote",
    "Audited",
    "Authenticator",
    "Authorizer",
    "Caller",
    "CallerDep",
    "NotAsked",
    "OpenAccess",
    "RouteView",
    "SettingsCallerDep",
    "StillCaller",
    "Unasked",
    "Unidentified",
    "access_now",
    "api_routes",
    "bearer_token",
    "caller_of",
    "caller_of_settings",
    "check_routes",
    "cross_site",
    "cross_site_refusal",
    "failure_outcome",
    "foreign_host",
    "install_access",
    "is_loopback",
    "may_open",
    "open_to_network_refusal",
    "overrides_rules",
    "public",
    "rule_override",
]

log = logging.getLogger(__name__)

ANONYMOUS = Identity(name="anonymous", groups=(), method="none")
"""Everyone, when access control is off."""

REALM = "enhanced-locking"


class NotAsked(Exception):
    """An authenticator could not ask whether it knows a token (the API server did not answer
    its TokenReview): the caller is refused all the same (fail closed)."""


class Unasked(NotAuthenticated):
    """No authenticator knew the token, and one of them could not ask (:class:`NotAsked`):
    to the caller the same 401; to the log of a stream it ends, another reason."""


class Authenticator(Protocol):
    """Turns a bearer token into an identity; ``None`` when it does not know the token, and
    :class:`NotAsked` raised when it could not find out."""

    async def authenticate(self, token: str) -> Identity | None: ...


class Authorizer(Protocol):
    """Whether ``identity`` holds ``verb`` (on ``repo``, when the call is about one)."""

    per_repository: bool
    """Whether a right can be held on some repositories only (Kubernetes RBAC with resource
    names): then a call about a held lock needs the store's read, naming the lock's
    repository, before its right can be judged. Otherwise the right is the same for every
    repository and is asked without one when that read cannot be made
    (:meth:`Caller.read_for_right`)."""

    async def allowed(self, identity: Identity, verb: Verb, *, repo: str | None) -> bool: ...


class OpenAccess:
    """``auth: none``: everyone is ``anonymous`` and may do everything."""

    per_repository = False

    async def authenticate(self, token: str) -> Identity | None:
        return ANONYMOUS

    async def allowed(self, identity: Identity, verb: Verb, *, repo: str | None) -> bool:
        return True


@dataclass
class AccessControl:
    """The authenticators (tried in order) and the authorizer one config snapshot asks for."""

    mode: str
    authenticators: Sequence[Authenticator]
    authorizer: Authorizer
    closers: Sequence[Callable[[], None]] = ()
    recheck_seconds: float = 1.0
    """How long a request that outlives its start (an event stream) trusts the identity its
    credentials gave before it identifies them again: the tokens file's recheck in static
    mode, ``auth-cache-ttl`` (how long a TokenReview answer is reused) in Kubernetes mode."""

    @property
    def open(self) -> bool:
        return self.mode == "none"

    async def identify(self, authorization: str | None) -> Identity:
        """The identity behind an ``Authorization`` header; ``NotAuthenticated`` otherwise."""
        if self.open:
            return ANONYMOUS
        token = bearer_token(authorization)
        refused: type[NotAuthenticated] = NotAuthenticated
        for authenticator in self.authenticators:
            try:
                identity = await authenticator.authenticate(token)
            except NotAsked:
                refused = Unasked
                continue
            if identity is not None:
                return identity
        raise refused("the bearer token is not valid", invalid_token=True)

    def close(self) -> None:
        for close in self.closers:
            close()


def bearer_token(authorization: str | None) -> str:
    """The bearer token an ``Authorization`` header names; ``NotAuthenticated`` when it names
    none (no header, or another scheme): a caller every access setting but ``none`` refuses."""
    if not authorization:
        raise NotAuthenticated("authentication required: send Authorization: Bearer TOKEN")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise NotAuthenticated("expected Authorization: Bearer TOKEN", invalid_token=True)
    return token


AccessBuilder = Callable[[EnhancedLockingConfig], AccessControl]

ACCESS_FIELDS = (
    "auth", "auth_tokens_file", "auth_tokens", "auth_roles", "auth_audience", "auth_namespace",
    "auth_cache_ttl", "insecure_allow_unauthenticated",
)
"""The settings that decide the access control: a change of any builds a new one."""


def build_access(config: EnhancedLockingConfig) -> AccessControl:
    """The access control ``config`` asks for."""
    if config.auth == "static":
        from enhanced_locking.api.static_access import RECHECK_SECONDS, RoleMap, StaticTokens

        tokens = StaticTokens.from_config(config)
        return AccessControl("static", [tokens], RoleMap(config.auth_roles),
                             recheck_seconds=RECHECK_SECONDS)
    if config.auth == "kubernetes":
        from enhanced_locking.api.kube_access import kubernetes_access

        return kubernetes_access(config)
    return AccessControl("none", [OpenAccess()], OpenAccess())


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listen address) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def may_open(config: EnhancedLockingConfig, *, exposed: bool) -> bool:
    """Whether access settings may open the service to every caller (``auth: none``): on
    loopback, or with ``insecure-allow-unauthenticated`` (a setting of the service's own,
    which no LockPolicy sets)."""
    return not exposed or config.insecure_allow_unauthenticated


def open_to_network_refusal(config: EnhancedLockingConfig, *, exposed: bool) -> str | None:
    """Why ``config`` must not serve a non-loopback address (``None`` when it may)."""
    if config.auth == "none" and not may_open(config, exposed=exposed):
        return ("invalid setting enhanced-locking-auth: none on a non-loopback address lets "
                "anyone who reaches the port force-unlock every lock; set it to static or "
                "kubernetes, or serve on 127.0.0.1, or set "
                "enhanced-locking-insecure-allow-unauthenticated=true")
    return None


class AccessHolder:
    """The current access control, rebuilt when a config snapshot changes its settings.

    A snapshot whose access settings cannot be used (a tokens file that does not parse, auth
    turned off on an exposed address) keeps the access control that was in force, and says why
    in the log: a bad edit never opens the service.
    """

    def __init__(self, provider: ConfigProvider, build: AccessBuilder = build_access, *,
                 exposed: bool = False, loopback_hosts: bool = False,
                 withheld: Callable[[], str | None] = lambda: None) -> None:
        self._provider = provider
        self._build = build
        self._exposed = exposed
        self.loopback_hosts = loopback_hosts
        """Whether open access (``auth: none``) answers only requests that name a loopback
        host (:func:`foreign_host`): the service listens on loopback alone."""
        self.withheld = withheld
        """Why no call that reads or changes locks is served now (``None``: they are): the
        settings in force, access settings included, are not the ones the service is to run
        with (the operator's start, until it has applied its LockPolicy)."""
        self._generation = -1
        self._identity: tuple[Any, ...] = ()
        self._current: AccessControl | None = None

    def may_open(self) -> bool:
        """Whether access settings may open the service to every caller (:func:`may_open`,
        of the settings in force): else a caller without credentials is refused by every
        access setting a LockPolicy may name."""
        return may_open(self._provider.current.config, exposed=self._exposed)

    def current(self) -> AccessControl:
        snapshot = self._provider.current
        if snapshot.generation != self._generation or self._current is None:
            identity = tuple(repr(getattr(snapshot.config, name)) for name in ACCESS_FIELDS)
            if self._current is None or identity != self._identity:
                self._switch(snapshot.config, identity)
            self._generation = snapshot.generation
        assert self._current is not None
        return self._current

    def _switch(self, config: EnhancedLockingConfig, identity: tuple[Any, ...]) -> None:
        refusal = open_to_network_refusal(config, exposed=self._exposed)
        if refusal is not None and self._current is not None:
            log.error("config generation kept the previous access control: %s", refusal)
            self._identity = identity
            return
        try:
            fresh = self._build(config)
        except ValueError as error:
            if self._current is None:
                raise
            log.error("access settings not applied, the previous ones stay: %s", error)
            self._identity = identity
            return
        if self._current is not None:
            self._current.close()
            log.info("access control is now %s", fresh.mode)
        self._current, self._identity = fresh, identity

    def close(self) -> None:
        if self._current is not None:
            self._current.close()


@dataclass
class AuditNote:
    """What an audited call filled in as it went: its outcome and what it turned out to touch."""

    outcome: str = "ok"
    status: int = 200
    key: str | None = None
    repo: str | None = None
    pull: int | None = None

    def done(self, outcome: str, status: int = 200) -> None:
        self.outcome, self.status = outcome, status


_FAILURES: tuple[tuple[type[Exception], str, int], ...] = (
    (NotPermitted, "denied", 403),
    (LockNotOwned, "not-owned", 409),
    (HoldAnsweredAgain, "kept", 409),
    (InvalidRequest, "invalid", 422),
    (StoreBusy, "overloaded", 503),
    (BackendUnavailable, "unavailable", 503),
)


def failure_outcome(error: Exception) -> tuple[str, int]:
    """The outcome and status an audit row gives a call that failed with ``error``."""
    return next(((outcome, status) for kind, outcome, status in _FAILURES
                 if isinstance(error, kind)), ("error", 500))


@dataclass(kw_only=True)
class Caller:
    """Who is calling this request, what it may do, and the audit trail to write to."""

    identity: Identity
    peer: str
    request_id: str | None
    access: AccessControl
    audit: AuditTrail
    denied: list[Verb] = field(default_factory=list)

    async def may(self, verb: Verb, *, repo: str | None = None) -> bool:
        """Whether the caller holds ``verb`` (no audit row: for filtering what it sees)."""
        return await self.access.authorizer.allowed(self.identity, verb, repo=repo)

    async def read_for_right(
        self, read: Awaitable[_Read], verb: Verb, *, action: str, key: str | None = None,
        pull: int | None = None, reason: str | None = None,
    ) -> _Read:
        """``read``'s answer: a read of the store that names the repository whose ``verb``
        the call then needs. When the store does not answer, a caller whose rights are the
        same on every repository is asked for ``verb`` now, so one without it hears 403, not
        that the store is down (503). (With rights per repository the repository is not
        known: the outage is the answer.)"""
        try:
            return await read
        except BackendUnavailable:
            if not self.access.authorizer.per_repository:
                await self.need(verb, action=action, key=key, pull=pull, reason=reason)
            raise

    async def need(
        self, verb: Verb, *, action: str, repo: str | None = None, key: str | None = None,
        pull: int | None = None, reason: str | None = None,
    ) -> None:
        """Raise ``NotPermitted`` (after writing the refusal to the audit trail) unless the
        caller holds ``verb``."""
        if await self.may(verb, repo=repo):
            return
        self.denied.append(verb)
        await self.record(action=action, verb=verb, key=key, repo=repo, pull=pull,
                          outcome="denied", status=403, reason=reason)
        raise NotPermitted(self.identity, verb, repo=repo)

    def audited(
        self, *, action: str, verb: Verb, key: str | None = None, repo: str | None = None,
        pull: int | None = None, reason: str | None = None,
    ) -> Audited:
        """Write one audit row for the call in the block, with the outcome it set (``note``)
        or the refusal it raised. A refusal by :meth:`need` is written there, not twice."""
        return Audited(self, action, verb, reason, AuditNote(key=key, repo=repo, pull=pull))

    async def record(
        self, *, action: str, verb: Verb, outcome: str, status: int, key: str | None = None,
        repo: str | None = None, pull: int | None = None, reason: str | None = None,
    ) -> None:
        """Write one row to the audit trail. (Built, not validated again: every value is of
        its field's type already, the identity's and the request's checked as they came in.)
        Nothing is made for an entry the trail would not keep (:meth:`AuditTrail.keeps`)."""
        if not self.audit.keeps(verb=verb.value, action=action, outcome=outcome, status=status):
            return
        time = utcnow()
        await self.audit.record_kept(AuditEntry.recorded(
            id=self.audit.new_id(time), time=time, identity=self.identity.name,
            groups=self.identity.groups, method=self.identity.method, verb=verb.value,
            action=action, key=key, repo=repo, pull=pull, outcome=outcome, status=status,
            reason=reason, peer=self.peer, request_id=self.request_id,
        ))

    async def gave_back(
        self, *, action: str, repo: str, pull: int,
        tried: Sequence[tuple[str, Exception | None]],
    ) -> None:
        """Write what became of a fresh grant whose client left (``tried``: each lock given
        back and why it could not be, or None), after the request's own row: its ``acquired``
        row when the client was found gone as the answer was about to go out, its
        ``client-gone`` row when a grant raced with a client that left while it waited. The
        keys given back share one row, outcome ``client-gone`` and status 499 (the answer the
        request got instead); a key that could not be given back gets a row of its own naming
        why (``not-owned``, ``unavailable``, ...; status 499 too), so the trail never says a
        lock was let go that may still be held."""
        released = [key for key, error in tried if error is None]
        if released:
            await self.record(action=action, verb=Verb.LOCK, key=",".join(released),
                              repo=repo, pull=pull, outcome="client-gone", status=499)
        for key, error in tried:
            if error is not None:
                await self.record(action=action, verb=Verb.LOCK, key=key, repo=repo,
                                  pull=pull, outcome=failure_outcome(error)[0], status=499)


class Audited:
    """The block of :meth:`Caller.audited`: its note in, one audit row out. (A class rather
    than a generator-based context manager: the lock routes enter one on every call.)"""

    __slots__ = ("_action", "_caller", "_reason", "_verb", "note")

    def __init__(self, caller: Caller, action: str, verb: Verb, reason: str | None,
                 note: AuditNote) -> None:
        self._caller, self._action, self._verb, self._reason = caller, action, verb, reason
        self.note = note

    async def __aenter__(self) -> AuditNote:
        return self.note

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        note = self.note
        if error is None:
            outcome, status = note.outcome, note.status
        elif isinstance(error, NotPermitted) or not isinstance(error, Exception):
            return  # a refusal is written where it is raised; a cancellation is no outcome
        else:
            outcome, status = failure_outcome(error)
        await self._caller.record(action=self._action, verb=self._verb, key=note.key,
                                  repo=note.repo, pull=note.pull, outcome=outcome,
                                  status=status, reason=self._reason)


def cross_site(request: Request) -> str | None:
    """Why a post did not come from one of the service's own pages, or None if it did.

    A browser names where a request came from: ``Sec-Fetch-Site`` (every current browser), else
    ``Origin``. Only ``same-origin`` is a page of the service; an ``Origin`` must be the host
    asked. A client that sends neither is not a browser (the CLI, curl), and cannot be made to
    post by another site's page."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:
        return None if fetch_site == "same-origin" else f"Sec-Fetch-Site is {fetch_site!r}"
    origin = request.headers.get("origin")
    if origin is None:
        return None
    host = request.headers.get("host", "")
    if urllib.parse.urlsplit(origin).netloc.lower() == host.lower() and host:
        return None
    return f"Origin {origin!r} is not this host"


async def cross_site_refusal(caller: Caller, request: Request, *, key: str, repo: str | None,
                             reason: str | None, instead: str) -> JSONResponse | None:
    """The 403 of a force-unlock posted from another site's page (audited, outcome
    ``cross-site``), or None when it came from no browser or the service's own page. Behind a
    proxy that adds a signed-in user's token, another site's page can make that user's browser
    post a plain form (no preflight) to the console's form or to the API's force-unlock, whose
    key and reason are in the query; ``instead`` says where such a call is taken."""
    why = cross_site(request)
    if why is None:
        return None
    await caller.record(action="force-unlock", verb=Verb.FORCE_UNLOCK, key=key, repo=repo,
                        outcome="cross-site", status=403, reason=reason)
    return json_error(403, f"a force-unlock from another site's page is refused ({why}): "
                           f"{instead}")


def foreign_host(request: Request) -> str | None:
    """The host a request names (``Host``), when it is not a loopback name or address; else
    None. A page of another site can reach a service on 127.0.0.1 through its reader's browser
    by DNS rebinding (its own name made to resolve to 127.0.0.1): to the browser, the page and
    the service are then one origin, and the requests name the page's host. A request that
    names none (HTTP/1.0 without ``Host``, or an empty one: a hand-written probe or script)
    is no page's: a browser always names the host it reached."""
    host = request.headers.get("host", "")
    if not host:
        return None
    name = urllib.parse.urlsplit(f"//{host}").hostname
    return None if name is not None and is_loopback(name) else host


def _peer(request: Request) -> str:
    client = request.scope.get("client")  # what ``request.client`` reads, without its tuple
    return f"{client[0]}:{client[1]}" if client else ""


def _credentials(request: Request) -> tuple[str | None, str | None]:
    """The request's ``Authorization`` and ``X-Request-Id`` (cut to 128 characters), each the
    first of its name: what ``request.headers.get`` answers, in one pass over the raw headers
    (ASGI names them in lower case) and without the ``KeyError`` it raises and catches for
    a header that is not there, on every call."""
    authorization = request_id = None
    for name, value in request.scope["headers"]:
        if name == b"authorization":
            if authorization is None:
                authorization = value.decode("latin-1")
        elif name == b"x-request-id" and request_id is None:
            request_id = value.decode("latin-1")
    return authorization, request_id[:128] if request_id else None


async def caller_of(request: Request) -> Caller:
    """The request's caller; raises ``NotAuthenticated`` (audited) when it has no identity, and
    ``BackendUnavailable`` while calls are withheld (:attr:`AccessHolder.withheld`): the
    access settings in force are then not the ones to judge the caller by, nor its stores the
    ones that hold the locks (but a caller that names no bearer token, where no access
    settings may open the service, is refused by all of them: ``NotAuthenticated`` first).

    Other parts of the API (a console, plugins) use this, or :data:`CallerDep`, to apply the
    same rules as the v1 routes.
    """
    return await _caller(request, withheld=True)


async def caller_of_settings(request: Request) -> Caller:
    """:func:`caller_of` for the read of the settings in force (``GET /v1/config``), served
    while other calls are withheld: what the service runs with meanwhile is its answer."""
    return await _caller(request, withheld=False)


async def _caller(request: Request, *, withheld: bool) -> Caller:
    global _last_seat
    scope = request.scope
    app = scope["app"]
    app_ref, seat = _last_seat
    if seat is None or app_ref() is not app:
        seat = _SEATS.get(app)
        if seat is None:  # an app whose access :func:`install_access` did not install
            seat = _SEATS[app] = (app.state.access, app.state.audit)
        _last_seat = (weakref.ref(app), seat)
    holder, audit = seat
    access = holder.current()
    authorization, request_id = _credentials(request)
    if access.open and holder.loopback_hosts and (named := foreign_host(request)) is not None:
        refusal = (f"this service, open to every caller (enhanced-locking-auth: none), answers "
                   f"only requests to a loopback address; this one names the host {named!r} "
                   "(another site's page reaching it by DNS rebinding, say)")
        await audit.record(AuditEntry(
            time=utcnow(), identity=ANONYMOUS.name, method=access.mode, verb="",
            action=_action(request), outcome="foreign-host", status=403, reason=refusal,
            peer=_peer(request), request_id=request_id,
        ))
        raise HTTPException(403, refusal)
    if withheld and (why := holder.withheld()) is not None:
        if not holder.may_open():
            # Who-checks first: a caller that names no bearer token is refused by every
            # access setting a LockPolicy may name (none of them opens this service), so it
            # hears 401, not the service's state. A token is judged by the policy's settings
            # alone: another mode or audience may accept one the settings in force do not.
            try:
                bearer_token(authorization)
            except NotAuthenticated as refusal:
                await _unauthenticated(audit, access, request, request_id, refusal)
                raise
        # A refusal like any other, audited; by no identity: the access settings in force are
        # not the ones to judge the caller by.
        await audit.record(AuditEntry(
            time=utcnow(), identity="", method=access.mode, verb="", action=_action(request),
            outcome="unavailable", status=503, reason=why, peer=_peer(request),
            request_id=request_id,
        ))
        raise BackendUnavailable(why)
    try:
        identity = await access.identify(authorization)
    except NotAuthenticated as refusal:
        await _unauthenticated(audit, access, request, request_id, refusal)
        raise
    return Caller(identity=identity, peer=_peer(request), request_id=request_id, access=access,
                  audit=audit)


async def _unauthenticated(audit: AuditTrail, access: AccessControl, request: Request,
                           request_id: str | None, refusal: NotAuthenticated) -> None:
    """Write the refusal of a request that has no identity (401) to the audit trail."""
    await audit.record(AuditEntry(
        time=utcnow(), identity="", method=access.mode, verb="", action=_action(request),
        outcome="unauthenticated", status=401, reason=str(refusal), peer=_peer(request),
        request_id=request_id,
    ))


_SEATS: weakref.WeakKeyDictionary[Any, tuple[AccessHolder, AuditTrail]] = (
    weakref.WeakKeyDictionary())
"""Each app's access control and audit trail, as :func:`install_access` put them on its
``app.state``: read per request from here, as ``app.state.access`` costs Starlette's attribute
hook, which raises and catches an ``AttributeError`` first (about 6k instructions a read, two
per call). The last app's is kept beside them, by a weak reference (the map's ``get`` makes
one on every call: about 1.6k instructions, against 0.4k to follow the kept one)."""

_last_seat: tuple[Callable[[], object], tuple[AccessHolder, AuditTrail] | None] = (
    lambda: None, None)


class Unidentified(enum.Enum):
    """Why a caller identified at a request's start is no longer (:meth:`StillCaller.access`),
    in the words of a log line."""

    NOT_IDENTIFIED = "its credentials no longer identify it"
    NOT_ASKED = ("whether its credentials still identify it could not be asked (the token "
                 "review was not answered)")


class StillCaller:
    """The caller of a request that outlives its start (an event stream), identified again
    from the request's credentials when the access control in force is another than the one
    it was last identified under, or its ``recheck_seconds`` passed: a token withdrawn (from
    the tokens file, or revoked in Kubernetes) stops being the caller it was.

    The credentials are kept in memory for that, never logged or shown. Between rechecks the
    cost is a comparison of the access control and of a clock reading."""

    __slots__ = ("_access", "_authorization", "_current", "_due", "identity")

    def __init__(self, request: Request, caller: Caller) -> None:
        self._current = access_now(request)
        self._authorization = _credentials(request)[0]
        self._access = caller.access
        self._due = time.monotonic() + caller.access.recheck_seconds
        self.identity = caller.identity

    def due_in(self) -> float:
        """Seconds until the caller is due to be identified again (0: it is now)."""
        return max(0.0, self._due - time.monotonic())

    async def access(self) -> AccessControl | Unidentified:
        """The access control in force, the caller still identified as it was under it; else
        why not: its credentials no longer identify it (or identify someone else), or
        whether they do could not be asked."""
        access = self._current()
        if access is self._access and time.monotonic() < self._due:
            return access
        try:
            identity = await access.identify(self._authorization)
        except Unasked:
            return Unidentified.NOT_ASKED
        except NotAuthenticated:
            return Unidentified.NOT_IDENTIFIED
        if identity != self.identity:
            return Unidentified.NOT_IDENTIFIED
        self._access, self._due = access, time.monotonic() + access.recheck_seconds
        return access


def access_now(request: Request) -> Callable[[], AccessControl]:
    """The access control in force, asked anew at each call: for a stream that outlives the
    config snapshot its request was checked under (a right taken away stops its events)."""
    seat = _SEATS.get(request.scope["app"])
    holder = seat[0] if seat is not None else request.app.state.access
    return holder.current


def _action(request: Request) -> str:
    return f"{request.method} {request.url.path}"


CallerDep = Annotated[Caller, Depends(caller_of)]
"""A route parameter of this type authenticates the request (401 without an identity)."""

SettingsCallerDep = Annotated[Caller, Depends(caller_of_settings)]
""":data:`CallerDep` of the read of the settings in force, served while calls are withheld."""

F = TypeVar("F", bound=Callable[..., Any])

_PUBLIC_ATTRIBUTE = "__enhanced_locking_public__"


def public(why: str) -> Callable[[F], F]:
    """Mark a route as answering without a bearer token; ``why`` says what protects it.

    Put it under the route decorator::

        @app.post("/v1/webhooks/github")
        @public("authenticated by the GitHub webhook signature")
        async def github(...): ...
    """
    if not why.strip():
        raise ValueError("public() needs the reason the route may answer without a token")

    def mark(endpoint: F) -> F:
        setattr(endpoint, _PUBLIC_ATTRIBUTE, why)
        return endpoint

    return mark


class RouteView(Protocol):
    """What the access checks read of a route: the path and methods it answers, its endpoint
    and the dependencies it is called with (its router's included)."""

    @property
    def path(self) -> str: ...
    @property
    def methods(self) -> set[str] | None: ...
    @property
    def endpoint(self) -> Callable[..., Any]: ...
    @property
    def dependant(self) -> Any: ...


def api_routes(app: FastAPI) -> list[RouteView]:
    """Every API route ``app`` answers, those of included routers too, each as it is served
    (its router's prefix and dependencies applied). FastAPI keeps an included router as one
    entry of ``app.routes`` with its routes inside; an older one copies them there."""
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    if contexts is None:
        return [route for route in app.routes if isinstance(route, APIRoute)]
    return [context for context in contexts(app.routes)
            if isinstance(context.original_route, APIRoute)]


def public_reason(route: RouteView) -> str | None:
    reason = getattr(route.endpoint, _PUBLIC_ATTRIBUTE, None)
    return reason if isinstance(reason, str) else None


def _depends_on_caller(route: RouteView) -> bool:
    stack = list(route.dependant.dependencies)
    while stack:
        dependant = stack.pop()
        if dependant.call is caller_of or dependant.call is caller_of_settings:
            return True
        stack.extend(dependant.dependencies)
    return False


UNGUARDED_PATHS = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
"""FastAPI's own pages: the API's description, no lock data."""

BEARER_SCHEME = {"type": "http", "scheme": "bearer", "description": (
    "A token of the tokens file (auth static) or one the Kubernetes API server accepts (auth "
    "kubernetes), in Authorization: Bearer TOKEN. With auth none no token is asked.")}


def document_bearer(app: FastAPI) -> None:
    """Declare in ``app``'s OpenAPI document the bearer token every route that takes the caller
    reads, as optional (auth ``none`` asks none): Swagger UI at ``/docs`` then offers to send
    it, as a client generated from the document does. Routes marked :func:`public` declare
    none. Called once every route is added."""
    build = app.openapi
    takes_caller = [route for route in api_routes(app) if _depends_on_caller(route)]

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            document.setdefault("components", {})["securitySchemes"] = {"bearer": BEARER_SCHEME}
            for route in takes_caller:
                item = document["paths"].get(route.path, {})
                for method in route.methods or ():
                    if method.lower() in item:
                        item[method.lower()]["security"] = [{"bearer": []}, {}]
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def check_routes(app: FastAPI) -> None:
    """Refuse an app with a route (its own, or an included router's) that neither takes the
    caller nor is marked :func:`public`."""
    for route in api_routes(app):
        if route.path in UNGUARDED_PATHS:
            continue
        if public_reason(route) is None and not _depends_on_caller(route):
            raise RuntimeError(
                f"route {sorted(route.methods or ())} {route.path} neither takes the caller "
                "(CallerDep) nor is marked @public(why): every route must say who may call it"
            )


def install_access(app: FastAPI, provider: ConfigProvider, audit: AuditTrail,
                   build: AccessBuilder = build_access, *, exposed: bool = False,
                   loopback_hosts: bool = False,
                   withheld: Callable[[], str | None] = lambda: None) -> AccessHolder:
    """Keep the access control and the audit trail on ``app.state``; answer its refusals.

    ``exposed``: the service listens on a non-loopback address (auth ``none`` is refused
    there unless ``insecure-allow-unauthenticated``); ``loopback_hosts``: it listens on loopback
    alone, and open access answers only requests that name a loopback host; ``withheld``: why
    no call that reads or changes locks is served now (see :func:`caller_of`). A new config
    snapshot whose access
    settings cannot be used is refused by the provider (:class:`ConfigRejected`, naming the
    changed settings) rather than applied and then skipped by the holder."""
    global _last_seat
    holder = AccessHolder(provider, build, exposed=exposed, loopback_hosts=loopback_hosts,
                          withheld=withheld)
    app.state.access = holder
    app.state.audit = audit
    _SEATS[app] = (holder, audit)
    _last_seat = (weakref.ref(app), (holder, audit))

    async def refuse_unusable_access(candidate: Snapshot) -> None:
        """A snapshot whose access settings the holder would not switch to is refused before
        it is applied, so no one is told of a change that does not happen."""
        config, running = candidate.config, provider.current.config
        changed = tuple(name for name in ACCESS_FIELDS
                        if getattr(config, name) != getattr(running, name))
        if not changed:
            return
        refusal = open_to_network_refusal(config, exposed=exposed)
        if refusal is not None:
            raise ConfigRejected(refusal, settings=("auth",))
        try:
            build(config).close()
        except ValueError as error:
            raise ConfigRejected(str(error), settings=changed) from error

    provider.add_check(refuse_unusable_access)

    @app.exception_handler(NotAuthenticated)
    async def _unauthenticated(request: Request, error: NotAuthenticated) -> JSONResponse:
        challenge = f'Bearer realm="{REALM}"'
        if error.invalid_token:
            challenge += ', error="invalid_token"'
        return JSONResponse({"error": str(error)}, status_code=401,
                            headers={"WWW-Authenticate": challenge})

    @app.exception_handler(NotPermitted)
    async def _forbidden(request: Request, error: NotPermitted) -> JSONResponse:
        body: dict[str, Any] = {"error": str(error), "verb": error.verb.value,
                                "identity": error.identity.name}
        if error.repo:
            body["repo"] = error.repo
        return JSONResponse(body, status_code=403)

    return holder


class rule_override:  # lower case: a block, `with rule_override(...)`, as a function reads
    """Within the block, the request may ask for a priority above its priority rule's."""

    __slots__ = ("_allowed", "_token")

    def __init__(self, allowed: bool) -> None:
        self._allowed = allowed

    def __enter__(self) -> None:
        self._token = policies.CALLER_IS_ADMIN.set(self._allowed)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        policies.CALLER_IS_ADMIN.reset(self._token)


async def overrides_rules(caller: Caller, *, repo: str) -> bool:
    """Whether the caller may ask for more priority than its rule gives: the ``admin`` right,
    held by an identified caller (with access control off, nobody is: the rules hold)."""
    return caller.identity.method != "none" and await caller.may(Verb.ADMIN, repo=repo)
