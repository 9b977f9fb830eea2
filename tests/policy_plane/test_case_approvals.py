"""Resolving review cases, on SQLite and PostgreSQL: approving a payout's
case logs a decision of its own whose token allows exactly the reviewed
payout, carried by the case's event; resolving again, or after a crash
between the log and the case, finds the same decision; a decline, and an
approval of anything but a payout, issue none."""

from __future__ import annotations

import msgspec
import pytest

from policy_plane.engine import PolicyEngine
from policy_plane.model import EvaluationInput, movement_of
from triplane.common.v1 import envelope_pb2
from triplane.policy.v1 import policy_pb2 as pb
from triplane.runtime.errors import FailedPrecondition, PermissionDenied
from triplane.runtime.tokens import TokenVerifier

from .conftest import TENANT, payment_input

FEATURES = {"payout_available_minor": 1_000_000.0, "payout_beneficiary_payouts": 0.0}


def payout_input(key: str) -> EvaluationInput:
    """A first payout to a new beneficiary above the threshold: review."""
    return payment_input(
        key,
        kind="payout",
        movement="payout",
        amount_minor=150_000,
        score=None,
        features=FEATURES,
    )


def verifier(engine: PolicyEngine) -> TokenVerifier:
    """A verifier trusting the plane's signing key, as the money plane does."""
    return TokenVerifier([engine._signer.public_key])


def resolved_events(engine: PolicyEngine) -> dict[str, pb.CaseResolved]:
    found = {}
    for event in engine.store.unsent(100):
        envelope = envelope_pb2.EventEnvelope.FromString(event.data)
        if envelope.event_type == "policy.case.resolved":
            payload = pb.CaseResolved.FromString(envelope.payload)
            found[payload.case.case_id] = payload
    return found


async def held(engine: PolicyEngine, inp: EvaluationInput) -> str:
    decision, _ = await engine.evaluate(inp)
    assert decision.record.verdict.outcome == "review", decision.record.verdict.reason_codes
    engine.cases.claim(TENANT, decision.record.case_id, "ana")
    return decision.record.case_id


async def test_approving_a_payouts_case_issues_one_decision_for_exactly_that_payout(
    any_engine: PolicyEngine,
) -> None:
    engine = any_engine
    inp = payout_input("po-approve")
    case_id = await held(engine, inp)
    before = engine.store.count_decisions(TENANT)

    case = await engine.resolve_case(TENANT, case_id, "ana", "approve", "documents checked")
    assert case.status == "resolved" and case.approval_decision_id
    again = await engine.resolve_case(TENANT, case_id, "ana", "approve", "documents checked")
    assert again.approval_decision_id == case.approval_decision_id
    assert engine.store.count_decisions(TENANT) == before + 1

    approval = (await engine.get_decision(TENANT, case.approval_decision_id)).record
    assert approval.verdict.outcome == "allow"
    assert approval.verdict.reason_codes == ["CASE_APPROVED"]
    assert approval.case_id == case_id and approval.review is not None
    assert approval.review.reviewed_decision_id == case.decision_id
    assert approval.review.reviewer == "ana"
    # The token allows the reviewed movement, the payout's key included.
    claims = verifier(engine).verify(
        approval.token,
        field="decision_token",
        movement=movement_of(inp),
        now_us=engine.clock.now_us(),
    )
    assert claims.decision_id == approval.decision_id and claims.kind == "payout"
    other = msgspec.structs.replace(movement_of(inp), idempotency_key="po-other")
    with pytest.raises(PermissionDenied) as refused:
        verifier(engine).verify(
            approval.token, field="decision_token", movement=other, now_us=engine.clock.now_us()
        )
    assert refused.value.field == "decision_token.idempotency_key"

    event = resolved_events(engine)[case_id]
    assert event.movement == pb.MONEY_MOVEMENT_PAYOUT
    assert event.idempotency_key == "po-approve"
    assert event.decision_token == approval.token
    assert event.case.approval_decision_id == approval.decision_id


async def test_an_approval_logged_before_a_crash_is_found_again(any_engine: PolicyEngine) -> None:
    """The approval is logged before the case is written: resolving again
    after a crash between the two finds that decision, not a second one."""
    engine = any_engine
    case_id = await held(engine, payout_input("po-crash"))
    reviewed = await engine.get_decision(TENANT, engine.cases.get(TENANT, case_id).decision_id)
    logged = await engine._approval(reviewed.record, case_id, "ana")
    assert engine.cases.get(TENANT, case_id).status == "claimed"  # the crash: case not written
    # Its token exists: declining now is refused, and changes nothing.
    with pytest.raises(FailedPrecondition) as refused:
        await engine.resolve_case(TENANT, case_id, "ana", "decline", "changed my mind")
    assert (refused.value.reason, refused.value.field) == ("CASE_APPROVAL_LOGGED", "resolution")
    assert engine.cases.get(TENANT, case_id).status == "claimed"
    case = await engine.resolve_case(TENANT, case_id, "ana", "approve", "")
    assert case.approval_decision_id == logged.decision_id
    assert resolved_events(engine)[case_id].decision_token == logged.token


async def test_a_decline_and_a_non_payout_approval_issue_no_decision(
    any_engine: PolicyEngine,
) -> None:
    engine = any_engine
    declined_id = await held(engine, payout_input("po-decline"))
    hold_id = await held(engine, payment_input("auth-risky", score=0.8))
    before = engine.store.count_decisions(TENANT)

    declined = await engine.resolve_case(TENANT, declined_id, "ana", "decline", "not the owner")
    approved_hold = await engine.resolve_case(TENANT, hold_id, "ana", "approve", "")
    assert not declined.approval_decision_id and not approved_hold.approval_decision_id
    assert engine.store.count_decisions(TENANT) == before
    events = resolved_events(engine)
    assert events[declined_id].movement == pb.MONEY_MOVEMENT_PAYOUT
    assert events[declined_id].idempotency_key == "po-decline"
    assert not events[declined_id].decision_token
    assert events[hold_id].movement == pb.MONEY_MOVEMENT_AUTHORIZE
    assert not events[hold_id].decision_token
    # Resolved one way, the other way is refused and issues nothing.
    with pytest.raises(FailedPrecondition) as refused:
        await engine.resolve_case(TENANT, declined_id, "ana", "approve", "")
    assert (refused.value.reason, refused.value.field) == ("CASE_ALREADY_RESOLVED", "case_id")
    assert engine.store.count_decisions(TENANT) == before
