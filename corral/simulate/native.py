"""Ollama's own inference endpoints: /api/generate, /api/chat, /api/embed(dings)."""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from corral.simulate.config import SimConfig
from corral.simulate.durations import parse_keep_alive, rfc3339_nano
from corral.simulate.engine import SimEngine
from corral.simulate.inference import Job, Timing, drive, embed_pass, load_only, metrics
from corral.simulate.keys import ENGINE
from corral.simulate.models import ModelInfo
from corral.simulate.tokens import (
    context_ids,
    count_messages,
    count_prompt,
    count_text,
    raw_vector,
    seed_of,
    unit_vector,
    words,
)
from corral.simulate.wire import (
    JSON_CT,
    NDJSON_CT,
    ApiError,
    error_response,
    get_bool,
    get_list,
    get_options,
    get_str,
    int_option,
    json_response,
    read_body,
)


def plan(cfg: SimConfig, num_predict: int | None, seed: int) -> tuple[list[str], str]:
    """Tokens to generate and the done_reason once they are out.

    num_predict unset or negative means "until EOS" in Ollama; the stand-in
    stops after default_num_predict tokens and calls that a natural stop.
    """
    if num_predict is None or num_predict < 0:
        return words(seed, cfg.default_num_predict), "stop"
    return words(seed, num_predict), "length"


def keep_alive_of(body: dict[str, Any]) -> float | None:
    try:
        return parse_keep_alive(body.get("keep_alive"))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


class _NdjsonEncoder:
    """Common part of generate and chat chunks; the text field differs."""

    stream_content_type = NDJSON_CT
    whole_content_type = JSON_CT

    def __init__(self, model: str) -> None:
        self.model = model
        # Chunks are hot in benchmarks: splice pre-encoded pieces instead of
        # building a dict per token.
        self._head = b'{"model":' + orjson.dumps(model) + b',"created_at":"'

    def _final_obj(self, job: Job, t: Timing, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def final(self, job: Job, t: Timing) -> bytes:
        return orjson.dumps(self._final_obj(job, t, "")) + b"\n"

    def whole(self, job: Job, t: Timing, text: str) -> bytes:
        return orjson.dumps(self._final_obj(job, t, text))


class GenerateEncoder(_NdjsonEncoder):
    def __init__(self, model: str, context: list[int] | None) -> None:
        super().__init__(model)
        self.context = context

    def chunk(self, word: str, index: int) -> bytes:
        return (
            self._head + rfc3339_nano().encode() + b'","response":' + orjson.dumps(word)
            + b',"done":false}\n'
        )

    def _final_obj(self, job: Job, t: Timing, text: str) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "model": self.model,
            "created_at": rfc3339_nano(),
            "response": text,
            "done": True,
            "done_reason": job.reason,
        }
        if self.context is not None:
            obj["context"] = self.context
        obj.update(metrics(job, t))
        return obj


class ChatEncoder(_NdjsonEncoder):
    def chunk(self, word: str, index: int) -> bytes:
        return (
            self._head + rfc3339_nano().encode()
            + b'","message":{"role":"assistant","content":' + orjson.dumps(word)
            + b'},"done":false}\n'
        )

    def _final_obj(self, job: Job, t: Timing, text: str) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "model": self.model,
            "created_at": rfc3339_nano(),
            "message": {"role": "assistant", "content": text},
            "done": True,
            "done_reason": job.reason,
        }
        obj.update(metrics(job, t))
        return obj


def _special(model: str, reason: str, chat: bool) -> web.Response:
    """Reply to a load/unload request: one object, never streamed."""
    obj: dict[str, Any] = {"model": model, "created_at": rfc3339_nano()}
    if chat:
        obj["message"] = {"role": "assistant", "content": ""}
    else:
        obj["response"] = ""
    obj["done"] = True
    obj["done_reason"] = reason
    return json_response(obj)


def _require_model(engine: SimEngine, model: str) -> ModelInfo:
    info = engine.find(model) if model else None
    if info is None:
        raise ApiError(404, f"model '{model}' not found")
    return info


async def generate(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter_ns()
    engine = request.app[ENGINE]
    s = "GenerateRequest"
    try:
        body = await read_body(request, "api.GenerateRequest")
        model = get_str(body, "model", s)
        prompt = get_str(body, "prompt", s)
        system = get_str(body, "system", s)
        raw = get_bool(body, "raw", s)
        stream = get_bool(body, "stream", s) is not False
        keep_alive = keep_alive_of(body)
        options = get_options(body, s)
        num_predict = int_option(options, "num_predict")
        num_ctx = int_option(options, "num_ctx")
        info = _require_model(engine, model)
        if not prompt and keep_alive == 0:
            engine.expire(info)
            return _special(model, "unload", chat=False)
        if info.embedding_only:
            raise ApiError(400, f'"{model}" does not support generate')
        ctx = engine.resolve_ctx(info, num_ctx)
        if not prompt:
            await load_only(engine, Job(info, keep_alive, ctx, 0, [], "load", started))
            return _special(model, "load", chat=False)
        seed = seed_of(prompt)
        toks, reason = plan(engine.cfg, num_predict, seed)
        n_prompt = count_prompt(prompt, system)
        job = Job(info, keep_alive, ctx, n_prompt, toks, reason, started)
        context = None if raw else context_ids(seed, n_prompt, len(toks))
        return await drive(request, engine, job, GenerateEncoder(model, context), stream)
    except ApiError as exc:
        return error_response(exc.status, exc.message)


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    msgs = get_list(body, "messages", "ChatRequest", "[]api.Message")
    for m in msgs:
        if not isinstance(m, dict):
            raise ApiError(
                400,
                "json: cannot unmarshal "
                f"{'string' if isinstance(m, str) else 'number'} into Go struct field "
                "ChatRequest.messages of type api.Message",
            )
        for key in ("role", "content"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise ApiError(
                    400,
                    "json: cannot unmarshal non-string into Go struct field "
                    f"ChatRequest.messages.{key} of type string",
                )
    return msgs


async def chat(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter_ns()
    engine = request.app[ENGINE]
    s = "ChatRequest"
    try:
        body = await read_body(request, "api.ChatRequest")
        model = get_str(body, "model", s)
        msgs = _messages(body)
        stream = get_bool(body, "stream", s) is not False
        keep_alive = keep_alive_of(body)
        options = get_options(body, s)
        num_predict = int_option(options, "num_predict")
        num_ctx = int_option(options, "num_ctx")
        if not model:
            raise ApiError(400, "model is required")
        info = _require_model(engine, model)
        if not msgs and keep_alive == 0:
            engine.expire(info)
            return _special(model, "unload", chat=True)
        if info.embedding_only:
            raise ApiError(400, f'"{model}" does not support chat')
        ctx = engine.resolve_ctx(info, num_ctx)
        if not msgs:
            await load_only(engine, Job(info, keep_alive, ctx, 0, [], "load", started))
            return _special(model, "load", chat=True)
        last = msgs[-1].get("content")
        toks, reason = plan(engine.cfg, num_predict, seed_of(last if isinstance(last, str) else ""))
        job = Job(info, keep_alive, ctx, count_messages(msgs), toks, reason, started)
        return await drive(request, engine, job, ChatEncoder(model), stream)
    except ApiError as exc:
        return error_response(exc.status, exc.message)


def embed_model(engine: SimEngine, model: str) -> ModelInfo:
    if not model:
        raise ApiError(400, "model is required")
    info = engine.find(model)
    if info is None:
        raise ApiError(404, f'model "{model}" not found, try pulling it first')
    return info


def embed_inputs(value: Any) -> list[str]:
    """``input`` of /api/embed and /v1/embeddings: a string or a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ApiError(400, "invalid input type")


async def embed(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter_ns()
    engine = request.app[ENGINE]
    try:
        body = await read_body(request, "api.EmbedRequest")
        model = get_str(body, "model", "EmbedRequest")
        inputs = embed_inputs(body.get("input"))
        keep_alive = keep_alive_of(body)
        options = get_options(body, "EmbedRequest")
        num_ctx = int_option(options, "num_ctx")
        dims = body.get("dimensions")
        dimensions = dims if isinstance(dims, int) and not isinstance(dims, bool) else None
        info = embed_model(engine, model)
        n_prompt = sum(max(1, count_text(x)) for x in inputs)
        t = await embed_pass(
            request, engine, info, keep_alive, engine.resolve_ctx(info, num_ctx), n_prompt,
            started, run=bool(inputs),
        )
        if t is None:
            return web.Response()  # connection already cut
        if not inputs:
            return json_response({"model": model, "embeddings": []})
        obj: dict[str, Any] = {
            "model": model,
            "embeddings": [unit_vector(x, dimensions) for x in inputs],
            "total_duration": t.total,
            "load_duration": t.load,
            "prompt_eval_count": n_prompt,
        }
        return json_response(obj)
    except ApiError as exc:
        return error_response(exc.status, exc.message)


async def embeddings(request: web.Request) -> web.StreamResponse:
    """Legacy endpoint: one prompt, vector not normalised, empty prompt gives []."""
    started = time.perf_counter_ns()
    engine = request.app[ENGINE]
    try:
        body = await read_body(request, "api.EmbeddingRequest")
        model = get_str(body, "model", "EmbeddingRequest")
        prompt = get_str(body, "prompt", "EmbeddingRequest")
        keep_alive = keep_alive_of(body)
        num_ctx = int_option(get_options(body, "EmbeddingRequest"), "num_ctx")
        info = embed_model(engine, model)
        t = await embed_pass(
            request, engine, info, keep_alive, engine.resolve_ctx(info, num_ctx),
            max(1, count_text(prompt)), started, run=bool(prompt),
        )
        if t is None:
            return web.Response()
        return json_response({"embedding": raw_vector(prompt) if prompt else []})
    except ApiError as exc:
        return error_response(exc.status, exc.message)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/embed", embed)
    app.router.add_post("/api/embeddings", embeddings)
