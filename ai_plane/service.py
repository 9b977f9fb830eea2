"""The gRPC servicers: protobuf in, domain calls, protobuf out. Thin on
purpose: validation lives in the engine, error mapping in the interceptor."""

from __future__ import annotations

import asyncio

import grpc

from ai_plane import codec
from ai_plane.engine import AiEngine
from ai_plane.manager import ModelManager
from ai_plane.ope_log import OpeEvaluator
from ai_plane.registry import ModelState
from ai_plane.training import MODEL_FEATURES
from triplane.ai.v1 import ai_pb2 as pb
from triplane.ai.v1 import ai_pb2_grpc
from triplane.runtime import codec as wire
from triplane.runtime.approvals import check_approval
from triplane.runtime.config import AiLimitsConfig
from triplane.runtime.deadline import Deadline
from triplane.runtime.errors import FailedPrecondition, InvalidArgument
from triplane.runtime.server import Service


def _deadline(context: grpc.aio.ServicerContext) -> Deadline:
    return Deadline.from_remaining(context.time_remaining())


class ScoringServicer(ai_pb2_grpc.ScoringServiceServicer):
    def __init__(self, engine: AiEngine) -> None:
        self._engine = engine

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        answer = await self._engine.score(codec.score_query(request), _deadline(context))
        return codec.score_response(answer)

    async def Rank(
        self, request: pb.RankRequest, context: grpc.aio.ServicerContext
    ) -> pb.RankResponse:
        answer = await self._engine.rank(codec.rank_query(request), _deadline(context))
        return codec.rank_response(answer)

    async def Explain(
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExplainResponse:
        answer = self._engine.explain(request.tenant_id, request.score_id, request.top_k)
        return codec.explain_response(answer)

    async def ReportOutcome(
        self, request: pb.ReportOutcomeRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportOutcomeResponse:
        answer = await self._engine.outcome(
            request.tenant_id,
            request.rank_id,
            request.offer_id,
            request.reward,
            request.outcome_id,
            kind=int(request.kind),
            value_minor=request.value.amount_minor if request.HasField("value") else None,
        )
        return pb.ReportOutcomeResponse(applied=answer.applied, late=answer.late)


class RegistryServicer(ai_pb2_grpc.ModelRegistryServiceServicer):
    def __init__(
        self, manager: ModelManager, limits: AiLimitsConfig, ope: OpeEvaluator | None = None
    ) -> None:
        self._manager = manager
        self._limits = limits
        self._ope = ope

    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelVersionsResponse:
        limits = self._limits
        size = wire.page_size(request.page_size, limits.default_page_size, limits.max_page_size)
        start = wire.decode_page_offset(request.page_token, codec.MODEL_VERSIONS_PAGE)
        await asyncio.to_thread(self._manager.registry.reload)
        records = self._manager.registry.versions(request.model)
        page = records[start : start + size]
        more = start + size < len(records)
        token = wire.encode_page_token(codec.MODEL_VERSIONS_PAGE, (start + size,)) if more else ""
        return pb.ListModelVersionsResponse(
            versions=[codec.model_version_pb(r) for r in page], next_page_token=token
        )

    async def GetModelVersion(
        self, request: pb.GetModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelVersionResponse:
        await asyncio.to_thread(self._manager.registry.reload)
        record = self._manager.registry.get(request.model, request.version)
        return pb.GetModelVersionResponse(version=codec.model_version_pb(record))

    async def TrainModel(
        self, request: pb.TrainModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainModelResponse:
        record, created = await self._manager.train(request.model, request.seed)
        return pb.TrainModelResponse(version=codec.model_version_pb(record), created=created)

    async def PromoteModel(
        self, request: pb.PromoteModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.PromoteModelResponse:
        target = codec.target_state(request.target_state)
        check_approval(request.actor, request.reason)
        gate = None
        if target is ModelState.LIVE and self._ope is not None:
            # Refuses (FAILED_PRECONDITION) before anything changes.
            gate = await self._ope.gate(request.model, request.version, request.force)
        record = await self._manager.promote(
            request.model, request.version, target, request.actor, request.reason
        )
        return pb.PromoteModelResponse(version=codec.model_version_pb(record), gate=gate)

    async def EstimatePolicyValue(
        self, request: pb.EstimatePolicyValueRequest, context: grpc.aio.ServicerContext
    ) -> pb.EstimatePolicyValueResponse:
        if self._ope is None:
            raise FailedPrecondition(
                "OPE_NOT_CONFIGURED", "this plane was started without off-policy evaluation"
            )
        return await self._ope.estimate(
            request.model,
            request.version,
            request.tenant_id,
            wire.micros(request.since, "since"),
            wire.micros(request.until, "until"),
        )

    async def RollbackModel(
        self, request: pb.RollbackModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.RollbackModelResponse:
        check_approval(request.actor, request.reason)
        record, seconds = await self._manager.rollback(request.model, request.actor, request.reason)
        return pb.RollbackModelResponse(live=codec.model_version_pb(record), rollback_s=seconds)

    async def GetModelDrift(
        self, request: pb.GetModelDriftRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelDriftResponse:
        if request.model not in MODEL_FEATURES:
            raise InvalidArgument(
                "UNKNOWN_MODEL", f"unknown model {request.model[:128]!r}", "model"
            )
        monitors = self._manager.engine.drift.get(request.model, {})
        answer = pb.GetModelDriftResponse(model=request.model)
        if not monitors:
            return answer
        version = next(iter(monitors.values())).version
        history = await self._manager.drift_history(request.model, version)
        answer.version = version
        for name, monitor in monitors.items():
            answer.series.append(
                pb.DriftSeries(
                    series=name,
                    psi=monitor.value,
                    observed=monitor.observed,
                    history=[
                        pb.DriftPoint(at=wire.timestamp(at_us), psi=value)
                        for at_us, value in history.get(name, [])
                    ],
                )
            )
        return answer


def ai_services(
    engine: AiEngine,
    manager: ModelManager,
    limits: AiLimitsConfig,
    ope: OpeEvaluator | None = None,
) -> list[Service]:
    scoring = ScoringServicer(engine)
    registry = RegistryServicer(manager, limits, ope)
    return [
        Service(
            full_name=pb.DESCRIPTOR.services_by_name["ScoringService"].full_name,
            register=lambda server: ai_pb2_grpc.add_ScoringServiceServicer_to_server(
                scoring, server
            ),
        ),
        Service(
            full_name=pb.DESCRIPTOR.services_by_name["ModelRegistryService"].full_name,
            register=lambda server: ai_pb2_grpc.add_ModelRegistryServiceServicer_to_server(
                registry, server
            ),
        ),
    ]
