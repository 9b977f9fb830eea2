"""Every method of every service of every plane is in that plane's
permission table, and the table names nothing else: a new RPC cannot slip
in unlisted (it would be refused, METHOD_NOT_ALLOWED, and this test says
which table to add it to)."""

from __future__ import annotations

from google.protobuf.descriptor import FileDescriptor

import ai_plane.permissions
import gateway.permissions
import money_plane.permissions
import policy_plane.permissions
from triplane.ai.v1 import ai_pb2
from triplane.gateway.v1 import delivery_admin_pb2, experiments_admin_pb2, gateway_pb2
from triplane.money.v1 import money_pb2, recon_pb2
from triplane.policy.v1 import policy_pb2
from triplane.runtime import authz
from triplane.runtime.config import load_config

PLANES = {
    "money": ((money_pb2.DESCRIPTOR, recon_pb2.DESCRIPTOR), money_plane.permissions.PERMISSIONS),
    "policy": ((policy_pb2.DESCRIPTOR,), policy_plane.permissions.PERMISSIONS),
    "ai": ((ai_pb2.DESCRIPTOR,), ai_plane.permissions.PERMISSIONS),
    "gateway": (
        (gateway_pb2.DESCRIPTOR, delivery_admin_pb2.DESCRIPTOR, experiments_admin_pb2.DESCRIPTOR),
        gateway.permissions.PERMISSIONS,
    ),
}


def methods_of(descriptors: tuple[FileDescriptor, ...]) -> set[str]:
    """The methods of every service of a plane's proto files."""
    return {
        f"/{service.full_name}/{method.name}"
        for descriptor in descriptors
        for service in descriptor.services_by_name.values()
        for method in service.methods
    }


def test_every_method_of_every_plane_is_in_its_table() -> None:
    for plane, (descriptor, table) in PLANES.items():
        methods = methods_of(descriptor)
        assert methods, plane
        missing = sorted(methods - set(table))
        assert not missing, f"{plane}: add these to {plane}'s permissions.py: {missing}"
        stale = sorted(set(table) - methods)
        assert not stale, f"{plane}: its table names methods that do not exist: {stale}"


def test_every_role_a_table_names_is_configured() -> None:
    roles = set(load_config(environ={}).runtime.tls.roles) | {authz.PUBLIC}
    for plane, (_, table) in PLANES.items():
        named = {role for allowed in table.values() for role in allowed}
        assert named <= roles, f"{plane}: unknown roles {sorted(named - roles)}"
        assert all(allowed for allowed in table.values()), plane


def test_admin_rpcs_need_the_admin_identity() -> None:
    """The planes' admin RPCs are the admin's alone (bundle activation and
    model promotion and rollback also the console's, whose pages check roles)."""
    admin_only = {
        "/triplane.money.v1.LedgerService/CreateTenant",
        "/triplane.money.v1.LedgerService/CreateAccounts",
        "/triplane.policy.v1.PolicyService/CreateTenant",
        "/triplane.policy.v1.BundleService/LoadBundle",
        "/triplane.policy.v1.OfferService/PutOffer",
        "/triplane.policy.v1.OfferService/StopOffer",
        "/triplane.ai.v1.ModelRegistryService/TrainModel",
        "/triplane.policy.v1.PolicyService/LabelDecision",
        "/triplane.policy.v1.PolicyService/VerifyDecisionLog",
    }
    tables = {m: roles for _, table in PLANES.values() for m, roles in table.items()}
    for method in admin_only:
        assert tables[method] == authz.ADMIN_ONLY, method
    # The operator console's identity gets what its pages call and nothing else.
    console = {m for m, roles in tables.items() if authz.CONSOLE_ROLE in roles}
    assert console == {
        "/triplane.policy.v1.CaseService/ListCases",
        "/triplane.policy.v1.CaseService/GetCase",
        "/triplane.policy.v1.CaseService/ClaimCase",
        "/triplane.policy.v1.CaseService/ResolveCase",
        # Cases page: the human-overrule rate over time.
        "/triplane.policy.v1.CaseService/GetOverruleSeries",
        "/triplane.policy.v1.PolicyService/GetDecision",
        # Decisions page: search and replay one (read-only).
        "/triplane.policy.v1.PolicyService/ListDecisions",
        "/triplane.ai.v1.ScoringService/Explain",
        "/triplane.policy.v1.PolicyService/ReplayDecisions",
        # Ledger page: reads only; nothing that moves money.
        "/triplane.money.v1.LedgerService/ListTenants",
        "/triplane.money.v1.LedgerService/ListAccounts",
        "/triplane.money.v1.LedgerService/GetAccount",
        "/triplane.money.v1.LedgerService/GetBalance",
        "/triplane.money.v1.LedgerService/ListAccountPostings",
        "/triplane.money.v1.LedgerService/GetEntry",
        "/triplane.money.v1.LedgerService/GetHold",
        # Bundles page: read, diff, activate and shadow (risk_admin, with a reason).
        "/triplane.policy.v1.BundleService/ListBundles",
        "/triplane.policy.v1.BundleService/GetActiveBundle",
        "/triplane.policy.v1.BundleService/DiffBundles",
        "/triplane.policy.v1.BundleService/ActivateBundle",
        "/triplane.policy.v1.BundleService/SetShadowBundle",
        "/triplane.policy.v1.PolicyService/GetPolicyMetrics",
        # Models page: read, promote and roll back (sre, with a reason).
        "/triplane.ai.v1.ModelRegistryService/ListModelVersions",
        "/triplane.ai.v1.ModelRegistryService/GetModelVersion",
        "/triplane.ai.v1.ModelRegistryService/PromoteModel",
        "/triplane.ai.v1.ModelRegistryService/RollbackModel",
        "/triplane.ai.v1.ModelRegistryService/GetModelDrift",
        # Reconciliation page: breaks, statements, imports and resolutions
        # (finance_operator; the operator is the plane's recorded actor).
        "/triplane.money.v1.ReconciliationService/ImportStatement",
        "/triplane.money.v1.ReconciliationService/GetStatement",
        "/triplane.money.v1.ReconciliationService/ListStatements",
        "/triplane.money.v1.ReconciliationService/ListBreaks",
        "/triplane.money.v1.ReconciliationService/GetBreak",
        "/triplane.money.v1.ReconciliationService/ResolveBreak",
        "/triplane.money.v1.ReconciliationService/DescribeResolution",
        # ... and a write-off's or reversal's decision (no token pasted).
        "/triplane.policy.v1.PolicyService/DecideAdjustment",
    }
    # The gateway's public port leaves every method to its credential layer.
    assert all(roles == authz.ANY_CALLER for roles in gateway.permissions.PERMISSIONS.values())
