"""``corral bench replicas``: what shared state costs, and whether the slot cap holds.

Targets, all in front of the same instant stand-in (so the backend's own time is as
small as it gets), in one run:

- ``memory`` — one Corral, ``state: memory``: the reference;
- ``redis`` — one Corral, ``state: redis://…`` (a redis-server started here);
- ``memory x2`` — two Corral processes with in-memory state, requests alternating
  between them: what two processes cost by themselves (and, with a cap, what they
  cannot hold);
- ``redis x2`` — two Corral processes on that Redis, requests alternating between them.

Legs: sequential latency (one request at a time, p50 added against ``memory``, and
the Redis round trips each request cost, from Redis's own ``INFO commandstats``); and
throughput with ``concurrency`` in flight, first with slots to spare (the uncontended
path), then with a cap of ``cap`` slots on the backend while ``concurrency`` requests
are in flight — where the stand-in's own count says whether the cap held, across
replicas too.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.bench import harness, load
from corral.bench.harness import MODEL, Target

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Options:
    requests: int = 2000
    rounds: int = 3
    duration: float = 5.0
    warmup: float = 1.0
    concurrency: int = 64
    cap: int = 8


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


async def _redis_round_trips(redis: Target) -> int:
    """Script calls Redis has run so far: every slot operation is one EVALSHA, one
    round trip (the commands a script runs inside count for nothing here)."""
    reader, writer = await asyncio.open_connection(redis.host, redis.port)
    try:
        writer.write(b"INFO commandstats\r\n")
        await writer.drain()
        header = await reader.readline()
        size = int(header[1:].strip())
        body = (await reader.readexactly(size + 2)).decode()
    finally:
        writer.close()
    return sum(int(n) for name, n in re.findall(r"cmdstat_(\w+):calls=(\d+)", body)
               if name in ("evalsha", "eval"))


async def _sequential(group: Sequence[Target], count: int) -> list[float]:
    """``count`` requests one after another, alternating over the group's replicas,
    each on its own keep-alive connection: the latency of each (ms)."""
    conns = [load.Connection(t.host, t.port) for t in group]
    requests = [load.generate_request(t.host, t.port, MODEL, 1, stream=False) for t in group]
    out = []
    try:
        for c in conns:
            await c.connect()
        clock = time.perf_counter
        for i in range(count):
            k = i % len(group)
            t0 = clock()
            resp = await conns[k].exchange(requests[k])
            if resp.status != 200:
                raise harness.TargetError(f"{group[k].name} answered {resp.status}")
            out.append((clock() - t0) * 1000)
    finally:
        for c in conns:
            c.close()
    return out


async def _throughput(group: Sequence[Target], concurrency: int, duration: float,
                      warmup: float) -> dict[str, Any]:
    share = max(1, concurrency // len(group))
    results = await asyncio.gather(*(
        load.throughput(t.host, t.port,
                        load.generate_request(t.host, t.port, MODEL, 1, stream=False),
                        share, duration, warmup=warmup)
        for t in group))
    return {"rps": sum(r.rps for r in results),
            "p50_ms": _median([r.p50_ms for r in results]),
            "p99_ms": max(r.p99_ms for r in results),
            "errors": sum(r.errors for r in results)}


async def _standin(standin: Target, method: str, path: str) -> dict[str, Any]:
    """The stand-in's counters (``GET /_sim/stats``), or reset them (``POST /_sim/reset``)."""
    import orjson

    conn = load.Connection(standin.host, standin.port)
    try:
        resp = await conn.exchange(load.encode_request(
            standin.host, standin.port, method, path, b"{}" if method == "POST" else None),
            collect=True)
        return dict(orjson.loads(resp.body))
    finally:
        conn.close()


@contextlib.asynccontextmanager
async def _group(stack: contextlib.AsyncExitStack, workdir: Path, standin: Target,
                 name: str, count: int, state: str, slots: int) -> Any:
    group = [await stack.enter_async_context(harness.corral(
        workdir, standin, max_concurrency=slots, name=f"{name}-{i}", state=state))
        for i in range(count)]
    # Replicas need a moment to find each other and elect a leader.
    await asyncio.sleep(1.5 if count > 1 else 0.2)
    yield group


async def run(opts: Options, workdir: Path, progress: Progress) -> dict[str, Any]:
    harness.raise_fd_limit()
    latency: dict[str, Any] = {}
    tput: dict[str, Any] = {}
    capped: dict[str, Any] = {}
    # Slots to spare: twice what is in flight, so that the uncontended path is what
    # the first legs measure (at exactly the cap, a request finds the slot its own
    # connection's previous request is just giving back).
    parallel = max(64, 2 * opts.concurrency)
    async with contextlib.AsyncExitStack() as stack:
        progress("starting redis-server and an instant stand-in")
        redis = await stack.enter_async_context(harness.redis_server(workdir))
        standin = await stack.enter_async_context(
            harness.simulator(workdir, parallel=parallel, tps=None))
        url = f"redis://{redis.host}:{redis.port}/0"
        # Two processes cost something of their own (each request wakes a process
        # that was idle): ``memory x2`` is what ``redis x2`` is compared with.
        plans = [("memory", 1, "memory"), ("redis", 1, url), ("memory x2", 2, "memory"),
                 ("redis x2", 2, url)]
        for name, count, state in plans:
            async with contextlib.AsyncExitStack() as inner, \
                    _group(inner, workdir, standin, name.replace(" ", ""), count, state,
                           parallel) as group:
                progress(f"{name}: warm-up")
                await _sequential(group, 200)
                await _throughput(group, opts.concurrency, 0.5, 0.0)
                lat_rounds, cmds, tp_rounds = [], [], []
                for r in range(opts.rounds):
                    progress(f"{name}: latency round {r + 1}/{opts.rounds}")
                    before = await _redis_round_trips(redis)
                    lat_rounds.append(await _sequential(group, opts.requests))
                    cmds.append((await _redis_round_trips(redis) - before) / opts.requests)
                for r in range(opts.rounds):
                    progress(f"{name}: throughput round {r + 1}/{opts.rounds}")
                    tp_rounds.append(await _throughput(group, opts.concurrency,
                                                       opts.duration, opts.warmup))
                for t in group:
                    t.check_alive()
            latency[name] = {
                "p50_ms": _median([load.percentile(x, 50) for x in lat_rounds]),
                "p99_ms": _median([load.percentile(x, 99) for x in lat_rounds]),
                "redis_round_trips_per_request": round(_median(cmds), 3),
            }
            tput[name] = {k: _median([x[k] for x in tp_rounds])
                          for k in ("rps", "p50_ms", "p99_ms")}
            tput[name]["errors"] = sum(x["errors"] for x in tp_rounds)
        base = latency["memory"]["p50_ms"]
        for name, row in latency.items():
            row["added_p50_ms"] = round(row["p50_ms"] - base, 4)
            # The shared store's own cost: against in-memory state with as many processes.
            same = latency["memory x2" if "x2" in name else "memory"]["p50_ms"]
            row["store_cost_p50_ms"] = round(row["p50_ms"] - same, 4)
        # The cap leg needs requests that overlap at the backend: a stand-in that
        # takes 10 ms per request (one token at 100 tokens/s), room for all of them.
        slow = await stack.enter_async_context(
            harness.simulator(workdir, parallel=parallel, tps=100.0, name="standin-slow"))
        standin = slow
        for name, count, state in [("memory", 1, "memory"), ("memory x2", 2, "memory"),
                                   ("redis", 1, url), ("redis x2", 2, url)]:
            async with contextlib.AsyncExitStack() as inner, \
                    _group(inner, workdir, standin, name.replace(" ", "") + "-cap", count,
                           state, opts.cap) as group:
                progress(f"{name}: {opts.concurrency} in flight on {opts.cap} slots")
                await _standin(standin, "POST", "/_sim/reset")
                res = await _throughput(group, opts.concurrency, opts.duration, opts.warmup)
                stats = await _standin(standin, "GET", "/_sim/stats")
            capped[name] = {**res, "max_at_backend": stats["max_in_flight"],
                            "held": stats["max_in_flight"] <= opts.cap}
    verdict = {
        "added_p50_ms": latency["redis"]["added_p50_ms"],
        "added_p50_x2_ms": latency["redis x2"]["added_p50_ms"],
        "store_cost_p50_x2_ms": latency["redis x2"]["store_cost_p50_ms"],
        "goal_ms": 0.5,
        "met": latency["redis"]["added_p50_ms"] <= 0.5
        and latency["redis x2"]["store_cost_p50_ms"] <= 0.5,
        "round_trips": latency["redis"]["redis_round_trips_per_request"],
        "cap_held": capped["redis x2"]["held"] and capped["redis"]["held"],
    }
    return {"options": opts.__dict__, "latency": latency, "throughput": tput,
            "capped": capped, "verdict": verdict}


def render(console: Any, result: dict[str, Any]) -> None:
    from rich.table import Table

    o = result["options"]
    t = Table(title=f"Sequential latency, {o['requests']} requests × {o['rounds']} rounds "
                    "(ms, median of rounds)")
    for col in ("target", "p50", "p99", "added p50 vs memory",
                "vs memory, same processes", "Redis round trips/request"):
        t.add_column(col, justify="left" if col == "target" else "right")
    for name, row in result["latency"].items():
        t.add_row(name, f"{row['p50_ms']:.3f}", f"{row['p99_ms']:.3f}",
                  f"{row['added_p50_ms']:+.3f}", f"{row['store_cost_p50_ms']:+.3f}",
                  f"{row['redis_round_trips_per_request']:.2f}")
    console.print(t)
    t = Table(title=f"Throughput, {o['concurrency']} in flight, slots to spare")
    for col in ("target", "req/s", "p50 ms", "p99 ms", "errors"):
        t.add_column(col, justify="left" if col == "target" else "right")
    for name, row in result["throughput"].items():
        t.add_row(name, f"{row['rps']:.0f}", f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}",
                  str(row["errors"]))
    console.print(t)
    t = Table(title=f"{o['concurrency']} in flight on a backend of {o['cap']} slots")
    for col in ("target", "req/s", "most at the backend at once", "cap held"):
        t.add_column(col, justify="left" if col == "target" else "right")
    for name, row in result["capped"].items():
        t.add_row(name, f"{row['rps']:.0f}", str(row["max_at_backend"]),
                  "[green]yes[/]" if row["held"] else "[red]no[/]")
    console.print(t)
    v = result["verdict"]
    console.print(f"added p50 with Redis: {v['added_p50_ms']:+.3f} ms (one replica); two "
                  f"replicas {v['added_p50_x2_ms']:+.3f} ms against one in memory, "
                  f"{v['store_cost_p50_x2_ms']:+.3f} ms against two in memory — goal "
                  f"≤ {v['goal_ms']} ms: "
                  + ("[green]met[/]" if v["met"] else "[red]missed[/]")
                  + f"; {v['round_trips']:.2f} Redis round trips per request; cap held: "
                  + ("[green]yes[/]" if v["cap_held"] else "[red]no[/]"))
