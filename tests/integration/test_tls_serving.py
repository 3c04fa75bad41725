"""HTTPS serving: the service presents its certificate, a rotated pair is picked up without a
restart, and a broken pair keeps the one in use."""

from __future__ import annotations

import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from tests.support.access_matrix import acquire_body
from tests.support.controlplane import CertificateAuthority, KeyPair
from tests.support.service import LOOPBACK, ServiceProcess, running

from enhanced_locking.api.tls import CertificateReloader

RELOADED = 60.0
"""Seconds a test gives the service to check its files again (every 2 s) and act on a rotation:
a fixed 3 s wait missed the check on a loaded machine."""


def presented_serial(port: int, ca: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((LOOPBACK, port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=LOOPBACK) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def trusting(ca: CertificateAuthority) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.pair.cert))


def serial(pair: KeyPair) -> int:
    return x509.load_pem_x509_certificate(pair.cert.read_bytes()).serial_number


def install(pair: KeyPair, cert: Path, key: Path) -> None:
    # As a Secret volume does: the new files replace the old ones whole.
    new_key, new_cert = key.with_name(key.name + ".new"), cert.with_name(cert.name + ".new")
    shutil.copy(pair.key, new_key)
    shutil.copy(pair.cert, new_cert)
    new_key.replace(key)
    new_cert.replace(cert)


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[tuple[CertificateAuthority, ServiceProcess, Path, Path]]:
    ca = CertificateAuthority(tmp_path)
    first = ca.issue("first", "enhanced-locking", server=True, ips=[LOOPBACK],
                     dns_names=["localhost"])
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    install(first, cert, key)
    service = ServiceProcess(tmp_path / "data", ca_file=ca.pair.cert, args=[
        f"--enhanced-locking-tls-cert-file={cert}", f"--enhanced-locking-tls-key-file={key}",
    ])
    with running(service):
        yield ca, service, cert, key


def test_the_service_answers_over_https_with_its_certificate(
    tls: tuple[CertificateAuthority, ServiceProcess, Path, Path],
) -> None:
    ca, service, cert, _ = tls
    with httpx.Client(base_url=service.url, verify=trusting(ca), timeout=10) as http:
        answer = http.post("/v1/locks", json=acquire_body("acme/tls", pull=1))
        assert answer.status_code == 200
    assert presented_serial(service.port, ca.pair.cert) == x509.load_pem_x509_certificate(
        cert.read_bytes()).serial_number
    with pytest.raises(httpx.HTTPError), httpx.Client(timeout=5) as plain:
        plain.get(f"http://{LOOPBACK}:{service.port}/healthz")


def test_a_rotated_certificate_is_served_without_a_restart_and_a_broken_one_is_not(
    tls: tuple[CertificateAuthority, ServiceProcess, Path, Path],
) -> None:
    ca, service, cert, key = tls
    second = ca.issue("second", "enhanced-locking", server=True, ips=[LOOPBACK])
    install(second, cert, key)
    deadline = time.monotonic() + RELOADED
    while presented_serial(service.port, ca.pair.cert) != serial(second):
        assert time.monotonic() < deadline, "the rotated certificate was not picked up"
        time.sleep(0.2)
    cert.write_text("not a certificate")
    deadline = time.monotonic() + RELOADED
    while "not reloaded" not in service.output():
        assert time.monotonic() < deadline, "the broken certificate was not tried"
        time.sleep(0.2)
    assert presented_serial(service.port, ca.pair.cert) == serial(second)
    with httpx.Client(base_url=service.url, verify=trusting(ca), timeout=10) as http:
        assert http.get("/healthz").status_code == 200
    assert service.process is not None and service.process.poll() is None


def test_a_rotated_pair_whose_key_does_not_match_keeps_the_previous_certificate(
    tls: tuple[CertificateAuthority, ServiceProcess, Path, Path],
) -> None:
    ca, service, cert, key = tls
    first = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    second = ca.issue("second", "enhanced-locking", server=True, ips=[LOOPBACK])
    third = ca.issue("third", "enhanced-locking", server=True, ips=[LOOPBACK])
    # The new certificate loads, but its key is another one's: the pair must be refused whole.
    mismatched = KeyPair(cert=second.cert, key=third.key)
    install(mismatched, cert, key)
    deadline = time.monotonic() + RELOADED
    while "not reloaded" not in service.output():
        assert time.monotonic() < deadline, "the mismatched pair was not tried"
        time.sleep(0.2)
    assert presented_serial(service.port, ca.pair.cert) == first
    with httpx.Client(base_url=service.url, verify=trusting(ca), timeout=10) as http:
        assert http.get("/healthz").status_code == 200
    install(third, cert, key)
    deadline = time.monotonic() + RELOADED
    while presented_serial(service.port, ca.pair.cert) != serial(third):
        assert time.monotonic() < deadline, "the good pair after a mismatched one was not taken"
        time.sleep(0.2)


def presented_to_rsa_only(port: int, ca: Path) -> int | None:
    """The serial of the certificate a client that takes an RSA one only (TLS 1.2, RSA-signed
    key exchanges) is presented; None when the service has none for it (the handshake fails)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384")
    try:
        with socket.create_connection((LOOPBACK, port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=LOOPBACK) as tls:
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLError:
        return None
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_a_pair_rotated_to_another_key_type_leaves_no_client_the_replaced_certificate(
    tmp_path: Path,
) -> None:
    # OpenSSL keeps one certificate per key type in a context: an EC pair loaded over an RSA
    # one leaves the RSA certificate and key in place, presented to every client that can
    # take only RSA, after a rotation meant to retire them.
    ca = CertificateAuthority(tmp_path)
    first = ca.issue("first", "enhanced-locking", server=True, ips=[LOOPBACK], rsa_key=True)
    second = ca.issue("second", "enhanced-locking", server=True, ips=[LOOPBACK])
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    install(first, cert, key)
    service = ServiceProcess(tmp_path / "data", ca_file=ca.pair.cert, args=[
        f"--enhanced-locking-tls-cert-file={cert}", f"--enhanced-locking-tls-key-file={key}",
    ])
    with running(service):
        assert presented_to_rsa_only(service.port, ca.pair.cert) == serial(first)
        install(second, cert, key)
        deadline = time.monotonic() + RELOADED
        while presented_serial(service.port, ca.pair.cert) != serial(second):
            assert time.monotonic() < deadline, "the rotated certificate was not picked up"
            time.sleep(0.2)
        assert presented_to_rsa_only(service.port, ca.pair.cert) is None
        with httpx.Client(base_url=service.url, verify=trusting(ca), timeout=10) as http:
            assert http.get("/healthz").status_code == 200


def test_a_key_that_does_not_match_exits_2_naming_the_setting(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    one = ca.issue("one", "a", server=True, ips=[LOOPBACK])
    other = ca.issue("other", "b", server=True, ips=[LOOPBACK])
    service = ServiceProcess(tmp_path / "data", ca_file=ca.pair.cert, args=[
        f"--enhanced-locking-tls-cert-file={one.cert}",
        f"--enhanced-locking-tls-key-file={other.key}",
    ])
    with pytest.raises(Exception, match="exited with 2") as raised:
        service.start()
    assert "enhanced-locking-tls-cert-file" in str(raised.value)
    assert "Traceback" not in str(raised.value)


def _presented_by(context: ssl.SSLContext, ca: CertificateAuthority) -> int:
    """The serial of the certificate a handshake with ``context`` presents (in memory)."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = trusting(ca).wrap_bio(client_in, client_out, server_hostname=LOOPBACK)
    server = context.wrap_bio(server_in, server_out, server_side=True)
    done: set[int] = set()
    for _ in range(10):
        for number, side in enumerate((client, server)):
            if number in done:
                continue
            try:
                side.do_handshake()
                done.add(number)
            except ssl.SSLWantReadError:
                pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if done == {0, 1}:
            break
    der = client.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_files_rotated_between_the_trial_load_and_the_live_one_never_reach_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The pair is read once and loaded on a context of its own, which then serves: a rotation
    # landing after that load (here a pair whose key does not match) must not be what serves.
    ca = CertificateAuthority(tmp_path)
    first, second, third = (ca.issue(name, "enhanced-locking", server=True, ips=[LOOPBACK])
                            for name in ("first", "second", "third"))
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    install(first, cert, key)
    live = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    live.load_cert_chain(cert, key)
    reloader = CertificateReloader(live, str(cert), str(key))
    assert _presented_by(live, ca) == serial(first)
    install(second, cert, key)
    loading = ssl.SSLContext.load_cert_chain
    rotated: list[ssl.SSLContext] = []

    def load_then_rotate(context: ssl.SSLContext, certfile: Any, keyfile: Any = None,
                         password: Any = None) -> None:
        loading(context, certfile, keyfile, password)
        if context is not live and not rotated:  # the trial load passed: the files change
            rotated.append(context)
            install(KeyPair(cert=third.cert, key=second.key), cert, key)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", load_then_rotate)
    assert reloader.check()
    monkeypatch.undo()
    assert rotated  # the rotation did land between the two loads
    assert _presented_by(live, ca) == serial(second)  # the pair tried, whole
    assert reloader.loads == 1
