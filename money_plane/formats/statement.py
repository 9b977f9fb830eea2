"""The one normalized statement model every statement format reads into.

A `StatementLine` is one booking on the account as the bank reports it (a camt
`Ntry`, an MT940 `:61:`), in minor units with a sign; its `details` are the
transactions inside it (camt `TxDtls`: one for a single payment, many for a
batch booking), each with every reference banks use. `batch` carries the
batch booking's own figures (`NbOfTxs`, total, `PmtInfId`).

Fingerprints, so an importer can tell a file or a line it has already seen:
- `StatementFile.file_sha256`: the bytes as received.
- `StatementFile.fingerprint`: the content (kind, account, statement ids,
  balances, line fingerprints), stable across re-encoding and whitespace.
- `StatementLine.fingerprint`: the booking's content (account, dates, amount,
  sign, currency, status, references, details) plus its occurrence number
  among identical bookings of the same statement, so a bank booking the same
  thing twice yields two fingerprints while re-importing a file yields the
  same ones. The statement id and file position are left out on purpose: the
  same booking reported intraday (camt.052) and at end of day (camt.053)
  has the same fingerprint.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import msgspec


class Sign(enum.StrEnum):
    CREDIT = "CRDT"
    DEBIT = "DBIT"


class EntryStatus(enum.StrEnum):
    BOOKED = "BOOK"
    PENDING = "PDNG"
    INFO = "INFO"
    FUTURE = "FUTR"


class StatementKind(enum.StrEnum):
    REPORT = "camt.052"  # intraday account report
    STATEMENT = "camt.053"  # end-of-day statement
    NOTIFICATION = "camt.054"  # debit/credit notification
    MT940 = "mt940"


@dataclass(frozen=True, slots=True)
class References:
    end_to_end_id: str = ""
    instruction_id: str = ""
    transaction_id: str = ""
    account_servicer_ref: str = ""
    message_id: str = ""
    payment_info_id: str = ""
    uetr: str = ""
    mandate_id: str = ""
    clearing_system_ref: str = ""


@dataclass(frozen=True, slots=True)
class TransactionDetail:
    references: References = References()
    amount_minor: int | None = None  # the transaction's own amount, where given
    currency: str = ""
    sign: Sign | None = None
    creditor_reference: str = ""  # structured (ISO 11649 RF / scheme reference)
    remittance: tuple[str, ...] = ()  # unstructured lines
    return_reason: str = ""  # ISO ExternalReturnReason1Code (AC04, ...) or proprietary
    counterparty_name: str = ""
    counterparty_account: str = ""


@dataclass(frozen=True, slots=True)
class Batch:
    number_of_transactions: int | None = None
    total_minor: int | None = None
    currency: str = ""
    sign: Sign | None = None
    message_id: str = ""
    payment_info_id: str = ""


@dataclass(frozen=True, slots=True)
class StatementLine:
    amount_minor: int  # unsigned; `sign` says which way
    currency: str
    sign: Sign
    status: EntryStatus
    booking_date: dt.date | None
    value_date: dt.date | None
    account_servicer_ref: str = ""  # the entry's own AcctSvcrRef / MT940 bank reference
    entry_ref: str = ""  # camt NtryRef
    reversal: bool = False
    bank_transaction_code: str = ""  # DOMAIN/FAMILY/SUBFAMILY, or proprietary / MT940 type
    batch: Batch | None = None
    details: tuple[TransactionDetail, ...] = ()
    additional_info: str = ""
    source_path: str = ""  # element path or "line N" of the booking in its file
    fingerprint: str = ""

    @property
    def signed_minor(self) -> int:
        return self.amount_minor if self.sign is Sign.CREDIT else -self.amount_minor

    @property
    def end_to_end_ids(self) -> tuple[str, ...]:
        return tuple(d.references.end_to_end_id for d in self.details if d.references.end_to_end_id)

    @property
    def return_reason(self) -> str:
        return next((d.return_reason for d in self.details if d.return_reason), "")


@dataclass(frozen=True, slots=True)
class Balance:
    type: str  # OPBD, CLBD, ITBD, CLAV, FWAV, PRCD, OPAV, ...
    amount_minor: int
    currency: str
    sign: Sign
    date: dt.date

    @property
    def signed_minor(self) -> int:
        return self.amount_minor if self.sign is Sign.CREDIT else -self.amount_minor


@dataclass(frozen=True, slots=True)
class Account:
    iban: str = ""
    other_id: str = ""
    currency: str = ""
    servicer_bic: str = ""

    @property
    def id(self) -> str:
        return self.iban or self.other_id


@dataclass(frozen=True, slots=True)
class Statement:
    kind: StatementKind
    statement_id: str
    account: Account
    lines: tuple[StatementLine, ...]
    balances: tuple[Balance, ...] = ()
    electronic_sequence: int | None = None
    legal_sequence: int | None = None
    page: str = ""  # MT940 :28C: statement number/sequence as written
    created_at: dt.datetime | None = None
    from_date: dt.datetime | None = None
    to_date: dt.datetime | None = None

    def balance(self, type_code: str) -> Balance | None:
        return next((b for b in self.balances if b.type == type_code), None)

    @property
    def opening_booked(self) -> Balance | None:
        return self.balance("OPBD") or self.balance("PRCD")

    @property
    def closing_booked(self) -> Balance | None:
        return self.balance("CLBD")

    @property
    def booked_movement_minor(self) -> int:
        """The net of the booked lines (pending and information lines left out)."""
        return sum(line.signed_minor for line in self.lines if line.status is EntryStatus.BOOKED)

    def balances_agree(self) -> bool | None:
        """Whether opening booked + booked lines = closing booked; None when the
        statement carries no such pair (a camt.054, most camt.052). A statement
        that does not add up is read all the same: it is the reconciler's break
        to raise, not a file error."""
        opening, closing = self.opening_booked, self.closing_booked
        if opening is None or closing is None:
            return None
        return opening.signed_minor + self.booked_movement_minor == closing.signed_minor


@dataclass(frozen=True, slots=True)
class StatementFile:
    kind: StatementKind
    message_name: str  # "camt.053.001.08", "mt940"
    message_id: str
    created_at: dt.datetime | None
    statements: tuple[Statement, ...]
    file_sha256: str = ""
    fingerprint: str = ""

    @property
    def lines(self) -> tuple[StatementLine, ...]:
        return tuple(line for s in self.statements for line in s.lines)


# Canonical JSON: keys and dataclass fields sorted, dates ISO, enums by value.
# Changing a model's fields changes the fingerprints; bump the prefix when so.
_CANON = msgspec.json.Encoder(order="sorted")
_VERSION = b"triplane-statement-v1:"


def _digest(obj: Any) -> str:
    return hashlib.sha256(_VERSION + _CANON.encode(obj)).hexdigest()


_LINE_FIELDS = tuple(f.name for f in dataclasses.fields(StatementLine))


def _unplaced(line: StatementLine) -> dict[str, Any]:
    """The line without where it sits in its file (not part of its content),
    as the fields the canonical encoder writes of it: the same bytes as the
    line copied with those two emptied, for a quarter of the copy's cost."""
    content = {name: getattr(line, name) for name in _LINE_FIELDS}
    content["source_path"] = ""
    content["fingerprint"] = ""
    return content


def fingerprint_statement(statement: Statement) -> Statement:
    """The statement with each line's fingerprint set (see the module doc)."""
    seen: Counter[str] = Counter()
    lines = []
    for line in statement.lines:
        base = _digest({"account": statement.account.id, "line": _unplaced(line)})
        seen[base] += 1
        fp = hashlib.sha256(f"{base}#{seen[base]}".encode()).hexdigest()
        lines.append(dataclasses.replace(line, fingerprint=fp))
    return dataclasses.replace(statement, lines=tuple(lines))


def finish_file(
    kind: StatementKind,
    message_name: str,
    message_id: str,
    created_at: dt.datetime | None,
    statements: list[Statement],
    raw: bytes,
) -> StatementFile:
    fingerprinted = tuple(fingerprint_statement(s) for s in statements)
    content = {
        "kind": kind.value,
        "message_id": message_id,
        "statements": [
            {
                "id": s.statement_id,
                "account": s.account.id,
                "seq": [s.electronic_sequence, s.legal_sequence, s.page],
                "balances": s.balances,
                "lines": [line.fingerprint for line in s.lines],
            }
            for s in fingerprinted
        ],
    }
    return StatementFile(
        kind=kind,
        message_name=message_name,
        message_id=message_id,
        created_at=created_at,
        statements=fingerprinted,
        file_sha256=hashlib.sha256(raw).hexdigest(),
        fingerprint=_digest(content),
    )
