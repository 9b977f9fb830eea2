"""Reconciliation adjustments as decisions (PolicyEngine.decide_adjustment)
under the default bundle: a write-off below params.adjustment_review_minor is
allowed with a token for exactly the ledger's transfer; above it a case opens
that the requester cannot approve and another operator's approval issues the
token; without a reason it is denied; replay reproduces each; malformed
requests are refused with the field named and log nothing."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

from policy_plane.adjustments import AdjustmentRequest
from policy_plane.engine import PolicyEngine
from policy_plane.replay import ReplayWindow
from triplane.runtime.errors import InvalidArgument, PermissionDenied
from triplane.runtime.tokens import Movement, TokenVerifier

from .conftest import TENANT


def write_off(
    key: str, amount_minor: int, reason: str = "bank fee never booked"
) -> AdjustmentRequest:
    break_id = f"brk_{key}"
    return AdjustmentRequest(
        tenant_id=TENANT,
        idempotency_key=f"adj-{key}",
        resolution="write_off",
        break_id=break_id,
        requested_by="fina",
        reason=reason,
        debit_account_id="recon-write-off",
        credit_account_id="bank",
        amount_minor=amount_minor,
        currency="USD",
        ledger_idempotency_key=f"recon-writeoff-{break_id}",
    )


def ledger_movement(req: AdjustmentRequest) -> Movement:
    """The transfer the money plane's ResolveBreak posts for `req`."""
    return Movement(
        tenant_id=req.tenant_id,
        kind="transfer",
        debit_account_id=req.debit_account_id,
        credit_account_id=req.credit_account_id,
        amount_minor=req.amount_minor,
        currency=req.currency,
        idempotency_key=req.ledger_idempotency_key,
    )


def verify(engine: PolicyEngine, token: str, movement: Movement) -> None:
    TokenVerifier([engine._signer.public_key]).verify(
        token, field="decision_token", movement=movement, now_us=engine.clock.now_us()
    )


async def test_a_small_write_off_is_allowed_with_a_token_for_exactly_its_transfer(
    engine: PolicyEngine,
) -> None:
    req = write_off("small", 5_000)
    decision, replayed = await engine.decide_adjustment(req)
    record = decision.record
    assert not replayed and record.verdict.outcome == "allow", record.verdict.reason_codes
    assert record.verdict.route is None and not record.case_id
    assert record.input.adjustment is not None and record.input.adjustment.requested_by == "fina"
    verify(engine, record.token, ledger_movement(req))
    # Another amount, or another key than the ledger's, is not this token's.
    for other, field in [
        (msgspec.structs.replace(ledger_movement(req), amount_minor=5_001), "amount_minor"),
        (
            msgspec.structs.replace(ledger_movement(req), idempotency_key="adj-small"),
            "idempotency_key",
        ),
    ]:
        with pytest.raises(PermissionDenied) as refused:
            verify(engine, record.token, other)
        assert refused.value.field == f"decision_token.{field}"
    again, replayed = await engine.decide_adjustment(req)
    assert replayed and again.record.decision_id == record.decision_id


async def test_without_a_reason_it_is_denied_and_can_be_asked_again(engine: PolicyEngine) -> None:
    denied, _ = await engine.decide_adjustment(write_off("why", 5_000, reason="  "))
    assert denied.record.verdict.outcome == "deny"
    assert denied.record.verdict.reason_codes == ["ADJUSTMENT_REASON_MISSING"]
    assert not denied.record.token
    # The same break again, with a reason, under the request's new key.
    fixed = dataclasses.replace(write_off("why", 5_000), idempotency_key="adj-why-2")
    allowed, _ = await engine.decide_adjustment(fixed)
    assert allowed.record.verdict.outcome == "allow"
    verify(engine, allowed.record.token, ledger_movement(fixed))


async def test_a_large_write_off_needs_another_operators_approval(engine: PolicyEngine) -> None:
    req = write_off("large", 250_000)
    decision, _ = await engine.decide_adjustment(req)
    record = decision.record
    assert record.verdict.outcome == "review"
    assert record.verdict.reason_codes == ["ADJUSTMENT_SECOND_APPROVER"]
    assert record.case_id and not record.token

    # The requester can neither claim its case nor approve it; the case
    # is left open for another operator.
    with pytest.raises(PermissionDenied) as refused:
        await engine.claim_case(TENANT, record.case_id, "fina")
    assert (refused.value.reason, refused.value.field) == ("CASE_REVIEWER_IS_REQUESTER", "reviewer")
    assert engine.cases.get(TENANT, record.case_id).status == "open"
    engine.cases.claim(TENANT, record.case_id, "fina")  # past the engine's check
    with pytest.raises(PermissionDenied) as refused:
        await engine.resolve_case(TENANT, record.case_id, "fina", "approve", "looks right")
    assert refused.value.reason == "CASE_REVIEWER_IS_REQUESTER"
    assert not engine.cases.get(TENANT, record.case_id).approval_decision_id

    # Another operator approves such a case: the approval's decision carries
    # the token for exactly the transfer the first decision named.
    req2 = write_off("large2", 250_000)
    decision2, _ = await engine.decide_adjustment(req2)
    case_id = decision2.record.case_id
    await engine.claim_case(TENANT, case_id, "vera")
    case = await engine.resolve_case(TENANT, case_id, "vera", "approve", "statement checked")
    assert case.status == "resolved" and case.approval_decision_id
    approval = (await engine.get_decision(TENANT, case.approval_decision_id)).record
    assert approval.verdict.reason_codes == ["CASE_APPROVED"]
    assert approval.review is not None and approval.review.reviewer == "vera"
    verify(engine, approval.token, ledger_movement(req2))
    again = await engine.resolve_case(TENANT, case_id, "vera", "approve", "statement checked")
    assert again.approval_decision_id == case.approval_decision_id


async def test_replay_reproduces_adjustment_decisions(engine: PolicyEngine) -> None:
    await engine.decide_adjustment(write_off("r-allow", 5_000))
    await engine.decide_adjustment(write_off("r-deny", 5_000, reason=""))
    review, _ = await engine.decide_adjustment(write_off("r-review", 500_000))
    await engine.claim_case(TENANT, review.record.case_id, "vera")
    await engine.resolve_case(TENANT, review.record.case_id, "vera", "approve", "ok")
    report = await engine.replay(ReplayWindow(TENANT, "", 0, 0, 0), "")
    assert report.replayed >= 4
    assert report.changed_count == 0 and report.identical == report.replayed


@pytest.mark.parametrize(
    ("change", "reason", "field"),
    [
        ({"resolution": "accepted"}, "RESOLUTION_INVALID", "resolution"),
        ({"requested_by": ""}, "FIELD_REQUIRED", "requested_by"),
        (
            {"ledger_idempotency_key": "recon-writeoff-other"},
            "LEDGER_KEY_INVALID",
            "ledger_idempotency_key",
        ),
        ({"amount_minor": 0}, "AMOUNT_NOT_POSITIVE", "amount.amount_minor"),
        ({"credit_account_id": "recon-write-off"}, "SAME_ACCOUNT", "credit_account_id"),
        ({"reverses_entry_id": "ent_1"}, "FIELD_NOT_ALLOWED", "reverses_entry_id"),
    ],
)
async def test_malformed_requests_are_refused_and_log_nothing(
    engine: PolicyEngine, change: dict[str, object], reason: str, field: str
) -> None:
    before = engine.store.count_decisions(TENANT)
    with pytest.raises(InvalidArgument) as refused:
        await engine.decide_adjustment(dataclasses.replace(write_off("bad", 5_000), **change))  # type: ignore[arg-type]
    assert (refused.value.reason, refused.value.field) == (reason, field)
    assert engine.store.count_decisions(TENANT) == before


async def test_a_reversal_names_the_entry_and_its_token_the_reversing_transfer(
    engine: PolicyEngine,
) -> None:
    base = write_off("rev", 7_500)
    req = dataclasses.replace(
        base,
        resolution="reversal",
        debit_account_id="merchant",
        credit_account_id="bank",
        ledger_idempotency_key=f"recon-reversal-{base.break_id}",
        reverses_entry_id="ent_42",
    )
    decision, _ = await engine.decide_adjustment(req)
    record = decision.record
    assert record.verdict.outcome == "allow"
    assert record.input.adjustment is not None
    assert record.input.adjustment.reverses_entry_id == "ent_42"
    verify(engine, record.token, ledger_movement(req))
    with pytest.raises(InvalidArgument) as refused:
        await engine.decide_adjustment(
            dataclasses.replace(req, idempotency_key="adj-rev-2", reverses_entry_id="")
        )
    assert (refused.value.reason, refused.value.field) == ("FIELD_REQUIRED", "reverses_entry_id")
