"""The alerts' runbooks of docs/04-monitoring.md, followed as written against a real service.

An alert fires after the fact: what a runbook tells the reader to look at must still show what
fired it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import shlex
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml
from tests.conftest import ServiceMaker, StoreOpener
from tests.support.locks import lock_for, request_for
from tests.support.served import served
from tests.support.unreadable import spoil_file

from enhanced_locking import cli

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "04-monitoring.md"
RULES = ROOT / "charts" / "enhanced-locking" / "files" / "prometheus-rules.yaml"
WAIT = timedelta(minutes=2)


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _runbook(alert: str) -> str:
    """The "what to do" cell of ``alert``'s row in the alerts table."""
    row = next(line for line in DOC.read_text().splitlines()
               if line.startswith(f"| `{alert}` |"))
    return row.rsplit("|", 2)[-2]


async def test_the_shadow_mismatch_runbook_shows_the_mismatches_that_fired_the_alert(
    make_service: ServiceMaker, store: StoreOpener,
) -> None:
    service = await make_service(enabled=True, backend="boltdb", migration_mode="shadow")
    await service.migration.shadow.drain()  # the initial seeding
    # A mismatch, some time before anyone reads: the shadow store holds a key legacy has free.
    await store(service, "shadow").acquire(lock_for(request_for(pull=9)))
    assert (await service.router.acquire(request_for(pull=1))).acquired
    await service.migration.shadow.drain()
    assert service.migration.shadow.stats.mismatches == 1

    [path] = re.findall(r"`GET (/v1/events\?[^`]*)`", _runbook("EnhancedLockingShadowMismatches"))
    async with served(service) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        found: list[str] = []

        async def read() -> None:
            async with http.stream("GET", path) as answer:
                assert answer.status_code == 200
                async for line in answer.aiter_lines():
                    if line.startswith("event: "):
                        found.append(line.removeprefix("event: "))
                        return

        # The stream follows on after what it replays: the first event ends the read; none
        # within the deadline means the command shows nothing of what fired the alert.
        try:
            async with asyncio.timeout(15):
                await read()
        except TimeoutError:
            pass
    assert found == ["shadow-mismatch"], f"GET {path} showed no past shadow-mismatch event"


def _commands(runbook: str) -> dict[str, list[str]]:
    """The ``enhanced-locking`` commands a runbook names, by their command words (``lock
    force-unlock``), each as its arguments, placeholders (``KEY``, ``TEXT``) as written."""
    found: dict[str, list[str]] = {}
    for command in re.findall(r"`enhanced-locking ([^`]*)`", runbook):
        words = shlex.split(command)
        found[" ".join(words[:2])] = words
    return found


async def _run(url: str, words: list[str], **values: str) -> tuple[int, Any]:
    """Run a runbook's command against ``url`` with its placeholders filled in: its exit code
    and the JSON it printed."""
    argv = ["--url", url, *(values.get(word, word) for word in words)]
    out = io.StringIO()

    def main() -> int:
        with contextlib.redirect_stdout(out):
            return cli.main(argv)

    code = await asyncio.to_thread(main)
    return code, json.loads(out.getvalue())


async def test_the_queue_backlog_runbook_frees_a_stuck_holder_for_its_waiters(
    make_service: ServiceMaker,
) -> None:
    service = await make_service(enabled=True, backend="boltdb", audit_stdout=False)
    key = "acme/infra/envs/prod/default/prod"
    assert (await service.router.acquire(request_for(pull=1))).acquired  # its pull is gone
    waiter = asyncio.create_task(service.router.acquire(request_for(pull=2, wait=WAIT)))

    commands = _commands(_runbook("EnhancedLockingQueueBacklog"))
    assert {"lock queue", "lock force-unlock"} <= commands.keys(), commands
    async with served(service) as url:
        queue: dict[str, Any] = {"waiters": []}
        while not queue["waiters"]:
            assert not waiter.done()
            code, queue = await _run(url, commands["lock queue"], KEY=key)
            assert code == 0
        assert queue["holder"]["pull"]["num"] == 1
        code, freed = await _run(url, commands["lock force-unlock"], KEY=key,
                                 TEXT="pull 1 was closed")
        assert code == 0 and freed["released"] is True
    granted = await asyncio.wait_for(waiter, 30)
    assert granted.acquired and granted.lock is not None and granted.lock.pull.num == 2


async def test_the_unreadable_locks_alert_fires_and_its_runbook_clears_the_key(
    make_service: ServiceMaker,
) -> None:
    service = await make_service(enabled=True, backend="boltdb", audit_stdout=False)
    key = "acme/infra/envs/prod/default/prod"
    assert (await service.router.acquire(request_for(pull=1))).acquired
    spoil_file(str(service.provider.current.config.data_path), "enhanced", key,
               '{"Pull": {"Num": "not a number"}}')

    [rule] = [rule for rule in alert_rules() if rule["alert"] == "EnhancedLockingUnreadableLocks"]
    commands = _commands(_runbook("EnhancedLockingUnreadableLocks"))
    assert {"lock list", "lock force-unlock"} <= commands.keys(), commands
    gauge = ("enhanced_locking_unreadable_locks", {"backend": "enhanced"})
    async with served(service) as url:
        code, listed = await _run(url, commands["lock list"])
        assert code == 0, listed
        assert [entry["key"] for entry in listed.get("unreadable", [])] == [key], listed
        # What the rule reads: one replica's gauge, above the rule's bound.
        expr = rule["expr"]
        assert "enhanced_locking_unreadable_locks" in expr and expr.endswith("> 0")
        assert service.metrics.registry.get_sample_value(*gauge) == 1
        code, freed = await _run(url, commands["lock force-unlock"], KEY=key,
                                 TEXT="written over by hand")
        assert code == 0 and freed["released"] is True
        assert service.metrics.registry.get_sample_value(*gauge) == 0
    assert (await service.router.acquire(request_for(pull=2))).acquired
