"""The usage ledger end to end: the figures equal what the requests did (tokens from
the stand-in's final chunks, refusals by rule, upstream errors), survive a restart,
sum across replicas on one Redis, and each key reads only its own."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

from tests.integration.conftest import Gateway
from tests.waiting import eventually

KEYS = [
    {"name": "alice", "key": "sk-alice", "tier": "premium"},
    {"name": "bob", "key": "sk-bob", "tier": "batch"},
    {"name": "ops", "key": "sk-ops", "admin": True},
]
TODAY = dt.datetime.now(dt.UTC).date().isoformat()


def _config(a: Any, b: Any, **extra: Any) -> dict[str, Any]:
    return {
        "backends": [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
        "keys": KEYS,
        "retry": {"tries": 1},
        "health": {"max_fails": 0},
        # bob may run one batch request a minute.
        "limits": [{"name": "batch-rate", "tiers": ["batch"], "rate": "1r/m"}],
        "usage": {"flush": "200ms"},
        **extra,
    }


async def _call(s: aiohttp.ClientSession, gw: Gateway, key: str | None, model: str,
                n: int) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with s.post(gw.url + "/api/chat", headers=headers, json={
            "model": model, "stream": False, "options": {"num_predict": n},
            "messages": [{"role": "user", "content": "tell me " * n}]}) as r:
        return r.status, await r.json()


async def _usage(s: aiohttp.ClientSession, gw: Gateway, key: str | None = "sk-ops",
                 query: str = "by=client,model") -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with s.get(f"{gw.url}/corral/usage?{query}", headers=headers) as r:
        return r.status, await r.json()


def _rows(body: dict[str, Any]) -> dict[tuple[str, ...], dict[str, Any]]:
    return {tuple(r[f] for f in body["by"]): r for r in body["rows"]}


async def _traffic(s: aiohttp.ClientSession, gw: Gateway, b: Any) -> dict[str, list[int]]:
    """Requests whose figures the test knows from the answers: tokens per client."""
    seen: dict[str, list[int]] = {"alice": [0, 0], "bob": [0, 0]}
    for n in (3, 5, 8):
        status, body = await _call(s, gw, "sk-alice", "llama3.2", n)
        assert status == 200
        seen["alice"][0] += body["prompt_eval_count"]
        seen["alice"][1] += body["eval_count"]
    status, body = await _call(s, gw, "sk-bob", "mistral:7b", 4)
    assert status == 200
    seen["bob"][0] += body["prompt_eval_count"]
    seen["bob"][1] += body["eval_count"]
    assert (await _call(s, gw, "sk-bob", "mistral:7b", 4))[0] == 429    # batch-rate
    assert (await _call(s, gw, "sk-bob", "mistral:7b", 4))[0] == 429
    b.fault("oom")                                                       # upstream 500
    assert (await _call(s, gw, "sk-alice", "mistral:7b", 2))[0] == 500
    b.fault("none")
    assert (await _call(s, gw, None, "llama3.2", 2))[0] == 200          # anonymous: its IP
    return seen


async def test_the_ledger_holds_what_the_requests_did(start_sim: Any, start_corral: Any,
                                                      tmp_path: Path) -> None:
    a = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--instant")
    b = start_sim("--models", "mistral:7b", "--loaded", "mistral:7b", "--instant")
    usage_file = tmp_path / "ledger" / "usage.sqlite3"
    config = _config(a, b, usage={"flush": "200ms", "path": str(usage_file)})
    gw = start_corral(config)
    async with aiohttp.ClientSession() as s:
        seen = await _traffic(s, gw, b)
        status, body = await _usage(s, gw)
        assert status == 200, body
        rows = _rows(body)
        alice = rows[("alice", "llama3.2:latest")]
        assert (alice["requests"], alice["tokens_in"], alice["tokens_out"]) == (
            3, *seen["alice"])
        assert alice["refused"] == 0 and alice["errors"] == 0
        assert alice["avg_ms"] is not None and alice["avg_first_byte_ms"] is not None
        failed = rows[("alice", "mistral:7b")]
        assert (failed["requests"], failed["errors"], failed["tokens_out"]) == (1, 1, 0)
        bob = rows[("bob", "mistral:7b")]
        assert (bob["requests"], bob["tokens_in"], bob["tokens_out"]) == (1, *seen["bob"])
        # Refused before their body was read (the rule names no models): no model.
        refused = rows[("bob", "")]
        assert refused["requests"] == 2 and refused["tokens_out"] == 0
        assert refused["refusals"] == {"batch-rate": 2} and refused["refused"] == 2
        anonymous = rows[("127.0.0.1", "llama3.2:latest")]
        assert anonymous["requests"] == 1
        assert body["totals"]["requests"] == 8 and body["totals"]["refused"] == 2

        # The status page and the metrics say where the ledger is and how it writes.
        ledger = gw.status()["usage"]
        assert ledger["store"] == f"sqlite:{usage_file}" and ledger["write_failures"] == 0
        assert ledger["writes"] >= 1
        async with s.get(gw.url + "/metrics") as r:
            metrics = await r.text()
        assert "corral_usage_write_failures_total 0.0" in metrics
        assert "corral_usage_pending_entries" in metrics

        # By tier and day.
        status, body = await _usage(s, gw, query="by=tier,day")
        assert status == 200
        assert _rows(body)[("premium", TODAY)]["requests"] == 4
        assert _rows(body)[("batch", TODAY)]["refusals"] == {"batch-rate": 2}

    # A restart keeps the figures (the last ones are written on the way out).
    gw.stop()
    assert usage_file.exists()
    again = start_corral(config)
    async with aiohttp.ClientSession() as s:
        status, body = await _usage(s, again)
        assert status == 200
        assert _rows(body)[("alice", "llama3.2:latest")]["tokens_out"] == seen["alice"][1]
        assert body["totals"]["requests"] == 8

    # corral usage, as an operator runs it: CSV for a spreadsheet, and a table.
    out = _cli("--url", again.url, "--key", "sk-ops", "--by", "client", "--csv").stdout
    table = {r["client"]: r for r in csv.DictReader(io.StringIO(out))}
    assert int(table["alice"]["tokens_out"]) == seen["alice"][1]
    assert table["bob"]["refusals"] == "batch-rate=2"
    out = _cli("--url", again.url, "--key", "sk-ops", "--by", "client,model").stdout
    assert "alice" in out and "mistral:7b" in out and "batch-rate=2" in out
    denied = _cli("--url", again.url, "--key", "sk-bob", "--client", "alice")
    assert denied.returncode == 1 and "403" in denied.stderr


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral", "usage", *args],
                          capture_output=True, text=True, timeout=60)


async def test_each_key_reads_only_its_own_usage_and_bad_queries_say_why(
        start_sim: Any, start_corral: Any) -> None:
    a = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--instant")
    b = start_sim("--models", "mistral:7b", "--loaded", "mistral:7b", "--instant")
    gw = start_corral(_config(a, b))
    async with aiohttp.ClientSession() as s:
        await _traffic(s, gw, b)
        status, body = await _usage(s, gw, "sk-alice")
        assert status == 200 and body["client"] == "alice"
        assert {r["client"] for r in body["rows"]} == {"alice"}
        assert body["totals"]["requests"] == 4
        status, body = await _usage(s, gw, "sk-alice", "client=bob")
        assert status == 403 and "only its own" in body["error"]
        status, body = await _usage(s, gw, None)     # an admin key exists: no key, no view
        assert status == 401
        # Without a key, not even whether a query is well formed.
        status, body = await _usage(s, gw, None, "by=colour")
        assert status == 401
        status, body = await _usage(s, gw, "sk-ops", "client=bob")
        assert status == 200 and {r["client"] for r in body["rows"]} == {"bob"}
        for query, word in (("from=2026-02-30", "from: '2026-02-30' is not a date"),
                            ("to=yesterday", "to: 'yesterday' is not a date"),
                            ("by=client,colour", "by: unknown field(s) 'colour'"),
                            ("from=2026-12-09&to=2026-12-01", "is after"),
                            ("limit=3", "unknown parameter(s) limit")):
            status, body = await _usage(s, gw, "sk-ops", query)
            assert status == 400 and word in body["error"], (query, body)


async def test_two_replicas_on_one_redis_sum_into_one_ledger(
        start_sim: Any, start_corral: Any, start_redis: Any) -> None:
    redis = start_redis()
    a = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--instant")
    b = start_sim("--models", "mistral:7b", "--loaded", "mistral:7b", "--instant")
    config = _config(a, b, state=redis.url)
    one, two = start_corral(config), start_corral(config)
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(
            _call(s, gw, "sk-alice", "llama3.2", 4) for gw in (one, two) for _ in range(5)))
        assert all(status == 200 for status, _ in results)
        tokens = sum(body["eval_count"] for _, body in results)
        assert one.status()["usage"]["store"].startswith(f"redis:127.0.0.1:{redis.port}/0")

        async def alice_on(gw: Gateway) -> dict[str, Any] | None:
            status, body = await _usage(s, gw)
            assert status == 200
            row: dict[str, Any] | None = _rows(body).get(("alice", "llama3.2:latest"))
            return row if row is not None and row["requests"] == 10 else None

        # Each replica flushes its own counts: both replicas read the sum once both have.
        for gw in (one, two):
            alice = await eventually(partial(alice_on, gw),
                                     f"the ledger read through {gw.url} to count all ten")
            assert alice["tokens_out"] == tokens
