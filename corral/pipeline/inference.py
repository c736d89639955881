"""The path of an inference request: parse → schedule → route → forward → account.

This is the one place where the order of the steps is visible. Everything here runs
per request, so it parses only what scheduling needs (``model``, a cost estimate) and
never re-encodes the body.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import orjson
from aiohttp import StreamReader, web

from corral.backends.backend import Backend, normalize_model
from corral.backends.health import HealthMonitor
from corral.config import Settings
from corral.fleet.state import Fleet
from corral.observe.accesslog import AccessLog
from corral.pipeline.account import timings_from_tail, usage_from_tail
from corral.pipeline.admit import Admission, Stage, Verdict
from corral.pipeline.affinity import Affinity, session_key
from corral.pipeline.errors import error_response, not_found_model
from corral.pipeline.forward import RelayResult, Timeouts, UpstreamFailure, raw_drop_set, relay
from corral.pipeline.identify import Client
from corral.pipeline.upstream import Interrupt, Pools, Response, UpstreamError, encode_head
from corral.scheduler.queues import Job, JobQueue, Priority
from corral.scheduler.slots import Scheduler, SchedulingError
from corral.usage.ledger import Ledger


class RequestMetrics(Protocol):
    def observe_request(self, rec: dict[str, Any], priority: Priority | str) -> None: ...

    def retry(self, backend: str) -> None: ...


class Gateway(Protocol):
    """What the inference path uses, wired by ``app.py``; swapped as a whole on
    reload (``settings``, ``tiers``, ``timeouts`` … are replaced, never mutated)."""

    settings: Settings
    admission: Admission
    fleet: Fleet
    health: HealthMonitor
    queue: JobQueue
    scheduler: Scheduler
    affinity: Affinity
    pools: Pools
    timeouts: Timeouts
    access_log: AccessLog
    tiers: dict[str, tuple[Priority, float]]
    preemptible_tiers: frozenset[str]
    retry_on: frozenset[str]
    retry_on_status: frozenset[int]
    ledger: Ledger | None

    @property
    def metrics(self) -> RequestMetrics: ...

# Routes that run a model and therefore take a backend slot.
INFERENCE_PATHS = frozenset({
    "/api/generate", "/api/chat", "/api/embed", "/api/embeddings",
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
    "/v1/messages",
})
_EMBED_PATHS = frozenset({"/api/embed", "/api/embeddings", "/v1/embeddings"})
_DEFAULT_OUT_ESTIMATE = 256


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_body(request: web.BaseRequest, limit_s: float) -> bytes:
    """The whole body (inference needs the model before anything else), within
    ``timeouts.client_body`` and ``max_body_size``.

    The size cap holds while the body arrives, never after: a declared
    ``Content-Length`` over it is refused before a byte is read (as nginx's
    ``client_max_body_size``), and a chunked body is refused as soon as what arrived
    passes it, so at most the cap plus one network read is ever held.
    """
    cap = request.client_max_size
    declared = request.content_length
    if declared is not None and declared > cap:
        raise BadRequest(413, f"request body too large: the limit is {cap} bytes")
    content = request.content
    if content.is_eof():
        # Already all here (the common case for small bodies): nothing can stall, and
        # what is buffered is at most one read past the cap.
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest(413, f"request body too large: the limit is {cap} bytes") \
                from None
    try:
        async with asyncio.timeout(limit_s or None):
            return await _read_capped(content, cap)
    except TimeoutError:
        raise BadRequest(408, f"request body not received within {limit_s:g}s") from None


async def _read_capped(content: StreamReader, cap: int) -> bytes:
    # Not ``request.read()``: it raises aiohttp's read buffer to the cap first, so a
    # fast sender could have twice the cap buffered before the check.
    body = bytearray()
    while True:
        chunk = await content.readany()
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > cap:
            raise BadRequest(413, f"request body too large: the limit is {cap} bytes")


def parse_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or ``BadRequest(400)`` saying what is wrong."""
    if not body:
        raise BadRequest(400, "missing request body")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, f"invalid JSON in request body: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(400, "the request body must be a JSON object")
    return data


def parse_request(body: bytes) -> tuple[dict[str, Any], str]:
    data = parse_object(body)
    model = data.get("model")
    if model is None or model == "":
        raise BadRequest(400, "model is required")
    if not isinstance(model, str):
        raise BadRequest(400, "model must be a string")
    return data, model


def _text_chars(data: dict[str, Any], body_len: int) -> int:
    """Characters of text the model will read. Images travel base64 in the same body
    and would make a one-line question look like a novel, so only text fields count;
    a body of another shape falls back to its size."""
    n = 0
    for key in ("prompt", "system", "input"):
        value = data.get(key)
        if isinstance(value, str):
            n += len(value)
        elif isinstance(value, list):
            n += sum(len(v) for v in value if isinstance(v, str))
    messages = data.get("messages")
    if isinstance(messages, list):
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                n += len(content)
            elif isinstance(content, list):          # /v1 content parts
                n += sum(len(part.get("text") or "") for part in content
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
    elif n == 0 and "prompt" not in data and "input" not in data:
        return body_len
    return n


def estimate_cost(path: str, data: dict[str, Any], body_len: int) -> float:
    """Tokens in ×1 + tokens out ×2, estimated before the run; corrected afterwards.
    About four characters make a token."""
    tokens_in = _text_chars(data, body_len) // 4
    if path in _EMBED_PATHS:
        return float(tokens_in)
    out = None
    options = data.get("options")
    if isinstance(options, dict):
        out = options.get("num_predict")
    if out is None:
        out = data.get("max_tokens")
    if not isinstance(out, int) or out <= 0:
        out = _DEFAULT_OUT_ESTIMATE
    return float(tokens_in + 2 * out)


def num_ctx(data: dict[str, Any]) -> int | None:
    """``options.num_ctx``: a runner loaded with another value must be reloaded."""
    options = data.get("options")
    value = options.get("num_ctx") if isinstance(options, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
        else None


async def handle_inference(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    path = request.path
    openai = path.startswith("/v1/")
    started = time.monotonic()
    client: Client = request["client"]
    rec: dict[str, Any] = {
        "time": time.time(), "client": client.ip, "client_name": client.key_name,
        "tier": client.tier, "method": request.method,
        "path": path, "model": None, "backend": None, "status": 0, "queue_wait_ms": 0.0,
        "ttfb_ms": None, "duration_ms": 0.0, "bytes": 0, "retries": 0,
    }
    try:
        return await _serve(gw, request, path, openai, started, rec)
    except asyncio.CancelledError:
        rec["status"] = rec["status"] or 499
        rec["error"] = rec.get("error") or "client closed the request"
        raise
    finally:
        rec["duration_ms"] = round((time.monotonic() - started) * 1000, 3)
        verdict: Verdict | None = request.get("verdict")
        if verdict is not None:
            await gw.admission.finish(
                verdict, rec.get("tokens_in", 0) + rec.get("tokens_out", 0))
        gw.access_log.write(rec)
        gw.metrics.observe_request(rec, gw.tiers[client.tier][0])
        if gw.ledger is not None:
            gw.ledger.record(rec)


async def _serve(gw: Gateway, request: web.BaseRequest, path: str, openai: bool, started: float,
                 rec: dict[str, Any]) -> web.StreamResponse:
    client: Client = request["client"]
    verdict: Verdict | None = None
    if gw.admission.enabled:
        # Before the body: a client these limits refuse (say, per IP) never has its
        # body read, whatever it declared.
        verdict = await gw.admission.admit(request, client, None, openai, Stage.HEAD)
        request["verdict"] = verdict
        refused = _refused(verdict, rec)
        if refused is not None:
            if not request.content.is_eof():
                refused.force_close()   # the unread body cannot be followed by a request
            return refused
    try:
        body = await read_body(request, gw.settings.timeouts.client_body)
        data, model = parse_request(body)
    except BadRequest as exc:
        rec["status"], rec["error"] = exc.status, str(exc)
        return error_response(exc.status, str(exc), openai)
    rec["model"] = model
    name = normalize_model(model)
    if verdict is not None and verdict.deferred:
        # Zones whose rules name models, now that the model is known.
        verdict.then = then = await gw.admission.admit(request, client, name, openai,
                                                       Stage.BODY, verdict.delay_ms)
        verdict.headers.update(then.headers)
        refused = _refused(then, rec)
        if refused is not None:
            return refused
    if not gw.fleet.any_up():
        # Nothing answers at all: say so plainly rather than guess a 404.
        rec["status"], rec["error"] = 503, "no backend is reachable"
        return error_response(503, "no backend is reachable; try again later", openai,
                              {"Retry-After": "5"})
    if not gw.fleet.has_model(name):
        refresh = gw.health.refresh_soon()
        if refresh is not None:
            await asyncio.shield(refresh)
        if not gw.fleet.has_model(name):
            rec["status"] = 404
            return error_response(404, not_found_model(path, model), openai)

    priority, weight = gw.tiers[client.tier]
    cost = 1.0 if gw.queue.fairness == "requests" else estimate_cost(path, data, len(body))
    job = Job(model=name, client=client.name, priority=priority, weight=weight, cost=cost,
              ctx=num_ctx(data), preemptible=client.tier in gw.preemptible_tiers,
              tier=client.tier)
    gw.fleet.on_arrival(name, started)
    session = None
    if gw.settings.routing.affinity == "session":
        session = session_key(name, data, request.headers)
        job.affinity = gw.affinity.get(session)
    # The request head is encoded once, whatever the number of tries.
    head = encode_head(request.method, request.path_qs, request.raw_headers,
                       raw_drop_set(request.headers, client.key_matched,
                                    "cors_origin" in request))
    last_failure: UpstreamFailure | None = None
    attempt = 0
    # Only a preemptible request gets a handle the scheduler can stop it with.
    watch = Interrupt() if job.preemptible else None
    while True:
        try:
            backend = await gw.scheduler.acquire(job, front=attempt > 0 or job.preemptions > 0)
        except SchedulingError as exc:
            rec["queue_wait_ms"] = round((time.monotonic() - started) * 1000, 3)
            if last_failure is not None:
                rec["status"], rec["error"] = last_failure.status, str(last_failure)
                return error_response(last_failure.status, str(last_failure), openai)
            rec["status"], rec["error"] = exc.status, str(exc)
            return error_response(exc.status, str(exc), openai,
                                  {"Retry-After": str(exc.retry_after)})
        if attempt == 0 and job.preemptions == 0:
            rec["queue_wait_ms"] = round((time.monotonic() - started) * 1000, 3)
        rec["backend"], rec["placement"] = backend.name, job.placement
        job.run = watch
        try:
            try:
                upstream = await gw.pools.get(backend.url).request(
                    head, body, gw.timeouts.first_byte or None, gw.timeouts.read or None,
                    watch)
            except UpstreamError as exc:
                if job.preempted:
                    # Stopped for a higher class; its slot went to that job. Not a
                    # failure of the backend: back to the front of its class.
                    job.preempted = False
                    rec["preemptions"] = job.preemptions
                    rec["preempted_tokens"] = round(job.thrown_tokens)
                    continue
                raise UpstreamFailure(exc.kind, f"backend {backend.name}: {exc}",
                                      504 if exc.kind == "timeout" else 502) from None
        except UpstreamFailure as failure:
            gw.scheduler.release(job)
            gw.scheduler.failed(backend, failure.kind)
            last_failure, attempt = failure, attempt + 1
            if attempt < gw.settings.retry.tries and failure.kind in gw.retry_on:
                job.exclude |= {backend.name}
                rec["retries"] = attempt
                gw.metrics.retry(backend.name)
                continue
            rec["status"], rec["error"] = failure.status, str(failure)
            return error_response(failure.status, str(failure), openai)
        except BaseException:
            # The client left while we waited for the header: the slot is not ours.
            gw.scheduler.release(job)
            backend.breaker.on_abandon()
            raise
        if upstream.status not in gw.retry_on_status:
            gw.scheduler.answered(job)
            if session is not None:
                gw.affinity.remember(session, backend.name)
            break
        gw.scheduler.failed(backend, str(upstream.status))
        if attempt + 1 >= gw.settings.retry.tries:
            break       # out of tries: the client gets the backend's own answer
        # A retryable status (e.g. 500 out of memory) before anything reached the
        # client: drop it and try another backend, keeping the job's place.
        upstream.close()
        gw.scheduler.release(job)
        last_failure = UpstreamFailure("status", f"backend {backend.name} answered "
                                       f"{upstream.status}", upstream.status)
        attempt += 1
        rec["retries"] = attempt
        gw.metrics.retry(backend.name)
        job.exclude |= {backend.name}
    return await _stream(gw, request, job, backend, upstream, openai, rec, started)


def _refused(verdict: Verdict, rec: dict[str, Any]) -> web.Response | None:
    """Note what admission decided in the record; its answer when it refused."""
    if verdict.outcome != "passed":
        rec["rule"], rec["limit"] = verdict.rule, verdict.outcome
    if verdict.response is not None:
        rec["status"] = verdict.response.status
    return verdict.response


async def _stream(gw: Gateway, request: web.BaseRequest, job: Job, backend: Backend,
                  upstream: Response, openai: bool,
                  rec: dict[str, Any], arrived: float) -> web.StreamResponse:
    # Queue wait, a model load and the prompt's evaluation are in the first byte's time.
    result = RelayResult(started=arrived)
    rec["status"] = upstream.status
    sse = upstream.content_type == "text/event-stream"
    try:
        verdict: Verdict | None = request.get("verdict")
        resp = await relay(request, upstream, result, sse,
                           verdict.headers if verdict is not None else None)
    finally:
        if result.completed:
            upstream.release()
        else:
            upstream.close()      # stops the generation on the backend
        held = time.monotonic() - job.dispatched_at if job.dispatched_at else 0.0
        loaded = job.placement == "load"
        usage = (usage_from_tail(result.tail, openai, result.chunks)
                 if upstream.status < 300 else None)
        if usage is not None:
            rec["tokens_in"], rec["tokens_out"] = usage.tokens_in, usage.tokens_out
            if gw.queue.fairness == "tokens":
                # Fair share charged the estimate at dispatch: now the real figure.
                gw.scheduler.settle(job, usage.service - job.cost)
        gw.scheduler.release(job)
        rec["bytes"] = result.nbytes
        if result.ttfb is not None:
            rec["ttfb_ms"] = round(result.ttfb * 1000, 3)
        if result.error:
            rec["error"] = result.error
            gw.scheduler.failed(backend, "mid-stream")
        if upstream.status < 300 and result.completed:
            timing = timings_from_tail(result.tail)
            gw.fleet.on_complete(backend, job.model, held_s=held, load_s=timing.load_s,
                                 loaded=loaded, tokens_out=usage.tokens_out if usage else 0,
                                 eval_s=timing.eval_s)
    return resp
