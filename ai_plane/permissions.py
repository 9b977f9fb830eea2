"""Who may call the AI plane (triplane.runtime.authz; default deny): the
gateway scores, ranks, explains and reports outcomes; the model registry
(reads, training, promotion, rollback) is admin only."""

from __future__ import annotations

from triplane.runtime.authz import ADMIN_ONLY, GATEWAY_AND_ADMIN, Permissions, permissions

_PACKAGE = "triplane.ai.v1"

PERMISSIONS: Permissions = {
    **permissions(
        f"{_PACKAGE}.ScoringService",
        {
            "Score": GATEWAY_AND_ADMIN,
            "Rank": GATEWAY_AND_ADMIN,
            "Explain": GATEWAY_AND_ADMIN,
            "ReportOutcome": GATEWAY_AND_ADMIN,
        },
    ),
    **permissions(
        f"{_PACKAGE}.ModelRegistryService",
        {
            "ListModelVersions": ADMIN_ONLY,
            "GetModelVersion": ADMIN_ONLY,
            "TrainModel": ADMIN_ONLY,
            "PromoteModel": ADMIN_ONLY,
            "RollbackModel": ADMIN_ONLY,
            "EstimatePolicyValue": ADMIN_ONLY,
        },
    ),
}
