"""Decisions (policy plane PolicyService): search a tenant's decision log by
decision id, customer (the platform's customer id or the name token an
operator without pii:read sees), account and time window (ListDecisions,
newest first, paged); one decision explained: its fired rules and reasons,
the bundle version, the model that scored it and the numeric inputs the rules
saw as bars (SVG), and the decision token's claims; and a replay of that
decision under another bundle version (ReplayDecisions over the decision's
own instant and account: read-only, audited).

Who: every role but finance_operator reads (`decisions:read`); risk_admin,
sre and auditor may replay (`decisions:replay`). Names are in clear only for
`pii:read`; everyone else sees their tokens.
"""

from __future__ import annotations

import base64
import datetime
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp
from markupsafe import Markup, escape
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from console import audit
from console.actions import BadFilter, filter_error_page, next_page_link, text_filter
from console.app import console_of, error_page, grpc_error_page, render
from console.auth import Session, requires
from console.pages import Page
from triplane.ai.v1 import ai_pb2
from triplane.policy.v1 import policy_pb2 as pb
from triplane.runtime import codec as wire
from triplane.runtime.status import parse_rpc_error

MAX_FILTER_LENGTH = 128
BAR_WIDTH = 640
BAR_ROW = 24
BAR_LABEL = 200
# Attributions asked of the AI plane (largest contribution first).
TOP_K = 8


def utc_timestamp(raw: str) -> Timestamp | None:
    """A time typed in a form (a datetime-local field's 2026-12-06T14:00, with
    seconds or not, or a date), read as UTC unless it names its offset; None
    when it is not one. The Ledger page reads its "as of" with it too."""
    try:
        moment = datetime.datetime.fromisoformat(raw)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _time(params: dict[str, str], name: str) -> Timestamp | None:
    raw = params.get(name, "").strip()
    if not raw:
        return None
    stamp = utc_timestamp(raw)
    if stamp is None:
        raise BadFilter(name, f"{name} must be a UTC time like 2026-12-06T14:00")
    return stamp


def _filters(params: dict[str, str]) -> dict[str, Any]:
    found: dict[str, Any] = {
        name: text_filter(params, name, MAX_FILTER_LENGTH)
        for name in ("tenant", "decision_id", "customer", "account_id")
    }
    found["page_token"] = params.get("page_token", "").strip()
    found["start"] = _time(params, "start")
    found["end"] = _time(params, "end")
    return found


def decision_path(tenant: str, decision_id: str) -> str:
    return f"/decisions/{quote(tenant, safe='')}/{quote(decision_id, safe='')}"


def _name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def outcome_name(value: int) -> str:
    return _name(pb.Outcome, value, "OUTCOME_")


@requires("decisions:read")
async def search(request: Request, session: Session) -> Response:
    console = console_of(request)
    params = dict(request.query_params)
    try:
        filters = _filters(params)
    except BadFilter as bad:
        return filter_error_page(request, session, bad)
    decisions: list[pb.ListedDecision] = []
    next_link = ""
    if filters["tenant"]:
        query = pb.ListDecisionsRequest(
            tenant_id=filters["tenant"],
            decision_id=filters["decision_id"],
            customer=filters["customer"],
            account_id=filters["account_id"],
            page_size=console.config.console.page_size,
            page_token=filters["page_token"],
        )
        if filters["start"] is not None:
            query.start_time.CopyFrom(filters["start"])
        if filters["end"] is not None:
            query.end_time.CopyFrom(filters["end"])
        try:
            answer = await console.planes.policy().ListDecisions(
                query, timeout=console.planes.timeout_s
            )
        except grpc.aio.AioRpcError as error:
            return grpc_error_page(request, session, error)
        decisions = list(answer.decisions)
        next_link = next_page_link("/decisions", params, answer.next_page_token)
    template = (
        "decisions/_table.html" if request.headers.get("hx-request") else "decisions/list.html"
    )
    return render(
        request,
        session,
        template,
        {
            "filters": filters,
            "params": params,
            "decisions": decisions,
            "next_link": next_link,
            "decision_path": decision_path,
            "outcome_name": outcome_name,
        },
    )


def token_claims(token: str) -> dict[str, Any]:
    """The claims of a decision token (its JWS payload), for reading: the
    money plane verifies the signature, the console only shows what it binds."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (ValueError, json.JSONDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def bars(title: str, values: list[tuple[str, float]], scale: float = 0.0) -> Markup:
    """Signed horizontal bars from a zero line, one row a value, as inline
    SVG with a <title> and <desc>; the page lists the same figures in a table.
    `scale`: the value a full bar stands for (0: the largest magnitude)."""
    if not values:
        return Markup("")
    height = BAR_ROW * len(values) + 8
    span = scale or max(abs(v) for _, v in values) or 1.0
    half = (BAR_WIDTH - BAR_LABEL - 16) / 2
    zero = BAR_LABEL + half
    desc = "; ".join(f"{label} {value:.4g}" for label, value in values)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {BAR_WIDTH} {height}" '
        f'width="{BAR_WIDTH}" height="{height}" role="img" class="chart">',
        f"<title>{escape(title)}</title><desc>{escape(desc)}</desc>",
        f'<line x1="{zero:.1f}" y1="0" x2="{zero:.1f}" y2="{height}" stroke="#57606a"/>',
    ]
    for index, (label, value) in enumerate(values):
        y = 4 + index * BAR_ROW
        length = abs(value) / span * half
        x = zero if value >= 0 else zero - length
        colour = "#0a58ca" if value >= 0 else "#b42318"
        out.append(
            f'<text x="{BAR_LABEL - 8}" y="{y + 15}" text-anchor="end" font-size="12">'
            f"{escape(label)}</text>"
            f'<rect x="{x:.1f}" y="{y + 3}" width="{max(length, 1):.1f}" height="{BAR_ROW - 8}"'
            f' fill="{colour}"><title>{escape(label)}: {value:.4g}</title></rect>'
        )
    out.append("</svg>")
    return Markup("".join(out))


async def _listed(console: Any, tenant: str, decision_id: str) -> pb.ListedDecision | None:
    answer = await console.planes.policy().ListDecisions(
        pb.ListDecisionsRequest(tenant_id=tenant, decision_id=decision_id),
        timeout=console.planes.timeout_s,
    )
    return answer.decisions[0] if answer.decisions else None


@requires("decisions:read")
async def detail(request: Request, session: Session) -> Response:
    console = console_of(request)
    tenant = request.path_params["tenant"]
    decision_id = request.path_params["decision_id"]
    try:
        answer = await console.planes.policy().GetDecision(
            pb.GetDecisionRequest(
                tenant_id=tenant, decision_id=decision_id, reveal_pii=session.can("pii:read")
            ),
            timeout=console.planes.timeout_s,
        )
        listed = await _listed(console, tenant, decision_id)
    except grpc.aio.AioRpcError as error:
        return grpc_error_page(request, session, error)
    explained = await _attributions(console, answer)
    return _render_detail(request, session, answer, listed, explained, replay=None)


@dataclass(frozen=True)
class Explained:
    """The AI plane's attributions of the decision's score (Explain), or why
    there are none."""

    attributions: list[tuple[str, float, float]] = field(default_factory=list)
    unavailable: str = ""


async def _attributions(console: Any, answer: pb.GetDecisionResponse) -> Explained:
    """Each feature's contribution to the score the decision was made with
    (by its score_id). The decision stands without them: an AI plane that
    does not answer, or no longer holds the score, is said, not an error."""
    score = answer.input.snapshot.model_score
    if not score.score_id or score.source in ("", "none"):
        return Explained()
    try:
        explained = await console.planes.scoring().Explain(
            ai_pb2.ExplainRequest(
                tenant_id=answer.decision.tenant_id, score_id=score.score_id, top_k=TOP_K
            ),
            timeout=console.planes.timeout_s,
        )
    except grpc.aio.AioRpcError as error:
        reason, _ = parse_rpc_error(error)
        return Explained(unavailable=reason or error.code().name)
    return Explained(
        attributions=[(a.feature, a.value, a.contribution) for a in explained.attributions]
    )


def _render_detail(
    request: Request,
    session: Session,
    answer: pb.GetDecisionResponse,
    listed: pb.ListedDecision | None,
    explained: Explained,
    replay: dict[str, Any] | None,
    status: int = 200,
) -> Response:
    decision = answer.decision
    snapshot = answer.input.snapshot
    inputs = sorted(snapshot.features.items())
    score = snapshot.model_score
    # A score to draw only when one was had (source "none": the AI plane
    # gave none and the rules saw no score).
    had_score = bool(score.model) and score.source not in ("", "none")
    scored = [(f"{score.model} v{score.version}", score.score)] if had_score else []
    logged_input = json.dumps(
        MessageToDict(answer.input, preserving_proto_field_name=True), indent=2, sort_keys=True
    )
    return render(
        request,
        session,
        "decisions/detail.html",
        {
            "decision": decision,
            "listed": listed,
            "score": score,
            "had_score": had_score,
            # A score is a probability: a full bar is 1.
            "score_chart": bars("Model score", scored, scale=1.0),
            "explained": explained,
            "attribution_chart": bars(
                "Feature contributions to the score (log-odds)",
                [(name, contribution) for name, _, contribution in explained.attributions],
            ),
            "inputs": inputs,
            "inputs_chart": bars("Numeric inputs the rules saw", inputs),
            "claims": sorted(token_claims(decision.decision_token).items()),
            "logged_input": logged_input,
            "customer_name_token": answer.customer_name_token,
            "pii_clear": session.can("pii:read"),
            "can_replay": session.can("decisions:replay") and listed is not None,
            "replay": replay,
            "path": decision_path(decision.tenant_id, decision.decision_id),
            "outcome_name": outcome_name,
        },
        status=status,
    )


@requires("decisions:replay")
async def replay(request: Request, session: Session) -> Response:
    """The decision replayed under another bundle version (or its own: a
    determinism check). Read-only; audited as `decision.replay`."""
    console = console_of(request)
    tenant = request.path_params["tenant"]
    decision_id = request.path_params["decision_id"]
    version = request.query_params.get("bundle_version", "").strip()
    if len(version) > MAX_FILTER_LENGTH:
        return error_page(
            request, session, 400, "FILTER_INVALID", "bundle_version is too long", "bundle_version"
        )
    target = f"decision:{tenant}/{decision_id}"
    try:
        answer = await console.planes.policy().GetDecision(
            pb.GetDecisionRequest(
                tenant_id=tenant, decision_id=decision_id, reveal_pii=session.can("pii:read")
            ),
            timeout=console.planes.timeout_s,
        )
        listed = await _listed(console, tenant, decision_id)
        if listed is None:
            return error_page(
                request, session, 404, "DECISION_NOT_FOUND", "No such decision.", "decision_id"
            )
        # The decision's own instant and account: the window holds it (and
        # whatever else the account decided in that microsecond).
        start = listed.recorded_at
        end = wire.timestamp(wire.micros(start, "recorded_at") + 1)
        report = await console.planes.policy().ReplayDecisions(
            pb.ReplayDecisionsRequest(
                tenant_id=tenant,
                account_id=listed.decision.account_id,
                start_time=start,
                end_time=end,
                bundle_version=version,
            ),
            timeout=console.planes.timeout_s,
        )
    except grpc.aio.AioRpcError as error:
        await audit.record(
            request,
            session,
            "decision.replay",
            target,
            "failed",
            before={"bundle_version": version},
            after={"code": error.code().name, "details": error.details() or ""},
        )
        return grpc_error_page(request, session, error)
    logged = answer.decision
    changed = next((c for c in report.changed_decisions if c.decision_id == decision_id), None)
    result = {
        "bundle_version": version or logged.bundle_version,
        "replayed": report.decisions_replayed,
        "changed": changed is not None,
        "outcome": outcome_name(changed.replayed_outcome if changed else logged.outcome),
        "reason_codes": list(changed.replayed_reason_codes)
        if changed
        else [r.reason_code for r in logged.fired_rules],
    }
    await audit.record(
        request,
        session,
        "decision.replay",
        target,
        "ok",
        before={
            "bundle_version": logged.bundle_version,
            "outcome": outcome_name(logged.outcome),
        },
        after={
            "bundle_version": result["bundle_version"],
            "outcome": result["outcome"],
            "changed": result["changed"],
        },
    )
    explained = await _attributions(console, answer)
    return _render_detail(request, session, answer, listed, explained, replay=result)


PAGE = Page(
    label="Decisions",
    path="/decisions",
    permission="decisions:read",
    order=20,
    routes=[
        Route("/decisions", search, methods=["GET"]),
        Route("/decisions/{tenant}/{decision_id}", detail, methods=["GET"]),
        Route("/decisions/{tenant}/{decision_id}/replay", replay, methods=["GET"]),
    ],
)
