"""The statement intake in a running money plane against the real sandbox
bank (a process; manual clocks on both sides, moved by the test): payouts go
out over two rails (instant and ACH), the bank books them with faults, and
the intake imports the bank's notifications and end-of-day statements by
itself (no ImportStatement call); every fault the bank's own record
(GET /v1/truth) says it produced shows up as its break class, and nothing
else does. The intake's cursor survives a restart: nothing is imported twice,
and what the bank booked meanwhile is imported once."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from money_helpers import STANDARD_ACCOUNTS, BackendPlace, Kit, ledger_config, make_ledger
from prometheus_client import REGISTRY
from sandbox_helpers import BankClient
from test_rail_worker import us_payouts

from money_plane.app import MoneyPlane
from money_plane.domain import Kind
from money_plane.payouts.codec import encode_payout_event
from money_plane.payouts.domain import Payout, PayoutState
from money_plane.payouts.service import Payouts, expected_window, load_cipher
from money_plane.rails.worker import RailWorker
from money_plane.recon.intake import StatementIntake
from money_plane.recon.model import BreakState
from money_plane.recon.reconciler import Reconciler
from triplane.runtime.config import Config, with_overrides

IN_FLIGHT = "payouts_in_flight:USD"
HOUR_S = 3600.0
DAY_S = 86_400.0
# The bank starts on Monday 2026-12-07 14:00 UTC; ACH files go 600 s before
# the first same-day window closes (15:30 UTC).
TO_FLUSH_S = 85 * 60.0
FAULTS = {
    "reject_rate": 0.1,
    "return_rate": 0.15,
    "duplicate_rate": 0.15,
    "late_rate": 0.15,
    "amount_change_rate": 0.15,
    # Half the rejected payouts are booked anyway, after the reject.
    "booked_after_reject_rate": 0.5,
    "batch_rate": 0.0,
}
RAIL_OF_METHOD = {"instant_payment": "instant", "bank_transfer": "ach"}


def _config(kit: Kit, state_dir: Path, url: str) -> Config:
    store: dict[str, Any] = {"backend": kit.backend}
    if kit.backend == "sqlite":
        store["sqlite_path"] = str(Path(kit.where).resolve())
    else:
        store["postgres_dsn"] = str(kit.where)
    return with_overrides(
        ledger_config(state_dir, kit.signer),
        {
            "money": {
                "store": store,
                # grace 0: a payout booked the day after its window is late.
                "recon": {"grace_days": 0, "intake_interval_s": HOUR_S, "sweep_interval_s": 0},
            },
            "rails": {
                "bank_url": url,
                # The loops sleep long: the test runs each unit itself.
                "worker": {
                    "handoff_interval_s": HOUR_S,
                    "flush_check_interval_s": HOUR_S,
                    "deliver_interval_s": HOUR_S,
                },
            },
        },
    )


async def _payouts(kit: Kit, state_dir: Path, methods: list[str], salt: str = "") -> list[Payout]:
    """Approved payouts to a US account, routed by policy to each method."""
    payouts = await us_payouts(kit, state_dir)
    await kit.fund("merchant", 100_000 * len(methods))
    made = []
    for n, method in enumerate(methods):
        key = f"po-i{salt}{n}"
        amount = 1_000 + n
        token = kit.move(key, "merchant", IN_FLIGHT, amount, kind=Kind.PAYOUT).decision_token
        payout, _ = await payouts.create_payout(
            kit.tenant,
            key,
            beneficiary_id="ben-us",
            merchant_id="m-1",
            debit_account_id="merchant",
            amount_minor=amount,
            currency="USD",
            decision_token=token,
            pending_review=False,
            rail=method,
        )
        assert payout.state == PayoutState.APPROVED
        made.append(payout)
    return made


async def _plane(config: Config, kit: Kit) -> MoneyPlane:
    plane = MoneyPlane(config, clock=kit.clock, listen="127.0.0.1:0")
    await plane.start(relay=False, metrics=False)
    assert len(plane.rail_workers) == 1 and len(plane.intakes) == 1
    return plane


async def _advance(kit: Kit, client: BankClient, seconds: float) -> None:
    kit.clock.advance(seconds)
    await client.advance(seconds / DAY_S)


async def _send(worker: RailWorker, kit: Kit, client: BankClient) -> None:
    """Hands the approved payouts to their rails and sends the ACH file."""
    await worker.hand_off()
    await _advance(kit, client, TO_FLUSH_S)
    await worker.flush_if_due()


async def _days(
    kit: Kit, client: BankClient, worker: RailWorker, intake: StatementIntake, days: int
) -> None:
    """Day by day, as the loops would: the intake reads what the bank booked
    (seconds after it did), the worker records the rails' outcomes."""
    for _ in range(days):
        await intake.run_once()
        await worker.deliver()
        await _advance(kit, client, DAY_S)
    await intake.run_once()
    await worker.deliver()


def _wanted(payment: dict[str, Any], method: str, grace_days: int = 0) -> set[str]:
    """The break classes the bank's record says this payout must raise. A
    rejected payout failed (its expected payment withdrawn): none, unless the
    bank booked it after all (booked_after_cancel, once per booking)."""
    if payment["outcome"] == "rejected":
        return {"booked_after_cancel"} if payment["bookings"] else set()
    wanted = {
        {"duplicate": "duplicate", "amount_changed": "amount_mismatch"}[f]
        for f in payment["faults"]
        if f in {"duplicate", "amount_changed"}
    }
    received = dt.datetime.fromisoformat(payment["received_at"])
    _, date_to = expected_window(method, int(received.timestamp() * 1_000_000))
    due = dt.date.fromisoformat(date_to) + dt.timedelta(days=grace_days)
    first = min(b["booking_date"] for b in payment["bookings"] if b["sign"] == "DBIT")
    if dt.date.fromisoformat(first) > due:
        wanted.add("late")
    if payment["outcome"] == "returned":
        wanted.add("returned")
    return wanted


def _count(kit: Kit, table: str) -> int:
    return int(
        kit.probe.scalar(f"SELECT COUNT(*) FROM {table} WHERE tenant_id = %s", (kit.tenant,))
    )


def _detections() -> float:
    return REGISTRY.get_sample_value("triplane_money_recon_detection_seconds_count") or 0.0


@pytest.fixture
def state_dir(backend_place: BackendPlace) -> Path:
    return backend_place.state_dir


@pytest.mark.parametrize("backend_place", ["sqlite"], indirect=True)
async def test_the_intake_classifies_the_banks_faults_as_its_record_says(
    kit: Kit, state_dir: Path, bank_factory: Callable[..., str]
) -> None:
    # The bank draws each payment's fate from its seed and end-to-end id,
    # which follows from the tenant: a fixed tenant (the SQLite file is this
    # test's own) makes the faults, and so what is asserted below, the same
    # every run (with the kit's random tenant, the rejected payouts were
    # all booked, or none, in about one run in six).
    await kit.ledger.create_tenant("intake-faults", "Fixed tenant")
    kit = dataclasses.replace(kit, tenant="intake-faults")
    await kit.open(*STANDARD_ACCOUNTS)
    url = bank_factory(seed=31, faults=FAULTS)
    client = BankClient(url)
    try:
        kit.clock.set_us(await client.now_us())
        methods = ["instant_payment"] * 30 + ["bank_transfer"] * 20
        made = await _payouts(kit, state_dir, methods)
        plane = await _plane(_config(kit, state_dir, url), kit)
        detections = _detections()
        try:
            worker, intake = plane.rail_workers[0], plane.intakes[0]
            await _send(worker, kit, client)
            await _days(kit, client, worker, intake, 4)
            truth = await client.truth()
            payouts = {
                p.payout_id: await worker.payouts.get_payout(kit.tenant, p.payout_id) for p in made
            }
            breaks = await plane._recons[0].list_breaks(
                kit.tenant, state=BreakState.OPEN.value, limit=1000
            )
        finally:
            await plane.stop()
    finally:
        await client.aclose()
    assert {RAIL_OF_METHOD[p.rail] for p in made} == {"instant", "ach"}
    assert {truth[p.end_to_end_id]["rail"] for p in made} == {"instant", "ach"}
    wanted: dict[str, set[str]] = {}
    for p in made:
        payment = truth[p.end_to_end_id]
        wanted[f"payout:{p.payout_id}"] = _wanted(payment, p.rail)
        if payment["outcome"] == "rejected":
            assert payouts[p.payout_id].state in (PayoutState.FAILED, PayoutState.RETURNED)
    found: dict[str, set[str]] = defaultdict(set)
    for b in breaks:
        found[b.expected_id].add(b.break_class.value)
    assert {k: v for k, v in wanted.items() if v} == dict(found)
    produced = set().union(*wanted.values())
    assert {"returned", "duplicate", "late", "amount_mismatch"} <= produced
    rejected = [
        truth[p.end_to_end_id] for p in made if truth[p.end_to_end_id]["outcome"] == "rejected"
    ]
    # Some rejected payouts the bank left alone, some it booked after all.
    assert {bool(r["bookings"]) for r in rejected} == {False, True}
    assert {"booked_after_reject"} == {f for r in rejected if r["bookings"] for f in r["faults"]}
    # Every booking the bank made for these payouts is a line, once.
    booked = sum(len(truth[p.end_to_end_id]["bookings"]) for p in made)
    assert _count(kit, "statement_lines") == booked
    # The closed days' end-of-day statements came in once each, their
    # balances adding up (one statement per bank account with bookings).
    eod = kit.probe.scalar(
        "SELECT COUNT(*) FROM statements WHERE tenant_id = %s AND kind = 'camt.053' "
        "AND balances_agree = 1 AND imported_by = 'statement-intake'",
        (kit.tenant,),
    )
    booked_days = {
        (truth[p.end_to_end_id]["account_id"], b["booking_date"])
        for p in made
        for b in truth[p.end_to_end_id]["bookings"]
    }
    assert int(eod) == len(booked_days)
    # Each break's detection was measured.
    assert _detections() - detections == len(breaks)


@pytest.mark.parametrize("backend_place", ["sqlite", "postgres"], indirect=True)
async def test_the_intakes_cursor_survives_a_restart(
    kit: Kit, state_dir: Path, bank_factory: Callable[..., str]
) -> None:
    clean_bank = bank_factory()  # a feed of this test's bookings alone
    client = BankClient(clean_bank)
    try:
        kit.clock.set_us(await client.now_us())
        first_batch = await _payouts(kit, state_dir, ["instant_payment"] * 3)
        config = _config(kit, state_dir, clean_bank)
        first = await _plane(config, kit)
        try:
            assert await first.rail_workers[0].hand_off() == 3
            assert await first.intakes[0].pull() == 3
        finally:
            await first.stop()
        statements, lines = _count(kit, "statements"), _count(kit, "statement_lines")
        assert lines == 3

        second = await _plane(config, kit)
        try:
            worker, intake = second.rail_workers[0], second.intakes[0]
            assert await intake.pull() == 0  # nothing read twice
            assert _count(kit, "statements") == statements
            more = await _payouts(kit, state_dir, ["instant_payment"] * 2, salt="b")
            assert await worker.hand_off() == 2
            assert await intake.pull() == 2
            assert await intake.pull() == 0
            await worker.deliver()
            for p in first_batch + more:
                found = await worker.payouts.get_payout(kit.tenant, p.payout_id)
                assert found.state == PayoutState.SETTLED
        finally:
            await second.stop()
    finally:
        await client.aclose()
    assert _count(kit, "statement_lines") == 5
    assert _count(kit, "breaks") == 0
    matched = kit.probe.scalar(
        "SELECT COUNT(*) FROM expected_payments WHERE tenant_id = %s AND state = 'matched'",
        (kit.tenant,),
    )
    assert int(matched) == 5


@pytest.mark.parametrize("backend_place", ["postgres"], indirect=True)
async def test_two_replicas_import_each_document_once(
    kit: Kit, state_dir: Path, bank_factory: Callable[..., str]
) -> None:
    """Two planes' intakes on one PostgreSQL database, pulling at once: the
    lease lets one read the feed, the cursor keeps the other from reading
    it again."""
    clean_bank = bank_factory()  # a feed of this test's bookings alone
    client = BankClient(clean_bank)
    try:
        kit.clock.set_us(await client.now_us())
        await _payouts(kit, state_dir, ["instant_payment"] * 4, salt="r")
        config = _config(kit, state_dir, clean_bank)
        plane = await _plane(config, kit)
        other = make_ledger(kit.backend, kit.where, config, kit.signer, kit.clock)
        await other.start(sweepers=False)
        try:
            assert await plane.rail_workers[0].hand_off() == 4
            recon = Reconciler(other, config.money.recon, kit.clock)
            await recon.start()
            cipher = load_cipher(config.money.payouts, state_dir)
            payouts = Payouts(other, cipher, config.money.payouts, encode_payout_event)
            second = StatementIntake(recon, payouts, config.rails, kit.clock)
            await second.start()
            try:
                intakes = [plane.intakes[0], second]
                read = await asyncio.gather(*(i.pull() for i in intakes))
                read_again = await asyncio.gather(*(i.pull() for i in intakes))
            finally:
                await second.aclose()
        finally:
            await other.stop()
            await plane.stop()
    finally:
        await client.aclose()
    assert sum(read) + sum(read_again) == 4
    assert _count(kit, "statements") == 4
    assert _count(kit, "statement_lines") == 4
