"""Pure pieces: PII refusal, circuit breaker, drift, bandit, registry, synth."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ai_plane.bandit import DIMENSION, LinearThompsonBandit
from ai_plane.breaker import BreakerState, CircuitBreaker
from ai_plane.drift import PsiMonitor, baseline, psi
from ai_plane.features import (
    OFFER_FEATURES,
    ActivityKind,
    OfferEntry,
    hour_of_day,
    offer_tokens,
    offer_vector,
)
from ai_plane.registry import ModelState, Registry
from triplane.runtime.clock import ManualClock
from triplane.runtime.errors import FailedPrecondition, InvalidArgument
from triplane.runtime.pii import refuse_pii
from triplane_sim import synth


# ---- PII (the recogniser itself is tested in tests/runtime/test_pii.py) ----
def test_refusal_names_the_field_and_not_the_value() -> None:
    with pytest.raises(InvalidArgument) as caught:
        refuse_pii({"payment.account_id": "acct_1", "payment.attributes[note]": "a@b.io"})
    assert caught.value.reason == "RAW_PII_REFUSED"
    assert caught.value.field == "payment.attributes[note]"
    assert "a@b.io" not in caught.value.message


# ---- circuit breaker ----
def test_breaker_opens_after_threshold_and_closes_after_probe() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=3, open_s=1.0, monotonic_s=lambda: now[0])
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    now[0] = 1.5
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()  # the one probe
    assert not breaker.allow()  # nobody else while it is out
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()


def test_failed_probe_reopens_for_a_full_period() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=1, open_s=2.0, monotonic_s=lambda: now[0])
    breaker.record_failure()
    now[0] = 2.0
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    now[0] = 3.9
    assert not breaker.allow()
    now[0] = 4.0
    assert breaker.allow()


def test_a_burst_of_failures_among_many_successes_keeps_the_circuit_closed() -> None:
    # A stall of the plane itself: every call in flight misses its budget at
    # once, while Triton answers everything else.
    now = [0.0]
    breaker = CircuitBreaker(5, 1.0, failure_rate=0.5, window_s=1.0, monotonic_s=lambda: now[0])
    for _ in range(100):
        now[0] += 0.002
        breaker.record_success()
    for _ in range(20):
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    # The same failures once the successes have left the window: open.
    now[0] += 1.0
    for _ in range(4):
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED  # below the volume floor
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN


def test_failure_rate_over_the_window_opens_the_circuit() -> None:
    now = [0.0]
    breaker = CircuitBreaker(5, 1.0, failure_rate=0.5, window_s=1.0, monotonic_s=lambda: now[0])
    for _ in range(10):
        now[0] += 0.01
        breaker.record_success()
        breaker.record_failure()  # one in two fails: at the rate, past the floor
        if breaker.state is BreakerState.OPEN:
            break
    assert breaker.state is BreakerState.OPEN
    # Calls that were in flight when it opened fail too, without extending it.
    opened_at = now[0]
    now[0] = opened_at + 0.9
    breaker.record_failure()
    now[0] = opened_at + 1.0
    assert breaker.state is BreakerState.HALF_OPEN


def test_a_good_probe_forgets_the_failures_before_it() -> None:
    now = [0.0]
    breaker = CircuitBreaker(2, 1.0, failure_rate=0.5, window_s=10.0, monotonic_s=lambda: now[0])
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    now[0] = 1.0
    assert breaker.allow()
    breaker.record_success()
    breaker.record_failure()  # alone again: the two before the probe are gone
    assert breaker.state is BreakerState.CLOSED


# ---- drift ----
def test_psi_is_small_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = random.Random(1)
    training = [rng.gauss(0, 1) for _ in range(5000)]
    edges, expected = baseline(training, 10)
    same = PsiMonitor("m", 1, "score", edges, expected, window=5000, every=5000)
    shifted = PsiMonitor("m", 1, "shifted", edges, expected, window=5000, every=5000)
    for _ in range(5000):
        same.observe(rng.gauss(0, 1))
        shifted.observe(rng.gauss(1.0, 1))
    assert same.value < 0.02
    assert shifted.value > 0.25
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0.0


# ---- bandit ----
def test_bandit_probabilities_are_a_distribution_and_the_choice_is_logged() -> None:
    bandit = LinearThompsonBandit(0.05, 0.1, 64, seed=3)
    xs = [np.ones(DIMENSION) * v for v in (0.1, 0.2, 0.3)]
    choice = bandit.choose(["a", "b", "c"], xs)
    assert math.isclose(float(choice.probabilities.sum()), 1.0)
    assert choice.probabilities[choice.chosen_index] > 0


def test_bandit_learns_from_outcomes() -> None:
    bandit = LinearThompsonBandit(0.05, 0.1, 64, seed=3)
    x = np.zeros(DIMENSION)
    x[0] = 1.0
    for _ in range(200):
        bandit.update("good", x, 1.0)
        bandit.update("bad", x, 0.0)
    assert bandit.expected_reward("good", x) > 0.8 > 0.2 > bandit.expected_reward("bad", x)
    choice = bandit.choose(["good", "bad"], [x, x])
    assert choice.probabilities[0] > 0.95


# ---- synthetic data ----
def test_synthetic_world_is_reproducible_and_has_every_fraud_pattern() -> None:
    config = synth.SynthConfig(seed=5, customers=200, days=5)
    first, second = synth.generate(config), synth.generate(config)
    assert [e.activity for e in first.events] == [e.activity for e in second.events]
    patterns = {e.pattern for e in first.events if e.is_fraud}
    assert patterns == {"card_testing", "account_takeover", "velocity", "mule"}
    times = [e.activity.occurred_at_us for e in first.events]
    assert times == sorted(times)
    other = synth.generate(synth.SynthConfig(seed=6, customers=200, days=5))
    assert [e.activity for e in other.events] != [e.activity for e in first.events]


def test_a_one_day_world_generates_with_its_fraud_on_that_day() -> None:
    # Fraud patterns strike after the first day when there is one; a one-day
    # world used to fail on random.randrange(1, 1).
    data = synth.generate(synth.SynthConfig(seed=5, customers=200, days=1))
    assert data.events
    patterns = {e.pattern for e in data.events if e.is_fraud}
    assert patterns == {"card_testing", "account_takeover", "velocity", "mule"}
    starts = [e.activity.occurred_at_us for e in data.events if e.is_fraud]
    assert min(starts) >= synth.EPOCH_US - synth.DAY_US  # a mule's KYC failure is 1 h before
    assert min(starts) < synth.EPOCH_US + synth.DAY_US
    with pytest.raises(ValueError, match="days"):
        synth.generate(synth.SynthConfig(days=0))


def test_the_synthetic_day_has_every_hour_and_no_pattern_is_the_hour_alone() -> None:
    data = synth.generate(synth.SynthConfig(seed=5, customers=300, days=7))
    payments = [e for e in data.events if e.activity.kind is ActivityKind.PAYMENT]
    ordinary = Counter(hour_of_day(e.activity.occurred_at_us) for e in payments if not e.is_fraud)
    # Ordinary payments at every local hour, quiet at night but never absent.
    assert set(ordinary) == set(range(24))
    night = sum(ordinary[h] for h in range(6))
    assert 0.03 < night / sum(ordinary.values()) < 0.2
    assert min(ordinary.values()) >= 0.05 * max(ordinary.values())  # a curve, not a cliff
    # Takeovers strike by day too: what marks them is device, merchant, amount.
    takeovers = {
        hour_of_day(e.activity.occurred_at_us) for e in payments if e.pattern == "account_takeover"
    }
    assert takeovers & set(range(6)) and takeovers & set(range(9, 21))


def test_true_propensities_are_probabilities_and_follow_the_entry() -> None:
    context = [2.0, 14.0, 3.0, 8.0, 7.0, 0.0, 10.0, 0.7, 2.0]
    for offer in synth.OFFERS:
        assert 0.0 < synth.true_propensity(offer, context) < 1.0
        # The truth belongs to the entry, not the id.
        same = OfferEntry(**vars_of(synth.CATALOG[offer]))
        assert synth.true_propensity(same, context) == synth.true_propensity(offer, context)
    grocery = synth.CATALOG["cashback_grocery"]
    similar = OfferEntry(grocery.product, 350, {**grocery.attributes, "category": "dining"})
    far = synth.CATALOG["credit_line_increase"]
    near_gap = abs(
        synth.true_propensity(similar, context) - synth.true_propensity(grocery, context)
    )
    far_gap = abs(synth.true_propensity(far, context) - synth.true_propensity(grocery, context))
    assert near_gap < far_gap


def vars_of(entry: OfferEntry) -> dict[str, object]:
    return {
        "product": entry.product,
        "value_minor": entry.value_minor,
        "attributes": dict(entry.attributes),
    }


# ---- offer features ----
def test_an_offer_is_described_by_its_entry_in_a_fixed_width() -> None:
    entry = OfferEntry("cashback", 300, {"category": "grocery", "benefit": "cashback"})
    vector = offer_vector(entry)
    assert len(vector) == len(OFFER_FEATURES)
    assert vector[0] == math.log1p(300)
    # One count per token (product, each attribute pair), whatever the map order.
    assert sum(vector[1:]) == len(offer_tokens(entry)) == 3
    reordered = OfferEntry("cashback", 300, {"benefit": "cashback", "category": "grocery"})
    assert offer_vector(reordered) == vector
    assert offer_vector(OfferEntry("bnpl", 300, dict(entry.attributes))) != vector
    assert offer_vector(OfferEntry("cashback", 300, {})) != vector


# ---- registry ----
def _register(registry: Registry, text: str) -> int:
    record, _ = registry.register("m", text, {"generator_seed": 1}, {"roc_auc": 0.9}, ["f"], {})
    return record.version


def test_registry_states_and_rollback_pointer(tmp_path: Path) -> None:
    registry = Registry(tmp_path, ManualClock())
    v1, v2 = _register(registry, "model one"), _register(registry, "model two")
    assert (v1, v2) == (1, 2)
    assert _register(registry, "model one") == 1  # same artifact: same version
    with pytest.raises(FailedPrecondition) as refused:
        registry.transition("m", v1, ModelState.LIVE)
    assert refused.value.reason == "MODEL_STATE_TRANSITION_REFUSED"
    registry.transition("m", v1, ModelState.APPROVED)
    registry.transition("m", v1, ModelState.LIVE)
    registry.transition("m", v2, ModelState.APPROVED)
    live = registry.transition("m", v2, ModelState.LIVE)
    assert live.rollback_version == v1
    assert registry.get("m", v1).state is ModelState.RETIRED
    restored = Registry(tmp_path, ManualClock()).rollback("m")
    assert restored.version == v1
    reloaded = Registry(tmp_path, ManualClock())
    assert reloaded.get("m").version == v1
    assert reloaded.get("m", v2).state is ModelState.RETIRED


def test_registry_refuses_a_corrupt_artifact(tmp_path: Path) -> None:
    registry = Registry(tmp_path, ManualClock())
    version = _register(registry, "model text")
    registry.artifact_path("m", version).write_text("tampered")
    with pytest.raises(FailedPrecondition) as caught:
        registry.artifact_text("m", version)
    assert caught.value.reason == "MODEL_ARTIFACT_CORRUPT"


def test_rollback_without_a_previous_version_is_refused(tmp_path: Path) -> None:
    registry = Registry(tmp_path, ManualClock())
    version = _register(registry, "only")
    registry.transition("m", version, ModelState.APPROVED)
    registry.transition("m", version, ModelState.LIVE)
    with pytest.raises(FailedPrecondition) as caught:
        registry.rollback("m")
    assert caught.value.reason == "NO_ROLLBACK_TARGET"


# ---- Triton model configuration ----
def test_default_model_config_batches_rejects_late_requests_and_runs_two_instances() -> None:
    from ai_plane.triton import model_config
    from triplane.runtime.config import load_config

    text = model_config("payment_risk", [3, 1], 27, load_config(environ={}).ai.triton)
    assert "versions: [ 3, 1 ]" in text
    assert "max_queue_delay_microseconds: 200" in text
    assert "timeout_action: REJECT" in text
    assert "allow_timeout_override: true" in text
    # One instance lets Triton 2.51's batcher miss a wake-up and hold a request
    # for its 500 ms idle wait (see defaults.yaml, ai.triton.instance_count).
    assert "count: 2 kind: KIND_CPU" in text
