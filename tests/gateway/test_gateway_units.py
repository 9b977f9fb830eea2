"""Unit and property tests of the gateway's pure parts: arbitration, PII
tokenization and the request comparison behind remembered answers (no planes
needed; the store itself is tested in test_idempotency.py)."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import arbitration
from gateway.arbitration import Candidate
from gateway.idempotency import first_difference, flatten
from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.runtime.config import GatewayArbitrationConfig, OfferLeverConfig

# ---------------------------------------------------------------- arbitration


def _config(share: float, levers: list[OfferLeverConfig] | None = None) -> GatewayArbitrationConfig:
    return GatewayArbitrationConfig(
        default_value_minor=1000, exploration_share=share, levers=levers or [], surfaces=[]
    )


candidates_strategy = st.lists(
    st.builds(
        Candidate,
        offer_id=st.text("abcdefgh", min_size=1, max_size=6),
        value_minor=st.integers(0, 100_000),
        propensity=st.floats(0.0, 1.0),
        bandit_probability=st.floats(0.0, 1.0),
    ),
    min_size=1,
    max_size=6,
    unique_by=lambda c: c.offer_id,
)


def test_the_learner_is_never_overridden_by_arbitration() -> None:
    # A lever that would make arbitration pick "boosted" every time: the
    # learner's choice is shown all the same, with the learner's probability.
    config = _config(0.0, [OfferLeverConfig(offer_id="boosted", weight=100.0, surfaces={})])
    candidates = [
        Candidate("boosted", 5000, 0.9, 0.1),
        Candidate("learned", 100, 0.1, 0.7),
        Candidate("other", 100, 0.1, 0.2),
    ]
    assert arbitration.choose(
        config, candidates, "checkout", 1.0, "s"
    ).chosen.candidate.offer_id == ("boosted")
    for chosen, probability, reason in (
        ("learned", 0.7, arbitration.LEARNER_BEST),
        ("other", 0.2, arbitration.LEARNER_EXPLORATION),
    ):
        choice = arbitration.follow_learner(
            config, candidates, "checkout", 1.0, chosen, probability
        )
        assert choice.chosen.candidate.offer_id == chosen
        assert choice.probability == probability and choice.reason == reason
        # Alternatives in the learner's order.
        assert [s.candidate.offer_id for s in choice.ranked] == ["learned", "other", "boosted"]


def test_arm_policies_name_learner_or_arbitration_only() -> None:
    from triplane.runtime.config import ConfigError, load_config

    shipped = load_config(environ={})
    assert shipped.gateway.arbitration.policy == "learner"
    assert shipped.ai.learner.engine == "vw"
    load_config(
        environ={},
        overrides={"gateway": {"arbitration": {"arm_policies": {"control": "arbitration"}}}},
    )
    with pytest.raises(ConfigError):
        load_config(
            environ={}, overrides={"gateway": {"arbitration": {"arm_policies": {"x": "greedy"}}}}
        )


@settings(max_examples=200, deadline=None)
@given(
    candidates=candidates_strategy,
    share=st.floats(0.0, 1.0),
    seed=st.text(min_size=1, max_size=20),
)
def test_choice_probability_is_the_logged_mixture(
    candidates: list[Candidate], share: float, seed: str
) -> None:
    config = _config(share)
    choice = arbitration.choose(config, candidates, "checkout", 1.0, seed)
    bandit = arbitration.bandit_distribution(candidates)
    winner = choice.ranked[0].candidate.offer_id

    def p(offer_id: str) -> float:
        return (1.0 - share) * (offer_id == winner) + share * bandit[offer_id]

    # The distribution the logged probabilities come from sums to one ...
    assert sum(p(c.offer_id) for c in candidates) == pytest.approx(1.0)
    # ... the chosen action's logged probability is its share of it, never 0
    # (an action shown with probability 0 would break off-policy evaluation) ...
    assert choice.probability == pytest.approx(p(choice.chosen.candidate.offer_id))
    assert choice.probability > 0
    # ... the ranking is by score, ties by offer id, and a retry is identical.
    keys = [(-s.score, s.candidate.offer_id) for s in choice.ranked]
    assert keys == sorted(keys)
    assert arbitration.choose(config, list(reversed(candidates)), "checkout", 1.0, seed) == choice


def test_levers_and_context_weight_change_the_winner() -> None:
    cheap = Candidate("cashback", value_minor=500, propensity=0.5, bandit_probability=0.5)
    rich = Candidate("bnpl", value_minor=1000, propensity=0.4, bandit_probability=0.5)
    assert (
        arbitration.choose(_config(0.0), [cheap, rich], "checkout", 1.0, "s").chosen.candidate
        == rich
    )
    boosted = _config(0.0, [OfferLeverConfig("cashback", 1.0, {"checkout": 3.0})])
    assert (
        arbitration.choose(boosted, [cheap, rich], "checkout", 1.0, "s").chosen.candidate == cheap
    )
    # The surface multiplier applies only on its surface.
    assert arbitration.choose(boosted, [cheap, rich], "app_home", 1.0, "s").chosen.candidate == rich
    # An offer without a value still competes at the default value.
    free = Candidate("savings", value_minor=0, propensity=0.9, bandit_probability=0.0)
    ranked = arbitration.score_all(_config(0.0), [free], "checkout", 2.0)
    assert ranked[0].score == pytest.approx(0.9 * 1000 * 2.0)


def test_exploration_frequency_follows_the_bandit() -> None:
    share = 0.2
    candidates = [
        Candidate("a", 1000, 0.9, 0.1),
        Candidate("b", 1000, 0.1, 0.3),
        Candidate("c", 1000, 0.1, 0.6),
    ]
    shown = collections.Counter(
        arbitration.choose(
            _config(share), candidates, "checkout", 1.0, f"decision-{i}"
        ).chosen.candidate.offer_id
        for i in range(20_000)
    )
    expected = {"a": 0.8 + 0.2 * 0.1, "b": 0.2 * 0.3, "c": 0.2 * 0.6}
    for offer_id, probability in expected.items():
        assert shown[offer_id] / 20_000 == pytest.approx(probability, abs=0.012)


# ---------------------------------------------------------------- remembered answers


def _authorize(amount: int = 500, **attributes: str) -> gw.AuthorizePaymentRequest:
    return gw.AuthorizePaymentRequest(
        tenant_id="t1",
        idempotency_key="k1",
        account_id="acct",
        credit_account_id="merchant",
        amount=types_pb2.Money(amount_minor=amount, currency="USD"),
        attributes=attributes,
    )


def test_flatten_names_the_first_differing_field() -> None:
    skip = frozenset({"idempotency_key"})
    base = flatten(_authorize(500, basket="3"), skip)
    assert "idempotency_key" not in base
    assert first_difference(base, flatten(_authorize(500, basket="3"), skip)) == ""
    assert first_difference(base, flatten(_authorize(600, basket="3"), skip)) == (
        "amount.amount_minor"
    )
    assert first_difference(base, flatten(_authorize(500, basket="4"), skip)) == (
        "attributes[basket]"
    )
    assert first_difference(base, flatten(_authorize(500), skip)) == "attributes[basket]"
