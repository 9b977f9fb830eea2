"""Clients: one object per service, typed methods, deadlines, retries on
UNAVAILABLE through the gRPC service config, generated idempotency keys.

TLS: `tls=TlsFiles(ca_path, cert_path, key_path)` (triplane.runtime.tls)
dials with TLS, verifying the server against `ca_path` (None: the system's
roots) and presenting the certificate when one is given: the admin clients
need the admin identity's (`<state_dir>/tls/admin.crt` in the dev stack), a
partner at the gateway needs none. `tls=None` is plaintext, for a stack run
with `runtime.tls: off`."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.gateway.v1 import gateway_pb2_grpc
from triplane.money.v1 import money_pb2, money_pb2_grpc
from triplane.policy.v1 import policy_pb2, policy_pb2_grpc
from triplane.runtime.retry import RetryPolicy
from triplane.runtime.tls import TlsFiles, channel_options, open_channel
from triplane_client.errors import TriplaneApiError, from_rpc_error

R = TypeVar("R", bound=Message)

DEFAULT_TIMEOUT_S = 5.0
MAX_ATTEMPTS = 4


# Retries on UNAVAILABLE for a client whose every method is idempotent
# (the gateway's: each write carries an idempotency key), within each call's
# deadline; the same policy shape as the runtime's (runtime.grpc.retry).
RETRY = RetryPolicy(
    initial_interval_s=0.05,
    backoff_coefficient=2.0,
    maximum_interval_s=1.0,
    maximum_attempts=MAX_ATTEMPTS,
)


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


class _Client:
    SERVICE = ""
    # Sent with every call (the gateway's `authorization: Bearer <API key>`).
    _metadata: tuple[tuple[str, str], ...] = ()

    def __init__(
        self,
        address: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: bool = True,
        *,
        tls: TlsFiles | None = None,
        load_balancing: str = "round_robin",
        authority: str = "",
    ):
        """`address`: any gRPC target; with several addresses behind it
        (`dns:///gateway.example:50051`, `ipv4:10.0.0.1:50051,10.0.0.2:50051`)
        `load_balancing` round_robin spreads the calls over them (pick_first:
        one at a time). `authority`: the name the server's certificate must
        carry when the target does not say it (an address list)."""
        options = channel_options(
            load_balancing=load_balancing,
            retry=RETRY if retry else None,
            retry_methods=[(self.SERVICE, "")] if retry and self.SERVICE else [],
            authority=authority,
            transparent_retries=retry,
        )
        self._channel = open_channel(address, tls, options, who=type(self).__name__)
        self._timeout_s = timeout_s

    async def _call(
        self, method: Callable[..., Awaitable[R]], request: Message, timeout_s: float | None
    ) -> R:
        try:
            return await method(
                request, timeout=timeout_s or self._timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> _Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def _bearer(api_key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class GatewayClient(_Client):
    """triplane.gateway.v1.GatewayService, as one tenant.

    `api_key` (a `tpk_live_...`/`tpk_test_...` key, or an OAuth2 access
    token from the platform's identity provider) is sent with every call; it
    names the tenant, so the methods' `tenant_id` may be left out. A request
    naming another tenant raises `PermissionDeniedError` (reason
    TENANT_MISMATCH), a key without the method's scope `PermissionDeniedError`
    (SCOPE_MISSING, `.scope`), no key or a bad one `UnauthenticatedError`, a
    rate limit `ResourceExhaustedError` with `.retry_delay_s`."""

    SERVICE = "triplane.gateway.v1.GatewayService"

    def __init__(
        self,
        address: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: bool = True,
        *,
        api_key: str = "",
        tls: TlsFiles | None = None,
        load_balancing: str = "round_robin",
        authority: str = "",
    ):
        super().__init__(
            address, timeout_s, retry, tls=tls, load_balancing=load_balancing, authority=authority
        )
        self._metadata = _bearer(api_key)
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)

    async def __aenter__(self) -> GatewayClient:
        return self

    async def authorize_payment(
        self, *, idempotency_key: str = "", timeout_s: float | None = None, **fields: Any
    ) -> gw.AuthorizePaymentResponse:
        request = gw.AuthorizePaymentRequest(
            idempotency_key=idempotency_key or new_idempotency_key(), **fields
        )
        return await self._call(self._stub.AuthorizePayment, request, timeout_s)

    async def capture_payment(
        self,
        *,
        tenant_id: str = "",
        hold_id: str,
        amount: Any = None,
        idempotency_key: str = "",
        timeout_s: float | None = None,
    ) -> gw.CapturePaymentResponse:
        request = gw.CapturePaymentRequest(
            tenant_id=tenant_id,
            hold_id=hold_id,
            amount=amount,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )
        return await self._call(self._stub.CapturePayment, request, timeout_s)

    async def void_payment(
        self,
        *,
        tenant_id: str = "",
        hold_id: str,
        idempotency_key: str = "",
        timeout_s: float | None = None,
    ) -> gw.VoidPaymentResponse:
        request = gw.VoidPaymentRequest(
            tenant_id=tenant_id,
            hold_id=hold_id,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )
        return await self._call(self._stub.VoidPayment, request, timeout_s)

    async def refund_payment(
        self,
        *,
        tenant_id: str = "",
        entry_id: str,
        amount: Any = None,
        idempotency_key: str = "",
        timeout_s: float | None = None,
    ) -> gw.RefundPaymentResponse:
        request = gw.RefundPaymentRequest(
            tenant_id=tenant_id,
            entry_id=entry_id,
            amount=amount,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )
        return await self._call(self._stub.RefundPayment, request, timeout_s)

    async def get_decision(
        self, *, decision_id: str, tenant_id: str = "", timeout_s: float | None = None
    ) -> gw.GetDecisionResponse:
        request = gw.GetDecisionRequest(tenant_id=tenant_id, decision_id=decision_id)
        return await self._call(self._stub.GetDecision, request, timeout_s)

    async def decide_next_action(
        self, *, idempotency_key: str = "", timeout_s: float | None = None, **fields: Any
    ) -> gw.DecideNextActionResponse:
        request = gw.DecideNextActionRequest(
            idempotency_key=idempotency_key or new_idempotency_key(), **fields
        )
        return await self._call(self._stub.DecideNextAction, request, timeout_s)

    async def record_outcome(
        self,
        *,
        tenant_id: str = "",
        decision_id: str,
        kind: gw.OutcomeKind.ValueType,
        value: Any = None,
        idempotency_key: str = "",
        timeout_s: float | None = None,
    ) -> gw.RecordOutcomeResponse:
        request = gw.RecordOutcomeRequest(
            tenant_id=tenant_id,
            decision_id=decision_id,
            kind=kind,
            value=value,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )
        return await self._call(self._stub.RecordOutcome, request, timeout_s)

    async def ingest_events(
        self,
        *,
        events: list[gw.BehaviourEvent],
        tenant_id: str = "",
        timeout_s: float | None = None,
    ) -> gw.IngestEventsResponse:
        for event in events:
            if not event.idempotency_key:
                event.idempotency_key = new_idempotency_key()
        request = gw.IngestEventsRequest(tenant_id=tenant_id, events=events)
        return await self._call(self._stub.IngestEvents, request, timeout_s)

    async def list_dead_letters(
        self,
        *,
        tenant_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout_s: float | None = None,
    ) -> gw.ListDeadLettersResponse:
        request = gw.ListDeadLettersRequest(
            tenant_id=tenant_id, page_size=page_size, page_token=page_token
        )
        return await self._call(self._stub.ListDeadLetters, request, timeout_s)

    async def redeliver_dead_letter(
        self,
        *,
        tenant_id: str = "",
        delivery_id: str,
        idempotency_key: str = "",
        timeout_s: float | None = None,
    ) -> gw.RedeliverDeadLetterResponse:
        request = gw.RedeliverDeadLetterRequest(
            tenant_id=tenant_id,
            delivery_id=delivery_id,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )
        return await self._call(self._stub.RedeliverDeadLetter, request, timeout_s)

    async def put_customer_profile(
        self,
        *,
        profile: gw.CustomerProfile,
        change_id: str,
        actor: str,
        tenant_id: str = "",
        timeout_s: float | None = None,
    ) -> gw.PutCustomerProfileResponse:
        """Records a KYC result (scope customers:write); idempotent on change_id."""
        request = gw.PutCustomerProfileRequest(
            tenant_id=tenant_id, profile=profile, change_id=change_id, actor=actor
        )
        return await self._call(self._stub.PutCustomerProfile, request, timeout_s)

    async def get_customer_profile(
        self, *, customer_id: str, tenant_id: str = "", timeout_s: float | None = None
    ) -> gw.GetCustomerProfileResponse:
        request = gw.GetCustomerProfileRequest(tenant_id=tenant_id, customer_id=customer_id)
        return await self._call(self._stub.GetCustomerProfile, request, timeout_s)

    async def create_beneficiary(
        self, *, idempotency_key: str = "", timeout_s: float | None = None, **fields: Any
    ) -> gw.CreateBeneficiaryResponse:
        """A seller's payout destination (scope payouts:write): one of iban
        (+ bic), routing_number + account_number, token_kind + token."""
        request = gw.CreateBeneficiaryRequest(
            idempotency_key=idempotency_key or new_idempotency_key(), **fields
        )
        return await self._call(self._stub.CreateBeneficiary, request, timeout_s)

    async def get_beneficiary(
        self, *, beneficiary_id: str, tenant_id: str = "", timeout_s: float | None = None
    ) -> gw.GetBeneficiaryResponse:
        request = gw.GetBeneficiaryRequest(tenant_id=tenant_id, beneficiary_id=beneficiary_id)
        return await self._call(self._stub.GetBeneficiary, request, timeout_s)

    async def create_payout(
        self, *, idempotency_key: str = "", timeout_s: float | None = None, **fields: Any
    ) -> gw.CreatePayoutResponse:
        """Pays a seller out to a beneficiary (scope payouts:write)."""
        request = gw.CreatePayoutRequest(
            idempotency_key=idempotency_key or new_idempotency_key(), **fields
        )
        return await self._call(self._stub.CreatePayout, request, timeout_s)

    async def get_payout(
        self, *, payout_id: str, tenant_id: str = "", timeout_s: float | None = None
    ) -> gw.GetPayoutResponse:
        request = gw.GetPayoutRequest(tenant_id=tenant_id, payout_id=payout_id)
        return await self._call(self._stub.GetPayout, request, timeout_s)


class ApiKeysClient(_Client):
    """triplane.gateway.v1.ApiKeyService: a platform's keys. Called with the
    admin identity (`tls` with the admin certificate), the bootstrap admin
    key, or a tenant's own key holding `keys:admin` (`api_key`). Not retried
    automatically; Create and Rotate are keyed, so a retry with the same
    idempotency key is safe (and answers without the secret)."""

    SERVICE = "triplane.gateway.v1.ApiKeyService"

    def __init__(
        self,
        address: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        api_key: str = "",
        tls: TlsFiles | None = None,
        load_balancing: str = "round_robin",
        authority: str = "",
    ):
        super().__init__(
            address,
            timeout_s,
            retry=False,
            tls=tls,
            load_balancing=load_balancing,
            authority=authority,
        )
        self._metadata = _bearer(api_key)
        self._stub = gateway_pb2_grpc.ApiKeyServiceStub(self._channel)

    async def create(
        self,
        *,
        scopes: list[str],
        tenant_id: str = "",
        display_name: str = "",
        expires_at: Any = None,
        idempotency_key: str = "",
        timeout_s: float | None = None,
    ) -> gw.CreateApiKeyResponse:
        request = gw.CreateApiKeyRequest(
            tenant_id=tenant_id,
            idempotency_key=idempotency_key or new_idempotency_key(),
            scopes=scopes,
            display_name=display_name,
            expires_at=expires_at,
        )
        return await self._call(self._stub.CreateApiKey, request, timeout_s)

    async def list(
        self,
        *,
        tenant_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        include_revoked: bool = False,
        timeout_s: float | None = None,
    ) -> gw.ListApiKeysResponse:
        request = gw.ListApiKeysRequest(
            tenant_id=tenant_id,
            page_size=page_size,
            page_token=page_token,
            include_revoked=include_revoked,
        )
        return await self._call(self._stub.ListApiKeys, request, timeout_s)

    async def rotate(
        self,
        *,
        key_id: str,
        tenant_id: str = "",
        overlap_s: int = 0,
        expires_at: Any = None,
        idempotency_key: str = "",
        timeout_s: float | None = None,
    ) -> gw.RotateApiKeyResponse:
        request = gw.RotateApiKeyRequest(
            tenant_id=tenant_id,
            idempotency_key=idempotency_key or new_idempotency_key(),
            key_id=key_id,
            overlap_s=overlap_s,
            expires_at=expires_at,
        )
        return await self._call(self._stub.RotateApiKey, request, timeout_s)

    async def revoke(
        self, *, key_id: str, tenant_id: str = "", timeout_s: float | None = None
    ) -> gw.RevokeApiKeyResponse:
        request = gw.RevokeApiKeyRequest(tenant_id=tenant_id, key_id=key_id)
        return await self._call(self._stub.RevokeApiKey, request, timeout_s)


class LedgerAdminClient(_Client):
    """The money plane's admin reads (tenants, accounts, balances, checks).
    Not retried automatically: CreateAccounts is not keyed."""

    def __init__(
        self,
        address: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        tls: TlsFiles | None = None,
        load_balancing: str = "round_robin",
        authority: str = "",
    ):
        super().__init__(
            address,
            timeout_s,
            retry=False,
            tls=tls,
            load_balancing=load_balancing,
            authority=authority,
        )
        self._stub = money_pb2_grpc.LedgerServiceStub(self._channel)

    async def create_tenant(self, tenant_id: str, display_name: str = "") -> money_pb2.Tenant:
        request = money_pb2.CreateTenantRequest(tenant_id=tenant_id, display_name=display_name)
        answer: money_pb2.CreateTenantResponse = await self._call(
            self._stub.CreateTenant, request, None
        )
        return answer.tenant

    async def create_accounts(
        self, tenant_id: str, accounts: list[money_pb2.NewAccount]
    ) -> list[money_pb2.Account]:
        request = money_pb2.CreateAccountsRequest(tenant_id=tenant_id, accounts=accounts)
        return list((await self._call(self._stub.CreateAccounts, request, None)).accounts)

    async def get_balance(self, tenant_id: str, account_id: str) -> money_pb2.Balance:
        request = money_pb2.GetBalanceRequest(tenant_id=tenant_id, account_id=account_id)
        answer: money_pb2.GetBalanceResponse = await self._call(
            self._stub.GetBalance, request, None
        )
        return answer.balance

    async def check_balanced(self, tenant_id: str) -> money_pb2.CheckBalancedResponse:
        request = money_pb2.CheckBalancedRequest(tenant_id=tenant_id)
        return await self._call(self._stub.CheckBalanced, request, None)

    async def record_payout_outcome(
        self,
        tenant_id: str,
        payout_id: str,
        outcome: money_pb2.PayoutOutcome.ValueType,
        reason_code: str = "",
        reason: str = "",
        rail_reference: str = "",
    ) -> money_pb2.RecordPayoutOutcomeResponse:
        """A rail's settled / returned / failed, posted once (replayed after)."""
        request = money_pb2.RecordPayoutOutcomeRequest(
            tenant_id=tenant_id,
            payout_id=payout_id,
            outcome=outcome,
            reason_code=reason_code,
            reason=reason,
            rail_reference=rail_reference,
        )
        return await self._call(self._stub.RecordPayoutOutcome, request, None)

    async def put_settlement_schedule(
        self, schedule: money_pb2.SettlementSchedule
    ) -> money_pb2.SettlementSchedule:
        request = money_pb2.PutSettlementScheduleRequest(schedule=schedule)
        answer: money_pb2.PutSettlementScheduleResponse = await self._call(
            self._stub.PutSettlementSchedule, request, None
        )
        return answer.schedule

    async def run_settlements(self) -> int:
        """Settles every schedule's latest closed period now; how many."""
        answer: money_pb2.RunSettlementsResponse = await self._call(
            self._stub.RunSettlements, money_pb2.RunSettlementsRequest(), None
        )
        return answer.settled

    async def list_settlements(self, tenant_id: str, account_id: str) -> list[money_pb2.Settlement]:
        request = money_pb2.ListSettlementsRequest(tenant_id=tenant_id, account_id=account_id)
        answer: money_pb2.ListSettlementsResponse = await self._call(
            self._stub.ListSettlements, request, None
        )
        return list(answer.settlements)


class PolicyAdminClient(_Client):
    """The policy plane's catalog, consent and case admin calls."""

    def __init__(
        self,
        address: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        tls: TlsFiles | None = None,
        load_balancing: str = "round_robin",
        authority: str = "",
    ):
        super().__init__(
            address,
            timeout_s,
            retry=False,
            tls=tls,
            load_balancing=load_balancing,
            authority=authority,
        )
        self._policy = policy_pb2_grpc.PolicyServiceStub(self._channel)
        self._offers = policy_pb2_grpc.OfferServiceStub(self._channel)
        self._consent = policy_pb2_grpc.ConsentServiceStub(self._channel)
        self._cases = policy_pb2_grpc.CaseServiceStub(self._channel)
        self._profiles = policy_pb2_grpc.CustomerProfileServiceStub(self._channel)

    async def create_tenant(self, tenant_id: str, display_name: str = "") -> None:
        request = policy_pb2.CreateTenantRequest(tenant_id=tenant_id, display_name=display_name)
        await self._call(self._policy.CreateTenant, request, None)

    async def put_offer(self, offer: policy_pb2.Offer) -> policy_pb2.Offer:
        request = policy_pb2.PutOfferRequest(offer=offer)
        answer: policy_pb2.PutOfferResponse = await self._call(self._offers.PutOffer, request, None)
        return answer.offer

    async def put_contact_profile(self, profile: policy_pb2.ContactProfile) -> None:
        request = policy_pb2.PutContactProfileRequest(profile=profile)
        await self._call(self._consent.PutContactProfile, request, None)

    async def set_consent(
        self, tenant_id: str, customer_id: str, consent: policy_pb2.Consent
    ) -> None:
        request = policy_pb2.SetConsentRequest(
            tenant_id=tenant_id, customer_id=customer_id, consent=consent
        )
        await self._call(self._consent.SetConsent, request, None)

    async def put_customer_profile(
        self, profile: policy_pb2.CustomerProfile, change_id: str, actor: str
    ) -> policy_pb2.PutCustomerProfileResponse:
        """Records a KYC result (admin identity); idempotent on change_id."""
        request = policy_pb2.PutCustomerProfileRequest(
            profile=profile, change_id=change_id, actor=actor
        )
        return await self._call(self._profiles.PutCustomerProfile, request, None)

    async def list_cases(
        self, tenant_id: str, page_size: int = 0, page_token: str = ""
    ) -> policy_pb2.ListCasesResponse:
        request = policy_pb2.ListCasesRequest(
            tenant_id=tenant_id, page_size=page_size, page_token=page_token
        )
        return await self._call(self._cases.ListCases, request, None)


__all__ = [
    "ApiKeysClient",
    "GatewayClient",
    "LedgerAdminClient",
    "PolicyAdminClient",
    "TlsFiles",
    "TriplaneApiError",
]
