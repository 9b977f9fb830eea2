"""Flattened conditions: rules are rewritten at load to read flat variables
(faster in the CEL interpreter); they must decide exactly as the rules as
written, errors included, or run as written."""

from __future__ import annotations

import textwrap

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy_plane import cel_check
from policy_plane.bundle import SHIPPED_LISTS_DIR, BundleSource, shipped_default_path
from policy_plane.bundles_registry import bundle_limits
from policy_plane.evaluation import CompiledBundle, compile_source
from policy_plane.model import EvaluationInput, Party, PaymentInput, ScoreInput, SnapshotInput
from triplane.runtime.config import load_config

# The shipped bounds, with a smaller rule and list allowance.
LIMITS = msgspec.structs.replace(
    bundle_limits(load_config(environ={}).policy),
    max_rules=500,
    max_sanctions_entries=1000,
    default_hit_threshold=92,
    default_possible_match_threshold=80,
)
SCHEMA = {**cel_check.SCHEMA, "params": {"mcc": "value", "caps": "map", "limit": "value"}}


@pytest.mark.parametrize(
    ("source", "flat"),
    [
        (
            "snapshot.velocity.device.count_24h > 3",
            "__tp_snapshot__velocity__device__count_24h > 3",
        ),
        # An open map keeps its keys as selections; has() keeps its selection.
        (
            "has(snapshot.features.f1) && snapshot.features.f1 > 2.0",
            "has(__tp_snapshot__features.f1) && __tp_snapshot__features.f1 > 2.0",
        ),
        ("has(snapshot.kyc.tier)", "has(snapshot.kyc.tier)"),
        # Method calls stay calls; string literals are never rewritten.
        (
            "request.customer.name.startsWith('request.kind') && request.kind == 'x'",
            "__tp_request__customer__name.startsWith('request.kind') && __tp_request__kind == 'x'",
        ),
        # A map read whole stays nested.
        ("size(snapshot.kyc) > 1", "size(snapshot.kyc) > 1"),
        (
            "request.merchant_category in params.mcc",
            "__tp_request__merchant_category in __tp_params__mcc",
        ),
        ("params.caps.push > 1", "__tp_params__caps.push > 1"),
        # A macro variable named like a root is left alone.
        (
            "params.mcc.exists(request, request == '1') || request.kind == 'x'",
            "__tp_params__mcc.exists(request, request == '1') || request.kind == 'x'",
        ),
    ],
)
def test_flatten_paths(source: str, flat: str) -> None:
    assert cel_check.flatten_paths(source, SCHEMA)[0] == flat


BUNDLE = """\
apiVersion: triplane.policy/v1
label: flat
parameters:
  mcc: ["7995", "5411"]
  limit: 40000
  caps: {USD: 30000, EUR: 20000}
kyc_tiers:
  - tier: 1
    limits:
      USD: {single_minor: 50000, daily_minor: 100000, monthly_minor: 300000}
sanctions:
  list: sdn_sample.csv
  aliases: alt_sample.csv
  blocked_countries: [KP]
rules:
  - {id: r1, when: "request.amount_minor > params.limit", outcome: review, reason_code: R1}
  - {id: r2, when: "request.merchant_category in params.mcc && snapshot.kyc.tier < 2",
     outcome: hold, reason_code: R2}
  - {id: r3, when: "has(snapshot.features.risk) && snapshot.features.risk > 0.5",
     outcome: review, reason_code: R3}
  - {id: r4, when: "has(snapshot.features.x) && snapshot.features.x > 1.0",
     outcome: review, reason_code: R4}
  # Fails at run time for GBP (no such key): fires review with the error.
  - {id: r5, when: "request.amount_minor > params.caps[request.currency]",
     outcome: review, reason_code: R5}
  - {id: r6, when: "snapshot.kyc.tier == 0 && size(snapshot.kyc) == 4 && has(request.customer)",
     outcome: deny, reason_code: R6}
  - {id: r7, when: "snapshot.velocity.account.amount_minor_24h + request.amount_minor >
       limits.daily_minor && limits.known",
     outcome: hold, reason_code: R7}
  - {id: r8, when: "has(snapshot.features.d) &&
       snapshot.score.value / snapshot.features.d > 1.0",
     outcome: review, reason_code: R8}
  - {id: r9, when: "sanctions.hit || sanctions.country_blocked ||
       request.customer.name.startsWith('Z')",
     outcome: deny, reason_code: R9}
  # Fails at run time for multiples of 7 (division by zero).
  - {id: r10, when: "request.amount_minor / (request.amount_minor % 7) > 1000",
     outcome: review, reason_code: R10}
routing:
  - {method: card, when: "request.amount_minor < params.limit", fixed_cost_minor: 10, cost_bps: 150}
  - {method: bank_transfer, when: "snapshot.kyc.tier >= 1", fixed_cost_minor: 30}
"""


def _bundles() -> tuple[CompiledBundle, CompiledBundle]:
    source = BundleSource(yaml_text=textwrap.dedent(BUNDLE))
    flat = compile_source(source, LIMITS, SHIPPED_LISTS_DIR)
    written = compile_source(source, LIMITS, SHIPPED_LISTS_DIR, flatten=False)
    return flat, written


FLAT, WRITTEN = _bundles()
DEFAULT_SOURCE = BundleSource(yaml_text=shipped_default_path().read_text())
DEFAULT_FLAT = compile_source(DEFAULT_SOURCE, LIMITS, SHIPPED_LISTS_DIR)
DEFAULT_WRITTEN = compile_source(DEFAULT_SOURCE, LIMITS, SHIPPED_LISTS_DIR, flatten=False)


def test_rules_really_run_flattened() -> None:
    errors = {
        f.rule_id
        for amount, currency in [(7_000, "USD"), (100, "GBP")]
        for f in FLAT.evaluate(
            EvaluationInput(
                tenant_id="t",
                idempotency_key="k",
                payment=PaymentInput(
                    account_id="a", kind="purchase", amount_minor=amount, currency=currency
                ),
                snapshot=SnapshotInput(),
            )
        ).fired
        if f.reason_code == "RULE_EVALUATION_ERROR"
    }
    assert errors == {"r5", "r10"}
    flattened = [r.spec.id for r in FLAT.rules if r.program is not r.condition.written]
    assert "r1" in flattened and "r7" in flattened
    assert all(r.program is r.condition.written for r in WRITTEN.rules)
    assert FLAT.version == WRITTEN.version


inputs = st.builds(
    lambda amount, currency, tier, score, source, features, name, country, method: EvaluationInput(
        tenant_id="t",
        idempotency_key="k",
        payment=PaymentInput(
            account_id="a",
            kind="purchase",
            amount_minor=amount,
            currency=currency,
            payment_method=method,
            merchant_category="7995" if amount % 3 == 0 else "5812",
            customer=Party(name=name, country=country),
            counterparty=Party(name="Corner Shop", country="US"),
        ),
        snapshot=SnapshotInput(
            kyc_tier=tier,
            kyc_country="US",
            score=ScoreInput(model="m", version="1", source=source, score=score),
            features=features,
        ),
    ),
    st.integers(1, 200_000),
    st.sampled_from(["USD", "EUR", "GBP"]),
    st.integers(0, 3),
    st.floats(0, 1, allow_nan=False),
    st.sampled_from(["triton", "last_good", "none"]),
    st.dictionaries(
        st.sampled_from(["risk", "x", "d"]), st.floats(-5, 5, allow_nan=False), max_size=3
    ),
    st.sampled_from(["Jane Example", "Zed Zulu", "Dmitri Volkov", ""]),
    st.sampled_from(["US", "KP"]),
    st.sampled_from(["", "card", "bank_transfer"]),
)


@settings(max_examples=300, deadline=None)
@given(inp=inputs)
def test_flattened_evaluation_decides_as_written(inp: EvaluationInput) -> None:
    # Errors (a missing feature, a division by zero) included: same reasons.
    assert FLAT.evaluate(inp) == WRITTEN.evaluate(inp)
    assert DEFAULT_FLAT.evaluate(inp) == DEFAULT_WRITTEN.evaluate(inp)
