"""A grant whose client is gone is given back, never held by nobody.

The app is driven at its ASGI seam, so the moment the client's disconnect arrives can be
placed exactly: before, together with, or just after the grant, one event-loop step apart.
Whatever the order, either the client is still there when the answer is sent (and the lock is
its own), or the lock is free again; and the audit trail says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import select
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import h11
import pytest
from starlette.requests import Request
from tests.conftest import ServiceMaker
from tests.support.locks import request_for
from tests.support.queues import waits_begun
from tests.support.redis_fixtures import ServerMaker
from tests.support.replicas import ReplicaSet, request_in_buckets
from uvicorn.protocols.http import h11_impl, httptools_impl
from uvicorn.protocols.http.flow_control import FlowControl

from enhanced_locking.api import create_app, disconnect
from enhanced_locking.api.audit import AuditTrail
from enhanced_locking.backends.audit_store import (
    AuditQuery,
    MemoryAuditStore,
    Retention,
    build_audit_store,
)
from enhanced_locking.backends.waiting import Notice, Waiter
from enhanced_locking.factory import LockService
from enhanced_locking.locking import queueing
from enhanced_locking.locking.visibility import WaitView
from enhanced_locking.migration import Router
from enhanced_locking.migration.routing_registry import MemoryRoutingRegistry
from enhanced_locking.types import AuditEntry, BackendUnavailable, LockRequest

REPO = "acme/gone"
BODY = {"project": {"repoFullName": REPO, "path": "net", "projectName": "net"},
        "pull": {"num": 2, "url": "https://git.example/acme/gone/pull/2", "author": "bob"},
        "user": {"username": "bob"}}


BATCH = {"locks": [{"project": {"repoFullName": REPO, "path": name, "projectName": name}}
                   for name in ("net", "dns")],
         "pull": BODY["pull"], "user": BODY["user"]}


def _scope(raw: bytes, path: str = "/v1/locks") -> dict[str, Any]:
    """The ASGI scope of a JSON ``POST`` of ``raw`` to ``path``."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 2),
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(raw)).encode())]}


def _trail(service: LockService) -> AuditTrail:
    """The service's own audit trail (the embedded store's table), stdout left out."""
    return AuditTrail(build_audit_store(service.provider.current.config),
                      stdout=lambda: False)


async def _last_of_pull_2(trail: AuditTrail) -> AuditEntry:
    """The newest entry of the requesting pull (each round's calls are its newest)."""
    entries = await trail.read(AuditQuery(repo=REPO, pull=2, limit=1))
    assert entries, "the call left no entry in the audit trail"
    return entries[0]


async def _post(app: Any, body: dict[str, Any], gone: asyncio.Event,
                sent: list[tuple[int, bool]], *, path: str = "/v1/locks",
                headers: dict[bytes, bytes] | None = None) -> None:
    raw = json.dumps(body).encode()
    scope = _scope(raw, path)
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": raw, "more_body": False}
        if not gone.is_set():  # as uvicorn's: a disconnect already seen is answered at once
            await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            sent.append((message["status"], gone.is_set()))
            if headers is not None:
                headers.update(message.get("headers", []))

    await app(scope, receive, send)


async def _granted_as_it_waits(app: Any, service: LockService, holder: LockRequest,
                               gone: asyncio.Event, sent: list[tuple[int, bool]],
                               ) -> asyncio.Future[None]:
    """Pull 2's waiting acquire (``_post``) of the key ``holder`` takes, queued behind it, and
    granted by the holder's release: the call, still to finish."""
    router = service.router
    assert (await router.acquire(holder)).acquired
    call = asyncio.ensure_future(_post(app, {**BODY, "wait": "30s"}, gone, sent))
    for _ in range(500):
        if await router.queue(holder.key):
            break
        await asyncio.sleep(0.001)
    await router.release(holder.key, owner=(REPO, 1))  # grants the waiter
    return call


@contextlib.asynccontextmanager
async def _served(make: ServiceMaker) -> AsyncIterator[tuple[LockService, AuditTrail, Any]]:
    """A service with its own audit trail and its app (closed after the block)."""
    service = await make(enabled=True)
    trail = _trail(service)
    try:
        yield service, trail, create_app(service, manage_lifecycle=False, audit=trail)
    finally:
        await trail.close()
        await service.close()


async def _round(make: ServiceMaker, steps: int, *, wait: bool) -> None:
    async with _served(make) as (service, trail, app):
        router = service.router
        holder = request_for(repo=REPO, path="net", project="net", pull=1)
        gone, sent = asyncio.Event(), list[tuple[int, bool]]()
        if wait:
            call = await _granted_as_it_waits(app, service, holder, gone, sent)
        else:  # the key is free: the answer is a grant, unless the client left first
            call = asyncio.ensure_future(_post(app, BODY, gone, sent))
        for _ in range(steps):
            await asyncio.sleep(0)
        gone.set()
        await call
        last = await _last_of_pull_2(trail)
        if not sent:  # nothing went out: the client was gone
            assert await router.get(holder.key) is None, f"{steps} steps: the lock outlived it"
            assert (last.outcome, last.status) == ("client-gone", 499), (steps, last)
            return
        status, after_gone = sent[0]
        if status == 200 and not after_gone:
            # The answer left before the client did: the lock is the client's to release.
            assert (await router.get(holder.key)) is not None
            assert (last.action, last.outcome, last.status) == ("acquire", "acquired", 200)
            await router.release(holder.key, owner=(REPO, 2))
            return
        assert status != 200, f"{steps} steps: a granted answer was sent to a client gone"
        assert await router.get(holder.key) is None, (
            f"{steps} steps: the lock outlived its client (answer {status})")
        # The trail's last word on the request is that its client left, never "acquired".
        assert (last.outcome, last.status) == ("client-gone", 499), (steps, last)


async def test_a_waiting_client_that_leaves_as_it_is_granted_holds_nothing(
    make_service: ServiceMaker,
) -> None:
    for steps in range(0, 40):
        await _round(make_service, steps, wait=True)


async def test_a_client_that_leaves_before_a_fail_fast_answer_holds_nothing(
    make_service: ServiceMaker,
) -> None:
    for steps in range(0, 10):
        await _round(make_service, steps, wait=False)


async def test_a_client_that_leaves_as_its_shared_hold_is_upgraded_leaves_its_pull_holding(
    make_service: ServiceMaker,
) -> None:
    """Pull 2 holds ``net`` shared and asks for it exclusive (fail fast); its client leaves
    after a few event-loop steps. Whatever the order, the pull still holds the key: an
    upgrade is never given back (that would free its shared hold with it). An answer that
    went out says ``Lock-Grant: upgraded``."""
    answered = 0
    for steps in range(0, 10):
        async with _served(make_service) as (service, _trail, app):
            router = service.router
            shared = request_for(repo=REPO, path="net", project="net", pull=2)
            assert (await router.acquire(shared.model_copy(update={"mode": "shared"}))).acquired
            gone, sent, headers = asyncio.Event(), list[tuple[int, bool]](), dict[bytes, bytes]()
            call = asyncio.ensure_future(_post(app, BODY, gone, sent, headers=headers))
            for _ in range(steps):
                await asyncio.sleep(0)
            gone.set()
            await call
            held = await router.get(shared.key)
            assert held is not None and held.pull.num == 2, (
                f"{steps} steps: the give-back freed the pull's hold ({sent})")
            if sent and sent[0] == (200, False):
                assert headers.get(b"lock-grant") == b"upgraded", (steps, headers)
                assert held.mode == "exclusive"
                answered += 1
            await router.release_by_pull(REPO, 2)  # the next round starts on a free store
    assert answered, "no round's answer went out before its client left"


async def _batch_round(make: ServiceMaker, steps: int, *, wait: bool, had_dns: bool) -> None:
    """The batch form: ``net`` held by pull 1 (when it waits), ``dns`` held by the batch's own
    pull before the call when ``had_dns`` (then it keeps it whatever happens)."""
    service = await make(enabled=True)
    trail = _trail(service)
    try:
        app = create_app(service, manage_lifecycle=False, audit=trail)
        router = service.router
        net = request_for(repo=REPO, path="net", project="net", pull=1)
        dns = request_for(repo=REPO, path="dns", project="dns", pull=2)
        if had_dns:
            assert (await router.acquire(dns)).acquired
        gone, sent = asyncio.Event(), list[tuple[int, bool]]()
        if wait:
            assert (await router.acquire(net)).acquired
            call = asyncio.ensure_future(_post(app, {**BATCH, "wait": "30s"}, gone, sent,
                                               path="/v1/locks/batch"))
            for _ in range(500):
                if await router.queue(net.key):
                    break
                await asyncio.sleep(0.001)
            await router.release(net.key, owner=(REPO, 1))  # grants the batch
        else:
            call = asyncio.ensure_future(_post(app, BATCH, gone, sent, path="/v1/locks/batch"))
        for _ in range(steps):
            await asyncio.sleep(0)
        gone.set()
        await call
        held_dns = await router.get(dns.key)
        if had_dns:
            assert held_dns is not None and held_dns.pull.num == 2, (
                f"{steps} steps: the pull's own lock from before was given back")
        last = await _last_of_pull_2(trail)
        if sent and sent[0] == (200, False):
            # The answer left before the client did: the locks are the client's.
            assert (await router.get(net.key)) is not None
            assert (last.action, last.outcome, last.status) == ("acquire-batch", "acquired",
                                                                200)
            return
        assert not sent or sent[0][0] != 200, (
            f"{steps} steps: a granted answer was sent to a client gone")
        assert await router.get(net.key) is None, f"{steps} steps: the batch outlived it"
        if not had_dns:
            assert held_dns is None, f"{steps} steps: the batch outlived its client"
        assert (last.outcome, last.status) == ("client-gone", 499), (steps, last)
        if last.action == "release-batch":  # given back after its grant was written
            given = [net.key] if had_dns else [net.key, dns.key]
            assert sorted((last.key or "").split(",")) == sorted(given), (steps, last)
    finally:
        for pull in (1, 2):  # the next round starts on a free store (the file is the same)
            await service.router.release_by_pull(REPO, pull)
        await trail.close()
        await service.close()


async def test_a_waiting_batch_whose_client_leaves_as_it_is_granted_holds_nothing_new(
    make_service: ServiceMaker,
) -> None:
    for steps in range(0, 40):
        await _batch_round(make_service, steps, wait=True, had_dns=steps % 2 == 1)


async def test_a_batch_whose_client_leaves_before_a_fail_fast_answer_holds_nothing_new(
    make_service: ServiceMaker,
) -> None:
    for steps in range(0, 10):
        await _batch_round(make_service, steps, wait=False, had_dns=steps % 2 == 1)


async def test_a_batch_whose_client_leaves_keeps_a_hold_its_pull_took_after_the_look(
    make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client of pull 2's batch leaves as its grant is answered. After the route's look
    at what the pull held (nothing), the pull's other request took ``dns``: the batch answered
    that hold unchanged, and giving back what the batch granted leaves it."""
    service = await make_service(enabled=True)
    router, trail = service.router, _trail(service)
    dns = request_for(repo=REPO, path="dns", project="dns", pull=2)
    gone, sent, other = asyncio.Event(), list[tuple[int, bool]](), list[Any]()
    acquire_batch = router.acquire_batch

    async def taken_by_the_pull_first(asked: Any) -> Any:
        other.append(await router.acquire(dns))  # the pull's other request
        result = await acquire_batch(asked)
        gone.set()
        return result

    monkeypatch.setattr(router, "acquire_batch", taken_by_the_pull_first)
    try:
        await _post(create_app(service, manage_lifecycle=False, audit=trail), BATCH, gone, sent,
                    path="/v1/locks/batch")
        monkeypatch.undo()
        [own] = other
        assert own.acquired and own.fresh
        assert sent == [] or sent[0][0] != 200, sent
        assert await router.get(f"{REPO}/net/default/net") is None, "the batch outlived it"
        held = await router.get(dns.key)
        assert held == own.lock, "the pull's hold of dns, taken by its other request, was lost"
    finally:
        await service.router.release_by_pull(REPO, 2)
        await trail.close()
        await service.close()


async def _on_redis_with_a_trail_in_memory(
    make_service: ServiceMaker, redis_servers: ServerMaker,
) -> tuple[Any, LockService, AuditTrail, Any]:
    """A service on a real Redis (its data kept on disk), its app, and an audit trail kept in
    memory (it must not go away with the store)."""
    server = redis_servers(persistence="aof")
    service = await make_service(enabled=True, backend="redis", redis_addr=server.addr)
    trail = AuditTrail(MemoryAuditStore(Retention(timedelta(days=1), 10_000)),
                       stdout=lambda: False)
    return server, service, trail, create_app(service, manage_lifecycle=False, audit=trail)


async def _held_on_redis(
    make_service: ServiceMaker, redis_servers: ServerMaker,
) -> tuple[Any, LockService, AuditTrail, Any, LockRequest]:
    """:func:`_on_redis_with_a_trail_in_memory`, and pull 1's request, holding ``net``."""
    server, service, trail, app = await _on_redis_with_a_trail_in_memory(make_service,
                                                                         redis_servers)
    holder = request_for(repo=REPO, path="net", project="net", pull=1)
    assert (await service.router.acquire(holder)).acquired
    return server, service, trail, app, holder


@pytest.mark.redis
async def test_a_waiting_client_whose_lock_the_store_did_not_let_go_is_audited_as_maybe_held(
    make_service: ServiceMaker, redis_servers: ServerMaker, caplog: pytest.LogCaptureFixture,
) -> None:
    """A waiting client leaves as it is granted, and the store (a real Redis, its data kept on
    disk) goes away in the same instant: neither taking the waiter out of the queue nor giving
    back its grant can be done, and the lock stays held by the pull whose client left. The
    trail's last word on the request then names why (``unavailable``) for the key; before, it
    ended at ``client-gone``, which says nothing of it is held. Whether a round's withdrawal
    or give-back failed is read from the service's log (the timing decides which part of the
    hand-over the store's going meets); a round where none failed ends at ``client-gone``, and
    the lock is free once the store answers again.
    (The trail is kept in memory here: it must not go away with the store.)"""
    server, service, trail, app = await _on_redis_with_a_trail_in_memory(make_service,
                                                                         redis_servers)
    router = service.router
    holder = request_for(repo=REPO, path="net", project="net", pull=1)
    kept = 0
    for steps in range(0, 12):
        gone, sent = asyncio.Event(), list[tuple[int, bool]]()
        call = await _granted_as_it_waits(app, service, holder, gone, sent)
        for _ in range(steps):
            await asyncio.sleep(0)
        caplog.clear()
        server.stop()  # (the loop waits for it: nothing runs in between)
        gone.set()
        await call
        server.start()
        lock = await router.get(holder.key)
        last = await _last_of_pull_2(trail)
        failed = any(line in caplog.text for line in (
            "could not withdraw waiter", f"could not give back {holder.key}"))
        if sent and sent[0] == (200, False):  # answered before the client left: its own
            assert lock is not None and lock.pull.num == 2, (steps, lock)
        elif failed:  # the service could not let it go: the trail says it may be held
            assert (last.action, last.verb, last.key, last.outcome, last.status) == (
                "release", "lock", holder.key, "unavailable", 499), (steps, last)
            assert lock is not None and lock.pull.num == 2, (steps, lock)
            kept += 1
        else:  # "client-gone": nothing is held, or soon (told "unavailable" as the store went,
            # the waiting acquire's waiter is withdrawn once the store answers again)
            assert (last.outcome, last.status) == ("client-gone", 499), (steps, last)
            for _ in range(100):
                if lock is None:
                    break
                await asyncio.sleep(0.1)
                lock = await router.get(holder.key)
            assert lock is None, (steps, lock, last)
        await router.release_by_pull(REPO, 2)
    await trail.close()
    assert kept, "no round left the lock held as its client went: the case is not made"

async def _left_waiting_with_a_request_id(
    make_service: ServiceMaker, redis_servers: ServerMaker, monkeypatch: pytest.MonkeyPatch,
    wait: str, *, stop: bool = True,
) -> tuple[LockService, AuditTrail, Any, LockRequest]:
    """Pull 2's acquire with a ``requestId``, waiting behind pull 1 on a real Redis (its data
    kept on disk), whose client has left: its waiter stays queued for the retry grace. With
    ``stop``, the store is stopped before the grace ends (the caller starts it again)."""
    waiting = asyncio.Event()
    await_turn = queueing.await_turn

    async def waits(*args: Any, **kwargs: Any) -> Any:
        waiting.set()  # (the queued caller's wait, its client not yet gone)
        return await await_turn(*args, **kwargs)

    monkeypatch.setattr(queueing, "await_turn", waits)
    server, service, trail, app = await _on_redis_with_a_trail_in_memory(make_service,
                                                                         redis_servers)
    router = service.router
    holder = request_for(repo=REPO, path="net", project="net", pull=1)
    assert (await router.acquire(holder)).acquired
    gone, sent = asyncio.Event(), list[tuple[int, bool]]()
    call = asyncio.ensure_future(_post(app, {**BODY, "wait": wait, "requestId": "r-gone"},
                                       gone, sent))
    await asyncio.wait_for(waiting.wait(), 10)
    gone.set()
    await call
    assert (await _last_of_pull_2(trail)).outcome == "client-gone"
    if stop:
        server.stop()  # before the grace (0.3 s) ends: the withdrawal finds the store away
    return service, trail, server, holder


async def _withdrawn_then_free(router: Router, holder: LockRequest) -> None:
    """Pull 2's waiter behind ``holder`` leaves the queue within 10 s, and the holder's
    release then leaves the key free: nobody holds it, the waiter was withdrawn."""
    for _ in range(100):
        if not await router.queue(holder.key):
            break
        await asyncio.sleep(0.1)
    assert not await router.queue(holder.key), "the waiter of a client gone stayed queued"
    await router.release(holder.key, owner=(REPO, 1))
    await asyncio.sleep(0.2)
    assert await router.get(holder.key) is None, "the lock went to a client gone"


@pytest.mark.redis
async def test_a_waiter_with_a_request_id_is_withdrawn_once_the_store_answers_again(
    make_service: ServiceMaker, redis_servers: ServerMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The withdrawal after the retry grace found the store away, was tried once and only
    logged: the waiter stayed queued, to be granted to the pull whose client had left. It is
    tried again until the store answers."""
    monkeypatch.setattr(queueing, "RETRY_GRACE", 0.3)
    service, trail, server, holder = await _left_waiting_with_a_request_id(
        make_service, redis_servers, monkeypatch, "30s")
    await asyncio.sleep(1.0)
    server.start()
    await _withdrawn_then_free(service.router, holder)
    await trail.close()


@pytest.mark.redis
async def test_a_waiter_with_a_request_id_that_could_not_be_withdrawn_is_audited_as_maybe_held(
    make_service: ServiceMaker, redis_servers: ServerMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store stays away past the wait's deadline and the margin: the withdrawal is given
    up, and the trail, whose last word on the request was ``client-gone``, gets a row naming
    why for its key (it may be held)."""
    monkeypatch.setattr(queueing, "RETRY_GRACE", 0.3)
    monkeypatch.setattr(queueing, "ABANDON_MARGIN", 0.2)
    _, trail, server, holder = await _left_waiting_with_a_request_id(
        make_service, redis_servers, monkeypatch, "1s")
    last = await _last_of_pull_2(trail)
    for _ in range(200):
        last = await _last_of_pull_2(trail)
        if last.outcome != "client-gone":
            break
        await asyncio.sleep(0.05)
    server.start()
    assert (last.action, last.verb, last.key, last.outcome, last.status) == (
        "release", "lock", holder.key, "unavailable", 499), last


@pytest.mark.redis
async def test_a_later_withdrawal_is_tried_until_its_bound_then_given_up_and_done(
    make_service: ServiceMaker, redis_servers: ServerMaker, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The later withdrawal of a waiter with a ``requestId`` whose client left finds the store
    (a real Redis) stopped, and it stays stopped past the bound: the wait's end plus
    ``ABANDON_MARGIN``. The withdrawal is tried again, with growing pauses, every attempt
    but the last failing by the bound; the last fails past it and is the last: the give-up is
    logged (``could not withdraw waiter ...: gave up``, with the store's error) and audited
    for the key, after the bound, and the clean-up's task has ended and is not kept."""
    monkeypatch.setattr(queueing, "RETRY_GRACE", 0.3)
    # Longer than the longest pause between attempts (1 s): a bound without the margin would
    # be given up before this one.
    monkeypatch.setattr(queueing, "ABANDON_MARGIN", 1.5)
    loop = asyncio.get_running_loop()
    bounds: list[float] = []
    tasks: set[asyncio.Task[None]] = set()
    later = queueing._later

    def noted(backend: Any, keys: tuple[str, ...], waiter_id: str, give_back: Any,
              handed: Any, caller: str, ends: float, **policy: Any) -> None:
        running = set(queueing._LATER)
        later(backend, keys, waiter_id, give_back, handed, caller, ends, **policy)
        bounds.append(ends + queueing.ABANDON_MARGIN)
        tasks.update(queueing._LATER - running)

    monkeypatch.setattr(queueing, "_later", noted)
    caplog.set_level(logging.ERROR, logger=queueing.__name__)
    service, trail, server, holder = await _left_waiting_with_a_request_id(
        make_service, redis_servers, monkeypatch, "1s", stop=False)
    assert len(bounds) == 1 and len(tasks) == 1, (bounds, tasks)
    assert service.enhanced is not None
    backend = service.enhanced.backend
    cancel, attempts = backend.cancel, list[tuple[float, float]]()

    async def timed(*args: Any, **kwargs: Any) -> Any:
        began = loop.time()
        try:
            return await cancel(*args, **kwargs)
        finally:
            attempts.append((began, loop.time()))

    monkeypatch.setattr(backend, "cancel", timed)
    (task,) = tasks
    ended: list[float] = []
    task.add_done_callback(lambda _: ended.append(loop.time()))
    server.stop()  # before the grace (0.3 s) ends, and until after the give-up
    try:
        done, _ = await asyncio.wait(tasks, timeout=30)
    finally:
        server.start()
    assert done == {task} and task.result() is None, "the withdrawal was never given up"
    assert task not in queueing._LATER, "the ended clean-up is still kept"
    bound = bounds[0]
    assert len(attempts) >= 2, f"never tried again: {attempts}"
    # Each attempt's failure was weighed after it ended: all but the last ended by the bound.
    assert all(end <= bound for _, end in attempts[:-1]), (bound, attempts)
    assert ended and ended[0] > bound, f"given up before its bound {bound}: {ended}"
    gave_up = [r for r in caplog.records if r.getMessage().startswith(
        "could not withdraw waiter") and r.getMessage().endswith("gave up")]
    assert len(gave_up) == 1 and holder.key in gave_up[0].getMessage(), caplog.text
    assert gave_up[0].exc_info and isinstance(gave_up[0].exc_info[1], BackendUnavailable)
    last = await _last_of_pull_2(trail)
    assert (last.action, last.verb, last.key, last.outcome, last.status) == (
        "release", "lock", holder.key, "unavailable", 499), last
    await trail.close()


async def _granted_and_gone(app: Any, router: Router, holder: LockRequest,
                            held: asyncio.Event) -> None:
    """Pull 2's waiting acquire of the key ``holder`` takes, held by a hook of the test's at
    some step (``held`` set there); the holder's release grants its waiter, then its client
    leaves. No granted answer goes out."""
    assert (await router.acquire(holder)).acquired
    gone, sent = asyncio.Event(), list[tuple[int, bool]]()
    call = asyncio.ensure_future(_post(app, {**BODY, "wait": "30s"}, gone, sent))
    await asyncio.wait_for(held.wait(), 10.0)
    await router.release(holder.key, owner=(REPO, 1))  # grants the waiter
    lock = await router.get(holder.key)
    assert lock is not None and lock.pull.num == 2, "the release did not grant the waiter"
    gone.set()
    await asyncio.wait_for(call, 10.0)
    assert not sent or sent[0][0] != 200, sent


@pytest.mark.redis
async def test_a_waiting_client_that_leaves_before_its_wait_begins_holds_nothing(
    make_service: ServiceMaker, redis_servers: ServerMaker,
) -> None:
    """The waiter is queued, and its acquire is still on its way to the wait (reading the
    queue for its ``queued`` event: the Redis store's enqueue does not say who is ahead) when
    the holder's release grants it and the client leaves. The waiter is withdrawn and its grant
    given back at once, and the trail ends at ``client-gone``; before, the acquire ended
    without withdrawing it, the replica still expected its notice and confirmed the grant, and
    the lock stayed held by the pull whose client had left, with no lease to end it. (The
    step is held by the locker's queue read, the hook the test controls.)"""
    _, service, trail, app = await _on_redis_with_a_trail_in_memory(make_service,
                                                                    redis_servers)
    router, locker = service.router, service.enhanced
    assert locker is not None
    holder = request_for(repo=REPO, path="net", project="net", pull=1)
    viewing = asyncio.Event()
    view = locker.queued_view

    async def held_up(key: str, waiter: Waiter, position: int) -> WaitView | None:
        viewing.set()
        await asyncio.Event().wait()  # the client leaves here
        return await view(key, waiter, position)

    locker.queued_view = held_up  # type: ignore[method-assign]
    await _granted_and_gone(app, router, holder, viewing)
    assert await router.get(holder.key) is None, "the grant outlived its client"
    last = await _last_of_pull_2(trail)
    assert (last.action, last.outcome, last.status) == ("acquire", "client-gone", 499), last
    await asyncio.sleep(0.5)  # (a grant confirmed late for nobody would show here)
    assert await router.get(holder.key) is None, "the grant was confirmed after its client left"
    await trail.close()

@pytest.mark.redis
async def test_a_grant_whose_give_back_found_the_store_away_is_given_back_once_it_answers(
    make_service: ServiceMaker, redis_servers: ServerMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client of a request with a ``requestId`` left, and its waiter was granted during
    the retry grace. The withdrawal's cancel answers with that grant, and the store (a real
    Redis, its data kept on disk) goes away right after that answer, before the give-back.
    The give-back is tried again until the store answers; before, the cancel was sent again,
    and a store whose second cancel finds the waiter gone answers nothing granted: the lock
    stayed held by the pull whose client had left, with nothing logged."""
    monkeypatch.setattr(queueing, "RETRY_GRACE", 0.3)
    service, trail, server, holder = await _left_waiting_with_a_request_id(
        make_service, redis_servers, monkeypatch, "30s", stop=False)
    assert service.enhanced is not None
    backend = service.enhanced.backend
    cancel = backend.cancel
    stopped = asyncio.Event()
    cancels = 0

    async def cancel_then_stop(*args: Any, **kwargs: Any) -> Any:
        nonlocal cancels
        cancels += 1
        answer = await cancel(*args, **kwargs)
        if answer.granted and not stopped.is_set():
            server.stop()  # between the cancel's answer and the give-back
            stopped.set()
        return answer

    monkeypatch.setattr(backend, "cancel", cancel_then_stop)
    router = service.router
    await router.release(holder.key, owner=(REPO, 1))  # grants the waiter of the client gone
    lock = await backend.get(holder.key)
    assert lock is not None and lock.pull.num == 2, lock
    await asyncio.wait_for(stopped.wait(), 10)
    await asyncio.sleep(0.5)
    server.start()
    for _ in range(100):
        with contextlib.suppress(BackendUnavailable):
            lock = await backend.get(holder.key)
            if lock is None:
                break
        await asyncio.sleep(0.1)
    assert lock is None, f"the grant of a client gone stayed held: {lock}"
    # Once answered, the cancel is not sent again: a store whose cancel forgets the waiter
    # answers a second one with nothing granted, and the grant would never be given back.
    assert cancels == 1, f"the cancel was sent {cancels} times"
    await trail.close()


def _enqueue_unanswered(service: LockService, *, batch: bool = False) -> asyncio.Event:
    """Hold back, for good, the answer of the locker's waiting enqueues (the store has queued
    the waiter; with ``batch``, a batch's); the event is set when one is held."""
    locker = service.enhanced
    assert locker is not None
    backend = locker.backend
    queued = asyncio.Event()
    enqueue = backend.acquire_batch if batch else backend.acquire_or_enqueue

    async def unanswered(*args: Any, **kwargs: Any) -> Any:
        outcome = await enqueue(*args, **kwargs)
        if kwargs.get("wait") is None:
            return outcome
        queued.set()
        await asyncio.Event().wait()  # the client leaves here
        return outcome

    if batch:
        backend.acquire_batch = unanswered  # type: ignore[method-assign]
    else:
        backend.acquire_or_enqueue = unanswered  # type: ignore[method-assign]
    return queued


@pytest.mark.redis
async def test_a_waiting_client_that_leaves_before_its_enqueue_is_answered_holds_nothing(
    make_service: ServiceMaker, redis_servers: ServerMaker,
) -> None:
    """The store queued the waiter but its answer was not read yet when the client left (the
    enqueue's answer is held back: a hook the test controls), and the holder's release granted
    it. The waiter's grant is given back as soon as the store answers; before, nobody withdrew
    it: the grant, never confirmed, stayed held by the pull whose client had left (more than
    8 s, past its claim, with no lease and nobody else asking for the key)."""
    _, service, trail, app = await _on_redis_with_a_trail_in_memory(make_service,
                                                                    redis_servers)
    router = service.router
    holder = request_for(repo=REPO, path="net", project="net", pull=1)
    queued = _enqueue_unanswered(service)
    await _granted_and_gone(app, router, holder, queued)
    last = await _last_of_pull_2(trail)
    assert (last.action, last.outcome, last.status) == ("acquire", "client-gone", 499), last
    for _ in range(50):
        if (lock := await router.get(holder.key)) is None:
            break
        await asyncio.sleep(0.1)
    assert lock is None, "the grant outlived its client"
    assert not await router.queue(holder.key)
    await trail.close()

@pytest.mark.redis
async def test_a_retry_that_took_the_waiter_over_keeps_it_when_the_first_client_leaves_early(
    make_service: ServiceMaker, redis_servers: ServerMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pull 2's acquire with a ``requestId`` is queued and still on its way to its wait (its
    queue read held by a hook the test controls) when the same request is sent again and takes
    the waiter over; then the first client leaves. The retry keeps its waiter, and the
    holder's release grants it; before, the first request cancelled the waiter at once, by its
    id whoever owned it, and the retry was answered ``cancelled``. The retry's client is
    answered with the grant (the first's leaving no longer takes away what the retry waits
    on)."""
    monkeypatch.setattr(queueing, "RETRY_GRACE", 0.3)
    _, service, trail, app = await _on_redis_with_a_trail_in_memory(make_service,
                                                                    redis_servers)
    router, locker = service.router, service.enhanced
    assert locker is not None
    holder = request_for(repo=REPO, path="net", project="net", pull=1)
    assert (await router.acquire(holder)).acquired
    viewing, views = asyncio.Event(), 0
    view = locker.queued_view

    async def first_held_up(key: str, waiter: Waiter, position: int) -> WaitView | None:
        nonlocal views
        views += 1
        if views == 1:
            viewing.set()
            await asyncio.Event().wait()  # the first client leaves here
        return await view(key, waiter, position)

    locker.queued_view = first_held_up  # type: ignore[method-assign]
    body = {**BODY, "wait": "30s", "requestId": "r-again"}
    gone, sent = asyncio.Event(), list[tuple[int, bool]]()
    first = asyncio.ensure_future(_post(app, body, gone, sent))
    await asyncio.wait_for(viewing.wait(), 10)
    stays, answered = asyncio.Event(), list[tuple[int, bool]]()
    retry = asyncio.ensure_future(_post(app, body, stays, answered))
    for _ in range(500):  # the retry's waiter is the first's, taken over
        if views >= 2:
            break
        await asyncio.sleep(0.01)
    assert views >= 2, "the retry never reached its wait"
    gone.set()
    await asyncio.wait_for(first, 10)
    await asyncio.sleep(0.8)  # past the grace: the first's withdrawal has run
    assert not retry.done(), f"the retry's wait ended: {answered}"
    assert len(await router.queue(holder.key)) == 1, "the retry's waiter was withdrawn"
    await router.release(holder.key, owner=(REPO, 1))  # grants the retry's waiter
    lock = await router.get(holder.key)
    assert lock is not None and lock.pull.num == 2, lock
    await asyncio.wait_for(retry, 20)  # (its wait's deadline is 30 s away)
    assert answered == [(200, False)], answered
    await trail.close()


@pytest.mark.redis
async def test_a_request_id_whose_client_left_before_its_enqueue_was_answered_is_withdrawn(
    make_service: ServiceMaker, redis_servers: ServerMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store queued the waiter of an acquire with a ``requestId``, but the answer was not
    read yet when the client left (a hook the test controls holds it back), and the request is
    never sent again. After the retry grace the waiter is withdrawn; before, nothing withdrew
    it, and the holder's release granted it to the pull whose client had left."""
    monkeypatch.setattr(queueing, "RETRY_GRACE", 0.3)
    _, service, trail, app, holder = await _held_on_redis(make_service, redis_servers)
    router = service.router
    queued = _enqueue_unanswered(service)
    gone, sent = asyncio.Event(), list[tuple[int, bool]]()
    call = asyncio.ensure_future(_post(app, {**BODY, "wait": "30s", "requestId": "r-never"},
                                       gone, sent))
    await asyncio.wait_for(queued.wait(), 10)
    assert len(await router.queue(holder.key)) == 1
    gone.set()
    await asyncio.wait_for(call, 10)
    await _withdrawn_then_free(router, holder)
    await trail.close()


@pytest.mark.redis
async def test_a_batch_whose_waiter_could_not_be_withdrawn_is_audited_as_maybe_held_on_every_key(
    make_service: ServiceMaker, redis_servers: ServerMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A waiting batch with a ``requestId`` was queued by the store, but its answer was not
    read yet when the client left (a hook the test controls holds it back), and the store
    (a real Redis, its data kept on disk) goes away before the retry grace ends and stays away
    past the wait's deadline and the margin. The withdrawal is given up, and the trail gets a
    row naming why for each key of the batch (either may be held); before, only the batch's
    first key was named."""
    monkeypatch.setattr(queueing, "RETRY_GRACE", 0.3)
    monkeypatch.setattr(queueing, "ABANDON_MARGIN", 0.2)
    server, service, trail, app, _ = await _held_on_redis(make_service, redis_servers)
    keys = sorted(request_for(repo=REPO, path=name, project=name, pull=2).key
                  for name in ("net", "dns"))
    queued = _enqueue_unanswered(service, batch=True)
    gone, sent = asyncio.Event(), list[tuple[int, bool]]()
    call = asyncio.ensure_future(_post(
        app, {**BATCH, "wait": "1s", "requestId": "r-batch"}, gone, sent,
        path="/v1/locks/batch"))
    await asyncio.wait_for(queued.wait(), 10)
    gone.set()
    await asyncio.wait_for(call, 10)
    assert (await _last_of_pull_2(trail)).outcome == "client-gone"
    server.stop()  # before the grace (0.3 s) ends: the withdrawal finds the store away
    rows: list[AuditEntry] = []
    for _ in range(200):
        rows = [entry for entry in await trail.read(AuditQuery(repo=REPO, pull=2, limit=10))
                if entry.outcome == "unavailable"]
        if len(rows) >= len(keys):
            break
        await asyncio.sleep(0.05)
    server.start()
    assert sorted(str(entry.key) for entry in rows) == keys, rows
    assert {(entry.action, entry.verb, entry.status) for entry in rows} == {
        ("release-batch", "lock", 499)}, rows
    await trail.close()


# --- the look at uvicorn's request cycle -----------------------------------------------------


@contextlib.asynccontextmanager
async def _transport() -> AsyncIterator[asyncio.Transport]:
    """A real transport over one end of a socket pair (a request cycle writes and pauses it)."""
    ours, theirs = socket.socketpair()
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
        asyncio.Protocol, ours)
    try:
        yield transport
    finally:
        transport.close()
        theirs.close()


def _cycles(transport: asyncio.Transport, scope: Any = None) -> list[Any]:
    """A fresh request cycle of each of uvicorn's HTTP protocols, its body already read."""
    scope = scope or {"type": "http", "method": "POST", "path": "/v1/locks", "headers": []}
    log = logging.getLogger("uvicorn.error")
    cycles: list[Any] = [
        httptools_impl.RequestResponseCycle(
            scope, transport, FlowControl(transport), log, log, False, [], asyncio.Event(),
            False, True, lambda: None),
        h11_impl.RequestResponseCycle(
            scope, h11.Connection(h11.SERVER), transport, FlowControl(transport), log, log,
            False, [], asyncio.Event(), lambda: None),
    ]
    for cycle in cycles:
        cycle.more_body = False
    return cycles


@pytest.mark.parametrize("disconnected", [False, True])
@pytest.mark.parametrize("complete", [False, True])
@pytest.mark.parametrize("message", [False, True], ids=["quiet", "event-set"])
async def test_uvicorns_cycle_is_looked_at_by_its_flags_with_the_answer_a_step_of_receive_gives(
    disconnected: bool, complete: bool, message: bool,
) -> None:
    async with _transport() as transport:
        for cycle in _cycles(transport):
            cycle.disconnected, cycle.response_complete = disconnected, complete
            if message:
                cycle.message_event.set()
            assert isinstance(cycle.receive.__self__, disconnect._UVICORN_CYCLES)
            looked = disconnect._gone_already(cycle.receive)
            assert looked is (disconnected or complete)
            assert disconnect._gone_by_step(cycle.receive) is looked, type(cycle)


async def test_a_receive_that_is_not_uvicorns_is_run_a_step() -> None:
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not gone.is_set():
            await gone.wait()
        return {"type": "http.disconnect"}

    assert disconnect._gone_already(receive) is False
    gone.set()
    assert disconnect._gone_already(receive) is True


# --- a close the kernel holds and the event loop has not read ---------------------------------


class _Unheard(asyncio.Protocol):
    """The server's side of a connection whose close its event loop has not passed on: the
    client's FIN reaches the socket, but no flag of the request's cycle changes, as when a busy
    loop is still working through the hand-offs that grant the waiter."""

    def eof_received(self) -> bool:
        return True  # the transport stays open and the cycle is not told


@contextlib.contextmanager
def _tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair of loopback TCP sockets: (the server's end, the client's end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    try:
        yield server, client
    finally:
        client.close()
        server.close()


async def test_a_waiting_client_whose_close_the_loop_has_not_read_holds_nothing(
    make_service: ServiceMaker, caplog: pytest.LogCaptureFixture,
) -> None:
    """The client hangs up; its close is on the server's socket before the waiter is granted,
    but the event loop has not read it (a loaded loop runs milliseconds behind). The grant is
    given back and no 200 goes out: before the socket was looked at, the 200 was written to the
    closed connection and the lock stayed held by nobody, with no lease to end it."""
    caplog.set_level(logging.INFO, logger="enhanced_locking")
    service = await make_service(enabled=True)
    trail = _trail(service)
    app = create_app(service, manage_lifecycle=False, audit=trail)
    router = service.router
    holder = request_for(repo=REPO, path="net", project="net", pull=1)
    assert (await router.acquire(holder)).acquired
    raw = json.dumps({**BODY, "wait": "30s"}).encode()
    with _tcp_pair() as (server, client):
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(_Unheard,
                                                                                server)
        cycle = _cycles(transport, _scope(raw))[0]  # httptools': the protocol the service runs
        cycle.body = bytearray(raw)
        cycle.message_event.set()
        written = list[bytes]()
        write = transport.write

        def recorded(data: bytes | bytearray | memoryview) -> None:
            written.append(bytes(data))
            write(data)

        transport.write = recorded  # type: ignore[method-assign]
        call = asyncio.ensure_future(cycle.run_asgi(app))
        for _ in range(500):
            if await router.queue(holder.key):
                break
            await asyncio.sleep(0.001)
        assert await router.queue(holder.key), "the request never queued"
        client.close()
        # The FIN is on the server's socket (the kernel's, not the loop's, knowledge).
        assert select.select([server], [], [], 5.0)[0], "the close never reached the server"
        await router.release(holder.key, owner=(REPO, 1))  # grants the waiter
        await asyncio.wait_for(call, 10.0)
        assert not cycle.disconnected, "the loop passed the close on: the case is not made"
        assert await router.get(holder.key) is None, (
            f"the grant outlived its client; written: {written!r}")
        assert not any(data.startswith(b"HTTP/1.1 200") for data in written), written
        assert "gave back acme/gone/net/default/net" in caplog.text
        transport.close()
    # The trail says so: the grant's row (written as it was granted), then the give-back's,
    # for the same request and caller; before, the trail ended at "acquired" with 200.
    given_back, granted = await trail.read(AuditQuery(repo=REPO, pull=2))
    await trail.close()
    assert (granted.action, granted.outcome, granted.status) == ("acquire", "acquired", 200)
    assert (given_back.action, given_back.verb, given_back.outcome, given_back.status) == (
        "release", "lock", "client-gone", 499)
    assert given_back.key == granted.key == holder.key
    assert (given_back.identity, given_back.peer, given_back.request_id) == (
        granted.identity, granted.peer, granted.request_id)


async def test_a_route_cancelled_while_its_gone_clients_work_winds_down_is_cancelled() -> None:
    # The client leaves, so the work is cancelled; while the work winds down (its withdrawal),
    # the route's own task is cancelled too (the server stopping): the route is cancelled, not
    # answered as a client gone (before, the second cancel was taken for the first).
    left = asyncio.Event()
    winding = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await left.wait()
        return {"type": "http.disconnect"}

    async def work() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            winding.set()
            await asyncio.shield(asyncio.sleep(0.2))  # the withdrawal, not to be cut short
            raise
        return "granted"

    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
    route = asyncio.ensure_future(disconnect.answer_unless_gone(request, work(), watch=True))
    await asyncio.sleep(0)
    left.set()
    await winding.wait()
    route.cancel()
    with pytest.raises(asyncio.CancelledError):
        await route


async def test_a_gone_clients_work_cancelled_alone_ends_the_route_as_client_gone() -> None:
    left = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await left.wait()
        return {"type": "http.disconnect"}

    async def work() -> str:
        await asyncio.sleep(30)
        return "granted"

    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
    route = asyncio.ensure_future(disconnect.answer_unless_gone(request, work(), watch=True))
    await asyncio.sleep(0)
    left.set()
    with pytest.raises(disconnect.ClientGone):
        await route


async def test_a_first_request_whose_client_goes_as_its_retrys_grant_comes_gives_nothing_back(
    make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pull 2's waiting acquire with a ``requestId`` is sent again while the first still
    waits (its client's first connection dropped, not yet seen): the retry takes the waiter
    over. The holder's release grants it, and the first request's client is seen gone as
    the grant comes. The lock is the retry's, answered 200, and stays held: the first
    request's answer is not a fresh grant, so its route gives nothing back. Before, both
    answers were fresh, and the first route's give-back freed the retry's lock."""
    entered = waits_begun(monkeypatch, 2)
    async with _served(make_service) as (service, _, app):
        router = service.router
        holder = request_for(repo=REPO, path="net", project="net", pull=1)
        assert (await router.acquire(holder)).acquired
        body = {**BODY, "wait": "30s", "requestId": "r-both"}
        gone, sent = asyncio.Event(), list[tuple[int, bool]]()
        first = asyncio.ensure_future(_post(app, body, gone, sent))
        await asyncio.wait_for(entered[0].wait(), 10)
        retry_sent = list[tuple[int, bool]]()
        retry = asyncio.ensure_future(_post(app, body, asyncio.Event(), retry_sent))
        await asyncio.wait_for(entered[1].wait(), 10)
        assert service.enhanced is not None
        grants = service.enhanced.backend.grants
        deliver = grants.deliver

        def told(waiter_id: str, notice: Notice) -> None:
            deliver(waiter_id, notice)
            if notice.granted:
                gone.set()  # the first client is seen gone as the grant comes

        monkeypatch.setattr(grants, "deliver", told)
        await router.release(holder.key, owner=(REPO, 1))  # grants the retry's waiter
        await asyncio.wait_for(first, 30)
        await asyncio.wait_for(retry, 30)
        assert retry_sent == [(200, False)], retry_sent
        held = await router.get(holder.key)
        assert held is not None and held.pull.num == 2, "the retry's lock was given back"


async def _given_back_as_net_is_held_again(
    app: Any, router: Router, monkeypatch: pytest.MonkeyPatch, body: dict[str, Any], *,
    path: str = "/v1/locks",
) -> tuple[list[Any], list[tuple[int, bool]]]:
    """Pull 2's acquire of ``body`` (fail fast), its client gone as the answer goes out; before
    the route's give-back reaches ``net``, the answered hold goes and the pull takes ``net``
    again (a retry of the request, say, answered fresh). The newer hold and what was sent."""
    release = router.release
    net = request_for(repo=REPO, path="net", project="net", pull=2)
    newer: list[Any] = []

    async def held_again(key: str, **how: Any) -> Any:
        if key == net.key and not newer:
            await release(key, owner=(REPO, 2))
            again = await router.acquire(net)
            assert again.acquired and again.fresh and again.lock is not None, again
            newer.append(again.lock)
        return await release(key, **how)

    monkeypatch.setattr(router, "release", held_again)
    gone, sent = asyncio.Event(), list[tuple[int, bool]]()
    gone.set()  # the client is gone as the answer goes out
    await asyncio.wait_for(_post(app, body, gone, sent, path=path), 10)
    monkeypatch.setattr(router, "release", release)
    return newer, sent


async def test_a_grant_given_back_for_a_gone_client_leaves_a_newer_hold_of_its_pull_held(
    make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pull 2's fail-fast acquire is granted, and its client is gone as the answer goes out.
    Before the route's give-back reaches the store, the grant was let go and the same pull
    holds the key again under a new fencing token (a retry of the request, say, answered
    fresh). The give-back frees only the hold it was answered with: the newer one stays, and
    the trail says the answered one was not held (``not-owned``). Before, the give-back
    released by owner alone and freed the newer hold."""
    async with _served(make_service) as (service, trail, app):
        router = service.router
        newer, sent = await _given_back_as_net_is_held_again(app, router, monkeypatch, BODY)
        assert newer, "the route gave nothing back"
        assert sent and sent[0][0] == 499, sent
        held = await router.get(newer[0].key)
        assert held is not None and held.fencing_token == newer[0].fencing_token, (
            "the give-back freed the pull's newer hold")
        last = await _last_of_pull_2(trail)
        assert (last.action, last.outcome, last.status) == ("release", "not-owned", 499), last


async def test_a_batch_given_back_for_a_gone_client_leaves_a_newer_hold_of_its_pull_held(
    make_service: ServiceMaker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch form: pull 2's batch (``net``, ``dns``) is granted and its client is gone as
    the answer goes out. Before the give-back reaches ``net``, the answered hold went and the
    pull holds ``net`` again under a new fencing token: the give-back frees ``dns`` (still the
    answered hold) and leaves the newer ``net`` held, its row saying ``net`` was not held
    (``not-owned``). Before, the batch's give-back released by owner alone and freed it."""
    async with _served(make_service) as (service, trail, app):
        router = service.router
        net = request_for(repo=REPO, path="net", project="net", pull=2)
        dns = request_for(repo=REPO, path="dns", project="dns", pull=2)
        newer, sent = await _given_back_as_net_is_held_again(app, router, monkeypatch, BATCH,
                                                             path="/v1/locks/batch")
        assert newer, "the route gave nothing back"
        assert sent and sent[0][0] == 499, sent
        held = await router.get(net.key)
        assert held is not None and held.fencing_token == newer[0].fencing_token, (
            "the batch's give-back freed the pull's newer hold")
        assert await router.get(dns.key) is None, "the answered dns hold was not given back"
        rows = await trail.read(AuditQuery(repo=REPO, pull=2, limit=5))
        outcomes = {(row.action, row.key, row.outcome) for row in rows
                    if row.action == "release-batch"}
        assert ("release-batch", net.key, "not-owned") in outcomes, rows


async def test_a_grant_on_both_sides_of_a_moving_key_is_given_back_on_both(
    data_dir: Path,
) -> None:
    """A key moving back to legacy (weight 50 to 0, a replica not yet told) is taken on both
    sides, and the answer is legacy's lock. Its client is gone as the answer goes out: the
    give-back frees both halves. Before, it released by legacy's fencing token, which the
    enhanced side refused (not its hold's), and the enhanced half stayed held by a pull
    whose client was gone."""
    async with ReplicaSet(data_dir, MemoryRoutingRegistry()) as replicas:
        a = await replicas.start("a", migration_weight=50)
        await replicas.start("b", migration_weight=50)  # not yet told of the move below
        await replicas.tick()
        moving = request_in_buckets(0, 5000, repo=REPO, pull=2)
        await replicas.set_weight(0, on=[a])  # b has not heard of it yet
        await replicas.tick()
        plan = a.migration.transitions.plan(moving.key)
        assert plan.side == "legacy" and plan.both
        trail = _trail(a)
        try:
            app = create_app(a, manage_lifecycle=False, audit=trail)
            body = {"project": moving.project.model_dump(mode="json", by_alias=True),
                    "workspace": moving.workspace,
                    "pull": BODY["pull"], "user": BODY["user"]}
            gone, sent = asyncio.Event(), list[tuple[int, bool]]()
            gone.set()  # the client is gone as the answer goes out
            await asyncio.wait_for(_post(app, body, gone, sent), 10)
        finally:
            await trail.close()
        assert sent and sent[0][0] == 499, sent
        assert await a.legacy.get(moving.key) is None, "legacy's half was left held"
        assert a.enhanced is not None
        assert await a.enhanced.get(moving.key) is None, "the enhanced half was left held"
