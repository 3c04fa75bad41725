"""Where the command-line tools find the lock service and the token they send it.

Kept apart from :mod:`enhanced_locking.client` so that a command reads and checks these
settings without loading the HTTP client (``httpx`` is imported only to check a URL given to
it): ``enhanced-locking serve`` or ``config show`` never sends a request.
"""

from __future__ import annotations

import re

__all__ = ["CONNECT_TIMEOUT_ENV", "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_URL", "TOKEN_ENV", "URL_ENV",
           "service_url", "shown_url", "token_problem"]

DEFAULT_URL = "http://127.0.0.1:4142"
URL_ENV = "ENHANCED_LOCKING_URL"
"""The variable the command-line tools read the service's URL from (``--url`` wins)."""

TOKEN_ENV = "ENHANCED_LOCKING_TOKEN"
"""The bearer token's variable (``--token`` and ``token=`` win)."""

CONNECT_TIMEOUT_ENV = "ENHANCED_LOCKING_CONNECT_TIMEOUT"
"""The variable of how long a command keeps sending a call whose connection a restart refuses
(a duration, ``10s``; ``--connect-timeout`` wins)."""

DEFAULT_CONNECT_TIMEOUT = "10s"
"""That time when neither says it: the client's timeout."""


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be sent as a bearer token, naming no part of it; None if it can.

    An HTTP header carries printable ASCII: a token holding a line break (pasted with a second
    line, say), another control character or a non-ASCII one is refused by the HTTP library,
    whose message quotes the whole header, token and all."""
    if all(" " <= character <= "~" for character in token.strip()):
        return None
    return ("not a bearer token: it holds a line break, a control character or a non-ASCII "
            "character, which no HTTP header carries (the token is not shown)")


def shown_url(url: object) -> str:
    """``url`` as a message may show it: without the user and password it may carry
    (``https://user:password@host``), which a step's output would put in a pull request."""
    return re.sub(r"(?<=//)[^/?#@]*@", "", str(url))


def service_url(value: str) -> str:
    """``value`` if it is an http(s) URL with a host and, if it names one, a port from 1 to
    65535 (trailing ``/`` dropped); else ValueError."""
    import httpx  # the URL is checked as the client will read it

    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError):
        url = None
    # httpx takes any digits as the port (99999): a port is 1 to 65535.
    if (url is None or url.scheme not in ("http", "https") or not url.host
            or (url.port is not None and not 0 < url.port < 65536)):
        raise ValueError(f"expected the lock service's URL, such as {DEFAULT_URL}, "
                         f"got {shown_url(value)!r}")
    return value.rstrip("/")
