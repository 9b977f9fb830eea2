"""The typed Python client of Triplane's public API.

    async with GatewayClient("127.0.0.1:50051") as client:
        answer = await client.authorize_payment(
            tenant_id="acme", account_id="cust_1", credit_account_id="merchant_1",
            amount=Money(amount_minor=2500, currency="USD"), kind=PAYMENT_KIND_PURCHASE,
        )

One object per service; every call has a deadline (the client's default or
`timeout_s`); idempotency keys are generated when not given (and returned in
the answer, so a caller can retry with the same one); calls are retried on
UNAVAILABLE only because every gateway RPC is idempotent (mutating ones by
their key); errors are raised as `TriplaneApiError` subclasses carrying the
status code, the ErrorInfo reason and the offending field.
"""

from triplane_client.client import GatewayClient, LedgerAdminClient, PolicyAdminClient
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
    "TriplaneApiError",
    "UnavailableError",
]
