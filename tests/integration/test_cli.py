"""The ``enhanced-locking`` command, each subcommand run as a real subprocess.

Exit codes: 0 done; 1 refused (held, not found, not owned); 2 invalid usage or config; 3 the
service could not be reached. A user's mistake is one line on stderr, never a traceback.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import ServiceFactory
from tests.support.loopback_http import serving
from tests.support.redis_server import RedisServer
from tests.support.service import (
    SHORT_CONNECT_TIMEOUT,
    enhanced_locking_command,
    free_port,
    scrubbed_env,
)
from tests.support.unreadable import SECRET as PLANTED
from tests.support.unreadable import spoil_file

from enhanced_locking.backends.embedded import open_database
from enhanced_locking.config import settings

SECRET = "hunter2-s3cret"


def run(*args: str, env: Mapping[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``enhanced-locking ARGS`` with a clean environment (plus ``env``)."""
    return subprocess.run([*enhanced_locking_command(), *args], capture_output=True, text=True,
                          env=scrubbed_env(env), cwd=cwd, timeout=60)


def output(result: subprocess.CompletedProcess[str]) -> Any:
    assert "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout)


# --- config show -------------------------------------------------------------------------------


def test_config_show_prints_the_effective_config_as_json() -> None:
    result = run("config", "show")
    assert result.returncode == 0, result.stderr
    shown = output(result)
    assert shown["enhanced-locking-enabled"] is False
    assert shown["enhanced-locking-backend"] == "boltdb"
    assert shown["enhanced-locking-default-timeout"] == "30s"
    assert set(shown) == {setting.key for setting in settings()}


def test_config_show_applies_yaml_env_and_flags_in_that_order(tmp_path: Path) -> None:
    config = tmp_path / "atlantis.yaml"
    config.write_text("enhanced-locking-redis-db: 1\nenhanced-locking-max-queue-size: 10\n"
                      "enhanced-locking-enabled: true\n")
    result = run("config", "show", "--config", str(config), "--enhanced-locking-redis-db=3",
                 env={"ATLANTIS_ENHANCED_LOCKING_REDIS_DB": "2",
                      "ATLANTIS_ENHANCED_LOCKING_MAX_QUEUE_SIZE": "20"})
    shown = output(result)
    assert (shown["enhanced-locking-redis-db"], shown["enhanced-locking-max-queue-size"],
            shown["enhanced-locking-enabled"]) == (3, 20, True)


@pytest.mark.parametrize("how", ["env", "flag", "yaml"])
def test_config_show_masks_the_redis_password(how: str, tmp_path: Path) -> None:
    args, env = ["config", "show"], {}
    if how == "env":
        env = {"ATLANTIS_ENHANCED_LOCKING_REDIS_PASSWORD": SECRET}
    elif how == "flag":
        args.append(f"--enhanced-locking-redis-password={SECRET}")
    else:
        (tmp_path / "c.yaml").write_text(f"enhanced-locking-redis-password: {SECRET}\n")
        args += ["--config", str(tmp_path / "c.yaml")]
    result = run(*args, env=env)
    assert result.returncode == 0
    assert output(result)["enhanced-locking-redis-password"] == "********"
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("command", [["config", "show"], ["serve"]], ids=["config-show", "serve"])
def test_a_password_in_a_redis_address_is_never_shown(command: list[str], tmp_path: Path) -> None:
    args = [*command, f"--enhanced-locking-redis-addr=redis://:{SECRET}@127.0.0.1:6379/0"]
    if command == ["serve"]:
        args += ["--port", "0", "--data-dir", str(tmp_path / "data")]
    result = run(*args)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "enhanced-locking: invalid setting enhanced-locking-redis-addr (from flag "
        "--enhanced-locking-redis-addr): got 'redis://***@127.0.0.1:6379/0'; expected host:port "
        "such as localhost:6379"]
    assert SECRET not in result.stdout + result.stderr


INVALID = [
    # what is wrong, how it is given, the setting the one line must name, and the accepted form
    ("bad bool", ["--enhanced-locking-enabled=maybe"], {}, None,
     "enhanced-locking-enabled", "true or false"),
    ("bad duration", [], {"ATLANTIS_ENHANCED_LOCKING_DEFAULT_TIMEOUT": "30"}, None,
     "enhanced-locking-default-timeout", "Go duration"),
    ("bad int", [], {"ATLANTIS_ENHANCED_LOCKING_REDIS_DB": "zero"}, None,
     "enhanced-locking-redis-db", "an integer from 0 to 1023"),
    ("int out of range", ["--enhanced-locking-max-priority-boost=9"], {}, None,
     "enhanced-locking-max-priority-boost", "an integer from 0 to 3"),
    ("unknown backend", [], {}, "enhanced-locking-backend: zookeeper\n",
     "enhanced-locking-backend", "one of boltdb, redis, etcd, memory"),
    ("max below default", ["--enhanced-locking-max-timeout=10s"], {}, None,
     "enhanced-locking-max-timeout", "enhanced-locking-default-timeout"),
    ("unknown YAML key", [], {}, "enhanced-locking-enabeld: true\n",
     "enhanced-locking-enabeld", "unknown setting"),
    ("bad redis address", ["--enhanced-locking-redis-addr=redis"], {}, None,
     "enhanced-locking-redis-addr", "host:port"),
    ("YAML not a mapping", [], {}, "- enhanced-locking-enabled\n", "config file", "mapping"),
    ("bool as yes", ["--enhanced-locking-enabled=yes"], {}, None,
     "enhanced-locking-enabled", "true or false"),
    ("bool as 1", [], {"ATLANTIS_ENHANCED_LOCKING_ENABLED": "1"}, None,
     "enhanced-locking-enabled", "true or false"),
    ("bool as YAML off", [], {}, "enhanced-locking-enabled: off\n",
     "enhanced-locking-enabled", "true or false"),
    ("int with underscore", ["--enhanced-locking-max-queue-size=1_000"], {}, None,
     "enhanced-locking-max-queue-size", "an integer"),
    ("int as float", [], {}, "enhanced-locking-max-queue-size: 1000.0\n",
     "enhanced-locking-max-queue-size", "an integer"),
    ("int as YAML true", [], {}, "enhanced-locking-max-queue-size: true\n",
     "enhanced-locking-max-queue-size", "an integer"),
    ("non-ASCII digits", [], {"ATLANTIS_ENHANCED_LOCKING_REDIS_DB": "\u0663"}, None,
     "enhanced-locking-redis-db", "an integer"),
    ("duplicate YAML key", [], {},
     "enhanced-locking-enabled: true\nenhanced-locking-enabled: false\n",
     "enhanced-locking-enabled", "set twice"),
    ("YAML syntax error", [], {}, "enhanced-locking-backend: [redis\nx: 1\n",
     "not valid YAML", "line 2"),
    ("address with spaces", ["--enhanced-locking-redis-addr=a b c:1"], {}, None,
     "enhanced-locking-redis-addr", "host:port"),
    ("empty key prefix", [], {"ATLANTIS_ENHANCED_LOCKING_REDIS_KEY_PREFIX": ""}, None,
     "enhanced-locking-redis-key-prefix", "non-empty"),
    ("empty data dir", [], {"ATLANTIS_DATA_DIR": ""}, None, "data-dir", "non-empty"),
    ("NUL in data dir", [], {}, 'data-dir: "data\\0dir"\n', "data-dir", "NUL"),
    ("TLS file with TLS off", ["--enhanced-locking-redis-tls-ca-file=ca.pem"], {}, None,
     "enhanced-locking-redis-tls-ca-file needs enhanced-locking-redis-tls true",
     "from flag --enhanced-locking-redis-tls-ca-file"),
    ("YAML key that is a list", [], {}, "? [enhanced-locking-enabled]\n: true\n",
     "a key is a list or a mapping", "line 1"),
    ("YAML value its tag cannot build", [], {}, "enhanced-locking-enabled: !!bool maybe\n",
     "not valid YAML", "line 1"),
]


@pytest.mark.parametrize("command", [["config", "show"], ["serve"]], ids=["config-show", "serve"])
@pytest.mark.parametrize(("flags", "env", "yaml_text", "names", "form"),
                         [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_an_invalid_value_exits_2_with_one_line_naming_the_setting(
    command: list[str], flags: list[str], env: dict[str, str], yaml_text: str | None,
    names: str, form: str, tmp_path: Path,
) -> None:
    args = [*command, *flags]
    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(yaml_text)
        args += ["--config", str(tmp_path / "c.yaml")]
    if command == ["serve"]:
        args += ["--port", str(free_port())]
        if names != "data-dir":  # the flag would win over the bad value under test
            args += ["--data-dir", str(tmp_path / "data")]
    result = run(*args, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert names in lines[0] and form in lines[0]
    assert lines[0].startswith("enhanced-locking: ")
    assert "Traceback" not in result.stderr


def test_a_config_file_that_is_not_utf8_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_bytes(b"enhanced-locking-enabled: \xff\n")
    for command in (["config", "show"], ["serve", "--port", str(free_port())]):
        result = run(*command, "--config", str(tmp_path / "c.yaml"))
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            f"enhanced-locking: config file {tmp_path / 'c.yaml'} is not UTF-8 text "
            "(byte 0xff at offset 26)"]


@pytest.mark.parametrize(("args", "env", "names"), [
    ([], {"ENHANCED_LOCKING_PORT": "abc"}, "ENHANCED_LOCKING_PORT"),
    ([], {"ENHANCED_LOCKING_PORT": "\u0664\u0661\u0664\u0662"}, "ENHANCED_LOCKING_PORT"),
    (["--port", "70000"], {}, "--port"),
    (["--port", "65536"], {}, "--port"),
    (["--port", "-1"], {}, "--port"),
], ids=["env-abc", "env-arabic-digits", "flag-70000", "flag-65536", "flag-negative"])
def test_a_bad_port_exits_2_with_one_line_naming_it(
    args: list[str], env: dict[str, str], names: str, tmp_path: Path,
) -> None:
    result = run("serve", *args, "--data-dir", str(tmp_path / "data"), env=env)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and names in lines[0] and "0 to 65535" in lines[0], result.stderr


def test_serve_on_a_port_in_use_exits_2_not_3_naming_the_setting(tmp_path: Path) -> None:
    # 3 means "the service could not be reached"; a port in use is the user's setting.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--port", str(port), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "--port" in lines[0] and "address already in use" in lines[0]
    assert lines[0].startswith("enhanced-locking: ")


def test_a_bad_value_is_reported_with_where_it_came_from(tmp_path: Path) -> None:
    result = run("config", "show", env={"ATLANTIS_ENHANCED_LOCKING_REDIS_DB": "zero"})
    assert "env ATLANTIS_ENHANCED_LOCKING_REDIS_DB" in result.stderr
    result = run("config", "show", "--enhanced-locking-redis-db=zero")
    assert "flag --enhanced-locking-redis-db" in result.stderr


@pytest.mark.parametrize("how", ["env", "flag", "yaml"])
def test_a_rule_over_two_settings_says_where_each_value_came_from(
    how: str, tmp_path: Path,
) -> None:
    args, env = ["config", "show"], {"ATLANTIS_ENHANCED_LOCKING_DEFAULT_TIMEOUT": "10m"}
    if how == "env":
        env["ATLANTIS_ENHANCED_LOCKING_MAX_TIMEOUT"] = "5m"
        source = "env ATLANTIS_ENHANCED_LOCKING_MAX_TIMEOUT"
    elif how == "flag":
        args.append("--enhanced-locking-max-timeout=5m")
        source = "flag --enhanced-locking-max-timeout"
    else:
        (tmp_path / "c.yaml").write_text("enhanced-locking-max-timeout: 5m\n")
        args += ["--config", str(tmp_path / "c.yaml")]
        source = f"YAML key enhanced-locking-max-timeout in {tmp_path / 'c.yaml'}"
    result = run(*args, env=env)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "must be at least enhanced-locking-default-timeout (got 5m < 10m)" in lines[0]
    assert f"enhanced-locking-max-timeout from {source}" in lines[0]
    assert ("enhanced-locking-default-timeout from env ATLANTIS_ENHANCED_LOCKING_DEFAULT_TIMEOUT"
            in lines[0])
    one_set = run("config", "show", "--enhanced-locking-tls-cert-file=cert.pem")
    assert ("(enhanced-locking-tls-cert-file from flag --enhanced-locking-tls-cert-file, "
            "enhanced-locking-tls-key-file from default)") in one_set.stderr


@pytest.mark.parametrize("missing", ["cert", "key"])
def test_serve_names_the_tls_file_that_cannot_be_read(missing: str, tmp_path: Path) -> None:
    files = {"cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    files["cert" if missing == "key" else "key"].write_text("-----BEGIN CERTIFICATE-----\n")
    result = run("serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"),
                 f"--enhanced-locking-tls-cert-file={files['cert']}",
                 f"--enhanced-locking-tls-key-file={files['key']}")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"enhanced-locking: invalid setting enhanced-locking-tls-{missing}-file (from flag "
        f"--enhanced-locking-tls-{missing}-file): cannot read {files[missing]}: no such file "
        "or directory"]
    assert not (tmp_path / "data").exists()  # refused before any store is opened


def test_an_unknown_flag_is_a_usage_error() -> None:
    result = run("config", "show", "--enhanced-locking-enabledd")
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("args", "shown"), [
    (["config", "show", "--enhanced-locking-enable"], "--enhanced-locking-enable"),
    (["config", "show", "--enhanced-locking-max-t", "10m"],
     "--enhanced-locking-max-t (value not shown)"),
    (["serve", "--port", "0", "--enhanced-locking-redis-pass=x"],
     "--enhanced-locking-redis-pass=(value not shown)"),
], ids=["bool", "duration", "serve"])
def test_a_flag_is_taken_only_as_written_not_by_a_prefix(
    args: list[str], shown: str, tmp_path: Path
) -> None:
    # As Go's flags (Atlantis's): argparse took any unambiguous prefix, so a misspelling of a
    # flag could set a setting (--enhanced-locking-enable turned the system on).
    result = run(*args, "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"enhanced-locking: error: unrecognized arguments: {shown}"]


@pytest.mark.parametrize("spelled", ["=", " "], ids=["joined", "separate"])
def test_a_misspelled_flag_never_shows_its_value(spelled: str) -> None:
    # The value of a flag nobody knows may be a password (here a misspelled
    # --enhanced-locking-redis-password): the usage error printed it to the log.
    flag = "--enhanced-locking-redis-pasword"
    result = run("config", "show", *f"{flag}{spelled}{SECRET}".split(" "), "extra")
    assert result.returncode == 2
    assert SECRET not in result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"enhanced-locking: error: unrecognized arguments: {flag}"
        + ("=(value not shown)" if spelled == "=" else " (value not shown)") + " extra"]


# --- serve -------------------------------------------------------------------------------------


def test_serve_offers_every_setting_as_a_flag() -> None:
    result = run("serve", "--help")
    assert result.returncode == 0
    for setting in settings():
        assert setting.flag in result.stdout


@pytest.mark.parametrize("where", ["under-a-file", "a-file", "proc", "unknown-user"])
def test_serve_on_a_data_dir_it_cannot_create_exits_2_naming_the_setting(
    tmp_path: Path, where: str,
) -> None:
    # The path is the user's mistake (a file where the directory goes, a place that cannot
    # hold one): a bad setting, exit 2; "cannot start" (exit 1) is left to the disk's errors.
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    data_dir = {"under-a-file": str(blocker / "data"), "a-file": str(blocker),
                "proc": "/proc/enhanced-locking-nope",
                "unknown-user": "~enhanced-locking-no-such-user/data"}[where]
    result = run("serve", "--port", str(free_port()), "--data-dir", data_dir)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "enhanced-locking: invalid setting data-dir (from flag --data-dir): ")
    assert "embedded store" in lines[0] and data_dir in lines[0]
    assert "cannot start" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("made", ["new", "existing", "file-read-only"])
def test_serve_on_a_data_dir_it_cannot_write_exits_2_naming_the_setting(
    tmp_path: Path, made: str,
) -> None:
    """The data dir (or the store file in it) is bound read-only, as a volume mounted
    read-only would be: a bad setting (exit 2, one line naming data-dir), whether the store
    is still to be made or exists. Before, a new store exited 1 ("cannot start ... unable to
    open database file"), a read-only store file too, and an existing store in a read-only
    dir was refused as "not an enhanced-locking store" (exit 2, naming no setting, and
    wrong)."""
    data = tmp_path / "data"
    data.mkdir()
    store = data / "enhanced-locking.db"
    if made != "new":
        open_database(store).close()
    bound = store if made == "file-read-only" else data
    bwrap = shutil.which("bwrap")
    assert bwrap is not None, "bubblewrap is missing: make sandbox"
    result = subprocess.run(
        [bwrap, "--bind", "/", "/", "--ro-bind", str(bound), str(bound), "--dev", "/dev",
         "--proc", "/proc", "--die-with-parent", "--", *enhanced_locking_command(), "serve",
         "--port", str(free_port()), "--data-dir", str(data)],
        capture_output=True, text=True, env=scrubbed_env(None), timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "enhanced-locking: invalid setting data-dir (from flag --data-dir): "), lines[0]
    assert "embedded store" in lines[0] and str(bound) in lines[0]
    assert "not writable" in lines[0] and "read-only file system" in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_serve_on_a_store_file_it_cannot_open_still_cannot_start(tmp_path: Path) -> None:
    # A good data dir whose store file cannot be opened (here a directory stands in its
    # place) is not the setting's fault: exit 1, "cannot start".
    (tmp_path / "data" / "enhanced-locking.db").mkdir(parents=True)
    result = run("serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "embedded store" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_whose_sentinel_does_not_answer_names_it_in_one_short_line(tmp_path: Path) -> None:
    # No Sentinel listens at the address: the store did not answer (exit 1). Before, the line
    # held redis-py's whole picture of its Sentinel client (its pool, its retry object, about
    # 1,500 characters) where the Sentinel's address belongs.
    sentinel = f"127.0.0.1:{free_port()}"
    result = run("serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"),
                 "--enhanced-locking-enabled", "--enhanced-locking-backend", "redis",
                 f"--enhanced-locking-redis-sentinel-addrs={sentinel}",
                 "--enhanced-locking-redis-sentinel-master=locks",
                 "--enhanced-locking-redis-password=hunter2-s3cret")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"enhanced-locking: cannot start: redis master 'locks' via "
                               f"sentinels {sentinel} db 0 did not answer (ping): "), lines[0]
    assert f"sentinel {sentinel}: ConnectionError" in lines[0], lines[0]
    assert "<redis" not in lines[0] and len(lines[0]) < 400, lines[0]
    assert "hunter2" not in result.stderr


def test_serve_whose_redis_address_answers_but_not_as_redis_cannot_start_in_one_line(
    tmp_path: Path,
) -> None:
    # The address answers as another service does (an HTTP port, a real HTTP server here): the
    # store did not answer (exit 1), in one line naming the address. Before, redis-py's protocol
    # error ended the command with a stack trace.
    with contextlib.contextmanager(serving)(http.server.BaseHTTPRequestHandler) as url:
        addr = url.removeprefix("http://")
        result = run("serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"),
                     "--enhanced-locking-enabled", "--enhanced-locking-backend", "redis",
                     f"--enhanced-locking-redis-addr={addr}")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"enhanced-locking: cannot start: redis {addr} db 0 did not "
                               "answer (ping): InvalidResponse: Protocol error"), lines[0]


def test_serve_reads_the_data_dir_from_atlantis_env(
    service_process: ServiceFactory, tmp_path: Path
) -> None:
    # --data-dir on the command line wins over ATLANTIS_DATA_DIR, as any flag over its env var.
    service = service_process(env={"ATLANTIS_DATA_DIR": str(tmp_path / "ignored")})
    run("lock", "--url", service.url, "acquire", "--repo", "acme/infra", "--pull", "1")
    assert (service.data_dir / "enhanced-locking.db").is_file()
    assert not (tmp_path / "ignored").exists()


# --- lock ... against a running service --------------------------------------------------------


def test_lock_commands_against_a_running_service(service_process: ServiceFactory) -> None:
    url = service_process().url

    def lock(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return run("lock", "--url", url, *args, env=env)

    acquired = lock("acquire", "--repo", "acme/infra", "--path", "envs/prod", "--project", "prod",
                    "--pull", "12", "--user", "alice", "--pull-url",
                    "https://bot:tok@git.example/acme/infra/pull/12")
    assert acquired.returncode == 0, acquired.stderr
    answer = output(acquired)
    key = "acme/infra/envs/prod/default/prod"
    assert answer["acquired"] is True and answer["lockKey"] == key
    assert answer["lock"]["pull"]["url"] == "https://git.example/acme/infra/pull/12"

    refused = lock("acquire", "--repo", "acme/infra", "--path", "envs/prod", "--project", "prod",
                   "--pull", "13")
    assert refused.returncode == 1
    assert output(refused)["reason"] == "held"
    assert output(refused)["holder"]["pull"]["num"] == 12

    other = lock("acquire", "--repo", "acme/web", "--pull", "12", "--workspace", "staging")
    assert other.returncode == 0

    listed = lock("list", "--repo", "acme/infra")
    assert listed.returncode == 0
    assert [item["key"] for item in output(listed)["locks"]] == [key]
    assert len(output(lock("list"))["locks"]) == 2

    not_owner = lock("release", "--key", key, "--pull", "13")
    assert not_owner.returncode == 1
    assert "#12" in not_owner.stderr and "Traceback" not in not_owner.stderr

    released = lock("release", "--key", key, "--pull", "12")
    assert released.returncode == 0
    assert output(released)["released"] is True
    assert output(released)["lock"]["key"] == key

    free = lock("release", "--key", key)
    assert free.returncode == 1
    assert "no lock is held" in free.stderr

    by_pull = lock("unlock-pull", "--repo", "acme/web", "--pull", "12")
    assert by_pull.returncode == 0
    assert [item["key"] for item in output(by_pull)["released"]] == ["acme/web/./staging/"]
    assert output(lock("list"))["locks"] == []


def test_the_service_url_can_come_from_the_environment(unlocked_url: str) -> None:
    url = unlocked_url
    result = run("lock", "list", env={"ENHANCED_LOCKING_URL": url})
    assert result.returncode == 0 and output(result) == {"locks": []}


@pytest.mark.parametrize("args", [
    ["--pull", "1", "--wait", "soon"],
    ["--pull", "-2147483649"],
])
def test_an_invalid_acquire_exits_2(unlocked_url: str, args: list[str]) -> None:
    url = unlocked_url
    result = run("lock", "--url", url, "acquire", "--repo", "acme/infra", *args)
    assert result.returncode == 2
    assert result.stderr.strip() and "Traceback" not in result.stderr


@pytest.mark.parametrize(("args", "flag", "says"), [
    (["--wait", "abc"], "--wait", "Go duration"),
    (["--ttl", "soon"], "--ttl", "Go duration"),
    (["--wait=-5s"], "--wait", "Go duration"),
    (["--pull", "99999999999999999999"], "--pull", "2147483647"),
    (["--repo", ""], "--repo", "at least 1 character"),
    (["--request-id", "r" * 129], "--request-id", "at most 128 characters"),
    (["--workspace", ""], "--workspace", "at least 1 character"),
], ids=["wait-abc", "ttl-soon", "wait-negative", "pull-too-big", "repo-empty",
        "request-id-too-long", "workspace-empty"])
def test_an_invalid_acquire_is_one_line_naming_the_flag(
    unlocked_url: str, args: list[str], flag: str, says: str,
) -> None:
    url = unlocked_url
    result = run("lock", "--url", url, "acquire", "--repo", "acme/infra", "--pull", "1", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"enhanced-locking: invalid {flag}: "), lines[0]
    assert says in lines[0] and "pydantic" not in lines[0]
    assert output(run("lock", "--url", url, "list")) == {"locks": []}


def test_a_missing_argument_exits_2() -> None:
    result = run("lock", "acquire", "--repo", "acme/infra")
    assert result.returncode == 2
    assert "--pull" in result.stderr


@pytest.mark.parametrize("args", [
    ["acquire", "--repo", "acme/infra", "--pull", "1"],
    ["release", "--key", "acme/infra/./default/"],
    ["list"],
    ["unlock-pull", "--repo", "acme/infra", "--pull", "1"],
])
def test_an_unreachable_service_exits_3(args: list[str]) -> None:
    """Its refused connection is sent again for --connect-timeout (short here; the client's
    own tests keep the default's window) before the command gives up."""
    result = run("lock", "--url", f"http://127.0.0.1:{free_port()}",
                 "--connect-timeout", SHORT_CONNECT_TIMEOUT, *args)
    assert result.returncode == 3
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "cannot reach the lock service" in lines[0]


@pytest.mark.parametrize(("args", "env", "named"), [
    (["--connect-timeout", "10"], {}, "--connect-timeout"),
    (["--connect-timeout=-1s"], {}, "--connect-timeout"),
    ([], {"ENHANCED_LOCKING_CONNECT_TIMEOUT": "soon"}, "ENHANCED_LOCKING_CONNECT_TIMEOUT"),
])
def test_a_connect_timeout_that_is_not_a_duration_is_a_usage_error(
    args: list[str], env: dict[str, str], named: str,
) -> None:
    result = run("lock", "--url", f"http://127.0.0.1:{free_port()}", *args, "list", env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert named in lines[-1] and "expected a Go duration" in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.redis
@pytest.mark.parametrize("args", [
    ["release", "--key", "acme/infra/./default/", "--pull", "1"],
    ["queue", "--key", "acme/infra/./default/"],
    ["force-unlock", "--key", "acme/infra/./default/", "--reason", "stuck"],
])
def test_a_service_whose_store_does_not_answer_exits_3_not_as_a_refusal(
    redis_server: RedisServer, service_process: ServiceFactory, args: list[str],
) -> None:
    """Its 503 (`reason: unavailable`) says nothing about the lock: not 1, which a script
    reads as held, not found or not owned."""
    url = service_process("--enhanced-locking-enabled", "--enhanced-locking-backend=redis",
                          f"--enhanced-locking-redis-addr={redis_server.addr}").url
    redis_server.stop()
    result = run("lock", "--url", url, *args)
    assert result.returncode == 3, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "did not answer" in lines[0], result.stderr


@pytest.mark.redis
def test_an_acquire_its_store_did_not_answer_exits_3_not_as_a_refusal(
    redis_server: RedisServer, service_process: ServiceFactory,
) -> None:
    """With `fallback: fail-closed` the acquire is answered 503 with reason `unavailable` and
    the acquire's answer: nothing is known of the lock, so 3 as for any 503, not 1, which a
    script reads as held."""
    url = service_process("--enhanced-locking-enabled", "--enhanced-locking-backend=redis",
                          f"--enhanced-locking-redis-addr={redis_server.addr}",
                          "--enhanced-locking-fallback=fail-closed").url
    redis_server.stop()
    result = run("lock", "--url", url, "acquire", "--repo", "acme/infra", "--pull", "1")
    assert result.returncode == 3, result.stdout + result.stderr
    assert json.loads(result.stdout)["reason"] == "unavailable"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "unavailable" in lines[0], result.stderr


@pytest.mark.redis
def test_a_list_and_a_release_by_pull_say_which_store_did_not_answer(
    redis_server: RedisServer, service_process: ServiceFactory,
) -> None:
    """The service answers them 200 with what it could reach and ``unavailable``: the command
    prints that answer whole, and one line on stderr says whose locks it could not list or
    release, never a bare list that reads as everything held. The release by pull then exits
    3, as a command the service could not serve: a script (``unlock-pull && ...``) must not read
    the pull as freed while its locks on that store stay held; run again once the store
    answers, it frees them and exits 0."""
    redis_server.restart(persistence="aof")  # the enhanced lock outlives the outage
    url = service_process("--enhanced-locking-enabled", "--enhanced-locking-backend=redis",
                          f"--enhanced-locking-redis-addr={redis_server.addr}").url
    acquire = ["lock", "--url", url, "acquire", "--repo", "acme/infra", "--pull", "1"]
    assert run(*acquire, "--path", "envs/prod").returncode == 0  # on the enhanced store
    redis_server.stop()
    assert output(run(*acquire, "--path", "envs/dev"))["lock"]["backend"] == "legacy"

    listed = run("lock", "--url", url, "list", "--repo", "acme/infra")
    assert listed.returncode == 0, listed.stderr
    shown = output(listed)
    assert [lock["key"] for lock in shown["locks"]] == ["acme/infra/envs/dev/default/"]
    assert shown["unavailable"] == ["enhanced"]
    lines = listed.stderr.splitlines()
    assert len(lines) == 1 and "enhanced" in lines[0] and "not listed" in lines[0], lines

    unlock_pull = ["lock", "--url", url, "unlock-pull", "--repo", "acme/infra", "--pull", "1"]
    released = run(*unlock_pull)
    assert released.returncode == 3, released.stdout + released.stderr
    shown = output(released)
    assert [lock["key"] for lock in shown["released"]] == ["acme/infra/envs/dev/default/"]
    assert shown["unavailable"] == ["enhanced"] and shown["cancelled"] == []
    lines = released.stderr.splitlines()
    assert len(lines) == 1 and "enhanced" in lines[0] and "not released" in lines[0], lines

    redis_server.start()
    again = run(*unlock_pull)
    assert again.returncode == 0, again.stdout + again.stderr
    shown = output(again)
    assert [lock["key"] for lock in shown["released"]] == ["acme/infra/envs/prod/default/"]
    assert "unavailable" not in shown and shown["cancelled"] == []
    assert again.stderr == ""


def test_a_list_says_which_stored_locks_it_could_not_read(
    service_process: ServiceFactory, data_dir: Path,
) -> None:
    """The service lists the locks it can read and names under ``unreadable`` the stored ones
    it cannot (their keys held until a force-unlock): the command prints that answer whole,
    and one line on stderr names those keys and how to clear them, never a bare list that
    reads as everything held (the client library's ``list`` raises ``LocksUnreadable``
    for it); exit 0, as a list missing a store's locks. Before, stderr was empty."""
    url = service_process().url
    acquire = ["lock", "--url", url, "acquire", "--repo", "acme/infra", "--pull", "1"]
    for path in ("envs/prod", "envs/dev"):
        assert run(*acquire, "--path", path).returncode == 0
    dev = "acme/infra/envs/dev/default/"
    spoil_file(str(data_dir / "enhanced-locking.db"), "legacy", dev, f"token={PLANTED}")

    listed = run("lock", "--url", url, "list", "--repo", "acme/infra")
    assert listed.returncode == 0, listed.stderr
    shown = output(listed)
    assert [lock["key"] for lock in shown["locks"]] == ["acme/infra/envs/prod/default/"]
    assert [entry["key"] for entry in shown["unreadable"]] == [dev]
    lines = listed.stderr.splitlines()
    assert len(lines) == 1 and dev in lines[0] and "force-unlock" in lines[0], lines
    assert PLANTED not in listed.stdout + listed.stderr


class _AnotherJsonApi(http.server.BaseHTTPRequestHandler):
    """A web server at the URL answering 200 with JSON objects of its own shape (another API
    behind the same address, a proxy's status object)."""

    def _answer(self) -> None:
        body = json.dumps({"locks": [{"key": 1}], "lock": {"name": "x"},
                           "released": [{}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize("command", [
    ["list"],
    ["release", "--key", "acme/infra/./default/"],
    ["unlock-pull", "--repo", "acme/infra", "--pull", "1"],
    ["acquire", "--repo", "acme/infra", "--pull", "1"],
])
def test_a_json_answer_not_of_the_service_is_one_line_not_a_traceback(
    command: list[str],
) -> None:
    """A 200 JSON object that is not the lock service's answer (another API at the URL) is
    what a sign-in page is: the command says in one line that the URL did not answer as the
    lock service, exit 3 (not reached), never a traceback. Before, pydantic's ValidationError
    or a KeyError went out as a traceback."""
    with contextlib.contextmanager(serving)(_AnotherJsonApi) as url:
        result = run("lock", "--url", url, *command)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 3, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "did not answer as the lock service" in lines[0], lines
