"""Ledger postings of a bank account that no statement line matched age into
unmatched_ledger breaks through the sweep (real SQLite and PostgreSQL, a
manual clock): date_window_days + grace_days after the day they were posted,
once each, on the accounts statements were imported for and those marked
with a bank role; a payout's settlement, an expected payment's own entry and
a posting a line matched are left alone; a line matching the posting later
resolves its break."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

from money_helpers import NO_CONSTRAINT, Kit
from recon_samples import camt054, expected, line

from money_plane.domain import AccountSpec
from money_plane.recon.model import BreakClass, BreakState, Direction, Rule
from money_plane.recon.reconciler import Reconciler

POSTED = dt.datetime(2026, 12, 4, 10, tzinfo=dt.UTC)


async def _post(kit: Kit, key: str, debit: str, credit: str, amount: int) -> str:
    [outcome] = await kit.ledger.submit(kit.tenant, [kit.move(key, debit, credit, amount)])
    assert outcome.error is None and outcome.entry is not None, outcome.error
    return outcome.entry.entry_id


async def test_bank_postings_no_line_matched_age_into_unmatched_ledger_breaks(
    kit: Kit, recon: Reconciler
) -> None:
    # An account marked as a bank account (no statement imported for it yet)
    # and one that is not a bank account at all.
    await kit.ledger.create_accounts(
        kit.tenant,
        [
            AccountSpec("ops-bank", "USD", 1, NO_CONSTRAINT, 0, {"role": "bank"}),
            AccountSpec("treasury", "USD", 1, NO_CONSTRAINT, 0, {"role": "treasury"}),
        ],
    )
    kit.clock.set_us(int(POSTED.timestamp()) * 1_000_000)
    lost = await _post(kit, "PAYIN-LOST", "bank", "alice", 7_000)
    booked = await _post(kit, "PAYIN-BOOKED", "bank", "alice", 500)
    later = await _post(kit, "PAYIN-LATER", "bank", "alice", 300)
    named = await _post(kit, "PAYIN-EXPECTED", "bank", "alice", 250)
    await _post(kit, "payout-settle:po-1", "alice", "bank", 120)
    wire_out = await _post(kit, "WIRE-OUT", "alice", "ops-bank", 900)
    await _post(kit, "INTERNAL", "treasury", "alice", 60)
    # An expected payment that names its ledger entry ages as itself.
    await recon.create_expected_payments(
        kit.tenant,
        [
            replace(
                expected("exp", 250, e2e="EXP", date_from="2026-12-04", date_to="2026-12-20"),
                ledger_entry_id=named,
            )
        ],
    )
    imported = await recon.import_statement(
        kit.tenant, "bank", camt054(line(500, e2e="PAYIN-BOOKED"))
    )
    assert [m.rule for m in imported.matches] == [Rule.LEDGER_REFERENCE]
    assert imported.matches[0].entry_ids == (booked,)

    # Posted on the 4th: a line booked by the 6th could still match by amount
    # and date (window 2 days), and grace is a day more.
    assert recon.config.date_window_days + recon.config.grace_days == 3
    assert await recon.sweep_all("2026-12-06") == 0
    assert await recon.sweep_all("2026-12-07") == 3
    raised = await recon.list_breaks(kit.tenant)
    by_entry = {b.cause.removeprefix("unmatched-posting:"): b for b in raised}
    assert set(by_entry) == {lost, later, wire_out}
    assert {b.break_class for b in raised} == {BreakClass.UNMATCHED_LEDGER}
    money_in = by_entry[lost]
    # The ledger says 7,000 came in; the bank's missing move is a credit, so
    # the break (which way the bank moved what the ledger lacks) is a debit.
    assert (money_in.amount_minor, money_in.direction, money_in.ledger_account_id) == (
        7_000,
        Direction.DEBIT,
        "bank",
    )
    assert lost in money_in.reason and not money_in.expected_id and not money_in.line_fingerprint
    assert money_in.owner == recon.config.default_owner
    paid_out = by_entry[wire_out]
    assert (paid_out.direction, paid_out.ledger_account_id) == (Direction.CREDIT, "ops-bank")
    # Swept again: nothing new.
    assert await recon.sweep_all("2026-12-08") == 0

    # The bank books the late one: the line matches the posting by reference
    # and its break is resolved by the matcher.
    kit.clock.advance(4 * 86_400)
    late = await recon.import_statement(
        kit.tenant, "bank", camt054(line(300, e2e="PAYIN-LATER", day=dt.date(2026, 12, 8)))
    )
    assert [m.entry_ids for m in late.matches] == [(later,)]
    assert late.breaks == []
    resolved = await recon.get_break(kit.tenant, by_entry[later].break_id)
    assert (resolved.state, resolved.resolution, resolved.resolved_by) == (
        BreakState.RESOLVED,
        "accepted",
        "matcher",
    )
    still = await recon.get_break(kit.tenant, money_in.break_id)
    assert still.state is BreakState.OPEN


async def test_a_posting_older_than_the_lookback_is_not_swept(kit: Kit, recon: Reconciler) -> None:
    kit.clock.set_us(int(POSTED.timestamp()) * 1_000_000)
    await _post(kit, "PAYIN-OLD", "bank", "alice", 4_000)
    await recon.import_statement(kit.tenant, "bank", camt054(line(1, e2e="STRAY")))
    lookback = recon.config.unmatched_posting_lookback_days
    # The 4th's posting ages on the 7th; the last sweep that still looks at
    # it is lookback - 1 days after that.
    last = (dt.date(2026, 12, 7) + dt.timedelta(days=lookback - 1)).isoformat()
    past = (dt.date(2026, 12, 7) + dt.timedelta(days=lookback)).isoformat()
    assert await recon.sweep_overdue(kit.tenant, "bank", past) == []
    [found] = await recon.sweep_overdue(kit.tenant, "bank", last)
    assert found.amount_minor == 4_000 and found.break_class is BreakClass.UNMATCHED_LEDGER
