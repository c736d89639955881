"""Who is calling: API keys, tiers (priority in the queue), trusted proxies."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

from corral.pipeline.identify import hash_key
from tests.integration.conftest import backends
from tests.waiting import eventually

KEYS = [
    {"name": "alice", "key": "sk-alice", "tier": "premium"},
    {"name": "batchjob", "key_sha256": hash_key("sk-batch"), "tier": "batch"},
]


async def _gen(s: aiohttp.ClientSession, url: str, key: str | None = None,
               n: int = 5, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    h = dict(headers or {})
    if key:
        h["Authorization"] = f"Bearer {key}"
    async with s.post(url + "/api/generate", headers=h, json={
            "model": "llama3.2", "prompt": "p", "stream": False,
            "options": {"num_predict": n}}) as r:
        return r.status, await r.json()


async def test_require_api_key(start_sim: Any, start_corral: Any) -> None:
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--instant")
    gw = start_corral({"backends": backends(sim), "keys": KEYS,
                       "clients": {"require_api_key": True}})
    async with aiohttp.ClientSession() as s:
        status, body = await _gen(s, gw.url)
        assert status == 401 and "API key" in body["error"]
        status, body = await _gen(s, gw.url, "sk-wrong")
        assert status == 401
        status, body = await _gen(s, gw.url, None, headers={"Authorization": "Basic Zm9vOmJhcg=="})
        assert status == 401
        assert (await _gen(s, gw.url, "sk-alice"))[0] == 200
        assert (await _gen(s, gw.url, "sk-batch"))[0] == 200      # configured by digest
        async with s.get(gw.url + "/api/tags", headers={"X-API-Key": "sk-alice"}) as r:
            assert r.status == 200
        async with s.get(gw.url + "/api/tags") as r:
            assert r.status == 401
        async with s.get(gw.url + "/healthz") as r:
            assert r.status == 200                          # probes need no key
    recs = [r for r in gw.records() if r["status"] == 200]
    assert {r["client_name"] for r in recs} == {"alice", "batchjob"}
    assert {r["tier"] for r in recs} == {"premium", "batch"}
    # The plain key never reaches the log.
    assert "sk-alice" not in gw.access_log.read_text()


async def test_unknown_key_is_anonymous_without_require(start_sim: Any,
                                                        start_corral: Any) -> None:
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--instant")
    gw = start_corral({"backends": backends(sim), "keys": KEYS})
    async with aiohttp.ClientSession() as s:
        assert (await _gen(s, gw.url, "sk-not-configured"))[0] == 200
    rec = [r for r in gw.records() if r["path"] == "/api/generate"][0]
    assert rec["client_name"] is None and rec["tier"] == "basic"


async def test_premium_jumps_the_queue(start_sim: Any, start_corral: Any) -> None:
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--tps", "50")
    gw = start_corral({"backends": backends(sim, slots=1), "keys": KEYS})
    done: list[str] = []
    async with aiohttp.ClientSession() as s:
        async def run(tag: str, key: str | None, n: int) -> None:
            status, _ = await _gen(s, gw.url, key, n)
            assert status == 200
            done.append(tag)

        def waiting_in_queue(n: int) -> Callable[[], bool]:
            return lambda: gw.status()["queue"]["depth"] == n

        # One at a time, so that the arrival order is known.
        first = asyncio.create_task(run("holder", None, 60))
        await eventually(lambda: sim.stats()["in_flight"] == 1, "the holder to run")
        waiting = [asyncio.create_task(run(f"basic{i}", None, 3)) for i in range(3)]
        await eventually(waiting_in_queue(3), "the basic requests to wait")
        waiting.append(asyncio.create_task(run("batch", "sk-batch", 3)))
        await eventually(waiting_in_queue(4), "the batch request to wait")
        waiting.append(asyncio.create_task(run("premium", "sk-alice", 3)))
        await asyncio.gather(first, *waiting)
    # high before normal before low; normal ones in arrival order
    assert done == ["holder", "premium", "basic0", "basic1", "basic2", "batch"]


async def test_forwarded_for_only_from_trusted_proxies(start_sim: Any,
                                                       start_corral: Any) -> None:
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--instant")
    untrusting = start_corral({"backends": backends(sim)})
    trusting = start_corral({"backends": backends(sim),
                             "clients": {"trusted_proxies": ["127.0.0.0/8"]}})
    xff = {"X-Forwarded-For": "203.0.113.9, 127.0.0.1"}
    async with aiohttp.ClientSession() as s:
        await _gen(s, untrusting.url, headers=xff)
        await _gen(s, trusting.url, headers=xff)
    assert untrusting.records()[-1]["client"] == "127.0.0.1"
    assert trusting.records()[-1]["client"] == "203.0.113.9"
