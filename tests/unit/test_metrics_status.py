"""Recent activity for /corral/status and the dashboard (pure: the clock is given)."""

from __future__ import annotations

from typing import Any

from corral.observe.status import (
    MAX_PENDING,
    MAX_REJECTIONS,
    Activity,
    client_id,
    clients_status,
    is_rejection,
)

QUEUE = {"high": 0, "normal": 0, "low": 0}


def rec(**kw: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"time": 100.0, "client": "10.0.0.1", "client_name": None,
                         "path": "/api/chat", "backend": "gpu0", "status": 200,
                         "ttfb_ms": 20.0, "tokens_in": 10, "tokens_out": 30}
    r.update(kw)
    return r


def test_client_id_is_the_key_name_else_the_ip() -> None:
    assert client_id(rec(client_name="alice")) == "alice"
    assert client_id(rec()) == "10.0.0.1"


def test_rejections_are_refusals_not_upstream_failures() -> None:
    assert is_rejection(rec(status=429, error="rate limited", rule="per-ip"))
    assert is_rejection(rec(status=401, backend=None, error="unauthorized"))
    assert is_rejection(rec(status=503, backend=None, error="the queue is full"))
    assert not is_rejection(rec(status=503, backend="gpu0", error="backend answered 503"))
    assert not is_rejection(rec(status=429))            # a backend's own 429, relayed
    assert not is_rejection(rec(status=200))
    # Limit state unavailable: no rule, but the refusal says why.
    assert is_rejection(rec(status=503, backend=None, limit="store_error"))


def test_one_sample_per_interval_with_rates() -> None:
    a = Activity()
    a.sample(0.0, 1000.0, QUEUE, {"gpu0": 0})
    for _ in range(4):
        a.add(rec())
    a.add(rec(ttfb_ms=40.0, backend="gpu1"))
    a.sample(2.0, 1002.0, {"high": 1, "normal": 2, "low": 0}, {"gpu0": 2, "gpu1": 1})
    s = a.series_json()
    assert s["t"] == [1000.0, 1002.0]
    assert s["requests_per_s"] == [0.0, 2.5]          # five requests over two seconds
    assert s["tokens_out_per_s"][-1] == 75.0
    assert s["ttfb_p50_ms"] == [None, 20.0]
    assert s["queue"][-1] == {"high": 1, "normal": 2, "low": 0}
    assert s["in_flight"][-1] == {"gpu0": 2, "gpu1": 1}
    assert a.totals == {"requests": 5, "errors": 0, "rejected": 0, "tokens_in": 50,
                        "tokens_out": 150}
    assert a.backend_recent["gpu0"] == {"requests": 4, "ttfb_p50_ms": 20.0}
    assert a.backend_recent["gpu1"] == {"requests": 1, "ttfb_p50_ms": 40.0}
    assert a.recent["requests"] == 5 and a.recent["ttfb_p50_ms"] == 20.0


def test_history_and_window_are_bounded() -> None:
    a = Activity(history=10, window=5.0)
    for second in range(30):
        a.add(rec())
        a.sample(float(second), 1000.0 + second, QUEUE, {})
    assert len(a.series_json()["t"]) == 10
    assert a.recent["requests"] == 5                    # only the last five seconds
    assert a.totals["requests"] == 30


def test_client_shares_over_the_window() -> None:
    a = Activity()
    a.add(rec(client_name="alice", tokens_in=100, tokens_out=200))
    a.add(rec(client="10.0.0.9", tokens_in=50, tokens_out=50))
    a.sample(1.0, 1001.0, QUEUE, {})
    clients = clients_status(a, {"alice": 321.5, "10.0.0.9": 100.0, "bob": 7.0},
                             waiting=["bob"])
    assert [c["name"] for c in clients] == ["alice", "10.0.0.9", "bob"]
    assert clients[0]["share"] == 0.75 and clients[0]["counter"] == 321.5
    assert clients[1]["share"] == 0.25
    # Waiting but not yet served: listed, so a starved client shows.
    assert clients[2] == {"name": "bob", "tokens": 0, "requests": 0, "share": 0.0,
                          "counter": 7.0}


def test_recent_rejections_newest_first_and_bounded() -> None:
    a = Activity()
    for i in range(MAX_REJECTIONS + 5):
        a.add(rec(time=float(i), status=429, rule="per-ip", error="too many requests"))
    a.add(rec(status=200))
    a.sample(1.0, 1001.0, QUEUE, {})
    assert len(a.rejections) == MAX_REJECTIONS
    newest = a.rejections[0]
    assert newest == {"time": float(MAX_REJECTIONS + 4), "client": "10.0.0.1",
                      "rule": "per-ip", "limit": None, "path": "/api/chat", "status": 429,
                      "error": "too many requests"}
    assert a.totals["rejected"] == MAX_REJECTIONS + 5


def test_adding_is_bounded_even_without_a_sampler() -> None:
    a = Activity()
    for _ in range(MAX_PENDING + 10):
        a.add(rec())
    a.sample(1.0, 1001.0, QUEUE, {})
    assert a.totals["requests"] == MAX_PENDING     # the oldest were dropped, not kept
