"""DeliveryAdminService: the outbound delivery queue as operators see it
(its endpoints, its deliveries with their attempts, its dead letters) and
putting a dead letter back on it. Who may call it is the credential layer's
(gateway.auth.scopes: the admin and console certificate identities naming a
tenant, or a tenant's credential with deliveries:admin for its own)."""

from __future__ import annotations

import grpc

from gateway import validate
from gateway.delivery import DeliveryRecord, DeliveryWorker
from gateway.delivery.store import EndpointSummary
from triplane.gateway.v1 import delivery_admin_pb2 as pb
from triplane.gateway.v1 import delivery_admin_pb2_grpc
from triplane.runtime import codec as wire
from triplane.runtime.errors import InvalidArgument
from triplane.runtime.server import Service


def delivery_message(record: DeliveryRecord) -> pb.DeliveryRecord:
    return pb.DeliveryRecord(
        delivery_id=record.delivery_id,
        tenant_id=record.tenant_id,
        channel=record.channel,
        endpoint=record.endpoint,
        event_type=record.event_type,
        status=record.status,
        attempts=record.attempts,
        last_status_code=record.last_status_code,
        last_error=record.last_error,
        created_at=wire.timestamp(record.created_at_us),
        next_attempt_at=wire.timestamp(record.next_attempt_at_us),
        delivered_at=wire.timestamp(record.delivered_at_us),
        dead_at=wire.timestamp(record.dead_at_us),
    )


def endpoint_message(summary: EndpointSummary) -> pb.DeliveryEndpoint:
    counts = summary.counts
    return pb.DeliveryEndpoint(
        channel=summary.channel,
        endpoint=summary.endpoint,
        pending=counts.get("pending", 0),
        sending=counts.get("sending", 0),
        delivered=counts.get("delivered", 0),
        dead=counts.get("dead", 0),
        last_status_code=summary.last_status_code,
        last_error=summary.last_error,
        last_created_at=wire.timestamp(summary.last_created_at_us),
    )


class DeliveryAdminServicer(delivery_admin_pb2_grpc.DeliveryAdminServiceServicer):
    def __init__(self, delivery: DeliveryWorker) -> None:
        self._delivery = delivery

    async def ListDeliveryEndpoints(
        self, request: pb.ListDeliveryEndpointsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDeliveryEndpointsResponse:
        validate.require_tenant_id(request.tenant_id)
        found = await self._delivery.endpoints(request.tenant_id)
        return pb.ListDeliveryEndpointsResponse(endpoints=[endpoint_message(e) for e in found])

    async def ListDeliveries(
        self, request: pb.ListDeliveriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDeliveriesResponse:
        validate.require_tenant_id(request.tenant_id)
        records, token = await self._delivery.list_deliveries(
            request.tenant_id,
            request.status,
            request.endpoint,
            request.page_size,
            request.page_token,
        )
        return pb.ListDeliveriesResponse(
            deliveries=[delivery_message(r) for r in records], next_page_token=token
        )

    async def GetDelivery(
        self, request: pb.GetDeliveryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDeliveryResponse:
        validate.require_tenant_id(request.tenant_id)
        if not request.delivery_id:
            raise InvalidArgument("FIELD_REQUIRED", "delivery_id is required", "delivery_id")
        record = await self._delivery.get(request.tenant_id, request.delivery_id)
        return pb.GetDeliveryResponse(delivery=delivery_message(record))

    async def RequeueDelivery(
        self, request: pb.RequeueDeliveryRequest, context: grpc.aio.ServicerContext
    ) -> pb.RequeueDeliveryResponse:
        validate.require_tenant_id(request.tenant_id)
        if not request.delivery_id:
            raise InvalidArgument("FIELD_REQUIRED", "delivery_id is required", "delivery_id")
        record = await self._delivery.redeliver(request.tenant_id, request.delivery_id)
        return pb.RequeueDeliveryResponse(delivery=delivery_message(record))


def delivery_admin_services(delivery: DeliveryWorker) -> list[Service]:
    servicer = DeliveryAdminServicer(delivery)
    return [
        Service(
            pb.DESCRIPTOR.services_by_name["DeliveryAdminService"].full_name,
            lambda server: delivery_admin_pb2_grpc.add_DeliveryAdminServiceServicer_to_server(
                servicer, server
            ),
        )
    ]
