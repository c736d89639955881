"""Hot reload (POST /corral/reload with an admin key, or SIGHUP) and graceful shutdown."""

from __future__ import annotations

import signal
from typing import Any

import aiohttp

from tests.integration.conftest import backends
from tests.waiting import eventually

ADMIN = {"name": "ops", "key": "sk-ops", "admin": True}
USER = {"name": "dev", "key": "sk-dev"}
MODELS = ("--models", "llama3.2:latest", "--loaded", "llama3.2:latest")
FAST = {"interval": "200ms", "timeout": "500ms", "fall": 1, "rise": 1}


async def _reload(s: aiohttp.ClientSession, gw: Any, key: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with s.post(gw.url + "/corral/reload", headers=headers) as r:
        return r.status, await r.json()


async def _gen(s: aiohttp.ClientSession, gw: Any, n: int = 2) -> int:
    async with s.post(gw.url + "/api/generate", json={
            "model": "llama3.2", "prompt": "p", "stream": False,
            "options": {"num_predict": n}}) as r:
        await r.read()
        return r.status


def _names(gw: Any) -> list[str]:
    return [b["name"] for b in gw.status()["backends"]]


async def test_reload_needs_an_admin_key_and_refuses_bad_config(start_sim: Any,
                                                                start_corral: Any) -> None:
    sim = start_sim(*MODELS, "--instant")
    config = {"backends": backends(sim), "keys": [ADMIN, USER]}
    gw = start_corral(config)
    async with aiohttp.ClientSession() as s:
        assert (await _reload(s, gw, None))[0] == 401
        assert (await _reload(s, gw, "sk-dev"))[0] == 403
        assert (await _reload(s, gw, "sk-wrong"))[0] == 401
        gw.config_path.write_text("backends:\n  - url: ftp://nowhere\n")
        status, body = await _reload(s, gw, "sk-ops")
        assert status == 400 and "backends[0].url" in body["error"]
        assert _names(gw) == ["b0"] and (await _gen(s, gw)) == 200   # the old one stays
        gw.rewrite_config(config)
        status, body = await _reload(s, gw, "sk-ops")
        assert status == 200 and body["status"] == "reloaded"


async def test_added_backend_joins_and_removed_one_drains(start_sim: Any,
                                                          start_corral: Any) -> None:
    a = start_sim(*MODELS, "--tps", "10")
    b = start_sim(*MODELS, "--instant")
    gw = start_corral({"backends": backends(a), "keys": [ADMIN], "health": FAST})
    async with aiohttp.ClientSession() as s:
        # A long stream on a, then a reload that replaces a with b.
        stream = await s.post(gw.url + "/api/generate", json={
            "model": "llama3.2", "prompt": "p", "options": {"num_predict": 15}})
        await stream.content.readline()
        gw.rewrite_config({"backends": [{"url": b.url, "name": "b1"}], "keys": [ADMIN],
                           "health": FAST})
        status, body = await _reload(s, gw, "sk-ops")
        assert status == 200
        assert any("b1 added" in n for n in body["notes"])
        assert any("b0 removed" in n for n in body["notes"])
        await eventually(lambda: any(x["name"] == "b1" and x["up"]
                                     for x in gw.status()["backends"]),
                         "the added backend b1 to be up")
        # New work goes to b1 only, while a's stream goes on to the end.
        assert await _gen(s, gw) == 200
        lines = [line async for line in stream.content if line.strip()]
        assert lines[-1].startswith(b'{"model"') and b'"done":true' in lines[-1]
        stream.close()
        await eventually(lambda: _names(gw) == ["b1"], "the removed backend to be gone")
    assert b.stats()["completed"] >= 1
    assert a.stats()["requests"].get("/api/generate", 0) == 1


async def test_sighup_reload_keeps_limiter_state(start_sim: Any, start_corral: Any) -> None:
    sim = start_sim(*MODELS, "--instant")
    rule = {"name": "slow", "paths": ["/api/generate"], "rate": "1r/m", "nodelay": True}
    config = {"backends": backends(sim), "limits": [rule]}
    gw = start_corral(config)
    async with aiohttp.ClientSession() as s:
        assert await _gen(s, gw) == 200
        assert await _gen(s, gw) == 429
        # Change something else (a second rule), keep this zone: its state survives.
        other = {"name": "conns", "key": "ip", "max_concurrent": 10}
        gw.rewrite_config({**config, "limits": [rule, other]})
        gw.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: "limits replaced" in gw.log.read_text(),
                         "the reload to replace the limits")
        assert await _gen(s, gw) == 429
        assert await _gen(s, gw) == 429


async def test_sigterm_lets_streams_finish(start_sim: Any, start_corral: Any) -> None:
    sim = start_sim(*MODELS, "--tps", "10")
    gw = start_corral({"backends": backends(sim), "shutdown_grace": "10s"})
    async with aiohttp.ClientSession() as s:
        stream = await s.post(gw.url + "/api/generate", json={
            "model": "llama3.2", "prompt": "p", "options": {"num_predict": 10}})
        await stream.content.readline()
        gw.proc.send_signal(signal.SIGTERM)

        async def refused() -> bool:
            try:
                async with s.get(gw.url + "/healthz",
                                 timeout=aiohttp.ClientTimeout(total=2)):
                    return False
            except (aiohttp.ClientError, TimeoutError):
                return True

        # No longer accepting...
        await eventually(refused, "Corral to stop accepting connections")
        # ...but the stream in flight runs to its end.
        lines = [line async for line in stream.content if line.strip()]
        assert b'"done":true' in lines[-1]
    assert gw.proc.wait(10) == 0
