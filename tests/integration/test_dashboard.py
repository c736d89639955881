"""The dashboard in a real headless Chromium, driven over the DevTools protocol.

A real Corral in front of two stand-in backends; the page is loaded as an operator
would load it, traffic is sent through the gateway, and the page must show both
backends, update its counters and rejections, and log no error to the console.
A screenshot is kept in ``test-artifacts/dashboard.png`` for a human to look at.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.browser import Chromium, chromium_path
from tests.integration.conftest import backends

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


NAMES = ["gpu-alpha", "gpu-beta"]


@pytest.fixture
def chromium() -> str:
    # Asked for before the fleet, so a missing browser fails before anything starts.
    return chromium_path()


@pytest.fixture
def fleet(start_sim: Any, start_corral: Any) -> Any:
    a = start_sim("--models", "llama3.2:latest,nomic-embed-text:latest",
                  "--loaded", "llama3.2:latest", "--tps", "60")
    b = start_sim("--models", "llama3.2:latest,mistral:7b", "--loaded", "llama3.2:latest",
                  "--tps", "60")
    fleet_backends = [{**cfg, "name": name} for cfg, name in zip(backends(a, b), NAMES,
                                                                 strict=True)]
    # Two slots and a short queue: a burst of traffic both waits and gets rejected.
    return start_corral({
        "backends": fleet_backends,
        "queue": {"max_depth": 3},
        "keys": [{"name": "alice", "key": "sk-alice", "tier": "premium"}],
    })


async def _chat(s: aiohttp.ClientSession, url: str, key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with s.post(url + "/api/chat", headers=headers, json={
            "model": "llama3.2", "messages": [{"role": "user", "content": "hello"}],
            "options": {"num_predict": 30}}) as r:
        await r.read()
        return r.status


async def test_dashboard_shows_the_fleet_and_updates_live(chromium: str, fleet: Any,
                                                          tmp_path: Path) -> None:
    gw = fleet
    async with Chromium(chromium, tmp_path) as browser:
        await browser.open(gw.url + "/dashboard")
        await browser.wait_for("document.querySelectorAll('[data-backend]').length === 2")
        shown = await browser.eval(
            "[...document.querySelectorAll('[data-backend] .backend-name')]"
            ".map(e => e.textContent)")
        assert sorted(shown) == NAMES
        text = await browser.eval("document.body.innerText")
        assert all(name in text for name in NAMES)
        assert "llama3.2:latest" in text and "mistral:7b" in text
        total = "Number(document.getElementById('kpi-requests-total').textContent)"
        assert await browser.eval(total) == 0

        async with aiohttp.ClientSession() as s:
            # A burst larger than two slots plus a queue of three: some are rejected.
            burst = await asyncio.gather(*(_chat(s, gw.url, "sk-alice" if i % 3 == 0 else None)
                                           for i in range(9)))
            assert 200 in burst and 503 in burst
            await browser.wait_for(f"{total} >= 9")
            await browser.wait_for(
                "document.getElementById('rejections').innerText.includes('503')")
            await browser.wait_for(
                "document.getElementById('clients').innerText.includes('alice')")
            # The usage ledger's top clients: alice among them, with today's figures.
            await browser.wait_for(
                "document.querySelector('#usage [data-client=\"alice\"]') !== null",
                timeout=20)
            alice = await browser.eval(
                "[...document.querySelectorAll('#usage [data-client=\"alice\"] td')]"
                ".map(e => e.textContent)")
            assert alice[0] == "alice" and int(alice[1]) >= 3 and alice[1] == alice[3], alice
            # What Corral knows of the fleet: the model's demand and where it is
            # resident, and each backend's resident model with its load time.
            await browser.wait_for(
                "document.getElementById('models').innerText.includes('llama3.2:latest')")
            models = await browser.eval("document.getElementById('models').innerText")
            assert "gpu-alpha" in models and "gpu-beta" in models, models
            titles = await browser.eval(
                "[...document.querySelectorAll('[data-backend] .chip.loaded')]"
                ".map(e => e.title)")
            assert len(titles) == 2 and all("load 10 s (default)" in t for t in titles), titles

            # Steady traffic while the screenshot is taken, so the page shows work:
            # four clients on two slots keep two requests waiting.
            stop = asyncio.Event()

            async def worker(key: str | None) -> None:
                while not stop.is_set():
                    await _chat(s, gw.url, key)

            workers = [asyncio.create_task(worker(k))
                       for k in ("sk-alice", None, None, None)]
            await browser.wait_for(f"{total} > 9")
            await browser.wait_for(
                "!['–', '0.0'].includes(document.getElementById('kpi-rps').textContent)")
            # Not a wait for anything checked: a few seconds of history, so that the
            # screenshot's charts show the traffic.
            await asyncio.sleep(3)
            await browser.screenshot(ARTIFACTS / "dashboard.png")
            stop.set()
            await asyncio.gather(*workers)

    assert browser.errors == []


async def test_dashboard_lists_the_replicas_on_a_shared_store(
        chromium: str, start_sim: Any, start_corral: Any, start_redis: Any,
        tmp_path: Path) -> None:
    redis = start_redis()
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--instant")
    config = {"state": redis.url, "backends": backends(sim, slots=2)}
    a, b = start_corral(config), start_corral(config)
    async with Chromium(chromium, tmp_path) as browser:
        await browser.open(a.url + "/dashboard")
        # Both heartbeats have been seen: each row has its address.
        await browser.wait_for(
            f"(t => t.includes('127.0.0.1:{a.port}') && t.includes('127.0.0.1:{b.port}'))"
            "(document.getElementById('replicas').textContent)",
            timeout=15)
        text = await browser.eval("document.getElementById('replicas-panel').textContent")
        assert f"127.0.0.1:{a.port}" in text and f"127.0.0.1:{b.port}" in text
        assert "leader" in text and "(this one)" in text and "store ok" in text
    assert browser.errors == []
