"""The gRPC servicers: protobuf in, domain calls, protobuf out. Thin on
purpose: validation lives in the engine, error mapping in the interceptor."""

from __future__ import annotations

import base64
import math

import grpc
from google.protobuf import timestamp_pb2

from ai_plane.engine import (
    AiEngine,
    Candidate,
    RankAnswer,
    RankQuery,
    ScoreAnswer,
    ScoreQuery,
)
from ai_plane.features import OfferEntry
from ai_plane.manager import ModelManager
from ai_plane.registry import ModelRecord, ModelState
from ai_plane.scorer import SOURCE_NONE
from triplane.ai.v1 import ai_pb2 as pb
from triplane.ai.v1 import ai_pb2_grpc
from triplane.common.v1 import types_pb2
from triplane.runtime.config import AiLimitsConfig
from triplane.runtime.deadline import Deadline
from triplane.runtime.errors import InvalidArgument
from triplane.runtime.server import Service

_STATE_TO_PB = {
    ModelState.DRAFT: pb.MODEL_STATE_DRAFT,
    ModelState.APPROVED: pb.MODEL_STATE_APPROVED,
    ModelState.LIVE: pb.MODEL_STATE_LIVE,
    ModelState.RETIRED: pb.MODEL_STATE_RETIRED,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}


def _deadline(context: grpc.aio.ServicerContext) -> Deadline:
    return Deadline.from_remaining(context.time_remaining())


def _micros(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def score_ref(answer: ScoreAnswer | RankAnswer, score_id: str) -> types_pb2.ModelScoreRef:
    score = answer.score
    return types_pb2.ModelScoreRef(
        model=answer.model,
        version=str(answer.version) if answer.version else "",
        source=answer.source,
        score=0.0 if answer.source == SOURCE_NONE or math.isnan(score) else score,
        score_id=score_id,
    )


def score_response(answer: ScoreAnswer) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        score_ref=score_ref(answer, answer.score_id),
        attributions=[
            pb.Attribution(feature=a.feature, value=a.value, contribution=a.contribution)
            for a in answer.attributions
        ],
        features=[pb.FeatureValue(name=n, value=v) for n, v in answer.features],
        feature_set_version=answer.feature_set_version,
        fallback_reason=answer.fallback_reason,
    )


class ScoringServicer(ai_pb2_grpc.ScoringServiceServicer):
    def __init__(self, engine: AiEngine) -> None:
        self._engine = engine

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        p = request.payment
        query = ScoreQuery(
            tenant_id=p.tenant_id,
            account_id=p.account_id,
            amount_minor=p.amount.amount_minor,
            currency=p.amount.currency,
            device_id=p.device_id,
            merchant_id=p.merchant_id,
            merchant_category=p.merchant_category,
            channel=int(p.channel),
            occurred_at_us=_micros(p.occurred_at) if p.HasField("occurred_at") else 0,
            attributes=dict(p.attributes),
            model=request.model,
            top_k=request.top_k,
            local_hour=p.local_hour if p.HasField("local_hour") else None,
        )
        answer = await self._engine.score(query, _deadline(context))
        return score_response(answer)

    async def Rank(
        self, request: pb.RankRequest, context: grpc.aio.ServicerContext
    ) -> pb.RankResponse:
        query = RankQuery(
            tenant_id=request.tenant_id,
            account_id=request.account_id,
            candidates=[
                Candidate(
                    c.offer_id,
                    OfferEntry(c.product, c.value.amount_minor, dict(c.attributes)),
                )
                for c in request.candidates
            ],
            channel=int(request.channel),
            hour_of_day=request.hour_of_day if request.hour_of_day <= 23 else -1,
            occurred_at_us=_micros(request.occurred_at) if request.HasField("occurred_at") else 0,
        )
        answer = await self._engine.rank(query, _deadline(context))
        return pb.RankResponse(
            rank_id=answer.rank_id,
            offers=[
                pb.RankedOffer(
                    offer_id=o.offer_id,
                    propensity=o.propensity,
                    exploration_probability=o.exploration_probability,
                )
                for o in answer.offers
            ],
            chosen_offer_id=answer.chosen_offer_id,
            chosen_probability=answer.chosen_probability,
            model_ref=score_ref(answer, answer.rank_id),
            bandit_policy="linear_thompson_sampling",
        )

    async def Explain(
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExplainResponse:
        answer = self._engine.explain(request.tenant_id, request.score_id, request.top_k)
        full = score_response(answer)
        return pb.ExplainResponse(
            score_ref=full.score_ref, attributions=full.attributions, features=full.features
        )

    async def ReportOutcome(
        self, request: pb.ReportOutcomeRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportOutcomeResponse:
        applied = self._engine.report_outcome(
            request.tenant_id, request.rank_id, request.offer_id, request.reward, request.outcome_id
        )
        return pb.ReportOutcomeResponse(applied=applied)


def model_version_pb(record: ModelRecord) -> pb.ModelVersion:
    created = timestamp_pb2.Timestamp()
    created.FromMicroseconds(record.created_at_us)
    lineage = record.lineage
    return pb.ModelVersion(
        model=record.model,
        version=record.version,
        state=_STATE_TO_PB[record.state],
        artifact_sha256=record.artifact_sha256,
        lineage=pb.Lineage(
            generator_seed=int(lineage.get("generator_seed", 0)),
            generator_version=str(lineage.get("generator_version", "")),
            feature_set_version=str(lineage.get("feature_set_version", "")),
            code_version=str(lineage.get("code_version", "")),
            train_rows=int(lineage.get("train_rows", 0)),
            test_rows=int(lineage.get("test_rows", 0)),
            training_seed=int(lineage.get("training_seed", 0)),
        ),
        metrics=pb.ModelMetrics(
            roc_auc=record.metrics.get("roc_auc", 0.0),
            pr_auc=record.metrics.get("pr_auc", 0.0),
            positive_rate=record.metrics.get("positive_rate", 0.0),
        ),
        created_at=created,
        rollback_version=record.rollback_version,
        feature_names=record.feature_names,
    )


def _page(token: str) -> int:
    if not token:
        return 0
    try:
        return int(base64.urlsafe_b64decode(token.encode()).decode().removeprefix("v1:"))
    except ValueError as exc:
        raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not ours", "page_token") from exc


class RegistryServicer(ai_pb2_grpc.ModelRegistryServiceServicer):
    def __init__(self, manager: ModelManager, limits: AiLimitsConfig) -> None:
        self._manager = manager
        self._limits = limits

    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelVersionsResponse:
        if request.page_size < 0:
            raise InvalidArgument("INVALID_PAGE_SIZE", "page_size must be >= 0", "page_size")
        size = min(request.page_size or self._limits.default_page_size, self._limits.max_page_size)
        start = _page(request.page_token)
        self._manager.registry.reload()
        records = self._manager.registry.versions(request.model)
        page = records[start : start + size]
        more = start + size < len(records)
        token = base64.urlsafe_b64encode(f"v1:{start + size}".encode()).decode() if more else ""
        return pb.ListModelVersionsResponse(
            versions=[model_version_pb(r) for r in page], next_page_token=token
        )

    async def GetModelVersion(
        self, request: pb.GetModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelVersionResponse:
        self._manager.registry.reload()
        record = self._manager.registry.get(request.model, request.version)
        return pb.GetModelVersionResponse(version=model_version_pb(record))

    async def TrainModel(
        self, request: pb.TrainModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainModelResponse:
        record, created = await self._manager.train(request.model, request.seed)
        return pb.TrainModelResponse(version=model_version_pb(record), created=created)

    async def PromoteModel(
        self, request: pb.PromoteModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.PromoteModelResponse:
        target = _STATE_FROM_PB.get(request.target_state)
        if target is None:
            raise InvalidArgument(
                "TARGET_STATE_REQUIRED", "target_state is required", "target_state"
            )
        record = await self._manager.promote(request.model, request.version, target)
        return pb.PromoteModelResponse(version=model_version_pb(record))

    async def RollbackModel(
        self, request: pb.RollbackModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.RollbackModelResponse:
        record, seconds = await self._manager.rollback(request.model)
        return pb.RollbackModelResponse(live=model_version_pb(record), rollback_s=seconds)


def ai_services(engine: AiEngine, manager: ModelManager, limits: AiLimitsConfig) -> list[Service]:
    scoring = ScoringServicer(engine)
    registry = RegistryServicer(manager, limits)
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
