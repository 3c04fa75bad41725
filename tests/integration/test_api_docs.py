"""docs/api.md's examples, pasted: every command block of the page runs as written against a
real ``enhanced-locking serve`` (only the service's address is this test's), and each answer
is the one the page shows after it (its fields as shown; ``...`` stands for fields left out,
and an answer shown without it has no other field). Each runs twice: on a service open on
loopback, as ``make run`` serves, and on one with access control on, every ``curl`` sending a
token as the page says."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.pasting import answers, run_block
from tests.support.service import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "api.md"
BLOCK = re.compile(r"(?:<!-- example: (?P<name>[a-z-]+) -->\n)?```bash\n(?P<body>.*?)```",
                   re.DOTALL)
SHOWN = re.compile(r"```json\n(?P<body>.*?)```", re.DOTALL)
KEY = "acme/infra/envs/prod/default/prod"
MORE = "\u2026"  # a shown object's stand-in key for its ``...``
TIMES = {"acquiredAt", "expiresAt", "hash"}  # differ from run to run: shown only as examples
TOKEN = "tok-alice-77c2d0"
STATIC = "--enhanced-locking-auth=static"
WITH_TOKEN = (f"export ENHANCED_LOCKING_TOKEN={TOKEN}\n"  # the CLI sends it; curl as the page says
              'curl() { command curl -H "Authorization: Bearer $ENHANCED_LOCKING_TOKEN" "$@"; }\n')


def examples() -> dict[str, str]:
    found = [(m["name"], m["body"]) for m in BLOCK.finditer(DOC.read_text())]
    unmarked = [body.splitlines()[0] for name, body in found if not name]
    assert not unmarked, f"docs/api.md: a command block no test pastes: {unmarked}"
    return {name: body for name, body in found}


def shown_after(name: str) -> Any:
    """The JSON the page shows right after the block ``name``, ``...`` kept as ``MORE``."""
    text = DOC.read_text()
    after = text[text.index(f"<!-- example: {name} -->"):]
    after = after[after.index("```", after.index("```bash") + 3) + 3:]
    found = SHOWN.search(after)
    assert found is not None and "```bash" not in after[:found.start()], name
    body = re.sub(r"\{\.\.\.\}", f'{{"{MORE}": true}}', found["body"])
    return json.loads(re.sub(r",\s*\.\.\.", f', "{MORE}": true', body))


def matches(shown: Any, answered: Any, where: str = "") -> None:
    """``answered`` has every field ``shown`` has, with its value; no other unless ``...``."""
    if isinstance(shown, dict):
        assert isinstance(answered, dict), f"{where}: {answered!r}"
        fields = set(shown) - {MORE}
        if MORE not in shown:
            assert set(answered) == fields, f"{where}: answered {sorted(answered)}"
        for field in fields:
            assert field in answered, f"{where}.{field} missing: {answered!r}"
            if field not in TIMES:
                matches(shown[field], answered[field], f"{where}.{field}")
    elif isinstance(shown, list):
        assert isinstance(answered, list) and len(answered) == len(shown), f"{where}: {answered!r}"
        for index, (one, other) in enumerate(zip(shown, answered, strict=True)):
            matches(one, other, f"{where}[{index}]")
    else:
        assert shown == answered, f"{where}: shown {shown!r}, answered {answered!r}"


def paste(name: str, service: ServiceProcess, *, script: str | None = None) -> str:
    """Run one block with bash, as the page has it, in a shell with the venv's commands (and,
    where the service asks for one, a token sent by every command)."""
    script = (script or examples()[name]).replace("http://127.0.0.1:4142", service.url)
    if STATIC in service.args:
        script = WITH_TOKEN + script
    return run_block(script, url=service.url, cwd=ROOT)


def started(service_process: Callable[..., ServiceProcess], access: str, data_dir: Path,
            *flags: str) -> ServiceProcess:
    """A service open on loopback (``access`` "open"), or one that asks for a token: ``TOKEN``,
    of an admin."""
    if access == "open":
        return service_process(*flags, data_dir=data_dir)
    tokens = data_dir.parent / f"{data_dir.name}-tokens.csv"
    tokens.write_text(f'{TOKEN},alice,,"ops"\n')
    return service_process(*flags, STATIC, f"--enhanced-locking-auth-tokens-file={tokens}",
                           "--enhanced-locking-auth-roles=admin=group:ops", data_dir=data_dir)


@pytest.fixture(params=["open", "token"])
def default_service(request: pytest.FixtureRequest, service_process: Callable[..., ServiceProcess],
                    tmp_path: Path) -> ServiceProcess:
    return started(service_process, request.param, tmp_path / "data")  # the defaults, as `make run`


def test_the_lock_examples_answer_what_the_page_shows(default_service: ServiceProcess) -> None:
    taken, = answers(paste("api-acquire", default_service))
    matches(shown_after("api-acquire"), taken, "acquire")
    refused, = answers(paste("api-refused", default_service))
    matches(shown_after("api-refused"), refused, "refused")
    invalid, = answers(paste("api-invalid", default_service))
    matches(shown_after("api-invalid"), invalid, "invalid")
    every, of_the_pull = answers(paste("api-list", default_service))
    matches(shown_after("api-list"), every, "list")
    assert of_the_pull == every
    one, = answers(paste("api-by-key", default_service))
    assert one == {"lock": taken["lock"]}
    not_owned, = answers(paste("api-release-refused", default_service))
    matches(shown_after("api-release-refused"), not_owned, "release by another pull")
    released, = answers(paste("api-release", default_service))
    assert released == {"released": True, "lock": taken["lock"]}
    # The page's 404 of a free key, for the key it names:
    free, = answers(paste("api-by-key", default_service, script=examples()["api-by-key"]
                          .replace("envs/prod/default/prod", "envs/dev/default/dev")))
    matches(shown_after("api-by-key"), free, "a free key")
    assert answers(paste("api-release-pull", default_service)) == [
        {"released": [], "cancelled": []}]  # empty lists: the pull held and waited for nothing


@pytest.mark.parametrize("access", ["open", "token"])
def test_the_enhanced_examples_work_as_written(
        service_process: Callable[..., ServiceProcess], tmp_path: Path, access: str) -> None:
    service = started(service_process, access, tmp_path / "enhanced", "--enhanced-locking-enabled")
    block = examples()["api-enhanced"]
    follow = [line for line in block.splitlines() if line.startswith("curl -sN")]
    assert len(follow) == 1 and block.rstrip().endswith(follow[0])
    (batch, refreshed, queue, not_queued, released, force_unlocked) = answers(
        paste("api-enhanced", service, script=block.rstrip().removesuffix(follow[0])))
    assert batch["acquired"] is True
    assert [lock["backend"] for lock in batch["locks"]] == ["enhanced", "enhanced"]
    assert all(lock["expiresAt"] is not None for lock in batch["locks"])
    assert refreshed["lock"]["key"] == KEY
    assert refreshed["lock"]["expiresAt"] > batch["locks"][0]["expiresAt"]  # 2h, not 1h
    assert queue["holder"]["pull"]["num"] == 12 and queue["waiters"] == []
    assert not_queued["error"] == f"no request WAITER-ID is queued on {KEY}"
    assert len(released["released"]) == 2 and released["notHeld"] == []
    assert force_unlocked == {"error": f"no lock is held on {KEY}", "lockKey": KEY}
    # The last line follows the events until stopped: its first line says it follows.
    follow_one = follow[0].replace("http://127.0.0.1:4142", service.url)
    if access == "token":
        follow_one = follow_one.replace("curl ", f"curl -H 'Authorization: Bearer {TOKEN}' ", 1)
    command = ["bash", "-c", "exec " + follow_one]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as events:
        stop = threading.Timer(60, events.kill)  # a stream that says nothing fails, not hangs
        stop.start()
        try:
            assert events.stdout is not None
            assert events.stdout.readline().startswith(": following")
        finally:
            stop.cancel()
            events.kill()


def test_the_config_health_and_command_examples(default_service: ServiceProcess) -> None:
    config, = answers(paste("api-config", default_service))
    matches(shown_after("api-config"), config, "config")
    block = examples()["api-health"]
    out = paste("api-health", default_service)
    healthz, readyz, serving = answers(out[:out.index("# HELP")])
    comments = [line.partition("# ")[2] for line in block.splitlines()]
    for comment, answered in zip(comments, [healthz, readyz, serving], strict=False):
        shown, _ = json.JSONDecoder().raw_decode(comment)
        assert answered == shown, (comment, answered)
    assert "enhanced_locking_config_generation" in out
    acquired, listed, released, unlocked = answers(paste("api-cli", default_service))
    assert acquired["acquired"] is True and acquired["lock"]["user"]["username"] == "alice"
    assert [lock["key"] for lock in listed["locks"]] == [KEY]
    assert released["released"] is True
    assert unlocked == {"released": [], "cancelled": []}  # the service's answer, whole


def test_a_call_without_a_token_is_refused_and_one_with_it_answered(
        service_process: Callable[..., ServiceProcess], tmp_path: Path) -> None:
    service = started(service_process, "token", tmp_path / "data")
    block = examples()["api-token"]
    script = block.replace("http://127.0.0.1:4142", service.url)
    out = run_block(f"export ENHANCED_LOCKING_TOKEN={TOKEN}\n{script}", url=service.url, cwd=ROOT)
    comments = [line.partition("# ")[2] for line in block.splitlines() if line.startswith("curl")]
    refused, listed = answers(out)
    for comment, answered in zip(comments, [refused, listed], strict=True):
        code, shown = comment.split(" ", 1)
        matches(json.loads(shown.replace("[...]", "[]")), answered, code)
    assert comments[0].startswith("401 ")
    free = httpx.get(service.url + "/v1/locks")
    assert free.status_code == 401 and free.json() == refused
