"""``enhanced-locking operator``: its flags, refused before anything starts when wrong."""

from __future__ import annotations

import pytest

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
