"""The scheduler benchmark's scenarios and how a run is judged (pure: no I/O).

Each scenario is a stand-in fleet and a set of client loops. A client loop sends one
``POST /api/generate`` at a time, waits for the whole answer, pauses ``think``
seconds and starts again, from ``start`` until ``stop`` seconds into the run. Clients
marked ``interactive`` are the people the scheduler protects: their latency is
compared with its ideal (the same request on an idle backend where its model is
loaded, measured in the same run).

A run is judged three ways at once, because any one alone can be bought with the
others: the interactive p95 against its ideal, the slots' utilisation (slot-seconds
spent generating, over the slot-seconds the fleet had; a model load is not busy
time), and the useful output (tokens delivered in complete answers, over what the
slots could have generated at the stand-in's speed — work thrown away does not
count). Model loads are counted too: a busy GPU doing swaps is not a win.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

M1 = "llama3.2:latest"
M2 = "mistral:latest"


@dataclass(frozen=True)
class Client:
    name: str
    key: str                      # an API key of the scenario (its tier decides the class)
    model: str
    tokens: tuple[int, int]       # num_predict drawn uniformly from this range
    stream: bool = True
    think: float = 0.0            # pause between two requests of one loop
    loops: int = 1                # loops running at once for this client
    interactive: bool = False
    start: float = 0.0
    stop: float = math.inf


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    clients: tuple[Client, ...]
    backends: int = 2
    slots: int = 2
    tps: float = 400.0
    max_loaded: int = 1
    load_time: float = 0.0
    # Models resident at start on each backend (every backend has every model).
    resident: tuple[tuple[str, ...], ...] = ((M1,), (M1,))
    duration: float = 15.0
    warmup: float = 1.0
    goals: dict[str, float] = field(default_factory=dict)
    # For a demand shift: when the shift happens (seconds into the run).
    shift_at: float | None = None

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m for r in self.resident for m in r))


# Keys and tiers every scenario's Corral knows: a person, a basic client, batch work.
TIERS = {"premium": {"priority": "high", "weight": 4}, "basic": {"priority": "normal"},
         "batch": {"priority": "low"}}
KEYS = [
    {"name": "alice", "key": "sk-alice", "tier": "premium"},
    {"name": "bob", "key": "sk-bob", "tier": "basic"},
    {"name": "carol", "key": "sk-carol", "tier": "basic"},
    {"name": "dave", "key": "sk-dave", "tier": "basic"},
    {"name": "flood", "key": "sk-flood", "tier": "basic"},
    {"name": "nightly", "key": "sk-nightly", "tier": "batch"},
]
_PEOPLE = ("sk-bob", "sk-carol", "sk-dave")


def _shift_clients() -> tuple[Client, ...]:
    before = tuple(Client(f"{tag}{i}", _PEOPLE[i], model, (100, 100), think=0.25, stop=8.0,
                          interactive=True)
                   for tag, model in (("a", M1), ("b", M2)) for i in range(2))
    after = (Client("a-all", "sk-flood", M1, (100, 100), loops=8, start=8.0,
                    interactive=True),)
    return before + after


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario(
        "noisy", "Noisy neighbour: one client floods, three people share the fleet",
        clients=(
            Client("flood", "sk-flood", M1, (100, 100), loops=16),
            *(Client(k.removeprefix("sk-"), k, M1, (80, 80), think=0.5, interactive=True)
              for k in _PEOPLE),
        ),
    ),
    Scenario(
        "priority", "Priority: a person behind a low-class flood of 32 streams",
        clients=(
            Client("batch", "sk-nightly", M1, (100, 200), loops=32),
            Client("alice", "sk-alice", M1, (40, 40), think=0.3, interactive=True),
        ),
    ),
    Scenario(
        "preemption", "Preemption: a person behind a low-class flood of non-streamed work",
        clients=(
            Client("batch", "sk-nightly", M1, (40, 200), stream=False, loops=32),
            Client("alice", "sk-alice", M1, (40, 40), think=0.3, interactive=True),
        ),
        goals={"p95_s": 0.15, "utilisation": 0.95, "useful": 0.85},
    ),
    Scenario(
        "residency", "Residency: two models, each resident on one backend, no load needed",
        clients=tuple(Client(f"{tag}{i}", _PEOPLE[i], model, (20, 20), think=0.2,
                             interactive=True)
                      for tag, model in (("a", M1), ("b", M2)) for i in range(3)),
        resident=((M1,), (M2,)), load_time=2.0,
        goals={"loads": 0, "p95_s": 0.1},
    ),
    Scenario(
        "shift", "Demand shift: both models in use, then all demand on one model",
        clients=_shift_clients(), resident=((M1,), (M2,)), load_time=2.0,
        duration=28.0, shift_at=8.0,
        goals={"loads_after_shift": 1, "busy_after_load": 0.90},
    ),
)}


# -- what a run produced ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One request as its client saw it (seconds since the run started)."""

    client: str
    interactive: bool
    start: float
    end: float
    ttfb: float | None
    status: int
    ok: bool          # a complete answer: 200 and a final object with done: true
    tokens: int       # eval_count of a complete answer, else 0
    gen_s: float = 0.0    # eval_duration of the answer: when its tokens were made


@dataclass(frozen=True, slots=True)
class Poll:
    """A stand-in's counters at one instant (seconds since the run started)."""

    at: float
    backend: int
    busy: float       # slot-seconds spent running requests since the run started
    loads: int


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q * len(ordered) / 100)))
    return ordered[rank - 1]


def delivered_in(s: Sample, t0: float, t1: float) -> float:
    """Tokens of a complete answer made inside [t0, t1]: its eval_duration before its
    end is when they were made, so an answer that straddles an edge counts in part."""
    if not s.ok or s.tokens <= 0:
        return 0.0
    start = s.end - s.gen_s
    if s.gen_s <= 0:
        return float(s.tokens) if t0 <= s.end <= t1 else 0.0
    overlap = min(s.end, t1) - max(start, t0)
    return s.tokens * max(overlap, 0.0) / s.gen_s


def busy_between(polls: Iterable[Poll], backend: int, t0: float, t1: float) -> float | None:
    """Slot-seconds one backend spent busy in [t0, t1], from the polls nearest inside."""
    own = [p for p in polls if p.backend == backend and t0 - 1e-9 <= p.at <= t1 + 1e-9]
    if len(own) < 2:
        return None
    first, last = min(own, key=lambda p: p.at), max(own, key=lambda p: p.at)
    if last.at - first.at <= 0:
        return None
    # Scaled to the window: the polls may start a little inside it.
    return (last.busy - first.busy) * (t1 - t0) / (last.at - first.at)


def first_load_done(polls: Sequence[Poll], after: float) -> float | None:
    """When a stand-in first counted a new load after ``after`` (its load finished)."""
    by_backend: dict[int, int] = {}
    for p in sorted(polls, key=lambda p: p.at):
        before = by_backend.get(p.backend)
        if p.at > after and before is not None and p.loads > before:
            return p.at
        if p.at <= after or before is None:
            by_backend[p.backend] = p.loads
    return None


def loads_between(polls: Sequence[Poll], t0: float, t1: float) -> int:
    total = 0
    for b in {p.backend for p in polls}:
        own = sorted((p for p in polls if p.backend == b), key=lambda p: p.at)
        before = [p.loads for p in own if p.at <= t0]
        upto = [p.loads for p in own if p.at <= t1]
        if upto:
            total += upto[-1] - (before[-1] if before else 0)
    return total


def summarize(sc: Scenario, samples: Sequence[Sample], polls: Sequence[Poll],
              ideal: float | None, preemptions: int | None = None) -> dict[str, Any]:
    """The figures of one target's run of one scenario."""
    t0, t1 = sc.warmup, sc.duration
    window = [s for s in samples if t0 <= s.start and s.end <= t1]
    people = [s for s in window if s.interactive]
    lat = [s.end - s.start for s in people if s.ok]
    ttfb = [s.ttfb for s in people if s.ok and s.ttfb is not None]
    capacity = sc.backends * sc.slots * (t1 - t0)
    busy = [busy_between(polls, b, t0, t1) for b in range(sc.backends)]
    useful = sum(delivered_in(s, t0, t1) for s in samples)
    p95 = percentile(lat, 95)
    out: dict[str, Any] = {
        "requests": len(window),
        "errors": sum(1 for s in window if not s.ok),
        "interactive": {
            "requests": len(people), "complete": len(lat),
            "p50_s": percentile(lat, 50), "p95_s": p95,
            "ttfb_p95_s": percentile(ttfb, 95),
            "ideal_s": ideal,
            "p95_over_ideal": (p95 / ideal) if p95 is not None and ideal else None,
        },
        "utilisation": (sum(busy) / capacity  # type: ignore[arg-type]
                        if all(b is not None for b in busy) else None),
        "utilisation_by_backend": [None if b is None else b / (sc.slots * (t1 - t0))
                                   for b in busy],
        "useful": useful / (capacity * sc.tps),
        "tokens_delivered": round(useful),
        "loads": loads_between(polls, -1.0, math.inf),
        "preemptions": preemptions,
    }
    if sc.shift_at is not None:
        out["shift"] = _shift(sc, polls)
    return out


def _shift(sc: Scenario, polls: Sequence[Poll]) -> dict[str, Any]:
    assert sc.shift_at is not None
    done = first_load_done(polls, sc.shift_at)
    after: list[float | None] = []
    if done is not None and sc.duration - done > 2:
        # From a second after the load finished: the queue needs a moment to spread.
        t0 = done + 1.0
        after = [None if (b := busy_between(polls, i, t0, sc.duration)) is None
                 else b / (sc.slots * (sc.duration - t0)) for i in range(sc.backends)]
    return {
        "loads_before_shift": loads_between(polls, -1.0, sc.shift_at),
        "loads_after_shift": loads_between(polls, sc.shift_at, math.inf),
        "load_done_s": None if done is None else round(done - sc.shift_at, 2),
        "busy_after_load_by_backend": after,
    }


def judge(sc: Scenario, result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each goal of the scenario: the measured value and whether it is met."""
    out: dict[str, dict[str, Any]] = {}
    for goal, target in sc.goals.items():
        measured: Any
        if goal == "p95_s":
            measured = result["interactive"]["p95_s"]
            ok = measured is not None and measured <= target
        elif goal in ("utilisation", "useful"):
            measured = result[goal]
            ok = measured is not None and measured >= target
        elif goal == "loads":
            measured = result["loads"]
            ok = measured <= target
        elif goal == "loads_after_shift":
            measured = result["shift"]["loads_after_shift"]
            ok = measured == target
        elif goal == "busy_after_load":
            values = result["shift"]["busy_after_load_by_backend"]
            measured = min(values) if values and None not in values else None
            ok = measured is not None and measured >= target
        else:  # pragma: no cover - a goal without a rule is a programming error
            raise ValueError(f"unknown goal {goal!r}")
        out[goal] = {"target": target, "measured": measured, "met": bool(ok)}
    return out
