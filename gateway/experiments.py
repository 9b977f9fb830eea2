"""Experiment assignment: deterministic hashing of (tenant, experiment, customer
token) into arms, and one global holdout per tenant.

The holdout is drawn first, from (tenant, customer token) alone, so a held-out
customer is held out of every experiment and every offer: that is what lift is
measured against. The rest are split between an experiment's arms by weight,
from a hash salted per experiment, so experiments are independent of each
other and of the holdout. SHA-256 makes the split stable across processes,
restarts and languages: the same customer lands in the same arm everywhere.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from triplane.runtime.config import ExperimentConfig, GatewayConfig
from triplane.runtime.errors import InvalidArgument, NotFound

HOLDOUT_ARM = "holdout"
# Part of the holdout hash: changing it would reshuffle every tenant's holdout.
HOLDOUT_SALT = "triplane-global-holdout-v1"
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_SCALE = float(1 << 64)


def unit_interval(*parts: str) -> float:
    """A uniform number in [0, 1) from the parts (SHA-256, first 64 bits)."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


@dataclass(frozen=True, slots=True)
class Assignment:
    experiment: str
    # The arm's name, or "holdout".
    arm: str
    holdout: bool


@dataclass(frozen=True, slots=True)
class _Experiment:
    name: str
    salt: str
    arms: tuple[str, ...]
    # Upper bounds of each arm's share of [0, 1), the last one exactly 1.0.
    bounds: tuple[float, ...]


class Experiments:
    def __init__(self, experiments: list[ExperimentConfig], holdout_share: float) -> None:
        if not 0.0 <= holdout_share < 1.0:
            raise InvalidArgument(
                "HOLDOUT_SHARE_INVALID",
                f"holdout_share must be in [0, 1), not {holdout_share}",
                "gateway.holdout_share",
            )
        self.holdout_share = holdout_share
        self._experiments: dict[str, _Experiment] = {}
        for index, experiment in enumerate(experiments):
            compiled = _compile(experiment, f"gateway.experiments[{index}]")
            if compiled.name in self._experiments:
                raise InvalidArgument(
                    "EXPERIMENT_DUPLICATE",
                    f"experiment {compiled.name!r} is defined twice",
                    f"gateway.experiments[{index}].name",
                )
            self._experiments[compiled.name] = compiled

    @classmethod
    def from_config(cls, config: GatewayConfig) -> Experiments:
        return cls(config.experiments, config.holdout_share)

    def names(self) -> list[str]:
        return sorted(self._experiments)

    def in_holdout(self, tenant_id: str, customer_token: str) -> bool:
        return unit_interval(HOLDOUT_SALT, tenant_id, customer_token) < self.holdout_share

    def assign(self, tenant_id: str, experiment: str, customer_token: str) -> Assignment:
        """The customer's arm in `experiment` (or the global holdout)."""
        compiled = self._experiments.get(experiment)
        if compiled is None:
            raise NotFound("EXPERIMENT_NOT_FOUND", f"no experiment {experiment!r}", "experiment")
        if not customer_token:
            raise InvalidArgument(
                "CUSTOMER_TOKEN_MISSING", "customer token is required", "customer_id"
            )
        if self.in_holdout(tenant_id, customer_token):
            return Assignment(experiment, HOLDOUT_ARM, True)
        point = unit_interval(compiled.salt, tenant_id, experiment, customer_token)
        for arm, bound in zip(compiled.arms, compiled.bounds, strict=True):
            if point < bound:
                return Assignment(experiment, arm, False)
        return Assignment(experiment, compiled.arms[-1], False)


def _compile(experiment: ExperimentConfig, where: str) -> _Experiment:
    if not _NAME.fullmatch(experiment.name):
        raise InvalidArgument(
            "EXPERIMENT_NAME_INVALID", "name must match [A-Za-z0-9_.:-]{1,64}", f"{where}.name"
        )
    if not experiment.arms:
        raise InvalidArgument("EXPERIMENT_ARMS_EMPTY", "an experiment needs arms", f"{where}.arms")
    names = [arm.name for arm in experiment.arms]
    if len(set(names)) != len(names) or HOLDOUT_ARM in names:
        raise InvalidArgument(
            "EXPERIMENT_ARMS_INVALID",
            f"arm names must be unique and not {HOLDOUT_ARM!r}",
            f"{where}.arms",
        )
    if any(arm.weight <= 0 for arm in experiment.arms):
        raise InvalidArgument(
            "EXPERIMENT_WEIGHT_INVALID", "arm weights must be positive", f"{where}.arms"
        )
    total = sum(arm.weight for arm in experiment.arms)
    bounds: list[float] = []
    running = 0.0
    for arm in experiment.arms:
        running += arm.weight
        bounds.append(running / total)
    bounds[-1] = 1.0
    return _Experiment(
        experiment.name, experiment.salt or experiment.name, tuple(names), tuple(bounds)
    )
