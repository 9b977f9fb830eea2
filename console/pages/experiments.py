"""Experiments (the gateway's ExperimentAdminService): a tenant's incremental
lift per offer and surface over the holdout, with confidence intervals, as
a server-drawn SVG and a table (`experiments:read`). Read-only: nothing on
the page changes anything."""

from __future__ import annotations

import datetime
import math
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from console.actions import BadFilter, filter_error_page, tenant_filter
from console.app import console_of, grpc_error_page, render
from console.auth import Session, requires
from console.charts import Interval, interval_chart
from console.pages import Page
from triplane.gateway.v1 import experiments_admin_pb2 as pb

ALL = "*"


def _day(params: dict[str, str], name: str) -> Timestamp | None:
    """A YYYY-MM-DD day as its UTC midnight; empty: None."""
    raw = params.get(name, "").strip()
    if not raw:
        return None
    try:
        day = datetime.date.fromisoformat(raw)
    except ValueError:
        raise BadFilter(name, f"{name} must be a day, YYYY-MM-DD") from None
    stamp = Timestamp()
    stamp.FromDatetime(datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC))
    return stamp


def label(row: pb.LiftRow) -> str:
    offer = "all offers" if row.offer_id == ALL else row.offer_id
    surface = "all surfaces" if row.surface == ALL else row.surface
    return f"{offer} / {surface}"


def points(value: float) -> str:
    """A rate difference in percentage points, signed."""
    return "n/a" if math.isnan(value) else f"{100 * value:+.2f}"


@requires("experiments:read")
async def experiments(request: Request, session: Session) -> Response:
    console = console_of(request)
    params = dict(request.query_params)
    try:
        tenant = tenant_filter(params)
        since, until = _day(params, "since"), _day(params, "until")
    except BadFilter as bad:
        return filter_error_page(request, session, bad)
    report: pb.GetLiftReportResponse | None = None
    chart: Any = None
    if tenant and console.planes.has("gateway"):
        query = pb.GetLiftReportRequest(tenant_id=tenant)
        if since is not None:
            query.since.CopyFrom(since)
        if until is not None:
            query.until.CopyFrom(until)
        try:
            report = await console.planes.experiments().GetLiftReport(
                query, timeout=console.planes.timeout_s
            )
        except grpc.aio.AioRpcError as error:
            return grpc_error_page(request, session, error)
        chart = interval_chart(
            f"Incremental lift over the holdout ({100 * report.confidence_level:.0f}% intervals)",
            [
                Interval(label(r), 100 * r.lift, 100 * r.lift_low, 100 * r.lift_high)
                for r in report.rows
            ],
            unit=" pp",
        )
    return render(
        request,
        session,
        "experiments/list.html",
        {
            "tenant": tenant,
            "params": params,
            "report": report,
            "chart": chart,
            "gateway_known": console.planes.has("gateway"),
            "label": label,
            "points": points,
        },
    )


PAGE = Page(
    label="Experiments",
    path="/experiments",
    permission="experiments:read",
    order=60,
    routes=[Route("/experiments", experiments, methods=["GET"])],
)
