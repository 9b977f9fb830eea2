"""`triplane up --replicas N` through the supervisor (triplane_tools.stack with
replicas=2): every plane on PostgreSQL (one database per plane, created by
the stack) and Redis, each replica on its own port, the gateway replicas
dialling every money and policy replica (round_robin over an ipv4: list).

One module-scoped stack: the money, policy and gateway planes run two
replicas each; the AI plane runs one (two Tritons are too heavy for the two
cores this suite shares), so the gateway still balances over a list for the
planes that run two. An authorization through gateway replica A and the
same idempotency key through replica B is answered once: one hold.

Also: a replicated stack without its engines is refused with a message
naming what is missing, before anything starts."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.gateway.v1 import gateway_pb2_grpc
from triplane.money.v1 import money_pb2, money_pb2_grpc
from triplane.policy.v1 import policy_pb2, policy_pb2_grpc
from triplane.runtime.clock import SystemClock
from triplane.runtime.config import Config, load_config
from triplane.runtime.net import free_port
from triplane.runtime.tls import open_channel
from triplane_tools import replicas as fleet
from triplane_tools.partner_keys import create_partner_key
from triplane_tools.stack import Stack, StackError

pytestmark = [pytest.mark.postgres, pytest.mark.nats, pytest.mark.timeout(300)]

TENANT = "fleet"
MERCHANT = "merchant_1"
ACCOUNT = "cust_1"
AMOUNT_MINOR = 2_500
RPC_TIMEOUT_S = 10.0


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TRIPLANE") and k != "NATS_URL"}


def _config(state_dir: Path, nats_url: str, **extra: Any) -> Config:
    overrides: dict[str, Any] = {
        "runtime": {"state_dir": str(state_dir), "log_format": "text"},
        "nats": {"url": nats_url},
        "money": {"listen": f"127.0.0.1:{free_port()}"},
        "policy": {"listen": f"127.0.0.1:{free_port()}"},
        "ai": {"listen": f"127.0.0.1:{free_port()}"},
        "gateway": {"listen": f"127.0.0.1:{free_port()}", "holdout_share": 0.0},
        "stack": {"start_timeout_s": 200.0},
    }
    for section, values in extra.items():
        overrides.setdefault(section, {}).update(values)
    return load_config(environ={}, overrides=overrides)


@pytest.fixture(scope="module")
async def fleet_stack(
    tmp_path_factory: pytest.TempPathFactory, nats_url: str, pg_admin_dsn: str, redis_url: str
) -> AsyncIterator[Stack]:
    prefix = f"tpl_fleet_{uuid.uuid4().hex[:8]}"
    config = _config(
        tmp_path_factory.mktemp("fleet"),
        nats_url,
        ai={"features": {"redis_url": redis_url}},
    )
    stack = Stack(
        config,
        environ=_environ(),
        replicas=2,
        replicas_of={"ai": 1},
        postgres_admin_dsn=pg_admin_dsn,
        database_prefix=prefix,
    )
    try:
        await stack.start()
        yield stack
    finally:
        await stack.stop()
        fleet.drop_databases(pg_admin_dsn, prefix)


async def _seed(stack: Stack) -> None:
    async with stack.channel("money") as channel:
        ledger = money_pb2_grpc.LedgerServiceStub(channel)
        await ledger.CreateTenant(money_pb2.CreateTenantRequest(tenant_id=TENANT))
        await ledger.CreateAccounts(
            money_pb2.CreateAccountsRequest(
                tenant_id=TENANT,
                accounts=[
                    money_pb2.NewAccount(
                        account_id=account,
                        currency="USD",
                        kind=money_pb2.ACCOUNT_KIND_LIABILITY,
                        constraint=money_pb2.BALANCE_CONSTRAINT_NONE,
                    )
                    for account in (ACCOUNT, MERCHANT)
                ],
            )
        )
    async with stack.channel("policy") as channel:
        await policy_pb2_grpc.PolicyServiceStub(channel).CreateTenant(
            policy_pb2.CreateTenantRequest(tenant_id=TENANT, display_name="fleet")
        )
        opened_s = int(SystemClock().now_us() // 1_000_000) - 400 * 86_400
        await policy_pb2_grpc.CustomerProfileServiceStub(channel).PutCustomerProfile(
            policy_pb2.PutCustomerProfileRequest(
                profile=policy_pb2.CustomerProfile(
                    tenant_id=TENANT,
                    customer_id="c1",
                    kyc_tier=2,
                    country="US",
                    account_opened_at=Timestamp(seconds=opened_s),
                ),
                change_id="kyc-c1",
                actor="tests",
            )
        )


def _authorize(key: str) -> gw.AuthorizePaymentRequest:
    return gw.AuthorizePaymentRequest(
        tenant_id=TENANT,
        idempotency_key=key,
        account_id=ACCOUNT,
        credit_account_id=MERCHANT,
        amount=types_pb2.Money(amount_minor=AMOUNT_MINOR, currency="USD"),
        kind=gw.PAYMENT_KIND_PURCHASE,
        device_id="dev_1",
        merchant_id="mer_1",
        merchant_category="5411",
        channel=gw.PAYMENT_CHANNEL_ECOMMERCE,
        card_number="4111 1111 1111 1111",
        customer=gw.Customer(
            customer_id="c1",
            name="Jane Doe",
            email="jane@example.com",
            country="US",
            time_zone="UTC",
        ),
    )


async def test_every_plane_runs_its_replicas_and_the_gateway_dials_them_all(
    fleet_stack: Stack,
) -> None:
    addresses = fleet_stack.replica_addresses
    assert {name: len(found) for name, found in addresses.items()} == {
        "money": 2,
        "policy": 2,
        "ai": 1,
        "gateway": 2,
    }
    assert all(len(set(found)) == len(found) for found in addresses.values())
    targets = fleet_stack.gateway_targets
    assert targets["money"] == "ipv4:" + ",".join(addresses["money"])
    assert targets["policy"] == "ipv4:" + ",".join(addresses["policy"])
    assert targets["ai"] == addresses["ai"][0]
    assert fleet_stack.config.money.store.backend == "postgres"
    assert fleet_stack.config.policy.store.backend == "postgres"
    assert fleet_stack.config.gateway.idempotency.backend == "postgres"
    assert fleet_stack.config.ai.features.backend == "redis"


async def test_same_key_through_two_gateway_replicas_is_answered_once(fleet_stack: Stack) -> None:
    await _seed(fleet_stack)
    gateway_a, gateway_b = fleet_stack.replica_addresses["gateway"]
    api_key = await create_partner_key(
        fleet_stack.config, gateway_a, TENANT, state_dir=fleet_stack.state_dir
    )
    metadata = (("authorization", f"Bearer {api_key}"),)
    request = _authorize(f"fleet-{uuid.uuid4().hex}")
    answers = []
    for address in (gateway_a, gateway_b):
        async with open_channel(address, fleet_stack.partner_tls()) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            answers.append(
                await stub.AuthorizePayment(request, timeout=RPC_TIMEOUT_S, metadata=metadata)
            )
    first, second = answers
    assert first.hold_id, first
    assert not first.replayed
    assert second.replayed
    assert (second.hold_id, second.decision_id) == (first.hold_id, first.decision_id)
    # One hold: the account's pending debits are one authorization's amount.
    async with fleet_stack.channel("money", replica=1) as channel:
        balance = await money_pb2_grpc.LedgerServiceStub(channel).GetBalance(
            money_pb2.GetBalanceRequest(tenant_id=TENANT, account_id=ACCOUNT)
        )
    assert balance.balance.debits_pending_minor == AMOUNT_MINOR


async def test_replicas_without_redis_are_refused_before_anything_starts(
    tmp_path: Path, nats_url: str
) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    config = _config(tmp_path / "state", nats_url, ai={"features": {"redis_url": closed}})
    stack = Stack(config, environ=_environ(), replicas=2)
    with pytest.raises(StackError, match="needs Redis") as refused:
        await stack.start()
    assert closed in str(refused.value)
    assert stack.processes == []


async def test_replicas_without_postgres_are_refused_before_anything_starts(
    tmp_path: Path, nats_url: str, redis_url: str
) -> None:
    admin = f"host=127.0.0.1 port={free_port()} user=postgres dbname=postgres"
    config = _config(tmp_path / "state", nats_url, ai={"features": {"redis_url": redis_url}})
    stack = Stack(config, environ=_environ(), replicas=2, postgres_admin_dsn=admin)
    with pytest.raises(StackError, match="needs PostgreSQL") as refused:
        await stack.start()
    assert "TRIPLANE_MONEY_DSN" in str(refused.value)
    assert stack.processes == []
