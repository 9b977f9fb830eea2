"""The AI plane's in-memory state is bounded: the bandit keeps the posterior
of at most ai.bandit.max_arms offers (least recently updated back to the prior)
and ranking offers a caller makes up stores nothing."""

from __future__ import annotations

import numpy as np

from ai_plane.bandit import DIMENSION, LinearThompsonBandit
from triplane.runtime.config import load_config


def _x() -> np.ndarray:
    x = np.zeros(DIMENSION)
    x[0] = 1.0
    return x


def test_ranking_made_up_offers_stores_no_arm() -> None:
    bandit = LinearThompsonBandit(0.05, 0.1, 16, seed=1, max_arms=10)
    x = _x()
    for batch in range(200):
        arms = [f"t|invented-{batch}-{i}" for i in range(50)]
        choice = bandit.choose(arms, [x] * len(arms))
        assert abs(float(choice.probabilities.sum()) - 1.0) < 1e-9
    assert bandit.arm_count() == 0


def test_learned_arms_are_bounded_and_the_oldest_falls_back_to_the_prior() -> None:
    bandit = LinearThompsonBandit(0.05, 0.1, 16, seed=1, max_arms=3)
    x = _x()
    prior = bandit.expected_reward("never", x)
    for name in ("a", "b", "c"):
        for _ in range(50):
            bandit.update(name, x, 1.0)
    bandit.update("a", x, 1.0)  # makes "a" the most recently updated
    learned = bandit.expected_reward("a", x)
    assert learned != prior
    for _ in range(50):
        bandit.update("d", x, 1.0)  # one more: "b", least recently updated, goes
    assert bandit.arm_count() == 3
    assert bandit.expected_reward("b", x) == prior
    assert bandit.expected_reward("a", x) == learned


def test_the_bound_comes_from_config() -> None:
    assert load_config(environ={}).ai.bandit.max_arms > 0


def test_ranking_does_not_decide_which_arm_is_dropped() -> None:
    """Which arms a replica keeps depends on the outcomes it applied, never on
    what it ranked: two replicas fed the same outcomes keep the same arms."""
    x = _x()
    ranked, idle = (LinearThompsonBandit(0.05, 0.1, 16, seed=1, max_arms=2) for _ in range(2))
    for bandit in (ranked, idle):
        bandit.update("a", x, 1.0)
        bandit.update("b", x, 1.0)
    ranked.choose(["a"], [x])  # reads "a"; must not keep it over "b"
    for bandit in (ranked, idle):
        bandit.update("c", x, 1.0)
    prior = ranked.expected_reward("never", x)
    assert ranked.expected_reward("a", x) == idle.expected_reward("a", x) == prior
    assert ranked.expected_reward("b", x) == idle.expected_reward("b", x) != prior
