"""`triplane report lift`: conversion and incremental lift versus the global
holdout per offer, surface and segment, with 95% intervals, as a table (and a
PNG with --png). Hooked into the CLI by `register_report(subparsers)`."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re

from gateway.measure import Measurement, MeasurementStore, format_table, plot_lift
from gateway.storage import open_from_config
from triplane.runtime.clock import Clock, SystemClock
from triplane.runtime.config import load_config
from triplane.runtime.errors import InvalidArgument

_RELATIVE = re.compile(r"^(\d+)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_since(text: str, now_us: int) -> int:
    """ "" (everything), a duration back from now ("7d", "24h", "30m") or an
    ISO-8601 date or time (UTC unless it names an offset), as Unix microseconds."""
    if not text:
        return 0
    relative = _RELATIVE.match(text.strip())
    if relative:
        return now_us - int(relative.group(1)) * _UNIT_S[relative.group(2)] * 1_000_000
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidArgument(
            "SINCE_INVALID", f"--since {text!r}: use 7d, 24h or an ISO-8601 date", "since"
        ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1_000_000)


async def lift(
    config_path: str | None, tenant_id: str, since: str, png: str, clock: Clock | None = None
) -> int:
    config = load_config(config_path)
    clock = clock or SystemClock()
    since_us = parse_since(since, clock.now_us())
    db = open_from_config(config)
    try:
        measurement = Measurement(MeasurementStore(db), config.gateway.measurement, clock)
        report = await measurement.lift_report(tenant_id, since_us)
    finally:
        db.close()
    print(format_table(report))
    if png:
        print(f"chart: {plot_lift(report, png)}")
    return 0


def _cmd_lift(args: argparse.Namespace) -> int:
    config_path = getattr(args, "global_config", None) or getattr(args, "config", None)
    try:
        return asyncio.run(lift(config_path, args.tenant, args.since, args.png))
    except InvalidArgument as err:
        print(f"error: {err.reason} ({err.field}): {err.message}")
        return 2


def register_report(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `report lift [--tenant] [--since] [--png PATH]`."""
    report = subparsers.add_parser("report", help="measurement reports")
    commands = report.add_subparsers(dest="report_command", required=True)
    command = commands.add_parser(
        "lift", help="conversion and incremental lift vs the holdout, with 95% intervals"
    )
    command.add_argument("--tenant", default="demo", help="tenant id (default: demo)")
    command.add_argument(
        "--since", default="", help="7d, 24h, 30m or an ISO-8601 date (default: everything)"
    )
    command.add_argument("--png", default="", metavar="PATH", help="also write a PNG chart")
    command.set_defaults(func=_cmd_lift)
