"""The contextual learner (ai.learner.engine vw): Vowpal Wabbit's
--cb_explore_adf per tenant on the request's context and the offers' catalog
entries, driven through the AI engine's Rank, ReportOutcome and the reward
window sweep. No Triton: with no live model every propensity is 0 and the
learner ranks on context and catalog alone. Time is a ManualClock; streams are
seeded; assertions are on learned preferences and on sampling error bounds,
never on a fixed answer."""

from __future__ import annotations

import math
import random
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from ai_helpers import ai_config

from ai_plane.bandit import LinearThompsonBandit
from ai_plane.breaker import CircuitBreaker
from ai_plane.engine import AiEngine, Candidate, RankAnswer, RankQuery
from ai_plane.features import OfferEntry
from ai_plane.learner import VwLearner, example_lines
from ai_plane.scorer import Scorer
from ai_plane.store.base import build_store
from triplane.ai.v1 import ai_pb2
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config
from triplane.runtime.deadline import Deadline

CONVERTED = ai_pb2.OUTCOME_KIND_CONVERTED
IGNORED = ai_pb2.OUTCOME_KIND_IGNORED


def learner_config(state: Path, **learner: object) -> Config:
    return ai_config(
        state,
        {
            "learner": {"engine": "vw", "reward_window_s": 600, **learner},
            "bandit": {"outcomes": "local"},
        },
    )


def make_engine(config: Config, clock: ManualClock) -> AiEngine:
    ai = config.ai
    breaker = CircuitBreaker(ai.breaker.failure_threshold, ai.breaker.open_s)
    bandit = LinearThompsonBandit(0.05, 0.1, 8, 1)
    return AiEngine(
        ai, build_store(ai.features, clock), Scorer(ai, None, breaker, clock), bandit, clock
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def engine(tmp_path: Path, clock: ManualClock) -> Iterator[AiEngine]:
    found = make_engine(learner_config(tmp_path), clock)
    yield found
    assert found.rewards is not None
    found.rewards.vw.close()


def offer(offer_id: str, product: str, category: str, value: int = 1000) -> Candidate:
    return Candidate(offer_id, OfferEntry(product, value, {"category": category}))


CATALOG = [
    offer("travel_card", "cashback", "travel"),
    offer("grocery_back", "cashback", "grocery"),
    offer("bnpl_300", "bnpl", "electronics"),
    offer("save_more", "savings", "savings"),
]


async def rank(
    engine: AiEngine,
    tenant: str,
    features: Mapping[str, float],
    candidates: list[Candidate] | None = None,
    surface: str = "checkout",
) -> RankAnswer:
    return await engine.rank(
        RankQuery(
            tenant_id=tenant,
            account_id="acct-1",
            candidates=candidates or CATALOG,
            hour_of_day=12,
            features=features,
            surface=surface,
            region="DE",
        ),
        Deadline.from_remaining(5.0),
    )


def probabilities(answer: RankAnswer) -> dict[str, float]:
    return {o.offer_id: o.exploration_probability for o in answer.offers}


async def train(
    engine: AiEngine,
    tenant: str,
    rounds: int,
    truth: Mapping[tuple[float, str], float],
    seed: int,
    candidates: list[Candidate] | None = None,
) -> None:
    """A seeded stream: context segment 0 or 1, the learner chooses, the
    outcome is a conversion with the ground truth's probability for (segment,
    the chosen offer's category)."""
    rng = random.Random(seed)
    catalog = {c.offer_id: c for c in candidates or CATALOG}
    for i in range(rounds):
        segment = float(rng.randrange(2))
        answer = await rank(engine, tenant, {"segment": segment}, candidates)
        category = catalog[answer.chosen_offer_id].entry.attributes["category"]
        converted = rng.random() < truth.get((segment, category), 0.05)
        result = await engine.outcome(
            tenant,
            answer.rank_id,
            answer.chosen_offer_id,
            0.0,
            f"o{i}",
            kind=CONVERTED if converted else IGNORED,
        )
        assert result.applied and not result.late


TRUTH = {(0.0, "travel"): 0.8, (1.0, "grocery"): 0.8}


async def test_the_same_customer_in_two_contexts_gets_different_offers(engine: AiEngine) -> None:
    tenant = f"t{uuid.uuid4().hex[:10]}"
    await train(engine, tenant, 400, TRUTH, seed=13)
    in_travel = probabilities(await rank(engine, tenant, {"segment": 0.0}))
    in_grocery = probabilities(await rank(engine, tenant, {"segment": 1.0}))
    # The learned preference, whichever the exact probabilities: each
    # context's own best offer is the most probable one there, and the two
    # contexts' favourites differ.
    assert max(in_travel, key=in_travel.__getitem__) == "travel_card"
    assert max(in_grocery, key=in_grocery.__getitem__) == "grocery_back"
    assert in_travel["travel_card"] > in_grocery["travel_card"]
    assert in_grocery["grocery_back"] > in_travel["grocery_back"]


async def test_logged_probabilities_sum_to_one_and_match_choice_frequencies(
    engine: AiEngine,
) -> None:
    tenant = f"t{uuid.uuid4().hex[:10]}"
    # A little learning, so the distribution is not uniform.
    await train(engine, tenant, 60, TRUTH, seed=5)
    n = 3000
    counts: Counter[str] = Counter()
    logged: dict[str, float] | None = None
    for _ in range(n):
        answer = await rank(engine, tenant, {"segment": 0.0})
        pmf = probabilities(answer)
        assert math.fsum(pmf.values()) == pytest.approx(1.0, abs=1e-12)
        assert answer.chosen_probability == pmf[answer.chosen_offer_id]
        # Ranking learns nothing: the distribution stays the same.
        logged = logged or pmf
        assert pmf == logged
        counts[answer.chosen_offer_id] += 1
    assert logged is not None
    assert len(set(logged.values())) > 1, "expected a learned, non-uniform distribution"
    for offer_id, p in logged.items():
        # Binomial sampling error: within 4.5 standard deviations.
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[offer_id] - n * p) <= 4.5 * sigma + 1, (offer_id, counts, logged)


async def test_tenants_never_share_parameters(engine: AiEngine) -> None:
    a, b = f"ta{uuid.uuid4().hex[:8]}", f"tb{uuid.uuid4().hex[:8]}"
    before_b = probabilities(await rank(engine, b, {"segment": 0.0}))
    await train(engine, a, 200, TRUTH, seed=3)
    # B learned nothing from A's stream: still the untrained, uniform policy.
    assert probabilities(await rank(engine, b, {"segment": 0.0})) == before_b
    assert set(before_b.values()) == {0.25}
    probe_a = probabilities(await rank(engine, a, {"segment": 0.0}))
    # B learns the opposite; A's model does not move.
    await train(engine, b, 200, {(0.0, "savings"): 0.9}, seed=4)
    assert probabilities(await rank(engine, a, {"segment": 0.0})) == probe_a
    assert engine.rewards is not None
    assert {a, b} <= set(engine.rewards.vw.model_keys())


async def test_surfaces_configured_apart_learn_apart(tmp_path: Path, clock: ManualClock) -> None:
    engine = make_engine(learner_config(tmp_path, surfaces_apart=["push"]), clock)
    tenant = f"t{uuid.uuid4().hex[:10]}"
    assert engine.model_key(tenant, "push") == f"{tenant}|push"
    assert engine.model_key(tenant, "checkout") == tenant
    before = probabilities(await rank(engine, tenant, {"segment": 0.0}, surface="push"))
    await train(engine, tenant, 100, TRUTH, seed=8)  # on checkout
    assert probabilities(await rank(engine, tenant, {"segment": 0.0}, surface="push")) == before


async def test_a_new_offer_is_ranked_from_its_attributes_on_first_sight(
    engine: AiEngine,
) -> None:
    tenant = f"t{uuid.uuid4().hex[:10]}"
    # Several grocery and travel offers, each its own id; grocery converts.
    catalog = [offer(f"g{i}", "cashback", "grocery") for i in range(3)] + [
        offer(f"t{i}", "cashback", "travel") for i in range(3)
    ]
    truth = {(s, "grocery"): 0.7 for s in (0.0, 1.0)}
    await train(engine, tenant, 300, truth, seed=21, candidates=catalog)
    fresh = [offer("new_grocery", "cashback", "grocery"), offer("new_travel", "cashback", "travel")]
    answer = await rank(engine, tenant, {"segment": 0.0}, candidates=fresh)
    pmf = probabilities(answer)
    assert pmf["new_grocery"] > pmf["new_travel"]
    # Its expected reward, too, comes from what grocery offers taught.
    assert engine.rewards is not None
    exposure = ai_pb2.LearnerExposure.FromString(
        (await engine.pending.get(answer.rank_id)).exposure  # type: ignore[union-attr]
    )
    expected = {arm.offer_id: arm.expected_reward for arm in exposure.arms}
    assert expected["new_grocery"] > expected["new_travel"]


async def test_the_window_counts_zero_once_and_a_late_outcome_does_not_double_count(
    engine: AiEngine, clock: ManualClock
) -> None:
    rewards = engine.rewards
    assert rewards is not None
    tenant = f"t{uuid.uuid4().hex[:10]}"
    silent = await rank(engine, tenant, {"segment": 0.0})
    answered = await rank(engine, tenant, {"segment": 1.0})
    # Within the window: the outcome is the ranking's reward.
    result = await engine.outcome(
        tenant, answered.rank_id, answered.chosen_offer_id, 0.0, "in-time", kind=CONVERTED
    )
    assert result.applied and not result.late
    assert rewards.vw.learned == 1
    assert await engine.sweep() == 0  # no window closed yet
    clock.advance(601)
    # The silent ranking's window closed: one 0; the answered one is settled.
    assert await engine.sweep() == 1
    assert rewards.vw.learned == 2
    assert await engine.sweep() == 0
    assert rewards.vw.learned == 2
    # The late outcome is recorded (late), not learned.
    late = await engine.outcome(
        tenant, silent.rank_id, silent.chosen_offer_id, 0.0, "too-late", kind=CONVERTED
    )
    assert late.late and not late.applied
    assert rewards.vw.learned == 2 and rewards.late == 1
    # A repeat of it is a repeat; a second outcome for the answered ranking
    # within its window would not count either (one reward per ranking).
    again = await engine.outcome(
        tenant, silent.rank_id, silent.chosen_offer_id, 0.0, "too-late", kind=CONVERTED
    )
    assert not again.applied
    assert rewards.vw.learned == 2


async def test_an_outcome_is_late_by_when_it_happened_not_when_it_arrived(
    engine: AiEngine, clock: ManualClock
) -> None:
    tenant = f"t{uuid.uuid4().hex[:10]}"
    answer = await rank(engine, tenant, {"segment": 0.0})
    happened = clock.now_us() + 500_000_000  # within the 600 s window
    clock.advance(900)  # delivered after it closed (the pipeline, after an outage)
    result = await engine.outcome(
        tenant,
        answer.rank_id,
        answer.chosen_offer_id,
        0.0,
        "delayed",
        kind=CONVERTED,
        at_us=happened,
    )
    assert result.applied and not result.late
    assert await engine.sweep() == 0  # settled: no window 0 as well


async def test_a_held_out_ranking_is_never_rewarded(engine: AiEngine, clock: ManualClock) -> None:
    tenant = f"t{uuid.uuid4().hex[:10]}"
    held = await engine.rank(
        RankQuery(
            tenant_id=tenant,
            account_id="acct-1",
            candidates=CATALOG,
            hour_of_day=12,
            held_out=True,
        ),
        Deadline.from_remaining(5.0),
    )
    clock.advance(601)
    assert await engine.sweep() == 0
    result = await engine.outcome(tenant, held.rank_id, held.chosen_offer_id, 1.0, "h")
    assert not result.applied
    assert engine.rewards is not None and engine.rewards.vw.learned == 0


async def test_only_the_chosen_offer_can_be_rewarded(engine: AiEngine) -> None:
    from triplane.runtime.errors import InvalidArgument

    tenant = f"t{uuid.uuid4().hex[:10]}"
    answer = await rank(engine, tenant, {"segment": 0.0})
    other = next(o.offer_id for o in answer.offers if o.offer_id != answer.chosen_offer_id)
    with pytest.raises(InvalidArgument) as caught:
        await engine.outcome(tenant, answer.rank_id, other, 1.0, "x", kind=CONVERTED)
    assert caught.value.reason == "OFFER_NOT_CHOSEN"


async def test_value_and_levers_are_inside_the_objective(engine: AiEngine) -> None:
    tenant = f"t{uuid.uuid4().hex[:10]}"
    candidates = [
        Candidate("cheap", OfferEntry("cashback", 1000, {"category": "a"}), lever=1.0),
        Candidate("dear", OfferEntry("cashback", 5000, {"category": "b"}), lever=1.0),
        Candidate("boosted", OfferEntry("cashback", 1000, {"category": "c"}), lever=3.0),
    ]
    answer = await rank(engine, tenant, {}, candidates=candidates)
    exposure = ai_pb2.LearnerExposure.FromString(
        (await engine.pending.get(answer.rank_id)).exposure  # type: ignore[union-attr]
    )
    worth = {arm.offer_id: arm.reward_if_converted for arm in exposure.arms}
    assert worth == {"cheap": 1.0, "dear": 5.0, "boosted": pytest.approx(3.0)}
    # A realized value replaces the catalog's, times the lever.
    result = await engine.outcome(
        tenant, answer.rank_id, answer.chosen_offer_id, 0.0, "v", kind=CONVERTED, value_minor=2000
    )
    assert result.applied


async def test_any_text_in_names_stays_one_feature(engine: AiEngine) -> None:
    # VW's separators and control characters in a feature name, an attribute
    # or a surface cannot split a feature or an example line.
    tenant = f"t{uuid.uuid4().hex[:10]}"
    odd = "a b|c:d\ne\x00f\x7f"
    candidates = [
        Candidate("o1", OfferEntry("cash back", 100, {odd: odd})),
        Candidate("o2", OfferEntry("x|y", 100, {"k": "v"})),
    ]
    answer = await rank(engine, tenant, {odd: 1.5}, candidates=candidates, surface=odd)
    assert math.isclose(sum(probabilities(answer).values()), 1.0)
    result = await engine.outcome(
        tenant, answer.rank_id, answer.chosen_offer_id, 0.0, "odd", kind=CONVERTED
    )
    assert result.applied
    exposure = ai_pb2.LearnerExposure.FromString(
        (await engine.pending.get(answer.rank_id)).exposure  # type: ignore[union-attr]
    )
    shared, *arms = example_lines(exposure)
    # One token per feature: nothing split a name.
    assert len(shared.split(" ")) == 2 + len(exposure.context)
    for line, arm in zip(arms, exposure.arms, strict=True):
        assert len(line.split(" ")) == 1 + len(arm.features)
        assert all(token.count(":") <= 1 for token in line.split(" "))
    assert not any(c in "".join([shared, *arms]) for c in "\n\r\x00\x7f")


def test_a_model_saved_and_reloaded_learns_exactly_as_one_kept_live(tmp_path: Path) -> None:
    config = learner_config(tmp_path).ai.learner
    live, cold = VwLearner(config), VwLearner(config)
    rng = random.Random(2)
    exposure = ai_pb2.LearnerExposure(
        context=[ai_pb2.LearnerFeature(name="seg=0", value=1.0)],
        arms=[
            ai_pb2.LearnerArm(
                offer_id=f"o{i}",
                features=[ai_pb2.LearnerFeature(name=f"offer=o{i}", value=1.0)],
                probability=0.25,
            )
            for i in range(4)
        ],
    )
    for step in range(200):
        exposure.context[0].name = f"seg={rng.randrange(2)}"
        index, reward = rng.randrange(4), float(rng.random() < 0.3)
        live.learn("k", exposure, index, reward)
        cold.learn("k", exposure, index, reward)
        if step % 50 == 49:
            # Out to bytes and back in, as max_live_models and a snapshot do.
            cold.load_state(cold.state(), [])
        # Predictions on one of them change nothing it learns.
        live.predict("k", exposure)
    for segment in range(2):
        exposure.context[0].name = f"seg={segment}"
        assert live.predict("k", exposure) == cold.predict("k", exposure)
    assert example_lines(exposure)[0].startswith("shared |c ")
    live.close()
    cold.close()


def test_models_beyond_max_live_models_are_kept_as_bytes_and_learn_on(tmp_path: Path) -> None:
    roomy = VwLearner(learner_config(tmp_path).ai.learner)
    tight = VwLearner(learner_config(tmp_path, max_live_models=1).ai.learner)
    exposure = ai_pb2.LearnerExposure(
        context=[ai_pb2.LearnerFeature(name="seg=0", value=1.0)],
        arms=[
            ai_pb2.LearnerArm(
                offer_id=f"o{i}",
                features=[ai_pb2.LearnerFeature(name=f"offer=o{i}", value=1.0)],
                probability=1 / 3,
            )
            for i in range(3)
        ],
    )
    rng = random.Random(7)
    for _ in range(120):
        key, index, reward = rng.choice("abc"), rng.randrange(3), float(rng.random() < 0.4)
        roomy.learn(key, exposure, index, reward)
        tight.learn(key, exposure, index, reward)
        tight.predict(rng.choice("abc"), exposure)  # reloads cold ones as it goes
    assert tight.model_keys() == roomy.model_keys() == ["a", "b", "c"]
    for key in "abc":
        assert tight.predict(key, exposure) == roomy.predict(key, exposure)
    # A snapshot of either restores the same models.
    restored = VwLearner(learner_config(tmp_path).ai.learner)
    restored.load_state(tight.state(), [])
    for key in "abc":
        assert restored.predict(key, exposure) == roomy.predict(key, exposure)
    for learner in (roomy, tight, restored):
        learner.close()
