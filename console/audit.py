"""Every action, audited: who, when (the console's Clock), what (an action
name and its target), how it ended, and the state before and after. Shown on
the audit page (console/pages/audit.py)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import Counter
from starlette.requests import Request

from console.auth import Session

log = logging.getLogger("triplane.console.audit")

ACTIONS = Counter(
    "triplane_console_actions_total",
    "Console actions audited (sign-ins, case claims and resolutions, refusals), by outcome",
    ["action", "outcome"],
)


async def record(
    request: Request,
    session: Session | None,
    action: str,
    target: str,
    outcome: str,
    *,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    actor: str = "",
) -> None:
    """Appends one audit entry. `actor` names who acted when no session does
    (a failed sign-in: the username tried)."""
    from console.app import console_of

    console = console_of(request)
    who = session.username if session is not None else actor
    remote = request.client.host if request.client else ""
    await asyncio.to_thread(
        console.store.append_audit,
        console.clock.now_us(),
        who,
        action,
        target,
        outcome,
        before or {},
        after or {},
        remote,
    )
    ACTIONS.labels(action, outcome).inc()
    log.info("audit: %s %s %s -> %s", who, action, target, outcome)
