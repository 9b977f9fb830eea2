"""Who may call the money plane (triplane.runtime.authz; default deny): the
gateway moves money and reads what its payment flows need; tenants,
accounts, batches, statements and ledger checks are admin only."""

from __future__ import annotations

from triplane.runtime.authz import (
    ADMIN_AND_CONSOLE,
    ADMIN_ONLY,
    GATEWAY_ADMIN_AND_CONSOLE,
    GATEWAY_AND_ADMIN,
    Permissions,
    permissions,
)

PERMISSIONS: Permissions = permissions(
    "triplane.money.v1.LedgerService",
    {
        "CreateTenant": ADMIN_ONLY,
        "CreateAccounts": ADMIN_ONLY,
        # The console's Ledger page reads (finance_operator, sre, auditor);
        # nothing it may call moves money.
        "ListTenants": ADMIN_AND_CONSOLE,
        "GetAccount": GATEWAY_ADMIN_AND_CONSOLE,
        "ListAccounts": ADMIN_AND_CONSOLE,
        "CreateTransfer": GATEWAY_AND_ADMIN,
        # Batches are for the tools (imports, the bench); the gateway sends one at a time.
        "CreateTransfers": ADMIN_ONLY,
        "GetBalance": GATEWAY_ADMIN_AND_CONSOLE,
        "ListAccountPostings": ADMIN_AND_CONSOLE,
        "GetEntry": GATEWAY_ADMIN_AND_CONSOLE,
        "GetHold": GATEWAY_ADMIN_AND_CONSOLE,
        "CheckBalanced": ADMIN_ONLY,
        # Payouts: the gateway registers beneficiaries and records payouts it
        # had decided; a rail's outcome comes from the rails (admin identity).
        "CreateBeneficiary": GATEWAY_AND_ADMIN,
        "GetBeneficiary": GATEWAY_AND_ADMIN,
        "GetPayoutContext": GATEWAY_AND_ADMIN,
        "CreatePayout": GATEWAY_AND_ADMIN,
        "GetPayout": GATEWAY_AND_ADMIN,
        "RecordPayoutOutcome": ADMIN_ONLY,
        # A review's resolution: the gateway applies policy.case.resolved
        # (the approval's token is the authority); operators may too.
        "ApprovePayout": GATEWAY_AND_ADMIN,
        "DeclinePayout": GATEWAY_AND_ADMIN,
        "PutSettlementSchedule": ADMIN_ONLY,
        "ListSettlements": ADMIN_ONLY,
        "RunSettlements": ADMIN_ONLY,
    },
) | permissions(
    # Reconciliation is the finance operators' (through the admin identity and
    # its tools, or the console's Reconciliation page, which records the
    # signed-in operator as the actor): statements, expected payments, breaks
    # and their resolution.
    "triplane.money.v1.ReconciliationService",
    {
        "ImportStatement": ADMIN_AND_CONSOLE,
        "CreateExpectedPayments": ADMIN_ONLY,
        "GetStatement": ADMIN_AND_CONSOLE,
        "ListStatements": ADMIN_AND_CONSOLE,
        "ListBreaks": ADMIN_AND_CONSOLE,
        "GetBreak": ADMIN_AND_CONSOLE,
        "ResolveBreak": ADMIN_AND_CONSOLE,
        # The transfer a write-off or reversal would post, for the console to
        # ask the policy plane about exactly it; reads only.
        "DescribeResolution": ADMIN_AND_CONSOLE,
    },
)
