"""Overload on one replica: a flood of waiting acquires on one held key.

Hundreds of clients ask for the same held key with a long ``wait`` while the event loop of the
one ``enhanced-locking serve`` process is saturated (the heartbeat is short, so a stall of a
fraction of a second is longer than a heartbeat). A waiting request either waits its turn or
gets an honest refusal (``timeout``, ``queue_full``, ``unavailable``, or 503 with
``Retry-After`` when the service sheds load): never ``held``. Some clients hang up while they
wait or while their answer is on its way: a grant whose answer had not left the server is given
back by the service, and an answer that had left it reaches the client all the same (it hung
up its sending side only), which releases the lock like every other client; so at the end no
lock is left held. The history checker finds no key granted twice.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import httpx
from tests.conftest import ServiceFactory
from tests.history import History, Hold
from tests.support.raw_http import parse

REPO = "acme/flood"
KEY = f"{REPO}/net/default/net"
WAITERS = 600
LEAVERS = 60
"""Clients that disconnect at a random moment (waiting, or just as they are granted)."""

FLAGS = ("--enhanced-locking-enabled", "--enhanced-locking-max-timeout=5m",
         "--enhanced-locking-replica-heartbeat=100ms")
"""A heartbeat of 100 ms: the saturated loop runs late by more than that, as a loop under
2,000 waiters ran late by more than the default heartbeat."""

HONEST = {"timeout", "queue_full", "unavailable"}


def _body(pull: int, *, wait: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "project": {"repoFullName": REPO, "path": "net", "projectName": "net"},
        "pull": {"num": pull, "url": f"https://git.example/{REPO}/pull/{pull}",
                 "author": f"user{pull}"},
        "user": {"username": f"user{pull}"},
    }
    if wait is not None:
        body["wait"] = wait
    return body


async def _waiter(http: httpx.AsyncClient, pull: int, history: History,
                  answers: dict[str, int]) -> None:
    response = await http.post("/v1/locks", json=_body(pull, wait="100s"))
    await _settle(http, pull, response, history, answers)


async def _settle(http: httpx.AsyncClient, pull: int, response: httpx.Response,
                  history: History, answers: dict[str, int]) -> None:
    if response.status_code == 503:
        answers["503"] = answers.get("503", 0) + 1
        if "retry-after" not in response.headers:
            history.errors.append(f"pull {pull}: 503 without Retry-After: {response.text}")
        return
    answer = response.json()
    if response.status_code == 409:
        answers[answer["reason"]] = answers.get(answer["reason"], 0) + 1
        history.refusals[answer["reason"]] += 1
        return
    if response.status_code != 200:
        history.errors.append(f"pull {pull}: HTTP {response.status_code} {answer}")
        return
    answers["granted"] = answers.get("granted", 0) + 1
    start = time.monotonic()
    lock = answer["lock"]
    end = time.monotonic()
    history.record(Hold(f"pull-{pull}", lock["key"], lock["fencingToken"], start, end))
    released = await http.delete("/v1/locks/by-key", params={"key": KEY, "pull": pull})
    if released.status_code != 200:
        history.errors.append(f"pull {pull}: release answered {released.status_code} "
                              f"{released.text}")


async def _leaver(http: httpx.AsyncClient, pull: int, after: float, history: History,
                  answers: dict[str, int], late: list[int]) -> None:
    """Ask, then hang up after ``after`` seconds unless the answer came first.

    On a connection of its own, so the hang-up is seen from both sides: it is a half close (the
    client's FIN, which the server takes as the client gone, as it does a full close), and the
    client still reads what the server had sent before it saw the close. That is the service's
    promise, in every timing: an answer that left the server before it knew the client was
    gone is the client's (a grant then is its lock, released like any), and a client that
    left with no answer sent holds nothing."""
    body = json.dumps(_body(pull, wait="100s")).encode()
    reader, writer = await asyncio.open_connection(http.base_url.host, http.base_url.port)
    writer.write(b"POST /v1/locks HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                 % (http.base_url.netloc, len(body), body))
    received = bytearray()

    async def read() -> None:  # to the end: "connection: close"
        while chunk := await reader.read(65536):
            received.extend(chunk)

    reading = asyncio.ensure_future(read())
    done, _ = await asyncio.wait({reading}, timeout=after)
    if not done:
        writer.write_eof()
        await asyncio.wait_for(reading, timeout=30)
    writer.close()
    response = parse(bytes(received)) if received else None
    if not done:
        late.append(response.status_code if response is not None else 0)
    if response is None or response.status_code == 499:  # the server saw it go first
        answers["left"] = answers.get("left", 0) + 1
        return
    await _settle(http, pull, response, history, answers)


async def test_a_flood_of_waiting_acquires_waits_or_is_refused_honestly(
    service_process: ServiceFactory,
) -> None:
    served = service_process(*FLAGS)
    history = History()
    answers: dict[str, int] = {}
    late: list[int] = []  # what each leaver got after it hung up (0: nothing)
    # Idle connections are dropped well before the server's keep-alive timeout, so a request
    # never goes out on a connection the server is closing.
    limits = httpx.Limits(max_connections=WAITERS + LEAVERS + 10,
                          max_keepalive_connections=WAITERS + LEAVERS + 10, keepalive_expiry=1.0)
    async with httpx.AsyncClient(base_url=served.url, limits=limits,
                                 timeout=httpx.Timeout(120.0)) as http:
        held = await http.post("/v1/locks", json=_body(1, wait=None))
        assert held.status_code == 200, held.text
        rng = random.Random(16)
        tasks = [asyncio.ensure_future(_waiter(http, 1000 + n, history, answers))
                 for n in range(WAITERS)]
        tasks += [asyncio.ensure_future(_leaver(http, 5000 + n, rng.uniform(0.5, 12.0),
                                                history, answers, late))
                  for n in range(LEAVERS)]
        await asyncio.sleep(2.0)
        released = await http.delete("/v1/locks/by-key", params={"key": KEY, "pull": 1})
        assert released.status_code == 200, released.text
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=110)
        await asyncio.sleep(0.5)  # the last disconnects reach the server
        left = (await http.get("/v1/locks", params={"repo": REPO})).json()["locks"]
        queue = (await http.get("/v1/queue", params={"key": KEY})).json()
        migration = (await http.get("/v1/migration")).json()
    assert "held" not in answers, (
        f"waiting requests were refused as held: {answers}; routing {migration['routing']}")
    assert set(answers) <= HONEST | {"granted", "left", "503"}, answers
    assert left == [], (f"orphaned grants (their clients were gone): {left}; answers {answers}; "
                        f"answered after hanging up: {late}")
    assert queue["waiters"] == [], queue
    history.assert_consistent(min_holds=WAITERS // 2)


