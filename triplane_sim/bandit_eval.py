"""A simulated stream of customers and offers, for judging bandit policies.

Every policy sees the same rounds: a customer context (taken from synthetic
payments), an eligible subset of the offer catalog, the propensity model's
prediction per eligible offer (from its catalog entry, as Rank computes it),
and pre-drawn rewards (offer taken with its
hidden true propensity). Identical draws make cumulative rewards comparable
between policies in the same run.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np

from ai_plane.bandit import LinearThompsonBandit, arm_features
from ai_plane.features import offer_vector
from ai_plane.scorer import FloatArray
from triplane_sim.synth import CATALOG, OFFERS, true_propensity


@dataclass(frozen=True)
class Round:
    context: list[float]
    eligible: list[int]
    # Propensity model prediction and drawn reward, per eligible offer.
    predictions: list[float]
    rewards: list[float]


def make_stream(
    contexts: FloatArray, propensity_model: lgb.Booster, rounds: int, seed: int
) -> list[Round]:
    rng = random.Random(seed)
    picked = [contexts[rng.randrange(len(contexts))].tolist() for _ in range(rounds)]
    offers = [offer_vector(CATALOG[o]) for o in OFFERS]
    rows = np.asarray([[*offer, *c] for c in picked for offer in offers], dtype=np.float64)
    predictions = np.asarray(propensity_model.predict(rows, num_threads=1)).reshape(
        rounds, len(OFFERS)
    )
    stream: list[Round] = []
    for r, context in enumerate(picked):
        eligible = sorted(rng.sample(range(len(OFFERS)), rng.randint(3, len(OFFERS))))
        rewards = [
            1.0 if rng.random() < true_propensity(OFFERS[i], context) else 0.0 for i in eligible
        ]
        stream.append(
            Round(context, eligible, [float(predictions[r, i]) for i in eligible], rewards)
        )
    return stream


# A policy picks one eligible index (position in round.eligible) and learns
# from the reward of what it picked; it returns (position, its probability).
Policy = Callable[[Round], tuple[int, float]]
Learn = Callable[[Round, int, float, float], None]


def run_policy(stream: Sequence[Round], choose: Policy, learn: Learn) -> float:
    total = 0.0
    for round_ in stream:
        position, probability = choose(round_)
        reward = round_.rewards[position]
        total += reward
        learn(round_, position, probability, reward)
    return total


def thompson_policy(bandit: LinearThompsonBandit) -> tuple[Policy, Learn]:
    """Our bandit, exactly as Rank uses it (arm features from context and prediction)."""

    def features(round_: Round) -> list[FloatArray]:
        return [arm_features(round_.context, p) for p in round_.predictions]

    def choose(round_: Round) -> tuple[int, float]:
        choice = bandit.choose([OFFERS[i] for i in round_.eligible], features(round_))
        return choice.chosen_index, float(choice.probabilities[choice.chosen_index])

    def learn(round_: Round, position: int, probability: float, reward: float) -> None:
        x = arm_features(round_.context, round_.predictions[position])
        bandit.update(OFFERS[round_.eligible[position]], x, reward)

    return choose, learn


def uniform_policy(seed: int) -> tuple[Policy, Learn]:
    rng = random.Random(seed)

    def choose(round_: Round) -> tuple[int, float]:
        return rng.randrange(len(round_.eligible)), 1.0 / len(round_.eligible)

    def learn(round_: Round, position: int, probability: float, reward: float) -> None:
        return None

    return choose, learn


def oracle_reward(stream: Sequence[Round]) -> float:
    """Expected reward of always picking the truly best offer (an upper bound)."""
    return sum(max(true_propensity(OFFERS[i], r.context) for i in r.eligible) for r in stream)
