"""Sanctions screening as a compliance officer expects it: every variant of a
listed name in the corpus (orders, particles, scripts, spellings) is a hit or
a possible match of its entry, and no common name is either; through the
real server, the three names a new user once got allowed are stopped; and a
bundle stored before matchers had names keeps deciding as it did."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from policy_plane.bundle import SHIPPED_LISTS_DIR, BundleSource, shipped_default_path
from policy_plane.bundles_registry import BundleRegistry, bundle_limits
from policy_plane.evaluation import CompiledBundle, compile_source
from policy_plane.sanctions import (
    MATCHER_NAME_PARTS,
    MATCHER_TOKEN_SORT,
    Screener,
    name_parts,
    parse_alt_csv,
    parse_sdn_csv,
)
from policy_plane.sanctions_lists.screening_corpus import COMMON_NAMES, VARIANTS
from policy_plane.store import open_store
from triplane.policy.v1 import policy_pb2 as pb
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import load_config

from .conftest import START_US, Stubs, payment_input
from .test_grpc import request

HIT, POSSIBLE = 92.0, 80.0


@pytest.fixture(scope="module")
def screener() -> Screener:
    entries = parse_sdn_csv((SHIPPED_LISTS_DIR / "sdn_sample.csv").read_text(), 1000, 512)
    aliases = parse_alt_csv((SHIPPED_LISTS_DIR / "alt_sample.csv").read_text(), 1000, 512)
    return Screener(entries, aliases, HIT, POSSIBLE, frozenset())


@pytest.fixture(scope="module")
def default() -> CompiledBundle:
    limits = bundle_limits(load_config(environ={}).policy)
    return compile_source(
        BundleSource(yaml_text=shipped_default_path().read_text()), limits, SHIPPED_LISTS_DIR
    )


def test_the_corpus_is_large_enough() -> None:
    assert len(VARIANTS) >= 30 and len(COMMON_NAMES) >= 30
    assert len({name for name, _, _ in VARIANTS}) == len(VARIANTS)
    assert not {name for name, _, _ in VARIANTS} & set(COMMON_NAMES)


@pytest.mark.parametrize(("name", "entry_id", "tries"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_every_variant_of_a_listed_name_is_caught(
    screener: Screener, name: str, entry_id: str, tries: str
) -> None:
    score, entry = screener.match(name)
    assert score >= POSSIBLE, (tries, score)
    assert entry is not None and entry.entry_id == entry_id, (tries, entry)


@pytest.mark.parametrize("name", COMMON_NAMES)
def test_no_common_name_is_a_match(screener: Screener, name: str) -> None:
    score, _ = screener.match(name)
    assert score < POSSIBLE, score


def test_a_given_name_or_a_family_name_alone_is_held_below_a_match(screener: Screener) -> None:
    # Two of the listed three parts, but not the family name: a common name.
    assert screener.match("Karim Hassan")[0] < POSSIBLE
    # The family name with another given name.
    assert screener.match("Sergei Volkov")[0] < POSSIBLE
    # A Chinese given name is one name in two syllables: one of them is not it.
    assert screener.match("Zhao Ming")[0] < POSSIBLE
    assert screener.match("Zhao Weiming")[0] >= HIT


def test_names_are_cut_into_parts_the_way_they_are_read() -> None:
    def texts(name: str) -> list[str]:
        return [p.text for p in name_parts(name)[0]]

    # Particles join what follows, whichever way they were written.
    assert texts("Al-Rashid") == texts("Al Rashid") == texts("Alrashid") == ["alrashid"]
    # Titles go; Chinese characters are one syllable each.
    assert texts("Dr. Karim Hassan Jr") == ["karim", "hassan"]
    assert texts("赵伟明") == ["zhao", "wei", "ming"]
    # The family name of a listed individual is what comes before the comma.
    assert name_parts("MENDOZA QUINTERO, Jorge Luis")[1] == 2


@pytest.mark.parametrize(
    ("name", "outcome", "reason"),
    [
        ("Zhao Weiming", "deny", "SANCTIONS_HIT"),
        ("Дмитрий Волков", "deny", "SANCTIONS_HIT"),
        ("Hassan Karim Al-Rashid", "deny", "SANCTIONS_HIT"),
        ("كريم حسن الرشيد", "review", "SANCTIONS_POSSIBLE_MATCH"),
        ("Jorge Mendoza", "review", "SANCTIONS_POSSIBLE_MATCH"),
        ("Zhao Ming", "allow", None),
    ],
)
def test_the_default_bundle_acts_on_the_screening(
    default: CompiledBundle, name: str, outcome: str, reason: str | None
) -> None:
    verdict = default.evaluate(payment_input(customer=name))
    assert verdict.outcome == outcome, (verdict.screening, verdict.fired)
    if reason:
        assert reason in verdict.reason_codes


async def test_what_a_new_user_tried_is_stopped_at_the_server(stubs: Stubs) -> None:
    """The three names once allowed against the shipped list, through Evaluate."""
    for index, (name, expected_entry) in enumerate(
        [
            ("Weiming Zhao", "90008"),  # the given name first, as one word
            ("Олена Петренко", "90005"),  # a Cyrillic spelling
            ("Hassan Karim Al-Rashid", "90003"),  # a reordered three-part name
        ]
    ):
        evaluate = request(f"k-new-user-{index}")
        evaluate.payment.counterparty.name = name
        decision = (await stubs.policy.Evaluate(evaluate)).decision
        assert decision.outcome == pb.OUTCOME_DENY, decision
        assert decision.sanctions.hit and decision.sanctions.matched_entry_id == expected_entry
        assert "SANCTIONS_HIT" in [r.reason_code for r in decision.fired_rules]


def test_a_bundle_stored_before_matchers_had_names_decides_as_it_did(tmp_path: Path) -> None:
    """Its stored source has no matcher: it keeps token_sort and its version."""
    config = load_config(
        environ={}, overrides={"runtime": {"state_dir": str(tmp_path)}, "nats": {"url": ""}}
    )
    store = open_store("sqlite", str(tmp_path / "policy.db"), "")
    registry = BundleRegistry(store, config.policy, ManualClock(START_US))
    legacy = msgspec.structs.replace(
        BundleSource(yaml_text=shipped_default_path().read_text()),
        sanctions_matcher=MATCHER_TOKEN_SORT,
    )
    compiled = registry.compile(legacy)
    stored = msgspec.to_builtins(compiled.source)
    del stored["sanctions_matcher"]  # as an earlier release wrote it
    store.put_bundle(
        compiled.version,
        compiled.label,
        compiled.content_hash,
        msgspec.json.encode(stored).decode(),
        len(compiled.rules),
        compiled.screener.entry_count,
        START_US,
    )
    resolved = registry.resolve(compiled.version)
    assert resolved.screener.matcher == MATCHER_TOKEN_SORT
    assert resolved.version == compiled.version
    # A family-name-first spelling the old matcher let through, still let through.
    assert not resolved.screener.screen(payment_input(customer="Weiming Zhao").payment, "").hit
    # The same YAML loaded now gets the new matcher, and so another version.
    fresh = registry.compile(BundleSource(yaml_text=shipped_default_path().read_text()))
    assert fresh.screener.matcher == MATCHER_NAME_PARTS
    assert fresh.version != compiled.version
    store.db.close()


def test_an_unknown_matcher_is_refused() -> None:
    limits = bundle_limits(load_config(environ={}).policy)
    source = BundleSource(yaml_text=shipped_default_path().read_text(), sanctions_matcher="soundex")
    with pytest.raises(Exception) as caught:
        compile_source(source, limits, SHIPPED_LISTS_DIR)
    assert getattr(caught.value, "reason", "") == "SANCTIONS_MATCHER_UNKNOWN"
