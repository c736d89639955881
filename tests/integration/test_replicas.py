"""Several Corral replicas on one Redis behave as one gateway: real processes, a real
redis-server started for the test, stand-in backends."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from tests.integration.conftest import Gateway, backends

M1 = "llama3.2:latest"
KEYS = [{"name": "alice", "key": "sk-alice", "tier": "premium"},
        {"name": "hog", "key": "sk-hog", "tier": "basic"},
        {"name": "light", "key": "sk-light", "tier": "basic"},
        {"name": "nightly", "key": "sk-nightly", "tier": "batch"}]


async def generate(s: aiohttp.ClientSession, gw: Gateway, tokens: int,
                   key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    started = time.monotonic()
    async with s.post(gw.url + "/api/generate", headers=headers, json={
            "model": "llama3.2", "prompt": "p", "stream": False,
            "options": {"num_predict": tokens}}) as r:
        body = await r.json(content_type=None)
        body["_status"] = r.status
    body["_done_at"] = time.monotonic()
    body["_took"] = body["_done_at"] - started
    return body


def replicas(start_corral: Any, redis_url: str, sims: list[Any], n: int, slots: int,
             **extra: Any) -> list[Gateway]:
    config = {"state": redis_url, "backends": backends(*sims, slots=slots), "keys": KEYS,
              "queue": {"max_wait": "60s"}, **extra}
    return [start_corral(config) for _ in range(n)]


async def test_the_slot_cap_holds_at_the_backend_under_load_from_every_replica(
        start_sim: Any, start_corral: Any, start_redis: Any) -> None:
    redis = start_redis()
    # The stand-in would run four at once; Corral's cap is one slot, on all replicas.
    sim = start_sim("--models", M1, "--loaded", M1, "--parallel", "4", "--tps", "200")
    gws = replicas(start_corral, redis.url, [sim], 3, slots=1)
    async with aiohttp.ClientSession() as s:
        answers = await asyncio.gather(*(generate(s, gws[i % 3], 20) for i in range(18)))
    assert all(a["_status"] == 200 and a["done"] for a in answers), answers
    stats = sim.stats()
    assert stats["completed"] == 18
    assert stats["max_in_flight"] == 1
