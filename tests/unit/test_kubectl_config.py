"""``kubectl locking rollout ...`` given a kubeconfig or a context that is not there, or a
kubeconfig file that is not YAML: exit code 2 and one line naming the flag (or KUBECONFIG),
never a stack trace; a good kubeconfig whose API server does not answer stays exit code 3."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from enhanced_locking import kubectl

GOOD = """apiVersion: v1
kind: Config
clusters:
- name: here
  cluster: {server: "http://127.0.0.1:1"}
contexts:
- name: here
  context: {cluster: here, user: me, namespace: atlantis}
current-context: here
users:
- name: me
  user: {token: not-a-real-token}
"""


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = kubectl.main(["rollout", "status", *args])
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err
    return code, printed.err.splitlines()


@pytest.fixture(autouse=True)
def _no_kubeconfig_of_the_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)


def test_a_kubeconfig_file_that_is_not_yaml(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    broken.write_text("clusters: [\n")
    code, lines = run(capsys, "--kubeconfig", str(broken))
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(f"kubectl-locking: --kubeconfig {broken}: ")
    assert "YAML" in lines[0]


# The last two: an empty file, and one that names no current context (and no --context):
# a kubeconfig the user got wrong, not a cluster that did not answer.
@pytest.mark.parametrize("text", ["- a list\n", "a word\n", "clusters: 5\n", "",
                                  "apiVersion: v1\nkind: Config\n"])
def test_a_kubeconfig_file_of_yaml_that_is_not_a_kubeconfig(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    other = tmp_path / "other"
    other.write_text(text)
    code, lines = run(capsys, "--kubeconfig", str(other))
    assert code == 2
    assert len(lines) == 1
    assert lines[0].startswith(f"kubectl-locking: --kubeconfig {other}: not a kubeconfig file")


def test_a_kubeconfig_file_that_is_not_there(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = run(capsys, "--kubeconfig", str(tmp_path / "nowhere"))
    assert code == 2
    assert lines == [f"kubectl-locking: --kubeconfig {tmp_path / 'nowhere'}: no such file"]


def test_a_context_that_is_not_in_the_kubeconfig(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "config"
    good.write_text(GOOD)
    code, lines = run(capsys, "--kubeconfig", str(good), "--context", "elsewhere")
    assert code == 2
    assert lines == [f"kubectl-locking: --context elsewhere: no such context in {good} "
                     "(its contexts: here)"]


def in_a_process(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The plugin in a process of its own: the client library reads KUBECONFIG on import."""
    base = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "enhanced_locking.kubectl", "rollout", "status"],
        capture_output=True, text=True, timeout=60,
        env={**base, "HOME": str(tmp_path),
             "PYTHONPATH": str(Path(kubectl.__file__).parents[1]), **env})


@pytest.mark.parametrize(("text", "why"), [("users: {a: [\n", ""),
                                           ("", "not a kubeconfig file: Invalid kube-config")])
def test_a_kubeconfig_variable_naming_a_file_that_is_not_yaml_or_empty(
        tmp_path: Path, text: str, why: str) -> None:
    broken = tmp_path / "broken"
    broken.write_text(text)
    result = in_a_process(tmp_path, KUBECONFIG=str(broken))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kubectl-locking: KUBECONFIG {broken}: {why}")


def test_no_kubeconfig_at_all_is_no_credentials(tmp_path: Path) -> None:
    """No KUBECONFIG and no ~/.kube/config: nothing the user wrote is wrong; the cluster
    cannot be reached (exit 3), as before."""
    result = in_a_process(tmp_path)
    assert result.returncode == 3, result.stderr
    assert "no Kubernetes credentials" in result.stderr


def test_a_good_kubeconfig_whose_server_does_not_answer_is_unreachable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "config"
    good.write_text(GOOD)
    code, lines = run(capsys, "--kubeconfig", str(good), "--context", "here")
    assert code == 3
    assert len(lines) == 1 and "cannot reach the Kubernetes API server" in lines[0]

