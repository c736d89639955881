"""The overhead scenario: the same requests direct, through Corral, through nginx.

Three legs, each against every target in one run on one machine:

* latency — sequential requests on one keep-alive connection; what a proxy adds to
  one request is its p50 minus the direct p50;
* throughput — a fixed number of requests in flight against an instant backend,
  so the proxy (not the backend) is what limits the rate;
* streams — many slow token streams open at once through a proxy whose slot cap
  admits all of them: do they all complete, how soon does the first token arrive,
  and how much memory does Corral need to hold them.

The backends of the first two legs and of the third differ (instant vs. slow), so
the run has two phases and no process of one phase is alive during the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sqlite3
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

from corral.bench import harness, load
from corral.bench.harness import MODEL, Target
from corral.bench.load import LatencyResult
from corral.config import UsageConfig

_CLK_TCK = os.sysconf("SC_CLK_TCK")

# Thresholds from the issue that asked for this benchmark.
MAX_ADDED_LATENCY_RATIO = 2.0  # Corral's added p50 ≤ 2× nginx's added p50
MIN_THROUGHPUT_RATIO = 0.8  # Corral's requests/s ≥ 0.8× nginx's
MAX_STREAMS_RSS_MB = 150.0  # Corral's peak RSS while holding every stream


@dataclass(frozen=True)
class Options:
    requests: int = 2000
    rounds: int = 3
    duration: float = 5.0
    warmup: float = 1.0
    concurrency: int = 64
    streams: int = 1000
    stream_tokens: int = 20
    stream_tps: float = 20.0
    nginx: bool = True
    # nginx with one worker per core, recorded beside the one-worker run: Corral is
    # a single process, so the one-worker nginx is the like-for-like comparison.
    nginx_auto: bool = True
    # --tls: HTTPS to Corral and nginx (same certificate); the new-connection leg
    # sends this many requests per target and round, each on a new connection.
    tls: bool = False
    handshakes: int = 500
    # --ledger: Corral with the usage ledger on against off, rounds interleaved.
    ledger: bool = False

    @classmethod
    def quick(cls, **overrides: Any) -> Options:
        base = cls(requests=300, rounds=1, duration=2.0, warmup=0.5, streams=200,
                   nginx_auto=False, handshakes=100)
        return cls(**{**asdict(base), **overrides})


Progress = Callable[[str], None]
_T = TypeVar("_T")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores, /proc/stat).

    Counts user, nice, system and steal time. Interrupt and softirq time is left out:
    it is mostly the loopback traffic of the benchmark itself, which no process is
    charged for, and counting it would make a quiet machine look busy."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = fields + [0] * (8 - len(fields))
    return (user + nice + system + steal) / _CLK_TCK


class _CpuMeter:
    """CPU seconds used by some processes (and by this one) over a span of wall time.

    Printed next to each throughput figure: a target near 100% of a core is the
    bottleneck; a load generator near 100% would mean the figure measures itself."""

    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets

    def __enter__(self) -> _CpuMeter:
        self.t0 = time.perf_counter()
        self.bench0 = time.process_time()
        self.cpu0 = {t.name: t.cpu_seconds() for t in self.targets}
        self.machine0 = machine_cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        self.percent = {
            t.name: round(100 * (t.cpu_seconds() - self.cpu0[t.name]) / wall, 1)
            for t in self.targets
        }
        self.percent["load generator"] = round(
            100 * (time.process_time() - self.bench0) / wall, 1
        )
        # Whatever else ran on the machine meanwhile (in % of one core): a large figure
        # means the run shared the cores with someone else and is not to be trusted.
        machine = 100 * (machine_cpu_seconds() - self.machine0) / wall
        self.percent["others"] = round(max(0.0, machine - sum(self.percent.values())), 1)


async def _phase_fast(
    opts: Options, workdir: Path, progress: Progress
) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """LatencyResult and throughput against an instant stand-in with 64 parallel slots."""
    parallel = max(64, opts.concurrency)
    async with contextlib.AsyncExitStack() as stack:
        progress(f"starting an instant stand-in (parallel {parallel}), Corral"
                 + (", nginx" if opts.nginx else ""))
        standin = await stack.enter_async_context(
            harness.simulator(workdir, parallel=parallel, tps=None))
        targets: dict[str, Target] = {"direct": standin}
        targets["corral"] = await stack.enter_async_context(
            harness.corral(workdir, standin, max_concurrency=parallel))
        if opts.nginx:
            targets["nginx"] = await stack.enter_async_context(
                harness.nginx(workdir, standin, workers="1"))
            if opts.nginx_auto:
                targets["nginx-auto"] = await stack.enter_async_context(
                    harness.nginx(workdir, standin, workers="auto", name="nginx-auto"))

        def request_for(t: Target) -> bytes:
            return load.generate_request(t.host, t.port, MODEL, 1, stream=False)

        # Warm-up: first requests pay for imports, connection pools, JIT-less caches;
        # a short burst at full concurrency fills every pool the measured legs use.
        for name, t in targets.items():
            progress(f"warm-up {name}")
            await _checked(t, load.sequential(t.host, t.port, request_for(t), 200))
            await _checked(t, load.throughput(t.host, t.port, request_for(t),
                                              opts.concurrency, 0.5, warmup=0.0))

        names = list(targets)
        latency_rounds: dict[str, list[LatencyResult]] = {n: [] for n in names}
        for r in range(opts.rounds):
            # Rotating the order spreads any drift (thermal, other load) over all targets.
            for name in names[r % len(names):] + names[:r % len(names)]:
                t = targets[name]
                progress(f"latency round {r + 1}/{opts.rounds}: {name}")
                latency_rounds[name].append(await _checked(
                    t, load.sequential(t.host, t.port, request_for(t), opts.requests,
                                       warmup=50)))

        tput_rounds: dict[str, list[load.ThroughputResult]] = {n: [] for n in names}
        cpu_rounds: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        for r in range(opts.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t = targets[name]
                progress(f"throughput round {r + 1}/{opts.rounds}: {name}, "
                         f"{opts.concurrency} in flight for {opts.duration:g}s")
                watched = [t] if t is standin else [t, standin]
                with _CpuMeter(watched) as meter:
                    res = await _checked(t, load.throughput(
                        t.host, t.port, request_for(t), opts.concurrency, opts.duration,
                        warmup=opts.warmup))
                tput_rounds[name].append(res)
                cpu_rounds[name].append(meter.percent)

        rss = {name: round(t.peak_rss_mb(), 1) for name, t in targets.items()}

    latency = {name: latency_summary(rs, latency_rounds["direct"] if name != "direct" else None)
               for name, rs in latency_rounds.items()}
    tput = {name: throughput_summary(rs, cpu_rounds[name]) for name, rs in tput_rounds.items()}
    return latency, tput, rss


async def _checked(target: Target, work: Awaitable[_T]) -> _T:
    """Run one measurement and turn a target's death into an error that says so."""
    try:
        result = await work
    except (OSError, asyncio.IncompleteReadError, load.ProtocolError) as exc:
        target.check_alive()
        raise harness.TargetError(
            f"{target.name} failed during the benchmark ({type(exc).__name__}: {exc}); "
            f"log tail:\n{target.log_tail()}") from exc
    target.check_alive()
    return result


async def _phase_streams(
    opts: Options, workdir: Path, progress: Progress
) -> dict[str, Any]:
    """Many slow streams at once against a stand-in that runs them all in parallel."""
    n = opts.streams
    async with contextlib.AsyncExitStack() as stack:
        progress(f"starting a slow stand-in (parallel {n}, {opts.stream_tps:g} tokens/s), "
                 f"Corral (max_concurrency {n})" + (", nginx" if opts.nginx else ""))
        standin = await stack.enter_async_context(
            harness.simulator(workdir, parallel=n, tps=opts.stream_tps, name="standin-slow"))
        targets: dict[str, Target] = {"direct": standin}
        targets["corral"] = await stack.enter_async_context(
            harness.corral(workdir, standin, max_concurrency=n, name="corral-streams"))
        if opts.nginx:
            targets["nginx"] = await stack.enter_async_context(
                harness.nginx(workdir, standin, workers="1", name="nginx-streams"))

        out: dict[str, Any] = {}
        for name, t in targets.items():
            request = load.generate_request(t.host, t.port, MODEL, opts.stream_tokens,
                                            stream=True)
            progress(f"streams warm-up: {name}")
            await _checked(t, load.streams(t.host, t.port, request, min(50, n)))
            rss_before = t.rss_mb()
            sampled = [rss_before]
            stop = asyncio.Event()
            sampler = asyncio.create_task(_sample_rss(t, stop, sampled))
            progress(f"streams: {n} at once through {name}, {opts.stream_tokens} tokens each")
            try:
                res = await _checked(t, load.streams(t.host, t.port, request, n))
            finally:
                stop.set()
                await sampler
            out[name] = {
                **asdict(res),
                "rss_before_mb": round(rss_before, 1),
                "rss_sampled_max_mb": round(max(sampled), 1),
                "rss_after_mb": round(t.rss_mb(), 1),
                "peak_rss_mb": round(t.peak_rss_mb(), 1),
            }
        return out


async def _sample_rss(target: Target, stop: asyncio.Event, into: list[float]) -> None:
    # VmHWM already catches the peak; the samples show whether memory is released.
    while not stop.is_set():
        into.append(target.rss_mb())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def verdicts(latency: dict[str, Any], tput: dict[str, Any],
             streams: dict[str, Any], n_streams: int) -> dict[str, Any]:
    """PASS/MISS against the issue's targets; ``None`` when nginx was not measured."""
    result: dict[str, Any] = {}
    if "nginx" in latency:
        c_added = latency["corral"]["added_p50_ms"]
        n_added = latency["nginx"]["added_p50_ms"]
        ratio = _ratio(c_added, n_added)
        result["added_latency"] = {
            "corral_added_p50_ms": c_added,
            "nginx_added_p50_ms": n_added,
            "ratio": ratio,
            "target": f"<= {MAX_ADDED_LATENCY_RATIO:g}x nginx",
            "pass": c_added <= MAX_ADDED_LATENCY_RATIO * max(n_added, 0.0),
        }
        t_ratio = _ratio(tput["corral"]["rps"], tput["nginx"]["rps"])
        result["throughput"] = {
            "corral_rps": tput["corral"]["rps"],
            "nginx_rps": tput["nginx"]["rps"],
            "ratio": t_ratio,
            "target": f">= {MIN_THROUGHPUT_RATIO:g}x nginx",
            "pass": t_ratio is not None and t_ratio >= MIN_THROUGHPUT_RATIO,
        }
    else:
        result["added_latency"] = {"pass": None, "why": "nginx not measured"}
        result["throughput"] = {"pass": None, "why": "nginx not measured"}
    corral_streams = streams["corral"]
    result["streams"] = {
        "completed": corral_streams["completed"],
        "streams": n_streams,
        "peak_rss_mb": corral_streams["peak_rss_mb"],
        "target": f"all complete, peak RSS <= {MAX_STREAMS_RSS_MB:g} MB",
        "pass": corral_streams["completed"] == n_streams
        and corral_streams["peak_rss_mb"] <= MAX_STREAMS_RSS_MB,
    }
    return result


async def run(opts: Options, workdir: Path, progress: Progress) -> dict[str, Any]:
    """Run every leg; returns the JSON-ready results (without machine information)."""
    harness.raise_fd_limit(max(65536, 4 * opts.streams))
    started = time.perf_counter()
    latency, tput, rss = await _phase_fast(opts, workdir, progress)
    streams = await _phase_streams(opts, workdir, progress)
    return {
        "options": asdict(opts),
        "latency": latency,
        "throughput": tput,
        "peak_rss_mb_after_latency_and_throughput": rss,
        "streams": streams,
        "verdicts": verdicts(latency, tput, streams, opts.streams),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


# -- the TLS and ledger variants ---------------------------------------------------
#
# Their legs go through ``Target.connection()``, so one loop serves plain HTTP and
# HTTPS alike, and they report p95 too (the ledger's question is about it).


async def sequential(target: Target, request: bytes, count: int, warmup: int = 0) -> LatencyResult:
    """``count`` requests one after another on one keep-alive connection (TLS: one
    handshake, before the clock starts)."""
    return await load.sequential(target.host, target.port, request, count, warmup,
                                 connect=target.connection)


async def new_connections(target: Target, request: bytes, count: int) -> LatencyResult:
    """``count`` requests, each on a connection of its own: connect (and handshake),
    send, read the answer — that is the time measured; the close comes after."""
    statuses: Counter[int] = Counter()
    lat: list[float] = []
    errors = slow_closes = 0
    clock = time.perf_counter
    for _ in range(count):
        writer: asyncio.StreamWriter | None = None
        t0 = clock()
        try:
            reader, writer = await target.open()
            writer.write(request)
            resp = await load.read_response(reader)
        except load.FAILURES:
            errors += 1
            if writer is not None:
                writer.close()
            continue
        lat.append(clock() - t0)
        statuses[resp.status] += 1
        if resp.status != 200:
            errors += 1
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        except TimeoutError:
            slow_closes += 1
        except OSError:
            pass
    return load.latency_result(count, lat, errors, slow_closes, dict(statuses))


async def throughput(target: Target, request: bytes, concurrency: int, duration: float,
                     warmup: float = 1.0) -> load.ThroughputResult:
    """As :func:`corral.bench.load.throughput`, on the target's own kind of connection
    (TLS connections are opened, handshakes done, before the clock starts)."""
    return await load.throughput(target.host, target.port, request, concurrency, duration,
                                 warmup, connect=target.connection)


async def tls_negotiated(target: Target) -> dict[str, Any] | None:
    """What one handshake with the target settled on (None for plain HTTP)."""
    conn = target.connection()
    if not isinstance(conn, harness.TlsConnection):
        return None
    await conn.connect()
    conn.close()
    return conn.tls


def rotation(names: list[str], r: int) -> list[str]:
    """Round ``r``'s order: rotated, so drift (thermal, other load) spreads over all."""
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def latency_summary(rounds: list[LatencyResult],
                    direct: list[LatencyResult] | None) -> dict[str, Any]:
    """Medians of the rounds; ``added_*`` against the direct target's medians."""
    row: dict[str, Any] = {
        "p50_ms": _median([x.p50_ms for x in rounds]),
        "p95_ms": _median([x.p95_ms for x in rounds]),
        "p99_ms": _median([x.p99_ms for x in rounds]),
        "mean_ms": _median([x.mean_ms for x in rounds]),
        "errors": sum(x.errors for x in rounds),
        "reconnects": sum(x.reconnects for x in rounds),
        "rounds": [asdict(x) for x in rounds],
    }
    if direct is None:
        row["added_p50_ms"] = row["added_p95_ms"] = 0.0
    else:
        row["added_p50_ms"] = row["p50_ms"] - _median([x.p50_ms for x in direct])
        row["added_p95_ms"] = row["p95_ms"] - _median([x.p95_ms for x in direct])
    return row


def throughput_summary(rounds: list[load.ThroughputResult],
                       cpu: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "rps": _median([x.rps for x in rounds]),
        "p50_ms": _median([x.p50_ms for x in rounds]),
        "p99_ms": _median([x.p99_ms for x in rounds]),
        "errors": sum(x.errors for x in rounds),
        "connections_opened": max(x.connections_opened for x in rounds),
        "cpu_percent": {proc: _median([c[proc] for c in cpu]) for proc in cpu[0]},
        "rounds": [asdict(x) for x in rounds],
    }


def compare(latency: dict[str, Any], tput: dict[str, Any], corral: str, nginx: str,
            new_conn: dict[str, Any] | None = None) -> dict[str, Any]:
    """The issue's two ratios for ``corral`` against ``nginx`` (PASS/MISS), and the
    new-connection leg's added p50s for information (no goal)."""
    c_added = latency[corral]["added_p50_ms"]
    n_added = latency[nginx]["added_p50_ms"]
    t_ratio = _ratio(tput[corral]["rps"], tput[nginx]["rps"])
    result: dict[str, Any] = {
        "added_latency": {
            "corral_added_p50_ms": c_added, "nginx_added_p50_ms": n_added,
            "ratio": _ratio(c_added, n_added),
            "target": f"<= {MAX_ADDED_LATENCY_RATIO:g}x nginx",
            "pass": c_added <= MAX_ADDED_LATENCY_RATIO * max(n_added, 0.0),
        },
        "throughput": {
            "corral_rps": tput[corral]["rps"], "nginx_rps": tput[nginx]["rps"],
            "ratio": t_ratio, "target": f">= {MIN_THROUGHPUT_RATIO:g}x nginx",
            "pass": t_ratio is not None and t_ratio >= MIN_THROUGHPUT_RATIO,
        },
    }
    if new_conn is not None:
        nc, nn = new_conn[corral]["added_p50_ms"], new_conn[nginx]["added_p50_ms"]
        result["new_connection_latency"] = {
            "corral_added_p50_ms": nc, "nginx_added_p50_ms": nn,
            "ratio": _ratio(nc, nn), "target": None, "pass": None,
        }
    return result


async def _measure(
    opts: Options, targets: dict[str, Target], standin: Target, direct: str,
    order: Callable[[int], list[str]], progress: Progress, *, handshakes: bool,
) -> dict[str, Any]:
    """Warm-up, then ``opts.rounds`` rounds of the latency leg (and of the
    new-connection leg when ``handshakes``), then of the throughput leg, each round
    visiting the targets in ``order(round)``. Returns the medians and every round."""
    def request_for(t: Target) -> bytes:
        return load.generate_request(t.host, t.port, MODEL, 1, stream=False)

    for name, t in targets.items():
        progress(f"warm-up {name}")
        await _checked(t, sequential(t, request_for(t), 200))
        await _checked(t, throughput(t, request_for(t), opts.concurrency, 0.5, warmup=0.0))

    names = list(targets)
    lat: dict[str, list[LatencyResult]] = {n: [] for n in names}
    fresh: dict[str, list[LatencyResult]] = {n: [] for n in names}
    for r in range(opts.rounds):
        for name in order(r):
            t = targets[name]
            progress(f"latency round {r + 1}/{opts.rounds}: {name}")
            lat[name].append(await _checked(
                t, sequential(t, request_for(t), opts.requests, warmup=50)))
            if handshakes:
                progress(f"new-connection round {r + 1}/{opts.rounds}: {name}, "
                         f"{opts.handshakes} requests")
                fresh[name].append(await _checked(
                    t, new_connections(t, request_for(t), opts.handshakes)))

    tput: dict[str, list[load.ThroughputResult]] = {n: [] for n in names}
    cpu: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(opts.rounds):
        for name in order(r):
            t = targets[name]
            progress(f"throughput round {r + 1}/{opts.rounds}: {name}, "
                     f"{opts.concurrency} in flight for {opts.duration:g}s")
            watched = [t] if t is standin else [t, standin]
            with _CpuMeter(watched) as meter:
                res = await _checked(t, throughput(t, request_for(t), opts.concurrency,
                                                   opts.duration, warmup=opts.warmup))
            tput[name].append(res)
            cpu[name].append(meter.percent)

    out: dict[str, Any] = {
        "latency": {n: latency_summary(lat[n], lat[direct] if n != direct else None)
                    for n in names},
        "throughput": {n: throughput_summary(tput[n], cpu[n]) for n in names},
        "peak_rss_mb": {n: round(t.peak_rss_mb(), 1) for n, t in targets.items()},
    }
    if handshakes:
        out["new_connection_latency"] = {
            n: latency_summary(fresh[n], fresh[direct] if n != direct else None)
            for n in names}
    # Kept for the ledger's paired comparison.
    out["_rounds"] = {"latency": lat, "throughput": tput}
    return out


DIRECT_HTTP = "direct-http"
CORRAL_HTTPS = "corral-https"
NGINX_HTTPS = "nginx-https"
# The same proxies over plain HTTP in the same run: the difference is what TLS itself
# costs each, apart from what the proxy hop costs.
CORRAL_HTTP = "corral-http"
NGINX_HTTP = "nginx-http"


def tls_cost(latency: dict[str, Any], tput: dict[str, Any], https: str,
             http: str) -> dict[str, Any] | None:
    """What serving HTTPS instead of plain HTTP costs one proxy: added keep-alive p50
    and the throughput kept (HTTPS req/s ÷ plain req/s)."""
    if https not in latency or http not in latency:
        return None
    return {
        "added_p50_ms": latency[https]["p50_ms"] - latency[http]["p50_ms"],
        "added_p95_ms": latency[https]["p95_ms"] - latency[http]["p95_ms"],
        "throughput_kept": _ratio(tput[https]["rps"], tput[http]["rps"]),
    }


async def run_tls(opts: Options, workdir: Path, progress: Progress) -> dict[str, Any]:
    """LatencyResult, new-connection latency and throughput over HTTPS to Corral and nginx,
    both serving one throwaway CA's certificate; direct stays plain HTTP (the stand-in
    has no TLS), so every added figure includes TLS and the proxy hop together; the
    same two proxies over plain HTTP run alongside, to tell those two apart."""
    harness.raise_fd_limit(65536)
    started = time.perf_counter()
    tls = harness.make_tls(workdir)
    parallel = max(64, opts.concurrency)
    async with contextlib.AsyncExitStack() as stack:
        progress(f"starting an instant stand-in (parallel {parallel}), Corral over HTTPS and HTTP"
                 + (", nginx over HTTPS and HTTP" if opts.nginx else ""))
        standin = await stack.enter_async_context(
            harness.simulator(workdir, parallel=parallel, tps=None))
        targets: dict[str, Target] = {DIRECT_HTTP: standin}
        targets[CORRAL_HTTPS] = await stack.enter_async_context(
            harness.corral(workdir, standin, max_concurrency=parallel, name=CORRAL_HTTPS,
                           tls=tls))
        targets[CORRAL_HTTP] = await stack.enter_async_context(
            harness.corral(workdir, standin, max_concurrency=parallel, name=CORRAL_HTTP))
        if opts.nginx:
            targets[NGINX_HTTPS] = await stack.enter_async_context(
                harness.nginx(workdir, standin, workers="1", name=NGINX_HTTPS, tls=tls))
            targets[NGINX_HTTP] = await stack.enter_async_context(
                harness.nginx(workdir, standin, workers="1", name=NGINX_HTTP))
            if opts.nginx_auto:
                targets["nginx-auto-https"] = await stack.enter_async_context(
                    harness.nginx(workdir, standin, workers="auto", name="nginx-auto-https",
                                  tls=tls))
        negotiated = {name: await tls_negotiated(t) for name, t in targets.items()
                      if t.client_tls is not None}
        names = list(targets)
        measured = await _measure(opts, targets, standin, DIRECT_HTTP,
                                  lambda r: rotation(names, r), progress, handshakes=True)
    measured.pop("_rounds")
    verdicts = (compare(measured["latency"], measured["throughput"], CORRAL_HTTPS,
                        NGINX_HTTPS, measured["new_connection_latency"])
                if NGINX_HTTPS in measured["latency"]
                else {"added_latency": {"pass": None, "why": "nginx not measured"},
                      "throughput": {"pass": None, "why": "nginx not measured"}})
    lat, tp = measured["latency"], measured["throughput"]
    return {
        "mode": "tls",
        "tls": True,
        "options": asdict(opts),
        "tls_setup": {
            "certificate": "ECDSA P-256 server certificate signed by a throwaway CA "
                           "(corral/bench/certs.py); Corral and nginx serve the same files",
            "server_protocols": "TLSv1.2, TLSv1.3 (Corral min_version 1.2; nginx "
                                "ssl_protocols TLSv1.2 TLSv1.3)",
            "client": "Python ssl, trusts the CA, verifies the name, ALPN http/1.1",
            "direct": "plain HTTP to the stand-in (it has no TLS): added = HTTPS proxy "
                      "hop - plain direct",
            # Neither run sets it: what an operator gets without a usage section.
            "corral_usage_ledger": "Corral's default (usage.enabled: "
                                   f"{str(UsageConfig().enabled).lower()})",
        },
        "tls_negotiated": negotiated,
        **measured,
        "streams": None,
        "streams_note": "the concurrent-streams leg is not run with --tls",
        "verdicts": verdicts,
        "tls_cost": {"corral": tls_cost(lat, tp, CORRAL_HTTPS, CORRAL_HTTP),
                     "nginx": tls_cost(lat, tp, NGINX_HTTPS, NGINX_HTTP)},
        "plain_verdicts": (compare(lat, tp, CORRAL_HTTP, NGINX_HTTP)
                           if NGINX_HTTP in lat else None),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


LEDGER_ON = "corral-ledger-on"
LEDGER_OFF = "corral-ledger-off"


def ledger_order(r: int) -> list[str]:
    """Direct first (the baseline of the added figures), then on/off, then off/on in
    the next round: each configuration goes first as often as the other."""
    pair = [LEDGER_ON, LEDGER_OFF] if r % 2 == 0 else [LEDGER_OFF, LEDGER_ON]
    return ["direct", *pair]


def sign_test(positive: int, negative: int) -> float:
    """Two-sided sign test: the chance of a split at least this lopsided if on and off
    were alike (ties left out). 1.0 when there is nothing to test."""
    n = positive + negative
    if n == 0:
        return 1.0
    k = min(positive, negative)
    tail: float = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(on: list[float], off: list[float]) -> dict[str, Any]:
    """On against off, round by round: the difference per round and how it compares
    with the round-to-round spread (max - min) of each configuration alone.

    ``within_noise``: the median difference is no larger than the larger spread —
    i.e. these rounds cannot tell on from off. None with fewer than two rounds."""
    diffs = [a - b for a, b in zip(on, off, strict=True)]
    spread_on = max(on) - min(on) if on else float("nan")
    spread_off = max(off) - min(off) if off else float("nan")
    median_diff = _median(diffs)
    positive = sum(d > 0 for d in diffs)
    negative = sum(d < 0 for d in diffs)
    noise = max(spread_on, spread_off) if diffs else float("nan")
    return {
        "on": on,
        "off": off,
        "differences": diffs,
        "median_on": _median(on),
        "median_off": _median(off),
        "median_difference": median_diff,
        "min_difference": min(diffs, default=float("nan")),
        "max_difference": max(diffs, default=float("nan")),
        "spread_on": spread_on,
        "spread_off": spread_off,
        "rounds_on_higher": positive,
        "rounds_off_higher": negative,
        "sign_test_p": sign_test(positive, negative),
        "within_noise": abs(median_diff) <= noise if len(diffs) >= 2 else None,
    }


def ledger_summary(lat: dict[str, list[LatencyResult]],
                   tput: dict[str, list[load.ThroughputResult]]) -> dict[str, Any]:
    """p50 and p95 of the sequential leg and requests/s of the throughput leg, ledger
    on against off, paired by round; the verdict is the issue's "no measurable
    latency": the p50 difference within the round-to-round spread."""
    p50 = paired([x.p50_ms for x in lat[LEDGER_ON]], [x.p50_ms for x in lat[LEDGER_OFF]])
    p95 = paired([x.p95_ms for x in lat[LEDGER_ON]], [x.p95_ms for x in lat[LEDGER_OFF]])
    rps = paired([x.rps for x in tput[LEDGER_ON]], [x.rps for x in tput[LEDGER_OFF]])
    ratio = _ratio(rps["median_on"], rps["median_off"])
    return {
        "p50_ms": p50,
        "p95_ms": p95,
        "rps": {**rps, "ratio_on_off": ratio},
        "verdict": {
            "target": "ledger on adds no measurable p50 latency: the on - off p50 "
                      "difference within the round-to-round spread",
            "median_difference_ms": p50["median_difference"],
            "noise_ms": max(p50["spread_on"], p50["spread_off"]),
            "pass": p50["within_noise"],
        },
    }


def _ledger_rows(path: Path) -> int | None:
    """Requests the ledger file counts (None: no file, or no usage table in it)."""
    if not path.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT COALESCE(SUM(requests), 0) FROM usage").fetchone()
    except sqlite3.Error:
        return None
    return int(row[0])


async def run_ledger(opts: Options, workdir: Path, progress: Progress) -> dict[str, Any]:
    """Two Corrals in front of one instant stand-in, the usage ledger on in one and
    off in the other, measured in interleaved rounds."""
    harness.raise_fd_limit(65536)
    started = time.perf_counter()
    parallel = max(64, opts.concurrency)
    ledger_file = workdir / "usage.sqlite3"
    async with contextlib.AsyncExitStack() as stack:
        progress(f"starting an instant stand-in (parallel {parallel}), Corral with the "
                 "ledger on, Corral with the ledger off")
        standin = await stack.enter_async_context(
            harness.simulator(workdir, parallel=parallel, tps=None))
        targets: dict[str, Target] = {"direct": standin}
        targets[LEDGER_ON] = await stack.enter_async_context(harness.corral(
            workdir, standin, max_concurrency=parallel, name=LEDGER_ON,
            usage={"enabled": True, "path": str(ledger_file)}))
        targets[LEDGER_OFF] = await stack.enter_async_context(harness.corral(
            workdir, standin, max_concurrency=parallel, name=LEDGER_OFF,
            usage={"enabled": False}))
        measured = await _measure(opts, targets, standin, "direct", ledger_order, progress,
                                  handshakes=False)
    # After Corral stopped: what it flushed on the way out is in the file too.
    recorded = _ledger_rows(ledger_file)
    rounds = measured.pop("_rounds")
    return {
        "mode": "ledger",
        "tls": False,
        "options": asdict(opts),
        "ledger": {
            "on": {"enabled": True, "path": "<run dir>/usage.sqlite3"},
            "off": {"enabled": False},
            "requests_recorded": recorded,
            "file_bytes": ledger_file.stat().st_size if ledger_file.exists() else None,
        },
        **measured,
        "comparison": ledger_summary(rounds["latency"], rounds["throughput"]),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


# -- tables ------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def verdict_cell(passed: bool | None) -> str:
    return {True: "[green]PASS[/]", False: "[red]MISS[/]", None: "[dim]n/a[/]"}[passed]


def _latency_table(title: str, rows: dict[str, Any]) -> Table:
    t = Table(title=title)
    for col in ("target", "p50", "p95", "p99", "mean", "added p50", "added p95", "errors"):
        t.add_column(col, justify="right" if col != "target" else "left")
    for name, row in rows.items():
        t.add_row(name, fmt(row["p50_ms"]), fmt(row["p95_ms"]), fmt(row["p99_ms"]),
                  fmt(row["mean_ms"]), fmt(row["added_p50_ms"]), fmt(row["added_p95_ms"]),
                  str(row["errors"]))
    return t


def _throughput_table(title: str, rows: dict[str, Any], standin: str) -> Table:
    t = Table(title=title)
    for col in ("target", "req/s", "p50 ms", "p99 ms", "errors",
                "CPU %: target/stand-in/load gen/others"):
        t.add_column(col, justify="right" if col != "target" else "left")
    for name, row in rows.items():
        cpu = row["cpu_percent"]
        procs = [p for p in cpu if p not in ("standin", "load generator", "others")]
        own = cpu[procs[0]] if procs else cpu.get("standin", float("nan"))
        alone = name == standin
        parts = [f"{own:.0f}", "–" if alone else f"{cpu.get('standin', float('nan')):.0f}",
                 f"{cpu['load generator']:.0f}", f"{cpu.get('others', float('nan')):.0f}"]
        t.add_row(name, f"{row['rps']:.0f}", fmt(row["p50_ms"]), fmt(row["p99_ms"]),
                  str(row["errors"]), " / ".join(parts))
    return t


def _noise_note(console: Console, tput: dict[str, Any]) -> None:
    others = max((row["cpu_percent"].get("others", 0.0) for row in tput.values()), default=0.0)
    if others > 20:
        console.print(f"[yellow]other processes used up to {others:.0f}% of a core during "
                      "the throughput leg: the figures are noisy, rerun on a quiet machine[/]")


def render_tls(console: Console, result: dict[str, Any]) -> None:
    opts = result["options"]
    console.print(_latency_table(
        f"Latency, {opts['requests']} requests × {opts['rounds']} round(s), one "
        "keep-alive connection (ms, median of rounds; *-https over TLS, the rest plain)",
        result["latency"]))
    console.print(_latency_table(
        f"New connection per request, {opts['handshakes']} requests × {opts['rounds']} "
        "round(s): connect (+ TLS handshake) + request (ms)",
        result["new_connection_latency"]))
    console.print(_throughput_table(
        f"Throughput, {opts['concurrency']} keep-alive connections in flight, "
        f"{opts['duration']:g}s × {opts['rounds']} round(s) (median of rounds)",
        result["throughput"], DIRECT_HTTP))
    _noise_note(console, result["throughput"])
    for name, info in result["tls_negotiated"].items():
        if info:
            console.print(f"[dim]{name}: {info['version']}, {info['cipher']}, "
                          f"ALPN {info['alpn']}[/]", highlight=False)
    v = result["verdicts"]
    t = Table(title="Corral over HTTPS against nginx over HTTPS, same certificate")
    for col in ("target", "measured", "goal", "verdict"):
        t.add_column(col)
    al, tp = v["added_latency"], v["throughput"]
    if al["pass"] is None:
        t.add_row("added p50 latency", al["why"], "<= 2x nginx", verdict_cell(None))
        t.add_row("throughput", tp["why"], ">= 0.8x nginx", verdict_cell(None))
    else:
        t.add_row("added p50 latency",
                  f"Corral +{fmt(al['corral_added_p50_ms'])} ms vs nginx "
                  f"+{fmt(al['nginx_added_p50_ms'])} ms (×{fmt(al['ratio'], 2)})",
                  al["target"], verdict_cell(al["pass"]))
        t.add_row("throughput", f"{tp['corral_rps']:.0f} vs {tp['nginx_rps']:.0f} req/s "
                  f"(×{fmt(tp['ratio'], 2)})", tp["target"], verdict_cell(tp["pass"]))
        nc = v["new_connection_latency"]
        t.add_row("added p50, new connection each",
                  f"Corral +{fmt(nc['corral_added_p50_ms'])} ms vs nginx "
                  f"+{fmt(nc['nginx_added_p50_ms'])} ms (×{fmt(nc['ratio'], 2)})",
                  "none (information)", verdict_cell(None))
    console.print(t)
    cost = result.get("tls_cost") or {}
    plain = result.get("plain_verdicts")
    t = Table(title="What TLS itself costs: HTTPS against plain HTTP, same proxy, same run")
    for col in ("proxy", "added p50 ms", "added p95 ms", "throughput kept"):
        t.add_column(col, justify="right")
    for name, c in cost.items():
        if c:
            t.add_row(name, f"+{fmt(c['added_p50_ms'])}", f"+{fmt(c['added_p95_ms'])}",
                      f"×{fmt(c['throughput_kept'], 2)}")
    console.print(t)
    if plain:
        al, tp = plain["added_latency"], plain["throughput"]
        console.print(f"over plain HTTP in this run: Corral added p50 ×{fmt(al['ratio'], 2)} "
                      f"nginx's, throughput ×{fmt(tp['ratio'], 2)} nginx's", highlight=False)


def render_ledger(console: Console, result: dict[str, Any]) -> None:
    opts = result["options"]
    console.print(_latency_table(
        f"Latency, {opts['requests']} requests × {opts['rounds']} round(s), one keep-alive "
        "connection (ms, median of rounds)", result["latency"]))
    console.print(_throughput_table(
        f"Throughput, {opts['concurrency']} in flight, {opts['duration']:g}s × "
        f"{opts['rounds']} round(s) (median of rounds)", result["throughput"], "direct"))
    _noise_note(console, result["throughput"])
    c = result["comparison"]
    t = Table(title="Ledger on − off, paired by round (on and off measured back to back, "
                    "alternating which goes first)")
    for col in ("figure", "on (median)", "off (median)", "on − off per round",
                "median on − off", "spread of rounds on / off", "on higher", "sign p"):
        t.add_column(col, justify="right" if col != "figure" else "left")
    for label, key, digits in (("p50 ms", "p50_ms", 3), ("p95 ms", "p95_ms", 3),
                               ("req/s", "rps", 0)):
        row = c[key]
        t.add_row(label, fmt(row["median_on"], digits), fmt(row["median_off"], digits),
                  " ".join(f"{d:+.{digits}f}" for d in row["differences"]),
                  f"{row['median_difference']:+.{digits}f}",
                  f"{fmt(row['spread_on'], digits)} / {fmt(row['spread_off'], digits)}",
                  f"{row['rounds_on_higher']}/{len(row['differences'])}",
                  fmt(row["sign_test_p"], 2))
    console.print(t)
    v = c["verdict"]
    console.print(f"no measurable p50 latency from the ledger: median on − off "
                  f"{v['median_difference_ms']:+.3f} ms against a round-to-round spread of "
                  f"{fmt(v['noise_ms'])} ms → {verdict_cell(v['pass'])}"
                  + (" (needs 2 rounds or more)" if v["pass"] is None else ""))
    recorded = result["ledger"]["requests_recorded"]
    if not recorded:
        console.print("[yellow]the ledger file holds no requests: Corral did not record "
                      "usage in this run, so 'on' measured nothing extra[/]")
    else:
        console.print(f"[dim]the ledger recorded {recorded} requests[/]")
