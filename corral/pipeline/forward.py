"""Forward a request upstream and relay the answer chunk by chunk.

Invariants kept here:
- nothing buffers a body: every chunk read from the backend is written to the client
  before the next read;
- a failure before the first byte reaches the client may be retried by the caller
  (``UpstreamFailure`` is raised before anything is written); after it, never;
- a client that goes away cancels this task (handler cancellation is on), and the
  ``finally`` blocks close the upstream connection, which stops the generation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

from corral.backends.backend import Backend
from corral.pipeline.account import TAIL_BYTES
from corral.pipeline.upstream import UpstreamError

# RFC 9110 §7.6.1 hop-by-hop headers, plus the ones aiohttp computes itself.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Trailers", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
        "Expect",
    )
)


def _drop_listed(headers: MultiMapping[str]) -> frozenset[str]:
    listed = headers.get("Connection")
    if not listed:
        return _HOP_BY_HOP
    return _HOP_BY_HOP | {h.strip().lower() for h in listed.split(",")}


HOP_BY_HOP_BYTES = frozenset(h.encode() for h in _HOP_BY_HOP)
CREDENTIALS_BYTES = frozenset({b"authorization", b"x-api-key"})
# Once Corral has allowed an origin (cors.py) the backend is not asked again: an Ollama
# with a narrower OLLAMA_ORIGINS would refuse what the operator allowed here.
ORIGIN_BYTES = frozenset({b"origin"})


def raw_drop_set(headers: MultiMapping[str], strip_credentials: bool,
                 strip_origin: bool = False) -> frozenset[bytes]:
    """Lower-cased header names (bytes) not to forward for this request."""
    drop = HOP_BY_HOP_BYTES
    listed = headers.get("Connection")
    if listed:
        drop = drop | {h.strip().lower().encode("latin-1") for h in listed.split(",")}
    if strip_origin:
        drop = drop | ORIGIN_BYTES
    return drop | CREDENTIALS_BYTES if strip_credentials else drop


def request_headers(headers: CIMultiDictProxy[str],
                    strip: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """Client headers for the backend with hop-by-hop ones dropped. ``Host`` is
    dropped too: aiohttp sets the backend's own (Ollama on loopback answers 403 to a
    foreign Host)."""
    drop = _drop_listed(headers) | strip
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        if k.lower() not in drop:
            out.add(k, v)
    return out


_CREDENTIALS = frozenset({"authorization", "x-api-key"})
_ORIGIN = frozenset({"origin"})


def upstream_headers(request: web.BaseRequest) -> CIMultiDict[str]:
    """The client's headers for a backend; a Corral key is Corral's business, so it is
    not passed on."""
    client = request.get("client")
    strip = _CREDENTIALS if client is not None and client.key_matched else frozenset()
    if "cors_origin" in request:
        strip = strip | _ORIGIN
    return request_headers(request.headers, strip)


def response_headers(headers: MultiMapping[str]) -> CIMultiDict[str]:
    drop = _drop_listed(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        if k.lower() not in drop:
            out.add(k, v)
    return out


class UpstreamFailure(Exception):
    """The backend failed before sending a response header: safe to retry."""

    def __init__(self, kind: str, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.kind = kind          # "error" | "timeout"
        self.status = status      # what the client gets if no retry succeeds


@dataclass
class Timeouts:
    connect: float
    first_byte: float
    read: float

    def client_timeout(self) -> aiohttp.ClientTimeout:
        # sock_read covers the wait for the header (a cold model load happens before
        # it); once the header is in, ``open_upstream`` narrows it to ``read``.
        return aiohttp.ClientTimeout(total=None, connect=None,
                                     sock_connect=self.connect or None,
                                     sock_read=self.first_byte or None)


async def open_upstream(session: aiohttp.ClientSession, backend: Backend, method: str,
                        path_qs: str, headers: CIMultiDict[str], body: bytes | None,
                        timeouts: Timeouts,
                        client_timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
    """Send the request and wait for the response header."""
    try:
        resp = await session.request(method, backend.url + path_qs, headers=headers,
                                     data=body, timeout=client_timeout,
                                     allow_redirects=False)
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise UpstreamFailure("timeout", f"backend {backend.name} timed out: {exc}",
                              504) from None
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamFailure("error", f"backend {backend.name} unreachable: {exc.os_error}",
                              502) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamFailure("error", f"backend {backend.name} failed: {exc!r}", 502) from None
    if resp.connection is not None and resp.connection.protocol is not None:
        resp.connection.protocol.read_timeout = timeouts.read or None
    return resp


@dataclass(slots=True)
class RelayResult:
    # The request's arrival (monotonic): time to first byte counts from it, as the
    # client waits, so every caller must say when that was.
    started: float
    status: int = 0
    nbytes: int = 0
    chunks: int = 0
    ttfb: float | None = None      # seconds from ``started`` to the first body byte
    tail: bytes = b""
    error: str | None = None
    client_gone: bool = False
    completed: bool = False


class Source(Protocol):
    """What the relay reads from: the lean pool's ``Response`` or ``AiohttpSource``."""

    @property
    def status(self) -> int: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def headers(self) -> MultiMapping[str]: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def forward_headers(self) -> CIMultiDict[str]:
        """The headers to pass on to the client (hop-by-hop ones dropped)."""
        ...

    async def read_chunk(self) -> bytes: ...

    def at_eof(self) -> bool:
        """Nothing more will come: the chunk just read was the last."""
        ...


class AiohttpSource:
    """An aiohttp client response seen as a relay source (non-hot routes)."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.status = resp.status
        self.reason = resp.reason
        self.headers = resp.headers
        self.content_length = resp.content_length
        self.forward_headers = response_headers(resp.headers)

    async def read_chunk(self) -> bytes:
        return await self.resp.content.readany()

    def at_eof(self) -> bool:
        return self.resp.content.at_eof()


_READ_ERRORS = (TimeoutError, UpstreamError, aiohttp.ClientPayloadError,
                aiohttp.ClientConnectionError)


async def relay(request: web.BaseRequest, upstream: Source, result: RelayResult,
                sse: bool, extra_headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Stream ``upstream`` to the client as it arrives; keep a bounded tail for
    accounting. Mid-stream upstream failures end an NDJSON stream with an
    ``{"error": ...}`` line, as Ollama does, and an SSE stream without ``[DONE]``."""
    headers = upstream.forward_headers
    if extra_headers:
        headers.update(extra_headers)
    resp = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    length = upstream.content_length
    if length is not None:
        resp.content_length = length
    result.status = upstream.status
    await resp.prepare(request)
    tail = bytearray()
    read = upstream.read_chunk
    while True:
        try:
            chunk = await read()
        except _READ_ERRORS as exc:
            # Only the upstream read is guarded: a client that went away raises from
            # ``resp.write`` below and ends the relay (the caller closes upstream).
            result.error = _mid_stream_message(exc)
            if length is not None:
                # A fixed-length body cannot carry an error: cut the connection so the
                # client sees a truncated response, not a hang.
                resp.force_close()
                if request.transport is not None:
                    request.transport.close()
                result.tail = bytes(tail)
                return resp
            if not sse:
                await resp.write(b'{"error":' + orjson.dumps(result.error) + b"}\n")
            break
        if not chunk:
            result.completed = True
            break
        if result.ttfb is None:
            result.ttfb = time.monotonic() - result.started
        if upstream.at_eof():
            # The last chunk: send it with the end of the response in one write.
            _count(result, tail, chunk)
            result.completed = True
            result.tail = bytes(tail)
            await resp.write_eof(chunk)
            return resp
        await resp.write(chunk)
        _count(result, tail, chunk)
    result.tail = bytes(tail)
    await resp.write_eof()
    return resp


def _count(result: RelayResult, tail: bytearray, chunk: bytes) -> None:
    result.nbytes += len(chunk)
    result.chunks += chunk.count(b"\n")
    tail += chunk
    if len(tail) > 2 * TAIL_BYTES:
        del tail[:-TAIL_BYTES]


def _mid_stream_message(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | aiohttp.SocketTimeoutError) or (
            isinstance(exc, UpstreamError) and exc.kind == "timeout"):
        return "upstream timed out between two chunks"
    return "upstream connection lost mid-stream"
