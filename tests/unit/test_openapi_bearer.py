"""The OpenAPI document says how a caller authenticates: every route that takes the caller asks
for a bearer token, optional (with access control off none is asked), so Swagger UI at
``/docs`` offers to send one and a client generated from the document sends it; the routes that
ask none (probes, metrics, the VCS webhooks, which check their own signature) declare none."""

from __future__ import annotations

from typing import Any

from enhanced_locking.api import create_app
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.factory import LockService
from enhanced_locking.provider import ConfigProvider


def document() -> dict[str, Any]:
    config = EnhancedLockingConfig(backend="memory", legacy_backend="memory")
    return create_app(LockService(ConfigProvider(config)), manage_lifecycle=False).openapi()


def test_the_document_declares_the_bearer_token() -> None:
    scheme = document()["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")


def test_every_route_that_takes_the_caller_asks_for_it_and_no_other_route_does() -> None:
    asked = []
    for path, item in document()["paths"].items():
        for method, operation in item.items():
            takes_caller = path.startswith("/v1/") and not path.startswith("/v1/webhooks/")
            if takes_caller:
                assert operation.get("security") == [{"bearer": []}, {}], (method, path)
                assert "401" in operation["responses"], (method, path)
                asked.append((method, path))
            else:
                assert "security" not in operation, (method, path)
    assert ("post", "/v1/locks") in asked and ("get", "/v1/events") in asked
