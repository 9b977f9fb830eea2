"""Who may call the policy plane (triplane.runtime.authz; default deny): the
gateway asks for decisions, eligible offers and contact checks and reads
decisions; bundles, tenants, replay, the log's verification, labels,
catalog and consent writes and cases are admin only, but that the operator
console works cases and reads the decisions behind them. Customer profiles are
written by admin tools and by the gateway on behalf of a platform's key with
the customers:write scope (bound to the key's tenant there)."""

from __future__ import annotations

from triplane.runtime.authz import (
    ADMIN_AND_CONSOLE,
    ADMIN_ONLY,
    GATEWAY_ADMIN_AND_CONSOLE,
    GATEWAY_AND_ADMIN,
    Permissions,
    permissions,
)

_PACKAGE = "triplane.policy.v1"

PERMISSIONS: Permissions = {
    **permissions(
        f"{_PACKAGE}.PolicyService",
        {
            "CreateTenant": ADMIN_ONLY,
            "Evaluate": GATEWAY_AND_ADMIN,
            # The console's case review shows the decision behind a case.
            "GetDecision": GATEWAY_ADMIN_AND_CONSOLE,
            # The console's Decisions page: search the log, and replay one
            # decision under another bundle (read-only: a replay writes nothing).
            "ListDecisions": ADMIN_AND_CONSOLE,
            "ReplayDecisions": ADMIN_AND_CONSOLE,
            "VerifyDecisionLog": ADMIN_ONLY,
            "LabelDecision": ADMIN_ONLY,
            # The console's Bundles page shows shadow agreement.
            "GetPolicyMetrics": ADMIN_AND_CONSOLE,
            # The console's Reconciliation page asks for a write-off's or
            # reversal's decision (a finance operator's, money:write there).
            "DecideAdjustment": ADMIN_AND_CONSOLE,
        },
    ),
    **permissions(
        f"{_PACKAGE}.BundleService",
        {
            "LoadBundle": ADMIN_ONLY,
            # The console's Bundles page (risk_admin activates, with a reason).
            "ActivateBundle": ADMIN_AND_CONSOLE,
            "SetShadowBundle": ADMIN_AND_CONSOLE,
            "GetActiveBundle": ADMIN_AND_CONSOLE,
            "ListBundles": ADMIN_AND_CONSOLE,
            "DiffBundles": ADMIN_AND_CONSOLE,
        },
    ),
    **permissions(
        f"{_PACKAGE}.ConsentService",
        {
            "PutContactProfile": ADMIN_ONLY,
            "SetConsent": ADMIN_ONLY,
            "GetConsent": GATEWAY_AND_ADMIN,
            "CheckContact": GATEWAY_AND_ADMIN,
            "RecordContact": GATEWAY_AND_ADMIN,
        },
    ),
    **permissions(
        f"{_PACKAGE}.OfferService",
        {
            "PutOffer": ADMIN_ONLY,
            "StopOffer": ADMIN_ONLY,
            "GetOffer": GATEWAY_AND_ADMIN,
            "ListOffers": ADMIN_ONLY,
            "GetEligibleOffers": GATEWAY_AND_ADMIN,
        },
    ),
    **permissions(
        f"{_PACKAGE}.CaseService",
        {
            # Reviewers work cases in the console (console/pages/cases.py).
            "ListCases": ADMIN_AND_CONSOLE,
            "GetCase": ADMIN_AND_CONSOLE,
            "ClaimCase": ADMIN_AND_CONSOLE,
            "ResolveCase": ADMIN_AND_CONSOLE,
            "GetOverruleSeries": ADMIN_AND_CONSOLE,
        },
    ),
    # A customer's KYC facts decide what they may spend: operators and the
    # platform's KYC integration (through the gateway, customers:write).
    **permissions(
        f"{_PACKAGE}.CustomerProfileService",
        {
            "PutCustomerProfile": GATEWAY_AND_ADMIN,
            "GetCustomerProfile": GATEWAY_AND_ADMIN,
        },
    ),
}
