"""Who is calling: the verified credential of the request being served.

The auth interceptor sets it before a handler runs, so a flow that must
know more than the tenant (GetDecision shows clear PII only with `pii:read`)
asks `current_principal()` rather than taking it through every signature."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

KIND_API_KEY = "api_key"
KIND_JWT = "jwt"
KIND_ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    # api_key, jwt or admin (the bootstrap admin key or the admin certificate).
    kind: str
    # What rate limits and logs key on: the key id, jwt:<issuer>|<subject>, or
    # admin:<how>.
    credential_id: str
    # The tenant the credential belongs to; "" for an admin, who has none.
    tenant_id: str
    scopes: frozenset[str]
    # Microseconds since the epoch after which the credential no longer
    # works (key expiry, end of a rotation's overlap, a JWT's exp); 0: never.
    valid_until_us: int = 0

    @property
    def is_admin(self) -> bool:
        return self.kind == KIND_ADMIN

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


_CURRENT: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "triplane_gateway_principal", default=None
)


def current_principal() -> Principal | None:
    """The caller of the request being served (None outside one, or when
    gateway.auth is off)."""
    return _CURRENT.get()


def set_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    return _CURRENT.set(principal)


def reset_principal(token: contextvars.Token[Principal | None]) -> None:
    _CURRENT.reset(token)
