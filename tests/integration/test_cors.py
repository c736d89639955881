"""CORS answered at the gateway: preflights, allowed and refused origins, streams.

The stand-in Ollama behaves as Ollama does with its default ``OLLAMA_ORIGINS``: it
refuses a foreign ``Origin`` with 403. So when a request from an origin the operator
allowed in Corral succeeds, Corral has answered for the fleet and not passed the
browser's ``Origin`` on.
"""

from __future__ import annotations

import signal
from typing import Any

import aiohttp

from tests.integration.conftest import backends
from tests.integration.nginx_support import proxy_to
from tests.waiting import eventually

APP = "https://app.example.com"
KEYS = [{"name": "alice", "key": "sk-alice"}]
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
        "options": {"num_predict": 8}}


def _preflight(origin: str, method: str = "POST") -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization,content-type"}


def _served(sim: Any) -> dict[str, int]:
    """What reached the backend, health probes aside."""
    return {p: n for p, n in sim.stats()["requests"].items()
            if p not in ("/api/version", "/api/ps", "/api/tags")}


def _cors_headers(r: aiohttp.ClientResponse) -> list[str]:
    return [k for k in r.headers if k.lower().startswith("access-control-")]


async def test_preflight_is_answered_without_a_key_a_limit_or_a_backend(
        start_sim: Any, start_corral: Any) -> None:
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--instant")
    # One request a minute per client: a counted preflight would use it up.
    gw = start_corral({"backends": backends(sim), "keys": KEYS,
                       "clients": {"require_api_key": True},
                       "limits": [{"name": "one", "key": "ip", "rate": "1r/m"}],
                       "cors": {"origins": ["default", APP]}})
    async with aiohttp.ClientSession() as s:
        for path in ("/api/chat", "/v1/chat/completions", "/api/tags"):
            for origin in (APP, "http://localhost:5173", "vscode-webview://abc123"):
                async with s.options(gw.url + path, headers=_preflight(origin)) as r:
                    assert r.status == 204, await r.text()
                    assert r.headers["Access-Control-Allow-Origin"] == origin
                    assert "POST" in r.headers["Access-Control-Allow-Methods"]
                    allowed = r.headers["Access-Control-Allow-Headers"].lower()
                    for h in ("authorization", "content-type", "x-api-key"):
                        assert h in allowed
                    assert int(r.headers["Access-Control-Max-Age"]) > 0
                    assert "Origin" in r.headers["Vary"]
        # The limit still has its one request: the preflights were not counted.
        async with s.post(gw.url + "/api/chat", json={**CHAT, "stream": False},
                          headers={"Origin": APP, "Authorization": "Bearer sk-alice"}) as r:
            assert r.status == 200, await r.text()
            assert r.headers.getall("Access-Control-Allow-Origin") == [APP]
        async with s.post(gw.url + "/api/chat", json={**CHAT, "stream": False},
                          headers={"Origin": APP, "Authorization": "Bearer sk-alice"}) as r:
            assert r.status == 429
            # A refusal is readable by the page too, with when to come back.
            assert r.headers.getall("Access-Control-Allow-Origin") == [APP]
            assert "Retry-After" in r.headers["Access-Control-Expose-Headers"]
    # No backend saw a preflight; only the one chat reached it.
    assert _served(sim) == {"/api/chat": 1}
    recs = gw.records()
    preflights = [r for r in recs if r["method"] == "OPTIONS"]
    assert len(preflights) == 9
    assert all(r["status"] == 204 and r["backend"] is None for r in preflights)
    assert [r["status"] for r in recs if r["method"] == "POST"] == [200, 429]


async def test_allowed_origin_streams_with_one_allow_origin(start_sim: Any,
                                                            start_corral: Any,
                                                            start_nginx: Any) -> None:
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest",
                    "--tps", "200")
    # A backend that adds its own CORS header to everything (an nginx in front of an
    # Ollama, as the seed article's stack has): the client must still see one.
    nginx = start_nginx("", "location / {\n" + proxy_to(sim.url) +
                        "add_header Access-Control-Allow-Origin * always;\n}\n")
    gw = start_corral({"backends": [{"url": nginx.url, "name": "edge"}],
                       "cors": {"origins": [APP, "http://*.internal.example"]}})
    async with aiohttp.ClientSession() as s:
        for origin in (APP, "http://chat.internal.example"):
            async with s.post(gw.url + "/api/chat", json=CHAT,
                              headers={"Origin": origin}) as r:
                assert r.status == 200, await r.text()
                assert r.headers.getall("Access-Control-Allow-Origin") == [origin]
                lines = [line async for line in r.content if line.strip()]
            assert len(lines) >= 5                       # a stream, token by token
            async with s.post(gw.url + "/v1/chat/completions", headers={"Origin": origin},
                              json={**CHAT, "stream": True}) as r:
                assert r.status == 200
                assert r.headers.getall("Access-Control-Allow-Origin") == [origin]
                assert (await r.text()).rstrip().endswith("data: [DONE]")
        # Corral's own endpoints answer an allowed page too.
        async with s.get(gw.url + "/corral/status", headers={"Origin": APP}) as r:
            assert r.status == 200
            assert r.headers.getall("Access-Control-Allow-Origin") == [APP]
        # A request without Origin is not a CORS request: the backend's headers pass.
        async with s.post(gw.url + "/api/show", json={"model": "llama3.2"}) as r:
            assert r.status == 200
            assert r.headers.getall("Access-Control-Allow-Origin") == ["*"]


async def test_disallowed_origins_are_refused_with_no_cors_headers(start_sim: Any,
                                                                   start_corral: Any) -> None:
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--instant")
    gw = start_corral({"backends": backends(sim), "cors": {"origins": [APP]}})
    refused = ["https://evil.example", "null", "https://app.example.com:8443", "localhost:3000", "http://localhost:3000",
               "https://app.example.com.evil.example", "http://app.example.com", ""]
    async with aiohttp.ClientSession() as s:
        for origin in refused:
            async with s.options(gw.url + "/api/chat", headers=_preflight(origin)) as r:
                assert r.status == 403, origin
                assert _cors_headers(r) == [], origin
                assert "not allowed" in (await r.json())["error"]
            async with s.post(gw.url + "/api/chat", json={**CHAT, "stream": False},
                              headers={"Origin": origin}) as r:
                assert r.status == 403, origin
                assert _cors_headers(r) == []
        # OpenAI's error shape on /v1.
        async with s.post(gw.url + "/v1/chat/completions", json=CHAT,
                          headers={"Origin": "https://evil.example"}) as r:
            assert r.status == 403
            assert "not allowed" in (await r.json())["error"]["message"]
        # A page Corral served itself (same origin) is no cross-origin request.
        async with s.post(gw.url + "/api/chat", json={**CHAT, "stream": False},
                          headers={"Origin": gw.url}) as r:
            assert r.status == 200
            assert r.headers.getall("Access-Control-Allow-Origin") == [gw.url]
    assert _served(sim) == {"/api/chat": 1}
    refusals = [r for r in gw.records() if r["status"] == 403]
    assert len(refusals) == 2 * len(refused) + 1
    assert {r["limit"] for r in refusals} == {"origin"}


async def test_null_origin_only_when_listed_and_cors_off_is_transparent(
        start_sim: Any, start_corral: Any) -> None:
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--instant")
    gw = start_corral({"backends": backends(sim), "cors": {"origins": ["null"]}})
    async with aiohttp.ClientSession() as s:
        async with s.options(gw.url + "/api/chat", headers=_preflight("null")) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "null"
        # Off: Corral neither answers nor refuses; the backend (an Ollama with its
        # default origins) decides, as it would without Corral.
        gw.rewrite_config({"backends": backends(sim), "cors": {"origins": []}})
        gw.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: "configuration reloaded" in gw.log.read_text(),
                         "the reload that turns CORS off")
        async with s.post(gw.url + "/api/chat", json={**CHAT, "stream": False},
                          headers={"Origin": "https://evil.example"}) as r:
            assert r.status == 403                         # the backend's refusal
            assert _served(sim) == {}
        async with s.post(gw.url + "/api/chat", json={**CHAT, "stream": False},
                          headers={"Origin": "http://localhost:3000"}) as r:
            assert r.status == 200
            assert r.headers.getall("Access-Control-Allow-Origin") == ["http://localhost:3000"]
        async with s.options(gw.url + "/api/chat",
                             headers=_preflight("http://localhost:3000")) as r:
            assert r.status == 204                         # answered by the backend
