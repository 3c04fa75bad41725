"""docs/09-etcd.md's service on a local etcd, pasted: the page's block starts a throwaway etcd
member in the background of one shell and a service on it (only the ports are this test's), a
lock lands in that etcd, and the page's ``kill %1``, typed into the same shell, stops it."""

from __future__ import annotations

import base64
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from tests.support.controlplane import BinariesMissing, find_etcd
from tests.support.service import ServiceProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "09-etcd.md"
BLOCK = re.compile(r"A service on a local etcd.*?\(.*?`(?P<stop>[^`]+)` stops it\):"
                   r"\n\n```sh\n(?P<body>.*?)```", re.DOTALL)
DEADLINE = 60.0
PASTED = "the-block-s-first-lines-ran"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _keys(client_url: str, prefix: str) -> list[str]:
    """The keys under ``prefix`` in the etcd at ``client_url`` (its JSON gateway)."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    answer = httpx.post(f"{client_url}/v3/kv/range", timeout=10, json={
        "key": _b64(prefix), "range_end": _b64(end), "keys_only": True})
    answer.raise_for_status()
    return [base64.b64decode(kv["key"]).decode() for kv in answer.json().get("kvs", [])]


@contextmanager
def _shell(cwd: Path, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """One bash reading the lines typed into it, as a terminal the block is pasted in."""
    log = (tmp_path / "shell.log").open("w")
    shell = subprocess.Popen(["bash", "-u"], stdin=subprocess.PIPE, stdout=log,
                             stderr=subprocess.STDOUT, cwd=cwd, text=True,
                             env={**os.environ, "TMPDIR": str(tmp_path)},
                             start_new_session=True)
    try:
        yield shell
    finally:
        if shell.stdin is not None:
            shell.stdin.close()
        # Whatever the block left running in that shell's group (its etcd, if the stop line
        # did not stop it) goes with it.
        try:
            os.killpg(shell.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shell.wait(timeout=DEADLINE)
        log.close()


def test_the_local_etcd_block_serves_locks_from_that_etcd(
    service_process: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    found = BLOCK.search(DOC.read_text())
    assert found is not None, "docs/09-etcd.md: no block for a service on a local etcd"
    lines = found["body"].replace("\\\n", " ").strip().splitlines()
    assert lines[-1].startswith("enhanced-locking serve "), lines
    *start, serve = lines
    try:
        find_etcd()
    except BinariesMissing as error:
        pytest.fail(str(error), pytrace=False)
    client, peer = str(free_port()), str(free_port())

    def ported(line: str) -> str:
        return line.replace("2379", client).replace("2380", peer)

    etcd_url = f"http://127.0.0.1:{client}"
    with _shell(ROOT, tmp_path) as shell:
        assert shell.stdin is not None
        # The serve line is typed once the lines before it have run, as in a terminal.
        shell.stdin.write("".join(ported(line) + "\n" for line in start) + f"echo {PASTED}\n")
        shell.stdin.flush()
        until = time.monotonic() + DEADLINE
        while PASTED not in (tmp_path / "shell.log").read_text():
            assert time.monotonic() < until, "the block's first lines did not finish"
            time.sleep(0.1)
        words = shlex.split(ported(serve))
        assert words[:2] == ["enhanced-locking", "serve"], serve
        service = service_process(*words[2:])
        until = time.monotonic() + DEADLINE
        while httpx.get(f"{service.url}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < until, (tmp_path / "shell.log").read_text()[-4000:]
            time.sleep(0.2)
        answer = httpx.post(f"{service.url}/v1/locks", timeout=30, json={
            "project": {"repoFullName": "acme/infra", "path": "envs/prod"}, "pull": {"num": 12}})
        assert answer.json()["acquired"] is True, answer.text
        assert answer.json()["lock"]["backend"] == "enhanced"
        held = _keys(etcd_url, "/atlantis/enhanced/")
        assert any("/lock/" in key for key in held), f"the lock is not in that etcd: {held}"
        shell.stdin.write(found["stop"] + "\nwait\nexit\n")
        shell.stdin.close()
        try:
            shell.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            log = (tmp_path / "shell.log").read_text()[-4000:]
            pytest.fail(f"`{found['stop']}` did not stop the etcd:\n{log}", pytrace=False)
    with pytest.raises(httpx.ConnectError):
        _keys(etcd_url, "/atlantis/enhanced/")
