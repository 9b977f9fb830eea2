"""The ledger's own assertions, in the spirit of TigerBeetle's.

The engine is written so that these never fail; they are checked anyway,
where the ledger writes (before anything reaches the database) and where it
reads an entry or hold back, because a ledger that limps on with a corrupt
entry is worse than one that stops. Each check is O(postings) in memory: no
extra round trip, nothing read twice.

What must always hold:
- an entry's postings balance: per currency, debits equal credits, and the
  entry's amount is what its postings move;
- every amount is positive and fits in int64 (PostgreSQL's BIGINT, SQLite's
  INTEGER); refunds never reverse more than a posting moved;
- account counters stay within 0..int64;
- a hold leaves PENDING once: it is never captured (or voided, or expired)
  twice, and a captured hold names the entry its capture posted.

A violation is `LedgerInvariantViolated`: an INTERNAL error (never a client's
fault, never remembered under an idempotency key), logged at CRITICAL with the
record's id and tenant. Nothing of the transaction it happened in is written.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from money_plane.domain import AccountState, Entry, Hold, HoldState, Side
from triplane.runtime.currencies import INT64_MAX
from triplane.runtime.errors import Code, TriplaneError

log = logging.getLogger("triplane.money.invariants")

REASON = "LEDGER_INVARIANT_VIOLATED"
_FINAL_HOLD_STATES = frozenset({HoldState.CAPTURED, HoldState.VOIDED, HoldState.EXPIRED})
_UNCAPTURED_HOLD_STATES = frozenset({HoldState.PENDING, HoldState.VOIDED, HoldState.EXPIRED})


class LedgerInvariantViolated(TriplaneError):
    """The ledger met a state that must never exist (a bug or a corrupt row)."""

    code = Code.INTERNAL


def violation(
    problem: str, *, kind: str, record_id: str, tenant_id: str, when: str
) -> LedgerInvariantViolated:
    """Logs the violation loudly and returns the error to raise."""
    log.critical(
        "LEDGER INVARIANT VIOLATED %s: %s %s of tenant %s: %s",
        when,
        kind,
        record_id,
        tenant_id,
        problem,
    )
    return LedgerInvariantViolated(
        REASON,
        f"ledger invariant violated {when}: {kind} {record_id}: {problem}",
        "",
        {"tenant_id": tenant_id, f"{kind}_id": record_id, "when": when},
    )


def _in_range(amount_minor: int) -> bool:
    return 0 < amount_minor <= INT64_MAX


_DEBIT, _CREDIT = int(Side.DEBIT), int(Side.CREDIT)


def entry_problem(entry: Entry) -> str:
    """Why `entry` breaks the ledger's invariants, or ""."""
    # The common case first, in one pass with plain ints: every posting in the
    # entry's currency and in range, debits = credits = the entry's amount.
    # Anything else takes the careful path, which names the problem.
    currency = entry.currency
    debits = credits = 0
    for posting in entry.postings:
        amount = posting.amount_minor
        if amount <= 0 or amount > INT64_MAX or posting.currency != currency:
            return _entry_problem_in_detail(entry)
        if posting.side == _DEBIT:
            debits += amount
        elif posting.side == _CREDIT:
            credits += amount
        else:
            return _entry_problem_in_detail(entry)
    if debits != credits or debits != entry.amount_minor or not 0 < debits <= INT64_MAX:
        return _entry_problem_in_detail(entry)
    if entry.refunded_minor == 0 and not any(entry.refunded_by_posting):
        return ""
    return _refund_problem(entry)


def _entry_problem_in_detail(entry: Entry) -> str:
    if not entry.postings:
        return "it has no postings"
    if not _in_range(entry.amount_minor):
        return f"amount {entry.amount_minor} is not in 1..{INT64_MAX}"
    totals: dict[str, list[int]] = {}
    for index, posting in enumerate(entry.postings):
        amount = posting.amount_minor
        if not _in_range(amount):
            return f"posting {index}: amount {amount} is not in 1..{INT64_MAX}"
        sums = totals.get(posting.currency)
        if sums is None:
            sums = totals[posting.currency] = [0, 0]
        if posting.side == Side.DEBIT:
            sums[0] += amount
        elif posting.side == Side.CREDIT:
            sums[1] += amount
        else:
            return f"posting {index}: side {posting.side} is neither debit nor credit"
    for currency, (debits, credits) in totals.items():
        if debits != credits:
            return f"{currency} debits {debits} != credits {credits}"
    moved = totals.get(entry.currency, [0, 0])[0]
    if moved != entry.amount_minor:
        return f"amount {entry.amount_minor} {entry.currency} but its postings move {moved}"
    return _refund_problem(entry)


def _refund_problem(entry: Entry) -> str:
    if not 0 <= entry.refunded_minor <= entry.amount_minor:
        return f"refunded {entry.refunded_minor} of an amount of {entry.amount_minor}"
    refunded = entry.refunded_by_posting
    if not refunded:
        return ""
    if len(refunded) != len(entry.postings):
        return f"{len(refunded)} refund counters for {len(entry.postings)} postings"
    for index, (done, posting) in enumerate(zip(refunded, entry.postings, strict=True)):
        if not 0 <= done <= posting.amount_minor:
            return f"posting {index}: refunded {done} of {posting.amount_minor}"
    return ""


def hold_problem(hold: Hold) -> str:
    """Why `hold` (as stored) breaks the ledger's invariants, or ""."""
    if not _in_range(hold.amount_minor):
        return f"amount {hold.amount_minor} is not in 1..{INT64_MAX}"
    if hold.state == HoldState.CAPTURED:
        if not 0 < hold.captured_minor <= hold.amount_minor:
            return f"captured {hold.captured_minor} of a hold of {hold.amount_minor}"
        if not hold.capture_entry_id:
            return "captured without a capture entry"
    elif hold.state in _UNCAPTURED_HOLD_STATES:
        if hold.captured_minor or hold.capture_entry_id:
            return f"state {hold.state} but carries a capture"
    else:
        return f"unknown state {hold.state}"
    return ""


def hold_change_problem(
    before: Hold | None, after: Hold, new: bool, new_entry_ids: set[str]
) -> str:
    """Why writing `after` over `before` (as the commit loaded it; None if it
    did not) is not a legal change of a hold, or "". A hold is created
    PENDING and leaves PENDING once; its terms never change."""
    problem = hold_problem(after)
    if problem:
        return problem
    if new:
        if before is not None:
            return "created again over an existing hold"
        return "" if after.state == HoldState.PENDING else f"created in state {after.state}"
    if before is None:
        return "changed without being loaded (and locked) by the commit"
    if before.state != HoldState.PENDING:
        return f"changed from state {before.state} to {after.state}: it left PENDING before"
    if after.state not in _FINAL_HOLD_STATES:
        return f"changed from PENDING to state {after.state}"
    terms = ("debit_account_id", "credit_account_id", "amount_minor", "currency")
    for name in terms:
        if getattr(before, name) != getattr(after, name):
            return f"its {name} changed"
    if after.state == HoldState.CAPTURED and after.capture_entry_id not in new_entry_ids:
        return f"captured by entry {after.capture_entry_id}, which this commit did not post"
    return ""


def check_entry(entry: Entry, when: str) -> None:
    problem = entry_problem(entry)
    if problem:
        raise violation(
            problem, kind="entry", record_id=entry.entry_id, tenant_id=entry.tenant_id, when=when
        )


def check_hold(hold: Hold, when: str) -> None:
    problem = hold_problem(hold)
    if problem:
        raise violation(
            problem, kind="hold", record_id=hold.hold_id, tenant_id=hold.tenant_id, when=when
        )


def check_account(account: AccountState, when: str) -> None:
    for value in account.counters():
        if not 0 <= value <= INT64_MAX:
            raise violation(
                f"counter {value} is not in 0..{INT64_MAX} ({account.counters()})",
                kind="account",
                record_id=account.account_id,
                tenant_id=account.tenant_id,
                when=when,
            )


def check_hold_changes(
    loaded: Mapping[str, Hold],
    changed: Mapping[str, Hold],
    new_keys: set[str],
    new_entry_ids: set[str],
) -> None:
    """Every hold a commit writes, against the hold as the commit loaded it."""
    for key, after in changed.items():
        problem = hold_change_problem(loaded.get(key), after, key in new_keys, new_entry_ids)
        if problem:
            raise violation(
                problem,
                kind="hold",
                record_id=after.hold_id,
                tenant_id=after.tenant_id,
                when="before writing",
            )
