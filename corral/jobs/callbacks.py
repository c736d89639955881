"""Callbacks: POST a finished job's status document to its ``callback_url``.

Corral would otherwise be a machine that POSTs to any address it can reach on
behalf of anyone who may submit a job (internal services, cloud metadata
endpoints). So a ``callback_url`` must name a host in ``jobs.callback_hosts``
(an empty list refuses every callback), it is checked again at delivery (a reload
may have removed the host), and redirects are not followed (a redirect could lead
anywhere).

Delivery runs in its own tasks, never in a worker: a slow or dead receiver does not
keep a worker from the next job. Each delivery makes up to ``jobs.callback_tries``
attempts, ``jobs.callback_timeout`` each, with backoff between them; any 2xx answer
is a delivery. Its outcome is recorded in the job (``callback``). A replica that
dies while delivering does not deliver: the outcome stays ``pending``, and the
client can always poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp
import orjson

from corral import __version__
from corral.config import JobsConfig
from corral.jobs.store import CallbackState, JobRecord, JobStore, StoreError, document

log = logging.getLogger("corral.jobs")

# Deliveries in flight at once per process; more wait their turn.
MAX_CONCURRENT = 16
_MAX_BACKOFF_S = 30.0


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


def backoff_s(attempt: int) -> float:
    """1 s, 2 s, 4 s, … after the 1st, 2nd, 3rd failed attempt; at most 30 s."""
    return float(min(_MAX_BACKOFF_S, 2.0 ** (attempt - 1)))


def payload(record: JobRecord) -> bytes:
    doc = document(record)
    # The receiver is told the outcome of the job, not of its own delivery.
    doc.pop("callback", None)
    return orjson.dumps(doc)


class CallbackSender:
    def __init__(self, store: JobStore, config: Callable[[], JobsConfig]) -> None:
        self._store = store
        self._config = config
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": f"corral/{__version__}"})

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()

    def send(self, record: JobRecord) -> None:
        """Deliver in the background if the job has a callback_url."""
        if record.callback_url is None or self._session is None:
            return
        task = asyncio.get_running_loop().create_task(self._deliver(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record(self, job_id: str, state: CallbackState) -> None:
        try:
            await self._store.set_callback(job_id, state)
        except StoreError as exc:
            log.warning("job %s: could not record the callback's outcome: %s", job_id, exc)

    async def _deliver(self, record: JobRecord) -> None:
        url = record.callback_url
        assert url is not None and self._session is not None
        body = payload(record)
        await self._record(record.id, CallbackState("pending"))
        error: str | None = None
        attempts = 0
        async with self._slots:
            cfg = self._config()
            while attempts < cfg.callback_tries:
                refusal = callback_refusal(url, cfg.callback_hosts)
                if refusal is not None:
                    error = refusal
                    break
                attempts += 1
                error = await self._post(url, record.id, body, cfg.callback_timeout)
                if error is None:
                    await self._record(record.id, CallbackState("delivered", attempts))
                    return
                if attempts < cfg.callback_tries:
                    await asyncio.sleep(backoff_s(attempts))
                cfg = self._config()
        log.warning("job %s: callback not delivered after %d attempt(s): %s",
                    record.id, attempts, error)
        await self._record(record.id, CallbackState("failed", attempts, error))

    async def _post(self, url: str, job_id: str, body: bytes, timeout_s: float) -> str | None:
        """None on a 2xx answer, else what went wrong."""
        assert self._session is not None
        try:
            async with self._session.post(
                    url, data=body, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=timeout_s),
                    headers={"Content-Type": "application/json",
                             "X-Corral-Job": job_id}) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return None
                return f"the receiver answered {resp.status}"
        except TimeoutError:
            return f"no answer within {timeout_s:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
