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
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from corral.bench import harness, load
from corral.bench.harness import MODEL, Target

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

    @classmethod
    def quick(cls, **overrides: Any) -> Options:
        base = cls(requests=300, rounds=1, duration=2.0, warmup=0.5, streams=200,
                   nginx_auto=False)
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
    """Latency and throughput against an instant stand-in with 64 parallel slots."""
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
        latency_rounds: dict[str, list[load.LatencyResult]] = {n: [] for n in names}
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

    latency: dict[str, dict[str, Any]] = {
        name: {
            "p50_ms": _median([x.p50_ms for x in rs]),
            "p99_ms": _median([x.p99_ms for x in rs]),
            "mean_ms": _median([x.mean_ms for x in rs]),
            "errors": sum(x.errors for x in rs),
            "reconnects": sum(x.reconnects for x in rs),
            "rounds": [asdict(x) for x in rs],
        }
        for name, rs in latency_rounds.items()
    }
    direct_p50: float = latency["direct"]["p50_ms"]
    for name, row in latency.items():
        row["added_p50_ms"] = float(row["p50_ms"]) - direct_p50 if name != "direct" else 0.0
    tput = {
        name: {
            "rps": _median([x.rps for x in rs]),
            "p50_ms": _median([x.p50_ms for x in rs]),
            "p99_ms": _median([x.p99_ms for x in rs]),
            "errors": sum(x.errors for x in rs),
            "connections_opened": max(x.connections_opened for x in rs),
            "cpu_percent": {
                proc: _median([c[proc] for c in cpu_rounds[name]])
                for proc in cpu_rounds[name][0]
            },
            "rounds": [asdict(x) for x in rs],
        }
        for name, rs in tput_rounds.items()
    }
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
