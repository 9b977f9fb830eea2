"""The gRPC servicer: protobuf in, domain calls, protobuf out. Thin on purpose:
validation lives in the ledger, error mapping in the server's interceptor."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import msgspec

from money_plane import codec
from money_plane.domain import Outcome
from money_plane.ledger import Ledger
from money_plane.payouts import codec as payout_codec
from money_plane.payouts.service import Payouts, Settlements
from money_plane.payouts.settlement import Schedule
from money_plane.shards import ShardedLedger
from triplane.money.v1 import money_pb2 as pb
from triplane.money.v1 import money_pb2_grpc
from triplane.runtime import codec as wire
from triplane.runtime.clock import Clock
from triplane.runtime.deadline import Deadline
from triplane.runtime.errors import FailedPrecondition, InvalidArgument, error_for
from triplane.runtime.server import Service


def _deadline(context: grpc.aio.ServicerContext, ledger: Ledger | ShardedLedger) -> Deadline:
    return Deadline.from_remaining(context.time_remaining(), ledger.config.budget_ms / 1000.0)


def _raise_for(outcome: Outcome) -> None:
    if outcome.error is not None:
        err = outcome.error
        raise error_for(err.code, err.reason, err.message, err.field)


PayoutsFor = Callable[[str], Awaitable[Payouts]]
SettlementsFor = Callable[[str], Awaitable[Settlements]]


def _schedule(message: pb.SettlementSchedule) -> Schedule:
    return Schedule(
        tenant_id=message.tenant_id,
        account_id=message.account_id,
        merchant_id=message.merchant_id,
        payable_account_id=message.payable_account_id,
        frequency=message.frequency,
        cut_off=message.cut_off or "17:00",
        time_zone=message.time_zone or "UTC",
        calendar=message.calendar,
        weekday=message.weekday,
        min_payout_minor=message.min_payout_minor,
        fee_fixed_minor=message.fee_fixed_minor,
        fee_bps=message.fee_bps,
        fee_account_id=message.fee_account_id,
        reserve_bps=message.reserve_bps,
        reserve_days=message.reserve_days,
        reserve_account_id=message.reserve_account_id,
    )


def _schedule_message(value: Schedule) -> pb.SettlementSchedule:
    return pb.SettlementSchedule(**msgspec.structs.asdict(value))


class LedgerServicer(money_pb2_grpc.LedgerServiceServicer):
    def __init__(
        self,
        ledger: Ledger | ShardedLedger,
        clock: Clock,
        payouts: PayoutsFor | None = None,
        settlements: SettlementsFor | None = None,
    ) -> None:
        self._ledger = ledger
        self._clock = clock
        self._payouts_for = payouts
        self._settlements_for = settlements
        self.run_settlements: Callable[[], Awaitable[int]] | None = None

    async def _settlements(self, tenant_id: str) -> Settlements:
        if self._settlements_for is None:
            raise FailedPrecondition(
                "SETTLEMENTS_NOT_CONFIGURED", "this money plane runs no settlements", ""
            )
        return await self._settlements_for(tenant_id)

    async def _payouts(self, tenant_id: str) -> Payouts:
        if self._payouts_for is None:
            raise FailedPrecondition(
                "PAYOUTS_NOT_CONFIGURED", "this money plane serves no payouts", ""
            )
        return await self._payouts_for(tenant_id)

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

    async def ListTenants(
        self, request: pb.ListTenantsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTenantsResponse:
        limits = self._ledger.config.limits
        size = wire.page_size(request.page_size, limits.default_page_size, limits.max_page_size)
        position = wire.decode_page_token(request.page_token, codec.TENANTS_PAGE, (str,))
        after = str(position[0]) if position is not None else ""
        tenants = await self._ledger.list_tenants(size + 1, after)
        response = pb.ListTenantsResponse(tenants=[codec.tenant(t) for t in tenants[:size]])
        if len(tenants) > size:
            response.next_page_token = wire.encode_page_token(
                codec.TENANTS_PAGE, (tenants[size - 1].tenant_id,)
            )
        return response

    async def ListAccounts(
        self, request: pb.ListAccountsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAccountsResponse:
        limits = self._ledger.config.limits
        size = wire.page_size(request.page_size, limits.default_page_size, limits.max_page_size)
        position = wire.decode_page_token(request.page_token, codec.ACCOUNTS_PAGE, (str,))
        after = str(position[0]) if position is not None else ""
        accounts = await self._ledger.list_accounts(request.tenant_id, size + 1, after)
        now_us = self._clock.now_us()
        response = pb.ListAccountsResponse(
            accounts=[codec.account(a, now_us) for a in accounts[:size]]
        )
        if len(accounts) > size:
            response.next_page_token = wire.encode_page_token(
                codec.ACCOUNTS_PAGE, (accounts[size - 1].account_id,)
            )
        return response

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

    # ---- payouts ----

    async def CreateBeneficiary(
        self, request: pb.CreateBeneficiaryRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateBeneficiaryResponse:
        payouts = await self._payouts(request.tenant_id)
        found, replayed = await payouts.create_beneficiary(
            request.tenant_id, payout_codec.new_beneficiary(request.beneficiary)
        )
        return pb.CreateBeneficiaryResponse(
            beneficiary=payout_codec.beneficiary(found), replayed=replayed
        )

    async def GetBeneficiary(
        self, request: pb.GetBeneficiaryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetBeneficiaryResponse:
        payouts = await self._payouts(request.tenant_id)
        found = await payouts.get_beneficiary(request.tenant_id, request.beneficiary_id)
        return pb.GetBeneficiaryResponse(beneficiary=payout_codec.beneficiary(found))

    async def GetPayoutContext(
        self, request: pb.GetPayoutContextRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPayoutContextResponse:
        payouts = await self._payouts(request.tenant_id)
        found = await payouts.context(
            request.tenant_id,
            request.beneficiary_id,
            request.debit_account_id,
            request.amount.amount_minor,
        )
        (c1, a1), (c24, a24), (c30, a30) = found.velocity
        return pb.GetPayoutContextResponse(
            beneficiary=payout_codec.beneficiary(found.beneficiary),
            holder_name=found.holder_name,
            beneficiary_payouts=found.beneficiary_payouts,
            available_minor=found.available_minor,
            currency=found.currency,
            payouts_count_1h=c1,
            payouts_count_24h=c24,
            payouts_count_30d=c30,
            payouts_amount_minor_1h=a1,
            payouts_amount_minor_24h=a24,
            payouts_amount_minor_30d=a30,
            in_flight_account_id=found.in_flight_account_id,
            rail_options=[payout_codec.rail_option(o) for o in found.rail_options],
        )

    async def CreatePayout(
        self, request: pb.CreatePayoutRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreatePayoutResponse:
        payouts = await self._payouts(request.tenant_id)
        found, replayed = await payouts.create_payout(
            request.tenant_id,
            request.idempotency_key,
            beneficiary_id=request.beneficiary_id,
            merchant_id=request.merchant_id,
            debit_account_id=request.debit_account_id,
            amount_minor=request.amount.amount_minor,
            currency=request.amount.currency,
            decision_token=request.decision_token,
            pending_review=request.pending_review,
            decision_id=request.decision_id,
            case_id=request.case_id,
            rail=request.rail,
            description=request.description,
            alternate_rails=list(request.alternate_rails),
        )
        return pb.CreatePayoutResponse(payout=payout_codec.payout(found), replayed=replayed)

    async def GetPayout(
        self, request: pb.GetPayoutRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPayoutResponse:
        payouts = await self._payouts(request.tenant_id)
        found = await payouts.get_payout(request.tenant_id, request.payout_id)
        return pb.GetPayoutResponse(payout=payout_codec.payout(found))

    async def RecordPayoutOutcome(
        self, request: pb.RecordPayoutOutcomeRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordPayoutOutcomeResponse:
        payouts = await self._payouts(request.tenant_id)
        found, replayed = await payouts.record_outcome(
            request.tenant_id,
            request.payout_id,
            int(request.outcome),
            reason_code=request.reason_code,
            reason=request.reason,
            rail_reference=request.rail_reference,
        )
        return pb.RecordPayoutOutcomeResponse(payout=payout_codec.payout(found), replayed=replayed)

    async def ApprovePayout(
        self, request: pb.ApprovePayoutRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApprovePayoutResponse:
        payouts = await self._payouts(request.tenant_id)
        found, replayed = await payouts.approve(
            request.tenant_id,
            request.decision_token,
            payout_id=request.payout_id,
            idempotency_key=request.idempotency_key,
        )
        return pb.ApprovePayoutResponse(payout=payout_codec.payout(found), replayed=replayed)

    async def DeclinePayout(
        self, request: pb.DeclinePayoutRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeclinePayoutResponse:
        payouts = await self._payouts(request.tenant_id)
        found, replayed = await payouts.decline(
            request.tenant_id,
            request.case_id,
            payout_id=request.payout_id,
            idempotency_key=request.idempotency_key,
        )
        return pb.DeclinePayoutResponse(payout=payout_codec.payout(found), replayed=replayed)

    async def PutSettlementSchedule(
        self, request: pb.PutSettlementScheduleRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutSettlementScheduleResponse:
        schedule = _schedule(request.schedule)
        settlements = await self._settlements(schedule.tenant_id)
        stored = await settlements.put_schedule(schedule)
        return pb.PutSettlementScheduleResponse(schedule=_schedule_message(stored))

    async def ListSettlements(
        self, request: pb.ListSettlementsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSettlementsResponse:
        settlements = await self._settlements(request.tenant_id)
        found = await settlements.settlements(request.tenant_id, request.account_id)
        return pb.ListSettlementsResponse(
            settlements=[
                pb.Settlement(
                    tenant_id=s.tenant_id,
                    account_id=s.account_id,
                    period=s.period,
                    state=s.state,
                    gross_minor=s.gross_minor,
                    fee_minor=s.fee_minor,
                    reserve_minor=s.reserve_minor,
                    net_minor=s.net_minor,
                    currency=s.currency,
                    entry_id=s.entry_id,
                    closes_at=wire.timestamp(s.closes_at_us),
                    settled_at=wire.timestamp(s.settled_at_us),
                )
                for s in found
            ]
        )

    async def RunSettlements(
        self, request: pb.RunSettlementsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunSettlementsResponse:
        if self.run_settlements is None:
            raise FailedPrecondition(
                "SETTLEMENTS_NOT_CONFIGURED", "this money plane runs no settlements", ""
            )
        return pb.RunSettlementsResponse(settled=await self.run_settlements())


def ledger_service(
    ledger: Ledger | ShardedLedger,
    clock: Clock,
    payouts: PayoutsFor | None = None,
    settlements: SettlementsFor | None = None,
    run_settlements: Callable[[], Awaitable[int]] | None = None,
) -> Service:
    servicer = LedgerServicer(ledger, clock, payouts, settlements)
    servicer.run_settlements = run_settlements
    return Service(
        full_name=pb.DESCRIPTOR.services_by_name["LedgerService"].full_name,
        register=lambda server: money_pb2_grpc.add_LedgerServiceServicer_to_server(
            servicer, server
        ),
    )
