"""Slow and greedy readers of ``GET /v1/events`` against a real ``enhanced-locking serve``.

A reader that stops reading while thousands of events are published gets, once it reads
again, an unbroken run of events and then a ``gap`` event, and its stream ends: never a
stream with silent holes. A ``Last-Event-ID`` asking for more than the bound gets a ``gap`` and
then live events. Streams are capped per client address (429) and in total (503).
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import httpx
from tests.conftest import ServiceFactory

from enhanced_locking.events import FOLLOWING_COMMENT

REPO = "acme/events"
MAX_LAG = 500
KEYS_PER_BATCH = 40
FOLLOWING = f": {FOLLOWING_COMMENT}"
"""The stream's line saying it follows the bus (sent once, before its first event)."""


def _batch_body(pull: int) -> dict[str, Any]:
    return {"locks": [{"project": {"repoFullName": REPO, "path": f"p{i}", "projectName": f"p{i}"}}
                      for i in range(KEYS_PER_BATCH)],
            "pull": {"num": pull, "url": f"https://git.example/{REPO}/pull/{pull}"},
            "user": {"username": "ci"}}


async def _publish(http: httpx.AsyncClient, rounds: int) -> None:
    """``rounds`` times: lock and release ``KEYS_PER_BATCH`` keys (two events per key)."""
    keys = [f"{REPO}/p{i}/default/p{i}" for i in range(KEYS_PER_BATCH)]
    for n in range(rounds):
        assert (await http.post("/v1/locks/batch", json=_batch_body(7))).status_code == 200
        released = await http.delete("/v1/locks/batch", params={"key": keys, "pull": 7})
        assert released.status_code == 200, released.text
        if n % 5 == 4:
            await asyncio.sleep(0)


def _frames(raw: bytes) -> list[dict[str, str]]:
    """The SSE frames in a raw HTTP response (headers and chunked framing skipped)."""
    body = raw.split(b"\r\n\r\n", 1)[1].decode(errors="replace")
    frames, fields = [], {}
    for line in body.replace("\r\n", "\n").split("\n"):
        if line.startswith(("id:", "event:", "data:")):
            name, _, value = line.partition(":")
            fields[name] = value.strip()
        elif line == "" and fields:
            frames.append(fields)
            fields = {}
    return frames


def _stalled_reader(url: str) -> tuple[socket.socket, bytes]:
    """A raw ``GET /v1/events`` with a small receive buffer, read up to the line saying it
    follows the bus (returned with the socket); from then on it reads nothing."""
    host, port = url.removeprefix("http://").split(":")
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect((host, int(port)))
    stalled.sendall(f"GET /v1/events?repo={REPO} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    stalled.settimeout(30)
    head = b""
    while FOLLOWING.encode() not in head:
        chunk = stalled.recv(1)
        assert chunk, head
        head += chunk
    return stalled, head


async def _follow(url: str, ids: list[str], ready: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=None) as http, \
            http.stream("GET", "/v1/events", params={"repo": REPO}) as response:
        async for line in response.aiter_lines():
            if line == FOLLOWING:  # every event published from now on is on this stream
                ready.set()
            if line.startswith("id:"):
                ids.append(line.partition(":")[2].strip())


async def _published_and_followed(url: str, rounds: int) -> tuple[asyncio.Future[None],
                                                                 list[str]]:
    """A reader that keeps up follows while :func:`_publish` runs ``rounds`` times; it has
    every event (asserted) when this returns the still open reader and its ids."""
    ids: list[str] = []
    ready = asyncio.Event()
    follower = asyncio.ensure_future(_follow(url, ids, ready))
    await asyncio.wait_for(ready.wait(), 10)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        await _publish(http, rounds=rounds)
    published = rounds * KEYS_PER_BATCH * 2
    for _ in range(400):
        if len(ids) >= published:
            break
        await asyncio.sleep(0.05)
    assert len(ids) == published, "a reader that keeps up gets every event"
    return follower, ids


async def test_a_stalled_reader_gets_a_gap_and_is_cut_off_never_silent_holes(
    service_process: ServiceFactory,
) -> None:
    served = service_process("--enhanced-locking-enabled",
                             f"--enhanced-locking-events-max-lag={MAX_LAG}")
    stalled, head = _stalled_reader(served.url)
    # 4,800 events while one reader reads nothing
    fast, fast_ids = await _published_and_followed(served.url, rounds=60)
    fast.cancel()
    published = 60 * KEYS_PER_BATCH * 2

    stalled.settimeout(10)
    raw = head
    while chunk := stalled.recv(65536):  # reading again, until the server ends the stream
        raw += chunk
    stalled.close()
    frames = _frames(raw)
    events = [f for f in frames if f.get("event") != "gap"]
    gaps = [f for f in frames if f.get("event") == "gap"]
    got = [f["id"] for f in events]
    assert got == fast_ids[:len(got)], "the events a slow reader gets have no holes"
    assert len(got) < published, "the stalled reader could not have taken every event"
    assert len(gaps) == 1 and frames[-1] is gaps[0], [f.get("event") for f in frames[-3:]]
    gap = json.loads(gaps[0]["data"])
    assert gap["reason"] == "behind" and gap["after"] == got[-1] if got else True


async def test_a_resume_asking_for_more_than_the_bound_gets_a_gap_then_live_events(
    service_process: ServiceFactory,
) -> None:
    served = service_process("--enhanced-locking-enabled",
                             f"--enhanced-locking-events-max-lag={MAX_LAG}")
    ids: list[str] = []
    ready = asyncio.Event()
    follower = asyncio.ensure_future(_follow(served.url, ids, ready))
    await asyncio.wait_for(ready.wait(), 10)
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as http:
        await _publish(http, rounds=10)  # 800 events
        for _ in range(100):
            if len(ids) >= 800:
                break
            await asyncio.sleep(0.05)
        follower.cancel()
        seen: list[tuple[str, str]] = []
        async with http.stream("GET", "/v1/events", headers={"Last-Event-ID": ids[0]},
                               params={"repo": REPO}) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            kind = ""
            async for line in lines:
                if line.startswith("event:"):
                    kind = line.partition(":")[2].strip()
                elif line.startswith("data:"):
                    seen.append((kind, line.partition(":")[2].strip()))
                    if kind == "gap":
                        await _publish(http, rounds=1)  # a live event after the gap
                    elif kind:
                        break
    assert seen[0][0] == "gap" and json.loads(seen[0][1])["reason"] == "replay"
    assert json.loads(seen[1][1])["id"] not in ids, "after the gap: live events, no replay"

    resumed: list[str] = []
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as http, \
            http.stream("GET", "/v1/events", headers={"Last-Event-ID": ids[-MAX_LAG // 2]},
                        params={"repo": REPO}) as response:
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                assert "gap" not in line, "a replay within the bound has no gap"
            if line.startswith("id:"):
                resumed.append(line.partition(":")[2].strip())
                if len(resumed) == MAX_LAG // 2 - 1:
                    break
    assert resumed == ids[-MAX_LAG // 2 + 1:]


async def _open(url: str, source: str) -> tuple[httpx.AsyncClient, httpx.Response]:
    http = httpx.AsyncClient(base_url=url, timeout=10,
                             transport=httpx.AsyncHTTPTransport(local_address=source))
    response = await http.send(http.build_request("GET", "/v1/events"), stream=True)
    return http, response


async def test_event_streams_are_capped_per_client_and_in_total(
    service_process: ServiceFactory,
) -> None:
    served = service_process("--enhanced-locking-events-max-streams=3",
                             "--enhanced-locking-events-max-streams-per-client=2")
    opened = [await _open(served.url, "127.0.0.1"), await _open(served.url, "127.0.0.1")]
    try:
        assert [r.status_code for _, r in opened] == [200, 200]
        http, third = await _open(served.url, "127.0.0.1")
        await third.aread()
        await http.aclose()
        assert third.status_code == 429 and third.headers["retry-after"]
        assert "events-max-streams-per-client" in third.json()["error"]

        opened.append(await _open(served.url, "127.0.0.2"))
        assert opened[-1][1].status_code == 200
        http, fourth = await _open(served.url, "127.0.0.3")
        await fourth.aread()
        await http.aclose()
        assert fourth.status_code == 503 and fourth.headers["retry-after"]
        assert "events-max-streams" in fourth.json()["error"]

        client, first = opened.pop(0)  # a stream that ends gives its place back
        await first.aclose()
        await client.aclose()
        for _ in range(50):
            http, again = await _open(served.url, "127.0.0.3")
            if again.status_code == 200:
                opened.append((http, again))
                break
            await again.aread()
            await http.aclose()
            await asyncio.sleep(0.1)
        assert opened[-1][1] is again and again.status_code == 200
    finally:
        for client, response in opened:
            await response.aclose()
            await client.aclose()


async def test_open_streams_end_cleanly_when_the_service_stops(
    service_process: ServiceFactory,
) -> None:
    """SIGTERM with a reader that keeps up and one that reads nothing (events waiting for it,
    fewer than the bound): the service exits 0 well within a pod's grace (30 s, as long as a
    send may wait for a stalled reader), the reader that keeps up has every event and then the
    stream's proper end (an incomplete chunked body would raise), and nothing is logged as a
    stack trace."""
    served = service_process("--enhanced-locking-enabled",
                             f"--enhanced-locking-events-max-lag={MAX_LAG * 4}")
    stalled, _ = _stalled_reader(served.url)
    # 1,600 events: under the bound, none is a gap
    follower, _ = await _published_and_followed(served.url, rounds=20)
    try:
        code = await asyncio.to_thread(served.stop, grace=25)
        assert code == 0, served.output()
        await asyncio.wait_for(follower, 20)  # ended, not broken off
    finally:
        stalled.close()
        follower.cancel()
    assert "Traceback" not in served.stderr(), served.stderr()
