"""The alerts' runbooks of docs/04-monitoring.md, followed as written against a real service.

An alert fires after the fact: what a runbook tells the reader to look at must still show what
fired it.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
from tests.conftest import ServiceMaker, StoreOpener
from tests.support.locks import lock_for, request_for
from tests.support.served import served

DOC = Path(__file__).resolve().parents[2] / "docs" / "04-monitoring.md"


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
