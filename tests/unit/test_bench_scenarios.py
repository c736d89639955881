"""How ``corral bench scheduler`` judges a run (pure: samples and polls in, figures out)."""

from __future__ import annotations

import pytest

from corral.bench.scenarios import (
    SCENARIOS,
    Client,
    Poll,
    Sample,
    Scenario,
    busy_between,
    delivered_in,
    first_load_done,
    judge,
    loads_between,
    summarize,
)

SC = Scenario("t", "test", clients=(Client("p", "k", "m", (10, 10), interactive=True),),
              backends=2, slots=2, tps=100.0, duration=11.0, warmup=1.0,
              goals={"p95_s": 0.2, "utilisation": 0.9, "useful": 0.5, "loads": 0})


def _polls(busy_per_s: float, loads_at: float | None = None) -> list[Poll]:
    out = []
    for b in range(2):
        for i in range(0, 23):
            t = i * 0.5
            loads = 1 if b == 1 and loads_at is not None and t >= loads_at else 0
            out.append(Poll(t, b, busy_per_s * t, loads))
    return out


def test_delivered_tokens_count_only_what_was_made_inside_the_window() -> None:
    whole = Sample("p", True, 2.0, 3.0, 0.01, 200, True, 100, gen_s=1.0)
    assert delivered_in(whole, 1.0, 11.0) == 100
    straddling = Sample("p", True, 0.2, 1.5, 0.01, 200, True, 100, gen_s=1.0)
    assert delivered_in(straddling, 1.0, 11.0) == pytest.approx(50)
    failed = Sample("p", True, 2.0, 3.0, 0.01, 500, False, 0)
    assert delivered_in(failed, 1.0, 11.0) == 0


def test_busy_and_loads_from_polls() -> None:
    polls = _polls(2.0, loads_at=5.0)
    assert busy_between(polls, 0, 1.0, 11.0) == pytest.approx(20.0)
    assert loads_between(polls, -1.0, 4.0) == 0 and loads_between(polls, 4.0, 99.0) == 1
    assert first_load_done(polls, 3.0) == 5.0
    assert first_load_done(polls, 6.0) is None


def test_summary_and_goals() -> None:
    samples = [Sample("p", True, 1.0 + i, 1.0 + i + (0.1 if i < 9 else 0.3), 0.01, 200, True,
                      10, gen_s=0.1) for i in range(10)]
    result = summarize(SC, samples, _polls(2.0), ideal=0.1)
    i = result["interactive"]
    assert i["complete"] == 10 and i["p95_s"] == pytest.approx(0.3)
    assert i["p95_over_ideal"] == pytest.approx(3.0)
    assert result["utilisation"] == pytest.approx(1.0)          # 2 slots × 2 backends
    assert result["useful"] == pytest.approx(100 / (4 * 10 * 100))
    goals = judge(SC, result)
    assert goals["p95_s"]["met"] is False and goals["utilisation"]["met"] is True
    assert goals["useful"]["met"] is False and goals["loads"]["met"] is True


def test_shift_goals() -> None:
    sc = SCENARIOS["shift"]
    polls = [Poll(t / 2, b, (t / 2) * 2.0, 1 if b == 1 and t / 2 >= 11 else 0)
             for b in range(2) for t in range(0, 57)]
    result = summarize(sc, [], polls, ideal=0.25)
    shift = result["shift"]
    assert shift["loads_before_shift"] == 0 and shift["loads_after_shift"] == 1
    assert shift["load_done_s"] == pytest.approx(3.0)
    assert shift["busy_after_load_by_backend"] == [pytest.approx(1.0), pytest.approx(1.0)]
    goals = judge(sc, result)
    assert goals["loads_after_shift"]["met"] and goals["busy_after_load"]["met"]


def test_every_scenario_is_well_formed() -> None:
    assert set(SCENARIOS) == {"noisy", "priority", "preemption", "residency", "shift"}
    for sc in SCENARIOS.values():
        assert len(sc.resident) == sc.backends
        assert any(c.interactive for c in sc.clients)
        assert all(c.model in sc.models for c in sc.clients)
