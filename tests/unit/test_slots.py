"""The async scheduler: a slot cap that is never exceeded, FIFO hand-over, bounds."""

import asyncio

import pytest

from corral.backends.backend import Backend
from corral.fleet.state import Fleet
from corral.pipeline.route import Router
from corral.scheduler.queues import Job, JobQueue
from corral.scheduler.slots import NoBackend, QueueFull, QueueTimeout, Scheduler


def _sched(slots: int = 1, depth: int = 10, wait: float = 5.0,
           backends: list[Backend] | None = None) -> Scheduler:
    bs = backends or [Backend("b", "http://b:1", slots, up=True,
                              models=frozenset({"m:latest"}))]
    return Scheduler(Fleet(bs, 10.0), Router(), JobQueue("fifo"), depth, wait,
                     clock=lambda: 0.0)


async def test_waiters_get_slots_in_order_and_cap_holds() -> None:
    s = _sched(slots=1)
    first = Job("m:latest")
    b = await s.acquire(first)
    assert b.in_flight == 1
    order: list[int] = []

    async def waiter(i: int) -> None:
        job = Job("m:latest")
        got = await s.acquire(job)
        assert got.in_flight <= got.max_concurrency
        order.append(i)
        s.release(job)

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert s.depth() == 3 and b.in_flight == 1
    s.release(first)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert b.in_flight == 0 and s.depth() == 0


async def test_queue_full_and_no_backend() -> None:
    s = _sched(slots=1, depth=1)
    await s.acquire(Job("m:latest"))
    t = asyncio.create_task(s.acquire(Job("m:latest")))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await s.acquire(Job("m:latest"))
    with pytest.raises(NoBackend):
        await s.acquire(Job("other:latest"))
    t.cancel()


async def test_wait_bound() -> None:
    s = _sched(slots=1, wait=0.01)
    await s.acquire(Job("m:latest"))
    with pytest.raises(QueueTimeout) as info:
        await s.acquire(Job("m:latest"))
    assert info.value.retry_after >= 1
    assert s.depth() == 0


async def test_cancelled_waiter_leaves_queue_and_slot_goes_to_next() -> None:
    s = _sched(slots=1)
    first = Job("m:latest")
    b = await s.acquire(first)
    gone = asyncio.create_task(s.acquire(Job("m:latest")))
    stays = asyncio.create_task(s.acquire(Job("m:latest")))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    assert s.depth() == 1
    s.release(first)
    assert await stays is b and b.in_flight == 1


async def test_cancel_in_same_iteration_as_grant_hands_slot_back() -> None:
    s = _sched(slots=1)
    first = Job("m:latest")
    b = await s.acquire(first)
    t = asyncio.create_task(s.acquire(Job("m:latest")))
    await asyncio.sleep(0)
    s.release(first)  # grants the slot to t ...
    t.cancel()        # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await t
    assert b.in_flight == 0


async def test_job_waits_for_the_backend_with_its_model() -> None:
    a = Backend("a", "http://a:1", 1, up=True, models=frozenset({"x:latest"}))
    b = Backend("b", "http://b:1", 1, up=True, models=frozenset({"y:latest"}))
    s = _sched(backends=[a, b])
    first = Job("x:latest")
    assert await s.acquire(first) is a
    waiting_x = asyncio.create_task(s.acquire(Job("x:latest")))
    await asyncio.sleep(0)
    # a y-job is not held up by the x-job waiting ahead of it
    assert await s.acquire(Job("y:latest")) is b
    s.release(first)
    assert await waiting_x is a
