"""Human review: a case per `review` or `hold` decision; claim, then resolve.

A case carries the model's suggestion (decline when the risk score reached the
bundle's `decline_suggestion_score`, approve below it, none without a score),
so the human-overrule rate (resolutions against the suggestion) can be
measured. Resolving writes the case and its `policy.case.resolved` event in one
transaction (an outbox); a relay publishes the event to NATS.

Approving a payout's case is a decision of its own (PolicyEngine.resolve_case):
logged before the case is written, under the key `review:<case_id>` (so
resolving again, here or on another replica, finds the same decision and the
same token), with a token for exactly the movement the reviewed decision
named. The event carries that token to the money plane; a decline carries
none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from policy_plane.model import DecisionRecord
from policy_plane.store import CaseRow, OutboxRow, PolicyStore
from triplane.runtime.clock import Clock
from triplane.runtime.errors import FailedPrecondition, InvalidArgument, NotFound

RESOLUTIONS = ("approve", "decline")
STATUSES = ("open", "claimed", "resolved")


class CaseBody(msgspec.Struct, frozen=True, kw_only=True):
    case_id: str
    tenant_id: str
    decision_id: str
    account_id: str
    outcome: str
    reason_codes: list[str]
    status: str
    amount_minor: int
    currency: str
    score_model: str = ""
    score_version: str = ""
    score_source: str = ""
    score_value: float = 0.0
    score_id: str = ""
    model_suggestion: str = ""
    assignee: str = ""
    resolution: str = ""
    note: str = ""
    overruled: bool = False
    opened_at_us: int = 0
    claimed_at_us: int = 0
    resolved_at_us: int = 0
    bundle_version: str = ""
    # The decision an approval of a payout's case issued.
    approval_decision_id: str = ""


@dataclass(frozen=True, slots=True)
class ReviewedMovement:
    """What the resolved event says of the reviewed decision's movement:
    its kind and key, and for an approved payout the approval's token."""

    movement: str
    idempotency_key: str
    decision_token: str = ""


EventEncoder = Callable[[CaseBody, int, ReviewedMovement | None], OutboxRow]


def case_id_for(decision_id: str) -> str:
    return f"case_{decision_id}"


def approval_key(case_id: str) -> str:
    """The decision-log key of a case's approval (one per case)."""
    return f"review:{case_id}"


def model_suggestion(record: DecisionRecord, decline_score: float) -> str:
    score = record.input.snapshot.score
    if score.source not in ("triton", "in_process", "last_good"):
        return ""
    return "decline" if score.score >= decline_score else "approve"


def new_case(record: DecisionRecord, suggestion: str, now_us: int) -> CaseRow:
    inp = record.input
    score = inp.snapshot.score
    body = CaseBody(
        case_id=case_id_for(record.decision_id),
        tenant_id=inp.tenant_id,
        decision_id=record.decision_id,
        account_id=inp.payment.account_id,
        outcome=record.verdict.outcome,
        reason_codes=record.verdict.reason_codes,
        status="open",
        amount_minor=inp.payment.amount_minor,
        currency=inp.payment.currency,
        score_model=score.model,
        score_version=score.version,
        score_source=score.source,
        score_value=score.score,
        score_id=score.score_id,
        model_suggestion=suggestion,
        opened_at_us=now_us,
        bundle_version=record.bundle_version,
    )
    return to_row(body)


def to_row(body: CaseBody) -> CaseRow:
    return CaseRow(
        body.case_id,
        body.tenant_id,
        body.decision_id,
        body.status,
        msgspec.json.encode(body).decode(),
        body.opened_at_us,
    )


def from_row(row: CaseRow) -> CaseBody:
    return msgspec.json.decode(row.body, type=CaseBody)


@dataclass(frozen=True, slots=True)
class OverruleStats:
    resolved_with_suggestion: int
    overruled: int

    @property
    def rate(self) -> float:
        return (
            self.overruled / self.resolved_with_suggestion if self.resolved_with_suggestion else 0.0
        )


class CaseDesk:
    def __init__(
        self, store: PolicyStore, clock: Clock, encode_event: EventEncoder, max_note_length: int
    ) -> None:
        self._store = store
        self._clock = clock
        self._encode_event = encode_event
        self._max_note = max_note_length

    def get(self, tenant_id: str, case_id: str) -> CaseBody:
        row = self._store.get_case(case_id)
        if row is None or row.tenant_id != tenant_id:
            raise NotFound("CASE_NOT_FOUND", f"no case {case_id!r}", "case_id")
        return from_row(row)

    def list_cases(
        self, tenant_id: str, status: str, after_case_id: str, limit: int
    ) -> list[CaseBody]:
        if status and status not in STATUSES:
            raise InvalidArgument("CASE_STATUS_INVALID", "unknown case status", "status")
        return [
            from_row(r) for r in self._store.list_cases(tenant_id, status, after_case_id, limit)
        ]

    def claim(self, tenant_id: str, case_id: str, reviewer: str) -> CaseBody:
        _check_reviewer(reviewer)
        case = self.get(tenant_id, case_id)
        if case.status == "claimed" and case.assignee == reviewer:
            return case
        if case.status != "open":
            raise FailedPrecondition(
                "CASE_NOT_OPEN", f"case is {case.status} by {case.assignee or 'nobody'}", "case_id"
            )
        claimed = msgspec.structs.replace(
            case, status="claimed", assignee=reviewer, claimed_at_us=self._clock.now_us()
        )
        if not self._store.update_case(to_row(claimed), "open", None):
            raise FailedPrecondition("CASE_NOT_OPEN", "case was claimed concurrently", "case_id")
        return claimed

    def check_resolution(
        self, tenant_id: str, case_id: str, reviewer: str, resolution: str, note: str
    ) -> CaseBody:
        """The case if `reviewer` may resolve it so (a resolved case only
        when it was resolved so already); refused with the field otherwise."""
        _check_reviewer(reviewer)
        if resolution not in RESOLUTIONS:
            raise InvalidArgument(
                "RESOLUTION_INVALID", "resolution is approve or decline", "resolution"
            )
        if len(note) > self._max_note:
            raise InvalidArgument("NOTE_TOO_LONG", f"note over {self._max_note} characters", "note")
        case = self.get(tenant_id, case_id)
        if case.status == "resolved":
            if (case.resolution, case.assignee) == (resolution, reviewer):
                return case
            raise FailedPrecondition(
                "CASE_ALREADY_RESOLVED", f"case was resolved: {case.resolution}", "case_id"
            )
        if case.status != "claimed" or case.assignee != reviewer:
            raise FailedPrecondition(
                "CASE_NOT_CLAIMED_BY_REVIEWER", "claim the case before resolving it", "reviewer"
            )
        return case

    def resolve(
        self,
        tenant_id: str,
        case_id: str,
        reviewer: str,
        resolution: str,
        note: str,
        reviewed: ReviewedMovement | None = None,
        approval_decision_id: str = "",
    ) -> CaseBody:
        case = self.check_resolution(tenant_id, case_id, reviewer, resolution, note)
        if case.status == "resolved":
            return case
        now_us = self._clock.now_us()
        resolved = msgspec.structs.replace(
            case,
            status="resolved",
            resolution=resolution,
            note=note,
            resolved_at_us=now_us,
            overruled=bool(case.model_suggestion) and case.model_suggestion != resolution,
            approval_decision_id=approval_decision_id,
        )
        if not self._store.update_case(
            to_row(resolved), "claimed", self._encode_event(resolved, now_us, reviewed)
        ):
            raise FailedPrecondition(
                "CASE_ALREADY_RESOLVED", "case was resolved concurrently", "case_id"
            )
        return resolved

    def overrule_stats(self, tenant_id: str) -> OverruleStats:
        cases = [
            msgspec.json.decode(b, type=CaseBody)
            for b in self._store.resolved_case_bodies(tenant_id)
        ]
        with_suggestion = [c for c in cases if c.model_suggestion]
        return OverruleStats(len(with_suggestion), sum(c.overruled for c in with_suggestion))


def _check_reviewer(reviewer: str) -> None:
    if not reviewer or len(reviewer) > 64:
        raise InvalidArgument("REVIEWER_INVALID", "reviewer is 1 to 64 characters", "reviewer")
