"""docs/07-atlantis.md and examples/atlantis/, pasted.

Atlantis v0.47.1's own config parser (``config.ParserValidator``, built from the module proxy)
reads ``examples/atlantis/repos.yaml``; its ``run:`` steps then run exactly as Atlantis runs
them (``sh -c`` with the run-step environment) against a real ``enhanced-locking serve``
started with ``examples/atlantis/enhanced-locking.yaml``; and the page's marked command blocks
run as written (only the service's address is this test's).
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.atlantis_models import AtlantisModels, build_models
from tests.support.bbolt_writer import BoltWriter
from tests.support.gobuild import GoBuildError
from tests.support.service import ServiceProcess, scrubbed_env

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "07-atlantis.md"
REPOS_YAML = ROOT / "examples" / "atlantis" / "repos.yaml"
SERVICE_YAML = ROOT / "examples" / "atlantis" / "enhanced-locking.yaml"
BLOCK = re.compile(r"<!-- example: (?P<name>[a-z-]+) -->\n```bash\n(?P<body>.*?)```", re.DOTALL)
SECRET = "a-long-random-string"  # the doc's own example value
KEY = "acme/infra/envs/prod/default/prod"


def examples() -> dict[str, str]:
    return {m["name"]: m["body"] for m in BLOCK.finditer(DOC.read_text())}


@pytest.fixture(scope="module")
def atlantis() -> AtlantisModels:
    try:
        return build_models()
    except GoBuildError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture
def service(service_process: Callable[..., ServiceProcess]) -> ServiceProcess:
    return service_process("--config", str(SERVICE_YAML),
                           env={"ATLANTIS_ENHANCED_LOCKING_GITHUB_WEBHOOK_SECRET": SECRET})


def shell_env(url: str, **extra: str) -> dict[str, str]:
    """A shell with ``enhanced-locking`` on its PATH, as the Atlantis server has it."""
    env = scrubbed_env({"ENHANCED_LOCKING_URL": url, **extra})
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def atlantis_step_env(url: str, pull: int, user: str) -> dict[str, str]:
    """run_step_runner.go's environment for project prod of acme/infra, pull ``pull``."""
    return shell_env(
        url, BASE_REPO_OWNER="acme", BASE_REPO_NAME="infra", HEAD_REPO_OWNER="acme",
        HEAD_REPO_NAME="infra", PULL_NUM=str(pull), PULL_AUTHOR=user, USER_NAME=user,
        PULL_URL=f"https://github.com/acme/infra/pull/{pull}", HEAD_COMMIT="c" * 40,
        HEAD_BRANCH_NAME=f"feature-{pull}", BASE_BRANCH_NAME="main", REPO_REL_DIR="envs/prod",
        WORKSPACE="default", PROJECT_NAME="prod", COMMENT_ARGS="", PLANFILE="default-prod.tfplan",
    )


def workflow(atlantis: AtlantisModels) -> dict[str, Any]:
    parsed = atlantis.repo_config(REPOS_YAML)
    assert "error" not in parsed, parsed
    ours: dict[str, Any] = next(r for r in parsed["repos"] if r["workflow"] == "enhanced-locking")
    return ours


def test_each_stage_is_the_lock_step_then_atlantiss_own_stage(atlantis: AtlantisModels) -> None:
    """A workflow's stage replaces Atlantis's: one that left out its ``init`` would run
    ``terraform import`` (or ``state rm``) in a working directory never initialised (a plan
    whose lock step timed out stops before its ``init``; a directory cloned again for an
    external plan store has none) and fail asking for ``terraform init``."""
    defaults = atlantis.repo_config(REPOS_YAML)["defaultStages"]
    stages = workflow(atlantis)["stages"]
    assert set(stages) == set(defaults) == {"plan", "apply", "import", "state_rm"}
    for name, steps in stages.items():
        assert steps[0]["name"] == "run" and "enhanced-locking step acquire" in steps[0]["run"]
        assert [s["name"] for s in steps[1:]] == [s["name"] for s in defaults[name]], name


def test_atlantis_reads_the_example_repo_config_as_the_guide_says(
    atlantis: AtlantisModels,
) -> None:
    repo = workflow(atlantis)
    assert repo["id"] == "/.*/" and repo["repoLocks"] == "disabled"
    assert [s["name"] for s in repo["stages"]["plan"]] == ["run", "init", "plan"]
    assert [s["name"] for s in repo["stages"]["apply"]] == ["run", "apply"]
    # With Atlantis's locks disabled, Atlantis locks neither import nor state rm: their stages
    # take the service's lock before Atlantis's own step writes the state.
    assert [s["name"] for s in repo["stages"]["import"]] == ["run", "init", "import"]
    assert [s["name"] for s in repo["stages"]["state_rm"]] == ["run", "init", "state_rm"]
    assert "--command import " in repo["stages"]["import"][0]["run"]
    assert "--command state " in repo["stages"]["state_rm"][0]["run"]
    # The guide shows the same file.
    assert "repo_locks:\n      mode: disabled" in DOC.read_text()
    for stage in ("plan", "apply", "import", "state_rm"):
        assert repo["stages"][stage][0]["run"] in DOC.read_text()


def run_as_atlantis(command: str, env: dict[str, str], tmp: Path) -> subprocess.Popen[str]:
    """A ``run:`` step as Atlantis runs it: ``sh -c`` in the project's directory."""
    return subprocess.Popen(["sh", "-c", command], env=env, cwd=tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def plan_13_behind_12(plan_step: str, service: ServiceProcess, tmp_path: Path
                      ) -> tuple[subprocess.Popen[str], Printed]:
    """Pull #12's plan step has the lock; pull #13's is waiting behind it (its process and
    its output as it prints)."""
    first = run_as_atlantis(plan_step, atlantis_step_env(service.url, 12, "alice"), tmp_path)
    first_out, _ = first.communicate(timeout=60)
    assert first.returncode == 0, first_out
    plan = run_as_atlantis(plan_step, atlantis_step_env(service.url, 13, "bob"), tmp_path)
    plan_lines = Printed(plan)
    waiting(service, 1)
    return plan, plan_lines


def test_the_example_workflow_queues_plans_and_puts_applies_first(
    atlantis: AtlantisModels, service: ServiceProcess, tmp_path: Path,
) -> None:
    repo = workflow(atlantis)
    plan_step = repo["stages"]["plan"][0]["run"]
    apply_step = repo["stages"]["apply"][0]["run"]

    plan, plan_lines = plan_13_behind_12(plan_step, service, tmp_path)
    apply = run_as_atlantis(apply_step, atlantis_step_env(service.url, 14, "carol"), tmp_path)
    assert [w["pull"] for w in waiting(service, 2)] == [14, 13]
    # On its next poll (every 5s by default) the plan step prints its place behind both.
    behind_both = (f"waiting for {KEY}: position 2 of 2, behind pull #12 (alice) of acme/infra, "
                   "which holds it; pull #14 (carol), high; no estimate yet (no release of this "
                   "key seen)")
    deadline = time.monotonic() + 60
    while behind_both not in plan_lines:
        assert time.monotonic() < deadline, f"the plan step never printed: {behind_both}"
        time.sleep(0.05)

    # Pull #12 is merged: GitHub tells the service, which hands the project to the apply.
    closed = signed_github_close(service, 12)
    assert closed.status_code == 200 and closed.json()["released"] == [KEY]
    apply_out, _ = apply.communicate(timeout=60)
    assert apply.returncode == 0, apply_out
    assert f"locked {KEY} for pull #14" in apply_out
    closed = signed_github_close(service, 14)
    plan.wait(timeout=60)
    plan_out = "\n".join(plan_lines.finished())
    assert plan.returncode == 0, plan_out
    assert behind_both in plan_out.splitlines()


def test_the_locks_atlantis_holds_are_imported_before_the_switch(
    atlantis: AtlantisModels, service: ServiceProcess, bolt_writer: BoltWriter, tmp_path: Path,
) -> None:
    """The page's import, pasted (Atlantis's file and the data dir are this test's) while the
    service runs: pull #12's lock in Atlantis's BoltDB is the service's then, so another
    pull's plan step is refused and #12's apply step finds its own lock."""
    atlantis_db = tmp_path / "atlantis.db"
    bolt_writer.write(atlantis_db, [[{"op": "putLock", "bucket": ["runLocks"], "key": KEY, "lock": {
        "Project": {"ProjectName": "prod", "RepoFullName": "acme/infra", "Path": "envs/prod"},
        "Workspace": "default", "User": {"Username": "alice"}, "Time": "2024-05-01T10:00:00Z",
        "Pull": {"Num": 12, "URL": "https://github.com/acme/infra/pull/12", "Author": "alice"}}}]])
    script = (examples()["import-held-locks"]
              .replace("/home/atlantis/.atlantis/atlantis.db", str(atlantis_db))
              .replace("./el-data", str(service.data_dir)))
    imported = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT,
                              env=shell_env(service.url), capture_output=True, text=True,
                              timeout=120, check=False)
    assert imported.returncode == 0, imported.stderr
    assert re.search(rf"{re.escape(KEY)} +#12 +imported", imported.stdout), imported.stdout

    stages = workflow(atlantis)["stages"]
    other = run_as_atlantis(stages["plan"][0]["run"].replace("--wait 5m", "--wait 0s"),
                            atlantis_step_env(service.url, 13, "bob"), tmp_path)
    other_out, _ = other.communicate(timeout=60)
    assert other.returncode == 1 and f"{KEY} is locked by pull #12 (alice)" in other_out, other_out
    apply = run_as_atlantis(stages["apply"][0]["run"], atlantis_step_env(service.url, 12, "alice"),
                            tmp_path)
    apply_out, _ = apply.communicate(timeout=60)
    assert apply.returncode == 0 and f"locked {KEY} for pull #12" in apply_out, apply_out


def test_a_plan_step_waiting_when_its_pull_closes_says_why_it_ended(
    atlantis: AtlantisModels, service: ServiceProcess, tmp_path: Path,
) -> None:
    """Pull #13's plan waits behind #12 and #13 is closed: GitHub tells the service, which
    takes the waiting request out of the queue. The step ends with the service's reason, not
    with "cancelled by pull #12": #12 holds the key, it cancelled nothing."""
    plan_step = workflow(atlantis)["stages"]["plan"][0]["run"]
    plan, plan_lines = plan_13_behind_12(plan_step, service, tmp_path)

    closed = signed_github_close(service, 13)
    assert closed.status_code == 200, closed.text
    assert closed.json()["released"] == [] and len(closed.json()["cancelled"]) == 1
    plan.wait(timeout=60)
    out = plan_lines.finished()
    assert plan.returncode == 1, out
    assert out[-1] == (
        f"enhanced-locking: refused {KEY} (cancelled): this request was taken out of the queue "
        "while it waited: its pull's locks were released (the pull was closed, or unlocked with "
        "`atlantis unlock`) or an admin cancelled it; nothing was granted: run it again if it is "
        "still wanted"), out
    held = httpx.get(f"{service.url}/v1/locks/by-key", params={"key": KEY}).json()
    assert held["lock"]["pull"]["num"] == 12


class Printed(list[str]):
    """A running step's output lines, read as it prints them."""

    def __init__(self, step: subprocess.Popen[str]) -> None:
        super().__init__()
        assert step.stdout is not None
        self._stream = step.stdout
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with self._stream:
            for line in self._stream:
                self.append(line.rstrip("\n"))

    def finished(self) -> list[str]:
        """Every line, once the step's output has ended."""
        self._reader.join(60)
        return list(self)


def waiting(service: ServiceProcess, count: int) -> list[dict[str, Any]]:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        waiters: list[dict[str, Any]] = httpx.get(f"{service.url}/v1/queue",
                                                  params={"key": KEY}).json()["waiters"]
        if len(waiters) >= count:
            return waiters
        time.sleep(0.05)
    raise AssertionError(f"{count} steps never queued")


def signed_github_close(service: ServiceProcess, pull: int) -> httpx.Response:
    import hashlib
    import hmac
    import json
    from datetime import UTC, datetime

    body = json.dumps({
        "action": "closed", "number": pull,
        "pull_request": {"number": pull, "state": "closed", "merged": True,
                         "closed_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                         "html_url": f"https://github.com/acme/infra/pull/{pull}"},
        "repository": {"full_name": "acme/infra", "name": "infra",
                       "owner": {"login": "acme"}},
    }).encode()
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return httpx.post(f"{service.url}/v1/webhooks/github", content=body, headers={
        "content-type": "application/json", "X-GitHub-Event": "pull_request",
        "X-GitHub-Delivery": f"delivery-{pull}", "X-Hub-Signature-256": f"sha256={digest}"})


def paste(name: str, service: ServiceProcess, **env: str) -> subprocess.CompletedProcess[str]:
    script = examples()[name].replace("http://127.0.0.1:4142", service.url)
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script],
                          env=shell_env(service.url, **env), capture_output=True, text=True,
                          timeout=120, check=False)


def test_the_guides_command_blocks_work_when_pasted(service: ServiceProcess) -> None:
    assert set(examples()) == {"step-by-hand", "check-webhook", "import-held-locks"}
    by_hand = paste("step-by-hand", service)
    assert by_hand.returncode == 0, by_hand.stderr
    assert f"locked {KEY} for pull #12" in by_hand.stdout
    assert f"released {KEY} of pull #12" in by_hand.stdout

    check = paste("check-webhook", service,
                  ATLANTIS_ENHANCED_LOCKING_GITHUB_WEBHOOK_SECRET=SECRET)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == '{"ignored":"ping"}'
    wrong = paste("check-webhook", service,
                  ATLANTIS_ENHANCED_LOCKING_GITHUB_WEBHOOK_SECRET="not-the-secret")
    assert '"error"' in wrong.stdout and "X-Hub-Signature-256" in wrong.stdout
