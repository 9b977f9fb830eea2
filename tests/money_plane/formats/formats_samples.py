"""Sample bank documents for the bank-format tests, made in code (no bank data):
camt documents of any supported version, statements, and an independent
schema check (the official XSD loaded straight from the package folder, not
through the code under test)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from lxml import etree

import money_plane.formats
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
from triplane.runtime.errors import InvalidArgument

XSD_DIR = Path(money_plane.formats.__file__).parent / "xsd"
UTC = dt.UTC
IBAN_DE = "DE89370400440532013000"
IBAN_FR = "FR1420041010050500013M02606"
ROOTS = {
    "camt.052": ("BkToCstmrAcctRpt", "Rpt"),
    "camt.053": ("BkToCstmrStmt", "Stmt"),
    "camt.054": ("BkToCstmrDbtCdtNtfctn", "Ntfctn"),
}


def assert_schema_valid(data: bytes, message: str) -> etree._Element:
    """Independent XSD validation with lxml, from the shipped schema file."""
    schema = etree.XMLSchema(etree.parse(str(XSD_DIR / f"{message}.xsd")))
    doc = etree.fromstring(data)
    assert schema.validate(doc), schema.error_log
    return doc


class refused:
    """Expects an InvalidArgument with this reason (and field, when given);
    `.error` holds it afterwards."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        self.reason, self.field = reason, field
        self.error: InvalidArgument | None = None

    def __enter__(self) -> refused:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> bool:
        assert exc is not None, f"expected a refusal {self.reason}, nothing was raised"
        assert isinstance(exc, InvalidArgument), repr(exc)
        assert exc.reason == self.reason, (exc.reason, exc.message, exc.field)
        if self.field is not None:
            assert exc.field == self.field, (exc.field, exc.message)
        self.error = exc
        return True


def camt_entry(ver: str, *, amount: str = "10.00", ccy: str = "EUR", e2e: str = "E2E-1") -> str:
    old = int(ver) < 7
    sts = "<Sts>BOOK</Sts>" if old else "<Sts><Cd>BOOK</Cd></Sts>"
    tx_amount = (
        f'<AmtDtls><TxAmt><Amt Ccy="{ccy}">{amount}</Amt></TxAmt></AmtDtls>'
        if ver == "02"
        else f'<Amt Ccy="{ccy}">{amount}</Amt><CdtDbtInd>CRDT</CdtDbtInd>'
    )
    debtor = (
        "<Dbtr><Nm>ACME LTD</Nm></Dbtr>" if old else "<Dbtr><Pty><Nm>ACME LTD</Nm></Pty></Dbtr>"
    )
    return f"""
      <Ntry>
        <Amt Ccy="{ccy}">{amount}</Amt><CdtDbtInd>CRDT</CdtDbtInd>{sts}
        <BookgDt><Dt>2026-12-04</Dt></BookgDt><ValDt><Dt>2026-12-04</Dt></ValDt>
        <AcctSvcrRef>BANK-{e2e}</AcctSvcrRef>
        <BkTxCd><Domn><Cd>PMNT</Cd><Fmly><Cd>RCDT</Cd><SubFmlyCd>ESCT</SubFmlyCd></Fmly></Domn></BkTxCd>
        <NtryDtls><TxDtls>
          <Refs><MsgId>MSG-1</MsgId><InstrId>I-1</InstrId><EndToEndId>{e2e}</EndToEndId><TxId>TX-1</TxId></Refs>
          {tx_amount}
          <RltdPties>{debtor}<DbtrAcct><Id><IBAN>{IBAN_FR}</IBAN></Id></DbtrAcct></RltdPties>
          <RmtInf><Ustrd>Invoice 42</Ustrd></RmtInf>
        </TxDtls></NtryDtls>
      </Ntry>"""


def camt_doc(
    msg: str,
    ver: str,
    entries: str | None = None,
    *,
    balance_ccy: str = "EUR",
    acct_ccy: str = "EUR",
    statements: int = 1,
) -> bytes:
    """A minimal valid camt document of `msg` ("camt.053") version `ver` ("02")."""
    top, stmt = ROOTS[msg]
    entries = camt_entry(ver) if entries is None else entries
    bic = "BIC" if ver == "02" else "BICFI"
    balances = ""
    if msg != "camt.054":
        balances = "".join(
            f"""<Bal><Tp><CdOrPrtry><Cd>{code}</Cd></CdOrPrtry></Tp>
            <Amt Ccy="{balance_ccy}">{amt}</Amt><CdtDbtInd>CRDT</CdtDbtInd>
            <Dt><Dt>2026-12-04</Dt></Dt></Bal>"""
            for code, amt in (("OPBD", "100.00"), ("CLBD", "110.00"))
        )
    body = "".join(
        f"""<{stmt}><Id>STMT-{n}</Id><ElctrncSeqNb>{n + 1}</ElctrncSeqNb>
        <CreDtTm>2026-12-04T18:00:00+00:00</CreDtTm>
        <Acct><Id><IBAN>{IBAN_DE}</IBAN></Id><Ccy>{acct_ccy}</Ccy>
          <Svcr><FinInstnId><{bic}>COBADEFFXXX</{bic}></FinInstnId></Svcr></Acct>
        {balances}{entries}</{stmt}>"""
        for n in range(statements)
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Document xmlns="urn:iso:std:iso:20022:tech:xsd:{msg}.001.{ver}">
  <{top}><GrpHdr><MsgId>MSG-{msg}-{ver}</MsgId><CreDtTm>2026-12-04T18:00:00+00:00</CreDtTm></GrpHdr>
  {body}</{top}>
</Document>""".encode()


def sample_line(
    e2e: str = "PAYOUT-000042", amount: int = 12_345, *, sign: Sign = Sign.CREDIT
) -> StatementLine:
    return StatementLine(
        amount_minor=amount,
        currency="EUR",
        sign=sign,
        status=EntryStatus.BOOKED,
        booking_date=dt.date(2026, 12, 4),
        value_date=dt.date(2026, 12, 4),
        account_servicer_ref=f"BK-{e2e}"[:16],
        bank_transaction_code="PMNT/RCDT/ESCT",
        details=(
            TransactionDetail(
                references=References(
                    end_to_end_id=e2e, instruction_id="INSTR-1", transaction_id="TX-1"
                ),
                amount_minor=amount,
                currency="EUR",
                sign=sign,
                remittance=("Payout December",),
                counterparty_name="Jane Seller",
                counterparty_account=IBAN_FR,
            ),
        ),
    )


def batch_line() -> StatementLine:
    """One booking of three payouts (a batch booking), one of them returned."""
    details = tuple(
        TransactionDetail(
            references=References(end_to_end_id=f"PAYOUT-{i}", payment_info_id="PMTINF-7"),
            amount_minor=amount,
            currency="EUR",
            sign=Sign.DEBIT,
            creditor_reference="RF18539007547034" if i == 1 else "",
            return_reason="AC04" if i == 3 else "",
        )
        for i, amount in ((1, 1000), (2, 2000), (3, 3000))
    )
    return StatementLine(
        amount_minor=6000,
        currency="EUR",
        sign=Sign.DEBIT,
        status=EntryStatus.BOOKED,
        booking_date=dt.date(2026, 12, 4),
        value_date=dt.date(2026, 12, 5),
        account_servicer_ref="BK-BATCH-7",
        entry_ref="NTRY-7",
        bank_transaction_code="PMNT/ICDT/ESCT",
        batch=Batch(
            number_of_transactions=3,
            total_minor=6000,
            currency="EUR",
            sign=Sign.DEBIT,
            payment_info_id="PMTINF-7",
        ),
        details=details,
        additional_info="Batch booking",
    )


def sample_statement(
    kind: StatementKind = StatementKind.STATEMENT, lines: tuple[StatementLine, ...] = ()
) -> Statement:
    lines = lines or (sample_line(), batch_line())
    net = sum(line.signed_minor for line in lines)
    balances = (
        Balance("OPBD", 1_000_000, "EUR", Sign.CREDIT, dt.date(2026, 12, 4)),
        Balance("CLBD", 1_000_000 + net, "EUR", Sign.CREDIT, dt.date(2026, 12, 4)),
    )
    return Statement(
        kind=kind,
        statement_id="STMT-2026-12-04",
        account=Account(iban=IBAN_DE, currency="EUR", servicer_bic="COBADEFFXXX"),
        lines=lines,
        balances=() if kind is StatementKind.NOTIFICATION else balances,
        electronic_sequence=338,
        legal_sequence=338,
        created_at=dt.datetime(2026, 12, 4, 18, 0, tzinfo=UTC),
        from_date=dt.datetime(2026, 12, 4, 0, 0, tzinfo=UTC),
        to_date=dt.datetime(2026, 12, 4, 23, 59, 59, tzinfo=UTC),
    )
