"""Statements for the reconciliation tests, made with the formats' writers."""

from __future__ import annotations

import datetime as dt
import itertools

from money_plane.formats.camt import write_camt052, write_camt053, write_camt054
from money_plane.formats.mt940 import write_mt940
from money_plane.formats.statement import (
    Account,
    Balance,
    Batch,
    EntryStatus,
    References,
    Sign,
    Statement,
    StatementKind,
    StatementLine,
    TransactionDetail,
)
from money_plane.recon.model import Direction, ExpectedPayment

UTC = dt.UTC
IBAN = "DE89370400440532013000"
DAY = dt.date(2026, 12, 4)
_ids = itertools.count(1)


def line(
    amount: int,
    *,
    e2e: str = "",
    instr: str = "",
    bank_ref: str = "",
    remittance: str = "",
    sign: Sign = Sign.CREDIT,
    day: dt.date = DAY,
    return_reason: str = "",
    currency: str = "USD",
) -> StatementLine:
    return StatementLine(
        amount_minor=amount,
        currency=currency,
        sign=sign,
        status=EntryStatus.BOOKED,
        booking_date=day,
        value_date=day,
        account_servicer_ref=bank_ref,
        bank_transaction_code="PMNT/RCDT/ESCT",
        details=(
            TransactionDetail(
                references=References(end_to_end_id=e2e, instruction_id=instr),
                amount_minor=amount,
                currency=currency,
                sign=sign,
                creditor_reference=remittance,
                return_reason=return_reason,
            ),
        )
        if (e2e or instr or remittance or return_reason)
        else (),
    )


def batch(
    members: list[tuple[str, int]], *, total: int | None = None, sign: Sign = Sign.DEBIT
) -> StatementLine:
    amount = sum(a for _, a in members) if total is None else total
    return StatementLine(
        amount_minor=amount,
        currency="USD",
        sign=sign,
        status=EntryStatus.BOOKED,
        booking_date=DAY,
        value_date=DAY,
        bank_transaction_code="PMNT/ICDT/ESCT",
        batch=Batch(
            number_of_transactions=len(members),
            total_minor=amount,
            currency="USD",
            sign=sign,
            payment_info_id="PMTINF-1",
        ),
        details=tuple(
            TransactionDetail(
                references=References(end_to_end_id=e2e, payment_info_id="PMTINF-1"),
                amount_minor=a,
                currency="USD",
                sign=sign,
            )
            for e2e, a in members
        ),
    )


def statement(
    lines: list[StatementLine],
    *,
    kind: StatementKind = StatementKind.STATEMENT,
    opening: int = 0,
    closing: int | None = None,
    day: dt.date = DAY,
    currency: str = "USD",
) -> Statement:
    net = sum(x.signed_minor for x in lines)
    close = opening + net if closing is None else closing
    balances = (
        Balance("OPBD", abs(opening), currency, Sign.CREDIT if opening >= 0 else Sign.DEBIT, day),
        Balance("CLBD", abs(close), currency, Sign.CREDIT if close >= 0 else Sign.DEBIT, day),
    )
    return Statement(
        kind=kind,
        statement_id=f"STMT-{next(_ids)}",
        account=Account(iban=IBAN, currency=currency),
        lines=tuple(lines),
        balances=() if kind is StatementKind.NOTIFICATION else balances,
        created_at=dt.datetime.combine(day, dt.time(18), UTC),
    )


def camt053(*statements: Statement) -> bytes:
    return write_camt053(
        list(statements),
        message_id=f"MSG-{next(_ids)}",
        created_at=dt.datetime(2026, 12, 4, 18, tzinfo=UTC),
    )


def camt052(*lines: StatementLine) -> bytes:
    return write_camt052(
        [statement(list(lines), kind=StatementKind.REPORT)],
        message_id=f"MSG-{next(_ids)}",
        created_at=dt.datetime(2026, 12, 4, 12, tzinfo=UTC),
    )


def camt054(*lines: StatementLine) -> bytes:
    return write_camt054(
        [statement(list(lines), kind=StatementKind.NOTIFICATION)],
        message_id=f"MSG-{next(_ids)}",
        created_at=dt.datetime(2026, 12, 4, 12, tzinfo=UTC),
    )


def mt940(st: Statement) -> bytes:
    return write_mt940([st])


def expected(
    expected_id: str,
    amount: int,
    *,
    e2e: str = "",
    instr: str = "",
    remittance: str = "",
    bank_ref: str = "",
    batch_id: str = "",
    direction: Direction = Direction.CREDIT,
    date_from: str = "2026-12-03",
    date_to: str = "2026-12-04",
    low: int = 0,
    high: int = 0,
    account: str = "bank",
) -> ExpectedPayment:
    return ExpectedPayment(
        tenant_id="",
        expected_id=expected_id,
        ledger_account_id=account,
        direction=direction,
        currency="USD",
        amount_minor=amount,
        amount_min_minor=low,
        amount_max_minor=high,
        date_from=date_from,
        date_to=date_to,
        end_to_end_id=e2e,
        instruction_id=instr,
        remittance_reference=remittance,
        bank_reference=bank_ref,
        batch_id=batch_id,
    )
