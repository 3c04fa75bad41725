"""The few Kubernetes API calls the operator makes itself, as awaitables.

kopf watches the custom resources and calls the handlers; everything the reconciler writes or
reads besides (Secrets, the bound objects, their status, Events) goes through this module,
with the official client run in a worker thread. Credentials are found as kubectl finds them
(see :func:`client_configuration`).

Secret values are returned as ``SecretStr`` and never logged: error messages name the Secret
and the key, not the content.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from kubernetes import client, config
from pydantic import SecretStr

from enhanced_locking.kube.models import GROUP, VERSION
from enhanced_locking.kubeconfig import NOT_A_KUBECONFIG, not_a_kubeconfig

__all__ = [
    "ClusterApi", "KubernetesApi", "NoCredentials", "SecretProblem", "StatusConflict",
    "client_configuration", "new_api_client",
]

log = logging.getLogger(__name__)

COMPONENT = "enhanced-locking"
_TIMEOUT = 10.0


class NoCredentials(Exception):
    """Neither a kubeconfig nor a pod's service account says how to reach Kubernetes."""


class SecretProblem(Exception):
    """A Secret a policy names cannot be used; ``reason`` is a condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class StatusConflict(Exception):
    """A status patch carried a ``resourceVersion`` the object no longer has: someone wrote it
    since it was read (another replica that took over the status, or a spec edit)."""


class ClusterApi(Protocol):
    """What the reconciler asks of the cluster."""

    async def read_secret(self, namespace: str, name: str, key: str) -> SecretStr: ...

    async def get_object(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        ...

    async def patch_status(
        self, plural: str, namespace: str, name: str, status: Mapping[str, Any], *,
        resource_version: str | None = None,
    ) -> dict[str, Any] | None: ...

    async def post_event(
        self, body: Mapping[str, Any], *, kind: str, type: str, reason: str, message: str
    ) -> None: ...


def _as_dict(found: object) -> dict[str, Any]:
    # Custom objects come back as plain JSON objects.
    if not isinstance(found, dict):
        raise TypeError(f"expected a JSON object from the API server, got {type(found).__name__}")
    return found


def client_configuration() -> client.Configuration:
    """Credentials found the way kubectl finds them.

    ``KUBECONFIG`` when it is set, else the pod's service account when in a pod, else
    ``~/.kube/config``. kopf logs in with the same (see ``handlers.login``), so the watches and
    the operator's own calls always talk to the same cluster as the same user.
    """
    configuration = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        else:
            # The file named when called: the library's default is ``KUBECONFIG`` as it was
            # when the library was first imported.
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=os.environ.get("KUBECONFIG") or "~/.kube/config",
                client_configuration=configuration, persist_config=False
            )
    except NOT_A_KUBECONFIG as error:
        raise NoCredentials(not_a_kubeconfig(
            f"kubeconfig {os.environ.get('KUBECONFIG') or '~/.kube/config'}", error)) from None
    except (config.ConfigException, OSError) as error:
        where = os.environ.get("KUBECONFIG") or "~/.kube/config (KUBECONFIG is not set)"
        raise NoCredentials(
            f"no Kubernetes credentials: kubeconfig {where}: {error}; set KUBECONFIG, or run "
            "in a pod with a service account"
        ) from None
    return configuration


def new_api_client(configuration: client.Configuration | None = None) -> client.ApiClient:
    return client.ApiClient(configuration or client_configuration())


class KubernetesApi:
    """:class:`ClusterApi` over the official Kubernetes client."""

    def __init__(self, api_client: client.ApiClient, *, instance: str = "") -> None:
        self._core = client.CoreV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)
        self._coordination = client.CoordinationV1Api(api_client)
        self._client = api_client
        self._instance = instance or os.environ.get("POD_NAME", "") or os.uname().nodename

    async def read_secret(self, namespace: str, name: str, key: str) -> SecretStr:
        where = f"Secret {namespace}/{name}"
        try:
            secret = await asyncio.to_thread(
                self._core.read_namespaced_secret, name, namespace, _request_timeout=_TIMEOUT
            )
        except client.ApiException as error:
            if error.status == 404:
                raise SecretProblem("SecretNotFound", f"{where} does not exist") from None
            raise SecretProblem(
                "SecretUnreadable", f"{where} cannot be read (HTTP {error.status} {error.reason})"
            ) from None
        data = secret.data or {}
        if key not in data:
            raise SecretProblem("SecretKeyNotFound", f"{where} has no key {key!r}")
        try:
            return SecretStr(base64.b64decode(data[key], validate=True).decode())
        except (binascii.Error, UnicodeDecodeError):
            raise SecretProblem(
                "SecretUnreadable", f"{where} key {key!r} is not UTF-8 text"
            ) from None

    async def get_object(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found = await asyncio.to_thread(
                self._custom.get_namespaced_custom_object,
                GROUP, VERSION, namespace, plural, name, _request_timeout=_TIMEOUT,
            )
        except client.ApiException as error:
            if error.status == 404:
                return None
            raise
        return _as_dict(found)

    async def patch_status(
        self, plural: str, namespace: str, name: str, status: Mapping[str, Any], *,
        resource_version: str | None = None,
    ) -> dict[str, Any] | None:
        """Merge ``status`` in; with ``resource_version`` only onto that version of the object
        (the API server answers 409 otherwise: :class:`StatusConflict`)."""
        patch: dict[str, Any] = {"status": dict(status)}
        if resource_version is not None:
            patch["metadata"] = {"resourceVersion": resource_version}
        try:
            patched = await asyncio.to_thread(
                self._custom.patch_namespaced_custom_object_status,
                GROUP, VERSION, namespace, plural, name, patch,
                field_manager=COMPONENT,
                _content_type="application/merge-patch+json",
                _request_timeout=_TIMEOUT,
            )
        except client.ApiException as error:
            if error.status == 404:
                return None  # deleted meanwhile: nothing to report on
            if error.status == 409:
                raise StatusConflict(f"{plural}/{name} changed since resourceVersion "
                                     f"{resource_version}") from None
            raise
        return _as_dict(patched)

    # --- Leases (leader election, see kube/leader.py); a conflict answers None -------------
    def _plain(self, found: object) -> dict[str, Any]:
        return _as_dict(self._client.sanitize_for_serialization(found))  # type: ignore[no-untyped-call]

    async def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found = await asyncio.to_thread(
                self._coordination.read_namespaced_lease, name, namespace,
                _request_timeout=_TIMEOUT,
            )
        except client.ApiException as error:
            if error.status == 404:
                return None
            raise
        return self._plain(found)

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        try:
            created = await asyncio.to_thread(
                self._coordination.create_namespaced_lease, namespace, cast(Any, body),
                field_manager=COMPONENT, _request_timeout=_TIMEOUT,
            )
        except client.ApiException as error:
            if error.status == 409:
                return None
            raise
        return self._plain(created)

    async def replace_lease(
        self, namespace: str, name: str, body: dict[str, Any]
    ) -> dict[str, Any] | None:
        try:
            replaced = await asyncio.to_thread(
                self._coordination.replace_namespaced_lease, name, namespace, cast(Any, body),
                field_manager=COMPONENT, _request_timeout=_TIMEOUT,
            )
        except client.ApiException as error:
            if error.status in (404, 409):
                return None
            raise
        return self._plain(replaced)

    async def post_event(
        self, body: Mapping[str, Any], *, kind: str, type: str, reason: str, message: str
    ) -> None:
        meta = body.get("metadata", {})
        now = datetime.now(UTC)
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta.get('name', 'unknown')}.{secrets.token_hex(8)}",
                "namespace": meta.get("namespace"),
            },
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": kind,
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self._instance[:128],
            "firstTimestamp": now.isoformat(),
            "lastTimestamp": now.isoformat(),
            "count": 1,
        }
        try:
            await asyncio.to_thread(
                self._core.create_namespaced_event,
                str(meta.get("namespace")), cast(Any, event), _request_timeout=_TIMEOUT,
            )
        except client.ApiException as error:
            # An Event is a courtesy to the reader; failing to post one changes nothing.
            log.warning("could not post the %s event on %s %s: HTTP %s",
                        reason, kind, meta.get("name"), error.status)
