"""The benchmark's load generator parses real HTTP/1.1 responses from a real socket:
Content-Length and chunked bodies, keep-alive reuse, statuses, and NDJSON streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from corral.bench import load

LINES = [b'{"response":"a","done":false}\n', b'{"response":"b","done":false}\n',
         b'{"response":"","done":true}\n']


async def _fixed(request: web.Request) -> web.Response:
    return web.Response(body=b"x" * int(request.query.get("n", "10")))


async def _chunked(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.enable_chunked_encoding()
    resp.content_type = "application/x-ndjson"
    await resp.prepare(request)
    for line in LINES:
        # Split each line across two chunks: the line counter must join them.
        await resp.write(line[:5])
        await resp.write(line[5:])
        await asyncio.sleep(0)
    await resp.write_eof()
    return resp


async def _empty(request: web.Request) -> web.Response:
    return web.Response(status=204)


async def _close(request: web.Request) -> web.Response:
    return web.Response(body=b"bye", headers={"Connection": "close"})


async def _generate(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if body.get("stream", True):
        return await _chunked(request)
    return web.json_response({"response": "a", "done": True})


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, int]]:
    app = web.Application()
    app.router.add_get("/fixed", _fixed)
    app.router.add_get("/chunked", _chunked)
    app.router.add_get("/empty", _empty)
    app.router.add_get("/close", _close)
    app.router.add_post("/api/generate", _generate)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield host, port
    finally:
        await runner.cleanup()


async def test_content_length_bodies_and_keep_alive(server: tuple[str, int]) -> None:
    host, port = server
    conn = load.Connection(host, port)
    try:
        for n in (0, 1, 10, 100_000):
            req = load.encode_request(host, port, "GET", f"/fixed?n={n}")
            resp = await conn.exchange(req, collect=True)
            assert resp.status == 200
            assert resp.body_bytes == n
            assert resp.body == b"x" * n
            assert resp.keep_alive
        missing = await conn.exchange(load.encode_request(host, port, "GET", "/nowhere"))
        assert missing.status == 404
        empty = await conn.exchange(load.encode_request(host, port, "GET", "/empty"))
        assert (empty.status, empty.body_bytes) == (204, 0)
        assert conn.opened == 1  # every response above was read exactly to its end
    finally:
        conn.close()


async def test_chunked_body_is_decoded(server: tuple[str, int]) -> None:
    host, port = server
    conn = load.Connection(host, port)
    pieces: list[bytes] = []
    try:
        req = load.encode_request(host, port, "GET", "/chunked")
        for _ in range(2):
            pieces.clear()
            resp = await conn.exchange(req, collect=True, on_data=pieces.append)
            assert resp.status == 200
            assert resp.body == b"".join(LINES)
            assert resp.body_bytes == sum(len(line) for line in LINES)
            assert b"".join(pieces) == resp.body
            assert len(pieces) >= len(LINES)
        assert conn.opened == 1
    finally:
        conn.close()


async def test_connection_close_reopens(server: tuple[str, int]) -> None:
    host, port = server
    conn = load.Connection(host, port)
    try:
        req = load.encode_request(host, port, "GET", "/close")
        for _ in range(3):
            resp = await conn.exchange(req, collect=True)
            assert (resp.status, resp.body, resp.keep_alive) == (200, b"bye", False)
        assert conn.opened == 3
    finally:
        conn.close()


async def test_sequential_and_throughput_count_requests(server: tuple[str, int]) -> None:
    host, port = server
    req = load.generate_request(host, port, "m", 1, stream=False)
    seq = await load.sequential(host, port, req, 50, warmup=5)
    assert (seq.requests, seq.errors, seq.statuses, seq.reconnects) == (50, 0, {200: 50}, 0)
    assert 0 < seq.p50_ms <= seq.p99_ms

    bad = load.encode_request(host, port, "GET", "/nowhere")
    seq = await load.sequential(host, port, bad, 5)
    assert (seq.errors, seq.statuses) == (5, {404: 5})

    tput = await load.throughput(host, port, req, 4, 0.3, warmup=0.05)
    assert tput.completed > 0 and tput.errors == 0
    assert tput.statuses == {200: tput.completed}
    assert tput.connections_opened == 4


async def test_streams_count_lines_and_completion(server: tuple[str, int]) -> None:
    host, port = server
    req = load.generate_request(host, port, "m", 3, stream=True)
    res = await load.streams(host, port, req, 20)
    assert (res.streams, res.completed, res.failures) == (20, 20, {})
    assert res.lines_per_stream_min == res.lines_per_stream_max == len(LINES)
    assert 0 < res.ttft_p50_ms <= res.ttft_p99_ms

    not_found = load.encode_request(host, port, "POST", "/api/nothing", b"{}")
    res = await load.streams(host, port, not_found, 3)
    assert (res.completed, res.failures) == (0, {"status 404": 3})


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert load.percentile(values, 50) == 50.0
    assert load.percentile(values, 99) == 99.0
    assert load.percentile(values, 100) == 100.0
    assert load.percentile([3.0], 99) == 3.0


async def test_body_without_framing_runs_to_close() -> None:
    # An HTTP/1.0-style answer: no Content-Length, no chunking, the close ends the body.
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nno framing here")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    conn = load.Connection("127.0.0.1", port)
    try:
        resp = await conn.exchange(load.encode_request("127.0.0.1", port, "GET", "/"),
                                   collect=True)
        assert (resp.status, resp.body, resp.keep_alive) == (200, b"no framing here", False)
    finally:
        conn.close()
        srv.close()
        await srv.wait_closed()
