"""One ``httpx.Client`` per thread, for tests that send requests from several threads.

An ``httpx.Client`` shared by threads is not safe with httpcore 1.0: its connection pool hands
an idle connection to a waiting request, and the connection stays idle until that request's
thread gets to run it. Meanwhile another thread's pass over the pool can find the same
connection idle past its keep-alive (or its socket readable) and close it, outside the pool's
lock, while the first thread is already writing or reading on it. That thread then fails with
``httpx.ReadError: [Errno 9] Bad file descriptor`` (the socket closed under it), or waits for
its whole read timeout when the close lands during its ``poll()``. A busy machine, where a
woken thread waits long to run, makes it likelier; the service answered normally all along.

:class:`ThreadClients` gives each thread its own client, so a pool is only ever touched by the
thread that owns it. Its clients drop an idle connection after :data:`KEEPALIVE_EXPIRY`
seconds, well before the service does (uvicorn closes a connection idle for 5 s): a request
is never sent on a connection the server is closing at that moment.
"""

from __future__ import annotations

import threading
from typing import Any, Self

import httpx

__all__ = ["KEEPALIVE_EXPIRY", "ThreadClients"]

KEEPALIVE_EXPIRY = 1.0
"""Seconds a client keeps an idle connection: below the server's 5 s keep-alive."""


class ThreadClients:
    """``clients()`` is the calling thread's client (made on first use); all are closed by
    :meth:`close` (or leaving the ``with`` block), once the threads are done with them.

    ``options`` are ``httpx.Client``'s (``base_url``, ``timeout``, ...); without ``limits``
    each client keeps at most one connection, idle for :data:`KEEPALIVE_EXPIRY` seconds.
    """

    def __init__(self, **options: Any) -> None:
        options.setdefault("limits", httpx.Limits(max_connections=1,
                                                  keepalive_expiry=KEEPALIVE_EXPIRY))
        self._options = options
        self._local = threading.local()
        self._lock = threading.Lock()
        self.made: list[httpx.Client] = []
        """Every client made so far, one per thread that asked."""

    def __call__(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = httpx.Client(**self._options)
            self._local.client = client
            with self._lock:
                self.made.append(client)
        return client

    def close(self) -> None:
        with self._lock:
            made, self.made = self.made, []
        for client in made:
            client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
