"""Measurement: exposures and outcomes, conversions matched by each offer's
conversion definition within an attribution window, and lift against the
global holdout with confidence intervals, as a table, a PNG and Prometheus
gauges.

An exposure is logged for every decision, held-out customers included: for
them it records the offer they would have been shown (and were not). The unit
of analysis is the customer: per group, the customers exposed and the
customers with at least one converted exposure. A conversion event of type T
converts, for each offer whose definition lists T, that offer's most recent
exposure of the customer whose window is still open (last touch per offer).

Intervals: Wilson score intervals for each conversion rate, and Newcombe's
hybrid score interval (Newcombe 1998, method 10, built from the two Wilson
intervals) for the difference treatment - holdout, the incremental lift. Both
behave at small counts and rates near 0 where the Wald interval does not.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from gateway.experiments import HOLDOUT_ARM
from triplane.runtime.clock import Clock
from triplane.runtime.config import MeasurementConfig
from triplane.runtime.db import Database, Tx
from triplane.runtime.errors import InvalidArgument, NotFound

ALL = "*"

DDL = """
CREATE TABLE IF NOT EXISTS gw_exposures (
  exposure_id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL,
  customer_id TEXT NOT NULL,
  offer_id TEXT NOT NULL,
  surface TEXT NOT NULL,
  segment TEXT NOT NULL,
  experiment TEXT NOT NULL,
  arm TEXT NOT NULL,
  holdout BIGINT NOT NULL,
  exposed_at_us BIGINT NOT NULL,
  window_end_us BIGINT NOT NULL,
  conversion_events TEXT NOT NULL,
  action_probability DOUBLE PRECISION NOT NULL,
  decision_id TEXT NOT NULL,
  converted_at_us BIGINT NOT NULL DEFAULT 0,
  conversion_event_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS gw_exposures_customer
  ON gw_exposures (tenant_id, customer_id, exposed_at_us);
CREATE INDEX IF NOT EXISTS gw_exposures_time ON gw_exposures (tenant_id, exposed_at_us);
CREATE TABLE IF NOT EXISTS gw_conversion_events (
  tenant_id TEXT NOT NULL,
  event_id TEXT NOT NULL,
  converted BIGINT NOT NULL,
  PRIMARY KEY (tenant_id, event_id)
)
"""


class Exposure(msgspec.Struct, frozen=True, kw_only=True):
    """What was shown (or, to a held-out customer, withheld), when and why."""

    exposure_id: str
    tenant_id: str
    customer_id: str
    offer_id: str
    surface: str
    segment: str = ""
    experiment: str = ""
    arm: str = ""
    holdout: bool = False
    exposed_at_us: int
    # The offer's conversion definition (OfferService conversion_events).
    conversion_events: list[str]
    # 0: measurement.attribution_window_s.
    attribution_window_s: int = 0
    action_probability: float = 0.0
    decision_id: str = ""


class ConversionEvent(msgspec.Struct, frozen=True, kw_only=True):
    event_id: str
    tenant_id: str
    customer_id: str
    event_type: str
    occurred_at_us: int


@dataclass(frozen=True, slots=True)
class Rate:
    customers: int
    conversions: int
    rate: float
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class LiftRow:
    offer_id: str
    surface: str
    segment: str
    treatment: Rate
    holdout: Rate
    # Incremental lift: treatment rate - holdout rate, with its interval.
    lift: float
    lift_low: float
    lift_high: float
    # lift / holdout rate (nan when the holdout never converted).
    lift_relative: float
    # lift x treatment customers: conversions the treatment added.
    incremental_conversions: float
    # A group under measurement.min_group_customers: read with care.
    small: bool

    @property
    def significant(self) -> bool:
        return self.lift_low > 0 or self.lift_high < 0


@dataclass(frozen=True, slots=True)
class LiftReport:
    tenant_id: str
    since_us: int
    until_us: int
    confidence_level: float
    method: str
    rows: list[LiftRow]


# ---- statistics ----


def z_for(confidence_level: float) -> float:
    if not 0.5 <= confidence_level < 1.0:
        raise InvalidArgument(
            "CONFIDENCE_LEVEL_INVALID",
            "confidence_level must be in [0.5, 1)",
            "gateway.measurement.confidence_level",
        )
    return statistics.NormalDist().inv_cdf(1.0 - (1.0 - confidence_level) / 2.0)


def wilson(conversions: int, customers: int, z: float) -> Rate:
    """Wilson score interval of a proportion."""
    assert 0 <= conversions <= customers, (conversions, customers)
    if customers == 0:
        return Rate(0, 0, 0.0, 0.0, 1.0)
    p = conversions / customers
    z2 = z * z
    denominator = 1.0 + z2 / customers
    center = (p + z2 / (2 * customers)) / denominator
    half = z * math.sqrt(p * (1 - p) / customers + z2 / (4 * customers * customers)) / denominator
    low = 0.0 if conversions == 0 else max(0.0, center - half)
    high = 1.0 if conversions == customers else min(1.0, center + half)
    return Rate(customers, conversions, p, low, high)


def newcombe(treatment: Rate, holdout: Rate) -> tuple[float, float, float]:
    """Newcombe's hybrid score interval of treatment.rate - holdout.rate."""
    d = treatment.rate - holdout.rate
    low = d - math.hypot(treatment.rate - treatment.low, holdout.high - holdout.rate)
    high = d + math.hypot(treatment.high - treatment.rate, holdout.rate - holdout.low)
    return d, max(-1.0, low), min(1.0, high)


# ---- storage ----


class MeasurementStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate(DDL)

    def add_exposures(self, exposures: Sequence[Exposure], default_window_s: int) -> int:
        """Stores exposures once each (by exposure_id); returns how many were new."""
        added = 0
        with self.db.tx() as tx:
            for e in exposures:
                window_s = e.attribution_window_s or default_window_s
                added += tx.execute(
                    "INSERT INTO gw_exposures (exposure_id, tenant_id, customer_id, offer_id, "
                    "surface, segment, experiment, arm, holdout, exposed_at_us, window_end_us, "
                    "conversion_events, action_probability, decision_id) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (
                        e.exposure_id,
                        e.tenant_id,
                        e.customer_id,
                        e.offer_id,
                        e.surface,
                        e.segment,
                        e.experiment,
                        e.arm,
                        int(e.holdout),
                        e.exposed_at_us,
                        e.exposed_at_us + window_s * 1_000_000,
                        _encode_types(e.conversion_events),
                        e.action_probability,
                        e.decision_id,
                    ),
                )
        return added

    def match_events(self, events: Sequence[ConversionEvent], max_exposures: int) -> list[str]:
        """Converts the exposures the events are conversions of; returns their ids.
        An event seen before (same event_id) converts nothing again."""
        converted: list[str] = []
        with self.db.tx() as tx:
            for event in events:
                converted.extend(_match_one(tx, event, max_exposures))
        return converted

    def mark_converted(self, tenant_id: str, exposure_id: str, at_us: int, event_id: str) -> bool:
        with self.db.tx() as tx:
            row = tx.one(
                "SELECT converted_at_us FROM gw_exposures WHERE tenant_id = ? AND exposure_id = ?",
                (tenant_id, exposure_id),
            )
            if row is None:
                raise NotFound("EXPOSURE_NOT_FOUND", f"no exposure {exposure_id!r}", "exposure_id")
            if int(row[0]):
                return False
            tx.execute(
                "UPDATE gw_exposures SET converted_at_us = ?, conversion_event_id = ? "
                "WHERE exposure_id = ?",
                (at_us, event_id, exposure_id),
            )
        return True

    def tenants(self) -> list[str]:
        with self.db.tx() as tx:
            rows = tx.all("SELECT DISTINCT tenant_id FROM gw_exposures ORDER BY tenant_id")
        return [str(r[0]) for r in rows]

    def group_counts(
        self, tenant_id: str, since_us: int, until_us: int, dims: Sequence[str]
    ) -> list[tuple[tuple[str, ...], bool, int, int]]:
        """(dimension values, holdout, customers, converted customers) per group."""
        columns = ", ".join(dims)
        select = f"{columns}, " if dims else ""
        group = f"GROUP BY {columns}, holdout" if dims else "GROUP BY holdout"
        with self.db.tx() as tx:
            rows = tx.all(
                f"SELECT {select}holdout, COUNT(DISTINCT customer_id), "
                "COUNT(DISTINCT CASE WHEN converted_at_us > 0 THEN customer_id END) "
                "FROM gw_exposures WHERE tenant_id = ? AND exposed_at_us >= ? "
                f"AND exposed_at_us < ? {group}",
                (tenant_id, since_us, until_us),
            )
        n = len(dims)
        return [
            (tuple(str(v) for v in row[:n]), bool(row[n]), int(row[n + 1]), int(row[n + 2]))
            for row in rows
        ]


def _encode_types(types: Sequence[str]) -> str:
    # Delimited on both sides, so "LIKE '%|type|%'" matches whole names only.
    return "|" + "|".join(types) + "|"


def _match_one(tx: Tx, event: ConversionEvent, max_exposures: int) -> list[str]:
    fresh = tx.execute(
        "INSERT INTO gw_conversion_events (tenant_id, event_id, converted) VALUES (?, ?, 0) "
        "ON CONFLICT DO NOTHING",
        (event.tenant_id, event.event_id),
    )
    if fresh != 1:
        return []
    rows = tx.all(
        "SELECT exposure_id, offer_id, converted_at_us FROM gw_exposures "
        "WHERE tenant_id = ? AND customer_id = ? AND exposed_at_us <= ? AND window_end_us >= ? "
        "AND conversion_events LIKE ? ORDER BY exposed_at_us DESC, exposure_id DESC LIMIT ?",
        (
            event.tenant_id,
            event.customer_id,
            event.occurred_at_us,
            event.occurred_at_us,
            f"%|{event.event_type}|%",
            max_exposures,
        ),
    )
    converted: list[str] = []
    offers_seen: set[str] = set()
    for exposure_id, offer_id, converted_at_us in rows:
        if offer_id in offers_seen:
            continue
        offers_seen.add(offer_id)
        if int(converted_at_us):
            continue
        tx.execute(
            "UPDATE gw_exposures SET converted_at_us = ?, conversion_event_id = ? "
            "WHERE exposure_id = ?",
            (event.occurred_at_us, event.event_id, exposure_id),
        )
        converted.append(str(exposure_id))
    if converted:
        tx.execute(
            "UPDATE gw_conversion_events SET converted = ? WHERE tenant_id = ? AND event_id = ?",
            (len(converted), event.tenant_id, event.event_id),
        )
    return converted


# ---- the service ----


class Measurement:
    def __init__(self, store: MeasurementStore, config: MeasurementConfig, clock: Clock) -> None:
        self.store = store
        self._config = config
        self._clock = clock
        self._z = z_for(config.confidence_level)

    async def record_exposures(self, exposures: Sequence[Exposure]) -> int:
        self._bound(len(exposures), "exposures")
        for index, exposure in enumerate(exposures):
            _validate_exposure(exposure, f"exposures[{index}]")
        return await asyncio.to_thread(
            self.store.add_exposures, exposures, self._config.attribution_window_s
        )

    async def record_conversion_events(self, events: Sequence[ConversionEvent]) -> list[str]:
        """Matches behavioural or ledger events against open exposures; returns
        the exposure ids they converted."""
        self._bound(len(events), "events")
        for index, event in enumerate(events):
            if not event.event_id or not event.customer_id or not event.event_type:
                raise InvalidArgument(
                    "CONVERSION_EVENT_INVALID",
                    "event_id, customer_id and event_type are required",
                    f"events[{index}]",
                )
        return await asyncio.to_thread(
            self.store.match_events, events, self._config.max_exposures_per_conversion
        )

    async def record_outcome(
        self, tenant_id: str, exposure_id: str, event_id: str = "", at_us: int = 0
    ) -> bool:
        """RecordOutcome: this exposure converted. False when it already had."""
        return await asyncio.to_thread(
            self.store.mark_converted,
            tenant_id,
            exposure_id,
            at_us or self._clock.now_us(),
            event_id,
        )

    async def publish_lift(self, metrics: LiftMetrics) -> int:
        """Publishes every tenant's lift report over the attribution window
        (offer x surface x segment) as gauges; returns the tenants published."""
        since_us = max(0, self._clock.now_us() - self._config.attribution_window_s * 1_000_000)
        tenants = await asyncio.to_thread(self.store.tenants)
        for tenant_id in tenants:
            metrics.publish(await self.lift_report(tenant_id, since_us))
        return len(tenants)

    async def lift_report(
        self,
        tenant_id: str,
        since_us: int = 0,
        until_us: int = 0,
        dims: Sequence[str] = ("offer_id", "surface", "segment"),
    ) -> LiftReport:
        """Lift of treatment (everyone not held out) over the holdout per
        combination of `dims`, each offer's total and the grand total."""
        unknown = [d for d in dims if d not in ("offer_id", "surface", "segment")]
        if unknown:
            raise InvalidArgument("DIMENSION_INVALID", f"unknown dimension {unknown[0]!r}", "dims")
        until_us = until_us or self._clock.now_us() + 1
        levels = [tuple(dims), ("offer_id",), ()] if dims else [()]
        rows: list[LiftRow] = []
        for level in dict.fromkeys(levels):
            counts = await asyncio.to_thread(
                self.store.group_counts, tenant_id, since_us, until_us, level
            )
            rows.extend(self._rows(counts, level))
            if len(rows) > self._config.max_report_rows:
                raise InvalidArgument(
                    "REPORT_TOO_LARGE",
                    f"over {self._config.max_report_rows} rows; narrow the window",
                    "since",
                )
        method = "Wilson score per rate; Newcombe hybrid score for the difference"
        return LiftReport(
            tenant_id, since_us, until_us, self._config.confidence_level, method, rows
        )

    def _rows(
        self, counts: list[tuple[tuple[str, ...], bool, int, int]], dims: tuple[str, ...]
    ) -> list[LiftRow]:
        groups: dict[tuple[str, ...], dict[bool, tuple[int, int]]] = {}
        for key, holdout, customers, conversions in counts:
            groups.setdefault(key, {})[holdout] = (customers, conversions)
        rows: list[LiftRow] = []
        for key in sorted(groups):
            named = dict(zip(dims, key, strict=True))
            treated_n, treated_x = groups[key].get(False, (0, 0))
            held_n, held_x = groups[key].get(True, (0, 0))
            treated = wilson(treated_x, treated_n, self._z)
            held = wilson(held_x, held_n, self._z)
            lift, low, high = newcombe(treated, held)
            rows.append(
                LiftRow(
                    offer_id=named.get("offer_id", ALL),
                    surface=named.get("surface", ALL),
                    segment=named.get("segment", ALL),
                    treatment=treated,
                    holdout=held,
                    lift=lift,
                    lift_low=low,
                    lift_high=high,
                    lift_relative=lift / held.rate if held.rate > 0 else math.nan,
                    incremental_conversions=lift * treated.customers,
                    small=min(treated.customers, held.customers) < self._config.min_group_customers,
                )
            )
        return rows

    def _bound(self, count: int, field: str) -> None:
        if count > self._config.max_batch_records:
            raise InvalidArgument(
                "BATCH_TOO_LARGE", f"at most {self._config.max_batch_records} per call", field
            )


def _validate_exposure(exposure: Exposure, where: str) -> None:
    for name in ("exposure_id", "tenant_id", "customer_id", "offer_id", "surface"):
        if not getattr(exposure, name):
            raise InvalidArgument(
                f"{name.upper()}_MISSING", f"{name} is required", f"{where}.{name}"
            )
    if exposure.holdout != (exposure.arm == HOLDOUT_ARM) and exposure.arm:
        raise InvalidArgument(
            "ARM_INVALID", "arm 'holdout' goes with holdout = true", f"{where}.arm"
        )
    if any(not t or "|" in t for t in exposure.conversion_events):
        raise InvalidArgument(
            "CONVERSION_EVENTS_INVALID",
            "event types are non-empty, without '|'",
            f"{where}.conversion_events",
        )
    if exposure.exposed_at_us <= 0 or exposure.attribution_window_s < 0:
        raise InvalidArgument(
            "EXPOSURE_TIME_INVALID", "exposed_at must be set", f"{where}.exposed_at_us"
        )


# ---- presentation: table, chart, metrics ----


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}%"


def format_table(report: LiftReport) -> str:
    level = f"{100 * report.confidence_level:g}%"
    header = (
        f"{'offer':<24} {'surface':<12} {'segment':<12} {'treated':>9} {'conv':>8} "
        f"{'holdout':>8} {'conv':>8} {'lift (pp)':>10} {level + ' CI (pp)':>20} {'rel':>8}"
    )
    lines = [
        f"lift report, tenant {report.tenant_id} ({report.method})",
        header,
        "-" * len(header),
    ]
    for row in report.rows:
        interval = f"[{100 * row.lift_low:+.2f}, {100 * row.lift_high:+.2f}]"
        flag = " *" if row.significant else ""
        flag += " (small)" if row.small else ""
        lines.append(
            f"{row.offer_id:<24} {row.surface:<12} {row.segment:<12} "
            f"{row.treatment.customers:>9} {_pct(row.treatment.rate):>8} "
            f"{row.holdout.customers:>8} {_pct(row.holdout.rate):>8} "
            f"{100 * row.lift:>+10.2f} {interval:>20} {_pct(row.lift_relative):>8}{flag}"
        )
    lines.append("* the interval excludes 0")
    return "\n".join(lines)


def plot_lift(report: LiftReport, path: str | Path) -> Path:
    """A PNG of each row's incremental lift with its interval (Agg, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report.rows
    labels = [f"{r.offer_id} / {r.surface} / {r.segment}" for r in rows]
    lifts = [100 * r.lift for r in rows]
    errors = [
        [100 * (r.lift - r.lift_low) for r in rows],
        [100 * (r.lift_high - r.lift) for r in rows],
    ]
    figure = Figure(figsize=(9, 1.2 + 0.35 * max(1, len(rows))))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    positions = list(range(len(rows)))
    colors = ["tab:green" if r.lift_low > 0 else "tab:gray" for r in rows]
    axes.barh(positions, lifts, xerr=errors, color=colors, capsize=3)
    axes.set_yticks(positions, labels, fontsize=8)
    axes.invert_yaxis()
    axes.axvline(0, color="black", linewidth=0.8)
    axes.set_xlabel(
        f"incremental conversion vs holdout (percentage points, "
        f"{100 * report.confidence_level:g}% Newcombe interval)"
    )
    axes.set_title(f"Lift vs holdout, tenant {report.tenant_id}")
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, format="png", dpi=110)
    return target


class LiftMetrics:
    """The report's figures as Prometheus gauges; create once per registry."""

    _LABELS = ("tenant", "offer", "surface", "segment")

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else REGISTRY
        labels = self._LABELS
        self.rate = Gauge(
            "triplane_lift_conversion_rate",
            "Conversion rate per group (treatment or holdout).",
            [*labels, "group"],
            registry=registry,
        )
        self.customers = Gauge(
            "triplane_lift_customers",
            "Customers exposed per group (treatment or holdout).",
            [*labels, "group"],
            registry=registry,
        )
        self.lift = Gauge(
            "triplane_lift_incremental",
            "Incremental lift (treatment - holdout rate): estimate and interval bounds.",
            [*labels, "bound"],
            registry=registry,
        )

    def publish(self, report: LiftReport) -> None:
        for row in report.rows:
            key = (report.tenant_id, row.offer_id, row.surface, row.segment)
            for group, rate in (("treatment", row.treatment), ("holdout", row.holdout)):
                self.rate.labels(*key, group).set(rate.rate)
                self.customers.labels(*key, group).set(rate.customers)
            for bound, value in (
                ("estimate", row.lift),
                ("low", row.lift_low),
                ("high", row.lift_high),
            ):
                self.lift.labels(*key, bound).set(value)
