"""Against a Triton that the plane started itself: rollback without restart,
then a slowed Triton (SIGSTOP), the circuit breaker, and a killed Triton.
The tests run in file order on one plane; the kill comes last.

Where a deadline is the behaviour under test, the tests assert the answer's
source and fallback reason, not wall time (the tail is make bench's job)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from ai_helpers import ai_config, bootstrapped, payment, require_triton

from ai_plane.app import AiPlane, registry_dir
from ai_plane.breaker import BreakerState, CircuitBreaker
from ai_plane.scorer import Scorer
from ai_plane.triton import TritonProcess
from ai_plane.triton_grpc import TritonClient
from triplane.ai.v1 import ai_pb2 as pb
from triplane.ai.v1 import ai_pb2_grpc
from triplane.runtime.clock import SystemClock
from triplane.runtime.deadline import Deadline
from triplane.runtime.net import free_port
from triplane.runtime.tls import channel_for
from triplane_tools.models import write_datasets

SCORE_TIMEOUT_MS = 40.0
OPEN_S = 0.5
# A second dataset, for a draft that differs from the bootstrapped version.
OTHER_SEED = 5


@pytest.fixture(scope="module", params=["grpc", "http"])
async def plane(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AiPlane]:
    """The plane with its own Triton, over each inference transport."""
    require_triton()
    config = ai_config(
        tmp_path_factory.mktemp("ai_faults"),
        {
            "triton_protocol": request.param,
            "triton": {"score_timeout_ms": SCORE_TIMEOUT_MS},
            "breaker": {"failure_threshold": 3, "open_s": OPEN_S},
        },
    )
    write_datasets(bootstrapped(config), OTHER_SEED)
    plane = AiPlane(config, listen="127.0.0.1:0")
    await plane.start()
    assert plane.engine is not None and plane.engine.scorer.triton is not None
    assert (plane.engine.scorer.triton.http is not None) == (request.param == "http")
    try:
        yield plane
    finally:
        await plane.stop()
        assert plane.triton_process is None or not plane.triton_process.alive()


@pytest.fixture(scope="module")
async def stubs(
    plane: AiPlane,
) -> AsyncIterator[tuple[ai_pb2_grpc.ScoringServiceStub, ai_pb2_grpc.ModelRegistryServiceStub]]:
    assert plane.server is not None
    async with channel_for(plane.config, f"127.0.0.1:{plane.server.port}") as channel:
        yield ai_pb2_grpc.ScoringServiceStub(channel), ai_pb2_grpc.ModelRegistryServiceStub(channel)


def _process(plane: AiPlane) -> TritonProcess:
    assert plane.triton_process is not None and plane.triton_process.alive()
    return plane.triton_process


async def _score(scoring: ai_pb2_grpc.ScoringServiceStub) -> pb.ScoreResponse:
    response: pb.ScoreResponse = await scoring.Score(
        pb.ScoreRequest(payment=payment(tenant_id="faults")), timeout=2
    )
    return response


async def _score_from_triton(scoring: ai_pb2_grpc.ScoringServiceStub) -> pb.ScoreResponse:
    """A score Triton answered: with a 40 ms budget on the loaded 2-core
    machine one call now and then misses it (TRITON_TIMEOUT, in-process
    fallback), so a few tries, each after the circuit's open period. After a
    miss it waits out the breaker's window (ai.breaker.window_s, 1 s), so the
    next test's breaker counts only its own failures."""
    for attempt in range(5):
        response = await _score(scoring)
        if response.score_ref.source == "triton":
            if attempt:
                await asyncio.sleep(1.1)
            break
        await asyncio.sleep(OPEN_S)
    return response


async def test_promote_and_rollback_switch_triton_versions_without_restart(
    plane: AiPlane,
    stubs: tuple[ai_pb2_grpc.ScoringServiceStub, ai_pb2_grpc.ModelRegistryServiceStub],
) -> None:
    scoring, registry = stubs
    pid = _process(plane).pid
    trained = await registry.TrainModel(pb.TrainModelRequest(model="payment_risk", seed=OTHER_SEED))
    assert trained.created and trained.version.state == pb.MODEL_STATE_DRAFT
    version = trained.version.version
    for target in (pb.MODEL_STATE_APPROVED, pb.MODEL_STATE_LIVE):
        await registry.PromoteModel(
            pb.PromoteModelRequest(model="payment_risk", version=version, target_state=target)
        )
    response = await _score_from_triton(scoring)
    assert (response.score_ref.version, response.score_ref.source) == (str(version), "triton")

    rolled = await registry.RollbackModel(pb.RollbackModelRequest(model="payment_risk"), timeout=60)
    assert rolled.live.version == 1 and rolled.rollback_s > 0.0
    response = await _score_from_triton(scoring)
    assert (response.score_ref.version, response.score_ref.source) == ("1", "triton")
    assert _process(plane).pid == pid  # the same server: no restart
    retired = await registry.GetModelVersion(
        pb.GetModelVersionRequest(model="payment_risk", version=version)
    )
    assert retired.version.state == pb.MODEL_STATE_RETIRED


async def test_slow_triton_falls_back_in_process_and_opens_the_circuit(
    plane: AiPlane,
    stubs: tuple[ai_pb2_grpc.ScoringServiceStub, ai_pb2_grpc.ModelRegistryServiceStub],
) -> None:
    scoring, _ = stubs
    process = _process(plane)
    assert plane.engine is not None
    breaker = plane.engine.scorer.breaker
    process.pause()
    try:
        reasons = []
        for _ in range(5):
            # Each answered (the 2 s caller deadline is far above the 40 ms
            # Triton budget) by the in-process copy of the live version.
            response = await _score(scoring)
            assert response.score_ref.source == "in_process"
            assert response.score_ref.version == "1"
            reasons.append(response.fallback_reason)
        # Three timeouts open the circuit; then Triton is not even called.
        assert reasons[:3] == ["TRITON_TIMEOUT"] * 3
        assert reasons[3:] == ["CIRCUIT_OPEN"] * 2
        assert breaker.state is BreakerState.OPEN
    finally:
        process.resume()
    # Once resumed, Triton first works off (or rejects) what queued while it
    # was stopped; a half-open probe after each open period closes the circuit.
    sources = []
    for _ in range(10):
        await asyncio.sleep(OPEN_S + 0.05)
        response = await _score(scoring)
        sources.append(response.score_ref.source)
        if response.score_ref.source == "triton":
            break
    assert sources[-1] == "triton", sources
    assert breaker.state is BreakerState.CLOSED


async def test_killed_triton_every_request_is_answered_in_process(
    plane: AiPlane,
    stubs: tuple[ai_pb2_grpc.ScoringServiceStub, ai_pb2_grpc.ModelRegistryServiceStub],
) -> None:
    scoring, _ = stubs
    _process(plane).kill()
    sources = set()
    for _ in range(10):
        response = await _score(scoring)
        sources.add(response.score_ref.source)
        assert response.fallback_reason in ("TRITON_UNAVAILABLE", "TRITON_TIMEOUT", "CIRCUIT_OPEN")
    assert sources == {"in_process"}
    ranked = await scoring.Rank(
        pb.RankRequest(
            tenant_id="faults",
            account_id="acct_1",
            candidates=[pb.OfferCandidate(offer_id="loyalty_boost")],
        )
    )
    assert ranked.model_ref.source == "in_process" and ranked.chosen_offer_id == "loyalty_boost"


async def test_without_the_in_process_copy_last_good_then_none(
    shared_triton: TritonProcess, tmp_path: Path
) -> None:
    config = ai_config(tmp_path, {"fallback": {"in_process": False}})
    import lightgbm as lgb

    from ai_plane.registry import Registry
    from ai_plane.scorer import LiveModel

    registry = Registry(
        registry_dir(ai_config(shared_triton.repository.root.parent)), SystemClock()
    )
    live = registry.get("payment_risk")
    booster = lgb.Booster(model_str=registry.artifact_text("payment_risk", live.version))
    breaker = CircuitBreaker(100, 1.0)
    triton = TritonClient(shared_triton.url)
    assert await triton.warm_up(10.0)
    scorer = Scorer(config.ai, triton, breaker, SystemClock())
    scorer.set_live(LiveModel("payment_risk", live.version, booster, tuple(live.feature_names)))
    rows = np.zeros((1, len(live.feature_names)))
    for _ in range(5):  # see test_ai_main: a rare ~500 ms hold in Triton's batcher
        first = await scorer.score("payment_risk", rows, ["acct_a"], Deadline.from_remaining(1.0))
        if first.source == "triton":
            break
    assert first.source == "triton", first.fallback_reason
    await scorer.close()
    scorer.triton = TritonClient(f"127.0.0.1:{free_port()}")  # nothing listens: dead
    again = await scorer.score("payment_risk", rows, ["acct_a"], Deadline(None))
    assert again.source == "last_good" and again.scores[0] == first.scores[0]
    assert again.fallback_reason == "TRITON_UNAVAILABLE"
    unknown = await scorer.score("payment_risk", rows, ["acct_b"], Deadline(None))
    assert unknown.source == "none" and np.isnan(unknown.scores[0])
    await scorer.close()


async def test_http_and_grpc_inference_agree_and_a_dead_http_endpoint_is_unavailable(
    shared_triton: TritonProcess,
) -> None:
    from ai_plane.scorer import failure_reason

    rows = np.random.default_rng(3).random((3, 27))
    grpc_client = TritonClient(shared_triton.url)
    http_client = TritonClient(shared_triton.url, shared_triton.http_url)
    try:
        scores, contributions = await grpc_client.infer("payment_risk", 1, rows, 10.0, 0)
        for _ in range(2):  # the second call reuses the kept connection
            http_scores, http_contributions = await http_client.infer(
                "payment_risk", 1, rows, 10.0, 5_000_000
            )
            assert np.array_equal(http_scores, scores)
            assert np.array_equal(http_contributions, contributions)
        assert contributions.shape == (3, 28)
    finally:
        await grpc_client.close()
        await http_client.close()
    dead = TritonClient(shared_triton.url, f"127.0.0.1:{free_port()}")
    try:
        with pytest.raises(Exception) as caught:
            await dead.infer("payment_risk", 1, rows, 1.0, 0)
        assert failure_reason(caught.value) == "TRITON_UNAVAILABLE"
    finally:
        await dead.close()
    assert failure_reason(TimeoutError()) == "TRITON_TIMEOUT"


async def test_http_retries_once_when_a_kept_connection_was_closed_by_the_server(
    shared_triton: TritonProcess,
) -> None:
    from ai_plane.triton_http import TritonHttpInfer

    async def read_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(read_then_hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = TritonHttpInfer(shared_triton.http_url)
    try:
        # A kept connection that the far end closes on its next request.
        client._idle.append(await asyncio.open_connection("127.0.0.1", port))
        scores, _ = await client.infer("payment_risk", 1, np.zeros((1, 27)), 10.0, 0)
        assert scores.shape == (1,)
        assert len(client._idle) == 1  # the new connection is kept
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
