"""The lean upstream client against a scripted HTTP server on a real socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from corral.pipeline.upstream import Pool, UpstreamError, encode_head
from tests.waiting import eventually

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Script], Awaitable[tuple[str, list[int]]]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> tuple[str, list[int]]:
        connections: list[int] = []

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            connections.append(1)
            try:
                await script(r, w)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                w.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}", connections

    yield start
    for s in servers:
        s.close()


HEAD = encode_head("POST", "/api/generate",
                   [(b"Content-Type", b"application/json"), (b"Connection", b"x"),
                    (b"Host", b"client")], frozenset({b"connection", b"host"}))


async def _body(resp: object) -> bytes:
    out = b""
    while chunk := await resp.read_chunk():  # type: ignore[attr-defined]
        out += chunk
    return out


def test_encode_head_drops_listed_headers() -> None:
    assert HEAD == b"POST /api/generate HTTP/1.1\r\nContent-Type: application/json\r\n"


async def test_content_length_chunked_and_keep_alive(serve) -> None:  # type: ignore[no-untyped-def]
    seen: list[bytes] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for i in range(2):
            seen.append(await _read_request(r))
            if i == 0:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            else:
                w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                        b"Content-Type: application/x-ndjson\r\n\r\n"
                        b"3\r\nab\n\r\n3\r\ncd\n\r\n0\r\n\r\n")
            await w.drain()

    url, conns = await serve(script)
    pool = Pool(url, 1.0)
    r1 = await pool.request(HEAD, b'{"a":1}', 1.0, 1.0)
    assert (r1.status, r1.content_length, await _body(r1)) == (200, 5, b"hello")
    r1.release()
    r2 = await pool.request(HEAD, b"{}", 1.0, 1.0)
    assert r2.content_type == "application/x-ndjson"
    assert await _body(r2) == b"ab\ncd\n"
    r2.release()
    assert len(conns) == 1                       # the connection was reused
    assert seen[0].endswith(b"Content-Length: 7\r\n\r\n{\"a\":1}")
    assert b"Host: 127.0.0.1:" in seen[0]
    pool.close()


async def test_body_until_connection_close(serve) -> None:  # type: ignore[no-untyped-def]
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await w.drain()

    url, _ = await serve(script)
    resp = await Pool(url, 1.0).request(HEAD, b"{}", 1.0, 1.0)
    assert await _body(resp) == b"all of it"


async def test_stale_pooled_connection_is_retried_once(serve) -> None:  # type: ignore[no-untyped-def]
    hung_up = asyncio.Event()

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        # then close while idle: the pooled connection is stale
        w.close()
        await w.wait_closed()
        hung_up.set()

    url, conns = await serve(script)
    pool = Pool(url, 1.0)
    first = await pool.request(HEAD, b"{}", 1.0, 1.0)
    await _body(first)
    first.release()
    await eventually(hung_up.is_set, "the backend to close the idle connection")
    second = await pool.request(HEAD, b"{}", 1.0, 1.0)
    assert await _body(second) == b"ok"
    assert len(conns) == 2


async def test_first_byte_and_read_timeouts(serve) -> None:  # type: ignore[no-untyped-def]
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        await asyncio.sleep(5)

    url, _ = await serve(silent)
    with pytest.raises(UpstreamError) as info:
        await Pool(url, 1.0).request(HEAD, b"{}", 0.2, 1.0)
    assert info.value.kind == "timeout" and info.value.before_response

    async def stalls(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nx\n\r\n")
        await w.drain()
        await asyncio.sleep(5)

    url, _ = await serve(stalls)
    resp = await Pool(url, 1.0).request(HEAD, b"{}", 1.0, 0.2)
    assert await resp.read_chunk() == b"x\n"
    with pytest.raises(UpstreamError) as info:
        await resp.read_chunk()
    assert info.value.kind == "timeout" and not info.value.before_response


async def test_refused_connection() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UpstreamError) as info:
        await Pool(f"http://127.0.0.1:{port}", 1.0).request(HEAD, b"{}", 1.0, 1.0)
    assert info.value.kind == "error" and info.value.before_response


async def test_slow_reader_pauses_the_backend(serve) -> None:  # type: ignore[no-untyped-def]
    big = b"y" * 65536

    async def flood(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(64):
            w.write(b"%x\r\n" % len(big) + big + b"\r\n")
            await w.drain()
        w.write(b"0\r\n\r\n")
        await w.drain()

    url, _ = await serve(flood)
    resp = await Pool(url, 1.0).request(HEAD, b"{}", 1.0, 5.0)
    # Nobody read: Corral stopped reading near its high-water mark instead of taking
    # in the whole 4 MiB answer.
    await eventually(lambda: resp._conn.paused, "Corral to stop reading from the backend")
    assert resp._conn.buffered < 1024 * 1024
    assert len(await _body(resp)) == 64 * len(big)


async def test_timeout_on_a_pooled_connection_is_not_retried(serve) -> None:  # type: ignore[no-untyped-def]
    requests: list[int] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        requests.append(1)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        await _read_request(r)
        requests.append(1)
        await asyncio.sleep(5)          # now it hangs

    url, conns = await serve(script)
    pool = Pool(url, 1.0)
    first = await pool.request(HEAD, b"{}", 1.0, 1.0)
    await _body(first)
    first.release()
    with pytest.raises(UpstreamError) as info:
        await pool.request(HEAD, b"{}", 0.3, 1.0)
    assert info.value.kind == "timeout"
    # One wait for the first byte, on the pooled connection; no second connection
    # opened to the same slow backend.
    assert len(conns) == 1 and len(requests) == 2


async def test_forward_headers_drop_hop_by_hop(serve) -> None:  # type: ignore[no-untyped-def]
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nX-Private: 1\r\nContent-Type: application/json; "
                b"charset=utf-8\r\nConnection: keep-alive, X-Private\r\nKeep-Alive: 5\r\n"
                b"Transfer-Encoding: chunked\r\nX-Model: m\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
        await w.drain()

    url, _ = await serve(script)
    resp = await Pool(url, 1.0).request(HEAD, b"{}", 1.0, 1.0)
    assert resp.content_type == "application/json" and resp.content_length is None
    assert sorted(resp.forward_headers) == ["Content-Type", "X-Model"]
    assert resp.headers["X-Private"] == "1"          # all of them, on demand
    assert await _body(resp) == b"{}"
