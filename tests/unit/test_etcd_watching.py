"""``watching``: a watch runs while its check does, and is wound down after, whatever the
check did; the caller's own cancel is never taken for the watch's end."""

from __future__ import annotations

import asyncio
import time

import pytest

from enhanced_locking.backends.etcd_connection import watching

pytestmark = pytest.mark.timeout(30)


async def test_a_cancel_of_the_caller_while_the_watch_winds_down_ends_the_caller() -> None:
    """The watch takes a while to end once cancelled; the caller is cancelled meanwhile. It
    must end cancelled (a loop around it would otherwise start its watch again, and whoever
    cancelled it, such as ``close``, would wait for good)."""
    winding = asyncio.Event()
    starts = 0

    async def watch() -> None:
        nonlocal starts
        starts += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            winding.set()
            await asyncio.sleep(0.5)  # a slow wind-down (a stream being closed)
            raise

    async def check(_: asyncio.Future[None]) -> int:
        await asyncio.sleep(0)
        return 1

    async def loop() -> None:
        while True:  # as the stores' loops do: the check's answer starts the watch again
            await watching(watch(), check)

    task = asyncio.ensure_future(loop())
    await asyncio.wait_for(winding.wait(), 5)
    began = time.monotonic()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    assert task in done, "the cancelled caller did not end"
    assert task.cancelled()
    assert starts == 1
    assert time.monotonic() - began < 2


async def test_the_checks_answer_and_errors_come_through_and_the_watchs_own_do_not() -> None:
    async def failing_watch() -> None:
        raise RuntimeError("the watch broke")

    async def answer(running: asyncio.Future[None]) -> str:
        await asyncio.wait([running])
        return "checked"

    assert await watching(failing_watch(), answer) == "checked"

    async def endless() -> None:
        await asyncio.sleep(3600)

    async def refuse(_: asyncio.Future[None]) -> str:
        raise ValueError("the check failed")

    with pytest.raises(ValueError, match="the check failed"):
        await watching(endless(), refuse)
