"""Outgoing ISO 20022 credit transfers, validated against the official schemas.

- `write_pacs008`: `pacs.008.001.08` FI-to-FI customer credit transfer, the
  instant-rail message (RTP / FedNow style: settlement method CLRG, one or
  more transactions, agents by ABA routing number `USABA` or BIC).
- `write_pain001`: `pain.001.001.09` customer credit transfer initiation for
  SEPA (service level SEPA, EUR only, charges SLEV, creditor by IBAN; with
  `instant=True` the local instrument INST of SCT Inst).

Every document is validated against its schema (`xsd/`) before the bytes are
returned, so nothing that a bank would bounce on syntax ever leaves.
Semantic checks the schema cannot make are refused with the field named:
`transfers[2].end_to_end_id`, ... (`InvalidArgument`, reasons such as
`FIELD_REQUIRED`, `FIELD_TOO_LONG`, `AMOUNT_INVALID`, `CURRENCY_INVALID`,
`CHARSET_INVALID`, `CREDITOR_REFERENCE_INVALID`).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from anyascii import anyascii
from lxml import etree
from stdnum import iso11649

from money_plane.formats import _xml
from money_plane.formats._common import (
    check_currency,
    check_length,
    from_minor,
    refuse,
    require,
)
from money_plane.formats.beneficiary import IbanAccount, UsBankAccount

_El = etree._Element

PACS008 = "pacs.008.001.08"
PAIN001 = "pain.001.001.09"

# The EPC's SEPA character set (Latin basic), for identifiers and free text.
_SEPA_TEXT = re.compile(r"^[A-Za-z0-9/\-?:().,'+ ]*$")
_SEPA_ID = re.compile(r"^(?!/)(?!.*//)[A-Za-z0-9/\-?:().,'+]+(?<!/)$")
_UETR = re.compile(r"^[a-f0-9]{8}-[a-f0-9]{4}-4[a-f0-9]{3}-[89ab][a-f0-9]{3}-[a-f0-9]{12}$")
SEPA_MAX_MINOR = 99_999_999_999  # 999,999,999.99 EUR


@dataclass(frozen=True, slots=True)
class Party:
    """An account holder and the account the money moves from or to."""

    name: str
    account: IbanAccount | UsBankAccount


@dataclass(frozen=True, slots=True)
class CreditTransfer:
    end_to_end_id: str
    amount_minor: int
    currency: str
    creditor: Party
    instruction_id: str = ""
    transaction_id: str = ""  # pacs.008 only (the interbank id)
    uetr: str = ""  # UUID v4, lower case
    remittance: str = ""  # unstructured, up to 140 characters
    creditor_reference: str = ""  # structured (ISO 11649 "RF..." or scheme reference)


# ---------------------------------------------------------------- shared parts


def _check_transfer(t: CreditTransfer, field: str) -> None:
    require(t.end_to_end_id, f"{field}.end_to_end_id")
    check_length(t.end_to_end_id, f"{field}.end_to_end_id", 35)
    check_length(t.instruction_id, f"{field}.instruction_id", 35)
    check_length(t.transaction_id, f"{field}.transaction_id", 35)
    check_length(t.remittance, f"{field}.remittance", 140)
    check_length(t.creditor_reference, f"{field}.creditor_reference", 35)
    check_currency(t.currency, f"{field}.currency")
    if t.amount_minor <= 0:
        raise refuse(
            "AMOUNT_INVALID", f"{field}.amount_minor must be above 0", f"{field}.amount_minor"
        )
    if t.uetr and not _UETR.fullmatch(t.uetr):
        raise refuse("UETR_INVALID", f"{field}.uetr must be a lower-case UUID v4", f"{field}.uetr")
    if t.remittance and t.creditor_reference:
        raise refuse(
            "FIELD_NOT_ALLOWED",
            f"{field}: send either remittance or creditor_reference, not both",
            f"{field}.creditor_reference",
        )
    ref = t.creditor_reference
    if ref.upper().startswith("RF") and not iso11649.is_valid(ref):
        raise refuse(
            "CREDITOR_REFERENCE_INVALID",
            f"{field}.creditor_reference is not a valid ISO 11649 RF reference",
            f"{field}.creditor_reference",
        )
    require(t.creditor.name, f"{field}.creditor.name")


def _check_total(transfers: list[CreditTransfer]) -> str:
    if not transfers:
        raise refuse("FIELD_REQUIRED", "at least one transfer is required", "transfers")
    currencies = {t.currency for t in transfers}
    if len(currencies) > 1:
        raise refuse("CURRENCY_MIXED", "all transfers of one message share a currency", "transfers")
    seen: set[str] = set()
    for i, t in enumerate(transfers):
        if t.end_to_end_id in seen:
            raise refuse(
                "DUPLICATE_END_TO_END_ID",
                f"transfers[{i}].end_to_end_id repeats an earlier transfer's",
                f"transfers[{i}].end_to_end_id",
            )
        seen.add(t.end_to_end_id)
    return currencies.pop()


def _iso(value: dt.datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("ISO 20022 date-times are written with their UTC offset")
    return value.isoformat(timespec="seconds")


def _agent(b: _xml.Builder, parent: _El, name: str, account: IbanAccount | UsBankAccount) -> None:
    fin = b.add(b.add(parent, name), "FinInstnId")
    if isinstance(account, UsBankAccount):
        member = b.add(fin, "ClrSysMmbId")
        b.add(b.add(member, "ClrSysId"), "Cd", "USABA")
        b.add(member, "MmbId", account.routing_number)
    elif account.bic:
        b.add(fin, "BICFI", account.bic)
    else:
        b.add(b.add(fin, "Othr"), "Id", "NOTPROVIDED")


def _account(b: _xml.Builder, parent: _El, name: str, account: IbanAccount | UsBankAccount) -> None:
    ident = b.add(b.add(parent, name), "Id")
    if isinstance(account, IbanAccount):
        b.add(ident, "IBAN", account.iban)
    else:
        b.add(b.add(ident, "Othr"), "Id", account.account_number)


def _remittance(b: _xml.Builder, parent: _El, t: CreditTransfer) -> None:
    if t.remittance:
        b.add(b.add(parent, "RmtInf"), "Ustrd", t.remittance)
    elif t.creditor_reference:
        cri = b.add(b.add(b.add(parent, "RmtInf"), "Strd"), "CdtrRefInf")
        if t.creditor_reference.upper().startswith("RF"):
            tp = b.add(cri, "Tp")
            b.add(b.add(tp, "CdOrPrtry"), "Cd", "SCOR")
            b.add(tp, "Issr", "ISO")
        b.add(cri, "Ref", t.creditor_reference)


def _sum(transfers: list[CreditTransfer], currency: str) -> str:
    return from_minor(sum(t.amount_minor for t in transfers), currency)


# -------------------------------------------------------------------- pacs.008


def write_pacs008(
    transfers: list[CreditTransfer],
    *,
    message_id: str,
    created_at: dt.datetime,
    settlement_date: dt.date,
    debtor: Party,
    clearing_system: str = "",
    local_instrument: str = "",
    instructing_agent: str = "",
    instructed_agent: str = "",
) -> bytes:
    """A `pacs.008.001.08` for an instant rail. `clearing_system` is the
    clearing system code ("FDN", "TCH", max 3 letters) or a proprietary name;
    instructing/instructed agents are ABA routing numbers (US rails) or BICs."""
    require(message_id, "message_id")
    check_length(message_id, "message_id", 35)
    require(debtor.name, "debtor.name")
    for i, t in enumerate(transfers):
        _check_transfer(t, f"transfers[{i}]")
    currency = _check_total(transfers)
    b = _xml.Builder(f"{_xml.ISO_NS_PREFIX}{PACS008}")
    root = b.root()
    top = b.add(root, "FIToFICstmrCdtTrf")
    hdr = b.add(top, "GrpHdr")
    b.add(hdr, "MsgId", message_id)
    b.add(hdr, "CreDtTm", _iso(created_at))
    b.add(hdr, "NbOfTxs", str(len(transfers)))
    b.add(hdr, "TtlIntrBkSttlmAmt", _sum(transfers, currency), Ccy=currency)
    b.add(hdr, "IntrBkSttlmDt", settlement_date.isoformat())
    sttlm = b.add(hdr, "SttlmInf")
    b.add(sttlm, "SttlmMtd", "CLRG")
    if clearing_system:
        use_code = re.fullmatch(r"[A-Z]{1,3}", clearing_system) is not None
        b.add(b.add(sttlm, "ClrSys"), "Cd" if use_code else "Prtry", clearing_system)
    for name, agent in (("InstgAgt", instructing_agent), ("InstdAgt", instructed_agent)):
        if agent:
            fin = b.add(b.add(hdr, name), "FinInstnId")
            if agent.isdigit():
                member = b.add(fin, "ClrSysMmbId")
                b.add(b.add(member, "ClrSysId"), "Cd", "USABA")
                b.add(member, "MmbId", agent)
            else:
                b.add(fin, "BICFI", agent)
    for t in transfers:
        tx = b.add(top, "CdtTrfTxInf")
        pmt_id = b.add(tx, "PmtId")
        b.opt(pmt_id, "InstrId", t.instruction_id)
        b.add(pmt_id, "EndToEndId", t.end_to_end_id)
        b.opt(pmt_id, "TxId", t.transaction_id)
        b.opt(pmt_id, "UETR", t.uetr)
        if local_instrument:
            b.add(b.add(b.add(tx, "PmtTpInf"), "LclInstrm"), "Prtry", local_instrument)
        b.add(tx, "IntrBkSttlmAmt", from_minor(t.amount_minor, t.currency), Ccy=t.currency)
        b.add(tx, "IntrBkSttlmDt", settlement_date.isoformat())
        b.add(tx, "ChrgBr", "SLEV")
        b.add(b.add(tx, "Dbtr"), "Nm", debtor.name)
        _account(b, tx, "DbtrAcct", debtor.account)
        _agent(b, tx, "DbtrAgt", debtor.account)
        _agent(b, tx, "CdtrAgt", t.creditor.account)
        b.add(b.add(tx, "Cdtr"), "Nm", t.creditor.name)
        _account(b, tx, "CdtrAcct", t.creditor.account)
        _remittance(b, tx, t)
    _xml.validate(root, PACS008)
    return _xml.serialize(root)


# -------------------------------------------------------------------- pain.001


def sepa_text(value: str, max_len: int) -> str:
    """Free text (names, remittance) in the SEPA character set: transliterated
    to Latin letters (Müller -> Muller), anything else left becomes a space."""
    ascii_text = anyascii(value)
    cleaned = "".join(c if _SEPA_TEXT.fullmatch(c) else " " for c in ascii_text)
    return " ".join(cleaned.split())[:max_len]


def _sepa_id(value: str, field: str) -> None:
    if value and not _SEPA_ID.fullmatch(value):
        raise refuse(
            "CHARSET_INVALID",
            f"{field} must use the SEPA character set (letters, digits, / - ? : ( ) . , ' +), "
            "not start or end with / nor hold //",
            field,
        )


def write_pain001(
    transfers: list[CreditTransfer],
    *,
    message_id: str,
    payment_info_id: str,
    created_at: dt.datetime,
    execution_date: dt.date,
    debtor: Party,
    initiating_party: str = "",
    batch_booking: bool | None = None,
    instant: bool = False,
) -> bytes:
    """A SEPA credit transfer initiation (`pain.001.001.09`): one payment
    information block debiting `debtor`'s IBAN."""
    for field, value in (("message_id", message_id), ("payment_info_id", payment_info_id)):
        require(value, field)
        check_length(value, field, 35)
        _sepa_id(value, field)
    require(debtor.name, "debtor.name")
    if not isinstance(debtor.account, IbanAccount):
        raise refuse("ACCOUNT_INVALID", "SEPA debits an IBAN account", "debtor.account")
    for i, t in enumerate(transfers):
        field = f"transfers[{i}]"
        _check_transfer(t, field)
        _sepa_id(t.end_to_end_id, f"{field}.end_to_end_id")
        _sepa_id(t.instruction_id, f"{field}.instruction_id")
        if t.currency != "EUR":
            raise refuse(
                "CURRENCY_INVALID", f"{field}.currency must be EUR for SEPA", f"{field}.currency"
            )
        if t.amount_minor > SEPA_MAX_MINOR:
            raise refuse(
                "AMOUNT_INVALID",
                f"{field}.amount_minor is above the SEPA maximum",
                f"{field}.amount_minor",
            )
        if not isinstance(t.creditor.account, IbanAccount):
            raise refuse(
                "ACCOUNT_INVALID",
                f"{field}.creditor.account must be an IBAN for SEPA",
                f"{field}.creditor.account",
            )
    currency = _check_total(transfers)
    b = _xml.Builder(f"{_xml.ISO_NS_PREFIX}{PAIN001}")
    root = b.root()
    top = b.add(root, "CstmrCdtTrfInitn")
    hdr = b.add(top, "GrpHdr")
    b.add(hdr, "MsgId", message_id)
    b.add(hdr, "CreDtTm", _iso(created_at))
    b.add(hdr, "NbOfTxs", str(len(transfers)))
    b.add(hdr, "CtrlSum", _sum(transfers, currency))
    b.add(b.add(hdr, "InitgPty"), "Nm", sepa_text(initiating_party or debtor.name, 70))
    pmt = b.add(top, "PmtInf")
    b.add(pmt, "PmtInfId", payment_info_id)
    b.add(pmt, "PmtMtd", "TRF")
    if batch_booking is not None:
        b.add(pmt, "BtchBookg", "true" if batch_booking else "false")
    b.add(pmt, "NbOfTxs", str(len(transfers)))
    b.add(pmt, "CtrlSum", _sum(transfers, currency))
    tp = b.add(pmt, "PmtTpInf")
    b.add(b.add(tp, "SvcLvl"), "Cd", "SEPA")
    if instant:
        b.add(b.add(tp, "LclInstrm"), "Cd", "INST")
    b.add(b.add(pmt, "ReqdExctnDt"), "Dt", execution_date.isoformat())
    b.add(b.add(pmt, "Dbtr"), "Nm", sepa_text(debtor.name, 70))
    _account(b, pmt, "DbtrAcct", debtor.account)
    _agent(b, pmt, "DbtrAgt", debtor.account)
    b.add(pmt, "ChrgBr", "SLEV")
    for t in transfers:
        tx = b.add(pmt, "CdtTrfTxInf")
        pmt_id = b.add(tx, "PmtId")
        b.opt(pmt_id, "InstrId", t.instruction_id)
        b.add(pmt_id, "EndToEndId", t.end_to_end_id)
        b.opt(pmt_id, "UETR", t.uetr)
        b.add(b.add(tx, "Amt"), "InstdAmt", from_minor(t.amount_minor, t.currency), Ccy=t.currency)
        assert isinstance(t.creditor.account, IbanAccount)
        if t.creditor.account.bic:
            b.add(b.add(b.add(tx, "CdtrAgt"), "FinInstnId"), "BICFI", t.creditor.account.bic)
        b.add(b.add(tx, "Cdtr"), "Nm", sepa_text(t.creditor.name, 70))
        _account(b, tx, "CdtrAcct", t.creditor.account)
        if t.remittance:
            b.add(b.add(tx, "RmtInf"), "Ustrd", sepa_text(t.remittance, 140))
        else:
            _remittance(b, tx, t)
    _xml.validate(root, PAIN001)
    return _xml.serialize(root)
