"""MT940: a hand-written sample read field by field, refusals naming the line,
and write -> read giving the same lines."""

from __future__ import annotations

import dataclasses
import datetime as dt

from formats_samples import IBAN_DE, IBAN_FR, refused, sample_line, sample_statement

from money_plane.formats.mt940 import read_mt940, swift_text, write_mt940
from money_plane.formats.statement import (
    Batch,
    EntryStatus,
    References,
    Sign,
    StatementKind,
    StatementLine,
    TransactionDetail,
)

SAMPLE = """{1:F01SANDBOXXXXXX0000000000}{2:O9401200261204SANDBOXXXXXX00000000002612041200N}{4:
:20:STMT-338
:25:DE89370400440532013000
:28C:338/1
:60F:C261203EUR10000,00
:61:2612041204C1234,56NTRFPAYOUT-000042//BK-123
SEPA CT IN
:86:/EREF/PAYOUT-2026-12-04-000042/NAME/ACME LTD/IBAN/FR1420041010050
500013M02606/REMI/Invoice 42
:61:2612041204RC50,00NRTINONREF//BK-124
:86:/EREF/PAYOUT-7/RTRN/AC04/PREF/PMTINF-7
:61:2701021231D100,NMSCNONREF
:86:Card settlement
December week 1
:62F:C261204EUR11084,56
:64:C261204EUR11084,56
-}
{1:F01SANDBOXXXXXX0000000000}{2:O9401200261205SANDBOXXXXXX00000000002612051200N}{4:
:20:STMT-339
:25:12345678/0099
:28C:339
:60F:C261204JPY5000,
:62F:C261205JPY5000,
-}
"""


def test_reads_the_sample_field_by_field() -> None:
    parsed = read_mt940(SAMPLE.encode())
    assert parsed.kind is StatementKind.MT940 and parsed.message_name == "mt940"
    first, second = parsed.statements
    assert first.statement_id == "STMT-338"
    assert first.account.iban == IBAN_DE and first.account.currency == "EUR"
    assert (first.page, first.electronic_sequence) == ("338/1", 338)
    assert first.opening_booked is not None and first.opening_booked.amount_minor == 1_000_000
    assert first.opening_booked.date == dt.date(2026, 12, 3)
    assert first.closing_booked is not None and first.closing_booked.amount_minor == 1_108_456
    assert first.balance("CLAV") is not None
    credit, reversal, card = first.lines
    assert (credit.amount_minor, credit.sign, credit.status) == (
        123_456,
        Sign.CREDIT,
        EntryStatus.BOOKED,
    )
    assert credit.value_date == credit.booking_date == dt.date(2026, 12, 4)
    assert credit.bank_transaction_code == "NTRF"
    assert credit.account_servicer_ref == "BK-123"
    assert credit.additional_info == "SEPA CT IN"
    (detail,) = credit.details
    # EREF in :86: is the full reference; :61: only has room for 16 characters
    assert detail.references.end_to_end_id == "PAYOUT-2026-12-04-000042"
    assert detail.counterparty_name == "ACME LTD"
    assert detail.counterparty_account == IBAN_FR
    assert detail.remittance == ("Invoice 42",)
    assert credit.source_path == "line 6"
    # RC: the reversal of a credit is a debit
    assert (reversal.sign, reversal.reversal, reversal.amount_minor) == (Sign.DEBIT, True, 5000)
    assert reversal.return_reason == "AC04"
    assert reversal.batch == Batch(payment_info_id="PMTINF-7")
    # entry date 31 Dec for a value date 2 Jan: booked the year before
    assert card.value_date == dt.date(2027, 1, 2)
    assert card.booking_date == dt.date(2026, 12, 31)
    assert card.details[0].remittance == ("Card settlement", "December week 1")
    assert card.details[0].references.end_to_end_id == ""
    assert second.account.other_id == "12345678/0099" and second.account.iban == ""
    assert second.account.currency == "JPY"
    assert second.opening_booked is not None and second.opening_booked.amount_minor == 5000
    assert second.lines == ()


def test_fingerprints_are_stable() -> None:
    a, b = read_mt940(SAMPLE.encode()), read_mt940(SAMPLE.encode())
    assert a.fingerprint == b.fingerprint and a.file_sha256 == b.file_sha256
    crlf = read_mt940(SAMPLE.replace("\n", "\r\n").encode())
    assert crlf.fingerprint == a.fingerprint and crlf.file_sha256 != a.file_sha256


def _without(text: str, needle: str) -> bytes:
    return "\n".join(x for x in text.split("\n") if not x.startswith(needle)).encode()


def test_refusals_name_the_line() -> None:
    with refused("FIELD_INVALID", "line 6"):
        read_mt940(SAMPLE.replace(":61:2612041204C1234,56", ":61:2612041204C12X4,56").encode())
    with refused("DATE_INVALID", "line 5"):
        read_mt940(SAMPLE.replace(":60F:C261203", ":60F:C261303").encode())
    with refused("CURRENCY_MIXED", "line 15"):
        read_mt940(SAMPLE.replace(":62F:C261204EUR", ":62F:C261204USD").encode())
    with refused("TAG_UNEXPECTED", "line 3"):
        read_mt940(_without(SAMPLE, ":25:"))
    with refused("LINE_INVALID", "line 1"):
        read_mt940(b"hello\n" + SAMPLE.split("{4:\n", 1)[1].encode())
    with refused("AMOUNT_PRECISION_INVALID", "line 22"):
        read_mt940(SAMPLE.replace(":60F:C261204JPY5000,", ":60F:C261204JPY5000,5").encode())
    with refused("FILE_UNREADABLE", "line 1"):
        read_mt940(b"\n\n")
    with refused("FILE_TOO_LARGE", "file"):
        read_mt940(SAMPLE.encode(), max_bytes=10)


def test_truncated_statement_refused() -> None:
    cut = SAMPLE.split(":62F:")[0].encode()
    with refused("FILE_TRUNCATED") as r:
        read_mt940(cut)
    assert r.error is not None and r.error.field.startswith("line ")


def test_all_or_nothing() -> None:
    # the second statement is broken: nothing of the first comes back either
    with refused("FIELD_INVALID", "line 22"):
        read_mt940(SAMPLE.replace(":60F:C261204JPY5000,", ":60F:X261204JPY5000,").encode())


def _mt940_line(line: StatementLine) -> StatementLine:
    """What MT940 can carry of a line (one detail, no per-detail amount)."""
    d = line.details[0]
    return dataclasses.replace(
        line,
        bank_transaction_code="NTRF",
        details=(
            TransactionDetail(
                references=References(end_to_end_id=d.references.end_to_end_id),
                remittance=d.remittance,
                counterparty_name=d.counterparty_name,
                counterparty_account=d.counterparty_account,
                return_reason=d.return_reason,
                creditor_reference=d.creditor_reference,
            ),
        ),
    )


def test_write_then_read_gives_the_same_lines() -> None:
    lines = (
        _mt940_line(sample_line("PAYOUT-2026-12-04-000042")),
        _mt940_line(sample_line("E2E-2", 700, sign=Sign.DEBIT)),
        dataclasses.replace(
            _mt940_line(sample_line("E2E-3", 900)),
            reversal=True,
            sign=Sign.DEBIT,
            batch=Batch(payment_info_id="PMTINF-9"),
            additional_info="RETURN",
        ),
        dataclasses.replace(
            _mt940_line(sample_line("E2E-4", 5)),
            details=(TransactionDetail(creditor_reference="RF18539007547034"),),
        ),
    )
    stmt = dataclasses.replace(sample_statement(StatementKind.MT940, lines), page="338/1")
    data = write_mt940([stmt, stmt])
    assert all(len(x) <= 65 + 4 for x in data.decode().split("\r\n"))
    parsed = read_mt940(data)
    assert len(parsed.statements) == 2
    back = parsed.statements[0]
    plain = tuple(dataclasses.replace(x, source_path="", fingerprint="") for x in back.lines)
    assert plain == lines
    assert back.balances == stmt.balances
    assert back.statement_id == stmt.statement_id and back.page == "338/1"


def test_writer_refusals() -> None:
    stmt = sample_statement(StatementKind.MT940)  # its second line is a batch of 3
    with refused("FIELD_NOT_ALLOWED", "statements[0].lines[1].details"):
        write_mt940([stmt])
    one = sample_statement(StatementKind.MT940, (_mt940_line(sample_line("PAYOUT_1")),))
    with refused("CHARSET_INVALID", "statements[0].lines[0].details[0].references.end_to_end_id"):
        write_mt940([one])
    no_balances = dataclasses.replace(
        sample_statement(StatementKind.MT940, (_mt940_line(sample_line()),)), balances=()
    )
    with refused("FIELD_REQUIRED", "statements[0].balances"):
        write_mt940([no_balances])


def test_swift_text() -> None:
    assert swift_text("Müller & Co. #1") == "Muller   Co.  1"
