"""Incoming ISO 20022 answers to what we sent: status reports and returns.

- `read_pacs002`: `pacs.002` FI-to-FI payment status report, any `.001.xx`
  (version from the namespace): the group status and each transaction's status
  (`ACSC`/`ACCC`/`ACSP`/`ACCP`/`ACWC` accepted, `RJCT` rejected, `PDNG`
  pending, ...) with its ISO reason code (`AC04`, `AM04`, ... from
  `StsRsnInf/Rsn/Cd`, or `Prtry`) and the original references to match on.
- `read_pacs004`: `pacs.004` payment return, any `.001.xx`: each returned
  transaction's original references, returned amount and ISO return reason.

Parsed hardened like every bank file. No official schema ships for these two
(none of the packages we could use carries them), so structure is checked
here: every required element is named when missing, amounts and currencies
are checked, and nothing is returned from a document that fails.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from lxml import etree

from money_plane.formats import _xml
from money_plane.formats._common import check_currency, refuse, to_minor

_El = etree._Element

ACCEPTED = frozenset({"ACSC", "ACCC", "ACSP", "ACCP", "ACWC", "ACTC", "ACFC", "ACIS", "PART"})
REJECTED = frozenset({"RJCT", "CANC", "BLCK"})


@dataclass(frozen=True, slots=True)
class TransactionStatus:
    status: str  # ExternalPaymentTransactionStatus1Code
    reason_code: str  # ISO ExternalStatusReason1Code, or proprietary
    additional_info: tuple[str, ...]
    status_id: str
    original_instruction_id: str
    original_end_to_end_id: str
    original_transaction_id: str
    original_uetr: str
    source_path: str

    @property
    def accepted(self) -> bool:
        return self.status in ACCEPTED

    @property
    def rejected(self) -> bool:
        return self.status in REJECTED


@dataclass(frozen=True, slots=True)
class PaymentStatusReport:
    message_name: str
    message_id: str
    created_at: dt.datetime | None
    original_message_id: str
    original_message_name: str
    group_status: str
    group_reason_code: str
    transactions: tuple[TransactionStatus, ...]


@dataclass(frozen=True, slots=True)
class ReturnedTransaction:
    return_id: str
    original_instruction_id: str
    original_end_to_end_id: str
    original_transaction_id: str
    original_uetr: str
    returned_minor: int
    currency: str
    settlement_date: dt.date | None
    reason_code: str  # ISO ExternalReturnReason1Code (AC04, AM04, ...) or proprietary
    additional_info: tuple[str, ...]
    source_path: str


@dataclass(frozen=True, slots=True)
class PaymentReturn:
    message_name: str
    message_id: str
    created_at: dt.datetime | None
    original_message_id: str
    transactions: tuple[ReturnedTransaction, ...]


def _open(data: bytes, message: str, top: str) -> tuple[str, _El]:
    root = _xml.parse_xml(data)
    ns = _xml.namespace_of(root)
    found = re.fullmatch(
        rf"urn:iso:std:iso:20022:tech:xsd:({re.escape(message)}\.001\.\d{{2}})", ns
    )
    if _xml.local(root) != "Document" or not found:
        raise refuse(
            "NAMESPACE_UNSUPPORTED",
            f"not an ISO 20022 {message} document",
            "Document/@xmlns",
        )
    return found[1], _xml.required(root, top)


def _created(hdr: _El) -> dt.datetime | None:
    raw = _xml.required_text(hdr, "CreDtTm")
    try:
        return dt.datetime.fromisoformat(raw)
    except ValueError as exc:
        where = f"{_xml.path_of(hdr)}/CreDtTm"
        raise refuse("DATE_INVALID", f"{where} is not an ISO date-time", where) from exc


def _reason(el: _El | None) -> str:
    return _xml.text(el, "Rsn", "Cd") or _xml.text(el, "Rsn", "Prtry")


def read_pacs002(data: bytes) -> PaymentStatusReport:
    name, top = _open(data, "pacs.002", "FIToFIPmtStsRpt")
    hdr = _xml.required(top, "GrpHdr")
    # OrgnlGrpInfAndSts repeats from .001.08 on; the first one is the group's.
    group = _xml.child(top, "OrgnlGrpInfAndSts")
    txs = []
    base = _xml.path_of(top)
    statuses = list(_xml.children(top, "TxInfAndSts"))
    for i, tx in enumerate(statuses, start=1):
        status = _xml.required_text(tx, "TxSts")
        rsn = _xml.child(tx, "StsRsnInf")
        txs.append(
            TransactionStatus(
                status=status,
                reason_code=_reason(rsn),
                additional_info=tuple(
                    (a.text or "").strip() for a in _xml.children(rsn, "AddtlInf")
                )
                if rsn is not None
                else (),
                status_id=_xml.text(tx, "StsId"),
                original_instruction_id=_xml.text(tx, "OrgnlInstrId"),
                original_end_to_end_id=_xml.text(tx, "OrgnlEndToEndId"),
                original_transaction_id=_xml.text(tx, "OrgnlTxId"),
                original_uetr=_xml.text(tx, "OrgnlUETR"),
                source_path=f"{base}/TxInfAndSts[{i}]"
                if len(statuses) > 1
                else f"{base}/TxInfAndSts",
            )
        )
    group_status = _xml.text(group, "GrpSts")
    if not txs and not group_status:
        raise refuse(
            "ELEMENT_REQUIRED",
            "a pacs.002 reports a group status or at least one transaction status",
            f"{_xml.path_of(top)}/TxInfAndSts",
        )
    return PaymentStatusReport(
        message_name=name,
        message_id=_xml.required_text(hdr, "MsgId"),
        created_at=_created(hdr),
        original_message_id=_xml.text(group, "OrgnlMsgId"),
        original_message_name=_xml.text(group, "OrgnlMsgNmId"),
        group_status=group_status,
        group_reason_code=_reason(_xml.child(group, "StsRsnInf")),
        transactions=tuple(txs),
    )


def read_pacs004(data: bytes) -> PaymentReturn:
    name, top = _open(data, "pacs.004", "PmtRtr")
    hdr = _xml.required(top, "GrpHdr")
    txs = []
    base = _xml.path_of(top)
    returned = list(_xml.children(top, "TxInf"))
    for i, tx in enumerate(returned, start=1):
        tx_path = f"{base}/TxInf[{i}]" if len(returned) > 1 else f"{base}/TxInf"
        amount_el = _xml.required(tx, "RtrdIntrBkSttlmAmt")
        where = f"{tx_path}/RtrdIntrBkSttlmAmt"
        currency = check_currency(amount_el.get("Ccy", ""), f"{where}/@Ccy")
        settle = _xml.text(tx, "IntrBkSttlmDt")
        try:
            settlement_date = dt.date.fromisoformat(settle) if settle else None
        except ValueError as exc:
            path = f"{_xml.path_of(tx)}/IntrBkSttlmDt"
            raise refuse("DATE_INVALID", f"{path} is not an ISO date", path) from exc
        rsn = _xml.child(tx, "RtrRsnInf")
        reason = _reason(rsn)
        if not reason:
            path = f"{_xml.path_of(tx)}/RtrRsnInf/Rsn/Cd"
            raise refuse("ELEMENT_REQUIRED", f"{path} is missing: a return names its reason", path)
        txs.append(
            ReturnedTransaction(
                return_id=_xml.text(tx, "RtrId"),
                original_instruction_id=_xml.text(tx, "OrgnlInstrId"),
                original_end_to_end_id=_xml.text(tx, "OrgnlEndToEndId"),
                original_transaction_id=_xml.text(tx, "OrgnlTxId"),
                original_uetr=_xml.text(tx, "OrgnlUETR"),
                returned_minor=to_minor(amount_el.text or "", currency, where),
                currency=currency,
                settlement_date=settlement_date,
                reason_code=reason,
                additional_info=tuple(
                    (a.text or "").strip() for a in _xml.children(rsn, "AddtlInf")
                )
                if rsn is not None
                else (),
                source_path=tx_path,
            )
        )
    if not txs:
        raise refuse(
            "ELEMENT_REQUIRED",
            "a pacs.004 returns at least one transaction",
            f"{_xml.path_of(top)}/TxInf",
        )
    return PaymentReturn(
        message_name=name,
        message_id=_xml.required_text(hdr, "MsgId"),
        created_at=_created(hdr),
        original_message_id=_xml.text(top, "OrgnlGrpInf", "OrgnlMsgId"),
        transactions=tuple(txs),
    )
