"""Python and Lua agree: the memory store, the Redis store and the pure functions
give identical decisions on random schedules over random zone parameters.

Each example builds its own stores (a fresh Redis key prefix) inside its own event
loop, so no function-scoped fixture is shared across hypothesis examples.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.limits.conn import ConnCall, ConnLease
from corral.limits.leaky import Node, ReqDecision, ReqZoneCall, ReqZoneParams, evaluate
from corral.limits.storage.base import LimitStore
from corral.limits.tokens import DAY_MS, MINUTE_MS, TokenBudget, TokenCall
from tests.contract.limit_store_support import LEASE_MS, FakeClock, make_store

pytestmark = pytest.mark.redis

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = ("alice", "bob")


class ReqModel:
    """The reference: evaluate() over a plain dict that never forgets a node."""

    def __init__(self) -> None:
        self.nodes: dict[tuple[str, str], Node] = {}

    def limit_req(self, calls: list[ReqZoneCall], now: int, dry_run: bool) -> ReqDecision:
        zones = [(c.params, self.nodes.get((c.zone, c.key))) for c in calls]
        decision = evaluate(zones, now, dry_run=dry_run)
        for call, node in zip(calls, decision.nodes, strict=False):
            self.nodes[(call.zone, call.key)] = node
        return decision


def run_with_stores(
    redis_url: str, clock: FakeClock, body: Callable[[LimitStore, LimitStore], Awaitable[None]]
) -> None:
    async def main() -> None:
        memory, redis = make_store("memory", clock), make_store(redis_url, clock)
        try:
            await body(memory, redis)
        finally:
            await redis.close()

    asyncio.run(main())


@st.composite
def zone_params(draw: st.DrawFn) -> ReqZoneParams:
    rate = draw(st.sampled_from(["1r/m", "7r/m", "10r/m", "1r/s", "3r/s", "10r/s", "1000r/s"]))
    burst = draw(st.integers(0, 5))
    mode = draw(st.sampled_from(["delay0", "delayN", "nodelay"]))
    if mode == "nodelay":
        return ReqZoneParams.from_config(rate, burst=burst, nodelay=True)
    delay = draw(st.integers(1, 6)) if mode == "delayN" else None
    return ReqZoneParams.from_config(rate, burst=burst, delay=delay)


# Mostly short gaps, sometimes a jump long enough for nodes to expire.
forward_gaps = st.integers(0, 4000) | st.sampled_from([59_999, 60_000, 700_000, 10**8])
# The clock may also step back, to exercise nginx's negative-ms rules in Lua.
any_gaps = forward_gaps | st.integers(-130_000, -1)


def req_steps(gaps: st.SearchStrategy[int]) -> st.SearchStrategy[list[tuple[int, int, int, bool]]]:
    # (gap, zone mask, key choice bits, dry run)
    return st.lists(
        st.tuples(gaps, st.integers(1, 7), st.integers(0, 7), st.booleans()),
        min_size=1,
        max_size=30,
    )


def calls_for(zones: list[ReqZoneParams], mask: int, keys: int) -> list[ReqZoneCall]:
    return [
        ReqZoneCall(f"z{i}", KEYS[(keys >> i) & 1], params)
        for i, params in enumerate(zones)
        if mask >> i & 1
    ] or [ReqZoneCall("z0", KEYS[0], zones[0])]


@SETTINGS
@given(zones=st.lists(zone_params(), min_size=1, max_size=3), steps=req_steps(forward_gaps))
def test_limit_req_memory_redis_and_pure_agree(
    redis_url: str, zones: list[ReqZoneParams], steps: list[tuple[int, int, int, bool]]
) -> None:
    clock, model = FakeClock(), ReqModel()

    async def body(memory: LimitStore, redis: LimitStore) -> None:
        for gap, mask, keys, dry_run in steps:
            clock.advance(gap)
            calls = calls_for(zones, mask, keys)
            expected = model.limit_req(calls, clock(), dry_run)
            assert await memory.limit_req(calls, dry_run=dry_run) == expected
            assert await redis.limit_req(calls, dry_run=dry_run) == expected

    run_with_stores(redis_url, clock, body)


@SETTINGS
@given(zones=st.lists(zone_params(), min_size=1, max_size=3), steps=req_steps(any_gaps))
def test_limit_req_lua_follows_negative_ms_rules(
    redis_url: str, zones: list[ReqZoneParams], steps: list[tuple[int, int, int, bool]]
) -> None:
    # The memory store assumes a monotonic clock, so only Lua meets a clock going back.
    clock, model = FakeClock(), ReqModel()

    async def body(_memory: LimitStore, redis: LimitStore) -> None:
        for gap, mask, keys, dry_run in steps:
            clock.advance(gap)
            calls = calls_for(zones, mask, keys)
            expected = model.limit_req(calls, clock(), dry_run)
            assert await redis.limit_req(calls, dry_run=dry_run) == expected

    run_with_stores(redis_url, clock, body)


conn_ops = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "acquire", "release", "refresh"]),
        st.integers(0, 3 * LEASE_MS // 2),  # time passing before the operation
        st.integers(1, 3),  # zone mask
        st.integers(0, 10),  # which lease to release or refresh
        st.booleans(),  # dry run
    ),
    min_size=1,
    max_size=40,
)


@SETTINGS
@given(limits=st.lists(st.integers(1, 3), min_size=2, max_size=2), ops=conn_ops)
def test_limit_conn_memory_and_redis_agree(
    redis_url: str, limits: list[int], ops: list[tuple[str, int, int, int, bool]]
) -> None:
    clock = FakeClock()
    gaps = [0, 1, LEASE_MS - 1, LEASE_MS]

    async def body(memory: LimitStore, redis: LimitStore) -> None:
        held: list[tuple[ConnLease, ConnLease]] = []
        for op, gap, mask, pick, dry_run in ops:
            clock.advance(gaps[gap % len(gaps)] if gap % 7 == 0 else gap % 50)
            if op == "acquire" or not held:
                calls = [ConnCall(f"c{i}", "k", n) for i, n in enumerate(limits) if mask >> i & 1]
                a = await memory.conn_acquire(calls, dry_run=dry_run)
                b = await redis.conn_acquire(calls, dry_run=dry_run)
                assert (a.status, a.zone_index, a.counts) == (b.status, b.zone_index, b.counts)
                assert (a.lease is None) == (b.lease is None)
                if a.lease is not None and b.lease is not None:
                    held.append((a.lease, b.lease))
            elif op == "refresh":
                la, lb = held[pick % len(held)]
                assert await memory.conn_refresh(la) == await redis.conn_refresh(lb)
            else:
                la, lb = held.pop(pick % len(held))
                await memory.conn_release(la)
                await redis.conn_release(lb)

    run_with_stores(redis_url, clock, body)


token_ops = st.lists(
    st.tuples(
        st.booleans(),  # check (True) or charge
        forward_gaps,
        st.integers(1, 3),  # budget mask
        st.integers(0, 3000),  # tokens charged
    ),
    min_size=1,
    max_size=40,
)


@SETTINGS
@given(
    budgets=st.lists(
        st.builds(TokenBudget, st.integers(1, 3000), st.sampled_from([MINUTE_MS, DAY_MS])),
        min_size=2,
        max_size=2,
    ),
    ops=token_ops,
)
def test_tokens_memory_and_redis_agree(
    redis_url: str, budgets: list[TokenBudget], ops: list[tuple[bool, int, int, int]]
) -> None:
    clock = FakeClock()

    async def body(memory: LimitStore, redis: LimitStore) -> None:
        for is_check, gap, mask, used in ops:
            clock.advance(gap)
            calls = [TokenCall(f"t{i}", "k", b) for i, b in enumerate(budgets) if mask >> i & 1]
            if is_check:
                assert await memory.tokens_check(calls) == await redis.tokens_check(calls)
            else:
                await memory.tokens_charge(calls, used)
                await redis.tokens_charge(calls, used)
        every = [TokenCall(f"t{i}", "k", b) for i, b in enumerate(budgets)]
        assert await memory.tokens_check(every) == await redis.tokens_check(every)

    run_with_stores(redis_url, clock, body)
