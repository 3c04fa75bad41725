"""Settings that are well formed but that a store cannot use, run as real subprocesses.

A Redis database number the server lacks, a TLS file that cannot be read, a data dir that is
not a directory: each is the user's mistake, so the process stops with exit code 2 and one line
naming the setting, not a traceback and not "cannot start" (which blames the store).
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.integration.test_cli import run
from tests.support.controlplane import CertificateAuthority
from tests.support.etcd_fixtures import auth_on, started
from tests.support.etcd_server import EtcdCluster
from tests.support.redis_server import RedisServer
from tests.support.service import free_port


def _one_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("enhanced-locking: ")
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _given(how: str, env_name: str, flag: str, key: str, value: str,
           tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """A setting given by flag, env or YAML: the arguments and environment to add."""
    if how == "flag":
        return [flag, value], {}
    if how == "env":
        return [], {env_name: value}
    (tmp_path / "atlantis.yaml").write_text(f"{key}: {value}\n")
    return ["--config", str(tmp_path / "atlantis.yaml")], {}


def _source(how: str, env_name: str, flag: str, key: str, tmp_path: Path) -> str:
    """How the one line says where a value given by :func:`_given` came from."""
    return {"flag": f"flag {flag}", "env": f"env {env_name}",
            "yaml": f"YAML key {key} in {tmp_path / 'atlantis.yaml'}"}[how]


# --- a Redis database number the server lacks --------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "env", "yaml"])
@pytest.mark.parametrize("command", ["serve-enhanced", "serve-legacy", "migrate-import"])
def test_a_redis_database_the_server_lacks_exits_2_naming_the_setting(
    redis_server: RedisServer, command: str, how: str, tmp_path: Path,
) -> None:
    # redis-server has 16 databases unless told otherwise; the config allows up to 1023.
    given, env = _given(how, "ATLANTIS_ENHANCED_LOCKING_REDIS_DB", "--enhanced-locking-redis-db",
                        "enhanced-locking-redis-db", "100", tmp_path)
    at = ["--enhanced-locking-redis-addr", redis_server.addr]
    if command == "migrate-import":
        args = ["migrate", "import", "--from-redis", f"redis://{redis_server.addr}/0",
                "--enhanced-locking-backend", "redis"]
    else:
        side = (["--enhanced-locking-enabled", "--enhanced-locking-backend", "redis"]
                if command == "serve-enhanced" else ["--enhanced-locking-legacy-backend", "redis"])
        args = ["serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"), *side]
    where = _source(how, "ATLANTIS_ENHANCED_LOCKING_REDIS_DB", "--enhanced-locking-redis-db",
                    "enhanced-locking-redis-db", tmp_path)
    line = _one_line(run(*args, *at, *given, env=env),
                     f"invalid setting enhanced-locking-redis-db (from {where}): ",
                     "no such database")
    assert "cannot start" not in line


# --- a Redis or etcd TLS file that cannot be read ----------------------------------------------


@pytest.mark.parametrize("store", ["redis", "etcd"])
@pytest.mark.parametrize("missing", ["ca-file", "cert-file", "key-file"])
@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_tls_file_that_cannot_be_read_exits_2_naming_the_setting_and_path(
    store: str, missing: str, how: str, tmp_path: Path,
) -> None:
    present = tmp_path / "present.pem"
    present.write_text("-----BEGIN CERTIFICATE-----\n")
    files = {"ca-file": present, "cert-file": present, "key-file": present}
    files[missing] = tmp_path / "absent" / missing
    args = ["serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"),
            "--enhanced-locking-enabled", "--enhanced-locking-backend", store,
            f"--enhanced-locking-{store}-tls"]
    env: dict[str, str] = {}
    for name, path in files.items():
        more, also = _given(how, f"ATLANTIS_ENHANCED_LOCKING_{store.upper()}_TLS_"
                            f"{name.upper().replace('-', '_')}", f"--enhanced-locking-{store}-tls-"
                            f"{name}", "", str(path), tmp_path)
        args += more
        env |= also
    setting = f"enhanced-locking-{store}-tls-{missing}"
    where = _source(how, f"ATLANTIS_{setting.upper().replace('-', '_')}", f"--{setting}",
                    setting, tmp_path)
    line = _one_line(run(*args, env=env), f"invalid setting {setting} (from {where}): ",
                     str(files[missing]), "no such file")
    assert "did not answer" not in line and "connect failed" not in line


@pytest.mark.parametrize("store", ["redis", "etcd"])
@pytest.mark.parametrize(("broken", "why"), [
    ("ca-file", "holds no PEM certificate"),
    ("cert-file", "holds no PEM certificate"),
    ("key-file", "holds no PEM private key"),
    ("key-file-of-another", "is not the key of"),
])
def test_a_tls_file_that_is_read_but_cannot_be_used_exits_2_naming_the_setting_and_path(
    store: str, broken: str, why: str, tmp_path: Path,
) -> None:
    # Read, but not a CA bundle or a certificate and its key: before, the store's client found
    # out when it connected, and the process ended "cannot start: ... did not answer" (exit 1,
    # blaming the store; etcd's client also wrote four lines of its own).
    ca = CertificateAuthority(tmp_path)
    client, other = ca.issue("client", "enhanced-locking"), ca.issue("other", "someone-else")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    files = {"ca-file": ca.pair.cert, "cert-file": client.cert, "key-file": client.key}
    setting = broken.removesuffix("-of-another")
    files[setting] = other.key if broken == "key-file-of-another" else garbage
    args = ["serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"),
            "--enhanced-locking-enabled", "--enhanced-locking-backend", store,
            f"--enhanced-locking-{store}-tls"]
    for name, path in files.items():
        args += [f"--enhanced-locking-{store}-tls-{name}", str(path)]
    flag = f"--enhanced-locking-{store}-tls-{setting}"
    line = _one_line(run(*args), f"invalid setting {flag[2:]} (from flag {flag}): ",
                     str(files[setting]), why)
    assert "did not answer" not in line and "cannot start" not in line


def test_migrate_import_names_an_unreadable_redis_tls_file(
    redis_server: RedisServer, tmp_path: Path,
) -> None:
    _one_line(run("migrate", "import", "--from-redis", f"redis://{redis_server.addr}/0",
                  "--enhanced-locking-backend", "redis", "--enhanced-locking-redis-tls",
                  "--enhanced-locking-redis-tls-ca-file", str(tmp_path / "ca.pem")),
              "invalid setting enhanced-locking-redis-tls-ca-file (from flag "
              "--enhanced-locking-redis-tls-ca-file): ", str(tmp_path / "ca.pem"))


# --- a Redis login refused at start ------------------------------------------------------------

_SECRET = "hunter2-s3cret"


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of this module's own that requires a password and has an ACL user."""
    with RedisServer(tmp_path_factory.mktemp("redis-auth")) as server:
        server.start()
        server.create_acl_user("atlantis", "atlantis-password")
        server.set_requirepass("the-right-password")
        yield server


@pytest.mark.parametrize(("side", "login", "refused"), [
    ("enhanced", ["--enhanced-locking-redis-password", _SECRET], "refused this password"),
    ("legacy", ["--enhanced-locking-redis-password", _SECRET], "refused this password"),
    ("enhanced", [], "refused a login without a password"),
    ("enhanced", ["--enhanced-locking-redis-username", "nobody",
                  "--enhanced-locking-redis-password", "atlantis-password"],
     "refused the login of user 'nobody' (enhanced-locking-redis-username)"),
    ("legacy", ["--enhanced-locking-redis-username", "atlantis",
                "--enhanced-locking-redis-password", _SECRET],
     "refused the login of user 'atlantis' (enhanced-locking-redis-username)"),
], ids=["wrong-password", "wrong-password-legacy", "no-password", "unknown-user",
        "wrong-user-password-legacy"])
def test_a_redis_login_refused_at_start_exits_2_naming_the_password_setting(
    locked_redis: RedisServer, side: str, login: list[str], refused: str, tmp_path: Path,
) -> None:
    # Before, "cannot start: ... AuthenticationError" and exit 1, as if Redis were down.
    store = (["--enhanced-locking-enabled", "--enhanced-locking-backend", "redis"]
             if side == "enhanced" else ["--enhanced-locking-legacy-backend", "redis"])
    where = "flag --enhanced-locking-redis-password" if login else "default"
    result = run("serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"),
                 "--enhanced-locking-redis-addr", locked_redis.addr, *store, *login)
    line = _one_line(result, f"invalid setting enhanced-locking-redis-password (from {where}): ",
                     f"redis {locked_redis.addr} db 0 {refused}")
    assert _SECRET not in result.stdout + result.stderr and "cannot start" not in line


# --- an etcd user refused at start -------------------------------------------------------------


@pytest.fixture(scope="module")
def locked_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """An etcd member of this module's own with auth on (user ``root``)."""
    with started(tmp_path_factory.mktemp("etcd-auth")) as cluster:
        asyncio.run(auth_on(cluster, password="the-right-password"))
        yield cluster


@pytest.mark.parametrize(("login", "setting", "refused"), [
    (["--enhanced-locking-etcd-username", "root", "--enhanced-locking-etcd-password", _SECRET],
     "enhanced-locking-etcd-password",
     "refused the login of user 'root' (enhanced-locking-etcd-username) with this password"),
    (["--enhanced-locking-etcd-username", "nobody",
      "--enhanced-locking-etcd-password", "the-right-password"],
     "enhanced-locking-etcd-password",
     "refused the login of user 'nobody' (enhanced-locking-etcd-username) with this password"),
    ([], "enhanced-locking-etcd-username", "has auth on and needs a user and its password"),
], ids=["wrong-password", "unknown-user", "no-user"])
def test_an_etcd_login_refused_at_start_exits_2_naming_the_setting(
    locked_etcd: EtcdCluster, login: list[str], setting: str, refused: str, tmp_path: Path,
) -> None:
    # Before, "cannot start: etcd ...: connect failed (INVALID_ARGUMENT: ...)" and exit 1.
    endpoint = locked_etcd.endpoints[0]
    result = run("serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"),
                 "--enhanced-locking-enabled", "--enhanced-locking-backend", "etcd",
                 "--enhanced-locking-etcd-endpoints", endpoint, *login)
    where = f"flag --{setting}" if login else "default"
    line = _one_line(result, f"invalid setting {setting} (from {where}): ",
                     f"etcd {endpoint} {refused}")
    assert _SECRET not in result.stdout + result.stderr and "cannot start" not in line
