"""Who may call the money plane (triplane.runtime.authz; default deny): the
gateway moves money and reads what its payment flows need; tenants,
accounts, batches, statements and ledger checks are admin only."""

from __future__ import annotations

from triplane.runtime.authz import ADMIN_ONLY, GATEWAY_AND_ADMIN, Permissions, permissions

PERMISSIONS: Permissions = permissions(
    "triplane.money.v1.LedgerService",
    {
        "CreateTenant": ADMIN_ONLY,
        "CreateAccounts": ADMIN_ONLY,
        "GetAccount": GATEWAY_AND_ADMIN,
        "CreateTransfer": GATEWAY_AND_ADMIN,
        # Batches are for the tools (imports, the bench); the gateway sends one at a time.
        "CreateTransfers": ADMIN_ONLY,
        "GetBalance": GATEWAY_AND_ADMIN,
        "ListAccountPostings": ADMIN_ONLY,
        "GetEntry": GATEWAY_AND_ADMIN,
        "GetHold": GATEWAY_AND_ADMIN,
        "CheckBalanced": ADMIN_ONLY,
    },
)
