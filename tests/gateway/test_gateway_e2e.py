"""The gateway end to end, through its public gRPC API, with every plane
running as its own process (money, policy, AI with a real Triton), real NATS,
and PostgreSQL for the money and policy planes when it runs (SQLite otherwise).
The planes start once for the module: Triton's start is the slow part."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client as NatsClient

from ai_plane.codec import MODEL_VERSIONS_PAGE
from gateway.app import Gateway
from gateway.codec import DEAD_LETTERS_PAGE
from money_plane.codec import POSTINGS_PAGE
from policy_plane.codec import BUNDLES_PAGE, CASES_PAGE, OFFERS_PAGE
from tests.page_tokens import refused_tokens
from triplane.ai.v1 import ai_pb2, ai_pb2_grpc
from triplane.common.v1 import envelope_pb2, types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.gateway.v1 import gateway_pb2_grpc
from triplane.money.v1 import money_pb2, money_pb2_grpc
from triplane.policy.v1 import policy_pb2, policy_pb2_grpc
from triplane.runtime.clock import SystemClock
from triplane.runtime.config import Config, load_config
from triplane.runtime.net import free_port, port_open
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import open_channel
from triplane_client import GatewayClient, TriplaneApiError
from triplane_sim.demo_world import daytime_zone
from triplane_tools.stack import Stack

from .auth_helpers import KeyedStub, partner_key

pytestmark = [pytest.mark.nats, pytest.mark.timeout(240)]

TENANT = "gwtest"
MERCHANT = "merchant_1"
RPC_TIMEOUT_S = 5.0
# The customer's local hour is pinned whatever the wall clock says: 02:00 (the
# night that once declined every ordinary payment) unless a test names another;
# the ordinary-payment flows run at both LOCAL_HOURS.
NIGHT_HOUR = 2
LOCAL_HOURS = (NIGHT_HOUR, 14)
# The gateway's clock, injected; the zones that pin an hour are computed from it.
CLOCK = SystemClock()
# A zone is not computed this close to the top of an hour (the request that
# follows takes far less), so the hour cannot turn between the two.
HOUR_TURN_MARGIN_S = 2.0
# The KYC tiers of the seeded customers' profiles (c<i>; the others: 2).
KYC_TIERS = {3: 0, 4: 1, 8: 1, 20: 3}
# PostgreSQL databases this module created, dropped when its stack stops.
CREATED_DATABASES: list[str] = []


def _usd(minor: int) -> types_pb2.Money:
    return types_pb2.Money(amount_minor=minor, currency="USD")


def zone_at(local_hour: int) -> str:
    """An IANA zone where it is `local_hour` o'clock now by the gateway's clock."""
    to_next_hour_s = 3600 - (CLOCK.now_us() / 1_000_000) % 3600
    if to_next_hour_s < HOUR_TURN_MARGIN_S:
        time.sleep(to_next_hour_s + 0.01)
    utc_hour = CLOCK.now_us() // 3_600_000_000 % 24
    offset = (local_hour - utc_hour + 11) % 24 - 11  # -11..12 hours
    if offset == 0:
        return "UTC"
    # Etc/GMT zones have the POSIX sign: Etc/GMT-2 is UTC+2.
    return f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"


def _pg_dsns() -> dict[str, Any]:
    """Money and policy on PostgreSQL; on SQLite only when asked to
    (TRIPLANE_TEST_NO_PG) or, said loudly, when no server runs here (under
    CI=true the helper fails the run instead)."""
    from tests.conftest import PG_HOST, PG_PORT, PG_USER, _loud_skip, create_pg_database

    if os.environ.get("TRIPLANE_TEST_NO_PG"):
        return {}
    if not port_open(PG_HOST, PG_PORT):
        try:
            _loud_skip(
                f"PostgreSQL in the gateway end-to-end suite (no server at {PG_HOST}:{PG_PORT}; "
                "money and policy run on SQLite instead)"
            )
        except pytest.skip.Exception:
            return {}
    # A server that answers but will not create a database is a broken setup,
    # not a reason to run elsewhere: the error fails the suite.
    admin = f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname=postgres"
    money = create_pg_database(admin, "triplane_gw_money")
    policy = create_pg_database(admin, "triplane_gw_policy")
    CREATED_DATABASES.extend([money, policy])
    return {
        "money": {"store": {"backend": "postgres", "postgres_dsn": money}},
        "policy": {"store": {"backend": "postgres", "postgres_dsn": policy}},
    }


def _config(state_dir: Path, nats_url: str) -> Config:
    overrides: dict[str, Any] = {
        "runtime": {"state_dir": str(state_dir), "log_format": "text"},
        "nats": {"url": nats_url},
        "money": {"listen": f"127.0.0.1:{free_port()}"},
        "policy": {"listen": f"127.0.0.1:{free_port()}"},
        "ai": {"listen": f"127.0.0.1:{free_port()}"},
        "gateway": {
            # Bound by the test itself after the stack is up, so port 0: a port
            # picked now could be an outgoing connection's by then (seen once).
            "listen": "127.0.0.1:0",
            "holdout_share": 0.0,
            "metrics_listen": f"127.0.0.1:{free_port()}",
            "measurement": {"metrics_interval_s": 0.2},
        },
        "stack": {
            "start_timeout_s": 150.0,
            "planes": [
                {"name": "money", "module": "money_plane"},
                {"name": "policy", "module": "policy_plane"},
                {"name": "ai", "module": "ai_plane"},
            ],
        },
    }
    for section, values in _pg_dsns().items():
        overrides[section].update(values)
    return load_config(environ={}, overrides=overrides)


class World:
    def __init__(
        self, stack: Stack, gateway: Gateway, address: str, config: Config, api_key: str
    ) -> None:
        self.stack, self.gateway, self.config = stack, gateway, config
        self.api_key = api_key  # the tenant's partner key, on every gateway call
        # The gateway as a partner dials it (TLS, the dev CA, no certificate);
        # the planes as the admin tools do (mutual TLS, the admin identity).
        self.channel = open_channel(address, stack.partner_tls())
        self.stub = KeyedStub(gateway_pb2_grpc.GatewayServiceStub(self.channel), api_key)
        self.client = GatewayClient(
            address, timeout_s=RPC_TIMEOUT_S, api_key=api_key, tls=stack.partner_tls()
        )
        self.money_channel = stack.channel("money")
        self.money = money_pb2_grpc.LedgerServiceStub(self.money_channel)
        self.policy_channel = stack.channel("policy")

    def plane(self, name: str) -> Any:
        return next(p for p in self.stack.processes if p.name == name)

    async def close(self) -> None:
        await self.client.close()
        for channel in (self.channel, self.money_channel, self.policy_channel):
            await channel.close()


async def _seed(world: World) -> None:
    money, channel = world.money, world.policy_channel
    await money.CreateTenant(money_pb2.CreateTenantRequest(tenant_id=TENANT, display_name="t"))
    accounts = [
        money_pb2.NewAccount(
            account_id=f"cust_{i}",
            currency="USD",
            kind=money_pb2.ACCOUNT_KIND_LIABILITY,
            constraint=money_pb2.BALANCE_CONSTRAINT_NONE,
        )
        for i in range(20)
    ] + [
        money_pb2.NewAccount(
            account_id=MERCHANT,
            currency="USD",
            kind=money_pb2.ACCOUNT_KIND_LIABILITY,
            constraint=money_pb2.BALANCE_CONSTRAINT_NONE,
        )
    ]
    await money.CreateAccounts(money_pb2.CreateAccountsRequest(tenant_id=TENANT, accounts=accounts))
    policy = policy_pb2_grpc.PolicyServiceStub(channel)
    await policy.CreateTenant(policy_pb2.CreateTenantRequest(tenant_id=TENANT, display_name="t"))
    offers = policy_pb2_grpc.OfferServiceStub(channel)
    for offer_id, product, value in (
        ("cashback_grocery", policy_pb2.PRODUCT_CASHBACK, 300),
        ("bnpl_electronics", policy_pb2.PRODUCT_BNPL, 1500),
        ("savings_roundup", policy_pb2.PRODUCT_SAVINGS, 500),
    ):
        await offers.PutOffer(
            policy_pb2.PutOfferRequest(
                offer=policy_pb2.Offer(
                    tenant_id=TENANT,
                    offer_id=offer_id,
                    product=product,
                    title=offer_id,
                    value=_usd(value),
                    topic=policy_pb2.TOPIC_MARKETING,
                    channels=[policy_pb2.CHANNEL_IN_APP],
                    cooldown_s=1,
                    conversion_events=["loan.simulated"],
                )
            )
        )
    await offers.PutOffer(
        policy_pb2.PutOfferRequest(
            offer=policy_pb2.Offer(
                tenant_id=TENANT,
                offer_id="credit_line_increase",
                product=policy_pb2.PRODUCT_CREDIT_LINE_INCREASE,
                title="cli",
                value=_usd(5000),
                eligibility="customer.kyc_tier >= 3",
                topic=policy_pb2.TOPIC_MARKETING,
                channels=[policy_pb2.CHANNEL_IN_APP],
            )
        )
    )
    # The customers' KYC as the platform recorded it (the policy plane decides
    # on this, never on what a request declares): c3 unverified, c4 and c8
    # light, c20 fully verified, the rest tier 2; accounts 400 days old.
    profiles = policy_pb2_grpc.CustomerProfileServiceStub(channel)
    opened_s = int(CLOCK.now_us() // 1_000_000) - 400 * 86_400
    for i in range(21):
        await profiles.PutCustomerProfile(
            policy_pb2.PutCustomerProfileRequest(
                profile=policy_pb2.CustomerProfile(
                    tenant_id=TENANT,
                    customer_id=f"c{i}",
                    kyc_tier=KYC_TIERS.get(i, 2),
                    country="US",
                    account_opened_at=Timestamp(seconds=opened_s),
                ),
                change_id=f"kyc-c{i}",
                actor="tests",
            )
        )
    consent = policy_pb2_grpc.ConsentServiceStub(channel)
    for i in range(20):
        await consent.PutContactProfile(
            policy_pb2.PutContactProfileRequest(
                profile=policy_pb2.ContactProfile(
                    tenant_id=TENANT, customer_id=f"c{i}", time_zone=daytime_zone()
                )
            )
        )
        if i == 19:
            continue  # c19 never consented: every offer is excluded for no consent.
        await consent.SetConsent(
            policy_pb2.SetConsentRequest(
                tenant_id=TENANT,
                customer_id=f"c{i}",
                consent=policy_pb2.Consent(
                    channel=policy_pb2.CHANNEL_IN_APP,
                    topic=policy_pb2.TOPIC_MARKETING,
                    status=policy_pb2.CONSENT_STATUS_GRANTED,
                    lawful_basis=policy_pb2.LAWFUL_BASIS_CONSENT,
                ),
            )
        )


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory, nats_url: str) -> AsyncIterator[World]:
    state_dir = tmp_path_factory.mktemp("gw-state")
    config = _config(state_dir, nats_url)
    stack = Stack(
        config, environ={k: v for k, v in os.environ.items() if not k.startswith("TRIPLANE")}
    )
    await stack.start()
    gateway = Gateway(
        config,
        clock=CLOCK,
        money_address=stack.addresses["money"],
        policy_address=stack.addresses["policy"],
        ai_address=stack.addresses["ai"],
    )
    try:
        port = await gateway.start()
        api_key = await partner_key(gateway, TENANT)
        w = World(stack, gateway, f"127.0.0.1:{port}", config, api_key)
        await _seed(w)
        yield w
        await w.close()
    finally:
        await gateway.stop()
        await stack.stop()
        _drop_created_databases()


def _drop_created_databases() -> None:
    from tests.conftest import PG_HOST, PG_PORT, PG_USER, drop_pg_database

    admin = f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname=postgres"
    while CREATED_DATABASES:
        drop_pg_database(admin, CREATED_DATABASES.pop())


def _authorize(local_hour: int = NIGHT_HOUR, **kw: Any) -> gw.AuthorizePaymentRequest:
    customer = kw.pop("customer", None) or gw.Customer(
        customer_id="c1",
        name="Jane Doe",
        email="jane@example.com",
        country="US",
        time_zone=zone_at(local_hour),
    )
    base: dict[str, Any] = dict(
        tenant_id=TENANT,
        idempotency_key=uuid.uuid4().hex,
        account_id="cust_1",
        credit_account_id=MERCHANT,
        amount=_usd(2500),
        kind=gw.PAYMENT_KIND_PURCHASE,
        device_id="dev_1",
        merchant_id="mer_1",
        merchant_category="5411",
        channel=gw.PAYMENT_CHANNEL_ECOMMERCE,
        card_number="4111 1111 1111 1111",
        customer=customer,
    )
    base.update(kw)
    return gw.AuthorizePaymentRequest(**base)


async def _hold(world: World, hold_id: str) -> money_pb2.Hold:
    answer: money_pb2.GetHoldResponse = await world.money.GetHold(
        money_pb2.GetHoldRequest(tenant_id=TENANT, hold_id=hold_id)
    )
    return answer.hold


# ---------------------------------------------------------------- authorization outcomes


@pytest.mark.parametrize("local_hour", LOCAL_HOURS)
async def test_allow_places_a_hold_and_capture_refund(world: World, local_hour: int) -> None:
    answer = await world.stub.AuthorizePayment(_authorize(local_hour), timeout=RPC_TIMEOUT_S)
    assert answer.outcome == gw.OUTCOME_ALLOW, answer
    assert answer.hold_id and answer.decision_id and answer.policy_version
    assert answer.trace_id and answer.model_score_ref.model
    hold = await _hold(world, answer.hold_id)
    assert hold.state == money_pb2.HOLD_STATE_PENDING and hold.amount.amount_minor == 2500

    captured = await world.stub.CapturePayment(
        gw.CapturePaymentRequest(
            tenant_id=TENANT,
            idempotency_key=uuid.uuid4().hex,
            hold_id=answer.hold_id,
            amount=_usd(2000),
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert captured.entry_id and captured.captured.amount_minor == 2000
    refunded = await world.stub.RefundPayment(
        gw.RefundPaymentRequest(
            tenant_id=TENANT,
            idempotency_key=uuid.uuid4().hex,
            entry_id=captured.entry_id,
            amount=_usd(500),
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert refunded.refund_entry_id and refunded.refunded.amount_minor == 500

    why = await world.stub.GetDecision(
        gw.GetDecisionRequest(tenant_id=TENANT, decision_id=answer.decision_id),
        timeout=RPC_TIMEOUT_S,
    )
    assert why.outcome == gw.OUTCOME_ALLOW and why.policy_version == answer.policy_version
    assert why.input.customer_name_token.startswith("ptok_name_")
    assert "Jane" not in str(why)
    if answer.model_score_ref.source != "none":
        assert why.attributions or why.attributions_unavailable_reason
        # The risk model read the customer's own hour, not the UTC one.
        assert why.input.features["hour_of_day"] == local_hour


@pytest.mark.parametrize("local_hour", LOCAL_HOURS)
async def test_void_releases_the_hold(world: World, local_hour: int) -> None:
    request = _authorize(local_hour, account_id="cust_2")
    answer = await world.stub.AuthorizePayment(request, timeout=5)
    assert answer.outcome == gw.OUTCOME_ALLOW
    voided = await world.stub.VoidPayment(
        gw.VoidPaymentRequest(
            tenant_id=TENANT, idempotency_key=f"v-{local_hour}", hold_id=answer.hold_id
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert voided.hold_state == gw.HOLD_STATE_VOIDED
    assert (await _hold(world, answer.hold_id)).state == money_pb2.HOLD_STATE_VOIDED


async def test_deny_comes_back_with_reasons_and_no_hold(world: World) -> None:
    customer = gw.Customer(
        customer_id="c3",
        name="Low Tier",
        country="US",
        time_zone=zone_at(NIGHT_HOUR),
    )
    answer = await world.stub.AuthorizePayment(
        _authorize(account_id="cust_3", amount=_usd(9000), customer=customer), timeout=5
    )
    assert answer.outcome == gw.OUTCOME_DENY
    assert "KYC_SINGLE_LIMIT_EXCEEDED" in [r.code for r in answer.reasons]
    assert not answer.hold_id


async def test_the_kyc_facts_are_the_profiles_never_the_requests(world: World) -> None:
    """A customer the platform never profiled is unknown, whatever a request
    declares; the platform's KYC result, recorded through the gateway with a
    customers:write key, decides the next payment."""
    declared = gw.Customer(
        customer_id="c30",
        name="New Customer",
        country="US",
        kyc_tier=3,
        pep=False,
        account_age_days=2000,
        time_zone=zone_at(14),
    )
    request = _authorize(14, account_id="cust_13", amount=_usd(9000), customer=declared)
    unknown = await world.stub.AuthorizePayment(request, timeout=RPC_TIMEOUT_S)
    assert unknown.outcome == gw.OUTCOME_DENY, unknown
    assert "KYC_SINGLE_LIMIT_EXCEEDED" in [r.code for r in unknown.reasons]
    assert "kyc_required" in [o.kind for o in unknown.obligations]
    why = await world.stub.GetDecision(
        gw.GetDecisionRequest(tenant_id=TENANT, decision_id=unknown.decision_id),
        timeout=RPC_TIMEOUT_S,
    )
    assert why.input.kyc_tier == 0

    opened = Timestamp(seconds=int(CLOCK.now_us() // 1_000_000) - 90 * 86_400)
    put = await world.client.put_customer_profile(
        profile=gw.CustomerProfile(
            customer_id="c30", kyc_tier=2, country="US", account_opened_at=opened
        ),
        change_id="kyc-check-30",
        actor="kyc-vendor",
    )
    assert put.applied and not put.replayed and put.profile.kyc_tier == 2
    # The actor named, the credential that sent it and the gateway's identity.
    key_id = world.api_key.split("_")[2]
    assert "kyc-vendor" in put.profile.updated_by and key_id in put.profile.updated_by
    # A result verified before the one in force is recorded and changes nothing.
    stale = await world.client.put_customer_profile(
        profile=gw.CustomerProfile(
            customer_id="c30",
            kyc_tier=0,
            country="US",
            account_opened_at=opened,
            verified_at=Timestamp(seconds=opened.seconds),
        ),
        change_id="kyc-check-29",
        actor="kyc-vendor",
    )
    assert not stale.applied and stale.profile.kyc_tier == 2
    request.idempotency_key = uuid.uuid4().hex
    known = await world.stub.AuthorizePayment(request, timeout=RPC_TIMEOUT_S)
    assert known.outcome == gw.OUTCOME_ALLOW, known
    why = await world.stub.GetDecision(
        gw.GetDecisionRequest(tenant_id=TENANT, decision_id=known.decision_id),
        timeout=RPC_TIMEOUT_S,
    )
    assert why.input.kyc_tier == 2
    got = await world.client.get_customer_profile(customer_id="c30")
    assert got.profile.kyc_tier == 2
    assert [c.change_id for c in got.changes] == ["kyc-check-29", "kyc-check-30"]
    assert [c.applied for c in got.changes] == [False, True]
    with pytest.raises(TriplaneApiError) as caught:
        await world.client.get_customer_profile(customer_id="c31")
    assert caught.value.reason == "CUSTOMER_PROFILE_NOT_FOUND"
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


async def test_pii_in_an_attribute_does_not_switch_the_score_off(world: World) -> None:
    """An e-mail put in a free-text attribute once made the AI plane refuse
    the request and the payment go on unscored (a cheaper path than a bad
    score): the gateway tokenizes it first, and the payment is scored."""
    answer = await world.stub.AuthorizePayment(
        _authorize(14, account_id="cust_14", attributes={"note": "mail jane.doe@example.com"}),
        timeout=RPC_TIMEOUT_S,
    )
    assert answer.model_score_ref.source != "none", answer
    assert "PII" not in answer.score_fallback_reason


@pytest.mark.parametrize("local_hour", LOCAL_HOURS)
async def test_review_opens_a_case(world: World, local_hour: int) -> None:
    customer = gw.Customer(
        customer_id="c4",
        name="Pat Lee",
        country="US",
        time_zone=zone_at(local_hour),
    )
    answer = await world.stub.AuthorizePayment(
        _authorize(account_id="cust_4", merchant_category="6051", customer=customer), timeout=5
    )
    assert answer.outcome == gw.OUTCOME_REVIEW
    assert answer.case_id and not answer.hold_id
    assert "HIGH_RISK_MCC_LOW_KYC" in [r.code for r in answer.reasons]


async def test_ai_slow_degrades_to_no_score_within_deadline(world: World) -> None:
    ai = world.plane("ai")
    os.kill(ai.pid, signal.SIGSTOP)
    try:
        # An answer at all (not DEADLINE_EXCEEDED) is the "within deadline":
        # the gateway stopped waiting for the AI plane at its budget and
        # decided without a score inside the caller's 2 s.
        answer = await world.stub.AuthorizePayment(
            _authorize(account_id="cust_5", amount=_usd(60000)), timeout=2.0
        )
    finally:
        os.kill(ai.pid, signal.SIGCONT)
    # The AI call ran out of its budget (not refused, not failed): no score.
    assert answer.score_fallback_reason == "AI_DEADLINE_EXCEEDED"
    assert answer.model_score_ref.source == "none"
    # No score on a large payment: the bundle's explicit no-score branch.
    assert answer.outcome == gw.OUTCOME_REVIEW
    assert "FRAUD_SCORE_MISSING" in [r.code for r in answer.reasons]


# ---------------------------------------------------------------- bad input, idempotency


@pytest.mark.parametrize(
    ("change", "code", "reason", "field"),
    [
        (
            {"amount": _usd(-5)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "AMOUNT_NOT_POSITIVE",
            "amount.amount_minor",
        ),
        (
            {"amount": types_pb2.Money(amount_minor=5, currency="XXY")},
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNKNOWN_CURRENCY",
            "amount.currency",
        ),
        ({"account_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "FIELD_REQUIRED", "account_id"),
        (
            {"card_number": "4111 1111 1111 1112"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "CARD_NUMBER_INVALID",
            "card_number",
        ),
        (
            {"merchant_id": "x" * 65},
            grpc.StatusCode.INVALID_ARGUMENT,
            "FIELD_TOO_LONG",
            "merchant_id",
        ),
        ({"account_id": "nobody"}, grpc.StatusCode.NOT_FOUND, None, None),
    ],
)
async def test_bad_input_is_refused_and_changes_nothing(
    world: World,
    change: dict[str, Any],
    code: grpc.StatusCode,
    reason: str | None,
    field: str | None,
) -> None:
    before = await world.money.CheckBalanced(money_pb2.CheckBalancedRequest(tenant_id=TENANT))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.stub.AuthorizePayment(_authorize(**change), timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == code
    got_reason, got_field = parse_rpc_error(caught.value)
    if reason:
        assert (got_reason, got_field) == (reason, field)
    after = await world.money.CheckBalanced(money_pb2.CheckBalancedRequest(tenant_id=TENANT))
    assert [t.pending_debits_minor for t in after.totals] == [
        t.pending_debits_minor for t in before.totals
    ]


async def test_idempotent_retry_and_key_reuse(world: World) -> None:
    request = _authorize(account_id="cust_6", idempotency_key="same-key-1")
    first = await world.stub.AuthorizePayment(request, timeout=RPC_TIMEOUT_S)
    again = await world.stub.AuthorizePayment(request, timeout=RPC_TIMEOUT_S)
    assert again.replayed and again.hold_id == first.hold_id
    assert again.decision_id == first.decision_id
    other = _authorize(account_id="cust_6", idempotency_key="same-key-1", amount=_usd(2600))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.stub.AuthorizePayment(other, timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert parse_rpc_error(caught.value) == ("IDEMPOTENCY_KEY_REUSED", "amount.amount_minor")


async def test_money_plane_restart_mid_flow_loses_nothing(world: World) -> None:
    money = world.plane("money")
    request = _authorize(account_id="cust_7", amount=_usd(1234))
    os.kill(money.pid, signal.SIGSTOP)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await world.stub.AuthorizePayment(request, timeout=1.5)
        assert caught.value.code() in (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.UNAVAILABLE,
        )
    finally:
        os.kill(money.pid, signal.SIGKILL)
        await asyncio.to_thread(money.process.wait)
    env = world.stack._child_env(world.stack.state_dir / "stack-config.yaml")
    plane_config = next(p for p in world.config.stack.planes if p.name == "money")
    restarted = world.stack._spawn(plane_config, env)
    world.stack.processes[world.stack.processes.index(money)] = restarted
    await world.stack._wait_serving(restarted, time.monotonic() + 60)
    # The caller retries with the same key: the same decision, one hold.
    for _ in range(20):
        try:
            answer = await world.stub.AuthorizePayment(request, timeout=RPC_TIMEOUT_S)
            break
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.5)
    assert answer.outcome == gw.OUTCOME_ALLOW and answer.hold_id
    again = await world.stub.AuthorizePayment(request, timeout=RPC_TIMEOUT_S)
    assert again.hold_id == answer.hold_id
    balance = await world.money.GetBalance(
        money_pb2.GetBalanceRequest(tenant_id=TENANT, account_id="cust_7")
    )
    assert balance.balance.debits_pending_minor == 1234


async def test_lost_journal_resumes_the_decision_already_made(world: World) -> None:
    """A gateway that crashed inside one flush lost its journal of an attempt the
    policy plane had already decided: the retry, built on a fresh context the
    policy plane refuses, resumes with the decision made earlier, not a new one."""
    from gateway.idempotency import derive_key
    from gateway.payments import Payments

    request = _authorize(account_id="cust_15", amount=_usd(1500), idempotency_key="lost-journal")
    downstream_key = derive_key(TENANT, "AuthorizePayment", request.idempotency_key, "authorize")
    # What the lost attempt sent: the same payment, decided without a score.
    assert world.gateway.core is not None
    earlier = Payments(world.gateway.core)._build_evaluate(request, downstream_key, None)
    policy = policy_pb2_grpc.PolicyServiceStub(world.policy_channel)
    decided = await policy.Evaluate(earlier, timeout=RPC_TIMEOUT_S)
    answer = await world.stub.AuthorizePayment(request, timeout=RPC_TIMEOUT_S)
    assert answer.decision_id == decided.decision.decision_id
    assert answer.policy_version == decided.decision.bundle_version
    assert answer.model_score_ref.source == "none"  # the earlier attempt's input
    by_key = await policy.GetDecision(
        policy_pb2.GetDecisionRequest(tenant_id=TENANT, idempotency_key=downstream_key),
        timeout=RPC_TIMEOUT_S,
    )
    assert by_key.decision.decision_id == answer.decision_id
    again = await world.stub.AuthorizePayment(request, timeout=RPC_TIMEOUT_S)
    assert again.replayed and again.decision_id == answer.decision_id
    assert again.hold_id == answer.hold_id
    if answer.outcome == gw.OUTCOME_ALLOW:
        balance = await world.money.GetBalance(
            money_pb2.GetBalanceRequest(tenant_id=TENANT, account_id="cust_15")
        )
        assert balance.balance.debits_pending_minor == 1500
    # Not both selectors, and an unknown key is NOT_FOUND naming it.
    for selector, code, field in (
        (
            {"decision_id": answer.decision_id, "idempotency_key": downstream_key},
            grpc.StatusCode.INVALID_ARGUMENT,
            "idempotency_key",
        ),
        ({"idempotency_key": "no-such-key"}, grpc.StatusCode.NOT_FOUND, "idempotency_key"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await policy.GetDecision(
                policy_pb2.GetDecisionRequest(tenant_id=TENANT, **selector), timeout=RPC_TIMEOUT_S
            )
        assert caught.value.code() == code
        assert parse_rpc_error(caught.value)[1] == field


async def test_retry_after_a_lost_answer_gets_the_hold_already_placed(world: World) -> None:
    """The gateway placed the hold, then the answer was lost (the replica was
    killed, or the caller's deadline passed first): the caller's retry, a new
    call with a new trace id, is answered with that hold. The hold's metadata
    carried the first attempt's trace id, which the ledger compares on a
    retry under the same key, so the retry was ALREADY_EXISTS
    IDEMPOTENCY_KEY_REUSED (metadata) and the hold stayed pending (found by
    the chaos run)."""
    from gateway.core import CallContext, new_trace_id
    from gateway.idempotency import derive_key
    from gateway.payments import Payments
    from triplane.runtime.deadline import Deadline

    request = _authorize(account_id="cust_16", amount=_usd(1600), idempotency_key="lost-answer")
    downstream_key = derive_key(TENANT, "AuthorizePayment", request.idempotency_key, "authorize")
    assert world.gateway.core is not None
    payments = Payments(world.gateway.core)
    # The lost attempt, as the gateway ran it: decided, then the hold placed.
    evaluate = payments._build_evaluate(request, downstream_key, None)
    policy = policy_pb2_grpc.PolicyServiceStub(world.policy_channel)
    decided = await policy.Evaluate(evaluate, timeout=RPC_TIMEOUT_S)
    assert decided.decision.outcome == policy_pb2.OUTCOME_ALLOW
    first = CallContext(deadline=Deadline.from_remaining(RPC_TIMEOUT_S), trace_id=new_trace_id())
    hold = await payments._place_hold(request, decided.decision, downstream_key, evaluate, first)

    answer = await world.stub.AuthorizePayment(request, timeout=RPC_TIMEOUT_S)
    assert answer.hold_id == hold.hold_id
    assert answer.decision_id == decided.decision.decision_id
    balance = await world.money.GetBalance(
        money_pb2.GetBalanceRequest(tenant_id=TENANT, account_id="cust_16")
    )
    assert balance.balance.debits_pending_minor == 1600


# ---------------------------------------------------------------- next best action


async def test_decide_next_action_with_exclusions_and_exposure_event(world: World) -> None:
    nc = NatsClient()
    await nc.connect(world.config.nats.url)
    js = nc.jetstream()
    subject = f"triplane.gateway.{TENANT}.exposure.logged"
    sub = await js.subscribe(subject, ordered_consumer=True)
    try:
        answer = await world.stub.DecideNextAction(
            gw.DecideNextActionRequest(
                tenant_id=TENANT,
                idempotency_key=uuid.uuid4().hex,
                customer_id="c8",
                account_id="cust_8",
                surface="checkout",
                region="US",
            ),
            timeout=RPC_TIMEOUT_S,
        )
        assert answer.action == gw.ACTION_SHOW_OFFER, answer
        assert answer.offer.offer_id in {"cashback_grocery", "bnpl_electronics", "savings_roundup"}
        assert answer.channel == gw.CONTACT_CHANNEL_IN_APP
        assert 0 < answer.action_probability <= 1 and answer.decision_id
        excluded = {e.offer_id: e.reason for e in answer.excluded}
        assert excluded.get("credit_line_increase") == "NOT_ELIGIBLE"
        assert answer.alternatives
        found = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and found is None:
            msg = await sub.next_msg(timeout=5)
            envelope = envelope_pb2.EventEnvelope.FromString(msg.data)
            exposure = gw.ExposureLogged.FromString(envelope.payload)
            if exposure.decision_id == answer.decision_id:
                found = exposure
        assert found is not None and found.offer_id == answer.offer.offer_id
        assert found.action_probability == pytest.approx(answer.action_probability)
        assert found.customer_token.startswith("tok_customer_")

        outcome = await world.stub.RecordOutcome(
            gw.RecordOutcomeRequest(
                tenant_id=TENANT,
                idempotency_key=uuid.uuid4().hex,
                decision_id=answer.decision_id,
                kind=gw.OUTCOME_KIND_CONVERTED,
            ),
            timeout=RPC_TIMEOUT_S,
        )
        assert outcome.reward == 1.0 and outcome.offer_id == answer.offer.offer_id
    finally:
        await sub.unsubscribe()
        await nc.close()


async def test_the_learner_decides_on_the_request_context_and_learns_the_outcome(
    world: World,
) -> None:
    """The offer shown is the AI plane's learner's, with the probability it
    was drawn with (arbitration no longer overrides it); the request's
    context reaches the learner; the outcome is the ranking's reward on the
    exposure log (TRIPLANE_AI learner.reward)."""
    # On a loaded machine a ranking can miss its budget (the answer then
    # falls back to arbitration and says so): the first ranked answer is the
    # one (another customer each time: an offer shown is in its 1 s cooldown).
    for customer in range(9, 14):
        answer = await world.stub.DecideNextAction(
            gw.DecideNextActionRequest(
                tenant_id=TENANT,
                idempotency_key=uuid.uuid4().hex,
                customer_id=f"c{customer}",
                account_id=f"cust_{customer}",
                surface="checkout",
                region="US",
                features={"cart_value": 120.0, "step": 2.0},
            ),
            timeout=RPC_TIMEOUT_S,
        )
        if not answer.rank_fallback_reason:
            break
    assert not answer.rank_fallback_reason, answer
    assert answer.action == gw.ACTION_SHOW_OFFER, answer
    assert answer.reasons[0] in ("LEARNER_BEST", "LEARNER_EXPLORATION"), answer.reasons
    assert answer.action_probability == answer.offer.exploration_probability > 0
    shown = [answer.offer, *answer.alternatives]
    assert math.isclose(math.fsum(o.exploration_probability for o in shown), 1.0)
    outcome = await world.stub.RecordOutcome(
        gw.RecordOutcomeRequest(
            tenant_id=TENANT,
            idempotency_key=uuid.uuid4().hex,
            decision_id=answer.decision_id,
            kind=gw.OUTCOME_KIND_CONVERTED,
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert outcome.bandit_updated
    nc = NatsClient()
    await nc.connect(world.config.nats.url)
    try:
        sub = await nc.jetstream().subscribe(
            f"triplane.ai.{TENANT}.learner.reward", ordered_consumer=True
        )
        reward = None
        while reward is None:
            msg = await sub.next_msg(timeout=RPC_TIMEOUT_S)
            found = ai_pb2.LearnerReward.FromString(
                envelope_pb2.EventEnvelope.FromString(msg.data).payload
            )
            if found.rank_id == answer.rank_id:
                reward = found
    finally:
        await nc.close()
    exposure = reward.exposure
    assert reward.kind == ai_pb2.OUTCOME_KIND_CONVERTED and reward.reward > 0
    assert not reward.late
    assert exposure.chosen_offer_id == answer.offer.offer_id
    assert exposure.chosen_probability == answer.action_probability
    context = {f.name: f.value for f in exposure.context}
    assert context["f_cart_value"] == 120.0 and context["f_step"] == 2.0
    assert "surface=checkout" in context and "region=US" in context
    assert {a.offer_id for a in exposure.arms} == {o.offer_id for o in shown}
    assert math.isclose(math.fsum(a.probability for a in exposure.arms), 1.0)


async def test_decide_without_consent_shows_nothing(world: World) -> None:
    answer = await world.stub.DecideNextAction(
        gw.DecideNextActionRequest(
            tenant_id=TENANT,
            idempotency_key=uuid.uuid4().hex,
            customer_id="c19",
            account_id="cust_19",
            surface="app_home",
            region="US",
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert answer.action == gw.ACTION_NONE and "NOTHING_ELIGIBLE" in answer.reasons
    assert {e.reason for e in answer.excluded} >= {"NO_CONSENT"}


async def test_decide_unknown_surface_is_invalid(world: World) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.stub.DecideNextAction(
            gw.DecideNextActionRequest(
                tenant_id=TENANT,
                idempotency_key="k",
                customer_id="c1",
                account_id="cust_1",
                surface="billboard",
            ),
            timeout=RPC_TIMEOUT_S,
        )
    assert parse_rpc_error(caught.value) == ("SURFACE_UNKNOWN", "surface")


# ---------------------------------------------------------------- behaviour events, client


async def test_ingest_events_publishes_tokenized_envelopes(world: World) -> None:
    nc = NatsClient()
    await nc.connect(world.config.nats.url)
    js = nc.jetstream()
    sub = await js.subscribe(f"triplane.gateway.{TENANT}.behaviour.>", ordered_consumer=True)
    try:
        events = [
            gw.BehaviourEvent(
                idempotency_key="ev-1",
                kind=gw.EVENT_KIND_LOAN_SIMULATED,
                customer=gw.Customer(customer_id="c9", email="c9@example.com"),
                account_id="cust_9",
                amount=_usd(500000),
                attributes={"contact": "+1 415 555 0100"},
            ),
            gw.BehaviourEvent(
                idempotency_key="ev-2", kind=gw.EVENT_KIND_UNSPECIFIED, account_id="cust_9"
            ),
        ]
        answer = await world.stub.IngestEvents(
            gw.IngestEventsRequest(tenant_id=TENANT, events=events), timeout=RPC_TIMEOUT_S
        )
        assert not answer.results[0].HasField("error") and answer.results[0].event_id
        assert answer.results[1].error.reason == "EVENT_KIND_REQUIRED"
        assert answer.results[1].error.field == "events[1].kind"
        msg = await sub.next_msg(timeout=5)
        assert msg.subject == f"triplane.gateway.{TENANT}.behaviour.loan_simulated"
        assert b"555" not in msg.data and b"example.com" not in msg.data
        again = await world.stub.IngestEvents(
            gw.IngestEventsRequest(tenant_id=TENANT, events=events[:1]), timeout=RPC_TIMEOUT_S
        )
        assert again.results[0].replayed
        assert again.results[0].event_id == answer.results[0].event_id
    finally:
        await sub.unsubscribe()
        await nc.close()


async def test_an_ingested_event_converts_the_offer_it_was_shown_for(world: World) -> None:
    """Conversion events matched by the shown offer's conversion definition
    close the loop into measurement, without any RecordOutcome call."""
    answer = await world.stub.DecideNextAction(
        gw.DecideNextActionRequest(
            tenant_id=TENANT,
            idempotency_key=uuid.uuid4().hex,
            customer_id="c12",
            account_id="cust_12",
            surface="checkout",
            region="US",
        ),
        timeout=RPC_TIMEOUT_S,
    )
    # This module runs with holdout_share 0 and c12 consented: an offer is shown.
    assert not answer.assignment.holdout and answer.action == gw.ACTION_SHOW_OFFER, answer
    measurement = world.gateway.measurement
    assert measurement is not None

    async def conversions_of(offer_id: str) -> int:
        report = await measurement.lift_report(TENANT)  # type: ignore[attr-defined]
        rows = [r for r in report.rows if r.offer_id == offer_id and r.surface == "checkout"]
        return sum(r.treatment.conversions for r in rows)

    before = await conversions_of(answer.offer.offer_id)
    ingested = await world.stub.IngestEvents(
        gw.IngestEventsRequest(
            tenant_id=TENANT,
            events=[
                gw.BehaviourEvent(
                    idempotency_key=uuid.uuid4().hex,
                    kind=gw.EVENT_KIND_LOAN_SIMULATED,
                    customer=gw.Customer(customer_id="c12"),
                    account_id="cust_12",
                    amount=_usd(250000),
                )
            ],
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert not ingested.results[0].HasField("error")
    assert await conversions_of(answer.offer.offer_id) == before + 1


@pytest.mark.parametrize("local_hour", LOCAL_HOURS)
async def test_typed_client(world: World, local_hour: int) -> None:
    answer = await world.client.authorize_payment(
        tenant_id=TENANT,
        account_id="cust_10",
        credit_account_id=MERCHANT,
        amount=_usd(999),
        kind=gw.PAYMENT_KIND_PURCHASE,
        customer=gw.Customer(customer_id="c10", time_zone=zone_at(local_hour)),
    )
    assert answer.outcome == gw.OUTCOME_ALLOW and answer.idempotency_key
    with pytest.raises(TriplaneApiError) as caught:
        await world.client.capture_payment(tenant_id=TENANT, hold_id="")
    assert caught.value.reason == "FIELD_REQUIRED" and caught.value.field == "hold_id"
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_metrics_endpoint_serves_the_lift_figures(world: World) -> None:
    """The lift report's figures as Prometheus gauges on gateway.metrics_listen,
    refreshed on their interval, after a decision that showed an offer."""
    import aiohttp

    for customer in ("c13", "c14", "c15", "c16", "c17"):  # consented, see _seed
        answer = await world.stub.DecideNextAction(
            gw.DecideNextActionRequest(
                tenant_id=TENANT,
                idempotency_key=uuid.uuid4().hex,
                customer_id=customer,
                account_id="cust_11",
                surface="checkout",
                region="US",
            ),
            timeout=RPC_TIMEOUT_S,
        )
        if answer.action == gw.ACTION_SHOW_OFFER:
            break
    assert answer.action == gw.ACTION_SHOW_OFFER
    url = f"http://{world.config.gateway.metrics_listen}/metrics"
    wanted = f'triplane_lift_customers{{group="treatment",offer="{answer.offer.offer_id}"'
    text = ""
    async with aiohttp.ClientSession() as session:
        for _ in range(50):
            async with session.get(url) as response:
                assert response.status == 200
                text = await response.text()
            if wanted in text and f'tenant="{TENANT}"' in text:
                break
            await asyncio.sleep(0.2)
    assert wanted in text, text[-2000:]
    assert "triplane_lift_incremental" in text


# ---------------------------------------------------------------- paging


async def test_every_list_refuses_another_lists_token_and_a_garbled_one(world: World) -> None:
    """One page-token format (triplane.runtime.codec) behind every list RPC of
    every plane, each through its real server: a token one list issued is
    refused by every other, and so is a garbled one or an earlier release's,
    always INVALID_ARGUMENT PAGE_TOKEN_INVALID naming page_token."""
    ai_channel = world.stack.channel("ai")
    registry = ai_pb2_grpc.ModelRegistryServiceStub(ai_channel)
    bundles = policy_pb2_grpc.BundleServiceStub(world.policy_channel)
    offers = policy_pb2_grpc.OfferServiceStub(world.policy_channel)
    cases = policy_pb2_grpc.CaseServiceStub(world.policy_channel)
    lists: dict[str, Any] = {
        POSTINGS_PAGE: lambda token: world.money.ListAccountPostings(
            money_pb2.ListAccountPostingsRequest(
                tenant_id=TENANT, account_id=MERCHANT, page_token=token
            )
        ),
        BUNDLES_PAGE: lambda token: bundles.ListBundles(
            policy_pb2.ListBundlesRequest(page_token=token)
        ),
        OFFERS_PAGE: lambda token: offers.ListOffers(
            policy_pb2.ListOffersRequest(tenant_id=TENANT, page_token=token)
        ),
        CASES_PAGE: lambda token: cases.ListCases(
            policy_pb2.ListCasesRequest(tenant_id=TENANT, page_token=token)
        ),
        MODEL_VERSIONS_PAGE: lambda token: registry.ListModelVersions(
            ai_pb2.ListModelVersionsRequest(page_token=token)
        ),
        DEAD_LETTERS_PAGE: lambda token: world.stub.ListDeadLetters(
            gw.ListDeadLettersRequest(tenant_id=TENANT, page_token=token)
        ),
    }
    try:
        # Tokens the lists really issued (four offers and two models were
        # seeded, so a page of one has a next page), each good for its own list.
        issued = {
            OFFERS_PAGE: (
                await offers.ListOffers(policy_pb2.ListOffersRequest(tenant_id=TENANT, page_size=1))
            ).next_page_token,
            MODEL_VERSIONS_PAGE: (
                await registry.ListModelVersions(ai_pb2.ListModelVersionsRequest(page_size=1))
            ).next_page_token,
        }
        for kind, token in issued.items():
            assert token
            await lists[kind](token)
        refusals: dict[tuple[str, str], tuple[grpc.StatusCode, str, str]] = {}
        for kind, call in lists.items():
            tokens = refused_tokens(kind)
            tokens.update({f"issued by {k}": t for k, t in issued.items() if k != kind})
            for label, token in tokens.items():
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(token)
                refusals[(kind, label)] = (caught.value.code(), *parse_rpc_error(caught.value))
        expected = (grpc.StatusCode.INVALID_ARGUMENT, "PAGE_TOKEN_INVALID", "page_token")
        assert {key: got for key, got in refusals.items() if got != expected} == {}
        assert {kind for kind, _ in refusals} == set(lists)
    finally:
        await ai_channel.close()
