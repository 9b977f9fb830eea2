"""The Grafana dashboards (k8s/observability/dashboards/): generated and up to
date, valid JSON of the shape Grafana loads, and every panel's query names a
metric the planes export (read from the process registry after importing the
planes) or a series rules.yaml records; with promtool, every query parses."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.tools import require_tool
from triplane_tools import dashboards, slo_rules

# Suffixes of the series each metric type exposes (prometheus_client).
_SERIES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
}
# A metric name in a PromQL expression: ours all start with triplane.
_NAME_RE = re.compile(r"(?<![\w:\"])(triplane[a-zA-Z0-9_:]*)")


def exported_series() -> set[str]:
    """Every series name the planes' metrics expose, from the one registry
    they all register in, after importing each plane's process."""
    import ai_plane.app
    import gateway.app
    import money_plane.app
    import policy_plane.app
    from triplane.runtime.metrics import PROCESS_REGISTRY

    assert ai_plane.app and gateway.app and money_plane.app and policy_plane.app
    names: set[str] = set()
    for family in PROCESS_REGISTRY.collect():
        names.update(family.name + suffix for suffix in _SERIES[family.type])
    return names


def recorded_series() -> set[str]:
    document = yaml.safe_load(slo_rules.RULES_PATH.read_text(encoding="utf-8"))
    return {r["record"] for g in document["groups"] for r in g["rules"] if "record" in r}


def _boards() -> dict[str, dict[str, Any]]:
    files = sorted(dashboards.DASHBOARDS_DIR.glob("*.json"))
    assert files, f"no dashboards in {dashboards.DASHBOARDS_DIR}"
    return {f.name: json.loads(f.read_text(encoding="utf-8")) for f in files}


def _exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p["targets"]]


def test_dashboards_are_what_the_generator_makes() -> None:
    assert dashboards.main(["--check"]) == 0


def test_one_dashboard_per_flow_and_per_plane() -> None:
    flows = set(slo_rules.load().methods)
    names = set(_boards())
    assert names == {f"flow-{f}.json" for f in flows} | {
        f"plane-{p}.json" for p in ("gateway", "money", "policy", "ai")
    }


def test_dashboards_have_the_shape_grafana_loads() -> None:
    uids = set()
    for name, board in _boards().items():
        assert board["uid"] not in uids, name
        uids.add(board["uid"])
        assert len(board["uid"]) <= 40 and board["title"] and board["schemaVersion"] >= 36
        assert [v["name"] for v in board["templating"]["list"]] == ["datasource"]
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in board["panels"]:
            assert panel["type"] == "timeseries" and panel["targets"], (name, panel["title"])
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids))


def names_in(expr: str) -> set[str]:
    # Label values in quotes (flow="authorize", method=~"triplane\\.gateway...")
    # are not metric names.
    return set(_NAME_RE.findall(re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)))


def test_names_in_finds_metrics_not_label_values() -> None:
    expr = (
        'sum(rate(triplane_rpc_requests_total{method=~"triplane\\\\.gateway\\\\.v1"}[5m])) '
        '/ triplane_slo:error_ratio:rate5m{flow="authorize"}'
    )
    assert names_in(expr) == {"triplane_rpc_requests_total", "triplane_slo:error_ratio:rate5m"}


def test_every_query_names_a_metric_the_planes_export() -> None:
    known = exported_series() | recorded_series()
    assert "triplane_rpc_requests_total" in known
    assert "triplane_rpc_duration_seconds_bucket" in known
    assert "triplane_money_outbox_lag_seconds" in known
    unknown = []
    for name, board in _boards().items():
        for title, expr in _exprs(board):
            found = names_in(expr)
            if not found:
                unknown.append((name, title, expr, "names no triplane metric"))
            unknown.extend((name, title, expr, n) for n in sorted(found - known))
    assert not unknown, "queries naming metrics nobody exports:\n" + "\n".join(map(str, unknown))


def test_a_query_naming_an_unknown_metric_would_be_caught() -> None:
    known = exported_series()
    assert names_in("sum(rate(triplane_money_transfer_total[5m]))") - known == {
        "triplane_money_transfer_total"
    }


def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "Debian's prometheus package")
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, (_, expr) in enumerate(e for b in _boards().values() for e in _exprs(b))
    ]
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": rules}]}), "utf-8")
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("board", ["flow-authorize.json", "plane-money.json"])
def test_dashboards_carry_their_key_panels(board: str) -> None:
    titles = [p["title"] for p in _boards()[board]["panels"]]
    if board.startswith("flow-"):
        assert "Availability error budget burn rate" in titles
        assert "Latency SLI: share of calls spending the budget" in titles
    else:
        assert {"Calls by method", "Outbox lag", "Transfers per group commit"} <= set(titles)
