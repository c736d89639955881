"""Where a job runs, or whether it waits: the wait-or-load rule (pure: no I/O; ``now``
is a parameter). What the rule reads — residency, load and service times, demand —
is the fleet's knowledge (``corral.fleet``); this module only decides.

For a job of model M (with its ``num_ctx``):

1. **Run at once** on a backend where M is resident and ready and a slot is free.
2. Otherwise compare two prices, in seconds:

   - *wait* for a resident slot: ``(jobs of M ahead + 1) × service time of M ÷
     resident slots of M`` (infinite when M is resident nowhere);
   - *load* M on another backend with a free slot: its load time there, plus the time
     the load waits for a busy runner it evicts to finish, plus what the eviction
     costs the evicted models — the requests expected while one is brought back
     (demand × its load time), each waiting that long: ``demand × load_time²``. A
     copy of the evicted model elsewhere absorbs its demand, so then it costs nothing.

   The cheapest load wins when it is cheaper than the wait. Candidates that evict a
   model with requests running there are used only when no other candidate exists;
   a model loaded less than its own load time ago and still in use is never evicted
   (no flapping).
   A runner of M still loading with a free slot counts as a wait of its remaining
   load time.
3. **The fleet's view** (``Rent``): a queue a few jobs deep is cheap for each job and
   expensive for the fleet when another backend idles beside it. So each backend
   with free slots and waiting work it could load accrues *rent* — its idle share of
   slots × time — and once the rent reaches the price of that load there, it loads
   (ski rental: never worse than twice the best choice in hindsight). A backend whose
   models have no demand thus loads about one load time after work starts waiting;
   a backend busy with its own model accrues nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from corral.backends.backend import Backend
from corral.fleet.state import Fleet, Runner
from corral.pipeline.route import Router


class Action(Enum):
    RUN = "resident"      # the model is resident (or loading) there
    LOAD = "load"         # the model will be loaded there
    WAIT = "wait"


@dataclass(frozen=True, slots=True)
class Placement:
    action: Action
    backend: Backend | None = None
    wait_s: float = 0.0        # expected wait for a resident slot
    load_s: float = math.inf   # price of the best load (inf: none possible)


WAIT = Placement(Action.WAIT)


@dataclass(frozen=True, slots=True)
class LoadOption:
    backend: Backend
    price: float
    evicts_running: bool


def evict_price(fleet: Fleet, b: Backend, victims: Sequence[Runner], model: str,
                now: float) -> float:
    """Seconds of delay that evicting ``victims`` from ``b`` costs their models."""
    price = 0.0
    for r in victims:
        if r.model == model:
            continue            # a reload of the same model (another num_ctx)
        if fleet.copies(r.model, now) > 1:
            continue            # another copy takes its requests
        t = fleet.load_time(b, r.model)
        price += fleet.demand(r.model, now) * t * t
    return price


def load_options(fleet: Fleet, model: str, ctx: int | None, now: float,
                 exclude: frozenset[str] = frozenset()) -> list[LoadOption]:
    """Backends with a free slot where ``model`` could be loaded, with their price."""
    out: list[LoadOption] = []
    for b in fleet.backends:
        if (b.in_flight >= b.max_concurrency or b.name in exclude or model not in b.models
                or not b.routable(now) or fleet.resident(b, model, ctx) is not None):
            continue
        victims = fleet.victims(b, model)
        if any(r.model != model and fleet.guarded(b, r, now) for r in victims):
            continue            # just loaded and in use: not evicted again at once
        busy = [r for r in victims if r.running > 0 or r.loading]
        drain = max((fleet.service_time(r.model) for r in busy), default=0.0)
        price = (fleet.load_time(b, model) + drain
                 + evict_price(fleet, b, victims, model, now))
        out.append(LoadOption(b, price, bool(busy)))
    if any(not o.evicts_running for o in out):
        # Never evict a model with requests running there when another choice exists.
        out = [o for o in out if not o.evicts_running]
    return out


def best_load(options: Sequence[LoadOption]) -> LoadOption | None:
    best = None
    for o in options:
        if best is None or o.price < best.price or (
                o.price == best.price and o.backend.in_flight < best.backend.in_flight):
            best = o
    return best


@dataclass(slots=True)
class Options:
    """Everything about placing one (model, num_ctx) that does not depend on the job's
    place in line: computed once per dispatch pass, then O(1) per job."""

    ready: list[Backend]           # resident, ready, free slot
    loading: Backend | None        # resident but still loading, free slot: soonest ready
    loading_wait: float
    service: float
    slots: int                     # resident ready slots (busy or not)
    load: LoadOption | None


def options_for(fleet: Fleet, model: str, ctx: int | None, now: float,
                exclude: frozenset[str] = frozenset(), prefer_loaded: bool = True) -> Options:
    ready: list[Backend] = []
    loading, loading_wait = None, math.inf
    for b in fleet.backends:
        if b.in_flight >= b.max_concurrency or b.name in exclude or not b.routable(now):
            continue
        if not prefer_loaded:
            # routing.prefer_loaded: false — residency is not looked at.
            if model in b.models:
                ready.append(b)
            continue
        r = fleet.resident(b, model, ctx)
        if r is None:
            continue
        if r.ready_at <= now and not r.loading:
            ready.append(b)
        elif max(r.ready_at - now, 0.0) < loading_wait:
            loading, loading_wait = b, max(r.ready_at - now, 0.0)
    load = None if ready else best_load(load_options(fleet, model, ctx, now, exclude))
    return Options(ready, loading, loading_wait, fleet.service_time(model),
                   fleet.resident_slots(model, ctx, now, exclude), load)


def decide(opts: Options, ahead: int, router: Router,
           affinity: str | None = None) -> Placement:
    """The placement of the job with ``ahead`` jobs of its model before it in line."""
    if opts.ready:
        return Placement(Action.RUN, router.pick(opts.ready, affinity))
    wait = (ahead + 1) * opts.service / opts.slots if opts.slots else math.inf
    load = opts.load
    load_s = load.price if load is not None else math.inf
    if opts.loading is not None and opts.loading_wait <= min(wait, load_s):
        return Placement(Action.RUN, opts.loading, wait, load_s)
    if load is not None and load_s < wait:
        return Placement(Action.LOAD, load.backend, wait, load_s)
    return Placement(Action.WAIT, None, wait, load_s)


def place(fleet: Fleet, router: Router, model: str, ctx: int | None, now: float,
          ahead: int = 0, exclude: frozenset[str] = frozenset(),
          affinity: str | None = None) -> Placement:
    """One job, from scratch (the request path; a dispatch pass shares ``Options``)."""
    opts = options_for(fleet, model, ctx, now, exclude, router.prefer_loaded)
    return decide(opts, ahead, router, affinity)


class Rent:
    """Per backend: the idle share of its slots × time lost while work it could load
    waited (pure: the caller says how the state changed, and when)."""

    def __init__(self) -> None:
        # backend id → (rent accrued, when last updated, rate since then)
        self._acc: dict[int, tuple[float, float, float]] = {}

    def update(self, b: Backend, now: float, rate: float, episode: bool) -> float:
        """Bring ``b``'s rent up to ``now`` at the rate in force since the last update,
        then set the new rate. ``episode`` false (no waiting work it could load)
        ends the episode: the rent goes back to zero."""
        acc, since, old = self._acc.get(id(b), (0.0, now, 0.0))
        acc += old * max(now - since, 0.0)
        if not episode:
            acc = 0.0
        self._acc[id(b)] = (acc, now, rate)
        return acc

    def reset(self, b: Backend, now: float) -> None:
        self._acc[id(b)] = (0.0, now, 0.0)

    def accrued(self, b: Backend) -> float:
        return self._acc.get(id(b), (0.0, 0.0, 0.0))[0]

    def forget(self, keep: Sequence[Backend]) -> None:
        ids = {id(b) for b in keep}
        self._acc = {k: v for k, v in self._acc.items() if k in ids}

    @staticmethod
    def due_in(acc: float, rate: float, price: float) -> float:
        """Seconds until the rent reaches ``price`` at ``rate`` (inf when it never will)."""
        if acc >= price:
            return 0.0
        return (price - acc) / rate if rate > 0 else math.inf
