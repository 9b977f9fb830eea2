"""camt.052/053/054: reading every supported version, refusing hostile and
malformed files whole, fingerprints, and the sandbox bank's writers."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from formats_samples import (
    IBAN_DE,
    IBAN_FR,
    ROOTS,
    UTC,
    assert_schema_valid,
    batch_line,
    camt_doc,
    camt_entry,
    refused,
    sample_line,
    sample_statement,
)

from money_plane.formats import _xml
from money_plane.formats.camt import (
    READ_VERSIONS,
    read_camt,
    write_camt052,
    write_camt053,
    write_camt054,
)
from money_plane.formats.statement import (
    EntryStatus,
    Sign,
    Statement,
    StatementKind,
    StatementLine,
)

MESSAGES = ("camt.052", "camt.053", "camt.054")
CREATED = dt.datetime(2026, 12, 4, 18, 0, 5, tzinfo=UTC)


def test_shipped_schemas_cover_the_read_versions() -> None:
    names = set(_xml.available_schemas())
    for msg in MESSAGES:
        for ver in READ_VERSIONS:
            assert f"{msg}.001.{ver}" in names
    assert {"pacs.008.001.08", "pain.001.001.09"} <= names


@pytest.mark.parametrize("ver", READ_VERSIONS)
@pytest.mark.parametrize("msg", MESSAGES)
def test_reads_every_version(msg: str, ver: str) -> None:
    data = camt_doc(msg, ver)
    assert_schema_valid(data, f"{msg}.001.{ver}")  # the sample itself is valid
    parsed = read_camt(data)
    assert parsed.message_name == f"{msg}.001.{ver}"
    assert parsed.kind is StatementKind(msg)
    assert parsed.message_id == f"MSG-{msg}-{ver}"
    (stmt,) = parsed.statements
    assert stmt.statement_id == "STMT-0"
    assert stmt.electronic_sequence == 1
    assert stmt.account.iban == IBAN_DE
    assert stmt.account.servicer_bic == "COBADEFFXXX"
    if msg == "camt.054":
        assert stmt.balances == ()
    else:
        assert stmt.opening_booked is not None and stmt.opening_booked.amount_minor == 10_000
        assert stmt.closing_booked is not None and stmt.closing_booked.amount_minor == 11_000
        assert stmt.closing_booked.date == dt.date(2026, 12, 4)
    (line,) = stmt.lines
    assert (line.amount_minor, line.currency, line.sign) == (1000, "EUR", Sign.CREDIT)
    assert line.status is EntryStatus.BOOKED
    assert line.booking_date == line.value_date == dt.date(2026, 12, 4)
    assert line.account_servicer_ref == "BANK-E2E-1"
    assert line.bank_transaction_code == "PMNT/RCDT/ESCT"
    (detail,) = line.details
    refs = detail.references
    assert (refs.end_to_end_id, refs.instruction_id, refs.transaction_id, refs.message_id) == (
        "E2E-1",
        "I-1",
        "TX-1",
        "MSG-1",
    )
    assert detail.amount_minor == 1000
    assert detail.remittance == ("Invoice 42",)
    assert detail.counterparty_name == "ACME LTD"
    assert detail.counterparty_account == IBAN_FR
    top, stmt_name = ROOTS[msg]
    assert line.source_path == f"Document/{top}/{stmt_name}/Ntry"


@pytest.mark.parametrize(
    ("writer", "kind"),
    [
        (write_camt052, StatementKind.REPORT),
        (write_camt053, StatementKind.STATEMENT),
        (write_camt054, StatementKind.NOTIFICATION),
    ],
)
def test_writers_are_schema_valid_and_round_trip(writer: object, kind: StatementKind) -> None:
    stmt = sample_statement(kind)
    data = writer([stmt], message_id="SBX-MSG-1", created_at=CREATED)  # type: ignore[operator]
    assert_schema_valid(data, f"{kind.value}.001.08")
    parsed = read_camt(data)
    assert parsed.kind is kind and parsed.message_id == "SBX-MSG-1"
    (back,) = parsed.statements
    assert _plain(back.lines) == stmt.lines
    assert back.balances == stmt.balances
    assert (back.statement_id, back.electronic_sequence, back.legal_sequence) == (
        stmt.statement_id,
        338,
        338,
    )
    assert (back.created_at, back.from_date, back.to_date) == (
        stmt.created_at,
        stmt.from_date,
        stmt.to_date,
    )
    assert back.account == stmt.account


def _plain(lines: tuple[StatementLine, ...]) -> tuple[StatementLine, ...]:
    return tuple(dataclasses.replace(line, source_path="", fingerprint="") for line in lines)


def test_batch_booking_details() -> None:
    data = write_camt053([sample_statement()], message_id="M", created_at=CREATED)
    line = read_camt(data).statements[0].lines[1]
    assert line.source_path == "Document/BkToCstmrStmt/Stmt/Ntry[2]"
    assert line.batch is not None
    assert line.batch.number_of_transactions == 3
    assert line.batch.total_minor == 6000
    assert line.batch.payment_info_id == "PMTINF-7"
    assert line.end_to_end_ids == ("PAYOUT-1", "PAYOUT-2", "PAYOUT-3")
    assert line.return_reason == "AC04"
    assert line.details[0].creditor_reference == "RF18539007547034"
    assert line.signed_minor == -6000


def test_written_notification_carries_no_balances() -> None:
    stmt = dataclasses.replace(sample_statement(StatementKind.NOTIFICATION))
    with_balances = dataclasses.replace(stmt, balances=sample_statement().balances)
    with refused("FIELD_NOT_ALLOWED", "balances"):
        write_camt054([with_balances], message_id="M", created_at=CREATED)


def test_statement_without_balances_refused_by_schema() -> None:
    stmt = dataclasses.replace(sample_statement(), balances=())
    with refused("SCHEMA_INVALID"):
        write_camt053([stmt], message_id="M", created_at=CREATED)


# ------------------------------------------------------------------ hostile files

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE Document [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<Document xmlns="urn:iso:std:iso:20022:tech:xsd:camt.053.001.08"><BkToCstmrStmt>
<GrpHdr><MsgId>&lol4;</MsgId></GrpHdr></BkToCstmrStmt></Document>"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE Document [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<Document xmlns="urn:iso:std:iso:20022:tech:xsd:camt.053.001.08"><BkToCstmrStmt>
<GrpHdr><MsgId>&xxe;</MsgId></GrpHdr></BkToCstmrStmt></Document>"""


def test_entity_expansion_refused() -> None:
    with refused("DTD_FORBIDDEN", "DOCTYPE"):
        read_camt(BILLION_LAUGHS)


def test_external_entity_refused() -> None:
    with refused("DTD_FORBIDDEN", "DOCTYPE"):
        read_camt(XXE)


def test_doctype_hidden_past_a_comment_refused_by_the_parser_check() -> None:
    data = b"<?xml version='1.0'?>" + b"<!-- " + b"x" * 70_000 + b" -->" + XXE.split(b"?>", 1)[1]
    with refused("DTD_FORBIDDEN", "DOCTYPE"):
        read_camt(data)


def test_truncated_file_refused_naming_the_line() -> None:
    data = camt_doc("camt.053", "08")
    cut = data[: len(data) // 2]
    with refused("FILE_UNREADABLE") as r:
        read_camt(cut)
    assert r.error is not None and r.error.field.startswith("line ")


def test_empty_and_oversized_files_refused() -> None:
    with refused("FILE_UNREADABLE", "line 1"):
        read_camt(b"   ")
    with refused("FILE_TOO_LARGE", "file"):
        read_camt(camt_doc("camt.053", "08"), max_bytes=100)


def test_wrong_namespace_refused() -> None:
    data = camt_doc("camt.053", "08").replace(b"camt.053.001.08", b"pain.001.001.09")
    with refused("NAMESPACE_UNSUPPORTED", "Document/@xmlns"):
        read_camt(data)
    no_ns = camt_doc("camt.053", "08").replace(
        b' xmlns="urn:iso:std:iso:20022:tech:xsd:camt.053.001.08"', b""
    )
    with refused("NAMESPACE_UNSUPPORTED", "Document/@xmlns"):
        read_camt(no_ns)


def test_unsupported_version_refused() -> None:
    data = camt_doc("camt.053", "08").replace(b"camt.053.001.08", b"camt.053.001.09")
    with refused("MESSAGE_VERSION_UNSUPPORTED", "Document/@xmlns"):
        read_camt(data)


def test_wrong_schema_for_its_namespace_refused_naming_the_element() -> None:
    # A camt.053.001.08 body under the .001.02 namespace (Sts/Cd is not .02).
    data = camt_doc("camt.053", "08").replace(b"camt.053.001.08", b"camt.053.001.02")
    with refused("SCHEMA_INVALID") as r:
        read_camt(data)
    assert r.error is not None
    assert r.error.field.startswith("Document/BkToCstmrStmt/Stmt")


def test_non_numeric_amount_refused_naming_the_element() -> None:
    entries = camt_entry("08") + camt_entry("08", amount="12,50", e2e="E2E-2")
    with refused("SCHEMA_INVALID") as r:
        read_camt(camt_doc("camt.053", "08", entries))
    assert r.error is not None
    assert "Ntry[2]/Amt" in r.error.field
    assert r.error.metadata["line"].isdigit()


def test_mixed_currencies_refused() -> None:
    entries = camt_entry("08") + camt_entry("08", ccy="USD", e2e="E2E-2")
    with refused("CURRENCY_MIXED") as r:
        read_camt(camt_doc("camt.053", "08", entries))
    assert r.error is not None
    assert r.error.field == "Document/BkToCstmrStmt/Stmt/Ntry[2]/Amt"
    with refused("CURRENCY_MIXED", "Document/BkToCstmrStmt/Stmt/Bal[1]/Amt"):
        read_camt(camt_doc("camt.053", "08", balance_ccy="USD"))


def test_amount_precision_beyond_the_currency_refused() -> None:
    entries = camt_entry("08", amount="100.5", ccy="JPY")
    data = camt_doc("camt.054", "08", entries, acct_ccy="JPY")
    with refused("AMOUNT_PRECISION_INVALID") as r:
        read_camt(data)
    assert r.error is not None and r.error.field.endswith("Ntry/Amt")


def test_all_or_nothing_across_statements() -> None:
    good = camt_doc("camt.053", "08", statements=2)
    assert len(read_camt(good).statements) == 2
    # break only the second statement's entry
    head, sep, tail = good.decode().rpartition('<Amt Ccy="EUR">10.00</Amt><CdtDbtInd>CRDT')
    bad = (head + '<Amt Ccy="EUR">ten</Amt><CdtDbtInd>CRDT' + tail).encode()
    assert sep
    with refused("SCHEMA_INVALID") as r:
        read_camt(bad)
    assert r.error is not None and "Stmt[2]" in r.error.field


# ------------------------------------------------------------------ fingerprints


def test_same_file_same_fingerprints() -> None:
    data = write_camt053([sample_statement()], message_id="M", created_at=CREATED)
    a, b = read_camt(data), read_camt(data)
    assert a.file_sha256 == b.file_sha256 and a.fingerprint == b.fingerprint
    assert [x.fingerprint for x in a.lines] == [x.fingerprint for x in b.lines]
    assert len(a.fingerprint) == 64


def test_content_fingerprint_ignores_formatting() -> None:
    data = write_camt053([sample_statement()], message_id="M", created_at=CREATED)
    compact = b"".join(line.strip() for line in data.splitlines())
    a, b = read_camt(data), read_camt(compact)
    assert a.file_sha256 != b.file_sha256
    assert a.fingerprint == b.fingerprint


def test_different_content_different_fingerprint() -> None:
    one = read_camt(write_camt053([sample_statement()], message_id="M", created_at=CREATED))
    other_stmt = sample_statement(lines=(sample_line(amount=12_346), batch_line()))
    two = read_camt(write_camt053([other_stmt], message_id="M", created_at=CREATED))
    assert one.fingerprint != two.fingerprint
    assert one.lines[0].fingerprint != two.lines[0].fingerprint
    assert one.lines[1].fingerprint == two.lines[1].fingerprint


def test_a_booking_made_twice_has_two_fingerprints() -> None:
    twice = sample_statement(lines=(sample_line(), sample_line()))
    parsed = read_camt(write_camt053([twice], message_id="M", created_at=CREATED))
    first, second = parsed.lines
    assert _plain((first,)) == _plain((second,))
    assert first.fingerprint != second.fingerprint


def test_intraday_and_end_of_day_report_the_same_booking_alike() -> None:
    line = sample_line()
    report = read_camt(
        write_camt052(
            [sample_statement(StatementKind.REPORT, (line,))], message_id="R", created_at=CREATED
        )
    )
    stmt = read_camt(
        write_camt053(
            [sample_statement(StatementKind.STATEMENT, (line,))],
            message_id="S",
            created_at=CREATED,
        )
    )
    assert report.lines[0].fingerprint == stmt.lines[0].fingerprint
    assert report.fingerprint != stmt.fingerprint


def test_statement_helpers() -> None:
    stmt: Statement = read_camt(
        write_camt053([sample_statement()], message_id="M", created_at=CREATED)
    ).statements[0]
    assert stmt.account.id == IBAN_DE
    assert stmt.balance("XXXX") is None
    assert stmt.closing_booked is not None
    assert stmt.opening_booked is not None
    net = sum(line.signed_minor for line in stmt.lines)
    assert stmt.closing_booked.signed_minor - stmt.opening_booked.signed_minor == net
    assert stmt.booked_movement_minor == net
    assert stmt.balances_agree() is True


def test_balances_that_do_not_add_up_are_read_and_reported() -> None:
    stmt = sample_statement()
    wrong = dataclasses.replace(
        stmt, balances=(stmt.balances[0], dataclasses.replace(stmt.balances[1], amount_minor=1))
    )
    parsed = read_camt(write_camt053([wrong], message_id="M", created_at=CREATED)).statements[0]
    assert parsed.balances_agree() is False
    pending = dataclasses.replace(sample_line("PENDING-1"), status=EntryStatus.PENDING)
    with_pending = sample_statement(lines=(sample_line(), pending))
    # the sample's closing balance counts every line; a pending one must not count
    assert with_pending.balances_agree() is False
    assert with_pending.booked_movement_minor == sample_line().signed_minor
    notification = sample_statement(StatementKind.NOTIFICATION)
    assert notification.balances_agree() is None
