"""An open event stream follows the access control in force, not the one it opened under: the
app served by uvicorn on a loopback port over its own embedded (SQLite) store, static access
control, and a config layer (as a LockPolicy sets one) that takes the viewer's role away while
the viewer's stream is open. From then the stream brings none of the events the viewer may no
longer read, as ``GET /v1/locks`` refuses it (docs/08-access.md, api/sse.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from tests.support.service import free_port

from enhanced_locking.api import create_app, sse
from enhanced_locking.api.static_access import RECHECK_SECONDS
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import FOLLOWING_COMMENT
from enhanced_locking.factory import LockService
from enhanced_locking.provider import ConfigProvider
from enhanced_locking.types import LockRequest

VIEWER, ADMIN = "tok-viewer-8d2f6a", "tok-admin-1c7e4b"
ROLES = "viewer=user:vera;admin=user:ada"


def _request(path: str) -> LockRequest:
    return LockRequest.model_validate({"project": {"repoFullName": "acme/infra", "path": path},
                                       "pull": {"num": 7}})


def _serving(tmp_path: Path) -> contextlib.AbstractAsyncContextManager[tuple[LockService, str]]:
    return _serving_config(EnhancedLockingConfig(
        enabled=True, data_dir=str(tmp_path), audit_stdout=False, auth="static",
        auth_tokens=f"{VIEWER},vera,,\n{ADMIN},ada,,", auth_roles=ROLES))


@contextlib.asynccontextmanager
async def _serving_config(
    config: EnhancedLockingConfig,
) -> AsyncIterator[tuple[LockService, str]]:
    service = LockService(ConfigProvider(config))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        assert not serving.done(), "the server did not start"
        await asyncio.sleep(0.01)
    try:
        yield service, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


@dataclass(frozen=True)
class Event:
    type: str
    key: str | None


async def _events(stream: httpx.Response, into: asyncio.Queue[Event | None],
                  following: asyncio.Event) -> None:
    """Each event of the stream: its type and the key its ``data:`` names; ``None`` once the
    stream ended."""
    async for line in stream.aiter_lines():
        if line == f": {FOLLOWING_COMMENT}":
            following.set()
        elif line.startswith("data:"):
            data = json.loads(line.removeprefix("data:"))
            await into.put(Event(type=data["type"], key=data.get("key")))
    await into.put(None)


async def _next(events: asyncio.Queue[Event | None], within: float) -> Event | None:
    try:
        return await asyncio.wait_for(events.get(), within)
    except TimeoutError:
        return None


async def _until(events: asyncio.Queue[Event | None], key: str, within: float) -> list[Event]:
    """The events read up to and including the first about ``key`` (fails after ``within``)."""
    seen: list[Event] = []
    async with asyncio.timeout(within):
        while not seen or seen[-1].key != key:
            event = await events.get()
            assert event is not None, f"the stream ended after {seen}"
            seen.append(event)
    return seen


@pytest.mark.timeout(60)
async def test_a_role_taken_away_stops_the_events_of_an_open_stream(tmp_path: Path) -> None:
    async with _serving(tmp_path) as (service, url), httpx.AsyncClient(
            base_url=url, timeout=10, headers={"Authorization": f"Bearer {VIEWER}"}) as viewer:
        events: asyncio.Queue[Event | None] = asyncio.Queue()
        following = asyncio.Event()
        async with viewer.stream("GET", "/v1/events") as stream:
            assert stream.status_code == 200
            reader = asyncio.ensure_future(_events(stream, events, following))
            await asyncio.wait_for(following.wait(), 10)
            before = await service.router.acquire(_request("before"))
            assert before.acquired and before.lock is not None
            assert await _next(events, 10) == Event("acquired", before.lock.key), (
                "the viewer reads while it may")

            await service.provider.set_layer("policy", {"auth_roles": "admin=user:ada"})
            assert (await viewer.get("/v1/locks")).status_code == 403
            after = await service.router.acquire(_request("after"))
            assert after.acquired and after.lock is not None
            assert await _next(events, 1.0) is None, "the stream kept the rights it opened with"

            await service.provider.set_layer("policy", None)  # the role is back
            again = await service.router.acquire(_request("again"))
            assert again.acquired and again.lock is not None
            # The stream flowed past the lock taken while the role was away (events come in
            # their order): had that one leaked, however late, it would be among these.
            seen = await _until(events, again.lock.key, 10)
            assert after.lock.key not in {event.key for event in seen}, seen
            assert sorted(event.type for event in seen) == ["acquired", "config-applied"]
            assert events.empty(), [events.get_nowait() for _ in range(events.qsize())]
            reader.cancel()


CI_OLD, CI_NEW, VERA = "tok-ci-old-5b91c3", "tok-ci-new-0e4d72", "tok-vera-3a6f18"


@dataclass
class TwoStreams:
    """The service, a client of it, the tokens file it reads, and the open streams of ``ci``
    (opened with ``CI_OLD``) and ``vera``: their events, and the tasks reading them."""

    service: LockService
    http: httpx.AsyncClient
    tokens: Path
    ci: asyncio.Queue[Event | None]
    vera: asyncio.Queue[Event | None]
    readers: Sequence[asyncio.Future[None]]


@contextlib.asynccontextmanager
async def _ci_and_vera(tmp_path: Path) -> AsyncIterator[TwoStreams]:
    """Viewers ``ci`` and ``vera`` from a tokens file, each with a stream following."""
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f"{CI_OLD},ci,,\n{VERA},vera,,\n")
    config = EnhancedLockingConfig(
        enabled=True, data_dir=str(tmp_path), audit_stdout=False, auth="static",
        auth_tokens_file=str(tokens), auth_roles="viewer=user:ci,user:vera")
    async with _serving_config(config) as (service, url), httpx.AsyncClient(
            base_url=url, timeout=10) as http:
        ci: asyncio.Queue[Event | None] = asyncio.Queue()
        vera: asyncio.Queue[Event | None] = asyncio.Queue()
        ci_following, vera_following = asyncio.Event(), asyncio.Event()
        async with (http.stream("GET", "/v1/events",
                                headers={"Authorization": f"Bearer {CI_OLD}"}) as ci_stream,
                    http.stream("GET", "/v1/events",
                                headers={"Authorization": f"Bearer {VERA}"}) as vera_stream):
            assert ci_stream.status_code == vera_stream.status_code == 200
            readers = [asyncio.ensure_future(_events(ci_stream, ci, ci_following)),
                       asyncio.ensure_future(_events(vera_stream, vera, vera_following))]
            await asyncio.wait_for(ci_following.wait(), 10)
            await asyncio.wait_for(vera_following.wait(), 10)
            yield TwoStreams(service, http, tokens, ci, vera, readers)


@pytest.mark.timeout(60)
async def test_a_token_withdrawn_from_the_tokens_file_ends_its_open_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``ci`` keeps its role under a new token; the token its stream opened with is removed
    from the tokens file: new requests with it get 401 after the file's recheck, and its open
    stream ends at the next event, without it. A stream whose token stays keeps flowing.
    The streams' recheck timer is held off (its floor an hour), so only the event can end it:
    the timer's path is the idle stream's test below."""
    monkeypatch.setattr(sse, "RECHECK_FLOOR_SECONDS", 3600.0)
    async with _ci_and_vera(tmp_path) as on:
        service, http, tokens, ci, vera, readers = (
            on.service, on.http, on.tokens, on.ci, on.vera, on.readers)
        as_ci = {"Authorization": f"Bearer {CI_OLD}"}
        before = await service.router.acquire(_request("before"))
        assert before.acquired and before.lock is not None
        for queue in (ci, vera):
            assert await _next(queue, 10) == Event("acquired", before.lock.key)

        tokens.write_text(f"{CI_NEW},ci,,\n{VERA},vera,,\n{'#' * 8}\n")
        for _ in range(100):  # the file's recheck (a second) makes the old token unknown
            if (await http.get("/v1/locks", headers=as_ci)).status_code == 401:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the withdrawn token was still accepted")
        assert (await http.get("/v1/locks", headers={
            "Authorization": f"Bearer {CI_NEW}"})).status_code == 200, "ci keeps its role"
        await asyncio.sleep(RECHECK_SECONDS)  # the stream's own recheck time passed too
        assert not readers[0].done(), "the stream ended before an event (the timer is off)"

        after = await service.router.acquire(_request("after"))
        assert after.acquired and after.lock is not None
        assert await _next(vera, 10) == Event("acquired", after.lock.key), (
            "a stream whose token stays keeps flowing")
        assert await _next(ci, 10) is None, "the stream outlived its withdrawn token"
        await asyncio.wait_for(readers[0], 10)
        assert ci.empty()
        readers[1].cancel()


@pytest.mark.timeout(60)
async def test_an_idle_stream_ends_once_its_token_is_withdrawn_without_waiting_for_an_event(
    tmp_path: Path,
) -> None:
    """No event is published after ``ci``'s token leaves the tokens file: its stream still
    ends, at the stream's own recheck, while a stream whose token stays stays open."""
    async with _ci_and_vera(tmp_path) as on:
        on.tokens.write_text(f"{CI_NEW},ci,,\n{VERA},vera,,\n")
        # The file's recheck (a second), then the stream's own (a second, at most every half
        # second): well within ten seconds, with no event to carry the recheck.
        await asyncio.wait_for(on.readers[0], 10)
        assert await on.ci.get() is None and on.ci.empty()
        assert not on.readers[1].done(), "a stream whose token stays stays open"
        on.readers[1].cancel()
