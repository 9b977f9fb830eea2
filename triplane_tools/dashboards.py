"""Grafana dashboards, one per flow and one per plane, as plain JSON.

Writes k8s/observability/dashboards/:

- ``flow-<flow>.json`` for each flow of the SLO file (slos.yaml): the flow's
  calls at the gateway by code and by method, its latency quantiles, and its
  SLIs against their objectives (the recording rules of rules.yaml) with the
  error budget's burn rate;
- ``plane-<plane>.json`` for the gateway and each plane: RED per method
  (triplane_rpc_requests_total, triplane_rpc_duration_seconds) and the plane's
  own series (README "Observability").

Every query reads Prometheus through the dashboard's ``datasource`` variable.
``python -m triplane_tools.dashboards`` rewrites the files; ``--check`` only
says whether they are up to date (exit 1 when not). tests/k8s checks that each
is valid JSON and that every query names a metric the planes export (or a
series rules.yaml records).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triplane_tools import slo_rules

DASHBOARDS_DIR = slo_rules.ROOT / "k8s" / "observability" / "dashboards"
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
REQUESTS = slo_rules.REQUESTS
DURATION = slo_rules.DURATION


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    description: str = ""
    # A red line at this value (an SLI's budget, a burn rate of 1).
    threshold: float | None = None
    stack: bool = False


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if panel.threshold is not None:
        steps.append({"color": "red", "value": panel.threshold})
    custom: dict[str, Any] = {
        "drawStyle": "line",
        "fillOpacity": 10,
        "showPoints": "never",
        "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
        "thresholdsStyle": {"mode": "line" if panel.threshold is not None else "off"},
    }
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {
                "unit": panel.unit,
                "custom": custom,
                "thresholds": {"mode": "absolute", "steps": steps},
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "expr": q.expr,
                "legendFormat": q.legend,
                "range": True,
            }
            for i, q in enumerate(panel.queries)
        ],
    }


def dashboard(uid: str, title: str, description: str, panels: Sequence[Panel]) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["triplane"],
        "timezone": "utc",
        "editable": True,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                }
            ]
        },
        "panels": [
            _panel_json(panel, i + 1, 12 * (i % 2), 8 * (i // 2)) for i, panel in enumerate(panels)
        ],
    }


def _quantiles(selector: str, by: str = "") -> tuple[Query, ...]:
    group = f"le, {by}" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({group}) "
            f"(rate({DURATION}_bucket{{{selector}}}[{RATE}])))",
            f"{prefix}p{round(q * 100)}",
        )
        for q in (0.5, 0.99)
    )


def flow_dashboard(config: slo_rules.SloConfig, flow: str) -> dict[str, Any]:
    service = config.service.replace(".", "\\\\.")
    selector = f'plane="{config.plane}",method=~"{service}/({"|".join(config.methods[flow])})"'
    codes = "|".join(config.error_codes)
    panels: list[Panel] = [
        Panel(
            "Calls by code",
            (Query(f"sum by (code) (rate({REQUESTS}{{{selector}}}[{RATE}]))", "{{code}}"),),
            unit="reqps",
            stack=True,
            description="Every call of the flow the gateway answered, by the code the caller saw.",
        ),
        Panel(
            "Server errors by method",
            (
                Query(
                    f"sum by (method, code) "
                    f'(rate({REQUESTS}{{{selector},code=~"{codes}"}}[{RATE}]))',
                    "{{method}} {{code}}",
                ),
            ),
            unit="reqps",
            description="The codes that spend the availability budget (slos.yaml error_codes).",
        ),
        Panel("Latency", _quantiles(selector), unit="s"),
        Panel("Latency by method", _quantiles(selector, "method"), unit="s"),
    ]
    for sli in config.slis:
        if sli.flow != flow:
            continue
        labels = f'{{flow="{flow}",sli="{sli.name}"}}'
        record = slo_rules.RECORD_PREFIX
        panels.append(
            Panel(
                f"{sli.name.capitalize()} SLI: share of calls spending the budget",
                (
                    Query(f"{record}5m{labels}", "5m"),
                    Query(f"{record}1h{labels}", "1h"),
                    Query(f"{record}1d{labels}", "1d"),
                ),
                unit="percentunit",
                threshold=sli.budget,
                description=(
                    f"Objective: {slo_rules._objective_text(sli)} over {config.period}; the "
                    f"red line is the budget ({slo_rules._number(sli.budget)})."
                ),
            )
        )
        panels.append(
            Panel(
                f"{sli.name.capitalize()} error budget burn rate",
                tuple(
                    Query(f"{record}{w}{labels} / {slo_rules._number(sli.budget)}", w)
                    for w in ("5m", "1h", "6h", "3d")
                ),
                unit="short",
                threshold=1.0,
                description=(
                    "1: the budget lasts exactly the period. Pages at 14.4 (1h and 5m) or 6 "
                    "(6h and 30m); tickets at 3 (1d and 2h) or 1 (3d and 6h)."
                ),
            )
        )
    spec_description = next(s.description for s in config.slis if s.flow == flow)
    return dashboard(
        f"triplane-flow-{flow}",
        f"Triplane / flow / {flow}",
        f"The {flow} flow at the gateway: {spec_description}.",
        panels,
    )


def _red(plane: str) -> list[Panel]:
    selector = f'plane="{plane}"'
    return [
        Panel(
            "Calls by method",
            (Query(f"sum by (method) (rate({REQUESTS}{{{selector}}}[{RATE}]))", "{{method}}"),),
            unit="reqps",
            stack=True,
        ),
        Panel(
            "Calls not OK by method and code",
            (
                Query(
                    f'sum by (method, code) (rate({REQUESTS}{{{selector},code!="OK"}}[{RATE}]))',
                    "{{method}} {{code}}",
                ),
            ),
            unit="reqps",
        ),
        Panel("Latency", _quantiles(selector), unit="s"),
        Panel(
            "p99 latency by method",
            (
                Query(
                    f"histogram_quantile(0.99, sum by (le, method) "
                    f"(rate({DURATION}_bucket{{{selector}}}[{RATE}])))",
                    "{{method}}",
                ),
            ),
            unit="s",
        ),
    ]


def _rate(metric: str, by: str, legend: str) -> Query:
    return Query(f"sum by ({by}) (rate({metric}[{RATE}]))", legend)


PLANES: dict[str, tuple[str, str, list[Panel]]] = {
    "gateway": (
        "gateway",
        "The public entry point: RED per method and webhook deliveries.",
        [
            Panel(
                "Delivery attempts by channel and result",
                (
                    _rate(
                        "triplane_gateway_delivery_attempts_total",
                        "channel, result",
                        "{{channel}} {{result}}",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Dead letters",
                (
                    Query(
                        "sum by (channel) (increase(triplane_gateway_delivery_attempts_total"
                        f'{{result="dead"}}[{RATE}]))',
                        "{{channel}}",
                    ),
                ),
                unit="short",
                description="Deliveries given up on: ListDeadLetters / RedeliverDeadLetter.",
            ),
            Panel(
                "Payout reviews handed to the money plane",
                (
                    _rate(
                        "triplane_gateway_payout_reviews_total",
                        "resolution, result",
                        "{{resolution}} {{result}}",
                    ),
                ),
                unit="ops",
                description="refused: the money plane's final refusal (e.g. an expired "
                "approval token); the payout stays pending review.",
            ),
            Panel(
                "Reconciliation break: detection to webhook queued",
                tuple(
                    Query(
                        f"histogram_quantile({q}, sum by (le) "
                        f"(rate(triplane_gateway_break_webhook_queued_seconds_bucket[{RATE}])))",
                        f"p{round(q * 100)}",
                    )
                    for q in (0.5, 0.99)
                ),
                unit="s",
            ),
        ],
    ),
    "money": (
        "money_plane",
        "The ledger: RED per method, group commits, the outbox and reserves.",
        [
            Panel(
                "Transfers by kind and result",
                (_rate("triplane_money_transfers_total", "kind, result", "{{kind}} {{result}}"),),
                unit="ops",
            ),
            Panel(
                "Transfers per group commit",
                tuple(
                    Query(
                        f"histogram_quantile({q}, sum by (le) "
                        f"(rate(triplane_money_group_commit_transfers_bucket[{RATE}])))",
                        f"p{round(q * 100)}",
                    )
                    for q in (0.5, 0.99)
                ),
            ),
            Panel(
                "Commit queue",
                (Query("sum(triplane_money_commit_queue_transfers)", "queued transfers"),),
                description="Against money.group_commit.max_queue_transfers.",
            ),
            Panel(
                "Outbox lag",
                (
                    Query("max(triplane_money_outbox_lag_seconds)", "oldest unpublished"),
                    Query(
                        f"sum(rate(triplane_money_outbox_published_events_total[{RATE}]))",
                        "published / s",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Reserve releases",
                (_rate("triplane_money_reserve_releases_total", "result", "{{result}}"),),
                unit="ops",
            ),
        ],
    ),
    "policy": (
        "policy_plane",
        "Decisions: RED per method, outcomes, shadow agreement, the decision log's lag.",
        [
            Panel(
                "Decisions by outcome",
                (_rate("triplane_policy_decisions_total", "outcome", "{{outcome}}"),),
                unit="ops",
                stack=True,
            ),
            Panel(
                "Shadow agreement",
                (
                    Query(
                        f"sum(rate(triplane_policy_shadow_agreements_total[{RATE}])) / "
                        f"sum(rate(triplane_policy_shadow_decisions_total[{RATE}]))",
                        "agreeing share",
                    ),
                ),
                unit="percentunit",
            ),
            Panel(
                "Decision log: waiting records",
                (Query("sum(triplane_policy_decision_log_waiting_records)", "waiting"),),
                description="Against policy.decision_log.max_queue_records.",
            ),
            Panel(
                "Decision log: append wait",
                tuple(
                    Query(
                        f"histogram_quantile({q}, sum by (le) "
                        f"(rate(triplane_policy_decision_log_append_seconds_bucket[{RATE}])))",
                        f"p{round(q * 100)}",
                    )
                    for q in (0.5, 0.99)
                ),
                unit="s",
            ),
        ],
    ),
    "ai": (
        "ai_plane",
        "Scores, ranking and features: RED per method, score sources, the breaker, drift.",
        [
            Panel(
                "Scores by model and source",
                (_rate("triplane_ai_scores_total", "model, source", "{{model}} {{source}}"),),
                unit="ops",
                stack=True,
            ),
            Panel(
                "Triton breaker state",
                (Query("max by (pod) (triplane_ai_breaker_state)", "{{pod}}"),),
                description="0 closed, 1 open, 2 half-open.",
            ),
            Panel(
                "Drift (PSI)",
                (
                    Query(
                        "max by (model, version, series) (triplane_ai_psi)",
                        "{{model}} {{version}} {{series}}",
                    ),
                ),
                threshold=0.2,
                description="Population stability index against the training baseline.",
            ),
            Panel(
                "Feature pipeline: events dropped",
                (
                    Query(f"sum(rate(triplane_ai_events_unreadable_total[{RATE}]))", "unreadable"),
                    Query(
                        f"sum(rate(triplane_ai_events_unknown_tenant_total[{RATE}]))",
                        "unknown tenant",
                    ),
                ),
                unit="ops",
            ),
        ],
    ),
}


def build_all(config: slo_rules.SloConfig) -> dict[str, dict[str, Any]]:
    """File name -> dashboard."""
    boards: dict[str, dict[str, Any]] = {}
    for flow in config.methods:
        boards[f"flow-{flow}.json"] = flow_dashboard(config, flow)
    for name, (plane, description, panels) in PLANES.items():
        boards[f"plane-{name}.json"] = dashboard(
            f"triplane-plane-{name}",
            f"Triplane / plane / {name}",
            description,
            _red(plane) + panels,
        )
    return boards


def render(board: dict[str, Any]) -> str:
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m triplane_tools.dashboards", description=__doc__
    )
    parser.add_argument("--slos", type=Path, default=slo_rules.SLOS_PATH)
    parser.add_argument("--out", type=Path, default=DASHBOARDS_DIR)
    parser.add_argument(
        "--check", action="store_true", help="fail when the dashboards are not up to date"
    )
    args = parser.parse_args(argv)
    boards = {name: render(board) for name, board in build_all(slo_rules.load(args.slos)).items()}
    present = {p.name for p in args.out.glob("*.json")} if args.out.is_dir() else set()
    if args.check:
        stale = sorted(
            name
            for name, text in boards.items()
            if not (args.out / name).exists()
            or (args.out / name).read_text(encoding="utf-8") != text
        )
        extra = sorted(present - set(boards))
        if stale or extra:
            print(
                f"dashboards: {args.out} is not what the generator makes (stale or missing: "
                f"{stale}; not generated: {extra}); run `python -m triplane_tools.dashboards`",
                file=sys.stderr,
            )
            return 1
        print(f"dashboards: {len(boards)} in {args.out} are up to date")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name in present - set(boards):
        (args.out / name).unlink()
    for name, text in boards.items():
        (args.out / name).write_text(text, encoding="utf-8")
    print(f"dashboards: wrote {len(boards)} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
