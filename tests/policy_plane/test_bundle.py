"""Bundles: compile once, refuse bad ones with the rule named, combine outcomes
deny > hold > review > allow, and the default bundle's built-in policy."""

from __future__ import annotations

import itertools
import textwrap

import msgspec
import pytest

from policy_plane.bundle import SHIPPED_LISTS_DIR, BundleSource, shipped_default_path
from policy_plane.bundles_registry import bundle_limits
from policy_plane.evaluation import CompiledBundle, compile_source
from policy_plane.model import Outcome, Velocity, combine
from triplane.runtime.config import load_config
from triplane.runtime.errors import InvalidArgument

from .conftest import payment_input, replace_payment

# The shipped bounds, with a smaller rule and list allowance.
LIMITS = msgspec.structs.replace(
    bundle_limits(load_config(environ={}).policy),
    max_rules=500,
    max_sanctions_entries=1000,
    default_hit_threshold=92,
    default_possible_match_threshold=80,
)


def compile_yaml(text: str) -> CompiledBundle:
    return compile_source(BundleSource(yaml_text=textwrap.dedent(text)), LIMITS, SHIPPED_LISTS_DIR)


@pytest.fixture(scope="module")
def default() -> CompiledBundle:
    return compile_source(
        BundleSource(yaml_text=shipped_default_path().read_text()), LIMITS, SHIPPED_LISTS_DIR
    )


ONE_RULE = "[{id: a, when: 'true', outcome: deny, reason_code: A}]\n"


def rules_yaml(rules: str) -> str:
    return "apiVersion: triplane.policy/v1\nlabel: t\nrules:\n" + textwrap.indent(
        textwrap.dedent(rules), "  "
    )


def test_version_is_label_plus_content_hash(default: CompiledBundle) -> None:
    again = compile_source(
        BundleSource(yaml_text=shipped_default_path().read_text()), LIMITS, SHIPPED_LISTS_DIR
    )
    assert default.version == again.version == f"default-2026.1@{default.content_hash[:16]}"
    relabelled = compile_source(
        BundleSource(yaml_text=shipped_default_path().read_text(), label_override="canary"),
        LIMITS,
        SHIPPED_LISTS_DIR,
    )
    assert relabelled.version.startswith("canary@")


def test_changing_the_sanctions_list_changes_the_version(default: CompiledBundle) -> None:
    changed = compile_source(
        BundleSource(
            yaml_text=shipped_default_path().read_text(),
            sanctions_csv='1,"SOMEONE ELSE","individual","X"\n',
        ),
        LIMITS,
        SHIPPED_LISTS_DIR,
    )
    assert changed.content_hash != default.content_hash


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        ("when: request.amount_minor >\n  outcome: deny", "RULE_SYNTAX_ERROR"),
        ("when: request.amount_minr > 1\n  outcome: deny", "RULE_UNKNOWN_FIELD"),
        ("when: snapshot.kyc.level > 1\n  outcome: deny", "RULE_UNKNOWN_FIELD"),
        ("when: customer.tier > 1\n  outcome: deny", "RULE_UNKNOWN_FIELD"),
        ("when: params.missing > 1\n  outcome: deny", "RULE_UNKNOWN_FIELD"),
        ("when: request.amount_minor > 'x'\n  outcome: deny", "RULE_TYPE_ERROR"),
        ("when: request.amount_minor + 1\n  outcome: deny", "RULE_TYPE_ERROR"),
        ("when: snapshot.features.velocity > 1.0\n  outcome: deny", "RULE_UNKNOWN_FIELD"),
    ],
)
def test_bad_rules_are_refused_naming_the_rule(rule: str, reason: str) -> None:
    text = rules_yaml(f"- id: r1\n  {rule}\n  reason_code: R1\n")
    with pytest.raises(InvalidArgument) as caught:
        compile_yaml(text)
    assert caught.value.reason == reason
    # Named by its id, as the README says, not by its position.
    assert caught.value.field == "rules[r1].when"
    assert caught.value.message.startswith("rules[r1].when: ")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("apiVersion: triplane.policy/v1\nlabel: t\nrules: [\n", "BUNDLE_SYNTAX_ERROR"),
        ("apiVersion: triplane.policy/v1\nlabel: t\nrulez: []\n", "BUNDLE_SCHEMA_ERROR"),
        (
            "apiVersion: other/v9\nlabel: t\nrules: " + ONE_RULE,
            "BUNDLE_SCHEMA_ERROR",
        ),
        (
            "apiVersion: triplane.policy/v1\nlabel: 'bad label'\nrules: " + ONE_RULE,
            "BUNDLE_LABEL_INVALID",
        ),
        (
            rules_yaml(
                "- {id: a, when: 'true', outcome: deny, reason_code: A}\n"
                "- {id: a, when: 'true', outcome: deny, reason_code: B}\n"
            ),
            "RULE_ID_INVALID",
        ),
        (
            rules_yaml("- {id: a, when: 'true', outcome: deny, reason_code: lower}\n"),
            "RULE_REASON_CODE_INVALID",
        ),
        (
            rules_yaml("- {id: a, when: 'true', outcome: obligation, reason_code: A}\n"),
            "RULE_OBLIGATION_INVALID",
        ),
        (
            rules_yaml("- {id: a, when: 'true', outcome: approve, reason_code: A}\n"),
            "BUNDLE_SCHEMA_ERROR",
        ),
    ],
)
def test_bad_bundles_are_refused(text: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        compile_yaml(text)
    assert caught.value.reason == reason


SEVERITIES = ["deny", "hold", "review"]


@pytest.mark.parametrize(
    "fired", [c for n in range(4) for c in itertools.combinations(SEVERITIES, n)]
)
def test_outcomes_combine_deny_hold_review_allow(fired: tuple[str, ...]) -> None:
    rules = "".join(
        f"- {{id: r_{o}, when: '{str(o in fired).lower()}', outcome: {o}, "
        f"reason_code: R_{o.upper()}}}\n"
        for o in SEVERITIES
    )
    bundle = compile_yaml(rules_yaml(rules))
    verdict = bundle.evaluate(payment_input())
    expected = next((o for o in SEVERITIES if o in fired), "allow")
    assert verdict.outcome == expected
    assert sorted(verdict.reason_codes) == sorted(f"R_{o.upper()}" for o in fired)
    assert combine([Outcome.parse(o) for o in fired]).label == expected


def test_obligations_do_not_change_the_outcome() -> None:
    bundle = compile_yaml(
        rules_yaml(
            "- {id: su, when: 'true', outcome: obligation, reason_code: STEP_UP, "
            "obligation: {kind: step_up_auth}}\n"
        )
    )
    verdict = bundle.evaluate(payment_input())
    assert verdict.outcome == "allow"
    assert [o.kind for o in verdict.obligations] == ["step_up_auth"]


def test_a_rule_failing_at_run_time_fires_review() -> None:
    bundle = compile_yaml(
        rules_yaml(
            "- {id: f, when: 'has(snapshot.features.x) && snapshot.features.x / 0.0 > 1.0 "
            "&& request.amount_minor / (request.amount_minor - request.amount_minor) > 0', "
            "outcome: deny, reason_code: F}\n"
        )
    )
    inp = payment_input()
    inp = msgspec.structs.replace(
        inp, snapshot=msgspec.structs.replace(inp.snapshot, features={"x": 2.0})
    )
    verdict = bundle.evaluate(inp)
    assert verdict.outcome == "review"
    assert verdict.reason_codes == ["RULE_EVALUATION_ERROR"]


def test_default_allows_an_ordinary_payment(default: CompiledBundle) -> None:
    verdict = default.evaluate(payment_input())
    assert verdict.outcome == "allow", verdict.fired
    assert verdict.route is not None and verdict.route.method == "wallet"


@pytest.mark.parametrize(
    ("tier", "amount_minor", "velocity_24h_minor", "velocity_30d_minor", "reason"),
    [
        (0, 5_001, 0, 0, "KYC_SINGLE_LIMIT_EXCEEDED"),
        (1, 40_000, 70_000, 0, "KYC_DAILY_LIMIT_EXCEEDED"),
        (1, 40_000, 0, 270_000, "KYC_MONTHLY_LIMIT_EXCEEDED"),
    ],
)
def test_default_kyc_tier_limits(
    default: CompiledBundle,
    tier: int,
    amount_minor: int,
    velocity_24h_minor: int,
    velocity_30d_minor: int,
    reason: str,
) -> None:
    velocity = Velocity(amount_minor_24h=velocity_24h_minor, amount_minor_30d=velocity_30d_minor)
    inp = payment_input(tier=tier, amount_minor=amount_minor, account_velocity=velocity)
    verdict = default.evaluate(inp)
    assert verdict.outcome == "deny"
    assert reason in verdict.reason_codes


def test_a_bundle_refuses_a_currency_without_limits(default: CompiledBundle) -> None:
    """Limits written for USD only and no conversion: a JPY payment has none."""
    text = shipped_default_path().read_text()
    start, end = text.index("limit_conversion:"), text.index("\nsanctions:")
    verdict = compile_yaml(text[:start] + text[end:]).evaluate(payment_input(currency="JPY"))
    assert "KYC_LIMITS_UNDEFINED" in verdict.reason_codes
    # The default converts: JPY has limits (tests/policy_plane/test_facts.py).
    converted = default.evaluate(payment_input(currency="JPY"))
    assert "KYC_LIMITS_UNDEFINED" not in converted.reason_codes


def test_default_velocity_holds(default: CompiledBundle) -> None:
    verdict = default.evaluate(payment_input(account_velocity=Velocity(count_1h=10)))
    assert verdict.outcome == "hold"
    assert "VELOCITY_ACCOUNT_1H" in verdict.reason_codes
    verdict = default.evaluate(payment_input(device_velocity=Velocity(count_1h=15)))
    assert "VELOCITY_DEVICE_1H" in verdict.reason_codes


@pytest.mark.parametrize(
    ("score", "source", "amount_minor", "outcome", "reason"),
    [
        (0.95, "triton", 2_500, "deny", "FRAUD_SCORE_HIGH"),
        (0.75, "triton", 2_500, "review", "FRAUD_SCORE_ELEVATED"),
        (0.65, "last_good", 2_500, "review", "FRAUD_SCORE_FALLBACK_ELEVATED"),
        (0.65, "triton", 2_500, "allow", "STEP_UP_AUTH_REQUIRED"),
        (None, "none", 60_000, "review", "FRAUD_SCORE_MISSING"),
        (None, "none", 2_500, "allow", None),
    ],
)
def test_default_fraud_scores_including_missing_and_fallback(
    default: CompiledBundle,
    score: float | None,
    source: str,
    amount_minor: int,
    outcome: str,
    reason: str | None,
) -> None:
    verdict = default.evaluate(payment_input(score=score, source=source, amount_minor=amount_minor))
    assert verdict.outcome == outcome, verdict.fired
    if reason:
        assert reason in verdict.reason_codes


@pytest.mark.parametrize(
    ("name", "outcome", "reason"),
    [
        ("Dmitri Arkadyevich Volkov", "deny", "SANCTIONS_HIT"),
        ("VOLKOV Dmitry", "deny", "SANCTIONS_HIT"),
        ("Golden Crescent Exchange Ltd", "deny", "SANCTIONS_HIT"),
        ("Golden Crescent Exchanges Group", "review", "SANCTIONS_POSSIBLE_MATCH"),
        ("Wei Ming Zhao Ltd", "review", "SANCTIONS_POSSIBLE_MATCH"),
        ("Jane Example", "allow", None),
    ],
)
def test_default_sanctions_screening(
    default: CompiledBundle, name: str, outcome: str, reason: str | None
) -> None:
    verdict = default.evaluate(payment_input(counterparty=name))
    assert verdict.outcome == outcome, verdict.screening
    if reason:
        assert reason in verdict.reason_codes


def test_default_blocks_embargoed_countries(default: CompiledBundle) -> None:
    inp = payment_input()
    inp = replace_payment(
        inp, counterparty=msgspec.structs.replace(inp.payment.counterparty, country="KP")
    )
    verdict = default.evaluate(inp)
    assert verdict.outcome == "deny"
    assert "SANCTIONS_COUNTRY_BLOCKED" in verdict.reason_codes


@pytest.mark.parametrize(
    ("kind", "amount_minor", "method", "expected"),
    [
        ("payout", 50_000, "", "bank_transfer"),
        ("payout", 50_000, "instant_payment", "instant_payment"),
        ("purchase", 2_000, "", "wallet"),
        ("purchase", 200_000, "", "card"),
        ("purchase", 2_000, "card", "card"),
    ],
)
def test_default_routing_by_amount_risk_and_cost(
    default: CompiledBundle, kind: str, amount_minor: int, method: str, expected: str
) -> None:
    inp = replace_payment(
        payment_input(kind=kind, amount_minor=amount_minor, tier=3), payment_method=method
    )
    verdict = default.evaluate(inp)
    assert verdict.route is not None and verdict.route.method == expected
