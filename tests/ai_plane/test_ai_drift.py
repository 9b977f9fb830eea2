"""Drift over time: each PSI recomputation is a point of the model's drift
history (the latest per model, version, series and time slot), written to
where the model registry keeps its shared state, so any replica serves what
another recorded and a restart keeps it; GetModelDrift serves the live
version's series, now and their history."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from ai_helpers import ai_config, payment

from ai_plane.app import AiPlane, registry_dir
from ai_plane.bandit import LinearThompsonBandit
from ai_plane.breaker import CircuitBreaker
from ai_plane.drift import DriftPoint, PsiMonitor, baseline
from ai_plane.engine import AiEngine
from ai_plane.manager import ModelManager
from ai_plane.registry import Registry
from ai_plane.scorer import Scorer
from ai_plane.store.base import build_store
from triplane.ai.v1 import ai_pb2 as pb
from triplane.ai.v1 import ai_pb2_grpc
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config
from triplane.runtime.db import Database, DatabaseClosed
from triplane.runtime.status import parse_rpc_error

SLOT_US = 60_000_000


def test_a_monitor_keeps_the_latest_recomputation_of_each_slot_until_taken() -> None:
    rng = random.Random(3)
    edges, expected = baseline([rng.gauss(0, 1) for _ in range(2000)], 10)
    clock = ManualClock(1_000_000)
    monitor = PsiMonitor(
        "m",
        4,
        "score",
        edges,
        expected,
        window=500,
        every=100,
        slot_us=SLOT_US,
        now_us=clock.now_us,
    )
    for step in range(3):
        clock.advance(60.0)
        for _ in range(200):  # two recomputations per slot: the later one stays
            monitor.observe(rng.gauss(0.5 * step, 1))
    taken = monitor.take_pending()
    assert [(p.slot, p.at_us) for p in taken] == [
        (1, 61_000_000),
        (2, 121_000_000),
        (3, 181_000_000),
    ]
    assert {(p.model, p.version, p.series) for p in taken} == {("m", 4, "score")}
    values = [p.psi for p in taken]
    assert values == sorted(values) and values[-1] == monitor.value > 0.25
    assert not monitor.pending  # taken: written by the plane, not kept here
    # A failed write hands them back; a newer value of a slot recorded meanwhile stays.
    for _ in range(100):
        monitor.observe(rng.gauss(0, 1))
    newer = monitor.pending[3]
    monitor.keep(taken)
    assert monitor.pending == {1: (61_000_000, values[0]), 2: (121_000_000, values[1]), 3: newer}
    # Without a slot nothing is kept (the gauge alone).
    bare = PsiMonitor("m", 4, "score", edges, expected, window=500, every=100)
    for _ in range(200):
        bare.observe(rng.gauss(0, 1))
    assert not bare.pending and bare.value > 0


@pytest.fixture(params=["file", "sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    if request.param == "file":
        yield "file", ""
    elif request.param == "sqlite":
        yield "sqlite", str(tmp_path / "registry.db")
    else:
        yield "postgres", request.getfixturevalue("pg_dsn")


def _open(root: Path, backend: tuple[str, str]) -> Registry:
    kind, where = backend
    if kind == "file":
        return Registry(root, ManualClock())
    return Registry(root, ManualClock(), kind, Database(kind, where, readers=1))


def _point(slot: int, psi: float, series: str = "score", version: int = 2) -> DriftPoint:
    return DriftPoint("payment_risk", version, series, slot, slot * SLOT_US + 5, psi)


def test_a_point_recorded_by_one_replica_is_served_by_another_and_survives_a_restart(
    tmp_path: Path, backend: tuple[str, str]
) -> None:
    # The file backend is one pod's own: its "other replica" is the same pod
    # reopening its registry directory.
    shared = backend[0] == "file"
    a = _open(tmp_path / "a", backend)
    b = _open(tmp_path / ("a" if shared else "b"), backend)
    try:
        a.record_drift([_point(10, 0.1), _point(10, 0.3, "amount_minor")], keep=3)
        history = b.drift_history("payment_risk", 2)
        assert history == {
            "amount_minor": [_point(10, 0.3, "amount_minor")],
            "score": [_point(10, 0.1)],
        }
        # Both replicas recompute in slot 11: one point, the later write.
        a.record_drift([_point(11, 0.2)], keep=3)
        b.record_drift([_point(11, 0.25)], keep=3)
        assert [p.psi for p in a.drift_history("payment_risk", 2)["score"]] == [0.1, 0.25]
        # Another version's points are its own.
        b.record_drift([_point(11, 0.9, version=3)], keep=3)
        assert [p.psi for p in a.drift_history("payment_risk", 3)["score"]] == [0.9]
        # Bounded: the last `keep` slots per model (slot 10 goes when 13 comes).
        a.record_drift([_point(12, 0.3), _point(13, 0.4)], keep=3)
        assert [p.slot for p in b.drift_history("payment_risk", 2)["score"]] == [11, 12, 13]
        assert "amount_minor" not in b.drift_history("payment_risk", 2)
    finally:
        a.close()
        b.close()
    reopened = _open(tmp_path / "a", backend)
    try:
        assert [p.psi for p in reopened.drift_history("payment_risk", 2)["score"]] == [
            0.25,
            0.3,
            0.4,
        ]
    finally:
        reopened.close()


async def test_get_model_drift_serves_the_live_series_and_their_written_history(
    running_plane: AiPlane,
    scoring: ai_pb2_grpc.ScoringServiceStub,
    registry_stub: ai_pb2_grpc.ModelRegistryServiceStub,
) -> None:
    assert running_plane.manager is not None
    every = running_plane.config.ai.drift.update_every_scores
    before = await registry_stub.GetModelDrift(pb.GetModelDriftRequest(model="payment_risk"))
    live = await registry_stub.GetModelVersion(pb.GetModelVersionRequest(model="payment_risk"))
    assert before.version == live.version.version
    assert "score" in {s.series for s in before.series}
    for index in range(2 * every):
        await scoring.Score(
            pb.ScoreRequest(payment=payment(account_id=f"acct_{index % 40:06d}")), timeout=10
        )
    after = await registry_stub.GetModelDrift(pb.GetModelDriftRequest(model="payment_risk"))
    series = {s.series: s for s in after.series}
    assert set(series) == {s.series for s in before.series}
    score = series["score"]
    # This replica's newest recomputation is the last point, written or not.
    assert score.history and score.psi == score.history[-1].psi >= 0
    assert score.observed >= 2 * every
    times = [p.at.ToMicroseconds() for p in score.history]
    assert times == sorted(times)

    # Written to the registry's store: a restarted plane (a fresh registry on
    # the same directory) reads the same history.
    await running_plane.manager.flush_drift()
    assert not running_plane.manager.engine.pending_drift("payment_risk", after.version)
    stored = Registry(registry_dir(running_plane.config), ManualClock())
    written = stored.drift_history("payment_risk", after.version)["score"]
    assert [(p.at_us, p.psi) for p in written] == [
        (p.at.ToMicroseconds(), p.psi) for p in score.history
    ]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry_stub.GetModelDrift(pb.GetModelDriftRequest(model="nope"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert parse_rpc_error(caught.value) == ("UNKNOWN_MODEL", "model")


def _engine(config: Config, clock: ManualClock) -> AiEngine:
    ai = config.ai
    breaker = CircuitBreaker(ai.breaker.failure_threshold, ai.breaker.open_s)
    bandit = LinearThompsonBandit(
        ai.bandit.prior_variance,
        ai.bandit.noise_variance,
        ai.bandit.probability_samples,
        ai.bandit.seed,
    )
    return AiEngine(
        ai, build_store(ai.features, clock), Scorer(ai, None, breaker, clock), bandit, clock
    )


async def test_two_engines_on_one_store_share_the_history_and_a_failed_write_is_kept(
    state_dir: Path, tmp_path: Path
) -> None:
    """Two replicas' engines, each with its manager, on one SQLite registry:
    what one recorded the other serves; a write that fails leaves the points
    pending for the next; a new live version's predecessor's points still go
    out."""
    config = ai_config(state_dir)
    rng = random.Random(5)
    edges, expected = baseline([rng.gauss(0, 1) for _ in range(2000)], 10)
    every = config.ai.drift.update_every_scores
    clock = ManualClock(1_700_000_000_000_000)
    db_path = str(tmp_path / "registry.db")

    def manager(name: str) -> ModelManager:
        engine = _engine(config, clock)
        engine.set_drift_baselines("payment_risk", 3, {"score": [edges, expected]})
        registry = Registry(
            tmp_path / name, clock, "sqlite", Database("sqlite", db_path, readers=1)
        )
        return ModelManager(config.ai, registry, engine, None, None, tmp_path / "datasets")

    def score(replica: ModelManager, shift: float) -> None:
        monitor = replica.engine.drift["payment_risk"]["score"]
        for _ in range(every):
            monitor.observe(rng.gauss(shift, 1))

    a, b = manager("a"), manager("b")
    try:
        score(a, 0.0)
        assert await a.flush_drift() == 1
        [(at_us, value)] = (await b.drift_history("payment_risk", 3))["score"]
        assert at_us == clock.now_us() and value == a.engine.drift["payment_risk"]["score"].value
        # The same slot from B: one point, B's later value.
        clock.advance(1.0)
        score(b, 1.0)
        await b.flush_drift()
        [(at_us, value)] = (await a.drift_history("payment_risk", 3))["score"]
        assert at_us == clock.now_us() and value == b.engine.drift["payment_risk"]["score"].value

        # The store is gone: the write fails, the point stays pending (and served).
        clock.advance(config.ai.drift.history_slot_s)
        score(a, 2.0)
        a.registry.close()
        with pytest.raises(DatabaseClosed):
            await a.flush_drift()
        pending = a.engine.pending_drift("payment_risk", 3)
        assert [p.at_us for p in pending] == [clock.now_us()]
        a.registry = Registry(
            tmp_path / "a", clock, "sqlite", Database("sqlite", db_path, readers=1)
        )
        # A new live version: the old one's point is still written.
        a.engine.set_drift_baselines("payment_risk", 4, {"score": [edges, expected]})
        assert await a.flush_drift() == 1
        history = (await b.drift_history("payment_risk", 3))["score"]
        assert [at for at, _ in history] == [clock.now_us() - 300_000_000, clock.now_us()]
    finally:
        a.registry.close()
        b.registry.close()
