"""The leader: the one replica that orders the queue shared by all replicas.

Only jobs that wait reach the leader — a slot free where the model is resident is
taken without it (``acquire`` in the shared store). Every job that waits, whichever
replica it came through, is in the shared store's ``waiting`` set; the leader keeps
them in a ``JobQueue`` and places them with the very code one process uses
(``Scheduler.dispatch``: priority class, fair share, arrival; wait or load; rent), on
the whole fleet's slot counts. A placement becomes a *grant*: one atomic call that
takes the slot for the job and tells its replica.

Leadership is a lease in the store that the leader keeps renewing; when it lapses
(the leader died or lost the store) another replica takes over and rebuilds the
queue from the shared ``waiting`` set, in the jobs' arrival order (each job's arrival
time is stored with it: I4 of ``protocol.py``). Fair-share counters start over at
that moment (returning clients are lifted to the least-served waiting one, as
always). A job is charged once per grant made, and refunded when the grant finds it
gone or its backend full (I5).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from corral.backends.backend import Backend
from corral.scheduler.placement import Action, Placement
from corral.scheduler.queues import Job, JobQueue, Priority
from corral.scheduler.shared.store import EpochChanged, GrantCall, SlotStore, SlotStoreError
from corral.scheduler.slots import Scheduler, _Waiter

if TYPE_CHECKING:
    from corral.scheduler.shared.replica import SharedScheduler

log = logging.getLogger("corral.leader")


def describe(job: Job, replica: str, front: bool, at_ms: int) -> bytes:
    """What the leader needs to order and place a job, as the store keeps it."""
    return orjson.dumps({
        "replica": replica, "model": job.model, "ctx": job.ctx,
        "priority": int(job.priority), "client": job.client, "weight": job.weight,
        "cost": job.cost, "exclude": sorted(job.exclude), "affinity": job.affinity,
        "front": front, "preemptible": job.preemptible, "tier": job.tier, "at": at_ms,
        "preemptions": job.preemptions,
    })


def stoppable_text(job: Job, replica: str, dispatched_ms: int) -> str:
    """What the leader needs to stop a running preemptible request (with its backend
    in front, added by the store): whose it is, its class, when it started, how often
    it was stopped already, and its model."""
    return (f"{replica}|{int(job.priority)}|{dispatched_ms}|{job.preemptions}|"
            f"{'' if job.ctx is None else job.ctx}|{job.model}")


@dataclass(frozen=True, slots=True)
class RemoteRun:
    lease: str
    backend: str
    replica: str
    priority: Priority
    dispatched_ms: int
    preemptions: int

    @classmethod
    def parse(cls, lease: str, backend: str, text: str) -> RemoteRun | None:
        parts = text.split("|", 5)
        if len(parts) != 6 or not all(p.isdigit() for p in parts[1:4]):
            return None
        return cls(lease, backend, parts[0], Priority(int(parts[1])), int(parts[2]),
                   int(parts[3]))


def arrival(descriptor: bytes) -> tuple[bool, int]:
    """Where a job goes when a queue is rebuilt: those sent to the front of their
    class first, then by arrival time."""
    try:
        d = orjson.loads(descriptor)
        return (not bool(d.get("front"))), int(d.get("at", 0))
    except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
        return True, 0


def rebuild(descriptor: bytes) -> tuple[Job, str, bool]:
    """(the job, its replica, whether it goes to the front of its class)."""
    d = orjson.loads(descriptor)
    job = Job(model=d["model"], client=d["client"], priority=Priority(d["priority"]),
              weight=d["weight"], cost=d["cost"], exclude=frozenset(d["exclude"]),
              affinity=d["affinity"], ctx=d["ctx"], preemptible=d["preemptible"],
              tier=d["tier"], preemptions=int(d.get("preemptions", 0)))
    return job, d["replica"], bool(d["front"])


class RemoteDispatcher(Scheduler):
    """``Scheduler.dispatch`` over jobs that wait on other replicas: a placement is
    handed to the leader as a grant to make, instead of waking a local waiter."""

    def __init__(self, owner: SharedScheduler, queue: JobQueue,
                 on_grant: Callable[[Job, Backend, str], None], kick: Callable[[], None],
                 on_stop: Callable[[RemoteRun], None]) -> None:
        super().__init__(owner.fleet, owner.router, queue, 10**9, math.inf, owner.clock,
                         owner.max_preemptions)
        self._on_grant = on_grant
        self._kick = kick
        self._on_stop = on_stop
        self.remote: dict[int, RemoteRun] = {}      # placeholder seq -> a run to stop
        self._stopping: dict[str, float] = {}       # lease -> when it was asked to stop

    def running(self, runs: dict[str, tuple[str, str]], now: float) -> None:
        """The preemptible requests running on every replica, as the store lists them."""
        self._stoppable.clear()
        self.remote.clear()
        self._stopping = {k: t for k, t in self._stopping.items() if now - t < 2.0}
        for lease, (backend, text) in runs.items():
            run = RemoteRun.parse(lease, backend, text)
            if run is None or lease in self._stopping:
                continue
            # Placeholders make the one-process dispatch look for a victim at all.
            placeholder = Job(model="", priority=run.priority, preemptible=True)
            self._stoppable[placeholder.seq] = placeholder
            self.remote[placeholder.seq] = run

    def _preempt_for(self, job: Job, now: float, waiting: bool = False) -> Backend | None:
        """Ask the replica running the request that did the least work, of a lower
        class, on a backend where ``job``'s model is resident, to stop it: its slot
        comes back through the store and the next pass gives it to the best waiting
        job. Nothing is handed over here (None)."""
        victims = []
        for seq, run in self.remote.items():
            backend = self.fleet.backend(run.backend)
            if (backend is None or run.priority <= job.priority
                    or run.preemptions >= self.max_preemptions or backend.name in job.exclude
                    or not backend.routable(now)):
                continue
            r = self.fleet.resident(backend, job.model, job.ctx)
            if r is None or r.loading:
                continue
            victims.append((run.dispatched_ms, seq, run))
        if not victims:
            return None
        _, seq, run = max(victims)
        del self.remote[seq]
        self._stoppable.pop(seq, None)
        self._stopping[run.lease] = now
        self.preemptions += 1
        self._on_stop(run)
        return None

    def enqueue(self, job: Job, front: bool) -> None:
        loop = asyncio.get_running_loop()
        # The waiter's future is never awaited: the grant goes to another replica.
        self._waiters[job.seq] = _Waiter(job, loop.create_future())
        self.queue.push(job, front=front)
        self.fleet.on_queue(job.model, 1)

    def withdraw(self, job: Job) -> None:
        if self.queue.remove(job):
            self.fleet.on_queue(job.model, -1)
        self._waiters.pop(job.seq, None)

    def _hand(self, job: Job, placement: Placement, now: float,
              transfer: bool = False) -> None:
        backend = placement.backend
        assert backend is not None
        self._waiters.pop(job.seq, None)
        if self.queue.remove(job):
            self.fleet.on_queue(job.model, -1)
        backend.in_flight += 1                 # until the grant's answer says otherwise
        self.queue.charge(job, job.cost)
        load = (placement.action is Action.LOAD
                or self.fleet.resident(backend, job.model, job.ctx) is None)
        if load:
            # What Ollama evicts for it is gone from every view at once: the grant
            # announces the load to the other replicas.
            self.fleet.loading(backend, job.model, job.ctx, now)
            self.loads += 1
            self.rent.reset(backend, now)
        self.dispatched += 1
        self._on_grant(job, backend, "load" if load else "resident")

    def _on_timer(self) -> None:
        # Rent and guards are looked at again in a leader's pass (fresh counts).
        self._timer, self._timer_at = None, math.inf
        self._kick()


class Leader:
    def __init__(self, owner: SharedScheduler) -> None:
        self.owner = owner
        self.store: SlotStore = owner.store
        self.queue = JobQueue(owner.queue.fairness)
        self.dispatcher = RemoteDispatcher(owner, self.queue, self._grant_later, self.kick,
                                           self._stop)
        self.jobs: dict[str, Job] = {}           # job id -> job
        self._ids: dict[int, str] = {}           # job seq -> job id
        self._replica: dict[str, str] = {}       # job id -> replica
        self._grants: list[tuple[Job, Backend, str]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._fetching: set[asyncio.Task[None]] = set()
        self.grants_made = 0

    # -- lifespan -------------------------------------------------------------------

    async def start(self) -> None:
        await self.resync()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        for task in [self._task, *self._fetching]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for job in list(self.jobs.values()):
            self.dispatcher.withdraw(job)
        self.jobs.clear()

    def kick(self) -> None:
        self._wake.set()

    # -- the waiting jobs -------------------------------------------------------------

    async def resync(self) -> None:
        """Make the queue what the store says waits (after taking over, or after a
        lost connection: notifications sent meanwhile are lost)."""
        waiting = await self.store.waiting()
        alive = await self.store.replicas()
        for job_id in [j for j in self.jobs if j not in waiting]:
            self._forget(job_id)
        # In arrival order, not the store's: first come stays first served (I4).
        for job_id, descriptor in sorted(waiting.items(), key=lambda kv: arrival(kv[1])):
            if job_id in self.jobs:
                continue
            job, replica, front = rebuild(descriptor)
            if alive and replica not in alive and self.owner.membership_settled():
                # Its replica is gone: nobody would take the slot.
                await self.store.cancel(job_id)
                continue
            self._add(job_id, job, replica, front)
        self.kick()

    def _add(self, job_id: str, job: Job, replica: str, front: bool) -> None:
        self.jobs[job_id] = job
        self._ids[job.seq] = job_id
        self._replica[job_id] = replica
        self.dispatcher.enqueue(job, front)

    def _forget(self, job_id: str) -> None:
        job = self.jobs.pop(job_id, None)
        if job is not None:
            self.dispatcher.withdraw(job)
            self._ids.pop(job.seq, None)
            self._replica.pop(job_id, None)

    def on_message(self, message: str) -> None:
        kind, _, arg = message.partition(" ")
        if kind == "enq":
            task = asyncio.get_running_loop().create_task(self._fetch(arg))
            self._fetching.add(task)
            task.add_done_callback(self._fetching.discard)
        elif kind == "cancel":
            self._forget(arg)
            self.kick()
        elif kind == "rel":
            self.kick()

    async def _fetch(self, job_id: str) -> None:
        if job_id in self.jobs:
            return
        try:
            descriptor = await self.store.job(job_id)
        except SlotStoreError:
            return          # the next resync finds it
        if descriptor is not None and job_id not in self.jobs:
            job, replica, front = rebuild(descriptor)
            self._add(job_id, job, replica, front)
            self.kick()

    # -- passes -------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._pass()
            except EpochChanged as changed:
                # The store lost its data: this replica records what runs again (and
                # rebuilds this queue) before the next pass.
                with contextlib.suppress(SlotStoreError, EpochChanged):
                    await self.owner._rejoin(changed.epoch)
                self.kick()
            except SlotStoreError as exc:
                log.debug("leader pass failed: %s", exc)
                await asyncio.sleep(0.2)
                self.kick()

    async def _pass(self) -> None:
        """Fresh counts, then the one-process dispatch, then its grants."""
        backends = list(self.owner.fleet.backends)
        counts, _ = await self.store.counts([b.name for b in backends])
        for b, n in zip(backends, counts, strict=True):
            b.in_flight = n
        charges = await self.store.charges()
        for client, amount in charges.items():
            self.queue.credit(client, amount)
        if not self.jobs:
            return
        if any(job.priority < Priority.LOW for job in self.jobs.values()):
            self.dispatcher.running(await self.store.stoppable(), self.owner.clock())
        self._grants = []
        self.dispatcher.dispatch()
        if self._grants and await self._make_grants(self._grants):
            # Some slot was taken meanwhile, or the store is in a grace period after
            # it lost its data (no slot is given until every replica has recorded
            # what it runs): try again then, not in a busy loop.
            grace_ms = await self.store.grace() - int(time.time() * 1000)
            if grace_ms > 0:
                await asyncio.sleep(min(grace_ms / 1000, 5.0))
            self.kick()

    def _stop(self, run: RemoteRun) -> None:
        task = asyncio.get_running_loop().create_task(self._tell(run))
        self._fetching.add(task)
        task.add_done_callback(self._fetching.discard)

    async def _tell(self, run: RemoteRun) -> None:
        with contextlib.suppress(SlotStoreError):
            await self.store.tell(run.replica, f"preempt {run.lease}")

    def _grant_later(self, job: Job, backend: Backend, placement: str) -> None:
        self._grants.append((job, backend, placement))

    async def _make_grants(self, grants: list[tuple[Job, Backend, str]]) -> bool:
        """All the grants of a pass in one round trip. True when some job must be
        placed again (its slot was taken meanwhile)."""
        calls, made = [], []
        for job, backend, placement in grants:
            job_id = self._ids.get(job.seq)
            if job_id is None:
                continue
            self.grants_made += 1
            replica = self._replica[job_id]
            calls.append(GrantCall(
                job_id, backend.name, backend.max_concurrency,
                f"{job_id}.g{self.grants_made}", self.owner.lease_ms, replica, placement,
                job.model, job.ctx,
                stoppable_text(job, replica, int(time.time() * 1000))
                if job.preemptible else ""))
            made.append((job_id, job, backend))
        if not calls:
            return False
        retry = False
        for (job_id, job, backend), (outcome, used) in zip(
                made, await self.store.grant_many(calls), strict=True):
            if outcome == 1:
                backend.in_flight = used
                self._forget_granted(job_id, job)
            elif outcome == 0:              # it left the queue meanwhile: not charged
                backend.in_flight = max(0, backend.in_flight - 1)
                self.queue.charge(job, -job.cost)
                self._forget_granted(job_id, job)
            else:                           # full after all: back to the front,
                backend.in_flight = used    # charged again when it is granted
                self.queue.charge(job, -job.cost)
                self.dispatcher.enqueue(job, front=True)
                retry = True
        return retry

    def _forget_granted(self, job_id: str, job: Job) -> None:
        self.jobs.pop(job_id, None)
        self._ids.pop(job.seq, None)
        self._replica.pop(job_id, None)
