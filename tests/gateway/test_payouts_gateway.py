"""Payouts through the gateway's public API, against the real money and policy
planes (in process, over gRPC with mutual TLS, SQLite) under the default
bundle, one manual clock for all three:

- a beneficiary is validated, the field named, and nothing of its account
  number or name comes back;
- a payout within the seller's balance is allowed, debited into
  payouts-in-flight under the signed decision, and replayed on retry;
- a first payout to a new beneficiary above the threshold goes to review
  (a case, a PENDING_REVIEW payout, nothing moved);
- a payout above the available balance is denied, nothing recorded;
- a sanctioned beneficiary is denied;
- scopes: payouts:read cannot pay out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from gateway.app import Gateway
from gateway.auth.scopes import PAYOUTS_READ
from gateway.engagement import PartnerWebhooks
from gateway.payout_events import PayoutWebhookConsumer
from gateway.payouts import Payouts
from gateway.planes import GrpcMoney
from money_plane.app import MoneyPlane
from money_plane.domain import Command, Kind
from money_plane.engine import Job
from money_plane.payouts.codec import encode_payout_event
from money_plane.payouts.domain import Payout, PayoutState
from policy_plane.app import build_plane
from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.gateway.v1 import gateway_pb2_grpc
from triplane.money.v1 import money_pb2, money_pb2_grpc
from triplane.policy.v1 import policy_pb2, policy_pb2_grpc
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config, PartnerWebhookConfig, load_config
from triplane.runtime.net import free_port
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import channel_for, open_channel
from triplane_client import GatewayClient, LedgerAdminClient

from ..tls_helpers import dev_certificates, identity_files, partner_files
from ._b_helpers import receiver, secret_file
from .auth_helpers import KeyedStub, partner_key

TENANT = "payouts"
SELLER = "seller_1"
SELLER_ACCOUNT = "seller_1_balance"
IBAN = "DE89370400440532013000"
NOW_US = 1_780_000_000_000_000


@dataclass
class Planes:
    money: MoneyPlane
    gateway: Gateway
    money_address: str
    config: Config
    channel: grpc.aio.Channel
    api_key: str

    @property
    def stub(self) -> Any:
        return KeyedStub(gateway_pb2_grpc.GatewayServiceStub(self.channel), self.api_key)


async def _seed(config: Config, money_address: str, policy_address: str) -> None:
    async with channel_for(config, money_address) as channel:
        ledger = money_pb2_grpc.LedgerServiceStub(channel)
        await ledger.CreateTenant(money_pb2.CreateTenantRequest(tenant_id=TENANT))
        await ledger.CreateAccounts(
            money_pb2.CreateAccountsRequest(
                tenant_id=TENANT,
                accounts=[
                    money_pb2.NewAccount(
                        account_id="funding",
                        currency="USD",
                        kind=money_pb2.ACCOUNT_KIND_ASSET,
                        constraint=money_pb2.BALANCE_CONSTRAINT_NONE,
                    ),
                    money_pb2.NewAccount(
                        account_id=SELLER_ACCOUNT,
                        currency="USD",
                        kind=money_pb2.ACCOUNT_KIND_LIABILITY,
                        constraint=money_pb2.BALANCE_CONSTRAINT_DEBITS_MUST_NOT_EXCEED_CREDITS,
                    ),
                ],
            )
        )
    async with channel_for(config, policy_address) as channel:
        await policy_pb2_grpc.PolicyServiceStub(channel).CreateTenant(
            policy_pb2.CreateTenantRequest(tenant_id=TENANT, display_name="Payouts")
        )


@pytest.fixture
async def planes(state_dir: Path) -> AsyncIterator[Planes]:
    dev_certificates(state_dir)
    config = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir)},
            "nats": {"url": ""},
            "gateway": {"listen": "127.0.0.1:0", "holdout_share": 0.0},
        },
    )
    clock = ManualClock(NOW_US)
    async with contextlib.AsyncExitStack() as stack:
        money = MoneyPlane(config, clock, listen="127.0.0.1:0")
        stack.push_async_callback(money.stop)
        money_address = f"127.0.0.1:{await money.start(sweepers=False, relay=False)}"
        policy = build_plane(config, clock, listen="127.0.0.1:0")
        stack.push_async_callback(policy.stop)
        policy_address = f"127.0.0.1:{await policy.start()}"
        gateway = Gateway(
            config,
            clock,
            money_address=money_address,
            policy_address=policy_address,
            ai_address=f"127.0.0.1:{free_port()}",
        )
        stack.push_async_callback(gateway.stop)
        port = await gateway.start()
        await _seed(config, money_address, policy_address)
        channel = open_channel(f"127.0.0.1:{port}", partner_files(state_dir))
        stack.push_async_callback(channel.close)
        key = await partner_key(gateway, TENANT)
        planes = Planes(money, gateway, money_address, config, channel, key)
        await _profile(planes.stub, SELLER, tier=2)
        yield planes


async def _profile(stub: Any, customer_id: str, tier: int) -> None:
    opened = Timestamp()
    opened.FromMicroseconds(NOW_US - 400 * 86_400_000_000)
    await stub.PutCustomerProfile(
        gw.PutCustomerProfileRequest(
            tenant_id=TENANT,
            profile=gw.CustomerProfile(
                customer_id=customer_id, kyc_tier=tier, country="DE", account_opened_at=opened
            ),
            change_id=f"kyc-{customer_id}-{tier}",
            actor="kyc-provider",
        )
    )


async def _fund(planes: Planes, amount_minor: int) -> None:
    """Money into the seller's balance, booked in the plane's own ledger (an
    internal movement: what funds the seller is not under test)."""
    ledger = planes.money.ledger
    assert ledger is not None
    job = Job(
        tenant_id=TENANT,
        commands=[
            Command(
                tenant_id=TENANT,
                idempotency_key=f"fund-{amount_minor}",
                kind=Kind.PAYOUT_REVERSAL,
                debit_account_id="funding",
                credit_account_id=SELLER_ACCOUNT,
                amount_minor=amount_minor,
                currency="USD",
            )
        ],
        fields=["fund"],
    )
    [[outcome]] = await ledger.run_on_writer(
        lambda: ledger.store.commit_jobs([job], ledger.clock.now_us())
    )
    assert outcome.error is None


def _beneficiary(**changes: Any) -> gw.CreateBeneficiaryRequest:
    request = gw.CreateBeneficiaryRequest(
        tenant_id=TENANT,
        idempotency_key="ben-1",
        beneficiary_id="ben-1",
        merchant_id=SELLER,
        holder_name="Jonas Schmidt",
        country="DE",
        iban=IBAN,
        bic="COBADEFFXXX",
    )
    for name, value in changes.items():
        setattr(request, name, value)
    return request


def _us_beneficiary() -> gw.CreateBeneficiaryRequest:
    """A US account (what a USD payout's rails reach: ACH, instant)."""
    return _beneficiary(
        iban="", bic="", country="US", routing_number="021000021", account_number="123456789"
    )


def _payout(key: str, amount_minor: int, beneficiary_id: str = "ben-1") -> gw.CreatePayoutRequest:
    return gw.CreatePayoutRequest(
        tenant_id=TENANT,
        idempotency_key=key,
        merchant_id=SELLER,
        account_id=SELLER_ACCOUNT,
        beneficiary_id=beneficiary_id,
        amount=types_pb2.Money(amount_minor=amount_minor, currency="USD"),
    )


async def _refused(call: Any) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    reason, field = parse_rpc_error(caught.value)
    return caught.value.code(), reason, field


async def _balance(planes: Planes, account_id: str) -> int:
    assert planes.money.ledger is not None
    return (await planes.money.ledger.get_account(TENANT, account_id)).posted


async def test_beneficiaries_are_validated_and_never_echo_the_account(planes: Planes) -> None:
    stub = planes.stub
    bad_iban = _beneficiary(iban="DE89370400440532013001")
    assert await _refused(stub.CreateBeneficiary(bad_iban)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "IBAN_INVALID",
        "iban",
    )
    two = _beneficiary(routing_number="021000021", account_number="123456789")
    assert (await _refused(stub.CreateBeneficiary(two)))[1:] == ("DESTINATION_REQUIRED", "iban")
    bad_rtn = _beneficiary(iban="", bic="", routing_number="123456789", account_number="123456789")
    assert (await _refused(stub.CreateBeneficiary(bad_rtn)))[1:] == (
        "ROUTING_NUMBER_INVALID",
        "routing_number",
    )
    made = await stub.CreateBeneficiary(_beneficiary())
    assert made.beneficiary.masked == "DE89…3000" and IBAN not in str(made)
    again = await stub.CreateBeneficiary(_beneficiary())
    assert again.replayed
    got = await stub.GetBeneficiary(gw.GetBeneficiaryRequest(beneficiary_id="ben-1"))
    assert got.beneficiary.kind == "iban" and "Jonas" not in str(got)
    us = await stub.CreateBeneficiary(
        _beneficiary(
            idempotency_key="ben-us",
            beneficiary_id="ben-us",
            iban="",
            bic="",
            country="US",
            routing_number="021000021",
            account_number="123456789",
        )
    )
    assert us.beneficiary.masked == "021000021/…6789"


async def test_payouts_allowed_reviewed_and_denied(planes: Planes) -> None:
    stub = planes.stub
    # A US account: USD payouts reach it by ACH or an instant rail.
    await stub.CreateBeneficiary(_us_beneficiary())
    await _fund(planes, 500_000)
    # The first payout to the new beneficiary above the threshold: review.
    held = await stub.CreatePayout(_payout("po-big-first", 150_000))
    assert held.outcome == gw.OUTCOME_REVIEW and held.case_id
    assert "PAYOUT_NEW_BENEFICIARY_REVIEW" in [r.code for r in held.reasons]
    assert held.payout.state == gw.PAYOUT_STATE_PENDING_REVIEW
    assert await _balance(planes, SELLER_ACCOUNT) == 500_000
    # Now the beneficiary has a payout: an ordinary one is allowed and moves.
    paid = await stub.CreatePayout(_payout("po-1", 20_000))
    assert paid.outcome == gw.OUTCOME_ALLOW, paid.reasons
    assert paid.payout.state == gw.PAYOUT_STATE_APPROVED and paid.payout.end_to_end_id
    # The policy chose the rail among the money plane's options: next-day
    # ACH is the cheapest for $200 (its fee and a day's float, 9 < 10 < 45).
    assert paid.payout.rail == "ach"
    # The other eligible rails, cheapest first (Thursday 16:26 New York: the
    # 16:45 same-day ACH window is still open), kept on the payout.
    assert list(paid.payout.alternate_rails) == ["ach_same_day", "instant"]
    assert not paid.payout.attempts
    assert await _balance(planes, SELLER_ACCOUNT) == 480_000
    assert await _balance(planes, "payouts_in_flight:USD") == 20_000
    again = await stub.CreatePayout(_payout("po-1", 20_000))
    assert again.replayed and again.payout.payout_id == paid.payout.payout_id
    assert await _balance(planes, SELLER_ACCOUNT) == 480_000
    reused = await _refused(stub.CreatePayout(_payout("po-1", 20_001)))
    assert reused[0] == grpc.StatusCode.ALREADY_EXISTS
    # Above the available balance: denied, nothing recorded or moved.
    over = await stub.CreatePayout(_payout("po-over", 480_001))
    assert over.outcome == gw.OUTCOME_DENY and not over.HasField("payout")
    assert "PAYOUT_EXCEEDS_AVAILABLE_BALANCE" in [r.code for r in over.reasons]
    assert await _balance(planes, SELLER_ACCOUNT) == 480_000
    got = await stub.GetPayout(gw.GetPayoutRequest(payout_id=paid.payout.payout_id))
    assert got.payout.state == gw.PAYOUT_STATE_APPROVED


async def test_a_sanctioned_beneficiary_and_bad_input_are_refused(planes: Planes) -> None:
    stub = planes.stub
    await _fund(planes, 100_000)
    await stub.CreateBeneficiary(
        _beneficiary(
            idempotency_key="ben-s", beneficiary_id="ben-s", holder_name="Dmitri Arkadyevich Volkov"
        )
    )
    denied = await stub.CreatePayout(_payout("po-s", 1_000, beneficiary_id="ben-s"))
    assert denied.outcome == gw.OUTCOME_DENY
    assert "SANCTIONS_HIT" in [r.code for r in denied.reasons]
    assert await _balance(planes, SELLER_ACCOUNT) == 100_000
    assert await _refused(stub.CreatePayout(_payout("po-x", 1_000, beneficiary_id="ghost"))) == (
        grpc.StatusCode.NOT_FOUND,
        "BENEFICIARY_NOT_FOUND",
        "beneficiary_id",
    )
    negative = _payout("po-n", -5)
    assert (await _refused(stub.CreatePayout(negative)))[2].startswith("amount")
    # A payouts:read key cannot pay out.
    reader = KeyedStub(
        gateway_pb2_grpc.GatewayServiceStub(planes.channel),
        await partner_key(planes.gateway, TENANT, scopes=[PAYOUTS_READ]),
    )
    refused = await _refused(reader.CreatePayout(_payout("po-r", 1_000, beneficiary_id="ben-s")))
    assert refused[:2] == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING")


async def test_a_payout_event_becomes_one_partner_webhook_per_state(planes: Planes) -> None:
    """What the money plane's outbox says of a payout (a rail's outcome comes
    only that way) is queued once per state for the partner's webhook, also
    when the event is delivered again."""
    gateway = planes.gateway
    assert gateway.core is not None and gateway.engagement is not None
    delivery = gateway.engagement.delivery
    hooks = PartnerWebhooks(
        [
            PartnerWebhookConfig(
                tenant_id=TENANT, url="https://partner.example/hooks", secret_path=""
            )
        ]
    )
    payouts = Payouts(gateway.core, GrpcMoney(gateway.channels.money), hooks, delivery)  # type: ignore[union-attr]
    consumer = PayoutWebhookConsumer(None, payouts)  # type: ignore[arg-type]
    payout = Payout(
        tenant_id=TENANT,
        payout_id="po_abc",
        idempotency_key="k",
        beneficiary_id="ben-1",
        merchant_id=SELLER,
        debit_account_id=SELLER_ACCOUNT,
        amount_minor=1_000,
        currency="USD",
        state=PayoutState.RETURNED,
        decision_id="dec-1",
        case_id="",
        rail="bank_transfer",
        end_to_end_id="TPABC",
        created_at_us=NOW_US,
        updated_at_us=NOW_US,
        reason_code="R01",
    )
    event = encode_payout_event(payout, NOW_US)
    await consumer.handle(event.data)
    await consumer.handle(encode_payout_event(payout, NOW_US + 1).data)
    # One delivery (the worker may already be trying it: any status).
    assert sum((await delivery.counts(TENANT)).values()) == 1
    with pytest.raises(DecodeError):
        await consumer.handle(b"\x00garbage")


@pytest.mark.nats
async def test_a_rail_outcome_reaches_the_partner_webhook_through_nats(
    state_dir: Path, nats_url: str
) -> None:
    """End to end: the payout's approval (queued by the gateway) and then a
    rail's settlement (recorded on the money plane, relayed from its outbox
    over NATS to the gateway's consumer) reach the partner's webhook, each
    once."""
    dev_certificates(state_dir)
    async with receiver() as hook:
        config = load_config(
            environ={},
            overrides={
                "runtime": {"state_dir": str(state_dir)},
                "nats": {"url": nats_url},
                "gateway": {
                    "listen": "127.0.0.1:0",
                    "holdout_share": 0.0,
                    "partner_webhooks": [
                        {"tenant_id": TENANT, "url": hook.url, "secret_path": secret_file()}
                    ],
                    # Its own consumer on the shared server.
                    "payout_webhooks": {"durable_name": f"payout-hooks-{uuid.uuid4().hex[:8]}"},
                },
            },
        )
        clock = ManualClock(NOW_US)
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
                ai_address=f"127.0.0.1:{free_port()}",
            )
            stack.push_async_callback(gateway.stop)
            port = await gateway.start()
            await _seed(config, money_address, policy_address)
            channel = open_channel(f"127.0.0.1:{port}", partner_files(state_dir))
            stack.push_async_callback(channel.close)
            planes = Planes(
                money, gateway, money_address, config, channel, await partner_key(gateway, TENANT)
            )
            await _profile(planes.stub, SELLER, tier=2)
            await planes.stub.CreateBeneficiary(_us_beneficiary())
            await _fund(planes, 50_000)
            await planes.stub.CreatePayout(_payout("po-warm", 1_000))
            paid = await planes.stub.CreatePayout(_payout("po-hook", 2_000))
            assert paid.outcome == gw.OUTCOME_ALLOW, paid.reasons
            admin = LedgerAdminClient(money_address, tls=identity_files(state_dir))
            async with admin:
                replays = [
                    (
                        await admin.record_payout_outcome(
                            TENANT, paid.payout.payout_id, money_pb2.PAYOUT_OUTCOME_SETTLED
                        )
                    ).replayed
                    for _ in range(2)  # reported twice: one state change, one webhook
                ]
            assert replays == [False, True]
            client = GatewayClient(
                f"127.0.0.1:{port}", api_key=planes.api_key, tls=partner_files(state_dir)
            )
            async with client:
                got = await client.get_payout(payout_id=paid.payout.payout_id)
            assert got.payout.state == gw.PAYOUT_STATE_SETTLED

            def states() -> list[str]:
                return sorted(
                    json.loads(r.body)["data"]["state"]
                    for r in hook.received
                    if json.loads(r.body)["data"]["payout_id"] == paid.payout.payout_id
                )

            for _ in range(600):  # the relay, NATS and the delivery worker: at most a minute
                if states() == ["approved", "settled"]:
                    break
                await asyncio.sleep(0.1)
            assert states() == ["approved", "settled"]
