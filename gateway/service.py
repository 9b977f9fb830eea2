"""The thin GatewayService servicer: the caller's deadline and trace id in,
the domain flows called, protobuf out. Errors are mapped in one place (the
ErrorMappingInterceptor (triplane.runtime.status) that PlaneServer installs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import grpc
from opentelemetry import trace

from gateway import codec, validate
from gateway.codec import DeadLetterRecord
from gateway.core import CallContext, new_trace_id
from gateway.customers import CustomerProfiles
from gateway.ingest import Ingest
from gateway.nba import NextBestAction
from gateway.payments import Payments
from gateway.payouts import Payouts
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.gateway.v1 import gateway_pb2_grpc
from triplane.runtime import errors
from triplane.runtime.deadline import Deadline
from triplane.runtime.server import Service


class DeadLetters(Protocol):
    async def list_dead_letters(
        self, tenant_id: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[Sequence[DeadLetterRecord], str]: ...

    async def redeliver(self, tenant_id: str, delivery_id: str) -> DeadLetterRecord: ...


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(
        self,
        payments: Payments,
        nba: NextBestAction,
        ingest: Ingest,
        dead_letters: DeadLetters,
        default_deadline_ms: float,
        customers: CustomerProfiles | None = None,
        payouts: Payouts | None = None,
    ) -> None:
        self._payouts_flow = payouts
        self._payments = payments
        self._customers = customers or CustomerProfiles(payments.core)
        self._nba = nba
        self._ingest = ingest
        self._dead_letters = dead_letters
        self._default_deadline_s = default_deadline_ms / 1000.0

    def _call(self, context: grpc.aio.ServicerContext) -> CallContext:
        span = trace.get_current_span().get_span_context()
        trace_id = f"{span.trace_id:032x}" if span.trace_id else new_trace_id()
        remaining = context.time_remaining()
        deadline = Deadline.from_remaining(remaining, self._default_deadline_s)
        return CallContext(deadline=deadline, trace_id=trace_id)

    async def AuthorizePayment(
        self, request: gw.AuthorizePaymentRequest, context: grpc.aio.ServicerContext
    ) -> gw.AuthorizePaymentResponse:
        return await self._payments.authorize(request, self._call(context))

    async def CapturePayment(
        self, request: gw.CapturePaymentRequest, context: grpc.aio.ServicerContext
    ) -> gw.CapturePaymentResponse:
        return await self._payments.capture(request, self._call(context))

    async def VoidPayment(
        self, request: gw.VoidPaymentRequest, context: grpc.aio.ServicerContext
    ) -> gw.VoidPaymentResponse:
        return await self._payments.void(request, self._call(context))

    async def RefundPayment(
        self, request: gw.RefundPaymentRequest, context: grpc.aio.ServicerContext
    ) -> gw.RefundPaymentResponse:
        return await self._payments.refund(request, self._call(context))

    async def GetDecision(
        self, request: gw.GetDecisionRequest, context: grpc.aio.ServicerContext
    ) -> gw.GetDecisionResponse:
        return await self._payments.get_decision(request, self._call(context))

    async def DecideNextAction(
        self, request: gw.DecideNextActionRequest, context: grpc.aio.ServicerContext
    ) -> gw.DecideNextActionResponse:
        return await self._nba.decide(request, self._call(context))

    async def RecordOutcome(
        self, request: gw.RecordOutcomeRequest, context: grpc.aio.ServicerContext
    ) -> gw.RecordOutcomeResponse:
        return await self._nba.record_outcome(request, self._call(context))

    async def IngestEvents(
        self, request: gw.IngestEventsRequest, context: grpc.aio.ServicerContext
    ) -> gw.IngestEventsResponse:
        return await self._ingest.ingest(request, self._call(context))

    async def ListDeadLetters(
        self, request: gw.ListDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> gw.ListDeadLettersResponse:
        validate.require_tenant_id(request.tenant_id)
        records, token = await self._dead_letters.list_dead_letters(
            request.tenant_id, request.page_size, request.page_token
        )
        return gw.ListDeadLettersResponse(
            dead_letters=[codec.dead_letter(r) for r in records], next_page_token=token
        )

    async def RedeliverDeadLetter(
        self, request: gw.RedeliverDeadLetterRequest, context: grpc.aio.ServicerContext
    ) -> gw.RedeliverDeadLetterResponse:
        validate.require_tenant_id(request.tenant_id)
        for name in ("idempotency_key", "delivery_id"):
            if not getattr(request, name):
                raise errors.InvalidArgument("FIELD_REQUIRED", f"{name} is required", name)
        delivery = self._dead_letters

        async def run() -> gw.RedeliverDeadLetterResponse:
            record = await delivery.redeliver(request.tenant_id, request.delivery_id)
            return gw.RedeliverDeadLetterResponse(
                delivery_id=record.delivery_id,
                requeued=record.status == "pending",
                idempotency_key=request.idempotency_key,
            )

        return await self._payments.core.idempotent(
            request.tenant_id,
            "RedeliverDeadLetter",
            request.idempotency_key,
            request,
            gw.RedeliverDeadLetterResponse,
            run,
        )

    async def PutCustomerProfile(
        self, request: gw.PutCustomerProfileRequest, context: grpc.aio.ServicerContext
    ) -> gw.PutCustomerProfileResponse:
        return await self._customers.put(request, self._call(context))

    async def GetCustomerProfile(
        self, request: gw.GetCustomerProfileRequest, context: grpc.aio.ServicerContext
    ) -> gw.GetCustomerProfileResponse:
        return await self._customers.get(request, self._call(context))

    def _payouts(self) -> Payouts:
        if self._payouts_flow is None:
            raise errors.FailedPrecondition(
                "PAYOUTS_NOT_CONFIGURED", "this gateway serves no payouts", ""
            )
        return self._payouts_flow

    async def CreateBeneficiary(
        self, request: gw.CreateBeneficiaryRequest, context: grpc.aio.ServicerContext
    ) -> gw.CreateBeneficiaryResponse:
        return await self._payouts().create_beneficiary(request, self._call(context))

    async def GetBeneficiary(
        self, request: gw.GetBeneficiaryRequest, context: grpc.aio.ServicerContext
    ) -> gw.GetBeneficiaryResponse:
        return await self._payouts().get_beneficiary(request, self._call(context))

    async def CreatePayout(
        self, request: gw.CreatePayoutRequest, context: grpc.aio.ServicerContext
    ) -> gw.CreatePayoutResponse:
        return await self._payouts().create_payout(request, self._call(context))

    async def GetPayout(
        self, request: gw.GetPayoutRequest, context: grpc.aio.ServicerContext
    ) -> gw.GetPayoutResponse:
        return await self._payouts().get_payout(request, self._call(context))


def gateway_services(servicer: GatewayServicer) -> list[Service]:
    return [
        Service(
            gw.DESCRIPTOR.services_by_name["GatewayService"].full_name,
            lambda server: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server),
        )
    ]
