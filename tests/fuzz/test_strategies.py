"""The fuzz suite's own parts, without servers: the descriptor walker draws
what it promises (missing fields, boundary numbers, NaN, unknown enums, empty,
huge and odd strings, maps, repeated fields past a limit, nested messages),
every request it draws serializes, pooled values come from what servers
answered, the state probe sees any committed change, and the figures name
the totals and each plane."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

from tests.fuzz.harness import Tally
from tests.fuzz.state import FileState, StateProbe, differences
from tests.fuzz.strategies import (
    INT64_MAX,
    INT64_MIN,
    Hints,
    Pooled,
    SpecStrategies,
    build,
    harvest,
    pooled,
    resolve,
    spec_bytes,
)
from tests.fuzz.targets import cases_of, targets
from triplane.ai.v1 import ai_pb2
from triplane.gateway.v1 import gateway_pb2
from triplane.money.v1 import money_pb2
from triplane.policy.v1 import policy_pb2

# Generation only: a found example is not shrunk (shrinking a request with a
# 65,537-character string or 1,001 repeated items took over a minute a find).
# The strategies draw huge values on purpose; Hypothesis warns when it writes
# the repr of one it found.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

FIND = settings(
    max_examples=5000,
    database=None,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def _find(message: Any, condition: Any, strategies: SpecStrategies | None = None) -> dict[str, Any]:
    strategy = (strategies or SpecStrategies()).for_message(message.DESCRIPTOR)
    found: dict[str, Any] = find(strategy, condition, settings=FIND)
    return found


def test_fields_may_be_missing() -> None:
    assert _find(money_pb2.CreateTransferRequest, lambda spec: not spec) == {}


def test_boundary_numbers_and_non_finite_doubles() -> None:
    _find(
        money_pb2.CreateTransferRequest,
        lambda s: s.get("transfer", {}).get("amount", {}).get("amount_minor") == INT64_MIN,
    )
    _find(
        money_pb2.CreateTransferRequest,
        lambda s: s.get("transfer", {}).get("amount", {}).get("amount_minor") == INT64_MAX,
    )
    _find(ai_pb2.ReportOutcomeRequest, lambda s: math.isnan(s.get("reward", 0.0)))
    _find(ai_pb2.ReportOutcomeRequest, lambda s: s.get("reward") == -math.inf)


def test_unknown_enum_numbers() -> None:
    declared = {v.number for v in policy_pb2.BundleTarget.DESCRIPTOR.values}
    _find(policy_pb2.LoadBundleRequest, lambda s: "target" in s and s["target"] not in declared)


def test_empty_huge_and_odd_strings() -> None:
    _find(money_pb2.GetAccountRequest, lambda s: s.get("tenant_id") == "")
    _find(money_pb2.GetAccountRequest, lambda s: len(s.get("account_id", "")) > 4096)
    _find(money_pb2.GetAccountRequest, lambda s: "\x00" in s.get("account_id", ""))


def test_maps_repeated_fields_past_a_limit_and_nesting() -> None:
    _find(gateway_pb2.AuthorizePaymentRequest, lambda s: len(s.get("attributes", {})) >= 2)
    _find(money_pb2.CreateTransfersRequest, lambda s: len(s.get("transfers", [])) > 1000)
    _find(
        gateway_pb2.AuthorizePaymentRequest,
        lambda s: "customer" in s and "name" in s["customer"],
    )


def test_tame_requests_set_every_field_with_declared_enums() -> None:
    tame = SpecStrategies(tame=True)
    spec = _find(money_pb2.NewAccount, lambda s: True, tame)
    assert set(spec) == {f.name for f in money_pb2.NewAccount.DESCRIPTOR.fields}
    assert spec["kind"] != 0 and spec["kind"] in {
        v.number for v in money_pb2.AccountKind.DESCRIPTOR.values
    }


def test_hints_by_field_name_and_type() -> None:
    hints = Hints({"tenant_id": st.just("seeded")}, {"amount_minor": st.just(2500)})
    strategies = SpecStrategies(hints, tame=True)
    spec = _find(gateway_pb2.AuthorizePaymentRequest, lambda s: True, strategies)
    assert spec["tenant_id"] == "seeded" and spec["amount"]["amount_minor"] == 2500


@pytest.mark.parametrize("target", targets(), ids=lambda t: t.test_id)
def test_every_request_drawn_serializes_and_parses_back(target: Any) -> None:
    @settings(FIND, max_examples=25)
    @given(SpecStrategies().for_message(target.input_type))
    def check(spec: dict[str, Any]) -> None:
        message = build(target.input_type, spec, {"account_id": ["a1"]})
        again = type(message).FromString(message.SerializeToString())
        # Deterministic: a map's entries are otherwise written in any order.
        wire = message.SerializeToString(deterministic=True)
        assert again.SerializeToString(deterministic=True) == wire

    check()


def test_pooled_values_come_from_what_servers_answered() -> None:
    pools: dict[str, list[str]] = {}
    harvest(
        policy_pb2.ListCasesResponse(
            cases=[policy_pb2.Case(case_id="c1"), policy_pb2.Case(case_id="c2")]
        ),
        lambda name: name.endswith("_id"),
        pools,
        bound=1,
    )
    assert pools["case_id"] == ["c2"]  # the newest, within the bound
    assert resolve(Pooled("case_id", 7), pools) == "c2"
    assert resolve(Pooled("hold_id", 7, "none yet"), pools) == "none yet"
    assert find(pooled("case_id"), lambda p: True, settings=FIND).name == "case_id"


def test_the_state_probe_sees_a_committed_change(tmp_path: Path) -> None:
    path = tmp_path / "plane.db"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE ledger (account TEXT PRIMARY KEY, balance INTEGER)")
    writer.execute("INSERT INTO ledger VALUES ('a', 1)")
    registry = tmp_path / "registry.json"
    registry.write_text("{}")
    probe = StateProbe.of_state_dir(tmp_path, lambda: {"S": 3})
    probe.files.append(FileState(registry))
    before = probe.snapshot()
    assert differences(before, probe.snapshot()) == []
    assert probe.settle(quiet_s=0.01, max_s=1.0)

    writer.execute("UPDATE ledger SET balance = 2 WHERE account = 'a'")  # same row count
    changed = differences(before, probe.snapshot())
    assert len(changed) == 1 and changed[0].startswith("plane.db:ledger 1 rows")

    registry.write_text('{"live": 2}')
    assert any(line.startswith("registry.json") for line in differences(before, probe.snapshot()))
    probe.close()
    writer.close()


def test_the_figures_name_the_totals_and_each_plane() -> None:
    tally = Tally()
    tally.plane("money").cases = 3
    tally.plane("money").state_changes = 1
    tally.plane("ai").internal = 2
    figures = tally.totals()
    assert figures["fuzz_cases_total"] == 3
    assert figures["fuzz_internal_total"] == 2
    assert figures["fuzz_state_changes_total"] == 1
    assert figures["fuzz_money_state_changes_total"] == 1
    assert figures["fuzz_ai_internal_total"] == 2
    assert figures["fuzz_ai_cases_total"] == 0


def test_every_plane_gets_its_cases_from_the_contracts_alone() -> None:
    every = targets()
    for plane in {t.plane for t in every}:
        own = [t for t in every if t.plane == plane]
        assert sum(cases_of(t, every, 10_000) for t in own) >= 10_000
    no_fields = [t for t in every if not t.input_type.fields]
    assert all(cases_of(t, every, 10_000) == 1 for t in no_fields)


def test_spec_bytes_counts_a_repeated_item_once_per_repeat() -> None:
    item = {"flow": "a" * 1000, "attributes": {f"k{i}": "b" * 100 for i in range(33)}}
    spec = {"events": [item] * 1001, "tenant_id": "t"}
    size = spec_bytes(spec)
    wire = build(gateway_pb2.IngestEventsRequest.DESCRIPTOR, spec, {}).ByteSize()
    assert wire * 0.8 <= size <= wire * 1.5
