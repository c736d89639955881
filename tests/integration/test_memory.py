"""Memory stays bounded against hostile clients (a real Corral process, real sockets).

A flood of distinct client addresses (spoofed through ``X-Forwarded-For`` from a
trusted proxy) and of made-up model names must not grow the gateway for good:
per-IP limit state expires, fair-share counters of idle clients are forgotten, and
the usage ledger and metrics never key on a name the fleet lacks.

``CORRAL_MEMORY_FLOOD`` sets how many requests each flood sends: 20,000 in the suite
(about a minute on a busy two-core machine); the README gives the figures at 100,000.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from corral.usage.sqlite import SqliteUsageStore
from tests.integration.conftest import Gateway, backends

FLOOD = int(os.environ.get("CORRAL_MEMORY_FLOOD", "20000"))
CONCURRENCY = 16
MB = 1024 * 1024
# Resident growth allowed at any time, however many distinct clients have called.
MAX_GROWTH = 20 * MB
# What a second flood may add once the first one's state is forgotten: its memory is
# reused, not added to. (Python keeps freed small objects' arenas for reuse, so the
# first flood's peak does not all go back to the system.)
MAX_SECOND = 5 * MB

Body = Callable[[int], dict[str, Any]]


def rss(pid: int) -> int:
    """The process's resident set (``VmRSS``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


async def flood(url: str, n: int, body: Body, first_octet: int) -> dict[int, int]:
    """``n`` requests over ``CONCURRENCY`` keep-alive connections, each from its own
    address (``first_octet``.x.y.z, as a trusted proxy says); statuses counted."""
    statuses: dict[int, int] = {}
    numbers = iter(range(n))
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session:
        async def worker() -> None:
            for i in numbers:
                xff = f"{first_octet}.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
                async with session.post(url, json=body(i),
                                        headers={"X-Forwarded-For": xff}) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return statuses


def known(i: int) -> dict[str, Any]:
    return {"model": "llama3.2", "prompt": "hi", "stream": False,
            "options": {"num_predict": 1}}


def made_up(prefix: str) -> Body:
    return lambda i: {"model": f"{prefix}-{i}", "prompt": "hi"}


async def forgotten(gw: Gateway, timeout: float = 120.0) -> None:
    """Until no fair-share counter or limit key is held and the ledger is written."""
    deadline = time.monotonic() + timeout
    while True:
        st = await asyncio.to_thread(gw.status)
        held = st["remembered"]
        if (held["fair_share_clients"], held["limit_keys"], st["usage"]["pending"]) == (
                0, 0, 0):
            return
        assert time.monotonic() < deadline, f"still held after {timeout:g}s: {held}"
        await asyncio.sleep(0.2)


@pytest.mark.timeout(900)
async def test_a_flood_of_addresses_and_model_names_leaves_memory_bounded(
        start_sim: Any, start_corral: Any, tmp_path: Path) -> None:
    sim = start_sim("--instant", "--models", "llama3.2:latest")
    usage = tmp_path / "usage.sqlite3"
    gw: Gateway = start_corral({
        "backends": backends(sim, slots=4),
        "clients": {"trusted_proxies": ["127.0.0.1/32"]},
        "limits": [
            {"name": "per-ip", "key": "ip", "rate": "100r/s", "burst": 10,
             "nodelay": True},
            {"name": "conn-per-ip", "key": "ip", "max_concurrent": 4},
        ],
        "queue": {"forget_idle": "2s"},
        "usage": {"path": str(usage), "flush": "1s"},
        "access_log": "off",
    })
    pid = gw.proc.pid
    url = gw.url + "/api/generate"
    # Warm up every path the floods take, so the baseline holds their code and buffers.
    await flood(url, 2000, known, 9)
    await flood(url, 2000, made_up("warm-up"), 9)
    await forgotten(gw)
    base = rss(pid)

    seen = []
    for round_, octet in ((1, 10), (2, 11)):
        started = time.monotonic()
        assert await flood(url, FLOOD, known, octet) == {200: FLOOD}
        addresses = rss(pid) - base
        assert await flood(url, FLOOD, made_up(f"made-up-{round_}"), octet) == {404: FLOOD}
        models = rss(pid) - base
        took = time.monotonic() - started
        await forgotten(gw)
        left = rss(pid) - base
        seen.append(left)
        print(f"round {round_}: {FLOOD} addresses and {FLOOD} model names in {took:.0f}s; "
              f"RSS {base / MB:.1f} MB +{addresses / MB:.1f} +{models / MB:.1f}, "
              f"forgotten +{left / MB:.1f}")
        assert max(addresses, models, left) < MAX_GROWTH
    assert seen[1] - seen[0] < MAX_SECOND

    # Made-up names are one label: no metric series or ledger row per name.
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/metrics") as r:
            assert "made-up" not in await r.text()
    store = SqliteUsageStore(str(usage))
    try:
        rows = await store.query("2000-01-01", "2100-01-01")
    finally:
        await store.close()
    assert {k.model for k in rows} == {"llama3.2:latest", "other"}
    assert sum(u.requests for k, u in rows.items() if k.model == "other") == 2000 + 2 * FLOOD
