"""A thousand clients at once through Corral in front of two stand-in backends.

Everything arrives within about a second: far more than the two backends' eight slots
and the queue's bound can hold, and two greedy clients far over their rate limit. Every
request must still get a proper answer — a complete stream, a 429 from the limit or a
503 from the full queue — and nothing may be lost, hung, leaked or logged twice.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.integration.conftest import Gateway, Sim, backends
from tests.waiting import wait_until

CLIENTS = 1000
GREEDY = ("greedy-a", "greedy-b")     # each sends GREEDY_EACH requests under one name
GREEDY_EACH = 50
SLOTS = 4
SIM_ARGS = ("--models", "llama3.2:latest", "--loaded", "llama3.2:latest",
            "--tps", "200", "--parallel", str(SLOTS))
BODY = {"model": "llama3.2", "prompt": "hello", "options": {"num_predict": 10}}
OVERALL_TIMEOUT = 90.0


@dataclass
class Outcome:
    status: int = 0
    retry_after: str | None = None
    content_type: str = ""
    lines: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None      # a transport failure: the request was lost


def raise_fd_limit(need: int = 8192) -> None:
    """1000 client sockets here plus 1000 accepted and a few upstream ones in Corral:
    children inherit the soft limit, so raise it before anything starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def client_name(i: int) -> str:
    if i < len(GREEDY) * GREEDY_EACH:
        return GREEDY[i % len(GREEDY)]
    return f"client-{i}"


async def one(s: aiohttp.ClientSession, url: str, i: int, go: asyncio.Event) -> Outcome:
    out = Outcome()
    await go.wait()
    try:
        async with s.post(url + "/api/generate", json={**BODY, "prompt": f"hello {i}"},
                          headers={"X-Client": client_name(i)}) as r:
            out.status = r.status
            out.retry_after = r.headers.get("Retry-After")
            out.content_type = r.headers.get("Content-Type", "")
            async for raw in r.content:
                if raw.strip():
                    out.lines.append(json.loads(raw))
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        out.error = repr(exc)
    return out


def wait_for_records(gw: Gateway, n: int) -> list[dict[str, Any]]:
    """At least ``n`` access-log records of generate requests, once they are written."""
    recs: list[dict[str, Any]] = []

    def enough() -> bool:
        recs[:] = [r for r in gw.records() if r.get("path") == "/api/generate"]
        return len(recs) >= n

    wait_until(enough, lambda: f"{n} access-log records (there are {len(recs)})")
    return recs


def wait_idle(gw: Gateway) -> dict[str, Any]:
    """Corral's status once nothing waits in its queue or runs at its backends."""
    def idle() -> dict[str, Any] | None:
        st: dict[str, Any] = gw.status()
        empty = st["queue"]["depth"] == 0 and all(b["in_flight"] == 0 for b in st["backends"])
        return st if empty else None

    return wait_until(idle, "Corral's queue to empty and its backends to finish")


async def test_thousand_concurrent_clients(start_sim: Any, start_corral: Any) -> None:
    raise_fd_limit()
    a: Sim = start_sim(*SIM_ARGS)
    b: Sim = start_sim(*SIM_ARGS)
    gw: Gateway = start_corral({
        "backends": backends(a, b, slots=SLOTS),
        "queue": {"max_depth": 300, "max_wait": "10s"},
        "limits": [
            # Per named client: the greedy two run far over it, everyone else sends one.
            {"name": "per-client", "paths": ["/api/generate"], "key": "header:X-Client",
             "rate": "5r/s", "burst": 10, "nodelay": True},
        ],
        "health": {"interval": "30s"},
    })
    a.reset()
    b.reset()

    go = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:
        tasks = [asyncio.create_task(one(s, gw.url, i, go)) for i in range(CLIENTS)]
        await asyncio.sleep(0)
        t0 = time.monotonic()
        go.set()
        # Nothing may hang: every request is answered well within this bound.
        async with asyncio.timeout(OVERALL_TIMEOUT):
            outcomes = await asyncio.gather(*tasks)
        wall = time.monotonic() - t0

    by_status = Counter(o.status for o in outcomes)
    lost = [o.error for o in outcomes if o.error is not None]
    stats_a, stats_b = a.stats(), b.stats()
    print(f"\nload: {CLIENTS} clients in {wall:.1f}s; by status {dict(sorted(by_status.items()))}"
          f"; lost {len(lost)}; max_concurrent b0={stats_a['max_concurrent']} "
          f"b1={stats_b['max_concurrent']}; completed b0={stats_a['completed']} "
          f"b1={stats_b['completed']}")

    # Every request answered, none lost.
    assert not lost, f"{len(lost)} requests lost, e.g. {lost[:3]}"
    assert set(by_status) <= {200, 429, 503}, by_status
    assert sum(by_status.values()) == CLIENTS
    assert by_status[200] > 0 and by_status[429] > 0

    for o in outcomes:
        if o.status == 200:
            # A complete stream: token lines, then exactly one final done line.
            assert o.lines, "an empty 200 stream"
            assert o.lines[-1].get("done") is True, o.lines[-1]
            assert all(line.get("done") is False for line in o.lines[:-1])
            assert not any("error" in line for line in o.lines)
        else:
            assert o.retry_after is not None and o.retry_after.isdigit(), o
            assert int(o.retry_after) >= 1
            assert o.content_type.startswith("application/json"), o.content_type
            assert len(o.lines) == 1 and set(o.lines[0]) == {"error"}, o.lines
            assert isinstance(o.lines[0]["error"], str) and o.lines[0]["error"]

    # Only the greedy clients can be rate limited; each got at least its burst.
    limited = Counter(client_name(i) for i, o in enumerate(outcomes) if o.status == 429)
    assert set(limited) <= set(GREEDY), limited
    for name in GREEDY:
        served = sum(1 for i, o in enumerate(outcomes)
                     if client_name(i) == name and o.status != 429)
        assert served >= 11, (name, served)

    # The slot cap held on both backends, and every admitted stream ran exactly once.
    assert stats_a["max_concurrent"] <= SLOTS, stats_a
    assert stats_b["max_concurrent"] <= SLOTS, stats_b
    assert stats_a["completed"] + stats_b["completed"] == by_status[200]
    assert stats_a["cancelled"] + stats_b["cancelled"] == 0

    # Nothing left behind in Corral.
    st = wait_idle(gw)
    assert st["queue"]["depth"] == 0, st["queue"]
    assert [bk["in_flight"] for bk in st["backends"]] == [0, 0], st["backends"]

    # Exactly one access-log record per request, with the status the client saw.
    recs = wait_for_records(gw, CLIENTS)
    assert len(recs) == CLIENTS, f"{len(recs)} access-log records for {CLIENTS} requests"
    assert Counter(r["status"] for r in recs) == by_status
