"""Load-time checks of CEL conditions against the decision schema.

The CEL interpreter we use (cel-interpreter via `common-expression-language`)
parses at compile time but checks names and types only while evaluating. A bad
rule must be refused when its bundle loads, not fail on live traffic, so we add
two checks: a static walk of every dotted field path against the schema below
(unknown variables and fields), and a probe evaluation against sample inputs
that must give a bool (type errors, non-boolean conditions).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Field schema of the CEL activation (see evaluation.build_activation). A
# string is a leaf type; "map" is an open map whose keys are data, not fields.
_COUNTERS = (
    "count_1h",
    "count_24h",
    "count_30d",
    "amount_minor_1h",
    "amount_minor_24h",
    "amount_minor_30d",
)
# Each counter, and under `known` whether it could be had: an unknown counter
# reads 0 above, and a rule that must not pass on a zero it cannot trust
# checks `known` (the default bundle's velocity_unknown does).
_VELOCITY: dict[str, Any] = {
    **{name: "int" for name in _COUNTERS},
    "known": {name: "bool" for name in _COUNTERS},
}
_PARTY = {"name": "string", "country": "string"}
SCHEMA: dict[str, Any] = {
    "request": {
        "tenant_id": "string",
        "account_id": "string",
        "kind": "string",
        "amount_minor": "int",
        "currency": "string",
        "payment_method": "string",
        "merchant_id": "string",
        "merchant_category": "string",
        "device_id": "string",
        "customer": _PARTY,
        "counterparty": _PARTY,
        # What the decision token binds besides: the payee, the money movement
        # (authorize, transfer, payout, capture, refund), the split legs (a
        # list of {account_id, amount_minor, basis_points, label}), the hold
        # captured, and for a refund the payment refunded as the ledger holds it.
        "credit_account_id": "string",
        "movement": "string",
        "splits": "list",
        "hold_id": "string",
        "refund": {
            "entry_id": "string",
            "original_account_id": "string",
            "captured_minor": "int",
            "refunded_minor": "int",
            "refund_count": "int",
        },
        # A reconciliation adjustment (movement "adjustment"): what the
        # operator asked of which break, and why; all empty for any other.
        "adjustment": {
            "resolution": "string",
            "break_id": "string",
            "requested_by": "string",
            "reason": "string",
            "reverses_entry_id": "string",
        },
    },
    "snapshot": {
        # From the customer's profile; known is false for a customer without one.
        "kyc": {"tier": "int", "country": "string", "pep": "bool", "known": "bool"},
        "score": {
            "model": "string",
            "version": "string",
            "source": "string",
            "value": "double",
            "present": "bool",
            "fallback": "bool",
        },
        "velocity": {"account": _VELOCITY, "device": _VELOCITY, "merchant": _VELOCITY},
        "account_age_days": "int",
        "features": "map",
        "decided_at_us": "int",
        # Payouts: each configured rail's offer (a list of RAIL below).
        "rails": "list",
    },
    "limits": {
        "known": "bool",
        # Converted from the bundle's base currency at its reference rate
        # (limit_conversion), not written for this currency.
        "converted": "bool",
        "tier": "int",
        "single_minor": "int",
        "daily_minor": "int",
        "monthly_minor": "int",
    },
    "sanctions": {
        "hit": "bool",
        "possible_match": "bool",
        "best_score": "double",
        "country_blocked": "bool",
    },
    "params": "map",
}

# The `rail` a rail route's requirements read: one rail's offer to the
# payment (policy_plane.model.RailFacts).
RAIL: dict[str, Any] = {
    "rail": "string",
    "method": "string",
    "reachable": "bool",
    "unreachable_because": "string",
    "max_amount_minor": "int",
    "window_open": "bool",
    "cutoff_at_us": "int",
    "cost_minor": "int",
}

_STRING_LITERAL = re.compile(
    r"'''.*?'''|\"\"\".*?\"\"\"|'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"", re.S
)
_PATH = re.compile(r"(?<![\w.])([A-Za-z_]\w*)((?:\s*\.\s*[A-Za-z_]\w*)+)(\s*\()?")
_MACRO_VAR = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")


def macro_bound_names(source: str) -> set[str]:
    return set(_MACRO_VAR.findall(_STRING_LITERAL.sub("''", source)))


def unknown_roots(variables: list[str], source: str, roots: set[str]) -> list[str]:
    """Top-level identifiers that are neither schema roots nor macro variables."""
    bound = macro_bound_names(source)
    return [name for name in variables if name not in roots and name not in bound]


def unknown_field_paths(source: str, schema: dict[str, Any]) -> list[str]:
    """Dotted paths that do not exist in `schema` (method calls are skipped)."""
    text = _STRING_LITERAL.sub("''", source)
    bad: list[str] = []
    for match in _PATH.finditer(text):
        root = match.group(1)
        if root not in schema:
            continue
        segments = [s.strip() for s in match.group(2).split(".") if s.strip()]
        if match.group(3):
            segments = segments[:-1]  # the last segment is a method call
        node: Any = schema[root]
        walked = root
        for segment in segments:
            if node == "map":
                break
            walked = f"{walked}.{segment}"
            if not isinstance(node, dict) or segment not in node:
                bad.append(walked)
                break
            node = node[segment]
    return bad


# ----------------------------------------------------------------- flattening
# The interpreter pays for every `.field` step on a nested map (a member
# access copies the map it reads from), and for every nested map it converts
# into a context. Conditions are therefore rewritten once, at load, to read
# flat variables: `snapshot.velocity.device.count_24h` becomes the variable
# `__tp_snapshot__velocity__device__count_24h`, bound to the same value. A path
# whose end is an intermediate map (`snapshot.kyc` used whole) or the argument
# of has() keeps its nested form, and the evaluator then also binds the nested
# root. The bundle's load-time probe checks every rewritten condition against
# the one as written (evaluation.CompiledBundle).
FLAT_PREFIX = "__tp_"
_HAS_OPEN = re.compile(r"(?<![\w.])has\s*\(\s*$")


def flat_name(path: tuple[str, ...]) -> str:
    return FLAT_PREFIX + "__".join(path)


def _mask_literals(source: str) -> str:
    """The source with string literals blanked, same length and positions."""

    def blank(match: re.Match[str]) -> str:
        text = match.group(0)
        return text[0] + " " * (len(text) - 2) + text[-1]

    return _STRING_LITERAL.sub(blank, source)


def flatten_paths(source: str, schema: dict[str, Any]) -> tuple[str, frozenset[tuple[str, ...]]]:
    """`source` with schema paths read from flat variables, and those paths."""
    text = _mask_literals(source)
    bound = macro_bound_names(source)
    if any(name.startswith(FLAT_PREFIX) for name in bound):
        return source, frozenset()
    pieces: list[str] = []
    paths: set[tuple[str, ...]] = set()
    last = 0
    for match in _PATH.finditer(text):
        root = match.group(1)
        if root not in schema or root in bound:
            continue
        segments = [s.strip() for s in match.group(2).split(".") if s.strip()]
        walk = segments[:-1] if match.group(3) else segments
        node: Any = schema[root]
        path = [root]
        while len(path) - 1 < len(walk) and isinstance(node, dict) and walk[len(path) - 1] in node:
            node = node[walk[len(path) - 1]]
            path.append(walk[len(path) - 1])
        consumed = len(path) - 1
        if isinstance(node, dict) or consumed == 0:
            continue  # an intermediate map, or nothing known: stays nested
        if consumed == len(segments) and _HAS_OPEN.search(text, 0, match.start()):
            continue  # has() needs a field selection
        flat = flat_name(tuple(path))
        pieces.append(source[last : match.start(1)])
        pieces.append(flat + "".join(f".{s}" for s in segments[consumed:]))
        last = match.end(2)
        paths.add(tuple(path))
    pieces.append(source[last:])
    return "".join(pieces), frozenset(paths)


# ----------------------------------------------------------------- size bounds
# The interpreter offers no cost limit, and it is not safe with input of any
# size: its evaluator recurses once per level of the syntax tree, and a chain
# of about 15,000 `+` (well inside a 1 MB bundle) overflows the native stack
# and kills the process (measured: a segmentation fault, not an exception).
# Its parser stops nested parentheses at about 100 levels, with a message
# that is a line of dots. So a condition is measured before it is compiled:
# its length, its tokens (an upper bound on the syntax tree's nodes, and so on
# its depth), how deeply its brackets nest, and how deeply its comprehension
# macros nest. Nested comprehensions multiply their ranges (two over a
# thousand-item list are a million steps, and hold a million intermediate
# values), so by default none may sit inside another: with every list and map
# a condition can reach bounded (the bundle's parameters at load, the
# request's fields by the plane's limits), one evaluation then costs at most
# about tokens x items.
COMPREHENSION_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
_TOKEN = re.compile(
    r"\s+|//[^\n]*"  # white space and comments: skipped
    r"|(?:[rRbB]{1,2})?(?:'''.*?'''|\"\"\".*?\"\"\"|'(?:\\.|[^'\\\n])*'|\"(?:\\.|[^\"\\\n])*\")"
    r"|0[xX][0-9a-fA-F]+[uU]?|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?[uU]?|\.\d+(?:[eE][+-]?\d+)?"
    r"|[A-Za-z_]\w*"
    r"|&&|\|\||==|!=|<=|>=|\?\.|.",
    re.S,
)
_OPENERS = {"(": ")", "[": "]", "{": "}"}


@dataclass(frozen=True, slots=True)
class ConditionBounds:
    """What one CEL condition may measure (policy.limits.max_condition_*)."""

    max_chars: int
    max_nodes: int
    max_nesting: int
    max_comprehension_nesting: int


@dataclass(frozen=True, slots=True)
class ConditionShape:
    nodes: int
    nesting: int
    comprehension_nesting: int


def measure(source: str) -> ConditionShape:
    """Tokens, bracket nesting and comprehension nesting of a condition,
    without parsing it (so a hostile one costs one linear scan)."""
    nodes = nesting = comprehension_nesting = 0
    # One entry per open bracket: whether it opened a comprehension macro.
    stack: list[bool] = []
    open_macros = 0
    previous: list[str] = ["", ""]
    for match in _TOKEN.finditer(source):
        token = match.group(0)
        if token.isspace() or token.startswith("//"):
            continue
        nodes += 1
        if token in _OPENERS:
            is_macro = token == "(" and previous[1] in COMPREHENSION_MACROS and previous[0] == "."
            stack.append(is_macro)
            open_macros += is_macro
            nesting = max(nesting, len(stack))
            comprehension_nesting = max(comprehension_nesting, open_macros)
        elif token in (")", "]", "}") and stack:
            open_macros -= stack.pop()
        previous = [previous[1], token]
    return ConditionShape(nodes, nesting, comprehension_nesting)


def check_bounds(source: str, bounds: ConditionBounds) -> tuple[str, str] | None:
    """(reason, message) when the condition is over a bound, else None."""
    if len(source) > bounds.max_chars:
        return (
            "RULE_CONDITION_TOO_LONG",
            f"the condition has {len(source)} characters, over {bounds.max_chars}",
        )
    shape = measure(source)
    if shape.nodes > bounds.max_nodes:
        return (
            "RULE_CONDITION_TOO_COMPLEX",
            f"the condition has {shape.nodes} tokens, over {bounds.max_nodes}",
        )
    if shape.nesting > bounds.max_nesting:
        return (
            "RULE_CONDITION_TOO_DEEP",
            f"the condition nests brackets {shape.nesting} deep, over {bounds.max_nesting}",
        )
    if shape.comprehension_nesting > bounds.max_comprehension_nesting:
        return (
            "RULE_CONDITION_TOO_COSTLY",
            f"the condition nests comprehensions (all, exists, exists_one, map, filter) "
            f"{shape.comprehension_nesting} deep, over {bounds.max_comprehension_nesting}",
        )
    return None
