"""Kubernetes access control: TokenReview for who, SubjectAccessReview for what.

A bearer token the static tokens do not know is sent to the API server in a ``TokenReview``
(with ``auth-audience`` when set), so ServiceAccount tokens, projected tokens and whatever the
cluster's authenticators accept all work. Each call then asks a ``SubjectAccessReview`` for the
verb on the virtual resource ``locks`` of the group ``locking.runatlantis.io`` (named by the
repository when the call is about one, in ``auth-namespace`` when set), so rights are plain
RBAC and ``kubectl auth can-i force-unlock locks.locking.runatlantis.io --as ...`` gives the
same answer as the service.

Both answers are cached for ``auth-cache-ttl`` (tokens by their SHA-256 digest, never the
token itself), so a warm cache adds no round trip to a lock call. A review the API server does
not answer is a refusal (401 or 403), never an open door; it is not cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any, Generic, TypeVar

import urllib3
from kubernetes import client, config

from enhanced_locking.api.access import AccessControl, Authenticator, NotAsked
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.kubeconfig import NOT_A_KUBECONFIG, not_a_kubeconfig
from enhanced_locking.types import Identity, Verb

__all__ = [
    "GROUP",
    "RESOURCE",
    "SubjectAccessReviews",
    "TokenReviews",
    "TtlCache",
    "kubernetes_access",
]

log = logging.getLogger(__name__)

GROUP = "locking.runatlantis.io"
RESOURCE = "locks"
_TIMEOUT = 5.0
CACHE_SIZE = 10_000

_NOT_ANSWERED = (client.ApiException, urllib3.exceptions.HTTPError, OSError)
"""What a review the API server did not answer raises: a refusal of its own, an API server that
cannot be reached or drops the connection (urllib3 raises its own errors for those, after its
retries: neither an ``ApiException`` nor an ``OSError``)."""

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """A small LRU of answers that expire ``ttl`` seconds after they were stored."""

    def __init__(self, ttl: float, *, size: int = CACHE_SIZE) -> None:
        self.ttl = ttl
        self.size = size
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> tuple[bool, V | None]:
        found = self._items.get(key)
        if found is None:
            return False, None
        if found[0] <= time.monotonic():
            del self._items[key]
            return False, None
        return True, found[1]

    def put(self, key: K, value: V) -> None:
        self._items[key] = (time.monotonic() + self.ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


def api_client() -> client.ApiClient:
    """Credentials found as kubectl finds them (``KUBECONFIG``, a pod's service account)."""
    configuration = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration)
    else:
        # The file named when called: the library's default is ``KUBECONFIG`` as it was when
        # the library was first imported.
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=os.environ.get("KUBECONFIG") or "~/.kube/config",
            client_configuration=configuration, persist_config=False)
    return client.ApiClient(configuration)


class TokenReviews:
    """An authenticator asking the API server who a token belongs to."""

    def __init__(self, api: client.ApiClient, *, audience: str, ttl: float) -> None:
        self._api = client.AuthenticationV1Api(api)
        self._audiences = [audience] if audience else None
        self._cache: TtlCache[bytes, Identity | None] = TtlCache(ttl)

    def _review(self, token: str) -> Identity | None:
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(
            token=token, audiences=self._audiences))
        answer = self._api.create_token_review(body, _request_timeout=_TIMEOUT)
        status = answer.status
        if status is None or not status.authenticated or status.user is None:
            return None
        if self._audiences and not set(self._audiences) & set(status.audiences or ()):
            return None
        user = status.user
        return Identity(name=user.username or "", uid=user.uid or "",
                        groups=tuple(user.groups or ()), method="kubernetes")

    async def authenticate(self, token: str) -> Identity | None:
        digest = hashlib.sha256(token.encode()).digest()
        hit, identity = self._cache.get(digest)
        if hit:
            return identity
        try:
            identity = await asyncio.to_thread(self._review, token)
        except _NOT_ANSWERED as error:
            # The message of an ApiException may echo the request: log the status only.
            status = getattr(error, "status", None) or type(error).__name__
            log.error("TokenReview failed (%s): the caller is refused", status)
            raise NotAsked from None
        self._cache.put(digest, identity)
        return identity


class SubjectAccessReviews:
    """An authorizer asking the API server whether an identity holds a verb on ``locks``."""

    per_repository = True

    def __init__(self, api: client.ApiClient, *, namespace: str, ttl: float) -> None:
        self._api = client.AuthorizationV1Api(api)
        self._namespace = namespace or None
        self._cache: TtlCache[tuple[Any, ...], bool] = TtlCache(ttl)
        self.reviews = 0
        """Reviews sent to the API server (the cache answered the rest)."""

    def _review(self, identity: Identity, verb: Verb, repo: str | None) -> bool:
        attributes = client.V1ResourceAttributes(
            group=GROUP, resource=RESOURCE, verb=verb.value, name=repo or None,
            namespace=self._namespace)
        spec = client.V1SubjectAccessReviewSpec(
            user=identity.name, groups=list(identity.groups), uid=identity.uid or None,
            resource_attributes=attributes)
        answer = self._api.create_subject_access_review(
            client.V1SubjectAccessReview(spec=spec), _request_timeout=_TIMEOUT)
        return bool(answer.status is not None and answer.status.allowed)

    async def allowed(self, identity: Identity, verb: Verb, *, repo: str | None) -> bool:
        key = (identity.name, identity.groups, identity.uid, verb, repo)
        hit, allowed = self._cache.get(key)
        if hit:
            return bool(allowed)
        try:
            self.reviews += 1
            allowed = await asyncio.to_thread(self._review, identity, verb, repo)
        except _NOT_ANSWERED as error:
            status = getattr(error, "status", None) or type(error).__name__
            log.error("SubjectAccessReview failed (%s): %s is refused %s", status,
                      identity.name, verb.value)
            return False
        self._cache.put(key, allowed)
        return allowed


def kubernetes_access(settings: EnhancedLockingConfig) -> AccessControl:
    """TokenReview (after the static tokens, when there are any) and SubjectAccessReview."""
    try:
        api = api_client()
    except NOT_A_KUBECONFIG as error:
        raise ValueError("invalid setting enhanced-locking-auth: kubernetes needs Kubernetes "
                         "credentials: " + not_a_kubeconfig(
                             f"kubeconfig {os.environ.get('KUBECONFIG') or '~/.kube/config'}",
                             error)) from None
    except (config.ConfigException, OSError) as error:
        raise ValueError(
            f"invalid setting enhanced-locking-auth: kubernetes needs Kubernetes credentials "
            f"(KUBECONFIG or a pod's service account): {error}") from None
    ttl = recheck = settings.auth_cache_ttl.total_seconds()
    authenticators: list[Authenticator] = []
    if settings.auth_tokens_file or settings.auth_tokens.get_secret_value():
        from enhanced_locking.api.static_access import RECHECK_SECONDS, StaticTokens

        authenticators.append(StaticTokens.from_config(settings))
        recheck = min(ttl, RECHECK_SECONDS)
    authenticators.append(TokenReviews(api, audience=settings.auth_audience, ttl=ttl))
    authorizer = SubjectAccessReviews(api, namespace=settings.auth_namespace, ttl=ttl)
    return AccessControl("kubernetes", authenticators, authorizer, closers=[api.close],
                         recheck_seconds=recheck)
