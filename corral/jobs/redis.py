"""Jobs in Redis (``state: redis://…``), shared by every Corral replica.

Every change of state is one call of ``jobs.lua`` (registered once, run by
EVALSHA), so it is atomic across replicas. A job is written before the client hears
202, and a replica that dies holding one stops refreshing its lease: any replica's
``reap`` then puts the job back in the queue. Reads (``get``, ``list``, ``counts``)
are plain commands.

Keys, under a prefix (``corral:jobs:`` by default): ``ready``, ``delayed``,
``running``, ``pending``, ``index``, ``seq``, ``callbacks``, ``job:<id>`` (a hash; a
TTL once the job has finished; its callback's state in the ``cb_*`` fields) and
``owner:<owner>`` (that client's ids by creation).

Failures: any connection, timeout or server error becomes :class:`StoreError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import cache
from importlib.resources import files
from typing import Any, Final

import orjson
from redis.asyncio import Redis
from redis.asyncio import from_url as redis_from_url
from redis.exceptions import RedisError

from corral.jobs.delivery import LAPSED, backoff_ms
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
    StoreError,
)

DEFAULT_PREFIX: Final = "corral:jobs:"
# Off the request path, but a worker or an API call must not hang on a Redis that
# does not answer: fail, and let the caller retry or answer 503.
DEFAULT_TIMEOUT_S: Final = 5.0
_REAP_ERROR = "the replica running this job stopped refreshing its lease"
# Fields a listing needs: never the result, the request body or the credential.
_SUMMARY = ("id", "owner", "priority", "endpoint", "model", "status", "created",
            "client_ip", "callback_url", "started", "finished", "attempts", "failures",
            "not_before", "error", "http_status", "delivery", "cb_status", "cb_attempts",
            "cb_error", "cb_holder", "cb_due", "callback")


@cache
def _script_text() -> str:
    # The limiter scripts' prelude: one definition of the clock and integer helpers.
    prelude = files("corral.limits.storage").joinpath("prelude.lua")
    return (prelude.read_text(encoding="utf-8") + "\n"
            + files("corral.jobs").joinpath("jobs.lua").read_text(encoding="utf-8"))


def _opt_int(value: bytes | None) -> int | None:
    return int(value) if value else None


def _opt_str(value: bytes | None) -> str | None:
    return value.decode() if value else None


def callback_from_fields(f: Mapping[bytes, bytes | None]) -> CallbackState | None:
    status = f.get(b"cb_status")
    if not status:
        legacy = f.get(b"callback")     # written by an earlier version: outcome only
        return CallbackState(**orjson.loads(legacy)) if legacy else None
    return CallbackState(
        status=status.decode(), attempts=int(f.get(b"cb_attempts") or 0),
        error=_opt_str(f.get(b"cb_error")),
        delivery_id=(f.get(b"delivery") or f.get(b"id") or b"").decode(),
        holder=_opt_str(f.get(b"cb_holder")), due_ms=_opt_int(f.get(b"cb_due")))


def record_from_fields(f: Mapping[bytes, bytes | None]) -> JobRecord:
    """A job hash (bytes → bytes) as a record; empty fields are absent values."""
    auth = f.get(b"auth")
    return JobRecord(
        id=(f.get(b"id") or b"").decode(), owner=(f.get(b"owner") or b"").decode(),
        priority=int(f.get(b"priority") or 1), endpoint=(f.get(b"endpoint") or b"").decode(),
        model=(f.get(b"model") or b"").decode(),
        status=JobStatus((f.get(b"status") or b"queued").decode()),
        created_ms=int(f.get(b"created") or 0),
        client_ip=(f.get(b"client_ip") or b"").decode(),
        callback_url=_opt_str(f.get(b"callback_url")),
        started_ms=_opt_int(f.get(b"started")), finished_ms=_opt_int(f.get(b"finished")),
        attempts=int(f.get(b"attempts") or 0), failures=int(f.get(b"failures") or 0),
        not_before_ms=_opt_int(f.get(b"not_before")), error=_opt_str(f.get(b"error")),
        http_status=_opt_int(f.get(b"http_status")),
        result=f.get(b"result") or None, body=f.get(b"body") or None,
        credentials=tuple((str(k), str(v)) for k, v in orjson.loads(auth)) if auth else (),
        worker=_opt_str(f.get(b"worker")),
        callback=callback_from_fields(f),
    )


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes | None]:
    return dict(zip(flat[0::2], flat[1::2], strict=True))


class RedisJobStore:
    """:class:`~corral.jobs.store.JobStore` on a Redis server."""

    def __init__(self, client: Redis, *, prefix: str = DEFAULT_PREFIX,
                 clock: Callable[[], int] | None = None, owns_client: bool = False) -> None:
        self._client = client
        self._prefix = prefix
        self._clock = clock
        self._owns_client = owns_client
        self._keys = [prefix + k for k in ("ready", "delayed", "running", "pending",
                                           "index", "seq", "callbacks")]
        self._script = client.register_script(_script_text())

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX,
                 clock: Callable[[], int] | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> RedisJobStore:
        client = redis_from_url(url, socket_timeout=timeout_s,
                                socket_connect_timeout=timeout_s)
        return cls(client, prefix=prefix, clock=clock, owns_client=True)

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def _run(self, op: str, *args: str | int | bytes) -> Any:
        now = "" if self._clock is None else str(self._clock())
        try:
            return await self._script(keys=self._keys, args=[now, op, self._prefix, *args])
        except (RedisError, OSError) as exc:
            raise StoreError(f"job store ({op}): {exc}") from exc

    async def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return await fn()
        except (RedisError, OSError) as exc:
            raise StoreError(f"job store ({what}): {exc}") from exc

    def _job_key(self, job_id: str) -> str:
        return f"{self._prefix}job:{job_id}"

    # -- the protocol ---------------------------------------------------------------

    async def submit(self, job: NewJob, bounds: Bounds) -> JobRecord:
        out = await self._run(
            "submit", job.id, job.owner, job.priority, job.endpoint, job.model,
            job.client_ip, job.callback_url or "", job.body,
            orjson.dumps([list(c) for c in job.credentials]) if job.credentials else "",
            bounds.max_queued, bounds.max_queued_per_client, job.delivery_id)
        if out[0] == b"full":
            raise QueueFull(out[1].decode())
        return record_from_fields(_pairs(out[1]))

    async def claim(self, worker: str, lease_ms: int) -> JobRecord | None:
        out = await self._run("claim", worker, lease_ms)
        return record_from_fields(_pairs(out[1])) if out else None

    async def refresh(self, job_id: str, worker: str, lease_ms: int) -> bool:
        return bool(await self._run("refresh", job_id, worker, lease_ms) == 1)

    async def requeue(self, job_id: str, worker: str, retry: Retry) -> bool:
        out = await self._run("requeue", job_id, worker, max(0, retry.delay_ms),
                              "1" if retry.failed else "0", retry.error or "",
                              retry.http_status or "")
        return bool(out == 1)

    async def finish(self, job_id: str, worker: str, ending: Ending,
                     ttl_ms: int) -> JobRecord | None:
        out = await self._run("finish", job_id, worker, ending.status.value,
                              ending.result or "", ending.error or "",
                              ending.http_status or "", max(1, ttl_ms))
        return record_from_fields(_pairs(out[1])) if out else None

    async def reap(self, max_attempts: int, ttl_ms: int) -> list[JobRecord]:
        ids = await self._run("reap", max_attempts, max(1, ttl_ms), _REAP_ERROR)
        failed = []
        for raw in ids:
            record = await self.get(raw.decode())
            if record is not None:
                failed.append(record)
        return failed

    async def cancel(self, job_id: str,
                     ttl_ms: int) -> tuple[JobStatus, JobRecord] | None:
        out = await self._run("cancel", job_id, max(1, ttl_ms))
        if not out:
            return None
        return JobStatus(out[0].decode()), record_from_fields(_pairs(out[1]))

    async def get(self, job_id: str) -> JobRecord | None:
        fields = await self._call("get", lambda: self._client.hgetall(self._job_key(job_id)))
        return record_from_fields(fields) if fields else None

    async def list(self, owner: str | None, status: JobStatus | None,
                   limit: int) -> list[JobRecord]:
        index = self._keys[4] if owner is None else f"{self._prefix}owner:{owner}"
        ids = await self._call(
            "list", lambda: self._client.zrevrange(index, 0, LIST_SCAN - 1))
        if not ids:
            return []

        async def fetch() -> Any:
            async with self._client.pipeline(transaction=False) as pipe:
                for raw in ids:
                    pipe.hmget(self._job_key(raw.decode()), _SUMMARY)
                return await pipe.execute()

        rows = await self._call("list", fetch)
        out: list[JobRecord] = []
        gone: list[bytes] = []
        for raw, row in zip(ids, rows, strict=True):
            if row[0] is None:
                gone.append(raw)        # expired: tidy the index while we are here
                continue
            record = record_from_fields(dict(zip((s.encode() for s in _SUMMARY), row,
                                                 strict=True)))
            if status is None or record.status is status:
                out.append(record)
                if len(out) >= limit:
                    break
        if gone:
            await self._call("list", lambda: self._client.zrem(index, *gone))
        return out

    async def claim_callback(self, holder: str, lease_ms: int,
                             tries: int) -> JobRecord | None:
        out = await self._run("claim_callback", holder, max(1, lease_ms), tries, LAPSED)
        return record_from_fields(_pairs(out[1])) if out else None

    async def refresh_callback(self, job_id: str, holder: str, attempt: int,
                               lease_ms: int) -> bool:
        out = await self._run("refresh_callback", job_id, holder, attempt, max(1, lease_ms))
        return bool(out == 1)

    async def report_callback(self, job_id: str, holder: str, attempt: int,
                              outcome: Outcome, tries: int) -> CallbackState | None:
        out = await self._run("report_callback", job_id, holder, attempt,
                              "1" if outcome.delivered else "0", outcome.error or "",
                              "1" if outcome.give_up else "0", tries, backoff_ms(attempt))
        if not out:
            return None
        return callback_from_fields(dict(zip(
            (b"cb_status", b"cb_attempts", b"cb_error", b"cb_holder", b"cb_due", b"delivery"),
            out, strict=True)) | {b"id": job_id.encode()})

    async def counts(self) -> dict[str, int]:
        async def fetch() -> Any:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in self._keys[:3]:
                    pipe.zcard(key)
                return await pipe.execute()

        ready, delayed, running = await self._call("counts", fetch)
        return {"queued": int(ready) + int(delayed), "running": int(running)}
