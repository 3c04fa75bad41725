"""Static access control over a real service process: bearer tokens from a file, the role map,
owner checks, 401/403 answers that change nothing, and the audit trail they leave.

One process serves the module with ``auth: static``; every token is in a file the tests can
rewrite (the service picks the change up without a restart).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.access_matrix import (
    CALLS,
    PUBLIC_PATHS,
    ROLE_VERBS,
    Call,
    acquire_body,
    held,
    new_case,
)
from tests.support.service import (
    ServiceProcess,
    enhanced_locking_command,
    free_port,
    running,
    scrubbed_env,
    serving,
)

TOKENS = {
    "nobody": "tok-nobody-0f9a8b7c6d5e4f3a",
    "viewer": "tok-viewer-1a2b3c4d5e6f7a8b",
    "locker": "tok-locker-9z8y7x6w5v4u3t2s",
    "admin": "tok-admin-5k4j3h2g1f0e9d8c",
}
ROLES = "viewer=user:vera;locker=group:bots;admin=user:ada"
NAMES = {"nobody": "nora", "viewer": "vera", "locker": "lou", "admin": "ada"}


def tokens_file(path: Path, tokens: dict[str, str]) -> Path:
    lines = ["# token,name,uid,groups"]
    for role, token in tokens.items():
        groups = "bots" if role == "locker" else ""
        lines.append(f'{token},{NAMES[role]},uid-{role},"{groups}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def static_service(root: Path, *args: str) -> ServiceProcess:
    """A service (not started) in ``root`` with static access: :data:`TOKENS` in a file,
    :data:`ROLES`, and ``args`` more."""
    tokens = tokens_file(root / "tokens.csv", TOKENS)
    return ServiceProcess(root / "data", log_dir=root / "logs", args=[
        "--enhanced-locking-auth=static",
        f"--enhanced-locking-auth-tokens-file={tokens}",
        f"--enhanced-locking-auth-roles={ROLES}",
        *args,
    ])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    process = static_service(tmp_path_factory.mktemp("access"),
                            "--enhanced-locking-auth-cache-ttl=1s")
    with running(process):
        yield process


def client(served: ServiceProcess, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.Client(base_url=served.url, timeout=10, headers=headers)


@pytest.fixture
def admin(served: ServiceProcess) -> Iterator[httpx.Client]:
    with client(served, TOKENS["admin"]) as http:
        yield http


def _matrix() -> list[Any]:
    return [pytest.param(call, role, id=f"{call.name}-{role}")
            for call in CALLS for role in ROLE_VERBS]


@pytest.mark.parametrize(("call", "role"), _matrix())
def test_each_call_is_allowed_exactly_for_the_roles_holding_its_rights(
    served: ServiceProcess, admin: httpx.Client, call: Call, role: str
) -> None:
    case = new_case(admin)
    before = held(admin, case.key)
    with client(served, TOKENS[role]) as http:
        answer = call.run(http, case)
    if call.verbs <= ROLE_VERBS[role]:
        assert answer.status_code not in (401, 403, 500), answer.text
        return
    assert answer.status_code == 403
    refusal = json.loads(answer.read())
    missing = sorted(call.verbs - ROLE_VERBS[role])
    assert refusal["verb"] in missing
    assert refusal["identity"] == NAMES[role]
    assert refusal["verb"] in refusal["error"]
    assert held(admin, case.key) == before, "a refused call changed the lock"
    assert admin.get("/v1/locks", params={"repo": case.repo}).json()["locks"] == [before]


@pytest.mark.parametrize("call", CALLS, ids=lambda call: call.name)
@pytest.mark.parametrize("token", [None, "not-a-token", "a b"], ids=["none", "unknown", "spaced"])
def test_without_a_valid_token_every_guarded_call_is_401_with_a_challenge(
    served: ServiceProcess, admin: httpx.Client, call: Call, token: str | None
) -> None:
    case = new_case(admin)
    before = held(admin, case.key)
    with client(served, token) as http:
        answer = call.run(http, case)
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"].startswith('Bearer realm="enhanced-locking"')
    assert "error" in json.loads(answer.read())
    assert held(admin, case.key) == before


def test_a_scheme_other_than_bearer_is_401(served: ServiceProcess) -> None:
    with httpx.Client(base_url=served.url, timeout=10) as http:
        answer = http.get("/v1/locks", headers={"Authorization": f"Basic {TOKENS['admin']}"})
    assert answer.status_code == 401
    assert 'error="invalid_token"' in answer.headers["www-authenticate"]


@pytest.mark.parametrize("path", PUBLIC_PATHS)
def test_health_and_metrics_answer_without_a_token(served: ServiceProcess, path: str) -> None:
    with client(served, None) as http:
        assert http.get(path).status_code == 200


def test_callers_with_no_token_cannot_flush_a_force_unlock_from_the_audit_trail(
    tmp_path: Path,
) -> None:
    """With audit-max-entries 100, a force-unlock followed by 1,200 calls with no token (each
    a 401 and an entry) is still in the trail: refusals are kept within a bound of their own;
    they are still recorded (the newest 100)."""
    process = static_service(tmp_path, "--enhanced-locking-audit-max-entries=100",
                             "--enhanced-locking-audit-stdout=false")
    with running(process), client(process, TOKENS["admin"]) as admin:
        case = new_case(admin)
        done = admin.post("/v1/admin/force-unlock",
                          params={"key": case.key, "reason": "stuck apply, ticket OPS-13"})
        assert done.status_code == 200, done.text
        with client(process, None) as anonymous:
            for _ in range(1200):
                assert anonymous.get("/v1/locks").status_code == 401
        rows = admin.get("/v1/audit", params={"action": "force-unlock"}).json()["entries"]
        assert [(r["identity"], r["key"], r["reason"]) for r in rows] == [
            ("ada", case.key, "stuck apply, ticket OPS-13")]
        refused = admin.get("/v1/audit", params={"outcome": "unauthenticated",
                                                 "limit": 1000}).json()["entries"]
        assert 100 <= len(refused) <= 600, len(refused)  # pruned every 500 entries


def test_force_unlock_needs_a_reason_and_records_it(
    served: ServiceProcess, admin: httpx.Client
) -> None:
    case = new_case(admin)
    before = held(admin, case.key)
    refused = admin.post("/v1/admin/force-unlock", params={"key": case.key})
    assert refused.status_code == 422
    assert refused.json()["field"] == "reason"
    assert held(admin, case.key) == before
    done = admin.post("/v1/admin/force-unlock",
                      params={"key": case.key, "reason": "stuck apply, ticket OPS-12"})
    assert done.status_code == 200
    assert held(admin, case.key) is None
    rows = admin.get("/v1/audit", params={"key": case.key, "action": "force-unlock"}).json()
    assert [(r["identity"], r["outcome"], r["reason"], r["pull"]) for r in rows["entries"]] == [
        ("ada", "released", "stuck apply, ticket OPS-12", 7)]


def test_an_api_force_unlock_posted_from_another_site_is_refused_and_audited(
    served: ServiceProcess, admin: httpx.Client
) -> None:
    # The console's setup: a proxy adds the bearer token for a signed-in user's browser. The
    # API's force-unlock takes its key and reason in the query, so another site's page can
    # make that browser post it as a plain form, no preflight asked.
    case = new_case(admin)
    before = held(admin, case.key)
    host = served.url.split("://", 1)[1]
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Origin": "https://evil.example"}, {"Origin": "null"}):
        refused = admin.post("/v1/admin/force-unlock", headers={**form, **headers},
                             params={"key": case.key, "reason": "from elsewhere"})
        assert refused.status_code == 403, (headers, refused.text)
        assert "another site" in refused.json()["error"]
        assert held(admin, case.key) == before
    rows = admin.get("/v1/audit", params={"key": case.key, "action": "force-unlock"}).json()
    assert [(r["identity"], r["outcome"], r["status"], r["repo"]) for r in rows["entries"]] == [
        ("ada", "cross-site", 403, case.repo)] * 4
    # A page of the service itself (its API docs), and a client that is no browser, are taken.
    done = admin.post("/v1/admin/force-unlock",
                      headers={"Sec-Fetch-Site": "same-origin", "Origin": f"http://{host}"},
                      params={"key": case.key, "reason": "stuck"})
    assert done.status_code == 200, done.text
    assert held(admin, case.key) is None


def test_a_pull_releases_its_own_lock_with_the_lock_right_but_not_anothers(
    served: ServiceProcess, admin: httpx.Client
) -> None:
    case = new_case(admin)
    with client(served, TOKENS["locker"]) as locker:
        other = locker.delete("/v1/locks/by-key", params={"key": case.key, "pull": 8})
        assert other.status_code == 409  # owned by pull 7: nothing released
        assert held(admin, case.key) is not None
        own = locker.delete("/v1/locks/by-key", params={"key": case.key, "pull": 7})
    assert own.status_code == 200
    assert held(admin, case.key) is None


def test_the_audit_trail_has_a_row_per_call_with_who_and_from_where(
    served: ServiceProcess, admin: httpx.Client
) -> None:
    case = new_case(admin)
    with client(served, TOKENS["locker"]) as locker, client(served, TOKENS["viewer"]) as viewer:
        locker.post("/v1/locks", json=acquire_body(case.repo, pull=9, path="x"),
                    headers={"X-Request-Id": "req-42"})
        viewer.post("/v1/locks", json=acquire_body(case.repo, pull=9, path="y"))
        locker.delete("/v1/locks/by-key", params={"key": case.key})
    rows = admin.get("/v1/audit", params={"repo": case.repo}).json()["entries"]
    seen = [(r["identity"], r["action"], r["verb"], r["outcome"], r["status"])
            for r in reversed(rows)]
    assert seen == [
        ("ada", "acquire", "lock", "acquired", 200),
        ("lou", "acquire", "lock", "acquired", 200),
        ("vera", "acquire", "lock", "denied", 403),
        ("lou", "release-any", "release-any", "denied", 403),
    ]
    locker_row = next(r for r in rows if r["identity"] == "lou" and r["action"] == "acquire")
    assert locker_row["groups"] == ["bots"]
    assert locker_row["method"] == "static"
    assert locker_row["requestId"] == "req-42"
    assert locker_row["peer"].startswith("127.0.0.1:")


def test_audit_pages_newest_first_with_a_cursor(
    served: ServiceProcess, admin: httpx.Client
) -> None:
    case = new_case(admin)
    for path in ("a", "b", "c", "d", "e"):
        admin.post("/v1/locks", json=acquire_body(case.repo, pull=3, path=path))
    first = admin.get("/v1/audit", params={"repo": case.repo, "limit": 2}).json()
    second = admin.get("/v1/audit", params={"repo": case.repo, "limit": 2,
                                            "before": first["next"]}).json()
    third = admin.get("/v1/audit", params={"repo": case.repo, "limit": 2,
                                           "before": second["next"]}).json()
    keys = [r["key"].split("/")[2] for page in (first, second, third) for r in page["entries"]]
    assert keys == ["e", "d", "c", "b", "a", "envs"]
    assert third["next"] is not None
    assert admin.get("/v1/audit", params={"repo": case.repo, "before": third["next"]}
                     ).json() == {"entries": [], "next": None}


def test_a_rewritten_tokens_file_is_picked_up_without_a_restart(
    served: ServiceProcess, tmp_path: Path
) -> None:
    path = Path(served.args[1].split("=", 1)[1])
    rotated = {**TOKENS, "viewer": "tok-viewer-rotated-77aa66bb"}
    try:
        tokens_file(path, rotated)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with client(served, rotated["viewer"]) as http:
                if http.get("/v1/locks").status_code == 200:
                    break
            time.sleep(0.1)
        with client(served, rotated["viewer"]) as http:
            assert http.get("/v1/locks").status_code == 200
        with client(served, TOKENS["viewer"]) as http:
            assert http.get("/v1/locks").status_code == 401
    finally:
        tokens_file(path, TOKENS)
        time.sleep(1.2)


def test_a_token_withdrawn_by_a_rewrite_of_the_same_size_and_time_is_refused(
    tmp_path: Path,
) -> None:
    # A revoked token replaced by one of the same length, copied in by a tool that keeps the
    # file's modification time (cp -p, rsync -t, a tar): the size and time are as they were.
    path = tokens_file(tmp_path / "tokens.csv", TOKENS)
    process = ServiceProcess(tmp_path / "data", log_dir=tmp_path / "logs", args=[
        "--enhanced-locking-auth=static", f"--enhanced-locking-auth-tokens-file={path}",
        f"--enhanced-locking-auth-roles={ROLES}",
    ])
    rotated = {**TOKENS, "viewer": TOKENS["viewer"][::-1]}
    with running(process), client(process, TOKENS["viewer"]) as viewer:
        assert viewer.get("/v1/locks").status_code == 200
        before = path.stat()
        tokens_file(path, rotated)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size,
                                                                  before.st_mtime_ns)
        deadline = time.monotonic() + 10
        while viewer.get("/v1/locks").status_code == 200:
            assert time.monotonic() < deadline, "the withdrawn token is still taken"
            time.sleep(0.2)
        assert viewer.get("/v1/locks").status_code == 401
        with client(process, rotated["viewer"]) as successor:
            assert successor.get("/v1/locks").status_code == 200


def test_no_token_shows_in_logs_audit_rows_metrics_events_or_the_store(
    served: ServiceProcess, admin: httpx.Client
) -> None:
    case = new_case(admin)
    with client(served, TOKENS["viewer"]) as viewer:
        viewer.delete("/v1/locks/by-key", params={"key": case.key})
    with client(served, "tok-guessed-by-an-attacker") as stranger:
        stranger.get("/v1/locks")
    audit = admin.get("/v1/audit", params={"limit": 1000}).text
    metrics = admin.get("/metrics").text
    store = b"".join(p.read_bytes() for p in served.data_dir.glob("enhanced-locking.db*"))
    logs = served.output()
    for token in (*TOKENS.values(), "tok-guessed-by-an-attacker"):
        assert token not in audit
        assert token not in metrics
        assert token not in logs
        assert token.encode() not in store
    assert "tok-" not in audit


def test_audit_rows_are_json_lines_on_stdout(served: ServiceProcess, admin: httpx.Client) -> None:
    case = new_case(admin)
    lines = [json.loads(line)["audit"] for line in served.output().splitlines()
             if line.startswith('{"audit": ')]
    assert any(row["repo"] == case.repo and row["action"] == "acquire" for row in lines)


def test_the_audit_trail_survives_a_restart(tmp_path: Path) -> None:
    tokens = tokens_file(tmp_path / "tokens.csv", TOKENS)
    process = ServiceProcess(tmp_path / "data", log_dir=tmp_path / "logs", args=[
        "--enhanced-locking-auth=static", f"--enhanced-locking-auth-tokens-file={tokens}",
        f"--enhanced-locking-auth-roles={ROLES}",
    ])
    process.start()
    try:
        with client(process, TOKENS["admin"]) as admin:
            case = new_case(admin)
            admin.post("/v1/admin/force-unlock", params={"key": case.key, "reason": "r1"})
        process.stop()
        process.start()
        with client(process, TOKENS["admin"]) as admin:
            rows = admin.get("/v1/audit", params={"repo": case.repo}).json()["entries"]
        assert [(r["action"], r["identity"]) for r in rows] == [
            ("force-unlock", "ada"), ("acquire", "ada")]
    finally:
        process.stop()


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*enhanced_locking_command(), "serve", *args], capture_output=True,
                          text=True, timeout=60, env=scrubbed_env(env or {}))


def test_serving_a_network_address_without_auth_exits_2_naming_the_setting(
    tmp_path: Path,
) -> None:
    # It stops before opening any socket: nothing listens beyond loopback.
    done = run_serve("--host", "0.0.0.0", "--port", "1", "--data-dir", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "enhanced-locking-auth" in done.stderr
    assert "enhanced-locking-insecure-allow-unauthenticated" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("flags", "env", "named"), [
    (["--enhanced-locking-auth-tokens-file=/nonexistent/tokens.csv"], {},
     ["enhanced-locking-auth-tokens-file"]),
    ([], {"ATLANTIS_ENHANCED_LOCKING_AUTH_TOKENS": "tok-inline-5e6f7a8b9c0d,ann"},
     ["enhanced-locking-auth-tokens"]),
    (["--enhanced-locking-auth-roles=admin=user:ada",
      "--enhanced-locking-auth-tokens-file=/nonexistent/tokens.csv"], {},
     ["enhanced-locking-auth-tokens-file", "enhanced-locking-auth-roles"]),
], ids=["tokens-file", "inline-tokens", "roles-and-file"])
def test_access_settings_given_while_auth_is_none_are_warned_of_at_start(
    tmp_path: Path, flags: list[str], env: dict[str, str], named: list[str]
) -> None:
    """A tokens file, inline tokens or a role map with the default auth none would read as
    "this service checks tokens" while anyone on the machine may call it: it still starts (a
    chart or config that sets them for later keeps working), but one warning line names each
    such setting and says authentication is off; the inline tokens never appear."""
    with serving(tmp_path, *flags, env=env) as process:
        with httpx.Client(base_url=process.url, timeout=30) as anyone:
            assert anyone.get("/v1/config").status_code == 200
        lines = [line for line in process.stderr().splitlines()
                 if "enhanced-locking-auth is none" in line]
    assert len(lines) == 1, process.output()
    for setting in named:
        assert setting in lines[0], lines[0]
    assert "tok-inline" not in process.output()


@pytest.mark.parametrize(("args", "named"), [
    (["--enhanced-locking-auth=static"], "enhanced-locking-auth"),
    (["--enhanced-locking-auth=static", "--enhanced-locking-auth-tokens-file=/nonexistent/t"],
     "enhanced-locking-auth-tokens-file"),
    (["--enhanced-locking-auth-roles=owner=user:x"], "enhanced-locking-auth-roles"),
    (["--enhanced-locking-tls-cert-file=c.pem"], "enhanced-locking-tls"),
])
def test_unusable_access_settings_exit_2_with_one_line(
    tmp_path: Path, args: list[str], named: str
) -> None:
    done = run_serve("--host", "127.0.0.1", "--port", str(free_port()), "--data-dir",
                     str(tmp_path), *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert named in done.stderr
    assert "Traceback" not in done.stderr


def test_a_malformed_tokens_file_names_the_line_not_the_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens.csv"
    path.write_text("tok-good-aaaa,alice\ntok-secret-bbbb\n")
    done = run_serve("--host", "127.0.0.1", "--port", str(free_port()), "--data-dir",
                     str(tmp_path), "--enhanced-locking-auth=static",
                     f"--enhanced-locking-auth-tokens-file={path}")
    assert done.returncode == 2
    assert "line 2" in done.stderr
    assert "tok-secret-bbbb" not in done.stderr


@pytest.mark.parametrize(("content", "problem"), [
    (None, "cannot read {path}: is a directory"),
    (b"tok-secret-bbbb,b\xffob\n", "{path} is not UTF-8 text (byte 0xff at offset 17)"),
    # past the first 8 KiB, where a text reader's chunk starts again
    (b"#" + b"x" * 9000 + b"\ntok-secret-bbbb,b\xffob\n",
     "{path} is not UTF-8 text (byte 0xff at offset 9019)"),
], ids=["a-directory", "not-utf-8", "not-utf-8-past-8-kib"])
def test_a_tokens_file_that_cannot_be_read_as_text_exits_2_in_the_config_files_words(
    content: bytes | None, problem: str, tmp_path: Path,
) -> None:
    # Before: Python's own words ("[Errno 21] Is a directory: '...'", "'utf-8' codec can't
    # decode byte 0xff in position 17: invalid start byte"), not the config file's.
    path = tmp_path / "tokens.csv"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    done = run_serve("--host", "127.0.0.1", "--port", str(free_port()), "--data-dir",
                     str(tmp_path / "data"), "--enhanced-locking-auth=static",
                     f"--enhanced-locking-auth-tokens-file={path}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "enhanced-locking: invalid setting enhanced-locking-auth-tokens-file: "
        + problem.format(path=path)]


@pytest.mark.parametrize("text", [
    'tok-good-aaaa,alice,1,"admins\ntok-secret-bbbb,bob,2,viewers"\n',
    'tok-good-aaaa,alice,1,"admins\ntok-secret-bbbb,bob,2,viewers\n',
    'tok-good-aaaa,alice,1,"admins\ntok-secret-bbbb,bob,2,"viewers"\n',
], ids=["closed-a-line-later", "never-closed", "closed-by-the-next-quote"])
def test_a_quoted_field_not_closed_on_its_line_exits_2_naming_the_line(
    text: str, tmp_path: Path,
) -> None:
    # Before: alice's groups took bob's line (adminstok-secret-bbbb, bob, 2, viewers): bob's
    # token was lost without a word, and shown wherever alice's groups are (audit rows).
    path = tmp_path / "tokens.csv"
    path.write_text(text)
    done = run_serve("--host", "127.0.0.1", "--port", str(free_port()), "--data-dir",
                     str(tmp_path / "data"), "--enhanced-locking-auth=static",
                     f"--enhanced-locking-auth-tokens-file={path}")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"enhanced-locking: invalid setting enhanced-locking-auth-tokens-file: {path} line 1: "
    ), done.stderr
    assert "tok-secret-bbbb" not in done.stderr and "tok-good-aaaa" not in done.stderr


# A field longer than the csv module's field limit (128 KiB).
HUGE = "x" * (128 * 1024 + 1)


def test_a_tokens_field_over_the_csv_limit_exits_2_naming_the_setting_and_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tokens.csv"
    path.write_text(f'tok-good-aaaa,alice\ntok-secret-bbbb,bob,,"{HUGE}"\n')
    done = run_serve("--host", "127.0.0.1", "--port", str(free_port()), "--data-dir",
                     str(tmp_path / "data"), "--enhanced-locking-auth=static",
                     f"--enhanced-locking-auth-tokens-file={path}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert "enhanced-locking-auth-tokens-file" in done.stderr and "line 2" in done.stderr
    assert "tok-secret-bbbb" not in done.stderr and "Traceback" not in done.stderr

    # The same inline: too long for an argument, so from the YAML file.
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"enhanced-locking-auth": "static",
                                  "enhanced-locking-auth-tokens": f"tok-secret-cccc,{HUGE}"}))
    done = run_serve("--host", "127.0.0.1", "--port", str(free_port()), "--data-dir",
                     str(tmp_path / "data"), "--config", str(config))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert "enhanced-locking-auth-tokens line 1" in done.stderr
    assert "tok-secret-cccc" not in done.stderr and "Traceback" not in done.stderr


def test_a_tokens_field_over_the_csv_limit_written_at_runtime_keeps_the_previous_tokens(
    served: ServiceProcess,
) -> None:
    path = Path(served.args[1].split("=", 1)[1])
    deadline = time.monotonic() + 10
    while True:  # the answers before the edit (an earlier test's rotation may be settling)
        with client(served, TOKENS["viewer"]) as http:
            if http.get("/v1/locks").status_code == 200:
                break
        assert time.monotonic() < deadline, "the viewer's token is not taken to begin with"
        time.sleep(0.1)
    logged = served.output(limit=10**9).count("not (re)loaded")
    try:
        # Replaced whole, as an editor saves: a reload never reads it half written.
        edited = path.with_name(path.name + ".new")
        edited.write_text(path.read_text() + f'tok-secret-dddd,dora,,"{HUGE}"\n')
        edited.replace(path)
        deadline = time.monotonic() + 10
        while served.output(limit=10**9).count("not (re)loaded") == logged:
            assert time.monotonic() < deadline, "the bad edit was not read"
            with client(served, TOKENS["viewer"]) as http:
                assert http.get("/v1/locks").status_code == 200
            time.sleep(0.1)
        for _ in range(3):  # one reload check a second: each finds the file still bad
            with client(served, TOKENS["viewer"]) as http:
                assert http.get("/v1/locks").status_code == 200
            with client(served, TOKENS["nobody"]) as http:
                assert http.get("/v1/locks").status_code == 403
            with client(served, "tok-secret-dddd") as http:
                assert http.get("/v1/locks").status_code == 401
            time.sleep(0.6)
        assert "tok-secret-dddd" not in served.output(limit=10**9)
    finally:
        tokens_file(path, TOKENS)
        time.sleep(1.2)


def cli(served: ServiceProcess, token: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"ENHANCED_LOCKING_URL": served.url}
    if token is not None:
        env["ENHANCED_LOCKING_TOKEN"] = token
    return subprocess.run([*enhanced_locking_command(), *args], capture_output=True, text=True,
                          timeout=60, env=scrubbed_env(env))


def test_the_cli_sends_the_token_and_reads_the_audit_trail(
    served: ServiceProcess, admin: httpx.Client
) -> None:
    case = new_case(admin)
    refused = cli(served, TOKENS["viewer"], "lock", "force-unlock", "--key", case.key,
                  "--reason", "cli test")
    assert refused.returncode == 1
    assert "force-unlock" in refused.stderr
    anonymous = cli(served, None, "lock", "list")
    assert anonymous.returncode == 1
    assert "authentication required" in anonymous.stderr
    done = cli(served, TOKENS["admin"], "lock", "force-unlock", "--key", case.key,
               "--reason", "cli test")
    assert done.returncode == 0, done.stderr
    trail = cli(served, TOKENS["admin"], "audit", "--repo", case.repo, "--all", "--limit", "1")
    assert trail.returncode == 0, trail.stderr
    rows = [json.loads(line) for line in trail.stdout.splitlines()]
    assert [(r["identity"], r["action"], r["outcome"]) for r in rows] == [
        ("ada", "force-unlock", "released"),
        ("vera", "force-unlock", "denied"),
        ("ada", "acquire", "acquired"),
    ]


@pytest.mark.parametrize("token", [
    TOKENS["admin"] + "\nkept-secret-0d1e", "kept-secret-0d1e\r" + TOKENS["admin"],
    "kept-secret-0d1e-\u00f6-" + TOKENS["admin"], "kept-secret-0d1e\x01" + TOKENS["admin"],
], ids=["line-feed", "carriage-return", "non-ascii", "control"])
def test_a_token_no_header_can_carry_exits_2_naming_the_setting_never_the_token(
    served: ServiceProcess, token: str,
) -> None:
    # Pasted with a second line, say: no HTTP header carries it. The HTTP library's refusal
    # quoted the whole header, token and all, into the one line a pipeline's log keeps.
    secrets = ("kept-secret-0d1e", TOKENS["admin"])
    for run, setting in ((cli(served, token, "lock", "list"), "ENHANCED_LOCKING_TOKEN"),
                         (cli(served, None, "lock", "list", "--token", token), "--token")):
        assert run.returncode == 2, run.stderr
        assert run.stdout == ""
        lines = run.stderr.splitlines()
        assert len(lines) == 1 and setting in lines[0], run.stderr
        assert not any(secret in run.stderr for secret in secrets), run.stderr


def test_an_outcome_or_verb_no_row_can_have_is_named_not_answered_with_nothing(
    served: ServiceProcess, admin: httpx.Client
) -> None:
    """``audit --outcome acquird`` would match no row and print nothing, as if nothing had been
    acquired: it exits 2 naming the outcomes there are (422 from the API, naming the field)."""
    case = new_case(admin)
    typo = cli(served, TOKENS["admin"], "audit", "--repo", case.repo, "--outcome", "acquird")
    assert typo.returncode == 2 and typo.stdout == ""
    lines = typo.stderr.splitlines()
    assert len(lines) == 1 and "not an outcome of the audit trail: 'acquird'" in lines[0]
    assert "acquired" in lines[0].split("(one of", 1)[1]
    bad_verb = admin.get("/v1/audit", params={"verb": "lok"})
    assert bad_verb.status_code == 422 and bad_verb.json()["field"] == "verb"
    assert "force-unlock" in bad_verb.json()["error"]
    found = cli(served, TOKENS["admin"], "audit", "--repo", case.repo, "--outcome", "acquired",
                "--verb", "lock")
    assert found.returncode == 0, found.stderr
    assert [json.loads(line)["action"] for line in found.stdout.splitlines()] == ["acquire"]
    with client(served, TOKENS["admin"]) as http:
        key = http.post("/v1/locks", json=acquire_body(case.repo, pull=5, path="z")
                        ).json()["lockKey"]
        batch = http.delete("/v1/locks/batch", params={"key": [key]})
    assert batch.status_code == 200, batch.text
    counted = admin.get("/v1/audit", params={"repo": case.repo, "outcome": "released 1"})
    assert counted.status_code == 200
    assert [r["action"] for r in counted.json()["entries"]] == ["release-any"]


def test_events_refused_exit_1_and_an_invalid_filter_exits_2(served: ServiceProcess) -> None:
    """``enhanced-locking events`` ends as every command does: no token is a refusal (1, one
    line), an unknown event type is the user's mistake (2), nothing on stdout either way."""
    anonymous = cli(served, None, "events")
    assert anonymous.returncode == 1 and anonymous.stdout == ""
    assert len(anonymous.stderr.splitlines()) == 1
    assert "authentication required" in anonymous.stderr
    unknown = cli(served, TOKENS["admin"], "events", "--type", "lock-grabbed")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert "unknown event type 'lock-grabbed'" in unknown.stderr


def test_open_access_on_loopback_answers_only_requests_naming_a_loopback_host(
    tmp_path: Path,
) -> None:
    """``auth: none`` on 127.0.0.1 is open to whoever reaches the port: a page on another site
    reaches it through the user's browser by DNS rebinding (its own name made to resolve to
    127.0.0.1), and to the browser the page and the service are then one origin, so neither
    the cross-site check nor CORS stops its posts. Its requests name its host (``Host``): a
    host that is not loopback is refused before anything changes."""
    process = ServiceProcess(tmp_path / "data", log_dir=tmp_path / "logs")
    with running(process), httpx.Client(base_url=process.url, timeout=10) as http:
        answer = http.post("/v1/locks", json=acquire_body("acme/infra", pull=12))
        assert answer.status_code == 200, answer.text
        key = answer.json()["lockKey"]
        port = process.url.rsplit(":", 1)[1]
        rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}",
                   "Sec-Fetch-Site": "same-origin"}
        forced = http.post("/v1/admin/force-unlock", params={"key": key, "reason": "x"},
                           headers=rebound)
        assert forced.status_code == 403, forced.text
        assert "evil.example" in forced.json()["error"]
        released = http.delete("/v1/locks/by-key", params={"key": key}, headers=rebound)
        assert released.status_code == 403, released.text
        assert http.get("/v1/locks/by-key", params={"key": key}).json()["lock"]["pull"]["num"] == 12
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
            assert http.get("/v1/locks", headers={"Host": host}).status_code == 200, host
        # A request naming no host (HTTP/1.0 without Host, as a hand-written probe or script
        # sends; an empty Host) is no page's: a browser always names the host it reached.
        for head in ("GET /v1/locks HTTP/1.0\r\n", "GET /v1/locks HTTP/1.1\r\nHost: \r\n"
                     "Connection: close\r\n"):
            with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as raw:
                raw.sendall(f"{head}\r\n".encode())
                said = b""
                while chunk := raw.recv(65536):
                    said += chunk
            status, _, body = said.partition(b"\r\n\r\n")
            assert status.split(b" ")[1] == b"200", said
            assert key in [lock["key"] for lock in json.loads(body)["locks"]], body
        rows = [json.loads(line)["audit"] for line in process.output().splitlines()
                if line.startswith('{"audit": ')]
        assert [row["outcome"] for row in rows if row["status"] == 403] == [
            "foreign-host", "foreign-host"]
