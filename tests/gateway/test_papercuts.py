"""Papercuts a new user hit through the gateway's public API, against the real
money and policy planes (in process, over gRPC, SQLite) with the AI plane
down (so every score degrades to "no score"):

- the tenant id is checked by the rule every plane applies;
- an error a plane returns names the field of the gateway's request
  (`account_id`, `hold_id`, `customer.name`), not the plane's own
  (`transfer.debit_account_id`, `payment.customer.name`);
- the trigger runner asks the policy plane about the moment it sends at,
  whatever the policy plane's own clock says.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import msgspec
import pytest

from gateway import fields
from gateway.app import Gateway
from gateway.delivery import DeliveryStore, DeliveryWorker, build_adapters
from gateway.engagement import PolicyContacts
from gateway.planes import GrpcPolicy
from gateway.triggers import TriggerEngine, TriggerEvent, TriggerRunner, TriggerStore
from money_plane.app import MoneyPlane
from policy_plane.app import PolicyPlane, build_plane
from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.gateway.v1 import gateway_pb2_grpc
from triplane.money.v1 import money_pb2, money_pb2_grpc
from triplane.policy.v1 import policy_pb2, policy_pb2_grpc
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config, load_config
from triplane.runtime.errors import NotFound
from triplane.runtime.net import free_port
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import channel_for, open_channel

from ..tls_helpers import dev_certificates, partner_files
from ._b_helpers import SECRET, delivery_config, open_db
from .auth_helpers import KeyedStub, partner_key

TENANT = "papercuts"
MERCHANT = "merchant_1"
RPC_TIMEOUT_S = 10.0
# A bundle that allows every payment, so the money plane is reached.
ALLOW_ALL = """
apiVersion: triplane.policy/v1
label: allow-all
rules:
  - id: never
    when: "false"
    outcome: deny
    reason_code: NEVER
"""


def utc_us(year: int, month: int, day: int, hour: int, minute: int = 0) -> int:
    return int(dt.datetime(year, month, day, hour, minute, tzinfo=dt.UTC).timestamp() * 1e6)


# The policy plane's clock: 2026-06-01 12:00 UTC, 09:00 in São Paulo (UTC-3).
POLICY_NOW_US = utc_us(2026, 6, 1, 12)


def _config(state_dir: Path) -> Config:
    dev_certificates(state_dir)  # as the dev stack makes them: mutual TLS is on
    return load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir)},
            "nats": {"url": ""},
            "gateway": {"listen": "127.0.0.1:0", "holdout_share": 0.0},
        },
    )


@dataclass
class Planes:
    config: Config
    money: MoneyPlane
    policy: PolicyPlane
    gateway: Gateway
    policy_address: str
    channel: grpc.aio.Channel
    # The tenant's partner key, sent with every call of `stub`.
    api_key: str

    @property
    def stub(self) -> Any:
        return KeyedStub(gateway_pb2_grpc.GatewayServiceStub(self.channel), self.api_key)


async def _seed(config: Config, money_address: str, policy_address: str) -> None:
    """The tenant in both planes, its accounts, and the allow-all bundle (as
    the admin identity)."""
    async with channel_for(config, money_address) as money_channel:
        ledger = money_pb2_grpc.LedgerServiceStub(money_channel)
        await ledger.CreateTenant(money_pb2.CreateTenantRequest(tenant_id=TENANT))
        await ledger.CreateAccounts(
            money_pb2.CreateAccountsRequest(
                tenant_id=TENANT,
                accounts=[
                    money_pb2.NewAccount(
                        account_id=account,
                        currency="USD",
                        kind=money_pb2.ACCOUNT_KIND_LIABILITY,
                        # No balance limit: the tests are about field names.
                        constraint=money_pb2.BALANCE_CONSTRAINT_NONE,
                    )
                    for account in ("cust_1", MERCHANT)
                ],
            )
        )
    async with channel_for(config, policy_address) as policy_channel:
        await policy_pb2_grpc.PolicyServiceStub(policy_channel).CreateTenant(
            policy_pb2.CreateTenantRequest(tenant_id=TENANT, display_name="Papercuts")
        )
        await policy_pb2_grpc.BundleServiceStub(policy_channel).LoadBundle(
            policy_pb2.LoadBundleRequest(content=ALLOW_ALL, target=policy_pb2.BUNDLE_TARGET_LIVE)
        )


@pytest.fixture
async def planes(state_dir: Path) -> AsyncIterator[Planes]:
    config = _config(state_dir)
    # One clock for the three: a decision token is checked on the money plane's.
    clock = ManualClock(POLICY_NOW_US)
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
            # Nothing listens there: the AI plane is down, scores degrade.
            ai_address=f"127.0.0.1:{free_port()}",
        )
        stack.push_async_callback(gateway.stop)
        gateway_port = await gateway.start()
        await _seed(config, money_address, policy_address)
        channel = open_channel(f"127.0.0.1:{gateway_port}", partner_files(state_dir))
        stack.push_async_callback(channel.close)
        api_key = await partner_key(gateway, TENANT)
        yield Planes(config, money, policy, gateway, policy_address, channel, api_key)


def _usd(minor: int) -> types_pb2.Money:
    return types_pb2.Money(amount_minor=minor, currency="USD")


def _authorize(**changes: Any) -> gw.AuthorizePaymentRequest:
    request = gw.AuthorizePaymentRequest(
        tenant_id=TENANT,
        idempotency_key="pay-1",
        account_id="cust_1",
        credit_account_id=MERCHANT,
        amount=_usd(1_500),
        kind=gw.PAYMENT_KIND_PURCHASE,
        customer=gw.Customer(customer_id="c1", name="Jane Example", country="US", kyc_tier=2),
    )
    for name, value in changes.items():
        setattr(request, name, value)
    return request


async def _refused(call: Any) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    reason, field = parse_rpc_error(caught.value)
    return caught.value.code(), reason, field


# ---------------------------------------------------------------- tenant ids


@pytest.mark.parametrize("tenant_id", ["Upper.Case:x", "a.b", "a*", "a>", "a b"])
async def test_tenant_id_is_refused_as_every_plane_refuses_it(
    planes: Planes, tenant_id: str
) -> None:
    stub, refused = (
        planes.stub,
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TENANT_ID", "tenant_id"),
    )
    assert await _refused(stub.AuthorizePayment(_authorize(tenant_id=tenant_id))) == refused
    capture = gw.CapturePaymentRequest(tenant_id=tenant_id, idempotency_key="c", hold_id="h")
    assert await _refused(stub.CapturePayment(capture)) == refused
    decide = gw.DecideNextActionRequest(
        tenant_id=tenant_id,
        idempotency_key="d",
        customer_id="c1",
        account_id="cust_1",
        surface="checkout",
    )
    assert await _refused(stub.DecideNextAction(decide)) == refused
    dead = gw.ListDeadLettersRequest(tenant_id=tenant_id)
    assert await _refused(stub.ListDeadLetters(dead)) == refused


# ---------------------------------------------------------------- field names


async def test_money_plane_errors_name_the_gateway_fields(planes: Planes) -> None:
    stub = planes.stub
    # Allowed by policy, refused by the ledger: the debited account is unknown.
    # The money plane says transfer.debit_account_id; the caller sent account_id.
    got = await _refused(stub.AuthorizePayment(_authorize(account_id="ghost")))
    assert got == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", "account_id")
    got = await _refused(
        stub.CapturePayment(
            gw.CapturePaymentRequest(tenant_id=TENANT, idempotency_key="cap-1", hold_id="hold_x")
        )
    )
    assert got == (grpc.StatusCode.NOT_FOUND, "HOLD_NOT_FOUND", "hold_id")
    got = await _refused(
        stub.VoidPayment(
            gw.VoidPaymentRequest(tenant_id=TENANT, idempotency_key="void-1", hold_id="hold_x")
        )
    )
    assert got == (grpc.StatusCode.NOT_FOUND, "HOLD_NOT_FOUND", "hold_id")
    got = await _refused(
        stub.RefundPayment(
            gw.RefundPaymentRequest(tenant_id=TENANT, idempotency_key="ref-1", entry_id="ent_x")
        )
    )
    assert got == (grpc.StatusCode.NOT_FOUND, "ENTRY_NOT_FOUND", "entry_id")


async def test_a_hold_captured_in_another_currency_names_the_amount(planes: Planes) -> None:
    stub = planes.stub
    held = await stub.AuthorizePayment(_authorize(idempotency_key="pay-eur"))
    assert held.outcome == gw.OUTCOME_ALLOW and held.hold_id
    got = await _refused(
        stub.CapturePayment(
            gw.CapturePaymentRequest(
                tenant_id=TENANT,
                idempotency_key="cap-eur",
                hold_id=held.hold_id,
                amount=types_pb2.Money(amount_minor=100, currency="EUR"),
            )
        )
    )
    # The money plane says transfer.amount.currency.
    assert got == (grpc.StatusCode.INVALID_ARGUMENT, "CURRENCY_MISMATCH", "amount.currency")


async def test_policy_plane_errors_name_the_gateway_fields(planes: Planes) -> None:
    # The gateway lets through names up to gateway.limits.max_string_length; the
    # policy plane screens at most policy.limits.max_name_length characters.
    config = planes.config
    length = config.policy.limits.max_name_length + 1
    assert length <= config.gateway.limits.max_string_length
    request = _authorize(idempotency_key="pay-long-name")
    request.customer.name = "n" * length
    got = await _refused(planes.stub.AuthorizePayment(request))
    assert got[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert got[2] == "customer.name", got


# ---------------------------------------------------------------- trigger runner


async def test_trigger_runner_asks_about_the_moment_it_sends_at(
    planes: Planes, state_dir: Path
) -> None:
    """The policy plane's clock says 09:00 in São Paulo; the gateway sends at
    21:30 there. Quiet hours are judged at 21:30: the send is postponed."""
    async with channel_for(planes.config, planes.policy_address) as channel:
        consent = policy_pb2_grpc.ConsentServiceStub(channel)
        await consent.PutContactProfile(
            policy_pb2.PutContactProfileRequest(
                profile=policy_pb2.ContactProfile(
                    tenant_id=TENANT, customer_id="cu-sp", time_zone="America/Sao_Paulo"
                )
            )
        )
        await consent.SetConsent(
            policy_pb2.SetConsentRequest(
                tenant_id=TENANT,
                customer_id="cu-sp",
                consent=policy_pb2.Consent(
                    channel=policy_pb2.CHANNEL_PUSH,
                    topic=policy_pb2.TOPIC_MARKETING,
                    status=policy_pb2.CONSENT_STATUS_GRANTED,
                    lawful_basis=policy_pb2.LAWFUL_BASIS_CONSENT,
                ),
            )
        )
        triggers = planes.config.gateway.triggers
        rule = triggers.rules[0]
        sends_at_us = utc_us(2026, 6, 2, 0, 30)  # 21:30 in São Paulo
        clock = ManualClock(sends_at_us - rule.delay_s * 1_000_000)
        db = open_db("sqlite", state_dir)
        store = TriggerStore(db)
        engine = TriggerEngine(store, triggers, clock)
        [step_one, step_two] = [step.event_type for step in rule.steps]
        matched = dict(rule.steps[1].match)
        for number, (event_type, attributes) in enumerate(
            [(step_one, {}), (step_two, matched)], start=1
        ):
            fired = await engine.on_event(
                TriggerEvent(
                    event_id=f"ev{number}",
                    tenant_id=TENANT,
                    customer_id="cu-sp",
                    event_type=event_type,
                    occurred_at_us=clock.now_us(),
                    amount_minor=500_000,
                    currency="USD",
                    attributes=attributes,
                )
            )
        [send] = fired
        assert send.due_at_us == sends_at_us
        config = delivery_config()
        worker = DeliveryWorker(
            DeliveryStore(db), config, clock, build_adapters(config, lambda _t: SECRET)
        )
        contacts = PolicyContacts(GrpcPolicy(channel), RPC_TIMEOUT_S)
        runner = TriggerRunner(
            store,
            msgspec.structs.replace(triggers, rules=[rule]),
            clock,
            contacts.check,
            worker,
            lambda _t, customer, ch: f"tok_{customer}_{ch}" if ch == "push" else "",
            contacts.record,
        )
        try:
            clock.set_us(sends_at_us)
            [handled] = await runner.run_once()
            assert (handled.status, handled.reason) == ("scheduled", "quiet_hours"), handled
            assert handled.due_at_us == utc_us(2026, 6, 2, 11)  # 08:00 in São Paulo
        finally:
            await worker.aclose()
            db.close()


# ---------------------------------------------------------------- the table


def test_a_field_map_matches_whole_path_segments() -> None:
    assert fields.TRANSFER.public("transfer.amount") == "amount"
    assert fields.TRANSFER.public("transfer.amount.currency") == "amount.currency"
    assert fields.TRANSFER.public("transfer.debit_account_id") == "account_id"
    # A longer name that merely starts like a mapped one is not that field.
    assert fields.FieldMap({"transfer.amount": "amount"}).public("transfer.amount_minor") == ""
    # What the gateway made itself is no field of the caller's request.
    assert fields.TRANSFER.public("transfer.decision_token") == ""
    assert fields.EVALUATE.public("snapshot.model_score.score") == ""
    # The KYC facts are the policy plane's (the customer's profile), not the caller's.
    assert fields.EVALUATE.public("snapshot.kyc.tier") == ""
    assert fields.EVALUATE.public("payment.customer_id") == "customer.customer_id"
    assert fields.EVALUATE.public("payment.customer.name") == "customer.name"
    assert fields.ELIGIBLE_OFFERS.public("features[cart_value]") == "features[cart_value]"


def test_a_mapped_error_keeps_its_code_and_reason_and_renames_the_field() -> None:
    error = NotFound(
        "ACCOUNT_NOT_FOUND",
        "transfer.debit_account_id: no account 'ghost'",
        "transfer.debit_account_id",
    )
    mapped = fields.public_error(error, fields.TRANSFER)
    assert isinstance(mapped, NotFound) and mapped.code == error.code
    assert (mapped.reason, mapped.field) == ("ACCOUNT_NOT_FOUND", "account_id")
    assert mapped.message == "account_id: no account 'ghost'"


def test_a_time_zone_name_too_long_for_a_file_is_no_zone() -> None:
    """zoneinfo opens the name as a file: a 256-character time_zone (within
    the gateway's string limit) raised OSError and AuthorizePayment answered
    INTERNAL; it is TIME_ZONE_UNKNOWN like any other unknown zone."""
    from gateway.payments import _zone

    assert _zone("A" * 256) is None
    assert _zone("Europe/" + "x" * 300) is None
    assert _zone("Europe/Paris") is not None
