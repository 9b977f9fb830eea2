"""Charts drawn on the server as inline SVG (no script, nothing fetched):
`line_chart` for values over time or versions, `interval_chart` for an
estimate with its confidence interval per row. Every chart carries a <title>
and <desc> (read by screen readers) and the figures stay in a table on the
page that draws it: the chart is never the only way to read them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH = 640
ROW_HEIGHT = 28
PLOT_HEIGHT = 220
MARGIN_LEFT = 56
MARGIN_RIGHT = 16
MARGIN_TOP = 16
MARGIN_BOTTOM = 40
COLOURS = ("#0a58ca", "#b42318", "#1a7f37", "#8250df", "#bc4c00", "#57606a")
TICKS = 5
# Legend entries per line under a line chart, and a line's height.
LEGEND_PER_ROW = 4
LEGEND_ROW_HEIGHT = 14


@dataclass(frozen=True)
class Series:
    """One line: its name and (x, y) points, x ascending."""

    name: str
    points: Sequence[tuple[float, float]]


@dataclass(frozen=True)
class Interval:
    """One row of an interval chart: an estimate and its interval."""

    label: str
    value: float
    low: float
    high: float


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _span(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if low == high:
        return low - 1.0, high + 1.0
    return low, high


def _frame(title: str, desc: str, height: int) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" '
        f'width="{WIDTH}" height="{height}" role="img" class="chart">',
        f"<title>{escape(title)}</title><desc>{escape(desc)}</desc>",
    ]


def line_chart(
    title: str,
    series: Sequence[Series],
    *,
    x_labels: dict[float, str] | None = None,
    y_label: str = "",
    threshold: float | None = None,
) -> Markup:
    """Lines of `series` on shared axes; `x_labels` names chosen x ticks (else
    the x values themselves); `threshold` draws a dashed horizontal rule
    (e.g. an alert level). No point at all: a chart that says so."""
    legend_rows = max(1, math.ceil(len(series) / LEGEND_PER_ROW))
    height = MARGIN_TOP + PLOT_HEIGHT + MARGIN_BOTTOM + (legend_rows - 1) * LEGEND_ROW_HEIGHT
    points = [p for s in series for p in s.points]
    desc = "; ".join(
        f"{s.name}: " + ", ".join(f"({_fmt(x)}, {_fmt(y)})" for x, y in s.points) for s in series
    )
    parts = _frame(title, desc or "no data", height)
    if not points:
        parts.append(f'<text x="{WIDTH / 2}" y="{height / 2}" text-anchor="middle">No data</text>')
        parts.append("</svg>")
        return Markup("".join(parts))
    xs = [x for x, _ in points]
    ys = [y for _, y in points] + ([threshold] if threshold is not None else [])
    x0, x1 = _span(xs)
    y0, y1 = _span(ys)
    y0 = min(y0, 0.0) if y0 >= 0 else y0
    plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT

    def px(x: float) -> float:
        return MARGIN_LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return MARGIN_TOP + PLOT_HEIGHT - (y - y0) / (y1 - y0) * PLOT_HEIGHT

    bottom = MARGIN_TOP + PLOT_HEIGHT
    parts.append(
        f'<line x1="{MARGIN_LEFT}" y1="{bottom}" x2="{WIDTH - MARGIN_RIGHT}" y2="{bottom}" '
        'stroke="#57606a"/>'
        f'<line x1="{MARGIN_LEFT}" y1="{MARGIN_TOP}" x2="{MARGIN_LEFT}" y2="{bottom}" '
        'stroke="#57606a"/>'
    )
    for i in range(TICKS + 1):
        value = y0 + (y1 - y0) * i / TICKS
        y = py(value)
        parts.append(
            f'<line x1="{MARGIN_LEFT - 4}" y1="{y:.1f}" x2="{MARGIN_LEFT}" y2="{y:.1f}" '
            f'stroke="#57606a"/><text x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" '
            f'text-anchor="end" font-size="11">{escape(_fmt(value))}</text>'
        )
    labels = x_labels if x_labels is not None else {x: _fmt(x) for x in sorted(set(xs))}
    for x, text in labels.items():
        parts.append(
            f'<text x="{px(x):.1f}" y="{bottom + 16}" text-anchor="middle" '
            f'font-size="11">{escape(text)}</text>'
        )
    if y_label:
        parts.append(
            f'<text x="12" y="{MARGIN_TOP + PLOT_HEIGHT / 2}" font-size="11" '
            f'transform="rotate(-90 12 {MARGIN_TOP + PLOT_HEIGHT / 2})" '
            f'text-anchor="middle">{escape(y_label)}</text>'
        )
    if threshold is not None:
        y = py(threshold)
        parts.append(
            f'<line x1="{MARGIN_LEFT}" y1="{y:.1f}" x2="{WIDTH - MARGIN_RIGHT}" y2="{y:.1f}" '
            'stroke="#b42318" stroke-dasharray="4 3"/>'
        )
    for index, line in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in line.points)
        parts.append(
            f'<g class="series" data-series="{escape(line.name)}">'
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>'
        )
        for x, y in line.points:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>')
        parts.append("</g>")
    for index, line in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        row, column = divmod(index, LEGEND_PER_ROW)
        legend_y = bottom + 32 + row * LEGEND_ROW_HEIGHT
        x = MARGIN_LEFT + column * 150
        parts.append(
            f'<rect x="{x}" y="{legend_y - 9}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{x + 14}" y="{legend_y}" font-size="11">{escape(line.name)}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def interval_chart(title: str, rows: Sequence[Interval], *, unit: str = "") -> Markup:
    """One horizontal row per estimate: a dot at the value and a bar over its
    interval, with a rule at zero; a row whose interval excludes zero is
    drawn in colour (significant), one that spans it in grey."""
    height = MARGIN_TOP + max(1, len(rows)) * ROW_HEIGHT + MARGIN_BOTTOM
    desc = "; ".join(
        f"{r.label}: {_fmt(r.value)}{unit} [{_fmt(r.low)}, {_fmt(r.high)}]" for r in rows
    )
    parts = _frame(title, desc or "no data", height)
    finite = [v for r in rows for v in (r.value, r.low, r.high) if math.isfinite(v)]
    if not finite:
        parts.append(f'<text x="{WIDTH / 2}" y="{height / 2}" text-anchor="middle">No data</text>')
        parts.append("</svg>")
        return Markup("".join(parts))
    label_w = 200
    left = label_w
    plot_w = WIDTH - left - MARGIN_RIGHT
    x0, x1 = _span([*finite, 0.0])

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    zero = px(0.0)
    bottom = MARGIN_TOP + len(rows) * ROW_HEIGHT
    parts.append(
        f'<line x1="{zero:.1f}" y1="{MARGIN_TOP}" x2="{zero:.1f}" y2="{bottom}" '
        'stroke="#57606a" stroke-dasharray="3 3"/>'
    )
    for i in range(TICKS + 1):
        value = x0 + (x1 - x0) * i / TICKS
        parts.append(
            f'<text x="{px(value):.1f}" y="{bottom + 16}" text-anchor="middle" '
            f'font-size="11">{escape(_fmt(value) + unit)}</text>'
        )
    for index, row in enumerate(rows):
        y = MARGIN_TOP + index * ROW_HEIGHT + ROW_HEIGHT / 2
        significant = row.low > 0 or row.high < 0
        colour = "#1a7f37" if significant else "#57606a"
        parts.append(
            f'<g class="interval" data-label="{escape(row.label)}">'
            f'<text x="{label_w - 8}" y="{y + 4:.1f}" text-anchor="end" '
            f'font-size="12">{escape(row.label)}</text>'
        )
        if all(math.isfinite(v) for v in (row.value, row.low, row.high)):
            parts.append(
                f'<line x1="{px(row.low):.1f}" y1="{y:.1f}" x2="{px(row.high):.1f}" '
                f'y2="{y:.1f}" stroke="{colour}" stroke-width="4"/>'
                f'<circle cx="{px(row.value):.1f}" cy="{y:.1f}" r="5" fill="{colour}"/>'
            )
        parts.append("</g>")
    parts.append("</svg>")
    return Markup("".join(parts))


@dataclass(frozen=True)
class Share:
    """One bar of a share chart: `part` of `whole` in a bucket named `label`;
    a bucket with a whole of 0 has no share (no bar, not a zero)."""

    label: str
    part: int
    whole: int


def share_chart(title: str, bars: Sequence[Share], *, y_label: str = "") -> Markup:
    """One vertical bar a bucket, its height part / whole on a fixed 0-100 %
    axis, "part/whole" above it; buckets without a whole are left empty. At
    most about a dozen x labels are written (evenly spaced)."""
    height = MARGIN_TOP + PLOT_HEIGHT + MARGIN_BOTTOM
    desc = "; ".join(
        f"{b.label}: {b.part}/{b.whole} ({b.part / b.whole:.1%})" for b in bars if b.whole
    )
    parts = _frame(title, desc or "no data", height)
    bottom = MARGIN_TOP + PLOT_HEIGHT
    plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    slot = plot_w / max(1, len(bars))
    parts.append(
        f'<line x1="{MARGIN_LEFT}" y1="{bottom}" x2="{WIDTH - MARGIN_RIGHT}" y2="{bottom}" '
        'stroke="#57606a"/>'
        f'<line x1="{MARGIN_LEFT}" y1="{MARGIN_TOP}" x2="{MARGIN_LEFT}" y2="{bottom}" '
        'stroke="#57606a"/>'
    )
    for i in range(TICKS + 1):
        y = bottom - PLOT_HEIGHT * i / TICKS
        parts.append(
            f'<line x1="{MARGIN_LEFT - 4}" y1="{y:.1f}" x2="{WIDTH - MARGIN_RIGHT}" '
            f'y2="{y:.1f}" stroke="#d0d7de"/><text x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" '
            f'text-anchor="end" font-size="11">{100 * i // TICKS}%</text>'
        )
    if y_label:
        parts.append(
            f'<text x="12" y="{MARGIN_TOP + PLOT_HEIGHT / 2}" font-size="11" '
            f'transform="rotate(-90 12 {MARGIN_TOP + PLOT_HEIGHT / 2})" '
            f'text-anchor="middle">{escape(y_label)}</text>'
        )
    label_every = max(1, math.ceil(len(bars) / 12))
    for index, bar in enumerate(bars):
        x = MARGIN_LEFT + index * slot
        centre = x + slot / 2
        if index % label_every == 0:
            parts.append(
                f'<text x="{centre:.1f}" y="{bottom + 16}" text-anchor="middle" '
                f'font-size="11">{escape(bar.label)}</text>'
            )
        if not bar.whole:
            continue
        top = bottom - PLOT_HEIGHT * bar.part / bar.whole
        parts.append(
            f'<g class="share" data-label="{escape(bar.label)}">'
            f"<title>{escape(bar.label)}: {bar.part}/{bar.whole}</title>"
            f'<rect x="{x + slot * 0.15:.1f}" y="{top:.1f}" width="{slot * 0.7:.1f}" '
            f'height="{bottom - top:.1f}" fill="{COLOURS[0]}"/>'
        )
        if slot >= 24:
            parts.append(
                f'<text x="{centre:.1f}" y="{top - 4:.1f}" text-anchor="middle" '
                f'font-size="10">{bar.part}/{bar.whole}</text>'
            )
        parts.append("</g>")
    parts.append("</svg>")
    return Markup("".join(parts))
