"""Training: fit LightGBM deterministically (fixed seed, one thread, row-wise)
on a dataset handed to it; metrics on held-out rows; lineage that says where
the rows came from.

The plane makes no data of its own. A dataset is rows, labels, the feature
names and a lineage dict, written to a file by the tools above the plane
(`triplane ai datasets` and `triplane ai bootstrap` replay the synthetic world
of triplane_sim through these same feature definitions) and read here, so
`TrainModel` trains on exactly what an operator put under the state dir.

Rows are in time order and the last quarter is held out, as a model is always
used on traffic newer than what it learned from.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from ai_plane import drift
from ai_plane.features import FEATURE_SET_VERSION, PROPENSITY_FEATURES, RISK_FEATURES
from triplane.runtime.errors import FailedPrecondition

CODE_VERSION = "ai-train-2"
RISK_MODEL = "payment_risk"
PROPENSITY_MODEL = "offer_propensity"
MODEL_FEATURES: dict[str, tuple[str, ...]] = {
    RISK_MODEL: RISK_FEATURES,
    PROPENSITY_MODEL: PROPENSITY_FEATURES,
}
# Key features whose live distribution is watched for drift, besides the score.
DRIFT_FEATURES: dict[str, tuple[str, ...]] = {
    RISK_MODEL: ("amount_log", "acct_txn_count_1h", "dev_txn_count_24h", "merch_txn_count_1h"),
    PROPENSITY_MODEL: ("acct_lifetime_spend_log", "acct_cashflow_7d_slog"),
}
DRIFT_BINS = 10
# Share of rows (the oldest) a model is fitted on; the rest measure it.
TRAIN_SHARE = 0.75

FloatArray = npt.NDArray[np.float64]
Lineage = dict[str, str | int]


@dataclass(frozen=True)
class Dataset:
    """Rows of one model's features (in MODEL_FEATURES order), their labels,
    and where they came from (recorded in every model trained on them)."""

    model: str
    x: FloatArray
    y: FloatArray
    feature_names: tuple[str, ...]
    lineage: Lineage

    def __post_init__(self) -> None:
        # A dataset that does not fit its model is corrupt, not a case to handle.
        assert self.model in MODEL_FEATURES, self.model
        assert self.x.ndim == 2 and self.x.shape == (len(self.y), len(self.feature_names))


@dataclass(frozen=True)
class TrainedModel:
    model: str
    booster_text: str
    artifact_sha256: str
    feature_names: tuple[str, ...]
    roc_auc: float
    pr_auc: float
    positive_rate: float
    train_rows: int
    test_rows: int
    seed: int
    # Drift baselines on held-out data: series -> [edges, expected fractions].
    baselines: dict[str, list[list[float]]]


# ---- dataset files ----


def dataset_path(datasets_dir: Path, model: str, seed: int) -> Path:
    """Where the dataset of `model` made with generator seed `seed` lives."""
    return datasets_dir / model / f"seed-{seed}.npz"


def write_dataset(path: Path, dataset: Dataset) -> None:
    """Writes atomically (temp file + rename): a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as out:
        np.savez_compressed(
            out,
            x=dataset.x,
            y=dataset.y,
            feature_names=np.asarray(dataset.feature_names, dtype=np.str_),
            meta=np.asarray(
                json.dumps({"model": dataset.model, "lineage": dataset.lineage}, sort_keys=True)
            ),
        )
    os.replace(tmp, path)


def read_dataset(path: Path) -> Dataset:
    """The dataset in `path`; refused when it was made for other features."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"].item()))
        dataset = Dataset(
            model=str(meta["model"]),
            x=np.asarray(data["x"], dtype=np.float64),
            y=np.asarray(data["y"], dtype=np.float64),
            feature_names=tuple(str(n) for n in data["feature_names"]),
            lineage=dict(meta["lineage"]),
        )
    if dataset.feature_names != MODEL_FEATURES[dataset.model]:
        raise FailedPrecondition(
            "DATASET_STALE",
            f"{path} holds other features than {dataset.model} uses now "
            f"(feature set {dataset.lineage.get('feature_set_version', '?')}, "
            f"this plane {FEATURE_SET_VERSION}): write it again",
            "seed",
        )
    return dataset


def dataset_lineage(path: Path) -> Lineage | None:
    """The lineage of the dataset in `path` (reads nothing else); None when
    there is no readable dataset there."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"].item()))
    except (OSError, KeyError, ValueError):
        return None
    return dict(meta["lineage"])


def load_dataset(datasets_dir: Path, model: str, seed: int) -> Dataset:
    """The dataset `TrainModel` trains on; FAILED_PRECONDITION when none is there."""
    path = dataset_path(datasets_dir, model, seed)
    if not path.exists():
        raise FailedPrecondition(
            "NO_TRAINING_DATA",
            f"no dataset for {model} with seed {seed} at {path}; write one with "
            f"`triplane ai datasets --seed {seed}` (or `triplane ai bootstrap`)",
            "seed",
        )
    return read_dataset(path)


# ---- metrics ----


def roc_auc(y: FloatArray, scores: FloatArray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    positives = float(y.sum())
    negatives = float(len(y) - positives)
    if positives == 0 or negatives == 0:
        return math.nan
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def pr_auc(y: FloatArray, scores: FloatArray) -> float:
    """Average precision: the area under the precision-recall curve."""
    order = np.argsort(-scores, kind="mergesort")
    hits = y[order]
    positives = hits.sum()
    if positives == 0:
        return math.nan
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / positives)


# ---- fitting ----


def _params(seed: int, num_leaves: int) -> dict[str, object]:
    return {
        "objective": "binary",
        "learning_rate": 0.1,
        "num_leaves": num_leaves,
        "min_data_in_leaf": 20,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 1,
        "verbosity": -1,
    }


def fit(dataset: Dataset, seed: int, num_boost_round: int, num_leaves: int) -> TrainedModel:
    """Fits on the first TRAIN_SHARE of rows (time order), evaluates on the
    rest. Deterministic: the same dataset and seed give the same artifact."""
    x, y, model = dataset.x, dataset.y, dataset.model
    split = int(len(y) * TRAIN_SHARE)
    names = list(dataset.feature_names)
    train = lgb.Dataset(x[:split], y[:split], feature_name=names, free_raw_data=False)
    booster = lgb.train(_params(seed, num_leaves), train, num_boost_round=num_boost_round)
    test_scores = np.asarray(booster.predict(x[split:], num_threads=1), dtype=np.float64)
    text = booster.model_to_string()
    baselines: dict[str, list[list[float]]] = {}
    for series in ("score", *DRIFT_FEATURES[model]):
        column = test_scores if series == "score" else x[split:, names.index(series)]
        edges, expected = drift.baseline(column.tolist(), DRIFT_BINS)
        baselines[series] = [edges, expected]
    return TrainedModel(
        model=model,
        booster_text=text,
        artifact_sha256=hashlib.sha256(text.encode()).hexdigest(),
        feature_names=tuple(names),
        roc_auc=roc_auc(y[split:], test_scores),
        pr_auc=pr_auc(y[split:], test_scores),
        positive_rate=float(y.mean()) if len(y) else 0.0,
        train_rows=split,
        test_rows=len(y) - split,
        seed=seed,
        baselines=baselines,
    )


def lineage(trained: TrainedModel, dataset: Dataset) -> Lineage:
    """Where the rows came from (the dataset's own lineage) and how the model
    was made from them."""
    return {
        **dataset.lineage,
        "feature_set_version": FEATURE_SET_VERSION,
        "code_version": CODE_VERSION,
        "train_rows": trained.train_rows,
        "test_rows": trained.test_rows,
        "training_seed": trained.seed,
    }
