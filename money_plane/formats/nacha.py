"""NACHA (ACH) files: the origination writer, a return-file writer for the
sandbox bank, and a strict reader with return (addenda 99) and notification
of change (addenda 98) extraction.

No maintained Python NACHA library exists, so this follows the NACHA
Operating Rules' record layouts (Appendix Three) directly. Every record is 94
characters; a file is

    1 file header, then per batch: 5 batch header, 6 entry detail (each
    followed by its 7 addenda), 8 batch control; then 9 file control, then
    records of 94 "9"s up to a multiple of 10 records (blocking factor 10).

Layouts (1-based positions):

- File header `1`: 2-3 priority `01`, 4-13 immediate destination (` ` + 9-digit
  routing), 14-23 immediate origin, 24-29 creation date YYMMDD, 30-33 time
  HHMM, 34 file id modifier, 35-37 record size `094`, 38-39 blocking factor
  `10`, 40 format code `1`, 41-63 destination name, 64-86 origin name, 87-94
  reference code.
- Batch header `5`: 2-4 service class (`220` credits, `225` debits, `200`
  mixed), 5-20 company name, 21-40 company discretionary data, 41-50 company
  identification, 51-53 SEC code, 54-63 entry description, 64-69 company
  descriptive date, 70-75 effective entry date YYMMDD, 76-78 settlement date
  (Julian, blank: the ACH operator fills it), 79 originator status `1`, 80-87
  ODFI routing (8), 88-94 batch number.
- Entry detail `6`: 2-3 transaction code, 4-11 RDFI routing (8), 12 check
  digit, 13-29 DFI account number, 30-39 amount in cents, 40-54
  identification number, 55-76 name, 77-78 discretionary data, 79 addenda
  indicator, 80-94 trace number (ODFI routing 8 + sequence 7).
- Addenda `7`: type `05` (2-3), 4-83 payment related information, 84-87
  addenda sequence, 88-94 entry detail sequence. Type `99` (return): 4-6
  return reason code, 7-21 original entry trace, 22-27 date of death, 28-35
  original RDFI, 36-79 addenda information, 80-94 trace. Type `98`
  (notification of change): 4-6 change code, 7-21 original trace, 28-35
  original RDFI, 36-64 corrected data, 80-94 trace.
- Batch control `8`: 2-4 service class, 5-10 entry/addenda count, 11-20 entry
  hash, 21-32 total debits, 33-44 total credits (cents), 45-54 company
  identification, 55-73 message authentication code, 74-79 reserved, 80-87
  ODFI routing, 88-94 batch number.
- File control `9`: 2-7 batch count, 8-13 block count, 14-21 entry/addenda
  count, 22-31 entry hash, 32-43 total debits, 44-55 total credits, 56-94
  reserved.

Entry hash: the sum of the entries' 8-digit RDFI routing numbers, its last 10
digits.

Same-day ACH (`AchBatch.same_day`): the effective entry date must be the file
creation date (a later date is a future-dated batch, an earlier one stale),
no entry may exceed the same-day per-payment limit ($1,000,000.00), and the
company descriptive date carries `SD` + the intended settlement time (`SD1300`,
`SD1700`, `SD1800`, the three same-day windows, Eastern time), the convention
ODFIs accept. A batch that is not same-day must have an effective entry date
after the creation date (an entry dated today and submitted before a same-day
cut-off would settle same-day and pay the same-day fee). Weekends are refused;
holidays are the settlement calendar's business, which this module does not
know.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from dataclasses import dataclass, field

from anyascii import anyascii

from money_plane.formats._common import refuse, require
from money_plane.formats.beneficiary import AccountType, UsBankAccount, validate_routing_number

RECORD_SIZE = 94
BLOCKING_FACTOR = 10
SAME_DAY_LIMIT_MINOR = 100_000_000  # $1,000,000.00 per payment
SAME_DAY_WINDOWS = ("1300", "1700", "1800")
MAX_ENTRY_MINOR = 9_999_999_999  # the 10-digit amount field


class SecCode(enum.StrEnum):
    PPD = "PPD"  # prearranged payment and deposit (consumer accounts)
    CCD = "CCD"  # corporate credit or debit (business accounts)


# Return reasons (NACHA Operating Rules, Appendix Four), the common ones.
RETURN_REASONS: dict[str, str] = {
    "R01": "Insufficient funds",
    "R02": "Account closed",
    "R03": "No account / unable to locate account",
    "R04": "Invalid account number structure",
    "R05": "Unauthorized debit to consumer account using corporate SEC code",
    "R06": "Returned per ODFI's request",
    "R07": "Authorization revoked by customer",
    "R08": "Payment stopped",
    "R09": "Uncollected funds",
    "R10": "Customer advises originator is not known and/or not authorized",
    "R11": "Customer advises entry not in accordance with the terms of the authorization",
    "R12": "Account sold to another DFI",
    "R13": "Invalid ACH routing number",
    "R14": "Representative payee deceased or unable to continue in that capacity",
    "R15": "Beneficiary or account holder deceased",
    "R16": "Account frozen / entry returned per OFAC instruction",
    "R17": "File record edit criteria / entry with invalid account number",
    "R20": "Non-transaction account",
    "R23": "Credit entry refused by receiver",
    "R24": "Duplicate entry",
    "R29": "Corporate customer advises not authorized",
    "R31": "Permissible return entry (CCD and CTX only)",
    "R61": "Misrouted return",
    "R67": "Duplicate return",
    "R68": "Untimely return",
    "R69": "Field error(s)",
    "R70": "Permissible return entry not accepted / return not requested by ODFI",
    "R80": "IAT entry coding error",
    "R85": "Incorrectly coded outbound international payment",
}

_ALLOWED = re.compile(r"^[\x20-\x7E]*$")
_RETURN_CODE = re.compile(r"^R[0-9]{2}$")


# --------------------------------------------------------------------- fields


def _alpha(value: str, width: int) -> str:
    """Upper-case, printable ASCII, left-justified, space-filled, cut to width."""
    text = anyascii(value).upper()
    text = "".join(c if _ALLOWED.fullmatch(c) else " " for c in text)
    return text[:width].ljust(width)


def _exact(value: str, width: int, name: str) -> str:
    """An identifier: never cut (refused when too long), left-justified."""
    if len(value) > width or not _ALLOWED.fullmatch(value):
        raise refuse(
            "FIELD_TOO_LONG" if len(value) > width else "CHARSET_INVALID",
            f"{name} must be at most {width} printable ASCII characters",
            name,
        )
    return value.upper().ljust(width)


def _num(value: int, width: int, name: str = "") -> str:
    text = str(value)
    if value < 0 or len(text) > width:
        raise refuse(
            "FIELD_TOO_LONG", f"{name or 'a numeric field'} does not fit {width} digits", name
        )
    return text.zfill(width)


def _record(*parts: str) -> str:
    line = "".join(parts)
    assert len(line) == RECORD_SIZE, (len(line), line)
    return line


def entry_hash(rdfi_routings: list[str]) -> str:
    """Sum of the 8-digit RDFI identifications, last 10 digits."""
    return str(sum(int(r[:8]) for r in rdfi_routings))[-10:].zfill(10)


# --------------------------------------------------------------------- writer


@dataclass(frozen=True, slots=True)
class AchEntry:
    account: UsBankAccount
    amount_minor: int  # cents
    name: str  # individual name (PPD) / receiving company name (CCD), 22
    identification: str = ""  # individual / identification number, 15
    discretionary_data: str = ""  # 2
    payment_info: str = ""  # one addenda 05, up to 80 characters
    prenote: bool = False  # zero-dollar prenotification (codes 23 / 33)


@dataclass(frozen=True, slots=True)
class AchBatch:
    sec_code: SecCode
    company_name: str  # 16
    company_id: str  # 10, e.g. "1" + EIN
    entry_description: str  # 10, shown to the receiver ("PAYOUT")
    effective_date: dt.date
    entries: tuple[AchEntry, ...]
    same_day: bool = False
    same_day_window: str = "1300"  # SD settlement time, Eastern: 1300, 1700, 1800
    company_discretionary_data: str = ""  # 20


@dataclass(frozen=True, slots=True)
class WrittenAchFile:
    data: bytes
    trace_numbers: tuple[str, ...]  # one per entry, in file order
    entry_hash: str
    total_credit_minor: int
    total_debit_minor: int


def _transaction_code(entry: AchEntry) -> int:
    savings = entry.account.account_type is AccountType.SAVINGS
    if entry.prenote:
        return 33 if savings else 23
    return 32 if savings else 22


def _check_batch(b: AchBatch, created: dt.date, where: str) -> None:
    require(b.company_name, f"{where}.company_name")
    require(b.company_id, f"{where}.company_id")
    require(b.entry_description, f"{where}.entry_description")
    if not b.entries:
        raise refuse("FIELD_REQUIRED", f"{where}.entries is empty", f"{where}.entries")
    if b.effective_date.weekday() >= 5:
        raise refuse(
            "EFFECTIVE_DATE_INVALID",
            f"{where}.effective_date falls on a weekend, when ACH does not settle",
            f"{where}.effective_date",
        )
    if b.same_day:
        if b.effective_date != created:
            raise refuse(
                "EFFECTIVE_DATE_INVALID",
                f"{where}.effective_date must be the file creation date for same-day ACH",
                f"{where}.effective_date",
            )
        if b.same_day_window not in SAME_DAY_WINDOWS:
            raise refuse(
                "SAME_DAY_WINDOW_INVALID",
                f"{where}.same_day_window must be one of {', '.join(SAME_DAY_WINDOWS)}",
                f"{where}.same_day_window",
            )
    elif b.effective_date <= created:
        raise refuse(
            "EFFECTIVE_DATE_INVALID",
            f"{where}.effective_date must be after the file creation date unless the batch "
            "is same-day",
            f"{where}.effective_date",
        )
    for i, e in enumerate(b.entries):
        ewhere = f"{where}.entries[{i}]"
        require(e.name, f"{ewhere}.name")
        if e.prenote and e.amount_minor != 0:
            raise refuse(
                "AMOUNT_INVALID", f"{ewhere}: a prenote carries no amount", f"{ewhere}.amount_minor"
            )
        if not e.prenote and e.amount_minor <= 0:
            raise refuse(
                "AMOUNT_INVALID", f"{ewhere}.amount_minor must be above 0", f"{ewhere}.amount_minor"
            )
        if e.amount_minor > MAX_ENTRY_MINOR:
            raise refuse(
                "AMOUNT_INVALID",
                f"{ewhere}.amount_minor does not fit the 10-digit field",
                f"{ewhere}.amount_minor",
            )
        if b.same_day and e.amount_minor > SAME_DAY_LIMIT_MINOR:
            raise refuse(
                "AMOUNT_OVER_LIMIT",
                f"{ewhere}.amount_minor is above the same-day ACH limit of $1,000,000.00",
                f"{ewhere}.amount_minor",
            )
        if len(e.payment_info) > 80:
            raise refuse(
                "FIELD_TOO_LONG",
                f"{ewhere}.payment_info is longer than 80",
                f"{ewhere}.payment_info",
            )


def _file_header(
    destination: str,
    origin: str,
    created_at: dt.datetime,
    modifier: str,
    destination_name: str,
    origin_name: str,
    reference_code: str,
) -> str:
    return _record(
        "1",
        "01",
        " " + destination,
        origin.rjust(10),
        created_at.strftime("%y%m%d"),
        created_at.strftime("%H%M"),
        modifier,
        "094",
        "10",
        "1",
        _alpha(destination_name, 23),
        _alpha(origin_name, 23),
        _alpha(reference_code, 8),
    )


def _finish(
    lines: list[str], batch_count: int, count: int, hashes: list[str], debit: int, credit: int
) -> bytes:
    blocks = -(-(len(lines) + 1) // BLOCKING_FACTOR)
    lines.append(
        _record(
            "9",
            _num(batch_count, 6, "batch count"),
            _num(blocks, 6, "block count"),
            _num(count, 8, "entry/addenda count"),
            entry_hash(hashes),
            _num(debit, 12, "total debits"),
            _num(credit, 12, "total credits"),
            " " * 39,
        )
    )
    while len(lines) % BLOCKING_FACTOR:
        lines.append("9" * RECORD_SIZE)
    return ("\n".join(lines) + "\n").encode("ascii")


def write_nacha(
    batches: list[AchBatch],
    *,
    immediate_destination: str,
    immediate_origin: str,
    odfi_routing: str,
    created_at: dt.datetime,
    destination_name: str = "",
    origin_name: str = "",
    file_id_modifier: str = "A",
    reference_code: str = "",
    first_trace_sequence: int = 1,
) -> WrittenAchFile:
    """An ACH origination file of PPD/CCD credit batches (service class 220).

    `immediate_destination` is the receiving point's routing number (the ODFI
    or the ACH operator), `immediate_origin` the originator's 10-character id
    at it (often the ODFI routing number or "1" + EIN), `odfi_routing` the
    bank that originates (the first 8 digits start every trace number).
    Trace numbers run from `first_trace_sequence` through the file; keep them
    unique per ODFI and day (the caller owns the counter)."""
    validate_routing_number(immediate_destination, "immediate_destination")
    validate_routing_number(odfi_routing, "odfi_routing")
    require(immediate_origin, "immediate_origin")
    _exact(immediate_origin, 10, "immediate_origin")
    if not re.fullmatch(r"[A-Z0-9]", file_id_modifier):
        raise refuse("FIELD_INVALID", "file_id_modifier is one of A-Z, 0-9", "file_id_modifier")
    if not batches:
        raise refuse("FIELD_REQUIRED", "a file holds at least one batch", "batches")
    created = created_at.date()
    for i, b in enumerate(batches):
        _check_batch(b, created, f"batches[{i}]")
    odfi8 = odfi_routing[:8]
    lines = [
        _file_header(
            immediate_destination,
            immediate_origin,
            created_at,
            file_id_modifier,
            destination_name,
            origin_name,
            reference_code,
        )
    ]
    traces: list[str] = []
    sequence = first_trace_sequence
    file_hashes: list[str] = []
    file_count = 0
    file_credit = 0
    for number, b in enumerate(batches, start=1):
        where = f"batches[{number - 1}]"
        descriptive = f"SD{b.same_day_window}" if b.same_day else ""
        lines.append(
            _record(
                "5",
                "220",
                _alpha(b.company_name, 16),
                _alpha(b.company_discretionary_data, 20),
                _exact(b.company_id, 10, f"{where}.company_id"),
                b.sec_code.value,
                _alpha(b.entry_description, 10),
                _alpha(descriptive, 6),
                b.effective_date.strftime("%y%m%d"),
                "   ",
                "1",
                odfi8,
                _num(number, 7, "batch number"),
            )
        )
        count = 0
        hashes: list[str] = []
        credit = 0
        for i, e in enumerate(b.entries):
            ewhere = f"{where}.entries[{i}]"
            trace = odfi8 + _num(sequence, 7, f"{ewhere} trace sequence")
            sequence += 1
            traces.append(trace)
            routing = e.account.routing_number
            lines.append(
                _record(
                    "6",
                    str(_transaction_code(e)),
                    routing[:8],
                    routing[8],
                    _exact(e.account.account_number, 17, f"{ewhere}.account.account_number"),
                    _num(e.amount_minor, 10, f"{ewhere}.amount_minor"),
                    _exact(e.identification, 15, f"{ewhere}.identification"),
                    _alpha(e.name, 22),
                    _alpha(e.discretionary_data, 2),
                    "1" if e.payment_info else "0",
                    trace,
                )
            )
            count += 1
            hashes.append(routing)
            credit += e.amount_minor
            if e.payment_info:
                lines.append(_record("7", "05", _alpha(e.payment_info, 80), "0001", trace[-7:]))
                count += 1
        lines.append(
            _record(
                "8",
                "220",
                _num(count, 6, "entry/addenda count"),
                entry_hash(hashes),
                _num(0, 12),
                _num(credit, 12, f"{where} total credits"),
                _exact(b.company_id, 10, f"{where}.company_id"),
                " " * 19,
                " " * 6,
                odfi8,
                _num(number, 7),
            )
        )
        file_hashes.extend(hashes)
        file_count += count
        file_credit += credit
    data = _finish(lines, len(batches), file_count, file_hashes, 0, file_credit)
    return WrittenAchFile(
        data=data,
        trace_numbers=tuple(traces),
        entry_hash=entry_hash(file_hashes),
        total_credit_minor=file_credit,
        total_debit_minor=0,
    )


@dataclass(frozen=True, slots=True)
class ReturnToWrite:
    """One entry the RDFI sends back (for the sandbox bank)."""

    original: AchEntry
    original_trace: str  # 15 digits
    reason_code: str  # R01, R03, ...
    addenda_info: str = ""


def write_ach_returns(
    returns: list[ReturnToWrite],
    *,
    rdfi_routing: str,
    odfi_routing: str,
    original_sec_code: SecCode,
    company_name: str,
    company_id: str,
    created_at: dt.datetime,
    first_trace_sequence: int = 1,
) -> bytes:
    """A return file as an RDFI (the sandbox bank) sends it back to the ODFI:
    one batch of return entries of returned credits (transaction codes 21 /
    31, the original amount), each with its addenda 99."""
    validate_routing_number(rdfi_routing, "rdfi_routing")
    validate_routing_number(odfi_routing, "odfi_routing")
    if not returns:
        raise refuse("FIELD_REQUIRED", "a return file holds at least one return", "returns")
    for i, r in enumerate(returns):
        if not _RETURN_CODE.fullmatch(r.reason_code):
            raise refuse(
                "RETURN_REASON_INVALID",
                f"returns[{i}].reason_code is not Rnn",
                f"returns[{i}].reason_code",
            )
        if not re.fullmatch(r"[0-9]{15}", r.original_trace):
            raise refuse(
                "TRACE_NUMBER_INVALID",
                f"returns[{i}].original_trace is not 15 digits",
                f"returns[{i}].original_trace",
            )
    rdfi8 = rdfi_routing[:8]
    today = created_at.date()
    lines = [_file_header(odfi_routing, " " + rdfi_routing, created_at, "A", "", "", "")]
    lines.append(
        _record(
            "5",
            "220",
            _alpha(company_name, 16),
            " " * 20,
            _exact(company_id, 10, "company_id"),
            original_sec_code.value,
            _alpha("RETURN", 10),
            " " * 6,
            today.strftime("%y%m%d"),
            "   ",
            "1",
            rdfi8,
            _num(1, 7),
        )
    )
    hashes: list[str] = []
    count = 0
    credit = 0
    for i, r in enumerate(returns):
        trace = rdfi8 + _num(first_trace_sequence + i, 7, "trace sequence")
        e = r.original
        savings = e.account.account_type is AccountType.SAVINGS
        routing = e.account.routing_number
        # The return entry is addressed to the ODFI (its routing), carrying the
        # receiver's account as it was.
        lines.append(
            _record(
                "6",
                "31" if savings else "21",
                odfi_routing[:8],
                odfi_routing[8],
                _exact(e.account.account_number, 17, f"returns[{i}].account_number"),
                _num(e.amount_minor, 10),
                _exact(e.identification, 15, f"returns[{i}].identification"),
                _alpha(e.name, 22),
                _alpha(e.discretionary_data, 2),
                "1",
                trace,
            )
        )
        lines.append(
            _record(
                "7",
                "99",
                r.reason_code,
                r.original_trace,
                " " * 6,
                routing[:8],
                _alpha(r.addenda_info, 44),
                trace,
            )
        )
        hashes.append(odfi_routing)
        count += 2
        credit += e.amount_minor
    lines.append(
        _record(
            "8",
            "220",
            _num(count, 6),
            entry_hash(hashes),
            _num(0, 12),
            _num(credit, 12),
            _exact(company_id, 10, "company_id"),
            " " * 19,
            " " * 6,
            rdfi8,
            _num(1, 7),
        )
    )
    return _finish(lines, 1, count, hashes, 0, credit)


# --------------------------------------------------------------------- reader


@dataclass(frozen=True, slots=True)
class AchAddenda:
    type_code: str  # "05", "98", "99"
    payment_info: str = ""  # type 05
    reason_code: str = ""  # type 99: R01...; type 98: change code C01...
    original_trace: str = ""
    original_rdfi: str = ""
    date_of_death: dt.date | None = None
    info: str = ""  # type 99 addenda information / type 98 corrected data
    trace_number: str = ""
    line: int = 0


@dataclass(frozen=True, slots=True)
class AchEntryRecord:
    transaction_code: str
    rdfi_routing: str  # 8 digits + check digit
    account_number: str
    amount_minor: int
    identification: str
    name: str
    discretionary_data: str
    trace_number: str
    addenda: tuple[AchAddenda, ...]
    line: int

    @property
    def is_credit(self) -> bool:
        return self.transaction_code[1] in "01234"

    @property
    def return_addenda(self) -> AchAddenda | None:
        return next((a for a in self.addenda if a.type_code == "99"), None)

    @property
    def change_addenda(self) -> AchAddenda | None:
        return next((a for a in self.addenda if a.type_code == "98"), None)


@dataclass(frozen=True, slots=True)
class AchBatchRecord:
    service_class: str
    company_name: str
    company_discretionary_data: str
    company_id: str
    sec_code: str
    entry_description: str
    descriptive_date: str
    effective_date: dt.date | None
    settlement_julian: str
    odfi: str
    batch_number: int
    entries: tuple[AchEntryRecord, ...]
    line: int

    @property
    def same_day(self) -> bool:
        return self.descriptive_date.startswith("SD")


@dataclass(frozen=True, slots=True)
class AchFile:
    immediate_destination: str
    immediate_origin: str
    created_at: dt.datetime
    file_id_modifier: str
    destination_name: str
    origin_name: str
    reference_code: str
    batches: tuple[AchBatchRecord, ...] = field(default=())
    entry_hash: str = ""
    total_debit_minor: int = 0
    total_credit_minor: int = 0


@dataclass(frozen=True, slots=True)
class AchReturn:
    """A returned entry: what was returned, why, and the original to match."""

    reason_code: str
    reason: str  # description, "" for a code not in RETURN_REASONS
    original_trace: str
    original_rdfi: str
    amount_minor: int
    account_number: str
    name: str
    identification: str
    transaction_code: str
    trace_number: str
    company_id: str
    sec_code: str
    effective_date: dt.date | None
    date_of_death: dt.date | None
    addenda_info: str
    line: int


@dataclass(frozen=True, slots=True)
class AchChange:
    """A notification of change (addenda 98): correct the beneficiary."""

    change_code: str  # C01 account number, C02 routing, C03 both, C05 tx code, ...
    original_trace: str
    original_rdfi: str
    corrected_data: str
    trace_number: str
    line: int


class _Cursor:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.i = 0

    def peek(self) -> str:
        return self.lines[self.i][0] if self.i < len(self.lines) else ""

    def take(self, kind: str, what: str) -> tuple[int, str]:
        if self.i >= len(self.lines):
            raise refuse(
                "FILE_TRUNCATED",
                f"the file ends where a {what} record was due",
                f"line {self.i + 1}",
            )
        line = self.lines[self.i]
        if line[0] != kind:
            raise refuse(
                "RECORD_UNEXPECTED",
                f"line {self.i + 1} is a type {line[0]} record where a {what} "
                f"(type {kind}) was due",
                f"line {self.i + 1}",
                positions="1-1",
            )
        self.i += 1
        return self.i, line


def _cut(line: str, start: int, end: int) -> str:
    return line[start - 1 : end]


def _digits(line: str, n: int, start: int, end: int, name: str) -> int:
    value = _cut(line, start, end)
    if not value.isdigit():
        raise refuse(
            "FIELD_INVALID",
            f"line {n} positions {start}-{end} ({name}) must be digits",
            f"line {n}",
            positions=f"{start}-{end}",
            name=name,
        )
    return int(value)


def _yymmdd(line: str, n: int, start: int, name: str, *, blank_ok: bool = False) -> dt.date | None:
    value = _cut(line, start, start + 5)
    if blank_ok and not value.strip():
        return None
    try:
        return dt.datetime.strptime(value, "%y%m%d").date()
    except ValueError as exc:
        raise refuse(
            "DATE_INVALID",
            f"line {n} positions {start}-{start + 5} ({name}) is not a YYMMDD date",
            f"line {n}",
            positions=f"{start}-{start + 5}",
            name=name,
        ) from exc


def _mismatch(n: int, start: int, end: int, name: str, found: str, expected: str) -> None:
    if found != expected:
        raise refuse(
            "CONTROL_TOTAL_MISMATCH",
            f"line {n} positions {start}-{end} ({name}) says {found}, the records add up "
            f"to {expected}",
            f"line {n}",
            positions=f"{start}-{end}",
            name=name,
        )


def _split(data: bytes) -> list[str]:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        bad = data[: exc.start].count(b"\n") + 1
        raise refuse(
            "CHARSET_INVALID", f"line {bad} holds a non-ASCII byte", f"line {bad}"
        ) from exc
    if "\n" in text or "\r" in text:
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        while lines and not lines[-1]:
            lines.pop()
    else:  # one unbroken stream of 94-character records
        lines = [text[i : i + RECORD_SIZE] for i in range(0, len(text), RECORD_SIZE)]
    if not lines:
        raise refuse("FILE_UNREADABLE", "the file is empty", "line 1")
    for n, line in enumerate(lines, start=1):
        if len(line) != RECORD_SIZE:
            raise refuse(
                "RECORD_LENGTH_INVALID",
                f"line {n} is {len(line)} characters, not {RECORD_SIZE}",
                f"line {n}",
            )
    return lines


def read_nacha(data: bytes, *, max_bytes: int = 64 * 1024 * 1024) -> AchFile:
    """A NACHA file, checked record by record (types, order, digits, dates)
    and against its own controls (counts, entry hashes, totals, block
    count); refused naming the line and positions otherwise."""
    if len(data) > max_bytes:
        raise refuse("FILE_TOO_LARGE", f"the file is larger than {max_bytes} bytes", "file")
    lines = _split(data)
    cur = _Cursor(lines)
    n, hdr = cur.take("1", "file header")
    if _cut(hdr, 35, 37) != "094":
        raise refuse(
            "FIELD_INVALID",
            "line 1 positions 35-37 (record size) must be 094",
            "line 1",
            positions="35-37",
        )
    created_date = _yymmdd(hdr, n, 24, "file creation date")
    hhmm = _cut(hdr, 30, 33)
    time = (
        dt.time(int(hhmm[:2]), int(hhmm[2:]))
        if re.fullmatch(r"([01][0-9]|2[0-3])[0-5][0-9]", hhmm)
        else dt.time()
    )
    assert created_date is not None
    batches: list[AchBatchRecord] = []
    file_hashes: list[str] = []
    file_count = debit_total = credit_total = 0
    while cur.peek() == "5":
        bn, bh = cur.take("5", "batch header")
        entries: list[AchEntryRecord] = []
        count = debit = credit = 0
        hashes: list[str] = []
        while cur.peek() == "6":
            en, ed = cur.take("6", "entry detail")
            code = _cut(ed, 2, 3)
            amount = _digits(ed, en, 30, 39, "amount")
            _digits(ed, en, 4, 12, "receiving DFI identification")
            addenda: list[AchAddenda] = []
            while cur.peek() == "7":
                an, ad = cur.take("7", "addenda")
                addenda.append(_addenda(ad, an))
            if _cut(ed, 79, 79) == "1" and not addenda:
                raise refuse(
                    "RECORD_MISSING",
                    f"line {en} announces an addenda record that does not follow",
                    f"line {en}",
                    positions="79-79",
                )
            entries.append(
                AchEntryRecord(
                    transaction_code=code,
                    rdfi_routing=_cut(ed, 4, 12),
                    account_number=_cut(ed, 13, 29).strip(),
                    amount_minor=amount,
                    identification=_cut(ed, 40, 54).strip(),
                    name=_cut(ed, 55, 76).strip(),
                    discretionary_data=_cut(ed, 77, 78).strip(),
                    trace_number=_cut(ed, 80, 94),
                    addenda=tuple(addenda),
                    line=en,
                )
            )
            count += 1 + len(addenda)
            hashes.append(_cut(ed, 4, 11))
            if code[1] in "01234":
                credit += amount
            else:
                debit += amount
        cn, bc = cur.take("8", "batch control")
        _mismatch(cn, 5, 10, "entry/addenda count", _cut(bc, 5, 10), _num(count, 6))
        _mismatch(cn, 11, 20, "entry hash", _cut(bc, 11, 20), entry_hash(hashes))
        _mismatch(cn, 21, 32, "total debits", _cut(bc, 21, 32), _num(debit, 12))
        _mismatch(cn, 33, 44, "total credits", _cut(bc, 33, 44), _num(credit, 12))
        _mismatch(cn, 88, 94, "batch number", _cut(bc, 88, 94), _cut(bh, 88, 94))
        batches.append(
            AchBatchRecord(
                service_class=_cut(bh, 2, 4),
                company_name=_cut(bh, 5, 20).strip(),
                company_discretionary_data=_cut(bh, 21, 40).strip(),
                company_id=_cut(bh, 41, 50).strip(),
                sec_code=_cut(bh, 51, 53),
                entry_description=_cut(bh, 54, 63).strip(),
                descriptive_date=_cut(bh, 64, 69).strip(),
                effective_date=_yymmdd(bh, bn, 70, "effective entry date", blank_ok=True),
                settlement_julian=_cut(bh, 76, 78).strip(),
                odfi=_cut(bh, 80, 87),
                batch_number=_digits(bh, bn, 88, 94, "batch number"),
                entries=tuple(entries),
                line=bn,
            )
        )
        file_hashes.extend(hashes)
        file_count += count
        debit_total += debit
        credit_total += credit
    fn, fc = cur.take("9", "file control")
    _mismatch(fn, 2, 7, "batch count", _cut(fc, 2, 7), _num(len(batches), 6))
    _mismatch(fn, 14, 21, "entry/addenda count", _cut(fc, 14, 21), _num(file_count, 8))
    _mismatch(fn, 22, 31, "entry hash", _cut(fc, 22, 31), entry_hash(file_hashes))
    _mismatch(fn, 32, 43, "total debits", _cut(fc, 32, 43), _num(debit_total, 12))
    _mismatch(fn, 44, 55, "total credits", _cut(fc, 44, 55), _num(credit_total, 12))
    for pn in range(cur.i, len(lines)):
        if lines[pn] != "9" * RECORD_SIZE:
            raise refuse(
                "RECORD_UNEXPECTED",
                f"line {pn + 1} follows the file control but is not 9-filler",
                f"line {pn + 1}",
            )
    blocks = -(-len(lines) // BLOCKING_FACTOR)
    _mismatch(fn, 8, 13, "block count", _cut(fc, 8, 13), _num(blocks, 6))
    return AchFile(
        immediate_destination=_cut(hdr, 4, 13).strip(),
        immediate_origin=_cut(hdr, 14, 23).strip(),
        created_at=dt.datetime.combine(created_date, time),
        file_id_modifier=_cut(hdr, 34, 34),
        destination_name=_cut(hdr, 41, 63).strip(),
        origin_name=_cut(hdr, 64, 86).strip(),
        reference_code=_cut(hdr, 87, 94).strip(),
        batches=tuple(batches),
        entry_hash=entry_hash(file_hashes),
        total_debit_minor=debit_total,
        total_credit_minor=credit_total,
    )


def _addenda(line: str, n: int) -> AchAddenda:
    kind = _cut(line, 2, 3)
    if kind == "99":
        code = _cut(line, 4, 6)
        if not _RETURN_CODE.fullmatch(code):
            raise refuse(
                "RETURN_REASON_INVALID",
                f"line {n} positions 4-6 is not a return reason code (Rnn)",
                f"line {n}",
                positions="4-6",
            )
        return AchAddenda(
            type_code=kind,
            reason_code=code,
            original_trace=_cut(line, 7, 21),
            date_of_death=_yymmdd(line, n, 22, "date of death", blank_ok=True),
            original_rdfi=_cut(line, 28, 35),
            info=_cut(line, 36, 79).strip(),
            trace_number=_cut(line, 80, 94),
            line=n,
        )
    if kind == "98":
        return AchAddenda(
            type_code=kind,
            reason_code=_cut(line, 4, 6),
            original_trace=_cut(line, 7, 21),
            original_rdfi=_cut(line, 28, 35),
            info=_cut(line, 36, 64).strip(),
            trace_number=_cut(line, 80, 94),
            line=n,
        )
    if kind == "05":
        return AchAddenda(type_code=kind, payment_info=_cut(line, 4, 83).strip(), line=n)
    raise refuse(
        "FIELD_INVALID",
        f"line {n} positions 2-3: addenda type {kind!r} is not 05, 98 or 99",
        f"line {n}",
        positions="2-3",
    )


def ach_returns(file: AchFile) -> list[AchReturn]:
    """Every returned entry (addenda 99) of a read NACHA file."""
    out: list[AchReturn] = []
    for b in file.batches:
        for e in b.entries:
            a = e.return_addenda
            if a is None:
                continue
            out.append(
                AchReturn(
                    reason_code=a.reason_code,
                    reason=RETURN_REASONS.get(a.reason_code, ""),
                    original_trace=a.original_trace,
                    original_rdfi=a.original_rdfi,
                    amount_minor=e.amount_minor,
                    account_number=e.account_number,
                    name=e.name,
                    identification=e.identification,
                    transaction_code=e.transaction_code,
                    trace_number=e.trace_number,
                    company_id=b.company_id,
                    sec_code=b.sec_code,
                    effective_date=b.effective_date,
                    date_of_death=a.date_of_death,
                    addenda_info=a.info,
                    line=a.line,
                )
            )
    return out


def ach_changes(file: AchFile) -> list[AchChange]:
    """Every notification of change (addenda 98, entry code 21/31 with amount 0)."""
    return [
        AchChange(
            change_code=a.reason_code,
            original_trace=a.original_trace,
            original_rdfi=a.original_rdfi,
            corrected_data=a.info,
            trace_number=a.trace_number,
            line=a.line,
        )
        for b in file.batches
        for e in b.entries
        if (a := e.change_addenda) is not None
    ]


def read_ach_returns(data: bytes) -> list[AchReturn]:
    """The return entries of a NACHA return file (all or nothing)."""
    return ach_returns(read_nacha(data))
