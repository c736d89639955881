"""A backend's runtime state: slots, health, installed and loaded models.

The state is mutated only from the event loop (no locks needed); routing reads it
synchronously, so a decision never awaits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from corral.backends.breaker import Breaker, BreakerState
from corral.config import BackendConfig


def normalize_model(name: str) -> str:
    """Ollama treats ``llama3.2`` and ``llama3.2:latest`` as one model: so do we."""
    name = name.strip()
    if not name:
        return name
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


@dataclass(eq=False, slots=True)
class Backend:
    name: str
    url: str
    max_concurrency: int
    weight: int = 1
    in_flight: int = 0
    # Until the first successful probe we do not know what a backend serves: it is
    # not routable, so a request never lands on a backend that lacks its model.
    up: bool = False
    models: frozenset[str] = frozenset()
    loaded: frozenset[str] = frozenset()
    vram_bytes: int = 0          # GPU memory the resident models take (/api/ps size_vram)
    draining: bool = False
    # Passive health (max_fails/fail_timeout): failures counted on real requests.
    breaker: Breaker = field(default_factory=Breaker)

    @classmethod
    def from_config(cls, cfg: BackendConfig, breaker: Breaker | None = None) -> Backend:
        return cls(name=cfg.name, url=cfg.url, max_concurrency=cfg.max_concurrency,
                   weight=cfg.weight, breaker=breaker or Breaker())

    @property
    def free_slots(self) -> int:
        return self.max_concurrency - self.in_flight

    def routable(self, now: float) -> bool:
        if not self.up or self.draining:
            return False
        breaker = self.breaker
        return breaker.state is BreakerState.CLOSED or breaker.available(now)

    def has_model(self, model: str) -> bool:
        return model in self.models
