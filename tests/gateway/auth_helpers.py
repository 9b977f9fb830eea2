"""Partner credentials in the gateway tests: a key made in-process through
the gateway's own key admin (as ApiKeyService would), and a stub that sends
it with every call."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from typing import Any

from gateway.app import Gateway
from gateway.auth.principal import KIND_ADMIN, Principal
from gateway.auth.scopes import KEYS_ADMIN
from triplane_tools.partner_keys import PARTNER_SCOPES

ADMIN = Principal(KIND_ADMIN, "admin:tests", "", frozenset({KEYS_ADMIN}))


async def partner_key(
    gateway: Gateway, tenant_id: str, scopes: Sequence[str] = PARTNER_SCOPES, expires_at_us: int = 0
) -> str:
    """A new key of `tenant_id` on a started gateway (its secret)."""
    assert gateway.auth is not None, "gateway.auth is off"
    made = await gateway.auth.admin.create(
        ADMIN, tenant_id, uuid.uuid4().hex, list(scopes), "tests", expires_at_us
    )
    return made.secret


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


class KeyedStub:
    """A generated stub whose every method sends `authorization: Bearer <key>`."""

    def __init__(self, stub: Any, key: str) -> None:
        self._stub = stub
        self._metadata = bearer(key)

    def __getattr__(self, name: str) -> Any:
        return functools.partial(getattr(self._stub, name), metadata=self._metadata)
