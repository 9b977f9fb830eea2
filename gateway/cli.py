"""`triplane report lift` (and future gateway commands) for the triplane CLI."""

from __future__ import annotations

from typing import Any

from gateway.report import register_report


def register(subparsers: Any) -> None:
    register_report(subparsers)
