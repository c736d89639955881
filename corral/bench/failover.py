"""The failover scenario: what clients see while a backend fails and recovers.

Two stand-in Ollama servers, A and B, behind one Corral. A steady load of streaming
``POST /api/generate`` requests runs for the whole time while A goes through a
timeline of faults, one phase of a few seconds each:

1. ``baseline`` — A and B healthy;
2. ``oom`` — A answers every inference request with Ollama's 500 "model requires
   more system memory" (its health probes keep answering);
3. ``oom cleared``;
4. ``hang`` — A accepts inference requests and never sends a byte (Corral gives up
   after ``timeouts.first_byte``);
5. ``hang cleared``;
6. ``killed`` — A's process gets SIGKILL, with whatever streams it is serving;
7. ``restarted`` — a fresh stand-in on A's port, which must rejoin.

What Corral promises: a request that fails before its first byte is retried on B, so
no client sees it; only a stream already flowing from A when A dies is cut, and it
ends with one ``{"error": ...}`` line.

Three views of the same run, each bucketed into the phases:

* the clients: every request's outcome (a stream ending with ``"done": true``, a
  non-200 status, a stream ending with an error line, a connection error) and latency;
* Corral's access log: which backend served each request, and how many were retried;
* ``GET /corral/status`` polled every ``poll_interval``: when Corral stopped routing
  to A after each fault, and when it routed to A again after each recovery.

A request is counted in the phase in which it ended (the last phase also takes the
requests still running when the load stopped); requests that started during the
warm-up are not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml
from rich import box
from rich.console import Console
from rich.table import Table

from corral.bench import harness, load
from corral.bench.harness import MODEL, Target
from corral.bench.phases import (
    _CONNECTION,
    KILLED,
    PHASES,
    A,
    B,
    Poll,
    Sample,
    changes,
    classify,
    connection_kind,
    summarize_access_log,
    summarize_clients,
    transitions,
    verdict,
)


@dataclass(frozen=True)
class Options:
    clients: int = 32
    phase_seconds: float = 4.0
    warmup: float = 2.0
    num_predict: int = 10
    tps: float = 100.0
    parallel: int = 4
    first_byte_timeout: float = 1.0
    poll_interval: float = 0.05
    # A request with no complete answer after this long counts as a connection error.
    request_deadline: float = 60.0




# -- the processes -------------------------------------------------------------------


def standin(workdir: Path, port: int, opts: Options,
            name: str) -> contextlib.AbstractAsyncContextManager[Target]:
    argv = [sys.executable, "-m", "corral.simulate", "--port", str(port),
            "--models", f"{MODEL}:latest", "--loaded", f"{MODEL}:latest",
            "--tps", f"{opts.tps:g}", "--parallel", str(opts.parallel)]
    return harness.spawn(name, argv, port, workdir)


def corral_config(port: int, urls: Sequence[str], opts: Options,
                  access_log: Path) -> dict[str, Any]:
    """Corral in front of A and B (``urls`` in that order)."""
    return {
        "listen": f"127.0.0.1:{port}",
        "backends": [{"url": url, "name": name, "max_concurrency": opts.parallel}
                     for name, url in zip((A, B), urls, strict=True)],
        "access_log": str(access_log),
        "queue": {"max_depth": 1000, "max_wait": "30s"},
        "health": {"interval": "500ms", "timeout": "500ms", "fall": 2, "rise": 2,
                   "max_fails": 2, "fail_timeout": "2s"},
        "retry": {"tries": 2},
        "timeouts": {"first_byte": f"{opts.first_byte_timeout:g}s"},
    }


def corral(workdir: Path, backends: Sequence[Target], opts: Options,
           access_log: Path) -> contextlib.AbstractAsyncContextManager[Target]:
    port = harness.free_port()
    path = workdir / "corral.yaml"
    config = corral_config(port, [t.url for t in backends], opts, access_log)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [sys.executable, "-m", "corral.cli", "serve", "--config", str(path),
            "--log-level", "warning"]
    return harness.spawn("corral", argv, port, workdir)


async def _call(target: Target, method: str, path: str, body: Any = None) -> Any:
    """One JSON request on a fresh connection; the decoded answer."""
    raw = None if body is None else orjson.dumps(body)
    request = load.encode_request(target.host, target.port, method, path, raw)
    conn = load.Connection(target.host, target.port)
    try:
        resp = await asyncio.wait_for(conn.exchange(request, collect=True), 5.0)
    finally:
        conn.close()
    if resp.status != 200:
        raise harness.TargetError(f"{target.name}: {method} {path} answered {resp.status}: "
                                  f"{resp.body[:200]!r}")
    return orjson.loads(resp.body)


async def set_fault(target: Target, mode: str) -> float:
    """Switch the stand-in's fault mode; the wall-clock time it was in force."""
    await _call(target, "POST", "/_sim/fault", {"mode": mode})
    return time.time()


async def _wait_routable(gw: Target, names: Sequence[str], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while True:
        status = await _call(gw, "GET", "/corral/status")
        if all(b.get("routable") for b in status["backends"] if b["name"] in names):
            return
        if time.monotonic() > deadline:
            raise harness.TargetError(f"backends not routable after {within:g}s: "
                                      f"{status['backends']}")
        await asyncio.sleep(0.1)


# -- the load and the status poller --------------------------------------------------


class _StreamTail:
    """Follows an NDJSON body as it arrives: when the first line ended, how many lines
    were error lines, and the last line (the only one whose content decides)."""

    __slots__ = ("error_lines", "first_line_at", "last_line", "lines", "tail")

    def __init__(self) -> None:
        self.first_line_at: float | None = None
        self.lines = 0
        self.error_lines = 0
        self.last_line = b""
        self.tail = b""

    def __call__(self, data: bytes) -> None:
        buf = self.tail + data if self.tail else data
        if b"\n" not in buf:
            self.tail = buf
            return
        if self.first_line_at is None:
            self.first_line_at = time.perf_counter()
        *complete, self.tail = buf.split(b"\n")
        for line in complete:
            self.lines += 1
            if b'{"error"' in line:
                self.error_lines += 1
        self.last_line = complete[-1]

    def final_line(self) -> bytes:
        # A body that does not end with a newline still has a last line.
        rest = self.tail.strip()
        if rest:
            return rest
        return self.last_line


class Load:
    """``clients`` keep-alive connections to Corral, each sending its next streaming
    request as soon as the previous one ended, until ``stop()``."""

    def __init__(self, gw: Target, opts: Options) -> None:
        self.gw = gw
        self.opts = opts
        self.request = load.generate_request(gw.host, gw.port, MODEL, opts.num_predict,
                                             stream=True)
        self.samples: list[Sample] = []
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._client()) for _ in range(self.opts.clients)]

    async def stop(self) -> None:
        """No new requests; wait for those in flight (each is bounded by the deadline)."""
        self._stopping = True
        try:
            await asyncio.wait_for(asyncio.gather(*self._tasks),
                                   self.opts.request_deadline + 5)
        finally:
            for t in self._tasks:
                t.cancel()

    def cancel(self) -> None:
        """Abandon the load at once (the run is aborting)."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()

    async def _client(self) -> None:
        conn = load.Connection(self.gw.host, self.gw.port)
        try:
            while not self._stopping:
                await self._one(conn)
        finally:
            conn.close()

    async def _one(self, conn: load.Connection) -> None:
        tail = _StreamTail()
        start = time.time()
        t0 = time.perf_counter()
        try:
            resp = await asyncio.wait_for(conn.exchange(self.request, on_data=tail),
                                          self.opts.request_deadline)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, load.ProtocolError) as exc:
            outcome = _CONNECTION + connection_kind(exc)
        else:
            outcome = classify(resp.status, tail.final_line())
        latency = time.perf_counter() - t0
        ttft = None if tail.first_line_at is None else tail.first_line_at - t0
        self.samples.append(Sample(start, time.time(), outcome, latency, ttft,
                                   tail.error_lines))
        if outcome.startswith(_CONNECTION):
            conn.close()
            await asyncio.sleep(0.05)  # Corral itself unreachable: do not spin


async def poll_status(gw: Target, polls: list[Poll], interval: float) -> None:
    """Sample backend A in ``/corral/status`` until cancelled."""
    request = load.encode_request(gw.host, gw.port, "GET", "/corral/status")
    conn = load.Connection(gw.host, gw.port)
    try:
        while True:
            t0 = time.monotonic()
            try:
                resp = await asyncio.wait_for(conn.exchange(request, collect=True), 2.0)
                status = orjson.loads(resp.body)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, load.ProtocolError,
                    orjson.JSONDecodeError):
                conn.close()
            else:
                for b in status.get("backends", ()):
                    if b.get("name") == A:
                        polls.append(Poll(time.time(), bool(b.get("up")),
                                          bool(b.get("routable")), b.get("breaker"),
                                          int(b.get("in_flight") or 0)))
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - t0)))
    finally:
        conn.close()


def read_access_log(path: Path) -> list[dict[str, Any]]:
    records = []
    with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
        for line in f:
            with contextlib.suppress(orjson.JSONDecodeError):
                rec = orjson.loads(line)
                if isinstance(rec, dict) and rec.get("path") == "/api/generate":
                    records.append(rec)
    return records


# -- the run ---------------------------------------------------------------------------


Progress = Callable[[str], None]


async def run(opts: Options, workdir: Path, progress: Progress) -> dict[str, Any]:
    """Start the fleet, run the timeline under load; JSON-ready results (without the
    machine description)."""
    harness.raise_fd_limit()
    access_log = workdir / "access.log"
    port_a = harness.free_port()
    polls: list[Poll] = []
    starts: list[float] = []
    events: list[tuple[str, float]] = []
    in_flight_at_kill: int | None = None
    stop = 0.0
    async with contextlib.AsyncExitStack() as stack:
        progress("starting stand-ins A and B and Corral")
        a = await stack.enter_async_context(standin(workdir, port_a, opts, "standin-a"))
        b = await stack.enter_async_context(
            standin(workdir, harness.free_port(), opts, "standin-b"))
        gw = await stack.enter_async_context(corral(workdir, (a, b), opts, access_log))
        await _wait_routable(gw, (A, B))

        traffic = Load(gw, opts)
        poller = asyncio.ensure_future(poll_status(gw, polls, opts.poll_interval))
        try:
            traffic.start()
            progress(f"{opts.clients} clients, {opts.warmup:g}s warm-up")
            await asyncio.sleep(opts.warmup)

            def begin(index: int, at: float) -> None:
                starts.append(at)
                events.append((PHASES[index].name, at))
                progress(f"phase {index + 1}: {PHASES[index].name} — {PHASES[index].what}")

            async def hold() -> None:
                gw.check_alive()
                await asyncio.sleep(max(0.0, starts[-1] + opts.phase_seconds - time.time()))

            begin(0, time.time())
            await hold()
            for index, mode in ((1, "oom"), (2, "none"), (3, "hang"), (4, "none")):
                begin(index, await set_fault(a, mode))
                await hold()

            stats = await _call(a, "GET", "/_sim/stats")
            in_flight_at_kill = int(stats.get("in_flight") or 0)
            at = time.time()
            a.proc.kill()
            await a.proc.wait()
            begin(KILLED, at)
            await hold()

            begin(KILLED + 1, time.time())
            await stack.enter_async_context(
                standin(workdir, port_a, opts, "standin-a-restarted"))
            events.append(("restarted stand-in ready", time.time()))
            await hold()
            stop = time.time()
            events.append(("load stopped", stop))
            progress("waiting for the last requests")
            await traffic.stop()
            # The access log is flushed every 100 ms: let the last lines reach the file.
            await asyncio.sleep(0.3)
        finally:
            traffic.cancel()
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
    # Every process is stopped now; Corral flushed its access log on the way out.
    records = read_access_log(access_log)
    clients = summarize_clients(traffic.samples, starts)
    corral_side = summarize_access_log(records, starts)
    moves = transitions(polls, records, starts, stop)
    origin = starts[0]
    phases = []
    for i, spec in enumerate(PHASES):
        end = starts[i + 1] if i + 1 < len(starts) else stop
        phases.append({
            "name": spec.name, "what": spec.what,
            "start_s": round(starts[i] - origin, 3), "seconds": round(end - starts[i], 3),
            "clients": clients[i], "corral": corral_side[i],
        })
    return {
        "options": asdict(opts),
        "phases": phases,
        "transitions": moves,
        "events": [{"event": name, "at_s": round(t - origin, 3)} for name, t in events],
        "a_status_changes": [
            {"at_s": round(p.t - origin, 3), "up": p.up, "routable": p.routable,
             "breaker": p.breaker}
            for p in changes(polls) if p.t >= origin
        ],
        "status_polls": len(polls),
        "verdict": verdict(clients, corral_side, moves, in_flight_at_kill, opts.parallel),
        "totals": {"client_requests": len(traffic.samples), "access_log_records": len(records)},
    }


# -- the report ------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in d.items()) or "0"


def render(console: Console, result: dict[str, Any]) -> None:
    opts = result["options"]
    t = Table(title=f"Failover: {opts['clients']} clients streaming {opts['num_predict']} "
                    f"tokens at {opts['tps']:g} tokens/s through Corral to A and B "
                    f"({opts['parallel']} slots each); phases of {opts['phase_seconds']:g} s",
              box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("phase", "OK", "non-200", "cut", "conn", "p50 ms", "p99 ms", "retried",
                "A/B"):
        t.add_column(col, justify="left" if col == "phase" else "right", no_wrap=True)
    for i, ph in enumerate(result["phases"]):
        c, g = ph["clients"], ph["corral"]
        served = g["served_by"]
        t.add_row(f"{i + 1}. {ph['name']}", str(c["ok"]),
                  _counts(c["non_200"]), str(c["cut"]),
                  _counts(c["connection_errors"]) if c["connection_errors"] else "0",
                  _fmt(c["latency_ms"]["p50"]), _fmt(c["latency_ms"]["p99"]),
                  f"{g['retried_requests']}", f"{served.get(A, 0)}/{served.get(B, 0)}")
    console.print(t)

    console.print("[dim]OK: streams ending with done:true; cut: 200 then an error line; "
                  "conn: connection errors; latency of the OK ones; retried and A/B "
                  "(requests served by each backend) from Corral's access log[/]")
    t = Table(title="Backend A in Corral (/corral/status polled every "
                    f"{opts['poll_interval'] * 1000:g} ms)", box=box.SIMPLE_HEAD)
    for col in ("phase", "A out after", "by", "A back after", "first OK from A"):
        t.add_column(col, justify="left" if col in ("phase", "by") else "right",
                     no_wrap=col == "phase")
    for m in result["transitions"]:
        if m["kind"] == "fault":
            t.add_row(m["phase"], f"{_fmt(m['out_after_s'], 3)} s", m["taken_out_by"] or "–",
                      "", "")
        else:
            t.add_row(m["phase"], "", "", f"{_fmt(m['back_after_s'], 3)} s",
                      f"{_fmt(m['first_ok_from_a_after_s'], 3)} s")
    console.print(t)

    v = result["verdict"]
    ok = "[green]PASS[/]" if v["pass"] else "[red]MISS[/]"
    console.print(
        f"{ok} failures other than streams cut by A's death: "
        f"{v['failures_other_than_cut_by_kill']}; streams cut at the kill: {v['cut_by_kill']} "
        f"({v['cut_by_kill_with_one_error_line']} with exactly one error line; "
        f"{v['cut_on_a_per_access_log']} per Corral's access log; A had "
        f"{_fmt(v['a_in_flight_at_kill'])} requests in flight)")
    if not (v["a_taken_out_after_each_fault"] and v["a_back_after_each_recovery"]):
        console.print("[yellow]A was not taken out after every fault, or not back after every "
                      "recovery, within its phase (see the table above)[/]")
