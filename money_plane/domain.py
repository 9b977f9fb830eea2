"""Ledger domain values. No grpc, no SQL: pure data and validation.

Kinds and enums use the protobuf numbers of triplane.money.v1 so the servicer
can pass them through, but nothing here imports protobuf.
"""

from __future__ import annotations

import enum
import os
import re

import msgspec

from triplane.runtime import codec as wire
from triplane.runtime import currencies
from triplane.runtime.config import MoneyLimitsConfig
from triplane.runtime.errors import InvalidArgument

# One tenant-id rule for every plane (the one this plane always applied).
from triplane.runtime.ids import check_tenant_id as check_tenant_id
from triplane.runtime.tokens import DecisionClaims, Movement, SplitTerms, splits_digest


class AccountKind(enum.IntEnum):
    ASSET = 1
    LIABILITY = 2
    EQUITY = 3
    REVENUE = 4
    EXPENSE = 5


class Constraint(enum.IntEnum):
    NONE = 1
    DEBITS_MUST_NOT_EXCEED_CREDITS = 2
    CREDITS_MUST_NOT_EXCEED_DEBITS = 3


class Kind(enum.IntEnum):
    TRANSFER = 1
    PAYOUT = 2
    AUTHORIZE = 3
    CAPTURE = 4
    VOID = 5
    REFUND = 6
    # Internal: posted by the ledger's own jobs, never accepted from clients.
    RESERVE_RELEASE = 7
    EXPIRE_HOLD = 8
    # Internal: a payout's later ledger effects (money_plane/payouts), posted
    # by the money plane itself under the payout's original decision, each
    # under a key derived from the payout so it posts once: the rail settled
    # it (in-flight -> bank), or it came back (in-flight or bank -> merchant).
    PAYOUT_SETTLEMENT = 9
    PAYOUT_REVERSAL = 10
    # Internal: a merchant's settled period (money_plane/payouts/settlement.py),
    # within the platform's books: the accrual account to the payable account,
    # the fee and the rolling reserve netted as split legs. No money leaves:
    # a payout from the payable account is decided as every payout is.
    SETTLEMENT = 11


# New money movements carry a policy decision, refunds too (money goes out of
# a merchant's account again). A capture needs one only when it adds split
# destinations: without splits it pays the hold's own credit account, under
# the hold's decision.
NEEDS_TOKEN = frozenset({Kind.TRANSFER, Kind.PAYOUT, Kind.AUTHORIZE, Kind.REFUND})
# Movements whose every term the command itself carries (the others' accounts
# and amounts come from the hold or entry they act on).
SELF_CONTAINED = frozenset({Kind.TRANSFER, Kind.PAYOUT, Kind.AUTHORIZE})
REFUNDABLE = frozenset({Kind.TRANSFER, Kind.PAYOUT, Kind.CAPTURE})
# The `kind` claim of a decision token for each movement.
MOVEMENT_KIND = {
    Kind.TRANSFER: "transfer",
    Kind.PAYOUT: "payout",
    Kind.AUTHORIZE: "authorize",
    Kind.CAPTURE: "capture",
    Kind.REFUND: "refund",
}


class Side(enum.IntEnum):
    DEBIT = 1
    CREDIT = 2


class HoldState(enum.IntEnum):
    PENDING = 1
    CAPTURED = 2
    VOIDED = 3
    EXPIRED = 4


class LegKind(enum.IntEnum):
    FIXED = 1
    BASIS_POINTS = 2


ACCOUNT_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
BASIS_POINTS_TOTAL = 10_000


class Struct(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """Immutable domain record, stored compactly (msgpack arrays)."""


class Tenant(Struct, frozen=True):
    tenant_id: str
    display_name: str
    created_at_us: int


class AccountSpec(Struct, frozen=True):
    account_id: str
    currency: str
    kind: int
    constraint: int
    overdraft_limit_minor: int
    metadata: dict[str, str]


class AccountState(msgspec.Struct, kw_only=True):
    """An account with its four TigerBeetle-style counters. Mutable only
    inside one commit; everything outside gets copies."""

    tenant_id: str
    account_id: str
    currency: str
    kind: int
    constraint: int
    overdraft_limit_minor: int
    metadata: dict[str, str]
    created_at_us: int
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0
    # The store's, kept on the account row it locks and writes anyway: the
    # number of the account's last posting (its history is 1, 2, ... with no
    # global sequence), and the outbox order key of the last commit that
    # changed it (each later commit's events sort after it).
    posting_seq: int = 0
    event_order_us: int = 0

    @property
    def key(self) -> str:
        return account_key(self.tenant_id, self.account_id)

    @property
    def posted(self) -> int:
        return self.credits_posted - self.debits_posted

    @property
    def available(self) -> int:
        return self.credits_posted - self.debits_posted - self.debits_pending

    def violation(self) -> str:
        """The reason this account breaks its constraint or bounds, or ""."""
        for value in (
            self.debits_posted,
            self.credits_posted,
            self.debits_pending,
            self.credits_pending,
        ):
            if value > currencies.INT64_MAX:
                return "BALANCE_OVERFLOW"
            assert value >= 0, f"negative counter on {self.key}: a ledger bug"
        if self.constraint == Constraint.DEBITS_MUST_NOT_EXCEED_CREDITS:
            limit = self.credits_posted + self.overdraft_limit_minor
            if self.debits_posted + self.debits_pending > limit:
                return "INSUFFICIENT_FUNDS"
        if (
            self.constraint == Constraint.CREDITS_MUST_NOT_EXCEED_DEBITS
            and self.credits_posted + self.credits_pending > self.debits_posted
        ):
            return "CREDIT_LIMIT_EXCEEDED"
        return ""

    def counters(self) -> tuple[int, int, int, int]:
        return (self.debits_posted, self.credits_posted, self.debits_pending, self.credits_pending)


def account_key(tenant_id: str, account_id: str) -> str:
    return f"{tenant_id}/{account_id}"


def scoped_key(tenant_id: str, key: str) -> str:
    return f"{tenant_id}/{key}"


class Leg(Struct, frozen=True):
    account_id: str
    kind: int
    amount_minor: int
    basis_points: int
    label: str
    release_at_us: int
    release_account_id: str


class Posting(Struct, frozen=True):
    account_id: str
    side: int
    amount_minor: int
    currency: str
    label: str = ""


class Entry(Struct, frozen=True):
    tenant_id: str
    entry_id: str
    idempotency_key: str
    kind: int
    postings: list[Posting]
    posted_at_us: int
    amount_minor: int
    currency: str
    hold_id: str = ""
    refers_to_entry_id: str = ""
    refunded_minor: int = 0
    # Per posting, how much refunds have reversed (parallel to `postings`).
    refunded_by_posting: list[int] = []
    # Per posting: the account a rolling-reserve leg releases to ("" if none),
    # and whether it was released. A refund after the release charges the
    # release account, since the reserve account no longer holds the money.
    reserve_release_to: list[str] = []
    reserve_released: list[bool] = []
    decision_id: str = ""
    description: str = ""
    metadata: dict[str, str] = {}
    # TRANSFER, PAYOUT: the transfer's credit account; CAPTURE: the hold's.
    # Entries written before it was recorded have "" (see credit_account_of).
    credit_account_id: str = ""
    # Refunds posted against this entry.
    refund_count: int = 0


def credit_account_of(entry: Entry) -> str:
    """The account an entry credited with what its splits left (a refund
    debits it). Older entries did not record it: their remainder posting
    names it when there was a remainder."""
    if entry.credit_account_id:
        return entry.credit_account_id
    for posting in entry.postings:
        if posting.side == Side.CREDIT and posting.label == "remainder":
            return posting.account_id
    return ""


class Hold(Struct, frozen=True):
    tenant_id: str
    hold_id: str
    idempotency_key: str
    debit_account_id: str
    credit_account_id: str
    amount_minor: int
    currency: str
    state: int
    created_at_us: int
    expires_at_us: int
    captured_minor: int = 0
    capture_entry_id: str = ""
    decision_id: str = ""


class Reserve(Struct, frozen=True):
    tenant_id: str
    reserve_id: str
    entry_id: str
    account_id: str
    release_account_id: str
    amount_minor: int
    currency: str
    release_at_us: int
    posting_index: int
    released_entry_id: str = ""


class Command(Struct, frozen=True):
    """One validated transfer request (or an internal job step)."""

    tenant_id: str
    idempotency_key: str
    kind: int
    debit_account_id: str = ""
    credit_account_id: str = ""
    amount_minor: int = 0
    currency: str = ""
    splits: list[Leg] = []
    hold_id: str = ""
    entry_id: str = ""
    hold_timeout_s: int = 0
    description: str = ""
    metadata: dict[str, str] = {}
    # Not part of the idempotency fingerprint: a retry may carry a fresh token.
    decision_token: str = ""
    # Set by the ledger after verifying the decision token (not part of the
    # idempotency fingerprint: a retry may carry a freshly signed token): its
    # claims (the engine checks a capture's and a refund's against the hold
    # or entry, and spends the token id), and whether it had expired.
    decision_id: str = ""
    claims: DecisionClaims | None = None
    token_expired: bool = False
    # Internal jobs: the reserve released.
    reserve_id: str = ""

    def fingerprint(self) -> list[tuple[str, object]]:
        """Request fields compared on idempotent retry, in reporting order."""
        return [
            ("kind", self.kind),
            ("debit_account_id", self.debit_account_id),
            ("credit_account_id", self.credit_account_id),
            ("amount.amount_minor", self.amount_minor),
            ("amount.currency", self.currency),
            ("splits", [msgspec.to_builtins(leg) for leg in self.splits]),
            ("hold_id", self.hold_id),
            ("entry_id", self.entry_id),
            ("hold_timeout_s", self.hold_timeout_s),
            ("description", self.description),
            ("metadata", sorted(self.metadata.items())),
        ]


def needs_token(cmd: Command) -> bool:
    return cmd.kind in NEEDS_TOKEN or (cmd.kind == Kind.CAPTURE and bool(cmd.splits))


def split_terms(legs: list[Leg]) -> list[SplitTerms]:
    return [
        SplitTerms(
            leg.account_id,
            "fixed" if leg.kind == LegKind.FIXED else "basis_points",
            leg.amount_minor,
            leg.basis_points,
            leg.label,
            leg.release_at_us,
            leg.release_account_id,
        )
        for leg in legs
    ]


def movement_of(
    cmd: Command,
    *,
    debit_account_id: str,
    credit_account_id: str,
    amount_minor: int,
    currency: str,
) -> Movement:
    """What the command will do, as a decision token must name it (the
    accounts and amount as resolved: a capture's from its hold, a refund's
    from the refunded entry)."""
    return Movement(
        tenant_id=cmd.tenant_id,
        kind=MOVEMENT_KIND[Kind(cmd.kind)],
        debit_account_id=debit_account_id,
        credit_account_id=credit_account_id,
        amount_minor=amount_minor,
        currency=currency,
        splits_digest=splits_digest(split_terms(cmd.splits)),
        idempotency_key=cmd.idempotency_key,
        hold_id=cmd.hold_id,
        entry_id=cmd.entry_id,
    )


class ItemError(Struct, frozen=True):
    code: int
    reason: str
    field: str
    message: str


class Outcome(Struct, frozen=True):
    """What one command produced: an entry and/or a hold, or an error."""

    entry: Entry | None = None
    hold: Hold | None = None
    error: ItemError | None = None
    replayed: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


class IdempotencyRecord(Struct, frozen=True):
    scope_key: str
    fingerprint: list[tuple[str, object]]
    outcome: Outcome
    created_at_us: int


def new_id(prefix: str, now_us: int) -> str:
    """Time-ordered unique id: prefix, 13 hex of microseconds, 12 random hex."""
    return f"{prefix}_{now_us:013x}{os.urandom(6).hex()}"


# ---- validation of client input (stateless: nothing is read or written) ----


def check_id(value: str, field: str, limits: MoneyLimitsConfig, required: bool = True) -> None:
    if not value:
        if required:
            raise InvalidArgument("FIELD_REQUIRED", f"{field} is required", field)
        return
    if len(value) > limits.max_id_length:
        raise InvalidArgument(
            "STRING_TOO_LONG", f"{field} is longer than {limits.max_id_length}", field
        )
    if not ACCOUNT_ID_RE.fullmatch(value):
        raise InvalidArgument("INVALID_ID", f"{field} must match [A-Za-z0-9_.:-]+", field)


def check_text(value: str, field: str, limits: MoneyLimitsConfig) -> None:
    if len(value) > limits.max_string_length:
        raise InvalidArgument(
            "STRING_TOO_LONG", f"{field} is longer than {limits.max_string_length}", field
        )


def check_metadata(metadata: dict[str, str], field: str, limits: MoneyLimitsConfig) -> None:
    if len(metadata) > limits.max_metadata_entries:
        raise InvalidArgument(
            "TOO_MANY_METADATA_ENTRIES",
            f"{field} has more than {limits.max_metadata_entries} entries",
            field,
        )
    for key, value in metadata.items():
        check_text(key, f"{field}[{key[:32]}]", limits)
        check_text(value, f"{field}[{key[:32]}]", limits)


def check_account_spec(spec: AccountSpec, field: str, limits: MoneyLimitsConfig) -> None:
    check_id(spec.account_id, f"{field}.account_id", limits)
    wire.check_currency(spec.currency, f"{field}.currency")
    if spec.kind not in AccountKind.__members__.values():
        raise InvalidArgument("FIELD_REQUIRED", "kind is required", f"{field}.kind")
    if spec.constraint not in Constraint.__members__.values():
        raise InvalidArgument("FIELD_REQUIRED", "constraint is required", f"{field}.constraint")
    if spec.overdraft_limit_minor < 0:
        raise InvalidArgument(
            "NEGATIVE_OVERDRAFT_LIMIT",
            "overdraft limit must be >= 0",
            f"{field}.overdraft_limit_minor",
        )
    if spec.overdraft_limit_minor and spec.constraint != Constraint.DEBITS_MUST_NOT_EXCEED_CREDITS:
        raise InvalidArgument(
            "OVERDRAFT_WITHOUT_CONSTRAINT",
            "an overdraft limit needs constraint DEBITS_MUST_NOT_EXCEED_CREDITS",
            f"{field}.overdraft_limit_minor",
        )
    check_metadata(spec.metadata, f"{field}.metadata", limits)


def check_legs(cmd: Command, field: str, limits: MoneyLimitsConfig) -> None:
    if len(cmd.splits) > limits.max_splits_per_transfer:
        raise InvalidArgument(
            "TOO_MANY_SPLITS",
            f"more than {limits.max_splits_per_transfer} split legs",
            f"{field}.splits",
        )
    for index, leg in enumerate(cmd.splits):
        where = f"{field}.splits[{index}]"
        check_id(leg.account_id, f"{where}.account_id", limits)
        check_text(leg.label, f"{where}.label", limits)
        if leg.kind == LegKind.FIXED:
            wire.check_amount(leg.amount_minor, f"{where}.amount_minor")
            if leg.basis_points:
                raise InvalidArgument(
                    "CONFLICTING_FIELDS", "a FIXED leg has no basis_points", f"{where}.basis_points"
                )
        elif leg.kind == LegKind.BASIS_POINTS:
            if not 0 < leg.basis_points <= BASIS_POINTS_TOTAL:
                raise InvalidArgument(
                    "INVALID_BASIS_POINTS",
                    "basis_points must be in 1..10000",
                    f"{where}.basis_points",
                )
            if leg.amount_minor:
                raise InvalidArgument(
                    "CONFLICTING_FIELDS",
                    "a BASIS_POINTS leg has no amount_minor",
                    f"{where}.amount_minor",
                )
        else:
            raise InvalidArgument("FIELD_REQUIRED", "leg kind is required", f"{where}.kind")
        if bool(leg.release_at_us) != bool(leg.release_account_id):
            raise InvalidArgument(
                "INCOMPLETE_RESERVE",
                "a reserve leg needs release_at and release_account_id",
                f"{where}.release_account_id",
            )
        if leg.release_account_id:
            check_id(leg.release_account_id, f"{where}.release_account_id", limits)
    if cmd.splits and cmd.amount_minor:
        total = sum(split_amounts(cmd.amount_minor, cmd.splits))
        if total > cmd.amount_minor:
            raise InvalidArgument(
                "SPLITS_EXCEED_AMOUNT",
                "split legs add up to more than the amount",
                f"{field}.splits",
            )


def split_amounts(total_minor: int, legs: list[Leg]) -> list[int]:
    """Each leg's amount. Basis points round down (floor); the residue of every
    leg's rounding stays with the remainder leg, so the parts always add up."""
    return [
        leg.amount_minor
        if leg.kind == LegKind.FIXED
        else total_minor * leg.basis_points // BASIS_POINTS_TOTAL
        for leg in legs
    ]


def check_command(cmd: Command, field: str, limits: MoneyLimitsConfig, max_hold_s: int) -> None:
    """Stateless validation of one transfer; raises with the field path."""
    check_id(cmd.idempotency_key, f"{field}.idempotency_key", limits)
    check_text(cmd.description, f"{field}.description", limits)
    check_metadata(cmd.metadata, f"{field}.metadata", limits)
    kind = cmd.kind
    if kind not in (
        Kind.TRANSFER,
        Kind.PAYOUT,
        Kind.AUTHORIZE,
        Kind.CAPTURE,
        Kind.VOID,
        Kind.REFUND,
    ):
        raise InvalidArgument("FIELD_REQUIRED", "transfer kind is required", f"{field}.kind")
    if kind in SELF_CONTAINED:
        check_id(cmd.debit_account_id, f"{field}.debit_account_id", limits)
        check_id(cmd.credit_account_id, f"{field}.credit_account_id", limits)
        if cmd.debit_account_id == cmd.credit_account_id:
            raise InvalidArgument(
                "SAME_ACCOUNT",
                "debit and credit accounts must differ",
                f"{field}.credit_account_id",
            )
        wire.check_currency(cmd.currency, f"{field}.amount.currency")
        wire.check_amount(cmd.amount_minor, f"{field}.amount.amount_minor")
        _forbid(cmd.hold_id, f"{field}.hold_id")
        _forbid(cmd.entry_id, f"{field}.entry_id")
    else:
        _forbid(cmd.debit_account_id, f"{field}.debit_account_id")
        _forbid(cmd.credit_account_id, f"{field}.credit_account_id")
    if kind == Kind.AUTHORIZE:
        if cmd.splits:
            raise InvalidArgument(
                "SPLITS_NOT_ALLOWED",
                "an authorization has no splits; split at capture",
                f"{field}.splits",
            )
        if not 0 <= cmd.hold_timeout_s <= max_hold_s:
            raise InvalidArgument(
                "HOLD_TIMEOUT_OUT_OF_RANGE",
                f"hold_timeout_s must be in 0..{max_hold_s}",
                f"{field}.hold_timeout_s",
            )
    elif cmd.hold_timeout_s:
        raise InvalidArgument(
            "FIELD_NOT_ALLOWED", "hold_timeout_s is only for AUTHORIZE", f"{field}.hold_timeout_s"
        )
    if kind in (Kind.CAPTURE, Kind.VOID):
        check_id(cmd.hold_id, f"{field}.hold_id", limits)
        _forbid(cmd.entry_id, f"{field}.entry_id")
    if kind == Kind.REFUND:
        check_id(cmd.entry_id, f"{field}.entry_id", limits)
        _forbid(cmd.hold_id, f"{field}.hold_id")
    if kind in (Kind.CAPTURE, Kind.REFUND) and (cmd.amount_minor or cmd.currency):
        wire.check_currency(cmd.currency, f"{field}.amount.currency")
        wire.check_amount(cmd.amount_minor, f"{field}.amount.amount_minor")
    if kind == Kind.VOID and (cmd.amount_minor or cmd.currency):
        raise InvalidArgument("FIELD_NOT_ALLOWED", "a void has no amount", f"{field}.amount")
    if kind in (Kind.VOID, Kind.REFUND) and cmd.splits:
        raise InvalidArgument("SPLITS_NOT_ALLOWED", "no splits here", f"{field}.splits")
    check_legs(cmd, field, limits)


def _forbid(value: str, field: str) -> None:
    if value:
        raise InvalidArgument("FIELD_NOT_ALLOWED", f"{field} does not apply here", field)
