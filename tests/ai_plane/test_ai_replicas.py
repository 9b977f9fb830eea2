"""Two AI plane replicas on one PostgreSQL registry, each with its own
tritonserver and the Redis feature store (ai.replicas 2): a version trained
and promoted through replica A is served by replica B from B's own Triton,
materialized from the artifact bytes stored in the registry; a rollback
through A reaches B the same way. B follows the registry's generation (poll
ai.registry.poll_interval_s); the test waits for B to report the switch, then
checks the version B's scores carry. A replica with the in-process feature
store refuses to start once ai.replicas is above 1."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from ai_helpers import ai_config, bootstrapped, payment, require_triton

from ai_plane.app import AiPlane, datasets_dir
from ai_plane.training import dataset_path
from tests.conftest import create_pg_database, drop_pg_database
from triplane.ai.v1 import ai_pb2 as pb
from triplane.ai.v1 import ai_pb2_grpc
from triplane.common.v1 import types_pb2
from triplane.runtime.config import Config
from triplane.runtime.tls import channel_for
from triplane_tools.models import write_datasets

MODEL = "payment_risk"
# Generous: loading a version into a Triton on the shared 2-core machine.
SWITCH_WAIT_S = 180.0


@pytest.fixture(scope="module")
def registry_dsn(pg_admin_dsn: str) -> Iterator[str]:
    dsn = create_pg_database(pg_admin_dsn, "triplane_ai_registry")
    try:
        yield dsn
    finally:
        drop_pg_database(pg_admin_dsn, dsn)


def _replica_config(state: Path, dsn: str, redis_url: str, namespace: str) -> Config:
    return ai_config(
        state,
        {
            "replicas": 2,
            "registry": {"backend": "postgres", "postgres_dsn": dsn, "poll_interval_s": 0.2},
            "features": {"backend": "redis", "redis_url": redis_url, "namespace": namespace},
        },
    )


@pytest.fixture(scope="module")
async def replicas(
    registry_dsn: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[AiPlane, AiPlane]]:
    require_triton()
    namespace = f"replicas_{uuid.uuid4().hex[:8]}"
    configs = [
        _replica_config(tmp_path_factory.mktemp(f"ai_{name}"), registry_dsn, redis_url, namespace)
        for name in "ab"
    ]
    bootstrapped(configs[0])  # v1 of each model, trained by A's tools into the shared registry
    planes = [AiPlane(config, listen="127.0.0.1:0") for config in configs]
    started: list[AiPlane] = []
    try:
        for plane in planes:  # each starts its own tritonserver
            await plane.start()
            started.append(plane)
            assert plane.triton_process is not None, "its own Triton must run"
        yield planes[0], planes[1]
    finally:
        for plane in reversed(started):
            await plane.stop()


async def _stubs(
    plane: AiPlane,
) -> tuple[grpc.aio.Channel, ai_pb2_grpc.ScoringServiceStub, ai_pb2_grpc.ModelRegistryServiceStub]:
    assert plane.server is not None
    channel = channel_for(plane.config, f"127.0.0.1:{plane.server.port}")
    return (
        channel,
        ai_pb2_grpc.ScoringServiceStub(channel),
        ai_pb2_grpc.ModelRegistryServiceStub(channel),
    )


async def _scored_by_triton(plane: AiPlane) -> types_pb2.ModelScoreRef:
    channel, scoring, _ = await _stubs(plane)
    async with channel:
        for _ in range(5):  # see test_ai_main: a rare ~500 ms hold in Triton's batcher
            response = await scoring.Score(pb.ScoreRequest(payment=payment()), timeout=5)
            if response.score_ref.source == "triton":
                break
        assert response.score_ref.source == "triton", response.fallback_reason
        return response.score_ref


async def _switched(plane: AiPlane, version: int) -> None:
    assert plane.manager is not None
    await asyncio.wait_for(plane.manager.wait_serving(MODEL, version), SWITCH_WAIT_S)


async def test_a_promotion_through_one_replica_is_served_by_the_other(
    replicas: tuple[AiPlane, AiPlane],
) -> None:
    a, b = replicas
    assert (await _scored_by_triton(b)).version == "1"
    write_datasets(a.config, 8, [MODEL])
    channel, _, registry = await _stubs(a)
    async with channel:
        trained = await registry.TrainModel(pb.TrainModelRequest(model=MODEL, seed=8), timeout=120)
        version = trained.version.version
        assert trained.created and version == 2
        for target in (pb.MODEL_STATE_APPROVED, pb.MODEL_STATE_LIVE):
            await registry.PromoteModel(
                pb.PromoteModelRequest(model=MODEL, version=version, target_state=target),
                timeout=120,
            )
    assert (await _scored_by_triton(a)).version == "2"
    await _switched(b, 2)
    # B's own Triton has it, from the registry's bytes (B never trained it).
    assert b.triton_process is not None
    materialized = b.triton_process.repository.root / MODEL / "2" / "model.txt"
    assert materialized.exists()
    assert not dataset_path(datasets_dir(b.config), MODEL, 8).exists()
    assert (await _scored_by_triton(b)).version == "2"


async def test_a_rollback_through_one_replica_reaches_the_other(
    replicas: tuple[AiPlane, AiPlane],
) -> None:
    a, b = replicas
    channel, _, registry = await _stubs(a)
    async with channel:
        rolled = await registry.RollbackModel(pb.RollbackModelRequest(model=MODEL), timeout=120)
    assert rolled.live.version == 1
    await _switched(b, 1)
    assert (await _scored_by_triton(b)).version == "1"
    assert (await _scored_by_triton(a)).version == "1"


def test_in_process_features_with_replicas_refuse_to_start(tmp_path: Path) -> None:
    """`python -m ai_plane` exits before serving, naming the key."""
    env = {
        **os.environ,
        "TRIPLANE_STATE_DIR": str(tmp_path),
        "TRIPLANE__AI__REPLICAS": "3",
        "TRIPLANE__AI__FEATURES__BACKEND": "in_process",
        "TRIPLANE_AI_DSN": "host=127.0.0.1 dbname=unused",
    }
    env.pop("TRIPLANE_CONFIG", None)
    finished = subprocess.run(
        [sys.executable, "-m", "ai_plane"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode != 0
    assert "ai.features.backend 'in_process' with ai.replicas 3" in finished.stderr


async def test_a_drift_point_recorded_by_one_replica_is_served_by_the_other(
    replicas: tuple[AiPlane, AiPlane],
) -> None:
    """The drift history is shared: A's recomputations, written to the
    registry's PostgreSQL, are in B's GetModelDrift (B scored none of them)."""
    a, b = replicas
    assert a.manager is not None and b.manager is not None
    await _switched(b, a.manager.serving_version(MODEL))
    channel, scoring, registry = await _stubs(a)
    async with channel:
        for index in range(a.config.ai.drift.update_every_scores):
            await scoring.Score(
                pb.ScoreRequest(payment=payment(account_id=f"acct_{index % 20:06d}")), timeout=10
            )
        seen_by_a = await registry.GetModelDrift(pb.GetModelDriftRequest(model=MODEL))
    newest = {s.series: s.history[-1] for s in seen_by_a.series}
    assert "score" in newest
    assert await a.manager.flush_drift() >= 1
    assert not b.manager.engine.pending_drift(MODEL, seen_by_a.version)
    channel, _, registry = await _stubs(b)
    async with channel:
        seen_by_b = await registry.GetModelDrift(pb.GetModelDriftRequest(model=MODEL))
    assert seen_by_b.version == seen_by_a.version
    by_b = {s.series: s for s in seen_by_b.series}
    for series, point in newest.items():
        assert point in by_b[series].history, series
    # The window "now" is each replica's own: B served few scores, A these.
    observed_by_a = {s.series: s.observed for s in seen_by_a.series}
    assert by_b["score"].observed < observed_by_a["score"]
