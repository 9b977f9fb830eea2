"""The gateway's credential check, one interceptor on its public port.

For every method of the table in `gateway.auth.scopes` (default deny: any
other unary method is refused METHOD_NOT_ALLOWED before its handler runs):

1. who: `authorization: Bearer <API key or JWT>` (the Authenticator), or for
   key management the admin certificate identity (runtime.tls.roles.admin,
   read by `triplane.runtime.authz.peer_identity`); neither is
   UNAUTHENTICATED CREDENTIAL_MISSING;
2. may it: the method's scope (PERMISSION_DENIED SCOPE_MISSING, the scope in
   ErrorInfo.metadata["scope"] and the message); an admin credential names no
   tenant and manages keys only (TENANT_CREDENTIAL_REQUIRED elsewhere);
3. which tenant: the credential's. A request's empty tenant_id is set to it;
   another one is PERMISSION_DENIED TENANT_MISMATCH naming tenant_id (a
   malformed one INVALID_ARGUMENT INVALID_TENANT_ID, as every plane says),
   so no flow below ever serves a tenant the caller does not hold;
4. how often: the credential's rate limit (RESOURCE_EXHAUSTED RATE_LIMITED
   with a RetryInfo);

then the handler runs with the principal in `current_principal()`. It sits
inside the runtime's error mapping, so what it raises reaches the caller as
a rich status."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import grpc

from gateway.auth.admin import missing_scope
from gateway.auth.authenticator import Authenticator, missing
from gateway.auth.principal import KIND_ADMIN, Principal, reset_principal, set_principal
from gateway.auth.ratelimit import RateLimiter, rate_class
from gateway.auth.scopes import DELIVERIES_ADMIN, KEYS_ADMIN, METHOD_RULES, MethodRule, is_open
from triplane.runtime.errors import PermissionDenied
from triplane.runtime.ids import check_tenant_id
from triplane.runtime.interceptors import Unary, UnaryWrappingInterceptor

TENANT_MISMATCH = "TENANT_MISMATCH"
TENANT_CREDENTIAL_REQUIRED = "TENANT_CREDENTIAL_REQUIRED"
METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"

PeerIdentity = Callable[[grpc.aio.ServicerContext], str | None]


def _authorization(context: grpc.aio.ServicerContext) -> str:
    for item in context.invocation_metadata() or ():
        if item[0] == "authorization":
            value = item[1]
            return value if isinstance(value, str) else value.decode("latin-1")
    return ""


def bind_tenant(principal: Principal, request: Any) -> None:
    """The request's tenant is the credential's: filled in when empty,
    refused when it names another."""
    requested = request.tenant_id
    if not requested:
        request.tenant_id = principal.tenant_id
    elif requested != principal.tenant_id:
        # A malformed id is refused as every plane refuses it, before it is
        # compared.
        check_tenant_id(requested)
        raise PermissionDenied(
            TENANT_MISMATCH,
            "tenant_id names another tenant than the credential's",
            "tenant_id",
        )


class CredentialInterceptor(UnaryWrappingInterceptor):
    def __init__(
        self,
        authenticator: Authenticator,
        limiter: RateLimiter | None,
        admin_identities: Collection[str],
        peer_identity: PeerIdentity,
        rules: dict[str, MethodRule] = METHOD_RULES,
        console_identities: Collection[str] = (),
    ) -> None:
        super().__init__()
        self._authenticator = authenticator
        self._limiter = limiter
        self._admin_identities = frozenset(admin_identities)
        self._console_identities = frozenset(console_identities)
        self._peer_identity = peer_identity
        self._rules = rules
        self._admins: dict[str, Principal] = {}

    def wraps(self, method: str) -> bool:
        return not is_open(method)

    def wrap(self, method: str, behavior: Unary) -> Unary:
        rule = self._rules.get(method)
        if rule is None:
            return _refuse(method)
        limiter = self._limiter
        limits = rate_class(limiter.config, rule.scope) if limiter is not None else None
        local_only = limiter is not None and not limiter.shared
        principal_of = self._principal

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            principal = await principal_of(context, rule)
            _authorize(principal, rule, request)
            if limiter is not None and limits is not None:
                if local_only:
                    limiter.check_local(principal.credential_id, limits)
                else:
                    await limiter.check(principal.credential_id, limits)
            token = set_principal(principal)
            try:
                return await behavior(request, context)
            finally:
                reset_principal(token)

        return guarded

    async def _principal(self, context: grpc.aio.ServicerContext, rule: MethodRule) -> Principal:
        authorization = _authorization(context)
        if authorization:
            return await self._authenticator.authenticate(authorization)
        if rule.admin or rule.console:
            identity = self._peer_identity(context)
            if rule.admin and identity is not None and identity in self._admin_identities:
                return self._admin(identity, "admin")
            if rule.console and identity is not None and identity in self._console_identities:
                return self._admin(identity, "console")
        raise missing()

    def _admin(self, identity: str, role: str) -> Principal:
        """The principal of an admin or console certificate: no tenant (the
        request names one), only the methods whose rule admits `role`."""
        key = f"{role}:{identity}"
        admin = self._admins.get(key)
        if admin is None:
            admin = Principal(KIND_ADMIN, key, "", frozenset({KEYS_ADMIN, DELIVERIES_ADMIN}))
            self._admins[key] = admin
        return admin


def _authorize(principal: Principal, rule: MethodRule, request: Any) -> None:
    if principal.is_admin:
        if not (rule.admin or rule.console):
            raise PermissionDenied(
                TENANT_CREDENTIAL_REQUIRED,
                "an admin credential belongs to no tenant: call with a tenant's key",
            )
        return  # ApiKeyService: the admin names the tenant it manages.
    if not principal.has_scope(rule.scope):
        raise missing_scope(rule.scope, "this method")
    bind_tenant(principal, request)


def _refuse(method: str) -> Unary:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise PermissionDenied(
            METHOD_NOT_ALLOWED,
            f"{method} is not in the gateway's credential table",
            metadata={"method": method},
        )

    return refuse
