"""The SLO rules: generated from slos.yaml, committed up to date, and correct
by promtool (its rule check and the unit tests in rules_test.yaml: a burn-rate
alert firing on a sustained burn, quiet on a short spike)."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from tests.k8s.tools import require_tool
from triplane.runtime.metrics import RPC_DURATION_BUCKETS_S
from triplane_tools import slo_rules

OBS = slo_rules.RULES_PATH.parent


def test_rules_file_is_what_the_slos_make() -> None:
    assert slo_rules.main(["--check"]) == 0, (
        "k8s/observability/rules.yaml is stale: run `python -m triplane_tools.slo_rules`"
    )


def test_every_flow_gets_recording_rules_and_both_severities() -> None:
    config = slo_rules.load()
    rules = slo_rules.build(config)
    recording, alerts = (group["rules"] for group in rules["groups"])
    windows = {"5m", "30m", "1h", "2h", "6h", "1d", "3d"}
    for sli in config.slis:
        labels = {"flow": sli.flow, "sli": sli.name}
        recorded = {
            r["record"].removeprefix(slo_rules.RECORD_PREFIX)
            for r in recording
            if r["labels"] == labels
        }
        assert recorded == windows
        severities = sorted(
            a["labels"]["severity"]
            for a in alerts
            if a["labels"]["flow"] == sli.flow and a["labels"]["sli"] == sli.name
        )
        assert severities == ["page", "ticket"]


def test_burn_thresholds_are_the_workbook_factors_times_the_budget() -> None:
    config = slo_rules.load()
    authorize = next(s for s in config.slis if s.flow == "authorize" and s.name == "availability")
    page = slo_rules._alert_expr(authorize, "page")
    ticket = slo_rules._alert_expr(authorize, "ticket")
    assert "rate1h" in page and "rate5m" in page and "> 0.0144" in page
    assert "rate6h" in page and "rate30m" in page and "> 0.006" in page
    assert "rate1d" in ticket and "rate2h" in ticket and "> 0.003" in ticket
    assert "rate3d" in ticket and "rate6h" in ticket and "> 0.001" in ticket


def test_latency_sli_reads_the_threshold_bucket() -> None:
    config = slo_rules.load()
    sli = next(s for s in config.slis if s.flow == "ingest" and s.name == "latency")
    expr = slo_rules._ratio_expr(config, sli, "5m")
    assert 'triplane_rpc_duration_seconds_bucket{plane="gateway"' in expr
    assert 'le="1.0"' in expr  # as prometheus_client writes the bound


def test_bucket_labels_match_the_client_library() -> None:
    from prometheus_client.utils import floatToGoString

    for bound in RPC_DURATION_BUCKETS_S:
        assert slo_rules.bucket_label(bound) == floatToGoString(bound)


def _slos(**flow: Any) -> dict[str, Any]:
    return {
        "plane": "gateway",
        "service": "triplane.gateway.v1.GatewayService",
        "period": "30d",
        "error_codes": ["INTERNAL"],
        "flows": {"authorize": {"methods": ["AuthorizePayment"], **flow}},
    }


@pytest.mark.parametrize(
    ("flow", "message"),
    [
        ({"latency": {"threshold_s": 0.3, "objective": 99}}, "not a bucket bound"),
        ({"availability": 100}, "not between 0 and 100"),
        ({"availability": "high"}, "percentage"),
        ({}, "neither availability nor latency"),
    ],
)
def test_unusable_slos_are_refused(flow: dict[str, Any], message: str) -> None:
    with pytest.raises(slo_rules.SloError, match=message):
        slo_rules.parse(_slos(**flow))


def test_method_names_are_checked() -> None:
    document = _slos(availability=99.9)
    document["flows"]["authorize"]["methods"] = ['Authorize"}']
    with pytest.raises(slo_rules.SloError, match="method names"):
        slo_rules.parse(document)


def test_the_committed_rules_parse_as_prometheus_rule_groups() -> None:
    document = yaml.safe_load(slo_rules.RULES_PATH.read_text(encoding="utf-8"))
    names = [group["name"] for group in document["groups"]]
    assert names == ["triplane-slo-recording", "triplane-slo-alerts"]


def test_promtool_checks_the_rules() -> None:
    promtool = require_tool("promtool", "Debian's prometheus package")
    result = subprocess.run(
        [promtool, "check", "rules", "rules.yaml"],
        cwd=OBS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_fire_and_stay_quiet() -> None:
    promtool = require_tool("promtool", "Debian's prometheus package")
    result = subprocess.run(
        [promtool, "test", "rules", "rules_test.yaml"],
        cwd=OBS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_would_catch_an_alert_that_never_fires(tmp_path: Any) -> None:
    """The unit tests bite: with the page threshold out of reach, the firing
    case fails."""
    promtool = require_tool("promtool", "Debian's prometheus package")
    rules = slo_rules.RULES_PATH.read_text(encoding="utf-8")
    broken = rules.replace("> 0.0144", "> 0.9").replace("> 0.006\n", "> 0.9\n")
    assert broken != rules
    (tmp_path / "rules.yaml").write_text(broken, encoding="utf-8")
    (tmp_path / "rules_test.yaml").write_text(
        (OBS / "rules_test.yaml").read_text(encoding="utf-8"), encoding="utf-8"
    )
    result = subprocess.run(
        [promtool, "test", "rules", "rules_test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0, result.stdout
    assert "severity" in result.stdout + result.stderr
