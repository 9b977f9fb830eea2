"""Training is deterministic for a dataset and seed, produces useful models,
and trains only on the dataset files the plane is given."""

from __future__ import annotations

import random
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest
from ai_helpers import ai_config

from ai_plane import training
from ai_plane.app import datasets_dir
from ai_plane.features import FEATURE_SET_VERSION, OFFER_FEATURES, offer_vector
from ai_plane.manager import train_into
from ai_plane.registry import Registry
from ai_plane.scorer import predict_in_process
from triplane.runtime.clock import ManualClock
from triplane.runtime.errors import FailedPrecondition
from triplane_sim import datasets, synth
from triplane_tools.models import write_datasets

WORLD = {"customers": 300, "days": 7}
FIT = {"num_boost_round": 40, "num_leaves": 15}


def _risk(seed: int) -> training.TrainedModel:
    return training.fit(datasets.build(training.RISK_MODEL, seed, **WORLD), seed, **FIT)


def test_same_seed_same_artifact_other_seed_other_artifact() -> None:
    first = _risk(3)
    datasets.build.cache_clear()  # recompute everything from the seed
    datasets.replay.cache_clear()
    second = _risk(3)
    assert first.artifact_sha256 == second.artifact_sha256
    assert first.booster_text == second.booster_text
    other = _risk(4)
    assert other.artifact_sha256 != first.artifact_sha256


def test_models_learn_something_on_held_out_data() -> None:
    risk = _risk(3)
    assert risk.roc_auc > 0.9 and risk.pr_auc > 0.5
    propensity = training.fit(datasets.build(training.PROPENSITY_MODEL, 3, **WORLD), 3, **FIT)
    assert propensity.roc_auc > 0.65


def test_the_propensity_model_judges_offers_it_never_saw_by_their_entry() -> None:
    """Random entries (products, attributes and values in combinations no
    catalog has) get predictions that rank like their hidden truth."""
    dataset = datasets.build(training.PROPENSITY_MODEL, 3, **WORLD)
    booster = lgb.Booster(model_str=training.fit(dataset, 3, **FIT).booster_text)
    rng = random.Random(17)
    contexts = dataset.x[:, len(OFFER_FEATURES) :]
    truth, predicted = [], []
    for _ in range(300):
        entry = synth.random_offer(rng)
        context = contexts[rng.randrange(len(contexts))].tolist()
        truth.append(synth.true_propensity(entry, context))
        row = np.asarray([[*offer_vector(entry), *context]])
        predicted.append(float(booster.predict(row, num_threads=1)[0]))
    # Spearman rank correlation, without scipy.
    ranks_t, ranks_p = np.argsort(np.argsort(truth)), np.argsort(np.argsort(predicted))
    assert np.corrcoef(ranks_t, ranks_p)[0, 1] > 0.6


def test_attributions_sum_to_the_raw_score() -> None:
    trained = _risk(3)
    booster = lgb.Booster(model_str=trained.booster_text)
    rows = datasets.build(training.RISK_MODEL, 3, **WORLD).x[:20]
    scores, contributions = predict_in_process(booster, rows)
    np.testing.assert_allclose(scores, booster.predict(rows), rtol=1e-9)
    assert contributions.shape == (20, len(training.RISK_FEATURES) + 1)


def test_a_dataset_file_round_trips_and_a_stale_one_is_refused(tmp_path: Path) -> None:
    dataset = datasets.build(training.RISK_MODEL, 3, **WORLD)
    path = training.dataset_path(tmp_path, training.RISK_MODEL, 3)
    training.write_dataset(path, dataset)
    again = training.read_dataset(path)
    assert np.array_equal(again.x, dataset.x) and np.array_equal(again.y, dataset.y)
    assert again.feature_names == dataset.feature_names and again.lineage == dataset.lineage
    assert training.fit(again, 3, **FIT).artifact_sha256 == _risk(3).artifact_sha256
    stale = training.Dataset(
        training.RISK_MODEL,
        dataset.x[:, :3],
        dataset.y,
        dataset.feature_names[:3],
        {**dataset.lineage, "feature_set_version": "fs-0"},
    )
    training.write_dataset(path, stale)
    with pytest.raises(FailedPrecondition) as refused:
        training.read_dataset(path)
    assert refused.value.reason == "DATASET_STALE"


def test_registry_entry_has_lineage_metrics_and_hash(tmp_path: Path) -> None:
    config = ai_config(tmp_path)
    registry = Registry(tmp_path / "registry", ManualClock())
    with pytest.raises(FailedPrecondition) as missing:
        train_into(registry, config.ai, datasets_dir(config), training.RISK_MODEL, seed=3)
    assert (missing.value.reason, missing.value.field) == ("NO_TRAINING_DATA", "seed")
    assert "triplane ai datasets --seed 3" in missing.value.message
    assert registry.versions() == []

    write_datasets(config, seed=3)
    record, created = train_into(
        registry, config.ai, datasets_dir(config), training.RISK_MODEL, seed=3
    )
    assert created and record.state == "draft"
    assert record.lineage["generator_seed"] == 3
    assert record.lineage["feature_set_version"] == FEATURE_SET_VERSION
    assert record.lineage["generator_version"] == synth.GENERATOR_VERSION
    assert record.lineage["source"] == "triplane_sim"
    assert record.metrics["roc_auc"] > 0.9
    assert len(record.artifact_sha256) == 64
    assert "score" in record.baselines
    again, created_again = train_into(
        registry, config.ai, datasets_dir(config), training.RISK_MODEL, seed=3
    )
    assert not created_again and again.version == record.version
