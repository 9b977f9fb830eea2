"""Shared by every benchmark suite: percentiles, the results file, the table.

`bench/results.json` is one flat JSON object; keys end with their unit; each
suite merges its keys into what is there (the file is git-ignored).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


@dataclass(frozen=True)
class ProcStat:
    ppid: int
    comm: str
    cpu_s: float  # user + system


def proc_stats() -> dict[int, ProcStat]:
    """Every live process: its parent, command name and CPU seconds so far."""
    stats: dict[int, ProcStat] = {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = path.read_text()
            comm = text[text.index("(") + 1 : text.rindex(")")]
            fields = text[text.rindex(")") + 2 :].split()
            stats[int(path.parent.name)] = ProcStat(
                int(fields[1]), comm, (int(fields[11]) + int(fields[12])) * TICK_S
            )
        except (OSError, ValueError, IndexError):
            continue
    return stats


def tree_cpu_s(root_pid: int, stats: Mapping[int, ProcStat] | None = None) -> float:
    """CPU seconds of a live process and all its descendants."""
    stats = stats if stats is not None else proc_stats()
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        children.setdefault(stat.ppid, []).append(pid)
    total, todo = 0.0, [root_pid]
    while todo:
        pid = todo.pop()
        found = stats.get(pid)
        total += found.cpu_s if found is not None else 0.0
        todo.extend(children.get(pid, ()))
    return total


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
