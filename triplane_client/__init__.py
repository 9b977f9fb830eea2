"""The typed Python client of Triplane's public API.

    tls = TlsFiles(ca_path=Path(".triplane/tls/ca.crt"))  # the dev stack's CA
    async with GatewayClient("127.0.0.1:50051", tls=tls) as client:
        answer = await client.authorize_payment(
            tenant_id="acme", account_id="cust_1", credit_account_id="merchant_1",
            amount=Money(amount_minor=2500, currency="USD"), kind=PAYMENT_KIND_PURCHASE,
        )

One object per service; every call has a deadline (the client's default or
`timeout_s`); idempotency keys are generated when not given (and returned in
the answer, so a caller can retry with the same one); calls are retried on
UNAVAILABLE only because every gateway RPC is idempotent (mutating ones by
their key); errors are raised as `TriplaneApiError` subclasses carrying the
status code, the ErrorInfo reason and the offending field. `tls` (a
`TlsFiles`) dials with TLS: the CA that signed the server's certificate, and
for the admin clients the admin identity's certificate and key; None is
plaintext, for a stack run with `runtime.tls: off`.
"""

from triplane_client.client import GatewayClient, LedgerAdminClient, PolicyAdminClient, TlsFiles
from triplane_client.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    TriplaneApiError,
    UnavailableError,
)

__all__ = [
    "AlreadyExistsError",
    "FailedPreconditionError",
    "GatewayClient",
    "InvalidArgumentError",
    "LedgerAdminClient",
    "NotFoundError",
    "PolicyAdminClient",
    "TlsFiles",
    "TriplaneApiError",
    "UnavailableError",
]
