"""The ReconciliationService servicer: protobuf in, Reconciler calls, protobuf out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from money_plane.recon import codec
from money_plane.recon.reconciler import Reconciler
from triplane.money.v1 import recon_pb2 as pb
from triplane.money.v1 import recon_pb2_grpc
from triplane.runtime.errors import InvalidArgument
from triplane.runtime.server import Service

ReconFor = Callable[[str], Awaitable[Reconciler]]
_DEFAULT_PAGE = 100
_MAX_PAGE = 1000


def _page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument("PAGE_SIZE_INVALID", "page_size must not be negative", "page_size")
    return min(value or _DEFAULT_PAGE, _MAX_PAGE)


class ReconciliationServicer(recon_pb2_grpc.ReconciliationServiceServicer):
    def __init__(self, recon_for: ReconFor) -> None:
        self._recon_for = recon_for

    async def ImportStatement(
        self, request: pb.ImportStatementRequest, context: grpc.aio.ServicerContext
    ) -> pb.ImportStatementResponse:
        recon = await self._recon_for(request.tenant_id)
        result = await recon.import_statement(
            request.tenant_id, request.ledger_account_id, request.content, actor=request.actor
        )
        return codec.import_response(result)

    async def CreateExpectedPayments(
        self, request: pb.CreateExpectedPaymentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateExpectedPaymentsResponse:
        if not request.expected_payments:
            raise InvalidArgument(
                "FIELD_REQUIRED", "at least one expected payment is required", "expected_payments"
            )
        recon = await self._recon_for(request.tenant_id)
        payments = [
            codec.expected_payment(e, f"expected_payments[{i}]")
            for i, e in enumerate(request.expected_payments)
        ]
        created = await recon.create_expected_payments(request.tenant_id, payments)
        return pb.CreateExpectedPaymentsResponse(
            expected_payments=[codec.expected_message(e) for e in created]
        )

    async def GetStatement(
        self, request: pb.GetStatementRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatementResponse:
        recon = await self._recon_for(request.tenant_id)
        record, lines = await recon.get_statement(
            request.tenant_id, request.statement_id, _page_size(request.max_lines or 1000)
        )
        return pb.GetStatementResponse(
            statement=codec.statement(record), lines=[codec.line(row) for row in lines]
        )

    async def ListBreaks(
        self, request: pb.ListBreaksRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListBreaksResponse:
        recon = await self._recon_for(request.tenant_id)
        size = _page_size(request.page_size)
        breaks, next_token = await recon.page_breaks(
            request.tenant_id,
            request.state,
            request.break_class,
            request.page_token,
            size,
            request.order,
        )
        now_us = recon.clock.now_us()
        out = []
        for b in breaks:
            sla = recon.sla(b, now_us)
            out.append(codec.recon_break(b, sla.tier, sla.overdue, sla.age_s))
        return pb.ListBreaksResponse(breaks=out, next_page_token=next_token)

    async def ResolveBreak(
        self, request: pb.ResolveBreakRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResolveBreakResponse:
        recon = await self._recon_for(request.tenant_id)
        resolved = await recon.resolve_break(
            request.tenant_id,
            request.break_id,
            request.resolution,
            request.actor,
            note=request.note,
            expected_id=request.expected_id,
            entry_id=request.entry_id,
            line_fingerprint=request.line_fingerprint,
            decision_token=request.decision_token,
        )
        sla = recon.sla(resolved)
        return pb.ResolveBreakResponse(
            recon_break=codec.recon_break(resolved, sla.tier, sla.overdue, sla.age_s)
        )

    async def GetBreak(
        self, request: pb.GetBreakRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetBreakResponse:
        recon = await self._recon_for(request.tenant_id)
        found, line, expected = await recon.break_detail(request.tenant_id, request.break_id)
        sla = recon.sla(found)
        answer = pb.GetBreakResponse(
            recon_break=codec.recon_break(found, sla.tier, sla.overdue, sla.age_s)
        )
        if line is not None:
            answer.line.CopyFrom(codec.line(line))
        if expected is not None:
            answer.expected_payment.CopyFrom(codec.expected_message(expected))
        return answer

    async def ListStatements(
        self, request: pb.ListStatementsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListStatementsResponse:
        recon = await self._recon_for(request.tenant_id)
        found, next_token = await recon.list_statements(
            request.tenant_id, request.page_token, _page_size(request.page_size)
        )
        return pb.ListStatementsResponse(
            statements=[codec.statement(s) for s in found], next_page_token=next_token
        )

    async def DescribeResolution(
        self, request: pb.DescribeResolutionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DescribeResolutionResponse:
        recon = await self._recon_for(request.tenant_id)
        command = await recon.resolution_command(
            request.tenant_id, request.break_id, request.resolution, request.entry_id
        )
        return codec.resolution_transfer(command)


def reconciliation_service(recon_for: ReconFor) -> Service:
    servicer = ReconciliationServicer(recon_for)
    return Service(
        full_name=pb.DESCRIPTOR.services_by_name["ReconciliationService"].full_name,
        register=lambda server: recon_pb2_grpc.add_ReconciliationServiceServicer_to_server(
            servicer, server
        ),
    )
