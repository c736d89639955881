"""nginx limit_req math: worked examples from REFERENCE A1 and properties."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.limits.leaky import (
    NODELAY,
    Node,
    ReqDecision,
    ReqZoneCall,
    ReqZoneParams,
    accountable_key,
    decay,
    evaluate,
    expires_at_ms,
    parse_rate,
    remaining,
    reset_ms,
    retry_after_ms,
)
from corral.limits.status import LimitStatus

T0 = 1_000_000


class Sim:
    """Zones with one key each, committing what evaluate() says, as a store would."""

    def __init__(self, *params: ReqZoneParams) -> None:
        self.params = params
        self.nodes: list[Node | None] = [None] * len(params)

    def request(self, now: int, *, dry_run: bool = False) -> ReqDecision:
        decision = evaluate(list(zip(self.params, self.nodes, strict=True)), now, dry_run=dry_run)
        if decision.nodes:
            self.nodes = list(decision.nodes)
        return decision


# --- parse_rate and parameters -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "milli"),
    [("10r/s", 10_000), ("1r/s", 1000), ("10r/m", 166), ("1r/m", 16), ("30r/m", 500), ("5", 5000)],
)
def test_parse_rate(text: str, milli: int) -> None:
    assert parse_rate(text) == milli


@pytest.mark.parametrize(
    "text", ["10r/h", "0r/s", "0r/m", "0", "", "r/s", "-1r/s", "1.5r/s", " 1r/s"]
)
def test_parse_rate_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid rate"):
        parse_rate(text)


def test_from_config_units() -> None:
    assert ReqZoneParams.from_config("1r/s", burst=5) == ReqZoneParams(1000, 5000, 0)
    assert ReqZoneParams.from_config("1r/s", burst=5, delay=2) == ReqZoneParams(1000, 5000, 2000)
    assert ReqZoneParams.from_config("1r/s", burst=5, nodelay=True).delay == NODELAY
    with pytest.raises(ValueError, match="not both"):
        ReqZoneParams.from_config("1r/s", delay=1, nodelay=True)


@pytest.mark.parametrize(("rate", "burst", "delay"), [(0, 0, 0), (1000, -1, 0), (1000, 0, -1)])
def test_params_refuse_nonsense(rate: int, burst: int, delay: int) -> None:
    with pytest.raises(ValueError):
        ReqZoneParams(rate, burst, delay)


def test_empty_or_oversized_key_is_not_accountable() -> None:
    assert not accountable_key("")
    assert not accountable_key("x" * 65536)
    assert accountable_key("x" * 65535)
    with pytest.raises(ValueError, match="drop the zone"):
        ReqZoneCall("z", "", ReqZoneParams(1000))


# --- decay ---------------------------------------------------------------------------


def test_decay_counts_this_request_and_truncates() -> None:
    assert decay(Node(0, T0), 166, T0 + 6024) == (1000 - 999, 6024)
    assert decay(Node(0, T0), 166, T0 + 6025) == (0, 6025)


def test_decay_clock_slightly_behind_counts_as_no_time() -> None:
    assert decay(Node(2000, T0), 1000, T0 - 1) == (3000, 0)
    assert decay(Node(2000, T0), 1000, T0 - 60000) == (3000, 0)


def test_decay_clock_far_behind_counts_as_one_ms() -> None:
    assert decay(Node(2000, T0), 1000, T0 - 60001) == (2000 - 1 + 1000, 1)
    assert decay(Node(2000, T0), 100, T0 - 10**9) == (3000, 1)  # 100*1//1000 == 0


def test_last_moves_only_when_ms_is_not_zero() -> None:
    params = ReqZoneParams(1000, 10_000)
    same_ms = evaluate([(params, Node(1000, T0))], T0)
    assert same_ms.nodes == (Node(2000, T0),)
    behind = evaluate([(params, Node(1000, T0))], T0 - 500)
    assert behind.nodes == (Node(2000, T0),)  # last stays in the future
    wrapped = evaluate([(params, Node(1000, T0))], T0 - 70_000)
    assert wrapped.nodes == (Node(1999, T0 - 70_000),)  # ms = 1, so last = now


def test_first_access_of_a_key_is_free() -> None:
    decision = evaluate([(ReqZoneParams(1000), None)], T0)
    assert decision.status is LimitStatus.PASSED
    assert decision.excess == (0,)
    assert decision.nodes == (Node(0, T0),)


# --- worked examples ---------------------------------------------------------------


def test_10r_per_minute_spacing_is_6025_ms() -> None:
    sim = Sim(ReqZoneParams.from_config("10r/m"))
    now = T0
    assert sim.request(now).status is LimitStatus.PASSED
    for _ in range(5):
        assert sim.request(now + 6024).rejected
        now += 6025
        decision = sim.request(now)
        assert decision.status is LimitStatus.PASSED
        assert decision.delay_ms == 0


def test_burst_5_seven_requests_in_one_ms() -> None:
    sim = Sim(ReqZoneParams.from_config("1r/s", burst=5))
    decisions = [sim.request(T0) for _ in range(7)]
    assert [d.excess[0] for d in decisions] == [0, 1000, 2000, 3000, 4000, 5000, 6000]
    assert [d.delay_ms for d in decisions[:6]] == [0, 1000, 2000, 3000, 4000, 5000]
    assert [d.status for d in decisions[:6]] == [LimitStatus.PASSED] + [LimitStatus.DELAYED] * 5
    assert decisions[6].rejected
    assert decisions[6].zone_index == 0


def test_burst_5_nodelay() -> None:
    sim = Sim(ReqZoneParams.from_config("1r/s", burst=5, nodelay=True))
    decisions = [sim.request(T0) for _ in range(7)]
    assert all(d.status is LimitStatus.PASSED and d.delay_ms == 0 for d in decisions[:6])
    assert decisions[6].rejected


def test_burst_5_delay_2() -> None:
    sim = Sim(ReqZoneParams.from_config("1r/s", burst=5, delay=2))
    decisions = [sim.request(T0) for _ in range(7)]
    assert [d.delay_ms for d in decisions[:6]] == [0, 0, 0, 1000, 2000, 3000]
    assert decisions[6].rejected


def test_delay_above_burst_behaves_as_nodelay() -> None:
    sim = Sim(ReqZoneParams.from_config("1r/s", burst=2, delay=3))
    assert [sim.request(T0).delay_ms for _ in range(3)] == [0, 0, 0]
    assert sim.request(T0).rejected


def test_burst_0_rejects_requests_closer_than_one_over_rate() -> None:
    sim = Sim(ReqZoneParams.from_config("2r/s"))
    assert not sim.request(T0).rejected
    assert sim.request(T0 + 499).rejected
    assert not sim.request(T0 + 500).rejected


def test_rejected_request_changes_nothing() -> None:
    sim = Sim(ReqZoneParams.from_config("1r/s"))
    sim.request(T0)
    before = list(sim.nodes)
    decision = sim.request(T0 + 10)
    assert decision.rejected
    assert decision.nodes == ()
    assert sim.nodes == before


# --- several zones -------------------------------------------------------------------


def test_first_busy_zone_rejects_and_no_zone_is_charged() -> None:
    loose = ReqZoneParams.from_config("10r/s", burst=10)
    tight = ReqZoneParams.from_config("1r/s")
    zones = [(loose, Node(0, T0)), (tight, Node(1000, T0)), (tight, Node(5000, T0))]
    decision = evaluate(zones, T0)
    assert decision.rejected
    assert decision.zone_index == 1
    assert decision.nodes == ()
    assert decision.excess == (1000, 2000, 6000)


def test_all_pass_all_charged_and_delay_is_the_max_with_each_zones_own_delay() -> None:
    nodelay = ReqZoneParams.from_config("1r/s", burst=10, nodelay=True)
    delayed = ReqZoneParams.from_config("2r/s", burst=10)
    delay_one = ReqZoneParams.from_config("1r/s", burst=10, delay=1)
    zones = [(nodelay, Node(8000, T0)), (delayed, Node(1000, T0)), (delay_one, Node(2000, T0))]
    decision = evaluate(zones, T0)
    assert decision.status is LimitStatus.DELAYED
    # nodelay: none; 2r/s at excess 2000: 1000 ms; delay=1 at excess 3000: 2000 ms
    assert decision.delay_ms == 2000
    assert decision.nodes == (Node(9000, T0), Node(2000, T0), Node(3000, T0))


def test_dry_run_never_rejects_or_delays_but_updates_state_the_same() -> None:
    params = ReqZoneParams.from_config("1r/s", burst=1)
    real, dry = Sim(params), Sim(params)
    for _ in range(3):
        a, b = real.request(T0), dry.request(T0, dry_run=True)
        assert a.excess == b.excess and a.nodes == b.nodes and real.nodes == dry.nodes
    assert dry.request(T0, dry_run=True).status is LimitStatus.REJECTED_DRY_RUN
    dry2 = Sim(params)
    dry2.request(T0, dry_run=True)
    delayed = dry2.request(T0, dry_run=True)
    assert delayed.status is LimitStatus.DELAYED_DRY_RUN
    assert delayed.delay_ms == 0 and not delayed.rejected


def test_no_zone_passes_trivially() -> None:
    assert evaluate([], T0) == ReqDecision(LimitStatus.PASSED)


# --- retry-after, expiry, headers ----------------------------------------------------


def test_retry_after_is_exact() -> None:
    sim = Sim(ReqZoneParams.from_config("10r/m"))
    sim.request(T0)
    decision = sim.request(T0 + 1000)
    assert decision.retry_after_ms == 5025
    assert sim.request(T0 + 1000 + 5024).rejected
    assert not sim.request(T0 + 1000 + 5025).rejected


def test_retry_after_with_clock_behind_last() -> None:
    params = ReqZoneParams(1000, 0)
    node = Node(0, T0)
    # 30 s behind: nothing decays until `last`, then 1 s is needed.
    assert retry_after_ms([(params, node)], T0 - 30_000) == 31_000
    # far behind (wrap regime): solved in the normal regime, where it is exact
    assert retry_after_ms([(params, node)], T0 - 100_000) == 101_000


def test_headers_helpers() -> None:
    params = ReqZoneParams.from_config("1r/s", burst=5)
    assert remaining(params, 0) == 5
    assert remaining(params, 4500) == 0
    assert remaining(params, 6000) == 0
    assert reset_ms(params, 4500) == 4500
    assert reset_ms(ReqZoneParams(166), 1000) == 6025


rates = st.sampled_from(["1r/m", "7r/m", "10r/m", "60r/m", "1r/s", "3r/s", "10r/s", "1000r/s"])


@st.composite
def zone_params(draw: st.DrawFn) -> ReqZoneParams:
    rate = draw(rates)
    burst = draw(st.integers(0, 6))
    mode = draw(st.sampled_from(["delay0", "delayN", "nodelay"]))
    if mode == "nodelay":
        return ReqZoneParams.from_config(rate, burst=burst, nodelay=True)
    delay = draw(st.integers(1, 8)) if mode == "delayN" else None
    return ReqZoneParams.from_config(rate, burst=burst, delay=delay)


nodes = st.builds(Node, st.integers(0, 8000), st.integers(T0 - 200_000, T0 + 200_000))


@settings(max_examples=300)
@given(st.lists(st.tuples(zone_params(), st.none() | nodes), min_size=1, max_size=4))
def test_retry_after_is_the_earliest_acceptance(
    zones: list[tuple[ReqZoneParams, Node | None]],
) -> None:
    decision = evaluate(zones, T0)
    wait = retry_after_ms(zones, T0)
    # Exact unless some zone sits in the wrap regime (clock > 60 s behind its node),
    # where the answer is the safe bound of the normal regime.
    exact = all(n is None or T0 - n.last_ms >= -60000 for _, n in zones)
    if decision.zone_index is None:
        assert wait == 0 or not exact
        return
    assert decision.retry_after_ms == wait >= 1
    assert evaluate(zones, T0 + wait).zone_index is None
    if exact:
        assert evaluate(zones, T0 + wait - 1).zone_index is not None


@settings(max_examples=300)
@given(zone_params(), nodes, st.integers(0, 10**7))
def test_node_at_expiry_is_indistinguishable_from_a_new_key(
    params: ReqZoneParams, node: Node, later: int
) -> None:
    at = max(expires_at_ms(params, node), node.last_ms) + later
    assert evaluate([(params, node)], at) == evaluate([(params, None)], at)


@settings(max_examples=200)
@given(st.lists(st.tuples(zone_params(), st.none() | nodes), min_size=1, max_size=4))
def test_several_zones_combine_single_zone_outcomes(
    zones: Sequence[tuple[ReqZoneParams, Node | None]],
) -> None:
    alone = [evaluate([zone], T0) for zone in zones]
    together = evaluate(zones, T0)
    busy = [i for i, d in enumerate(alone) if d.zone_index is not None]
    assert together.zone_index == (busy[0] if busy else None)
    assert together.excess == tuple(d.excess[0] for d in alone)
    if not busy:
        assert together.delay_ms == max(d.delay_ms for d in alone)
        assert together.nodes == tuple(d.nodes[0] for d in alone)


@settings(max_examples=300)
@given(zone_params(), st.lists(st.integers(0, 5000), min_size=1, max_size=60))
def test_never_admits_more_than_rate_over_a_window_plus_burst(
    params: ReqZoneParams, gaps: list[int]
) -> None:
    sim = Sim(params)
    now, admitted = T0, []
    for gap in gaps:
        now += gap
        if not sim.request(now).rejected:
            admitted.append(now)
    # Each admission adds 1000 and time removes at most rate*dt/1000, while an
    # admitted excess never exceeds burst: k admissions within [a, b] need
    # (k - 1) * 1000 <= burst + rate * (b - a) / 1000.
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            k = j - i + 1
            assert (k - 1) * 1_000_000 <= params.burst * 1000 + params.rate * (admitted[j] - start)


@settings(max_examples=200)
@given(zone_params(), st.integers(1, 40))
def test_a_client_that_honours_retry_after_is_always_admitted(
    params: ReqZoneParams, requests: int
) -> None:
    sim, now = Sim(params), T0
    for _ in range(requests):
        decision = sim.request(now)
        if decision.rejected:
            now += decision.retry_after_ms
            assert not sim.request(now).rejected
        now += decision.delay_ms
