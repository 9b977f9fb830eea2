"""The money plane's Prometheus endpoint (money.metrics_listen), scraped over
HTTP from a real plane after real calls: RED per RPC with the codes callers
saw, group-commit sizes, transfers by result, the outbox relay's lag and
publishes, and reserve releases posted and deferred."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import grpc
import pytest
from money_helpers import (
    STANDARD_ACCOUNTS,
    Kit,
    bps_leg,
    ledger_config,
    new_signer,
    transfer_token,
    unique_tenant,
)

from money_plane.app import MoneyPlane
from tests.metrics_scrape import Samples, scrape, value
from triplane.common.v1 import types_pb2
from triplane.money.v1 import money_pb2 as pb
from triplane.money.v1 import money_pb2_grpc
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import with_overrides
from triplane.runtime.net import free_port
from triplane.runtime.tls import channel_for

pytestmark = [pytest.mark.nats]

SERVICE = "triplane.money.v1.LedgerService"
DAY_S = 86_400


def rpc_requests(samples: Samples, method: str, code: str) -> float:
    return value(
        samples,
        "triplane_rpc_requests_total",
        plane="money_plane",
        method=f"{SERVICE}/{method}",
        code=code,
    )


async def _reserve_payment(kit: Kit) -> None:
    """A payment keeping a tenth of it in reserve for a day."""
    await kit.fund("alice", 10_000)
    release_at_us = kit.clock.now_us() + DAY_S * 1_000_000
    await kit.ok(
        kit.move(
            f"rsv-{uuid.uuid4().hex[:8]}",
            "alice",
            "merchant",
            10_000,
            splits=[bps_leg("reserve", 1_000, "reserve", release_at_us, "merchant")],
        )
    )


async def test_metrics_endpoint_counts_calls_commits_relay_and_reserves(
    tmp_path: Path, nats_url: str
) -> None:
    signer = new_signer()
    metrics_listen = f"127.0.0.1:{free_port()}"
    (tmp_path / "state").mkdir()
    config = with_overrides(
        ledger_config(tmp_path / "state", signer, metrics_listen=metrics_listen),
        {"nats": {"url": nats_url}},
    )
    clock = ManualClock(int(time.time() * 1_000_000))
    plane = MoneyPlane(config, clock=clock, listen="127.0.0.1:0")
    port = await plane.start(sweepers=False)
    assert plane.ledger is not None
    tenant = unique_tenant("metrics")
    kit = Kit(plane.ledger, clock, signer, "sqlite", tmp_path / "state" / "money.db", tenant)
    channel = channel_for(config, f"127.0.0.1:{port}")
    stub = money_pb2_grpc.LedgerServiceStub(channel)
    try:
        before = await scrape(metrics_listen)
        await stub.CreateTenant(pb.CreateTenantRequest(tenant_id=tenant, display_name="metrics"))
        await kit.open(*STANDARD_ACCOUNTS)
        transfer = pb.Transfer(
            idempotency_key=f"k-{uuid.uuid4().hex[:16]}",
            kind=pb.TRANSFER_KIND_TRANSFER,
            debit_account_id="bank",
            credit_account_id="alice",
            amount=types_pb2.Money(amount_minor=500, currency="USD"),
        )
        transfer.decision_token = transfer_token(signer, tenant, transfer)
        paid = await stub.CreateTransfer(
            pb.CreateTransferRequest(tenant_id=tenant, transfer=transfer)
        )
        assert paid.result.entry.entry_id
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateTransfer(pb.CreateTransferRequest(tenant_id=tenant))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetAccount(pb.GetAccountRequest(tenant_id=tenant, account_id="nobody"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

        # One reserve released when due; one whose money was spent put off.
        await _reserve_payment(kit)
        clock.advance(DAY_S)
        assert await plane.ledger.release_due_reserves() == 1
        await _reserve_payment(kit)
        await kit.ok(kit.move(f"spend-{uuid.uuid4().hex[:8]}", "reserve", "bank", 1_000))
        clock.advance(DAY_S)
        assert await plane.ledger.release_due_reserves() == 0

        # The relay publishes what was committed (a wait, not a timing bound).
        async def published() -> float:
            name = "triplane_money_outbox_published_events_total"
            return value(await scrape(metrics_listen), name) - value(before, name)

        for _ in range(300):
            if await published() > 0:
                break
            await asyncio.sleep(0.1)
        after = await scrape(metrics_listen)

        def moved(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        def rpcs(method: str, code: str) -> float:
            return rpc_requests(after, method, code) - rpc_requests(before, method, code)

        assert rpcs("CreateTenant", "OK") == 1
        assert rpcs("CreateTransfer", "OK") == 1
        assert rpcs("CreateTransfer", "INVALID_ARGUMENT") == 1
        assert rpcs("GetAccount", "NOT_FOUND") == 1
        duration = {"plane": "money_plane", "method": f"{SERVICE}/CreateTransfer"}
        assert moved("triplane_rpc_duration_seconds_count", **duration) == 2
        assert moved("triplane_rpc_duration_seconds_bucket", **duration, le="+Inf") == 2

        # Group commits: the gRPC transfer, the funding, the reserve
        # payments and releases, each a group of at least one transfer.
        groups = moved("triplane_money_group_commit_transfers_count")
        assert groups >= 1
        assert moved("triplane_money_group_commit_transfers_sum") >= groups
        assert moved("triplane_money_transfers_total", kind="transfer", result="committed") >= 4
        assert moved("triplane_money_transfers_total", kind="reserve_release", result="committed")
        assert moved("triplane_money_transfers_total", kind="reserve_release", result="refused")
        assert moved("triplane_money_reserve_releases_total", result="released") == 1
        assert moved("triplane_money_reserve_releases_total", result="deferred") == 1
        assert value(after, "triplane_money_commit_queue_transfers") == 0

        assert await published() > 0
        assert value(after, "triplane_money_outbox_lag_seconds") >= 0
    finally:
        await channel.close()
        await plane.stop()
