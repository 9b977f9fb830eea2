"""Payouts create their reconciliation expected payments (real SQLite and
PostgreSQL, a manual clock): one per payout, in the transaction that marks it
submitted however often it is handed over; the bank's camt line with its
end-to-end id matches it with no break; a failed payout's is cancelled and
never ages into an unmatched_ledger break."""

from __future__ import annotations

import datetime as dt

import pytest
from money_helpers import Kit
from recon_samples import camt053, camt054, line, statement

from money_plane.domain import Kind
from money_plane.formats.statement import Sign
from money_plane.payouts.codec import encode_payout_event
from money_plane.payouts.domain import NewBeneficiary, Payout, PayoutOutcome, RailSubmission
from money_plane.payouts.service import Payouts, expected_id_for, expected_window, load_cipher
from money_plane.recon.model import Direction, ExpectedPayment, ExpectedState
from money_plane.recon.reconciler import Reconciler
from triplane.runtime.config import ReconConfig

IN_FLIGHT = "payouts_in_flight:USD"
BANK = "payouts_bank:USD"


class Rail:
    def __init__(self) -> None:
        self.sent: list[RailSubmission] = []

    async def submit(self, submission: RailSubmission) -> str:
        self.sent.append(submission)
        return submission.end_to_end_id


@pytest.fixture
async def payouts(kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> Payouts:
    config = kit.ledger.config.payouts
    service = Payouts(
        kit.ledger,
        load_cipher(config, tmp_path_factory.mktemp("payout-keys")),
        config,
        encode_payout_event,
    )
    await service.create_beneficiary(
        kit.tenant,
        NewBeneficiary(
            beneficiary_id="ben-1",
            merchant_id="m-1",
            holder_name="Jonas Schmidt Handel",
            country="DE",
            kind="iban",
            iban="DE89370400440532013000",
            bic="COBADEFFXXX",
            account_token="tok_iban_bcdfghjkmnpqrstvbcdfghjkmnpqrstv",
            holder_name_token="tok_name_bcdfghjkmnpqrstvbcdfghjkmnpqrstv",
        ),
    )
    await kit.fund("merchant", 100_000)
    return service


async def approved(kit: Kit, payouts: Payouts, key: str, amount: int, rail: str) -> Payout:
    token = kit.move(key, "merchant", IN_FLIGHT, amount, kind=Kind.PAYOUT).decision_token
    payout, _ = await payouts.create_payout(
        kit.tenant,
        key,
        beneficiary_id="ben-1",
        merchant_id="m-1",
        debit_account_id="merchant",
        amount_minor=amount,
        currency="USD",
        decision_token=token,
        pending_review=False,
        rail=rail,
    )
    return payout


def expected_rows(kit: Kit) -> list[tuple[str, str]]:
    return [
        (str(eid), str(state))
        for eid, state in kit.probe.rows(
            "SELECT expected_id, state FROM expected_payments WHERE tenant_id = %s "
            "ORDER BY expected_id",
            (kit.tenant,),
        )
    ]


def today(kit: Kit) -> dt.date:
    return dt.datetime.fromtimestamp(kit.clock.now_us() / 1_000_000, dt.UTC).date()


async def stored(recon: Reconciler, kit: Kit, expected_id: str) -> ExpectedPayment:
    def read() -> ExpectedPayment | None:
        return recon.store.run(lambda tx: tx.get_expected(kit.tenant, expected_id))  # type: ignore[no-any-return]

    found = await kit.ledger.run_on_writer(read)
    assert found is not None
    return found


async def test_a_submitted_payout_expects_its_debit_once_and_the_bank_line_matches_it(
    kit: Kit, payouts: Payouts, recon: Reconciler
) -> None:
    payout = await approved(kit, payouts, "po-1", 4_000, "instant_payment")
    assert expected_rows(kit) == []  # approved: not with the bank yet
    rail = Rail()
    await payouts.hand_to_rail(kit.tenant, payout.payout_id, rail)
    await payouts.hand_to_rail(kit.tenant, payout.payout_id, rail)  # handed over again
    eid = expected_id_for(payout.payout_id)
    assert expected_rows(kit) == [(eid, "open")]
    e = await stored(recon, kit, eid)
    day = today(kit).isoformat()
    assert (e.ledger_account_id, e.direction, e.currency) == (BANK, Direction.DEBIT, "USD")
    assert (e.amount_minor, e.amount_min_minor, e.amount_max_minor) == (4_000, 4_000, 4_000)
    assert (e.end_to_end_id, e.date_from, e.date_to) == (payout.end_to_end_id, day, day)

    # The bank books the debit the same day (camt.053 end of day).
    st = statement(
        [line(4_000, e2e=payout.end_to_end_id, sign=Sign.DEBIT, day=today(kit))],
        opening=10_000,
        day=today(kit),
    )
    result = await recon.import_statement(kit.tenant, BANK, camt053(st))
    assert result.breaks == []
    [match] = result.matches
    assert (match.rule.value, match.expected_ids) == ("end_to_end_id", (eid,))
    assert expected_rows(kit) == [(eid, "matched")]
    # Days later nothing ages: no unmatched_ledger break.
    kit.clock.advance(10 * 86_400)
    assert await recon.sweep_overdue(kit.tenant, BANK) == []


async def test_a_failed_payout_leaves_no_open_expected_payment(
    kit: Kit, payouts: Payouts, recon: Reconciler
) -> None:
    payout = await approved(kit, payouts, "po-2", 2_500, "bank_transfer")
    await payouts.hand_to_rail(kit.tenant, payout.payout_id, Rail())
    eid = expected_id_for(payout.payout_id)
    e = await stored(recon, kit, eid)
    assert (e.date_from, e.date_to) == expected_window("bank_transfer", kit.clock.now_us())
    assert e.date_to > e.date_from  # ACH / SEPA: by the next business day
    await payouts.record_outcome(
        kit.tenant, payout.payout_id, PayoutOutcome.FAILED, reason_code="AC04"
    )
    assert expected_rows(kit) == [(eid, ExpectedState.CANCELLED.value)]
    kit.clock.advance(10 * 86_400)
    assert await recon.sweep_overdue(kit.tenant, BANK) == []
    assert await recon.list_breaks(kit.tenant) == []


async def test_a_return_after_booking_is_the_bank_return_line_s(
    kit: Kit, payouts: Payouts, recon: Reconciler
) -> None:
    payout = await approved(kit, payouts, "po-3", 3_000, "instant_payment")
    await payouts.hand_to_rail(kit.tenant, payout.payout_id, Rail())
    await payouts.record_outcome(kit.tenant, payout.payout_id, PayoutOutcome.SETTLED)
    booked = line(3_000, e2e=payout.end_to_end_id, sign=Sign.DEBIT, day=today(kit))
    assert (await recon.import_statement(kit.tenant, BANK, camt054(booked))).breaks == []
    await payouts.record_outcome(
        kit.tenant, payout.payout_id, PayoutOutcome.RETURNED, reason_code="AC04"
    )
    eid = expected_id_for(payout.payout_id)
    assert expected_rows(kit) == [(eid, "matched")]  # not withdrawn: it was booked
    back = line(3_000, e2e=payout.end_to_end_id, return_reason="AC04", day=today(kit))
    result = await recon.import_statement(kit.tenant, BANK, camt054(back))
    assert [(b.break_class.value, b.expected_id) for b in result.breaks] == [("returned", eid)]
    assert expected_rows(kit) == [(eid, "returned")]


async def test_a_booking_after_the_payout_failed_is_booked_after_cancel(
    kit: Kit, payouts: Payouts, recon: Reconciler
) -> None:
    """The rail rejected the payout (the ledger gave the money back), then the
    bank booked it anyway: a class of its own, not a duplicate of anything;
    booked again, the second line is a duplicate of the same kind."""
    payout = await approved(kit, payouts, "po-4", 4_200, "instant_payment")
    await payouts.hand_to_rail(kit.tenant, payout.payout_id, Rail())
    await payouts.record_outcome(
        kit.tenant, payout.payout_id, PayoutOutcome.FAILED, reason_code="AC04"
    )
    eid = expected_id_for(payout.payout_id)
    assert expected_rows(kit) == [(eid, ExpectedState.CANCELLED.value)]
    booked = line(4_200, e2e=payout.end_to_end_id, sign=Sign.DEBIT, day=today(kit))
    result = await recon.import_statement(kit.tenant, BANK, camt054(booked))
    assert result.matches == []
    [raised] = result.breaks
    assert (raised.break_class.value, raised.expected_id) == ("booked_after_cancel", eid)
    assert (raised.amount_minor, raised.direction) == (4_200, Direction.DEBIT)
    assert raised.owner == recon.config.default_owner
    assert raised.line_fingerprint
    assert recon.sla(raised).tier
    # The expected payment stays cancelled: nothing ages, nothing matched it.
    assert expected_rows(kit) == [(eid, ExpectedState.CANCELLED.value)]
    again = line(4_200, e2e=payout.end_to_end_id, sign=Sign.DEBIT, day=today(kit), bank_ref="R2")
    second = await recon.import_statement(kit.tenant, BANK, camt054(again))
    assert [b.break_class.value for b in second.breaks] == ["booked_after_cancel"]
    kit.clock.advance(10 * 86_400)
    assert await recon.sweep_overdue(kit.tenant, BANK) == []


async def test_the_ledger_balance_check_counts_a_settled_payout_not_yet_booked_in_transit(
    kit: Kit, payouts: Payouts, recon: Reconciler
) -> None:
    """An instant payout settles in the ledger on its day (the bank account
    credited) and the bank books it the next: the first day's closing
    balance is the ledger's less that payment in transit, no break; the
    next day it is booked and nothing is in transit. A real difference
    still raises balance_mismatch, naming what was in transit."""
    checked = Reconciler(kit.ledger, ReconConfig(check_ledger_balance=True), kit.clock)
    payout = await approved(kit, payouts, "po-5", 4_000, "instant_payment")
    await payouts.hand_to_rail(kit.tenant, payout.payout_id, Rail())
    await payouts.record_outcome(kit.tenant, payout.payout_id, PayoutOutcome.SETTLED)
    first = today(kit)
    day_one = await checked.import_statement(
        kit.tenant, BANK, camt053(statement([], opening=0, day=first))
    )
    assert day_one.breaks == []
    assert day_one.statements[0].ledger_closing_minor == -4_000
    assert await checked_in_transit(checked, kit, first) == (-4_000, 1)

    kit.clock.advance(86_400)
    second = today(kit)
    booked = line(4_000, e2e=payout.end_to_end_id, sign=Sign.DEBIT, day=second)
    day_two = await checked.import_statement(
        kit.tenant, BANK, camt053(statement([booked], opening=0, day=second))
    )
    assert day_two.breaks == []
    assert [m.expected_ids for m in day_two.matches] == [(expected_id_for(payout.payout_id),)]
    assert await checked_in_transit(checked, kit, second) == (0, 0)
    # The first day still had it in transit: booked the day after.
    assert await checked_in_transit(checked, kit, first) == (-4_000, 1)

    # The bank says 100 more left than the ledger knows of.
    kit.clock.advance(86_400)
    third = today(kit)
    off = await checked.import_statement(
        kit.tenant,
        BANK,
        camt053(statement([], opening=-4_000, closing=-4_100, day=third)),
    )
    # The statement's own balances do not add up either (no line says why).
    assert sorted(b.cause.partition(":")[0] for b in off.breaks) == [
        "ledger-balance",
        "statement-balance",
    ]
    [raised] = [b for b in off.breaks if b.cause.startswith("ledger-balance:")]
    assert (raised.break_class.value, raised.amount_minor, raised.direction) == (
        "balance_mismatch",
        100,
        Direction.DEBIT,
    )
    assert "0 of it in 0 payments in transit" in raised.reason


async def checked_in_transit(recon: Reconciler, kit: Kit, day: dt.date) -> tuple[int, int]:
    found: tuple[int, int] = await kit.ledger.run_on_writer(
        lambda: recon.store.run(lambda tx: recon.in_transit(tx, kit.tenant, BANK, day.isoformat()))
    )
    return found
