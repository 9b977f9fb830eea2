"""Protobuf <-> domain translation (no grpc import: the messages only). Times,
money and pages are read and written by the runtime's one vocabulary (`wire`)."""

from __future__ import annotations

from policy_plane.adjustments import AdjustmentRequest
from policy_plane.bundles_registry import BundleInfo
from policy_plane.cases import CaseBody, OverruleSeries, ReviewedMovement
from policy_plane.consent import ConsentRecord, ContactCheck, ContactProfile
from policy_plane.decision_log import VerifyResult
from policy_plane.engine import PolicyMetrics
from policy_plane.model import (
    UNKNOWN_VELOCITY,
    Decision,
    EvaluationInput,
    Party,
    PaymentInput,
    RailFacts,
    RefundInput,
    ScoreInput,
    SnapshotInput,
    SplitInput,
    Velocity,
)
from policy_plane.offers import Eligible, Excluded, OfferEntry, OfferVariant
from policy_plane.profiles import CustomerProfile, ProfileChange
from policy_plane.replay import Confusion, ReplayReport, ReplayWindow
from policy_plane.store import OutboxRow, OverruleCount
from triplane.common.v1 import types_pb2
from triplane.policy.v1 import policy_pb2 as pb
from triplane.runtime import codec as wire
from triplane.runtime.bus import make_envelope, subject_for
from triplane.runtime.errors import InvalidArgument

# The lists this plane pages, each resumed after its own sort key: bundles
# after an offset, offers after an offer id, cases after a case id.
BUNDLES_PAGE = "policy.bundles"
OFFERS_PAGE = "policy.offers"
CASES_PAGE = "policy.cases"

OUTCOMES: dict[str, pb.Outcome.ValueType] = {
    "allow": pb.OUTCOME_ALLOW,
    "review": pb.OUTCOME_REVIEW,
    "hold": pb.OUTCOME_HOLD,
    "deny": pb.OUTCOME_DENY,
}
KINDS: dict[pb.PaymentKind.ValueType, str] = {
    pb.PAYMENT_KIND_PURCHASE: "purchase",
    pb.PAYMENT_KIND_PAYOUT: "payout",
    pb.PAYMENT_KIND_TRANSFER: "transfer",
    pb.PAYMENT_KIND_INVOICE: "invoice",
    pb.PAYMENT_KIND_REFUND: "refund",
}
KIND_ENUMS: dict[str, pb.PaymentKind.ValueType] = {v: k for k, v in KINDS.items()}
# The money movement, as the token's `kind` claim names it.
MOVEMENTS: dict[pb.MoneyMovement.ValueType, str] = {
    pb.MONEY_MOVEMENT_AUTHORIZE: "authorize",
    pb.MONEY_MOVEMENT_TRANSFER: "transfer",
    pb.MONEY_MOVEMENT_PAYOUT: "payout",
    pb.MONEY_MOVEMENT_CAPTURE: "capture",
    pb.MONEY_MOVEMENT_REFUND: "refund",
}
MOVEMENT_ENUMS: dict[str, pb.MoneyMovement.ValueType] = {v: k for k, v in MOVEMENTS.items()}


def _movement(payment: pb.Payment) -> str:
    """The movement asked for; unset: a hold (what the gateway places), or
    a refund for a refund. An unknown number stays unknown for validation."""
    if payment.movement == pb.MONEY_MOVEMENT_UNSPECIFIED:
        return "refund" if payment.kind == pb.PAYMENT_KIND_REFUND else "authorize"
    return MOVEMENTS.get(payment.movement, "")


def _splits(payment: pb.Payment) -> list[SplitInput]:
    return [
        SplitInput(
            account_id=leg.account_id,
            amount_minor=leg.amount_minor,
            basis_points=leg.basis_points,
            label=leg.label,
            release_at_us=wire.micros(leg.release_at, f"payment.splits[{index}].release_at"),
            release_account_id=leg.release_account_id,
        )
        for index, leg in enumerate(payment.splits)
    ]


LABELS: dict[pb.OutcomeLabel.ValueType, str] = {
    pb.OUTCOME_LABEL_LEGITIMATE: "legitimate",
    pb.OUTCOME_LABEL_FRAUD: "fraud",
    pb.OUTCOME_LABEL_CHARGEBACK: "chargeback",
}
LABEL_ENUMS: dict[str, pb.OutcomeLabel.ValueType] = {v: k for k, v in LABELS.items()}
CHANNELS: dict[pb.Channel.ValueType, str] = {
    pb.CHANNEL_PUSH: "push",
    pb.CHANNEL_IN_APP: "in_app",
    pb.CHANNEL_EMAIL: "email",
    pb.CHANNEL_SMS: "sms",
    pb.CHANNEL_WHATSAPP: "whatsapp",
    pb.CHANNEL_PARTNER_WEBHOOK: "partner_webhook",
}
CHANNEL_ENUMS: dict[str, pb.Channel.ValueType] = {v: k for k, v in CHANNELS.items()}
TOPICS: dict[pb.Topic.ValueType, str] = {
    pb.TOPIC_MARKETING: "marketing",
    pb.TOPIC_SERVICING: "servicing",
    pb.TOPIC_CREDIT: "credit",
    pb.TOPIC_INSURANCE: "insurance",
}
TOPIC_ENUMS: dict[str, pb.Topic.ValueType] = {v: k for k, v in TOPICS.items()}
STATUSES: dict[pb.ConsentStatus.ValueType, str] = {
    pb.CONSENT_STATUS_GRANTED: "granted",
    pb.CONSENT_STATUS_WITHDRAWN: "withdrawn",
}
STATUS_ENUMS: dict[str, pb.ConsentStatus.ValueType] = {v: k for k, v in STATUSES.items()}
BASES: dict[pb.LawfulBasis.ValueType, str] = {
    pb.LAWFUL_BASIS_CONSENT: "consent",
    pb.LAWFUL_BASIS_CONTRACT: "contract",
    pb.LAWFUL_BASIS_LEGAL_OBLIGATION: "legal_obligation",
    pb.LAWFUL_BASIS_VITAL_INTERESTS: "vital_interests",
    pb.LAWFUL_BASIS_PUBLIC_TASK: "public_task",
    pb.LAWFUL_BASIS_LEGITIMATE_INTERESTS: "legitimate_interests",
}
BASIS_ENUMS: dict[str, pb.LawfulBasis.ValueType] = {v: k for k, v in BASES.items()}
PRODUCTS: dict[pb.Product.ValueType, str] = {
    pb.PRODUCT_CASHBACK: "cashback",
    pb.PRODUCT_BNPL: "bnpl",
    pb.PRODUCT_CREDIT_LINE_INCREASE: "credit_line_increase",
    pb.PRODUCT_INSURANCE_COVER: "insurance_cover",
    pb.PRODUCT_SAVINGS: "savings",
}
PRODUCT_ENUMS: dict[str, pb.Product.ValueType] = {v: k for k, v in PRODUCTS.items()}
BLOCKS: dict[str, pb.ContactBlock.ValueType] = {
    "no_consent": pb.CONTACT_BLOCK_NO_CONSENT,
    "quiet_hours": pb.CONTACT_BLOCK_QUIET_HOURS,
    "capped": pb.CONTACT_BLOCK_CAPPED,
    "vulnerable": pb.CONTACT_BLOCK_VULNERABLE,
}
EXCLUSIONS: dict[str, pb.ExclusionReason.ValueType] = {
    "not_eligible": pb.EXCLUSION_REASON_NOT_ELIGIBLE,
    "no_consent": pb.EXCLUSION_REASON_NO_CONSENT,
    "quiet_hours": pb.EXCLUSION_REASON_QUIET_HOURS,
    "capped": pb.EXCLUSION_REASON_CAPPED,
    "suppressed": pb.EXCLUSION_REASON_SUPPRESSED,
}
CASE_STATUSES: dict[pb.CaseStatus.ValueType, str] = {
    pb.CASE_STATUS_OPEN: "open",
    pb.CASE_STATUS_CLAIMED: "claimed",
    pb.CASE_STATUS_RESOLVED: "resolved",
}
CASE_STATUS_ENUMS: dict[str, pb.CaseStatus.ValueType] = {v: k for k, v in CASE_STATUSES.items()}
RESOLUTIONS: dict[pb.Resolution.ValueType, str] = {
    pb.RESOLUTION_APPROVE: "approve",
    pb.RESOLUTION_DECLINE: "decline",
}
RESOLUTION_ENUMS: dict[str, pb.Resolution.ValueType] = {v: k for k, v in RESOLUTIONS.items()}
TARGETS: dict[pb.BundleTarget.ValueType, str] = {
    pb.BUNDLE_TARGET_UNSPECIFIED: "store",
    pb.BUNDLE_TARGET_STORE: "store",
    pb.BUNDLE_TARGET_LIVE: "live",
    pb.BUNDLE_TARGET_SHADOW: "shadow",
}


def channel(value: pb.Channel.ValueType) -> str:
    """The channel a request names; unspecified or unknown is CHANNEL_INVALID."""
    name = CHANNELS.get(value)
    if name is None:
        raise InvalidArgument("CHANNEL_INVALID", "channel is required", "channel")
    return name


def topic(value: pb.Topic.ValueType) -> str:
    """The topic a request names; unspecified or unknown is TOPIC_INVALID."""
    name = TOPICS.get(value)
    if name is None:
        raise InvalidArgument("TOPIC_INVALID", "topic is required", "topic")
    return name


def bundle_info_pb(info: BundleInfo) -> pb.BundleInfo:
    return pb.BundleInfo(
        version=info.version,
        label=info.label,
        content_hash=info.content_hash,
        rule_count=info.rule_count,
        sanctions_entry_count=info.sanctions_entry_count,
        loaded_at=wire.timestamp(info.loaded_at_us),
        approvals=[
            pb.BundleApproval(
                slot=a.slot,
                set=a.set,
                actor=a.actor,
                reason=a.reason,
                at=wire.timestamp(a.at_us),
            )
            for a in info.approvals
        ],
    )


def maybe_bundle_info_pb(info: BundleInfo | None) -> pb.BundleInfo | None:
    return bundle_info_pb(info) if info is not None else None


def _velocity(snapshot: pb.ContextSnapshot, name: str) -> Velocity:
    """Counters as sent; counters left unset are unknown, never zero."""
    if not snapshot.HasField(name):  # type: ignore[arg-type]
        return UNKNOWN_VELOCITY
    message: pb.VelocityCounters = getattr(snapshot, name)
    return Velocity(
        count_1h=message.count_1h,
        count_24h=message.count_24h,
        count_30d=message.count_30d,
        amount_minor_1h=message.amount_minor_1h,
        amount_minor_24h=message.amount_minor_24h,
        amount_minor_30d=message.amount_minor_30d,
        unknown=sorted(set(message.unknown)),
    )


def evaluation_input(request: pb.EvaluateRequest) -> EvaluationInput:
    payment, snap = request.payment, request.snapshot
    score = snap.model_score
    return EvaluationInput(
        tenant_id=request.tenant_id,
        idempotency_key=request.idempotency_key,
        payment=PaymentInput(
            account_id=payment.account_id,
            kind=KINDS.get(payment.kind, ""),
            amount_minor=payment.amount.amount_minor,
            currency=payment.amount.currency,
            payment_method=payment.payment_method,
            merchant_id=payment.merchant_id,
            merchant_category=payment.merchant_category,
            device_id=payment.device_id,
            customer=Party(name=payment.customer.name, country=payment.customer.country),
            counterparty=Party(
                name=payment.counterparty.name, country=payment.counterparty.country
            ),
            credit_account_id=payment.credit_account_id,
            movement=_movement(payment),
            splits=_splits(payment),
            hold_id=payment.hold_id,
            refund=RefundInput(
                entry_id=payment.refund.entry_id,
                original_account_id=payment.refund.original_account_id,
                captured_minor=payment.refund.captured_minor,
                refunded_minor=payment.refund.refunded_minor,
                refund_count=payment.refund.refund_count,
            ),
            customer_id=payment.customer_id,
        ),
        snapshot=SnapshotInput(
            kyc_tier=snap.kyc.tier,
            kyc_country=snap.kyc.country,
            pep=snap.kyc.pep,
            score=ScoreInput(
                model=score.model,
                version=score.version,
                source=score.source,
                score=score.score,
                score_id=score.score_id,
            ),
            account_velocity=_velocity(snap, "account_velocity"),
            device_velocity=_velocity(snap, "device_velocity"),
            merchant_velocity=_velocity(snap, "merchant_velocity"),
            account_age_days=snap.account_age_days,
            features=dict(snap.features),
            decided_at_us=wire.micros(snap.decided_at, "snapshot.decided_at"),
            rails=[
                RailFacts(
                    rail=r.rail,
                    method=r.method,
                    reachable=r.reachable,
                    unreachable_because=r.unreachable_because,
                    max_amount_minor=r.max_amount_minor,
                    window_open=r.window_open,
                    cutoff_at_us=r.cutoff_at_us,
                    cost_minor=r.cost_minor,
                )
                for r in snap.rails
            ],
        ),
    )


def _velocity_pb(v: Velocity) -> pb.VelocityCounters:
    return pb.VelocityCounters(
        count_1h=v.count_1h,
        count_24h=v.count_24h,
        count_30d=v.count_30d,
        amount_minor_1h=v.amount_minor_1h,
        amount_minor_24h=v.amount_minor_24h,
        amount_minor_30d=v.amount_minor_30d,
        unknown=v.unknown,
    )


def evaluate_request_pb(inp: EvaluationInput) -> pb.EvaluateRequest:
    p, s = inp.payment, inp.snapshot
    return pb.EvaluateRequest(
        tenant_id=inp.tenant_id,
        idempotency_key=inp.idempotency_key,
        payment=pb.Payment(
            account_id=p.account_id,
            kind=KIND_ENUMS.get(p.kind, pb.PAYMENT_KIND_UNSPECIFIED),
            amount=wire.money(p.amount_minor, p.currency),
            payment_method=p.payment_method,
            merchant_id=p.merchant_id,
            merchant_category=p.merchant_category,
            device_id=p.device_id,
            customer=pb.Party(name=p.customer.name, country=p.customer.country),
            counterparty=pb.Party(name=p.counterparty.name, country=p.counterparty.country),
            credit_account_id=p.credit_account_id,
            movement=MOVEMENT_ENUMS.get(p.movement, pb.MONEY_MOVEMENT_UNSPECIFIED),
            splits=[
                pb.SplitLeg(
                    account_id=leg.account_id,
                    amount_minor=leg.amount_minor,
                    basis_points=leg.basis_points,
                    label=leg.label,
                    release_at=wire.timestamp(leg.release_at_us) if leg.release_at_us else None,
                    release_account_id=leg.release_account_id,
                )
                for leg in p.splits
            ],
            hold_id=p.hold_id,
            refund=pb.RefundContext(
                entry_id=p.refund.entry_id,
                original_account_id=p.refund.original_account_id,
                captured_minor=p.refund.captured_minor,
                refunded_minor=p.refund.refunded_minor,
                refund_count=p.refund.refund_count,
            ),
            customer_id=p.customer_id,
        ),
        snapshot=pb.ContextSnapshot(
            kyc=pb.KycInfo(tier=s.kyc_tier, country=s.kyc_country, pep=s.pep, known=s.kyc_known),
            model_score=types_pb2.ModelScoreRef(
                model=s.score.model,
                version=s.score.version,
                source=s.score.source,
                score=s.score.score,
                score_id=s.score.score_id,
            ),
            account_velocity=_velocity_pb(s.account_velocity),
            device_velocity=_velocity_pb(s.device_velocity),
            merchant_velocity=_velocity_pb(s.merchant_velocity),
            account_age_days=s.account_age_days,
            features=s.features,
            decided_at=wire.timestamp(s.decided_at_us),
            rails=[
                types_pb2.RailOption(
                    rail=r.rail,
                    method=r.method,
                    reachable=r.reachable,
                    unreachable_because=r.unreachable_because,
                    max_amount_minor=r.max_amount_minor,
                    window_open=r.window_open,
                    cutoff_at_us=r.cutoff_at_us,
                    cost_minor=r.cost_minor,
                )
                for r in s.rails
            ],
        ),
    )


def adjustment_request(request: pb.DecideAdjustmentRequest) -> AdjustmentRequest:
    return AdjustmentRequest(
        tenant_id=request.tenant_id,
        idempotency_key=request.idempotency_key,
        resolution=request.resolution,
        break_id=request.break_id,
        requested_by=request.requested_by,
        reason=request.reason,
        debit_account_id=request.debit_account_id,
        credit_account_id=request.credit_account_id,
        amount_minor=request.amount.amount_minor,
        currency=request.amount.currency,
        ledger_idempotency_key=request.ledger_idempotency_key,
        reverses_entry_id=request.reverses_entry_id,
    )


def adjustment_pb(inp: EvaluationInput) -> pb.DecideAdjustmentRequest | None:
    """An adjustment's request as it was asked; None for any other input."""
    adj = inp.adjustment
    if adj is None:
        return None
    return pb.DecideAdjustmentRequest(
        tenant_id=inp.tenant_id,
        idempotency_key=inp.idempotency_key,
        resolution=adj.resolution,
        break_id=adj.break_id,
        requested_by=adj.requested_by,
        reason=adj.reason,
        debit_account_id=inp.payment.account_id,
        credit_account_id=inp.payment.credit_account_id,
        amount=wire.money(inp.payment.amount_minor, inp.payment.currency),
        ledger_idempotency_key=adj.ledger_idempotency_key,
        reverses_entry_id=adj.reverses_entry_id,
    )


def decision_pb(decision: Decision) -> pb.Decision:
    record = decision.record
    verdict = record.verdict
    message = pb.Decision(
        decision_id=record.decision_id,
        tenant_id=record.input.tenant_id,
        account_id=record.input.payment.account_id,
        outcome=OUTCOMES[verdict.outcome],
        fired_rules=[
            pb.FiredRule(
                rule_id=f.rule_id,
                outcome=OUTCOMES.get(f.outcome, pb.OUTCOME_UNSPECIFIED),
                reason_code=f.reason_code,
                reason=f.reason,
                obligation=f.obligation,
            )
            for f in verdict.fired
        ],
        obligations=[
            pb.Obligation(kind=o.kind, rule_id=o.rule_id, params=o.params)
            for o in verdict.obligations
        ],
        sanctions=pb.SanctionsScreening(
            hit=verdict.screening.hit,
            possible_match=verdict.screening.possible_match,
            best_score=verdict.screening.best_score,
            matched_entry_id=verdict.screening.matched_entry_id,
            matched_name=verdict.screening.matched_name,
            country_blocked=verdict.screening.country_blocked,
        ),
        bundle_version=record.bundle_version,
        decision_token=record.token,
        decided_at=wire.timestamp(record.input.snapshot.decided_at_us),
        case_id=record.case_id,
        log_chain_id=decision.chain_id,
        log_sequence=decision.sequence,
        token_id=record.token_id,
        token_key_id=record.token_key_id,
    )
    if record.token_expires_at_s:
        wire.fill_timestamp(message.token_expires_at, record.token_expires_at_s * 1_000_000)
    if verdict.route is not None:
        message.route.CopyFrom(
            pb.Route(
                method=verdict.route.method,
                estimated_cost_minor=verdict.route.estimated_cost_minor,
                reason=verdict.route.reason,
                rail=verdict.route.rail,
                alternates=verdict.route.alternates,
                considered=[
                    pb.RouteConsidered(
                        rail=c.rail, outcome=c.outcome, reason=c.reason, cost_minor=c.cost_minor
                    )
                    for c in verdict.route.considered
                ],
            )
        )
    return message


def confusion_pb(confusion: Confusion) -> pb.ConfusionMatrix:
    return pb.ConfusionMatrix(
        bundle_version=confusion.bundle_version,
        true_positives=confusion.true_positives,
        false_positives=confusion.false_positives,
        true_negatives=confusion.true_negatives,
        false_negatives=confusion.false_negatives,
        precision=confusion.precision,
        recall=confusion.recall,
    )


def replay_pb(report: ReplayReport) -> pb.ReplayDecisionsResponse:
    return pb.ReplayDecisionsResponse(
        decisions_replayed=report.replayed,
        decisions_identical=report.identical,
        determinism_score=report.determinism_score,
        drift_rate=report.drift_rate,
        changed_decisions=[
            pb.ChangedDecision(
                decision_id=c.decision_id,
                logged_outcome=OUTCOMES[c.logged_outcome],
                replayed_outcome=OUTCOMES[c.replayed_outcome],
                logged_reason_codes=c.logged_reason_codes,
                replayed_reason_codes=c.replayed_reason_codes,
            )
            for c in report.changed
        ],
        decisions_labelled=report.labelled,
        logged_backtest=confusion_pb(report.logged_backtest),
        replayed_backtest=confusion_pb(report.replayed_backtest),
        elapsed_s=report.elapsed_s,
    )


def replay_window(request: pb.ReplayDecisionsRequest) -> ReplayWindow:
    return ReplayWindow(
        tenant_id=request.tenant_id,
        account_id=request.account_id,
        start_us=wire.micros(request.start_time, "start_time"),
        end_us=wire.micros(request.end_time, "end_time"),
        max_decisions=request.max_decisions,
    )


def metrics_pb(metrics: PolicyMetrics) -> pb.GetPolicyMetricsResponse:
    return pb.GetPolicyMetricsResponse(
        decisions_total=metrics.decisions_total,
        live_bundle_version=metrics.live_bundle_version,
        shadow_bundle_version=metrics.shadow.bundle_version,
        shadow_decisions=metrics.shadow.decisions,
        shadow_agreements=metrics.shadow.agreements,
        shadow_agreement_rate=metrics.shadow.agreement_rate,
        cases_resolved_with_suggestion=metrics.overrule.resolved_with_suggestion,
        cases_overruled=metrics.overrule.overruled,
        human_overrule_rate=metrics.overrule.rate,
    )


def verify_pb(result: VerifyResult) -> pb.VerifyDecisionLogResponse:
    return pb.VerifyDecisionLogResponse(
        valid=result.valid,
        records_checked=result.records_checked,
        first_bad_sequence=result.first_bad_sequence,
        problem=result.problem,
        detail=result.detail,
    )


def profile_pb(profile: ContactProfile) -> pb.ContactProfile:
    return pb.ContactProfile(
        tenant_id=profile.tenant_id,
        customer_id=profile.customer_id,
        time_zone=profile.time_zone,
        vulnerable=profile.vulnerable,
        updated_at=wire.timestamp(profile.updated_at_us),
    )


def check_contact_pb(check: ContactCheck) -> pb.CheckContactResponse:
    response = pb.CheckContactResponse(
        allowed=check.allowed,
        block=BLOCKS.get(check.block, pb.CONTACT_BLOCK_UNSPECIFIED),
        detail=check.detail,
    )
    # Unset when the check names no later moment to try again.
    if check.next_allowed_at_us:
        wire.fill_timestamp(response.next_allowed_at, check.next_allowed_at_us)
    return response


def consent_record(message: pb.Consent) -> ConsentRecord:
    return ConsentRecord(
        channel=CHANNELS.get(message.channel, ""),
        topic=TOPICS.get(message.topic, ""),
        status=STATUSES.get(message.status, ""),
        lawful_basis=BASES.get(message.lawful_basis, ""),
        source=message.source,
        granted_at_us=wire.micros(message.granted_at, "consent.granted_at"),
    )


def consent_pb(record: ConsentRecord) -> pb.Consent:
    return pb.Consent(
        channel=CHANNEL_ENUMS[record.channel],
        topic=TOPIC_ENUMS[record.topic],
        status=STATUS_ENUMS[record.status],
        lawful_basis=BASIS_ENUMS[record.lawful_basis],
        source=record.source,
        granted_at=wire.timestamp(record.granted_at_us),
        updated_at=wire.timestamp(record.updated_at_us),
    )


def offer_entry(message: pb.Offer) -> OfferEntry:
    return OfferEntry(
        tenant_id=message.tenant_id,
        offer_id=message.offer_id,
        product=PRODUCTS.get(message.product, ""),
        title=message.title,
        value_minor=message.value.amount_minor,
        currency=message.value.currency,
        eligibility=message.eligibility,
        never_show=message.never_show,
        topic=TOPICS.get(message.topic, "marketing") if message.topic else "marketing",
        channels=[CHANNELS.get(c, f"unknown:{int(c)}") for c in message.channels],
        regions=list(message.regions),
        variants={
            partner: OfferVariant(
                variant_id=v.variant_id,
                value_minor=v.value.amount_minor,
                currency=v.value.currency,
                creative_id=v.creative_id,
            )
            for partner, v in message.variants.items()
        },
        conversion_events=list(message.conversion_events),
        max_contacts_per_week=message.max_contacts_per_week,
        cooldown_s=message.cooldown_s,
        starts_at_us=wire.micros(message.starts_at, "offer.starts_at"),
        ends_at_us=wire.micros(message.ends_at, "offer.ends_at"),
        attributes=dict(message.attributes),
    )


def _variant_pb(variant: OfferVariant) -> pb.OfferVariant:
    return pb.OfferVariant(
        variant_id=variant.variant_id,
        value=wire.money(variant.value_minor, variant.currency),
        creative_id=variant.creative_id,
    )


def offer_pb(entry: OfferEntry) -> pb.Offer:
    return pb.Offer(
        tenant_id=entry.tenant_id,
        offer_id=entry.offer_id,
        product=PRODUCT_ENUMS[entry.product],
        title=entry.title,
        value=wire.money(entry.value_minor, entry.currency),
        eligibility=entry.eligibility,
        never_show=entry.never_show,
        topic=TOPIC_ENUMS[entry.topic],
        channels=[CHANNEL_ENUMS[c] for c in entry.channels],
        regions=entry.regions,
        variants={k: _variant_pb(v) for k, v in entry.variants.items()},
        conversion_events=entry.conversion_events,
        max_contacts_per_week=entry.max_contacts_per_week,
        cooldown_s=entry.cooldown_s,
        starts_at=wire.timestamp(entry.starts_at_us),
        ends_at=wire.timestamp(entry.ends_at_us),
        status=pb.OFFER_STATUS_ACTIVE if entry.status == "active" else pb.OFFER_STATUS_STOPPED,
        revision=entry.revision,
        updated_at=wire.timestamp(entry.updated_at_us),
        attributes=entry.attributes,
    )


def eligible_pb(item: Eligible) -> pb.EligibleOffer:
    entry = item.entry
    message = pb.EligibleOffer(
        offer_id=entry.offer_id,
        product=PRODUCT_ENUMS[entry.product],
        channel=CHANNEL_ENUMS[item.channel],
        value=wire.money(entry.value_minor, entry.currency),
        revision=entry.revision,
        conversion_events=list(entry.conversion_events),
        attributes=entry.attributes,
    )
    if item.variant is not None:
        message.variant.CopyFrom(_variant_pb(item.variant))
        if item.variant.value_minor:
            message.value.CopyFrom(
                wire.money(item.variant.value_minor, item.variant.currency or entry.currency)
            )
    return message


def excluded_pb(item: Excluded) -> pb.ExcludedOffer:
    return pb.ExcludedOffer(
        offer_id=item.offer_id, reason=EXCLUSIONS[item.reason], detail=item.detail
    )


def case_pb(case: CaseBody) -> pb.Case:
    return pb.Case(
        case_id=case.case_id,
        tenant_id=case.tenant_id,
        decision_id=case.decision_id,
        account_id=case.account_id,
        outcome=OUTCOMES[case.outcome],
        reason_codes=case.reason_codes,
        status=CASE_STATUS_ENUMS[case.status],
        amount=wire.money(case.amount_minor, case.currency),
        model_score=types_pb2.ModelScoreRef(
            model=case.score_model,
            version=case.score_version,
            source=case.score_source,
            score=case.score_value,
            score_id=case.score_id,
        ),
        model_suggestion=RESOLUTION_ENUMS.get(case.model_suggestion, pb.RESOLUTION_UNSPECIFIED),
        assignee=case.assignee,
        resolution=RESOLUTION_ENUMS.get(case.resolution, pb.RESOLUTION_UNSPECIFIED),
        note=case.note,
        overruled=case.overruled,
        opened_at=wire.timestamp(case.opened_at_us),
        claimed_at=wire.timestamp(case.claimed_at_us),
        resolved_at=wire.timestamp(case.resolved_at_us),
        bundle_version=case.bundle_version,
        approval_decision_id=case.approval_decision_id,
    )


def _overrule_bucket_pb(count: OverruleCount, start_us: int) -> pb.OverruleBucket:
    return pb.OverruleBucket(
        start=wire.timestamp(start_us),
        resolved=count.resolved,
        with_suggestion=count.with_suggestion,
        overruled=count.overruled,
        overrule_rate=count.overruled / count.with_suggestion if count.with_suggestion else 0.0,
    )


def overrule_series_pb(series: OverruleSeries) -> pb.GetOverruleSeriesResponse:
    return pb.GetOverruleSeriesResponse(
        buckets=[
            _overrule_bucket_pb(b, series.start_us + b.bucket * series.bucket_us)
            for b in series.buckets
        ],
        total=_overrule_bucket_pb(series.total, series.start_us),
    )


def case_resolved_event(
    case: CaseBody, now_us: int, reviewed: ReviewedMovement | None = None
) -> OutboxRow:
    """The `policy.case.resolved` envelope; its id is stable per case, so a
    re-publish is dropped by JetStream's duplicate window. It names the
    reviewed decision's movement and key, and carries an approved payout's
    token (what the gateway hands the money plane's ApprovePayout)."""
    event_id = f"policy.case.resolved:{case.case_id}"
    payload = pb.CaseResolved(case=case_pb(case))
    if reviewed is not None:
        payload.movement = MOVEMENT_ENUMS.get(reviewed.movement, pb.MONEY_MOVEMENT_UNSPECIFIED)
        payload.idempotency_key = reviewed.idempotency_key
        payload.decision_token = reviewed.decision_token
    envelope = make_envelope(
        event_type="policy.case.resolved",
        tenant_id=case.tenant_id,
        payload=payload,
        occurred_at_us=now_us,
        event_id=event_id,
        account_id=case.account_id,
        amount=wire.money(case.amount_minor, case.currency),
        policy_decision=case.decision_id,
        policy_version=case.bundle_version,
    )
    return OutboxRow(
        event_id=event_id,
        subject=subject_for("policy.case.resolved", case.tenant_id),
        data=envelope.SerializeToString(deterministic=True),
        created_at_us=now_us,
    )


# ---------------------------------------------------------------- customer profiles


def customer_profile(message: pb.CustomerProfile) -> CustomerProfile:
    return CustomerProfile(
        tenant_id=message.tenant_id,
        customer_id=message.customer_id,
        kyc_tier=message.kyc_tier,
        pep=message.pep,
        country=message.country,
        account_opened_at_us=wire.micros(message.account_opened_at, "profile.account_opened_at"),
        verified_at_us=wire.micros(message.verified_at, "profile.verified_at"),
    )


def customer_profile_pb(profile: CustomerProfile) -> pb.CustomerProfile:
    return pb.CustomerProfile(
        tenant_id=profile.tenant_id,
        customer_id=profile.customer_id,
        kyc_tier=profile.kyc_tier,
        pep=profile.pep,
        country=profile.country,
        account_opened_at=wire.timestamp(profile.account_opened_at_us),
        verified_at=wire.timestamp(profile.verified_at_us),
        updated_by=profile.updated_by,
        updated_at=wire.timestamp(profile.updated_at_us),
        change_id=profile.change_id,
    )


def profile_change_pb(change: ProfileChange) -> pb.CustomerProfileChange:
    return pb.CustomerProfileChange(
        change_id=change.change_id,
        profile=customer_profile_pb(change.profile),
        actor=change.actor,
        recorded_at=wire.timestamp(change.recorded_at_us),
        applied=change.applied,
    )
