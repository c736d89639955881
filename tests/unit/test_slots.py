"""The async scheduler: a slot cap that is never exceeded, FIFO hand-over, bounds."""

import asyncio

import pytest

from corral.backends.backend import Backend
from corral.fleet.state import Fleet
from corral.pipeline.route import Router
from corral.scheduler.queues import Job, JobQueue, Priority
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


# -- placement and preemption with a fake clock ------------------------------------------

class FakeRun:
    def __init__(self, stoppable: bool = True) -> None:
        self.stoppable = stoppable
        self.stopped = False

    def interrupt(self) -> bool:
        if self.stoppable:
            self.stopped = True
        return self.stoppable


def _resident(*models: str, slots: int = 1) -> tuple[Scheduler, list[Backend], list[float]]:
    now = [0.0]
    bs = [Backend(f"b{i}", f"http://b{i}:1", slots, up=True,
                  models=frozenset({"m1:latest", "m2:latest"})) for i in range(len(models))]
    fleet = Fleet(bs, 2.0, {b.name: 1 for b in bs})
    for b, m in zip(bs, models, strict=True):
        fleet.observe_ps(b, [{"name": m}], now=-100.0)
    s = Scheduler(fleet, Router(), JobQueue("fifo"), 10, 60.0, clock=lambda: now[0],
                  max_preemptions=1)
    return s, bs, now


async def test_a_higher_class_takes_the_slot_of_a_preemptible_run() -> None:
    s, (b,), _ = _resident("m1:latest")
    low = Job("m1:latest", priority=Priority.LOW, preemptible=True, cost=10.0)
    assert await s.acquire(low) is b
    low.run = run = FakeRun()
    counter = s.queue.counters.get("", 0.0)
    high = Job("m1:latest", priority=Priority.HIGH)
    assert await s.acquire(high) is b
    assert run.stopped and low.preempted and low.backend is None and high.backend is b
    assert b.in_flight == 1                        # the slot changed hands, no more
    assert low.preemptions == 1 and s.preemptions == 1
    assert s.queue.counters.get("", 0.0) == counter   # refunded low, charged high (fifo: 0)
    s.release(low)                                 # the victim's release is a no-op
    assert b.in_flight == 1
    low.preempted = False                          # as the forwarder does, then requeues
    again = asyncio.create_task(s.acquire(low, front=True))
    await asyncio.sleep(0)
    assert s.depth() == 1
    s.release(high)
    assert await again is b
    # Bounded: with max_preemptions 1 it is not stopped a second time.
    low.run = FakeRun()
    other = asyncio.create_task(s.acquire(Job("m1:latest", priority=Priority.HIGH)))
    await asyncio.sleep(0)
    assert not other.done() and not low.preempted
    other.cancel()


async def test_no_preemption_once_the_answer_is_coming_or_for_the_same_class() -> None:
    s, (b,), _ = _resident("m1:latest")
    low = Job("m1:latest", priority=Priority.LOW, preemptible=True)
    await s.acquire(low)
    low.run = FakeRun(stoppable=False)             # its header is already in
    waiting = asyncio.create_task(s.acquire(Job("m1:latest", priority=Priority.HIGH)))
    await asyncio.sleep(0)
    assert not waiting.done() and not low.preempted
    waiting.cancel()
    low.run = FakeRun()
    same = asyncio.create_task(s.acquire(Job("m1:latest", priority=Priority.LOW)))
    await asyncio.sleep(0)
    assert not same.done() and not low.preempted
    same.cancel()


async def test_a_requeued_job_keeps_its_place_whatever_the_depth() -> None:
    s = _sched(slots=1, depth=1)
    first = Job("m:latest")
    await s.acquire(first)
    queued = asyncio.create_task(s.acquire(Job("m:latest")))
    await asyncio.sleep(0)
    back = asyncio.create_task(s.acquire(Job("m:latest"), front=True))
    await asyncio.sleep(0)
    assert s.depth() == 2 and not back.done()
    queued.cancel()
    back.cancel()


async def test_an_idle_backend_loads_after_its_rent_reaches_the_price() -> None:
    # b0 holds m1 and is busy; b1 holds m2, which nobody asks for. An m1 job waits.
    s, (b0, b1), now = _resident("m1:latest", "m2:latest")
    busy = Job("m1:latest")
    assert await s.acquire(busy) is b0
    for _ in range(5):
        s.fleet.model("m1:latest").service.add(0.1)
    waiting = asyncio.create_task(s.acquire(Job("m1:latest")))
    await asyncio.sleep(0)
    assert not waiting.done()                      # 0.1 s of wait beats a 2 s load
    now[0] = 1.0
    s.dispatch()
    assert not waiting.done() and s.rent.accrued(b1) == pytest.approx(1.0)
    now[0] = 2.05                                  # b1 idle for one load time
    s.dispatch()
    assert await waiting is b1
    assert s.loads == 1 and s.fleet.runner(b1, "m1:latest") is not None
    assert s.fleet.runner(b1, "m2:latest") is None   # what Ollama evicts for it


async def test_a_backend_busy_with_its_own_model_accrues_no_rent() -> None:
    s, (b0, b1), now = _resident("m1:latest", "m2:latest", slots=2)
    for _ in range(2):
        await s.acquire(Job("m1:latest"))            # b0 full with m1
    own = Job("m2:latest")
    assert await s.acquire(own) is b1                # b1 runs its own model, one slot free
    waiting = asyncio.create_task(s.acquire(Job("m1:latest")))
    await asyncio.sleep(0)
    for t in (5.0, 50.0, 500.0):
        now[0] = t
        s.dispatch()
        assert not waiting.done() and s.rent.accrued(b1) == 0.0
    # Once its own work is done, b1 is idle and the waiting m1 work may take it.
    s.release(own)
    now[0] = 503.0
    s.dispatch()
    assert await waiting is b1
    waiting.cancel()


async def test_work_held_back_by_the_no_flap_guard_is_looked_at_again_when_it_ends() -> None:
    s, (b,), now = _resident("m1:latest")
    first = Job("m2:latest")                      # resident nowhere: loaded, evicting m1
    assert await s.acquire(first) is b and first.placement == "load"
    now[0] = 1.0
    s.answered(first)                             # m2 ready at 1.0
    s.fleet.on_arrival("m2:latest", 1.05)          # and asked for again: in use
    s.release(first)
    now[0] = 1.5
    waiting = asyncio.create_task(s.acquire(Job("m1:latest")))
    await asyncio.sleep(0)
    assert not waiting.done()                      # m2 is guarded until 3.0
    assert s._timer_at == pytest.approx(3.0)       # and the scheduler will look then
    now[0] = 3.01
    s.dispatch()
    assert await waiting is b
    assert s.fleet.runner(b, "m1:latest") is not None
