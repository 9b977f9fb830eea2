"""Measurement: conversion matching by each offer's definition within the
attribution window, lift with intervals on a simulated population whose true
uplift is known, the table, the PNG, the Prometheus gauges and the CLI."""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway.experiments import Experiments
from gateway.measure import (
    ConversionEvent,
    Exposure,
    LiftMetrics,
    LiftReport,
    LiftRow,
    Measurement,
    MeasurementStore,
    format_table,
    newcombe,
    plot_lift,
    wilson,
    z_for,
)
from gateway.report import parse_since, register_report
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import (
    ExperimentArmConfig,
    ExperimentConfig,
    MeasurementConfig,
    load_config,
)
from triplane.runtime.db import Database
from triplane.runtime.errors import InvalidArgument, NotFound

from ._b_helpers import open_db

TENANT = "acme"
T0 = 1_780_315_200_000_000  # 2026-06-01T12:00:00Z
DAY_US = 86_400_000_000
WINDOW_S = 7 * 86_400


def measurement_config(**changes: Any) -> MeasurementConfig:
    config = load_config(environ={}).gateway.measurement
    return msgspec.structs.replace(config, attribution_window_s=WINDOW_S, **changes)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, state_dir: Path) -> Iterator[Database]:
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgres" else ""
    database = open_db(request.param, state_dir, dsn)
    yield database
    database.close()


def exposure(eid: str, customer: str, offer: str, at_us: int, **more: Any) -> Exposure:
    events = more.pop("conversion_events", ["money.entry.posted"])
    return Exposure(
        exposure_id=eid,
        tenant_id=more.pop("tenant_id", TENANT),
        customer_id=customer,
        offer_id=offer,
        surface=more.pop("surface", "checkout"),
        segment=more.pop("segment", "new"),
        exposed_at_us=at_us,
        conversion_events=events,
        **more,
    )


def event(eid: str, customer: str, at_us: int, kind: str = "money.entry.posted") -> ConversionEvent:
    return ConversionEvent(
        event_id=eid, tenant_id=TENANT, customer_id=customer, event_type=kind, occurred_at_us=at_us
    )


async def test_conversions_follow_definitions_and_windows(db: Database) -> None:
    clock = ManualClock(T0 + 30 * DAY_US)
    m = Measurement(MeasurementStore(db), measurement_config(), clock)
    await m.record_exposures(
        [
            exposure("x1", "c1", "cashback", T0),
            exposure("x2", "c1", "cashback", T0 + DAY_US),  # the later touch of the same offer
            exposure("x3", "c1", "bnpl", T0, conversion_events=["money.entry.posted", "bnpl.on"]),
            exposure("x4", "c2", "cashback", T0),
            exposure("x5", "c3", "cashback", T0, attribution_window_s=3600),
            exposure("x6", "c4", "cashback", T0, tenant_id="globex"),
        ]
    )
    assert await m.record_exposures([exposure("x1", "c1", "cashback", T0)]) == 0, "idempotent"
    converted = await m.record_conversion_events(
        [
            event("e1", "c1", T0 + 2 * DAY_US),  # last touch of cashback, and bnpl
            event("e2", "c2", T0 - 1),  # before the exposure
            event("e3", "c2", T0 + 8 * DAY_US),  # after the 7-day window
            event("e4", "c2", T0 + DAY_US, kind="app.opened"),  # not a conversion
            event("e5", "c3", T0 + 7200 * 1_000_000),  # past its own one-hour window
            event("e6", "c4", T0 + DAY_US),  # another tenant's customer
        ]
    )
    assert sorted(converted) == ["x2", "x3"]
    assert await m.record_conversion_events([event("e1", "c1", T0 + 2 * DAY_US)]) == []
    # A new event converts an offer's exposure only once.
    assert await m.record_conversion_events([event("e7", "c1", T0 + 3 * DAY_US)]) == []
    # RecordOutcome: direct conversion of one exposure, once.
    assert await m.record_outcome(TENANT, "x4", "o1") is True
    assert await m.record_outcome(TENANT, "x4", "o1") is False
    with pytest.raises(NotFound):
        await m.record_outcome(TENANT, "x6")
    report = await m.lift_report(TENANT, dims=("offer_id",))
    by_offer = {r.offer_id: r for r in report.rows}
    assert by_offer["cashback"].treatment.customers == 3
    assert by_offer["cashback"].treatment.conversions == 2


async def test_bad_input_is_refused(state_dir: Path) -> None:
    db = open_db("sqlite", state_dir)
    m = Measurement(MeasurementStore(db), measurement_config(max_batch_records=2), ManualClock(T0))
    try:
        with pytest.raises(InvalidArgument) as err:
            await m.record_exposures([exposure(f"x{i}", "c", "o", T0) for i in range(3)])
        assert err.value.field == "exposures"
        cases: dict[str, dict[str, Any]] = {
            "exposures[0].offer_id": {"offer_id": ""},
            "exposures[0].arm": {"arm": "holdout", "holdout": False},
            "exposures[0].conversion_events": {"conversion_events": ["a|b"]},
            "exposures[0].exposed_at_us": {"exposed_at_us": 0},
        }
        for field, change in cases.items():
            with pytest.raises(InvalidArgument) as err:
                bad = msgspec.structs.replace(exposure("x", "c", "o", T0), **change)
                await m.record_exposures([bad])
            assert err.value.field == field
        with pytest.raises(InvalidArgument):
            await m.record_conversion_events([event("", "c", T0)])
        with pytest.raises(InvalidArgument):
            await m.lift_report(TENANT, dims=("color",))
        with pytest.raises(InvalidArgument):
            parse_since("last tuesday", T0)
        assert parse_since("7d", T0) == T0 - 7 * DAY_US
        assert parse_since("2026-06-01", T0) == T0 - 12 * 3600 * 1_000_000
        with pytest.raises(InvalidArgument):
            z_for(1.0)
    finally:
        db.close()


def test_intervals_against_known_values() -> None:
    z = z_for(0.95)
    assert abs(z - 1.959964) < 1e-5
    # Newcombe (1998), table II, example (a): 56/70 vs 48/80 -> 0.2, [0.0524, 0.3339].
    d, low, high = newcombe(wilson(56, 70, z), wilson(48, 80, z))
    assert abs(d - 0.2) < 1e-12
    assert abs(low - 0.0524) < 5e-4 and abs(high - 0.3339) < 5e-4
    # Wilson at 0 successes stays inside [0, 1].
    zero = wilson(0, 10, z)
    assert zero.low == 0.0 and 0.25 < zero.high < 0.35


async def simulate(m: Measurement, seed: int) -> dict[str, Any]:
    """A population with a known true uplift: cashback adds 4 points of
    conversion for new customers and 2 for returning ones (3 overall), from a
    5% base; savings adds nothing (4% either way)."""
    rng = random.Random(seed)
    experiments = Experiments(
        [ExperimentConfig(name="nba", salt="s1", arms=[ExperimentArmConfig(name="arb", weight=1)])],
        holdout_share=0.2,
    )
    base = {"cashback": 0.05, "savings": 0.04}
    uplift = {("cashback", "new"): 0.04, ("cashback", "returning"): 0.02}
    kinds = {"cashback": "money.entry.posted", "savings": "savings.opened"}
    exposures: list[Exposure] = []
    events: list[ConversionEvent] = []
    held = 0
    customers = 40_000
    for i in range(customers):
        token = f"tok_{i}"
        segment = "new" if i % 2 else "returning"
        assignment = experiments.assign(TENANT, "nba", token)
        held += assignment.holdout
        for offer in ("cashback", "savings"):
            at_us = T0 + rng.randrange(DAY_US)
            exposures.append(
                exposure(
                    f"{token}-{offer}",
                    token,
                    offer,
                    at_us,
                    surface=rng.choice(("checkout", "app_home")),
                    segment=segment,
                    experiment="nba",
                    arm=assignment.arm,
                    holdout=assignment.holdout,
                    conversion_events=[kinds[offer]],
                )
            )
            p = base[offer] + (0.0 if assignment.holdout else uplift.get((offer, segment), 0.0))
            if rng.random() < p:
                events.append(
                    event(
                        f"{token}-{offer}-c", token, at_us + rng.randrange(6 * DAY_US), kinds[offer]
                    )
                )
            if rng.random() < 0.1:  # outside the window: never a conversion
                events.append(
                    event(f"{token}-{offer}-late", token, at_us + 8 * DAY_US, kinds[offer])
                )
        if rng.random() < 0.2:
            events.append(event(f"{token}-open", token, T0 + DAY_US, "app.opened"))
    for start in range(0, len(exposures), 10_000):
        await m.record_exposures(exposures[start : start + 10_000])
    for start in range(0, len(events), 10_000):
        await m.record_conversion_events(events[start : start + 10_000])
    return {"held_share": held / customers}


def row(report: LiftReport, offer: str, surface: str = "*", segment: str = "*") -> LiftRow:
    [found] = [
        r for r in report.rows if (r.offer_id, r.surface, r.segment) == (offer, surface, segment)
    ]
    return found


async def test_known_uplift_lies_within_the_reported_interval(
    state_dir: Path, tmp_path: Path
) -> None:
    db = open_db("sqlite", state_dir)
    clock = ManualClock(T0 + 30 * DAY_US)
    m = Measurement(MeasurementStore(db), measurement_config(), clock)
    try:
        facts = await simulate(m, seed=20260601)
        assert abs(facts["held_share"] - 0.2) < 0.01
        report = await m.lift_report(TENANT, since_us=T0 - DAY_US)
        cashback = row(report, "cashback")
        assert cashback.lift_low <= 0.03 <= cashback.lift_high
        assert cashback.significant and abs(cashback.lift - 0.03) < 0.01
        assert cashback.holdout.low <= 0.05 <= cashback.holdout.high
        assert abs(cashback.holdout.customers / 40_000 - 0.2) < 0.01
        savings = row(report, "savings")
        assert savings.lift_low <= 0.0 <= savings.lift_high
        assert savings.treatment.low <= 0.04 <= savings.treatment.high
        # Per segment: each segment's own true uplift.
        segments = await m.lift_report(TENANT, dims=("offer_id", "segment"))
        for segment, truth in (("new", 0.04), ("returning", 0.02)):
            found = row(segments, "cashback", segment=segment)
            assert found.lift_low <= truth <= found.lift_high, (segment, found)
        # Every offer x surface x segment row is there, with both groups.
        cells = [r for r in report.rows if "*" not in (r.offer_id, r.surface, r.segment)]
        assert len(cells) == 8
        assert all(r.holdout.customers > 500 and not r.small for r in cells)
        table = format_table(report)
        assert "cashback" in table and "Newcombe" in table and "95% CI" in table
        png = plot_lift(report, tmp_path / "lift.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        registry = CollectorRegistry()
        LiftMetrics(registry).publish(report)
        labels = {"tenant": TENANT, "offer": "cashback", "surface": "*", "segment": "*"}
        value = registry.get_sample_value("triplane_lift_incremental", {**labels, "bound": "low"})
        assert value == pytest.approx(cashback.lift_low)
        rate = registry.get_sample_value(
            "triplane_lift_conversion_rate", {**labels, "group": "holdout"}
        )
        assert rate == pytest.approx(cashback.holdout.rate)
    finally:
        db.close()


def test_report_lift_command(
    state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = tmp_path / "triplane.yaml"
    config_path.write_text(f"runtime:\n  state_dir: {state_dir}\nnats:\n  url: ''\n")
    config = load_config(config_path, environ={})
    from gateway.storage import open_from_config

    db = open_from_config(config)
    store = MeasurementStore(db)
    rows = [
        exposure(
            f"x{i}",
            f"c{i}",
            "cashback",
            T0,
            holdout=i % 5 == 0,
            arm="holdout" if i % 5 == 0 else "a",
        )
        for i in range(100)
    ]
    store.add_exposures(rows, WINDOW_S)
    store.match_events([event(f"e{i}", f"c{i}", T0 + 1) for i in range(0, 100, 3)], 10)
    db.close()
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", dest="global_config")
    register_report(parser.add_subparsers(dest="command"))
    png = tmp_path / "out" / "lift.png"
    args = parser.parse_args(
        ["--config", str(config_path), "report", "lift", "--tenant", TENANT, "--png", str(png)]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "cashback" in out and "lift report, tenant acme" in out
    assert png.exists()
    bad = parser.parse_args(
        ["--config", str(config_path), "report", "lift", "--since", "yesterday-ish"]
    )
    assert bad.func(bad) == 2


@given(
    st.integers(0, 500).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))),
    st.integers(0, 500).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))),
    st.sampled_from([0.8, 0.9, 0.95, 0.99]),
)
def test_intervals_hold_their_invariants(
    treated: tuple[int, int], held: tuple[int, int], level: float
) -> None:
    z = z_for(level)
    a, b = wilson(treated[1], treated[0], z), wilson(held[1], held[0], z)
    for rate in (a, b):
        assert 0.0 <= rate.low <= rate.rate <= rate.high <= 1.0
    d, low, high = newcombe(a, b)
    assert -1.0 <= low <= d <= high <= 1.0
    # A higher confidence level never gives a narrower interval.
    wider = newcombe(wilson(treated[1], treated[0], z + 0.5), wilson(held[1], held[0], z + 0.5))
    assert wider[1] <= low + 1e-12 and wider[2] >= high - 1e-12


async def test_lift_gauges_for_every_tenant_over_the_attribution_window(db: Database) -> None:
    clock = ManualClock(T0 + DAY_US)
    m = Measurement(MeasurementStore(db), measurement_config(), clock)
    await m.record_exposures(
        [
            exposure("e1", "c1", "cashback", T0),
            exposure("e2", "c2", "cashback", T0, holdout=True),
            exposure("e3", "c3", "savings", T0, tenant_id="globex"),
            # Older than the attribution window: not in the gauges.
            exposure("e4", "c4", "travel", T0 - 30 * DAY_US),
        ]
    )
    await m.record_conversion_events([event("v1", "c1", T0 + 1_000_000)])
    registry = CollectorRegistry()
    assert await m.publish_lift(LiftMetrics(registry)) == 2
    labels = {"tenant": TENANT, "offer": "cashback", "surface": "*", "segment": "*"}
    treated = registry.get_sample_value(
        "triplane_lift_conversion_rate", {**labels, "group": "treatment"}
    )
    assert treated == pytest.approx(1.0)
    assert registry.get_sample_value(
        "triplane_lift_customers", {**labels, "group": "holdout"}
    ) == pytest.approx(1.0)
    globex = {"tenant": "globex", "offer": "savings", "surface": "*", "segment": "*"}
    assert registry.get_sample_value(
        "triplane_lift_customers", {**globex, "group": "treatment"}
    ) == pytest.approx(1.0)
    travel = {**labels, "offer": "travel", "group": "treatment"}
    assert registry.get_sample_value("triplane_lift_customers", travel) is None
