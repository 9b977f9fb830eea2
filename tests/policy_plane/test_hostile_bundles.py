"""Hostile bundles: what an attacker (or a careless author) can put in a
bundle is refused with INVALID_ARGUMENT, a reason and the field, before it
costs anything, and the live bundle stays live, whether the bundle arrives by
LoadBundle or over the NATS KV watch.

The bounds come from the shipped config (policy.limits); the point of each
test is that the refusal happens early: the alias bomb is refused at its
first anchor (the rest of the document is never read), a condition that would
crash the CEL interpreter is refused before it is compiled, and so on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import grpc
import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_plane import bundle_sync, cel_check
from policy_plane.app import PolicyPlane
from policy_plane.bundle import SHIPPED_LISTS_DIR, BundleLimits, BundleSource
from policy_plane.bundles_registry import bundle_limits
from policy_plane.evaluation import CompiledBundle, compile_source
from triplane.policy.v1 import policy_pb2 as pb
from triplane.runtime.config import load_config
from triplane.runtime.errors import InvalidArgument
from triplane.runtime.status import parse_rpc_error

from .conftest import Stubs

LIMITS: BundleLimits = bundle_limits(load_config(environ={}).policy)
HEADER = "apiVersion: triplane.policy/v1\nlabel: hostile\n"
ONE_RULE = "rules: [{id: a, when: 'true', outcome: review, reason_code: A}]\n"

# A 1,000,000-node "billion laughs": each line repeats the one above ten
# times, by alias. About 400 bytes.
ALIAS_BOMB = (
    HEADER
    + "parameters:\n"
    + "  l0: &l0 [x,x,x,x,x,x,x,x,x,x]\n"
    + "".join(f"  l{n}: &l{n} [{','.join([f'*l{n - 1}'] * 10)}]\n" for n in range(1, 6))
    + ONE_RULE
)


def compile_text(text: str, limits: BundleLimits = LIMITS, **lists: str) -> CompiledBundle:
    return compile_source(BundleSource(yaml_text=text, **lists), limits, SHIPPED_LISTS_DIR)


def refusal(text: str, limits: BundleLimits = LIMITS, **lists: str) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        compile_text(text, limits, **lists)
    return caught.value


def rule(when: str) -> str:
    condition = msgspec.json.encode(when).decode()
    return HEADER + f"rules: [{{id: r1, when: {condition}, outcome: review, reason_code: R}}]\n"


# ------------------------------------------------------------------- YAML


def test_the_alias_bomb_is_refused_at_its_first_anchor() -> None:
    assert len(ALIAS_BOMB.encode()) < 450
    error = refusal(ALIAS_BOMB)
    assert (error.reason, error.field) == ("BUNDLE_YAML_ALIAS", "content")
    # Line 4 holds the first anchor: nothing after it was composed, let alone
    # expanded. A syntax error placed after the bomb is never even reached.
    assert "line 4:" in error.message
    broken_tail = refusal(ALIAS_BOMB + "rules: [unclosed\n")
    assert broken_tail.reason == "BUNDLE_YAML_ALIAS" and "line 4:" in broken_tail.message


@pytest.mark.parametrize(
    "text",
    [
        # A merge key needs an alias.
        HEADER + "base: &base {a: 1}\n" + ONE_RULE,
        HEADER + "parameters:\n  a: &a 1\n  b: *a\n" + ONE_RULE,
        # An anchor alone is refused too: it is only there to be aliased.
        HEADER + "parameters: &p {a: 1}\n" + ONE_RULE,
    ],
)
def test_anchors_and_aliases_are_refused(text: str) -> None:
    assert refusal(text).reason == "BUNDLE_YAML_ALIAS"


def test_deep_nesting_is_refused_without_recursing() -> None:
    depth = 50_000  # PyYAML's recursive composer would raise RecursionError
    text = HEADER + "parameters: {deep: " + "[" * depth + "]" * depth + "}\n" + ONE_RULE
    error = refusal(text)
    assert (error.reason, error.field) == ("BUNDLE_TOO_DEEP", "content")
    assert f"deeper than {LIMITS.max_bundle_depth}" in error.message


def test_a_bundle_over_max_bundle_bytes_is_refused_before_it_is_parsed() -> None:
    small = msgspec.structs.replace(LIMITS, max_bundle_bytes=2_000)
    # Unparseable on purpose: size is checked first.
    error = refusal("[" * 2_001, small)
    assert (error.reason, error.field) == ("BUNDLE_TOO_LARGE", "content")
    # The lists count too, whether carried or named (read from a file).
    text = HEADER + ONE_RULE
    assert refusal(text, small, sanctions_csv="x" * 2_000).reason == "BUNDLE_TOO_LARGE"


def test_a_sanctions_list_file_over_the_bound_is_refused(tmp_path: Path) -> None:
    (tmp_path / "big.csv").write_text('1,"A NAME","individual","P"\n' * 200)
    text = HEADER + "sanctions: {list: big.csv}\n" + ONE_RULE
    small = msgspec.structs.replace(LIMITS, max_bundle_bytes=2_000)
    with pytest.raises(InvalidArgument) as caught:
        compile_source(BundleSource(yaml_text=text), small, tmp_path)
    assert caught.value.reason == "BUNDLE_TOO_LARGE" and "big.csv" in caught.value.message


@pytest.mark.parametrize(
    "value",
    [
        "9" * 5_000,  # over Python's int digit limit: ValueError inside PyYAML
        "2026-02-31",  # a date that does not exist
    ],
)
def test_scalars_yaml_cannot_build_are_a_syntax_error(value: str) -> None:
    error = refusal(HEADER + f"parameters: {{v: {value}}}\n" + ONE_RULE)
    assert (error.reason, error.field) == ("BUNDLE_SYNTAX_ERROR", "content")


# ------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("value", "reason", "field"),
    [
        ("[" + ", ".join(["1"] * 1_001) + "]", "PARAMETER_TOO_LARGE", "parameters.v"),
        (
            "{" + ", ".join(f"k{i}: 1" for i in range(1_001)) + "}",
            "PARAMETER_TOO_LARGE",
            "parameters.v",
        ),
        ("'" + "x" * 4_097 + "'", "PARAMETER_TOO_LARGE", "parameters.v"),
        ("[1, ['" + "x" * 4_097 + "']]", "PARAMETER_TOO_LARGE", "parameters.v[1][0]"),
        ("99999999999999999999", "PARAMETER_INVALID", "parameters.v"),
        ("2026-01-01", "PARAMETER_INVALID", "parameters.v"),
        ("!!binary aGVsbG8=", "PARAMETER_INVALID", "parameters.v"),
        ("!!set {a, b}", "PARAMETER_INVALID", "parameters.v"),
        ("{1: a}", "PARAMETER_INVALID", "parameters.v"),
    ],
)
def test_parameters_are_bounded_and_typed(value: str, reason: str, field: str) -> None:
    error = refusal(HEADER + f"parameters:\n  v: {value}\n" + ONE_RULE)
    assert (error.reason, error.field) == (reason, field), error.message


def test_parameters_at_their_bounds_load() -> None:
    items = ", ".join(["1"] * LIMITS.max_parameter_items)
    text = HEADER + f"parameters:\n  v: [{items}]\n  s: '{'x' * 4_096}'\n" + ONE_RULE
    assert compile_text(text).spec.parameters["s"] == "x" * 4_096


# ---------------------------------------------------------- CEL conditions


@pytest.mark.parametrize(
    ("when", "reason"),
    [
        # About 15,000 levels crash the interpreter (a segmentation fault,
        # measured): refused before it is compiled, let alone probed.
        ("1" + " + 1" * 20_000 + " > 0", "RULE_CONDITION_TOO_LONG"),
        ("1" + "+1" * 600 + " > 0", "RULE_CONDITION_TOO_COMPLEX"),
        ("(" * 40 + "true" + ")" * 40, "RULE_CONDITION_TOO_DEEP"),
        (
            "params.l.all(x, params.l.all(y, x + y >= 0))",
            "RULE_CONDITION_TOO_COSTLY",
        ),
        ("[1, 2].exists(x, [3].map(y, y).size() > x)", "RULE_CONDITION_TOO_COSTLY"),
    ],
)
def test_oversized_conditions_are_refused_naming_the_rule(when: str, reason: str) -> None:
    text = rule(when).replace("rules:", "parameters: {l: [1, 2]}\nrules:", 1)
    error = refusal(text)
    assert (error.reason, error.field) == (reason, "rules[r1].when"), error.message


def test_a_route_condition_is_bounded_too() -> None:
    text = HEADER + ONE_RULE + "routing: [{method: card, when: '" + "!" * 5_000 + "true'}]\n"
    error = refusal(text)
    assert (error.reason, error.field) == ("RULE_CONDITION_TOO_LONG", "routing[0].when")


def test_one_level_of_comprehension_and_conditions_at_the_bounds_load() -> None:
    text = rule("params.l.exists(x, x == 2) && [1, 2].map(x, x).size() == 2").replace(
        "rules:", "parameters: {l: [1, 2]}\nrules:", 1
    )
    compiled = compile_text(text)
    assert [r.spec.id for r in compiled.rules] == ["r1"]
    # Just under every bound: a long chain of tokens within max_condition_nodes.
    chain = "true" + " && true" * ((LIMITS.condition.max_nodes - 1) // 2)
    assert cel_check.measure(chain).nodes <= LIMITS.condition.max_nodes
    compile_text(rule(chain))


def test_measure_ignores_brackets_and_macros_inside_strings() -> None:
    shape = cel_check.measure("request.kind == '((([[[ .all( .map(' && x.all(y, y)")
    assert shape.nesting == 1 and shape.comprehension_nesting == 1


# -------------------------------------------------------- sanctions lists


def test_sanctions_lists_are_bounded_in_entries_and_name_length() -> None:
    text = HEADER + ONE_RULE
    small = msgspec.structs.replace(LIMITS, max_sanctions_entries=3)
    rows = "".join(f'{i},"NAME {i}","individual","P"\n' for i in range(4))
    error = refusal(text, small, sanctions_csv=rows)
    assert (error.reason, error.field) == ("SANCTIONS_LIST_TOO_LARGE", "sanctions_list_csv")
    aliases = "".join(f'1,{i},"aka","ALIAS {i}","-0-"\n' for i in range(4))
    error = refusal(text, small, sanctions_csv=rows.splitlines()[0] + "\n", aliases_csv=aliases)
    assert (error.reason, error.field) == ("SANCTIONS_LIST_TOO_LARGE", "sanctions_aliases_csv")
    long_name = "X" * (LIMITS.max_sanctions_name_length + 1)
    error = refusal(text, sanctions_csv=f'1,"{long_name}","individual","P"\n')
    assert (error.reason, error.field) == ("SANCTIONS_NAME_TOO_LONG", "sanctions_list_csv")
    error = refusal(
        text, sanctions_csv='1,"A","individual","P"\n', aliases_csv=f'1,2,"aka","{long_name}"\n'
    )
    assert (error.reason, error.field) == ("SANCTIONS_NAME_TOO_LONG", "sanctions_aliases_csv")


# ------------------------------------------------- anything: only refusals


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_any_text_as_a_bundle_loads_or_is_an_invalid_argument(text: str) -> None:
    with contextlib.suppress(InvalidArgument):
        compile_text(text)


_CEL_PIECES = st.sampled_from(
    [
        "request.amount_minor",
        "params.l",
        "snapshot.features",
        "x",
        "1",
        "2.5",
        "'s'",
        "true",
        "(",
        ")",
        "[",
        "]",
        "{",
        "}",
        ",",
        ":",
        ".",
        "?",
        "+",
        "-",
        "*",
        "/",
        "%",
        "!",
        "&&",
        "||",
        "==",
        "<",
        " in ",
        ".all(x, ",
        ".exists(x, ",
        ".map(x, ",
        ".filter(x, ",
        "size(",
        "has(",
        "'\\u",
        '"',
        "//",
        "\n",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_CEL_PIECES, max_size=60).map("".join))
def test_any_condition_loads_or_is_an_invalid_argument(when: str) -> None:
    text = rule(when).replace("rules:", "parameters: {l: [1, 2]}\nrules:", 1)
    try:
        compile_text(text)
    except InvalidArgument as error:
        assert error.field in ("rules[r1].when", "content"), error


# ---------------------------------------- through the server, and over NATS KV


async def test_load_bundle_refuses_the_bomb_and_the_live_bundle_stays(stubs: Stubs) -> None:
    before = await stubs.bundles.GetActiveBundle(pb.GetActiveBundleRequest())
    hostile = [
        (ALIAS_BOMB, "BUNDLE_YAML_ALIAS", "content"),
        (rule("1" + " + 1" * 20_000 + " > 0"), "RULE_CONDITION_TOO_LONG", "rules[r1].when"),
        (rule("1" + "+1" * 600 + " > 0"), "RULE_CONDITION_TOO_COMPLEX", "rules[r1].when"),
    ]
    for content, reason, field in hostile:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stubs.bundles.LoadBundle(
                pb.LoadBundleRequest(content=content, target=pb.BUNDLE_TARGET_LIVE)
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert parse_rpc_error(caught.value) == (reason, field)
    after = await stubs.bundles.GetActiveBundle(pb.GetActiveBundleRequest())
    assert after.live == before.live
    listed = await stubs.bundles.ListBundles(pb.ListBundlesRequest(page_size=10))
    assert [b.version for b in listed.bundles] == [before.live.version]


async def test_hostile_bundles_over_nats_kv_are_refused_and_the_watch_goes_on(
    plane: PolicyPlane, caplog: pytest.LogCaptureFixture
) -> None:
    assert plane.js is not None and plane.engine.bundles.live is not None
    bundles = plane.config.policy.bundles
    max_bytes = plane.config.policy.limits.max_bundle_bytes
    live_before = plane.engine.bundles.live.version
    kv = await bundle_sync.bucket(plane.js, bundles.kv_bucket, max_bytes)
    good = HEADER.replace("hostile", "after-the-storm") + ONE_RULE
    with caplog.at_level(logging.ERROR, logger=bundle_sync.log.name):
        await kv.put(bundles.kv_key, msgspec.json.encode(BundleSource(yaml_text=ALIAS_BOMB)))
        crasher = BundleSource(yaml_text=rule("1" + " + 1" * 20_000 + " > 0"))
        await kv.put(bundles.kv_key, msgspec.json.encode(crasher))
        await kv.put(bundles.kv_key, b"{not json")
        # Values apply in order: once the good one is live, all were seen.
        await kv.put(bundles.kv_key, msgspec.json.encode(BundleSource(yaml_text=good)))
        for _ in range(200):
            if plane.engine.bundles.live.label == "after-the-storm":
                break
            await asyncio.sleep(0.05)
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 3, refusals
    assert "BUNDLE_YAML_ALIAS" in refusals[0] and "RULE_CONDITION_TOO_LONG" in refusals[1]
    assert "BUNDLE_UNREADABLE" in refusals[2]
    assert plane.engine.bundles.live.label == "after-the-storm", live_before
    # The bucket itself is bounded: each value, and the whole of it.
    info = await plane.js.stream_info(f"KV_{bundles.kv_bucket}")
    value_bytes = bundle_sync.max_value_bytes_of(max_bytes)
    assert info.config.max_msg_size == value_bytes
    assert info.config.max_bytes == 2 * bundle_sync.HISTORY * value_bytes


def test_the_bomb_is_the_size_the_issue_describes() -> None:
    """Without the refusal, the bomb is a million nodes: PyYAML's own safe
    loader builds them (shared, by reference), and walking them is what the
    schema check would have done."""
    loaded = yaml.safe_load(ALIAS_BOMB)

    def count(value: object) -> int:
        if isinstance(value, list):
            return sum(count(item) for item in value)
        return 1

    assert count(loaded["parameters"]["l5"]) == 1_000_000
