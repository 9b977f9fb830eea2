"""A partner API key for a tenant, made the way a platform's operator would
(ApiKeyService, called as an admin), for the demo, the benchmark and the
tests that drive the gateway as a partner."""

from __future__ import annotations

from pathlib import Path

from gateway.auth import secrets
from gateway.auth.scopes import (
    ACTIONS_WRITE,
    CUSTOMERS_READ,
    CUSTOMERS_WRITE,
    DECISIONS_READ,
    DELIVERIES_ADMIN,
    EVENTS_WRITE,
    PAYMENTS_READ,
    PAYMENTS_WRITE,
    PAYOUTS_READ,
    PAYOUTS_WRITE,
)
from triplane.runtime.config import Config, with_overrides
from triplane.runtime.tls import ADMIN, files_for
from triplane_client import ApiKeysClient

# What a platform's backend needs to drive every flow of the gateway (not
# pii:read nor keys:admin: those are granted on purpose, not by default).
PARTNER_SCOPES = (
    PAYMENTS_WRITE,
    PAYMENTS_READ,
    DECISIONS_READ,
    ACTIONS_WRITE,
    EVENTS_WRITE,
    DELIVERIES_ADMIN,
    CUSTOMERS_WRITE,
    CUSTOMERS_READ,
    PAYOUTS_WRITE,
    PAYOUTS_READ,
)


async def create_partner_key(
    config: Config,
    gateway_address: str,
    tenant_id: str,
    scopes: tuple[str, ...] | list[str] = PARTNER_SCOPES,
    display_name: str = "",
    state_dir: Path | None = None,
) -> str:
    """A new key for `tenant_id` (its secret), made with the bootstrap admin
    key of the state dir (`state_dir`, else `config`'s; the dev stack makes
    it) over the admin identity's TLS."""
    if state_dir is not None:
        config = with_overrides(config, {"runtime": {"state_dir": str(state_dir)}})
    admin_key = secrets.load_admin_key(config.gateway.auth, config.state_path) or ""
    client = ApiKeysClient(gateway_address, api_key=admin_key, tls=files_for(config, ADMIN))
    try:
        made = await client.create(
            tenant_id=tenant_id, scopes=list(scopes), display_name=display_name
        )
    finally:
        await client.close()
    return made.secret
