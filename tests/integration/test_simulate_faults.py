"""The stand-in Ollama's scheduler and fault modes, observed over real sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from corral.simulate.server import RunningSim
from tests.integration.conftest import MakeSim
from tests.waiting import eventually

BUSY = "server busy, please try again.  maximum pending requests exceeded"
OOM = "model requires more system memory (12.0 GiB) than is available (4.1 GiB)"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # A fresh connection per request so a cut connection never poisons the next one.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


async def stats(http: aiohttp.ClientSession, sim: RunningSim) -> dict[str, Any]:
    async with http.get(sim.url + "/_sim/stats") as resp:
        result: dict[str, Any] = await resp.json()
        return result


async def settles(http: aiohttp.ClientSession, sim: RunningSim, **want: int) -> None:
    """Until the stand-in's stats show ``want`` (``in_flight=1, waiting=0``, say)."""
    await eventually(lambda: _gauges(http, sim, **want),
                     f"the stand-in's stats to show {want}", every=0.01)


async def generate(http: aiohttp.ClientSession, sim: RunningSim, model: str = "llama3.2",
                   n: int = 3, **extra: Any) -> tuple[int, Any]:
    body = {"model": model, "prompt": "x", "stream": False, "options": {"num_predict": n},
            **extra}
    async with http.post(sim.url + "/api/generate", json=body) as resp:
        return resp.status, await resp.json()


async def set_fault(http: aiohttp.ClientSession, sim: RunningSim, mode: str, **kw: Any) -> None:
    async with http.post(sim.url + "/_sim/fault", json={"mode": mode, **kw}) as resp:
        assert resp.status == 200


async def test_parallel_caps_slots_and_others_wait_fifo(make_sim: MakeSim,
                                                        http: aiohttp.ClientSession) -> None:
    sim = await make_sim(parallel=2, tokens_per_second=50, loaded=("llama3.2",))
    t0 = time.monotonic()
    tasks = [asyncio.create_task(generate(http, sim, n=10)) for _ in range(5)]  # 0.2 s each
    # Two run, three wait their turn.
    await settles(http, sim, in_flight=2, waiting=3)
    results = await asyncio.gather(*tasks)
    elapsed = time.monotonic() - t0
    assert all(status == 200 for status, _ in results)
    assert elapsed >= 0.55  # three waves of 0.2 s, not one
    end = await stats(http, sim)
    assert (end["max_in_flight"], end["max_concurrent"], end["completed"]) == (2, 5, 5)
    assert (end["in_flight"], end["waiting"]) == (0, 0)
    assert end["requests"]["/api/generate"] == 5


async def test_queue_full_answers_503(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(models=("a", "b", "c"), max_queue=1, load_time=0.3,
                         tokens_per_second=0)
    first = asyncio.create_task(generate(http, sim, "a"))  # taken out of the queue to load
    await settles(http, sim, waiting=1)
    second = asyncio.create_task(generate(http, sim, "b"))  # fills the one queue place
    await settles(http, sim, waiting=2)
    t0 = time.monotonic()
    status, body = await generate(http, sim, "c")
    assert (status, body) == (503, {"error": BUSY})
    assert time.monotonic() - t0 < 0.15  # at once, not after the loads
    async with http.post(sim.url + "/v1/chat/completions", json={
            "model": "c", "messages": [{"role": "user", "content": "x"}]}) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["type"] == "api_error"
    assert [s for s, _ in await asyncio.gather(first, second)] == [200, 200]
    assert (await stats(http, sim))["rejected"] == 2


async def test_busy_loaded_model_never_503(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(max_queue=0, loaded=("llama3.2",), tokens_per_second=200)
    results = await asyncio.gather(*(generate(http, sim) for _ in range(6)))
    assert [s for s, _ in results] == [200] * 6
    status, _ = await generate(http, sim, "qwen2.5:0.5b")  # not loaded: needs the queue
    assert status == 503


async def test_disconnect_frees_the_slot(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(tokens_per_second=20, loaded=("llama3.2",))
    body = {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 200}}  # 10 s
    resp = await http.post(sim.url + "/api/generate", json=body)
    first = await resp.content.readline()
    assert orjson.loads(first)["done"] is False
    waiter = asyncio.create_task(generate(http, sim, n=2))  # queued behind the slot
    await settles(http, sim, in_flight=1, waiting=1)
    resp.close()  # the client goes away mid-stream
    t0 = time.monotonic()
    status, obj = await waiter
    assert status == 200 and obj["eval_count"] == 2
    assert time.monotonic() - t0 < 1.0  # the slot was freed at once, not after 10 s
    s = await stats(http, sim)
    assert (s["cancelled"], s["completed"], s["in_flight"], s["waiting"]) == (1, 1, 0, 0)


async def test_disconnect_while_waiting_leaves_the_queue(make_sim: MakeSim,
                                                         http: aiohttp.ClientSession) -> None:
    sim = await make_sim(tokens_per_second=20, loaded=("llama3.2",))
    holder = asyncio.create_task(generate(http, sim, n=10))
    await settles(http, sim, in_flight=1, waiting=0)
    with pytest.raises(TimeoutError):
        async with http.post(sim.url + "/api/generate", json={"model": "llama3.2", "prompt": "x"},
                             timeout=aiohttp.ClientTimeout(total=0.1)) as resp:
            await resp.read()
    await settles(http, sim, in_flight=1, waiting=0)
    assert (await holder)[0] == 200
    assert (await stats(http, sim))["cancelled"] == 1


async def _gauges(http: aiohttp.ClientSession, sim: RunningSim, **want: int) -> bool:
    s = await stats(http, sim)
    return all(s[k] == v for k, v in want.items())


async def test_oom_fails_inference_but_not_listing(make_sim: MakeSim,
                                                   http: aiohttp.ClientSession) -> None:
    sim = await make_sim(fault="oom", tokens_per_second=0)
    assert await generate(http, sim) == (500, {"error": OOM})
    async with http.post(sim.url + "/api/embed",
                         json={"model": "nomic-embed-text", "input": "x"}) as resp:
        assert (resp.status, await resp.json()) == (500, {"error": OOM})
    async with http.post(sim.url + "/v1/chat/completions", json={
            "model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}) as resp:
        assert resp.status == 500
        assert (await resp.json())["error"] == {"message": OOM, "type": "api_error",
                                                "param": None, "code": None}
    for path in ("/", "/api/tags", "/api/ps", "/api/version"):
        async with http.get(sim.url + path) as resp:
            assert resp.status == 200
    await set_fault(http, sim, "none")
    assert (await generate(http, sim))[0] == 200


async def test_hang_sends_nothing_until_the_client_leaves(make_sim: MakeSim,
                                                          http: aiohttp.ClientSession) -> None:
    sim = await make_sim(fault="hang", tokens_per_second=0)
    with pytest.raises(TimeoutError):
        async with http.post(sim.url + "/api/chat", json={
                "model": "llama3.2", "messages": [{"role": "user", "content": "x"}]},
                timeout=aiohttp.ClientTimeout(total=0.3)) as resp:
            await resp.read()
    async with http.get(sim.url + "/api/version") as resp:
        assert resp.status == 200
    await settles(http, sim, waiting=0, cancelled=1)


async def test_drop_cuts_the_stream_after_n_chunks(make_sim: MakeSim,
                                                   http: aiohttp.ClientSession) -> None:
    sim = await make_sim(fault="drop", drop_after=2, tokens_per_second=0)
    lines: list[bytes] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(sim.url + "/api/generate",
                             json={"model": "llama3.2", "prompt": "x"}) as resp:
            assert resp.status == 200
            async for line in resp.content:
                lines.append(line)
    assert len(lines) == 2 and all(not orjson.loads(x)["done"] for x in lines)
    with pytest.raises(aiohttp.ClientConnectionError):
        await generate(http, sim)  # non-streaming: cut before any byte
    await set_fault(http, sim, "drop", drop_after=0)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(sim.url + "/v1/chat/completions", json={
                "model": "llama3.2", "messages": [{"role": "user", "content": "x"}],
                "stream": True}) as resp:
            await resp.read()
    s = await stats(http, sim)
    assert (s["dropped"], s["completed"], s["in_flight"]) == (3, 0, 0)


async def test_refuse_at_start_and_switched_at_runtime(make_sim: MakeSim,
                                                       http: aiohttp.ClientSession) -> None:
    sim = await make_sim(fault="refuse", tokens_per_second=0)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(sim.url + "/api/version") as resp:
            await resp.read()
    assert (await stats(http, sim))["fault"] == "refuse"  # control stays reachable
    await set_fault(http, sim, "none")
    async with http.get(sim.url + "/api/version") as resp:
        assert await resp.json() == {"version": "0.33.0"}
    await set_fault(http, sim, "refuse")
    with pytest.raises(aiohttp.ClientConnectionError):
        await generate(http, sim)


async def test_fault_endpoint_validates_and_reset_zeroes(make_sim: MakeSim,
                                                         http: aiohttp.ClientSession) -> None:
    sim = await make_sim(tokens_per_second=0)
    async with http.post(sim.url + "/_sim/fault", json={"mode": "explode"}) as resp:
        assert resp.status == 400
    assert (await generate(http, sim))[0] == 200
    before = await stats(http, sim)
    assert (before["completed"], before["loads"]) == (1, 1)
    async with http.post(sim.url + "/_sim/reset") as resp:
        after = await resp.json()
    assert (after["completed"], after["loads"], after["requests"]) == (0, 0, {})
    assert after["max_in_flight"] == 0


async def test_instant_mode_is_fast(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(tokens_per_second=0, loaded=("llama3.2",))
    t0 = time.monotonic()
    results = await asyncio.gather(*(generate(http, sim, n=16) for _ in range(200)))
    assert all(status == 200 for status, _ in results)
    assert time.monotonic() - t0 < 3.0  # no hidden sleeps: 200 requests in well under a second
