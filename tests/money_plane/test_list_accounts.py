"""ListAccounts and ListTenants over gRPC: a tenant's accounts with their
balances, in id order, a page at a time, never another tenant's; the
tenants in id order, merged over every shard when the ledger is sharded;
bad input refused naming the field."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from money_helpers import ledger_config, new_signer, unique_tenant

from money_plane.app import MoneyPlane
from tests.conftest import create_pg_database, drop_pg_database
from triplane.money.v1 import money_pb2 as pb
from triplane.money.v1 import money_pb2_grpc
from triplane.runtime.config import with_overrides
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import channel_for


@pytest.fixture
async def stub(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[money_pb2_grpc.LedgerServiceStub]:
    plane = MoneyPlane(
        ledger_config(tmp_path_factory.mktemp("accounts"), new_signer()), listen="127.0.0.1:0"
    )
    port = await plane.start()
    channel = channel_for(plane.config, f"127.0.0.1:{port}")
    try:
        yield money_pb2_grpc.LedgerServiceStub(channel)
    finally:
        await channel.close()
        await plane.stop()


async def _tenant(stub: money_pb2_grpc.LedgerServiceStub, ids: list[str]) -> str:
    tenant = unique_tenant("la")
    await stub.CreateTenant(pb.CreateTenantRequest(tenant_id=tenant, display_name=tenant))
    await stub.CreateAccounts(
        pb.CreateAccountsRequest(
            tenant_id=tenant,
            accounts=[
                pb.NewAccount(
                    account_id=account_id,
                    currency="USD",
                    kind=pb.ACCOUNT_KIND_LIABILITY,
                    constraint=pb.BALANCE_CONSTRAINT_NONE,
                )
                for account_id in ids
            ],
        )
    )
    return tenant


async def test_accounts_page_in_id_order(stub: money_pb2_grpc.LedgerServiceStub) -> None:
    ids = [f"acct-{i:02d}" for i in range(7)]
    tenant = await _tenant(stub, list(reversed(ids)))
    other = await _tenant(stub, ["theirs"])
    seen: list[str] = []
    token, pages = "", 0
    while True:
        page = await stub.ListAccounts(
            pb.ListAccountsRequest(tenant_id=tenant, page_size=3, page_token=token)
        )
        pages += 1
        seen += [a.account_id for a in page.accounts]
        assert all(a.tenant_id == tenant and a.balance.currency == "USD" for a in page.accounts)
        token = page.next_page_token
        if not token:
            break
    assert seen == ids and pages == 3
    answer = await stub.ListAccounts(pb.ListAccountsRequest(tenant_id=other))
    assert [a.account_id for a in answer.accounts] == ["theirs"] and not answer.next_page_token


@pytest.mark.parametrize(
    ("request_fields", "code", "reason", "field"),
    [
        ({"tenant_id": "nobody-here"}, grpc.StatusCode.NOT_FOUND, "TENANT_NOT_FOUND", "tenant_id"),
        (
            {"page_token": "garbled"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "PAGE_TOKEN_INVALID",
            "page_token",
        ),
        ({"page_size": -1}, grpc.StatusCode.INVALID_ARGUMENT, "PAGE_SIZE_INVALID", "page_size"),
        (
            {"tenant_id": "Bad Tenant"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_TENANT_ID",
            "tenant_id",
        ),
    ],
)
async def test_bad_input_is_refused(
    stub: money_pb2_grpc.LedgerServiceStub,
    request_fields: dict[str, object],
    code: grpc.StatusCode,
    reason: str,
    field: str,
) -> None:
    tenant = await _tenant(stub, ["a"])
    fields: dict[str, object] = {"tenant_id": tenant, **request_fields}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListAccounts(pb.ListAccountsRequest(**fields))  # type: ignore[arg-type]
    assert caught.value.code() == code
    assert parse_rpc_error(caught.value) == (reason, field)


async def _all_tenants(stub: money_pb2_grpc.LedgerServiceStub, page_size: int) -> list[str]:
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListTenants(pb.ListTenantsRequest(page_size=page_size, page_token=token))
        seen += [t.tenant_id for t in page.tenants]
        assert len(page.tenants) <= page_size
        token = page.next_page_token
        if not token:
            return seen


async def test_tenants_page_in_id_order(stub: money_pb2_grpc.LedgerServiceStub) -> None:
    made = sorted([await _tenant(stub, ["a"]) for _ in range(5)])
    seen = await _all_tenants(stub, 2)
    assert seen == sorted(seen) and len(seen) == len(set(seen))
    assert set(made) <= set(seen)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListTenants(pb.ListTenantsRequest(page_token="garbled"))
    assert parse_rpc_error(caught.value) == ("PAGE_TOKEN_INVALID", "page_token")


async def test_tenants_of_every_shard_page_once_each(
    pg_admin_dsn: str, nats_url: str, tmp_path: Path
) -> None:
    """Two shards: pages merge both shards' tenants in id order, none twice,
    none left out, whichever shard each page's tenants come from."""
    dsns = (
        create_pg_database(pg_admin_dsn, "triplane_shard"),
        create_pg_database(pg_admin_dsn, "triplane_shard"),
    )
    try:
        config = with_overrides(
            ledger_config(tmp_path, new_signer()),
            {
                "nats": {"url": nats_url},
                "money": {
                    "store": {
                        "backend": "postgres",
                        "shards": [
                            {"name": "a", "postgres_dsn": dsns[0]},
                            {"name": "b", "postgres_dsn": dsns[1]},
                        ],
                    }
                },
            },
        )
        plane = MoneyPlane(config, listen="127.0.0.1:0")
        port = await plane.start(sweepers=False)
        try:
            async with channel_for(plane.config, f"127.0.0.1:{port}") as channel:
                sharded_stub = money_pb2_grpc.LedgerServiceStub(channel)
                made = [await _tenant(sharded_stub, ["a"]) for _ in range(7)]
                assert plane.sharded is not None
                shards = {await plane.sharded.shard_of(t) for t in made}
                assert shards == {"a", "b"}
                for size in (1, 2, 3, 10):
                    assert await _all_tenants(sharded_stub, size) == sorted(made)
        finally:
            await plane.stop()
    finally:
        for dsn in dsns:
            drop_pg_database(pg_admin_dsn, dsn)
