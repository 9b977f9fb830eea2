"""Cases (policy plane CaseService): the review queue of a tenant, filtered
by status, outcome, age and amount; a case with the decision behind it (its
fired rules and logged input: names in clear only for `pii:read`); claim and
resolve with a note (reviewers only: `cases:resolve`). Every claim and
resolution is audited with the case before and after.

Beside the queue, the human-overrule rate over time (GetOverruleSeries): per
UTC day of the chosen window, of the tenant's cases resolved that day whose
model suggested a resolution (decline at or above the bundle's
decline_suggestion_score, approve below it), the share the reviewer resolved
otherwise; charted as SVG with the counts in a table beside it."""

from __future__ import annotations

import datetime
import json
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote

import grpc
from google.protobuf.json_format import MessageToDict
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from console.actions import (
    BadFilter,
    audited,
    choice_filter,
    filter_error_page,
    next_page_link,
    tenant_filter,
)
from console.app import console_of, error_page, grpc_error_page, render
from console.auth import Session, requires
from console.charts import Share, share_chart
from console.pages import Page
from triplane.policy.v1 import policy_pb2 as pb
from triplane.runtime import codec as wire
from triplane.runtime.currencies import EXPONENTS

STATUSES = {
    "open": pb.CASE_STATUS_OPEN,
    "claimed": pb.CASE_STATUS_CLAIMED,
    "resolved": pb.CASE_STATUS_RESOLVED,
    "all": pb.CASE_STATUS_UNSPECIFIED,
}
OUTCOMES = {"review": pb.OUTCOME_REVIEW, "hold": pb.OUTCOME_HOLD, "deny": pb.OUTCOME_DENY}
RESOLUTIONS = {"approve": pb.RESOLUTION_APPROVE, "decline": pb.RESOLUTION_DECLINE}
# The overrule chart's windows, in days (one bucket a UTC day).
OVERRULE_WINDOWS = (7, 30, 90)
DEFAULT_OVERRULE_WINDOW = 30
DAY_US = 86_400_000_000


def _decimal(params: dict[str, str], name: str) -> Decimal | None:
    raw = params.get(name, "").strip()
    if not raw:
        return None
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise BadFilter(name, f"{name} must be a number") from None
    if not value.is_finite() or value < 0:
        raise BadFilter(name, f"{name} must be a number >= 0")
    return value


def _filters(params: dict[str, str]) -> dict[str, Any]:
    windows = tuple(str(days) for days in OVERRULE_WINDOWS)
    return {
        "tenant": tenant_filter(params),
        "window_days": int(
            choice_filter(params, "window_days", windows, str(DEFAULT_OVERRULE_WINDOW))
        ),
        "status": choice_filter(params, "status", STATUSES, "open"),
        "outcome": choice_filter(params, "outcome", OUTCOMES, ""),
        "min_age_h": _decimal(params, "min_age_h"),
        "min_amount": _decimal(params, "min_amount"),
        "max_amount": _decimal(params, "max_amount"),
        "page_token": params.get("page_token", ""),
    }


def _major(case: pb.Case) -> Decimal | None:
    exponent = EXPONENTS.get(case.amount.currency)
    if exponent is None:
        return None
    return Decimal(case.amount.amount_minor).scaleb(-exponent)


def _keep(case: pb.Case, filters: dict[str, Any], now_us: int) -> bool:
    if filters["outcome"] and case.outcome != OUTCOMES[filters["outcome"]]:
        return False
    if filters["min_age_h"] is not None:
        opened_us = case.opened_at.seconds * 1_000_000 + case.opened_at.nanos // 1000
        if Decimal(now_us - opened_us) / Decimal(3_600_000_000) < filters["min_age_h"]:
            return False
    amount = _major(case)
    if filters["min_amount"] is not None and (amount is None or amount < filters["min_amount"]):
        return False
    return not (
        filters["max_amount"] is not None and (amount is None or amount > filters["max_amount"])
    )


def _day_label(us: int) -> str:
    return datetime.datetime.fromtimestamp(us / 1e6, datetime.UTC).strftime("%Y-%m-%d")


async def _overrule(console: Any, tenant: str, days: int) -> dict[str, Any]:
    """The last `days` UTC days (today included) of the tenant's
    human-overrule rate: the chart, a row a day with its counts, the total;
    or why there is none (the queue is still shown)."""
    today = console.clock.now_us() // DAY_US
    start_us, end_us = (today - (days - 1)) * DAY_US, (today + 1) * DAY_US
    try:
        answer = await console.planes.cases().GetOverruleSeries(
            pb.GetOverruleSeriesRequest(
                tenant_id=tenant,
                start_time=wire.timestamp(start_us),
                end_time=wire.timestamp(end_us),
                bucket_seconds=DAY_US // 1_000_000,
            ),
            timeout=console.planes.timeout_s,
        )
    except grpc.aio.AioRpcError as error:
        return {"error": f"{error.code().name}: {error.details() or ''}"}
    rows = [
        {
            "day": _day_label(wire.micros(b.start, "start")),
            "resolved": b.resolved,
            "with_suggestion": b.with_suggestion,
            "overruled": b.overruled,
            "rate": b.overrule_rate if b.with_suggestion else None,
        }
        for b in answer.buckets
    ]
    # A day without a suggested resolution has no rate: no bar, not 0 %.
    chart = share_chart(
        f"Human-overrule rate per day, last {days} days ({tenant})",
        [Share(row["day"][5:], row["overruled"], row["with_suggestion"]) for row in rows],
        y_label="overruled / with a suggestion",
    )
    return {"chart": chart, "rows": rows, "total": answer.total, "error": ""}


def case_path(tenant: str, case_id: str) -> str:
    return f"/cases/{quote(tenant, safe='')}/{quote(case_id, safe='')}"


@requires("cases:read")
async def queue(request: Request, session: Session) -> Response:
    console = console_of(request)
    params = dict(request.query_params)
    try:
        filters = _filters(params)
    except BadFilter as bad:
        return filter_error_page(request, session, bad)
    cases: list[pb.Case] = []
    next_token = ""
    overrule: dict[str, Any] = {}
    if filters["tenant"]:
        try:
            answer = await console.planes.cases().ListCases(
                pb.ListCasesRequest(
                    tenant_id=filters["tenant"],
                    status=STATUSES[filters["status"]],
                    page_size=console.config.console.page_size,
                    page_token=filters["page_token"],
                ),
                timeout=console.planes.timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            return grpc_error_page(request, session, error)
        now = console.clock.now_us()
        cases = [case for case in answer.cases if _keep(case, filters, now)]
        next_token = answer.next_page_token
        overrule = await _overrule(console, filters["tenant"], filters["window_days"])
    next_link = next_page_link("/cases", params, next_token)
    template = "cases/_table.html" if request.headers.get("hx-request") else "cases/list.html"
    return render(
        request,
        session,
        template,
        {
            "filters": filters,
            "params": params,
            "cases": cases,
            "next_link": next_link,
            "statuses": list(STATUSES),
            "outcomes": list(OUTCOMES),
            "windows": OVERRULE_WINDOWS,
            "overrule": overrule,
            "case_path": case_path,
            "pb": pb,
        },
    )


async def _case(console: Any, tenant: str, case_id: str) -> pb.Case:
    answer = await console.planes.cases().GetCase(
        pb.GetCaseRequest(tenant_id=tenant, case_id=case_id), timeout=console.planes.timeout_s
    )
    case: pb.Case = answer.case
    return case


@requires("cases:read")
async def detail(request: Request, session: Session) -> Response:
    console = console_of(request)
    tenant = request.path_params["tenant"]
    case_id = request.path_params["case_id"]
    try:
        case = await _case(console, tenant, case_id)
        decision = await console.planes.policy().GetDecision(
            pb.GetDecisionRequest(
                tenant_id=tenant,
                decision_id=case.decision_id,
                reveal_pii=session.can("pii:read"),
            ),
            timeout=console.planes.timeout_s,
        )
    except grpc.aio.AioRpcError as error:
        return grpc_error_page(request, session, error)
    # A reconciliation adjustment is shown as it was asked (who, which
    # break, why, the transfer): its input's movement is no Evaluate's.
    shown = decision.adjustment if decision.HasField("adjustment") else decision.input
    logged_input = json.dumps(
        MessageToDict(shown, preserving_proto_field_name=True), indent=2, sort_keys=True
    )
    may_resolve = session.can("cases:resolve")
    return render(
        request,
        session,
        "cases/detail.html",
        {
            "case": case,
            "decision": decision.decision,
            "logged_input": logged_input,
            "customer_name_token": decision.customer_name_token,
            "counterparty_name_token": decision.counterparty_name_token,
            "pii_clear": session.can("pii:read"),
            "can_claim": may_resolve and case.status == pb.CASE_STATUS_OPEN,
            "can_resolve": may_resolve
            and case.status == pb.CASE_STATUS_CLAIMED
            and case.assignee == session.username,
            "resolutions": list(RESOLUTIONS),
            "path": case_path(tenant, case_id),
            "pb": pb,
        },
    )


def case_state(case: pb.Case) -> dict[str, Any]:
    """What the audit log keeps of a case, before and after an action."""
    return {
        "status": pb.CaseStatus.Name(case.status),
        "assignee": case.assignee,
        "resolution": pb.Resolution.Name(case.resolution),
        "note": case.note,
    }


@requires("cases:resolve")
async def claim(request: Request, session: Session) -> Response:
    console = console_of(request)
    tenant = request.path_params["tenant"]
    case_id = request.path_params["case_id"]
    target = f"case:{tenant}/{case_id}"

    async def change(before: dict[str, Any]) -> dict[str, Any]:
        before.update(case_state(await _case(console, tenant, case_id)))
        answer = await console.planes.cases().ClaimCase(
            pb.ClaimCaseRequest(tenant_id=tenant, case_id=case_id, reviewer=session.username),
            timeout=console.planes.timeout_s,
        )
        return case_state(answer.case)

    return await audited(
        request, session, "case.claim", target, change, redirect_to=case_path(tenant, case_id)
    )


@requires("cases:resolve")
async def resolve(request: Request, session: Session) -> Response:
    console = console_of(request)
    tenant = request.path_params["tenant"]
    case_id = request.path_params["case_id"]
    target = f"case:{tenant}/{case_id}"
    form = await request.form()
    resolution = str(form.get("resolution", ""))
    note = str(form.get("note", "")).strip()
    if resolution not in RESOLUTIONS:
        return error_page(
            request,
            session,
            400,
            "RESOLUTION_INVALID",
            f"resolution must be one of {', '.join(RESOLUTIONS)}",
            "resolution",
        )
    if not note:
        return error_page(
            request, session, 400, "NOTE_REQUIRED", "Say why: a reason is required.", "note"
        )

    async def change(before: dict[str, Any]) -> dict[str, Any]:
        before.update(case_state(await _case(console, tenant, case_id)))
        answer = await console.planes.cases().ResolveCase(
            pb.ResolveCaseRequest(
                tenant_id=tenant,
                case_id=case_id,
                reviewer=session.username,
                resolution=RESOLUTIONS[resolution],
                note=note,
            ),
            timeout=console.planes.timeout_s,
        )
        return case_state(answer.case)

    return await audited(
        request, session, "case.resolve", target, change, redirect_to=case_path(tenant, case_id)
    )


PAGE = Page(
    label="Cases",
    path="/cases",
    permission="cases:read",
    order=10,
    routes=[
        Route("/cases", queue, methods=["GET"]),
        Route("/cases/{tenant}/{case_id}", detail, methods=["GET"]),
        Route("/cases/{tenant}/{case_id}/claim", claim, methods=["POST"]),
        Route("/cases/{tenant}/{case_id}/resolve", resolve, methods=["POST"]),
    ],
)
