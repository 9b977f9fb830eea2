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
from policy_plane.store import CaseRow, OutboxRow, OverruleCount, PolicyStore, ResolutionRow
from triplane.runtime.clock import Clock
from triplane.runtime.errors import FailedPrecondition, InvalidArgument, NotFound

RESOLUTIONS = ("approve", "decline")
STATUSES = ("open", "claimed", "resolved")
# GetOverruleSeries: a day's buckets unless asked otherwise; no narrower
# than a minute, no more than this many in one window.
DEFAULT_BUCKET_S = 86_400
MIN_BUCKET_S = 60
MAX_OVERRULE_BUCKETS = 1000
# Cases indexed per transaction by the backfill of case_resolutions.
BACKFILL_PAGE = 500


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


def resolution_row(case: CaseBody) -> ResolutionRow:
    return ResolutionRow(
        case.case_id,
        case.tenant_id,
        case.resolved_at_us,
        case.model_suggestion,
        case.resolution,
        case.overruled,
    )


@dataclass(frozen=True, slots=True)
class OverruleSeries:
    """Every bucket of a window (empty ones too), from its start, each
    `bucket_us` wide; `total` sums them."""

    start_us: int
    bucket_us: int
    buckets: list[OverruleCount]
    total: OverruleCount


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
        self.backfill_resolutions()

    def backfill_resolutions(self) -> int:
        """Indexes the cases resolved before case_resolutions existed (a
        page at a time; replicas may race, a row already there is left),
        then records that it is done so later starts read nothing."""
        if self._store.resolutions_backfilled():
            return 0
        done, after = 0, ""
        while page := self._store.unindexed_resolved_cases(after, BACKFILL_PAGE):
            self._store.index_resolutions([resolution_row(from_row(r)) for r in page])
            done += len(page)
            after = page[-1].case_id
        self._store.mark_resolutions_backfilled(done)
        return done

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
            to_row(resolved),
            "claimed",
            self._encode_event(resolved, now_us, reviewed),
            resolution_row(resolved),
        ):
            raise FailedPrecondition(
                "CASE_ALREADY_RESOLVED", "case was resolved concurrently", "case_id"
            )
        return resolved

    def overrule_stats(self, tenant_id: str) -> OverruleStats:
        return OverruleStats(*self._store.overrule_totals(tenant_id))

    def overrule_series(
        self, tenant_id: str, start_us: int, end_us: int, bucket_s: int
    ) -> OverruleSeries:
        """A tenant's resolutions in [start_us, end_us) per bucket of
        bucket_s seconds (0: a day): the human-overrule rate over time."""
        if not start_us:
            raise InvalidArgument("FIELD_REQUIRED", "start_time is required", "start_time")
        if not end_us:
            raise InvalidArgument("FIELD_REQUIRED", "end_time is required", "end_time")
        if end_us <= start_us:
            raise InvalidArgument("WINDOW_INVALID", "end_time must be after start_time", "end_time")
        bucket_s = bucket_s or DEFAULT_BUCKET_S
        if bucket_s < MIN_BUCKET_S:
            raise InvalidArgument(
                "BUCKET_INVALID", f"bucket_seconds is at least {MIN_BUCKET_S}", "bucket_seconds"
            )
        bucket_us = bucket_s * 1_000_000
        count = -(-(end_us - start_us) // bucket_us)
        if count > MAX_OVERRULE_BUCKETS:
            raise InvalidArgument(
                "TOO_MANY_BUCKETS",
                f"the window holds {count} buckets of bucket_seconds, at most "
                f"{MAX_OVERRULE_BUCKETS}",
                "bucket_seconds",
            )
        found = {
            c.bucket: c for c in self._store.overrule_counts(tenant_id, start_us, end_us, bucket_us)
        }
        buckets = [found.get(i, OverruleCount(i, 0, 0, 0)) for i in range(count)]
        total = OverruleCount(
            0,
            sum(b.resolved for b in buckets),
            sum(b.with_suggestion for b in buckets),
            sum(b.overruled for b in buckets),
        )
        return OverruleSeries(start_us, bucket_us, buckets, total)


def _check_reviewer(reviewer: str) -> None:
    if not reviewer or len(reviewer) > 64:
        raise InvalidArgument("REVIEWER_INVALID", "reviewer is 1 to 64 characters", "reviewer")
