"""``/corral/jobs``: submit, poll, list and cancel batch jobs over HTTP.

    POST   /corral/jobs            {"endpoint", "body", "callback_url"?} → 202 + the job
    GET    /corral/jobs/{id}       the job; 404 when unknown or someone else's
    DELETE /corral/jobs/{id}       cancel a queued or running job
    GET    /corral/jobs?status=&limit=   the caller's jobs, newest first, bounded

A job belongs to the client that submitted it (key name, or IP when anonymous); only
that client — or an admin key — can see or cancel it, and someone else's job is
answered 404, as an unknown one (its existence is not disclosed). Errors are in
Ollama's shape, ``{"error": "..."}``.

Input is checked as the proxy checks it (a JSON object with a string ``model``, an
inference endpoint, a model some backend has) so a job that can never run is refused
at once rather than failed later.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import web

from corral.backends.backend import normalize_model
from corral.backends.health import HealthMonitor
from corral.config import Settings
from corral.fleet.state import Fleet
from corral.jobs.callbacks import callback_refusal
from corral.jobs.store import JobRecord, JobStatus, JobStore, QueueFull, StoreError, document
from corral.pipeline.errors import error_response, not_found_model
from corral.pipeline.identify import Client, Identifier
from corral.pipeline.inference import INFERENCE_PATHS, BadRequest, parse_object, read_body


class Jobs(Protocol):
    """The job service as these handlers use it."""

    @property
    def store(self) -> JobStore: ...

    async def submit(self, client: Client, sub: Submission,
                     creds: tuple[tuple[str, str], ...]) -> JobRecord: ...

    async def cancel(self, job_id: str) -> tuple[JobStatus, JobRecord] | None: ...


class Gateway(Protocol):
    """What the jobs API uses (``app.py`` wires it): who is calling, whether some
    backend has the model, and the job service."""

    settings: Settings
    identifier: Identifier
    fleet: Fleet
    health: HealthMonitor

    @property
    def jobs(self) -> Jobs: ...


Handler = Callable[[Gateway, web.BaseRequest], Awaitable[web.StreamResponse]]

JOBS_PATH = "/corral/jobs"
ITEM_PREFIX = JOBS_PATH + "/"
_ID = re.compile(r"^[0-9a-f]{32}$")
_FIELDS = frozenset({"endpoint", "body", "callback_url"})
# Embedding endpoints never stream; their body is left exactly as given.
_NO_STREAM_FIELD = frozenset({"/api/embed", "/api/embeddings", "/v1/embeddings"})
LIST_DEFAULT = 100
LIST_MAX = 1000


@dataclass(frozen=True, slots=True)
class Submission:
    endpoint: str
    model: str
    body: bytes                 # as the job will send it: stream forced off
    callback_url: str | None


def parse_submission(raw: bytes, callback_hosts: tuple[str, ...]) -> Submission:
    """Check a ``POST /corral/jobs`` body (pure); raises ``BadRequest(400, why)``."""
    data = parse_object(raw)
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise BadRequest(400, f"unknown field(s) {', '.join(unknown)}: a job is "
                              '{"endpoint", "body", "callback_url"}')
    endpoint = data.get("endpoint")
    if not isinstance(endpoint, str) or endpoint not in INFERENCE_PATHS:
        raise BadRequest(400, "endpoint must be one of " + ", ".join(sorted(INFERENCE_PATHS)))
    body = data.get("body")
    if not isinstance(body, dict):
        raise BadRequest(400, "body must be a JSON object: the request to run")
    model = body.get("model")
    if model is None or model == "":
        raise BadRequest(400, "model is required")
    if not isinstance(model, str):
        raise BadRequest(400, "model must be a string")
    callback_url = data.get("callback_url")
    if callback_url is not None:
        if not isinstance(callback_url, str):
            raise BadRequest(400, "callback_url must be a string")
        refusal = callback_refusal(callback_url, callback_hosts)
        if refusal is not None:
            raise BadRequest(400, refusal)
    if endpoint not in _NO_STREAM_FIELD:
        # A job keeps one answer, not a stream of them.
        body = {**body, "stream": False}
    return Submission(endpoint, model, orjson.dumps(body), callback_url)


def credentials(request: web.BaseRequest) -> tuple[tuple[str, str], ...]:
    """The credential headers as presented: the job's requests carry them again, so
    the run has the submitter's identity, tier and limits."""
    return tuple((name, request.headers[name]) for name in ("Authorization", "X-API-Key")
                 if name in request.headers)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers=headers,
                        content_type="application/json")


def _store_down(exc: StoreError) -> web.Response:
    return error_response(503, f"the job store cannot be reached: {exc}",
                          headers={"Retry-After": "1"})


def _identify(gw: Gateway, request: web.BaseRequest) -> Client | web.Response:
    client = gw.identifier.identify(request)
    if client is None:
        return error_response(401, "unauthorized: a valid API key is required",
                              headers={"WWW-Authenticate": 'Bearer realm="corral"'})
    return client


def _visible(record: JobRecord, client: Client) -> bool:
    return client.admin or record.owner == client.name


async def _own_job(gw: Gateway, request: web.BaseRequest,
                   client: Client) -> JobRecord | web.Response:
    job_id = request.path[len(ITEM_PREFIX):].rstrip("/")
    record = await gw.jobs.store.get(job_id) if _ID.match(job_id) else None
    if record is None or not _visible(record, client):
        return error_response(404, f"job {job_id!r} not found")
    return record


# -- handlers ------------------------------------------------------------------------


async def submit_job(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    client = _identify(gw, request)
    if isinstance(client, web.Response):
        return client
    try:
        raw = await read_body(request, gw.settings.timeouts.client_body)
        sub = parse_submission(raw, gw.settings.jobs.callback_hosts)
    except BadRequest as exc:
        return error_response(exc.status, str(exc))
    name = normalize_model(sub.model)
    if gw.fleet.any_up() and not gw.fleet.has_model(name):
        refresh = gw.health.refresh_soon()
        if refresh is not None:
            await asyncio.shield(refresh)
        if not gw.fleet.has_model(name):
            return error_response(404, not_found_model(sub.endpoint, sub.model))
    try:
        record = await gw.jobs.submit(client, sub, credentials(request))
    except QueueFull as exc:
        if str(exc) == "client":
            return error_response(429, "too many unfinished jobs for this client "
                                  "(jobs.max_queued_per_client)", headers={"Retry-After": "10"})
        return error_response(503, "the job queue is full (jobs.max_queued)",
                              headers={"Retry-After": "10"})
    except StoreError as exc:
        return _store_down(exc)
    return _json(document(record), 202, {"Location": f"{JOBS_PATH}/{record.id}"})


async def get_job(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    client = _identify(gw, request)
    if isinstance(client, web.Response):
        return client
    try:
        record = await _own_job(gw, request, client)
    except StoreError as exc:
        return _store_down(exc)
    if isinstance(record, web.Response):
        return record
    return _json(document(record))


async def cancel_job(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    client = _identify(gw, request)
    if isinstance(client, web.Response):
        return client
    try:
        record = await _own_job(gw, request, client)
        if isinstance(record, web.Response):
            return record
        outcome = await gw.jobs.cancel(record.id)
    except StoreError as exc:
        return _store_down(exc)
    if outcome is None:
        return error_response(404, f"job {record.id!r} not found")
    before, after = outcome
    if before.finished:
        return error_response(409, f"job {record.id!r} has already finished ({before})")
    return _json(document(after))


async def list_jobs(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    client = _identify(gw, request)
    if isinstance(client, web.Response):
        return client
    query = request.query
    status: JobStatus | None = None
    if query.get("status"):
        try:
            status = JobStatus(query["status"])
        except ValueError:
            return error_response(400, "status must be one of "
                                  + ", ".join(s.value for s in JobStatus))
    raw_limit = query.get("limit", str(LIST_DEFAULT))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= LIST_MAX:
        return error_response(400, f"limit must be a number from 1 to {LIST_MAX}")
    try:
        records = await gw.jobs.store.list(None if client.admin else client.name, status,
                                           int(raw_limit))
    except StoreError as exc:
        return _store_down(exc)
    return _json({"jobs": [document(r, with_result=False) for r in records]})


async def _not_allowed(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    allow = "GET, POST" if request.path.rstrip("/") == JOBS_PATH else "GET, DELETE"
    return error_response(405, f"method {request.method} not allowed here",
                          headers={"Allow": allow})


async def job_item(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    if request.method in ("GET", "HEAD"):
        return await get_job(gw, request)
    if request.method == "DELETE":
        return await cancel_job(gw, request)
    return await _not_allowed(gw, request)


def job_routes() -> dict[tuple[str, str], Handler]:
    """The exact routes; ``/corral/jobs/{id}`` is matched by prefix in the Gateway
    (``ITEM_PREFIX`` → ``job_item``)."""
    table: dict[tuple[str, str], Handler] = {
        ("POST", JOBS_PATH): submit_job,
        ("GET", JOBS_PATH): list_jobs,
        ("HEAD", JOBS_PATH): list_jobs,
    }
    for method in ("PUT", "PATCH", "DELETE"):
        table[(method, JOBS_PATH)] = _not_allowed
    return table
