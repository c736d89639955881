"""The scheduler end to end on stand-in fleets: no needless model swaps, one load when
demand moves, and transparent preemption of low-class work that has sent nothing yet.

Real Corral processes in front of real stand-in processes that behave like Ollama
where this depends on it: each holds one model at a time (a load takes a second and
evicts the other), reports ``load_duration``, and stops generating when its client
closes the connection.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.integration.conftest import Gateway, Sim, backends
from tests.waiting import eventually

M1, M2 = "llama3.2:latest", "mistral:latest"
ONE_MODEL_EACH = ("--models", f"{M1},{M2}", "--parallel", "2", "--max-loaded", "1",
                  "--load-time", "1", "--tps", "400", "--keep-alive", "-1")
KEYS = [{"name": "alice", "key": "sk-alice", "tier": "premium"},
        {"name": "bob", "key": "sk-bob", "tier": "basic"},
        {"name": "nightly", "key": "sk-nightly", "tier": "batch"}]


async def generate(s: aiohttp.ClientSession, gw: Gateway, model: str, tokens: int,
                   key: str | None = None, stream: bool = True) -> dict[str, Any]:
    """One request; its final object, with what the client saw added."""
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with s.post(gw.url + "/api/generate", headers=headers, json={
            "model": model, "prompt": "p", "stream": stream,
            "options": {"num_predict": tokens}}) as r:
        assert r.status == 200, await r.text()
        lines = [line for line in (await r.read()).splitlines() if line.strip()]
    final: dict[str, Any] = orjson.loads(lines[-1])
    final["_lines"] = lines
    final["_done_at"] = time.monotonic()
    final["_took"] = final["_done_at"] - started
    return final


async def loop(s: aiohttp.ClientSession, gw: Gateway, model: str, tokens: int, until: float,
               think: float, out: list[dict[str, Any]]) -> None:
    while time.monotonic() < until:
        out.append(await generate(s, gw, model, tokens))
        await asyncio.sleep(think)


def two_backends(start_sim: Any, start_corral: Any, **extra: Any) -> tuple[Sim, Sim, Gateway]:
    a = start_sim(*ONE_MODEL_EACH, "--loaded", M1)
    b = start_sim(*ONE_MODEL_EACH, "--loaded", M2)
    gw = start_corral({"backends": backends(a, b, slots=2), "routing": {"load_time": "1s"},
                       "health": {"interval": "1s"}, "keys": KEYS, **extra})
    return a, b, gw


# -- residency -------------------------------------------------------------------------


async def test_no_model_swaps_when_each_model_is_resident_somewhere(
        start_sim: Any, start_corral: Any) -> None:
    """Three clients on each model, short requests: a busy resident backend is worth
    waiting 50 ms for; the idle one beside it must not load the model (a second),
    which would evict the model the other clients need."""
    a, b, gw = two_backends(start_sim, start_corral)
    done: list[dict[str, Any]] = []
    until = time.monotonic() + 4
    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(loop(s, gw, model, 20, until, 0.2, done)
                               for model in (M1, M2) for _ in range(3)))
    assert len(done) > 60 and all(d["done"] and d["eval_count"] == 20 for d in done)
    assert (a.stats()["loads"], b.stats()["loads"]) == (0, 0)
    served = {(r["model"].split(":")[0], r["backend"]) for r in gw.records()
              if r["path"] == "/api/generate"}
    assert served == {("llama3.2", "b0"), ("mistral", "b1")}


async def test_a_demand_shift_loads_the_model_once_on_the_idle_backend(
        start_sim: Any, start_corral: Any) -> None:
    """All demand moves to one model, more than its resident slots take: the backend
    whose model lost its demand loads it — once — and then both serve it."""
    a, b, gw = two_backends(start_sim, start_corral)
    done: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as s:
        until = time.monotonic() + 2
        await asyncio.gather(*(loop(s, gw, model, 100, until, 0.25, done)
                               for model in (M1, M2) for _ in range(2)))
        assert (a.stats()["loads"], b.stats()["loads"]) == (0, 0)
        shift = time.monotonic()
        until = shift + 7
        await asyncio.gather(*(loop(s, gw, M1, 100, until, 0.0, done) for _ in range(6)))
    assert all(d["done"] for d in done)
    assert (a.stats()["loads"], b.stats()["loads"]) == (0, 1)
    status = gw.status()
    held = {x["name"]: [h["model"] for h in x["holds"]] for x in status["backends"]}
    assert held == {"b0": [M1], "b1": [M1]}
    loads = [r for r in gw.records() if r.get("placement") == "load"]
    assert [(r["backend"], r["model"]) for r in loads] == [("b1", M1)]
    # After the load both backends serve the model (b1 for more than a third).
    after = [r for r in gw.records() if r["path"] == "/api/generate"
             and r["time"] > loads[0]["time"] + 1.5]
    assert sum(r["backend"] == "b1" for r in after) > len(after) / 3


# -- preemption ------------------------------------------------------------------------


def one_backend(start_sim: Any, start_corral: Any, **queue: Any) -> tuple[Sim, Gateway]:
    sim = start_sim("--models", M1, "--loaded", M1, "--parallel", "2", "--tps", "100")
    gw = start_corral({"backends": backends(sim, slots=2), "keys": KEYS,
                       "queue": {"max_wait": "60s", **queue}})
    return sim, gw


async def test_a_person_takes_the_slot_of_non_streamed_batch_work(
        start_sim: Any, start_corral: Any) -> None:
    sim, gw = one_backend(start_sim, start_corral)
    async with aiohttp.ClientSession() as s:
        batch = [asyncio.create_task(generate(s, gw, M1, 200, "sk-nightly", stream=False))
                 for _ in range(3)]                   # 2 s each; two run, one waits
        await eventually(lambda: sim.stats()["in_flight"] == 2, "two batch requests to run")
        await eventually(lambda: gw.status()["queue"]["depth"] == 1,
                         "the third batch request to wait")
        person = await generate(s, gw, M1, 10, "sk-alice")
        results = await asyncio.gather(*batch)
    # The person did not wait for the batch work to finish (2 s): a slot was taken.
    assert person["done"] and person["_done_at"] < min(r["_done_at"] for r in results)
    # Every batch request got a complete, valid answer from a full run.
    for r in results:
        assert r["done"] is True and r["eval_count"] == 200 and len(r["response"]) > 0
    records = [r for r in gw.records() if r["path"] == "/api/generate"]
    preempted = [r for r in records if r.get("preemptions")]
    assert len(preempted) == 1 and preempted[0]["client_name"] == "nightly"
    assert preempted[0]["status"] == 200 and preempted[0]["tokens_out"] == 200
    stats = sim.stats()
    assert stats["cancelled"] == 1 and stats["completed"] == 4     # generation stopped
    assert stats["max_in_flight"] <= 2
    metrics = await _metrics(gw)
    assert 'corral_preemptions_total{tier="batch"} 1.0' in metrics


@pytest.mark.parametrize(("key", "stream"), [("sk-nightly", True), ("sk-bob", False)],
                         ids=["streamed-low-class", "non-preemptible-tier"])
async def test_what_may_not_be_stopped_is_never_cut(start_sim: Any, start_corral: Any,
                                                    key: str, stream: bool) -> None:
    """Low-class streams have sent tokens to their clients, and a tier that is not
    preemptible (basic) keeps its slots: either way the person waits for the first of
    them to finish, and every answer is whole."""
    sim, gw = one_backend(start_sim, start_corral)
    async with aiohttp.ClientSession() as s:
        running = [asyncio.create_task(generate(s, gw, M1, 100, key, stream=stream))
                   for _ in range(2)]
        await eventually(lambda: sim.stats()["in_flight"] == 2, "both slots to be taken")
        person = await generate(s, gw, M1, 10, "sk-alice")
        results = await asyncio.gather(*running)
    assert person["_done_at"] > min(r["_done_at"] for r in results)
    for r in results:
        assert r["done"] is True and r["eval_count"] == 100
        assert not any(b'"error"' in line for line in r["_lines"])
    assert sim.stats()["cancelled"] == 0
    assert not any(r.get("preemptions") for r in gw.records())


async def test_preemptions_per_request_are_bounded(start_sim: Any, start_corral: Any) -> None:
    sim, gw = one_backend(start_sim, start_corral, max_preemptions=1)
    async with aiohttp.ClientSession() as s:
        batch = [asyncio.create_task(generate(s, gw, M1, 150, "sk-nightly", stream=False))
                 for _ in range(2)]
        people = []
        for _ in range(4):
            # Each person comes when the batch work that is left runs on every slot it
            # can (a preempted request runs again after the person who stopped it).
            await eventually(
                lambda: sim.stats()["in_flight"] >= 2 - sum(t.done() for t in batch),
                "the batch work to run again")
            people.append(await generate(s, gw, M1, 10, "sk-alice"))
        results = await asyncio.gather(*batch)
    assert all(r["done"] and r["eval_count"] == 150 for r in results)
    counts = sorted(r.get("preemptions", 0) for r in gw.records()
                    if r.get("client_name") == "nightly")
    assert counts == [1, 1]             # each stopped once, never twice


async def test_a_preempted_batch_job_is_one_job_with_one_result_and_one_callback(
        start_sim: Any, start_corral: Any, receiver: Any) -> None:
    calls: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        calls.append(await request.json())
        return web.Response(status=204)

    port = await receiver({"/hook": hook})
    sim = start_sim("--models", M1, "--loaded", M1, "--parallel", "1", "--tps", "100")
    gw = start_corral({"backends": backends(sim, slots=1), "keys": KEYS,
                       "jobs": {"callback_hosts": [f"127.0.0.1:{port}"]}})
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/corral/jobs", headers={"X-API-Key": "sk-nightly"},
                          json={"endpoint": "/api/generate",
                                "body": {"model": "llama3.2", "prompt": "summarise",
                                         "options": {"num_predict": 150}},
                                "callback_url": f"http://127.0.0.1:{port}/hook"}) as r:
            assert r.status == 202
            job_id = (await r.json())["id"]
        await eventually(lambda: sim.stats()["in_flight"] == 1, "the batch job to run")
        person = await generate(s, gw, M1, 10, "sk-alice")
        assert person["done"]
        await eventually(lambda: calls, "the job's callback")
        # Not a wait for anything: the time a second, unwanted callback would take.
        await asyncio.sleep(0.5)
        async with s.get(f"{gw.url}/corral/jobs/{job_id}",
                         headers={"X-API-Key": "sk-nightly"}) as r:
            doc = await r.json()
    assert doc["status"] == "succeeded" and doc["attempts"] == 1
    assert doc["result"]["done"] is True and doc["result"]["eval_count"] == 150
    assert len(calls) == 1 and calls[0]["id"] == job_id and calls[0]["status"] == "succeeded"
    [run] = [r for r in gw.records() if r.get("client_name") == "nightly"]
    assert run["preemptions"] == 1 and run["status"] == 200
    assert sim.stats()["cancelled"] == 1


async def _metrics(gw: Gateway) -> str:
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/metrics") as r:
        return await r.text()


async def test_after_a_load_corral_asks_the_backend_what_it_evicted(
        start_sim: Any, start_corral: Any) -> None:
    """Probes every minute, but a load is followed by an /api/ps of that backend at once;
    the load time is learned from the answer's load_duration."""
    a = start_sim(*ONE_MODEL_EACH, "--loaded", M1)
    gw = start_corral({"backends": backends(a, slots=2), "health": {"interval": "60s"}})
    before = a.stats()["requests"].get("/api/ps", 0)
    async with aiohttp.ClientSession() as s:
        answer = await generate(s, gw, M2, 5)
    assert answer["done"] and answer["load_duration"] >= 1e9       # it was loaded
    await eventually(lambda: a.stats()["requests"].get("/api/ps", 0) == before + 1,
                     "Corral to ask the backend what it has loaded")
    [b0] = gw.status()["backends"]
    assert [h["model"] for h in b0["holds"]] == [M2]
    assert b0["holds"][0]["load_time_learned"] is True
    assert 1.0 <= b0["holds"][0]["load_time_s"] < 2.0
