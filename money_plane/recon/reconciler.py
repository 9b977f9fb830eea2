"""Reconciliation: statements imported and matched as they arrive.

`Reconciler.import_statement` reads a camt.052/053/054 or MT940 file
(money_plane/formats, which refuses a file it cannot read whole, naming the
element or line), and in one transaction of the ledger's database stores its
statements and new lines, matches them, raises breaks and writes a break
event per new break to the ledger's outbox (relayed to NATS). Importing the
same file again (same bytes, or the same content re-encoded) adds nothing;
a booking already imported from another file (the intraday report, then the
end-of-day statement) is one line.

Matching, per new booked line, strongest rule first:
1. references against expected payments: EndToEndId, then InstrId, the
   bank's reference (AcctSvcrRef), the structured creditor reference;
   a batch booking against its transactions' references or its PmtInfId
   (one line, many payments); several lines of one import carrying one
   payment's reference that add up to it (many lines, one payment);
2. amount and date windows against open expected payments of the account
   (bounds +- `amount_tolerance_minor`, window +- `date_window_days`);
3. the ledger's own postings of the bank account: by the entry's
   idempotency key = the line's EndToEndId or InstrId, then by amount and
   posting date.
Every match records its rule and a confidence. What cannot be matched, or
matches wrongly, is a break (model.BreakClass).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec

from money_plane.domain import Command, Kind, Side, check_id, check_tenant_id
from money_plane.formats.camt import read_camt
from money_plane.formats.mt940 import read_mt940
from money_plane.formats.statement import EntryStatus, Sign, Statement, StatementFile
from money_plane.formats.statement import StatementLine as FormatLine
from money_plane.ledger import Ledger
from money_plane.recon.model import (
    CONFIDENCE,
    Break,
    BreakClass,
    BreakState,
    Direction,
    ExpectedPayment,
    ExpectedState,
    ImportResult,
    Line,
    Match,
    Resolution,
    Rule,
    StatementRecord,
    iso,
    shift,
)
from money_plane.recon.store import ReconStore, Tx
from triplane.runtime.bus import OutgoingEvent
from triplane.runtime.clock import Clock
from triplane.runtime.config import ReconConfig
from triplane.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    error_for,
)
from triplane.runtime.tasks import every

log = logging.getLogger("triplane.money.recon")

BreakEncoder = Callable[[Break, int], OutgoingEvent]
# The cause of an unmatched_ledger break of a bank posting, before its entry id.
POSTING_CAUSE = "unmatched-posting:"
_DAY_US = 86_400_000_000
_MATCHABLE = (ExpectedState.OPEN, ExpectedState.OVERDUE)
_LEDGER_RULES = (Rule.LEDGER_REFERENCE, Rule.LEDGER_AMOUNT_DATE)
_BOOKED = EntryStatus.BOOKED.value
_STATUS_VALUES = {status: status.value for status in EntryStatus}
_COLUMNS = {
    "e2e": "end_to_end_id",
    "instr": "instruction_id",
    "bank": "bank_reference",
    "remit": "remittance_reference",
    "batch": "batch_id",
}
_REFERENCE_RULES = (
    ("e2e", Rule.END_TO_END),
    ("instr", Rule.INSTRUCTION_ID),
    ("bank", Rule.BANK_REFERENCE),
    ("remit", Rule.REMITTANCE),
)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def break_id_for(tenant_id: str, cause: str) -> str:
    return f"brk_{_digest(tenant_id, cause)}"


def _day_end_us(day: str) -> int:
    start = dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC)
    return int(start.timestamp()) * 1_000_000 + _DAY_US - 1


def _day_of_us(at_us: int) -> str:
    return dt.datetime.fromtimestamp(at_us / 1e6, dt.UTC).date().isoformat()


@functools.lru_cache(maxsize=1024)
def _iso_day(day: dt.date) -> str:
    """A booking day as text (a file's lines share a few days)."""
    return day.isoformat()


def _check_break_filters(tenant_id: str, state: str, break_class: str) -> None:
    check_tenant_id(tenant_id)
    if state and state not in {s.value for s in BreakState}:
        raise InvalidArgument("BREAK_STATE_INVALID", f"unknown state {state!r}", "state")
    if break_class and break_class not in {c.value for c in BreakClass}:
        raise InvalidArgument(
            "BREAK_CLASS_INVALID", f"unknown break class {break_class!r}", "break_class"
        )


def read_statement_file(data: bytes, max_bytes: int) -> StatementFile:
    """A camt file (XML) or an MT940 file, by its first character."""
    head = data[:64].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"<"):
        return read_camt(data, max_bytes=max_bytes)
    return read_mt940(data, max_bytes=max_bytes)


def _refs(kind: str, line: Line) -> list[str]:
    if kind == "e2e":
        return [line.end_to_end_id]
    if kind == "instr":
        return [line.instruction_id]
    if kind == "bank":
        return [line.bank_reference]
    return [line.remittance_reference]


def normalize(
    tenant_id: str,
    statement_id: str,
    ledger_account_id: str,
    currency: str,
    statement: Statement,
    offset: int,
) -> list[Line]:
    """The statement's lines as matched and stored; a line in another
    currency than the ledger account's refuses the file, naming the line."""
    lines: list[Line] = []
    for index, fl in enumerate(statement.lines):
        if fl.currency != currency:
            raise InvalidArgument(
                "STATEMENT_CURRENCY_MISMATCH",
                f"a line is in {fl.currency}, the ledger account in {currency}",
                fl.source_path or f"statements[{offset}].lines[{index}]",
            )
        lines.append(_line(tenant_id, statement_id, ledger_account_id, fl, index))
    return lines


def _line(
    tenant_id: str, statement_id: str, ledger_account_id: str, fl: FormatLine, position: int
) -> Line:
    details = fl.details
    batch = fl.batch
    first = details[0] if len(details) == 1 else None
    refs = first.references if first is not None else None
    is_batch = batch is not None or len(details) > 1
    batch_id = ""
    if is_batch:
        batch_id = batch.payment_info_id if batch is not None else ""
        if not batch_id:
            batch_id = next(
                (d.references.payment_info_id for d in details if d.references.payment_info_id),
                "",
            )
    booking, value = fl.booking_date, fl.value_date
    return Line(
        tenant_id=tenant_id,
        fingerprint=fl.fingerprint,
        statement_id=statement_id,
        ledger_account_id=ledger_account_id,
        position=position,
        amount_minor=fl.amount_minor,
        currency=fl.currency,
        direction=Direction.CREDIT if fl.sign is Sign.CREDIT else Direction.DEBIT,
        booking_date=_iso_day(booking) if booking is not None else "",
        value_date=_iso_day(value) if value is not None else "",
        status=_STATUS_VALUES[fl.status],
        end_to_end_id=refs.end_to_end_id if refs else "",
        instruction_id=refs.instruction_id if refs else "",
        bank_reference=fl.account_servicer_ref or (refs.account_servicer_ref if refs else ""),
        remittance_reference=first.creditor_reference if first is not None else "",
        batch_id=batch_id,
        batch_count=batch.number_of_transactions if batch is not None else None,
        # A batch booking with one transaction returned inside it is a batch
        # booking; a return is a booking of its own (its one transaction's
        # reason: a line that is no batch has at most one).
        return_reason="" if is_batch or first is None else first.return_reason,
        reversal=fl.reversal,
        details=tuple(
            [
                (
                    d.references.end_to_end_id,
                    d.references.instruction_id,
                    d.creditor_reference,
                    -1 if d.amount_minor is None else d.amount_minor,
                )
                for d in details
            ]
        )
        if is_batch
        else (),
        source_path=fl.source_path,
    )


@dataclass
class _Work:
    """What one matching pass decided, written in its transaction."""

    matches: list[Match] = field(default_factory=list)
    breaks: list[Break] = field(default_factory=list)
    match_of_line: dict[str, str] = field(default_factory=dict)
    expected_changes: dict[str, tuple[ExpectedState, str]] = field(default_factory=dict)
    taken_entries: set[str] = field(default_factory=set)
    resolved_causes: list[str] = field(default_factory=list)
    # (statement id, closing, closing day, its digest, currency) of the
    # statements whose closing balance is checked against the ledger.
    ledger_checks: list[tuple[str, int, str, str, str]] = field(default_factory=list)


class _Matcher:
    def __init__(
        self,
        tx: Tx,
        config: ReconConfig,
        tenant_id: str,
        ledger_account_id: str,
        now_us: int,
        work: _Work,
    ) -> None:
        self.tx = tx
        self.config = config
        self.tenant_id = tenant_id
        self.account = ledger_account_id
        self.now_us = now_us
        self.work = work
        self.expected: dict[str, ExpectedPayment] = {}
        self.by_ref: dict[str, dict[str, list[ExpectedPayment]]] = {}

    # ---- helpers ----

    def state(self, e: ExpectedPayment) -> ExpectedState:
        change = self.work.expected_changes.get(e.expected_id)
        return change[0] if change else e.state

    def owner(self, cls: BreakClass) -> str:
        return self.config.owners.get(cls.value, self.config.default_owner)

    def add_break(
        self,
        cls: BreakClass,
        cause: str,
        amount_minor: int,
        currency: str,
        direction: Direction,
        reason: str,
        line: Line | None = None,
        expected_id: str = "",
        statement_id: str = "",
    ) -> None:
        self.work.breaks.append(
            Break(
                tenant_id=self.tenant_id,
                break_id=break_id_for(self.tenant_id, cause),
                break_class=cls,
                amount_minor=amount_minor,
                currency=currency,
                ledger_account_id=self.account,
                detected_at_us=self.now_us,
                owner=self.owner(cls),
                reason=reason,
                direction=direction,
                line_fingerprint=line.fingerprint if line else "",
                expected_id=expected_id,
                statement_id=statement_id or (line.statement_id if line else ""),
                cause=cause,
            )
        )

    def add_match(
        self,
        rule: Rule,
        confidence: float,
        lines: Sequence[Line],
        expected: Sequence[ExpectedPayment] = (),
        entry_id: str = "",
    ) -> Match:
        work = self.work
        fps = tuple([line.fingerprint for line in lines])
        entries = tuple([e.ledger_entry_id for e in expected if e.ledger_entry_id])
        if entry_id:
            entries = (entry_id, *entries)
        match_id = f"mch_{_digest(self.tenant_id, *fps)}"
        match = Match(
            tenant_id=self.tenant_id,
            match_id=match_id,
            rule=rule,
            confidence=confidence,
            line_fingerprints=fps,
            expected_ids=tuple([e.expected_id for e in expected]),
            entry_ids=entries,
            created_at_us=self.now_us,
        )
        work.matches.append(match)
        for fp in fps:
            work.match_of_line[fp] = match_id
        matched = (ExpectedState.MATCHED, match_id)
        for e in expected:
            if e.state is ExpectedState.OVERDUE:
                work.resolved_causes.append(f"unmatched:{e.expected_id}")
            work.expected_changes[e.expected_id] = matched
        if entries:
            work.taken_entries.update(entries)
        return match

    def load_references(self, lines: Sequence[Line]) -> None:
        """The expected payments the lines' references name: end-to-end ids
        first, then the other references of only the lines (and batch
        transactions) no end-to-end id resolved, as `resolve` reads them."""
        e2e: set[str] = set()
        for line in lines:
            e2e.add(line.end_to_end_id)
            e2e.update(detail[0] for detail in line.details)
        self._load("e2e", e2e)
        found = self.by_ref["e2e"]
        wanted: dict[str, set[str]] = {k: set() for k in ("instr", "bank", "remit", "batch")}
        for line in lines:
            if line.batch_id:
                wanted["batch"].add(line.batch_id)
            for d_e2e, instr, remit, _ in line.details:
                if d_e2e not in found:
                    wanted["instr"].add(instr)
                    wanted["remit"].add(remit)
            if line.end_to_end_id not in found:
                wanted["instr"].add(line.instruction_id)
                wanted["bank"].add(line.bank_reference)
                wanted["remit"].add(line.remittance_reference)
        for kind, values in wanted.items():
            self._load(kind, values)

    def _load(self, kind: str, values: set[str]) -> None:
        column = _COLUMNS[kind]
        index: dict[str, list[ExpectedPayment]] = {}
        values.discard("")
        if values:
            for e in self.tx.expected_by(self.tenant_id, kind, values):
                if e.ledger_account_id != self.account:
                    continue
                self.expected.setdefault(e.expected_id, e)
                index.setdefault(getattr(e, column), []).append(e)
        self.by_ref[kind] = index

    def find(self, kind: str, value: str) -> ExpectedPayment | None:
        if not value:
            return None
        found = self.by_ref.get(kind, {}).get(value, [])
        return self.expected[found[0].expected_id] if found else None

    def resolve(self, line: Line) -> tuple[Rule, ExpectedPayment] | None:
        for kind, rule in _REFERENCE_RULES:
            for value in _refs(kind, line):
                e = self.find(kind, value)
                if e is not None:
                    return rule, e
        return None

    def in_bounds(self, amount: int, e: ExpectedPayment) -> bool:
        tol = self.config.amount_tolerance_minor
        return e.amount_min_minor - tol <= amount <= e.amount_max_minor + tol

    # ---- the passes ----

    def run(self, lines: Sequence[Line]) -> None:
        booked = [line for line in lines if line.status == _BOOKED]
        if not booked:
            return
        self.load_references(booked)
        resolved: dict[str, tuple[Rule, ExpectedPayment] | None] = {}
        groups: dict[str, list[Line]] = {}
        for line in booked:
            if line.return_reason or line.reversal or line.details:
                continue
            found = self.resolve(line)
            resolved[line.fingerprint] = found
            if found is not None:
                groups.setdefault(found[1].expected_id, []).append(line)
        grouped: set[str] = set()
        for expected_id, members in groups.items():
            e = self.expected[expected_id]
            if len(members) < 2 or self.state(e) not in _MATCHABLE:
                continue
            total = sum(m.amount_minor for m in members)
            if self.in_bounds(total, e) and not any(
                self.in_bounds(m.amount_minor, e) for m in members
            ):
                rule = resolved[members[0].fingerprint][0]  # type: ignore[index]
                self.add_match(rule, CONFIDENCE[rule] * 0.9, members, [e])
                self.check_late(members[-1], e)
                grouped.update(m.fingerprint for m in members)
        unmatched: list[Line] = []
        for line in booked:
            if line.fingerprint in grouped:
                continue
            if line.return_reason or line.reversal:
                self.returned(line)
            elif line.details or line.batch_id:
                if not self.batch(line):
                    unmatched.append(line)
            elif not self.single(line, resolved.get(line.fingerprint)):
                unmatched.append(line)
        still = [line for line in unmatched if not self.by_amount(line)]
        self.ledger(still)

    def returned(self, line: Line) -> None:
        found = self.resolve(line)
        e = found[1] if found else None
        if e is not None:
            match_id = self.add_match(found[0], CONFIDENCE[found[0]], [line]).match_id  # type: ignore[index]
            self.work.expected_changes[e.expected_id] = (ExpectedState.RETURNED, match_id)
        self.add_break(
            BreakClass.RETURNED,
            f"returned:{line.fingerprint}",
            line.amount_minor,
            line.currency,
            line.direction,
            f"returned by the bank ({line.return_reason or 'reversal'})",
            line,
            e.expected_id if e else "",
        )

    def single(self, line: Line, found: tuple[Rule, ExpectedPayment] | None) -> bool:
        if found is None:
            return False
        rule, e = found
        if self.state(e) is ExpectedState.CANCELLED:
            self.booked_after_cancel(line, e, f"expected payment {e.expected_id} ({rule.value})")
            return True
        if self.state(e) not in _MATCHABLE:
            self.add_break(
                BreakClass.DUPLICATE,
                f"duplicate:{line.fingerprint}",
                line.amount_minor,
                line.currency,
                line.direction,
                f"a second booking of expected payment {e.expected_id} ({rule.value})",
                line,
                e.expected_id,
            )
            return True
        self.add_match(rule, CONFIDENCE[rule], [line], [e])
        if e.direction is not line.direction or e.currency != line.currency:
            self.add_break(
                BreakClass.AMOUNT_MISMATCH,
                f"amount:{line.fingerprint}",
                line.amount_minor + e.amount_minor,
                line.currency,
                line.direction,
                f"booked as {line.direction.value} {line.currency}, expected "
                f"{e.direction.value} {e.currency}",
                line,
                e.expected_id,
            )
        elif not self.in_bounds(line.amount_minor, e):
            diff = line.amount_minor - e.amount_minor
            self.add_break(
                BreakClass.AMOUNT_MISMATCH,
                f"amount:{line.fingerprint}",
                abs(diff),
                line.currency,
                line.direction if diff > 0 else _other(line.direction),
                f"booked {line.amount_minor}, expected {e.amount_min_minor}..{e.amount_max_minor}",
                line,
                e.expected_id,
            )
        self.check_late(line, e)
        return True

    def booked_after_cancel(self, line: Line, e: ExpectedPayment, what: str) -> None:
        """The bank booked a payment after its expected payment was withdrawn
        (the payout failed or came back from its rail first): the line stays
        unmatched and the break names the expected payment."""
        self.add_break(
            BreakClass.BOOKED_AFTER_CANCEL,
            f"booked-after-cancel:{line.fingerprint}",
            line.amount_minor,
            line.currency,
            line.direction,
            f"booked after its payment was cancelled: {what}",
            line,
            e.expected_id,
        )

    def check_late(self, line: Line, e: ExpectedPayment) -> None:
        due = shift(e.date_to, self.config.grace_days)
        if line.day and line.day > due:
            self.add_break(
                BreakClass.LATE,
                f"late:{e.expected_id}",
                e.amount_minor,
                line.currency,
                line.direction,
                f"booked {line.day}, expected by {e.date_to} (+{self.config.grace_days} d grace)",
                line,
                e.expected_id,
            )

    def batch(self, line: Line) -> bool:
        members: list[ExpectedPayment] = []
        rule = Rule.BATCH
        if line.details:
            for e2e, instr, remit, _ in line.details:
                e = self.find("e2e", e2e) or self.find("instr", instr) or self.find("remit", remit)
                if e is None:
                    members = []
                    break
                members.append(e)
        if not members and line.batch_id:
            members = list(self.by_ref.get("batch", {}).get(line.batch_id, []))
        if not members:
            return False
        members = [self.expected[m.expected_id] for m in members]
        taken = [m for m in members if self.state(m) not in _MATCHABLE]
        cancelled = [m for m in taken if self.state(m) is ExpectedState.CANCELLED]
        if cancelled:
            self.booked_after_cancel(
                line,
                cancelled[0],
                f"a batch of {len(members)}, {len(cancelled)} of them cancelled "
                f"({cancelled[0].expected_id}, ...)",
            )
            return True
        if taken:
            self.add_break(
                BreakClass.DUPLICATE,
                f"duplicate:{line.fingerprint}",
                line.amount_minor,
                line.currency,
                line.direction,
                f"a batch booking of {len(taken)} payments already matched "
                f"({taken[0].expected_id}, ...)",
                line,
                taken[0].expected_id,
            )
            return True
        self.add_match(rule, CONFIDENCE[rule], [line], members)
        total = sum(m.amount_minor for m in members)
        low = sum(m.amount_min_minor for m in members) - self.config.amount_tolerance_minor
        high = sum(m.amount_max_minor for m in members) + self.config.amount_tolerance_minor
        count_ok = line.batch_count is None or line.batch_count == len(members)
        if not (low <= line.amount_minor <= high) or not count_ok:
            diff = line.amount_minor - total
            self.add_break(
                BreakClass.AMOUNT_MISMATCH,
                f"amount:{line.fingerprint}",
                abs(diff),
                line.currency,
                line.direction if diff > 0 else _other(line.direction),
                f"batch of {line.batch_count} booked {line.amount_minor}; "
                f"{len(members)} expected payments total {total}",
                line,
                members[0].expected_id,
            )
        for m in members:
            if line.day and line.day > shift(m.date_to, self.config.grace_days):
                self.check_late(line, m)
        return True

    def by_amount(self, line: Line) -> bool:
        day = line.day
        if not day:
            return False
        spread = self.config.max_bound_spread_minor + self.config.amount_tolerance_minor
        window = self.config.date_window_days
        tol = self.config.amount_tolerance_minor
        amount, direction, currency = line.amount_minor, line.direction.value, line.currency
        e2e = line.end_to_end_id
        changes = self.work.expected_changes
        best: tuple[int, int, str] | None = None
        # Terms, not whole expected payments: of up to 64 candidates one is
        # chosen, and only it is read whole.
        for (
            eid,
            e_direction,
            e_currency,
            e_amount,
            low,
            high,
            date_from,
            date_to,
            e_e2e,
        ) in self.tx.open_expected_near(
            self.tenant_id, self.account, amount - spread, amount + spread, 64
        ):
            change = changes.get(eid)
            if (
                (change is not None and change[0] not in _MATCHABLE)
                # Both carry an end-to-end id, another one: two payments,
                # whatever their amounts (the line's own may still come).
                or (e2e and e_e2e and e_e2e != e2e)
                or e_direction != direction
                or e_currency != currency
                or not low - tol <= amount <= high + tol
                or not shift(date_from, -window) <= day <= shift(date_to, window)
            ):
                continue
            outside = 0 if date_from <= day <= date_to else 1
            key = (outside, abs(amount - e_amount), eid)
            if best is None or key < best:
                best = key
        if best is None:
            return False
        choice = self.expected.get(best[2]) or self.tx.get_expected(self.tenant_id, best[2])
        assert choice is not None  # read in this transaction a moment ago
        choice = self.expected.setdefault(choice.expected_id, choice)
        confidence = 0.7 if best[0] == 0 and best[1] == 0 else 0.5
        self.add_match(Rule.AMOUNT_DATE, confidence, [line], [choice])
        return True

    def ledger(self, lines: Sequence[Line]) -> None:
        if not lines:
            return
        keys = [k for line in lines for k in (line.end_to_end_id, line.instruction_id) if k]
        by_key = self.tx.entries_by_idempotency_key(self.tenant_id, keys)
        postings = self.tx.bank_postings(self.tenant_id, self.account, list(by_key.values()))
        candidates = [*postings]
        matched = self.tx.matched_entries(self.tenant_id, candidates)
        tol = self.config.amount_tolerance_minor
        for line in lines:
            side = Side.DEBIT if line.direction is Direction.CREDIT else Side.CREDIT
            entry_id = by_key.get(line.end_to_end_id) or by_key.get(line.instruction_id)
            posting = postings.get(entry_id or "")
            if entry_id and posting and posting[0] == side:
                if entry_id in matched or entry_id in self.work.taken_entries:
                    self.add_break(
                        BreakClass.DUPLICATE,
                        f"duplicate:{line.fingerprint}",
                        line.amount_minor,
                        line.currency,
                        line.direction,
                        f"a second booking of ledger entry {entry_id}",
                        line,
                    )
                    continue
                self.add_match(
                    Rule.LEDGER_REFERENCE,
                    CONFIDENCE[Rule.LEDGER_REFERENCE],
                    [line],
                    entry_id=entry_id,
                )
                if abs(posting[1] - line.amount_minor) > tol:
                    diff = line.amount_minor - posting[1]
                    self.add_break(
                        BreakClass.AMOUNT_MISMATCH,
                        f"amount:{line.fingerprint}",
                        abs(diff),
                        line.currency,
                        line.direction if diff > 0 else _other(line.direction),
                        f"booked {line.amount_minor}, the ledger entry {entry_id} posted "
                        f"{posting[1]}",
                        line,
                    )
                continue
            if line.day and self.ledger_by_amount(line, side):
                continue
            self.add_break(
                BreakClass.UNMATCHED_BANK,
                f"unmatched-bank:{line.fingerprint}",
                line.amount_minor,
                line.currency,
                line.direction,
                "no expected payment or ledger posting matches this booking",
                line,
            )

    def ledger_by_amount(self, line: Line, side: Side) -> bool:
        window = self.config.date_window_days
        tol = self.config.amount_tolerance_minor
        found = self.tx.bank_postings_between(
            self.tenant_id,
            self.account,
            side,
            line.amount_minor - tol,
            line.amount_minor + tol,
            _day_end_us(shift(line.day, -window - 1)) + 1,
            _day_end_us(shift(line.day, window)),
            16,
        )
        ids = [f[0] for f in found if f[0] not in self.work.taken_entries]
        if not ids:
            return False
        already = self.tx.matched_entries(self.tenant_id, ids)
        free = [i for i in ids if i not in already]
        if not free:
            return False
        self.add_match(Rule.LEDGER_AMOUNT_DATE, 0.5, [line], entry_id=free[0])
        return True


def _other(direction: Direction) -> Direction:
    return Direction.DEBIT if direction is Direction.CREDIT else Direction.CREDIT


@dataclass(frozen=True)
class SlaView:
    tier: str
    age_s: float
    overdue: bool


class Reconciler:
    """Reconciliation of one ledger (its store and database)."""

    def __init__(
        self,
        ledger: Ledger,
        config: ReconConfig,
        clock: Clock,
        encode_break: BreakEncoder | None = None,
    ) -> None:
        self.ledger = ledger
        self.config = config
        self.clock = clock
        self.store = ReconStore(ledger.store)
        self._encode_break = encode_break
        self.stats = {"lines": 0, "matched": 0, "breaks": 0}

    async def start(self) -> None:
        await self.ledger.run_on_writer(self.store.create_schema)

    async def _tx(self, work: Callable[[Tx], Any]) -> Any:
        result = await self.ledger.run_on_writer(lambda: self.store.run(work))
        return result

    # ---- import ----

    async def import_statement(
        self,
        tenant_id: str,
        ledger_account_id: str,
        data: bytes,
        *,
        actor: str = "",
        arrived_at_us: int | None = None,
        check_ledger_balance: bool | None = None,
    ) -> ImportResult:
        check_tenant_id(tenant_id)
        check_id(ledger_account_id, "ledger_account_id", self.ledger.config.limits)
        if not data:
            raise InvalidArgument("FIELD_REQUIRED", "content is required", "content")
        arrived = self.clock.now_us() if arrived_at_us is None else arrived_at_us
        parsed = await asyncio.to_thread(read_statement_file, data, self.config.max_file_bytes)
        return await self.import_parsed(
            tenant_id,
            ledger_account_id,
            parsed,
            actor=actor,
            arrived_at_us=arrived,
            check_ledger_balance=check_ledger_balance,
        )

    async def import_parsed(
        self,
        tenant_id: str,
        ledger_account_id: str,
        parsed: StatementFile,
        *,
        actor: str = "",
        arrived_at_us: int | None = None,
        check_ledger_balance: bool | None = None,
    ) -> ImportResult:
        """Imports a file `read_statement_file` read (the bench times the two
        apart); `import_statement` is both."""
        check_tenant_id(tenant_id)
        check_id(ledger_account_id, "ledger_account_id", self.ledger.config.limits)
        arrived = self.clock.now_us() if arrived_at_us is None else arrived_at_us
        count = sum(len(s.lines) for s in parsed.statements)
        if count > self.config.max_lines_per_file:
            raise InvalidArgument(
                "STATEMENT_TOO_LARGE",
                f"{count} lines; at most {self.config.max_lines_per_file} per file",
                "content",
            )
        check = (
            self.config.check_ledger_balance
            if check_ledger_balance is None
            else check_ledger_balance
        )
        result: ImportResult = await self._tx(
            lambda tx: self._import(tx, tenant_id, ledger_account_id, parsed, actor, arrived, check)
        )
        if result.breaks:
            self.ledger.committed.set()  # wakes the outbox relay
        self.stats["lines"] += result.lines_new
        self.stats["matched"] += sum(len(m.line_fingerprints) for m in result.matches)
        self.stats["breaks"] += len(result.breaks)
        return result

    def _import(
        self,
        tx: Tx,
        tenant_id: str,
        account: str,
        parsed: StatementFile,
        actor: str,
        arrived_us: int,
        check_balance: bool,
    ) -> ImportResult:
        now_us = self.clock.now_us()
        currency = tx.account_currency(tenant_id, account)
        if currency is None:
            raise NotFound("ACCOUNT_NOT_FOUND", f"no account {account!r}", "ledger_account_id")
        existing = tx.statements_of_file(tenant_id, parsed.file_sha256, parsed.fingerprint)
        if existing:
            return ImportResult(
                statements=existing, duplicate_file=True, lines_read=len(parsed.lines)
            )
        work = _Work()
        records: list[StatementRecord] = []
        new_lines: list[Line] = []
        all_lines: list[Line] = []
        per_statement: list[tuple[Statement, str, list[Line]]] = []
        for index, statement in enumerate(parsed.statements):
            statement_id = f"stm_{_digest(tenant_id, parsed.fingerprint, str(index))}"
            if statement.account.currency and statement.account.currency != currency:
                raise InvalidArgument(
                    "STATEMENT_CURRENCY_MISMATCH",
                    f"the statement's account is in {statement.account.currency}, "
                    f"the ledger account in {currency}",
                    f"statements[{index}].account.currency",
                )
            lines = normalize(tenant_id, statement_id, account, currency, statement, index)
            per_statement.append((statement, statement_id, lines))
            all_lines.extend(lines)
        known = tx.known_lines(tenant_id, [line.fingerprint for line in all_lines])
        seen: set[str] = set(known)
        matcher = _Matcher(tx, self.config, tenant_id, account, now_us, work)
        for statement, statement_id, lines in per_statement:
            fresh = []
            for line in lines:
                if line.fingerprint not in seen:
                    seen.add(line.fingerprint)
                    fresh.append(line)
            new_lines.extend(fresh)
            matcher.run(fresh)
            records.append(
                self._statement_record(
                    tx,
                    tenant_id,
                    account,
                    currency,
                    parsed,
                    statement,
                    statement_id,
                    len(lines),
                    len(fresh),
                    actor,
                    now_us,
                    check_balance,
                    matcher,
                )
            )
        tx.insert_lines(new_lines, work.match_of_line)
        tx.insert_matches(work.matches)
        tx.set_expected_states(
            tenant_id, [(eid, state, mid) for eid, (state, mid) in work.expected_changes.items()]
        )
        checked = {
            statement_id: self._ledger_check(
                tx, tenant_id, account, statement_id, closing, day, own, cur, matcher
            )
            for statement_id, closing, day, own, cur in work.ledger_checks
        }
        records = [
            replace(r, ledger_closing_minor=checked[r.statement_id])
            if r.statement_id in checked
            else r
            for r in records
        ]
        tx.insert_statements(records)
        posted = sorted(
            {
                break_id_for(tenant_id, f"{POSTING_CAUSE}{entry_id}"): entry_id
                for m in work.matches
                if m.rule in _LEDGER_RULES
                for entry_id in m.entry_ids
            }.items()
        )
        if posted:
            raised = tx.existing_breaks(tenant_id, [break_id for break_id, _ in posted])
            work.resolved_causes.extend(
                f"{POSTING_CAUSE}{entry_id}" for break_id, entry_id in posted if break_id in raised
            )
        for cause in work.resolved_causes:
            tx.resolve_break(
                tenant_id,
                break_id_for(tenant_id, cause),
                Resolution.ACCEPTED.value,
                "matcher",
                now_us,
                "",
                "a statement line matched the posting"
                if cause.startswith(POSTING_CAUSE)
                else "booked late: matched",
            )
        breaks = self._new_breaks(tx, tenant_id, work.breaks)
        tx.insert_breaks(breaks)
        self._emit(tx, tenant_id, breaks, arrived_us, now_us)
        return ImportResult(
            statements=records,
            lines_read=len(all_lines),
            lines_new=len(new_lines),
            matches=work.matches,
            breaks=breaks,
        )

    def _statement_record(
        self,
        tx: Tx,
        tenant_id: str,
        account: str,
        currency: str,
        parsed: StatementFile,
        statement: Statement,
        statement_id: str,
        line_count: int,
        new_count: int,
        actor: str,
        now_us: int,
        check_balance: bool,
        matcher: _Matcher,
    ) -> StatementRecord:
        opening, closing = statement.opening_booked, statement.closing_booked
        agree = statement.balances_agree()
        ledger_closing: int | None = None
        closing_date = iso(closing.date) if closing is not None else ""
        # The statement as the bank numbers it, not as this file carries it:
        # the same statement sent again in another file raises nothing new.
        own = _digest(
            statement.account.id,
            statement.statement_id,
            repr(opening.signed_minor if opening else None),
            repr(closing.signed_minor if closing else None),
            closing_date,
        )
        if agree is False:
            net = statement.booked_movement_minor
            diff = closing.signed_minor - opening.signed_minor - net  # type: ignore[union-attr]
            matcher.add_break(
                BreakClass.BALANCE_MISMATCH,
                f"statement-balance:{own}",
                abs(diff),
                currency,
                Direction.CREDIT if diff > 0 else Direction.DEBIT,
                f"opening {opening.signed_minor} + booked lines {net} != "  # type: ignore[union-attr]
                f"closing {closing.signed_minor}",  # type: ignore[union-attr]
                statement_id=statement_id,
            )
        if closing is not None and check_balance:
            # Checked once this import's lines and matches are written (the
            # payments in transit are read from them).
            matcher.work.ledger_checks.append(
                (statement_id, closing.signed_minor, closing_date, own, currency)
            )
        if closing is not None:
            self._overdue(tx, tenant_id, account, closing_date, matcher)
        return StatementRecord(
            tenant_id=tenant_id,
            statement_id=statement_id,
            file_sha256=parsed.file_sha256,
            file_fingerprint=parsed.fingerprint,
            kind=statement.kind.value,
            message_name=parsed.message_name,
            bank_statement_id=statement.statement_id,
            bank_account=statement.account.id[-4:],
            ledger_account_id=account,
            currency=currency,
            line_count=line_count,
            new_line_count=new_count,
            opening_minor=opening.signed_minor if opening is not None else None,
            closing_minor=closing.signed_minor if closing is not None else None,
            closing_date=closing_date,
            balances_agree=agree,
            ledger_closing_minor=ledger_closing,
            imported_at_us=now_us,
            imported_by=actor,
        )

    def _ledger_check(
        self,
        tx: Tx,
        tenant_id: str,
        account: str,
        statement_id: str,
        closing_minor: int,
        day: str,
        own: str,
        currency: str,
        matcher: _Matcher,
    ) -> int:
        """The closing booked balance against the ledger's balance of the
        account at the end of `day`, less the payments in transit (posted by
        the ledger, not booked by the bank by then: `in_transit`); a
        balance_mismatch break when they differ. The ledger's balance."""
        ledger = tx.bank_balance_as_of(tenant_id, account, _day_end_us(day))
        transit, count = self.in_transit(tx, tenant_id, account, day)
        if ledger - transit != closing_minor:
            diff = closing_minor - (ledger - transit)
            matcher.add_break(
                BreakClass.BALANCE_MISMATCH,
                f"ledger-balance:{own}",
                abs(diff),
                currency,
                Direction.CREDIT if diff > 0 else Direction.DEBIT,
                f"closing balance {closing_minor} on {day}; the ledger's balance of {account} "
                f"then is {ledger}, {transit} of it in {count} payments in transit",
                statement_id=statement_id,
            )
        return ledger

    def in_transit(self, tx: Tx, tenant_id: str, account: str, day: str) -> tuple[int, int]:
        """The payments in transit on `day`: the account's postings from the
        `unmatched_posting_lookback_days` before its end that no statement
        line booked by `day` accounts for, as (their sum as the ledger's
        balance counts them, debits - credits; how many). A line accounts for
        a posting when it is matched to the posting's entry, or to the
        expected payment that names the entry (its ledger_entry_id) or that
        the entry's idempotency key names (`recon.in_transit_expected_keys`:
        a payout's settlement, `payout-settle:<id>`, is the bank side of the
        expected payment `payout:<id>`). A break's own write-off or reversal
        (`recon-...`), and a posting whose unmatched_ledger break an operator
        resolved, count as booked. Older postings count as booked (a posting
        no line matched is an unmatched_ledger break by then)."""
        end_us = _day_end_us(day)
        from_us = end_us + 1 - self.config.unmatched_posting_lookback_days * _DAY_US
        postings = tx.bank_postings_window(tenant_id, account, from_us, end_us, 100_000)
        if not postings:
            return 0, 0
        mapped: dict[str, str] = {}
        for entry_id, _, _, key in postings:
            for prefix, expected_prefix in self.config.in_transit_expected_keys.items():
                if key.startswith(prefix):
                    mapped[entry_id] = expected_prefix + key.removeprefix(prefix)
        entry_ids = [p[0] for p in postings]
        matches_of = tx.matches_of_entries(tenant_id, entry_ids)
        by_entry, by_id = tx.expected_matches(tenant_id, entry_ids, list(mapped.values()))
        match_ids = [m for ms in matches_of.values() for m in ms]
        match_ids += [*by_entry.values(), *by_id.values()]
        booked_on = tx.first_booking_days(tenant_id, match_ids)
        settled = tx.resolved_breaks(
            tenant_id, [break_id_for(tenant_id, f"{POSTING_CAUSE}{e}") for e in entry_ids]
        )
        total = count = 0
        for entry_id, side, amount, key in postings:
            if key.startswith("recon-"):
                continue
            if break_id_for(tenant_id, f"{POSTING_CAUSE}{entry_id}") in settled:
                continue
            ids = [*matches_of.get(entry_id, []), by_entry.get(entry_id, "")]
            ids.append(by_id.get(mapped.get(entry_id, ""), ""))
            days = [booked_on[m] for m in ids if m in booked_on]
            if days and min(days) <= day:
                continue
            total += amount if side == int(Side.DEBIT) else -amount
            count += 1
        return total, count

    def _overdue(self, tx: Tx, tenant_id: str, account: str, day: str, matcher: _Matcher) -> None:
        """Expected payments of the account whose window and grace ended by
        `day` (a statement closing that day is complete for it) with no
        booking: unmatched in the ledger's view, a break each."""
        before = shift(day, -self.config.grace_days + 1)
        for e in tx.open_expected_due(tenant_id, account, before, 100_000):
            e = matcher.expected.setdefault(e.expected_id, e)
            if matcher.state(e) is not ExpectedState.OPEN:
                continue
            matcher.work.expected_changes[e.expected_id] = (ExpectedState.OVERDUE, "")
            matcher.add_break(
                BreakClass.UNMATCHED_LEDGER,
                f"unmatched:{e.expected_id}",
                e.amount_minor,
                e.currency,
                _other(e.direction),
                f"expected {e.date_from}..{e.date_to} (+{self.config.grace_days} d grace); "
                f"no booking by {day}",
                expected_id=e.expected_id,
            )

    def _unaccounted_postings(
        self, tx: Tx, tenant_id: str, account: str, day: str, matcher: _Matcher
    ) -> None:
        """The account's postings that no statement line matched and no
        expected payment names, `date_window_days` + `grace_days` after the
        day they were posted (a line booked within the window could still
        have matched them by amount and date) and at most
        `unmatched_posting_lookback_days` before that: an unmatched_ledger
        break each, naming the entry. Payout settlements and reversals (their
        payout's expected payment ages instead) and a break's own write-off or
        reversal are left out (`unmatched_posting_skip_keys`)."""
        config = self.config
        last_day = shift(day, -(config.date_window_days + config.grace_days))
        to_us = _day_end_us(last_day)
        from_us = to_us + 1 - config.unmatched_posting_lookback_days * _DAY_US
        currency = tx.account_currency(tenant_id, account)
        if currency is None:
            return
        for entry_id, side, amount, posted_us in tx.unaccounted_bank_postings(
            tenant_id, account, from_us, to_us, config.unmatched_posting_skip_keys, 10_000
        ):
            # A debit of the bank account (an asset) is money the ledger says
            # came in: the bank's missing booking is a credit, and the break's
            # direction, which way the bank moved what the ledger lacks, the
            # other way (as an expected payment's).
            bank = Direction.CREDIT if side == int(Side.DEBIT) else Direction.DEBIT
            matcher.add_break(
                BreakClass.UNMATCHED_LEDGER,
                f"{POSTING_CAUSE}{entry_id}",
                amount,
                currency,
                _other(bank),
                f"ledger entry {entry_id} posted {_day_of_us(posted_us)} to {account} "
                f"({bank.value} at the bank); no statement line matched it by {day}",
            )

    def _new_breaks(self, tx: Tx, tenant_id: str, breaks: list[Break]) -> list[Break]:
        unique: dict[str, Break] = {}
        for b in breaks:
            unique.setdefault(b.break_id, b)
        existing = tx.existing_breaks(tenant_id, list(unique))
        return [b for b in unique.values() if b.break_id not in existing]

    def _emit(
        self, tx: Tx, tenant_id: str, breaks: list[Break], arrived_us: int, now_us: int
    ) -> None:
        if self._encode_break is not None and breaks:
            tx.write_events(tenant_id, [self._encode_break(b, arrived_us) for b in breaks], now_us)

    # ---- sweeping (a day passed with no statement) ----

    async def sweep_overdue(
        self, tenant_id: str, ledger_account_id: str, day: str = ""
    ) -> list[Break]:
        """Raises unmatched breaks for expected payments of the account
        overdue by the end of `day` (default: yesterday by the clock, the
        last day that is over)."""
        check_tenant_id(tenant_id)
        as_of = day or _day_of_us(self.clock.now_us() - _DAY_US)

        def work(tx: Tx) -> list[Break]:
            now_us = self.clock.now_us()
            w = _Work()
            matcher = _Matcher(tx, self.config, tenant_id, ledger_account_id, now_us, w)
            self._overdue(tx, tenant_id, ledger_account_id, as_of, matcher)
            self._unaccounted_postings(tx, tenant_id, ledger_account_id, as_of, matcher)
            tx.set_expected_states(
                tenant_id, [(eid, st, mid) for eid, (st, mid) in w.expected_changes.items()]
            )
            breaks = self._new_breaks(tx, tenant_id, w.breaks)
            tx.insert_breaks(breaks)
            self._emit(tx, tenant_id, breaks, now_us, now_us)
            return breaks

        breaks: list[Break] = await self._tx(work)
        if breaks:
            self.ledger.committed.set()
        return breaks

    async def sweep_all(self, day: str = "") -> int:
        """sweep_overdue for every account with an open expected payment
        overdue by `day` (default: yesterday), and every bank account (whose
        postings no statement line matched age too), in every tenant; the
        number of breaks raised. For the days no end-of-day statement closes."""
        as_of = day or _day_of_us(self.clock.now_us() - _DAY_US)
        before = shift(as_of, -self.config.grace_days + 1)
        roles = self.config.bank_account_roles

        def scan(tx: Tx) -> list[tuple[str, str]]:
            overdue = tx.accounts_with_open_expected_before(before, 10_000)
            return sorted({*overdue, *tx.bank_accounts(roles, 10_000)})

        accounts: list[tuple[str, str]] = await self._tx(scan)
        raised = 0
        for tenant_id, account in accounts:
            raised += len(await self.sweep_overdue(tenant_id, account, as_of))
        return raised

    async def run_sweeper(self, interval_s: float) -> None:
        """sweep_all now and every interval_s, until cancelled."""
        await every(interval_s, self._sweep_logged, "reconciliation sweep", first_at_start=True)

    async def _sweep_logged(self) -> None:
        raised = await self.sweep_all()
        if raised:
            log.info("reconciliation sweep raised %d unmatched breaks", raised)

    # ---- expected payments ----

    async def create_expected_payments(
        self, tenant_id: str, payments: Sequence[ExpectedPayment]
    ) -> list[ExpectedPayment]:
        """Creates them, idempotent on (tenant, expected_id): the same one
        again returns it; a different one under the same id is ALREADY_EXISTS."""
        check_tenant_id(tenant_id)
        now_us = self.clock.now_us()
        checked = [
            replace(
                self._check_expected(e, f"expected_payments[{i}]"),
                tenant_id=tenant_id,
                created_at_us=now_us,
                state=ExpectedState.OPEN,
            )
            for i, e in enumerate(payments)
        ]

        def work(tx: Tx) -> list[ExpectedPayment]:
            ids = [e.expected_id for e in checked]
            found = self._existing_expected(tx, tenant_id, ids)
            out: list[ExpectedPayment] = []
            fresh: list[ExpectedPayment] = []
            for index, e in enumerate(checked):
                old = found.get(e.expected_id)
                if old is None:
                    fresh.append(e)
                    out.append(e)
                    continue
                if replace(old, state=ExpectedState.OPEN, created_at_us=0) != replace(
                    e, created_at_us=0
                ):
                    raise AlreadyExists(
                        "EXPECTED_PAYMENT_EXISTS",
                        f"expected payment {e.expected_id!r} exists with other terms",
                        f"expected_payments[{index}].expected_id",
                    )
                out.append(old)
            accounts = {e.ledger_account_id for e in fresh}
            for account in sorted(accounts):
                if tx.account_currency(tenant_id, account) is None:
                    raise NotFound(
                        "ACCOUNT_NOT_FOUND", f"no account {account!r}", "ledger_account_id"
                    )
            tx.insert_expected(fresh)
            return out

        result: list[ExpectedPayment] = await self._tx(work)
        return result

    @staticmethod
    def _existing_expected(
        tx: Tx, tenant_id: str, ids: Sequence[str]
    ) -> dict[str, ExpectedPayment]:
        found: dict[str, ExpectedPayment] = {}
        for eid in ids:
            e = tx.get_expected(tenant_id, eid)
            if e is not None:
                found[eid] = e
        return found

    def _check_expected(self, e: ExpectedPayment, where: str) -> ExpectedPayment:
        limits = self.ledger.config.limits
        check_id(e.expected_id, f"{where}.expected_id", limits)
        check_id(e.ledger_account_id, f"{where}.ledger_account_id", limits)
        if e.amount_minor <= 0:
            raise InvalidArgument(
                "AMOUNT_NOT_POSITIVE", "amount must be positive", f"{where}.amount"
            )
        low = e.amount_min_minor or e.amount_minor
        high = e.amount_max_minor or e.amount_minor
        spread = self.config.max_bound_spread_minor
        if not low <= e.amount_minor <= high:
            raise InvalidArgument(
                "AMOUNT_BOUNDS_INVALID", "amount must lie within its bounds", f"{where}.amount_min"
            )
        if e.amount_minor - low > spread or high - e.amount_minor > spread:
            raise InvalidArgument(
                "AMOUNT_BOUNDS_TOO_WIDE",
                f"bounds may be at most {spread} minor units from the amount",
                f"{where}.amount_max",
            )
        try:
            date_from = dt.date.fromisoformat(e.date_from).isoformat()
            date_to = dt.date.fromisoformat(e.date_to or e.date_from).isoformat()
        except ValueError as exc:
            raise InvalidArgument(
                "DATE_INVALID", "dates are YYYY-MM-DD", f"{where}.date_from"
            ) from exc
        if date_to < date_from:
            raise InvalidArgument(
                "DATE_WINDOW_INVALID", "date_to before date_from", f"{where}.date_to"
            )
        return replace(
            e, amount_min_minor=low, amount_max_minor=high, date_from=date_from, date_to=date_to
        )

    # ---- reads ----

    async def get_statement(
        self, tenant_id: str, statement_id: str, max_lines: int = 1000
    ) -> tuple[StatementRecord, list[tuple[Any, ...]]]:
        check_tenant_id(tenant_id)

        def work(tx: Tx) -> tuple[StatementRecord | None, list[tuple[Any, ...]]]:
            record = tx.get_statement(tenant_id, statement_id)
            lines = tx.statement_lines(tenant_id, statement_id, max_lines) if record else []
            return record, lines

        record, lines = await self._tx(work)
        if record is None:
            raise NotFound("STATEMENT_NOT_FOUND", f"no statement {statement_id!r}", "statement_id")
        return record, lines

    async def list_statements(
        self, tenant_id: str, page_token: str, limit: int
    ) -> tuple[list[StatementRecord], str]:
        """Imported statements, newest first, and the next page's token
        ("<imported_at_us>:<statement_id>" of the last one; empty at the end)."""
        check_tenant_id(tenant_id)
        before_us, before_id = 0, ""
        if page_token:
            at, _, before_id = page_token.partition(":")
            if not at.isdigit() or not before_id or int(at) <= 0:
                raise InvalidArgument(
                    "PAGE_TOKEN_INVALID", "page_token is not one this list gave", "page_token"
                )
            before_us = int(at)
        found: list[StatementRecord] = await self._tx(
            lambda tx: tx.list_statements(tenant_id, before_us, before_id, limit)
        )
        last = found[-1] if len(found) == limit else None
        return found, f"{last.imported_at_us}:{last.statement_id}" if last else ""

    async def break_detail(
        self, tenant_id: str, break_id: str
    ) -> tuple[Break, tuple[Any, ...] | None, ExpectedPayment | None]:
        """A break with its statement line (codec.line's row) and its
        expected payment, each None when the break names none."""
        check_tenant_id(tenant_id)

        def work(tx: Tx) -> tuple[Break | None, tuple[Any, ...] | None, ExpectedPayment | None]:
            b = tx.get_break(tenant_id, break_id)
            if b is None:
                return None, None, None
            line = tx.line_row(tenant_id, b.line_fingerprint) if b.line_fingerprint else None
            expected = tx.get_expected(tenant_id, b.expected_id) if b.expected_id else None
            return b, line, expected

        b, line, expected = await self._tx(work)
        if b is None:
            raise NotFound("BREAK_NOT_FOUND", f"no break {break_id!r}", "break_id")
        return b, line, expected

    async def list_breaks(
        self,
        tenant_id: str,
        state: str = "",
        break_class: str = "",
        after: str = "",
        limit: int = 100,
    ) -> list[Break]:
        _check_break_filters(tenant_id, state, break_class)
        breaks: list[Break] = await self._tx(
            lambda tx: tx.list_breaks(tenant_id, state, break_class, after, limit)
        )
        return breaks

    async def page_breaks(
        self,
        tenant_id: str,
        state: str,
        break_class: str,
        page_token: str,
        limit: int,
        order: str = "",
    ) -> tuple[list[Break], str]:
        """One page of breaks and the next page's token (empty at the end):
        by break id (order ""; the token is the last id), or oldest
        detection first (order "oldest"; the token "<detected_at_us>:<id>")."""
        if order not in ("", "oldest"):
            raise InvalidArgument("BREAK_ORDER_INVALID", 'order is "" (by id) or "oldest"', "order")
        if not order:
            by_id = await self.list_breaks(tenant_id, state, break_class, page_token, limit)
            return by_id, by_id[-1].break_id if len(by_id) == limit else ""
        after_us, after_id = -1, ""
        if page_token:
            at, _, after_id = page_token.partition(":")
            if not at.isdigit() or not after_id:
                raise InvalidArgument(
                    "PAGE_TOKEN_INVALID", "page_token is not one this order gave", "page_token"
                )
            after_us = int(at)
        _check_break_filters(tenant_id, state, break_class)
        found: list[Break] = await self._tx(
            lambda tx: tx.list_breaks(
                tenant_id, state, break_class, after_id, limit, after_detected_us=after_us
            )
        )
        if len(found) < limit:
            return found, ""
        return found, f"{found[-1].detected_at_us}:{found[-1].break_id}"

    async def get_break(self, tenant_id: str, break_id: str) -> Break:
        found: Break | None = await self._tx(lambda tx: tx.get_break(tenant_id, break_id))
        if found is None:
            raise NotFound("BREAK_NOT_FOUND", f"no break {break_id!r}", "break_id")
        return found

    def sla(self, b: Break, now_us: int | None = None) -> SlaView:
        """The break's SLA tier by amount, escalated one tier once its age
        passes the tier's hours (then it is overdue)."""
        now = self.clock.now_us() if now_us is None else now_us
        end = b.resolved_at_us if b.state is BreakState.RESOLVED else now
        age_s = max(0.0, (end - b.detected_at_us) / 1e6)
        tiers = self.config.sla_tiers
        index = next(
            (i for i, t in enumerate(tiers) if b.amount_minor >= t.min_amount_minor),
            len(tiers) - 1,
        )
        overdue = age_s > tiers[index].hours * 3600
        if overdue and index > 0:
            index -= 1
        return SlaView(tiers[index].name, age_s, overdue)

    # ---- resolving ----

    async def resolution_command(
        self, tenant_id: str, break_id: str, resolution: str, entry_id: str = ""
    ) -> Command:
        """The ledger transfer a write-off or a reversal of the break posts
        (without its decision token: the caller gets one for exactly this);
        DescribeResolution answers it, so the console asks the policy plane
        about the very transfer `resolve_break` posts."""
        check_tenant_id(tenant_id)
        if resolution not in (Resolution.WRITE_OFF.value, Resolution.REVERSAL.value):
            raise InvalidArgument(
                "RESOLUTION_INVALID",
                "only a write_off or a reversal posts a ledger transfer",
                "resolution",
            )
        b = await self.get_break(tenant_id, break_id)
        return await self._command(b, Resolution(resolution), entry_id)

    async def _command(self, b: Break, resolution: Resolution, entry_id: str) -> Command:
        if resolution is Resolution.WRITE_OFF:
            bank, other = b.ledger_account_id, self.config.write_off_account_id
            debit, credit = (bank, other) if b.direction is Direction.CREDIT else (other, bank)
            return Command(
                tenant_id=b.tenant_id,
                idempotency_key=f"recon-writeoff-{b.break_id}",
                kind=Kind.TRANSFER,
                debit_account_id=debit,
                credit_account_id=credit,
                amount_minor=b.amount_minor,
                currency=b.currency,
                description=f"reconciliation write-off of {b.break_class.value} break",
                metadata={"break_id": b.break_id},
            )
        if not entry_id:
            raise InvalidArgument(
                "FIELD_REQUIRED", "a reversal names the ledger entry it reverses", "entry_id"
            )
        entry = await self.ledger.get_entry(b.tenant_id, entry_id, "")
        debit = next((p.account_id for p in entry.postings if p.side == Side.CREDIT), "")
        credit = next((p.account_id for p in entry.postings if p.side == Side.DEBIT), "")
        return Command(
            tenant_id=b.tenant_id,
            idempotency_key=f"recon-reversal-{b.break_id}",
            kind=Kind.TRANSFER,
            debit_account_id=debit,
            credit_account_id=credit,
            amount_minor=entry.amount_minor,
            currency=entry.currency,
            description=f"reconciliation reversal of {entry_id}",
            metadata={"break_id": b.break_id, "reverses": entry_id},
        )

    async def resolve_break(
        self,
        tenant_id: str,
        break_id: str,
        resolution: str,
        actor: str,
        *,
        note: str = "",
        expected_id: str = "",
        entry_id: str = "",
        line_fingerprint: str = "",
        decision_token: str = "",
    ) -> Break:
        """Resolves a break once, recording the actor. A write-off or a
        reversal posts its ledger transfer under a key derived from the
        break, so resolving twice (or two operators at once) posts it once;
        resolving a resolved break the same way returns it unchanged."""
        check_tenant_id(tenant_id)
        if not actor:
            raise InvalidArgument("FIELD_REQUIRED", "actor is required", "actor")
        try:
            how = Resolution(resolution)
        except ValueError as exc:
            raise InvalidArgument(
                "RESOLUTION_INVALID",
                f"resolution is one of {[r.value for r in Resolution]}",
                "resolution",
            ) from exc
        b = await self.get_break(tenant_id, break_id)
        if b.state is BreakState.RESOLVED:
            if b.resolution == how.value:
                return b
            raise FailedPrecondition(
                "BREAK_ALREADY_RESOLVED",
                f"break {break_id} was resolved as {b.resolution} by {b.resolved_by}",
                "resolution",
            )
        posted = ""
        if how in (Resolution.WRITE_OFF, Resolution.REVERSAL):
            command = await self._command(b, how, entry_id)
            command = msgspec.structs.replace(command, decision_token=decision_token)
            [outcome] = await self.ledger.submit(
                tenant_id, [command], field_prefix="resolution", indexed=False
            )
            if outcome.error is not None:
                err = outcome.error
                raise error_for(err.code, err.reason, err.message, err.field)
            assert outcome.entry is not None
            posted = outcome.entry.entry_id
        now_us = self.clock.now_us()

        def work(tx: Tx) -> Break:
            current = tx.get_break(tenant_id, break_id)
            assert current is not None
            if current.state is BreakState.RESOLVED:
                return current
            if how is Resolution.MANUAL_MATCH:
                self._manual_match(
                    tx, current, actor, now_us, expected_id, entry_id, line_fingerprint
                )
            tx.resolve_break(tenant_id, break_id, how.value, actor, now_us, posted, note)
            resolved = tx.get_break(tenant_id, break_id)
            assert resolved is not None
            return resolved

        result: Break = await self._tx(work)
        return result

    def _manual_match(
        self,
        tx: Tx,
        b: Break,
        actor: str,
        now_us: int,
        expected_id: str,
        entry_id: str,
        line_fingerprint: str,
    ) -> None:
        fp = line_fingerprint or b.line_fingerprint
        eid = expected_id or b.expected_id
        if not fp:
            raise InvalidArgument(
                "FIELD_REQUIRED", "a manual match names the statement line", "line_fingerprint"
            )
        if not eid and not entry_id:
            raise InvalidArgument(
                "FIELD_REQUIRED",
                "a manual match names an expected payment or a ledger entry",
                "expected_id",
            )
        line = tx.get_line(b.tenant_id, fp)
        if line is None:
            raise NotFound("LINE_NOT_FOUND", f"no statement line {fp!r}", "line_fingerprint")
        expected: tuple[str, ...] = ()
        if eid:
            e = tx.get_expected(b.tenant_id, eid)
            if e is None:
                raise NotFound(
                    "EXPECTED_PAYMENT_NOT_FOUND", f"no expected payment {eid!r}", "expected_id"
                )
            expected = (eid,)
        match = Match(
            tenant_id=b.tenant_id,
            match_id=f"mch_{_digest(b.tenant_id, 'manual', b.break_id)}",
            rule=Rule.MANUAL,
            confidence=CONFIDENCE[Rule.MANUAL],
            line_fingerprints=(fp,),
            expected_ids=expected,
            entry_ids=(entry_id,) if entry_id else (),
            actor=actor,
            created_at_us=now_us,
        )
        tx.insert_matches([match])
        tx.set_line_match(b.tenant_id, fp, match.match_id)
        if entry_id and b.cause != f"{POSTING_CAUSE}{entry_id}":
            # The entry's own unmatched_ledger break, if the sweep raised one.
            tx.resolve_break(
                b.tenant_id,
                break_id_for(b.tenant_id, f"{POSTING_CAUSE}{entry_id}"),
                Resolution.ACCEPTED.value,
                actor,
                now_us,
                "",
                f"matched by hand to line {fp} (break {b.break_id})",
            )
        if expected:
            tx.set_expected_states(
                b.tenant_id, [(expected[0], ExpectedState.MATCHED, match.match_id)]
            )
