"""ExperimentAdminService: the lift of a tenant's offers over the holdout,
per offer and surface, with confidence intervals (gateway.measure), for the
console's Experiments page. Who may call it is the credential layer's
(gateway.auth.scopes: the admin and console certificate identities naming a
tenant, or a tenant's credential with experiments:read for its own)."""

from __future__ import annotations

import grpc

from gateway import validate
from gateway.measure import LiftRow, Measurement, Rate
from triplane.gateway.v1 import experiments_admin_pb2 as pb
from triplane.gateway.v1 import experiments_admin_pb2_grpc
from triplane.runtime import codec as wire
from triplane.runtime.errors import InvalidArgument
from triplane.runtime.server import Service

# Lift per offer and surface; the report adds each offer's total and the grand total.
DIMENSIONS = ("offer_id", "surface")


def rate_message(rate: Rate) -> pb.ConversionRate:
    return pb.ConversionRate(
        customers=rate.customers,
        conversions=rate.conversions,
        rate=rate.rate,
        low=rate.low,
        high=rate.high,
    )


def row_message(row: LiftRow) -> pb.LiftRow:
    return pb.LiftRow(
        offer_id=row.offer_id,
        surface=row.surface,
        treatment=rate_message(row.treatment),
        holdout=rate_message(row.holdout),
        lift=row.lift,
        lift_low=row.lift_low,
        lift_high=row.lift_high,
        lift_relative=row.lift_relative,
        incremental_conversions=row.incremental_conversions,
        small=row.small,
        significant=row.significant,
    )


class ExperimentAdminServicer(experiments_admin_pb2_grpc.ExperimentAdminServiceServicer):
    def __init__(self, measurement: Measurement) -> None:
        self._measurement = measurement

    async def GetLiftReport(
        self, request: pb.GetLiftReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetLiftReportResponse:
        validate.require_tenant_id(request.tenant_id)
        since_us = wire.micros(request.since, "since")
        until_us = wire.micros(request.until, "until")
        if until_us and since_us >= until_us:
            raise InvalidArgument("WINDOW_INVALID", "since must be before until", "since")
        report = await self._measurement.lift_report(
            request.tenant_id, since_us, until_us, DIMENSIONS
        )
        return pb.GetLiftReportResponse(
            tenant_id=report.tenant_id,
            since=wire.timestamp(report.since_us),
            until=wire.timestamp(report.until_us),
            confidence_level=report.confidence_level,
            method=report.method,
            rows=[row_message(row) for row in report.rows],
        )


def experiment_admin_services(measurement: Measurement) -> list[Service]:
    servicer = ExperimentAdminServicer(measurement)
    return [
        Service(
            pb.DESCRIPTOR.services_by_name["ExperimentAdminService"].full_name,
            lambda server: experiments_admin_pb2_grpc.add_ExperimentAdminServiceServicer_to_server(
                servicer, server
            ),
        )
    ]
