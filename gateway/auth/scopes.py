"""What each credential may do: the scopes, and the one table that names the
scope every method of the gateway's port needs.

The table is the whole policy. A method that is not in it is refused
(PERMISSION_DENIED METHOD_NOT_ALLOWED), so an RPC added to the contract stays
closed until someone decides who may call it; a test checks that every method
of every service the gateway serves is listed. Health checks and reflection
carry no tenant's data and stay open (probes and grpcurl need them)."""

from __future__ import annotations

from dataclasses import dataclass

PAYMENTS_WRITE = "payments:write"
# Reads of payments; no GatewayService RPC reads a payment yet (GetDecision
# is decisions:read), so this is granted for the reads to come.
PAYMENTS_READ = "payments:read"
DECISIONS_READ = "decisions:read"
ACTIONS_WRITE = "actions:write"
EVENTS_WRITE = "events:write"
DELIVERIES_ADMIN = "deliveries:admin"
# The lift of the tenant's offers over the holdout (ExperimentAdminService).
EXPERIMENTS_READ = "experiments:read"
# The clear value of the PII a decision saw (GetDecision), instead of tokens.
PII_READ = "pii:read"
# Customer profiles (the KYC facts the policy plane decides on): writing
# them changes what a customer may spend, so it is its own scope.
CUSTOMERS_WRITE = "customers:write"
CUSTOMERS_READ = "customers:read"
# Payouts: beneficiaries and money out to them (a payout moves a seller's
# money off the platform, so it is its own scope, not payments:write).
PAYOUTS_WRITE = "payouts:write"
PAYOUTS_READ = "payouts:read"
# ApiKeyService for the key's own tenant.
KEYS_ADMIN = "keys:admin"

ALL_SCOPES = frozenset(
    {
        PAYMENTS_WRITE,
        PAYMENTS_READ,
        DECISIONS_READ,
        ACTIONS_WRITE,
        EVENTS_WRITE,
        DELIVERIES_ADMIN,
        EXPERIMENTS_READ,
        PII_READ,
        CUSTOMERS_WRITE,
        CUSTOMERS_READ,
        KEYS_ADMIN,
        PAYOUTS_WRITE,
        PAYOUTS_READ,
    }
)

GATEWAY_SERVICE = "triplane.gateway.v1.GatewayService"
API_KEY_SERVICE = "triplane.gateway.v1.ApiKeyService"
DELIVERY_ADMIN_SERVICE = "triplane.gateway.v1.DeliveryAdminService"
EXPERIMENT_ADMIN_SERVICE = "triplane.gateway.v1.ExperimentAdminService"


@dataclass(frozen=True, slots=True)
class MethodRule:
    """Who may call one method: a credential with `scope`; for key
    management (`admin`) also the platform's admin identities."""

    scope: str
    admin: bool = False
    # Also the operator console's certificate identity (runtime.tls.roles
    # console), naming the tenant as an admin does.
    console: bool = False


def _gateway(method: str, scope: str) -> tuple[str, MethodRule]:
    return f"/{GATEWAY_SERVICE}/{method}", MethodRule(scope)


def _keys(method: str) -> tuple[str, MethodRule]:
    return f"/{API_KEY_SERVICE}/{method}", MethodRule(KEYS_ADMIN, admin=True)


def _deliveries(method: str) -> tuple[str, MethodRule]:
    rule = MethodRule(DELIVERIES_ADMIN, admin=True, console=True)
    return f"/{DELIVERY_ADMIN_SERVICE}/{method}", rule


def _experiments(method: str) -> tuple[str, MethodRule]:
    rule = MethodRule(EXPERIMENTS_READ, admin=True, console=True)
    return f"/{EXPERIMENT_ADMIN_SERVICE}/{method}", rule


METHOD_RULES: dict[str, MethodRule] = dict(
    [
        _gateway("AuthorizePayment", PAYMENTS_WRITE),
        _gateway("CapturePayment", PAYMENTS_WRITE),
        _gateway("VoidPayment", PAYMENTS_WRITE),
        _gateway("RefundPayment", PAYMENTS_WRITE),
        _gateway("GetDecision", DECISIONS_READ),
        _gateway("DecideNextAction", ACTIONS_WRITE),
        _gateway("RecordOutcome", ACTIONS_WRITE),
        _gateway("IngestEvents", EVENTS_WRITE),
        _gateway("ListDeadLetters", DELIVERIES_ADMIN),
        _gateway("RedeliverDeadLetter", DELIVERIES_ADMIN),
        _gateway("PutCustomerProfile", CUSTOMERS_WRITE),
        _gateway("GetCustomerProfile", CUSTOMERS_READ),
        _gateway("CreateBeneficiary", PAYOUTS_WRITE),
        _gateway("GetBeneficiary", PAYOUTS_READ),
        _gateway("CreatePayout", PAYOUTS_WRITE),
        _gateway("GetPayout", PAYOUTS_READ),
        _keys("CreateApiKey"),
        _keys("ListApiKeys"),
        _keys("RotateApiKey"),
        _keys("RevokeApiKey"),
        _deliveries("ListDeliveryEndpoints"),
        _deliveries("ListDeliveries"),
        _deliveries("GetDelivery"),
        _deliveries("RequeueDelivery"),
        _experiments("GetLiftReport"),
    ]
)

# Open to anyone who can reach the port: no tenant's data behind them.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


def is_open(method: str) -> bool:
    """`method` (/package.Service/Method) belongs to an open service."""
    return method.split("/")[1] in OPEN_SERVICES if method.count("/") == 2 else False
