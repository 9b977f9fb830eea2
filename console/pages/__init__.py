"""The console's pages: one module a page, found by themselves.

How to add a page (say "payouts"):

1. Write `console/pages/payouts.py` with its handlers and a module-level
   `PAGE = Page(...)`:

       from starlette.requests import Request
       from starlette.responses import Response
       from starlette.routing import Route

       from console.app import console_of, grpc_error_page, render
       from console.auth import Session, requires
       from console import audit
       from console.pages import Page

       @requires("money:read")
       async def payouts(request: Request, session: Session) -> Response:
           console = console_of(request)
           try:
               answer = await console.planes.ledger().GetPayout(
                   ..., timeout=console.planes.timeout_s
               )
           except grpc.aio.AioRpcError as error:
               return grpc_error_page(request, session, error)
           return render(request, session, "payouts/list.html", {"payout": answer})

       PAGE = Page(
           label="Payouts", path="/payouts", permission="money:read", order=30,
           routes=[Route("/payouts", payouts)],
       )

   Every route wears `@requires(<permission>)` (console/auth.py): it signs
   the request in, checks the role's permission (403), and on POST the CSRF
   token (403). Permissions per role are in console/auth.py's table; add a
   new one there when no existing one fits.
2. Every action (a POST that changes something through a plane) is
   audited, on refusal too, with the state before and after: write the
   change as a function of the `before` dict it fills and answer with
   `console.actions.audited(request, session, "<noun>.<verb>", target,
   change, redirect_to=...)`: it records "ok" or "failed" (the plane's
   code and details) and answers a 303 to the page that shows the result,
   or the plane's refusal. A list links its next page with
   `console.actions.next_page_link(path, params, answer.next_page_token)`
   and reads its filters with `text_filter` / `choice_filter` (a
   `BadFilter` answered by `filter_error_page`: 400 FILTER_INVALID, the
   field named). A refusal without a plane call (bad input, a role)
   records `audit.record(...)` itself when it is an action.
3. Templates under `console/templates/<page>/`, extending `base.html`:
   `{% extends "base.html" %}{% block title %}..{% endblock %}
   {% block content %}..{% endblock %}`. Every form control has a
   `<label for>`; every POST form carries
   `<input type="hidden" name="{{ csrf_field }}" value="{{ session.csrf }}">`
   (it must work without JavaScript; htmx only improves it). Names and
   other PII: show what the plane returns, and ask for it in clear
   (`reveal_pii`) only when `session.can("pii:read")`.
4. The plane's gRPC stub: an accessor in console/planes.py (one line a
   service), and the method in that plane's `permissions.py` for the console
   role (`ADMIN_AND_CONSOLE` / `GATEWAY_ADMIN_AND_CONSOLE`): default deny,
   so a method not listed answers PERMISSION_DENIED. Add it also to the
   console set in tests/runtime/test_permissions.py.
5. Tests in tests/console/: the browser fixtures in tests/console/conftest.py
   (`signed_in(page, role)`, `shot(page, name)`, `browser_page(browser, url)`,
   `serve_console(config, users)` for a console against planes a module
   starts itself, `accessibility_problems(page, path)`); unit tests with
   Starlette's TestClient through `console_client(config, users)` and
   `sign_in_as(client, username)`. tests/console/test_accessibility.py visits
   every page found here as each role: a new page is checked without more.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

from starlette.routing import BaseRoute


@dataclass(frozen=True)
class Page:
    """One page in the navigation and its routes."""

    label: str
    # Where the navigation links to.
    path: str
    # Seeing the page at all needs this (console/auth.py ROLE_PERMISSIONS).
    permission: str
    routes: list[BaseRoute] = field(default_factory=list)
    # Position in the navigation (lower first).
    order: int = 100


def discover() -> list[Page]:
    """Every module of this package that defines PAGE, in navigation order."""
    found: list[Page] = []
    for module in pkgutil.iter_modules(__path__):
        imported = importlib.import_module(f"{__name__}.{module.name}")
        page = getattr(imported, "PAGE", None)
        if isinstance(page, Page):
            found.append(page)
    return sorted(found, key=lambda page: (page.order, page.label))
