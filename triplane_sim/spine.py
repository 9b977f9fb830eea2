"""Synthetic activity as the events the real planes would publish on the
spine: payments and inflows as the money plane's `entry.posted`, the rest as
the gateway's behavioural events (for the demo, the tests and the benchmark)."""

from __future__ import annotations

from ai_plane.features import ActivityKind
from ai_plane.pipeline import ENTRY_POSTED
from triplane.ai.v1 import ai_pb2
from triplane.common.v1 import types_pb2
from triplane.money.v1 import money_pb2
from triplane.runtime.bus import OutgoingEvent, make_envelope, subject_for
from triplane_sim.synth import LabeledActivity

KIND_TO_BEHAVIOUR: dict[ActivityKind, ai_pb2.BehaviourKind.ValueType] = {
    ActivityKind.DECLINED: ai_pb2.BEHAVIOUR_KIND_PAYMENT_DECLINED,
    ActivityKind.RETRIED: ai_pb2.BEHAVIOUR_KIND_PAYMENT_RETRIED,
    ActivityKind.KYC_FAILED: ai_pb2.BEHAVIOUR_KIND_KYC_FAILED,
    ActivityKind.REPAYMENT_MADE: ai_pb2.BEHAVIOUR_KIND_REPAYMENT_MADE,
    ActivityKind.REPAYMENT_MISSED: ai_pb2.BEHAVIOUR_KIND_REPAYMENT_MISSED,
}


def synthetic_envelope(event: LabeledActivity) -> OutgoingEvent | None:
    """The envelope the real planes would publish for a synthetic activity:
    payments and inflows as ledger entries, the rest as behavioural events."""
    a = event.activity
    money = types_pb2.Money(amount_minor=a.amount_minor, currency="USD")
    if a.kind in (ActivityKind.PAYMENT, ActivityKind.INFLOW):
        payment = a.kind is ActivityKind.PAYMENT
        counterpart = a.merchant_id if payment else "funding"
        debit, credit = (a.account_id, counterpart) if payment else (counterpart, a.account_id)
        metadata = {"merchant_id": a.merchant_id, "device_id": a.device_id} if payment else {}
        if payment:
            metadata["merchant_category"] = event.merchant_category
        entry = money_pb2.Entry(
            tenant_id=a.tenant_id,
            entry_id=a.event_id,
            kind=money_pb2.TRANSFER_KIND_TRANSFER,
            amount=money,
            metadata=metadata,
            postings=[
                money_pb2.Posting(
                    account_id=debit, side=money_pb2.POSTING_SIDE_DEBIT, amount=money
                ),
                money_pb2.Posting(
                    account_id=credit, side=money_pb2.POSTING_SIDE_CREDIT, amount=money
                ),
            ],
        )
        envelope = make_envelope(
            event_type=ENTRY_POSTED,
            tenant_id=a.tenant_id,
            payload=money_pb2.EntryPostedEvent(entry=entry),
            occurred_at_us=a.occurred_at_us,
            event_id=a.event_id,
            account_id=a.account_id,
            amount=money,
        )
        return OutgoingEvent(
            envelope.event_id, subject_for(ENTRY_POSTED, a.tenant_id), envelope.SerializeToString()
        )
    behaviour = KIND_TO_BEHAVIOUR.get(a.kind)
    if behaviour is None:
        return None
    kind_name = ai_pb2.BehaviourKind.Name(behaviour).removeprefix("BEHAVIOUR_KIND_").lower()
    event_type = f"gateway.behaviour.{kind_name}"
    envelope = make_envelope(
        event_type=event_type,
        tenant_id=a.tenant_id,
        payload=ai_pb2.BehaviourEvent(
            kind=behaviour,
            account_id=a.account_id,
            device_id=a.device_id,
            merchant_id=a.merchant_id,
        ),
        occurred_at_us=a.occurred_at_us,
        event_id=a.event_id,
        account_id=a.account_id,
    )
    return OutgoingEvent(
        envelope.event_id, subject_for(event_type, a.tenant_id), envelope.SerializeToString()
    )
