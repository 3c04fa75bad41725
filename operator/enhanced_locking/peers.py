"""What the other replicas' stores answer them: for the readiness probe and the fall-back.

``GET /readyz`` says whether this replica's stores answer. That is the wrong question for the
kubelet when a store every replica shares is down: each replica's ``/readyz`` is 503 at once,
every pod leaves the Service, and lock calls fail as unreachable while ``fallback: legacy``
could have served them. It is the right question when this replica alone lost a store: the
others still grant on it, and a grant this one made through the fall-back would split a key
across the sides (two pulls told they hold one lock).

So when a store does not answer here, the replica asks the others (``enhanced-locking-peers``;
in the chart, a headless Service that lists every pod, ready or not, so that the answer never
depends on the very readiness it decides) for their ``/readyz``, the service's own JSON:

- ``GET /serving``, which the chart's readiness probe reads, is 503 while a peer reaches every
  store (its ``/readyz`` is 200): that peer serves better, and the kubelet takes this replica
  out. When none does, the outage is everyone's and this replica keeps serving.
- the fall-back to legacy (``fallback: legacy``) refuses with ``unavailable`` instead while a
  peer reaches the enhanced store: that peer grants there, and a legacy grant here could split
  the key. It covers the time until the kubelet acts.

A peer that does not answer within :data:`PEER_TIMEOUT` (gone, restarting, its stores frozen)
counts as reaching nothing. The answer depends on the peers' stores, never on their
readiness, so it does not flap: with a store down for all, each stays in; back for some, the
others leave. Answers are kept :data:`FRESH` seconds from when their round began (a round that
took longer is not kept at all), and callers meanwhile share one round: a caller goes by what
the peers said at most :data:`FRESH` seconds before it asked, or during the round it joined.

With HTTPS (``tls-cert-file``), a peer is believed only when it presents the certificate this
replica serves, the first of ``tls-cert-file``, read at each round: the replicas share one
(the chart's ``tls.secretName``), and the peers are asked by address, which that certificate
need not name. A peer presenting any other (a false one, or a renewed certificate that one of
the two has not read yet) counts as reaching nothing, as one that does not answer: it is
never sent the request. A false peer believed could take this replica out of its Service and
refuse its fall-back.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Loaded by the first round that asks a peer: a service without peers (every one started
    # by `make run`, every test's) never loads the HTTP client, about 0.1 s of CPU a start.
    import httpx

__all__ = ["FRESH", "PEER_TIMEOUT", "PeerStores", "Peers"]

log = logging.getLogger(__name__)

PEER_TIMEOUT = 2.0
"""Seconds a peer has to answer its ``/readyz``."""
FRESH = 1.0
"""Seconds from a round's start that its answers are used before the peers are asked again."""


@dataclass(frozen=True)
class PeerStores:
    """One peer's answer: its address and each of its stores' state (``ok`` or why not)."""

    address: str
    backends: Mapping[str, str]
    withheld: bool = False
    """It grants no lock now (its ``/readyz`` says why): it is not ready, whatever its stores."""

    @property
    def ready(self) -> bool:
        return (not self.withheld and bool(self.backends)
                and all(s == "ok" for s in self.backends.values()))


def _split(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (already checked by the config model)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def _resolved(peer: str, deadline: float) -> list[Any]:
    """``peer``'s records; none when its name does not resolve by ``deadline`` (the loop's
    clock), or the resolver refuses to look it up (an empty label, one longer than 63
    characters: the config refuses those)."""
    host, port = _split(peer)
    try:
        async with asyncio.timeout_at(deadline):
            return await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, TimeoutError):
        return []


async def _addresses(peers: Sequence[str], deadline: float) -> list[str]:
    """Every address the peers stand for: a host name (a headless Service) resolves to each of
    its records, the names looked up at once. A name that does not resolve (in time) stands
    for nobody."""
    found: list[str] = []
    for peer, infos in zip(peers, await asyncio.gather(
            *(_resolved(p, deadline) for p in peers)), strict=True):
        port = _split(peer)[1]
        for family, _, _, _, sockaddr in infos:
            ip = str(sockaddr[0])
            address = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
            if address not in found:
                found.append(address)
    return found


async def _stores(client: httpx.AsyncClient, scheme: str, address: str,
                  deadline: float) -> PeerStores | None:
    """``address``'s answer, whole by ``deadline`` (the client's own timeout bounds each read:
    a peer sending its answer a little at a time would restart it), or None."""
    import httpx

    try:
        async with asyncio.timeout_at(deadline):
            answer = await client.get(f"{scheme}://{address}/readyz")
        body = answer.json()
    except (httpx.HTTPError, ValueError, TimeoutError):
        return None
    if answer.status_code not in (200, 503) or not isinstance(body, dict):
        return None
    backends = body.get("backends")
    if not isinstance(backends, dict):
        return None
    return PeerStores(address, {str(k): str(v) for k, v in backends.items()},
                      withheld=body.get("withheld") is not None)


_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


def trusting_own(cert_file: str) -> ssl.SSLContext:
    """A client context that accepts only the certificate of ``cert_file`` (its first; the
    rest is the chain, which would let in any certificate its issuer signed): that exact
    certificate is the one trust anchor, and no name is checked (peers are asked by address).
    Raises :class:`OSError` or :class:`ssl.SSLError` when the file does not read."""
    with open(cert_file, "rb") as file:
        found = _PEM_CERTIFICATE.search(file.read())
    if found is None:
        raise ssl.SSLError(f"no PEM certificate in {cert_file}")
    context = ssl.create_default_context(cadata=found.group(0).decode("ascii"))
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the anchor is a leaf, not a CA
    return context


async def ask(peers: Sequence[str], *, cert_file: str) -> list[PeerStores]:
    """Every peer's stores, asked at once, the names looked up and the answers read whole within
    one :data:`PEER_TIMEOUT` (the readiness probe's time out covers a store's call limit and
    this, once: a slow look-up leaves the answers less time, not more); the peers that did not
    answer (as the service: a 200 or 503 with its JSON) are left out. ``cert_file``: this
    replica's ``tls-cert-file`` (HTTPS, the certificate every peer must present), or ``""``
    (plain HTTP)."""
    verify: ssl.SSLContext | bool = False
    if cert_file:
        try:
            verify = trusting_own(cert_file)
        except (OSError, ssl.SSLError, ValueError) as error:
            log.warning("peers not asked: the certificate they must present, %s, does not "
                        "read (%s); each counts as reaching no store", cert_file, error)
            return []
    deadline = asyncio.get_running_loop().time() + PEER_TIMEOUT
    addresses = await _addresses(peers, deadline)
    if not addresses:
        return []
    scheme = "https" if cert_file else "http"
    import httpx

    async with httpx.AsyncClient(timeout=PEER_TIMEOUT, verify=verify, trust_env=False) as client:
        answers = await asyncio.gather(*(_stores(client, scheme, a, deadline) for a in addresses))
    return [answer for answer in answers if answer is not None]


class Peers:
    """The peers' stores as last asked, asked again once older than :data:`FRESH`.

    ``settings``: the peers and this replica's ``tls-cert-file`` (``""``: plain HTTP), read at
    each round (the config in force)."""

    def __init__(self, settings: Callable[[], tuple[Sequence[str], str]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._asked: tuple[float, tuple[str, ...], list[PeerStores]] | None = None
        self._round: asyncio.Future[list[PeerStores]] | None = None

    async def stores(self) -> list[PeerStores]:
        peers, cert_file = self._settings()
        if not peers:
            return []
        key = (*peers, cert_file)
        if self._asked is not None:
            when, asked_key, answers = self._asked
            if asked_key == key and self._clock() - when < FRESH:
                return answers
        if self._round is None:
            started = self._clock()
            self._round = asyncio.ensure_future(ask(peers, cert_file=cert_file))
            self._round.add_done_callback(lambda done: self._finish(done, key, started))
        return await asyncio.shield(self._round)

    def _finish(self, done: asyncio.Future[list[PeerStores]], key: tuple[str, ...],
                started: float) -> None:
        # Stamped with the round's start, not its end: a peer may have answered at its start,
        # and a round of PEER_TIMEOUT kept FRESH after its end was 3 s old at its last use.
        self._round = None
        if not done.cancelled() and done.exception() is None:
            self._asked = (started, key, done.result())

    async def one_ready(self) -> str | None:
        """The address of a peer whose stores all answer it, or ``None``."""
        return next((p.address for p in await self.stores() if p.ready), None)

    async def one_reaching(self, side: str) -> str | None:
        """The address of a peer that ``side``'s store (``enhanced``, ``legacy``) answers."""
        return next((p.address for p in await self.stores()
                     if p.backends.get(side) == "ok"), None)
