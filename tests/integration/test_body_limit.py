"""A request body over the bound is answered 413 before anything reads it, against a real
``enhanced-locking serve`` with static access control: a ``Content-Length`` over
``enhanced-locking-http-max-body`` is refused at once, its body never sent, before the caller
is checked (not a 401 or 422 after the whole body was buffered and parsed); a chunked body is
counted as it comes and refused once past the bound; a body within it is served as before, by
the direct handler too. The VCS webhooks have their own, larger cap."""

from __future__ import annotations

import json
import socket
import subprocess

import httpx
from tests.conftest import ServiceFactory
from tests.support.service import ServiceProcess, enhanced_locking_command, scrubbed_env

TOKEN = "tok-body-limit-3c9e1a"
STATIC = ("--enhanced-locking-auth=static", f"--enhanced-locking-auth-tokens={TOKEN},ci,,",
          "--enhanced-locking-auth-roles=locker=user:ci")
AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()
LOCK = {"project": {"repoFullName": "acme/infra", "path": "envs/prod"}, "pull": {"num": 12}}


def _exchange(served: ServiceProcess, request: bytes, body: bytes = b"") -> tuple[bytes, bytes]:
    """Send ``request`` (and ``body``, while the server reads it); the answer's head and body,
    read to the connection's end."""
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        try:
            sock.sendall(body)
        except OSError:
            pass  # the server answered and closed before the body was all sent
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, answer = data.partition(b"\r\n\r\n")
    return head, answer


def test_a_content_length_over_the_bound_is_413_unread_before_the_token_is_checked(
    service_process: ServiceFactory,
) -> None:
    served = service_process(*STATIC)
    head, answer = _exchange(served, b"POST /v1/locks HTTP/1.1\r\nHost: lo\r\n"
                             b"Content-Type: application/json\r\n"
                             b"Content-Length: 419430400\r\n\r\n{\"project\": ")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"connection: close" in head.lower()
    refusal = json.loads(answer)
    assert refusal["limit"] == 1048576
    assert "enhanced-locking-http-max-body" in refusal["error"]
    with httpx.Client(base_url=served.url, timeout=10) as http:
        assert http.post("/v1/locks", json=LOCK).status_code == 401, "the caller is still checked"
        within = http.post("/v1/locks", json=LOCK, headers={"Authorization": f"Bearer {TOKEN}"})
        assert within.status_code == 200, within.text


def test_a_chunked_body_is_counted_and_refused_past_the_bound(
    service_process: ServiceFactory,
) -> None:
    served = service_process(*STATIC, "--enhanced-locking-http-max-body=4096")
    chunk = b"x" * 1000
    framed = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5)) + b"0\r\n\r\n"
    head, answer = _exchange(served, b"POST /v1/locks HTTP/1.1\r\nHost: lo\r\n" + AUTH
                             + b"Content-Type: application/json\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n", framed)
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(answer)["limit"] == 4096
    # A chunked body within the bound reaches the route whole (the direct handler's).
    body = json.dumps(LOCK).encode()
    framed = b"%x\r\n%s\r\n" % (10, body[:10]) + b"%x\r\n%s\r\n" % (len(body) - 10, body[10:])
    head, answer = _exchange(served, b"POST /v1/locks HTTP/1.1\r\nHost: lo\r\n"
                             b"Connection: close\r\n" + AUTH + b"Content-Type: application/json\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n", framed + b"0\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), (head, answer)


def test_a_webhook_has_its_own_cap(service_process: ServiceFactory) -> None:
    served = service_process(*STATIC, "--enhanced-locking-http-max-body=4096")
    with httpx.Client(base_url=served.url, timeout=10) as http:
        big = http.post("/v1/webhooks/github", content=b"{" + b" " * 8192 + b"}",
                        headers={"content-type": "application/json"})
        assert big.status_code == 404, big.text  # read by the route: the webhook is off
        assert http.post("/v1/locks/batch", content=b" " * 8192,
                         headers={"content-type": "application/json"}).status_code == 413
    head, answer = _exchange(served, b"POST /v1/webhooks/github HTTP/1.1\r\nHost: lo\r\n"
                             b"Content-Length: 26214401\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(answer)["limit"] == 25 * 1024 * 1024


def test_a_bound_below_1024_bytes_exits_2_naming_the_setting() -> None:
    result = subprocess.run([*enhanced_locking_command(), "config", "show",
                             "--enhanced-locking-http-max-body=100"],
                            capture_output=True, text=True, env=scrubbed_env(), timeout=60)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "enhanced-locking-http-max-body" in lines[0], result.stderr
