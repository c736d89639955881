"""``corral bench scheduler``: the scenarios of ``scenarios.py`` against Corral and,
when installed, nginx (``least_conn``, no queue) on the same stand-in fleet.

Each target gets a fresh fleet of stand-in processes in the scenario's starting state,
so both start alike. The client loops run in this process (aiohttp, uvloop); every
stand-in is polled twice a second for its busy slot-seconds and its model loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from rich.console import Console
from rich.table import Table

from corral.bench import harness
from corral.bench.harness import Target
from corral.bench.scenarios import KEYS, TIERS, Client, Poll, Sample, Scenario, judge, summarize

Progress = Callable[[str], None]
_POLL_EVERY = 0.5


def standin(workdir: Path, sc: Scenario, index: int) -> contextlib.AbstractAsyncContextManager[
        Target]:
    port = harness.free_port()
    argv = [sys.executable, "-m", "corral.simulate", "--port", str(port),
            "--models", ",".join(sc.models), "--loaded", ",".join(sc.resident[index]),
            "--parallel", str(sc.slots), "--tps", f"{sc.tps:g}",
            "--load-time", f"{sc.load_time:g}", "--max-loaded", str(sc.max_loaded),
            "--keep-alive", "-1"]
    return harness.spawn(f"standin{index}", argv, port, workdir)


def corral_config(port: int, sc: Scenario, sims: Sequence[Target],
                  access_log: Path) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{port}",
        "backends": [{"url": s.url, "name": f"b{i}", "max_concurrency": sc.slots}
                     for i, s in enumerate(sims)],
        "access_log": str(access_log),
        "keys": KEYS,
        "tiers": TIERS,
        "queue": {"max_depth": 10000, "max_wait": "120s"},
        "routing": {"load_time": f"{max(sc.load_time, 0.1):g}s"},
        "health": {"interval": "2s"},
    }


def corral(workdir: Path, sc: Scenario,
           sims: Sequence[Target]) -> contextlib.AbstractAsyncContextManager[Target]:
    port = harness.free_port()
    path = workdir / f"corral-{sc.name}.yaml"
    path.write_text(yaml.safe_dump(
        corral_config(port, sc, sims, workdir / f"access-{sc.name}.log"), sort_keys=False))
    argv = [sys.executable, "-m", "corral.cli", "serve", "--config", str(path),
            "--log-level", "warning"]
    return harness.spawn("corral", argv, port, workdir)


# -- the clients -----------------------------------------------------------------------


async def _one(http: aiohttp.ClientSession, url: str, c: Client, tokens: int,
               t0: float) -> Sample:
    body = {"model": c.model, "prompt": f"{c.name} asks", "stream": c.stream,
            "options": {"num_predict": tokens}}
    start = time.monotonic() - t0
    ttfb = None
    status, ok, got, gen = 0, False, 0, 0.0
    try:
        async with http.post(url + "/api/generate", json=body,
                             headers={"Authorization": f"Bearer {c.key}"}) as r:
            status = r.status
            last = b""
            async for line in r.content:
                if ttfb is None:
                    ttfb = time.monotonic() - t0 - start
                if line.strip():
                    last = line
            if status == 200 and last:
                final = orjson.loads(last)
                ok = bool(final.get("done")) and "error" not in final
                got = int(final.get("eval_count", 0)) if ok else 0
                gen = int(final.get("eval_duration", 0)) / 1e9 if ok else 0.0
    except (aiohttp.ClientError, OSError, ValueError):
        ok = False
    return Sample(c.name, c.interactive, start, time.monotonic() - t0, ttfb, status, ok, got,
                  gen)


async def _loop(http: aiohttp.ClientSession, url: str, c: Client, t0: float, end: float,
                rng: random.Random, into: list[Sample]) -> None:
    if c.start > 0:
        await asyncio.sleep(c.start)
    stop = min(end, c.stop)
    while time.monotonic() - t0 < stop:
        tokens = rng.randint(*c.tokens)
        sample = await _one(http, url, c, tokens, t0)
        into.append(sample)
        if c.think > 0:
            await asyncio.sleep(c.think)


async def _poll(http: aiohttp.ClientSession, sims: Sequence[Target], t0: float,
                into: list[Poll]) -> None:
    while True:
        at = time.monotonic() - t0
        for i, s in enumerate(sims):
            with contextlib.suppress(aiohttp.ClientError, OSError, ValueError):
                async with http.get(s.url + "/_sim/stats") as r:
                    st = await r.json()
                into.append(Poll(at, i, float(st["busy_seconds"]), int(st["loads"])))
        await asyncio.sleep(_POLL_EVERY)


async def _ideal(http: aiohttp.ClientSession, sc: Scenario, sims: Sequence[Target]) -> float:
    """The interactive request alone on an idle backend where its model is loaded."""
    c = next(c for c in sc.clients if c.interactive)
    where = next(i for i, r in enumerate(sc.resident) if c.model in r)
    times = []
    for _ in range(5):
        s = await _one(http, sims[where].url, c, c.tokens[0], time.monotonic())
        times.append(s.end - s.start)
    return sorted(times)[len(times) // 2]


async def _preemptions(http: aiohttp.ClientSession, front: Target) -> int | None:
    with contextlib.suppress(aiohttp.ClientError, OSError):
        async with http.get(front.url + "/metrics") as r:
            text = await r.text()
        return int(sum(float(m) for m in re.findall(
            r"^corral_preemptions_total(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)))
    return None


async def drive(sc: Scenario, front: Target, sims: Sequence[Target],
                seed: int = 1) -> tuple[list[Sample], list[Poll], float, int | None]:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        ideal = await _ideal(http, sc, sims)
        for s in sims:
            async with http.post(s.url + "/_sim/reset") as r:
                await r.read()
        samples: list[Sample] = []
        polls: list[Poll] = []
        rng = random.Random(seed)
        t0 = time.monotonic()
        poller = asyncio.create_task(_poll(http, sims, t0, polls))
        loops = [asyncio.create_task(_loop(http, front.url, c, t0, sc.duration,
                                           random.Random(rng.random()), samples))
                 for c in sc.clients for _ in range(c.loops)]
        await asyncio.sleep(sc.duration)
        # The run is over: what is still in flight is not counted.
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await asyncio.sleep(_POLL_EVERY)
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
        preempted = await _preemptions(http, front) if front.name == "corral" else None
    return samples, polls, ideal, preempted


async def run_one(sc: Scenario, target: str, workdir: Path) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        sims = [await stack.enter_async_context(standin(workdir, sc, i))
                for i in range(sc.backends)]
        if target == "corral":
            front = await stack.enter_async_context(corral(workdir, sc, sims))
        else:
            front = await stack.enter_async_context(
                harness.nginx(workdir, sims, balance="least_conn", name="nginx"))
        samples, polls, ideal, preempted = await drive(sc, front, sims)
        front.check_alive()
    result = summarize(sc, samples, polls, ideal, preempted)
    result["goals"] = judge(sc, result)
    return result


async def run(names: Sequence[str], use_nginx: bool, workdir: Path,
              progress: Progress) -> dict[str, Any]:
    from corral.bench.scenarios import SCENARIOS

    harness.raise_fd_limit()
    out: dict[str, Any] = {"scenarios": {}}
    for name in names:
        sc = SCENARIOS[name]
        row: dict[str, Any] = {"title": sc.title, "setup": _setup(sc)}
        for target in ("corral", "nginx") if use_nginx else ("corral",):
            progress(f"{name}: {target} ({sc.duration:g}s)")
            row[target] = await run_one(sc, target, workdir)
        out["scenarios"][name] = row
    return out


def _setup(sc: Scenario) -> dict[str, Any]:
    return {"backends": sc.backends, "slots": sc.slots, "tps": sc.tps,
            "max_loaded": sc.max_loaded, "load_time_s": sc.load_time,
            "resident": [list(r) for r in sc.resident], "duration_s": sc.duration,
            "warmup_s": sc.warmup,
            "clients": [{"name": c.name, "model": c.model, "tokens": list(c.tokens),
                         "stream": c.stream, "think_s": c.think, "loops": c.loops,
                         "interactive": c.interactive, "start_s": c.start,
                         "stop_s": None if c.stop == float("inf") else c.stop}
                        for c in sc.clients]}


# -- the report -----------------------------------------------------------------------


def _f(value: float | None, digits: int = 2, pct: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value * 100:.0f} %" if pct else f"{value:.{digits}f}"


def render(console: Console, result: dict[str, Any]) -> None:
    t = Table(title="Scheduler scenarios (interactive latency in seconds)")
    for col in ("scenario", "target", "p50", "p95", "ideal", "p95/ideal", "busy", "useful",
                "loads", "preempted", "errors"):
        t.add_column(col, justify="left" if col in ("scenario", "target") else "right")
    for name, row in result["scenarios"].items():
        for target in ("corral", "nginx"):
            r = row.get(target)
            if r is None:
                continue
            i = r["interactive"]
            t.add_row(name, target, _f(i["p50_s"]), _f(i["p95_s"]), _f(i["ideal_s"]),
                      _f(i["p95_over_ideal"], 1), _f(r["utilisation"], pct=True),
                      _f(r["useful"], pct=True), str(r["loads"]),
                      "–" if r["preemptions"] is None else str(r["preemptions"]),
                      str(r["errors"]))
    console.print(t)
    g = Table(title="Goals (Corral)")
    for col in ("scenario", "goal", "target", "measured", "verdict"):
        g.add_column(col)
    for name, row in result["scenarios"].items():
        for goal, v in row["corral"]["goals"].items():
            measured = v["measured"]
            shown = _f(measured, 3) if isinstance(measured, float) else str(measured)
            g.add_row(name, goal, str(v["target"]), shown,
                      "[green]met[/]" if v["met"] else "[red]missed[/]")
        shift = row["corral"].get("shift")
        if shift is not None:
            busy = ", ".join(_f(b, pct=True) for b in shift["busy_after_load_by_backend"])
            console.print(f"[dim]{name}: load finished {shift['load_done_s']} s after the "
                          f"shift; busy after it by backend: {busy or '–'}[/]")
    console.print(g)
