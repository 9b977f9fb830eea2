"""Reconciliation adjustments as decisions (PolicyEngine.decide_adjustment).

A write-off or a reversal of a reconciliation break posts a ledger transfer,
and the money plane posts it only under a decision token for exactly that
transfer (architecture rule 1). The operator's request is decided like any
payment: its input (movement `adjustment`, the transfer's accounts, amount,
currency and ledger key, and who asked, for which break, and why) is judged
by the live bundle's adjustment rules, logged, signed and replayable. An
allow carries the token; a review opens a case that another operator must
approve (PolicyEngine.resolve_case refuses the requester), and the approval's
decision carries the token.

The decision's own idempotency key is the request's (a denied request can be
asked again with a reason under another key); the token binds the ledger's
key, `recon-writeoff-<break>` or `recon-reversal-<break>`, so whichever
decision allowed it, the ledger posts the adjustment once.
"""

from __future__ import annotations

from dataclasses import dataclass

from policy_plane import validate
from policy_plane.model import (
    ADJUSTMENT_MOVEMENT,
    AdjustmentInput,
    EvaluationInput,
    PaymentInput,
    SnapshotInput,
)
from triplane.runtime import codec as wire
from triplane.runtime.config import PolicyLimitsConfig
from triplane.runtime.errors import InvalidArgument
from triplane.runtime.ids import check_tenant_id

# The resolutions that post a transfer, and the ledger key each posts under
# (money_plane/recon/reconciler.py `_command`).
LEDGER_KEY_PREFIX = {"write_off": "recon-writeoff-", "reversal": "recon-reversal-"}
# An operator's reason, as logged.
MAX_REASON_LENGTH = 2000


@dataclass(frozen=True, slots=True)
class AdjustmentRequest:
    """DecideAdjustmentRequest, as the engine takes it."""

    tenant_id: str
    idempotency_key: str
    resolution: str
    break_id: str
    requested_by: str
    reason: str
    debit_account_id: str
    credit_account_id: str
    amount_minor: int
    currency: str
    ledger_idempotency_key: str
    reverses_entry_id: str = ""


def ledger_key(resolution: str, break_id: str) -> str:
    """The key the money plane posts a break's resolution under."""
    return f"{LEDGER_KEY_PREFIX[resolution]}{break_id}"


def evaluation_input(req: AdjustmentRequest, limits: PolicyLimitsConfig) -> EvaluationInput:
    """The decision's input; refused with the field named when malformed.
    A missing reason is not refused here: the bundle decides it (deny)."""
    check_tenant_id(req.tenant_id)
    validate.check_id(req.idempotency_key, "idempotency_key", limits)
    if req.resolution not in LEDGER_KEY_PREFIX:
        raise InvalidArgument(
            "RESOLUTION_INVALID",
            f"resolution is one of {', '.join(LEDGER_KEY_PREFIX)}",
            "resolution",
        )
    validate.check_id(req.break_id, "break_id", limits)
    validate.check_id(req.requested_by, "requested_by", limits)
    validate.check_text(req.reason, "reason", MAX_REASON_LENGTH)
    validate.check_id(req.debit_account_id, "debit_account_id", limits)
    validate.check_id(req.credit_account_id, "credit_account_id", limits)
    if req.debit_account_id == req.credit_account_id:
        raise InvalidArgument(
            "SAME_ACCOUNT", "debit and credit accounts must differ", "credit_account_id"
        )
    wire.check_amount(req.amount_minor, "amount.amount_minor")
    wire.check_currency(req.currency, "amount.currency")
    expected = ledger_key(req.resolution, req.break_id)
    if req.ledger_idempotency_key != expected:
        raise InvalidArgument(
            "LEDGER_KEY_INVALID",
            f"a {req.resolution} of break {req.break_id} posts under {expected!r}",
            "ledger_idempotency_key",
        )
    if req.resolution == "reversal":
        validate.check_id(req.reverses_entry_id, "reverses_entry_id", limits)
    elif req.reverses_entry_id:
        raise InvalidArgument(
            "FIELD_NOT_ALLOWED", "reverses_entry_id is for a reversal only", "reverses_entry_id"
        )
    return EvaluationInput(
        tenant_id=req.tenant_id,
        idempotency_key=req.idempotency_key,
        payment=PaymentInput(
            account_id=req.debit_account_id,
            kind=req.resolution,
            amount_minor=req.amount_minor,
            currency=req.currency,
            credit_account_id=req.credit_account_id,
            movement=ADJUSTMENT_MOVEMENT,
        ),
        # No customer: the adjustment rules read no KYC facts.
        snapshot=SnapshotInput(kyc_known=False),
        adjustment=AdjustmentInput(
            resolution=req.resolution,
            break_id=req.break_id,
            requested_by=req.requested_by,
            ledger_idempotency_key=req.ledger_idempotency_key,
            reason=req.reason.strip(),
            reverses_entry_id=req.reverses_entry_id,
        ),
    )
