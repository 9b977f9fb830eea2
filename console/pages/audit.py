"""The audit log: every sign-in (and refused one), every action and every
refusal, newest first, filtered by actor and action (`audit:read`)."""

from __future__ import annotations

import asyncio
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from console.app import console_of, error_page, render
from console.auth import Session, requires
from console.pages import Page


@requires("audit:read")
async def audit_log(request: Request, session: Session) -> Response:
    console = console_of(request)
    actor = request.query_params.get("actor", "").strip()
    action = request.query_params.get("action", "").strip()
    raw_before = request.query_params.get("before", "0") or "0"
    if not raw_before.isdigit():
        return error_page(request, session, 400, "FILTER_INVALID", "before: an entry id", "before")
    limit = console.config.console.page_size
    entries = await asyncio.to_thread(
        console.store.audit_entries, limit, int(raw_before), actor, action
    )
    older = ""
    if len(entries) == limit:
        query = {"actor": actor, "action": action, "before": entries[-1].audit_id}
        older = "/audit?" + urlencode({k: v for k, v in query.items() if v})
    return render(
        request,
        session,
        "audit.html",
        {"entries": entries, "actor": actor, "action": action, "older": older},
    )


PAGE = Page(
    label="Audit log",
    path="/audit",
    permission="audit:read",
    order=90,
    routes=[Route("/audit", audit_log, methods=["GET"])],
)
