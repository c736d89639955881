"""The core gateway end to end: real Corral, real stand-in backends, official clients."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import ollama
import openai
import pytest

from tests.integration.conftest import backends
from tests.waiting import eventually


@pytest.fixture
def fleet(start_sim: Any, start_corral: Any) -> Any:
    """Two backends: both have llama3.2; only b1 has mistral."""
    a = start_sim("--models", "llama3.2:latest,nomic-embed-text:latest",
                  "--loaded", "llama3.2:latest", "--tps", "200", "--parallel", "2")
    b = start_sim("--models", "llama3.2:latest,mistral:7b", "--tps", "200", "--parallel", "2")
    gw = start_corral({"backends": backends(a, b, slots=2)})
    return gw, a, b


async def test_official_ollama_client_streams_and_lists(fleet: Any) -> None:
    gw, a, b = fleet
    client = ollama.AsyncClient(host=gw.url)
    parts = []
    async for part in await client.chat(model="llama3.2", stream=True,
                                        messages=[{"role": "user", "content": "hi"}]):
        parts.append(part)
    assert len(parts) > 2
    assert parts[-1].done and parts[-1].eval_count and parts[-1].eval_count > 0
    assert "".join(p.message.content or "" for p in parts).strip()

    gen = [p async for p in await client.generate(model="llama3.2", prompt="x", stream=True)]
    assert gen[-1].done and gen[-1].prompt_eval_count is not None

    emb = await client.embed(model="nomic-embed-text", input=["a", "b"])
    assert len(emb.embeddings) == 2

    listed = await client.list()
    names = sorted(m.model or "" for m in listed.models)
    # the fleet's union, each model once
    assert names == ["llama3.2:latest", "mistral:7b", "nomic-embed-text:latest"]


async def test_official_openai_client_streams(fleet: Any) -> None:
    gw, _, _ = fleet
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused")
    stream = await client.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text.strip()
    assert usage is not None and usage.completion_tokens > 0
    models = await client.models.list()
    assert {m.id for m in models.data} >= {"llama3.2:latest", "mistral:7b"}
    await client.close()


async def test_tokens_arrive_as_they_are_produced(start_sim: Any, start_corral: Any) -> None:
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest",
                    "--tps", "10")
    gw = start_corral({"backends": backends(sim)})
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        async with s.post(gw.url + "/api/generate", json={
                "model": "llama3.2", "prompt": "p", "options": {"num_predict": 10}}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("application/x-ndjson")
            stamps = []
            async for line in r.content:
                if line.strip():
                    stamps.append(time.monotonic() - t0)
    # 10 tokens at 10/s take about a second: the first line must not wait for the last.
    assert len(stamps) == 11
    assert stamps[-1] - stamps[0] > 0.6
    assert stamps[0] < stamps[-1] / 2


async def test_slot_cap_is_never_exceeded(start_sim: Any, start_corral: Any) -> None:
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest",
                    "--tps", "100", "--parallel", "4")
    gw = start_corral({"backends": backends(sim, slots=1)})
    async with aiohttp.ClientSession() as s:
        async def one() -> int:
            async with s.post(gw.url + "/api/generate", json={
                    "model": "llama3.2", "prompt": "p", "options": {"num_predict": 5}}) as r:
                await r.read()
                return r.status
        statuses = await asyncio.gather(*(one() for _ in range(6)))
    assert statuses == [200] * 6
    stats = sim.stats()
    # The stand-in could run 4 at once; Corral must have sent them one at a time.
    assert stats["max_concurrent"] == 1
    assert stats["completed"] == 6
    waits = [r["queue_wait_ms"] for r in gw.records() if r["path"] == "/api/generate"]
    assert len(waits) == 6 and max(waits) > 20


async def test_queue_depth_and_wait_bounds(start_sim: Any, start_corral: Any) -> None:
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest",
                    "--tps", "20")
    gw = start_corral({"backends": backends(sim, slots=1),
                       "queue": {"max_depth": 1, "max_wait": "300ms"}})
    body = {"model": "llama3.2", "prompt": "p", "options": {"num_predict": 20}}
    async with aiohttp.ClientSession() as s:
        async def one() -> tuple[int, str | None, dict[str, Any]]:
            async with s.post(gw.url + "/api/generate", json=body) as r:
                raw = await r.read()
                data = json.loads(raw.splitlines()[-1]) if raw else {}
                return r.status, r.headers.get("Retry-After"), data
        results = await asyncio.gather(*(one() for _ in range(3)))
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 503, 503]
    for status, retry_after, data in results:
        if status == 503:
            assert retry_after is not None and int(retry_after) >= 1
            assert "busy" in data["error"]


async def test_disconnect_frees_the_slot(start_sim: Any, start_corral: Any) -> None:
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest",
                    "--tps", "5")
    gw = start_corral({"backends": backends(sim, slots=1)})
    async with aiohttp.ClientSession() as s:
        r = await s.post(gw.url + "/api/generate", json={
            "model": "llama3.2", "prompt": "p", "options": {"num_predict": 100}})
        await r.content.readline()
        r.close()                                  # the client goes away mid-stream
        t0 = time.monotonic()
        async with s.post(gw.url + "/api/generate", json={
                "model": "llama3.2", "prompt": "p", "options": {"num_predict": 1}}) as r2:
            assert r2.status == 200
            await r2.read()
        # Served at once, not after the abandoned 20 s generation.
        assert time.monotonic() - t0 < 5
    await eventually(lambda: sim.stats()["cancelled"] >= 1,
                     "the stand-in to see the abandoned generation cancelled")
    assert sim.stats()["cancelled"] == 1
    assert gw.status()["backends"][0]["in_flight"] == 0


async def test_waiting_client_that_leaves_leaves_the_queue(start_sim: Any,
                                                            start_corral: Any) -> None:
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--tps", "20")
    gw = start_corral({"backends": backends(sim, slots=1)})
    body = {"model": "llama3.2", "prompt": "p", "options": {"num_predict": 20}}
    async with aiohttp.ClientSession() as s:
        holder = asyncio.create_task(s.post(gw.url + "/api/generate", json=body))
        await eventually(lambda: sim.stats()["in_flight"] == 1, "the first request to run")
        waiter = asyncio.create_task(s.post(gw.url + "/api/generate", json=body))
        await eventually(lambda: gw.status()["queue"]["depth"] == 1,
                         "the second request to wait in the queue")
        waiter.cancel()
        await eventually(lambda: gw.status()["queue"]["depth"] == 0,
                         "the departed waiter to leave the queue")
        (await holder).close()
    # The departed waiter never reached the backend, even once the slot was free.
    await eventually(lambda: gw.status()["backends"][0]["in_flight"] == 0,
                     "the first request's slot to be free")
    assert sim.stats()["requests"].get("/api/generate", 0) == 1


async def test_model_aware_routing_and_unknown_model(fleet: Any) -> None:
    gw, a, b = fleet
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(gw.url + "/api/generate", json={
                    "model": "mistral:7b", "prompt": "p", "stream": False}) as r:
                assert r.status == 200
                assert (await r.json())["done"] is True
        async with s.post(gw.url + "/api/generate", json={"model": "nope", "prompt": "p"}) as r:
            assert r.status == 404
            assert await r.json() == {"error": "model 'nope' not found"}
        async with s.post(gw.url + "/api/embed", json={"model": "nope", "input": "p"}) as r:
            assert r.status == 404
            assert await r.json() == {"error": 'model "nope" not found, try pulling it first'}
        async with s.post(gw.url + "/v1/chat/completions", json={
                "model": "nope", "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.status == 404
            assert (await r.json())["error"]["type"] == "not_found_error"
    assert b.stats()["requests"].get("/api/generate", 0) == 3
    assert a.stats()["requests"].get("/api/generate", 0) == 0


async def test_fleet_wide_tags_ps_and_version(fleet: Any) -> None:
    gw, a, b = fleet
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/api/tags") as r:
            names = [m["name"] for m in (await r.json())["models"]]
        assert sorted(names) == ["llama3.2:latest", "mistral:7b", "nomic-embed-text:latest"]
        async with s.get(gw.url + "/api/ps") as r:
            loaded = [m["name"] for m in (await r.json())["models"]]
        assert loaded == ["llama3.2:latest"]
        async with s.get(gw.url + "/api/version") as r:
            assert "version" in await r.json()
        async with s.get(gw.url + "/") as r:
            assert await r.text() == "Ollama is running"
        async with s.get(gw.url + "/api/no-such-thing") as r:
            assert r.status == 404 and await r.text() == "404 page not found"


async def test_bad_input_takes_no_slot(start_sim: Any, start_corral: Any) -> None:
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest")
    gw = start_corral({"backends": backends(sim), "max_body_size": 4096})
    async with aiohttp.ClientSession() as s:
        cases: list[tuple[bytes, int, str]] = [
            (b"", 400, "missing request body"),
            (b"{not json", 400, "invalid JSON"),
            (b"[1, 2]", 400, "JSON object"),
            (b'{"prompt": "no model"}', 400, "model is required"),
            (b'{"model": 3}', 400, "model must be a string"),
            (b'{"model": "llama3.2", "prompt": "' + b"x" * 8192 + b'"}', 413, "too large"),
        ]
        for body, status, words in cases:
            async with s.post(gw.url + "/api/generate", data=body) as r:
                assert r.status == status, body[:40]
                assert words in (await r.json())["error"]
    assert sim.stats()["requests"].get("/api/generate", 0) == 0
    assert gw.status()["backends"][0]["in_flight"] == 0


async def test_no_backend_reachable_is_a_clear_503(start_corral: Any) -> None:
    from tests.integration.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    gw = start_corral({"backends": [{"url": dead}], "timeouts": {"connect": "1s"}},
                      wait_ready=False)
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/api/tags") as r:
            assert r.status == 503 and "no backend" in (await r.json())["error"]
        async with s.post(gw.url + "/api/chat", json={"model": "llama3.2", "messages": []},
                          timeout=aiohttp.ClientTimeout(total=10)) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "5"
            assert "no backend is reachable" in (await r.json())["error"]


async def test_access_log_has_one_record_per_request(fleet: Any) -> None:
    gw, _, _ = fleet
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/api/chat", json={
                "model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}) as r:
            await r.read()
    recs = [r for r in gw.records() if r["path"] == "/api/chat"]
    assert len(recs) == 1
    rec = recs[0]
    assert rec["status"] == 200 and rec["backend"] in ("b0", "b1")
    assert rec["model"] == "llama3.2" and rec["tokens_out"] > 0 and rec["bytes"] > 0
    assert rec["ttfb_ms"] is not None and rec["duration_ms"] >= rec["ttfb_ms"]


async def test_time_to_first_byte_counts_from_the_request_s_arrival(
        start_sim: Any, start_corral: Any) -> None:
    # 10 tokens at 50/s: a non-streamed answer comes whole after ~200 ms; a stream's
    # first token after ~20 ms. The access log (and so the metrics, the dashboard and
    # the usage ledger) must say what the client waited for its first byte.
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest",
                    "--tps", "50")
    gw = start_corral({"backends": backends(sim)})
    async with aiohttp.ClientSession() as s:
        for stream in (False, True):
            async with s.post(gw.url + "/api/generate", json={
                    "model": "llama3.2", "prompt": "hi", "stream": stream,
                    "options": {"num_predict": 10}}) as r:
                assert r.status == 200
                await r.read()
    whole, streamed = [r for r in gw.records() if r["path"] == "/api/generate"]
    assert 150 <= whole["ttfb_ms"] <= whole["duration_ms"]
    assert streamed["ttfb_ms"] < streamed["duration_ms"] - 100
