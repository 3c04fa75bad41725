"""HTTPS serving with a certificate that can be rotated without a restart.

uvicorn builds one :class:`ssl.SSLContext` from ``tls-cert-file`` and ``tls-key-file``. Loading
a new chain into that same context changes what *new* handshakes present (open connections keep
theirs), so rotating the files (cert-manager renewing a Secret mounted into the pod) takes
effect within :data:`CHECK_SECONDS` without dropping a connection. A pair that does not load
(a half-written file, a key that does not match) keeps the previous certificate and is logged.

The pair is read once per reload and the same bytes are tried and then loaded: files rotated
between the two loads cannot put into the live context a pair that was never tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import tempfile
from collections.abc import Iterator

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


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


@contextlib.contextmanager
def _held(pem: bytes) -> Iterator[str]:
    """A path that reads ``pem`` (``load_cert_chain`` reads files only): a file in memory
    where the system has them (the key never reaches a disk), else a private temporary file
    removed after the load."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("enhanced-locking-tls", 0)
        try:
            os.write(fd, pem)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="enhanced-locking-tls-")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
        yield path
    finally:
        os.unlink(path)


def _load_pair(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """Load the certificate chain ``cert`` with its private ``key`` (PEM bytes) into
    ``context``."""
    with _held(cert) as cert_path, _held(key) as key_path:
        context.load_cert_chain(cert_path, key_path)


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
            # handshake would fail. So the pair is tried on a throwaway context first, and the
            # very bytes tried are the ones loaded live (read once: a rotation between the two
            # loads would otherwise load live a pair never tried).
            cert, key = _read(self.cert_file), _read(self.key_file)
            _load_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key)
            _load_pair(self.context, cert, key)
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
