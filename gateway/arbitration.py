"""Arbitration of the next best action: pure functions, no I/O.

By default the learner decides (gateway.arbitration.policy learner): the AI
plane's contextual learner already maximizes value x levers over the eligible
set and draws the offer from the distribution it logs, so `follow_learner`
shows its choice with exactly that probability. The rest of this module is the
arbitration policy, kept for experiment arms that run it (arm_policies) and
for when ranking fails:

score(offer) = propensity x value x lever(offer) x lever(offer, surface) x
context weight(surface). The winner is the highest score. A configured share of
decisions follows the bandit's exploration distribution instead, so the shown
action's overall probability is

    p(a) = (1 - share) * [a is the winner] + share * bandit(a)

and it is logged with the exposure for off-policy evaluation. The draw is a
deterministic hash of the decision id, so a retry shows the same action.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from triplane.runtime.config import GatewayArbitrationConfig

WINNER = "ARBITRATION_WINNER"
EXPLORATION = "BANDIT_EXPLORATION"
LEARNER_BEST = "LEARNER_BEST"
LEARNER_EXPLORATION = "LEARNER_EXPLORATION"


@dataclass(frozen=True, slots=True)
class Candidate:
    offer_id: str
    value_minor: int
    propensity: float
    # Probability that the bandit picks this offer now (sums to 1 over candidates).
    bandit_probability: float


@dataclass(frozen=True, slots=True)
class Scored:
    candidate: Candidate
    score: float


@dataclass(frozen=True, slots=True)
class Choice:
    ranked: tuple[Scored, ...]
    chosen: Scored
    probability: float
    reason: str


def lever(config: GatewayArbitrationConfig, offer_id: str, surface: str) -> float:
    for item in config.levers:
        if item.offer_id == offer_id:
            return item.weight * item.surfaces.get(surface, 1.0)
    return 1.0


def score_all(
    config: GatewayArbitrationConfig,
    candidates: Sequence[Candidate],
    surface: str,
    context_weight: float,
) -> list[Scored]:
    scored = []
    for c in candidates:
        value = c.value_minor if c.value_minor > 0 else config.default_value_minor
        score = c.propensity * value * lever(config, c.offer_id, surface) * context_weight
        scored.append(Scored(c, score))
    # Ties broken by offer id, so the order never depends on arrival order.
    scored.sort(key=lambda s: (-s.score, s.candidate.offer_id))
    return scored


def unit_draw(seed: str) -> float:
    """A uniform number in [0, 1) from a string (deterministic)."""
    digest = hashlib.sha256(seed.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def bandit_distribution(candidates: Sequence[Candidate]) -> Mapping[str, float]:
    # fsum is exact, so the logged probability never depends on the order
    # in which the candidates arrived.
    total = math.fsum(max(0.0, c.bandit_probability) for c in candidates)
    if total <= 0:
        return {c.offer_id: 1.0 / len(candidates) for c in candidates}
    return {c.offer_id: max(0.0, c.bandit_probability) / total for c in candidates}


def choose(
    config: GatewayArbitrationConfig,
    candidates: Sequence[Candidate],
    surface: str,
    context_weight: float,
    seed: str,
) -> Choice:
    assert candidates, "arbitration needs at least one candidate"
    ranked = score_all(config, candidates, surface, context_weight)
    winner = ranked[0]
    share = min(1.0, max(0.0, config.exploration_share))
    bandit = bandit_distribution(candidates)

    def probability(offer_id: str) -> float:
        base = (1.0 - share) if offer_id == winner.candidate.offer_id else 0.0
        return base + share * bandit[offer_id]

    u = unit_draw(seed)
    if u >= share:
        return Choice(tuple(ranked), winner, probability(winner.candidate.offer_id), WINNER)
    # Exploration: draw from the bandit's distribution with the rest of u.
    target = u / share if share > 0 else 0.0
    cumulative = 0.0
    in_order = sorted(ranked, key=lambda s: s.candidate.offer_id)
    # Rounding can leave the cumulative sum a hair under 1: then the last
    # action the bandit gives any probability, never one it gives none.
    chosen = next(s for s in reversed(in_order) if bandit[s.candidate.offer_id] > 0)
    for item in in_order:
        cumulative += bandit[item.candidate.offer_id]
        if target < cumulative:
            chosen = item
            break
    reason = WINNER if chosen is winner else EXPLORATION
    return Choice(tuple(ranked), chosen, probability(chosen.candidate.offer_id), reason)


def follow_learner(
    config: GatewayArbitrationConfig,
    candidates: Sequence[Candidate],
    surface: str,
    context_weight: float,
    chosen_offer_id: str,
    chosen_probability: float,
) -> Choice:
    """The learner's choice, shown as drawn: the logged probability is the
    learner's own. Alternatives follow in the learner's order (its
    probability, then offer id); the arbitration score is kept for display."""
    assert candidates, "the learner needs at least one candidate"
    all_scored = score_all(config, candidates, surface, context_weight)
    scored = {s.candidate.offer_id: s for s in all_scored}
    ranked = sorted(
        scored.values(), key=lambda s: (-s.candidate.bandit_probability, s.candidate.offer_id)
    )
    chosen = scored[chosen_offer_id]
    best = ranked[0].candidate.bandit_probability
    reason = LEARNER_BEST if chosen.candidate.bandit_probability >= best else LEARNER_EXPLORATION
    return Choice(tuple(ranked), chosen, chosen_probability, reason)
