"""Reconciliation's records: expected payments, matches, breaks.

Directions are the bank's: `credit` is money into the tenant's account at the
bank (a camt `CRDT` booking), `debit` money out. The ledger's bank account
mirrors the bank as an asset: a bank credit is a debit posting of it, and its
balance as the bank sees it is debits - credits.

Dates are calendar days (ISO `YYYY-MM-DD`, compared as text), the bank's
booking and value dates; times are microseconds.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
from dataclasses import dataclass, field


class Direction(enum.StrEnum):
    CREDIT = "credit"  # into the account at the bank
    DEBIT = "debit"  # out of it


class BreakClass(enum.StrEnum):
    # A bank line that nothing expected and nothing in the ledger explains.
    UNMATCHED_BANK = "unmatched_bank"
    # An expected payment the bank has not booked by the end of its date
    # window plus the grace window.
    UNMATCHED_LEDGER = "unmatched_ledger"
    # Matched by reference, but the amount is outside the expected bounds
    # (and the tolerance), or a batch's lines do not add up to its total.
    AMOUNT_MISMATCH = "amount_mismatch"
    # A second bank line for something already matched.
    DUPLICATE = "duplicate"
    # The bank returned the payment (a return reason, or a reversal).
    RETURNED = "returned"
    # Matched, but booked after the expected window plus the grace window.
    LATE = "late"
    # A statement whose balances do not add up, or disagree with the ledger.
    BALANCE_MISMATCH = "balance_mismatch"
    # A bank booking of a payment whose expected payment was withdrawn
    # (cancelled: its payout failed, or the rail returned it, before the bank
    # booked it): the bank moved money the ledger has already given back.
    BOOKED_AFTER_CANCEL = "booked_after_cancel"


class BreakState(enum.StrEnum):
    OPEN = "open"
    RESOLVED = "resolved"


class Resolution(enum.StrEnum):
    MANUAL_MATCH = "manual_match"
    WRITE_OFF = "write_off"
    REVERSAL = "reversal"
    # Acknowledged with no ledger change (e.g. a late booking, now matched).
    ACCEPTED = "accepted"


class ExpectedState(enum.StrEnum):
    OPEN = "open"
    MATCHED = "matched"
    RETURNED = "returned"
    # Its window and grace passed without a bank line (a break says so);
    # a line arriving later still matches it, as late.
    OVERDUE = "overdue"
    # Withdrawn before the bank booked it (its payout failed or was returned
    # by the rail): it no longer ages into an unmatched_ledger break.
    CANCELLED = "cancelled"


# How a match was made, strongest first.
class Rule(enum.StrEnum):
    END_TO_END = "end_to_end_id"
    INSTRUCTION_ID = "instruction_id"
    BANK_REFERENCE = "account_servicer_ref"
    REMITTANCE = "structured_remittance"
    BATCH = "batch"
    AMOUNT_DATE = "amount_date_window"
    LEDGER_REFERENCE = "ledger_reference"
    LEDGER_AMOUNT_DATE = "ledger_amount_date_window"
    MANUAL = "manual"


CONFIDENCE = {
    Rule.END_TO_END: 1.0,
    Rule.INSTRUCTION_ID: 0.95,
    Rule.BANK_REFERENCE: 0.95,
    Rule.REMITTANCE: 0.9,
    Rule.BATCH: 0.9,
    Rule.LEDGER_REFERENCE: 0.95,
    Rule.MANUAL: 1.0,
}


def iso(day: dt.date | None) -> str:
    return day.isoformat() if day is not None else ""


@functools.lru_cache(maxsize=4096)
def shift(day: str, days: int) -> str:
    return (dt.date.fromisoformat(day) + dt.timedelta(days=days)).isoformat()


@dataclass(frozen=True, slots=True)
class ExpectedPayment:
    tenant_id: str
    expected_id: str
    ledger_account_id: str
    direction: Direction
    currency: str
    amount_minor: int
    amount_min_minor: int
    amount_max_minor: int
    date_from: str
    date_to: str
    end_to_end_id: str = ""
    instruction_id: str = ""
    bank_reference: str = ""
    remittance_reference: str = ""
    batch_id: str = ""  # PmtInfId of the batch it travels in
    ledger_entry_id: str = ""  # the ledger entry that moved it, when known
    description: str = ""
    state: ExpectedState = ExpectedState.OPEN
    created_at_us: int = 0


@dataclass(frozen=True, slots=True)
class Line:
    """A statement line as stored and matched (the format's StatementLine
    flattened: the references matching reads, the batch figures)."""

    tenant_id: str
    fingerprint: str
    statement_id: str
    ledger_account_id: str
    position: int
    amount_minor: int  # unsigned
    currency: str
    direction: Direction
    booking_date: str
    value_date: str
    status: str
    end_to_end_id: str = ""
    instruction_id: str = ""
    bank_reference: str = ""
    remittance_reference: str = ""
    batch_id: str = ""
    batch_count: int | None = None
    return_reason: str = ""
    reversal: bool = False
    # (end_to_end_id, instruction_id, remittance_reference, amount_minor or -1)
    # of each transaction inside a batch booking.
    details: tuple[tuple[str, str, str, int], ...] = ()
    source_path: str = ""

    @property
    def day(self) -> str:
        return self.booking_date or self.value_date


@dataclass(frozen=True, slots=True)
class Match:
    tenant_id: str
    match_id: str
    rule: Rule
    confidence: float
    line_fingerprints: tuple[str, ...]
    expected_ids: tuple[str, ...] = ()
    entry_ids: tuple[str, ...] = ()
    actor: str = "matcher"
    created_at_us: int = 0


@dataclass(frozen=True, slots=True)
class Break:
    tenant_id: str
    break_id: str
    break_class: BreakClass
    amount_minor: int  # the amount at stake (unsigned), for the SLA tier
    currency: str
    ledger_account_id: str
    detected_at_us: int
    owner: str
    reason: str
    # Which way the bank moved money the ledger lacks (what a write-off books).
    direction: Direction = Direction.CREDIT
    line_fingerprint: str = ""
    expected_id: str = ""
    statement_id: str = ""
    state: BreakState = BreakState.OPEN
    resolution: str = ""
    resolved_by: str = ""
    resolved_at_us: int = 0
    resolution_entry_id: str = ""
    note: str = ""
    # The key that keeps one cause from raising two breaks (a re-import, a
    # second sweep): unique per tenant.
    cause: str = ""


@dataclass(frozen=True, slots=True)
class StatementRecord:
    tenant_id: str
    statement_id: str
    file_sha256: str
    file_fingerprint: str
    kind: str
    message_name: str
    bank_statement_id: str
    bank_account: str
    ledger_account_id: str
    currency: str
    line_count: int
    new_line_count: int
    opening_minor: int | None
    closing_minor: int | None
    closing_date: str
    balances_agree: bool | None
    ledger_closing_minor: int | None
    imported_at_us: int
    imported_by: str


@dataclass
class ImportResult:
    statements: list[StatementRecord] = field(default_factory=list)
    duplicate_file: bool = False
    lines_read: int = 0
    lines_new: int = 0
    matches: list[Match] = field(default_factory=list)
    breaks: list[Break] = field(default_factory=list)
