"""Through the real gRPC server, with a real Triton behind it."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from ai_helpers import payment

from ai_plane.app import AiPlane
from ai_plane.engine import ScoreQuery
from ai_plane.features import FEATURE_SET_VERSION, RISK_FEATURES, VELOCITY_FEATURES
from ai_plane.scorer import predict_in_process
from triplane.ai.v1 import ai_pb2 as pb
from triplane.ai.v1 import ai_pb2_grpc
from triplane.common.v1 import types_pb2
from triplane.runtime.deadline import Deadline
from triplane.runtime.status import parse_rpc_error
from triplane_sim import synth

OFFERS = ["cashback_grocery", "savings_roundup", "loyalty_boost", "partner_offer_x"]


def candidate(offer_id: str) -> pb.OfferCandidate:
    """A candidate as the gateway passes it: with its catalog entry (a
    partner's own offer borrows a synthetic one's)."""
    entry = synth.CATALOG.get(offer_id, synth.CATALOG["travel_insurance"])
    return pb.OfferCandidate(
        offer_id=offer_id,
        value=types_pb2.Money(amount_minor=entry.value_minor, currency="USD"),
        product=entry.product,
        attributes=dict(entry.attributes),
    )


async def test_score_comes_from_triton_with_attributions_and_features(
    scoring: ai_pb2_grpc.ScoringServiceStub,
) -> None:
    response = await scoring.Score(pb.ScoreRequest(payment=payment(), top_k=4), timeout=2)
    ref = response.score_ref
    assert (ref.model, ref.version, ref.source) == ("payment_risk", "1", "triton")
    assert 0.0 <= ref.score <= 1.0 and ref.score_id
    assert len(response.attributions) == 4
    contributions = [abs(a.contribution) for a in response.attributions]
    assert contributions == sorted(contributions, reverse=True)
    assert [f.name for f in response.features] == list(RISK_FEATURES + VELOCITY_FEATURES)
    assert response.feature_set_version == FEATURE_SET_VERSION
    assert response.fallback_reason == ""


async def test_triton_and_in_process_give_the_same_score(
    scoring: ai_pb2_grpc.ScoringServiceStub, running_plane: AiPlane
) -> None:
    response = await scoring.Score(pb.ScoreRequest(payment=payment()), timeout=2)
    assert running_plane.engine is not None
    model = running_plane.engine.scorer.models["payment_risk"]
    rows = np.asarray([[f.value for f in response.features][: len(RISK_FEATURES)]])
    scores, _ = predict_in_process(model.booster, rows)
    assert math.isclose(response.score_ref.score, float(scores[0]), rel_tol=1e-4)


async def test_explain_returns_the_attributions_of_a_past_score_for_its_tenant_only(
    scoring: ai_pb2_grpc.ScoringServiceStub,
) -> None:
    scored = await scoring.Score(pb.ScoreRequest(payment=payment(tenant_id="t-exp")), timeout=2)
    explained = await scoring.Explain(
        pb.ExplainRequest(tenant_id="t-exp", score_id=scored.score_ref.score_id, top_k=8)
    )
    assert explained.score_ref == scored.score_ref
    assert len(explained.attributions) == 8
    assert explained.attributions[0] == scored.attributions[0]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scoring.Explain(
            pb.ExplainRequest(tenant_id="other", score_id=scored.score_ref.score_id)
        )
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert parse_rpc_error(caught.value) == ("SCORE_NOT_FOUND", "score_id")


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("account_id", "4111111111111111", "payment.account_id"),
        ("device_id", "someone@example.com", "payment.device_id"),
        ("attributes", {"contact": "+1 415 555 2671"}, "payment.attributes[contact]"),
        ("attributes", {"pan": "5500 0055 5555 5559"}, "payment.attributes[pan]"),
    ],
)
async def test_raw_pii_is_refused_naming_the_field(
    scoring: ai_pb2_grpc.ScoringServiceStub, field: str, value: object, named: str
) -> None:
    request = pb.ScoreRequest(payment=payment(**{field: value}))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scoring.Score(request, timeout=2)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert parse_rpc_error(caught.value) == ("RAW_PII_REFUSED", named)


async def test_bad_requests_are_invalid_argument(scoring: ai_pb2_grpc.ScoringServiceStub) -> None:
    cases = [
        (pb.ScoreRequest(payment=payment(account_id="")), ("FIELD_REQUIRED", "payment.account_id")),
        (pb.ScoreRequest(payment=payment(), model="nope"), ("UNKNOWN_MODEL", "model")),
        (pb.ScoreRequest(payment=payment(), top_k=1000), ("TOP_K_TOO_LARGE", "top_k")),
        (
            pb.ScoreRequest(payment=payment(account_id="a" * 65)),
            ("FIELD_TOO_LONG", "payment.account_id"),
        ),
    ]
    for request, expected in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await scoring.Score(request, timeout=2)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert parse_rpc_error(caught.value) == expected


async def test_rank_logs_exploration_probabilities_and_outcomes_update_once(
    scoring: ai_pb2_grpc.ScoringServiceStub,
) -> None:
    request = pb.RankRequest(
        tenant_id="t-rank",
        account_id="acct_000002",
        candidates=[candidate(o) for o in OFFERS],
        hour_of_day=19,
    )
    # Triton 2.51's batcher now and then holds a lone request past the budget
    # (that answer falls back, as it must); the first Triton answer is the one.
    for _ in range(5):
        ranked = await scoring.Rank(request, timeout=2)
        if ranked.model_ref.source == "triton":
            break
    assert ranked.model_ref.source == "triton" and ranked.model_ref.model == "offer_propensity"
    assert {o.offer_id for o in ranked.offers} == set(OFFERS)
    propensities = [o.propensity for o in ranked.offers]
    assert propensities == sorted(propensities, reverse=True)
    assert math.isclose(sum(o.exploration_probability for o in ranked.offers), 1.0)
    chosen = next(o for o in ranked.offers if o.offer_id == ranked.chosen_offer_id)
    assert ranked.chosen_probability == chosen.exploration_probability > 0
    outcome = pb.ReportOutcomeRequest(
        tenant_id="t-rank",
        rank_id=ranked.rank_id,
        offer_id=ranked.chosen_offer_id,
        reward=1.0,
        outcome_id=f"out-{ranked.rank_id}",
    )
    assert (await scoring.ReportOutcome(outcome)).applied is True
    assert (await scoring.ReportOutcome(outcome)).applied is False
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scoring.ReportOutcome(
            pb.ReportOutcomeRequest(
                tenant_id="t-rank", rank_id="nope", offer_id="x", outcome_id="o2"
            )
        )
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_a_deadline_shorter_than_the_planes_own_budget_is_answered_without_triton(
    running_plane: AiPlane,
) -> None:
    # 1 ms of deadline is less than the plane's own budget (ai.budget_ms, 2):
    # nothing is left for Triton, so the plane does not call it and answers
    # at once from the in-process copy of the live model, saying why.
    assert running_plane.engine is not None
    assert running_plane.config.ai.budget_ms > 1
    query = ScoreQuery(
        tenant_id="t-deadline", account_id="acct_1", amount_minor=12_000, merchant_category="5816"
    )
    answer = await running_plane.engine.score(query, Deadline.from_remaining(0.001))
    assert (answer.source, answer.fallback_reason) == ("in_process", "DEADLINE_TOO_SHORT")
    assert answer.version == 1
    model = running_plane.engine.scorer.models["payment_risk"]
    rows = np.asarray([[value for _, value in answer.features][: len(RISK_FEATURES)]])
    assert answer.score == float(predict_in_process(model.booster, rows)[0][0])


async def test_registry_lists_and_gets_versions(
    registry_stub: ai_pb2_grpc.ModelRegistryServiceStub,
) -> None:
    listed = await registry_stub.ListModelVersions(pb.ListModelVersionsRequest(page_size=1))
    assert len(listed.versions) == 1 and listed.next_page_token
    rest = await registry_stub.ListModelVersions(
        pb.ListModelVersionsRequest(page_size=1, page_token=listed.next_page_token)
    )
    assert rest.versions[0].model != listed.versions[0].model
    live = await registry_stub.GetModelVersion(pb.GetModelVersionRequest(model="payment_risk"))
    version = live.version
    assert version.state == pb.MODEL_STATE_LIVE
    assert version.metrics.roc_auc > 0.9 and len(version.artifact_sha256) == 64
    assert version.lineage.generator_version == synth.GENERATOR_VERSION
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry_stub.PromoteModel(
            pb.PromoteModelRequest(
                model="payment_risk", version=1, target_state=pb.MODEL_STATE_LIVE
            )
        )
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION


async def test_drift_psi_is_exported(
    running_plane: AiPlane, scoring: ai_pb2_grpc.ScoringServiceStub
) -> None:
    from prometheus_client import REGISTRY

    for i in range(60):
        await scoring.Score(pb.ScoreRequest(payment=payment(amount_minor=100 + i)), timeout=2)
    value = REGISTRY.get_sample_value(
        "triplane_ai_psi", {"model": "payment_risk", "version": "1", "series": "score"}
    )
    assert value is not None and value >= 0.0
