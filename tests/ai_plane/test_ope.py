"""The off-policy estimators (ai_plane/ope.py) on synthetic logs whose truth
is known: a seeded world of contexts, K actions with known expected rewards,
a randomized logging policy and a second, known candidate policy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ai_plane import ope
from ai_plane.ope import LoggedBandit, OpeInputError

K = 5


def _world(seed: int, n: int) -> tuple[LoggedBandit, float, ope.FloatArray]:
    """(logged data with a noisy reward model, the candidate's true value,
    the true expected rewards (n, K))."""
    rng = np.random.default_rng(seed)
    theta = np.random.default_rng(1234).normal(size=(K, 3))
    x = rng.normal(size=(n, 3))
    q = 1.0 / (1.0 + np.exp(-(x @ theta.T)))  # true P(reward=1 | x, a)
    # Logging: softmax of a weak score (every action possible).
    logits = 0.5 * (x @ theta.T)
    pb = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    action = np.array([rng.choice(K, p=row) for row in pb])
    reward = (rng.random(n) < q[np.arange(n), action]).astype(float)
    # Candidate: 80% greedy on the true q, 20% uniform.
    pe = 0.8 * ope.greedy_distribution(q) + 0.2 / K
    truth = float((pe * q).sum(axis=1).mean())
    noisy = np.clip(q + rng.normal(scale=0.1, size=q.shape), 0, 1)
    return LoggedBandit.of(action, reward, pb[np.arange(n), action], pe, noisy), truth, q


@pytest.mark.parametrize("estimator", ["ips", "snips", "dr"])
def test_estimates_are_unbiased_on_a_known_policy(estimator: ope.Estimator) -> None:
    values, truths = [], []
    for seed in range(60):
        data, truth, _ = _world(seed, 2000)
        values.append(ope.estimate(data, estimator).value)
        truths.append(truth)
    bias = float(np.mean(values) - np.mean(truths))
    # 60 independent estimates: the mean's standard error is about
    # sd / sqrt(60); SNIPS's O(1/n) bias is far below that.
    spread = float(np.std(values) / math.sqrt(len(values)))
    assert abs(bias) < 4 * spread + 1e-3, (bias, spread)


@pytest.mark.parametrize("estimator", ["ips", "snips", "dr"])
def test_clt_intervals_cover_the_truth(estimator: ope.Estimator) -> None:
    covered = 0
    seeds = 100
    for seed in range(seeds):
        data, truth, _ = _world(1000 + seed, 1500)
        found = ope.estimate(data, estimator, confidence=0.95)
        assert found.lower <= found.value <= found.upper
        covered += found.lower <= truth <= found.upper
    # A 95% interval: at 100 seeds, 89 or fewer happens with probability < 1%.
    assert covered >= 90, covered


def test_bootstrap_interval_agrees_with_clt_and_is_reproducible() -> None:
    data, _, _ = _world(7, 1500)
    first = ope.estimate(data, "snips", interval="bootstrap", bootstrap_samples=300, seed=3)
    again = ope.estimate(data, "snips", interval="bootstrap", bootstrap_samples=300, seed=3)
    assert first == again
    clt = ope.estimate(data, "snips")
    # The two intervals agree to within a fraction of their width.
    width = clt.upper - clt.lower
    assert abs(first.lower - clt.lower) < 0.25 * width
    assert abs(first.upper - clt.upper) < 0.25 * width


def test_dr_with_a_zero_reward_model_is_ips() -> None:
    data, _, _ = _world(3, 800)
    zero = LoggedBandit.of(
        data.action, data.reward, data.pscore, data.action_dist, np.zeros_like(data.action_dist)
    )
    assert ope.estimate(zero, "dr").value == pytest.approx(ope.estimate(zero, "ips").value)
    assert ope.estimate(zero, "dr").stderr == pytest.approx(ope.estimate(zero, "ips").stderr)


def test_dr_with_a_perfect_reward_model_is_the_direct_method() -> None:
    # Rewards equal to their expectation (no noise) and q exact: the
    # correction term vanishes and DR is mean_i sum_a pi_e(a|x_i) q(x_i, a).
    data, _, q = _world(4, 800)
    rows = np.arange(data.rounds)
    exact = LoggedBandit.of(data.action, q[rows, data.action], data.pscore, data.action_dist, q)
    direct = float((data.action_dist * q).sum(axis=1).mean())
    assert ope.estimate(exact, "dr").value == pytest.approx(direct, abs=1e-12)


def test_the_logging_policy_evaluated_on_itself_is_the_logged_mean() -> None:
    rng = np.random.default_rng(5)
    n = 500
    pb = rng.dirichlet(np.ones(K), size=n)
    action = np.array([rng.choice(K, p=row) for row in pb])
    reward = rng.random(n)
    data = LoggedBandit.of(action, reward, pb[np.arange(n), action], pb)
    assert ope.estimate(data, "ips").value == pytest.approx(reward.mean())
    assert ope.estimate(data, "snips").value == pytest.approx(reward.mean())
    assert ope.on_policy(reward).value == pytest.approx(reward.mean())
    assert ope.estimate(data, "ips").effective_rounds == pytest.approx(n)


def test_greedy_distribution_respects_eligibility_and_shares_ties() -> None:
    dist = ope.greedy_distribution(
        [[1.0, 3.0, 3.0], [5.0, 1.0, 0.0]], [[True, True, True], [False, True, True]]
    )
    assert dist.tolist() == [[0.0, 0.5, 0.5], [0.0, 1.0, 0.0]]


def test_z_matches_the_normal_quantiles() -> None:
    assert ope._z(0.95) == pytest.approx(1.959963985, abs=1e-8)
    assert ope._z(0.99) == pytest.approx(2.575829304, abs=1e-8)
    assert ope._z(0.5) == pytest.approx(0.6744897502, abs=1e-8)


@pytest.mark.parametrize(
    ("changes", "reason", "field"),
    [
        ({"action": [0, 1, 1]}, "OPE_SHAPE_MISMATCH", "reward"),
        ({"reward": [1.0]}, "OPE_SHAPE_MISMATCH", "reward"),
        ({"action": [0, 3]}, "OPE_ACTION_OUT_OF_RANGE", "action"),
        ({"action": [0.5, 1.0]}, "OPE_NOT_INTEGER", "action"),
        ({"pscore": [0.0, 0.5]}, "OPE_PSCORE_OUT_OF_RANGE", "pscore"),
        ({"pscore": [1.5, 0.5]}, "OPE_PSCORE_OUT_OF_RANGE", "pscore"),
        ({"reward": [math.nan, 0.0]}, "OPE_NOT_FINITE", "reward"),
        ({"action_dist": [[0.5, 0.6], [1.0, 0.0]]}, "OPE_ACTION_DIST_INVALID", "action_dist"),
        ({"action_dist": [[1.0, 0.0]]}, "OPE_SHAPE_MISMATCH", "action_dist"),
        ({"estimated_rewards": [[0.0]]}, "OPE_SHAPE_MISMATCH", "estimated_rewards"),
    ],
)
def test_invalid_logs_are_refused_naming_the_field(
    changes: dict[str, object], reason: str, field: str
) -> None:
    arrays: dict[str, object] = {
        "action": [0, 1],
        "reward": [1.0, 0.0],
        "pscore": [0.5, 0.5],
        "action_dist": [[1.0, 0.0], [0.0, 1.0]],
        "estimated_rewards": None,
    }
    arrays.update(changes)
    with pytest.raises(OpeInputError) as err:
        LoggedBandit.of(**arrays)  # type: ignore[arg-type]
    assert (err.value.reason, err.value.field) == (reason, field)


def test_no_rounds_and_dr_without_a_model_are_refused() -> None:
    with pytest.raises(OpeInputError) as err:
        LoggedBandit.of(np.zeros(0, dtype=int), np.zeros(0), np.zeros(0), np.zeros((0, 2)))
    assert err.value.reason == "OPE_NO_ROUNDS"
    data = LoggedBandit.of([0], [1.0], [0.5], [[1.0, 0.0]])
    with pytest.raises(OpeInputError) as err:
        ope.estimate(data, "dr")
    assert err.value.reason == "OPE_NO_REWARD_MODEL"
    with pytest.raises(OpeInputError) as err:
        ope.estimate(data, "ips", confidence=1.0)
    assert err.value.reason == "OPE_CONFIDENCE_INVALID"
    assert set(ope.estimate_all(data)) == {"ips", "snips"}
