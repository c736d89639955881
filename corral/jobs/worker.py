"""Job workers: take a job from the store, run it through Corral itself, record it.

A job's request is sent over HTTP to this process's own listening address, with the
submitter's credential headers, so it goes through exactly the path of any other
request: identification (the submitter's key and tier), limits, the queue (priority
class and fair share), routing, retries, accounting and the access log. Nothing here
duplicates that logic, and a job can never do what its submitter could not.

Jobs use spare capacity only: a process runs at most ``jobs.workers`` of them at
once, each waiting in Corral's queue behind interactive work of a higher class.

While a job runs its lease is refreshed every third of ``jobs.lease``; a refresh
that fails means the job was cancelled (or given to another worker after a lapse):
its request is aborted at once, which frees the backend slot.

How an answer is judged (``judge``):

- 2xx: succeeded; ``result`` is the JSON answer.
- 429 or 503 (limited, queue full, no backend up): not the job's fault: retried after
  ``Retry-After`` (or a backoff), without counting toward ``jobs.max_attempts``.
- other 4xx: failed (the request itself is wrong, or the key is no longer valid).
- other 5xx: a failed try; retried with backoff up to ``jobs.max_attempts`` tries.
- Corral's own address not answering (shutting down): handed back at once, not
  counted (the job never reached a backend); the worker pauses before its next job.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from corral.config import JobsConfig
from corral.jobs.store import Ending, JobRecord, JobStatus, JobStore, Retry, StoreError

log = logging.getLogger("corral.jobs")

# Backoff for failed tries and for busy answers without Retry-After: 1, 2, 4 … s.
_MAX_BACKOFF_S = 60.0
# Corral's own address refused the connection (it is stopping): the job goes back at
# once for another replica, and this worker pauses rather than churn the queue.
_SELF_UNREACHABLE_PAUSE_S = 1.0
# On shutdown a running job is handed back; a Redis that does not answer must not
# hold the shutdown up.
_HANDBACK_TIMEOUT_S = 2.0
_BUSY = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class Reply:
    """What came back for a job's request; ``status`` 0: Corral did not answer.
    ``fatal``: the job cannot succeed by trying again (``error`` says why)."""

    status: int
    body: bytes = b""
    retry_after: str | None = None
    error: str | None = None
    fatal: bool = False


def retry_after_s(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def backoff_s(n: int) -> float:
    """After the n-th failed or busy try: 1 s, 2 s, 4 s, … at most 60 s."""
    return float(min(_MAX_BACKOFF_S, 2.0 ** max(0, n - 1)))


def error_message(body: bytes, status: int) -> str:
    """The answer's error in Ollama's (``{"error": "..."}``) or OpenAI's shape."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, str):
            return err
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
    text = body[:200].decode(errors="replace").strip()
    return f"HTTP {status}" + (f": {text}" if text else "")


def judge(reply: Reply, record: JobRecord, max_attempts: int,
          now: float) -> Ending | Retry:
    """What to do with a job after one try (pure)."""
    if reply.fatal:
        return Ending(JobStatus.FAILED, error=reply.error, http_status=reply.status or None)
    if reply.status == 0:
        return Retry(0, False, f"Corral's own address did not answer: {reply.error}")
    if 200 <= reply.status < 300:
        try:
            orjson.loads(reply.body)
        except orjson.JSONDecodeError:
            return Ending(JobStatus.FAILED, error="the answer is not JSON",
                          http_status=reply.status)
        return Ending(JobStatus.SUCCEEDED, result=reply.body, http_status=reply.status)
    message = error_message(reply.body, reply.status)
    waited = retry_after_s(reply.retry_after, now)
    if reply.status in _BUSY:
        delay = waited if waited is not None else backoff_s(record.attempts)
        return Retry(int(delay * 1000), False, message, reply.status)
    if reply.status < 500:
        return Ending(JobStatus.FAILED, error=message, http_status=reply.status)
    if record.failures + 1 >= max_attempts:
        return Ending(JobStatus.FAILED, error=message, http_status=reply.status)
    delay = waited if waited is not None else backoff_s(record.failures + 1)
    return Retry(int(delay * 1000), True, message, reply.status)


class Workers:
    """``jobs.workers`` tasks taking jobs, plus one task reaping lapsed leases."""

    def __init__(self, store: JobStore, config: Callable[[], JobsConfig], target: str,
                 max_answer: Callable[[], int],
                 on_finished: Callable[[JobRecord], None]) -> None:
        self._store = store
        self._config = config
        self._target = target               # e.g. http://127.0.0.1:8080
        self._max_answer = max_answer
        self._on_finished = on_finished
        self._id = uuid.uuid4().hex[:12]    # this process, as lease holder
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._requests: dict[str, asyncio.Task[Reply]] = {}
        self._abandoned: set[str] = set()
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False
        self._store_down = False
        self.size = 0
        self.busy = 0

    def start(self, workers: int) -> None:
        # No total timeout: the gateway's own queue.max_wait and timeouts bound the
        # wait, and answer 503/504 in time.
        self._session = aiohttp.ClientSession(
            # Workers bound the connections. Over HTTPS the target is this process
            # itself, whose certificate need not name the address it is called on.
            connector=aiohttp.TCPConnector(limit=0,
                                           ssl=not self._target.startswith("https")),
            timeout=aiohttp.ClientTimeout(total=None, connect=10))
        loop = asyncio.get_running_loop()
        self.size = workers
        self._tasks = [loop.create_task(self._loop(f"{self._id}/{n}"),
                                        name=f"corral-job-worker-{n}")
                       for n in range(workers)]
        self._tasks.append(loop.create_task(self._reaper(), name="corral-job-reaper"))

    async def stop(self) -> None:
        # A flag besides the cancellation: a client library that swallows a
        # CancelledError (a Redis call interrupted mid-command) must not leave a
        # worker looping after shutdown.
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._session is not None:
            await self._session.close()

    def wake(self) -> None:
        """A job was just submitted here: an idle worker need not wait for its poll."""
        self._wake.set()

    def abort(self, job_id: str) -> None:
        """The job was cancelled: if this process runs it, abort its request now
        (elsewhere, its replica finds out at the next lease refresh)."""
        request = self._requests.get(job_id)
        if request is not None:
            self._abandoned.add(job_id)
            request.cancel()

    def _store_failed(self, exc: StoreError) -> None:
        if not self._store_down:
            log.warning("jobs paused: %s", exc)    # once per outage, not per poll
        self._store_down = True

    # -- the loops ------------------------------------------------------------------

    async def _until_listening(self) -> None:
        """Workers start with the Gateway, before its listener: a job taken earlier
        could only be handed back."""
        parts = urlsplit(self._target)
        while True:
            try:
                _, writer = await asyncio.open_connection(parts.hostname, parts.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    async def _loop(self, worker: str) -> None:
        await self._until_listening()
        while not self._stopping:
            cfg = self._config()
            # Cleared before looking: a submission after this point sets it again, so
            # it cannot be missed between an empty claim and the wait.
            self._wake.clear()
            try:
                record = await self._store.claim(worker, int(cfg.lease * 1000))
            except StoreError as exc:
                self._store_failed(exc)
                record = None
            else:
                if self._store_down:
                    log.warning("jobs resumed: the job store answers again")
                self._store_down = False
            if record is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(cfg.poll_interval):
                        await self._wake.wait()
                continue
            self.busy += 1
            try:
                if not await self._run(record, worker):
                    await asyncio.sleep(_SELF_UNREACHABLE_PAUSE_S)
            except StoreError as exc:
                # The outcome could not be written: the lease will lapse and the job
                # will run again; nothing is lost.
                log.warning("job %s: could not record its outcome: %s", record.id, exc)
            finally:
                self.busy -= 1

    async def _reaper(self) -> None:
        while True:
            cfg = self._config()
            await asyncio.sleep(max(0.05, min(cfg.lease / 3, cfg.poll_interval)))
            try:
                failed = await self._store.reap(cfg.max_attempts, int(cfg.ttl * 1000))
            except StoreError as exc:
                self._store_failed(exc)
                continue
            for record in failed:
                log.warning("job %s failed: %s", record.id, record.error)
                self._on_finished(record)

    # -- one job --------------------------------------------------------------------

    async def _run(self, record: JobRecord, worker: str) -> bool:
        """Run one job; False when Corral's own address did not answer."""
        request = asyncio.get_running_loop().create_task(self._send(record))
        self._requests[record.id] = request
        keeper = asyncio.get_running_loop().create_task(
            self._keep_lease(record.id, worker, request))
        try:
            reply = await request
        except asyncio.CancelledError:
            if record.id in self._abandoned:
                return True     # cancelled, or no longer ours: nothing to record
            # Shutdown: hand the job back at once, without counting the try, so that
            # another replica need not wait for the lease to lapse.
            with contextlib.suppress(StoreError, TimeoutError):
                async with asyncio.timeout(_HANDBACK_TIMEOUT_S):
                    await self._store.requeue(record.id, worker,
                                              Retry(0, False, "Corral was shutting down"))
            raise
        finally:
            keeper.cancel()
            self._requests.pop(record.id, None)
            self._abandoned.discard(record.id)
        cfg = self._config()
        verdict = judge(reply, record, cfg.max_attempts, time.time())
        if isinstance(verdict, Retry):
            await self._store.requeue(record.id, worker, verdict)
            return reply.status != 0
        finished = await self._store.finish(record.id, worker, verdict, int(cfg.ttl * 1000))
        if finished is not None:
            self._on_finished(finished)
        return True

    async def _keep_lease(self, job_id: str, worker: str,
                          request: asyncio.Task[Reply]) -> None:
        while True:
            cfg = self._config()
            await asyncio.sleep(cfg.lease / 3)
            try:
                held = await self._store.refresh(job_id, worker, int(cfg.lease * 1000))
            except StoreError as exc:
                # Keep running: if the lease lapses meanwhile, the next refresh says so.
                self._store_failed(exc)
                continue
            if not held:
                self._abandoned.add(job_id)
                request.cancel()
                return

    async def _send(self, record: JobRecord) -> Reply:
        assert self._session is not None
        headers: dict[str, Any] = {"Content-Type": "application/json",
                                   "X-Corral-Job": record.id}
        if record.client_ip:
            # Believed only when this address is in clients.trusted_proxies: then an
            # anonymous submitter's job is counted against its own IP, not ours.
            headers["X-Forwarded-For"] = record.client_ip
        for name, value in record.credentials:
            headers[name] = value
        limit = self._max_answer()
        try:
            async with self._session.post(self._target + record.endpoint,
                                          data=record.body or b"", headers=headers) as resp:
                body = bytearray()
                async for chunk in resp.content.iter_any():
                    body += chunk
                    if len(body) > limit:
                        # Kept results are bounded like request bodies (max_body_size).
                        return Reply(resp.status, error="the answer is larger than "
                                     f"{limit} bytes (max_body_size)", fatal=True)
                return Reply(resp.status, bytes(body), resp.headers.get("Retry-After"))
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            return Reply(0, error=str(exc) or type(exc).__name__)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return Reply(502, orjson.dumps(
                {"error": f"{type(exc).__name__}: {exc}" if str(exc)
                 else type(exc).__name__}))
