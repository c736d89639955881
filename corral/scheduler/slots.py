"""Async side of the scheduler: jobs wait here until a backend slot is theirs.

Which slot, and whether to wait for a resident one or load the model elsewhere, is
decided by the pure rule in ``placement``; this module holds the waiting jobs, hands
slots over, keeps the fleet's knowledge told of every dispatch and release, and
stops preemptible work for a higher class.

Invariant kept by ``dispatch``: after every event that can change what a waiting job
would do (a release, a backend coming up, residency changing, a load finishing, the
rent timer), no waiting job would take a free slot. That is why a new job may be
placed at once without looking at the queue: nobody waiting wanted that slot.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from corral.backends.backend import Backend
from corral.fleet.state import Fleet
from corral.pipeline.route import Router
from corral.scheduler.placement import (
    Action,
    Options,
    Placement,
    Rent,
    decide,
    load_options,
    options_for,
)
from corral.scheduler.queues import Job, JobQueue, Priority


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


log = logging.getLogger("corral")

# A job preempted for a higher class: (the job, estimated tokens thrown away).
PreemptHook = Callable[[Job, float], None]


class Scheduler:
    def __init__(self, fleet: Fleet, router: Router, queue: JobQueue,
                 max_depth: int, max_wait: float,
                 clock: Callable[[], float] = time.monotonic,
                 max_preemptions: int = 2) -> None:
        self.fleet = fleet
        self.router = router
        self.queue = queue
        self.max_depth = max_depth
        self.max_wait = max_wait
        self.max_preemptions = max_preemptions
        self.clock = clock
        self.rent = Rent()
        self.on_preempt: PreemptHook | None = None
        self.on_loaded: Callable[[Backend], None] | None = None
        # A request failed on a backend: (backend name, kind) — counted in the metrics.
        self.on_failure: Callable[[str, str], None] | None = None
        self._waiters: dict[int, _Waiter] = {}
        # Running jobs that a higher class may stop (their tier is preemptible).
        self._stoppable: dict[int, Job] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.dispatched = 0
        self.loads = 0              # dispatches that load a model
        self.preemptions = 0

    @property
    def backends(self) -> list[Backend]:
        return self.fleet.backends

    # -- the request side ---------------------------------------------------------

    async def acquire(self, job: Job, front: bool = False) -> Backend:
        """Return a backend whose slot is now held by ``job``; raise when it cannot be.

        The caller must ``release(job)`` exactly once — unless the job was preempted
        (``job.preempted``): its slot then went to another job.
        """
        now = self.clock()
        if self.router.prefer_loaded:
            # The uncontended path: the model is resident with a free slot. No
            # prices to weigh, nothing to allocate beyond the candidates.
            ready = self.fleet.ready_with_slot(job.model, job.ctx, now, job.exclude)
            if ready:
                chosen = self.router.pick(ready, job.affinity)
                self._grant(job, Placement(Action.RUN, chosen), now, load=False)
                return chosen
        opts = options_for(self.fleet, job.model, job.ctx, now, job.exclude,
                           self.router.prefer_loaded)
        placement = decide(opts, self.queue.ahead_of(job), self.router, job.affinity)
        if placement.backend is not None:
            self._grant(job, placement, now)
            return placement.backend
        if not self._servable_later(job, now):
            raise NoBackend(f"no backend is available for model '{job.model}'",
                            retry_after=_retry_after(self.backends, now))
        # A job back for another try or after a preemption was accepted already: it
        # keeps its place whatever the depth.
        if not front and len(self.queue) >= self.max_depth:
            raise QueueFull("server busy, please try again: the queue is full",
                            retry_after=max(1, int(self.max_wait / 4)))
        if self._stoppable and job.priority < Priority.LOW:
            backend = self._preempt_for(job, now)
            if backend is not None:
                return backend
        loop = asyncio.get_running_loop()
        waiter = _Waiter(job, loop.create_future())
        job.enqueued_at = now
        first_of_its_model = self.queue.ahead_of(job) == 0
        self.queue.push(job, front=front)
        self.fleet.on_queue(job.model, 1)
        self._waiters[job.seq] = waiter
        if first_of_its_model:
            # New waiting work may start a backend's rent (the fleet's view).
            self.dispatch()
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
                    self.release(job)
                elif self.queue.remove(job):
                    self.fleet.on_queue(job.model, -1)
                    self._waiters.pop(job.seq, None)

    def release(self, job: Job) -> None:
        backend = job.backend
        if backend is None:
            return          # preempted: the slot already belongs to another job
        job.backend = None
        job.run = None
        self._stoppable.pop(job.seq, None)
        backend.in_flight -= 1
        self.fleet.on_release(backend, job.model, self.clock())
        if self._waiters:
            self.dispatch()

    def settle(self, job: Job, correction: float) -> None:
        """The request's real service is known: correct its fair-share charge (the
        estimate was charged at dispatch), before ``release``."""
        self.queue.charge(job, correction)

    def answered(self, job: Job) -> None:
        """The backend answered ``job`` (its header is in): the model is resident there
        now. After a load, ask the backend what the load evicted."""
        backend = job.backend
        if backend is None:
            return
        backend.breaker.on_success()
        if self.fleet.on_ready(backend, job.model, job.ctx, self.clock()):
            if self.on_loaded is not None:
                self.on_loaded(backend)
            if self._waiters:
                self.dispatch()     # jobs waiting for it may run there now

    def failed(self, backend: Backend, kind: str) -> bool:
        """A request failed on ``backend`` (``kind``: error, timeout, mid-stream or a
        status). Passive health: ``max_fails`` failures within ``fail_timeout`` take the
        backend out for ``fail_timeout``, then one trial request decides. A fleet of
        one backend is never taken out this way (as nginx): there is nowhere else to
        send the work, and the active probes still see a dead backend. True when
        this failure took it out."""
        if self.on_failure is not None:
            self.on_failure(backend.name, kind)
        if len(self.backends) == 1:
            return False
        if not backend.breaker.on_failure(self.clock()):
            return False
        # When the open period ends, jobs already waiting for this backend must get
        # their trial at once, not at the next probe.
        asyncio.get_running_loop().call_later(backend.breaker.fail_timeout + 0.01,
                                              self.dispatch)
        log.warning("backend %s taken out for %gs after failed requests (last: %s)",
                    backend.name, backend.breaker.fail_timeout, kind)
        return True

    # -- the capacity side --------------------------------------------------------

    def _grant(self, job: Job, placement: Placement, now: float,
               transfer: bool = False, load: bool | None = None) -> None:
        backend = placement.backend
        assert backend is not None
        if not transfer:
            backend.in_flight += 1
        backend.breaker.on_dispatch(now)
        self.queue.charge(job, job.cost)
        if load is None:
            load = (placement.action is Action.LOAD
                    or self.fleet.resident(backend, job.model, job.ctx) is None)
        self.fleet.on_dispatch(backend, job.model, job.ctx, now, load)
        job.backend, job.dispatched_at = backend, now
        job.placement = "load" if load else "resident"
        if job.preemptible:
            self._stoppable[job.seq] = job
        self.dispatched += 1
        if load:
            self.loads += 1
            self.rent.reset(backend, now)

    def _hand(self, job: Job, placement: Placement, now: float,
              transfer: bool = False) -> None:
        """Give a waiting job its slot."""
        waiter = self._waiters.pop(job.seq)
        self.queue.remove(job)
        self.fleet.on_queue(job.model, -1)
        self._grant(job, placement, now, transfer)
        waiter.future.set_result(placement.backend)  # type: ignore[arg-type]

    def dispatch(self) -> None:
        """Hand free slots to waiting jobs, best job first; then the fleet's view."""
        if not self._waiters:
            return
        now = self.clock()
        cache: dict[tuple[str, int | None, frozenset[str]], Options] = {}
        ahead: dict[tuple[str, int | None], int] = {}
        firsts: dict[tuple[str, int | None], Job] = {}
        # (model, num_ctx, class, exclusions) for which no request could be stopped in
        # this pass: the jobs behind would find none either (a pass stays O(waiting)).
        no_victim: set[tuple[str, int | None, int, frozenset[str]]] = set()
        complete = True
        for job in self.queue.ordered():
            if not any(b.in_flight < b.max_concurrency and b.routable(now)
                       for b in self.backends):
                # No free slot: only preemption can help, and only a higher class.
                if not self._stoppable or job.priority >= Priority.LOW:
                    complete = False
                    break
                if self._try_preempt(job, now, no_victim):
                    cache.clear()
                continue
            key = (job.model, job.ctx, job.exclude)
            opts = cache.get(key)
            if opts is None:
                opts = cache[key] = options_for(self.fleet, job.model, job.ctx, now,
                                                job.exclude, self.router.prefer_loaded)
            line = (job.model, job.ctx)
            n = ahead.get(line, 0)
            placement = decide(opts, n, self.router, job.affinity)
            if placement.backend is None:
                ahead[line] = n + 1
                firsts.setdefault(line, job)
                if self._stoppable and job.priority < Priority.LOW and \
                        self._try_preempt(job, now, no_victim):
                    cache.clear()
                continue
            self._hand(job, placement, now)
            cache.clear()
        self._collect_rent(now, firsts, complete)

    def _collect_rent(self, now: float, firsts: dict[tuple[str, int | None], Job],
                      complete: bool) -> None:
        """The fleet's view: a backend with free slots accrues rent while work it could
        load waits, and loads once the rent reaches that load's price."""
        soonest = math.inf
        for b in self.backends:
            free = b.max_concurrency - b.in_flight
            if not complete or free <= 0 or not b.routable(now) or not self._waiters:
                # Busy (or the pass stopped early): the rent pauses, the episode goes on.
                self.rent.update(b, now, 0.0, episode=bool(self._waiters))
                continue
            episode, chosen, price = False, None, math.inf
            for (model, ctx), job in firsts.items():
                if (model not in b.models or b.name in job.exclude
                        or self.fleet.resident(b, model, ctx) is not None):
                    continue
                episode = True
                option = next((o for o in load_options(self.fleet, model, ctx, now,
                                                       job.exclude) if o.backend is b), None)
                # A backend busy with its own model (the load would evict a model with
                # requests running there) is not idle: it accrues nothing.
                if option is not None and not option.evicts_running:
                    chosen, price = job, option.price
                    break
            rate = free / b.max_concurrency if chosen is not None else 0.0
            accrued = self.rent.update(b, now, rate, episode)
            if chosen is None:
                continue
            if accrued >= price:
                self._hand(chosen, Placement(Action.LOAD, b, load_s=price), now)
                firsts.pop((chosen.model, chosen.ctx), None)
                continue
            soonest = min(soonest, Rent.due_in(accrued, rate, price))
        if self._waiters:
            # A load not allowed yet (a model just loaded is not evicted at once) may
            # be allowed then: look again without waiting for another event.
            soonest = min(soonest, self.fleet.protected_until(now) - now)
        self._arm(now, soonest)

    def _arm(self, now: float, delay: float) -> None:
        if delay == math.inf:
            return
        at = now + delay
        if self._timer is not None and self._timer_at <= at and self._timer_at > now:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        # A few milliseconds late rather than early: the rent must have reached the price.
        self._timer = asyncio.get_running_loop().call_later(delay + 0.002, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self.dispatch()

    # -- preemption ---------------------------------------------------------------

    def _try_preempt(self, job: Job, now: float,
                     no_victim: set[tuple[str, int | None, int, frozenset[str]]]) -> bool:
        key = (job.model, job.ctx, int(job.priority), job.exclude)
        if key in no_victim:
            return False
        if self._preempt_for(job, now, waiting=True) is None:
            no_victim.add(key)
            return False
        return True

    def _preempt_for(self, job: Job, now: float, waiting: bool = False) -> Backend | None:
        """Stop the running preemptible request of a lower class that has done the
        least work, on a backend where ``job``'s model is resident, and give its slot
        to ``job``. None when there is no such request (or none can be stopped any
        more: its answer is already coming)."""
        victims = []
        for v in self._stoppable.values():
            b = v.backend
            if (b is None or v.priority <= job.priority or v.run is None
                    or v.preemptions >= self.max_preemptions or b.name in job.exclude
                    or not b.routable(now)):
                continue
            r = self.fleet.resident(b, job.model, job.ctx)
            if r is None or r.loading:
                continue
            victims.append(v)
        victims.sort(key=lambda v: v.dispatched_at, reverse=True)   # least work done first
        for v in victims:
            run = v.run
            if run is not None and run.interrupt():
                break
        else:
            return None
        backend = v.backend
        assert backend is not None
        # The victim's slot is the waiting job's now: in_flight does not change, and
        # the victim's own release (it sees ``preempted``) is a no-op.
        self._stoppable.pop(v.seq, None)
        v.backend, v.run, v.preempted = None, None, True
        v.preemptions += 1
        self.fleet.on_release(backend, v.model, now)
        self.queue.charge(v, -v.cost)      # thrown-away work is not charged
        self.preemptions += 1
        stats = self.fleet.models.get(v.model)
        rate = stats.decode.get(0.0) if stats is not None else 0.0
        thrown = max(now - v.dispatched_at, 0.0) * rate
        v.thrown_tokens += thrown
        if self.on_preempt is not None:
            self.on_preempt(v, thrown)
        placement = Placement(Action.RUN, backend)
        if waiting:
            self._hand(job, placement, now, transfer=True)
        else:
            self._grant(job, placement, now, transfer=True)
        return backend

    # -- the fleet ------------------------------------------------------------------

    def _servable_later(self, job: Job, now: float) -> bool:
        """Some routable backend has the model (its slots are just busy)."""
        return any(b.routable(now) and job.model in b.models and b.name not in job.exclude
                   for b in self.backends)

    def set_backends(self, backends: list[Backend],
                     max_models: dict[str, int | None] | None = None) -> None:
        self.fleet.set_backends(backends, max_models)
        self.rent.forget(backends)
        self.dispatch()

    def fail_unservable(self) -> None:
        """Waiting jobs whose model no routable backend can ever serve now keep waiting
        (a backend may come back within ``max_wait``); nothing to do but dispatch."""
        self.dispatch()

    def depth(self) -> int:
        return len(self.queue)

    def forget_idle_clients(self) -> int:
        """Fair-share counters of clients idle since the last call (``queue.py``)."""
        return self.queue.forget_idle_clients()

    def replication(self) -> dict[str, object] | None:
        """With several replicas: this one, the leader, the replicas alive (``None``
        for one process)."""
        return None


def _retry_after(backends: list[Backend], now: float) -> int:
    waits = [b.breaker.retry_after(now) for b in backends if b.breaker.retry_after(now) > 0]
    return max(1, int(min(waits)) + 1) if waits else 5
