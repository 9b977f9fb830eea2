"""A contextual bandit for offers: linear Thompson sampling, one Gaussian
posterior per offer over the propensity model's features.

The reward model of offer a is x_a . theta_a, where x_a is [1, the customer's
standardized context, the propensity model's prediction for a]. The prior mean
puts weight 1 on the prediction, so a new offer starts from what the
propensity model believes and the bandit learns the corrections online.

The logged probability is exact, not estimated after the fact: the policy
draws `samples` posterior samples, takes the share of draws each offer wins
as its probability, and then picks the offer from exactly that distribution.
That is what off-policy evaluation (inverse propensity scoring) needs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

# Standardization of the propensity context (features.PROPENSITY_CONTEXT).
CONTEXT_CENTER = np.array([2.0, 14.0, 3.0, 8.0, 7.0, 0.0, 10.0, 0.7, 2.0])
CONTEXT_SCALE = np.array([1.0, 5.0, 2.0, 3.0, 4.0, 10.0, 3.0, 0.2, 1.0])


def arm_features(context: Sequence[float], propensity: float) -> FloatArray:
    z = (np.asarray(context, dtype=np.float64) - CONTEXT_CENTER) / CONTEXT_SCALE
    return np.concatenate(([1.0], z, [propensity]))


DIMENSION = 2 + len(CONTEXT_CENTER)
# The shipped ai.bandit.max_arms, for callers that build a bandit by hand.
DEFAULT_MAX_ARMS = 100_000


@dataclass
class _Arm:
    precision: FloatArray
    weighted: FloatArray
    mean: FloatArray = field(init=False)
    cholesky: FloatArray = field(init=False)
    updates: int = 0

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        covariance = np.linalg.inv(self.precision)
        self.mean = covariance @ self.weighted
        self.cholesky = np.linalg.cholesky((covariance + covariance.T) / 2.0)


@dataclass(frozen=True)
class Choice:
    chosen_index: int
    probabilities: FloatArray


class LinearThompsonBandit:
    def __init__(
        self,
        prior_variance: float,
        noise_variance: float,
        samples: int,
        seed: int,
        max_arms: int = DEFAULT_MAX_ARMS,
    ) -> None:
        assert prior_variance > 0 and noise_variance > 0 and samples > 0 and max_arms > 0
        self._prior_precision = np.eye(DIMENSION) / prior_variance
        self._prior_mean = np.zeros(DIMENSION)
        self._prior_mean[-1] = 1.0
        self._noise_variance = noise_variance
        self._samples = samples
        self._rng = np.random.default_rng(seed)
        # Arms an outcome has taught, at most max_arms (ai.bandit.max_arms),
        # the least recently updated dropped first (back to the prior). Ranking
        # an offer stores nothing: an arm no outcome has reached is the prior,
        # shared, so candidates a caller makes up cost no memory.
        self._max_arms = max_arms
        self._arms: OrderedDict[str, _Arm] = OrderedDict()
        self._prior_arm = _Arm(
            self._prior_precision.copy(), self._prior_precision @ self._prior_mean
        )

    def _arm(self, arm_id: str) -> _Arm:
        # Reading does not refresh an arm's place: only updates do, so which
        # arms are kept depends on the outcomes alone (in order), the same on
        # every replica that applied them, whatever each one ranked.
        arm = self._arms.get(arm_id)
        return self._prior_arm if arm is None else arm

    def _learning_arm(self, arm_id: str) -> _Arm:
        arm = self._arms.get(arm_id)
        if arm is not None:
            self._arms.move_to_end(arm_id)
            return arm
        precision = self._prior_precision.copy()
        arm = self._arms[arm_id] = _Arm(precision, precision @ self._prior_mean)
        while len(self._arms) > self._max_arms:
            self._arms.popitem(last=False)
        return arm

    def arm_count(self) -> int:
        return len(self._arms)

    def choose(self, arm_ids: Sequence[str], features: Sequence[FloatArray]) -> Choice:
        """Probabilities of each arm under the policy, and the arm picked."""
        assert arm_ids and len(arm_ids) == len(features)
        values = np.empty((self._samples, len(arm_ids)))
        for j, (arm_id, x) in enumerate(zip(arm_ids, features, strict=True)):
            arm = self._arm(arm_id)
            # theta ~ N(mean, L L^T), so theta . x ~ mean . x + z . (L^T x).
            draws = self._rng.standard_normal((self._samples, DIMENSION))
            values[:, j] = arm.mean @ x + draws @ (arm.cholesky.T @ x)
        winners = np.argmax(values, axis=1)
        probabilities = np.bincount(winners, minlength=len(arm_ids)) / self._samples
        chosen = int(self._rng.choice(len(arm_ids), p=probabilities))
        return Choice(chosen, probabilities)

    def update(self, arm_id: str, x: FloatArray, reward: float) -> None:
        arm = self._learning_arm(arm_id)
        arm.precision += np.outer(x, x) / self._noise_variance
        arm.weighted += x * reward / self._noise_variance
        arm.updates += 1
        arm.refresh()

    def expected_reward(self, arm_id: str, x: FloatArray) -> float:
        return float(self._arm(arm_id).mean @ x)

    # ---- snapshot ----

    def state(self) -> dict[str, npt.NDArray[np.generic]]:
        """The posterior as arrays (arms oldest update first): what a snapshot
        stores. precision and weighted determine an arm; mean and cholesky
        are derived from them."""
        ids = list(self._arms)
        arms = list(self._arms.values())
        return {
            "arm_ids": np.asarray(ids, dtype=np.str_),
            "precision": np.asarray([a.precision for a in arms]).reshape(
                len(arms), DIMENSION, DIMENSION
            ),
            "weighted": np.asarray([a.weighted for a in arms]).reshape(len(arms), DIMENSION),
            "updates": np.asarray([a.updates for a in arms], dtype=np.int64),
        }

    def load_state(self, state: dict[str, npt.NDArray[np.generic]]) -> None:
        """Replaces the posterior with a state() taken earlier (same dimension)."""
        arms: OrderedDict[str, _Arm] = OrderedDict()
        precision = np.asarray(state["precision"], dtype=np.float64)
        weighted = np.asarray(state["weighted"], dtype=np.float64)
        for i, arm_id in enumerate(state["arm_ids"].tolist()):
            arm = _Arm(precision[i].copy(), weighted[i].copy())
            arm.updates = int(state["updates"][i])
            arms[str(arm_id)] = arm
        while len(arms) > self._max_arms:
            arms.popitem(last=False)
        self._arms = arms

    def posterior(self, arm_id: str) -> tuple[FloatArray, FloatArray]:
        """(precision, weighted) of an arm: the prior's when none is learned."""
        arm = self._arm(arm_id)
        return arm.precision.copy(), arm.weighted.copy()
