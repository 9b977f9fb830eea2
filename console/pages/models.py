"""Models (AI plane ModelRegistryService): every version with its lineage and
metrics, a chart of each model's held-out ROC AUC by version, and, for an
sre (`models:promote`), promotion along draft -> approved -> live -> retired
and rollback to the previous live version. Each promotion or rollback needs a
reason: the console sends the signed-in operator and the reason with the
RPC (actor, reason), the registry records them on the version (its
approvals, shown in the versions table and on the version's page), and the
audit log keeps them too with the version before and after.

Drift: the PSI of each model's live scores and key features against the
training baseline over time (GetModelDrift: the latest recomputation of each
time slot, kept by the AI plane in its model registry's store, so every
replica answers with what all of them recorded and a restart keeps it), one
SVG line chart per model."""

from __future__ import annotations

import datetime
from collections import defaultdict
from typing import Any
from urllib.parse import quote

import grpc
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from console.actions import audited
from console.app import console_of, error_page, grpc_error_page, render
from console.auth import Session, requires
from console.charts import Series, line_chart
from console.pages import Page
from triplane.ai.v1 import ai_pb2 as pb

TARGETS = {
    "approved": pb.MODEL_STATE_APPROVED,
    "live": pb.MODEL_STATE_LIVE,
    "retired": pb.MODEL_STATE_RETIRED,
}
# At most this many versions are listed (pages of the plane's maximum).
MAX_VERSIONS = 1_000
MAX_REASON_LENGTH = 2_000
MAX_MODEL_LENGTH = 128
# A PSI above this is commonly read as a significant shift (drawn as a rule).
PSI_SHIFT = 0.25


def state_name(state: pb.ModelState.ValueType) -> str:
    return pb.ModelState.Name(state).removeprefix("MODEL_STATE_").lower()


def version_path(model: str, version: int) -> str:
    return f"/models/{quote(model, safe='')}/{version}"


def switch_timeout_s(console: Any) -> float:
    """Deadline of a promotion or rollback: the plane answers once Triton
    serves the version, which may take the AI plane's whole Triton load
    timeout (the stack's config is the console's too)."""
    return float(console.planes.timeout_s + console.config.ai.triton.load_timeout_s)


def version_state(version: pb.ModelVersion) -> dict[str, Any]:
    """What the audit log keeps of a version, before and after an action."""
    return {
        "model": version.model,
        "version": version.version,
        "state": pb.ModelState.Name(version.state),
        "artifact_sha256": version.artifact_sha256,
        "rollback_version": version.rollback_version,
    }


async def _all_versions(console: Any, model: str = "") -> list[pb.ModelVersion]:
    versions: list[pb.ModelVersion] = []
    token = ""
    while len(versions) < MAX_VERSIONS:
        answer = await console.planes.models().ListModelVersions(
            pb.ListModelVersionsRequest(model=model, page_token=token),
            timeout=console.planes.timeout_s,
        )
        versions.extend(answer.versions)
        token = answer.next_page_token
        if not token:
            break
    return versions


def _auc_chart(by_model: dict[str, list[pb.ModelVersion]]) -> Any:
    series = [
        Series(name, [(float(v.version), v.metrics.roc_auc) for v in versions])
        for name, versions in by_model.items()
    ]
    labels = {float(v.version): f"v{v.version}" for versions in by_model.values() for v in versions}
    return line_chart("Held-out ROC AUC by version", series, x_labels=labels, y_label="ROC AUC")


def _clock_label(us: int) -> str:
    return datetime.datetime.fromtimestamp(us / 1e6, datetime.UTC).strftime("%m-%d %H:%M")


async def _drift(console: Any, model: str) -> tuple[Any, pb.GetModelDriftResponse | None, str]:
    """(the model's PSI chart, the plane's answer, why there is none)."""
    try:
        answer = await console.planes.models().GetModelDrift(
            pb.GetModelDriftRequest(model=model), timeout=console.planes.timeout_s
        )
    except grpc.aio.AioRpcError as error:
        return None, None, error.code().name
    series = [
        # Whole seconds: the series of one recomputation share their instant.
        Series(s.series, [(float(p.at.seconds), p.psi) for p in s.history])
        for s in answer.series
    ]
    times = sorted({x for line in series for x, _ in line.points})
    labels = {t: _clock_label(int(t * 1_000_000)) for t in (times[:1] + times[-1:])}
    chart = line_chart(
        f"{model} v{answer.version}: PSI against the training baseline",
        series,
        x_labels=labels,
        y_label="PSI",
        threshold=PSI_SHIFT,
    )
    return chart, answer, ""


@requires("models:read")
async def models(request: Request, session: Session) -> Response:
    console = console_of(request)
    try:
        versions = await _all_versions(console)
    except grpc.aio.AioRpcError as error:
        return grpc_error_page(request, session, error)
    by_model: dict[str, list[pb.ModelVersion]] = defaultdict(list)
    for version in sorted(versions, key=lambda v: (v.model, v.version)):
        by_model[version.model].append(version)
    live = {
        name: next((v for v in vs if v.state == pb.MODEL_STATE_LIVE), None)
        for name, vs in by_model.items()
    }
    drift = {name: await _drift(console, name) for name in by_model}
    return render(
        request,
        session,
        "models/list.html",
        {
            "by_model": dict(by_model),
            "live": live,
            "chart": _auc_chart(by_model),
            "drift": drift,
            "psi_shift": PSI_SHIFT,
            "can_promote": session.can("models:promote"),
            "state_name": state_name,
            "version_path": version_path,
            "pb": pb,
        },
    )


def _model_of(request: Request, session: Session) -> str | Response:
    """The path's model name, or the page refusing it."""
    model = str(request.path_params["model"])
    if not model or len(model) > MAX_MODEL_LENGTH:
        return error_page(
            request, session, 400, "MODEL_INVALID", "model: 1 to 128 characters", "model"
        )
    return model


def _version_of(request: Request, session: Session) -> tuple[str, int] | Response:
    """The path's (model, version), or the page refusing them."""
    model = _model_of(request, session)
    if isinstance(model, Response):
        return model
    raw = str(request.path_params["version"])
    if not raw.isdigit() or not 0 < int(raw) < 2**32:
        return error_page(
            request, session, 400, "VERSION_INVALID", "version: a positive number", "version"
        )
    return model, int(raw)


@requires("models:read")
async def detail(request: Request, session: Session) -> Response:
    console = console_of(request)
    target_version = _version_of(request, session)
    if isinstance(target_version, Response):
        return target_version
    model, number = target_version
    try:
        answer = await console.planes.models().GetModelVersion(
            pb.GetModelVersionRequest(model=model, version=number),
            timeout=console.planes.timeout_s,
        )
    except grpc.aio.AioRpcError as error:
        return grpc_error_page(request, session, error)
    version = answer.version
    nexts = {
        pb.MODEL_STATE_DRAFT: ["approved", "retired"],
        pb.MODEL_STATE_APPROVED: ["live", "retired"],
        pb.MODEL_STATE_LIVE: ["retired"],
        pb.MODEL_STATE_RETIRED: ["approved"],
    }.get(version.state, [])
    return render(
        request,
        session,
        "models/detail.html",
        {
            "version": version,
            "targets": nexts,
            "can_promote": session.can("models:promote"),
            "state_name": state_name,
            "path": version_path(model, number),
            "pb": pb,
        },
    )


async def _reason(request: Request, session: Session) -> tuple[str, Response | None]:
    form = await request.form()
    reason = str(form.get("reason", "")).strip()
    if not reason:
        return "", error_page(
            request, session, 400, "REASON_REQUIRED", "Say why: a reason is required.", "reason"
        )
    if len(reason) > MAX_REASON_LENGTH:
        return "", error_page(
            request, session, 400, "REASON_TOO_LONG", "reason: at most 2,000 characters", "reason"
        )
    return reason, None


@requires("models:promote")
async def promote(request: Request, session: Session) -> Response:
    console = console_of(request)
    target_version = _version_of(request, session)
    if isinstance(target_version, Response):
        return target_version
    model, number = target_version
    form = await request.form()
    target = str(form.get("target", ""))
    if target not in TARGETS:
        return error_page(
            request,
            session,
            400,
            "TARGET_STATE_INVALID",
            f"target must be one of {', '.join(TARGETS)}",
            "target",
        )
    reason, bad_reason = await _reason(request, session)
    if bad_reason is not None:
        return bad_reason
    stub = console.planes.models()
    what = f"model:{model}/v{number}"

    async def change(before: dict[str, Any]) -> dict[str, Any]:
        current = await stub.GetModelVersion(
            pb.GetModelVersionRequest(model=model, version=number),
            timeout=console.planes.timeout_s,
        )
        before.update(version_state(current.version))
        answer = await stub.PromoteModel(
            pb.PromoteModelRequest(
                model=model,
                version=number,
                target_state=TARGETS[target],
                actor=session.username,
                reason=reason,
            ),
            timeout=switch_timeout_s(console),
        )
        after = version_state(answer.version)
        if answer.HasField("gate"):
            after["ope_gate"] = answer.gate.outcome
        return after

    return await audited(
        request,
        session,
        "model.promote",
        what,
        change,
        redirect_to=version_path(model, number),
        before={"reason": reason, "target": target},
    )


@requires("models:promote")
async def rollback(request: Request, session: Session) -> Response:
    console = console_of(request)
    model = _model_of(request, session)
    if isinstance(model, Response):
        return model
    reason, bad_reason = await _reason(request, session)
    if bad_reason is not None:
        return bad_reason
    stub = console.planes.models()

    async def change(before: dict[str, Any]) -> dict[str, Any]:
        current = await stub.GetModelVersion(
            pb.GetModelVersionRequest(model=model), timeout=console.planes.timeout_s
        )
        before.update(version_state(current.version))
        answer = await stub.RollbackModel(
            pb.RollbackModelRequest(model=model, actor=session.username, reason=reason),
            timeout=switch_timeout_s(console),
        )
        return {**version_state(answer.live), "rollback_s": answer.rollback_s}

    return await audited(
        request,
        session,
        "model.rollback",
        f"model:{model}",
        change,
        redirect_to=f"/models#model-{quote(model, safe='')}",
        before={"reason": reason},
    )


PAGE = Page(
    label="Models",
    path="/models",
    permission="models:read",
    order=50,
    routes=[
        Route("/models", models, methods=["GET"]),
        Route("/models/{model}/rollback", rollback, methods=["POST"]),
        Route("/models/{model}/{version}", detail, methods=["GET"]),
        Route("/models/{model}/{version}/promote", promote, methods=["POST"]),
    ],
)
