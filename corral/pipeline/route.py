"""Choose a backend for a job (pure: the caller passes ``now``; no I/O).

Among backends that are routable, have the model, have a free slot and were not
already tried by this job: prefer those where the model is resident (no swap), then
apply the strategy. Ties are broken round-robin so equal backends share the work.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

from corral.backends.backend import Backend

Strategy = Literal["least_conn", "round_robin", "random_two"]


class Router:
    def __init__(self, strategy: Strategy = "least_conn", prefer_loaded: bool = True,
                 rng: random.Random | None = None) -> None:
        self.strategy = strategy
        self.prefer_loaded = prefer_loaded
        self._rr = 0
        self._rng = rng or random.Random()

    def candidates(self, backends: Sequence[Backend], model: str, now: float,
                   exclude: frozenset[str] = frozenset()) -> list[Backend]:
        return [b for b in backends
                if b.in_flight < b.max_concurrency and b.routable(now)
                and model in b.models and b.name not in exclude]

    def choose(self, backends: Sequence[Backend], model: str, now: float,
               exclude: frozenset[str] = frozenset(),
               affinity: str | None = None) -> Backend | None:
        pool = self.candidates(backends, model, now, exclude)
        if not pool:
            return None
        if affinity is not None:
            for b in pool:
                # Session affinity only under a load bound: never pile onto a busy one.
                if b.name == affinity and b.in_flight * 2 < b.max_concurrency + 1:
                    return b
        if self.prefer_loaded and len(pool) > 1:
            loaded = [b for b in pool if model in b.loaded]
            if loaded:
                pool = loaded
        if len(pool) == 1:
            return pool[0]
        if self.strategy == "random_two":
            a, b = self._rng.sample(pool, 2)
            return a if _load_lt(a, b) or (not _load_lt(b, a) and a.weight >= b.weight) else b
        if self.strategy == "least_conn":
            best = pool[0]
            for b in pool[1:]:
                if _load_lt(b, best):
                    best = b
            pool = [b for b in pool if not _load_lt(best, b)]   # all tied on the minimum
            if len(pool) == 1:
                return pool[0]
        self._rr += 1
        return pool[self._rr % len(pool)]


def _load_lt(a: Backend, b: Backend) -> bool:
    """a is less loaded than b: in-flight relative to slots (and to weight)."""
    return a.in_flight * b.max_concurrency * b.weight < b.in_flight * a.max_concurrency * a.weight
