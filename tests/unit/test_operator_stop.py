"""A stopping operator: kopf ends its own tasks and leaves the service's to the service.

kopf takes every task started after it as its own: once its root tasks end it waits up to 5 s
for them, then cancels them. The operator runs kopf beside the lock service in one loop, and
the service starts tasks while kopf runs (a config applied by a handler starts the shadow
replayer); those are the service's to close (the operator's caller closes the service).
"""

from __future__ import annotations

import asyncio

import kopf
from kopf._cogs.aiokits import aioadapters

from enhanced_locking.kube.operator import _NotKopfs


async def _services_work(forever: asyncio.Event) -> None:
    """A task of the service's (its coroutine is not kopf's)."""
    await forever.wait()


async def test_a_task_kopf_started_is_kopfs_and_one_it_did_not_is_left_alone() -> None:
    earlier = asyncio.create_task(_services_work(asyncio.Event()))
    tasks = _NotKopfs({earlier})
    flag = asyncio.Event()
    kopfs = asyncio.create_task(aioadapters.wait_flag(flag))
    services = asyncio.create_task(_services_work(asyncio.Event()))
    try:
        assert earlier in tasks
        assert services in tasks
        assert kopfs not in tasks
        assert list(tasks) == [earlier] and len(tasks) == 1
    finally:
        flag.set()
        for task in (earlier, services):
            task.cancel()
        await asyncio.gather(earlier, kopfs, services, return_exceptions=True)


async def test_kopf_stopped_leaves_the_services_task_running_and_ends_its_own() -> None:
    before = asyncio.all_tasks() - {asyncio.current_task()}
    stop = asyncio.Event()
    root = asyncio.create_task(stop.wait(), name="root")
    kopf_flag = asyncio.Event()
    kopfs = asyncio.create_task(aioadapters.wait_flag(kopf_flag))
    services = asyncio.create_task(_services_work(asyncio.Event()))
    stop.set()
    kopf_flag.set()  # kopf's own task ends once kopf waits for it
    try:
        await asyncio.wait_for(kopf.run_tasks([root], ignored=_NotKopfs(before)), 60)
        assert kopfs.done() and not kopfs.cancelled()
        # Not waited for (5 s) and not cancelled: the service closes it.
        assert not services.done()
    finally:
        services.cancel()
        await asyncio.gather(services, return_exceptions=True)
