"""A lean HTTP/1.1 load generator for the overhead benchmark.

The benchmark compares a Python gateway with nginx on a small machine, where the load
generator shares the cores with the thing it measures. A full client (aiohttp,
httpx) spends more CPU per request than the gateway's own hot path, so it would
measure itself. This one writes pre-encoded request bytes on keep-alive asyncio
streams and parses only what it must: the status line, three headers, and a
``Content-Length`` or chunked body. Run it on uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

# A response head larger than this is not something a benchmark target sends;
# refusing it keeps a confused server from growing the reader's buffer.
_MAX_HEAD = 64 * 1024
# StreamReader's buffer limit: big enough for any single chunk a stand-in sends.
_READ_LIMIT = 1024 * 1024


class ProtocolError(Exception):
    """The peer sent something that is not a well-formed HTTP/1.1 response."""


@dataclass(slots=True)
class Response:
    status: int
    body_bytes: int
    # False when the server asked to close (or spoke HTTP/1.0 without keep-alive):
    # the caller must open a new connection before its next request.
    keep_alive: bool
    body: bytes = b""
    # The Retry-After header's value, when the answer had one (a 503 that says when).
    retry_after: bytes | None = None


def encode_request(
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str = "application/json",
) -> bytes:
    """Encode one request once; the load loops resend the same bytes."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "User-Agent: corral-bench"]
    if body is not None:
        lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def generate_request(
    host: str, port: int, model: str, num_predict: int, *, stream: bool
) -> bytes:
    """``POST /api/generate`` with a fixed prompt and token count."""
    body = orjson.dumps({
        "model": model,
        "prompt": "hi",
        "stream": stream,
        "options": {"num_predict": num_predict},
    })
    return encode_request(host, port, "POST", "/api/generate", body)


async def read_response(
    reader: asyncio.StreamReader,
    *,
    collect: bool = False,
    on_data: Callable[[bytes], None] | None = None,
    head_request: bool = False,
) -> Response:
    """Read one response; body bytes go to ``on_data`` as they arrive (and are kept
    when ``collect``)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise ProtocolError("response head too large") from exc
    if len(head) > _MAX_HEAD:
        raise ProtocolError("response head too large")
    if not head.startswith(b"HTTP/1."):
        raise ProtocolError(f"not an HTTP/1.x response: {head[:40]!r}")
    try:
        status = int(head[9:12])
    except ValueError as exc:
        raise ProtocolError(f"bad status line: {head[:40]!r}") from exc
    keep_alive = head[7:8] == b"1"  # HTTP/1.1 defaults to keep-alive, 1.0 does not
    length = -1
    chunked = False
    retry_after = None
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        lname = name.strip().lower()
        if lname == b"content-length":
            length = int(value.strip())
        elif lname == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif lname == b"connection":
            v = value.strip().lower()
            if v == b"close":
                keep_alive = False
            elif v == b"keep-alive":
                keep_alive = True
        elif lname == b"retry-after":
            retry_after = value.strip()
    parts: list[bytes] = []
    total = 0

    def take(data: bytes) -> None:
        nonlocal total
        total += len(data)
        if on_data is not None:
            on_data(data)
        if collect:
            parts.append(data)

    # Responses without a body, whatever their headers say (RFC 9112 §6.3).
    if head_request or status in (204, 304) or 100 <= status < 200:
        pass
    elif chunked:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise ProtocolError(f"bad chunk size line: {size_line[:40]!r}") from exc
            if size == 0:
                # Trailers, if any, end with an empty line.
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            chunk = await reader.readexactly(size + 2)
            if chunk[-2:] != b"\r\n":
                raise ProtocolError("chunk not terminated by CRLF")
            take(chunk[:-2])
    elif length >= 0:
        if length:
            take(await reader.readexactly(length))
    else:
        # No framing: the body runs to the end of the connection.
        keep_alive = False
        while data := await reader.read(65536):
            take(data)
    return Response(status, total, keep_alive, b"".join(parts) if collect else b"",
                    retry_after)


class Connection:
    """One keep-alive connection that reopens itself when the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.opened = 0  # how many TCP connections it took: keep-alive should mean 1

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(
            self.host, self.port, limit=_READ_LIMIT
        )
        self.opened += 1

    async def exchange(
        self,
        request: bytes,
        *,
        collect: bool = False,
        on_data: Callable[[bytes], None] | None = None,
    ) -> Response:
        if self._writer is None:
            await self.connect()
        assert self._reader is not None and self._writer is not None
        self._writer.write(request)
        try:
            resp = await read_response(
                self._reader, collect=collect, on_data=on_data,
                head_request=request.startswith(b"HEAD "),
            )
        except BaseException:
            # A half-read response leaves the connection unusable.
            self.close()
            raise
        if not resp.keep_alive:
            self.close()
        return resp

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


# -- (a) sequential latency -------------------------------------------------------


@dataclass
class LatencyResult:
    requests: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    # Keep-alive legs: connections reopened (should be 0). A new-connection leg uses it
    # for closes that did not finish within a second (should be 0 too).
    reconnects: int
    statuses: dict[int, int] = field(default_factory=dict)


def latency_result(requests: int, seconds: list[float], errors: int, reconnects: int,
                   statuses: dict[int, int]) -> LatencyResult:
    ms = [x * 1000 for x in seconds]
    return LatencyResult(
        requests=requests, errors=errors,
        p50_ms=percentile(ms, 50), p95_ms=percentile(ms, 95), p99_ms=percentile(ms, 99),
        mean_ms=sum(ms) / len(ms) if ms else float("nan"),
        reconnects=reconnects, statuses=statuses,
    )


FAILURES = (OSError, asyncio.IncompleteReadError, ProtocolError)


async def sequential(
    host: str, port: int, request: bytes, count: int, warmup: int = 0,
    *, connect: Callable[[], Connection] | None = None,
) -> LatencyResult:
    """``count`` requests one after another on one keep-alive connection. ``connect``
    makes that connection (TLS, say); it is opened, and any handshake done, before the
    clock starts."""
    conn = connect() if connect is not None else Connection(host, port)
    await conn.connect()
    statuses: Counter[int] = Counter()
    lat: list[float] = []
    errors = 0
    try:
        for _ in range(warmup):
            await conn.exchange(request)
        opened_before = conn.opened
        clock = time.perf_counter
        for _ in range(count):
            t0 = clock()
            try:
                resp = await conn.exchange(request)
            except FAILURES:
                errors += 1
                continue
            lat.append(clock() - t0)
            statuses[resp.status] += 1
            if resp.status != 200:
                errors += 1
    finally:
        conn.close()
    return latency_result(count, lat, errors, conn.opened - opened_before, dict(statuses))


# -- (b) throughput at a fixed number in flight ----------------------------------


@dataclass
class ThroughputResult:
    concurrency: int
    seconds: float
    completed: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    connections_opened: int
    statuses: dict[int, int] = field(default_factory=dict)


async def throughput(
    host: str,
    port: int,
    request: bytes,
    concurrency: int,
    duration: float,
    warmup: float = 1.0,
    *,
    connect: Callable[[], Connection] | None = None,
) -> ThroughputResult:
    """``concurrency`` keep-alive connections, each sending its next request as soon as
    the previous answer is read. Only completions inside the measured window count,
    so the ramp-up and the stragglers after the deadline do not dilute the rate.
    ``connect`` makes each connection (as for :func:`sequential`)."""
    make = connect if connect is not None else (lambda: Connection(host, port))
    conns = [make() for _ in range(concurrency)]
    await asyncio.gather(*(c.connect() for c in conns))
    clock = time.perf_counter
    begin = clock() + warmup
    end = begin + duration
    statuses: Counter[int] = Counter()
    lat: list[float] = []
    errors = 0

    async def worker(conn: Connection) -> None:
        nonlocal errors
        while True:
            t0 = clock()
            if t0 >= end:
                return
            try:
                resp = await conn.exchange(request)
            except FAILURES:
                if begin <= clock() < end:
                    errors += 1
                continue
            t1 = clock()
            if begin <= t1 < end:
                statuses[resp.status] += 1
                if resp.status == 200:
                    lat.append(t1 - t0)
                else:
                    errors += 1

    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for c in conns:
            c.close()
    ms = [x * 1000 for x in lat]
    return ThroughputResult(
        concurrency=concurrency,
        seconds=duration,
        completed=len(lat),
        errors=errors,
        rps=len(lat) / duration,
        p50_ms=percentile(ms, 50),
        p99_ms=percentile(ms, 99),
        connections_opened=sum(c.opened for c in conns),
        statuses=dict(statuses),
    )


# -- (c) many slow streams at once ------------------------------------------------


@dataclass
class StreamsResult:
    streams: int
    completed: int
    failures: dict[str, int]
    ttft_p50_ms: float
    ttft_p99_ms: float
    duration_p50_ms: float
    duration_max_ms: float
    total_seconds: float
    lines_per_stream_min: int
    lines_per_stream_max: int


class _LineCounter:
    """Counts NDJSON lines as bytes arrive and remembers when the first one ended.

    Keeps only the tail of the last line: the final line (``"done":true``) is the
    only one whose content matters, so nothing else is parsed."""

    __slots__ = ("first_line_at", "last_line", "lines", "tail")

    def __init__(self) -> None:
        self.first_line_at = 0.0
        self.lines = 0
        self.tail = b""
        self.last_line = b""

    def __call__(self, data: bytes) -> None:
        buf = self.tail + data if self.tail else data
        n = buf.count(b"\n")
        if n:
            if not self.lines:
                self.first_line_at = time.perf_counter()
            self.lines += n
            cut = buf.rfind(b"\n")
            start = buf.rfind(b"\n", 0, cut) + 1
            self.last_line = buf[start:cut]
            self.tail = buf[cut + 1:]
        else:
            self.tail = buf


async def streams(
    host: str,
    port: int,
    request: bytes,
    count: int,
    *,
    connect_parallel: int = 100,
    stream_deadline: float = 120.0,
) -> StreamsResult:
    """``count`` streaming requests in flight at once, one connection each.

    All connections are opened first (``connect_parallel`` at a time, so the listen
    backlog never overflows and no SYN is retransmitted a second later), then every
    request is written at the same instant. Time to first token is measured from
    that write to the end of the first NDJSON line, so it is the target's queueing
    and forwarding, not the TCP handshake."""
    conns = [Connection(host, port) for _ in range(count)]
    gate = asyncio.Semaphore(connect_parallel)
    failures: Counter[str] = Counter()

    async def open_one(c: Connection) -> bool:
        async with gate:
            try:
                await c.connect()
                return True
            except OSError as exc:
                failures[f"connect: {type(exc).__name__}"] += 1
                return False

    opened = await asyncio.gather(*(open_one(c) for c in conns))
    go = asyncio.Event()
    ttft: list[float] = []
    durations: list[float] = []
    line_counts: list[int] = []
    finished_at: list[float] = []

    async def one(c: Connection) -> None:
        await go.wait()
        counter = _LineCounter()
        t0 = time.perf_counter()
        try:
            resp = await asyncio.wait_for(c.exchange(request, on_data=counter), stream_deadline)
        except TimeoutError:
            failures["timeout"] += 1
            return
        except (OSError, asyncio.IncompleteReadError, ProtocolError) as exc:
            failures[type(exc).__name__] += 1
            return
        t1 = time.perf_counter()
        finished_at.append(t1)
        if resp.status != 200:
            failures[f"status {resp.status}"] += 1
            return
        if b'"done":true' not in counter.last_line.replace(b" ", b""):
            failures["no final line"] += 1
            return
        ttft.append(counter.first_line_at - t0)
        durations.append(t1 - t0)
        line_counts.append(counter.lines)

    tasks = [asyncio.ensure_future(one(c)) for c, ok in zip(conns, opened, strict=True) if ok]
    start = time.perf_counter()
    go.set()
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        for c in conns:
            with contextlib.suppress(Exception):
                c.close()
    last = max(finished_at, default=start)
    ms_ttft = [x * 1000 for x in ttft]
    ms_dur = [x * 1000 for x in durations]
    return StreamsResult(
        streams=count,
        completed=len(durations),
        failures=dict(failures),
        ttft_p50_ms=percentile(ms_ttft, 50),
        ttft_p99_ms=percentile(ms_ttft, 99),
        duration_p50_ms=percentile(ms_dur, 50),
        duration_max_ms=max(ms_dur, default=float("nan")),
        total_seconds=last - start,
        lines_per_stream_min=min(line_counts, default=0),
        lines_per_stream_max=max(line_counts, default=0),
    )
