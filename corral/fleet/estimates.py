"""Small online estimators (pure: no clock, ``now`` is a parameter)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class Ewma:
    """Exponentially weighted mean of samples; ``None`` until the first sample."""

    alpha: float = 0.2
    value: float | None = None
    samples: int = 0

    def add(self, x: float) -> None:
        self.samples += 1
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)

    def get(self, default: float) -> float:
        return default if self.value is None else self.value


@dataclass(slots=True)
class ArrivalRate:
    """Requests per second, recently.

    A count that decays with time constant ``tau`` (its rate is count ÷ tau), capped at
    one request per the time since the last one: a model asked for four times a
    second that has not been asked for in three seconds is not still in demand at four
    a second — its demand is at most a third of a request per second, and falling. The
    cap is what lets an idle model be recognised as idle within seconds, while the
    decaying count keeps a steadily used model's rate from jumping around.
    """

    tau: float = 30.0
    count: float = 0.0
    updated: float = 0.0
    last: float | None = None

    def add(self, now: float) -> None:
        self.count = self._decayed(now) + 1.0
        self.updated = now
        self.last = now

    def _decayed(self, now: float) -> float:
        dt = now - self.updated
        return self.count * math.exp(-dt / self.tau) if dt > 0 else self.count

    def rate(self, now: float) -> float:
        if self.last is None:
            return 0.0
        rate = self._decayed(now) / self.tau
        gap = now - self.last
        return min(rate, 1.0 / gap) if gap > 0 else rate
