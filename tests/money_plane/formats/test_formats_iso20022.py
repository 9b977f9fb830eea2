"""pacs.008 and pain.001 writers (schema-valid, fields where the rails read
them), pacs.002 status reports and pacs.004 returns read back."""

from __future__ import annotations

import datetime as dt

import pytest
from formats_samples import IBAN_DE, IBAN_FR, UTC, assert_schema_valid, refused
from lxml import etree

from money_plane.formats import _xml
from money_plane.formats.beneficiary import iban_account, us_bank_account
from money_plane.formats.iso20022_in import read_pacs002, read_pacs004
from money_plane.formats.iso20022_out import (
    PACS008,
    PAIN001,
    CreditTransfer,
    Party,
    sepa_text,
    write_pacs008,
    write_pain001,
)

CREATED = dt.datetime(2026, 12, 7, 9, 30, tzinfo=UTC)
DEBTOR_US = Party("Triplane Marketplace Inc", us_bank_account("091000019", "7777777777"))
DEBTOR_EU = Party("Triplane Europe GmbH", iban_account(IBAN_DE, "COBADEFFXXX"))
UETR = "8a562c67-ca16-48ba-b074-65581be6f011"


def us_transfer(n: int = 1, amount: int = 125_050, **kw: str) -> CreditTransfer:
    return CreditTransfer(
        end_to_end_id=f"PAYOUT-{n}",
        amount_minor=amount,
        currency="USD",
        creditor=Party("Jane Seller", us_bank_account("021000021", "123456789")),
        instruction_id=f"INSTR-{n}",
        transaction_id=f"TX-{n}",
        **kw,  # type: ignore[arg-type]
    )


def eu_transfer(n: int = 1, amount: int = 9_999, **kw: str) -> CreditTransfer:
    args: dict[str, str] = {"remittance": f"Payout {n}"}
    args.update(kw)
    return CreditTransfer(
        end_to_end_id=f"PAYOUT-{n}",
        amount_minor=amount,
        currency="EUR",
        creditor=Party("Jürgen Müller & Söhne", iban_account(IBAN_FR, "BNPAFRPPXXX")),
        **args,  # type: ignore[arg-type]
    )


def ns(message: str) -> dict[str, str]:
    return {"d": f"urn:iso:std:iso:20022:tech:xsd:{message}"}


def xp(doc: etree._Element, message: str, path: str) -> list[str]:
    found = doc.xpath(path, namespaces=ns(message))
    assert isinstance(found, list)
    return [str(x) for x in found]


# --------------------------------------------------------------------- pacs.008


def pacs008(transfers: list[CreditTransfer], **kw: object) -> bytes:
    args: dict[str, object] = {
        "message_id": "MSG-2026-12-07-1",
        "created_at": CREATED,
        "settlement_date": dt.date(2026, 12, 7),
        "debtor": DEBTOR_US,
        "clearing_system": "FDN",
        "instructing_agent": "091000019",
        "instructed_agent": "021000021",
    }
    args.update(kw)
    return write_pacs008(transfers, **args)  # type: ignore[arg-type]


def test_pacs008_schema_valid_with_fields() -> None:
    data = pacs008([us_transfer(1, uetr=UETR), us_transfer(2, amount=50)])
    doc = assert_schema_valid(data, PACS008)
    m = PACS008
    assert xp(doc, m, "//d:GrpHdr/d:NbOfTxs/text()") == ["2"]
    assert xp(doc, m, "//d:GrpHdr/d:TtlIntrBkSttlmAmt/text()") == ["1251.00"]
    assert xp(doc, m, "//d:GrpHdr/d:TtlIntrBkSttlmAmt/@Ccy") == ["USD"]
    assert xp(doc, m, "//d:SttlmInf/d:SttlmMtd/text()") == ["CLRG"]
    assert xp(doc, m, "//d:SttlmInf/d:ClrSys/d:Cd/text()") == ["FDN"]
    assert xp(doc, m, "//d:PmtId/d:EndToEndId/text()") == ["PAYOUT-1", "PAYOUT-2"]
    assert xp(doc, m, "//d:PmtId/d:UETR/text()") == [UETR]
    assert xp(doc, m, "//d:CdtTrfTxInf/d:IntrBkSttlmAmt/text()") == ["1250.50", "0.50"]
    assert xp(doc, m, "//d:CdtrAgt//d:ClrSysId/d:Cd/text()") == ["USABA", "USABA"]
    assert xp(doc, m, "//d:CdtrAgt//d:MmbId/text()") == ["021000021", "021000021"]
    assert xp(doc, m, "//d:DbtrAgt//d:MmbId/text()")[0] == "091000019"
    assert xp(doc, m, "//d:CdtrAcct/d:Id/d:Othr/d:Id/text()")[0] == "123456789"
    assert xp(doc, m, "//d:ChrgBr/text()") == ["SLEV", "SLEV"]
    assert xp(doc, m, "//d:GrpHdr/d:InstdAgt//d:MmbId/text()") == ["021000021"]


def test_pacs008_with_iban_parties_and_proprietary_clearing() -> None:
    transfer = CreditTransfer(
        "E2E-1",
        100,
        "EUR",
        Party("A", iban_account(IBAN_FR)),
        creditor_reference="RF18539007547034",
    )
    data = pacs008([transfer], debtor=DEBTOR_EU, clearing_system="RT1-EBA", instructing_agent="")
    doc = assert_schema_valid(data, PACS008)
    assert xp(doc, PACS008, "//d:ClrSys/d:Prtry/text()") == ["RT1-EBA"]
    assert xp(doc, PACS008, "//d:CdtrAgt//d:Othr/d:Id/text()") == ["NOTPROVIDED"]
    assert xp(doc, PACS008, "//d:DbtrAgt//d:BICFI/text()") == ["COBADEFFXXX"]
    assert xp(doc, PACS008, "//d:CdtrRefInf/d:Ref/text()") == ["RF18539007547034"]
    assert xp(doc, PACS008, "//d:CdtrRefInf/d:Tp/d:CdOrPrtry/d:Cd/text()") == ["SCOR"]


def test_pacs008_refusals_name_the_field() -> None:
    with refused("DUPLICATE_END_TO_END_ID", "transfers[1].end_to_end_id"):
        pacs008([us_transfer(1), us_transfer(1)])
    mixed = CreditTransfer("E2E-X", 1, "EUR", us_transfer().creditor)
    with refused("CURRENCY_MIXED", "transfers"):
        pacs008([us_transfer(1), mixed])
    with refused("FIELD_TOO_LONG", "transfers[0].end_to_end_id"):
        pacs008([CreditTransfer("E" * 36, 1, "USD", us_transfer().creditor)])
    with refused("UETR_INVALID", "transfers[0].uetr"):
        pacs008([us_transfer(1, uetr="not-a-uuid")])
    with refused("AMOUNT_INVALID", "transfers[0].amount_minor"):
        pacs008([us_transfer(1, amount=0)])
    with refused("CREDITOR_REFERENCE_INVALID", "transfers[0].creditor_reference"):
        pacs008([us_transfer(1, creditor_reference="RF00539007547034")])
    with refused("FIELD_NOT_ALLOWED", "transfers[0].creditor_reference"):
        pacs008([us_transfer(1, remittance="x", creditor_reference="RF18539007547034")])
    with refused("FIELD_REQUIRED", "transfers"):
        pacs008([])
    with refused("CURRENCY_INVALID", "transfers[0].currency"):
        pacs008([CreditTransfer("E", 1, "usd", us_transfer().creditor)])


def test_schema_validation_names_the_failing_element() -> None:
    doc = etree.fromstring(pacs008([us_transfer(1)]))
    for el in doc.iter("{*}EndToEndId"):
        el.getparent().remove(el)  # type: ignore[union-attr]
    with refused("SCHEMA_INVALID", "Document/FIToFICstmrCdtTrf/CdtTrfTxInf/PmtId/TxId") as r:
        _xml.validate(doc, PACS008)
    assert r.error is not None and "EndToEndId" in r.error.message


# --------------------------------------------------------------------- pain.001


def pain001(transfers: list[CreditTransfer], **kw: object) -> bytes:
    args: dict[str, object] = {
        "message_id": "MSG-1",
        "payment_info_id": "PMTINF-1",
        "created_at": CREATED,
        "execution_date": dt.date(2026, 12, 8),
        "debtor": DEBTOR_EU,
    }
    args.update(kw)
    return write_pain001(transfers, **args)  # type: ignore[arg-type]


def test_pain001_schema_valid_sepa() -> None:
    data = pain001([eu_transfer(1), eu_transfer(2, amount=1, remittance="")], batch_booking=True)
    doc = assert_schema_valid(data, PAIN001)
    m = PAIN001
    assert xp(doc, m, "//d:GrpHdr/d:NbOfTxs/text()") == ["2"]
    assert xp(doc, m, "//d:GrpHdr/d:CtrlSum/text()") == ["100.00"]
    assert xp(doc, m, "//d:PmtInf/d:CtrlSum/text()") == ["100.00"]
    assert xp(doc, m, "//d:PmtInf/d:PmtMtd/text()") == ["TRF"]
    assert xp(doc, m, "//d:PmtInf/d:BtchBookg/text()") == ["true"]
    assert xp(doc, m, "//d:PmtTpInf/d:SvcLvl/d:Cd/text()") == ["SEPA"]
    assert xp(doc, m, "//d:ReqdExctnDt/d:Dt/text()") == ["2026-12-08"]
    assert xp(doc, m, "//d:DbtrAcct/d:Id/d:IBAN/text()") == [IBAN_DE]
    assert xp(doc, m, "//d:CdtrAcct/d:Id/d:IBAN/text()") == [IBAN_FR, IBAN_FR]
    assert xp(doc, m, "//d:CdtrAgt//d:BICFI/text()") == ["BNPAFRPPXXX", "BNPAFRPPXXX"]
    assert xp(doc, m, "//d:InstdAmt/text()") == ["99.99", "0.01"]
    assert xp(doc, m, "//d:Cdtr/d:Nm/text()")[0] == "Jurgen Muller Sohne"  # SEPA charset
    assert xp(doc, m, "//d:RmtInf/d:Ustrd/text()") == ["Payout 1"]
    assert xp(doc, m, "//d:ChrgBr/text()") == ["SLEV"]
    assert not xp(doc, m, "//d:LclInstrm/d:Cd/text()")


def test_pain001_instant() -> None:
    doc = assert_schema_valid(pain001([eu_transfer()], instant=True), PAIN001)
    assert xp(doc, PAIN001, "//d:LclInstrm/d:Cd/text()") == ["INST"]


def test_pain001_sepa_rules() -> None:
    with refused("CURRENCY_INVALID", "transfers[0].currency"):
        pain001([CreditTransfer("E2E", 100, "USD", eu_transfer().creditor)])
    with refused("ACCOUNT_INVALID", "transfers[0].creditor.account"):
        pain001([CreditTransfer("E2E", 100, "EUR", us_transfer().creditor)])
    with refused("ACCOUNT_INVALID", "debtor.account"):
        pain001([eu_transfer()], debtor=DEBTOR_US)
    with refused("CHARSET_INVALID", "transfers[0].end_to_end_id"):
        pain001([CreditTransfer("PAYOUT_1", 100, "EUR", eu_transfer().creditor)])
    with refused("CHARSET_INVALID", "transfers[0].end_to_end_id"):
        pain001([CreditTransfer("/PAYOUT", 100, "EUR", eu_transfer().creditor)])
    with refused("CHARSET_INVALID", "payment_info_id"):
        pain001([eu_transfer()], payment_info_id="A//B")
    with refused("AMOUNT_INVALID", "transfers[0].amount_minor"):
        pain001([eu_transfer(amount=100_000_000_000)])
    with refused("FIELD_TOO_LONG", "transfers[0].remittance"):
        pain001([eu_transfer(remittance="x" * 141)])


def test_sepa_text() -> None:
    assert sepa_text("Zoë Ørsted \u2013 50% off", 70) == "Zoe Orsted - 50 off"
    assert sepa_text("x" * 100, 70) == "x" * 70


# --------------------------------------------------------------------- pacs.002


def pacs002(version: str, body: str) -> bytes:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Document xmlns="urn:iso:std:iso:20022:tech:xsd:pacs.002.001.{version}">
 <FIToFIPmtStsRpt>
  <GrpHdr><MsgId>STS-1</MsgId><CreDtTm>2026-12-07T09:30:02Z</CreDtTm></GrpHdr>
  <OrgnlGrpInfAndSts><OrgnlMsgId>MSG-2026-12-07-1</OrgnlMsgId>
   <OrgnlMsgNmId>pacs.008.001.08</OrgnlMsgNmId><GrpSts>PART</GrpSts></OrgnlGrpInfAndSts>
  {body}
 </FIToFIPmtStsRpt>
</Document>""".encode()


STATUSES = """
  <TxInfAndSts><StsId>S-1</StsId><OrgnlInstrId>INSTR-1</OrgnlInstrId>
   <OrgnlEndToEndId>PAYOUT-1</OrgnlEndToEndId><OrgnlTxId>TX-1</OrgnlTxId>
   <OrgnlUETR>8a562c67-ca16-48ba-b074-65581be6f011</OrgnlUETR><TxSts>ACSC</TxSts></TxInfAndSts>
  <TxInfAndSts><OrgnlEndToEndId>PAYOUT-2</OrgnlEndToEndId><TxSts>RJCT</TxSts>
   <StsRsnInf><Rsn><Cd>AC04</Cd></Rsn><AddtlInf>Account closed</AddtlInf></StsRsnInf></TxInfAndSts>
  <TxInfAndSts><OrgnlEndToEndId>PAYOUT-3</OrgnlEndToEndId><TxSts>RJCT</TxSts>
   <StsRsnInf><Rsn><Prtry>BANK-42</Prtry></Rsn></StsRsnInf></TxInfAndSts>"""


@pytest.mark.parametrize("version", ["03", "08", "10", "12"])
def test_pacs002_accepted_and_rejected(version: str) -> None:
    report = read_pacs002(pacs002(version, STATUSES))
    assert report.message_name == f"pacs.002.001.{version}"
    assert (report.message_id, report.original_message_id) == ("STS-1", "MSG-2026-12-07-1")
    assert report.original_message_name == "pacs.008.001.08"
    assert report.group_status == "PART"
    ok, closed, other = report.transactions
    assert ok.accepted and not ok.rejected
    assert (ok.original_end_to_end_id, ok.original_instruction_id) == ("PAYOUT-1", "INSTR-1")
    assert ok.original_transaction_id == "TX-1" and ok.original_uetr == UETR
    assert closed.rejected and closed.reason_code == "AC04"
    assert closed.additional_info == ("Account closed",)
    assert other.reason_code == "BANK-42"
    assert closed.source_path == "Document/FIToFIPmtStsRpt/TxInfAndSts[2]"


def test_pacs002_refusals() -> None:
    with refused("ELEMENT_REQUIRED", "Document/FIToFIPmtStsRpt/TxInfAndSts/TxSts"):
        read_pacs002(
            pacs002("10", "<TxInfAndSts><OrgnlEndToEndId>X</OrgnlEndToEndId></TxInfAndSts>")
        )
    with refused("NAMESPACE_UNSUPPORTED", "Document/@xmlns"):
        read_pacs002(pacs002("10", STATUSES).replace(b"pacs.002.001.10", b"pacs.004.001.09"))
    with refused("FILE_UNREADABLE"):
        read_pacs002(pacs002("10", STATUSES)[:300])
    with refused("DTD_FORBIDDEN"):
        read_pacs002(b'<!DOCTYPE x [<!ENTITY e SYSTEM "http://example.invalid/">]>' + b"<x/>")


# --------------------------------------------------------------------- pacs.004


def pacs004(tx: str, version: str = "09") -> bytes:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Document xmlns="urn:iso:std:iso:20022:tech:xsd:pacs.004.001.{version}">
 <PmtRtr>
  <GrpHdr><MsgId>RTR-1</MsgId><CreDtTm>2026-12-09T10:00:00+01:00</CreDtTm><NbOfTxs>1</NbOfTxs>
   <SttlmInf><SttlmMtd>CLRG</SttlmMtd></SttlmInf></GrpHdr>
  <OrgnlGrpInf><OrgnlMsgId>MSG-2026-12-07-1</OrgnlMsgId><OrgnlMsgNmId>pacs.008.001.08</OrgnlMsgNmId></OrgnlGrpInf>
  {tx}
 </PmtRtr>
</Document>""".encode()


RETURNED = """<TxInf><RtrId>RTR-TX-1</RtrId><OrgnlInstrId>INSTR-2</OrgnlInstrId>
  <OrgnlEndToEndId>PAYOUT-2</OrgnlEndToEndId><OrgnlTxId>TX-2</OrgnlTxId>
  <RtrdIntrBkSttlmAmt Ccy="EUR">{amount}</RtrdIntrBkSttlmAmt>
  <IntrBkSttlmDt>2026-12-09</IntrBkSttlmDt>
  <RtrRsnInf><Rsn><Cd>AC04</Cd></Rsn><AddtlInf>Closed</AddtlInf></RtrRsnInf></TxInf>"""


@pytest.mark.parametrize("version", ["02", "09", "11"])
def test_pacs004_return(version: str) -> None:
    ret = read_pacs004(pacs004(RETURNED.format(amount="12.50"), version))
    assert ret.message_name == f"pacs.004.001.{version}"
    assert (ret.message_id, ret.original_message_id) == ("RTR-1", "MSG-2026-12-07-1")
    assert ret.created_at == dt.datetime(2026, 12, 9, 10, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    (tx,) = ret.transactions
    assert (tx.original_end_to_end_id, tx.original_instruction_id, tx.original_transaction_id) == (
        "PAYOUT-2",
        "INSTR-2",
        "TX-2",
    )
    assert (tx.returned_minor, tx.currency, tx.reason_code) == (1250, "EUR", "AC04")
    assert tx.settlement_date == dt.date(2026, 12, 9)
    assert tx.additional_info == ("Closed",)


def test_pacs004_refusals() -> None:
    with refused("AMOUNT_INVALID") as r:
        read_pacs004(pacs004(RETURNED.format(amount="12.5O")))
    assert r.error is not None
    assert r.error.field == "Document/PmtRtr/TxInf/RtrdIntrBkSttlmAmt"
    with refused("AMOUNT_PRECISION_INVALID"):
        read_pacs004(pacs004(RETURNED.format(amount="12.505")))
    no_reason = RETURNED.format(amount="1.00").replace("<Rsn><Cd>AC04</Cd></Rsn>", "")
    with refused("ELEMENT_REQUIRED", "Document/PmtRtr/TxInf/RtrRsnInf/Rsn/Cd"):
        read_pacs004(pacs004(no_reason))
    with refused("ELEMENT_REQUIRED", "Document/PmtRtr/TxInf"):
        read_pacs004(pacs004(""))
    with refused("ELEMENT_REQUIRED", "Document/PmtRtr/TxInf/RtrdIntrBkSttlmAmt"):
        read_pacs004(pacs004("<TxInf><RtrId>X</RtrId></TxInf>"))
