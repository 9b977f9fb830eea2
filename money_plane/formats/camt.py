"""ISO 20022 bank-to-customer cash management: camt.052, camt.053, camt.054.

Reading (`read_camt`): versions `.001.02` to `.001.08` of all three, the
message and version taken from the document's namespace. The file is parsed
hardened (`_xml.parse_xml`), validated against the official schema of that
exact version (shipped in `xsd/`), then normalized to `statement.Statement`s
with semantic checks the schema cannot make: amounts representable in the
currency's minor units, one currency per statement (the account's `Ccy`
where given, else the first amount's), dates. Any failure refuses the whole
file naming the element path; nothing is returned from a file that fails.

Writing (`write_camt052`, `write_camt053`, `write_camt054`): version
`.001.08`, validated against its schema before the bytes are returned, for
the sandbox bank. Reading what was written gives the same lines back.
"""

from __future__ import annotations

import datetime as dt
import re

from lxml import etree

from money_plane.formats import _xml
from money_plane.formats._common import check_currency, from_minor, refuse, to_minor
from money_plane.formats.statement import (
    Account,
    Balance,
    Batch,
    EntryStatus,
    References,
    Sign,
    Statement,
    StatementFile,
    StatementKind,
    StatementLine,
    TransactionDetail,
    finish_file,
)
from triplane.runtime.errors import InvalidArgument

_El = etree._Element

READ_VERSIONS = tuple(f"{v:02d}" for v in range(2, 9))
WRITE_VERSION = "08"

# message -> (root element, statement element)
_MESSAGES = {
    "camt.052": ("BkToCstmrAcctRpt", "Rpt"),
    "camt.053": ("BkToCstmrStmt", "Stmt"),
    "camt.054": ("BkToCstmrDbtCdtNtfctn", "Ntfctn"),
}
_NAMESPACE = re.compile(
    r"^urn:iso:std:iso:20022:tech:xsd:(?P<msg>camt\.05[234])\.001\.(?P<ver>\d{2})$"
)


# --------------------------------------------------------------------- reading


def detect(root: _El) -> tuple[str, str]:
    """(message, version) of a camt document, e.g. ("camt.053", "08")."""
    ns = _xml.namespace_of(root)
    found = _NAMESPACE.match(ns)
    if _xml.local(root) != "Document" or not found:
        raise refuse(
            "NAMESPACE_UNSUPPORTED",
            "not an ISO 20022 camt.052/053/054 document (root Document in the "
            "urn:iso:std:iso:20022:tech:xsd:camt.05x.001.xx namespace)",
            "Document/@xmlns",
        )
    msg, ver = found["msg"], found["ver"]
    if ver not in READ_VERSIONS:
        raise refuse(
            "MESSAGE_VERSION_UNSUPPORTED",
            f"{msg}.001.{ver} is not supported (.001.{READ_VERSIONS[0]} to "
            f".001.{READ_VERSIONS[-1]})",
            "Document/@xmlns",
        )
    return msg, ver


def read_camt(data: bytes, *, max_bytes: int = _xml.MAX_FILE_BYTES) -> StatementFile:
    """All statements of a camt.052/053/054 file, or a refusal naming where."""
    root = _xml.parse_xml(data, max_bytes=max_bytes)
    msg, ver = detect(root)
    name = f"{msg}.001.{ver}"
    _xml.validate(root, name)
    kind = StatementKind(msg)
    top_name, stmt_name = _MESSAGES[msg]
    top = _xml.required(root, top_name)
    header = _xml.required(top, "GrpHdr")
    message_id = _xml.required_text(header, "MsgId")
    created = _datetime(_xml.child(header, "CreDtTm"))
    statements = [_statement(kind, el) for el in _xml.children(top, stmt_name)]
    return finish_file(kind, name, message_id, created, statements, bytes(data))


def _datetime(el: _El | None) -> dt.datetime | None:
    if el is None or not (el.text or "").strip():
        return None
    raw = (el.text or "").strip()
    try:
        return dt.datetime.fromisoformat(raw)
    except ValueError as exc:
        path = _xml.path_of(el)
        raise refuse("DATE_INVALID", f"{path} is not an ISO date-time", path) from exc


def _date_choice(el: _El | None) -> dt.date | None:
    """A DateAndDateTimeChoice (Dt or DtTm) as a date."""
    if el is None:
        return None
    inner = _xml.child(el, "Dt")
    if inner is None:
        inner = _xml.child(el, "DtTm")
    if inner is None or not (inner.text or "").strip():
        return None
    raw = (inner.text or "").strip()
    try:
        return dt.date.fromisoformat(raw[:10])
    except ValueError as exc:
        path = _xml.path_of(inner)
        raise refuse("DATE_INVALID", f"{path} is not an ISO date", path) from exc


def _int(el: _El, *names: str) -> int | None:
    value = _xml.text(el, *names)
    if not value:
        return None
    if not value.isdigit():
        path = f"{_xml.path_of(el)}/{'/'.join(names)}"
        raise refuse("NUMBER_INVALID", f"{path} is not a number", path)
    return int(value)


class _Money:
    """Reads amounts of one statement, holding it to one currency."""

    def __init__(self, account_currency: str) -> None:
        self.currency = account_currency

    def amount(self, el: _El) -> tuple[int, str]:
        # The element's path is worked out only for a refusal: it costs a scan
        # of the siblings, and a statement can hold a hundred thousand entries.
        currency = el.get("Ccy", "")
        try:
            check_currency(currency, "Ccy")
            minor = to_minor(el.text or "", currency, "the amount")
        except InvalidArgument as exc:
            path = _xml.path_of(el)
            where = f"{path}/@Ccy" if exc.field == "Ccy" else path
            raise refuse(exc.reason, f"{where}: {exc.message}", where) from exc
        if not self.currency:
            self.currency = currency
        elif currency != self.currency:
            path = _xml.path_of(el)
            raise refuse(
                "CURRENCY_MIXED",
                f"{path} is in {currency}, the statement is in {self.currency}",
                path,
            )
        return minor, currency


def _sign(el: _El, *names: str, value: str | None = None) -> Sign:
    """CdtDbtInd down `names` of `el` (its text as `value` when read already)."""
    if value is None:
        value = _xml.text(el, *names)
    if value not in ("CRDT", "DBIT"):
        path = f"{_xml.path_of(el)}/{'/'.join(names)}"
        raise refuse("CREDIT_DEBIT_INVALID", f"{path} must be CRDT or DBIT", path)
    return Sign(value)


def _account(el: _El) -> Account:
    bic = _xml.text(el, "Svcr", "FinInstnId", "BICFI") or _xml.text(el, "Svcr", "FinInstnId", "BIC")
    return Account(
        iban=_xml.text(el, "Id", "IBAN"),
        other_id=_xml.text(el, "Id", "Othr", "Id"),
        currency=_xml.text(el, "Ccy"),
        servicer_bic=bic,
    )


def _statement(kind: StatementKind, el: _El) -> Statement:
    account = _account(_xml.required(el, "Acct"))
    money = _Money(account.currency)
    balances = tuple(_balance(money, b) for b in _xml.children(el, "Bal"))
    entries = list(_xml.children(el, "Ntry"))
    base = _xml.path_of(el)
    lines = tuple(
        _entry(money, n, f"{base}/Ntry[{i}]" if len(entries) > 1 else f"{base}/Ntry")
        for i, n in enumerate(entries, start=1)
    )
    period = _xml.child(el, "FrToDt")
    return Statement(
        kind=kind,
        statement_id=_xml.required_text(el, "Id"),
        account=account,
        lines=lines,
        balances=balances,
        electronic_sequence=_int(el, "ElctrncSeqNb"),
        legal_sequence=_int(el, "LglSeqNb"),
        created_at=_datetime(_xml.child(el, "CreDtTm")),
        from_date=_datetime(_xml.child(period, "FrDtTm")),
        to_date=_datetime(_xml.child(period, "ToDtTm")),
    )


def _balance(money: _Money, el: _El) -> Balance:
    code = _xml.text(el, "Tp", "CdOrPrtry", "Cd") or _xml.text(el, "Tp", "CdOrPrtry", "Prtry")
    amount, currency = money.amount(_xml.required(el, "Amt"))
    date = _date_choice(_xml.required(el, "Dt"))
    assert date is not None  # the schema requires Dt/Dt or Dt/DtTm
    return Balance(
        type=code, amount_minor=amount, currency=currency, sign=_sign(el, "CdtDbtInd"), date=date
    )


def _status(el: _El, sts: _El | None = None) -> EntryStatus:
    """The entry's Sts (the element itself when found already)."""
    if sts is None:
        sts = _xml.required(el, "Sts")
    code = (sts.text or "").strip() or _xml.text(sts, "Cd") or _xml.text(sts, "Prtry")
    try:
        return EntryStatus(code)
    except ValueError as exc:
        raise refuse(
            "ENTRY_STATUS_INVALID",
            f"{_xml.path_of(sts)} is not BOOK, PDNG, INFO or FUTR",
            _xml.path_of(sts),
        ) from exc


def _bank_tx_code(el: _El | None) -> str:
    if el is None:
        return ""
    domain = _xml.text(el, "Domn", "Cd")
    if domain:
        return "/".join(
            (
                domain,
                _xml.text(el, "Domn", "Fmly", "Cd"),
                _xml.text(el, "Domn", "Fmly", "SubFmlyCd"),
            )
        )
    return _xml.text(el, "Prtry", "Cd")


def _entry(money: _Money, el: _El, path: str) -> StatementLine:
    kids = _xml.Children(el)
    amount, currency = money.amount(kids.required("Amt"))
    batch: Batch | None = None
    details: list[TransactionDetail] = []
    for ntry_dtls in _xml.children(el, "NtryDtls"):
        btch = _xml.child(ntry_dtls, "Btch")
        if btch is not None:
            total = _xml.child(btch, "TtlAmt")
            total_minor, total_ccy = money.amount(total) if total is not None else (None, "")
            batch = Batch(
                number_of_transactions=_int(btch, "NbOfTxs"),
                total_minor=total_minor,
                currency=total_ccy,
                sign=_sign(btch, "CdtDbtInd") if _xml.text(btch, "CdtDbtInd") else None,
                message_id=_xml.text(btch, "MsgId"),
                payment_info_id=_xml.text(btch, "PmtInfId"),
            )
        details.extend(_detail(money, tx) for tx in _xml.children(ntry_dtls, "TxDtls"))
    sign = _sign(el, "CdtDbtInd", value=kids.text("CdtDbtInd"))
    return StatementLine(
        amount_minor=amount,
        currency=currency,
        sign=sign,
        status=_status(el, kids.required("Sts")),
        booking_date=_date_choice(kids.child("BookgDt")),
        value_date=_date_choice(kids.child("ValDt")),
        account_servicer_ref=kids.text("AcctSvcrRef"),
        entry_ref=kids.text("NtryRef"),
        reversal=kids.text("RvslInd").lower() in ("true", "1"),
        bank_transaction_code=_bank_tx_code(kids.child("BkTxCd")),
        batch=batch,
        details=tuple(details),
        additional_info=kids.text("AddtlNtryInf"),
        source_path=path,
    )


def _party_name(el: _El | None) -> str:
    return _xml.text(el, "Pty", "Nm") or _xml.text(el, "Nm")


def _account_id(el: _El | None) -> str:
    return _xml.text(el, "Id", "IBAN") or _xml.text(el, "Id", "Othr", "Id")


def _detail(money: _Money, el: _El) -> TransactionDetail:
    kids = _xml.Children(el)
    refs = _xml.Children(kids.child("Refs"))
    amount_el = kids.child("Amt")
    if amount_el is None:  # .001.02 carries the amount in AmtDtls only
        amount_el = _xml.child(el, "AmtDtls", "TxAmt", "Amt")
    amount, currency = money.amount(amount_el) if amount_el is not None else (None, "")
    indicator = kids.text("CdtDbtInd")
    sign = _sign(el, "CdtDbtInd", value=indicator) if indicator else None
    parties = kids.child("RltdPties")
    # The counterparty: the debtor of a credit, the creditor of a debit.
    if sign is Sign.DEBIT:
        name, acct = _party_name(_xml.child(parties, "Cdtr")), _xml.child(parties, "CdtrAcct")
    else:
        name, acct = _party_name(_xml.child(parties, "Dbtr")), _xml.child(parties, "DbtrAcct")
    rmt = kids.child("RmtInf")
    creditor_ref = ""
    unstructured: list[str] = []
    if rmt is not None:
        unstructured = [(u.text or "").strip() for u in _xml.children(rmt, "Ustrd")]
        for strd in _xml.children(rmt, "Strd"):
            creditor_ref = creditor_ref or _xml.text(strd, "CdtrRefInf", "Ref")
    rtr = kids.child("RtrInf")
    return TransactionDetail(
        references=References(
            end_to_end_id=refs.text("EndToEndId"),
            instruction_id=refs.text("InstrId"),
            transaction_id=refs.text("TxId"),
            account_servicer_ref=refs.text("AcctSvcrRef"),
            message_id=refs.text("MsgId"),
            payment_info_id=refs.text("PmtInfId"),
            uetr=refs.text("UETR"),
            mandate_id=refs.text("MndtId"),
            clearing_system_ref=refs.text("ClrSysRef"),
        ),
        amount_minor=amount,
        currency=currency,
        sign=sign,
        creditor_reference=creditor_ref,
        remittance=tuple(unstructured),
        return_reason=_xml.text(rtr, "Rsn", "Cd") or _xml.text(rtr, "Rsn", "Prtry"),
        counterparty_name=name,
        counterparty_account=_account_id(acct),
    )


# --------------------------------------------------------------------- writing


def write_camt053(
    statements: list[Statement], *, message_id: str, created_at: dt.datetime
) -> bytes:
    """End-of-day statements (camt.053.001.08); each needs its balances."""
    return _write("camt.053", statements, message_id, created_at)


def write_camt052(reports: list[Statement], *, message_id: str, created_at: dt.datetime) -> bytes:
    """Intraday account reports (camt.052.001.08); balances optional."""
    return _write("camt.052", reports, message_id, created_at)


def write_camt054(
    notifications: list[Statement], *, message_id: str, created_at: dt.datetime
) -> bytes:
    """Debit/credit notifications (camt.054.001.08), one per booking or a few;
    carries no balances."""
    return _write("camt.054", notifications, message_id, created_at)


def _iso(value: dt.datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("camt date-times are written with their UTC offset")
    return value.isoformat(timespec="seconds")


def _write(
    msg: str, statements: list[Statement], message_id: str, created_at: dt.datetime
) -> bytes:
    if not statements:
        raise refuse("FIELD_REQUIRED", "a camt message holds at least one statement", "statements")
    name = f"{msg}.001.{WRITE_VERSION}"
    b = _xml.Builder(f"{_xml.ISO_NS_PREFIX}{name}")
    root = b.root()
    top_name, stmt_name = _MESSAGES[msg]
    top = b.add(root, top_name)
    header = b.add(top, "GrpHdr")
    b.add(header, "MsgId", message_id)
    b.add(header, "CreDtTm", _iso(created_at))
    for stmt in statements:
        el = b.add(top, stmt_name)
        b.add(el, "Id", stmt.statement_id)
        if stmt.electronic_sequence is not None:
            b.add(el, "ElctrncSeqNb", str(stmt.electronic_sequence))
        if stmt.legal_sequence is not None:
            b.add(el, "LglSeqNb", str(stmt.legal_sequence))
        if stmt.created_at is not None:
            b.add(el, "CreDtTm", _iso(stmt.created_at))
        if stmt.from_date is not None and stmt.to_date is not None:
            period = b.add(el, "FrToDt")
            b.add(period, "FrDtTm", _iso(stmt.from_date))
            b.add(period, "ToDtTm", _iso(stmt.to_date))
        acct = b.add(el, "Acct")
        acct_id = b.add(acct, "Id")
        if stmt.account.iban:
            b.add(acct_id, "IBAN", stmt.account.iban)
        else:
            b.add(b.add(acct_id, "Othr"), "Id", stmt.account.other_id)
        b.opt(acct, "Ccy", stmt.account.currency)
        if stmt.account.servicer_bic:
            b.add(b.add(b.add(acct, "Svcr"), "FinInstnId"), "BICFI", stmt.account.servicer_bic)
        if msg != "camt.054":
            for bal in stmt.balances:
                _write_balance(b, el, bal)
        elif stmt.balances:
            raise refuse("FIELD_NOT_ALLOWED", "camt.054 carries no balances", "balances")
        for line in stmt.lines:
            _write_entry(b, el, line)
    _xml.validate(root, name)
    return _xml.serialize(root)


def _amount(b: _xml.Builder, parent: _El, name: str, minor: int, currency: str) -> None:
    b.add(parent, name, from_minor(minor, currency), Ccy=currency)


def _write_balance(b: _xml.Builder, parent: _El, bal: Balance) -> None:
    el = b.add(parent, "Bal")
    b.add(b.add(b.add(el, "Tp"), "CdOrPrtry"), "Cd", bal.type)
    _amount(b, el, "Amt", bal.amount_minor, bal.currency)
    b.add(el, "CdtDbtInd", bal.sign.value)
    b.add(b.add(el, "Dt"), "Dt", bal.date.isoformat())


def _write_entry(b: _xml.Builder, parent: _El, line: StatementLine) -> None:
    el = b.add(parent, "Ntry")
    b.opt(el, "NtryRef", line.entry_ref)
    _amount(b, el, "Amt", line.amount_minor, line.currency)
    b.add(el, "CdtDbtInd", line.sign.value)
    if line.reversal:
        b.add(el, "RvslInd", "true")
    b.add(b.add(el, "Sts"), "Cd", line.status.value)
    if line.booking_date:
        b.add(b.add(el, "BookgDt"), "Dt", line.booking_date.isoformat())
    if line.value_date:
        b.add(b.add(el, "ValDt"), "Dt", line.value_date.isoformat())
    b.opt(el, "AcctSvcrRef", line.account_servicer_ref)
    code = b.add(el, "BkTxCd")
    parts = line.bank_transaction_code.split("/")
    if len(parts) == 3 and all(parts):
        domain = b.add(code, "Domn")
        b.add(domain, "Cd", parts[0])
        family = b.add(domain, "Fmly")
        b.add(family, "Cd", parts[1])
        b.add(family, "SubFmlyCd", parts[2])
    elif line.bank_transaction_code:
        b.add(b.add(code, "Prtry"), "Cd", line.bank_transaction_code)
    if line.batch is not None or line.details:
        dtls = b.add(el, "NtryDtls")
        if line.batch is not None:
            _write_batch(b, dtls, line.batch)
        for detail in line.details:
            _write_detail(b, dtls, detail)
    b.opt(el, "AddtlNtryInf", line.additional_info)


def _write_batch(b: _xml.Builder, parent: _El, batch: Batch) -> None:
    el = b.add(parent, "Btch")
    b.opt(el, "MsgId", batch.message_id)
    b.opt(el, "PmtInfId", batch.payment_info_id)
    if batch.number_of_transactions is not None:
        b.add(el, "NbOfTxs", str(batch.number_of_transactions))
    if batch.total_minor is not None:
        _amount(b, el, "TtlAmt", batch.total_minor, batch.currency)
    if batch.sign is not None:
        b.add(el, "CdtDbtInd", batch.sign.value)


def _write_detail(b: _xml.Builder, parent: _El, d: TransactionDetail) -> None:
    el = b.add(parent, "TxDtls")
    r = d.references
    refs = b.add(el, "Refs")
    for name, value in (
        ("MsgId", r.message_id),
        ("AcctSvcrRef", r.account_servicer_ref),
        ("PmtInfId", r.payment_info_id),
        ("InstrId", r.instruction_id),
        ("EndToEndId", r.end_to_end_id),
        ("UETR", r.uetr),
        ("TxId", r.transaction_id),
        ("MndtId", r.mandate_id),
        ("ClrSysRef", r.clearing_system_ref),
    ):
        b.opt(refs, name, value)
    if d.amount_minor is not None:
        _amount(b, el, "Amt", d.amount_minor, d.currency)
    if d.sign is not None:
        b.add(el, "CdtDbtInd", d.sign.value)
    if d.counterparty_name or d.counterparty_account:
        parties = b.add(el, "RltdPties")
        role = "Cdtr" if d.sign is Sign.DEBIT else "Dbtr"
        if d.counterparty_name:
            b.add(b.add(b.add(parties, role), "Pty"), "Nm", d.counterparty_name)
        if d.counterparty_account:
            acct_id = b.add(b.add(parties, f"{role}Acct"), "Id")
            if re.fullmatch(r"[A-Z]{2}[0-9]{2}[A-Za-z0-9]{1,30}", d.counterparty_account):
                b.add(acct_id, "IBAN", d.counterparty_account)
            else:
                b.add(b.add(acct_id, "Othr"), "Id", d.counterparty_account)
    if d.remittance or d.creditor_reference:
        rmt = b.add(el, "RmtInf")
        for text in d.remittance:
            b.add(rmt, "Ustrd", text)
        if d.creditor_reference:
            b.add(b.add(b.add(rmt, "Strd"), "CdtrRefInf"), "Ref", d.creditor_reference)
    if d.return_reason:
        rsn = b.add(b.add(el, "RtrInf"), "Rsn")
        b.add(rsn, "Cd" if len(d.return_reason) <= 4 else "Prtry", d.return_reason)
