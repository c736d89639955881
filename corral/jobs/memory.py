"""Jobs in process memory (``state: memory``): one Corral process, nothing else to run.

No operation awaits, so on one event loop each is atomic by construction, like the
Lua script on Redis. A restart loses the jobs: use Redis when that matters.

The ready queue and the retry queue are heaps with lazy deletion: an entry is
valid only while the job is still queued with the same sort key (or not-before
time), so cancelling is O(1) and claiming O(log n). Callbacks are a third heap, by
the time each may be claimed, validated the same way; their state changes are the
pure functions of ``delivery.py``.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from corral.jobs import delivery
from corral.jobs.store import (
    LIST_SCAN,
    Bounds,
    CallbackState,
    Ending,
    JobRecord,
    JobStatus,
    NewJob,
    Outcome,
    QueueFull,
    Retry,
)

# Same ordering key as the Redis store: the class, then the arrival number.
CLASS_SPAN = 10**13


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class _Entry:
    record: JobRecord
    sort: int
    lease_until: int = 0
    expires_ms: int | None = None
    delivery_id: str = ""


class MemoryJobStore:
    """:class:`~corral.jobs.store.JobStore` in process memory.

    ``clock`` returns milliseconds (tests pass a fake); wall clock by default, since
    the times are shown to people.
    """

    def __init__(self, *, clock: Callable[[], int] | None = None) -> None:
        self._clock = clock or wall_ms
        self._seq = itertools.count(1)
        self._jobs: dict[str, _Entry] = {}          # creation order: the global index
        self._by_owner: dict[str, dict[str, None]] = {}
        self._pending: dict[str, int] = {}          # owner → unfinished jobs
        self._ready: list[tuple[int, str]] = []     # (sort, id)
        self._delayed: list[tuple[int, str]] = []   # (not_before, id)
        self._running: dict[str, None] = {}
        self._expiry: deque[tuple[int, str]] = deque()
        self._callbacks: list[tuple[int, str]] = []     # (due, id)

    # -- helpers --------------------------------------------------------------------

    def _live(self, job_id: str, now: int) -> _Entry | None:
        entry = self._jobs.get(job_id)
        if entry is None:
            return None
        if entry.expires_ms is not None and entry.expires_ms <= now:
            self._forget(job_id)
            return None
        return entry

    def _forget(self, job_id: str) -> None:
        entry = self._jobs.pop(job_id, None)
        if entry is None:
            return
        mine = self._by_owner.get(entry.record.owner)
        if mine is not None:
            mine.pop(job_id, None)
            if not mine:
                del self._by_owner[entry.record.owner]

    def _sweep(self, now: int) -> None:
        # Finished jobs expire in roughly the order they finished; an entry whose ttl
        # was changed by a reload is checked exactly when it is read anyway.
        while self._expiry and self._expiry[0][0] <= now:
            _, job_id = self._expiry.popleft()
            entry = self._jobs.get(job_id)
            if entry is not None and entry.expires_ms is not None and entry.expires_ms <= now:
                self._forget(job_id)

    def _finalize(self, entry: _Entry, now: int, ttl_ms: int, status: JobStatus, *,
                  result: bytes | None = None, error: str | None = None,
                  http_status: int | None = None, failures: int | None = None) -> None:
        rec = entry.record
        self._running.pop(rec.id, None)
        left = self._pending.get(rec.owner, 0) - 1
        if left > 0:
            self._pending[rec.owner] = left
        else:
            self._pending.pop(rec.owner, None)
        entry.record = dataclasses.replace(
            rec, status=status, finished_ms=now, body=None, credentials=(), worker=None,
            not_before_ms=None, result=result, error=error, http_status=http_status,
            failures=rec.failures if failures is None else failures)
        entry.expires_ms = now + ttl_ms
        self._expiry.append((entry.expires_ms, rec.id))
        if rec.callback_url is not None:
            # In the same step as the outcome: no moment when the job is finished and
            # its callback belongs to nobody.
            self._set_callback(entry, delivery.deliverable(entry.delivery_id or rec.id, now))

    def _set_callback(self, entry: _Entry, state: CallbackState) -> None:
        entry.record = dataclasses.replace(entry.record, callback=state)
        if state.due_ms is not None:
            heapq.heappush(self._callbacks, (state.due_ms, entry.record.id))

    def _enqueue(self, entry: _Entry, now: int, delay_ms: int) -> None:
        if delay_ms > 0:
            heapq.heappush(self._delayed, (now + delay_ms, entry.record.id))
        else:
            heapq.heappush(self._ready, (entry.sort, entry.record.id))

    def _holder(self, job_id: str, worker: str, now: int) -> _Entry | None:
        entry = self._live(job_id, now)
        if (entry is None or entry.record.status is not JobStatus.RUNNING
                or entry.record.worker != worker):
            return None
        return entry

    # -- the protocol ---------------------------------------------------------------

    async def submit(self, job: NewJob, bounds: Bounds) -> JobRecord:
        now = self._clock()
        self._sweep(now)
        if self._count_unfinished() >= bounds.max_queued:
            raise QueueFull("queue")
        if self._pending.get(job.owner, 0) >= bounds.max_queued_per_client:
            raise QueueFull("client")
        sort = job.priority * CLASS_SPAN + next(self._seq)
        record = JobRecord(
            id=job.id, owner=job.owner, priority=job.priority, endpoint=job.endpoint,
            model=job.model, status=JobStatus.QUEUED, created_ms=now,
            client_ip=job.client_ip, callback_url=job.callback_url, body=job.body,
            credentials=job.credentials)
        entry = _Entry(record, sort, delivery_id=job.delivery_id)
        self._jobs[job.id] = entry
        self._by_owner.setdefault(job.owner, {})[job.id] = None
        self._pending[job.owner] = self._pending.get(job.owner, 0) + 1
        self._enqueue(entry, now, 0)
        return record

    def _count_unfinished(self) -> int:
        return sum(self._pending.values())

    async def claim(self, worker: str, lease_ms: int) -> JobRecord | None:
        now = self._clock()
        while self._delayed and self._delayed[0][0] <= now:
            not_before, job_id = heapq.heappop(self._delayed)
            entry = self._live(job_id, now)
            if (entry is not None and entry.record.status is JobStatus.QUEUED
                    and entry.record.not_before_ms == not_before):
                entry.record = dataclasses.replace(entry.record, not_before_ms=None)
                heapq.heappush(self._ready, (entry.sort, job_id))
        while self._ready:
            sort, job_id = heapq.heappop(self._ready)
            entry = self._live(job_id, now)
            if (entry is None or entry.record.status is not JobStatus.QUEUED
                    or entry.sort != sort or entry.record.not_before_ms is not None):
                continue        # a stale heap entry: cancelled, or re-queued since
            rec = entry.record
            entry.record = dataclasses.replace(
                rec, status=JobStatus.RUNNING, worker=worker, started_ms=now,
                attempts=rec.attempts + 1, not_before_ms=None)
            entry.lease_until = now + lease_ms
            self._running[job_id] = None
            return entry.record
        return None

    async def refresh(self, job_id: str, worker: str, lease_ms: int) -> bool:
        now = self._clock()
        entry = self._holder(job_id, worker, now)
        if entry is None:
            return False
        entry.lease_until = now + lease_ms
        return True

    async def requeue(self, job_id: str, worker: str, retry: Retry) -> bool:
        now = self._clock()
        entry = self._holder(job_id, worker, now)
        if entry is None:
            return False
        rec = entry.record
        self._running.pop(job_id, None)
        entry.record = dataclasses.replace(
            rec, status=JobStatus.QUEUED, worker=None, error=retry.error,
            http_status=retry.http_status, failures=rec.failures + int(retry.failed),
            not_before_ms=now + retry.delay_ms if retry.delay_ms > 0 else None)
        self._enqueue(entry, now, retry.delay_ms)
        return True

    async def finish(self, job_id: str, worker: str, ending: Ending,
                     ttl_ms: int) -> JobRecord | None:
        now = self._clock()
        entry = self._holder(job_id, worker, now)
        if entry is None:
            return None
        self._finalize(entry, now, ttl_ms, ending.status, result=ending.result,
                       error=ending.error, http_status=ending.http_status)
        return entry.record

    async def reap(self, max_attempts: int, ttl_ms: int) -> list[JobRecord]:
        now = self._clock()
        self._sweep(now)
        failed: list[JobRecord] = []
        for job_id in list(self._running):
            entry = self._jobs.get(job_id)
            if entry is None:
                self._running.pop(job_id, None)
                continue
            if entry.lease_until > now:
                continue
            rec = entry.record
            error = "the replica running this job stopped refreshing its lease"
            if rec.failures + 1 >= max_attempts:
                self._finalize(entry, now, ttl_ms, JobStatus.FAILED, error=error,
                               failures=rec.failures + 1)
                failed.append(entry.record)
                continue
            self._running.pop(job_id, None)
            entry.record = dataclasses.replace(
                rec, status=JobStatus.QUEUED, worker=None, error=error,
                failures=rec.failures + 1, not_before_ms=None)
            self._enqueue(entry, now, 0)
        return failed

    async def cancel(self, job_id: str,
                     ttl_ms: int) -> tuple[JobStatus, JobRecord] | None:
        now = self._clock()
        entry = self._live(job_id, now)
        if entry is None:
            return None
        before = entry.record.status
        if not before.finished:
            # Its heap entries go stale: claim skips jobs that are no longer queued.
            self._finalize(entry, now, ttl_ms, JobStatus.CANCELLED)
        return before, entry.record

    async def get(self, job_id: str) -> JobRecord | None:
        entry = self._live(job_id, self._clock())
        return entry.record if entry is not None else None

    async def list(self, owner: str | None, status: JobStatus | None,
                   limit: int) -> list[JobRecord]:
        now = self._clock()
        self._sweep(now)
        ids = self._jobs.keys() if owner is None else self._by_owner.get(owner, {}).keys()
        out: list[JobRecord] = []
        for job_id in itertools.islice(reversed(ids), LIST_SCAN):
            entry = self._jobs[job_id]
            if entry.expires_ms is not None and entry.expires_ms <= now:
                continue
            if status is None or entry.record.status is status:
                out.append(dataclasses.replace(entry.record, result=None, body=None,
                                               credentials=()))
                if len(out) >= limit:
                    break
        return out

    async def claim_callback(self, holder: str, lease_ms: int,
                             tries: int) -> JobRecord | None:
        now = self._clock()
        while self._callbacks and self._callbacks[0][0] <= now:
            due, job_id = heapq.heappop(self._callbacks)
            entry = self._live(job_id, now)
            state = None if entry is None else entry.record.callback
            if entry is None or state is None or state.due_ms != due:
                continue        # stale: expired, refreshed, reported since
            after = delivery.claim(state, holder, now, lease_ms, tries)
            if after is None:
                continue
            self._set_callback(entry, after)
            if not after.final:
                return entry.record
        return None

    def _callback(self, job_id: str) -> tuple[_Entry, CallbackState] | None:
        entry = self._live(job_id, self._clock())
        if entry is None or entry.record.callback is None:
            return None
        return entry, entry.record.callback

    async def refresh_callback(self, job_id: str, holder: str, attempt: int,
                               lease_ms: int) -> bool:
        found = self._callback(job_id)
        if found is None:
            return False
        after = delivery.refresh(found[1], holder, attempt, self._clock(), lease_ms)
        if after is None:
            return False
        self._set_callback(found[0], after)
        return True

    async def report_callback(self, job_id: str, holder: str, attempt: int,
                              outcome: Outcome, tries: int) -> CallbackState | None:
        found = self._callback(job_id)
        if found is None:
            return None
        entry, state = found
        after = delivery.report(state, holder, attempt, outcome, self._clock(), tries)
        if after is None:
            return state
        self._set_callback(entry, after)
        return after

    async def counts(self) -> dict[str, int]:
        running = len(self._running)
        return {"queued": self._count_unfinished() - running, "running": running}

    async def close(self) -> None:
        return None
