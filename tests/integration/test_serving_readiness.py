"""GET /serving, the chart's readiness probe: a replica that alone lost Redis stops serving
while its peer reaches Redis (and its fall-back refuses rather than grant on legacy what the
peer may grant on Redis), and with Redis stopped for every replica each keeps serving and
answers through the fall-back (``legacy`` grants there, ``fail-closed`` refuses with
``unavailable``).

Two ``serve`` processes on one real redis-server: replica A reaches it through a loopback
proxy (closing the proxy cuts A alone off), replica B directly. A's peer is B
(``enhanced-locking-peers``); B has none, so it answers as a replica alone does.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.support.controlplane import CertificateAuthority, KeyPair
from tests.support.cutting_proxy import CuttingProxy, cutting_proxy
from tests.support.locks import lock_body
from tests.support.redis_server import RedisServer
from tests.support.service import ServiceProcess, services

pytestmark = pytest.mark.redis

REPO = "acme/serving"


def _service(root: Path, name: str, redis_addr: str, fallback: str,
             *extra: str, ca_file: Path | None = None) -> ServiceProcess:
    return ServiceProcess(
        root / f"data-{name}",
        args=("--enhanced-locking-enabled", "--enhanced-locking-backend=redis",
              f"--enhanced-locking-redis-addr={redis_addr}",
              f"--enhanced-locking-fallback={fallback}", *extra),
        log_dir=root / "logs", ca_file=ca_file,
    )


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[CuttingProxy]:
    """The proxy replica A reaches Redis through; closed by the test to cut A alone off."""
    host, port = redis_server.addr.rsplit(":", 1)
    with cutting_proxy((host, int(port))) as cut:
        yield cut


def _serving(http: httpx.Client, url: str) -> httpx.Response:
    return http.get(url + "/serving")


def _wait_serving(http: httpx.Client, url: str, *, within: float = 30.0) -> httpx.Response:
    """``/serving`` once it is 200 (the peers' answers are kept a second); fails after
    ``within`` seconds with the last answer."""
    deadline = time.monotonic() + within
    while True:
        answer = _serving(http, url)
        if answer.status_code == 200 or time.monotonic() > deadline:
            assert answer.status_code == 200, answer.text
            return answer
        time.sleep(0.2)


@pytest.mark.parametrize("fallback", ["legacy", "fail-closed"])
def test_a_replica_alone_cut_from_redis_stops_serving_and_all_cut_keep_serving(
    redis_server: RedisServer, proxy: CuttingProxy, tmp_path: Path, fallback: str,
) -> None:
    with services() as group, httpx.Client(timeout=30) as http:
        b = group.start(_service(tmp_path, "b", redis_server.addr, fallback))
        a = group.start(_service(tmp_path, "a", proxy.addr, fallback,
                                 f"--enhanced-locking-peers=127.0.0.1:{b.port}"))
        for replica in (a, b):
            answer = _serving(http, replica.url)
            assert answer.status_code == 200, answer.text
            assert answer.json()["serving"] is True and answer.json()["ready"] is True

        # A alone loses Redis: B still grants on it, so A must not take traffic (its
        # fall-back grants would split keys across the sides).
        proxy.close()
        assert http.get(a.url + "/readyz").status_code == 503
        cut = _serving(http, a.url)
        assert cut.status_code == 503, cut.text
        assert cut.json()["serving"] is False and cut.json()["ready"] is False
        assert cut.json()["readyPeer"] == f"127.0.0.1:{b.port}"
        assert _serving(http, b.url).status_code == 200
        # Until the kubelet acts, A's fall-back refuses: B may grant the key on Redis.
        refused = http.post(a.url + "/v1/locks", json=lock_body(REPO, "envs/0", 9, project=None))
        assert refused.status_code == 503, refused.text
        assert refused.json()["reason"] == "unavailable"
        granted = http.post(b.url + "/v1/locks", json=lock_body(REPO, "envs/0", 8, project=None))
        assert granted.status_code == 200 and granted.json()["lock"]["backend"] == "enhanced"

        # Redis down for every replica: both keep serving, and answer alike. (A's last look
        # at B is up to a second old: it is asked again after that.)
        redis_server.stop()
        for replica in (a, b):
            assert http.get(replica.url + "/readyz").status_code == 503
            answer = _wait_serving(http, replica.url)
            body = answer.json()
            assert body["serving"] is True and body["ready"] is False
            assert body["readyPeer"] is None
            assert body["backends"]["legacy"] == "ok" and body["backends"]["enhanced"] != "ok"
        for pull, replica in enumerate((a, b), start=1):
            lock = http.post(replica.url + "/v1/locks",
                             json=lock_body(REPO, f"envs/{pull}", pull, project=None))
            if fallback == "legacy":
                assert lock.status_code == 200, lock.text
                assert lock.json()["lock"]["backend"] == "legacy"
            else:
                assert lock.status_code == 503, lock.text
                assert lock.json()["reason"] == "unavailable"


def test_a_peer_that_does_not_answer_counts_as_not_serving(
    redis_server: RedisServer, tmp_path: Path,
) -> None:
    """A peer gone (nothing listens at its address) or a name that does not resolve stands
    for nobody: the replica, its Redis stopped, keeps serving."""
    # A port bound and not listening, held for the test: a connection to it is refused, and
    # no other process can start listening there meanwhile.
    with socket.socket() as gone, services() as group, httpx.Client(timeout=30) as http:
        gone.bind(("127.0.0.1", 0))
        gone_port = gone.getsockname()[1]
        a = group.start(_service(
            tmp_path, "a", redis_server.addr, "legacy",
            f"--enhanced-locking-peers=127.0.0.1:{gone_port},peers.invalid:4142"))
        redis_server.stop()
        answer = _serving(http, a.url)
        assert answer.status_code == 200, answer.text
        assert answer.json()["readyPeer"] is None


def test_a_replica_that_grants_no_lock_stops_serving_while_a_peer_is_ready(
    tmp_path: Path,
) -> None:
    """Replica A runs with enhanced locking off on a Redis that does not answer, which may
    still hold locks: A grants none until it reads it. Its stores answer, but it is not
    ready (``/readyz`` says why), and while its peer B is ready the kubelet is told to send
    the traffic there; alone, A keeps serving (its refusals say why). Before, A was ready and
    took traffic it refused."""
    with socket.socket() as dead, services() as group, httpx.Client(timeout=30) as http:
        dead.bind(("127.0.0.1", 0))
        unread = ("--enhanced-locking-backend=redis",
                  f"--enhanced-locking-redis-addr=127.0.0.1:{dead.getsockname()[1]}")
        b = group.start(ServiceProcess(tmp_path / "data-b", log_dir=tmp_path / "logs"))
        a = group.start(ServiceProcess(
            tmp_path / "data-a", args=(*unread, f"--enhanced-locking-peers=127.0.0.1:{b.port}"),
            log_dir=tmp_path / "logs"))
        alone = group.start(ServiceProcess(tmp_path / "data-c", args=unread,
                                           log_dir=tmp_path / "logs"))
        refused = http.post(a.url + "/v1/locks", json=lock_body(REPO, "envs/0", 9, project=None))
        assert refused.status_code == 503 and refused.json()["reason"] == "unavailable"

        ready = http.get(a.url + "/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["ready"] is False and ready.json()["backends"] == {"legacy": "ok"}
        assert ready.json()["withheld"] == refused.json()["error"]
        cut = _serving(http, a.url)
        assert cut.status_code == 503, cut.text
        assert cut.json()["readyPeer"] == f"127.0.0.1:{b.port}"
        assert _serving(http, b.url).status_code == 200

        kept = _serving(http, alone.url)
        assert kept.status_code == 200, kept.text
        assert kept.json()["serving"] is True and kept.json()["ready"] is False


def test_replicas_that_all_grant_no_lock_all_keep_serving(tmp_path: Path) -> None:
    """Every replica withholding (each one's switched-off Redis unread; likewise each waiting
    for its LockPolicy at a rolling update's start): a replica whose peer grants no lock either
    counts no peer ready, so it keeps serving and refuses saying why. None leaves the Service
    for a peer that would refuse as well: the replicas never all wait on each other."""
    with socket.socket() as dead, services() as group, httpx.Client(timeout=30) as http:
        dead.bind(("127.0.0.1", 0))
        unread = ("--enhanced-locking-backend=redis",
                  f"--enhanced-locking-redis-addr=127.0.0.1:{dead.getsockname()[1]}")
        b = group.start(ServiceProcess(tmp_path / "data-b", args=unread,
                                       log_dir=tmp_path / "logs"))
        a = group.start(ServiceProcess(
            tmp_path / "data-a", args=(*unread, f"--enhanced-locking-peers=127.0.0.1:{b.port}"),
            log_dir=tmp_path / "logs"))
        peer = http.get(b.url + "/readyz")
        assert peer.status_code == 503 and "withheld" in peer.json(), peer.text

        kept = _serving(http, a.url)
        assert kept.status_code == 200, kept.text
        assert kept.json()["serving"] is True and kept.json()["ready"] is False
        assert kept.json()["readyPeer"] is None and "withheld" in kept.json()
        refused = http.post(a.url + "/v1/locks", json=lock_body(REPO, "envs/0", 9, project=None))
        assert refused.status_code == 503 and refused.json()["reason"] == "unavailable"
        assert refused.json()["error"] == kept.json()["withheld"]


def _serving_files(directory: Path, pair: KeyPair) -> tuple[str, str]:
    """``pair`` copied where a Secret volume would hold it: the settings that serve it."""
    directory.mkdir()
    cert, key = directory / "tls.crt", directory / "tls.key"
    _install(pair, cert, key)
    return f"--enhanced-locking-tls-cert-file={cert}", f"--enhanced-locking-tls-key-file={key}"


def _install(pair: KeyPair, cert: Path, key: Path) -> None:
    # As a Secret volume does: the new files replace the old ones whole.
    for source, target in ((pair.key, key), (pair.cert, cert)):
        new = target.with_name(target.name + ".new")
        new.write_bytes(source.read_bytes())
        new.replace(target)


def test_over_https_a_peer_counts_only_with_the_replicas_certificate(
    redis_server: RedisServer, proxy: CuttingProxy, tmp_path: Path,
) -> None:
    """With tls-cert-file the replicas ask each other over HTTPS and believe only a peer that
    presents their own certificate: B, serving another CA's certificate, does not take A (cut
    off from Redis) out; once B serves the replicas' certificate, it does."""
    (tmp_path / "ca").mkdir()
    (tmp_path / "other").mkdir()
    ca, other = CertificateAuthority(tmp_path / "ca"), CertificateAuthority(tmp_path / "other")
    ours = ca.issue("ours", "enhanced-locking", server=True, ips=["127.0.0.1"])
    forged = other.issue("forged", "enhanced-locking", server=True, ips=["127.0.0.1"])
    b_files = _serving_files(tmp_path / "tls-b", forged)
    with services() as group, httpx.Client(
            timeout=30, verify=ssl.create_default_context(cafile=ca.pair.cert)) as http:
        b = group.start(_service(tmp_path, "b", redis_server.addr, "legacy", *b_files,
                                 ca_file=other.pair.cert))
        a = group.start(_service(tmp_path, "a", proxy.addr, "legacy",
                                 *_serving_files(tmp_path / "tls-a", ours),
                                 f"--enhanced-locking-peers=127.0.0.1:{b.port}",
                                 ca_file=ca.pair.cert))
        proxy.close()
        answer = _serving(http, a.url)
        assert answer.status_code == 200, answer.text
        assert answer.json()["ready"] is False and answer.json()["readyPeer"] is None

        # B serves the replicas' certificate (read within 2 s of the change): A goes out.
        _install(ours, *(Path(f.split("=", 1)[1]) for f in b_files))
        deadline = time.monotonic() + 60
        while (answer := _serving(http, a.url)).status_code != 503:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.2)
        assert answer.json()["readyPeer"] == f"127.0.0.1:{b.port}"
