"""The AI plane with an external Triton (ai.triton_url), as in a pod where
Triton runs as a sidecar container: the plane never starts a tritonserver of
its own there, and never serves in-process in place of the configured one.

- Nothing answers at ai.triton_url: the plane refuses to start, naming the
  address, after ai.triton.startup_timeout_s.
- A real tritonserver (the binary nvidia-pytriton ships) with an empty model
  repository in explicit model-control mode, that repository shared with the
  plane (ai.triton_repository, the sidecar's emptyDir): the plane writes the
  live versions into it, Triton loads them, scores come from Triton; and a
  Triton started afresh on that repository (a restarted sidecar) serves
  them without the plane's help."""

from __future__ import annotations

from pathlib import Path

import pytest
from ai_helpers import ai_config, bootstrapped, payment, require_triton

from ai_plane.app import AiPlane
from ai_plane.triton import ModelRepository, TritonProcess, TritonUnavailable
from triplane.ai.v1 import ai_pb2 as pb
from triplane.ai.v1 import ai_pb2_grpc
from triplane.runtime.net import free_port
from triplane.runtime.tls import channel_for

pytestmark = pytest.mark.timeout(240)


async def test_unreachable_external_triton_refuses_to_start(tmp_path: Path) -> None:
    url = f"127.0.0.1:{free_port()}"
    config = ai_config(tmp_path, {"triton_url": url, "triton": {"startup_timeout_s": 1.0}})
    plane = AiPlane(config, listen="127.0.0.1:0")
    try:
        with pytest.raises(TritonUnavailable, match="does not serve in-process") as refused:
            await plane.start()
        assert url in str(refused.value)
        assert plane.server is None and plane.engine is None
        assert plane.triton_process is None
    finally:
        await plane.stop()


async def test_external_triton_loads_the_live_models_from_the_shared_repository(
    tmp_path: Path,
) -> None:
    require_triton()
    repository = ModelRepository(tmp_path / "shared-repository")
    probe = ai_config(tmp_path / "state")
    # As the sidecar starts: nothing in the repository yet, explicit mode.
    triton = TritonProcess(repository, tmp_path / "triton", probe.ai.triton)
    triton.start()
    restarted: TritonProcess | None = None
    try:
        config = bootstrapped(
            ai_config(
                tmp_path / "state",
                {"triton_url": triton.url, "triton_repository": str(repository.root)},
            )
        )
        plane = AiPlane(config, listen="127.0.0.1:0")
        await plane.start()
        try:
            assert plane.triton_process is None  # no tritonserver of its own
            assert plane.server is not None
            address = f"127.0.0.1:{plane.server.port}"
            async with channel_for(config, address) as channel:
                scoring = ai_pb2_grpc.ScoringServiceStub(channel)
                response = await scoring.Score(pb.ScoreRequest(payment=payment()), timeout=5)
            ref = response.score_ref
            assert (ref.model, ref.source) == ("payment_risk", "triton"), response
            assert response.fallback_reason == ""
        finally:
            await plane.stop()
        assert "payment_risk" in repository.models()
        version_dirs = list((repository.root / "payment_risk").glob("*/model.txt"))
        assert version_dirs, "the plane wrote no version into the shared repository"
        # A restarted sidecar: the live models are there for it to load.
        triton.stop()
        restarted = TritonProcess(repository, tmp_path / "triton-again", probe.ai.triton)
        restarted.start()  # waits until every model in the repository is ready
        assert restarted.alive()
    finally:
        triton.stop()
        if restarted is not None:
            restarted.stop()
