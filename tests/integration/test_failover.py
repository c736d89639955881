"""Faults on real stand-in backends behind a real Corral: what clients see."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from tests.integration.conftest import backends
from tests.waiting import eventually

FAST_HEALTH = {"interval": "200ms", "timeout": "500ms", "fall": 2, "rise": 1,
               "max_fails": 2, "fail_timeout": "1s"}
MODELS = ("--models", "llama3.2:latest", "--loaded", "llama3.2:latest")


def _pair(start_sim: Any, start_corral: Any, **extra: Any) -> tuple[Any, Any, Any]:
    a = start_sim(*MODELS, "--tps", "200", "--parallel", "4")
    b = start_sim(*MODELS, "--tps", "200", "--parallel", "4")
    gw = start_corral({"backends": backends(a, b, slots=4), "health": FAST_HEALTH,
                       "routing": {"strategy": "round_robin"}, **extra})
    return gw, a, b


async def _generate(s: aiohttp.ClientSession, url: str, n: int = 5,
                    stream: bool = False) -> tuple[int, list[dict[str, Any]]]:
    async with s.post(url + "/api/generate", json={
            "model": "llama3.2", "prompt": "p", "stream": stream,
            "options": {"num_predict": n}}) as r:
        raw = await r.read()
        lines = [json.loads(x) for x in raw.splitlines() if x.strip()]
        return r.status, lines


def _routable(gw: Any, name: str) -> bool:
    return bool(next(b for b in gw.status()["backends"] if b["name"] == name)["routable"])


async def test_out_of_memory_is_retried_elsewhere_then_recovers(start_sim: Any,
                                                                 start_corral: Any) -> None:
    gw, a, b = _pair(start_sim, start_corral)
    a.fault("oom")
    async with aiohttp.ClientSession() as s:
        results = [await _generate(s, gw.url) for _ in range(10)]
        assert [st for st, _ in results] == [200] * 10         # no client saw the OOM
        assert not _routable(gw, "b0")                          # taken out (max_fails 2)
        a.fault("none")
        # Not a wait for anything: time itself is under test.
        await asyncio.sleep(1.2)                                # fail_timeout passes
        for _ in range(6):
            assert (await _generate(s, gw.url))[0] == 200
        assert _routable(gw, "b0")                              # the trial put it back
    assert a.stats()["completed"] >= 1
    retried = [r for r in gw.records() if r["retries"]]
    assert retried and all(r["status"] == 200 and r["backend"] == "b1" for r in retried)


async def test_hang_before_first_byte_times_out_and_retries(start_sim: Any,
                                                            start_corral: Any) -> None:
    gw, a, _ = _pair(start_sim, start_corral, timeouts={"first_byte": "400ms"})
    a.fault("hang")
    async with aiohttp.ClientSession() as s:
        statuses = await asyncio.gather(*(_generate(s, gw.url) for _ in range(6)))
    assert [st for st, _ in statuses] == [200] * 6
    assert any(r["retries"] for r in gw.records())


async def test_refused_connections_are_invisible(start_sim: Any, start_corral: Any) -> None:
    gw, a, _ = _pair(start_sim, start_corral)
    a.fault("refuse")
    async with aiohttp.ClientSession() as s:
        results = [await _generate(s, gw.url) for _ in range(8)]
    assert [st for st, _ in results] == [200] * 8


async def test_stream_cut_midway_ends_with_one_error_line(start_sim: Any,
                                                          start_corral: Any) -> None:
    sim = start_sim(*MODELS, "--tps", "100")
    gw = start_corral({"backends": backends(sim), "health": FAST_HEALTH})
    sim.fault("drop", drop_after=3)
    async with aiohttp.ClientSession() as s:
        status, lines = await _generate(s, gw.url, n=20, stream=True)
    assert status == 200
    assert len(lines) == 4
    assert all("error" not in x for x in lines[:3])
    assert "error" in lines[-1] and "mid-stream" in lines[-1]["error"]
    rec = next(r for r in gw.records() if r["path"] == "/api/generate")
    assert "mid-stream" in rec["error"]
    # The slot came back.
    assert gw.status()["backends"][0]["in_flight"] == 0


async def test_openai_stream_cut_midway_has_no_done_marker(start_sim: Any,
                                                           start_corral: Any) -> None:
    sim = start_sim(*MODELS, "--tps", "100")
    gw = start_corral({"backends": backends(sim), "health": FAST_HEALTH})
    sim.fault("drop", drop_after=3)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions", json={
                "model": "llama3.2", "stream": True, "max_tokens": 20,
                "messages": [{"role": "user", "content": "x"}]}) as r:
            raw = await r.read()
    assert r.status == 200
    assert b"data: " in raw and b"[DONE]" not in raw


async def test_backend_killed_mid_run(start_sim: Any, start_corral: Any) -> None:
    gw, a, b = _pair(start_sim, start_corral)
    async with aiohttp.ClientSession() as s:
        # Streams in flight on both backends, then one backend dies.
        streams = [asyncio.create_task(_generate(s, gw.url, n=100, stream=True))
                   for _ in range(4)]
        await eventually(lambda: a.stats()["in_flight"] and b.stats()["in_flight"],
                         "streams to run on both backends")
        a.proc.kill()                     # SIGKILL: no goodbye
        done = await asyncio.gather(*streams)
        cut = [lines for _, lines in done if "error" in lines[-1]]
        whole = [lines for _, lines in done if lines[-1].get("done")]
        assert len(cut) + len(whole) == 4 and len(cut) >= 1    # each cut stream: one error
        assert all(sum("error" in x for x in lines) == 1 for lines in cut)
        await eventually(lambda: not _routable(gw, "b0"), "the dead backend to be taken out")
        # New requests see nothing of it.
        results = [await _generate(s, gw.url) for _ in range(6)]
        assert [st for st, _ in results] == [200] * 6


async def test_all_backends_down_answers_503_at_once(start_sim: Any,
                                                     start_corral: Any) -> None:
    gw, a, b = _pair(start_sim, start_corral)
    a.stop()
    b.stop()
    await eventually(lambda: not any(bk["up"] for bk in gw.status()["backends"]),
                     "both stopped backends to be marked down")
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        async with s.post(gw.url + "/api/generate", json={"model": "llama3.2",
                                                          "prompt": "x"}) as r:
            assert r.status == 503
            assert int(r.headers["Retry-After"]) >= 1
            assert "error" in await r.json()
        assert time.monotonic() - t0 < 2
