"""A loopback TCP proxy that cuts connections mid-reply, for stores behind service processes.

The proxy forwards bytes both ways between its clients and one upstream address, on an event
loop of its own thread (the test's loop may be busy with its clients). While ``cutting`` is
on, each chunk of an answer coming back from the upstream is, with the probability
``chance``, not passed on: both sides of that connection are reset instead. So the store ran
the request (its answer was on its way) and the caller never hears it: the connection cut
mid-reply. ``cut`` counts those. While :meth:`CuttingProxy.holding`, the answers are held
(nothing passed on, nothing cut) until it is let go: the store answered in time, and the
caller hears it only then. While ``refusing`` is on, no request reaches the upstream: each
chunk sent to it, and each new connection, resets the connection instead (the store never
sees it), while answers already on their way still pass. With ``refuse_on_cut``, a cut turns
``refusing`` on at once (the store out of reach before the caller can ask it again).

Nothing listens anywhere but 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["CuttingProxy", "cutting_proxy"]

LOOPBACK = "127.0.0.1"


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (no orderly FIN), as a broken network path looks to both ends."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class CuttingProxy:
    def __init__(self, upstream: tuple[str, int], *, seed: int = 7) -> None:
        self.upstream = upstream
        self.cutting = False
        self.chance = 0.02
        self.cut = 0
        self.refusing = False
        self.refuse_on_cut = False
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._passing: asyncio.Event | None = None
        """Set while answers are passed on (made on the proxy's loop, :meth:`start`)."""

    @property
    def addr(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> CuttingProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, LOOPBACK, 0), self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._passing = asyncio.run_coroutine_threadsafe(_open(), self._loop).result(10)
        return self

    @contextmanager
    def holding(self) -> Iterator[Callable[[], None]]:
        """Answers held for the block (every one read from the upstream from its start),
        until the function it gives is called (from any thread) or the block ends."""
        passing = self._passing
        assert passing is not None, "start() the proxy first"

        async def hold() -> None:
            passing.clear()

        def release() -> None:
            self._loop.call_soon_threadsafe(passing.set)

        asyncio.run_coroutine_threadsafe(hold(), self._loop).result(10)
        try:
            yield release
        finally:
            release()

    def close(self) -> None:
        """Stop listening and reset every connection (the upstream cut off); once only, later
        calls do nothing."""
        if self._loop.is_closed():
            return

        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for writer in self._writers:
                _reset(writer)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def cutting_for(self, seconds: float) -> None:
        """Cut connections mid-reply for ``seconds`` (on the caller's loop)."""
        self.cutting = True
        try:
            await asyncio.sleep(seconds)
        finally:
            self.cutting = False

    async def _serve(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        if self.refusing:
            _reset(down_w)
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(down_w)
            return
        self._writers |= {down_w, up_w}

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       answers: bool) -> None:
            try:
                while chunk := await reader.read(65536):
                    if not answers and self.refusing:
                        break  # (reset below: the request never reaches the upstream)
                    if answers and self._passing is not None:
                        await self._passing.wait()
                    if answers and self.cutting and self._rng.random() < self.chance:
                        self.cut += 1
                        if self.refuse_on_cut:
                            self.refusing = True
                        _reset(down_w)
                        _reset(up_w)
                        return
                    writer.write(chunk)
                    await writer.drain()
            except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass
            _reset(down_w)
            _reset(up_w)

        try:
            await asyncio.gather(pump(down_r, up_w, False), pump(up_r, down_w, True))
        except asyncio.CancelledError:
            # The proxy closing: ends the connection quietly (asyncio's server logs a
            # connection task that ends cancelled as an error).
            _reset(down_w)
            _reset(up_w)
        finally:
            self._writers -= {down_w, up_w}


async def _open() -> asyncio.Event:
    passing = asyncio.Event()
    passing.set()
    return passing


@contextmanager
def cutting_proxy(upstream: tuple[str, int]) -> Iterator[CuttingProxy]:
    proxy = CuttingProxy(upstream).start()
    try:
        yield proxy
    finally:
        proxy.close()
