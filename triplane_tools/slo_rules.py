"""SLOs as config, turned into Prometheus rules.

Reads the SLO definitions (k8s/observability/slos.yaml: availability and
latency objectives per gateway flow) and writes k8s/observability/rules.yaml:

- recording rules ``triplane_slo:error_ratio:rate<window>{flow, sli}``, the
  share of a flow's calls that spent error budget over each window the alerts
  read: for ``sli="availability"`` the calls answered with one of the file's
  error codes, for ``sli="latency"`` the calls slower than the threshold;
- the SRE workbook's multi-window, multi-burn-rate alerts
  (``TriplaneErrorBudgetBurn``, chapter 5, table 5-8): ``severity: page`` when
  the budget burns 14.4x over 1h and 5m, or 6x over 6h and 30m;
  ``severity: ticket`` at 3x over 1d and 2h, or 1x over 3d and 6h.

``python -m triplane_tools.slo_rules`` rewrites the rules file;
``--check`` only says whether it is up to date (exit 1 when not).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from triplane.runtime.metrics import RPC_DURATION_BUCKETS_S

ROOT = Path(__file__).resolve().parent.parent
SLOS_PATH = ROOT / "k8s" / "observability" / "slos.yaml"
RULES_PATH = ROOT / "k8s" / "observability" / "rules.yaml"

REQUESTS = "triplane_rpc_requests_total"
DURATION = "triplane_rpc_duration_seconds"
RECORD_PREFIX = "triplane_slo:error_ratio:rate"
ALERT_NAME = "TriplaneErrorBudgetBurn"


@dataclass(frozen=True)
class BurnWindow:
    """One alert condition: the budget burning ``factor`` times too fast over
    both ``long`` and ``short`` (the short window makes the alert stop soon
    after the burn does)."""

    severity: str
    factor: float
    long: str
    short: str


# The SRE workbook's recommended pairs (2% of a 30-day budget in an hour, 5%
# in six hours: page; 10% in a day, 10% in three days: ticket).
BURN_WINDOWS: tuple[BurnWindow, ...] = (
    BurnWindow("page", 14.4, "1h", "5m"),
    BurnWindow("page", 6.0, "6h", "30m"),
    BurnWindow("ticket", 3.0, "1d", "2h"),
    BurnWindow("ticket", 1.0, "3d", "6h"),
)
SEVERITIES = ("page", "ticket")
_DURATION_RE = re.compile(r"^[0-9]+[smhdw]$")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_METHOD_RE = re.compile(r"^[A-Z][A-Za-z0-9]*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class SloError(ValueError):
    """The SLO file is not usable."""


@dataclass(frozen=True)
class Sli:
    flow: str
    name: str  # availability | latency
    objective_percent: float
    description: str
    threshold_s: float | None = None

    @property
    def budget(self) -> float:
        return round(1.0 - self.objective_percent / 100.0, 12)


@dataclass(frozen=True)
class SloConfig:
    plane: str
    service: str
    period: str
    error_codes: tuple[str, ...]
    methods: Mapping[str, tuple[str, ...]]
    slis: tuple[Sli, ...]


def _windows() -> list[str]:
    seen: list[str] = []
    for window in BURN_WINDOWS:
        for w in (window.short, window.long):
            if w not in seen:
                seen.append(w)
    return sorted(seen, key=lambda w: int(w[:-1]) * _SECONDS[w[-1]])


def _percent(value: Any, where: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise SloError(f"{where}: an objective is a percentage, not {value!r}")
    if not 0.0 < float(value) < 100.0:
        raise SloError(f"{where}: objective {value} is not between 0 and 100 (exclusive)")
    return float(value)


def parse(document: Mapping[str, Any]) -> SloConfig:
    """The SLO file's content, checked."""
    for key in ("plane", "service", "period", "error_codes", "flows"):
        if key not in document:
            raise SloError(f"slos: {key} is missing")
    period = str(document["period"])
    if not _DURATION_RE.match(period):
        raise SloError(f"slos: period {period!r} is not a Prometheus duration")
    codes = tuple(str(c) for c in document["error_codes"])
    if not codes or not all(re.fullmatch(r"[A-Z_]+", c) for c in codes):
        raise SloError(f"slos: error_codes {codes!r} are not gRPC code names")
    flows = document["flows"]
    if not isinstance(flows, Mapping) or not flows:
        raise SloError("slos: flows must name at least one flow")
    methods: dict[str, tuple[str, ...]] = {}
    slis: list[Sli] = []
    for flow, spec in flows.items():
        where = f"slos: flow {flow}"
        if not _NAME_RE.match(str(flow)):
            raise SloError(f"{where}: a flow's name is lower_snake_case")
        names = tuple(str(m) for m in spec.get("methods") or ())
        if not names or not all(_METHOD_RE.match(m) for m in names):
            raise SloError(f"{where}: methods must list the service's method names")
        methods[flow] = names
        description = str(spec.get("description", flow))
        if "availability" not in spec and "latency" not in spec:
            raise SloError(f"{where}: neither availability nor latency is set")
        if "availability" in spec:
            slis.append(
                Sli(flow, "availability", _percent(spec["availability"], where), description)
            )
        if "latency" in spec:
            latency = spec["latency"]
            threshold = float(latency["threshold_s"])
            if threshold not in RPC_DURATION_BUCKETS_S:
                raise SloError(
                    f"{where}: latency threshold {threshold} s is not a bucket bound of "
                    f"{DURATION} ({', '.join(str(b) for b in RPC_DURATION_BUCKETS_S)})"
                )
            slis.append(
                Sli(
                    flow,
                    "latency",
                    _percent(latency["objective"], where),
                    description,
                    threshold_s=threshold,
                )
            )
    return SloConfig(
        plane=str(document["plane"]),
        service=str(document["service"]),
        period=period,
        error_codes=codes,
        methods=methods,
        slis=tuple(slis),
    )


def _method_matcher(config: SloConfig, flow: str) -> str:
    # A PromQL string: the regex's backslashes doubled.
    service = re.escape(config.service).replace("\\", "\\\\")
    return f'method=~"{service}/({"|".join(config.methods[flow])})"'


def _ratio_expr(config: SloConfig, sli: Sli, window: str) -> str:
    base = f'plane="{config.plane}",{_method_matcher(config, sli.flow)}'
    if sli.name == "availability":
        codes = "|".join(config.error_codes)
        errors = f'sum(rate({REQUESTS}{{{base},code=~"{codes}"}}[{window}]))'
        total = f"sum(rate({REQUESTS}{{{base}}}[{window}]))"
        # No error series yet is a ratio of 0, not an absent one.
        return f"(\n  {errors}\n  or vector(0)\n)\n/\n{total}\n"
    assert sli.threshold_s is not None
    le = bucket_label(sli.threshold_s)
    fast = f'sum(rate({DURATION}_bucket{{{base},le="{le}"}}[{window}]))'
    total = f"sum(rate({DURATION}_count{{{base}}}[{window}]))"
    return f"1 - (\n  {fast}\n  /\n  {total}\n)\n"


def bucket_label(bound: float) -> str:
    """A bucket's le label as prometheus_client writes it (0.25, 1.0, 10.0)."""
    return repr(float(bound))


def _number(value: float) -> str:
    return f"{round(value, 12):g}"


def _alert_expr(sli: Sli, severity: str) -> str:
    selector = f'{{flow="{sli.flow}",sli="{sli.name}"}}'
    parts = []
    for window in BURN_WINDOWS:
        if window.severity != severity:
            continue
        limit = _number(window.factor * sli.budget)
        parts.append(
            f"(\n  {RECORD_PREFIX}{window.long}{selector} > {limit}\n"
            f"  and\n  {RECORD_PREFIX}{window.short}{selector} > {limit}\n)"
        )
    return "\nor\n".join(parts) + "\n"


def _objective_text(sli: Sli) -> str:
    if sli.name == "availability":
        return f"{_number(sli.objective_percent)}% of calls answered without a server error"
    assert sli.threshold_s is not None
    within = _number(sli.threshold_s)
    return f"{_number(sli.objective_percent)}% of calls answered within {within} s"


def build(config: SloConfig) -> dict[str, Any]:
    """The rules file's content."""
    recording: list[dict[str, Any]] = []
    for sli in config.slis:
        for window in _windows():
            recording.append(
                {
                    "record": f"{RECORD_PREFIX}{window}",
                    "expr": _ratio_expr(config, sli, window),
                    "labels": {"flow": sli.flow, "sli": sli.name},
                }
            )
    alerts: list[dict[str, Any]] = []
    for sli in config.slis:
        for severity in SEVERITIES:
            pairs = ", ".join(
                f"{_number(w.factor)}x over {w.long} and {w.short}"
                for w in BURN_WINDOWS
                if w.severity == severity
            )
            alerts.append(
                {
                    "alert": ALERT_NAME,
                    "expr": _alert_expr(sli, severity),
                    "labels": {"severity": severity, "flow": sli.flow, "sli": sli.name},
                    "annotations": {
                        "summary": f"{sli.flow}: {sli.name} error budget burning ({severity})",
                        "description": (
                            f"{sli.flow} ({sli.description}), SLO: {_objective_text(sli)} "
                            f"over {config.period}. The error "
                            f"budget burns at {pairs} its sustainable rate "
                            f"(triplane_slo:error_ratio:rate* over the budget "
                            f"{_number(sli.budget)})."
                        ),
                    },
                }
            )
    return {
        "groups": [
            {"name": "triplane-slo-recording", "rules": recording},
            {"name": "triplane-slo-alerts", "rules": alerts},
        ]
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)

HEADER = (
    "# Generated by `python -m triplane_tools.slo_rules` from slos.yaml: do not edit.\n"
    "# Recording rules per flow and window, and multi-window multi-burn-rate alerts\n"
    "# (the SRE workbook's page and ticket pairs). Tested by `promtool test rules\n"
    "# rules_test.yaml` (make k8s-check, tests/k8s).\n"
)


def render(config: SloConfig) -> str:
    body = yaml.dump(build(config), Dumper=_Dumper, sort_keys=False, width=1000)
    return HEADER + body


def load(path: Path = SLOS_PATH) -> SloConfig:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(document, Mapping):
        raise SloError(f"{path}: not a mapping")
    return parse(document)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m triplane_tools.slo_rules", description=__doc__)
    parser.add_argument("--slos", type=Path, default=SLOS_PATH)
    parser.add_argument("--out", type=Path, default=RULES_PATH)
    parser.add_argument(
        "--check", action="store_true", help="fail when the rules file is not up to date"
    )
    args = parser.parse_args(argv)
    text = render(load(args.slos))
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(
                f"slo_rules: {args.out} is not what {args.slos} makes; run "
                "`python -m triplane_tools.slo_rules` and commit it",
                file=sys.stderr,
            )
            return 1
        print(f"slo_rules: {args.out} is up to date")
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"slo_rules: wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
