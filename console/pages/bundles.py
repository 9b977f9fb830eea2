"""Bundles (policy plane BundleService): the live and shadow bundles, every
stored version, a unified diff of two versions' sources (computed by the plane,
DiffBundles), a tenant's shadow agreement (GetPolicyMetrics), and, for a
risk_admin (`bundles:activate`), activating a version or setting the shadow.
Each switch needs a reason: the console sends the signed-in operator and the
reason with the RPC (actor, reason), the policy plane records them in the
bundle's slot history (its approvals, shown beside each stored version), and
the audit log keeps them too with the live and shadow versions before and
after."""

from __future__ import annotations

from typing import Any

import grpc
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from console.actions import audited, next_page_link
from console.app import console_of, error_page, grpc_error_page, render
from console.auth import Session, requires
from console.pages import Page
from triplane.policy.v1 import policy_pb2 as pb

MAX_FIELD_LENGTH = 256
MAX_REASON_LENGTH = 2_000


def _slots(active: pb.GetActiveBundleResponse) -> dict[str, Any]:
    """What the audit log keeps of the bundle slots, before and after."""
    return {
        "live": active.live.version if active.HasField("live") else "",
        "shadow": active.shadow.version if active.HasField("shadow") else "",
    }


def _param(params: Any, name: str) -> str:
    return str(params.get(name, "")).strip()


def _too_long(request: Request, session: Session, values: dict[str, str]) -> Response | None:
    for name, value in values.items():
        if len(value) > MAX_FIELD_LENGTH:
            return error_page(request, session, 400, "FIELD_TOO_LONG", f"{name} is too long", name)
    return None


def diff_lines(text: str) -> list[tuple[str, str]]:
    """(kind, line) for the diff's template: added, removed, hunk, header or context."""
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        if line.startswith(("+++", "---")):
            kind = "header"
        elif line.startswith("@@"):
            kind = "hunk"
        elif line.startswith("+"):
            kind = "added"
        elif line.startswith("-"):
            kind = "removed"
        else:
            kind = "context"
        out.append((kind, line))
    return out


@requires("bundles:read")
async def bundles(request: Request, session: Session) -> Response:
    console = console_of(request)
    params = request.query_params
    tenant = _param(params, "tenant")
    page_token = _param(params, "page_token")
    refused = _too_long(request, session, {"tenant": tenant})
    if refused is not None:
        return refused
    stub = console.planes.bundles()
    metrics: pb.GetPolicyMetricsResponse | None = None
    try:
        active = await stub.GetActiveBundle(
            pb.GetActiveBundleRequest(), timeout=console.planes.timeout_s
        )
        listed = await stub.ListBundles(
            pb.ListBundlesRequest(
                page_size=console.config.console.page_size, page_token=page_token
            ),
            timeout=console.planes.timeout_s,
        )
        if tenant:
            metrics = await console.planes.policy().GetPolicyMetrics(
                pb.GetPolicyMetricsRequest(tenant_id=tenant), timeout=console.planes.timeout_s
            )
    except grpc.aio.AioRpcError as error:
        return grpc_error_page(request, session, error)
    next_link = next_page_link("/bundles", {"tenant": tenant}, listed.next_page_token)
    return render(
        request,
        session,
        "bundles/list.html",
        {
            "active": active,
            "slots": _slots(active),
            "bundles": list(listed.bundles),
            "next_link": next_link,
            "tenant": tenant,
            "metrics": metrics,
            "can_activate": session.can("bundles:activate"),
        },
    )


@requires("bundles:read")
async def diff(request: Request, session: Session) -> Response:
    console = console_of(request)
    older = _param(request.query_params, "from")
    newer = _param(request.query_params, "to")
    for name, value in (("from", older), ("to", newer)):
        if not value:
            return error_page(
                request, session, 400, "FIELD_REQUIRED", f"{name}: a bundle version", name
            )
    refused = _too_long(request, session, {"from": older, "to": newer})
    if refused is not None:
        return refused
    try:
        answer = await console.planes.bundles().DiffBundles(
            pb.DiffBundlesRequest(from_version=older, to_version=newer),
            timeout=console.planes.timeout_s,
        )
    except grpc.aio.AioRpcError as error:
        return grpc_error_page(request, session, error)
    return render(
        request,
        session,
        "bundles/diff.html",
        {"answer": answer, "lines": diff_lines(answer.unified_diff)},
    )


async def _switch(request: Request, session: Session, slot: str) -> Response:
    """Activates (slot "live") or shadows (slot "shadow") the form's version,
    with its reason audited as the approval."""
    console = console_of(request)
    form = await request.form()
    version = _param(form, "version")
    reason = _param(form, "reason")
    if not version and slot == "live":
        return error_page(
            request, session, 400, "FIELD_REQUIRED", "version: a bundle version", "version"
        )
    if not reason:
        return error_page(
            request, session, 400, "REASON_REQUIRED", "Say why: a reason is required.", "reason"
        )
    if len(reason) > MAX_REASON_LENGTH:
        return error_page(
            request, session, 400, "REASON_TOO_LONG", "reason: at most 2,000 characters", "reason"
        )
    refused = _too_long(request, session, {"version": version})
    if refused is not None:
        return refused
    stub = console.planes.bundles()
    action = "bundle.activate" if slot == "live" else "bundle.shadow"
    target = f"bundle:{version or '(none)'}"
    active = pb.GetActiveBundleRequest()

    async def change(before: dict[str, Any]) -> dict[str, Any]:
        before.update(_slots(await stub.GetActiveBundle(active, timeout=console.planes.timeout_s)))
        if slot == "live":
            await stub.ActivateBundle(
                pb.ActivateBundleRequest(version=version, actor=session.username, reason=reason),
                timeout=console.planes.timeout_s,
            )
        else:
            await stub.SetShadowBundle(
                pb.SetShadowBundleRequest(version=version, actor=session.username, reason=reason),
                timeout=console.planes.timeout_s,
            )
        return _slots(await stub.GetActiveBundle(active, timeout=console.planes.timeout_s))

    return await audited(
        request, session, action, target, change, redirect_to="/bundles", before={"reason": reason}
    )


@requires("bundles:activate")
async def activate(request: Request, session: Session) -> Response:
    return await _switch(request, session, "live")


@requires("bundles:activate")
async def shadow(request: Request, session: Session) -> Response:
    return await _switch(request, session, "shadow")


PAGE = Page(
    label="Bundles",
    path="/bundles",
    permission="bundles:read",
    order=40,
    routes=[
        Route("/bundles", bundles, methods=["GET"]),
        Route("/bundles/diff", diff, methods=["GET"]),
        Route("/bundles/activate", activate, methods=["POST"]),
        Route("/bundles/shadow", shadow, methods=["POST"]),
    ],
)
