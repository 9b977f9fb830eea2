"""Translation between the gateway's contract (triplane.gateway.v1), the
planes' contracts it calls, and its own records (no grpc import: the messages
only). Times, money and pages are read and written by the runtime's one
vocabulary (`wire`); the flows (payments, nba, ingest, engagement), the
servicer and the API-key servicer call these instead of keeping their own
maps."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

from gateway.auth.apikey import redacted
from gateway.auth.store import ApiKeyRecord
from triplane.ai.v1 import ai_pb2
from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.money.v1 import money_pb2
from triplane.policy.v1 import policy_pb2
from triplane.runtime import codec as wire
from triplane.runtime.errors import TriplaneError

# The one list the gateway pages (ListDeadLetters), resumed after a
# (dead_at_us, delivery_id) pair.
DEAD_LETTERS_PAGE = "gateway.dead_letters"

# ---------------------------------------------------------------- payments

KIND_TO_POLICY: dict[gw.PaymentKind.ValueType, policy_pb2.PaymentKind.ValueType] = {
    gw.PAYMENT_KIND_PURCHASE: policy_pb2.PAYMENT_KIND_PURCHASE,
    gw.PAYMENT_KIND_PAYOUT: policy_pb2.PAYMENT_KIND_PAYOUT,
    gw.PAYMENT_KIND_TRANSFER: policy_pb2.PAYMENT_KIND_TRANSFER,
    gw.PAYMENT_KIND_INVOICE: policy_pb2.PAYMENT_KIND_INVOICE,
}
KIND_FROM_POLICY: dict[policy_pb2.PaymentKind.ValueType, gw.PaymentKind.ValueType] = {
    v: k for k, v in KIND_TO_POLICY.items()
}
OUTCOME_FROM_POLICY: dict[policy_pb2.Outcome.ValueType, gw.Outcome.ValueType] = {
    policy_pb2.OUTCOME_ALLOW: gw.OUTCOME_ALLOW,
    policy_pb2.OUTCOME_REVIEW: gw.OUTCOME_REVIEW,
    policy_pb2.OUTCOME_HOLD: gw.OUTCOME_HOLD,
    policy_pb2.OUTCOME_DENY: gw.OUTCOME_DENY,
}
HOLD_STATE_FROM_MONEY: dict[money_pb2.HoldState.ValueType, gw.HoldState.ValueType] = {
    money_pb2.HOLD_STATE_PENDING: gw.HOLD_STATE_PENDING,
    money_pb2.HOLD_STATE_CAPTURED: gw.HOLD_STATE_CAPTURED,
    money_pb2.HOLD_STATE_VOIDED: gw.HOLD_STATE_VOIDED,
    money_pb2.HOLD_STATE_EXPIRED: gw.HOLD_STATE_EXPIRED,
}


def outcome(decision: policy_pb2.Decision) -> gw.Outcome.ValueType:
    return OUTCOME_FROM_POLICY.get(decision.outcome, gw.OUTCOME_UNSPECIFIED)


def reasons_of(decision: policy_pb2.Decision) -> list[gw.Reason]:
    return [
        gw.Reason(code=r.reason_code, text=r.reason, rule_id=r.rule_id)
        for r in decision.fired_rules
    ]


def obligations_of(decision: policy_pb2.Decision) -> list[gw.Obligation]:
    return [gw.Obligation(kind=o.kind, params=dict(o.params)) for o in decision.obligations]


def _expm1(log_value: float) -> int:
    return max(0, round(math.expm1(log_value)))


# Which of the AI plane's features each velocity counter is read from, per
# entity. A counter without one (a device's 24-hour amount, anything but an
# account's 30 days) is unknown to the policy, never zero.
_COUNTER_FEATURES: dict[str, dict[str, str]] = {
    "acct": {
        "count_1h": "acct_txn_count_1h",
        "count_24h": "acct_txn_count_24h",
        "count_30d": "acct_txn_count_30d",
        "amount_minor_1h": "acct_txn_amount_log_1h",
        "amount_minor_24h": "acct_txn_amount_log_24h",
        "amount_minor_30d": "acct_txn_amount_log_30d",
    },
    **{
        entity: {
            "count_1h": f"{entity}_txn_count_1h",
            "count_24h": f"{entity}_txn_count_24h",
            "amount_minor_1h": f"{entity}_txn_amount_log_1h",
        }
        for entity in ("dev", "merch")
    },
}
_COUNTERS = (
    "count_1h",
    "count_24h",
    "count_30d",
    "amount_minor_1h",
    "amount_minor_24h",
    "amount_minor_30d",
)
# The AI plane's fallback reason when its feature store could not be read:
# the features it answers are zeros, not counts.
FEATURES_UNAVAILABLE = "FEATURES_UNAVAILABLE"


def features_counted(scored: ai_pb2.ScoreResponse | None) -> bool:
    """The score's stored features are the server's counts (not zeros put
    in for a store that could not be read, nor absent with no score)."""
    return scored is not None and FEATURES_UNAVAILABLE not in scored.fallback_reason.split(",")


def velocity(features: Mapping[str, float], entity: str) -> policy_pb2.VelocityCounters:
    """Counters for the policy snapshot from the AI plane's windowed features;
    a counter whose feature the answer lacks is named unknown. Amounts travel
    as log1p; each longer window is at least the shorter one (the windows are
    bucketed to different widths)."""
    found = _COUNTER_FEATURES[entity]
    values: dict[str, int] = {}
    unknown: list[str] = []
    for counter in _COUNTERS:
        name = found.get(counter)
        if name is None or name not in features:
            unknown.append(counter)
            values[counter] = 0
        elif counter.startswith("amount"):
            values[counter] = _expm1(features[name])
        else:
            values[counter] = int(features[name])
    for shorter, longer in (("_1h", "_24h"), ("_24h", "_30d")):
        for kind in ("count", "amount_minor"):
            if f"{kind}{longer}" not in unknown and f"{kind}{shorter}" not in unknown:
                values[f"{kind}{longer}"] = max(
                    values[f"{kind}{longer}"], values[f"{kind}{shorter}"]
                )
    return policy_pb2.VelocityCounters(unknown=unknown, **values)


# ---------------------------------------------------------------- next best action

CONTACT_CHANNELS: dict[str, gw.ContactChannel.ValueType] = {
    "push": gw.CONTACT_CHANNEL_PUSH,
    "in_app": gw.CONTACT_CHANNEL_IN_APP,
    "email": gw.CONTACT_CHANNEL_EMAIL,
    "sms": gw.CONTACT_CHANNEL_SMS,
    "whatsapp": gw.CONTACT_CHANNEL_WHATSAPP,
    "partner_webhook": gw.CONTACT_CHANNEL_PARTNER_WEBHOOK,
}
EXCLUSION_REASONS: dict[policy_pb2.ExclusionReason.ValueType, str] = {
    policy_pb2.EXCLUSION_REASON_NOT_ELIGIBLE: "NOT_ELIGIBLE",
    policy_pb2.EXCLUSION_REASON_NO_CONSENT: "NO_CONSENT",
    policy_pb2.EXCLUSION_REASON_QUIET_HOURS: "QUIET_HOURS",
    policy_pb2.EXCLUSION_REASON_CAPPED: "CAPPED",
    policy_pb2.EXCLUSION_REASON_SUPPRESSED: "SUPPRESSED",
}


def product_name(product: int) -> str:
    name: str = policy_pb2.Product.Name(product)  # type: ignore[arg-type]
    return name.removeprefix("PRODUCT_").lower()


def excluded_offer(excluded: policy_pb2.ExcludedOffer) -> gw.ExcludedOffer:
    return gw.ExcludedOffer(
        offer_id=excluded.offer_id,
        reason=EXCLUSION_REASONS.get(excluded.reason, "EXCLUDED"),
        detail=excluded.detail,
    )


def offer_candidate(offer: policy_pb2.EligibleOffer) -> ai_pb2.OfferCandidate:
    """An eligible offer as ranking sees it: its catalog entry, so the
    propensity model ranks a partner's own offers on what they are, not on
    their ids."""
    return ai_pb2.OfferCandidate(
        offer_id=offer.offer_id,
        value=offer.value,
        product=product_name(offer.product),
        attributes=offer.attributes,
    )


# ---------------------------------------------------------------- engagement

CHANNEL_TO_POLICY: dict[str, policy_pb2.Channel.ValueType] = {
    "push": policy_pb2.CHANNEL_PUSH,
    "in_app": policy_pb2.CHANNEL_IN_APP,
    "email": policy_pb2.CHANNEL_EMAIL,
    "sms": policy_pb2.CHANNEL_SMS,
    "whatsapp": policy_pb2.CHANNEL_WHATSAPP,
    "partner_webhook": policy_pb2.CHANNEL_PARTNER_WEBHOOK,
}
TOPIC_TO_POLICY: dict[str, policy_pb2.Topic.ValueType] = {
    "marketing": policy_pb2.TOPIC_MARKETING,
    "servicing": policy_pb2.TOPIC_SERVICING,
    "credit": policy_pb2.TOPIC_CREDIT,
    "insurance": policy_pb2.TOPIC_INSURANCE,
}
CONTACT_BLOCKS: dict[policy_pb2.ContactBlock.ValueType, str] = {
    policy_pb2.CONTACT_BLOCK_NO_CONSENT: "no_consent",
    policy_pb2.CONTACT_BLOCK_QUIET_HOURS: "quiet_hours",
    policy_pb2.CONTACT_BLOCK_CAPPED: "capped",
    policy_pb2.CONTACT_BLOCK_VULNERABLE: "vulnerable",
}

# ---------------------------------------------------------------- ingest

# Event kind -> (normalized event type, the AI plane's behaviour kind).
EVENT_KINDS: dict[int, tuple[str, ai_pb2.BehaviourKind.ValueType]] = {
    gw.EVENT_KIND_APP_OPENED: ("app.opened", ai_pb2.BEHAVIOUR_KIND_APP_OPENED),
    gw.EVENT_KIND_LOGIN: ("app.login", ai_pb2.BEHAVIOUR_KIND_LOGIN),
    gw.EVENT_KIND_LOAN_SIMULATED: ("loan.simulated", ai_pb2.BEHAVIOUR_KIND_LOAN_SIMULATED),
    gw.EVENT_KIND_FLOW_ABANDONED: ("flow.abandoned", ai_pb2.BEHAVIOUR_KIND_FLOW_ABANDONED),
    gw.EVENT_KIND_PAYMENT_FAILED: ("payment.failed", ai_pb2.BEHAVIOUR_KIND_PAYMENT_DECLINED),
    gw.EVENT_KIND_KYC_FAILED: ("kyc.failed", ai_pb2.BEHAVIOUR_KIND_KYC_FAILED),
    gw.EVENT_KIND_PAYMENT_RETRIED: ("payment.retried", ai_pb2.BEHAVIOUR_KIND_PAYMENT_RETRIED),
    gw.EVENT_KIND_REPAYMENT_MADE: ("repayment.made", ai_pb2.BEHAVIOUR_KIND_REPAYMENT_MADE),
    gw.EVENT_KIND_REPAYMENT_MISSED: ("repayment.missed", ai_pb2.BEHAVIOUR_KIND_REPAYMENT_MISSED),
}


def item_error(error: TriplaneError) -> types_pb2.ItemError:
    return types_pb2.ItemError(
        code=int(error.code), reason=error.reason, field=error.field, message=error.message
    )


# ---------------------------------------------------------------- dead letters


class DeadLetterRecord(Protocol):
    @property
    def delivery_id(self) -> str: ...
    @property
    def tenant_id(self) -> str: ...
    @property
    def channel(self) -> str: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def attempts(self) -> int: ...
    @property
    def last_error(self) -> str: ...
    @property
    def created_at_us(self) -> int: ...
    @property
    def dead_at_us(self) -> int: ...
    @property
    def event_type(self) -> str: ...
    @property
    def status(self) -> str: ...


def dead_letter(record: DeadLetterRecord) -> gw.DeadLetter:
    return gw.DeadLetter(
        delivery_id=record.delivery_id,
        tenant_id=record.tenant_id,
        channel=record.channel,
        endpoint=record.endpoint,
        attempts=record.attempts,
        last_error=record.last_error,
        first_attempt_at=wire.timestamp(record.created_at_us),
        dead_at=wire.timestamp(record.dead_at_us),
        event_type=record.event_type,
    )


# ---------------------------------------------------------------- API keys


def api_key(record: ApiKeyRecord) -> gw.ApiKey:
    """A key as ApiKeyService shows it: never its hash, never its secret."""
    return gw.ApiKey(
        key_id=record.key_id,
        tenant_id=record.tenant_id,
        scopes=list(record.scopes),
        display_name=record.display_name,
        environment=record.environment,
        redacted_key=redacted(record.environment, record.key_id),
        created_at=wire.timestamp(record.created_at_us),
        expires_at=wire.timestamp(record.expires_at_us),
        revoked_at=wire.timestamp(record.revoked_at_us),
        retires_at=wire.timestamp(record.retires_at_us),
        rotated_from_key_id=record.rotated_from,
        rotated_to_key_id=record.rotated_to,
    )
