"""The gRPC servicer: protobuf in, domain calls, protobuf out. Thin on purpose:
validation lives in the ledger, error mapping in the server's interceptor."""

from __future__ import annotations

import grpc

from money_plane import codec
from money_plane.domain import Outcome
from money_plane.ledger import Ledger
from money_plane.shards import ShardedLedger
from triplane.money.v1 import money_pb2 as pb
from triplane.money.v1 import money_pb2_grpc
from triplane.runtime import codec as wire
from triplane.runtime.clock import Clock
from triplane.runtime.deadline import Deadline
from triplane.runtime.errors import InvalidArgument, error_for
from triplane.runtime.server import Service


def _deadline(context: grpc.aio.ServicerContext, ledger: Ledger | ShardedLedger) -> Deadline:
    return Deadline.from_remaining(context.time_remaining(), ledger.config.budget_ms / 1000.0)


def _raise_for(outcome: Outcome) -> None:
    if outcome.error is not None:
        err = outcome.error
        raise error_for(err.code, err.reason, err.message, err.field)


class LedgerServicer(money_pb2_grpc.LedgerServiceServicer):
    def __init__(self, ledger: Ledger | ShardedLedger, clock: Clock) -> None:
        self._ledger = ledger
        self._clock = clock

    async def CreateTenant(
        self, request: pb.CreateTenantRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateTenantResponse:
        tenant = await self._ledger.create_tenant(request.tenant_id, request.display_name)
        return pb.CreateTenantResponse(tenant=codec.tenant(tenant))

    async def CreateAccounts(
        self, request: pb.CreateAccountsRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateAccountsResponse:
        specs = [codec.account_spec(a) for a in request.accounts]
        accounts = await self._ledger.create_accounts(request.tenant_id, specs)
        now_us = self._clock.now_us()
        return pb.CreateAccountsResponse(accounts=[codec.account(a, now_us) for a in accounts])

    async def GetAccount(
        self, request: pb.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAccountResponse:
        account = await self._ledger.get_account(request.tenant_id, request.account_id)
        return pb.GetAccountResponse(account=codec.account(account, self._clock.now_us()))

    async def CreateTransfer(
        self, request: pb.CreateTransferRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateTransferResponse:
        if not request.HasField("transfer"):
            raise InvalidArgument("FIELD_REQUIRED", "transfer is required", "transfer")
        commands = [codec.command(request.tenant_id, request.transfer)]
        [outcome] = await self._ledger.submit(
            request.tenant_id,
            commands,
            deadline=_deadline(context, self._ledger),
            field_prefix="transfer",
            indexed=False,
        )
        _raise_for(outcome)
        return pb.CreateTransferResponse(result=codec.result(0, outcome))

    async def CreateTransfers(
        self, request: pb.CreateTransfersRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateTransfersResponse:
        commands = [
            codec.command(request.tenant_id, t, f"transfers[{i}]")
            for i, t in enumerate(request.transfers)
        ]
        outcomes = await self._ledger.submit(
            request.tenant_id,
            commands,
            atomic=request.atomic,
            deadline=_deadline(context, self._ledger),
        )
        return pb.CreateTransfersResponse(
            results=[codec.result(i, o) for i, o in enumerate(outcomes)]
        )

    async def GetBalance(
        self, request: pb.GetBalanceRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetBalanceResponse:
        if request.HasField("as_of"):
            as_of_us = wire.micros(request.as_of, "as_of")
            account = await self._ledger.balance_as_of(
                request.tenant_id, request.account_id, as_of_us
            )
            return pb.GetBalanceResponse(balance=codec.balance(account, as_of_us))
        account = await self._ledger.get_account(request.tenant_id, request.account_id)
        return pb.GetBalanceResponse(balance=codec.balance(account, self._clock.now_us()))

    async def ListAccountPostings(
        self, request: pb.ListAccountPostingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAccountPostingsResponse:
        limits = self._ledger.config.limits
        size = wire.page_size(request.page_size, limits.default_page_size, limits.max_page_size)
        after = codec.postings_position(request.page_token)
        rows = await self._ledger.list_postings(request.tenant_id, request.account_id, size, after)
        response = pb.ListAccountPostingsResponse(postings=[codec.account_posting(r) for r in rows])
        if len(rows) == size:
            response.next_page_token = wire.encode_page_token(
                codec.POSTINGS_PAGE, (rows[-1].sequence,)
            )
        return response

    async def GetEntry(
        self, request: pb.GetEntryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetEntryResponse:
        entry = await self._ledger.get_entry(
            request.tenant_id, request.entry_id, request.idempotency_key
        )
        return pb.GetEntryResponse(entry=codec.entry(entry))

    async def GetHold(
        self, request: pb.GetHoldRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetHoldResponse:
        hold = await self._ledger.get_hold(request.tenant_id, request.hold_id)
        return pb.GetHoldResponse(hold=codec.hold(hold))

    async def CheckBalanced(
        self, request: pb.CheckBalancedRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckBalancedResponse:
        check = await self._ledger.check_balanced(request.tenant_id)
        return codec.check_balanced_response(check)


def ledger_service(ledger: Ledger | ShardedLedger, clock: Clock) -> Service:
    servicer = LedgerServicer(ledger, clock)
    return Service(
        full_name=pb.DESCRIPTOR.services_by_name["LedgerService"].full_name,
        register=lambda server: money_pb2_grpc.add_LedgerServiceServicer_to_server(
            servicer, server
        ),
    )
