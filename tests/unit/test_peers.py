"""What the other replicas say of their stores (enhanced_locking.peers): which answers count,
and that callers share one round of questions, asked again once a second old."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import json
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from tests.support.controlplane import CertificateAuthority, KeyPair
from tests.support.loopback_http import serving

from enhanced_locking.peers import FRESH, Peers


class _Peer(http.server.BaseHTTPRequestHandler):
    """A peer's /readyz: ``answer`` (status, body) as the class holds it; counts the asks."""

    answer: ClassVar[tuple[int, bytes]] = (200, b"")
    asked: ClassVar[int] = 0
    then: ClassVar[Callable[[], object]] = staticmethod(lambda: None)
    """Run at each ask, before the answer (what time does meanwhile)."""

    def do_GET(self) -> None:
        type(self).asked += 1
        type(self).then()
        status, body = self.answer
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _body(**backends: str) -> bytes:
    return json.dumps({"ready": all(v == "ok" for v in backends.values()),
                       "backends": backends}).encode()


@pytest.fixture
def peer() -> Iterator[str]:
    _Peer.answer, _Peer.asked = (200, _body(legacy="ok", enhanced="ok")), 0
    _Peer.then = staticmethod(lambda: None)
    with contextlib.contextmanager(serving)(_Peer) as url:
        yield url.removeprefix("http://")


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_peer_that_reaches_every_store_is_named_for_each_question(peer: str) -> None:
    peers = Peers(lambda: ([peer], ""))
    assert await peers.one_ready() == peer
    assert await peers.one_reaching("enhanced") == peer


async def test_a_peer_that_reaches_only_legacy_is_ready_for_neither(peer: str) -> None:
    _Peer.answer = (503, _body(legacy="ok", enhanced="Redis at 127.0.0.1:1 did not answer"))
    peers = Peers(lambda: ([peer], ""))
    assert await peers.one_ready() is None
    assert await peers.one_reaching("enhanced") is None
    assert await peers.one_reaching("legacy") == peer


@pytest.mark.parametrize("answer", [
    (200, b"<html>sign in</html>"),  # not the service's JSON: a proxy's page
    (200, b'{"ready": true}'),  # JSON without the stores
    (404, _body(enhanced="ok")),  # not /readyz's status
])
async def test_an_answer_that_is_not_the_service_s_counts_as_no_peer(
    peer: str, answer: tuple[int, bytes],
) -> None:
    _Peer.answer = answer
    peers = Peers(lambda: ([peer], ""))
    assert await peers.one_ready() is None and await peers.one_reaching("enhanced") is None


async def test_callers_share_one_round_and_ask_again_once_it_is_a_second_old(
    peer: str,
) -> None:
    clock = _Clock()
    peers = Peers(lambda: ([peer], ""), clock=clock)
    answers = await asyncio.gather(*(peers.one_reaching("enhanced") for _ in range(20)))
    assert answers == [peer] * 20 and _Peer.asked == 1
    assert await peers.one_ready() == peer and _Peer.asked == 1, "kept while fresh"
    _Peer.answer = (503, _body(legacy="ok", enhanced="no answer"))
    clock.now += FRESH
    assert await peers.one_reaching("enhanced") is None and _Peer.asked == 2


async def test_a_round_s_answers_are_kept_a_second_from_when_they_were_asked(
    peer: str,
) -> None:
    """A round that took a second (the peers slow to answer) is not kept another second: the
    next question asks again. Before, a round's answers were kept a second from when it ended,
    so the fall-back could go by what a peer said up to 3 s before (the round's 2 s and the
    second), where the docs say a second."""
    clock = _Clock()
    peers = Peers(lambda: ([peer], ""), clock=clock)

    def a_second_passes() -> None:
        clock.now += FRESH

    _Peer.then = staticmethod(a_second_passes)
    try:
        assert await peers.one_reaching("enhanced") == peer and _Peer.asked == 1
    finally:
        _Peer.then = staticmethod(lambda: None)
    _Peer.answer = (503, _body(legacy="ok", enhanced="no answer"))
    assert await peers.one_reaching("enhanced") is None, "an answer a second old was used"
    assert _Peer.asked == 2


async def test_no_peers_and_peers_that_stand_for_nobody_are_asked_nothing() -> None:
    assert await Peers(lambda: ([], "")).one_ready() is None
    assert await Peers(lambda: (["peers.invalid:4142"], "")).one_ready() is None
    # a name no resolver takes (an empty label, one over 63 characters): the config refuses it,
    # and here too it stands for nobody rather than failing the question
    for name in ("peers..invalid:4142", "p" * 64 + ".invalid:4142"):
        assert await Peers(functools.partial(lambda n: ([n], ""), name)).one_ready() is None


class _Trickling(http.server.BaseHTTPRequestHandler):
    """A peer that answers a byte of its headers every half second and never ends them (its
    event loop all but stalled): each read waits less than the client's read timeout."""

    stop: ClassVar[threading.Event] = threading.Event()

    def do_GET(self) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        while not self.stop.wait(0.5):
            self.wfile.write(b"x")
            self.wfile.flush()

    def log_message(self, format: str, *args: object) -> None:
        pass


async def test_a_peer_that_never_finishes_its_answer_is_given_up_on(peer: str) -> None:
    # Each peer's answer is bounded whole, not each read of it: the answer of the peer that
    # does answer is used, and the question ends (the readiness probe and a fall-back wait on
    # it). Before, a peer that kept sending held both for good.
    _Trickling.stop.clear()
    with contextlib.contextmanager(serving)(_Trickling) as slow:
        asked = asyncio.ensure_future(
            Peers(lambda: ([slow.removeprefix("http://"), peer], "")).one_ready())
        try:
            done, _ = await asyncio.wait([asked], timeout=60)
            assert asked in done, "the question did not end with a peer that never finishes"
            assert asked.result() == peer
        finally:
            asked.cancel()
            _Trickling.stop.set()


def _tls_peer(pair: KeyPair) -> contextlib.AbstractContextManager[str]:
    """A peer answering /readyz over HTTPS with ``pair``'s certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pair.cert, pair.key)
    return contextlib.contextmanager(serving)(_Peer, context)


@pytest.fixture
def certificates(tmp_path: Path) -> tuple[KeyPair, KeyPair, KeyPair]:
    """The replicas' certificate, another from the same CA, and one from another CA."""
    (tmp_path / "ca").mkdir()
    (tmp_path / "other").mkdir()
    ca, other_ca = CertificateAuthority(tmp_path / "ca"), CertificateAuthority(tmp_path / "other")
    ours = ca.issue("ours", "enhanced-locking", server=True, dns_names=["el.atlantis.svc"])
    renewed = ca.issue("renewed", "enhanced-locking", server=True,
                       dns_names=["el.atlantis.svc"])
    forged = other_ca.issue("forged", "enhanced-locking", server=True, ips=["127.0.0.1"],
                            dns_names=["el.atlantis.svc"])
    return ours, renewed, forged


async def test_a_peer_over_https_counts_when_it_serves_this_replica_s_certificate(
    certificates: tuple[KeyPair, KeyPair, KeyPair],
) -> None:
    """The replicas share one certificate (the chart's tls.secretName): a peer that presents
    it, addressed by its IP (which the certificate need not hold), is believed."""
    _Peer.answer, _Peer.asked = (200, _body(legacy="ok", enhanced="ok")), 0
    ours, _, _ = certificates
    with _tls_peer(ours) as url:
        peer = url.removeprefix("https://")
        peers = Peers(lambda: ([peer], str(ours.cert)))
        assert await peers.one_ready() == peer
        assert await peers.one_reaching("enhanced") == peer


@pytest.mark.parametrize("presented", ["renewed", "forged"])
async def test_a_peer_with_another_certificate_counts_as_nobody(
    certificates: tuple[KeyPair, KeyPair, KeyPair], presented: str,
) -> None:
    """A peer that does not present this replica's certificate (one of another CA, or even
    another of the same CA) is not asked further: it cannot take this replica out of its
    Service or refuse its fall-back."""
    _Peer.answer, _Peer.asked = (200, _body(legacy="ok", enhanced="ok")), 0
    ours, renewed, forged = certificates
    with _tls_peer(renewed if presented == "renewed" else forged) as url:
        peer = url.removeprefix("https://")
        peers = Peers(lambda: ([peer], str(ours.cert)))
        assert await peers.one_ready() is None
        assert await peers.one_reaching("enhanced") is None
    assert _Peer.asked == 0, "no request went past the handshake"


async def test_a_certificate_file_that_does_not_read_stands_for_no_peer(
    certificates: tuple[KeyPair, KeyPair, KeyPair], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _Peer.answer, _Peer.asked = (200, _body(legacy="ok", enhanced="ok")), 0
    ours, _, _ = certificates
    with _tls_peer(ours) as url:
        peer = url.removeprefix("https://")
        missing = tmp_path / "gone.crt"
        assert await Peers(lambda: ([peer], str(missing))).one_ready() is None
    assert str(missing) in caplog.text


class _Slow(_Peer):
    """A peer that answers its /readyz after ``delay`` seconds."""

    delay: ClassVar[float] = 1.2

    def do_GET(self) -> None:
        threading.Event().wait(self.delay)
        super().do_GET()


async def test_a_slow_name_and_a_slow_answer_share_one_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The readiness probe's time out covers a store's call limit and the peers' question once:
    # the name's look-up and the answer share the 2 s. Before, each had 2 s of its own, and a
    # look-up of 1.2 s then an answer of 1.2 s counted (the probe's /serving at up to 9 s
    # against its 10 s time out). Each delay is a floor, so this holds whatever the load.
    loop = asyncio.get_running_loop()
    resolve = loop.getaddrinfo

    async def slow_lookup(*args: object, **kwargs: object) -> object:
        await asyncio.sleep(1.2)
        return await resolve(*args, **kwargs)  # type: ignore[arg-type]

    _Slow.answer, _Slow.asked = (200, _body(legacy="ok", enhanced="ok")), 0
    with contextlib.contextmanager(serving)(_Slow) as url:
        monkeypatch.setattr(loop, "getaddrinfo", slow_lookup)
        assert await Peers(lambda: ([url.removeprefix("http://")], "")).one_ready() is None
