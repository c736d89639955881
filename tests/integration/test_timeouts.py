"""Timeouts towards the backends: between two chunks, before the first byte, on connect.

A stand-in that produces a token every two seconds is far slower than Corral's
500 ms timeouts, so every decision here happens within a second or two; a backend that
refuses or never accepts a connection must get an answer just as fast, never a hang.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import Gateway, Sim, backends
from tests.waiting import eventually, wait_until

SLOW_SIM = ("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--tps", "0.5")
FAST = {"first_byte": "500ms", "read": "500ms"}
GEN = {"model": "llama3.2", "prompt": "p", "options": {"num_predict": 3}}


async def stream_lines(url: str, body: dict[str, Any],
                       limit: float = 10) -> tuple[int, list[tuple[float, dict[str, Any]]]]:
    """POST and collect (arrival time, parsed line) for each NDJSON line."""
    t0 = time.monotonic()
    out: list[tuple[float, dict[str, Any]]] = []
    timeout = aiohttp.ClientTimeout(total=limit)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.post(url + "/api/generate", json=body) as r:
            async for raw in r.content:
                if raw.strip():
                    out.append((time.monotonic() - t0, json.loads(raw)))
            return r.status, out


def wait_idle(gw: Gateway) -> dict[str, Any]:
    """Corral's status once nothing is in flight at its backends."""
    def idle() -> dict[str, Any] | None:
        st: dict[str, Any] = gw.status()
        return st if all(b["in_flight"] == 0 for b in st["backends"]) else None

    return wait_until(idle, "Corral to count nothing in flight at its backends")


def generate_records(gw: Gateway) -> list[dict[str, Any]]:
    return [r for r in gw.records() if r["path"] == "/api/generate"]


def assert_error_body(ctype: str, raw: bytes) -> str:
    assert ctype.startswith("application/json"), (ctype, raw)
    body = json.loads(raw)
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return str(body["error"])


# -- read timeout: between two chunks -----------------------------------------------------


async def test_read_timeout_ends_the_stream_with_one_error_line(
        start_sim: Any, start_corral: Any) -> None:
    """The stand-in sends its header at once and a token only every 2 s: the stream
    is already a 200, so the read timeout ends it with one ``{"error"}`` line."""
    sim: Sim = start_sim(*SLOW_SIM)
    gw: Gateway = start_corral({"backends": backends(sim), "timeouts": FAST,
                                "health": {"interval": "30s"}})
    t0 = time.monotonic()
    status, lines = await stream_lines(gw.url, GEN)
    elapsed = time.monotonic() - t0
    assert status == 200
    assert lines, "the stream ended without a word"
    errors = [line for _, line in lines if "error" in line]
    assert len(errors) == 1 and lines[-1][1] is errors[0], lines
    assert set(errors[0]) == {"error"} and "timed out" in errors[0]["error"], errors
    assert not any(line.get("done") for _, line in lines), lines
    assert elapsed < 1.8, f"the 500 ms read timeout took {elapsed:.2f}s"

    assert [b["in_flight"] for b in wait_idle(gw)["backends"]] == [0]
    # Corral closed the upstream request, so the stand-in stopped generating.
    await eventually(lambda: sim.stats()["in_flight"] == 0,
                     "the stand-in to stop generating once Corral closed the request")
    assert sim.stats()["completed"] == 0
    recs = generate_records(gw)
    assert len(recs) == 1 and recs[0]["status"] == 200, recs
    assert "timed out" in (recs[0].get("error") or ""), recs[0]


class _StallingBackend(BaseHTTPRequestHandler):
    """Just enough Ollama to pass Corral's probes; ``/api/generate`` sends one token
    line and then stalls until the other side closes the connection."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def _json(self, data: Any) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/api/tags":
            self._json({"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest",
                                    "modified_at": "2025-01-01T00:00:00Z"}]})
        elif self.path == "/api/ps":
            self._json({"models": []})
        else:
            self._json({"version": "0.0.0"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        line = json.dumps({"model": "llama3.2", "created_at": "2025-01-01T00:00:00Z",
                           "response": "Hello", "done": False}).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.flush()
        sent = time.monotonic()
        self.connection.settimeout(10)
        with contextlib.suppress(OSError):
            self.rfile.read(1)        # b"" once the gateway closes the connection
        self.server.closed_after.append(time.monotonic() - sent)
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    closed_after: list[float]


@pytest.fixture
def stalling_backend() -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), _StallingBackend)
    server.closed_after = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


async def test_read_timeout_after_a_token_keeps_it_and_ends_with_an_error(
        stalling_backend: _Server, start_corral: Any) -> None:
    port = stalling_backend.server_address[1]
    gw: Gateway = start_corral({
        "backends": [{"url": f"http://127.0.0.1:{port}", "name": "stall"}],
        "timeouts": FAST, "health": {"interval": "30s"}})
    status, lines = await stream_lines(gw.url, GEN)
    assert status == 200
    assert len(lines) == 2, lines
    (t_first, first), (t_err, err) = lines
    assert first["response"] == "Hello" and first["done"] is False
    assert set(err) == {"error"} and "timed out" in err["error"], err
    assert t_first < 0.45, "the first token was held back"
    assert 0.4 < t_err - t_first < 1.5, (t_first, t_err)

    assert [b["in_flight"] for b in wait_idle(gw)["backends"]] == [0]
    await eventually(lambda: stalling_backend.closed_after,
                     "Corral to close the upstream connection (it was left open)")
    recs = generate_records(gw)
    assert len(recs) == 1 and recs[0]["status"] == 200 and recs[0]["backend"] == "stall"
    assert "timed out" in (recs[0].get("error") or ""), recs[0]


# -- first-byte timeout ---------------------------------------------------------------------


async def test_first_byte_timeout_without_streaming_is_504(
        start_sim: Any, start_corral: Any) -> None:
    """``stream: false``: the stand-in sends nothing before the whole answer (6 s), so
    ``first_byte`` fires; with one backend there is nowhere to retry."""
    sim: Sim = start_sim(*SLOW_SIM)
    gw: Gateway = start_corral({"backends": backends(sim), "timeouts": FAST,
                                "health": {"interval": "30s"}})
    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.post(gw.url + "/api/generate", json={**GEN, "stream": False}) as r:
            status, ctype, raw = r.status, r.headers.get("Content-Type", ""), await r.read()
    elapsed = time.monotonic() - t0
    assert status == 504, raw
    assert "timed out" in assert_error_body(ctype, raw)
    assert elapsed < 1.8, f"the 500 ms first-byte timeout took {elapsed:.2f}s"
    assert [b["in_flight"] for b in wait_idle(gw)["backends"]] == [0]
    recs = generate_records(gw)
    assert len(recs) == 1 and recs[0]["status"] == 504, recs
    assert "timed out" in (recs[0].get("error") or ""), recs[0]
    # One failure is not a reason to take the only backend out: it still serves.
    st = gw.status()["backends"][0]
    assert st["up"] and st["routable"], st


# -- connect: refused, never accepted, dead from the start ----------------------------------


async def post_timed(gw: Gateway) -> tuple[int, str, bytes, float, str | None]:
    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
        async with s.post(gw.url + "/api/generate", json={**GEN, "stream": False}) as r:
            raw = await r.read()
            return (r.status, r.headers.get("Content-Type", ""), raw,
                    time.monotonic() - t0, r.headers.get("Retry-After"))


async def test_backend_refusing_connections_is_502_at_once(
        start_sim: Any, start_corral: Any) -> None:
    sim: Sim = start_sim("--models", "llama3.2:latest", "--instant")
    gw: Gateway = start_corral({"backends": backends(sim), "health": {"interval": "30s"}})
    sim.stop()          # Corral still counts it up: the next probe is 30 s away
    status, ctype, raw, elapsed, _ = await post_timed(gw)
    assert status == 502, raw
    message = assert_error_body(ctype, raw)
    assert "b0" in message, message
    assert elapsed < 1.0, f"a refused connection took {elapsed:.2f}s to report"
    assert [b["in_flight"] for b in wait_idle(gw)["backends"]] == [0]
    assert [r["status"] for r in generate_records(gw)] == [502]


async def test_backend_never_accepting_hits_the_connect_timeout(
        start_sim: Any, start_corral: Any) -> None:
    """The backend's port is taken over by a listener whose accept queue is full:
    SYNs go unanswered, so only ``timeouts.connect`` can end the wait (504, as nginx
    answers a connect timeout)."""
    sim: Sim = start_sim("--models", "llama3.2:latest", "--instant")
    gw: Gateway = start_corral({"backends": backends(sim), "health": {"interval": "30s"},
                                "timeouts": {"connect": "500ms"}})
    sim.stop()
    black = socket.socket()
    filler = socket.socket()
    try:
        black.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        black.bind(("127.0.0.1", sim.port))
        black.listen(0)
        filler.connect(("127.0.0.1", sim.port))     # the one queued connection it allows
        status, ctype, raw, elapsed, _ = await post_timed(gw)
    finally:
        filler.close()
        black.close()
    assert status == 504, raw
    message = assert_error_body(ctype, raw)
    assert "b0" in message and "timed out" in message, message
    assert 0.4 < elapsed < 2.0, f"connect timeout 500 ms, answered after {elapsed:.2f}s"
    assert [b["in_flight"] for b in wait_idle(gw)["backends"]] == [0]
    assert [r["status"] for r in generate_records(gw)] == [504]


async def test_dead_backend_from_the_start_is_503_at_once(start_corral: Any) -> None:
    with socket.socket() as s:          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw: Gateway = start_corral({"backends": [{"url": f"http://127.0.0.1:{port}"}],
                                "health": {"interval": "30s"}}, wait_ready=False)
    status, ctype, raw, elapsed, retry_after = await post_timed(gw)
    assert status == 503, raw
    assert_error_body(ctype, raw)
    assert retry_after is not None and int(retry_after) >= 1
    assert elapsed < 1.0, f"took {elapsed:.2f}s"
    assert gw.status()["queue"]["depth"] == 0
