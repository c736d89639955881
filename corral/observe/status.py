"""``/corral/status``: the fleet's state now, plus recent activity for the dashboard.

The request path only appends its access-log record to a bounded deque
(``Activity.add``). A background task started by the Gateway's lifespan folds those
records into one sample per second (``Activity.sample``) and precomputes everything
the status answer needs, so a status poll — one per second per open dashboard — only
copies small, already computed values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from statistics import median
from typing import TYPE_CHECKING, Any, Protocol

from corral import __version__
from corral.backends.backend import Backend
from corral.limits.storage.memory import MemoryLimitStore
from corral.scheduler.queues import JobQueue

if TYPE_CHECKING:
    from corral.backends.health import HealthMonitor
    from corral.config import Settings
    from corral.fleet.state import Fleet
    from corral.pipeline.admit import Admission
    from corral.scheduler.slots import Scheduler

log = logging.getLogger("corral.status")

HISTORY = 300            # one sample per second: five minutes of dashboard history
WINDOW = 60.0            # "recent" for per-backend TTFB and per-client shares (seconds)
MAX_REJECTIONS = 50
MAX_PENDING = 100_000    # records waiting for the sampler; beyond, the oldest are dropped
MAX_TTFB_PER_SECOND = 1000   # per backend: enough for a median, bounded under any load
TOP_CLIENTS = 20
# Clients one second keeps for the window's shares: the busiest (by tokens, then
# requests). A flood of distinct addresses would otherwise hold a minute of them.
MAX_CLIENTS_PER_SECOND = 500

# A limit, an authentication refusal or the queue turned the request away. A 503 only
# counts when no backend was ever assigned: a backend's own 503 is an upstream error.
_REJECTION_STATUSES = frozenset({401, 429, 503})


class FleetView(Protocol):
    """What observability reads from a Gateway (read-only)."""

    @property
    def backends(self) -> Sequence[Backend]: ...

    @property
    def queue(self) -> JobQueue: ...


class JobCounts(Protocol):
    def status(self) -> dict[str, Any]: ...


class Observed(Protocol):
    """What the status answer reads (``app.py`` wires it): the fleet and what Corral
    knows of it, the scheduler, the queue, the probes, recent activity, the jobs."""

    settings: Settings
    fleet: Fleet
    scheduler: Scheduler
    queue: JobQueue
    health: HealthMonitor
    activity: Activity
    admission: Admission
    started: float

    @property
    def jobs(self) -> JobCounts: ...


def client_id(rec: dict[str, Any]) -> str:
    """The scheduler's name for the client: the key's name, else the IP."""
    name = rec.get("client_name")
    return str(name) if name else str(rec.get("client") or "")


def is_rejection(rec: dict[str, Any]) -> bool:
    status = rec.get("status")
    if status not in _REJECTION_STATUSES:
        return False
    # The refusal names its cause: a limit rule or outcome, or an error message.
    if not (rec.get("error") or rec.get("rule") or rec.get("limit")):
        return False
    return status != 503 or rec.get("backend") is None or bool(rec.get("rule"))


@dataclass
class _Second:
    """What the records of one sample interval add up to."""

    t: float
    requests: int = 0
    rejected: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    ttfb: list[float] = field(default_factory=list)
    backend_ttfb: dict[str, list[float]] = field(default_factory=dict)
    backend_requests: dict[str, int] = field(default_factory=dict)
    client_tokens: dict[str, int] = field(default_factory=dict)
    client_requests: dict[str, int] = field(default_factory=dict)


def _keep_busiest(sec: _Second) -> None:
    tokens, reqs = sec.client_tokens, sec.client_requests
    busiest = sorted(reqs, key=lambda c: (tokens.get(c, 0), reqs[c]),
                     reverse=True)[:MAX_CLIENTS_PER_SECOND]
    sec.client_tokens = {c: tokens[c] for c in busiest if c in tokens}
    sec.client_requests = {c: reqs[c] for c in busiest}


class Activity:
    """Recent traffic: a bounded inbox filled per request, folded once per second."""

    def __init__(self, history: int = HISTORY, window: float = WINDOW,
                 interval: float = 1.0) -> None:
        self.history = history
        self.window = window
        self.interval = interval
        self._pending: deque[dict[str, Any]] = deque(maxlen=MAX_PENDING)
        self._seconds: deque[_Second] = deque()
        self._task: asyncio.Task[None] | None = None
        self._last: float | None = None
        self.series: dict[str, deque[Any]] = {
            k: deque(maxlen=self.history)
            for k in ("t", "requests_per_s", "tokens_in_per_s", "tokens_out_per_s",
                      "ttfb_p50_ms", "rejected_per_s", "queue", "in_flight")
        }
        self.rejections: deque[dict[str, Any]] = deque(maxlen=MAX_REJECTIONS)
        self.totals = {"requests": 0, "errors": 0, "rejected": 0,
                       "tokens_in": 0, "tokens_out": 0}
        # Precomputed by ``sample`` for the status answer.
        self.recent: dict[str, Any] = {}
        self.backend_recent: dict[str, dict[str, Any]] = {}
        self.client_recent: list[dict[str, Any]] = []

    # -- the request path -----------------------------------------------------------

    def add(self, rec: dict[str, Any]) -> None:
        """Hot path: one append. The record is not read or copied here."""
        self._pending.append(rec)

    # -- once per second ------------------------------------------------------------

    def sample(self, now: float, wall: float, queue_by_class: dict[str, int],
               in_flight: dict[str, int]) -> None:
        """Fold the records that arrived since the last sample (pure: clock given)."""
        dt = self.interval if self._last is None else max(now - self._last, 1e-3)
        self._last = now
        sec = _Second(now)
        requests = rejected = tokens_in = tokens_out = 0
        ttfbs: list[float] = []
        pending = self._pending
        while pending:
            rec = pending.popleft()
            requests += 1
            status = rec.get("status") or 0
            cid = client_id(rec)
            backend = rec.get("backend")
            if backend is not None:
                sec.backend_requests[backend] = sec.backend_requests.get(backend, 0) + 1
            ttfb = rec.get("ttfb_ms")
            if ttfb is not None:
                ttfbs.append(ttfb)
                if backend is not None:
                    bucket = sec.backend_ttfb.setdefault(backend, [])
                    if len(bucket) < MAX_TTFB_PER_SECOND:
                        bucket.append(ttfb)
            tin, tout = rec.get("tokens_in") or 0, rec.get("tokens_out") or 0
            tokens_in += tin
            tokens_out += tout
            sec.client_tokens[cid] = sec.client_tokens.get(cid, 0) + tin + tout
            sec.client_requests[cid] = sec.client_requests.get(cid, 0) + 1
            if status >= 500:
                self.totals["errors"] += 1
            if is_rejection(rec):
                rejected += 1
                self.rejections.appendleft({
                    "time": rec.get("time"), "client": cid, "rule": rec.get("rule"),
                    "limit": rec.get("limit"), "path": rec.get("path"), "status": status,
                    "error": rec.get("error"),
                })
        if len(sec.client_requests) > MAX_CLIENTS_PER_SECOND:
            _keep_busiest(sec)
        self.totals["requests"] += requests
        self.totals["rejected"] += rejected
        self.totals["tokens_in"] += tokens_in
        self.totals["tokens_out"] += tokens_out

        s = self.series
        s["t"].append(round(wall, 3))
        s["requests_per_s"].append(round(requests / dt, 3))
        s["tokens_in_per_s"].append(round(tokens_in / dt, 1))
        s["tokens_out_per_s"].append(round(tokens_out / dt, 1))
        s["ttfb_p50_ms"].append(round(median(ttfbs), 1) if ttfbs else None)
        s["rejected_per_s"].append(round(rejected / dt, 3))
        s["queue"].append(dict(queue_by_class))
        s["in_flight"].append(dict(in_flight))

        sec.requests, sec.rejected = requests, rejected
        sec.tokens_in, sec.tokens_out = tokens_in, tokens_out
        sec.ttfb = ttfbs[:MAX_TTFB_PER_SECOND]
        self._seconds.append(sec)
        while self._seconds and self._seconds[0].t <= now - self.window:
            self._seconds.popleft()
        self._summarize()

    def _summarize(self) -> None:
        all_ttfb: list[float] = []
        ttfb: dict[str, list[float]] = {}
        per_backend: dict[str, int] = {}
        tokens: dict[str, int] = {}
        reqs: dict[str, int] = {}
        for sec in self._seconds:
            all_ttfb.extend(sec.ttfb)
            for name, values in sec.backend_ttfb.items():
                ttfb.setdefault(name, []).extend(values)
            _add_into(per_backend, sec.backend_requests)
            _add_into(tokens, sec.client_tokens)
            _add_into(reqs, sec.client_requests)
        seconds = self._seconds
        self.recent = {
            "window_s": self.window,
            "requests": sum(s.requests for s in seconds),
            "rejected": sum(s.rejected for s in seconds),
            "tokens_in": sum(s.tokens_in for s in seconds),
            "tokens_out": sum(s.tokens_out for s in seconds),
            "ttfb_p50_ms": round(median(all_ttfb), 1) if all_ttfb else None,
        }
        self.backend_recent = {
            name: {"requests": per_backend.get(name, 0),
                   "ttfb_p50_ms": round(median(ttfb[name]), 1) if ttfb.get(name) else None}
            for name in per_backend.keys() | ttfb.keys()
        }
        total = sum(tokens.values())
        ranked = sorted(reqs, key=lambda c: (tokens.get(c, 0), reqs[c]), reverse=True)
        self.client_recent = [
            {"name": c, "tokens": tokens.get(c, 0), "requests": reqs[c],
             "share": round(tokens.get(c, 0) / total, 4) if total else 0.0}
            for c in ranked[:TOP_CLIENTS]
        ]

    def series_json(self) -> dict[str, list[Any]]:
        return {k: list(v) for k, v in self.series.items()}

    # -- lifespan -------------------------------------------------------------------

    def start(self, fleet: FleetView,
              clock: Callable[[], float] = time.monotonic) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(fleet, clock))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, fleet: FleetView, clock: Callable[[], float]) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.sample(clock(), time.time(), fleet.queue.depth_by_class(),
                            {b.name: b.in_flight for b in fleet.backends})
            except Exception:
                # A malformed record must not end the status history for good.
                log.exception("status sampling failed")


def _add_into(total: dict[str, int], part: dict[str, int]) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0) + v


def clients_status(activity: Activity, counters: dict[str, float],
                   waiting: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Clients served recently (by tokens), each with its fair-share counter.

    ``counters`` are the scheduler's virtual token counters: service received divided
    by weight. Clients only waiting (nothing served in the window yet) are listed too,
    so a starved client is visible.
    """
    out = [dict(c, counter=round(counters.get(c["name"], 0.0), 1))
           for c in activity.client_recent]
    listed = {c["name"] for c in out}
    for name in waiting:
        if name not in listed and len(out) < TOP_CLIENTS:
            listed.add(name)
            out.append({"name": name, "tokens": 0, "requests": 0, "share": 0.0,
                        "counter": round(counters.get(name, 0.0), 1)})
    return out


def fleet_status(gw: Observed) -> dict[str, Any]:
    """Backends (slots, health, what each holds), the models' figures, the
    scheduler's counts and the queue: the state now, read without awaiting."""
    now = time.monotonic()
    known = gw.fleet.snapshot(now)
    held: dict[str, Any] = known["backends"]  # type: ignore[assignment]
    sched = gw.scheduler
    states = gw.health.states if gw.health is not None else {}
    return {
        "version": __version__,
        "uptime_s": round(time.time() - gw.started, 1),
        "backends": [
            {
                "name": b.name, "url": b.url, "up": b.up, "routable": b.routable(now),
                "draining": b.draining, "slots": b.max_concurrency,
                "in_flight": b.in_flight, "models": sorted(b.models),
                "loaded": sorted(b.loaded),
                "last_error": states[b.name].last_error if b.name in states else None,
                **held.get(b.name, {}),
                "rent_s": round(sched.rent.accrued(b), 3),
            }
            for b in gw.fleet.backends
        ],
        "models": known["models"],
        "scheduler": {"dispatched": sched.dispatched, "loads": sched.loads,
                      "preemptions": sched.preemptions,
                      "default_load_time_s": known["default_load_time_s"],
                      "max_preemptions": sched.max_preemptions},
        "queue": {"depth": len(gw.queue), "by_class": gw.queue.depth_by_class(),
                  "max_depth": gw.settings.queue.max_depth},
    }


def build_status(gw: Observed) -> dict[str, Any]:
    """``fleet_status`` plus health details, recent latency, client shares, recent
    rejections and the dashboard's time series."""
    status = fleet_status(gw)
    activity = gw.activity
    by_name = {b.name: b for b in gw.fleet.backends}
    states = gw.health.states if gw.health is not None else {}
    for entry in status["backends"]:
        backend = by_name.get(entry["name"])
        recent = activity.backend_recent.get(entry["name"], {})
        entry["requests_1m"] = recent.get("requests", 0)
        entry["ttfb_p50_ms_1m"] = recent.get("ttfb_p50_ms")
        if backend is not None:
            entry["breaker"] = backend.breaker.state.value
        state = states.get(entry["name"])
        if backend is not None:
            entry["vram_bytes"] = backend.vram_bytes
        if state is not None:
            entry["loaded_detail"] = [
                {"name": m.get("name"), "size_vram": m.get("size_vram"),
                 "expires_at": m.get("expires_at")} for m in state.ps]
            entry["last_probe"] = round(state.last_probe, 3) if state.last_probe else None
            entry["probe_latency_ms"] = (round(state.latency * 1000, 1)
                                         if state.latency is not None else None)
    status["queue"]["max_wait_s"] = gw.settings.queue.max_wait
    # ``ordered`` walks every waiting job (bounded by queue.max_depth), once per
    # status poll and never on the request path.
    waiting = {job.client for job in gw.queue.ordered()}
    status["clients"] = clients_status(activity, gw.queue.counters, sorted(waiting))
    # Per-client state held now: it follows the clients of the recent past
    # (queue.forget_idle), however many addresses have ever called.
    store = gw.admission.store
    status["remembered"] = {
        "fair_share_clients": len(gw.queue.counters),
        "limit_keys": store.key_count() if isinstance(store, MemoryLimitStore) else None,
        "forget_idle_s": gw.settings.queue.forget_idle}
    status["rejections"] = list(activity.rejections)
    status["totals"] = dict(activity.totals)
    status["recent"] = dict(activity.recent)
    status["series"] = activity.series_json()
    status["jobs"] = gw.jobs.status()
    shared = gw.scheduler.replication()
    if shared is not None:
        status["shared"] = shared       # several replicas on one state store
    ledger = getattr(gw, "ledger", None)
    if ledger is not None:
        status["usage"] = ledger.status()
    certs = getattr(gw, "certs", None)
    if certs is not None:
        info = certs.info
        status["tls"] = {"subject": info.subject, "names": list(info.names),
                         "not_after": info.not_after.isoformat(),
                         "min_version": certs.cfg.min_version}
    return status
