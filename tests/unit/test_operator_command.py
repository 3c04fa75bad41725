"""``enhanced-locking operator``: its flags, refused before anything starts when wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tests.support.service import enhanced_locking_command, free_port, scrubbed_env

from enhanced_locking import cli


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--policy", "Not_A_Name"], "argument --policy: not a Kubernetes object name"),
        (["--namespace", "Team_A"], "argument --namespace: not a Kubernetes object name"),
        (["--migration", "a" * 254], "argument --migration: not a Kubernetes object name"),
        (["--resync-interval", "0"], "argument --resync-interval: expected seconds from 1"),
        (["--resync-interval", "soon"], "argument --resync-interval: expected seconds from 1"),
        (["--enhanced-locking-max-timeout", "forever"], "enhanced-locking-max-timeout"),
        (["--liveness", "not a url"], "argument --liveness: expected an http URL"),
        (["--liveness", "https://127.0.0.1:8080/healthz"], "argument --liveness: expected an"),
        (["--liveness", "http://127.0.0.1:99999/healthz"], "argument --liveness: expected an"),
        (["--liveness", "http:///healthz"], "argument --liveness: expected an http URL"),
    ],
)
def test_a_bad_flag_exits_2_naming_it(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["operator", *argv])
    assert exited.value.code == 2
    assert expected in capsys.readouterr().err


def test_the_operator_takes_every_serve_flag(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("serve", "operator"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
    serve_help, operator_help = capsys.readouterr().out.split("usage: enhanced-locking operator")
    serve_flags = {w.strip(",[]") for w in serve_help.split() if w.startswith("--")}
    operator_flags = {w.strip(",[]") for w in operator_help.split() if w.startswith("--")}
    assert serve_flags <= operator_flags
    assert {"--namespace", "--policy", "--migration", "--liveness", "--resync-interval",
            "--standalone"} <= operator_flags


def test_without_kubernetes_credentials_it_exits_2_saying_so(tmp_path: Path) -> None:
    env = scrubbed_env({"KUBECONFIG": str(tmp_path / "absent"), "HOME": str(tmp_path)})
    env.pop("KUBERNETES_SERVICE_HOST", None)
    result = subprocess.run(
        [*enhanced_locking_command(), "operator", "--namespace", "atlantis",
         "--port", str(free_port()), "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 2
    assert f"no Kubernetes credentials: kubeconfig {tmp_path / 'absent'}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["operator", "serve"])
def test_a_kubeconfig_that_is_not_one_exits_2_saying_so(tmp_path: Path, command: str) -> None:
    # YAML that does not parse, or parses to something else than a kubeconfig's mapping: the
    # operator, and serve with access control by Kubernetes, name the file in one line.
    for number, text in enumerate(["clusters: [\n", "- a list\n"]):
        kubeconfig = tmp_path / f"kubeconfig-{number}"
        kubeconfig.write_text(text)
        env = scrubbed_env({"KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)})
        env.pop("KUBERNETES_SERVICE_HOST", None)
        extra = (["--namespace", "atlantis"] if command == "operator"
                 else ["--enhanced-locking-auth", "kubernetes"])
        result = subprocess.run(
            [*enhanced_locking_command(), command, *extra, "--port", str(free_port()),
             "--data-dir", str(tmp_path / "data")],
            capture_output=True, text=True, env=env, timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert f"kubeconfig {kubeconfig}: not a kubeconfig file" in result.stderr


@pytest.mark.parametrize("command", ["serve", "operator"])
def test_a_command_that_served_returns_its_code_to_a_caller_of_main(
    command: str, tmp_path: Path
) -> None:
    """``main`` returns the code of a service that stopped: only the ``enhanced-locking``
    command itself (``cli.run``) ends its process at once after it; a caller of ``main`` in
    its own process carries on."""
    script = (
        "from enhanced_locking import cli\n"
        "async def served(*args, **kwargs):\n"
        "    return 0\n"
        "cli._run_service = served\n"
        f"print('returned', cli.main([{command!r}, '--port', '0']), flush=True)\n"
    )
    operator_dir = str(Path(cli.__file__).resolve().parents[1])
    env = scrubbed_env({"PYTHONPATH": operator_dir, "KUBECONFIG": str(tmp_path / "absent"),
                        "HOME": str(tmp_path)})
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "returned 0" in done.stdout
