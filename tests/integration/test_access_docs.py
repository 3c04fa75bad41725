"""The examples of docs/08-access.md, pasted: the static-token example runs as written with bash
(only the ports and the home directory are this test's), beside an open service on the quick
start's address, and does what the page says; the workflow step's line that reads the mounted
token runs as Atlantis runs it (only the file's path is the test's)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from tests.support.service import ServiceProcess, free_port, scrubbed_env

DOC = Path(__file__).resolve().parents[2] / "docs" / "08-access.md"
BLOCK = re.compile(r"<!-- example: (?P<name>[a-z-]+) -->\n```bash\n(?P<body>.*?)```", re.DOTALL)


def test_the_static_token_example_runs_as_written(
        tmp_path: Path, service_process: Callable[..., ServiceProcess]) -> None:
    # The README's quick start leaves `make run` serving, open, on 4142 (here: the open
    # service's port): the example starts a service of its own beside it, and every call it
    # makes goes to that one, never to the open one.
    quick_start = service_process(data_dir=tmp_path / "quick-start")
    blocks = {m["name"]: m["body"] for m in BLOCK.finditer(DOC.read_text())}
    port = str(free_port())
    script = blocks["static"].replace("4142", str(quick_start.port)).replace("4143", port)
    env = scrubbed_env({  # the defaults, 4142, stand for the quick start's service here too
        "HOME": str(tmp_path), "ENHANCED_LOCKING_PORT": str(quick_start.port),
        "ENHANCED_LOCKING_URL": quick_start.url,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "401"
    assert json.loads(lines[1])["acquired"] is True
    assert json.loads(lines[2])["verb"] == "force-unlock"
    assert lines[3].strip() == '"released": true,'
    audit = [json.loads(line) for line in lines if line.startswith('{"id"')]
    assert [(row["identity"], row["action"], row["outcome"]) for row in audit] == [
        ("alice", "force-unlock", "released"),
        ("atlantis", "force-unlock", "denied"),
        ("atlantis", "acquire", "acquired"),
    ]
    assert (tmp_path / "el-auth" / "enhanced-locking.db").exists()
    assert not (tmp_path / ".atlantis").exists()  # not the default store of `make run`
    assert httpx.get(f"{quick_start.url}/v1/audit", timeout=30).json()["entries"] == []
    assert "tok-" not in (tmp_path / "audit.jsonl").read_text()


STEP_LINE = re.compile(r"<!-- example: step-token -->\n```yaml\n- run: (?P<run>.*?)\n```")
MOUNTED_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


def test_the_steps_token_line_sends_the_token_the_file_holds_at_each_run(
    tmp_path: Path, service_process: Callable[..., ServiceProcess]
) -> None:
    """The page's ``run:`` line, run as Atlantis runs it (``sh -c`` with its run-step
    environment), reads the token file at each run: after the token is rotated (the old one
    revoked, the file rewritten) the next step still locks, where a token fixed in Atlantis's
    environment at its start is refused."""
    match = STEP_LINE.search(DOC.read_text())
    assert match, "docs/08-access.md should show the step's run: line reading the token file"
    token_file = tmp_path / "token"
    run = match["run"].replace(MOUNTED_TOKEN, str(token_file))
    assert run != match["run"], "the line should read the mounted ServiceAccount token"
    tokens = tmp_path / "tokens.csv"
    tokens.write_text('tok-before-rotation,atlantis,,"bots"\n')
    token_file.write_text("tok-before-rotation\n")
    service = service_process("--enhanced-locking-auth=static",
                              f"--enhanced-locking-auth-tokens-file={tokens}",
                              "--enhanced-locking-auth-roles=locker=group:bots")
    env = scrubbed_env({
        "ENHANCED_LOCKING_URL": service.url,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "BASE_REPO_OWNER": "acme", "BASE_REPO_NAME": "infra", "PULL_NUM": "12",
        "PULL_AUTHOR": "alice", "USER_NAME": "alice", "REPO_REL_DIR": "envs/prod",
        "WORKSPACE": "default", "PROJECT_NAME": "prod",
        "PULL_URL": "https://github.com/acme/infra/pull/12",
    })

    def step(line: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", "-c", line], cwd=tmp_path, env={**env, **extra},
                              capture_output=True, text=True, timeout=120, check=False)

    planned = step(run)
    assert planned.returncode == 0, planned.stderr
    assert "locked acme/infra/envs/prod/default/prod for pull #12" in planned.stdout

    tokens.write_text('tok-after-rotation,atlantis,,"bots"\n')
    token_file.write_text("tok-after-rotation\n")
    deadline = time.monotonic() + 60
    while httpx.get(f"{service.url}/v1/locks", timeout=30,
                    headers={"Authorization": "Bearer tok-before-rotation"}).status_code != 401:
        assert time.monotonic() < deadline, "the service still takes the revoked token after 60 s"
        time.sleep(0.2)

    applied = step(run.replace("--command plan", "--command apply"))
    assert applied.returncode == 0, applied.stderr
    assert "locked acme/infra/envs/prod/default/prod for pull #12" in applied.stdout
    fixed_at_start = step(run[run.index("enhanced-locking step"):].replace("--command plan",
                                                                  "--command apply"),
                          ENHANCED_LOCKING_TOKEN="tok-before-rotation")
    assert fixed_at_start.returncode == 1
    assert "the bearer token is not valid" in fixed_at_start.stderr
