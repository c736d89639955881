"""The JobStore contract: the same tests against the memory and the Redis store.

Both stores run on the fake clock of ``tests/contract/conftest.py`` (the Redis store
sends it to its script instead of reading ``TIME``), so leases, retries and expiry
are tested without sleeping.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator

import pytest

from corral.jobs.memory import MemoryJobStore
from corral.jobs.redis import RedisJobStore
from corral.jobs.store import (
    Bounds,
    CallbackState,
    Ending,
    JobStatus,
    JobStore,
    NewJob,
    Outcome,
    QueueFull,
    Retry,
)
from tests.contract.limit_store_support import FakeClock
from tests.waiting import eventually

LEASE = 10_000
TTL = 60_000
WIDE = Bounds(max_queued=1000, max_queued_per_client=1000)
HIGH, NORMAL, LOW = 0, 1, 2


@pytest.fixture
async def jobs(backend: str, clock: FakeClock) -> AsyncIterator[JobStore]:
    store: JobStore
    if backend == "memory":
        store = MemoryJobStore(clock=clock)
    else:
        # A fresh prefix per test keeps tests apart on the one server.
        store = RedisJobStore.from_url(backend, prefix=f"test:{uuid.uuid4().hex}:jobs:",
                                       clock=clock)
    try:
        yield store
    finally:
        await store.close()


def new(name: str, owner: str = "alice", priority: int = NORMAL,
        callback: str | None = None) -> NewJob:
    # Ids are the job's name padded, so failures read well.
    return NewJob(id=name.ljust(32, "0"), owner=owner, priority=priority,
                  endpoint="/api/generate", model="llama3.2",
                  body=b'{"model":"llama3.2","prompt":"' + name.encode() + b'","stream":false}',
                  credentials=(("Authorization", "Bearer sk-" + owner),),
                  client_ip="10.0.0.7", callback_url=callback)


def jid(name: str) -> str:
    return name.ljust(32, "0")


async def claimed(store: JobStore, worker: str = "w1") -> str | None:
    record = await store.claim(worker, LEASE)
    return None if record is None else record.id.rstrip("0")


# --- submit and read ------------------------------------------------------------------


async def test_submit_stores_everything_the_worker_needs(jobs: JobStore,
                                                         clock: FakeClock) -> None:
    record = await jobs.submit(new("a", callback="http://cb/x"), WIDE)
    assert record.status is JobStatus.QUEUED
    assert record.created_ms == clock.now_ms
    assert (record.attempts, record.failures, record.started_ms, record.finished_ms) == (
        0, 0, None, None)
    got = await jobs.get(jid("a"))
    assert got is not None
    assert got == record
    assert got.owner == "alice" and got.priority == NORMAL and got.client_ip == "10.0.0.7"
    assert got.body is not None and b'"prompt":"a"' in got.body
    assert got.credentials == (("Authorization", "Bearer sk-alice"),)
    assert got.callback_url == "http://cb/x"
    assert await jobs.get(jid("unknown")) is None


# --- order ----------------------------------------------------------------------------


async def test_claim_by_class_then_first_come_first_served(jobs: JobStore) -> None:
    for name, priority in (("low1", LOW), ("norm1", NORMAL), ("high1", HIGH),
                           ("norm2", NORMAL), ("low2", LOW), ("high2", HIGH)):
        await jobs.submit(new(name, priority=priority), WIDE)
    order = [await claimed(jobs) for _ in range(7)]
    assert order == ["high1", "high2", "norm1", "norm2", "low1", "low2", None]


async def test_claim_marks_running_and_counts_the_attempt(jobs: JobStore,
                                                          clock: FakeClock) -> None:
    await jobs.submit(new("a"), WIDE)
    clock.advance(5)
    record = await jobs.claim("w1", LEASE)
    assert record is not None
    assert record.status is JobStatus.RUNNING
    assert (record.worker, record.attempts, record.started_ms) == ("w1", 1, clock.now_ms)
    assert record.credentials == (("Authorization", "Bearer sk-alice"),)
    assert await jobs.claim("w2", LEASE) is None        # a job is taken once
    assert await jobs.counts() == {"queued": 0, "running": 1}


# --- leases ---------------------------------------------------------------------------


async def test_a_lapsed_lease_returns_the_job_to_the_queue(jobs: JobStore,
                                                           clock: FakeClock) -> None:
    await jobs.submit(new("a"), WIDE)
    await jobs.submit(new("b"), WIDE)
    assert await claimed(jobs, "dead") == "a"
    clock.advance(LEASE - 1)
    assert await jobs.reap(3, TTL) == []
    got = await jobs.get(jid("a"))
    assert got is not None and got.status is JobStatus.RUNNING
    clock.advance(1)
    assert await jobs.reap(3, TTL) == []             # back in the queue, not failed
    got = await jobs.get(jid("a"))
    assert got is not None
    assert got.status is JobStatus.QUEUED and got.failures == 1 and got.worker is None
    assert got.error is not None and "lease" in got.error
    # It keeps its place: ahead of b, which came after it.
    record = await jobs.claim("alive", LEASE)
    assert record is not None and record.id == jid("a") and record.attempts == 2
    # The worker that lost it can neither keep it nor record an outcome.
    assert not await jobs.refresh(jid("a"), "dead", LEASE)
    assert await jobs.finish(jid("a"), "dead", Ending(JobStatus.SUCCEEDED, b"{}"), TTL) is None
    assert not await jobs.requeue(jid("a"), "dead", Retry())
    assert await jobs.refresh(jid("a"), "alive", LEASE)


async def test_refresh_keeps_the_lease(jobs: JobStore, clock: FakeClock) -> None:
    await jobs.submit(new("a"), WIDE)
    await jobs.claim("w1", LEASE)
    for _ in range(5):
        clock.advance(LEASE - 1000)
        assert await jobs.refresh(jid("a"), "w1", LEASE)
        assert await jobs.reap(3, TTL) == []
    clock.advance(LEASE)
    await jobs.reap(3, TTL)
    got = await jobs.get(jid("a"))
    assert got is not None and got.status is JobStatus.QUEUED


async def test_lapsed_leases_fail_the_job_after_max_attempts(jobs: JobStore,
                                                             clock: FakeClock) -> None:
    await jobs.submit(new("a"), WIDE)
    for attempt in (1, 2):
        assert await claimed(jobs) == "a"
        clock.advance(LEASE)
        assert await jobs.reap(3, TTL) == [], attempt
    assert await claimed(jobs) == "a"
    clock.advance(LEASE)
    failed = await jobs.reap(3, TTL)
    assert [r.id for r in failed] == [jid("a")]
    assert failed[0].status is JobStatus.FAILED and failed[0].failures == 3
    assert failed[0].finished_ms == clock.now_ms
    assert await jobs.claim("w1", LEASE) is None
    assert await jobs.counts() == {"queued": 0, "running": 0}


# --- retries --------------------------------------------------------------------------


async def test_requeue_with_delay_waits_then_keeps_its_place(jobs: JobStore,
                                                             clock: FakeClock) -> None:
    await jobs.submit(new("a"), WIDE)
    assert await claimed(jobs) == "a"
    await jobs.submit(new("b"), WIDE)
    busy = Retry(delay_ms=2000, failed=False, error="limited", http_status=429)
    assert await jobs.requeue(jid("a"), "w1", busy)
    got = await jobs.get(jid("a"))
    assert got is not None
    assert got.status is JobStatus.QUEUED and got.not_before_ms == clock.now_ms + 2000
    assert (got.failures, got.error, got.http_status) == (0, "limited", 429)
    assert await claimed(jobs) == "b"                # a is not due yet
    await jobs.submit(new("c"), WIDE)
    clock.advance(2000)
    assert await claimed(jobs) == "a"                # due: ahead of c, which came later
    assert await claimed(jobs) == "c"


async def test_requeue_counts_failures_only_when_told(jobs: JobStore) -> None:
    await jobs.submit(new("a"), WIDE)
    await jobs.claim("w1", LEASE)
    await jobs.requeue(jid("a"), "w1", Retry(failed=True, error="boom", http_status=500))
    record = await jobs.claim("w1", LEASE)
    assert record is not None and (record.failures, record.attempts) == (1, 2)
    await jobs.requeue(jid("a"), "w1", Retry(failed=False))
    record = await jobs.claim("w1", LEASE)
    assert record is not None and (record.failures, record.attempts) == (1, 3)


# --- finishing, expiry ----------------------------------------------------------------


async def test_finish_keeps_the_result_for_ttl_then_forgets(jobs: JobStore,
                                                            clock: FakeClock) -> None:
    await jobs.submit(new("a"), WIDE)
    await jobs.claim("w1", LEASE)
    clock.advance(100)
    done = await jobs.finish(jid("a"), "w1",
                             Ending(JobStatus.SUCCEEDED, b'{"response":"hi"}', None, 200), TTL)
    assert done is not None
    assert done.status is JobStatus.SUCCEEDED and done.finished_ms == clock.now_ms
    assert done.result == b'{"response":"hi"}' and done.http_status == 200
    # The request and the credential are not kept once the job is over.
    assert done.body is None and done.credentials == () and done.worker is None
    assert await jobs.get(jid("a")) == done
    assert not await jobs.refresh(jid("a"), "w1", LEASE)
    assert await jobs.counts() == {"queued": 0, "running": 0}
    clock.advance(TTL - 1)
    assert await jobs.get(jid("a")) is not None
    if isinstance(jobs, RedisJobStore):
        # Redis expires keys by its own clock, not the fake one: wait for it.
        await _expire_in_redis(jobs, jid("a"))
    clock.advance(1)
    assert await jobs.get(jid("a")) is None
    assert await jobs.list("alice", None, 10) == []


async def _expire_in_redis(store: RedisJobStore, job_id: str) -> None:
    # The TTL was set in real milliseconds: shorten it rather than sleep a minute.
    client = store._client
    await client.pexpire(f"{store._prefix}job:{job_id}", 1)

    async def expired() -> bool:
        return not await client.exists(f"{store._prefix}job:{job_id}")

    await eventually(expired, f"Redis to expire job {job_id}", every=0.01)


async def test_failed_job_keeps_its_error(jobs: JobStore) -> None:
    await jobs.submit(new("a"), WIDE)
    await jobs.claim("w1", LEASE)
    done = await jobs.finish(jid("a"), "w1",
                             Ending(JobStatus.FAILED, None, "model 'x' not found", 404), TTL)
    assert done is not None
    assert (done.status, done.error, done.http_status, done.result) == (
        JobStatus.FAILED, "model 'x' not found", 404, None)


# --- cancel ---------------------------------------------------------------------------


async def test_cancel_a_queued_job(jobs: JobStore, clock: FakeClock) -> None:
    await jobs.submit(new("a"), WIDE)
    await jobs.submit(new("b"), WIDE)
    outcome = await jobs.cancel(jid("a"), TTL)
    assert outcome is not None
    before, after = outcome
    assert before is JobStatus.QUEUED
    assert after.status is JobStatus.CANCELLED and after.finished_ms == clock.now_ms
    assert after.body is None and after.credentials == ()
    assert await claimed(jobs) == "b"
    assert await jobs.claim("w1", LEASE) is None
    # Cancelling again changes nothing and says what it was.
    again = await jobs.cancel(jid("a"), TTL)
    assert again is not None and again[0] is JobStatus.CANCELLED
    assert await jobs.cancel(jid("nope"), TTL) is None


async def test_cancel_a_delayed_job(jobs: JobStore, clock: FakeClock) -> None:
    await jobs.submit(new("a"), WIDE)
    await jobs.claim("w1", LEASE)
    await jobs.requeue(jid("a"), "w1", Retry(delay_ms=1000))
    outcome = await jobs.cancel(jid("a"), TTL)
    assert outcome is not None and outcome[0] is JobStatus.QUEUED
    clock.advance(2000)
    assert await jobs.claim("w1", LEASE) is None
    assert await jobs.counts() == {"queued": 0, "running": 0}


async def test_cancel_a_running_job_takes_it_from_its_worker(jobs: JobStore) -> None:
    await jobs.submit(new("a"), WIDE)
    await jobs.claim("w1", LEASE)
    outcome = await jobs.cancel(jid("a"), TTL)
    assert outcome is not None and outcome[0] is JobStatus.RUNNING
    assert outcome[1].status is JobStatus.CANCELLED
    assert not await jobs.refresh(jid("a"), "w1", LEASE)
    assert await jobs.finish(jid("a"), "w1", Ending(JobStatus.SUCCEEDED, b"{}"), TTL) is None
    got = await jobs.get(jid("a"))
    assert got is not None and got.status is JobStatus.CANCELLED and got.result is None


async def test_cancel_a_finished_job_changes_nothing(jobs: JobStore) -> None:
    await jobs.submit(new("a"), WIDE)
    await jobs.claim("w1", LEASE)
    await jobs.finish(jid("a"), "w1", Ending(JobStatus.SUCCEEDED, b"{}"), TTL)
    outcome = await jobs.cancel(jid("a"), TTL)
    assert outcome is not None
    assert outcome[0] is JobStatus.SUCCEEDED and outcome[1].status is JobStatus.SUCCEEDED


# --- ownership and listing ------------------------------------------------------------


async def test_list_shows_an_owner_only_its_own_jobs(jobs: JobStore, clock: FakeClock) -> None:
    for name, owner in (("a1", "alice"), ("b1", "bob"), ("a2", "alice"), ("a3", "alice")):
        await jobs.submit(new(name, owner=owner), WIDE)
        clock.advance(10)
    await jobs.claim("w1", LEASE)
    await jobs.finish(jid("a1"), "w1", Ending(JobStatus.SUCCEEDED, b'{"big":1}'), TTL)
    mine = await jobs.list("alice", None, 10)
    assert [r.id for r in mine] == [jid("a3"), jid("a2"), jid("a1")]     # newest first
    # A listing never carries results, bodies or credentials.
    assert all(r.result is None and r.body is None and r.credentials == () for r in mine)
    assert mine[2].status is JobStatus.SUCCEEDED
    assert [r.id for r in await jobs.list("bob", None, 10)] == [jid("b1")]
    assert await jobs.list("carol", None, 10) == []
    assert [r.id for r in await jobs.list("alice", JobStatus.QUEUED, 10)] == [
        jid("a3"), jid("a2")]
    assert [r.id for r in await jobs.list("alice", None, 1)] == [jid("a3")]
    everyone = await jobs.list(None, None, 10)
    assert [r.id for r in everyone] == [jid("a3"), jid("a2"), jid("b1"), jid("a1")]


# --- bounds ---------------------------------------------------------------------------


async def test_bounds_in_all_and_per_client(jobs: JobStore) -> None:
    bounds = Bounds(max_queued=3, max_queued_per_client=2)
    await jobs.submit(new("a1"), bounds)
    await jobs.submit(new("a2"), bounds)
    with pytest.raises(QueueFull, match="client"):
        await jobs.submit(new("a3"), bounds)
    await jobs.submit(new("b1", owner="bob"), bounds)
    with pytest.raises(QueueFull, match="queue"):
        await jobs.submit(new("b2", owner="bob"), bounds)
    assert await jobs.get(jid("a3")) is None
    # A finished job leaves room; a running one does not.
    await jobs.claim("w1", LEASE)
    with pytest.raises(QueueFull):
        await jobs.submit(new("c1", owner="carol"), bounds)
    await jobs.finish(jid("a1"), "w1", Ending(JobStatus.SUCCEEDED, b"{}"), TTL)
    await jobs.cancel(jid("a2"), TTL)
    await jobs.submit(new("a4"), bounds)
    await jobs.submit(new("c1", owner="carol"), bounds)
    assert await jobs.counts() == {"queued": 3, "running": 0}


# --- callbacks ------------------------------------------------------------------------

TRIES = 3
HOOK = "http://cb/x"


def with_callback(name: str) -> NewJob:
    return dataclasses.replace(new(name, callback=HOOK), delivery_id="d-" + name)


async def finished_with_callback(jobs: JobStore, name: str) -> None:
    await jobs.submit(with_callback(name), WIDE)
    record = await jobs.claim("w1", LEASE)
    assert record is not None and record.id == jid(name)
    await jobs.finish(jid(name), "w1", Ending(JobStatus.SUCCEEDED, b'{"response":"hi"}'),
                      TTL)


async def test_finishing_a_job_makes_its_callback_deliverable(jobs: JobStore,
                                                              clock: FakeClock) -> None:
    await jobs.submit(with_callback("a"), WIDE)
    await jobs.submit(new("plain"), WIDE)
    assert await jobs.claim_callback("r1", LEASE, TRIES) is None    # nothing finished yet
    await jobs.claim("w1", LEASE)
    done = await jobs.finish(jid("a"), "w1", Ending(JobStatus.SUCCEEDED, b"{}"), TTL)
    assert done is not None and done.callback is not None
    assert (done.callback.status, done.callback.attempts, done.callback.delivery_id) == (
        "pending", 0, "d-a")
    await jobs.claim("w1", LEASE)
    await jobs.finish(jid("plain"), "w1", Ending(JobStatus.SUCCEEDED, b"{}"), TTL)
    got = await jobs.claim_callback("r1", LEASE, TRIES)
    # The whole job, to send; the attempt leased to its holder.
    assert got is not None and got.id == jid("a") and got.result == b"{}"
    assert got.callback == CallbackState("pending", 1, None, "d-a", "r1",
                                         clock.now_ms + LEASE)
    # One holder at a time; a job without callback_url has no callback.
    assert await jobs.claim_callback("r2", LEASE, TRIES) is None
    plain = await jobs.get(jid("plain"))
    assert plain is not None and plain.callback is None


async def test_delivery_id_defaults_to_the_job_id(jobs: JobStore) -> None:
    await jobs.submit(new("a", callback=HOOK), WIDE)
    await jobs.claim("w1", LEASE)
    await jobs.finish(jid("a"), "w1", Ending(JobStatus.SUCCEEDED, b"{}"), TTL)
    got = await jobs.claim_callback("r1", LEASE, TRIES)
    assert got is not None and got.callback is not None
    assert got.callback.delivery_id == jid("a")


async def test_a_delivered_callback_is_final(jobs: JobStore) -> None:
    await finished_with_callback(jobs, "a")
    await jobs.claim_callback("r1", LEASE, TRIES)
    after = await jobs.report_callback(jid("a"), "r1", 1, Outcome(True), TRIES)
    assert after is not None and (after.status, after.attempts, after.holder) == (
        "delivered", 1, None)
    # The same report again (its first answer lost) changes nothing.
    assert await jobs.report_callback(jid("a"), "r1", 1, Outcome(True), TRIES) == after
    assert await jobs.report_callback(jid("a"), "r1", 1, Outcome(False, "x"), TRIES) == after
    assert not await jobs.refresh_callback(jid("a"), "r1", 1, LEASE)
    assert await jobs.claim_callback("r1", LEASE, TRIES) is None
    got = await jobs.get(jid("a"))
    assert got is not None and got.callback == after
    assert await jobs.report_callback(jid("gone"), "r1", 1, Outcome(True), TRIES) is None


async def test_a_failed_attempt_is_retried_after_a_backoff_until_tries_run_out(
        jobs: JobStore, clock: FakeClock) -> None:
    await finished_with_callback(jobs, "a")
    for attempt, wait in ((1, 1000), (2, 2000)):
        got = await jobs.claim_callback("r1", LEASE, TRIES)
        assert got is not None and got.callback is not None
        assert got.callback.attempts == attempt
        after = await jobs.report_callback(jid("a"), "r1", attempt,
                                           Outcome(False, "the receiver answered 500"), TRIES)
        assert after is not None
        assert (after.status, after.error, after.holder, after.due_ms) == (
            "pending", "the receiver answered 500", None, clock.now_ms + wait)
        # Reported twice: the second finds no attempt of its own, and changes nothing.
        assert await jobs.report_callback(jid("a"), "r1", attempt,
                                          Outcome(False, "again"), TRIES) == after
        clock.advance(wait - 1)
        assert await jobs.claim_callback("r2", LEASE, TRIES) is None
        clock.advance(1)
    got = await jobs.claim_callback("r2", LEASE, TRIES)     # any replica may take it
    assert got is not None and got.callback is not None and got.callback.attempts == 3
    after = await jobs.report_callback(jid("a"), "r2", 3, Outcome(False, "timeout"), TRIES)
    assert after is not None and (after.status, after.attempts, after.error) == (
        "failed", 3, "timeout")
    clock.advance(60_000)
    assert await jobs.claim_callback("r1", LEASE, TRIES) is None


async def test_giving_up_fails_the_callback_at_once(jobs: JobStore) -> None:
    await finished_with_callback(jobs, "a")
    await jobs.claim_callback("r1", LEASE, TRIES)
    after = await jobs.report_callback(jid("a"), "r1", 1,
                                       Outcome(False, "host not allowed", give_up=True), TRIES)
    assert after is not None and (after.status, after.attempts) == ("failed", 1)


async def test_a_lapsed_callback_lease_passes_to_another_replica(
        jobs: JobStore, clock: FakeClock) -> None:
    await finished_with_callback(jobs, "a")
    assert await jobs.claim_callback("dead", LEASE, TRIES) is not None
    clock.advance(LEASE - 1000)
    assert await jobs.refresh_callback(jid("a"), "dead", 1, LEASE)   # alive, for now
    clock.advance(LEASE - 1)
    assert await jobs.claim_callback("alive", LEASE, TRIES) is None
    clock.advance(1)
    got = await jobs.claim_callback("alive", LEASE, TRIES)
    assert got is not None and got.callback is not None
    assert (got.callback.attempts, got.callback.holder, got.callback.delivery_id) == (
        2, "alive", "d-a")
    assert got.callback.error is not None and "lease" in got.callback.error
    # The former holder can neither keep the callback nor fail it.
    assert not await jobs.refresh_callback(jid("a"), "dead", 1, LEASE)
    after = await jobs.report_callback(jid("a"), "dead", 1, Outcome(False, "x"), TRIES)
    assert after == got.callback
    assert await jobs.refresh_callback(jid("a"), "alive", 2, LEASE)
    # But a 2xx it got counts: the receiver has the callback.
    after = await jobs.report_callback(jid("a"), "dead", 1, Outcome(True), TRIES)
    assert after is not None and after.status == "delivered"
    assert not await jobs.refresh_callback(jid("a"), "alive", 2, LEASE)


async def test_a_late_2xx_does_not_undo_a_final_failure(jobs: JobStore,
                                                         clock: FakeClock) -> None:
    await finished_with_callback(jobs, "a")
    await jobs.claim_callback("paused", LEASE, 2)
    clock.advance(LEASE)
    await jobs.claim_callback("r2", LEASE, 2)
    failed = await jobs.report_callback(jid("a"), "r2", 2, Outcome(False, "refused"), 2)
    assert failed is not None and failed.status == "failed"
    # The paused replica's attempt was answered 2xx after all: too late, final is final.
    assert await jobs.report_callback(jid("a"), "paused", 1, Outcome(True), 2) == failed


async def test_a_callback_whose_last_attempt_lapsed_fails(jobs: JobStore,
                                                          clock: FakeClock) -> None:
    await finished_with_callback(jobs, "a")
    for attempt in range(1, TRIES + 1):
        got = await jobs.claim_callback(f"r{attempt}", LEASE, TRIES)
        assert got is not None and got.callback is not None
        assert got.callback.attempts == attempt
        clock.advance(LEASE)
    assert await jobs.claim_callback("r9", LEASE, TRIES) is None
    got = await jobs.get(jid("a"))
    assert got is not None and got.callback is not None
    assert (got.callback.status, got.callback.attempts) == ("failed", TRIES)
    assert got.callback.error is not None and "lease" in got.callback.error


async def test_cancelled_and_reaped_jobs_have_their_callback_too(
        jobs: JobStore, clock: FakeClock) -> None:
    await jobs.submit(with_callback("cancelled"), WIDE)
    await jobs.submit(with_callback("reaped"), WIDE)
    await jobs.cancel(jid("cancelled"), TTL)
    assert await claimed(jobs, "dead") == "reaped"
    clock.advance(LEASE)
    assert [r.id for r in await jobs.reap(1, TTL)] == [jid("reaped")]
    taken = []
    while (got := await jobs.claim_callback("r1", LEASE, TRIES)) is not None:
        assert got.callback is not None
        taken.append((got.id.rstrip("0"), got.status, got.callback.delivery_id))
    assert sorted(taken) == [("cancelled", JobStatus.CANCELLED, "d-cancelled"),
                             ("reaped", JobStatus.FAILED, "d-reaped")]


async def test_the_callback_of_an_expired_job_is_dropped(jobs: JobStore,
                                                         clock: FakeClock) -> None:
    await finished_with_callback(jobs, "a")
    clock.advance(TTL)
    if isinstance(jobs, RedisJobStore):
        await _expire_in_redis(jobs, jid("a"))
    assert await jobs.claim_callback("r1", LEASE, TRIES) is None
    assert not await jobs.refresh_callback(jid("a"), "r1", 1, LEASE)
    assert await jobs.report_callback(jid("a"), "r1", 1, Outcome(True), TRIES) is None
