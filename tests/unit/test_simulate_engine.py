"""Pure parts of the stand-in Ollama: durations, tokens, names, scheduler bookkeeping."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from corral.simulate.config import SimConfig
from corral.simulate.durations import (
    FOREVER,
    parse_go_duration,
    parse_keep_alive,
    parse_keep_alive_setting,
    rfc3339_nano,
)
from corral.simulate.engine import Busy, SimEngine, Ticket
from corral.simulate.models import lookup_catalogue, namespace, normalise
from corral.simulate.native import plan
from corral.simulate.tokens import (
    count_messages,
    count_prompt,
    raw_vector,
    seed_of,
    unit_vector,
    words,
)


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("0", 0),
        ("5m", 300 * 10**9),
        ("300ms", 300 * 10**6),
        ("1h30m", 5400 * 10**9),
        ("1.5s", 1_500_000_000),
        (".5s", 500_000_000),
        ("-1s", -(10**9)),
        ("+2us", 2_000),
        ("3µs", 3_000),
        ("1h1m1s1ms1us1ns", 3_661_001_001_001),
    ],
)
def test_go_duration_values(text: str, ns: int) -> None:
    assert parse_go_duration(text) == ns


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x", 'time: invalid duration "x"'),
        ("", 'time: invalid duration ""'),
        ("300", 'time: missing unit in duration "300"'),
        ("1d", 'time: unknown unit "d" in duration "1d"'),
        (".s", 'time: invalid duration ".s"'),
        ("9999999999h", 'time: invalid duration "9999999999h"'),
    ],
)
def test_go_duration_errors_match_go(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_go_duration(text)
    assert str(info.value) == message


def test_keep_alive_numbers_are_seconds_and_negative_is_forever() -> None:
    assert parse_keep_alive(None) is None
    assert parse_keep_alive(0) == 0
    assert parse_keep_alive(2.5) == 2.5
    assert parse_keep_alive("10m") == 600
    assert parse_keep_alive(-1) == FOREVER
    assert parse_keep_alive("-5m") == FOREVER


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "Unsupported type: 'bool'"),
        ([1], "Unsupported type: '[]interface {}'"),
        ({"a": 1}, "Unsupported type: 'map[string]interface {}'"),
        ("soon", 'time: invalid duration "soon"'),
    ],
)
def test_keep_alive_rejects_like_ollama(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_keep_alive(value)
    assert str(info.value) == message


def test_keep_alive_setting_accepts_bare_seconds() -> None:
    assert parse_keep_alive_setting("300") == 300
    assert parse_keep_alive_setting("1h") == 3600
    assert parse_keep_alive_setting("-1") == math.inf


def test_rfc3339_nano_trims_trailing_zeros_like_go() -> None:
    base = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z
    assert rfc3339_nano(base) == "2026-01-01T00:00:00Z"
    assert rfc3339_nano(base + 120_000_000) == "2026-01-01T00:00:00.12Z"
    assert rfc3339_nano(base + 123_456_789) == "2026-01-01T00:00:00.123456789Z"
    assert rfc3339_nano(base + 10**9 + 1) == "2026-01-01T00:00:01.000000001Z"


def test_token_counts_are_word_based_and_deterministic() -> None:
    assert count_prompt("why is the sky blue") == 5
    assert count_prompt("", "") == 1  # a BOS is always evaluated
    assert count_prompt("hi", system="be brief") == 3
    # Four template tokens per message on top of the words.
    assert count_messages([{"role": "user", "content": "hello there"}]) == 6
    assert count_messages([{"role": "system", "content": "x"}, {"role": "user"}]) == 9


def test_words_stream_like_tokens() -> None:
    toks = words(seed_of("prompt"), 5)
    assert len(toks) == 5
    assert not toks[0].startswith(" ")
    assert all(t.startswith(" ") for t in toks[1:])
    assert toks == words(seed_of("prompt"), 5)
    assert words(0, 0) == []


def test_plan_honours_num_predict() -> None:
    cfg = SimConfig(default_num_predict=7)
    toks, reason = plan(cfg, None, 1)
    assert (len(toks), reason) == (7, "stop")
    toks, reason = plan(cfg, -1, 1)
    assert (len(toks), reason) == (7, "stop")
    toks, reason = plan(cfg, 3, 1)
    assert (len(toks), reason) == (3, "length")


def test_vectors_are_deterministic_and_normalised() -> None:
    v = unit_vector("hello")
    assert v == unit_vector("hello")
    assert v != unit_vector("world")
    assert math.isclose(sum(x * x for x in v), 1.0)
    assert math.isclose(sum(x * x for x in unit_vector("hello", 3)), 1.0)
    assert len(unit_vector("hello", 3)) == 3
    assert not math.isclose(sum(x * x for x in raw_vector("hello")), 1.0)


def test_names_normalise_like_ollama() -> None:
    assert normalise("llama3.2") == "llama3.2:latest"
    assert normalise("library/Llama3.2:1B") == "llama3.2:1b"
    assert normalise("registry.ollama.ai/library/qwen2.5:0.5b") == "qwen2.5:0.5b"
    assert namespace("llama3.2") == "library"
    assert namespace("someone/model:tag") == "someone"
    assert lookup_catalogue("nomic-embed-text").embedding_only
    made_up = lookup_catalogue("brand-new-embed:v1")
    assert made_up.embedding_only and made_up == lookup_catalogue("brand-new-embed:v1")


def _engine(**kw: object) -> SimEngine:
    cfg = SimConfig(models=("a", "b", "c"), tokens_per_second=0, **kw)  # type: ignore[arg-type]
    return SimEngine(cfg)


async def _use(engine: SimEngine, name: str, keep_alive: float | None = None) -> None:
    info = engine.find(name)
    assert info is not None
    r = await engine.lease(info, keep_alive, engine.resolve_ctx(info, None))
    engine.unref(r)


async def test_eviction_picks_least_recently_used_idle_model() -> None:
    engine = _engine(max_loaded_models=2)
    await _use(engine, "a")
    await _use(engine, "b")
    await asyncio.sleep(0.002)
    await _use(engine, "a")  # a is now more recent than b
    await _use(engine, "c")
    assert sorted(engine.runners) == ["a:latest", "c:latest"]
    assert engine.stats.evictions == 1
    assert engine.stats.loads == 3
    await engine.close()


async def test_eviction_prefers_shorter_keep_alive_then_skips_busy() -> None:
    engine = _engine(max_loaded_models=2)
    await _use(engine, "a", keep_alive=60)
    await _use(engine, "b", keep_alive=FOREVER)
    await _use(engine, "c")  # a has the shorter session duration
    assert sorted(engine.runners) == ["b:latest", "c:latest"]
    # A busy runner is passed over while an idle one exists.
    info_b = engine.find("b")
    assert info_b is not None
    busy = await engine.lease(info_b, None, engine.resolve_ctx(info_b, None))
    await _use(engine, "a")
    assert sorted(engine.runners) == ["a:latest", "b:latest"]
    engine.unref(busy)
    await engine.close()


async def test_eviction_of_busy_model_waits_for_it() -> None:
    engine = _engine(max_loaded_models=1)
    info_a = engine.find("a")
    assert info_a is not None
    held = await engine.lease(info_a, None, engine.resolve_ctx(info_a, None))
    task = asyncio.create_task(_use(engine, "b"))
    await asyncio.sleep(0.01)
    assert not task.done()  # b waits until a's request ends
    assert "a:latest" in engine.runners
    engine.unref(held)
    await asyncio.wait_for(task, 1)
    assert list(engine.runners) == ["b:latest"]
    await engine.close()


async def test_keep_alive_expiry_and_zero() -> None:
    engine = _engine()
    await _use(engine, "a", keep_alive=0.005)
    assert "a:latest" in engine.runners
    await asyncio.sleep(0.01)
    assert engine.loaded() == []
    await _use(engine, "b", keep_alive=0)  # unloads as soon as idle
    assert "b:latest" not in engine.runners
    assert engine.stats.unloads == 2
    await engine.close()


async def test_keep_alive_is_sticky_when_omitted() -> None:
    engine = _engine()
    await _use(engine, "a", keep_alive=FOREVER)
    await _use(engine, "a")  # no keep_alive: duration unchanged
    assert engine.runners["a:latest"].duration == FOREVER
    await engine.close()


async def test_full_pending_queue_raises_busy_but_loaded_model_does_not() -> None:
    engine = _engine(max_queue=1, load_time=0.05)
    info = {n: engine.find(n) for n in "abc"}
    first = asyncio.create_task(_use(engine, "a"))
    await asyncio.sleep(0.01)  # a is loading: out of the queue
    second = asyncio.create_task(_use(engine, "b"))
    await asyncio.sleep(0)  # b occupies the only queue place
    c = info["c"]
    assert c is not None
    with pytest.raises(Busy):
        await engine.lease(c, None, 4096)
    assert engine.stats.rejected == 1
    await asyncio.gather(first, second)
    # Loaded models skip the queue entirely.
    engine2 = _engine(max_queue=0, loaded=("a",))
    a = engine2.find("a")
    assert a is not None
    engine2.unref(await engine2.lease(a, None, engine2.resolve_ctx(a, None)))
    await engine.close()
    await engine2.close()


async def test_changing_num_ctx_forces_a_reload() -> None:
    engine = _engine()
    a = engine.find("a")
    assert a is not None
    engine.unref(await engine.lease(a, None, 4096))
    engine.unref(await engine.lease(a, None, 8192))
    assert engine.runners["a:latest"].num_ctx == 8192
    assert (engine.stats.loads, engine.stats.evictions) == (2, 1)
    await engine.close()


async def test_ticket_gauges_and_slot_cap() -> None:
    engine = _engine(parallel=2)
    a = engine.find("a")
    assert a is not None
    tickets = [Ticket(engine) for _ in range(3)]
    for t in tickets:
        await t.load(a, None, 4096)
    await tickets[0].slot()
    await tickets[1].slot()
    third = asyncio.create_task(tickets[2].slot())
    await asyncio.sleep(0.005)
    assert not third.done()
    s = engine.stats
    assert (s.in_flight, s.waiting, s.max_concurrent) == (2, 1, 3)
    tickets[0].close("completed")
    await asyncio.wait_for(third, 1)
    tickets[1].close("cancelled")
    tickets[2].close("completed")
    tickets[2].close("completed")  # idempotent
    assert (s.in_flight, s.waiting, s.max_in_flight) == (0, 0, 2)
    assert (s.completed, s.cancelled) == (2, 1)
    s.reset()
    assert (s.completed, s.max_concurrent, s.loads) == (0, 0, 0)
    await engine.close()


async def test_run_ids_are_counted_and_more_open_than_slots_is_an_episode() -> None:
    engine = _engine(parallel=2)
    s = engine.stats
    first, second = Ticket(engine, "r0.1"), Ticket(engine, "r1.1")
    assert s.over_slots == []                       # two open on two slots: fine
    third = Ticket(engine, "r1.1")                  # the same id again, and a third open
    fourth = Ticket(engine)                         # no id: counted open, not by id
    episode = s.over_slots[0]
    assert (episode.peak, episode.ids, episode.end) == (4, ["r0.1", "r1.1"], None)
    third.close("completed")
    assert episode.end is None                      # still three open
    fourth.close("completed")
    assert episode.end is not None and episode.end >= episode.start
    first.close("completed")
    Ticket(engine, "r2.1").close("completed")
    second.close("completed")
    assert len(s.over_slots) == 1 and s.open_ids == {}
    body = s.as_dict()
    assert body["runs_repeated"] == {"r1.1": 2} and body["run_ids"] == 3
    assert body["over_slots"][0]["peak"] == 4
    s.reset()
    assert s.as_dict()["run_ids"] == 0 and s.over_slots == []
    await engine.close()


def test_config_rejects_unknown_fault() -> None:
    with pytest.raises(ValueError, match="fault"):
        SimConfig(fault="explode")


def test_initially_loaded_models_are_installed_and_listed_in_order() -> None:
    engine = SimEngine(SimConfig(models=("a", "b"), loaded=("z",)))
    assert list(engine.runners) == ["z:latest"]
    order = sorted(engine.installed.values(), key=lambda e: e.modified_ns, reverse=True)
    assert [e.info.name for e in order] == ["a:latest", "b:latest", "z:latest"]
    assert engine.runners["z:latest"].expires_mono > time.monotonic()


def test_busy_seconds_integrate_open_and_closed_slots() -> None:
    from corral.simulate.engine import Stats

    s = Stats()
    # Two slots open at t=10 and t=12, the first closed at t=15: busy at t=16 is
    # 5 (closed) + 4 (still open) slot-seconds.
    s.in_flight, s.busy_starts = 2, 10.0 + 12.0
    s.in_flight, s.busy_starts, s.busy_closed = 1, 12.0, 5.0
    assert s.busy_seconds(16.0) == pytest.approx(9.0)


async def test_ticket_busy_time_counts_only_slot_time() -> None:
    engine = _engine(parallel=1)
    a = engine.find("a")
    assert a is not None
    t = Ticket(engine)
    await t.load(a, None, 4096)
    await asyncio.sleep(0.05)           # waiting for a slot is not busy
    assert engine.stats.busy_seconds() == 0.0
    await t.slot()
    await asyncio.sleep(0.05)
    t.close("completed")
    busy = engine.stats.busy_seconds()
    assert 0.04 <= busy < 0.5
    await asyncio.sleep(0.02)
    assert engine.stats.busy_seconds() == busy      # nothing open: it stays put
    engine.stats.reset()
    assert engine.stats.busy_seconds() == 0.0
    await engine.close()
