"""A compiled bundle and the pure function that evaluates it.

`CompiledBundle.evaluate(input)` depends on nothing but the bundle and the
input: no clock, no randomness, no I/O. That is what makes replay bit-for-bit.
A rule whose condition fails at run time (say a feature the snapshot lacks)
does not fail the request: it fires as `review` with RULE_EVALUATION_ERROR,
which is deterministic and fails safe.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cel

from policy_plane import bundle as bundle_mod
from policy_plane import cel_check
from policy_plane.bundle import BundleLimits, BundleSource, BundleSpec, RuleSpec
from policy_plane.model import (
    ADJUSTMENT_MOVEMENT,
    UNKNOWN_VELOCITY,
    VELOCITY_COUNTERS,
    AdjustmentInput,
    EvaluationInput,
    FiredRule,
    Obligation,
    Outcome,
    PaymentInput,
    RailFacts,
    Route,
    RouteConsidered,
    Screening,
    Velocity,
    Verdict,
    combine,
)
from policy_plane.sanctions import Screener
from triplane.runtime.errors import InvalidArgument

SCORE_PRESENT_SOURCES = frozenset({"triton", "in_process", "last_good"})
# Movements that travel the rails of the payment they act on: nothing to route.
UNROUTED = frozenset({"capture", "refund", ADJUSTMENT_MOVEMENT})
SCORE_FALLBACK_SOURCES = frozenset({"in_process", "last_good"})
_MAX_ERROR_TEXT = 160


@dataclass(frozen=True, slots=True)
class Condition:
    """A condition as written (`written`, over the nested activation) and as
    run (`program`: the flattened rewrite, or the written one where the
    rewrite does not decide the same on the load-time probe)."""

    written: cel.Program
    program: cel.Program
    flat_paths: frozenset[tuple[str, ...]]

    def as_written(self) -> Condition:
        return Condition(self.written, self.written, frozenset())


def _condition(
    source: str,
    where: str,
    schema: dict[str, Any],
    flatten: bool,
    bounds: cel_check.ConditionBounds,
) -> Condition:
    written = bundle_mod.compile_condition(source, where, schema, bounds)
    flat_source, paths = cel_check.flatten_paths(source, schema)
    if not paths or not flatten:
        return Condition(written, written, frozenset())
    try:
        program = cel.compile(flat_source)
    except Exception:  # never expected: the rewrite keeps the syntax
        return Condition(written, written, frozenset())
    return Condition(written, program, paths)


@dataclass(frozen=True, slots=True)
class CompiledRule:
    spec: RuleSpec
    condition: Condition
    fired: FiredRule
    outcome: Outcome | None
    obligation: Obligation | None

    @property
    def program(self) -> cel.Program:
        return self.condition.program


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    method: str
    condition: Condition
    fixed_cost_minor: int
    cost_bps: int

    @property
    def program(self) -> cel.Program:
        return self.condition.program


@dataclass(frozen=True, slots=True)
class CompiledRailRoute:
    """A rail route: its conditions run as written, with `rail` bound to the
    money plane's facts about that rail."""

    rail: str
    method: str
    when: Condition
    require: tuple[tuple[str, Condition], ...]
    fixed_cost_minor: int
    cost_bps: int

    def conditions(self) -> list[tuple[str, Condition]]:
        """(what it checks, its condition): `when`, then each requirement."""
        return [("when", self.when), *self.require]

    def with_written(self, which: str) -> CompiledRailRoute:
        """This route with the condition named `which` run as written."""
        if which == "when":
            return dataclasses.replace(self, when=self.when.as_written())
        return dataclasses.replace(
            self,
            require=tuple(
                (name, c.as_written() if name == which else c) for name, c in self.require
            ),
        )


_ALL_KNOWN = {name: True for name in VELOCITY_COUNTERS}


def _rail(f: RailFacts) -> dict[str, Any]:
    return {
        "rail": f.rail,
        "method": f.method,
        "reachable": f.reachable,
        "unreachable_because": f.unreachable_because,
        "max_amount_minor": f.max_amount_minor,
        "window_open": f.window_open,
        "cutoff_at_us": f.cutoff_at_us,
        "cost_minor": f.cost_minor,
    }


def _velocity(v: Velocity) -> dict[str, Any]:
    unknown = v.unknown
    return {
        "count_1h": v.count_1h,
        "count_24h": v.count_24h,
        "count_30d": v.count_30d,
        "amount_minor_1h": v.amount_minor_1h,
        "amount_minor_24h": v.amount_minor_24h,
        "amount_minor_30d": v.amount_minor_30d,
        "known": {name: name not in unknown for name in VELOCITY_COUNTERS}
        if unknown
        else _ALL_KNOWN,
    }


def _request(payment: PaymentInput, tenant_id: str) -> dict[str, Any]:
    return {
        "tenant_id": tenant_id,
        "account_id": payment.account_id,
        "kind": payment.kind,
        "amount_minor": payment.amount_minor,
        "currency": payment.currency,
        "payment_method": payment.payment_method,
        "merchant_id": payment.merchant_id,
        "merchant_category": payment.merchant_category,
        "device_id": payment.device_id,
        "customer": {"name": payment.customer.name, "country": payment.customer.country},
        "counterparty": {
            "name": payment.counterparty.name,
            "country": payment.counterparty.country,
        },
        "credit_account_id": payment.credit_account_id,
        "movement": payment.movement,
        "splits": [
            {
                "account_id": leg.account_id,
                "amount_minor": leg.amount_minor,
                "basis_points": leg.basis_points,
                "label": leg.label,
            }
            for leg in payment.splits
        ],
        "hold_id": payment.hold_id,
        "refund": {
            "entry_id": payment.refund.entry_id,
            "original_account_id": payment.refund.original_account_id,
            "captured_minor": payment.refund.captured_minor,
            "refunded_minor": payment.refund.refunded_minor,
            "refund_count": payment.refund.refund_count,
        },
    }


def _adjustment(inp: EvaluationInput) -> dict[str, Any]:
    """A reconciliation adjustment's request (all empty for any other)."""
    adj = inp.adjustment
    if adj is None:
        return _NO_ADJUSTMENT
    return {
        "resolution": adj.resolution,
        "break_id": adj.break_id,
        "requested_by": adj.requested_by,
        "reason": adj.reason,
        "reverses_entry_id": adj.reverses_entry_id,
    }


_NO_ADJUSTMENT: dict[str, Any] = {
    "resolution": "",
    "break_id": "",
    "requested_by": "",
    "reason": "",
    "reverses_entry_id": "",
}


def _snapshot(inp: EvaluationInput) -> dict[str, Any]:
    snap = inp.snapshot
    score = snap.score
    return {
        "kyc": {
            "tier": snap.kyc_tier,
            "country": snap.kyc_country,
            "pep": snap.pep,
            "known": snap.kyc_known,
        },
        "score": {
            "model": score.model,
            "version": score.version,
            "source": score.source,
            "value": float(score.score),
            "present": score.source in SCORE_PRESENT_SOURCES,
            "fallback": score.source in SCORE_FALLBACK_SOURCES,
        },
        "velocity": {
            "account": _velocity(snap.account_velocity),
            "device": _velocity(snap.device_velocity),
            "merchant": _velocity(snap.merchant_velocity),
        },
        "account_age_days": snap.account_age_days,
        "features": {k: float(v) for k, v in snap.features.items()},
        "decided_at_us": snap.decided_at_us,
        "rails": [_rail(f) for f in snap.rails],
    }


class CompiledBundle:
    """A bundle ready to evaluate; immutable, shared by concurrent requests."""

    def __init__(
        self, spec: BundleSpec, source: BundleSource, limits: BundleLimits, flatten: bool = True
    ) -> None:
        """`flatten=False` runs every condition as written (the reference the
        tests compare the flattened evaluation with)."""
        self.spec = spec
        self.source = source
        self.limits = limits
        self.label = spec.label
        self.content_hash = bundle_mod.content_hash(spec, source, limits)
        self.version = f"{spec.label}@{self.content_hash[:16]}"
        self.screener: Screener = bundle_mod.build_screener(spec, source, limits)
        self._schema = bundle_mod.schema_for(spec.parameters)
        self._params = spec.parameters
        self._limits = bundle_mod.limit_table(spec)
        self._unknown_customer_tier = spec.unknown_customer_tier
        self._flatten = flatten
        self.rules = [self._compile_rule(r) for r in spec.rules]
        self.routes = [
            CompiledRoute(
                r.method,
                _condition(r.when, f"routing[{i}].when", self._schema, flatten, limits.condition),
                r.fixed_cost_minor,
                r.cost_bps,
            )
            for i, r in enumerate(spec.routing)
            if not r.rail
        ]
        self._rail_schema = {**self._schema, "rail": cel_check.RAIL}
        self.rail_routes = [
            CompiledRailRoute(
                r.rail,
                r.method,
                _condition(
                    r.when, f"routing[{i}].when", self._rail_schema, flatten, limits.condition
                ),
                tuple(
                    (
                        need.reason,
                        _condition(
                            need.when,
                            f"routing[{i}].require[{j}].when",
                            self._rail_schema,
                            flatten,
                            limits.condition,
                        ),
                    )
                    for j, need in enumerate(r.require)
                ),
                r.fixed_cost_minor,
                r.cost_bps,
            )
            for i, r in enumerate(spec.routing)
            if r.rail
        ]
        self._bind_rails()
        self._check_rail_flattening()
        self.decline_suggestion_score = spec.cases.decline_suggestion_score
        # Per-thread evaluation contexts, the bundle's constants bound once.
        self._local = threading.local()
        self._bind()
        self._check_flattening()
        self._probe()

    def _bind(self) -> None:
        """What each evaluation binds: the flat variables its conditions read
        and the nested roots some still read whole."""
        conditions = [r.condition for r in self.rules] + [r.condition for r in self.routes]
        paths = sorted(set().union(*(c.flat_paths for c in conditions)))
        roots = sorted(
            {name for c in conditions for name in c.program.variables() if name in self._schema}
        )
        constants: dict[str, Any] = {}
        for path in paths:
            if path[0] == "params":
                constants[cel_check.flat_name(path)] = _lookup(self._params, path[1:])
        if "params" in roots:
            constants["params"] = self._params
        self._constants = constants
        self._flat = [(cel_check.flat_name(p), p) for p in paths if p[0] != "params"]
        self._roots = [r for r in roots if r != "params"]
        self._executes = [rule.program.execute for rule in self.rules]
        self._local = threading.local()

    def _bind_rails(self) -> None:
        """What rail routes bind: per evaluation the flat variables (and
        nested roots) their conditions read of the request, and per rail
        those they read of `rail`; the bundle's params once. Binding a whole
        activation into a CEL context costs about a millisecond: this binds
        only what they read."""
        conditions = [c for r in self.rail_routes for _, c in r.conditions()]
        paths = sorted(set().union(*(c.flat_paths for c in conditions)))
        roots = {
            name for c in conditions for name in c.program.variables() if name in self._rail_schema
        }
        constants: dict[str, Any] = {}
        for path in paths:
            if path[0] == "params":
                constants[cel_check.flat_name(path)] = _lookup(self._params, path[1:])
        if "params" in roots:
            constants["params"] = self._params
        self._rail_constants = constants
        self._rail_flat = [
            (cel_check.flat_name(p), p) for p in paths if p[0] not in ("params", "rail")
        ]
        self._rail_fact_paths = [(cel_check.flat_name(p), p[1:]) for p in paths if p[0] == "rail"]
        self._rail_roots = sorted(roots - {"params", "rail"})
        self._rail_whole = "rail" in roots
        self._rail_local = threading.local()

    def _check_rail_flattening(self) -> None:
        """Every rewritten rail condition must decide as written on the probe
        inputs (and the probe rail); one that does not runs as written."""
        changed = False
        for sample in probe_inputs():
            screening = self.screener.screen(sample.payment, "")
            nested = cel.Context({**self.activation(sample, screening), "rail": _rail(PROBE_RAIL)})
            flat = self._rail_context(sample, screening)
            self._bind_rail(flat, PROBE_RAIL)
            for index, route in enumerate(self.rail_routes):
                for name, condition in route.conditions():
                    if condition.program is not condition.written and _run(
                        condition.program, flat
                    ) != _run(condition.written, nested):
                        route = route.with_written(name)
                        self.rail_routes[index] = route
                        changed = True
        if changed:
            self._bind_rails()

    def _check_flattening(self) -> None:
        """Every rewritten condition must decide exactly as written on the
        probe inputs; one that does not runs as written."""
        changed = False
        for sample in probe_inputs():
            screening = self.screener.screen(sample.payment, "")
            nested = cel.Context(self.activation(sample, screening))
            flat = self.context(sample, screening)
            for index, rule in enumerate(self.rules):
                condition = rule.condition
                if condition.program is not condition.written and _run(
                    condition.program, flat
                ) != _run(condition.written, nested):
                    self.rules[index] = dataclasses.replace(rule, condition=condition.as_written())
                    changed = True
            for index, route in enumerate(self.routes):
                condition = route.condition
                if condition.program is not condition.written and _run(
                    condition.program, flat
                ) != _run(condition.written, nested):
                    self.routes[index] = dataclasses.replace(
                        route, condition=condition.as_written()
                    )
                    changed = True
        if changed:
            self._bind()

    def context(self, inp: EvaluationInput, screening: Screening) -> cel.Context:
        """This thread's evaluation context, bound to `inp` (valid until this
        thread's next call)."""
        return self._bound(self._local, self._constants, self._flat, self._roots, inp, screening)

    def _bound(
        self,
        local: threading.local,
        constants: dict[str, Any],
        flat: list[tuple[str, tuple[str, ...]]],
        roots: list[str],
        inp: EvaluationInput,
        screening: Screening,
    ) -> cel.Context:
        """`local`'s context (made once per thread from `constants`), with
        the flattened names and whole roots of `inp` bound in it."""
        context: cel.Context | None = getattr(local, "context", None)
        if context is None:
            context = local.context = cel.Context(dict(constants))
        nested = self.activation(inp, screening)
        values = {name: _lookup(nested, path) for name, path in flat}
        for root in roots:
            values[root] = nested[root]
        context.update(values)
        return context

    def _compile_rule(self, spec: RuleSpec) -> CompiledRule:
        where = bundle_mod.rule_field(spec.id, "when")
        condition = _condition(spec.when, where, self._schema, self._flatten, self.limits.condition)
        obligation = None
        outcome: Outcome | None = None
        if spec.obligation is not None:
            obligation = Obligation(
                kind=spec.obligation.kind, rule_id=spec.id, params=dict(spec.obligation.params)
            )
        else:
            outcome = Outcome.parse(spec.outcome)
        fired = FiredRule(
            rule_id=spec.id,
            outcome=spec.outcome,
            reason_code=spec.reason_code,
            reason=spec.reason,
            obligation=spec.obligation.kind if spec.obligation else "",
        )
        return CompiledRule(spec, condition, fired, outcome, obligation)

    def _probe(self) -> None:
        """Evaluates every condition on sample inputs: each must give a bool."""
        for sample in probe_inputs():
            context = self.context(sample, self.screener.screen(sample.payment, ""))
            checks = [(bundle_mod.rule_field(r.spec.id, "when"), r.program) for r in self.rules]
            checks += [(f"routing[{i}].when", r.program) for i, r in enumerate(self.routes)]
            rail_context = self._rail_context(sample, self.screener.screen(sample.payment, ""))
            self._bind_rail(rail_context, PROBE_RAIL)
            rail_checks = [
                (f"routing[{r.rail}].{name}", condition.program)
                for r in self.rail_routes
                for name, condition in r.conditions()
            ]
            for where, program, on in [(w, p, context) for w, p in checks] + [
                (w, p, rail_context) for w, p in rail_checks
            ]:
                try:
                    result = program.execute(on)
                except KeyError as exc:
                    raise InvalidArgument(
                        "RULE_UNKNOWN_FIELD",
                        f"{where}: no such field or key {exc} (guard optional keys with has())",
                        where,
                    ) from exc
                except Exception as exc:
                    raise InvalidArgument(
                        "RULE_TYPE_ERROR", f"{where}: {_error_text(exc)}", where
                    ) from exc
                if not isinstance(result, bool):
                    raise InvalidArgument(
                        "RULE_TYPE_ERROR",
                        f"{where}: condition gives {type(result).__name__}, not bool",
                        where,
                    )

    def activation(self, inp: EvaluationInput, screening: Screening) -> dict[str, Any]:
        payment, snapshot = inp.payment, inp.snapshot
        tier = snapshot.kyc_tier
        if not snapshot.kyc_known and self._unknown_customer_tier is not None:
            tier = self._unknown_customer_tier
        found = self._limits.get((tier, payment.currency))
        tier_limits = found[0] if found else None
        return {
            "request": {**_request(payment, inp.tenant_id), "adjustment": _adjustment(inp)},
            "snapshot": _snapshot(inp),
            "limits": {
                "known": tier_limits is not None,
                "converted": found[1] if found else False,
                "tier": tier,
                "single_minor": tier_limits.single_minor if tier_limits else 0,
                "daily_minor": tier_limits.daily_minor if tier_limits else 0,
                "monthly_minor": tier_limits.monthly_minor if tier_limits else 0,
            },
            "sanctions": {
                "hit": screening.hit,
                "possible_match": screening.possible_match,
                "best_score": screening.best_score,
                "country_blocked": screening.country_blocked,
            },
            "params": self._params,
        }

    def evaluate(self, inp: EvaluationInput) -> Verdict:
        screening = self.screener.screen(inp.payment, inp.snapshot.kyc_country)
        context = self.context(inp, screening)
        executes = self._executes
        try:
            results: list[object] = [execute(context) for execute in executes]
        except Exception:
            # Some rule failed: run them one by one (they are pure) to know which.
            results = [_outcome_or_error(execute, context) for execute in executes]
        fired: list[FiredRule] = []
        outcomes: list[Outcome] = []
        obligations: list[Obligation] = []
        rules = self.rules
        for index in [i for i, result in enumerate(results) if result is not False]:
            rule, result = rules[index], results[index]
            if result is not True:
                fired.append(_error_fired(rule, result))
                outcomes.append(Outcome.REVIEW)
                continue
            fired.append(rule.fired)
            if rule.outcome is not None:
                outcomes.append(rule.outcome)
            if rule.obligation is not None:
                obligations.append(rule.obligation)
        outcome = combine(outcomes)
        route = None
        if outcome != Outcome.DENY and inp.payment.movement not in UNROUTED:
            if inp.snapshot.rails and self.rail_routes:
                route = self._route_rails(inp, screening)
                if route is None:
                    fired.append(_NO_RAIL)
                    outcome = combine([outcome, Outcome.REVIEW])
            elif self.routes:
                route = self._route(context, inp.payment)
                if route is None:
                    fired.append(_NO_ROUTE)
                    outcome = combine([outcome, Outcome.REVIEW])
        return Verdict(
            outcome=outcome.label,
            fired=fired,
            obligations=obligations,
            route=route,
            screening=screening,
        )

    def _route(self, context: cel.Context, payment: PaymentInput) -> Route | None:
        """The requested method when eligible, else the cheapest eligible one
        (ties: the bundle's order)."""
        best: Route | None = None
        for route in self.routes:
            try:
                eligible = route.program.execute(context) is True
            except Exception:
                eligible = False
            if not eligible:
                continue
            cost = route.fixed_cost_minor + payment.amount_minor * route.cost_bps // 10_000
            if route.method == payment.payment_method:
                return Route(method=route.method, estimated_cost_minor=cost, reason="requested")
            if best is None or cost < best.estimated_cost_minor:
                best = Route(method=route.method, estimated_cost_minor=cost, reason="lowest_cost")
        return best

    def _rail_context(self, inp: EvaluationInput, screening: Screening) -> cel.Context:
        """This thread's context for rail routes, bound to `inp` (valid until
        this thread's next call); `_bind_rail` binds each rail in turn."""
        return self._bound(
            self._rail_local,
            self._rail_constants,
            self._rail_flat,
            self._rail_roots,
            inp,
            screening,
        )

    def _bind_rail(self, context: cel.Context, facts: RailFacts) -> None:
        offer = _rail(facts)
        values = {name: _lookup(offer, path) for name, path in self._rail_fact_paths}
        if self._rail_whole:
            values["rail"] = offer
        context.update(values)

    def _route_rails(self, inp: EvaluationInput, screening: Screening) -> Route | None:
        """Among the rails the money plane offers: each rail route's
        requirements (in order; the first that fails is why the rail was
        not chosen), then the cheapest eligible rail of the requested
        method (payment_method) when there is one, else the
        cheapest (rail cost + the route's own; ties: the bundle's order).
        The other eligible rails are the alternates, cheapest first."""
        facts = {f.rail: f for f in inp.snapshot.rails}
        context = self._rail_context(inp, screening)
        payment = inp.payment
        looked: list[tuple[CompiledRailRoute, str, int]] = []  # route, why not, cost
        eligible: list[tuple[int, int, CompiledRailRoute]] = []
        seen: set[str] = set()
        for index, route in enumerate(self.rail_routes):
            if route.rail in seen:
                continue
            seen.add(route.rail)
            found = facts.get(route.rail)
            if found is None:
                looked.append((route, "not_offered", 0))
                continue
            cost = (
                found.cost_minor
                + route.fixed_cost_minor
                + payment.amount_minor * route.cost_bps // 10_000
            )
            self._bind_rail(context, found)
            why = "" if _holds(route.when.program, context) else "ineligible"
            for reason, condition in route.require:
                if why:
                    break
                if not _holds(condition.program, context):
                    why = reason
            looked.append((route, why, cost))
            if not why:
                eligible.append((cost, index, route))
        if not eligible:
            return None
        eligible.sort(key=lambda e: (e[0], e[1]))
        requested = [e for e in eligible if e[2].method == payment.payment_method]
        if requested:
            chosen, reason = requested[0], "requested"
        else:
            chosen = eligible[0]
            reason = "only_eligible" if len(eligible) == 1 else "lowest_cost"
        alternates = [e[2].rail for e in eligible if e is not chosen]
        considered = []
        for route, why, cost in looked:
            if route is chosen[2]:
                considered.append(RouteConsidered(route.rail, "chosen", reason, cost))
            elif not why:
                # Cheaper than a requested rail: not the one asked for.
                note = "costlier" if cost >= chosen[0] else "not_requested"
                considered.append(RouteConsidered(route.rail, "alternate", note, cost))
            else:
                considered.append(RouteConsidered(route.rail, "rejected", why, cost))
        return Route(
            method=chosen[2].method,
            estimated_cost_minor=chosen[0],
            reason=reason,
            rail=chosen[2].rail,
            alternates=alternates,
            considered=considered,
        )


def _holds(program: cel.Program, context: cel.Context) -> bool:
    """A routing condition that fails at run time does not hold."""
    try:
        return program.execute(context) is True
    except Exception:
        return False


_NO_RAIL = FiredRule(
    rule_id="routing",
    outcome="review",
    reason_code="ROUTING_NO_RAIL",
    reason="no rail the money plane offers is eligible for this payout",
)

_NO_ROUTE = FiredRule(
    rule_id="routing",
    outcome="review",
    reason_code="ROUTING_NO_METHOD",
    reason="no payment method is eligible for this payment",
)


def _lookup(value: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        value = value[key]
    return value


def _outcome_or_error(execute: Callable[[cel.Context], object], context: cel.Context) -> object:
    try:
        return execute(context)
    except Exception as exc:
        return exc


def _run(program: cel.Program, context: cel.Context) -> tuple[str, object]:
    """What a condition gives, comparable: (type name, value or error text)."""
    try:
        result = program.execute(context)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return type(result).__name__, result


def _error_text(exc: BaseException | object) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text[:_MAX_ERROR_TEXT]


def _error_fired(rule: CompiledRule, result: object) -> FiredRule:
    detail = _error_text(result) if isinstance(result, BaseException) else "not a bool"
    return FiredRule(
        rule_id=rule.spec.id,
        outcome="review",
        reason_code="RULE_EVALUATION_ERROR",
        reason=f"rule {rule.spec.id} could not be evaluated ({detail})",
    )


# The rail the load-time probe binds for rail routes' conditions.
PROBE_RAIL = RailFacts(
    rail="instant",
    method="instant_payment",
    reachable=True,
    max_amount_minor=1_000_000_000,
    window_open=True,
    cost_minor=45,
)


def probe_inputs() -> list[EvaluationInput]:
    """Sample inputs for the load-time probe: a full one and an empty one."""
    from policy_plane.model import (
        Party,
        RefundInput,
        ScoreInput,
        SnapshotInput,
        SplitInput,
        Velocity,
    )

    busy = Velocity(
        count_1h=3,
        count_24h=9,
        count_30d=40,
        amount_minor_1h=30_000,
        amount_minor_24h=90_000,
        amount_minor_30d=400_000,
    )
    full = EvaluationInput(
        tenant_id="probe",
        idempotency_key="probe",
        payment=PaymentInput(
            account_id="acct",
            kind="purchase",
            amount_minor=12_345,
            currency="USD",
            payment_method="card",
            merchant_id="m",
            merchant_category="5411",
            device_id="d",
            customer=Party(name="Probe Customer", country="US"),
            counterparty=Party(name="Probe Merchant", country="US"),
            credit_account_id="merchant",
            movement="transfer",
            splits=[SplitInput(account_id="fee", basis_points=250, label="fee")],
        ),
        snapshot=SnapshotInput(
            kyc_tier=1,
            kyc_country="US",
            score=ScoreInput(model="risk", version="1", source="triton", score=0.5),
            account_velocity=busy,
            device_velocity=busy,
            merchant_velocity=busy,
            account_age_days=30,
            decided_at_us=1_790_000_000_000_000,
        ),
    )
    empty = EvaluationInput(
        tenant_id="probe",
        idempotency_key="probe",
        payment=PaymentInput(account_id="acct", kind="transfer", amount_minor=1, currency="EUR"),
        snapshot=SnapshotInput(),
    )
    # A customer without a profile, and counters the server could not have.
    unknown = EvaluationInput(
        tenant_id="probe",
        idempotency_key="probe",
        payment=PaymentInput(
            account_id="acct", kind="purchase", amount_minor=99_999, currency="USD"
        ),
        snapshot=SnapshotInput(
            kyc_known=False,
            account_velocity=UNKNOWN_VELOCITY,
            device_velocity=Velocity(unknown=["count_1h"]),
            merchant_velocity=UNKNOWN_VELOCITY,
        ),
    )
    refund = EvaluationInput(
        tenant_id="probe",
        idempotency_key="probe",
        payment=PaymentInput(
            account_id="merchant",
            kind="refund",
            amount_minor=500,
            currency="USD",
            credit_account_id="acct",
            movement="refund",
            refund=RefundInput(
                entry_id="ent",
                original_account_id="acct",
                captured_minor=1_000,
                refunded_minor=200,
                refund_count=1,
            ),
        ),
        snapshot=SnapshotInput(),
    )
    adjustment = EvaluationInput(
        tenant_id="probe",
        idempotency_key="probe",
        payment=PaymentInput(
            account_id="bank",
            kind="write_off",
            amount_minor=701,
            currency="USD",
            credit_account_id="write-off",
            movement=ADJUSTMENT_MOVEMENT,
        ),
        snapshot=SnapshotInput(kyc_known=False),
        adjustment=AdjustmentInput(
            resolution="write_off",
            break_id="brk",
            requested_by="probe",
            ledger_idempotency_key="recon-writeoff-brk",
            reason="probe",
        ),
    )
    return [full, empty, unknown, refund, adjustment]


def compile_source(
    source: BundleSource,
    limits: BundleLimits,
    lists_dir: Path,
    bundle_dir: Path | None = None,
    flatten: bool = True,
) -> CompiledBundle:
    """Parses, resolves lists, compiles and probes; raises InvalidArgument."""
    spec = bundle_mod.parse_spec(source, limits)
    resolved = bundle_mod.resolve_lists(spec, source, lists_dir, bundle_dir, limits)
    return CompiledBundle(spec, resolved, limits, flatten)
