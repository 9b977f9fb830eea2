"""Policy bundles: versioned YAML files of CEL rules, compiled once at load.

A bundle's version is `<label>@<content hash>`; the hash covers the normalised
bundle and the sanctions lists it names, so a version pins every input of a
decision but the request and its snapshot. A bundle that does not parse, names
an unknown field, or has a condition that is not a boolean is refused with
INVALID_ARGUMENT naming the rule by its id (`rules[kyc_daily_limit].when`, the
field and the start of the message), since ids, not positions, are what a
bundle's author and the fired rules of a decision call a rule; nothing is
swapped.
"""

from __future__ import annotations

import hashlib
import re
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import cel
import msgspec
import yaml

from policy_plane import cel_check
from policy_plane.model import canonical_encoder
from policy_plane.sanctions import (
    MATCHER_NAME_PARTS,
    MATCHER_TOKEN_SORT,
    MATCHERS,
    Screener,
    parse_alt_csv,
    parse_sdn_csv,
)
from triplane.runtime import currencies
from triplane.runtime.errors import InvalidArgument

SHIPPED_DIR = Path(__file__).parent / "bundles"
SHIPPED_LISTS_DIR = Path(__file__).parent / "sanctions_lists"
API_VERSION = "triplane.policy/v1"
RULE_OUTCOMES = ("deny", "hold", "review", "obligation")
PAYMENT_METHODS = ("card", "bank_transfer", "instant_payment", "wallet")
_CODE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_LABEL = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_LIST_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


_ROUTE_NAME = re.compile(r"[a-z][a-z_]{0,31}")


class _Spec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ObligationSpec(_Spec, frozen=True, kw_only=True):
    kind: str
    params: dict[str, str] = {}


class RuleSpec(_Spec, frozen=True, kw_only=True):
    id: str
    when: str
    outcome: Literal["deny", "hold", "review", "obligation"]
    reason_code: str
    reason: str = ""
    obligation: ObligationSpec | None = None


class TierLimits(_Spec, frozen=True, kw_only=True):
    single_minor: int
    daily_minor: int
    monthly_minor: int


class KycTierSpec(_Spec, frozen=True, kw_only=True):
    tier: int
    # Currency code -> limits in that currency's minor units.
    limits: dict[str, TierLimits]


class LimitConversionSpec(_Spec, frozen=True, kw_only=True):
    """KYC limits for the currencies a tier does not write: the base
    currency's, converted at reference rates fixed in the bundle (so a
    decision stays a pure function of the bundle and the request)."""

    # The currency every tier writes its limits in.
    base: str
    # Currency code -> units of it worth one unit of the base currency
    # (a number, or a decimal string for an exact value).
    rates: dict[str, float | int | str]


class SanctionsSpec(_Spec, frozen=True, kw_only=True):
    # File names (OFAC SDN.CSV and ALT.CSV layout), looked up beside the bundle,
    # then in policy.bundles.lists_dir, then among the shipped samples.
    list_file: str = msgspec.field(default="", name="list")
    aliases_file: str = msgspec.field(default="", name="aliases")
    hit_threshold: float | None = None
    possible_match_threshold: float | None = None
    blocked_countries: list[str] = []


class RouteRequirementSpec(_Spec, frozen=True, kw_only=True):
    """One thing a rail must offer (a CEL condition over `rail`, the money
    plane's facts about it, and the rest of the activation); `reason` is
    what the decision records for the rail when it does not hold."""

    reason: str
    when: str


class RouteSpec(_Spec, frozen=True, kw_only=True):
    method: str
    when: str = "true"
    # A method route's cost; a rail route's own cost is the money plane's
    # (rail.cost_minor), to which these add the policy's price of the rail
    # (say the float a slower rail costs the seller).
    fixed_cost_minor: int = 0
    cost_bps: int = 0
    # A rail route (payouts with rail options): the rail it sends on, and
    # what that rail must offer, checked in order.
    rail: str = ""
    require: list[RouteRequirementSpec] = []


class CasesSpec(_Spec, frozen=True, kw_only=True):
    # A model score at or above this suggests "decline" to the reviewer.
    decline_suggestion_score: float = 0.7


class BundleSpec(_Spec, frozen=True, kw_only=True):
    api_version: str = msgspec.field(name="apiVersion")
    label: str
    description: str = ""
    parameters: dict[str, Any] = {}
    kyc_tiers: list[KycTierSpec] = []
    # Limits for currencies the tiers do not write (None: no others).
    limit_conversion: LimitConversionSpec | None = None
    # The tier whose limits a customer without a profile gets (None: none,
    # so `limits.known` is false for them).
    unknown_customer_tier: int | None = None
    sanctions: SanctionsSpec = SanctionsSpec()
    rules: list[RuleSpec]
    routing: list[RouteSpec] = []
    cases: CasesSpec = CasesSpec()


class BundleSource(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a bundle is made of, as stored and as shipped over NATS KV."""

    yaml_text: str
    label_override: str = ""
    sanctions_csv: str = ""
    aliases_csv: str = ""
    # The sanctions matcher (policy_plane/sanctions.py): every bundle loaded
    # from this release on gets `name_parts`; a bundle stored before matchers
    # had names keeps the `token_sort` it decided with (the registry reads a
    # stored source without this field as that), so its replays stay bit
    # for bit.
    sanctions_matcher: str = MATCHER_NAME_PARTS


class BundleLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Every bound a bundle is held to (policy.limits in the config)."""

    max_rules: int
    # The YAML and the sanctions lists together: what LoadBundle carries and
    # what the NATS KV value holds.
    max_bundle_bytes: int
    # Names and aliases, each.
    max_sanctions_entries: int
    max_sanctions_name_length: int
    default_hit_threshold: float
    default_possible_match_threshold: float
    # Nesting of the YAML document (mappings and sequences).
    max_bundle_depth: int
    # Items of one list or map in `parameters`, and the length of one string there.
    max_parameter_items: int
    max_parameter_string_length: int
    condition: cel_check.ConditionBounds


def _bad(reason: str, message: str, field: str = "content") -> InvalidArgument:
    return InvalidArgument(reason, message, field)


def rule_field(rule_id: str, part: str = "") -> str:
    """The path an error names for a rule (or a part of it): `rules[<id>]`."""
    return f"rules[{rule_id}].{part}" if part else f"rules[{rule_id}]"


def check_size(source: BundleSource, limits: BundleLimits) -> None:
    """The bundle with its lists is within max_bundle_bytes (checked before
    parsing, and again once the lists it names are read from files)."""
    size = sum(
        len(text.encode()) for text in (source.yaml_text, source.sanctions_csv, source.aliases_csv)
    )
    if size > limits.max_bundle_bytes:
        raise _bad(
            "BUNDLE_TOO_LARGE",
            f"the bundle and its sanctions lists are {size} bytes, over {limits.max_bundle_bytes}",
        )


class _BundleLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing anchors and aliases and bounding the
    nesting while it composes, before a single value is built.

    Aliases are refused, not bounded: an alias repeats a node by reference,
    and a few hundred bytes of aliases to aliases stand for a million nodes
    (the "billion laughs"), which the schema check would walk one by one. A
    bundle is a short document an author writes and a reviewer reads, where
    writing a value twice costs a line; no bound on expansion is as simple to
    state or as cheap to check as "none". Anchors go with them (an anchor is
    only there to be aliased), so a bomb is refused at its first anchor. The
    nesting bound keeps PyYAML's recursive composer from a RecursionError."""

    def __init__(self, text: str, max_depth: int) -> None:
        super().__init__(text)
        self._max_depth = max_depth
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        line = event.start_mark.line + 1 if event.start_mark else 0
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _bad(
                "BUNDLE_YAML_ALIAS",
                f"line {line}: YAML anchors and aliases are not allowed in a bundle "
                "(write the value out where it is used)",
            )
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                raise _bad(
                    "BUNDLE_TOO_DEEP",
                    f"line {line}: the bundle nests deeper than {self._max_depth} levels",
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(text: str, max_depth: int) -> object:
    """The bundle document as plain values; InvalidArgument when it does not
    parse, uses anchors or aliases, or nests deeper than `max_depth`."""
    loader: _BundleLoader | None = None
    try:
        # The reader checks the characters as it is built: inside the try.
        loader = _BundleLoader(text, max_depth)
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise _bad("BUNDLE_SYNTAX_ERROR", f"bundle YAML does not parse: {exc}") from exc
    except (ValueError, OverflowError) as exc:
        # A scalar PyYAML cannot build: an integer over Python's digit limit,
        # a date that does not exist.
        text_of = str(exc)[:160]
        raise _bad("BUNDLE_SYNTAX_ERROR", f"bundle YAML has a bad value: {text_of}") from exc
    finally:
        if loader is not None:
            loader.dispose()


def parse_spec(source: BundleSource, limits: BundleLimits) -> BundleSpec:
    check_size(source, limits)
    raw = load_yaml(source.yaml_text, limits.max_bundle_depth)
    try:
        spec = msgspec.convert(raw, BundleSpec)
    except msgspec.ValidationError as exc:
        raise _bad("BUNDLE_SCHEMA_ERROR", f"bundle does not match the schema: {exc}") from exc
    if source.label_override:
        spec = msgspec.structs.replace(spec, label=source.label_override)
    _check_spec(spec, limits)
    return spec


def _check_spec(spec: BundleSpec, limits: BundleLimits) -> None:
    if spec.api_version != API_VERSION:
        raise _bad("BUNDLE_SCHEMA_ERROR", f"apiVersion must be {API_VERSION!r}")
    if not _LABEL.fullmatch(spec.label):
        raise _bad("BUNDLE_LABEL_INVALID", "label must match [A-Za-z0-9_.:-]{1,64}", "label")
    if not spec.rules or len(spec.rules) > limits.max_rules:
        raise _bad("BUNDLE_RULE_COUNT", f"a bundle has 1 to {limits.max_rules} rules")
    seen: set[str] = set()
    for index, rule in enumerate(spec.rules):
        if rule.id in seen or not _CODE.fullmatch(rule.id.upper()):
            # No usable id to name it by: its position, and the id as written.
            where = f"rules[{index}]"
            raise _bad(
                "RULE_ID_INVALID",
                f"{where}: rule id {rule.id[:64]!r} is invalid or repeated "
                "(ids are [A-Za-z][A-Za-z0-9_]{0,63}, unique in the bundle)",
                where,
            )
        seen.add(rule.id)
        where = rule_field(rule.id)
        if not _CODE.fullmatch(rule.reason_code):
            raise _bad(
                "RULE_REASON_CODE_INVALID",
                f"{where}: reason_code not UPPER_SNAKE",
                rule_field(rule.id, "reason_code"),
            )
        if (rule.outcome == "obligation") != (rule.obligation is not None):
            raise _bad(
                "RULE_OBLIGATION_INVALID",
                f"{where}: obligation iff outcome is obligation",
                rule_field(rule.id, "obligation"),
            )
    for index, route in enumerate(spec.routing):
        if route.method not in PAYMENT_METHODS:
            raise _bad("ROUTE_METHOD_INVALID", f"routing[{index}]: unknown method {route.method!r}")
        if route.rail and not _ROUTE_NAME.fullmatch(route.rail):
            raise _bad("ROUTE_RAIL_INVALID", f"routing[{index}]: rail is [a-z_], at most 32")
        if route.require and not route.rail:
            raise _bad("ROUTE_REQUIRE_INVALID", f"routing[{index}]: require is for rail routes")
        for need in route.require:
            if not _ROUTE_NAME.fullmatch(need.reason):
                raise _bad(
                    "ROUTE_REQUIRE_INVALID", f"routing[{index}]: reason is [a-z_], at most 32"
                )
    for tier in spec.kyc_tiers:
        for currency in tier.limits:
            if not currencies.is_known(currency):
                raise _bad("KYC_LIMIT_CURRENCY_UNKNOWN", f"kyc tier {tier.tier}: {currency!r}")
    _check_conversion(spec)
    tiers = {tier.tier for tier in spec.kyc_tiers}
    if spec.unknown_customer_tier is not None and spec.unknown_customer_tier not in tiers:
        raise _bad(
            "UNKNOWN_CUSTOMER_TIER_INVALID",
            f"unknown_customer_tier {spec.unknown_customer_tier} is not a tier of kyc_tiers",
            "unknown_customer_tier",
        )
    for key, value in spec.parameters.items():
        _check_parameter(value, f"parameters.{key}", limits)


def _rate(value: float | int | str, where: str) -> Decimal:
    try:
        rate = Decimal(str(value))
    except InvalidOperation as exc:
        raise _bad("LIMIT_RATE_INVALID", f"{where}: {value!r} is not a number", where) from exc
    if not rate.is_finite() or rate <= 0:
        raise _bad("LIMIT_RATE_INVALID", f"{where}: a rate is a positive number", where)
    return rate


def _check_conversion(spec: BundleSpec) -> None:
    conversion = spec.limit_conversion
    if conversion is None:
        return
    if not currencies.is_known(conversion.base):
        raise _bad(
            "KYC_LIMIT_CURRENCY_UNKNOWN",
            f"limit_conversion.base: {conversion.base!r}",
            "limit_conversion.base",
        )
    for tier in spec.kyc_tiers:
        if conversion.base not in tier.limits:
            raise _bad(
                "LIMIT_CONVERSION_BASE_MISSING",
                f"kyc tier {tier.tier} has no {conversion.base} limits to convert",
                "limit_conversion.base",
            )
    for currency, value in conversion.rates.items():
        where = f"limit_conversion.rates.{currency}"
        if not currencies.is_known(currency):
            raise _bad("KYC_LIMIT_CURRENCY_UNKNOWN", f"{where}: unknown currency", where)
        _rate(value, where)


def limit_table(spec: BundleSpec) -> dict[tuple[int, str], tuple[TierLimits, bool]]:
    """(tier, currency) -> (limits in that currency's minor units, converted):
    the tiers' own limits, and for every other currency with a reference rate
    the base currency's, converted and rounded down (a limit is never
    rounded up). Computed once, when the bundle loads."""
    table: dict[tuple[int, str], tuple[TierLimits, bool]] = {}
    conversion = spec.limit_conversion
    for tier in spec.kyc_tiers:
        for currency, own in tier.limits.items():
            table[(tier.tier, currency)] = (own, False)
        if conversion is None:
            continue
        base = tier.limits[conversion.base]
        base_exponent = currencies.EXPONENTS[conversion.base]
        for currency, value in conversion.rates.items():
            if (tier.tier, currency) in table:
                continue
            # Minor units of the base -> its major units -> the currency's
            # major units -> its minor units.
            factor = _rate(value, currency) * Decimal(10) ** (
                currencies.EXPONENTS[currency] - base_exponent
            )
            table[(tier.tier, currency)] = (
                TierLimits(
                    single_minor=_converted(base.single_minor, factor),
                    daily_minor=_converted(base.daily_minor, factor),
                    monthly_minor=_converted(base.monthly_minor, factor),
                ),
                True,
            )
    return table


def _converted(amount_minor: int, factor: Decimal) -> int:
    return min(int((Decimal(amount_minor) * factor).to_integral_value(ROUND_FLOOR)), _INT64_MAX)


# What a parameter may hold: the values CEL reads as int, double, string,
# bool, null, list and map. Anything else YAML can build (dates, sets,
# bytes) would only fail later, inside the interpreter.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _check_parameter(value: object, where: str, limits: BundleLimits) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise _bad("PARAMETER_INVALID", f"{where}: integer out of the 64-bit range", where)
        return
    if isinstance(value, str):
        if len(value) > limits.max_parameter_string_length:
            raise _bad(
                "PARAMETER_TOO_LARGE",
                f"{where}: string of {len(value)} characters, "
                f"over {limits.max_parameter_string_length}",
                where,
            )
        return
    if isinstance(value, list | dict):
        if len(value) > limits.max_parameter_items:
            raise _bad(
                "PARAMETER_TOO_LARGE",
                f"{where}: {len(value)} items, over {limits.max_parameter_items}",
                where,
            )
        if isinstance(value, list):
            for index, item in enumerate(value):
                _check_parameter(item, f"{where}[{index}]", limits)
            return
        for key, item in value.items():
            if not isinstance(key, str):
                raise _bad("PARAMETER_INVALID", f"{where}: map keys must be strings", where)
            _check_parameter(key, f"{where}.{key}", limits)
            _check_parameter(item, f"{where}.{key}", limits)
        return
    raise _bad(
        "PARAMETER_INVALID",
        f"{where}: a {type(value).__name__} is not a parameter "
        "(int, double, string, bool, null, list or map)",
        where,
    )


def resolve_lists(
    spec: BundleSpec,
    source: BundleSource,
    lists_dir: Path,
    bundle_dir: Path | None,
    limits: BundleLimits,
) -> BundleSource:
    """Fills in the sanctions files the bundle names but the source lacks."""
    sanctions, aliases = source.sanctions_csv, source.aliases_csv
    if spec.sanctions.list_file and not sanctions:
        sanctions = _read_list(spec.sanctions.list_file, lists_dir, bundle_dir, limits)
    if spec.sanctions.aliases_file and not aliases:
        aliases = _read_list(spec.sanctions.aliases_file, lists_dir, bundle_dir, limits)
    resolved = msgspec.structs.replace(source, sanctions_csv=sanctions, aliases_csv=aliases)
    check_size(resolved, limits)
    return resolved


def _read_list(name: str, lists_dir: Path, bundle_dir: Path | None, limits: BundleLimits) -> str:
    if not _LIST_NAME.fullmatch(name):
        raise _bad(
            "SANCTIONS_LIST_NAME_INVALID", f"sanctions list name {name!r} is not a file name"
        )
    for folder in [d for d in (bundle_dir, lists_dir, SHIPPED_LISTS_DIR) if d is not None]:
        path = folder / name
        if path.is_file():
            # Measured before it is read: a list file is not read whole only
            # to be refused.
            size = path.stat().st_size
            if size > limits.max_bundle_bytes:
                raise _bad(
                    "BUNDLE_TOO_LARGE",
                    f"sanctions list {name!r} is {size} bytes, over {limits.max_bundle_bytes}",
                )
            return path.read_text()
    raise _bad("SANCTIONS_LIST_NOT_FOUND", f"sanctions list {name!r} not found")


def content_hash(spec: BundleSpec, source: BundleSource, limits: BundleLimits) -> str:
    """sha256 over the normalised bundle (defaults filled in) and its lists."""
    normalised = msgspec.to_builtins(_effective_sanctions(spec, limits))
    # Keys added after bundles were first stored stay out while unset, so
    # a stored bundle's version is what it was.
    for key in ("limit_conversion", "unknown_customer_tier"):
        if normalised.get(key) is None:
            normalised.pop(key, None)
    # The matcher decides as much as the list does; the one bundles had
    # before it was named stays out, so their versions are what they were.
    if source.sanctions_matcher != MATCHER_TOKEN_SORT:
        normalised["sanctions"]["matcher"] = source.sanctions_matcher
    body = canonical_encoder.encode(
        {"bundle": normalised, "sanctions": source.sanctions_csv, "aliases": source.aliases_csv}
    )
    return hashlib.sha256(body).hexdigest()


def _effective_sanctions(spec: BundleSpec, limits: BundleLimits) -> BundleSpec:
    sanctions = msgspec.structs.replace(
        spec.sanctions,
        hit_threshold=spec.sanctions.hit_threshold or limits.default_hit_threshold,
        possible_match_threshold=spec.sanctions.possible_match_threshold
        or limits.default_possible_match_threshold,
    )
    return msgspec.structs.replace(spec, sanctions=sanctions)


def build_screener(spec: BundleSpec, source: BundleSource, limits: BundleLimits) -> Screener:
    effective = _effective_sanctions(spec, limits).sanctions
    assert effective.hit_threshold is not None
    assert effective.possible_match_threshold is not None
    if not 0 < effective.possible_match_threshold <= effective.hit_threshold <= 100:
        raise _bad("SANCTIONS_THRESHOLD_INVALID", "need 0 < possible_match <= hit <= 100")
    if source.sanctions_matcher not in MATCHERS:
        raise _bad(
            "SANCTIONS_MATCHER_UNKNOWN",
            f"sanctions matcher {source.sanctions_matcher!r} is not one of {', '.join(MATCHERS)}",
            "sanctions_matcher",
        )
    entries = parse_sdn_csv(
        source.sanctions_csv, limits.max_sanctions_entries, limits.max_sanctions_name_length
    )
    aliases = (
        parse_alt_csv(
            source.aliases_csv, limits.max_sanctions_entries, limits.max_sanctions_name_length
        )
        if source.aliases_csv
        else []
    )
    return Screener(
        entries,
        aliases,
        effective.hit_threshold,
        effective.possible_match_threshold,
        frozenset(c.upper() for c in effective.blocked_countries),
        source.sanctions_matcher,
    )


def compile_condition(
    source: str, where: str, schema: dict[str, Any], bounds: cel_check.ConditionBounds
) -> cel.Program:
    """Measures one CEL condition against its bounds, then parses it and
    checks its names against the schema."""
    over = cel_check.check_bounds(source, bounds)
    if over is not None:
        reason, message = over
        raise _bad(reason, f"{where}: {message}", where)
    try:
        program = cel.compile(source)
    except Exception as exc:  # the binding raises ValueError; be safe on others
        raise _bad("RULE_SYNTAX_ERROR", f"{where}: CEL does not parse: {exc}", where) from exc
    unknown = cel_check.unknown_roots(program.variables(), source, set(schema))
    if unknown:
        raise _bad("RULE_UNKNOWN_FIELD", f"{where}: unknown variable {unknown[0]!r}", where)
    bad_paths = cel_check.unknown_field_paths(source, schema)
    if bad_paths:
        raise _bad("RULE_UNKNOWN_FIELD", f"{where}: unknown field {bad_paths[0]!r}", where)
    return program


def schema_for(parameters: dict[str, Any]) -> dict[str, Any]:
    """The activation schema with `params` narrowed to the bundle's own keys."""
    params = {k: "map" if isinstance(v, dict) else "value" for k, v in parameters.items()}
    return {**cel_check.SCHEMA, "params": params}


def load_file(path: Path, label: str = "") -> BundleSource:
    return BundleSource(yaml_text=path.read_text(), label_override=label)


def shipped_default_path() -> Path:
    return SHIPPED_DIR / "default.yaml"
