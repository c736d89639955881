"""Every Prometheus metric Corral exports, defined once.

Each Gateway has its own ``CollectorRegistry`` so several gateways in one process
(tests, the demo) never collide. Two sources feed it:

- per request, ``observe_request`` derives everything from the access-log record the
  pipeline builds anyway: one call, a handful of label lookups, no extra clock reads;
- fleet gauges (backend up, slots, in-flight, loaded models, queue depth, what the
  scheduler learned) are read from the fleet's state by a collector when Prometheus
  scrapes: zero cost per request.

Every label value is bounded: routes are Corral's known routes or ``other``; clients
are configured key names or ``anonymous`` (never an IP); models are ones some backend
has, or ``other``; tiers, rules and backends come from the configuration.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from corral import __version__
from corral.backends.backend import normalize_model
from corral.observe.status import Activity, FleetView
from corral.pipeline.inference import INFERENCE_PATHS
from corral.scheduler.queues import Job, Priority

if TYPE_CHECKING:
    from corral.fleet.state import Fleet

# From a few milliseconds (a warm embedding) to ten minutes (a long generation, or a
# cold load of a large model before the first token).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                   30.0, 60.0, 120.0, 300.0, 600.0)
# Waiting for a slot: zero when a slot is free, up to queue.max_wait otherwise.
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                 60.0, 120.0, 300.0)

KNOWN_ROUTES = INFERENCE_PATHS | frozenset({
    "/", "/api/version", "/api/tags", "/api/ps", "/api/show", "/api/push", "/api/pull",
    "/api/create", "/api/copy", "/api/delete", "/v1/models",
})

# store_error: the limit state could not be read (fail open or closed, as configured).
LIMIT_OUTCOMES = frozenset({"passed", "delayed", "rejected", "dry_run_rejected",
                            "dry_run_delayed", "store_error"})
# nginx spells the dry-run outcomes the other way round ($limit_req_status).
_OUTCOME_ALIASES = {"rejected_dry_run": "dry_run_rejected",
                    "delayed_dry_run": "dry_run_delayed"}

ANONYMOUS = "anonymous"
OTHER = "other"


def route_label(path: str) -> str:
    return path if path in KNOWN_ROUTES else OTHER


def client_label(key_name: str | None) -> str:
    """Only configured keys get their own series; IPs would be unbounded."""
    return key_name if key_name else ANONYMOUS


def outcome_label(outcome: str) -> str:
    value = str(outcome).lower()
    value = _OUTCOME_ALIASES.get(value, value)
    return value if value in LIMIT_OUTCOMES else OTHER


def priority_label(priority: Priority | str) -> str:
    return priority.name.lower() if isinstance(priority, Priority) else str(priority)


_M = TypeVar("_M", Counter, Histogram)


class _Children(Generic[_M]):
    """``labels()`` validates and takes a lock on every call; a child never changes, so
    each label combination is looked up once and kept (bounded: every label is)."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: _M) -> None:
        self._metric: _M = metric
        self._children: dict[tuple[str, ...], _M] = {}

    def __call__(self, *values: str) -> _M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    def __init__(self, fleet: FleetView, activity: Activity | None = None) -> None:
        self.fleet = fleet
        self.activity = activity
        # ``*_created`` samples would double the series of every counter and histogram
        # and tell Prometheus nothing the process start time does not.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "corral_requests", "Inference requests answered, by route, status and tier.",
            ["route", "status", "tier"], registry=r)
        self.duration = Histogram(
            "corral_request_duration_seconds",
            "Time from the request's arrival to the end of its answer.",
            ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttfb = Histogram(
            "corral_time_to_first_byte_seconds",
            "Time from the request's arrival to the first byte of the backend's answer.",
            ["route", "backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "corral_queue_wait_seconds",
            "Time a request waited in Corral's queue for a backend slot.",
            ["priority"], buckets=QUEUE_BUCKETS, registry=r)
        self.limit_decisions = Counter(
            "corral_limit_decisions", "Rate-limit decisions, by rule and outcome.",
            ["rule", "outcome"], registry=r)
        self.upstream_errors = Counter(
            "corral_upstream_errors",
            "Failed requests to a backend, by kind (error, timeout, mid-stream or a "
            "retryable HTTP status).", ["backend", "kind"], registry=r)
        self.retries = Counter(
            "corral_retries", "Requests retried on another backend after this one failed.",
            ["backend"], registry=r)
        self.tokens = Counter(
            "corral_tokens", "Tokens processed (in: prompt, out: generated), by client "
                             "(configured key name, else anonymous) and model.",
            ["client", "model", "direction"], registry=r)
        self.preemptions = Counter(
            "corral_preemptions", "Requests stopped before any byte reached their client to "
            "give their slot to a higher class (each reruns in full), by the tier stopped.",
            ["tier"], registry=r)
        self.preempted_tokens = Counter(
            "corral_preempted_tokens", "Tokens generated by preempted runs and thrown away "
            "(estimated from the time they ran and the model's decode speed).",
            ["model"], registry=r)
        self.model_loads = Counter(
            "corral_model_loads", "Requests Corral sent to a backend where their model was "
            "not resident (a load), by backend and model.", ["backend", "model"], registry=r)
        r.register(FleetCollector(fleet))
        self._requests = _Children(self.requests)
        self._duration = _Children(self.duration)
        self._ttfb = _Children(self.ttfb)
        self._queue_wait = _Children(self.queue_wait)
        self._tokens = _Children(self.tokens)

    # -- per request (hot path) -----------------------------------------------------

    def observe_request(self, rec: dict[str, Any], priority: Priority | str) -> None:
        """Everything a finished request contributes, from its access-log record."""
        route = route_label(rec["path"])
        self._requests(route, str(rec["status"]), rec["tier"]).inc()
        self._duration(route).observe(rec["duration_ms"] / 1000)
        backend = rec.get("backend")
        ttfb = rec.get("ttfb_ms")
        if ttfb is not None:
            self._ttfb(route, backend or "none").observe(ttfb / 1000)
        wait = rec.get("queue_wait_ms")
        # Only requests that reached the queue: a 400 or 404 never waited for a slot.
        if backend is not None or wait:
            self._queue_wait(priority_label(priority)).observe((wait or 0.0) / 1000)
        if rec.get("placement") == "load" and backend is not None:
            self.model_loads.labels(backend, self.model_label(rec.get("model"))).inc()
        tokens_in, tokens_out = rec.get("tokens_in"), rec.get("tokens_out")
        if tokens_in or tokens_out:
            client = client_label(rec.get("client_name"))
            model = self.model_label(rec.get("model"))
            if tokens_in:
                self._tokens(client, model, "in").inc(tokens_in)
            if tokens_out:
                self._tokens(client, model, "out").inc(tokens_out)
        if self.activity is not None:
            self.activity.add(rec)

    def model_label(self, model: str | None) -> str:
        """A model some backend has (normalised as Ollama does), else ``other``: what
        clients send is free text and must not create series."""
        if not model:
            return OTHER
        name = normalize_model(model)
        return name if any(name in b.models for b in self.fleet.backends) else OTHER

    # -- called by the other parts of the pipeline -----------------------------------

    def limit_decision(self, rule: str, outcome: str) -> None:
        """``outcome``: passed, delayed, rejected, dry_run_rejected, dry_run_delayed
        (nginx's ``PASSED``… spellings are accepted too)."""
        self.limit_decisions.labels(rule, outcome_label(outcome)).inc()

    def upstream_error(self, backend: str, kind: str) -> None:
        self.upstream_errors.labels(backend, kind).inc()

    def retry(self, backend: str) -> None:
        self.retries.labels(backend).inc()

    def preempted(self, job: Job, thrown_tokens: float) -> None:
        """The scheduler stopped ``job`` for a higher class (its tier is configured)."""
        self.preemptions.labels(job.tier or OTHER).inc()
        if thrown_tokens > 0:
            self.preempted_tokens.labels(self.model_label(job.model)).inc(thrown_tokens)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The registry in the format the scraper asked for, and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class FleetCollector(Collector):
    """Gauges read from the Gateway's state at scrape time."""

    def __init__(self, fleet: FleetView) -> None:
        self.fleet = fleet

    def describe(self) -> Iterable[Metric]:
        # Nothing to check against other collectors: these names are only made here.
        return []

    def collect(self) -> Iterable[Metric]:
        now = time.monotonic()
        info = InfoMetricFamily("corral", "Corral's version.")
        info.add_metric([], {"version": __version__})
        up = GaugeMetricFamily("corral_backend_up",
                               "1 when the backend's health probes pass.", labels=["backend"])
        routable = GaugeMetricFamily(
            "corral_backend_routable", "1 when new requests may go to the backend (up, "
            "not draining, passive-health breaker closed).", labels=["backend"])
        in_flight = GaugeMetricFamily("corral_backend_in_flight",
                                      "Requests running on the backend.", labels=["backend"])
        slots = GaugeMetricFamily("corral_backend_slots",
                                  "Requests the backend may run at once (max_concurrency).",
                                  labels=["backend"])
        models = GaugeMetricFamily("corral_backend_models",
                                   "Models installed on the backend.", labels=["backend"])
        loaded = GaugeMetricFamily("corral_backend_loaded_models",
                                   "Models resident in the backend's memory.",
                                   labels=["backend"])
        vram = GaugeMetricFamily("corral_backend_vram_bytes",
                                 "GPU memory taken by the resident models (/api/ps).",
                                 labels=["backend"])
        model_loaded = GaugeMetricFamily(
            "corral_backend_model_loaded",
            "1 when the model is resident on the backend, 0 when only installed.",
            labels=["backend", "model"])
        for b in self.fleet.backends:
            up.add_metric([b.name], 1 if b.up else 0)
            routable.add_metric([b.name], 1 if b.routable(now) else 0)
            in_flight.add_metric([b.name], b.in_flight)
            slots.add_metric([b.name], b.max_concurrency)
            models.add_metric([b.name], len(b.models))
            loaded.add_metric([b.name], len(b.loaded))
            vram.add_metric([b.name], b.vram_bytes)
            for m in sorted(b.models | b.loaded):
                model_loaded.add_metric([b.name, m], 1 if m in b.loaded else 0)
        depth = GaugeMetricFamily("corral_queue_depth",
                                  "Requests waiting for a backend slot, by priority class.",
                                  labels=["priority"])
        for cls, n in self.fleet.queue.depth_by_class().items():
            depth.add_metric([cls], n)
        jobs = GaugeMetricFamily("corral_jobs", "Batch jobs by state (queued and running "
                                 "as last counted in the job store; busy workers here).",
                                 labels=["state"])
        service = getattr(self.fleet, "jobs", None)     # absent in a bare fleet view
        counts: dict[str, Any] = service.status() if service is not None else {}
        for state, key in (("queued", "queued"), ("running", "running"),
                           ("worker_busy", "busy_workers")):
            value = counts.get(key)
            if isinstance(value, int):
                jobs.add_metric([state], value)
        return [info, up, routable, in_flight, slots, models, loaded, vram, model_loaded,
                depth, jobs, *self._knowledge(now), *self._replication(), *self._edge()]

    def _edge(self) -> list[Metric]:
        """The usage ledger's writes and the HTTPS certificate (each when configured)."""
        out: list[Metric] = []
        ledger = getattr(self.fleet, "ledger", None)
        if ledger is not None:
            failures = CounterMetricFamily(
                "corral_usage_write_failures",
                "Batches the usage store refused (kept in memory and retried).")
            failures.add_metric([], ledger.errors)
            pending = GaugeMetricFamily(
                "corral_usage_pending_entries",
                "Client × model × tier × day sums not yet written to the usage store.")
            pending.add_metric([], ledger.pending())
            out += [failures, pending]
        certs = getattr(self.fleet, "certs", None)
        if certs is not None:
            expiry = GaugeMetricFamily(
                "corral_tls_certificate_expiry_timestamp_seconds",
                "When the served certificate expires (Unix time): alert on renewal.")
            expiry.add_metric([], certs.info.not_after.timestamp())
            out.append(expiry)
        return out

    def _replication(self) -> list[Metric]:
        """Several replicas on one state store (absent for one process)."""
        scheduler = getattr(self.fleet, "scheduler", None)
        shared = scheduler.replication() if scheduler is not None else None
        if not shared:
            return []
        replicas = GaugeMetricFamily(
            "corral_replicas", "Replicas sharing the state store, as this one last saw.")
        replicas.add_metric([], len(shared["replicas"]))
        leading = GaugeMetricFamily(
            "corral_replica_leading", "1 when this replica orders the shared queue.")
        leading.add_metric([], 1 if shared["leading"] else 0)
        store = GaugeMetricFamily(
            "corral_state_store_up", "1 when the shared state store answers; 0 while "
            "this replica carries on alone or refuses (queue.on_store_error).")
        store.add_metric([], 1 if shared["store"] == "ok" else 0)
        waiting = GaugeMetricFamily(
            "corral_shared_queue_waiting", "Jobs waiting for a slot on all replicas.")
        waiting.add_metric([], shared["waiting"])
        mismatch = GaugeMetricFamily(
            "corral_replica_config_mismatch",
            "Other replicas on the store running another configuration.")
        mismatch.add_metric([], len(shared["config_mismatch"]))
        outages = CounterMetricFamily(
            "corral_state_store_outages", "Times the shared state store went away.")
        outages.add_metric([], shared["outages"])
        late = CounterMetricFamily(
            "corral_slot_late_releases", "Releases of a slot whose lease had lapsed and "
            "was taken back (ignored: nothing is freed twice).")
        late.add_metric([], shared["late_releases"])
        lost = CounterMetricFamily(
            "corral_slot_leases_lost", "Leases of running requests found lapsed when "
            "renewed (a pause longer than queue.slot_lease).")
        lost.add_metric([], shared["leases_lost"])
        return [replicas, leading, store, waiting, mismatch, outages, late, lost]

    def _knowledge(self, now: float) -> list[Metric]:
        """What the scheduler has learned about the fleet (absent in a bare view)."""
        known: Fleet | None = getattr(self.fleet, "fleet", None)
        if known is None:
            return []
        demand = GaugeMetricFamily(
            "corral_model_demand", "Recent requests per second for the model.",
            labels=["model"])
        queued = GaugeMetricFamily("corral_model_queued",
                                   "Requests for the model waiting for a slot.",
                                   labels=["model"])
        running = GaugeMetricFamily("corral_model_running",
                                    "Requests for the model running on a backend.",
                                    labels=["model"])
        service = GaugeMetricFamily(
            "corral_model_service_seconds",
            "Learned time a request for the model holds a slot once the model is in.",
            labels=["model"])
        load = GaugeMetricFamily(
            "corral_backend_model_load_seconds",
            "Time to load the model on the backend: measured (load_duration of the "
            "answers that loaded it), else routing.load_time.", labels=["backend", "model"])
        for name, stats in known.models.items():
            demand.add_metric([name], stats.arrivals.rate(now))
            queued.add_metric([name], stats.queued)
            running.add_metric([name], stats.running)
            if stats.service.value is not None:
                service.add_metric([name], stats.service.value)
        for b in known.backends:
            for model in sorted(b.models | b.loaded):
                load.add_metric([b.name, model], known.load_time(b, model))
        return [demand, queued, running, service, load]


class Scraped(Protocol):
    @property
    def metrics(self) -> Metrics: ...


async def metrics_handler(gw: Scraped, request: web.BaseRequest) -> web.StreamResponse:
    body, content_type = gw.metrics.exposition(request.headers.get("Accept"))
    resp = web.Response(body=body, headers={"Content-Type": content_type,
                                            "Cache-Control": "no-store"})
    # A fleet with many models makes a large page; aiohttp compresses only when the
    # scraper accepts it.
    resp.enable_compression()
    return resp
