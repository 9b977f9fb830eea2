"""SWIFT MT940 customer statements: a strict reader and a writer.

Reading (`read_mt940`): the file is split into tags here, so every refusal
names its line (`line 12`); each tag's field grammar is the `mt-940`
package's (`mt940.tags`), and the values are normalized to the same
`statement.Statement` the camt reader returns. Optional SWIFT envelopes
(`{1:...}{2:...}{4:` ... `-}`) are removed; a file may hold several
statements. Required per statement: `:20:`, `:25:`, `:28C:`, `:60F:`/`:60M:`,
`:62F:`/`:62M:`, in order; `:61:` lines each with an optional `:86:`;
`:64:`/`:65:` and a closing `:86:` optional. All amounts of a statement must
be in its opening balance's currency (`CURRENCY_MIXED` otherwise).

Balances map to camt codes: `:60F:` OPBD, `:62F:` CLBD, `:60M:`/`:62M:` ITBD,
`:64:` CLAV, `:65:` FWAV. A `:61:` `RC` (reversal of a credit) is a debit and
`RD` a credit, both with `reversal=True`; its customer reference (unless
`NONREF`) becomes the end-to-end id, its bank reference the entry's
`account_servicer_ref`, the supplementary details `additional_info`.

`:86:` with SWIFT codewords (`/EREF/.../REMI/.../RTRN/...`) is read into
fields: EREF end-to-end id (overrides the 16-character `:61:` reference),
REMI unstructured remittance, CREF structured creditor reference, RTRN return
reason, NAME and IBAN the counterparty, PREF the batch's payment information
id, MARF the mandate id. Any other `:86:` is kept as unstructured remittance,
one item per line.

Writing (`write_mt940`) uses the same codewords, so write -> read gives the
same lines back for what MT940 can carry: one transaction per line (a line
with several `TxDtls` must go out as camt.053), text in the SWIFT character
set (transliterated), references without `/`.
"""

from __future__ import annotations

import datetime as dt
import re

import mt940 as mt940_lib
from anyascii import anyascii
from mt940.tags import Tags

from money_plane.formats._common import (
    check_currency,
    from_minor,
    refuse,
    to_minor,
)
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

MAX_FILE_BYTES = 64 * 1024 * 1024
_TAG = re.compile(r"^:(?P<tag>[0-9]{2}[A-Z]?):(?P<value>.*)$")
_CODEWORDS = ("EREF", "REMI", "CREF", "RTRN", "NAME", "IBAN", "PREF", "MARF")
_CODEWORD = re.compile(r"/(" + "|".join(_CODEWORDS) + r")/")
_SWIFT_X = re.compile(r"^[A-Za-z0-9/\-?:().,'+ ]*$")
_BALANCE_TYPES = {
    "60F": "OPBD",
    "60M": "ITBD",
    "62F": "CLBD",
    "62M": "ITBD",
    "64": "CLAV",
    "65": "FWAV",
}


# --------------------------------------------------------------------- reading


class _Tag:
    __slots__ = ("line", "name", "value")

    def __init__(self, name: str, value: str, line: int) -> None:
        self.name, self.value, self.line = name, value, line


def _tokenize(text: str) -> list[_Tag]:
    tags: list[_Tag] = []
    for n, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        stripped = line.strip()
        if not stripped or stripped in ("-", "-}"):
            continue
        if stripped.startswith("{"):
            # SWIFT envelope blocks; block 4 opens the text, "-}" closes it.
            if re.fullmatch(
                r"(\{[1-3]:[^{}]*(\{[^{}]*\})*\})*(\{4:)?", stripped
            ) or stripped.startswith("{5:"):
                continue
            raise refuse("LINE_INVALID", f"line {n} is not a SWIFT block header", f"line {n}")
        found = _TAG.match(line)
        if found:
            tags.append(_Tag(found["tag"], found["value"], n))
        elif tags:
            tags[-1].value += "\n" + line
        else:
            raise refuse("LINE_INVALID", f"line {n} is text before the first :20: tag", f"line {n}")
    return tags


def _parse(tag: _Tag, parser: Tags) -> dict[str, str | None]:
    try:
        parsed: dict[str, str | None] = parser.value.parse(
            mt940_lib.models.Transactions(), tag.value
        )
        return parsed
    except RuntimeError as exc:
        raise refuse(
            "FIELD_INVALID",
            f"line {tag.line}: the :{tag.name}: field does not follow the MT940 layout",
            f"line {tag.line}",
            tag=tag.name,
        ) from exc


def _yymmdd(year: str | None, month: str | None, day: str | None, where: str) -> dt.date:
    try:
        yy = int(year or "")
        return dt.date(2000 + yy if yy < 80 else 1900 + yy, int(month or ""), int(day or ""))
    except ValueError as exc:
        raise refuse("DATE_INVALID", f"{where}: not a valid YYMMDD date", where) from exc


def read_mt940(data: bytes, *, max_bytes: int = MAX_FILE_BYTES) -> StatementFile:
    """All statements of an MT940 file, or a refusal naming the line."""
    if len(data) > max_bytes:
        raise refuse("FILE_TOO_LARGE", f"the file is larger than {max_bytes} bytes", "file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    text = text.lstrip("\ufeff")
    tags = _tokenize(text)
    if not tags:
        raise refuse("FILE_UNREADABLE", "the file holds no MT940 tags", "line 1")
    groups: list[list[_Tag]] = []
    for tag in tags:
        if tag.name == "20" or not groups:
            groups.append([])
        groups[-1].append(tag)
    statements = [_statement(g) for g in groups]
    first = statements[0]
    return finish_file(
        StatementKind.MT940, "mt940", first.statement_id, None, statements, bytes(data)
    )


class _Reader:
    def __init__(self, tags: list[_Tag]) -> None:
        self.tags, self.i = tags, 0

    def peek(self) -> str:
        return self.tags[self.i].name if self.i < len(self.tags) else ""

    def take(self, *names: str) -> _Tag:
        if self.i >= len(self.tags):
            last = self.tags[-1].line if self.tags else 0
            raise refuse(
                "FILE_TRUNCATED",
                f"the statement ends after line {last} where :{names[0]}: was due",
                f"line {last + 1}",
            )
        tag = self.tags[self.i]
        if tag.name not in names:
            want = " or ".join(f":{n}:" for n in names)
            raise refuse(
                "TAG_UNEXPECTED",
                f"line {tag.line}: :{tag.name}: where {want} was due",
                f"line {tag.line}",
            )
        self.i += 1
        return tag


def _balance(tag: _Tag, currency: str) -> Balance:
    where = f"line {tag.line}"
    v = _parse(tag, Tags.FINAL_OPENING_BALANCE)
    ccy = check_currency((v["currency"] or "").upper(), where)
    if currency and ccy != currency:
        raise refuse(
            "CURRENCY_MIXED", f"{where} is in {ccy}, the statement is in {currency}", where
        )
    return Balance(
        type=_BALANCE_TYPES[tag.name],
        amount_minor=to_minor(v["amount"] or "", ccy, where),
        currency=ccy,
        sign=Sign.CREDIT if (v["status"] or "").upper() == "C" else Sign.DEBIT,
        date=_yymmdd(v["year"], v["month"], v["day"], where),
    )


def _statement(tags: list[_Tag]) -> Statement:
    r = _Reader(tags)
    ref = r.take("20")
    if r.peek() == "21":
        r.take("21")
    account = r.take("25")
    number = r.take("28C", "28")
    num = _parse(number, Tags.STATEMENT_NUMBER)
    opening = _balance(r.take("60F", "60M"), "")
    currency = opening.currency
    lines: list[StatementLine] = []
    while r.peek() == "61":
        line_tag = r.take("61")
        info = r.take("86") if r.peek() == "86" else None
        lines.append(_line(line_tag, info, currency))
    balances = [opening, _balance(r.take("62F", "62M"), currency)]
    while r.peek() in ("64", "65"):
        balances.append(_balance(r.take("64", "65"), currency))
    if r.peek() == "86":
        r.take("86")
    if r.i < len(tags):
        extra = tags[r.i]
        raise refuse(
            "TAG_UNEXPECTED",
            f"line {extra.line}: :{extra.name}: is out of place",
            f"line {extra.line}",
        )
    acct = account.value.strip()
    seq = num["statement_number"]
    return Statement(
        kind=StatementKind.MT940,
        statement_id=ref.value.strip(),
        account=Account(
            iban=acct if re.fullmatch(r"[A-Z]{2}[0-9]{2}[A-Z0-9]{10,30}", acct) else "",
            other_id="" if re.fullmatch(r"[A-Z]{2}[0-9]{2}[A-Z0-9]{10,30}", acct) else acct,
            currency=currency,
        ),
        lines=tuple(lines),
        balances=tuple(balances),
        electronic_sequence=int(seq) if seq else None,
        page=number.value.strip(),
    )


def _codewords(text: str) -> dict[str, str] | None:
    joined = text.replace("\n", "")
    if not _CODEWORD.match(joined):
        return None
    found: dict[str, str] = {}
    marks = list(_CODEWORD.finditer(joined))
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(joined)
        found[m[1]] = joined[m.end() : end].rstrip("/")
    return found


def _line(tag: _Tag, info: _Tag | None, currency: str) -> StatementLine:
    where = f"line {tag.line}"
    v = _parse(tag, Tags.STATEMENT)
    value_date = _yymmdd(v["year"], v["month"], v["day"], where)
    booking_date = value_date
    em, ed = (v["entry_month"] or "").strip(), (v["entry_day"] or "").strip()
    if em and ed:
        candidates = []
        for year in (value_date.year - 1, value_date.year, value_date.year + 1):
            try:
                candidates.append(dt.date(year, int(em), int(ed)))
            except ValueError:
                continue
        if not candidates:
            raise refuse("DATE_INVALID", f"{where}: entry date MMDD is not a date", where)
        booking_date = min(candidates, key=lambda d: abs((d - value_date).days))
    mark = (v["status"] or "").upper()
    sign = Sign.CREDIT if mark in ("C", "RD") else Sign.DEBIT
    customer_ref = (v["customer_reference"] or "").strip()
    refs = References(end_to_end_id="" if customer_ref.upper() == "NONREF" else customer_ref)
    detail = TransactionDetail(references=refs)
    batch: Batch | None = None
    if info is not None:
        words = _codewords(info.value)
        if words is None:
            lines = tuple(s.strip() for s in info.value.split("\n") if s.strip())
            detail = TransactionDetail(references=refs, remittance=lines)
        else:
            refs = References(
                end_to_end_id=words.get("EREF", refs.end_to_end_id),
                mandate_id=words.get("MARF", ""),
            )
            if words.get("PREF"):
                batch = Batch(payment_info_id=words["PREF"])
            detail = TransactionDetail(
                references=refs,
                creditor_reference=words.get("CREF", ""),
                remittance=(words["REMI"],) if words.get("REMI") else (),
                return_reason=words.get("RTRN", ""),
                counterparty_name=words.get("NAME", ""),
                counterparty_account=words.get("IBAN", ""),
            )
    return StatementLine(
        amount_minor=to_minor(v["amount"] or "", currency, where),
        currency=currency,
        sign=sign,
        status=EntryStatus.BOOKED,
        booking_date=booking_date,
        value_date=value_date,
        account_servicer_ref=(v["bank_reference"] or "").strip(),
        reversal=mark.startswith("R"),
        bank_transaction_code=(v["id"] or "").upper(),
        batch=batch,
        details=(detail,) if detail != TransactionDetail() else (),
        additional_info=(v["extra_details"] or "").strip(),
        source_path=where,
    )


# --------------------------------------------------------------------- writing


def swift_text(value: str) -> str:
    """Free text in the SWIFT X character set (transliterated, others blanked)."""
    ascii_text = anyascii(value)
    return "".join(c if _SWIFT_X.fullmatch(c) else " " for c in ascii_text)


def _ref(value: str, field: str, max_len: int) -> str:
    if len(value) > max_len or not _SWIFT_X.fullmatch(value) or "/" in value:
        raise refuse(
            "CHARSET_INVALID",
            f"{field} must be at most {max_len} SWIFT characters without '/'",
            field,
        )
    return value


def _amount(minor: int, currency: str) -> str:
    text = from_minor(minor, currency, ",")
    return text if "," in text else f"{text},"  # MT amounts always carry the comma


def _bal(tag: str, b: Balance) -> str:
    mark = "C" if b.sign is Sign.CREDIT else "D"
    return f":{tag}:{mark}{b.date:%y%m%d}{b.currency}{_amount(b.amount_minor, b.currency)}"


def _wrap(text: str, width: int = 65) -> list[str]:
    return [text[i : i + width] for i in range(0, len(text), width)] or [""]


def write_mt940(statements: list[Statement]) -> bytes:
    """MT940 text (CRLF lines, `-` between statements) for the sandbox bank."""
    out: list[str] = []
    for s_i, s in enumerate(statements):
        where = f"statements[{s_i}]"
        opening = s.opening_booked or next((b for b in s.balances if b.type == "ITBD"), None)
        closing = s.closing_booked or next(
            (b for b in reversed(s.balances) if b.type == "ITBD" and b is not opening), None
        )
        if opening is None or closing is None:
            raise refuse(
                "FIELD_REQUIRED",
                f"{where} needs an opening and a closing balance for MT940",
                f"{where}.balances",
            )
        currency = opening.currency
        out.append(f":20:{_ref(s.statement_id, f'{where}.statement_id', 16)}")
        out.append(f":25:{_ref(s.account.id, f'{where}.account', 35)}")
        out.append(f":28C:{s.page or (s.electronic_sequence or 1)}")
        out.append(_bal("60F" if opening.type == "OPBD" else "60M", opening))
        for l_i, line in enumerate(s.lines):
            out.extend(_write_line(line, currency, f"{where}.lines[{l_i}]"))
        out.append(_bal("62F" if closing.type == "CLBD" else "62M", closing))
        for b in s.balances:
            if b.type in ("CLAV", "FWAV"):
                out.append(_bal("64" if b.type == "CLAV" else "65", b))
        out.append("-")
    return ("\r\n".join(out) + "\r\n").encode("ascii")


def _write_line(line: StatementLine, currency: str, where: str) -> list[str]:
    if line.currency != currency:
        raise refuse(
            "CURRENCY_MIXED", f"{where} is not in the statement's {currency}", f"{where}.currency"
        )
    if len(line.details) > 1:
        raise refuse(
            "FIELD_NOT_ALLOWED",
            f"{where}: MT940 carries one transaction per line; send camt.053 for batch details",
            f"{where}.details",
        )
    if line.value_date is None:
        raise refuse(
            "FIELD_REQUIRED", f"{where}.value_date is required for MT940", f"{where}.value_date"
        )
    booking = line.booking_date or line.value_date
    if line.reversal:
        mark = "RD" if line.sign is Sign.CREDIT else "RC"
    else:
        mark = "C" if line.sign is Sign.CREDIT else "D"
    code = line.bank_transaction_code
    if not re.fullmatch(r"[A-Z][A-Z0-9]{3}", code):
        code = "NMSC"
    detail = line.details[0] if line.details else TransactionDetail()
    e2e = detail.references.end_to_end_id
    _ref(e2e, f"{where}.details[0].references.end_to_end_id", 35)
    customer = e2e if e2e and len(e2e) <= 16 else "NONREF"
    bank_ref = _ref(line.account_servicer_ref, f"{where}.account_servicer_ref", 16)
    amount = _amount(line.amount_minor, currency)
    first = f":61:{line.value_date:%y%m%d}{booking:%m%d}{mark}{amount}{code}{customer}"
    if bank_ref:
        first += f"//{bank_ref}"
    lines = [first]
    if line.additional_info:
        lines.append(swift_text(line.additional_info)[:34])
    words: list[tuple[str, str]] = [
        ("EREF", e2e),
        ("MARF", detail.references.mandate_id),
        ("PREF", line.batch.payment_info_id if line.batch else ""),
        ("RTRN", detail.return_reason),
        ("NAME", swift_text(detail.counterparty_name)),
        ("IBAN", detail.counterparty_account),
        ("CREF", detail.creditor_reference),
        ("REMI", swift_text(" ".join(detail.remittance))),
    ]
    for name, value in words:
        if value and name not in ("NAME", "REMI"):
            _ref(value, f"{where}.{name.lower()}", 35)
    info = "".join(f"/{name}/{value}" for name, value in words if value)
    if info:
        wrapped = _wrap(info)
        if len(wrapped) > 6:
            raise refuse(
                "FIELD_TOO_LONG",
                f"{where}: the :86: details exceed 6 lines of 65",
                f"{where}.details",
            )
        if any(_TAG.match(w) or w.strip() in ("-", "-}") for w in wrapped[1:]):
            raise refuse(
                "FIELD_INVALID",
                f"{where}: the :86: details would wrap into a line that reads as a tag",
                f"{where}.details",
            )
        lines.append(f":86:{wrapped[0]}")
        lines.extend(wrapped[1:])
    return lines
