"""Partner credentials through the real gateway (mutual TLS on, money and
policy planes as servers): every GatewayService RPC needs a credential whose
tenant it serves and whose scope it needs; tenant A's key reaches nothing of
tenant B's; keys expire, are revoked and rotated out on the gateway's
(injected) clock; OAuth2 JWTs are checked against a JWKS; ApiKeyService is
for admins; rate limits answer with a retry delay, in process and shared
through the real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from joserfc import jwk
from joserfc import jwt as jose_jwt
from joserfc.errors import SecurityWarning

from gateway.app import Gateway
from gateway.auth import apikey, secrets
from gateway.auth.interceptor import CredentialInterceptor
from gateway.auth.scopes import (
    API_KEY_SERVICE,
    DELIVERY_ADMIN_SERVICE,
    EVENTS_WRITE,
    EXPERIMENT_ADMIN_SERVICE,
    GATEWAY_SERVICE,
    KEYS_ADMIN,
    METHOD_RULES,
    PAYMENTS_WRITE,
)
from gateway.delivery import DeliveryStore
from gateway.delivery.model import DeliveryRecord
from gateway.permissions import PERMISSIONS
from gateway.storage import open_engagement_db
from money_plane.app import MoneyPlane
from policy_plane.app import build_plane
from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import delivery_admin_pb2, experiments_admin_pb2, gateway_pb2_grpc
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.money.v1 import money_pb2, money_pb2_grpc
from triplane.policy.v1 import policy_pb2, policy_pb2_grpc
from triplane.runtime.authz import peer_identity
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config, load_config, with_overrides
from triplane.runtime.net import free_port
from triplane.runtime.server import PlaneServer, ServerSecurity
from triplane.runtime.status import error_details
from triplane.runtime.tls import ADMIN, GATEWAY, channel_for, open_channel
from triplane_client import (
    ApiKeysClient,
    GatewayClient,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from triplane_tools.partner_keys import PARTNER_SCOPES

from ..tls_helpers import dev_certificates, identity_files, partner_files
from .auth_helpers import KeyedStub, partner_key

pytestmark = [pytest.mark.nats]

ALPHA, BETA = "alpha", "beta"
MERCHANT = "merchant_1"
RPC_TIMEOUT_S = 10.0
ISSUER = "https://idp.example.com/"
AUDIENCE = "https://gateway.triplane.example/"
ALLOW_ALL = """
apiVersion: triplane.policy/v1
label: allow-all
rules:
  - id: never
    when: "false"
    outcome: deny
    reason_code: NEVER
"""


def _usd(minor: int) -> types_pb2.Money:
    return types_pb2.Money(amount_minor=minor, currency="USD")


@dataclasses.dataclass
class Mesh:
    config: Config
    state_dir: Path
    clock: ManualClock
    gateway: Gateway
    address: str
    money_address: str
    policy_address: str
    channel: grpc.aio.Channel
    keys: dict[str, str]
    idp: dict[str, Any]

    def stub(self, key: str | None = None) -> Any:
        plain = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        return plain if key is None else KeyedStub(plain, key)

    def client(self, key: str) -> GatewayClient:
        return GatewayClient(
            self.address, timeout_s=RPC_TIMEOUT_S, api_key=key, tls=partner_files(self.state_dir)
        )

    async def start_gateway(self, stack: contextlib.AsyncExitStack, **gateway: Any) -> str:
        """Another gateway replica on the same planes and key store, with
        `gateway` config overrides; its address."""
        config = with_overrides(
            self.config,
            {
                "gateway": {
                    "idempotency": {"sqlite_path": f"gw-{uuid.uuid4().hex[:8]}.db"},
                    **gateway,
                }
            },
        )
        replica = Gateway(
            config,
            self.clock,
            money_address=self.money_address,
            policy_address=self.policy_address,
            ai_address=f"127.0.0.1:{free_port()}",
        )
        stack.push_async_callback(replica.stop)
        return f"127.0.0.1:{await replica.start()}"


def _idp_keys(state_dir: Path) -> dict[str, Any]:
    keys: dict[str, Any] = {
        "ed-1": jwk.OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"}),
        "ec-1": jwk.ECKey.generate_key("P-256", parameters={"kid": "ec-1"}),
    }
    jwks = {"keys": [key.as_dict(private=False) for key in keys.values()]}
    (state_dir / "jwks.json").write_text(json.dumps(jwks))
    return keys


def _config(state_dir: Path, nats_url: str) -> Config:
    dev_certificates(state_dir)  # as the dev stack makes them: mutual TLS is on
    secrets.ensure_dev_files(state_dir, "test")  # the pepper and the bootstrap admin key
    return load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir)},
            "nats": {"url": nats_url},
            "gateway": {
                "listen": "127.0.0.1:0",
                "holdout_share": 0.0,
                "auth": {
                    "cache_ttl_s": 5.0,
                    "rotation_overlap_s": 600,
                    "jwt": {
                        "jwks": str(state_dir / "jwks.json"),
                        "issuer": ISSUER,
                        "audience": AUDIENCE,
                    },
                },
            },
        },
    )


async def _seed(config: Config, money_address: str, policy_address: str) -> None:
    """Both tenants in both planes, each with a customer and a merchant
    account, and the allow-all bundle (as the admin identity)."""
    async with channel_for(config, money_address) as channel:
        ledger = money_pb2_grpc.LedgerServiceStub(channel)
        for tenant in (ALPHA, BETA):
            await ledger.CreateTenant(money_pb2.CreateTenantRequest(tenant_id=tenant))
            await ledger.CreateAccounts(
                money_pb2.CreateAccountsRequest(
                    tenant_id=tenant,
                    accounts=[
                        money_pb2.NewAccount(
                            account_id=account,
                            currency="USD",
                            kind=money_pb2.ACCOUNT_KIND_LIABILITY,
                            constraint=money_pb2.BALANCE_CONSTRAINT_NONE,
                        )
                        for account in ("cust_1", MERCHANT)
                    ],
                )
            )
    async with channel_for(config, policy_address) as channel:
        for tenant in (ALPHA, BETA):
            await policy_pb2_grpc.PolicyServiceStub(channel).CreateTenant(
                policy_pb2.CreateTenantRequest(tenant_id=tenant, display_name=tenant)
            )
        await policy_pb2_grpc.BundleServiceStub(channel).LoadBundle(
            policy_pb2.LoadBundleRequest(content=ALLOW_ALL, target=policy_pb2.BUNDLE_TARGET_LIVE)
        )


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory, nats_url: str) -> AsyncIterator[Mesh]:
    state_dir = tmp_path_factory.mktemp("auth-state")
    idp = _idp_keys(state_dir)
    config = _config(state_dir, nats_url)
    # One clock for the three: a decision token is checked on the money plane's.
    clock = ManualClock()
    async with contextlib.AsyncExitStack() as stack:
        money = MoneyPlane(config, clock, listen="127.0.0.1:0")
        stack.push_async_callback(money.stop)
        money_address = f"127.0.0.1:{await money.start(sweepers=False)}"
        policy = build_plane(config, clock, listen="127.0.0.1:0")
        stack.push_async_callback(policy.stop)
        policy_address = f"127.0.0.1:{await policy.start()}"
        gateway = Gateway(
            config,
            clock,
            money_address=money_address,
            policy_address=policy_address,
            ai_address=f"127.0.0.1:{free_port()}",  # down: scores degrade
        )
        stack.push_async_callback(gateway.stop)
        address = f"127.0.0.1:{await gateway.start()}"
        await _seed(config, money_address, policy_address)
        channel = open_channel(address, partner_files(state_dir))
        stack.push_async_callback(channel.close)
        keys = {tenant: await partner_key(gateway, tenant) for tenant in (ALPHA, BETA)}
        yield Mesh(
            config,
            state_dir,
            clock,
            gateway,
            address,
            money_address,
            policy_address,
            channel,
            keys,
            idp,
        )


async def _refused(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    details = error_details(caught.value)
    return caught.value.code(), details.reason, details.field


def _authorize(**changes: Any) -> gw.AuthorizePaymentRequest:
    request = gw.AuthorizePaymentRequest(
        idempotency_key=uuid.uuid4().hex,
        account_id="cust_1",
        credit_account_id=MERCHANT,
        amount=_usd(1500),
        kind=gw.PAYMENT_KIND_PURCHASE,
        merchant_id="m1",
        merchant_category="5411",
        channel=gw.PAYMENT_CHANNEL_ECOMMERCE,
        customer=gw.Customer(customer_id="c1", country="US", kyc_tier=2, account_age_days=400),
    )
    for name, value in changes.items():
        setattr(request, name, value)
    return request


# ---------------------------------------------------------------- the table


def test_every_method_the_gateway_serves_is_in_the_credential_table() -> None:
    services = [
        *gw.DESCRIPTOR.services_by_name.values(),
        *delivery_admin_pb2.DESCRIPTOR.services_by_name.values(),
        *experiments_admin_pb2.DESCRIPTOR.services_by_name.values(),
    ]
    served = {
        f"/{service.full_name}/{method.name}" for service in services for method in service.methods
    }
    assert {s.full_name for s in services} == {
        GATEWAY_SERVICE,
        API_KEY_SERVICE,
        DELIVERY_ADMIN_SERVICE,
        EXPERIMENT_ADMIN_SERVICE,
    }
    assert served == set(METHOD_RULES), "a method without a rule is refused; list it"
    # Every GatewayService request can be bound to the credential's tenant.
    for service in services:
        for method in service.methods:
            assert "tenant_id" in method.input_type.fields_by_name, method.full_name


# ---------------------------------------------------------------- who


def _every_gateway_call(stub: Any, tenant_id: str = "") -> dict[str, Awaitable[Any]]:
    """One call of every GatewayService RPC (the payloads need not be
    servable: the credential is checked first)."""
    key = uuid.uuid4().hex
    return {
        "AuthorizePayment": stub.AuthorizePayment(_authorize(tenant_id=tenant_id)),
        "CapturePayment": stub.CapturePayment(
            gw.CapturePaymentRequest(tenant_id=tenant_id, idempotency_key=key, hold_id="h1")
        ),
        "VoidPayment": stub.VoidPayment(
            gw.VoidPaymentRequest(tenant_id=tenant_id, idempotency_key=key, hold_id="h1")
        ),
        "RefundPayment": stub.RefundPayment(
            gw.RefundPaymentRequest(tenant_id=tenant_id, idempotency_key=key, entry_id="e1")
        ),
        "GetDecision": stub.GetDecision(
            gw.GetDecisionRequest(tenant_id=tenant_id, decision_id="d1")
        ),
        "DecideNextAction": stub.DecideNextAction(
            gw.DecideNextActionRequest(
                tenant_id=tenant_id,
                idempotency_key=key,
                customer_id="c1",
                account_id="cust_1",
                surface="checkout",
            )
        ),
        "RecordOutcome": stub.RecordOutcome(
            gw.RecordOutcomeRequest(
                tenant_id=tenant_id,
                idempotency_key=key,
                decision_id="d1",
                kind=gw.OUTCOME_KIND_CONVERTED,
            )
        ),
        "IngestEvents": stub.IngestEvents(
            gw.IngestEventsRequest(
                tenant_id=tenant_id,
                events=[
                    gw.BehaviourEvent(
                        idempotency_key=key,
                        kind=gw.EVENT_KIND_APP_OPENED,
                        customer=gw.Customer(customer_id="c1"),
                    )
                ],
            )
        ),
        "ListDeadLetters": stub.ListDeadLetters(gw.ListDeadLettersRequest(tenant_id=tenant_id)),
        "RedeliverDeadLetter": stub.RedeliverDeadLetter(
            gw.RedeliverDeadLetterRequest(
                tenant_id=tenant_id, idempotency_key=key, delivery_id="x1"
            )
        ),
        "PutCustomerProfile": stub.PutCustomerProfile(
            gw.PutCustomerProfileRequest(
                tenant_id=tenant_id,
                profile=gw.CustomerProfile(
                    customer_id="c1",
                    kyc_tier=3,
                    country="US",
                    account_opened_at=Timestamp(seconds=1_700_000_000),
                ),
                change_id=key,
                actor="kyc-provider",
            )
        ),
        "GetCustomerProfile": stub.GetCustomerProfile(
            gw.GetCustomerProfileRequest(tenant_id=tenant_id, customer_id="c1")
        ),
        "CreateBeneficiary": stub.CreateBeneficiary(
            gw.CreateBeneficiaryRequest(
                tenant_id=tenant_id,
                idempotency_key=key,
                beneficiary_id="b1",
                merchant_id="m1",
                holder_name="Jonas Schmidt",
                country="DE",
                iban="DE89370400440532013000",
            )
        ),
        "GetBeneficiary": stub.GetBeneficiary(
            gw.GetBeneficiaryRequest(tenant_id=tenant_id, beneficiary_id="b1")
        ),
        "CreatePayout": stub.CreatePayout(
            gw.CreatePayoutRequest(
                tenant_id=tenant_id,
                idempotency_key=key,
                merchant_id="m1",
                account_id="merchant_1",
                beneficiary_id="b1",
                amount=types_pb2.Money(amount_minor=100, currency="USD"),
            )
        ),
        "GetPayout": stub.GetPayout(gw.GetPayoutRequest(tenant_id=tenant_id, payout_id="p1")),
    }


async def test_without_a_good_credential_no_method_runs(mesh: Mesh) -> None:
    key = mesh.keys[ALPHA]
    parsed = apikey.parse(key)
    cases = {
        "CREDENTIAL_MISSING": mesh.stub(),
        "CREDENTIAL_CHECKSUM_INVALID": mesh.stub(key[:-1] + ("A" if key[-1] != "A" else "B")),
        # Well formed, right checksum, no such key.
        "CREDENTIAL_INVALID": mesh.stub(apikey.make_key("test", parsed.key_id)),
        "CREDENTIAL_MALFORMED": mesh.stub("sk_live_not_ours"),
        "CREDENTIAL_ENVIRONMENT_MISMATCH": mesh.stub(apikey.make_key("live", parsed.key_id)),
    }
    assert len(_every_gateway_call(mesh.stub())) == sum(
        1 for m in METHOD_RULES if m.startswith(f"/{GATEWAY_SERVICE}/")
    )
    for reason, stub in cases.items():
        for method, call in _every_gateway_call(stub, ALPHA).items():
            assert await _refused(call) == (grpc.StatusCode.UNAUTHENTICATED, reason, ""), (
                reason,
                method,
            )


async def test_the_typed_client_says_what_is_wrong(mesh: Mesh) -> None:
    async with mesh.client("") as anonymous:
        with pytest.raises(UnauthenticatedError) as missing:
            await anonymous.get_decision(decision_id="d1")
    assert missing.value.reason == "CREDENTIAL_MISSING"
    async with mesh.client(mesh.keys[ALPHA]) as alpha:
        with pytest.raises(PermissionDeniedError) as other_tenant:
            await alpha.get_decision(tenant_id=BETA, decision_id="d1")
    assert (other_tenant.value.reason, other_tenant.value.field) == ("TENANT_MISMATCH", "tenant_id")
    events_only = await partner_key(mesh.gateway, ALPHA, [EVENTS_WRITE])
    async with mesh.client(events_only) as narrow:
        with pytest.raises(PermissionDeniedError) as no_scope:
            await narrow.void_payment(hold_id="h1")
    assert no_scope.value.reason == "SCOPE_MISSING"
    assert no_scope.value.scope == PAYMENTS_WRITE
    assert PAYMENTS_WRITE in no_scope.value.message


async def test_a_key_without_the_scope_is_refused_naming_it(mesh: Mesh) -> None:
    events_only = mesh.stub(await partner_key(mesh.gateway, ALPHA, [EVENTS_WRITE]))
    for method, call in _every_gateway_call(events_only).items():
        if method == "IngestEvents":
            answer = await call
            assert answer.results[0].event_id  # its one scope works
            continue
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        details = error_details(caught.value)
        scope = METHOD_RULES[f"/{GATEWAY_SERVICE}/{method}"].scope
        assert (caught.value.code(), details.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "SCOPE_MISSING",
        ), method
        assert details.metadata["scope"] == scope
        assert scope in (caught.value.details() or "")


# ---------------------------------------------------------------- tenants are walls


@dataclasses.dataclass
class BetaThings:
    hold_id: str
    captured_hold_id: str
    entry_id: str
    payment_decision_id: str
    nba_decision_id: str
    delivery_id: str


async def _beta_things(mesh: Mesh) -> BetaThings:
    """What tenant B has: a hold, a captured payment, a payment decision, a
    next-best-action decision and a dead letter."""
    beta = mesh.stub(mesh.keys[BETA])
    held = await beta.AuthorizePayment(_authorize(), timeout=RPC_TIMEOUT_S)
    assert held.outcome == gw.OUTCOME_ALLOW and held.hold_id
    paid = await beta.AuthorizePayment(_authorize(), timeout=RPC_TIMEOUT_S)
    captured = await beta.CapturePayment(
        gw.CapturePaymentRequest(idempotency_key=uuid.uuid4().hex, hold_id=paid.hold_id),
        timeout=RPC_TIMEOUT_S,
    )
    decided = await beta.DecideNextAction(
        gw.DecideNextActionRequest(
            idempotency_key=uuid.uuid4().hex,
            customer_id="c1",
            account_id="cust_1",
            surface="checkout",
        ),
        timeout=RPC_TIMEOUT_S,
    )
    delivery_id = f"dl_{uuid.uuid4().hex[:12]}"
    db = open_engagement_db(mesh.config.gateway.store, mesh.state_dir)
    try:
        store = DeliveryStore(db)
        now_us = mesh.clock.now_us()
        store.insert(
            DeliveryRecord(
                delivery_id=delivery_id,
                tenant_id=BETA,
                dedupe_key=delivery_id,
                channel="push",
                endpoint="tok_device",
                event_type="offer.sent",
                body="{}",
                status="sending",
                attempts=1,
                next_attempt_at_us=now_us,
                created_at_us=now_us,
                send_at_us=now_us,
            )
        )
        assert store.mark_failed(delivery_id, 1, 500, "boom", 0, now_us)
    finally:
        db.close()
    return BetaThings(
        held.hold_id,
        paid.hold_id,
        captured.entry_id,
        held.decision_id,
        decided.decision_id,
        delivery_id,
    )


async def test_tenant_a_reaches_nothing_of_tenant_b(mesh: Mesh) -> None:
    things = await _beta_things(mesh)
    alpha = mesh.stub(mesh.keys[ALPHA])
    # Naming tenant B: refused before anything runs, on every RPC.
    for method, call in _every_gateway_call(alpha, BETA).items():
        assert await _refused(call) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "TENANT_MISMATCH",
            "tenant_id",
        ), method
    async with channel_for(mesh.config, mesh.money_address) as channel:
        ledger = money_pb2_grpc.LedgerServiceStub(channel)

        async def beta_state() -> tuple[bytes, ...]:
            balances = [
                (
                    await ledger.GetBalance(
                        money_pb2.GetBalanceRequest(tenant_id=BETA, account_id=account)
                    )
                ).balance.SerializeToString(deterministic=True)
                for account in ("cust_1", MERCHANT)
            ]
            hold = await ledger.GetHold(
                money_pb2.GetHoldRequest(tenant_id=BETA, hold_id=things.hold_id)
            )
            return (*balances, hold.SerializeToString(deterministic=True))

        before = await beta_state()
        # B's ids under A's key (tenant left to the credential): served as
        # tenant A's, where none of them exist.
        key = uuid.uuid4().hex
        attempts: dict[str, Awaitable[Any]] = {
            "CapturePayment": alpha.CapturePayment(
                gw.CapturePaymentRequest(idempotency_key=key, hold_id=things.hold_id)
            ),
            "VoidPayment": alpha.VoidPayment(
                gw.VoidPaymentRequest(idempotency_key=key, hold_id=things.hold_id)
            ),
            "RefundPayment": alpha.RefundPayment(
                gw.RefundPaymentRequest(idempotency_key=key, entry_id=things.entry_id)
            ),
            "GetDecision": alpha.GetDecision(
                gw.GetDecisionRequest(decision_id=things.payment_decision_id)
            ),
            "RecordOutcome": alpha.RecordOutcome(
                gw.RecordOutcomeRequest(
                    idempotency_key=key,
                    decision_id=things.nba_decision_id,
                    kind=gw.OUTCOME_KIND_CONVERTED,
                )
            ),
            "RedeliverDeadLetter": alpha.RedeliverDeadLetter(
                gw.RedeliverDeadLetterRequest(idempotency_key=key, delivery_id=things.delivery_id)
            ),
        }
        for method, call in attempts.items():
            code, _, _ = await _refused(call)
            assert code == grpc.StatusCode.NOT_FOUND, method
        # Authorizing on "cust_1" moves A's account of that name, never B's.
        moved = await alpha.AuthorizePayment(_authorize(), timeout=RPC_TIMEOUT_S)
        hold = await ledger.GetHold(
            money_pb2.GetHoldRequest(tenant_id=ALPHA, hold_id=moved.hold_id)
        )
        assert hold.hold.amount.amount_minor == 1500
        # Lists and reads show A's own only.
        letters = await alpha.ListDeadLetters(gw.ListDeadLettersRequest())
        assert things.delivery_id not in {d.delivery_id for d in letters.dead_letters}
        beta_letters = await mesh.stub(mesh.keys[BETA]).ListDeadLetters(gw.ListDeadLettersRequest())
        assert things.delivery_id in {d.delivery_id for d in beta_letters.dead_letters}
        ingested = await alpha.IngestEvents(
            gw.IngestEventsRequest(
                events=[
                    gw.BehaviourEvent(
                        idempotency_key=uuid.uuid4().hex,
                        kind=gw.EVENT_KIND_APP_OPENED,
                        customer=gw.Customer(customer_id="c1"),
                    )
                ]
            )
        )
        assert not ingested.results[0].HasField("error")
        assert await beta_state() == before
    # B's decision is still B's to read.
    mine = await mesh.stub(mesh.keys[BETA]).GetDecision(
        gw.GetDecisionRequest(decision_id=things.payment_decision_id)
    )
    assert mine.decision_id == things.payment_decision_id


async def test_idempotency_keys_are_per_tenant(mesh: Mesh) -> None:
    shared = f"same-{uuid.uuid4().hex}"
    alpha = await mesh.stub(mesh.keys[ALPHA]).AuthorizePayment(_authorize(idempotency_key=shared))
    beta = await mesh.stub(mesh.keys[BETA]).AuthorizePayment(_authorize(idempotency_key=shared))
    assert not alpha.replayed and not beta.replayed
    assert alpha.hold_id != beta.hold_id


# ---------------------------------------------------------------- keys stop


async def test_expired_revoked_and_rotated_out_keys_stop(mesh: Mesh) -> None:
    expiring = await partner_key(
        mesh.gateway, ALPHA, expires_at_us=mesh.clock.now_us() + 60 * 1_000_000
    )
    admin = ApiKeysClient(
        mesh.address,
        api_key=secrets.load_admin_key(mesh.config.gateway.auth, mesh.state_dir) or "",
        tls=partner_files(mesh.state_dir),
    )
    revoked = await partner_key(mesh.gateway, ALPHA)
    rotated = await partner_key(mesh.gateway, ALPHA)
    for key in (expiring, revoked, rotated):
        await mesh.stub(key).ListDeadLetters(gw.ListDeadLettersRequest())  # all work now
    await admin.revoke(tenant_id=ALPHA, key_id=apikey.parse(revoked).key_id)
    rotation = await admin.rotate(
        tenant_id=ALPHA, key_id=apikey.parse(rotated).key_id, overlap_s=120
    )
    assert rotation.secret and rotation.rotated.HasField("retires_at")
    assert await _refused(mesh.stub(revoked).ListDeadLetters(gw.ListDeadLettersRequest())) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "CREDENTIAL_REVOKED",
        "",
    )
    await mesh.stub(rotated).ListDeadLetters(gw.ListDeadLettersRequest())  # in its overlap
    mesh.clock.advance(60)
    assert (await _refused(mesh.stub(expiring).ListDeadLetters(gw.ListDeadLettersRequest())))[
        1
    ] == "CREDENTIAL_EXPIRED"
    await mesh.stub(rotated).ListDeadLetters(gw.ListDeadLettersRequest())
    mesh.clock.advance(60)
    assert (await _refused(mesh.stub(rotated).ListDeadLetters(gw.ListDeadLettersRequest())))[
        1
    ] == "CREDENTIAL_ROTATED"
    await mesh.stub(rotation.secret).ListDeadLetters(gw.ListDeadLettersRequest())
    await admin.close()


# ---------------------------------------------------------------- ApiKeyService


async def test_admins_manage_keys_and_the_secret_is_shown_once(mesh: Mesh) -> None:
    admin_key = secrets.load_admin_key(mesh.config.gateway.auth, mesh.state_dir)
    assert admin_key is not None
    # The bootstrap admin key, over a partner's (certificate-less) channel.
    by_key = ApiKeysClient(mesh.address, api_key=admin_key, tls=partner_files(mesh.state_dir))
    made = await by_key.create(
        tenant_id=BETA, scopes=[PAYMENTS_WRITE], idempotency_key="admin-1", display_name="pos"
    )
    assert made.secret and apikey.KEY_PATTERN.fullmatch(made.secret)
    assert made.api_key.redacted_key == f"tpk_test_{made.api_key.key_id}_"
    again = await by_key.create(
        tenant_id=BETA, scopes=[PAYMENTS_WRITE], idempotency_key="admin-1", display_name="pos"
    )
    assert again.replayed and again.secret == "" and again.api_key == made.api_key
    listed = await by_key.list(tenant_id=BETA)
    assert made.api_key.key_id in {k.key_id for k in listed.api_keys}
    assert made.secret.encode() not in listed.SerializeToString()
    listed = await by_key.list(tenant_id=BETA, page_size=1)
    assert len(listed.api_keys) == 1 and listed.next_page_token
    # A tenant's keys:admin key manages its own tenant, and grants only what it has.
    manager_key = await partner_key(mesh.gateway, ALPHA, [KEYS_ADMIN, PAYMENTS_WRITE])
    manager = ApiKeysClient(mesh.address, api_key=manager_key, tls=partner_files(mesh.state_dir))
    own = await manager.create(scopes=[PAYMENTS_WRITE])
    assert own.api_key.tenant_id == ALPHA
    with pytest.raises(PermissionDeniedError) as other:
        await manager.list(tenant_id=BETA)
    assert other.value.reason == "TENANT_MISMATCH"
    with pytest.raises(PermissionDeniedError) as more:
        await manager.create(scopes=[EVENTS_WRITE])
    assert more.value.scope == EVENTS_WRITE
    # Anyone else: a partner key without keys:admin, no credential at all.
    plain = ApiKeysClient(mesh.address, api_key=mesh.keys[ALPHA], tls=partner_files(mesh.state_dir))
    with pytest.raises(PermissionDeniedError) as partner:
        await plain.list()
    assert partner.value.scope == KEYS_ADMIN
    anonymous = ApiKeysClient(mesh.address, tls=partner_files(mesh.state_dir))
    with pytest.raises(UnauthenticatedError):
        await anonymous.list(tenant_id=ALPHA)
    # An admin credential belongs to no tenant: it moves no money.
    refused = await _refused(mesh.stub(admin_key).AuthorizePayment(_authorize(tenant_id=ALPHA)))
    assert refused == (grpc.StatusCode.PERMISSION_DENIED, "TENANT_CREDENTIAL_REQUIRED", "")
    for client in (by_key, manager, plain, anonymous):
        await client.close()


async def test_the_admin_certificate_manages_keys_where_certificates_are_asked_for(
    mesh: Mesh,
) -> None:
    """The gateway's public port lets partners in without a certificate, and
    grpc's Python server then asks none for one: the admin identity is
    recognised where the port requires client certificates (served here as
    the gateway would serve an admin port: the same ApiKeyService and
    credential check)."""
    auth = mesh.gateway.auth
    assert auth is not None
    interceptor = CredentialInterceptor(
        auth.authenticator, None, mesh.config.runtime.tls.roles["admin"], peer_identity
    )
    server = PlaneServer(
        name="gateway",
        listen="127.0.0.1:0",
        services=auth.services,
        security=ServerSecurity.from_config(
            mesh.config, GATEWAY, PERMISSIONS, require_client_cert=True
        ),
        interceptors=[interceptor],
    )
    address = f"127.0.0.1:{await server.start()}"
    try:
        admin = ApiKeysClient(address, tls=identity_files(mesh.state_dir, ADMIN))
        made = await admin.create(tenant_id=BETA, scopes=[PAYMENTS_WRITE])
        assert made.secret and made.api_key.tenant_id == BETA
        # The admin names the tenant it manages; the gateway's own
        # certificate is no admin.
        with pytest.raises(InvalidArgumentError) as unnamed:
            await admin.list()
        assert (unnamed.value.reason, unnamed.value.field) == ("FIELD_REQUIRED", "tenant_id")
        plane = ApiKeysClient(address, tls=identity_files(mesh.state_dir, GATEWAY))
        with pytest.raises(UnauthenticatedError):
            await plane.list(tenant_id=BETA)
        for client in (admin, plane):
            await client.close()
    finally:
        await server.stop()


# ---------------------------------------------------------------- OAuth2 JWTs


def _jwt(mesh: Mesh, kid: str = "ed-1", alg: str = "EdDSA", **claims: Any) -> str:
    now_s = mesh.clock.now_us() // 1_000_000
    body = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "client_id": "platform-backend",
        "tenant_id": ALPHA,
        "scope": " ".join(PARTNER_SCOPES),
        "iat": now_s,
        "exp": now_s + 300,
        **claims,
    }
    key = mesh.idp.get(kid) or jwk.OKPKey.generate_key("Ed25519", parameters={"kid": kid})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        return jose_jwt.encode({"alg": alg, "kid": kid}, body, key, algorithms=[alg])


async def test_oauth2_tokens_from_the_platforms_identity_provider(mesh: Mesh) -> None:
    for kid, alg in (("ed-1", "EdDSA"), ("ec-1", "ES256")):
        answer = await mesh.stub(_jwt(mesh, kid, alg)).AuthorizePayment(_authorize())
        assert answer.outcome == gw.OUTCOME_ALLOW
    refused = await _refused(mesh.stub(_jwt(mesh)).AuthorizePayment(_authorize(tenant_id=BETA)))
    assert refused[1] == "TENANT_MISMATCH"
    now_s = mesh.clock.now_us() // 1_000_000
    cases = {
        "TOKEN_EXPIRED": _jwt(mesh, exp=now_s - 60),
        "TOKEN_AUDIENCE_INVALID": _jwt(mesh, aud="https://elsewhere.example/"),
        "TOKEN_ISSUER_INVALID": _jwt(mesh, iss="https://evil.example/"),
        "TOKEN_KEY_UNKNOWN": _jwt(mesh, kid="never-published"),
    }
    for reason, token in cases.items():
        assert await _refused(mesh.stub(token).AuthorizePayment(_authorize())) == (
            grpc.StatusCode.UNAUTHENTICATED,
            reason,
            "",
        ), reason
    narrow = _jwt(mesh, scope="events:write")
    assert (await _refused(mesh.stub(narrow).AuthorizePayment(_authorize())))[1] == (
        "SCOPE_MISSING"
    )


# ---------------------------------------------------------------- rate limits


async def _burst(stub: Any, calls: int) -> tuple[int, list[grpc.aio.AioRpcError]]:
    allowed, refused = 0, []
    for _ in range(calls):
        try:
            await stub.ListDeadLetters(gw.ListDeadLettersRequest(), timeout=RPC_TIMEOUT_S)
            allowed += 1
        except grpc.aio.AioRpcError as error:
            refused.append(error)
    return allowed, refused


async def test_a_credential_over_its_rate_limit_is_told_when_to_retry(mesh: Mesh) -> None:
    async with contextlib.AsyncExitStack() as stack:
        address = await mesh.start_gateway(stack, rate_limit={"rate_per_s": 1, "burst": 3})
        channel = open_channel(address, partner_files(mesh.state_dir))
        stack.push_async_callback(channel.close)
        key = await partner_key(mesh.gateway, ALPHA)
        stub = KeyedStub(gateway_pb2_grpc.GatewayServiceStub(channel), key)
        allowed, refused = await _burst(stub, 5)
        assert allowed == 3 and len(refused) == 2
        details = error_details(refused[0])
        assert refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details.reason == "RATE_LIMITED"
        assert 0 < details.retry_delay_s <= 1.0
        # Another credential has its own bucket.
        other = KeyedStub(gateway_pb2_grpc.GatewayServiceStub(channel), mesh.keys[ALPHA])
        assert (await _burst(other, 1))[0] == 1
        # The typed client carries the delay; after it (gateway clock) one more goes.
        client = GatewayClient(address, api_key=key, tls=partner_files(mesh.state_dir))
        stack.push_async_callback(client.close)
        with pytest.raises(ResourceExhaustedError) as limited:
            await client.list_dead_letters()
        assert limited.value.reason == "RATE_LIMITED" and limited.value.retry_delay_s > 0
        mesh.clock.advance(limited.value.retry_delay_s)
        await client.list_dead_letters()


async def test_replicas_share_a_credentials_bucket_through_redis(
    mesh: Mesh, redis_url: str
) -> None:
    limit = {
        "rate_per_s": 0.5,
        "burst": 4,
        "redis_url": redis_url,
        "redis_key_prefix": f"test:{uuid.uuid4().hex}:",
    }
    async with contextlib.AsyncExitStack() as stack:
        stubs = []
        key = await partner_key(mesh.gateway, ALPHA)
        for _ in range(2):
            address = await mesh.start_gateway(stack, rate_limit=limit)
            channel = open_channel(address, partner_files(mesh.state_dir))
            stack.push_async_callback(channel.close)
            stubs.append(KeyedStub(gateway_pb2_grpc.GatewayServiceStub(channel), key))
        allowed = 0
        for index in range(8):
            allowed += (await _burst(stubs[index % 2], 1))[0]
        # One bucket for the two replicas: its burst once, not twice.
        assert allowed == 4


# ---------------------------------------------------------------- auth off


async def test_with_auth_off_the_gateway_warns_and_believes_the_request(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        with caplog.at_level("WARNING", logger="gateway.auth"):
            address = await mesh.start_gateway(stack, auth={"enabled": False})
        assert any("gateway.auth is off" in r.getMessage() for r in caplog.records)
        channel = open_channel(address, partner_files(mesh.state_dir))
        stack.push_async_callback(channel.close)
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        answer = await stub.AuthorizePayment(_authorize(tenant_id=ALPHA))
        assert answer.outcome == gw.OUTCOME_ALLOW
        # No ApiKeyService without credentials to guard it.
        keys = gateway_pb2_grpc.ApiKeyServiceStub(channel)
        code = (await _refused(keys.ListApiKeys(gw.ListApiKeysRequest(tenant_id=ALPHA))))[0]
        assert code == grpc.StatusCode.UNIMPLEMENTED


# ---------------------------------------------------------------- the command


async def _triplane(mesh: Mesh, *args: str) -> str:
    config_path = mesh.state_dir / "cli-config.yaml"
    config_path.write_text(f"runtime: {{state_dir: {mesh.state_dir}}}\n")
    command = [sys.executable, "-m", "triplane_tools.cli", "--config", str(config_path), *args]
    done = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=120, env=_cli_env()
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TRIPLANE")}


async def test_triplane_keys_creates_lists_rotates_and_revokes(mesh: Mesh) -> None:
    at = ("--tenant", BETA, "--address", mesh.address)
    made = await _triplane(
        mesh, "keys", "create", *at, "--scope", "payments:write", "--scope", "events:write"
    )
    secret = re.search(r"secret \(shown once, store it now\): (\S+)", made)
    assert secret and apikey.KEY_PATTERN.fullmatch(secret.group(1))
    key_id = apikey.parse(secret.group(1)).key_id
    listed = await _triplane(mesh, "keys", "list", *at)
    assert key_id in listed and secret.group(1) not in listed
    await mesh.stub(secret.group(1)).AuthorizePayment(_authorize())
    rotated = await _triplane(mesh, "keys", "rotate", key_id, *at, "--overlap-s", "30")
    new_secret = re.search(r"secret \(shown once, store it now\): (\S+)", rotated)
    assert new_secret and f"rotated to {apikey.parse(new_secret.group(1)).key_id}" in rotated
    revoked = await _triplane(mesh, "keys", "revoke", apikey.parse(new_secret.group(1)).key_id, *at)
    assert "revoked" in revoked
    refused = await _refused(mesh.stub(new_secret.group(1)).AuthorizePayment(_authorize()))
    assert refused[1] == "CREDENTIAL_REVOKED"
