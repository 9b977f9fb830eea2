"""Translation between triplane.money.v1 protobuf messages and domain values,
and the encoding of ledger events into the one envelope. Times, money and
pages are read and written by the runtime's one vocabulary (`wire`)."""

from __future__ import annotations

from money_plane.domain import (
    AccountSpec,
    AccountState,
    Command,
    Entry,
    Hold,
    ItemError,
    Leg,
    Outcome,
    Posting,
    Tenant,
    credit_account_of,
)
from money_plane.engine import EventSpec
from money_plane.store.base import BalanceCheck, PostingRow
from triplane.common.v1 import types_pb2
from triplane.money.v1 import money_pb2 as pb
from triplane.runtime import codec as wire
from triplane.runtime.bus import OutgoingEvent, make_envelope, new_event_id, subject_for
from triplane.runtime.currencies import INT64_MAX
from triplane.runtime.errors import InvalidArgument

# The one list this plane pages (ListAccountPostings), resumed after a
# posting's number in its account.
POSTINGS_PAGE = "money.account_postings"
# The kind of the tokens issued before postings were numbered per account
# (they name a number of the old global sequence): refused with their own
# message, since they cannot be translated.
GLOBAL_POSTINGS_PAGE = "money.postings"
ACCOUNTS_PAGE = "money.accounts"
TENANTS_PAGE = "money.tenants"


def postings_position(page_token: str) -> int:
    """The posting number a ListAccountPostings page token resumes after (0:
    the first page). A token of the global sequence that numbered postings
    before (schema version 1) is PAGE_TOKEN_INVALID saying so."""
    try:
        position = wire.decode_page_token(page_token, POSTINGS_PAGE, (int,))
    except InvalidArgument:
        try:
            wire.decode_page_token(page_token, GLOBAL_POSTINGS_PAGE, (int,))
        except InvalidArgument:
            pass
        else:
            raise InvalidArgument(
                wire.PAGE_TOKEN_INVALID,
                "page_token was issued before postings were numbered per account; "
                "list again from the first page",
                "page_token",
            ) from None
        raise
    return int(position[0]) if position is not None else 0


def tenant(value: Tenant) -> pb.Tenant:
    return pb.Tenant(
        tenant_id=value.tenant_id,
        display_name=value.display_name,
        created_at=wire.timestamp(value.created_at_us),
    )


def account_spec(message: pb.NewAccount) -> AccountSpec:
    return AccountSpec(
        account_id=message.account_id,
        currency=message.currency,
        kind=message.kind,
        constraint=message.constraint,
        overdraft_limit_minor=message.overdraft_limit_minor,
        metadata=dict(message.metadata),
    )


def command(tenant_id: str, message: pb.Transfer, where: str = "transfer") -> Command:
    return Command(
        tenant_id=tenant_id,
        idempotency_key=message.idempotency_key,
        kind=message.kind,
        debit_account_id=message.debit_account_id,
        credit_account_id=message.credit_account_id,
        amount_minor=message.amount.amount_minor,
        currency=message.amount.currency,
        splits=[
            Leg(
                account_id=leg.account_id,
                kind=leg.kind,
                amount_minor=leg.amount_minor,
                basis_points=leg.basis_points,
                label=leg.label,
                release_at_us=wire.micros(leg.release_at, f"{where}.splits[{index}].release_at"),
                release_account_id=leg.release_account_id,
            )
            for index, leg in enumerate(message.splits)
        ],
        hold_id=message.hold_id,
        entry_id=message.entry_id,
        hold_timeout_s=message.hold_timeout_s,
        description=message.description,
        metadata=dict(message.metadata),
        decision_token=message.decision_token,
    )


def balance(account: AccountState, as_of_us: int) -> pb.Balance:
    return pb.Balance(
        currency=account.currency,
        debits_posted_minor=account.debits_posted,
        credits_posted_minor=account.credits_posted,
        debits_pending_minor=account.debits_pending,
        credits_pending_minor=account.credits_pending,
        posted_minor=account.posted,
        available_minor=account.available,
        as_of=wire.timestamp(as_of_us),
    )


def account(state: AccountState, now_us: int) -> pb.Account:
    return pb.Account(
        tenant_id=state.tenant_id,
        account_id=state.account_id,
        currency=state.currency,
        kind=state.kind,  # type: ignore[arg-type]
        constraint=state.constraint,  # type: ignore[arg-type]
        overdraft_limit_minor=state.overdraft_limit_minor,
        metadata=state.metadata,
        balance=balance(state, now_us),
        created_at=wire.timestamp(state.created_at_us),
    )


def posting(value: Posting, entry: Entry) -> pb.Posting:
    return pb.Posting(
        account_id=value.account_id,
        side=value.side,  # type: ignore[arg-type]
        amount=wire.money(value.amount_minor, value.currency),
        entry_id=entry.entry_id,
        posted_at=wire.timestamp(entry.posted_at_us),
    )


def account_posting(row: PostingRow) -> pb.Posting:
    """A posting as ListAccountPostings lists it, with its sequence."""
    return pb.Posting(
        account_id=row.account_id,
        side=row.side,  # type: ignore[arg-type]
        amount=wire.money(row.amount_minor, row.currency),
        entry_id=row.entry_id,
        sequence=row.sequence,
        posted_at=wire.timestamp(row.posted_at_us),
    )


def fill_entry(message: pb.Entry, value: Entry) -> pb.Entry:
    """Writes an entry into an (empty) message in place.

    On the hot path (every transfer's response and event): building the
    message field by field, sub-messages included, is about twice as fast as
    keyword construction, which copies every nested message. The result is
    the same message as `pb.Entry(...)` with `posting`, `wire.money` and
    `wire.timestamp` (the codec tests compare the two).
    """
    message.tenant_id = value.tenant_id
    message.entry_id = value.entry_id
    message.idempotency_key = value.idempotency_key
    message.kind = value.kind  # type: ignore[assignment]
    posted_at = message.posted_at
    wire.fill_timestamp(posted_at, value.posted_at_us)
    seconds, nanos = posted_at.seconds, posted_at.nanos
    entry_id = value.entry_id
    add = message.postings.add
    for p in value.postings:
        item = add(account_id=p.account_id, side=p.side, entry_id=entry_id)
        amount = item.amount
        amount.amount_minor = p.amount_minor
        amount.currency = p.currency
        stamp = item.posted_at
        stamp.seconds = seconds
        stamp.nanos = nanos
    message.hold_id = value.hold_id
    message.refers_to_entry_id = value.refers_to_entry_id
    amount = message.amount
    amount.amount_minor = value.amount_minor
    amount.currency = value.currency
    message.refunded_minor = value.refunded_minor
    message.decision_id = value.decision_id
    message.description = value.description
    message.credit_account_id = credit_account_of(value)
    message.refund_count = value.refund_count
    if value.metadata:
        message.metadata.update(value.metadata)
    return message


def entry(value: Entry) -> pb.Entry:
    return fill_entry(pb.Entry(), value)


def hold(value: Hold) -> pb.Hold:
    return pb.Hold(
        tenant_id=value.tenant_id,
        hold_id=value.hold_id,
        idempotency_key=value.idempotency_key,
        debit_account_id=value.debit_account_id,
        credit_account_id=value.credit_account_id,
        amount=wire.money(value.amount_minor, value.currency),
        captured_minor=value.captured_minor,
        state=value.state,  # type: ignore[arg-type]
        created_at=wire.timestamp(value.created_at_us),
        expires_at=wire.timestamp(value.expires_at_us),
        capture_entry_id=value.capture_entry_id,
        decision_id=value.decision_id,
    )


def item_error(value: ItemError) -> types_pb2.ItemError:
    return types_pb2.ItemError(
        code=value.code, reason=value.reason, field=value.field, message=value.message
    )


def result(index: int, outcome: Outcome) -> pb.TransferResult:
    message = pb.TransferResult(index=index, replayed=outcome.replayed)
    if outcome.entry is not None:
        fill_entry(message.entry, outcome.entry)
    if outcome.hold is not None:
        message.hold.CopyFrom(hold(outcome.hold))
    if outcome.error is not None:
        message.error.CopyFrom(item_error(outcome.error))
    return message


def encode_event(spec: EventSpec, now_us: int) -> OutgoingEvent:
    """An outbox row: the envelope, with event_id fixed now and kept for good."""
    payload: pb.EntryPostedEvent | pb.HoldChangedEvent
    if isinstance(spec.record, Entry):
        payload = pb.EntryPostedEvent()
        fill_entry(payload.entry, spec.record)
    else:
        payload = pb.HoldChangedEvent(hold=hold(spec.record))
    envelope = make_envelope(
        event_type=spec.event_type,
        tenant_id=spec.tenant_id,
        payload=payload,
        occurred_at_us=now_us,
        event_id=new_event_id(),
        account_id=spec.account_id,
        idempotency_key=spec.idempotency_key,
        amount=wire.money(spec.amount_minor, spec.currency),
        policy_decision=spec.decision_id,
    )
    return OutgoingEvent(
        event_id=envelope.event_id,
        subject=subject_for(spec.event_type, spec.tenant_id),
        data=envelope.SerializeToString(),
    )


def encode_account_event(state: AccountState, now_us: int) -> OutgoingEvent:
    envelope = make_envelope(
        event_type="money.account.opened",
        tenant_id=state.tenant_id,
        payload=pb.AccountOpenedEvent(account=account(state, now_us)),
        occurred_at_us=now_us,
        account_id=state.account_id,
    )
    return OutgoingEvent(
        event_id=envelope.event_id,
        subject=subject_for("money.account.opened", state.tenant_id),
        data=envelope.SerializeToString(),
    )


def _saturate(total_minor: int) -> int:
    """A currency's total volume may exceed int64; the wire field saturates
    (the `balanced` flag is computed on exact integers)."""
    return min(total_minor, INT64_MAX)


def check_balanced_response(check: BalanceCheck) -> pb.CheckBalancedResponse:
    return pb.CheckBalancedResponse(
        balanced=check.balanced,
        totals=[
            pb.CurrencyTotal(
                currency=t.currency,
                debits_minor=_saturate(t.debits_minor),
                credits_minor=_saturate(t.credits_minor),
                pending_debits_minor=_saturate(t.pending_debits_minor),
                pending_credits_minor=_saturate(t.pending_credits_minor),
            )
            for t in check.totals
        ],
        accounts_checked=check.accounts_checked,
        postings_checked=check.postings_checked,
    )
