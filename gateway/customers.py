"""Customer profiles through the gateway: a platform's KYC integration
records what its checks established (tier, PEP, verified country, account
opening) with a `customers:write` key, bound to the key's tenant, and the
policy plane decides every later payment of that customer on it (issue 11
§4: facts from the server, never what AuthorizePayment declares).

The gateway keeps nothing of a profile: the policy plane holds it and its
change history, idempotent on change_id. The actor the platform names is
recorded with the credential that sent it."""

from __future__ import annotations

from gateway import validate
from gateway.auth.principal import current_principal
from gateway.core import CallContext, Core
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.policy.v1 import policy_pb2
from triplane.runtime.errors import InvalidArgument


def _to_policy(tenant_id: str, profile: gw.CustomerProfile) -> policy_pb2.CustomerProfile:
    return policy_pb2.CustomerProfile(
        tenant_id=tenant_id,
        customer_id=profile.customer_id,
        kyc_tier=profile.kyc_tier,
        pep=profile.pep,
        country=profile.country,
        account_opened_at=profile.account_opened_at,
        verified_at=profile.verified_at,
    )


def _from_policy(profile: policy_pb2.CustomerProfile) -> gw.CustomerProfile:
    return gw.CustomerProfile(
        customer_id=profile.customer_id,
        kyc_tier=profile.kyc_tier,
        pep=profile.pep,
        country=profile.country,
        account_opened_at=profile.account_opened_at,
        verified_at=profile.verified_at,
        updated_by=profile.updated_by,
        updated_at=profile.updated_at,
        change_id=profile.change_id,
    )


def _change(change: policy_pb2.CustomerProfileChange) -> gw.CustomerProfileChange:
    return gw.CustomerProfileChange(
        change_id=change.change_id,
        profile=_from_policy(change.profile),
        actor=change.actor,
        recorded_at=change.recorded_at,
        applied=change.applied,
    )


class CustomerProfiles:
    def __init__(self, core: Core) -> None:
        self.core = core

    def _required_id(self, value: str, field: str) -> None:
        if not value:
            raise InvalidArgument("FIELD_REQUIRED", f"{field} is required", field)
        validate.check_id(value, field, self.core.config.limits)

    async def put(
        self, req: gw.PutCustomerProfileRequest, call: CallContext
    ) -> gw.PutCustomerProfileResponse:
        validate.require_tenant_id(req.tenant_id)
        self._required_id(req.profile.customer_id, "profile.customer_id")
        self._required_id(req.change_id, "change_id")
        if not req.actor:
            raise InvalidArgument("FIELD_REQUIRED", "actor is required", "actor")
        # The actor and the credential it came with are recorded together.
        if len(req.actor) > self.core.config.limits.max_id_length:
            raise InvalidArgument(
                "FIELD_TOO_LONG",
                f"actor is longer than {self.core.config.limits.max_id_length} characters",
                "actor",
            )
        principal = current_principal()
        credential = principal.credential_id if principal is not None else "no credential"
        request = policy_pb2.PutCustomerProfileRequest(
            profile=_to_policy(req.tenant_id, req.profile),
            change_id=req.change_id,
            actor=f"{req.actor} ({credential})",
        )
        core = self.core
        timeout_s = core.timeout_s(call, core.config.budgets.policy_budget_ms)
        answer = await core.policy.put_customer_profile(request, timeout_s)
        return gw.PutCustomerProfileResponse(
            profile=_from_policy(answer.profile), replayed=answer.replayed, applied=answer.applied
        )

    async def get(
        self, req: gw.GetCustomerProfileRequest, call: CallContext
    ) -> gw.GetCustomerProfileResponse:
        validate.require_tenant_id(req.tenant_id)
        self._required_id(req.customer_id, "customer_id")
        core = self.core
        timeout_s = core.timeout_s(call, core.config.budgets.policy_budget_ms)
        answer = await core.policy.get_customer_profile(
            policy_pb2.GetCustomerProfileRequest(
                tenant_id=req.tenant_id, customer_id=req.customer_id
            ),
            timeout_s,
        )
        return gw.GetCustomerProfileResponse(
            profile=_from_policy(answer.profile), changes=[_change(c) for c in answer.changes]
        )
