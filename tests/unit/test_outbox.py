"""The write-behind outbox: a write the store makes anyway can carry its oldest items."""

from __future__ import annotations

import asyncio

from enhanced_locking.backends.outbox import Outbox


class Store:
    def __init__(self) -> None:
        self.written: list[list[int]] = []

    async def write(self, batch: list[int]) -> None:
        self.written.append(batch)


def outbox(store: Store, **extra: int) -> Outbox[int]:
    return Outbox[int](store.write, what="items", task_name="outbox-test", down=(OSError,),
                       capacity=extra.get("capacity", 100), coalesce=0.01,
                       batch_limit=extra.get("batch_limit"))


async def test_items_carried_by_another_write_are_not_written_again() -> None:
    store = Store()
    box = outbox(store)
    for item in (1, 2, 3):
        box.put(item)
    assert box.lend() == [1, 2, 3]
    assert box.lend() == []  # one borrower at a time
    box.put(4)
    await asyncio.sleep(0.05)  # the task's moment has passed: it waits for the borrower
    assert store.written == []
    box.repaid(written=True)
    await box.drained(1.0)
    assert store.written == [[4]] and len(box) == 0


async def test_items_a_refused_write_carried_are_written_in_order_by_the_task() -> None:
    store = Store()
    box = outbox(store)
    box.put(1)
    box.put(2)
    assert box.lend(limit=1) == [1]
    box.put(3)
    box.repaid(written=False)
    await box.drained(1.0)
    assert [item for batch in store.written for item in batch] == [1, 2, 3]


async def test_an_item_dropped_while_lent_is_not_counted_twice() -> None:
    store = Store()
    box = outbox(store, capacity=2)
    box.put(1)
    box.put(2)
    assert box.lend() == [1, 2]
    box.put(3)  # full: 1 is dropped
    box.repaid(written=True)  # 1 and 2 were written: only 2 is left to take out
    await box.drained(1.0)
    assert [item for batch in store.written for item in batch] == [3]
    assert box.dropped == 1


async def test_items_that_come_while_a_write_is_on_its_way_wait_for_their_own_moment() -> None:
    # A steady caller (one item a millisecond, each write taking two) gets one write per
    # `coalesce`, not one write per item or per round trip.
    class SlowStore(Store):
        async def write(self, batch: list[int]) -> None:
            await asyncio.sleep(0.002)
            self.written.append(batch)

    store = SlowStore()
    box = outbox(store)
    started = asyncio.get_running_loop().time()
    for item in range(100):
        box.put(item)
        await asyncio.sleep(0.001)
    elapsed = asyncio.get_running_loop().time() - started
    await box.drained(1.0)
    assert [item for batch in store.written for item in batch] == list(range(100))
    # One write per coalesce (10 ms) and the write's own 2 ms, at the most.
    assert len(store.written) <= elapsed / 0.012 + 2, (len(store.written), elapsed)
    assert len(box) == 0


class GatedStore(Store):
    """A store whose writes wait for the test's word: each write takes ``opened`` (set by the
    test), then is made, or fails (``OSError``) when ``fail`` says so."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()
        self.opened = asyncio.Event()
        self.fail = False

    async def write(self, batch: list[int]) -> None:
        self.started.set()
        await self.opened.wait()
        self.opened.clear()
        self.started.clear()
        if self.fail:
            raise OSError("the store is away")
        self.written.append(batch)


async def test_an_item_dropped_while_the_task_writes_it_leaves_no_unwritten_item_behind(
) -> None:
    """The task writes [1, 2]; the outbox is full and drops 1 (in the write) for 3. The write
    is made: 2 leaves the outbox, and 3, which no write carried, stays and is written next.
    (Before, the task took out as many items as its batch had, 3 with them: lost.)"""
    store = GatedStore()
    box = outbox(store, capacity=2)
    box.put(1)
    box.put(2)
    await store.started.wait()  # the task writes [1, 2]
    box.put(3)  # full: the oldest (1, in the write) is dropped
    store.opened.set()
    await asyncio.wait_for(store.started.wait(), 1.0)
    store.opened.set()
    await box.drained(1.0)
    assert store.written == [[1, 2], [3]]
    assert len(box) == 0 and box.dropped == 1


async def test_a_write_that_fails_after_its_oldest_items_were_dropped_sends_the_rest_again(
) -> None:
    store = GatedStore()
    box = outbox(store, capacity=3)
    for item in (1, 2, 3):
        box.put(item)
    await store.started.wait()  # the task writes [1, 2, 3]
    box.put(4)  # 1 dropped
    box.put(5)  # 2 dropped
    store.fail = True
    store.opened.set()  # the write fails: 3, 4, 5 are left, in order
    await asyncio.wait_for(store.started.wait(), 1.0)
    store.fail = False
    store.opened.set()
    await box.drained(1.0)
    assert store.written == [[3, 4, 5]]
    assert len(box) == 0 and box.dropped == 2


async def test_a_write_failing_in_a_way_not_expected_is_retried_not_the_end() -> None:
    # An error not in ``down`` (a Redis refusal nobody listed) once ended the task: the items
    # stayed in the outbox for good, and ``put`` did not start it again.
    store = Store()
    failures = [ValueError("refused")]

    async def write(batch: list[int]) -> None:
        if failures:
            raise failures.pop()
        await store.write(batch)

    box = Outbox[int](write, what="items", task_name="outbox-test", down=(OSError,),
                      capacity=100, coalesce=0.01)
    box.put(1)
    await box.drained(5.0)
    box.put(2)
    await box.drained(5.0)
    assert [item for batch in store.written for item in batch] == [1, 2] and len(box) == 0
    await box.stop()


async def test_an_item_put_after_stop_is_dropped_and_counted_with_no_writer_left_running(
) -> None:
    # Before, a put after stop (an event published after the bus was closed) started a new
    # writer task that nothing stopped, writing to a closed connection.
    store = Store()
    counted: list[int] = []
    box = Outbox[int](store.write, what="items", task_name="outbox-after-stop",
                      down=(OSError,), capacity=100, coalesce=0.01, dropped=counted.append)
    box.put(1)
    await box.drained(1.0)
    await box.stop()
    box.put(2)
    box.put(3)
    await asyncio.sleep(0.05)
    assert not [task for task in asyncio.all_tasks() if task.get_name() == "outbox-after-stop"]
    assert store.written == [[1]] and len(box) == 0
    assert box.dropped == 2 and counted == [1, 1]
