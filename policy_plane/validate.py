"""Input checks of the decision request. Field paths are those of the proto
request, so a caller sees exactly which field to fix."""

from __future__ import annotations

import math
import re

from policy_plane.bundle import PAYMENT_METHODS
from policy_plane.model import (
    VELOCITY_COUNTERS,
    EvaluationInput,
    PaymentInput,
    RailFacts,
    RefundInput,
    Velocity,
)
from triplane.runtime import codec as wire
from triplane.runtime.config import PolicyLimitsConfig
from triplane.runtime.errors import InvalidArgument
from triplane.runtime.ids import check_tenant_id as check_tenant_id

ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]+$")
_COUNTRY = re.compile(r"^[A-Z]{2}$")
PAYMENT_KINDS = ("purchase", "payout", "transfer", "invoice", "refund")
# The money movements each kind of payment may be decided for: money goes out
# of the platform only as a payout decided as one, and back only as a refund.
_NEW_MONEY = ("authorize", "transfer", "capture")
MOVEMENTS_FOR_KIND = {
    "purchase": _NEW_MONEY,
    "transfer": _NEW_MONEY,
    "invoice": _NEW_MONEY,
    "payout": ("authorize", "payout", "capture"),
    "refund": ("refund",),
}
SPLIT_MOVEMENTS = ("transfer", "payout", "capture")
BASIS_POINTS_TOTAL = 10_000
SCORE_SOURCES = ("", "none", "triton", "in_process", "last_good")
MAX_KYC_TIER = 3


def check_id(value: str, field: str, limits: PolicyLimitsConfig) -> None:
    if not value:
        raise InvalidArgument("FIELD_REQUIRED", f"{field} is required", field)
    if len(value) > limits.max_id_length or not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            "ID_INVALID", f"{field} must match [A-Za-z0-9_.:-]{{1,{limits.max_id_length}}}", field
        )


def check_text(value: str, field: str, max_length: int) -> None:
    if len(value) > max_length:
        raise InvalidArgument("FIELD_TOO_LONG", f"{field} is over {max_length} characters", field)


def check_country(value: str, field: str) -> None:
    if value and not _COUNTRY.fullmatch(value):
        raise InvalidArgument("COUNTRY_INVALID", f"{field} must be ISO 3166-1 alpha-2", field)


def check_evaluation(inp: EvaluationInput, limits: PolicyLimitsConfig) -> None:
    check_tenant_id(inp.tenant_id)
    check_id(inp.idempotency_key, "idempotency_key", limits)
    _check_payment(inp, limits)
    _check_snapshot(inp, limits)


def _check_payment(inp: EvaluationInput, limits: PolicyLimitsConfig) -> None:
    payment = inp.payment
    check_id(payment.account_id, "payment.account_id", limits)
    if payment.kind not in PAYMENT_KINDS:
        raise InvalidArgument("PAYMENT_KIND_INVALID", "payment.kind is required", "payment.kind")
    wire.check_amount(payment.amount_minor, "payment.amount.amount_minor")
    wire.check_currency(payment.currency, "payment.amount.currency")
    if payment.payment_method and payment.payment_method not in PAYMENT_METHODS:
        raise InvalidArgument(
            "PAYMENT_METHOD_INVALID",
            f"payment_method is one of {', '.join(PAYMENT_METHODS)}",
            "payment.payment_method",
        )
    for name in ("merchant_id", "merchant_category", "device_id"):
        check_text(getattr(payment, name), f"payment.{name}", limits.max_string_length)
    if payment.customer_id:
        check_id(payment.customer_id, "payment.customer_id", limits)
    for party_name in ("customer", "counterparty"):
        party = getattr(payment, party_name)
        check_text(party.name, f"payment.{party_name}.name", limits.max_name_length)
        check_country(party.country, f"payment.{party_name}.country")
    _check_movement(payment, limits)


def _check_movement(payment: PaymentInput, limits: PolicyLimitsConfig) -> None:
    """What the token will bind: the payee, the movement, its splits, the
    hold or the refunded payment."""
    check_id(payment.credit_account_id, "payment.credit_account_id", limits)
    if payment.credit_account_id == payment.account_id:
        raise InvalidArgument(
            "SAME_ACCOUNT", "debit and credit accounts must differ", "payment.credit_account_id"
        )
    movement = payment.movement
    if not movement:
        raise InvalidArgument("MOVEMENT_INVALID", "payment.movement is unknown", "payment.movement")
    if movement not in MOVEMENTS_FOR_KIND[payment.kind]:
        raise InvalidArgument(
            "MOVEMENT_NOT_FOR_KIND",
            f"a {payment.kind} is decided for {', '.join(MOVEMENTS_FOR_KIND[payment.kind])}, "
            f"not {movement}",
            "payment.movement",
        )
    if payment.splits and movement not in SPLIT_MOVEMENTS:
        raise InvalidArgument(
            "SPLITS_NOT_ALLOWED", f"a {movement} has no split legs", "payment.splits"
        )
    if len(payment.splits) > limits.max_splits:
        raise InvalidArgument(
            "TOO_MANY_SPLITS", f"more than {limits.max_splits} split legs", "payment.splits"
        )
    for index, leg in enumerate(payment.splits):
        where = f"payment.splits[{index}]"
        check_id(leg.account_id, f"{where}.account_id", limits)
        check_text(leg.label, f"{where}.label", limits.max_string_length)
        fixed, share = leg.amount_minor > 0, 0 < leg.basis_points <= BASIS_POINTS_TOTAL
        if fixed == share or leg.amount_minor < 0 or leg.basis_points > BASIS_POINTS_TOTAL:
            raise InvalidArgument(
                "SPLIT_LEG_INVALID",
                "a leg has either amount_minor > 0 or basis_points in 1..10000",
                where,
            )
        if bool(leg.release_at_us) != bool(leg.release_account_id):
            raise InvalidArgument(
                "INCOMPLETE_RESERVE",
                "a reserve leg needs release_at and release_account_id",
                f"{where}.release_account_id",
            )
        if leg.release_account_id:
            check_id(leg.release_account_id, f"{where}.release_account_id", limits)
    if movement == "capture":
        check_id(payment.hold_id, "payment.hold_id", limits)
    elif payment.hold_id:
        raise InvalidArgument(
            "FIELD_NOT_ALLOWED", "hold_id is for a capture only", "payment.hold_id"
        )
    if movement == "refund":
        _check_refund(payment.refund, limits)
    elif payment.refund != RefundInput():
        raise InvalidArgument("FIELD_NOT_ALLOWED", "refund is for a refund only", "payment.refund")


def _check_refund(refund: RefundInput, limits: PolicyLimitsConfig) -> None:
    check_id(refund.entry_id, "payment.refund.entry_id", limits)
    check_id(refund.original_account_id, "payment.refund.original_account_id", limits)
    for name in ("captured_minor", "refunded_minor", "refund_count"):
        if getattr(refund, name) < 0:
            raise InvalidArgument("REFUND_INVALID", "must be >= 0", f"payment.refund.{name}")
    if refund.refunded_minor > refund.captured_minor:
        raise InvalidArgument(
            "REFUND_INVALID",
            "refunded_minor is more than captured_minor",
            "payment.refund.refunded_minor",
        )


def _check_snapshot(inp: EvaluationInput, limits: PolicyLimitsConfig) -> None:
    snap = inp.snapshot
    if not 0 <= snap.kyc_tier <= MAX_KYC_TIER:
        raise InvalidArgument("KYC_TIER_INVALID", f"tier is 0..{MAX_KYC_TIER}", "snapshot.kyc.tier")
    check_country(snap.kyc_country, "snapshot.kyc.country")
    score = snap.score
    if score.source not in SCORE_SOURCES:
        raise InvalidArgument(
            "SCORE_SOURCE_INVALID",
            f"source is one of {', '.join(s for s in SCORE_SOURCES if s)}",
            "snapshot.model_score.source",
        )
    if not (math.isfinite(score.score) and 0.0 <= score.score <= 1.0):
        raise InvalidArgument("SCORE_INVALID", "score is in [0, 1]", "snapshot.model_score.score")
    for name in ("model", "version", "score_id"):
        check_text(getattr(score, name), f"snapshot.model_score.{name}", limits.max_string_length)
    for name in ("account_velocity", "device_velocity", "merchant_velocity"):
        _check_velocity(getattr(snap, name), f"snapshot.{name}")
    if snap.account_age_days < 0:
        raise InvalidArgument("AGE_INVALID", "must be >= 0", "snapshot.account_age_days")
    if len(snap.features) > limits.max_features:
        raise InvalidArgument(
            "TOO_MANY_FEATURES", f"over {limits.max_features} features", "snapshot.features"
        )
    for key, value in snap.features.items():
        if not key or len(key) > limits.max_id_length or not math.isfinite(value):
            raise InvalidArgument(
                "FEATURE_INVALID", f"feature {key[:64]!r} invalid", f"snapshot.features[{key[:64]}]"
            )
    if snap.decided_at_us < 0:
        raise InvalidArgument("TIME_INVALID", "decided_at before 1970", "snapshot.decided_at")
    _check_rails(snap.rails)


MAX_RAILS = 16
_RAIL_NAME = re.compile(r"[a-z][a-z_]{0,31}")


def _check_rails(rails: list[RailFacts]) -> None:
    """The money plane's rail options: a few, each named once, none negative."""
    if len(rails) > MAX_RAILS:
        raise InvalidArgument("TOO_MANY_RAILS", f"over {MAX_RAILS} rails", "snapshot.rails")
    seen: set[str] = set()
    for index, rail in enumerate(rails):
        field = f"snapshot.rails[{index}]"
        if not _RAIL_NAME.fullmatch(rail.rail) or rail.rail in seen:
            raise InvalidArgument(
                "RAIL_INVALID", "rail is [a-z_], at most 32, each once", f"{field}.rail"
            )
        seen.add(rail.rail)
        if rail.method and not _RAIL_NAME.fullmatch(rail.method):
            raise InvalidArgument("RAIL_INVALID", "method is [a-z_]", f"{field}.method")
        if len(rail.unreachable_because) > 32:
            raise InvalidArgument("RAIL_INVALID", "at most 32", f"{field}.unreachable_because")
        for name in ("max_amount_minor", "cutoff_at_us", "cost_minor"):
            if getattr(rail, name) < 0:
                raise InvalidArgument("RAIL_INVALID", "must be >= 0", f"{field}.{name}")


def _check_velocity(velocity: Velocity, field: str) -> None:
    for name in VELOCITY_COUNTERS:
        if getattr(velocity, name) < 0:
            raise InvalidArgument("VELOCITY_INVALID", "counters are >= 0", f"{field}.{name}")
    if len(velocity.unknown) > len(VELOCITY_COUNTERS) or not set(velocity.unknown) <= set(
        VELOCITY_COUNTERS
    ):
        raise InvalidArgument(
            "VELOCITY_INVALID",
            f"unknown names counters: {', '.join(VELOCITY_COUNTERS)}",
            f"{field}.unknown",
        )
