"""The LimitStore contract: the same tests against the memory and the Redis store."""

from __future__ import annotations

import pytest

from corral.limits.conn import ConnCall
from corral.limits.leaky import ReqZoneCall, ReqZoneParams
from corral.limits.status import LimitStatus
from corral.limits.storage.base import LimitStore
from corral.limits.tokens import TokenBudget, TokenCall
from tests.contract.limit_store_support import LEASE_MS, FakeClock


def req(zone: str, key: str, rate: str, **line: int | bool) -> ReqZoneCall:
    burst = int(line.get("burst", 0))
    delay = line.get("delay")
    nodelay = bool(line.get("nodelay", False))
    params = ReqZoneParams.from_config(
        rate, burst=burst, delay=None if delay is None else int(delay), nodelay=nodelay
    )
    return ReqZoneCall(zone, key, params)


# --- limit_req -----------------------------------------------------------------------


async def test_burst_5_seven_requests_in_one_ms(store: LimitStore) -> None:
    call = req("api", "1.2.3.4", "1r/s", burst=5)
    decisions = [await store.limit_req([call]) for _ in range(7)]
    assert [d.delay_ms for d in decisions[:6]] == [0, 1000, 2000, 3000, 4000, 5000]
    assert decisions[6].rejected
    assert decisions[6].zone_index == 0
    assert decisions[6].excess == (6000,)
    assert decisions[6].retry_after_ms == 1000


async def test_nodelay_and_delay(store: LimitStore) -> None:
    nodelay = req("a", "k", "1r/s", burst=5, nodelay=True)
    assert [(await store.limit_req([nodelay])).delay_ms for _ in range(6)] == [0] * 6
    assert (await store.limit_req([nodelay])).rejected
    two = req("b", "k", "1r/s", burst=5, delay=2)
    delays = [(await store.limit_req([two])).delay_ms for _ in range(6)]
    assert delays == [0, 0, 0, 1000, 2000, 3000]


async def test_10r_per_minute_spaces_requests_6025_ms(store: LimitStore, clock: FakeClock) -> None:
    call = req("gen", "k", "10r/m")
    assert not (await store.limit_req([call])).rejected
    clock.advance(6024)
    rejected = await store.limit_req([call])
    assert rejected.rejected
    assert rejected.retry_after_ms == 1
    clock.advance(1)
    assert (await store.limit_req([call])).status is LimitStatus.PASSED


async def test_first_busy_zone_rejects_and_charges_no_zone(store: LimitStore) -> None:
    loose = req("loose", "k", "1r/s", burst=1, nodelay=True)
    tight = req("tight", "k", "1r/s")
    assert not (await store.limit_req([loose, tight])).rejected
    decision = await store.limit_req([loose, tight])
    assert decision.rejected
    assert decision.zone_index == 1
    assert decision.excess == (1000, 1000)
    # Had the loose zone been charged, its excess would now be 2000 > burst.
    alone = await store.limit_req([loose])
    assert alone.status is LimitStatus.PASSED
    assert alone.excess == (1000,)


async def test_all_zones_charged_and_delay_is_the_max(store: LimitStore) -> None:
    a = req("a", "k", "1r/s", burst=10, nodelay=True)
    b = req("b", "k", "2r/s", burst=10)
    c = req("c", "k", "1r/s", burst=10, delay=1)
    delays = [(await store.limit_req([a, b, c])).delay_ms for _ in range(4)]
    # b: excess/2 per request; c: (excess - 1000) each; the max wins
    assert delays == [0, 500, 1000, 2000]
    after = await store.limit_req([a, b, c])
    assert after.excess == (4000, 4000, 4000)


async def test_dry_run_updates_state_but_never_rejects_or_delays(store: LimitStore) -> None:
    call = req("z", "k", "1r/s", burst=1)
    first = await store.limit_req([call], dry_run=True)
    second = await store.limit_req([call], dry_run=True)
    third = await store.limit_req([call], dry_run=True)
    assert first.status is LimitStatus.PASSED
    assert second.status is LimitStatus.DELAYED_DRY_RUN and second.delay_ms == 0
    assert third.status is LimitStatus.REJECTED_DRY_RUN and not third.rejected
    # the state the dry run built is the real one
    assert (await store.limit_req([call])).rejected


async def test_limit_req_keys_and_zones_are_isolated(store: LimitStore) -> None:
    assert not (await store.limit_req([req("z", "alice", "1r/s")])).rejected
    assert (await store.limit_req([req("z", "alice", "1r/s")])).rejected
    assert not (await store.limit_req([req("z", "bob", "1r/s")])).rejected
    assert not (await store.limit_req([req("y", "alice", "1r/s")])).rejected
    # zone and key are kept apart even when the characters could run together
    assert not (await store.limit_req([req("z:alice", "x", "1r/s")])).rejected
    assert not (await store.limit_req([req("z", "alice:x", "1r/s")])).rejected


async def test_idle_key_behaves_as_new(store: LimitStore, clock: FakeClock) -> None:
    call = req("z", "k", "1r/m", burst=3)
    for _ in range(4):
        await store.limit_req([call])
    clock.advance(10**7)
    decision = await store.limit_req([call])
    assert decision.excess == (0,)
    assert decision.nodes[0].last_ms == clock.now_ms


async def test_limit_req_argument_errors(store: LimitStore) -> None:
    assert (await store.limit_req([])).status is LimitStatus.PASSED
    with pytest.raises(ValueError, match="twice"):
        await store.limit_req([req("z", "a", "1r/s"), req("z", "b", "1r/s")])


# --- limit_conn ----------------------------------------------------------------------


async def test_conn_counts_rejects_and_releases(store: LimitStore) -> None:
    call = ConnCall("conn", "1.2.3.4", 2)
    first = await store.conn_acquire([call])
    second = await store.conn_acquire([call])
    assert (first.counts, second.counts) == ((1,), (2,))
    third = await store.conn_acquire([call])
    assert third.rejected and third.zone_index == 0 and third.counts == (2,)
    assert third.lease is None
    assert first.lease is not None
    await store.conn_release(first.lease)
    fourth = await store.conn_acquire([call])
    assert fourth.status is LimitStatus.PASSED and fourth.counts == (2,)


async def test_conn_reject_undoes_earlier_zones(store: LimitStore) -> None:
    wide, narrow = ConnCall("wide", "k", 5), ConnCall("narrow", "k", 1)
    assert (await store.conn_acquire([wide, narrow])).counts == (1, 1)
    refused = await store.conn_acquire([wide, narrow])
    assert refused.rejected and refused.zone_index == 1
    assert refused.counts == (1, 1)
    assert (await store.conn_acquire([wide])).counts == (2,)


async def test_conn_dry_run_reject_is_counted_nowhere(store: LimitStore) -> None:
    call = ConnCall("z", "k", 1)
    held = await store.conn_acquire([call], dry_run=True)
    assert held.status is LimitStatus.PASSED and held.lease is not None
    refused = await store.conn_acquire([call], dry_run=True)
    assert refused.status is LimitStatus.REJECTED_DRY_RUN and refused.lease is None
    await store.conn_release(held.lease)
    assert (await store.conn_acquire([call])).counts == (1,)


async def test_conn_release_is_idempotent(store: LimitStore) -> None:
    call = ConnCall("z", "k", 2)
    mine = (await store.conn_acquire([call])).lease
    other = await store.conn_acquire([call])
    assert mine is not None
    await store.conn_release(mine)
    await store.conn_release(mine)
    assert other.lease is not None
    assert (await store.conn_acquire([call])).counts == (2,)


async def test_conn_lease_lapses_unless_refreshed(store: LimitStore, clock: FakeClock) -> None:
    call = ConnCall("z", "k", 1)
    kept = (await store.conn_acquire([call])).lease
    assert kept is not None
    for _ in range(3):
        clock.advance(LEASE_MS - 1)
        assert await store.conn_refresh(kept)
        assert (await store.conn_acquire([call])).rejected
    # the holder stops refreshing (its process died): the slot comes back
    clock.advance(LEASE_MS)
    taken = await store.conn_acquire([call])
    assert taken.status is LimitStatus.PASSED and taken.counts == (1,)
    # a lapsed lease is not taken back, and releasing it frees nobody else's slot
    assert not await store.conn_refresh(kept)
    await store.conn_release(kept)
    assert (await store.conn_acquire([call])).rejected


async def test_conn_keys_are_isolated(store: LimitStore) -> None:
    assert not (await store.conn_acquire([ConnCall("z", "a", 1)])).rejected
    assert (await store.conn_acquire([ConnCall("z", "a", 1)])).rejected
    assert not (await store.conn_acquire([ConnCall("z", "b", 1)])).rejected
    assert not (await store.conn_acquire([ConnCall("y", "a", 1)])).rejected


async def test_conn_without_zones(store: LimitStore) -> None:
    decision = await store.conn_acquire([])
    assert decision.status is LimitStatus.PASSED and decision.lease is None


# --- token budgets -------------------------------------------------------------------

MINUTE = TokenBudget.per_minute(600)  # 10 tokens a second


async def test_tokens_check_charge_and_retry_after(store: LimitStore, clock: FakeClock) -> None:
    call = TokenCall("tpm", "alice", MINUTE)
    assert (await store.tokens_check([call])).remaining == (600,)
    await store.tokens_charge([call], 1000)  # overrun: charged in full
    refused = await store.tokens_check([call])
    assert refused.rejected and refused.zone_index == 0
    assert refused.remaining == (-400,)
    assert refused.retry_after_ms == 40_001
    clock.advance(40_000)
    assert (await store.tokens_check([call])).rejected
    clock.advance(1)
    assert (await store.tokens_check([call])).status is LimitStatus.PASSED


async def test_tokens_check_consumes_nothing(store: LimitStore) -> None:
    call = TokenCall("tpm", "k", MINUTE)
    for _ in range(5):
        assert (await store.tokens_check([call])).remaining == (600,)
    await store.tokens_charge([call], 0)
    assert (await store.tokens_check([call])).remaining == (600,)


async def test_tokens_minute_and_day(store: LimitStore, clock: FakeClock) -> None:
    minute = TokenCall("rule", "k", TokenBudget.per_minute(100))
    day = TokenCall("rule", "k", TokenBudget.per_day(150))
    await store.tokens_charge([minute, day], 100)
    assert (await store.tokens_check([minute, day])).zone_index == 0
    clock.advance(60_000)
    # a minute refills the minute budget but only 41 ticks x 150 units of the day's
    assert (await store.tokens_check([minute, day])).remaining == (100, 50)
    await store.tokens_charge([minute, day], 60)
    refused = await store.tokens_check([minute, day])
    assert refused.zone_index == 1 and refused.remaining == (40, -10)
    # debt 600000 - 6150 units, +1 to be positive, at 150 per tick: 3960 more ticks
    assert refused.retry_after_ms == (41 + 3960) * 1440 - 60_000


async def test_tokens_dry_run_and_isolation(store: LimitStore) -> None:
    spent = TokenCall("tpm", "alice", MINUTE)
    await store.tokens_charge([spent], 600)
    dry = await store.tokens_check([spent], dry_run=True)
    assert dry.status is LimitStatus.REJECTED_DRY_RUN and not dry.rejected
    assert not (await store.tokens_check([TokenCall("tpm", "bob", MINUTE)])).rejected
    assert not (await store.tokens_check([TokenCall("other", "alice", MINUTE)])).rejected


async def test_tokens_idle_key_refills_to_new(store: LimitStore, clock: FakeClock) -> None:
    call = TokenCall("tpm", "k", MINUTE)
    await store.tokens_charge([call], 5000)
    clock.advance(10**7)
    assert (await store.tokens_check([call])).remaining == (600,)


async def test_tokens_argument_errors(store: LimitStore) -> None:
    call = TokenCall("tpm", "k", MINUTE)
    with pytest.raises(ValueError):
        await store.tokens_charge([call], -1)
    with pytest.raises(ValueError, match="twice"):
        await store.tokens_check([call, TokenCall("tpm", "j", MINUTE)])
    assert (await store.tokens_check([])).status is LimitStatus.PASSED
