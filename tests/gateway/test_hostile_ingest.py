"""IngestEvents accepts events only for tenants that exist: an invented tenant
is NOT_FOUND before anything is published or remembered; a tenant the money
plane created (and so registered on the spine, triplane.runtime.tenants) is
accepted. Through the real gateway and the real money plane with its outbox
relay, on a nats-server of the test's own.

TLS and partner credentials are switched off here: what is under test is the
tenant check, which stands whatever credential carried the tenant."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
import pytest

from gateway.app import Gateway
from money_plane.app import MoneyPlane
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.gateway.v1 import gateway_pb2_grpc
from triplane.money.v1 import money_pb2, money_pb2_grpc
from triplane.runtime.clock import SystemClock
from triplane.runtime.config import Config, load_config
from triplane.runtime.net import free_port
from triplane.runtime.status import parse_rpc_error
from triplane_tools.natsd import EmbeddedNats

pytestmark = [pytest.mark.nats, pytest.mark.timeout(120)]


@dataclass
class World:
    config: Config
    gateway: gateway_pb2_grpc.GatewayServiceStub
    money: money_pb2_grpc.LedgerServiceStub


@pytest.fixture
async def world(state_dir: Path, tmp_path: Path) -> AsyncIterator[World]:
    server = EmbeddedNats(tmp_path / "nats")
    url = server.start()
    config = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir), "tls": {"enabled": False}},
            "nats": {"url": url},
            "money": {"outbox": {"relay_idle_poll_ms": 10}},
            "gateway": {"auth": {"enabled": False}},
        },
    )
    clock = SystemClock()
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(server.stop)
        money = MoneyPlane(config, clock, listen="127.0.0.1:0")
        stack.push_async_callback(money.stop)
        money_address = f"127.0.0.1:{await money.start(sweepers=False)}"
        gateway = Gateway(
            config,
            clock,
            listen="127.0.0.1:0",
            money_address=money_address,
            # Nothing listens there: IngestEvents needs neither.
            policy_address=f"127.0.0.1:{free_port()}",
            ai_address=f"127.0.0.1:{free_port()}",
        )
        stack.push_async_callback(gateway.stop)
        port = await gateway.start()
        gateway_channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stack.push_async_callback(gateway_channel.close)
        money_channel = grpc.aio.insecure_channel(money_address)
        stack.push_async_callback(money_channel.close)
        yield World(
            config,
            gateway_pb2_grpc.GatewayServiceStub(gateway_channel),
            money_pb2_grpc.LedgerServiceStub(money_channel),
        )


def _events(key: str) -> gw.IngestEventsRequest:
    return gw.IngestEventsRequest(
        events=[
            gw.BehaviourEvent(
                idempotency_key=key,
                kind=gw.EVENT_KIND_LOAN_SIMULATED,
                customer=gw.Customer(customer_id="c1"),
                account_id="acct_1",
            )
        ]
    )


async def _published(url: str, tenant_id: str) -> int:
    client = await nats.connect(url)
    try:
        info = await client.jetstream().stream_info(
            "TRIPLANE_GATEWAY", subjects_filter=f"triplane.gateway.{tenant_id}.>"
        )
        return sum((info.state.subjects or {}).values())
    finally:
        await client.close()


async def test_an_invented_tenant_is_not_found_and_nothing_is_published(world: World) -> None:
    request = _events("ev-1")
    request.tenant_id = "ghost"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.gateway.IngestEvents(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert parse_rpc_error(caught.value) == ("TENANT_NOT_FOUND", "tenant_id")
    assert await _published(world.config.nats.url, "ghost") == 0


async def test_a_tenant_the_money_plane_created_is_accepted(world: World) -> None:
    await world.money.CreateTenant(
        money_pb2.CreateTenantRequest(tenant_id="real", display_name="Real"), timeout=10
    )
    request = _events("ev-2")
    request.tenant_id = "real"
    # The registration reaches the spine through the money plane's relay; a
    # refusal before that is the documented window (nats.tenant_directory).
    answer = None
    for _ in range(100):
        try:
            answer = await world.gateway.IngestEvents(request, timeout=10)
            break
        except grpc.aio.AioRpcError as error:
            assert parse_rpc_error(error) == ("TENANT_NOT_FOUND", "tenant_id")
            await asyncio.sleep(0.1)
    assert answer is not None, "the tenant never became known"
    assert not answer.results[0].HasField("error"), answer.results[0].error
    assert await _published(world.config.nats.url, "real") == 1
