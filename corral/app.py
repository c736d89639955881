"""``Gateway``: wires the pipeline and owns the background tasks; ``serve`` runs it.

The request's path, in order: identify → (admit) → schedule → route → forward →
account. ``Gateway.handle`` is the only entry point; it dispatches on the path with a
dict lookup (no middleware chain on the hot path).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from corral import __version__
from corral.backends.backend import Backend
from corral.backends.breaker import Breaker
from corral.backends.health import HealthMonitor
from corral.config import (
    BackendConfig,
    ConfigError,
    Settings,
    fingerprint,
    max_loaded_models,
)
from corral.fleet.state import Fleet
from corral.jobs.api import ITEM_PREFIX as JOB_ITEM_PREFIX
from corral.jobs.api import job_item, job_routes
from corral.jobs.service import JobService
from corral.limits.storage.base import LimitStore
from corral.limits.storage.memory import MemoryLimitStore
from corral.limits.storage.redis import RedisLimitStore
from corral.observe.accesslog import AccessLog
from corral.observe.metrics import Metrics
from corral.observe.status import Activity, build_status
from corral.pipeline import fleet
from corral.pipeline.admit import Admission
from corral.pipeline.affinity import Affinity
from corral.pipeline.cors import Cors, CorsRequest
from corral.pipeline.errors import error_response
from corral.pipeline.forward import Timeouts
from corral.pipeline.identify import Client, Identifier
from corral.pipeline.inference import INFERENCE_PATHS, handle_inference
from corral.pipeline.route import Router
from corral.pipeline.upstream import Pools
from corral.reload import reload_from_file, reload_handler
from corral.runtime import give_back_memory
from corral.scheduler.queues import JobQueue, Priority
from corral.scheduler.shared.redis import RedisSlotStore
from corral.scheduler.shared.replica import SharedScheduler
from corral.scheduler.slots import Scheduler
from corral.usage.api import USAGE_PATH, usage_handler
from corral.usage.ledger import Ledger
from corral.usage.location import ledger_file
from corral.usage.redis import RedisUsageStore
from corral.usage.sqlite import SqliteUsageStore
from corral.usage.store import UsageStore
from corral.web.listen import TlsListener
from corral.web.routes import observe_routes
from corral.web.server import Server
from corral.web.tls import Certificates, TlsError

log = logging.getLogger("corral")

Handler = Callable[["Gateway", web.BaseRequest], Awaitable[web.StreamResponse]]


class Gateway:
    """Runtime state of one Corral process."""

    def __init__(self, settings: Settings, config_path: str | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        # Read first: a bad certificate must stop the start before anything runs.
        self.certs = Certificates(settings.tls) if settings.tls is not None else None
        self.fleet = Fleet([self.new_backend(b) for b in settings.backends],
                           settings.routing.load_time, max_loaded_models(settings))
        self.router = Router(settings.routing.strategy, settings.routing.prefer_loaded)
        self.queue = JobQueue(settings.queue.fairness)
        self.affinity = Affinity()
        self.started = time.time()
        self.scheduler = self._new_scheduler(settings)
        self.configure(settings)
        self.access_log = AccessLog(settings.access_log)
        self.activity = Activity()
        self.metrics = Metrics(self, self.activity)
        self.admission = Admission(settings, _limit_store(settings), self.metrics.limit_decision)
        self.scheduler.on_failure = self.metrics.upstream_error
        self.jobs = JobService(lambda: self.settings, lambda tier: self.tiers[tier][0])
        u = settings.usage
        self.ledger = (Ledger(_usage_store(settings, config_path), u.flush, u.keep,
                              known_model=self.fleet.has_model) if u.enabled else None)
        self.session: aiohttp.ClientSession = None  # type: ignore[assignment]  # set in start
        self.health: HealthMonitor = None  # type: ignore[assignment]
        self.pools: Pools = None  # type: ignore[assignment]
        self._rr = 0
        self._housekeeping: asyncio.Task[None] | None = None
        self._routes: dict[tuple[str, str], Handler] = {}
        self._install_routes()
        self._own_routes: dict[tuple[str, str], Handler] = {}
        self.install_own_routes()

    def _new_scheduler(self, settings: Settings) -> Scheduler:
        """In the process (``state: memory``), or shared by every replica on the
        state store: one set of slots, one queue order, one fair share."""
        q = settings.queue
        if settings.state == "memory":
            return Scheduler(self.fleet, self.router, self.queue, q.max_depth, q.max_wait,
                             max_preemptions=q.max_preemptions)
        host, port = settings.listen_host_port
        replica = f"{socket.gethostname()}:{port}:{os.getpid()}"
        address = f"{socket.gethostname() if host in ('0.0.0.0', '::') else host}:{port}"

        def info() -> bytes:
            # What the other replicas (and /corral/status) say of this one.
            return orjson.dumps({"address": address, "version": __version__,
                                 "started": round(self.started, 3), "pid": os.getpid(),
                                 "seen": round(time.time(), 3),
                                 "config": fingerprint(self.settings),
                                 "knowledge": self.fleet.shareable(time.monotonic())})

        return SharedScheduler(self.fleet, self.router, self.queue, q.max_depth, q.max_wait,
                               RedisSlotStore.from_url(settings.state), replica,
                               max_preemptions=q.max_preemptions, info=info,
                               lease_ms=int(q.slot_lease * 1000),
                               on_store_error=q.on_store_error)

    def install_own_routes(self) -> None:
        # Per instance: the metrics path comes from the settings.
        self._own_routes = {**_OWN_ROUTES, **observe_routes(self.settings.metrics.path),
                            **job_routes(), ("POST", "/corral/reload"): reload_handler,
                            ("GET", USAGE_PATH): usage_handler}

    def new_backend(self, cfg: BackendConfig) -> Backend:
        h = self.settings.health
        return Backend.from_config(cfg, Breaker(h.max_fails, h.fail_timeout))

    def configure(self, settings: Settings) -> None:
        """Everything derived from the settings that requests read; swapped as a
        whole on reload (the event loop runs one request step at a time, so no
        request ever sees half of an old and half of a new configuration)."""
        self.settings = settings
        t = settings.timeouts
        self.timeouts = Timeouts(t.connect, t.first_byte, t.read)
        self.client_timeout = self.timeouts.client_timeout()
        self.retry_on = frozenset(str(x) for x in settings.retry.on)
        self.retry_on_status = frozenset(x for x in settings.retry.on if isinstance(x, int))
        self.identifier = Identifier(settings)
        self.cors = Cors(settings.cors.origins)
        self.tiers = {name: (Priority.parse(t.priority), t.weight)
                      for name, t in settings.tiers.items()}
        self.preemptible_tiers = frozenset(name for name, t in settings.tiers.items()
                                           if t.is_preemptible)
        self.router.strategy = settings.routing.strategy
        self.router.prefer_loaded = settings.routing.prefer_loaded
        self.fleet.default_load_time = settings.routing.load_time
        self.queue.fairness = settings.queue.fairness
        self.scheduler.max_depth = settings.queue.max_depth
        self.scheduler.max_wait = settings.queue.max_wait
        self.scheduler.max_preemptions = settings.queue.max_preemptions
        if isinstance(self.scheduler, SharedScheduler):
            self.scheduler.lease_ms = int(settings.queue.slot_lease * 1000)
            self.scheduler.on_store_error = settings.queue.on_store_error

    # -- lifespan -------------------------------------------------------------------

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        # auto_decompress off and no auto headers: bytes pass through unchanged.
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        self.pools = Pools(self.timeouts.connect or None)
        self.pools.start()
        self.health = HealthMonitor(self.backends, self.session, self.settings.health,
                                    self.scheduler.dispatch, self.fleet)
        self.scheduler.on_loaded = self.health.probe_ps_soon
        self.scheduler.on_preempt = self.metrics.preempted
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.health.timeout + 1):
                await self.health.probe_all()
        self.health.start()
        self.access_log.start()
        self.admission.start()
        self.activity.start(self)
        if self.ledger is not None:
            self.ledger.start()
        await self.jobs.start()
        if isinstance(self.scheduler, SharedScheduler):
            self.scheduler.start()
        self._housekeeping = asyncio.get_running_loop().create_task(
            self._forget_idle(), name="corral-forget-idle")

    async def _forget_idle(self) -> None:
        """Per-client state of clients gone quiet: fair-share counters and expired
        limit entries (in memory; Redis expires its keys itself)."""
        while True:
            await asyncio.sleep(self.settings.queue.forget_idle)
            forgotten = self.scheduler.forget_idle_clients()
            store = self.admission.store
            if isinstance(store, MemoryLimitStore):
                forgotten += store.sweep()
            # After a flood the freed memory would otherwise stay resident at its
            # peak; a few milliseconds once per period.
            give_back_memory()
            if forgotten:
                log.debug("forgot the state of %d idle clients or limit keys", forgotten)

    async def stop(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        await self.jobs.stop()     # first: running jobs are handed back to the queue
        if isinstance(self.scheduler, SharedScheduler):
            await self.scheduler.stop()
            await self.scheduler.store.close()
        await self.activity.stop()
        await self.health.stop()
        await self.session.close()
        await self.pools.close()
        await self.access_log.close()
        if self.ledger is not None:
            await self.ledger.stop()     # last: every request has been recorded

    # -- helpers the pipeline uses ------------------------------------------------

    @property
    def backends(self) -> list[Backend]:
        return self.fleet.backends

    # -- reload -----------------------------------------------------------------------

    async def apply(self, new: Settings) -> list[str]:
        """Swap ``new`` in (a reload, ``corral/reload.py``); notes for the operator."""
        old = self.settings
        notes = [f"{key} changed: takes effect after a restart" for key in _RESTART_ONLY
                 if getattr(new, key) != getattr(old, key)]
        if new.tls is not None and self.certs is not None:
            # Always re-read, changed or not: a renewal writes new files to the same
            # paths. A file that cannot be used refuses the whole reload.
            try:
                self.certs.reload(new.tls)
            except TlsError as exc:
                raise ConfigError([str(exc)]) from None
            info = self.certs.info
            notes.append(f"certificate read: {info.subject}, valid until "
                         f"{info.not_after:%Y-%m-%d} (new connections)")
        elif (new.tls is None) != (self.certs is None):
            notes.append("tls added or removed: takes effect after a restart")
            new = new.model_copy(update={"tls": old.tls})
        # Settings that only take effect after a restart keep their running values.
        new = new.model_copy(update={k: getattr(old, k) for k in _RESTART_ONLY})

        current = {b.name: b for b in self.backends}
        kept: list[Backend] = []
        for cfg in new.backends:
            b = current.pop(cfg.name, None)
            if b is not None and b.url == cfg.url:
                b.max_concurrency, b.weight, b.draining = cfg.max_concurrency, cfg.weight, False
                b.breaker.max_fails = new.health.max_fails
                b.breaker.fail_timeout = new.health.fail_timeout
                kept.append(b)
                continue
            if b is not None:
                current[f"{b.name} (old url)"] = b
            self.settings = new            # new backends take the new health settings
            kept.append(self.new_backend(cfg))
            notes.append(f"backend {cfg.name} added: joins after a good probe")
        draining = list(current.values())
        for b in draining:
            b.draining = True
            notes.append(f"backend {b.name} removed: draining {b.in_flight} in-flight "
                         "request(s)")

        self.configure(new)
        self.scheduler.set_backends(kept + draining, max_loaded_models(new))
        self.health.cfg = new.health
        self.health.set_backends(self.backends)
        self.pools.connect_timeout = self.timeouts.connect or None

        if new.limits != old.limits:
            previous = self.admission
            self.admission = Admission(new, previous.store, self.metrics.limit_decision)
            self.admission.adopt(previous)
            notes.append("limits replaced; counters of unchanged zones kept")
        if new.access_log != old.access_log:
            previous_log = self.access_log
            self.access_log = AccessLog(new.access_log)
            self.access_log.start()
            await previous_log.close()
        if new.metrics.path != old.metrics.path:
            self.install_own_routes()

        if draining:
            asyncio.get_running_loop().create_task(self._retire(draining))
        self.health.refresh_soon(0)
        log.warning("configuration reloaded%s", "".join(f"; {n}" for n in notes))
        return notes

    async def _retire(self, draining: list[Backend]) -> None:
        """Forget removed backends once their last in-flight request has finished."""
        while draining:
            await asyncio.sleep(0.2)
            for b in [b for b in draining if b.in_flight == 0]:
                draining.remove(b)
                if b in self.backends:
                    self.scheduler.set_backends([x for x in self.backends if x is not b])
                    self.health.set_backends(self.backends)
                    self.pools.drop(b.url)
                log.warning("backend %s drained and removed", b.name)

    # -- routing table --------------------------------------------------------------

    def _install_routes(self) -> None:
        r = self._routes
        for path in INFERENCE_PATHS:
            r[("POST", path)] = handle_inference
        for method in ("GET", "HEAD"):
            r[(method, "/api/tags")] = fleet.fleet_tags
        r[("GET", "/api/ps")] = fleet.fleet_ps
        r[("GET", "/v1/models")] = fleet.fleet_v1_models
        r[("POST", "/api/show")] = fleet.proxy_by_model
        r[("POST", "/api/push")] = fleet.proxy_by_model
        r[("POST", "/api/pull")] = fleet.broadcast_stream
        r[("POST", "/api/create")] = fleet.broadcast_stream
        r[("POST", "/api/copy")] = fleet.broadcast_simple
        r[("DELETE", "/api/delete")] = fleet.broadcast_simple

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        origin = request.headers.get("Origin")
        if origin is not None and self.cors.enabled:
            refused = self._cors(request, origin)
            if refused is not None:
                return refused
        own = self._own_routes.get((request.method, path))
        if own is not None:
            return await own(self, request)
        if path.startswith(JOB_ITEM_PREFIX):
            return await job_item(self, request)
        client = self.identifier.identify(request)
        if client is None:
            self._log_refusal(request, None, 401, "unauthorized")
            return error_response(401, "unauthorized: a valid API key is required",
                                  path.startswith("/v1/"),
                                  {"WWW-Authenticate": 'Bearer realm="corral"'})
        request["client"] = client
        handler = self._routes.get((request.method, path))
        if handler is handle_inference:
            return await handle_inference(self, request)    # admits once it knows the model
        if handler is None:
            if path.startswith("/api/blobs/") and request.method == "POST":
                handler = fleet.broadcast_stream
            elif path.startswith("/v1/models/") and request.method == "GET":
                handler = fleet.proxy_v1_model
            else:
                handler = _proxy_any
        if not self.admission.enabled:
            return await handler(self, request)
        verdict = await self.admission.admit(request, client, None, path.startswith("/v1/"))
        if verdict.response is not None:
            self._log_refusal(request, client, verdict.response.status, verdict.outcome,
                              verdict.rule)
            return verdict.response
        try:
            return await handler(self, request)
        finally:
            await self.admission.finish(verdict, 0)

    def _cors(self, request: web.BaseRequest, origin: str) -> web.StreamResponse | None:
        """A request from a page on another origin: answered here when it is a
        preflight or the origin is not allowed; otherwise marked, so its response (a
        stream too) carries ``Access-Control-Allow-Origin``."""
        if not self.cors.allowed(origin) and not self.cors.same_origin(origin, request):
            self._log_refusal(request, None, 403, "origin")
            return self.cors.refuse(origin, request.path.startswith("/v1/"))
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            # Before identification and limits: a browser sends no key on a preflight,
            # and asking is not using.
            self._log_refusal(request, None, 204, None)
            return self.cors.preflight(origin)
        request["cors_origin"] = origin
        return None

    def _log_refusal(self, request: web.BaseRequest, client: Client | None, status: int,
                     outcome: str | None, rule: str | None = None) -> None:
        tier = client.tier if client is not None else self.settings.clients.default_tier
        rec = {"time": time.time(),
               "client": client.ip if client is not None else self.identifier.ip(request),
               "client_name": client.key_name if client is not None else None,
               "tier": tier, "method": request.method, "path": request.path,
               "model": None, "backend": None, "status": status, "rule": rule,
               "limit": outcome, "duration_ms": 0.0}
        self.access_log.write(rec)
        self.metrics.observe_request(rec, self.tiers[tier][0])
        if self.ledger is not None:
            self.ledger.record(rec)

    # -- status ---------------------------------------------------------------------


async def _healthz(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def _readyz(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    ready = bool(gw.fleet.up_backends(time.monotonic()))
    if ready and isinstance(gw.scheduler, SharedScheduler):
        ready = gw.scheduler.ready()
    return web.json_response({"ready": ready}, status=200 if ready else 503)


async def _status(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    return web.Response(body=orjson.dumps(build_status(gw)), content_type="application/json")


# A reload reports these but cannot apply them: they need a restart.
_RESTART_ONLY = ("listen", "state", "shutdown_grace", "usage")


async def _proxy_any(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    return await fleet.proxy_one(gw, request, fleet.pick_any(gw.fleet.up_backends(
        time.monotonic())))


def _usage_store(settings: Settings, config_path: str | None) -> UsageStore:
    """One ledger for all replicas on the shared state store; otherwise a SQLite file
    (where :func:`ledger_file` says) so a restart loses nothing."""
    if settings.state != "memory":
        return RedisUsageStore.from_url(settings.state, keep_days=settings.usage.keep)
    return SqliteUsageStore(ledger_file(settings.usage.path, config_path))


def _limit_store(settings: Settings) -> LimitStore:
    if settings.state == "memory":
        return MemoryLimitStore()
    return RedisLimitStore.from_url(settings.state)

# Corral's own endpoints: answered before identification (probes need no key).
_OWN_ROUTES: dict[tuple[str, str], Handler] = {
    (m, p): h
    for m in ("GET", "HEAD")
    for p, h in (("/healthz", _healthz), ("/readyz", _readyz), ("/corral/status", _status))
}


async def serve(settings: Settings, ready: Callable[[str], None] | None = None,
                config_path: str | None = None) -> None:
    """Run until cancelled (the CLI cancels on SIGINT/SIGTERM), then shut down
    gracefully: stop accepting, let in-flight requests finish for up to
    ``shutdown_grace``, then cancel what is left."""
    gateway = Gateway(settings, config_path)
    await gateway.start()
    loop = asyncio.get_running_loop()
    if config_path is not None:
        with contextlib.suppress(NotImplementedError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(
                reload_from_file(gateway)))
    max_body = settings.max_body_size

    def make_request(message: Any, payload: Any, protocol: Any, writer: Any,
                     task: asyncio.Task[None]) -> web.BaseRequest:
        return CorsRequest(message, payload, protocol, writer, task, loop,
                               client_max_size=max_body)

    # aiohttp's low-level server: Corral dispatches on the path itself, so the
    # Application's router and middleware chain would only add cost per request.
    # handler_cancellation: a client that disconnects cancels its handler, so its
    # queue entry, slot and upstream request are released at once.
    server = Server(gateway.handle, request_factory=make_request,
                        handler_cancellation=True, access_log=None)
    listeners: list[asyncio.Server | TlsListener] = []
    try:
        for address in settings.listeners:
            if address.tls and gateway.certs is not None:
                tls = TlsListener(server, address.host, address.port, gateway.certs,
                                  lambda: gateway.settings.timeouts.client_body)
                await tls.start()
                listeners.append(tls)
            else:
                listeners.append(await loop.create_server(
                    server, address.host, address.port, backlog=4096, reuse_address=True))
        if ready is not None:
            ready(" ".join(a.url for a in settings.listeners))
        await asyncio.Event().wait()
    finally:
        for listener in listeners:
            listener.close()
        server.pre_shutdown()
        await server.shutdown(settings.shutdown_grace)
        await gateway.stop()
