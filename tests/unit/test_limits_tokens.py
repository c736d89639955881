"""Token budgets: token buckets checked before and charged after, pure."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.limits.status import LimitStatus
from corral.limits.tokens import (
    DAY_MS,
    MAX_BUDGET,
    MINUTE_MS,
    UNITS_PER_TOKEN,
    Bucket,
    TokenBudget,
    TokenCall,
    charge,
    check,
    expires_at_ms,
    refill,
)

T0 = 1_000_000
PER_MIN = TokenBudget.per_minute(600)  # 10 tokens a second


def test_budget_validation() -> None:
    assert TokenBudget.per_day(5).window_ms == DAY_MS
    assert TokenBudget.per_minute(5).tick_ms == 1
    assert TokenBudget.per_day(5).tick_ms == 1440
    for bad in (0, -1, MAX_BUDGET + 1):
        with pytest.raises(ValueError, match="budget"):
            TokenBudget(bad)
    with pytest.raises(ValueError, match="window"):
        TokenBudget(10, 1000)
    with pytest.raises(ValueError, match="empty key"):
        TokenCall("z", "", PER_MIN)


def test_new_key_is_full_and_check_consumes_nothing() -> None:
    decision = check([(PER_MIN, None)], T0)
    assert decision.status is LimitStatus.PASSED
    assert decision.remaining == (600,)
    assert refill(None, PER_MIN, T0) == Bucket(PER_MIN.capacity, T0)


def test_overrun_is_charged_in_full_and_the_debt_delays_admission() -> None:
    bucket = charge(None, PER_MIN, 1000, T0)  # 400 tokens over budget
    assert bucket == Bucket(-400 * UNITS_PER_TOKEN, T0)
    decision = check([(PER_MIN, bucket)], T0)
    assert decision.rejected
    assert decision.remaining == (-400,)
    # 400 tokens of debt at 10 tokens/s: 40 s, plus one unit to be positive
    assert decision.retry_after_ms == 40_001
    assert check([(PER_MIN, bucket)], T0 + 40_000).rejected  # exactly empty: refused
    assert not check([(PER_MIN, bucket)], T0 + 40_001).rejected


def test_refill_is_continuous_and_capped() -> None:
    bucket = charge(None, PER_MIN, 600, T0)
    assert refill(bucket, PER_MIN, T0 + 1) == Bucket(600, T0 + 1)  # 1/100 token
    assert check([(PER_MIN, bucket)], T0 + 6_000).remaining == (60,)
    assert refill(bucket, PER_MIN, T0 + 10**9) == Bucket(PER_MIN.capacity, T0 + 10**9)


def test_clock_behind_earns_nothing() -> None:
    bucket = Bucket(-5, T0)
    assert refill(bucket, PER_MIN, T0 - 10_000) == bucket


def test_day_budget_ticks_every_1440_ms_without_losing_fractions() -> None:
    day = TokenBudget.per_day(60_000)  # one token per 1440 ms tick
    bucket = charge(None, day, 60_000, T0)
    assert refill(bucket, day, T0 + 1439) == Bucket(0, T0)
    assert refill(bucket, day, T0 + 1440 * 3 + 7) == Bucket(3 * 60_000, T0 + 1440 * 3)
    assert check([(day, bucket)], T0 + 5).retry_after_ms == 1435


def test_first_exhausted_budget_rejects_and_retry_is_the_latest() -> None:
    minute_empty = charge(None, PER_MIN, 610, T0)  # 10 tokens of debt: about 1 s
    day = TokenBudget.per_day(100)
    day_empty = charge(None, day, 101, T0)  # 1 token of debt: 100 units per 1440 ms tick
    decision = check([(PER_MIN, None), (PER_MIN, minute_empty), (day, day_empty)], T0)
    assert decision.zone_index == 1
    # the day bucket needs 60001 units, i.e. 601 ticks
    assert decision.retry_after_ms == 601 * 1440
    assert decision.remaining == (600, -10, -1)


def test_dry_run_reports_but_admits() -> None:
    decision = check([(PER_MIN, Bucket(0, T0))], T0, dry_run=True)
    assert decision.status is LimitStatus.REJECTED_DRY_RUN
    assert not decision.rejected


def test_negative_charge_refused() -> None:
    with pytest.raises(ValueError):
        charge(None, PER_MIN, -1, T0)


budgets = st.builds(
    TokenBudget, st.integers(1, 5000), st.sampled_from([MINUTE_MS, 10 * MINUTE_MS, DAY_MS])
)
buckets = st.builds(Bucket, st.integers(-(10**9), 10**9), st.integers(T0 - 10**6, T0))


@settings(max_examples=300)
@given(budgets, buckets)
def test_retry_after_is_exact(budget: TokenBudget, stored: Bucket) -> None:
    bucket = Bucket(min(stored.level, budget.capacity), stored.last_ms)
    decision = check([(budget, bucket)], T0)
    if decision.zone_index is None:
        return
    wait = decision.retry_after_ms
    assert wait >= 1
    assert check([(budget, bucket)], T0 + wait - 1).zone_index is not None
    assert check([(budget, bucket)], T0 + wait).zone_index is None


@settings(max_examples=300)
@given(budgets, buckets, st.integers(0, 10**6))
def test_full_bucket_is_indistinguishable_from_a_new_key(
    budget: TokenBudget, stored: Bucket, later: int
) -> None:
    bucket = Bucket(min(stored.level, budget.capacity), stored.last_ms)
    at = max(expires_at_ms(bucket, budget), bucket.last_ms) + later
    assert refill(bucket, budget, at) == refill(None, budget, at)


@settings(max_examples=200)
@given(budgets, st.lists(st.tuples(st.integers(0, 30_000), st.integers(0, 3000)), max_size=60))
def test_admitted_usage_is_bounded_by_budget_refill_and_one_overrun(
    budget: TokenBudget, schedule: list[tuple[int, int]]
) -> None:
    """Sequential check-then-charge: a key spends at most a full bucket, what refilled
    meanwhile, and the overrun of its last admitted request."""
    bucket: Bucket | None = None
    now, spent, biggest = T0, 0, 0
    for gap, used in schedule:
        now += gap
        if check([(budget, bucket)], now).zone_index is None:
            bucket = charge(bucket, budget, used, now)
            spent += used
            biggest = max(biggest, used)
    earned = (now - T0) // budget.tick_ms * budget.tokens
    assert spent * UNITS_PER_TOKEN <= budget.capacity + earned + biggest * UNITS_PER_TOKEN
