"""Who may call the gateway at the mutual-TLS layer (triplane.runtime.authz;
default deny). The public port does not ask for a client certificate:
partners authenticate every call with an API key or an OAuth2 token, which
the gateway's own credential layer (gateway.auth) checks per method and
scope, so each method here is PUBLIC to that layer. ApiKeyService is also
PUBLIC here because that layer admits either the admin certificate
identity (authz.peer_identity, known on gateway.admin_listen, the port that
requires certificates) or an admin-scoped credential."""

from __future__ import annotations

from triplane.runtime.authz import ANY_CALLER, Permissions, permissions

_PACKAGE = "triplane.gateway.v1"

PERMISSIONS: Permissions = {
    **permissions(
        f"{_PACKAGE}.GatewayService",
        {
            "AuthorizePayment": ANY_CALLER,
            "CapturePayment": ANY_CALLER,
            "VoidPayment": ANY_CALLER,
            "RefundPayment": ANY_CALLER,
            "GetDecision": ANY_CALLER,
            "DecideNextAction": ANY_CALLER,
            "RecordOutcome": ANY_CALLER,
            "IngestEvents": ANY_CALLER,
            "ListDeadLetters": ANY_CALLER,
            "RedeliverDeadLetter": ANY_CALLER,
            "PutCustomerProfile": ANY_CALLER,
            "GetCustomerProfile": ANY_CALLER,
            "CreateBeneficiary": ANY_CALLER,
            "GetBeneficiary": ANY_CALLER,
            "CreatePayout": ANY_CALLER,
            "GetPayout": ANY_CALLER,
        },
    ),
    **permissions(
        f"{_PACKAGE}.DeliveryAdminService",
        {
            "ListDeliveryEndpoints": ANY_CALLER,
            "ListDeliveries": ANY_CALLER,
            "GetDelivery": ANY_CALLER,
            "RequeueDelivery": ANY_CALLER,
        },
    ),
    **permissions(
        f"{_PACKAGE}.ExperimentAdminService",
        {"GetLiftReport": ANY_CALLER},
    ),
    **permissions(
        f"{_PACKAGE}.ApiKeyService",
        {
            "CreateApiKey": ANY_CALLER,
            "ListApiKeys": ANY_CALLER,
            "RotateApiKey": ANY_CALLER,
            "RevokeApiKey": ANY_CALLER,
        },
    ),
}
