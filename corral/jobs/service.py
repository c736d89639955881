"""``JobService``: the job store, the workers and the callbacks of one Gateway.

Created with the Gateway and started and stopped by its lifespan. The store follows
``state``: in memory, or in Redis, shared by every replica (a job submitted to one
replica may run on another). Settings under ``jobs:`` are read when used, so a
reload applies them, except ``jobs.workers``: the number of worker tasks is fixed
at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable
from typing import Any

from corral.config import JobsConfig, Settings
from corral.jobs.api import Submission
from corral.jobs.callbacks import CallbackSender
from corral.jobs.memory import MemoryJobStore
from corral.jobs.redis import RedisJobStore
from corral.jobs.store import Bounds, JobRecord, JobStatus, JobStore, NewJob, StoreError
from corral.jobs.worker import Workers
from corral.pipeline.identify import Client
from corral.scheduler.queues import Priority


def make_store(settings: Settings) -> JobStore:
    if settings.state == "memory":
        return MemoryJobStore()
    return RedisJobStore.from_url(settings.state)


def own_url(settings: Settings) -> str:
    """Where this process can reach itself: a plain listener if there is one (no
    handshake per job), a wildcard address on loopback."""
    listeners = settings.listeners
    return next((x for x in listeners if not x.tls), listeners[0]).url


class JobService:
    def __init__(self, settings: Callable[[], Settings],
                 priority_of: Callable[[str], Priority]) -> None:
        """``settings`` gives the running settings (a reload swaps them);
        ``priority_of`` a tier's priority class."""
        self.settings = settings
        self.priority_of = priority_of
        self.store = make_store(settings())
        self.callbacks = CallbackSender(self.store, self.config)
        self.workers = Workers(self.store, self.config,
                               own_url(settings()),
                               lambda: self.settings().max_body_size, self.callbacks.send)
        self._counts: dict[str, int] | None = None
        self._counter: asyncio.Task[None] | None = None

    def config(self) -> JobsConfig:
        return self.settings().jobs

    async def start(self) -> None:
        self.callbacks.start()
        self.workers.start(self.config().workers)
        self._counter = asyncio.get_running_loop().create_task(self._count())

    async def stop(self) -> None:
        if self._counter is not None:
            self._counter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._counter
        await self.workers.stop()
        await self.callbacks.stop()
        await self.store.close()

    async def submit(self, client: Client, sub: Submission,
                     creds: tuple[tuple[str, str], ...]) -> JobRecord:
        cfg = self.config()
        priority = self.priority_of(client.tier)
        job = NewJob(id=secrets.token_hex(16), owner=client.name, priority=int(priority),
                     endpoint=sub.endpoint, model=sub.model, body=sub.body,
                     credentials=creds, client_ip=client.ip, callback_url=sub.callback_url,
                     delivery_id=secrets.token_hex(16) if sub.callback_url else "")
        record = await self.store.submit(job, Bounds(cfg.max_queued, cfg.max_queued_per_client))
        self.workers.wake()
        return record

    async def cancel(self, job_id: str) -> tuple[JobStatus, JobRecord] | None:
        outcome = await self.store.cancel(job_id, int(self.config().ttl * 1000))
        if outcome is not None and not outcome[0].finished:
            if outcome[0] is JobStatus.RUNNING:
                self.workers.abort(job_id)
            self.callbacks.send(outcome[1])
        return outcome

    def status(self) -> dict[str, Any]:
        """For ``/corral/status``: counts as of the last poll of the store (never a
        store call on the status path)."""
        return {"workers": self.workers.size, "busy_workers": self.workers.busy,
                **(self._counts or {"queued": None, "running": None})}

    async def _count(self) -> None:
        while True:
            try:
                self._counts = await self.store.counts()
            except StoreError:
                self._counts = None
            await asyncio.sleep(self.config().poll_interval)
