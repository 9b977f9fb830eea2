"""Deliveries (the gateway's DeliveryAdminService): a tenant's endpoints
(partner webhooks and provider channels) with their deliveries by status and
latest failure; its dead letters and recent deliveries with their attempts
and last outcome; putting a dead letter back on the queue (sre only,
`deliveries:redeliver`), audited with the delivery before and after.

The console reaches the gateway on its certificate port
(gateway.admin_listen, or console.plane_addresses.gateway), the only port
where the gateway knows the console by its certificate."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

import grpc
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from console.actions import (
    BadFilter,
    audited,
    choice_filter,
    filter_error_page,
    next_page_link,
    tenant_filter,
    text_filter,
)
from console.app import console_of, error_page, grpc_error_page, render
from console.auth import Session, requires
from console.pages import Page
from triplane.gateway.v1 import delivery_admin_pb2 as pb

# DeliveryRecord.status values; "" is any.
STATUSES = ("", "pending", "sending", "delivered", "dead")
MAX_ENDPOINT_LENGTH = 2048


def _filters(params: dict[str, str]) -> dict[str, str]:
    return {
        "tenant": tenant_filter(params),
        "status": choice_filter(params, "status", STATUSES, ""),
        "endpoint": text_filter(params, "endpoint", MAX_ENDPOINT_LENGTH),
        "page_token": params.get("page_token", ""),
    }


def deliveries_path(tenant: str, **more: str) -> str:
    return "/deliveries?" + urlencode({"tenant": tenant, **{k: v for k, v in more.items() if v}})


def _unreachable(request: Request, session: Session) -> Response:
    return error_page(
        request,
        session,
        503,
        "GATEWAY_ADDRESS_UNSET",
        "The console does not know the gateway's certificate port: set gateway.admin_listen "
        "or console.plane_addresses.gateway.",
    )


@requires("deliveries:read")
async def deliveries(request: Request, session: Session) -> Response:
    console = console_of(request)
    params = dict(request.query_params)
    try:
        filters = _filters(params)
    except BadFilter as bad:
        return filter_error_page(request, session, bad)
    endpoints: list[pb.DeliveryEndpoint] = []
    dead: list[pb.DeliveryRecord] = []
    recent: list[pb.DeliveryRecord] = []
    next_link = ""
    tenant = filters["tenant"]
    if tenant:
        if not console.planes.has("gateway"):
            return _unreachable(request, session)
        stub = console.planes.deliveries()
        timeout = console.planes.timeout_s
        size = console.config.console.page_size
        try:
            listed = await stub.ListDeliveryEndpoints(
                pb.ListDeliveryEndpointsRequest(tenant_id=tenant), timeout=timeout
            )
            dead_page = await stub.ListDeliveries(
                pb.ListDeliveriesRequest(
                    tenant_id=tenant, status="dead", endpoint=filters["endpoint"], page_size=size
                ),
                timeout=timeout,
            )
            page = await stub.ListDeliveries(
                pb.ListDeliveriesRequest(
                    tenant_id=tenant,
                    status=filters["status"],
                    endpoint=filters["endpoint"],
                    page_size=size,
                    page_token=filters["page_token"],
                ),
                timeout=timeout,
            )
        except grpc.aio.AioRpcError as error:
            return grpc_error_page(request, session, error)
        endpoints = list(listed.endpoints)
        dead = list(dead_page.deliveries)
        recent = list(page.deliveries)
        next_link = next_page_link(
            "/deliveries",
            {"tenant": tenant, "status": filters["status"], "endpoint": filters["endpoint"]},
            page.next_page_token,
        )
    return render(
        request,
        session,
        "deliveries/list.html",
        {
            "filters": filters,
            "endpoints": endpoints,
            "dead": dead,
            "recent": recent,
            "next_link": next_link,
            "statuses": STATUSES,
            "can_redeliver": session.can("deliveries:redeliver"),
            "deliveries_path": deliveries_path,
            "redeliver_path": redeliver_path,
        },
    )


def redeliver_path(tenant: str, delivery_id: str) -> str:
    return f"/deliveries/{quote(tenant, safe='')}/{quote(delivery_id, safe='')}/redeliver"


def delivery_state(record: pb.DeliveryRecord) -> dict[str, Any]:
    """What the audit log keeps of a delivery, before and after a redelivery."""
    return {
        "status": record.status,
        "attempts": record.attempts,
        "last_status_code": record.last_status_code,
        "last_error": record.last_error,
        "endpoint": record.endpoint,
    }


@requires("deliveries:redeliver")
async def redeliver(request: Request, session: Session) -> Response:
    console = console_of(request)
    tenant = request.path_params["tenant"]
    delivery_id = request.path_params["delivery_id"]
    target = f"delivery:{tenant}/{delivery_id}"
    if not console.planes.has("gateway"):
        return _unreachable(request, session)
    stub = console.planes.deliveries()

    async def change(before: dict[str, Any]) -> dict[str, Any]:
        current = await stub.GetDelivery(
            pb.GetDeliveryRequest(tenant_id=tenant, delivery_id=delivery_id),
            timeout=console.planes.timeout_s,
        )
        before.update(delivery_state(current.delivery))
        answer = await stub.RequeueDelivery(
            pb.RequeueDeliveryRequest(tenant_id=tenant, delivery_id=delivery_id),
            timeout=console.planes.timeout_s,
        )
        return delivery_state(answer.delivery)

    return await audited(
        request, session, "delivery.redeliver", target, change, redirect_to=deliveries_path(tenant)
    )


PAGE = Page(
    label="Deliveries",
    path="/deliveries",
    permission="deliveries:read",
    order=60,
    routes=[
        Route("/deliveries", deliveries, methods=["GET"]),
        Route("/deliveries/{tenant}/{delivery_id}/redeliver", redeliver, methods=["POST"]),
    ],
)
