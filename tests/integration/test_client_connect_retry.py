"""The Python client sends a call again only when a restart could be why its connection failed
(refused, reset while connecting, no answer to the connect): a certificate it does not trust
and a host name that does not resolve fail the first attempt, in their own words."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from tests.support.controlplane import CertificateAuthority
from tests.support.service import LOOPBACK, ServiceProcess, running

from enhanced_locking.client import Client, ServiceError

WINDOW = 1.5
"""Seconds of the client's timeout, so its window of connect retries."""


class Counting(httpx.HTTPTransport):
    """httpx's own transport, counting the requests it is given (one per attempt)."""

    def __init__(self) -> None:
        super().__init__(verify=ssl.create_default_context())  # the system's CAs alone
        self.attempts = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        return super().handle_request(request)


@pytest.fixture
def untrusted(tmp_path: Path) -> Iterator[ServiceProcess]:
    """The service over HTTPS with a certificate of a CA the client does not trust."""
    ca = CertificateAuthority(tmp_path)
    pair = ca.issue("serving", "enhanced-locking", server=True, ips=[LOOPBACK],
                    dns_names=["localhost"])
    service = ServiceProcess(tmp_path / "data", ca_file=ca.pair.cert, args=[
        f"--enhanced-locking-tls-cert-file={pair.cert}",
        f"--enhanced-locking-tls-key-file={pair.key}",
    ])
    with running(service):
        yield service


def test_a_certificate_the_client_does_not_trust_fails_the_first_attempt(
    untrusted: ServiceProcess,
) -> None:
    transport = Counting()
    with Client(untrusted.url, timeout=WINDOW, transport=transport) as client, \
            pytest.raises(ServiceError) as raised:
        client.get("k")
    assert raised.value.status == 0
    assert "CERTIFICATE_VERIFY_FAILED" in str(raised.value)
    assert transport.attempts == 1


def test_a_host_name_that_does_not_resolve_fails_the_first_attempt() -> None:
    transport = Counting()  # .invalid never resolves (RFC 6761): nothing is sent anywhere
    with Client("http://enhanced-locking.invalid:4142", timeout=WINDOW,
                transport=transport) as client, pytest.raises(ServiceError) as raised:
        client.get("k")
    assert raised.value.status == 0
    assert "cannot reach the lock service at http://enhanced-locking.invalid:4142" in str(
        raised.value)
    assert transport.attempts == 1


def test_a_refused_connection_is_tried_again_within_the_window(
    free_port: Callable[[], int],
) -> None:
    transport = Counting()
    with Client(f"http://{LOOPBACK}:{free_port()}", timeout=WINDOW,
                transport=transport) as client, pytest.raises(ServiceError) as raised:
        client.get("k")
    assert raised.value.status == 0 and "cannot reach the lock service" in str(raised.value)
    assert transport.attempts > 1


def test_a_connect_timeout_of_0_sends_a_refused_call_once(
    free_port: Callable[[], int],
) -> None:
    """``connect_timeout`` (the commands' ``--connect-timeout``) bounds the window alone: the
    client's timeout stays the bound of each call."""
    transport = Counting()
    with Client(f"http://{LOOPBACK}:{free_port()}", timeout=WINDOW, connect_timeout=0.0,
                transport=transport) as client, pytest.raises(ServiceError) as raised:
        client.get("k")
    assert raised.value.status == 0 and "cannot reach the lock service" in str(raised.value)
    assert transport.attempts == 1


def test_an_event_stream_opened_while_the_service_restarts_waits_for_its_port(
    service_process: Callable[..., ServiceProcess],
) -> None:
    """Opening the stream is the same call: refused, it is sent again until the service is
    back on its port; it failed at once."""
    service = service_process()
    service.stop()
    transport = Counting()
    ended: list[BaseException] = []

    class Opened(Exception):
        """The service follows the events for the stream: the test has what it waits for."""

    def opened() -> None:
        raise Opened

    def follow() -> None:
        try:
            with Client(service.url, timeout=60.0, transport=transport) as client:
                for _ in client.events(on_open=opened):
                    pass
        except (Opened, ServiceError) as error:
            ended.append(error)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    while transport.attempts == 0 and follower.is_alive():  # its first attempt is refused
        time.sleep(0.05)
    service.start()
    follower.join(60.0)
    assert not follower.is_alive(), "the stream was neither opened nor given up"
    assert len(ended) == 1 and isinstance(ended[0], Opened), ended
    assert transport.attempts > 1
