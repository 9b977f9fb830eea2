"""Deadlines are budgets (ARCHITECTURE.md rule 7).

Each hop takes the caller's remaining deadline, keeps its own budget for its own
work, and gives the next hop what is left; it never waits past the deadline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from triplane.runtime.errors import DeadlineExceeded


@dataclass(frozen=True, slots=True)
class Deadline:
    """An absolute monotonic deadline (None: the caller set none)."""

    at_monotonic_s: float | None

    @staticmethod
    def from_remaining(remaining_s: float | None, cap_s: float | None = None) -> Deadline:
        if remaining_s is None and cap_s is None:
            return Deadline(None)
        candidates = [v for v in (remaining_s, cap_s) if v is not None]
        return Deadline(time.monotonic() + min(candidates))

    def remaining_s(self) -> float | None:
        if self.at_monotonic_s is None:
            return None
        return self.at_monotonic_s - time.monotonic()

    def expired(self) -> bool:
        remaining = self.remaining_s()
        return remaining is not None and remaining <= 0

    def for_next_hop(self, own_budget_ms: float, hop_budget_ms: float) -> float:
        """Timeout (s) for a downstream call: its own budget, capped by what is
        left of ours once our own work is kept aside."""
        hop_s = hop_budget_ms / 1000.0
        remaining = self.remaining_s()
        if remaining is None:
            return hop_s
        left = remaining - own_budget_ms / 1000.0
        if left <= 0:
            raise DeadlineExceeded("DEADLINE_BUDGET_EXHAUSTED", "no time left for the next hop")
        return min(hop_s, left)

    def check(self, what: str) -> None:
        if self.expired():
            raise DeadlineExceeded("DEADLINE_EXCEEDED", f"deadline passed before {what}")
