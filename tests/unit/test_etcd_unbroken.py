"""A commit awaited to its end in its caller's task (``_Unbroken``): the task's cancel waits
for what the commit waits on, and is kept (``gone``); what the commit waits on is not
cancelled, and sees its own outcomes as it would awaited directly."""

from __future__ import annotations

import asyncio

import pytest

from enhanced_locking.backends.etcd_store import _Unbroken


async def answered(future: asyncio.Future[str], steps: list[str]) -> str:
    """A commit's shape: it waits on a future (the call's answer), then on a bare turn of the
    loop, and notes each step it took."""
    answer = await future
    steps.append(f"answered {answer}")
    await asyncio.sleep(0)
    steps.append("ended")
    return answer


async def test_a_cancel_waits_for_the_answer_and_is_kept() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()
    steps: list[str] = []
    committing = _Unbroken(answered(future, steps))
    awaiting = asyncio.ensure_future(committing)
    await asyncio.sleep(0)
    awaiting.cancel()
    awaiting.cancel()  # again: the same
    for _ in range(5):
        await asyncio.sleep(0)
    assert not awaiting.done() and not future.cancelled()
    future.set_result("42")
    assert await awaiting == "42"
    assert steps == ["answered 42", "ended"]
    assert committing.gone
    assert awaiting.cancelling() == 2  # (the awaiter says what the cancel kept means)


async def test_a_cancel_on_a_bare_turn_is_kept_too() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()
    future.set_result("7")
    steps: list[str] = []
    committing = _Unbroken(answered(future, steps))
    awaiting = asyncio.ensure_future(committing)
    await asyncio.sleep(0)  # (the commit's bare turn)
    awaiting.cancel()
    assert await awaiting == "7"
    assert steps == ["answered 7", "ended"] and committing.gone


async def test_without_a_cancel_it_answers_as_awaited_directly() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()
    loop.call_soon(future.set_result, "1")
    committing = _Unbroken(answered(future, []))
    assert await committing == "1"
    assert not committing.gone


async def test_the_answer_s_error_reaches_the_commit() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()
    loop.call_soon(future.set_exception, ConnectionError("down"))
    committing = _Unbroken(answered(future, []))
    with pytest.raises(ConnectionError, match="down"):
        await committing
    assert not committing.gone


async def test_a_future_cancelled_by_its_maker_is_the_commit_s_to_see() -> None:
    """(A call cancelled under the commit, its channel closed: not the caller's cancel.)"""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()
    seen: list[str] = []

    async def commit() -> str:
        try:
            return await future
        except asyncio.CancelledError:
            seen.append("cancelled")
            return "unavailable"

    committing = _Unbroken(commit())
    loop.call_soon(future.cancel)
    assert await committing == "unavailable"
    assert seen == ["cancelled"] and not committing.gone
