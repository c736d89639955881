"""Routes that answer for the whole fleet or go to backends without taking a slot.

- ``/api/tags``, ``/api/ps``, ``/v1/models``: asked of every up backend at once and
  merged — each model once (the newest entry wins).
- ``/api/pull`` and ``/api/create``: sent to every up backend, so any backend can serve
  the model afterwards; their NDJSON progress lines are relayed as they come and one
  final ``success`` (or an ``error`` naming the failed backends) ends the stream.
- ``/api/copy``, ``/api/delete``: sent to every backend that has the model.
- ``/api/show``, ``/api/push``, ``/v1/models/{m}``: to one backend that has the model.
- Anything else (``/``, ``/api/version``, unknown paths): to one up backend, so Ollama
  answers it in its own words — Corral invents no endpoints.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import web

from corral.backends.backend import Backend, normalize_model
from corral.backends.health import HealthMonitor
from corral.config import Settings
from corral.fleet.state import Fleet
from corral.pipeline.errors import error_response, not_found_model
from corral.pipeline.forward import (
    AiohttpSource,
    RelayResult,
    Timeouts,
    UpstreamFailure,
    open_upstream,
    relay,
    upstream_headers,
)
from corral.pipeline.inference import BadRequest, parse_request, read_body
from corral.scheduler.slots import Scheduler


class Gateway(Protocol):
    """What these routes use (``app.py`` wires it): the fleet, its health probes, an
    aiohttp session for the non-hot calls, and the failure count of passive health."""

    settings: Settings
    fleet: Fleet
    health: HealthMonitor
    session: aiohttp.ClientSession
    timeouts: Timeouts
    client_timeout: aiohttp.ClientTimeout
    scheduler: Scheduler


_turn = itertools.count()


def pick_any(pool: Sequence[Backend]) -> Backend | None:
    """One of ``pool`` in turn (requests that take no slot need no smarter choice)."""
    return pool[next(_turn) % len(pool)] if pool else None


async def _get_json(gw: Gateway, backend: Backend, path: str) -> Any:
    timeout = aiohttp.ClientTimeout(total=gw.settings.health.timeout + gw.timeouts.connect)
    async with gw.session.get(backend.url + path, timeout=timeout) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{backend.name} answered {resp.status}")
        return orjson.loads(await resp.read())


async def _gather(gw: Gateway, path: str) -> list[Any]:
    backends = gw.fleet.up_backends(time.monotonic())
    results = await asyncio.gather(*(_get_json(gw, b, path) for b in backends),
                                   return_exceptions=True)
    return [r for r in results if not isinstance(r, BaseException)]


def _json(data: Any, head: bool = False) -> web.Response:
    body = orjson.dumps(data)
    if head:
        return web.Response(status=200, content_type="application/json",
                            headers={"Content-Length": str(len(body))})
    return web.Response(body=body, content_type="application/json", charset="utf-8")


def merge_models(answers: Sequence[Any], order_key: str) -> list[dict[str, Any]]:
    """Union of ``models`` lists, each model once (the entry with the largest
    ``order_key`` wins), newest first — as one Ollama would list them."""
    best: dict[str, dict[str, Any]] = {}
    for answer in answers:
        models = answer.get("models") if isinstance(answer, dict) else None
        for m in models or ():
            if not isinstance(m, dict):
                continue
            name = normalize_model(str(m.get("name") or m.get("model") or ""))
            if not name:
                continue
            old = best.get(name)
            if old is None or str(m.get(order_key, "")) > str(old.get(order_key, "")):
                best[name] = m
    return sorted(best.values(), key=lambda m: str(m.get(order_key, "")), reverse=True)


async def fleet_tags(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    answers = await _gather(gw, "/api/tags")
    if not answers:
        return error_response(503, "no backend is available", headers={"Retry-After": "5"})
    return _json({"models": merge_models(answers, "modified_at")}, request.method == "HEAD")


async def fleet_ps(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    answers = await _gather(gw, "/api/ps")
    if not answers:
        return error_response(503, "no backend is available", headers={"Retry-After": "5"})
    return _json({"models": merge_models(answers, "expires_at")})


async def fleet_v1_models(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    answers = await _gather(gw, "/v1/models")
    if not answers:
        return error_response(503, "no backend is available", True, {"Retry-After": "5"})
    seen: dict[str, Any] = {}
    for answer in answers:
        for m in (answer.get("data") if isinstance(answer, dict) else None) or ():
            if isinstance(m, dict) and m.get("id") not in seen:
                seen[m["id"]] = m
    # Ollama answers ``data: null`` when it has no models; so does the fleet.
    return _json({"object": "list", "data": list(seen.values()) or None})


async def proxy_one(gw: Gateway, request: web.BaseRequest, backend: Backend | None,
                    body: bytes | None = None) -> web.StreamResponse:
    """Relay one request to one backend, without a slot (cheap, non-inference calls)."""
    openai = request.path.startswith("/v1/")
    if backend is None:
        return error_response(503, "no backend is available", openai, {"Retry-After": "5"})
    if body is None:
        try:
            body = await read_body(request, gw.settings.timeouts.client_body)
        except BadRequest as exc:
            return error_response(exc.status, str(exc), openai)
    try:
        upstream = await open_upstream(gw.session, backend, request.method, request.path_qs,
                                       upstream_headers(request), body or None,
                                       gw.timeouts, gw.client_timeout)
    except UpstreamFailure as failure:
        gw.scheduler.failed(backend, failure.kind)
        return error_response(failure.status, str(failure), openai)
    result = RelayResult(started=time.monotonic())
    try:
        return await relay(request, AiohttpSource(upstream), result,
                           upstream.content_type == "text/event-stream")
    finally:
        if result.completed:
            upstream.release()
        else:
            upstream.close()


async def proxy_by_model(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    """``/api/show``, ``/api/push``: to one up backend that has the model."""
    try:
        body = await read_body(request, gw.settings.timeouts.client_body)
        _, model = parse_request(body)
    except BadRequest as exc:
        return error_response(exc.status, str(exc))
    holders = gw.fleet.holders(normalize_model(model), time.monotonic())
    if not holders:
        return error_response(404, not_found_model(request.path, normalize_model(model)))
    return await proxy_one(gw, request, pick_any(holders), body)


async def proxy_v1_model(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    model = request.path.removeprefix("/v1/models/")
    holders = gw.fleet.holders(normalize_model(model), time.monotonic())
    if not holders:
        return error_response(404, f"model '{model}' not found", openai=True)
    return await proxy_one(gw, request, pick_any(holders), b"")


async def _send_all(gw: Gateway, request: web.BaseRequest, targets: Sequence[Backend],
                    body: bytes) -> list[tuple[Backend, int, bytes]]:
    async def one(b: Backend) -> tuple[Backend, int, bytes]:
        timeout = aiohttp.ClientTimeout(sock_connect=gw.timeouts.connect,
                                        sock_read=gw.timeouts.read)
        try:
            async with gw.session.request(request.method, b.url + request.path_qs,
                                          data=body or None, timeout=timeout,
                                          headers=upstream_headers(request)) as r:
                return b, r.status, await r.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return b, 502, orjson.dumps({"error": f"backend {b.name}: {exc!r}"})

    return list(await asyncio.gather(*(one(b) for b in targets)))


async def broadcast_simple(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    """``/api/copy``, ``/api/delete``: every backend that has the model; 200 with an
    empty body (as Ollama) when all succeed, else the first failure as it came."""
    try:
        body = await read_body(request, gw.settings.timeouts.client_body)
        data = orjson.loads(body) if body else {}
    except (BadRequest, orjson.JSONDecodeError) as exc:
        return error_response(getattr(exc, "status", 400), str(exc))
    name = data.get("source") or data.get("model") or data.get("name") if isinstance(
        data, dict) else None
    if not isinstance(name, str) or not name:
        return error_response(400, "model is required")
    targets = gw.fleet.holders(normalize_model(name), time.monotonic())
    if not targets:
        return error_response(404, not_found_model(request.path, name))
    results = await _send_all(gw, request, targets, body)
    gw.health.refresh_soon(0)
    for _, status, payload in results:
        if status != 200:
            return web.Response(status=status, body=payload, content_type="application/json")
    return web.Response(status=200)


async def broadcast_stream(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    """``/api/pull``, ``/api/create``, ``/api/blobs/*``: to every up backend."""
    try:
        body = await read_body(request, gw.settings.timeouts.client_body)
    except BadRequest as exc:
        return error_response(exc.status, str(exc))
    targets = gw.fleet.up_backends(time.monotonic())
    if not targets:
        return error_response(503, "no backend is available", headers={"Retry-After": "5"})
    if request.path.startswith("/api/blobs/"):
        results = await _send_all(gw, request, targets, body)
        status = max(s for _, s, _ in results)
        failed = [p for _, s, p in results if s >= 300]
        return web.Response(status=status, body=failed[0] if failed else None)
    try:
        data = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError as exc:
        return error_response(400, f"invalid JSON in request body: {exc}")
    stream = not (isinstance(data, dict) and data.get("stream") is False)
    if not stream:
        results = await _send_all(gw, request, targets, body)
        gw.health.refresh_soon(0)
        for b, status, payload in results:
            if status != 200:
                return error_response(status, f"{b.name}: {_error_text(payload)}")
        return _json({"status": "success"})
    return await _merge_progress(gw, request, targets, body)


def _error_text(payload: bytes) -> str:
    try:
        data = orjson.loads(payload)
        return str(data.get("error", data)) if isinstance(data, dict) else str(data)
    except orjson.JSONDecodeError:
        return payload.decode(errors="replace").strip() or "failed"


async def _merge_progress(gw: Gateway, request: web.BaseRequest, targets: Sequence[Backend],
                          body: bytes) -> web.StreamResponse:
    lines: asyncio.Queue[tuple[Backend, bytes | None]] = asyncio.Queue()
    failures: dict[str, str] = {}

    async def one(b: Backend) -> None:
        timeout = aiohttp.ClientTimeout(sock_connect=gw.timeouts.connect,
                                        sock_read=gw.timeouts.read)
        try:
            async with gw.session.post(b.url + request.path_qs, data=body, timeout=timeout,
                                       headers=upstream_headers(request)) as r:
                if r.status != 200:
                    failures[b.name] = _error_text(await r.read())
                    return
                ok = False
                async for raw in r.content:
                    line = raw.strip()
                    if not line:
                        continue
                    if line.startswith(b'{"error"'):
                        failures[b.name] = _error_text(line)
                        return
                    if line == b'{"status":"success"}':
                        ok = True
                        continue
                    await lines.put((b, line))
                if not ok:
                    failures[b.name] = "stream ended before success"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            failures[b.name] = repr(exc)
        finally:
            await lines.put((b, None))

    tasks = [asyncio.create_task(one(b)) for b in targets]
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    try:
        open_count = len(tasks)
        while open_count:
            _, line = await lines.get()
            if line is None:
                open_count -= 1
                continue
            await resp.write(line + b"\n")
    finally:
        for t in tasks:
            t.cancel()
    gw.health.refresh_soon(0)
    if failures:
        msg = "; ".join(f"{k}: {v}" for k, v in sorted(failures.items()))
        await resp.write(orjson.dumps({"error": msg}) + b"\n")
    else:
        await resp.write(b'{"status":"success"}\n')
    await resp.write_eof()
    return resp
