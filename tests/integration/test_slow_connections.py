"""Slow and half-sent requests against a real ``enhanced-locking serve`` at a low file limit.

1,100 connections that send half a request and stop, against a process whose open-file limit
is 1,024: the service closes the connections beyond its limit at once and the half-sent ones
at their deadline, ``/healthz`` answers again right after, nothing is logged per attempt, and
the process lives on. A body that stops half-way is cut at its own deadline. Beyond
``http-max-in-flight``, requests are shed with 503 and ``Retry-After`` while the held lock and
the queued requests stay as they were.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from tests.conftest import ServiceFactory
from tests.support.service import ServiceProcess

SLOW = 1_100
FILE_LIMIT = 1_024


@contextmanager
def _file_limit(limit: int) -> Iterator[None]:
    """Processes started inside inherit an open-file limit of ``limit``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _slow(url: str, count: int) -> list[socket.socket]:
    host, port = url.removeprefix("http://").split(":")
    opened = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect((host, int(port)))
        except BlockingIOError:
            pass
        opened.append(sock)
    time.sleep(0.5)
    for sock in opened:
        try:
            sock.send(b"GET /healthz HTTP/1.1\r\nHost: lo")  # and never the rest
        except OSError:
            pass  # refused already
    return opened


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def _healthz(url: str, *, within: float) -> float | None:
    """Seconds until ``/healthz`` answered 200, or None if it did not within ``within``."""
    start = time.monotonic()
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() - start < within:
            try:
                if client.get(url + "/healthz").status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    return None


def test_slow_connections_at_a_low_file_limit_are_cut_and_logged_once_per_interval(
    service_process: ServiceFactory,
) -> None:
    with _file_limit(FILE_LIMIT):
        served: ServiceProcess = service_process("--enhanced-locking-http-header-timeout=2s")
    opened = _slow(served.url, SLOW)
    try:
        started = time.monotonic()
        back = _healthz(served.url, within=15)
        assert back is not None, "/healthz did not answer within 15 s of the slow connections"
        left = list(opened)
        while left and time.monotonic() - started < 10:  # the header deadline is 2 s
            time.sleep(0.2)
            left = [sock for sock in left if not _closed_by_server(sock)]
        cut = SLOW - len(left)
        assert cut == SLOW, f"only {cut} of {SLOW} slow connections were closed by the server"
    finally:
        for sock in opened:
            sock.close()
    assert served.process is not None and served.process.poll() is None, served.output()
    stderr = served.stderr()
    assert len(stderr) < 20_000, f"{len(stderr)} bytes of log in a few seconds:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    refusals = stderr.count("refused connections")
    assert 1 <= refusals <= 2, f"a refusal logged {refusals} times, not once per interval"
    assert stderr.count("did not arrive in time") <= 2, stderr[-3000:]


def test_a_body_that_stops_half_way_is_cut_at_the_body_deadline(
    service_process: ServiceFactory,
) -> None:
    served = service_process("--enhanced-locking-http-body-timeout=1s")
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/locks HTTP/1.1\r\nHost: lo\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 200\r\n\r\n{\"project\": ")
        sock.settimeout(5)
        start = time.monotonic()
        try:
            answer = sock.recv(1)
        except ConnectionResetError:
            answer = b""
        except TimeoutError:
            raise AssertionError("the half-sent body kept its connection for 5 s") from None
        waited = time.monotonic() - start
        assert answer == b"", "closed, not answered"
    assert 0.8 <= waited < 4, f"the half-sent body held its connection for {waited:.1f} s"
    with httpx.Client(base_url=served.url) as client:
        assert client.get("/healthz").status_code == 200


def _acquire(pull: int, *, wait: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "project": {"repoFullName": "acme/shed", "path": "p", "projectName": "p"},
        "pull": {"num": pull}, "user": {"username": f"u{pull}"}}
    if wait:
        body["wait"] = wait
    return body


async def test_beyond_the_in_flight_limit_requests_are_shed_and_locks_and_queues_stay(
    service_process: ServiceFactory,
) -> None:
    served = service_process("--enhanced-locking-enabled",
                             "--enhanced-locking-http-max-in-flight=21")
    key = "acme/shed/p/default/p"
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=served.url, timeout=30, limits=limits) as http:
        assert (await http.post("/v1/locks", json=_acquire(1, wait=None))).status_code == 200
        waiting = [asyncio.ensure_future(http.post("/v1/locks", json=_acquire(10 + n,
                                                                              wait="20s")))
                   for n in range(20)]
        for _ in range(100):
            if len((await http.get("/v1/queue", params={"key": key})).json()["waiters"]) == 20:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the waiters did not all queue")
        waiting.append(asyncio.ensure_future(http.post("/v1/locks",
                                                       json=_acquire(30, wait="20s"))))
        await asyncio.sleep(0.5)  # 21 requests in flight: the limit
        shed = await asyncio.gather(*(http.post("/v1/locks", json=_acquire(100 + n, wait="5s"))
                                      for n in range(10)))
        assert {r.status_code for r in shed} == {503}, [r.text for r in shed]
        assert all(r.headers["retry-after"] == "1" for r in shed)
        assert "max-in-flight" in shed[0].json()["error"]
        assert {r.json()["reason"] for r in shed} == {"overloaded"}, "told apart from a store's 503"
        assert (await http.get("/v1/locks", params={"repo": "acme/shed"})).status_code == 503
        assert (await http.get("/healthz")).status_code == 200, "health is always served"
        scraped = (await http.get("/metrics")).text  # always served: how load is watched
        assert "\nenhanced_locking_requests_shed_total 11.0\n" in scraped, "each shed counted"
        released = await http.delete("/v1/locks/by-key", params={"key": key, "pull": 1})
        assert released.status_code == 200, "a release is always served"
        answers = []
        for task in asyncio.as_completed(waiting):  # each granted one lets the next have it
            response = await task
            answers.append(response.status_code if response.status_code == 200 else response.text)
            if response.status_code == 200:
                pull = response.json()["lock"]["pull"]["num"]
                await http.delete("/v1/locks/by-key", params={"key": key, "pull": pull})
        assert answers == [200] * 21, "every queued request was served in its turn"


def _answer(sock: socket.socket) -> bytes:
    """One whole answer of ``Content-Length`` framing read from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(4096)
    return head


def test_the_header_deadline_runs_from_a_requests_first_byte_not_from_the_last_answer(
    service_process: ServiceFactory,
) -> None:
    """An idle keep-alive connection is not a slow request: a second request sent after more
    than the header deadline is served; a request head trickled in, a byte at a time well
    within the deadline each, is cut at the deadline counted from its first byte."""
    served = service_process("--enhanced-locking-http-header-timeout=1s")
    host, port = served.url.removeprefix("http://").split(":")
    request = b"GET /healthz HTTP/1.1\r\nHost: lo\r\n\r\n"
    with socket.create_connection((host, int(port))) as sock:
        sock.settimeout(5)
        sock.sendall(request)
        assert _answer(sock).startswith(b"HTTP/1.1 200")
        time.sleep(1.5)  # idle, past the header deadline, within uvicorn's keep-alive (5 s)
        sock.sendall(request)
        assert _answer(sock).startswith(b"HTTP/1.1 200"), "the idle connection was cut"
        start = time.monotonic()
        closed = False
        for byte in request[:-2]:  # never the final CRLF
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.1)
            if _closed_by_server_blocking(sock):
                closed = True
                break
        waited = time.monotonic() - start
    assert closed, "a head trickled in for longer than the deadline was not cut"
    assert 0.8 <= waited < 3, f"the trickled head was cut after {waited:.1f} s (deadline 1 s)"


def _closed_by_server_blocking(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return _closed_by_server(sock)
    finally:
        sock.setblocking(True)
        sock.settimeout(5)


def _accepted(sock: socket.socket) -> None:
    """Wait (up to 20 s) until the server has accepted ``sock``'s connection, its header
    deadline running: the kernel's table of TCP sockets (``/proc/net/tcp``) gives the server's
    end a file (an inode) only once the server took it from its queue of connections."""
    server = f"{sock.getpeername()[1]:04X}"
    client = f"{sock.getsockname()[1]:04X}"
    deadline = time.monotonic() + 20
    while True:
        with open("/proc/net/tcp") as table:
            for row in table.read().splitlines()[1:]:
                fields = row.split()
                if (fields[1].endswith(f":{server}") and fields[2].endswith(f":{client}")
                        and fields[9] != "0"):
                    return
        assert time.monotonic() < deadline, "the connection was not accepted within 20 s"
        time.sleep(0.05)


@pytest.mark.parametrize("before_the_stall", [b"", b"GET /healthz HTTP/1.1\r\n"])
def test_a_request_that_arrived_while_the_server_stalled_past_the_header_deadline_is_served(
    service_process: ServiceFactory, before_the_stall: bytes,
) -> None:
    """The header deadline bounds a slow client, not a slow server: a request whose bytes
    arrived within it (all of them, or the rest after its first line) but which the server
    reads only once the deadline's time has passed (its process stopped, as a stalled event
    loop or a hung host is) is answered, not cut. The deadline counts from the connection's
    accept (or the request's first byte); a deadline due with bytes unread in the socket
    waits for them to be read (before that wait, 3 of 6 runs of the second case were cut)."""
    served = service_process("--enhanced-locking-http-header-timeout=1s")
    assert served.process is not None
    process = served.process
    host, port = served.url.removeprefix("http://").split(":")
    request = b"GET /healthz HTTP/1.1\r\nHost: lo\r\n\r\n"
    with socket.create_connection((host, int(port))) as sock:
        sock.settimeout(30)
        _accepted(sock)
        sock.sendall(before_the_stall)
        time.sleep(0.2)
        process.send_signal(signal.SIGSTOP)
        try:
            sock.sendall(request.removeprefix(before_the_stall))
            time.sleep(2.5)  # the deadline's time passes, the bytes unread in the socket
        finally:
            process.send_signal(signal.SIGCONT)
        assert _answer(sock).startswith(b"HTTP/1.1 200")
