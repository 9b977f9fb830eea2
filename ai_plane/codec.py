"""Translation between triplane.ai.v1 protobuf messages and the engine's and
registry's values (no grpc import: the messages only). Times and pages are
read and written by the runtime's one vocabulary (`wire`)."""

from __future__ import annotations

import math

from ai_plane.engine import Candidate, RankAnswer, RankQuery, ScoreAnswer, ScoreQuery
from ai_plane.features import OfferEntry
from ai_plane.registry import ModelRecord, ModelState
from ai_plane.scorer import SOURCE_NONE
from triplane.ai.v1 import ai_pb2 as pb
from triplane.common.v1 import types_pb2
from triplane.runtime import codec as wire
from triplane.runtime.errors import InvalidArgument

# The one list this plane pages (ListModelVersions), resumed at an offset.
MODEL_VERSIONS_PAGE = "ai.model_versions"
BANDIT_POLICY = "linear_thompson_sampling"

STATE_TO_PB: dict[ModelState, pb.ModelState.ValueType] = {
    ModelState.DRAFT: pb.MODEL_STATE_DRAFT,
    ModelState.APPROVED: pb.MODEL_STATE_APPROVED,
    ModelState.LIVE: pb.MODEL_STATE_LIVE,
    ModelState.RETIRED: pb.MODEL_STATE_RETIRED,
}
STATE_FROM_PB: dict[pb.ModelState.ValueType, ModelState] = {v: k for k, v in STATE_TO_PB.items()}


def score_query(request: pb.ScoreRequest) -> ScoreQuery:
    p = request.payment
    return ScoreQuery(
        tenant_id=p.tenant_id,
        account_id=p.account_id,
        amount_minor=p.amount.amount_minor,
        currency=p.amount.currency,
        device_id=p.device_id,
        merchant_id=p.merchant_id,
        merchant_category=p.merchant_category,
        channel=int(p.channel),
        occurred_at_us=wire.micros(p.occurred_at, "payment.occurred_at"),
        attributes=dict(p.attributes),
        model=request.model,
        top_k=request.top_k,
        local_hour=p.local_hour if p.HasField("local_hour") else None,
    )


def rank_query(request: pb.RankRequest) -> RankQuery:
    return RankQuery(
        tenant_id=request.tenant_id,
        account_id=request.account_id,
        candidates=[
            Candidate(
                c.offer_id,
                OfferEntry(c.product, c.value.amount_minor, dict(c.attributes)),
                c.lever,
            )
            for c in request.candidates
        ],
        channel=int(request.channel),
        hour_of_day=request.hour_of_day if request.hour_of_day <= 23 else -1,
        occurred_at_us=wire.micros(request.occurred_at, "occurred_at"),
        features=dict(request.features),
        surface=request.surface,
        region=request.region,
        held_out=request.held_out,
    )


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


def explain_response(answer: ScoreAnswer) -> pb.ExplainResponse:
    full = score_response(answer)
    return pb.ExplainResponse(
        score_ref=full.score_ref, attributions=full.attributions, features=full.features
    )


def rank_response(answer: RankAnswer) -> pb.RankResponse:
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
        bandit_policy=answer.policy,
    )


def target_state(value: pb.ModelState.ValueType) -> ModelState:
    target = STATE_FROM_PB.get(value)
    if target is None:
        raise InvalidArgument("TARGET_STATE_REQUIRED", "target_state is required", "target_state")
    return target


def model_version_pb(record: ModelRecord) -> pb.ModelVersion:
    lineage = record.lineage
    return pb.ModelVersion(
        model=record.model,
        version=record.version,
        state=STATE_TO_PB[record.state],
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
        created_at=wire.timestamp(record.created_at_us),
        rollback_version=record.rollback_version,
        feature_names=record.feature_names,
        approvals=[
            pb.ModelApproval(
                state=STATE_TO_PB[a.state],
                rollback=a.rollback,
                actor=a.actor,
                reason=a.reason,
                at=wire.timestamp(a.at_us),
            )
            for a in record.approvals
        ],
    )
