"""A circuit breaker in front of Triton.

Closed: calls go through. It opens when, over the last `window_s`, at least
`failure_threshold` calls failed and they are at least `failure_rate` of the
calls made (Hystrix's rule: a volume floor and an error rate). A run of
failures alone opens it as soon as it reaches the threshold; a few failures
among many successes do not. That matters on a busy host: a 50 ms stall of
this process makes every call in flight miss its 20 ms budget at once, and a
breaker counting consecutive failures would then send a whole open period's
traffic (500 calls at 500/s) past a Triton that is perfectly healthy.
Open: calls skip Triton (straight to the fallback chain) for `open_s`.
Half-open: after `open_s`, one probe call at a time goes through; success
closes the circuit and forgets the window, failure opens it again for
another `open_s`.
Time comes from an injected monotonic clock, so tests never sleep.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

# The window is kept as this many buckets of window_s / BUCKETS each.
BUCKETS = 10
# The bucket number of a slot that has counted nothing (far in the past).
_NEVER = -(2**62)


class BreakerState(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int,
        open_s: float,
        failure_rate: float = 0.5,
        window_s: float = 1.0,
        monotonic_s: Callable[[], float] = time.monotonic,
    ) -> None:
        assert failure_threshold >= 1 and open_s > 0 and window_s > 0
        assert 0 < failure_rate <= 1
        self._threshold = failure_threshold
        self._open_s = open_s
        self._rate = failure_rate
        self._bucket_s = window_s / BUCKETS
        self._now = monotonic_s
        # Ring of (calls, failures) per bucket, and the bucket number each
        # slot last counted (a slot from an older turn of the ring is stale).
        self._calls = [0] * BUCKETS
        self._failures = [0] * BUCKETS
        self._slot_bucket = [_NEVER] * BUCKETS
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

    def _count(self, failed: bool) -> int:
        """Counts one call in the current bucket; returns the bucket number."""
        bucket = int(self._now() / self._bucket_s)
        slot = bucket % BUCKETS
        if self._slot_bucket[slot] != bucket:
            self._slot_bucket[slot] = bucket
            self._calls[slot] = 0
            self._failures[slot] = 0
        self._calls[slot] += 1
        self._failures[slot] += failed
        return bucket

    def _window(self, bucket: int) -> tuple[int, int]:
        """(calls, failures) over the buckets of the last window_s."""
        calls = failures = 0
        for slot in range(BUCKETS):
            if bucket - self._slot_bucket[slot] < BUCKETS:
                calls += self._calls[slot]
                failures += self._failures[slot]
        return calls, failures

    def _forget(self) -> None:
        self._slot_bucket = [_NEVER] * BUCKETS

    def record_success(self) -> None:
        if self._state is not BreakerState.CLOSED:
            self._forget()  # a good probe: the failures before it are history
        self._probe_in_flight = False
        self._state = BreakerState.CLOSED
        self._count(failed=False)

    def record_failure(self) -> None:
        was_probe = self._probe_in_flight
        self._probe_in_flight = False
        calls, failures = self._window(self._count(failed=True))
        # Calls still in flight when the circuit opened fail too: they neither
        # extend the open period nor reopen a half-open one (the probe decides).
        opens = self._state is BreakerState.CLOSED and (
            failures >= self._threshold and failures >= self._rate * calls
        )
        if was_probe or opens:
            self._state = BreakerState.OPEN
            self._opened_at_s = self._now()

    def release(self) -> None:
        """An allowed call that was not made after all (e.g. no time left)."""
        self._probe_in_flight = False
