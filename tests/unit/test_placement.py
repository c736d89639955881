"""The wait-or-load rule on synthetic fleets (pure: a fake clock, no sleeps)."""

from __future__ import annotations

import math

import pytest

from corral.backends.backend import Backend
from corral.fleet.state import Fleet
from corral.pipeline.route import Router
from corral.scheduler.placement import Action, Rent, load_options, place

M1, M2, M3 = "m1:latest", "m2:latest", "m3:latest"
LOAD = 2.0


def _fleet(*resident: tuple[str, ...], slots: int = 2, busy: tuple[int, ...] = (),
           capacity: int = 1) -> Fleet:
    """Backends b0, b1, … each holding its ``resident`` models, every model installed
    everywhere; ``busy[i]`` requests running on backend i (on its first model)."""
    backends = [Backend(f"b{i}", f"http://b{i}:1", slots, up=True,
                        models=frozenset({M1, M2, M3})) for i in range(len(resident))]
    fleet = Fleet(backends, LOAD, {b.name: capacity for b in backends})
    for b, models in zip(backends, resident, strict=True):
        fleet.observe_ps(b, [{"name": m, "context_length": 4096} for m in models], now=-100.0)
    for i, n in enumerate(busy):
        b = backends[i]
        for _ in range(n):
            b.in_flight += 1
            fleet.on_dispatch(b, resident[i][0], None, -1.0, load=False)
    return fleet


def _demand(fleet: Fleet, model: str, per_second: float, until: float = 0.0,
            seconds: float = 60.0) -> None:
    n = int(per_second * seconds)
    for k in range(n):
        fleet.on_arrival(model, until - seconds + (k + 1) * seconds / n)


def _service(fleet: Fleet, model: str, seconds: float) -> None:
    for _ in range(5):
        fleet.model(model).service.add(seconds)


def test_runs_at_once_where_resident_and_free() -> None:
    fleet = _fleet((M1,), (M2,))
    p = place(fleet, Router(), M1, None, now=0.0)
    assert p.action is Action.RUN and p.backend is fleet.backends[0]


def test_waits_when_a_resident_slot_frees_sooner_than_a_load() -> None:
    # The swap scenario: b0 busy with M1 for 50 ms, b1 idle but holding M2 that is in
    # demand. Sending the M1 job to b1 would cost a 2 s load and evict M2.
    fleet = _fleet((M1,), (M2,), busy=(2,))
    _service(fleet, M1, 0.05)
    _demand(fleet, M2, 12.0)
    p = place(fleet, Router(), M1, None, now=0.0)
    assert p.action is Action.WAIT
    assert p.wait_s == pytest.approx(0.025)
    assert p.load_s > 40          # 2 s load + 12/s × 2 s × 2 s of M2 requests delayed


def test_loads_when_the_wait_in_line_exceeds_a_load() -> None:
    # M2 has no demand: loading M1 on b1 costs its load time only. The job with many
    # M1 jobs ahead of it would wait longer than that.
    fleet = _fleet((M1,), (M2,), busy=(2,))
    _service(fleet, M1, 0.5)
    assert place(fleet, Router(), M1, None, now=0.0, ahead=3).action is Action.WAIT
    p = place(fleet, Router(), M1, None, now=0.0, ahead=8)   # 9 × 0.5 / 2 = 2.25 s
    assert p.action is Action.LOAD and p.backend is fleet.backends[1]
    assert p.load_s == pytest.approx(LOAD)


def test_load_goes_where_it_evicts_the_least_demand() -> None:
    fleet = _fleet((M1,), (M2,), (M3,), busy=(2,))
    _demand(fleet, M2, 5.0)
    _demand(fleet, M3, 0.5)
    options = {o.backend.name: o.price for o in load_options(fleet, M1, None, now=0.0)}
    assert set(options) == {"b1", "b2"}
    assert options["b2"] < options["b1"]
    p = place(fleet, Router(), M1, None, now=0.0, ahead=1000)
    assert p.action is Action.LOAD and p.backend is fleet.backends[2]


def test_a_model_resident_nowhere_loads_at_once_where_it_evicts_least() -> None:
    fleet = _fleet((M1,), (M2,))
    _demand(fleet, M1, 3.0)
    _demand(fleet, M2, 1.0)
    p = place(fleet, Router(), M3, None, now=0.0)
    assert p.action is Action.LOAD and p.backend is fleet.backends[1]
    assert p.wait_s == math.inf


def test_never_evicts_a_model_with_requests_running_when_another_choice_exists() -> None:
    # b0 runs M1 (one of two slots busy), b1's M2 is idle and even in some demand.
    fleet = _fleet((M1,), (M2,), busy=(1,))
    _demand(fleet, M2, 2.0)
    options = load_options(fleet, M3, None, now=0.0)
    assert [o.backend.name for o in options] == ["b1"]
    # With no other choice, the busy one is used, and its drain is in the price.
    _service(fleet, M1, 3.0)
    fleet.backends[1].up = False
    (only,) = load_options(fleet, M3, None, now=0.0)
    assert only.backend.name == "b0" and only.evicts_running
    assert only.price == pytest.approx(LOAD + 3.0)


def test_room_for_another_model_costs_only_the_load() -> None:
    fleet = _fleet((M1,), capacity=2)
    _demand(fleet, M1, 10.0)
    (option,) = load_options(fleet, M2, None, now=0.0)
    assert option.price == pytest.approx(LOAD)


def test_a_model_just_loaded_is_not_evicted_again_at_once() -> None:
    fleet = _fleet((M1,), (M2,), busy=(2,))
    b1 = fleet.backends[1]
    fleet.on_dispatch(b1, M1, None, now=10.0, load=True)     # M1 replaces M2 on b1
    fleet.on_ready(b1, M1, None, now=12.0)
    fleet.on_release(b1, M1, now=12.1)
    b1.in_flight = 0
    # M2 is now resident nowhere. b1's M1 was loaded for one request nobody repeated:
    # evicting it costs nothing, so it may go at once.
    assert fleet.runner(b1, M2) is None
    assert [o.backend.name for o in load_options(fleet, M2, None, now=12.5)] == ["b1"]
    # Asked for again since its load, it is in use: not evicted within its load time.
    fleet.on_arrival(M1, 12.2)
    assert load_options(fleet, M2, None, now=12.5) == []
    assert place(fleet, Router(), M2, None, now=12.5).action is Action.WAIT
    assert fleet.protected_until(12.5) == pytest.approx(14.0)
    # One load time after it was loaded it may go.
    assert [o.backend.name for o in load_options(fleet, M2, None, now=14.5)] == ["b1"]


def test_another_num_ctx_counts_as_a_load() -> None:
    fleet = _fleet((M1,), (M2,))
    assert place(fleet, Router(), M1, 4096, now=0.0).action is Action.RUN
    p = place(fleet, Router(), M1, 8192, now=0.0)
    assert p.action is Action.LOAD
    # The reload replaces the runner: nothing else is evicted for it.
    assert p.backend is fleet.backends[0] and p.load_s == pytest.approx(LOAD)


def test_a_loading_runner_with_a_free_slot_is_a_wait_of_its_remaining_load() -> None:
    fleet = _fleet((M1,), (M2,), busy=(2,))
    _service(fleet, M1, 1.0)
    b1 = fleet.backends[1]
    fleet.on_dispatch(b1, M1, None, now=0.0, load=True)      # ready at 2.0
    b1.in_flight = 1
    early = place(fleet, Router(), M1, None, now=0.2)          # wait 0.5 s < 1.8 s left
    assert early.action is Action.WAIT
    late = place(fleet, Router(), M1, None, now=1.8, ahead=2)  # 1.5 s > 0.2 s left
    assert late.action is Action.RUN and late.backend is b1


def test_rent_accrues_with_idle_slots_and_pauses_and_resets() -> None:
    rent = Rent()
    b = Backend("b", "http://b:1", 2, up=True)
    assert rent.update(b, 0.0, 1.0, episode=True) == 0.0
    assert rent.update(b, 1.0, 0.5, episode=True) == pytest.approx(1.0)   # both slots idle
    assert rent.update(b, 3.0, 0.0, episode=True) == pytest.approx(2.0)   # one idle slot
    assert rent.update(b, 9.0, 1.0, episode=True) == pytest.approx(2.0)   # paused: busy
    assert Rent.due_in(2.0, 1.0, 5.0) == pytest.approx(3.0)
    assert Rent.due_in(2.0, 0.0, 5.0) == math.inf
    assert rent.update(b, 10.0, 0.0, episode=False) == 0.0               # nothing waits


def test_an_idle_model_is_recognised_within_seconds() -> None:
    fleet = _fleet((M1,), (M2,))
    _demand(fleet, M2, 4.0, until=0.0)
    assert fleet.demand(M2, 0.0) == pytest.approx(4.0, rel=0.2)
    # Not asked for in three seconds: at most a third of a request per second.
    assert fleet.demand(M2, 3.0) <= 1 / 3
