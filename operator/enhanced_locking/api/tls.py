"""HTTPS serving with a certificate that can be rotated without a restart.

uvicorn builds one :class:`ssl.SSLContext` from ``tls-cert-file`` and ``tls-key-file``. Loading
a new chain into that same context changes what *new* handshakes present (open connections keep
theirs), so rotating the files (cert-manager renewing a Secret mounted into the pod) takes
effect within :data:`CHECK_SECONDS` without dropping a connection. A pair that does not load
(a half-written file, a key that does not match) keeps the previous certificate and is logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl

__all__ = ["CertificateReloader"]

log = logging.getLogger(__name__)

CHECK_SECONDS = 2.0


def _stamp(*paths: str) -> tuple[tuple[int, int], ...]:
    out = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            out.append((-1, -1))
        else:
            out.append((stat.st_mtime_ns, stat.st_size))
    return tuple(out)


class CertificateReloader:
    """Watches the certificate and key files and loads them again into ``context``."""

    def __init__(self, context: ssl.SSLContext, cert_file: str, key_file: str, *,
                 interval: float = CHECK_SECONDS) -> None:
        self.context = context
        self.cert_file = cert_file
        self.key_file = key_file
        self.interval = interval
        self.loads = 0
        self._stamp = _stamp(cert_file, key_file)

    def check(self) -> bool:
        """Load the pair again if either file changed; whether it was loaded."""
        stamp = _stamp(self.cert_file, self.key_file)
        if stamp == self._stamp:
            return False
        try:
            # A certificate that loads with a key that does not match is refused only after
            # the live context has taken the certificate, leaving it no usable key: every new
            # handshake would fail. So the pair is tried on a throwaway context first.
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert_file, self.key_file)
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as error:
            log.error("TLS certificate %s not reloaded, the previous one stays: %s",
                      self.cert_file, error)
            return False
        self._stamp = stamp
        self.loads += 1
        log.info("TLS certificate %s reloaded", self.cert_file)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()
