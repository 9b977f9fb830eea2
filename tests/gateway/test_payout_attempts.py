"""What the partner sees of a re-routed payout: the rail it is on, the
alternates left and the rails that failed it, on GetPayout's answer and
on the payout webhook."""

from __future__ import annotations

from gateway.payouts import payout_of, payout_webhook_payload
from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.money.v1 import money_pb2
from triplane.runtime import codec as wire


def _rerouted() -> money_pb2.Payout:
    return money_pb2.Payout(
        tenant_id="t1",
        payout_id="po_1",
        beneficiary_id="ben-1",
        merchant_id="m-1",
        debit_account_id="seller",
        amount=types_pb2.Money(amount_minor=4_321, currency="USD"),
        state=money_pb2.PAYOUT_STATE_APPROVED,
        rail="ach_same_day",
        end_to_end_id="TP1",
        alternate_rails=["card"],
        attempts=[
            money_pb2.PayoutAttempt(
                rail="instant",
                reason_code="AG01",
                reason="transaction forbidden",
                failed_at=wire.timestamp(1_000_000),
            )
        ],
    )


def test_the_partner_sees_the_rails_a_payout_failed_on() -> None:
    shown = payout_of(_rerouted())
    assert (shown.state, shown.rail, list(shown.alternate_rails)) == (
        gw.PAYOUT_STATE_APPROVED,
        "ach_same_day",
        ["card"],
    )
    assert [(a.rail, a.reason_code, a.failed_at.seconds) for a in shown.attempts] == [
        ("instant", "AG01", 1)
    ]
    payload = payout_webhook_payload(_rerouted())
    assert payload["state"] == "approved" and payload["rail"] == "ach_same_day"
    assert payload["attempts"] == [{"rail": "instant", "reason_code": "AG01"}]
    assert payout_webhook_payload(money_pb2.Payout(payout_id="po_2"))["attempts"] == []
