"""Training is deterministic for a seed and produces useful models."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np
from ai_helpers import ai_config

from ai_plane import training
from ai_plane.manager import train_into
from ai_plane.registry import Registry
from ai_plane.scorer import predict_in_process
from triplane.runtime.clock import ManualClock

SIZE = {"customers": 300, "days": 7, "num_boost_round": 40, "num_leaves": 15}


def test_same_seed_same_artifact_other_seed_other_artifact() -> None:
    first = training.train(training.RISK_MODEL, seed=3, **SIZE)
    training.risk_dataset.cache_clear()  # recompute everything from the seed
    second = training.train(training.RISK_MODEL, seed=3, **SIZE)
    assert first.artifact_sha256 == second.artifact_sha256
    assert first.booster_text == second.booster_text
    other = training.train(training.RISK_MODEL, seed=4, **SIZE)
    assert other.artifact_sha256 != first.artifact_sha256


def test_models_learn_something_on_held_out_data() -> None:
    risk = training.train(training.RISK_MODEL, seed=3, **SIZE)
    assert risk.roc_auc > 0.9 and risk.pr_auc > 0.5
    propensity = training.train(training.PROPENSITY_MODEL, seed=3, **SIZE)
    assert propensity.roc_auc > 0.65


def test_attributions_sum_to_the_raw_score() -> None:
    trained = training.train(training.RISK_MODEL, seed=3, **SIZE)
    booster = lgb.Booster(model_str=trained.booster_text)
    rows = training.risk_dataset(3, 300, 7).x[:20]
    scores, contributions = predict_in_process(booster, rows)
    np.testing.assert_allclose(scores, booster.predict(rows), rtol=1e-9)
    assert contributions.shape == (20, len(training.RISK_FEATURES) + 1)


def test_registry_entry_has_lineage_metrics_and_hash(tmp_path: Path) -> None:
    config = ai_config(tmp_path).ai
    registry = Registry(tmp_path / "registry", ManualClock())
    record, created = train_into(registry, config, training.RISK_MODEL, seed=3)
    assert created and record.state == "draft"
    assert record.lineage["generator_seed"] == 3
    assert record.lineage["feature_set_version"] == "fs-1"
    assert record.lineage["generator_version"] == "synth-1"
    assert record.metrics["roc_auc"] > 0.9
    assert len(record.artifact_sha256) == 64
    assert "score" in record.baselines
    again, created_again = train_into(registry, config, training.RISK_MODEL, seed=3)
    assert not created_again and again.version == record.version
