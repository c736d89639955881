"""Passive health: max_fails within fail_timeout open the breaker; one trial after."""

from corral.backends.breaker import Breaker, BreakerState


def test_opens_after_max_fails_within_window() -> None:
    b = Breaker(max_fails=3, fail_timeout=30)
    assert not b.on_failure(0) and not b.on_failure(10)
    assert b.on_failure(20)
    assert b.state is BreakerState.OPEN and not b.available(25)


def test_old_failures_age_out() -> None:
    b = Breaker(max_fails=3, fail_timeout=30)
    b.on_failure(0)
    b.on_failure(10)
    assert not b.on_failure(41)          # the first two are older than 30 s
    assert b.state is BreakerState.CLOSED


def test_one_trial_after_timeout_then_close_or_reopen() -> None:
    b = Breaker(max_fails=1, fail_timeout=10)
    b.on_failure(0)
    assert not b.available(9.9)
    assert b.available(10)
    b.on_dispatch(10)
    assert b.state is BreakerState.HALF_OPEN and not b.available(10)   # only one trial
    b.on_success()
    assert b.state is BreakerState.CLOSED and b.available(10)
    b.on_failure(20)
    b.on_dispatch(30)
    assert b.on_failure(31)              # the trial failed: open for another 10 s
    assert not b.available(40) and b.available(41.5)


def test_abandoned_trial_allows_another() -> None:
    b = Breaker(max_fails=1, fail_timeout=5)
    b.on_failure(0)
    b.on_dispatch(6)
    b.on_abandon()
    assert b.available(6)


def test_max_fails_zero_disables() -> None:
    b = Breaker(max_fails=0)
    for t in range(100):
        b.on_failure(t)
    assert b.available(100)


def test_retry_after() -> None:
    b = Breaker(max_fails=1, fail_timeout=30)
    b.on_failure(100)
    assert b.retry_after(110) == 20
