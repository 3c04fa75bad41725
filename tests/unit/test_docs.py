"""The generated parts of docs/ agree with the code (``make docs`` regenerates them)."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from tests.support.served import in_process

from enhanced_locking import cli
from enhanced_locking.api import create_app
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.factory import LockService
from enhanced_locking.provider import ConfigProvider

ROOT = Path(__file__).resolve().parents[2]


def test_the_generated_docs_match_the_code() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "hack" / "gen_docs.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr or result.stdout


def test_no_example_empties_or_deletes_a_file_of_the_default_data_dir() -> None:
    # Pasted, such an example would empty the store of a service running with the defaults
    # (make run): examples that need a broken store make one in a directory of their own.
    clobber = re.compile(r"(?::\s*>|>\s*|\brm\b[^\n]*?|\btruncate\b[^\n]*?)\s*~/\.atlantis/")
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            assert not clobber.search(line), f"{page.name}:{number}: {line}"


def test_an_example_that_serves_in_the_background_takes_a_port_of_its_own() -> None:
    # The quick start leaves `make run` serving, open, on 4142. An example that starts a
    # service in the background and then calls it would, on 4142, fail to listen and send
    # every call to the open service (a 401 answered 200, a right not asked).
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", page.read_text(), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                if (re.search(r"\benhanced-locking (serve|operator)\b", line)
                        and re.search(r"&\s*(#.*)?$", line)):
                    port = re.search(r"--port[= ](\d+)", line)
                    assert port and port.group(1) != "4142", f"{page.name}: {line}"


def _section(page: str, heading: str) -> str:
    text = (ROOT / "docs" / page).read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return " ".join(text[start:end if end != -1 else len(text)].split())


def test_examples_of_the_enhanced_locker_say_to_turn_it_on() -> None:
    # On the default service (enhanced locking off) a shared plan, a lease or a refresh goes to
    # the legacy locker, which ignores them: the pages say so and how to turn it on.
    for page, heading in [("08-policies.md", "Shared and exclusive locks"),
                          ("api.md", "Batches, leases, queues and events")]:
        section = _section(page, heading)
        assert "--enhanced-locking-enabled" in section, f"{page}: {heading}"
        assert "legacy locker" in section, f"{page}: {heading}"


def test_the_local_store_examples_start_their_store_on_loopback() -> None:
    # Pasted as written, each block starts the server the service then uses (make redis and
    # make etcd only install the binaries), on loopback only.
    for page, store, starts, port in [
        ("03-redis.md", "Redis", "redis-server --port 6379 --bind 127.0.0.1 ", "127.0.0.1:6379"),
        ("09-etcd.md", "etcd", '"$etcd" --data-dir', "127.0.0.1:2379"),
    ]:
        text = (ROOT / "docs" / page).read_text()
        after = text[text.index(f"A service on a local {store}"):]
        block = re.search(r"```sh\n(.*?)```", after, re.S)
        assert block is not None, page
        lines = block.group(1).splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(starts))
        serve = next(i for i, line in enumerate(lines) if line.startswith("enhanced-locking serve"))
        assert start < serve, page
        assert port in block.group(1) and "0.0.0.0" not in block.group(1), page
        if store == "etcd":
            assert "--listen-client-urls http://127.0.0.1:2379" in block.group(1)


async def test_the_config_example_is_what_a_default_service_answers(tmp_path: Path) -> None:
    # api.md shows GET /v1/config of a service started with the defaults (make run): each value
    # it spells out is that service's, a secret included ("" while it is not set).
    section = _section("api.md", "Configuration: `GET /v1/config`")
    start = section.index("```json") + len("```json")
    example = section[start:section.index("```", start)]
    config = EnhancedLockingConfig(data_dir=str(tmp_path), audit_stdout=False)
    app = create_app(LockService(ConfigProvider(config)))
    async with in_process(app) as client:
        answer = (await client.get("/v1/config")).json()
    for part in ("featureFlags", "routing"):
        shown = re.search(rf'"{part}": (\{{[^}}]*\}})', example)
        assert shown is not None, part
        assert json.loads(shown.group(1)) == answer[part], part
    shown_config = re.search(r'"config": \{(.*?), \.\.\.\}', example)
    assert shown_config is not None
    pairs = json.loads("{" + shown_config.group(1) + "}")
    assert pairs and {key: answer["config"][key] for key in pairs} == pairs
    generation = re.search(r'"generation": (\d+)', example)
    assert generation is not None and answer["generation"] == int(generation.group(1))
    assert answer["layers"] == ["static"] and '"layers": ["static"]' in example


def test_the_console_examples_print_what_they_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # Each `$ ` line of a console block, pasted into a shell in a directory of its own, prints
    # the lines the page shows under it (the refusals end with exit code 2). The command's own
    # lines run in this process (a process each would take seconds), the shell's in bash.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in [k for k in os.environ if k.startswith(("ATLANTIS_", "ENHANCED_LOCKING_"))]:
        monkeypatch.delenv(name)
    # Any free port: a service on the machine serving on the default 4142 (`make run`) must not
    # turn these refusals into "cannot listen".
    monkeypatch.setenv("ENHANCED_LOCKING_PORT", "0")
    blocks = re.findall(r"```console\n(.*?)```", (ROOT / "docs" / "01-foundation.md").read_text(),
                        re.S)
    assert len(blocks) == 2
    for block in blocks:
        steps: list[tuple[str, list[str]]] = []
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            else:
                steps[-1][1].append(line)
        for command, shown in steps:
            words = shlex.split(command, comments=True)
            env = dict(w.split("=", 1) for w in itertools.takewhile(lambda w: "=" in w, words))
            words = words[len(env):]
            if words[:1] != ["enhanced-locking"]:
                assert not shown and subprocess.run(["bash", "-c", command]).returncode == 0
                continue
            with monkeypatch.context() as scoped:
                for name, value in env.items():
                    scoped.setenv(name, value)
                code: object
                try:
                    code = cli.main(words[1:])
                except SystemExit as stop:
                    code = stop.code
            printed = capsys.readouterr()
            assert (printed.out + printed.err).splitlines() == shown, command
            assert code == 2, command
