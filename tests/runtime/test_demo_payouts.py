"""`make demo`'s money-out-and-back summary (triplane_tools/demo_payouts.py):
its numbers add up (payouts by rail and state to the payouts made, bank
lines to the bookings, breaks to their classes), detection quantiles come
from a real Prometheus exposition of the histogram, and the demo's config
points the rails and the statement intake at a manual-clock sandbox bank."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from triplane.runtime.net import free_port
from triplane_tools import demo_payouts
from triplane_tools.demo import DemoOptions, demo_config
from triplane_tools.demo_payouts import PayoutReport, Settled, quantile


def _payment(
    e2e: str, outcome: str = "accepted", faults: tuple[str, ...] = (), refs: tuple[str, ...] = ()
) -> dict[str, Any]:
    return {
        "end_to_end_id": e2e,
        "outcome": outcome,
        "faults": list(faults),
        "bookings": [{"account_servicer_ref": ref} for ref in refs],
    }


def _report() -> PayoutReport:
    report = PayoutReport(
        settled=Settled(
            runs=3, net_by_merchant={"m1": 9_900, "m2": 19_800, "m3": 0}, fees_minor=300
        )
    )
    report.payouts = {
        "p1": ("ach", "settled"),
        "p2": ("ach", "returned"),
        "p3": ("card", "settled"),
        "p4": ("card", "failed"),
        "p5": ("ach", "settled"),
    }
    # p1 booked twice, p2 booked and returned, p3 in a batch with p5 (one
    # line for both), p4 rejected (nothing booked).
    report.bank = [
        _payment("e1", faults=("duplicate",), refs=("R1", "R2")),
        _payment("e2", outcome="returned", refs=("R3", "R4")),
        _payment("e3", faults=("batch", "late"), refs=("R5",)),
        _payment("e4", outcome="rejected"),
        _payment("e5", faults=("batch",), refs=("R5",)),
    ]
    report.lines, report.lines_matched = 5, 4
    report.breaks.update({("duplicate", "open"): 1, ("returned", "open"): 1, ("late", "open"): 1})
    return report


def test_the_summary_adds_up(capsys: pytest.CaptureFixture[str]) -> None:
    report = _report()
    by_rail = report.by_rail_and_state()
    assert sum(sum(states.values()) for states in by_rail.values()) == len(report.payouts)
    assert by_rail == {"ach": {"settled": 2, "returned": 1}, "card": {"settled": 1, "failed": 1}}
    assert report.bank_faults() == {"duplicate": 1, "returned": 1, "late": 1, "rejected": 1}
    assert report.open_breaks_by_class() == {"duplicate": 1, "returned": 1, "late": 1}
    settled = report.settled
    assert settled is not None
    assert settled.gross_minor == settled.net_minor + settled.fees_minor == 30_000
    assert settled.merchants == 2
    # Five distinct bank lines (the batch line counted once), five imported.
    assert report.failures() == []

    demo_payouts.print_report(report)
    out = capsys.readouterr().out
    assert "2 merchants settled" in out
    assert "gross 300.00, fees 3.00, net 297.00 USD" in out
    assert "5 created" in out
    assert "5 imported by the statement intake, 4 matched (80%)" in out
    rail_lines = [line.split() for line in out.splitlines() if line.startswith(("  ach", "  card"))]
    assert sum(int(words[1]) for words in rail_lines) == len(report.payouts)


def test_the_demo_fails_when_money_stays_behind() -> None:
    report = _report()
    report.payouts["p6"] = ("ach", "approved")
    report.lines = 4
    assert report.failures() == [
        "1 payouts never reached a rail",
        "the bank booked 5 lines; the statement intake imported 4",
    ]
    assert PayoutReport().failures() == ["no payout was created ({})"]


def test_quantile_is_prometheus_histogram_quantile() -> None:
    # 10 samples: 4 in (0, 0.1], 4 in (0.1, 0.5], 2 in (0.5, +Inf).
    buckets = [(0.1, 4.0), (0.5, 8.0), (math.inf, 10.0)]
    assert quantile(buckets, 0.5) == pytest.approx(0.1 + 0.4 * (1 / 4))
    assert quantile(buckets, 0.2) == pytest.approx(0.05)
    assert quantile(buckets, 0.99) == 0.5  # in +Inf: the highest finite bound
    assert math.isnan(quantile([(0.1, 0.0), (math.inf, 0.0)], 0.5))


async def test_detection_is_read_from_the_metrics_endpoint() -> None:
    registry = CollectorRegistry()
    histogram = Histogram(
        "triplane_money_recon_detection_seconds",
        "test",
        buckets=(0.005, 0.01, 0.025, 0.05),
        registry=registry,
    )
    for value in (0.001, 0.002, 0.007, 0.008, 0.02, 0.04):
        histogram.observe(value)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        found, count = await demo_payouts.detection_from_metrics(f"127.0.0.1:{port}")
    finally:
        await runner.cleanup()
    assert count == 6
    assert found is not None
    p50, p99 = found
    # Cumulative 2, 4, 5, 6: rank 3 of 6 is halfway through (0.005, 0.01];
    # rank 5.94 is 94% through (0.025, 0.05].
    assert p50 == pytest.approx(0.0075)
    assert p99 == pytest.approx(0.025 + 0.025 * 0.94)


def test_the_demo_config_points_the_stack_at_a_manual_clock_bank(tmp_path: Path) -> None:
    config = demo_config(DemoOptions(state_dir=str(tmp_path)), "test")
    assert config.sandbox_bank.clock == "manual"
    assert config.rails.bank_url == f"http://{config.sandbox_bank.listen}"
    assert config.sandbox_bank.faults.reject_rate > 0
    assert config.money.metrics_listen
    assert config.money.recon.intake_interval_s == demo_payouts.LOOP_INTERVAL_S
    # ACH files go at every check, whatever the hour.
    assert config.rails.worker.flush_lead_s >= 7 * 86_400
