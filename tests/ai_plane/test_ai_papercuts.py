"""The AI plane checks tenant ids by the rule every plane applies (it used to
check only their length). The engine is built as the plane builds it, with no
Triton and no live model: the check comes before any scoring."""

from __future__ import annotations

from pathlib import Path

import pytest
from ai_helpers import ai_config

from ai_plane.bandit import LinearThompsonBandit
from ai_plane.breaker import CircuitBreaker
from ai_plane.engine import AiEngine, Candidate, RankQuery, ScoreQuery
from ai_plane.features import OfferEntry
from ai_plane.scorer import Scorer
from ai_plane.store.base import build_store
from triplane.runtime.clock import ManualClock
from triplane.runtime.deadline import Deadline
from triplane.runtime.errors import InvalidArgument

BAD_TENANT_IDS = ["Upper.Case:x", "a.b", "a*", "a>", "a b"]


@pytest.fixture
def engine(state_dir: Path) -> AiEngine:
    ai = ai_config(state_dir).ai
    clock = ManualClock()
    breaker = CircuitBreaker(
        ai.breaker.failure_threshold,
        ai.breaker.open_s,
        failure_rate=ai.breaker.failure_rate,
        window_s=ai.breaker.window_s,
    )
    bandit = LinearThompsonBandit(
        ai.bandit.prior_variance,
        ai.bandit.noise_variance,
        ai.bandit.probability_samples,
        ai.bandit.seed,
    )
    return AiEngine(
        ai, build_store(ai.features, clock), Scorer(ai, None, breaker, clock), bandit, clock
    )


@pytest.mark.parametrize("tenant_id", BAD_TENANT_IDS)
async def test_tenant_ids_follow_the_rule_every_plane_applies(
    engine: AiEngine, tenant_id: str
) -> None:
    deadline = Deadline.from_remaining(1.0)
    score = ScoreQuery(tenant_id=tenant_id, account_id="acct-1", amount_minor=100, currency="USD")
    calls = [
        (engine.score(score, deadline), "payment.tenant_id"),
        (
            engine.rank(
                RankQuery(
                    tenant_id=tenant_id,
                    account_id="acct-1",
                    candidates=[
                        Candidate(
                            offer_id="cashback_1",
                            entry=OfferEntry(product="cashback", value_minor=500),
                        )
                    ],
                ),
                deadline,
            ),
            "tenant_id",
        ),
        (engine.report_outcome(tenant_id, "rank_1", "cashback_1", 1.0, "outcome_1"), "tenant_id"),
    ]
    for call, field in calls:
        with pytest.raises(InvalidArgument) as caught:
            await call
        assert (caught.value.reason, caught.value.field) == ("INVALID_TENANT_ID", field)
    with pytest.raises(InvalidArgument) as caught:
        engine.explain(tenant_id, "score_1", 0)
    assert (caught.value.reason, caught.value.field) == ("INVALID_TENANT_ID", "tenant_id")
