"""Through the real gRPC server: MoneyPlane on port 0 and a grpc.aio channel.
Every RPC works, and bad input to each gets the right status, ErrorInfo reason
and field, writes nothing, and never comes back INTERNAL or UNKNOWN."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import pytest
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from money_helpers import DbProbe, ledger_config, new_signer, transfer_token, unique_tenant

from money_plane import codec
from money_plane.app import MoneyPlane
from triplane.common.v1 import types_pb2
from triplane.money.v1 import money_pb2 as pb
from triplane.money.v1 import money_pb2_grpc
from triplane.runtime import codec as wire
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import channel_for
from triplane.runtime.tokens import TokenSigner

SERVICE = "triplane.money.v1.LedgerService"
USD = "USD"
C: TypeAlias = grpc.StatusCode


@dataclass
class World:
    stub: money_pb2_grpc.LedgerServiceStub
    channel: grpc.aio.Channel
    signer: TokenSigner
    probe: DbProbe
    tenant: str
    other_tenant: str
    entry_id: str
    hold_id: str
    other_entry_id: str
    other_hold_id: str

    def token(self, transfer: pb.Transfer, tenant: str | None = None, **terms: Any) -> str:
        """A token for the transfer (any term replaced by `terms`)."""
        return transfer_token(self.signer, tenant or self.tenant, transfer, **terms)

    def signed(self, transfer: pb.Transfer, **terms: Any) -> pb.Transfer:
        """The transfer carrying a token of its own (terms as for token)."""
        transfer.decision_token = self.token(transfer, **terms)
        return transfer

    def transfer(
        self,
        key: str | None = None,
        debit: str = "bank",
        credit: str = "cust",
        amount: int = 100,
        currency: str = USD,
        kind: int = pb.TRANSFER_KIND_TRANSFER,
        token: str | None = None,
        **fields: Any,
    ) -> pb.Transfer:
        key = key if key is not None else f"k-{uuid.uuid4().hex[:16]}"
        transfer = pb.Transfer(
            idempotency_key=key,
            kind=kind,  # type: ignore[arg-type]
            debit_account_id=debit,
            credit_account_id=credit,
            amount=types_pb2.Money(amount_minor=amount, currency=currency),
            **fields,
        )
        transfer.decision_token = self.token(transfer) if token is None else token
        return transfer

    def request(
        self, transfer: pb.Transfer | None = None, tenant: str | None = None
    ) -> pb.CreateTransferRequest:
        request = pb.CreateTransferRequest(tenant_id=self.tenant if tenant is None else tenant)
        if transfer is not None:
            request.transfer.CopyFrom(transfer)
        return request

    def written(self) -> tuple[Any, ...]:
        """Everything a refused request must leave alone."""
        return (
            self.probe.counters(self.tenant),
            self.probe.counters(self.other_tenant),
            self.probe.entry_count(self.tenant),
            self.probe.hold_count(self.tenant),
            self.probe.outbox_count(),
        )


async def _accounts(stub: money_pb2_grpc.LedgerServiceStub, tenant: str, extra: str) -> None:
    await stub.CreateTenant(pb.CreateTenantRequest(tenant_id=tenant, display_name=tenant))
    await stub.CreateAccounts(
        pb.CreateAccountsRequest(
            tenant_id=tenant,
            accounts=[
                pb.NewAccount(
                    account_id="bank",
                    currency=USD,
                    kind=pb.ACCOUNT_KIND_ASSET,
                    constraint=pb.BALANCE_CONSTRAINT_NONE,
                ),
                pb.NewAccount(
                    account_id="cust",
                    currency=USD,
                    kind=pb.ACCOUNT_KIND_LIABILITY,
                    constraint=pb.BALANCE_CONSTRAINT_DEBITS_MUST_NOT_EXCEED_CREDITS,
                ),
                pb.NewAccount(
                    account_id="merchant",
                    currency=USD,
                    kind=pb.ACCOUNT_KIND_LIABILITY,
                    constraint=pb.BALANCE_CONSTRAINT_DEBITS_MUST_NOT_EXCEED_CREDITS,
                ),
                pb.NewAccount(
                    account_id="fee",
                    currency=USD,
                    kind=pb.ACCOUNT_KIND_REVENUE,
                    constraint=pb.BALANCE_CONSTRAINT_NONE,
                ),
                pb.NewAccount(
                    account_id="euro",
                    currency="EUR",
                    kind=pb.ACCOUNT_KIND_LIABILITY,
                    constraint=pb.BALANCE_CONSTRAINT_NONE,
                ),
                pb.NewAccount(
                    account_id=extra,
                    currency=USD,
                    kind=pb.ACCOUNT_KIND_LIABILITY,
                    constraint=pb.BALANCE_CONSTRAINT_NONE,
                ),
            ],
        )
    )


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    state_dir = tmp_path_factory.mktemp("grpc-state")
    signer = new_signer()
    plane = MoneyPlane(ledger_config(state_dir, signer), listen="127.0.0.1:0")
    port = await plane.start()
    channel = channel_for(plane.config, f"127.0.0.1:{port}")
    stub = money_pb2_grpc.LedgerServiceStub(channel)
    tenant, other = unique_tenant("g"), unique_tenant("o")
    await _accounts(stub, tenant, "mine")
    await _accounts(stub, other, "theirs")
    world = World(
        stub,
        channel,
        signer,
        DbProbe("sqlite", Path(state_dir) / "money.db"),
        tenant,
        other,
        "",
        "",
        "",
        "",
    )
    for t in (tenant, other):
        fund = world.transfer(amount=10_000)
        fund.decision_token = world.token(fund, tenant=t)
        paid = await stub.CreateTransfer(world.request(fund, tenant=t))
        key = f"auth-{uuid.uuid4().hex[:8]}"
        auth = world.transfer(key, "cust", "merchant", 1_000, kind=pb.TRANSFER_KIND_AUTHORIZE)
        auth.decision_token = world.token(auth, tenant=t)
        held = await stub.CreateTransfer(world.request(auth, tenant=t))
        if t == tenant:
            world.entry_id, world.hold_id = paid.result.entry.entry_id, held.result.hold.hold_id
        else:
            world.other_entry_id = paid.result.entry.entry_id
            world.other_hold_id = held.result.hold.hold_id
    try:
        yield world
    finally:
        world.probe.close()
        await channel.close()
        await plane.stop()


# ---- every RPC, working ----


async def test_health_is_serving_and_reflection_lists_the_service(world: World) -> None:
    health = health_pb2_grpc.HealthStub(world.channel)
    for name in ("", SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(world.channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: list[str] = []
    async for reply in reflection.ServerReflectionInfo(requests()):
        names.extend(s.name for s in reply.list_services_response.service)
    assert SERVICE in names


async def test_a_payment_lifecycle_over_grpc(world: World) -> None:
    stub, t = world.stub, world.tenant
    tenant = await stub.CreateTenant(pb.CreateTenantRequest(tenant_id=t, display_name=t))
    assert tenant.tenant.tenant_id == t
    accounts = await stub.CreateAccounts(
        pb.CreateAccountsRequest(
            tenant_id=t,
            accounts=[
                pb.NewAccount(
                    account_id="shop",
                    currency=USD,
                    kind=pb.ACCOUNT_KIND_LIABILITY,
                    constraint=pb.BALANCE_CONSTRAINT_DEBITS_MUST_NOT_EXCEED_CREDITS,
                    metadata={"name": "shop"},
                ),
            ],
        )
    )
    assert accounts.accounts[0].account_id == "shop"
    assert accounts.accounts[0].metadata["name"] == "shop"
    key = f"auth-{uuid.uuid4().hex[:8]}"
    auth = await stub.CreateTransfer(
        world.request(
            world.transfer(
                key, "cust", "shop", 500, kind=pb.TRANSFER_KIND_AUTHORIZE, hold_timeout_s=600
            )
        )
    )
    hold_id = auth.result.hold.hold_id
    assert auth.result.hold.state == pb.HOLD_STATE_PENDING
    held = await stub.GetHold(pb.GetHoldRequest(tenant_id=t, hold_id=hold_id))
    assert held.hold.amount.amount_minor == 500
    capture = pb.Transfer(
        idempotency_key=f"cap-{key}",
        kind=pb.TRANSFER_KIND_CAPTURE,
        hold_id=hold_id,
        amount=types_pb2.Money(amount_minor=400, currency=USD),
        splits=[
            pb.SplitLeg(
                account_id="fee",
                kind=pb.SPLIT_LEG_KIND_BASIS_POINTS,
                basis_points=250,
                label="fee",
            )
        ],
    )
    # A capture that adds a split destination is decided too.
    capture.decision_token = world.token(capture, debit_account_id="cust", credit_account_id="shop")
    captured = await stub.CreateTransfer(world.request(capture))
    entry = captured.result.entry
    assert entry.amount.amount_minor == 400
    assert captured.result.hold.state == pb.HOLD_STATE_CAPTURED
    assert sorted((p.account_id, p.amount.amount_minor) for p in entry.postings) == [
        ("cust", 400),
        ("fee", 10),
        ("shop", 390),
    ]
    refund_transfer = pb.Transfer(
        idempotency_key=f"ref-{key}",
        kind=pb.TRANSFER_KIND_REFUND,
        entry_id=entry.entry_id,
        amount=types_pb2.Money(amount_minor=100, currency=USD),
    )
    # Decided for what it does: from the shop the capture credited, back to
    # the customer it debited.
    refund_transfer.decision_token = world.token(
        refund_transfer, debit_account_id="shop", credit_account_id="cust"
    )
    refund = await stub.CreateTransfer(world.request(refund_transfer))
    assert refund.result.entry.refers_to_entry_id == entry.entry_id
    by_key = await stub.GetEntry(pb.GetEntryRequest(tenant_id=t, idempotency_key=f"cap-{key}"))
    assert by_key.entry.entry_id == entry.entry_id and by_key.entry.refunded_minor == 100
    by_id = await stub.GetEntry(pb.GetEntryRequest(tenant_id=t, entry_id=entry.entry_id))
    assert by_id.entry == by_key.entry
    balance = await stub.GetBalance(pb.GetBalanceRequest(tenant_id=t, account_id="shop"))
    # The refund of 100 prorates over fee (10) and shop (390): 2.5 -> 2 and 97.5 -> 97,
    # the residue unit to the posting with the most left (shop): 98.
    assert (balance.balance.posted_minor, balance.balance.available_minor) == (292, 292)
    past = timestamp_pb2.Timestamp(seconds=1)
    old = await stub.GetBalance(pb.GetBalanceRequest(tenant_id=t, account_id="shop", as_of=past))
    assert old.balance.posted_minor == 0
    account = await stub.GetAccount(pb.GetAccountRequest(tenant_id=t, account_id="shop"))
    assert account.account.balance.posted_minor == 292
    # A void of a fresh hold, and a replay of it.
    key2 = f"auth-{uuid.uuid4().hex[:8]}"
    auth2 = await stub.CreateTransfer(
        world.request(world.transfer(key2, "cust", "shop", 50, kind=pb.TRANSFER_KIND_AUTHORIZE))
    )
    void = pb.Transfer(
        idempotency_key=f"void-{key2}",
        kind=pb.TRANSFER_KIND_VOID,
        hold_id=auth2.result.hold.hold_id,
    )
    voided = await stub.CreateTransfer(world.request(void))
    assert voided.result.hold.state == pb.HOLD_STATE_VOIDED and not voided.result.replayed
    again = await stub.CreateTransfer(world.request(void))
    assert again.result.replayed
    check = await stub.CheckBalanced(pb.CheckBalancedRequest(tenant_id=t))
    assert check.balanced and check.accounts_checked == 7
    assert check.postings_checked == world.probe.scalar(
        "SELECT COUNT(*) FROM postings WHERE substr(account_key, 1, %s) = %s",
        (len(t) + 1, f"{t}/"),
    )


async def test_batches_over_grpc(world: World) -> None:
    stub, t = world.stub, world.tenant
    transfers = [
        world.transfer(amount=1),
        world.transfer(debit="merchant", credit="cust", amount=10**9),
        world.transfer(amount=2),
    ]
    response = await stub.CreateTransfers(
        pb.CreateTransfersRequest(tenant_id=t, transfers=transfers)
    )
    results = response.results
    assert [r.index for r in results] == [0, 1, 2]
    # Each neighbour of the refused transfer committed its own entry.
    for index, amount in ((0, 1), (2, 2)):
        entry = results[index].entry
        assert entry.idempotency_key == transfers[index].idempotency_key
        assert [(p.account_id, p.amount.amount_minor) for p in entry.postings] == [
            ("bank", amount),
            ("cust", amount),
        ]
    assert world.probe.entries_by_key(t)[transfers[0].idempotency_key] == 1
    assert transfers[1].idempotency_key not in world.probe.entries_by_key(t)
    assert results[1].error.reason == "INSUFFICIENT_FUNDS"
    assert results[1].error.field == "transfers[1].debit_account_id"
    assert results[1].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    before = world.written()
    atomic = await stub.CreateTransfers(
        pb.CreateTransfersRequest(
            tenant_id=t,
            atomic=True,
            transfers=[
                world.transfer(amount=1),
                world.transfer(debit="merchant", credit="cust", amount=10**9),
            ],
        )
    )
    assert [r.error.reason for r in atomic.results] == [
        "LINKED_TRANSFER_FAILED",
        "INSUFFICIENT_FUNDS",
    ]
    assert world.written() == before


async def test_history_pages_over_grpc(world: World) -> None:
    stub, t = world.stub, world.tenant
    await stub.CreateAccounts(
        pb.CreateAccountsRequest(
            tenant_id=t,
            accounts=[
                pb.NewAccount(
                    account_id="paged",
                    currency=USD,
                    kind=pb.ACCOUNT_KIND_LIABILITY,
                    constraint=pb.BALANCE_CONSTRAINT_NONE,
                )
            ],
        )
    )
    await stub.CreateTransfers(
        pb.CreateTransfersRequest(
            tenant_id=t, transfers=[world.transfer(credit="paged", amount=i + 1) for i in range(7)]
        )
    )
    token, pages = "", 0
    amounts: list[int] = []
    while True:
        page = await stub.ListAccountPostings(
            pb.ListAccountPostingsRequest(
                tenant_id=t, account_id="paged", page_size=3, page_token=token
            )
        )
        pages += 1
        amounts.extend(p.amount.amount_minor for p in page.postings)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3 and amounts == [1, 2, 3, 4, 5, 6, 7]


# ---- bad input, each RPC ----

Call = Callable[[World], Any]


def _t(**kw: Any) -> Callable[[World], pb.CreateTransferRequest]:
    return lambda w: w.request(w.transfer(**kw))


def _big_release_at(w: World) -> pb.CreateTransferRequest:
    leg = pb.SplitLeg(
        account_id="fee",
        kind=pb.SPLIT_LEG_KIND_BASIS_POINTS,
        basis_points=100,
        release_account_id="merchant",
        release_at=timestamp_pb2.Timestamp(seconds=2**50),
    )
    return w.request(w.transfer(splits=[leg]))


def _other_token(w: World) -> pb.CreateTransferRequest:
    transfer = w.transfer("k-other-token")
    transfer.decision_token = w.token(transfer, tenant=w.other_tenant)
    return w.request(transfer)


def _reuse(w: World) -> pb.CreateTransferRequest:
    return w.request(w.transfer("k-reused", amount=101))


TRANSFER_CASES: list[tuple[str, Callable[[World], Any], C, str, str]] = [
    ("no transfer", lambda w: w.request(None), C.INVALID_ARGUMENT, "FIELD_REQUIRED", "transfer"),
    (
        "no tenant",
        lambda w: w.request(w.transfer(), tenant=""),
        C.INVALID_ARGUMENT,
        "FIELD_REQUIRED",
        "tenant_id",
    ),
    (
        "bad tenant",
        lambda w: w.request(w.transfer(), tenant="No Such"),
        C.INVALID_ARGUMENT,
        "INVALID_TENANT_ID",
        "tenant_id",
    ),
    ("no key", _t(key=""), C.INVALID_ARGUMENT, "FIELD_REQUIRED", "transfer.idempotency_key"),
    (
        "long key",
        _t(key="k" * 65),
        C.INVALID_ARGUMENT,
        "STRING_TOO_LONG",
        "transfer.idempotency_key",
    ),
    ("no kind", _t(kind=0), C.INVALID_ARGUMENT, "FIELD_REQUIRED", "transfer.kind"),
    ("unknown kind", _t(kind=42), C.INVALID_ARGUMENT, "FIELD_REQUIRED", "transfer.kind"),
    ("no debit", _t(debit=""), C.INVALID_ARGUMENT, "FIELD_REQUIRED", "transfer.debit_account_id"),
    (
        "no credit",
        _t(credit=""),
        C.INVALID_ARGUMENT,
        "FIELD_REQUIRED",
        "transfer.credit_account_id",
    ),
    (
        "no amount",
        lambda w: w.request(
            pb.Transfer(
                idempotency_key="k-na",
                kind=pb.TRANSFER_KIND_TRANSFER,
                debit_account_id="bank",
                credit_account_id="cust",
                decision_token=transfer_token(
                    w.signer,
                    w.tenant,
                    pb.Transfer(
                        idempotency_key="k-na",
                        kind=pb.TRANSFER_KIND_TRANSFER,
                        debit_account_id="bank",
                        credit_account_id="cust",
                    ),
                ),
            )
        ),
        C.INVALID_ARGUMENT,
        "FIELD_REQUIRED",
        "transfer.amount.currency",
    ),
    (
        "unknown currency",
        _t(currency="XQQ"),
        C.INVALID_ARGUMENT,
        "UNKNOWN_CURRENCY",
        "transfer.amount.currency",
    ),
    (
        "zero amount",
        _t(amount=0),
        C.INVALID_ARGUMENT,
        "AMOUNT_NOT_POSITIVE",
        "transfer.amount.amount_minor",
    ),
    (
        "negative amount",
        _t(amount=-100),
        C.INVALID_ARGUMENT,
        "AMOUNT_NOT_POSITIVE",
        "transfer.amount.amount_minor",
    ),
    (
        "same account",
        _t(credit="bank"),
        C.INVALID_ARGUMENT,
        "SAME_ACCOUNT",
        "transfer.credit_account_id",
    ),
    (
        "unknown account",
        _t(credit="ghost"),
        C.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
        "transfer.credit_account_id",
    ),
    (
        "unknown debit account",
        _t(debit="ghost"),
        C.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
        "transfer.debit_account_id",
    ),
    (
        "another tenant's account",
        _t(credit="theirs"),
        C.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
        "transfer.credit_account_id",
    ),
    (
        "another tenant's account to debit",
        _t(debit="theirs"),
        C.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
        "transfer.debit_account_id",
    ),
    (
        "currency of another account",
        _t(credit="euro"),
        C.INVALID_ARGUMENT,
        "CURRENCY_MISMATCH",
        "transfer.credit_account_id",
    ),
    (
        "long description",
        _t(description="d" * 257),
        C.INVALID_ARGUMENT,
        "STRING_TOO_LONG",
        "transfer.description",
    ),
    (
        "too much metadata",
        _t(metadata={str(i): "x" for i in range(33)}),
        C.INVALID_ARGUMENT,
        "TOO_MANY_METADATA_ENTRIES",
        "transfer.metadata",
    ),
    (
        "negative hold timeout",
        _t(kind=pb.TRANSFER_KIND_AUTHORIZE, hold_timeout_s=-1),
        C.INVALID_ARGUMENT,
        "HOLD_TIMEOUT_OUT_OF_RANGE",
        "transfer.hold_timeout_s",
    ),
    (
        "hold timeout too long",
        _t(kind=pb.TRANSFER_KIND_AUTHORIZE, hold_timeout_s=10**9),
        C.INVALID_ARGUMENT,
        "HOLD_TIMEOUT_OUT_OF_RANGE",
        "transfer.hold_timeout_s",
    ),
    (
        "no token",
        _t(token=""),
        C.PERMISSION_DENIED,
        "DECISION_TOKEN_MISSING",
        "transfer.decision_token",
    ),
    (
        "garbage token",
        _t(token="v1.%%%.%%%"),
        C.PERMISSION_DENIED,
        "DECISION_TOKEN_MALFORMED",
        "transfer.decision_token",
    ),
    (
        "token for another tenant",
        _other_token,
        C.PERMISSION_DENIED,
        "DECISION_TOKEN_MISMATCH",
        "transfer.decision_token.tenant_id",
    ),
    (
        "split leg out of range",
        _t(
            splits=[
                pb.SplitLeg(
                    account_id="fee", kind=pb.SPLIT_LEG_KIND_BASIS_POINTS, basis_points=10_001
                )
            ]
        ),
        C.INVALID_ARGUMENT,
        "INVALID_BASIS_POINTS",
        "transfer.splits[0].basis_points",
    ),
    (
        "split leg unknown account",
        _t(splits=[pb.SplitLeg(account_id="ghost", kind=pb.SPLIT_LEG_KIND_FIXED, amount_minor=5)]),
        C.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
        "transfer.splits[0].account_id",
    ),
    (
        "splits above amount",
        _t(splits=[pb.SplitLeg(account_id="fee", kind=pb.SPLIT_LEG_KIND_FIXED, amount_minor=101)]),
        C.INVALID_ARGUMENT,
        "SPLITS_EXCEED_AMOUNT",
        "transfer.splits",
    ),
    (
        "release time beyond any calendar",
        _big_release_at,
        C.INVALID_ARGUMENT,
        "INVALID_TIMESTAMP",
        "transfer.splits[0].release_at",
    ),
    (
        "insufficient funds",
        _t(debit="merchant", credit="cust", amount=10**12),
        C.FAILED_PRECONDITION,
        "INSUFFICIENT_FUNDS",
        "transfer.debit_account_id",
    ),
    (
        "capture of no hold",
        lambda w: w.request(
            pb.Transfer(
                idempotency_key="k-c1", kind=pb.TRANSFER_KIND_CAPTURE, hold_id="hld_nothere"
            )
        ),
        C.NOT_FOUND,
        "HOLD_NOT_FOUND",
        "transfer.hold_id",
    ),
    (
        "capture of another tenant's hold",
        lambda w: w.request(
            pb.Transfer(
                idempotency_key="k-c2", kind=pb.TRANSFER_KIND_CAPTURE, hold_id=w.other_hold_id
            )
        ),
        C.NOT_FOUND,
        "HOLD_NOT_FOUND",
        "transfer.hold_id",
    ),
    (
        "capture above the hold",
        lambda w: w.request(
            pb.Transfer(
                idempotency_key="k-c3",
                kind=pb.TRANSFER_KIND_CAPTURE,
                hold_id=w.hold_id,
                amount=types_pb2.Money(amount_minor=1_001, currency=USD),
            )
        ),
        C.OUT_OF_RANGE,
        "CAPTURE_EXCEEDS_HOLD",
        "transfer.amount.amount_minor",
    ),
    (
        "capture with accounts",
        lambda w: w.request(
            pb.Transfer(
                idempotency_key="k-c4",
                kind=pb.TRANSFER_KIND_CAPTURE,
                hold_id=w.hold_id,
                debit_account_id="bank",
            )
        ),
        C.INVALID_ARGUMENT,
        "FIELD_NOT_ALLOWED",
        "transfer.debit_account_id",
    ),
    (
        "void with an amount",
        lambda w: w.request(
            pb.Transfer(
                idempotency_key="k-v1",
                kind=pb.TRANSFER_KIND_VOID,
                hold_id=w.hold_id,
                amount=types_pb2.Money(amount_minor=1, currency=USD),
            )
        ),
        C.INVALID_ARGUMENT,
        "FIELD_NOT_ALLOWED",
        "transfer.amount",
    ),
    (
        "refund of no entry",
        lambda w: w.request(
            w.signed(
                pb.Transfer(
                    idempotency_key="k-r1", kind=pb.TRANSFER_KIND_REFUND, entry_id="ent_nothere"
                )
            )
        ),
        C.NOT_FOUND,
        "ENTRY_NOT_FOUND",
        "transfer.entry_id",
    ),
    (
        "refund of another tenant's entry",
        lambda w: w.request(
            w.signed(
                pb.Transfer(
                    idempotency_key="k-r2", kind=pb.TRANSFER_KIND_REFUND, entry_id=w.other_entry_id
                ),
                debit_account_id="cust",
                credit_account_id="bank",
            )
        ),
        C.NOT_FOUND,
        "ENTRY_NOT_FOUND",
        "transfer.entry_id",
    ),
    (
        "refund above the entry",
        lambda w: w.request(
            w.signed(
                pb.Transfer(
                    idempotency_key="k-r3",
                    kind=pb.TRANSFER_KIND_REFUND,
                    entry_id=w.entry_id,
                    amount=types_pb2.Money(amount_minor=10_001, currency=USD),
                ),
                debit_account_id="cust",
                credit_account_id="bank",
            )
        ),
        C.OUT_OF_RANGE,
        "REFUND_EXCEEDS_ENTRY",
        "transfer.amount.amount_minor",
    ),
    (
        "same key, other amount",
        _reuse,
        C.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
        "transfer.amount.amount_minor",
    ),
]


async def _expect(world: World, call: Any, code: C, reason: str, field: str) -> None:
    before = world.written()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    assert error.code() not in (C.INTERNAL, C.UNKNOWN), error
    got_reason, got_field = parse_rpc_error(error)
    assert (error.code(), got_reason, got_field) == (code, reason, field), error.details()
    assert world.written() == before


@pytest.mark.parametrize(
    ("make", "code", "reason", "field"),
    [case[1:] for case in TRANSFER_CASES],
    ids=[case[0] for case in TRANSFER_CASES],
)
async def test_create_transfer_refuses_bad_input(
    world: World,
    make: Callable[[World], pb.CreateTransferRequest],
    code: C,
    reason: str,
    field: str,
) -> None:
    if reason == "IDEMPOTENCY_KEY_REUSED":
        with contextlib.suppress(grpc.aio.AioRpcError):
            await world.stub.CreateTransfer(world.request(world.transfer("k-reused")))
    await _expect(world, world.stub.CreateTransfer(make(world)), code, reason, field)


OTHER_CASES: list[tuple[str, str, Callable[[World], Any], C, str, str]] = [
    (
        "empty batch",
        "CreateTransfers",
        lambda w: pb.CreateTransfersRequest(tenant_id=w.tenant),
        C.INVALID_ARGUMENT,
        "FIELD_REQUIRED",
        "transfers",
    ),
    (
        "oversized batch",
        "CreateTransfers",
        lambda w: pb.CreateTransfersRequest(
            tenant_id=w.tenant, transfers=[w.transfer(token="x") for _ in range(1_001)]
        ),
        C.INVALID_ARGUMENT,
        "BATCH_TOO_LARGE",
        "transfers",
    ),
    (
        "bad transfer in a batch",
        "CreateTransfers",
        lambda w: pb.CreateTransfersRequest(
            tenant_id=w.tenant, transfers=[w.transfer(), w.transfer(amount=0)]
        ),
        C.INVALID_ARGUMENT,
        "AMOUNT_NOT_POSITIVE",
        "transfers[1].amount.amount_minor",
    ),
    (
        "tenant id with capitals",
        "CreateTenant",
        lambda w: pb.CreateTenantRequest(tenant_id="Acme", display_name="x"),
        C.INVALID_ARGUMENT,
        "INVALID_TENANT_ID",
        "tenant_id",
    ),
    (
        "no tenant id",
        "CreateTenant",
        lambda w: pb.CreateTenantRequest(display_name="x"),
        C.INVALID_ARGUMENT,
        "FIELD_REQUIRED",
        "tenant_id",
    ),
    (
        "long display name",
        "CreateTenant",
        lambda w: pb.CreateTenantRequest(tenant_id=unique_tenant(), display_name="n" * 257),
        C.INVALID_ARGUMENT,
        "STRING_TOO_LONG",
        "display_name",
    ),
    (
        "tenant again, other name",
        "CreateTenant",
        lambda w: pb.CreateTenantRequest(tenant_id=w.tenant, display_name="renamed"),
        C.ALREADY_EXISTS,
        "TENANT_EXISTS",
        "display_name",
    ),
    (
        "no accounts",
        "CreateAccounts",
        lambda w: pb.CreateAccountsRequest(tenant_id=w.tenant),
        C.INVALID_ARGUMENT,
        "FIELD_REQUIRED",
        "accounts",
    ),
    (
        "too many accounts",
        "CreateAccounts",
        lambda w: pb.CreateAccountsRequest(
            tenant_id=w.tenant,
            accounts=[
                pb.NewAccount(
                    account_id=f"a{i}",
                    currency=USD,
                    kind=pb.ACCOUNT_KIND_ASSET,
                    constraint=pb.BALANCE_CONSTRAINT_NONE,
                )
                for i in range(1_001)
            ],
        ),
        C.INVALID_ARGUMENT,
        "BATCH_TOO_LARGE",
        "accounts",
    ),
    (
        "account in unknown currency",
        "CreateAccounts",
        lambda w: pb.CreateAccountsRequest(
            tenant_id=w.tenant,
            accounts=[
                pb.NewAccount(
                    account_id="x1",
                    currency="ZZZ",
                    kind=pb.ACCOUNT_KIND_ASSET,
                    constraint=pb.BALANCE_CONSTRAINT_NONE,
                )
            ],
        ),
        C.INVALID_ARGUMENT,
        "UNKNOWN_CURRENCY",
        "accounts[0].currency",
    ),
    (
        "account without kind",
        "CreateAccounts",
        lambda w: pb.CreateAccountsRequest(
            tenant_id=w.tenant,
            accounts=[
                pb.NewAccount(account_id="x2", currency=USD, constraint=pb.BALANCE_CONSTRAINT_NONE)
            ],
        ),
        C.INVALID_ARGUMENT,
        "FIELD_REQUIRED",
        "accounts[0].kind",
    ),
    (
        "account with a long id",
        "CreateAccounts",
        lambda w: pb.CreateAccountsRequest(
            tenant_id=w.tenant,
            accounts=[
                pb.NewAccount(
                    account_id="x" * 65,
                    currency=USD,
                    kind=pb.ACCOUNT_KIND_ASSET,
                    constraint=pb.BALANCE_CONSTRAINT_NONE,
                )
            ],
        ),
        C.INVALID_ARGUMENT,
        "STRING_TOO_LONG",
        "accounts[0].account_id",
    ),
    (
        "account exists, other currency",
        "CreateAccounts",
        lambda w: pb.CreateAccountsRequest(
            tenant_id=w.tenant,
            accounts=[
                pb.NewAccount(
                    account_id="cust",
                    currency="EUR",
                    kind=pb.ACCOUNT_KIND_LIABILITY,
                    constraint=pb.BALANCE_CONSTRAINT_DEBITS_MUST_NOT_EXCEED_CREDITS,
                )
            ],
        ),
        C.ALREADY_EXISTS,
        "ACCOUNT_EXISTS",
        "accounts[0].currency",
    ),
    (
        "accounts for no tenant",
        "CreateAccounts",
        lambda w: pb.CreateAccountsRequest(
            tenant_id=unique_tenant(),
            accounts=[
                pb.NewAccount(
                    account_id="a",
                    currency=USD,
                    kind=pb.ACCOUNT_KIND_ASSET,
                    constraint=pb.BALANCE_CONSTRAINT_NONE,
                )
            ],
        ),
        C.NOT_FOUND,
        "TENANT_NOT_FOUND",
        "tenant_id",
    ),
    (
        "unknown account",
        "GetAccount",
        lambda w: pb.GetAccountRequest(tenant_id=w.tenant, account_id="ghost"),
        C.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
        "account_id",
    ),
    (
        "no account id",
        "GetAccount",
        lambda w: pb.GetAccountRequest(tenant_id=w.tenant),
        C.INVALID_ARGUMENT,
        "FIELD_REQUIRED",
        "account_id",
    ),
    (
        "another tenant's account",
        "GetAccount",
        lambda w: pb.GetAccountRequest(tenant_id=w.tenant, account_id="theirs"),
        C.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
        "account_id",
    ),
    (
        "balance of unknown account",
        "GetBalance",
        lambda w: pb.GetBalanceRequest(tenant_id=w.tenant, account_id="ghost"),
        C.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
        "account_id",
    ),
    (
        "balance of another tenant's account",
        "GetBalance",
        lambda w: pb.GetBalanceRequest(
            tenant_id=w.tenant, account_id="theirs", as_of=timestamp_pb2.Timestamp(seconds=1)
        ),
        C.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
        "account_id",
    ),
    (
        "balance as of a time beyond any calendar",
        "GetBalance",
        lambda w: pb.GetBalanceRequest(
            tenant_id=w.tenant, account_id="cust", as_of=timestamp_pb2.Timestamp(seconds=2**50)
        ),
        C.INVALID_ARGUMENT,
        "INVALID_TIMESTAMP",
        "as_of",
    ),
    (
        "bad page token",
        "ListAccountPostings",
        lambda w: pb.ListAccountPostingsRequest(
            tenant_id=w.tenant, account_id="cust", page_token="not-a-token"
        ),
        C.INVALID_ARGUMENT,
        "PAGE_TOKEN_INVALID",
        "page_token",
    ),
    (
        "forged page token",
        "ListAccountPostings",
        lambda w: pb.ListAccountPostingsRequest(
            tenant_id=w.tenant, account_id="cust", page_token="cDE6YWJj"
        ),
        C.INVALID_ARGUMENT,
        "PAGE_TOKEN_INVALID",
        "page_token",
    ),
    (
        "negative page",
        "ListAccountPostings",
        lambda w: pb.ListAccountPostingsRequest(
            tenant_id=w.tenant, account_id="cust", page_size=-1
        ),
        C.INVALID_ARGUMENT,
        "PAGE_SIZE_INVALID",
        "page_size",
    ),
    (
        "history of another tenant's account",
        "ListAccountPostings",
        lambda w: pb.ListAccountPostingsRequest(tenant_id=w.tenant, account_id="theirs"),
        C.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
        "account_id",
    ),
    (
        "entry: neither id nor key",
        "GetEntry",
        lambda w: pb.GetEntryRequest(tenant_id=w.tenant),
        C.INVALID_ARGUMENT,
        "ONE_OF_REQUIRED",
        "entry_id",
    ),
    (
        "entry: both id and key",
        "GetEntry",
        lambda w: pb.GetEntryRequest(tenant_id=w.tenant, entry_id=w.entry_id, idempotency_key="k"),
        C.INVALID_ARGUMENT,
        "ONE_OF_REQUIRED",
        "entry_id",
    ),
    (
        "unknown entry",
        "GetEntry",
        lambda w: pb.GetEntryRequest(tenant_id=w.tenant, entry_id="ent_nothere"),
        C.NOT_FOUND,
        "ENTRY_NOT_FOUND",
        "entry_id",
    ),
    (
        "another tenant's entry",
        "GetEntry",
        lambda w: pb.GetEntryRequest(tenant_id=w.tenant, entry_id=w.other_entry_id),
        C.NOT_FOUND,
        "ENTRY_NOT_FOUND",
        "entry_id",
    ),
    (
        "entry by unknown key",
        "GetEntry",
        lambda w: pb.GetEntryRequest(tenant_id=w.tenant, idempotency_key="never"),
        C.NOT_FOUND,
        "ENTRY_NOT_FOUND",
        "idempotency_key",
    ),
    (
        "unknown hold",
        "GetHold",
        lambda w: pb.GetHoldRequest(tenant_id=w.tenant, hold_id="hld_nothere"),
        C.NOT_FOUND,
        "HOLD_NOT_FOUND",
        "hold_id",
    ),
    (
        "another tenant's hold",
        "GetHold",
        lambda w: pb.GetHoldRequest(tenant_id=w.tenant, hold_id=w.other_hold_id),
        C.NOT_FOUND,
        "HOLD_NOT_FOUND",
        "hold_id",
    ),
    (
        "no hold id",
        "GetHold",
        lambda w: pb.GetHoldRequest(tenant_id=w.tenant),
        C.INVALID_ARGUMENT,
        "FIELD_REQUIRED",
        "hold_id",
    ),
    (
        "balance check of no tenant",
        "CheckBalanced",
        lambda w: pb.CheckBalancedRequest(tenant_id=unique_tenant()),
        C.NOT_FOUND,
        "TENANT_NOT_FOUND",
        "tenant_id",
    ),
    (
        "balance check, bad tenant id",
        "CheckBalanced",
        lambda w: pb.CheckBalancedRequest(tenant_id="../etc"),
        C.INVALID_ARGUMENT,
        "INVALID_TENANT_ID",
        "tenant_id",
    ),
]


@pytest.mark.parametrize(
    ("rpc", "make", "code", "reason", "field"),
    [case[1:] for case in OTHER_CASES],
    ids=[case[0] for case in OTHER_CASES],
)
async def test_every_rpc_refuses_bad_input(
    world: World, rpc: str, make: Callable[[World], Any], code: C, reason: str, field: str
) -> None:
    await _expect(world, getattr(world.stub, rpc)(make(world)), code, reason, field)


async def test_page_token_is_opaque_but_ours(world: World) -> None:
    """A token of our own format resumes after the sequence it names: from 0,
    the first page; from a posting's sequence, the postings after it."""

    async def listed(page_token: str) -> list[int]:
        page = await world.stub.ListAccountPostings(
            pb.ListAccountPostingsRequest(
                tenant_id=world.tenant, account_id="mine", page_token=page_token
            )
        )
        return [p.sequence for p in page.postings]

    await world.stub.CreateTransfers(
        pb.CreateTransfersRequest(
            tenant_id=world.tenant,
            transfers=[world.transfer(credit="mine", amount=i + 1) for i in range(3)],
        )
    )
    first = await listed("")  # "mine" is this test's alone
    assert len(first) == 3 and first == sorted(first)
    assert await listed(wire.encode_page_token(codec.POSTINGS_PAGE, (0,))) == first
    assert await listed(wire.encode_page_token(codec.POSTINGS_PAGE, (first[0],))) == first[1:]


async def test_remembered_refusal_comes_back_as_the_same_status(world: World) -> None:
    request = world.request(world.transfer(debit="merchant", credit="cust", amount=10**12))
    codes = []
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await world.stub.CreateTransfer(request)
        codes.append((caught.value.code(), parse_rpc_error(caught.value)))
    assert (
        codes[0]
        == codes[1]
        == (C.FAILED_PRECONDITION, ("INSUFFICIENT_FUNDS", "transfer.debit_account_id"))
    )


async def test_concurrent_grpc_retries_of_one_key_make_one_entry(world: World) -> None:
    requests = [world.request(world.transfer(f"burst-{i}", amount=1 + i)) for i in range(10)]
    replies = await asyncio.gather(
        *[world.stub.CreateTransfer(r) for r in requests for _ in range(8)]
    )
    by_key: dict[str, set[str]] = {}
    for reply in replies:
        by_key.setdefault(reply.result.entry.idempotency_key, set()).add(
            reply.result.entry.entry_id
        )
    assert all(len(ids) == 1 for ids in by_key.values()) and len(by_key) == 10
    counts = world.probe.entries_by_key(world.tenant)
    assert all(counts[f"burst-{i}"] == 1 for i in range(10))
    assert sum(not r.result.replayed for r in replies) == 10
