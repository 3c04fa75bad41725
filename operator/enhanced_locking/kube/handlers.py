"""The kopf handlers: thin triggers of the one idempotent reconcile.

Every watch event of the bound LockPolicy or LockMigration (kopf's initial listing included)
calls :meth:`Reconciler.event`, which converges on the object as it is now; ``DELETED`` calls
:meth:`Reconciler.deleted`. Objects of other names are not this service's and are left alone,
so several services can share a namespace.

The rollout's timer is not a ``@kopf.timer``: kopf puts a finalizer on every object a timer
runs for (to stop the timer before the object goes), and the operator uses none (see
:mod:`enhanced_locking.kube.reconcile`). The operator runs :meth:`Reconciler.tick_forever`
beside kopf instead.

Why watch events and not ``@kopf.on.create/update/resume``: kopf decides whether an object
changed by comparing it with the "last handled" copy it keeps in an annotation *on the object*.
Several replicas share that annotation, so the first replica to handle a change would hide it
from the others (they would see it as handled and skip it), and a replica left behind routes by
an old weight. Reacting to every event is safe because the reconcile is idempotent, and it
keeps kopf from writing to the objects at all. For the same reason deletion is an event, not
``@kopf.on.delete``, which would need a finalizer (see :mod:`enhanced_locking.kube.reconcile`).
A reconcile that fails (the API server briefly away) is retried by the resync, soon.

The handlers are registered on a registry of their own, not kopf's global one, so the
operator's wiring is explicit and a test can build as many operators as it likes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import kopf
from kubernetes import client

from enhanced_locking.kube.cluster import client_configuration
from enhanced_locking.kube.models import GROUP, VERSION
from enhanced_locking.kube.reconcile import MIGRATIONS, POLICIES, Reconciler
from enhanced_locking.provider import ConfigProvider

__all__ = ["QUIET_HANDLERS", "build_registry"]

log = logging.getLogger(__name__)

QUIET_HANDLERS = (f"Handler 'watch-{POLICIES}'", f"Handler 'watch-{MIGRATIONS}'")
"""Handlers that run on every watch event (the status writer's writes included): kopf's line
for each successful run is not news (the operator filters those lines out)."""


def _named(wanted: str) -> Callable[..., bool]:
    def when(name: str | None = None, **_: Any) -> bool:
        return name == wanted

    return when


def _register(registry: kopf.OperatorRegistry, reconciler: Reconciler, plural: str,
              name: str) -> None:
    async def watched(body: kopf.Body, type: str | None = None, **_: Any) -> None:
        try:
            if type == "DELETED":
                await reconciler.deleted(plural, body)
            else:
                await reconciler.event(plural, body)
        except Exception as error:  # the API may be briefly away: the resync tries again
            log.warning("reconciling %s %s failed, retrying soon: %s", plural, name, error)
            reconciler.retry_soon()

    kopf.on.event(GROUP, VERSION, plural, id=f"watch-{plural}", registry=registry,
                  when=_named(name))(watched)


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
