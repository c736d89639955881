"""Token budgets (``tokens_per_minute``, ``tokens_per_day``) as token buckets, pure.

A request's token count is only known once it has run, so a budget works in two
steps: **check** before admission (refuse while the bucket is empty or in debt;
nothing is consumed) and **charge** after the response with the actual count.
The charge is taken in full even when it drives the bucket negative: an
overrunning request is not forgiven, its debt delays the key's next admission.
Requests admitted together all see the same positive level, so a burst of
concurrent requests can overshoot; the overshoot becomes debt (pair a budget with
``limit_conn`` to bound it).

Bucket: capacity = the budget, refilled continuously at budget per window. The day
budget is the same bucket with a one-day window rather than a calendar day that
resets at midnight: no cliff where two days of budget can be spent within minutes,
no time zone to configure, and one code path and one Lua script for both. The
price: after exhausting it a client gets budget back gradually (1/24 per hour),
not all at once the next morning.

Integer arithmetic only, so Python and Lua agree to the unit: a level is counted
in 1/60000 of a token and every window is split into 60000 ticks; each elapsed
tick adds ``budget`` units (a minute ticks every 1 ms, a day every 1440 ms).
``last`` advances by whole ticks, so no fraction is ever lost to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from corral.limits.status import LimitStatus, rejected_status

TICKS_PER_WINDOW: Final = 60_000
UNITS_PER_TOKEN: Final = TICKS_PER_WINDOW
MINUTE_MS: Final = 60_000
DAY_MS: Final = 86_400_000
# Lua numbers are doubles: every level must stay an exact integer below 2**53.
MAX_BUDGET: Final = 2**53 // UNITS_PER_TOKEN // 2


@dataclass(frozen=True, slots=True)
class TokenBudget:
    tokens: int
    window_ms: int = MINUTE_MS

    def __post_init__(self) -> None:
        if not 0 < self.tokens <= MAX_BUDGET:
            raise ValueError(f"token budget must be 1..{MAX_BUDGET}, got {self.tokens}")
        if self.window_ms <= 0 or self.window_ms % TICKS_PER_WINDOW:
            raise ValueError(
                f"window must be a positive multiple of {TICKS_PER_WINDOW} ms, got {self.window_ms}"
            )

    @classmethod
    def per_minute(cls, tokens: int) -> TokenBudget:
        return cls(tokens, MINUTE_MS)

    @classmethod
    def per_day(cls, tokens: int) -> TokenBudget:
        return cls(tokens, DAY_MS)

    @property
    def capacity(self) -> int:
        return self.tokens * UNITS_PER_TOKEN

    @property
    def tick_ms(self) -> int:
        return self.window_ms // TICKS_PER_WINDOW


@dataclass(frozen=True, slots=True)
class Bucket:
    """``level`` in 1/60000 token (negative while in debt); ``last_ms`` the last tick seen."""

    level: int
    last_ms: int


@dataclass(frozen=True, slots=True)
class TokenCall:
    """One budget applied to one request."""

    zone: str
    key: str
    budget: TokenBudget

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError(f"zone {self.zone!r}: empty key; drop the zone instead")


@dataclass(frozen=True, slots=True)
class TokenDecision:
    """``remaining`` per zone in whole tokens (floor; negative while in debt)."""

    status: LimitStatus
    zone_index: int | None = None
    remaining: tuple[int, ...] = ()
    retry_after_ms: int = 0

    @property
    def rejected(self) -> bool:
        return self.status is LimitStatus.REJECTED


def refill(bucket: Bucket | None, budget: TokenBudget, now_ms: int) -> Bucket:
    """The bucket as of ``now_ms``; a missing bucket is a full one."""
    if bucket is None:
        return Bucket(budget.capacity, now_ms)
    elapsed = now_ms - bucket.last_ms
    if elapsed < 0:
        return bucket  # the clock went back: nothing has been earned yet
    ticks = elapsed // budget.tick_ms
    level = bucket.level + ticks * budget.tokens
    if level >= budget.capacity:
        # A full bucket forgets its tick phase, which makes it identical to a
        # missing one and lets a store expire it unobservably.
        return Bucket(budget.capacity, now_ms)
    return Bucket(level, bucket.last_ms + ticks * budget.tick_ms)


def until_positive_ms(bucket: Bucket, budget: TokenBudget, now_ms: int) -> int:
    """For a refilled bucket: how long until it is positive again (0 if it is)."""
    if bucket.level > 0:
        return 0
    ticks = -(-(1 - bucket.level) // budget.tokens)
    return bucket.last_ms + ticks * budget.tick_ms - now_ms


def check(
    zones: Sequence[tuple[TokenBudget, Bucket | None]], now_ms: int, *, dry_run: bool = False
) -> TokenDecision:
    """Admit unless some bucket is empty or in debt; changes no state."""
    remaining: list[int] = []
    busy_index: int | None = None
    retry = 0
    for index, (budget, stored) in enumerate(zones):
        bucket = refill(stored, budget, now_ms)
        remaining.append(bucket.level // UNITS_PER_TOKEN)
        if bucket.level <= 0:
            if busy_index is None:
                busy_index = index
            # Other buckets stay positive without new charges, so the wait is the
            # latest of the exhausted ones.
            retry = max(retry, until_positive_ms(bucket, budget, now_ms))
    if busy_index is None:
        return TokenDecision(LimitStatus.PASSED, None, tuple(remaining))
    return TokenDecision(rejected_status(dry_run), busy_index, tuple(remaining), retry)


def charge(bucket: Bucket | None, budget: TokenBudget, tokens: int, now_ms: int) -> Bucket:
    """Take ``tokens`` in full, into debt if need be."""
    if not 0 <= tokens <= MAX_BUDGET:
        raise ValueError(f"token count must be 0..{MAX_BUDGET}, got {tokens}")
    current = refill(bucket, budget, now_ms)
    return Bucket(current.level - tokens * UNITS_PER_TOKEN, current.last_ms)


def expires_at_ms(bucket: Bucket, budget: TokenBudget) -> int:
    """When the bucket is full again, hence indistinguishable from a missing one."""
    missing = budget.capacity - bucket.level
    if missing <= 0:
        return bucket.last_ms
    return bucket.last_ms + -(-missing // budget.tokens) * budget.tick_ms
