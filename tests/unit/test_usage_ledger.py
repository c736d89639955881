"""The ledger's sums (what counts as a request, a refusal, an error; the UTC day) and
the report's grouping and parameter checks."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest

from corral.usage.ledger import Ledger, refusal_cause
from corral.usage.redis import RedisUsageStore
from corral.usage.report import QueryError, group, parse_query, totals
from corral.usage.sqlite import SqliteUsageStore
from corral.usage.store import Usage, UsageKey

MIDNIGHT = dt.datetime(2026, 12, 2, tzinfo=dt.UTC).timestamp()


def rec(**kw: Any) -> dict[str, Any]:
    base = {"time": MIDNIGHT + 3600, "client": "10.0.0.1", "client_name": "alice",
            "tier": "basic", "method": "POST", "path": "/api/chat", "model": "llama3.2",
            "backend": "gpu0", "status": 200, "duration_ms": 100.0, "ttfb_ms": 20.0,
            "tokens_in": 10, "tokens_out": 30}
    return {**base, **kw}


async def _sums(tmp_path: Path, *recs: dict[str, Any]) -> dict[UsageKey, Usage]:
    ledger = Ledger(SqliteUsageStore(tmp_path / "u.sqlite3"), 1.0, 400,
                    clock=lambda: MIDNIGHT + 7200)
    for r in recs:
        ledger.record(r)
    await ledger.flush()
    kept = await ledger.store.query("2000-01-01", "2100-01-01")
    await ledger.store.close()
    return kept


async def test_requests_tokens_and_times_sum_per_client_model_tier_day(tmp_path: Path) -> None:
    kept = await _sums(tmp_path, rec(), rec(model="llama3.2:latest", tokens_out=5),
                       rec(client_name=None), rec(time=MIDNIGHT - 1),
                       rec(ttfb_ms=None, status=499, tokens_in=0, tokens_out=0))
    alice = kept[UsageKey("2026-12-02", "alice", "llama3.2:latest", "basic")]
    # "llama3.2" and "llama3.2:latest" are one model, as in Ollama.
    assert (alice.requests, alice.tokens_in, alice.tokens_out) == (3, 20, 35)
    assert (alice.total_ms, alice.first_byte_ms, alice.first_bytes) == (300.0, 40.0, 2)
    assert alice.errors == 0 and alice.refusals == {}        # 499: the client left
    assert kept[UsageKey("2026-12-02", "10.0.0.1", "llama3.2:latest", "basic")].requests == 1
    assert kept[UsageKey("2026-12-01", "alice", "llama3.2:latest", "basic")].requests == 1


async def test_models_the_fleet_lacks_are_summed_under_one_name(tmp_path: Path) -> None:
    fleet = {"llama3.2:latest"}
    ledger = Ledger(SqliteUsageStore(tmp_path / "u.sqlite3"), 1.0, 400,
                    clock=lambda: MIDNIGHT + 7200, known_model=fleet.__contains__)
    for i in range(1000):
        ledger.record(rec(model=f"made-up-{i}", status=404, tokens_in=0, tokens_out=0))
    ledger.record(rec(model="llama3.2"))
    ledger.record(rec(model=None, status=429, rule="per-ip", backend=None))
    assert ledger.pending() == 3
    await ledger.flush()
    kept = await ledger.store.query("2000-01-01", "2100-01-01")
    await ledger.store.close()
    assert {k.model: v.requests for k, v in kept.items()} == {
        "other": 1000, "llama3.2:latest": 1, "": 1}


async def test_refusals_by_rule_or_cause_and_upstream_errors(tmp_path: Path) -> None:
    kept = await _sums(
        tmp_path,
        rec(status=429, rule="per-key", limit="rejected", backend=None, tokens_out=0),
        rec(status=429, rule="per-key", limit="rejected", backend=None, tokens_out=0),
        rec(status=503, backend=None, error="queue is full", tokens_out=0),
        rec(status=401, limit="unauthorized", client_name=None, model=None),
        rec(status=403, limit="origin", client_name=None, model=None),
        rec(status=502, error="connection refused", tokens_out=0),
        rec(status=503, error="backend overloaded", tokens_out=0),   # the backend's own
        rec(method="OPTIONS", status=204, model=None),               # a preflight: not use
    )
    alice = kept[UsageKey("2026-12-02", "alice", "llama3.2:latest", "basic")]
    assert alice.refusals == {"per-key": 2, "queue": 1}
    assert alice.errors == 2 and alice.requests == 5
    anonymous = kept[UsageKey("2026-12-02", "10.0.0.1", "", "basic")]
    assert anonymous.refusals == {"unauthorized": 1, "origin": 1}
    assert anonymous.requests == 2                                   # the preflight is not one


def test_refusal_cause_names_the_rule_first() -> None:
    assert refusal_cause(rec(status=429, rule="r", limit="rejected")) == "r"
    assert refusal_cause(rec(status=503, backend=None, error="waited 120 s")) == "queue"
    assert refusal_cause(rec(status=503, error="from the backend")) is None


async def test_a_failed_flush_keeps_the_figures_for_the_next(tmp_path: Path) -> None:
    # A Redis that is not there: the batch stays in memory and is added to later sums.
    down = RedisUsageStore.from_url("redis://127.0.0.1:1/0", timeout_s=0.5)
    ledger = Ledger(down, 1.0, 400, clock=lambda: MIDNIGHT)
    ledger.record(rec())
    await ledger.flush()
    assert ledger.errors == 1 and ledger.pending() == 1 and ledger.last_error
    ledger.record(rec(tokens_out=1))
    await down.close()
    ledger.store = SqliteUsageStore(tmp_path / "u.sqlite3")      # the store is back
    await ledger.flush()
    assert ledger.pending() == 0 and ledger.last_error is None
    kept = await ledger.store.query("2026-12-02", "2026-12-02")
    assert kept[UsageKey("2026-12-02", "alice", "llama3.2:latest", "basic")].tokens_out == 31
    await ledger.store.close()


async def test_retention_prunes_days_older_than_keep(tmp_path: Path) -> None:
    store = SqliteUsageStore(tmp_path / "u.sqlite3")
    await store.add({UsageKey("2026-11-01", "a", "m", "t"): Usage(requests=1),
                     UsageKey("2026-11-30", "a", "m", "t"): Usage(requests=1)})
    ledger = Ledger(store, 1.0, 10, clock=lambda: MIDNIGHT)
    await ledger.prune()
    assert [k.day for k in await store.query("2000-01-01", "2100-01-01")] == ["2026-11-30"]
    await store.close()


def test_parse_query_defaults_and_errors() -> None:
    today = dt.date(2026, 12, 2)
    q = parse_query({}, today)
    assert (q.first, q.last, q.by, q.client) == ("2026-11-26", "2026-12-02", ("client",), None)
    q = parse_query({"from": "2026-01-01", "to": "2026-01-31", "by": "day, model"}, today)
    assert (q.first, q.last, q.by) == ("2026-01-01", "2026-01-31", ("day", "model"))
    for params, message in (({"from": "01/02/2026"}, "from: '01/02/2026' is not a date"),
                            ({"by": "client,cost"}, "by: unknown field(s) 'cost'"),
                            ({"by": "day,day"}, "named twice"),
                            ({"from": "2026-12-03"}, "is after"),
                            ({"key": "x"}, "unknown parameter(s) key")):
        with pytest.raises(QueryError, match=re.escape(message)):
            parse_query(params, today)


def test_group_sums_over_the_fields_left_out() -> None:
    kept = {
        UsageKey("2026-12-01", "alice", "m1", "t"): Usage(requests=2, tokens_out=10,
                                                          refusals={"r": 1}),
        UsageKey("2026-12-02", "alice", "m2", "t"): Usage(requests=1, tokens_out=50,
                                                          total_ms=30.0),
        UsageKey("2026-12-02", "bob", "m1", "t"): Usage(requests=5, tokens_out=20),
    }
    by_client = group(kept, ("client",))
    assert [(r["client"], r["requests"], r["tokens_out"], r["refused"]) for r in by_client] \
        == [("alice", 3, 60, 1), ("bob", 5, 20, 0)]      # most tokens first
    assert by_client[0]["avg_ms"] == 15.0                  # over the two served
    by_day = group(kept, ("day", "model"))
    assert [(r["day"], r["model"]) for r in by_day] == [
        ("2026-12-01", "m1"), ("2026-12-02", "m2"), ("2026-12-02", "m1")]
    assert totals(kept)["requests"] == 8 and totals(kept)["refusals"] == {"r": 1}
