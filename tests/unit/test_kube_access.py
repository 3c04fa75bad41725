"""Kubernetes mode fails closed when the API server does not answer: a TokenReview that cannot
be asked is a 401, a SubjectAccessReview a 403, each a JSON answer with its audit row, never a
500 (docs/08-access.md). The service is built by ``kubernetes_access`` itself from a kubeconfig
whose API server is a loopback address nobody listens on, or a loopback listener that closes
every connection it accepts."""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from fastapi import FastAPI, Request
from tests.support.served import in_process

from enhanced_locking.api import create_app
from enhanced_locking.api.access import Caller, StillCaller, Unidentified, build_access
from enhanced_locking.api.audit import AuditTrail
from enhanced_locking.backends.audit_store import AuditQuery, MemoryAuditStore, Retention
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.factory import LockService
from enhanced_locking.provider import ConfigProvider
from enhanced_locking.types import Identity

STATIC = "tok-static-alice-6b1d"
"""A static token (tried before the TokenReview): its caller is known, its rights are not."""


def closing_listener() -> Iterator[str]:
    """A loopback listener that accepts each connection and closes it at once."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                return
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        server.shutdown(socket.SHUT_RDWR)  # wakes the accept: a bare close does not
        server.close()
        thread.join(timeout=5)
        assert not thread.is_alive(), "the listener's thread is still in its accept"


@pytest.fixture(params=["nobody-listens", "closes-at-once"])
def api_server(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "nobody-listens":
        yield "https://127.0.0.1:1"
    else:
        yield from closing_listener()


def kubernetes_config(tmp_path: Path, api_server: str, monkeypatch: pytest.MonkeyPatch,
                      ) -> EnhancedLockingConfig:
    """Kubernetes mode (and ``alice``'s static token) on a kubeconfig naming ``api_server``."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": api_server,
                                               "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "service-token"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = EnhancedLockingConfig(enabled=True, data_dir=str(tmp_path), audit_stdout=False,
                                   auth="kubernetes", auth_tokens=f"{STATIC},alice,,")
    return config


@pytest.fixture
async def served(tmp_path: Path, api_server: str, monkeypatch: pytest.MonkeyPatch
                 ) -> AsyncIterator[tuple[httpx.AsyncClient, AuditTrail]]:
    config = kubernetes_config(tmp_path, api_server, monkeypatch)
    service = LockService(ConfigProvider(config))
    trail = AuditTrail(MemoryAuditStore(Retention(timedelta(days=1), 100)),
                       stdout=lambda: False)
    app = create_app(service, audit=trail)
    async with in_process(app, raise_app_exceptions=False) as http:
        yield http, trail


async def test_a_token_review_the_api_server_does_not_answer_is_401(
    served: tuple[httpx.AsyncClient, AuditTrail],
) -> None:
    http, trail = served
    answer = await http.get("/v1/locks", headers={"Authorization": "Bearer not-static"})
    assert answer.status_code == 401, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["www-authenticate"].startswith('Bearer realm="enhanced-locking"')
    assert "error" in answer.json()
    rows = await trail.read(AuditQuery())
    assert [(row.outcome, row.status) for row in rows] == [("unauthenticated", 401)]


async def test_a_subject_access_review_the_api_server_does_not_answer_is_403(
    served: tuple[httpx.AsyncClient, AuditTrail],
) -> None:
    http, trail = served
    answer = await http.get("/v1/locks", headers={"Authorization": f"Bearer {STATIC}"})
    assert answer.status_code == 403, answer.text
    assert answer.json()["verb"] == "read" and answer.json()["identity"] == "alice"
    rows = await trail.read(AuditQuery())
    assert [(row.identity, row.verb, row.outcome, row.status) for row in rows] == [
        ("alice", "read", "denied", 403)]


@pytest.mark.parametrize("which", ["api", "kube"])
def test_the_kubeconfig_named_when_called_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    """``KUBECONFIG`` is read when the credentials are looked up: the client library's own
    default is the variable as it was when the library was first imported (here, a file that
    is not there), which a later setting would not change."""
    from kubernetes.config import kube_config

    from enhanced_locking.api.kube_access import api_client
    from enhanced_locking.kube.cluster import client_configuration

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION",
                        str(tmp_path / "gone" / "kubeconfig"))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": "service-token"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    if which == "api":
        host = api_client().configuration.host
    else:
        host = client_configuration().host
    assert host == "https://127.0.0.1:6443"


async def test_a_stream_due_for_its_recheck_while_the_review_is_not_answered_says_so(
    tmp_path: Path, api_server: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Fail closed (the stream ends), but not for "credentials that no longer identify it":
    # the review could not be asked. Before, the two read the same.
    config = kubernetes_config(tmp_path, api_server, monkeypatch)
    access = build_access(config)
    access.recheck_seconds = 0  # due at once
    app = FastAPI()
    app.state.access = SimpleNamespace(current=lambda: access)
    trail = AuditTrail(MemoryAuditStore(Retention(timedelta(days=1), 100)),
                       stdout=lambda: False)
    for token, why in (("not-static", Unidentified.NOT_ASKED),
                       (STATIC, Unidentified.NOT_IDENTIFIED)):  # alice, not bob
        request = Request({"type": "http", "app": app,
                           "headers": [(b"authorization", f"Bearer {token}".encode())]})
        caller = Caller(identity=Identity(name="bob", groups=(), method="kubernetes"),
                        peer="127.0.0.1:4711", request_id=None, access=access, audit=trail)
        assert await StillCaller(request, caller).access() is why
    access.close()
