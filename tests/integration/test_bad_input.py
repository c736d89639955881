"""Bad input: each answered with the right 4xx in Ollama's error shape, holding nothing.

A request Corral refuses must not take a slot, sit in the queue or reach a backend;
one that only a backend can judge (a wrongly typed field Corral does not parse) gets
the backend's own answer, in Ollama's words, and frees its slot.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import Gateway, Sim, backends

SIM_ARGS = ("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--instant")
MAX_BODY = 4096
# What a backend counts as work; probes (/api/tags, /api/ps) do not count.
_PROBES = frozenset({"/", "/api/tags", "/api/ps", "/api/version"})


@pytest.fixture
def sim(start_sim: Any) -> Sim:
    sim: Sim = start_sim(*SIM_ARGS)
    return sim


@pytest.fixture
def gw(sim: Sim, start_corral: Any) -> Gateway:
    gw: Gateway = start_corral({"backends": backends(sim), "max_body_size": MAX_BODY,
                                "health": {"interval": "30s"}})
    return gw


def work_seen(sim: Sim) -> dict[str, int]:
    """Requests the stand-in received other than health probes."""
    return {p: n for p, n in sim.stats()["requests"].items() if p not in _PROBES}


def assert_nothing_held(gw: Gateway, sim: Sim | None = None) -> None:
    st = gw.status()
    assert [b["in_flight"] for b in st["backends"]] == [0] * len(st["backends"]), st
    assert st["queue"]["depth"] == 0, st["queue"]
    if sim is not None:
        assert work_seen(sim) == {}, "the backend received a request Corral should refuse"


def assert_ollama_error(status: int, content_type: str, raw: bytes) -> str:
    """``{"error": "<text>"}`` as JSON, nothing else; returns the text."""
    assert content_type.startswith("application/json"), (status, content_type, raw)
    body = json.loads(raw)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert isinstance(body["error"], str) and body["error"], body
    return str(body["error"])


async def post_raw(url: str, data: bytes,
                   headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=data, headers={"Content-Type": "application/json",
                                                   **(headers or {})}) as r:
            return r.status, r.headers.get("Content-Type", ""), await r.read()


def read_answer(sock: socket.socket) -> tuple[int, str, bytes] | None:
    """The HTTP answer on ``sock``, or None when the server closed without one."""
    resp = http.client.HTTPResponse(sock)
    try:
        resp.begin()
    except (http.client.RemoteDisconnected, ConnectionResetError):
        return None
    return resp.status, resp.getheader("Content-Type") or "", resp.read()


# -- parse errors ---------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body", "words"), [
    ("/api/generate", b'{"model": "llama3.2", "prompt": ', "invalid JSON"),
    ("/api/chat", b"{model: llama3.2}", "invalid JSON"),
    ("/api/generate", b"", "missing request body"),
    ("/api/generate", b'["llama3.2"]', "JSON object"),
    ("/api/generate", b'{"model": 3, "prompt": "x"}', "model"),
    ("/api/chat", b'{"model": ["llama3.2"], "messages": []}', "model"),
    ("/api/embed", b'{"model": null, "input": "x"}', "model is required"),
])
async def test_unparseable_request_is_400_and_never_forwarded(
        gw: Gateway, sim: Sim, path: str, body: bytes, words: str) -> None:
    status, ctype, raw = await post_raw(gw.url + path, body)
    assert status == 400, (status, raw)
    message = assert_ollama_error(status, ctype, raw)
    assert words in message, message
    assert_nothing_held(gw, sim)
    recs = [r for r in gw.records() if r["path"] == path]
    assert [r["status"] for r in recs] == [400]
    assert recs[0]["backend"] is None


async def test_wrongly_typed_field_gets_the_backends_own_400(gw: Gateway, sim: Sim) -> None:
    """``"messages": "x"``: Corral parses only ``model``, so the body goes to a backend
    as is, and Ollama's own decoder error comes back (REFERENCE B3: a wrong field type
    is a 400 with the Go decoder's text). Whatever holds it, the slot is freed."""
    status, ctype, raw = await post_raw(
        gw.url + "/api/chat", b'{"model": "llama3.2", "messages": "x"}')
    assert status == 400, (status, raw)
    message = assert_ollama_error(status, ctype, raw)
    assert "cannot unmarshal" in message and "messages" in message, message
    assert_nothing_held(gw)
    assert sim.stats()["in_flight"] == 0
    recs = [r for r in gw.records() if r["path"] == "/api/chat"]
    assert [r["status"] for r in recs] == [400]


async def test_oversized_body_is_413(gw: Gateway, sim: Sim) -> None:
    body = json.dumps({"model": "llama3.2", "prompt": "x" * (MAX_BODY * 2)}).encode()
    status, ctype, raw = await post_raw(gw.url + "/api/generate", body)
    assert status == 413, (status, raw)
    message = assert_ollama_error(status, ctype, raw)
    assert str(MAX_BODY) in message, message
    assert_nothing_held(gw, sim)
    # A body just under the limit still goes through.
    ok = json.dumps({"model": "llama3.2", "prompt": "x" * (MAX_BODY // 2),
                     "stream": False}).encode()
    status, _, raw = await post_raw(gw.url + "/api/generate", ok)
    assert status == 200, raw


# -- malformed HTTP -------------------------------------------------------------------


def test_body_that_never_finishes_is_cut_after_client_body_timeout(
        sim: Sim, start_corral: Any) -> None:
    """Headers announce 1000 bytes, 10 arrive, then nothing: after
    ``timeouts.client_body`` Corral answers 408 (or closes), having held nothing."""
    gw: Gateway = start_corral({"backends": backends(sim), "health": {"interval": "30s"},
                                "timeouts": {"client_body": "1s"}})
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    try:
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: corral\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                     b'{"model": ')
        t0 = time.monotonic()
        # Not a wait for anything: time for a wrongly admitted request to show.
        time.sleep(0.3)
        assert_nothing_held(gw, sim)          # a half-read body is not a job
        try:
            answer = read_answer(sock)
        except TimeoutError:
            pytest.fail("Corral kept waiting for the body past timeouts.client_body")
        elapsed = time.monotonic() - t0
        if answer is not None:                 # None: closed without an answer, acceptable
            status, ctype, raw = answer
            assert status == 408, (status, raw)
            assert_ollama_error(status, ctype, raw)
    finally:
        sock.close()
    # The client_body timer, not something sooner or much later, ended it.
    assert 0.7 < elapsed < 1 + 2.0, f"answered after {elapsed:.1f}s with client_body 1s"
    assert_nothing_held(gw, sim)
    # Corral is unharmed.
    status, _, raw = _post_blocking(gw, {"model": "llama3.2", "prompt": "x", "stream": False})
    assert status == 200, raw


def _post_blocking(gw: Gateway, data: dict[str, Any]) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request("POST", "/api/generate", body=json.dumps(data),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type") or "", r.read()
    finally:
        conn.close()


def test_header_too_large_is_a_json_4xx(gw: Gateway, sim: Sim) -> None:
    body = b'{"model": "llama3.2", "prompt": "x", "stream": false}'
    payload = (b"POST /api/generate HTTP/1.1\r\nHost: corral\r\n"
               b"Content-Type: application/json\r\n"
               b"X-Big: " + b"a" * 20_000 + b"\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    try:
        with contextlib.suppress(OSError):    # refused mid-send: the answer is still there
            sock.sendall(payload)
        answer = read_answer(sock)
    finally:
        sock.close()
    assert answer is not None, "the connection was closed without an answer"
    status, ctype, raw = answer
    assert status in (400, 431), (status, raw)
    assert_ollama_error(status, ctype, raw)
    assert_nothing_held(gw, sim)


# -- Corral's admin endpoint ----------------------------------------------------------


async def test_reload_refuses_a_missing_or_non_admin_key(sim: Sim, start_corral: Any) -> None:
    gw: Gateway = start_corral({
        "backends": backends(sim), "health": {"interval": "30s"},
        "keys": [{"name": "ops", "key": "sk-ops-admin", "admin": True},
                 {"name": "alice", "key": "sk-alice"}],
    })
    url = gw.url + "/corral/reload"
    refused = [
        {},                                               # no key
        {"Authorization": "Bearer sk-not-a-key"},         # unknown key
        {"Authorization": "Bearer sk-alice"},             # a key, not an admin one
        {"X-API-Key": "sk-alice"},
        {"Authorization": "Bearer sk-ops-admin-but-longer"},
    ]
    for headers in refused:
        status, ctype, raw = await post_raw(url, b"", headers)
        assert status in (401, 403), (headers, status, raw)
        assert_ollama_error(status, ctype, raw)
    assert_nothing_held(gw, sim)
    status, _, raw = await post_raw(url, b"", {"Authorization": "Bearer sk-ops-admin"})
    assert 200 <= status < 300, (status, raw)
