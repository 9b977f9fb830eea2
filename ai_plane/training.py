"""Training: replay the synthetic stream through the real feature definitions,
then fit LightGBM deterministically (fixed seed, one thread, row-wise).

Rows are split by time (the last quarter is held out), as a model is always
used on traffic newer than what it learned from.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from functools import lru_cache

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from ai_plane import drift
from ai_plane.features import (
    FEATURE_SET_VERSION,
    PROPENSITY_FEATURES,
    RISK_FEATURES,
    ActivityKind,
    EntityRef,
    PaymentInput,
    hour_of_day,
    keys_for,
    propensity_context,
    risk_vector,
    stored_features,
    updates_for,
)
from ai_plane.store.memory import InProcessStore
from triplane.runtime.clock import ManualClock
from triplane_sim import synth

CODE_VERSION = "ai-train-1"
RISK_MODEL = "payment_risk"
PROPENSITY_MODEL = "offer_propensity"
MODEL_FEATURES: dict[str, tuple[str, ...]] = {
    RISK_MODEL: RISK_FEATURES,
    PROPENSITY_MODEL: PROPENSITY_FEATURES,
}
TRAIN_NAMESPACE = "train"
# Key features whose live distribution is watched for drift, besides the score.
DRIFT_FEATURES: dict[str, tuple[str, ...]] = {
    RISK_MODEL: ("amount_log", "acct_txn_count_1h", "dev_txn_count_24h", "merch_txn_count_1h"),
    PROPENSITY_MODEL: ("acct_lifetime_spend_log", "acct_cashflow_7d_slog"),
}
DRIFT_BINS = 10

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Dataset:
    x: FloatArray
    y: FloatArray
    # Propensity contexts seen at payment time (for offer data and the bandit).
    contexts: FloatArray


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


@lru_cache(maxsize=4)
def risk_dataset(seed: int, customers: int, days: int) -> Dataset:
    """Feature rows and fraud labels of every synthetic payment, computed
    from the store state just before the payment (what serving would see)."""
    data = synth.generate(synth.SynthConfig(seed=seed, customers=customers, days=days))
    clock = ManualClock(synth.EPOCH_US)
    store = InProcessStore(max_keys=10_000_000, dedupe_ttl_s=1, clock=clock)
    rows: list[list[float]] = []
    labels: list[float] = []
    contexts: list[list[float]] = []
    for event in data.events:
        activity = event.activity
        clock.set_us(activity.occurred_at_us)
        if activity.kind is ActivityKind.PAYMENT:
            ref = EntityRef(
                activity.tenant_id, activity.account_id, activity.device_id, activity.merchant_id
            )
            keys = keys_for(ref, TRAIN_NAMESPACE, activity.occurred_at_us)
            stored = stored_features(store.read_sync(keys))
            hour = hour_of_day(activity.occurred_at_us)
            payment = PaymentInput(
                activity.amount_minor, event.merchant_category, event.channel, hour
            )
            rows.append(risk_vector(payment, stored))
            labels.append(1.0 if event.is_fraud else 0.0)
            if not event.is_fraud:
                contexts.append(propensity_context(event.channel, hour, stored))
        store.apply_sync("", updates_for(activity, TRAIN_NAMESPACE))
    return Dataset(
        np.asarray(rows, dtype=np.float64),
        np.asarray(labels, dtype=np.float64),
        np.asarray(contexts, dtype=np.float64),
    )


def propensity_dataset(contexts: FloatArray, seed: int, rows: int) -> tuple[FloatArray, FloatArray]:
    """Logged exposures: a uniformly random offer per context, taken with the
    hidden true propensity."""
    rng = random.Random(seed * 7919 + 1)
    x = np.empty((rows, len(PROPENSITY_FEATURES)), dtype=np.float64)
    y = np.empty(rows, dtype=np.float64)
    for i in range(rows):
        context = contexts[rng.randrange(len(contexts))]
        offer_index = rng.randrange(len(synth.OFFERS))
        p = synth.true_propensity(synth.OFFERS[offer_index], context.tolist())
        x[i, 0] = offer_index
        x[i, 1:] = context
        y[i] = 1.0 if rng.random() < p else 0.0
    return x, y


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


def fit(
    model: str,
    x: FloatArray,
    y: FloatArray,
    seed: int,
    num_boost_round: int,
    num_leaves: int,
) -> TrainedModel:
    """Fits on the first 75% of rows (time order), evaluates on the rest."""
    split = int(len(y) * 0.75)
    names = list(MODEL_FEATURES[model])
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


def train(
    model: str, seed: int, customers: int, days: int, num_boost_round: int, num_leaves: int
) -> TrainedModel:
    """Trains `model` on the synthetic world of `seed` (deterministic)."""
    dataset = risk_dataset(seed, customers, days)
    if model == RISK_MODEL:
        return fit(model, dataset.x, dataset.y, seed, num_boost_round, num_leaves)
    if model == PROPENSITY_MODEL:
        x, y = propensity_dataset(
            dataset.contexts, seed, rows=min(60_000, 6 * len(dataset.contexts))
        )
        return fit(model, x, y, seed, num_boost_round, num_leaves)
    raise KeyError(model)


def lineage(trained: TrainedModel, seed: int) -> dict[str, object]:
    return {
        "generator_seed": seed,
        "generator_version": synth.GENERATOR_VERSION,
        "feature_set_version": FEATURE_SET_VERSION,
        "code_version": CODE_VERSION,
        "train_rows": trained.train_rows,
        "test_rows": trained.test_rows,
        "training_seed": trained.seed,
    }
