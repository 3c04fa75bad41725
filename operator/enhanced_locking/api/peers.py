"""Whether a replica whose stores do not answer should keep taking the Service's traffic.

``GET /readyz`` says whether this replica's stores answer. That is the wrong question for the
kubelet when a store every replica shares is down: each replica's ``/readyz`` is 503 at once,
every pod leaves the Service, and lock calls fail as unreachable while ``fallback: legacy``
could have served them. It is the right question when this replica alone lost a store: the
others still grant on it, and a grant this one made through the fall-back would split a key
across the sides (two pulls told they hold one lock).

So ``GET /serving``, which the chart's readiness probe reads, asks one more thing when a store
does not answer here: does a peer reach every store? The peers are ``enhanced-locking-peers``
(in the chart, a headless Service that lists every pod, ready or not, so that the answer
never depends on the very readiness it decides). A peer whose ``/readyz`` is 200 (the
service's own JSON, ``"ready": true``) serves better: this replica is not serving, and the
kubelet takes it out. When none does (every peer answered 503, or did not answer in time),
the outage is everyone's and this replica keeps serving: the fall-back answers consistently
on every replica (``legacy`` grants there, ``fail-closed`` refuses with ``unavailable``).

The answer never depends on the peers' readiness, only on their stores, so it does not flap:
with the store down for all, each stays in; back for some, the others leave.

A peer's certificate is not checked: a false peer can only claim to reach the stores, which
takes this replica out of the Service (what a peer able to drop its traffic could do anyway);
it can never put a replica in.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

import httpx

__all__ = ["PEER_TIMEOUT", "peer_that_serves"]

PEER_TIMEOUT = 2.0
"""Seconds a peer has to answer its ``/readyz``; a peer silent longer counts as not serving
(its stores cannot be answering it either, or it is gone)."""


def _split(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (already checked by the config model)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def _addresses(peers: Sequence[str]) -> list[str]:
    """Every address the peers stand for: a host name (a headless Service) resolves to each of
    its records. A name that does not resolve stands for nobody."""
    loop = asyncio.get_running_loop()
    found: list[str] = []
    for peer in peers:
        host, port = _split(peer)
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            continue
        for family, _, _, _, sockaddr in infos:
            ip = str(sockaddr[0])
            address = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
            if address not in found:
                found.append(address)
    return found


async def _serves(client: httpx.AsyncClient, url: str) -> bool:
    try:
        answer = await client.get(url)
        body = answer.json()
    except (httpx.HTTPError, ValueError):
        return False
    return answer.status_code == 200 and isinstance(body, dict) and body.get("ready") is True


async def peer_that_serves(peers: Sequence[str], *, tls: bool) -> str | None:
    """The address of a peer whose stores all answer (its ``/readyz`` is 200), or ``None``.

    Every peer is asked at once, each within :data:`PEER_TIMEOUT`."""
    addresses = await _addresses(peers)
    if not addresses:
        return None
    scheme = "https" if tls else "http"
    async with httpx.AsyncClient(timeout=PEER_TIMEOUT, verify=False, trust_env=False) as client:
        answers = await asyncio.gather(
            *(_serves(client, f"{scheme}://{address}/readyz") for address in addresses))
    return next((a for a, serving in zip(addresses, answers, strict=True) if serving), None)
