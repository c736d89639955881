"""Pick one backend among equally good ones (pure: no I/O, no clock).

Which backends are candidates at all — up, not already tried by the job, with a free
slot, and where its model is resident or worth loading — is the placement rule's
business (``corral.scheduler.placement``). Among the candidates it hands over, the
router applies session affinity (under a load bound) and the strategy; ties are
broken round-robin so that equal backends share the work.
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
        # Read by the placement rule: False routes to any backend with the model and a
        # free slot, resident or not (the strategy alone decides).
        self.prefer_loaded = prefer_loaded
        self._rr = 0
        self._rng = rng or random.Random()

    def pick(self, pool: Sequence[Backend], affinity: str | None = None) -> Backend:
        """One of ``pool`` (not empty)."""
        if affinity is not None:
            for b in pool:
                # Session affinity only under a load bound: never pile onto a busy one.
                if b.name == affinity and b.in_flight * 2 < b.max_concurrency + 1:
                    return b
        if len(pool) == 1:
            return pool[0]
        if self.strategy == "random_two":
            a, b = self._rng.sample(list(pool), 2)
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
