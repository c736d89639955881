"""The stand-in Ollama over real sockets: official clients, wire formats, errors, CLI."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import ollama
import openai
import orjson
import pytest

from tests.integration.conftest import MakeSim
from tests.waiting import eventually


@pytest.fixture
async def closers() -> AsyncIterator[list[Callable[[], Awaitable[None]]]]:
    """Close client pools inside the test's loop, not at garbage collection."""
    fns: list[Callable[[], Awaitable[None]]] = []
    yield fns
    for fn in fns:
        await fn()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_ollama_client_streaming_chat_matches_non_streaming(
    make_sim: MakeSim, closers: list[Callable[[], Awaitable[None]]]
) -> None:
    sim = await make_sim(tokens_per_second=0, default_num_predict=6)
    client = ollama.AsyncClient(host=sim.url)
    closers.append(client.close)
    messages = [{"role": "user", "content": "why is the sky blue"}]
    parts = [p async for p in await client.chat(model="llama3.2", messages=messages, stream=True)]
    assert len(parts) == 7
    assert all(not p.done and p.message.role == "assistant" for p in parts[:-1])
    final = parts[-1]
    assert final.done and final.done_reason == "stop" and final.message.content == ""
    assert final.eval_count == 6
    assert final.prompt_eval_count == 5 + 4  # words + template overhead
    assert final.total_duration and final.total_duration >= (final.load_duration or 0)
    whole = await client.chat(model="llama3.2", messages=messages)
    content = whole.message.content or ""
    assert content == "".join(p.message.content or "" for p in parts)
    assert len(content.split()) == 6


async def test_ollama_client_generate_list_ps_embed(
    make_sim: MakeSim, closers: list[Callable[[], Awaitable[None]]]
) -> None:
    sim = await make_sim(tokens_per_second=0)
    client = ollama.AsyncClient(host=sim.url)
    closers.append(client.close)
    assert (await client.ps()).models == []
    listed = await client.list()
    assert [m.model for m in listed.models] == [
        "llama3.2:latest", "qwen2.5:0.5b", "nomic-embed-text:latest"
    ]
    gen = await client.generate(model="llama3.2", prompt="hi there", options={"num_predict": 3})
    assert gen.done_reason == "length" and gen.eval_count == 3
    assert len((gen.response or "").split()) == 3
    assert gen.context and len(gen.context) == 2 + 3
    ps = await client.ps()
    assert [m.model for m in ps.models] == ["llama3.2:latest"]
    loaded = ps.models[0]
    assert loaded.context_length == 4096
    assert loaded.expires_at is not None and loaded.expires_at.timestamp() > time.time() + 200
    emb = await client.embed(model="nomic-embed-text", input=["alpha", "beta"])
    assert len(emb.embeddings) == 2
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-6) for v in emb.embeddings)
    again = await client.embed(model="nomic-embed-text", input="alpha")
    assert again.embeddings[0] == emb.embeddings[0]
    with pytest.raises(ollama.ResponseError) as err:
        await client.chat(model="missing", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404 and err.value.error == "model 'missing' not found"


async def test_openai_client_streaming_chat_with_usage(
    make_sim: MakeSim, closers: list[Callable[[], Awaitable[None]]]
) -> None:
    sim = await make_sim(tokens_per_second=0, default_num_predict=5)
    client = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x")
    closers.append(client.close)
    stream = await client.chat.completions.create(
        model="llama3.2",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    finish, usage = chunks[-2], chunks[-1]
    assert finish.choices[0].finish_reason == "stop" and finish.choices[0].delta.content is None
    assert usage.choices == [] and usage.usage is not None
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (5, 5)
    assert usage.usage.total_tokens == 10
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-2])
    assert len(text.split()) == 5

    whole = await client.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "hello"}], max_tokens=2
    )
    assert whole.object == "chat.completion" and whole.system_fingerprint == "fp_ollama"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 2

    emb = await client.embeddings.create(model="nomic-embed-text", input="hello")
    vec = emb.data[0].embedding
    assert len(vec) == 8 and math.isclose(sum(x * x for x in vec), 1.0, rel_tol=1e-5)
    models = (await client.models.list()).data
    assert models[0].id == "llama3.2:latest"
    with pytest.raises(openai.NotFoundError) as err:
        await client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )
    assert err.value.body == {
        "message": "model 'nope' not found", "type": "not_found_error", "param": None,
        "code": None,
    }


async def test_v1_completions_stream_with_usage(make_sim: MakeSim,
                                                http: aiohttp.ClientSession) -> None:
    sim = await make_sim(tokens_per_second=0)
    body = {"model": "llama3.2", "prompt": "say hi", "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    async with http.post(sim.url + "/v1/completions", json=body) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        raw = await resp.read()
    events = raw.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    objs = [orjson.loads(e[len(b"data: "):]) for e in events[:-2]]
    assert [o["object"] for o in objs] == ["text_completion"] * 4
    assert [o["choices"][0]["finish_reason"] for o in objs[:3]] == [None, None, "length"]
    assert all(o["usage"]["total_tokens"] == 0 for o in objs[:3])
    assert objs[3]["choices"] == [] and objs[3]["usage"]["completion_tokens"] == 2


async def test_native_stream_wire_format(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(tokens_per_second=0)
    body = {"model": "LLAMA3.2", "prompt": "a b c", "raw": True, "options": {"num_predict": 2}}
    async with http.post(sim.url + "/api/generate", json=body) as resp:
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        lines = (await resp.read()).split(b"\n")
    assert lines[-1] == b""
    objs = [orjson.loads(line) for line in lines[:-1]]
    assert [o["done"] for o in objs] == [False, False, True]
    assert all(o["model"] == "LLAMA3.2" for o in objs)  # echoes the request spelling
    assert all(o["created_at"].endswith("Z") for o in objs)
    assert "context" not in objs[-1]  # raw generate sends no context
    assert isinstance(objs[-1]["total_duration"], int) and objs[-1]["prompt_eval_count"] == 3
    async with http.post(sim.url + "/api/chat", json={
        "model": "qwen2.5:0.5b", "stream": False,
        "messages": [{"role": "user", "content": "x"}]}) as resp:
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        obj = await resp.json()
    assert obj["done"] and "context" not in obj and obj["message"]["role"] == "assistant"


async def test_first_chunk_arrives_long_before_last(make_sim: MakeSim,
                                                    http: aiohttp.ClientSession) -> None:
    sim = await make_sim(tokens_per_second=20, loaded=("llama3.2",))
    t0 = time.monotonic()
    arrivals = []
    body = {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 10}}
    async with http.post(sim.url + "/api/generate", json=body) as resp:
        async for _line in resp.content:
            arrivals.append(time.monotonic() - t0)
    assert len(arrivals) == 11
    assert arrivals[0] < 0.2  # one token at 20 tok/s is 50 ms
    assert arrivals[-1] >= 0.45  # ten tokens take 500 ms
    assert arrivals[5] - arrivals[0] >= 0.2  # spread out, not one burst


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/api/generate", {"model": "zzz", "prompt": "x"}, 404, "model 'zzz' not found"),
        ("/api/chat", {"model": "zzz", "messages": []}, 404, "model 'zzz' not found"),
        ("/api/show", {"model": "zzz"}, 404, "model 'zzz:latest' not found"),
        ("/api/embed", {"model": "zzz", "input": "x"}, 404,
         'model "zzz" not found, try pulling it first'),
        ("/api/embeddings", {"model": "zzz", "prompt": "x"}, 404,
         'model "zzz" not found, try pulling it first'),
        ("/api/generate", {"model": ""}, 404, "model '' not found"),
        ("/api/chat", {"model": ""}, 400, "model is required"),
        ("/api/generate", {"model": "llama3.2", "keep_alive": True}, 400,
         "Unsupported type: 'bool'"),
        ("/api/generate", {"model": "llama3.2", "keep_alive": "1d"}, 400,
         'time: unknown unit "d" in duration "1d"'),
        ("/api/generate", {"model": "llama3.2", "prompt": "x", "options": {"num_ctx": "x"}}, 500,
         'option "num_ctx" must be of type integer'),
        ("/api/generate", {"model": "nomic-embed-text", "prompt": "x"}, 400,
         '"nomic-embed-text" does not support generate'),
        ("/api/generate", [], 400,
         "json: cannot unmarshal array into Go value of type api.GenerateRequest"),
    ],
)
async def test_native_errors(make_sim: MakeSim, http: aiohttp.ClientSession, path: str,
                             body: Any, status: int, message: str) -> None:
    sim = await make_sim(tokens_per_second=0)
    async with http.post(sim.url + path, json=body) as resp:
        assert resp.status == status
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        assert await resp.json() == {"error": message}


async def test_body_and_routing_errors(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(tokens_per_second=0)
    async with http.post(sim.url + "/api/chat") as resp:
        assert (resp.status, await resp.json()) == (400, {"error": "missing request body"})
    async with http.post(sim.url + "/api/generate", data=b"{oops") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"].startswith("invalid character 'o'")
    async with http.get(sim.url + "/api/nothing") as resp:
        assert (resp.status, await resp.text()) == (404, "404 page not found")
        assert resp.headers["Content-Type"] == "text/plain"
    async with http.get(sim.url + "/api/generate") as resp:
        assert (resp.status, await resp.text()) == (405, "405 method not allowed")
    async with http.head(sim.url + "/") as resp:
        assert resp.status == 200
    async with http.get(sim.url + "/") as resp:
        assert await resp.text() == "Ollama is running"
    async with http.post(sim.url + "/v1/chat/completions",
                         json={"model": "llama3.2", "messages": []}) as resp:
        assert resp.status == 400
        err = (await resp.json())["error"]
        assert err["type"] == "invalid_request_error" and err["param"] is None


async def test_load_unload_eviction_and_expiry(make_sim: MakeSim,
                                               http: aiohttp.ClientSession) -> None:
    sim = await make_sim(tokens_per_second=0, max_loaded_models=1)

    async def ps() -> list[str]:
        async with http.get(sim.url + "/api/ps") as resp:
            return [m["name"] for m in (await resp.json())["models"]]

    async with http.post(sim.url + "/api/generate", json={"model": "llama3.2"}) as resp:
        obj = await resp.json()
    assert (obj["done"], obj["done_reason"], obj["response"]) == (True, "load", "")
    assert await ps() == ["llama3.2:latest"]
    async with http.post(sim.url + "/api/chat", json={"model": "qwen2.5:0.5b"}) as resp:
        assert (await resp.json())["done_reason"] == "load"
    assert await ps() == ["qwen2.5:0.5b"]  # llama3.2 was evicted for it
    async with http.post(sim.url + "/api/chat",
                         json={"model": "qwen2.5:0.5b", "keep_alive": 0}) as resp:
        obj = await resp.json()
    assert obj["done_reason"] == "unload" and obj["message"] == {"role": "assistant",
                                                                 "content": ""}
    assert await ps() == []
    async with http.post(sim.url + "/api/generate",
                         json={"model": "llama3.2", "keep_alive": "50ms"}) as resp:
        assert resp.status == 200
    assert await ps() == ["llama3.2:latest"]

    async def unloaded() -> bool:
        return await ps() == []

    await eventually(unloaded, "llama3.2 to unload once its 50 ms keep_alive has passed")
    stats = sim.state.stats
    assert (stats.loads, stats.evictions, stats.unloads) == (3, 1, 2)


async def test_model_management(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(tokens_per_second=0)
    async with http.post(sim.url + "/api/pull", json={"model": "gemma3:1b"}) as resp:
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        statuses = [orjson.loads(line)["status"] async for line in resp.content]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert any(s.startswith("pulling ") and len(s) == len("pulling ") + 12 for s in statuses)
    async with http.get(sim.url + "/api/tags") as resp:
        assert (await resp.json())["models"][0]["name"] == "gemma3:1b"
    async with http.post(sim.url + "/api/copy",
                         json={"source": "gemma3:1b", "destination": "mine"}) as resp:
        assert (resp.status, await resp.read()) == (200, b"")
    async with http.post(sim.url + "/api/show", json={"model": "mine"}) as resp:
        assert (await resp.json())["capabilities"] == ["completion", "tools"]
    async with http.delete(sim.url + "/api/delete", json={"model": "mine"}) as resp:
        assert (resp.status, await resp.read()) == (200, b"")
    async with http.delete(sim.url + "/api/delete", json={"model": "mine"}) as resp:
        assert resp.status == 404
    async with http.post(sim.url + "/api/pull", json={"model": "x", "stream": False}) as resp:
        assert await resp.json() == {"status": "success"}
    digest = "sha256:" + "ab" * 32
    async with http.head(sim.url + f"/api/blobs/{digest}") as resp:
        assert resp.status == 404
    async with http.post(sim.url + f"/api/blobs/{digest}", data=b"data") as resp:
        assert resp.status == 201
    async with http.head(sim.url + f"/api/blobs/{digest}") as resp:
        assert resp.status == 200
    async with http.get(sim.url + "/v1/models/gemma3:1b") as resp:
        assert (await resp.json())["owned_by"] == "library"


async def test_v1_models_data_is_null_when_empty(make_sim: MakeSim,
                                                 http: aiohttp.ClientSession) -> None:
    sim = await make_sim(models=())
    async with http.get(sim.url + "/v1/models") as resp:
        assert await resp.json() == {"object": "list", "data": None}
    async with http.get(sim.url + "/api/tags") as resp:
        assert await resp.json() == {"models": []}


async def test_openai_base64_embeddings_decode_to_the_vector(make_sim: MakeSim,
                                                             http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    body = {"model": "nomic-embed-text", "input": ["a", "b"], "encoding_format": "base64"}
    async with http.post(sim.url + "/v1/embeddings", json=body) as resp:
        obj = await resp.json()
    assert [d["index"] for d in obj["data"]] == [0, 1]
    raw = base64.b64decode(obj["data"][0]["embedding"])
    assert len(raw) == 8 * 4
    assert obj["usage"] == {"prompt_tokens": 2, "total_tokens": 2}


async def test_cli_serves_until_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.simulate", "--port", "0", "--port", "0", "--instant",
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    try:
        lines = [await asyncio.wait_for(proc.stdout.readline(), 10) for _ in range(2)]
        urls = [line.decode().strip().rsplit(" ", 1)[-1] for line in lines]
        assert all(line.startswith(b"simulated ollama listening on http://127.0.0.1:")
                   for line in lines)
        assert urls[0] != urls[1]
        async with aiohttp.ClientSession() as http:
            for url in urls:
                async with http.post(url + "/api/generate", json={
                        "model": "llama3.2", "prompt": "x", "stream": False}) as resp:
                    assert (await resp.json())["eval_count"] == 16
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0


@pytest.mark.parametrize("stream", [True, False])
async def test_generation_stops_when_the_client_leaves(make_sim: MakeSim, stream: bool) -> None:
    """Ollama stops generating when its client goes away, streamed or not: the slot is
    free at once and the work done so far is all the busy time there is."""
    sim = await make_sim(models=("llama3.2",), loaded=("llama3.2",), tokens_per_second=100.0)
    body = {"model": "llama3.2", "prompt": "x", "stream": stream,
            "options": {"num_predict": 300}}                      # 3 s of work
    async with aiohttp.ClientSession() as http:
        async def ask() -> None:
            async with http.post(sim.url + "/api/generate", json=body) as resp:
                await resp.read()

        task = asyncio.create_task(ask())
        await eventually(lambda: sim.state.stats.in_flight == 1, "the stand-in to start work")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await eventually(lambda: sim.state.stats.cancelled >= 1,
                     "the stand-in to count the abandoned request cancelled")
    stats = sim.state.stats
    assert (stats.cancelled, stats.completed, stats.in_flight) == (1, 0, 0)
    assert stats.busy_seconds() < 1.0
