"""HTTP/1.1 requests over a connection of their own, written and read by hand.

For floods of clients: a request costs the test process one connection, one write and the
reads of its answer, not an HTTP client's connection pool and per-request machinery, so a
test process can keep a thousand and more requests open without being the slow side (a
client too busy to write its request in time is closed by the server's header deadline).
Every request says ``connection: close``: its answer ends where the connection does.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

__all__ = ["parse", "request"]


def parse(raw: bytes) -> httpx.Response:
    """The HTTP/1.1 answer in ``raw`` (all of it: the server closed after it)."""
    head, _, content = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [(name.strip(), value.strip())
               for name, _, value in (line.partition(":") for line in lines)]
    response = httpx.Response(int(status_line.split()[1]), headers=headers, content=content)
    assert len(content) == int(response.headers["content-length"]), raw
    return response


async def request(host: str, port: int, method: str, target: str, body: Any = None, *,
                  give_up: float | None = None) -> httpx.Response | None:
    """``method target`` (with ``body`` as JSON) on a connection of its own, and its answer;
    ``None`` when ``give_up`` seconds passed first: the connection is then closed (the
    client is gone, as one that hangs up)."""
    content = b"" if body is None else json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"%s %s HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                     % (method.encode(), target.encode(), host.encode(), port, len(content),
                        content))
        reading = asyncio.ensure_future(reader.read())  # to the end: "connection: close"
        done, _ = await asyncio.wait({reading}, timeout=give_up)
        if not done:
            reading.cancel()
            return None
        return parse(reading.result())
    finally:
        writer.close()
