"""CORS in a real headless Chromium: a web app on another origin talks to Corral.

The page is served by a small web server of the test's own, on another port (so
another origin) than Corral. From an allowed origin the browser's preflight is
answered by Corral and the page reads a chat stream token by token with ``fetch``;
from an origin Corral does not allow, the browser itself blocks the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.integration.browser import Chromium, chromium_path
from tests.integration.conftest import backends, free_port

# What a web app does: a JSON POST with a key (so the browser must ask first), then
# reading the stream as it arrives.
PAGE = """<!doctype html><meta charset="utf-8"><title>chat</title>
<script>
window.chat = async (url, key) => {
  const chunks = [];
  try {
    const r = await fetch(url + "/api/chat", {
      method: "POST",
      headers: {"Content-Type": "application/json", "Authorization": "Bearer " + key},
      body: JSON.stringify({model: "llama3.2", options: {num_predict: 24},
                            messages: [{role: "user", content: "hello"}]}),
    });
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      chunks.push({t: performance.now(), text: decoder.decode(value)});
    }
    return {status: r.status, chunks};
  } catch (e) {
    return {blocked: String(e)};
  }
};
</script>"""


@pytest.fixture
async def serve_page() -> AsyncIterator[Callable[[str], Any]]:
    runners: list[web.AppRunner] = []

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def serve(host: str) -> str:
        app = web.Application()
        app.router.add_get("/", page)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, host, port).start()
        runners.append(runner)
        return f"http://{host}:{port}"

    yield serve
    for runner in runners:
        await runner.cleanup()


async def test_a_page_on_an_allowed_origin_streams_and_another_is_blocked(
        start_sim: Any, start_corral: Any, serve_page: Any, tmp_path: Path) -> None:
    chromium = chromium_path()
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--tps", "40")
    gw = start_corral({"backends": backends(sim), "clients": {"require_api_key": True},
                       "keys": [{"name": "webapp", "key": "sk-web"}]})
    allowed = await serve_page("127.0.0.1")     # in Ollama's default list, as in Corral's
    other = await serve_page("127.0.0.2")       # not in it
    async with Chromium(chromium, tmp_path) as browser:
        await browser.open(allowed + "/")
        result = await browser.eval(f"chat({gw.url!r}, 'sk-web')")
        assert result.get("status") == 200, result
        chunks = result["chunks"]
        text = "".join(c["text"] for c in chunks)
        assert text.count('"done":true') == 1
        # Read as they came: many reads, spread over the stream's duration
        # (24 tokens at 40 per second), not one buffered body.
        assert len(chunks) >= 10, len(chunks)
        assert chunks[-1]["t"] - chunks[0]["t"] > 200

        await browser.open(other + "/")
        result = await browser.eval(f"chat({gw.url!r}, 'sk-web')")
        assert "blocked" in result, result
        assert browser.errors and any("CORS" in e for e in browser.errors), browser.errors

    recs = gw.records()
    preflights = [(r["status"], r["method"]) for r in recs if r["method"] == "OPTIONS"]
    assert preflights == [(204, "OPTIONS"), (403, "OPTIONS")]
    chats = [r for r in recs if r["method"] == "POST"]
    assert [(r["status"], r["client_name"]) for r in chats] == [(200, "webapp")]
