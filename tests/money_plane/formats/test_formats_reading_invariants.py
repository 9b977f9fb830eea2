"""What faster reading must not change: a line's fingerprint (the key an
import de-duplicates bookings by, stored in every ledger's recon tables) and
which element a path of local names finds."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from money_plane.formats import _xml
from money_plane.formats.statement import (
    Account,
    Batch,
    EntryStatus,
    References,
    Sign,
    Statement,
    StatementKind,
    StatementLine,
    TransactionDetail,
    fingerprint_statement,
)
from triplane.runtime.errors import InvalidArgument


def test_line_fingerprints_are_pinned() -> None:
    """Computed by the release that first stored them; a change here means
    every stored line would be imported again as a new booking."""
    line = StatementLine(
        amount_minor=123456,
        currency="EUR",
        sign=Sign.DEBIT,
        status=EntryStatus.BOOKED,
        booking_date=dt.date(2026, 12, 4),
        value_date=dt.date(2026, 12, 5),
        account_servicer_ref="BK-1",
        bank_transaction_code="PMNT/ICDT/ESCT",
        batch=Batch(
            number_of_transactions=2,
            total_minor=123456,
            currency="EUR",
            sign=Sign.DEBIT,
            payment_info_id="PMTINF-9",
        ),
        details=(
            TransactionDetail(
                references=References(end_to_end_id="E2E-1", payment_info_id="PMTINF-9"),
                amount_minor=100000,
                currency="EUR",
                sign=Sign.DEBIT,
                creditor_reference="RF18539007547034",
            ),
            TransactionDetail(
                references=References(end_to_end_id="E2E-2"),
                amount_minor=23456,
                currency="EUR",
                sign=Sign.DEBIT,
                remittance=("invoice 7",),
            ),
        ),
        source_path="/Document/x/Ntry[3]",
    )
    elsewhere = dataclasses.replace(line, source_path="line 9")
    statement = Statement(
        kind=StatementKind.STATEMENT,
        statement_id="STMT-1",
        account=Account(iban="DE89370400440532013000", currency="EUR"),
        lines=(line, elsewhere),
        created_at=dt.datetime(2026, 12, 4, 18, tzinfo=dt.UTC),
    )
    first, second = fingerprint_statement(statement).lines
    # Where a line sits is not its content: the same booking twice is the
    # same content, told apart by its occurrence number alone.
    assert first.fingerprint == ("064f584d3a2df490127e00b517938ad899bbd2c6b2656385dee3211b5c748520")
    assert second.fingerprint == (
        "c3686379fa2b261ad3def5fc5bf50142cc6ff53987d856d843a9de572e322e32"
    )
    assert first.source_path == "/Document/x/Ntry[3]" and second.source_path == "line 9"


DOC = b"""<?xml version="1.0"?>
<Document xmlns="urn:iso:std:iso:20022:tech:xsd:camt.053.001.08">
  <Ntry><Amt Ccy="EUR">1</Amt></Ntry>
  <Ntry><NtryDtls><TxDtls><Refs><EndToEndId>A</EndToEndId></Refs></TxDtls></NtryDtls></Ntry>
  <Ntry><NtryDtls><TxDtls><Refs><EndToEndId>B</EndToEndId></Refs></TxDtls></NtryDtls></Ntry>
  <x:Other xmlns:x="urn:other"><x:Deep>other namespace</x:Deep></x:Other>
  <Plain xmlns=""><Deep>no namespace</Deep></Plain>
</Document>"""


def test_a_path_finds_the_first_match_in_document_order_in_any_namespace() -> None:
    root = _xml.parse_xml(DOC)
    # The first Ntry has no NtryDtls: the path goes on to the next one, as
    # ElementPath's find does.
    assert _xml.text(root, "Ntry", "NtryDtls", "TxDtls", "Refs", "EndToEndId") == "A"
    assert _xml.text(root, "Ntry", "Amt") == "1"
    assert _xml.text(root, "Other", "Deep") == "other namespace"
    assert _xml.text(root, "Plain", "Deep") == "no namespace"
    assert _xml.child(root, "Ntry", "Missing") is None
    assert _xml.child(None, "Ntry") is None
    assert _xml.text(root, "Missing") == ""
    for path in (("Ntry",), ("Ntry", "NtryDtls", "TxDtls"), ("Other", "Deep")):
        assert _xml.child(root, *path) is root.find("/".join(f"{{*}}{n}" for n in path))
    with pytest.raises(TypeError):
        _xml.child(root)


def test_children_by_name_answer_as_the_one_name_paths_do() -> None:
    root = _xml.parse_xml(DOC)
    entry = _xml.Children(root)
    for name in ("Ntry", "Other", "Plain", "Missing"):
        assert entry.child(name) is _xml.child(root, name)
        assert entry.text(name) == _xml.text(root, name)
    assert entry.required("Ntry") is _xml.child(root, "Ntry")
    assert _xml.Children(root.find("{*}Ntry")).text("Amt") == "1"
    assert _xml.Children(None).child("Ntry") is None and _xml.Children(None).text("Ntry") == ""
    with pytest.raises(InvalidArgument) as refused:
        entry.required("Missing")
    assert refused.value.reason == "ELEMENT_REQUIRED"
    assert refused.value.field == "Document/Missing"
