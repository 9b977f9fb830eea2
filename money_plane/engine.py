"""The ledger engine: applies a group of jobs to loaded state, in memory.

The store loads (and locks) every row a group of jobs touches, the engine
decides each command against that state, and the store writes what changed in
the same transaction. Deciding in memory is what makes group commit safe: a
failed transfer is undone from the in-memory state alone (an undo log), so it
never fails the transfers committed beside it, and an atomic job rolls back
as a whole. Nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from money_plane.domain import (
    REFUNDABLE,
    AccountState,
    Command,
    Constraint,
    Entry,
    Hold,
    HoldState,
    IdempotencyRecord,
    ItemError,
    Kind,
    Leg,
    Outcome,
    Posting,
    Reserve,
    Side,
    account_key,
    credit_account_of,
    movement_of,
    new_id,
    scoped_key,
    split_amounts,
)
from triplane.runtime.errors import (
    AlreadyExists,
    Code,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    TriplaneError,
)
from triplane.runtime.tokens import TokenVerifier

# Failures decided by ledger state are remembered under the idempotency key, as
# TigerBeetle does: the key is spent, and a retry gets the same answer even if
# the state has changed since. Failures about the request itself (malformed,
# unknown account, bad token, key reused) write nothing and are not remembered.
# Nor is LINKED_TRANSFER_FAILED: a transfer refused only because its atomic
# batch failed was not judged itself (the failure was its neighbour's), so its
# key stays free to be used again, alone or in another batch.
REMEMBERED_REASONS = frozenset(
    {
        "INSUFFICIENT_FUNDS",
        "CREDIT_LIMIT_EXCEEDED",
        "BALANCE_OVERFLOW",
        "HOLD_ALREADY_CAPTURED",
        "HOLD_ALREADY_VOIDED",
        "HOLD_EXPIRED",
        "CAPTURE_EXCEEDS_HOLD",
        "REFUND_EXCEEDS_ENTRY",
        "ENTRY_FULLY_REFUNDED",
        "ENTRY_NOT_REFUNDABLE",
    }
)


def normalized_fingerprint(cmd: Command) -> list[Any]:
    """The fingerprint as it reads back from storage (tuples become lists)."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(cmd.fingerprint()))  # type: ignore[no-any-return]


def token_fingerprint(cmd: Command) -> str:
    """What a decision token was spent on: the transfer as its idempotency
    fingerprint sees it, with its key. The same transfer retried with the same
    token has the same one; anything else is another transfer."""
    material = msgspec.msgpack.encode([cmd.idempotency_key, cmd.fingerprint()])
    return hashlib.sha256(material).hexdigest()[:32]


def first_difference(stored: list[Any], fresh: list[Any]) -> str:
    for (name, old), (_, new) in zip(stored, fresh, strict=True):
        if old != new:
            return str(name)
    return ""


@dataclass
class EventSpec:
    """An event to write to the outbox in the same transaction."""

    event_type: str
    tenant_id: str
    account_id: str
    idempotency_key: str
    amount_minor: int
    currency: str
    decision_id: str
    record: Entry | Hold


@dataclass
class Job:
    """One request: its commands commit together only if `atomic`."""

    tenant_id: str
    commands: list[Command]
    atomic: bool = False
    # Field path prefix per command, for errors ("transfers[3]").
    fields: list[str] = dataclasses.field(default_factory=list)
    # Errors decided before the engine (e.g. a bad token): index -> error.
    preset_errors: dict[int, TriplaneError] = dataclasses.field(default_factory=dict)


@dataclass
class View:
    """Rows loaded (and locked) for one group commit, keyed by scoped key."""

    accounts: dict[str, AccountState] = dataclasses.field(default_factory=dict)
    holds: dict[str, Hold] = dataclasses.field(default_factory=dict)
    entries: dict[str, Entry] = dataclasses.field(default_factory=dict)
    reserves: dict[str, Reserve] = dataclasses.field(default_factory=dict)
    idempotency: dict[str, IdempotencyRecord] = dataclasses.field(default_factory=dict)
    # Spent decision token ids (tenant/jti) -> the fingerprint of the transfer.
    used_tokens: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UsedToken:
    """A spent decision token id, written with the transfer it authorized."""

    token_key: str
    fingerprint: str
    expires_at_us: int
    used_at_us: int


@dataclass
class Changes:
    """What the store must write once every job of the group was applied."""

    touched_accounts: set[str] = dataclasses.field(default_factory=set)
    new_entries: list[Entry] = dataclasses.field(default_factory=list)
    updated_entries: dict[str, Entry] = dataclasses.field(default_factory=dict)
    holds: dict[str, Hold] = dataclasses.field(default_factory=dict)
    new_holds: set[str] = dataclasses.field(default_factory=set)
    new_reserves: list[Reserve] = dataclasses.field(default_factory=list)
    released_reserves: dict[str, Reserve] = dataclasses.field(default_factory=dict)
    deferred_reserves: dict[str, Reserve] = dataclasses.field(default_factory=dict)
    new_idempotency: list[IdempotencyRecord] = dataclasses.field(default_factory=list)
    new_used_tokens: list[UsedToken] = dataclasses.field(default_factory=list)
    events: list[EventSpec] = dataclasses.field(default_factory=list)


_MISSING = object()


class UndoLog:
    def __init__(self) -> None:
        self._steps: list[Callable[[], None]] = []

    def mark(self) -> int:
        return len(self._steps)

    def rollback(self, mark: int) -> None:
        while len(self._steps) > mark:
            self._steps.pop()()

    def put(self, mapping: dict[str, Any], key: str, value: Any) -> None:
        old = mapping.get(key, _MISSING)

        def undo() -> None:
            if old is _MISSING:
                mapping.pop(key, None)
            else:
                mapping[key] = old

        self._steps.append(undo)
        mapping[key] = value

    def append(self, items: list[Any], value: Any) -> None:
        self._steps.append(items.pop)
        items.append(value)

    def add(self, items: set[str], value: str) -> None:
        if value not in items:
            self._steps.append(lambda: items.discard(value))
            items.add(value)

    def counters(self, account: AccountState) -> None:
        saved = account.counters()

        def undo() -> None:
            (
                account.debits_posted,
                account.credits_posted,
                account.debits_pending,
                account.credits_pending,
            ) = saved

        self._steps.append(undo)


def _item_error(err: TriplaneError) -> ItemError:
    return ItemError(code=int(err.code), reason=err.reason, field=err.field, message=err.message)


class Engine:
    """Applies jobs to a View, recording Changes. One Engine per group commit."""

    def __init__(
        self, view: View, now_us: int, default_hold_timeout_s: int, reserve_retry_s: int = 3600
    ) -> None:
        self.view = view
        self.now_us = now_us
        self.default_hold_timeout_s = default_hold_timeout_s
        self.reserve_retry_s = reserve_retry_s
        self.changes = Changes()
        self._undo = UndoLog()

    # ---- jobs ----

    def run_job(self, job: Job) -> list[Outcome]:
        if job.atomic:
            return self._run_atomic(job)
        return [self._run_one(job, index) for index in range(len(job.commands))]

    def _run_atomic(self, job: Job) -> list[Outcome]:
        """All or nothing. Commands are remembered as they run (in the undo
        log), so a key repeated inside the batch replays instead of running
        twice; on failure everything, remembered keys included, is undone."""
        mark = self._undo.mark()
        outcomes: list[Outcome] = []
        for index in range(len(job.commands)):
            outcome = self._run_one(job, index)
            outcomes.append(outcome)
            if not outcome.ok:
                break
        else:
            return outcomes
        failed_at = len(outcomes) - 1
        self._undo.rollback(mark)
        failure = outcomes[failed_at]
        cause = failure.error
        assert cause is not None
        # Only the cause is remembered (a cause that is itself a replay was
        # remembered by the original call); its neighbours' keys stay free.
        remember = cause.reason in REMEMBERED_REASONS and not failure.replayed
        results: list[Outcome] = []
        for index, cmd in enumerate(job.commands):
            where = job.fields[index] if job.fields else "transfer"
            known = self._replay_or_conflict(cmd, where)
            if known is not None:
                results.append(known)
                continue
            if index == failed_at:
                if remember:
                    self._remember(cmd, failure)
                results.append(failure)
                continue
            results.append(
                Outcome(
                    error=ItemError(
                        code=int(Code.FAILED_PRECONDITION),
                        reason="LINKED_TRANSFER_FAILED",
                        field=where,
                        message=f"transfer {failed_at} of this atomic batch failed: {cause.reason}",
                    )
                )
            )
        return results

    def _replay_or_conflict(self, cmd: Command, where: str) -> Outcome | None:
        """The remembered outcome for the command's key, a conflict if the key
        was used for another request, or None for a new key."""
        existing = self.view.idempotency.get(scoped_key(cmd.tenant_id, cmd.idempotency_key))
        if existing is None:
            return None
        differs = first_difference(existing.fingerprint, normalized_fingerprint(cmd))
        if differs:
            err = AlreadyExists(
                "IDEMPOTENCY_KEY_REUSED",
                f"idempotency key was used for a different request ({differs} differs)",
                f"{where}.{differs}",
            )
            return Outcome(error=_item_error(err))
        return msgspec.structs.replace(existing.outcome, replayed=True)

    def _run_one(self, job: Job, index: int) -> Outcome:
        cmd = job.commands[index]
        where = job.fields[index] if job.fields else "transfer"
        if cmd.kind in (Kind.EXPIRE_HOLD, Kind.RESERVE_RELEASE):
            return self._internal(cmd)
        known = self._replay_or_conflict(cmd, where)
        if known is not None:
            return known
        preset = job.preset_errors.get(index)
        if preset is not None:
            return Outcome(error=_item_error(preset))
        if cmd.token_expired:
            expired = PermissionDenied(
                "DECISION_TOKEN_EXPIRED", "decision token has expired", f"{where}.decision_token"
            )
            return Outcome(error=_item_error(expired))
        if cmd.claims is not None:
            reused = self._token_reused(cmd, where)
            if reused is not None:
                return Outcome(error=_item_error(reused))
        if cmd.kind in (Kind.CAPTURE, Kind.VOID):
            # Expiry found late still happens, even though the command fails.
            self._expire_if_due(self.view.holds.get(scoped_key(cmd.tenant_id, cmd.hold_id)))
        mark = self._undo.mark()
        try:
            outcome = self._dispatch(cmd, where)
        except TriplaneError as err:
            self._undo.rollback(mark)
            outcome = Outcome(error=_item_error(err))
            if err.reason in REMEMBERED_REASONS:
                self._remember(cmd, outcome)
            if not err.reason.startswith("DECISION_TOKEN"):
                self._spend_token(cmd)
            return outcome
        self._remember(cmd, outcome)
        self._spend_token(cmd)
        return outcome

    def _token_reused(self, cmd: Command, where: str) -> PermissionDenied | None:
        """A token id already spent on another transfer (another fingerprint)."""
        assert cmd.claims is not None
        spent = self.view.used_tokens.get(scoped_key(cmd.tenant_id, cmd.claims.token_id))
        if spent is None or spent == token_fingerprint(cmd):
            return None
        return PermissionDenied(
            "DECISION_TOKEN_REUSED",
            "this decision token was already presented for another transfer",
            f"{where}.decision_token",
        )

    def _spend_token(self, cmd: Command) -> None:
        """Records the token id as spent on this transfer, whatever became of
        it: a failure that is not remembered frees the idempotency key, never
        the token for another transfer. Outside the undo log on purpose (an
        atomic batch that rolls back still spent the tokens it tried)."""
        claims = cmd.claims
        if claims is None:
            return
        key = scoped_key(cmd.tenant_id, claims.token_id)
        if key in self.view.used_tokens:
            return
        fingerprint = token_fingerprint(cmd)
        self.view.used_tokens[key] = fingerprint
        self.changes.new_used_tokens.append(
            UsedToken(key, fingerprint, claims.expires_at_s * 1_000_000, self.now_us)
        )

    def _check_claims(
        self,
        cmd: Command,
        where: str,
        debit_account_id: str,
        credit_account_id: str,
        amount_minor: int,
        currency: str,
    ) -> None:
        """A capture's or refund's token against what it will really do."""
        if cmd.claims is None:
            return
        movement = movement_of(
            cmd,
            debit_account_id=debit_account_id,
            credit_account_id=credit_account_id,
            amount_minor=amount_minor,
            currency=currency,
        )
        TokenVerifier.check_movement(cmd.claims, movement, f"{where}.decision_token")

    def _remember(self, cmd: Command, outcome: Outcome) -> None:
        scope = scoped_key(cmd.tenant_id, cmd.idempotency_key)
        # A key is written once, ever: the unique index would refuse a second.
        assert scope not in self.view.idempotency, f"{scope} remembered twice"
        record = IdempotencyRecord(
            scope_key=scope,
            fingerprint=normalized_fingerprint(cmd),
            outcome=outcome,
            created_at_us=self.now_us,
        )
        self._undo.put(self.view.idempotency, scope, record)
        self._undo.append(self.changes.new_idempotency, record)

    def _dispatch(self, cmd: Command, where: str) -> Outcome:
        if cmd.kind in (
            Kind.TRANSFER,
            Kind.PAYOUT,
            Kind.PAYOUT_SETTLEMENT,
            Kind.PAYOUT_REVERSAL,
            Kind.SETTLEMENT,
        ):
            return self._transfer(cmd, where)
        if cmd.kind == Kind.AUTHORIZE:
            return self._authorize(cmd, where)
        if cmd.kind == Kind.CAPTURE:
            return self._capture(cmd, where)
        if cmd.kind == Kind.VOID:
            return self._void(cmd, where)
        if cmd.kind == Kind.REFUND:
            return self._refund(cmd, where)
        raise InvalidArgument("UNKNOWN_KIND", f"unknown transfer kind {cmd.kind}", f"{where}.kind")

    # ---- helpers ----

    def _account(self, tenant_id: str, account_id: str, field: str, currency: str) -> AccountState:
        account = self.view.accounts.get(account_key(tenant_id, account_id))
        if account is None:
            # Another tenant's account is indistinguishable from no account.
            raise NotFound("ACCOUNT_NOT_FOUND", f"no account {account_id!r}", field)
        if account.currency != currency:
            raise InvalidArgument(
                "CURRENCY_MISMATCH",
                f"account {account_id!r} holds {account.currency}, not {currency}",
                field,
            )
        return account

    def _apply(self, deltas: list[tuple[AccountState, str, int, str]]) -> None:
        """Adds each delta to an account counter, then checks every account
        touched; raises (and the caller rolls back) on any violation."""
        for account, counter, delta, _ in deltas:
            self._undo.counters(account)
            setattr(account, counter, getattr(account, counter) + delta)
            self._undo.add(self.changes.touched_accounts, account.key)
        for account, _, _, field in deltas:
            reason = account.violation()
            if reason == "BALANCE_OVERFLOW":
                raise OutOfRange(reason, f"balance of {account.account_id!r} would overflow", field)
            if reason:
                raise FailedPrecondition(
                    reason,
                    f"account {account.account_id!r} would break its balance constraint",
                    field,
                )

    def _credit_legs(
        self,
        cmd: Command,
        where: str,
        total_minor: int,
        remainder_account: AccountState,
        currency: str,
        remainder_field: str,
    ) -> tuple[list[Posting], list[tuple[AccountState, str, int, str]], list[Leg]]:
        """Credit postings for a split (legs + remainder leg) of total_minor.
        Reserve legs come back with `basis_points` replaced by the index of
        their posting in the entry (the debit posting is index 0)."""
        parts = split_amounts(total_minor, cmd.splits)
        if sum(parts) > total_minor:
            raise InvalidArgument(
                "SPLITS_EXCEED_AMOUNT",
                "split legs add up to more than the amount",
                f"{where}.splits",
            )
        postings: list[Posting] = []
        deltas: list[tuple[AccountState, str, int, str]] = []
        reserve_legs: list[Leg] = []
        for index, (leg, part) in enumerate(zip(cmd.splits, parts, strict=True)):
            leg_field = f"{where}.splits[{index}].account_id"
            account = self._account(cmd.tenant_id, leg.account_id, leg_field, currency)
            if leg.release_account_id:
                self._account(
                    cmd.tenant_id,
                    leg.release_account_id,
                    f"{where}.splits[{index}].release_account_id",
                    currency,
                )
            if part == 0:
                continue
            postings.append(
                Posting(
                    account_id=leg.account_id,
                    side=Side.CREDIT,
                    amount_minor=part,
                    currency=currency,
                    label=leg.label,
                )
            )
            deltas.append((account, "credits_posted", part, leg_field))
            if leg.release_account_id:
                reserve_legs.append(
                    msgspec.structs.replace(leg, amount_minor=part, basis_points=len(postings))
                )
        remainder = total_minor - sum(parts)
        if remainder:
            postings.append(
                Posting(
                    account_id=remainder_account.account_id,
                    side=Side.CREDIT,
                    amount_minor=remainder,
                    currency=currency,
                    label="remainder",
                )
            )
            deltas.append((remainder_account, "credits_posted", remainder, remainder_field))
        return postings, deltas, reserve_legs

    def _post_entry(self, entry: Entry) -> None:
        self._undo.append(self.changes.new_entries, entry)
        self._undo.put(self.view.entries, scoped_key(entry.tenant_id, entry.entry_id), entry)
        debit = next(p for p in entry.postings if p.side == Side.DEBIT)
        self._undo.append(
            self.changes.events,
            EventSpec(
                event_type="money.entry.posted",
                tenant_id=entry.tenant_id,
                account_id=debit.account_id,
                idempotency_key=entry.idempotency_key,
                amount_minor=entry.amount_minor,
                currency=entry.currency,
                decision_id=entry.decision_id,
                record=entry,
            ),
        )

    def _save_hold(self, hold: Hold, event_type: str, new: bool = False) -> None:
        key = scoped_key(hold.tenant_id, hold.hold_id)
        self._undo.put(self.view.holds, key, hold)
        self._undo.put(self.changes.holds, key, hold)
        if new:
            self._undo.add(self.changes.new_holds, key)
        self._undo.append(
            self.changes.events,
            EventSpec(
                event_type=event_type,
                tenant_id=hold.tenant_id,
                account_id=hold.debit_account_id,
                idempotency_key=hold.idempotency_key,
                amount_minor=hold.amount_minor,
                currency=hold.currency,
                decision_id=hold.decision_id,
                record=hold,
            ),
        )

    def _with_reserves(self, entry: Entry, legs: list[Leg]) -> Entry:
        if not legs:
            return entry
        release_to = [""] * len(entry.postings)
        for leg in legs:
            release_to[leg.basis_points] = leg.release_account_id
        return msgspec.structs.replace(
            entry,
            reserve_release_to=release_to,
            reserve_released=[False] * len(entry.postings),
        )

    def _add_reserves(self, entry: Entry, legs: list[Leg]) -> None:
        for leg in legs:
            reserve = Reserve(
                tenant_id=entry.tenant_id,
                reserve_id=new_id("rsv", self.now_us),
                entry_id=entry.entry_id,
                account_id=leg.account_id,
                release_account_id=leg.release_account_id,
                amount_minor=leg.amount_minor,
                currency=entry.currency,
                release_at_us=leg.release_at_us,
                posting_index=leg.basis_points,
            )
            self._undo.append(self.changes.new_reserves, reserve)

    # ---- commands ----

    def _transfer(self, cmd: Command, where: str) -> Outcome:
        debit = self._account(
            cmd.tenant_id, cmd.debit_account_id, f"{where}.debit_account_id", cmd.currency
        )
        credit = self._account(
            cmd.tenant_id, cmd.credit_account_id, f"{where}.credit_account_id", cmd.currency
        )
        credits, deltas, reserve_legs = self._credit_legs(
            cmd, where, cmd.amount_minor, credit, cmd.currency, f"{where}.credit_account_id"
        )
        deltas.insert(0, (debit, "debits_posted", cmd.amount_minor, f"{where}.debit_account_id"))
        self._apply(deltas)
        entry = Entry(
            tenant_id=cmd.tenant_id,
            entry_id=new_id("ent", self.now_us),
            idempotency_key=cmd.idempotency_key,
            kind=cmd.kind,
            postings=[
                Posting(
                    account_id=debit.account_id,
                    side=Side.DEBIT,
                    amount_minor=cmd.amount_minor,
                    currency=cmd.currency,
                ),
                *credits,
            ],
            posted_at_us=self.now_us,
            amount_minor=cmd.amount_minor,
            currency=cmd.currency,
            decision_id=cmd.decision_id,
            description=cmd.description,
            metadata=cmd.metadata,
            refunded_by_posting=[0] * (1 + len(credits)),
            credit_account_id=credit.account_id,
        )
        entry = self._with_reserves(entry, reserve_legs)
        self._post_entry(entry)
        self._add_reserves(entry, reserve_legs)
        return Outcome(entry=entry)

    def _authorize(self, cmd: Command, where: str) -> Outcome:
        debit = self._account(
            cmd.tenant_id, cmd.debit_account_id, f"{where}.debit_account_id", cmd.currency
        )
        credit = self._account(
            cmd.tenant_id, cmd.credit_account_id, f"{where}.credit_account_id", cmd.currency
        )
        self._apply(
            [
                (debit, "debits_pending", cmd.amount_minor, f"{where}.debit_account_id"),
                (credit, "credits_pending", cmd.amount_minor, f"{where}.credit_account_id"),
            ]
        )
        timeout_s = cmd.hold_timeout_s or self.default_hold_timeout_s
        hold = Hold(
            tenant_id=cmd.tenant_id,
            hold_id=new_id("hld", self.now_us),
            idempotency_key=cmd.idempotency_key,
            debit_account_id=debit.account_id,
            credit_account_id=credit.account_id,
            amount_minor=cmd.amount_minor,
            currency=cmd.currency,
            state=HoldState.PENDING,
            created_at_us=self.now_us,
            expires_at_us=self.now_us + timeout_s * 1_000_000,
            decision_id=cmd.decision_id,
        )
        self._save_hold(hold, "money.hold.authorized", new=True)
        return Outcome(hold=hold)

    def _pending_hold(self, cmd: Command, where: str) -> Hold:
        hold = self.view.holds.get(scoped_key(cmd.tenant_id, cmd.hold_id))
        if hold is None:
            raise NotFound("HOLD_NOT_FOUND", f"no hold {cmd.hold_id!r}", f"{where}.hold_id")
        if hold.state == HoldState.CAPTURED:
            raise FailedPrecondition(
                "HOLD_ALREADY_CAPTURED", "the hold was already captured", f"{where}.hold_id"
            )
        if hold.state == HoldState.VOIDED:
            raise FailedPrecondition(
                "HOLD_ALREADY_VOIDED", "the hold was voided", f"{where}.hold_id"
            )
        if hold.state == HoldState.EXPIRED:
            raise FailedPrecondition("HOLD_EXPIRED", "the hold has expired", f"{where}.hold_id")
        assert hold.state == HoldState.PENDING
        return hold

    def _release_pending(self, hold: Hold) -> list[tuple[AccountState, str, int, str]]:
        debit = self.view.accounts[account_key(hold.tenant_id, hold.debit_account_id)]
        credit = self.view.accounts[account_key(hold.tenant_id, hold.credit_account_id)]
        return [
            (debit, "debits_pending", -hold.amount_minor, "hold_id"),
            (credit, "credits_pending", -hold.amount_minor, "hold_id"),
        ]

    def _capture(self, cmd: Command, where: str) -> Outcome:
        hold = self._pending_hold(cmd, where)
        amount = cmd.amount_minor or hold.amount_minor
        if cmd.currency and cmd.currency != hold.currency:
            raise InvalidArgument(
                "CURRENCY_MISMATCH", f"the hold is in {hold.currency}", f"{where}.amount.currency"
            )
        if amount > hold.amount_minor:
            raise OutOfRange(
                "CAPTURE_EXCEEDS_HOLD",
                f"capture of {amount} exceeds the hold of {hold.amount_minor}",
                f"{where}.amount.amount_minor",
            )
        self._check_claims(
            cmd, where, hold.debit_account_id, hold.credit_account_id, amount, hold.currency
        )
        debit = self.view.accounts[account_key(hold.tenant_id, hold.debit_account_id)]
        credit = self.view.accounts[account_key(hold.tenant_id, hold.credit_account_id)]
        credits, deltas, reserve_legs = self._credit_legs(
            cmd, where, amount, credit, hold.currency, f"{where}.hold_id"
        )
        deltas = [
            *self._release_pending(hold),
            (debit, "debits_posted", amount, f"{where}.hold_id"),
            *deltas,
        ]
        self._apply(deltas)
        entry = Entry(
            tenant_id=cmd.tenant_id,
            entry_id=new_id("ent", self.now_us),
            idempotency_key=cmd.idempotency_key,
            kind=Kind.CAPTURE,
            postings=[
                Posting(
                    account_id=debit.account_id,
                    side=Side.DEBIT,
                    amount_minor=amount,
                    currency=hold.currency,
                ),
                *credits,
            ],
            posted_at_us=self.now_us,
            amount_minor=amount,
            currency=hold.currency,
            hold_id=hold.hold_id,
            # A capture with splits was decided on its own; one without acts
            # under the hold's decision.
            decision_id=cmd.decision_id or hold.decision_id,
            description=cmd.description,
            metadata=cmd.metadata,
            refunded_by_posting=[0] * (1 + len(credits)),
            credit_account_id=credit.account_id,
        )
        entry = self._with_reserves(entry, reserve_legs)
        self._post_entry(entry)
        self._add_reserves(entry, reserve_legs)
        captured = msgspec.structs.replace(
            hold, state=HoldState.CAPTURED, captured_minor=amount, capture_entry_id=entry.entry_id
        )
        self._save_hold(captured, "money.hold.captured")
        return Outcome(entry=entry, hold=captured)

    def _void(self, cmd: Command, where: str) -> Outcome:
        hold = self._pending_hold(cmd, where)
        self._apply(self._release_pending(hold))
        voided = msgspec.structs.replace(hold, state=HoldState.VOIDED)
        self._save_hold(voided, "money.hold.voided")
        return Outcome(hold=voided)

    def _refund(self, cmd: Command, where: str) -> Outcome:
        original = self.view.entries.get(scoped_key(cmd.tenant_id, cmd.entry_id))
        if original is None:
            raise NotFound("ENTRY_NOT_FOUND", f"no entry {cmd.entry_id!r}", f"{where}.entry_id")
        if original.kind not in REFUNDABLE:
            raise FailedPrecondition(
                "ENTRY_NOT_REFUNDABLE",
                "only transfers, payouts and captures are refundable",
                f"{where}.entry_id",
            )
        if cmd.currency and cmd.currency != original.currency:
            raise InvalidArgument(
                "CURRENCY_MISMATCH",
                f"the entry is in {original.currency}",
                f"{where}.amount.currency",
            )
        remaining = original.amount_minor - original.refunded_minor
        amount = cmd.amount_minor or remaining
        instrument = original.postings[0]
        assert instrument.side == Side.DEBIT, "an entry's first posting is its debit"
        # A refund gives back to the account the payment debited, taking it
        # from the one it credited: the token must say so, and the amount,
        # before anything about the entry is answered (and remembered).
        self._check_claims(
            cmd,
            where,
            credit_account_of(original),
            instrument.account_id,
            amount,
            original.currency,
        )
        if remaining == 0:
            raise FailedPrecondition(
                "ENTRY_FULLY_REFUNDED",
                "the entry was already refunded in full",
                f"{where}.entry_id",
            )
        if amount > remaining:
            raise OutOfRange(
                "REFUND_EXCEEDS_ENTRY",
                f"refund of {amount} exceeds the {remaining} left",
                f"{where}.amount.amount_minor",
            )
        shares = _refund_shares(original, amount)
        postings: list[Posting] = []
        deltas: list[tuple[AccountState, str, int, str]] = []
        for index, (posting, share) in enumerate(zip(original.postings, shares, strict=True)):
            if share == 0:
                continue
            account_id = posting.account_id
            if original.reserve_released and original.reserve_released[index]:
                account_id = original.reserve_release_to[index]
            account = self.view.accounts[account_key(cmd.tenant_id, account_id)]
            # A refund reverses: what was debited is credited back, and so on.
            side = Side.CREDIT if posting.side == Side.DEBIT else Side.DEBIT
            counter = "credits_posted" if side == Side.CREDIT else "debits_posted"
            postings.append(
                Posting(
                    account_id=account_id,
                    side=side,
                    amount_minor=share,
                    currency=original.currency,
                    label=posting.label,
                )
            )
            deltas.append((account, counter, share, f"{where}.entry_id"))
        self._apply(deltas)
        refund = Entry(
            tenant_id=cmd.tenant_id,
            entry_id=new_id("ent", self.now_us),
            idempotency_key=cmd.idempotency_key,
            kind=Kind.REFUND,
            postings=postings,
            posted_at_us=self.now_us,
            amount_minor=amount,
            currency=original.currency,
            refers_to_entry_id=original.entry_id,
            decision_id=cmd.decision_id,
            description=cmd.description,
            metadata=cmd.metadata,
        )
        updated = msgspec.structs.replace(
            original,
            refunded_minor=original.refunded_minor + amount,
            refund_count=original.refund_count + 1,
            refunded_by_posting=[
                done + share for done, share in zip(_refunded(original), shares, strict=True)
            ],
        )
        key = scoped_key(original.tenant_id, original.entry_id)
        self._undo.put(self.view.entries, key, updated)
        self._undo.put(self.changes.updated_entries, key, updated)
        self._post_entry(refund)
        return Outcome(entry=refund)

    # ---- internal jobs ----

    def _expire_if_due(self, hold: Hold | None) -> bool:
        if hold is None or hold.state != HoldState.PENDING or self.now_us < hold.expires_at_us:
            return False
        self._apply(self._release_pending(hold))
        self._save_hold(
            msgspec.structs.replace(hold, state=HoldState.EXPIRED), "money.hold.expired"
        )
        return True

    def _internal(self, cmd: Command) -> Outcome:
        if cmd.kind == Kind.EXPIRE_HOLD:
            hold = self.view.holds.get(scoped_key(cmd.tenant_id, cmd.hold_id))
            self._expire_if_due(hold)
            return Outcome(hold=self.view.holds.get(scoped_key(cmd.tenant_id, cmd.hold_id)))
        reserve = self.view.reserves.get(scoped_key(cmd.tenant_id, cmd.reserve_id))
        if reserve is None or reserve.released_entry_id or reserve.release_at_us > self.now_us:
            return Outcome()
        mark = self._undo.mark()
        try:
            return self._release_reserve(reserve)
        except TriplaneError as err:
            self._undo.rollback(mark)
            # Refused (the reserve account no longer holds the money): try
            # again later, and meanwhile let the releases due after it go.
            key = scoped_key(reserve.tenant_id, reserve.reserve_id)
            deferred = msgspec.structs.replace(
                reserve, release_at_us=self.now_us + self.reserve_retry_s * 1_000_000
            )
            self._undo.put(self.view.reserves, key, deferred)
            self._undo.put(self.changes.deferred_reserves, key, deferred)
            return Outcome(error=_item_error(err))

    def _release_reserve(self, reserve: Reserve) -> Outcome:
        origin_key = scoped_key(reserve.tenant_id, reserve.entry_id)
        origin = self.view.entries[origin_key]
        # Refunds may already have taken part of the reserve leg back.
        amount = reserve.amount_minor - _refunded(origin)[reserve.posting_index]
        released_flags = list(origin.reserve_released)
        released_flags[reserve.posting_index] = True
        updated_origin = msgspec.structs.replace(origin, reserve_released=released_flags)
        self._undo.put(self.view.entries, origin_key, updated_origin)
        self._undo.put(self.changes.updated_entries, origin_key, updated_origin)
        key = scoped_key(reserve.tenant_id, reserve.reserve_id)
        if amount == 0:
            released = msgspec.structs.replace(reserve, released_entry_id="-")
            self._undo.put(self.view.reserves, key, released)
            self._undo.put(self.changes.released_reserves, key, released)
            return Outcome()
        source = self.view.accounts[account_key(reserve.tenant_id, reserve.account_id)]
        target = self.view.accounts[account_key(reserve.tenant_id, reserve.release_account_id)]
        self._apply(
            [
                (source, "debits_posted", amount, "reserve.account_id"),
                (target, "credits_posted", amount, "reserve.release_account_id"),
            ]
        )
        entry = Entry(
            tenant_id=reserve.tenant_id,
            entry_id=new_id("ent", self.now_us),
            idempotency_key=f"reserve-release:{reserve.reserve_id}",
            kind=Kind.RESERVE_RELEASE,
            postings=[
                Posting(
                    account_id=source.account_id,
                    side=Side.DEBIT,
                    amount_minor=amount,
                    currency=reserve.currency,
                    label="reserve_release",
                ),
                Posting(
                    account_id=target.account_id,
                    side=Side.CREDIT,
                    amount_minor=amount,
                    currency=reserve.currency,
                    label="reserve_release",
                ),
            ],
            posted_at_us=self.now_us,
            amount_minor=amount,
            currency=reserve.currency,
            refers_to_entry_id=reserve.entry_id,
        )
        self._post_entry(entry)
        released = msgspec.structs.replace(reserve, released_entry_id=entry.entry_id)
        self._undo.put(self.view.reserves, key, released)
        self._undo.put(self.changes.released_reserves, key, released)
        return Outcome(entry=entry)


def _refunded(entry: Entry) -> list[int]:
    return entry.refunded_by_posting or [0] * len(entry.postings)


def _refund_shares(entry: Entry, amount_minor: int) -> list[int]:
    """How much of each posting a refund of amount_minor reverses.

    Each side (debits, credits) is prorated over what is left unrefunded of its
    postings: floor shares, then the residue one unit at a time to the postings
    with the most left. Prorating over what is left (not the original) makes
    the last refund reverse exactly what remains, so no posting is ever
    reversed beyond its amount.
    """
    done = _refunded(entry)
    shares = [0] * len(entry.postings)
    for side in (Side.DEBIT, Side.CREDIT):
        indexes = [i for i, p in enumerate(entry.postings) if p.side == side]
        left = {i: entry.postings[i].amount_minor - done[i] for i in indexes}
        total_left = sum(left.values())
        assert total_left >= amount_minor, "refund beyond the entry: checked by the caller"
        for i in indexes:
            shares[i] = amount_minor * left[i] // total_left if total_left else 0
        residue = amount_minor - sum(shares[i] for i in indexes)
        for i in sorted(indexes, key=lambda i: (-(left[i] - shares[i]), i)):
            if residue == 0:
                break
            if shares[i] < left[i]:
                shares[i] += 1
                residue -= 1
        assert residue == 0
    return shares


def check_constraint_kinds() -> None:
    """Import-time sanity: the engine knows every constraint kind."""
    assert {c.value for c in Constraint} == {1, 2, 3}


check_constraint_kinds()
