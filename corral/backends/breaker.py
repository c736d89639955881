"""Passive health as a circuit breaker (pure: ``now`` is a parameter).

nginx's ``max_fails``/``fail_timeout`` (REFERENCE A3) with two deliberate changes:

- failures are counted within a sliding ``fail_timeout`` window, so a backend that
  fails once an hour is never taken out by old failures (nginx keeps counting until
  a post-timeout success resets the count);
- after ``fail_timeout`` exactly one trial request is let through (half-open); its
  success closes the breaker, its failure opens it for another ``fail_timeout``.
  nginx also lets one request through per ``fail_timeout``, but any concurrent
  request may pick the peer in the same instant.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class Breaker:
    max_fails: int = 3
    fail_timeout: float = 30.0
    state: BreakerState = BreakerState.CLOSED
    open_until: float = 0.0
    trial_in_flight: bool = False
    _failures: deque[float] = field(default_factory=deque)

    def available(self, now: float) -> bool:
        """May a new request be sent? (Does not change state: routing only reads.)"""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and now < self.open_until:
            return False
        return not self.trial_in_flight

    def on_dispatch(self, now: float) -> None:
        """A request was sent: past the open period it is the one trial."""
        if self.state is BreakerState.OPEN and now >= self.open_until:
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.HALF_OPEN:
            self.trial_in_flight = True

    def on_success(self) -> None:
        self.state = BreakerState.CLOSED
        self.trial_in_flight = False
        self._failures.clear()

    def on_failure(self, now: float) -> bool:
        """Count a failure; True when this one opened the breaker."""
        if self.max_fails <= 0:
            return False
        if self.state is BreakerState.HALF_OPEN or (
                self.state is BreakerState.OPEN and now >= self.open_until):
            self._open(now)
            return True
        if self.state is BreakerState.OPEN:
            return False
        self._failures.append(now)
        while self._failures and self._failures[0] <= now - self.fail_timeout:
            self._failures.popleft()
        if len(self._failures) >= self.max_fails:
            self._open(now)
            return True
        return False

    def on_abandon(self) -> None:
        """The trial ended without a verdict (client left first): allow another."""
        self.trial_in_flight = False

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self.open_until = now + self.fail_timeout
        self.trial_in_flight = False
        self._failures.clear()

    def retry_after(self, now: float) -> float:
        return max(self.open_until - now, 0.0) if self.state is BreakerState.OPEN else 0.0
