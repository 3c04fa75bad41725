"""A plain HTTP server on loopback answering with a handler of the test's: what a proxy, a
sign-in page or a server cutting its answer short sends to the service's clients."""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Iterator

__all__ = ["serving"]


def serving(handler: type[http.server.BaseHTTPRequestHandler],
            tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """Serve ``handler`` on a free loopback port, over HTTPS with ``tls`` (a server context);
    yields the base URL (a generator, for a fixture or ``contextlib.contextmanager``)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        scheme = "http" if tls is None else "https"
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
