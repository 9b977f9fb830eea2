"""Models come from above the plane. Started on an empty registry the plane
still serves (explicit "no model", with the reason, and a loud log line saying
how to bootstrap); TrainModel trains on dataset files only and says so when
there are none; `triplane ai bootstrap` and `triplane ai datasets` make them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grpc
import pytest
import yaml
from ai_helpers import TEST_AI, ai_config, payment

from ai_plane.app import AiPlane, datasets_dir, registry_dir
from ai_plane.registry import ModelState, Registry
from ai_plane.training import MODEL_FEATURES, dataset_path
from ai_plane.triton import TritonProcess
from triplane.ai.v1 import ai_pb2 as pb
from triplane.ai.v1 import ai_pb2_grpc
from triplane.runtime.clock import SystemClock
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import channel_for
from triplane_tools import cli
from triplane_tools.models import write_datasets


async def test_an_empty_plane_serves_no_model_and_trains_once_given_datasets(
    tmp_path: Path, shared_triton: TritonProcess, caplog: pytest.LogCaptureFixture
) -> None:
    config = ai_config(tmp_path)
    plane = AiPlane(config, listen="127.0.0.1:0", shared_triton=shared_triton)
    with caplog.at_level(logging.ERROR, logger="triplane.ai"):
        port = await plane.start()
    assert any(
        "NO LIVE MODEL" in r.getMessage() and "triplane ai bootstrap" in r.getMessage()
        for r in caplog.records
    )
    try:
        async with channel_for(config, f"127.0.0.1:{port}") as channel:
            scoring = ai_pb2_grpc.ScoringServiceStub(channel)
            registry = ai_pb2_grpc.ModelRegistryServiceStub(channel)
            empty = await scoring.Score(pb.ScoreRequest(payment=payment()), timeout=5)
            assert (empty.score_ref.source, empty.fallback_reason) == ("none", "NO_LIVE_MODEL")
            assert empty.score_ref.score == 0.0 and not empty.attributions

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await registry.TrainModel(pb.TrainModelRequest(model="payment_risk"), timeout=30)
            assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert parse_rpc_error(refused.value) == ("NO_TRAINING_DATA", "seed")

            write_datasets(config)
            trained = await registry.TrainModel(
                pb.TrainModelRequest(model="payment_risk"), timeout=60
            )
            assert trained.created and trained.version.lineage.generator_seed == 7
            for target in (pb.MODEL_STATE_APPROVED, pb.MODEL_STATE_LIVE):
                await registry.PromoteModel(
                    pb.PromoteModelRequest(
                        model="payment_risk", version=trained.version.version, target_state=target
                    ),
                    timeout=60,
                )
            scored = await scoring.Score(pb.ScoreRequest(payment=payment()), timeout=5)
            assert scored.score_ref.version == str(trained.version.version)
            assert scored.score_ref.source in ("triton", "in_process")
    finally:
        await plane.stop()


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "triplane.yaml"
    path.write_text(
        yaml.safe_dump({"runtime": {"state_dir": str(tmp_path / "state")}, "ai": TEST_AI})
    )
    return path


def test_the_bootstrap_command_makes_every_model_live_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = _config_file(tmp_path)
    assert cli.main(["--config", str(config_file), "ai", "bootstrap"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert set(first) == set(MODEL_FEATURES)
    assert all(v == {"version": 1, "state": "live"} for v in first.values())
    # Idempotent: nothing is trained again once every model is live.
    assert cli.main(["--config", str(config_file), "ai", "bootstrap"]) == 0
    assert json.loads(capsys.readouterr().out) == first
    config = ai_config(tmp_path / "state")
    registry = Registry(registry_dir(config), SystemClock())
    assert [r.version for r in registry.versions()] == [1, 1]
    assert all(r.state is ModelState.LIVE for r in registry.versions())


def test_the_datasets_command_writes_what_train_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = _config_file(tmp_path)
    assert cli.main(["--config", str(config_file), "ai", "datasets", "--seed", "9"]) == 0
    written = json.loads(capsys.readouterr().out)
    config = ai_config(tmp_path / "state")
    assert written == [str(dataset_path(datasets_dir(config), m, 9)) for m in MODEL_FEATURES]
    mtimes = [Path(p).stat().st_mtime_ns for p in written]
    # Already there and current: not written again.
    assert cli.main(["--config", str(config_file), "ai", "datasets", "--seed", "9"]) == 0
    capsys.readouterr()
    assert [Path(p).stat().st_mtime_ns for p in written] == mtimes
    args = ["--config", str(config_file), "ai", "train", "offer_propensity", "--seed", "9"]
    assert cli.main(args) == 0
    trained = json.loads(capsys.readouterr().out)
    assert (trained["model"], trained["version"], trained["created"]) == (
        "offer_propensity",
        1,
        True,
    )
    assert trained["state"] == "draft" and trained["metrics"]["roc_auc"] > 0.65
    # No dataset for another seed: a clear refusal, exit code 2.
    assert cli.main([*args[:-1], "10"]) == 2
    assert "NO_TRAINING_DATA" in capsys.readouterr().err
