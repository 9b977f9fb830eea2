"""`triplane report lift` and `triplane keys ...` for the triplane CLI."""

from __future__ import annotations

from typing import Any

from gateway.auth.cli import register_keys
from gateway.report import register_report


def register(subparsers: Any) -> None:
    register_report(subparsers)
    register_keys(subparsers)
