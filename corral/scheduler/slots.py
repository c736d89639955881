"""Async side of the scheduler: jobs wait here until a backend slot is theirs.

Invariant kept by ``dispatch``: after every event that can free capacity (a release,
a backend coming up, a model list changing), no waiting job could be served by a free
slot. That is why a new job may take a free slot at once without looking at the
queue: nobody waiting could have used it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from corral.backends.backend import Backend
from corral.pipeline.route import Router
from corral.scheduler.queues import Job, JobQueue


class SchedulingError(Exception):
    status = 503

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(SchedulingError):
    pass


class QueueTimeout(SchedulingError):
    pass


class NoBackend(SchedulingError):
    pass


@dataclass
class _Waiter:
    job: Job
    future: asyncio.Future[Backend]


class Scheduler:
    def __init__(self, backends: Sequence[Backend], router: Router, queue: JobQueue,
                 max_depth: int, max_wait: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backends = list(backends)
        self.router = router
        self.queue = queue
        self.max_depth = max_depth
        self.max_wait = max_wait
        self.clock = clock
        self._waiters: dict[int, _Waiter] = {}
        self.dispatched = 0

    # -- the request side ---------------------------------------------------------

    async def acquire(self, job: Job, front: bool = False) -> Backend:
        """Return a backend whose slot is now held by ``job``; raise when it cannot be.

        The caller must ``release`` the backend exactly once.
        """
        now = self.clock()
        backend = self.router.choose(self.backends, job.model, now, job.exclude, job.affinity)
        if backend is not None:
            self._take(job, backend)
            return backend
        if not self._servable_later(job, now):
            raise NoBackend(f"no backend is available for model '{job.model}'",
                            retry_after=_retry_after(self.backends, now))
        if len(self.queue) >= self.max_depth:
            raise QueueFull("server busy, please try again: the queue is full",
                            retry_after=max(1, int(self.max_wait / 4)))
        loop = asyncio.get_running_loop()
        waiter = _Waiter(job, loop.create_future())
        job.enqueued_at = now
        self.queue.push(job, front=front)
        self._waiters[job.seq] = waiter
        granted = False
        try:
            async with asyncio.timeout(self.max_wait):
                backend = await waiter.future
            granted = True
            return backend
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                granted = True   # the slot came in the same loop iteration as the timeout
                return waiter.future.result()
            raise QueueTimeout(
                f"server busy, please try again: no slot freed within {self.max_wait:g}s",
                retry_after=max(1, int(self.max_wait / 4)),
            ) from None
        finally:
            if not granted:
                # Client left or timed out: leave the queue at once, and if the slot was
                # granted in the same loop iteration as the cancellation, hand it back.
                if waiter.future.done() and not waiter.future.cancelled():
                    self.release(waiter.future.result())
                else:
                    self.queue.remove(job)
                    self._waiters.pop(job.seq, None)

    def release(self, backend: Backend) -> None:
        backend.in_flight -= 1
        if self._waiters:
            self.dispatch()

    # -- the capacity side --------------------------------------------------------

    def _take(self, job: Job, backend: Backend) -> None:
        backend.in_flight += 1
        backend.breaker.on_dispatch(self.clock())
        self.queue.charge(job, job.cost)
        self.dispatched += 1

    def dispatch(self) -> None:
        """Hand free slots to waiting jobs, best job first."""
        if not self._waiters:
            return
        now = self.clock()
        for job in self.queue.ordered():
            if not any(b.in_flight < b.max_concurrency and b.routable(now) for b in self.backends):
                return
            backend = self.router.choose(self.backends, job.model, now, job.exclude, job.affinity)
            if backend is None:
                continue
            waiter = self._waiters.pop(job.seq)
            self.queue.remove(job)
            self._take(job, backend)
            waiter.future.set_result(backend)

    def fail_unservable(self) -> None:
        """Waiting jobs whose model no routable backend can ever serve now keep waiting
        (a backend may come back within ``max_wait``); nothing to do but dispatch."""
        self.dispatch()

    def _servable_later(self, job: Job, now: float) -> bool:
        """Some routable backend has the model (its slots are just busy)."""
        return any(b.routable(now) and job.model in b.models and b.name not in job.exclude
                   for b in self.backends)

    def set_backends(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)
        self.dispatch()

    def depth(self) -> int:
        return len(self.queue)


def _retry_after(backends: Sequence[Backend], now: float) -> int:
    waits = [b.breaker.retry_after(now) for b in backends if b.breaker.retry_after(now) > 0]
    return max(1, int(min(waits)) + 1) if waits else 5
