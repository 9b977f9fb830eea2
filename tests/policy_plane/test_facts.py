"""Facts from the server, limits that fail closed (issue 11 §4), in the policy
plane: the KYC facts come from the customer's profile and never from what a
caller declares (an unknown customer is unknown, never tier 3); every
profile change is recorded with its actor and time; the default bundle has
limits for every currency it accepts; and counters that could not be had are
unknown to the rules, which fail closed above a share of the daily limit."""

from __future__ import annotations

import grpc
import msgspec
import pytest

from policy_plane.app import PolicyPlane
from policy_plane.bundle import SHIPPED_LISTS_DIR, BundleSource, limit_table, shipped_default_path
from policy_plane.bundles_registry import bundle_limits
from policy_plane.engine import PolicyEngine
from policy_plane.evaluation import CompiledBundle, compile_source
from policy_plane.model import UNKNOWN_VELOCITY, EvaluationInput, Velocity
from policy_plane.profiles import CustomerProfile
from triplane.policy.v1 import policy_pb2 as pb
from triplane.policy.v1 import policy_pb2_grpc as pb_grpc
from triplane.runtime import codec as wire
from triplane.runtime import currencies
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import load_config
from triplane.runtime.errors import AlreadyExists, InvalidArgument, NotFound
from triplane.runtime.status import parse_rpc_error

from ..tls_helpers import channel_as
from .conftest import DAY_US, START_US, TENANT, Stubs, payment_input, put_customer
from .test_grpc import request


@pytest.fixture(scope="module")
def default() -> CompiledBundle:
    limits = bundle_limits(load_config(environ={}).policy)
    return compile_source(
        BundleSource(yaml_text=shipped_default_path().read_text()), limits, SHIPPED_LISTS_DIR
    )


def snapshot_of(inp: EvaluationInput, **changes: object) -> EvaluationInput:
    return msgspec.structs.replace(inp, snapshot=msgspec.structs.replace(inp.snapshot, **changes))


def for_customer(inp: EvaluationInput, customer_id: str) -> EvaluationInput:
    return msgspec.structs.replace(
        inp, payment=msgspec.structs.replace(inp.payment, customer_id=customer_id)
    )


# ---------------------------------------------------------------- limits per currency


def test_the_default_bundle_has_limits_for_every_currency(default: CompiledBundle) -> None:
    table = limit_table(default.spec)
    tiers = [tier.tier for tier in default.spec.kyc_tiers]
    missing = [
        (tier, code) for tier in tiers for code in currencies.EXPONENTS if (tier, code) not in table
    ]
    assert not missing
    # Every currency is decided on limits, none refused for want of them.
    for code in currencies.EXPONENTS:
        verdict = default.evaluate(payment_input(currency=code, amount_minor=1))
        assert "KYC_LIMITS_UNDEFINED" not in verdict.reason_codes, code


@pytest.mark.parametrize(
    ("currency", "single_minor"),
    [
        # Tier 2: 5,000.00 USD. JPY has no minor unit: 5,000 x 145 yen.
        ("JPY", 725_000),
        # BHD has three: 5,000 x 0.376 = 1,880.000 BHD.
        ("BHD", 1_880_000),
        ("USD", 500_000),
    ],
)
def test_limits_are_converted_in_each_currencys_minor_units(
    default: CompiledBundle, currency: str, single_minor: int
) -> None:
    limits, converted = limit_table(default.spec)[(2, currency)]
    assert limits.single_minor == single_minor
    assert converted == (currency != "USD")
    at_limit = default.evaluate(payment_input(currency=currency, amount_minor=single_minor))
    assert "KYC_SINGLE_LIMIT_EXCEEDED" not in at_limit.reason_codes
    over = default.evaluate(payment_input(currency=currency, amount_minor=single_minor + 1))
    assert over.outcome == "deny" and "KYC_SINGLE_LIMIT_EXCEEDED" in over.reason_codes


def test_a_rate_that_is_not_a_positive_number_is_refused() -> None:
    limits = bundle_limits(load_config(environ={}).policy)
    text = shipped_default_path().read_text().replace("JPY: 145,", "JPY: -145,")
    with pytest.raises(InvalidArgument) as caught:
        compile_source(BundleSource(yaml_text=text), limits, SHIPPED_LISTS_DIR)
    assert caught.value.reason == "LIMIT_RATE_INVALID"


# ---------------------------------------------------------------- counters that could not be had


def test_unknown_spend_fails_closed_above_a_share_of_the_daily_limit(
    default: CompiledBundle,
) -> None:
    # Tier 1 USD: daily 1,000.00, so review above 100.00 when spend is unknown.
    unknown = Velocity(unknown=["amount_minor_24h", "amount_minor_30d"])
    small = default.evaluate(payment_input(tier=1, amount_minor=10_000, account_velocity=unknown))
    assert small.outcome == "allow", small.fired
    large = default.evaluate(payment_input(tier=1, amount_minor=10_001, account_velocity=unknown))
    assert large.outcome == "review" and "VELOCITY_UNKNOWN" in large.reason_codes
    # The same amount with counted zeros passes: zero counted is not unknown.
    counted = default.evaluate(payment_input(tier=1, amount_minor=10_001))
    assert counted.outcome == "allow", counted.fired
    # Nothing counted at all (the AI plane timed out): the same.
    nothing = default.evaluate(
        payment_input(
            tier=1,
            amount_minor=40_000,
            account_velocity=UNKNOWN_VELOCITY,
            device_velocity=UNKNOWN_VELOCITY,
            merchant_velocity=UNKNOWN_VELOCITY,
        )
    )
    assert nothing.outcome == "review" and "VELOCITY_UNKNOWN" in nothing.reason_codes
    # In another currency the share is of that currency's converted limit.
    jpy = default.evaluate(
        payment_input(tier=1, currency="JPY", amount_minor=14_501, account_velocity=unknown)
    )
    assert "VELOCITY_UNKNOWN" in jpy.reason_codes


def test_the_monthly_limit_counts_thirty_days(default: CompiledBundle) -> None:
    # Tier 1 USD: monthly 3,000.00. Little spent today, much this month.
    month = Velocity(amount_minor_24h=1_000, amount_minor_30d=290_000)
    verdict = default.evaluate(payment_input(tier=1, amount_minor=20_000, account_velocity=month))
    assert "KYC_MONTHLY_LIMIT_EXCEEDED" in verdict.reason_codes
    assert "KYC_DAILY_LIMIT_EXCEEDED" not in verdict.reason_codes


async def test_counters_left_unset_on_the_wire_are_unknown(stubs: Stubs) -> None:
    """Through Evaluate: an unset VelocityCounters is not zeros."""
    # cust-1 is tier 2 (daily 10,000.00 USD): review above 1,000.00.
    unset = request("k-velocity-unset", amount_minor=150_000)
    decision = (await stubs.policy.Evaluate(unset)).decision
    assert decision.outcome == pb.OUTCOME_REVIEW
    assert "VELOCITY_UNKNOWN" in [r.reason_code for r in decision.fired_rules]
    counted = request("k-velocity-counted", amount_minor=150_000)
    for name in ("account_velocity", "device_velocity", "merchant_velocity"):
        getattr(counted.snapshot, name).CopyFrom(pb.VelocityCounters())
    decision = (await stubs.policy.Evaluate(counted)).decision
    assert decision.outcome == pb.OUTCOME_ALLOW, decision.fired_rules
    # Named unknown: the same as unset, and logged as such.
    named = request("k-velocity-named", amount_minor=150_000)
    named.snapshot.account_velocity.CopyFrom(pb.VelocityCounters(unknown=["amount_minor_30d"]))
    named.snapshot.device_velocity.CopyFrom(pb.VelocityCounters())
    named.snapshot.merchant_velocity.CopyFrom(pb.VelocityCounters())
    decision = (await stubs.policy.Evaluate(named)).decision
    assert decision.outcome == pb.OUTCOME_REVIEW
    logged = await stubs.policy.GetDecision(
        pb.GetDecisionRequest(tenant_id=TENANT, decision_id=decision.decision_id)
    )
    assert list(logged.input.snapshot.account_velocity.unknown) == ["amount_minor_30d"]
    # A name that is no counter is refused, naming the field.
    bad = request("k-velocity-bad")
    bad.snapshot.account_velocity.CopyFrom(pb.VelocityCounters(unknown=["count_1y"]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.policy.Evaluate(bad)
    assert parse_rpc_error(caught.value) == (
        "VELOCITY_INVALID",
        "snapshot.account_velocity.unknown",
    )


# ---------------------------------------------------------------- customer profiles


async def test_the_kyc_facts_come_from_the_profile_never_the_caller(
    engine: PolicyEngine,
) -> None:
    # cust-1's profile: tier 2, opened 400 days ago. The caller declares tier
    # 0, a PEP and a new account: none of it is read.
    declared = snapshot_of(
        payment_input("k-declared", amount_minor=400_000), kyc_tier=0, pep=True, account_age_days=1
    )
    decision, _ = await engine.evaluate(declared)
    snapshot = decision.record.input.snapshot
    assert (snapshot.kyc_tier, snapshot.pep, snapshot.kyc_known) == (2, False, True)
    assert snapshot.account_age_days == 400 and snapshot.kyc_country == "US"
    assert decision.record.verdict.outcome == "allow", decision.record.verdict.fired


async def test_an_unknown_customer_is_unknown_never_tier_3(engine: PolicyEngine) -> None:
    # No profile, whatever the caller declares: the lowest tier's limits.
    stranger = for_customer(payment_input("k-stranger", amount_minor=6_000, tier=3), "nobody")
    decision, _ = await engine.evaluate(stranger)
    verdict, snapshot = decision.record.verdict, decision.record.input.snapshot
    assert not snapshot.kyc_known and snapshot.kyc_tier == 0 and snapshot.account_age_days == 0
    assert verdict.outcome == "deny"
    assert {"KYC_PROFILE_UNKNOWN", "KYC_SINGLE_LIMIT_EXCEEDED"} <= set(verdict.reason_codes)
    assert [o.kind for o in verdict.obligations if o.rule_id == "kyc_profile_unknown"] == [
        "kyc_required"
    ]
    # No customer named at all: the same.
    anonymous = for_customer(payment_input("k-anonymous", amount_minor=6_000, tier=3), "")
    decision, _ = await engine.evaluate(anonymous)
    assert not decision.record.input.snapshot.kyc_known
    assert "KYC_SINGLE_LIMIT_EXCEEDED" in decision.record.verdict.reason_codes


async def test_a_profile_change_decides_the_next_payment(
    engine: PolicyEngine, clock: ManualClock
) -> None:
    await put_customer(engine, customer_id="pep-1", tier=3, pep=True, age_days=3)
    decision, _ = await engine.evaluate(
        for_customer(payment_input("k-pep", amount_minor=2_000_000), "pep-1")
    )
    verdict = decision.record.verdict
    assert decision.record.input.snapshot.account_age_days == 3
    assert "PEP_ENHANCED_DUE_DILIGENCE" in verdict.reason_codes
    assert "NEW_ACCOUNT_LOWER_LIMIT" in verdict.reason_codes


async def test_profile_changes_are_recorded_idempotent_and_ordered(
    engine: PolicyEngine, clock: ManualClock
) -> None:
    base = CustomerProfile(
        tenant_id=TENANT,
        customer_id="c-audit",
        kyc_tier=1,
        country="FR",
        account_opened_at_us=START_US - 30 * DAY_US,
        verified_at_us=START_US - 2 * DAY_US,
    )
    profile, replayed, applied = await engine.put_customer_profile(base, "chk-1", "kyc:onfido")
    assert (profile.kyc_tier, replayed, applied) == (1, False, True)
    assert profile.updated_by == "kyc:onfido" and profile.updated_at_us == clock.now_us()
    # The same change again: its recorded answer.
    _, replayed, _ = await engine.put_customer_profile(base, "chk-1", "kyc:onfido")
    assert replayed
    # The same change id with another profile: refused, naming the field.
    with pytest.raises(AlreadyExists) as caught:
        await engine.put_customer_profile(
            msgspec.structs.replace(base, kyc_tier=3), "chk-1", "kyc:onfido"
        )
    assert caught.value.field == "profile.kyc_tier"
    # A later verification applies; an earlier one, arriving late, does not.
    clock.advance(60)
    later = msgspec.structs.replace(base, kyc_tier=2, verified_at_us=START_US - DAY_US)
    profile, _, applied = await engine.put_customer_profile(later, "chk-2", "ops:alice")
    assert (profile.kyc_tier, applied) == (2, True)
    clock.advance(60)
    stale = msgspec.structs.replace(base, kyc_tier=0, verified_at_us=START_US - 3 * DAY_US)
    profile, _, applied = await engine.put_customer_profile(stale, "chk-0", "kyc:onfido")
    assert (profile.kyc_tier, applied) == (2, False)
    current, changes = await engine.get_customer_profile(TENANT, "c-audit")
    assert current.kyc_tier == 2 and current.change_id == "chk-2"
    assert [(c.change_id, c.actor, c.applied) for c in changes] == [
        ("chk-0", "kyc:onfido", False),
        ("chk-2", "ops:alice", True),
        ("chk-1", "kyc:onfido", True),
    ]
    # Bad input is refused, naming the field; another tenant's is not found.
    for bad, field in [
        (msgspec.structs.replace(base, kyc_tier=4), "profile.kyc_tier"),
        (msgspec.structs.replace(base, account_opened_at_us=0), "profile.account_opened_at"),
        (msgspec.structs.replace(base, country="France"), "profile.country"),
        (msgspec.structs.replace(base, customer_id="a b"), "profile.customer_id"),
    ]:
        with pytest.raises(InvalidArgument) as refused:
            await engine.put_customer_profile(bad, "chk-bad", "ops:alice")
        assert refused.value.field == field
    with pytest.raises(InvalidArgument) as refused:
        await engine.put_customer_profile(base, "chk-3", "")
    assert refused.value.field == "actor"
    with pytest.raises(NotFound):
        await engine.get_customer_profile("globex", "c-audit")


async def test_profiles_through_the_server_record_the_callers_identity(stubs: Stubs) -> None:
    profiles = stubs.profiles
    put = pb.PutCustomerProfileRequest(
        profile=pb.CustomerProfile(
            tenant_id=TENANT,
            customer_id="c-grpc",
            kyc_tier=3,
            country="US",
            account_opened_at=wire.timestamp(START_US - 800 * DAY_US),
        ),
        change_id="grpc-1",
        actor="ops:bob",
    )
    answer = await profiles.PutCustomerProfile(put)
    assert answer.applied and not answer.replayed
    assert answer.profile.updated_by == "ops:bob via spiffe://triplane/admin"
    assert (await profiles.PutCustomerProfile(put)).replayed
    got = await profiles.GetCustomerProfile(
        pb.GetCustomerProfileRequest(tenant_id=TENANT, customer_id="c-grpc")
    )
    assert got.profile.kyc_tier == 3 and [c.change_id for c in got.changes] == ["grpc-1"]
    # The next decision for the customer reads it.
    evaluate = request("k-grpc-profile")
    evaluate.payment.customer_id = "c-grpc"
    decision = (await stubs.policy.Evaluate(evaluate)).decision
    logged = await stubs.policy.GetDecision(
        pb.GetDecisionRequest(tenant_id=TENANT, decision_id=decision.decision_id)
    )
    assert logged.input.snapshot.kyc.tier == 3 and logged.input.snapshot.kyc.known
    assert logged.input.snapshot.account_age_days == 800


async def test_a_plane_cannot_write_a_profile(plane: PolicyPlane) -> None:
    # The gateway may (it forwards a platform's customers:write credential,
    # tenant bound); another plane's identity may not.
    channel = channel_as(plane.config.state_path, f"127.0.0.1:{plane.server.port}", "ai_plane")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.CustomerProfileServiceStub(channel).PutCustomerProfile(
                pb.PutCustomerProfileRequest(change_id="x", actor="x")
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await channel.close()
