"""Callbacks: POST a finished job's status document to its ``callback_url``.

Corral would otherwise be a machine that POSTs to any address it can reach on
behalf of anyone who may submit a job (internal services, cloud metadata
endpoints). So a ``callback_url`` must name a host in ``jobs.callback_hosts``
(an empty list refuses every callback), it is checked again at delivery (a reload
may have removed the host), and redirects are not followed (a redirect could lead
anywhere).

Delivery follows the protocol of ``delivery.py``: the step that finishes a job makes
its callback deliverable in the store; every replica's sender claims due callbacks,
one attempt at a time under a lease it refreshes while it POSTs, and reports the
outcome. A replica that dies mid-attempt stops refreshing: once the lease lapses any
replica makes the next attempt. Each attempt carries ``X-Corral-Job`` and the job's
one ``X-Corral-Delivery`` id, so a receiver can drop the repeats that at-least-once
delivery brings. Up to ``jobs.callback_tries`` attempts in all, ``jobs.callback_timeout``
each, with backoff between them; any 2xx answer is a delivery.

Delivery runs in its own tasks, never in a worker: a slow or dead receiver does not
keep a worker from the next job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp
import orjson

from corral import __version__
from corral.config import JobsConfig
from corral.jobs.delivery import FAILED, PENDING, Outcome
from corral.jobs.store import JobRecord, JobStore, StoreError, document

log = logging.getLogger("corral.jobs")

# Deliveries in flight at once per process; more wait their turn.
MAX_CONCURRENT = 16


def _host_port(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; a bare IPv6 address has no port."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port) if port.isdigit() else None
    return entry, None


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def callback_refusal(url: str, hosts: tuple[str, ...]) -> str | None:
    """Why ``url`` may not be called back, or None when it may."""
    if not hosts:
        return "callbacks are not enabled on this server (jobs.callback_hosts is empty)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return f"invalid callback_url {url!r}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "callback_url must be an http:// or https:// URL with a host"
    if parts.username is not None or parts.password is not None:
        return "callback_url must not carry credentials"
    host = parts.hostname.lower()
    port = port or _default_port(parts.scheme)
    for entry in hosts:
        allowed_host, allowed_port = _host_port(entry)
        if allowed_host == host and allowed_port in (None, port):
            return None
    return f"callback host {host!r} is not in jobs.callback_hosts"


def payload(record: JobRecord) -> bytes:
    doc = document(record)
    # The receiver is told the outcome of the job, not of its own delivery.
    doc.pop("callback", None)
    return orjson.dumps(doc)


class CallbackSender:
    """Claims due callbacks from the store (woken when a job finishes here, else every
    ``jobs.poll_interval``) and makes their attempts, ``MAX_CONCURRENT`` at most."""

    def __init__(self, store: JobStore, config: Callable[[], JobsConfig]) -> None:
        self._store = store
        self._config = config
        self._id = uuid.uuid4().hex[:12]    # this process, as lease holder
        self._session: aiohttp.ClientSession | None = None
        self._poller: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        self._wake = asyncio.Event()
        self._store_down = False

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": f"corral/{__version__}"})
        self._poller = asyncio.get_running_loop().create_task(
            self._poll(), name="corral-callbacks")

    async def stop(self) -> None:
        # An attempt cut here is not reported: its lease lapses and another replica
        # (or this one, restarted) makes the next attempt.
        tasks = [*self._tasks, *([self._poller] if self._poller else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()

    def send(self, record: JobRecord) -> None:
        """The job has just finished here: if it has a callback, look for it now rather
        than at the next poll."""
        if record.callback_url is not None:
            self._wake.set()

    def _wake_at(self, due_ms: int | None) -> None:
        # A retry is due then: look again without waiting for the next poll. (The
        # store's clock may differ a little from this one; the poll covers that.)
        if due_ms is not None:
            delay = max(0.0, due_ms / 1000 - time.time())
            asyncio.get_running_loop().call_later(delay, self._wake.set)

    def _store_failed(self, what: str, exc: StoreError) -> None:
        if not self._store_down:
            log.warning("callbacks paused (%s): %s", what, exc)   # once per outage
        self._store_down = True

    async def _poll(self) -> None:
        while True:
            cfg = self._config()
            self._wake.clear()      # before looking, so a wake-up is never missed
            while True:
                await self._slots.acquire()
                try:
                    record = await self._store.claim_callback(
                        self._id, int(cfg.lease * 1000), cfg.callback_tries)
                except StoreError as exc:
                    self._store_failed("claim", exc)
                    record = None
                else:
                    self._store_down = False
                if record is None:
                    self._slots.release()
                    break
                task = asyncio.get_running_loop().create_task(self._attempt(record))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cfg.poll_interval):
                    await self._wake.wait()

    async def _attempt(self, record: JobRecord) -> None:
        """One claimed attempt: POST under a refreshed lease, then report."""
        try:
            state = record.callback
            assert state is not None and record.callback_url is not None
            attempt, cfg = state.attempts, self._config()
            refusal = callback_refusal(record.callback_url, cfg.callback_hosts)
            if refusal is not None:
                outcome = Outcome(False, refusal, give_up=True)
            else:
                post = asyncio.get_running_loop().create_task(self._post(
                    record.callback_url, record.id, state.delivery_id, payload(record),
                    cfg.callback_timeout))
                keeper = asyncio.get_running_loop().create_task(
                    self._keep_lease(record.id, attempt, post))
                try:
                    error = await post
                except asyncio.CancelledError:
                    if keeper.done():
                        return      # no longer ours: another replica makes the next attempt
                    raise
                finally:
                    keeper.cancel()
                outcome = Outcome(error is None, error)
            await self._report(record.id, attempt, outcome)
        finally:
            self._slots.release()

    async def _report(self, job_id: str, attempt: int, outcome: Outcome) -> None:
        tries = self._config().callback_tries
        try:
            after = await self._store.report_callback(job_id, self._id, attempt,
                                                      outcome, tries)
        except StoreError as exc:
            # Not recorded: the lease lapses and the callback is attempted again.
            log.warning("job %s: could not record the callback's attempt: %s", job_id, exc)
            return
        if after is None:
            return
        if after.status == FAILED and not outcome.delivered:
            log.warning("job %s: callback not delivered after %d attempt(s): %s",
                        job_id, after.attempts, after.error)
        elif after.status == PENDING and after.holder is None:
            self._wake_at(after.due_ms)

    async def _keep_lease(self, job_id: str, attempt: int,
                          post: asyncio.Task[str | None]) -> None:
        while True:
            cfg = self._config()
            await asyncio.sleep(cfg.lease / 3)
            try:
                held = await self._store.refresh_callback(job_id, self._id, attempt,
                                                          int(cfg.lease * 1000))
            except StoreError as exc:
                # Keep going: if the lease lapses meanwhile, the next refresh says so.
                self._store_failed("refresh", exc)
                continue
            if not held:
                # Another replica has taken the callback over (this one was paused past
                # the lease), or it is final: stop this attempt.
                post.cancel()
                return

    async def _post(self, url: str, job_id: str, delivery_id: str, body: bytes,
                    timeout_s: float) -> str | None:
        """None on a 2xx answer, else what went wrong."""
        assert self._session is not None
        try:
            async with self._session.post(
                    url, data=body, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=timeout_s),
                    headers={"Content-Type": "application/json",
                             "X-Corral-Job": job_id,
                             "X-Corral-Delivery": delivery_id}) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return None
                return f"the receiver answered {resp.status}"
        except TimeoutError:
            return f"no answer within {timeout_s:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
