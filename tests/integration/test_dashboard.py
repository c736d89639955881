"""The dashboard in a real headless Chromium, driven over the DevTools protocol.

A real Corral in front of two stand-in backends; the page is loaded as an operator
would load it, traffic is sent through the gateway, and the page must show both
backends, update its counters and rejections, and log no error to the console.
A screenshot is kept in ``test-artifacts/dashboard.png`` for a human to look at.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import backends

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run")
WIDTH, HEIGHT = 1440, 900


def chromium_path() -> str:
    """The browser, or a failure that says how to get one: CI must not skip this test."""
    for candidate in (os.environ.get("CORRAL_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate:
            found = shutil.which(candidate)
            if found:
                return found
    pytest.fail("Chromium is needed for the dashboard test and was not found: install it "
                "(Debian/Ubuntu: apt-get install chromium) or point CORRAL_CHROMIUM at it",
                pytrace=False)


class Chromium:
    """A headless Chromium with one page, spoken to over the DevTools websocket."""

    def __init__(self, executable: str, workdir: Path) -> None:
        self.executable = executable
        self.profile = workdir / "chromium-profile"
        self.log = workdir / "chromium.log"
        self.errors: list[str] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._loaded = asyncio.Event()

    async def __aenter__(self) -> Chromium:
        self.profile.mkdir()
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                self.executable, *FLAGS, f"--user-data-dir={self.profile}",
                "--remote-debugging-port=0", f"--window-size={WIDTH},{HEIGHT}", "about:blank",
                stdout=log, stderr=log)
        port = await self._devtools_port()
        self.http = aiohttp.ClientSession()
        async with self.http.get(f"http://127.0.0.1:{port}/json/list") as r:
            targets = await r.json()
        page = next(t for t in targets if t["type"] == "page")
        self.ws = await self.http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable")
        await self.send("Emulation.setDeviceMetricsOverride",
                        width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.ws.close()
        await self.http.close()
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    async def _devtools_port(self) -> int:
        # Chromium writes the port it chose into the profile once DevTools listens.
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                break
            if marker.exists():
                first = marker.read_text().split("\n", 1)[0].strip()
                if first.isdigit():
                    return int(first)
            await asyncio.sleep(0.05)
        raise RuntimeError(f"Chromium did not start its DevTools server:\n"
                           f"{self.log.read_text(errors='replace')[-3000:]}")

    async def _read(self) -> None:
        async for msg in self.ws:
            data = msg.json()
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
                continue
            self._event(data.get("method", ""), data.get("params", {}))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Page.loadEventFired":
            self._loaded.set()
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = [a.get("value", a.get("description", "")) for a in params.get("args", [])]
            self.errors.append("console: " + " ".join(str(a) for a in args))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            self.errors.append(f"exception: {text}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"log: {entry.get('text')} {entry.get('url', '')}")

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        answer = await asyncio.wait_for(fut, 30)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def open(self, url: str) -> None:
        self._loaded.clear()
        await self.send("Page.navigate", url=url)
        await asyncio.wait_for(self._loaded.wait(), 30)

    async def eval(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression,
                                 returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not await self.eval(expression):
            if time.monotonic() > deadline:
                text = await self.eval("document.body.innerText")
                raise AssertionError(f"the page never satisfied {expression!r}; it shows:\n"
                                     f"{text}")
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path) -> None:
        # The whole page, not only the first screen.
        metrics = await self.send("Page.getLayoutMetrics")
        height = int(metrics["cssContentSize"]["height"])
        await self.send("Emulation.setDeviceMetricsOverride", width=WIDTH,
                        height=max(HEIGHT, height), deviceScaleFactor=1, mobile=False)
        shot = await self.send("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))


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
            stop = time.monotonic() + 5

            async def worker(key: str | None) -> None:
                while time.monotonic() < stop:
                    await _chat(s, gw.url, key)

            workers = [asyncio.create_task(worker(k))
                       for k in ("sk-alice", None, None, None)]
            await asyncio.sleep(3)
            await browser.wait_for(f"{total} > 9")
            rps = await browser.eval("document.getElementById('kpi-rps').textContent")
            assert rps not in ("–", "0.0")
            await browser.screenshot(ARTIFACTS / "dashboard.png")
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
