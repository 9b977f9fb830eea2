"""Reconciliation (money plane ReconciliationService): a tenant's breaks by
class, state, SLA tier and age, overdue first; one break with the statement
line and the expected payment it concerns and its owner; resolving it (a
manual match, a write-off, a reversal, or accepted as is) with a reason,
finance operators only (`money:write`), the signed-in operator recorded by
the plane as the actor; the imported statements, one statement's lines and
what each matched, and importing a statement file. Every resolution and
import is audited with the break or import before and after.

A write-off or a reversal posts a ledger transfer, and the money plane posts
it only under a decision token the policy plane signed for exactly that
transfer (architecture rule 1). The page asks the policy plane for it
(PolicyService.DecideAdjustment, with the transfer ResolveBreak will post,
as the money plane describes it: ReconciliationService.DescribeResolution):
an allow's token resolves the break at once; a review shows "waiting for a
second approver" with the case, which another operator approves on the Cases
page (the requester cannot); then this page applies the resolution with the
approval's token. A denial is shown with its reason. Every step is audited.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote, urlencode

import grpc
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from console import audit
from console.actions import (
    BadFilter,
    audited,
    filter_error_page,
    next_page_link,
    tenant_filter,
)
from console.app import console_of, error_page, grpc_error_page, render
from console.auth import Session, requires
from console.pages import Page
from triplane.money.v1 import recon_pb2 as pb
from triplane.policy.v1 import policy_pb2

# recon.proto's ReconBreak.break_class values.
CLASSES = (
    "unmatched_bank",
    "unmatched_ledger",
    "amount_mismatch",
    "duplicate",
    "returned",
    "late",
    "balance_mismatch",
    "booked_after_cancel",
)
STATES = {"open": "open", "resolved": "resolved", "all": ""}
# ResolveBreakRequest.resolution values, and what each needs besides a reason.
RESOLUTIONS = ("manual_match", "write_off", "reversal", "accepted")
# Those that post a ledger transfer: decided by the policy plane first.
ADJUSTMENTS = frozenset({"write_off", "reversal"})
MAX_CASE_ID_LENGTH = 128
MAX_FIELD_LENGTH = 256
MAX_NOTE_LENGTH = 2000
# A statement file bigger than this is refused before it is sent.
MAX_STATEMENT_BYTES = 8 * 1024 * 1024
HOUR_S = 3600


class BadInput(ValueError):
    def __init__(self, field: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason


def _filters(params: dict[str, str], tiers: list[str]) -> dict[str, Any]:
    state = params.get("state", "open") or "open"
    if state not in STATES:
        raise BadInput("state", "FILTER_INVALID", f"state must be one of {', '.join(STATES)}")
    break_class = params.get("break_class", "")
    if break_class and break_class not in CLASSES:
        raise BadInput(
            "break_class", "FILTER_INVALID", f"break_class must be one of {', '.join(CLASSES)}"
        )
    tier = params.get("tier", "")
    if tier and tier not in tiers:
        raise BadInput("tier", "FILTER_INVALID", f"tier must be one of {', '.join(tiers)}")
    min_age_h: Decimal | None = None
    raw_age = params.get("min_age_h", "").strip()
    if raw_age:
        try:
            min_age_h = Decimal(raw_age)
        except InvalidOperation:
            raise BadInput("min_age_h", "FILTER_INVALID", "min_age_h must be a number") from None
        if not min_age_h.is_finite() or min_age_h < 0:
            raise BadInput("min_age_h", "FILTER_INVALID", "min_age_h must be a number >= 0")
    return {
        "tenant": tenant_filter(params),
        "state": state,
        "break_class": break_class,
        "tier": tier,
        "overdue": params.get("overdue", "") == "1",
        "min_age_h": min_age_h,
        "page_token": params.get("page_token", ""),
    }


def _keep(b: pb.ReconBreak, filters: dict[str, Any]) -> bool:
    if filters["tier"] and b.sla_tier != filters["tier"]:
        return False
    if filters["overdue"] and not b.overdue:
        return False
    return not (
        filters["min_age_h"] is not None and Decimal(b.age_seconds) / HOUR_S < filters["min_age_h"]
    )


def _urgency(b: pb.ReconBreak) -> tuple[bool, int, str]:
    """Overdue first, then oldest first (the plane pages oldest first)."""
    return (not b.overdue, -b.age_seconds, b.break_id)


def break_path(tenant: str, break_id: str) -> str:
    return f"/recon/{quote(tenant, safe='')}/breaks/{quote(break_id, safe='')}"


def statement_path(tenant: str, statement_id: str) -> str:
    return f"/recon/{quote(tenant, safe='')}/statements/{quote(statement_id, safe='')}"


def _age(seconds: int) -> str:
    if seconds < HOUR_S:
        return f"{seconds // 60} min"
    if seconds < 48 * HOUR_S:
        return f"{seconds / HOUR_S:.1f} h"
    return f"{seconds / (24 * HOUR_S):.1f} d"


def _tiers(request: Request) -> list[str]:
    return [tier.name for tier in console_of(request).config.money.recon.sla_tiers]


@requires("money:read")
async def breaks(request: Request, session: Session) -> Response:
    console = console_of(request)
    params = dict(request.query_params)
    tiers = _tiers(request)
    try:
        filters = _filters(params, tiers)
    except BadFilter as bad:
        return filter_error_page(request, session, bad)
    except BadInput as bad:
        return error_page(request, session, 400, bad.reason, str(bad), bad.field)
    found: list[pb.ReconBreak] = []
    next_token = ""
    if filters["tenant"]:
        try:
            answer = await console.planes.recon().ListBreaks(
                pb.ListBreaksRequest(
                    tenant_id=filters["tenant"],
                    state=STATES[filters["state"]],
                    break_class=filters["break_class"],
                    page_size=console.config.console.page_size,
                    page_token=filters["page_token"],
                    # Oldest first across pages; overdue first within each.
                    order="oldest",
                ),
                timeout=console.planes.timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            return grpc_error_page(request, session, error)
        found = sorted((b for b in answer.breaks if _keep(b, filters)), key=_urgency)
        next_token = answer.next_page_token
    next_link = next_page_link("/recon", params, next_token)
    template = "recon/_breaks.html" if request.headers.get("hx-request") else "recon/breaks.html"
    return render(
        request,
        session,
        template,
        {
            "filters": filters,
            "params": params,
            "breaks": found,
            "next_link": next_link,
            "states": list(STATES),
            "classes": CLASSES,
            "tiers": tiers,
            "break_path": break_path,
            "statement_path": statement_path,
            "age": _age,
        },
    )


async def _break(console: Any, tenant: str, break_id: str) -> pb.GetBreakResponse:
    answer: pb.GetBreakResponse = await console.planes.recon().GetBreak(
        pb.GetBreakRequest(tenant_id=tenant, break_id=break_id), timeout=console.planes.timeout_s
    )
    return answer


@requires("money:read")
async def break_detail(request: Request, session: Session) -> Response:
    console = console_of(request)
    tenant = request.path_params["tenant"]
    break_id = request.path_params["break_id"]
    try:
        answer = await _break(console, tenant, break_id)
    except grpc.aio.AioRpcError as error:
        return grpc_error_page(request, session, error)
    found = answer.recon_break
    return render(
        request,
        session,
        "recon/break.html",
        {
            "tenant": tenant,
            "b": found,
            "line": answer.line if answer.HasField("line") else None,
            "expected": answer.expected_payment if answer.HasField("expected_payment") else None,
            "can_resolve": session.can("money:write") and found.state == "open",
            "resolutions": RESOLUTIONS,
            # Back from "waiting for a second approver": the case to apply.
            "case_id": request.query_params.get("case", "")[:MAX_CASE_ID_LENGTH],
            "path": break_path(tenant, break_id),
            "statement_path": statement_path,
            "age": _age,
        },
    )


def break_state(b: pb.ReconBreak) -> dict[str, Any]:
    """What the audit log keeps of a break, before and after a resolution."""
    return {
        "state": b.state,
        "break_class": b.break_class,
        "resolution": b.resolution,
        "resolved_by": b.resolved_by,
        "resolution_entry_id": b.resolution_entry_id,
        "note": b.note,
    }


def _field(form: Any, name: str, limit: int = MAX_FIELD_LENGTH) -> str:
    value = form.get(name, "")
    text = value.strip() if isinstance(value, str) else ""
    if len(text) > limit:
        raise BadInput(name, "FIELD_TOO_LONG", f"{name} is longer than {limit} characters")
    return text


def _resolution(form: Any) -> pb.ResolveBreakRequest:
    """The form's resolution, checked before anything is sent."""
    resolution = _field(form, "resolution")
    if resolution not in RESOLUTIONS:
        raise BadInput(
            "resolution",
            "RESOLUTION_INVALID",
            f"resolution must be one of {', '.join(RESOLUTIONS)}",
        )
    note = _field(form, "note", MAX_NOTE_LENGTH)
    if not note:
        raise BadInput("note", "NOTE_REQUIRED", "Say why: a reason is required.")
    entry_id = _field(form, "entry_id")
    if resolution == "reversal" and not entry_id:
        raise BadInput(
            "entry_id", "FIELD_REQUIRED", "A reversal names the ledger entry it reverses."
        )
    return pb.ResolveBreakRequest(
        resolution=resolution,
        note=note,
        expected_id=_field(form, "expected_id"),
        entry_id=entry_id,
    )


async def _adjustment_request(
    console: Any, tenant: str, b: pb.ReconBreak, wanted: pb.ResolveBreakRequest, actor: str
) -> policy_pb2.DecideAdjustmentRequest:
    """The decision request for the transfer ResolveBreak will post, as the
    money plane computes it (ReconciliationService.DescribeResolution): the
    page holds no copy of the plane's accounts or keys, so the policy plane
    decides exactly the transfer the ledger is later asked to post."""
    transfer = await console.planes.recon().DescribeResolution(
        pb.DescribeResolutionRequest(
            tenant_id=tenant,
            break_id=b.break_id,
            resolution=wanted.resolution,
            entry_id=wanted.entry_id,
        ),
        timeout=console.planes.timeout_s,
    )
    # The same request (operator, break, resolution, reason) is the same
    # decision on a retry; another reason is another request.
    digest = hashlib.sha256(
        "\0".join([b.break_id, wanted.resolution, actor, wanted.note, wanted.entry_id]).encode()
    ).hexdigest()[:32]
    return policy_pb2.DecideAdjustmentRequest(
        tenant_id=tenant,
        idempotency_key=f"adj-{digest}",
        resolution=wanted.resolution,
        break_id=b.break_id,
        requested_by=actor,
        reason=wanted.note,
        debit_account_id=transfer.debit_account_id,
        credit_account_id=transfer.credit_account_id,
        amount=transfer.amount,
        ledger_idempotency_key=transfer.idempotency_key,
        reverses_entry_id=transfer.reverses_entry_id,
    )


def _decision_state(decision: policy_pb2.Decision) -> dict[str, Any]:
    return {
        "decision_id": decision.decision_id,
        "outcome": policy_pb2.Outcome.Name(decision.outcome),
        "reason_codes": [f.reason_code for f in decision.fired_rules],
        "case_id": decision.case_id,
    }


@requires("money:write")
async def resolve(request: Request, session: Session) -> Response:
    console = console_of(request)
    tenant = request.path_params["tenant"]
    break_id = request.path_params["break_id"]
    target = f"break:{tenant}/{break_id}"
    try:
        wanted = _resolution(await request.form())
    except BadInput as bad:
        return error_page(request, session, 400, bad.reason, str(bad), bad.field)
    wanted.tenant_id = tenant
    wanted.break_id = break_id
    # The plane records who resolved it: the operator signed in here.
    wanted.actor = session.username
    asked = {"resolution": wanted.resolution, "expected_id": wanted.expected_id}
    before: dict[str, Any] = {}
    try:
        current = (await _break(console, tenant, break_id)).recon_break
        before = break_state(current)
        if wanted.resolution in ADJUSTMENTS and current.state == "open":
            decided = await _decide(request, session, tenant, current, wanted)
            if isinstance(decided, Response):
                return decided
            wanted.decision_token = decided
        answer = await console.planes.recon().ResolveBreak(wanted, timeout=console.planes.timeout_s)
    except grpc.aio.AioRpcError as error:
        await audit.record(
            request,
            session,
            "break.resolve",
            target,
            "failed",
            before=before,
            after={**asked, "code": error.code().name, "details": error.details() or ""},
        )
        return grpc_error_page(request, session, error)
    await audit.record(
        request,
        session,
        "break.resolve",
        target,
        "ok",
        before=before,
        after=break_state(answer.recon_break),
    )
    return RedirectResponse(break_path(tenant, break_id), 303)


async def _decide(
    request: Request,
    session: Session,
    tenant: str,
    b: pb.ReconBreak,
    wanted: pb.ResolveBreakRequest,
) -> str | Response:
    """The policy plane's decision on the adjustment: its token when
    allowed; otherwise the page that says why (denied) or what is awaited
    (review: the case another operator must approve). Audited either way."""
    console = console_of(request)
    target = f"break:{tenant}/{b.break_id}"
    asked = await _adjustment_request(console, tenant, b, wanted, session.username)
    try:
        answer = await console.planes.policy().DecideAdjustment(
            asked, timeout=console.planes.timeout_s
        )
    except grpc.aio.AioRpcError as error:
        await audit.record(
            request,
            session,
            "break.adjustment.decide",
            target,
            "failed",
            before={"resolution": wanted.resolution, "amount_minor": asked.amount.amount_minor},
            after={"code": error.code().name, "details": error.details() or ""},
        )
        return grpc_error_page(request, session, error)
    decision = answer.decision
    outcome = policy_pb2.Outcome.Name(decision.outcome).removeprefix("OUTCOME_").lower()
    await audit.record(
        request,
        session,
        "break.adjustment.decide",
        target,
        outcome,
        before={"resolution": wanted.resolution, "amount_minor": asked.amount.amount_minor},
        after=_decision_state(decision),
    )
    if decision.outcome == policy_pb2.OUTCOME_ALLOW:
        token: str = decision.decision_token
        return token
    if decision.outcome in (policy_pb2.OUTCOME_REVIEW, policy_pb2.OUTCOME_HOLD):
        return render(
            request,
            session,
            "recon/awaiting.html",
            {
                "tenant": tenant,
                "b": b,
                "wanted": wanted,
                "decision": decision,
                "case_path": f"/cases/{quote(tenant, safe='')}/{quote(decision.case_id, safe='')}",
                "apply_path": f"{break_path(tenant, b.break_id)}/apply",
            },
            status=202,
        )
    reasons = "; ".join(f.reason for f in decision.fired_rules) or "The policy refused it."
    code = decision.fired_rules[0].reason_code if decision.fired_rules else "ADJUSTMENT_DENIED"
    return error_page(request, session, 403, code, reasons, "note")


@requires("money:write")
async def apply_approved(request: Request, session: Session) -> Response:
    """Applies a reviewed adjustment once its case is approved: the case's
    approval decision carries the token for exactly the transfer the first
    decision named, which must be this break's."""
    console = console_of(request)
    tenant = request.path_params["tenant"]
    break_id = request.path_params["break_id"]
    target = f"break:{tenant}/{break_id}"
    form = await request.form()
    try:
        case_id = _field(form, "case_id", MAX_CASE_ID_LENGTH)
        if not case_id:
            raise BadInput("case_id", "FIELD_REQUIRED", "Name the approved case.")
    except BadInput as bad:
        return error_page(request, session, 400, bad.reason, str(bad), bad.field)
    policy, timeout = console.planes.policy(), console.planes.timeout_s
    before: dict[str, Any] = {}
    try:
        current = (await _break(console, tenant, break_id)).recon_break
        before = break_state(current)
        case = (
            await console.planes.cases().GetCase(
                policy_pb2.GetCaseRequest(tenant_id=tenant, case_id=case_id), timeout=timeout
            )
        ).case
        reviewed = await policy.GetDecision(
            policy_pb2.GetDecisionRequest(tenant_id=tenant, decision_id=case.decision_id),
            timeout=timeout,
        )
        asked = reviewed.adjustment
        refusal = None
        if not reviewed.HasField("adjustment") or asked.break_id != break_id:
            refusal = (
                400,
                "CASE_NOT_FOR_BREAK",
                f"case {case_id} is not an adjustment of break {break_id}",
            )
        elif case.status != policy_pb2.CASE_STATUS_RESOLVED or not case.approval_decision_id:
            refusal = (
                409,
                "CASE_NOT_APPROVED",
                f"case {case_id} waits for a second approver (or was declined)",
            )
        if refusal is not None:
            status, reason, message = refusal
            await audit.record(
                request,
                session,
                "break.resolve",
                target,
                "refused",
                before=before,
                after={"case_id": case_id, "reason": reason},
            )
            return error_page(request, session, status, reason, message, "case_id")
        approval = await policy.GetDecision(
            policy_pb2.GetDecisionRequest(tenant_id=tenant, decision_id=case.approval_decision_id),
            timeout=timeout,
        )
        answer = await console.planes.recon().ResolveBreak(
            pb.ResolveBreakRequest(
                tenant_id=tenant,
                break_id=break_id,
                resolution=asked.resolution,
                actor=session.username,
                note=asked.reason,
                entry_id=asked.reverses_entry_id,
                decision_token=approval.decision.decision_token,
            ),
            timeout=timeout,
        )
    except grpc.aio.AioRpcError as error:
        await audit.record(
            request,
            session,
            "break.resolve",
            target,
            "failed",
            before=before,
            after={"case_id": case_id, "code": error.code().name, "details": error.details() or ""},
        )
        return grpc_error_page(request, session, error)
    await audit.record(
        request,
        session,
        "break.resolve",
        target,
        "ok",
        before=before,
        after={**break_state(answer.recon_break), "case_id": case_id},
    )
    return RedirectResponse(break_path(tenant, break_id), 303)


@requires("money:read")
async def statements(request: Request, session: Session) -> Response:
    console = console_of(request)
    params = dict(request.query_params)
    try:
        tenant = tenant_filter(params)
    except BadFilter as bad:
        return filter_error_page(request, session, bad)
    found: list[pb.ReconStatement] = []
    next_link = ""
    if tenant:
        try:
            answer = await console.planes.recon().ListStatements(
                pb.ListStatementsRequest(
                    tenant_id=tenant,
                    page_size=console.config.console.page_size,
                    page_token=params.get("page_token", ""),
                ),
                timeout=console.planes.timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            return grpc_error_page(request, session, error)
        found = list(answer.statements)
        next_link = next_page_link("/recon/statements", {"tenant": tenant}, answer.next_page_token)
    return render(
        request,
        session,
        "recon/statements.html",
        {
            "tenant": tenant,
            "statements": found,
            "next_link": next_link,
            "statement_path": statement_path,
            "can_import": session.can("money:write"),
        },
    )


@requires("money:read")
async def statement_detail(request: Request, session: Session) -> Response:
    console = console_of(request)
    tenant = request.path_params["tenant"]
    statement_id = request.path_params["statement_id"]
    try:
        answer = await console.planes.recon().GetStatement(
            pb.GetStatementRequest(tenant_id=tenant, statement_id=statement_id),
            timeout=console.planes.timeout_s,
        )
    except grpc.aio.AioRpcError as error:
        return grpc_error_page(request, session, error)
    return render(
        request,
        session,
        "recon/statement.html",
        {
            "tenant": tenant,
            "statement": answer.statement,
            "lines": answer.lines,
            "breaks_link": "/recon?" + urlencode({"tenant": tenant, "state": "open"}),
        },
    )


@requires("money:write")
async def import_statement(request: Request, session: Session) -> Response:
    console = console_of(request)
    form = await request.form()
    try:
        tenant = tenant_filter({"tenant": _field(form, "tenant")})
        if not tenant:
            raise BadInput("tenant", "FIELD_REQUIRED", "name the tenant")
        account = _field(form, "ledger_account_id")
        if not account:
            raise BadInput("ledger_account_id", "FIELD_REQUIRED", "name the ledger's bank account")
        upload = form.get("statement")
        if not isinstance(upload, UploadFile) or not upload.filename:
            raise BadInput("statement", "FIELD_REQUIRED", "choose a statement file")
        content = await upload.read(MAX_STATEMENT_BYTES + 1)
        if len(content) > MAX_STATEMENT_BYTES:
            raise BadInput(
                "statement", "STATEMENT_TOO_LARGE", f"the file is over {MAX_STATEMENT_BYTES} bytes"
            )
    except BadFilter as bad:
        return filter_error_page(request, session, bad)
    except BadInput as bad:
        return error_page(request, session, 400, bad.reason, str(bad), bad.field)
    target = f"statement:{tenant}/{account}"

    async def send(_: dict[str, Any]) -> dict[str, Any]:
        answer = await console.planes.recon().ImportStatement(
            pb.ImportStatementRequest(
                tenant_id=tenant,
                ledger_account_id=account,
                content=content,
                actor=session.username,
            ),
            timeout=console.planes.timeout_s,
        )
        return {
            "statements": [s.statement_id for s in answer.statements],
            "duplicate_file": answer.duplicate_file,
            "lines_read": answer.lines_read,
            "lines_new": answer.lines_new,
            "matches": len(answer.matches),
            "breaks": [b.break_id for b in answer.breaks],
        }

    return await audited(
        request,
        session,
        "statement.import",
        target,
        send,
        redirect_to=lambda after: imported_path(tenant, after["statements"]),
        before={"file": upload.filename, "bytes": len(content)},
    )


def imported_path(tenant: str, statement_ids: list[str]) -> str:
    """Where an import lands: its statement, or the tenant's statements
    when the file held several (or none new)."""
    if len(statement_ids) == 1:
        return statement_path(tenant, statement_ids[0])
    return "/recon/statements?" + urlencode({"tenant": tenant})


PAGE = Page(
    label="Reconciliation",
    path="/recon",
    permission="money:read",
    order=30,
    routes=[
        Route("/recon", breaks, methods=["GET"]),
        Route("/recon/statements", statements, methods=["GET"]),
        Route("/recon/statements/import", import_statement, methods=["POST"]),
        Route("/recon/{tenant}/breaks/{break_id}", break_detail, methods=["GET"]),
        Route("/recon/{tenant}/breaks/{break_id}/resolve", resolve, methods=["POST"]),
        Route("/recon/{tenant}/breaks/{break_id}/apply", apply_approved, methods=["POST"]),
        Route("/recon/{tenant}/statements/{statement_id}", statement_detail, methods=["GET"]),
    ],
)
