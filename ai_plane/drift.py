"""Drift: population stability index (PSI) of live scores against the
training baseline (decile edges on held-out data), exported as Prometheus
gauges. Live values sit in a bounded ring; the PSI is recomputed every
`update_every` observations, never on the request path's hot loop.

Each recomputed value is also a point of the model's drift history, which
GetModelDrift serves. The history is shared state, kept where the model
registry keeps its own (ai_plane/registry.py: PostgreSQL for replicas, the
registry's file for a single dev pod), so any replica serves what every
replica recorded and a restart keeps it. Points are keyed by model, version,
series and time slot (`ai.drift.history_slot_s`): a monitor keeps only its
latest value per slot until the plane writes it out (every
`ai.drift.history_flush_s`, off the request path), two replicas recomputing
in the same slot write one point (the later write wins), and the registry
keeps the last `ai.drift.history_points` slots per model."""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

from prometheus_client import Gauge

PSI_GAUGE = Gauge(
    "triplane_ai_psi",
    "Population stability index of live values against the training baseline",
    ["model", "version", "series"],
)

_EPSILON = 1e-4


class DriftPoint(NamedTuple):
    """One point of a series' drift history: the PSI recomputed at `at_us`,
    the latest of its slot (at_us // ai.drift.history_slot_s)."""

    model: str
    version: int
    series: str
    slot: int
    at_us: int
    psi: float


def bin_fractions(values: Sequence[float], edges: Sequence[float]) -> list[float]:
    counts = [0] * (len(edges) + 1)
    for value in values:
        counts[bisect.bisect_right(edges, value)] += 1
    total = max(1, len(values))
    return [c / total for c in counts]


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, _EPSILON), max(a, _EPSILON)
        total += (a - e) * math.log(a / e)
    return total


def baseline(values: Sequence[float], bins: int) -> tuple[list[float], list[float]]:
    """(edges, expected fractions) of a training distribution: quantile edges,
    de-duplicated (count features have many ties), and the fractions per bin."""
    ordered = sorted(values)
    if not ordered:
        return [], [1.0]
    raw = [ordered[min(len(ordered) - 1, (len(ordered) * i) // bins)] for i in range(1, bins)]
    edges = sorted(set(raw))
    return edges, bin_fractions(ordered, edges)


def bin_of(value: float, edges: Sequence[float]) -> int:
    return bisect.bisect_right(edges, value)


class PsiMonitor:
    """PSI of one series (a model's scores, or one feature) against its
    training baseline (bin edges and expected fractions).

    Bin counts of the live window are kept incrementally (a value entering and
    the one it pushes out of the ring each move one count), so an update is
    O(bins) and never stalls the request path."""

    def __init__(
        self,
        model: str,
        version: int,
        series: str,
        edges: Sequence[float],
        expected: Sequence[float],
        window: int,
        every: int,
        slot_us: int = 0,
        now_us: Callable[[], int] | None = None,
    ) -> None:
        assert window > 0 and every > 0 and len(expected) == len(edges) + 1
        assert slot_us >= 0
        self.model = model
        self.version = version
        self.series = series
        # Recomputations not yet written to the shared history: slot ->
        # (when, PSI), the latest of each slot (0 slot_us: none kept).
        self.pending: dict[int, tuple[int, float]] = {}
        self._slot_us = slot_us
        self._now_us = now_us
        self.edges = list(edges)
        self._expected = list(expected)
        self._bins: deque[int] = deque()
        self._window = window
        self._counts = [0] * len(self._expected)
        self._every = every
        self._seen = 0
        self.value = 0.0
        self._gauge = PSI_GAUGE.labels(model=model, version=str(version), series=series)

    def observe(self, value: float) -> None:
        index = bin_of(value, self.edges)
        self._bins.append(index)
        self._counts[index] += 1
        if len(self._bins) > self._window:
            self._counts[self._bins.popleft()] -= 1
        self._seen += 1
        if self._seen % self._every == 0:
            self.update()

    def update(self) -> float:
        total = len(self._bins)
        if total:
            self.value = psi(self._expected, [c / total for c in self._counts])
            self._gauge.set(self.value)
            if self._now_us is not None and self._slot_us:
                at_us = self._now_us()
                self.pending[at_us // self._slot_us] = (at_us, self.value)
        return self.value

    def take_pending(self) -> list[DriftPoint]:
        """The recomputations not yet written out, as history points; the
        monitor forgets them (a failed write hands them back with `keep`)."""
        taken = [
            DriftPoint(self.model, self.version, self.series, slot, at_us, value)
            for slot, (at_us, value) in sorted(self.pending.items())
        ]
        self.pending.clear()
        return taken

    def keep(self, points: Sequence[DriftPoint]) -> None:
        """Points whose write failed, kept for the next one (a newer value of
        the same slot recorded meanwhile stays)."""
        for point in points:
            self.pending.setdefault(point.slot, (point.at_us, point.psi))

    @property
    def observed(self) -> int:
        """Values in the live window now."""
        return len(self._bins)
