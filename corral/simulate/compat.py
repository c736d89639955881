"""OpenAI-compatible layer (/v1), shaped like Ollama's middleware/openai.go."""

from __future__ import annotations

import array
import base64
import random
import time
from typing import Any

import orjson
from aiohttp import web

from corral.simulate.engine import SimEngine
from corral.simulate.inference import Job, Timing, drive, embed_pass, load_only
from corral.simulate.keys import ENGINE
from corral.simulate.models import ModelInfo, namespace
from corral.simulate.native import embed_inputs, embed_model, plan
from corral.simulate.tokens import count_messages, count_prompt, count_text, seed_of, unit_vector
from corral.simulate.wire import (
    SSE_CT,
    ApiError,
    get_bool,
    get_list,
    get_str,
    go_kind,
    read_body,
)

_PLAIN_JSON = "application/json"
_DONE = b"data: [DONE]\n\n"
_ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def openai_error(status: int, message: str) -> web.Response:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.Response(
        body=orjson.dumps(body), status=status, headers={"Content-Type": _PLAIN_JSON}
    )


def _usage(job: Job) -> dict[str, int]:
    n = len(job.words)
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": n,
            "total_tokens": job.prompt_tokens + n}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class _SseEncoder:
    stream_content_type = SSE_CT
    whole_content_type = _PLAIN_JSON

    def __init__(self, prefix: str, model: str, include_usage: bool) -> None:
        # Ids are "<prefix>-<0..998>" as in Ollama; created is pinned to the first chunk.
        self.id = f"{prefix}-{random.randrange(999)}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage


class ChatCompletionEncoder(_SseEncoder):
    def __init__(self, model: str, include_usage: bool) -> None:
        super().__init__("chatcmpl", model, include_usage)
        self._head = (
            b'data: {"id":"' + self.id.encode() + b'","object":"chat.completion.chunk","created":'
            + str(self.created).encode() + b',"model":' + orjson.dumps(model)
            + b',"system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":'
        )

    def chunk(self, word: str, index: int) -> bytes:
        delta = b'{"role":"assistant","content":' if index == 0 else b'{"content":'
        return self._head + delta + orjson.dumps(word) + b'},"finish_reason":null}]}\n\n'

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "fp_ollama"}

    def final(self, job: Job, t: Timing) -> bytes:
        out = self._head + b'{},"finish_reason":' + orjson.dumps(job.reason) + b"}]}\n\n"
        if self.include_usage:
            out += _sse({**self._base("chat.completion.chunk"), "choices": [],
                         "usage": _usage(job)})
        return out + _DONE

    def whole(self, job: Job, t: Timing, text: str) -> bytes:
        return orjson.dumps({
            **self._base("chat.completion"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": job.reason}],
            "usage": _usage(job),
        })


class CompletionEncoder(_SseEncoder):
    def __init__(self, model: str, include_usage: bool) -> None:
        super().__init__("cmpl", model, include_usage)

    def _chunk(self, text: str, reason: str | None, choices: bool = True) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": self.id, "object": "text_completion", "created": self.created,
            "choices": [{"text": text, "index": 0, "finish_reason": reason}] if choices else [],
            "model": self.model, "system_fingerprint": "fp_ollama",
        }
        if self.include_usage:
            # Ollama puts a zeroed usage on every chunk and the real one in an extra chunk.
            obj["usage"] = _ZERO_USAGE
        return obj

    def chunk(self, word: str, index: int) -> bytes:
        return _sse(self._chunk(word, None))

    def final(self, job: Job, t: Timing) -> bytes:
        out = _sse(self._chunk("", job.reason))
        if self.include_usage:
            out += _sse({**self._chunk("", None, choices=False), "usage": _usage(job)})
        return out + _DONE

    def whole(self, job: Job, t: Timing, text: str) -> bytes:
        return orjson.dumps({
            "id": self.id, "object": "text_completion", "created": self.created,
            "model": self.model, "system_fingerprint": "fp_ollama",
            "choices": [{"text": text, "index": 0, "finish_reason": job.reason}],
            "usage": _usage(job),
        })


def _stream_opts(body: dict[str, Any], struct: str) -> tuple[bool, bool, int | None]:
    stream = get_bool(body, "stream", struct) is True  # /v1 defaults to not streaming
    opts = body.get("stream_options")
    include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
    max_tokens = body.get("max_tokens")  # becomes num_predict; max_completion_tokens is ignored
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
        raise ApiError(400, f"json: cannot unmarshal {go_kind(max_tokens)} into Go struct "
                            f"field {struct}.max_tokens of type int")
    return stream, include_usage, max_tokens


def _text_of(content: Any) -> str:
    """Message content may be a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _model(engine: SimEngine, model: str, capability: str) -> ModelInfo:
    if not model:
        raise ApiError(400, "model is required")
    info = engine.find(model)
    if info is None:
        raise ApiError(404, f"model '{model}' not found")
    if info.embedding_only:
        raise ApiError(400, f'"{model}" does not support {capability}')
    return info


async def chat_completions(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter_ns()
    engine = request.app[ENGINE]
    s = "ChatCompletionRequest"
    try:
        body = await read_body(request, "openai.ChatCompletionRequest", empty_message="EOF")
        model = get_str(body, "model", s)
        raw_msgs = get_list(body, "messages", s, "[]openai.Message")
        stream, include_usage, max_tokens = _stream_opts(body, s)
        if not raw_msgs:
            raise ApiError(400, "[] is too short - 'messages'")
        msgs = [{"role": str(m.get("role") or ""), "content": _text_of(m.get("content"))}
                for m in raw_msgs if isinstance(m, dict)]
        info = _model(engine, model, "chat")
        toks, reason = plan(engine.cfg, max_tokens, seed_of(msgs[-1]["content"] if msgs else ""))
        job = Job(info, None, engine.resolve_ctx(info, None), count_messages(msgs), toks, reason,
                  started)
        return await drive(request, engine, job, ChatCompletionEncoder(model, include_usage),
                           stream)
    except ApiError as exc:
        return openai_error(exc.status, exc.message)


async def completions(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter_ns()
    engine = request.app[ENGINE]
    s = "CompletionRequest"
    try:
        body = await read_body(request, "openai.CompletionRequest", empty_message="EOF")
        model = get_str(body, "model", s)
        stream, include_usage, max_tokens = _stream_opts(body, s)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if prompt is not None and not isinstance(prompt, str):
            raise ApiError(400, "invalid type for 'prompt' field")
        prompt = prompt or ""
        info = _model(engine, model, "generate")
        ctx = engine.resolve_ctx(info, None)
        enc = CompletionEncoder(model, include_usage)
        if not prompt:
            # Reaches Ollama's generate handler as a load request.
            job = Job(info, None, ctx, 0, [], "load", started)
            await load_only(engine, job)
            return web.Response(body=enc.whole(job, Timing(), ""),
                                headers={"Content-Type": _PLAIN_JSON})
        seed = seed_of(prompt)
        toks, reason = plan(engine.cfg, max_tokens, seed)
        job = Job(info, None, ctx, count_prompt(prompt), toks, reason, started)
        return await drive(request, engine, job, enc, stream)
    except ApiError as exc:
        return openai_error(exc.status, exc.message)


async def embeddings(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter_ns()
    engine = request.app[ENGINE]
    try:
        body = await read_body(request, "openai.EmbedRequest", empty_message="EOF")
        model = get_str(body, "model", "EmbedRequest")
        if body.get("input") is None:
            raise ApiError(400, "invalid input")
        inputs = embed_inputs(body["input"])
        b64 = body.get("encoding_format") == "base64"
        dims = body.get("dimensions")
        dimensions = dims if isinstance(dims, int) and not isinstance(dims, bool) else None
        info = embed_model(engine, model)
        n_prompt = sum(max(1, count_text(x)) for x in inputs)
        t = await embed_pass(request, engine, info, None, engine.resolve_ctx(info, None),
                             n_prompt, started, run=bool(inputs))
        if t is None:
            return web.Response()  # connection already cut
        data: list[dict[str, Any]] = []
        for i, text in enumerate(inputs):
            vec = unit_vector(text, dimensions)
            emb: Any = base64.b64encode(array.array("f", vec).tobytes()).decode() if b64 else vec
            data.append({"object": "embedding", "embedding": emb, "index": i})
        return web.Response(
            body=orjson.dumps({"object": "list", "data": data, "model": model,
                               "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt}}),
            headers={"Content-Type": _PLAIN_JSON},
        )
    except ApiError as exc:
        return openai_error(exc.status, exc.message)


def _model_entry(name: str, modified_ns: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": modified_ns // 1_000_000_000,
            "owned_by": namespace(name)}


async def list_models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    entries = sorted(engine.installed.values(), key=lambda e: e.modified_ns, reverse=True)
    # Go marshals the nil slice of an empty list as null.
    data = [_model_entry(e.info.name, e.modified_ns) for e in entries] or None
    return web.Response(body=orjson.dumps({"object": "list", "data": data}),
                        headers={"Content-Type": _PLAIN_JSON})


async def retrieve_model(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    name = request.match_info["model"]
    info = engine.find(name)
    if info is None:
        return openai_error(404, f"model '{name}' not found")
    entry = engine.installed[info.name]
    return web.Response(body=orjson.dumps(_model_entry(info.name, entry.modified_ns)),
                        headers={"Content-Type": _PLAIN_JSON})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/chat/completions", chat_completions)
    r.add_post("/v1/completions", completions)
    r.add_post("/v1/embeddings", embeddings)
    r.add_get("/v1/models", list_models, allow_head=False)
    r.add_get("/v1/models/{model:.+}", retrieve_model, allow_head=False)
