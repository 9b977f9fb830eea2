"""The typed Python client of Triplane's public API.

    tls = TlsFiles(ca_path=Path(".triplane/tls/ca.crt"))  # the dev stack's CA
    api_key = os.environ["TRIPLANE_API_KEY"]  # tpk_test_..., names the tenant
    async with GatewayClient("127.0.0.1:50051", api_key=api_key, tls=tls) as client:
        answer = await client.authorize_payment(
            account_id="cust_1", credit_account_id="merchant_1",
            amount=Money(amount_minor=2500, currency="USD"), kind=PAYMENT_KIND_PURCHASE,
        )

One object per service; every call has a deadline (the client's default or
`timeout_s`); idempotency keys are generated when not given (and returned in
the answer, so a caller can retry with the same one); calls are retried on
UNAVAILABLE only because every gateway RPC is idempotent (mutating ones by
their key); errors are raised as `TriplaneApiError` subclasses carrying the
status code, the ErrorInfo reason and the offending field (a credential
refused is `UnauthenticatedError`, another tenant or a missing scope
`PermissionDeniedError`, a rate limit `ResourceExhaustedError` with
`retry_delay_s`). `tls` (a
`TlsFiles`) dials with TLS: the CA that signed the server's certificate, and
for the admin clients the admin identity's certificate and key; None is
plaintext, for a stack run with `runtime.tls: off`.
"""

from triplane_client.client import (
    ApiKeysClient,
    GatewayClient,
    LedgerAdminClient,
    PolicyAdminClient,
    TlsFiles,
)
from triplane_client.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TriplaneApiError,
    UnauthenticatedError,
    UnavailableError,
)

__all__ = [
    "AlreadyExistsError",
    "ApiKeysClient",
    "FailedPreconditionError",
    "GatewayClient",
    "InvalidArgumentError",
    "LedgerAdminClient",
    "NotFoundError",
    "PermissionDeniedError",
    "PolicyAdminClient",
    "ResourceExhaustedError",
    "TlsFiles",
    "TriplaneApiError",
    "UnauthenticatedError",
    "UnavailableError",
]
