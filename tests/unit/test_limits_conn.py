"""nginx limit_conn semantics and leases, pure."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.limits.conn import (
    ConnCall,
    ConnDecision,
    accountable_key,
    acquire,
    live_holders,
    release,
)
from corral.limits.status import LimitStatus


def test_passes_below_the_limit_and_counts_in_every_zone() -> None:
    decision = acquire([0, 4], [1, 5])
    assert decision == ConnDecision(LimitStatus.PASSED, None, (1, 5))
    assert not decision.rejected


def test_rejects_at_the_limit_and_counts_nowhere() -> None:
    # nginx increments zone 0, finds zone 1 full and undoes zone 0's increment:
    # the counts reported are the ones found, unchanged.
    decision = acquire([0, 2, 9], [5, 2, 1])
    assert decision.status is LimitStatus.REJECTED
    assert decision.zone_index == 1
    assert decision.counts == (0, 2, 9)
    assert decision.lease is None


def test_dry_run_reject_lets_the_request_through_uncounted() -> None:
    decision = acquire([3], [3], dry_run=True)
    assert decision.status is LimitStatus.REJECTED_DRY_RUN
    assert not decision.rejected
    assert decision.counts == (3,)


def test_no_zone_passes() -> None:
    assert acquire([], []).status is LimitStatus.PASSED


def test_lease_expiring_now_has_lapsed() -> None:
    holders = {"a": 100, "b": 101, "c": 99}
    assert live_holders(holders, 100) == {"b": 101}


def test_release_removes_one_holder_and_deletes_at_zero() -> None:
    assert release({"a": 1, "b": 2}, "a") == {"b": 2}
    assert release({"a": 1}, "a") is None
    assert release({"a": 1}, "zzz") == {"a": 1}  # unknown holder: nothing to give back


@pytest.mark.parametrize("limit", [0, 65536, -1])
def test_limit_range(limit: int) -> None:
    with pytest.raises(ValueError, match="limit"):
        ConnCall("z", "k", limit)


def test_keys_nginx_does_not_count() -> None:
    assert not accountable_key("")
    assert not accountable_key("é" * 128)  # 256 bytes
    assert accountable_key("x" * 255)
    with pytest.raises(ValueError, match="drop the zone"):
        ConnCall("z", "", 1)


@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=3),
    st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=80),
)
def test_counts_never_exceed_limits(limits: list[int], ops: list[tuple[bool, int]]) -> None:
    """A model of acquire/release sequences: no zone ever holds more than its limit,
    and a refused request leaves every count as it was."""
    counts = [0] * len(limits)
    held: list[int] = []
    for is_acquire, pick in ops:
        if is_acquire or not held:
            decision = acquire(counts, limits)
            if decision.zone_index is None:
                counts = list(decision.counts)
                held.append(pick)
            else:
                assert list(decision.counts) == counts
        else:
            held.pop(pick % len(held))
            counts = [c - 1 for c in counts]
        assert all(c <= limit for c, limit in zip(counts, limits, strict=True))
        assert all(c == len(held) for c in counts)
