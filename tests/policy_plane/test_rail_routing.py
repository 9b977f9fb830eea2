"""Rail-aware routing in the default bundle: a payout's rail options (the
money plane's facts: reach, per-payment limit, window, cost) go through the
rail routes' CEL requirements, the cheapest eligible rail is chosen, the
others are its alternates, and the decision records why each rail was or
was not chosen; a replay routes the same."""

from __future__ import annotations

import datetime as dt
import textwrap

import msgspec
import pytest

from money_plane.rails.adapters import rail_capabilities, rail_options
from policy_plane.bundle import SHIPPED_LISTS_DIR, BundleSource, shipped_default_path
from policy_plane.codec import decision_pb, evaluate_request_pb, evaluation_input
from policy_plane.engine import PolicyEngine
from policy_plane.evaluation import CompiledBundle, compile_source
from policy_plane.model import EvaluationInput, RailFacts, Route, RouteConsidered
from policy_plane.replay import ReplayWindow
from policy_plane.validate import check_evaluation
from triplane.runtime.config import RailsConfig, load_config
from triplane.runtime.errors import InvalidArgument

from .conftest import TENANT, payment_input, put_customer
from .test_bundle import LIMITS

POLICY_LIMITS = load_config(environ={}).policy.limits
FEATURES = {"payout_available_minor": 10_000_000_000.0, "payout_beneficiary_payouts": 3.0}
# A Monday 09:00 New York: a same-day ACH window is open.
MONDAY_MORNING = dt.datetime(2026, 12, 7, 14, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def default() -> CompiledBundle:
    """The default bundle, its tier-3 limits raised to a platform treasury's
    (the shipped ones deny a payout over $50,000 before it is routed)."""
    text = shipped_default_path().read_text()
    for currency in ("USD", "EUR"):
        tier3 = (
            f"{currency}: {{single_minor: 5000000, daily_minor: 10000000, monthly_minor: 50000000}}"
        )
        assert tier3 in text
        text = text.replace(
            tier3,
            f"{currency}: {{single_minor: 10000000000, daily_minor: 10000000000, "
            "monthly_minor: 10000000000}",
        )
    return compile_source(BundleSource(yaml_text=text), LIMITS, SHIPPED_LISTS_DIR)


def us_rails(*, same_day_open: bool = True) -> list[RailFacts]:
    """What the money plane offers a US bank account (costs: its fees)."""
    cutoff = 1_796_657_400_000_000
    return [
        RailFacts(
            rail="instant",
            method="instant_payment",
            reachable=True,
            max_amount_minor=1_000_000_000,
            window_open=True,
            cost_minor=45,
        ),
        RailFacts(
            rail="ach_same_day",
            method="bank_transfer",
            reachable=True,
            max_amount_minor=100_000_000,
            window_open=same_day_open,
            cutoff_at_us=cutoff,
            cost_minor=10,
        ),
        RailFacts(
            rail="ach",
            method="bank_transfer",
            reachable=True,
            max_amount_minor=9_999_999_999,
            window_open=True,
            cutoff_at_us=cutoff,
            cost_minor=5,
        ),
        RailFacts(
            rail="sepa",
            method="bank_transfer",
            unreachable_because="currency",
            max_amount_minor=99_999_999_999,
            cost_minor=20,
        ),
        RailFacts(
            rail="card",
            method="card",
            unreachable_because="beneficiary_kind",
            max_amount_minor=5_000_000,
            window_open=True,
            cost_minor=25,
        ),
    ]


def payout(
    amount_minor: int,
    rails: list[RailFacts],
    *,
    key: str = "po-1",
    currency: str = "USD",
    beneficiary_payouts: float = 3.0,
    counterparty: str = "Ada Seller",
) -> EvaluationInput:
    features = {**FEATURES, "payout_beneficiary_payouts": beneficiary_payouts}
    return payment_input(
        key,
        kind="payout",
        movement="payout",
        amount_minor=amount_minor,
        currency=currency,
        tier=3,
        score=None,
        source="none",
        counterparty=counterparty,
        features=features,
        rails=rails,
    )


def considered(route: Route) -> dict[str, tuple[str, str]]:
    return {c.rail: (c.outcome, c.reason) for c in route.considered}


def route_of(bundle: CompiledBundle, inp: EvaluationInput) -> Route:
    verdict = bundle.evaluate(inp)
    assert verdict.route is not None, verdict
    return verdict.route


def test_two_million_goes_instant_not_same_day_ach(default: CompiledBundle) -> None:
    route = route_of(default, payout(200_000_000, us_rails()))
    assert (route.rail, route.method, route.reason) == ("instant", "instant_payment", "lowest_cost")
    assert route.estimated_cost_minor == 45
    # Next-day ACH: its fee plus a business day of float (2 bps of $2M).
    assert route.alternates == ["ach"]
    assert considered(route) == {
        "instant": ("chosen", "lowest_cost"),
        "ach_same_day": ("rejected", "over_limit"),
        "ach": ("alternate", "costlier"),
        "sepa": ("rejected", "unreachable"),
        "card": ("rejected", "unreachable"),
    }
    costs = {c.rail: c.cost_minor for c in route.considered}
    assert costs["ach"] == 5 + 200_000_000 * 2 // 10_000


def test_same_day_ach_while_its_window_is_open(default: CompiledBundle) -> None:
    route = route_of(default, payout(5_000_000, us_rails()))
    assert (route.rail, route.reason) == ("ach_same_day", "lowest_cost")
    assert route.alternates == ["instant", "ach"]  # 45 < 5 + 1000
    assert considered(route)["instant"] == ("alternate", "costlier")


def test_after_the_same_day_cut_off_instant_or_next_day_ach(default: CompiledBundle) -> None:
    closed = us_rails(same_day_open=False)
    large = route_of(default, payout(5_000_000, closed))
    assert (large.rail, large.alternates) == ("instant", ["ach"])
    assert considered(large)["ach_same_day"] == ("rejected", "window_closed")
    # A small one: a day of float costs less than the instant fee.
    small = route_of(default, payout(10_000, closed))
    assert (small.rail, small.alternates) == ("ach", ["instant"])


def test_a_new_beneficiary_or_a_possible_match_is_not_paid_instantly(
    default: CompiledBundle,
) -> None:
    closed = us_rails(same_day_open=False)
    new = route_of(default, payout(5_000_000, closed, beneficiary_payouts=0.0))
    assert (new.rail, new.reason, new.alternates) == ("ach", "only_eligible", [])
    assert considered(new)["instant"] == ("rejected", "risk")
    # A name close to a sanctions list entry (a possible match, not a hit).
    near = default.evaluate(
        payout(5_000_000, closed, counterparty="Golden Cresent Exchanges Group")
    )
    assert near.screening.possible_match and not near.screening.hit
    assert near.outcome == "review" and near.route is not None
    assert (near.route.rail, considered(near.route)["instant"]) == ("ach", ("rejected", "risk"))


def test_unreachable_rails_leave_the_one_that_reaches(default: CompiledBundle) -> None:
    eur = [
        msgspec.structs.replace(r, reachable=False, unreachable_because="currency")
        for r in us_rails()
        if r.rail != "sepa"
    ] + [
        RailFacts(
            rail="sepa",
            method="bank_transfer",
            reachable=True,
            max_amount_minor=99_999_999_999,
            window_open=True,
            cost_minor=20,
        )
    ]
    route = route_of(default, payout(5_000_000, eur, currency="EUR"))
    assert (route.rail, route.method, route.reason, route.alternates) == (
        "sepa",
        "bank_transfer",
        "only_eligible",
        [],
    )
    assert {rail for rail, (outcome, _) in considered(route).items() if outcome == "rejected"} == {
        "instant",
        "ach_same_day",
        "ach",
        "card",
    }


def test_no_eligible_rail_sends_the_payout_to_review(default: CompiledBundle) -> None:
    nothing = [msgspec.structs.replace(r, reachable=False) for r in us_rails()]
    verdict = default.evaluate(payout(5_000_000, nothing))
    assert verdict.route is None
    assert verdict.outcome == "review"
    assert "ROUTING_NO_RAIL" in verdict.reason_codes


def test_without_rail_options_a_payout_is_routed_by_method(default: CompiledBundle) -> None:
    route = route_of(default, payout(50_000, []))
    assert (route.method, route.rail, route.alternates, route.considered) == (
        "bank_transfer",
        "",
        [],
        [],
    )


@pytest.mark.parametrize(
    ("at", "holidays", "expected"),
    [
        (MONDAY_MORNING, [], "ach_same_day"),
        # Saturday: no same-day window until Monday.
        (dt.datetime(2026, 12, 5, 14, 0, tzinfo=dt.UTC), [], "instant"),
        # Christmas (a FED holiday) on a Friday.
        (dt.datetime(2026, 12, 25, 14, 0, tzinfo=dt.UTC), [], "instant"),
        # A bank holiday the deployment configures (rails.holidays).
        (MONDAY_MORNING, ["2026-12-07"], "instant"),
    ],
)
def test_the_money_planes_calendar_decides_the_same_day_window(
    default: CompiledBundle, at: dt.datetime, holidays: list[str], expected: str
) -> None:
    options = rail_options(
        rail_capabilities(RailsConfig(holidays=holidays)),
        currency="USD",
        amount_minor=5_000_000,
        beneficiary_kind="us_bank",
        country="US",
        now_us=int(at.timestamp() * 1_000_000),
    )
    facts = [
        RailFacts(
            rail=o.rail,
            method=o.method,
            reachable=o.reachable,
            unreachable_because=o.unreachable_because,
            max_amount_minor=o.max_amount_minor,
            window_open=o.window_open,
            cutoff_at_us=o.cutoff_at_us,
            cost_minor=o.cost_minor,
        )
        for o in options
    ]
    route = route_of(default, payout(5_000_000, facts))
    assert route.rail == expected
    if expected != "ach_same_day":
        assert considered(route)["ach_same_day"] == ("rejected", "window_closed")


def test_the_route_survives_the_wire_and_the_log(default: CompiledBundle) -> None:
    inp = payout(200_000_000, us_rails())
    assert evaluation_input(evaluate_request_pb(inp)) == inp
    route = route_of(default, inp)
    assert RouteConsidered("ach_same_day", "rejected", "over_limit", 10) in route.considered


def test_bad_rail_options_are_refused_with_the_field_named() -> None:
    twice = [*us_rails(), us_rails()[0]]
    with pytest.raises(InvalidArgument) as refused:
        check_evaluation(payout(1_000, twice), POLICY_LIMITS)
    assert refused.value.reason == "RAIL_INVALID"
    assert refused.value.field == "snapshot.rails[5].rail"
    negative = [msgspec.structs.replace(us_rails()[0], cost_minor=-1)]
    with pytest.raises(InvalidArgument) as refused:
        check_evaluation(payout(1_000, negative), POLICY_LIMITS)
    assert refused.value.field == "snapshot.rails[0].cost_minor"


async def test_replay_reproduces_the_logged_route(engine: PolicyEngine) -> None:
    """The shipped bundle, live in the engine: the route is in the signed
    log, on the wire, and a replay of the log decides it again."""
    await put_customer(engine, tier=3)
    closed = us_rails(same_day_open=False)
    decision, _ = await engine.evaluate(payout(5_000_000, closed, key="route-replay"))
    route = decision.record.verdict.route
    assert route is not None, decision.record.verdict
    assert route.rail == "instant" and route.alternates == ["ach"]
    message = decision_pb(decision)
    assert (message.route.rail, list(message.route.alternates)) == ("instant", ["ach"])
    assert {c.rail: c.reason for c in message.route.considered}["ach_same_day"] == ("window_closed")
    report = await engine.replay(ReplayWindow(TENANT, "", 0, 0, 0), "")
    assert report.replayed >= 1
    assert report.determinism_score == 1.0, report.changed


ROUTING_INPUTS = [
    payout(200_000_000, us_rails()),
    payout(5_000_000, us_rails()),
    payout(5_000_000, us_rails(same_day_open=False)),
    payout(10_000, us_rails(same_day_open=False)),
    payout(5_000_000, us_rails(same_day_open=False), beneficiary_payouts=0.0),
    payout(5_000_000, us_rails(), counterparty="Golden Cresent Exchanges Group"),
    payout(5_000_000, [msgspec.structs.replace(r, reachable=False) for r in us_rails()]),
]


def test_flattened_rail_routes_decide_as_written(default: CompiledBundle) -> None:
    written = compile_source(default.source, LIMITS, SHIPPED_LISTS_DIR, flatten=False)
    assert any(c.program is not c.written for r in default.rail_routes for _, c in r.conditions())
    for inp in ROUTING_INPUTS:
        assert default.evaluate(inp) == written.evaluate(inp)


def test_a_rail_route_may_read_the_rail_whole_and_require_its_own_terms() -> None:
    bundle = compile_source(
        BundleSource(
            yaml_text=textwrap.dedent(
                """
                apiVersion: triplane.policy/v1
                label: rails
                parameters: {max_cost_minor: 40}
                rules: [{id: a, when: "false", outcome: deny, reason_code: A}]
                routing:
                  - method: instant_payment
                    rail: instant
                    require:
                      - reason: too_dear
                        when: has(rail.cost_minor) && rail.cost_minor < params.max_cost_minor
                  - method: bank_transfer
                    rail: ach
                    when: rail.rail == "ach" && request.kind == "payout"
                """
            )
        ),
        LIMITS,
        SHIPPED_LISTS_DIR,
    )
    route = route_of(bundle, payout(5_000, us_rails()))
    assert (route.rail, route.reason, route.alternates) == ("ach", "only_eligible", [])
    assert considered(route)["instant"] == ("rejected", "too_dear")
    cheap = [
        msgspec.structs.replace(r, cost_minor=1) if r.rail == "instant" else r for r in us_rails()
    ]
    assert route_of(bundle, payout(5_000, cheap)).rail == "instant"
    with pytest.raises(InvalidArgument) as refused:
        compile_source(
            BundleSource(
                yaml_text="apiVersion: triplane.policy/v1\nlabel: r\n"
                "rules: [{id: a, when: 'false', outcome: deny, reason_code: A}]\nrouting:\n"
                "  - {method: card, rail: card, require: [{reason: x, when: 'rail.nope'}]}\n"
            ),
            LIMITS,
            SHIPPED_LISTS_DIR,
        )
    assert refused.value.reason == "RULE_UNKNOWN_FIELD"
