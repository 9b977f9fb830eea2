"""Reconciliation on real SQLite and PostgreSQL: statements imported once and
whole, matched by reference, batch, amount and date, and against the
ledger's own postings; every break class detected, classified and put on the
outbox; breaks resolved once, a write-off posted to the ledger once."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import pytest
from money_helpers import Kit
from recon_samples import (
    IBAN,
    batch,
    camt052,
    camt053,
    camt054,
    expected,
    line,
    mt940,
    statement,
)

from money_plane.formats.statement import Sign
from money_plane.recon.model import BreakClass, BreakState, Direction, Rule
from money_plane.recon.reconciler import Reconciler
from triplane.common.v1 import envelope_pb2
from triplane.money.v1 import recon_pb2
from triplane.runtime.errors import FailedPrecondition, InvalidArgument


def classes(result_breaks: list) -> Counter[str]:  # type: ignore[type-arg]
    return Counter(b.break_class.value for b in result_breaks)


def recon_tables(kit: Kit) -> tuple[int, int, int, int]:
    t = kit.tenant
    p = "?" if kit.backend == "sqlite" else "%s"
    return tuple(  # type: ignore[return-value]
        kit.probe.scalar(f"SELECT COUNT(*) FROM {table} WHERE tenant_id = {p}", (t,))
        for table in ("statements", "statement_lines", "matches", "breaks")
    )


async def test_references_amount_window_and_idempotent_import(kit: Kit, recon: Reconciler) -> None:
    await recon.create_expected_payments(
        kit.tenant,
        [
            expected("e1", 1000, e2e="E2E-1"),
            expected("e2", 2000, instr="INSTR-2"),
            expected("e3", 3000, remittance="RF18539007547034"),
            expected("e4", 4000, bank_ref="BANK-4"),
            expected("e5", 5000, low=4900, high=5100),  # no reference: amount + dates
        ],
    )
    data = camt053(
        statement(
            [
                line(1000, e2e="E2E-1"),
                line(2000, instr="INSTR-2"),
                line(3000, remittance="RF18539007547034"),
                line(4000, bank_ref="BANK-4"),
                line(5050),
            ]
        )
    )
    first = await recon.import_statement(kit.tenant, "bank", data, actor="ops@acme")
    rules = {m.expected_ids[0]: (m.rule, m.confidence) for m in first.matches}
    assert rules["e1"] == (Rule.END_TO_END, 1.0)
    assert rules["e2"][0] is Rule.INSTRUCTION_ID
    assert rules["e3"][0] is Rule.REMITTANCE
    assert rules["e4"][0] is Rule.BANK_REFERENCE
    assert rules["e5"][0] is Rule.AMOUNT_DATE and rules["e5"][1] < 1
    assert first.breaks == [] and first.lines_new == 5
    before = recon_tables(kit)
    again = await recon.import_statement(kit.tenant, "bank", data)
    assert again.duplicate_file and again.lines_new == 0 and not again.matches
    assert recon_tables(kit) == before
    # The same booking reported again in another file (an intraday report)
    # is the same line: nothing new to match, nothing raised.
    other = await recon.import_statement(kit.tenant, "bank", camt052(line(1000, e2e="E2E-1")))
    assert not other.duplicate_file and other.lines_new == 0 and other.breaks == []
    # An MT940 carries less than camt (no transaction amounts): its booking
    # of the same payment is another line, a second booking of e1.
    mt = await recon.import_statement(
        kit.tenant, "bank", mt940(statement([line(1000, e2e="E2E-1")]))
    )
    assert classes(mt.breaks) == Counter({"duplicate": 1})


async def test_every_break_class_is_detected_classified_and_published(
    kit: Kit, recon: Reconciler
) -> None:
    await recon.create_expected_payments(
        kit.tenant,
        [
            expected("amount", 1000, e2e="AMT"),
            expected("dup", 2000, e2e="DUP"),
            expected("ret", 3000, e2e="RET", direction=Direction.DEBIT),
            expected("late", 4000, e2e="LATE", date_from="2026-12-01", date_to="2026-12-02"),
            expected("never", 5000, e2e="NEVER", date_from="2026-12-01", date_to="2026-12-02"),
        ],
    )
    st = statement(
        [
            line(1500, e2e="AMT"),
            line(2000, e2e="DUP"),
            line(2000, e2e="DUP"),  # the bank booked it twice
            line(3000, e2e="RET", sign=Sign.CREDIT, return_reason="AC04"),
            line(4000, e2e="LATE"),  # 2 days past its window, grace 1 day
            line(777, e2e="WHO"),  # nothing expects it
        ],
        closing=999_999,  # does not add up
    )
    result = await recon.import_statement(kit.tenant, "bank", camt053(st))
    assert classes(result.breaks) == Counter(
        {
            "amount_mismatch": 1,
            "duplicate": 1,
            "returned": 1,
            "late": 1,
            "unmatched_bank": 1,
            "unmatched_ledger": 1,
            "balance_mismatch": 1,
        }
    )
    by_class = {b.break_class: b for b in result.breaks}
    assert by_class[BreakClass.AMOUNT_MISMATCH].amount_minor == 500
    assert by_class[BreakClass.UNMATCHED_LEDGER].expected_id == "never"
    assert by_class[BreakClass.RETURNED].expected_id == "ret"
    assert all(b.owner == "treasury-ops" for b in result.breaks)
    # Each break is one event on the money outbox, naming its arrival.
    p = "?" if kit.backend == "sqlite" else "%s"
    rows = kit.probe.rows(
        f"SELECT subject, data FROM outbox WHERE tenant_id = {p} AND subject LIKE {p}",
        (kit.tenant, "%.recon.break"),
    )
    assert len(rows) == len(result.breaks)
    envelope = envelope_pb2.EventEnvelope.FromString(bytes(rows[0][1]))
    event = recon_pb2.ReconBreakDetectedEvent.FromString(envelope.payload)
    assert event.recon_break.break_id in {b.break_id for b in result.breaks}
    assert event.arrived_at.ToMicroseconds() == kit.clock.now_us()
    # Listing pages through them; the SLA tier escalates with age.
    listed = await recon.list_breaks(kit.tenant, state="open", limit=3)
    rest = await recon.list_breaks(kit.tenant, state="open", after=listed[-1].break_id)
    assert len(listed) + len(rest) == 7
    small = by_class[BreakClass.UNMATCHED_BANK]
    assert recon.sla(small).tier == "P3" and not recon.sla(small).overdue
    kit.clock.advance(73 * 3600)
    assert recon.sla(small).tier == "P2" and recon.sla(small).overdue
    # The same statement sent again in another file raises nothing new.
    second = await recon.import_statement(kit.tenant, "bank", camt053(st))
    assert not second.duplicate_file and second.lines_new == 0 and second.breaks == []


async def test_a_sweep_raises_unmatched_then_a_late_booking_matches_it(
    kit: Kit, recon: Reconciler
) -> None:
    await recon.create_expected_payments(
        kit.tenant,
        [expected("slow", 900, e2e="SLOW", date_from="2026-12-01", date_to="2026-12-02")],
    )
    # The plane's periodic sweep (every tenant's accounts; by default the day
    # that ended last): the day the window closed is not yet overdue.
    await recon.sweep_all("2026-12-02")
    assert await recon.list_breaks(kit.tenant) == []
    assert await recon.sweep_all("2026-12-04") >= 1
    swept = await recon.list_breaks(kit.tenant)
    assert [b.break_class for b in swept] == [BreakClass.UNMATCHED_LEDGER]
    assert await recon.sweep_overdue(kit.tenant, "bank", "2026-12-05") == []
    late = await recon.import_statement(kit.tenant, "bank", camt054(line(900, e2e="SLOW")))
    assert [b.break_class for b in late.breaks] == [BreakClass.LATE]
    unmatched = await recon.get_break(kit.tenant, swept[0].break_id)
    assert unmatched.state is BreakState.RESOLVED and unmatched.resolved_by == "matcher"


async def test_batch_booking_one_to_many_and_split_booking_many_to_one(
    kit: Kit, recon: Reconciler
) -> None:
    await recon.create_expected_payments(
        kit.tenant,
        [
            expected("p1", 1000, e2e="P-1", direction=Direction.DEBIT, batch_id="PMTINF-1"),
            expected("p2", 2000, e2e="P-2", direction=Direction.DEBIT, batch_id="PMTINF-1"),
            expected("p3", 3000, e2e="P-3", direction=Direction.DEBIT, batch_id="PMTINF-1"),
            expected("big", 10_000, e2e="BIG"),
            expected("q1", 500, e2e="Q-1", direction=Direction.DEBIT, batch_id="B2"),
            expected("q2", 600, e2e="Q-2", direction=Direction.DEBIT, batch_id="B2"),
        ],
    )
    result = await recon.import_statement(
        kit.tenant,
        "bank",
        camt053(
            statement(
                [
                    batch([("P-1", 1000), ("P-2", 2000), ("P-3", 3000)]),
                    line(6000, e2e="BIG"),
                    line(4000, e2e="BIG"),
                    batch([("Q-1", 500), ("Q-2", 600)], total=1000),  # short by 100
                ]
            )
        ),
    )
    by_expected = {e: m for m in result.matches for e in m.expected_ids}
    one_to_many = by_expected["p1"]
    assert one_to_many.rule is Rule.BATCH and set(one_to_many.expected_ids) == {"p1", "p2", "p3"}
    assert len(one_to_many.line_fingerprints) == 1
    many_to_one = by_expected["big"]
    assert many_to_one.rule is Rule.END_TO_END and len(many_to_one.line_fingerprints) == 2
    assert classes(result.breaks) == Counter({"amount_mismatch": 1})
    assert result.breaks[0].amount_minor == 100 and result.breaks[0].expected_id == "q1"


async def test_hostile_and_malformed_files_are_refused_and_nothing_imported(
    kit: Kit, recon: Reconciler
) -> None:
    good = camt053(statement([line(1000, e2e="E2E-1")]))
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;">]><Document>&lol2;</Document>'
    )
    wrong = good.replace(b"<Amt ", b"<Amount ", 1).replace(b"</Amt>", b"</Amount>", 1)
    euro = camt053(statement([line(1000, e2e="E2E-1", currency="EUR")], currency="EUR"))
    mixed = camt053(statement([line(1000, e2e="A"), line(5, e2e="B", currency="EUR")]))
    cases = [
        (bomb, "DTD_FORBIDDEN"),
        (good[: len(good) // 2], None),
        (wrong, "SCHEMA_INVALID"),
        (euro, "STATEMENT_CURRENCY_MISMATCH"),
        (mixed, None),
        (b":20:X\r\n:25:ACCT\r\n:61:garbage\r\n-", None),
    ]
    for data, reason in cases:
        with pytest.raises(InvalidArgument) as refused:
            await recon.import_statement(kit.tenant, "bank", data)
        if reason is not None:
            assert refused.value.reason == reason, refused.value
        assert refused.value.field, refused.value
    assert recon_tables(kit) == (0, 0, 0, 0)


async def test_statement_balances_checked_against_the_ledger(kit: Kit, recon: Reconciler) -> None:
    # The ledger keeps the bank account as an asset: money in at the bank is
    # a debit of it. 7,000 came in; the bank's entry references the transfer.
    kit.clock.set_us(int(dt.datetime(2026, 12, 4, 10, tzinfo=dt.UTC).timestamp()) * 1_000_000)
    await kit.ledger.submit(kit.tenant, [kit.move("PAYIN-1", "bank", "alice", 7000)])
    await kit.ledger.submit(kit.tenant, [kit.move("PAYIN-2", "bank", "alice", 500)])
    checked = Reconciler(kit.ledger, recon.config.__class__(check_ledger_balance=True), kit.clock)
    agree = await checked.import_statement(
        kit.tenant,
        "bank",
        camt053(statement([line(7000, e2e="PAYIN-1"), line(500)], opening=0)),
    )
    assert agree.breaks == []
    assert {m.rule for m in agree.matches} == {Rule.LEDGER_REFERENCE, Rule.LEDGER_AMOUNT_DATE}
    assert agree.statements[0].ledger_closing_minor == 7500
    off = await checked.import_statement(
        kit.tenant,
        "bank",
        camt053(statement([], opening=7500, closing=7400, day=dt.date(2026, 12, 5))),
    )
    assert classes(off.breaks) == Counter({"balance_mismatch": 2})  # adds up to neither
    # The notification of a booking already imported is that line (nothing
    # new); a second booking of the transfer (the bank's own reference
    # differs) is a duplicate of the ledger entry.
    dup = await checked.import_statement(
        kit.tenant,
        "bank",
        camt054(
            line(7000, e2e="PAYIN-1"),
            line(7000, e2e="PAYIN-1", bank_ref="BK-2"),
            line(1, e2e="X"),
        ),
    )
    assert dup.lines_new == 2
    assert classes(dup.breaks) == Counter({"duplicate": 1, "unmatched_bank": 1})
    assert IBAN[-4:] == agree.statements[0].bank_account


async def test_write_off_posts_once_and_resolutions_record_the_actor(
    kit: Kit, recon: Reconciler
) -> None:
    result = await recon.import_statement(
        kit.tenant, "bank", camt054(line(1234, e2e="STRAY"), line(99, e2e="OTHER"))
    )
    stray, other = sorted(result.breaks, key=lambda b: b.amount_minor, reverse=True)
    command = await recon.resolution_command(kit.tenant, stray.break_id, "write_off")
    assert (command.debit_account_id, command.credit_account_id) == ("bank", "recon-write-off")
    token = kit.token_for(command)
    entries = kit.probe.entry_count(kit.tenant)
    first = await recon.resolve_break(
        kit.tenant, stray.break_id, "write_off", "ana@ops", decision_token=token
    )
    second = await recon.resolve_break(
        kit.tenant, stray.break_id, "write_off", "bo@ops", decision_token=token
    )
    assert first.state is BreakState.RESOLVED and first.resolved_by == "ana@ops"
    assert second == first and first.resolution_entry_id
    assert kit.probe.entry_count(kit.tenant) == entries + 1
    with pytest.raises(FailedPrecondition):
        await recon.resolve_break(kit.tenant, stray.break_id, "accepted", "bo@ops")
    # A manual match of the other line to an expected payment made afterwards.
    await recon.create_expected_payments(kit.tenant, [expected("late-entry", 99)])
    matched = await recon.resolve_break(
        kit.tenant, other.break_id, "manual_match", "bo@ops", expected_id="late-entry"
    )
    assert matched.resolution == "manual_match" and matched.resolved_by == "bo@ops"
    statement_id = result.statements[0].statement_id
    _, lines = await recon.get_statement(kit.tenant, statement_id)
    match_of = {row[0]: row[-1] for row in lines}
    assert match_of[other.line_fingerprint] and not match_of[stray.line_fingerprint]


async def test_the_servicer_translates_requests_and_pages_breaks(
    kit: Kit, recon: Reconciler
) -> None:
    from money_plane.recon.service import ReconciliationServicer
    from triplane.common.v1 import types_pb2

    async def recon_for(tenant_id: str) -> Reconciler:
        return recon

    servicer = ReconciliationServicer(recon_for)
    created = await servicer.CreateExpectedPayments(
        recon_pb2.CreateExpectedPaymentsRequest(
            tenant_id=kit.tenant,
            expected_payments=[
                recon_pb2.ExpectedPayment(
                    expected_id="g1",
                    ledger_account_id="bank",
                    direction="credit",
                    amount=types_pb2.Money(amount_minor=100, currency="USD"),
                    date_from="2026-12-04",
                    end_to_end_id="G-1",
                )
            ],
        ),
        None,  # type: ignore[arg-type]
    )
    assert created.expected_payments[0].state == "open"
    imported = await servicer.ImportStatement(
        recon_pb2.ImportStatementRequest(
            tenant_id=kit.tenant,
            ledger_account_id="bank",
            content=camt054(line(100, e2e="G-1"), line(5, e2e="N1"), line(6, e2e="N2")),
            actor="ops",
        ),
        None,  # type: ignore[arg-type]
    )
    assert [m.rule for m in imported.matches] == ["end_to_end_id"]
    page = await servicer.ListBreaks(
        recon_pb2.ListBreaksRequest(tenant_id=kit.tenant, page_size=1),
        None,  # type: ignore[arg-type]
    )
    assert len(page.breaks) == 1 and page.next_page_token and page.breaks[0].sla_tier == "P3"
    rest = await servicer.ListBreaks(
        recon_pb2.ListBreaksRequest(tenant_id=kit.tenant, page_token=page.next_page_token),
        None,  # type: ignore[arg-type]
    )
    assert len(rest.breaks) == 1 and not rest.next_page_token
    got = await servicer.GetStatement(
        recon_pb2.GetStatementRequest(
            tenant_id=kit.tenant, statement_id=imported.statements[0].statement_id
        ),
        None,  # type: ignore[arg-type]
    )
    assert len(got.lines) == 3 and got.statement.kind == "camt.054"
    resolved = await servicer.ResolveBreak(
        recon_pb2.ResolveBreakRequest(
            tenant_id=kit.tenant,
            break_id=page.breaks[0].break_id,
            resolution="accepted",
            actor="ops",
        ),
        None,  # type: ignore[arg-type]
    )
    assert resolved.recon_break.state == "resolved" and resolved.recon_break.resolved_by == "ops"
