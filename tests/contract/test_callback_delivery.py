"""The callback delivery protocol under faults, against the memory and the Redis store.

A hypothesis state machine plays several replicas that claim, refresh, POST and
report callback attempts as ``CallbackSender`` does, on the fake clock, while it
injects faults: a replica crashes mid-attempt (it forgets everything and comes back
under a new name), a replica is paused past its lease (the clock jumps while it
holds an attempt, and it carries on afterwards as if nothing happened), an answer
from the store is lost (a claim the replica never hears of), and a report is
delivered twice. After every step it checks the invariants written at the top of
``corral/jobs/delivery.py``; at the end, faults stop and one replica keeps going:
every callback must then end ``delivered`` or ``failed`` (progress).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from corral.jobs.memory import MemoryJobStore
from corral.jobs.redis import RedisJobStore
from corral.jobs.store import (
    Bounds,
    CallbackState,
    Ending,
    JobRecord,
    JobStatus,
    JobStore,
    NewJob,
    Outcome,
)
from tests.contract.limit_store_support import FakeClock

LEASE = 10_000
TRIES = 2                   # few, so that callbacks run out of attempts often
TTL = 10**9                 # jobs outlive every example: expiry has its own test
JOBS = 2
WIDE = Bounds(max_queued=100, max_queued_per_client=100)
T = TypeVar("T")

# A third of a lease (a refresh's period), a whole lease or just short of it (a pause
# past it, or not quite), and the longest backoff.
gaps = st.sampled_from([LEASE // 3, LEASE - 1, LEASE, 30_000])


@dataclass
class Hand:
    """An attempt a replica believes it is making."""

    job_id: str
    attempt: int
    delivery_id: str
    accepted: bool | None = None        # what the receiver answered, once POSTed


@dataclass
class Replica:
    name: str
    # By (job, attempt): a replica may still be at an old attempt of a callback it
    # has claimed again since.
    hands: dict[tuple[str, int], Hand] = field(default_factory=dict)


@dataclass
class Lease:
    holder: str
    attempt: int
    until: int


class CallbackDelivery(RuleBasedStateMachine):
    backend = "memory"      # set per test: "memory" or a Redis URL

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.store: JobStore
        if self.backend == "memory":
            self.store = MemoryJobStore(clock=self.clock)
        else:
            self.store = RedisJobStore.from_url(
                self.backend, prefix=f"test:{uuid.uuid4().hex}:jobs:", clock=self.clock)
        self.replicas = [Replica(f"r{n}") for n in range(2)]
        self.delivery_ids: dict[str, str] = {}      # job → the id chosen at submission
        self.posts: dict[str, list[tuple[str, bool]]] = {}  # job → (delivery id, 2xx)
        self.leases: dict[str, Lease] = {}          # the attempt each job is leased to
        self.seen: dict[str, CallbackState] = {}    # the last state read, per job

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    # -- jobs finish ------------------------------------------------------------------

    @initialize()
    def jobs_finish(self) -> None:
        for _ in range(JOBS):
            self._finish_a_job()

    def _finish_a_job(self) -> None:
        job_id = uuid.uuid4().hex
        self.delivery_ids[job_id] = "d" + job_id[1:]
        self.posts[job_id] = []
        self.run(self.store.submit(NewJob(
            id=job_id, owner="alice", priority=1, endpoint="/api/generate",
            model="llama3.2", body=b"{}", callback_url="http://cb/x",
            delivery_id=self.delivery_ids[job_id]), WIDE))
        record = self.run(self.store.claim("worker", LEASE))
        assert record is not None and record.id == job_id
        done = self.run(self.store.finish(job_id, "worker",
                                          Ending(JobStatus.SUCCEEDED, b"{}"), TTL))
        assert done is not None and done.callback is not None

    # -- replicas at work -------------------------------------------------------------

    def _claimed(self, record: JobRecord | None) -> tuple[str, CallbackState] | None:
        if record is None:
            return None
        state = record.callback
        assert state is not None
        lease = self.leases.get(record.id)
        # 1. One holder: nobody else's lease on this callback was live.
        assert lease is None or lease.until <= self.clock.now_ms, (lease, state)
        # 3. Bounded, counted once per claim.
        assert state.attempts == self.seen[record.id].attempts + 1 <= TRIES
        # 2. One delivery id.
        assert state.delivery_id == self.delivery_ids[record.id]
        assert state.due_ms is not None
        self.leases[record.id] = Lease(state.holder or "", state.attempts, state.due_ms)
        return record.id, state

    @rule(r=st.integers(0, 1), answer_lost=st.booleans())
    def claim(self, r: int, answer_lost: bool) -> None:
        replica = self.replicas[r]
        got = self._claimed(self.run(self.store.claim_callback(replica.name, LEASE, TRIES)))
        if got is not None and not answer_lost:
            # (Lost: the store granted it, the replica never heard; the lease lapses.)
            job_id, state = got
            assert state.holder == replica.name
            replica.hands[(job_id, state.attempts)] = Hand(job_id, state.attempts,
                                                           state.delivery_id)

    def _hands(self, posted: bool | None = None) -> list[tuple[Replica, Hand]]:
        return [(replica, hand) for replica in self.replicas
                for _, hand in sorted(replica.hands.items())
                if posted is None or (hand.accepted is not None) == posted]

    @precondition(lambda self: self._hands())
    @rule(data=st.data())
    def refresh(self, data: st.DataObject) -> None:
        replica, hand = data.draw(st.sampled_from(self._hands()))
        job_id = hand.job_id
        held = self.run(self.store.refresh_callback(job_id, replica.name, hand.attempt,
                                                    LEASE))
        lease = self.leases.get(job_id)
        current = lease is not None and (lease.holder, lease.attempt) == (
            replica.name, hand.attempt)
        assert held == (current and not self.seen[job_id].final)
        if held:
            assert lease is not None
            lease.until = self.clock.now_ms + LEASE
        else:
            # Not ours any more: the attempt is abandoned.
            del replica.hands[(job_id, hand.attempt)]

    @precondition(lambda self: self._hands(posted=False))
    @rule(data=st.data(), accepted=st.booleans())
    def post(self, data: st.DataObject, accepted: bool) -> None:
        _, hand = data.draw(st.sampled_from(self._hands(posted=False)))
        # What the receiver sees: the delivery id this attempt carries.
        self.posts[hand.job_id].append((hand.delivery_id, accepted))
        hand.accepted = accepted

    @precondition(lambda self: self._hands(posted=True))
    @rule(data=st.data(), twice=st.booleans())
    def report(self, data: st.DataObject, twice: bool) -> None:
        replica, hand = data.draw(st.sampled_from(self._hands(posted=True)))
        job_id = hand.job_id
        before = self.seen[job_id]
        outcome = Outcome(bool(hand.accepted), None if hand.accepted else "refused")
        after = self.run(self.store.report_callback(job_id, replica.name, hand.attempt,
                                                    outcome, TRIES))
        assert after is not None
        if twice:
            # 4. The same report again has no second effect.
            again = self.run(self.store.report_callback(job_id, replica.name,
                                                        hand.attempt, outcome, TRIES))
            assert again == after
        if hand.accepted and not before.final:
            assert after.status == "delivered"      # 5. a 2xx counts, whoever got it
        lease = self.leases.get(job_id)
        if lease is not None and (lease.holder, lease.attempt) == (replica.name,
                                                                   hand.attempt):
            del self.leases[job_id]
        del replica.hands[(job_id, hand.attempt)]

    # -- faults -----------------------------------------------------------------------

    @rule(r=st.integers(0, 1))
    def crash(self, r: int) -> None:
        # Killed mid-attempt: nothing reported, nothing handed back; restarted under a
        # new name, as a new process is.
        self.replicas[r] = Replica(f"r{r}-{uuid.uuid4().hex[:6]}")

    @rule(ms=gaps)
    def time_passes(self, ms: int) -> None:
        # Replicas keep their hands: one that held an attempt across a jump of a lease
        # or more was paused past it, and carries on as if nothing happened.
        self.clock.advance(ms)

    # -- invariants -------------------------------------------------------------------

    def _read(self) -> dict[str, CallbackState]:
        states = {}
        for job_id in self.delivery_ids:
            record = self.run(self.store.get(job_id))
            assert record is not None and record.callback is not None
            states[job_id] = record.callback
        return states

    @invariant()
    def callbacks_keep_their_promises(self) -> None:
        for job_id, state in self._read().items():
            before = self.seen.get(job_id)
            assert state.delivery_id == self.delivery_ids[job_id]          # 2
            if before is not None:
                assert state.attempts >= before.attempts                   # 3
                if before.final:
                    assert state == before                                 # 4
            assert state.attempts <= TRIES                                 # 3
            if state.status == "delivered":
                assert any(ok for _, ok in self.posts[job_id])             # 5
            if not state.final:
                assert state.due_ms is not None                            # 6
            # 2, as the receiver saw it: one delivery id for every POST of the job.
            assert {d for d, _ in self.posts[job_id]} <= {self.delivery_ids[job_id]}
            self.seen[job_id] = state

    def teardown(self) -> None:
        try:
            self._faults_stop_and_one_replica_keeps_going()
        finally:
            self.run(self.store.close())
            self.loop.close()

    def _faults_stop_and_one_replica_keeps_going(self) -> None:
        # 6. Progress: each round waits out any lease and backoff, then takes and
        # delivers (or fails) everything due; TRIES + 1 rounds are enough for all.
        survivor = "survivor"
        for _ in range(TRIES + 1):
            self.clock.advance(LEASE + 30_000)
            while (record := self.run(self.store.claim_callback(survivor, LEASE,
                                                                TRIES))) is not None:
                assert record.callback is not None
                self.posts[record.id].append((record.callback.delivery_id, True))
                self.run(self.store.report_callback(record.id, survivor,
                                                    record.callback.attempts,
                                                    Outcome(True), TRIES))
        for job_id, state in self._read().items():
            assert state.final, (job_id, state)
            if state.status == "failed":
                assert state.attempts == TRIES, state
            assert {d for d, _ in self.posts[job_id]} <= {self.delivery_ids[job_id]}


def test_callback_delivery_keeps_its_invariants_under_faults(backend: str) -> None:
    machine = type("Machine", (CallbackDelivery,), {"backend": backend})
    examples = 300 if backend == "memory" else 60
    run_state_machine_as_test(machine, settings=settings(
        max_examples=examples, stateful_step_count=60, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))
