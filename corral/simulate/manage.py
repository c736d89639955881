"""Model management and listing endpoints: /, version, tags, ps, show, pull, push,
create, copy, delete, blobs. None of them is affected by the oom/hang/drop faults."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web

from corral.simulate.durations import rfc3339_nano
from corral.simulate.keys import ENGINE
from corral.simulate.models import ModelInfo, normalise, show_body, valid_name
from corral.simulate.wire import (
    NDJSON_CT,
    ApiError,
    empty_response,
    error_response,
    get_bool,
    get_str,
    json_response,
    read_body,
)

_DIGEST = re.compile(r"^sha256[:-][0-9a-f]{64}$")


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.Response:
    return json_response({"version": request.app[ENGINE].cfg.version})


def _tag_entry(info: ModelInfo, modified_ns: int) -> dict[str, Any]:
    details = info.details()
    details["context_length"] = info.context_length
    details["embedding_length"] = info.embedding_length
    return {
        "name": info.name,
        "model": info.name,
        "modified_at": rfc3339_nano(modified_ns),
        "size": info.size,
        "digest": info.digest,
        "details": details,
        "capabilities": info.capabilities,
    }


async def tags(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    entries = sorted(engine.installed.values(), key=lambda e: e.modified_ns, reverse=True)
    return json_response({"models": [_tag_entry(e.info, e.modified_ns) for e in entries]})


async def ps(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    rows = []
    for r in engine.loaded():
        size = r.info.loaded_size(r.num_ctx, r.parallel)
        rows.append(
            (
                r.expires_at_ns(),
                {
                    "name": r.info.name,
                    "model": r.info.name,
                    "size": size,
                    "digest": r.info.digest,
                    "details": r.info.details(),
                    "size_vram": size,
                    "context_length": r.num_ctx,
                },
            )
        )
    rows.sort(key=lambda row: row[0], reverse=True)  # latest expiry first
    models = []
    for expires_ns, entry in rows:
        entry["expires_at"] = rfc3339_nano(expires_ns)
        models.append(entry)
    return json_response({"models": models})


def _model_field(body: dict[str, Any], struct: str) -> str:
    # Older clients send "name"; Ollama accepts either.
    return get_str(body, "model", struct) or get_str(body, "name", struct)


async def show(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    try:
        body = await read_body(request, "api.ShowRequest")
        model = _model_field(body, "ShowRequest")
        if not model:
            raise ApiError(400, "model is required")
        entry = engine.installed.get(normalise(model))
        if entry is None:
            raise ApiError(404, f"model '{normalise(model)}' not found")
        return json_response(show_body(entry.info, rfc3339_nano(entry.modified_ns)))
    except ApiError as exc:
        return error_response(exc.status, exc.message)


async def _progress(
    request: web.Request, stream: bool, steps: Iterable[dict[str, Any]]
) -> web.StreamResponse:
    """NDJSON progress, or only the last object when stream is false."""
    items = list(steps)
    if not stream:
        return json_response(items[-1])
    resp = web.StreamResponse(headers={"Content-Type": NDJSON_CT})
    await resp.prepare(request)
    for item in items:
        await resp.write(orjson.dumps(item) + b"\n")
    return resp


def _layer_steps(verb: str, info: ModelInfo) -> list[dict[str, Any]]:
    digest = "sha256:" + info.digest
    status = f"{verb} {info.digest[:12]}"
    half = info.size // 2
    return [
        {"status": status, "digest": digest, "total": info.size},
        {"status": status, "digest": digest, "total": info.size, "completed": half},
        {"status": status, "digest": digest, "total": info.size, "completed": info.size},
    ]


async def _progress_request(request: web.Request,
                            kind: str) -> tuple[dict[str, Any], str, bool]:
    """Body, model and stream flag of a pull/push/create request, checked as Ollama
    checks them (Go type names in decoding errors, model name syntax)."""
    body = await read_body(request, f"api.{kind}")
    model = _model_field(body, kind)
    stream = get_bool(body, "stream", kind) is not False
    if not valid_name(model):
        raise ApiError(400, "invalid model name")
    return body, model, stream


async def pull(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    try:
        _, model, stream = await _progress_request(request, "PullRequest")
        info = engine.install(model)  # the fake registry has every model
        steps = [
            {"status": "pulling manifest"},
            *_layer_steps("pulling", info),
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        return await _progress(request, stream, steps)
    except ApiError as exc:
        return error_response(exc.status, exc.message)


async def push(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    try:
        _, model, stream = await _progress_request(request, "PushRequest")
        info = engine.find(model)
        if info is None:
            raise ApiError(404, f"model '{model}' not found")
        steps = [
            {"status": "retrieving manifest"},
            *_layer_steps("pushing", info),
            {"status": "pushing manifest"},
            {"status": "success"},
        ]
        return await _progress(request, stream, steps)
    except ApiError as exc:
        return error_response(exc.status, exc.message)


async def create(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    try:
        body, model, stream = await _progress_request(request, "CreateRequest")
        base = get_str(body, "from", "CreateRequest")
        steps: list[dict[str, Any]] = []
        if base:
            parent = engine.find(base)
            if parent is None:
                raise ApiError(404, f"model '{base}' not found")
            steps.append({"status": f"using existing layer sha256:{parent.digest}"})
        info = engine.install(model)
        steps += [
            {"status": f"writing manifest sha256:{info.digest}"},
            {"status": "success"},
        ]
        return await _progress(request, stream, steps)
    except ApiError as exc:
        return error_response(exc.status, exc.message)


async def copy(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    try:
        body = await read_body(request, "api.CopyRequest")
        src = get_str(body, "source", "CopyRequest")
        dst = get_str(body, "destination", "CopyRequest")
        if not valid_name(src):
            raise ApiError(400, f'source "{src}" is invalid')
        if not valid_name(dst):
            raise ApiError(400, f'destination "{dst}" is invalid')
        entry = engine.installed.get(normalise(src))
        if entry is None:
            raise ApiError(404, f'model "{src}" not found')
        engine.install(dst)
        return empty_response()
    except ApiError as exc:
        return error_response(exc.status, exc.message)


async def delete(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    try:
        body = await read_body(request, "api.DeleteRequest")
        model = _model_field(body, "DeleteRequest")
        if not model:
            raise ApiError(400, "model is required")
        if not engine.remove(model):
            raise ApiError(404, f"model '{model}' not found")
        return empty_response()
    except ApiError as exc:
        return error_response(exc.status, exc.message)


def _digest(request: web.Request) -> str:
    digest = request.match_info["digest"]
    if not _DIGEST.match(digest):
        raise ApiError(400, "invalid digest format")
    return digest.replace("-", ":", 1)


async def head_blob(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    try:
        digest = _digest(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message)
    if digest in engine.blobs:
        return empty_response()
    return error_response(404, f'blob "{request.match_info["digest"]}" not found')


async def post_blob(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    try:
        digest = _digest(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message)
    if digest in engine.blobs:
        return empty_response(200)
    await request.read()  # a real server would verify the digest of the upload
    engine.blobs.add(digest)
    return empty_response(201)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", root)  # GET also answers HEAD
    r.add_get("/api/version", version)
    r.add_get("/api/tags", tags)
    r.add_get("/api/ps", ps, allow_head=False)
    r.add_post("/api/show", show)
    r.add_post("/api/pull", pull)
    r.add_post("/api/push", push)
    r.add_post("/api/create", create)
    r.add_post("/api/copy", copy)
    r.add_delete("/api/delete", delete)
    r.add_head("/api/blobs/{digest}", head_blob)
    r.add_post("/api/blobs/{digest}", post_blob)
