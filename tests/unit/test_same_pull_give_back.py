"""Two requests of the same pull for the same key: the first's client goes away as its fresh
grant is answered, the second was answered in between with the same hold (the pull holds the
key already: Atlantis's re-entry). The first's give-back must not free the lock the second was
told it holds. The app driven at its ASGI seam over its own embedded (SQLite) store, the
moment of the disconnect placed after the second answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest
from tests.conftest import ServiceMaker
from tests.support.locks import request_for
from tests.support.queues import waits_begun
from tests.unit.test_client_gone import _post

from enhanced_locking.api import create_app
from enhanced_locking.api.audit import AuditTrail
from enhanced_locking.backends.audit_store import AuditQuery, build_audit_store
from enhanced_locking.types import (
    AcquireResult,
    BatchLockRequest,
    BatchResult,
    Lock,
    LockRequest,
)

REPO = "acme/twice"
PULL = {"num": 2, "url": "https://git.example/acme/twice/pull/2", "author": "bob"}
ONE = {"project": {"repoFullName": REPO, "path": "net", "projectName": "net"}, "pull": PULL,
       "user": {"username": "bob"}}
BATCH = {"locks": [{"project": {"repoFullName": REPO, "path": name, "projectName": name}}
                   for name in ("net", "dns")], "pull": PULL, "user": {"username": "bob"}}


async def _kept(keys: list[str], get: Callable[[str], Awaitable[Lock | None]],
                trail: AuditTrail) -> None:
    """Every key of ``keys`` is still the pull's, and the audit trail says a give-back kept."""
    for key in keys:
        held = await get(key)
        assert held is not None and held.pull.num == 2, (
            f"{key}: the first request's give-back freed the lock the other was answered with")
    rows = await trail.read(AuditQuery(repo=REPO, limit=10))
    assert "kept" in [row.outcome for row in rows], rows


@pytest.mark.parametrize("path", ["/v1/locks", "/v1/locks/batch"])
async def test_a_give_back_keeps_the_hold_another_request_of_the_pull_was_answered_with(
    make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch, path: str,
) -> None:
    service = await make_service(enabled=True)
    trail = AuditTrail(build_audit_store(service.provider.current.config),
                       stdout=lambda: False)
    try:
        app = create_app(service, manage_lifecycle=False, audit=trail)
        router = service.router
        body = ONE if path == "/v1/locks" else BATCH
        first_gone, second_gone = asyncio.Event(), asyncio.Event()
        first_sent: list[tuple[int, bool]] = []
        second_sent: list[tuple[int, bool]] = []
        calls = 0
        acquire, acquire_batch = router.acquire, router.acquire_batch

        async def in_between() -> None:
            # The first request was granted; before its answer goes out the second request
            # of the pull is answered, then the first's client goes away.
            nonlocal calls
            calls += 1
            if calls == 1:
                await _post(app, body, second_gone, second_sent, path=path)
                first_gone.set()

        async def acquire_then(request: LockRequest) -> AcquireResult:
            result = await acquire(request)
            await in_between()
            return result

        async def acquire_batch_then(request: BatchLockRequest) -> BatchResult:
            result = await acquire_batch(request)
            await in_between()
            return result

        monkeypatch.setattr(router, "acquire", acquire_then)
        monkeypatch.setattr(router, "acquire_batch", acquire_batch_then)
        await _post(app, body, first_gone, first_sent, path=path)

        assert second_sent == [(200, False)], "the second request was answered as holding it"
        assert [status for status, _ in first_sent] != [200], (
            "the first request's client was gone as it was answered")
        keys = [f"{REPO}/net/default/net"]
        if path == "/v1/locks/batch":
            keys.append(f"{REPO}/dns/default/dns")
        await _kept(keys, router.get, trail)
    finally:
        await trail.close()


async def test_a_batch_served_by_legacy_while_the_enhanced_store_is_down_keeps_the_hold(
    make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The single request's fresh grant comes from the legacy store (the enhanced store's
    # connection is closed, the fallback is legacy); before its answer goes out a batch of the
    # same pull is served by the legacy store too, answered with the same hold of "net" and a
    # fresh one of "dns"; then the single request's client goes away.
    service = await make_service(enabled=True, backend="boltdb", fallback="legacy")
    assert service.enhanced is not None
    await service.enhanced.backend.close()
    trail = AuditTrail(build_audit_store(service.provider.current.config),
                       stdout=lambda: False)
    try:
        app = create_app(service, manage_lifecycle=False, audit=trail)
        router = service.router
        first_gone, second_gone = asyncio.Event(), asyncio.Event()
        first_sent: list[tuple[int, bool]] = []
        second_sent: list[tuple[int, bool]] = []
        batches: list[BatchResult] = []
        acquire, acquire_batch = router.acquire, router.acquire_batch

        async def acquire_then(request: LockRequest) -> AcquireResult:
            result = await acquire(request)
            assert result.lock is not None and result.lock.backend == "legacy", result
            await _post(app, BATCH, second_gone, second_sent, path="/v1/locks/batch")
            first_gone.set()
            return result

        async def acquire_batch_then(request: BatchLockRequest) -> BatchResult:
            batches.append(await acquire_batch(request))
            return batches[-1]

        monkeypatch.setattr(router, "acquire", acquire_then)
        monkeypatch.setattr(router, "acquire_batch", acquire_batch_then)
        await _post(app, ONE, first_gone, first_sent)

        assert second_sent == [(200, False)], "the batch was answered as holding both keys"
        assert [lock.backend for lock in batches[0].locks] == ["legacy", "legacy"], batches
        assert [status for status, _ in first_sent] != [200], (
            "the single request's client was gone as it was answered")
        await _kept([f"{REPO}/net/default/net", f"{REPO}/dns/default/dns"], service.legacy.get,
                    trail)
    finally:
        await trail.close()


async def test_a_batch_granted_from_the_queue_as_its_caller_leaves_keeps_what_its_pull_held(
    make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pull 2's batch of ``net`` and ``dns`` waits (pull 1 holds ``dns``); meanwhile the
    pull's other request takes ``net``. Pull 1 lets go, the batch is granted from the queue
    (``net`` answered with the pull's hold, unchanged) and its caller leaves at that moment:
    the give-back frees ``dns``, the key the batch was granted, and not ``net``."""
    service = await make_service(enabled=True, migration_weight=100)
    enhanced = service.enhanced
    assert enhanced is not None
    batch = BatchLockRequest.model_validate({**BATCH, "wait": "30s"})
    net, dns = batch.keys
    [begun] = waits_begun(monkeypatch, 1)
    holder = await enhanced.acquire(request_for(repo=REPO, path="dns", project="dns", pull=1))
    assert holder.acquired
    waiting = asyncio.ensure_future(enhanced.acquire_batch(batch))
    async with asyncio.timeout(30):
        await begun.wait()
    own = await enhanced.acquire(request_for(repo=REPO, path="net", project="net", pull=2))
    assert own.acquired and own.fresh
    assert await enhanced.release(dns, owner=(REPO, 1)) is not None  # grants the batch
    waiting.cancel()  # its caller leaves as the grant comes
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    assert await enhanced.backend.get(net) == own.lock, "the pull's hold of net was dropped"
    assert await enhanced.backend.get(dns) is None, "the batch's grant of dns was left behind"
