"""An in-memory stand-in for the few Kubernetes API calls the reconciler makes.

The reconciler's unit tests use it with a real lock service; the same behaviour against a real
API server is in tests/e2e. Status patches are JSON merge patches, as the API server applies
them; an annotation can be set as ``kubectl annotate`` does.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from pydantic import SecretStr

from enhanced_locking.kube.cluster import SecretProblem

__all__ = ["NS", "InMemoryCluster"]

NS = "atlantis"


class InMemoryCluster:
    """Objects, Secrets, status patches and Events of one namespace, kept in dicts."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        self.events: list[dict[str, Any]] = []
        self.patches = 0

    def put(self, plural: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        previous = self.objects.get((plural, name))
        generation = previous["metadata"]["generation"] + 1 if previous else 1
        body = {
            "metadata": {"name": name, "namespace": NS, "generation": generation,
                         "uid": f"uid-{name}"},
            "spec": spec,
            "status": previous.get("status", {}) if previous else {},
        }
        self.objects[(plural, name)] = body
        return copy.deepcopy(body)

    def status(self, plural: str, name: str) -> dict[str, Any]:
        return dict(self.objects[(plural, name)].get("status") or {})

    def ready(self, plural: str, name: str) -> dict[str, Any]:
        conditions = self.status(plural, name).get("conditions") or []
        return dict(next(c for c in conditions if c["type"] == "Ready"))

    async def read_secret(self, namespace: str, name: str, key: str) -> SecretStr:
        data = self.secrets.get((namespace, name))
        if data is None:
            raise SecretProblem("SecretNotFound", f"Secret {namespace}/{name} does not exist")
        if key not in data:
            raise SecretProblem("SecretKeyNotFound", f"Secret {namespace}/{name} has no {key!r}")
        return SecretStr(data[key])

    async def get_object(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.objects.get((plural, name))
        return copy.deepcopy(found) if found else None

    async def patch_status(
        self, plural: str, namespace: str, name: str, status: Mapping[str, Any], *,
        resource_version: str | None = None,
    ) -> dict[str, Any] | None:
        body = self.objects.get((plural, name))
        if body is None:
            return None
        # Objects here carry no resourceVersion, so the reconciler sends none.
        assert resource_version is None, "the stand-in has no resourceVersion to check"
        self.patches += 1
        merged = {**(body.get("status") or {}), **status}
        body["status"] = {k: v for k, v in merged.items() if v is not None}
        return copy.deepcopy(body)

    async def post_event(
        self, body: Mapping[str, Any], *, kind: str, type: str, reason: str, message: str
    ) -> None:
        self.events.append({"object": f"{kind}/{body['metadata']['name']}", "type": type,
                            "reason": reason, "message": message})

    def annotate(self, plural: str, name: str, key: str, value: str) -> dict[str, Any]:
        """``kubectl annotate --overwrite``: metadata changes, the generation does not."""
        body = self.objects[(plural, name)]
        body["metadata"].setdefault("annotations", {})[key] = value
        return copy.deepcopy(body)
