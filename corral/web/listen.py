"""Listening sockets. Plain HTTP goes through the event loop's own server; HTTPS
through an accept loop that looks at each connection's first byte before the
handshake, for two things the loop's TLS server cannot do:

- a client speaking plain HTTP to the HTTPS port gets a readable answer (400,
  ``{"error": "…use https://…"}``, as nginx answers "The plain HTTP request was
  sent to HTTPS port") instead of a connection reset;
- each handshake uses the certificate current at that moment (``Certificates``),
  so a reload after a renewal needs no restart and cuts no open stream.

A connection that sends nothing, or trickles its handshake, is closed after
``timeouts.client_body`` (slowloris). None of this holds a slot: slots are taken per
request, after the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable

import orjson

from corral.web.tls import Certificates

log = logging.getLogger("corral.http")

_TLS_HANDSHAKE = 0x16           # the first byte of a TLS record carrying a ClientHello


def _plain_http_refusal(port: int) -> bytes:
    body = orjson.dumps({"error": f"port {port} speaks HTTPS: the request was sent "
                                  "as plain HTTP; use an https:// URL"})
    return (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


class TlsListener:
    def __init__(self, protocol_factory: Callable[[], asyncio.Protocol], host: str, port: int,
                 certs: Certificates, timeout: Callable[[], float], backlog: int = 4096) -> None:
        """``timeout``: the current ``timeouts.client_body`` (a reload may change it)."""
        self._factory = protocol_factory
        self._address = (host, port)
        self._certs = certs
        self._timeout = timeout
        self._backlog = backlog
        self._refusal = _plain_http_refusal(port)
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        host, port = self._address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=self._backlog)
        self._sock.setblocking(False)
        self._task = asyncio.get_running_loop().create_task(self._accept(self._sock),
                                                            name=f"corral-tls-{port}")

    def close(self) -> None:
        """Stop accepting; connections already handed to the server stay (graceful
        shutdown drains them), half-done handshakes are dropped."""
        if self._task is not None:
            self._task.cancel()
        for task in list(self._pending):
            task.cancel()
        if self._sock is not None:
            self._sock.close()

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                # Out of descriptors, say: the listener must outlive it.
                log.error("accepting a TLS connection failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._serve(conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        timeout = self._timeout()
        handed_over = False
        try:
            # No TCP_NODELAY here: aiohttp's handler sets it when the connection is
            # handed over, as for the plain listener.
            conn.setblocking(False)
            async with asyncio.timeout(timeout):
                first = await _peek(conn)
                if not first:
                    return
                if first[0] != _TLS_HANDSHAKE:
                    await loop.sock_sendall(conn, self._refusal)
                    await _linger(conn)
                    return
            await loop.connect_accepted_socket(
                self._factory, conn, ssl=self._certs.context, ssl_handshake_timeout=timeout)
            handed_over = True
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            log.debug("TLS connection dropped before its first request: %r", exc)
        finally:
            if not handed_over:
                with contextlib.suppress(OSError):
                    conn.close()


async def _linger(conn: socket.socket) -> None:
    """Read what the client is still sending before closing: closing with unread
    data resets the connection, and the client would lose the answer (nginx's
    lingering close). The caller's timeout bounds it."""
    loop = asyncio.get_running_loop()
    conn.shutdown(socket.SHUT_WR)
    while await loop.sock_recv(conn, 65536):
        pass


async def _peek(conn: socket.socket) -> bytes:
    """The first bytes the client sent, left in the socket for the handshake to read
    (b"" when it closed without sending anything)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    fd = conn.fileno()

    def readable() -> None:
        try:
            data = conn.recv(8, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not done.done():
            done.set_result(data)

    loop.add_reader(fd, readable)
    try:
        return await done
    finally:
        loop.remove_reader(fd)
