"""Observability end to end: /metrics, /corral/status and ``corral status``/``top``
against a real Corral in front of stand-in backends."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from corral.observe.commands import status_command
from tests.integration.conftest import backends
from tests.waiting import eventually, wait_until

ALICE = "sk-alice-observe"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def fetch_metrics(url: str, path: str = "/metrics") -> tuple[str, str]:
    with urllib.request.urlopen(url + path, timeout=10) as r:
        return r.headers["Content-Type"], r.read().decode()


def parse(text: str) -> Samples:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def scrape(url: str, path: str = "/metrics") -> Samples:
    return parse(fetch_metrics(url, path)[1])


def sample(samples: Samples, name: str,
           **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and want <= lbls)


@pytest.fixture
def fleet(start_sim: Any, start_corral: Any) -> Any:
    a = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--tps", "300")
    b = start_sim("--models", "llama3.2:latest,mistral:7b", "--loaded", "llama3.2:latest",
                  "--tps", "300")
    gw = start_corral({"backends": backends(a, b, slots=2),
                       "keys": [{"name": "alice", "key": ALICE, "tier": "premium"}]})
    return gw, a, b


async def _native_chat(s: aiohttp.ClientSession, url: str) -> int:
    async with s.post(url + "/api/chat", json={
            "model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
            "options": {"num_predict": 12}}) as r:
        await r.read()
        return r.status


async def test_metrics_count_what_went_through(fleet: Any) -> None:
    gw, _, _ = fleet
    async with aiohttp.ClientSession() as s:
        assert await asyncio.gather(*(_native_chat(s, gw.url) for _ in range(3))) == [200] * 3
        async with s.post(gw.url + "/api/generate", data=b"{not json") as r:
            assert r.status == 400
        async with s.post(gw.url + "/api/generate", json={"model": "nope-1", "prompt": "x"}) as r:
            assert r.status == 404
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=ALICE)
    for _ in range(2):
        done = await client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        assert done.usage is not None and done.usage.completion_tokens > 0
    await client.close()

    content_type, body = await asyncio.to_thread(fetch_metrics, gw.url)
    m = parse(body)
    assert content_type.startswith("text/plain")
    assert sample(m, "corral_requests_total", route="/api/chat", status="200",
                  tier="basic") == 3
    assert sample(m, "corral_requests_total", route="/v1/chat/completions", status="200",
                  tier="premium") == 2
    assert sample(m, "corral_requests_total", route="/api/generate", status="400",
                  tier="basic") == 1
    assert sample(m, "corral_requests_total", route="/api/generate", status="404",
                  tier="basic") == 1
    # Every answered request has a time to first byte, on whichever backend served it.
    assert total(m, "corral_time_to_first_byte_seconds_count", route="/api/chat") == 3
    assert total(m, "corral_time_to_first_byte_seconds_count",
                 route="/v1/chat/completions") == 2
    assert total(m, "corral_request_duration_seconds_count") == 7
    assert sample(m, "corral_queue_wait_seconds_count", priority="normal") == 3
    assert sample(m, "corral_queue_wait_seconds_count", priority="high") == 2
    for b in ("b0", "b1"):
        assert sample(m, "corral_backend_up", backend=b) == 1
        assert sample(m, "corral_backend_slots", backend=b) == 2
        assert sample(m, "corral_backend_in_flight", backend=b) == 0
        assert sample(m, "corral_backend_model_loaded", backend=b, model="llama3.2:latest") == 1
        # llama3.2 is resident: its VRAM shows, as the stand-in's /api/ps reports it.
        assert sample(m, "corral_backend_vram_bytes", backend=b) > 0
    assert sample(m, "corral_jobs", state="worker_busy") == 0
    assert sample(m, "corral_backend_model_loaded", backend="b1", model="mistral:7b") == 0
    assert (sample(m, "corral_tokens_total", client="anonymous", model="llama3.2:latest",
                   direction="out") or 0) >= 3
    assert (sample(m, "corral_tokens_total", client="alice", model="llama3.2:latest",
                   direction="out") or 0) >= 2
    assert sample(m, "corral_queue_depth", priority="normal") == 0
    # The metrics and the access log tell the same story.
    assert total(m, "corral_requests_total") == len(gw.records())
    # Bounded labels: no client address, no unknown model name.
    assert "127.0.0.1" not in body and "nope-1" not in body


async def test_upstream_errors_and_retries_are_counted(fleet: Any) -> None:
    gw, a, _ = fleet
    a.fault("oom")      # b0 answers 500: each attempt there is retried on b1
    async with aiohttp.ClientSession() as s:
        statuses = await asyncio.gather(*(_native_chat(s, gw.url) for _ in range(6)))
    assert statuses == [200] * 6
    m = scrape(gw.url)
    errors = sample(m, "corral_upstream_errors_total", backend="b0", kind="500") or 0
    assert errors >= 1
    assert sample(m, "corral_retries_total", backend="b0") == errors
    assert total(m, "corral_upstream_errors_total", backend="b1") == 0


def test_the_metrics_path_comes_from_the_settings(start_sim: Any, start_corral: Any) -> None:
    sim = start_sim("--models", "llama3.2:latest")
    gw = start_corral({"backends": backends(sim), "metrics": {"path": "/internal/metrics"}})
    m = scrape(gw.url, "/internal/metrics")
    assert sample(m, "corral_backend_up", backend="b0") == 1


async def test_status_shows_activity_shares_and_rejections(start_sim: Any,
                                                           start_corral: Any) -> None:
    a = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--tps", "50")
    gw = start_corral({"backends": backends(a), "queue": {"max_depth": 1},
                       "keys": [{"name": "alice", "key": ALICE, "tier": "premium"}]})
    async with aiohttp.ClientSession() as s:

        async def chat(key: str | None) -> int:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            async with s.post(gw.url + "/api/chat", headers=headers, json={
                    "model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
                    "options": {"num_predict": 10}}) as r:
                await r.read()
                return r.status

        # One slot, one place in the queue: of five at once, three are turned away.
        statuses = await asyncio.gather(*(chat(ALICE if i == 0 else None) for i in range(5)))
    assert sorted(statuses) == [200, 200, 503, 503, 503]

    def sampled() -> dict[str, Any] | None:
        # What the sampler adds up once a second: wait for a tick that saw all five.
        st: dict[str, Any] = gw.status()
        seen = (st["totals"]["requests"] == 5 and len(st["rejections"]) == 3
                and st["backends"][0]["requests_1m"] == 2
                and sum(st["series"]["requests_per_s"]) > 0)
        return st if seen else None

    st = await eventually(sampled, lambda: f"the status to show the five requests: "
                                           f"{gw.status()}")
    assert st["totals"]["requests"] == 5 and st["totals"]["rejected"] == 3
    assert len(st["rejections"]) == 3
    assert {r["status"] for r in st["rejections"]} == {503}
    assert all(r["path"] == "/api/chat" and "queue" in r["error"] for r in st["rejections"])
    names = {c["name"] for c in st["clients"]}
    assert "alice" in names and "127.0.0.1" in names
    assert sum(c["share"] for c in st["clients"]) == pytest.approx(1.0, abs=1e-3)
    backend = st["backends"][0]
    assert backend["requests_1m"] == 2 and backend["ttfb_p50_ms_1m"] is not None
    assert backend["breaker"] == "closed" and backend["last_error"] is None
    series = st["series"]
    assert len(series["t"]) >= 1 and sum(series["requests_per_s"]) > 0
    assert set(series["queue"][-1]) == {"high", "normal", "low"}
    assert set(series["in_flight"][-1]) == {"b0"}


async def test_limit_rejections_reach_metrics_and_status(start_sim: Any,
                                                        start_corral: Any) -> None:
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--instant")
    gw = start_corral({"backends": backends(sim), "limits": [
        {"name": "chat-per-ip", "paths": ["/api/chat"], "key": "ip", "rate": "1r/m"}]})
    async with aiohttp.ClientSession() as s:
        assert [await _native_chat(s, gw.url) for _ in range(2)] == [200, 429]

    def rejected() -> dict[str, Any] | None:
        st: dict[str, Any] = gw.status()
        return st if st["rejections"] else None

    st = await eventually(rejected, "the sampler to record the rejection")
    assert [(r["status"], r["rule"], r["path"]) for r in st["rejections"]] == [
        (429, "chat-per-ip", "/api/chat")]
    assert st["totals"]["rejected"] == 1
    m = scrape(gw.url)
    assert sample(m, "corral_requests_total", route="/api/chat", status="429",
                  tier="basic") == 1


def test_status_command_prints_the_fleet(fleet: Any) -> None:
    gw, _, _ = fleet
    runner = CliRunner()
    result = runner.invoke(status_command, ["--url", gw.url], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in ("b0", "b1"):
        row = next(line for line in lines if f" {name} " in line)
        assert " up " in row and "0/2" in row and "llama3.2:latest" in row
    assert "waiting 0" in result.output

    as_json = runner.invoke(status_command, ["--url", gw.url, "--json"])
    assert as_json.exit_code == 0
    assert [b["name"] for b in json.loads(as_json.output)["backends"]] == ["b0", "b1"]

    down = runner.invoke(status_command, ["--url", "http://127.0.0.1:9"])
    assert down.exit_code == 1 and "cannot read http://127.0.0.1:9/corral/status" in down.output


def test_top_refreshes_until_interrupted(fleet: Any, tmp_path: Path) -> None:
    gw, _, _ = fleet
    # As on a terminal: elsewhere the live view only prints its last frame, at the end.
    env = {**os.environ, "COLUMNS": "160", "PYTHONUNBUFFERED": "1", "FORCE_COLOR": "1"}
    screen = tmp_path / "top.out"
    with screen.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c",
             "from corral.observe.commands import top_command; top_command()",
             "--url", gw.url, "--interval", "0.2"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: screen.read_bytes().count(b"b1") >= 2 or proc.poll() is not None,
                   "top to show the fleet and refresh it")
        assert proc.poll() is None, screen.read_text(errors="replace")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    shown = screen.read_bytes()
    assert proc.returncode == 0, shown.decode(errors="replace")
    assert b"b0" in shown and b"b1" in shown
