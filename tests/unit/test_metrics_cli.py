"""``corral status`` rendering (pure: a status dict in, text out)."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from corral.observe.commands import backend_state, render_status, status_url

STATUS: dict[str, Any] = {
    "version": "0.1.0", "uptime_s": 42.0,
    "backends": [
        {"name": "gpu0", "url": "http://a", "up": True, "routable": True, "draining": False,
         "slots": 2, "in_flight": 1, "models": ["llama3.2:latest", "mistral:7b"],
         "loaded": ["llama3.2:latest"], "last_error": None, "ttfb_p50_ms_1m": 35.0,
         "requests_1m": 12, "breaker": "closed"},
        {"name": "gpu1", "url": "http://b", "up": False, "routable": False,
         "draining": False, "slots": 1, "in_flight": 0, "models": [], "loaded": [],
         "last_error": "connection refused", "ttfb_p50_ms_1m": None, "requests_1m": 0},
    ],
    "queue": {"depth": 3, "by_class": {"high": 1, "normal": 2, "low": 0}, "max_depth": 10},
    "clients": [{"name": "alice", "tokens": 300, "requests": 2, "share": 0.75,
                 "counter": 120.0}],
    "rejections": [{"time": 1700000000.0, "client": "10.0.0.1", "rule": "per-ip",
                    "path": "/api/generate", "status": 429, "error": "too many requests"}],
    "totals": {"requests": 14},
    "recent": {"ttfb_p50_ms": 35.0},
    "series": {"requests_per_s": [1.0, 2.0, 3.0], "tokens_out_per_s": [10.0, 20.0, 30.0]},
}


def render(status: dict[str, Any]) -> str:
    console = Console(width=160, record=True, color_system=None)
    console.print(render_status(status))
    return console.export_text()


def test_status_shows_backends_queue_clients_and_rejections() -> None:
    out = render(STATUS)
    assert "2.0 req/s" in out and "waiting 3 (high 1, normal 2, low 0)" in out
    assert "TTFB p50 35 ms" in out and "served 14" in out
    gpu0 = next(line for line in out.splitlines() if "gpu0" in line)
    assert "up" in gpu0 and "1/2" in gpu0 and "llama3.2:latest" in gpu0 and "35 ms" in gpu0
    gpu1 = next(line for line in out.splitlines() if "gpu1" in line)
    assert "down" in gpu1 and "connection refused" in gpu1
    assert "alice" in out and "75.0 %" in out
    assert "per-ip" in out and "/api/generate" in out and "429" in out


def test_a_bare_status_renders() -> None:
    out = render({"backends": []})
    assert "Backends" in out and "Clients" not in out and "rejections" not in out


def test_backend_states() -> None:
    base = {"up": True, "routable": True, "draining": False}
    assert backend_state(base)[0] == "up"
    assert backend_state({**base, "up": False})[0] == "down"
    assert backend_state({**base, "draining": True})[0] == "draining"
    assert backend_state({**base, "routable": False, "breaker": "open"})[0] == "breaker open"


def test_status_url() -> None:
    assert status_url("http://gw:8080") == "http://gw:8080/corral/status"
    assert status_url("http://gw:8080/") == "http://gw:8080/corral/status"
    assert status_url("http://gw:8080/corral/status") == "http://gw:8080/corral/status"


def test_status_shows_what_each_backend_holds_and_the_models_figures() -> None:
    status = dict(STATUS)
    status["backends"] = [dict(STATUS["backends"][0], max_models=2, holds=[
        {"model": "llama3.2:latest", "state": "ready", "running": 1, "load_time_s": 2.5,
         "load_time_learned": True},
        {"model": "mistral:7b", "state": "loading", "running": 0, "load_time_s": 10.0,
         "load_time_learned": False}])]
    status["models"] = [{"model": "llama3.2:latest", "demand_per_s": 1.5, "queued": 4,
                         "running": 1, "service_s": 0.25, "decode_tokens_per_s": 40.0,
                         "resident_on": ["gpu0"]}]
    status["scheduler"] = {"loads": 3, "preemptions": 7}
    out = render(status)
    gpu0 = next(line for line in out.splitlines() if "gpu0" in line and "up" in line)
    assert "llama3.2:latest ×1 2.5s*" in gpu0
    assert "mistral:7b (loading) 10s" in gpu0 and "[2/2]" in gpu0
    assert "3 loads, 7 preemptions" in out
    row = next(line for line in out.splitlines() if line.startswith("│ llama3.2:latest"))
    assert "1.50" in row and "0.25 s" in row and "gpu0" in row


def test_status_lists_the_replicas_and_who_leads() -> None:
    status = dict(STATUS)
    status["shared"] = {"replica": "r1", "leader": "r2", "waiting": 5, "store": "ok",
                        "config_mismatch": ["r3"], "replicas": [
                            {"id": "r1", "address": "10.0.0.1:8080", "version": "0.1.0",
                             "config": "abc"},
                            {"id": "r2", "address": "10.0.0.2:8080", "version": "0.1.0",
                             "config": "abc"},
                            {"id": "r3", "address": "10.0.0.3:8080", "version": "0.1.0",
                             "config": "def"}]}
    out = render(status)
    assert "Replicas · 5 waiting on all · store ok" in out
    r1 = next(line for line in out.splitlines() if "r1 (this one)" in line)
    assert "10.0.0.1:8080" in r1 and "replica" in r1
    r2 = next(line for line in out.splitlines() if line.startswith("│ r2"))
    assert "leader" in r2
    assert "Replicas" not in render({"backends": []})


def _holds(*models: str) -> list[dict[str, Any]]:
    return [{"model": m, "state": "ready", "running": 1, "load_time_s": 12.5,
             "load_time_learned": True} for m in models]


BIG_FLEET: dict[str, Any] = {
    **STATUS,
    "backends": [
        {"name": "gpu-node-a100-rack3-slot0", "up": True, "routable": True, "slots": 4,
         "in_flight": 3, "models": ["m"] * 12, "max_models": 3, "requests_1m": 1234,
         "ttfb_p50_ms_1m": 1520.0,
         "holds": _holds("qwen2.5-coder:32b-instruct-q4_K_M", "phi3:mini")},
        {"name": "gpu-node-h100-rack7-slot12", "up": False, "routable": False, "slots": 8,
         "in_flight": 0, "models": [], "requests_1m": 0, "ttfb_p50_ms_1m": None,
         "last_error": "cannot connect to http://10.20.30.40:11434: connection refused "
                       "after 3 tries", "holds": []},
        {"name": "gpu-node-l40s-rack1-slot3", "up": True, "routable": False,
         "breaker": "open", "slots": 2, "in_flight": 0, "models": ["m"], "requests_1m": 7,
         "ttfb_p50_ms_1m": 95.0, "holds": _holds("nomic-embed-text:latest")},
    ],
    "models": [{"model": "qwen2.5-coder:32b-instruct-q4_K_M", "demand_per_s": 12.25,
                "queued": 140, "running": 3, "service_s": 14.5,
                "decode_tokens_per_s": 35.0,
                "resident_on": ["gpu-node-a100-rack3-slot0", "gpu-node-l40s-rack1-slot3"]}],
    "shared": {"replica": "gateway-eu-west-1a-7f9c", "leader": "gateway-eu-west-1a-7f9c",
               "waiting": 2, "store": "ok", "replicas": [
                   {"id": "gateway-eu-west-1a-7f9c", "address": "10.20.30.1:8080",
                    "version": "0.1.0", "config": "3f2a9c1b7e4d"}]},
    "clients": [{"name": "team-research-long-running-batch-key", "tokens": 1234567,
                 "requests": 9876, "share": 0.5, "counter": 123456.0}],
    "rejections": [{"time": 1700000000.0, "client": "2001:db8:85a3::8a2e:370:7334",
                    "status": 503, "error": "no backend can hold the model right now",
                    "path": "/v1/chat/completions"}],
}


def test_status_fits_80_columns_with_each_backend_on_one_line() -> None:
    console = Console(width=80, record=True, color_system=None)
    console.print(render_status(BIG_FLEET))
    out = console.export_text()
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in out          # nothing cut short
    # Each backend heads its own block: name, state and slots on one line...
    for name, state, slots in (("gpu-node-a100-rack3-slot0", "up", "3/4"),
                               ("gpu-node-h100-rack7-slot12", "down", "0/8"),
                               ("gpu-node-l40s-rack1-slot3", "breaker open", "0/2")):
        [head] = [line for line in lines if line.startswith(name)]
        assert f"{name}  {state} · slots {slots}" in head
    # ...and what it holds and its last error whole, each on a line of its own.
    assert ("  holds qwen2.5-coder:32b-instruct-q4_K_M ×1 12.5s*, phi3:mini ×1 12.5s*"
            "  [2/3]") in lines
    error = next(i for i, line in enumerate(lines) if "last error:" in line)
    assert " ".join(line.strip() for line in lines[error:error + 2]) == (
        "last error: cannot connect to http://10.20.30.40:11434: connection refused after "
        "3 tries")
    for whole in ("qwen2.5-coder:32b-instruct-q4_K_M  12.25 demand/s · 140 queued",
                  "team-research-long-running-batch-key  50.0 % · 1234567 tokens",
                  "gateway-eu-west-1a-7f9c (this one)  10.20.30.1:8080",
                  "no backend can hold the model right now", "/v1/chat/completions",
                  "2001:db8:85a3::8a2e:370:7334"):
        assert whole in out


def test_a_status_that_fits_80_columns_stays_a_table() -> None:
    status = {"version": "0.1.0", "backends": [
        {"name": "gpu0", "up": True, "routable": True, "slots": 2, "in_flight": 1,
         "models": ["llama3.2:latest"], "requests_1m": 4, "ttfb_p50_ms_1m": 35.0,
         "holds": [{"model": "llama3.2:latest", "load_time_s": 2.0}]}]}
    console = Console(width=80, record=True, color_system=None)
    console.print(render_status(status))
    lines = console.export_text().splitlines()
    [row] = [line for line in lines if "gpu0" in line]
    assert row.startswith("│ gpu0 ") and " 1/2 " in row and " llama3.2:latest 2s " in row
    assert max(len(line) for line in lines) <= 80
