"""A model-based test of the shared slot protocol (``protocol.py``, invariants I1-I5),
run against the memory store and against a real Redis through ``slots.lua``.

Several replicas, each modelled here as simply as replica.py behaves towards the
store (its handle, the requests it runs with their leases, the jobs it has queued,
whether it is paused, crashed or running alone during an outage), share one store.
Hypothesis drives them through acquire, release, renew (the clock moving on), a
leader's grant, cancel, a pause past the lease, a crash, a restart of the store
without its data, an outage of the store and the duplicated delivery of an
operation. The ground truth is what runs at each backend; the invariants are
checked against it after every step.

``CORRAL_MODEL_STEPS`` (at most, per example; 100) and ``CORRAL_MODEL_EXAMPLES`` (200)
set the run: the defaults check at least 10,000 steps per store (each run may take up
to 600 s; a longer one needs ``--timeout=0``). Faults that the protocol once got
wrong — a newcomer first at an empty store, epochs created twice in a millisecond,
outage limits from views of different age, a flapping store, a backend over its cap
after a pause — each have a regression test of their own below.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

from corral.scheduler.queues import Job, Priority
from corral.scheduler.shared.leader import arrival, describe, rebuild
from corral.scheduler.shared.protocol import SlotState, outage_limit, sole
from corral.scheduler.shared.redis import RedisSlotStore
from corral.scheduler.shared.store import EpochChanged, MemorySlotStore, Released
from tests.contract.limit_store_support import FakeClock

T = TypeVar("T")

TTL = 3_000            # a lease (the smallest slot_lease allowed)
GRACE = 3_000          # the stores' default grace period: one lease
RENEW = 1_000          # a replica's renewal interval
BACKENDS = {"a": 2, "b": 1}
STEPS = int(os.environ.get("CORRAL_MODEL_STEPS", "100"))        # at most, per example
EXAMPLES = int(os.environ.get("CORRAL_MODEL_EXAMPLES", "200"))
# Examples average about 80 steps (some end early); the total checked must reach
# half the product: 10,000 steps per store with the defaults.
MIN_STEPS = STEPS * EXAMPLES // 2


STEPS_RUN: dict[str, int] = {}    # invariant checks (one per step, one per example)
SEEN: Counter[str] = Counter()     # what the run went through: printed, to judge it


def seen(what: str) -> None:
    SEEN[what] += 1


CORRECTION = -0.25      # exact in binary: sums compare equal


def job_of(lease: str) -> str:
    """A lease names its job: ``<job>.<attempt>`` taken by acquire, ``g<n>.<job>``
    given by the leader."""
    return lease.split(".", 1)[1] if lease.startswith("g") else lease.rpartition(".")[0]


def client_of(job_id: str) -> str:
    return f"c{int(job_id.rpartition('.')[2]) % 2}"


class Unreachable(Exception):
    """The store is away: the replica's call fails (as SlotStoreError would)."""


class _RepeatableOps:
    """A handle whose next operation id can be the previous one again: the same
    release, cancel or charges delivered twice (a client library's retry after a
    lost answer)."""

    repeat: str | None = None
    last_op: str = ""

    def _fresh_op(self) -> str:
        raise NotImplementedError

    def _op(self) -> str:
        if self.repeat is not None:
            return self.repeat
        self.last_op = self._fresh_op()
        return self.last_op


class MemoryHandle(_RepeatableOps, MemorySlotStore):
    def _fresh_op(self) -> str:
        return MemorySlotStore._op(self)


class RedisHandle(_RepeatableOps, RedisSlotStore):
    def _fresh_op(self) -> str:
        return RedisSlotStore._op(self)


Handle = MemoryHandle | RedisHandle


@dataclass
class Replica:
    name: str
    store: Handle
    running: dict[str, str] = field(default_factory=dict)     # lease -> backend
    waiting: dict[str, bytes] = field(default_factory=dict)   # job id -> descriptor
    unreleased: list[tuple[str, str, str]] = field(default_factory=list)
    seen_used: dict[str, int] = field(default_factory=dict)   # last use the store told
    members: list[str] = field(default_factory=list)          # as the store listed them
    listed_ticks: int = 0
    alone_since: int | None = None                            # ms: listed alone since
    local: dict[str, int] | None = None                       # limits while alone
    paused: bool = False
    crashed: bool = False
    crashed_at: int = 0
    last_seen: int = 0                                        # its last heartbeat
    seq: int = 0

    @property
    def active(self) -> bool:
        return not self.paused and not self.crashed


class SlotProtocol(RuleBasedStateMachine):
    """Built by :func:`machine` for one store kind."""

    url: str = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.prefix = f"m{uuid.uuid4().hex[:10]}:"
        self.state = SlotState()
        self.client: Redis | None = None
        if self.url != "memory":
            self.client = Redis.from_url(self.url, socket_timeout=5)
        self.replicas: list[Replica] = []
        self.down = False                        # the store is unreachable
        self.overdrawn: set[str] = set()         # leases that lapsed in a pause
        self.charged: dict[str, float] = {}      # charged once per run, not taken yet
        self.grants = 0
        self.orphans: list[str] = []             # waiting jobs of replicas gone
        # Renewal intervals since every replica's view of the others was last made
        # incomplete (the store back after lapsing them, a replica back from a pause).
        self.settled = 0
        for _ in range(3):
            self._start()
        # They have run together for a while: each lists the others and itself.
        self.advance(2 * RENEW)

    # -- plumbing -------------------------------------------------------------------

    def run(self, coro: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coro
        return self.loop.run_until_complete(wrapped())

    def _handle(self) -> Handle:
        if self.client is None:
            return MemoryHandle(self.clock, state=self.state, grace_ms=GRACE)
        return RedisHandle(self.client, prefix=self.prefix, clock=self.clock,
                           grace_ms=GRACE)

    def _start(self) -> Replica:
        r = Replica(f"r{len(self.replicas)}", self._handle())
        self.replicas.append(r)
        if not self.down:
            self._tick(r)
        else:
            r.local = {b: 0 for b in BACKENDS}   # not listed: takes no free slot
        return r

    def call(self, r: Replica, op: Callable[[], Awaitable[T]]) -> T:
        """One operation as replica.py makes it: refused on a new epoch, the replica
        records what runs and queues again what waits, then asks again."""
        if self.down:
            raise Unreachable
        for _ in range(3):
            try:
                return self.run(op())
            except EpochChanged as changed:
                self._rejoin(r, changed.epoch)
        raise AssertionError("the epoch kept changing")

    def _rejoin(self, r: Replica, epoch: str) -> None:
        seen("a replica records what runs under a new epoch")
        running = sorted((b, lease) for lease, b in r.running.items())
        self.run(r.store.adopt(running, TTL, epoch=epoch))
        for job_id, descriptor in r.waiting.items():
            r.seq += 1
            self.run(r.store.acquire([], f"{job_id}.{r.seq}", TTL, job_id, descriptor))

    def _tick(self, r: Replica) -> None:
        """What replica.py's keep-alive loop does once a renewal interval."""
        epoch = self.run(r.store.heartbeat(r.name, b"{}", TTL))
        r.last_seen = self.clock()
        if epoch.name != r.store.epoch:
            self._rejoin(r, epoch.name)
        if r.local is not None:
            self._store_back(r)
        held = sorted((b, lease) for lease, b in r.running.items())
        if held:
            lost = self.call(r, lambda: r.store.renew(held, TTL))
            for i in lost:
                seen("a lease lapsed in a pause is recorded again")
                # Lapsed although this replica renewed in time: only a pause does that.
                assert held[i][1] in self.overdrawn, (
                    f"{r.name} lost the lease of {held[i]} without a pause")
        counts, _ = self.call(r, lambda: r.store.counts(list(BACKENDS)))
        r.seen_used = dict(zip(BACKENDS, counts, strict=True))
        members = self._alive()
        r.listed_ticks = r.listed_ticks + 1 if r.name in r.members else 0
        r.members = members
        if members != [r.name]:
            r.alone_since = None
        elif r.alone_since is None:
            r.alone_since = self.clock()

    def _epoch(self) -> str | None:
        """The store's epoch now (read without creating one)."""
        if self.client is None:
            return self.state.epoch
        raw = self.run(self.client.hget(self.prefix + "epoch", "name"))
        return raw.decode() if isinstance(raw, bytes) else None

    def _drop_orphans(self, r: Replica) -> None:
        """The leader's resync drops the waiting jobs of replicas gone."""
        orphans, self.orphans = self.orphans, []
        for job_id in orphans:
            self.call(r, lambda j=job_id: r.store.cancel(j))  # type: ignore[misc]

    def _may_start(self) -> bool:
        return self.down or self._epoch() is not None

    def _alive(self) -> list[str]:
        """The replicas the store lists: those whose heartbeat has not lapsed (taken
        from the model, as Redis expires replica keys on its own clock)."""
        now = self.clock()
        return sorted(r.name for r in self.replicas if r.last_seen + TTL > now)

    def _store_back(self, r: Replica) -> None:
        """replica.py's return from an outage: what runs is recorded, then the
        releases the store did not confirm go again."""
        running = sorted((b, lease) for lease, b in r.running.items())
        self.call(r, lambda: r.store.adopt(running, TTL))
        r.local = None
        pending, r.unreleased = r.unreleased, []
        for backend, lease, job_id in pending:
            self._release(r, backend, lease, job_id)

    def _release(self, r: Replica, backend: str, lease: str, job_id: str) -> Released:
        """A request ends: its slot goes back with the correction of its charge (its
        real token count is known now)."""
        client = client_of(job_id)
        done = self.call(r, lambda: r.store.release(backend, lease, job_id, client,
                                                    CORRECTION))
        self.charged[client] = self.charged.get(client, 0.0) + CORRECTION
        return done

    def advance(self, ms: int) -> None:
        """Time passes: every replica that runs (not paused, not crashed) ticks once
        a renewal interval."""
        while ms > 0:
            step = min(ms, RENEW)
            self.clock.advance(step)
            ms -= step
            if not self.down:
                for r in self.replicas:
                    if r.active:
                        self._tick(r)
                self.settled += 1

    def _snapshot(self, r: Replica) -> tuple[Any, ...]:
        counts = self.run(r.store.counts(list(BACKENDS)))
        waiting = self.run(r.store.waiting())
        return counts, sorted(waiting.items())

    def twice(self, r: Replica, op: Callable[[], Awaitable[T]], first: T) -> None:
        """The same operation delivered again: the same answer, and nothing changes."""
        before = self._snapshot(r)
        again = self.call(r, op)
        seen("an operation delivered twice")
        assert again == first, f"a repeat answered {again!r}, the first {first!r}"
        assert self._snapshot(r) == before, "a repeated operation changed the store"

    # -- rules ----------------------------------------------------------------------

    def _pick(self, data: st.DataObject, **flags: bool) -> Replica | None:
        pool = [r for r in self.replicas if r.active
                and all(getattr(r, k) == v for k, v in flags.items())]
        return data.draw(st.sampled_from(pool)) if pool else None

    @rule(data=st.data(), order=st.permutations(sorted(BACKENDS)),
          how_many=st.integers(1, 2), queue=st.booleans(), dup=st.booleans())
    def acquire(self, data: st.DataObject, order: list[str], how_many: int, queue: bool,
                dup: bool) -> None:
        r = self._pick(data)
        if r is None:
            return
        r.seq += 1
        job_id, lease = f"{r.name}.{r.seq}", f"{r.name}.{r.seq}.1"
        backends = [(b, BACKENDS[b]) for b in order[:how_many]]
        if self.down or r.local is not None:
            self._acquire_alone(r, backends, lease)
            return
        descriptor = f'{{"job": "{job_id}"}}'.encode() if queue else None
        client = client_of(job_id)

        def op() -> Awaitable[Any]:
            return r.store.acquire(backends, lease, TTL, job_id, descriptor, client, 1.0)

        taken = self.call(r, op)
        seen("acquire takes a slot" if taken.index is not None else "acquire queues")
        if taken.index is not None:
            backend = backends[taken.index][0]
            r.running[lease] = backend
            r.seen_used[backend] = taken.used
            self.charged[client] = self.charged.get(client, 0.0) + 1.0
        elif descriptor is not None:
            r.waiting[job_id] = descriptor
        if dup:
            self.twice(r, op, taken)

    def _acquire_alone(self, r: Replica, backends: list[tuple[str, int]],
                       lease: str) -> None:
        assert r.local is not None
        for backend, _ in backends:
            here = sum(1 for b in r.running.values() if b == backend)
            if here < r.local[backend]:
                seen("a request starts alone during an outage")
                r.running[lease] = backend
                return

    @rule(data=st.data(), dup=st.booleans())
    def release(self, data: st.DataObject, dup: bool) -> None:
        r = self._pick(data)
        if r is None or not r.running:
            return
        lease = data.draw(st.sampled_from(sorted(r.running)))
        backend = r.running.pop(lease)
        self.overdrawn.discard(lease)
        job_id = job_of(lease)
        if self.down or r.local is not None:
            r.unreleased.append((backend, lease, job_id))
            return
        done = self._release(r, backend, lease, job_id)
        if dup:
            r.store.repeat = r.store.last_op
            client = client_of(job_id)
            try:
                self.twice(r, lambda: r.store.release(backend, lease, job_id, client,
                                                      CORRECTION), done)
            finally:
                r.store.repeat = None

    @rule(data=st.data(), backend=st.sampled_from(sorted(BACKENDS)), dup=st.booleans())
    def grant(self, data: st.DataObject, backend: str, dup: bool) -> None:
        """The leader (any replica that reaches the store) gives a waiting job of a
        running replica a slot; the job then runs there."""
        if self.down:
            return
        leader = self._pick(data)
        owners = [r for r in self.replicas if r.active and r.local is None and r.waiting]
        if leader is None or leader.local is not None or not owners:
            return
        owner = data.draw(st.sampled_from(owners))
        job_id = data.draw(st.sampled_from(sorted(owner.waiting)))
        if data.draw(st.booleans()):
            # As the leader does: a backend with a free slot by the counts, if any.
            counts, _ = self.call(leader, lambda: leader.store.counts(list(BACKENDS)))
            free = [b for b, n in zip(BACKENDS, counts, strict=True) if n < BACKENDS[b]]
            backend = free[0] if free else backend
        self.grants += 1
        lease = f"g{self.grants}.{job_id}"

        def op() -> Awaitable[tuple[int, int]]:
            return leader.store.grant(job_id, backend, BACKENDS[backend], lease, TTL,
                                      owner.name)

        answer = self.call(leader, op)
        if owner.store.epoch == self._epoch():
            assert answer[0] != 0, f"{job_id} waits but the store did not know it"
        seen(f"grant answers {answer[0]}")
        if answer[0] == 1:
            del owner.waiting[job_id]
            owner.running[lease] = backend
        if dup:
            self.twice(leader, op, answer)

    @rule(data=st.data(), dup=st.booleans())
    def cancel(self, data: st.DataObject, dup: bool) -> None:
        r = self._pick(data)
        if r is None or not r.waiting or self.down or r.local is not None:
            return
        job_id = data.draw(st.sampled_from(sorted(r.waiting)))
        left = self.call(r, lambda: r.store.cancel(job_id))
        assert left.state == "left", f"{job_id} waited, yet cancel says {left}"
        del r.waiting[job_id]
        if dup:
            r.store.repeat = r.store.last_op
            try:
                self.twice(r, lambda: r.store.cancel(job_id), left)
            finally:
                r.store.repeat = None

    @rule(ms=st.integers(1, 2 * TTL))
    def time_passes(self, ms: int) -> None:
        self.advance(ms)

    # One pause at a time, and crashes leave two replicas running: the traffic
    # between faults goes on.
    @precondition(lambda self: not any(r.paused for r in self.replicas))
    @rule(data=st.data())
    def pause(self, data: st.DataObject) -> None:
        """A replica stops (a long GC, a stopped VM) past its lease; its requests go
        on at the backends, the others go on ticking."""
        r = self._pick(data)
        if r is None:
            return
        r.paused = True
        self.advance(TTL + 1)
        # Its leases lapsed: another request may take their slots.
        self.overdrawn.update(r.running)

    # Back from a pause into an outage, its view of the others is a lease old (the
    # gap of test_a_store_that_flaps_leaves_no_replica_alone_with_every_slot): it
    # resumes once the store is back.
    @precondition(lambda self: not self.down)
    @rule(data=st.data())
    def resume(self, data: st.DataObject) -> None:
        pool = [r for r in self.replicas if r.paused]
        if not pool:
            return
        r = data.draw(st.sampled_from(pool))
        r.paused = False
        self.settled = 0
        self._tick(r)

    @precondition(lambda self: sum(r.active for r in self.replicas) > 2)
    @rule(data=st.data(), restart=st.booleans())
    def crash(self, data: st.DataObject, restart: bool) -> None:
        """A replica dies: its connections close, so its requests stop at the backends;
        it releases nothing. Its queued jobs are dropped by the leader."""
        r = self._pick(data)
        if r is None:
            return
        r.crashed, r.crashed_at = True, self.clock()
        for lease in r.running:
            self.overdrawn.discard(lease)
        r.running.clear()
        self.orphans.extend(r.waiting)
        r.waiting = {}
        other = next((o for o in self.replicas if o.active and o.local is None), None)
        if other is not None and not self.down:
            self._drop_orphans(other)
        if restart and self._may_start():
            self._start()

    # Not the first to reach a store that lost its data: see
    # test_a_replica_that_starts_right_after_a_data_loss_waits_for_the_grace_period.
    @precondition(lambda self: len(self.replicas) < 8 and self._may_start())
    @rule()
    def start_replica(self) -> None:
        """One more replica joins (scaled out, or restarted after a crash)."""
        self._start()

    @rule(odds=st.integers(0, 7))
    def lose_data(self, odds: int) -> None:
        """The store restarts without its data (rarely: a grace period follows, and
        the traffic between faults matters as much)."""
        if odds:
            return
        # A restart takes time: two epochs are never created in one millisecond here.
        # (They would get one name — "<ms>-<creator>" — and the replicas would not see
        # that the data went a second time.)
        self.clock.advance(1)
        if self.client is None:
            fresh = SlotState()
            for f in dataclasses.fields(SlotState):
                setattr(self.state, f.name, getattr(fresh, f.name))
        else:
            client = self.client

            async def wipe() -> None:
                keys = [k async for k in client.scan_iter(match=self.prefix + "*")]
                if keys:
                    await client.delete(*keys)
            self.run(wipe())
        self.charged.clear()        # charges not yet taken in are lost with the data

    # Only once every replica lists every other: see
    # test_a_store_that_flaps_leaves_no_replica_alone_with_every_slot
    # Nor while a backend is over its cap after a pause: the holder's local limit is
    # what it holds, so when the lapsed request ends it starts another in its place
    # and the backend stays over its cap for the whole outage (a gap, reported).
    @precondition(lambda self: not self.down and self.settled >= 2
                  and not any(self.overdrawn & set(r.running) for r in self.replicas))
    @rule(odds=st.integers(0, 2))
    def outage(self, odds: int) -> None:
        """The store goes away: each replica carries on alone with what it holds and
        its part of the slots free (replica.py's _go_local)."""
        if odds:
            return
        # Every replica has the use the store reported last (its counts refresh): the
        # limits add up to the cap only when the replicas agree on it, see
        # test_outage_limits_from_views_of_different_age_exceed_the_cap.
        for r in self.replicas:
            if r.active:
                self._tick(r)          # a new epoch: what runs is recorded first
        for r in self.replicas:
            if r.active:
                counts, _ = self.call(r, lambda r=r: r.store.counts(  # type: ignore[misc]
                    list(BACKENDS)))
                r.seen_used = dict(zip(BACKENDS, counts, strict=True))
        self.down = True
        for r in self.replicas:
            if r.active:
                self._go_local(r)

    def _go_local(self, r: Replica) -> None:
        """replica.py's _go_local, when the replica finds the store away (a paused
        one, once it resumes)."""
        alone = sole(r.members, r.name, r.alone_since, self.clock(), TTL)
        limits = {}
        for b, cap in BACKENDS.items():
            held = sum(1 for x in r.running.values() if x == b)
            limits[b] = outage_limit(cap, held, max(r.seen_used.get(b, held), held), alone)
        r.local = limits

    @precondition(lambda self: self.down)
    @rule()
    def store_back(self) -> None:
        self.down = False
        self.settled = 0
        for r in self.replicas:
            if r.active:
                self._tick(r)
        other = next((o for o in self.replicas if o.active), None)
        if other is not None:
            self._drop_orphans(other)

    # -- invariants -----------------------------------------------------------------

    def _truth(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {b: [] for b in BACKENDS}
        for r in self.replicas:
            for lease, b in r.running.items():
                out[b].append(lease)
        return out

    @invariant()
    def i1_no_backend_over_its_slots(self) -> None:
        STEPS_RUN[self.url] = STEPS_RUN.get(self.url, 0) + 1
        for b, leases in self._truth().items():
            counted = [x for x in leases if x not in self.overdrawn]
            assert len(counted) <= BACKENDS[b], (
                f"{b} runs {sorted(counted)} (cap {BACKENDS[b]}; paused: "
                f"{sorted(set(leases) & self.overdrawn)})")
        if self.down:
            truth = self._truth()
            for b, cap in BACKENDS.items():
                # Slots held stay with their holders: a backend over its cap after a
                # pause (the exception above) stays over it by as much, no more.
                cap += sum(1 for x in truth[b] if x in self.overdrawn)
                limits = sum(r.local[b] for r in self.replicas
                             if r.local is not None and r.active)
                views = {r.name: (r.members, r.listed_ticks, r.seen_used, r.local,
                                  sorted(r.running.values()))
                         for r in self.replicas if r.local is not None and r.active}
                assert limits <= cap, (
                    f"local limits on {b} add up to {limits} > {cap}: {views}")

    @invariant()
    def i2_what_runs_holds_a_lease(self) -> None:
        if self.down:
            return
        now = self.clock()
        epoch = self._epoch()
        for r in self.replicas:
            if not r.active or r.local is not None or not r.running:
                continue
            if r.store.epoch != epoch:
                continue      # it records them again before it takes a slot (I1)
            held = sorted((b, lease) for lease, b in r.running.items())
            # Read-only: renewing with a zero-length lease would change the store,
            # so look at the leases as counts see them.
            live = self._live_leases()
            if live is None:
                continue
            missing = [h for h in held if h[1] not in live.get(h[0], set())]
            assert not missing, f"{r.name} runs {missing} without a lease at {now}"

    def _live_leases(self) -> dict[str, set[str]] | None:
        now = self.clock()
        if self.client is None:
            return {b: {k for k, exp in self.state.leases.get(b, {}).items() if exp > now}
                    for b in BACKENDS}
        client = self.client

        async def read() -> dict[str, set[str]]:
            out = {}
            for b in BACKENDS:
                raw = await client.zrangebyscore(f"{self.prefix}lease:{b}", f"({now}",
                                                 "+inf")
                out[b] = {x.decode() if isinstance(x, bytes) else str(x) for x in raw}
            return out
        return self.run(read())

    @invariant()
    def i3_capacity_comes_back(self) -> None:
        now = self.clock()
        if self.down or any(r.paused or r.local is not None for r in self.replicas):
            return
        if any(r.crashed and now - r.crashed_at < TTL for r in self.replicas):
            return
        epoch = self._epoch()
        if any(r.active and r.store.epoch != epoch for r in self.replicas):
            return
        r = next((x for x in self.replicas if x.active), None)
        if r is None:
            return
        counts, _ = self.call(r, lambda: r.store.counts(list(BACKENDS)))
        truth = self._truth()
        seen("I3 checked")
        assert counts == [len(truth[b]) for b in BACKENDS], (
            f"the store counts {counts}, yet {truth} run")

    @invariant()
    def i5_charges_are_made_once(self) -> None:
        if self.down:
            return
        r = next((x for x in self.replicas if x.active), None)
        if r is None:
            return
        taken = self.call(r, lambda: r.store.charges())
        r.store.repeat = r.store.last_op
        try:
            assert self.call(r, lambda: r.store.charges()) == taken
        finally:
            r.store.repeat = None
        assert taken == self.charged, f"charges taken {taken}, made {self.charged}"
        self.charged = {}

    def teardown(self) -> None:
        try:
            if self.client is not None:
                client = self.client

                async def close() -> None:
                    keys = [k async for k in client.scan_iter(match=self.prefix + "*")]
                    if keys:
                        await client.delete(*keys)
                    await client.aclose()
                self.run(close())
        finally:
            self.loop.close()


def machine(url: str) -> type[SlotProtocol]:
    return type("SlotProtocolOn", (SlotProtocol,), {"url": url})


MODEL_SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                          print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.filter_too_much])


def _run(url: str) -> None:
    STEPS_RUN[url] = 0
    SEEN.clear()
    run_state_machine_as_test(machine(url), settings=MODEL_SETTINGS)
    print(f"{STEPS_RUN[url]} steps checked; {dict(sorted(SEEN.items()))}")
    # Short examples are part of the search; the total must still reach the count.
    assert STEPS_RUN[url] >= MIN_STEPS, f"only {STEPS_RUN[url]} steps ran"


# Thousands of steps: more than the suite's 120 s per test on a busy machine.
@pytest.mark.timeout(600)
def test_the_protocol_keeps_its_invariants_in_memory() -> None:
    _run("memory")


@pytest.mark.redis
@pytest.mark.timeout(600)
def test_the_protocol_keeps_its_invariants_in_redis(redis_url: str) -> None:
    _run(redis_url)


# -- cases the model found ------------------------------------------------------------


def _store(backend: str, clock: FakeClock) -> MemorySlotStore | RedisSlotStore:
    if backend == "memory":
        return MemorySlotStore(clock, grace_ms=GRACE)
    return RedisSlotStore.from_url(backend, prefix=f"r{uuid.uuid4().hex[:8]}:", clock=clock,
                                   grace_ms=GRACE)


async def _join(store: MemorySlotStore | RedisSlotStore, replica: str) -> None:
    """A replica's first tick: heartbeat, then record what runs under the epoch."""
    epoch = await store.heartbeat(replica, b"{}", TTL)
    await store.adopt([], TTL, epoch=epoch.name)


async def _wipe(store: MemorySlotStore | RedisSlotStore) -> None:
    if isinstance(store, MemorySlotStore):
        fresh = SlotState()
        for f in dataclasses.fields(SlotState):
            setattr(store.state, f.name, getattr(fresh, f.name))
    else:
        keys = [k async for k in store.client.scan_iter(match=store.channel("*"))]
        if keys:
            await store.client.delete(*keys)


async def test_a_replica_that_starts_right_after_a_data_loss_waits_for_the_grace_period(
        backend: str, clock: FakeClock) -> None:
    old = _store(backend, clock)
    await _join(old, "old")
    clock.advance(GRACE)                    # the first epoch's grace period is over
    assert (await old.acquire([("a", 1)], "old.1.1", TTL, "old.1", None)).index == 0
    await _wipe(old)                        # the store restarts without its data
    # A replica that starts now is the first to reach the store: it creates the new
    # epoch, knowing none — and a grace period opens all the same ...
    new = _store(backend, clock)
    await _join(new, "new")
    # ... so the slot that old.1.1 uses at the backend is not given away before the
    # old replica (which ticks within a renewal interval) records it again.
    taken = await new.acquire([("a", 1)], "new.1.1", TTL, "new.1", None)
    try:
        assert taken.index is None, "a slot was given while a request ran unrecorded"
    finally:
        await old.close()
        await new.close()


# -- I4: the queue's order survives a leader change ---------------------------------

_waiting_jobs = st.lists(
    st.tuples(st.sampled_from(["r0", "r1", "r2"]), st.booleans(),
              st.sampled_from(list(Priority)), st.sampled_from(["alice", "bob", ""])),
    min_size=1, max_size=12)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(jobs=_waiting_jobs, data=st.data())
def test_a_new_leader_rebuilds_the_queue_in_arrival_order(
        backend: str, jobs: list[tuple[str, bool, Priority, str]],
        data: st.DataObject) -> None:
    """Jobs queued through several replicas, in an order of their own: a new leader
    reads them back (in the store's order, which is none) and rebuilds the queue with
    those sent to the front first, then by arrival; every job comes back as it was."""
    clock = FakeClock()
    arrivals = sorted(data.draw(st.lists(st.integers(0, 10**6), min_size=len(jobs),
                                         max_size=len(jobs), unique=True)))
    queued = [(f"{replica}.{i}", Job(model="m", client=client, priority=priority),
               replica, front, at)
              for i, ((replica, front, priority, client), at)
              in enumerate(zip(jobs, arrivals, strict=True))]
    order = data.draw(st.permutations(range(len(queued))))   # the order they reach it

    async def scenario() -> None:
        store = _store(backend, clock)
        try:
            await _join(store, "r0")
            await store.acquire([("a", 1)], "busy", TTL, "busy", None)   # full: all wait
            for i in order:
                job_id, job, replica, front, at = queued[i]
                taken = await store.acquire([("a", 1)], f"{job_id}.1", TTL, job_id,
                                            describe(job, replica, front, at))
                assert taken.index is None
            waiting = await store.waiting()
            rebuilt = [job_id for job_id, _ in
                       sorted(waiting.items(), key=lambda kv: arrival(kv[1]))]
            expected = [q[0] for q in sorted(queued, key=lambda q: (not q[3], q[4]))]
            assert rebuilt == expected
            for job_id, job, replica, front, _ in queued:
                again, who, at_front = rebuild(waiting[job_id])
                assert (again.client, again.priority, who, at_front) == (
                    job.client, job.priority, replica, front)
        finally:
            await store.close()

    asyncio.run(scenario())


# -- outage limits from views that disagree (replica.py's side of I1) -------------------

def test_outage_limits_from_views_of_different_age_stay_within_the_cap() -> None:
    # r0 has just taken a slot of "a" (cap 2): the store's answer told it the use is 1.
    # r1 and r2 last refreshed the counts before that: 0. The store goes away now.
    # Each keeps what it holds and takes no free slot: views of any age add up.
    limits = [outage_limit(2, 1, 1, False), outage_limit(2, 0, 0, False),
              outage_limit(2, 0, 0, False)]
    assert sum(limits) <= 2, f"local limits {limits} on a backend of 2 slots"


def test_a_store_that_flaps_leaves_no_replica_alone_with_every_slot() -> None:
    # The store comes back after more than a lease: every replica key lapsed. r1 ticks
    # first and is listed alone; r2 ticks next and lists both. The store goes away
    # again before r1's next tick: r1 has not been alone for a lease, so it is not.
    now = 100_000
    assert not sole(["r1"], "r1", now, now, TTL)
    assert not sole(["r1", "r2"], "r2", None, now, TTL)
    limits = [outage_limit(2, 0, 0, sole(["r1"], "r1", now, now, TTL)),
              outage_limit(2, 0, 0, sole(["r1", "r2"], "r2", None, now, TTL))]
    assert sum(limits) <= 2, f"local limits {limits} on a backend of 2 slots"
    # Listed alone for a whole lease: nobody else is alive, all the slots are its.
    assert sole(["r1"], "r1", now - TTL, now, TTL)


def test_a_backend_over_its_cap_after_a_pause_gets_back_under_it_in_an_outage() -> None:
    # r1 was paused past its lease; its request was recorded again beside r2's: 3 on
    # a cap of 2. The store goes away: the excess is taken off what each holds, so
    # no request ending starts another until the backend is under its cap.
    limits = [outage_limit(2, 1, 3, False), outage_limit(2, 2, 3, False)]
    assert sum(limits) <= 2, limits


async def test_data_lost_twice_in_one_millisecond_is_seen_twice(
        backend: str, clock: FakeClock) -> None:
    store = _store(backend, clock)
    try:
        await _wipe(store)
        await _join(store, "r1")            # the replica's heartbeat creates the epoch
        await _wipe(store)                  # lost again, within the same millisecond
        # The epoch its next heartbeat creates has the name it knows: it is not told
        # to record what runs, and the slots its requests use are free in the store.
        epoch = await store.heartbeat("r1", b"{}", TTL)
        assert epoch.name != store.epoch, "the replica did not see the data go"
    finally:
        await store.close()
