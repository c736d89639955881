"""A lean pooled HTTP/1.1 client for the hot path: inference requests to backends.

Why not aiohttp's client here: per request it builds a ClientRequest, a tracing
context, a response object with its own stream reader and timers; profiling showed
that to be a fifth of Corral's CPU per proxied request. Backends are a handful of
known HTTP/1.1 servers and inference requests are plain POSTs with a body in hand,
so this client writes the request in one ``write`` and parses the answer with
``httptools`` (llhttp), handing body chunks to the relay as they arrive.
Everything else (probes, fleet-wide calls, model management) uses aiohttp.

Invariants:
- a connection is reused only after its response ended cleanly and both sides
  allow keep-alive; anything else closes it;
- a pooled connection that fails before a single response byte arrived (the
  backend closed it while idle) is retried once on a fresh connection, without
  charging the backend a failure — that is not the backend's fault;
- reading stops (``pause_reading``) while the client is slower than the backend,
  so a slow client never makes Corral buffer a whole stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterable
from typing import cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

_HIGH_WATER = 256 * 1024
# Response headers never forwarded (RFC 9110 §7.6.1, plus the framing the server
# side computes itself).
_HOP_BY_HOP_RESPONSE = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"content-length",
})
_IDLE_SECONDS = 30.0


class UpstreamError(Exception):
    """The backend failed; ``kind`` is ``error`` or ``timeout``; ``before_response``
    says nothing of the answer had arrived yet."""

    def __init__(self, kind: str, message: str, before_response: bool) -> None:
        super().__init__(message)
        self.kind = kind
        self.before_response = before_response


class _Conn(asyncio.Protocol):
    """One connection; serves one request at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.keep_alive = False
        self.until_eof = False
        self.reason = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.headers_done: asyncio.Future[None] = self.loop.create_future()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.got_bytes = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they quack alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("error", f"invalid response: {exc}",
                                     not self.headers_done.done()))
            self._abort()
            return
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.until_eof and exc is None:
            # A body framed by the end of the connection (neither Content-Length nor
            # chunked): its end is the end of the message.
            self.complete = True
            self._wake()
        if not self.complete:
            before = not self.headers_done.done()
            self._fail(UpstreamError("error", "backend closed the connection"
                                     + (f": {exc}" if exc else ""), before))

    # -- httptools callbacks --------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        # Read now: llhttp forgets it once the message is complete.
        self.keep_alive = self.parser.should_keep_alive()
        names = {k.lower() for k, _ in self.raw_headers}
        self.until_eof = (b"content-length" not in names and b"transfer-encoding" not in names
                          and self.status not in (204, 304) and self.status >= 200)
        if not self.headers_done.done():
            self.headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # -- helpers ------------------------------------------------------------------------

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        if not self.headers_done.done():
            self.headers_done.set_exception(error)
            # Retrieved or not, never log "exception was never retrieved".
            self.headers_done.exception()
        self._wake()

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _timeout(self, what: str) -> None:
        self._fail(UpstreamError("timeout", f"backend timed out {what}",
                                 not self.headers_done.done()))
        self._abort()


class Interrupt:
    """A handle on one request in flight, for the scheduler to stop it before any of
    its answer has arrived (preemption). Set up only for preemptible requests."""

    __slots__ = ("conn",)

    def __init__(self) -> None:
        self.conn: _Conn | None = None

    def interrupt(self) -> bool:
        """Close the request's connection (the backend stops generating) and make its
        caller see ``UpstreamError("preempted")``; False when the answer's header is
        already in (its client may be getting bytes) or the request is not sent yet."""
        conn = self.conn
        if conn is None or conn.closed or conn.headers_done.done():
            return False
        conn._fail(UpstreamError("preempted", "stopped to give the slot to a "
                                 "higher-priority request", True))
        conn._abort()
        return True


class Response:
    """The backend's answer: status and headers now, body chunks as they come."""

    def __init__(self, conn: _Conn, read_timeout: float | None) -> None:
        self._conn = conn
        self._read_timeout = read_timeout
        self.status = conn.status
        self.reason = conn.reason.decode("latin-1") or None
        # One pass over the raw header bytes: what the relay forwards (hop-by-hop
        # ones dropped) and the two values the pipeline reads.
        drop = _HOP_BY_HOP_RESPONSE
        forward: CIMultiDict[str] = CIMultiDict()
        self.content_length: int | None = None
        self.content_type = ""
        for k, v in conn.raw_headers:
            name = k.lower()
            if name == b"content-length":
                self.content_length = int(v) if v.isdigit() else None
            elif name == b"content-type":
                self.content_type = v.split(b";", 1)[0].strip().lower().decode("latin-1")
            elif name == b"connection" and v.lower() not in (b"keep-alive", b"close"):
                drop = drop | {h.strip().lower() for h in v.split(b",")}
            if name not in drop:
                forward.add(k.decode("latin-1"), v.decode("latin-1"))
        if drop is not _HOP_BY_HOP_RESPONSE:
            for name in drop - _HOP_BY_HOP_RESPONSE:
                forward.popall(name.decode("latin-1"), None)
        self.forward_headers = forward
        self._released = False

    @property
    def headers(self) -> CIMultiDict[str]:
        """All the backend's headers (built on demand: the relay needs only
        ``forward_headers``)."""
        out: CIMultiDict[str] = CIMultiDict()
        for k, v in self._conn.raw_headers:
            out.add(k.decode("latin-1"), v.decode("latin-1"))
        return out

    async def read_chunk(self) -> bytes:
        """The next body chunk; ``b""`` at the end; raises UpstreamError on failure."""
        conn = self._conn
        while True:
            if conn.chunks:
                if len(conn.chunks) == 1:
                    chunk = conn.chunks.popleft()
                else:
                    # Coalesce what is already here: one write to the client, not many.
                    chunk = b"".join(conn.chunks)
                    conn.chunks.clear()
                conn.buffered = 0
                if conn.paused and conn.transport is not None:
                    conn.paused = False
                    conn.transport.resume_reading()
                return chunk
            if conn.complete:
                return b""
            if conn.error is not None:
                raise conn.error
            conn.waiter = conn.loop.create_future()
            timer = (conn.loop.call_later(self._read_timeout, conn._timeout,
                                          "between two chunks")
                     if self._read_timeout else None)
            try:
                await conn.waiter
            finally:
                conn.waiter = None
                if timer is not None:
                    timer.cancel()

    def at_eof(self) -> bool:
        return self._conn.complete and not self._conn.chunks

    def release(self) -> None:
        """Done with the response: keep the connection if it ended cleanly."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        if conn.complete and not conn.closed and conn.error is None and conn.keep_alive:
            conn.pool.put_back(conn)
        else:
            conn._abort()

    def close(self) -> None:
        """Abandon the response (client left, error): the connection is closed, which
        makes the backend stop generating."""
        if not self._released:
            self._released = True
            self._conn._abort()


class Pool:
    """Keep-alive connections to one backend."""

    def __init__(self, url: str, connect_timeout: float | None) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = parts.scheme == "https"
        self.host_header = parts.netloc.encode("latin-1")
        self.connect_timeout = connect_timeout
        self.loop = asyncio.get_running_loop()
        self._idle: list[_Conn] = []
        self._all: set[_Conn] = set()

    async def _connect(self) -> _Conn:
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await self.loop.create_connection(
                    lambda: _Conn(self), self.host, self.port, ssl=self.ssl or None)
        except TimeoutError:
            raise UpstreamError("timeout", f"connect to {self.host}:{self.port} timed out",
                                True) from None
        except OSError as exc:
            raise UpstreamError("error", f"cannot connect to {self.host}:{self.port}: "
                                f"{exc.strerror or exc}", True) from None
        self._all.add(proto)
        return proto

    def _take_idle(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    def put_back(self, conn: _Conn) -> None:
        conn._reset()
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def forget(self, conn: _Conn) -> None:
        self._all.discard(conn)

    def close_idle(self, older_than: float = _IDLE_SECONDS) -> None:
        now = time.monotonic()
        keep = []
        for conn in self._idle:
            if now - conn.idle_since > older_than:
                conn._abort()
            else:
                keep.append(conn)
        self._idle = keep

    def close(self) -> None:
        for conn in list(self._all):
            conn._abort()
        self._idle.clear()

    async def request(self, head: bytes, body: bytes, first_byte_timeout: float | None,
                      read_timeout: float | None, watch: Interrupt | None = None) -> Response:
        """Send ``head`` (request line and headers, without Host/Content-Length) and
        ``body``; return once the response header is in. ``watch`` lets the scheduler
        stop the request until then."""
        conn = self._take_idle()
        reused = conn is not None
        if conn is None:
            conn = await self._connect()
        try:
            return await self._exchange(conn, head, body, first_byte_timeout, read_timeout,
                                        watch)
        except UpstreamError as exc:
            # Only a pooled connection found closed is retried: a timeout means the
            # backend itself is slow, and waiting for it twice would double the wait.
            if not (reused and exc.kind == "error" and exc.before_response
                    and not conn.got_bytes):
                raise
        # The idle connection had been closed by the backend: once more, fresh.
        conn = await self._connect()
        return await self._exchange(conn, head, body, first_byte_timeout, read_timeout, watch)

    async def _exchange(self, conn: _Conn, head: bytes, body: bytes,
                        first_byte_timeout: float | None,
                        read_timeout: float | None, watch: Interrupt | None) -> Response:
        assert conn.transport is not None
        if watch is not None:
            watch.conn = conn
        conn.transport.writelines((
            head, b"Host: ", self.host_header, b"\r\nContent-Length: ",
            str(len(body)).encode(), b"\r\n\r\n", body))
        timer = (self.loop.call_later(first_byte_timeout, conn._timeout,
                                      "before the first byte")
                 if first_byte_timeout else None)
        try:
            await conn.headers_done
        except BaseException:
            # Timed out, failed, or our caller was cancelled (client left): this
            # connection is mid-request and cannot be reused.
            conn._abort()
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if watch is not None:
                # The answer is coming (or the request is over): no longer stoppable,
                # and the connection may go back to the pool for another request.
                watch.conn = None
        return Response(conn, read_timeout)


def encode_head(method: str, path_qs: str, raw_headers: Iterable[tuple[bytes, bytes]],
                drop: frozenset[bytes]) -> bytes:
    """Request line and the client's headers as they came (raw bytes: no decoding and
    re-encoding per request), less the lower-cased names in ``drop`` — hop-by-hop
    ones, Host and Content-Length, which ``Pool.request`` adds."""
    parts = [f"{method} {path_qs} HTTP/1.1\r\n".encode("latin-1")]
    for name, value in raw_headers:
        if name.lower() not in drop:
            parts += (name, b": ", value, b"\r\n")
    return b"".join(parts)


class Pools:
    """One pool per backend, created on first use; idle connections swept."""

    def __init__(self, connect_timeout: float | None) -> None:
        self.connect_timeout = connect_timeout
        self._pools: dict[str, Pool] = {}
        self._task: asyncio.Task[None] | None = None

    def get(self, url: str) -> Pool:
        pool = self._pools.get(url)
        if pool is None:
            pool = self._pools[url] = Pool(url, self.connect_timeout)
        elif pool.connect_timeout != self.connect_timeout:
            pool.connect_timeout = self.connect_timeout     # changed by a reload
        return pool

    def drop(self, url: str) -> None:
        """A backend left the configuration: close its connections."""
        pool = self._pools.pop(url, None)
        if pool is not None:
            pool.close()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_IDLE_SECONDS / 3)
            for pool in self._pools.values():
                pool.close_idle()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for pool in self._pools.values():
            pool.close()
