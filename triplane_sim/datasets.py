"""Training datasets made from the synthetic world, for the AI plane's models.

The world's stream is replayed through the AI plane's own feature definitions
(`ai_plane.features`: the same updates and reads as serving), so a row is what
the plane would have seen at that moment. The plane itself never imports this
module: the tools write the datasets to files (`triplane ai datasets`,
`triplane ai bootstrap`) and the plane trains on the files.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ai_plane.features import (
    FEATURE_SET_VERSION,
    PROPENSITY_FEATURES,
    RISK_FEATURES,
    ActivityKind,
    EntityRef,
    PaymentInput,
    hour_of_day,
    keys_for,
    offer_vector,
    propensity_context,
    risk_vector,
    stored_features,
    updates_for,
)
from ai_plane.store.memory import InProcessStore
from ai_plane.training import PROPENSITY_MODEL, RISK_MODEL, Dataset, FloatArray, Lineage
from triplane.runtime.clock import ManualClock
from triplane_sim import synth

REPLAY_NAMESPACE = "train"
# Logged exposures per payment context, and their bound.
EXPOSURES_PER_CONTEXT = 6
MAX_EXPOSURE_ROWS = 60_000
# Share of exposures that show one of the world's catalog offers; the rest show
# random entries, so a model learns what each part of an entry is worth and
# can judge an offer no partner registered before.
CATALOG_SHARE = 0.5


@dataclass(frozen=True)
class Replay:
    """Risk rows and labels of every synthetic payment, in time order, and the
    propensity contexts of the legitimate ones."""

    risk_x: FloatArray
    risk_y: FloatArray
    contexts: FloatArray


@lru_cache(maxsize=4)
def replay(seed: int, customers: int, days: int) -> Replay:
    """Feature rows computed from the store state just before each payment
    (what serving would see), with the customer's local hour."""
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
            keys = keys_for(ref, REPLAY_NAMESPACE, activity.occurred_at_us)
            stored = stored_features(store.read_sync(keys))
            # Synthetic time is the customers' local time.
            hour = hour_of_day(activity.occurred_at_us)
            payment = PaymentInput(
                activity.amount_minor, event.merchant_category, event.channel, hour
            )
            rows.append(risk_vector(payment, stored))
            labels.append(1.0 if event.is_fraud else 0.0)
            if not event.is_fraud:
                contexts.append(propensity_context(event.channel, hour, stored))
        store.apply_sync("", updates_for(activity, REPLAY_NAMESPACE))
    return Replay(
        np.asarray(rows, dtype=np.float64),
        np.asarray(labels, dtype=np.float64),
        np.asarray(contexts, dtype=np.float64),
    )


def _lineage(seed: int, customers: int, days: int) -> Lineage:
    return {
        "source": "triplane_sim",
        "generator_version": synth.GENERATOR_VERSION,
        "generator_seed": seed,
        "customers": customers,
        "days": days,
        "feature_set_version": FEATURE_SET_VERSION,
    }


def risk_dataset(seed: int, customers: int, days: int) -> Dataset:
    """Every synthetic payment with its fraud label."""
    played = replay(seed, customers, days)
    return Dataset(
        RISK_MODEL, played.risk_x, played.risk_y, RISK_FEATURES, _lineage(seed, customers, days)
    )


def propensity_dataset(seed: int, customers: int, days: int) -> Dataset:
    """Logged exposures: per row a payment context and an offer shown uniformly
    at random (a catalog offer or a random entry), taken with the offer's
    hidden true propensity."""
    contexts = replay(seed, customers, days).contexts
    rows = min(MAX_EXPOSURE_ROWS, EXPOSURES_PER_CONTEXT * len(contexts))
    rng = random.Random(seed * 7919 + 1)
    catalog = list(synth.CATALOG.values())
    x = np.empty((rows, len(PROPENSITY_FEATURES)), dtype=np.float64)
    y = np.empty(rows, dtype=np.float64)
    for i in range(rows):
        context = contexts[rng.randrange(len(contexts))]
        if rng.random() < CATALOG_SHARE:
            offer = catalog[rng.randrange(len(catalog))]
        else:
            offer = synth.random_offer(rng)
        p = synth.true_propensity(offer, context.tolist())
        x[i] = [*offer_vector(offer), *context]
        y[i] = 1.0 if rng.random() < p else 0.0
    return Dataset(PROPENSITY_MODEL, x, y, PROPENSITY_FEATURES, _lineage(seed, customers, days))


@lru_cache(maxsize=8)
def build(model: str, seed: int, customers: int, days: int) -> Dataset:
    """The dataset of `model` from the world of (seed, customers, days)
    (remembered: tests and tools ask for the same few many times; callers
    must not change its arrays)."""
    if model == RISK_MODEL:
        return risk_dataset(seed, customers, days)
    if model == PROPENSITY_MODEL:
        return propensity_dataset(seed, customers, days)
    raise KeyError(model)
