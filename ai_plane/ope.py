"""Off-policy evaluation: the value of a candidate policy estimated from
traffic another policy (the logging policy) chose, using the probability the
logging policy chose each shown action with.

Pure numpy over one clean input type (`LoggedBandit`), so it depends on no
storage: whoever holds the exposure log turns it into arrays.

Definitions follow the Open Bandit Pipeline (obp.ope), for n logged rounds
(x_i, a_i, r_i) with logging probability pi_b(a_i | x_i) (`pscore`), the
candidate's action distribution pi_e(. | x_i) (`action_dist`) and the
importance weight w_i = pi_e(a_i | x_i) / pi_b(a_i | x_i):

* IPS (obp InverseProbabilityWeighting): V = mean_i(w_i r_i). Unbiased when
  pscore is exact and pi_b covers every action pi_e takes.
* SNIPS (obp SelfNormalizedInverseProbabilityWeighting):
  V = sum_i(w_i r_i) / sum_i(w_i). Slightly biased, bounded by the reward
  range, lower variance.
* DR (obp DoublyRobust): with a reward model q(x, a) (`estimated_rewards`),
  V = mean_i( sum_a pi_e(a | x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i)) ).
  Unbiased if either pscore or q is exact. With q = 0 it is IPS; with q equal
  to the true expected reward, only the reward noise remains.

Confidence intervals (the choice made here): by default a central-limit
(Wald) interval, value +- z * stderr. IPS and DR are means of independent
per-round terms, so stderr is the sample standard deviation of those terms
over sqrt(n); SNIPS is a ratio, so its stderr is the delta method's (the
terms w_i (r_i - V) / mean(w)). OBP's own default is a bootstrap
(estimate_confidence_interval_by_bootstrap): `interval="bootstrap"` gives a
percentile bootstrap that resamples rounds and recomputes the estimator
(SNIPS's ratio included), seeded, so it is reproducible. The CLT interval is
the default because it costs O(n), where the bootstrap costs O(n x B), and
the calibration (bench/nba.py, ope_* keys) checks its coverage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

Estimator = Literal["ips", "snips", "dr"]
ESTIMATORS: tuple[Estimator, ...] = ("ips", "snips", "dr")
Interval = Literal["clt", "bootstrap"]
# How far a row of action_dist may be from summing to 1.
_SUM_TOLERANCE = 1e-6


class OpeInputError(ValueError):
    """Logged data the estimators cannot use: a machine-readable reason and
    the field at fault."""

    def __init__(self, reason: str, field: str, message: str) -> None:
        super().__init__(f"{reason}: {field}: {message}")
        self.reason = reason
        self.field = field
        self.message = message


@dataclass(frozen=True)
class LoggedBandit:
    """n logged rounds over K action slots (a round's eligible actions are
    numbered 0..K-1; a round with fewer eligible actions gives the others
    probability 0 in action_dist).

    action: (n,) the slot shown; reward: (n,) what it earned; pscore: (n,)
    the logging policy's probability of that action, in (0, 1];
    action_dist: (n, K) the candidate policy's probabilities, rows summing
    to 1; estimated_rewards: (n, K) a reward model's expected reward of each
    action (DR only; absent: DR is refused)."""

    action: IntArray
    reward: FloatArray
    pscore: FloatArray
    action_dist: FloatArray
    estimated_rewards: FloatArray | None = None

    @staticmethod
    def of(
        action: npt.ArrayLike,
        reward: npt.ArrayLike,
        pscore: npt.ArrayLike,
        action_dist: npt.ArrayLike,
        estimated_rewards: npt.ArrayLike | None = None,
    ) -> LoggedBandit:
        """Checked arrays; OpeInputError names the first problem."""
        data = LoggedBandit(
            _ints(action, "action"),
            _floats(reward, "reward", 1),
            _floats(pscore, "pscore", 1),
            _floats(action_dist, "action_dist", 2),
            None
            if estimated_rewards is None
            else _floats(estimated_rewards, "estimated_rewards", 2),
        )
        data.check()
        return data

    @property
    def rounds(self) -> int:
        return int(self.action.shape[0])

    def check(self) -> None:
        n = self.action.shape[0]
        if n == 0:
            raise OpeInputError("OPE_NO_ROUNDS", "action", "no logged rounds")
        for name, array in (("reward", self.reward), ("pscore", self.pscore)):
            if array.shape != (n,):
                raise OpeInputError(
                    "OPE_SHAPE_MISMATCH", name, f"shape {array.shape}, expected ({n},)"
                )
        if self.action_dist.ndim != 2 or self.action_dist.shape[0] != n:
            raise OpeInputError(
                "OPE_SHAPE_MISMATCH",
                "action_dist",
                f"shape {self.action_dist.shape}, expected ({n}, K)",
            )
        k = self.action_dist.shape[1]
        if self.estimated_rewards is not None and self.estimated_rewards.shape != (n, k):
            raise OpeInputError(
                "OPE_SHAPE_MISMATCH",
                "estimated_rewards",
                f"shape {self.estimated_rewards.shape}, expected ({n}, {k})",
            )
        if np.any((self.action < 0) | (self.action >= k)):
            raise OpeInputError("OPE_ACTION_OUT_OF_RANGE", "action", f"outside 0..{k - 1}")
        if np.any(~(self.pscore > 0.0)) or np.any(self.pscore > 1.0):
            raise OpeInputError(
                "OPE_PSCORE_OUT_OF_RANGE",
                "pscore",
                "a logging probability outside (0, 1]: a round without its exact "
                "probability cannot be weighted",
            )
        if np.any(self.action_dist < 0.0) or np.any(
            np.abs(self.action_dist.sum(axis=1) - 1.0) > _SUM_TOLERANCE
        ):
            raise OpeInputError(
                "OPE_ACTION_DIST_INVALID",
                "action_dist",
                "every row must be probabilities summing to 1",
            )

    def weights(self) -> FloatArray:
        """w_i = pi_e(a_i | x_i) / pi_b(a_i | x_i)."""
        chosen: FloatArray = self.action_dist[np.arange(self.rounds), self.action]
        weights: FloatArray = chosen / self.pscore
        return weights


@dataclass(frozen=True)
class Estimate:
    estimator: str
    value: float
    lower: float
    upper: float
    stderr: float
    rounds: int
    confidence: float
    interval: str
    # Kish's effective sample size of the importance weights, sum(w)^2 /
    # sum(w^2): how many on-policy rounds the estimate is worth (n for the
    # on-policy estimate).
    effective_rounds: float

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "estimator": self.estimator,
            "value": self.value,
            "lower": self.lower,
            "upper": self.upper,
            "stderr": self.stderr,
            "rounds": self.rounds,
            "confidence": self.confidence,
            "interval": self.interval,
            "effective_rounds": self.effective_rounds,
        }


def _ints(value: npt.ArrayLike, field: str) -> IntArray:
    array = np.asarray(value)
    if array.ndim != 1:
        raise OpeInputError("OPE_SHAPE_MISMATCH", field, f"{array.ndim} dimensions, expected 1")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise OpeInputError("OPE_NOT_INTEGER", field, "action indices must be integers")
    return array.astype(np.int64)


def _floats(value: npt.ArrayLike, field: str, ndim: int) -> FloatArray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise OpeInputError("OPE_NOT_NUMERIC", field, str(err)) from None
    if array.ndim != ndim:
        raise OpeInputError(
            "OPE_SHAPE_MISMATCH", field, f"{array.ndim} dimensions, expected {ndim}"
        )
    if not np.all(np.isfinite(array)):
        raise OpeInputError("OPE_NOT_FINITE", field, "NaN or infinite values")
    return array


def _z(confidence: float) -> float:
    """The two-sided standard normal quantile for `confidence`."""
    if not 0.0 < confidence < 1.0:
        raise OpeInputError("OPE_CONFIDENCE_INVALID", "confidence", "must be in (0, 1)")
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def round_terms(data: LoggedBandit, estimator: Estimator) -> FloatArray:
    """Per-round terms whose mean is IPS or DR (OBP's _estimate_round_rewards);
    for SNIPS, w_i r_i / mean(w)."""
    w = data.weights()
    if estimator == "ips":
        return w * data.reward
    if estimator == "snips":
        mean_w = float(w.mean())
        return w * data.reward / mean_w if mean_w > 0 else np.zeros_like(w)
    if estimator == "dr":
        q = data.estimated_rewards
        if q is None:
            raise OpeInputError(
                "OPE_NO_REWARD_MODEL", "estimated_rewards", "DR needs a reward model's estimates"
            )
        direct = (data.action_dist * q).sum(axis=1)
        q_chosen = q[np.arange(data.rounds), data.action]
        terms: FloatArray = direct + w * (data.reward - q_chosen)
        return terms
    raise OpeInputError("OPE_ESTIMATOR_UNKNOWN", "estimator", f"{estimator!r}")


def _value(data: LoggedBandit, estimator: Estimator, rows: IntArray | slice) -> float:
    w = data.weights()[rows]
    r = data.reward[rows]
    if estimator == "snips":
        total = float(w.sum())
        return float((w * r).sum() / total) if total > 0 else 0.0
    if estimator == "ips":
        return float((w * r).mean())
    q = data.estimated_rewards
    assert q is not None
    picked = np.arange(data.rounds)[rows]
    direct = (data.action_dist[rows] * q[rows]).sum(axis=1)
    return float((direct + w * (r - q[picked, data.action[rows]])).mean())


def estimate(
    data: LoggedBandit,
    estimator: Estimator = "dr",
    confidence: float = 0.95,
    interval: Interval = "clt",
    bootstrap_samples: int = 2000,
    seed: int = 0,
) -> Estimate:
    """The candidate's estimated value with a two-sided interval."""
    terms = round_terms(data, estimator)  # validates the estimator and DR's input
    n = data.rounds
    z = _z(confidence)
    w = data.weights()
    value = _value(data, estimator, slice(None))
    if estimator == "snips":
        mean_w = float(w.mean())
        influence = w * (data.reward - value) / mean_w if mean_w > 0 else np.zeros_like(w)
    else:
        influence = terms
    stderr = float(influence.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    if interval == "clt":
        lower, upper = value - z * stderr, value + z * stderr
    elif interval == "bootstrap":
        if bootstrap_samples < 10:
            raise OpeInputError("OPE_BOOTSTRAP_SAMPLES_INVALID", "bootstrap_samples", "at least 10")
        rng = np.random.default_rng(seed)
        values = np.empty(bootstrap_samples)
        for b in range(bootstrap_samples):
            values[b] = _value(data, estimator, rng.integers(0, n, size=n))
        alpha = 1.0 - confidence
        lower = float(np.quantile(values, alpha / 2.0))
        upper = float(np.quantile(values, 1.0 - alpha / 2.0))
    else:
        raise OpeInputError("OPE_INTERVAL_UNKNOWN", "interval", f"{interval!r}")
    sum_w2 = float((w * w).sum())
    effective = float(w.sum()) ** 2 / sum_w2 if sum_w2 > 0 else 0.0
    return Estimate(
        estimator, value, float(lower), float(upper), stderr, n, confidence, interval, effective
    )


def estimate_all(
    data: LoggedBandit, confidence: float = 0.95, interval: Interval = "clt", seed: int = 0
) -> dict[str, Estimate]:
    """IPS, SNIPS and (when data has a reward model) DR."""
    names = [e for e in ESTIMATORS if e != "dr" or data.estimated_rewards is not None]
    return {e: estimate(data, e, confidence, interval, seed=seed) for e in names}


def on_policy(reward: npt.ArrayLike, confidence: float = 0.95) -> Estimate:
    """The logging policy's own value: the mean logged reward (CLT interval)."""
    r = _floats(reward, "reward", 1)
    n = int(r.shape[0])
    if n == 0:
        raise OpeInputError("OPE_NO_ROUNDS", "reward", "no logged rounds")
    value = float(r.mean())
    stderr = float(r.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    z = _z(confidence)
    return Estimate(
        "on_policy", value, value - z * stderr, value + z * stderr, stderr, n, confidence,
        "clt", float(n),
    )  # fmt: skip


def greedy_distribution(scores: npt.ArrayLike, eligible: npt.ArrayLike | None = None) -> FloatArray:
    """A deterministic policy's action distribution: probability 1 on the
    highest score among the eligible slots of each row, ties shared evenly."""
    s = _floats(scores, "scores", 2)
    mask = np.ones_like(s, dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    if mask.shape != s.shape:
        raise OpeInputError("OPE_SHAPE_MISMATCH", "eligible", f"shape {mask.shape} != {s.shape}")
    if not np.all(mask.any(axis=1)):
        raise OpeInputError("OPE_NO_ELIGIBLE_ACTION", "eligible", "a round with no eligible slot")
    masked = np.where(mask, s, -np.inf)
    best = masked == masked.max(axis=1, keepdims=True)
    dist: FloatArray = best / best.sum(axis=1, keepdims=True)
    return dist
