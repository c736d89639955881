"""Scheduling with several replicas (``state: redis://…``): one set of slots, one queue.

Each request costs the shared store two calls, both atomic and both one round trip:

- ``acquire`` when it needs a slot: when nobody waits anywhere, a slot free on a
  backend where its model is resident is taken at once — the uncontended path; else
  the job joins the one shared queue and this replica waits for its grant (a pub/sub
  message, not polling) from the leader, the replica that orders the queue;
- ``release`` when its answer is over — sent once the client has it, off its path.

Slots are leases that this replica renews while its requests run, so the slots of a
replica that dies come back by themselves. Fair-share charges ride on those two
calls. Loads the leader decides are announced to every replica, so no replica sends
a request to a model that a load on another replica has just evicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import orjson

from corral.backends.backend import Backend
from corral.fleet.state import Fleet
from corral.pipeline.route import Router
from corral.scheduler.placement import Placement
from corral.scheduler.queues import Job, JobQueue
from corral.scheduler.shared.leader import Leader, describe, stoppable_text
from corral.scheduler.shared.protocol import outage_limit, sole
from corral.scheduler.shared.store import (
    FLEET,
    LEADER,
    Acquisition,
    EpochChanged,
    Grant,
    Release,
    Released,
    SlotStore,
    SlotStoreError,
    Taken,
    replica_channel,
)
from corral.scheduler.slots import (
    NoBackend,
    QueueFull,
    QueueTimeout,
    Scheduler,
    SchedulingError,
    _retry_after,
)

log = logging.getLogger("corral.shared")


class StoreUnavailable(SchedulingError):
    pass


class _ModeChanged(Exception):
    """The shared store went away or came back: the job asks again, the other way."""


RENEW_INTERVAL_S = 1.0     # how often this replica talks to the store at the least
                           # (heartbeat, renewals): a lease lasts three of them at least


@dataclass(slots=True)
class _Pending:
    job: Job
    future: asyncio.Future[Grant]
    since: float
    descriptor: bytes = b""          # as queued: queued again after the store lost it


class SharedScheduler(Scheduler):
    def __init__(self, fleet: Fleet, router: Router, queue: JobQueue, max_depth: int,
                 max_wait: float, store: SlotStore, replica: str, *,
                 clock: Callable[[], float] = time.monotonic, max_preemptions: int = 2,
                 lease_ms: int = 15_000, leader_ms: int = 3_000,
                 info: Callable[[], bytes] = lambda: b"{}",
                 on_store_error: str = "allow") -> None:
        super().__init__(fleet, router, queue, max_depth, max_wait, clock, max_preemptions)
        self.store = store
        # While the store is away: "allow" carries on with a share of each backend's
        # slots (the in-process scheduler); "deny" answers 503.
        self.on_store_error = on_store_error
        self.local = False          # carrying on alone
        self.outage = False
        self.outages = 0
        self._caps: dict[int, int] = {}      # backend id -> its configured slots, while local
        # As the store last said: each backend's use, and the replicas sharing it
        # (those listed for a full renewal interval, so every replica lists them too).
        self._used: dict[str, int] = {}
        self._members: list[str] = []
        self._alone_since: float | None = None   # listed alone by the store since
        self._grace_until: int | None = None      # ms: no slot is given before it
        self._started = False
        self._epoch_since = -math.inf          # when this replica joined the epoch
        self._rejoining: asyncio.Task[None] | None = None
        self._unreleased: list[Release] = []   # releases the store did not confirm
        self.rejoins = 0
        self._alone: dict[int, Job] = {}     # jobs started while local, by seq
        self.replica = replica
        self.lease_ms = lease_ms
        self.leader_ms = leader_ms
        self.info = info
        self.leader: Leader | None = None
        self.leader_id: str | None = None
        self.waiting_total = 0                 # jobs waiting on all replicas, last seen
        self.late_releases = 0
        self.leases_lost = 0
        self._pending: dict[str, _Pending] = {}
        self._held: dict[str, Job] = {}        # lease -> the job running on it here
        self._attempts = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self.replicas: dict[str, dict[str, object]] = {}    # as of the last heartbeat
        self.mismatched: list[str] = []        # replicas with another configuration
        self._warned: set[tuple[str, str]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._ops: list[tuple[Acquisition | Release, asyncio.Future[Taken | Released]]] = []
        self._send_scheduled = False

    def job_id(self, job: Job) -> str:
        return f"{self.replica}.{job.seq}"

    # -- lifespan -------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.replicas = {self.replica: {}}
        self._tasks = [loop.create_task(self._listen()), loop.create_task(self._keep())]
        self._spawn(self._announce(f"hello {self.replica}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.leader is not None:
            await self.leader.stop()
            self.leader = None
            with contextlib.suppress(SlotStoreError):
                await self.store.resign(self.replica)
        pending: list[asyncio.Task[None]] = list(self._background)
        for task in pending:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 2.0)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- the request side -----------------------------------------------------------

    def _candidates(self, job: Job, now: float) -> list[Backend]:
        """Backends where the job runs at once if a slot is free, best first: its
        model resident and ready (any backend with it, with ``prefer_loaded: false``),
        the least busy first as last seen, the conversation's backend first."""
        if self.router.prefer_loaded:
            pool = self.fleet.ready_backends(job.model, job.ctx, now, job.exclude)
        else:
            pool = [b for b in self.fleet.holders(job.model, now) if b.name not in job.exclude]
        pool.sort(key=lambda b: b.in_flight / (b.max_concurrency * b.weight))
        if job.affinity is not None:
            pool.sort(key=lambda b: b.name != job.affinity)
        return pool

    async def acquire(self, job: Job, front: bool = False) -> Backend:
        while True:
            try:
                if self.local:
                    return await super().acquire(job, front)
                return await self._acquire_shared(job, front)
            except _ModeChanged:
                continue
            except EpochChanged as changed:
                await self._rejoin(changed.epoch)
                continue
            except StoreUnavailable as exc:
                self._store_down(exc)
                if self.on_store_error == "deny":
                    raise

    async def _acquire_shared(self, job: Job, front: bool) -> Backend:
        now = self.clock()
        candidates = self._candidates(job, now)
        if not candidates and not self._servable_later(job, now):
            raise NoBackend(f"no backend is available for model '{job.model}'",
                            retry_after=_retry_after(self.backends, now))
        job_id = self.job_id(job)
        lease = f"{job_id}.{next(self._attempts)}"
        charge = job.cost / job.weight if self.queue.fairness != "fifo" else 0.0
        try:
            # Batched with the other slot operations of this moment, in order: the
            # slots this replica freed just before are free in the store first (or
            # a keep-alive client's next request would queue behind its previous one).
            now_ms = int(time.time() * 1000)
            descriptor = describe(job, self.replica, front, now_ms)
            taken = await self._batch(Acquisition(
                [(b.name, b.max_concurrency) for b in candidates], lease, self.lease_ms,
                job_id, descriptor, job.client, charge,
                stoppable_text(job, self.replica, now_ms) if job.preemptible else ""))
            assert isinstance(taken, Taken)
        except SlotStoreError as exc:
            raise StoreUnavailable(f"the shared slot store cannot be reached: {exc}",
                                   retry_after=1) from None
        if taken.index is not None:
            backend = candidates[taken.index]
            backend.in_flight = taken.used - 1
            self._used[backend.name] = taken.used
            self._take(job, backend, lease, "resident", now)
            return backend
        self.waiting_total = taken.used
        if not front and taken.used > self.max_depth:
            await self._withdraw(job_id)
            raise QueueFull("server busy, please try again: the queue is full",
                            retry_after=max(1, int(self.max_wait / 4)))
        if self.leader is not None:
            self.leader.kick()
        return await self._await_grant(job, job_id, descriptor)

    async def _await_grant(self, job: Job, job_id: str, descriptor: bytes) -> Backend:
        loop = asyncio.get_running_loop()
        pending = _Pending(job, loop.create_future(), self.clock(), descriptor)
        self._pending[job_id] = pending
        job.enqueued_at = pending.since
        grant: Grant | None = None
        try:
            async with asyncio.timeout(self.max_wait):
                grant = await pending.future
        except TimeoutError:
            if pending.future.done() and not pending.future.cancelled():
                grant = pending.future.result()
        finally:
            self._pending.pop(job_id, None)
            if grant is None:
                # Left (client gone, timed out): out of the queue at once; a slot that
                # was granted meanwhile goes back.
                await asyncio.shield(self._withdraw(job_id))
        if grant is None:
            raise QueueTimeout(
                f"server busy, please try again: no slot freed within {self.max_wait:g}s",
                retry_after=max(1, int(self.max_wait / 4)))
        backend = self.fleet.backend(grant.backend)
        if backend is None:                   # removed by a reload meanwhile
            self._give_back_later(grant.backend, grant.lease, job_id, job.client, 0.0)
            raise NoBackend(f"backend {grant.backend} was removed", retry_after=1)
        self._take(job, backend, grant.lease, grant.placement, self.clock())
        return backend

    async def _withdraw(self, job_id: str) -> None:
        try:
            try:
                left = await self.store.cancel(job_id)
            except EpochChanged as changed:
                await self._rejoin(changed.epoch)
                left = await self.store.cancel(job_id)
        except (SlotStoreError, EpochChanged):
            return             # its lease, if any, lapses by itself
        if left.grant is not None:
            await self._give_back(left.grant.backend, left.grant.lease, job_id, "", 0.0)

    def _take(self, job: Job, backend: Backend, lease: str, placement: str,
              now: float) -> None:
        backend.in_flight += 1
        backend.breaker.on_dispatch(now)
        load = placement == "load" or self.fleet.resident(backend, job.model, job.ctx) is None
        self.fleet.on_dispatch(backend, job.model, job.ctx, now, load)
        job.backend, job.lease, job.dispatched_at = backend, lease, now
        job.placement = "load" if load else "resident"
        job.settled = 0.0
        if job.preemptible:
            self._stoppable[job.seq] = job
        self._held[lease] = job
        self.dispatched += 1
        if load:
            self.loads += 1

    # -- while the shared store is away ------------------------------------------------

    def _store_down(self, exc: BaseException) -> None:
        if self.outage:
            return
        self.outage = True
        self.outages += 1
        if self.on_store_error == "deny":
            log.warning("shared slot store unavailable (%s): requests get 503 until it is "
                        "back", exc)
            return
        if self.alone():
            log.warning("shared slot store unavailable (%s): this replica, the only one, "
                        "carries on with every slot until it is back", exc)
        else:
            log.warning("shared slot store unavailable (%s): this replica carries on "
                        "alone with the slots its requests hold until it is back", exc)
        self._go_local()

    def membership_settled(self) -> bool:
        """Whether the store's list of replicas is whole: after a new epoch (the store
        lost its data) the others show up only with their next heartbeat, and their
        waiting jobs must not be taken for those of replicas gone."""
        return self.clock() - self._epoch_since >= self.lease_ms / 1000

    def ready(self) -> bool:
        """Ready to serve once it has joined the store and the store's first grace
        period is over (a fleet's first start waits it out before a load balancer
        sends anything), or once it carries on without the store. Once ready, a later
        grace period (the store lost its data) only makes requests queue a moment."""
        if not self._started:
            self._started = self.outage or (
                self._grace_until is not None and bool(self.store.epoch)
                and time.time() * 1000 >= self._grace_until)
        return self._started

    def alone(self) -> bool:
        return sole(self._members, self.replica, self._alone_since, self.clock(),
                    self.lease_ms / 1000)

    def _local_limit(self, b: Backend, held: int) -> int:
        cap = self._caps.get(id(b), b.max_concurrency)
        return outage_limit(cap, held, max(self._used.get(b.name, held), held),
                            self.alone())

    def _go_local(self) -> None:
        self.local = True
        running: dict[int, int] = {}
        for job in self._held.values():
            if job.backend is not None:
                running[id(job.backend)] = running.get(id(job.backend), 0) + 1
        for b in self.fleet.backends:
            # The configured slots are kept once, whatever the outages in between (a
            # store that flaps must not save a reduced limit as the original).
            self._caps.setdefault(id(b), b.max_concurrency)
            held = running.get(id(b), 0)
            b.max_concurrency = self._local_limit(b, held)
            b.in_flight = held                          # what runs here, now
        # Jobs waiting for a grant ask again, in the local queue.
        for pending in list(self._pending.values()):
            if not pending.future.done():
                pending.future.set_exception(_ModeChanged())

    def set_backends(self, backends: list[Backend],
                     max_models: dict[str, int | None] | None = None) -> None:
        if self.local:
            # A reload during an outage: the new slots are the configured ones (kept
            # for when the store is back); the local limit follows them.
            for b in backends:
                self._caps[id(b)] = b.max_concurrency
                b.max_concurrency = self._local_limit(b, b.in_flight)
        super().set_backends(backends, max_models)

    async def _store_back(self) -> None:
        if not self.outage:
            return
        if not self.local:
            self.outage = False
            await self._flush_releases()
            log.warning("shared slot store is back")
            return
        # Requests that run at the backends — started alone, or before the outage with
        # a lease that may be gone — are recorded as they are, then slots are shared.
        for job in self._alone.values():
            if job.backend is not None and not job.lease:
                job.lease = f"{self.job_id(job)}.{next(self._attempts)}"
                self._held[job.lease] = job
        running = [(j.backend.name, lease) for lease, j in self._held.items()
                   if j.backend is not None]
        try:
            await self.store.adopt(running, self.lease_ms)
        except EpochChanged as changed:
            await self._rejoin(changed.epoch)
        # Only now is the outage over: should the store fail again before this point,
        # the configured slots are still those kept in _caps.
        self._alone.clear()
        self.outage = False
        for b in self.fleet.backends:
            b.max_concurrency = self._caps.pop(id(b), b.max_concurrency)
        self._caps.clear()
        self.local = False
        await self._flush_releases()
        # Jobs waiting here alone join the shared queue.
        for waiter in list(self._waiters.values()):
            if self.queue.remove(waiter.job):
                self.fleet.on_queue(waiter.job.model, -1)
            self._waiters.pop(waiter.job.seq, None)
            if not waiter.future.done():
                waiter.future.set_exception(_ModeChanged())
        log.warning("shared slot store is back: %d running request(s) recorded there; "
                    "slots are shared again", len(running))

    async def _flush_releases(self) -> None:
        """Releases the store did not confirm go again (by lease, so once): the slots
        come back now rather than when their leases lapse."""
        pending, self._unreleased = self._unreleased, []
        if pending:
            for r in pending:
                self._give_back_later(r.backend, r.lease, r.job_id, r.client, r.correction)

    async def _release_after_rejoin(self, release: Release, epoch: str) -> None:
        try:
            await self._rejoin(epoch)
        except (SlotStoreError, EpochChanged):
            self._unreleased.append(release)
            return
        self._give_back_later(release.backend, release.lease, release.job_id, release.client,
                              release.correction)

    async def _rejoin(self, epoch: str) -> None:
        """The store is not the one this replica knew (it restarted without its data,
        or failed over): record what runs here, and queue again what waits here,
        before anything else is asked. One at a time; callers that meet the same new
        epoch wait for the first one."""
        while self.store.epoch != epoch:
            if self._rejoining is None or self._rejoining.done():
                self._rejoining = asyncio.get_running_loop().create_task(
                    self._record_again(epoch))
            task = self._rejoining
            await asyncio.shield(task)    # raises what it raised: an outage, say

    async def _record_again(self, epoch: str) -> None:
        running = [(j.backend.name, lease) for lease, j in self._held.items()
                   if j.backend is not None]
        first = not self.store.epoch
        await self.store.adopt(running, self.lease_ms, epoch=epoch)
        self._epoch_since = self.clock()
        if first and not running and not self._pending:
            log.info("joined the shared slot store (epoch %s)", epoch)
            return
        self.rejoins += 1
        for job_id, pending in list(self._pending.items()):
            if pending.future.done() or not pending.descriptor:
                continue
            await self.store.acquire([], f"{job_id}.{next(self._attempts)}", self.lease_ms,
                                     job_id, pending.descriptor)
        log.warning("the shared slot store lost its data (new epoch %s): %d running "
                    "request(s) and %d waiting job(s) recorded again", epoch, len(running),
                    len(self._pending))
        if self.leader is not None:
            await self.leader.resync()

    def _grant(self, job: Job, placement: Placement, now: float,
               transfer: bool = False, load: bool | None = None) -> None:
        super()._grant(job, placement, now, transfer, load)
        if self.local:
            self._alone[job.seq] = job      # to be recorded once the store is back

    def forget_idle_clients(self) -> int:
        # The leader keeps the counters that order the shared queue.
        leader = self.leader
        return super().forget_idle_clients() + (
            leader.queue.forget_idle_clients() if leader is not None else 0)

    def settle(self, job: Job, correction: float) -> None:
        # Charged in the shared store with the release (no extra round trip).
        job.settled = correction

    def release(self, job: Job) -> None:
        backend = job.backend
        if backend is None:
            return          # preempted: the slot already belongs to another job
        if not job.lease:
            self._alone.pop(job.seq, None)
            super().release(job)        # started while the store was away: local
            return
        job.backend = None
        job.run = None
        self._stoppable.pop(job.seq, None)
        self._held.pop(job.lease, None)
        backend.in_flight = max(0, backend.in_flight - 1)
        self.fleet.on_release(backend, job.model, self.clock())
        correction = job.settled / job.weight if self.queue.fairness != "fifo" else 0.0
        self._give_back_later(backend.name, job.lease, self.job_id(job), job.client,
                              correction)
        if self.local and self._waiters:
            super().dispatch()          # a local waiter may take the slot

    def _give_back_later(self, backend: str, lease: str, job_id: str, client: str,
                         correction: float) -> None:
        """Off the request's path: its client has its answer already."""
        release = Release(backend, lease, job_id, client, correction)
        done = self._submit(release)
        done.add_done_callback(lambda f: self._released_later(release, f))

    def _released_later(self, release: Release,
                        future: asyncio.Future[Taken | Released]) -> None:
        backend = release.backend
        if future.cancelled():
            return
        exc = future.exception()
        if isinstance(exc, EpochChanged):
            # Sent again once this replica has rejoined (it may have recorded the
            # lease again meanwhile); by lease, so at most once.
            self._spawn(self._release_after_rejoin(release, exc.epoch))
            return
        if exc is not None:
            # Sent again once the store is back (by lease, so at most once).
            log.debug("release on %s not recorded (%s): sent again later", backend, exc)
            self._unreleased.append(release)
            return
        result = future.result()
        if isinstance(result, Released):
            self._released(backend, result)

    def _submit(self, op: Acquisition | Release) -> asyncio.Future[Taken | Released]:
        """Slot operations of one moment go to the store together, in the order they
        came, in one round trip: the first of a moment schedules a send, and every
        operation queued before that send runs joins it. Several sends may be out at
        once; each is written when it starts, so a release is written before any
        acquisition that came after it."""
        future: asyncio.Future[Taken | Released] = asyncio.get_running_loop().create_future()
        self._ops.append((op, future))
        if not self._send_scheduled:
            self._send_scheduled = True
            self._spawn(self._send())
        return future

    async def _batch(self, op: Acquisition | Release) -> Taken | Released:
        return await self._submit(op)

    async def _send(self) -> None:
        self._send_scheduled = False
        batch, self._ops = self._ops, []
        if not batch:
            return
        try:
            results = await self.store.run([op for op, _ in batch])
        except (SlotStoreError, EpochChanged) as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def _give_back(self, backend: str, lease: str, job_id: str, client: str,
                         correction: float) -> None:
        try:
            done = await self.store.release(backend, lease, job_id, client, correction)
        except EpochChanged as changed:
            # Sent again once this replica has rejoined (it may have recorded the
            # lease again meanwhile); by lease, so at most once.
            self._spawn(self._release_after_rejoin(
                Release(backend, lease, job_id, client, correction), changed.epoch))
            return
        except SlotStoreError as exc:
            log.debug("release of %s not recorded (%s): sent again later", lease, exc)
            self._unreleased.append(Release(backend, lease, job_id, client, correction))
            return
        self._released(backend, done)

    def _released(self, backend: str, done: Released) -> None:
        b = self.fleet.backend(backend)
        self._used[backend] = done.used
        if b is not None and not self.local:
            b.in_flight = done.used
        if not done.released:
            self.late_releases += 1
            log.warning("late release of a slot on %s ignored: its lease had lapsed and the "
                        "slot was taken back (a pause longer than the lease?)", backend)

    def answered(self, job: Job) -> None:
        backend = job.backend
        loaded = (backend is not None and job.placement == "load")
        super().answered(job)
        if loaded and backend is not None:
            # Every replica learns the model is in (the leader announced the load).
            ctx = "" if job.ctx is None else str(job.ctx)
            self._spawn(self._announce(f"ready {backend.name} {job.model} {ctx}"))

    async def _announce(self, message: str) -> None:
        with contextlib.suppress(SlotStoreError):
            await self.store.announce(message)

    def dispatch(self) -> None:
        """Waiting jobs are the leader's: wake it (when this replica is the leader);
        while the store is away, they are this replica's own."""
        if self.local:
            super().dispatch()
        elif self.leader is not None:
            self.leader.kick()

    # -- notifications, leadership, renewals -----------------------------------------

    async def _listen(self) -> None:
        channels = [LEADER, replica_channel(self.replica), FLEET]
        async for channel, message in self.store.listen(channels):
            try:
                if channel == "":
                    await self._resync()
                elif channel == LEADER:
                    if self.leader is not None:
                        self.leader.on_message(message)
                elif channel == FLEET:
                    self._fleet_event(message)
                else:
                    self._granted(message)
            except (SlotStoreError, EpochChanged) as exc:
                # A new epoch is taken up by the next heartbeat (within an interval).
                log.debug("notification not handled: %s", exc)

    def _granted(self, message: str) -> None:
        kind, _, rest = message.partition(" ")
        if kind == "preempt":
            self._preempt_here(rest)
            return
        if kind != "grant":
            return
        job_id, _, text = rest.partition(" ")
        grant = Grant.parse(text)
        pending = self._pending.get(job_id)
        if pending is None or pending.future.done():
            # Nobody waits for it any more: the slot goes back at once.
            self._give_back_later(grant.backend, grant.lease, job_id, "", 0.0)
            return
        pending.future.set_result(grant)

    def _preempt_here(self, lease: str) -> None:
        """The leader asks this replica to stop a request for a higher class waiting
        (on any replica): stopped only if nothing of its answer has arrived; its slot
        goes back to the store, where the leader gives it to that job; the request
        goes back to the front of its class, not charged for the work thrown away."""
        job = self._held.get(lease)
        run = job.run if job is not None else None
        if job is None or run is None or job.backend is None or not run.interrupt():
            return
        now = self.clock()
        stats = self.fleet.models.get(job.model)
        thrown = max(now - job.dispatched_at, 0.0) * (stats.decode.get(0.0) if stats else 0.0)
        job.thrown_tokens += thrown
        job.preemptions += 1
        job.preempted = True
        job.settled = -job.cost
        self.preemptions += 1
        if self.on_preempt is not None:
            self.on_preempt(job, thrown)
        self.release(job)

    def _fleet_event(self, message: str) -> None:
        if message.startswith("hello "):
            # A replica that just started: counted at once among those sharing the
            # slots, should the store go away before the next heartbeat lists it.
            self.replicas.setdefault(message[6:], {})
            return
        parts = message.split(" ")
        if len(parts) != 4:
            return
        kind, name, model, ctx_text = parts
        backend = self.fleet.backend(name)
        if backend is None:
            return
        ctx = int(ctx_text) if ctx_text.isdigit() else None
        if kind == "load":
            self.fleet.loading(backend, model, ctx, self.clock())
        elif kind == "ready":
            self.fleet.on_ready(backend, model, ctx, self.clock())

    async def _resync(self) -> None:
        """After (re)subscribing: grants sent while not listening are in the store."""
        await self._recover_grants(0.0)
        if self.leader is not None:
            await self.leader.resync()

    async def _recover_grants(self, older_than: float) -> None:
        now = self.clock()
        ids = [j for j, p in self._pending.items() if now - p.since >= older_than]
        if not ids:
            return
        for job_id, grant in (await self.store.granted(ids)).items():
            pending = self._pending.get(job_id)
            if pending is not None and not pending.future.done():
                pending.future.set_result(grant)

    async def _keep(self) -> None:
        """Once a renewal interval: heartbeat (which tells the store's epoch),
        leadership, renewals of running leases, grants whose message was lost."""
        renew_every = max(self.lease_ms / 3000, RENEW_INTERVAL_S)
        last_renew = -math.inf
        ticks = 0
        while True:
            try:
                # A replica is alive as long as its leases would be: its heartbeat
                # lasts one lease.
                epoch = await self.store.heartbeat(self.replica, self.info(), self.lease_ms)
                self._grace_until = epoch.grace_until
                if epoch.name != self.store.epoch:
                    await self._rejoin(epoch.name)
                await self._store_back()
                alive = await self.store.replicas()
                self.replicas = {r: decode_info(raw) for r, raw in alive.items()}
                self._members = sorted(alive)
                if self._members != [self.replica]:
                    self._alone_since = None
                elif self._alone_since is None:
                    self._alone_since = self.clock()
                self.replicas.setdefault(self.replica, {})
                self._compare_configs()
                self.fleet.adopt_remote(
                    k for r, info in self.replicas.items()
                    if r != self.replica and isinstance(k := info.get("knowledge"), dict))
                await self._elect()
                now = self.clock()
                if now - last_renew >= renew_every:
                    last_renew = now
                    await self._renew()
                await self._recover_grants(1.0)
                await self._refresh_counts()
                ticks += 1
                if self.leader is not None and self.leader.jobs:
                    # Slots also come back without a word: the lease of a replica
                    # that died lapses. Jobs waiting are looked at every interval.
                    self.leader.kick()
                if self.leader is not None and ticks % 3 == 0:
                    # Jobs queued through a replica that died wait for nobody.
                    await self.leader.resync()
                    await self.store.sweep(list(alive))
            except EpochChanged as changed:
                with contextlib.suppress(SlotStoreError, EpochChanged):
                    await self._rejoin(changed.epoch)
            except SlotStoreError as exc:
                self._store_down(exc)
                if self.leader is not None:
                    await self.leader.stop()     # a new one is elected once it is back
                    self.leader = None
            await asyncio.sleep(RENEW_INTERVAL_S)

    def _compare_configs(self) -> None:
        """Replicas on one store must run one configuration, or they do not enforce
        one set of limits and slots: say so loudly, once per replica and version."""
        mine = decode_info(self.info()).get("config")
        others = {r: info.get("config") for r, info in self.replicas.items()
                  if r != self.replica and info.get("config")}
        self.mismatched = sorted(r for r, c in others.items() if c != mine)
        for r in self.mismatched:
            seen = (r, str(others[r]))
            if seen not in self._warned:
                self._warned.add(seen)
                log.error("replica %s runs another configuration than this one (%s vs "
                          "%s: backends, limits, tiers or keys differ): replicas on one "
                          "state store must share one configuration", r, others[r], mine)

    async def _refresh_counts(self) -> None:
        """Each backend's slots in use on all replicas (what status and the choice of
        the least busy backend read)."""
        if self.local:
            return
        backends = list(self.fleet.backends)
        counts, waiting = await self.store.counts([b.name for b in backends])
        for b, n in zip(backends, counts, strict=True):
            b.in_flight = n
            self._used[b.name] = n
        self.waiting_total = waiting

    async def _elect(self) -> None:
        leading, who = await self.store.lead(self.replica, self.leader_ms)
        self.leader_id = who
        if leading and self.leader is None:
            leader = Leader(self)
            await leader.start()
            self.leader = leader
            log.info("replica %s orders the shared queue", self.replica)
        elif not leading and self.leader is not None:
            await self.leader.stop()
            self.leader = None
            log.info("replica %s no longer orders the shared queue (%s does)",
                     self.replica, who)

    async def _renew(self) -> None:
        held = [(job.backend.name, lease) for lease, job in self._held.items()
                if job.backend is not None]
        if not held:
            return
        for i in await self.store.renew(held, self.lease_ms):
            # Lapsed in a pause longer than the lease: the store has recorded it again
            # (the request runs at the backend whatever the counts said meanwhile).
            self.leases_lost += 1
            log.warning("the lease of a request running on %s had lapsed (a pause longer "
                        "than %gs?): recorded again; the backend takes no new request "
                        "until it is under its slots", held[i][0], self.lease_ms / 1000)

    def replication(self) -> dict[str, object] | None:
        leader = self.leader
        return {"replica": self.replica, "leader": self.leader_id,
                "leading": leader is not None,
                "waiting": len(leader.jobs) if leader is not None else self.waiting_total,
                "leases_held": len(self._held), "late_releases": self.late_releases,
                "leases_lost": self.leases_lost, "lease_s": self.lease_ms / 1000,
                "epoch": self.store.epoch, "rejoins": self.rejoins,
                "store": "unavailable" if self.outage else "ok", "outages": self.outages,
                "alone": self.local, "on_store_error": self.on_store_error,
                "config": decode_info(self.info()).get("config"),
                "config_mismatch": self.mismatched,
                "sole": self.alone(),
                "replicas": [{"id": r, **{k: v for k, v in info.items()
                                          if k not in ("knowledge", "sees")}}
                             for r, info in sorted(self.replicas.items())]}


def decode_info(raw: bytes) -> dict[str, object]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
