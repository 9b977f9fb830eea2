"""Drift over time: each PSI recomputation is kept with its time (bounded),
and GetModelDrift serves the live version's series, now and their history."""

from __future__ import annotations

import random

import grpc
import pytest
from ai_helpers import payment

from ai_plane.app import AiPlane
from ai_plane.drift import PsiMonitor, baseline
from triplane.ai.v1 import ai_pb2 as pb
from triplane.ai.v1 import ai_pb2_grpc
from triplane.runtime.clock import ManualClock
from triplane.runtime.status import parse_rpc_error


def test_each_recomputation_is_kept_with_its_time_and_the_oldest_go() -> None:
    rng = random.Random(3)
    edges, expected = baseline([rng.gauss(0, 1) for _ in range(2000)], 10)
    clock = ManualClock(1_000_000)
    monitor = PsiMonitor(
        "m", 4, "score", edges, expected, window=500, every=100, history=3, now_us=clock.now_us
    )
    for step in range(5):
        clock.advance(60.0)
        for _ in range(100):
            # Drifting away, step by step.
            monitor.observe(rng.gauss(0.5 * step, 1))
    assert [at for at, _ in monitor.history] == [
        1_000_000 + 180_000_000,
        1_000_000 + 240_000_000,
        1_000_000 + 300_000_000,
    ]
    values = [value for _, value in monitor.history]
    assert values == sorted(values) and values[-1] == monitor.value > 0.25
    assert monitor.observed == 500
    # Without a history bound nothing is kept (the gauge alone).
    bare = PsiMonitor("m", 4, "score", edges, expected, window=500, every=100)
    for _ in range(200):
        bare.observe(rng.gauss(0, 1))
    assert not bare.history and bare.value > 0


async def test_get_model_drift_serves_the_live_series_and_their_history(
    running_plane: AiPlane,
    scoring: ai_pb2_grpc.ScoringServiceStub,
    registry_stub: ai_pb2_grpc.ModelRegistryServiceStub,
) -> None:
    every = running_plane.config.ai.drift.update_every_scores
    before = await registry_stub.GetModelDrift(pb.GetModelDriftRequest(model="payment_risk"))
    live = await registry_stub.GetModelVersion(pb.GetModelVersionRequest(model="payment_risk"))
    assert before.version == live.version.version
    recorded = {s.series: len(s.history) for s in before.series}
    assert "score" in recorded
    for index in range(2 * every):
        await scoring.Score(
            pb.ScoreRequest(payment=payment(account_id=f"acct_{index % 40:06d}")), timeout=10
        )
    after = await registry_stub.GetModelDrift(pb.GetModelDriftRequest(model="payment_risk"))
    series = {s.series: s for s in after.series}
    assert set(series) == set(recorded)
    score = series["score"]
    assert len(score.history) == min(
        recorded["score"] + 2, running_plane.config.ai.drift.history_points
    )
    assert score.observed >= 2 * every and score.psi == score.history[-1].psi >= 0
    times = [p.at.ToMicroseconds() for p in score.history]
    assert times == sorted(times)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry_stub.GetModelDrift(pb.GetModelDriftRequest(model="nope"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert parse_rpc_error(caught.value) == ("UNKNOWN_MODEL", "model")
