"""A plain HTTP server on loopback answering with a handler of the test's: what a proxy, a
sign-in page or a server cutting its answer short sends to the service's clients."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

__all__ = ["serving"]


def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on a free loopback port; yields the base URL (a generator, for a
    fixture or ``contextlib.contextmanager``)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
