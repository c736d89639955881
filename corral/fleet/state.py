"""The fleet as Corral knows it: one ``Fleet`` object, the only writer of residency.

Residency (which models each backend holds) comes from two sources, merged here:

- ``/api/ps`` on every probe (and right after Corral caused a load, to see what the
  load evicted): the backend's own word, with each runner's context length;
- what Corral itself sends and sees, at once: a request for M dispatched to B as a
  load makes M *loading* on B (and the runner Ollama will evict for it gone); an
  answer from B for M makes M resident on B.

Learned figures: each model's load time on each backend (from ``load_duration`` of
answers that loaded it; ``routing.load_time`` until then), each model's service time
(how long a request holds a slot once the model is in), its decode speed, and its
recent demand (arrivals per second, queued, running). Everything is mutated from
the event loop only, and nothing here reads the clock: ``now`` is a parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from corral.backends.backend import Backend, normalize_model
from corral.fleet.estimates import ArrivalRate, Ewma

# A model's service time before any was measured: a conservative guess (it only
# matters for the first few requests of a model, which also teach the real figure).
DEFAULT_SERVICE_S = 1.0


@dataclass(slots=True)
class Runner:
    """A model resident on a backend (or being loaded there)."""

    model: str
    ctx: int | None            # context length (``/api/ps`` context_length); None: unknown
    ready_at: float            # when it is (or was) ready; later than now while loading
    loaded_at: float           # when Corral first saw it ready (the no-flap guard)
    running: int = 0           # Corral's requests for this model running there now
    last_used: float = 0.0
    # True while Corral itself caused the load and has not yet seen it answered.
    loading: bool = False

    def fits(self, ctx: int | None) -> bool:
        """A request with this ``num_ctx`` runs on this runner without a reload."""
        return ctx is None or self.ctx is None or ctx == self.ctx


@dataclass(slots=True)
class Holding:
    """What one backend holds, and what was learned about it."""

    runners: dict[str, Runner] = field(default_factory=dict)
    max_models: int | None = None   # configured max_loaded_models
    seen_max: int = 0               # most runners /api/ps ever listed at once
    load_times: dict[str, Ewma] = field(default_factory=dict)
    ps_trusted: bool = True         # False once /api/ps failed or lacked fields

    def capacity(self) -> int:
        """How many models the backend holds at once: configured, else the most it
        was seen holding (at least one) — an underestimate at worst, which makes a
        load look like it evicts something when it might not: the safe side."""
        if self.max_models is not None:
            return self.max_models
        return max(self.seen_max, 1)


@dataclass(slots=True)
class ModelStats:
    """Fleet-wide figures of one model."""

    arrivals: ArrivalRate = field(default_factory=ArrivalRate)
    service: Ewma = field(default_factory=Ewma)       # seconds a request holds a slot
    decode: Ewma = field(default_factory=Ewma)        # tokens per second generated
    queued: int = 0
    running: int = 0


class Fleet:
    def __init__(self, backends: Sequence[Backend], default_load_time: float,
                 max_models: dict[str, int | None] | None = None) -> None:
        self.default_load_time = default_load_time
        self.backends: list[Backend] = []
        self._held: dict[int, Holding] = {}
        self.models: dict[str, ModelStats] = {}
        # Learned by the other replicas on the state store (empty for one process).
        self._remote_rates: dict[str, float] = {}
        self._remote_service: dict[str, tuple[float, int]] = {}
        self._remote_loads: dict[tuple[str, str], float] = {}
        self.set_backends(backends, max_models or {})

    # -- the backends ----------------------------------------------------------------

    def set_backends(self, backends: Sequence[Backend],
                     max_models: dict[str, int | None] | None = None) -> None:
        """Adopt a new list (reload): kept backends keep what was learned about them."""
        self.backends = list(backends)
        held = {}
        for b in self.backends:
            h = self._held.get(id(b)) or Holding()
            if max_models is not None and b.name in max_models:
                h.max_models = max_models[b.name]
            held[id(b)] = h
        self._held = held

    def holding(self, b: Backend) -> Holding:
        return self._held[id(b)]

    def model(self, name: str) -> ModelStats:
        stats = self.models.get(name)
        if stats is None:
            stats = self.models[name] = ModelStats()
        return stats

    def any_up(self) -> bool:
        return any(b.up for b in self.backends)

    def has_model(self, model: str) -> bool:
        return any(model in b.models for b in self.backends)

    def up_backends(self, now: float) -> list[Backend]:
        return [b for b in self.backends if b.routable(now)]

    def holders(self, model: str, now: float) -> list[Backend]:
        return [b for b in self.backends if b.routable(now) and model in b.models]

    # -- what each holds -------------------------------------------------------------

    def runner(self, b: Backend, model: str) -> Runner | None:
        return self._held[id(b)].runners.get(model)

    def resident(self, b: Backend, model: str, ctx: int | None) -> Runner | None:
        """The runner that would serve ``model`` with ``ctx`` on ``b`` without a load."""
        r = self._held[id(b)].runners.get(model)
        return r if r is not None and r.fits(ctx) else None

    def ready_with_slot(self, model: str, ctx: int | None, now: float,
                        exclude: frozenset[str] = frozenset()) -> list[Backend]:
        """Routable backends with a free slot where ``model`` is resident, ready, and
        fits ``ctx``: where a job runs at once (the request path's common case)."""
        out = []
        held = self._held
        for b in self.backends:
            if b.in_flight >= b.max_concurrency or (exclude and b.name in exclude):
                continue
            r = held[id(b)].runners.get(model)
            if (r is not None and not r.loading and r.ready_at <= now
                    and (ctx is None or r.ctx is None or r.ctx == ctx) and b.routable(now)):
                out.append(b)
        return out

    def guarded(self, b: Backend, r: Runner, now: float) -> bool:
        """The no-flap guard: a model loaded less than its load time ago is not evicted
        while it is in use — requests running or waiting for it, or asked for again
        since its load. (One that was loaded for a single request nobody repeated may
        go: evicting it costs nothing.)"""
        if now - r.loaded_at >= self.load_time(b, r.model):
            return False
        if r.running > 0 or r.loading:
            return True
        stats = self.models.get(r.model)
        return stats is not None and (stats.queued > 0 or (
            stats.arrivals.last is not None and stats.arrivals.last >= r.loaded_at))

    def protected_until(self, now: float) -> float:
        """When the soonest no-flap guard ends (a model loaded less than its load time
        ago is not evicted); inf when none is in force. Waiting work is looked at
        again then: a load that was not allowed may be."""
        soonest = math.inf
        for b in self.backends:
            for r in self._held[id(b)].runners.values():
                ends = r.loaded_at + self.load_time(b, r.model)
                if now < ends < soonest:
                    soonest = ends
        return soonest

    def ready_backends(self, model: str, ctx: int | None, now: float,
                       exclude: frozenset[str] = frozenset()) -> list[Backend]:
        """Routable backends where ``model`` is resident, ready and fits ``ctx``,
        whether or not they have a free slot (with several replicas the shared store
        knows that; this replica's count is only an estimate)."""
        out = []
        for b in self.backends:
            if exclude and b.name in exclude:
                continue
            r = self._held[id(b)].runners.get(model)
            if (r is not None and not r.loading and r.ready_at <= now
                    and (ctx is None or r.ctx is None or r.ctx == ctx) and b.routable(now)):
                out.append(b)
        return out

    def loading(self, b: Backend, model: str, ctx: int | None, now: float) -> None:
        """Another replica sent ``model`` to ``b`` as a load: the same view as after a
        load of one's own (what Ollama evicts for it is gone, the model is loading),
        without a request of this replica running on it."""
        h = self._held.get(id(b))
        if h is None:
            return
        r = h.runners.get(model)
        if r is not None and r.fits(ctx):
            return
        for victim in self.victims(b, model):
            h.runners.pop(victim.model, None)
        h.runners[model] = Runner(model, ctx, now + self.load_time(b, model), now,
                                  loading=True)
        self._mirror(b, h)

    def backend(self, name: str) -> Backend | None:
        for b in self.backends:
            if b.name == name:
                return b
        return None

    def victims(self, b: Backend, model: str) -> list[Runner]:
        """What Ollama evicts on ``b`` to load ``model``: nothing while it has room; a
        runner of the same model with another context length (a reload); else one
        runner, as Ollama picks it — an idle one first (the least recently used
        here: the keep-alive order Ollama uses is not visible), else a busy one,
        whose requests the load then waits for."""
        h = self._held[id(b)]
        same = h.runners.get(model)
        if same is not None:
            return [same]
        if len(h.runners) < h.capacity():
            return []
        others = sorted(h.runners.values(), key=lambda r: (r.running > 0 or r.loading,
                                                          r.last_used))
        return others[:1]

    def load_time(self, b: Backend, model: str) -> float:
        e = self._held[id(b)].load_times.get(model)
        if e is not None and e.value is not None:
            return e.value
        # Measured by another replica (several replicas on one state store).
        return self._remote_loads.get((b.name, model), self.default_load_time)

    def service_time(self, model: str) -> float:
        stats = self.models.get(model)
        own = stats.service if stats is not None else None
        remote = self._remote_service.get(model)
        if remote is None:
            return DEFAULT_SERVICE_S if own is None else own.get(DEFAULT_SERVICE_S)
        if own is None or own.value is None:
            return remote[0]
        # Both: weighted by how many requests each has seen.
        total = own.samples + remote[1]
        return (own.value * own.samples + remote[0] * remote[1]) / total

    def demand(self, model: str, now: float) -> float:
        stats = self.models.get(model)
        own = 0.0 if stats is None else stats.arrivals.rate(now)
        return own + self._remote_rates.get(model, 0.0)

    # -- several replicas: what each learned, shared ------------------------------

    def shareable(self, now: float) -> dict[str, object]:
        """What this replica learned, for the others: per model its demand here and
        its service time (with the number of requests behind it); per backend the
        load times measured."""
        models = {name: [round(st.arrivals.rate(now), 4),
                         None if st.service.value is None else round(st.service.value, 4),
                         st.service.samples]
                  for name, st in self.models.items()}
        loads = {b.name: {m: round(e.value, 3) for m, e in self._held[id(b)].load_times.items()
                          if e.value is not None}
                 for b in self.backends}
        return {"models": models, "loads": {b: per for b, per in loads.items() if per}}

    def adopt_remote(self, snapshots: Iterable[dict[str, object]]) -> None:
        """What the other replicas learned (their ``shareable``): demand adds up,
        service times are weighed by their requests, load times fill in the ones
        not measured here."""
        rates: dict[str, float] = {}
        service: dict[str, tuple[float, int]] = {}
        loads: dict[tuple[str, str], list[float]] = {}
        for snap in snapshots:
            models = snap.get("models")
            if isinstance(models, dict):
                for name, figures in models.items():
                    if not isinstance(figures, list) or len(figures) != 3:
                        continue
                    rate, value, samples = figures
                    rates[name] = rates.get(name, 0.0) + float(rate or 0.0)
                    if value is not None and samples:
                        v, n = service.get(name, (0.0, 0))
                        service[name] = ((v * n + float(value) * int(samples))
                                         / (n + int(samples)), n + int(samples))
            by_backend = snap.get("loads")
            if isinstance(by_backend, dict):
                for backend, per_model in by_backend.items():
                    if isinstance(per_model, dict):
                        for model, seconds in per_model.items():
                            loads.setdefault((backend, model), []).append(float(seconds))
        self._remote_rates = rates
        self._remote_service = service
        self._remote_loads = {k: sum(v) / len(v) for k, v in loads.items()}

    def resident_slots(self, model: str, ctx: int | None, now: float,
                       exclude: frozenset[str] = frozenset()) -> int:
        """Slots of routable backends where ``model`` is resident and ready."""
        n = 0
        for b in self.backends:
            if b.name in exclude or not b.routable(now):
                continue
            r = self._held[id(b)].runners.get(model)
            if r is not None and r.fits(ctx) and r.ready_at <= now:
                n += b.max_concurrency
        return n

    def copies(self, model: str, now: float) -> int:
        """Routable backends holding ``model`` (ready or loading)."""
        return sum(1 for b in self.backends
                   if b.routable(now) and model in self._held[id(b)].runners)

    # -- what Corral learns ----------------------------------------------------------

    def observe_ps(self, b: Backend, entries: Iterable[dict[str, object]],
                   now: float) -> bool:
        """The backend's ``/api/ps``; False when its entries lack what residency needs
        (the caller warns once; Corral's own observations stay in force)."""
        h = self._held[id(b)]
        seen: dict[str, int | None] = {}
        complete = True
        for e in entries:
            name = e.get("name") or e.get("model")
            if not isinstance(name, str) or not name:
                complete = False
                continue
            ctx = e.get("context_length")
            seen[normalize_model(name)] = ctx if isinstance(ctx, int) and ctx > 0 else None
        runners: dict[str, Runner] = {}
        for model, ctx in seen.items():
            r = h.runners.get(model)
            if r is None or (ctx is not None and r.ctx is not None and r.ctx != ctx):
                # Loaded by someone else, at a time Corral does not know: not "just
                # loaded" (the no-flap guard is for loads Corral saw happen).
                r = Runner(model, ctx, now, -math.inf, last_used=now)
            elif ctx is not None:
                r.ctx = ctx
            runners[model] = r
        # A load Corral started and has not seen finish yet stays (/api/ps may list it
        # only once it is in), unless it is overdue by a whole load time — it failed —
        # and so does a model Corral has requests running on.
        for model, r in h.runners.items():
            if model in runners:
                continue
            overdue = now > r.ready_at + self.load_time(b, model)
            if r.running > 0 or (r.loading and not overdue):
                runners[model] = r
        h.runners = runners
        h.seen_max = max(h.seen_max, len(seen))
        h.ps_trusted = complete
        self._mirror(b, h)
        return complete

    def on_arrival(self, model: str, now: float) -> None:
        self.model(model).arrivals.add(now)

    def on_dispatch(self, b: Backend, model: str, ctx: int | None, now: float,
                    load: bool) -> None:
        """A request for ``model`` takes a slot on ``b``. As a load, the runners
        Ollama will evict for it are gone from Corral's view at once (so nothing
        more is routed to them) and the model is loading there."""
        h = self._held[id(b)]
        r = h.runners.get(model)
        if load or r is None or not r.fits(ctx):
            for victim in self.victims(b, model):
                h.runners.pop(victim.model, None)
            running = r.running if r is not None and r.fits(ctx) else 0
            r = Runner(model, ctx, now + self.load_time(b, model), now, running=running,
                       loading=True)
            h.runners[model] = r
            self._mirror(b, h)
        r.running += 1
        r.last_used = now
        self.model(model).running += 1

    def on_release(self, b: Backend, model: str, now: float) -> None:
        h = self._held.get(id(b))
        r = h.runners.get(model) if h is not None else None
        if r is not None and r.running > 0:
            r.running -= 1
            r.last_used = now
        stats = self.models.get(model)
        if stats is not None and stats.running > 0:
            stats.running -= 1

    def on_ready(self, b: Backend, model: str, ctx: int | None, now: float) -> bool:
        """``b`` answered a request for ``model``: it is resident and ready there now.
        True when that is news (a load Corral caused, or one it did not know of)."""
        h = self._held.get(id(b))
        if h is None:
            return False
        r = h.runners.get(model)
        if r is not None and r.fits(ctx) and not r.loading:
            return False
        if r is None or not r.fits(ctx):
            r = Runner(model, ctx, now, now, last_used=now)
            h.runners[model] = r
        r.loading = False
        r.ready_at = r.loaded_at = now
        self._mirror(b, h)
        return True

    def on_complete(self, b: Backend, model: str, *, held_s: float, load_s: float | None,
                    loaded: bool, tokens_out: int, eval_s: float | None) -> None:
        """A request ended with an answer: learn its service time, load time and
        decode speed. ``load_s`` is Ollama's ``load_duration``; it counts as a load
        time sample only when the request did load the model."""
        stats = self.model(model)
        if loaded and load_s is not None and load_s > 0:
            h = self._held.get(id(b))
            if h is not None:
                h.load_times.setdefault(model, Ewma(alpha=0.3)).add(load_s)
        # Ollama's load_duration is the wait for the model (a few milliseconds when it
        # is in): what is left is the time the request needed a slot for.
        service = held_s - (load_s or 0.0)
        if service > 0:
            stats.service.add(service)
        if eval_s is not None and eval_s > 0 and tokens_out > 0:
            stats.decode.add(tokens_out / eval_s)

    def on_queue(self, model: str, delta: int) -> None:
        stats = self.model(model)
        stats.queued = max(0, stats.queued + delta)

    @staticmethod
    def _mirror(b: Backend, h: Holding) -> None:
        # ``Backend.loaded`` is the read-only view the status page, metrics and the
        # router read: the models ready or loading there.
        b.loaded = frozenset(h.runners)

    # -- what is shown ---------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, object]:
        """Everything above as JSON-ready data (``/corral/status``, the dashboard,
        ``corral status``): per backend what it holds, per model its figures."""
        backends = {}
        for b in self.backends:
            h = self._held[id(b)]
            backends[b.name] = {
                "max_models": h.capacity(),
                "max_models_from": "config" if h.max_models is not None else "learned",
                "ps_trusted": h.ps_trusted,
                "holds": [{
                    "model": r.model, "state": "loading" if r.loading else "ready",
                    "context_length": r.ctx, "running": r.running,
                    "load_time_s": round(self.load_time(b, r.model), 3),
                    "load_time_learned": r.model in h.load_times
                    or (b.name, r.model) in self._remote_loads,
                    "resident_for_s": round(max(now - r.loaded_at, 0.0), 1),
                } for r in sorted(h.runners.values(), key=lambda r: r.model)],
                "load_times_s": {m: round(e.get(self.default_load_time), 3)
                                 for m, e in sorted(h.load_times.items())},
            }
        models = []
        for name in sorted(self.models):
            stats = self.models[name]
            models.append({
                "model": name,
                "demand_per_s": round(stats.arrivals.rate(now), 3),
                "queued": stats.queued, "running": stats.running,
                "service_s": None if stats.service.value is None
                else round(stats.service.value, 3),
                "decode_tokens_per_s": None if stats.decode.value is None
                else round(stats.decode.value, 1),
                "resident_on": [b.name for b in self.backends
                                if name in self._held[id(b)].runners],
            })
        return {"default_load_time_s": self.default_load_time, "backends": backends,
                "models": models}
