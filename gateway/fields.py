"""Which field of the gateway's request a plane's error is about.

A plane names the field of its own request (`transfer.debit_account_id`,
`payment.amount.currency`); the gateway's caller sent an
`AuthorizePaymentRequest`, where that field is `account_id` or
`amount.currency`. Every error a plane returns passes through `public_error`
(in `gateway.planes`, where plane errors become domain errors), with the table
of the plane request it answered, so the caller is told about its own request.
A plane field the gateway made itself (a decision token, the risk snapshot, a
split) has no counterpart in the caller's request: the error then names no
field rather than one the caller cannot find.

The tables hold for every gateway RPC that sends that plane request: the
gateway fills each plane request from fields of the same name in each of its
own requests (capture, void and refund all have `hold_id` / `entry_id` /
`amount` as authorize has `account_id` / `credit_account_id` / `amount`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from triplane.runtime.errors import TriplaneError


@dataclass(frozen=True, slots=True)
class FieldMap:
    """Plane field path prefix -> the gateway request's field path.

    A prefix matches whole path segments: `transfer.amount` covers
    `transfer.amount.currency` (-> `amount.currency`) but not
    `transfer.amount_minor`."""

    prefixes: Mapping[str, str]

    def public(self, plane_field: str) -> str:
        """The gateway field for `plane_field`, or "" when the caller's request
        has none (the gateway made that part of the plane request)."""
        best = ""
        for prefix in self.prefixes:
            if _covers(prefix, plane_field) and len(prefix) > len(best):
                best = prefix
        if not best:
            return ""
        return self.prefixes[best] + plane_field[len(best) :]


def _covers(prefix: str, path: str) -> bool:
    return path == prefix or (path.startswith(prefix) and path[len(prefix)] in ".[")


def public_error(error: TriplaneError, fields: FieldMap) -> TriplaneError:
    """The same error (code, reason, metadata) naming the gateway request's
    field, in its field path and in its message."""
    if not error.field:
        return error
    field = fields.public(error.field)
    message = error.message
    if field and error.field in message:
        message = message.replace(error.field, field)
    mapped = type(error)(error.reason, message, field, error.metadata)
    mapped.code = error.code
    return mapped


# money CreateTransferRequest, from Authorize/Capture/Void/RefundPayment.
TRANSFER = FieldMap(
    {
        "tenant_id": "tenant_id",
        # Derived from the caller's key: reusing it is the caller's reuse.
        "transfer.idempotency_key": "idempotency_key",
        "transfer.debit_account_id": "account_id",
        "transfer.credit_account_id": "credit_account_id",
        "transfer.amount": "amount",
        "transfer.hold_id": "hold_id",
        "transfer.entry_id": "entry_id",
        "transfer.hold_timeout_s": "hold_timeout_s",
    }
)

# money GetEntryRequest, from RefundPayment reading the payment it refunds.
GET_ENTRY = FieldMap({"tenant_id": "tenant_id", "entry_id": "entry_id"})

# policy EvaluateRequest, from AuthorizePayment. The snapshot's model score,
# velocities and features come from the AI plane, not from the caller.
EVALUATE = FieldMap(
    {
        "tenant_id": "tenant_id",
        "idempotency_key": "idempotency_key",
        "payment.account_id": "account_id",
        "payment.credit_account_id": "credit_account_id",
        "payment.kind": "kind",
        "payment.amount": "amount",
        "payment.payment_method": "payment_method",
        "payment.merchant_id": "merchant_id",
        "payment.merchant_category": "merchant_category",
        "payment.device_id": "device_id",
        "payment.customer": "customer",
        "payment.counterparty": "counterparty",
        "payment.customer_id": "customer.customer_id",
    }
)

# policy EvaluateRequest, from RefundPayment: the accounts and the refund's
# context are the ledger's (the refunded entry), not the caller's.
EVALUATE_REFUND = FieldMap(
    {
        "tenant_id": "tenant_id",
        "idempotency_key": "idempotency_key",
        "payment.amount": "amount",
        "payment.refund.entry_id": "entry_id",
    }
)

# policy GetDecisionRequest, from GetDecision (and AuthorizePayment looking up
# the decision made under its derived key).
GET_DECISION = FieldMap(
    {"tenant_id": "tenant_id", "decision_id": "decision_id", "idempotency_key": "idempotency_key"}
)

# policy GetEligibleOffersRequest, from DecideNextAction (same names).
ELIGIBLE_OFFERS = FieldMap(
    {
        name: name
        for name in ("tenant_id", "customer_id", "partner_id", "region", "kyc_tier", "features")
    }
)

# policy Check/RecordContactRequest, from DecideNextAction and the trigger
# runner (channel and topic are the gateway's choice, not the caller's).
CONTACT = FieldMap({"tenant_id": "tenant_id", "customer_id": "customer_id"})

# policy Put/GetCustomerProfileRequest, from the gateway's own (the policy
# profile carries the tenant; the gateway's request has it at the top).
PROFILE = FieldMap(
    {
        "profile.tenant_id": "tenant_id",
        "profile": "profile",
        "tenant_id": "tenant_id",
        "customer_id": "customer_id",
        "change_id": "change_id",
        "actor": "actor",
    }
)

# AI plane requests: their failures degrade (no score, policy order) and reach
# a caller only as a fallback reason, never as a field.
AI = FieldMap({})

# ai ScoreRequest, from AuthorizePayment: what the AI plane refuses of the
# caller's own request refuses the authorization (a refusal must not be a
# way around the score), naming the caller's field.
SCORE = FieldMap(
    {
        "payment.tenant_id": "tenant_id",
        "payment.account_id": "account_id",
        "payment.device_id": "device_id",
        "payment.merchant_id": "merchant_id",
        "payment.amount": "amount",
        "payment.merchant_category": "merchant_category",
        "payment.attributes": "attributes",
    }
)
