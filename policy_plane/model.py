"""Domain values of the policy plane: small immutable msgspec Structs.

The decision input (`EvaluationInput`) is what the decision log stores: it is
encoded canonically (sorted keys), so the same input always has the same bytes
and the same hash, and replay decodes exactly what was decided on.
"""

from __future__ import annotations

import enum

import msgspec

from triplane.runtime.tokens import Movement, SplitTerms, splits_digest


class Outcome(enum.IntEnum):
    """Ordered by severity: combination takes the maximum (deny > hold > review > allow)."""

    ALLOW = 1
    REVIEW = 2
    HOLD = 3
    DENY = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @staticmethod
    def parse(text: str) -> Outcome:
        return Outcome[text.upper()]


def combine(outcomes: list[Outcome]) -> Outcome:
    """The decision's outcome: the most severe one fired, allow when none."""
    return max(outcomes, default=Outcome.ALLOW)


class _Frozen(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class Party(_Frozen, frozen=True):
    name: str = ""
    country: str = ""


class SplitInput(_Frozen, frozen=True):
    """A split leg as the money plane will pay it (fixed or basis points)."""

    account_id: str
    amount_minor: int = 0
    basis_points: int = 0
    label: str = ""
    release_at_us: int = 0
    release_account_id: str = ""


class RefundInput(_Frozen, frozen=True):
    """The payment a refund gives back, as the ledger holds it."""

    entry_id: str = ""
    original_account_id: str = ""
    captured_minor: int = 0
    refunded_minor: int = 0
    refund_count: int = 0


class PaymentInput(_Frozen, frozen=True):
    # The account debited (for a refund: the one the payment credited).
    account_id: str
    kind: str
    amount_minor: int
    currency: str
    payment_method: str = ""
    merchant_id: str = ""
    merchant_category: str = ""
    device_id: str = ""
    customer: Party = Party()
    counterparty: Party = Party()
    # What a token binds besides the above (records logged before these were
    # taken decode with the defaults).
    credit_account_id: str = ""
    # authorize, transfer, payout, capture or refund: the token's `kind`.
    # Records logged before it was taken were all holds (the gateway's).
    movement: str = "authorize"
    splits: list[SplitInput] = msgspec.field(default_factory=list)
    hold_id: str = ""
    refund: RefundInput = RefundInput()
    # The paying customer, whose profile the engine reads for the KYC facts
    # (records logged before it was taken carry none).
    customer_id: str = ""


class ScoreInput(_Frozen, frozen=True):
    model: str = ""
    version: str = ""
    # triton, in_process, last_good, or none / "" for no score.
    source: str = ""
    score: float = 0.0
    score_id: str = ""


VELOCITY_COUNTERS = (
    "count_1h",
    "count_24h",
    "count_30d",
    "amount_minor_1h",
    "amount_minor_24h",
    "amount_minor_30d",
)


class Velocity(_Frozen, frozen=True):
    count_1h: int = 0
    count_24h: int = 0
    count_30d: int = 0
    amount_minor_1h: int = 0
    amount_minor_24h: int = 0
    amount_minor_30d: int = 0
    # The counters that could not be had (named as above): unknown to the
    # rules whatever zero stands above. Records logged before it was taken
    # had every counter counted.
    unknown: list[str] = msgspec.field(default_factory=list)


UNKNOWN_VELOCITY = Velocity(unknown=list(VELOCITY_COUNTERS))


class RailFacts(_Frozen, frozen=True):
    """What one payout rail offers the payment now (the money plane's
    facts: GetPayoutContext's rail_options)."""

    rail: str
    method: str = ""
    reachable: bool = False
    unreachable_because: str = ""
    max_amount_minor: int = 0
    window_open: bool = False
    cutoff_at_us: int = 0
    cost_minor: int = 0


class SnapshotInput(_Frozen, frozen=True):
    # The KYC facts and account_age_days are what the engine read of the
    # customer's profile (payment.customer_id), never what a caller declared.
    kyc_tier: int = 0
    kyc_country: str = ""
    pep: bool = False
    # A profile was found. Records logged before profiles were read carried
    # declared facts, which the rules took as known.
    kyc_known: bool = True
    score: ScoreInput = ScoreInput()
    account_velocity: Velocity = Velocity()
    device_velocity: Velocity = Velocity()
    merchant_velocity: Velocity = Velocity()
    account_age_days: int = 0
    features: dict[str, float] = msgspec.field(default_factory=dict)
    decided_at_us: int = 0
    # Payouts: every configured rail's offer (records logged before rail
    # routing carry none, and are routed by method).
    rails: list[RailFacts] = msgspec.field(default_factory=list)


# The movement of a reconciliation adjustment (PolicyEngine.decide_adjustment):
# an operator's write-off or reversal of a break, which the ledger posts as a
# transfer. No Evaluate request can name it; the bundle's adjustment rules
# judge it, not the spending ones.
ADJUSTMENT_MOVEMENT = "adjustment"
# The ledger operation an adjustment's token allows.
ADJUSTMENT_LEDGER_KIND = "transfer"


class AdjustmentInput(_Frozen, frozen=True):
    """What an operator asks of a reconciliation break: the resolution
    (write_off or reversal), who asks and why, and the ledger's key for the
    transfer (its token binds that key; the decision's own key is the
    request's, so a refused request can be asked again with a reason)."""

    resolution: str
    break_id: str
    requested_by: str
    ledger_idempotency_key: str
    reason: str = ""
    # A reversal: the ledger entry it reverses.
    reverses_entry_id: str = ""


class EvaluationInput(_Frozen, frozen=True, omit_defaults=True):
    # omit_defaults: only `adjustment` has a default, so every other input
    # encodes (and hashes) exactly as before it was taken.
    tenant_id: str
    idempotency_key: str
    payment: PaymentInput
    snapshot: SnapshotInput
    # Set on a reconciliation adjustment (payment.movement "adjustment").
    adjustment: AdjustmentInput | None = None


class FiredRule(_Frozen, frozen=True):
    rule_id: str
    outcome: str
    reason_code: str
    reason: str
    obligation: str = ""


class Obligation(_Frozen, frozen=True):
    kind: str
    rule_id: str
    params: dict[str, str] = msgspec.field(default_factory=dict)


class RouteConsidered(_Frozen, frozen=True):
    """One rail a rail route looked at, and why it was or was not chosen."""

    rail: str
    outcome: str  # chosen | alternate | rejected
    reason: str
    cost_minor: int = 0


class Route(_Frozen, frozen=True):
    method: str
    estimated_cost_minor: int
    reason: str
    # Routed among rails: the rail chosen, the other eligible ones (cheapest
    # first: where a re-routable failure goes) and every rail looked at.
    rail: str = ""
    alternates: list[str] = msgspec.field(default_factory=list)
    considered: list[RouteConsidered] = msgspec.field(default_factory=list)


class Screening(_Frozen, frozen=True):
    hit: bool = False
    possible_match: bool = False
    best_score: float = 0.0
    matched_entry_id: str = ""
    matched_name: str = ""
    country_blocked: bool = False


class Verdict(_Frozen, frozen=True):
    """What a bundle decides for an input: a pure function of both."""

    outcome: str
    fired: list[FiredRule]
    obligations: list[Obligation]
    route: Route | None
    screening: Screening

    @property
    def outcome_enum(self) -> Outcome:
        return Outcome.parse(self.outcome)

    @property
    def reason_codes(self) -> list[str]:
        return [f.reason_code for f in self.fired]


class ShadowResult(_Frozen, frozen=True):
    bundle_version: str
    outcome: str
    reason_codes: list[str]
    agreed: bool


class ReviewApproval(_Frozen, frozen=True):
    """What makes a record a reviewer's approval, not the bundle's verdict:
    the case and the decision it reviewed, who approved, and the
    idempotency key that decision named (the movement's: its token binds
    it; the record's own input carries a key of its own, `review:<case>`)."""

    reviewed_decision_id: str
    reviewer: str
    idempotency_key: str


class DecisionRecord(_Frozen, frozen=True):
    """The body of one decision-log record: input, verdict, token."""

    decision_id: str
    bundle_version: str
    input: EvaluationInput
    verdict: Verdict
    token: str = ""
    token_expires_at_s: int = 0
    case_id: str = ""
    shadow: ShadowResult | None = None
    # The token's id (jti) and signing key's id.
    token_id: str = ""
    token_key_id: str = ""
    # Set on a reviewer's approval of a case (case_id): its verdict is the
    # reviewer's, which replay takes as logged rather than re-deciding.
    review: ReviewApproval | None = None


class Decision(_Frozen, frozen=True):
    """A logged decision as the API returns it."""

    record: DecisionRecord
    chain_id: str
    sequence: int


def split_terms(splits: list[SplitInput]) -> list[SplitTerms]:
    """The legs as a token binds them (the money plane builds the same from
    its own legs: a leg with an amount is fixed, else basis points)."""
    return [
        SplitTerms(
            leg.account_id,
            "fixed" if leg.amount_minor else "basis_points",
            leg.amount_minor,
            leg.basis_points,
            leg.label,
            leg.release_at_us,
            leg.release_account_id,
        )
        for leg in splits
    ]


def movement_of(inp: EvaluationInput) -> Movement:
    """What an allow lets the money plane do: the terms its token binds."""
    payment = inp.payment
    kind, key = payment.movement, inp.idempotency_key
    if inp.adjustment is not None:
        # The ledger posts an adjustment as a transfer under its own key.
        kind, key = ADJUSTMENT_LEDGER_KIND, inp.adjustment.ledger_idempotency_key
    return Movement(
        tenant_id=inp.tenant_id,
        kind=kind,
        debit_account_id=payment.account_id,
        credit_account_id=payment.credit_account_id,
        amount_minor=payment.amount_minor,
        currency=payment.currency,
        splits_digest=splits_digest(split_terms(payment.splits)),
        idempotency_key=key,
        hold_id=payment.hold_id,
        entry_id=payment.refund.entry_id,
    )


def token_movement(record: DecisionRecord) -> Movement:
    """The movement a record's token allows: its input's, except that a
    reviewer's approval allows the reviewed decision's (its key)."""
    movement = movement_of(record.input)
    if record.review is None:
        return movement
    return msgspec.structs.replace(movement, idempotency_key=record.review.idempotency_key)


canonical_encoder = msgspec.json.Encoder(order="sorted")
record_decoder = msgspec.json.Decoder(DecisionRecord)
