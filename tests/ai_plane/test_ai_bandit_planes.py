"""The plane's wiring of shared bandit learning, over gRPC: two AI planes on
real NATS and Redis (ai.bandit.pending_store redis, outcomes on the spine).
Rank through A, ReportOutcome through B: applied, and both planes hold the
same posterior; A stopped and started again resumes from the snapshot its
shutdown stored plus the stream after it. The planes share the session's
Triton (Rank scores the propensity there)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from ai_helpers import ai_config, bootstrapped

from ai_plane.app import AiPlane
from ai_plane.triton import TritonProcess
from triplane.ai.v1 import ai_pb2 as pb
from triplane.ai.v1 import ai_pb2_grpc
from triplane.runtime.config import Config
from triplane.runtime.tls import channel_for
from triplane_sim import synth

WAIT_S = 60.0
OFFERS = ["cashback_grocery", "savings_roundup", "loyalty_boost"]


@asynccontextmanager
async def plane(
    config: Config, triton: TritonProcess
) -> AsyncIterator[tuple[AiPlane, ai_pb2_grpc.ScoringServiceStub]]:
    running = AiPlane(config, listen="127.0.0.1:0", shared_triton=triton)
    await running.start()
    try:
        assert running.server is not None
        async with channel_for(config, f"127.0.0.1:{running.server.port}") as channel:
            yield running, ai_pb2_grpc.ScoringServiceStub(channel)
    finally:
        await running.stop()


def _state(p: AiPlane) -> dict[str, np.ndarray]:
    assert p.engine is not None
    return p.engine.bandit.state()


async def _caught_up(*planes: AiPlane) -> None:
    learners = [p.engine.learner for p in planes if p.engine is not None]
    target = max(learner.sequence for learner in learners)
    for learner in learners:
        await asyncio.wait_for(learner.wait_for(target), WAIT_S)


def _same(a: AiPlane, b: AiPlane) -> None:
    left, right = _state(a), _state(b)
    for key in left:
        assert np.array_equal(left[key], right[key]), key


def _rank_request(tenant: str, account: str) -> pb.RankRequest:
    candidates = []
    for offer in OFFERS:
        entry = synth.CATALOG[offer]
        candidates.append(
            pb.OfferCandidate(
                offer_id=offer,
                product=entry.product,
                attributes=dict(entry.attributes),
            )
        )
        candidates[-1].value.amount_minor = entry.value_minor
        candidates[-1].value.currency = "USD"
    return pb.RankRequest(
        tenant_id=tenant, account_id=account, candidates=candidates, hour_of_day=10
    )


async def test_rank_on_one_plane_report_on_another_and_resume_after_a_restart(
    shared_triton: TritonProcess, nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    namespace = f"bandit_planes_{uuid.uuid4().hex[:8]}"
    tenant = f"t{uuid.uuid4().hex[:10]}"
    settings = {
        "features": {"backend": "redis", "redis_url": redis_url, "namespace": namespace},
        "bandit": {"pending_store": "redis", "snapshot_interval_s": 0},
        "pipeline": {"enabled": False},
        # The Thompson bandit's wiring (the contextual learner's:
        # test_ai_learner_replicas.py).
        "learner": {"engine": "thompson"},
    }
    configs = [
        bootstrapped(ai_config(tmp_path / name, settings, nats_url=nats_url)) for name in "ab"
    ]
    async with plane(configs[1], shared_triton) as (b, scoring_b):
        async with plane(configs[0], shared_triton) as (a, scoring_a):
            ranked = await scoring_a.Rank(_rank_request(tenant, "acct-1"), timeout=5)
            outcome = pb.ReportOutcomeRequest(
                tenant_id=tenant,
                rank_id=ranked.rank_id,
                offer_id=ranked.chosen_offer_id,
                reward=1.0,
                outcome_id="o-1",
            )
            assert (await scoring_b.ReportOutcome(outcome, timeout=10)).applied is True
            assert (await scoring_a.ReportOutcome(outcome, timeout=10)).applied is False
            await _caught_up(a, b)
            assert a.engine is not None and a.engine.bandit.arm_count() >= 1
            _same(a, b)
        assert a.spine is not None
        covered = a.spine.learner.sequence
        # While A is down, B learns one more.
        ranked = await scoring_b.Rank(_rank_request(tenant, "acct-2"), timeout=5)
        more = pb.ReportOutcomeRequest(
            tenant_id=tenant,
            rank_id=ranked.rank_id,
            offer_id=ranked.chosen_offer_id,
            reward=0.0,
            outcome_id="o-2",
        )
        assert (await scoring_b.ReportOutcome(more, timeout=10)).applied is True
        async with plane(configs[0], shared_triton) as (again, _):
            assert again.spine is not None and again.spine.resumed_from == covered
            await _caught_up(again, b)
            _same(again, b)
