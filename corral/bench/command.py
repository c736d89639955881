"""``corral bench``: benchmarks run against real processes on this machine."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import platform
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Coroutine
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson
from rich.console import Console
from rich.table import Table

from corral.bench import chaos, failover, harness, overhead
from corral.bench.overhead import fmt, verdict_cell

_DEFAULTS = overhead.Options()
_T = TypeVar("_T")


def _run(main: Coroutine[Any, Any, _T]) -> _T:
    # uvloop for the load generator: its per-request cost is part of what the
    # benchmark must keep small (the generator shares the cores with the targets).
    from corral.runtime import new_runner

    runner = new_runner()
    with runner:
        return runner.run(_cancel_on_sigterm(main))


async def _cancel_on_sigterm(main: Coroutine[Any, Any, _T]) -> _T:
    # SIGTERM would otherwise end this process at once and leave the stand-ins, Corral
    # and nginx running (they are in their own sessions); cancelling the task runs the
    # harness's clean-up instead. ^C (SIGINT) already cancels it through the Runner.
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    finally:
        with contextlib.suppress(NotImplementedError):
            loop.remove_signal_handler(signal.SIGTERM)


def _execute(console: Console, name: str,
             scenario: Callable[[Path, Callable[[str], None]],
                                Coroutine[Any, Any, dict[str, Any]]]) -> dict[str, Any]:
    """Run a scenario in a scratch directory, printing its progress; exit 130 when
    stopped (every process it started is stopped first) and 1 when a target failed."""
    def progress(message: str) -> None:
        console.print(f"[dim]· {message}[/]")

    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        try:
            result = _run(scenario(Path(tmp), progress))
        except asyncio.CancelledError:
            console.print("[yellow]benchmark stopped; every process it started was stopped[/]")
            sys.exit(130)
        except harness.TargetError as exc:
            console.print("[red]benchmark aborted:[/]")
            # The message carries a process's log tail: print it verbatim, not as markup.
            console.print(str(exc), markup=False, highlight=False)
            sys.exit(1)
    return {"benchmark": name, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine_info(), **result}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _nginx_version() -> str | None:
    binary = harness.nginx_binary()
    if binary is None:
        return None
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ") or None


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare two result files."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        usable = os.cpu_count() or 0
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "cpu_model": _cpu_model(),
        "memory_gib": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "corral": _version("corral"),
        "aiohttp": _version("aiohttp"),
        "uvloop": _version("uvloop"),
        "nginx": _nginx_version(),
    }


def render(console: Console, result: dict[str, Any]) -> None:
    lat, tput, streams = result["latency"], result["throughput"], result["streams"]
    opts = result["options"]

    t = Table(title=f"Sequential latency, {opts['requests']} requests × {opts['rounds']} "
                    "round(s), one keep-alive connection (ms, median of rounds)")
    for col in ("target", "p50", "p99", "mean", "added p50", "errors"):
        t.add_column(col, justify="right" if col != "target" else "left")
    for name, row in lat.items():
        t.add_row(name, fmt(row["p50_ms"]), fmt(row["p99_ms"]), fmt(row["mean_ms"]),
                  fmt(row["added_p50_ms"]), str(row["errors"]))
    console.print(t)

    t = Table(title=f"Throughput, {opts['concurrency']} in flight, {opts['duration']:g}s "
                    f"× {opts['rounds']} round(s) (median of rounds)")
    for col in ("target", "req/s", "p50 ms", "p99 ms", "errors",
                "CPU %: target/stand-in/load gen/others"):
        t.add_column(col, justify="right" if col != "target" else "left")
    for name, row in tput.items():
        cpu = row["cpu_percent"]
        own = cpu.get(name if name != "direct" else "standin", float("nan"))
        # Direct, the target is the stand-in: its column stays empty, not counted twice.
        standin = "–" if name == "direct" else f"{cpu.get('standin', float('nan')):.0f}"
        parts = [f"{own:.0f}", standin, f"{cpu['load generator']:.0f}",
                 f"{cpu.get('others', float('nan')):.0f}"]
        t.add_row(name, f"{row['rps']:.0f}", fmt(row["p50_ms"]), fmt(row["p99_ms"]),
                  str(row["errors"]), " / ".join(parts))
    console.print(t)

    t = Table(title=f"{opts['streams']} concurrent streams, {opts['stream_tokens']} tokens "
                    f"at {opts['stream_tps']:g} tokens/s each (TTFT in ms)")
    for col in ("target", "done", "TTFT p50", "TTFT p99", "slowest s", "RSS MB before/peak",
                "failures"):
        t.add_column(col, justify="right" if col != "target" else "left")
    for name, row in streams.items():
        t.add_row(name, f"{row['completed']}/{row['streams']}", fmt(row["ttft_p50_ms"], 1),
                  fmt(row["ttft_p99_ms"], 1), fmt(row["duration_max_ms"] / 1000, 2),
                  f"{fmt(row['rss_before_mb'], 0)} / {fmt(row['peak_rss_mb'], 0)}",
                  ", ".join(f"{k}: {v}" for k, v in row["failures"].items()) or "–")
    console.print(t)

    others = max((row["cpu_percent"].get("others", 0.0) for row in tput.values()), default=0.0)
    if others > 20:
        console.print(f"[yellow]other processes used up to {others:.0f}% of a core during "
                      "the throughput leg: the figures are noisy, rerun on a quiet machine[/]")

    v = result["verdicts"]
    t = Table(title="Targets")
    for col in ("target", "measured", "goal", "verdict"):
        t.add_column(col)
    al = v["added_latency"]
    measured = (f"Corral +{fmt(al['corral_added_p50_ms'])} ms vs nginx "
                f"+{fmt(al['nginx_added_p50_ms'])} ms (×{fmt(al['ratio'], 2)})"
                if al["pass"] is not None else al["why"])
    t.add_row("added p50 latency", measured, al.get("target", "<= 2x nginx"),
              verdict_cell(al["pass"]))
    tp = v["throughput"]
    measured = (f"{tp['corral_rps']:.0f} vs {tp['nginx_rps']:.0f} req/s "
                f"(×{fmt(tp['ratio'], 2)})" if tp["pass"] is not None else tp["why"])
    t.add_row("throughput", measured, tp.get("target", ">= 0.8x nginx"), verdict_cell(tp["pass"]))
    st = v["streams"]
    t.add_row("streams", f"{st['completed']}/{st['streams']} complete, peak RSS "
              f"{fmt(st['peak_rss_mb'], 1)} MB", st["target"], verdict_cell(st["pass"]))
    console.print(t)
    m = result["machine"]
    nginx_note = ""
    if "nginx" in lat:
        nginx_note = (f", nginx {m['nginx']}; Corral is one process, nginx ran with "
                      "worker_processes 1"
                      + (" (and auto as nginx-auto)" if "nginx-auto" in lat else ""))
    console.print(f"[dim]{m['cores']} cores ({m['cpu_model']}), Python {m['python']}, "
                  f"aiohttp {m['aiohttp']}, uvloop {m['uvloop']}{nginx_note}[/]",
                  highlight=False)


def _default_output() -> Path:
    base = Path("benchmarks/results") / f"overhead-{dt.date.today().isoformat()}.json"
    path, n = base, 2
    # Several runs on one day are all kept: a later run never overwrites an earlier one.
    while path.exists():
        path = base.with_name(f"{base.stem}-{n}.json")
        n += 1
    return path


@click.group()
def bench_command() -> None:
    """Benchmarks against real processes on this machine."""


@bench_command.command("overhead")
@click.option("--requests", type=click.IntRange(min=1), default=None,
              help=f"Sequential requests per target per round [default: {_DEFAULTS.requests}].")
@click.option("--rounds", type=click.IntRange(min=1), default=None,
              help=f"Repetitions of the latency and throughput legs; medians are reported "
                   f"[default: {_DEFAULTS.rounds}].")
@click.option("--duration", type=click.FloatRange(min=0.1), default=None,
              help=f"Measured seconds per throughput run [default: {_DEFAULTS.duration:g}].")
@click.option("--concurrency", type=click.IntRange(min=1), default=None,
              help=f"Requests in flight in the throughput leg [default: "
                   f"{_DEFAULTS.concurrency}].")
@click.option("--streams", type=click.IntRange(min=1, max=4096), default=None,
              help=f"Concurrent slow streams [default: {_DEFAULTS.streams}].")
@click.option("--stream-tokens", type=click.IntRange(min=1), default=None,
              help=f"Tokens per stream [default: {_DEFAULTS.stream_tokens}].")
@click.option("--stream-tps", type=click.FloatRange(min=0.1), default=None,
              help=f"Tokens per second of each stream [default: {_DEFAULTS.stream_tps:g}].")
@click.option("--no-nginx", is_flag=True, help="Skip the nginx targets.")
@click.option("--nginx-auto/--no-nginx-auto", default=None,
              help="Also measure nginx with worker_processes auto [default: on, off with "
                   "--quick].")
@click.option("--quick", is_flag=True,
              help="A fast smoke run: fewer requests, one round, 200 streams.")
@click.option("--tls", is_flag=True,
              help="HTTPS to Corral and nginx, both serving one throwaway CA's certificate "
                   "(direct stays plain HTTP): keep-alive latency, latency with a new "
                   "connection per request, and throughput; no streams leg.")
@click.option("--handshakes", type=click.IntRange(min=1), default=None,
              help=f"With --tls: requests per target per round in the new-connection leg "
                   f"[default: {_DEFAULTS.handshakes}, 100 with --quick].")
@click.option("--ledger", is_flag=True,
              help="Corral with the usage ledger on against off, in interleaved rounds "
                   "[rounds default: 6, 3 with --quick]; no nginx, no streams leg.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Where to write the JSON result [default: benchmarks/results/"
                   "overhead-<date>.json; overhead-tls-… with --tls, overhead-ledger-… "
                   "with --ledger].")
def overhead_command(
    requests: int | None, rounds: int | None, duration: float | None,
    concurrency: int | None, streams: int | None, stream_tokens: int | None,
    stream_tps: float | None, no_nginx: bool, nginx_auto: bool | None, quick: bool,
    tls: bool, handshakes: int | None, ledger: bool, output: Path | None,
) -> None:
    """Corral's cost: the same requests direct, through Corral and through nginx.

    Sequential p50/p99 latency, throughput at a fixed number in flight, and many
    concurrent slow streams (completion, time to first token, Corral's peak RSS),
    judged against: added p50 ≤ 2× nginx's, throughput ≥ 0.8× nginx's, all streams
    complete with peak RSS ≤ 150 MB.

    --tls judges Corral over HTTPS against nginx over HTTPS with the same goals;
    --ledger compares Corral with the usage ledger on and off in one run.
    """
    if tls and ledger:
        raise click.UsageError("--tls and --ledger are separate runs: give one of them")
    if handshakes is not None and not tls:
        raise click.UsageError("--handshakes is for --tls runs")
    console = Console(stderr=False)
    if ledger and rounds is None:
        # Paired rounds are the point: enough of them to see the spread.
        rounds = 3 if quick else 6
    overrides: dict[str, Any] = {
        k: v for k, v in {
            "requests": requests, "rounds": rounds, "duration": duration,
            "concurrency": concurrency, "streams": streams, "stream_tokens": stream_tokens,
            "stream_tps": stream_tps, "nginx_auto": nginx_auto, "handshakes": handshakes,
        }.items() if v is not None
    }
    overrides["tls"], overrides["ledger"] = tls, ledger
    use_nginx = not no_nginx and not ledger
    if use_nginx and harness.nginx_binary() is None:
        console.print("[yellow]nginx is not installed: the nginx leg is skipped and the "
                      "ratios against it are not judged[/]")
        use_nginx = False
    overrides["nginx"] = use_nginx
    opts = (overhead.Options.quick(**overrides) if quick
            else overhead.Options(**overrides))

    if tls or ledger:
        if console.width < 110:
            console = Console(stderr=False, width=110)     # the tables need the room
        mode = "tls" if tls else "ledger"
        scenario = overhead.run_tls if tls else overhead.run_ledger
        result = _execute(console, f"overhead-{mode}",
                          lambda tmp, progress: scenario(opts, tmp, progress))
        (overhead.render_tls if tls else overhead.render_ledger)(console, result)
        _machine_note(console, result)
        path = output or _dated_output(f"overhead-{mode}")
    else:
        result = _execute(console, "overhead",
                          lambda tmp, progress: overhead.run(opts, tmp, progress))
        render(console, result)
        path = output or _default_output()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
                                  | orjson.OPT_NON_STR_KEYS)
                     + b"\n")
    console.print(f"results written to {path}")


def _machine_note(console: Console, result: dict[str, Any]) -> None:
    m = result["machine"]
    nginx = f", {m['nginx']} (worker_processes 1)" if result["options"]["nginx"] else ""
    console.print(f"[dim]{m['cores']} cores ({m['cpu_model']}), Python {m['python']}, "
                  f"aiohttp {m['aiohttp']}, uvloop {m['uvloop']}{nginx}[/]", highlight=False)


_FAILOVER = failover.Options()


def _dated_output(name: str) -> Path:
    """``benchmarks/results/<name>-<date>.json``; a later run the same day gets a suffix."""
    base = Path("benchmarks/results") / f"{name}-{dt.date.today().isoformat()}.json"
    path, n = base, 2
    while path.exists():
        path = base.with_name(f"{base.stem}-{n}.json")
        n += 1
    return path


def _save(console: Console, result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
                     + b"\n")
    console.print(f"results written to {path}")


@bench_command.command("failover")
@click.option("--clients", type=click.IntRange(min=1, max=4096), default=_FAILOVER.clients,
              show_default=True, help="Concurrent clients, each looping streaming requests.")
@click.option("--phase-seconds", type=click.FloatRange(min=0.5),
              default=_FAILOVER.phase_seconds, show_default=True,
              help="Length of each of the seven phases.")
@click.option("--warmup", type=click.FloatRange(min=0), default=_FAILOVER.warmup,
              show_default=True, help="Seconds of load before the first phase (not counted).")
@click.option("--num-predict", type=click.IntRange(min=1), default=_FAILOVER.num_predict,
              show_default=True, help="Tokens per request.")
@click.option("--tps", type=click.FloatRange(min=0), default=_FAILOVER.tps, show_default=True,
              help="Tokens per second of each stand-in stream (0 = instant).")
@click.option("--parallel", type=click.IntRange(min=1), default=_FAILOVER.parallel,
              show_default=True, help="Slots of each stand-in, and max_concurrency in Corral.")
@click.option("--first-byte-timeout", type=click.FloatRange(min=0.1),
              default=_FAILOVER.first_byte_timeout, show_default=True,
              help="Corral's timeouts.first_byte, in seconds (decides the hang phase).")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Where to write the JSON result [default: "
                   "benchmarks/results/failover-<date>.json].")
def failover_command(
    clients: int, phase_seconds: float, warmup: float, num_predict: int, tps: float,
    parallel: int, first_byte_timeout: float, output: Path | None,
) -> None:
    """What clients see while a backend fails and recovers.

    Two stand-in backends A and B behind Corral under a steady streaming load, while A
    goes through: baseline, 500 out of memory, recovered, hang before the first byte,
    recovered, killed (SIGKILL), restarted on the same port. Per phase: requests OK,
    failures by kind (non-200, stream cut, connection error), p50/p99 latency, retries
    and the backend that served (from Corral's access log); and how soon Corral took A
    out after each fault and routed to it again after each recovery.
    """
    console = Console(stderr=False)
    opts = failover.Options(
        clients=clients, phase_seconds=phase_seconds, warmup=warmup,
        num_predict=num_predict, tps=tps, parallel=parallel,
        first_byte_timeout=first_byte_timeout,
    )

    result = _execute(console, "failover",
                      lambda tmp, progress: failover.run(opts, tmp, progress))
    failover.render(console, result)
    _save(console, result, output or _dated_output("failover"))


@bench_command.command("scheduler")
@click.option("--scenario", "names", multiple=True,
              type=click.Choice(["noisy", "priority", "preemption", "residency", "shift"]),
              help="Run only these scenarios (repeat the option) [default: all five].")
@click.option("--no-nginx", is_flag=True, help="Skip the nginx (least_conn, no queue) runs.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Where to write the JSON result [default: "
                   "benchmarks/results/scheduler-<date>.json].")
def scheduler_command(names: tuple[str, ...], no_nginx: bool, output: Path | None) -> None:
    """How the scheduler treats people, GPUs and work, against nginx.

    Five scenarios on stand-in fleets: a noisy neighbour, a person behind a low-class
    flood of streams, a person behind non-streamed batch work (preemption), two models
    each resident on one backend (no swap needed), and a demand shift from two models
    to one. Per scenario and target: the interactive p95 against its ideal, the slots'
    utilisation, the useful output (tokens delivered over the slots' capacity), model
    loads and preemptions; Corral's figures are judged against the issue's goals.
    """
    from corral.bench import scheduler

    console = Console(stderr=False)
    if console.width < 130:
        console = Console(stderr=False, width=130)    # the tables need the room
    use_nginx = not no_nginx
    if use_nginx and harness.nginx_binary() is None:
        console.print("[yellow]nginx is not installed: only Corral is measured[/]")
        use_nginx = False
    chosen = list(names) or ["noisy", "priority", "preemption", "residency", "shift"]
    result = _execute(console, "scheduler",
                      lambda tmp, progress: scheduler.run(chosen, use_nginx, tmp, progress))
    scheduler.render(console, result)
    _save(console, result, output or _dated_output("scheduler"))


@bench_command.command("replicas")
@click.option("--requests", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Sequential requests per target per round.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--duration", type=click.FloatRange(min=0.5), default=5.0, show_default=True,
              help="Measured seconds per throughput run.")
@click.option("--concurrency", type=click.IntRange(min=2), default=64, show_default=True,
              help="Requests in flight in the throughput and cap legs.")
@click.option("--cap", type=click.IntRange(min=1), default=8, show_default=True,
              help="The backend's slots in the cap leg.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Where to write the JSON result [default: "
                   "benchmarks/results/replicas-<date>.json].")
def replicas_command(requests: int, rounds: int, duration: float, concurrency: int, cap: int,
                     output: Path | None) -> None:
    """What shared state costs: 1 replica in memory, 1 on Redis, 2 on Redis.

    Added p50 latency against state: memory and the Redis commands per request
    (uncontended), throughput with slots to spare, and — with more requests in flight
    than the backend has slots — the most the backend ever ran at once, which must
    never exceed its slots across replicas (two in-memory replicas show why).
    """
    from corral.bench import replicas

    console = Console(stderr=False)
    if console.width < 110:
        console = Console(stderr=False, width=110)
    opts = replicas.Options(requests=requests, rounds=rounds, duration=duration,
                            concurrency=concurrency, cap=cap)
    result = _execute(console, "replicas",
                      lambda tmp, progress: replicas.run(opts, tmp, progress))
    replicas.render(console, result)
    _save(console, result, output or _dated_output("replicas"))


_CHAOS = chaos.Options()


@bench_command.command("chaos")
@click.option("--duration", type=click.FloatRange(min=1), default=_CHAOS.duration,
              show_default=True,
              help="Seconds of faults, rounded up to whole rounds of the four kinds.")
@click.option("--fault-every", type=click.FloatRange(min=0.5), default=_CHAOS.fault_every,
              show_default=True,
              help="Seconds between two faults (a fault that takes longer delays the next).")
@click.option("--clients", type=click.IntRange(min=1, max=1024), default=_CHAOS.clients,
              show_default=True,
              help="Clients, each sending one streaming request after another, each to a "
                   "replica picked at random.")
@click.option("--replicas", type=click.IntRange(min=2, max=16), default=_CHAOS.replicas,
              show_default=True, help="Corral processes on the one redis-server.")
@click.option("--slots", type=click.IntRange(min=1), default=_CHAOS.slots, show_default=True,
              help="The stand-in's slots, and max_concurrency in Corral.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Where to write the JSON result (a markdown summary goes next to it) "
                   "[default: benchmarks/results/chaos-<date>.json].")
def chaos_command(duration: float, fault_every: float, clients: int, replicas: int,
                  slots: int, output: Path | None) -> None:
    """Replicas on one Redis under steady load, one fault every few seconds.

    Faults in turn: Redis killed and started again at once (its data lost), Redis
    paused past the slot store's socket timeout, a replica paused past its slot lease,
    a replica killed and restarted. Measured: the most requests at the backend at once
    (a replica paused past its lease counted apart), requests that got neither an
    answer nor a 503 with Retry-After, requests run twice, and the served rate after
    the last fault against before the first.
    """
    console = Console(stderr=False)
    if console.width < 120:
        console = Console(stderr=False, width=120)
    opts = chaos.Options(duration=duration, fault_every=fault_every, clients=clients,
                         replicas=replicas, slots=slots)
    result = _execute(console, "chaos", lambda tmp, progress: chaos.run(opts, tmp, progress))
    chaos.render(console, result)
    path = output or _dated_output("chaos")
    _save(console, result, path)
    summary = path.with_suffix(".md")
    summary.write_text(chaos.markdown(result))
    console.print(f"summary written to {summary}")
