"""The API's listening socket: every connection it accepts sends small answers at once.

asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets whose protocol is TCP. A
socket made as ``socket(AF_INET, SOCK_STREAM)`` says protocol 0, so the connections accepted
on it kept Nagle on: a keep-alive client then waited for the delayed ACK (~40 ms) on every
call after the first, the answer's headers and body being two writes.
"""

from __future__ import annotations

import asyncio
import socket

from enhanced_locking.cli import _listen


async def _nodelay_of_an_accepted_connection(listening: socket.socket) -> int:
    seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted: socket.socket = writer.get_extra_info("socket")
        seen.set_result(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(handle, sock=listening)
    async with server:
        host, port = listening.getsockname()[:2]
        _, writer = await asyncio.open_connection(host, port)
        result = await asyncio.wait_for(seen, timeout=5)
        writer.close()
    return result


def test_connections_accepted_by_the_api_socket_have_nagle_off() -> None:
    listening = _listen("127.0.0.1", 0)
    assert listening.proto == socket.IPPROTO_TCP
    assert asyncio.run(_nodelay_of_an_accepted_connection(listening)) != 0
