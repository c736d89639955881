"""Scheduler of the stand-in: installed models, loaded runners, slots, stats.

Mirrors Ollama's server/sched.go: a request for a loaded model skips the
queue and waits FIFO on that runner's slots (never a 503); any other request
goes through one pending queue of bounded size, served by a single task that
loads one model at a time and evicts idle runners at the loaded-model limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from corral.simulate.config import FAULT_MODES, SimConfig
from corral.simulate.durations import FOREVER, MAX_DURATION_NS
from corral.simulate.models import ModelInfo, lookup_catalogue, normalise


class Busy(Exception):
    """The pending queue is full: Ollama answers 503."""


# Episodes kept at most: a gateway that over-grants all the time needs no longer list
# to show it, and a stand-in left running must not grow without bound.
MAX_EPISODES = 1000


@dataclass
class OverSlots:
    """A stretch of time during which more inference requests were open at once than
    the stand-in has slots: what a gateway that over-granted them would cause. The
    extra ones wait for a slot here, as at Ollama; ``ids`` are the run ids (the
    ``X-Sim-Run-Id`` header) of the requests open at the peak, so that a harness can
    tell whose they were."""

    start: float  # wall-clock seconds (time.time()), comparable across processes
    peak: int
    ids: list[str]
    end: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "peak": self.peak, "ids": self.ids}


@dataclass
class Stats:
    in_flight: int = 0  # inference requests holding a slot
    waiting: int = 0  # inference requests waiting for a slot or a load
    max_in_flight: int = 0
    max_concurrent: int = 0  # most inference requests open at once
    requests: dict[str, int] = field(default_factory=dict)
    completed: int = 0
    cancelled: int = 0  # the client went away first
    dropped: int = 0  # connection cut by the drop fault
    rejected: int = 0  # 503 queue full
    loads: int = 0
    evictions: int = 0  # unloaded to make room or for a reload
    unloads: int = 0  # expired or keep_alive 0
    # Slot-seconds spent running requests (generation and prompt processing; a load
    # is not busy time), kept as closed time plus the start times of open slots so
    # that the figure at any instant costs O(1): closed + in_flight × now − Σ starts.
    busy_closed: float = 0.0
    busy_starts: float = 0.0
    # Runs per run id (the X-Sim-Run-Id header; requests without it are not counted):
    # an id seen twice is a request the gateway sent twice.
    runs: dict[str, int] = field(default_factory=dict)
    open_ids: dict[str, int] = field(default_factory=dict)
    over_slots: list[OverSlots] = field(default_factory=list)
    over_slots_dropped: int = 0  # episodes beyond MAX_EPISODES, counted only

    def busy_seconds(self, now: float | None = None) -> float:
        t = time.monotonic() if now is None else now
        return self.busy_closed + self.in_flight * t - self.busy_starts

    def reset(self) -> None:
        # Gauges describe requests still open, so they survive; maxima restart from them.
        self.max_in_flight = self.in_flight
        self.max_concurrent = self.in_flight + self.waiting
        self.requests = {}
        self.completed = self.cancelled = self.dropped = self.rejected = 0
        self.loads = self.evictions = self.unloads = 0
        # Busy time restarts at zero; open slots count from now on. (A slot closed
        # later subtracts its true start from both terms, which cancels out.)
        self.busy_closed = 0.0
        self.busy_starts = self.in_flight * time.monotonic()
        # Ids still open stay open (their close must find them); the record restarts.
        self.runs = {}
        self.over_slots = []
        self.over_slots_dropped = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "max_in_flight": self.max_in_flight,
            "max_concurrent": self.max_concurrent,
            "requests": dict(self.requests),
            "completed": self.completed,
            "cancelled": self.cancelled,
            "dropped": self.dropped,
            "rejected": self.rejected,
            "loads": self.loads,
            "evictions": self.evictions,
            "unloads": self.unloads,
            "busy_seconds": round(self.busy_seconds(), 6),
            "run_ids": len(self.runs),
            "runs_repeated": {k: n for k, n in self.runs.items() if n > 1},
            "over_slots": [e.as_dict() for e in self.over_slots],
            "over_slots_dropped": self.over_slots_dropped,
        }

    def opened(self, run_id: str | None, slots: int) -> None:
        """A request arrived (``waiting`` already counts it)."""
        if run_id is not None:
            self.runs[run_id] = self.runs.get(run_id, 0) + 1
            self.open_ids[run_id] = self.open_ids.get(run_id, 0) + 1
        open_now = self.waiting + self.in_flight
        if open_now > self.max_concurrent:
            self.max_concurrent = open_now
        if open_now <= slots:
            return
        episode = self.over_slots[-1] if self.over_slots else None
        if episode is not None and episode.end is None:
            if open_now > episode.peak:
                episode.peak = open_now
                episode.ids = sorted(self.open_ids)
        elif len(self.over_slots) < MAX_EPISODES:
            self.over_slots.append(OverSlots(time.time(), open_now, sorted(self.open_ids)))
        else:
            self.over_slots_dropped += 1

    def closed(self, run_id: str | None, slots: int) -> None:
        """A request ended (``waiting`` or ``in_flight`` already dropped it)."""
        if run_id is not None:
            left = self.open_ids.pop(run_id, 0) - 1
            if left > 0:
                self.open_ids[run_id] = left
        episode = self.over_slots[-1] if self.over_slots else None
        if (episode is not None and episode.end is None
                and self.waiting + self.in_flight <= slots):
            episode.end = time.time()


class Runner:
    """One loaded (or loading) model."""

    __slots__ = (
        "duration",
        "evicting",
        "expires_mono",
        "expires_wall_ns",
        "idle",
        "info",
        "last_used",
        "num_ctx",
        "parallel",
        "ready",
        "ref_count",
        "slots",
    )

    def __init__(self, info: ModelInfo, num_ctx: int, parallel: int, duration: float) -> None:
        self.info = info
        self.num_ctx = num_ctx
        self.parallel = parallel
        # asyncio.Semaphore wakes waiters in arrival order, like Go's semaphore.Weighted.
        self.slots = asyncio.Semaphore(parallel)
        self.ref_count = 0
        self.duration = duration  # keep_alive in seconds, FOREVER for never
        self.expires_mono = math.inf
        self.expires_wall_ns = 0
        self.ready = asyncio.Event()
        self.idle = asyncio.Event()
        self.evicting = False
        self.last_used = time.monotonic()

    def expires_at_ns(self) -> int:
        """expires_at for /api/ps: set when idle; busy or loading ones get now + duration."""
        if self.ref_count == 0 and self.ready.is_set():
            return self.expires_wall_ns
        return _deadline_wall_ns(self.duration)


def _deadline_wall_ns(duration: float) -> int:
    now = time.time_ns()
    if duration == FOREVER:
        return now + MAX_DURATION_NS
    return now + int(duration * 1e9)


@dataclass
class _Pending:
    info: ModelInfo
    keep_alive: float | None
    num_ctx: int
    fut: asyncio.Future[Runner]


@dataclass
class Installed:
    info: ModelInfo
    modified_ns: int


class SimEngine:
    """All mutable state of one stand-in server."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.stats = Stats()
        self.fault = cfg.fault
        self.drop_after = cfg.drop_after
        self.installed: dict[str, Installed] = {}
        self.runners: dict[str, Runner] = {}
        self.blobs: set[str] = set()
        self._pending: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        # Listed newest first by /api/tags, so give the configured order descending times.
        now = time.time_ns()
        for i, name in enumerate(dict.fromkeys((*cfg.models, *cfg.loaded))):
            self.install(name, now - i * 1_000_000_000)
        for name in cfg.loaded:
            info = self.installed[normalise(name)].info
            r = Runner(info, self._clamp_ctx(info, cfg.num_ctx), self._parallel(info),
                       cfg.keep_alive)
            r.ready.set()
            self._make_idle(r)
            self.runners[info.name] = r

    # ----- installed models -------------------------------------------------

    def find(self, name: str) -> ModelInfo | None:
        entry = self.installed.get(normalise(name))
        return entry.info if entry is not None else None

    def install(self, name: str, modified_ns: int | None = None) -> ModelInfo:
        info = lookup_catalogue(name)
        self.installed[info.name] = Installed(info, modified_ns or time.time_ns())
        self.blobs.add("sha256:" + info.digest)
        return info

    def remove(self, name: str) -> bool:
        return self.installed.pop(normalise(name), None) is not None

    # ----- faults -------------------------------------------------------------

    def set_fault(self, mode: str, drop_after: int | None = None) -> None:
        if mode not in FAULT_MODES:
            raise ValueError(f"mode must be one of {', '.join(FAULT_MODES)}")
        self.fault = mode
        if drop_after is not None:
            self.drop_after = drop_after

    # ----- runners ------------------------------------------------------------

    def _parallel(self, info: ModelInfo) -> int:
        # Ollama forces one slot for embedding models.
        return 1 if info.embedding_only else self.cfg.parallel

    @staticmethod
    def _clamp_ctx(info: ModelInfo, num_ctx: int) -> int:
        return max(4, min(num_ctx, info.context_length))

    def resolve_ctx(self, info: ModelInfo, requested: int | None) -> int:
        return self._clamp_ctx(info, self.cfg.num_ctx if requested is None else requested)

    def reap(self) -> None:
        """Drop idle runners whose keep_alive ran out (checked lazily, not on a timer)."""
        now = time.monotonic()
        for name, r in list(self.runners.items()):
            if r.ref_count == 0 and r.expires_mono <= now and r.ready.is_set():
                del self.runners[name]
                self.stats.unloads += 1

    def loaded(self) -> list[Runner]:
        self.reap()
        return list(self.runners.values())

    def expire(self, info: ModelInfo) -> None:
        """keep_alive 0 with an empty prompt: unload now, or as soon as idle."""
        r = self.runners.get(info.name)
        if r is None:
            return
        r.duration = 0.0
        if r.ref_count == 0 and r.ready.is_set() and not r.evicting:
            del self.runners[info.name]
            self.stats.unloads += 1

    def _make_idle(self, r: Runner) -> None:
        r.idle.set()
        r.last_used = time.monotonic()
        r.expires_mono = r.last_used + r.duration
        r.expires_wall_ns = _deadline_wall_ns(r.duration)

    def unref(self, r: Runner) -> None:
        r.ref_count -= 1
        if r.ref_count > 0:
            return
        self._make_idle(r)
        if r.duration == 0 and not r.evicting and self.runners.get(r.info.name) is r:
            del self.runners[r.info.name]
            self.stats.unloads += 1

    async def lease(self, info: ModelInfo, keep_alive: float | None, num_ctx: int) -> Runner:
        """Return a ready runner for the model with a reference held; release with unref()."""
        self.reap()
        r = self.runners.get(info.name)
        if r is not None and not r.evicting and r.num_ctx == num_ctx:
            # Already loaded (or loading): skip the queue, as useLoadedRunner does.
            r.ref_count += 1
            r.idle.clear()
            if keep_alive is not None:
                r.duration = keep_alive  # sticky: only requests that send it change it
            if not r.ready.is_set():
                try:
                    await r.ready.wait()
                except asyncio.CancelledError:
                    self.unref(r)
                    raise
            return r
        if len(self._pending) >= self.cfg.max_queue:
            self.stats.rejected += 1
            raise Busy
        fut: asyncio.Future[Runner] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(info, keep_alive, num_ctx, fut))
        self._wake.set()
        if self._scheduler is None:
            self._scheduler = asyncio.create_task(self._schedule())
        try:
            return await fut
        except asyncio.CancelledError:
            # The scheduler may have handed us a runner just as we were cancelled.
            if fut.done() and not fut.cancelled():
                self.unref(fut.result())
            fut.cancel()
            raise

    async def _schedule(self) -> None:
        # One task serves the queue FIFO across all models, one load at a time
        # (processPending); a slow load therefore delays every unloaded model.
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            p = self._pending.popleft()
            if p.fut.done():
                continue  # the client left while queued
            r = await self._runner_for(p)
            if p.fut.done():
                self.unref(r)
            else:
                p.fut.set_result(r)

    async def _runner_for(self, p: _Pending) -> Runner:
        self.reap()
        r = self.runners.get(p.info.name)
        if r is not None and not r.evicting:
            if r.num_ctx == p.num_ctx:
                r.ref_count += 1
                r.idle.clear()
                if p.keep_alive is not None:
                    r.duration = p.keep_alive
                return r
            await self._evict(r)  # options such as num_ctx changed: full reload
        while len(self.runners) >= self.cfg.max_loaded_models:
            await self._evict(self._victim())
            self.reap()
        duration = self.cfg.keep_alive if p.keep_alive is None else p.keep_alive
        r = Runner(p.info, p.num_ctx, self._parallel(p.info), duration)
        r.ref_count = 1
        # Visible while loading so later requests for the model wait on it, not the queue.
        self.runners[p.info.name] = r
        if self.cfg.load_time > 0:
            await asyncio.sleep(self.cfg.load_time)
        self.stats.loads += 1
        r.ready.set()
        return r

    def _victim(self) -> Runner:
        # Ollama sorts by configured keep_alive, then by model path; the path is
        # arbitrary, so least recently used breaks ties here. Idle ones first.
        ordered = sorted(self.runners.values(), key=lambda r: (r.duration, r.last_used))
        for r in ordered:
            if r.ref_count == 0:
                return r
        return ordered[0]

    async def _evict(self, r: Runner) -> None:
        # Requests already using it finish; new ones queue behind this load.
        r.evicting = True
        r.duration = 0.0
        if r.ref_count > 0:
            await r.idle.wait()
        if self.runners.get(r.info.name) is r:
            del self.runners[r.info.name]
        self.stats.evictions += 1

    async def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
            self._scheduler = None
        for p in self._pending:
            p.fut.cancel()
        self._pending.clear()


class Ticket:
    """One inference request's passage through the scheduler, kept in the stats."""

    __slots__ = ("_engine", "_has_slot", "_open", "_slot_since", "run_id", "runner")

    def __init__(self, engine: SimEngine, run_id: str | None = None) -> None:
        self._engine = engine
        self.runner: Runner | None = None
        self.run_id = run_id
        self._has_slot = False
        self._slot_since = 0.0
        self._open = True
        s = engine.stats
        s.waiting += 1
        s.opened(run_id, engine.cfg.parallel)

    async def load(self, info: ModelInfo, keep_alive: float | None, num_ctx: int) -> None:
        self.runner = await self._engine.lease(info, keep_alive, num_ctx)

    async def slot(self) -> None:
        assert self.runner is not None
        await self.runner.slots.acquire()
        self._has_slot = True
        self._slot_since = time.monotonic()
        s = self._engine.stats
        s.waiting -= 1
        s.in_flight += 1
        s.busy_starts += self._slot_since
        if s.in_flight > s.max_in_flight:
            s.max_in_flight = s.in_flight

    def close(self, outcome: str | None) -> None:
        """Free the slot and the runner; outcome is a Stats counter name or None."""
        if not self._open:
            return  # idempotent so error paths may close defensively
        self._open = False
        s = self._engine.stats
        if self._has_slot:
            self._has_slot = False
            s.in_flight -= 1
            s.busy_starts -= self._slot_since
            s.busy_closed += time.monotonic() - self._slot_since
            assert self.runner is not None
            self.runner.slots.release()
        else:
            s.waiting -= 1
        s.closed(self.run_id, self._engine.cfg.parallel)
        if self.runner is not None:
            self._engine.unref(self.runner)
            self.runner = None
        if outcome == "completed":
            s.completed += 1
        elif outcome == "cancelled":
            s.cancelled += 1
        elif outcome == "dropped":
            s.dropped += 1
