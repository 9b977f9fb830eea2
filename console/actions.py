"""What every page does the same way: an audited action through a plane, a
list's "next page" link and the parsing of its filters.

An action (a POST that changes something through a plane):

    async def claim(before: dict[str, Any]) -> dict[str, Any]:
        before.update(case_state(await _case(...)))    # the state before
        answer = await stub.ClaimCase(...)             # the change
        return case_state(answer.case)                 # the state after

    return await audited(request, session, "case.claim", target, claim, redirect_to=path)

`audited` records the entry ("ok" with before and after, or "failed" with
the plane's status code and details and whatever `before` held by then) and
answers a 303 to `redirect_to`, or the plane's refusal as an error page.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlencode

import grpc
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from console import audit
from console.app import error_page, grpc_error_page
from console.auth import Session

# The longest tenant id a filter accepts.
MAX_TENANT_LENGTH = 128


async def audited(
    request: Request,
    session: Session,
    action: str,
    target: str,
    change: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
    *,
    redirect_to: str | Callable[[dict[str, Any]], str],
    before: Mapping[str, Any] | None = None,
) -> Response:
    """Runs `change(before)` (it adds the state it reads before changing
    anything to the dict it is given, and returns the state after), audits
    the outcome and answers: a 303 to `redirect_to` (or, where the page to
    show depends on the plane's answer, to `redirect_to(after)`), or the
    plane's refusal. `before`: what the entry keeps besides (the reason
    asked, say)."""
    state: dict[str, Any] = {}
    try:
        after = await change(state)
    except grpc.aio.AioRpcError as error:
        await audit.record(
            request,
            session,
            action,
            target,
            "failed",
            before={**state, **(before or {})},
            after={"code": error.code().name, "details": error.details() or ""},
        )
        return grpc_error_page(request, session, error)
    await audit.record(
        request, session, action, target, "ok", before={**state, **(before or {})}, after=after
    )
    return RedirectResponse(
        redirect_to if isinstance(redirect_to, str) else redirect_to(after), 303
    )


def next_page_link(path: str, params: Mapping[str, str], next_token: str) -> str:
    """The link to a list's next page: `path` with `params` (those not
    empty; any page_token among them replaced) and the plane's token; ""
    on the last page."""
    if not next_token:
        return ""
    kept = {name: value for name, value in params.items() if name != "page_token" and value}
    return f"{path}?{urlencode({**kept, 'page_token': next_token})}"


class BadFilter(ValueError):
    """A filter the page refuses (400 FILTER_INVALID, the field named)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def text_filter(params: Mapping[str, str], name: str, max_length: int) -> str:
    """The filter `name` stripped ("" when absent), at most `max_length` long."""
    value = str(params.get(name, "")).strip()
    if len(value) > max_length:
        raise BadFilter(name, f"{name} is too long")
    return value


def tenant_filter(params: Mapping[str, str]) -> str:
    return text_filter(params, "tenant", MAX_TENANT_LENGTH)


def choice_filter(
    params: Mapping[str, str], name: str, choices: Mapping[str, Any] | tuple[str, ...], default: str
) -> str:
    """The filter `name`: one of `choices` ("" or absent: `default`; a
    `default` of "" is "any")."""
    value = str(params.get(name, "")) or default
    if value and value not in choices:
        named = ", ".join(choice for choice in choices if choice)
        raise BadFilter(name, f"{name} must be one of {named}")
    return value


def filter_error_page(request: Request, session: Session, bad: BadFilter) -> Response:
    return error_page(request, session, 400, "FILTER_INVALID", str(bad), bad.field)
