"""A console against real planes that the gateway drives: the money and
policy planes (their real gRPC servers, mutual TLS, NATS), the gateway in
front of them (its public gRPC API, a partner key), and the console as its
own identity (spiffe://triplane/console) dialling the planes. The AI plane
runs when asked (`with_ai`); otherwise it is down, as the gateway tolerates
(scores degrade to none).

Payments are made through the gateway as a partner would; the Decisions and
Ledger pages then read what the planes logged and posted. The planes share a
ManualClock (a decision token is checked on the money plane's clock); the
console has its own (sessions).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from ai_plane.app import AiPlane
from console.store import ConsoleStore
from gateway.app import Gateway
from gateway.auth import secrets
from money_plane.app import MoneyPlane
from policy_plane.app import build_plane
from tests.ai_plane.ai_helpers import TEST_AI, require_triton
from tests.gateway.auth_helpers import KeyedStub, partner_key
from tests.tls_helpers import dev_certificates, partner_files
from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.gateway.v1 import gateway_pb2_grpc
from triplane.money.v1 import money_pb2, money_pb2_grpc
from triplane.policy.v1 import policy_pb2, policy_pb2_grpc
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config, load_config, with_overrides
from triplane.runtime.net import free_port
from triplane.runtime.tls import channel_for, open_channel
from triplane_tools.models import ensure_bootstrap_models

from .conftest import serve_console

TENANT = "mesh"
MERCHANT = "merchant_1"
# c1 has a KYC profile (tier 2); c9 has none: the default bundle's
# kyc_profile_unknown rule fires on every payment c9 makes.
KNOWN_CUSTOMER = "c1"
UNKNOWN_CUSTOMER = "c9"
USERS = {
    "rita": ["reviewer"],
    "rosa": ["risk_admin"],
    "fina": ["finance_operator"],
    "sam": ["sre"],
    "aldo": ["auditor"],
}
# Small pages, so a handful of postings spans several.
PAGE_SIZE = 3
RPC_TIMEOUT_S = 10.0


@dataclass
class Mesh:
    config: Config
    url: str
    clock: ManualClock
    store: ConsoleStore
    gateway: KeyedStub
    money_address: str

    async def authorize(
        self, customer_id: str, name: str, amount_minor: int, account_id: str = "cust_1"
    ) -> gw.AuthorizePaymentResponse:
        answer: gw.AuthorizePaymentResponse = await self.gateway.AuthorizePayment(
            gw.AuthorizePaymentRequest(
                idempotency_key=uuid.uuid4().hex,
                account_id=account_id,
                credit_account_id=MERCHANT,
                amount=types_pb2.Money(amount_minor=amount_minor, currency="USD"),
                kind=gw.PAYMENT_KIND_PURCHASE,
                merchant_id="m1",
                merchant_category="5411",
                channel=gw.PAYMENT_CHANNEL_ECOMMERCE,
                customer=gw.Customer(customer_id=customer_id, name=name, country="US"),
            ),
            timeout=RPC_TIMEOUT_S,
        )
        return answer

    async def capture(self, hold_id: str) -> gw.CapturePaymentResponse:
        answer: gw.CapturePaymentResponse = await self.gateway.CapturePayment(
            gw.CapturePaymentRequest(idempotency_key=uuid.uuid4().hex, hold_id=hold_id),
            timeout=RPC_TIMEOUT_S,
        )
        return answer

    async def balance(self, account_id: str) -> money_pb2.Balance:
        """The account's balance as the money plane has it (admin identity)."""
        async with channel_for(self.config, self.money_address) as channel:
            answer = await money_pb2_grpc.LedgerServiceStub(channel).GetBalance(
                money_pb2.GetBalanceRequest(tenant_id=TENANT, account_id=account_id),
                timeout=RPC_TIMEOUT_S,
            )
        balance: money_pb2.Balance = answer.balance
        return balance


async def _seed(config: Config, clock: ManualClock, money: str, policy: str) -> None:
    async with channel_for(config, money) as channel:
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
                    for account in ("cust_1", "cust_2", MERCHANT)
                ],
            )
        )
    async with channel_for(config, policy) as channel:
        await policy_pb2_grpc.PolicyServiceStub(channel).CreateTenant(
            policy_pb2.CreateTenantRequest(tenant_id=TENANT, display_name="Mesh")
        )
        opened = Timestamp(seconds=clock.now_us() // 1_000_000 - 400 * 86_400)
        await policy_pb2_grpc.CustomerProfileServiceStub(channel).PutCustomerProfile(
            policy_pb2.PutCustomerProfileRequest(
                profile=policy_pb2.CustomerProfile(
                    tenant_id=TENANT,
                    customer_id=KNOWN_CUSTOMER,
                    kyc_tier=2,
                    country="US",
                    account_opened_at=opened,
                ),
                change_id="kyc-c1",
                actor="tests",
            )
        )


@contextlib.asynccontextmanager
async def gateway_mesh(
    state_dir: Path, nats_url: str, with_ai: bool = False
) -> AsyncIterator[Mesh]:
    """The mesh; `with_ai`: the AI plane runs too (its own tritonserver over
    freshly trained bootstrap models, the AI tests' small sizes), so payments
    are scored and the console can ask it for a score's attributions."""
    dev_certificates(state_dir)
    secrets.ensure_dev_files(state_dir, "test")
    console_port = free_port()
    overrides: dict[str, Any] = {
        "runtime": {"state_dir": str(state_dir)},
        "nats": {"url": nats_url},
        "gateway": {"listen": "127.0.0.1:0", "holdout_share": 0.0},
        "console": {"listen": f"127.0.0.1:{console_port}", "page_size": PAGE_SIZE},
    }
    if with_ai:
        require_triton()
        overrides["ai"] = {**TEST_AI, "listen": "127.0.0.1:0"}
    config = load_config(environ={}, overrides=overrides)
    clock = ManualClock(time.time_ns() // 1000)
    async with contextlib.AsyncExitStack() as stack:
        ai_address = f"127.0.0.1:{free_port()}"  # nothing there: scores degrade
        if with_ai:
            await asyncio.to_thread(ensure_bootstrap_models, config)
            ai = AiPlane(config, clock, listen="127.0.0.1:0")
            stack.push_async_callback(ai.stop)
            ai_address = f"127.0.0.1:{await ai.start()}"
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
            ai_address=ai_address,
        )
        stack.push_async_callback(gateway.stop)
        address = f"127.0.0.1:{await gateway.start()}"
        await _seed(config, clock, money_address, policy_address)
        channel = open_channel(address, partner_files(state_dir))
        stack.push_async_callback(channel.close)
        key = await partner_key(gateway, TENANT)

        console_config = with_overrides(
            config,
            {
                "console": {
                    "plane_addresses": {
                        "money": money_address,
                        "policy": policy_address,
                        "ai": ai_address,
                    }
                }
            },
        )
        running = await stack.enter_async_context(
            serve_console(console_config, USERS, "console-mesh")
        )
        yield Mesh(
            console_config,
            running.url,
            running.clock,
            running.store,
            KeyedStub(gateway_pb2_grpc.GatewayServiceStub(channel), key),
            money_address,
        )
