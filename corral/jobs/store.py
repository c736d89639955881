"""The job store protocol: where batch jobs live between submission and expiry.

A job is in exactly one state at a time, and every change of state is one atomic
operation of the store, so two workers (or two replicas sharing Redis) can never
both take a job, and a job accepted is in the store before the client hears 202:

    submit → queued ─claim→ running ─finish→ succeeded | failed   (kept for ttl)
               ▲  ▲            │ │
               │  └──requeue───┘ └─(lease not refreshed: reap)─→ queued, or failed
               └─ cancel from queued or running → cancelled         after max_attempts

Order of ``claim``: priority class first (the submitter's tier), then first come
first served. A job that is retried keeps its place: once its ``not_before`` has
passed it goes ahead of jobs of its class submitted after it.

Leases: a worker that takes a job must ``refresh`` it well within ``lease_ms``; a
job whose lease lapsed (its replica died or hung) is put back by ``reap``. A
refresh that answers False means the job is no longer the worker's (cancelled, or
reaped): the worker must abandon it.

Callbacks: the operation that finishes a job with a ``callback_url`` makes its
callback deliverable in the same step; ``claim_callback``, ``refresh_callback`` and
``report_callback`` lease its attempts to replicas, as ``delivery.py`` specifies.

Times are milliseconds of the store's clock: the memory store's (wall clock by
default), Redis's ``TIME`` (one clock for every replica).

The same contract tests (``tests/contract/test_job_store.py``) run against the
memory and the Redis store.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import orjson

# Re-exported: the callback's state is part of a job record.
from corral.jobs.delivery import CallbackState as CallbackState
from corral.jobs.delivery import Outcome as Outcome

# Scanning for ``list`` stops after this many of the newest jobs: a listing is a
# convenience for people, and must stay cheap however many jobs a client has.
LIST_SCAN = 1000


class StoreError(Exception):
    """The job store is unreachable or failed."""


class QueueFull(Exception):
    """The store holds as many unfinished jobs as allowed (in all, or for this client)."""


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


@dataclass(frozen=True, slots=True)
class NewJob:
    id: str
    owner: str                  # the submitting client's name: key name, or IP
    priority: int               # the submitter's tier's class (0 high .. 2 low)
    endpoint: str
    model: str
    body: bytes                 # the request as it will be sent (stream forced off)
    # The submitter's credential headers, sent again with every try so the run has
    # the submitter's identity; dropped from the store when the job finishes.
    credentials: tuple[tuple[str, str], ...] = ()
    client_ip: str = ""
    callback_url: str | None = None
    # Sent with every attempt of the callback (``X-Corral-Delivery``), on every replica.
    delivery_id: str = ""


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    owner: str
    priority: int
    endpoint: str
    model: str
    status: JobStatus
    created_ms: int
    client_ip: str = ""
    callback_url: str | None = None
    started_ms: int | None = None
    finished_ms: int | None = None
    attempts: int = 0           # times a worker took the job
    failures: int = 0           # tries that failed in a way that counts (5xx, lease lost)
    not_before_ms: int | None = None   # a retry waits until then
    error: str | None = None
    http_status: int | None = None
    result: bytes | None = None        # the backend's JSON answer, as it came
    body: bytes | None = None          # gone once finished
    credentials: tuple[tuple[str, str], ...] = ()
    worker: str | None = None
    callback: CallbackState | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    """Put a running job back in the queue."""

    delay_ms: int = 0
    failed: bool = False        # counts toward max_attempts (busy/limited does not)
    error: str | None = None
    http_status: int | None = None


@dataclass(frozen=True, slots=True)
class Ending:
    """How a running job ended."""

    status: JobStatus           # succeeded or failed
    result: bytes | None = None
    error: str | None = None
    http_status: int | None = None


@dataclass(frozen=True, slots=True)
class Bounds:
    """Submission limits, read from the settings at each call (reload changes them)."""

    max_queued: int
    max_queued_per_client: int


class JobStore(Protocol):
    async def submit(self, job: NewJob, bounds: Bounds) -> JobRecord:
        """Store and queue the job; raises :class:`QueueFull` beyond ``bounds``."""
        ...

    async def claim(self, worker: str, lease_ms: int) -> JobRecord | None:
        """Take the first ready job (class, then FIFO), leased to ``worker``."""
        ...

    async def refresh(self, job_id: str, worker: str, lease_ms: int) -> bool:
        """Extend the lease; False when the job is no longer this worker's."""
        ...

    async def requeue(self, job_id: str, worker: str, retry: Retry) -> bool:
        """Back to the queue, ready after ``retry.delay_ms``; False if not the holder."""
        ...

    async def finish(self, job_id: str, worker: str, ending: Ending,
                     ttl_ms: int) -> JobRecord | None:
        """Record the outcome, drop body and credential, expire after ``ttl_ms``.
        None when the job is no longer this worker's (its outcome is not recorded)."""
        ...

    async def reap(self, max_attempts: int, ttl_ms: int) -> list[JobRecord]:
        """Jobs whose lease lapsed go back to the queue, counted as a failed try; the
        ones that thereby reach ``max_attempts`` fail, and are returned."""
        ...

    async def cancel(self, job_id: str,
                     ttl_ms: int) -> tuple[JobStatus, JobRecord] | None:
        """Cancel a queued or running job. Returns the status before and the record
        after (a finished job is left as it is); None for an unknown id."""
        ...

    async def get(self, job_id: str) -> JobRecord | None: ...

    async def list(self, owner: str | None, status: JobStatus | None,
                   limit: int) -> list[JobRecord]:
        """Newest first, among the ``LIST_SCAN`` newest jobs of ``owner`` (all jobs
        when None); records without ``result``, ``body`` and credential."""
        ...

    async def claim_callback(self, holder: str, lease_ms: int,
                             tries: int) -> JobRecord | None:
        """Take the next attempt of the first due callback (``delivery.claim``): the
        job, whose ``callback`` names ``holder`` and the attempt's number. Callbacks
        whose job has expired are dropped; one whose last attempt lapsed fails."""
        ...

    async def refresh_callback(self, job_id: str, holder: str, attempt: int,
                               lease_ms: int) -> bool:
        """Extend the attempt's lease; False when it is no longer the holder's."""
        ...

    async def report_callback(self, job_id: str, holder: str, attempt: int,
                              outcome: Outcome, tries: int) -> CallbackState | None:
        """Record how the attempt went (``delivery.report``); the callback's state
        after it (unchanged when the report changes nothing), None if the job is gone."""
        ...

    async def counts(self) -> dict[str, int]:
        """Unfinished jobs: ``queued`` (ready or waiting for a retry) and ``running``."""
        ...

    async def close(self) -> None: ...


def _seconds(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000


_PRIORITY_NAMES = ("high", "normal", "low")


def document(record: JobRecord, *, with_result: bool = True) -> dict[str, object]:
    """The job as clients see it (``GET /corral/jobs/{id}``, callbacks). Never the
    credential, never the request body. ``result`` is the backend's JSON answer,
    embedded as it came, without parsing it again."""
    doc: dict[str, object] = {
        "id": record.id,
        "status": record.status.value,
        "client": record.owner,
        "endpoint": record.endpoint,
        "model": record.model,
        "priority": (_PRIORITY_NAMES[record.priority]
                     if 0 <= record.priority < len(_PRIORITY_NAMES) else record.priority),
        "created_at": _seconds(record.created_ms),
        "started_at": _seconds(record.started_ms),
        "finished_at": _seconds(record.finished_ms),
        "attempts": record.attempts,
        "retry_at": _seconds(record.not_before_ms),
        "http_status": record.http_status,
        "error": record.error,
        "callback_url": record.callback_url,
        "callback": None if record.callback is None else {
            "status": record.callback.status, "attempts": record.callback.attempts,
            "error": record.callback.error,
            "delivery_id": record.callback.delivery_id},
    }
    if with_result:
        doc["result"] = orjson.Fragment(record.result) if record.result else None
    return doc
