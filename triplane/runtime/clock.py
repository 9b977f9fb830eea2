"""Injected clocks: domain code never reads the wall clock directly, so expiry,
quiet hours and windows are testable without sleeping."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_us(self) -> int:
        """Microseconds since the Unix epoch (UTC)."""
        ...


class SystemClock:
    def now_us(self) -> int:
        return time.time_ns() // 1000


class ManualClock:
    """A clock that only moves when told to."""

    def __init__(self, start_us: int = 1_790_000_000_000_000) -> None:
        self._now_us = start_us

    def now_us(self) -> int:
        return self._now_us

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "a clock never goes back"
        self._now_us += int(seconds * 1_000_000)

    def set_us(self, now_us: int) -> None:
        self._now_us = now_us
