"""HTTPS serving with a certificate that can be rotated without a restart.

uvicorn builds one :class:`ssl.SSLContext` from ``tls-cert-file`` and ``tls-key-file``. A pair
that changed is loaded into a context of its own, and every new handshake on uvicorn's context
is switched to the newest such context (its ``sni_callback``, called for every handshake, with
or without a server name), so rotating the files (cert-manager renewing a Secret mounted into
the pod) takes effect within :data:`CHECK_SECONDS` without dropping a connection (open ones
keep theirs). A pair that does not load (a half-written file, a key that does not match) keeps
the previous certificate and is logged.

Not loaded into uvicorn's context itself: OpenSSL keeps one certificate and key per key type
there, so an EC pair loaded over an RSA one left the RSA certificate and key in place, still
presented to every client that takes only RSA. A context of its own holds the one pair.

The pair is read once per reload and those bytes are loaded, whole or not at all: files rotated
meanwhile cannot put a pair that was never tried in front of a handshake.
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
    """Watches the certificate and key files; each pair that loads whole serves every handshake
    on ``context`` from then on."""

    def __init__(self, context: ssl.SSLContext, cert_file: str, key_file: str, *,
                 interval: float = CHECK_SECONDS) -> None:
        self.context = context
        self.cert_file = cert_file
        self.key_file = key_file
        self.interval = interval
        self.loads = 0
        self.serving: ssl.SSLContext | None = None
        """The context of the newest pair that loaded (None: ``context``'s own pair serves)."""
        self._stamp = _stamp(cert_file, key_file)
        context.sni_callback = self._serve

    def _serve(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
               context: ssl.SSLContext) -> None:
        """A handshake's start: it presents the newest pair that loaded."""
        if self.serving is not None:
            connection.context = self.serving

    def check(self) -> bool:
        """Load the pair again if either file changed; whether it was loaded."""
        stamp = _stamp(self.cert_file, self.key_file)
        if stamp == self._stamp:
            return False
        try:
            # A context of its own (see the module's docstring), which serves only once the
            # pair loaded whole: a certificate that loads with a key that does not match is
            # refused after the context took the certificate, leaving it no usable key. The
            # files are read once: the bytes loaded are the bytes tried.
            cert, key = _read(self.cert_file), _read(self.key_file)
            fresh = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            _load_pair(fresh, cert, key)
        except (OSError, ssl.SSLError) as error:
            log.error("TLS certificate %s not reloaded, the previous one stays: %s",
                      self.cert_file, error)
            return False
        self.serving = fresh
        self._stamp = stamp
        self.loads += 1
        log.info("TLS certificate %s reloaded", self.cert_file)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()
