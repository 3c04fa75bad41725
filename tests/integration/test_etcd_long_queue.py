"""A key with hundreds of waiters on etcd, with the events riding in the lock steps.

A lock step guards every entry of the ranges it read, up to etcd's ``--max-txn-ops`` (128)
compares, and the events' outbox rides in the steps it can, as a transaction nested in the
step's. etcd counts a nested transaction's operations against what the outer one leaves: a
step whose guards filled the 128 left no room, and etcd refused the whole step (``too many
operations in txn request``), answered ``unavailable``. Once a key had about 125 waiters,
acquires of it failed so while events were being written (a flood of 1,500 waiting acquires
over HTTP had 3 to 130 such answers). Now a passenger rides only where it fits.
"""

from __future__ import annotations

import asyncio
import collections
from datetime import timedelta

import pytest
from tests.conftest import ServiceMaker
from tests.support.etcd_fixtures import etcd_config
from tests.support.etcd_server import EtcdCluster
from tests.support.locks import request_for

from enhanced_locking.types import LockingError

pytestmark = pytest.mark.etcd

REPO = "acme/queue"
WAITERS = 200


async def test_a_key_with_hundreds_of_waiters_is_served_while_events_ride(
    make_service: ServiceMaker, etcd_cluster: EtcdCluster, etcd_prefix: str,
) -> None:
    config = etcd_config(etcd_cluster, etcd_prefix)
    service = await make_service(enabled=True, backend="etcd",
                                 etcd_endpoints=config.etcd_endpoints,
                                 etcd_key_prefix=config.etcd_key_prefix)
    router = service.router
    held = await router.acquire(request_for(repo=REPO, path="p", pull=1))
    assert held.acquired and held.lock is not None
    answers: collections.Counter[str] = collections.Counter()
    errors: list[str] = []

    async def waiter(pull: int) -> None:
        try:
            result = await router.acquire(request_for(repo=REPO, path="p", pull=pull,
                                                      wait=timedelta(seconds=30)))
        except LockingError as error:
            answers[type(error).__name__] += 1
            errors.append(f"pull {pull}: {error}")
            return
        answers["granted" if result.acquired else str(result.reason)] += 1
        if result.acquired and result.lock is not None:
            await router.release(result.lock.key, owner=(REPO, pull))

    tasks = [asyncio.ensure_future(waiter(100 + n)) for n in range(WAITERS)]
    for _ in range(300):  # every waiter queued (or failed), within 30 s
        if errors or len(await router.queue(held.lock.key)) == WAITERS:
            break
        await asyncio.sleep(0.1)
    await router.release(held.lock.key, owner=(REPO, 1))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    assert not errors, f"{dict(answers)}\n" + "\n".join(errors[:5])
    assert answers == {"granted": WAITERS}, answers
