"""Shared by every benchmark suite: percentiles, the results file, the table.

`bench/results.json` is one flat JSON object; keys end with their unit; each
suite merges its keys into what is there (the file is git-ignored).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

RESULTS_PATH = Path(
    os.environ.get("TRIPLANE_BENCH_RESULTS", Path(__file__).parent / "results.json")
)


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def merge_results(values: Mapping[str, float | int | str]) -> dict[str, object]:
    current: dict[str, object] = {}
    if RESULTS_PATH.exists():
        try:
            current = json.loads(RESULTS_PATH.read_text())
        except json.JSONDecodeError:
            current = {}
    current.update(values)
    RESULTS_PATH.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    return current


def print_table(title: str, rows: Sequence[tuple[str, object, str]]) -> None:
    """rows: (metric, value, target/notes)."""
    width = max([len(r[0]) for r in rows] + [len("metric")])
    print(f"\n== {title} ==")
    print(f"{'metric'.ljust(width)}  {'value':>14}  target / note")
    for name, value, note in rows:
        shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
        print(f"{name.ljust(width)}  {shown:>14}  {note}")
