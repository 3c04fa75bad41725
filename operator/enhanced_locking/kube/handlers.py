"""The kopf handlers: thin triggers of the one idempotent reconcile.

Create, update and resume of the bound LockPolicy or LockMigration all call the same
:meth:`Reconciler.observed`; the watch's ``DELETED`` event calls :meth:`Reconciler.deleted`.
Deletion is watched as an event, not with ``@kopf.on.delete``, because that handler needs a
finalizer (see :mod:`enhanced_locking.kube.reconcile` for why there is none). Objects of other
names are not this service's and are left alone, so several services can share a namespace.

The handlers are registered on a registry of their own, not kopf's global one, so the
operator's wiring is explicit and a test can build as many operators as it likes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kopf
from kubernetes import client

from enhanced_locking.kube.cluster import client_configuration
from enhanced_locking.kube.models import GROUP, VERSION
from enhanced_locking.kube.reconcile import MIGRATIONS, POLICIES, Reconciler
from enhanced_locking.provider import ConfigProvider

__all__ = ["build_registry"]

# A failed reconcile (the API server briefly away) is retried soon, not after kopf's minute.
_BACKOFF = 2.0


def _named(wanted: str) -> Callable[..., bool]:
    def when(name: str | None = None, **_: Any) -> bool:
        return name == wanted

    return when


def _deleted(wanted: str) -> Callable[..., bool]:
    # Filtering here, not in the handler, keeps kopf from logging every other watch event.
    def when(name: str | None = None, type: str | None = None, **_: Any) -> bool:
        return name == wanted and type == "DELETED"

    return when


def _register(registry: kopf.OperatorRegistry, reconciler: Reconciler, plural: str,
              name: str) -> None:
    async def reconcile(body: kopf.Body, **_: Any) -> None:
        await reconciler.observed(plural, body)

    async def deleted(body: kopf.Body, **_: Any) -> None:
        await reconciler.deleted(plural, body)

    handler_id = f"reconcile-{plural}"
    when = _named(name)
    for on in (kopf.on.create, kopf.on.update, kopf.on.resume):
        on(GROUP, VERSION, plural, id=handler_id, registry=registry, when=when,
           backoff=_BACKOFF)(reconcile)
    kopf.on.event(GROUP, VERSION, plural, id=f"deleted-{plural}", registry=registry,
                  when=_deleted(name))(deleted)


def connection_info(configuration: client.Configuration) -> kopf.ConnectionInfo:
    """kopf's view of a client configuration (as ``kopf.login_via_client`` builds it)."""
    header = configuration.get_api_key_with_prefix(
        "BearerToken"
    ) or configuration.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0] if parts else None)
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme,
        token=token,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


def build_registry(reconciler: Reconciler, provider: ConfigProvider) -> kopf.OperatorRegistry:
    """Every handler of the operator, on a fresh registry."""
    registry = kopf.OperatorRegistry()
    binding = reconciler.binding
    _register(registry, reconciler, POLICIES, binding.policy)
    _register(registry, reconciler, MIGRATIONS, binding.migration)

    @kopf.on.login(id="login", registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        """The credentials the operator's own client uses (see ``client_configuration``)."""
        return connection_info(client_configuration())

    @kopf.on.probe(id="configGeneration", registry=registry)
    def config_generation(**_: Any) -> int:
        """The liveness report carries the config generation the service runs."""
        return provider.current.generation

    return registry
