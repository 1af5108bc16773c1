"""Per-pool circuit breaker: opens on consecutive failures, half-opens after a cool-down."""
from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.failures = 0
        self.opened_at = 0.0
        self._state = BreakerState.CLOSED
        self.trial_in_flight = False

    @property
    def state(self) -> BreakerState:
        if self._state == BreakerState.OPEN and self.clock() - self.opened_at >= self.cooldown_s:
            self._state = BreakerState.HALF_OPEN
            self.trial_in_flight = False
        return self._state

    def allow(self) -> bool:
        """May a request go to this pool now? In half-open, one trial at a time."""
        st = self.state
        if st == BreakerState.CLOSED:
            return True
        if st == BreakerState.HALF_OPEN and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self._state = BreakerState.CLOSED
        self.trial_in_flight = False

    def failure(self) -> None:
        self.failures += 1
        if self._state == BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self._state = BreakerState.OPEN
            self.opened_at = self.clock()
            self.trial_in_flight = False
