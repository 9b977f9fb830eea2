"""A circuit breaker in front of Triton.

Closed: calls go through; `failure_threshold` consecutive failures open it.
Open: calls skip Triton (straight to the fallback chain) for `open_s`.
Half-open: after `open_s`, one probe call at a time goes through; success
closes the circuit, failure opens it again for another `open_s`.
Time comes from an injected monotonic clock, so tests never sleep.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int,
        open_s: float,
        monotonic_s: Callable[[], float] = time.monotonic,
    ) -> None:
        assert failure_threshold >= 1 and open_s > 0
        self._threshold = failure_threshold
        self._open_s = open_s
        self._now = monotonic_s
        self._failures = 0
        self._opened_at_s = 0.0
        self._state = BreakerState.CLOSED
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._now() - self._opened_at_s >= self._open_s:
            return BreakerState.HALF_OPEN
        return self._state

    def allow(self) -> bool:
        """Whether this call may go to Triton (a half-open probe is claimed)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._state = BreakerState.HALF_OPEN
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._probe_in_flight = False
        self._state = BreakerState.CLOSED

    def record_failure(self) -> None:
        self._failures += 1
        was_probe = self._probe_in_flight
        self._probe_in_flight = False
        if was_probe or self._failures >= self._threshold:
            self._state = BreakerState.OPEN
            self._opened_at_s = self._now()

    def release(self) -> None:
        """An allowed call that was not made after all (e.g. no time left)."""
        self._probe_in_flight = False
