"""Payouts between protobuf and the domain, and their outbox events."""

from __future__ import annotations

from money_plane.payouts.domain import Beneficiary, NewBeneficiary, Payout, PayoutState
from money_plane.rails.adapters import RailOption
from triplane.common.v1 import types_pb2
from triplane.money.v1 import money_pb2 as pb
from triplane.runtime import codec as wire
from triplane.runtime.bus import OutgoingEvent, make_envelope, new_event_id, subject_for


def new_beneficiary(message: pb.NewBeneficiary) -> NewBeneficiary:
    which = message.WhichOneof("destination")
    common = {
        "beneficiary_id": message.beneficiary_id,
        "merchant_id": message.merchant_id,
        "holder_name": message.holder_name,
        "country": message.country,
        "account_token": message.account_token,
        "holder_name_token": message.holder_name_token,
    }
    if which == "iban":
        return NewBeneficiary(kind="iban", iban=message.iban.iban, bic=message.iban.bic, **common)
    if which == "us_bank":
        return NewBeneficiary(
            kind="us_bank",
            routing_number=message.us_bank.routing_number,
            account_number=message.us_bank.account_number,
            account_type=message.us_bank.account_type,
            **common,
        )
    if which == "token":
        return NewBeneficiary(
            kind="token", token_kind=message.token.kind, token=message.token.token, **common
        )
    return NewBeneficiary(kind="", **common)


def beneficiary(value: Beneficiary) -> pb.Beneficiary:
    return pb.Beneficiary(
        tenant_id=value.tenant_id,
        beneficiary_id=value.beneficiary_id,
        merchant_id=value.merchant_id,
        country=value.country,
        kind=value.kind,
        masked=value.masked,
        bic=value.bic,
        routing_number=value.routing_number,
        account_token=value.account_token,
        holder_name_token=value.holder_name_token,
        created_at=wire.timestamp(value.created_at_us),
    )


def payout(value: Payout) -> pb.Payout:
    return pb.Payout(
        tenant_id=value.tenant_id,
        payout_id=value.payout_id,
        idempotency_key=value.idempotency_key,
        beneficiary_id=value.beneficiary_id,
        merchant_id=value.merchant_id,
        debit_account_id=value.debit_account_id,
        amount=wire.money(value.amount_minor, value.currency),
        state=value.state,  # type: ignore[arg-type]
        decision_id=value.decision_id,
        case_id=value.case_id,
        rail=value.rail,
        end_to_end_id=value.end_to_end_id,
        entry_id=value.entry_id,
        settlement_entry_id=value.settlement_entry_id,
        reversal_entry_id=value.reversal_entry_id,
        reason_code=value.reason_code,
        reason=value.reason,
        rail_reference=value.rail_reference,
        created_at=wire.timestamp(value.created_at_us),
        updated_at=wire.timestamp(value.updated_at_us),
        description=value.description,
        alternate_rails=value.alternate_rails,
        attempts=[
            pb.PayoutAttempt(
                rail=a.rail,
                reason_code=a.reason_code,
                reason=a.reason,
                failed_at=wire.timestamp(a.failed_at_us),
            )
            for a in value.attempts
        ],
    )


def rail_option(value: RailOption) -> types_pb2.RailOption:
    return types_pb2.RailOption(
        rail=value.rail,
        method=value.method,
        reachable=value.reachable,
        unreachable_because=value.unreachable_because,
        max_amount_minor=value.max_amount_minor,
        window_open=value.window_open,
        cutoff_at_us=value.cutoff_at_us,
        cost_minor=value.cost_minor,
    )


def encode_payout_event(value: Payout, now_us: int) -> OutgoingEvent:
    """`money.payout.<state>`: the payout as it now is (no account number,
    no name: a beneficiary is named by id)."""
    event_type = f"money.payout.{PayoutState(value.state).label}"
    envelope = make_envelope(
        event_type=event_type,
        tenant_id=value.tenant_id,
        payload=pb.PayoutChangedEvent(payout=payout(value)),
        occurred_at_us=now_us,
        event_id=new_event_id(),
        account_id=value.debit_account_id,
        idempotency_key=f"{value.payout_id}:{PayoutState(value.state).label}",
        amount=wire.money(value.amount_minor, value.currency),
        policy_decision=value.decision_id,
    )
    return OutgoingEvent(
        event_id=envelope.event_id,
        subject=subject_for(event_type, value.tenant_id),
        data=envelope.SerializeToString(),
    )
