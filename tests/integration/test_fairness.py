"""Fair share inside a priority class: a client flooding the queue does not make a
light client wait behind all of its work (and with fairness: fifo it does)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import backends
from tests.waiting import eventually

KEYS = [{"name": "hog", "key": "sk-hog", "tier": "basic"},
        {"name": "light", "key": "sk-light", "tier": "basic"}]


async def _order(gw: Any) -> list[str]:
    done: list[str] = []
    async with aiohttp.ClientSession() as s:
        async def run(tag: str, key: str) -> None:
            async with s.post(gw.url + "/api/generate", headers={"X-API-Key": key}, json={
                    "model": "llama3.2", "prompt": "p", "stream": False,
                    "options": {"num_predict": 10}}) as r:
                assert r.status == 200
                await r.read()
                done.append(tag)

        hog = [asyncio.create_task(run(f"hog{i}", "sk-hog")) for i in range(10)]
        def all_arrived() -> bool:
            # What is done is read first: a request ending meanwhile is then counted
            # in neither reading, never in both.
            finished = len(done)
            st = gw.status()
            return finished + st["queue"]["depth"] + sum(
                b["in_flight"] for b in st["backends"]) >= len(hog)

        # Light arrives behind all of hog's requests.
        await eventually(all_arrived, "all of hog's requests to reach Corral")
        light = [asyncio.create_task(run(f"light{i}", "sk-light")) for i in range(2)]
        await asyncio.gather(*hog, *light)
    return done


@pytest.mark.parametrize("fairness", ["tokens", "requests"])
async def test_light_client_is_not_starved(start_sim: Any, start_corral: Any,
                                           fairness: str) -> None:
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--tps", "100")
    gw = start_corral({"backends": backends(sim, slots=1), "keys": KEYS,
                       "queue": {"fairness": fairness}})
    done = await _order(gw)
    # Once light arrives it alternates with hog (its counter is lifted to hog's, so it
    # neither waits behind hog's backlog nor spends banked idle time): several hog
    # requests still finish after both of light's.
    first, second = done.index("light0"), done.index("light1")
    assert second - first <= 2, done
    assert len(done) - 1 - second >= 3, done


async def test_fifo_serves_in_arrival_order(start_sim: Any, start_corral: Any) -> None:
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--tps", "100")
    gw = start_corral({"backends": backends(sim, slots=1), "keys": KEYS,
                       "queue": {"fairness": "fifo"}})
    done = await _order(gw)
    assert done[-2:] == ["light0", "light1"], done


@pytest.mark.parametrize("affinity", ["session", "none"])
async def test_session_affinity_keeps_a_conversation_on_one_backend(
        start_sim: Any, start_corral: Any, affinity: str) -> None:
    a = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--instant")
    b = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--instant")
    gw = start_corral({"backends": backends(a, b, slots=2),
                       "routing": {"strategy": "round_robin", "affinity": affinity}})
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    async with aiohttp.ClientSession() as s:
        for turn in range(4):
            async with s.post(gw.url + "/api/chat", json={
                    "model": "llama3.2", "messages": messages, "stream": False}) as r:
                reply = await r.json()
            messages += [reply["message"], {"role": "user", "content": f"turn {turn}"}]
    served = [r["backend"] for r in gw.records() if r["path"] == "/api/chat"]
    assert len(served) == 4
    if affinity == "session":
        assert len(set(served)) == 1, served
    else:
        assert len(set(served)) == 2, served        # round robin alternates
