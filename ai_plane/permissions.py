"""Who may call the AI plane (triplane.runtime.authz; default deny): the
gateway scores, ranks, explains and reports outcomes; the model registry
(training) is admin only; its reads, promotion and rollback also the operator
console's (its Models page)."""

from __future__ import annotations

from triplane.runtime.authz import (
    ADMIN_AND_CONSOLE,
    ADMIN_ONLY,
    GATEWAY_ADMIN_AND_CONSOLE,
    GATEWAY_AND_ADMIN,
    Permissions,
    permissions,
)

_PACKAGE = "triplane.ai.v1"

PERMISSIONS: Permissions = {
    **permissions(
        f"{_PACKAGE}.ScoringService",
        {
            "Score": GATEWAY_AND_ADMIN,
            "Rank": GATEWAY_AND_ADMIN,
            # The console's Decisions page draws a decision's attributions.
            "Explain": GATEWAY_ADMIN_AND_CONSOLE,
            "ReportOutcome": GATEWAY_AND_ADMIN,
        },
    ),
    **permissions(
        f"{_PACKAGE}.ModelRegistryService",
        {
            # The console's Models page: an sre promotes and rolls back.
            "ListModelVersions": ADMIN_AND_CONSOLE,
            "GetModelVersion": ADMIN_AND_CONSOLE,
            "TrainModel": ADMIN_ONLY,
            "PromoteModel": ADMIN_AND_CONSOLE,
            "RollbackModel": ADMIN_AND_CONSOLE,
            "GetModelDrift": ADMIN_AND_CONSOLE,
            "EstimatePolicyValue": ADMIN_ONLY,
        },
    ),
}
